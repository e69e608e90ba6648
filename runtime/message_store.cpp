#include "runtime/message_store.hpp"

#include "runtime/sqlite_util.hpp"

#include <sqlite3.h>

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <limits>
#include <tuple>
#include <unordered_map>
#include <utility>

namespace canopy {

namespace {

using detail::binder;
using detail::column_blob;
using detail::column_text;
using detail::sql_statement;
using detail::statement_use;

constexpr std::string_view label = "message store";

/// Application id stamped in the file header ("CNMQ"), distinct from
/// node_store's, so that opening the wrong file is a clear error.
constexpr int application_id = 0x434e4d51;

constexpr std::int64_t min_limit_bytes = 64 * 1024;

/// Rows per multi-row INSERT in append().
constexpr std::size_t insert_chunk = 64;

/// "prefix (?, ?, ...), (?, ?, ...), ..." with `rows` groups of `columns`.
std::string multi_row_insert(const char* prefix, int columns, std::size_t rows) {
  std::string sql = prefix;
  for (std::size_t r = 0; r < rows; ++r) {
    sql += r == 0 ? " (" : ", (";
    for (int c = 0; c < columns; ++c)
      sql += c == 0 ? "?" : ", ?";
    sql += ")";
  }
  return sql;
}

/// Expired rows dropped per transaction while read() or expire() scan a lane.
constexpr std::size_t expiry_chunk = 4096;

// Append-only: a released migration is never edited; a change of schema is a
// new entry with the next version.
constexpr detail::migration migrations[] = {
  {1, R"sql(
CREATE TABLE counters (
  id              INTEGER PRIMARY KEY CHECK (id = 1),
  last_message_id INTEGER NOT NULL);
INSERT INTO counters (id, last_message_id) VALUES (1, 0);
CREATE TABLE endpoints (
  id   INTEGER PRIMARY KEY,
  name TEXT NOT NULL UNIQUE);
CREATE TABLE lanes (
  endpoint_id INTEGER NOT NULL,
  priority    INTEGER NOT NULL,
  last_seq    INTEGER NOT NULL,
  acked_seq   INTEGER NOT NULL,
  PRIMARY KEY (endpoint_id, priority)) WITHOUT ROWID;
CREATE TABLE messages (
  id            INTEGER PRIMARY KEY,
  enqueued_ms   INTEGER NOT NULL,
  expiry_ms     INTEGER NOT NULL,
  refs          INTEGER NOT NULL,
  source_module TEXT NOT NULL,
  source_output TEXT NOT NULL,
  source_device TEXT NOT NULL,
  encoded       BLOB NOT NULL);
CREATE TABLE queue (
  endpoint_id INTEGER NOT NULL,
  priority    INTEGER NOT NULL,
  seq         INTEGER NOT NULL,
  message_id  INTEGER NOT NULL,
  expiry_ms   INTEGER NOT NULL,
  PRIMARY KEY (endpoint_id, priority, seq)) WITHOUT ROWID;
)sql"},
  // Delivery marks (the highest seq handed to a lane's receiver).
  {2, R"sql(
ALTER TABLE lanes ADD COLUMN delivered_seq INTEGER NOT NULL DEFAULT 0;
)sql"},
  // A message with one destination is kept in its queue row (one B-tree
  // insert instead of two); `encoded` is NULL for rows that refer to `messages`.
  {3, R"sql(
ALTER TABLE queue ADD COLUMN enqueued_ms INTEGER;
ALTER TABLE queue ADD COLUMN source_module TEXT;
ALTER TABLE queue ADD COLUMN source_output TEXT;
ALTER TABLE queue ADD COLUMN source_device TEXT;
ALTER TABLE queue ADD COLUMN encoded BLOB;
)sql"},
};

static_assert(migrations[std::size(migrations) - 1].version ==
                message_store::current_schema_version,
              "the last migration must produce current_schema_version");

bool is_full(int rc) {
  return (rc & 0xff) == SQLITE_FULL;
}

std::int64_t lane_key(std::int64_t endpoint_id, int priority) {
  return endpoint_id * 16 + priority;
}

/// Hash for heterogeneous lookup (string_view into a map keyed by string).
struct name_hash {
  using is_transparent = void;
  std::size_t operator()(std::string_view s) const noexcept {
    return std::hash<std::string_view>{}(s);
  }
};

std::int64_t system_wall_ms() {
  using namespace std::chrono;
  return duration_cast<milliseconds>(std::chrono::system_clock::now().time_since_epoch()).count();
}

/// Holds an exclusive flock(2) on a lock file for as long as it lives.
class owner_lock {
 public:
  owner_lock() = default;
  ~owner_lock() {
    if (fd_ >= 0)
      ::close(fd_);  // releases the lock
  }
  owner_lock(const owner_lock&) = delete;
  owner_lock& operator=(const owner_lock&) = delete;

  /// Takes the lock on `file` (created if missing) without waiting.
  expected<void> take(const std::string& store_path, const std::string& file) {
    fd_ = ::open(file.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd_ < 0)
      return make_error(errc::store_error, "message store '" + store_path +
                                             "': cannot open lock file '" + file +
                                             "': " + std::strerror(errno));
    if (::flock(fd_, LOCK_EX | LOCK_NB) != 0) {
      if (errno == EWOULDBLOCK)
        return make_error(errc::store_error,
                          "message store '" + store_path + "' is in use by another store (lock '" +
                            file + "' is held); is another canopy node using this data directory?");
      return make_error(errc::store_error, "message store '" + store_path + "': cannot lock '" +
                                             file + "': " + std::strerror(errno));
    }
    return {};
  }

 private:
  int fd_ = -1;
};

}  // namespace

// -- impl ----------------------------------------------------------------------

struct message_store::impl {
  struct lane_state {
    std::int64_t endpoint_id = 0;
    int priority = 0;
    std::int64_t last_seq = 0;
    std::int64_t acked_seq = 0;
    std::int64_t delivered_seq = 0;
    std::int64_t length = 0;
  };

  std::string path;
  message_store_options options;
  // Released last: the file is ours until everything else is closed.
  owner_lock lock;
  // Declared before the statements so it is destroyed after them.
  std::unique_ptr<sqlite3, detail::sqlite_closer> db;

  sql_statement begin;
  sql_statement commit;
  sql_statement rollback;
  sql_statement insert_message;
  sql_statement insert_messages;  // insert_chunk rows
  sql_statement insert_queue;
  sql_statement insert_queue_rows;  // insert_chunk rows
  sql_statement insert_inline;
  sql_statement insert_inline_rows;  // insert_chunk rows
  sql_statement insert_endpoint;
  sql_statement upsert_lane;
  sql_statement set_last_id;
  sql_statement read_window;
  sql_statement delete_upto;
  sql_statement delete_one;
  sql_statement release_message;
  sql_statement unref_message;
  sql_statement set_checkpoint;
  sql_statement set_delivered;
  sql_statement scan_head;
  sql_statement page_count;
  sql_statement freelist_count;

  std::unordered_map<std::string, std::int64_t, name_hash, std::equal_to<>> endpoint_ids;
  std::unordered_map<std::int64_t, std::string> endpoint_names;
  std::int64_t last_endpoint_id = 0;
  std::unordered_map<std::int64_t, lane_state> lanes;
  std::int64_t last_id = 0;
  std::int64_t page_size = 4096;

  message_store_counters counters;
  std::array<std::chrono::microseconds, latency_window> latencies{};
  std::size_t latency_count = 0;  // total recorded; the ring index is count % window

  struct queue_row {
    std::int64_t endpoint_id;
    std::int64_t priority;
    std::int64_t seq;
    std::int64_t message_id;
    std::int64_t expiry_ms;
    std::size_t entry;  ///< batch index of its message
  };

  // Scratch, reused to avoid per-call allocation.
  std::vector<std::int64_t> scratch_ids;
  std::vector<queue_row> scratch_rows;
  std::vector<queue_row> scratch_inline;   // single-destination messages
  std::vector<std::size_t> scratch_shared;  // batch indexes of the others
  std::vector<std::int64_t> scratch_expiries;

  std::int64_t now_ms() const {
    return options.wall_clock != nullptr ? options.wall_clock->wall_ms() : system_wall_ms();
  }

  error stmt_error(sqlite3_stmt* s, int rc) const {
    return detail::stmt_error(label, path, db.get(), s, rc);
  }

  /// Binds `values` to parameters 1, 2, ... of a statement that returns no
  /// row, steps it once and resets it. On failure, `*failed_rc` (if given)
  /// receives SQLite's result code.
  expected<void> run(sql_statement& st, std::initializer_list<std::int64_t> values = {},
                     int* failed_rc = nullptr) {
    sqlite3_stmt* s = st.get();
    statement_use use(s);
    auto fail = [&](int rc) -> expected<void> {
      if (failed_rc != nullptr)
        *failed_rc = rc;
      return stmt_error(s, rc);
    };
    binder b(s);
    for (const std::int64_t v : values)
      b.i64(v);
    if (b.rc() != SQLITE_OK)
      return fail(b.rc());
    const int rc = sqlite3_step(s);
    if (rc != SQLITE_DONE)
      return fail(rc);
    return {};
  }

  expected<void> begin_tx() { return run(begin); }
  expected<void> commit_tx() { return run(commit); }
  void rollback_tx() {
    if (sqlite3_get_autocommit(db.get()) == 0) {
      statement_use use(rollback.get());
      sqlite3_step(rollback.get());
    }
  }

  const lane_state* find_lane(std::string_view endpoint, int priority) const {
    auto e = endpoint_ids.find(endpoint);
    if (e == endpoint_ids.end())
      return nullptr;
    auto l = lanes.find(lane_key(e->second, priority));
    return l == lanes.end() ? nullptr : &l->second;
  }
  lane_state* find_lane(std::string_view endpoint, int priority) {
    return const_cast<lane_state*>(std::as_const(*this).find_lane(endpoint, priority));
  }

  std::string lane_name(const lane_state& l) const {
    auto n = endpoint_names.find(l.endpoint_id);
    return "endpoint '" + (n != endpoint_names.end() ? n->second : std::string("?")) +
           "' priority " + std::to_string(l.priority);
  }

  /// Deletes the message `id` if this was its last reference, else decrements
  /// its count. Inside a transaction.
  expected<void> release(std::int64_t id) {
    if (auto r = run(release_message, {id}); !r)
      return r;
    // The reset (in run) keeps the count of the completed statement.
    if (sqlite3_changes(db.get()) > 0)
      return {};
    return run(unref_message, {id});
  }

  /// Runs a lane's DELETE ... RETURNING message_id (parameters endpoint_id,
  /// priority, seq) and releases each message. Returns the number of queue
  /// rows deleted. Inside a transaction.
  expected<std::int64_t> delete_rows(sql_statement& st, const lane_state& lane, std::int64_t seq) {
    sqlite3_stmt* s = st.get();
    scratch_ids.clear();
    std::int64_t deleted = 0;
    {
      statement_use use(s);
      binder b(s);
      b.i64(lane.endpoint_id).i64(lane.priority).i64(seq);
      if (b.rc() != SQLITE_OK)
        return stmt_error(s, b.rc());
      int rc;
      while ((rc = sqlite3_step(s)) == SQLITE_ROW) {
        ++deleted;
        // typeof(): SQLite 3.40.1 (Debian 12) evaluates `encoded IS NULL` wrongly
        // (always false) in a DELETE's RETURNING clause.
        if (sqlite3_column_int(s, 1) != 0)  // refers to a shared `messages` row
          scratch_ids.push_back(sqlite3_column_int64(s, 0));
      }
      if (rc != SQLITE_DONE)
        return stmt_error(s, rc);
    }
    for (const std::int64_t id : scratch_ids)
      if (auto r = release(id); !r)
        return std::move(r).err();
    return deleted;
  }

  /// Deletes the given expired rows of a lane in one transaction and counts them.
  expected<void> drop_expired(lane_state& lane, const std::vector<std::int64_t>& seqs) {
    if (seqs.empty())
      return {};
    if (auto r = begin_tx(); !r)
      return r;
    std::int64_t dropped = 0;
    for (const std::int64_t seq : seqs) {
      auto n = delete_rows(delete_one, lane, seq);
      if (!n) {
        rollback_tx();
        return std::move(n).err();
      }
      dropped += *n;
    }
    if (auto r = commit_tx(); !r) {
      rollback_tx();
      return r;
    }
    lane.length -= dropped;
    counters.dropped_ttl_expiry += dropped;
    return {};
  }

  void record_latency(std::chrono::microseconds d) {
    latencies[latency_count % latency_window] = d;
    ++latency_count;
  }

  expected<void> prepare();
  expected<void> load();
};

expected<void> message_store::impl::prepare() {
  const std::string insert_messages_sql = multi_row_insert(
    "INSERT INTO messages (id, enqueued_ms, expiry_ms, refs, source_module, source_output, "
    "source_device, encoded) VALUES",
    8, insert_chunk);
  const std::string insert_queue_rows_sql =
    multi_row_insert("INSERT INTO queue (endpoint_id, priority, seq, message_id, expiry_ms) VALUES",
                     5, insert_chunk);
  const char* inline_cols =
    "INSERT INTO queue (endpoint_id, priority, seq, message_id, expiry_ms, enqueued_ms, "
    "source_module, source_output, source_device, encoded) VALUES";
  const std::string insert_inline_sql = multi_row_insert(inline_cols, 10, 1);
  const std::string insert_inline_rows_sql = multi_row_insert(inline_cols, 10, insert_chunk);
  const detail::statement_slot entries[] = {
    {&begin, "BEGIN IMMEDIATE"},
    {&insert_messages, insert_messages_sql.c_str()},
    {&insert_queue_rows, insert_queue_rows_sql.c_str()},
    {&insert_inline, insert_inline_sql.c_str()},
    {&insert_inline_rows, insert_inline_rows_sql.c_str()},
    {&commit, "COMMIT"},
    {&rollback, "ROLLBACK"},
    {&insert_message,
     "INSERT INTO messages (id, enqueued_ms, expiry_ms, refs, source_module, source_output, "
     "source_device, encoded) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"},
    {&insert_queue,
     "INSERT INTO queue (endpoint_id, priority, seq, message_id, expiry_ms) "
     "VALUES (?1, ?2, ?3, ?4, ?5)"},
    {&insert_endpoint, "INSERT INTO endpoints (id, name) VALUES (?1, ?2)"},
    {&upsert_lane,
     "INSERT INTO lanes (endpoint_id, priority, last_seq, acked_seq) VALUES (?1, ?2, ?3, 0) "
     "ON CONFLICT (endpoint_id, priority) DO UPDATE SET last_seq = excluded.last_seq"},
    {&set_last_id, "UPDATE counters SET last_message_id = ?1 WHERE id = 1"},
    // LEFT JOIN keeps the queue as the outer loop (seq order from its key) and
    // shows a dangling reference as NULLs instead of hiding it.
    {&read_window,
     "SELECT q.seq, q.message_id, q.expiry_ms, m.id, COALESCE(q.enqueued_ms, m.enqueued_ms), "
     "COALESCE(q.source_module, m.source_module), COALESCE(q.source_output, m.source_output), "
     "COALESCE(q.source_device, m.source_device), COALESCE(q.encoded, m.encoded) "
     "FROM queue AS q LEFT JOIN messages AS m ON q.encoded IS NULL AND m.id = q.message_id "
     "WHERE q.endpoint_id = ?1 AND q.priority = ?2 AND q.seq > ?3 ORDER BY q.seq LIMIT ?4"},
    {&delete_upto,
     "DELETE FROM queue WHERE endpoint_id = ?1 AND priority = ?2 AND seq <= ?3 "
     "RETURNING message_id, typeof(encoded) = 'null'"},
    {&delete_one,
     "DELETE FROM queue WHERE endpoint_id = ?1 AND priority = ?2 AND seq = ?3 "
     "RETURNING message_id, typeof(encoded) = 'null'"},
    {&release_message, "DELETE FROM messages WHERE id = ?1 AND refs <= 1"},
    {&unref_message, "UPDATE messages SET refs = refs - 1 WHERE id = ?1"},
    {&set_checkpoint, "UPDATE lanes SET acked_seq = ?3 WHERE endpoint_id = ?1 AND priority = ?2"},
    {&set_delivered,
     "UPDATE lanes SET delivered_seq = ?3 WHERE endpoint_id = ?1 AND priority = ?2"},
    {&scan_head,
     "SELECT seq, expiry_ms FROM queue WHERE endpoint_id = ?1 AND priority = ?2 AND seq > ?3 "
     "ORDER BY seq LIMIT ?4"},
    {&page_count, "PRAGMA page_count"},
    {&freelist_count, "PRAGMA freelist_count"},
  };
  return detail::prepare_statements(label, path, db.get(), entries);
}

expected<void> message_store::impl::load() {
  sqlite3* h = db.get();
  auto query = [&](const char* sql, auto&& on_row) -> expected<void> {
    sqlite3_stmt* raw = nullptr;
    int rc = sqlite3_prepare_v2(h, sql, -1, &raw, nullptr);
    sql_statement st(raw);
    if (rc != SQLITE_OK)
      return detail::sql_error(label, path, h, sql, rc);
    while ((rc = sqlite3_step(raw)) == SQLITE_ROW)
      on_row(raw);
    if (rc != SQLITE_DONE)
      return detail::sql_error(label, path, h, sql, rc);
    return {};
  };
  if (auto r = query("SELECT id, name FROM endpoints",
                     [&](sqlite3_stmt* s) {
                       const std::int64_t id = sqlite3_column_int64(s, 0);
                       std::string name = column_text(s, 1);
                       endpoint_ids.emplace(name, id);
                       endpoint_names.emplace(id, std::move(name));
                       last_endpoint_id = std::max(last_endpoint_id, id);
                     });
      !r)
    return r;
  if (auto r = query("SELECT endpoint_id, priority, last_seq, acked_seq, delivered_seq FROM lanes",
                     [&](sqlite3_stmt* s) {
                       lane_state l;
                       l.endpoint_id = sqlite3_column_int64(s, 0);
                       l.priority = sqlite3_column_int(s, 1);
                       l.last_seq = sqlite3_column_int64(s, 2);
                       l.acked_seq = sqlite3_column_int64(s, 3);
                       l.delivered_seq = sqlite3_column_int64(s, 4);
                       lanes.emplace(lane_key(l.endpoint_id, l.priority), l);
                     });
      !r)
    return r;
  // Undelivered rows per lane: one pass over the queue's key (no row data).
  std::string bad;
  if (auto r = query("SELECT endpoint_id, priority, count(*), max(seq) FROM queue "
                     "GROUP BY endpoint_id, priority",
                     [&](sqlite3_stmt* s) {
                       const std::int64_t ep = sqlite3_column_int64(s, 0);
                       const int prio = sqlite3_column_int(s, 1);
                       auto it = lanes.find(lane_key(ep, prio));
                       if (it == lanes.end() || it->second.last_seq < sqlite3_column_int64(s, 3)) {
                         if (bad.empty())
                           bad = "queue rows of endpoint id " + std::to_string(ep) + " priority " +
                                 std::to_string(prio) + " have no (or a stale) lane record";
                         return;
                       }
                       it->second.length = sqlite3_column_int64(s, 2);
                     });
      !r)
    return r;
  if (!bad.empty())
    return make_error(errc::store_error, std::string(label) + " '" + path + "' is corrupt: " + bad);
  auto stored_last =
    detail::query_int(label, path, h, "SELECT last_message_id FROM counters WHERE id = 1");
  if (!stored_last)
    return std::move(stored_last).err();
  auto max_id = detail::query_int(label, path, h, "SELECT COALESCE(max(id), 0) FROM messages");
  if (!max_id)
    return std::move(max_id).err();
  last_id = std::max(*stored_last, *max_id);
  auto ps = detail::query_int(label, path, h, "PRAGMA page_size");
  if (!ps)
    return std::move(ps).err();
  page_size = *ps;
  return {};
}

// -- open ----------------------------------------------------------------------

message_store::message_store(std::unique_ptr<impl> p) : impl_(std::move(p)) {}

message_store::~message_store() = default;

expected<std::unique_ptr<message_store>> message_store::open(const std::string& data_dir,
                                                             const message_store_options& options) {
  auto path = detail::file_in_data_dir(label, data_dir, file_name);
  if (!path)
    return std::move(path).err();
  return open_file(*path, options);
}

expected<std::unique_ptr<message_store>> message_store::open_file(
  const std::string& path, const message_store_options& options) {
  if (path.empty())
    return make_error(errc::invalid_argument, "message store: path is empty");
  if (path == ":memory:" || path.rfind("file:", 0) == 0)
    return make_error(errc::invalid_argument,
                      "message store: path '" + path +
                        "' is not a plain file path (an in-memory or URI database is refused)");
  if (options.max_bytes != 0 && options.max_bytes < min_limit_bytes)
    return make_error(errc::invalid_argument,
                      "message store '" + path + "': max_bytes is " +
                        std::to_string(options.max_bytes) + ", below the minimum of " +
                        std::to_string(min_limit_bytes) + " (0 = no limit)");
  if (options.max_bytes < 0)
    return make_error(errc::invalid_argument,
                      "message store '" + path + "': max_bytes is negative");
  if (options.default_ttl <= std::chrono::milliseconds::zero())
    return make_error(errc::invalid_argument, "message store '" + path +
                                                "': default_ttl must be > 0 (got " +
                                                std::to_string(options.default_ttl.count()) +
                                                " ms; use no_expiry for never)");
  if (options.cache_bytes < 0)
    return make_error(errc::invalid_argument,
                      "message store '" + path + "': cache_bytes is negative");

  auto p = std::make_unique<impl>();
  p->path = path;
  p->options = options;
  // One owner per file: two stores appending to one file would each trust
  // their own idea of the next id and seqs.
  if (auto r = p->lock.take(path, path + ".lock"); !r)
    return std::move(r).err();

  const std::string pragmas =
    // auto_vacuum takes effect only on a new file: freed pages are reused
    // (the freelist), never returned to the file system.
    "PRAGMA auto_vacuum = NONE; PRAGMA synchronous = FULL; PRAGMA cache_size = -" +
    std::to_string(options.cache_bytes / 1024) +
    "; PRAGMA journal_size_limit = " + std::to_string(wal_size_limit_bytes) +
    "; PRAGMA mmap_size = 0; PRAGMA temp_store = MEMORY";
  detail::database_spec spec;
  spec.label = label;
  spec.application_id = application_id;
  spec.schema_version = current_schema_version;
  spec.busy_timeout_ms = busy_timeout_ms;
  spec.quick_check = options.verify_on_open;
  spec.busy_hint = " (is another canopy node using this file?)";
  spec.pragmas = pragmas.c_str();
  spec.migrations = migrations;
  auto db = detail::open_database(spec, path);
  if (!db)
    return std::move(db).err();
  p->db = std::move(*db);

  if (auto r = p->load(); !r)
    return std::move(r).err();

  if (options.max_bytes > 0) {
    // SQLite keeps the current page count if the limit is below it.
    const std::string limit = "PRAGMA max_page_count = " + std::to_string(std::max<std::int64_t>(
                                                             1, options.max_bytes / p->page_size));
    if (auto r = detail::query_int(label, path, p->db.get(), limit.c_str()); !r)
      return std::move(r).err();
  }

  if (auto r = p->prepare(); !r)
    return std::move(r).err();
  return std::unique_ptr<message_store>(new message_store(std::move(p)));
}

const std::string& message_store::path() const noexcept {
  return impl_->path;
}

// -- append ----------------------------------------------------------------------

expected<append_result> message_store::append(std::span<const append_entry> batch) {
  impl& m = *impl_;
  append_result result;
  result.first_id = m.last_id + 1;
  result.last_id = m.last_id;
  if (batch.empty())
    return result;

  // Check everything before writing anything.
  std::int64_t batch_bytes = 0;
  for (std::size_t i = 0; i < batch.size(); ++i) {
    const auto& e = batch[i];
    const std::string where = "append: entry " + std::to_string(i);
    if (e.targets.empty())
      return make_error(errc::invalid_argument,
                        where + ": targets is empty (a message needs a lane)");
    for (std::size_t t = 0; t < e.targets.size(); ++t) {
      const auto& tg = e.targets[t];
      if (tg.endpoint.empty())
        return make_error(errc::invalid_argument,
                          where + " target " + std::to_string(t) + ": endpoint is empty");
      if (tg.priority < 0 || tg.priority > max_priority)
        return make_error(errc::invalid_argument, where + " target " + std::to_string(t) +
                                                    ": priority " + std::to_string(tg.priority) +
                                                    " is outside 0.." +
                                                    std::to_string(max_priority));
      if (tg.ttl < std::chrono::milliseconds::zero())
        return make_error(errc::invalid_argument, where + " target " + std::to_string(t) +
                                                    ": ttl is negative (" +
                                                    std::to_string(tg.ttl.count()) + " ms)");
    }
    batch_bytes += static_cast<std::int64_t>(e.msg.encoded_size());
  }

  const auto t0 = std::chrono::steady_clock::now();
  const std::int64_t now = m.now_ms();
  sqlite3* db = m.db.get();

  // In-memory changes are made as we go and undone if the transaction fails.
  struct lane_undo {
    std::int64_t key;
    bool created;
    impl::lane_state before;
  };
  std::vector<lane_undo> touched;
  std::vector<std::int64_t> new_endpoints;
  const std::int64_t last_id_before = m.last_id;
  const std::int64_t last_endpoint_before = m.last_endpoint_id;

  auto undo = [&] {
    m.rollback_tx();
    for (auto it = touched.rbegin(); it != touched.rend(); ++it) {
      if (it->created)
        m.lanes.erase(it->key);
      else
        m.lanes[it->key] = it->before;
    }
    for (const std::int64_t id : new_endpoints) {
      auto n = m.endpoint_names.find(id);
      if (n != m.endpoint_names.end()) {
        m.endpoint_ids.erase(n->second);
        m.endpoint_names.erase(n);
      }
    }
    m.last_id = last_id_before;
    m.last_endpoint_id = last_endpoint_before;
  };
  auto fail = [&](error e, int rc) -> expected<append_result> {
    undo();
    if (is_full(rc)) {
      m.counters.dropped_store_full += static_cast<std::int64_t>(batch.size());
      std::string msg = "store full: message store '" + m.path + "' cannot take a batch of " +
                        std::to_string(batch.size()) + " messages (" + std::to_string(batch_bytes) +
                        " bytes encoded)";
      if (m.options.max_bytes > 0)
        msg += " without exceeding its size limit, or its disk is full (limit " +
               std::to_string(m.options.max_bytes) + " bytes)";
      else
        msg += ": the disk is full (no size limit set)";
      return make_error(errc::unavailable, std::move(msg));
    }
    return e;
  };

  if (auto r = m.begin_tx(); !r) {
    m.rollback_tx();
    return std::move(r).err();
  }

  // Last lane looked up: consecutive targets usually name the same lane.
  std::string_view cached_endpoint;
  int cached_priority = -1;
  impl::lane_state* cached_lane = nullptr;

  auto lane_for = [&](const route_target& tg) -> expected<impl::lane_state*> {
    if (cached_lane != nullptr && tg.priority == cached_priority && tg.endpoint == cached_endpoint)
      return cached_lane;
    std::int64_t ep;
    if (auto it = m.endpoint_ids.find(tg.endpoint); it != m.endpoint_ids.end()) {
      ep = it->second;
    } else {
      ep = ++m.last_endpoint_id;
      sqlite3_stmt* s = m.insert_endpoint.get();
      statement_use use(s);
      binder b(s);
      b.i64(ep).text(tg.endpoint);
      if (b.rc() != SQLITE_OK)
        return m.stmt_error(s, b.rc());
      const int rc = sqlite3_step(s);
      if (rc != SQLITE_DONE)
        return m.stmt_error(s, rc);
      m.endpoint_ids.emplace(std::string(tg.endpoint), ep);
      m.endpoint_names.emplace(ep, std::string(tg.endpoint));
      new_endpoints.push_back(ep);
    }
    const std::int64_t key = lane_key(ep, tg.priority);
    auto it = m.lanes.find(key);
    if (it == m.lanes.end()) {
      impl::lane_state l;
      l.endpoint_id = ep;
      l.priority = tg.priority;
      it = m.lanes.emplace(key, l).first;
      touched.push_back({key, true, {}});
    } else if (std::none_of(touched.begin(), touched.end(),
                            [&](const lane_undo& u) { return u.key == key; })) {
      touched.push_back({key, false, it->second});
    }
    cached_endpoint = tg.endpoint;
    cached_priority = tg.priority;
    cached_lane = &it->second;
    return cached_lane;
  };

  auto expiry_of = [&](std::chrono::milliseconds ttl) -> std::int64_t {
    if (ttl == std::chrono::milliseconds::zero())
      ttl = m.options.default_ttl;
    if (ttl == message_store_options::no_expiry)
      return 0;
    if (ttl.count() > std::numeric_limits<std::int64_t>::max() - now)
      return 0;
    return now + ttl.count();
  };

  // Assign ids and seqs first; then insert the rows insert_chunk at a time with
  // multi-row INSERTs (much of SQLite's cost is per statement, not per row).
  auto& rows_out = m.scratch_rows;
  auto& inline_rows = m.scratch_inline;
  auto& shared = m.scratch_shared;
  auto& expiries = m.scratch_expiries;
  rows_out.clear();
  inline_rows.clear();
  shared.clear();
  expiries.clear();
  for (std::size_t ei = 0; ei < batch.size(); ++ei) {
    const auto& e = batch[ei];
    const std::int64_t id = ++m.last_id;
    std::int64_t msg_expiry = -1;  // the latest of its lanes; 0 = never
    for (const auto& tg : e.targets) {
      auto lane = lane_for(tg);
      if (!lane)
        return fail(std::move(lane).err(), sqlite3_extended_errcode(db));
      impl::lane_state& l = **lane;
      const std::int64_t seq = ++l.last_seq;
      ++l.length;
      const std::int64_t x = expiry_of(tg.ttl);
      msg_expiry = (x == 0 || msg_expiry == 0) ? 0 : std::max(msg_expiry, x);
      (e.targets.size() == 1 ? inline_rows : rows_out)
        .push_back({l.endpoint_id, l.priority, seq, id, x, ei});
    }
    expiries.push_back(msg_expiry);
    if (e.targets.size() > 1)
      shared.push_back(ei);
  }

  int failed_rc = SQLITE_OK;
  auto insert_all = [&](std::size_t n, sql_statement& one, sql_statement& many,
                        auto&& bind_row) -> expected<void> {
    std::size_t i = 0;
    while (i < n) {
      const bool chunk = n - i >= insert_chunk;
      sqlite3_stmt* s = chunk ? many.get() : one.get();
      statement_use use(s);
      binder b(s);
      for (std::size_t k = 0; k < (chunk ? insert_chunk : 1); ++k)
        bind_row(b, i + k);
      i += chunk ? insert_chunk : 1;
      if (b.rc() != SQLITE_OK) {
        failed_rc = b.rc();
        return m.stmt_error(s, b.rc());
      }
      const int rc = sqlite3_step(s);
      if (rc != SQLITE_DONE) {
        failed_rc = rc;
        return m.stmt_error(s, rc);
      }
    }
    return {};
  };
  if (auto r = insert_all(inline_rows.size(), m.insert_inline, m.insert_inline_rows,
                          [&](binder& b, std::size_t i) {
                            const auto& q = inline_rows[i];
                            const auto& e = batch[q.entry];
                            b.i64(q.endpoint_id)
                              .i64(q.priority)
                              .i64(q.seq)
                              .i64(q.message_id)
                              .i64(q.expiry_ms)
                              .i64(now)
                              .text(e.source.module)
                              .text(e.source.output)
                              .text(e.source.device)
                              .blob(e.msg.encoded());
                          });
      !r)
    return fail(std::move(r).err(), failed_rc);
  if (auto r = insert_all(shared.size(), m.insert_message, m.insert_messages,
                          [&](binder& b, std::size_t k) {
                            const std::size_t i = shared[k];
                            const auto& e = batch[i];
                            b.i64(result.first_id + static_cast<std::int64_t>(i))
                              .i64(now)
                              .i64(expiries[i])
                              .i64(static_cast<std::int64_t>(e.targets.size()))
                              .text(e.source.module)
                              .text(e.source.output)
                              .text(e.source.device)
                              .blob(e.msg.encoded());
                          });
      !r)
    return fail(std::move(r).err(), failed_rc);
  if (auto r = insert_all(
        rows_out.size(), m.insert_queue, m.insert_queue_rows,
        [&](binder& b, std::size_t i) {
          const auto& q = rows_out[i];
          b.i64(q.endpoint_id).i64(q.priority).i64(q.seq).i64(q.message_id).i64(q.expiry_ms);
        });
      !r)
    return fail(std::move(r).err(), failed_rc);

  std::int64_t rows = 0;
  for (const auto& u : touched) {
    const impl::lane_state& l = m.lanes.at(u.key);
    rows += l.length - (u.created ? 0 : u.before.length);
    if (auto r = m.run(m.upsert_lane, {l.endpoint_id, l.priority, l.last_seq}, &failed_rc); !r)
      return fail(std::move(r).err(), failed_rc);
  }
  if (auto r = m.run(m.set_last_id, {m.last_id}, &failed_rc); !r)
    return fail(std::move(r).err(), failed_rc);
  if (auto r = m.run(m.commit, {}, &failed_rc); !r)
    return fail(std::move(r).err(), failed_rc);

  result.last_id = m.last_id;
  m.counters.appended += static_cast<std::int64_t>(batch.size());
  m.counters.queued += rows;
  ++m.counters.commits;
  m.record_latency(
    std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - t0));
  return result;
}

// -- read ------------------------------------------------------------------------

expected<message> queued_message::decode() const {
  auto msg = message::decode(encoded);
  if (!msg)
    return make_error(errc::store_error, "message store: message id " + std::to_string(id) +
                                           " (seq " + std::to_string(seq) +
                                           ") does not decode (corrupt)");
  return std::move(*msg);
}

expected<std::vector<queued_message>> message_store::read(std::string_view endpoint, int priority,
                                                          std::int64_t after_seq,
                                                          std::size_t limit) {
  impl& m = *impl_;
  std::vector<queued_message> out;
  if (limit == 0)
    return out;
  impl::lane_state* lane = m.find_lane(endpoint, priority);
  if (lane == nullptr)
    return out;

  const std::size_t max_limit = static_cast<std::size_t>(std::numeric_limits<std::int64_t>::max());
  limit = std::min(limit, max_limit);
  out.reserve(std::min<std::size_t>(limit, 4096));
  const std::int64_t now = m.now_ms();
  std::vector<std::int64_t> expired;
  std::int64_t cursor = after_seq;

  while (out.size() < limit) {
    const std::size_t want = limit - out.size();
    std::size_t fetched = 0;
    {
      sqlite3_stmt* s = m.read_window.get();
      statement_use use(s);
      binder b(s);
      b.i64(lane->endpoint_id).i64(priority).i64(cursor).i64(static_cast<std::int64_t>(want));
      if (b.rc() != SQLITE_OK)
        return m.stmt_error(s, b.rc());
      int rc;
      while ((rc = sqlite3_step(s)) == SQLITE_ROW) {
        ++fetched;
        const std::int64_t seq = sqlite3_column_int64(s, 0);
        cursor = seq;
        const std::int64_t expiry = sqlite3_column_int64(s, 2);
        if (expiry != 0 && expiry <= now) {
          expired.push_back(seq);
          continue;
        }
        if (sqlite3_column_type(s, 8) == SQLITE_NULL)
          return make_error(errc::store_error,
                            "message store '" + m.path + "' is corrupt: " + m.lane_name(*lane) +
                              " seq " + std::to_string(seq) + " refers to missing message id " +
                              std::to_string(sqlite3_column_int64(s, 1)));
        queued_message& q = out.emplace_back();
        q.seq = seq;
        q.id = sqlite3_column_int64(s, 1);
        q.expiry_ms = expiry;
        q.enqueued_ms = sqlite3_column_int64(s, 4);
        q.source_module = column_text(s, 5);
        q.source_output = column_text(s, 6);
        q.source_device = column_text(s, 7);
        q.encoded = std::string(column_blob(s, 8));
      }
      if (rc != SQLITE_DONE)
        return m.stmt_error(s, rc);
    }
    if (fetched < want)
      break;  // end of the lane
    if (expired.size() >= expiry_chunk) {
      if (auto r = m.drop_expired(*lane, expired); !r)
        return std::move(r).err();
      expired.clear();
    }
  }
  if (auto r = m.drop_expired(*lane, expired); !r)
    return std::move(r).err();
  return out;
}

// -- ack -------------------------------------------------------------------------

expected<void> message_store::ack(std::string_view endpoint, int priority, std::int64_t seq) {
  const lane_ack a{endpoint, priority, seq};
  return ack_many(std::span<const lane_ack>(&a, 1));
}

expected<void> message_store::ack_many(std::span<const lane_ack> acks,
                                       std::span<const lane_ack> delivered) {
  impl& m = *impl_;
  // Check everything first, and find what moves.
  using move = std::pair<impl::lane_state*, std::int64_t>;  // lane, new seq
  auto check = [&](const char* what, std::size_t i, const lane_ack& a) -> expected<impl::lane_state*> {
    impl::lane_state* lane = m.find_lane(a.endpoint, a.priority);
    const std::string where = std::string(what) + " " + std::to_string(i) + " (endpoint '" +
                              std::string(a.endpoint) + "' priority " +
                              std::to_string(a.priority) + ")";
    if (lane == nullptr)
      return make_error(errc::not_found, where + ": no message was ever queued in this lane");
    if (a.seq > lane->last_seq)
      return make_error(errc::invalid_argument, where + ": seq " + std::to_string(a.seq) +
                                                  " is past the lane's last seq " +
                                                  std::to_string(lane->last_seq));
    return lane;
  };
  // Per lane, the highest requested seq past `current_of(lane)`, in request order.
  auto collect = [&](const char* what, std::span<const lane_ack> requests, auto current_of,
                     std::vector<move>& out) -> expected<void> {
    for (std::size_t i = 0; i < requests.size(); ++i) {
      auto lane = check(what, i, requests[i]);
      if (!lane)
        return std::move(lane).err();
      std::int64_t current = current_of(**lane);
      for (const auto& [l, seq] : out)
        if (l == *lane)
          current = std::max(current, seq);
      if (requests[i].seq > current)
        out.emplace_back(*lane, requests[i].seq);
    }
    return {};
  };
  std::vector<move> steps, marks;
  if (auto r = collect("ack", acks, [](const impl::lane_state& l) { return l.acked_seq; }, steps); !r)
    return r;
  if (auto r = collect("delivered mark", delivered,
                       [](const impl::lane_state& l) { return l.delivered_seq; }, marks);
      !r)
    return r;
  if (steps.empty() && marks.empty())
    return {};

  if (auto r = m.begin_tx(); !r) {
    m.rollback_tx();
    return r;
  }
  auto fail = [&](error e) -> expected<void> {
    m.rollback_tx();
    return e;
  };
  std::vector<std::int64_t> deleted;
  deleted.reserve(steps.size());
  for (const auto& [lane, seq] : steps) {
    auto n = m.delete_rows(m.delete_upto, *lane, seq);
    if (!n)
      return fail(std::move(n).err());
    deleted.push_back(*n);
    if (auto r = m.run(m.set_checkpoint, {lane->endpoint_id, lane->priority, seq}); !r)
      return fail(std::move(r).err());
  }
  for (const auto& [lane, seq] : marks)
    if (auto r = m.run(m.set_delivered, {lane->endpoint_id, lane->priority, seq}); !r)
      return fail(std::move(r).err());
  if (auto r = m.commit_tx(); !r)
    return fail(std::move(r).err());
  for (std::size_t i = 0; i < steps.size(); ++i) {
    auto& [lane, seq] = steps[i];
    lane->acked_seq = std::max(lane->acked_seq, seq);
    lane->length -= deleted[i];
    m.counters.acked += deleted[i];
  }
  for (const auto& [lane, seq] : marks)
    lane->delivered_seq = std::max(lane->delivered_seq, seq);
  return {};
}

// -- expire ----------------------------------------------------------------------

expected<std::int64_t> message_store::expire(
  std::int64_t max_rows,
  const std::function<std::int64_t(std::string_view endpoint, int priority)>& start_after) {
  impl& m = *impl_;
  const std::int64_t now = m.now_ms();
  std::int64_t total = 0;
  std::vector<std::int64_t> expired;
  for (auto& [key, lane] : m.lanes) {
    if (lane.length == 0)
      continue;
    std::int64_t cursor = lane.acked_seq;
    if (start_after) {
      auto n = m.endpoint_names.find(lane.endpoint_id);
      if (n != m.endpoint_names.end())
        cursor = std::max(cursor, start_after(n->second, lane.priority));
    }
    bool live_found = false;
    while (!live_found && total + static_cast<std::int64_t>(expired.size()) < max_rows) {
      const std::int64_t want = std::min<std::int64_t>(
        expiry_chunk, max_rows - total - static_cast<std::int64_t>(expired.size()));
      std::int64_t fetched = 0;
      {
        sqlite3_stmt* s = m.scan_head.get();
        statement_use use(s);
        binder b(s);
        b.i64(lane.endpoint_id).i64(lane.priority).i64(cursor).i64(want);
        if (b.rc() != SQLITE_OK)
          return m.stmt_error(s, b.rc());
        int rc;
        while ((rc = sqlite3_step(s)) == SQLITE_ROW) {
          ++fetched;
          const std::int64_t seq = sqlite3_column_int64(s, 0);
          const std::int64_t expiry = sqlite3_column_int64(s, 1);
          if (expiry == 0 || expiry > now) {
            live_found = true;
            break;
          }
          expired.push_back(seq);
          cursor = seq;
        }
        if (rc != SQLITE_ROW && rc != SQLITE_DONE)
          return m.stmt_error(s, rc);
      }
      const std::int64_t before = lane.length;
      if (auto r = m.drop_expired(lane, expired); !r)
        return std::move(r).err();
      total += before - lane.length;
      expired.clear();
      if (fetched < want)
        break;
    }
    if (total >= max_rows)
      break;
  }
  return total;
}

// -- metrics ---------------------------------------------------------------------

namespace {

/// `field` of the lane (endpoint, priority), or 0 for an unknown lane.
template <class Impl, class Field>
std::int64_t lane_field(const Impl& m, std::string_view endpoint, int priority, Field field) {
  const auto* l = m.find_lane(endpoint, priority);
  return l != nullptr ? l->*field : 0;
}

}  // namespace

std::int64_t message_store::queue_length(std::string_view endpoint, int priority) const {
  return lane_field(std::as_const(*impl_), endpoint, priority, &impl::lane_state::length);
}

std::int64_t message_store::checkpoint(std::string_view endpoint, int priority) const {
  return lane_field(std::as_const(*impl_), endpoint, priority, &impl::lane_state::acked_seq);
}

std::int64_t message_store::last_seq(std::string_view endpoint, int priority) const {
  return lane_field(std::as_const(*impl_), endpoint, priority, &impl::lane_state::last_seq);
}

std::int64_t message_store::delivered_mark(std::string_view endpoint, int priority) const {
  return lane_field(std::as_const(*impl_), endpoint, priority, &impl::lane_state::delivered_seq);
}

std::vector<lane_status> message_store::lanes() const {
  std::vector<lane_status> out;
  out.reserve(impl_->lanes.size());
  for (const auto& [key, l] : impl_->lanes) {
    lane_status s;
    auto n = impl_->endpoint_names.find(l.endpoint_id);
    s.endpoint = n != impl_->endpoint_names.end() ? n->second : std::string();
    s.priority = l.priority;
    s.last_seq = l.last_seq;
    s.checkpoint = l.acked_seq;
    s.delivered = l.delivered_seq;
    s.length = l.length;
    out.push_back(std::move(s));
  }
  std::sort(out.begin(), out.end(), [](const lane_status& a, const lane_status& b) {
    return std::tie(a.endpoint, a.priority) < std::tie(b.endpoint, b.priority);
  });
  return out;
}

expected<store_size> message_store::size() {
  impl& m = *impl_;
  auto pages = detail::step_int(label, m.path, m.db.get(), m.page_count.get());
  if (!pages)
    return std::move(pages).err();
  auto free_pages = detail::step_int(label, m.path, m.db.get(), m.freelist_count.get());
  if (!free_pages)
    return std::move(free_pages).err();
  store_size out;
  out.file_bytes = *pages * m.page_size;
  out.free_bytes = *free_pages * m.page_size;
  out.limit_bytes = m.options.max_bytes;
  return out;
}

std::int64_t message_store::dropped(drop_reason reason) const noexcept {
  switch (reason) {
    case drop_reason::ttl_expiry:
      return impl_->counters.dropped_ttl_expiry;
    case drop_reason::store_full:
      return impl_->counters.dropped_store_full;
  }
  return 0;
}

const message_store_counters& message_store::counters() const noexcept {
  return impl_->counters;
}

std::vector<std::chrono::microseconds> message_store::commit_latencies() const {
  const impl& m = *impl_;
  const std::size_t n = std::min(m.latency_count, latency_window);
  std::vector<std::chrono::microseconds> out;
  out.reserve(n);
  for (std::size_t i = m.latency_count - n; i < m.latency_count; ++i)
    out.push_back(m.latencies[i % latency_window]);
  return out;
}

std::chrono::microseconds message_store::last_commit_latency() const noexcept {
  const impl& m = *impl_;
  return m.latency_count == 0 ? std::chrono::microseconds::zero()
                              : m.latencies[(m.latency_count - 1) % latency_window];
}

}  // namespace canopy
