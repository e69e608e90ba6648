// Unit test of the Prometheus text renderer (exposition format 0.0.4).
#include "gateway/prometheus.hpp"

#include <catch2/catch.hpp>

#include <map>
#include <set>
#include <sstream>
#include <string>
#include <vector>

using namespace canopy;

namespace {

std::vector<std::string> lines_of(const std::string& text) {
  std::vector<std::string> out;
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line))
    out.push_back(line);
  return out;
}

bool has_line(const std::string& text, const std::string& line) {
  for (const auto& l : lines_of(text)) {
    if (l == line)
      return true;
  }
  return false;
}

metrics_snapshot known_snapshot() {
  metrics_snapshot s;
  s.device_id = "gw-1";
  s.messages.received = 42;
  s.messages.sent = 40;
  s.messages.dropped_no_route = 1;
  s.messages.dropped_ttl_expiry = 2;
  s.messages.dropped_store_full = 3;
  s.messages.redelivered = 4;
  s.messages.queues = {{"$upstream", 0, 5, 100, 105}, {"/modules/filter/inputs/in", 2, 0, 7, 7}};
  s.messages.store_bytes = 4096;
  s.messages.store_free_bytes = 1024;
  s.messages.store_limit_bytes = 0;
  s.messages.commits = 9;
  s.messages.commit_p50_us = 250;
  s.messages.commit_p99_us = 1500;
  s.messages.commit_max_us = 2000000;
  module_row sensor;
  sensor.name = "sensor";
  sensor.version = "1.0";
  sensor.status = "running";
  sensor.restart_count = 3;
  sensor.last_start_ms = 1700000000500;
  module_row odd;
  odd.name = "odd";
  odd.version = "2";
  odd.status = "dead";
  s.modules = {sensor, odd};
  link_metrics parent;
  parent.peer = "hub";
  parent.role = "parent";
  parent.up = true;
  parent.rtt_us = 1250;
  parent.connects = 2;
  parent.disconnects = 1;
  parent.offline_ms_total = 1500;
  parent.last_change_ms = 1700000001000;
  link_metrics child;
  child.peer = "gw-2";
  child.role = "child";
  s.links = {parent, child};
  s.connected_clients = 6;
  s.now_ms = 1700000002000;
  return s;
}

}  // namespace

TEST_CASE("render_prometheus renders a known snapshot with edgeHub names", "[prometheus]") {
  auto text = render_prometheus(known_snapshot());
  INFO(text);
  CHECK(has_line(
    text, "# HELP edgehub_messages_received_total Total number of messages received from clients"));
  CHECK(has_line(text, "# TYPE edgehub_messages_received_total counter"));
  CHECK(has_line(text, R"(edgehub_messages_received_total{edge_device="gw-1"} 42)"));
  CHECK(has_line(text, R"(edgehub_messages_sent_total{edge_device="gw-1"} 40)"));
  CHECK(
    has_line(text, R"(edgehub_messages_dropped_total{reason="no_route",edge_device="gw-1"} 1)"));
  CHECK(
    has_line(text, R"(edgehub_messages_dropped_total{reason="ttl_expiry",edge_device="gw-1"} 2)"));
  CHECK(has_line(text,
                 R"(edgehub_messages_unack_total{reason="storage_failure",edge_device="gw-1"} 3)"));
  CHECK(has_line(text, R"(canopy_messages_redelivered_total{edge_device="gw-1"} 4)"));
  CHECK(has_line(text, "# TYPE edgehub_queue_length gauge"));
  CHECK(has_line(
    text, R"(edgehub_queue_length{endpoint="$upstream",priority="0",edge_device="gw-1"} 5)"));
  CHECK(has_line(
    text,
    R"(edgehub_queue_length{endpoint="/modules/filter/inputs/in",priority="2",edge_device="gw-1"} 0)"));
  CHECK(has_line(
    text, R"(canopy_queue_checkpoint{endpoint="$upstream",priority="0",edge_device="gw-1"} 100)"));
  CHECK(has_line(text, R"(edgehub_connected_clients{edge_device="gw-1"} 6)"));

  CHECK(has_line(text, R"(canopy_store_size_bytes{edge_device="gw-1"} 4096)"));
  CHECK(has_line(text, R"(canopy_store_free_bytes{edge_device="gw-1"} 1024)"));
  CHECK(text.find("canopy_store_limit_bytes{") == std::string::npos);  // no limit set: no sample
  CHECK(has_line(text, R"(canopy_store_commits_total{edge_device="gw-1"} 9)"));
  CHECK(has_line(text, R"(canopy_store_commit_p50_seconds{edge_device="gw-1"} 0.00025)"));
  CHECK(has_line(text, R"(canopy_store_commit_p99_seconds{edge_device="gw-1"} 0.0015)"));
  CHECK(has_line(text, R"(canopy_store_commit_max_seconds{edge_device="gw-1"} 2)"));

  CHECK(has_line(
    text,
    R"(canopy_module_restarts_total{module_name="sensor",module_version="1.0",edge_device="gw-1"} 3)"));
  CHECK(has_line(
    text, R"(canopy_module_status{module_name="sensor",status="running",edge_device="gw-1"} 1)"));
  CHECK(has_line(
    text, R"(canopy_module_status{module_name="sensor",status="failed",edge_device="gw-1"} 0)"));
  CHECK(has_line(
    text, R"(canopy_module_status{module_name="odd",status="running",edge_device="gw-1"} 0)"));
  CHECK(has_line(text,
                 R"(canopy_module_status{module_name="odd",status="dead",edge_device="gw-1"} 1)"));
  CHECK(has_line(
    text,
    R"(canopy_module_last_start_timestamp_seconds{module_name="sensor",edge_device="gw-1"} 1700000000.5)"));
  CHECK(text.find(R"(canopy_module_last_start_timestamp_seconds{module_name="odd")") ==
        std::string::npos);

  CHECK(has_line(text, R"(edgehub_offline_count_total{peer="hub",edge_device="gw-1"} 1)"));
  CHECK(has_line(text, "# TYPE edgehub_offline_duration_seconds summary"));
  CHECK(
    has_line(text, R"(edgehub_offline_duration_seconds_sum{peer="hub",edge_device="gw-1"} 1.5)"));
  CHECK(
    has_line(text, R"(edgehub_offline_duration_seconds_count{peer="hub",edge_device="gw-1"} 1)"));
  CHECK(text.find(R"(edgehub_offline_count_total{peer="gw-2")") ==
        std::string::npos);  // parent link only
  CHECK(has_line(text, R"(canopy_link_up{peer="hub",role="parent",edge_device="gw-1"} 1)"));
  CHECK(has_line(text, R"(canopy_link_up{peer="gw-2",role="child",edge_device="gw-1"} 0)"));
  CHECK(has_line(
    text, R"(canopy_link_rtt_seconds{peer="hub",role="parent",edge_device="gw-1"} 0.00125)"));
  CHECK(text.find(R"(canopy_link_rtt_seconds{peer="gw-2")") ==
        std::string::npos);  // not measured yet
  CHECK(
    has_line(text, R"(canopy_link_connects_total{peer="hub",role="parent",edge_device="gw-1"} 2)"));
  CHECK(has_line(
    text, R"(canopy_link_disconnects_total{peer="hub",role="parent",edge_device="gw-1"} 1)"));
  CHECK(has_line(
    text, R"(canopy_link_offline_seconds_total{peer="hub",role="parent",edge_device="gw-1"} 1.5)"));
  CHECK(has_line(
    text,
    R"(canopy_link_last_change_timestamp_seconds{peer="hub",role="parent",edge_device="gw-1"} 1700000001)"));
  CHECK(text.back() == '\n');
}

TEST_CASE("render_prometheus gives every metric one HELP and one TYPE, before its samples",
          "[prometheus]") {
  auto s = known_snapshot();
  s.instance_number = "b2f0";
  s.messages.store_limit_bytes = 1 << 20;
  auto text = render_prometheus(s);
  std::map<std::string, int> help, type;
  std::set<std::string> families_done;
  std::string current;
  for (const auto& line : lines_of(text)) {
    REQUIRE(!line.empty());
    if (line.rfind("# HELP ", 0) == 0) {
      auto name = line.substr(7, line.find(' ', 7) - 7);
      ++help[name];
      if (!current.empty())
        families_done.insert(current);
      current = name;
      CHECK(families_done.count(name) == 0);
      continue;
    }
    if (line.rfind("# TYPE ", 0) == 0) {
      auto name = line.substr(7, line.find(' ', 7) - 7);
      ++type[name];
      CHECK(name == current);
      auto kind = line.substr(line.rfind(' ') + 1);
      CHECK((kind == "counter" || kind == "gauge" || kind == "summary"));
      continue;
    }
    // A sample: its name is the current family (or its _sum/_count).
    auto name = line.substr(0, line.find('{'));
    INFO(line);
    CHECK((name == current || name == current + "_sum" || name == current + "_count"));
    CHECK(line.find(R"(edge_device="gw-1")") != std::string::npos);
    CHECK(line.find(R"(instance_number="b2f0")") != std::string::npos);
  }
  REQUIRE(!help.empty());
  for (const auto& [name, n] : help) {
    INFO(name);
    CHECK(n == 1);
    CHECK(type[name] == 1);
  }
  CHECK(help.size() == type.size());
  CHECK(has_line(text,
                 R"(canopy_store_limit_bytes{edge_device="gw-1",instance_number="b2f0"} 1048576)"));
}

TEST_CASE("render_prometheus escapes label values", "[prometheus]") {
  metrics_snapshot s;
  s.device_id = "dev\"ice\\1\nx";
  link_metrics l;
  l.peer = R"(we"ird\peer)";
  l.role = "child";
  l.up = true;
  s.links = {l};
  module_row m;
  m.name = "line\nbreak";
  m.version = "v\\1";
  m.status = "running";
  s.modules = {m};
  auto text = render_prometheus(s);
  INFO(text);
  CHECK(has_line(
    text, R"(canopy_link_up{peer="we\"ird\\peer",role="child",edge_device="dev\"ice\\1\nx"} 1)"));
  CHECK(has_line(
    text,
    R"(canopy_module_restarts_total{module_name="line\nbreak",module_version="v\\1",edge_device="dev\"ice\\1\nx"} 0)"));
  // No raw newline inside a sample: every line is a comment or starts with a metric name.
  for (const auto& line : lines_of(text)) {
    INFO(line);
    REQUIRE(!line.empty());
    CHECK((line[0] == '#' || (line[0] >= 'a' && line[0] <= 'z')));
  }
}

TEST_CASE("render_prometheus of an empty snapshot still declares every family", "[prometheus]") {
  auto text = render_prometheus(metrics_snapshot{});
  CHECK(has_line(text, "# TYPE edgehub_queue_length gauge"));
  CHECK(has_line(text, "# TYPE canopy_link_rtt_seconds gauge"));
  CHECK(has_line(text, R"(edgehub_messages_received_total{edge_device=""} 0)"));
  CHECK(text.find("edgehub_queue_length{") == std::string::npos);
}
