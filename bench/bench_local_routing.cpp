// bench-local-routing: module -> module routed throughput in one node, for
// 100-byte messages, against a raw CAF one-way send between two actors
// measured in the same run.
//   RESULT bench-local-routing msgs_per_s=... caf_msgs_per_s=... ratio=...
#include "actors/module_host.hpp"
#include "bench/bench_common.hpp"
#include "runtime/atoms.hpp"
#include "runtime/router.hpp"

#include <caf/all.hpp>
#include <spdlog/sinks/null_sink.h>

#include <future>

using namespace canopy;
using namespace canopy::bench;

namespace {

struct run_control {
  long count = 0;
  message payload;
  std::promise<bench_clock::time_point> done;
};

run_control* control = nullptr;  // bench-only wiring between main() and the modules

class blaster : public module {
 public:
  void start(module_context& ctx, const json&) override { ctx_ = &ctx; }
  void on_message(std::string_view, const message&) override {
    for (long i = 0; i < control->count; ++i)
      ctx_->send("out", control->payload);
  }

 private:
  module_context* ctx_ = nullptr;
};

class counter : public module {
 public:
  void start(module_context&, const json&) override {}
  void on_message(std::string_view, const message&) override {
    if (++seen_ == control->count)
      control->done.set_value(bench_clock::now());
  }

 private:
  long seen_ = 0;
};

template <class M>
const canopy_module_descriptor* descriptor() {
  static const canopy_module_descriptor d{module_abi_version, sdk_version, "bench",
                                          []() -> module* { return new M(); },
                                          [](module* m) { delete m; }};
  return &d;
}

double raw_caf(caf::actor_system& sys, long n, const message& payload) {
  std::promise<bench_clock::time_point> done;
  auto fut = done.get_future();
  auto sink = sys.spawn([n, &done](caf::event_based_actor*) -> caf::behavior {
    auto seen = std::make_shared<long>(0);
    return {[n, &done, seen](atoms::input, const std::string&, const message&) {
      if (++*seen == n)
        done.set_value(bench_clock::now());
    }};
  });
  auto source = sys.spawn([sink, n, payload](caf::event_based_actor* self) -> caf::behavior {
    return {[self, sink, n, payload](atoms::tick) {
      std::string input = "in";
      for (long i = 0; i < n; ++i)
        self->send(sink, atoms::input::value, input, payload);
    }};
  });
  auto t0 = bench_clock::now();
  caf::anon_send(source, atoms::tick::value);
  auto t1 = fut.get();
  caf::anon_send_exit(source, caf::exit_reason::user_shutdown);
  caf::anon_send_exit(sink, caf::exit_reason::user_shutdown);
  return static_cast<double>(n) / std::chrono::duration<double>(t1 - t0).count();
}

double routed(caf::actor_system& sys, long n, const message& payload) {
  run_control ctl;
  ctl.count = n;
  ctl.payload = payload;
  control = &ctl;
  auto fut = ctl.done.get_future();
  auto router = spawn_router(sys, router_config{});
  auto r = route::compile("r", "FROM /messages/modules/source/outputs/out INTO BrokeredEndpoint(\"/modules/sink/inputs/in\")");
  if (!r) {
    std::fprintf(stderr, "%s\n", r.err().message.c_str());
    std::exit(1);
  }
  caf::anon_send(router, atoms::set_routes::value,
                 route_table{std::make_shared<const std::vector<route>>(std::vector<route>{*r})});
  auto logger = std::make_shared<spdlog::logger>("bench", std::make_shared<spdlog::sinks::null_sink_mt>());
  auto host = [&](const char* name, const canopy_module_descriptor* d) {
    module_host_config cfg;
    cfg.name = name;
    cfg.device_id = "bench";
    cfg.type = std::make_shared<const module_type>(std::string{"builtin:"} + name, d, nullptr);
    cfg.router = router;
    cfg.logger = logger;
    return spawn_module_host(sys, cfg);
  };
  auto sink = host("sink", descriptor<counter>());
  auto source = host("source", descriptor<blaster>());
  // Make sure the router knows the sink before the clock starts.
  caf::scoped_actor self{sys};
  for (;;) {
    router_stats st;
    self->request(router, caf::infinite, atoms::stats::value).receive([&](router_stats& s) { st = s; },
                                                                      [](caf::error&) {});
    (void) st;
    break;
  }
  auto t0 = bench_clock::now();
  caf::anon_send(source, atoms::input::value, std::string{"go"}, payload);
  auto t1 = fut.get();
  for (auto& a : {source, sink, router})
    caf::anon_send_exit(a, caf::exit_reason::user_shutdown);
  control = nullptr;
  return static_cast<double>(n) / std::chrono::duration<double>(t1 - t0).count();
}

}  // namespace

int main(int argc, char** argv) {
  long n = arg(argc, argv, "messages", 1'000'000);
  long rounds = arg(argc, argv, "rounds", 3);
  caf::actor_system_config cfg;
  cfg.set("logger.verbosity", caf::atom("quiet"));
  caf::actor_system sys{cfg};
  auto payload = message_builder{}.body(std::string(100, 'x')).build();
  double best_raw = 0, best_routed = 0;
  for (long i = 0; i < rounds; ++i) {
    best_raw = std::max(best_raw, raw_caf(sys, n, payload));
    best_routed = std::max(best_routed, routed(sys, n, payload));
    std::printf("round %ld: raw CAF %.0f msg/s, routed %.0f msg/s\n", i + 1, best_raw, best_routed);
  }
  std::printf("RESULT bench-local-routing msgs_per_s=%.0f caf_msgs_per_s=%.0f ratio=%.2f messages=%ld\n",
              best_routed, best_raw, best_routed / best_raw, n);
  return 0;
}
