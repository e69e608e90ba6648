// The parent link actor (DESIGN.md: upstream/parent link): a child node's
// `$upstream`. It keeps one connection to the parent through an `uplink`
// (gateway/link.hpp's link_client in a node), reconnects with jittered
// exponential backoff on the injected clock, measures the round-trip time, and
// carries the router's $upstream deliveries up in batches.
//
// Protocol with the router (the same as the local telemetry store's, see
// runtime/router.hpp): it announces itself as (module_up, "$upstream", self)
// whenever the link comes up; it takes (route_msg, routed_message, token),
// uploads in batches with at most `max_inflight` calls outstanding, and
// acknowledges (delivered, "$upstream", token) cumulatively once the parent
// answered that everything up to `token` is durable there. If the link is down
// or an upload fails it sends (nack, "$upstream") and drops what it gets until
// the router's (resume): the router keeps the messages and hands them over
// again, in order, when the link is back.
//
// (reported, std::vector<twin_update>, reply_ptr<void>) sends reported
// properties up (the fleet actor's reports); answered once the parent took
// them, or with errc::unavailable while the link is down.
//
// Other messages (atoms in runtime/atoms.hpp), from the uplink's callbacks and
// the clock: (link_up, gen, parent), (link_down, gen, error), (uploaded, gen,
// batch, ok, error), (pong, gen, rtt_us | -1, error), (connect), (ping).
#pragma once

#include "runtime/clock.hpp"
#include "runtime/metrics.hpp"
#include "runtime/restart_tracker.hpp"

#include "gateway/link.hpp"  // twin_update

#include <caf/actor.hpp>
#include <caf/allowed_unsafe_message_type.hpp>
#include <caf/fwd.hpp>

#include <chrono>
#include <cstddef>
#include <functional>
#include <memory>
#include <mutex>
#include <string>

namespace canopy {

class uplink;

/// The link's state as `canopyctl metrics` and /metrics show it. Written by
/// the parent link actor, read by anyone; guarded by `mtx`.
struct link_board {
  mutable std::mutex mtx;
  link_metrics parent;  ///< role "parent"; peer = the configured parent id
  std::int64_t down_since_ms = 0;  ///< wall clock when it went (or started) down; 0 while up

  /// A copy of the parent link's figures, with offline time counted up to `now_ms`.
  link_metrics snapshot(std::int64_t now_ms) const;
};

struct parent_link_config {
  uplink* link = nullptr;                 ///< borrowed; outlives the actor
  std::function<caf::actor()> router;     ///< the router now (it may have restarted)
  clock* clk = nullptr;                   ///< backoff, pings; required
  std::shared_ptr<link_board> board;      ///< required
  std::string parent_id;                  ///< for logs and the board
  /// Why the parent will refuse our certificate (tls_config::problem()); "" if valid.
  std::string identity_problem;
  std::size_t max_batch_messages = 512;   ///< per upload call
  std::size_t max_batch_bytes = 1u << 20; ///< encoded bytes per upload call
  std::size_t max_inflight = 4;           ///< upload calls outstanding (credits)
  /// Reconnect delays: the first retry at once, then base, 2 base, ... cap, +/- jitter.
  backoff_policy reconnect{std::chrono::milliseconds{500}, std::chrono::seconds{30},
                           std::chrono::seconds{60}, 0.3};
  std::chrono::milliseconds ping_interval{5000};
  /// No answer to a ping for this long: the connection is closed (and retried).
  std::chrono::milliseconds ping_timeout{15000};
  std::uint64_t seed = 0;                 ///< jitter RNG seed (0: from the clock)
  /// Called on the actor's thread when the link goes up or down (for twin sync).
  std::function<void(bool up)> on_state;
};

/// Spawns the parent link; it connects at once.
caf::actor spawn_parent_link(caf::actor_system& sys, parent_link_config cfg);

}  // namespace canopy

CAF_ALLOW_UNSAFE_MESSAGE_TYPE(std::vector<canopy::twin_update>)
