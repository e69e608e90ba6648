// bench-durable-enqueue: durable enqueue of 100-byte messages through
// message_store, in batches of 1000 per transaction as the router's group
// commit will write them (one message row + one queue row each, WAL,
// synchronous=FULL), against a raw SQLite insert loop of 200-byte rows on the
// same disk (WAL, synchronous=FULL, 1000 rows per transaction), measured in the
// same run. Best of --rounds rounds, each on fresh files.
//   RESULT bench-durable-enqueue msgs_per_s=... raw_rows_per_s=... ratio=...
#include "bench/bench_common.hpp"
#include "runtime/message_store.hpp"

#include <sqlite3.h>

#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

using namespace canopy;
using namespace canopy::bench;

namespace {

[[noreturn]] void die(const std::string& what) {
  std::fprintf(stderr, "bench-durable-enqueue: %s\n", what.c_str());
  std::exit(1);
}

/// A fresh directory under /tmp, removed at scope end.
struct temp_dir {
  temp_dir() {
    char tmpl[] = "/tmp/canopy-bench-enqueue-XXXXXX";
    if (::mkdtemp(tmpl) == nullptr)
      die("mkdtemp failed");
    path = tmpl;
  }
  ~temp_dir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  temp_dir(const temp_dir&) = delete;
  temp_dir& operator=(const temp_dir&) = delete;
  std::string path;
};

double through_store(long n, long batch_size) {
  temp_dir dir;
  auto store = message_store::open(dir.path);
  if (!store)
    die(store.err().message);
  const std::vector<route_target> targets = {{"/modules/filter/inputs/in", 0, {}}};
  // One batch of distinct 100-byte messages, built before the clock starts
  // (building is the sender's cost) and appended again and again.
  std::vector<append_entry> batch;
  for (long i = 0; i < batch_size; ++i) {
    std::string body(100, 'x');
    std::snprintf(body.data(), body.size(), "%ld", i);
    batch.push_back({message_builder{}.body(body).build(), {"sensor", "temp", ""}, targets});
  }
  const auto t0 = bench_clock::now();
  for (long done = 0; done < n; done += batch_size) {
    const long take = std::min(batch_size, n - done);
    auto r =
      (*store)->append(std::span<const append_entry>(batch.data(), static_cast<std::size_t>(take)));
    if (!r)
      die(r.err().message);
  }
  const auto t1 = bench_clock::now();
  return static_cast<double>(n) / std::chrono::duration<double>(t1 - t0).count();
}

void exec(sqlite3* db, const char* sql) {
  char* err = nullptr;
  if (sqlite3_exec(db, sql, nullptr, nullptr, &err) != SQLITE_OK)
    die(std::string(sql) + ": " + (err != nullptr ? err : "?"));
}

double raw_sqlite(long n, long batch_size) {
  temp_dir dir;
  const std::string path = dir.path + "/raw.db";
  sqlite3* db = nullptr;
  if (sqlite3_open(path.c_str(), &db) != SQLITE_OK)
    die("cannot open " + path);
  exec(db, "PRAGMA journal_mode = WAL");
  exec(db, "PRAGMA synchronous = FULL");
  exec(db, "CREATE TABLE t (id INTEGER PRIMARY KEY, payload BLOB NOT NULL)");
  sqlite3_stmt* ins = nullptr;
  if (sqlite3_prepare_v2(db, "INSERT INTO t (payload) VALUES (?1)", -1, &ins, nullptr) != SQLITE_OK)
    die("prepare");
  const std::string row(200, 'r');
  const auto t0 = bench_clock::now();
  for (long done = 0; done < n; done += batch_size) {
    exec(db, "BEGIN");
    const long take = std::min(batch_size, n - done);
    for (long i = 0; i < take; ++i) {
      sqlite3_bind_blob(ins, 1, row.data(), static_cast<int>(row.size()), SQLITE_STATIC);
      if (sqlite3_step(ins) != SQLITE_DONE)
        die("insert");
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
