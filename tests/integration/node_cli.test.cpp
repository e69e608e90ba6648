// Integration: a real `canopy` node running the example modules (sensor ->
// filter -> $upstream, plus the crasher), driven with the real `canopyctl` as
// a user would. Each test case starts its own node in its own temp dir.
//
// Nothing here asserts on speed: every wait polls a condition up to a bound.
#include "integration/process.hpp"

#include <canopy/module.hpp>

#include <catch2/catch.hpp>

#include <algorithm>
#include <filesystem>
#include <regex>
#include <set>
#include <string>

using namespace canopy::test;
using namespace std::chrono_literals;
using nlohmann::json;

namespace {

json& modules_of(json& manifest) {
  return manifest["modulesContent"]["$edgeAgent"]["properties.desired"]["modules"];
}

json& routes_of(json& manifest) {
  return manifest["modulesContent"]["$edgeHub"]["properties.desired"]["routes"];
}

bool contains(const std::string& text, std::string_view part) {
  return text.find(part) != std::string::npos;
}

/// The flow fixture (sensor every 50 ms, filter threshold 0: every reading
/// reaches $upstream), started and ready with all three modules running.
void start_flow(canopy_node& node, const json& manifest) {
  auto path = node.write_manifest("flow.json", manifest);
  node.start(path);
  REQUIRE(node.wait_ready());
  for (const char* name : {"sensor", "filter", "crasher"}) {
    INFO("module " << name);
    REQUIRE(node.wait_module(name, [](const module_view& m) { return m.status == "running"; }));
  }
}

/// The sensor's "sequenceNumber" property of each $upstream message in
/// `canopyctl monitor` output (one line per message: time, source/output,
/// properties={...} body=...). The sensor numbers its readings from 1 per
/// instance, so while it is not restarted a larger number is a newer reading.
std::vector<std::int64_t> sequence_numbers(const std::string& output) {
  static const std::regex seq_re{R"re("sequenceNumber":"(\d+)")re"};
  std::vector<std::int64_t> seqs;
  for (std::sregex_iterator i{output.begin(), output.end(), seq_re}, end; i != end; ++i)
    seqs.push_back(std::stoll((*i)[1].str()));
  return seqs;
}

/// `canopyctl monitor --count N --timeout 20`: the sequence numbers of N new
/// $upstream messages, or fails the test.
std::vector<std::int64_t> monitor_records(const canopy_node& node, int count) {
  auto r = node.ctl({"monitor", "--count", std::to_string(count), "--timeout", "20"});
  INFO("canopyctl monitor: exit " << r.exit_code << "\n" << r.output);
  REQUIRE(r.exit_code == 0);
  // Filtered readings, from the filter, with the sensor's JSON body.
  const auto n = static_cast<std::size_t>(count);
  CHECK(count_occurrences(r.output, " filter/output1 ") == n);
  CHECK(count_occurrences(r.output, R"("machine":{"temperature":)") == n);
  auto seqs = sequence_numbers(r.output);
  REQUIRE(seqs.size() == n);
  return seqs;
}

/// Waits until `canopyctl logs MODULE` shows `text`.
bool logs_show(const canopy_node& node, const std::string& module, std::string_view text) {
  return wait_until([&] { return contains(node.ctl({"logs", module}).output, text); }, 10s, 50ms);
}

/// `canopyctl twin MODULE`, parsed ({"desired": {...}, "reported": {...}}); an
/// empty object if the command failed or printed something else.
json twin_of(const canopy_node& node, const std::string& module) {
  auto r = node.ctl({"twin", module});
  auto doc = json::parse(r.output, nullptr, false);
  if (r.exit_code != 0 || doc.is_discarded() || !doc.is_object())
    return json::object();
  return doc;
}

/// Waits until `canopyctl monitor` delivers a reading newer than sequence
/// number `after_seq`: messages are still flowing.
void require_flow_after(const canopy_node& node, std::int64_t after_seq) {
  bool flowing = wait_until(
    [&] {
      auto seqs = monitor_records(node, 1);
      return seqs.back() > after_seq;
    },
    20s, 50ms);
  REQUIRE(flowing);
}

}  // namespace

TEST_CASE("canopyctl list shows the deployment's modules running", "[node_cli]") {
  canopy_node node{canopy_paths::from_env()};
  start_flow(node, manifest_fixture(node.paths(), "flow.json"));

  auto rows = node.list();
  REQUIRE(rows);
  std::set<std::string> names;
  for (auto& m : *rows) {
    names.insert(m.name);
    CHECK(m.status == "running");
    CHECK(m.last_start_ms > 0);
  }
  CHECK(names == std::set<std::string>{"sensor", "filter", "crasher"});

  auto table = node.ctl({"list"});
  INFO(table.output);
  CHECK(table.exit_code == 0);
  for (const char* name : {"sensor", "filter", "crasher", "running"})
    CHECK(contains(table.output, name));
}

TEST_CASE("filtered readings flow from the sensor through the filter to $upstream", "[node_cli]") {
  canopy_node node{canopy_paths::from_env()};
  start_flow(node, manifest_fixture(node.paths(), "flow.json"));
  auto seqs = monitor_records(node, 3);
  CHECK(std::is_sorted(seqs.begin(), seqs.end()));
}

TEST_CASE("a module crashing leaves the others running with their messages flowing", "[node_cli]") {
  canopy_node node{canopy_paths::from_env()};
  start_flow(node, manifest_fixture(node.paths(), "flow.json"));
  auto sensor = node.module("sensor");
  auto filter = node.module("filter");
  auto crasher = node.module("crasher");
  REQUIRE((sensor && filter && crasher));
  auto before = monitor_records(node, 1).back();

  auto r = node.ctl({"invoke", "crasher", "crash", "{}"});
  INFO("invoke crash: exit " << r.exit_code << "\n" << r.output);
  CHECK(r.exit_code != 0);
  CHECK(contains(r.output, "500"));

  REQUIRE(node.wait_module("crasher", [&](const module_view& m) {
    return m.status == "running" && m.restart_count > crasher->restart_count;
  }));
  auto crashed = node.module("crasher");
  REQUIRE(crashed);
  CHECK(contains(crashed->last_exit_reason, "crash"));

  // The others were not touched, and their messages keep coming.
  require_flow_after(node, before);
  auto sensor_after = node.module("sensor");
  auto filter_after = node.module("filter");
  REQUIRE((sensor_after && filter_after));
  CHECK(sensor_after->status == "running");
  CHECK(filter_after->status == "running");
  CHECK(sensor_after->restart_count == sensor->restart_count);
  CHECK(filter_after->restart_count == filter->restart_count);
  CHECK(sensor_after->last_start_ms == sensor->last_start_ms);
  CHECK(filter_after->last_start_ms == filter->last_start_ms);

  // Its log shows the second start in this node process.
  auto logs = node.ctl({"logs", "crasher"});
  INFO(logs.output);
  CHECK(logs.exit_code == 0);
  CHECK(contains(logs.output, "start #2 of 'crasher'"));
}

TEST_CASE("a module past its restart budget is failed until `canopyctl restart`", "[node_cli]") {
  canopy_node node{canopy_paths::from_env()};
  start_flow(node, manifest_fixture(node.paths(), "flow.json"));
  auto before = monitor_records(node, 1).back();

  // maxRestarts 2 within 60 s: the third crash spends the budget.
  bool failed = false;
  for (int attempt = 0; attempt < 6 && !failed; ++attempt) {
    REQUIRE(node.wait_module("crasher", [](const module_view& m) {
      return m.status == "running" || m.status == "failed";
    }));
    auto m = node.module("crasher");
    REQUIRE(m);
    if (m->status == "failed") {
      failed = true;
      break;
    }
    auto r = node.ctl({"invoke", "crasher", "crash", "{}"});
    INFO("invoke crash #" << attempt + 1 << ": exit " << r.exit_code << "\n" << r.output);
    CHECK(r.exit_code != 0);
    // The crash is seen: a restart, or the end of the budget.
    REQUIRE(node.wait_module("crasher", [&](const module_view& now) {
      return now.status == "failed" || now.restart_count > m->restart_count;
    }));
  }
  REQUIRE(node.wait_module("crasher", [](const module_view& m) { return m.status == "failed"; }));
  auto crasher = node.module("crasher");
  REQUIRE(crasher);
  CHECK(contains(crasher->last_exit_reason, "crash_on_demand: direct method 'crash'"));
  REQUIRE(wait_until([&] { return contains(node.output(), "module 'crasher' FAILED"); }, 10s));

  // A failed module takes no calls, and the rest of the node carries on.
  auto r = node.ctl({"invoke", "crasher", "crash", "{}"});
  INFO(r.output);
  CHECK(r.exit_code != 0);
  CHECK(contains(r.output, "503"));
  require_flow_after(node, before);
  CHECK(node.module("sensor")->status == "running");
  CHECK(node.module("filter")->status == "running");

  auto restart = node.ctl({"restart", "crasher"});
  INFO(restart.output);
  REQUIRE(restart.exit_code == 0);
  REQUIRE(node.wait_module("crasher", [](const module_view& m) { return m.status == "running"; }));
  auto hello = node.ctl({"invoke", "crasher", "hang", R"({"seconds": 0})"});
  INFO(hello.output);
  CHECK(hello.exit_code == 0);
  CHECK(contains(hello.output, "200"));
}

TEST_CASE("canopyctl twin, invoke and logs", "[node_cli]") {
  canopy_node node{canopy_paths::from_env()};
  start_flow(node, manifest_fixture(node.paths(), "flow.json"));

  SECTION("twin shows the desired threshold and the reported one") {
    // The filter reports its threshold once the desired properties reach it.
    std::string out;
    bool reported = wait_until(
      [&] {
        auto t = twin_of(node, "filter");
        out = t.dump();
        return t.contains("reported") && t["reported"].is_object() &&
               t["reported"].contains("TemperatureThreshold");
      },
      20s, 50ms);
    INFO(out);
    REQUIRE(reported);
    auto t = twin_of(node, "filter");
    CHECK(t["desired"]["TemperatureThreshold"] == 0);
    CHECK(t["reported"]["TemperatureThreshold"] == 0);
  }

  SECTION("invoke calls a direct method and prints its answer") {
    auto r = node.ctl({"invoke", "filter", "getStats", "{}"});
    INFO(r.output);
    CHECK(r.exit_code == 0);
    CHECK(contains(r.output, "200"));
    CHECK(contains(r.output, "forwarded"));
  }

  SECTION("invoke of an unknown method fails with 501") {
    auto r = node.ctl({"invoke", "filter", "noSuchMethod", "{}"});
    INFO(r.output);
    CHECK(r.exit_code != 0);
    CHECK(contains(r.output, "501"));
  }

  SECTION("invoke of an unknown module fails, naming it") {
    auto r = node.ctl({"invoke", "ghost", "getStats", "{}"});
    INFO(r.output);
    CHECK(r.exit_code != 0);
    CHECK(contains(r.output, "ghost"));
  }

  SECTION("twin, restart and logs of an unknown module fail, naming it") {
    for (const char* command : {"twin", "restart", "logs"}) {
      auto r = node.ctl({command, "ghost"});
      INFO("canopyctl " << command << " ghost: exit " << r.exit_code << "\n" << r.output);
      CHECK(r.exit_code == 1);
      CHECK(contains(r.output, "ghost"));
    }
  }

  SECTION("invoke with a payload that is not JSON is a usage error") {
    auto r = node.ctl({"invoke", "filter", "getStats", "not json"});
    INFO(r.output);
    CHECK(r.exit_code == 2);
  }

  SECTION("logs --tail prints the module's last lines") {
    auto r = node.ctl({"logs", "filter", "--tail", "5"});
    INFO(r.output);
    CHECK(r.exit_code == 0);
    std::size_t lines = count_occurrences(r.output, "\n");
    CHECK(lines >= 1);
    CHECK(lines <= 5);
    CHECK(contains(r.output, "filter"));
  }
}

TEST_CASE("a bad deployment is refused whole and the running one is untouched", "[node_cli]") {
  canopy_node node{canopy_paths::from_env()};
  auto good = manifest_fixture(node.paths(), "flow.json");
  start_flow(node, good);
  auto bad = good;
  std::vector<std::string> expected_in_error;

  SECTION("a route to a module the deployment does not have") {
    routes_of(bad)["toGhost"] =
      "FROM /messages/modules/sensor/outputs/* "
      R"(INTO BrokeredEndpoint("/modules/ghost/inputs/in"))";
    expected_in_error = {"$.modulesContent.$edgeHub['properties.desired'].routes.toGhost", "ghost"};
  }
  SECTION("a restartPolicy that does not exist") {
    modules_of(bad)["filter"]["restartPolicy"] = "sometimes";
    expected_in_error = {
      "$.modulesContent.$edgeAgent['properties.desired'].modules.filter.restartPolicy",
      "sometimes"};
  }
  SECTION("a module library that is not there") {
    auto missing = node.paths().examples + "/libno_such_module.so";
    modules_of(bad)["crasher"]["settings"]["library"] = missing;
    expected_in_error = {
      "$.modulesContent.$edgeAgent['properties.desired'].modules.crasher.settings.library",
      "libno_such_module.so"};
  }

  auto before = node.list();
  REQUIRE(before);
  auto last_seq = monitor_records(node, 1).back();

  auto r = node.ctl({"deploy", node.write_manifest("bad.json", bad)});
  INFO("canopyctl deploy: exit " << r.exit_code << "\n" << r.output);
  CHECK(r.exit_code == 1);
  for (auto& part : expected_in_error)
    CHECK(contains(r.output, part));

  // Nothing changed: same modules, not restarted, messages still flowing.
  require_flow_after(node, last_seq);
  auto after = node.list();
  REQUIRE(after);
  REQUIRE(after->size() == before->size());
  for (std::size_t i = 0; i < before->size(); ++i) {
    INFO("module " << (*before)[i].name);
    CHECK((*after)[i].name == (*before)[i].name);
    CHECK((*after)[i].status == "running");
    CHECK((*after)[i].restart_count == (*before)[i].restart_count);
    CHECK((*after)[i].last_start_ms == (*before)[i].last_start_ms);
  }
}

TEST_CASE("a deployment restarts only the modules it changes, and adds and removes modules",
          "[node_cli]") {
  canopy_node node{canopy_paths::from_env()};
  auto manifest = manifest_fixture(node.paths(), "flow.json");
  start_flow(node, manifest);
  auto sensor = node.module("sensor");
  auto filter = node.module("filter");
  auto crasher = node.module("crasher");
  REQUIRE((sensor && filter && crasher));
  auto last_seq = monitor_records(node, 1).back();

  auto unchanged = [&] {
    auto s = node.module("sensor");
    auto f = node.module("filter");
    REQUIRE((s && f));
    CHECK(s->status == "running");
    CHECK(f->status == "running");
    CHECK(s->last_start_ms == sensor->last_start_ms);
    CHECK(f->last_start_ms == filter->last_start_ms);
    CHECK(s->restart_count == sensor->restart_count);
    CHECK(f->restart_count == filter->restart_count);
  };

  // 1. The same deployment again: nothing restarts.
  auto r = node.ctl({"deploy", node.write_manifest("v1.json", manifest)});
  INFO("deploy v1 again: " << r.output);
  REQUIRE(r.exit_code == 0);
  auto same = node.module("crasher");
  REQUIRE(same);
  CHECK(same->last_start_ms == crasher->last_start_ms);
  CHECK(same->restart_count == crasher->restart_count);
  unchanged();

  // 2. Only the crasher's settings change: only the crasher restarts.
  modules_of(manifest)["crasher"]["settings"]["note"] = "second version";
  r = node.ctl({"deploy", node.write_manifest("v2.json", manifest)});
  INFO("deploy v2: " << r.output);
  REQUIRE(r.exit_code == 0);
  REQUIRE(node.wait_module("crasher", [&](const module_view& m) {
    return m.status == "running" && m.last_start_ms != crasher->last_start_ms;
  }));
  REQUIRE(logs_show(node, "crasher", "start #2 of 'crasher'"));
  last_seq = monitor_records(node, 1).back();
  require_flow_after(node, last_seq);
  unchanged();

  // 3. Without the crasher: it is gone, the rest runs on.
  auto without = manifest;
  modules_of(without).erase("crasher");
  r = node.ctl({"deploy", node.write_manifest("v3.json", without)});
  INFO("deploy v3: " << r.output);
  REQUIRE(r.exit_code == 0);
  REQUIRE(wait_until(
    [&] {
      auto rows = node.list();
      return rows && rows->size() == 2 &&
             std::none_of(rows->begin(), rows->end(), [](auto& m) { return m.name == "crasher"; });
    },
    20s, 50ms));
  auto gone = node.ctl({"invoke", "crasher", "hang", R"({"seconds": 0})"});
  CHECK(gone.exit_code != 0);
  require_flow_after(node, last_seq);
  unchanged();

  // 4. With the crasher again: it runs.
  r = node.ctl({"deploy", node.write_manifest("v4.json", manifest)});
  INFO("deploy v4: " << r.output);
  REQUIRE(r.exit_code == 0);
  REQUIRE(node.wait_module("crasher", [](const module_view& m) { return m.status == "running"; }));
  auto back = node.ctl({"invoke", "crasher", "hang", R"({"seconds": 0})"});
  INFO(back.output);
  CHECK(back.exit_code == 0);
  unchanged();
}

TEST_CASE("a change of desired properties alone patches the module without a restart",
          "[node_cli]") {
  canopy_node node{canopy_paths::from_env()};
  auto manifest = manifest_fixture(node.paths(), "flow.json");
  start_flow(node, manifest);
  auto filter = node.module("filter");
  REQUIRE(filter);

  manifest["modulesContent"]["filter"]["properties.desired"]["TemperatureThreshold"] = 7.5;
  auto r = node.ctl({"deploy", node.write_manifest("v2.json", manifest)});
  INFO("deploy: " << r.output);
  REQUIRE(r.exit_code == 0);

  // The reported threshold follows the desired one.
  std::string out;
  bool followed = wait_until(
    [&] {
      auto t = twin_of(node, "filter");
      out = t.dump();
      return t.contains("reported") && t["reported"].is_object() &&
             t["reported"].value("TemperatureThreshold", 0.0) == 7.5;
    },
    20s, 50ms);
  INFO("twin filter: " << out);
  CHECK(followed);
  CHECK(twin_of(node, "filter")["desired"]["TemperatureThreshold"] == 7.5);
  CHECK(logs_show(node, "filter", "temperature threshold: 7.5"));

  auto after = node.module("filter");
  REQUIRE(after);
  CHECK(after->status == "running");
  CHECK(after->last_start_ms == filter->last_start_ms);
  CHECK(after->restart_count == filter->restart_count);

  // A restarted instance starts with the desired properties as they are now.
  REQUIRE(node.ctl({"restart", "filter"}).exit_code == 0);
  REQUIRE(node.wait_module("filter", [&](const module_view& m) {
    return m.status == "running" && m.last_start_ms != filter->last_start_ms;
  }));
  CHECK(count_occurrences(node.output(), "temperature threshold: 7.5") >= 2);
  CHECK(count_occurrences(node.output(), "temperature threshold: 0") == 1);
}

TEST_CASE("canopy check validates manifests", "[node_cli]") {
  auto paths = canopy_paths::from_env();
  temp_dir dir;
  auto good = manifest_fixture(paths, "flow.json");

  auto good_path = dir.file("good.json");
  write_text_file(good_path, good.dump(2));
  auto ok = run({paths.canopy, "check", good_path}, 20s);
  INFO(ok.output);
  CHECK(ok.exit_code == 0);
  CHECK(contains(ok.output, "ok"));

  auto bad = good;
  modules_of(bad)["filter"]["restartPolicy"] = "sometimes";
  routes_of(bad)["toGhost"] = R"(FROM /messages/modules/ghost/outputs/* INTO $upstream)";
  auto bad_path = dir.file("bad.json");
  write_text_file(bad_path, bad.dump(2));
  auto refused = run({paths.canopy, "check", bad_path}, 20s);
  INFO(refused.output);
  CHECK(refused.exit_code == 1);
  CHECK(contains(refused.output, bad_path));
  // Every problem, each with its JSON path.
  CHECK(contains(refused.output,
                 "$.modulesContent.$edgeAgent['properties.desired'].modules.filter.restartPolicy"));
  CHECK(contains(refused.output, "sometimes"));
  CHECK(contains(refused.output, "$.modulesContent.$edgeHub['properties.desired'].routes.toGhost"));

  auto broken_path = dir.file("broken.json");
  write_text_file(broken_path, R"({"modulesContent": {)");
  auto broken = run({paths.canopy, "check", broken_path}, 20s);
  INFO(broken.output);
  CHECK(broken.exit_code == 1);
  CHECK(contains(broken.output, "invalid JSON at byte"));
}

TEST_CASE("canopy run refuses a module library built for another module ABI", "[node_cli]") {
  canopy_node node{canopy_paths::from_env()};
  auto manifest =
    node.write_manifest("bad_abi.json", manifest_fixture(node.paths(), "bad_abi.json"));
  node.start(manifest);
  auto st = node.process().wait_for(20s);
  REQUIRE(st.has_value());
  auto out = node.output();
  INFO(out);
  CHECK(*st == 1);
  CHECK(contains(out, "libtest_plugin_bad_abi.so"));
  CHECK(contains(out, "module ABI 999"));
  CHECK(contains(out, "module ABI " + std::to_string(canopy::module_abi_version)));
  // It never served the control socket.
  CHECK_FALSE(std::filesystem::exists(node.socket()));
}

TEST_CASE("canopyctl against a socket nobody serves exits 3", "[node_cli]") {
  auto paths = canopy_paths::from_env();
  temp_dir dir;
  auto socket = dir.file("nobody.sock");
  using args_t = std::vector<std::string>;
  for (const args_t& args : {args_t{"list"}, args_t{"invoke", "filter", "getStats", "{}"}}) {
    std::vector<std::string> argv{paths.canopyctl, "--socket", socket};
    argv.insert(argv.end(), args.begin(), args.end());
    auto r = run(argv, 20s);
    INFO(r.output);
    CHECK(r.exit_code == 3);
    CHECK(contains(r.output, "cannot connect to the canopy node at " + socket));
  }
}

TEST_CASE("SIGTERM stops the node with exit code 0", "[node_cli]") {
  canopy_node node{canopy_paths::from_env()};
  start_flow(node, manifest_fixture(node.paths(), "flow.json"));
  REQUIRE(std::filesystem::exists(node.socket()));
  auto st = node.stop(20s);
  INFO(node.output());
  REQUIRE(st.has_value());
  CHECK(*st == 0);
  CHECK(contains(node.output(), "SIGTERM"));
  CHECK_FALSE(std::filesystem::exists(node.socket()));
}

TEST_CASE("the tutorial's first module builds out of tree and deploys behind the filter", "[node_cli]") {
  namespace fs = std::filesystem;
  canopy_node node{canopy_paths::from_env()};
  auto& paths = node.paths();
  // Build examples/modules/my_first_module as the tutorial does, in a scratch copy.
  auto src = fs::path{paths.source_root} / "examples" / "modules" / "my_first_module";
  auto mod = fs::path{node.dir().file("mod")};
  fs::create_directories(mod);
  fs::copy_file(src / "my_first_module.cpp", mod / "my_first_module.cpp");
  fs::copy_file(src / "build.sh", mod / "build.sh");
  auto built = run({"/bin/sh", (mod / "build.sh").string()}, 180s,
                   {{"CANOPY", paths.source_root},
                    {"CANOPY_BUILD", fs::path{paths.examples}.parent_path().string()}});
  INFO(built.output);
  REQUIRE(built.exit_code == 0);
  // The tutorial's manifest, with this build's libraries and a fast sensor.
  auto manifest = json::parse(
    read_text_file((fs::path{paths.source_root} / "examples/manifests/my-first-module.json").string()));
  auto& modules = manifest["modulesContent"]["$edgeAgent"]["properties.desired"]["modules"];
  for (auto& [name, m] : modules.items()) {
    auto lib = m["settings"]["library"].get<std::string>();
    m["settings"]["library"] = name == "myModule"
                                 ? (mod / "libmy_first_module.so").string()
                                 : (fs::path{paths.examples} / fs::path{lib}.filename()).string();
  }
  modules["sensor"]["settings"]["sendIntervalMs"] = 50;
  manifest["modulesContent"]["filter"]["properties.desired"]["TemperatureThreshold"] = 0;
  node.start(node.write_manifest("first.json", manifest));
  REQUIRE(node.wait_ready());
  REQUIRE(node.wait_module("myModule", [](const module_view& m) { return m.status == "running"; }));
  auto mon = node.ctl({"monitor", "--count", "2", "--timeout", "20"});
  INFO(mon.output);
  CHECK(mon.exit_code == 0);
  CHECK(mon.output.find("myModule/output1") != std::string::npos);
  CHECK(mon.output.find("fahrenheit") != std::string::npos);
  node.stop();
}

TEST_CASE("a module whose handler hangs is marked unhealthy and replaced by a fresh instance",
          "[node_cli]") {
  canopy_node node{canopy_paths::from_env()};
  auto manifest = manifest_fixture(node.paths(), "flow.json");
  modules_of(manifest)["crasher"]["restartPolicy"] = "on-unhealthy";
  modules_of(manifest)["crasher"]["healthCheck"] = {{"periodSecs", 1}, {"deadlineSecs", 1}};
  node.start(node.write_manifest("flow.json", manifest));
  REQUIRE(node.wait_ready());
  REQUIRE(node.wait_module("crasher", [](const module_view& m) { return m.status == "running"; }));
  // The handler blocks its worker for 4 s; the health check gives up after ~2 s.
  auto hang = node.ctl({"invoke", "crasher", "hang", R"({"seconds": 4})", "--timeout", "1"});
  CHECK(hang.exit_code != 0);
  CHECK(node.wait_module("crasher", [](const module_view& m) {
    return m.restart_count >= 1 && m.status == "running";
  }));
  CHECK(contains(node.output(), "module 'crasher' is unhealthy"));
  // The fresh instance answers while the stuck one still holds its thread.
  auto ping = node.ctl({"invoke", "crasher", "nope", "{}"});
  CHECK(contains(ping.output, "501"));
  node.stop();
}
