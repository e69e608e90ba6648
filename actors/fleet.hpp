// The fleet actor: a node's place in the tree (DESIGN.md "Between nodes").
// It owns the node's fleet registry (runtime/registry: the authority on the
// hub, a cache of the node's subtree on a gateway), decides which children may
// connect, keeps one child link actor per connected child, and carries twins,
// methods and the registry scope down the tree hop by hop.
//
// The network side (gateway/link.hpp) reaches it through fleet_bridge, which
// implements link_host (calls from connected children) and downstream_handler
// (calls from this node's parent) by handing each call to the fleet actor or
// to the child's link actor. A reply is always given: if the actor that holds
// it dies, the bridge's reply guard answers with errc::unavailable.
//
// Twins travel as whole documents with versions. Desired properties flow down:
// on the hub an operator's patch or a deployment assignment (a gateway's
// `$edgeAgent` desired {"deployment": {"id", "content"}}) goes one hop down at
// once, and a child that connects gets every desired twin of its subtree; a
// gateway keeps them in its registry, applies its own and passes the rest on.
// Reported properties flow up: every `report_interval` a node compares its own
// state (its `$edgeAgent` reported: deployment status as Azure's
// lastDesiredStatus, per-module runtime status, restart count, start/exit
// times, exit reason, and its children's links; and each module's reported
// properties) with what it sent and queues what changed; children's reports
// are stored and queued too; the queue drains while the parent link is up and
// everything is sent again when it comes back (offline changes included).
//
// Messages besides the bridge's: (uplink, bool up) from the parent link,
// (tick) from the clock.
//
// A child link actor checks every message a child uploads against the child's
// subtree (the child and its registered descendants): a message that claims
// another device is refused, counted and logged with the child's id; the rest
// enter this node's router and the upload is answered once they are durable.
#pragma once

#include "actors/parent_link.hpp"  // link_board
#include "gateway/hub_control.hpp"
#include "gateway/link.hpp"
#include "runtime/clock.hpp"

#include <caf/actor.hpp>
#include <caf/fwd.hpp>

#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>

namespace canopy {

class fleet_registry;
struct agent_memory;

/// The child links' state for metrics; guarded by `mtx`.
struct children_board {
  mutable std::mutex mtx;
  std::map<std::string, link_metrics> children;  ///< by child id, role "child"
  std::uint64_t refused_messages = 0;            ///< uploads outside a child's subtree
};

struct fleet_config {
  std::string node_id;                        ///< this node's id (the registry's root)
  bool hub = false;                           ///< the registry is the authority (no parent)
  std::shared_ptr<fleet_registry> registry;   ///< owned by the fleet actor while it runs
  std::function<caf::actor()> router;         ///< uploads are injected here
  std::function<caf::actor()> agent;          ///< methods and deployments for this node
  std::function<caf::actor()> store;          ///< the hub's telemetry (query)
  std::function<caf::actor()> parent_link;    ///< reported properties go up here (not on the hub)
  std::function<bool()> uplink_up;            ///< is the parent link up now (for a restarted fleet)?
  /// This node's modules as the agent keeps them (statuses, reported properties).
  std::shared_ptr<agent_memory> memory;
  /// Validates and applies a deployment manifest (JSON) on this node.
  std::function<void(std::string manifest_json, reply_fn<void> done)> deploy;
  /// Replaces the desired properties of a module of this node's deployment.
  std::function<void(std::string module, nlohmann::json desired, reply_fn<void> done)> module_desired;
  /// How often this node's own reported state is compared and sent up if changed.
  std::chrono::milliseconds report_interval{1000};
  clock* clk = nullptr;
  std::shared_ptr<children_board> board;      ///< required
  /// The MQTT session of a leaf device (module "") or of a module connected to
  /// this node, or an invalid handle (actors/mqtt_head.hpp); may be empty.
  /// Methods, C2D and desired properties for this node's leaf devices go there.
  std::function<caf::actor(const std::string& device, const std::string& module)> session_of;
  /// The leaf devices connected to this node over MQTT now (reported with the
  /// child links in `$edgeAgent` "children"); may be empty.
  std::function<std::vector<std::string>()> leaf_devices;
};

/// Spawns the fleet actor.
caf::actor spawn_fleet(caf::actor_system& sys, fleet_config cfg);

/// The bridge from the I/O thread's callbacks — links and, on the hub, the
/// operator API — to the fleet actor. Thread-safe.
class fleet_bridge final : public link_host, public downstream_handler, public hub_control {
 public:
  /// `fleet` returns the current fleet actor (it may restart).
  fleet_bridge(caf::actor_system& sys, std::function<caf::actor()> fleet);
  ~fleet_bridge() override;

  // link_host
  void admit(std::string child_id, reply_fn<void> done) override;
  void child_up(std::shared_ptr<child_channel> channel) override;
  void child_down(std::string child_id, std::uint64_t channel_id, std::string reason) override;
  void upload(std::string child_id, std::uint64_t channel_id, std::vector<link_envelope> batch,
              reply_fn<std::uint32_t> done) override;
  void report_twins(std::string child_id, std::uint64_t channel_id, std::vector<twin_update> updates,
                    reply_fn<void> done) override;

  // downstream_handler
  void sync_scope(std::vector<device_record> entries, reply_fn<void> done) override;
  void desired(std::vector<twin_update> updates, reply_fn<void> done) override;
  void invoke(std::string device, std::string module, std::string method, std::string payload_json,
              std::chrono::milliseconds timeout, reply_fn<method_reply> done) override;

  // hub_control (on a node that is not the hub, changes are refused)
  void device_create(device_record rec, reply_fn<device_record> done) override;
  void device_list(reply_fn<std::vector<device_record>> done) override;
  void device_get(std::string id, reply_fn<device_record> done) override;
  void device_delete(std::string id, reply_fn<void> done) override;
  void device_set_tags(std::string id, nlohmann::json tags, reply_fn<device_record> done) override;
  void deployment_create(deployment_record rec, reply_fn<deployment_record> done) override;
  void deployment_list(reply_fn<std::vector<deployment_summary>> done) override;
  void deployment_get(std::string id, reply_fn<deployment_summary> done) override;
  void deployment_delete(std::string id, reply_fn<void> done) override;
  void twin_get(std::string device, std::string module, reply_fn<twin_record> done) override;
  void twin_patch(std::string device, std::string module, nlohmann::json patch,
                  reply_fn<twin_record> done) override;
  void status(reply_fn<std::vector<fleet_node>> done) override;
  void telemetry(std::string device, std::int64_t since_ms, std::int64_t after_seq, std::size_t limit,
                 reply_fn<std::vector<telemetry_record>> done) override;

  /// A leaf device connected to this node over MQTT patched its reported
  /// properties (module "" for the device twin): merged into the registry
  /// and, on a gateway, sent up the tree. Answers the new reported version.
  void report_leaf(std::string device, std::string module, nlohmann::json patch,
                   reply_fn<std::int64_t> done);

  struct impl;

 private:
  std::unique_ptr<impl> impl_;
};

}  // namespace canopy
