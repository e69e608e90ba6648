#include "runtime/sqlite_util.hpp"

#include <filesystem>
#include <utility>

namespace canopy::detail {

namespace {

/// spec.busy_hint if `rc` says another connection holds the lock, else "".
std::string busy_hint(const database_spec& spec, int rc) {
  return (rc & 0xff) == SQLITE_BUSY ? std::string(spec.busy_hint) : std::string();
}

/// "<label>: '<path>'" + `what`: the start of the open() errors about the file.
std::string file_error(const database_spec& spec, const std::string& path, std::string_view what) {
  return std::string(spec.label) + ": '" + path + "'" + std::string(what);
}

/// A file that is not a database, or a damaged one, is an error naming the
/// file; never a silent fresh start.
expected<void> check_sound(const database_spec& spec, const std::string& path, sqlite3* db) {
  std::vector<std::string> rows;
  const int rc = query_text_rows(db, "PRAGMA quick_check", rows, 8);
  if (rc != SQLITE_OK)
    return make_error(errc::store_error,
                      file_error(spec, path, " is not a usable SQLite database: ") +
                        sqlite3_errmsg(db) + " (PRAGMA quick_check)" + busy_hint(spec, rc));
  if (rows.size() != 1 || rows[0] != "ok") {
    std::string msg = file_error(spec, path, " is corrupt: PRAGMA quick_check reports: ");
    for (std::size_t i = 0; i < rows.size(); ++i)
      msg += (i ? "; " : "") + rows[i];
    return make_error(errc::store_error, std::move(msg));
  }
  return {};
}

/// Whose file is it, and which schema?
expected<void> check_identity(const database_spec& spec, const std::string& path, sqlite3* db) {
  auto app_id = query_int(spec.label, path, db, "PRAGMA application_id");
  if (!app_id)
    return std::move(app_id).err();
  if (*app_id != 0 && *app_id != spec.application_id)
    return make_error(errc::incompatible,
                      file_error(spec, path, " belongs to another application (application_id ") +
                        std::to_string(*app_id) + ")");
  auto version = query_int(spec.label, path, db, "PRAGMA user_version");
  if (!version)
    return std::move(version).err();
  if (*version > spec.schema_version)
    return make_error(errc::incompatible, file_error(spec, path, " has schema version ") +
                                            std::to_string(*version) +
                                            ", newer than this build supports (" +
                                            std::to_string(spec.schema_version) + ")");
  if (*app_id == 0 && *version == 0) {
    // A file with user_version 0 must be one we create now: empty.
    auto tables = query_int(spec.label, path, db, "SELECT count(*) FROM sqlite_schema");
    if (!tables)
      return std::move(tables).err();
    if (*tables != 0)
      return make_error(errc::incompatible,
                        file_error(spec, path, " is an SQLite database of another application"));
  }
  return {};
}

expected<void> use_wal(const database_spec& spec, const std::string& path, sqlite3* db) {
  constexpr const char* sql = "PRAGMA journal_mode = WAL";
  std::vector<std::string> rows;
  const int rc = query_text_rows(db, sql, rows);
  if (rc != SQLITE_OK) {
    auto e = sql_error(spec.label, path, db, sql, rc);
    e.message += busy_hint(spec, rc);
    return e;
  }
  if (rows.empty() || rows[0] != "wal")
    return make_error(errc::store_error,
                      file_error(spec, path, " cannot use WAL mode (journal_mode is '") +
                        (rows.empty() ? std::string() : rows[0]) +
                        "'); is it on a network file system?");
  return {};
}

/// Runs each migration the file has not had yet, in its own transaction
/// together with the bump of user_version (and the stamp of application_id).
expected<void> migrate(const database_spec& spec, const std::string& path, sqlite3* db) {
  const std::string_view label = spec.label;
  for (const auto& m : spec.migrations) {
    if (auto r = exec(label, path, db, "BEGIN IMMEDIATE"); !r) {
      auto e = std::move(r).err();
      e.message += busy_hint(spec, sqlite3_extended_errcode(db));
      return e;
    }
    auto rollback_on_error = [&](error e) -> expected<void> {
      sqlite3_exec(db, "ROLLBACK", nullptr, nullptr, nullptr);
      return e;
    };
    auto current = query_int(label, path, db, "PRAGMA user_version");
    if (!current)
      return rollback_on_error(std::move(current).err());
    if (*current < m.version) {
      if (auto r = exec(label, path, db, m.sql,
                        "migration to schema version " + std::to_string(m.version));
          !r)
        return rollback_on_error(std::move(r).err());
      const std::string bump = "PRAGMA user_version = " + std::to_string(m.version) +
                               "; PRAGMA application_id = " + std::to_string(spec.application_id);
      if (auto r = exec(label, path, db, bump.c_str()); !r)
        return rollback_on_error(std::move(r).err());
    }
    if (auto r = exec(label, path, db, "COMMIT"); !r)
      return rollback_on_error(std::move(r).err());
  }
  return {};
}

}  // namespace

expected<void> prepare_statements(std::string_view label, const std::string& path, sqlite3* db,
                                  std::span<const statement_slot> slots) {
  for (const auto& slot : slots) {
    sqlite3_stmt* raw = nullptr;
    const int rc = sqlite3_prepare_v3(db, slot.sql, -1, SQLITE_PREPARE_PERSISTENT, &raw, nullptr);
    *slot.stmt = sql_statement(raw);
    if (rc != SQLITE_OK)
      return sql_error(label, path, db, slot.sql, rc);
  }
  return {};
}

expected<std::string> file_in_data_dir(std::string_view label, const std::string& data_dir,
                                       std::string_view file_name) {
  namespace fs = std::filesystem;
  const std::string who(label);
  if (data_dir.empty())
    return make_error(errc::invalid_argument, who + ": data_dir is empty");
  std::error_code ec;
  fs::create_directories(data_dir, ec);
  if (ec)
    return make_error(errc::io_error,
                      who + ": cannot create data directory '" + data_dir + "': " + ec.message());
  if (!fs::is_directory(data_dir, ec))
    return make_error(errc::io_error,
                      who + ": data directory '" + data_dir + "' is not a directory");
  return (fs::path(data_dir) / file_name).string();
}

expected<std::unique_ptr<sqlite3, sqlite_closer>> open_database(const database_spec& spec,
                                                                const std::string& path) {
  sqlite3* raw = nullptr;
  const int flags =
    SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX | SQLITE_OPEN_EXRESCODE;
  const int rc = sqlite3_open_v2(path.c_str(), &raw, flags, nullptr);
  std::unique_ptr<sqlite3, sqlite_closer> db(raw);  // even on failure, raw (if any) must be closed
  if (rc != SQLITE_OK)
    return make_error(errc::store_error,
                      std::string(spec.label) + ": cannot open '" + path +
                        "': " + (raw != nullptr ? sqlite3_errmsg(raw) : sqlite3_errstr(rc)));
  sqlite3_extended_result_codes(raw, 1);
  sqlite3_busy_timeout(raw, spec.busy_timeout_ms);

  // SQLite silently opens a write-protected file read-only: refuse it here
  // rather than at the first write.
  if (sqlite3_db_readonly(raw, "main") == 1)
    return make_error(errc::store_error,
                      file_error(spec, path, " is not writable (SQLite opened it read-only)"));

  if (spec.quick_check)
    if (auto r = check_sound(spec, path, raw); !r)
      return std::move(r).err();
  if (auto r = check_identity(spec, path, raw); !r)
    return std::move(r).err();
  if (auto r = use_wal(spec, path, raw); !r)
    return std::move(r).err();
  if (auto r = exec(spec.label, path, raw, spec.pragmas); !r)
    return std::move(r).err();
  if (auto r = migrate(spec, path, raw); !r)
    return std::move(r).err();
  return db;
}

}  // namespace canopy::detail
