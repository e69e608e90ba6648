#include "actors/fleet.hpp"

#include "actors/reply_guard.hpp"
#include "runtime/agent.hpp"  // method_reply, agent_memory
#include "runtime/manifest.hpp"
#include "runtime/send_later.hpp"
#include "runtime/atoms.hpp"
#include "runtime/registry.hpp"
#include "runtime/router.hpp"
#include "runtime/store_actor.hpp"
#include "runtime/target_condition.hpp"

#include <caf/all.hpp>
#include <spdlog/spdlog.h>

#include <algorithm>

#include <unordered_set>

namespace canopy {

namespace {

using scope_set = std::shared_ptr<const std::unordered_set<std::string>>;
using channel_ptr = std::shared_ptr<child_channel>;
using envelopes = std::vector<link_envelope>;
using device_records = std::vector<device_record>;
using twin_updates = std::vector<twin_update>;
/// Work the bridge hands to the fleet actor, run on its thread.
using fleet_task = std::function<void(caf::local_actor*)>;

}  // namespace
}  // namespace canopy

CAF_ALLOW_UNSAFE_MESSAGE_TYPE(canopy::reply_ptr<std::uint32_t>)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(canopy::reply_ptr<canopy::method_reply>)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(canopy::scope_set)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(canopy::channel_ptr)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(canopy::envelopes)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(canopy::device_records)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(canopy::fleet_task)

namespace canopy {

namespace {

// --- One connected child -------------------------------------------------------

struct child_link_state {
  std::string child;
  caf::weak_actor_ptr fleet;                          ///< told which devices sent (last seen)
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
  std::vector<routed_message> accepted;
  accepted.reserve(batch.size());
  std::uint64_t refused = 0;
  std::vector<std::string> senders;
  for (auto& env : batch) {
    if (std::find(senders.begin(), senders.end(), env.device) == senders.end())
      senders.push_back(env.device);
    if (st.scope->count(env.device) == 0) {
      ++refused;
      spdlog::warn("link: child '{}' sent a message as '{}', which is outside its subtree; refused",
                   st.child, env.device);
      continue;
    }
    accepted.push_back(routed_message{std::move(env.msg), std::move(env.device), std::move(env.module),
                                      std::move(env.output)});
  }
  if (refused > 0) {
    std::lock_guard<std::mutex> guard{st.board->mtx};
    st.board->refused_messages += refused;
  }
  if (auto fleet = caf::actor_cast<caf::actor>(st.fleet.lock()))
    self->send(fleet, atoms::tick::value, std::move(senders));
  if (accepted.empty()) {
    (*done)(std::uint32_t{0});
    return;
  }
  const auto count = static_cast<std::uint32_t>(accepted.size());
  // One request for the batch: answered once every message is durable here.
  self->request(router, caf::infinite, atoms::inject::value, std::move(accepted))
    .then([done, count](std::vector<std::uint64_t>&) { (*done)(count); },
          [done](caf::error& err) {
            (*done)(make_error(errc::unavailable, "not stored: " + caf::to_string(err)));
          });
}

caf::behavior child_link_impl(child_link_actor* self, std::string child, caf::weak_actor_ptr fleet,
                              std::function<caf::actor()> router, std::shared_ptr<children_board> board) {
  auto& st = self->state;
  st.child = std::move(child);
  st.fleet = std::move(fleet);
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

using twin_key = std::pair<std::string, std::string>;  ///< (device, module)

struct fleet_state {
  fleet_config cfg;
  std::map<std::string, connected_child> children;
  // Reported properties on their way up (not on the hub).
  bool uplink = false;
  bool report_inflight = false;
  std::map<twin_key, twin_update> up_pending;
  std::map<std::string, std::string> own_last;  ///< module -> our last reported document (text)
  std::int64_t last_version = 0;
  // The deployment this node applied (from its $edgeAgent desired twin).
  std::string applied_id;
  std::string applied_status;  ///< "" | applying | succeeded | failed
  std::string applied_detail;
  std::int64_t applied_version = 0;
  std::map<std::string, std::int64_t> seen;  ///< devices heard from since the last tick

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

/// A version for our own reported documents: increasing, and newer than any
/// we sent before a restart (wall-clock based).
std::int64_t next_version(fleet_actor* self) {
  auto& st = self->state;
  st.last_version = std::max(st.last_version + 1, st.cfg.clk->wall_ms());
  return st.last_version;
}

/// Is `device` the child or below it?
bool in_scope(fleet_actor* self, const std::string& child, const std::string& device) {
  auto r = self->state.cfg.registry->in_subtree(child, device);
  return r && *r;
}

/// This node's `$edgeAgent` reported properties, and each module's own.
std::vector<std::pair<std::string, nlohmann::json>> own_reported(fleet_actor* self) {
  auto& st = self->state;
  std::vector<std::pair<std::string, nlohmann::json>> out;
  nlohmann::json modules = nlohmann::json::object();
  if (st.cfg.memory) {
    std::lock_guard<std::mutex> guard{st.cfg.memory->mtx};
    for (auto& [name, row] : st.cfg.memory->rows)
      modules[name] = {{"type", row.type},
                       {"version", row.version},
                       {"runtimeStatus", row.status},
                       {"status", row.desired_status},
                       {"restartPolicy", row.restart_policy},
                       {"restartCount", row.restart_count},
                       {"lastStartTimeUtcMs", row.last_start_ms},
                       {"lastExitTimeUtcMs", row.last_exit_ms},
                       {"exitReason", row.last_exit_reason}};
    for (auto& [name, doc] : st.cfg.memory->reported)
      if (doc.is_object() && st.cfg.memory->rows.count(name) != 0)
        out.emplace_back(name, doc);
  }
  nlohmann::json children = nlohmann::json::object();
  {
    std::lock_guard<std::mutex> guard{st.cfg.board->mtx};
    for (auto& [id, l] : st.cfg.board->children)
      children[id] = {{"connected", l.up}, {"lastChangeMs", l.last_change_ms}};
  }
  // Leaf devices over MQTT: the first 256 by id (a twin document is at most
  // 32 KiB), and how many there are.
  std::size_t leaves = 0;
  if (st.cfg.leaf_devices) {
    auto ids = st.cfg.leaf_devices();
    leaves = ids.size();
    for (std::size_t i = 0; i < ids.size() && i < 256; ++i)
      children[ids[i]] = {{"connected", true}, {"protocol", "mqtt"}};
  }
  const bool failed = st.applied_status == "failed";
  nlohmann::json agent = {
    {"schemaVersion", "1.1"},
    {"deployment", {{"id", st.applied_id}, {"status", st.applied_status}, {"detail", st.applied_detail}}},
    {"lastDesiredVersion", st.applied_version},
    {"lastDesiredStatus", {{"code", failed ? 400 : 200}, {"description", st.applied_detail}}},
    {"modules", std::move(modules)},
    {"children", std::move(children)}};
  if (leaves > 0)
    agent["mqttDevicesConnected"] = leaves;
  out.emplace_back("$edgeAgent", std::move(agent));
  return out;
}

/// Sends queued reported properties to the parent (one call at a time).
void flush_up(fleet_actor* self) {
  auto& st = self->state;
  if (st.cfg.hub || !st.uplink || st.report_inflight || st.up_pending.empty())
    return;
  auto link = st.cfg.parent_link ? st.cfg.parent_link() : caf::actor{};
  if (!link)
    return;
  twin_updates batch;
  for (auto& [key, u] : st.up_pending) {
    batch.push_back(u);
    if (batch.size() >= 256)
      break;
  }
  st.report_inflight = true;
  auto weak = caf::actor_cast<caf::weak_actor_ptr>(self->ctrl());
  auto sent = std::make_shared<twin_updates>(batch);
  self->send(link, atoms::reported::value, std::move(batch), guard<void>([weak, sent](expected<void> r) {
               auto a = caf::actor_cast<caf::actor>(weak.lock());
               if (!a)
                 return;
               caf::anon_send(a, fleet_task{[sent, ok = r.ok(), why = r ? std::string{} : r.err().message](
                                              caf::local_actor* p) {
                 auto* self = static_cast<fleet_actor*>(p);
                 auto& st = self->state;
                 st.report_inflight = false;
                 if (!ok) {
                   spdlog::debug("fleet: reported properties not sent up yet: {}", why);
                   return;
                 }
                 for (auto& u : *sent) {
                   auto it = st.up_pending.find({u.device, u.module});
                   if (it != st.up_pending.end() && it->second.version == u.version)
                     st.up_pending.erase(it);
                 }
                 flush_up(self);
               }});
             }));
}

/// Compares our own reported state with what we reported last; stores and
/// queues what changed.
void report_own(fleet_actor* self) {
  auto& st = self->state;
  for (auto& [module, doc] : own_reported(self)) {
    auto text = doc.dump();
    auto& last = st.own_last[module];
    if (last == text)
      continue;
    last = text;
    const auto version = next_version(self);
    if (auto r = st.cfg.registry->set_reported_full(st.cfg.node_id, module, doc, version); !r)
      spdlog::warn("fleet: cannot keep the reported properties of '{}': {}", module, r.err().message);
    if (!st.cfg.hub)
      st.up_pending[{st.cfg.node_id, module}] = twin_update{st.cfg.node_id, module, std::move(text), version, true};
  }
}

/// The link to our parent came up: everything we know goes up again (what
/// changed while offline included).
void resync_up(fleet_actor* self) {
  auto& st = self->state;
  st.own_last.clear();
  report_own(self);
  auto below = st.cfg.registry->subtree(st.cfg.node_id);
  if (below)
    for (auto& d : *below)
      if (auto twins = st.cfg.registry->list_twins(d.id))
        for (auto& t : *twins)
          if (t.reported_version > 0)
            st.up_pending[{t.device, t.module}] = twin_update{t.device, t.module, t.reported.dump(), t.reported_version, true};
  flush_up(self);
}

/// The hub keeps what a gateway reports about its deployment.
void record_deployment_status(fleet_actor* self, const std::string& device, const nlohmann::json& agent) {
  auto& st = self->state;
  auto dep = agent.value("deployment", nlohmann::json::object());
  if (!dep.is_object())
    return;
  auto id = dep.value("id", std::string{});
  auto status = dep.value("status", std::string{});
  if (id.empty() || (status != "succeeded" && status != "failed"))
    return;
  if (!st.cfg.registry->get_deployment(id))
    return;  // deleted meanwhile
  deployment_status s;
  s.deployment = id;
  s.device = device;
  s.status = status;
  s.detail = dep.value("detail", std::string{});
  if (auto r = st.cfg.registry->set_status(s); !r)
    spdlog::warn("fleet: cannot record the status of deployment '{}' on '{}': {}", id, device, r.err().message);
}

/// Applies desired properties addressed to this node.
void apply_desired(fleet_actor* self, const std::string& module, const nlohmann::json& doc, std::int64_t version) {
  auto& st = self->state;
  if (module == "$edgeAgent") {
    auto dep = doc.value("deployment", nlohmann::json{});
    if (!dep.is_object() || !dep.contains("content"))
      return;
    auto id = dep.value("id", std::string{});
    if (id == st.applied_id && (st.applied_status == "succeeded" || st.applied_status == "applying")) {
      st.applied_version = version;
      return;
    }
    st.applied_id = id;
    st.applied_status = "applying";
    st.applied_detail.clear();
    st.applied_version = version;
    spdlog::info("fleet: applying deployment '{}' (desired version {})", id, version);
    auto weak = caf::actor_cast<caf::weak_actor_ptr>(self->ctrl());
    st.cfg.deploy(dep["content"].dump(), [weak, id](expected<void> r) {
      auto a = caf::actor_cast<caf::actor>(weak.lock());
      if (!a)
        return;
      caf::anon_send(a, fleet_task{[id, ok = r.ok(), why = r ? std::string{} : r.err().message](caf::local_actor* p) {
                       auto* self = static_cast<fleet_actor*>(p);
                       auto& st = self->state;
                       if (st.applied_id != id)
                         return;  // a newer one came meanwhile
                       st.applied_status = ok ? "succeeded" : "failed";
                       st.applied_detail = why;
                       if (ok)
                         spdlog::info("fleet: deployment '{}' applied", id);
                       else
                         spdlog::error("fleet: deployment '{}' failed: {}", id, why);
                       report_own(self);
                       flush_up(self);
                     }});
    });
    return;
  }
  if (module.empty())
    return;  // the node's own device twin: kept in the registry
  st.cfg.module_desired(module, doc, [module](expected<void> r) {
    if (!r)
      spdlog::warn("fleet: desired properties of module '{}' not applied: {}", module, r.err().message);
  });
}

/// Every desired twin of `child`'s subtree, for a child that (re)connected.
twin_updates desired_of_subtree(fleet_actor* self, const std::string& child) {
  auto& st = self->state;
  twin_updates out;
  std::vector<std::string> ids{child};
  if (auto below = st.cfg.registry->subtree(child))
    for (auto& d : *below)
      ids.push_back(d.id);
  for (auto& id : ids)
    if (auto twins = st.cfg.registry->list_twins(id))
      for (auto& t : *twins)
        if (t.desired_version > 0)
          out.push_back(twin_update{t.device, t.module, t.desired.dump(), t.desired_version, true});
  return out;
}

/// Hub: gives every gateway the deployment that now matches it best.
void reassign(fleet_actor* self);

/// Sends a desired-properties update one hop down towards its device.
void send_down(fleet_actor* self, twin_update u) {
  auto& st = self->state;
  auto next = st.cfg.registry->next_hop(st.cfg.node_id, u.device);
  if (!next || !*next)
    return;  // not below us (anymore): nothing to carry
  auto it = st.children.find(**next);
  if (it == st.children.end()) {
    // A leaf device of this node gets it over its MQTT session, if connected
    // (otherwise it reads its twin when it connects).
    if (**next == u.device && st.cfg.session_of)
      if (auto session = st.cfg.session_of(u.device, u.module))
        self->send(session, atoms::desired::value, std::move(u.json), u.version);
    return;  // offline: it gets the current twins when it connects
  }
  auto device = u.device;
  it->second.channel->desired({std::move(u)}, [device](expected<void> r) {
    if (!r)
      spdlog::warn("fleet: desired properties for '{}' were not taken: {}", device, r.err().message);
  });
}

void reassign(fleet_actor* self) {
  auto& st = self->state;
  if (!st.cfg.hub)
    return;
  auto assigned = st.cfg.registry->assignments();
  if (!assigned) {
    spdlog::error("fleet: cannot compute deployment assignments: {}", assigned.err().message);
    return;
  }
  for (auto& [gw, dep_id] : *assigned) {
    auto twin = st.cfg.registry->get_twin(gw, "$edgeAgent");
    if (!twin)
      continue;
    auto current = twin->desired.value("deployment", nlohmann::json::object());
    if (current.is_object() && current.value("id", std::string{}) == dep_id)
      continue;
    auto dep = st.cfg.registry->get_deployment(dep_id);
    if (!dep)
      continue;
    auto content = nlohmann::json::parse(dep->manifest_json, nullptr, false);
    if (content.is_discarded())
      continue;
    nlohmann::json desired = twin->desired;
    desired["deployment"] = {{"id", dep_id}, {"content", std::move(content)}};
    auto t = st.cfg.registry->set_desired(gw, "$edgeAgent", desired);
    if (!t) {
      spdlog::error("fleet: cannot assign deployment '{}' to '{}': {}", dep_id, gw, t.err().message);
      continue;
    }
    deployment_status s;
    s.deployment = dep_id;
    s.device = gw;
    s.status = "applied";
    (void)st.cfg.registry->set_status(s);
    spdlog::info("fleet: deployment '{}' assigned to '{}'", dep_id, gw);
    send_down(self, twin_update{gw, "$edgeAgent", desired.dump(), t->desired_version, true});
  }
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
    for (auto& [id, c] : self->state.children) {
      c.channel->close("the parent's fleet service stopped");
      caf::anon_send_exit(c.link, caf::exit_reason::user_shutdown);
    }
  });
  {
    // Continue from what this node reported last (its applied deployment),
    // and catch up with a desired deployment that came while it was down.
    auto& st = self->state;
    if (auto own = st.cfg.registry->get_twin(st.cfg.node_id, "$edgeAgent")) {
      auto dep = own->reported.value("deployment", nlohmann::json::object());
      if (dep.is_object()) {
        st.applied_id = dep.value("id", std::string{});
        st.applied_status = dep.value("status", std::string{});
        st.applied_detail = dep.value("detail", std::string{});
        if (st.applied_status == "applying")
          st.applied_status.clear();
      }
      st.applied_version = own->reported.value("lastDesiredVersion", std::int64_t{0});
      st.last_version = own->reported_version;
      if (!st.cfg.hub && own->desired_version > 0)
        apply_desired(self, "$edgeAgent", own->desired, own->desired_version);
    }
    st.uplink = st.cfg.uplink_up && st.cfg.uplink_up();
    if (st.uplink)
      resync_up(self);
    self->send(self, atoms::tick::value);
  }
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
      auto link = self->spawn(child_link_impl, child, caf::actor_cast<caf::weak_actor_ptr>(self->ctrl()),
                              st.cfg.router, st.cfg.board);
      self->monitor(link);
      auto& c = st.children[child];
      c.channel = std::move(channel);
      c.link = link;
      set_child_board(self, child, true, {});
      (void)st.cfg.registry->touch_last_seen(child, st.cfg.clk->wall_ms());
      spdlog::info("fleet: child '{}' connected", child);
      push_scope(self, child, c);
      if (auto desired = desired_of_subtree(self, child); !desired.empty())
        c.channel->desired(std::move(desired), [child](expected<void> r) {
          if (!r)
            spdlog::warn("fleet: '{}' did not take its desired properties: {}", child, r.err().message);
        });
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
    [self](atoms::reported, const std::string& child, twin_updates& updates, reply_ptr<void>& done) {
      auto& st = self->state;
      std::vector<nlohmann::json> docs;
      for (auto& u : updates) {
        if (!in_scope(self, child, u.device)) {
          spdlog::warn("link: child '{}' reported for '{}', which is outside its subtree; refused", child, u.device);
          (*done)(make_error(errc::invalid_argument,
                             "report: '" + u.device + "' is outside the subtree of '" + child + "'"));
          return;
        }
        auto doc = nlohmann::json::parse(u.json, nullptr, false);
        if (!doc.is_object() || !u.full) {
          (*done)(make_error(errc::invalid_argument, "report: the reported properties of '" + u.device + "/" +
                                                       u.module + "' are not a whole JSON object"));
          return;
        }
        docs.push_back(std::move(doc));
      }
      for (std::size_t i = 0; i < updates.size(); ++i) {
        auto& u = updates[i];
        auto r = st.cfg.registry->set_reported_full(u.device, u.module, docs[i], u.version);
        if (!r) {
          (*done)(std::move(r).err());
          return;
        }
        (void)st.cfg.registry->touch_last_seen(u.device, st.cfg.clk->wall_ms());
        if (st.cfg.hub) {
          if (u.module == "$edgeAgent")
            record_deployment_status(self, u.device, docs[i]);
        } else {
          st.up_pending[{u.device, u.module}] = std::move(u);
        }
      }
      (*done)(expected<void>{});
      flush_up(self);
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
    [self](atoms::desired, twin_updates& updates, reply_ptr<void>& done) {
      auto& st = self->state;
      std::vector<nlohmann::json> docs;
      for (auto& u : updates) {
        if (u.device != st.cfg.node_id && !in_scope(self, st.cfg.node_id, u.device)) {
          (*done)(make_error(errc::not_found, "desired: '" + u.device + "' is not in the subtree of '" +
                                                st.cfg.node_id + "'"));
          return;
        }
        auto doc = nlohmann::json::parse(u.json, nullptr, false);
        if (!doc.is_object() || !u.full) {
          (*done)(make_error(errc::invalid_argument, "desired: the properties of '" + u.device + "/" + u.module +
                                                       "' are not a whole JSON object"));
          return;
        }
        docs.push_back(std::move(doc));
      }
      for (std::size_t i = 0; i < updates.size(); ++i) {
        auto& u = updates[i];
        auto r = st.cfg.registry->set_desired_full(u.device, u.module, docs[i], u.version);
        if (!r) {
          (*done)(std::move(r).err());
          return;
        }
        if (u.device == st.cfg.node_id)
          apply_desired(self, u.module, docs[i], r->desired_version);
        else
          send_down(self, std::move(u));
      }
      (*done)(expected<void>{});
    },
    [self](atoms::uplink, bool up) {
      auto& st = self->state;
      st.uplink = up;
      st.report_inflight = false;
      if (up)
        resync_up(self);
    },
    [self](atoms::tick, std::vector<std::string>& senders) {
      auto& st = self->state;
      const auto now = st.cfg.clk->wall_ms();
      for (auto& d : senders)
        st.seen[d] = now;
    },
    [self](atoms::tick) {
      auto& st = self->state;
      for (auto& [device, ms] : st.seen)
        (void)st.cfg.registry->touch_last_seen(device, ms);  // devices outside the registry: ignored
      st.seen.clear();
      report_own(self);
      flush_up(self);
      send_later(self, *st.cfg.clk, st.cfg.report_interval, atoms::tick::value);
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
      if (it == st.children.end() && *hop == device) {
        // A leaf device (or its module) of this node, over MQTT.
        auto session = st.cfg.session_of ? st.cfg.session_of(device, module) : caf::actor{};
        if (!session) {
          (*done)(make_error(errc::not_found, "device '" + device + "' is not connected to '" + st.cfg.node_id +
                                                "'"));
          return;
        }
        self->request(session, std::chrono::milliseconds{timeout_ms} + std::chrono::seconds{1}, atoms::invoke::value,
                      module, method, payload, timeout_ms)
          .then([done](method_reply& r) { (*done)(std::move(r)); },
                [done, device](caf::error& err) {
                  if (err == caf::sec::request_timeout)
                    (*done)(make_error(errc::timeout, "method on '" + device + "' timed out"));
                  else
                    (*done)(make_error(errc::unavailable, "device '" + device + "': " + caf::to_string(err)));
                });
        return;
      }
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

/// A change of the registry, on the hub only: `op(registry)` makes it; if it
/// worked, `after(result)` follows it up (scopes, assignments) before the answer.
template <class T, class Op, class After>
void hub_change(fleet_actor* self, const reply_ptr<T>& g, const char* what, Op op, After after) {
  if (auto ok = hub_only(self, what); !ok)
    return (*g)(std::move(ok).err());
  expected<T> r = op(*self->state.cfg.registry);
  if (r)
    after(r);
  (*g)(std::move(r));
}

}  // namespace

void fleet_bridge::device_create(device_record rec, reply_fn<device_record> done) {
  run_task(*impl_, std::move(done), [rec = std::move(rec)](fleet_actor* self, auto& g) {
    hub_change(
      self, g, "device create", [&](fleet_registry& reg) { return reg.create_device(rec); },
      [self](const expected<device_record>& r) {
        spdlog::info("fleet: registered {} '{}' under '{}'", r->kind, r->id, r->parent);
        rescope_children(self);
        reassign(self);
      });
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
    hub_change(
      self, g, "device delete", [&](fleet_registry& reg) { return reg.delete_device(id); },
      [self, &id](const expected<void>&) {
        spdlog::info("fleet: deleted '{}' from the registry", id);
        rescope_children(self);
      });
  });
}

void fleet_bridge::device_set_tags(std::string id, nlohmann::json tags, reply_fn<device_record> done) {
  run_task(*impl_, std::move(done), [id = std::move(id), tags = std::move(tags)](fleet_actor* self, auto& g) {
    hub_change(
      self, g, "device tags", [&](fleet_registry& reg) { return reg.set_tags(id, tags); },
      [self](const expected<device_record>&) {
        rescope_children(self);
        reassign(self);
      });
  });
}

namespace {

/// A deployment with where it stands (hub), as Azure counts it: targeted =
/// the gateways its condition matches; applied = those it is the chosen
/// (highest-priority) deployment of; succeeded / failed = those of the applied
/// that reported so for it.
expected<deployment_summary> summarize(fleet_actor* self, deployment_record d,
                                       const std::map<std::string, std::string>& assigned,
                                       const std::vector<device_record>& devices) {
  auto& reg = *self->state.cfg.registry;
  deployment_summary out;
  if (auto cond = target_condition::compile(d.target_condition))
    for (auto& dev : devices)
      if (dev.kind == "gateway" && cond->matches(dev.id, dev.tags))
        out.targeted.push_back(dev.id);
  for (auto& [gw, id] : assigned)
    if (id == d.id)
      out.applied.push_back(gw);
  auto statuses = reg.statuses_of(d.id);
  if (!statuses)
    return std::move(statuses).err();
  for (auto& s : *statuses) {
    if (std::find(out.applied.begin(), out.applied.end(), s.device) == out.applied.end())
      continue;  // moved to another deployment since
    if (s.status == "succeeded")
      out.succeeded.push_back(s.device);
    else if (s.status == "failed")
      out.failed.push_back(s.device);
  }
  out.statuses = std::move(*statuses);
  out.deployment = std::move(d);
  return out;
}

}  // namespace

void fleet_bridge::deployment_create(deployment_record rec, reply_fn<deployment_record> done) {
  run_task(*impl_, std::move(done), [rec = std::move(rec)](fleet_actor* self, auto& g) {
    hub_change(
      self, g, "deployment create",
      [&](fleet_registry& reg) -> expected<deployment_record> {
        // The manifest is checked here as far as it can be without the
        // target's files: structure, modules, routes. Each gateway resolves
        // its libraries.
        manifest_options mo;
        mo.resolve_library = [](std::string_view lib, const std::string& dir) {
          return resolve_library_path(lib, dir);
        };
        mo.check_process_files = false;  // a process module's executable is on the device
        if (auto dep = parse_manifest(rec.manifest_json, mo); !dep)
          return make_error(dep.err().code, "content: " + dep.err().message);
        return reg.create_deployment(rec);
      },
      [self](const expected<deployment_record>& r) {
        spdlog::info("fleet: deployment '{}' created (target {}, priority {})", r->id, r->target_condition,
                     r->priority);
        reassign(self);
      });
  });
}

void fleet_bridge::deployment_list(reply_fn<std::vector<deployment_summary>> done) {
  run_task(*impl_, std::move(done), [](fleet_actor* self, auto& g) {
    auto& reg = *self->state.cfg.registry;
    auto deps = reg.list_deployments();
    if (!deps)
      return (*g)(std::move(deps).err());
    auto assigned = reg.assignments();
    if (!assigned)
      return (*g)(std::move(assigned).err());
    auto devices = reg.list_devices();
    if (!devices)
      return (*g)(std::move(devices).err());
    std::vector<deployment_summary> out;
    for (auto& d : *deps) {
      auto s = summarize(self, std::move(d), *assigned, *devices);
      if (!s)
        return (*g)(std::move(s).err());
      out.push_back(std::move(*s));
    }
    (*g)(std::move(out));
  });
}

void fleet_bridge::deployment_get(std::string id, reply_fn<deployment_summary> done) {
  run_task(*impl_, std::move(done), [id = std::move(id)](fleet_actor* self, auto& g) {
    auto& reg = *self->state.cfg.registry;
    auto d = reg.get_deployment(id);
    if (!d)
      return (*g)(std::move(d).err());
    auto assigned = reg.assignments();
    if (!assigned)
      return (*g)(std::move(assigned).err());
    auto devices = reg.list_devices();
    if (!devices)
      return (*g)(std::move(devices).err());
    (*g)(summarize(self, std::move(*d), *assigned, *devices));
  });
}

void fleet_bridge::deployment_delete(std::string id, reply_fn<void> done) {
  run_task(*impl_, std::move(done), [id = std::move(id)](fleet_actor* self, auto& g) {
    hub_change(
      self, g, "deployment delete", [&](fleet_registry& reg) { return reg.delete_deployment(id); },
      [self, &id](const expected<void>&) {
        spdlog::info("fleet: deployment '{}' deleted", id);
        reassign(self);
      });
  });
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
             hub_change(
               self, g, "twin patch", [&](fleet_registry& reg) { return reg.patch_desired(device, module, patch); },
               [self](const expected<twin_record>& r) {
                 send_down(self, twin_update{r->device, r->module, r->desired.dump(), r->desired_version, true});
               });
           });
}

namespace {

/// The modules a node reported in its `$edgeAgent` twin.
std::vector<module_row> reported_modules(const nlohmann::json& agent) {
  std::vector<module_row> out;
  auto modules = agent.value("modules", nlohmann::json::object());
  if (!modules.is_object())
    return out;
  for (auto& [name, m] : modules.items()) {
    if (!m.is_object())
      continue;
    module_row r;
    r.name = name;
    r.type = m.value("type", std::string{});
    r.version = m.value("version", std::string{});
    r.status = m.value("runtimeStatus", std::string{});
    r.desired_status = m.value("status", std::string{});
    r.restart_policy = m.value("restartPolicy", std::string{});
    r.restart_count = m.value("restartCount", 0);
    r.last_start_ms = m.value("lastStartTimeUtcMs", std::int64_t{0});
    r.last_exit_ms = m.value("lastExitTimeUtcMs", std::int64_t{0});
    r.last_exit_reason = m.value("exitReason", std::string{});
    out.push_back(std::move(r));
  }
  return out;
}

}  // namespace

void fleet_bridge::status(reply_fn<std::vector<fleet_node>> done) {
  run_task(*impl_, std::move(done), [](fleet_actor* self, auto& g) {
    auto& st = self->state;
    auto& reg = *st.cfg.registry;
    auto devices = reg.list_devices();
    if (!devices)
      return (*g)(std::move(devices).err());
    report_own(self);  // the hub's own modules as of now
    auto assigned = reg.assignments();
    std::map<std::string, nlohmann::json> agents;  // $edgeAgent reported, by node
    auto agent_of = [&](const std::string& id) -> const nlohmann::json& {
      auto it = agents.find(id);
      if (it == agents.end()) {
        auto t = reg.get_twin(id, "$edgeAgent");
        it = agents.emplace(id, t ? t->reported : nlohmann::json::object()).first;
      }
      return it->second;
    };
    std::vector<fleet_node> out;
    fleet_node root;
    root.device.id = st.cfg.node_id;
    root.device.kind = st.cfg.hub ? "hub" : "gateway";
    root.connected = true;
    root.last_seen_ms = st.cfg.clk->wall_ms();
    root.modules = reported_modules(agent_of(st.cfg.node_id));
    out.push_back(std::move(root));
    std::map<std::string, bool> direct;
    {
      std::lock_guard<std::mutex> lock{st.cfg.board->mtx};
      for (auto& [id, l] : st.cfg.board->children)
        direct[id] = l.up;
    }
    for (auto& d : *devices) {
      fleet_node n;
      n.device = d;
      n.last_seen_ms = d.last_seen_ms;
      if (auto it = direct.find(d.id); it != direct.end()) {
        n.connected = it->second;
      } else {
        // Deeper down: as its parent reported its link.
        auto children = agent_of(d.parent).value("children", nlohmann::json::object());
        if (children.is_object() && children.contains(d.id) && children[d.id].is_object())
          n.connected = children[d.id].value("connected", false);
      }
      if (d.kind == "gateway") {
        const auto& agent = agent_of(d.id);
        n.modules = reported_modules(agent);
        if (assigned)
          if (auto it = assigned->find(d.id); it != assigned->end())
            n.deployment = it->second;
        auto dep = agent.value("deployment", nlohmann::json::object());
        if (dep.is_object() && !n.deployment.empty() && dep.value("id", std::string{}) == n.deployment)
          n.deployment_status = dep.value("status", std::string{});
        else if (!n.deployment.empty())
          n.deployment_status = "applied";
      }
      out.push_back(std::move(n));
    }
    (*g)(std::move(out));
  });
}

void fleet_bridge::report_leaf(std::string device, std::string module, nlohmann::json patch,
                               reply_fn<std::int64_t> done) {
  run_task(*impl_, std::move(done),
           [device = std::move(device), module = std::move(module), patch = std::move(patch)](fleet_actor* self,
                                                                                              auto& g) {
             auto& st = self->state;
             auto r = st.cfg.registry->patch_reported(device, module, patch);
             if (!r)
               return (*g)(std::move(r).err());
             (void)st.cfg.registry->touch_last_seen(device, st.cfg.clk->wall_ms());
             const auto version = r->reported_version;
             if (!st.cfg.hub) {
               st.up_pending[{device, module}] = twin_update{device, module, r->reported.dump(), version, true};
               flush_up(self);
             }
             (*g)(version);
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
