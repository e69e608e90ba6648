// Reading a store's SQLite file from the side, through a separate read-only
// connection, as the store tests do to check what really is on disk.
#pragma once

#include <catch2/catch.hpp>
#include <sqlite3.h>

#include <cstdint>
#include <string>

namespace canopy::unit_test {

/// The first column of the first row of `sql` as text ("" if no row or NULL).
inline std::string query_text(const std::string& db_path, const std::string& sql) {
  sqlite3* db = nullptr;
  REQUIRE(sqlite3_open_v2(db_path.c_str(), &db, SQLITE_OPEN_READONLY, nullptr) == SQLITE_OK);
  sqlite3_stmt* s = nullptr;
  REQUIRE(sqlite3_prepare_v2(db, sql.c_str(), -1, &s, nullptr) == SQLITE_OK);
  std::string out;
  if (sqlite3_step(s) == SQLITE_ROW) {
    const auto* t = sqlite3_column_text(s, 0);
    out = t ? reinterpret_cast<const char*>(t) : "";
  }
  sqlite3_finalize(s);
  sqlite3_close(db);
  return out;
}

/// The first column of the first row of `sql` as an integer (-1 if no row).
inline std::int64_t query_int(const std::string& db_path, const std::string& sql) {
  auto text = query_text(db_path, sql);
  return text.empty() ? -1 : std::stoll(text);
}

/// SQL counting the messages a message_store keeps: rows of `messages` (shared
/// by several destinations) plus single-destination messages kept in their
/// queue row.
inline constexpr const char* count_stored_messages =
  "SELECT (SELECT count(*) FROM messages) + "
  "(SELECT count(*) FROM queue WHERE typeof(encoded) = 'blob')";

}  // namespace canopy::unit_test
