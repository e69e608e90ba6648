// Helpers for the integration tests that run a fleet of real canopy processes
// (tree.test.cpp, mqtt.test.cpp): loopback ports, the fleet's certificates
// made with `canopyctl certs` as a user would, the hub with its REST API
// driven by `canopyctl --hub`, and a node's links from `canopyctl metrics`.
// Test helpers: a failure is a Catch2 REQUIRE.
#pragma once

#include "integration/process.hpp"

#include <nlohmann/json.hpp>

#include <string>
#include <vector>

namespace canopy::test {

/// A TCP port on 127.0.0.1 that was free a moment ago.
int free_port();

/// "127.0.0.1:port".
std::string loopback(int port);

/// The JSON a command printed, or null if it failed or printed something else.
nlohmann::json parse_or_null(const run_result& r);

/// The certificates of a fleet, made with `canopyctl certs` as a user would.
/// Each names its id, 127.0.0.1 and localhost, so clients may verify the host.
class fleet_certs {
 public:
  /// A new CA in a temporary directory whose name starts with `prefix`.
  explicit fleet_certs(const canopy_paths& paths, const char* prefix = "cnc");
  /// Issues DIR/<id>.crt and DIR/<id>.key.
  void issue(const std::string& id);
  const std::string& dir() const { return dir_.path(); }
  std::string ca() const { return dir_.file("ca.crt"); }
  std::string cert(const std::string& id) const { return dir_.file(id + ".crt"); }
  std::string key(const std::string& id) const { return dir_.file(id + ".key"); }

 private:
  void ctl(std::vector<std::string> args);
  canopy_paths paths_;
  temp_dir dir_;
};

/// The hub: registry, telemetry store, REST API and metrics.
struct hub_node {
  canopy_node node;
  const fleet_certs& certs;
  int link_port = free_port();
  int api_port = free_port();
  int metrics_port = free_port();

  hub_node(const canopy_paths& paths, const fleet_certs& c) : node(paths), certs(c) {}

  /// Starts it (links, API, metrics on loopback) and waits until it is ready.
  void start();
  /// `canopyctl --hub ... args` against the REST API.
  run_result ctl(const std::vector<std::string>& args) const;
  /// ctl() that must succeed.
  void must(const std::vector<std::string>& args) const;
  /// Telemetry of `device` at the hub, as parsed JSON records (oldest first).
  nlohmann::json telemetry(const std::string& device) const;
  /// The device's twin at the hub (`twin show`), or null.
  nlohmann::json twin(const std::string& device) const;
};

/// `canopyctl metrics --json` of a node, or null.
nlohmann::json metrics(const canopy_node& node);

/// The node's link with `role` ("parent", "child") to `peer`, or null.
nlohmann::json link_of(const canopy_node& node, const std::string& role, const std::string& peer);

/// True if that link is up.
bool link_up(const canopy_node& node, const std::string& role, const std::string& peer);

}  // namespace canopy::test
