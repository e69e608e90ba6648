// canopy::message_store — the durable message queues of one node
// (DESIGN.md "Messages": at-least-once, SQLite in WAL mode with group commit).
//
// One SQLite file, `data_dir/messages.db` (separate from node_store's
// canopy.db, so queue traffic never contends with deployment writes), in WAL
// mode with synchronous=FULL: a batch whose append() returned is on disk and
// survives kill -9 or power loss.
//
// Model:
// - A message is stored ONCE (table `messages`: id, enqueued_ms, expiry_ms,
//   reference count, source module/output/device, the encoded bytes exactly as
//   message::encoded() gave them) — or, when it has a single destination, in
//   its queue row itself (same columns there; one B-tree insert, not two).
// - It is referenced by one row per destination in table `queue`, keyed by
//   (endpoint, priority, seq). Each (endpoint, priority) pair is a *lane* with
//   its own sequence: seqs start at 1, increase by 1 per queued message and are
//   never reused, not even after every row was acknowledged or expired and the
//   file was reopened. Fan-out to N endpoints = 1 message row + N queue rows.
// - Each lane keeps a checkpoint: the last acknowledged seq, persisted by ack().
//   Acknowledging deletes the lane's queue rows up to the checkpoint; a message
//   row is deleted with its last queue row (reclaim).
// - Message ids start at 1, increase by 1 per appended message, never reused.
//
// Space: the file keeps the pages it ever needed and reuses freed pages
// (auto_vacuum = NONE, SQLite's freelist): it grows to the high-water mark of
// the backlog, not with history. A size limit (options::max_bytes, applied as
// PRAGMA max_page_count to the main file) makes append() refuse a batch that
// would need more pages, with nothing of the batch written. The WAL file beside
// it is bounded separately (auto-checkpoint every 1000 pages, truncated to
// wal_size_limit_bytes after a checkpoint).
//
// Time-to-live: each queue row carries its own expiry (the route's TTL counted
// from the append, on the injected clock's wall time). read() skips rows with
// expiry <= now, deletes them and counts them as drop_reason::ttl_expiry;
// expire() does the same from the head of every lane (for lanes nobody reads).
//
// Threading: a message_store is NOT thread-safe. It has one owner thread (the
// router's store writer, a test, a benchmark); only that thread calls its
// members. Handing it to another owner needs a happens-before edge. The file
// has one owner: open() takes an exclusive flock(2) on `<file>.lock` and fails
// if another message_store (in this or another process) holds it; the lock
// goes when the store is destroyed or its process dies. Other connections may
// read the file (e.g. the sqlite3 shell) but must not write it.
//
// Errors: SQLite failures are errc::store_error naming the file, the statement
// and SQLite's message; bad arguments are errc::invalid_argument naming the
// entry and field; a full store is errc::unavailable ("store full: ...").
// Nothing throws (except std::bad_alloc).
#pragma once

#include "runtime/clock.hpp"
#include "runtime/expected.hpp"
#include "runtime/route.hpp"  // message_source

#include <canopy/message.hpp>

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace canopy {

/// One destination of a message: a lane (endpoint, priority) and a time-to-live.
struct route_target {
  /// Endpoint name, e.g. "$upstream" or "/modules/filter/inputs/in"; not empty.
  /// Borrowed: valid during append().
  std::string_view endpoint;
  /// 0 (highest) .. 9 (lowest), as Azure's route priority.
  int priority = 0;
  /// Time-to-live from the append: 0 = message_store_options::default_ttl;
  /// message_store_options::no_expiry = never expires; negative is invalid.
  std::chrono::milliseconds ttl{0};
};

/// One message to append, with every lane it goes to.
struct append_entry {
  message msg;                            ///< stored as msg.encoded(), not re-encoded
  message_source source;                  ///< stored with the message
  std::span<const route_target> targets;  ///< at least one; borrowed during append()
};

/// The ids append() gave to a batch: consecutive, first_id..last_id in batch
/// order. An empty batch gives count() == 0 (last_id == first_id - 1).
struct append_result {
  std::int64_t first_id = 1;  ///< id of the batch's first message
  std::int64_t last_id = 0;   ///< id of the batch's last message
  /// Number of messages appended.
  std::int64_t count() const noexcept { return last_id - first_id + 1; }
};

/// One queued (undelivered) message of a lane, as read() returns it. Owns its
/// bytes: the window stays valid whatever the store does next.
struct queued_message {
  std::int64_t seq = 0;          ///< position in its lane (acknowledge this)
  std::int64_t id = 0;           ///< the message's id (shared by its fan-out copies)
  std::int64_t enqueued_ms = 0;  ///< wall time of the append, ms since the epoch
  std::int64_t expiry_ms = 0;    ///< wall time it expires in this lane; 0 = never
  std::string source_module;     ///< as given to append()
  std::string source_output;     ///< as given to append()
  std::string source_device;     ///< as given to append()
  std::string encoded;           ///< message::encoded() bytes, as appended

  /// Decodes `encoded` (one copy). A stored message that does not decode is a
  /// store_error naming its id and seq.
  expected<message> decode() const;
};

/// An acknowledgement: every message of the lane up to and including `seq` was
/// delivered.
struct lane_ack {
  std::string_view endpoint;  ///< borrowed during ack_many()
  int priority = 0;           ///< 0..9
  std::int64_t seq = 0;       ///< new checkpoint (<= the lane's last seq)
};

/// Why queued messages were dropped (the store's share of Azure's reasons;
/// `no_route` is counted by the router).
enum class drop_reason {
  ttl_expiry,  ///< a queue row expired before delivery (counted per lane row)
  store_full,  ///< append refused: size limit or disk full (counted per message)
};

/// The state of one lane, for metrics and for resuming delivery after a restart.
struct lane_status {
  std::string endpoint;         ///< endpoint name
  int priority = 0;             ///< 0..9
  std::int64_t last_seq = 0;    ///< highest seq ever assigned in this lane
  std::int64_t checkpoint = 0;  ///< last acknowledged seq (delivery resumes after it)
  std::int64_t delivered = 0;   ///< delivery mark: highest seq recorded as handed to a receiver
  std::int64_t length = 0;      ///< queued rows not yet acknowledged nor expired
};

/// Size of the database file.
struct store_size {
  std::int64_t file_bytes = 0;   ///< pages in the main file x page size (excludes the WAL)
  std::int64_t free_bytes = 0;   ///< of which free pages, reused before the file grows
  std::int64_t limit_bytes = 0;  ///< options::max_bytes; 0 = no limit
};

/// Counters since open() (not persisted; a restarted node starts at zero).
struct message_store_counters {
  std::int64_t appended = 0;            ///< messages committed by append()
  std::int64_t queued = 0;              ///< lane rows committed (a fan-out to N counts N)
  std::int64_t acked = 0;               ///< lane rows removed by ack()
  std::int64_t dropped_ttl_expiry = 0;  ///< lane rows dropped because they expired
  std::int64_t dropped_store_full = 0;  ///< messages refused because the store was full
  std::int64_t commits = 0;             ///< append() transactions committed
};

/// How open() sets up a message_store.
struct message_store_options {
  /// ttl value meaning "never expires".
  static constexpr std::chrono::milliseconds no_expiry = std::chrono::milliseconds::max();

  /// Size limit of the main database file in bytes; 0 = none (the disk is the
  /// limit). At least 64 KiB when set. A file already larger than the limit
  /// takes new messages only into its free pages.
  std::int64_t max_bytes = 0;
  /// TTL of a route_target whose ttl is 0; no_expiry = never. Must be > 0.
  /// Default: Azure IoT Edge's storeAndForwardConfiguration default (7200 s).
  std::chrono::milliseconds default_ttl = std::chrono::hours(2);
  /// Source of wall time for enqueued_ms and expiry (borrowed; must outlive the
  /// store); null = the system clock.
  const clock* wall_clock = nullptr;
  /// Run PRAGMA quick_check at open (reads the whole file once: ~1 s per GB).
  bool verify_on_open = true;
  /// SQLite page cache of this connection, in bytes (bounds the store's memory).
  std::int64_t cache_bytes = 8 << 20;
};

/// The durable message queues. See the file comment for the model, threading
/// and errors.
class message_store {
 public:
  /// Schema version this build writes (PRAGMA user_version after open()).
  static constexpr int current_schema_version = 3;
  /// File name open() uses inside the data directory.
  static constexpr const char* file_name = "messages.db";
  /// Highest (lowest-urgency) priority; 0 is the most urgent.
  static constexpr int max_priority = 9;
  /// How long a statement waits for another (reading) connection's lock
  /// (PRAGMA busy_timeout).
  static constexpr int busy_timeout_ms = 2000;
  /// The WAL file is truncated to at most this size after a checkpoint.
  static constexpr std::int64_t wal_size_limit_bytes = 16 << 20;
  /// Number of recent append commits whose latency is kept.
  static constexpr std::size_t latency_window = 256;

  /// Opens (creating if needed) `data_dir` and `data_dir/messages.db`; see
  /// open_file().
  static expected<std::unique_ptr<message_store>> open(const std::string& data_dir,
                                                       const message_store_options& options = {});

  /// Opens (creating if needed) the database file `path` (its directory must
  /// exist), checks it (quick_check when options.verify_on_open), switches to WAL
  /// + synchronous=FULL, migrates the schema and loads the lanes (one scan of
  /// the queue index to count each lane). Errors name the file: invalid_argument
  /// for bad options or a path that is empty or in-memory; io_error if the data
  /// directory cannot be made; store_error if the file cannot be opened or
  /// written, is not a database, is corrupt, or is in use by another store;
  /// incompatible if it belongs to another application or a newer Canopy.
  /// Never falls back to an in-memory database.
  static expected<std::unique_ptr<message_store>> open_file(
    const std::string& path, const message_store_options& options = {});

  ~message_store();
  message_store(const message_store&) = delete;
  message_store& operator=(const message_store&) = delete;

  /// Full path of the database file.
  const std::string& path() const noexcept;

  /// Appends a batch in ONE transaction (one fsync): all of it or, on any error,
  /// none of it. Acknowledge the senders only after this returns a value. Every
  /// entry needs at least one target, each with a non-empty endpoint, priority
  /// 0..9 and ttl >= 0 (checked before anything is written; the error names the
  /// entry and target index). A batch that does not fit the size limit (or the
  /// disk) fails with errc::unavailable "store full: ..." and counts its
  /// messages as drop_reason::store_full. Cost: one commit plus two B-tree
  /// inserts per message and one per extra target.
  expected<append_result> append(std::span<const append_entry> batch);

  /// At most `limit` undelivered messages of the lane with seq > after_seq, in
  /// seq order. Expired rows met on the way are skipped, deleted (in their own
  /// transactions) and counted as ttl_expiry; the scan goes on past them, so a
  /// short window means the lane has no more live rows. Unknown lanes give an
  /// empty window. Memory: the window only.
  expected<std::vector<queued_message>> read(std::string_view endpoint, int priority,
                                             std::int64_t after_seq, std::size_t limit);

  /// Moves the lane's checkpoint to `seq` (persisted, one transaction) and
  /// deletes its rows up to `seq`; messages no lane references any more are
  /// reclaimed. An ack at or below the checkpoint changes nothing.
  /// not_found for a lane that never had a message; invalid_argument for a seq
  /// past the lane's last seq.
  expected<void> ack(std::string_view endpoint, int priority, std::int64_t seq);

  /// ack() for several lanes in ONE transaction (all or none; checked first),
  /// which also raises the lanes' delivery marks to `delivered` (seq = the
  /// highest seq handed to the lane's receiver; a mark never moves back). The
  /// marks let a restarted node tell a re-delivery (seq <= mark) from a first
  /// delivery. Errors as ack(), naming "ack i" or "delivered mark i".
  expected<void> ack_many(std::span<const lane_ack> acks, std::span<const lane_ack> delivered = {});

  /// Drops expired rows from the head of every lane (in seq order, stopping at
  /// the first live row of each lane), at most `max_rows` in all; returns how
  /// many went (counted as ttl_expiry). For lanes whose receiver is away; rows
  /// behind a live one are dropped when read() meets them. With `start_after`,
  /// a lane's scan starts after max(checkpoint, start_after(endpoint, priority))
  /// (the rows before it are the caller's: e.g. a window it holds in memory).
  expected<std::int64_t> expire(
    std::int64_t max_rows = 100000,
    const std::function<std::int64_t(std::string_view endpoint, int priority)>& start_after = {});

  // -- metrics ------------------------------------------------------------------

  /// Undelivered rows of a lane (0 for an unknown lane). O(1), from memory.
  std::int64_t queue_length(std::string_view endpoint, int priority) const;

  /// The lane's checkpoint (0 for an unknown lane). O(1), from memory.
  std::int64_t checkpoint(std::string_view endpoint, int priority) const;

  /// Highest seq ever assigned in the lane (0 for an unknown lane). The next
  /// append() gives the lane's targets last_seq()+1, +2, ... in batch order.
  std::int64_t last_seq(std::string_view endpoint, int priority) const;

  /// The lane's delivery mark as last persisted by ack_many() (0 if none).
  std::int64_t delivered_mark(std::string_view endpoint, int priority) const;

  /// Every lane ever used, ordered by endpoint name then priority.
  std::vector<lane_status> lanes() const;

  /// Size of the database file (two PRAGMAs: cheap).
  expected<store_size> size();

  /// Messages/rows dropped since open() for `reason`.
  std::int64_t dropped(drop_reason reason) const noexcept;

  /// Every counter since open().
  const message_store_counters& counters() const noexcept;

  /// Duration of recent append() transactions (BEGIN to the end of COMMIT,
  /// fsync included, measured on std::chrono::steady_clock: it is a measurement
  /// of the disk, not time-dependent logic), oldest first, at most
  /// latency_window of them.
  std::vector<std::chrono::microseconds> commit_latencies() const;

  /// Duration of the last committed append() transaction; zero if none yet.
  std::chrono::microseconds last_commit_latency() const noexcept;

 private:
  struct impl;
  explicit message_store(std::unique_ptr<impl> p);
  std::unique_ptr<impl> impl_;
};

}  // namespace canopy
