#include "runtime/supervisor.hpp"

#include "runtime/atoms.hpp"

#include <caf/all.hpp>
#include <catch2/catch.hpp>

#include <atomic>
#include <chrono>
#include <deque>
#include <future>
#include <memory>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

using namespace canopy;
using namespace std::chrono_literals;
using ek = child_event_kind;

namespace {

// -- test children ------------------------------------------------------------

using crash_atom = caf::atom_constant<caf::atom("crash")>;      // throw in a handler
using leave_atom = caf::atom_constant<caf::atom("leave")>;      // quit() normally
using shutdown_atom = caf::atom_constant<caf::atom("selfshut")>;  // quit(user_shutdown)
using fail_atom = caf::atom_constant<caf::atom("fail")>;        // quit(runtime_error)
using pinged_atom = caf::atom_constant<caf::atom("pinged")>;    // a child saw a ping
using stopping_atom = caf::atom_constant<caf::atom("stopping")>;
using go_atom = caf::atom_constant<caf::atom("go")>;

void answer_ping(caf::event_based_actor* self, std::uint64_t seq) {
  self->send(caf::actor_cast<caf::actor>(self->current_sender()), atoms::health_pong::value, seq);
}

/// A well-behaved child that crashes or leaves on request and answers pings.
/// When `notify` is valid it is told about every ping (after the pong left).
caf::behavior worker(caf::event_based_actor* self, caf::actor notify) {
  return {
    [=](crash_atom) { throw std::runtime_error("boom"); },
    [=](leave_atom) { self->quit(); },
    [=](shutdown_atom) { self->quit(caf::exit_reason::user_shutdown); },
    [=](fail_atom) { self->quit(caf::make_error(caf::sec::runtime_error, "failed on purpose")); },
    [=](atoms::health_ping, std::uint64_t seq) {
      answer_ping(self, seq);
      if (notify)
        self->send(notify, pinged_atom::value, seq);
    },
  };
}

using notify_atom = caf::atom_constant<caf::atom("notify")>;

/// Answers pings by returning the pong (CAF sends a handler's result back to
/// the sender). It tells `notify` only from a later message, i.e. after the pong
/// has left.
caf::behavior returns_pong(caf::event_based_actor* self, caf::actor notify) {
  return {
    [=](atoms::health_ping, std::uint64_t seq) {
      self->send(self, notify_atom::value, seq);
      return caf::make_message(atoms::health_pong::value, seq);
    },
    [=](notify_atom, std::uint64_t seq) { self->send(notify, pinged_atom::value, seq); },
  };
}

/// Never answers pings (but says it saw them).
caf::behavior mute(caf::event_based_actor* self, caf::actor notify) {
  return {
    [=](atoms::health_ping, std::uint64_t seq) { self->send(notify, pinged_atom::value, seq); },
    [=](crash_atom) { throw std::runtime_error("boom"); },
  };
}

/// Ignores the first ping, answers the rest.
caf::behavior slow_to_answer(caf::stateful_actor<int>* self, caf::actor notify) {
  return {
    [=](atoms::health_ping, std::uint64_t seq) {
      if (self->state++ > 0)
        answer_ping(self, seq);
      self->send(notify, pinged_atom::value, seq);
    },
  };
}

/// A hung handler: blocks its worker thread on the first ping until `gate` opens.
caf::behavior hangs_on_ping(caf::event_based_actor* self, caf::actor notify,
                            std::shared_future<void> gate) {
  return {
    [=](atoms::health_ping, std::uint64_t seq) {
      self->send(notify, pinged_atom::value, seq);
      gate.wait();
    },
  };
}

/// Traps the supervisor's exit, reports it, and stops only when told `go`.
caf::behavior slow_stopper(caf::event_based_actor* self, caf::actor notify) {
  self->set_exit_handler([=](caf::exit_msg& em) {
    self->send(notify, stopping_atom::value);
    auto reason = em.reason;
    self->become([=](go_atom) { self->quit(reason); });
  });
  return {
    [=](crash_atom) { throw std::runtime_error("boom"); },
  };
}

child_spec spec_of(std::string id, restart_type rt = restart_type::permanent,
                   caf::actor notify = {}) {
  child_spec s;
  s.id = std::move(id);
  s.restart = rt;
  s.start = [notify](caf::actor_system& sys) { return sys.spawn(worker, notify); };
  return s;
}

/// Opens on destruction, so that a hung child never outlives its test.
struct gate {
  std::promise<void> p;
  std::shared_future<void> f = p.get_future().share();
  bool opened = false;
  void open() {
    if (!opened)
      p.set_value();
    opened = true;
  }
  ~gate() { open(); }
};

caf::actor_system_config& with_threads(caf::actor_system_config& cfg) {
  cfg.set("scheduler.max-threads", 4);
  cfg.set("logger.verbosity", caf::atom("quiet"));
  return cfg;
}

// -- the fixture --------------------------------------------------------------

/// An event as received, with its arrival index (to check ordering).
struct seen_event {
  std::size_t seq;
  child_event_info e;
};

std::string describe(const child_event_info& e) {
  std::ostringstream out;
  out << e.supervisor << "/" << e.id << " " << to_string(e.kind) << " reason=" << e.reason
      << " abnormal=" << e.abnormal << " restarts=" << e.restart_count;
  return out.str();
}

struct fixture {
  manual_clock clk;  // outlives everything below
  caf::actor_system_config cfg;
  caf::actor_system sys{with_threads(cfg)};
  caf::scoped_actor self{sys};
  std::deque<seen_event> events;
  std::deque<caf::down_msg> downs;
  std::size_t next_seq = 0;
  std::vector<caf::actor> supervisors;

  ~fixture() {
    for (auto& s : supervisors)
      caf::anon_send_exit(s, caf::exit_reason::kill);
  }

  caf::actor me() { return caf::actor_cast<caf::actor>(self); }

  supervisor_config config(std::string name, supervision_strategy strategy,
                           std::vector<child_spec> children) {
    supervisor_config c;
    c.name = std::move(name);
    c.strategy = strategy;
    c.children = std::move(children);
    c.clk = &clk;
    c.observer = me();
    c.jitter_seed = 1234;
    return c;
  }

  caf::actor spawn(supervisor_config c) {
    auto s = spawn_supervisor(sys, std::move(c));
    REQUIRE(s);
    supervisors.push_back(s);
    return s;
  }

  /// Takes the first buffered event matching, receiving more for up to 5 s.
  seen_event expect(const std::string& id, ek kind, const std::string& sup = {}) {
    auto match = [&](const child_event_info& e) {
      return e.id == id && e.kind == kind && (sup.empty() || e.supervisor == sup);
    };
    auto deadline = std::chrono::steady_clock::now() + 5s;
    for (;;) {
      for (auto i = events.begin(); i != events.end(); ++i) {
        if (match(i->e)) {
          auto result = std::move(*i);
          events.erase(i);
          return result;
        }
      }
      auto left = deadline - std::chrono::steady_clock::now();
      if (left <= decltype(left)::zero())
        break;
      self->receive(
        [&](atoms::child_event, child_event_info& e) {
          events.push_back(seen_event{next_seq++, std::move(e)});
        },
        caf::after(std::chrono::duration_cast<std::chrono::milliseconds>(left)) >> [] {});
    }
    std::string seen;
    for (auto& s : events)
      seen += "\n  " + describe(s.e);
    FAIL("no event " << (sup.empty() ? "" : sup + "/") << id << " " << to_string(kind)
                     << " within 5 s; buffered:" << seen);
    return {};
  }

  /// Receives events for `window` and reports whether one matching arrived.
  /// Only for negative checks, where some bounded wait is unavoidable.
  bool arrives_within(const std::string& id, ek kind, std::chrono::milliseconds window) {
    auto deadline = std::chrono::steady_clock::now() + window;
    for (;;) {
      for (auto& s : events)
        if (s.e.id == id && s.e.kind == kind)
          return true;
      auto left = deadline - std::chrono::steady_clock::now();
      if (left <= decltype(left)::zero())
        return false;
      self->receive(
        [&](atoms::child_event, child_event_info& e) {
          events.push_back(seen_event{next_seq++, std::move(e)});
        },
        caf::after(std::chrono::duration_cast<std::chrono::milliseconds>(left)) >> [] {});
    }
  }

  void expect_pinged() {
    bool got = false;
    self->receive([&](pinged_atom, std::uint64_t) { got = true; }, caf::after(5s) >> [] {});
    REQUIRE(got);
  }

  /// Waits (up to 5 s) for the down_msg of `who`, keeping other downs for later.
  caf::down_msg expect_down(const caf::actor& who) {
    auto deadline = std::chrono::steady_clock::now() + 5s;
    for (;;) {
      for (auto i = downs.begin(); i != downs.end(); ++i) {
        if (i->source == who.address()) {
          auto result = std::move(*i);
          downs.erase(i);
          return result;
        }
      }
      auto left = deadline - std::chrono::steady_clock::now();
      if (left <= decltype(left)::zero())
        break;
      self->receive([&](caf::down_msg& dm) { downs.push_back(std::move(dm)); },
                    caf::after(std::chrono::duration_cast<std::chrono::milliseconds>(left))
                      >> [] {});
    }
    FAIL("no down_msg within 5 s");
    return {};
  }

  std::vector<child_info> children(const caf::actor& sup) {
    std::vector<child_info> out;
    bool ok = false;
    self->request(sup, 5s, atoms::which_children::value)
      .receive(
        [&](std::vector<child_info>& v) {
          out = std::move(v);
          ok = true;
        },
        [&](caf::error& err) { FAIL("which_children failed: " << sys.render(err)); });
    REQUIRE(ok);
    return out;
  }

  child_info info(const caf::actor& sup, const std::string& id) {
    for (auto& c : children(sup))
      if (c.id == id)
        return c;
    FAIL("no child " << id);
    return {};
  }

  bool call(const caf::actor& sup, caf::atom_value op, const std::string& id) {
    bool result = false;
    bool ok = false;
    auto on_reply = [&](bool b) {
      result = b;
      ok = true;
    };
    auto on_error = [&](caf::error& err) { FAIL("request failed: " << sys.render(err)); };
    if (op == atoms::remove_child::value)
      self->request(sup, 5s, atoms::remove_child::value, id).receive(on_reply, on_error);
    else if (op == atoms::restart_child::value)
      self->request(sup, 5s, atoms::restart_child::value, id).receive(on_reply, on_error);
    REQUIRE(ok);
    return result;
  }
};

caf::actor crash(const caf::actor& who) {
  caf::anon_send(who, crash_atom::value);
  return who;
}

}  // namespace

// -- strategies ---------------------------------------------------------------

TEST_CASE("one_for_one restarts only the crashed child") {
  fixture f;
  auto sup = f.spawn(f.config("s", supervision_strategy::one_for_one,
                              {spec_of("a"), spec_of("b"), spec_of("c")}));
  auto a = f.expect("a", ek::started).e.instance;
  auto b = f.expect("b", ek::started).e.instance;
  auto c = f.expect("c", ek::started).e.instance;
  crash(b);
  auto exited = f.expect("b", ek::exited).e;
  CHECK(exited.abnormal);
  CHECK(exited.instance == b);
  CHECK_FALSE(exited.reason.empty());
  auto restarting = f.expect("b", ek::restarting).e;
  CHECK(restarting.delay == clock::duration::zero());
  CHECK(restarting.restart_count == 1);
  auto b2 = f.expect("b", ek::started).e.instance;
  CHECK(b2 != b);
  auto kids = f.children(sup);
  REQUIRE(kids.size() == 3);
  CHECK(kids[0].id == "a");
  CHECK(kids[0].restart_count == 0);
  CHECK(kids[1].restart_count == 1);
  CHECK(kids[1].state == child_state::running);
  CHECK(kids[2].restart_count == 0);
  CHECK(kids[2].state == child_state::running);
  CHECK_FALSE(kids[1].last_exit_reason.empty());
  // The untouched siblings are the same, live instances.
  f.self->monitor(a);
  f.self->monitor(c);
  CHECK_FALSE(f.arrives_within("a", ek::exited, 20ms));
  CHECK_FALSE(f.arrives_within("c", ek::exited, 0ms));
}

TEST_CASE("one_for_all restarts every child, stopping siblings in reverse order first") {
  fixture f;
  auto sup = f.spawn(f.config("s", supervision_strategy::one_for_all,
                              {spec_of("a"), spec_of("b"), spec_of("c")}));
  auto a = f.expect("a", ek::started).e.instance;
  auto b = f.expect("b", ek::started).e.instance;
  auto c = f.expect("c", ek::started).e.instance;
  f.self->monitor(a);
  f.self->monitor(c);
  crash(b);
  CHECK(f.expect("b", ek::exited).e.abnormal);
  auto c_exit = f.expect("c", ek::exited);
  auto a_exit = f.expect("a", ek::exited);
  CHECK_FALSE(c_exit.e.abnormal);
  CHECK_FALSE(a_exit.e.abnormal);
  CHECK(c_exit.seq < a_exit.seq);  // reverse start order
  auto a2 = f.expect("a", ek::started);
  auto b2 = f.expect("b", ek::started);
  auto c2 = f.expect("c", ek::started);
  CHECK(a_exit.seq < a2.seq);  // nobody starts before all are down
  CHECK(a2.seq < b2.seq);      // start order
  CHECK(b2.seq < c2.seq);
  CHECK(a2.e.instance != a);
  CHECK(b2.e.instance != b);
  CHECK(c2.e.instance != c);
  f.expect_down(a);
  f.expect_down(c);
  for (auto& k : f.children(sup)) {
    CHECK(k.restart_count == 1);
    CHECK(k.state == child_state::running);
  }
}

TEST_CASE("rest_for_one restarts the crashed child and those started after it") {
  fixture f;
  auto sup = f.spawn(f.config("s", supervision_strategy::rest_for_one,
                              {spec_of("a"), spec_of("b"), spec_of("c"), spec_of("d")}));
  f.expect("a", ek::started);
  auto b = f.expect("b", ek::started).e.instance;
  auto c = f.expect("c", ek::started).e.instance;
  auto d = f.expect("d", ek::started).e.instance;
  crash(b);
  auto d_exit = f.expect("d", ek::exited);
  auto c_exit = f.expect("c", ek::exited);
  CHECK(d_exit.seq < c_exit.seq);
  auto b2 = f.expect("b", ek::started);
  auto c2 = f.expect("c", ek::started);
  auto d2 = f.expect("d", ek::started);
  CHECK(b2.seq < c2.seq);
  CHECK(c2.seq < d2.seq);
  CHECK(b2.e.instance != b);
  CHECK(c2.e.instance != c);
  CHECK(d2.e.instance != d);
  auto kids = f.children(sup);
  REQUIRE(kids.size() == 4);
  CHECK(kids[0].restart_count == 0);
  CHECK(kids[1].restart_count == 1);
  CHECK(kids[2].restart_count == 1);
  CHECK(kids[3].restart_count == 1);
  // A crash of the last child restarts only it.
  crash(d2.e.instance);
  f.expect("d", ek::started);
  kids = f.children(sup);
  CHECK(kids[1].restart_count == 1);
  CHECK(kids[2].restart_count == 1);
  CHECK(kids[3].restart_count == 2);
}

// -- restart types ------------------------------------------------------------

TEST_CASE("permanent children restart even after a normal exit") {
  fixture f;
  auto sup = f.spawn(f.config("s", supervision_strategy::one_for_one, {spec_of("p")}));
  auto p = f.expect("p", ek::started).e.instance;
  caf::anon_send(p, leave_atom::value);
  auto exited = f.expect("p", ek::exited).e;
  CHECK_FALSE(exited.abnormal);
  f.expect("p", ek::restarting);
  CHECK(f.expect("p", ek::started).e.instance != p);
  CHECK(f.info(sup, "p").restart_count == 1);
}

TEST_CASE("transient children restart only after an abnormal exit") {
  fixture f;
  auto sup = f.spawn(f.config("s", supervision_strategy::one_for_one,
                              {spec_of("t1", restart_type::transient),
                               spec_of("t2", restart_type::transient),
                               spec_of("t3", restart_type::transient),
                               spec_of("t4", restart_type::transient)}));
  auto t1 = f.expect("t1", ek::started).e.instance;
  auto t2 = f.expect("t2", ek::started).e.instance;
  auto t3 = f.expect("t3", ek::started).e.instance;
  auto t4 = f.expect("t4", ek::started).e.instance;
  SECTION("normal exit: stays stopped") {
    caf::anon_send(t1, leave_atom::value);
    CHECK_FALSE(f.expect("t1", ek::exited).e.abnormal);
    f.expect("t1", ek::stopped);
    auto i = f.info(sup, "t1");
    CHECK(i.state == child_state::stopped);
    CHECK(i.restart_count == 0);
  }
  SECTION("user_shutdown counts as normal") {
    caf::anon_send(t2, shutdown_atom::value);
    CHECK_FALSE(f.expect("t2", ek::exited).e.abnormal);
    f.expect("t2", ek::stopped);
    CHECK(f.info(sup, "t2").state == child_state::stopped);
  }
  SECTION("an exception is abnormal: restarted") {
    crash(t3);
    CHECK(f.expect("t3", ek::exited).e.abnormal);
    CHECK(f.expect("t3", ek::started).e.instance != t3);
    CHECK(f.info(sup, "t3").restart_count == 1);
  }
  SECTION("quitting with an error is abnormal: restarted") {
    caf::anon_send(t4, fail_atom::value);
    auto e = f.expect("t4", ek::exited).e;
    CHECK(e.abnormal);
    CHECK(e.reason.find("failed on purpose") != std::string::npos);
    f.expect("t4", ek::started);
    CHECK(f.info(sup, "t4").restart_count == 1);
  }
}

TEST_CASE("temporary children are never restarted") {
  fixture f;
  auto sup = f.spawn(
    f.config("s", supervision_strategy::one_for_one, {spec_of("tmp", restart_type::temporary)}));
  auto t = f.expect("tmp", ek::started).e.instance;
  crash(t);
  CHECK(f.expect("tmp", ek::exited).e.abnormal);
  f.expect("tmp", ek::stopped);
  auto i = f.info(sup, "tmp");
  CHECK(i.state == child_state::stopped);
  CHECK(i.restart_count == 0);
  // restart_child still brings it back on request.
  CHECK(f.call(sup, atoms::restart_child::value, "tmp"));
  f.expect("tmp", ek::started);
  CHECK(f.info(sup, "tmp").state == child_state::running);
}

// -- intensity and escalation -------------------------------------------------

TEST_CASE("past its intensity a supervisor stops its children in reverse order and quits") {
  fixture f;
  auto cfg = f.config("s", supervision_strategy::one_for_one,
                      {spec_of("a"), spec_of("b"), spec_of("c")});
  cfg.intensity = restart_intensity{2, 5s};
  cfg.backoff.base = clock::duration::zero();  // immediate restarts: count only intensity
  auto sup = f.spawn(cfg);
  f.self->monitor(sup);
  f.expect("a", ek::started);
  auto b = f.expect("b", ek::started).e.instance;
  f.expect("c", ek::started);
  for (int i = 0; i < 2; ++i) {
    crash(b);
    b = f.expect("b", ek::started).e.instance;
  }
  crash(b);  // the third within 5 s: one too many
  f.expect("b", ek::exited);
  f.expect("b", ek::stopped);
  auto c_exit = f.expect("c", ek::exited);
  auto a_exit = f.expect("a", ek::exited);
  CHECK(c_exit.seq < a_exit.seq);
  f.expect("c", ek::stopped);
  f.expect("a", ek::stopped);
  auto down = f.expect_down(sup);
  CHECK(down.reason == caf::sec::runtime_error);
  CHECK(f.sys.render(down.reason).find("restart intensity exceeded") != std::string::npos);
}

TEST_CASE("restarts spread out beyond the intensity period do not escalate") {
  fixture f;
  auto cfg = f.config("s", supervision_strategy::one_for_one, {spec_of("a")});
  cfg.intensity = restart_intensity{1, 5s};
  cfg.backoff.base = clock::duration::zero();
  auto sup = f.spawn(cfg);
  auto a = f.expect("a", ek::started).e.instance;
  for (int i = 0; i < 4; ++i) {
    crash(a);
    a = f.expect("a", ek::started).e.instance;
    f.clk.advance(5s);
  }
  CHECK(f.info(sup, "a").restart_count == 4);
}

TEST_CASE("escalation reaches the parent supervisor, which restarts the subtree") {
  fixture f;
  auto inner_cfg = f.config("inner", supervision_strategy::one_for_one, {spec_of("w")});
  inner_cfg.intensity = restart_intensity{2, 5s};
  inner_cfg.backoff.base = clock::duration::zero();
  child_spec inner;
  inner.id = "inner";
  inner.start = [inner_cfg](caf::actor_system& sys) { return spawn_supervisor(sys, inner_cfg); };
  auto outer = f.spawn(f.config("outer", supervision_strategy::one_for_one, {inner}));
  auto inner1 = f.expect("inner", ek::started, "outer").e.instance;
  auto w = f.expect("w", ek::started, "inner").e.instance;
  for (int i = 0; i < 2; ++i) {
    crash(w);
    w = f.expect("w", ek::started, "inner").e.instance;
  }
  crash(w);
  auto inner_exit = f.expect("inner", ek::exited, "outer").e;
  CHECK(inner_exit.abnormal);
  CHECK(inner_exit.instance == inner1);
  CHECK(inner_exit.reason.find("restart intensity exceeded") != std::string::npos);
  f.expect("inner", ek::restarting, "outer");
  auto inner2 = f.expect("inner", ek::started, "outer").e.instance;
  CHECK(inner2 != inner1);
  auto fresh = f.expect("w", ek::started, "inner").e;
  CHECK(fresh.instance != w);
  CHECK(fresh.restart_count == 0);  // a new subtree: counts start over
  CHECK(f.info(outer, "inner").restart_count == 1);
  CHECK(f.info(inner2, "w").state == child_state::running);
}

TEST_CASE("own_limit: the child is marked failed, stays down, and restart_child revives it") {
  fixture f;
  auto spec = spec_of("flaky");
  spec.own_limit = restart_intensity{2, 1min};
  auto cfg = f.config("s", supervision_strategy::one_for_one, {spec, spec_of("steady")});
  cfg.intensity = restart_intensity{1, 5s};  // would escalate if own-limit restarts counted here
  cfg.backoff.base = clock::duration::zero();
  auto sup = f.spawn(cfg);
  f.self->monitor(sup);
  auto x = f.expect("flaky", ek::started).e.instance;
  f.expect("steady", ek::started);
  for (int i = 0; i < 2; ++i) {
    crash(x);
    x = f.expect("flaky", ek::started).e.instance;
  }
  crash(x);
  auto failed = f.expect("flaky", ek::failed).e;
  CHECK(failed.reason.find("runtime_error") != std::string::npos);
  auto i = f.info(sup, "flaky");
  CHECK(i.state == child_state::failed);
  CHECK(i.restart_count == 2);
  CHECK_FALSE(i.last_exit_reason.empty());
  CHECK(f.info(sup, "steady").state == child_state::running);
  // Stays down, even as time passes.
  f.clk.advance(10min);
  CHECK(f.info(sup, "flaky").state == child_state::failed);
  CHECK_FALSE(f.arrives_within("flaky", ek::started, 50ms));
  // An operator's restart brings it back with a fresh budget.
  CHECK(f.call(sup, atoms::restart_child::value, "flaky"));
  x = f.expect("flaky", ek::started).e.instance;
  CHECK(f.info(sup, "flaky").state == child_state::running);
  crash(x);
  f.expect("flaky", ek::started);
  CHECK(f.info(sup, "flaky").state == child_state::running);
}

// -- backoff ------------------------------------------------------------------

TEST_CASE("backoff: a second crash within the stable period waits for the clock") {
  fixture f;
  auto cfg = f.config("s", supervision_strategy::one_for_one, {spec_of("a")});
  cfg.intensity = restart_intensity{100, 1h};
  cfg.backoff.base = 1s;
  cfg.backoff.jitter = 0.2;
  auto sup = f.spawn(cfg);
  auto a = f.expect("a", ek::started).e.instance;
  crash(a);
  CHECK(f.expect("a", ek::restarting).e.delay == clock::duration::zero());
  a = f.expect("a", ek::started).e.instance;
  crash(a);
  auto delay = f.expect("a", ek::restarting).e.delay;
  CHECK(delay >= 800ms);
  CHECK(delay <= 1200ms);
  CHECK(f.info(sup, "a").state == child_state::backoff);
  f.clk.advance(delay - 1ms);
  CHECK(f.info(sup, "a").state == child_state::backoff);
  f.clk.advance(1ms);
  a = f.expect("a", ek::started).e.instance;
  CHECK(f.info(sup, "a").state == child_state::running);
  // Third consecutive crash: about twice as long.
  crash(a);
  delay = f.expect("a", ek::restarting).e.delay;
  CHECK(delay >= 1600ms);
  CHECK(delay <= 2400ms);
  f.clk.advance(delay);
  a = f.expect("a", ek::started).e.instance;
  // After a stable run the next crash restarts at once again.
  f.clk.advance(10min);
  crash(a);
  CHECK(f.expect("a", ek::restarting).e.delay == clock::duration::zero());
  f.expect("a", ek::started);
}

TEST_CASE("backoff: a child's own backoff policy wins over the supervisor's") {
  fixture f;
  auto a_spec = spec_of("a");
  a_spec.backoff = backoff_policy{10s, 60s, 10min, 0.0};
  auto cfg = f.config("s", supervision_strategy::one_for_one, {a_spec});
  cfg.intensity = restart_intensity{100, 1h};
  cfg.backoff.base = 1s;
  f.spawn(cfg);
  auto a = f.expect("a", ek::started).e.instance;
  crash(a);
  CHECK(f.expect("a", ek::restarting).e.delay == clock::duration::zero());
  a = f.expect("a", ek::started).e.instance;
  crash(a);
  CHECK(f.expect("a", ek::restarting).e.delay == 10s);
}

TEST_CASE("restart_child during backoff restarts at once") {
  fixture f;
  auto cfg = f.config("s", supervision_strategy::one_for_one, {spec_of("a")});
  cfg.backoff.base = 1min;
  auto sup = f.spawn(cfg);
  auto a = f.expect("a", ek::started).e.instance;
  crash(a);
  CHECK(f.expect("a", ek::restarting).e.delay == clock::duration::zero());
  a = f.expect("a", ek::started).e.instance;
  crash(a);
  CHECK(f.expect("a", ek::restarting).e.delay > 30s);
  CHECK(f.info(sup, "a").state == child_state::backoff);
  CHECK(f.call(sup, atoms::restart_child::value, "a"));
  f.expect("a", ek::started);
  CHECK(f.info(sup, "a").state == child_state::running);
}

// -- health checks ------------------------------------------------------------

TEST_CASE("health: a child that does not answer pings is replaced by a fresh instance") {
  fixture f;
  child_spec s;
  s.id = "m";
  auto me = f.me();
  s.start = [me](caf::actor_system& sys) { return sys.spawn(mute, me); };
  s.health = health_check{1s, 500ms};
  auto sup = f.spawn(f.config("s", supervision_strategy::one_for_one, {s}));
  auto m = f.expect("m", ek::started).e.instance;
  f.self->monitor(m);
  f.clk.advance(1s);
  f.expect_pinged();
  f.clk.advance(499ms);
  CHECK(f.info(sup, "m").state == child_state::running);
  f.clk.advance(1ms);
  auto unhealthy = f.expect("m", ek::unhealthy).e;
  CHECK(unhealthy.instance == m);
  auto fresh = f.expect("m", ek::started).e.instance;
  CHECK(fresh != m);
  CHECK(f.expect_down(m).reason == caf::exit_reason::kill);
  auto i = f.info(sup, "m");
  CHECK(i.restart_count == 1);
  CHECK(i.state == child_state::running);
}

TEST_CASE("health: a child that answers stays untouched") {
  fixture f;
  auto s = spec_of("w", restart_type::permanent, f.me());
  s.health = health_check{1s, 500ms};
  auto sup = f.spawn(f.config("s", supervision_strategy::one_for_one, {s}));
  f.expect("w", ek::started);
  for (int i = 0; i < 3; ++i) {
    f.clk.advance(1s);
    f.expect_pinged();  // sent after its pong: the pong is in the supervisor's mailbox
    f.clk.advance(500ms);  // its deadline passes
  }
  auto info = f.info(sup, "w");
  CHECK(info.state == child_state::running);
  CHECK(info.restart_count == 0);
  CHECK_FALSE(f.arrives_within("w", ek::unhealthy, 50ms));
}

TEST_CASE("health: a child may answer by returning the pong from its handler") {
  fixture f;
  child_spec s;
  s.id = "r";
  auto me = f.me();
  s.start = [me](caf::actor_system& sys) { return sys.spawn(returns_pong, me); };
  s.health = health_check{1s, 500ms};
  auto sup = f.spawn(f.config("s", supervision_strategy::one_for_one, {s}));
  f.expect("r", ek::started);
  for (int i = 0; i < 3; ++i) {
    f.clk.advance(1s);
    f.expect_pinged();
    f.clk.advance(500ms);
  }
  auto info = f.info(sup, "r");
  CHECK(info.state == child_state::running);
  CHECK(info.restart_count == 0);
  CHECK_FALSE(f.arrives_within("r", ek::unhealthy, 50ms));
}

TEST_CASE("health: with restart_when_unhealthy off a missed deadline is only reported") {
  fixture f;
  child_spec s;
  s.id = "slow";
  auto me = f.me();
  s.start = [me](caf::actor_system& sys) { return sys.spawn(slow_to_answer, me); };
  s.health = health_check{1s, 500ms};
  s.restart_when_unhealthy = false;
  auto sup = f.spawn(f.config("s", supervision_strategy::one_for_one, {s}));
  auto inst = f.expect("slow", ek::started).e.instance;
  f.clk.advance(1s);
  f.expect_pinged();
  f.clk.advance(500ms);
  CHECK(f.expect("slow", ek::unhealthy).e.instance == inst);
  CHECK(f.info(sup, "slow").state == child_state::unhealthy);
  f.clk.advance(500ms);  // second ping: answered
  f.expect_pinged();
  CHECK(f.expect("slow", ek::started).e.instance == inst);  // running again, same instance
  CHECK(f.info(sup, "slow").state == child_state::running);
  CHECK(f.info(sup, "slow").restart_count == 0);
}

TEST_CASE("health: a hung handler is replaced without waiting for it to die") {
  fixture f;
  gate g;
  child_spec s;
  s.id = "hung";
  auto me = f.me();
  auto fut = g.f;
  auto first = std::make_shared<std::atomic<bool>>(true);
  s.start = [me, fut, first](caf::actor_system& sys) {
    if (first->exchange(false))
      return sys.spawn(hangs_on_ping, me, fut);
    return sys.spawn(worker, caf::actor{});
  };
  s.health = health_check{1s, 500ms};
  auto sup = f.spawn(f.config("s", supervision_strategy::one_for_one, {s}));
  auto stuck = f.expect("hung", ek::started).e.instance;
  f.self->monitor(stuck);
  f.clk.advance(1s);
  f.expect_pinged();  // its handler now blocks a worker thread
  f.clk.advance(500ms);
  CHECK(f.expect("hung", ek::unhealthy).e.instance == stuck);
  auto fresh = f.expect("hung", ek::started).e.instance;
  CHECK(fresh != stuck);
  CHECK(f.info(sup, "hung").state == child_state::running);
  g.open();
  CHECK(f.expect_down(stuck).reason == caf::exit_reason::kill);
  // Its late down message changes nothing.
  auto i = f.info(sup, "hung");
  CHECK(i.state == child_state::running);
  CHECK(i.restart_count == 1);
}

// -- dynamic children ---------------------------------------------------------

TEST_CASE("remove_child replies only once the child is down") {
  fixture f;
  child_spec s;
  s.id = "slow";
  auto me = f.me();
  s.start = [me](caf::actor_system& sys) { return sys.spawn(slow_stopper, me); };
  auto sup = f.spawn(f.config("s", supervision_strategy::one_for_one, {s, spec_of("other")}));
  auto slow = f.expect("slow", ek::started).e.instance;
  f.expect("other", ek::started);
  auto& sys = f.sys;
  auto reply = std::async(std::launch::async, [&sys, sup] {
    caf::scoped_actor requester{sys};
    std::optional<bool> r;
    requester->request(sup, 10s, atoms::remove_child::value, std::string{"slow"})
      .receive([&](bool b) { r = b; }, [&](caf::error&) {});
    return r;
  });
  bool stopping = false;
  f.self->receive([&](stopping_atom) { stopping = true; }, caf::after(5s) >> [] {});
  REQUIRE(stopping);
  // The child holds its stop: no reply yet.
  CHECK(reply.wait_for(100ms) == std::future_status::timeout);
  caf::anon_send(slow, go_atom::value);
  REQUIRE(reply.wait_for(5s) == std::future_status::ready);
  auto r = reply.get();
  REQUIRE(r.has_value());
  CHECK(*r);
  CHECK_FALSE(f.expect("slow", ek::exited).e.abnormal);
  f.expect("slow", ek::stopped);
  auto kids = f.children(sup);
  REQUIRE(kids.size() == 1);
  CHECK(kids[0].id == "other");
  CHECK_FALSE(f.call(sup, atoms::remove_child::value, "nope"));
}

TEST_CASE("remove_child of a child in backoff or failed forgets it at once") {
  fixture f;
  auto cfg = f.config("s", supervision_strategy::one_for_one, {spec_of("a")});
  cfg.backoff.base = 1min;
  auto sup = f.spawn(cfg);
  auto a = f.expect("a", ek::started).e.instance;
  crash(a);
  a = f.expect("a", ek::started).e.instance;
  crash(a);
  f.expect("a", ek::restarting);
  f.expect("a", ek::restarting);
  CHECK(f.call(sup, atoms::remove_child::value, "a"));
  CHECK(f.children(sup).empty());
  f.clk.advance(1h);  // its backoff timer is gone
  CHECK(f.children(sup).empty());
  CHECK_FALSE(f.arrives_within("a", ek::started, 50ms));
}

TEST_CASE("add_child starts a child; a duplicate id is refused") {
  fixture f;
  auto sup = f.spawn(f.config("s", supervision_strategy::one_for_one, {spec_of("a")}));
  f.expect("a", ek::started);
  auto add = [&](child_spec s) {
    bool r = false;
    f.self->request(sup, 5s, atoms::add_child::value, std::move(s))
      .receive([&](bool b) { r = b; }, [](caf::error&) {});
    return r;
  };
  CHECK_FALSE(add(spec_of("a")));
  CHECK(add(spec_of("b")));
  f.expect("b", ek::started);
  auto kids = f.children(sup);
  REQUIRE(kids.size() == 2);
  CHECK(kids[1].id == "b");
}

TEST_CASE("a start that returns no actor counts as a crash at start") {
  fixture f;
  child_spec s;
  s.id = "late";
  auto calls = std::make_shared<std::atomic<int>>(0);
  s.start = [calls](caf::actor_system& sys) {
    if (calls->fetch_add(1) == 0)
      return caf::actor{};
    return sys.spawn(worker, caf::actor{});
  };
  auto sup = f.spawn(f.config("s", supervision_strategy::one_for_one, {s}));
  auto e = f.expect("late", ek::exited).e;
  CHECK(e.abnormal);
  CHECK_FALSE(e.instance);
  f.expect("late", ek::started);
  CHECK(f.info(sup, "late").restart_count == 1);
}

// -- the supervisor's own exit ------------------------------------------------

TEST_CASE("a killed supervisor takes its children down") {
  fixture f;
  auto sup = f.spawn(f.config("s", supervision_strategy::one_for_one, {spec_of("a"), spec_of("b")}));
  auto a = f.expect("a", ek::started).e.instance;
  auto b = f.expect("b", ek::started).e.instance;
  f.self->monitor(a);
  f.self->monitor(b);
  caf::anon_send_exit(sup, caf::exit_reason::kill);
  CHECK(f.expect_down(a).reason == caf::exit_reason::user_shutdown);
  CHECK(f.expect_down(b).reason == caf::exit_reason::user_shutdown);
}

TEST_CASE("an exit sent to a supervisor stops its children in reverse order, then it quits") {
  fixture f;
  auto sup = f.spawn(f.config("s", supervision_strategy::one_for_one,
                              {spec_of("a"), spec_of("b"), spec_of("c")}));
  f.expect("a", ek::started);
  f.expect("b", ek::started);
  f.expect("c", ek::started);
  f.self->monitor(sup);
  caf::anon_send_exit(sup, caf::exit_reason::user_shutdown);
  auto c = f.expect("c", ek::exited);
  auto b = f.expect("b", ek::exited);
  auto a = f.expect("a", ek::exited);
  CHECK(c.seq < b.seq);
  CHECK(b.seq < a.seq);
  CHECK_FALSE(a.e.abnormal);
  f.expect("a", ek::stopped);
  CHECK(f.expect_down(sup).reason == caf::exit_reason::user_shutdown);
}

TEST_CASE("a child that ignores the shutdown is killed after its shutdown_timeout") {
  fixture f;
  child_spec s;
  s.id = "stubborn";
  auto me = f.me();
  s.start = [me](caf::actor_system& sys) { return sys.spawn(slow_stopper, me); };
  s.shutdown_timeout = 2s;
  auto sup = f.spawn(f.config("s", supervision_strategy::one_for_one, {s}));
  auto inst = f.expect("stubborn", ek::started).e.instance;
  f.self->monitor(inst);
  f.self->monitor(sup);
  caf::anon_send_exit(sup, caf::exit_reason::user_shutdown);
  bool stopping = false;
  f.self->receive([&](stopping_atom) { stopping = true; }, caf::after(5s) >> [] {});
  REQUIRE(stopping);
  f.clk.advance(2s);
  CHECK(f.expect_down(inst).reason == caf::exit_reason::kill);
  CHECK(f.expect_down(sup).reason == caf::exit_reason::user_shutdown);
}
