#include "runtime/router.hpp"

#include "actor_fixture.hpp"
#include "runtime/atoms.hpp"

#include <caf/all.hpp>
#include <catch2/catch.hpp>

#include <set>
#include <thread>

using namespace canopy;
using namespace std::chrono_literals;

namespace {

struct fixture : canopy::unit_test::actor_fixture {

  caf::actor router(std::size_t max_waiting = 100000) {
    router_config rc;
    rc.upstream = caf::actor{*self};
    rc.max_waiting = max_waiting;
    return spawn_router(*sys, rc);
  }

  void set_routes(caf::actor r, std::vector<std::string> texts) {
    std::vector<route> routes;
    int i = 0;
    for (auto& t : texts) {
      auto c = route::compile("r" + std::to_string(i++), t);
      REQUIRE(c.ok());
      routes.push_back(std::move(*c));
    }
    (*self)->send(r, atoms::set_routes::value, route_table{std::make_shared<const std::vector<route>>(std::move(routes))});
  }

  router_stats stats(caf::actor r) {
    router_stats out;
    (*self)->request(r, 5s, atoms::stats::value).receive([&](router_stats& s) { out = s; },
                                                         [](caf::error&) { FAIL("no stats"); });
    return out;
  }
};

/// A module stand-in that forwards what it receives to `sink`.
caf::behavior forwarder(caf::event_based_actor* self, caf::actor sink, std::string name) {
  return {[self, sink, name](atoms::input, const std::string& input, const message& m) {
    self->send(sink, name, input, m);
  }};
}

routed_message from(const std::string& module, const std::string& output, message m) {
  return routed_message{std::move(m), "dev", module, output};
}

std::string receive_body(caf::scoped_actor& self, const std::string& expect_module, const std::string& expect_input) {
  std::string body;
  self->receive([&](const std::string& module, const std::string& input, const message& m) {
    CHECK(module == expect_module);
    CHECK(input == expect_input);
    body = std::string{m.body()};
  }, caf::after(5s) >> [] { FAIL("nothing delivered"); });
  return body;
}

}  // namespace

TEST_CASE("messages follow matching routes to module inputs and $upstream") {
  fixture f;
  auto r = f.router();
  f.set_routes(r, {R"(FROM /messages/modules/a/outputs/out INTO BrokeredEndpoint("/modules/b/inputs/in"))",
                   "FROM /messages/modules/b/* INTO $upstream"});
  auto b = f.sys->spawn(forwarder, caf::actor{*f.self}, "b");
  (*f.self)->send(r, atoms::module_up::value, std::string{"b"}, b);
  auto m = message_builder{}.body("1").build();
  (*f.self)->send(r, atoms::route_msg::value, from("a", "out", m));
  CHECK(receive_body(*f.self, "b", "in") == "1");
  (*f.self)->send(r, atoms::route_msg::value, from("b", "x", m));
  (*f.self)->receive([&](atoms::route_msg, const routed_message& rm) {
    CHECK(rm.module == "b");
    CHECK(rm.msg.same_buffer(m));
  }, caf::after(5s) >> [] { FAIL("nothing upstream"); });
  (*f.self)->send(r, atoms::route_msg::value, from("c", "out", m));
  auto st = f.stats(r);
  CHECK(st.received == 3);
  CHECK(st.delivered == 1);
  CHECK(st.upstream == 1);
  CHECK(st.no_route == 1);
  caf::anon_send_exit(b, caf::exit_reason::user_shutdown);
  caf::anon_send_exit(r, caf::exit_reason::user_shutdown);
}

TEST_CASE("WHERE conditions on application properties select messages") {
  fixture f;
  auto r = f.router();
  f.set_routes(r, {R"(FROM /messages/modules/a/outputs/* WHERE level = 'high' AND temp > 30 INTO BrokeredEndpoint("/modules/b/inputs/hot"))"});
  auto b = f.sys->spawn(forwarder, caf::actor{*f.self}, "b");
  (*f.self)->send(r, atoms::module_up::value, std::string{"b"}, b);
  (*f.self)->send(r, atoms::route_msg::value,
                  from("a", "o", message_builder{}.body("cold").property("level", "high").property("temp", "20").build()));
  (*f.self)->send(r, atoms::route_msg::value,
                  from("a", "o", message_builder{}.body("hot").property("level", "high").property("temp", "31").build()));
  (*f.self)->send(r, atoms::route_msg::value, from("a", "o", message_builder{}.body("none").build()));
  CHECK(receive_body(*f.self, "b", "hot") == "hot");
  auto st = f.stats(r);
  CHECK(st.delivered == 1);
  CHECK(st.no_route == 2);
  caf::anon_send_exit(b, caf::exit_reason::user_shutdown);
  caf::anon_send_exit(r, caf::exit_reason::user_shutdown);
}

TEST_CASE("fan-out delivers the same buffer to every matching endpoint") {
  fixture f;
  auto r = f.router();
  f.set_routes(r, {R"(FROM /messages/* INTO BrokeredEndpoint("/modules/b/inputs/one"))",
                   R"(FROM /messages/modules/a/* INTO BrokeredEndpoint("/modules/b/inputs/two"))"});
  auto b = f.sys->spawn(forwarder, caf::actor{*f.self}, "b");
  (*f.self)->send(r, atoms::module_up::value, std::string{"b"}, b);
  auto m = message_builder{}.body("x").build();
  (*f.self)->send(r, atoms::route_msg::value, from("a", "o", m));
  std::set<std::string> inputs;
  for (int i = 0; i < 2; ++i)
    (*f.self)->receive([&](const std::string&, const std::string& input, const message& got) {
      inputs.insert(input);
      CHECK(got.same_buffer(m));
    }, caf::after(5s) >> [] { FAIL("missing delivery"); });
  CHECK(inputs == std::set<std::string>{"one", "two"});
  caf::anon_send_exit(b, caf::exit_reason::user_shutdown);
  caf::anon_send_exit(r, caf::exit_reason::user_shutdown);
}

TEST_CASE("messages for a module that is down wait, in order, until it comes up") {
  fixture f;
  auto r = f.router();
  f.set_routes(r, {R"(FROM /messages/modules/a/* INTO BrokeredEndpoint("/modules/b/inputs/in"))"});
  auto b1 = f.sys->spawn(forwarder, caf::actor{*f.self}, "b");
  (*f.self)->send(r, atoms::module_up::value, std::string{"b"}, b1);
  // b's instance dies (a crash); the router learns it through its monitor.
  (*f.self)->monitor(b1);
  caf::anon_send_exit(b1, caf::exit_reason::kill);
  (*f.self)->receive([](caf::down_msg&) {}, caf::after(5s) >> [] { FAIL("alive"); });
  // Wait until the router has seen the down message too.
  for (int i = 0; i < 500; ++i) {
    (*f.self)->send(r, atoms::route_msg::value, from("a", "o", message_builder{}.body("probe").build()));
    if (f.stats(r).queued > 0)
      break;
    std::this_thread::sleep_for(10ms);
  }
  // Drop probe deliveries that reached b1's dead mailbox: they are lost with it.
  auto before = f.stats(r).queued;
  REQUIRE(before > 0);
  for (int i = 0; i < 5; ++i)
    (*f.self)->send(r, atoms::route_msg::value, from("a", "o", message_builder{}.body(std::to_string(i)).build()));
  CHECK(f.stats(r).queued == before + 5);
  auto b2 = f.sys->spawn(forwarder, caf::actor{*f.self}, "b");
  (*f.self)->send(r, atoms::module_up::value, std::string{"b"}, b2);
  std::vector<std::string> got;
  for (std::uint64_t i = 0; i < before + 5; ++i)
    got.push_back(receive_body(*f.self, "b", "in"));
  std::vector<std::string> tail(got.end() - 5, got.end());
  CHECK(tail == std::vector<std::string>{"0", "1", "2", "3", "4"});
  CHECK(f.stats(r).queued == 0);
  caf::anon_send_exit(b2, caf::exit_reason::user_shutdown);
  caf::anon_send_exit(r, caf::exit_reason::user_shutdown);
}

TEST_CASE("the waiting queue is bounded: the oldest are dropped and counted") {
  fixture f;
  auto r = f.router(3);
  f.set_routes(r, {R"(FROM /messages/modules/a/* INTO BrokeredEndpoint("/modules/b/inputs/in"))"});
  for (int i = 0; i < 5; ++i)
    (*f.self)->send(r, atoms::route_msg::value, from("a", "o", message_builder{}.body(std::to_string(i)).build()));
  auto st = f.stats(r);
  CHECK(st.queued == 3);
  CHECK(st.dropped_full == 2);
  auto b = f.sys->spawn(forwarder, caf::actor{*f.self}, "b");
  (*f.self)->send(r, atoms::module_up::value, std::string{"b"}, b);
  CHECK(receive_body(*f.self, "b", "in") == "2");
  CHECK(receive_body(*f.self, "b", "in") == "3");
  CHECK(receive_body(*f.self, "b", "in") == "4");
  caf::anon_send_exit(b, caf::exit_reason::user_shutdown);
  caf::anon_send_exit(r, caf::exit_reason::user_shutdown);
}
