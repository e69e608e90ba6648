#include "runtime/store.hpp"

#include <sqlite3.h>

#include <chrono>
#include <filesystem>
#include <limits>
#include <utility>

namespace canopy {

// -- detail -------------------------------------------------------------------

namespace detail {

sql_statement::~sql_statement() {
  if (stmt_ != nullptr) sqlite3_finalize(stmt_);
}

sql_statement::sql_statement(sql_statement&& other) noexcept
    : stmt_(std::exchange(other.stmt_, nullptr)) {}

sql_statement& sql_statement::operator=(sql_statement&& other) noexcept {
  if (this != &other) {
    if (stmt_ != nullptr) sqlite3_finalize(stmt_);
    stmt_ = std::exchange(other.stmt_, nullptr);
  }
  return *this;
}

void sqlite_closer::operator()(sqlite3* db) const noexcept {
  // close_v2: if a statement were still alive the handle becomes a zombie
  // that closes with the last statement, instead of failing with SQLITE_BUSY.
  sqlite3_close_v2(db);
}

}  // namespace detail

namespace {

/// Application id stamped in the file header ("CANO"), so that opening some
/// other program's SQLite file is a clear error rather than a migration of it.
constexpr int application_id = 0x43414e4f;

struct migration {
  int version;
  const char* sql;
};

// Append-only: a released migration is never edited; a change of schema is a new
// entry with the next version. Each runs in its own transaction together with
// the bump of PRAGMA user_version.
constexpr migration migrations[] = {
    {1, R"sql(
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
)sql"},
};

static_assert(std::size(migrations) > 0 &&
                  migrations[std::size(migrations) - 1].version == node_store::current_schema_version,
              "the last migration must produce current_schema_version");

/// Resets a statement and clears its bindings when the scope ends, so that no
/// statement keeps a read transaction (and thus the WAL) pinned.
class statement_use {
 public:
  explicit statement_use(sqlite3_stmt* s) noexcept : s_(s) {}
  ~statement_use() {
    sqlite3_reset(s_);
    sqlite3_clear_bindings(s_);
  }
  statement_use(const statement_use&) = delete;
  statement_use& operator=(const statement_use&) = delete;

 private:
  sqlite3_stmt* s_;
};

/// Binds parameters 1, 2, ... in order; remembers the first failure. Strings are
/// bound SQLITE_STATIC: they must outlive the step (they do: the caller's
/// arguments outlive the statement_use that clears the bindings).
class binder {
 public:
  explicit binder(sqlite3_stmt* s) noexcept : s_(s) {}

  binder& text(std::string_view v) {
    // A null pointer would bind SQL NULL; an empty view may have one.
    const char* p = v.data() != nullptr ? v.data() : "";
    if (rc_ == SQLITE_OK)
      rc_ = sqlite3_bind_text64(s_, ++idx_, p, v.size(), SQLITE_STATIC, SQLITE_UTF8);
    return *this;
  }
  binder& blob(std::string_view v) {
    const char* p = v.data() != nullptr ? v.data() : "";
    if (rc_ == SQLITE_OK) rc_ = sqlite3_bind_blob64(s_, ++idx_, p, v.size(), SQLITE_STATIC);
    return *this;
  }
  binder& i64(std::int64_t v) {
    if (rc_ == SQLITE_OK) rc_ = sqlite3_bind_int64(s_, ++idx_, v);
    return *this;
  }
  int rc() const noexcept { return rc_; }

 private:
  sqlite3_stmt* s_;
  int rc_ = SQLITE_OK;
  int idx_ = 0;
};

std::string column_text(sqlite3_stmt* s, int col) {
  const auto* p = sqlite3_column_text(s, col);
  const int n = sqlite3_column_bytes(s, col);
  return p != nullptr ? std::string(reinterpret_cast<const char*>(p), static_cast<std::size_t>(n))
                      : std::string();
}

std::string_view column_blob(sqlite3_stmt* s, int col) {
  const void* p = sqlite3_column_blob(s, col);
  const int n = sqlite3_column_bytes(s, col);
  return p != nullptr ? std::string_view(static_cast<const char*>(p), static_cast<std::size_t>(n))
                      : std::string_view();
}

/// "store '<file>': `<sql>` failed: <sqlite message> (<code name>)".
error sql_error(const std::string& path, sqlite3* db, std::string_view sql, int rc) {
  std::string msg = "store '" + path + "': `" + std::string(sql) + "` failed: ";
  msg += db != nullptr ? sqlite3_errmsg(db) : sqlite3_errstr(rc);
  msg += " (";
  msg += sqlite3_errstr(rc);
  msg += ")";
  return make_error(errc::store_error, std::move(msg));
}

error stmt_error(const std::string& path, sqlite3* db, sqlite3_stmt* s, int rc) {
  const char* sql = sqlite3_sql(s);
  return sql_error(path, db, sql != nullptr ? sql : "?", rc);
}

/// Runs a single statement that returns rows of one text column (PRAGMAs),
/// collecting at most `max_rows` of them. Returns SQLite's result code.
int query_text_rows(sqlite3* db, const char* sql, std::vector<std::string>& rows,
                    std::size_t max_rows = 16) {
  sqlite3_stmt* raw = nullptr;
  int rc = sqlite3_prepare_v2(db, sql, -1, &raw, nullptr);
  detail::sql_statement stmt(raw);
  if (rc != SQLITE_OK) return rc;
  while ((rc = sqlite3_step(raw)) == SQLITE_ROW) {
    if (rows.size() < max_rows) rows.push_back(column_text(raw, 0));
  }
  return rc == SQLITE_DONE ? SQLITE_OK : rc;
}

/// Runs SQL that returns no rows we need (may be several statements).
expected<void> exec(const std::string& path, sqlite3* db, const char* sql,
                    std::string_view what = {}) {
  char* err = nullptr;
  const int rc = sqlite3_exec(db, sql, nullptr, nullptr, &err);
  if (rc == SQLITE_OK) return {};
  std::string msg = "store '" + path + "': `" + std::string(what.empty() ? sql : what) +
                    "` failed: " + (err != nullptr ? err : sqlite3_errmsg(db)) + " (" +
                    sqlite3_errstr(rc) + ")";
  sqlite3_free(err);
  return make_error(errc::store_error, std::move(msg));
}

expected<std::int64_t> query_int(const std::string& path, sqlite3* db, const char* sql) {
  sqlite3_stmt* raw = nullptr;
  int rc = sqlite3_prepare_v2(db, sql, -1, &raw, nullptr);
  detail::sql_statement stmt(raw);
  if (rc != SQLITE_OK) return sql_error(path, db, sql, rc);
  std::int64_t v = 0;
  rc = sqlite3_step(raw);
  if (rc == SQLITE_ROW) {
    v = sqlite3_column_int64(raw, 0);
    rc = sqlite3_step(raw);
  }
  if (rc != SQLITE_DONE) return sql_error(path, db, sql, rc);
  return v;
}

/// Brings the schema to current_schema_version, one migration per transaction.
/// BEGIN IMMEDIATE takes the write lock before reading user_version, so two
/// processes opening a new file at once do not both migrate it.
expected<void> migrate(const std::string& path, sqlite3* db) {
  for (const auto& m : migrations) {
    if (auto r = exec(path, db, "BEGIN IMMEDIATE"); !r) return r;
    auto rollback_on_error = [&](error e) -> expected<void> {
      sqlite3_exec(db, "ROLLBACK", nullptr, nullptr, nullptr);
      return e;
    };
    auto current = query_int(path, db, "PRAGMA user_version");
    if (!current) return rollback_on_error(std::move(current).err());
    if (*current >= m.version) {
      if (auto r = exec(path, db, "COMMIT"); !r) return rollback_on_error(std::move(r).err());
      continue;
    }
    if (auto r = exec(path, db, m.sql, "migration to schema version " + std::to_string(m.version));
        !r)
      return rollback_on_error(std::move(r).err());
    const std::string bump = "PRAGMA user_version = " + std::to_string(m.version) +
                             "; PRAGMA application_id = " + std::to_string(application_id);
    if (auto r = exec(path, db, bump.c_str()); !r) return rollback_on_error(std::move(r).err());
    if (auto r = exec(path, db, "COMMIT"); !r) return rollback_on_error(std::move(r).err());
  }
  return {};
}

}  // namespace

// -- node_store ----------------------------------------------------------------

node_store::node_store(token, std::string path, const clock* wall_clock)
    : path_(std::move(path)), wall_clock_(wall_clock) {}

node_store::~node_store() = default;

expected<std::unique_ptr<node_store>> node_store::open(const std::string& data_dir,
                                                       const clock* wall_clock) {
  namespace fs = std::filesystem;
  if (data_dir.empty())
    return make_error(errc::invalid_argument, "store: data_dir is empty");

  std::error_code ec;
  fs::create_directories(data_dir, ec);
  if (ec)
    return make_error(errc::io_error,
                      "store: cannot create data directory '" + data_dir + "': " + ec.message());
  if (!fs::is_directory(data_dir, ec))
    return make_error(errc::io_error,
                      "store: data directory '" + data_dir + "' is not a directory");

  const std::string path = (fs::path(data_dir) / "canopy.db").string();
  auto store = std::make_unique<node_store>(token{}, path, wall_clock);

  sqlite3* raw = nullptr;
  const int flags =
      SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX | SQLITE_OPEN_EXRESCODE;
  int rc = sqlite3_open_v2(path.c_str(), &raw, flags, nullptr);
  store->db_.reset(raw);  // even on failure, raw (if any) must be closed
  if (rc != SQLITE_OK) {
    return make_error(errc::store_error, "store: cannot open '" + path + "': " +
                                             (raw != nullptr ? sqlite3_errmsg(raw)
                                                             : sqlite3_errstr(rc)));
  }
  sqlite3* db = raw;
  sqlite3_extended_result_codes(db, 1);
  sqlite3_busy_timeout(db, busy_timeout_ms);

  // SQLite silently opens a write-protected file read-only: refuse it here
  // rather than at the first write.
  if (sqlite3_db_readonly(db, "main") == 1)
    return make_error(errc::store_error,
                      "store: '" + path + "' is not writable (SQLite opened it read-only)");

  // A file that is not a database, or a damaged one, is an error now, naming the
  // file; never a silent fresh start.
  {
    std::vector<std::string> rows;
    rc = query_text_rows(db, "PRAGMA quick_check", rows, 8);
    if (rc != SQLITE_OK)
      return make_error(errc::store_error, "store: '" + path +
                                               "' is not a usable SQLite database: " +
                                               sqlite3_errmsg(db) + " (PRAGMA quick_check)");
    if (rows.size() != 1 || rows[0] != "ok") {
      std::string msg = "store: '" + path + "' is corrupt: PRAGMA quick_check reports: ";
      for (std::size_t i = 0; i < rows.size(); ++i) msg += (i ? "; " : "") + rows[i];
      return make_error(errc::store_error, std::move(msg));
    }
  }

  // Whose file is it, and which schema?
  auto app_id = query_int(path, db, "PRAGMA application_id");
  if (!app_id) return std::move(app_id).err();
  if (*app_id != 0 && *app_id != application_id)
    return make_error(errc::incompatible, "store: '" + path +
                                              "' belongs to another application (application_id " +
                                              std::to_string(*app_id) + ")");
  auto version = query_int(path, db, "PRAGMA user_version");
  if (!version) return std::move(version).err();
  if (*version > current_schema_version)
    return make_error(errc::incompatible,
                      "store: '" + path + "' has schema version " + std::to_string(*version) +
                          ", newer than this build supports (" +
                          std::to_string(current_schema_version) + ")");
  if (*app_id == 0 && *version == 0) {
    // A file with user_version 0 must be one we create now: empty.
    auto tables = query_int(path, db, "SELECT count(*) FROM sqlite_schema");
    if (!tables) return std::move(tables).err();
    if (*tables != 0)
      return make_error(errc::incompatible,
                        "store: '" + path + "' is an SQLite database of another application");
  }

  {
    std::vector<std::string> rows;
    rc = query_text_rows(db, "PRAGMA journal_mode = WAL", rows);
    if (rc != SQLITE_OK) return sql_error(path, db, "PRAGMA journal_mode = WAL", rc);
    if (rows.empty() || rows[0] != "wal")
      return make_error(errc::store_error,
                        "store: '" + path + "' cannot use WAL mode (journal_mode is '" +
                            (rows.empty() ? std::string() : rows[0]) +
                            "'); is it on a network file system?");
  }
  if (auto r = exec(path, db, "PRAGMA synchronous = FULL"); !r) return std::move(r).err();

  if (auto r = migrate(path, db); !r) return std::move(r).err();
  if (auto r = store->prepare_statements(); !r) return std::move(r).err();
  return store;
}

expected<void> node_store::prepare_statements() {
  struct entry {
    detail::sql_statement* stmt;
    const char* sql;
  };
  const entry entries[] = {
      {&begin_, "BEGIN IMMEDIATE"},
      {&commit_, "COMMIT"},
      {&rollback_, "ROLLBACK"},
      {&user_version_, "PRAGMA user_version"},
      {&save_deployment_,
       "INSERT INTO deployment (id, manifest_json, base_dir, version, applied_ms) "
       "VALUES (1, ?1, ?2, 1, ?3) "
       "ON CONFLICT (id) DO UPDATE SET manifest_json = excluded.manifest_json, "
       "base_dir = excluded.base_dir, version = deployment.version + 1, "
       "applied_ms = excluded.applied_ms "
       "RETURNING version"},
      {&load_deployment_,
       "SELECT manifest_json, base_dir, version, applied_ms FROM deployment WHERE id = 1"},
      {&save_module_state_,
       "INSERT OR REPLACE INTO module_state "
       "(name, status, restart_count, last_start_ms, last_exit_ms, last_exit_reason) "
       "VALUES (?1, ?2, ?3, ?4, ?5, ?6)"},
      {&load_module_states_,
       "SELECT name, status, restart_count, last_start_ms, last_exit_ms, last_exit_reason "
       "FROM module_state ORDER BY name"},
      {&delete_module_state_, "DELETE FROM module_state WHERE name = ?1"},
      {&save_reported_, "INSERT OR REPLACE INTO reported (module, json) VALUES (?1, ?2)"},
      {&load_reported_, "SELECT json FROM reported WHERE module = ?1"},
      {&delete_reported_, "DELETE FROM reported WHERE module = ?1"},
      {&append_upstream_,
       "INSERT INTO upstream (enqueued_ms, source_module, output, message) "
       "VALUES (?1, ?2, ?3, ?4) RETURNING seq"},
      {&read_upstream_,
       "SELECT seq, enqueued_ms, source_module, output, message FROM upstream "
       "WHERE seq > ?1 ORDER BY seq LIMIT ?2"},
      {&trim_upstream_,
       "DELETE FROM upstream WHERE seq <= "
       "(SELECT seq FROM upstream ORDER BY seq DESC LIMIT 1 OFFSET ?1)"},
      {&count_upstream_, "SELECT count(*) FROM upstream"},
      {&last_upstream_seq_,
       "SELECT COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'upstream'), 0)"},
  };
  for (const auto& e : entries) {
    sqlite3_stmt* raw = nullptr;
    const int rc =
        sqlite3_prepare_v3(db_.get(), e.sql, -1, SQLITE_PREPARE_PERSISTENT, &raw, nullptr);
    *e.stmt = detail::sql_statement(raw);
    if (rc != SQLITE_OK) return sql_error(path_, db_.get(), e.sql, rc);
  }
  return {};
}

std::int64_t node_store::wall_ms() const {
  if (wall_clock_ != nullptr) return wall_clock_->wall_ms();
  using namespace std::chrono;
  return duration_cast<milliseconds>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

expected<int> node_store::schema_version() {
  sqlite3_stmt* s = user_version_.get();
  statement_use use(s);
  int rc = sqlite3_step(s);
  if (rc != SQLITE_ROW) return stmt_error(path_, db_.get(), s, rc);
  return sqlite3_column_int(s, 0);
}

// -- deployment ---------------------------------------------------------------

expected<std::int64_t> node_store::save_deployment(const std::string& manifest_json,
                                                   const std::string& base_dir) {
  sqlite3_stmt* s = save_deployment_.get();
  statement_use use(s);
  binder b(s);
  b.text(manifest_json).text(base_dir).i64(wall_ms());
  if (b.rc() != SQLITE_OK) return stmt_error(path_, db_.get(), s, b.rc());
  int rc = sqlite3_step(s);
  if (rc != SQLITE_ROW) return stmt_error(path_, db_.get(), s, rc);
  const std::int64_t version = sqlite3_column_int64(s, 0);
  // Step to the end: with RETURNING the statement (and its implicit
  // transaction) completes only then.
  rc = sqlite3_step(s);
  if (rc != SQLITE_DONE) return stmt_error(path_, db_.get(), s, rc);
  return version;
}

expected<std::optional<stored_deployment>> node_store::load_deployment() {
  sqlite3_stmt* s = load_deployment_.get();
  statement_use use(s);
  const int rc = sqlite3_step(s);
  if (rc == SQLITE_DONE) return std::optional<stored_deployment>();
  if (rc != SQLITE_ROW) return stmt_error(path_, db_.get(), s, rc);
  stored_deployment d;
  d.manifest_json = column_text(s, 0);
  d.base_dir = column_text(s, 1);
  d.version = sqlite3_column_int64(s, 2);
  d.applied_ms = sqlite3_column_int64(s, 3);
  return std::optional<stored_deployment>(std::move(d));
}

// -- module status ------------------------------------------------------------

expected<void> node_store::save_module_state(const module_state_record& rec) {
  sqlite3_stmt* s = save_module_state_.get();
  statement_use use(s);
  binder b(s);
  b.text(rec.name)
      .text(rec.status)
      .i64(rec.restart_count)
      .i64(rec.last_start_ms)
      .i64(rec.last_exit_ms)
      .text(rec.last_exit_reason);
  if (b.rc() != SQLITE_OK) return stmt_error(path_, db_.get(), s, b.rc());
  const int rc = sqlite3_step(s);
  if (rc != SQLITE_DONE) return stmt_error(path_, db_.get(), s, rc);
  return {};
}

expected<std::vector<module_state_record>> node_store::load_module_states() {
  sqlite3_stmt* s = load_module_states_.get();
  statement_use use(s);
  std::vector<module_state_record> out;
  int rc;
  while ((rc = sqlite3_step(s)) == SQLITE_ROW) {
    module_state_record r;
    r.name = column_text(s, 0);
    r.status = column_text(s, 1);
    r.restart_count = sqlite3_column_int(s, 2);
    r.last_start_ms = sqlite3_column_int64(s, 3);
    r.last_exit_ms = sqlite3_column_int64(s, 4);
    r.last_exit_reason = column_text(s, 5);
    out.push_back(std::move(r));
  }
  if (rc != SQLITE_DONE) return stmt_error(path_, db_.get(), s, rc);
  return out;
}

expected<void> node_store::delete_module_state(const std::string& name) {
  sqlite3_stmt* s = delete_module_state_.get();
  statement_use use(s);
  binder b(s);
  b.text(name);
  if (b.rc() != SQLITE_OK) return stmt_error(path_, db_.get(), s, b.rc());
  const int rc = sqlite3_step(s);
  if (rc != SQLITE_DONE) return stmt_error(path_, db_.get(), s, rc);
  return {};
}

// -- reported properties ------------------------------------------------------

expected<void> node_store::save_reported(const std::string& module, const std::string& json) {
  sqlite3_stmt* s = save_reported_.get();
  statement_use use(s);
  binder b(s);
  b.text(module).text(json);
  if (b.rc() != SQLITE_OK) return stmt_error(path_, db_.get(), s, b.rc());
  const int rc = sqlite3_step(s);
  if (rc != SQLITE_DONE) return stmt_error(path_, db_.get(), s, rc);
  return {};
}

expected<std::optional<std::string>> node_store::load_reported(const std::string& module) {
  sqlite3_stmt* s = load_reported_.get();
  statement_use use(s);
  binder b(s);
  b.text(module);
  if (b.rc() != SQLITE_OK) return stmt_error(path_, db_.get(), s, b.rc());
  const int rc = sqlite3_step(s);
  if (rc == SQLITE_DONE) return std::optional<std::string>();
  if (rc != SQLITE_ROW) return stmt_error(path_, db_.get(), s, rc);
  return std::optional<std::string>(column_text(s, 0));
}

expected<void> node_store::delete_reported(const std::string& module) {
  sqlite3_stmt* s = delete_reported_.get();
  statement_use use(s);
  binder b(s);
  b.text(module);
  if (b.rc() != SQLITE_OK) return stmt_error(path_, db_.get(), s, b.rc());
  const int rc = sqlite3_step(s);
  if (rc != SQLITE_DONE) return stmt_error(path_, db_.get(), s, rc);
  return {};
}

// -- $upstream messages ------------------------------------------------------

expected<std::vector<std::int64_t>> node_store::append_upstream(
    std::span<const upstream_entry> entries) {
  std::vector<std::int64_t> seqs;
  if (entries.empty()) return seqs;
  seqs.reserve(entries.size());
  sqlite3* db = db_.get();

  {
    sqlite3_stmt* s = begin_.get();
    statement_use use(s);
    const int rc = sqlite3_step(s);
    if (rc != SQLITE_DONE) return stmt_error(path_, db, s, rc);
  }
  auto fail = [&](error e) -> expected<std::vector<std::int64_t>> {
    if (sqlite3_get_autocommit(db) == 0) {
      statement_use use(rollback_.get());
      sqlite3_step(rollback_.get());
    }
    return e;
  };

  sqlite3_stmt* s = append_upstream_.get();
  for (const auto& e : entries) {
    statement_use use(s);
    binder b(s);
    b.i64(e.enqueued_ms).text(e.source_module).text(e.output).blob(e.encoded);
    if (b.rc() != SQLITE_OK) return fail(stmt_error(path_, db, s, b.rc()));
    int rc = sqlite3_step(s);
    if (rc != SQLITE_ROW) return fail(stmt_error(path_, db, s, rc));
    seqs.push_back(sqlite3_column_int64(s, 0));
    rc = sqlite3_step(s);
    if (rc != SQLITE_DONE) return fail(stmt_error(path_, db, s, rc));
  }

  {
    sqlite3_stmt* c = commit_.get();
    statement_use use(c);
    const int rc = sqlite3_step(c);
    if (rc != SQLITE_DONE) return fail(stmt_error(path_, db, c, rc));
  }
  return seqs;
}

expected<std::vector<upstream_record>> node_store::read_upstream(std::int64_t after_seq,
                                                                 std::size_t limit) {
  std::vector<upstream_record> out;
  if (limit == 0) return out;
  const auto max_limit = static_cast<std::size_t>(std::numeric_limits<std::int64_t>::max());
  sqlite3_stmt* s = read_upstream_.get();
  statement_use use(s);
  binder b(s);
  b.i64(after_seq).i64(static_cast<std::int64_t>(std::min(limit, max_limit)));
  if (b.rc() != SQLITE_OK) return stmt_error(path_, db_.get(), s, b.rc());
  int rc;
  while ((rc = sqlite3_step(s)) == SQLITE_ROW) {
    upstream_record r;
    r.seq = sqlite3_column_int64(s, 0);
    r.enqueued_ms = sqlite3_column_int64(s, 1);
    r.source_module = column_text(s, 2);
    r.output = column_text(s, 3);
    auto msg = message::decode(column_blob(s, 4));
    if (!msg)
      return make_error(errc::store_error, "store '" + path_ + "': upstream record seq " +
                                               std::to_string(r.seq) +
                                               ": stored message does not decode (corrupt)");
    r.msg = std::move(*msg);
    out.push_back(std::move(r));
  }
  if (rc != SQLITE_DONE) return stmt_error(path_, db_.get(), s, rc);
  return out;
}

expected<std::int64_t> node_store::trim_upstream(std::int64_t keep_last_n) {
  if (keep_last_n < 0)
    return make_error(errc::invalid_argument,
                      "trim_upstream: keep_last_n is negative (" + std::to_string(keep_last_n) +
                          ")");
  sqlite3_stmt* s = trim_upstream_.get();
  statement_use use(s);
  binder b(s);
  b.i64(keep_last_n);
  if (b.rc() != SQLITE_OK) return stmt_error(path_, db_.get(), s, b.rc());
  const int rc = sqlite3_step(s);
  if (rc != SQLITE_DONE) return stmt_error(path_, db_.get(), s, rc);
  return static_cast<std::int64_t>(sqlite3_changes64(db_.get()));
}

expected<std::int64_t> node_store::upstream_count() {
  sqlite3_stmt* s = count_upstream_.get();
  statement_use use(s);
  const int rc = sqlite3_step(s);
  if (rc != SQLITE_ROW) return stmt_error(path_, db_.get(), s, rc);
  return static_cast<std::int64_t>(sqlite3_column_int64(s, 0));
}

expected<std::int64_t> node_store::last_upstream_seq() {
  sqlite3_stmt* s = last_upstream_seq_.get();
  statement_use use(s);
  const int rc = sqlite3_step(s);
  if (rc != SQLITE_ROW) return stmt_error(path_, db_.get(), s, rc);
  return static_cast<std::int64_t>(sqlite3_column_int64(s, 0));
}

}  // namespace canopy
