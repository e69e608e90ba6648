#include "actors/fleet.hpp"

#include "runtime/agent.hpp"  // method_reply as a message type
#include "runtime/atoms.hpp"
#include "runtime/registry.hpp"
#include "runtime/router.hpp"
#include "runtime/store_actor.hpp"

#include <caf/all.hpp>
#include <spdlog/spdlog.h>

#include <algorithm>

#include <unordered_set>

namespace canopy {

namespace {

/// A reply that is given exactly once: by the actor that handles the call, or
/// — if that actor dies with the call in its mailbox or state — by the guard's
/// destructor, with errc::unavailable. Shared by messages; called by one
/// thread at a time.
template <class T>
class reply_guard {
 public:
  explicit reply_guard(reply_fn<T> fn) : fn_(std::move(fn)) {}
  ~reply_guard() {
    if (fn_)
      fn_(make_error(errc::unavailable, "the node's fleet service restarted; try again"));
  }
  reply_guard(const reply_guard&) = delete;
  reply_guard& operator=(const reply_guard&) = delete;

  void operator()(expected<T> r) {
    if (auto f = std::exchange(fn_, nullptr))
      f(std::move(r));
  }

 private:
  reply_fn<T> fn_;
};

template <class T>
using reply_ptr = std::shared_ptr<reply_guard<T>>;

template <class T>
reply_ptr<T> guard(reply_fn<T> fn) {
  return std::make_shared<reply_guard<T>>(std::move(fn));
}

using scope_set = std::shared_ptr<const std::unordered_set<std::string>>;
using channel_ptr = std::shared_ptr<child_channel>;
using envelopes = std::vector<link_envelope>;
using device_records = std::vector<device_record>;
using twin_updates = std::vector<twin_update>;
/// Work the bridge hands to the fleet actor, run on its thread.
using fleet_task = std::function<void(caf::local_actor*)>;

}  // namespace
}  // namespace canopy

CAF_ALLOW_UNSAFE_MESSAGE_TYPE(canopy::reply_ptr<void>)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(canopy::reply_ptr<std::uint32_t>)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(canopy::reply_ptr<canopy::method_reply>)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(canopy::scope_set)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(canopy::channel_ptr)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(canopy::envelopes)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(canopy::device_records)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(canopy::twin_updates)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(canopy::fleet_task)

namespace canopy {

namespace {

// --- One connected child -------------------------------------------------------

struct child_link_state {
  std::string child;
  std::function<caf::actor()> router;
  std::shared_ptr<children_board> board;
  scope_set scope;                                    ///< null until the fleet sends it
  std::vector<std::pair<envelopes, reply_ptr<std::uint32_t>>> early;  ///< uploads before the scope

  static inline const char* name = "child_link";
};

using child_link_actor = caf::stateful_actor<child_link_state>;

/// Checks each message against the child's scope, injects the rest, answers
/// once all of them are durable.
void take_upload(child_link_actor* self, envelopes& batch, const reply_ptr<std::uint32_t>& done) {
  auto& st = self->state;
  auto router = st.router();
  if (!router) {
    (*done)(make_error(errc::unavailable, "the router is restarting; try again"));
    return;
  }
  struct progress {
    std::uint32_t waiting = 0;
    std::uint32_t accepted = 0;
    bool failed = false;
  };
  auto p = std::make_shared<progress>();
  std::uint64_t refused = 0;
  for (auto& env : batch) {
    if (st.scope->count(env.device) == 0) {
      ++refused;
      spdlog::warn("link: child '{}' sent a message as '{}', which is outside its subtree; refused",
                   st.child, env.device);
      continue;
    }
    ++p->waiting;
    ++p->accepted;
  }
  if (refused > 0) {
    std::lock_guard<std::mutex> guard{st.board->mtx};
    st.board->refused_messages += refused;
  }
  if (p->waiting == 0) {
    (*done)(std::uint32_t{0});
    return;
  }
  for (auto& env : batch) {
    if (st.scope->count(env.device) == 0)
      continue;
    routed_message rm{std::move(env.msg), std::move(env.device), std::move(env.module), std::move(env.output)};
    self->request(router, caf::infinite, atoms::inject::value, std::move(rm))
      .then(
        [p, done](std::uint64_t) {
          if (--p->waiting == 0 && !p->failed)
            (*done)(p->accepted);
        },
        [p, done](caf::error& err) {
          if (p->failed)
            return;
          p->failed = true;
          auto text = caf::to_string(err);
          (*done)(make_error(errc::unavailable, "not stored: " + text));
        });
  }
}

caf::behavior child_link_impl(child_link_actor* self, std::string child, std::function<caf::actor()> router,
                              std::shared_ptr<children_board> board) {
  auto& st = self->state;
  st.child = std::move(child);
  st.router = std::move(router);
  st.board = std::move(board);
  return {
    [self](atoms::subscribe, scope_set& scope) {
      auto& st = self->state;
      st.scope = std::move(scope);
      auto early = std::move(st.early);
      st.early.clear();
      for (auto& [batch, done] : early)
        take_upload(self, batch, done);
    },
    [self](atoms::route_msg, envelopes& batch, reply_ptr<std::uint32_t>& done) {
      auto& st = self->state;
      if (!st.scope) {
        st.early.emplace_back(std::move(batch), std::move(done));
        return;
      }
      take_upload(self, batch, done);
    },
  };
}

// --- The fleet actor -----------------------------------------------------------

struct connected_child {
  channel_ptr channel;
  caf::actor link;
};

struct fleet_state {
  fleet_config cfg;
  std::map<std::string, connected_child> children;

  static inline const char* name = "fleet";
};

using fleet_actor = caf::stateful_actor<fleet_state>;

/// The child and its registered descendants.
scope_set scope_of(fleet_actor* self, const std::string& child) {
  auto set = std::make_shared<std::unordered_set<std::string>>();
  set->insert(child);
  if (auto sub = self->state.cfg.registry->subtree(child))
    for (auto& d : *sub)
      set->insert(d.id);
  return set;
}

/// Sends a child its scope: to its link actor (checks) and down the link (its cache).
void push_scope(fleet_actor* self, const std::string& child, connected_child& c) {
  self->send(c.link, atoms::subscribe::value, scope_of(self, child));
  auto entries = self->state.cfg.registry->export_subtree(child);
  if (!entries) {
    spdlog::error("fleet: cannot read the subtree of '{}': {}", child, entries.err().message);
    return;
  }
  c.channel->sync_scope(std::move(*entries), [child](expected<void> r) {
    if (!r)
      spdlog::warn("fleet: could not send '{}' its registry scope: {}", child, r.err().message);
  });
}

void set_child_board(fleet_actor* self, const std::string& child, bool up, const std::string& reason) {
  auto& st = self->state;
  const auto now = st.cfg.clk->wall_ms();
  std::lock_guard<std::mutex> guard{st.cfg.board->mtx};
  auto& m = st.cfg.board->children[child];
  m.peer = child;
  m.role = "child";
  if (up && !m.up)
    ++m.connects;
  if (!up && m.up)
    ++m.disconnects;
  if (up != m.up)
    m.last_change_ms = now;
  m.up = up;
  if (!reason.empty())
    m.last_error = reason;
}

expected<void> admission(fleet_actor* self, const std::string& child) {
  auto& st = self->state;
  auto dev = st.cfg.registry->get_device(child);
  if (!dev)
    return make_error(errc::not_found, "unknown device '" + child + "': it is not in the registry of '"
                                         + st.cfg.node_id + "'");
  if (dev->kind != "gateway")
    return make_error(errc::invalid_argument,
                      "'" + child + "' is registered as a leaf device, not a gateway: only gateways link");
  if (dev->parent != st.cfg.node_id)
    return make_error(errc::invalid_argument, "'" + child + "' is registered under '" + dev->parent
                                                + "', not under '" + st.cfg.node_id + "'");
  return {};
}

/// After a registry change: every connected child gets its scope again, and a
/// child that is no longer ours is disconnected.
void rescope_children(fleet_actor* self) {
  auto& st = self->state;
  for (auto it = st.children.begin(); it != st.children.end();) {
    if (auto ok = admission(self, it->first); !ok) {
      spdlog::warn("fleet: disconnecting '{}': {}", it->first, ok.err().message);
      it->second.channel->close(ok.err().message);
      self->send_exit(it->second.link, caf::exit_reason::user_shutdown);
      set_child_board(self, it->first, false, ok.err().message);
      it = st.children.erase(it);
      continue;
    }
    push_scope(self, it->first, it->second);
    ++it;
  }
}

/// Sends a desired-properties update one hop down towards its device.
void send_down(fleet_actor* self, twin_update u) {
  auto& st = self->state;
  auto next = st.cfg.registry->next_hop(st.cfg.node_id, u.device);
  if (!next || !*next)
    return;  // not below us (anymore): nothing to carry
  auto it = st.children.find(**next);
  if (it == st.children.end())
    return;  // offline: it gets the current twins when it connects
  auto device = u.device;
  it->second.channel->desired({std::move(u)}, [device](expected<void> r) {
    if (!r)
      spdlog::warn("fleet: desired properties for '{}' were not taken: {}", device, r.err().message);
  });
}

expected<void> hub_only(fleet_actor* self, const char* what) {
  if (self->state.cfg.hub)
    return {};
  return make_error(errc::invalid_argument, std::string{what} + ": only the hub changes the registry; '" +
                                              self->state.cfg.node_id + "' keeps a copy of its subtree");
}

caf::behavior fleet_impl(fleet_actor* self, fleet_config cfg) {
  self->state.cfg = std::move(cfg);
  // A child link that crashed: drop the connection, the child reconnects and
  // gets a fresh one (its unanswered uploads were answered "unavailable").
  self->set_down_handler([self](caf::down_msg& dm) {
    auto& st = self->state;
    for (auto it = st.children.begin(); it != st.children.end(); ++it)
      if (it->second.link.address() == dm.source) {
        if (dm.reason && dm.reason != caf::exit_reason::user_shutdown) {
          spdlog::error("fleet: the link actor of '{}' failed ({}); closing its connection", it->first,
                        caf::to_string(dm.reason));
          it->second.channel->close("internal error");
          set_child_board(self, it->first, false, "internal error");
          st.children.erase(it);
        }
        return;
      }
  });
  self->attach_functor([self] {
    for (auto& [id, c] : self->state.children)
      c.channel->close("the parent's fleet service stopped");
  });
  return {
    [self](fleet_task& task) { task(self); },
    [self](atoms::connect, const std::string& child, reply_ptr<void>& done) {
      (*done)(admission(self, child));
    },
    [self](atoms::link_up, channel_ptr& channel) {
      auto& st = self->state;
      const auto child = channel->child_id();
      if (auto ok = admission(self, child); !ok) {
        channel->close(ok.err().message);
        return;
      }
      if (auto old = st.children.find(child); old != st.children.end()) {
        old->second.channel->close("replaced by a new connection");
        self->send_exit(old->second.link, caf::exit_reason::user_shutdown);
        st.children.erase(old);
      }
      auto link = self->spawn(child_link_impl, child, st.cfg.router, st.cfg.board);
      self->monitor(link);
      auto& c = st.children[child];
      c.channel = std::move(channel);
      c.link = link;
      set_child_board(self, child, true, {});
      (void)st.cfg.registry->touch_last_seen(child, st.cfg.clk->wall_ms());
      spdlog::info("fleet: child '{}' connected", child);
      push_scope(self, child, c);
    },
    [self](atoms::link_down, const std::string& child, std::uint64_t channel_id, const std::string& reason) {
      auto& st = self->state;
      auto it = st.children.find(child);
      if (it == st.children.end() || it->second.channel->id() != channel_id)
        return;
      spdlog::info("fleet: child '{}' disconnected: {}", child, reason);
      self->send_exit(it->second.link, caf::exit_reason::user_shutdown);
      set_child_board(self, child, false, reason);
      (void)st.cfg.registry->touch_last_seen(child, st.cfg.clk->wall_ms());
      st.children.erase(it);
    },
    [self](atoms::route_msg, const std::string& child, std::uint64_t channel_id, envelopes& batch,
           reply_ptr<std::uint32_t>& done) {
      auto& st = self->state;
      auto it = st.children.find(child);
      if (it == st.children.end() || it->second.channel->id() != channel_id) {
        (*done)(make_error(errc::unavailable, "'" + child + "' is not connected"));
        return;
      }
      self->send(it->second.link, atoms::route_msg::value, std::move(batch), std::move(done));
    },
    [self](atoms::reported, const std::string& child, twin_updates&, reply_ptr<void>& done) {
      // TODO(issue 4): reported properties (twins and module statuses) travel up.
      (*done)(make_error(errc::unavailable, "reported properties from '" + child + "' are not relayed yet"));
    },
    [self](atoms::put, device_records& entries, reply_ptr<void>& done) {
      auto& st = self->state;
      if (st.cfg.hub) {
        (*done)(make_error(errc::invalid_argument, "the hub owns its registry; it takes no scope from a parent"));
        return;
      }
      auto r = st.cfg.registry->replace_scope(st.cfg.node_id, entries);
      if (!r) {
        (*done)(std::move(r).err());
        return;
      }
      spdlog::info("fleet: registry scope updated ({} entries)", entries.size());
      rescope_children(self);
      (*done)(expected<void>{});
    },
    [self](atoms::desired, twin_updates&, reply_ptr<void>& done) {
      // TODO(issue 4): desired properties and deployments from the parent.
      (*done)(make_error(errc::unavailable, "desired properties from the parent are not applied yet"));
    },
    [self](atoms::invoke, const std::string& device, const std::string& module, const std::string& method,
           const std::string& payload, std::uint32_t timeout_ms, reply_ptr<method_reply>& done) {
      auto& st = self->state;
      if (device == st.cfg.node_id) {
        auto agent = st.cfg.agent();
        if (!agent) {
          (*done)(make_error(errc::unavailable, "the agent of '" + device + "' is restarting; try again"));
          return;
        }
        self->request(agent, std::chrono::milliseconds{timeout_ms} + std::chrono::seconds{1},
                      atoms::invoke::value, module, method, payload, timeout_ms)
          .then([done](method_reply& r) { (*done)(std::move(r)); },
                [done, device, module](caf::error& err) {
                  if (err == caf::sec::request_timeout)
                    (*done)(make_error(errc::timeout, "method on '" + device + "/" + module + "' timed out"));
                  else
                    (*done)(make_error(errc::failed, caf::to_string(err)));
                });
        return;
      }
      auto next = st.cfg.registry->next_hop(st.cfg.node_id, device);
      if (!next) {
        (*done)(std::move(next).err());
        return;
      }
      auto& hop = *next;
      if (!hop) {
        (*done)(make_error(errc::not_found, "device '" + device + "' is not in the subtree of '"
                                              + st.cfg.node_id + "'"));
        return;
      }
      auto it = st.children.find(*hop);
      if (it == st.children.end()) {
        (*done)(make_error(errc::unavailable, "'" + *hop + "' (on the way to '" + device + "') is not connected"));
        return;
      }
      it->second.channel->invoke(device, module, method, payload, std::chrono::milliseconds{timeout_ms},
                                 [done](expected<method_reply> r) { (*done)(std::move(r)); });
    },
  };
}

}  // namespace

caf::actor spawn_fleet(caf::actor_system& sys, fleet_config cfg) {
  return sys.spawn(fleet_impl, std::move(cfg));
}

// --- The bridge ----------------------------------------------------------------

struct fleet_bridge::impl {
  caf::actor_system& sys;
  std::function<caf::actor()> fleet;

  template <class T, class... Ts>
  void tell(reply_fn<T> done, Ts&&... xs) {
    auto g = guard(std::move(done));
    auto a = fleet();
    if (!a) {
      (*g)(make_error(errc::unavailable, "the node's fleet service is starting; try again"));
      return;
    }
    caf::anon_send(a, std::forward<Ts>(xs)..., std::move(g));
  }
};

fleet_bridge::fleet_bridge(caf::actor_system& sys, std::function<caf::actor()> fleet)
    : impl_(std::make_unique<impl>(impl{sys, std::move(fleet)})) {}

fleet_bridge::~fleet_bridge() = default;

void fleet_bridge::admit(std::string child_id, reply_fn<void> done) {
  impl_->tell(std::move(done), atoms::connect::value, std::move(child_id));
}

void fleet_bridge::child_up(std::shared_ptr<child_channel> channel) {
  if (auto a = impl_->fleet())
    caf::anon_send(a, atoms::link_up::value, std::move(channel));
  else
    channel->close("the node's fleet service is starting; try again");
}

void fleet_bridge::child_down(std::string child_id, std::uint64_t channel_id, std::string reason) {
  if (auto a = impl_->fleet())
    caf::anon_send(a, atoms::link_down::value, std::move(child_id), channel_id, std::move(reason));
}

void fleet_bridge::upload(std::string child_id, std::uint64_t channel_id, std::vector<link_envelope> batch,
                          reply_fn<std::uint32_t> done) {
  impl_->tell(std::move(done), atoms::route_msg::value, std::move(child_id), channel_id, std::move(batch));
}

void fleet_bridge::report_twins(std::string child_id, std::uint64_t, std::vector<twin_update> updates,
                                reply_fn<void> done) {
  impl_->tell(std::move(done), atoms::reported::value, std::move(child_id), std::move(updates));
}

void fleet_bridge::sync_scope(std::vector<device_record> entries, reply_fn<void> done) {
  impl_->tell(std::move(done), atoms::put::value, std::move(entries));
}

void fleet_bridge::desired(std::vector<twin_update> updates, reply_fn<void> done) {
  impl_->tell(std::move(done), atoms::desired::value, std::move(updates));
}

void fleet_bridge::invoke(std::string device, std::string module, std::string method, std::string payload_json,
                          std::chrono::milliseconds timeout, reply_fn<method_reply> done) {
  impl_->tell(std::move(done), atoms::invoke::value, std::move(device), std::move(module), std::move(method),
              std::move(payload_json), static_cast<std::uint32_t>(timeout.count()));
}


// --- hub_control: each call runs as a task on the fleet actor --------------------

namespace {

template <class T, class F>
void run_task(fleet_bridge::impl& b, reply_fn<T> done, F f) {
  auto g = guard(std::move(done));
  auto a = b.fleet();
  if (!a) {
    (*g)(make_error(errc::unavailable, "the node's fleet service is starting; try again"));
    return;
  }
  caf::anon_send(a, fleet_task{[g, f = std::move(f)](caf::local_actor* p) mutable {
                   f(static_cast<fleet_actor*>(p), g);
                 }});
}

}  // namespace

void fleet_bridge::device_create(device_record rec, reply_fn<device_record> done) {
  run_task(*impl_, std::move(done), [rec = std::move(rec)](fleet_actor* self, auto& g) {
    if (auto ok = hub_only(self, "device create"); !ok)
      return (*g)(std::move(ok).err());
    auto r = self->state.cfg.registry->create_device(rec);
    if (r) {
      spdlog::info("fleet: registered {} '{}' under '{}'", r->kind, r->id, r->parent);
      rescope_children(self);
    }
    (*g)(std::move(r));
  });
}

void fleet_bridge::device_list(reply_fn<std::vector<device_record>> done) {
  run_task(*impl_, std::move(done),
           [](fleet_actor* self, auto& g) { (*g)(self->state.cfg.registry->list_devices()); });
}

void fleet_bridge::device_get(std::string id, reply_fn<device_record> done) {
  run_task(*impl_, std::move(done), [id = std::move(id)](fleet_actor* self, auto& g) {
    (*g)(self->state.cfg.registry->get_device(id));
  });
}

void fleet_bridge::device_delete(std::string id, reply_fn<void> done) {
  run_task(*impl_, std::move(done), [id = std::move(id)](fleet_actor* self, auto& g) {
    if (auto ok = hub_only(self, "device delete"); !ok)
      return (*g)(std::move(ok).err());
    auto r = self->state.cfg.registry->delete_device(id);
    if (r) {
      spdlog::info("fleet: deleted '{}' from the registry", id);
      rescope_children(self);
    }
    (*g)(std::move(r));
  });
}

void fleet_bridge::device_set_tags(std::string id, nlohmann::json tags, reply_fn<device_record> done) {
  run_task(*impl_, std::move(done), [id = std::move(id), tags = std::move(tags)](fleet_actor* self, auto& g) {
    if (auto ok = hub_only(self, "device tags"); !ok)
      return (*g)(std::move(ok).err());
    auto r = self->state.cfg.registry->set_tags(id, tags);
    if (r)
      rescope_children(self);
    (*g)(std::move(r));
  });
}

void fleet_bridge::deployment_create(deployment_record, reply_fn<deployment_record> done) {
  done(make_error(errc::unavailable, "deployments: not available on this node yet"));
}

void fleet_bridge::deployment_list(reply_fn<std::vector<deployment_summary>> done) {
  done(make_error(errc::unavailable, "deployments: not available on this node yet"));
}

void fleet_bridge::deployment_get(std::string, reply_fn<deployment_summary> done) {
  done(make_error(errc::unavailable, "deployments: not available on this node yet"));
}

void fleet_bridge::deployment_delete(std::string, reply_fn<void> done) {
  done(make_error(errc::unavailable, "deployments: not available on this node yet"));
}

void fleet_bridge::twin_get(std::string device, std::string module, reply_fn<twin_record> done) {
  run_task(*impl_, std::move(done), [device = std::move(device), module = std::move(module)](fleet_actor* self, auto& g) {
    (*g)(self->state.cfg.registry->get_twin(device, module));
  });
}

void fleet_bridge::twin_patch(std::string device, std::string module, nlohmann::json patch,
                              reply_fn<twin_record> done) {
  run_task(*impl_, std::move(done),
           [device = std::move(device), module = std::move(module), patch = std::move(patch)](fleet_actor* self,
                                                                                              auto& g) {
             if (auto ok = hub_only(self, "twin patch"); !ok)
               return (*g)(std::move(ok).err());
             auto r = self->state.cfg.registry->patch_desired(device, module, patch);
             if (r) {
               twin_update u;
               u.device = device;
               u.module = module;
               u.json = patch.dump();
               u.version = r->desired_version;
               send_down(self, std::move(u));
             }
             (*g)(std::move(r));
           });
}

void fleet_bridge::status(reply_fn<std::vector<fleet_node>> done) {
  run_task(*impl_, std::move(done), [](fleet_actor* self, auto& g) {
    auto& st = self->state;
    auto devices = st.cfg.registry->list_devices();
    if (!devices)
      return (*g)(std::move(devices).err());
    std::vector<fleet_node> out;
    std::lock_guard<std::mutex> lock{st.cfg.board->mtx};
    for (auto& d : *devices) {
      fleet_node n;
      n.device = d;
      n.last_seen_ms = d.last_seen_ms;
      if (auto it = st.cfg.board->children.find(d.id); it != st.cfg.board->children.end())
        n.connected = it->second.up;
      out.push_back(std::move(n));
    }
    (*g)(std::move(out));
  });
}

void fleet_bridge::telemetry(std::string device, std::int64_t since_ms, std::int64_t after_seq, std::size_t limit,
                             reply_fn<std::vector<telemetry_record>> done) {
  run_task(*impl_, std::move(done), [=](fleet_actor* self, auto& g) {
    auto store = self->state.cfg.store ? self->state.cfg.store() : caf::actor{};
    if (!store)
      return (*g)(make_error(errc::unavailable, "the telemetry store is restarting; try again"));
    self->request(store, std::chrono::seconds{30}, atoms::query::value, device, since_ms, after_seq,
                  static_cast<std::uint64_t>(limit))
      .then(
        [g](std::vector<upstream_record>& rows) {
          std::vector<telemetry_record> out;
          out.reserve(rows.size());
          for (auto& r : rows)
            out.push_back(telemetry_record{r.seq, r.enqueued_ms, std::move(r.source_device),
                                           std::move(r.source_module), std::move(r.output), std::move(r.msg)});
          (*g)(std::move(out));
        },
        [g](caf::error& err) { (*g)(make_error(errc::store_error, caf::to_string(err))); });
  });
}

}  // namespace canopy
