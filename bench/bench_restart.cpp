// bench-restart: restart latency of a supervised actor module. A module
// crashes (throws) on a message; we time from the crash to the moment its
// fresh instance handles the next message, over many crashes, next to the cost
// of a plain CAF spawn + first message measured in the same run.
//   RESULT bench-restart p50_us=... p99_us=... spawn_us=... ratio=... (ratio = p50 / spawn)
#include "actors/module_host.hpp"
#include "bench/bench_router.hpp"
#include "runtime/atoms.hpp"
#include "runtime/clock.hpp"
#include "runtime/router.hpp"
#include "runtime/supervisor.hpp"

#include <caf/all.hpp>
#include <spdlog/sinks/null_sink.h>
#include <spdlog/spdlog.h>

#include <atomic>
#include <functional>
#include <future>

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
  // Spawn an actor and have it handle its first message, driven from an
  // event-based actor as the restart path is.
  std::promise<std::vector<double>> result;
  auto fut = result.get_future();
  sys.spawn([&result, n](caf::event_based_actor* self) {
    auto v = std::make_shared<std::vector<double>>();
    auto step = std::make_shared<std::function<void()>>();
    *step = [=, &result] {
      if (static_cast<int>(v->size()) == n) {
        result.set_value(*v);
        return;
      }
      auto t0 = bench_clock::now();
      auto a = self->spawn([](caf::event_based_actor*) -> caf::behavior {
        return {[](atoms::tick) { return atoms::tick::value; }};
      });
      self->request(a, caf::infinite, atoms::tick::value).then([=](atoms::tick) {
        v->push_back(micros(bench_clock::now() - t0));
        self->send_exit(a, caf::exit_reason::user_shutdown);
        (*step)();
      });
    };
    (*step)();
  });
  auto v = fut.get();
  return percentile(v, 50);
}

}  // namespace

int main(int argc, char** argv) {
  int crashes = static_cast<int>(arg(argc, argv, "crashes", 10000));
  // Measure the restart path, not the terminal: the node's logs go nowhere here.
  spdlog::set_default_logger(
    std::make_shared<spdlog::logger>("bench", std::make_shared<spdlog::sinks::null_sink_mt>()));
  caf::actor_system_config cfg;
  cfg.set("logger.verbosity", caf::atom("quiet"));
  caf::actor_system sys{cfg};
  system_clock clk;
  caf::scoped_actor self{sys};

  auto logger = std::make_shared<spdlog::logger>("bench", std::make_shared<spdlog::sinks::null_sink_mt>());

  module_host_config hc;
  hc.name = "crasher";
  hc.device_id = "bench";
  hc.type = std::make_shared<const module_type>("builtin:crasher", crasher_descriptor(), nullptr);
  hc.logger = logger;
  child_spec spec;
  spec.id = "crasher";
  spec.restart = restart_type::permanent;
  spec.own_limit = restart_intensity{crashes * 2, std::chrono::hours{1}};
  // Every crash restarts at once: what is measured is the restart path itself,
  // not the backoff schedule (which tests cover with the injected clock).
  spec.backoff = backoff_policy{clock::duration::zero(), clock::duration::zero(), std::chrono::hours{1}, 0};

  supervisor_config sc;
  sc.name = "modules";
  sc.intensity = restart_intensity{crashes * 2, std::chrono::hours{1}};
  sc.backoff = *spec.backoff;
  sc.clk = &clk;
  sc.observer = caf::actor{self};

  auto payload = message_builder{}.body(std::string(100, 'x')).build();
  // The driver is an event-based actor, like the rest of the node: it reacts to
  // the supervisor's `started` event by sending the next message at once.
  std::promise<std::vector<double>> result;
  auto fut = result.get_future();
  auto driver = sys.spawn([&result, crashes, payload](caf::event_based_actor* self) -> caf::behavior {
    struct loop_state {
      caf::actor instance;
      int done = 0;
      bool crashed = false;
      std::vector<double> lat;
    };
    auto st = std::make_shared<loop_state>();
    st->lat.reserve(crashes);
    return {
      [=, &result](atoms::child_event, const child_event_info& ev) {
        if (ev.kind != child_event_kind::started)
          return;
        st->instance = ev.instance;
        if (st->crashed)  // the fresh instance: its next message
          self->send(st->instance, atoms::input::value, std::string{"ping"}, payload, std::uint64_t{0});
        else {            // the first instance: start crashing it
          st->crashed = true;
          self->send(st->instance, atoms::input::value, std::string{"crash"}, payload, std::uint64_t{0});
        }
      },
      [=, &result](atoms::route_msg, const routed_message&, std::uint64_t token) {  // the pong
        // Acknowledged as $upstream does, to the router that delivered it.
        self->send(caf::actor_cast<caf::actor>(self->current_sender()), atoms::delivered::value,
                   std::string{upstream_endpoint}, token);
        st->lat.push_back(static_cast<double>(handled_at.load() - crash_at.load()) / 1000.0);
        if (++st->done == crashes) {
          result.set_value(std::move(st->lat));
          self->quit();
          return;
        }
        self->send(st->instance, atoms::input::value, std::string{"crash"}, payload, std::uint64_t{0});
      },
    };
  });
  // $upstream of this little node is the driver; the router's store is in a
  // scratch directory.
  temp_dir dir("bench-restart");
  router_config rc;
  rc.upstream = driver;
  auto router = start_router(
    sys, open_shared_store("bench-restart", dir.path), clk,
    compile_or_die("bench-restart", {route_spec{"r", "FROM /messages/modules/crasher/outputs/pong INTO $upstream", 0, 0}}),
    rc);
  hc.router = router;
  spec.start = [hc](caf::actor_system& s) { return spawn_module_host(s, hc); };
  sc.children = {spec};
  sc.observer = driver;
  auto sup = spawn_supervisor(sys, sc);
  if (fut.wait_for(std::chrono::seconds{40}) != std::future_status::ready) {
    std::fprintf(stderr, "bench-restart: restarts stalled\n");
    return 1;
  }
  auto lat = fut.get();
  double spawn_us = spawn_cost_us(sys, 2000);
  double p50 = percentile(lat, 50), p99 = percentile(lat, 99);
  std::printf("RESULT bench-restart p50_us=%.1f p99_us=%.1f spawn_us=%.1f ratio=%.2f crashes=%d\n", p50,
              p99, spawn_us, p50 / spawn_us, crashes);
  self->send_exit(sup, caf::exit_reason::user_shutdown);
  stop_and_wait(self, router);
  clk.stop();
  return 0;
}
