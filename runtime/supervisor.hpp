// Erlang/OTP supervision on CAF actors (DESIGN.md "One node, as a tree of actors").
//
// A supervisor is an actor that starts children from child_specs, monitors them
// and restarts them according to its strategy, each child's restart type, the
// restart intensity, and exponential backoff with jitter. Time (intensity
// windows, backoff delays, health-check deadlines) comes from an injected
// canopy::clock, so tests drive the schedule with manual_clock.
//
// Protocol (all atoms in runtime/atoms.hpp):
//   (add_child, child_spec)      -> bool     starts a child (appended last); false if the id exists
//   (remove_child, std::string)  -> bool     orderly stop (exit_reason::user_shutdown), forgets it;
//                                            replies once the child is down
//   (restart_child, std::string) -> bool     stops (if running) and starts again; clears `failed`
//   (which_children)             -> std::vector<child_info>
// Events to the observer actor (if any), as (child_event, child_event_info).
// Health checks: the supervisor sends (health_ping, uint64 seq) to the child; the
// child must answer by sending (health_pong, uint64 seq) back to the supervisor
// (the sender of the ping) within health.deadline — or simply return
// caf::make_message(health_pong, seq) from its ping handler, which CAF sends back.
// Escalation: past its intensity the supervisor stops all children and quits
// with error reason sec::runtime_error (message "restart intensity exceeded"):
// its own parent sees a non-normal exit and applies its strategy.
//
// Details of the behaviour (runtime/supervisor.cpp):
// - Abnormal = any exit reason other than exit_reason::normal / user_shutdown.
//   In CAF 0.17 a child whose handler throws ends with sec::runtime_error
//   (rendered "system_error(runtime_error)"), which is abnormal.
// - A child with own_limit counts its restarts only against that limit; others
//   count against the supervisor's intensity. One crash that restarts a group
//   (one_for_all / rest_for_one) counts once.
// - one_for_all / rest_for_one: the affected live siblings are stopped one at a
//   time in reverse start order (user_shutdown, shutdown_timeout, then kill);
//   once all are down and the crashed child's backoff delay has passed, all are
//   started again in start order. Every member's restart_count goes up by one.
//   Siblings that are `failed` or `stopped` are left alone; a child that gives
//   up (own_limit) does not take its siblings down.
// - Children that are not restarted (temporary; transient after a normal exit)
//   stay listed as `stopped` until remove_child, so their status stays visible;
//   restart_child starts them again.
// - restart_child replies true once the new instance runs (false if the child
//   is unknown, is being removed, or the supervisor is shutting down).
//   add_child replies false while the supervisor is shutting down.
// - An exit_msg sent to the supervisor (e.g. user_shutdown from its parent or
//   from main) stops all children in reverse start order, then the supervisor
//   quits with that reason. Whatever ends the supervisor (even exit_reason::kill),
//   its live children are sent user_shutdown.
// - Health: a missed deadline sends `unhealthy` once; with restart_when_unhealthy
//   the stuck instance is killed and treated as crashed at once (no waiting for
//   its down_msg); otherwise the child is `unhealthy` until it answers a later
//   ping, which sends `started` again with the same instance.
// - Every clock timer is armed before the event or message that announces it
//   leaves (`started` arms the first ping; a ping arms its deadline; `restarting`
//   arms the backoff; a stop arms the kill), so a test that reacts to these by
//   advancing a manual_clock never races the supervisor.
#pragma once

#include "runtime/clock.hpp"
#include "runtime/restart_tracker.hpp"  // restart_intensity, backoff_policy

#include <caf/actor.hpp>
#include <caf/allowed_unsafe_message_type.hpp>
#include <caf/fwd.hpp>

#include <chrono>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

namespace canopy {

/// Which children restart when one crashes: only it (one_for_one), all
/// (one_for_all), or it and those started after it (rest_for_one).
enum class supervision_strategy { one_for_one, one_for_all, rest_for_one };

/// OTP restart types: permanent always restarts, transient only after an
/// abnormal exit, temporary never.
enum class restart_type { permanent, transient, temporary };

/// Health checking of a child (period zero = off).
struct health_check {
  clock::duration period = clock::duration::zero();  ///< time between pings; zero = off
  clock::duration deadline = std::chrono::seconds{5};  ///< time for the pong to arrive
};

/// How to start and restart one child.
struct child_spec {
  std::string id;  ///< unique within its supervisor
  /// Spawns the child; called on the supervisor's thread for every (re)start.
  /// Returning an invalid actor counts as a crash at start.
  std::function<caf::actor(caf::actor_system&)> start;
  restart_type restart = restart_type::permanent;  ///< when to restart it
  /// The child's own budget. When set and exceeded, only this child is marked
  /// failed and stays down (no escalation) until restart_child or removal.
  /// When unset, the child's restarts count only against the supervisor's intensity.
  /// (When set, they count only against this limit, so such a child never escalates.)
  std::optional<restart_intensity> own_limit;
  health_check health;  ///< liveness pings (off by default)
  /// Restart on a missed health deadline (on-unhealthy, always). If false, a
  /// missed deadline is only reported.
  bool restart_when_unhealthy = true;
  /// This child's backoff; unset = the supervisor's (supervisor_config::backoff).
  std::optional<backoff_policy> backoff;
  /// How long an orderly stop (exit_reason::user_shutdown) may take before the
  /// supervisor kills the instance (exit_reason::kill), as OTP's `shutdown`.
  clock::duration shutdown_timeout = std::chrono::seconds{5};
};

/// Where a child is in its life cycle (see which_children).
enum class child_state { starting, running, backoff, failed, stopped, unhealthy };
/// Short name of a child_state ("running", ...), for logs and status reports.
const char* to_string(child_state s) noexcept;

/// A snapshot of one child, for which_children.
struct child_info {
  std::string id;
  child_state state = child_state::stopped;
  int restart_count = 0;          ///< restarts so far (crashes, group restarts, restart_child)
  std::string last_exit_reason;  ///< rendered CAF error of the last exit; empty if none yet
};

/// What happened to a child (see child_event_info).
enum class child_event_kind {
  started,     ///< a (new) instance runs, or an unhealthy one answers again; `instance` is it
  exited,      ///< an instance ended; `reason` says how, `abnormal` whether it crashed
  restarting,  ///< a restart is scheduled after `delay` (zero = immediate)
  failed,      ///< own_limit exhausted: stays down; `reason` is the last error
  unhealthy,   ///< missed a health deadline; `instance` is the stuck one
  stopped,     ///< stopped on purpose (remove_child, shutdown, not restarted)
};
/// Short name of a child_event_kind ("started", ...), for logs.
const char* to_string(child_event_kind k) noexcept;

/// One event sent to the observer as (child_event, child_event_info).
struct child_event_info {
  std::string supervisor;  ///< supervisor_config::name
  std::string id;          ///< child_spec::id
  child_event_kind kind = child_event_kind::started;
  caf::actor instance;  ///< started/exited/unhealthy: that instance (invalid if a start failed)
  std::string reason;   ///< exited/failed/stopped/restarting: the (last) exit reason, rendered
  bool abnormal = false;
  clock::duration delay = clock::duration::zero();  ///< restarting: time until the start
  int restart_count = 0;                            ///< restarts of this child so far
};

/// Everything a supervisor needs.
struct supervisor_config {
  std::string name;  ///< for logs and child_event_info::supervisor
  supervision_strategy strategy = supervision_strategy::one_for_one;
  restart_intensity intensity;  ///< past it: stop everything and escalate
  backoff_policy backoff;       ///< shared by all children (each has its own count)
  std::vector<child_spec> children;  ///< started in order
  clock* clk = nullptr;              ///< required; must outlive the supervisor
  caf::actor observer;               ///< receives (child_event, child_event_info); may be invalid
  std::uint64_t jitter_seed = 0;     ///< 0: seeded from the clock
};

/// Spawns a supervisor actor that starts `cfg.children` in order (before it
/// handles any message). Returns an invalid actor if cfg.clk is null.
/// Usable as a child_spec::start of another supervisor, to build a tree.
caf::actor spawn_supervisor(caf::actor_system& sys, supervisor_config cfg);

}  // namespace canopy

CAF_ALLOW_UNSAFE_MESSAGE_TYPE(canopy::child_spec)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(canopy::child_info)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(std::vector<canopy::child_info>)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(canopy::child_event_info)
