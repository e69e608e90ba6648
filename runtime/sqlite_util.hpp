// Small helpers over SQLite's C API shared by the stores (runtime/message_store;
// runtime/store.cpp keeps equivalent private copies for now). Internal to
// runtime/: nothing here is part of any public API.
//
// Every helper reports a failure as errc::store_error whose message names the
// store, the file, the statement and sqlite3_errmsg(); nothing throws.
#pragma once

#include "runtime/expected.hpp"
#include "runtime/store.hpp"  // detail::sql_statement, detail::sqlite_closer

#include <sqlite3.h>

#include <cstdint>
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

}  // namespace canopy::detail
