// bench-drain: the router drains a 1,000,000-message backlog of one module
// input to its module when the module comes back. The backlog is appended
// straight into the store's file (1,000 messages per transaction) while the
// module is absent, before any clock starts; then a router starts over that
// data directory (it resumes the stored lane from its checkpoint), a receiver
// that acknowledges as actors/module_host.cpp does (cumulative, every 64
// inputs and when its mailbox drains) announces itself with (module_up, name,
// actor), and the clock runs from that announcement until every message
// arrived, was acknowledged and the router reports the queue empty (stats:
// queue length 0, checkpoint committed). Baseline, same run, same file: a
// read-only SQLite scan of the same message rows copying the same bytes out.
//   RESULT bench-drain msgs_per_s=... scan_rows_per_s=... ratio=...
#include "bench/bench_router.hpp"
#include "bench/bench_store.hpp"
#include "runtime/message_store.hpp"

#include <sqlite3.h>

#include <cstdio>
#include <string>
#include <thread>
#include <vector>

using namespace canopy;
using namespace canopy::bench;

namespace {

constexpr std::string_view bench_name = "bench-drain";

constexpr const char* module_name = "filter";
constexpr const char* endpoint = "/modules/filter/inputs/in";

/// The baseline: every stored message, in order, bytes copied out (a message
/// with one destination is kept in its queue row).
double raw_scan(const std::string& path, long expected, std::size_t& bytes) {
  sqlite3* db = nullptr;
  if (sqlite3_open_v2(path.c_str(), &db, SQLITE_OPEN_READONLY, nullptr) != SQLITE_OK)
    die(bench_name, "cannot open " + path);
  sqlite3_stmt* s = nullptr;
  const char* sql =
    "SELECT seq, enqueued_ms, source_module, source_output, source_device, encoded "
    "FROM queue ORDER BY endpoint_id, priority, seq";
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

/// What drain() measured.
struct drain_result {
  double msgs_per_s = 0;
  double arrived_s = 0;        ///< from module_up until the last message was acknowledged
  double empty_s = 0;          ///< from module_up until stats showed the queue empty
  std::uint64_t sent = 0;      ///< deliveries acknowledged (router's count)
  std::int64_t store_bytes = 0;
  std::int64_t store_free_bytes = 0;
};

drain_result drain(caf::actor_system& sys, std::shared_ptr<message_store> store, long n,
                   router_config rc) {
  system_clock clk;
  auto router = start_router(
    sys, std::move(store), clk,
    compile_or_die(bench_name, {route_spec{"r",
                                           "FROM /messages/modules/sensor/outputs/temp INTO "
                                           "BrokeredEndpoint(\"/modules/filter/inputs/in\")",
                                           0, 0}}),
    std::move(rc));
  caf::scoped_actor self{sys};
  const auto before = metrics_or_die(bench_name, self, router);
  if (queue_length(before, endpoint) != n)
    die(bench_name, "the router resumed " + std::to_string(queue_length(before, endpoint)) +
                      " queued messages, expected " + std::to_string(n));
  receiver_control ctl;
  ctl.expected = n;
  auto arrived = ctl.done.get_future();
  auto rcv = sys.spawn(bench_receiver, std::string{module_name}, router, &ctl);
  const auto t0 = bench_clock::now();
  caf::anon_send(router, atoms::module_up::value, std::string{module_name}, rcv);
  const auto t1 = arrived.get();
  // The receiver sent its last acknowledgement before it reported: the stats
  // request below reaches the router after it, and commits the checkpoint.
  node_metrics m;
  for (;;) {
    m = metrics_or_die(bench_name, self, router);
    if (queue_length(m, endpoint) == 0)
      break;
    if (bench_clock::now() - t1 > std::chrono::seconds(30))
      die(bench_name, "queue still has " + std::to_string(queue_length(m, endpoint)) +
                        " messages after every one arrived");
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  const auto t2 = bench_clock::now();
  stop_and_wait(self, rcv);
  stop_and_wait(self, router);
  drain_result out;
  out.arrived_s = std::chrono::duration<double>(t1 - t0).count();
  out.empty_s = std::chrono::duration<double>(t2 - t0).count();
  out.msgs_per_s = static_cast<double>(n) / out.empty_s;
  out.sent = m.sent;
  out.store_bytes = m.store_bytes;
  out.store_free_bytes = m.store_free_bytes;
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  const long n = arg(argc, argv, "messages", 1'000'000);
  temp_dir dir(bench_name);
  std::string path;
  {
    // The backlog, written while the module is absent (as the router would
    // have stored it: one lane row per message, the route's default TTL).
    auto store = open_store(bench_name, dir.path);
    path = store->path();
    const std::vector<route_target> targets = {{endpoint, 0, {}}};
    const auto f0 = bench_clock::now();
    append_n(bench_name, *store, sample_batch(1000, targets), n);
    const double fill_s = std::chrono::duration<double>(bench_clock::now() - f0).count();
    std::printf("filled %ld messages in %.1f s\n", n, fill_s);
    std::fflush(stdout);
  }

  std::size_t bytes = 0;
  const double scan = raw_scan(path, n, bytes);
  std::printf("raw scan: %.0f rows/s (%zu bytes)\n", scan, bytes);
  std::fflush(stdout);

  caf::actor_system_config cfg;
  cfg.set("logger.verbosity", caf::atom("quiet"));
  caf::actor_system sys{cfg};
  // Reopened as after a restart (quick_check and loading the lanes happen
  // here, before the clock starts).
  const auto r = drain(sys, open_shared_store(bench_name, dir.path), n, router_config_from_args(argc, argv));
  std::printf(
    "drain: all %ld acknowledged after %.2f s, queue empty in stats after %.2f s: %.0f msg/s; "
    "%llu sent; file %lld bytes, %lld free after the drain\n",
    n, r.arrived_s, r.empty_s, r.msgs_per_s, static_cast<unsigned long long>(r.sent), static_cast<long long>(r.store_bytes),
    static_cast<long long>(r.store_free_bytes));
  std::printf(
    "RESULT bench-drain msgs_per_s=%.0f scan_rows_per_s=%.0f ratio=%.2f messages=%ld\n",
    r.msgs_per_s, scan, r.msgs_per_s / scan, n);
  return 0;
}
