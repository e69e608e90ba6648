#include "runtime/supervisor.hpp"

#include "runtime/atoms.hpp"

#include <caf/all.hpp>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <map>
#include <memory>
#include <unordered_map>

namespace canopy {

const char* to_string(child_state s) noexcept {
  switch (s) {
    case child_state::starting:
      return "starting";
    case child_state::running:
      return "running";
    case child_state::backoff:
      return "backoff";
    case child_state::failed:
      return "failed";
    case child_state::stopped:
      return "stopped";
    case child_state::unhealthy:
      return "unhealthy";
  }
  return "unknown";
}

const char* to_string(child_event_kind k) noexcept {
  switch (k) {
    case child_event_kind::started:
      return "started";
    case child_event_kind::exited:
      return "exited";
    case child_event_kind::restarting:
      return "restarting";
    case child_event_kind::failed:
      return "failed";
    case child_event_kind::unhealthy:
      return "unhealthy";
    case child_event_kind::stopped:
      return "stopped";
  }
  return "unknown";
}

namespace {

long long to_ms(clock::duration d) {
  return std::chrono::duration_cast<std::chrono::milliseconds>(d).count();
}

/// A reason as an operator reads it: the text our actors attach to their
/// errors ("handler threw: ..."), else CAF's rendering.
std::string describe(caf::actor_system& sys, const caf::error& reason) {
  if (reason && reason.context().match_elements<std::string>())
    return reason.context().get_as<std::string>(0);
  return sys.render(reason);
}

/// Normal exits (exit_reason::normal, user_shutdown) are not crashes.
bool is_abnormal(const caf::error& reason) {
  return reason && reason != caf::exit_reason::normal && reason != caf::exit_reason::user_shutdown;
}

/// One child: its spec, bookkeeping and current instance.
struct child_rec {
  // A child's own backoff (child_spec::backoff) wins over the supervisor's.
  child_rec(child_spec s, backoff_policy backoff, std::uint64_t seed)
    : spec(std::move(s)), tracker(spec.backoff.value_or(backoff), spec.own_limit, seed) {}

  child_spec spec;
  restart_tracker tracker;
  caf::actor instance;  ///< the current instance; invalid while down
  child_state state = child_state::stopped;
  int restart_count = 0;
  std::string last_exit_reason;
  std::uint64_t generation = 0;  ///< bumped on every start; stale timers check it
  bool want_stop = false;        ///< an orderly stop is wanted (group restart, removal, shutdown)
  bool stopping = false;         ///< the exit was sent; waiting for the down_msg
  bool remove_requested = false;
  std::uint64_t batch = 0;  ///< the restart batch this child waits in (0 = none)
  std::uint64_t ping_seq = 0;
  std::uint64_t pong_seq = 0;
  std::vector<std::uint64_t> timers;  ///< tokens of timers that belong to this instance
  std::vector<caf::response_promise> remove_promises;
  std::vector<caf::response_promise> restart_promises;
};

/// Children that wait to be (re)started together once all of them are down
/// and `due` has passed.
struct restart_batch {
  clock::time_point due;
  std::uint64_t timer = 0;  ///< token, 0 = none
};

enum class sup_mode { running, escalating, shutting_down };

/// The supervisor's logic. Owned by shared_ptr from the actor's handlers and
/// from the attach_functor that runs when the actor terminates (after the
/// handlers are gone), so it outlives every handler call. All members except
/// on_terminated() run inside the actor.
class supervisor_core {
 public:
  supervisor_core(caf::event_based_actor* self, supervisor_config cfg)
    : self_(self),
      cfg_(std::move(cfg)),
      clk_(cfg_.clk),
      intensity_(cfg_.intensity),
      seed_(cfg_.jitter_seed != 0
              ? cfg_.jitter_seed
              : static_cast<std::uint64_t>(clk_->now().time_since_epoch().count())),
      weak_self_(self->ctrl()) {}

  supervisor_core(const supervisor_core&) = delete;
  supervisor_core& operator=(const supervisor_core&) = delete;

  ~supervisor_core() { cancel_all_timers(); }

  void start_initial() {
    auto specs = std::move(cfg_.children);
    cfg_.children.clear();
    for (auto& spec : specs)
      if (!add_child(std::move(spec)))
        spdlog::warn("supervisor '{}': duplicate child id ignored", cfg_.name);
  }

  // -- protocol ---------------------------------------------------------------

  bool add_child(child_spec spec) {
    if (mode_ != sup_mode::running || find(spec.id) != nullptr)
      return false;
    children_.push_back(
      std::make_unique<child_rec>(std::move(spec), cfg_.backoff, mix_seed(seed_, next_seed_index_++)));
    auto& c = *children_.back();
    c.state = child_state::starting;
    start(c);
    pump();
    return true;
  }

  caf::result<bool> remove_child(const std::string& id) {
    auto* c = find(id);
    if (c == nullptr)
      return false;
    auto rp = self_->make_response_promise();
    c->remove_requested = true;
    c->remove_promises.push_back(rp);
    if (c->instance) {
      c->batch = 0;
      c->want_stop = true;
      pump();
    } else {
      erase_child(*c);
      pump();
    }
    return rp;
  }

  caf::result<bool> restart_child(const std::string& id) {
    auto* c = find(id);
    if (c == nullptr || c->remove_requested || mode_ != sup_mode::running)
      return false;
    auto rp = self_->make_response_promise();
    c->restart_promises.push_back(rp);
    c->tracker.reset();
    auto now = clk_->now();
    if (c->batch != 0) {
      // Already waiting to restart (backoff or a group restart): make it now.
      auto& b = batches_[c->batch];
      b.due = now;
      cancel_timer(b.timer);
      b.timer = 0;
    } else {
      auto id_b = next_batch_++;
      batches_[id_b] = restart_batch{now, 0};
      c->batch = id_b;
    }
    if (c->instance)
      c->want_stop = true;
    c->state = child_state::starting;
    ++c->restart_count;
    spdlog::info("supervisor '{}': restarting child '{}' on request", cfg_.name, c->spec.id);
    emit(*c, child_event_kind::restarting);
    pump();
    return rp;
  }

  std::vector<child_info> which_children() const {
    std::vector<child_info> result;
    result.reserve(children_.size());
    for (auto& c : children_)
      result.push_back(child_info{c->spec.id, c->state, c->restart_count, c->last_exit_reason});
    return result;
  }

  // -- system messages --------------------------------------------------------

  void on_down(const caf::down_msg& dm) {
    auto* c = find_instance(dm.source);
    if (c == nullptr)
      return;  // an instance that is no longer current (replaced or killed)
    instance_gone(*c, describe(self_->system(), dm.reason), is_abnormal(dm.reason));
  }

  void on_exit_msg(const caf::exit_msg& em) {
    if (!em.reason || em.reason == caf::exit_reason::normal)
      return;
    if (mode_ != sup_mode::running)
      return;
    spdlog::info("supervisor '{}': shutting down ({})", cfg_.name, self_->system().render(em.reason));
    mode_ = sup_mode::shutting_down;
    exit_reason_ = em.reason;
    stop_all();
  }

  void on_tick(std::uint64_t token) {
    auto i = timers_.find(token);
    if (i == timers_.end())
      return;
    auto fn = std::move(i->second.fn);
    timers_.erase(i);
    fn();
  }

  void on_pong(std::uint64_t seq) {
    auto sender = self_->current_sender();
    if (!sender)
      return;
    auto* c = find_instance(caf::actor_cast<caf::actor_addr>(sender));
    if (c == nullptr || seq <= c->pong_seq)
      return;
    c->pong_seq = seq;
    if (c->state == child_state::unhealthy) {
      spdlog::info("supervisor '{}': child '{}' is healthy again", cfg_.name, c->spec.id);
      c->state = child_state::running;
      emit(*c, child_event_kind::started, c->instance);
    }
  }

  /// Runs once the actor has terminated (attach_functor): no handler runs any
  /// more, so touching the members from this thread is safe.
  void on_terminated() {
    for (auto& c : children_)
      if (c->instance)
        caf::anon_send_exit(c->instance, caf::exit_reason::user_shutdown);
    // Promises still open are dropped: the actor cannot answer any more, and
    // its requesters see their request fail.
    children_.clear();
    batches_.clear();
    cfg_.observer = nullptr;
    cancel_all_timers();
  }

 private:
  // -- lookup -----------------------------------------------------------------

  child_rec* find(const std::string& id) {
    for (auto& c : children_)
      if (c->spec.id == id)
        return c.get();
    return nullptr;
  }

  child_rec* find_instance(const caf::actor_addr& addr) {
    if (!addr)
      return nullptr;
    for (auto& c : children_)
      if (c->instance && c->instance.address() == addr)
        return c.get();
    return nullptr;
  }

  std::size_t index_of(const child_rec& c) const {
    for (std::size_t i = 0; i < children_.size(); ++i)
      if (children_[i].get() == &c)
        return i;
    return children_.size();
  }

  // -- timers -----------------------------------------------------------------

  struct pending_timer {
    clock::timer_id id = 0;
    std::function<void()> fn;
  };

  /// Runs `fn` inside the actor after `delay`: the clock callback only sends
  /// (tick, token) to this actor, and only while it is still alive.
  std::uint64_t schedule(clock::duration delay, std::function<void()> fn) {
    auto token = next_token_++;
    auto weak = weak_self_;
    auto id = clk_->call_after(delay, [weak, token] {
      if (auto strong = caf::actor_cast<caf::strong_actor_ptr>(weak))
        caf::anon_send(caf::actor_cast<caf::actor>(strong), atoms::tick::value, token);
    });
    timers_.emplace(token, pending_timer{id, std::move(fn)});
    return token;
  }

  void cancel_timer(std::uint64_t token) {
    if (token == 0)
      return;
    auto i = timers_.find(token);
    if (i == timers_.end())
      return;
    clk_->cancel(i->second.id);
    timers_.erase(i);
  }

  void cancel_all_timers() {
    for (auto& [token, t] : timers_)
      clk_->cancel(t.id);
    timers_.clear();
  }

  void add_child_timer(child_rec& c, std::uint64_t token) {
    // Forget tokens that already ran, so the list stays short.
    c.timers.erase(std::remove_if(c.timers.begin(), c.timers.end(),
                                  [this](auto t) { return timers_.count(t) == 0; }),
                   c.timers.end());
    c.timers.push_back(token);
  }

  void cancel_child_timers(child_rec& c) {
    for (auto t : c.timers)
      cancel_timer(t);
    c.timers.clear();
  }

  // -- events -----------------------------------------------------------------

  void emit(const child_rec& c, child_event_kind kind, caf::actor instance = {},
            std::string reason = {}, bool abnormal = false,
            clock::duration delay = clock::duration::zero()) {
    if (!cfg_.observer)
      return;
    child_event_info e;
    e.supervisor = cfg_.name;
    e.id = c.spec.id;
    e.kind = kind;
    e.instance = std::move(instance);
    e.reason = std::move(reason);
    e.abnormal = abnormal;
    e.delay = delay;
    e.restart_count = c.restart_count;
    self_->send(cfg_.observer, atoms::child_event::value, std::move(e));
  }

  // -- life cycle of one child ------------------------------------------------

  void start(child_rec& c) {
    ++c.generation;
    c.ping_seq = 0;
    c.pong_seq = 0;
    c.want_stop = false;
    c.stopping = false;
    caf::actor inst;
    std::string failure = "start returned no actor";
    try {
      inst = c.spec.start(self_->system());
    } catch (const std::exception& e) {
      failure = std::string{"start threw: "} + e.what();
    } catch (...) {
      failure = "start threw";
    }
    c.tracker.record_start(clk_->now());
    if (!inst) {
      spdlog::warn("supervisor '{}': child '{}' failed to start: {}", cfg_.name, c.spec.id, failure);
      c.last_exit_reason = failure;
      emit(c, child_event_kind::exited, {}, failure, true);
      for (auto& rp : c.restart_promises)
        rp.deliver(false);
      c.restart_promises.clear();
      if (mode_ == sup_mode::running)
        handle_crash(c, true);
      else
        c.state = child_state::stopped;
      return;
    }
    self_->monitor(inst);
    c.instance = inst;
    c.state = child_state::running;
    // Timers are armed before anyone hears of the instance, so an observer that
    // reacts to `started` by advancing a manual clock finds them scheduled.
    if (c.spec.health.period > clock::duration::zero())
      schedule_ping(c);
    emit(c, child_event_kind::started, inst);
    for (auto& rp : c.restart_promises)
      rp.deliver(true);
    c.restart_promises.clear();
  }

  /// The current instance of `c` is gone (down_msg, or given up on after a
  /// kill). Decides what comes next.
  void instance_gone(child_rec& c, std::string reason, bool abnormal) {
    auto inst = std::move(c.instance);
    c.instance = nullptr;
    cancel_child_timers(c);
    c.last_exit_reason = reason;
    auto expected = c.stopping || c.want_stop;
    c.stopping = false;
    c.want_stop = false;
    emit(c, child_event_kind::exited, std::move(inst), reason, abnormal);
    if (c.remove_requested) {
      erase_child(c);
      pump();
      return;
    }
    if (expected || mode_ != sup_mode::running) {
      // Stopped on purpose: it either waits in its restart batch or stays down.
      if (c.batch == 0) {
        c.state = child_state::stopped;
        emit(c, child_event_kind::stopped, {}, c.last_exit_reason);
      }
      pump();
      return;
    }
    if (abnormal)
      spdlog::warn("supervisor '{}': child '{}' crashed: {}", cfg_.name, c.spec.id, reason);
    handle_crash(c, abnormal);
  }

  /// An unexpected exit of `c` (its instance is already gone).
  void handle_crash(child_rec& c, bool abnormal) {
    auto restart = c.spec.restart == restart_type::permanent
                   || (c.spec.restart == restart_type::transient && abnormal);
    if (!restart) {
      c.state = child_state::stopped;
      spdlog::info("supervisor '{}': child '{}' exited ({}), not restarted", cfg_.name, c.spec.id,
                   c.last_exit_reason);
      emit(c, child_event_kind::stopped, {}, c.last_exit_reason);
      pump();
      return;
    }
    auto now = clk_->now();
    restart_decision decision;
    if (c.spec.own_limit) {
      decision = c.tracker.on_exit(now);
      if (decision.action == restart_decision::kind::give_up) {
        c.state = child_state::failed;
        spdlog::warn("supervisor '{}': child '{}' failed: more than {} restarts in {} ms; last exit: {}",
                     cfg_.name, c.spec.id, c.spec.own_limit->max_restarts,
                     to_ms(c.spec.own_limit->period), c.last_exit_reason);
        emit(c, child_event_kind::failed, {}, c.last_exit_reason, true);
        pump();
        return;
      }
    } else {
      if (!intensity_.record(now)) {
        escalate(c);
        return;
      }
      decision = c.tracker.on_exit(now);
    }
    // The children restarted together with `c`.
    std::vector<child_rec*> group;
    auto from = cfg_.strategy == supervision_strategy::rest_for_one ? index_of(c) : 0;
    for (auto i = from; i < children_.size(); ++i) {
      auto* s = children_[i].get();
      if (s == &c)
        group.push_back(s);
      else if (cfg_.strategy != supervision_strategy::one_for_one && !s->remove_requested
               && (s->instance || s->batch != 0 || s->state == child_state::starting))
        group.push_back(s);
    }
    // One batch for the group, merged with any batch a member already waits in.
    auto due = now + decision.delay;
    auto id = next_batch_++;
    for (auto* s : group) {
      if (s->batch != 0 && s->batch != id) {
        auto old = s->batch;
        auto i = batches_.find(old);
        if (i != batches_.end()) {
          due = std::max(due, i->second.due);
          cancel_timer(i->second.timer);
          batches_.erase(i);
        }
        for (auto& other : children_)
          if (other->batch == old)
            other->batch = id;
      }
      s->batch = id;
    }
    auto& b = batches_[id];
    b.due = due;
    auto delay = due - now;
    if (delay > clock::duration::zero())
      b.timer = schedule(delay, [this] { pump(); });
    for (auto& s : children_) {
      if (s->batch != id)
        continue;
      if (s->instance)
        s->want_stop = true;
      s->state = delay > clock::duration::zero() ? child_state::backoff : child_state::starting;
      ++s->restart_count;
      spdlog::info("supervisor '{}': restarting child '{}' in {} ms (restart #{}){}", cfg_.name,
                   s->spec.id, to_ms(delay), s->restart_count,
                   s.get() == &c ? "" : " with its crashed sibling");
      emit(*s, child_event_kind::restarting, {}, c.last_exit_reason, false, delay);
    }
    pump();
  }

  void escalate(child_rec& c) {
    spdlog::error("supervisor '{}': restart intensity exceeded ({} restarts in {} ms), last crash "
                  "of child '{}': {}; stopping all children and escalating",
                  cfg_.name, cfg_.intensity.max_restarts, to_ms(cfg_.intensity.period), c.spec.id,
                  c.last_exit_reason);
    mode_ = sup_mode::escalating;
    exit_reason_ = caf::make_error(caf::sec::runtime_error, "restart intensity exceeded");
    if (c.batch == 0 && !c.instance) {
      c.state = child_state::stopped;
      emit(c, child_event_kind::stopped, {}, c.last_exit_reason);
    }
    stop_all();
  }

  /// Escalation or shutdown: nothing restarts any more; stop every live child
  /// in reverse start order, then quit.
  void stop_all() {
    for (auto& [id, b] : batches_)
      cancel_timer(b.timer);
    batches_.clear();
    for (auto& c : children_) {
      for (auto& rp : c->restart_promises)
        rp.deliver(false);
      c->restart_promises.clear();
      if (c->instance) {
        c->want_stop = true;
        c->batch = 0;
      } else if (c->batch != 0 || c->state == child_state::starting
                 || c->state == child_state::backoff) {
        c->batch = 0;
        c->state = child_state::stopped;
        emit(*c, child_event_kind::stopped, {}, c->last_exit_reason);
      }
    }
    pump();
  }

  void erase_child(child_rec& c) {
    cancel_child_timers(c);
    if (c.instance) {
      // Only reached when the instance is already given up on.
      self_->demonitor(c.instance);
      c.instance = nullptr;
    }
    c.state = child_state::stopped;
    emit(c, child_event_kind::stopped, {}, c.last_exit_reason);
    for (auto& rp : c.remove_promises)
      rp.deliver(true);
    for (auto& rp : c.restart_promises)
      rp.deliver(false);
    auto i = std::find_if(children_.begin(), children_.end(), [&](auto& p) { return p.get() == &c; });
    if (i != children_.end())
      children_.erase(i);
  }

  void send_stop(child_rec& c) {
    c.stopping = true;
    auto id = c.spec.id;
    auto gen = c.generation;
    add_child_timer(c, schedule(c.spec.shutdown_timeout, [this, id, gen] {
      auto* c = find(id);
      if (c == nullptr || c->generation != gen || !c->stopping || !c->instance)
        return;
      spdlog::warn("supervisor '{}': child '{}' ignored the shutdown for {} ms; killing it",
                   cfg_.name, id, to_ms(c->spec.shutdown_timeout));
      // A handler that hangs cannot process even the kill; do not wait for it.
      self_->demonitor(c->instance);
      caf::anon_send_exit(c->instance, caf::exit_reason::kill);
      instance_gone(*c, "killed after shutdown timeout", false);
    }));
    // After arming the timer: whoever sees the exit can rely on it.
    self_->send_exit(c.instance, caf::exit_reason::user_shutdown);
  }

  // -- health checks ----------------------------------------------------------

  void schedule_ping(child_rec& c) {
    auto id = c.spec.id;
    auto gen = c.generation;
    add_child_timer(c, schedule(c.spec.health.period, [this, id, gen] { ping(id, gen); }));
  }

  void ping(const std::string& id, std::uint64_t gen) {
    auto* c = find(id);
    if (c == nullptr || c->generation != gen || !c->instance || mode_ != sup_mode::running)
      return;
    auto seq = ++c->ping_seq;
    // The deadline is armed before the ping leaves, so whoever sees the ping
    // can rely on the deadline being scheduled.
    add_child_timer(*c, schedule(c->spec.health.deadline,
                                 [this, id, gen, seq] { health_deadline(id, gen, seq); }));
    // High priority: a healthy module with a long input backlog answers
    // before working through it, so a backlog is not mistaken for a hang.
    self_->send<caf::message_priority::high>(c->instance, atoms::health_ping::value, seq);
    schedule_ping(*c);
  }

  void health_deadline(const std::string& id, std::uint64_t gen, std::uint64_t seq) {
    auto* c = find(id);
    if (c == nullptr || c->generation != gen || !c->instance || c->pong_seq >= seq)
      return;
    if (mode_ != sup_mode::running || c->stopping || c->want_stop)
      return;
    auto stuck = c->instance;
    if (c->state != child_state::unhealthy) {
      spdlog::warn("supervisor '{}': child '{}' missed its health deadline ({} ms){}", cfg_.name,
                   id, to_ms(c->spec.health.deadline),
                   c->spec.restart_when_unhealthy ? "; replacing it" : "");
      emit(*c, child_event_kind::unhealthy, stuck, "no health_pong within deadline", true);
    }
    if (!c->spec.restart_when_unhealthy) {
      c->state = child_state::unhealthy;
      return;
    }
    // A hung handler keeps its worker thread; the kill lands whenever it
    // returns. The fresh instance does not wait for that.
    self_->demonitor(stuck);
    caf::anon_send_exit(stuck, caf::exit_reason::kill);
    c->stopping = false;
    c->want_stop = false;
    instance_gone(*c, "killed: missed health deadline", true);
  }

  // -- the stop/start engine --------------------------------------------------

  /// Advances orderly stops and due restarts until nothing more can happen now.
  /// Re-entrant calls (from a start that fails at once) are folded into the loop.
  void pump() {
    if (pumping_) {
      repump_ = true;
      return;
    }
    pumping_ = true;
    do {
      repump_ = false;
      pump_step();
    } while (repump_ && !quit_);
    pumping_ = false;
  }

  void pump_step() {
    if (quit_)
      return;
    // 1. Orderly stops: one at a time, in reverse start order.
    auto any_stopping = std::any_of(children_.begin(), children_.end(),
                                    [](auto& c) { return c->stopping; });
    if (!any_stopping) {
      for (auto i = children_.rbegin(); i != children_.rend(); ++i) {
        auto& c = **i;
        if (c.want_stop && c.instance) {
          send_stop(c);
          any_stopping = true;
          break;
        }
      }
    }
    // 2. Restart batches whose members are all down and whose time has come.
    if (mode_ == sup_mode::running) {
      auto now = clk_->now();
      for (auto bi = batches_.begin(); bi != batches_.end();) {
        auto id = bi->first;
        auto& b = bi->second;
        std::vector<child_rec*> members;
        for (auto& c : children_)
          if (c->batch == id)
            members.push_back(c.get());
        if (members.empty()) {
          cancel_timer(b.timer);
          bi = batches_.erase(bi);
          continue;
        }
        auto all_down = std::none_of(members.begin(), members.end(),
                                     [](auto* c) { return static_cast<bool>(c->instance); });
        if (!all_down || b.due > now) {
          ++bi;
          continue;
        }
        cancel_timer(b.timer);
        batches_.erase(bi);
        for (auto* c : members)
          c->batch = 0;
        // Start in start order; a start that fails may re-batch the rest.
        for (auto* c : members) {
          if (mode_ != sup_mode::running || c->batch != 0 || c->instance
              || std::find_if(children_.begin(), children_.end(),
                              [&](auto& p) { return p.get() == c; })
                   == children_.end())
            continue;
          start(*c);
        }
        repump_ = true;
        return;
      }
    }
    // 3. Escalation or shutdown completes once every child is down.
    if (mode_ != sup_mode::running && !any_stopping
        && std::none_of(children_.begin(), children_.end(),
                        [](auto& c) { return static_cast<bool>(c->instance); })) {
      quit_ = true;
      if (mode_ == sup_mode::escalating)
        spdlog::error("supervisor '{}': all children stopped; escalating", cfg_.name);
      self_->quit(exit_reason_);
    }
  }

  caf::event_based_actor* self_;
  supervisor_config cfg_;
  clock* clk_;
  intensity_window intensity_;
  std::uint64_t seed_;
  std::uint64_t next_seed_index_ = 0;
  caf::weak_actor_ptr weak_self_;
  std::vector<std::unique_ptr<child_rec>> children_;  ///< in start order
  std::map<std::uint64_t, restart_batch> batches_;
  std::uint64_t next_batch_ = 1;
  std::unordered_map<std::uint64_t, pending_timer> timers_;
  std::uint64_t next_token_ = 1;
  sup_mode mode_ = sup_mode::running;
  caf::error exit_reason_;
  bool pumping_ = false;
  bool repump_ = false;
  bool quit_ = false;
};

caf::behavior supervisor_actor(caf::event_based_actor* self, supervisor_config cfg) {
  auto core = std::make_shared<supervisor_core>(self, std::move(cfg));
  self->set_default_handler(caf::drop);
  self->set_down_handler([core](caf::down_msg& dm) { core->on_down(dm); });
  self->set_exit_handler([core](caf::exit_msg& em) { core->on_exit_msg(em); });
  // Runs after the handlers are gone, whatever ended the actor (even a kill).
  self->attach_functor([core] { core->on_terminated(); });
  core->start_initial();
  return {
    [core](atoms::add_child, child_spec& spec) { return core->add_child(std::move(spec)); },
    [core](atoms::remove_child, const std::string& id) { return core->remove_child(id); },
    [core](atoms::restart_child, const std::string& id) { return core->restart_child(id); },
    [core](atoms::which_children) { return core->which_children(); },
    [core](atoms::health_pong, std::uint64_t seq) { core->on_pong(seq); },
    [core](atoms::tick, std::uint64_t token) { core->on_tick(token); },
  };
}

}  // namespace

caf::actor spawn_supervisor(caf::actor_system& sys, supervisor_config cfg) {
  if (cfg.clk == nullptr) {
    spdlog::error("supervisor '{}': no clock configured", cfg.name);
    return {};
  }
  return sys.spawn(supervisor_actor, std::move(cfg));
}

}  // namespace canopy
