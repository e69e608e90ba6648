// Helpers shared by the benchmarks that go through the router
// (bench-local-routing, bench-durable-enqueue, bench-drain,
// bench-backlog-memory): a router over a message_store in a scratch
// directory, compiled routes, its metrics, and a receiver that acknowledges
// the way actors/module_host.cpp does.
#pragma once

#include "bench/bench_common.hpp"
#include "runtime/atoms.hpp"
#include "runtime/clock.hpp"
#include "runtime/message_store.hpp"
#include "runtime/router.hpp"

#include <caf/all.hpp>

#include <cstdint>
#include <cstdio>
#include <future>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace canopy::bench {

/// Opens (creating) a message_store in `dir` for a router (shared ownership),
/// or dies.
inline std::shared_ptr<message_store> open_shared_store(std::string_view bench,
                                                        const std::string& dir,
                                                        const message_store_options& options = {}) {
  auto s = message_store::open(dir, options);
  if (!s)
    die(bench, s.err().message);
  return std::shared_ptr<message_store>(std::move(s).value());
}

/// Compiles `specs` with a default TTL of `store_ttl_secs` (a deployment's
/// default: 7200 s), or dies.
inline route_table compile_or_die(std::string_view bench, const std::vector<route_spec>& specs,
                                  std::uint32_t store_ttl_secs = 7200) {
  auto t = compile_routes(specs, store_ttl_secs);
  if (!t)
    die(bench, t.err().message);
  return std::move(t).value();
}

/// Spawns a router over `store` with the clock `clk` (borrowed: it must
/// outlive the router) and the settings of `base` otherwise (its store and
/// clock are replaced), and gives it `routes`.
inline caf::actor start_router(caf::actor_system& sys, std::shared_ptr<message_store> store,
                               clock& clk, route_table routes, router_config base = {}) {
  router_config rc = std::move(base);
  rc.store = std::move(store);
  rc.clk = &clk;
  auto router = spawn_router(sys, std::move(rc));
  caf::anon_send(router, atoms::set_routes::value, std::move(routes));
  return router;
}

/// router_config with the defaults, or the values of `--lane-window=N`,
/// `--receiver-window=N`, `--commit-batch=N` and `--commit-interval-us=N` when
/// given (to see how the figures depend on them).
inline router_config router_config_from_args(int argc, char** argv) {
  router_config rc;
  rc.lane_window = static_cast<std::size_t>(arg(argc, argv, "lane-window", static_cast<long>(rc.lane_window)));
  rc.receiver_window =
    static_cast<std::size_t>(arg(argc, argv, "receiver-window", static_cast<long>(rc.receiver_window)));
  rc.commit_batch = static_cast<std::size_t>(arg(argc, argv, "commit-batch", static_cast<long>(rc.commit_batch)));
  rc.commit_interval = std::chrono::microseconds(
    arg(argc, argv, "commit-interval-us", static_cast<long>(rc.commit_interval.count())));
  return rc;
}

/// The router's metrics (it commits what is batched first), or dies.
inline node_metrics metrics_or_die(std::string_view bench, caf::scoped_actor& self,
                                   const caf::actor& router) {
  node_metrics out;
  bool ok = false;
  self->request(router, std::chrono::seconds(30), atoms::stats::value)
    .receive([&](node_metrics& m) { out = std::move(m); ok = true; },
             [&](caf::error& e) { die(bench, "stats: " + to_string(e)); });
  if (!ok)
    die(bench, "stats: no answer");
  return out;
}

/// Undelivered messages of `endpoint`, all priorities.
inline std::int64_t queue_length(const node_metrics& m, std::string_view endpoint) {
  std::int64_t n = 0;
  for (const auto& q : m.queues)
    if (q.endpoint == endpoint)
      n += q.length;
  return n;
}

/// Sends (inject, rm) and waits for the reply, which comes once the message is
/// durable; dies on an error. Commits are in order, so the reply also means
/// every message the router received before it is committed.
inline void inject_or_die(std::string_view bench, caf::scoped_actor& self, const caf::actor& router,
                          routed_message rm) {
  bool ok = false;
  self->request(router, std::chrono::seconds(60), atoms::inject::value, std::move(rm))
    .receive([&](std::uint64_t) { ok = true; },
             [&](caf::error& e) { die(bench, "inject: " + to_string(e)); });
  if (!ok)
    die(bench, "inject: no answer");
}

/// Stops `a` and waits until it is gone (so that a router has committed and
/// closed its store before the next measurement).
inline void stop_and_wait(caf::scoped_actor& self, const caf::actor& a) {
  self->send_exit(a, caf::exit_reason::user_shutdown);
  self->wait_for(a);
}

/// What a bench_receiver reports: when it had seen `expected` inputs and
/// acknowledged them.
struct receiver_control {
  long expected = 0;
  std::promise<bench_clock::time_point> done;
};

/// Number of inputs between two acknowledgements, as actors/module_host.cpp.
constexpr std::size_t receiver_ack_every = 64;

/// A module stand-in that takes (input, std::string, message, uint64 token)
/// and acknowledges like actors/module_host.cpp: a cumulative (delivered,
/// name, token) to `router` every receiver_ack_every inputs and when its
/// mailbox has drained (a message to itself queues behind the inputs). Sets
/// ctl->done (borrowed: it must outlive the actor) after acknowledging the
/// ctl->expected-th input.
inline caf::behavior bench_receiver(caf::event_based_actor* self, std::string name,
                                    caf::actor router, receiver_control* ctl) {
  struct state {
    long seen = 0;
    std::uint64_t processed = 0;
    std::uint64_t acked = 0;
    std::size_t unacked = 0;
    bool ack_scheduled = false;
  };
  auto st = std::make_shared<state>();
  auto send_ack = [self, st, name, router, ctl] {
    if (st->processed > st->acked) {
      self->send(router, atoms::delivered::value, name, st->processed);
      st->acked = st->processed;
    }
    st->unacked = 0;
    if (st->seen == ctl->expected) {
      ctl->done.set_value(bench_clock::now());
      ++st->seen;  // report once
    }
  };
  return {
    [self, st, send_ack](atoms::input, const std::string&, const message&, std::uint64_t token) {
      ++st->seen;
      st->processed = token;
      if (++st->unacked >= receiver_ack_every) {
        send_ack();
      } else if (!st->ack_scheduled) {
        st->ack_scheduled = true;
        self->send(self, atoms::delivered::value);
      }
    },
    [st, send_ack](atoms::delivered) {
      st->ack_scheduled = false;
      send_ack();
    },
  };
}

/// `n` distinct 100-byte messages from module "sensor" output "temp" of device
/// "bench". Built before a clock starts: building is the sender's cost.
inline std::vector<routed_message> sample_messages(long n) {
  std::vector<routed_message> out;
  out.reserve(static_cast<std::size_t>(n));
  for (long i = 0; i < n; ++i) {
    std::string body(100, 'x');
    std::snprintf(body.data(), body.size(), "%ld", i);
    out.push_back({message_builder{}.body(body).build(), "bench", "sensor", "temp"});
  }
  return out;
}

}  // namespace canopy::bench
