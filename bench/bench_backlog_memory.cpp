// bench-backlog-memory: resident memory of a process whose message_store holds
// a 1,000,000-message backlog on one endpoint (100-byte messages) with only a
// bounded read window in memory, against the same process with an empty
// queue, measured in the same run from /proc/self/statm. The backlog is
// measured twice: right after it was appended, and after the store was closed
// and reopened (as after a restart: lanes and queue lengths loaded from disk).
//   RESULT bench-backlog-memory delta_mb=... rss_empty_mb=... rss_backlog_mb=... ratio=...
#include "bench/bench_store.hpp"
#include "runtime/message_store.hpp"

#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

using namespace canopy;
using namespace canopy::bench;

namespace {

constexpr std::string_view bench_name = "bench-backlog-memory";

/// Resident set size in MiB (second field of /proc/self/statm, in pages).
double rss_mb() {
  std::ifstream in("/proc/self/statm");
  long size = 0, resident = 0;
  if (!(in >> size >> resident))
    die(bench_name, "cannot read /proc/self/statm");
  return static_cast<double>(resident) * static_cast<double>(::sysconf(_SC_PAGESIZE)) /
         (1024.0 * 1024.0);
}

constexpr std::string_view endpoint = "/modules/archiver/inputs/in";

/// Reads the first window after the checkpoint and keeps it (what the router
/// holds in memory while it delivers).
std::vector<queued_message> first_window(message_store& store, long window) {
  auto w = store.read(endpoint, 0, store.checkpoint(endpoint, 0), static_cast<std::size_t>(window));
  if (!w)
    die(bench_name, w.err().message);
  return std::move(w).value();
}

}  // namespace

int main(int argc, char** argv) {
  const long n = arg(argc, argv, "messages", 1'000'000);
  const long window = arg(argc, argv, "window", 1000);
  temp_dir dir(bench_name);

  const std::vector<route_target> targets = {{endpoint, 0, message_store_options::no_expiry}};
  const std::vector<append_entry> batch = sample_batch(1000, targets);

  auto store = open_store(bench_name, dir.path);
  // Empty queue: the same work once (append a window, read it, acknowledge
  // it), so the baseline includes the store's fixed costs.
  {
    auto r =
      store->append(std::span<const append_entry>(batch.data(), static_cast<std::size_t>(window)));
    if (!r)
      die(bench_name, r.err().message);
    auto w = first_window(*store, window);
    if (auto a = store->ack(endpoint, 0, w.back().seq); !a)
      die(bench_name, a.err().message);
  }
  std::vector<queued_message> held = first_window(*store, window);  // empty
  const double rss_empty = rss_mb();
  std::printf("empty queue: rss %.1f MB\n", rss_empty);
  std::fflush(stdout);

  append_n(bench_name, *store, batch, n);
  held = first_window(*store, window);
  if (store->queue_length(endpoint, 0) != n)
    die(bench_name, "backlog has the wrong length");
  const double rss_backlog = rss_mb();
  std::printf("backlog of %ld after appending: rss %.1f MB, window %zu messages\n", n, rss_backlog,
              held.size());
  std::fflush(stdout);

  held.clear();
  store.reset();
  store = open_store(bench_name, dir.path);
  held = first_window(*store, window);
  if (store->queue_length(endpoint, 0) != n)
    die(bench_name, "reopened backlog has the wrong length");
  const double rss_reopened = rss_mb();
  auto size = store->size();
  std::printf("backlog of %ld after reopening: rss %.1f MB; file %.1f MB\n", n, rss_reopened,
              size ? static_cast<double>(size->file_bytes) / (1024.0 * 1024.0) : -1.0);

  const double worst = std::max(rss_backlog, rss_reopened);
  std::printf(
    "RESULT bench-backlog-memory delta_mb=%.1f rss_empty_mb=%.1f rss_backlog_mb=%.1f "
    "rss_reopened_mb=%.1f ratio=%.2f messages=%ld window=%ld\n",
    worst - rss_empty, rss_empty, rss_backlog, rss_reopened, worst / rss_empty, n, window);
  return 0;
}
