#include "runtime/store.hpp"

#include "temp_dir.hpp"

#include <catch2/catch.hpp>

#include "sqlite_inspect.hpp"

#include <canopy/message.hpp>
#include <sqlite3.h>

#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>
#include <utility>
#include <vector>

using namespace canopy;
namespace fs = std::filesystem;

namespace {

using canopy::unit_test::temp_dir;

std::unique_ptr<node_store> open_ok(const std::string& dir, const canopy::clock* clk = nullptr) {
  auto s = node_store::open(dir, clk);
  INFO((s ? std::string() : s.err().message));
  REQUIRE(s.ok());
  return std::move(s).value();
}

message make_message(const std::string& body, const std::string& id) {
  return message_builder().body(body).message_id(id).property("k", body).build();
}

/// Runs one SQL text through a separate connection (to inspect the file).
const auto& query_one = canopy::unit_test::query_text;

}  // namespace

TEST_CASE("store: opening a new directory creates the file, WAL, current schema", "[store]") {
  temp_dir tmp;
  const std::string dir = tmp.path + "/nested/data";
  auto store = open_ok(dir);
  CHECK(store->path() == dir + "/canopy.db");
  CHECK(fs::exists(store->path()));
  auto v = store->schema_version();
  REQUIRE(v.ok());
  CHECK(*v == node_store::current_schema_version);
  CHECK(query_one(store->path(), "PRAGMA journal_mode") == "wal");
  auto dep = store->load_deployment();
  REQUIRE(dep.ok());
  CHECK_FALSE(dep->has_value());
  auto states = store->load_module_states();
  REQUIRE(states.ok());
  CHECK(states->empty());
  auto count = store->upstream_count();
  REQUIRE(count.ok());
  CHECK(*count == 0);
  auto last = store->last_upstream_seq();
  REQUIRE(last.ok());
  CHECK(*last == 0);
}

TEST_CASE("store: reopening keeps data and migrations are idempotent", "[store]") {
  temp_dir tmp;
  {
    auto store = open_ok(tmp.path);
    REQUIRE(store->save_reported("sensor", R"({"a":1})").ok());
    REQUIRE(store->save_deployment(R"({"modules":{}})", "/etc/canopy").ok());
  }
  for (int i = 0; i < 3; ++i) {
    auto store = open_ok(tmp.path);
    auto v = store->schema_version();
    REQUIRE(v.ok());
    CHECK(*v == node_store::current_schema_version);
    auto rep = store->load_reported("sensor");
    REQUIRE(rep.ok());
    REQUIRE(rep->has_value());
    CHECK(**rep == R"({"a":1})");
    auto dep = store->load_deployment();
    REQUIRE(dep.ok());
    REQUIRE(dep->has_value());
    CHECK((*dep)->version == 1);
  }
  // Exactly our four tables (plus sqlite_sequence for AUTOINCREMENT).
  CHECK(query_one(tmp.path + "/canopy.db",
                  "SELECT group_concat(name, ',') FROM (SELECT name FROM sqlite_schema "
                  "WHERE type = 'table' ORDER BY name)") ==
        "deployment,module_state,reported,sqlite_sequence,upstream");
}

TEST_CASE("store: two stores on the same file see each other's writes", "[store]") {
  temp_dir tmp;
  auto a = open_ok(tmp.path);
  auto b = open_ok(tmp.path);
  REQUIRE(a->save_reported("m", "{}").ok());
  auto r = b->load_reported("m");
  REQUIRE(r.ok());
  CHECK(r->value_or("") == "{}");
}

TEST_CASE("store: a garbage file is a clear error naming it", "[store]") {
  temp_dir tmp;
  const std::string db = tmp.path + "/canopy.db";
  {
    std::ofstream out(db, std::ios::binary);
    for (int i = 0; i < 512; ++i) out << "this is not an SQLite database ";
  }
  auto s = node_store::open(tmp.path);
  REQUIRE_FALSE(s.ok());
  CHECK(s.err().code == errc::store_error);
  CHECK_THAT(s.err().message, Catch::Contains(db));
  CHECK_THAT(s.err().message, Catch::Contains("file is not a database"));
  // Never replaced by a fresh (or in-memory) database.
  CHECK(fs::file_size(db) == 512 * std::string("this is not an SQLite database ").size());
}

TEST_CASE("store: a damaged database is caught by quick_check at open", "[store]") {
  temp_dir tmp;
  const std::string db = tmp.path + "/canopy.db";
  {
    auto store = open_ok(tmp.path);
    const std::string body(300, 'x');
    std::vector<message> msgs;
    std::vector<upstream_entry> batch;
    for (int i = 0; i < 400; ++i) msgs.push_back(make_message(body, std::to_string(i)));
    for (auto& m : msgs) batch.push_back({"sensor", "out", 1, m.encoded()});
    REQUIRE(store->append_upstream(batch).ok());
  }
  // Closing the last connection checkpointed the WAL into the main file.
  const auto size = fs::file_size(db);
  REQUIRE(size > 16 * 4096);
  {
    // Keep page 1 (header and schema) intact; scribble over the pages after it.
    std::fstream f(db, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(4096);
    const std::string junk(8 * 4096, '\xA5');
    f.write(junk.data(), static_cast<std::streamsize>(junk.size()));
  }
  auto s = node_store::open(tmp.path);
  REQUIRE_FALSE(s.ok());
  CHECK(s.err().code == errc::store_error);
  CHECK_THAT(s.err().message, Catch::Contains(db));
  INFO(s.err().message);
  CHECK((s.err().message.find("corrupt") != std::string::npos ||
         s.err().message.find("malformed") != std::string::npos));
}

TEST_CASE("store: a data dir that cannot be created is a clear error", "[store]") {
  temp_dir tmp;
  const std::string file = tmp.path + "/a-file";
  std::ofstream(file) << "x";
  auto s = node_store::open(file + "/data");
  REQUIRE_FALSE(s.ok());
  CHECK(s.err().code == errc::io_error);
  CHECK_THAT(s.err().message, Catch::Contains(file + "/data"));

  auto t = node_store::open(file);
  REQUIRE_FALSE(t.ok());
  CHECK_THAT(t.err().message, Catch::Contains(file));
}

TEST_CASE("store: a database path that cannot be opened is a clear error", "[store]") {
  temp_dir tmp;
  // canopy.db is a directory: SQLite cannot open it, whatever our privileges.
  fs::create_directory(tmp.path + "/canopy.db");
  auto s = node_store::open(tmp.path);
  REQUIRE_FALSE(s.ok());
  CHECK(s.err().code == errc::store_error);
  CHECK_THAT(s.err().message, Catch::Contains(tmp.path + "/canopy.db"));
  CHECK_THAT(s.err().message, Catch::Contains("unable to open"));
}

namespace {

/// Runs node_store::open(dir) as an unprivileged user (root ignores file
/// permissions): in a child process that drops to uid/gid 65534 when we are
/// root. Returns the error message, or "" if open succeeded.
std::string open_error_unprivileged(const std::string& dir) {
  if (::geteuid() != 0) {
    auto s = node_store::open(dir);
    return s ? std::string() : s.err().message;
  }
  int fds[2];
  REQUIRE(::pipe(fds) == 0);
  const pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    ::close(fds[0]);
    std::string out;
    if (::setgid(65534) != 0 || ::setuid(65534) != 0) {
      out = "setuid failed";
    } else {
      auto s = node_store::open(dir);
      out = s ? std::string() : "ERR:" + s.err().message;
    }
    const auto w = ::write(fds[1], out.data(), out.size());
    ::_exit(w == static_cast<ssize_t>(out.size()) ? 0 : 1);
  }
  ::close(fds[1]);
  std::string out;
  char buf[512];
  ssize_t n;
  while ((n = ::read(fds[0], buf, sizeof buf)) > 0) out.append(buf, static_cast<std::size_t>(n));
  ::close(fds[0]);
  int status = 0;
  ::waitpid(pid, &status, 0);
  REQUIRE(out != "setuid failed");
  return out.rfind("ERR:", 0) == 0 ? out.substr(4) : out;
}

/// Lets uid 65534 reach `path` (the child of open_error_unprivileged).
void hand_to_nobody(const std::string& path) {
  if (::geteuid() == 0) REQUIRE(::chown(path.c_str(), 65534, 65534) == 0);
}

}  // namespace

TEST_CASE("store: an unwritable directory or file is a clear error", "[store]") {
  temp_dir tmp;
  SECTION("new file in a read-only directory") {
    hand_to_nobody(tmp.path);
    fs::permissions(tmp.path, fs::perms::owner_read | fs::perms::owner_exec);
    const std::string err = open_error_unprivileged(tmp.path);
    CHECK_THAT(err, Catch::Contains(tmp.path + "/canopy.db"));
    CHECK_THAT(err, Catch::Contains("unable to open"));
  }
  SECTION("existing read-only file") {
    { auto store = open_ok(tmp.path); }
    hand_to_nobody(tmp.path);
    hand_to_nobody(tmp.path + "/canopy.db");
    fs::permissions(tmp.path + "/canopy.db", fs::perms::owner_read);
    const std::string err = open_error_unprivileged(tmp.path);
    CHECK_THAT(err, Catch::Contains(tmp.path + "/canopy.db"));
    CHECK_THAT(err, Catch::Contains("not writable"));
  }
}

TEST_CASE("store: a newer schema or another application's database is refused", "[store]") {
  temp_dir tmp;
  const std::string db_path = tmp.path + "/canopy.db";
  SECTION("newer schema") {
    { auto store = open_ok(tmp.path); }
    sqlite3* db = nullptr;
    REQUIRE(sqlite3_open(db_path.c_str(), &db) == SQLITE_OK);
    REQUIRE(sqlite3_exec(db, "PRAGMA user_version = 99", nullptr, nullptr, nullptr) == SQLITE_OK);
    sqlite3_close(db);
    auto s = node_store::open(tmp.path);
    REQUIRE_FALSE(s.ok());
    CHECK(s.err().code == errc::incompatible);
    CHECK_THAT(s.err().message, Catch::Contains("99") && Catch::Contains(db_path));
  }
  SECTION("someone else's database") {
    sqlite3* db = nullptr;
    REQUIRE(sqlite3_open(db_path.c_str(), &db) == SQLITE_OK);
    REQUIRE(sqlite3_exec(db, "CREATE TABLE t (x)", nullptr, nullptr, nullptr) == SQLITE_OK);
    sqlite3_close(db);
    auto s = node_store::open(tmp.path);
    REQUIRE_FALSE(s.ok());
    CHECK(s.err().code == errc::incompatible);
    CHECK_THAT(s.err().message, Catch::Contains(db_path));
  }
}

TEST_CASE("store: deployment round trip with version counter", "[store]") {
  temp_dir tmp;
  manual_clock clk;
  const std::string first = R"({"schemaVersion":"1.1","modules":{"a":{}}})";
  const std::string second = R"({"schemaVersion":"1.1","modules":{"b":{}}})";
  {
    auto store = open_ok(tmp.path, &clk);
    auto v1 = store->save_deployment(first, "/srv/one");
    REQUIRE(v1.ok());
    CHECK(*v1 == 1);
    clk.advance(std::chrono::seconds(5));
    auto v2 = store->save_deployment(second, "/srv/two");
    REQUIRE(v2.ok());
    CHECK(*v2 == 2);
  }
  auto store = open_ok(tmp.path, &clk);
  auto dep = store->load_deployment();
  REQUIRE(dep.ok());
  REQUIRE(dep->has_value());
  const stored_deployment& d = **dep;
  CHECK(d.manifest_json == second);
  CHECK(d.base_dir == "/srv/two");
  CHECK(d.version == 2);
  CHECK(d.applied_ms == clk.wall_ms());
  auto v3 = store->save_deployment(first, "");
  REQUIRE(v3.ok());
  CHECK(*v3 == 3);
  dep = store->load_deployment();
  REQUIRE(dep.ok());
  CHECK((*dep)->base_dir.empty());
  CHECK((*dep)->manifest_json == first);
}

TEST_CASE("store: module states are saved, replaced, listed and deleted", "[store]") {
  temp_dir tmp;
  module_state_record a{"analyzer", "running", 2, 1000, 900, "crashed: boom"};
  module_state_record s{"sensor", "backoff", 5, 2000, 2100, ""};
  {
    auto store = open_ok(tmp.path);
    REQUIRE(store->save_module_state(s).ok());
    REQUIRE(store->save_module_state(a).ok());
    a.restart_count = 3;
    a.status = "failed";
    REQUIRE(store->save_module_state(a).ok());
  }
  auto store = open_ok(tmp.path);
  auto states = store->load_module_states();
  REQUIRE(states.ok());
  REQUIRE(states->size() == 2);
  CHECK((*states)[0] == a);  // ordered by name
  CHECK((*states)[1] == s);
  REQUIRE(store->delete_module_state("analyzer").ok());
  REQUIRE(store->delete_module_state("no-such-module").ok());
  states = store->load_module_states();
  REQUIRE(states.ok());
  REQUIRE(states->size() == 1);
  CHECK((*states)[0].name == "sensor");
}

TEST_CASE("store: reported properties per module", "[store]") {
  temp_dir tmp;
  auto store = open_ok(tmp.path);
  auto none = store->load_reported("filter");
  REQUIRE(none.ok());
  CHECK_FALSE(none->has_value());
  REQUIRE(store->save_reported("filter", R"({"threshold":30})").ok());
  REQUIRE(store->save_reported("sensor", R"({"rate":1})").ok());
  REQUIRE(store->save_reported("filter", R"({"threshold":31})").ok());
  REQUIRE(store->save_reported("empty", "").ok());
  CHECK(store->load_reported("filter")->value_or("") == R"({"threshold":31})");
  CHECK(store->load_reported("sensor")->value_or("") == R"({"rate":1})");
  auto empty = store->load_reported("empty");
  REQUIRE(empty.ok());
  REQUIRE(empty->has_value());
  CHECK((*empty)->empty());
  REQUIRE(store->delete_reported("filter").ok());
  CHECK_FALSE(store->load_reported("filter")->has_value());
}

TEST_CASE("store: upstream append, read in order, trim, seq monotonic across reopen",
          "[store]") {
  temp_dir tmp;
  std::vector<message> msgs;
  for (int i = 0; i < 10; ++i) msgs.push_back(make_message("body-" + std::to_string(i), std::to_string(i)));

  std::vector<std::int64_t> seqs;
  {
    auto store = open_ok(tmp.path);
    std::vector<upstream_entry> batch;
    for (int i = 0; i < 6; ++i)
      batch.push_back({"sensor", i % 2 ? "odd" : "even", 100 + i, msgs[i].encoded()});
    auto r = store->append_upstream(batch);
    REQUIRE(r.ok());
    seqs = *r;
    REQUIRE(seqs.size() == 6);
    for (std::size_t i = 1; i < seqs.size(); ++i) CHECK(seqs[i] == seqs[i - 1] + 1);

    auto empty = store->append_upstream({});
    REQUIRE(empty.ok());
    CHECK(empty->empty());

    auto all = store->read_upstream(0, 100);
    REQUIRE(all.ok());
    REQUIRE(all->size() == 6);
    for (int i = 0; i < 6; ++i) {
      const upstream_record& rec = (*all)[i];
      CHECK(rec.seq == seqs[i]);
      CHECK(rec.enqueued_ms == 100 + i);
      CHECK(rec.source_module == "sensor");
      CHECK(rec.source_device.empty());  // not given
      CHECK(rec.output == (i % 2 ? "odd" : "even"));
      CHECK(rec.msg.body() == "body-" + std::to_string(i));
      CHECK(rec.msg.message_id() == std::to_string(i));
      CHECK(rec.msg.property("k").value_or("") == "body-" + std::to_string(i));
      CHECK(rec.msg.encoded() == msgs[i].encoded());
    }

    auto page = store->read_upstream(seqs[1], 2);
    REQUIRE(page.ok());
    REQUIRE(page->size() == 2);
    CHECK((*page)[0].seq == seqs[2]);
    CHECK((*page)[1].seq == seqs[3]);
    auto none = store->read_upstream(seqs[5], 10);
    REQUIRE(none.ok());
    CHECK(none->empty());
    auto zero = store->read_upstream(0, 0);
    REQUIRE(zero.ok());
    CHECK(zero->empty());

    auto removed = store->trim_upstream(2);
    REQUIRE(removed.ok());
    CHECK(*removed == 4);
    CHECK(*store->upstream_count() == 2);
    auto kept = store->read_upstream(0, 100);
    REQUIRE(kept.ok());
    REQUIRE(kept->size() == 2);
    CHECK((*kept)[0].seq == seqs[4]);
    CHECK((*kept)[1].seq == seqs[5]);
    auto nothing = store->trim_upstream(10);
    REQUIRE(nothing.ok());
    CHECK(*nothing == 0);
    CHECK_FALSE(store->trim_upstream(-1).ok());

    // Trim everything: seqs still never go back.
    REQUIRE(store->trim_upstream(0).ok());
    CHECK(*store->upstream_count() == 0);
    CHECK(*store->last_upstream_seq() == seqs.back());
  }
  auto store = open_ok(tmp.path);
  CHECK(*store->last_upstream_seq() == seqs.back());
  std::vector<upstream_entry> more;
  for (int i = 6; i < 10; ++i) more.push_back({"filter", "alerts", 200 + i, msgs[i].encoded()});
  auto r = store->append_upstream(more);
  REQUIRE(r.ok());
  REQUIRE(r->size() == 4);
  CHECK(r->front() > seqs.back());
  auto all = store->read_upstream(seqs.back(), 100);
  REQUIRE(all.ok());
  REQUIRE(all->size() == 4);
  CHECK(all->front().source_module == "filter");
  CHECK(all->back().msg.body() == "body-9");

  // A bounded append keeps the newest keep_last_n seqs, in the same transaction.
  const auto before = *store->upstream_count();
  auto bounded = store->append_upstream(more, 3);
  REQUIRE(bounded.ok());
  CHECK(*store->upstream_count() == 3);
  auto newest = store->read_upstream(0, 100);
  REQUIRE(newest.ok());
  REQUIRE(newest->size() == 3);
  CHECK(newest->back().seq == bounded->back());
  CHECK(newest->front().seq == bounded->back() - 2);
  CHECK(before == 4);
}

TEST_CASE("store: a stored upstream message that does not decode is an error naming its seq",
          "[store]") {
  temp_dir tmp;
  auto store = open_ok(tmp.path);
  const std::string junk = "definitely not a capnp message";
  auto r = store->append_upstream(std::vector<upstream_entry>{{"m", "o", 1, junk}});
  REQUIRE(r.ok());
  auto read = store->read_upstream(0, 10);
  REQUIRE_FALSE(read.ok());
  CHECK(read.err().code == errc::store_error);
  CHECK_THAT(read.err().message, Catch::Contains("seq " + std::to_string(r->front())));
  for (const std::string device : {"", "m-device"}) {
    auto q = store->query_upstream(device, 0, 0, 10);
    if (device.empty()) {
      REQUIRE_FALSE(q.ok());
      CHECK(q.err().code == errc::store_error);
      CHECK_THAT(q.err().message, Catch::Contains("seq " + std::to_string(r->front())));
    } else {
      REQUIRE(q.ok());  // the junk has no device: not read at all
      CHECK(q->empty());
    }
  }
}

TEST_CASE("store: a failed write is a store_error naming the statement", "[store]") {
  temp_dir tmp;
  auto store = open_ok(tmp.path);
  // Another connection holds the write lock past our busy timeout? Too slow for a
  // unit test; instead break the schema under the store's feet.
  sqlite3* db = nullptr;
  REQUIRE(sqlite3_open((tmp.path + "/canopy.db").c_str(), &db) == SQLITE_OK);
  REQUIRE(sqlite3_exec(db,
                       "CREATE TRIGGER no_reported BEFORE INSERT ON reported "
                       "BEGIN SELECT RAISE(ABORT, 'reported is frozen'); END",
                       nullptr, nullptr, nullptr) == SQLITE_OK);
  sqlite3_close(db);
  auto r = store->save_reported("m", "{}");
  REQUIRE_FALSE(r.ok());
  CHECK(r.err().code == errc::store_error);
  CHECK_THAT(r.err().message, Catch::Contains("reported is frozen"));
  CHECK_THAT(r.err().message, Catch::Contains("INSERT OR REPLACE INTO reported"));
  CHECK_THAT(r.err().message, Catch::Contains(tmp.path + "/canopy.db"));

  // A batch that fails half way leaves nothing behind.
  db = nullptr;
  REQUIRE(sqlite3_open((tmp.path + "/canopy.db").c_str(), &db) == SQLITE_OK);
  REQUIRE(sqlite3_exec(db,
                       "CREATE TRIGGER no_bad BEFORE INSERT ON upstream WHEN NEW.output = 'bad' "
                       "BEGIN SELECT RAISE(ABORT, 'bad output'); END",
                       nullptr, nullptr, nullptr) == SQLITE_OK);
  sqlite3_close(db);
  const auto m = make_message("x", "1");
  std::vector<upstream_entry> batch{{"m", "good", 1, m.encoded()}, {"m", "bad", 2, m.encoded()}};
  auto a = store->append_upstream(batch);
  REQUIRE_FALSE(a.ok());
  CHECK_THAT(a.err().message, Catch::Contains("bad output"));
  CHECK(*store->upstream_count() == 0);
  // And the store is usable afterwards.
  batch.pop_back();
  auto ok = store->append_upstream(batch);
  REQUIRE(ok.ok());
  CHECK(*store->upstream_count() == 1);
}

namespace {

/// Writes `dir/canopy.db` as a Canopy of schema version 1 left it (the first
/// migration's SQL, verbatim), with `n` $upstream rows of body "old-<i>",
/// enqueued at 500 + i.
void write_schema_1_file(const std::string& dir, int n) {
  fs::create_directories(dir);
  sqlite3* db = nullptr;
  REQUIRE(sqlite3_open((dir + "/canopy.db").c_str(), &db) == SQLITE_OK);
  const char* v1 = R"sql(
PRAGMA application_id = 1128353359;
CREATE TABLE deployment (
  id            INTEGER PRIMARY KEY CHECK (id = 1),
  manifest_json TEXT NOT NULL,
  base_dir      TEXT NOT NULL,
  version       INTEGER NOT NULL,
  applied_ms    INTEGER NOT NULL);
CREATE TABLE module_state (
  name             TEXT PRIMARY KEY,
  status           TEXT NOT NULL,
  restart_count    INTEGER NOT NULL,
  last_start_ms    INTEGER NOT NULL,
  last_exit_ms     INTEGER NOT NULL,
  last_exit_reason TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE reported (
  module TEXT PRIMARY KEY,
  json   TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE upstream (
  seq           INTEGER PRIMARY KEY AUTOINCREMENT,
  enqueued_ms   INTEGER NOT NULL,
  source_module TEXT NOT NULL,
  output        TEXT NOT NULL,
  message       BLOB NOT NULL);
PRAGMA user_version = 1;
)sql";
  static_assert(0x43414e4f == 1128353359, "node_store's application id");
  REQUIRE(sqlite3_exec(db, v1, nullptr, nullptr, nullptr) == SQLITE_OK);
  sqlite3_stmt* ins = nullptr;
  REQUIRE(sqlite3_prepare_v2(db,
                             "INSERT INTO upstream (enqueued_ms, source_module, output, message) "
                             "VALUES (?1, 'sensor', 'out', ?2)",
                             -1, &ins, nullptr) == SQLITE_OK);
  for (int i = 0; i < n; ++i) {
    const auto m = make_message("old-" + std::to_string(i), std::to_string(i));
    const std::string bytes(m.encoded());
    sqlite3_bind_int64(ins, 1, 500 + i);
    sqlite3_bind_blob(ins, 2, bytes.data(), static_cast<int>(bytes.size()), SQLITE_TRANSIENT);
    REQUIRE(sqlite3_step(ins) == SQLITE_DONE);
    sqlite3_reset(ins);
  }
  sqlite3_finalize(ins);
  REQUIRE(sqlite3_exec(db, "INSERT INTO reported VALUES ('sensor', '{\"rate\":1}')", nullptr,
                       nullptr, nullptr) == SQLITE_OK);
  sqlite3_close(db);
}

/// Appends one $upstream record per (device, enqueued_ms) pair, body "<device>@<ms>",
/// in one batch; returns their seqs.
std::vector<std::int64_t> append_from(node_store& store,
                                      const std::vector<std::pair<std::string, std::int64_t>>& rows) {
  std::vector<message> msgs;
  for (const auto& [device, ms] : rows) msgs.push_back(make_message(device + "@" + std::to_string(ms), "x"));
  std::vector<upstream_entry> batch;
  for (std::size_t i = 0; i < rows.size(); ++i)
    batch.push_back({"sensor", "out", rows[i].second, msgs[i].encoded(), rows[i].first});
  auto seqs = store.append_upstream(batch);
  INFO((seqs ? std::string() : seqs.err().message));
  REQUIRE(seqs.ok());
  return *seqs;
}

/// The bodies of `recs`, in order.
std::vector<std::string> bodies(const std::vector<upstream_record>& recs) {
  std::vector<std::string> out;
  for (const auto& r : recs) out.emplace_back(r.msg.body());
  return out;
}

}  // namespace

TEST_CASE("store: a schema 1 file is migrated: upstream gains source_device ('' for old rows) "
          "and its index",
          "[store]") {
  temp_dir tmp;
  const std::string db = tmp.path + "/canopy.db";
  write_schema_1_file(tmp.path, 3);
  CHECK(query_one(db, "SELECT count(*) FROM pragma_table_info('upstream') "
                      "WHERE name = 'source_device'") == "0");
  {
    auto store = open_ok(tmp.path);
    CHECK(*store->schema_version() == 2);
    CHECK(query_one(db, "SELECT type || ' ' || \"notnull\" || ' ' || dflt_value "
                        "FROM pragma_table_info('upstream') WHERE name = 'source_device'") ==
          "TEXT 1 ''");
    CHECK(query_one(db, "SELECT group_concat(name, ',') FROM pragma_index_info('upstream_by_device')") ==
          "source_device,enqueued_ms");
    // What was there is still there, from no device.
    CHECK(store->load_reported("sensor")->value_or("") == R"({"rate":1})");
    auto old = store->read_upstream(0, 10);
    REQUIRE(old.ok());
    REQUIRE(old->size() == 3);
    for (int i = 0; i < 3; ++i) {
      CHECK((*old)[i].msg.body() == "old-" + std::to_string(i));
      CHECK((*old)[i].enqueued_ms == 500 + i);
      CHECK((*old)[i].source_device.empty());
    }
    auto all = store->query_upstream("", 0, 0, 10);
    REQUIRE(all.ok());
    CHECK(bodies(*all) == bodies(*old));
    // New records carry their device; seqs go on after the old ones.
    auto seqs = append_from(*store, {{"dev-1", 600}});
    CHECK(seqs.front() > old->back().seq);
    auto dev = store->query_upstream("dev-1", 0, 0, 10);
    REQUIRE(dev.ok());
    REQUIRE(dev->size() == 1);
    CHECK(dev->front().source_device == "dev-1");
    CHECK(dev->front().msg.body() == "dev-1@600");
  }
  // Migrated once: reopening changes nothing.
  auto store = open_ok(tmp.path);
  CHECK(*store->schema_version() == node_store::current_schema_version);
  CHECK(*store->upstream_count() == 4);
}

TEST_CASE("store: query_upstream by device, since, after_seq and limit, in seq order", "[store]") {
  temp_dir tmp;
  auto store = open_ok(tmp.path);
  auto seqs = append_from(*store, {{"dev-a", 1000},
                                   {"dev-b", 1000},
                                   {"dev-a", 1010},
                                   {"hub", 1020},
                                   {"dev-a", 1030},
                                   {"dev-b", 1040}});
  // A later batch whose wall clock went back: still after the others (seq order).
  auto late = append_from(*store, {{"dev-a", 1005}, {"dev-a", 1050}});

  auto q = [&](const std::string& device, std::int64_t since, std::int64_t after,
               std::size_t limit) {
    auto r = store->query_upstream(device, since, after, limit);
    INFO((r ? std::string() : r.err().message));
    REQUIRE(r.ok());
    return std::move(r).value();
  };

  SECTION("one device, every field of the record") {
    auto a = q("dev-a", 0, 0, 100);
    CHECK(bodies(a) ==
          std::vector<std::string>{"dev-a@1000", "dev-a@1010", "dev-a@1030", "dev-a@1005", "dev-a@1050"});
    REQUIRE(a.size() == 5);
    CHECK(a[0].seq == seqs[0]);
    CHECK(a[1].seq == seqs[2]);
    CHECK(a[3].seq == late[0]);
    for (const auto& r : a) {
      CHECK(r.source_device == "dev-a");
      CHECK(r.source_module == "sensor");
      CHECK(r.output == "out");
    }
    CHECK(a[2].enqueued_ms == 1030);
    CHECK(bodies(q("dev-b", 0, 0, 100)) == std::vector<std::string>{"dev-b@1000", "dev-b@1040"});
    CHECK(q("dev-c", 0, 0, 100).empty());
    CHECK(q("dev", 0, 0, 100).empty());  // no prefix match
  }
  SECTION("since is inclusive") {
    CHECK(bodies(q("dev-a", 1010, 0, 100)) ==
          std::vector<std::string>{"dev-a@1010", "dev-a@1030", "dev-a@1050"});
    CHECK(bodies(q("", 1030, 0, 100)) ==
          std::vector<std::string>{"dev-a@1030", "dev-b@1040", "dev-a@1050"});
    CHECK(q("dev-a", 1051, 0, 100).empty());
  }
  SECTION("after_seq is exclusive") {
    CHECK(bodies(q("dev-a", 0, seqs[2], 100)) ==
          std::vector<std::string>{"dev-a@1030", "dev-a@1005", "dev-a@1050"});
    CHECK(bodies(q("", 0, seqs[4], 100)) ==
          std::vector<std::string>{"dev-b@1040", "dev-a@1005", "dev-a@1050"});
    CHECK(q("", 0, late.back(), 100).empty());
  }
  SECTION("\"\" is every device, including records of the node's own modules") {
    auto all = q("", 0, 0, 100);
    REQUIRE(all.size() == 8);
    CHECK(all[3].source_device == "hub");
    for (std::size_t i = 1; i < all.size(); ++i) CHECK(all[i].seq > all[i - 1].seq);
  }
  SECTION("limit, and paging with the last seq returned") {
    CHECK(q("dev-a", 0, 0, 0).empty());
    CHECK(q("", 0, 0, 0).empty());
    for (const std::string device : {"", "dev-a"}) {
      std::vector<std::string> paged;
      std::int64_t after = 0;
      int pages = 0;
      for (;;) {
        auto page = q(device, 1000, after, 2);
        CHECK(page.size() <= 2);
        if (page.empty()) break;
        ++pages;
        for (auto& b : bodies(page)) paged.push_back(b);
        after = page.back().seq;
      }
      CHECK(paged == bodies(q(device, 1000, 0, 100)));
      CHECK(pages == (device.empty() ? 4 : 3));
    }
  }
  SECTION("a limit above max_query_limit is capped") {
    std::vector<std::pair<std::string, std::int64_t>> many(node_store::max_query_limit + 5,
                                                           {"bulk", 2000});
    append_from(*store, many);
    CHECK(q("bulk", 0, 0, 1000000).size() == node_store::max_query_limit);
    CHECK(q("", 0, 0, std::numeric_limits<std::size_t>::max()).size() ==
          node_store::max_query_limit);
    CHECK(q("bulk", 0, 0, 7).size() == 7);
  }
}

TEST_CASE("store: query_upstream by device reads through the index upstream_by_device", "[store]") {
  temp_dir tmp;
  auto store = open_ok(tmp.path);
  append_from(*store, {{"dev-a", 1000}});
  // Without the index the by-device query refuses (INDEXED BY) rather than
  // scanning the whole table; the query over every device does not need it.
  sqlite3* db = nullptr;
  REQUIRE(sqlite3_open((tmp.path + "/canopy.db").c_str(), &db) == SQLITE_OK);
  REQUIRE(sqlite3_exec(db, "DROP INDEX upstream_by_device", nullptr, nullptr, nullptr) == SQLITE_OK);
  sqlite3_close(db);
  auto r = store->query_upstream("dev-a", 0, 0, 10);
  REQUIRE_FALSE(r.ok());
  CHECK(r.err().code == errc::store_error);
  CHECK_THAT(r.err().message, Catch::Contains("upstream_by_device"));
  CHECK_THAT(r.err().message, Catch::Contains(tmp.path + "/canopy.db"));
  auto all = store->query_upstream("", 0, 0, 10);
  REQUIRE(all.ok());
  CHECK(all->size() == 1);
}
