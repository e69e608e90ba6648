#include "runtime/registry.hpp"

#include "runtime/route.hpp"  // is_valid_module_name
#include "runtime/sqlite_util.hpp"
#include "runtime/target_condition.hpp"

#include <sqlite3.h>

#include <algorithm>
#include <set>
#include <unordered_map>
#include <utility>

namespace canopy {

namespace {

using detail::binder;
using detail::column_text;
using detail::statement_use;
using json = nlohmann::json;

constexpr std::string_view label = "registry";

/// Application id stamped in the file header ("CNRG"), distinct from the
/// node store's and the message store's.
constexpr int application_id = 0x434e5247;

// Append-only: a released migration is never edited; a change of schema is a
// new entry with the next version. Each runs in its own transaction together
// with the bump of PRAGMA user_version.
constexpr detail::migration migrations[] = {
  {1, R"sql(
CREATE TABLE devices (
  id            TEXT PRIMARY KEY,
  parent        TEXT NOT NULL,
  kind          TEXT NOT NULL,
  tags          TEXT NOT NULL,
  auth          TEXT NOT NULL,
  thumbprint    TEXT NOT NULL,
  primary_key   TEXT NOT NULL,
  secondary_key TEXT NOT NULL,
  created_ms    INTEGER NOT NULL,
  updated_ms    INTEGER NOT NULL,
  last_seen_ms  INTEGER NOT NULL) WITHOUT ROWID;
CREATE INDEX devices_by_parent ON devices (parent, id);
CREATE TABLE twins (
  device              TEXT NOT NULL,
  module              TEXT NOT NULL,
  desired             TEXT NOT NULL,
  desired_version     INTEGER NOT NULL,
  desired_updated_ms  INTEGER NOT NULL,
  reported            TEXT NOT NULL,
  reported_version    INTEGER NOT NULL,
  reported_updated_ms INTEGER NOT NULL,
  PRIMARY KEY (device, module)) WITHOUT ROWID;
CREATE TABLE deployments (
  id               TEXT PRIMARY KEY,
  manifest_json    TEXT NOT NULL,
  target_condition TEXT NOT NULL,
  priority         INTEGER NOT NULL,
  created_ms       INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE deployment_status (
  deployment TEXT NOT NULL,
  device     TEXT NOT NULL,
  status     TEXT NOT NULL,
  detail     TEXT NOT NULL,
  updated_ms INTEGER NOT NULL,
  PRIMARY KEY (deployment, device)) WITHOUT ROWID;
CREATE INDEX deployment_status_by_device ON deployment_status (device);
)sql"},
};

static_assert(migrations[std::size(migrations) - 1].version ==
                fleet_registry::current_schema_version,
              "the last migration must produce current_schema_version");

constexpr const char* device_columns =
  "id, parent, kind, tags, auth, thumbprint, primary_key, secondary_key, created_ms, "
  "updated_ms, last_seen_ms";

constexpr const char* deployment_columns =
  "id, manifest_json, target_condition, priority, created_ms";

constexpr const char* status_columns = "deployment, device, status, detail, updated_ms";

/// Binds the next parameter of a statement: strings as text, integers as int64.
void bind_one(binder& b, std::string_view v) {
  b.text(v);
}
void bind_one(binder& b, std::int64_t v) {
  b.i64(v);
}

/// Binds `args` to parameters 1, 2, ... of `s`; SQLITE_OK or the first failure.
template <class... Args>
int bind_all(sqlite3_stmt* s, const Args&... args) {
  binder b(s);
  (bind_one(b, args), ...);
  return b.rc();
}

/// How a user-supplied string is shown in a message: quoted, cut at 130 bytes.
std::string shown(std::string_view s) {
  if (s.size() > 130)
    return "'" + std::string(s.substr(0, 130)) + "...'";
  return "'" + std::string(s) + "'";
}

std::string type_name(const json& j) {
  return j.type_name();
}

/// True if `j` nests objects/arrays at most `limit` levels deep. Stops
/// descending at the limit, so the recursion is bounded whatever `j` is.
bool depth_within(const json& j, int limit) {
  if (!j.is_structured())
    return true;
  if (limit <= 0)
    return false;
  for (const auto& v : j)
    if (!depth_within(v, limit - 1))
      return false;
  return true;
}

/// Compact JSON text; invalid UTF-8 in strings is replaced, never thrown on.
std::string dump(const json& j) {
  return j.dump(-1, ' ', false, json::error_handler_t::replace);
}

/// Checks that `j` is an object nested at most max_document_depth levels;
/// `field` names it in the error.
expected<void> check_object(const json& j, std::string_view field) {
  if (!j.is_object())
    return make_error(errc::invalid_argument, "registry: " + std::string(field) +
                                                ": must be a JSON object, not " + type_name(j));
  if (!depth_within(j, fleet_registry::max_document_depth))
    return make_error(errc::invalid_argument,
                      "registry: " + std::string(field) + ": nested deeper than " +
                        std::to_string(fleet_registry::max_document_depth) + " levels");
  return {};
}

/// The compact text of `j`, if it fits in max_document_bytes.
expected<std::string> bounded_text(const json& j, std::string_view field) {
  std::string text = dump(j);
  if (text.size() > fleet_registry::max_document_bytes)
    return make_error(errc::invalid_argument, "registry: " + std::string(field) + ": " +
                                                std::to_string(text.size()) +
                                                " bytes of JSON, more than " +
                                                std::to_string(fleet_registry::max_document_bytes));
  return text;
}

bool is_hex(std::string_view s) {
  return std::all_of(s.begin(), s.end(), [](char c) {
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F');
  });
}

/// Checks a record's own fields (id, kind, auth and credentials, tags); the
/// tree rules are the caller's.
expected<void> check_fields(const device_record& r) {
  if (!fleet_registry::is_valid_id(r.id))
    return make_error(
      errc::invalid_argument,
      "registry: id: " + shown(r.id) + " is not a valid id (1 to 128 of A-Z a-z 0-9 - . : _)");
  if (r.kind != "gateway" && r.kind != "device")
    return make_error(errc::invalid_argument,
                      "registry: kind: must be 'gateway' or 'device', not " + shown(r.kind) +
                        " (device " + r.id + ")");
  const std::string of = " (device " + r.id + ")";
  if (r.auth == "x509_thumbprint") {
    if (!((r.thumbprint.size() == 40 || r.thumbprint.size() == 64) && is_hex(r.thumbprint)))
      return make_error(errc::invalid_argument,
                        "registry: thumbprint: must be a SHA-1 (40) or SHA-256 (64) hex digest "
                        "for auth 'x509_thumbprint', not " +
                          shown(r.thumbprint) + of);
  } else if (!r.thumbprint.empty()) {
    return make_error(
      errc::invalid_argument,
      "registry: thumbprint: only for auth 'x509_thumbprint' (auth is " + shown(r.auth) + ")" + of);
  }
  if (r.auth == "sas") {
    if (r.primary_key.empty())
      return make_error(errc::invalid_argument,
                        "registry: primary_key: required for auth 'sas'" + of);
    if (r.primary_key.size() > 256 || r.secondary_key.size() > 256)
      return make_error(errc::invalid_argument,
                        std::string("registry: ") +
                          (r.primary_key.size() > 256 ? "primary_key" : "secondary_key") +
                          ": longer than 256 bytes" + of);
  } else if (!r.primary_key.empty() || !r.secondary_key.empty()) {
    return make_error(errc::invalid_argument,
                      std::string("registry: ") +
                        (!r.primary_key.empty() ? "primary_key" : "secondary_key") +
                        ": only for auth 'sas' (auth is " + shown(r.auth) + ")" + of);
  }
  if (r.auth != "x509_ca" && r.auth != "x509_thumbprint" && r.auth != "sas")
    return make_error(
      errc::invalid_argument,
      "registry: auth: must be 'x509_ca', 'x509_thumbprint' or 'sas', not " + shown(r.auth) + of);
  if (!r.tags.is_null())
    if (auto ok = check_object(r.tags, "tags"); !ok)
      return ok;
  return {};
}

/// "dev" or "dev/module", for messages about twins.
std::string twin_name(const std::string& device, const std::string& module) {
  return module.empty() ? device : device + "/" + module;
}

/// A deployment with its compiled condition, in the order deployment_for
/// prefers them.
struct ranked_deployment {
  deployment_record record;
  target_condition condition;
};

/// Compiles every deployment's condition and sorts them: priority descending,
/// then newest first, then id ascending. An error in `all` (the listing failed)
/// is passed on.
expected<std::vector<ranked_deployment>> rank(expected<std::vector<deployment_record>> all,
                                              const std::string& path) {
  if (!all)
    return std::move(all).err();
  std::vector<ranked_deployment> out;
  out.reserve(all->size());
  for (auto& d : *all) {
    auto c = target_condition::compile(d.target_condition);
    if (!c)
      return make_error(errc::store_error, "registry '" + path + "': deployment '" + d.id +
                                             "': stored " + c.err().message + " (corrupt?)");
    out.push_back(ranked_deployment{std::move(d), std::move(*c)});
  }
  std::sort(out.begin(), out.end(), [](const ranked_deployment& a, const ranked_deployment& b) {
    const auto& x = a.record;
    const auto& y = b.record;
    if (x.priority != y.priority)
      return x.priority > y.priority;
    if (x.created_ms != y.created_ms)
      return x.created_ms > y.created_ms;
    return x.id < y.id;
  });
  return out;
}

const deployment_record* first_match(const std::vector<ranked_deployment>& ranked,
                                     const device_record& d) {
  for (const auto& r : ranked)
    if (r.condition.matches(d.id, d.tags))
      return &r.record;
  return nullptr;
}

}  // namespace

// -- transaction -----------------------------------------------------------------

/// BEGIN IMMEDIATE ... COMMIT; rolls back if it ends without commit().
class fleet_registry::transaction {
 public:
  explicit transaction(fleet_registry& r) : r_(r) {}
  ~transaction() {
    if (open_) {
      statement_use use(r_.rollback_.get());
      sqlite3_step(r_.rollback_.get());
    }
  }
  transaction(const transaction&) = delete;
  transaction& operator=(const transaction&) = delete;

  expected<void> begin() {
    auto r = r_.run(r_.begin_.get());
    open_ = r.ok();
    return r;
  }
  expected<void> commit() {
    auto r = r_.run(r_.commit_.get());
    if (r)
      open_ = false;
    return r;
  }

 private:
  fleet_registry& r_;
  bool open_ = false;
};

// -- fleet_registry ----------------------------------------------------------------

fleet_registry::fleet_registry(token, std::string path, std::string root_id, const clock& wall)
    : path_(std::move(path)), root_id_(std::move(root_id)), wall_(&wall) {}

fleet_registry::~fleet_registry() = default;

bool fleet_registry::is_valid_id(std::string_view id) noexcept {
  if (id.empty() || id.size() > 128)
    return false;
  return std::all_of(id.begin(), id.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' ||
           c == '.' || c == ':' || c == '_';
  });
}

expected<std::unique_ptr<fleet_registry>> fleet_registry::open(const std::string& data_dir,
                                                               const std::string& root_id,
                                                               const clock& wall) {
  if (!is_valid_id(root_id))
    return make_error(errc::invalid_argument,
                      "registry: root_id: " + shown(root_id) +
                        " is not a valid id (1 to 128 of A-Z a-z 0-9 - . : _)");
  auto path = detail::file_in_data_dir(label, data_dir, "registry.db");
  if (!path)
    return std::move(path).err();
  auto reg = std::make_unique<fleet_registry>(token{}, *path, root_id, wall);

  detail::database_spec spec;
  spec.label = label;
  spec.application_id = application_id;
  spec.schema_version = current_schema_version;
  spec.busy_timeout_ms = busy_timeout_ms;
  spec.quick_check = true;
  spec.pragmas = "PRAGMA synchronous = FULL";
  spec.migrations = migrations;
  auto db = detail::open_database(spec, *path);
  if (!db)
    return std::move(db).err();
  reg->db_ = std::move(*db);

  if (auto r = reg->prepare_statements(); !r)
    return std::move(r).err();
  return reg;
}

expected<void> fleet_registry::prepare_statements() {
  const std::string dev = device_columns;
  const std::string dep = deployment_columns;
  const std::string st = status_columns;
  const std::string insert_device =
    "INSERT INTO devices (" + dev +
    ") VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11) "
    "ON CONFLICT (id) DO UPDATE SET parent = excluded.parent, kind = excluded.kind, "
    "tags = excluded.tags, auth = excluded.auth, thumbprint = excluded.thumbprint, "
    "primary_key = excluded.primary_key, secondary_key = excluded.secondary_key, "
    "created_ms = excluded.created_ms, updated_ms = excluded.updated_ms, "
    "last_seen_ms = max(devices.last_seen_ms, excluded.last_seen_ms)";
  const std::string get_device = "SELECT " + dev + " FROM devices WHERE id = ?1";
  const std::string list_devices = "SELECT " + dev + " FROM devices ORDER BY id";
  const std::string children = "SELECT " + dev + " FROM devices WHERE parent = ?1 ORDER BY id";
  // UNION (not UNION ALL) ends the recursion even if the rows held a cycle.
  const std::string subtree =
    "WITH RECURSIVE sub(id) AS (SELECT id FROM devices WHERE parent = ?1 "
    "UNION SELECT d.id FROM devices d JOIN sub ON d.parent = sub.id) "
    "SELECT " +
    dev + " FROM devices WHERE id IN (SELECT id FROM sub) ORDER BY id";
  const std::string list_gateways =
    "SELECT " + dev + " FROM devices WHERE kind = 'gateway' ORDER BY id";
  const std::string get_deployment = "SELECT " + dep + " FROM deployments WHERE id = ?1";
  const std::string list_deployments = "SELECT " + dep + " FROM deployments ORDER BY id";
  const std::string statuses_of =
    "SELECT " + st + " FROM deployment_status WHERE deployment = ?1 ORDER BY device";
  const std::string status_of = "SELECT " + st +
                                " FROM deployment_status WHERE device = ?1 "
                                "ORDER BY updated_ms DESC, deployment";

  const detail::statement_slot entries[] = {
    {&begin_, "BEGIN IMMEDIATE"},
    {&commit_, "COMMIT"},
    {&rollback_, "ROLLBACK"},
    {&insert_device_, insert_device.c_str()},
    {&get_device_, get_device.c_str()},
    {&list_devices_, list_devices.c_str()},
    {&get_parent_, "SELECT parent FROM devices WHERE id = ?1"},
    {&children_, children.c_str()},
    {&subtree_, subtree.c_str()},
    {&first_children_, "SELECT id FROM devices WHERE parent = ?1 ORDER BY id LIMIT 6"},
    {&delete_device_, "DELETE FROM devices WHERE id = ?1"},
    {&update_tags_, "UPDATE devices SET tags = ?2, updated_ms = ?3 WHERE id = ?1"},
    {&touch_, "UPDATE devices SET last_seen_ms = max(last_seen_ms, ?2) WHERE id = ?1"},
    {&get_twin_,
     "SELECT module, desired, desired_version, desired_updated_ms, reported, reported_version, "
     "reported_updated_ms FROM twins WHERE device = ?1 AND module = ?2"},
    {&list_twins_,
     "SELECT module, desired, desired_version, desired_updated_ms, reported, reported_version, "
     "reported_updated_ms FROM twins WHERE device = ?1 ORDER BY module"},
    {&upsert_twin_,
     "INSERT OR REPLACE INTO twins (device, module, desired, desired_version, "
     "desired_updated_ms, reported, reported_version, reported_updated_ms) "
     "VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"},
    {&delete_twins_, "DELETE FROM twins WHERE device = ?1"},
    {&insert_deployment_,
     "INSERT INTO deployments (id, manifest_json, target_condition, priority, created_ms) "
     "VALUES (?1, ?2, ?3, ?4, ?5)"},
    {&get_deployment_, get_deployment.c_str()},
    {&list_deployments_, list_deployments.c_str()},
    {&delete_deployment_, "DELETE FROM deployments WHERE id = ?1"},
    {&list_gateways_, list_gateways.c_str()},
    {&upsert_status_,
     "INSERT OR REPLACE INTO deployment_status (deployment, device, status, detail, updated_ms) "
     "VALUES (?1, ?2, ?3, ?4, ?5)"},
    {&statuses_of_, statuses_of.c_str()},
    {&status_of_, status_of.c_str()},
    {&delete_statuses_of_device_, "DELETE FROM deployment_status WHERE device = ?1"},
    {&delete_statuses_of_deployment_, "DELETE FROM deployment_status WHERE deployment = ?1"},
  };
  return detail::prepare_statements(label, path_, db_.get(), entries);
}

error fleet_registry::stmt_error(sqlite3_stmt* s, int rc) const {
  return detail::stmt_error(label, path_, db_.get(), s, rc);
}

template <class... Args>
expected<void> fleet_registry::run(sqlite3_stmt* s, const Args&... args) {
  statement_use use(s);
  if (const int rc = bind_all(s, args...); rc != SQLITE_OK)
    return stmt_error(s, rc);
  const int rc = sqlite3_step(s);
  if (rc != SQLITE_DONE)
    return stmt_error(s, rc);
  return {};
}

template <class T, class Read, class... Args>
expected<std::vector<T>> fleet_registry::rows(sqlite3_stmt* s, Read read, const Args&... args) {
  statement_use use(s);
  if (const int rc = bind_all(s, args...); rc != SQLITE_OK)
    return stmt_error(s, rc);
  std::vector<T> out;
  int rc;
  while ((rc = sqlite3_step(s)) == SQLITE_ROW) {
    expected<T> r = read(s);
    if (!r)
      return std::move(r).err();
    out.push_back(std::move(*r));
  }
  if (rc != SQLITE_DONE)
    return stmt_error(s, rc);
  return out;
}

template <class T, class Read, class... Args>
expected<std::optional<T>> fleet_registry::row(sqlite3_stmt* s, Read read, const Args&... args) {
  statement_use use(s);
  if (const int rc = bind_all(s, args...); rc != SQLITE_OK)
    return stmt_error(s, rc);
  const int rc = sqlite3_step(s);
  if (rc == SQLITE_DONE)
    return std::optional<T>();
  if (rc != SQLITE_ROW)
    return stmt_error(s, rc);
  expected<T> r = read(s);
  if (!r)
    return std::move(r).err();
  return std::optional<T>(std::move(*r));
}

// -- row readers -------------------------------------------------------------------

namespace {

/// Parses a stored JSON column; a store_error naming `what` if it does not parse.
expected<json> stored_json(const std::string& path, sqlite3_stmt* s, int col,
                           const std::string& what) {
  json j = json::parse(column_text(s, col), nullptr, false);
  if (j.is_discarded())
    return make_error(errc::store_error,
                      "registry '" + path + "': " + what + " is not valid JSON (corrupt)");
  return j;
}

expected<device_record> read_device(const std::string& path, sqlite3_stmt* s) {
  device_record r;
  r.id = column_text(s, 0);
  r.parent = column_text(s, 1);
  r.kind = column_text(s, 2);
  auto tags = stored_json(path, s, 3, "the tags of device '" + r.id + "'");
  if (!tags)
    return std::move(tags).err();
  r.tags = std::move(*tags);
  r.auth = column_text(s, 4);
  r.thumbprint = column_text(s, 5);
  r.primary_key = column_text(s, 6);
  r.secondary_key = column_text(s, 7);
  r.created_ms = sqlite3_column_int64(s, 8);
  r.updated_ms = sqlite3_column_int64(s, 9);
  r.last_seen_ms = sqlite3_column_int64(s, 10);
  return r;
}

/// A twin row of get_twin_ / list_twins_ (module first).
expected<twin_record> read_twin(const std::string& path, sqlite3_stmt* s,
                                const std::string& device) {
  twin_record t;
  t.device = device;
  t.module = column_text(s, 0);
  const std::string name = twin_name(device, t.module);
  auto desired = stored_json(path, s, 1, "the desired properties of '" + name + "'");
  if (!desired)
    return std::move(desired).err();
  t.desired = std::move(*desired);
  t.desired_version = sqlite3_column_int64(s, 2);
  t.desired_updated_ms = sqlite3_column_int64(s, 3);
  auto reported = stored_json(path, s, 4, "the reported properties of '" + name + "'");
  if (!reported)
    return std::move(reported).err();
  t.reported = std::move(*reported);
  t.reported_version = sqlite3_column_int64(s, 5);
  t.reported_updated_ms = sqlite3_column_int64(s, 6);
  return t;
}

deployment_record read_deployment(sqlite3_stmt* s) {
  deployment_record d;
  d.id = column_text(s, 0);
  d.manifest_json = column_text(s, 1);
  d.target_condition = column_text(s, 2);
  d.priority = sqlite3_column_int(s, 3);
  d.created_ms = sqlite3_column_int64(s, 4);
  return d;
}

deployment_status read_status(sqlite3_stmt* s) {
  deployment_status st;
  st.deployment = column_text(s, 0);
  st.device = column_text(s, 1);
  st.status = column_text(s, 2);
  st.detail = column_text(s, 3);
  st.updated_ms = sqlite3_column_int64(s, 4);
  return st;
}

}  // namespace

// -- devices -----------------------------------------------------------------------

expected<std::optional<device_record>> fleet_registry::find_device(const std::string& id) {
  return row<device_record>(
    get_device_.get(), [this](sqlite3_stmt* s) { return read_device(path_, s); }, id);
}

expected<std::optional<std::string>> fleet_registry::parent_of(const std::string& id) {
  return row<std::string>(
    get_parent_.get(), [](sqlite3_stmt* s) { return column_text(s, 0); }, id);
}

expected<void> fleet_registry::check_node(const std::string& id) {
  if (id == root_id_)
    return {};
  auto d = find_device(id);
  if (!d)
    return std::move(d).err();
  if (!d->has_value())
    return make_error(errc::not_found, "registry: device " + shown(id) + " is not registered");
  return {};
}

expected<void> fleet_registry::write_device(const device_record& r) {
  const std::string tags = dump(r.tags.is_null() ? json::object() : r.tags);
  return run(insert_device_.get(), r.id, r.parent, r.kind, tags, r.auth, r.thumbprint,
             r.primary_key, r.secondary_key, r.created_ms, r.updated_ms, r.last_seen_ms);
}

expected<void> fleet_registry::erase_device(const std::string& id) {
  for (sqlite3_stmt* s :
       {delete_statuses_of_device_.get(), delete_twins_.get(), delete_device_.get()})
    if (auto ok = run(s, id); !ok)
      return ok;
  return {};
}

expected<device_record> fleet_registry::create_device(const device_record& record) {
  device_record r = record;
  if (r.parent.empty())
    r.parent = root_id_;
  if (r.tags.is_null())
    r.tags = json::object();
  if (auto ok = check_fields(r); !ok)
    return std::move(ok).err();
  if (r.id == root_id_)
    return make_error(errc::invalid_argument,
                      "registry: id: " + shown(r.id) + " is the registry's own (root) id");
  if (auto tags = bounded_text(r.tags, "tags"); !tags)
    return std::move(tags).err();
  if (r.parent == r.id)
    return make_error(errc::invalid_argument,
                      "registry: parent: device " + shown(r.id) + " cannot be its own parent");

  auto existing = find_device(r.id);
  if (!existing)
    return std::move(existing).err();
  if (existing->has_value())
    return make_error(errc::already_exists,
                      "registry: id: device " + shown(r.id) + " is already registered");

  if (r.parent != root_id_) {
    auto parent = find_device(r.parent);
    if (!parent)
      return std::move(parent).err();
    if (!parent->has_value())
      return make_error(errc::not_found, "registry: parent: " + shown(r.parent) +
                                           " is not registered (nor the root " + shown(root_id_) +
                                           ")");
    if ((*parent)->kind != "gateway")
      return make_error(errc::invalid_argument, "registry: parent: " + shown(r.parent) +
                                                  " is a device; only gateways can have children");
    auto chain = path_to(r.parent);  // [root, ..., parent]
    if (!chain)
      return std::move(chain).err();
    if (chain->size() > static_cast<std::size_t>(max_tree_depth))
      return make_error(errc::invalid_argument,
                        "registry: parent: " + shown(r.parent) + " is at depth " +
                          std::to_string(chain->size() - 1) + "; the tree is at most " +
                          std::to_string(max_tree_depth) + " levels deep");
  }

  r.created_ms = now_ms();
  r.updated_ms = r.created_ms;
  r.last_seen_ms = 0;
  if (auto ok = write_device(r); !ok)
    return std::move(ok).err();
  return r;
}

expected<device_record> fleet_registry::get_device(const std::string& id) {
  auto d = find_device(id);
  if (!d)
    return std::move(d).err();
  if (!d->has_value())
    return make_error(errc::not_found, "registry: device " + shown(id) + " is not registered");
  return std::move(**d);
}

expected<std::vector<device_record>> fleet_registry::query_devices(sqlite3_stmt* s,
                                                                   const std::string& arg) {
  const auto read = [this](sqlite3_stmt* r) { return read_device(path_, r); };
  if (sqlite3_bind_parameter_count(s) == 0)
    return rows<device_record>(s, read);
  return rows<device_record>(s, read, arg);
}

expected<std::vector<device_record>> fleet_registry::list_devices() {
  return query_devices(list_devices_.get(), {});
}

expected<void> fleet_registry::delete_device(const std::string& id) {
  if (auto ok = get_device(id); !ok)
    return std::move(ok).err();
  {
    auto kids = rows<std::string>(
      first_children_.get(), [](sqlite3_stmt* s) { return column_text(s, 0); }, id);
    if (!kids)
      return std::move(kids).err();
    if (!kids->empty()) {
      std::string names;
      for (std::size_t i = 0; i < kids->size() && i < 5; ++i)
        names += (i ? ", " : "") + (*kids)[i];
      if (kids->size() > 5)
        names += ", ...";
      return make_error(
        errc::invalid_argument,
        "registry: device " + shown(id) + " has children (" + names + "); delete them first");
    }
  }
  transaction tx(*this);
  if (auto ok = tx.begin(); !ok)
    return ok;
  if (auto ok = erase_device(id); !ok)
    return ok;
  return tx.commit();
}

expected<device_record> fleet_registry::update_tags(const std::string& id, json tags) {
  auto text = bounded_text(tags, "tags");
  if (!text)
    return std::move(text).err();
  if (auto ok = run(update_tags_.get(), id, *text, now_ms()); !ok)
    return std::move(ok).err();
  if (sqlite3_changes(db_.get()) == 0)
    return make_error(errc::not_found, "registry: device " + shown(id) + " is not registered");
  return get_device(id);
}

expected<device_record> fleet_registry::set_tags(const std::string& id, const json& tags) {
  if (auto ok = check_object(tags, "tags"); !ok)
    return std::move(ok).err();
  return update_tags(id, tags);
}

expected<device_record> fleet_registry::patch_tags(const std::string& id, const json& patch) {
  if (auto ok = check_object(patch, "tags patch"); !ok)
    return std::move(ok).err();
  auto d = get_device(id);
  if (!d)
    return d;
  json tags = std::move(d->tags);
  tags.merge_patch(patch);
  return update_tags(id, std::move(tags));
}

expected<void> fleet_registry::touch_last_seen(const std::string& id, std::int64_t ms) {
  if (auto ok = run(touch_.get(), id, ms); !ok)
    return ok;
  if (sqlite3_changes(db_.get()) == 0)
    return make_error(errc::not_found, "registry: device " + shown(id) + " is not registered");
  return {};
}

// -- the tree ----------------------------------------------------------------------

expected<std::vector<device_record>> fleet_registry::children(const std::string& id) {
  if (auto ok = check_node(id); !ok)
    return std::move(ok).err();
  return query_devices(children_.get(), id);
}

expected<std::vector<device_record>> fleet_registry::subtree(const std::string& id) {
  if (auto ok = check_node(id); !ok)
    return std::move(ok).err();
  return query_devices(subtree_.get(), id);
}

expected<bool> fleet_registry::in_subtree(const std::string& root, const std::string& id) {
  if (id == root)
    return true;
  std::string cur = id;
  // Parents are checked on creation, so the walk ends at the root; the bound
  // only guards against a damaged file.
  for (int step = 0; step <= max_tree_depth + 1; ++step) {
    if (cur == root_id_)
      return false;
    auto parent = parent_of(cur);
    if (!parent)
      return std::move(parent).err();
    if (!parent->has_value())
      return false;
    if (**parent == root)
      return true;
    cur = std::move(**parent);
  }
  return false;
}

expected<std::vector<std::string>> fleet_registry::path_to(const std::string& id) {
  std::vector<std::string> chain{id};
  if (id == root_id_)
    return chain;
  std::string cur = id;
  for (int step = 0; step <= max_tree_depth + 1; ++step) {
    auto parent = parent_of(cur);
    if (!parent)
      return std::move(parent).err();
    if (!parent->has_value()) {
      if (cur == id)
        return make_error(errc::not_found, "registry: device " + shown(id) + " is not registered");
      return make_error(errc::store_error, "registry '" + path_ + "': the ancestors of device " +
                                             shown(id) + " do not reach the root " +
                                             shown(root_id_) + " (they stop at " + shown(cur) +
                                             ")");
    }
    chain.push_back(**parent);
    if (**parent == root_id_) {
      std::reverse(chain.begin(), chain.end());
      return chain;
    }
    cur = std::move(**parent);
  }
  return make_error(errc::store_error, "registry '" + path_ + "': the ancestors of device " +
                                         shown(id) + " form a cycle or a chain deeper than " +
                                         std::to_string(max_tree_depth));
}

expected<std::optional<std::string>> fleet_registry::next_hop(const std::string& from,
                                                              const std::string& target) {
  std::string cur = target;
  for (int step = 0; step <= max_tree_depth + 1; ++step) {
    if (cur == from || cur == root_id_)
      return std::optional<std::string>();
    auto parent = parent_of(cur);
    if (!parent)
      return std::move(parent).err();
    if (!parent->has_value())
      return std::optional<std::string>();
    if (**parent == from)
      return std::optional<std::string>(std::move(cur));
    cur = std::move(**parent);
  }
  return std::optional<std::string>();
}

// -- scope sync --------------------------------------------------------------------

expected<std::vector<device_record>> fleet_registry::export_subtree(const std::string& gateway_id) {
  auto gw = get_device(gateway_id);
  if (!gw)
    return std::move(gw).err();
  if (gw->kind != "gateway")
    return make_error(errc::invalid_argument,
                      "registry: " + shown(gateway_id) + " is a device, not a gateway");
  auto rest = subtree(gateway_id);
  if (!rest)
    return rest;
  std::vector<device_record> out;
  out.reserve(rest->size() + 1);
  out.push_back(std::move(*gw));
  for (auto& d : *rest)
    out.push_back(std::move(d));
  return out;
}

expected<void> fleet_registry::replace_scope(const std::string& gateway_id,
                                             const std::vector<device_record>& records) {
  const std::string who = "registry: replace_scope: ";
  if (gateway_id != root_id_)
    return make_error(errc::invalid_argument, who + "gateway_id " + shown(gateway_id) +
                                                " is not this registry's root " + shown(root_id_));
  std::unordered_map<std::string, const device_record*> by_id;
  by_id.reserve(records.size());
  for (const auto& r : records) {
    if (auto ok = check_fields(r); !ok) {
      auto e = std::move(ok).err();
      e.message.insert(std::string_view("registry: ").size(), "replace_scope: ");
      return e;
    }
    if (auto tags = bounded_text(r.tags, "tags"); !tags)
      return std::move(tags).err();
    if (!by_id.emplace(r.id, &r).second)
      return make_error(errc::invalid_argument,
                        who + "device " + shown(r.id) + " appears more than once");
  }
  auto gw = by_id.find(gateway_id);
  if (gw == by_id.end())
    return make_error(errc::invalid_argument,
                      who + "the records do not include the gateway " + shown(gateway_id));
  if (gw->second->kind != "gateway")
    return make_error(errc::invalid_argument,
                      who + "the record of " + shown(gateway_id) + " is not a gateway");
  for (const auto& r : records) {
    if (r.id == gateway_id)
      continue;
    // Walk up inside the set: every record must reach the gateway.
    const device_record* cur = &r;
    std::size_t steps = 0;
    while (cur->parent != gateway_id) {
      auto p = by_id.find(cur->parent);
      if (p == by_id.end())
        return make_error(errc::invalid_argument, who + "device " + shown(cur->id) + ": parent " +
                                                    shown(cur->parent) + " is not in the records");
      if (p->second->kind != "gateway")
        return make_error(errc::invalid_argument, who + "device " + shown(cur->id) + ": parent " +
                                                    shown(cur->parent) +
                                                    " is a device, not a gateway");
      cur = p->second;
      if (++steps > records.size())
        return make_error(errc::invalid_argument,
                          who + "the parents of device " + shown(r.id) + " form a cycle");
    }
  }

  auto current = list_devices();
  if (!current)
    return std::move(current).err();

  transaction tx(*this);
  if (auto ok = tx.begin(); !ok)
    return ok;
  for (const auto& d : *current) {
    if (by_id.count(d.id) != 0)
      continue;
    if (auto ok = erase_device(d.id); !ok)
      return ok;
  }
  for (const auto& r : records)
    if (auto ok = write_device(r); !ok)
      return ok;
  return tx.commit();
}

// -- twins ---------------------------------------------------------------------------

expected<void> fleet_registry::check_twin_key(const std::string& device,
                                              const std::string& module) {
  if (!module.empty() && module != "$edgeAgent" && module != "$edgeHub" &&
      !is_valid_module_name(module))
    return make_error(errc::invalid_argument,
                      "registry: module: " + shown(module) +
                        " is not a module name (1 to 64 of A-Z a-z 0-9 _ . -, "
                        "$edgeAgent, $edgeHub, or \"\" for the device twin)");
  return check_node(device);
}

expected<std::optional<twin_record>> fleet_registry::find_twin(const std::string& device,
                                                               const std::string& module) {
  return row<twin_record>(
    get_twin_.get(), [&](sqlite3_stmt* s) { return read_twin(path_, s, device); }, device, module);
}

expected<void> fleet_registry::write_twin(const twin_record& t) {
  const std::string desired = dump(t.desired);
  const std::string reported = dump(t.reported);
  return run(upsert_twin_.get(), t.device, t.module, desired, t.desired_version,
             t.desired_updated_ms, reported, t.reported_version, t.reported_updated_ms);
}

expected<twin_record> fleet_registry::twin_or_empty(const std::string& device,
                                                    const std::string& module) {
  auto found = find_twin(device, module);
  if (!found)
    return std::move(found).err();
  if (found->has_value())
    return std::move(**found);
  twin_record empty;
  empty.device = device;
  empty.module = module;
  return empty;
}

expected<twin_record> fleet_registry::get_twin(const std::string& device,
                                               const std::string& module) {
  if (auto ok = check_twin_key(device, module); !ok)
    return std::move(ok).err();
  return twin_or_empty(device, module);
}

expected<std::vector<twin_record>> fleet_registry::list_twins(const std::string& device) {
  if (auto ok = check_node(device); !ok)
    return std::move(ok).err();
  return rows<twin_record>(
    list_twins_.get(), [&](sqlite3_stmt* s) { return read_twin(path_, s, device); }, device);
}

namespace {

/// One side of a twin: its document, version and time of last change.
struct twin_half {
  json& doc;
  std::int64_t& version;
  std::int64_t& updated_ms;
};

twin_half half_of(twin_record& t, bool desired) {
  if (desired)
    return {t.desired, t.desired_version, t.desired_updated_ms};
  return {t.reported, t.reported_version, t.reported_updated_ms};
}

/// "desired properties of 'dev/module'", for messages about a twin's side.
std::string properties_of(std::string_view side, const std::string& device,
                          const std::string& module) {
  return std::string(side) + " properties of " + shown(twin_name(device, module));
}

}  // namespace

expected<twin_record> fleet_registry::edit_twin(
  const std::string& device, const std::string& module,
  const std::function<expected<bool>(twin_record&)>& edit) {
  if (auto ok = check_twin_key(device, module); !ok)
    return std::move(ok).err();
  transaction tx(*this);
  if (auto ok = tx.begin(); !ok)
    return std::move(ok).err();
  auto t = twin_or_empty(device, module);
  if (!t)
    return t;
  auto write = edit(*t);
  if (!write)
    return std::move(write).err();
  if (!*write)
    return t;  // nothing to change; the transaction rolls back (nothing written)
  if (auto ok = write_twin(*t); !ok)
    return std::move(ok).err();
  if (auto ok = tx.commit(); !ok)
    return std::move(ok).err();
  return t;
}

expected<twin_record> fleet_registry::change_twin(const std::string& device,
                                                  const std::string& module, const json& doc,
                                                  twin_side side, bool merge) {
  const bool desired = side == twin_side::desired;
  const std::string_view side_name = desired ? "desired" : "reported";
  if (auto ok = check_object(doc, std::string(side_name) + (merge ? " patch" : "")); !ok)
    return std::move(ok).err();
  return edit_twin(device, module, [&](twin_record& t) -> expected<bool> {
    twin_half half = half_of(t, desired);
    if (merge)
      half.doc.merge_patch(doc);
    else
      half.doc = doc;
    if (auto text = bounded_text(half.doc, properties_of(side_name, device, module)); !text)
      return std::move(text).err();
    ++half.version;
    half.updated_ms = now_ms();
    return true;
  });
}

expected<twin_record> fleet_registry::patch_desired(const std::string& device,
                                                    const std::string& module, const json& patch) {
  return change_twin(device, module, patch, twin_side::desired, true);
}

expected<twin_record> fleet_registry::set_desired(const std::string& device,
                                                  const std::string& module, const json& doc) {
  return change_twin(device, module, doc, twin_side::desired, false);
}

expected<twin_record> fleet_registry::patch_reported(const std::string& device,
                                                     const std::string& module, const json& patch) {
  return change_twin(device, module, patch, twin_side::reported, true);
}

expected<twin_record> fleet_registry::set_reported_full(const std::string& device,
                                                        const std::string& module, const json& doc,
                                                        std::int64_t version) {
  return set_full(device, module, doc, version, twin_side::reported);
}

expected<twin_record> fleet_registry::set_desired_full(const std::string& device,
                                                       const std::string& module, const json& doc,
                                                       std::int64_t version) {
  return set_full(device, module, doc, version, twin_side::desired);
}

expected<twin_record> fleet_registry::set_full(const std::string& device, const std::string& module,
                                               const json& doc, std::int64_t version,
                                               twin_side side) {
  const bool desired = side == twin_side::desired;
  const std::string_view side_name = desired ? "desired" : "reported";
  if (version < 0)
    return make_error(errc::invalid_argument,
                      "registry: version: must be >= 0, not " + std::to_string(version));
  if (auto ok = check_object(doc, side_name); !ok)
    return std::move(ok).err();
  if (auto text = bounded_text(doc, properties_of(side_name, device, module)); !text)
    return std::move(text).err();
  return edit_twin(device, module, [&](twin_record& t) -> expected<bool> {
    twin_half half = half_of(t, desired);
    if (version <= half.version)
      return false;  // ours is as new or newer
    half.doc = doc;
    half.version = version;
    half.updated_ms = now_ms();
    return true;
  });
}

// -- deployments -----------------------------------------------------------------------

expected<deployment_record> fleet_registry::create_deployment(const deployment_record& record) {
  deployment_record d = record;
  if (!is_valid_id(d.id))
    return make_error(errc::invalid_argument,
                      "registry: id: " + shown(d.id) +
                        " is not a valid deployment id (1 to 128 of A-Z a-z 0-9 - . : _)");
  const std::string of = "registry: deployment " + shown(d.id) + ": ";
  if (d.priority < 0)
    return make_error(errc::invalid_argument,
                      of + "priority: must be >= 0, not " + std::to_string(d.priority));
  if (d.manifest_json.size() > max_document_bytes)
    return make_error(errc::invalid_argument,
                      of + "manifest_json: " + std::to_string(d.manifest_json.size()) +
                        " bytes, more than " + std::to_string(max_document_bytes));
  try {
    const json manifest = json::parse(d.manifest_json);
    if (!manifest.is_object())
      return make_error(errc::invalid_argument,
                        of + "manifest_json: must be a JSON object, not " + type_name(manifest));
  } catch (const json::exception& e) {
    return make_error(errc::invalid_argument, of + "manifest_json: not valid JSON: " + e.what());
  }
  if (auto c = target_condition::compile(d.target_condition); !c)
    return make_error(errc::invalid_argument, of + c.err().message);

  {
    auto existing = get_deployment(d.id);
    if (existing)
      return make_error(errc::already_exists, of + "already exists");
    if (existing.err().code != errc::not_found)
      return std::move(existing).err();
  }

  d.created_ms = now_ms();
  if (auto ok = run(insert_deployment_.get(), d.id, d.manifest_json, d.target_condition, d.priority,
                    d.created_ms);
      !ok)
    return std::move(ok).err();
  return d;
}

expected<deployment_record> fleet_registry::get_deployment(const std::string& id) {
  auto d = row<deployment_record>(get_deployment_.get(), read_deployment, id);
  if (!d)
    return std::move(d).err();
  if (!d->has_value())
    return make_error(errc::not_found, "registry: deployment " + shown(id) + " does not exist");
  return std::move(**d);
}

expected<std::vector<deployment_record>> fleet_registry::list_deployments() {
  return rows<deployment_record>(list_deployments_.get(), read_deployment);
}

expected<void> fleet_registry::delete_deployment(const std::string& id) {
  if (auto ok = get_deployment(id); !ok)
    return std::move(ok).err();
  transaction tx(*this);
  if (auto ok = tx.begin(); !ok)
    return ok;
  for (sqlite3_stmt* s : {delete_statuses_of_deployment_.get(), delete_deployment_.get()})
    if (auto ok = run(s, id); !ok)
      return ok;
  return tx.commit();
}

expected<std::optional<deployment_record>> fleet_registry::deployment_for(
  const device_record& device) {
  if (device.kind != "gateway")
    return std::optional<deployment_record>();
  auto ranked = rank(list_deployments(), path_);
  if (!ranked)
    return std::move(ranked).err();
  const deployment_record* best = first_match(*ranked, device);
  if (best == nullptr)
    return std::optional<deployment_record>();
  return std::optional<deployment_record>(*best);
}

expected<std::map<std::string, std::string>> fleet_registry::assignments() {
  auto ranked = rank(list_deployments(), path_);
  if (!ranked)
    return std::move(ranked).err();
  auto gateways = query_devices(list_gateways_.get(), {});
  if (!gateways)
    return std::move(gateways).err();
  std::map<std::string, std::string> out;
  for (const auto& gw : *gateways)
    if (const deployment_record* d = first_match(*ranked, gw))
      out.emplace(gw.id, d->id);
  return out;
}

expected<deployment_status> fleet_registry::set_status(const deployment_status& status) {
  if (status.status != "applied" && status.status != "succeeded" && status.status != "failed")
    return make_error(
      errc::invalid_argument,
      "registry: status: must be 'applied', 'succeeded' or 'failed', not " + shown(status.status));
  if (auto ok = get_deployment(status.deployment); !ok)
    return std::move(ok).err();
  if (auto ok = get_device(status.device); !ok)
    return std::move(ok).err();
  deployment_status st = status;
  st.updated_ms = now_ms();
  if (auto ok =
        run(upsert_status_.get(), st.deployment, st.device, st.status, st.detail, st.updated_ms);
      !ok)
    return std::move(ok).err();
  return st;
}

expected<std::vector<deployment_status>> fleet_registry::statuses_of(
  const std::string& deployment) {
  return rows<deployment_status>(statuses_of_.get(), read_status, deployment);
}

expected<std::vector<deployment_status>> fleet_registry::status_of(const std::string& device) {
  return rows<deployment_status>(status_of_.get(), read_status, device);
}

}  // namespace canopy
