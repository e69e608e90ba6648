#include "runtime/agent.hpp"

#include "actor_fixture.hpp"
#include "runtime/atoms.hpp"
#include "runtime/router.hpp"

#include <caf/all.hpp>
#include <catch2/catch.hpp>

#include <algorithm>
#include <mutex>
#include <thread>

using namespace canopy;
using namespace std::chrono_literals;

namespace {

using crash_atom = caf::atom_constant<caf::atom("crashnow")>;

/// Starts per module name, and the live instances, as the test module
/// stand-ins report them.
struct registry {
  std::mutex mtx;
  std::map<std::string, int> starts;
  std::map<std::string, caf::actor> live;
  int count(const std::string& n) {
    std::lock_guard<std::mutex> g{mtx};
    return starts[n];
  }
  caf::actor instance(const std::string& n) {
    std::lock_guard<std::mutex> g{mtx};
    return live[n];
  }
};

caf::behavior stand_in(caf::event_based_actor* self, std::string name, registry* reg, caf::actor probe) {
  {
    std::lock_guard<std::mutex> g{reg->mtx};
    ++reg->starts[name];
    reg->live[name] = caf::actor{self};
  }
  return {
    [self](crash_atom) { self->quit(caf::make_error(caf::sec::runtime_error, std::string{"boom"})); },
    [](atoms::method, const std::string& method, const std::string& payload) -> caf::result<int, std::string> {
      if (method == "slow")
        return {504, ""};
      return {200, payload};
    },
    [self, name, probe](atoms::desired, const std::string& doc, bool complete) {
      self->send(probe, name, doc, complete);
    },
  };
}

module_spec module_named(const std::string& name, unsigned order) {
  module_spec m;
  m.name = name;
  m.library = "builtin:x";
  m.startup_order = order;
  m.limits.max_restarts = 2;
  m.limits.within = std::chrono::minutes{1};
  m.limits.backoff_base = std::chrono::milliseconds{0};
  return m;
}

deployment three_modules() {
  deployment d;
  d.modules = {module_named("a", 1), module_named("b", 2), module_named("c", 3)};
  d.modules[1].desired_properties = {{"threshold", 25}};
  d.routes = {route_spec{"r", "FROM /messages/modules/a/* INTO $upstream"}};
  return d;
}

struct fixture : canopy::unit_test::actor_fixture {
  manual_clock clk;
  registry reg;
  caf::actor modules, agent;
  bool fail_make_child = false;

  ~fixture() {
    caf::anon_send_exit(agent, caf::exit_reason::user_shutdown);
    caf::anon_send_exit(modules, caf::exit_reason::user_shutdown);
    shutdown();  // the actors go before the clock and the registry
  }

  void start(std::optional<deployment> initial = std::nullopt) {
    agent_config ac;
    ac.router = caf::actor{*self};
    ac.clk = &clk;
    ac.initial = std::move(initial);
    auto* r = &reg;
    auto probe = caf::actor{*self};
    ac.make_child = [this, r, probe](const module_spec& m, caf::actor) -> expected<child_spec> {
      if (fail_make_child && m.name == "d")
        return make_error(errc::incompatible, "cannot load d");
      child_spec c;
      c.id = m.name;
      c.restart = restart_type::permanent;
      c.own_limit = restart_intensity{m.limits.max_restarts, m.limits.within};
      c.backoff = backoff_policy{clock::duration::zero(), clock::duration::zero(), std::chrono::hours{1}, 0};
      auto name = m.name;
      c.start = [name, r, probe](caf::actor_system& s) { return s.spawn(stand_in, name, r, probe); };
      return c;
    };
    agent = spawn_agent(*sys, std::move(ac));
    supervisor_config mc;
    mc.name = "modules";
    mc.clk = &clk;
    mc.observer = agent;
    mc.intensity = restart_intensity{1000, std::chrono::seconds{1}};
    modules = spawn_supervisor(*sys, mc);
    caf::anon_send(agent, atoms::modules_ready::value, modules);
  }

  std::vector<module_row> list() {
    std::vector<module_row> rows;
    (*self)->request(agent, 5s, atoms::list::value).receive([&](std::vector<module_row>& r) { rows = r; },
                                                           [](caf::error&) { FAIL("list failed"); });
    return rows;
  }

  module_row row(const std::string& name) {
    for (auto& r : list())
      if (r.name == name)
        return r;
    return {};
  }

  template <class Pred>
  void wait_for(Pred pred) {
    for (int i = 0; i < 500 && !pred(); ++i)
      std::this_thread::sleep_for(10ms);
    REQUIRE(pred());
  }

  caf::error deploy(deployment d) {
    caf::error result;
    (*self)->request(agent, 5s, atoms::deploy::value, std::move(d))
      .receive([] {}, [&](caf::error& e) { result = e; });
    return result;
  }
};

bool running(fixture& f, std::initializer_list<const char*> names) {
  auto rows = f.list();
  for (auto* n : names) {
    auto i = std::find_if(rows.begin(), rows.end(), [&](auto& r) { return r.name == n; });
    if (i == rows.end() || i->status != "running")
      return false;
  }
  return true;
}

}  // namespace

TEST_CASE("Azure restart policies map onto restart types and health checks") {
  auto m = module_named("m", 1);
  m.health.period = std::chrono::seconds{7};
  m.health.deadline = std::chrono::seconds{3};
  m.limits.max_restarts = 4;
  m.limits.within = std::chrono::seconds{90};
  m.limits.backoff_cap = std::chrono::seconds{30};
  m.restart = restart_policy::never;
  auto c = module_child_spec(m);
  CHECK(c.restart == restart_type::temporary);
  CHECK(c.health.period == clock::duration::zero());
  m.restart = restart_policy::on_failure;
  c = module_child_spec(m);
  CHECK(c.restart == restart_type::transient);
  CHECK(c.health.period == clock::duration::zero());
  m.restart = restart_policy::on_unhealthy;
  c = module_child_spec(m);
  CHECK(c.restart == restart_type::transient);
  CHECK(c.health.period == std::chrono::seconds{7});
  CHECK(c.health.deadline == std::chrono::seconds{3});
  CHECK(c.restart_when_unhealthy);
  m.restart = restart_policy::always;
  c = module_child_spec(m);
  CHECK(c.restart == restart_type::permanent);
  CHECK(c.health.period == std::chrono::seconds{7});
  REQUIRE(c.own_limit.has_value());
  CHECK(c.own_limit->max_restarts == 4);
  CHECK(c.own_limit->period == std::chrono::seconds{90});
  REQUIRE(c.backoff.has_value());
  CHECK(c.backoff->cap == std::chrono::seconds{30});
  CHECK(c.id == "m");
}

TEST_CASE("merge_patch_between yields the RFC 7386 patch") {
  nlohmann::json a = {{"x", 1}, {"y", {{"z", 1}, {"w", 2}}}, {"gone", true}};
  nlohmann::json b = {{"x", 2}, {"y", {{"z", 1}}}, {"new", "v"}};
  auto p = merge_patch_between(a, b);
  CHECK(p == nlohmann::json{{"x", 2}, {"y", {{"w", nullptr}}}, {"gone", nullptr}, {"new", "v"}});
  auto applied = a;
  applied.merge_patch(p);
  CHECK(applied == b);
}

TEST_CASE("the initial deployment starts every module and routes are installed") {
  fixture f;
  f.start(three_modules());
  (*f.self)->receive([](atoms::set_routes, const route_table& t) { CHECK(t->size() == 1); },
                     caf::after(5s) >> [] { FAIL("no routes"); });
  f.wait_for([&] { return running(f, {"a", "b", "c"}); });
  f.wait_for([&] { return f.reg.count("a") >= 1; });
  CHECK(f.reg.count("a") == 1);
  auto rows = f.list();
  REQUIRE(rows.size() == 3);
  CHECK(rows[0].name == "a");  // startup order
  CHECK(rows[0].last_start_ms > 0);
}

TEST_CASE("reconcile restarts only what changed") {
  fixture f;
  f.start(three_modules());
  f.wait_for([&] { return running(f, {"a", "b", "c"}); });
  auto d = three_modules();
  d.modules[0].settings = {{"rate", 2}};                  // a: changed -> restart
  d.modules[1].desired_properties = {{"threshold", 30}};  // b: desired only -> patch, no restart
  d.modules.erase(d.modules.begin() + 2);                 // c: removed -> stopped
  d.modules.push_back(module_named("d", 4));              // d: added -> started
  CHECK(!f.deploy(d));
  f.wait_for([&] { return running(f, {"a", "b", "d"}); });
  // An instance counts itself when it first runs, just after the supervisor
  // spawned it: wait for that rather than race it.
  f.wait_for([&] { return f.reg.count("a") == 2 && f.reg.count("d") == 1; });
  CHECK(f.reg.count("b") == 1);
  auto rows = f.list();
  CHECK(rows.size() == 3);
  CHECK(std::none_of(rows.begin(), rows.end(), [](auto& r) { return r.name == "c"; }));
  bool patched = false;
  while (!patched)
    (*f.self)->receive(
      [&](const std::string& name, const std::string& doc, bool complete) {
        CHECK(name == "b");
        CHECK(nlohmann::json::parse(doc) == nlohmann::json{{"threshold", 30}});
        CHECK_FALSE(complete);
        patched = true;
      },
      [](atoms::set_routes, const route_table&) {},
      caf::after(5s) >> [] { FAIL("no desired patch"); });
  // The same deployment again changes nothing.
  CHECK(!f.deploy(d));
  CHECK(f.reg.count("a") == 2);
  CHECK(f.reg.count("b") == 1);
}

TEST_CASE("a module that cannot be built fails the deployment and nothing changes") {
  fixture f;
  f.start(three_modules());
  f.wait_for([&] { return running(f, {"a", "b", "c"}); });
  f.fail_make_child = true;
  auto d = three_modules();
  d.modules.erase(d.modules.begin());  // would remove a ...
  d.modules.push_back(module_named("d", 4));  // ... and add an unloadable d
  auto err = f.deploy(d);
  REQUIRE(err);
  CHECK(caf::to_string(err).find("cannot load d") != std::string::npos);
  CHECK(running(f, {"a", "b", "c"}));
  f.wait_for([&] { return f.reg.count("a") >= 1; });
  CHECK(f.reg.count("a") == 1);
  CHECK(f.list().size() == 3);
}

TEST_CASE("a module past its restart budget is failed, loudly, until restarted") {
  fixture f;
  f.start(three_modules());
  f.wait_for([&] { return running(f, {"a", "b", "c"}); });
  for (int i = 1; i <= 3; ++i) {
    auto inst = f.reg.instance("a");
    caf::anon_send(inst, crash_atom::value);
    f.wait_for([&] { return f.reg.count("a") == i + 1 || f.row("a").status == "failed"; });
  }
  f.wait_for([&] { return f.row("a").status == "failed"; });
  auto r = f.row("a");
  CHECK(r.last_exit_reason.find("boom") != std::string::npos);
  CHECK(r.restart_count == 2);
  CHECK(running(f, {"b", "c"}));
  caf::error err;
  (*f.self)->request(f.agent, 5s, atoms::restart::value, std::string{"a"}).receive([] {}, [&](caf::error& e) { err = e; });
  CHECK(!err);
  f.wait_for([&] { return f.row("a").status == "running"; });
}

TEST_CASE("invoke reaches the running instance; unknown modules answer 404") {
  fixture f;
  f.start(three_modules());
  f.wait_for([&] { return running(f, {"a", "b", "c"}); });
  method_reply rep;
  (*f.self)->request(f.agent, 5s, atoms::invoke::value, std::string{"b"}, std::string{"echo"},
                     std::string{R"({"k":1})"}, std::uint32_t{1000})
    .receive([&](method_reply& r) { rep = r; }, [](caf::error&) { FAIL("invoke failed"); });
  CHECK(rep.status == 200);
  CHECK(rep.payload_json == R"({"k":1})");
  (*f.self)->request(f.agent, 5s, atoms::invoke::value, std::string{"zz"}, std::string{"echo"},
                     std::string{"{}"}, std::uint32_t{1000})
    .receive([&](method_reply& r) { rep = r; }, [](caf::error&) { FAIL("invoke failed"); });
  CHECK(rep.status == 404);
}

TEST_CASE("twin shows desired from the deployment and reported from the module") {
  fixture f;
  f.start(three_modules());
  f.wait_for([&] { return running(f, {"a", "b", "c"}); });
  caf::anon_send(f.agent, atoms::reported::value, std::string{"b"}, std::string{R"({"threshold":25,"x":{"y":1}})"});
  caf::anon_send(f.agent, atoms::reported::value, std::string{"b"}, std::string{R"({"x":{"y":null,"z":2}})"});
  twin_doc t;
  f.wait_for([&] {
    (*f.self)->request(f.agent, 5s, atoms::twin::value, std::string{"b"}).receive([&](twin_doc& d) { t = d; }, [](caf::error&) {});
    return nlohmann::json::parse(t.reported_json).contains("x") && nlohmann::json::parse(t.reported_json)["x"].contains("z");
  });
  CHECK(nlohmann::json::parse(t.desired_json) == nlohmann::json{{"threshold", 25}});
  CHECK(nlohmann::json::parse(t.reported_json) == nlohmann::json{{"threshold", 25}, {"x", {{"z", 2}}}});
}

TEST_CASE("a restarted agent continues from the shared memory: deployment, statuses, reported") {
  fixture f;
  auto memory = std::make_shared<agent_memory>();
  auto start_with_memory = [&](std::optional<deployment> initial) {
    agent_config ac;
    ac.router = caf::actor{*f.self};
    ac.clk = &f.clk;
    ac.initial = std::move(initial);
    ac.memory = memory;
    auto* r = &f.reg;
    auto probe = caf::actor{*f.self};
    ac.make_child = [r, probe](const module_spec& m, caf::actor) -> expected<child_spec> {
      child_spec c;
      c.id = m.name;
      c.own_limit = restart_intensity{5, std::chrono::minutes{1}};
      c.backoff = backoff_policy{clock::duration::zero(), clock::duration::zero(), std::chrono::hours{1}, 0};
      auto name = m.name;
      c.start = [name, r, probe](caf::actor_system& s) { return s.spawn(stand_in, name, r, probe); };
      return c;
    };
    f.agent = spawn_agent(*f.sys, std::move(ac));
    supervisor_config mc;
    mc.name = "modules";
    mc.clk = &f.clk;
    mc.observer = f.agent;
    mc.intensity = restart_intensity{1000, std::chrono::seconds{1}};
    f.modules = spawn_supervisor(*f.sys, mc);
    caf::anon_send(f.agent, atoms::modules_ready::value, f.modules);
  };
  auto d = three_modules();
  d.modules[1].desired_properties = {{"threshold", 42}};
  start_with_memory(d);
  f.wait_for([&] { return running(f, {"a", "b", "c"}); });
  caf::anon_send(f.reg.instance("a"), crash_atom::value);
  f.wait_for([&] { return f.row("a").restart_count == 1 && f.row("a").status == "running"; });
  caf::anon_send(f.agent, atoms::reported::value, std::string{"b"}, std::string{R"({"seen":1})"});
  f.wait_for([&] {
    std::lock_guard<std::mutex> g{memory->mtx};
    return memory->reported.count("b") > 0;
  });
  CHECK(memory->desired_of("b") == nlohmann::json{{"threshold", 42}});
  // The agent and its modules die (as rest_for_one does after a router crash);
  // a new agent with no initial deployment continues from the memory.
  caf::anon_send_exit(f.agent, caf::exit_reason::kill);
  caf::anon_send_exit(f.modules, caf::exit_reason::user_shutdown);
  start_with_memory(std::nullopt);
  f.wait_for([&] { return running(f, {"a", "b", "c"}); });
  CHECK(f.row("a").last_exit_reason.find("boom") != std::string::npos);  // kept from the first life
  twin_doc t;
  (*f.self)->request(f.agent, 5s, atoms::twin::value, std::string{"b"}).receive([&](twin_doc& doc) { t = doc; }, [](caf::error&) { FAIL("no twin"); });
  CHECK(nlohmann::json::parse(t.reported_json) == nlohmann::json{{"seen", 1}});
  CHECK(nlohmann::json::parse(t.desired_json) == nlohmann::json{{"threshold", 42}});
}
