// Small helpers over SQLite's C API shared by the stores (runtime/store.cpp's
// node_store and runtime/message_store.cpp): statements, errors, and opening,
// checking and migrating a store's file. Internal to runtime/: nothing here is
// part of any public API.
//
// Every helper reports a failure as an error whose message starts with the
// store's label ("store", "message store") and names the file, the statement
// and sqlite3_errmsg(); nothing throws.
#pragma once

#include "runtime/expected.hpp"
#include "runtime/store.hpp"  // detail::sql_statement, detail::sqlite_closer

#include <sqlite3.h>

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace canopy::detail {

/// Resets a statement and clears its bindings when the scope ends, so that no
/// statement keeps a read transaction (and thus the WAL) pinned.
class statement_use {
 public:
  /// Borrows `s`; it must outlive this object.
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

/// Binds parameters 1, 2, ... in order; remembers the first failure. Strings and
/// blobs are bound SQLITE_STATIC: they must stay valid until the statement is
/// reset (a statement_use declared before the binder guarantees it).
class binder {
 public:
  /// Binds into `s` (borrowed).
  explicit binder(sqlite3_stmt* s) noexcept : s_(s) {}

  /// Binds the next parameter as UTF-8 text.
  binder& text(std::string_view v) {
    // A null pointer would bind SQL NULL; an empty view may have one.
    const char* p = v.data() != nullptr ? v.data() : "";
    if (rc_ == SQLITE_OK)
      rc_ = sqlite3_bind_text64(s_, ++idx_, p, v.size(), SQLITE_STATIC, SQLITE_UTF8);
    return *this;
  }
  /// Binds the next parameter as a blob.
  binder& blob(std::string_view v) {
    const char* p = v.data() != nullptr ? v.data() : "";
    if (rc_ == SQLITE_OK)
      rc_ = sqlite3_bind_blob64(s_, ++idx_, p, v.size(), SQLITE_STATIC);
    return *this;
  }
  /// Binds the next parameter as an integer.
  binder& i64(std::int64_t v) {
    if (rc_ == SQLITE_OK)
      rc_ = sqlite3_bind_int64(s_, ++idx_, v);
    return *this;
  }
  /// SQLITE_OK, or the code of the first bind that failed.
  int rc() const noexcept { return rc_; }

 private:
  sqlite3_stmt* s_;
  int rc_ = SQLITE_OK;
  int idx_ = 0;
};

/// Column `col` of the current row as a string (empty for NULL).
inline std::string column_text(sqlite3_stmt* s, int col) {
  const auto* p = sqlite3_column_text(s, col);
  const int n = sqlite3_column_bytes(s, col);
  return p != nullptr ? std::string(reinterpret_cast<const char*>(p), static_cast<std::size_t>(n))
                      : std::string();
}

/// Column `col` of the current row as bytes, valid until the next step/reset.
inline std::string_view column_blob(sqlite3_stmt* s, int col) {
  const void* p = sqlite3_column_blob(s, col);
  const int n = sqlite3_column_bytes(s, col);
  return p != nullptr ? std::string_view(static_cast<const char*>(p), static_cast<std::size_t>(n))
                      : std::string_view();
}

/// "<label> '<file>': `<sql>` failed: <sqlite message> (<code name>)".
inline error sql_error(std::string_view label, const std::string& path, sqlite3* db,
                       std::string_view sql, int rc) {
  std::string msg = std::string(label) + " '" + path + "': `" + std::string(sql) + "` failed: ";
  msg += db != nullptr ? sqlite3_errmsg(db) : sqlite3_errstr(rc);
  msg += " (";
  msg += sqlite3_errstr(rc);
  msg += ")";
  return make_error(errc::store_error, std::move(msg));
}

/// sql_error for a prepared statement (its SQL text is quoted).
inline error stmt_error(std::string_view label, const std::string& path, sqlite3* db,
                        sqlite3_stmt* s, int rc) {
  const char* sql = sqlite3_sql(s);
  return sql_error(label, path, db, sql != nullptr ? sql : "?", rc);
}

/// Runs SQL text (one or more statements, no rows wanted). `what` replaces the
/// SQL in the error message when given (e.g. "migration to schema version 2").
inline expected<void> exec(std::string_view label, const std::string& path, sqlite3* db,
                           const char* sql, std::string_view what = {}) {
  char* err = nullptr;
  const int rc = sqlite3_exec(db, sql, nullptr, nullptr, &err);
  if (rc == SQLITE_OK)
    return {};
  std::string msg = std::string(label) + " '" + path + "': `" +
                    std::string(what.empty() ? std::string_view(sql) : what) +
                    "` failed: " + (err != nullptr ? err : sqlite3_errmsg(db)) + " (" +
                    sqlite3_errstr(rc) + ")";
  sqlite3_free(err);
  return make_error(errc::store_error, std::move(msg));
}

/// Runs a statement returning one integer (a PRAGMA, a count); 0 if no row.
inline expected<std::int64_t> query_int(std::string_view label, const std::string& path,
                                        sqlite3* db, const char* sql) {
  sqlite3_stmt* raw = nullptr;
  int rc = sqlite3_prepare_v2(db, sql, -1, &raw, nullptr);
  sql_statement stmt(raw);
  if (rc != SQLITE_OK)
    return sql_error(label, path, db, sql, rc);
  std::int64_t v = 0;
  rc = sqlite3_step(raw);
  if (rc == SQLITE_ROW) {
    v = sqlite3_column_int64(raw, 0);
    rc = sqlite3_step(raw);
  }
  if (rc != SQLITE_DONE)
    return sql_error(label, path, db, sql, rc);
  return v;
}

/// Runs a statement returning rows of one text column (PRAGMAs), keeping at
/// most `max_rows` of them. Returns SQLite's result code (SQLITE_OK on success).
inline int query_text_rows(sqlite3* db, const char* sql, std::vector<std::string>& rows,
                           std::size_t max_rows = 16) {
  sqlite3_stmt* raw = nullptr;
  int rc = sqlite3_prepare_v2(db, sql, -1, &raw, nullptr);
  sql_statement stmt(raw);
  if (rc != SQLITE_OK)
    return rc;
  while ((rc = sqlite3_step(raw)) == SQLITE_ROW) {
    if (rows.size() < max_rows)
      rows.push_back(column_text(raw, 0));
  }
  return rc == SQLITE_DONE ? SQLITE_OK : rc;
}

/// Runs a prepared statement that returns a row and gives its first column as
/// an integer (a count, a PRAGMA); the statement is reset afterwards.
inline expected<std::int64_t> step_int(std::string_view label, const std::string& path, sqlite3* db,
                                       sqlite3_stmt* s) {
  statement_use use(s);
  const int rc = sqlite3_step(s);
  if (rc != SQLITE_ROW)
    return stmt_error(label, path, db, s, rc);
  return static_cast<std::int64_t>(sqlite3_column_int64(s, 0));
}

/// A statement to prepare once and keep for the connection's lifetime.
struct statement_slot {
  sql_statement* stmt;  ///< where the prepared statement goes (borrowed)
  const char* sql;      ///< its SQL text
};

/// Prepares every slot's statement (SQLITE_PREPARE_PERSISTENT), in order;
/// stops at the first that fails (sql_error naming its SQL).
expected<void> prepare_statements(std::string_view label, const std::string& path, sqlite3* db,
                                  std::span<const statement_slot> slots);

/// One step of a store's schema. Append-only: a released step is never edited;
/// a change of schema is a new step with the next version.
struct migration {
  int version;      ///< PRAGMA user_version once this step has run
  const char* sql;  ///< the step's statements
};

/// What a store's file must be, and how the store names itself in errors.
struct database_spec {
  /// Starts every error message: "store", "message store".
  std::string_view label;
  /// PRAGMA application_id stamped in the files this store creates; a file
  /// with another non-zero id is refused.
  int application_id = 0;
  /// The schema the migrations lead to (a newer file is refused).
  int schema_version = 0;
  /// PRAGMA busy_timeout of the connection.
  int busy_timeout_ms = 0;
  /// Run PRAGMA quick_check (one full read of the file) on open.
  bool quick_check = true;
  /// Appended to the message when PRAGMA quick_check, the switch to WAL or a
  /// migration's BEGIN IMMEDIATE fails with SQLITE_BUSY (another connection
  /// holds the lock); empty = nothing.
  std::string_view busy_hint;
  /// Run after WAL is on and before the migrations (synchronous, cache size,
  /// ...); borrowed for the open_database() call.
  const char* pragmas = "";
  /// The schema's steps, oldest first; the last one's version is schema_version.
  std::span<const migration> migrations;
};

/// Creates `data_dir` (and its parents) if needed and returns the path of
/// `file_name` in it. invalid_argument if `data_dir` is empty; io_error if it
/// cannot be created or is not a directory.
expected<std::string> file_in_data_dir(std::string_view label, const std::string& data_dir,
                                       std::string_view file_name);

/// Opens (creating if needed) the store's file at `path` for reading and
/// writing, and checks it before any change: writable, a sound SQLite database
/// (PRAGMA quick_check, if asked), ours (application_id), not newer than this
/// build (user_version), and empty if it has neither id nor version. Then turns
/// on WAL, runs spec.pragmas and migrates the schema to spec.schema_version, one
/// step per transaction (BEGIN IMMEDIATE takes the write lock before reading
/// user_version, so two processes opening a new file do not both migrate it).
/// store_error if the file cannot be opened, written or checked, or is corrupt;
/// incompatible if it belongs to another application or a newer schema. Never
/// falls back to an in-memory database.
expected<std::unique_ptr<sqlite3, sqlite_closer>> open_database(const database_spec& spec,
                                                                const std::string& path);

}  // namespace canopy::detail
