// canopy::node_store — the node's durable state in one SQLite file
// (DESIGN.md "One node, as a tree of actors": core/store).
//
// `data_dir/canopy.db`, in WAL mode with synchronous=FULL: a write that returned
// is on disk. It holds the last applied deployment, module status, the reported
// properties of each module, and the messages that reached the $upstream
// endpoint of a node with no parent — on the hub, the fleet's telemetry store,
// queried by source device and time (`canopyctl telemetry`) and watched live
// (`canopyctl monitor`).
//
// Threading: a node_store is NOT thread-safe. It has one owner at a time (the
// store actor, or a test, or a tool); that owner may call any member from the
// thread it runs on. Handing it to another owner needs a happens-before edge
// (e.g. a message between actors). Two node_store objects (or processes) may
// open the same file: SQLite's locking serializes them, waiting up to
// busy_timeout before a write fails with a store_error.
//
// Errors: every SQLite failure becomes errc::store_error with the file name,
// the statement and sqlite3_errmsg(); nothing throws.
#pragma once

#include "runtime/expected.hpp"
#include "runtime/clock.hpp"

#include "gateway/node_control.hpp"

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

// SQLite's handle types (typedef'd structs in <sqlite3.h>), kept out of this header.
struct sqlite3;
struct sqlite3_stmt;

namespace canopy {

namespace detail {

/// Owns one prepared statement; finalizes it on destruction. Movable, not copyable.
/// Internal to node_store (exposed only because node_store holds them as members).
class sql_statement {
 public:
  /// An empty statement (nothing prepared).
  sql_statement() = default;
  /// Takes ownership of `stmt` (may be null).
  explicit sql_statement(sqlite3_stmt* stmt) noexcept : stmt_(stmt) {}
  ~sql_statement();
  sql_statement(sql_statement&& other) noexcept;
  sql_statement& operator=(sql_statement&& other) noexcept;
  sql_statement(const sql_statement&) = delete;
  sql_statement& operator=(const sql_statement&) = delete;

  /// The raw statement, borrowed.
  sqlite3_stmt* get() const noexcept { return stmt_; }

 private:
  sqlite3_stmt* stmt_ = nullptr;
};

/// Closes the connection (sqlite3_close_v2) on destruction.
struct sqlite_closer {
  /// Closes `db`.
  void operator()(sqlite3* db) const noexcept;
};

}  // namespace detail

/// The last applied deployment, as stored.
struct stored_deployment {
  std::string manifest_json;  ///< the manifest as given to save_deployment
  std::string base_dir;       ///< directory relative library paths resolve against
  std::int64_t version = 0;   ///< 1 for the first deployment saved in this store, +1 per save
  std::int64_t applied_ms = 0;  ///< wall clock (ms since epoch) when it was saved
};

/// The runtime state of one module, as persisted across node restarts.
struct module_state_record {
  std::string name;
  std::string status;               ///< running | stopped | failed | backoff | unhealthy
  int restart_count = 0;
  std::int64_t last_start_ms = 0;   ///< wall clock, ms since epoch; 0 = never
  std::int64_t last_exit_ms = 0;    ///< wall clock, ms since epoch; 0 = never
  std::string last_exit_reason;
  bool operator==(const module_state_record&) const = default;
};

/// One message to append to the $upstream table. Borrows its strings: they must
/// stay valid for the duration of append_upstream (e.g. `msg.encoded()` of a
/// message the caller holds). The bytes are stored as given, not re-encoded.
struct upstream_entry {
  std::string_view source_module;  ///< module that sent it
  std::string_view output;         ///< its output name
  std::int64_t enqueued_ms = 0;    ///< wall clock when it reached $upstream
  std::string_view encoded;        ///< message::encoded() bytes
  std::string_view source_device = {};  ///< connectionDeviceId of the sender
};

/// The node's SQLite store. See the file comment for threading and errors.
class node_store {
 public:
  /// Schema version this build writes (PRAGMA user_version after open()).
  static constexpr int current_schema_version = 2;

  /// Default bound of the $upstream table (see trim_upstream).
  static constexpr std::int64_t default_upstream_keep = 100000;

  /// Most records one query_upstream call returns (a larger limit is capped).
  static constexpr std::size_t max_query_limit = 10000;

  /// How long a write waits for another connection's lock (PRAGMA busy_timeout).
  static constexpr int busy_timeout_ms = 5000;

  /// Opens (creating if needed) `data_dir` and `data_dir/canopy.db`, checks it
  /// (PRAGMA quick_check), switches to WAL + synchronous=FULL and migrates the
  /// schema to current_schema_version. Errors name the file and SQLite's message:
  /// io_error if the directory cannot be created; store_error if the file cannot
  /// be opened or written, is not a database, or is corrupt; incompatible if it
  /// was written by a newer Canopy or belongs to another application. Never falls
  /// back to an in-memory database. `wall_clock` (borrowed; must outlive the
  /// store; null = the system clock) stamps applied_ms. Costs one full read of
  /// the file (quick_check).
  static expected<std::unique_ptr<node_store>> open(const std::string& data_dir,
                                                    const clock* wall_clock = nullptr);

 private:
  /// Only open() can make one, so only open() can construct a node_store.
  struct token {
    explicit token() = default;
  };

 public:
  /// For open() only (token is private); use open().
  node_store(token, std::string path, const clock* wall_clock);

  ~node_store();
  node_store(const node_store&) = delete;
  node_store& operator=(const node_store&) = delete;

  /// Full path of the database file.
  const std::string& path() const noexcept { return path_; }

  /// The schema version stored in the file (PRAGMA user_version).
  expected<int> schema_version();

  // -- deployment ---------------------------------------------------------------

  /// Replaces the stored deployment with this one (the JSON is stored as given,
  /// not validated) and returns its version: previous version + 1, starting at 1.
  expected<std::int64_t> save_deployment(const std::string& manifest_json,
                                         const std::string& base_dir);

  /// The last saved deployment, or nullopt if none was ever saved.
  expected<std::optional<stored_deployment>> load_deployment();

  // -- module status ------------------------------------------------------------

  /// Inserts or replaces the record of `rec.name`.
  expected<void> save_module_state(const module_state_record& rec);

  /// Every stored record, ordered by name.
  expected<std::vector<module_state_record>> load_module_states();

  /// Forgets module `name` (no error if it is not stored).
  expected<void> delete_module_state(const std::string& name);

  // -- reported properties ------------------------------------------------------

  /// Inserts or replaces the reported properties (a JSON document, stored as
  /// given) of `module`.
  expected<void> save_reported(const std::string& module, const std::string& json);

  /// The reported properties of `module`, or nullopt if none are stored.
  expected<std::optional<std::string>> load_reported(const std::string& module);

  /// Forgets the reported properties of `module` (no error if none are stored).
  expected<void> delete_reported(const std::string& module);

  // -- $upstream messages ------------------------------------------------------

  /// Appends `entries` in one transaction (all or none) and returns the seq
  /// assigned to each, in order. Seqs increase strictly and are never reused,
  /// even after trim_upstream or a reopen. An empty batch writes nothing.
  /// With keep_last_n > 0 the same transaction deletes the records whose seq
  /// is more than keep_last_n below the newest (so, about as many as it adds).
  expected<std::vector<std::int64_t>> append_upstream(std::span<const upstream_entry> entries,
                                                      std::int64_t keep_last_n = 0);

  /// At most `limit` records with seq > after_seq, in seq order, each decoded
  /// with message::decode (one copy of the bytes). A stored message that does not
  /// decode is a store_error naming its seq.
  expected<std::vector<upstream_record>> read_upstream(std::int64_t after_seq, std::size_t limit);

  /// The records of `device` ("" = every device) with enqueued_ms >= since_ms
  /// and seq > after_seq, oldest (lowest seq) first, at most `limit` of them
  /// (capped at max_query_limit; 0 = none). Page through a result by passing the
  /// last seq returned as the next after_seq. With a device, the scan covers
  /// only that device's records since since_ms (index upstream_by_device), then
  /// sorts them by seq; without, it walks the table in seq order from after_seq,
  /// at most the whole table (bounded by trim_upstream). Decoding and errors as
  /// in read_upstream.
  expected<std::vector<upstream_record>> query_upstream(const std::string& device,
                                                        std::int64_t since_ms,
                                                        std::int64_t after_seq, std::size_t limit);

  /// Deletes all but the newest `keep_last_n` records; returns how many went.
  expected<std::int64_t> trim_upstream(std::int64_t keep_last_n = default_upstream_keep);

  /// Number of records in the $upstream table.
  expected<std::int64_t> upstream_count();

  /// The highest seq ever assigned (0 if none), including trimmed records.
  expected<std::int64_t> last_upstream_seq();

 private:
  expected<void> prepare_statements();
  /// Steps `s` (bound by the caller) and decodes every row it returns
  /// (seq, enqueued_ms, source_module, output, message, source_device).
  expected<std::vector<upstream_record>> collect_upstream(sqlite3_stmt* s);
  std::int64_t wall_ms() const;
  /// The store_error for statement `s` failing with `rc`, naming this file.
  error stmt_error(sqlite3_stmt* s, int rc) const;

  std::string path_;
  const clock* wall_clock_;
  // Declared before the statements so it is destroyed after them.
  std::unique_ptr<sqlite3, detail::sqlite_closer> db_;

  detail::sql_statement begin_;
  detail::sql_statement commit_;
  detail::sql_statement rollback_;
  detail::sql_statement user_version_;
  detail::sql_statement save_deployment_;
  detail::sql_statement load_deployment_;
  detail::sql_statement save_module_state_;
  detail::sql_statement load_module_states_;
  detail::sql_statement delete_module_state_;
  detail::sql_statement save_reported_;
  detail::sql_statement load_reported_;
  detail::sql_statement delete_reported_;
  detail::sql_statement append_upstream_;
  detail::sql_statement read_upstream_;
  detail::sql_statement query_upstream_all_;
  detail::sql_statement query_upstream_device_;
  detail::sql_statement trim_upstream_;
  detail::sql_statement trim_upstream_below_;
  detail::sql_statement count_upstream_;
  detail::sql_statement last_upstream_seq_;
};

}  // namespace canopy
