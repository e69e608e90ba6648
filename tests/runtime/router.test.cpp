#include "runtime/router.hpp"

#include "actor_fixture.hpp"
#include "runtime/atoms.hpp"
#include "runtime/clock.hpp"
#include "runtime/message_store.hpp"
#include "sqlite_inspect.hpp"
#include "temp_dir.hpp"

#include <caf/all.hpp>
#include <catch2/catch.hpp>
#include <sqlite3.h>

#include <functional>
#include <string>
#include <thread>
#include <vector>

using namespace canopy;
using namespace std::chrono_literals;

namespace {

/// What a receiver stand-in reports to the test.
struct got {
  std::string receiver;
  std::string input;
  std::string body;
  std::uint64_t token = 0;
};

/// A receiver (module instance or $upstream) that reports each delivery to
/// `test` and acknowledges only when told: (delivered, token) / (nack) from the
/// test are relayed to the router as the real receivers send them.
struct receiver_state {
  caf::actor router;
  static inline const char* name = "test.receiver";
};

caf::behavior receiver(caf::stateful_actor<receiver_state>* self, caf::actor test, std::string name,
                       bool auto_ack) {
  auto on = [self, test, name, auto_ack](const std::string& input, const std::string& body,
                                         std::uint64_t token) {
    self->state.router = caf::actor_cast<caf::actor>(self->current_sender());
    // Acknowledged before the test hears of it: what the test asks the router
    // next is queued behind the acknowledgement.
    if (auto_ack)
      self->send(self->state.router, atoms::delivered::value, name, token);
    self->send(test, name, input, body, token);
  };
  return {
    [on](atoms::input, const std::string& input, const message& m, std::uint64_t token) {
      on(input, std::string{m.body()}, token);
    },
    [on](atoms::route_msg, const routed_message& rm, std::uint64_t token) {
      on("", std::string{rm.msg.body()}, token);
    },
    // Relayed for the test; the reply tells it the router has it queued.
    [self, name](atoms::delivered, std::uint64_t token) {
      self->send(self->state.router, atoms::delivered::value, name, token);
      return true;
    },
    [self, name](atoms::nack) {
      self->send(self->state.router, atoms::nack::value, name);
      return true;
    },
    [](atoms::resume) {},
    // As a module host: an acknowledgement counting the messages it sent, and
    // a message it sends.
    [self, name](atoms::delivered, std::uint64_t token, std::uint64_t sent) {
      self->send<caf::message_priority::high>(self->state.router, atoms::delivered::value, name, token, sent);
      return true;
    },
    [self](atoms::route_msg, routed_message& rm) {
      self->send(self->state.router, atoms::route_msg::value, std::move(rm));
      return true;
    },
  };
}

struct fixture : canopy::unit_test::actor_fixture {
  canopy::unit_test::temp_dir dir{"canopy-router"};
  manual_clock clk;
  std::shared_ptr<message_store> store;
  router_config rc;

  fixture() {
    open_store();
    rc.clk = &clk;
    rc.commit_interval = 0us;  // commit when the mailbox drains: deterministic enough
  }
  std::vector<caf::actor> spawned;  ///< stopped first: routers and receivers hold each other

  ~fixture() {
    for (auto& a : spawned)
      caf::anon_send_exit(a, caf::exit_reason::user_shutdown);
    shutdown();
  }

  void open_store(std::int64_t max_bytes = 0) {
    store.reset();
    message_store_options o;
    o.wall_clock = &clk;
    o.max_bytes = max_bytes;
    auto s = message_store::open(dir.path, o);
    REQUIRE(s.ok());
    store = std::move(*s);
  }

  caf::actor router() {
    rc.store = store;
    return spawned.emplace_back(spawn_router(*sys, rc));
  }

  caf::actor make_receiver(const std::string& name, bool auto_ack = true) {
    return spawned.emplace_back(sys->spawn(receiver, caf::actor{*self}, name, auto_ack));
  }

  /// Sends bodies "1".."n" from module a's output "out" to `r` and returns the
  /// n deliveries that follow.
  std::vector<got> send_and_take(caf::actor r, int n) {
    for (int i = 1; i <= n; ++i)
      send(r, "a", "out", std::to_string(i));
    std::vector<got> out;
    for (int i = 0; i < n; ++i)
      out.push_back(next());
    return out;
  }

  /// A receiver for module `name`, announced to router `r` as its live instance.
  caf::actor up(caf::actor r, const std::string& name, bool auto_ack = true) {
    auto a = make_receiver(name, auto_ack);
    (*self)->send(r, atoms::module_up::value, name, a);
    return a;
  }

  void set_routes(caf::actor r, std::vector<route_spec> specs, std::uint32_t store_ttl = 7200) {
    int i = 0;
    for (auto& s : specs)
      s.name = "r" + std::to_string(i++);
    auto t = compile_routes(specs, store_ttl);
    REQUIRE(t.ok());
    (*self)->send(r, atoms::set_routes::value, *t);
  }

  node_metrics metrics(caf::actor r) {
    node_metrics out;
    (*self)->request(r, 5s, atoms::stats::value).receive([&](node_metrics& m) { out = std::move(m); },
                                                         [](caf::error&) { FAIL("no metrics"); });
    return out;
  }

  std::int64_t queue_length(caf::actor r, const std::string& ep, int prio = 0) {
    for (auto& q : metrics(r).queues)
      if (q.endpoint == ep && q.priority == prio)
        return q.length;
    return 0;
  }

  void send(caf::actor r, const std::string& module, const std::string& output, const std::string& body) {
    (*self)->send(r, atoms::route_msg::value,
                  routed_message{message_builder{}.body(body).build(), "dev", module, output});
  }

  got next(std::chrono::milliseconds wait = 5s) {
    got g;
    bool ok = false;
    (*self)->receive(
      [&](const std::string& rcv, const std::string& input, const std::string& body, std::uint64_t token) {
        g = got{rcv, input, body, token};
        ok = true;
      },
      caf::after(wait) >> [] {});
    if (!ok)
      FAIL("nothing delivered");
    return g;
  }

  bool nothing(std::chrono::milliseconds wait = 100ms) {
    bool none = true;
    (*self)->receive([&](const std::string&, const std::string&, const std::string&, std::uint64_t) { none = false; },
                     caf::after(wait) >> [] {});
    return none;
  }

  void stop(caf::actor a) {
    (*self)->monitor(a);
    (*self)->send_exit(a, caf::exit_reason::user_shutdown);
    (*self)->receive([](const caf::down_msg&) {});
  }

  /// Has `rcv` acknowledge (or nack) as a real receiver does; returns once the
  /// router has it in its mailbox.
  template <class... Ts>
  void tell(caf::actor rcv, Ts... xs) {
    (*self)->request(rcv, 5s, xs...).receive([](bool) {}, [](caf::error&) { FAIL("receiver gone"); });
  }

  std::string db() const { return dir.path + "/" + message_store::file_name; }
};

/// Polls `pred` every 10 ms until it holds or `limit` passed.
bool wait_for(const std::function<bool()>& pred, std::chrono::milliseconds limit) {
  for (auto waited = 0ms; waited < limit; waited += 10ms) {
    if (pred())
      return true;
    std::this_thread::sleep_for(10ms);
  }
  return pred();
}

route_spec rs(std::string text, int priority = 0, std::uint32_t ttl = 0) {
  return route_spec{"", std::move(text), priority, ttl};
}

const std::string to_b = R"(FROM /messages/modules/a/outputs/out INTO BrokeredEndpoint("/modules/b/inputs/in"))";
const std::string ep_b = "/modules/b/inputs/in";

}  // namespace

TEST_CASE("router: messages follow matching routes to module inputs and $upstream") {
  fixture f;
  f.rc.upstream = f.make_receiver("$upstream");
  auto r = f.router();
  f.set_routes(r, {rs(to_b), rs("FROM /messages/modules/b/* INTO $upstream")});
  f.up(r, "b");
  f.send(r, "a", "out", "1");
  auto g = f.next();
  CHECK(g.receiver == "b");
  CHECK(g.input == "in");
  CHECK(g.body == "1");
  f.send(r, "b", "x", "2");
  g = f.next();
  CHECK(g.receiver == "$upstream");
  CHECK(g.body == "2");
  f.send(r, "c", "x", "3");  // no route
  auto m = f.metrics(r);
  CHECK(m.received == 3);
  CHECK(m.sent == 2);
  CHECK(m.dropped_no_route == 1);
  CHECK(f.nothing());
}

TEST_CASE("router: a message routed to several endpoints is stored once") {
  fixture f;
  auto r = f.router();
  f.set_routes(r, {rs(to_b), rs(R"(FROM /messages/modules/a/* INTO BrokeredEndpoint("/modules/c/inputs/in"))"),
                   rs("FROM /messages/* INTO $upstream")});
  f.send(r, "a", "out", "fan");
  auto m = f.metrics(r);  // flushes
  CHECK(f.store->counters().appended == 1);
  CHECK(f.store->counters().queued == 3);
  CHECK(canopy::unit_test::query_int(f.db(), canopy::unit_test::count_stored_messages) == 1);
  CHECK(canopy::unit_test::query_int(f.db(), "SELECT count(*) FROM queue") == 3);
  REQUIRE(m.queues.size() == 3);
  for (auto& q : m.queues)
    CHECK(q.length == 1);
}

TEST_CASE("router: a message acknowledged before its commit is never written; one that is not, is") {
  fixture f;
  f.rc.commit_interval = std::chrono::hours(1);  // commits only when told
  auto r = f.router();
  f.set_routes(r, {rs(to_b)});
  auto b = f.up(r, "b", false);
  f.send(r, "a", "out", "1");
  f.send(r, "a", "out", "2");
  auto g1 = f.next();
  auto g2 = f.next();
  CHECK(g1.body == "1");
  CHECK(g2.body == "2");
  f.tell(b, atoms::delivered::value, g1.token);  // only the first
  auto m = f.metrics(r);  // flushes: "2" must be stored, "1" not
  CHECK(f.store->counters().appended == 1);
  CHECK(m.sent == 1);
  CHECK(f.queue_length(r, ep_b) == 1);
  f.tell(b, atoms::delivered::value, g2.token);
  m = f.metrics(r);
  CHECK(m.sent == 2);
  CHECK(f.store->checkpoint(ep_b, 0) == 1);
  CHECK(f.queue_length(r, ep_b) == 0);
  CHECK(canopy::unit_test::query_int(f.db(), canopy::unit_test::count_stored_messages) == 0);
}

TEST_CASE("router: a message handed to $upstream waits up to upstream_hold for its acknowledgement, even "
          "while its sender waits (injected clock)") {
  fixture f;
  f.rc.commit_interval = 2ms;  // timed flushes (real time); ages on the manual clock
  f.rc.upstream_hold = 20ms;
  auto up = f.make_receiver("$upstream", false);
  f.rc.upstream = up;
  auto r = f.router();
  f.set_routes(r, {rs("FROM /messages/* INTO $upstream")});
  const auto stored = [&] {
    return canopy::unit_test::query_int(f.db(), canopy::unit_test::count_stored_messages);
  };
  auto inject = [&](const std::string& body) {
    return (*f.self)->request(r, 5s, atoms::inject::value,
                              routed_message{message_builder{}.body(body).build(), "dev", "", ""});
  };
  // Acknowledged within the hold: answered, never written.
  auto h1 = inject("1");
  auto g1 = f.next();
  CHECK(g1.body == "1");
  std::this_thread::sleep_for(50ms);  // many timed flushes, no time passes on the clock
  CHECK(stored() == 0);
  f.tell(up, atoms::delivered::value, g1.token);
  std::uint64_t targets = 0;
  h1.receive([&](std::uint64_t n) { targets = n; }, [](caf::error&) { FAIL("refused"); });
  CHECK(targets == 1);
  CHECK(stored() == 0);
  // Not acknowledged within the hold: written, and its sender answered.
  auto h2 = inject("2");
  auto g2 = f.next();
  CHECK(g2.body == "2");
  f.clk.advance(25ms);
  targets = 0;
  h2.receive([&](std::uint64_t n) { targets = n; }, [](caf::error&) { FAIL("not answered"); });
  CHECK(targets == 1);
  CHECK(stored() == 1);
  // A message to a module input is not held: its waiting sender is answered
  // after the next commit, unacknowledged.
  f.set_routes(r, {rs("FROM /messages/* INTO $upstream"), rs(to_b)});
  auto b = f.up(r, "b", false);
  (*f.self)->request(r, 5s, atoms::inject::value,
                     routed_message{message_builder{}.body("3").build(), "", "a", "out"})
    .receive([&](std::uint64_t n) { targets = n; }, [](caf::error&) { FAIL("refused"); });
  CHECK(targets == 2);
  CHECK(stored() == 2);
}

TEST_CASE("router: a sender whose message a module took is answered only once the module's outputs are "
          "durable, whatever the upstream_hold (injected clock)") {
  fixture f;
  f.rc.commit_interval = 2ms;
  f.rc.upstream_hold = std::chrono::hours(1);
  auto up = f.make_receiver("$upstream", false);  // never acknowledges
  f.rc.upstream = up;
  auto r = f.router();
  f.set_routes(r, {rs(to_b), rs("FROM /messages/modules/b/* INTO $upstream")});
  auto b = f.up(r, "b", false);
  bool answered = false;
  auto h = (*f.self)->request(r, 5s, atoms::inject::value,
                              routed_message{message_builder{}.body("in").build(), "dev", "a", "out"});
  auto g = f.next();
  CHECK(g.body == "in");
  // b sends its output, then acknowledges the input: the output goes to
  // $upstream, which holds it unacknowledged.
  f.tell(b, atoms::route_msg::value, routed_message{message_builder{}.body("out").build(), "dev", "b", "o"});
  f.tell(b, atoms::delivered::value, g.token, std::uint64_t{1});
  CHECK(f.next().body == "out");
  h.receive([&](std::uint64_t) { answered = true; }, [](caf::error&) { FAIL("refused"); });
  CHECK(answered);
  // Answered: the output is in the file (the input, acknowledged in time, need not be).
  CHECK(canopy::unit_test::query_int(f.db(), canopy::unit_test::count_stored_messages) >= 1);
}

TEST_CASE("router: a stored input's checkpoint moves only once what its module sent before acknowledging it "
          "is stored (injected clock)") {
  fixture f;
  f.rc.commit_interval = 2ms;  // timed flushes (real time); ages on the manual clock
  auto up = f.make_receiver("$upstream", false);  // never acknowledges
  f.rc.upstream = up;
  auto r = f.router();
  f.set_routes(r, {rs(to_b), rs("FROM /messages/modules/b/* INTO $upstream")});
  auto b = f.up(r, "b", false);
  const auto stored = [&] {
    return canopy::unit_test::query_int(f.db(), canopy::unit_test::count_stored_messages);
  };
  f.send(r, "a", "out", "in");
  auto g = f.next();
  f.clk.advance(10ms);  // "in" waited a whole commit interval: the next timed flush stores it
  REQUIRE(wait_for([&] { return stored() == 1; }, 5000ms));
  // b sends its output (young: it waits for a later commit), then
  // acknowledges "in": the checkpoint that drops "in" must not move before
  // "out" is stored, whatever the flushes that come meanwhile.
  f.tell(b, atoms::route_msg::value, routed_message{message_builder{}.body("out").build(), "dev", "b", "o"});
  f.tell(b, atoms::delivered::value, g.token, std::uint64_t{1});
  CHECK(f.next().body == "out");
  for (int i = 0; i < 20; ++i) {
    CHECK(stored() >= 1);  // "in", or "out", or both: never neither
    std::this_thread::sleep_for(5ms);
  }
  // Once "out" is stored (it waited its commit interval), the checkpoint
  // moves past "in".
  f.clk.advance(10ms);
  CHECK(f.metrics(r).sent == 1);  // (stats commits what waits, then the checkpoint moves)
  CHECK(f.store->checkpoint(ep_b, 0) > 0);
  CHECK(stored() == 1);  // "out"
}

TEST_CASE("router: unacknowledged deliveries go again, in order, to the next instance") {
  fixture f;
  auto r = f.router();
  f.set_routes(r, {rs(to_b)});
  auto b1 = f.up(r, "b", false);
  auto first = f.send_and_take(r, 5);
  f.tell(b1, atoms::delivered::value, first[1].token);  // 1 and 2 done
  CHECK(f.metrics(r).sent == 2);
  f.stop(b1);  // crashes with 3, 4, 5 unacknowledged
  f.up(r, "b");
  for (int i = 3; i <= 5; ++i)
    CHECK(f.next().body == std::to_string(i));
  CHECK(f.nothing());
  auto m = f.metrics(r);
  CHECK(m.sent == 5);
  CHECK(m.redelivered == 3);
  CHECK(f.queue_length(r, ep_b) == 0);
}

TEST_CASE("router: a receiver never has more than its window unacknowledged") {
  fixture f;
  f.rc.receiver_window = 3;
  auto r = f.router();
  f.set_routes(r, {rs(to_b)});
  auto b = f.up(r, "b", false);
  for (int i = 1; i <= 7; ++i)
    f.send(r, "a", "out", std::to_string(i));
  std::vector<got> g;
  for (int i = 0; i < 3; ++i)
    g.push_back(f.next());
  CHECK(f.nothing());
  f.tell(b, atoms::delivered::value, g[2].token);
  for (int i = 4; i <= 6; ++i)
    CHECK(f.next().body == std::to_string(i));
  CHECK(f.nothing());
}

TEST_CASE("router: a backlog beyond the memory window waits on disk and drains in order") {
  fixture f;
  f.rc.lane_window = 8;
  auto r = f.router();
  f.set_routes(r, {rs(to_b)});
  for (int i = 1; i <= 100; ++i)
    f.send(r, "a", "out", std::to_string(i));
  CHECK(f.queue_length(r, ep_b) == 100);
  CHECK(f.store->counters().appended == 100);
  f.up(r, "b");
  for (int i = 1; i <= 100; ++i)
    REQUIRE(f.next().body == std::to_string(i));
  CHECK(f.nothing());
  CHECK(f.queue_length(r, ep_b) == 0);
  CHECK(canopy::unit_test::query_int(f.db(), canopy::unit_test::count_stored_messages) == 0);
}

TEST_CASE("router: a restarted router resumes from the checkpoints and counts re-deliveries") {
  fixture f;
  auto r = f.router();
  f.set_routes(r, {rs(to_b)});
  auto b = f.up(r, "b", false);
  auto g = f.send_and_take(r, 6);
  CHECK(f.metrics(r).queues.at(0).length == 6);  // all committed (no acks yet)
  f.tell(b, atoms::delivered::value, g[1].token);
  CHECK(f.metrics(r).sent == 2);
  f.stop(r);
  f.stop(b);
  // A new router on the same store: 3..6 were handed over before; they come
  // again and are counted.
  auto r2 = f.router();
  f.set_routes(r2, {rs(to_b)});
  f.up(r2, "b");
  for (int i = 3; i <= 6; ++i)
    CHECK(f.next().body == std::to_string(i));
  CHECK(f.nothing());
  auto m = f.metrics(r2);
  CHECK(m.redelivered == 4);
  CHECK(m.sent == 4);
}

TEST_CASE("router: more urgent lanes go first, and a less urgent one is not starved") {
  fixture f;
  f.rc.receiver_window = 1;
  f.rc.starvation_limit = 3;
  auto r = f.router();
  f.set_routes(r, {rs(R"(FROM /messages/modules/a/outputs/low INTO BrokeredEndpoint("/modules/b/inputs/in"))", 5),
                   rs(R"(FROM /messages/modules/a/outputs/high INTO BrokeredEndpoint("/modules/b/inputs/in"))", 0)});
  for (int i = 0; i < 10; ++i)
    f.send(r, "a", "low", "L" + std::to_string(i));
  for (int i = 0; i < 10; ++i)
    f.send(r, "a", "high", "H" + std::to_string(i));
  f.metrics(r);  // everything stored before the receiver comes
  auto b = f.up(r, "b", false);
  std::string order;
  for (int i = 0; i < 20; ++i) {
    auto g = f.next();
    order += g.body.substr(0, 1);
    f.tell(b, atoms::delivered::value, g.token);
  }
  // The high lane goes first; the low one gets a turn after being passed over
  // 3 times in a row; each lane stays in order.
  CHECK(order == "HHHLHHHLHHHLHLLLLLLL");
}

TEST_CASE("router: expired messages are dropped and counted (injected clock)") {
  fixture f;
  f.rc.lane_window = 4;
  f.rc.expire_interval = 1000ms;
  auto r = f.router();
  f.set_routes(r, {rs(to_b, 0, 10), rs(R"(FROM /messages/modules/a/outputs/keep INTO BrokeredEndpoint("/modules/b/inputs/in"))", 1, 100)});
  for (int i = 0; i < 10; ++i)
    f.send(r, "a", "out", "x" + std::to_string(i));
  f.send(r, "a", "keep", "kept");
  f.metrics(r);
  f.clk.advance(11s);  // past the 10 s TTL, not the 100 s one
  f.up(r, "b");
  CHECK(f.next().body == "kept");
  CHECK(f.nothing());
  auto m = f.metrics(r);
  CHECK(m.dropped_ttl_expiry == 10);
  CHECK(f.queue_length(r, ep_b, 0) == 0);
  CHECK(f.queue_length(r, ep_b, 1) == 0);
}

TEST_CASE("router: a sender that waits is answered after the commit; a full store refuses") {
  fixture f;
  f.open_store(64 * 1024);
  auto r = f.router();
  f.set_routes(r, {rs(to_b)});
  std::uint64_t targets = 0;
  (*f.self)->request(r, 5s, atoms::inject::value,
                     routed_message{message_builder{}.body("durable").build(), "", "a", "out"})
    .receive([&](std::uint64_t n) { targets = n; }, [](caf::error&) { FAIL("refused"); });
  CHECK(targets == 1);
  // Answered: it is in the file (read through another connection).
  CHECK(canopy::unit_test::query_int(f.db(), canopy::unit_test::count_stored_messages) == 1);
  (*f.self)->request(r, 5s, atoms::inject::value,
                     routed_message{message_builder{}.body("x").build(), "", "nobody", "out"})
    .receive([&](std::uint64_t n) { targets = n; }, [](caf::error&) { FAIL("refused"); });
  CHECK(targets == 0);
  // Fill it: 4 KiB bodies until refused.
  std::string refused;
  const std::string big(4096, 'b');
  for (int i = 0; i < 100 && refused.empty(); ++i)
    (*f.self)->request(r, 5s, atoms::inject::value,
                       routed_message{message_builder{}.body(big).build(), "", "a", "out"})
      .receive([](std::uint64_t) {}, [&](caf::error& e) { refused = f.sys->render(e); });
  CHECK_THAT(refused, Catch::Contains("store full"));
  CHECK(f.metrics(r).dropped_store_full >= 1);
}

TEST_CASE("router: a batch of senders is answered once all of it is durable, per message and in order") {
  fixture f;
  f.open_store(64 * 1024);
  auto r = f.router();
  f.set_routes(r, {rs(to_b)});
  std::vector<routed_message> batch;
  for (int i = 0; i < 5; ++i)
    batch.push_back(routed_message{message_builder{}.body("m" + std::to_string(i)).build(), "",
                                   i == 2 ? "nobody" : "a", "out"});
  std::vector<std::uint64_t> targets;
  (*f.self)->request(r, 5s, atoms::inject::value, std::move(batch))
    .receive([&](std::vector<std::uint64_t>& t) { targets = t; }, [](caf::error&) { FAIL("refused"); });
  CHECK(targets == std::vector<std::uint64_t>{1, 1, 0, 1, 1});
  // Answered: all four routed ones are in the file.
  CHECK(canopy::unit_test::query_int(f.db(), canopy::unit_test::count_stored_messages) == 4);
  // A batch of which nothing routes is answered at once.
  std::vector<routed_message> none{routed_message{message_builder{}.body("x").build(), "", "nobody", "out"}};
  (*f.self)->request(r, 5s, atoms::inject::value, std::move(none))
    .receive([&](std::vector<std::uint64_t>& t) { targets = t; }, [](caf::error&) { FAIL("refused"); });
  CHECK(targets == std::vector<std::uint64_t>{0});
}

TEST_CASE("router: $upstream that fails is retried after a backoff (injected clock)") {
  fixture f;
  f.rc.retry_base = 1000ms;
  auto up = f.make_receiver("$upstream", false);
  f.rc.upstream = up;
  auto r = f.router();
  f.set_routes(r, {rs("FROM /messages/* INTO $upstream")});
  f.send(r, "a", "out", "u");
  CHECK(f.next().body == "u");
  f.tell(up, atoms::nack::value);
  CHECK(f.nothing());
  f.clk.advance(999ms);
  CHECK(f.nothing());
  f.clk.advance(1ms);
  auto g = f.next();
  CHECK(g.body == "u");
  f.tell(up, atoms::delivered::value, g.token);
  auto m = f.metrics(r);
  CHECK(m.sent == 1);
  CHECK(m.redelivered == 1);
}

TEST_CASE("router: with a commit per message, a sender is told durable only if it is stored") {
  fixture f;
  f.open_store(64 * 1024);
  f.rc.commit_batch = 1;
  auto r = f.router();
  f.set_routes(r, {rs(to_b)});
  const std::string big(4096, 'b');
  int told_durable = 0, refused = 0;
  for (int i = 0; i < 60; ++i)
    (*f.self)->request(r, 5s, atoms::inject::value,
                       routed_message{message_builder{}.body(big).build(), "", "a", "out"})
      .receive([&](std::uint64_t) { ++told_durable; }, [&](caf::error&) { ++refused; });
  CHECK(refused > 0);
  CHECK(told_durable == canopy::unit_test::query_int(f.db(), canopy::unit_test::count_stored_messages));
}

TEST_CASE("router: a store that fails (not full) keeps the batch and retries (injected clock)") {
  fixture f;
  f.rc.commit_batch = 1;
  auto r = f.router();
  f.set_routes(r, {rs(to_b)});
  // Another connection holds the write lock: appends fail with SQLITE_BUSY
  // after the store's busy timeout.
  sqlite3* other = nullptr;
  REQUIRE(sqlite3_open(f.db().c_str(), &other) == SQLITE_OK);
  REQUIRE(sqlite3_exec(other, "BEGIN IMMEDIATE", nullptr, nullptr, nullptr) == SQLITE_OK);
  auto answer = (*f.self)->request(r, caf::infinite, atoms::inject::value,
                                   routed_message{message_builder{}.body("kept").build(), "", "a", "out"});
  // Wait until the first attempt failed (the retry timer is armed), then free the lock.
  REQUIRE(wait_for([&] { return f.clk.pending() >= 2; }, 10s));
  REQUIRE(sqlite3_exec(other, "ROLLBACK", nullptr, nullptr, nullptr) == SQLITE_OK);
  sqlite3_close(other);
  f.clk.advance(1s);
  std::uint64_t n = 0;
  answer.receive([&](std::uint64_t targets) { n = targets; }, [](caf::error&) { FAIL("refused"); });
  CHECK(n == 1);
  CHECK(canopy::unit_test::query_int(f.db(), canopy::unit_test::count_stored_messages) == 1);
  CHECK(f.metrics(r).dropped_store_full == 0);
}

TEST_CASE("router: a stored lane that names no module input does not stop the router") {
  fixture f;
  const route_target t{"legacy-endpoint", 0, {}};
  const append_entry e{message_builder{}.body("old").build(), {}, std::span<const route_target>(&t, 1)};
  REQUIRE(f.store->append(std::span<const append_entry>(&e, 1)).ok());
  auto r = f.router();
  f.set_routes(r, {rs(to_b)});
  f.send(r, "a", "out", "new");
  auto m = f.metrics(r);
  CHECK(m.received == 1);
  bool legacy_listed = false;
  for (auto& q : m.queues)
    legacy_listed = legacy_listed || (q.endpoint == "legacy-endpoint" && q.length == 1);
  CHECK(legacy_listed);
}

TEST_CASE("router: re-deliveries after a restart count only what was handed over") {
  fixture f;
  f.rc.receiver_window = 2;
  auto r = f.router();
  f.set_routes(r, {rs(to_b)});
  for (int i = 1; i <= 6; ++i)
    f.send(r, "a", "out", std::to_string(i));
  f.metrics(r);  // all stored
  auto b = f.up(r, "b", false);
  auto g1 = f.next();
  f.next();
  f.tell(b, atoms::delivered::value, g1.token + 1);  // 1 and 2 done
  CHECK(f.next().body == "3");
  CHECK(f.next().body == "4");  // handed over, never acknowledged; 5 and 6 never handed
  CHECK(f.metrics(r).sent == 2);
  f.stop(r);
  f.stop(b);
  auto r2 = f.router();
  f.set_routes(r2, {rs(to_b)});
  f.up(r2, "b");
  for (int i = 3; i <= 6; ++i)
    CHECK(f.next().body == std::to_string(i));
  CHECK(f.metrics(r2).redelivered == 2);
}

TEST_CASE("router: an acknowledgement is held until the outputs sent before it are routed") {
  fixture f;
  auto r = f.router();
  f.set_routes(r, {rs(to_b), rs("FROM /messages/modules/b/* INTO $upstream")});
  auto b = f.up(r, "b", false);
  f.send(r, "a", "out", "in1");
  auto g = f.next();
  // b says: "done with in1, after sending 1 message" — which the router has
  // not seen yet (it overtook it).
  f.tell(b, atoms::delivered::value, g.token, std::uint64_t{1});
  CHECK(f.metrics(r).sent == 0);
  f.tell(b, atoms::route_msg::value, routed_message{message_builder{}.body("out1").build(), "dev", "b", "o"});
  auto m = f.metrics(r);
  CHECK(m.sent == 1);
  CHECK(m.received == 2);
}
