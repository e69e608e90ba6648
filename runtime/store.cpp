#include "runtime/store.hpp"

#include "runtime/sqlite_util.hpp"

#include <sqlite3.h>

#include <algorithm>
#include <chrono>
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

using detail::binder;
using detail::column_blob;
using detail::column_text;
using detail::statement_use;

constexpr std::string_view label = "store";

/// Application id stamped in the file header ("CANO"), so that opening some
/// other program's SQLite file is a clear error rather than a migration of it.
constexpr int application_id = 0x43414e4f;

// Append-only: a released migration is never edited; a change of schema is a new
// entry with the next version. Each runs in its own transaction together with
// the bump of PRAGMA user_version.
constexpr detail::migration migrations[] = {
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
    // The hub keeps the fleet's telemetry here: each record names the device it
    // came from (connectionDeviceId; '' for records stored before), and the
    // index serves `canopyctl telemetry --device X --since T`. One more B-tree
    // insert per appended row, inside the batch's one transaction.
    {2, R"sql(
ALTER TABLE upstream ADD COLUMN source_device TEXT NOT NULL DEFAULT '';
CREATE INDEX upstream_by_device ON upstream (source_device, enqueued_ms);
)sql"},
};

static_assert(std::size(migrations) > 0 &&
                  migrations[std::size(migrations) - 1].version == node_store::current_schema_version,
              "the last migration must produce current_schema_version");

}  // namespace

// -- node_store ----------------------------------------------------------------

node_store::node_store(token, std::string path, const clock* wall_clock)
    : path_(std::move(path)), wall_clock_(wall_clock) {}

node_store::~node_store() = default;

expected<std::unique_ptr<node_store>> node_store::open(const std::string& data_dir,
                                                       const clock* wall_clock) {
  auto path = detail::file_in_data_dir(label, data_dir, "canopy.db");
  if (!path) return std::move(path).err();
  auto store = std::make_unique<node_store>(token{}, *path, wall_clock);

  detail::database_spec spec;
  spec.label = label;
  spec.application_id = application_id;
  spec.schema_version = current_schema_version;
  spec.busy_timeout_ms = busy_timeout_ms;
  spec.quick_check = true;
  // 16 MiB of page cache (SQLite's default is 2 MiB): on the hub the
  // telemetry table and its index outgrow 2 MiB at once, and every append
  // then reads its pages back from the OS (pread) — a tenth of the hub's CPU
  // in bench-chain.
  spec.pragmas = "PRAGMA synchronous = FULL; PRAGMA cache_size = -16384; PRAGMA temp_store = MEMORY";
  spec.migrations = migrations;
  auto db = detail::open_database(spec, *path);
  if (!db) return std::move(db).err();
  store->db_ = std::move(*db);

  if (auto r = store->prepare_statements(); !r) return std::move(r).err();
  return store;
}

expected<void> node_store::prepare_statements() {
  const detail::statement_slot entries[] = {
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
       "INSERT INTO upstream (enqueued_ms, source_module, output, message, source_device) "
       "VALUES (?1, ?2, ?3, ?4, ?5)"},
      {&read_upstream_,
       "SELECT seq, enqueued_ms, source_module, output, message, source_device FROM upstream "
       "WHERE seq > ?1 ORDER BY seq LIMIT ?2"},
      {&query_upstream_all_,
       "SELECT seq, enqueued_ms, source_module, output, message, source_device FROM upstream "
       "WHERE seq > ?1 AND enqueued_ms >= ?2 ORDER BY seq LIMIT ?3"},
      // INDEXED BY: the device's records since T, whatever the planner would
      // guess for ORDER BY seq (it has no statistics); an error if the index
      // were missing, rather than a silent full scan.
      {&query_upstream_device_,
       "SELECT seq, enqueued_ms, source_module, output, message, source_device FROM upstream "
       "INDEXED BY upstream_by_device "
       "WHERE source_device = ?4 AND enqueued_ms >= ?2 AND seq > ?1 ORDER BY seq LIMIT ?3"},
      {&trim_upstream_,
       "DELETE FROM upstream WHERE seq <= "
       "(SELECT seq FROM upstream ORDER BY seq DESC LIMIT 1 OFFSET ?1)"},
      {&trim_upstream_below_, "DELETE FROM upstream WHERE seq <= ?1"},
      {&count_upstream_, "SELECT count(*) FROM upstream"},
      {&last_upstream_seq_,
       "SELECT COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'upstream'), 0)"},
  };
  return detail::prepare_statements(label, path_, db_.get(), entries);
}

std::int64_t node_store::wall_ms() const {
  if (wall_clock_ != nullptr) return wall_clock_->wall_ms();
  using namespace std::chrono;
  return duration_cast<milliseconds>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

error node_store::stmt_error(sqlite3_stmt* s, int rc) const {
  return detail::stmt_error(label, path_, db_.get(), s, rc);
}

expected<int> node_store::schema_version() {
  auto v = detail::step_int(label, path_, db_.get(), user_version_.get());
  if (!v) return std::move(v).err();
  return static_cast<int>(*v);
}

// -- deployment ---------------------------------------------------------------

expected<std::int64_t> node_store::save_deployment(const std::string& manifest_json,
                                                   const std::string& base_dir) {
  sqlite3_stmt* s = save_deployment_.get();
  statement_use use(s);
  binder b(s);
  b.text(manifest_json).text(base_dir).i64(wall_ms());
  if (b.rc() != SQLITE_OK) return stmt_error(s, b.rc());
  int rc = sqlite3_step(s);
  if (rc != SQLITE_ROW) return stmt_error(s, rc);
  const std::int64_t version = sqlite3_column_int64(s, 0);
  // Step to the end: with RETURNING the statement (and its implicit
  // transaction) completes only then.
  rc = sqlite3_step(s);
  if (rc != SQLITE_DONE) return stmt_error(s, rc);
  return version;
}

expected<std::optional<stored_deployment>> node_store::load_deployment() {
  sqlite3_stmt* s = load_deployment_.get();
  statement_use use(s);
  const int rc = sqlite3_step(s);
  if (rc == SQLITE_DONE) return std::optional<stored_deployment>();
  if (rc != SQLITE_ROW) return stmt_error(s, rc);
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
  if (b.rc() != SQLITE_OK) return stmt_error(s, b.rc());
  const int rc = sqlite3_step(s);
  if (rc != SQLITE_DONE) return stmt_error(s, rc);
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
  if (rc != SQLITE_DONE) return stmt_error(s, rc);
  return out;
}

expected<void> node_store::delete_module_state(const std::string& name) {
  sqlite3_stmt* s = delete_module_state_.get();
  statement_use use(s);
  binder b(s);
  b.text(name);
  if (b.rc() != SQLITE_OK) return stmt_error(s, b.rc());
  const int rc = sqlite3_step(s);
  if (rc != SQLITE_DONE) return stmt_error(s, rc);
  return {};
}

// -- reported properties ------------------------------------------------------

expected<void> node_store::save_reported(const std::string& module, const std::string& json) {
  sqlite3_stmt* s = save_reported_.get();
  statement_use use(s);
  binder b(s);
  b.text(module).text(json);
  if (b.rc() != SQLITE_OK) return stmt_error(s, b.rc());
  const int rc = sqlite3_step(s);
  if (rc != SQLITE_DONE) return stmt_error(s, rc);
  return {};
}

expected<std::optional<std::string>> node_store::load_reported(const std::string& module) {
  sqlite3_stmt* s = load_reported_.get();
  statement_use use(s);
  binder b(s);
  b.text(module);
  if (b.rc() != SQLITE_OK) return stmt_error(s, b.rc());
  const int rc = sqlite3_step(s);
  if (rc == SQLITE_DONE) return std::optional<std::string>();
  if (rc != SQLITE_ROW) return stmt_error(s, rc);
  return std::optional<std::string>(column_text(s, 0));
}

expected<void> node_store::delete_reported(const std::string& module) {
  sqlite3_stmt* s = delete_reported_.get();
  statement_use use(s);
  binder b(s);
  b.text(module);
  if (b.rc() != SQLITE_OK) return stmt_error(s, b.rc());
  const int rc = sqlite3_step(s);
  if (rc != SQLITE_DONE) return stmt_error(s, rc);
  return {};
}

// -- $upstream messages ------------------------------------------------------

expected<std::vector<std::int64_t>> node_store::append_upstream(
    std::span<const upstream_entry> entries, std::int64_t keep_last_n) {
  std::vector<std::int64_t> seqs;
  if (entries.empty()) return seqs;
  seqs.reserve(entries.size());
  sqlite3* db = db_.get();

  {
    sqlite3_stmt* s = begin_.get();
    statement_use use(s);
    const int rc = sqlite3_step(s);
    if (rc != SQLITE_DONE) return stmt_error(s, rc);
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
    b.i64(e.enqueued_ms).text(e.source_module).text(e.output).blob(e.encoded).text(e.source_device);
    if (b.rc() != SQLITE_OK) return fail(stmt_error(s, b.rc()));
    // The row's seq is its rowid (INTEGER PRIMARY KEY): sqlite3_last_insert_rowid
    // instead of RETURNING, which costs a third of the insert (it materializes
    // the returned row).
    const int rc = sqlite3_step(s);
    if (rc != SQLITE_DONE) return fail(stmt_error(s, rc));
    seqs.push_back(sqlite3_last_insert_rowid(db));
  }
  if (keep_last_n > 0 && seqs.back() > keep_last_n) {
    // The bound, a batch at a time: the records older than the newest
    // keep_last_n seqs, found by the primary key (as many as were appended).
    sqlite3_stmt* t = trim_upstream_below_.get();
    statement_use use(t);
    binder b(t);
    b.i64(seqs.back() - keep_last_n);
    if (b.rc() != SQLITE_OK) return fail(stmt_error(t, b.rc()));
    const int rc = sqlite3_step(t);
    if (rc != SQLITE_DONE) return fail(stmt_error(t, rc));
  }

  {
    sqlite3_stmt* c = commit_.get();
    statement_use use(c);
    const int rc = sqlite3_step(c);
    if (rc != SQLITE_DONE) return fail(stmt_error(c, rc));
  }
  return seqs;
}

expected<std::vector<upstream_record>> node_store::read_upstream(std::int64_t after_seq,
                                                                 std::size_t limit) {
  if (limit == 0) return std::vector<upstream_record>();
  const auto max_limit = static_cast<std::size_t>(std::numeric_limits<std::int64_t>::max());
  sqlite3_stmt* s = read_upstream_.get();
  statement_use use(s);
  binder b(s);
  b.i64(after_seq).i64(static_cast<std::int64_t>(std::min(limit, max_limit)));
  if (b.rc() != SQLITE_OK) return stmt_error(s, b.rc());
  return collect_upstream(s);
}

expected<std::vector<upstream_record>> node_store::query_upstream(const std::string& device,
                                                                  std::int64_t since_ms,
                                                                  std::int64_t after_seq,
                                                                  std::size_t limit) {
  if (limit == 0) return std::vector<upstream_record>();
  sqlite3_stmt* s = device.empty() ? query_upstream_all_.get() : query_upstream_device_.get();
  statement_use use(s);
  binder b(s);
  b.i64(after_seq).i64(since_ms).i64(static_cast<std::int64_t>(std::min(limit, max_query_limit)));
  if (!device.empty()) b.text(device);
  if (b.rc() != SQLITE_OK) return stmt_error(s, b.rc());
  return collect_upstream(s);
}

expected<std::vector<upstream_record>> node_store::collect_upstream(sqlite3_stmt* s) {
  std::vector<upstream_record> out;
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
    r.source_device = column_text(s, 5);
    out.push_back(std::move(r));
  }
  if (rc != SQLITE_DONE) return stmt_error(s, rc);
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
  if (b.rc() != SQLITE_OK) return stmt_error(s, b.rc());
  const int rc = sqlite3_step(s);
  if (rc != SQLITE_DONE) return stmt_error(s, rc);
  return static_cast<std::int64_t>(sqlite3_changes64(db_.get()));
}

expected<std::int64_t> node_store::upstream_count() {
  return detail::step_int(label, path_, db_.get(), count_upstream_.get());
}

expected<std::int64_t> node_store::last_upstream_seq() {
  return detail::step_int(label, path_, db_.get(), last_upstream_seq_.get());
}

}  // namespace canopy
