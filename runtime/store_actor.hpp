// The store actor: the one owner of the node's SQLite connection while the node
// runs (DESIGN.md: core/store). Persists what the agent reports and keeps the
// messages that reach $upstream on a node with no parent (on the hub: the fleet's
// telemetry), for `canopyctl monitor` and `canopyctl telemetry`.
//
// Protocol (atoms in runtime/atoms.hpp):
//   (put, module_row)                      save a module's runtime state
//   (forget, std::string module)           delete a module's state and reported properties
//   (reported, std::string module, std::string json)   save reported properties
//   (deploy, deployment)                   save the last applied deployment
//   (route_msg, routed_message, uint64 token)   the router hands over a $upstream message:
//                                          stored in batches (one transaction per batch),
//                                          acknowledged to the router as (delivered,
//                                          "$upstream", token) after the commit (or (nack,
//                                          "$upstream") if the write failed), then pushed to
//                                          subscribers; each record names its source
//                                          device (routed_message::device)
//   (subscribe, uint64 id, int64 after_seq, uint64 backlog, upstream_callback)
//   (unsubscribe, uint64 id)
//   (query, std::string device, int64 since_ms, int64 after_seq, uint64 limit)
//     -> std::vector<upstream_record>      node_store::query_upstream ("" = every
//                                          device; limit capped at 10000), after
//                                          writing what is batched; a store failure
//                                          answers caf::sec::runtime_error with the
//                                          store's message as context
// Write errors are logged, counted and never crash the node's other parts.
#pragma once

#include "runtime/store.hpp"

#include <caf/actor.hpp>
#include <caf/allowed_unsafe_message_type.hpp>
#include <caf/fwd.hpp>

#include <functional>
#include <memory>
#include <vector>

namespace canopy {

/// Receives $upstream records; runs on the store actor's thread, must be cheap.
using upstream_callback = std::shared_ptr<std::function<void(upstream_record)>>;

/// Spawns the store actor; it takes ownership of `store`.
caf::actor spawn_store_actor(caf::actor_system& sys, std::shared_ptr<node_store> store,
                             const clock& clk);

}  // namespace canopy

CAF_ALLOW_UNSAFE_MESSAGE_TYPE(canopy::upstream_callback)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(std::vector<canopy::upstream_record>)
