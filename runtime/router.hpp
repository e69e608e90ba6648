// The router actor: applies the deployment's routes to every message a module
// sends, and delivers to module inputs or to $upstream (DESIGN.md "Messages").
//
// Protocol (atoms in runtime/atoms.hpp):
//   (route_msg, routed_message)                    a module sent a message
//   (set_routes, route_table)                      a deployment's compiled routes
//   (module_up, std::string name, caf::actor)      an instance of `name` is ready for input;
//                                                  the router monitors it
//   (stats) -> router_stats
// Delivery to a module is (input, std::string input_name, message). While a
// module has no live instance (restarting, backoff, stopped) its messages wait
// in a bounded in-memory queue (oldest dropped and counted when full) and are
// delivered in order when it comes up. $upstream messages go to the upstream
// actor as (route_msg, routed_message).
#pragma once

#include "runtime/route.hpp"

#include <caf/actor.hpp>
#include <caf/allowed_unsafe_message_type.hpp>
#include <caf/fwd.hpp>

#include <canopy/message.hpp>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace canopy {

/// A message in flight, with where it came from kept beside the encoded bytes
/// (so forwarding never re-encodes).
struct routed_message {
  message msg;
  std::string device;  ///< connectionDeviceId
  std::string module;  ///< connectionModuleId
  std::string output;  ///< outputName

  message_source source() const { return {device, module, output}; }
};

/// The compiled routes of one deployment. Immutable, shared.
using route_table = std::shared_ptr<const std::vector<route>>;

/// Counters, for `canopyctl` and tests.
struct router_stats {
  std::uint64_t received = 0;
  std::uint64_t delivered = 0;      ///< sent to a live module instance
  std::uint64_t upstream = 0;       ///< handed to $upstream
  std::uint64_t no_route = 0;       ///< matched no route
  std::uint64_t queued = 0;         ///< currently waiting for a module to come up
  std::uint64_t dropped_full = 0;   ///< dropped because a waiting queue was full
};

struct router_config {
  caf::actor upstream;                  ///< receives $upstream messages; may be invalid (dropped + counted)
  std::size_t max_waiting = 100000;     ///< per module, while it has no instance
};

/// Spawns the router.
caf::actor spawn_router(caf::actor_system& sys, router_config cfg);

}  // namespace canopy

CAF_ALLOW_UNSAFE_MESSAGE_TYPE(canopy::message)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(canopy::routed_message)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(canopy::route_table)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(canopy::router_stats)
