// bench-restart: restart latency of a supervised actor module. A module
// crashes (throws) on a message; we time from the crash to the moment its
// fresh instance handles the next message, over many crashes, next to the cost
// of a plain CAF spawn + first message measured in the same run.
//   RESULT bench-restart p50_us=... p99_us=... spawn_us=... ratio=... (ratio = p50 / spawn)
#include "actors/module_host.hpp"
#include "bench/bench_common.hpp"
#include "runtime/atoms.hpp"
#include "runtime/clock.hpp"
#include "runtime/router.hpp"
#include "runtime/supervisor.hpp"

#include <caf/all.hpp>
#include <spdlog/sinks/null_sink.h>

#include <atomic>

using namespace canopy;
using namespace canopy::bench;

namespace {

std::atomic<std::int64_t> crash_at{0};    // ns, steady clock, set just before the throw
std::atomic<std::int64_t> handled_at{0};  // ns, when the fresh instance handled "ping"

std::int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(bench_clock::now().time_since_epoch()).count();
}

class crasher : public module {
 public:
  void start(module_context& ctx, const json&) override { ctx_ = &ctx; }
  void on_message(std::string_view input, const message& m) override {
    if (input == "crash") {
      crash_at = now_ns();
      throw std::runtime_error("crash on demand");
    }
    handled_at = now_ns();
    ctx_->send("pong", m);
  }

 private:
  module_context* ctx_ = nullptr;
};

const canopy_module_descriptor* crasher_descriptor() {
  static const canopy_module_descriptor d{module_abi_version, sdk_version, "crasher",
                                          []() -> module* { return new crasher(); },
                                          [](module* m) { delete m; }};
  return &d;
}

double spawn_cost_us(caf::actor_system& sys, int n) {
  caf::scoped_actor self{sys};
  std::vector<double> v;
  for (int i = 0; i < n; ++i) {
    auto t0 = bench_clock::now();
    auto a = sys.spawn([](caf::event_based_actor*) -> caf::behavior {
      return {[](atoms::tick) { return atoms::tick::value; }};
    });
    self->request(a, caf::infinite, atoms::tick::value).receive([](atoms::tick) {}, [](caf::error&) {});
    v.push_back(micros(bench_clock::now() - t0));
    caf::anon_send_exit(a, caf::exit_reason::user_shutdown);
  }
  return percentile(v, 50);
}

}  // namespace

int main(int argc, char** argv) {
  int crashes = static_cast<int>(arg(argc, argv, "crashes", 10000));
  caf::actor_system_config cfg;
  cfg.set("logger.verbosity", caf::atom("quiet"));
  caf::actor_system sys{cfg};
  system_clock clk;
  caf::scoped_actor self{sys};

  // $upstream of this little node is the benchmark itself.
  router_config rc;
  rc.upstream = caf::actor{self};
  auto router = spawn_router(sys, rc);
  auto r = route::compile("r", "FROM /messages/modules/crasher/outputs/pong INTO $upstream");
  caf::anon_send(router, atoms::set_routes::value,
                 route_table{std::make_shared<const std::vector<route>>(std::vector<route>{*r})});
  auto logger = std::make_shared<spdlog::logger>("bench", std::make_shared<spdlog::sinks::null_sink_mt>());

  module_host_config hc;
  hc.name = "crasher";
  hc.device_id = "bench";
  hc.type = std::make_shared<const module_type>("builtin:crasher", crasher_descriptor(), nullptr);
  hc.router = router;
  hc.logger = logger;
  child_spec spec;
  spec.id = "crasher";
  spec.restart = restart_type::permanent;
  spec.own_limit = restart_intensity{crashes * 2, std::chrono::hours{1}};
  // Every crash restarts at once: what is measured is the restart path itself,
  // not the backoff schedule (which tests cover with the injected clock).
  spec.backoff = backoff_policy{clock::duration::zero(), clock::duration::zero(), std::chrono::hours{1}, 0};
  spec.start = [hc](caf::actor_system& s) { return spawn_module_host(s, hc); };

  supervisor_config sc;
  sc.name = "modules";
  sc.intensity = restart_intensity{crashes * 2, std::chrono::hours{1}};
  sc.backoff = *spec.backoff;
  sc.clk = &clk;
  sc.observer = caf::actor{self};
  sc.children.push_back(spec);
  auto sup = spawn_supervisor(sys, sc);

  auto payload = message_builder{}.body(std::string(100, 'x')).build();
  caf::actor instance;
  auto wait_started = [&] {
    bool got = false;
    while (!got)
      self->receive(
        [&](atoms::child_event, const child_event_info& ev) {
          if (ev.kind == child_event_kind::started) {
            instance = ev.instance;
            got = true;
          }
        },
        [&](atoms::route_msg, const routed_message&) {},
        caf::after(std::chrono::seconds{10}) >> [&] {
          std::fprintf(stderr, "no restart within 10 s\n");
          std::exit(1);
        });
  };
  auto wait_pong = [&] {
    bool got = false;
    while (!got)
      self->receive([&](atoms::route_msg, const routed_message&) { got = true; },
                    [&](atoms::child_event, const child_event_info&) {},
                    caf::after(std::chrono::seconds{10}) >> [&] {
                      std::fprintf(stderr, "no answer within 10 s\n");
                      std::exit(1);
                    });
  };
  wait_started();
  std::vector<double> lat;
  lat.reserve(crashes);
  for (int i = 0; i < crashes; ++i) {
    self->send(instance, atoms::input::value, std::string{"crash"}, payload);
    wait_started();
    self->send(instance, atoms::input::value, std::string{"ping"}, payload);
    wait_pong();
    lat.push_back(static_cast<double>(handled_at.load() - crash_at.load()) / 1000.0);
  }
  double spawn_us = spawn_cost_us(sys, 2000);
  double p50 = percentile(lat, 50), p99 = percentile(lat, 99);
  std::printf("RESULT bench-restart p50_us=%.1f p99_us=%.1f spawn_us=%.1f ratio=%.2f crashes=%d\n", p50,
              p99, spawn_us, p50 / spawn_us, crashes);
  self->send_exit(sup, caf::exit_reason::user_shutdown);
  self->send_exit(router, caf::exit_reason::user_shutdown);
  clk.stop();
  return 0;
}
