// canopy::mqtt_session_store — the persistent MQTT sessions of a node
// (clean_session = 0) in DATA/mqtt-sessions.db, so that they outlive a node
// restart as edgeHub's do: which of IoT Hub's topics each client subscribed
// to, and the QoS 1 messages (cloud-to-device) it has not acknowledged yet.
//
// Storage: SQLite, WAL, synchronous=FULL: a change that returned is on disk.
// Writes are rare (a subscription, a C2D message and its acknowledgement).
// Threading: every member may be called from any thread (one mutex).
// Errors: store_error naming the file and statement; nothing throws.
#pragma once

#include "runtime/expected.hpp"
#include "runtime/store.hpp"  // detail::sql_statement, detail::sqlite_closer

#include <sqlite3.h>

#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

namespace canopy {

/// A QoS 1 message a persistent session keeps for its client.
struct stored_session_message {
  std::int64_t seq = 0;  ///< its key within the session, increasing
  std::string topic;
  std::string payload;
};

/// One persistent session as stored.
struct stored_session {
  std::string client_id;
  std::uint32_t subscriptions = 0;  ///< bit i = iothub::subscription i
  std::vector<stored_session_message> messages;  ///< oldest first
};

class mqtt_session_store {
 public:
  /// Opens (creating) DATA/mqtt-sessions.db. Errors name the file.
  static expected<std::unique_ptr<mqtt_session_store>> open(const std::string& data_dir);

  /// Every stored session, with its messages.
  expected<std::vector<stored_session>> load_all();
  /// The stored session of `client_id`, if there is one.
  expected<std::optional<stored_session>> load(const std::string& client_id);
  /// Creates the session of `client_id` (if missing) with `subscriptions`.
  expected<void> save(const std::string& client_id, std::uint32_t subscriptions);
  /// Appends a message for `client_id`'s session; returns its seq.
  expected<std::int64_t> add_message(const std::string& client_id, const std::string& topic,
                                     const std::string& payload);
  /// Removes one message (acknowledged by the client).
  expected<void> remove_message(const std::string& client_id, std::int64_t seq);
  /// Forgets the session and its messages (a clean session replaced it).
  expected<void> drop(const std::string& client_id);

  ~mqtt_session_store();
  mqtt_session_store(const mqtt_session_store&) = delete;
  mqtt_session_store& operator=(const mqtt_session_store&) = delete;

 private:
  mqtt_session_store() = default;
  expected<void> run(sqlite3_stmt* s);
  /// The sessions (with messages) of `client_id`, or all if null.
  expected<std::vector<stored_session>> load_where(const std::string* client_id);

  std::mutex mtx_;
  std::string path_;
  std::unique_ptr<sqlite3, detail::sqlite_closer> db_;
  detail::sql_statement upsert_, insert_msg_, delete_msg_, delete_session_, delete_msgs_, max_seq_;
};

}  // namespace canopy
