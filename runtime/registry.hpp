// canopy::fleet_registry — the fleet's devices, twins and deployments in one
// SQLite file, `data_dir/registry.db` (DESIGN.md "Registry"; issue 4).
//
// On the hub it is the authority: devices and gateways with their parent, tags
// and credentials; twins per (device, module); deployments with their target
// conditions and per-device status. On a gateway it is a cache of the
// gateway's subtree (replace_scope), so children keep authenticating offline.
//
// The tree: every registered node has a parent, which is either another
// registered gateway or the registry's root id (the id of the node that owns
// the file: the hub's id at the hub, the gateway's own id on a gateway). The
// root is a virtual node: it is never a row, but children(), subtree(),
// in_subtree(), path_to() and next_hop() accept it. Only gateways have children.
//
// Threading: a fleet_registry is NOT thread-safe. It has one owner (the hub's
// registry actor, a gateway's link actor, a test or a tool) that calls every
// member from the thread it runs on. It assumes it is the only writer of its
// file; another connection only ever waits on SQLite's lock (busy_timeout).
//
// Storage: WAL with synchronous=FULL, so a write that returned is on disk.
// Every write that touches more than one row is one transaction. Time stamps
// (created_ms, updated_ms, ...) come from the injected clock's wall_ms().
//
// Errors: bad input is invalid_argument (the message names the field), an
// unknown id is not_found, a duplicate id is already_exists, and every SQLite
// failure is store_error naming the file and statement; all messages start
// with "registry". Nothing throws (except std::bad_alloc).
#pragma once

#include "runtime/clock.hpp"
#include "runtime/expected.hpp"
#include "runtime/store.hpp"  // detail::sql_statement, detail::sqlite_closer

#include <nlohmann/json.hpp>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

struct sqlite3;
struct sqlite3_stmt;

namespace canopy {

/// A registered device or gateway.
struct device_record {
  /// 1 to 128 of A-Z a-z 0-9 - . : _ (the certificate CN of the node/device).
  std::string id;
  /// A registered gateway, or the registry's root id; "" in create_device
  /// means the root id.
  std::string parent;
  /// "gateway" (a canopy node, may have children) or "device" (a leaf).
  std::string kind = "device";
  /// The device's tags (a JSON object) that target conditions test.
  nlohmann::json tags = nlohmann::json::object();
  /// How it authenticates: "x509_ca" (a certificate chained to the fleet CA,
  /// CN = id), "x509_thumbprint" (a certificate with the given thumbprint) or
  /// "sas" (shared access keys).
  std::string auth = "x509_ca";
  /// x509_thumbprint: the certificate's SHA-1 (40) or SHA-256 (64) hex digest.
  std::string thumbprint;
  /// sas: the primary key (required) and secondary key (optional).
  std::string primary_key;
  std::string secondary_key;
  /// Wall clock (ms since the Unix epoch), set by the registry.
  std::int64_t created_ms = 0;
  /// Last change of tags or credentials (ms since the epoch).
  std::int64_t updated_ms = 0;
  /// Last time the device was seen connected (ms since the epoch); 0 = never.
  std::int64_t last_seen_ms = 0;

  bool operator==(const device_record&) const = default;
};

/// The twin of a device (module "") or of one of its modules.
struct twin_record {
  std::string device;
  /// "" for the device twin; a module name, "$edgeAgent" or "$edgeHub".
  std::string module;
  /// Desired properties (a JSON object), set by the operator, flowing down.
  nlohmann::json desired = nlohmann::json::object();
  /// +1 per change of desired; 0 = never set.
  std::int64_t desired_version = 0;
  /// Reported properties (a JSON object), set by the device, flowing up.
  nlohmann::json reported = nlohmann::json::object();
  /// +1 per reported patch, or the version given to set_reported_full.
  std::int64_t reported_version = 0;
  /// Wall clock (ms since the epoch) of the last change; 0 = never.
  std::int64_t desired_updated_ms = 0;
  std::int64_t reported_updated_ms = 0;

  bool operator==(const twin_record&) const = default;
};

/// A deployment: a manifest for every gateway its target condition matches.
struct deployment_record {
  /// 1 to 128 of A-Z a-z 0-9 - . : _
  std::string id;
  /// The deployment manifest (a JSON object), stored as given; the caller
  /// validates it as a manifest.
  std::string manifest_json;
  /// A target condition (runtime/target_condition.hpp), e.g. "tags.site='a'".
  std::string target_condition;
  /// Higher wins when several deployments match a gateway; >= 0.
  int priority = 0;
  /// Wall clock (ms since the epoch), set by the registry.
  std::int64_t created_ms = 0;

  bool operator==(const deployment_record&) const = default;
};

/// How far a deployment got on one device.
struct deployment_status {
  std::string deployment;
  std::string device;
  /// "applied" (sent to the device), "succeeded" or "failed".
  std::string status;
  /// Free text (e.g. which module failed and why).
  std::string detail;
  /// Wall clock (ms since the epoch), set by the registry.
  std::int64_t updated_ms = 0;

  bool operator==(const deployment_status&) const = default;
};

/// The registry. See the file comment for threading, storage and errors.
class fleet_registry {
 public:
  /// Schema version this build writes (PRAGMA user_version after open()).
  static constexpr int current_schema_version = 1;
  /// How long a write waits for another connection's lock (PRAGMA busy_timeout).
  static constexpr int busy_timeout_ms = 5000;
  /// Largest tags object, twin document (desired or reported) and deployment
  /// manifest, in bytes of compact JSON.
  static constexpr std::size_t max_document_bytes = 32 * 1024;
  /// Deepest nesting of objects/arrays in tags, twin documents and patches.
  static constexpr int max_document_depth = 32;
  /// Deepest position of a node in the tree (the root's children are at 1).
  static constexpr int max_tree_depth = 32;

  /// Opens (creating if needed) `data_dir` and `data_dir/registry.db`, checks
  /// it (PRAGMA quick_check), switches to WAL + synchronous=FULL and migrates
  /// the schema. `root_id` is the id of the node that owns the registry (the
  /// hub's id, or a gateway's own id); it must be a valid device id. `wall`
  /// (borrowed; must outlive the registry) stamps every record. Errors as
  /// node_store::open (io_error, store_error, incompatible), plus
  /// invalid_argument for a bad root_id.
  static expected<std::unique_ptr<fleet_registry>> open(const std::string& data_dir,
                                                        const std::string& root_id,
                                                        const clock& wall);

 private:
  struct token {
    explicit token() = default;
  };

 public:
  /// For open() only (token is private); use open().
  fleet_registry(token, std::string path, std::string root_id, const clock& wall);
  ~fleet_registry();
  fleet_registry(const fleet_registry&) = delete;
  fleet_registry& operator=(const fleet_registry&) = delete;

  /// Full path of the database file.
  const std::string& path() const noexcept { return path_; }
  /// The id of the node that owns this registry (the tree's virtual root).
  const std::string& root_id() const noexcept { return root_id_; }

  /// True if `id` is 1 to 128 of A-Z a-z 0-9 - . : _ (device and deployment ids).
  static bool is_valid_id(std::string_view id) noexcept;

  // -- devices -----------------------------------------------------------------

  /// Registers a device or gateway and returns it as stored (parent "" becomes
  /// root_id(); created_ms = updated_ms = now; last_seen_ms = 0). Checks: id
  /// valid, not the root id, not registered yet (already_exists); parent is the
  /// root or a registered gateway (not_found / invalid_argument), at most
  /// max_tree_depth deep; kind, auth and its credentials, tags (an object of at
  /// most max_document_bytes; null counts as {}). Errors name the field:
  /// "registry: parent: ...".
  expected<device_record> create_device(const device_record& record);

  /// The device `id`; not_found if it is not registered.
  expected<device_record> get_device(const std::string& id);

  /// Every registered device and gateway, sorted by id.
  expected<std::vector<device_record>> list_devices();

  /// Removes `id` with its twins and deployment statuses, in one transaction.
  /// not_found if it is not registered; invalid_argument naming its children
  /// if it has any (delete them first).
  expected<void> delete_device(const std::string& id);

  /// Replaces the tags of `id` (an object, at most max_document_bytes); returns
  /// the updated record (updated_ms = now).
  expected<device_record> set_tags(const std::string& id, const nlohmann::json& tags);

  /// Applies a JSON merge patch (RFC 7386; an object, null deletes a key) to
  /// the tags of `id`; returns the updated record.
  expected<device_record> patch_tags(const std::string& id, const nlohmann::json& patch);

  /// Records that `id` was seen at `ms` (kept if it is later than the stored
  /// last_seen_ms). not_found if it is not registered.
  expected<void> touch_last_seen(const std::string& id, std::int64_t ms);

  // -- the tree ----------------------------------------------------------------

  /// The direct children of `id` (a registered gateway or the root), sorted by
  /// id. not_found if `id` is neither.
  expected<std::vector<device_record>> children(const std::string& id);

  /// Every descendant of `id` (children, their children, ...), `id` itself
  /// excluded, sorted by id. not_found if `id` is neither registered nor the root.
  expected<std::vector<device_record>> subtree(const std::string& id);

  /// True if `id` is `root` or one of its descendants. An unregistered `id`
  /// (other than `root`) is false, not an error. Costs one lookup per level.
  expected<bool> in_subtree(const std::string& root, const std::string& id);

  /// The chain from the registry's root down to `id`: [root_id(), ...,
  /// parent, id]; [root_id()] for the root itself. not_found if `id` is not
  /// registered; store_error if its chain does not reach the root.
  expected<std::vector<std::string>> path_to(const std::string& id);

  /// The direct child of `from` whose subtree contains `target` (the next hop
  /// down the tree from `from` towards `target`); nullopt if `target` is not a
  /// descendant of `from` (including target == from, or unregistered).
  expected<std::optional<std::string>> next_hop(const std::string& from, const std::string& target);

  // -- scope sync (gateways) -----------------------------------------------------

  /// The registry scope of `gateway_id`: the gateway itself first, then every
  /// descendant sorted by id, with credentials. not_found if it is not
  /// registered; invalid_argument if it is not a gateway.
  expected<std::vector<device_record>> export_subtree(const std::string& gateway_id);

  /// Makes the devices in this file exactly `records` (as export_subtree
  /// produced them on the parent), in one transaction. `gateway_id` must be
  /// root_id() and `records` must hold it as a gateway, and every other record's
  /// parent must be in `records` (so they form its subtree). Records keep their
  /// fields, except last_seen_ms, which keeps the local value when that is
  /// later. Twins and deployment statuses of devices no longer present are
  /// deleted; the rest is kept.
  expected<void> replace_scope(const std::string& gateway_id,
                               const std::vector<device_record>& records);

  // -- twins -------------------------------------------------------------------

  /// The twin of (`device`, `module`); a twin never written is empty (docs {},
  /// versions 0). `device` is a registered device or the root; `module` is ""
  /// (the device twin), "$edgeAgent", "$edgeHub" or a module name
  /// (is_valid_module_name). not_found / invalid_argument otherwise.
  expected<twin_record> get_twin(const std::string& device, const std::string& module);

  /// Every stored twin of `device`, sorted by module.
  expected<std::vector<twin_record>> list_twins(const std::string& device);

  /// Merges `patch` (RFC 7386; a JSON object) into the desired properties:
  /// desired_version + 1, desired_updated_ms = now. Returns the new twin. The
  /// result must fit in max_document_bytes.
  expected<twin_record> patch_desired(const std::string& device, const std::string& module,
                                      const nlohmann::json& patch);

  /// Replaces the desired properties with `doc` (a JSON object); version + 1.
  expected<twin_record> set_desired(const std::string& device, const std::string& module,
                                    const nlohmann::json& doc);

  /// Merges `patch` into the reported properties; reported_version + 1.
  expected<twin_record> patch_reported(const std::string& device, const std::string& module,
                                       const nlohmann::json& patch);

  /// A full resync of the reported properties from a child: stores `doc` with
  /// `version` if `version` is newer than the stored reported_version, else
  /// keeps the stored ones. Returns the twin as stored afterwards.
  expected<twin_record> set_reported_full(const std::string& device, const std::string& module,
                                          const nlohmann::json& doc, std::int64_t version);

  /// The same for desired properties arriving from a parent (a gateway's cache
  /// of its subtree's twins): stored only if `version` is newer.
  expected<twin_record> set_desired_full(const std::string& device, const std::string& module,
                                         const nlohmann::json& doc, std::int64_t version);

  // -- deployments -------------------------------------------------------------

  /// Stores a deployment and returns it as stored (created_ms = now). Checks:
  /// id valid and new (already_exists), manifest_json a JSON object of at most
  /// max_document_bytes (it is not validated as a manifest here),
  /// target_condition compiles, priority >= 0.
  expected<deployment_record> create_deployment(const deployment_record& record);

  /// The deployment `id`; not_found if there is none.
  expected<deployment_record> get_deployment(const std::string& id);

  /// Every deployment, sorted by id.
  expected<std::vector<deployment_record>> list_deployments();

  /// Removes a deployment and its statuses. not_found if there is none.
  expected<void> delete_deployment(const std::string& id);

  /// The deployment that applies to `device`: among the deployments whose
  /// target condition matches its id and tags, the highest priority; on a tie
  /// the newest (created_ms), then the smallest id. nullopt if none matches or
  /// `device` is not a gateway (only gateways run deployments). Compiles every
  /// deployment's condition: O(deployments).
  expected<std::optional<deployment_record>> deployment_for(const device_record& device);

  /// Gateway id -> id of the deployment that applies to it (deployment_for),
  /// for every registered gateway that has one. O(gateways x deployments).
  expected<std::map<std::string, std::string>> assignments();

  /// Inserts or replaces the status of (status.deployment, status.device);
  /// updated_ms = now (the given value is ignored). The deployment and the
  /// device must exist; status is "applied", "succeeded" or "failed".
  expected<deployment_status> set_status(const deployment_status& status);

  /// The statuses recorded for `deployment`, sorted by device.
  expected<std::vector<deployment_status>> statuses_of(const std::string& deployment);

  /// The statuses recorded for `device` (one per deployment that reached it),
  /// newest first.
  expected<std::vector<deployment_status>> status_of(const std::string& device);

 private:
  class transaction;

  expected<void> prepare_statements();
  std::int64_t now_ms() const { return wall_->wall_ms(); }
  error stmt_error(sqlite3_stmt* s, int rc) const;
  // Binds `args` to s's parameters 1, 2, ... in order (strings as text,
  // integers as int64), steps it once expecting no rows, and resets it.
  template <class... Args>
  expected<void> run(sqlite3_stmt* s, const Args&... args);
  // Binds `args` as run() does and returns every row of `s`, each read by
  // read(s) (a T or an expected<T>; the first error stops the query).
  template <class T, class Read, class... Args>
  expected<std::vector<T>> rows(sqlite3_stmt* s, Read read, const Args&... args);
  // The same for a statement that returns at most one row; nullopt if none.
  template <class T, class Read, class... Args>
  expected<std::optional<T>> row(sqlite3_stmt* s, Read read, const Args&... args);

  expected<std::optional<device_record>> find_device(const std::string& id);
  expected<std::optional<std::string>> parent_of(const std::string& id);
  expected<void> check_node(const std::string& id);  // registered or the root
  expected<void> write_device(const device_record& r);
  // Deletes a device's row, twins and statuses (inside the caller's transaction).
  expected<void> erase_device(const std::string& id);
  expected<device_record> update_tags(const std::string& id, nlohmann::json tags);
  expected<void> check_twin_key(const std::string& device, const std::string& module);
  expected<std::optional<twin_record>> find_twin(const std::string& device,
                                                 const std::string& module);
  expected<void> write_twin(const twin_record& t);
  // The stored twin of (device, module), or an empty one (versions 0) if none.
  expected<twin_record> twin_or_empty(const std::string& device, const std::string& module);
  // Checks the key, then in one transaction loads the twin (twin_or_empty) and
  // calls `edit` on it; writes and commits it if `edit` returns true, rolls
  // back if false or an error. Returns the twin as `edit` left it.
  expected<twin_record> edit_twin(const std::string& device, const std::string& module,
                                  const std::function<expected<bool>(twin_record&)>& edit);
  enum class twin_side { desired, reported };
  expected<twin_record> set_full(const std::string& device, const std::string& module,
                                 const nlohmann::json& doc, std::int64_t version, twin_side side);
  expected<twin_record> change_twin(const std::string& device, const std::string& module,
                                    const nlohmann::json& doc, twin_side side, bool merge);
  expected<std::vector<device_record>> query_devices(sqlite3_stmt* s, const std::string& arg);

  std::string path_;
  std::string root_id_;
  const clock* wall_;
  // Declared before the statements so it is destroyed after them.
  std::unique_ptr<sqlite3, detail::sqlite_closer> db_;

  detail::sql_statement begin_;
  detail::sql_statement commit_;
  detail::sql_statement rollback_;
  detail::sql_statement insert_device_;
  detail::sql_statement get_device_;
  detail::sql_statement list_devices_;
  detail::sql_statement get_parent_;
  detail::sql_statement children_;
  detail::sql_statement subtree_;
  detail::sql_statement first_children_;
  detail::sql_statement delete_device_;
  detail::sql_statement update_tags_;
  detail::sql_statement touch_;
  detail::sql_statement get_twin_;
  detail::sql_statement list_twins_;
  detail::sql_statement upsert_twin_;
  detail::sql_statement delete_twins_;
  detail::sql_statement insert_deployment_;
  detail::sql_statement get_deployment_;
  detail::sql_statement list_deployments_;
  detail::sql_statement delete_deployment_;
  detail::sql_statement list_gateways_;
  detail::sql_statement upsert_status_;
  detail::sql_statement statuses_of_;
  detail::sql_statement status_of_;
  detail::sql_statement delete_statuses_of_device_;
  detail::sql_statement delete_statuses_of_deployment_;
};

}  // namespace canopy
