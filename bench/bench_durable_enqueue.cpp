// bench-durable-enqueue: durable enqueue of 100-byte messages through the
// router into the message store. A source actor sends them to the router as a
// module host does, (route_msg, routed_message), fire and forget, routed to a
// module input whose module never comes up, so every message is written by the
// router's group commit (WAL, synchronous=FULL); the clock stops when a final
// (inject, message) sent after them is answered: inject replies after the
// commit that holds it, and commits are in order. Baseline, same run, same
// disk: a raw SQLite insert loop of rows of the same size as the stored
// message — its encoded bytes, what a message row holds (`row_bytes`; WAL,
// synchronous=FULL, 1000 rows per transaction). Also printed: the message store alone, appending
// batches of 1000 (store_alone_msgs_per_s), so the router's own cost is
// visible. Best of --rounds rounds, each on fresh files.
//   RESULT bench-durable-enqueue msgs_per_s=... raw_rows_per_s=... ratio=... store_alone_msgs_per_s=...
#include "bench/bench_router.hpp"
#include "bench/bench_store.hpp"
#include "runtime/message_store.hpp"

#include <sqlite3.h>

#include <cstdio>
#include <string>
#include <vector>

using namespace canopy;
using namespace canopy::bench;

namespace {

constexpr std::string_view bench_name = "bench-durable-enqueue";

constexpr const char* endpoint = "/modules/filter/inputs/in";

/// What through_router() measured.
struct router_result {
  double msgs_per_s = 0;
  std::uint64_t commits = 0;
  std::int64_t commit_p50_us = 0;
  std::int64_t commit_p99_us = 0;
};

router_result through_router(caf::actor_system& sys, long n, const std::vector<routed_message>& msgs,
                             const router_config& rc) {
  temp_dir dir(bench_name);
  system_clock clk;
  auto router = start_router(
    sys, open_shared_store(bench_name, dir.path), clk,
    compile_or_die(bench_name,
                   {route_spec{"r",
                               "FROM /messages/modules/sensor/outputs/temp INTO "
                               "BrokeredEndpoint(\"/modules/filter/inputs/in\")",
                               0, 0}}),
    rc);
  caf::scoped_actor self{sys};
  const auto before = metrics_or_die(bench_name, self, router);  // the router is up
  std::promise<bench_clock::time_point> done;
  auto fut = done.get_future();
  auto source = sys.spawn([&msgs, n, router, &done](caf::event_based_actor* src) -> caf::behavior {
    return {[src, &msgs, n, router, &done](atoms::tick) {
      const auto size = static_cast<long>(msgs.size());
      for (long i = 0; i < n; ++i)
        src->send(router, atoms::route_msg::value, msgs[static_cast<std::size_t>(i % size)]);
      src->request(router, caf::infinite, atoms::inject::value, msgs[0])
        .then([&done](std::uint64_t) { done.set_value(bench_clock::now()); },
              [](caf::error& e) { die(bench_name, "inject: " + to_string(e)); });
    }};
  });
  const auto t0 = bench_clock::now();
  caf::anon_send(source, atoms::tick::value);
  const auto t1 = fut.get();
  const auto m = metrics_or_die(bench_name, self, router);
  if (queue_length(m, endpoint) != n + 1)
    die(bench_name, "queue has " + std::to_string(queue_length(m, endpoint)) + " messages, expected " +
                      std::to_string(n + 1));
  stop_and_wait(self, source);
  stop_and_wait(self, router);
  router_result out;
  out.msgs_per_s = static_cast<double>(n + 1) / std::chrono::duration<double>(t1 - t0).count();
  out.commits = m.commits - before.commits;
  out.commit_p50_us = m.commit_p50_us;
  out.commit_p99_us = m.commit_p99_us;
  return out;
}

double through_store(long n, long batch_size) {
  temp_dir dir(bench_name);
  auto store = open_store(bench_name, dir.path);
  const std::vector<route_target> targets = {{endpoint, 0, {}}};
  // One batch of distinct 100-byte messages, built before the clock starts
  // (building is the sender's cost) and appended again and again.
  const std::vector<append_entry> batch = sample_batch(batch_size, targets);
  const auto t0 = bench_clock::now();
  append_n(bench_name, *store, batch, n);
  const auto t1 = bench_clock::now();
  return static_cast<double>(n) / std::chrono::duration<double>(t1 - t0).count();
}

void exec(sqlite3* db, const char* sql) {
  char* err = nullptr;
  if (sqlite3_exec(db, sql, nullptr, nullptr, &err) != SQLITE_OK)
    die(bench_name, std::string(sql) + ": " + (err != nullptr ? err : "?"));
}

double raw_sqlite(long n, long batch_size, std::size_t row_bytes) {
  temp_dir dir(bench_name);
  const std::string path = dir.path + "/raw.db";
  sqlite3* db = nullptr;
  if (sqlite3_open(path.c_str(), &db) != SQLITE_OK)
    die(bench_name, "cannot open " + path);
  exec(db, "PRAGMA journal_mode = WAL");
  exec(db, "PRAGMA synchronous = FULL");
  exec(db, "CREATE TABLE t (id INTEGER PRIMARY KEY, payload BLOB NOT NULL)");
  sqlite3_stmt* ins = nullptr;
  if (sqlite3_prepare_v2(db, "INSERT INTO t (payload) VALUES (?1)", -1, &ins, nullptr) != SQLITE_OK)
    die(bench_name, "prepare");
  const std::string row(row_bytes, 'r');
  const auto t0 = bench_clock::now();
  for (long done = 0; done < n; done += batch_size) {
    exec(db, "BEGIN");
    const long take = std::min(batch_size, n - done);
    for (long i = 0; i < take; ++i) {
      sqlite3_bind_blob(ins, 1, row.data(), static_cast<int>(row.size()), SQLITE_STATIC);
      if (sqlite3_step(ins) != SQLITE_DONE)
        die(bench_name, "insert");
      sqlite3_reset(ins);
    }
    exec(db, "COMMIT");
  }
  const auto t1 = bench_clock::now();
  sqlite3_finalize(ins);
  sqlite3_close(db);
  return static_cast<double>(n) / std::chrono::duration<double>(t1 - t0).count();
}

}  // namespace

int main(int argc, char** argv) {
  const long n = arg(argc, argv, "messages", 1'000'000);
  const long batch = arg(argc, argv, "batch", 1000);
  const long rounds = arg(argc, argv, "rounds", 3);
  caf::actor_system_config cfg;
  cfg.set("logger.verbosity", caf::atom("quiet"));
  caf::actor_system sys{cfg};
  // Distinct 100-byte messages, built before any clock starts and sent again
  // and again (each send is a new routed_message sharing the buffer, as a
  // module host sends it).
  const std::vector<routed_message> msgs = sample_messages(1000);
  // "Same row size": a 100-byte body encodes to this many bytes with its
  // (empty) properties and system properties.
  const std::size_t row_bytes = msgs.front().msg.encoded_size();
  const router_config rc = router_config_from_args(argc, argv);
  double best_store = 0, best_raw = 0;
  router_result best_router;
  for (long i = 0; i < rounds; ++i) {
    // Rotate the order so that no side always runs on a warmer disk.
    router_result r;
    switch (i % 3) {
      case 0:
        best_raw = std::max(best_raw, raw_sqlite(n, batch, row_bytes));
        r = through_router(sys, n, msgs, rc);
        best_store = std::max(best_store, through_store(n, batch));
        break;
      case 1:
        r = through_router(sys, n, msgs, rc);
        best_store = std::max(best_store, through_store(n, batch));
        best_raw = std::max(best_raw, raw_sqlite(n, batch, row_bytes));
        break;
      default:
        best_store = std::max(best_store, through_store(n, batch));
        best_raw = std::max(best_raw, raw_sqlite(n, batch, row_bytes));
        r = through_router(sys, n, msgs, rc);
        break;
    }
    if (r.msgs_per_s > best_router.msgs_per_s)
      best_router = r;
    std::printf(
      "round %ld: router %.0f msg/s (%llu commits, p50 %lld us, p99 %lld us); best raw %.0f rows/s, "
      "best store alone %.0f msg/s\n",
      i + 1, r.msgs_per_s, static_cast<unsigned long long>(r.commits),
      static_cast<long long>(r.commit_p50_us), static_cast<long long>(r.commit_p99_us), best_raw,
      best_store);
    std::fflush(stdout);
  }
  std::printf(
    "RESULT bench-durable-enqueue msgs_per_s=%.0f raw_rows_per_s=%.0f ratio=%.2f "
    "store_alone_msgs_per_s=%.0f store_alone_ratio=%.2f commits=%llu messages=%ld batch=%ld "
    "row_bytes=%zu\n",
    best_router.msgs_per_s, best_raw, best_router.msgs_per_s / best_raw, best_store,
    best_store / best_raw, static_cast<unsigned long long>(best_router.commits), n, batch, row_bytes);
  return 0;
}
