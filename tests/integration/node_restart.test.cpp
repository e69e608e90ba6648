// Integration: a node's deployment survives a restart of the node process.
// Each test case starts its own `canopy` processes in its own temp dir and
// drives them with the real `canopyctl`.
#include "integration/process.hpp"

#include <catch2/catch.hpp>

#include <algorithm>
#include <filesystem>
#include <set>
#include <string>

using namespace canopy::test;
using namespace std::chrono_literals;

TEST_CASE("a corrupt store stops `canopy run` with an error naming the file", "[node_restart]") {
  canopy_node node{canopy_paths::from_env()};
  const std::string db = node.data_dir() + "/canopy.db";
  const std::string garbage = write_garbage_file(db, "this is not an SQLite database\n");
  auto manifest = node.write_manifest("flow.json", manifest_fixture(node.paths(), "flow.json"));

  for (bool with_manifest : {true, false}) {
    INFO("with --manifest: " << with_manifest);
    node.start(with_manifest ? manifest : std::string{});
    auto st = node.process().wait_for(20s);
    REQUIRE(st.has_value());
    CHECK(*st != 0);
    auto out = node.output();
    INFO(out);
    CHECK(out.find(db) != std::string::npos);
    CHECK(out.find("cannot start") != std::string::npos);
    // Never a silent fresh start over the user's file.
    CHECK(read_text_file(db) == garbage);
  }
}

namespace {

using nlohmann::json;

json& modules_of(json& manifest) {
  return manifest["modulesContent"]["$edgeAgent"]["properties.desired"]["modules"];
}

bool contains(const std::string& text, std::string_view part) {
  return text.find(part) != std::string::npos;
}

/// Waits until the node lists exactly `names`, each running.
bool wait_running(const canopy_node& node, const std::set<std::string>& names) {
  return wait_until(
    [&] {
      auto rows = node.list();
      if (!rows || rows->size() != names.size())
        return false;
      for (auto& m : *rows)
        if (names.count(m.name) == 0 || m.status != "running")
          return false;
      return true;
    },
    20s, 50ms);
}

/// SIGTERM, and the node exits 0.
void stop_node(canopy_node& node) {
  auto st = node.stop(20s);
  INFO(node.output());
  REQUIRE(st.has_value());
  REQUIRE(*st == 0);
}

}  // namespace

TEST_CASE("a node restarted without --manifest runs the last deployment", "[node_restart]") {
  canopy_node node{canopy_paths::from_env()};
  auto manifest = node.write_manifest("flow.json", manifest_fixture(node.paths(), "flow.json"));
  node.start(manifest);
  REQUIRE(node.wait_ready());
  REQUIRE(wait_running(node, {"sensor", "filter", "crasher"}));
  stop_node(node);

  node.start("");
  REQUIRE(node.wait_ready());
  REQUIRE(wait_running(node, {"sensor", "filter", "crasher"}));
  CHECK(contains(node.output(), "last applied deployment"));
  // It runs, not just lists: the modules answer and messages reach $upstream.
  auto stats = node.ctl({"invoke", "filter", "getStats", "{}"});
  INFO(stats.output);
  CHECK(stats.exit_code == 0);
  auto mon = node.ctl({"monitor", "--count", "2", "--timeout", "20"});
  INFO(mon.output);
  CHECK(mon.exit_code == 0);
  stop_node(node);
}

TEST_CASE("a node restarted without --manifest runs what `canopyctl deploy` applied last",
          "[node_restart]") {
  canopy_node node{canopy_paths::from_env()};
  auto flow = manifest_fixture(node.paths(), "flow.json");
  node.start(node.write_manifest("flow.json", flow));
  REQUIRE(node.wait_ready());
  REQUIRE(wait_running(node, {"sensor", "filter", "crasher"}));

  // A different deployment: no crasher, a second filter, another threshold.
  auto next = flow;
  modules_of(next).erase("crasher");
  modules_of(next)["filter2"] = modules_of(next)["filter"];
  next["modulesContent"]["filter"]["properties.desired"]["TemperatureThreshold"] = 3.5;
  auto r = node.ctl({"deploy", node.write_manifest("next.json", next)});
  INFO(r.output);
  REQUIRE(r.exit_code == 0);
  REQUIRE(wait_running(node, {"sensor", "filter", "filter2"}));
  stop_node(node);

  node.start("");
  REQUIRE(node.wait_ready());
  REQUIRE(wait_running(node, {"sensor", "filter", "filter2"}));
  auto stats = node.ctl({"invoke", "filter2", "getStats", "{}"});
  INFO(stats.output);
  CHECK(stats.exit_code == 0);
  auto gone = node.ctl({"invoke", "crasher", "hang", R"({"seconds": 0})"});
  CHECK(gone.exit_code != 0);
  // The filter runs with the deployed threshold (getStats answers
  // "status: 200" and then its JSON), and the twin shows it.
  std::string out;
  bool applied = wait_until(
    [&] {
      auto call = node.ctl({"invoke", "filter", "getStats", "{}"});
      out = call.output;
      auto body = out.substr(std::min(out.find('\n'), out.size()));
      auto doc = json::parse(body, nullptr, false);
      return call.exit_code == 0 && doc.is_object() &&
             doc.value("TemperatureThreshold", 0.0) == 3.5;
    },
    20s, 50ms);
  INFO("getStats: " << out);
  CHECK(applied);
  auto twin = json::parse(node.ctl({"twin", "filter"}).output, nullptr, false);
  INFO("twin filter: " << twin.dump());
  REQUIRE(twin.is_object());
  CHECK(twin["desired"]["TemperatureThreshold"] == 3.5);
  bool reported =
    twin["reported"].is_object() && twin["reported"].value("TemperatureThreshold", 0.0) == 3.5;
  CHECK(reported);
  stop_node(node);
}

TEST_CASE("a module that crash-loops on start backs off and fails while the others run",
          "[node_restart]") {
  canopy_node node{canopy_paths::from_env()};
  auto manifest = manifest_fixture(node.paths(), "flow.json");
  modules_of(manifest)["crasher"]["settings"]["crashOnStart"] = true;
  // Slow enough backoff that `backoff` can be seen between attempts.
  modules_of(manifest)["crasher"]["restart"]["backoffBaseMs"] = 500;
  node.start(node.write_manifest("loop.json", manifest));
  REQUIRE(node.wait_ready());

  std::set<std::string> seen;
  bool failed = wait_until(
    [&] {
      auto m = node.module("crasher");
      if (m)
        seen.insert(m->status);
      return m && m->status == "failed";
    },
    20s, 20ms);
  INFO(node.output());
  REQUIRE(failed);
  CHECK(seen.count("backoff") == 1);
  auto crasher = node.module("crasher");
  REQUIRE(crasher);
  CHECK(contains(crasher->last_exit_reason, "crashOnStart"));
  CHECK(crasher->restart_count >= 2);

  // The rest of the node runs, and messages flow.
  CHECK(node.module("sensor")->status == "running");
  CHECK(node.module("filter")->status == "running");
  auto mon = node.ctl({"monitor", "--count", "2", "--timeout", "20"});
  INFO(mon.output);
  CHECK(mon.exit_code == 0);
  stop_node(node);
}

TEST_CASE("a node killed with SIGKILL restarts with its last deployment", "[node_restart]") {
  canopy_node node{canopy_paths::from_env()};
  node.start(node.write_manifest("flow.json", manifest_fixture(node.paths(), "flow.json")));
  REQUIRE(node.wait_ready());
  REQUIRE(wait_running(node, {"sensor", "filter", "crasher"}));
  auto mon = node.ctl({"monitor", "--count", "2", "--timeout", "20"});
  REQUIRE(mon.exit_code == 0);

  // No orderly shutdown: the socket file and SQLite's WAL stay behind.
  node.process().kill();
  REQUIRE(std::filesystem::exists(node.socket()));

  node.start("");
  REQUIRE(node.wait_ready());
  REQUIRE(wait_running(node, {"sensor", "filter", "crasher"}));
  mon = node.ctl({"monitor", "--count", "2", "--timeout", "20"});
  INFO(mon.output);
  CHECK(mon.exit_code == 0);
  stop_node(node);
}

TEST_CASE("a second node on a served control socket refuses to start", "[node_restart]") {
  canopy_node node{canopy_paths::from_env()};
  auto manifest = node.write_manifest("flow.json", manifest_fixture(node.paths(), "flow.json"));
  node.start(manifest);
  REQUIRE(node.wait_ready());

  temp_dir other;
  auto r = run({node.paths().canopy, "run", "--manifest", manifest, "--data-dir",
                other.file("data"), "--socket", node.socket()},
               20s);
  INFO(r.output);
  CHECK(r.exit_code == 1);
  CHECK(contains(r.output, node.socket()));
  // The first node still serves.
  CHECK(wait_running(node, {"sensor", "filter", "crasher"}));
  stop_node(node);
}

TEST_CASE("a second node on the same data directory refuses to start", "[node_restart]") {
  canopy_node node{canopy_paths::from_env()};
  auto manifest = node.write_manifest("flow.json", manifest_fixture(node.paths(), "flow.json"));
  node.start(manifest);
  REQUIRE(node.wait_ready());

  temp_dir other;
  auto r = run({node.paths().canopy, "run", "--manifest", manifest, "--data-dir", node.data_dir(),
                "--socket", other.file("s.sock")},
               20s);
  INFO(r.output);
  CHECK(r.exit_code == 1);
  CHECK(contains(r.output, "is in use by another canopy process"));
  CHECK(contains(r.output, node.data_dir() + "/canopy.lock"));
  CHECK(wait_running(node, {"sensor", "filter", "crasher"}));
  stop_node(node);
}

TEST_CASE("a stop with a stuck module handler still ends, after --stop-timeout", "[node_restart]") {
  canopy_node node{canopy_paths::from_env()};
  auto manifest = node.write_manifest("flow.json", manifest_fixture(node.paths(), "flow.json"));
  node.start(manifest, {"--stop-timeout", "2"});
  REQUIRE(node.wait_ready());
  REQUIRE(wait_running(node, {"sensor", "filter", "crasher"}));
  // The handler blocks its worker for a minute; the invoke itself times out.
  child_process hang{{node.paths().canopyctl, "--socket", node.socket(), "invoke", "crasher", "hang",
                      R"({"seconds": 60})", "--timeout", "1"}};
  REQUIRE(hang.wait_for(20s));
  auto status = node.stop(30s);
  INFO(node.output());
  REQUIRE(status.has_value());  // it ended, well before the handler would return
  CHECK(contains(node.output(), "a module handler is stuck"));
}
