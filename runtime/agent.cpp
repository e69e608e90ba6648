#include "runtime/agent.hpp"

#include "runtime/atoms.hpp"
#include "runtime/route.hpp"
#include "runtime/router.hpp"

#include <caf/all.hpp>
#include <spdlog/spdlog.h>

#include <deque>

namespace canopy {

nlohmann::json agent_memory::desired_of(const std::string& module) {
  std::lock_guard<std::mutex> guard{mtx};
  if (current)
    if (auto* m = current->find(module))
      return m->desired_properties;
  return nlohmann::json::object();
}

nlohmann::json merge_patch_between(const nlohmann::json& from, const nlohmann::json& to) {
  if (!from.is_object() || !to.is_object())
    return to;
  auto patch = nlohmann::json::object();
  for (auto& [k, v] : from.items())
    if (!to.contains(k))
      patch[k] = nullptr;
  for (auto& [k, v] : to.items()) {
    if (!from.contains(k))
      patch[k] = v;
    else if (from[k] != v)
      patch[k] = merge_patch_between(from[k], v);
  }
  return patch;
}

child_spec module_child_spec(const module_spec& m) {
  child_spec c;
  c.id = m.name;
  switch (m.restart) {
    case restart_policy::never:
      c.restart = restart_type::temporary;
      break;
    case restart_policy::on_failure:
      c.restart = restart_type::transient;
      break;
    case restart_policy::on_unhealthy:
      c.restart = restart_type::transient;
      c.health = {m.health.period, m.health.deadline};
      break;
    case restart_policy::always:
      c.restart = restart_type::permanent;
      c.health = {m.health.period, m.health.deadline};
      break;
  }
  c.restart_when_unhealthy = true;
  c.own_limit = restart_intensity{m.limits.max_restarts, m.limits.within};
  c.backoff = backoff_policy{m.limits.backoff_base, m.limits.backoff_cap, m.limits.stable_period,
                             m.limits.jitter};
  return c;
}

namespace {

struct module_entry {
  module_row row;
  caf::actor instance;  ///< the live instance, if any
};

using step = std::function<void(std::function<void()> next)>;

struct agent_state {
  agent_config cfg;
  std::optional<deployment> current;
  std::map<std::string, module_entry> modules;
  std::map<std::string, nlohmann::json> reported;
  bool busy = false;  ///< a deployment is being applied
  std::deque<std::pair<deployment, caf::response_promise>> queue;
  static inline const char* name = "canopy.agent";
};

using agent_actor = caf::stateful_actor<agent_state>;

const char* status_name(desired_status s) { return s == desired_status::running ? "running" : "stopped"; }

void persist(agent_actor* self, const module_row& row) {
  {
    auto& mem = *self->state.cfg.memory;
    std::lock_guard<std::mutex> guard{mem.mtx};
    mem.rows[row.name] = row;
  }
  if (self->state.cfg.store)
    self->send(self->state.cfg.store, atoms::put::value, row);
}

module_row row_for(agent_actor* self, const module_spec& spec) {
  auto& st = self->state;
  module_row row;
  if (auto i = st.modules.find(spec.name); i != st.modules.end())
    row = i->second.row;
  row.name = spec.name;
  row.type = spec.type;
  row.version = spec.version;
  row.desired_status = status_name(spec.status);
  row.restart_policy = to_string(spec.restart);
  if (spec.status == desired_status::stopped)
    row.status = "stopped";
  return row;
}

void run_steps(std::shared_ptr<std::vector<step>> steps, std::size_t i, std::function<void()> done) {
  if (i == steps->size()) {
    done();
    return;
  }
  (*steps)[i]([steps, i, done] { run_steps(steps, i + 1, done); });
}

void apply_next(agent_actor* self);

// Applies `next` against the current deployment, then calls `done`.
void reconcile(agent_actor* self, deployment next, std::function<void(expected<void>)> done) {
  auto& st = self->state;
  const deployment empty;
  const deployment& prev = st.current ? *st.current : empty;
  // Build every child spec first: a module that cannot be loaded fails the
  // whole deployment before anything changes (never half-applied).
  std::map<std::string, child_spec> specs;
  for (auto& m : next.modules) {
    auto* old = prev.find(m.name);
    bool start = m.status == desired_status::running
                 && (old == nullptr || old->needs_restart_for(m) || !st.modules[m.name].instance);
    if (!start)
      continue;
    auto spec = st.cfg.make_child(m, caf::actor{self});
    if (!spec) {
      done(make_error(spec.err().code, "module '" + m.name + "': " + spec.err().message));
      return;
    }
    specs.emplace(m.name, std::move(*spec));
  }
  auto compiled = compile_routes(next.routes, next.store_ttl_secs);
  if (!compiled) {
    done(compiled.err());
    return;
  }
  auto table = std::move(*compiled);
  auto steps = std::make_shared<std::vector<step>>();
  auto modules = st.cfg.modules;
  // 1. Stop removed modules, and changed ones (they restart below).
  for (auto& m : prev.modules) {
    auto* now = next.find(m.name);
    bool removed = now == nullptr;
    bool restart = !removed && (specs.count(m.name) > 0 || now->status == desired_status::stopped);
    if (!removed && !restart)
      continue;
    std::string name = m.name;
    steps->push_back([self, modules, name, removed](std::function<void()> next_step) {
      self->request(modules, caf::infinite, atoms::remove_child::value, name)
        .then([self, name, removed, next_step](bool) {
          if (removed) {
            self->state.modules.erase(name);
            self->state.reported.erase(name);
            {
              auto& mem = *self->state.cfg.memory;
              std::lock_guard<std::mutex> guard{mem.mtx};
              mem.rows.erase(name);
              mem.reported.erase(name);
            }
            if (self->state.cfg.store)
              self->send(self->state.cfg.store, atoms::forget::value, name);
          }
          next_step();
        },
        [next_step](caf::error&) { next_step(); });
    });
  }
  // 2. New routes before new modules start sending.
  steps->push_back([self, table](std::function<void()> next_step) {
    self->send(self->state.cfg.router, atoms::set_routes::value, table);
    next_step();
  });
  // 3. Start added and changed modules, in startup order (next.modules is sorted).
  for (auto& m : next.modules) {
    auto row = row_for(self, m);
    st.modules[m.name].row = row;
    persist(self, row);
    auto i = specs.find(m.name);
    if (i == specs.end()) {
      // Unchanged and running: only desired properties may have changed.
      auto* old = prev.find(m.name);
      auto& inst = st.modules[m.name].instance;
      if (old != nullptr && inst && old->desired_properties != m.desired_properties)
        self->send(inst, atoms::desired::value,
                   merge_patch_between(old->desired_properties, m.desired_properties).dump(), false);
      continue;
    }
    auto spec = std::make_shared<child_spec>(std::move(i->second));
    steps->push_back([self, modules, spec](std::function<void()> next_step) {
      self->request(modules, caf::infinite, atoms::add_child::value, *spec)
        .then(
          [next_step, id = spec->id](bool ok) {
            if (!ok)
              spdlog::error("module '{}' could not be added to the modules supervisor", id);
            next_step();
          },
          [next_step, id = spec->id](caf::error& err) {
            spdlog::error("module '{}' could not be started: {}", id, caf::to_string(err));
            next_step();
          });
    });
  }
  auto persisted = next;
  {
    // Before any module starts: a (re)start reads its desired properties here.
    std::lock_guard<std::mutex> guard{st.cfg.memory->mtx};
    st.cfg.memory->current = next;
  }
  st.current = std::move(next);
  if (st.cfg.store)
    self->send(st.cfg.store, atoms::deploy::value, persisted);
  run_steps(steps, 0, [done] { done(expected<void>{}); });
}

void apply_next(agent_actor* self) {
  auto& st = self->state;
  if (st.busy || st.queue.empty() || !st.cfg.modules)
    return;
  st.busy = true;
  // Not a structured binding: clang 14 cannot capture one in a lambda.
  auto job = std::move(st.queue.front());
  st.queue.pop_front();
  auto& dep = job.first;
  auto rp = job.second;
  auto count = dep.modules.size();
  reconcile(self, std::move(dep), [self, rp, count](expected<void> res) mutable {
    if (res) {
      spdlog::info("deployment applied: {} module(s)", count);
      rp.deliver(caf::unit);
    } else {
      spdlog::error("deployment refused: {}", res.err().message);
      rp.deliver(caf::make_error(caf::sec::runtime_error, res.err().message));
    }
    self->state.busy = false;
    apply_next(self);
  });
}

void on_child_event(agent_actor* self, const child_event_info& ev) {
  auto& st = self->state;
  auto i = st.modules.find(ev.id);
  if (i == st.modules.end())
    return;
  auto& e = i->second;
  auto now = st.cfg.clk->wall_ms();
  switch (ev.kind) {
    case child_event_kind::started:
      e.instance = ev.instance;
      e.row.status = "running";
      e.row.last_start_ms = now;
      e.row.restart_count = ev.restart_count;
      break;
    case child_event_kind::exited:
      if (e.instance == ev.instance)
        e.instance = caf::actor{};
      e.row.last_exit_ms = now;
      e.row.last_exit_reason = ev.reason;
      e.row.status = ev.abnormal ? "backoff" : "stopped";
      break;
    case child_event_kind::restarting:
      e.row.restart_count = ev.restart_count;
      // The status says "running" only once `started` brings the new
      // instance: until then a call to the module finds none (503).
      if (ev.delay > clock::duration::zero()) {
        e.row.status = "backoff";
        spdlog::warn("module '{}' crashed ({}); restarting in {} ms (restart #{})", ev.id,
                     e.row.last_exit_reason,
                     std::chrono::duration_cast<std::chrono::milliseconds>(ev.delay).count(),
                     ev.restart_count);
      }
      break;
    case child_event_kind::failed:
      e.instance = caf::actor{};
      e.row.status = "failed";
      if (!ev.reason.empty())
        e.row.last_exit_reason = ev.reason;
      e.row.last_exit_ms = now;
      spdlog::error("module '{}' FAILED after {} restarts; last error: {}. It stays down until the "
                    "next deployment or `canopyctl restart {}`",
                    ev.id, ev.restart_count, e.row.last_exit_reason, ev.id);
      break;
    case child_event_kind::unhealthy:
      e.row.status = "unhealthy";
      spdlog::error("module '{}' is unhealthy: it did not answer its health check in time. A fresh "
                    "instance takes its place; the stuck handler keeps its worker thread blocked "
                    "(use a process module where isolation matters)",
                    ev.id);
      break;
    case child_event_kind::stopped:
      if (e.instance == ev.instance || !ev.instance)
        e.instance = caf::actor{};
      e.row.status = "stopped";
      e.row.last_exit_ms = now;
      break;
  }
  persist(self, e.row);
}

caf::behavior agent_impl(agent_actor* self, agent_config cfg) {
  auto& st = self->state;
  st.cfg = std::move(cfg);
  if (!st.cfg.memory)
    st.cfg.memory = std::make_shared<agent_memory>();
  {
    // Continue from what an earlier agent (or the store, at node start) knew.
    auto& mem = *st.cfg.memory;
    std::lock_guard<std::mutex> guard{mem.mtx};
    for (auto& [name, row] : mem.rows) {
      auto& e = st.modules[name];
      e.row = row;
      if (e.row.status != "failed")
        e.row.status = "stopped";
    }
    st.reported = mem.reported;
    if (!st.cfg.initial && mem.current)
      st.cfg.initial = *mem.current;
  }
  if (st.cfg.initial) {
    // Forget rows of modules the initial deployment does not have.
    for (auto i = st.modules.begin(); i != st.modules.end();)
      i = st.cfg.initial->find(i->first) ? std::next(i) : st.modules.erase(i);
    // Nobody waits for the initial deployment's answer.
    st.queue.emplace_back(std::move(*st.cfg.initial), caf::response_promise{});
    st.cfg.initial.reset();
    apply_next(self);
  }
  return {
    [self](atoms::deploy, deployment& d) -> caf::result<void> {
      auto rp = self->make_response_promise();
      self->state.queue.emplace_back(std::move(d), rp);
      apply_next(self);
      return rp;
    },
    [self](atoms::list) {
      std::vector<module_row> rows;
      auto& st = self->state;
      if (st.current)
        for (auto& m : st.current->modules)
          if (auto i = st.modules.find(m.name); i != st.modules.end())
            rows.push_back(i->second.row);
      return rows;
    },
    [self](atoms::restart, const std::string& name) -> caf::result<void> {
      auto& st = self->state;
      if (!st.current || !st.current->find(name))
        return caf::make_error(caf::sec::runtime_error, "no module '" + name + "' in the deployment");
      if (st.current->find(name)->status == desired_status::stopped)
        return caf::make_error(caf::sec::runtime_error,
                               "module '" + name + "' is stopped by the deployment (status: stopped)");
      auto rp = self->make_response_promise();
      spdlog::info("restarting module '{}' on request", name);
      self->request(st.cfg.modules, caf::infinite, atoms::restart_child::value, name)
        .then([rp, name](bool ok) mutable {
                if (ok)
                  rp.deliver(caf::unit);
                else
                  rp.deliver(caf::make_error(caf::sec::runtime_error,
                                             "module '" + name + "' cannot be restarted now (it is being "
                                             "stopped or the node is shutting down)"));
              },
              [rp](caf::error& err) mutable { rp.deliver(err); });
      return rp;
    },
    [self](atoms::invoke, const std::string& module, const std::string& method,
           const std::string& payload, std::uint32_t timeout_ms) -> caf::result<method_reply> {
      auto& st = self->state;
      auto i = st.modules.find(module);
      if (!st.current || !st.current->find(module) || i == st.modules.end())
        return method_reply{404, nlohmann::json{{"error", "no module '" + module + "'"}}.dump()};
      if (!i->second.instance)
        return method_reply{503, nlohmann::json{{"error", "module '" + module + "' is not running ("
                                                             + i->second.row.status + ")"}}
                                   .dump()};
      auto rp = self->make_response_promise<method_reply>();
      self->request(i->second.instance, std::chrono::milliseconds{timeout_ms}, atoms::method::value,
                    method, payload)
        .then(
          [rp](int status, std::string& body) mutable {
            rp.deliver(method_reply{status, std::move(body)});
          },
          [rp, module, method](caf::error& err) mutable {
            if (err == caf::sec::request_timeout)
              rp.deliver(method_reply{504, nlohmann::json{{"error", "method '" + method + "' of '" + module
                                                                      + "' timed out"}}
                                             .dump()});
            else
              rp.deliver(method_reply{500, nlohmann::json{{"error", caf::to_string(err)}}.dump()});
          });
      return rp;
    },
    [self](atoms::twin, const std::string& module) -> caf::result<twin_doc> {
      auto& st = self->state;
      const module_spec* spec = st.current ? st.current->find(module) : nullptr;
      if (spec == nullptr)
        return caf::make_error(caf::sec::runtime_error, "no module '" + module + "' in the deployment");
      auto rep = st.reported.count(module) ? st.reported[module] : nlohmann::json::object();
      return twin_doc{spec->desired_properties.dump(), rep.dump()};
    },
    [self](atoms::reported, const std::string& module, const std::string& patch) {
      auto p = nlohmann::json::parse(patch, nullptr, false);
      if (p.is_discarded())
        return;
      auto& doc = self->state.reported[module];
      if (doc.is_null())
        doc = nlohmann::json::object();
      doc.merge_patch(p);
      {
        auto& mem = *self->state.cfg.memory;
        std::lock_guard<std::mutex> guard{mem.mtx};
        mem.reported[module] = doc;
      }
      if (self->state.cfg.store)
        self->send(self->state.cfg.store, atoms::reported::value, module, doc.dump());
    },
    [self](atoms::child_event, const child_event_info& ev) { on_child_event(self, ev); },
    [self](atoms::modules_ready, caf::actor& modules) {
      auto& st = self->state;
      st.cfg.modules = std::move(modules);
      // A fresh modules supervisor has no children: run the whole deployment
      // in it again (the pending initial one, if any, is already queued).
      for (auto& [name, e] : st.modules)
        e.instance = caf::actor{};
      if (st.current) {
        // Run it again first; deployments already queued follow it.
        auto again = std::move(*st.current);
        st.current.reset();
        st.queue.emplace_front(std::move(again), caf::response_promise{});
      }
      apply_next(self);
    },
  };
}

}  // namespace

caf::actor spawn_agent(caf::actor_system& sys, agent_config cfg) {
  return sys.spawn(agent_impl, std::move(cfg));
}

}  // namespace canopy
