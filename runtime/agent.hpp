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
#include <optional>

namespace canopy {

/// Persisted state of one module (the store's module_status row).
struct module_state_record;

struct agent_config {
  /// Builds the supervisor child spec of a module (loads its library, maps its
  /// restartPolicy). Called on the agent's thread.
  std::function<expected<child_spec>(const module_spec&, caf::actor agent)> make_child;
  caf::actor modules;   ///< the modules supervisor; may come later as (modules_ready, actor)
  caf::actor router;    ///< receives (set_routes, route_table)
  caf::actor store;     ///< receives (put, ...) records; may be invalid
  clock* clk = nullptr; ///< wall time for statuses
  std::optional<deployment> initial;        ///< applied at start (the last deployment)
  std::vector<module_row> persisted_rows;   ///< statuses from the store, shown until updated
  std::map<std::string, std::string> persisted_reported;  ///< reported properties by module
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
