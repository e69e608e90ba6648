// bench-backlog-memory: resident memory of a process whose router holds a
// 1,000,000-message backlog (100-byte messages, each its own buffer) for a
// module input whose module is absent, against the same process with an empty
// queue, measured in the same run from /proc/self/statm.
//
// The process is a node's message path: an actor system, a router over a
// message_store in a scratch directory, one route. Empty queue: the module is
// up and 10,000 messages went through the router and were acknowledged (so the
// baseline includes the router's and the store's fixed costs). Backlog: the
// module goes down and a source actor sends the messages to the router as a
// module host does, (route_msg, routed_message), in chunks of 10,000, each
// followed by an (inject, message) whose answer (after its commit) lets the
// next chunk go, so the router's mailbox, not its queue, stays small. The
// backlog is measured twice: with the router that took it, and after a
// restart (router stopped, store closed and reopened, a new router resuming
// the lane). Also printed: both figures after malloc_trim(0) (memory freed
// but kept by the allocator), for reference.
//   RESULT bench-backlog-memory delta_mb=... rss_empty_mb=... rss_backlog_mb=... ratio=...
#include "bench/bench_router.hpp"

#include <malloc.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

using namespace canopy;
using namespace canopy::bench;

namespace {

constexpr std::string_view bench_name = "bench-backlog-memory";

constexpr const char* module_name = "archiver";
constexpr const char* endpoint = "/modules/archiver/inputs/in";

/// Resident set size in MiB (second field of /proc/self/statm, in pages).
double rss_mb() {
  std::ifstream in("/proc/self/statm");
  long size = 0, resident = 0;
  if (!(in >> size >> resident))
    die(bench_name, "cannot read /proc/self/statm");
  return static_cast<double>(resident) * static_cast<double>(::sysconf(_SC_PAGESIZE)) /
         (1024.0 * 1024.0);
}

/// rss_mb() after handing freed memory back to the system.
double trimmed_rss_mb() {
  ::malloc_trim(0);
  return rss_mb();
}

route_table routes() {
  return compile_or_die(bench_name, {route_spec{"r",
                                                "FROM /messages/modules/sensor/outputs/temp INTO "
                                                "BrokeredEndpoint(\"/modules/archiver/inputs/in\")",
                                                0, 0}});
}

/// Message `i`: a distinct 100-byte body in its own buffer, from module
/// "sensor" output "temp", as a module host sends it.
routed_message make_message(long i) {
  std::string body(100, 'x');
  std::snprintf(body.data(), body.size(), "%ld", i);
  return {message_builder{}.body(body).build(), "bench", "sensor", "temp"};
}

/// Sends `n` fresh messages to `router` from a source actor, in chunks of
/// `chunk`, each closed by an inject whose answer lets the next chunk go.
/// Returns once the last inject was answered (everything sent is committed or
/// delivered). The injects are messages too: n + ceil(n / chunk) in all.
long send_through(caf::actor_system& sys, const caf::actor& router, long first, long n, long chunk) {
  struct source_state {
    long next = 0;
    long end = 0;
    long sent = 0;
  };
  std::promise<long> done;
  auto fut = done.get_future();
  auto source = sys.spawn([router, first, n, chunk, &done](caf::event_based_actor* self) -> caf::behavior {
    auto st = std::make_shared<source_state>();
    st->next = first;
    st->end = first + n;
    auto step = std::make_shared<std::function<void()>>();
    *step = [self, router, chunk, st, step, &done] {
      const long stop = std::min(st->end, st->next + chunk);
      for (; st->next < stop; ++st->next, ++st->sent)
        self->send(router, atoms::route_msg::value, make_message(st->next));
      ++st->sent;
      self->request(router, caf::infinite, atoms::inject::value, make_message(-1))
        .then(
          [st, step, &done](std::uint64_t) {
            if (st->next < st->end)
              (*step)();
            else
              done.set_value(st->sent);
          },
          [](caf::error& e) { die(bench_name, "inject: " + to_string(e)); });
    };
    return {[step](atoms::tick) { (*step)(); },
            [step](atoms::stop) { *step = nullptr; }};  // breaks the cycle step -> step
  });
  caf::anon_send(source, atoms::tick::value);
  const long sent = fut.get();
  caf::scoped_actor self{sys};
  self->send(source, atoms::stop::value);
  stop_and_wait(self, source);
  return sent;
}

}  // namespace

int main(int argc, char** argv) {
  const long n = arg(argc, argv, "messages", 1'000'000);
  const long chunk = arg(argc, argv, "chunk", 10'000);
  const long warmup = arg(argc, argv, "warmup", 10'000);
  temp_dir dir(bench_name);
  caf::actor_system_config cfg;
  cfg.set("logger.verbosity", caf::atom("quiet"));
  caf::actor_system sys{cfg};
  system_clock clk;
  caf::scoped_actor self{sys};

  // Empty queue: the module is up and takes everything.
  auto router = start_router(sys, open_shared_store(bench_name, dir.path), clk, routes(),
                             router_config_from_args(argc, argv));
  receiver_control ctl;
  ctl.expected = warmup + (warmup + chunk - 1) / chunk;
  auto arrived = ctl.done.get_future();
  auto rcv = sys.spawn(bench_receiver, std::string{module_name}, router, &ctl);
  self->send(router, atoms::module_up::value, std::string{module_name}, rcv);
  send_through(sys, router, 0, warmup, chunk);
  arrived.get();
  if (auto m = metrics_or_die(bench_name, self, router); queue_length(m, endpoint) != 0)
    die(bench_name, "the queue is not empty after the warm-up");
  stop_and_wait(self, rcv);
  const double rss_empty = rss_mb();
  const double rss_empty_trimmed = trimmed_rss_mb();
  std::printf("empty queue: rss %.1f MB (%.1f MB after malloc_trim)\n", rss_empty, rss_empty_trimmed);
  std::fflush(stdout);

  // The backlog: the module is down (the router saw it go).
  const auto b0 = bench_clock::now();
  const long queued = send_through(sys, router, warmup, n, chunk);
  const double send_s = std::chrono::duration<double>(bench_clock::now() - b0).count();
  auto m = metrics_or_die(bench_name, self, router);
  if (queue_length(m, endpoint) != queued)
    die(bench_name, "backlog of " + std::to_string(queue_length(m, endpoint)) + ", expected " +
                      std::to_string(queued));
  const double rss_backlog = rss_mb();
  const double rss_backlog_trimmed = trimmed_rss_mb();
  std::printf("backlog of %ld (sent in %.1f s): rss %.1f MB (%.1f MB after malloc_trim); file %.1f MB\n",
              queued, send_s, rss_backlog, rss_backlog_trimmed,
              static_cast<double>(m.store_bytes) / (1024.0 * 1024.0));
  std::fflush(stdout);

  // After a restart: a new router over the reopened store resumes the lane.
  stop_and_wait(self, router);
  router = start_router(sys, open_shared_store(bench_name, dir.path), clk, routes(),
                        router_config_from_args(argc, argv));
  m = metrics_or_die(bench_name, self, router);
  if (queue_length(m, endpoint) != queued)
    die(bench_name, "reopened backlog of " + std::to_string(queue_length(m, endpoint)) +
                      ", expected " + std::to_string(queued));
  const double rss_reopened = rss_mb();
  const double rss_reopened_trimmed = trimmed_rss_mb();
  std::printf("backlog of %ld after a restart: rss %.1f MB (%.1f MB after malloc_trim)\n", queued,
              rss_reopened, rss_reopened_trimmed);
  stop_and_wait(self, router);

  const double worst = std::max(rss_backlog, rss_reopened);
  const double worst_trimmed = std::max(rss_backlog_trimmed, rss_reopened_trimmed);
  std::printf(
    "RESULT bench-backlog-memory delta_mb=%.1f rss_empty_mb=%.1f rss_backlog_mb=%.1f "
    "rss_reopened_mb=%.1f ratio=%.2f trimmed_delta_mb=%.1f messages=%ld\n",
    worst - rss_empty, rss_empty, rss_backlog, rss_reopened, worst / rss_empty,
    worst_trimmed - rss_empty_trimmed, queued);
  return 0;
}
