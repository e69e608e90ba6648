// bench-local-routing: module -> router -> module throughput in one node, for
// 100-byte messages, against a raw CAF one-way send between two actors
// measured in the same run. The router is the node's: every message goes
// through its group-commit batch and the receiving lane's window over a
// message_store in a scratch directory (messages the receiver acknowledged
// before their commit are never written). Delivery is counted at the receiving
// module's on_message; best of --rounds rounds.
//   RESULT bench-local-routing msgs_per_s=... caf_msgs_per_s=... ratio=...
#include "actors/module_host.hpp"
#include "bench/bench_router.hpp"
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
  long window = 256;  ///< messages in flight at most (credit-based flow control)
  long chunk = 100;   ///< messages per credit
  message payload;
  std::promise<bench_clock::time_point> done;
};

run_control* control = nullptr;  // bench-only wiring between main() and the modules

// The source sends `window` messages on "go", then `chunk` more for each
// credit the sink sends back (through the router, as modules talk): a
// sustained stream with a bounded number of messages in flight, as any
// flow-controlled producer (MQTT receive-maximum, AMQP credit) runs. A burst
// larger than a lane's window is not this benchmark's subject: it goes
// through the disk by design (bench-drain measures that path).
class blaster : public module {
 public:
  void start(module_context& ctx, const json&) override { ctx_ = &ctx; }
  void on_message(std::string_view input, const message&) override {
    const long n = input == "go" ? control->window : control->chunk;
    for (long i = 0; i < n && sent_ < control->count; ++i, ++sent_)
      ctx_->send("out", control->payload);
  }

 private:
  module_context* ctx_ = nullptr;
  long sent_ = 0;
};

class counter : public module {
 public:
  void start(module_context& ctx, const json&) override { ctx_ = &ctx; }
  void on_message(std::string_view, const message&) override {
    if (++seen_ == control->count)
      control->done.set_value(bench_clock::now());
    else if (seen_ % control->chunk == 0)
      ctx_->send("credit", credit_);
  }

 private:
  module_context* ctx_ = nullptr;
  message credit_ = message_builder{}.body("1").build();
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

constexpr std::string_view bench_name = "bench-local-routing";

struct routed_result {
  double msgs_per_s = 0;
  std::uint64_t commits = 0;     ///< group commits during the round
  std::int64_t store_bytes = 0;  ///< size of messages.db after it
};

routed_result routed(caf::actor_system& sys, long n, long window, const message& payload,
                     router_config rc) {
  run_control ctl;
  ctl.count = n;
  ctl.window = window;
  ctl.chunk = std::max(1L, window / 8);
  ctl.payload = payload;
  control = &ctl;
  auto fut = ctl.done.get_future();
  temp_dir dir(bench_name);
  system_clock clk;
  auto router = start_router(
    sys, open_shared_store(bench_name, dir.path), clk,
    compile_or_die(bench_name, {route_spec{"r",
                                           "FROM /messages/modules/source/outputs/out INTO "
                                           "BrokeredEndpoint(\"/modules/sink/inputs/in\")",
                                           0, 0},
                                route_spec{"credit",
                                           "FROM /messages/modules/sink/outputs/credit INTO "
                                           "BrokeredEndpoint(\"/modules/source/inputs/credit\")",
                                           0, 0}}),
    std::move(rc));
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
  // Make sure the router knows the sink before the clock starts: the sink
  // answers a health ping after it announced itself (module_up) to the
  // router, so the stats request that follows reaches the router after that.
  caf::scoped_actor self{sys};
  self->send(sink, atoms::health_ping::value, std::uint64_t{1});
  self->receive([](atoms::health_pong, std::uint64_t) {},
                caf::after(std::chrono::seconds(10)) >> [] { die(bench_name, "the sink did not start"); });
  const auto before = metrics_or_die(bench_name, self, router);
  auto t0 = bench_clock::now();
  caf::anon_send(source, atoms::input::value, std::string{"go"}, payload, std::uint64_t{0});
  auto t1 = fut.get();
  const auto after = metrics_or_die(bench_name, self, router);
  for (auto& a : {source, sink})
    stop_and_wait(self, a);
  stop_and_wait(self, router);
  control = nullptr;
  routed_result out;
  out.msgs_per_s = static_cast<double>(n) / std::chrono::duration<double>(t1 - t0).count();
  out.commits = after.commits - before.commits;
  out.store_bytes = after.store_bytes;
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  long n = arg(argc, argv, "messages", 1'000'000);
  long rounds = arg(argc, argv, "rounds", 3);
  long window = arg(argc, argv, "window", 256);
  caf::actor_system_config cfg;
  cfg.set("logger.verbosity", caf::atom("quiet"));
  caf::actor_system sys{cfg};
  auto payload = message_builder{}.body(std::string(100, 'x')).build();
  double best_raw = 0;
  routed_result best_routed;
  for (long i = 0; i < rounds; ++i) {
    best_raw = std::max(best_raw, raw_caf(sys, n, payload));
    auto r = routed(sys, n, window, payload, router_config_from_args(argc, argv));
    std::printf("round %ld: raw CAF %.0f msg/s (best), routed %.0f msg/s (%llu commits, store %lld bytes)\n",
                i + 1, best_raw, r.msgs_per_s, static_cast<unsigned long long>(r.commits),
                static_cast<long long>(r.store_bytes));
    std::fflush(stdout);
    if (r.msgs_per_s > best_routed.msgs_per_s)
      best_routed = r;
  }
  std::printf("RESULT bench-local-routing msgs_per_s=%.0f caf_msgs_per_s=%.0f ratio=%.2f messages=%ld "
              "window=%ld commits=%llu\n",
              best_routed.msgs_per_s, best_raw, best_routed.msgs_per_s / best_raw, n, window,
              static_cast<unsigned long long>(best_routed.commits));
  return 0;
}
