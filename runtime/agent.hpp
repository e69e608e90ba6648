// The agent actor (like IoT Edge's edgeAgent): reconciles the desired deployment
// with the modules that run, and keeps each module's runtime state.
//
// Protocol (atoms in runtime/atoms.hpp):
//   (deploy, deployment)                 -> void | error   apply a validated deployment
//   (list)                               -> std::vector<module_row>
//   (restart, std::string module)        -> void | error   restart now; clears `failed`
//   (invoke, module, method, payload, uint32 timeout_ms) -> method_reply | error
//   (twin, std::string module)           -> twin_doc | error
//   (reported, std::string module, std::string json_patch)   from a module host
//   (child_event, child_event_info)      from the modules supervisor
//   (modules_ready, caf::actor)          a (new) modules supervisor runs, with no children:
//                                        the agent starts the deployment's modules in it
// Reconcile touches only what changed: added modules start, removed ones stop,
// changed ones restart, and a change of desired properties alone is sent to the
// running instance as a patch. Deployments apply one at a time, in arrival order.
#pragma once

#include "runtime/clock.hpp"
#include "runtime/deployment.hpp"
#include "runtime/supervisor.hpp"
#include "gateway/node_control.hpp"

#include <caf/actor.hpp>
#include <caf/allowed_unsafe_message_type.hpp>
#include <caf/fwd.hpp>

#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>

namespace canopy {

/// What the agent knows that must outlive one agent instance: a restarted
/// agent continues from it, and module (re)starts read their desired
/// properties from it. Owned by the node; every member is guarded by `mtx`.
struct agent_memory {
  std::mutex mtx;
  std::optional<deployment> current;             ///< the deployment being run
  std::map<std::string, module_row> rows;        ///< module statuses
  std::map<std::string, nlohmann::json> reported;  ///< reported properties by module

  /// The current desired properties of `module` ({} if it has none). Locks.
  nlohmann::json desired_of(const std::string& module);
};

struct agent_config {
  /// Builds the supervisor child spec of a module (loads its library, maps its
  /// restartPolicy). Called on the agent's thread.
  std::function<expected<child_spec>(const module_spec&, caf::actor agent)> make_child;
  caf::actor modules;   ///< the modules supervisor; may come later as (modules_ready, actor)
  caf::actor router;    ///< receives (set_routes, route_table)
  caf::actor store;     ///< receives (put, ...) records; may be invalid
  clock* clk = nullptr; ///< wall time for statuses
  /// Applied at start; if unset, the agent runs memory->current again.
  std::optional<deployment> initial;
  /// Shared with the node and later agents; required.
  std::shared_ptr<agent_memory> memory;
};

/// Spawns the agent.
caf::actor spawn_agent(caf::actor_system& sys, agent_config cfg);

/// Maps a module's Azure restartPolicy onto supervision: never -> temporary;
/// on-failure -> transient; on-unhealthy -> transient + health checks;
/// always -> permanent + health checks. Its restart budget becomes the child's
/// own limit and its backoff the child's backoff. `start` is left empty.
child_spec module_child_spec(const module_spec& m);

/// The JSON merge patch (RFC 7386) that turns `from` into `to`.
nlohmann::json merge_patch_between(const nlohmann::json& from, const nlohmann::json& to);

}  // namespace canopy

CAF_ALLOW_UNSAFE_MESSAGE_TYPE(canopy::deployment)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(canopy::module_row)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(std::vector<canopy::module_row>)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(canopy::method_reply)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(canopy::twin_doc)
