#include "integration/fleet.hpp"

#include <catch2/catch.hpp>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>

namespace canopy::test {

using namespace std::chrono_literals;

int free_port() {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  REQUIRE(fd >= 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  REQUIRE(::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
  socklen_t len = sizeof a;
  REQUIRE(::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) == 0);
  ::close(fd);
  return ntohs(a.sin_port);
}

std::string loopback(int port) { return "127.0.0.1:" + std::to_string(port); }

nlohmann::json parse_or_null(const run_result& r) {
  if (r.exit_code != 0)
    return {};
  auto j = nlohmann::json::parse(r.output, nullptr, false);
  return j.is_discarded() ? nlohmann::json{} : j;
}

fleet_certs::fleet_certs(const canopy_paths& paths, const char* prefix) : paths_(paths), dir_(prefix) {
  ctl({"certs", "ca", "--out", dir_.path()});
}

void fleet_certs::issue(const std::string& id) {
  ctl({"certs", "issue", "--ca-dir", dir_.path(), "--id", id, "--ip", "127.0.0.1", "--dns", "localhost"});
}

void fleet_certs::ctl(std::vector<std::string> args) {
  args.insert(args.begin(), paths_.canopyctl);
  auto r = run(args, 30s);
  INFO(r.output);
  REQUIRE(r.exit_code == 0);
}

void hub_node::start() {
  node.start("", {"--role", "hub", "--device-id", "hub", "--certs", certs.dir(), "--link-listen",
                  loopback(link_port), "--api-listen", loopback(api_port), "--metrics-listen",
                  loopback(metrics_port)});
  REQUIRE(node.wait_ready());
}

run_result hub_node::ctl(const std::vector<std::string>& args) const {
  std::vector<std::string> argv{node.paths().canopyctl, "--hub", "https://" + loopback(api_port), "--hub-id",
                                "hub", "--ca", certs.ca(), "--token-file", node.data_dir() + "/api-token"};
  argv.insert(argv.end(), args.begin(), args.end());
  return run(argv, 40s);
}

void hub_node::must(const std::vector<std::string>& args) const {
  auto r = ctl(args);
  INFO("canopyctl " << args.front() << " ...: " << r.output);
  REQUIRE(r.exit_code == 0);
}

nlohmann::json hub_node::telemetry(const std::string& device) const {
  auto r = ctl({"telemetry", "--device", device, "--limit", "10000", "--json"});
  if (r.exit_code != 0)
    return nlohmann::json::array();
  auto j = nlohmann::json::parse(r.output, nullptr, false);
  return j.is_array() ? j : nlohmann::json::array();
}

nlohmann::json hub_node::twin(const std::string& device) const {
  return parse_or_null(ctl({"twin", "show", device}));
}

nlohmann::json metrics(const canopy_node& node) {
  auto r = node.ctl({"metrics", "--json"});
  if (r.exit_code != 0)
    return {};
  auto j = nlohmann::json::parse(r.output, nullptr, false);
  return j.is_discarded() ? nlohmann::json{} : j;
}

nlohmann::json link_of(const canopy_node& node, const std::string& role, const std::string& peer) {
  for (auto& l : metrics(node).value("links", nlohmann::json::array()))
    if (l.value("role", "") == role && l.value("peer", "") == peer)
      return l;
  return {};
}

bool link_up(const canopy_node& node, const std::string& role, const std::string& peer) {
  auto l = link_of(node, role, peer);
  return !l.is_null() && l.value("up", false);
}

}  // namespace canopy::test
