// The actor that runs one instance of an actor module (a canopy::module from a
// .so or a builtin), under the modules supervisor.
//
// Protocol (atoms in runtime/atoms.hpp):
//   (input, std::string input, message, uint64 token) -> module::on_message, then
//                                                   (delivered, name, token) to the router
//                                                   (batched, cumulative)
//   (method, std::string name, std::string json)    -> (int status, std::string json)
//   (desired, std::string json, bool complete)      -> module::on_desired_properties
//   (health_ping, uint64 seq)                       -> sends (health_pong, seq) to the sender
// On start it announces itself to the router as (module_up, name, self), after
// module::start and the first desired-properties callback returned.
// A callback that throws ends the actor with sec::runtime_error carrying the
// exception text (the supervisor restarts it); an orderly exit
// (exit_reason::user_shutdown) calls module::stop first.
#pragma once

#include "actors/plugin_loader.hpp"

#include <caf/actor.hpp>
#include <caf/fwd.hpp>
#include <nlohmann/json.hpp>
#include <spdlog/logger.h>

#include <map>
#include <memory>
#include <string>

namespace canopy {

struct module_host_config {
  std::string name;                         ///< the module's name in the deployment
  std::string device_id;                    ///< the node's device id
  std::shared_ptr<const module_type> type;  ///< what to instantiate
  nlohmann::json settings = nlohmann::json::object();
  std::map<std::string, std::string> env;
  nlohmann::json desired = nlohmann::json::object();  ///< desired properties at start
  caf::actor router;                        ///< where send() goes; may be invalid
  caf::actor agent;                         ///< where report() goes as (reported, name, json)
  std::shared_ptr<spdlog::logger> logger;   ///< the module's logger; required
};

/// Spawns a module host. Cheap: the instance is created inside the actor.
caf::actor spawn_module_host(caf::actor_system& sys, module_host_config cfg);

}  // namespace canopy
