#include "actors/module_host.hpp"

#include "runtime/atoms.hpp"
#include "runtime/router.hpp"

#include <caf/all.hpp>

#include <chrono>
#include <functional>

namespace canopy {

namespace {

struct host_timer {
  std::chrono::milliseconds interval;
  bool repeat = false;
  std::function<void()> fn;
};

class host_context;

// Member order matters: destruction runs bottom-up, so the timers' and methods'
// closures (code from the module's library) and the instance go before `cfg`,
// whose module_type keeps the library loaded.
struct host_state {
  module_host_config cfg;
  module_ptr instance;
  std::unique_ptr<host_context> ctx;
  std::map<std::string, method_handler> methods;
  std::map<timer_handle, host_timer> timers;
  timer_handle next_timer = 1;
  bool started = false;
  std::uint64_t processed_token = 0;  ///< last input whose on_message returned
  std::uint64_t acked_token = 0;      ///< last one acknowledged to the router
  std::size_t unacked = 0;            ///< inputs processed since the last acknowledgement
  std::uint64_t sent = 0;             ///< messages sent to the router by this instance
  bool ack_scheduled = false;
  static inline const char* name = "canopy.module";
};

using host_actor = caf::stateful_actor<host_state>;

std::string crash_text(const std::string& where, std::exception_ptr eptr) {
  std::string what = "unknown exception";
  try {
    std::rethrow_exception(eptr);
  } catch (const std::exception& e) {
    what = e.what();
  } catch (...) {
  }
  return where + " threw: " + what;
}

class host_context final : public module_context {
 public:
  explicit host_context(host_actor* self) : self_(self) {}

  const std::string& module_id() const override { return self_->state.cfg.name; }
  const std::string& device_id() const override { return self_->state.cfg.device_id; }

  std::optional<std::string> env(std::string_view name) const override {
    auto& env = self_->state.cfg.env;
    if (auto i = env.find(std::string{name}); i != env.end())
      return i->second;
    return std::nullopt;
  }

  void send(std::string_view output, message msg) override {
    auto& cfg = self_->state.cfg;
    if (!cfg.router)
      return;
    self_->send(cfg.router, atoms::route_msg::value,
                routed_message{std::move(msg), cfg.device_id, cfg.name, std::string{output}});
    ++self_->state.sent;
  }

  void report(const json& patch) override {
    auto& cfg = self_->state.cfg;
    if (cfg.agent)
      self_->send(cfg.agent, atoms::reported::value, cfg.name, patch.dump());
  }

  void on_method(std::string name, method_handler handler) override {
    self_->state.methods[std::move(name)] = std::move(handler);
  }

  timer_handle every(std::chrono::milliseconds interval, std::function<void()> fn) override {
    return add_timer(interval, true, std::move(fn));
  }

  timer_handle after(std::chrono::milliseconds delay, std::function<void()> fn) override {
    return add_timer(delay, false, std::move(fn));
  }

  void cancel_timer(timer_handle handle) override { self_->state.timers.erase(handle); }

  spdlog::logger& log() override { return *self_->state.cfg.logger; }

  void finish() override { self_->send(self_, atoms::finish::value); }

 private:
  timer_handle add_timer(std::chrono::milliseconds d, bool repeat, std::function<void()> fn) {
    auto& st = self_->state;
    auto id = st.next_timer++;
    if (d < std::chrono::milliseconds{1})
      d = std::chrono::milliseconds{1};
    st.timers.emplace(id, host_timer{d, repeat, std::move(fn)});
    self_->delayed_send(self_, d, atoms::timer::value, id);
    return id;
  }

  host_actor* self_;
};

/// Tells the router every input up to processed_token was handled.
void send_ack(host_actor* self) {
  auto& st = self->state;
  if (st.processed_token > st.acked_token && st.cfg.router) {
    // Urgent, so that it does not wait behind a flood of messages in the
    // router's mailbox; `sent` lets the router hold it until the messages this
    // instance sent before it are routed.
    self->send<caf::message_priority::high>(st.cfg.router, atoms::delivered::value, st.cfg.name,
                                             st.processed_token, st.sent);
    st.acked_token = st.processed_token;
  }
  st.unacked = 0;
}

/// Acknowledgements are batched: one when the inputs queued so far are done
/// (a message to self queues behind them), or every ack_every inputs.
constexpr std::size_t ack_every = 64;

caf::behavior module_host_impl(host_actor* self, module_host_config cfg) {
  auto& st = self->state;
  st.cfg = std::move(cfg);
  // A throwing callback crashes this instance with the exception's text as the
  // exit reason, which the supervisor records as the last error.
  self->set_exception_handler([self](caf::scheduled_actor*, std::exception_ptr& eptr) {
    auto text = crash_text("handler", eptr);
    self->state.cfg.logger->error("module crashed: {}", text);
    // Inputs handled before the crash are done; the one that threw is not.
    send_ack(self);
    return caf::make_error(caf::sec::runtime_error, text);
  });
  self->set_exit_handler([self](caf::exit_msg& em) {
    auto& st = self->state;
    if (st.instance && st.started) {
      try {
        st.instance->stop();
      } catch (const std::exception& e) {
        st.cfg.logger->warn("stop() threw: {}", e.what());
      }
    }
    send_ack(self);
    self->quit(em.reason);
  });
  try {
    st.instance = st.cfg.type->create();
    st.ctx = std::make_unique<host_context>(self);
    st.instance->start(*st.ctx, st.cfg.settings);
    st.started = true;
    st.instance->on_desired_properties(st.cfg.desired, true);
  } catch (...) {
    auto text = crash_text("start", std::current_exception());
    st.cfg.logger->error("module failed to start: {}", text);
    self->quit(caf::make_error(caf::sec::runtime_error, text));
    return {};
  }
  if (st.cfg.router)
    self->send(st.cfg.router, atoms::module_up::value, st.cfg.name, caf::actor{self}, st.sent);
  return {
    [self](atoms::input, const std::string& input, const message& msg, std::uint64_t token) {
      auto& st = self->state;
      st.instance->on_message(input, msg);
      st.processed_token = token;
      if (++st.unacked >= ack_every) {
        send_ack(self);
      } else if (!st.ack_scheduled) {
        st.ack_scheduled = true;
        self->send(self, atoms::delivered::value);
      }
    },
    [self](atoms::delivered) {
      self->state.ack_scheduled = false;
      send_ack(self);
    },
    [self](atoms::method, const std::string& name,
           const std::string& payload) -> caf::result<int, std::string> {
      auto& st = self->state;
      auto i = st.methods.find(name);
      if (i == st.methods.end())
        return {501, json{{"error", "method '" + name + "' is not registered by module '"
                                      + st.cfg.name + "'"}}
                       .dump()};
      auto args = json::parse(payload, nullptr, false);
      if (args.is_discarded())
        return {400, json{{"error", "payload is not valid JSON"}}.dump()};
      try {
        auto res = i->second(args);
        return {res.status, res.payload.dump()};
      } catch (...) {
        auto text = crash_text("method '" + name + "'", std::current_exception());
        st.cfg.logger->error("module crashed: {}", text);
        auto rp = self->make_response_promise<int, std::string>();
        rp.deliver(500, json{{"error", text}}.dump());
        send_ack(self);  // inputs handled before the crash are done
        self->quit(caf::make_error(caf::sec::runtime_error, text));
        return rp;
      }
    },
    [self](atoms::desired, const std::string& doc, bool complete) {
      auto j = json::parse(doc, nullptr, false);
      if (!j.is_discarded())
        self->state.instance->on_desired_properties(j, complete);
    },
    [self](atoms::timer, timer_handle id) {
      auto& st = self->state;
      auto i = st.timers.find(id);
      if (i == st.timers.end())
        return;
      if (i->second.repeat) {
        self->delayed_send(self, i->second.interval, atoms::timer::value, id);
        auto fn = i->second.fn;  // the callback may cancel its own timer
        fn();
      } else {
        auto fn = std::move(i->second.fn);
        st.timers.erase(i);
        fn();
      }
    },
    [self](atoms::health_ping, std::uint64_t seq) {
      if (auto sender = caf::actor_cast<caf::actor>(self->current_sender()))
        self->send(sender, atoms::health_pong::value, seq);
    },
    [self](atoms::finish) {
      send_ack(self);
      self->quit(caf::exit_reason::normal);
    },
  };
}

}  // namespace

caf::actor spawn_module_host(caf::actor_system& sys, module_host_config cfg) {
  return sys.spawn(module_host_impl, std::move(cfg));
}

}  // namespace canopy
