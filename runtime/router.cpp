#include "runtime/router.hpp"

#include "runtime/atoms.hpp"

#include <caf/all.hpp>
#include <spdlog/spdlog.h>

#include <deque>
#include <unordered_map>

namespace canopy {

namespace {

struct module_endpoint {
  caf::actor instance;                                        ///< invalid while down
  std::deque<std::pair<std::string, message>> waiting;       ///< (input, message)
};

struct router_state {
  router_config cfg;
  route_table routes = std::make_shared<const std::vector<route>>();
  std::unordered_map<std::string, module_endpoint> modules;
  router_stats stats;
  static inline const char* name = "canopy.router";
};

caf::behavior router_impl(caf::stateful_actor<router_state>* self, router_config cfg) {
  self->state.cfg = std::move(cfg);
  self->set_down_handler([self](caf::down_msg& dm) {
    for (auto& [name, ep] : self->state.modules)
      if (ep.instance && ep.instance.address() == dm.source)
        ep.instance = caf::actor{};
  });
  auto deliver = [self](module_endpoint& ep, const std::string& input, const message& msg) {
    auto& st = self->state;
    if (ep.instance) {
      self->send(ep.instance, atoms::input::value, input, msg);
      ++st.stats.delivered;
      return;
    }
    if (ep.waiting.size() >= st.cfg.max_waiting) {
      ep.waiting.pop_front();
      ++st.stats.dropped_full;
      --st.stats.queued;
    }
    ep.waiting.emplace_back(input, msg);
    ++st.stats.queued;
  };
  return {
    [self, deliver](atoms::route_msg, routed_message& rm) {
      auto& st = self->state;
      ++st.stats.received;
      auto src = rm.source();
      bool matched = false;
      for (auto& r : *st.routes) {
        if (!r.matches(rm.msg, src))
          continue;
        matched = true;
        auto& sink = r.sink();
        if (sink.type == route_sink::kind::upstream) {
          ++st.stats.upstream;
          if (st.cfg.upstream)
            self->send(st.cfg.upstream, atoms::route_msg::value, rm);
        } else {
          deliver(st.modules[sink.module], sink.input, rm.msg);
        }
      }
      if (!matched)
        ++st.stats.no_route;
    },
    [self](atoms::set_routes, route_table& routes) {
      self->state.routes = std::move(routes);
    },
    [self](atoms::module_up, const std::string& name, caf::actor& instance) {
      auto& st = self->state;
      auto& ep = st.modules[name];
      self->monitor(instance);
      ep.instance = instance;
      // Deliver what waited, in order, before anything new (the mailbox is FIFO).
      while (!ep.waiting.empty()) {
        auto& [input, msg] = ep.waiting.front();
        self->send(ep.instance, atoms::input::value, input, msg);
        ++st.stats.delivered;
        --st.stats.queued;
        ep.waiting.pop_front();
      }
    },
    [self](atoms::stats) { return self->state.stats; },
  };
}

}  // namespace

caf::actor spawn_router(caf::actor_system& sys, router_config cfg) {
  return sys.spawn(router_impl, std::move(cfg));
}

}  // namespace canopy
