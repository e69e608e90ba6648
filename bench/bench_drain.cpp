// bench-drain: drain of a 1,000,000-message backlog on one endpoint, as the
// router will do it when the endpoint comes back: read a window of --window
// messages after the last delivered seq, then acknowledge the window (one
// transaction moving the checkpoint, deleting its queue rows and reclaiming its
// messages), as fast as possible. Baseline, same run, same file: a raw SQLite
// SELECT scan of the same message rows copying the same bytes out (no
// checkpoint, no reclaim). The backlog is filled before the clock starts.
//   RESULT bench-drain msgs_per_s=... scan_rows_per_s=... ratio=...
#include "bench/bench_store.hpp"
#include "runtime/message_store.hpp"

#include <sqlite3.h>

#include <cstdio>
#include <string>
#include <vector>

using namespace canopy;
using namespace canopy::bench;

namespace {

constexpr std::string_view bench_name = "bench-drain";

constexpr std::string_view endpoint = "$upstream";

/// The baseline: every message row, in id order, bytes copied out.
double raw_scan(const std::string& path, long expected, std::size_t& bytes) {
  sqlite3* db = nullptr;
  if (sqlite3_open_v2(path.c_str(), &db, SQLITE_OPEN_READONLY, nullptr) != SQLITE_OK)
    die(bench_name, "cannot open " + path);
  sqlite3_stmt* s = nullptr;
  const char* sql =
    "SELECT id, enqueued_ms, source_module, source_output, source_device, encoded "
    "FROM messages ORDER BY id";
  if (sqlite3_prepare_v2(db, sql, -1, &s, nullptr) != SQLITE_OK)
    die(bench_name, sqlite3_errmsg(db));
  long rows = 0;
  std::vector<std::string> window(1000);
  const auto t0 = bench_clock::now();
  while (sqlite3_step(s) == SQLITE_ROW) {
    std::string& out = window[static_cast<std::size_t>(rows) % window.size()];
    const void* p = sqlite3_column_blob(s, 5);
    out.assign(static_cast<const char*>(p), static_cast<std::size_t>(sqlite3_column_bytes(s, 5)));
    bytes += out.size();
    ++rows;
  }
  const auto t1 = bench_clock::now();
  sqlite3_finalize(s);
  sqlite3_close(db);
  if (rows != expected)
    die(bench_name, "scan saw " + std::to_string(rows) + " rows");
  return static_cast<double>(rows) / std::chrono::duration<double>(t1 - t0).count();
}

double drain(message_store& store, long expected, long window) {
  long delivered = 0;
  std::int64_t after = store.checkpoint(endpoint, 0);
  const auto t0 = bench_clock::now();
  for (;;) {
    auto w = store.read(endpoint, 0, after, static_cast<std::size_t>(window));
    if (!w)
      die(bench_name, w.err().message);
    if (w->empty())
      break;
    delivered += static_cast<long>(w->size());
    after = w->back().seq;
    if (auto r = store.ack(endpoint, 0, after); !r)
      die(bench_name, r.err().message);
  }
  const auto t1 = bench_clock::now();
  if (delivered != expected)
    die(bench_name, "drained " + std::to_string(delivered) + " messages");
  if (store.queue_length(endpoint, 0) != 0)
    die(bench_name, "queue not empty after the drain");
  return static_cast<double>(delivered) / std::chrono::duration<double>(t1 - t0).count();
}

}  // namespace

int main(int argc, char** argv) {
  const long n = arg(argc, argv, "messages", 1'000'000);
  const long window = arg(argc, argv, "window", 1000);
  temp_dir dir(bench_name);
  auto store = open_store(bench_name, dir.path);
  const std::vector<route_target> targets = {{endpoint, 0, message_store_options::no_expiry}};
  const auto f0 = bench_clock::now();
  append_n(bench_name, *store, sample_batch(1000, targets), n);
  const double fill_s = std::chrono::duration<double>(bench_clock::now() - f0).count();
  std::printf("filled %ld messages in %.1f s\n", n, fill_s);
  std::fflush(stdout);

  std::size_t bytes = 0;
  const double scan = raw_scan(store->path(), n, bytes);
  std::printf("raw scan: %.0f rows/s (%zu bytes)\n", scan, bytes);
  std::fflush(stdout);
  const double drained = drain(*store, n, window);
  auto size = store->size();
  std::printf("drain: %.0f msg/s; file %lld bytes, %lld free after the drain\n", drained,
              size ? static_cast<long long>(size->file_bytes) : -1LL,
              size ? static_cast<long long>(size->free_bytes) : -1LL);
  std::printf(
    "RESULT bench-drain msgs_per_s=%.0f scan_rows_per_s=%.0f ratio=%.2f messages=%ld "
    "window=%ld\n",
    drained, scan, drained / scan, n, window);
  return 0;
}
