// Integration: durable routing through a real `canopy` process. A user's
// program (`canopyctl send --stdin`) streams numbered messages as a leaf device
// into a node that routes them through a module (the temperature filter) to
// $upstream; the node is SIGKILLed mid-stream, restarted, and every message
// whose acknowledgement the sender saw must arrive at $upstream.
#include "integration/fleet.hpp"
#include "integration/process.hpp"

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

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

/// A manifest with the filter (threshold 25) between leaf devices and $upstream.
nlohmann::json crash_manifest(const canopy_paths& paths) {
  auto m = manifest_fixture(paths, "flow.json");
  auto& agent = m["modulesContent"]["$edgeAgent"]["properties.desired"]["modules"];
  agent.erase("sensor");
  agent.erase("crasher");
  m["modulesContent"]["$edgeHub"]["properties.desired"]["routes"] = {
    {"deviceToFilter",
     "FROM /messages/* WHERE NOT IS_DEFINED($connectionModuleId) "
     "INTO BrokeredEndpoint(\"/modules/filter/inputs/input1\")"},
    {"filterToUpstream", "FROM /messages/modules/filter/outputs/output1 INTO $upstream"}};
  return m;
}

/// The numbers ("n") of the messages printed by `canopyctl monitor`, with repeats.
std::multiset<long> numbers_at_upstream(const canopy_node& node) {
  auto r = node.ctl({"monitor", "--backlog", "100000", "--timeout", "3"}, 60s);
  std::multiset<long> out;
  static const std::regex n_re{R"("n":(\d+))"};
  std::istringstream lines{r.output};
  std::string line;
  while (std::getline(lines, line)) {
    std::smatch m;
    if (std::regex_search(line, m, n_re))
      out.insert(std::stol(m[1].str()));
  }
  return out;
}


std::int64_t queued(const nlohmann::json& m) {
  std::int64_t n = 0;
  for (auto& q : m.value("queues", nlohmann::json::array()))
    n += q.value("length", std::int64_t{0});
  return n;
}

}  // namespace

TEST_CASE("kill -9 mid-stream loses no acknowledged message", "[durable]") {
  canopy_node node{canopy_paths::from_env()};
  auto manifest = node.write_manifest("crash.json", crash_manifest(node.paths()));
  node.start(manifest);
  REQUIRE(node.wait_ready());
  REQUIRE(node.wait_module("filter", [](const module_view& m) { return m.status == "running"; }));

  // 30,000 readings, all above the filter's threshold, one per line.
  constexpr long total = 30000;
  const std::string input = node.dir().file("readings.txt");
  {
    std::ofstream out{input};
    for (long i = 1; i <= total; ++i)
      out << R"({"machine":{"temperature":80.5},"n":)" << i << "}\n";
  }
  child_process sender{{node.paths().canopyctl, "--socket", node.socket(), "send", "--device",
                        "crash-dev", "--content-type", "application/json", "--content-encoding",
                        "utf-8", "--stdin", "--window", "64"},
                       {},
                       input};
  // Let a few thousand be acknowledged, then pull the plug.
  auto acked_lines = [&] {
    auto out = sender.output();
    return static_cast<long>(std::count(out.begin(), out.end(), '\n'));
  };
  REQUIRE(wait_until([&] { return acked_lines() >= 5000 || !sender.running(); }, 60s));
  REQUIRE(sender.running());  // still streaming: the kill lands mid-stream
  node.process().send_signal(SIGKILL);
  REQUIRE(node.process().wait_for(10s).has_value());
  REQUIRE(sender.wait_for(30s).has_value());

  // What the sender saw acknowledged: "<n> ok <targets>".
  std::set<long> acked;
  {
    std::istringstream lines{sender.output()};
    std::string line;
    static const std::regex ok_re{R"(^(\d+) ok (\d+)$)"};
    while (std::getline(lines, line)) {
      std::smatch m;
      if (std::regex_match(line, m, ok_re)) {
        CHECK(m[2].str() == "1");
        acked.insert(std::stol(m[1].str()));
      }
    }
  }
  INFO("acknowledged before the kill: " << acked.size());
  REQUIRE(acked.size() >= 5000);
  REQUIRE(acked.size() < static_cast<std::size_t>(total));
  // Acknowledgements are printed in order: 1..k without a gap.
  CHECK(*acked.rbegin() == static_cast<long>(acked.size()));

  // Restart on the same data dir, with no manifest: the last deployment runs
  // and delivery resumes from the checkpoints.
  node.start("");
  REQUIRE(node.wait_ready());
  REQUIRE(wait_until([&] {
    auto m = metrics(node);
    return !m.empty() && queued(m) == 0;
  }, 60s, 200ms));
  auto at_upstream = numbers_at_upstream(node);
  std::set<long> missing;
  for (long n : acked)
    if (at_upstream.count(n) == 0)
      missing.insert(n);
  INFO("missing (first): " << (missing.empty() ? 0 : *missing.begin()) << ", " << missing.size() << " in all");
  CHECK(missing.empty());
  // Duplicates are allowed (at least once) and counted by the node.
  std::set<long> unique(at_upstream.begin(), at_upstream.end());
  const auto dups = at_upstream.size() - unique.size();
  auto m = metrics(node);
  // Shown in the test log: how the run went.
  WARN("acknowledged before kill -9: " << acked.size() << " of " << total << "; at $upstream after restart: "
       << unique.size() << " distinct, " << dups << " duplicate(s); node counted " << m.value("redelivered", 0)
       << " re-delivery(ies)");
  CHECK(m.value("dropped_store_full", 1) == 0);
  CHECK(node.stop().value_or(-1) == 0);
}

TEST_CASE("a message store that cannot be opened stops the node with an error naming it", "[durable]") {
  canopy_node node{canopy_paths::from_env()};
  const std::string db = node.data_dir() + "/messages.db";
  const std::string garbage = write_garbage_file(db, "not a message store\n");
  auto manifest = node.write_manifest("crash.json", crash_manifest(node.paths()));
  node.start(manifest);
  auto st = node.process().wait_for(20s);
  REQUIRE(st.has_value());
  CHECK(*st != 0);
  auto out = node.output();
  INFO(out);
  CHECK(out.find(db) != std::string::npos);
  CHECK(read_text_file(db) == garbage);  // never replaced by a fresh store
}

TEST_CASE("a full message store refuses messages with a clear error, and metrics count them", "[durable]") {
  canopy_node node{canopy_paths::from_env()};
  auto m = crash_manifest(node.paths());
  // No module consumes: everything queues for the filter, which is stopped.
  m["modulesContent"]["$edgeAgent"]["properties.desired"]["modules"]["filter"]["status"] = "stopped";
  auto manifest = node.write_manifest("full.json", m);
  node.start(manifest, {"--store-limit-mb", "1"});
  REQUIRE(node.wait_ready());
  const std::string body(16 * 1024, 'x');
  std::string refusal;
  for (int i = 0; i < 200 && refusal.empty(); ++i) {
    auto r = node.ctl({"send", "--device", "d", "--body", body});
    if (r.exit_code != 0)
      refusal = r.output;
  }
  INFO(refusal);
  CHECK_THAT(refusal, Catch::Contains("store full"));
  // A batch (`send --stdin`: one sendBatch call): every line is answered, the
  // refused ones with the reason.
  const std::string lines = node.dir().file("big.txt");
  {
    std::ofstream out{lines};
    for (int i = 0; i < 8; ++i)
      out << body << "\n";
  }
  child_process batch{{node.paths().canopyctl, "--socket", node.socket(), "send", "--device", "d", "--stdin"},
                      {},
                      lines};
  REQUIRE(batch.wait_for(30s).has_value());
  const auto answered = batch.output();
  INFO(answered);
  for (int i = 1; i <= 8; ++i)
    CHECK_THAT(answered, Catch::Contains(std::to_string(i) + " error store full"));
  auto mj = metrics(node);
  CHECK(mj.value("dropped_store_full", 0) >= 1);
  CHECK(mj.value("store_limit_bytes", 0) == 1024 * 1024);
  CHECK(queued(mj) > 0);
  CHECK(node.stop().value_or(-1) == 0);
}
