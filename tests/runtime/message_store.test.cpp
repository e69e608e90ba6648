#include "runtime/message_store.hpp"

#include "runtime/store.hpp"
#include "temp_dir.hpp"

#include <catch2/catch.hpp>

#include "sqlite_inspect.hpp"

#include <sqlite3.h>
#include <canopy/message.hpp>

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>
#include <string>
#include <vector>

using namespace canopy;
using namespace std::chrono_literals;
namespace fs = std::filesystem;

namespace {

using canopy::unit_test::temp_dir;

std::unique_ptr<message_store> open_ok(const std::string& dir, message_store_options opts = {}) {
  auto s = message_store::open(dir, opts);
  INFO((s ? std::string() : s.err().message));
  REQUIRE(s.ok());
  return std::move(s).value();
}

message make_message(const std::string& body) {
  return message_builder().body(body).message_id(body).property("k", "v").build();
}

/// A batch that owns the targets its entries point to (spans into `targets`
/// stay valid when the batch is moved: a vector's move keeps its buffer).
struct test_batch {
  std::vector<route_target> targets;
  std::vector<append_entry> items;
  operator std::span<const append_entry>() const { return items; }
  append_entry& operator[](std::size_t i) { return items[i]; }
};

/// `n` messages with bodies prefix<first>, prefix<first+1>, ..., each to `targets`.
test_batch entries(std::size_t n, std::vector<route_target> targets,
                   const std::string& prefix = "m", std::size_t first = 0) {
  test_batch out;
  out.targets = std::move(targets);
  for (std::size_t i = 0; i < n; ++i)
    out.items.push_back({make_message(prefix + std::to_string(first + i)),
                         {"", "sensor", "temp"},  // device, module, output
                         std::span<const route_target>(out.targets)});
  return out;
}

append_result append_ok(message_store& s, std::span<const append_entry> batch) {
  auto r = s.append(batch);
  INFO((r ? std::string() : r.err().message));
  REQUIRE(r.ok());
  return *r;
}

std::vector<queued_message> read_ok(message_store& s, std::string_view ep, int prio,
                                    std::int64_t after, std::size_t limit) {
  auto r = s.read(ep, prio, after, limit);
  INFO((r ? std::string() : r.err().message));
  REQUIRE(r.ok());
  return std::move(r).value();
}

void ack_ok(message_store& s, std::string_view ep, int prio, std::int64_t seq) {
  auto r = s.ack(ep, prio, seq);
  INFO((r ? std::string() : r.err().message));
  REQUIRE(r.ok());
}

using canopy::unit_test::query_int;
using canopy::unit_test::query_text;

const route_target to_a{"/modules/a/inputs/in", 0, 0ms};

}  // namespace

// -- open ------------------------------------------------------------------------

TEST_CASE("message_store: open creates messages.db in WAL mode with the current schema",
          "[message_store]") {
  temp_dir tmp;
  const std::string dir = tmp.path + "/nested/data";
  auto s = open_ok(dir);
  CHECK(s->path() == dir + "/messages.db");
  CHECK(fs::exists(s->path()));
  CHECK(query_text(s->path(), "PRAGMA journal_mode") == "wal");
  CHECK(query_int(s->path(), "PRAGMA auto_vacuum") == 0);
  CHECK(query_int(s->path(), "PRAGMA user_version") == message_store::current_schema_version);
  CHECK(s->lanes().empty());
  CHECK(s->queue_length("x", 0) == 0);
  auto size = s->size();
  REQUIRE(size.ok());
  CHECK(size->file_bytes > 0);
  CHECK(size->limit_bytes == 0);
}

TEST_CASE("message_store: bad options and in-memory paths are refused", "[message_store]") {
  temp_dir tmp;
  auto mem = message_store::open_file(":memory:");
  REQUIRE_FALSE(mem.ok());
  CHECK(mem.err().code == errc::invalid_argument);
  CHECK_FALSE(message_store::open("").ok());

  message_store_options small;
  small.max_bytes = 4096;
  auto r = message_store::open(tmp.path, small);
  REQUIRE_FALSE(r.ok());
  CHECK(r.err().code == errc::invalid_argument);
  CHECK_THAT(r.err().message, Catch::Contains("max_bytes"));

  message_store_options ttl;
  ttl.default_ttl = 0ms;
  auto t = message_store::open(tmp.path, ttl);
  REQUIRE_FALSE(t.ok());
  CHECK(t.err().code == errc::invalid_argument);
  CHECK_THAT(t.err().message, Catch::Contains("default_ttl"));
}

TEST_CASE("message_store: a file that is not a database is an error naming it", "[message_store]") {
  temp_dir tmp;
  const std::string file = tmp.path + "/messages.db";
  {
    std::ofstream out(file, std::ios::binary);
    for (int i = 0; i < 1000; ++i)
      out << "this is not an sqlite database ";
  }
  auto r = message_store::open(tmp.path);
  REQUIRE_FALSE(r.ok());
  CHECK(r.err().code == errc::store_error);
  CHECK_THAT(r.err().message, Catch::Contains(file));
}

TEST_CASE("message_store: a corrupt file is an error at open, never a fresh start",
          "[message_store]") {
  temp_dir tmp;
  std::string file;
  {
    auto s = open_ok(tmp.path);
    file = s->path();
    const route_target t = to_a;
    for (int i = 0; i < 5; ++i)
      append_ok(*s, entries(200, {t}, "body-that-takes-some-room-"));
  }
  // Move the WAL into the file, then overwrite pages in the middle.
  {
    sqlite3* db = nullptr;
    REQUIRE(sqlite3_open(file.c_str(), &db) == SQLITE_OK);
    sqlite3_exec(db, "PRAGMA wal_checkpoint(TRUNCATE)", nullptr, nullptr, nullptr);
    sqlite3_close(db);
  }
  const auto len = fs::file_size(file);
  REQUIRE(len > 16 * 4096);
  {
    std::fstream f(file, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(static_cast<std::streamoff>(len / 2));
    std::string junk(3 * 4096, '\x5a');
    f.write(junk.data(), static_cast<std::streamsize>(junk.size()));
  }
  auto r = message_store::open(tmp.path);
  REQUIRE_FALSE(r.ok());
  CHECK(r.err().code == errc::store_error);
  CHECK_THAT(r.err().message, Catch::Contains(file));
}

TEST_CASE("message_store: single-destination messages live in their queue row; a dangling reference is an error",
          "[message_store]") {
  temp_dir tmp;
  auto s = open_ok(tmp.path);
  append_ok(*s, entries(3, {to_a}, "one-"));
  append_ok(*s, entries(1, {to_a, {"/modules/b/inputs/in", 0, 0ms}}, "two-"));
  CHECK(query_int(s->path(), "SELECT count(*) FROM messages") == 1);  // only the shared one
  CHECK(query_int(s->path(), canopy::unit_test::count_stored_messages) == 4);
  auto w = read_ok(*s, to_a.endpoint, 0, 0, 10);
  REQUIRE(w.size() == 4);
  for (int i = 0; i < 3; ++i) {
    auto m = w[static_cast<std::size_t>(i)].decode();
    REQUIRE(m.ok());
    CHECK(m->body() == "one-" + std::to_string(i));
  }
  CHECK(w[3].decode()->body() == "two-0");
  // Acknowledging releases inline rows without touching `messages`, and the
  // shared row only with its last reference.
  ack_ok(*s, to_a.endpoint, 0, 4);
  CHECK(query_int(s->path(), "SELECT refs FROM messages") == 1);
  // A queue row whose shared message is gone is reported, not skipped.
  {
    sqlite3* db = nullptr;
    REQUIRE(sqlite3_open(s->path().c_str(), &db) == SQLITE_OK);
    REQUIRE(sqlite3_exec(db, "DELETE FROM messages", nullptr, nullptr, nullptr) == SQLITE_OK);
    sqlite3_close(db);
  }
  auto bad = s->read("/modules/b/inputs/in", 0, 0, 10);
  REQUIRE_FALSE(bad.ok());
  CHECK(bad.err().code == errc::store_error);
  CHECK_THAT(bad.err().message, Catch::Contains("missing message id 4"));
}

TEST_CASE("message_store: another application's database is refused", "[message_store]") {
  temp_dir tmp;
  {
    auto ns = node_store::open(tmp.path);
    REQUIRE(ns.ok());
  }
  // node_store's file, opened as a message store.
  auto r = message_store::open_file(tmp.path + "/canopy.db");
  REQUIRE_FALSE(r.ok());
  CHECK(r.err().code == errc::incompatible);
  CHECK_THAT(r.err().message, Catch::Contains("canopy.db"));

  // A foreign SQLite file with tables of its own.
  const std::string other = tmp.path + "/other.db";
  {
    sqlite3* db = nullptr;
    REQUIRE(sqlite3_open(other.c_str(), &db) == SQLITE_OK);
    REQUIRE(sqlite3_exec(db, "CREATE TABLE t (x)", nullptr, nullptr, nullptr) == SQLITE_OK);
    sqlite3_close(db);
  }
  auto o = message_store::open_file(other);
  REQUIRE_FALSE(o.ok());
  CHECK(o.err().code == errc::incompatible);
}

TEST_CASE("message_store: a file has one owner at a time", "[message_store]") {
  temp_dir tmp;
  auto first = open_ok(tmp.path);
  auto second = message_store::open(tmp.path);
  REQUIRE_FALSE(second.ok());
  CHECK(second.err().code == errc::store_error);
  CHECK_THAT(second.err().message, Catch::Contains("in use"));
  CHECK_THAT(second.err().message, Catch::Contains(first->path()));
  first.reset();
  CHECK(message_store::open(tmp.path).ok());
}

TEST_CASE("message_store: a data dir that cannot be created is an io_error", "[message_store]") {
  temp_dir tmp;
  const std::string file = tmp.path + "/plain-file";
  std::ofstream(file) << "x";
  auto r = message_store::open(file + "/sub");
  REQUIRE_FALSE(r.ok());
  CHECK(r.err().code == errc::io_error);
  CHECK_THAT(r.err().message, Catch::Contains("plain-file"));
}

// -- append and read -------------------------------------------------------------

TEST_CASE("message_store: append then read returns the bytes, source and seqs", "[message_store]") {
  temp_dir tmp;
  manual_clock clk;
  message_store_options opts;
  opts.wall_clock = &clk;
  auto s = open_ok(tmp.path, opts);

  auto batch = entries(10, {to_a});
  auto r = append_ok(*s, batch);
  CHECK(r.first_id == 1);
  CHECK(r.last_id == 10);
  CHECK(r.count() == 10);
  CHECK(s->queue_length(to_a.endpoint, 0) == 10);
  CHECK(s->counters().appended == 10);
  CHECK(s->counters().commits == 1);

  auto w = read_ok(*s, to_a.endpoint, 0, 0, 4);
  REQUIRE(w.size() == 4);
  for (std::size_t i = 0; i < w.size(); ++i) {
    CHECK(w[i].seq == static_cast<std::int64_t>(i + 1));
    CHECK(w[i].id == static_cast<std::int64_t>(i + 1));
    CHECK(w[i].source_module == "sensor");
    CHECK(w[i].source_output == "temp");
    CHECK(w[i].source_device.empty());
    CHECK(w[i].enqueued_ms == clk.wall_ms());
    CHECK(w[i].expiry_ms == clk.wall_ms() + 2 * 3600 * 1000);  // the default TTL
    CHECK(w[i].encoded == batch[i].msg.encoded());
    auto m = w[i].decode();
    REQUIRE(m.ok());
    CHECK(m->body() == "m" + std::to_string(i));
    CHECK(m->property("k") == "v");
  }
  auto rest = read_ok(*s, to_a.endpoint, 0, 4, 100);
  REQUIRE(rest.size() == 6);
  CHECK(rest.front().seq == 5);
  CHECK(rest.back().seq == 10);
  // Reading does not consume.
  CHECK(s->queue_length(to_a.endpoint, 0) == 10);
  CHECK(read_ok(*s, "unknown", 0, 0, 10).empty());
  CHECK(read_ok(*s, to_a.endpoint, 0, 0, 0).empty());

  auto r2 = append_ok(*s, entries(3, {to_a}, "n"));
  CHECK(r2.first_id == 11);
  CHECK(r2.last_id == 13);
  CHECK(s->counters().commits == 2);
  CHECK(s->append({}).ok());
}

TEST_CASE("message_store: priorities are separate lanes with their own seqs", "[message_store]") {
  temp_dir tmp;
  auto s = open_ok(tmp.path);
  const route_target hi{"$upstream", 0, 0ms};
  const route_target lo{"$upstream", 7, 0ms};
  append_ok(*s, entries(3, {hi}, "hi"));
  append_ok(*s, entries(2, {lo}, "lo"));
  append_ok(*s, entries(1, {hi}, "hi", 3));
  CHECK(s->queue_length("$upstream", 0) == 4);
  CHECK(s->queue_length("$upstream", 7) == 2);
  auto h = read_ok(*s, "$upstream", 0, 0, 10);
  REQUIRE(h.size() == 4);
  CHECK(h[3].seq == 4);
  CHECK(h[3].id == 6);
  auto l = read_ok(*s, "$upstream", 7, 0, 10);
  REQUIRE(l.size() == 2);
  CHECK(l[0].seq == 1);
  CHECK(l[0].id == 4);
  auto lanes = s->lanes();
  REQUIRE(lanes.size() == 2);
  CHECK(lanes[0].endpoint == "$upstream");
  CHECK(lanes[0].priority == 0);
  CHECK(lanes[0].last_seq == 4);
  CHECK(lanes[1].priority == 7);
  CHECK(lanes[1].length == 2);
}

TEST_CASE("message_store: invalid entries are refused and nothing is written", "[message_store]") {
  temp_dir tmp;
  auto s = open_ok(tmp.path);
  append_ok(*s, entries(2, {to_a}));

  auto check_refused = [&](const std::vector<route_target>& bad, const std::string& what) {
    auto batch = entries(3, {to_a});
    batch[2].targets = std::span<const route_target>(bad);
    auto r = s->append(batch);
    REQUIRE_FALSE(r.ok());
    CHECK(r.err().code == errc::invalid_argument);
    CHECK_THAT(r.err().message, Catch::Contains("entry 2"));
    CHECK_THAT(r.err().message, Catch::Contains(what));
  };
  check_refused({}, "targets is empty");
  check_refused({{"", 0, 0ms}}, "endpoint is empty");
  check_refused({to_a, {"x", 10, 0ms}}, "priority 10");
  check_refused({{"x", -1, 0ms}}, "priority -1");
  check_refused({{"x", 0, -5ms}}, "ttl is negative");

  CHECK(s->queue_length(to_a.endpoint, 0) == 2);
  CHECK(s->counters().appended == 2);
  CHECK(s->lanes().size() == 1);
  CHECK(query_int(s->path(), canopy::unit_test::count_stored_messages) == 2);
  auto r = append_ok(*s, entries(1, {to_a}));
  CHECK(r.first_id == 3);
}

// -- fan-out, ack, reclaim -------------------------------------------------------

TEST_CASE("message_store: fan-out stores a message once and reclaims it after every ack",
          "[message_store]") {
  temp_dir tmp;
  auto s = open_ok(tmp.path);
  const std::vector<route_target> three = {
    {"/modules/a/inputs/in", 0, 0ms}, {"/modules/b/inputs/in", 0, 0ms}, {"$upstream", 2, 0ms}};
  auto batch = entries(1, three, "fan");
  auto r = append_ok(*s, batch);
  CHECK(r.first_id == 1);
  CHECK(query_int(s->path(), canopy::unit_test::count_stored_messages) == 1);
  CHECK(query_int(s->path(), "SELECT count(*) FROM queue") == 3);
  CHECK(s->counters().queued == 3);
  for (const auto& t : three) {
    auto w = read_ok(*s, t.endpoint, t.priority, 0, 10);
    REQUIRE(w.size() == 1);
    CHECK(w[0].id == 1);
    CHECK(w[0].seq == 1);
    CHECK(w[0].encoded == batch[0].msg.encoded());
  }
  ack_ok(*s, three[0].endpoint, 0, 1);
  CHECK(query_int(s->path(), canopy::unit_test::count_stored_messages) == 1);
  CHECK(query_int(s->path(), "SELECT refs FROM messages WHERE id = 1") == 2);
  const lane_ack both[] = {{three[1].endpoint, 0, 1}, {"$upstream", 2, 1}};
  REQUIRE(s->ack_many(both).ok());
  CHECK(query_int(s->path(), canopy::unit_test::count_stored_messages) == 0);
  CHECK(query_int(s->path(), "SELECT count(*) FROM queue") == 0);
  CHECK(s->counters().acked == 3);
  for (const auto& t : three)
    CHECK(s->queue_length(t.endpoint, t.priority) == 0);
}

TEST_CASE("message_store: ack moves the checkpoint, which survives a reopen", "[message_store]") {
  temp_dir tmp;
  {
    auto s = open_ok(tmp.path);
    append_ok(*s, entries(10, {to_a}));
    ack_ok(*s, to_a.endpoint, 0, 4);
    CHECK(s->checkpoint(to_a.endpoint, 0) == 4);
    CHECK(s->queue_length(to_a.endpoint, 0) == 6);
    // At or below the checkpoint: nothing changes.
    ack_ok(*s, to_a.endpoint, 0, 2);
    CHECK(s->checkpoint(to_a.endpoint, 0) == 4);
    // Errors, and ack_many is all or nothing.
    auto past = s->ack(to_a.endpoint, 0, 11);
    REQUIRE_FALSE(past.ok());
    CHECK(past.err().code == errc::invalid_argument);
    CHECK_THAT(past.err().message, Catch::Contains("last seq 10"));
    auto unknown = s->ack("nobody", 0, 1);
    REQUIRE_FALSE(unknown.ok());
    CHECK(unknown.err().code == errc::not_found);
    const lane_ack mixed[] = {{to_a.endpoint, 0, 8}, {"nobody", 3, 1}};
    auto m = s->ack_many(mixed);
    REQUIRE_FALSE(m.ok());
    CHECK_THAT(m.err().message, Catch::Contains("ack 1"));
    CHECK(s->checkpoint(to_a.endpoint, 0) == 4);
    CHECK(s->queue_length(to_a.endpoint, 0) == 6);
  }
  auto s = open_ok(tmp.path);
  CHECK(s->checkpoint(to_a.endpoint, 0) == 4);
  CHECK(s->queue_length(to_a.endpoint, 0) == 6);
  auto w = read_ok(*s, to_a.endpoint, 0, s->checkpoint(to_a.endpoint, 0), 100);
  REQUIRE(w.size() == 6);
  CHECK(w.front().seq == 5);
  // Reading from before the checkpoint returns only what was not acknowledged.
  CHECK(read_ok(*s, to_a.endpoint, 0, 0, 100).size() == 6);
}

TEST_CASE("message_store: ids and seqs are never reused, even after everything was acked",
          "[message_store]") {
  temp_dir tmp;
  {
    auto s = open_ok(tmp.path);
    append_ok(*s, entries(5, {to_a}));
    ack_ok(*s, to_a.endpoint, 0, 5);
    CHECK(query_int(s->path(), canopy::unit_test::count_stored_messages) == 0);
  }
  auto s = open_ok(tmp.path);
  CHECK(s->queue_length(to_a.endpoint, 0) == 0);
  auto r = append_ok(*s, entries(1, {to_a}));
  CHECK(r.first_id == 6);
  auto w = read_ok(*s, to_a.endpoint, 0, 0, 10);
  REQUIRE(w.size() == 1);
  CHECK(w[0].seq == 6);
}

TEST_CASE("message_store: appending and acking 100k messages does not grow the file",
          "[message_store]") {
  // Reclaim relies on SQLite's freelist (auto_vacuum = NONE): pages freed by
  // acks are reused by later appends, so the file stays at the backlog's
  // high-water mark instead of growing with history.
  temp_dir tmp;
  auto s = open_ok(tmp.path);
  const std::vector<route_target> two = {to_a, {"$upstream", 1, 0ms}};
  std::int64_t pages_at_20k = 0;
  const std::string body(100, 'x');
  for (int round = 0; round < 100; ++round) {
    auto batch = entries(1000, two, body, static_cast<std::size_t>(round) * 1000);
    auto r = append_ok(*s, batch);
    const lane_ack acks[] = {{to_a.endpoint, 0, r.last_id}, {"$upstream", 1, r.last_id}};
    REQUIRE(s->ack_many(acks).ok());
    if (round == 19)
      pages_at_20k = s->size()->file_bytes;
  }
  auto size = s->size();
  REQUIRE(size.ok());
  INFO("file bytes after 20k: " << pages_at_20k << ", after 100k: " << size->file_bytes);
  CHECK(size->file_bytes <= pages_at_20k + 8 * 4096);
  CHECK(query_int(s->path(), canopy::unit_test::count_stored_messages) == 0);
  CHECK(s->counters().acked == 200000);
  // The file holds far less than the 100k messages (~25 MB) went through it.
  CHECK(size->file_bytes < 4 * 1024 * 1024);
}

// -- TTL --------------------------------------------------------------------------

TEST_CASE("message_store: expired messages are skipped by read, dropped and counted",
          "[message_store]") {
  temp_dir tmp;
  manual_clock clk;
  message_store_options opts;
  opts.wall_clock = &clk;
  opts.default_ttl = 10s;
  auto s = open_ok(tmp.path, opts);
  const route_target dflt{"d", 0, 0ms};
  const route_target minute{"m", 0, 60s};
  const route_target forever{"f", 0, message_store_options::no_expiry};
  append_ok(*s, entries(5, {dflt, minute, forever}));

  clk.advance(9999ms);
  CHECK(read_ok(*s, "d", 0, 0, 100).size() == 5);
  clk.advance(1ms);  // now == expiry: expired
  CHECK(read_ok(*s, "d", 0, 0, 100).empty());
  CHECK(s->dropped(drop_reason::ttl_expiry) == 5);
  CHECK(s->queue_length("d", 0) == 0);
  CHECK(read_ok(*s, "m", 0, 0, 100).size() == 5);
  CHECK(query_int(s->path(), "SELECT count(*) FROM queue") == 10);

  clk.advance(50s);
  CHECK(read_ok(*s, "m", 0, 0, 100).empty());
  CHECK(s->dropped(drop_reason::ttl_expiry) == 10);
  auto f = read_ok(*s, "f", 0, 0, 100);
  REQUIRE(f.size() == 5);
  CHECK(f[0].expiry_ms == 0);
  CHECK(s->queue_length("f", 0) == 5);
  // The messages still live for "f".
  CHECK(query_int(s->path(), canopy::unit_test::count_stored_messages) == 5);
  ack_ok(*s, "f", 0, 5);
  CHECK(query_int(s->path(), canopy::unit_test::count_stored_messages) == 0);
}

TEST_CASE("message_store: read skips expired rows between live ones and fills its window",
          "[message_store]") {
  temp_dir tmp;
  manual_clock clk;
  message_store_options opts;
  opts.wall_clock = &clk;
  auto s = open_ok(tmp.path, opts);
  const std::vector<route_target> short_ttl = {{"e", 3, 1s}};
  const std::vector<route_target> long_ttl = {{"e", 3, 100s}};
  // 10000 short-lived rows, then live ones interleaved with short-lived ones.
  append_ok(*s, entries(10000, short_ttl, "s"));
  for (int i = 0; i < 10; ++i) {
    append_ok(*s, entries(1, long_ttl, "live", static_cast<std::size_t>(i)));
    append_ok(*s, entries(1, short_ttl, "s"));
  }
  clk.advance(2s);
  auto w = read_ok(*s, "e", 3, 0, 4);
  REQUIRE(w.size() == 4);
  CHECK(w[0].seq == 10001);
  CHECK(w[1].seq == 10003);
  CHECK(w[3].seq == 10007);
  CHECK(w[0].decode()->body() == "live0");
  CHECK(s->dropped(drop_reason::ttl_expiry) == 10003);
  auto rest = read_ok(*s, "e", 3, w.back().seq, 100);
  REQUIRE(rest.size() == 6);
  CHECK(rest.back().decode()->body() == "live9");
  CHECK(s->dropped(drop_reason::ttl_expiry) == 10010);
  CHECK(s->queue_length("e", 3) == 10);
}

TEST_CASE("message_store: expire() drops expired rows from lanes nobody reads", "[message_store]") {
  temp_dir tmp;
  manual_clock clk;
  message_store_options opts;
  opts.wall_clock = &clk;
  auto s = open_ok(tmp.path, opts);
  append_ok(*s, entries(3000, {{"away", 0, 5s}}));
  append_ok(*s, entries(2, {{"away", 0, 50s}}));
  append_ok(*s, entries(7, {{"other", 1, 5s}}));
  clk.advance(6s);
  auto partial = s->expire(1000);
  REQUIRE(partial.ok());
  CHECK(*partial == 1000);
  auto n = s->expire();
  REQUIRE(n.ok());
  CHECK(*n == 2007);
  CHECK(s->dropped(drop_reason::ttl_expiry) == 3007);
  CHECK(s->queue_length("away", 0) == 2);
  CHECK(s->queue_length("other", 1) == 0);
  CHECK(query_int(s->path(), canopy::unit_test::count_stored_messages) == 2);
  auto again = s->expire();
  REQUIRE(again.ok());
  CHECK(*again == 0);
}

TEST_CASE("message_store: expire() leaves the rows before a caller's cursor alone", "[message_store]") {
  temp_dir tmp;
  manual_clock clk;
  message_store_options opts;
  opts.wall_clock = &clk;
  auto s = open_ok(tmp.path, opts);
  append_ok(*s, entries(10, {{"held", 0, 5s}}));
  append_ok(*s, entries(4, {{"free", 0, 5s}}));
  clk.advance(6s);
  // Rows 1..6 of "held" are in the caller's memory window: not touched.
  auto n = s->expire(100000, [](std::string_view ep, int) -> std::int64_t { return ep == "held" ? 6 : 0; });
  REQUIRE(n.ok());
  CHECK(*n == 4 + 4);
  CHECK(s->queue_length("held", 0) == 6);
  CHECK(s->queue_length("free", 0) == 0);
}

TEST_CASE("message_store: delivery marks are persisted with the checkpoints, never move back",
          "[message_store]") {
  temp_dir tmp;
  {
    auto s = open_ok(tmp.path);
    append_ok(*s, entries(10, {to_a}));
    CHECK(s->last_seq(to_a.endpoint, 0) == 10);
    CHECK(s->last_seq("nobody", 0) == 0);
    const lane_ack acks[] = {{to_a.endpoint, 0, 2}};
    const lane_ack marks[] = {{to_a.endpoint, 0, 7}};
    REQUIRE(s->ack_many(acks, marks).ok());
    CHECK(s->delivered_mark(to_a.endpoint, 0) == 7);
    const lane_ack lower[] = {{to_a.endpoint, 0, 5}};
    REQUIRE(s->ack_many({}, lower).ok());
    CHECK(s->delivered_mark(to_a.endpoint, 0) == 7);
    const lane_ack past[] = {{to_a.endpoint, 0, 11}};
    auto bad = s->ack_many({}, past);
    REQUIRE_FALSE(bad.ok());
    CHECK_THAT(bad.err().message, Catch::Contains("delivered mark 0"));
  }
  auto s = open_ok(tmp.path);
  CHECK(s->delivered_mark(to_a.endpoint, 0) == 7);
  CHECK(s->checkpoint(to_a.endpoint, 0) == 2);
  auto lanes = s->lanes();
  REQUIRE(lanes.size() == 1);
  CHECK(lanes[0].delivered == 7);
}

// -- size limit ------------------------------------------------------------------

TEST_CASE("message_store: a full store refuses a batch whole, with a clear error",
          "[message_store]") {
  temp_dir tmp;
  message_store_options opts;
  opts.max_bytes = 256 * 1024;
  auto s = open_ok(tmp.path, opts);
  const std::string body(1000, 'b');
  std::int64_t last_ok = 0;
  error full;
  bool refused = false;
  for (int i = 0; i < 100 && !refused; ++i) {
    auto r = s->append(entries(20, {to_a}, body, static_cast<std::size_t>(i) * 20));
    if (r.ok()) {
      last_ok = r->last_id;
    } else {
      full = r.err();
      refused = true;
    }
  }
  REQUIRE(refused);
  CHECK(full.code == errc::unavailable);
  CHECK_THAT(full.message, Catch::StartsWith("store full: "));
  CHECK_THAT(full.message, Catch::Contains("limit 262144 bytes"));
  CHECK_THAT(full.message, Catch::Contains(s->path()));
  CHECK(s->dropped(drop_reason::store_full) == 20);
  CHECK(last_ok > 0);
  // Nothing of the refused batch was written.
  CHECK(s->queue_length(to_a.endpoint, 0) == last_ok);
  CHECK(query_int(s->path(), canopy::unit_test::count_stored_messages) == last_ok);
  CHECK(query_int(s->path(), "SELECT max(seq) FROM queue") == last_ok);
  auto size = s->size();
  REQUIRE(size.ok());
  CHECK(size->file_bytes <= opts.max_bytes);
  CHECK(size->limit_bytes == opts.max_bytes);

  // Acknowledging frees room; the ids continue after the last committed one.
  ack_ok(*s, to_a.endpoint, 0, last_ok);
  auto again = s->append(entries(20, {to_a}, body));
  REQUIRE(again.ok());
  CHECK(again->first_id == last_ok + 1);
  auto w = read_ok(*s, to_a.endpoint, 0, 0, 100);
  REQUIRE(w.size() == 20);
  CHECK(w[0].seq == last_ok + 1);
}

// -- metrics ---------------------------------------------------------------------

TEST_CASE("message_store: commit latencies of recent appends are kept", "[message_store]") {
  temp_dir tmp;
  auto s = open_ok(tmp.path);
  CHECK(s->commit_latencies().empty());
  CHECK(s->last_commit_latency() == std::chrono::microseconds::zero());
  for (int i = 0; i < 3; ++i)
    append_ok(*s, entries(10, {to_a}));
  auto l = s->commit_latencies();
  REQUIRE(l.size() == 3);
  CHECK(l.back() == s->last_commit_latency());
  CHECK(l.back() > std::chrono::microseconds::zero());
  for (std::size_t i = 0; i < message_store::latency_window; ++i)
    append_ok(*s, entries(1, {to_a}));
  CHECK(s->commit_latencies().size() == message_store::latency_window);
  CHECK(s->counters().commits == static_cast<std::int64_t>(3 + message_store::latency_window));
}

// -- crash safety ----------------------------------------------------------------

namespace {

struct report {
  std::int64_t kind;  // 1 = committed through id `value`; 2 = lane "a" acked to `value`
  std::int64_t value;
};

[[noreturn]] void crash_child(const std::string& dir, int fd) {
  auto s = message_store::open(dir);
  if (!s)
    ::_exit(10);
  const std::vector<route_target> targets = {{"a", 0, 0ms}, {"b", 4, 0ms}};
  std::size_t n = 0;
  for (int batch = 0;; ++batch) {
    std::vector<append_entry> es;
    for (int i = 0; i < 50; ++i, ++n)
      es.push_back({make_message("msg-" + std::to_string(n + 1)),
                    {"", "child", "out"},
                    std::span<const route_target>(targets)});
    auto r = (*s)->append(es);
    if (!r)
      ::_exit(11);
    const report rep{1, r->last_id};
    if (::write(fd, &rep, sizeof rep) != sizeof rep)
      ::_exit(12);
    if (batch % 4 == 3) {
      const std::int64_t to = r->last_id - 100;
      if (!(*s)->ack("a", 0, to))
        ::_exit(13);
      const report ack{2, to};
      if (::write(fd, &ack, sizeof ack) != sizeof ack)
        ::_exit(14);
    }
  }
}

}  // namespace

TEST_CASE("message_store: kill -9 mid-stream loses no committed message nor checkpoint",
          "[message_store][crash]") {
  temp_dir tmp;
  int fds[2];
  REQUIRE(::pipe(fds) == 0);
  const pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    ::close(fds[0]);
    crash_child(tmp.path, fds[1]);
  }
  ::close(fds[1]);

  // Let the child run for a while, then kill it without warning.
  std::int64_t committed = 0;
  std::int64_t acked = 0;
  auto take = [&](const report& r) {
    if (r.kind == 1)
      committed = std::max(committed, r.value);
    if (r.kind == 2)
      acked = std::max(acked, r.value);
  };
  const auto deadline = std::chrono::steady_clock::now() + 5s;
  while (committed < 20000 && std::chrono::steady_clock::now() < deadline) {
    report r{};
    const auto got = ::read(fds[0], &r, sizeof r);
    if (got != sizeof r)
      break;
    take(r);
  }
  REQUIRE(::kill(pid, SIGKILL) == 0);
  int status = 0;
  REQUIRE(::waitpid(pid, &status, 0) == pid);
  REQUIRE(WIFSIGNALED(status));
  // Everything the child reported before it died.
  for (;;) {
    report r{};
    if (::read(fds[0], &r, sizeof r) != sizeof r)
      break;
    take(r);
  }
  ::close(fds[0]);
  INFO("child committed through id " << committed << ", acked lane a to " << acked);
  REQUIRE(committed >= 1000);

  auto s = open_ok(tmp.path);
  CHECK(s->checkpoint("a", 0) >= acked);
  // Lane b was never acknowledged: every committed id is there, in order.
  std::set<std::int64_t> seen;
  std::int64_t after = 0;
  for (;;) {
    auto w = read_ok(*s, "b", 4, after, 5000);
    if (w.empty())
      break;
    for (const auto& q : w) {
      CHECK(q.seq == q.id);
      seen.insert(q.id);
    }
    after = w.back().seq;
    const auto m = w.back().decode();
    REQUIRE(m.ok());
    CHECK(m->body() == "msg-" + std::to_string(w.back().id));
  }
  REQUIRE(!seen.empty());
  CHECK(*seen.begin() == 1);
  CHECK(*seen.rbegin() >= committed);
  CHECK(static_cast<std::int64_t>(seen.size()) == *seen.rbegin());
  // Lane a holds everything after its checkpoint.
  const std::int64_t cp = s->checkpoint("a", 0);
  auto a = read_ok(*s, "a", 0, cp, 1000000);
  REQUIRE_FALSE(a.empty());
  CHECK(a.front().seq == cp + 1);
  CHECK(a.back().seq >= committed);
  CHECK(s->queue_length("a", 0) == static_cast<std::int64_t>(a.size()));
}
