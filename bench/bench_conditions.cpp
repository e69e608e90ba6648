// bench-conditions: route condition evaluation rate, for a `$body` condition
// (JSON body parsed per message) and an application-property condition,
// against hand-written C++ doing the same checks on the same messages in the
// same run (nlohmann::json parse + compare; property lookup + compare).
//   RESULT bench-conditions body_per_s=... body_baseline_per_s=... props_per_s=...
//          props_baseline_per_s=... ratio=... (ratio = the lower of the two ratios)
#include "bench/bench_common.hpp"
#include "runtime/route.hpp"

#include <nlohmann/json.hpp>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

using namespace canopy;
using namespace canopy::bench;

namespace {

std::vector<message> make_messages(int n) {
  std::vector<message> v;
  v.reserve(n);
  for (int i = 0; i < n; ++i) {
    double t = 20.0 + (i % 20);
    auto body = nlohmann::json{{"machine", {{"temperature", t}, {"pressure", 1.2}}},
                               {"ambient", {{"temperature", 21.0}, {"humidity", 25}}},
                               {"timeCreated", "2026-11-26T07:00:00Z"}}
                  .dump();
    v.push_back(message_builder{}
                  .body(body)
                  .content_type("application/json")
                  .content_encoding("utf-8")
                  .property("level", i % 3 == 0 ? "high" : "low")
                  .property("temp", std::to_string(static_cast<int>(t)))
                  .property("sensorID", "s-1")
                  .build());
  }
  return v;
}

template <class F>
double rate(const std::vector<message>& msgs, int rounds, F&& pred, long& hits) {
  hits = 0;
  auto t0 = bench_clock::now();
  for (int r = 0; r < rounds; ++r)
    for (auto& m : msgs)
      hits += pred(m) ? 1 : 0;
  auto secs = std::chrono::duration<double>(bench_clock::now() - t0).count();
  return static_cast<double>(msgs.size()) * rounds / secs;
}

}  // namespace

int main(int argc, char** argv) {
  int n = static_cast<int>(arg(argc, argv, "messages", 10000));
  int rounds = static_cast<int>(arg(argc, argv, "rounds", 100));
  auto msgs = make_messages(n);
  message_source src{"", "sensor", "out"};
  auto body_route = route::compile(
    "body", "FROM /messages/modules/sensor/* WHERE $body.machine.temperature > 30 INTO $upstream");
  auto prop_route = route::compile(
    "props", "FROM /messages/modules/sensor/* WHERE level = 'high' AND temp > 30 INTO $upstream");
  if (!body_route || !prop_route) {
    std::fprintf(stderr, "route did not compile\n");
    return 1;
  }
  long h1 = 0, h2 = 0, h3 = 0, h4 = 0;
  double body = rate(msgs, rounds, [&](const message& m) { return body_route->matches(m, src); }, h1);
  double body_base = rate(msgs, rounds, [](const message& m) {
    if (m.content_type() != "application/json")
      return false;
    auto j = nlohmann::json::parse(m.body(), nullptr, false);
    if (j.is_discarded())
      return false;
    auto& t = j["machine"]["temperature"];
    return t.is_number() && t.get<double>() > 30;
  }, h2);
  double props = rate(msgs, rounds, [&](const message& m) { return prop_route->matches(m, src); }, h3);
  double props_base = rate(msgs, rounds, [](const message& m) {
    auto level = m.property("level");
    auto temp = m.property("temp");
    return level && *level == "high" && temp && std::strtod(std::string{*temp}.c_str(), nullptr) > 30;
  }, h4);
  if (h1 != h2 || h3 != h4) {
    std::fprintf(stderr, "results differ: body %ld vs %ld, props %ld vs %ld\n", h1, h2, h3, h4);
    return 1;
  }
  double ratio = std::min(body / body_base, props / props_base);
  std::printf("RESULT bench-conditions body_per_s=%.0f body_baseline_per_s=%.0f props_per_s=%.0f "
              "props_baseline_per_s=%.0f body_ratio=%.2f props_ratio=%.2f ratio=%.2f\n",
              body, body_base, props, props_base, body / body_base, props / props_base, ratio);
  return 0;
}
