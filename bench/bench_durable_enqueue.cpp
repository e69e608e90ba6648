// bench-durable-enqueue: durable enqueue of 100-byte messages through
// message_store, in batches of 1000 per transaction as the router's group
// commit will write them (one message row + one queue row each, WAL,
// synchronous=FULL), against a raw SQLite insert loop of 200-byte rows on the
// same disk (WAL, synchronous=FULL, 1000 rows per transaction), measured in the
// same run. Best of --rounds rounds, each on fresh files.
//   RESULT bench-durable-enqueue msgs_per_s=... raw_rows_per_s=... ratio=...
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

double through_store(long n, long batch_size) {
  temp_dir dir(bench_name);
  auto store = open_store(bench_name, dir.path);
  const std::vector<route_target> targets = {{"/modules/filter/inputs/in", 0, {}}};
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

double raw_sqlite(long n, long batch_size) {
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
  const std::string row(200, 'r');
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
  double best_store = 0, best_raw = 0;
  for (long i = 0; i < rounds; ++i) {
    // Alternate the order so that neither side always runs on a warmer disk.
    if (i % 2 == 0) {
      best_raw = std::max(best_raw, raw_sqlite(n, batch));
      best_store = std::max(best_store, through_store(n, batch));
    } else {
      best_store = std::max(best_store, through_store(n, batch));
      best_raw = std::max(best_raw, raw_sqlite(n, batch));
    }
    std::printf("round %ld: best raw %.0f rows/s, best store %.0f msg/s\n", i + 1, best_raw,
                best_store);
    std::fflush(stdout);
  }
  std::printf(
    "RESULT bench-durable-enqueue msgs_per_s=%.0f raw_rows_per_s=%.0f ratio=%.2f messages=%ld "
    "batch=%ld\n",
    best_store, best_raw, best_store / best_raw, n, batch);
  return 0;
}
