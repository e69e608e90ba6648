// The router actor: applies the deployment's routes to every message, keeps
// every accepted message in the durable message store until each of its
// endpoints acknowledged it or it expired, and delivers (DESIGN.md "Messages").
//
// Protocol (atoms in runtime/atoms.hpp):
//   (route_msg, routed_message)                 a module sent a message (fire and forget)
//   (inject, routed_message) -> uint64          a sender that waits: the reply (the number of
//                                               endpoints it was queued to; 0 = no route)
//                                               comes once the message is durable (or was
//                                               delivered and acknowledged before that); an
//                                               error "store full: ..." if refused
//   (inject, std::vector<routed_message>) -> std::vector<uint64>   the same for a batch, in
//                                               order: answered once all are durable (the
//                                               targets of each), or with the first refusal
//   (set_routes, route_table)                   a deployment's compiled routes
//   (module_up, std::string name, caf::actor)   an instance of module `name` (or of the
//                                               "$upstream" receiver: a parent link) is ready for
//                                               input; the router monitors it
//   (delivered, std::string receiver, uint64 token)   receiver acknowledges every delivery
//                                               up to `token` (cumulative)
//   (nack, std::string receiver)                receiver could not take its outstanding
//                                               deliveries: the router sends it (resume) —
//                                               it drops what it gets from the router
//                                               until then — and hands them over again
//                                               after a backoff
//   (stats) -> node_metrics
//
// Delivery to a module instance is (input, std::string input_name, message,
// uint64 token); the module host acknowledges with (delivered, module, token)
// after on_message returned. Delivery to $upstream is (route_msg,
// routed_message, uint64 token) to `router_config::upstream`, acknowledged the
// same way with receiver "$upstream" once it stored the message.
//
// Store and delivery (the rules README.md "Durable routing" documents):
// - Each matching route gives the message a target: a lane (endpoint, route
//   priority) and a TTL (the route's timeToLiveSecs, else the store's default).
// - Group commit: messages wait in memory at most `commit_interval` (or until
//   `commit_batch` are waiting) and are appended in one transaction. Each lane
//   keeps a window of at most `lane_window` messages in memory; beyond it the
//   lane is on disk only and is read back a window at a time as the receiver
//   catches up, so memory never grows with a queue.
// - A message in a live lane's window is handed to its receiver at once. If
//   every receiver acknowledged it before its commit, it is never written
//   (nothing is left to keep); otherwise it is committed and each lane's
//   checkpoint moves when its receiver acknowledges. Senders that wait (inject)
//   are answered only after that point.
// - Write elision for $upstream: its receiver acknowledges a message only once
//   it is durable beyond this node (in the parent's store, or the local
//   telemetry store), so a message whose only open delivery is to $upstream
//   may wait `upstream_hold` for that acknowledgement, even while its sender
//   waits, and is then never written here. Its sender is answered at the
//   next commit after the acknowledgement; messages behind it in the batch
//   wait with it (commits go in order).
// - At most `receiver_window` (`upstream_window` for $upstream) deliveries
//   per receiver are unacknowledged; a receiver that goes down gets its
//   unacknowledged deliveries again, in order, when it comes back. A $upstream receiver that nacks is retried with
//   exponential backoff (`retry_base` .. `retry_cap`) on the injected clock.
// - Priorities: a receiver takes the most urgent lane that has a message,
//   except that a lane passed over `starvation_limit` times in a row goes next.
// - Before handing over a stored message beyond a lane's persisted delivery
//   mark, the mark is committed; after a restart, deliveries at or below the
//   mark are counted as `redelivered`.
#pragma once

#include "runtime/deployment.hpp"
#include "runtime/expected.hpp"
#include "runtime/metrics.hpp"
#include "runtime/route.hpp"

#include <caf/actor.hpp>
#include <caf/allowed_unsafe_message_type.hpp>
#include <caf/fwd.hpp>

#include <canopy/message.hpp>

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace canopy {

class clock;
class message_store;

/// A message in flight, with where it came from kept beside the encoded bytes
/// (so forwarding never re-encodes).
struct routed_message {
  message msg;
  std::string device;  ///< connectionDeviceId
  std::string module;  ///< connectionModuleId ("" for a leaf device)
  std::string output;  ///< outputName

  message_source source() const { return {device, module, output}; }
};

/// One compiled route with what the store needs: its lane and time-to-live.
struct table_route {
  route r;
  int priority = 0;               ///< 0 (most urgent) .. 9
  std::chrono::milliseconds ttl;  ///< message_store_options::no_expiry = never
  std::string endpoint;           ///< r.sink().to_string()
};

/// The compiled routes of one deployment. Immutable, shared.
using route_table = std::shared_ptr<const std::vector<table_route>>;

/// Compiles a deployment's routes: a route's TTL is its timeToLiveSecs, else
/// `store_ttl_secs` (storeAndForwardConfiguration); 0 there means never expire.
/// Errors name the route and column.
expected<route_table> compile_routes(const std::vector<route_spec>& specs,
                                     std::uint32_t store_ttl_secs);

/// Endpoint name of a module input in the store: "/modules/{module}/inputs/{input}".
std::string module_endpoint(const std::string& module, const std::string& input);

/// Endpoint name of $upstream in the store.
inline constexpr const char* upstream_endpoint = "$upstream";

struct router_config {
  /// Receives $upstream messages and acknowledges them; may be invalid
  /// (they then wait in the store).
  caf::actor upstream;
  /// The durable queues; required. The router is its only user while it runs.
  std::shared_ptr<message_store> store;
  /// TTL of messages waiting in memory, retry backoff, expiry sweeps; required.
  clock* clk = nullptr;
  std::size_t lane_window = 1000;         ///< messages of one lane held in memory ($upstream: at least upstream_window)
  std::int64_t lane_window_bytes = 16 << 20;  ///< and at most this many encoded bytes
  std::size_t receiver_window = 1000;     ///< unacknowledged deliveries per module receiver
  /// Unacknowledged deliveries to $upstream: a parent link keeps them on the
  /// wire and in its parent's commit, so it needs more to keep a link busy.
  std::size_t upstream_window = 4096;
  std::size_t commit_batch = 4096;        ///< commit at once when this many wait
  std::chrono::microseconds commit_interval{2000};  ///< longest wait before a commit
  /// How long a message handed to $upstream may wait for its acknowledgement
  /// before it is committed, even while its sender waits (see "Write elision"
  /// above); 0 = as any message.
  std::chrono::microseconds upstream_hold{20000};
  int starvation_limit = 16;              ///< see "Priorities" above
  std::chrono::milliseconds retry_base{100};
  std::chrono::milliseconds retry_cap{30000};
  std::chrono::milliseconds expire_interval{10000};  ///< sweep of expired rows in idle lanes
  /// The routes in force until the first (set_routes): a node that runs no
  /// deployment yet (null = none: every message is dropped as no_route).
  route_table initial_routes;
};

/// Spawns the router.
caf::actor spawn_router(caf::actor_system& sys, router_config cfg);

}  // namespace canopy

CAF_ALLOW_UNSAFE_MESSAGE_TYPE(canopy::message)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(canopy::routed_message)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(std::vector<canopy::routed_message>)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(canopy::route_table)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(canopy::node_metrics)
