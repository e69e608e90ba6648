// The actor side of a node's MQTT port (issue 5): who may connect, and one
// session actor per client under the node's `downstream` supervisor.
//
// mqtt_gateway implements mqtt_host (gateway/mqtt_server.hpp). On a CONNECT it
// parses the claimed identity, looks its credentials up — a leaf device in
// the fleet registry (on a gateway: the cached scope of its subtree, so
// devices connect while the parent is away), one of this node's process
// modules in mqtt_module_keys — and decides with authenticate_mqtt. An
// accepted client gets a session actor, added to the downstream supervisor as
// a temporary child: a misbehaving client can only bring down its own actor,
// and its connection closes with it.
//
// A session actor speaks Azure IoT Hub's topics (gateway/iothub_protocol.hpp):
//   - telemetry and module outputs enter the router as one (inject, batch) per
//     read; QoS 1 PUBACKs follow the router's answer, i.e. durability;
//   - twin GET / PATCH reported go to the fleet registry (leaf devices: the
//     report flows up the tree) or to the agent (process modules); desired
//     changes come back as desired patches (the difference to what the client
//     has seen) with their $version;
//   - direct methods: (invoke, module, method, payload, timeout_ms) ->
//     method_reply from the fleet, or (method, name, payload) -> (int, string)
//     from a process module's host; the client answers on
//     $iothub/methods/res/{status}/?$rid=;
//   - cloud-to-device: the reserved method "$c2d" (payload: mqtt_c2d_payload)
//     becomes a QoS 1 PUBLISH on devices/{d}/messages/devicebound/{bag};
//   - a process module's session is its instance at the router: its inputs
//     are QoS 1 PUBLISHes on devices/{d}/modules/{m}/inputs/{input}/{bag}, and
//     each PUBACK acknowledges the delivery.
// A persistent session (clean_session = 0, leaf devices) outlives its
// connection: its subscriptions and the QoS 1 messages not yet acknowledged
// (C2D) wait in the actor until the client comes back (CONNACK session
// present). With a session store (runtime/session_store.hpp) they are kept
// on disk too, and a restarted node brings them back.
#pragma once

#include "gateway/hub_control.hpp"  // c2d_method
#include "gateway/mqtt_server.hpp"

#include <caf/actor.hpp>
#include <caf/fwd.hpp>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

namespace canopy {

class clock;
class fleet_bridge;
class mqtt_session_store;
struct agent_memory;

/// The sessions of the node's MQTT clients by client id ("dev" or
/// "dev/module"). Thread-safe.
class mqtt_directory {
 public:
  /// The session actor of `client_id`, or an invalid handle.
  caf::actor find(const std::string& client_id) const;
  /// The session of device `device` ("" module) or of its module `module`.
  caf::actor find(const std::string& device, const std::string& module) const;
  /// The session of `client_id` if it is a persistent one (clean_session = 0).
  caf::actor find_persistent(const std::string& client_id) const;
  /// Registers `session` for `client_id`; returns the one it replaces (or invalid).
  caf::actor put(const std::string& client_id, caf::actor session, bool persistent);
  /// Registers a restored, disconnected persistent session unless `client_id`
  /// already has one; true if it did.
  bool put_restored(const std::string& client_id, caf::actor session);
  /// Removes `client_id` if it still maps to `session`.
  void erase(const std::string& client_id, const caf::actor& session);
  /// Sessions registered now (connected or persistent and waiting).
  std::size_t size() const;
  /// Marks `client_id`'s session (if it is still `session`) connected or not.
  void set_connected(const std::string& client_id, const caf::actor& session, bool connected);
  /// The leaf devices (not modules) connected now, sorted.
  std::vector<std::string> connected_devices() const;

 private:
  mutable std::mutex mtx_;
  struct entry {
    caf::actor session;
    bool persistent = false;
    bool connected = true;
  };
  std::map<std::string, entry> sessions_;
};

/// The SAS keys of this node's process modules: a fresh random key per module,
/// made when the node starts it, so that only the process the node started
/// can connect as that module. Thread-safe.
class mqtt_module_keys {
 public:
  /// The key of `module` (base64), made on first use.
  std::string key_for(const std::string& module);
  /// The key of `module` if one was made.
  std::optional<std::string> find(const std::string& module) const;

 private:
  mutable std::mutex mtx_;
  std::map<std::string, std::string> keys_;
};

/// What the MQTT head needs from its node.
struct mqtt_head_config {
  std::string node_id;
  std::string hub_host;                 ///< the host name SAS tokens are signed for
  clock* clk = nullptr;                 ///< required
  fleet_bridge* fleet = nullptr;        ///< registry, twins and reports (null: modules only)
  std::function<caf::actor()> router;   ///< messages enter here
  std::function<caf::actor()> agent;    ///< process modules' reported properties
  std::function<caf::actor()> downstream;  ///< the supervisor sessions are added to
  std::shared_ptr<agent_memory> memory;    ///< process modules' twins
  std::shared_ptr<mqtt_directory> directory;  ///< required
  std::shared_ptr<mqtt_module_keys> keys;     ///< required
  /// Persistent sessions on disk (null: they live in memory only).
  std::shared_ptr<mqtt_session_store> sessions;
  /// Most QoS 1 messages (C2D) one session keeps for a client that is away or
  /// has not subscribed (IoT Hub's per-device C2D queue depth is 50).
  std::size_t max_queued = 50;
};

/// The node's mqtt_host. Thread-safe; owned by the node, outlives its server.
class mqtt_gateway final : public mqtt_host {
 public:
  mqtt_gateway(caf::actor_system& sys, mqtt_head_config cfg);
  ~mqtt_gateway() override;

  void connect(mqtt_connect_info info, std::shared_ptr<mqtt_channel> channel,
               std::function<void(std::variant<mqtt_accept, mqtt_refusal>)> done) override;

  /// Brings back the persistent sessions kept on disk, disconnected, as
  /// children of `downstream` (at node start, and when downstream restarts).
  void restore_sessions(const caf::actor& downstream);

  struct impl;

 private:
  std::shared_ptr<impl> impl_;
};

/// The variables a process module connects with: CANOPY_MQTT_HOST, _PORT,
/// _TLS, _CA_FILE (TLS), _USERNAME and _PASSWORD (a SAS token for the module
/// identity, valid for a year, from its key in `keys`). `host` and `port`
/// are where the node's MQTT port listens.
std::map<std::string, std::string> mqtt_module_env(const std::string& node_id, const std::string& module,
                                                   const std::string& hub_host, const std::string& host,
                                                   std::uint16_t port, bool tls, const std::string& ca_file,
                                                   mqtt_module_keys& keys, std::int64_t now_s);

}  // namespace canopy
