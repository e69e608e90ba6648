// Integration: a tree of real `canopy` processes on loopback — a hub, gateways
// linked to it over mutually authenticated TLS, leaf devices' telemetry going
// up — driven the way an operator does it: `canopyctl certs` for the
// certificates, `canopyctl device create` against the hub's REST API, and
// `canopyctl send` as a leaf device's program.
#include "integration/fleet.hpp"
#include "integration/process.hpp"

#include "gateway/certs.hpp"

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <csignal>
#include <fstream>
#include <map>
#include <regex>
#include <set>
#include <sstream>
#include <string>

using namespace canopy::test;
using namespace std::chrono_literals;

namespace {



/// A plain HTTP GET on 127.0.0.1:port; the whole answer (headers and body).
std::string http_get(int port, const std::string& path) {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0)
    return {};
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = htons(static_cast<std::uint16_t>(port));
  std::string out;
  if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0) {
    std::string req = "GET " + path + " HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
    if (::write(fd, req.data(), req.size()) == static_cast<ssize_t>(req.size())) {
      char buf[4096];
      timeval tv{5, 0};
      ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
      for (ssize_t n; (n = ::read(fd, buf, sizeof buf)) > 0;)
        out.append(buf, static_cast<std::size_t>(n));
    }
  }
  ::close(fd);
  return out;
}



/// A fleet: its certificates (the hub's and `ids`) and its hub, started; and
/// the registry entries the tests create through the hub's API.
struct fleet_fixture {
  canopy_paths paths = canopy_paths::from_env();
  fleet_certs certs{paths};
  hub_node hub{paths, certs};

  explicit fleet_fixture(std::initializer_list<const char*> ids) {
    certs.issue("hub");
    for (auto id : ids)
      certs.issue(id);
    hub.start();
  }

  /// Registers gateway `id` under `parent` with tags "k=v".
  void gateway(const std::string& id, const std::string& parent, const std::vector<std::string>& tags = {}) {
    std::vector<std::string> args{"device", "create", id, "--parent", parent, "--kind", "gateway"};
    for (auto& t : tags) {
      args.push_back("--tag");
      args.push_back(t);
    }
    hub.must(args);
  }

  /// Registers leaf device `id` under gateway `parent`.
  void device(const std::string& id, const std::string& parent) {
    hub.must({"device", "create", id, "--parent", parent, "--kind", "device", "--auth", "x509_ca"});
  }
};

/// A gateway with a parent.
void start_gateway(canopy_node& gw, const std::string& id, const fleet_certs& certs, int parent_port,
                   const std::string& parent_id, int listen_port = 0) {
  std::vector<std::string> args{"--device-id", id, "--certs", certs.dir(), "--parent", loopback(parent_port),
                                "--parent-id", parent_id};
  if (listen_port != 0) {
    args.push_back("--link-listen");
    args.push_back(loopback(listen_port));
  }
  gw.start("", args);
  REQUIRE(gw.wait_ready());
}



/// Writes `count` JSON readings {"n": first..} one per line; returns the path.
std::string readings_file(const canopy_node& node, long first, long count) {
  auto path = node.dir().file("readings-" + std::to_string(first) + ".txt");
  std::ofstream out{path};
  for (long i = first; i < first + count; ++i)
    out << R"({"temperature":21.5,"n":)" << i << "}\n";
  return path;
}

/// Sends the readings as leaf device `device` through `node`; the number acknowledged.
long send_readings(const canopy_node& node, const std::string& device, long first, long count) {
  child_process sender{{node.paths().canopyctl, "--socket", node.socket(), "send", "--device", device,
                        "--content-type", "application/json", "--content-encoding", "utf-8", "--stdin",
                        "--window", "64"},
                       {},
                       readings_file(node, first, count)};
  REQUIRE(sender.wait_for(120s).has_value());
  auto out = sender.output();
  static const std::regex ok_re{R"((^|\n)\d+ ok \d+)"};
  return static_cast<long>(std::distance(std::sregex_iterator(out.begin(), out.end(), ok_re),
                                         std::sregex_iterator()));
}

/// The "n" of each telemetry record, in arrival order.
std::vector<long> numbers(const nlohmann::json& records) {
  std::vector<long> out;
  for (auto& r : records)
    if (r.contains("body") && r["body"].is_object() && r["body"].contains("n"))
      out.push_back(r["body"]["n"].get<long>());
  return out;
}

/// Where complete_in_order() fails, for the test log.
std::string first_disorder(const std::vector<long>& ns, long first) {
  long next = first;
  for (std::size_t i = 0; i < ns.size(); ++i) {
    if (ns[i] == next)
      ++next;
    else if (ns[i] > next)
      return "at record " + std::to_string(i) + ": n=" + std::to_string(ns[i]) + " while expecting " +
             std::to_string(next) + " (of " + std::to_string(ns.size()) + " records)";
  }
  return "complete up to " + std::to_string(next - 1) + " (of " + std::to_string(ns.size()) + " records)";
}

/// True if `ns` holds first..first+count-1, each at least once, first
/// occurrences in order.
bool complete_in_order(const std::vector<long>& ns, long first, long count) {
  long next = first;
  for (long n : ns) {
    if (n == next)
      ++next;
    else if (n > next)
      return false;  // a gap, or out of order
  }
  return next == first + count;
}

}  // namespace

TEST_CASE("a grandchild's telemetry reaches the hub over two mutually authenticated TLS links",
          "[tree]") {
  fleet_fixture fleet{"gw1", "gw2"};
  auto& [paths, certs, hub] = fleet;
  fleet.gateway("gw1", "hub", {"site=plant-1"});
  fleet.gateway("gw2", "gw1");
  fleet.device("sensor-1", "gw2");

  canopy_node gw1{paths}, gw2{paths};
  const int gw1_port = free_port();
  start_gateway(gw1, "gw1", certs, hub.link_port, "hub", gw1_port);
  start_gateway(gw2, "gw2", certs, gw1_port, "gw1");
  REQUIRE(wait_until([&] { return link_up(gw1, "parent", "hub"); }, 30s, 100ms));
  // gw2 is admitted once gw1 has its registry scope from the hub.
  REQUIRE(wait_until([&] { return link_up(gw2, "parent", "gw1"); }, 60s, 100ms));
  CHECK(link_up(hub.node, "child", "gw1"));
  CHECK(link_up(gw1, "child", "gw2"));
  CHECK(link_of(gw2, "parent", "gw1").value("rtt_us", 0) > 0);

  REQUIRE(send_readings(gw2, "sensor-1", 1, 500) == 500);
  nlohmann::json at_hub;
  REQUIRE(wait_until([&] {
    at_hub = hub.telemetry("sensor-1");
    return at_hub.size() >= 500;
  }, 60s, 250ms));
  INFO(first_disorder(numbers(at_hub), 1));
  CHECK(complete_in_order(numbers(at_hub), 1, 500));
  CHECK(at_hub[0].value("deviceId", "") == "sensor-1");

  // Every node serves Prometheus text.
  auto prom = http_get(hub.metrics_port, "/metrics");
  CHECK(prom.find("200 OK") != std::string::npos);
  CHECK(prom.find("edgehub_messages_received_total") != std::string::npos);
  CHECK(prom.find(R"(canopy_link_up{peer="gw1",role="child",edge_device="hub"} 1)") != std::string::npos);

  // The fleet as the hub sees it.
  auto status = hub.ctl({"status", "--json"});
  REQUIRE(status.exit_code == 0);
  auto nodes = nlohmann::json::parse(status.output);
  std::map<std::string, nlohmann::json> by_id;
  for (auto& n : nodes)
    by_id[n.value("deviceId", "")] = n;
  CHECK(by_id["gw1"].value("connected", false));
  CHECK(by_id["gw2"].value("parentId", "") == "gw1");
  // The hub saw the leaf device's telemetry (its last-seen time is kept every report interval, 1 s).
  CHECK(wait_until([&] {
    for (auto& n : parse_or_null(hub.ctl({"status", "--json"})))
      if (n.value("deviceId", "") == "sensor-1")
        return n.value("lastSeenMs", std::int64_t{0}) > 0;
    return false;
  }, 10s, 200ms));

  CHECK(gw2.stop().value_or(-1) == 0);
  CHECK(gw1.stop().value_or(-1) == 0);
  CHECK(hub.node.stop().value_or(-1) == 0);
}

TEST_CASE("children that cannot prove who they are, or are not registered here, are refused", "[tree]") {
  fleet_fixture fleet{"gw1", "stranger"};
  auto& [paths, certs, hub] = fleet;
  fleet.gateway("gw1", "hub");

  SECTION("a certificate from another CA") {
    // A second fleet's CA issues "gw1"; the child trusts both CAs (so it can
    // check the hub), but the hub trusts only its own.
    fleet_certs rogue{paths};
    rogue.issue("gw1");
    temp_dir mixed{"cnm"};
    write_text_file(mixed.file("gw1.crt"), read_text_file(rogue.dir() + "/gw1.crt"));
    write_text_file(mixed.file("gw1.key"), read_text_file(rogue.dir() + "/gw1.key"));
    write_text_file(mixed.file("ca.crt"), read_text_file(rogue.ca()) + read_text_file(certs.ca()));
    canopy_node gw{paths};
    gw.start("", {"--device-id", "gw1", "--certs", mixed.path(), "--parent", loopback(hub.link_port),
                  "--parent-id", "hub"});
    REQUIRE(gw.wait_ready());
    REQUIRE(wait_until([&] { return link_of(gw, "parent", "hub").value("last_error", "") != ""; }, 30s, 100ms));
    CHECK_FALSE(link_up(gw, "parent", "hub"));
    CHECK(link_of(hub.node, "child", "gw1").is_null());
    CHECK(gw.stop().value_or(-1) == 0);
  }
  SECTION("an id the hub's registry does not know") {
    canopy_node gw{paths};
    gw.start("", {"--device-id", "stranger", "--certs", certs.dir(), "--parent", loopback(hub.link_port),
                  "--parent-id", "hub"});
    REQUIRE(gw.wait_ready());
    REQUIRE(wait_until([&] {
      return link_of(gw, "parent", "hub").value("last_error", "").find("unknown device") != std::string::npos;
    }, 30s, 100ms));
    CHECK(hub.node.output().find("refused child 'stranger'") != std::string::npos);
    CHECK(gw.stop().value_or(-1) == 0);
  }
  SECTION("an expired certificate") {
    // canopyctl issues only valid certificates: an expired one comes from the library.
    auto ca = canopy::certs::read_files(certs.dir(), "ca");
    REQUIRE(ca);
    auto o = canopy::certs::for_id("gw1", std::chrono::hours{24});
    o.not_before = std::chrono::system_clock::now() - std::chrono::hours{48};
    o.not_after = std::chrono::system_clock::now() - std::chrono::hours{24};
    auto expired = canopy::certs::issue(*ca, o);
    REQUIRE(expired);
    temp_dir old{"cno"};
    REQUIRE(canopy::certs::write_files(old.path(), "gw1", *expired));
    write_text_file(old.file("ca.crt"), read_text_file(certs.ca()));
    canopy_node gw{paths};
    gw.start("", {"--device-id", "gw1", "--certs", old.path(), "--parent", loopback(hub.link_port),
                  "--parent-id", "hub"});
    // It runs (offline), says why, and the hub never admits it.
    REQUIRE(gw.wait_ready());
    REQUIRE(wait_until([&] {
      return link_of(gw, "parent", "hub").value("last_error", "").find("expired") != std::string::npos;
    }, 30s, 100ms));
    CHECK(gw.output().find("certificate has expired") != std::string::npos);
    CHECK_FALSE(link_up(gw, "parent", "hub"));
    CHECK(link_of(hub.node, "child", "gw1").is_null());
    CHECK(gw.stop().value_or(-1) == 0);
  }
  CHECK(hub.node.stop().value_or(-1) == 0);
}

TEST_CASE("a child sending as a device outside its subtree is refused", "[tree]") {
  fleet_fixture fleet{"gw1", "gw2"};
  auto& [paths, certs, hub] = fleet;
  fleet.gateway("gw1", "hub");
  fleet.gateway("gw2", "hub");
  fleet.device("sensor-a", "gw1");
  fleet.device("sensor-b", "gw2");
  canopy_node gw1{paths};
  start_gateway(gw1, "gw1", certs, hub.link_port, "hub");
  REQUIRE(wait_until([&] { return link_up(gw1, "parent", "hub"); }, 30s, 100ms));

  // As its own device: accepted. As the sibling's device, or as the sibling: refused.
  REQUIRE(send_readings(gw1, "sensor-a", 1, 10) == 10);
  REQUIRE(send_readings(gw1, "sensor-b", 100, 10) == 10);
  REQUIRE(send_readings(gw1, "gw2", 200, 10) == 10);
  REQUIRE(wait_until([&] { return hub.telemetry("sensor-a").size() >= 10; }, 30s, 200ms));
  REQUIRE(wait_until([&] { return metrics(hub.node).value("refused_messages", 0) >= 20; }, 30s, 200ms));
  CHECK(hub.telemetry("sensor-b").empty());
  CHECK(hub.telemetry("gw2").empty());
  CHECK(hub.node.output().find("child 'gw1' sent a message as 'sensor-b', which is outside its subtree") !=
        std::string::npos);
  CHECK(gw1.stop().value_or(-1) == 0);
  CHECK(hub.node.stop().value_or(-1) == 0);
}

TEST_CASE("a parent killed mid-stream: the child keeps the messages and delivers them in order", "[tree]") {
  fleet_fixture fleet{"gw1"};
  auto& [paths, certs, hub] = fleet;
  fleet.gateway("gw1", "hub");
  fleet.device("sensor-1", "gw1");
  canopy_node gw1{paths};
  start_gateway(gw1, "gw1", certs, hub.link_port, "hub");
  REQUIRE(wait_until([&] { return link_up(gw1, "parent", "hub"); }, 30s, 100ms));

  constexpr long total = 8000;
  child_process sender{{paths.canopyctl, "--socket", gw1.socket(), "send", "--device", "sensor-1", "--content-type",
                        "application/json", "--content-encoding", "utf-8", "--stdin", "--window", "64"},
                       {},
                       readings_file(gw1, 1, total)};
  // Once the hub has some of them, pull its plug.
  REQUIRE(wait_until([&] { return metrics(hub.node).value("received", 0) >= 1500; }, 60s, 50ms));
  hub.node.process().send_signal(SIGKILL);
  REQUIRE(hub.node.process().wait_for(10s).has_value());
  // The gateway keeps accepting while its parent is away.
  REQUIRE(sender.wait_for(120s).value_or(-1) == 0);
  REQUIRE(wait_until([&] { return !link_up(gw1, "parent", "hub"); }, 30s, 100ms));

  hub.node.start("", {"--role", "hub", "--device-id", "hub", "--certs", certs.dir(), "--link-listen",
                      loopback(hub.link_port), "--api-listen", loopback(hub.api_port)});
  REQUIRE(hub.node.wait_ready());
  // The registry survived the restart.
  auto list = hub.ctl({"device", "list", "--json"});
  REQUIRE(list.exit_code == 0);
  CHECK(list.output.find("sensor-1") != std::string::npos);
  REQUIRE(wait_until([&] { return link_up(gw1, "parent", "hub"); }, 60s, 100ms));
  nlohmann::json at_hub;
  const bool complete = wait_until([&] {
    at_hub = hub.telemetry("sensor-1");
    return complete_in_order(numbers(at_hub), 1, total);
  }, 120s, 500ms);
  INFO(first_disorder(numbers(at_hub), 1));
  REQUIRE(complete);
  auto link = link_of(gw1, "parent", "hub");
  CHECK(link.value("disconnects", 0) >= 1);
  CHECK(link.value("offline_ms_total", 0) > 0);
  CHECK(gw1.stop().value_or(-1) == 0);
  CHECK(hub.node.stop().value_or(-1) == 0);
}

namespace {

/// A deployment manifest running the temperature filter as module `module`.
nlohmann::json filter_manifest(const std::string& module, double threshold) {
  return {{"modulesContent",
           {{"$edgeAgent",
             {{"properties.desired",
               {{"schemaVersion", "1.1"},
                {"modules",
                 {{module,
                   {{"version", "1.0"},
                    {"type", "actor"},
                    {"status", "running"},
                    {"restartPolicy", "always"},
                    {"settings", {{"library", "builtin:temperature-filter"}}}}}}}}}}},
            {"$edgeHub",
             {{"properties.desired",
               {{"schemaVersion", "1.1"},
                {"routes", {{"up", "FROM /messages/modules/" + module + "/outputs/* INTO $upstream"}}}}}}},
            {module, {{"properties.desired", {{"TemperatureThreshold", threshold}}}}}}}};
}


/// The node's entry in the hub's `status --json`.
nlohmann::json fleet_entry(const hub_node& hub, const std::string& id) {
  auto fleet = parse_or_null(hub.ctl({"status", "--json"}));
  if (fleet.is_array())
    for (auto& n : fleet)
      if (n.value("deviceId", "") == id)
        return n;
  return {};
}

/// The status of `module` on `id` as the hub knows it ("" if not reported).
std::string module_status_at_hub(const hub_node& hub, const std::string& id, const std::string& module) {
  auto n = fleet_entry(hub, id);
  if (n.is_null())
    return {};
  for (auto& m : n.value("modules", nlohmann::json::array()))
    if (m.value("name", "") == module)
      return m.value("status", "");
  return {};
}

}  // namespace

TEST_CASE("deployments, twins and methods travel three hops down and their results come back up", "[tree]") {
  fleet_fixture fleet{"gw1", "gw2", "gw3"};
  auto& [paths, certs, hub] = fleet;
  fleet.gateway("gw1", "hub", {"site=plant-1"});
  fleet.gateway("gw2", "gw1", {"site=plant-1"});
  fleet.gateway("gw3", "gw2", {"site=plant-1", "line=3"});
  // Two deployments match gw3; the higher priority wins.
  auto plant = hub.node.write_manifest("plant.json", filter_manifest("filter", 25));
  auto line3 = hub.node.write_manifest("line3.json", filter_manifest("linefilter", 30));
  auto plant2 = hub.node.write_manifest("plant2.json", filter_manifest("p2filter", 35));
  hub.must({"deployment", "create", "plant", "--manifest", plant, "--target-condition", "tags.site='plant-1'",
            "--priority", "10"});
  hub.must({"deployment", "create", "line3", "--manifest", line3, "--target-condition",
            "tags.site='plant-1' AND tags.line=3", "--priority", "20"});
  hub.must({"deployment", "create", "plant2", "--manifest", plant2, "--target-condition", "tags.site='plant-2'",
            "--priority", "10"});

  canopy_node gw1{paths}, gw2{paths}, gw3{paths};
  const int gw1_port = free_port(), gw2_port = free_port();
  start_gateway(gw1, "gw1", certs, hub.link_port, "hub", gw1_port);
  start_gateway(gw2, "gw2", certs, gw1_port, "gw1", gw2_port);
  start_gateway(gw3, "gw3", certs, gw2_port, "gw2");

  // The deployments reach every level and the module statuses come back.
  REQUIRE(gw1.wait_module("filter", [](const module_view& m) { return m.status == "running"; }, 60s));
  REQUIRE(gw3.wait_module("linefilter", [](const module_view& m) { return m.status == "running"; }, 60s));
  REQUIRE(wait_until([&] { return module_status_at_hub(hub, "gw3", "linefilter") == "running"; }, 60s, 250ms));
  REQUIRE(wait_until([&] {
    auto d = parse_or_null(hub.ctl({"deployment", "show", "line3", "--json"}));
    auto ok = d.value("succeeded", nlohmann::json::array());
    return std::find(ok.begin(), ok.end(), "gw3") != ok.end();
  }, 60s, 250ms));
  // gw3's link as gw2 reports it (gw2 reports its children's links every second).
  CHECK(wait_until([&] { return fleet_entry(hub, "gw3").value("connected", false); }, 30s, 250ms));
  auto gw3_entry = fleet_entry(hub, "gw3");
  CHECK(gw3_entry.value("deployment", "") == "line3");
  CHECK(gw3_entry.value("deploymentStatus", "") == "succeeded");
  CHECK(module_status_at_hub(hub, "gw2", "filter") == "running");

  // A twin patch goes down three links, the module reports back up.
  hub.must({"twin", "patch", "gw3", "--module", "linefilter", "--desired", R"({"TemperatureThreshold": 42})"});
  REQUIRE(wait_until([&] {
    auto t = parse_or_null(hub.ctl({"twin", "show", "gw3", "--module", "linefilter"}));
    if (t.is_null())
      return false;
    auto reported = t["properties"]["reported"];
    return reported.is_object() && reported.value("TemperatureThreshold", 0.0) == 42.0;
  }, 60s, 250ms));

  // A direct method, hop by hop, and its answer.
  auto m = hub.ctl({"invoke", "--device", "gw3", "--module", "linefilter", "--method", "getStats"});
  INFO(m.output);
  CHECK(m.exit_code == 0);
  auto missing = hub.ctl({"invoke", "--device", "gw3", "--module", "nosuch", "--method", "getStats"});
  CHECK(missing.exit_code != 0);

  // A tag change moves gw3 to the deployment that now matches.
  hub.must({"device", "tags", "gw3", "--tag", "site=plant-2"});
  REQUIRE(gw3.wait_module("p2filter", [](const module_view& m) { return m.status == "running"; }, 60s));
  REQUIRE(wait_until([&] { return fleet_entry(hub, "gw3").value("deployment", "") == "plant2"; }, 30s, 250ms));
  REQUIRE(wait_until([&] { return module_status_at_hub(hub, "gw3", "p2filter") == "running"; }, 60s, 250ms));
  // line3 no longer counts gw3; plant2 does.
  auto line3_now = parse_or_null(hub.ctl({"deployment", "show", "line3", "--json"}));
  CHECK(line3_now.value("applied", nlohmann::json::array()).empty());
  CHECK(line3_now.value("succeeded", nlohmann::json::array()).empty());
  REQUIRE(wait_until([&] {
    auto d = parse_or_null(hub.ctl({"deployment", "show", "plant2", "--json"}));
    auto ok = d.value("succeeded", nlohmann::json::array());
    return std::find(ok.begin(), ok.end(), "gw3") != ok.end();
  }, 60s, 250ms));

  CHECK(gw3.stop().value_or(-1) == 0);
  CHECK(gw2.stop().value_or(-1) == 0);
  CHECK(gw1.stop().value_or(-1) == 0);
  // A hub restart keeps the registry, twins and deployments.
  CHECK(hub.node.stop().value_or(-1) == 0);
  hub.start();
  auto deps = parse_or_null(hub.ctl({"deployment", "list", "--json"}));
  CHECK(deps.dump().find("line3") != std::string::npos);
  auto twin = parse_or_null(hub.ctl({"twin", "show", "gw3", "--module", "linefilter"}));
  CHECK(twin["properties"]["desired"].value("TemperatureThreshold", 0.0) == 42.0);
  CHECK(fleet_entry(hub, "gw3").value("parentId", "") == "gw2");
  CHECK(hub.node.stop().value_or(-1) == 0);
}

TEST_CASE("with the hub away, gateways keep admitting their children from the cached registry and report later",
          "[tree]") {
  fleet_fixture fleet{"gw1", "gw2"};
  auto& [paths, certs, hub] = fleet;
  fleet.gateway("gw1", "hub", {"site=plant-1"});
  fleet.gateway("gw2", "gw1", {"site=plant-1"});
  auto plant = hub.node.write_manifest("plant.json", filter_manifest("filter", 25));
  hub.must({"deployment", "create", "plant", "--manifest", plant, "--target-condition", "tags.site='plant-1'"});
  canopy_node gw1{paths}, gw2{paths};
  const int gw1_port = free_port();
  start_gateway(gw1, "gw1", certs, hub.link_port, "hub", gw1_port);
  start_gateway(gw2, "gw2", certs, gw1_port, "gw1");
  REQUIRE(wait_until([&] { return module_status_at_hub(hub, "gw2", "filter") == "running"; }, 60s, 250ms));

  // The hub goes away; gw1 restarts with nothing but its cache, and gw2 is
  // admitted again.
  CHECK(hub.node.stop().value_or(-1) == 0);
  CHECK(gw1.stop().value_or(-1) == 0);
  start_gateway(gw1, "gw1", certs, hub.link_port, "hub", gw1_port);
  REQUIRE(wait_until([&] { return link_up(gw2, "parent", "gw1") && link_up(gw1, "child", "gw2"); }, 60s, 100ms));
  CHECK_FALSE(link_up(gw1, "parent", "hub"));

  // What changes meanwhile (an operator restarts gw2's module) reaches the
  // hub once it is back.
  auto restarts_at_hub = [&] {
    auto n = fleet_entry(hub, "gw2");
    for (auto& m : n.value("modules", nlohmann::json::array()))
      if (m.value("name", "") == "filter")
        return m.value("restartCount", -1);
    return -1;
  };
  REQUIRE(gw2.ctl({"restart", "filter"}).exit_code == 0);
  REQUIRE(gw2.wait_module("filter", [](const module_view& m) { return m.restart_count >= 1; }));
  hub.start();
  REQUIRE(wait_until([&] { return link_up(gw1, "parent", "hub"); }, 60s, 100ms));
  REQUIRE(wait_until([&] { return restarts_at_hub() >= 1; }, 60s, 250ms));
  CHECK(gw2.stop().value_or(-1) == 0);
  CHECK(gw1.stop().value_or(-1) == 0);
  CHECK(hub.node.stop().value_or(-1) == 0);
}
