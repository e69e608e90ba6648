#include "runtime/store_actor.hpp"

#include "actor_fixture.hpp"
#include "runtime/atoms.hpp"
#include "runtime/router.hpp"
#include "temp_dir.hpp"

#include <caf/all.hpp>
#include <catch2/catch.hpp>

#include <mutex>
#include <thread>

using namespace canopy;
using namespace std::chrono_literals;

namespace {

struct fixture : canopy::unit_test::actor_fixture {
  canopy::unit_test::temp_dir dir;
  manual_clock clk;

  ~fixture() { shutdown(); }  // the actors go before the dir and the clock

  std::shared_ptr<node_store> open() {
    auto s = node_store::open(dir.path, &clk);
    REQUIRE(s.ok());
    return std::shared_ptr<node_store>{std::move(*s)};
  }
};

routed_message upstream_msg(int i) {
  return routed_message{message_builder{}.body(std::to_string(i)).build(), "dev", "filter", "out"};
}

}  // namespace

TEST_CASE("$upstream messages are stored in order, and an orderly stop writes what is batched") {
  fixture f;
  auto store = f.open();
  auto a = spawn_store_actor(*f.sys, store, f.clk);
  (*f.self)->monitor(a);
  // Many messages, then the stop right behind them in the same mailbox.
  for (int i = 0; i < 5000; ++i)
    (*f.self)->send(a, atoms::route_msg::value, upstream_msg(i), std::uint64_t(i + 1));
  (*f.self)->send_exit(a, caf::exit_reason::user_shutdown);
  (*f.self)->receive([](caf::down_msg&) {}, caf::after(10s) >> [] { FAIL("the store actor did not stop"); });
  store.reset();
  auto reopened = f.open();
  auto recs = reopened->read_upstream(0, 10000);
  REQUIRE(recs.ok());
  REQUIRE(recs->size() == 5000);
  for (int i = 0; i < 5000; ++i) {
    CHECK((*recs)[i].msg.body() == std::to_string(i));
    CHECK((*recs)[i].source_module == "filter");
  }
}

TEST_CASE("$upstream messages are acknowledged to their router after the commit that holds them") {
  fixture f;
  auto store = f.open();
  auto a = spawn_store_actor(*f.sys, store, f.clk);
  for (int i = 0; i < 100; ++i)
    (*f.self)->send(a, atoms::route_msg::value, upstream_msg(i), std::uint64_t(i + 1));
  std::uint64_t acked = 0;
  while (acked < 100)
    (*f.self)->receive(
      [&](atoms::delivered, const std::string& rcv, std::uint64_t token) {
        CHECK(rcv == "$upstream");
        CHECK(token > acked);
        acked = token;
        // Everything acknowledged is in the file.
        auto last = store->last_upstream_seq();
        REQUIRE(last.ok());
        CHECK(*last >= static_cast<std::int64_t>(token));
      },
      caf::after(5s) >> [&] { FAIL("no acknowledgement"); });
  caf::anon_send_exit(a, caf::exit_reason::user_shutdown);
}

TEST_CASE("monitor subscribers get the newest backlog, then new messages") {
  fixture f;
  auto store = f.open();
  auto a = spawn_store_actor(*f.sys, store, f.clk);
  for (int i = 0; i < 10; ++i)
    (*f.self)->send(a, atoms::route_msg::value, upstream_msg(i), std::uint64_t(i + 1));
  auto got = std::make_shared<std::vector<std::string>>();
  auto mtx = std::make_shared<std::mutex>();
  auto cb = std::make_shared<std::function<void(upstream_record)>>([got, mtx](upstream_record r) {
    std::lock_guard<std::mutex> g{*mtx};
    got->emplace_back(r.msg.body());
  });
  (*f.self)->send(a, atoms::subscribe::value, std::uint64_t{1}, std::int64_t{0}, std::uint64_t{3},
                  upstream_callback{cb});
  (*f.self)->send(a, atoms::route_msg::value, upstream_msg(10), std::uint64_t{11});
  for (int i = 0; i < 500; ++i) {
    {
      std::lock_guard<std::mutex> g{*mtx};
      if (got->size() >= 4)
        break;
    }
    std::this_thread::sleep_for(10ms);
  }
  std::lock_guard<std::mutex> g{*mtx};
  CHECK(*got == std::vector<std::string>{"7", "8", "9", "10"});
  caf::anon_send_exit(a, caf::exit_reason::user_shutdown);
}
