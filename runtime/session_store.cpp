#include "runtime/session_store.hpp"

#include "runtime/sqlite_util.hpp"

#include <array>

namespace canopy {

namespace {

constexpr std::string_view label = "mqtt session store";
constexpr int application_id = 0x434e5353;  // "CNSS"

constexpr detail::migration migrations[] = {
  {1,
   "CREATE TABLE sessions (client_id TEXT PRIMARY KEY, subscriptions INTEGER NOT NULL) WITHOUT ROWID;"
   "CREATE TABLE session_messages (client_id TEXT NOT NULL, seq INTEGER NOT NULL, topic TEXT NOT NULL,"
   " payload BLOB NOT NULL, PRIMARY KEY (client_id, seq)) WITHOUT ROWID;"},
};

}  // namespace

mqtt_session_store::~mqtt_session_store() = default;

expected<std::unique_ptr<mqtt_session_store>> mqtt_session_store::open(const std::string& data_dir) {
  auto path = detail::file_in_data_dir(label, data_dir, "mqtt-sessions.db");
  if (!path)
    return std::move(path).err();
  detail::database_spec spec;
  spec.label = label;
  spec.application_id = application_id;
  spec.schema_version = 1;
  spec.busy_timeout_ms = 5000;
  spec.pragmas = "PRAGMA synchronous = FULL";
  spec.migrations = migrations;
  auto db = detail::open_database(spec, *path);
  if (!db)
    return std::move(db).err();
  std::unique_ptr<mqtt_session_store> s{new mqtt_session_store()};
  s->path_ = *path;
  s->db_ = std::move(*db);
  const std::array<detail::statement_slot, 6> slots{{
    {&s->upsert_, "INSERT INTO sessions (client_id, subscriptions) VALUES (?, ?) "
                  "ON CONFLICT (client_id) DO UPDATE SET subscriptions = excluded.subscriptions"},
    {&s->insert_msg_, "INSERT INTO session_messages (client_id, seq, topic, payload) VALUES (?, ?, ?, ?)"},
    {&s->delete_msg_, "DELETE FROM session_messages WHERE client_id = ? AND seq = ?"},
    {&s->delete_session_, "DELETE FROM sessions WHERE client_id = ?"},
    {&s->delete_msgs_, "DELETE FROM session_messages WHERE client_id = ?"},
    {&s->max_seq_, "SELECT coalesce(max(seq), 0) FROM session_messages WHERE client_id = ?"},
  }};
  if (auto ok = detail::prepare_statements(label, s->path_, s->db_.get(), slots); !ok)
    return std::move(ok).err();
  return s;
}

expected<void> mqtt_session_store::run(sqlite3_stmt* s) {
  const int rc = sqlite3_step(s);
  sqlite3_reset(s);
  sqlite3_clear_bindings(s);
  if (rc != SQLITE_DONE)
    return detail::stmt_error(label, path_, db_.get(), s, rc);
  return {};
}

expected<std::optional<stored_session>> mqtt_session_store::load(const std::string& client_id) {
  auto some = load_where(&client_id);
  if (!some)
    return std::move(some).err();
  if (some->empty())
    return std::optional<stored_session>{};
  return std::optional<stored_session>{std::move(some->front())};
}

expected<std::vector<stored_session>> mqtt_session_store::load_all() { return load_where(nullptr); }

expected<std::vector<stored_session>> mqtt_session_store::load_where(const std::string* client_id) {
  std::lock_guard<std::mutex> lock{mtx_};
  std::vector<stored_session> out;
  const char* sql_sessions = client_id != nullptr
                               ? "SELECT client_id, subscriptions FROM sessions WHERE client_id = ?"
                               : "SELECT client_id, subscriptions FROM sessions ORDER BY client_id";
  sqlite3_stmt* raw = nullptr;
  int rc = sqlite3_prepare_v2(db_.get(), sql_sessions, -1, &raw, nullptr);
  detail::sql_statement st(raw);
  if (rc != SQLITE_OK)
    return detail::sql_error(label, path_, db_.get(), sql_sessions, rc);
  if (client_id != nullptr)
    detail::binder{raw}.text(*client_id);
  while ((rc = sqlite3_step(raw)) == SQLITE_ROW)
    out.push_back(stored_session{detail::column_text(raw, 0), static_cast<std::uint32_t>(sqlite3_column_int64(raw, 1)), {}});
  if (rc != SQLITE_DONE)
    return detail::sql_error(label, path_, db_.get(), sql_sessions, rc);
  const char* sql_msgs = "SELECT seq, topic, payload FROM session_messages WHERE client_id = ? ORDER BY seq";
  raw = nullptr;
  rc = sqlite3_prepare_v2(db_.get(), sql_msgs, -1, &raw, nullptr);
  detail::sql_statement mt(raw);
  if (rc != SQLITE_OK)
    return detail::sql_error(label, path_, db_.get(), sql_msgs, rc);
  for (auto& s : out) {
    detail::statement_use use(raw);
    detail::binder{raw}.text(s.client_id);
    while ((rc = sqlite3_step(raw)) == SQLITE_ROW)
      s.messages.push_back(stored_session_message{sqlite3_column_int64(raw, 0), detail::column_text(raw, 1),
                                                  std::string{detail::column_blob(raw, 2)}});
    if (rc != SQLITE_DONE)
      return detail::sql_error(label, path_, db_.get(), sql_msgs, rc);
  }
  return out;
}

expected<void> mqtt_session_store::save(const std::string& client_id, std::uint32_t subscriptions) {
  std::lock_guard<std::mutex> lock{mtx_};
  detail::binder{upsert_.get()}.text(client_id).i64(subscriptions);
  return run(upsert_.get());
}

expected<std::int64_t> mqtt_session_store::add_message(const std::string& client_id, const std::string& topic,
                                                       const std::string& payload) {
  std::lock_guard<std::mutex> lock{mtx_};
  detail::binder{max_seq_.get()}.text(client_id);
  auto last = detail::step_int(label, path_, db_.get(), max_seq_.get());
  if (!last)
    return std::move(last).err();
  const std::int64_t seq = *last + 1;
  detail::binder{insert_msg_.get()}.text(client_id).i64(seq).text(topic).blob(payload);
  if (auto ok = run(insert_msg_.get()); !ok)
    return std::move(ok).err();
  return seq;
}

expected<void> mqtt_session_store::remove_message(const std::string& client_id, std::int64_t seq) {
  std::lock_guard<std::mutex> lock{mtx_};
  detail::binder{delete_msg_.get()}.text(client_id).i64(seq);
  return run(delete_msg_.get());
}

expected<void> mqtt_session_store::drop(const std::string& client_id) {
  std::lock_guard<std::mutex> lock{mtx_};
  if (auto ok = detail::exec(label, path_, db_.get(), "BEGIN IMMEDIATE"); !ok)
    return ok;
  detail::binder{delete_msgs_.get()}.text(client_id);
  auto a = run(delete_msgs_.get());
  detail::binder{delete_session_.get()}.text(client_id);
  auto b = a ? run(delete_session_.get()) : expected<void>{};
  if (!a || !b) {
    (void)detail::exec(label, path_, db_.get(), "ROLLBACK");
    if (!a)
      return a;
    return b;
  }
  return detail::exec(label, path_, db_.get(), "COMMIT");
}

}  // namespace canopy
