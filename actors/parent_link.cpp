#include "actors/parent_link.hpp"

#include "actors/reply_guard.hpp"
#include "gateway/link.hpp"
#include "runtime/atoms.hpp"
#include "runtime/router.hpp"
#include "runtime/send_later.hpp"

#include <caf/all.hpp>
#include <spdlog/spdlog.h>

#include <deque>
#include <optional>

namespace canopy {

link_metrics link_board::snapshot(std::int64_t now_ms) const {
  std::lock_guard<std::mutex> guard{mtx};
  auto m = parent;
  if (!m.up && down_since_ms > 0 && now_ms > down_since_ms)
    m.offline_ms_total += now_ms - down_since_ms;
  return m;
}

namespace {

/// One upload call in flight.
struct inflight_batch {
  std::uint64_t id = 0;
  std::uint64_t last_token = 0;  ///< the router's token of its last message
  std::size_t size = 0;
  bool done = false;
};

struct parent_link_state {
  parent_link_config cfg;
  std::optional<restart_tracker> backoff;
  std::uint64_t gen = 0;          ///< the current connection attempt
  bool up = false;
  bool connecting = false;
  bool waiting_resume = false;    ///< nacked: drop deliveries until (resume)
  bool flush_scheduled = false;
  bool reconnect_scheduled = false;
  std::deque<link_envelope> pending;  ///< received, not yet in an upload call
  std::deque<std::uint64_t> pending_tokens;
  std::deque<inflight_batch> inflight;
  std::uint64_t next_batch = 0;
  bool ping_outstanding = false;
  clock::time_point ping_sent{};
  caf::actor announced_to;        ///< the router we told we are $upstream

  static inline const char* name = "parent_link";
};

using link_actor = caf::stateful_actor<parent_link_state>;

caf::weak_actor_ptr weak_of(link_actor* self) {
  return caf::actor_cast<caf::weak_actor_ptr>(self->ctrl());
}

template <class... Ts>
void post_to(const caf::weak_actor_ptr& weak, Ts&&... xs) {
  if (auto a = caf::actor_cast<caf::actor>(weak.lock()))
    caf::anon_send(a, std::forward<Ts>(xs)...);
}

void update_board(link_actor* self, bool up, const std::string& error) {
  auto& st = self->state;
  const auto now = st.cfg.clk->wall_ms();
  std::lock_guard<std::mutex> guard{st.cfg.board->mtx};
  auto& m = st.cfg.board->parent;
  if (up && !m.up) {
    ++m.connects;
    if (st.cfg.board->down_since_ms > 0 && now > st.cfg.board->down_since_ms)
      m.offline_ms_total += now - st.cfg.board->down_since_ms;
    st.cfg.board->down_since_ms = 0;
    m.last_change_ms = now;
    m.last_error.clear();
  } else if (!up) {
    if (m.up) {
      ++m.disconnects;
      m.last_change_ms = now;
      st.cfg.board->down_since_ms = now;
    }
    if (!error.empty())
      m.last_error = error;
  }
  m.up = up;
}

/// Tells the router to take back what we hold; drops deliveries until (resume).
void give_back(link_actor* self) {
  auto& st = self->state;
  st.pending.clear();
  st.pending_tokens.clear();
  st.inflight.clear();
  // Not announced yet: no router was nacked, so no (resume) will come; the
  // router hands everything over again once we announce ourselves.
  if (st.waiting_resume || !st.announced_to)
    return;
  st.waiting_resume = true;
  self->send(st.announced_to, atoms::nack::value, std::string{upstream_endpoint});
}

void start_connect(link_actor* self) {
  auto& st = self->state;
  st.connecting = true;
  st.reconnect_scheduled = false;
  auto weak = weak_of(self);
  st.gen = st.cfg.link->connect([weak](link_event ev) {
    if (ev.up)
      post_to(weak, atoms::link_up::value, ev.generation, std::move(ev.parent_id));
    else
      post_to(weak, atoms::link_down::value, ev.generation, std::move(ev.error));
  });
}

void schedule_reconnect(link_actor* self) {
  auto& st = self->state;
  if (st.reconnect_scheduled)
    return;
  st.reconnect_scheduled = true;
  auto decision = st.backoff->on_exit(st.cfg.clk->now());
  if (decision.action == restart_decision::kind::restart_after) {
    spdlog::info("parent link: reconnecting to '{}' in {} ms", st.cfg.parent_id,
                 std::chrono::duration_cast<std::chrono::milliseconds>(decision.delay).count());
    send_later(self, *st.cfg.clk, decision.delay, atoms::connect::value);
  } else {
    self->send(self, atoms::connect::value);
  }
}

/// Sends upload calls while there are messages and credits.
void pump(link_actor* self) {
  auto& st = self->state;
  while (st.up && !st.pending.empty() && st.inflight.size() < st.cfg.max_inflight) {
    std::vector<link_envelope> batch;
    std::size_t bytes = 0;
    std::uint64_t last_token = 0;
    while (!st.pending.empty() && batch.size() < st.cfg.max_batch_messages) {
      auto size = st.pending.front().msg.encoded().size();
      if (!batch.empty() && bytes + size > st.cfg.max_batch_bytes)
        break;
      bytes += size;
      batch.push_back(std::move(st.pending.front()));
      last_token = st.pending_tokens.front();
      st.pending.pop_front();
      st.pending_tokens.pop_front();
    }
    inflight_batch b;
    b.id = ++st.next_batch;
    b.last_token = last_token;
    b.size = batch.size();
    st.inflight.push_back(b);
    auto weak = weak_of(self);
    const auto gen = st.gen;
    const auto id = b.id;
    st.cfg.link->upload(gen, std::move(batch), [weak, gen, id](expected<std::uint32_t> r) {
      if (r)
        post_to(weak, atoms::uploaded::value, gen, id, true, std::uint64_t{*r}, std::string{});
      else
        post_to(weak, atoms::uploaded::value, gen, id, false, std::uint64_t{0}, r.err().message);
    });
  }
}

void send_ping(link_actor* self) {
  auto& st = self->state;
  st.ping_outstanding = true;
  st.ping_sent = st.cfg.clk->now();
  auto weak = weak_of(self);
  const auto gen = st.gen;
  st.cfg.link->ping(gen, [weak, gen](expected<std::chrono::microseconds> r) {
    if (r)
      post_to(weak, atoms::pong::value, gen, static_cast<std::int64_t>(r->count()), std::string{});
    else
      post_to(weak, atoms::pong::value, gen, std::int64_t{-1}, r.err().message);
  });
}

caf::behavior parent_link_impl(link_actor* self, parent_link_config cfg) {
  auto& st = self->state;
  st.cfg = std::move(cfg);
  auto seed = st.cfg.seed != 0 ? st.cfg.seed
                                : static_cast<std::uint64_t>(st.cfg.clk->now().time_since_epoch().count());
  st.backoff.emplace(st.cfg.reconnect, std::nullopt, seed);
  {
    std::lock_guard<std::mutex> guard{st.cfg.board->mtx};
    st.cfg.board->parent.peer = st.cfg.parent_id;
    st.cfg.board->parent.role = "parent";
    st.cfg.board->parent.up = false;
    if (st.cfg.board->down_since_ms == 0)
      st.cfg.board->down_since_ms = st.cfg.clk->wall_ms();
  }
  uplink* link = st.cfg.link;
  auto board = st.cfg.board;
  auto* clk = st.cfg.clk;
  // Whatever way it ends, the connection goes with it.
  self->attach_functor([link, board, clk] {
    link->close();
    std::lock_guard<std::mutex> guard{board->mtx};
    if (board->parent.up) {
      board->parent.up = false;
      ++board->parent.disconnects;
      board->parent.last_change_ms = clk->wall_ms();
      board->down_since_ms = clk->wall_ms();
    }
  });
  start_connect(self);
  return {
    [self](atoms::link_up, std::uint64_t gen, std::string& parent) {
      auto& st = self->state;
      if (gen != st.gen)
        return;
      st.connecting = false;
      st.up = true;
      st.ping_outstanding = false;
      st.backoff->record_start(st.cfg.clk->now());
      update_board(self, true, {});
      spdlog::info("parent link: connected to '{}'", parent);
      // (Re)announce: the router hands over the $upstream lanes from their
      // checkpoints, at once (no waiting out an earlier nack's backoff).
      st.announced_to = st.cfg.router();
      if (st.announced_to)
        self->send(st.announced_to, atoms::module_up::value, std::string{upstream_endpoint},
                   caf::actor{self});
      send_ping(self);  // a first round-trip time at once
      send_later(self, *st.cfg.clk, st.cfg.ping_interval, atoms::ping::value, gen);
      if (st.cfg.on_state)
        st.cfg.on_state(true);
    },
    [self](atoms::link_down, std::uint64_t gen, std::string& error) {
      auto& st = self->state;
      if (gen != st.gen)
        return;
      if (!st.cfg.identity_problem.empty())
        error += " (" + st.cfg.identity_problem + ")";
      const bool was_up = st.up;
      st.up = false;
      st.connecting = false;
      update_board(self, false, error);
      // The node stops its link client before its actors: that is no failure.
      const bool stopping = error.rfind("the link client is stopped", 0) == 0;
      if (stopping || error.rfind("closed", 0) == 0)
        spdlog::info("parent link: the connection to '{}' was closed", st.cfg.parent_id);
      else if (was_up)
        spdlog::warn("parent link: lost the connection to '{}': {}", st.cfg.parent_id, error);
      else
        spdlog::warn("parent link: cannot connect to '{}': {}", st.cfg.parent_id, error);
      if (!st.pending.empty() || !st.inflight.empty())
        give_back(self);
      if (!stopping)
        schedule_reconnect(self);
      if (was_up && st.cfg.on_state)
        st.cfg.on_state(false);
    },
    [self](atoms::connect) {
      auto& st = self->state;
      if (st.up || st.connecting)
        return;
      start_connect(self);
    },
    [self](atoms::route_msg, routed_message& rm, std::uint64_t token) {
      auto& st = self->state;
      if (st.waiting_resume)
        return;
      if (!st.up) {
        give_back(self);
        return;
      }
      st.pending.push_back(link_envelope{std::move(rm.msg), std::move(rm.device), std::move(rm.module),
                                         std::move(rm.output)});
      st.pending_tokens.push_back(token);
      if (st.pending.size() >= st.cfg.max_batch_messages) {
        pump(self);
      } else if (!st.flush_scheduled) {
        // Batch what is already in the mailbox: the marker comes after it.
        st.flush_scheduled = true;
        self->send(self, atoms::flush::value);
      }
    },
    [self](atoms::flush) {
      self->state.flush_scheduled = false;
      pump(self);
    },
    [self](atoms::resume) { self->state.waiting_resume = false; },
    [self](atoms::reported, std::vector<twin_update>& updates, reply_ptr<void>& done) {
      auto& st = self->state;
      if (!st.up) {
        (*done)(make_error(errc::unavailable, "the link to '" + st.cfg.parent_id + "' is down"));
        return;
      }
      st.cfg.link->report_twins(st.gen, std::move(updates), [done](expected<void> r) { (*done)(std::move(r)); });
    },
    [self](atoms::uploaded, std::uint64_t gen, std::uint64_t id, bool ok, std::uint64_t accepted,
           std::string& error) {
      auto& st = self->state;
      if (gen != st.gen)
        return;
      auto it = std::find_if(st.inflight.begin(), st.inflight.end(),
                             [id](const inflight_batch& b) { return b.id == id; });
      if (it == st.inflight.end())
        return;  // given back meanwhile
      if (!ok) {
        spdlog::warn("parent link: upload to '{}' failed: {}", st.cfg.parent_id, error);
        give_back(self);
        return;
      }
      if (accepted < it->size)
        spdlog::warn("parent link: '{}' refused {} of {} messages (see its log)", st.cfg.parent_id,
                     it->size - accepted, it->size);
      it->done = true;
      std::uint64_t ack = 0;
      while (!st.inflight.empty() && st.inflight.front().done) {
        ack = st.inflight.front().last_token;
        st.inflight.pop_front();
      }
      if (ack != 0 && st.announced_to)
        self->send(st.announced_to, atoms::delivered::value, std::string{upstream_endpoint}, ack);
      pump(self);
    },
    [self](atoms::ping, std::uint64_t gen) {
      auto& st = self->state;
      if (gen != st.gen || !st.up)
        return;  // this connection is gone: its ping chain ends
      if (st.ping_outstanding) {
        if (st.cfg.clk->now() - st.ping_sent >= st.cfg.ping_timeout) {
          spdlog::warn("parent link: '{}' did not answer a ping for {} ms; reconnecting", st.cfg.parent_id,
                       st.cfg.ping_timeout.count());
          st.cfg.link->close();
          return;
        }
      } else {
        send_ping(self);
      }
      send_later(self, *st.cfg.clk, st.cfg.ping_interval, atoms::ping::value, gen);
    },
    [self](atoms::pong, std::uint64_t gen, std::int64_t rtt_us, std::string& error) {
      auto& st = self->state;
      if (gen != st.gen)
        return;
      st.ping_outstanding = false;
      if (rtt_us < 0) {
        spdlog::debug("parent link: ping failed: {}", error);
        return;
      }
      std::lock_guard<std::mutex> guard{st.cfg.board->mtx};
      st.cfg.board->parent.rtt_us = rtt_us;
    },
  };
}

}  // namespace

caf::actor spawn_parent_link(caf::actor_system& sys, parent_link_config cfg) {
  return sys.spawn(parent_link_impl, std::move(cfg));
}

}  // namespace canopy
