// One Canopy node: builds the actor tree of DESIGN.md from options, runs it,
// and stops it in order. main() owns exactly one; tests and benchmarks may own
// several in one process (nothing here is global).
//
// The tree:   root (rest_for_one)
//             ├── store    — SQLite (runtime/store_actor)
//             ├── router   — routes, keeps messages in data_dir/messages.db, delivers
//             ├── agent    — reconciles the deployment, keeps module state
//             └── modules  (one_for_one; each module with its own restart budget)
// Rest-for-one keeps handles fresh: a restarted router restarts the agent and the
// modules (they send to it); a fresh modules supervisor tells the agent, which
// starts the deployment's modules in it again.
#pragma once

#include "runtime/expected.hpp"
#include "runtime/log.hpp"

#include <memory>
#include <string>
#include <chrono>
#include <vector>

namespace canopy {

struct node_options {
  std::string data_dir = "/var/lib/canopy";
  std::string socket_path = "/run/canopy/canopy.sock";  ///< "" = no control socket
  std::string manifest_path;             ///< "" = run the last applied deployment
  std::string device_id;                 ///< "" = the host name
  log_options log;
  std::vector<std::string> module_path;  ///< extra directories for relative module libraries
  std::size_t worker_threads = 0;        ///< 0 = one per core (at least 2)
  /// Size limit of the message store (data_dir/messages.db) in bytes; 0 = none.
  /// At the limit the node refuses new messages ("store full") and counts them.
  std::int64_t max_store_bytes = 0;
  /// How long a message bound only for $upstream, whose sender waits, may
  /// wait in memory for the parent's (or the telemetry store's)
  /// acknowledgement before this node writes it itself (router_config::
  /// upstream_hold); 0 = write every such message at this hop too.
  std::chrono::milliseconds upstream_hold{20};

  // --- The tree (issue 4) ---
  /// "edge" (a device or gateway) or "hub" (the root: owns the fleet registry,
  /// keeps telemetry, serves the operator API).
  std::string role = "edge";
  /// The node's certificate, key and the fleet's root CA (PEM). Required for
  /// links; `certs_dir` fills unset ones with DIR/<id>.crt, DIR/<id>.key, DIR/ca.crt.
  std::string cert_path, key_path, ca_path, certs_dir;
  /// Children connect here ("host:port"); "" = none.
  std::string link_listen;
  /// The parent ("host:port") and its id (its certificate names it); "" = none.
  std::string parent_address, parent_id;
  /// Prometheus text on http://<metrics_listen>/metrics; "" = none.
  std::string metrics_listen;
  /// The hub's operator REST API on https://<api_listen>/ (hub only); "" = none.
  std::string api_listen;
  /// The API's bearer token; created (random, mode 0600) if missing.
  /// Default: DATA/api-token.
  std::string api_token_file;

  // --- Leaf devices and process modules over MQTT (issue 5) ---
  /// Serve MQTT 3.1.1 (Azure IoT Hub's device protocol) on "host:port"; ""
  /// = none. TLS with this node's certificate, unless `mqtt_plain`.
  std::string mqtt_listen;
  /// Plain TCP instead of TLS on mqtt_listen (loopback development, benchmarks).
  bool mqtt_plain = false;
  /// The host name SAS tokens are signed for; "" = this node's device id.
  std::string hub_host;
};

/// A running node.
class node {
 public:
  /// Opens the store, loads the manifest (or the last deployment), starts the
  /// actor tree and the control socket. Errors name the file/field at fault;
  /// on error nothing keeps running.
  static expected<std::unique_ptr<node>> start(node_options opts);

  /// Stops in order: control socket, modules, agent, router, store. Idempotent.
  void stop();

  /// True once the root supervisor gave up (it also raises SIGTERM then, so
  /// that main() stops the node and exits non-zero).
  bool failed() const;

  ~node();
  node(const node&) = delete;
  node& operator=(const node&) = delete;

  struct impl;

 private:
  explicit node(std::unique_ptr<impl> p);
  std::unique_ptr<impl> impl_;
};

/// Reads and validates a manifest file, resolving libraries like the node does.
/// For `canopy check` and tests.
expected<void> check_manifest_file(const std::string& path, const std::vector<std::string>& module_path);

}  // namespace canopy
