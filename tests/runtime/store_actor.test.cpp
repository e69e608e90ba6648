#include "runtime/store_actor.hpp"

#include "actor_fixture.hpp"
#include "runtime/atoms.hpp"
#include "runtime/router.hpp"
#include "temp_dir.hpp"

#include <caf/all.hpp>
#include <catch2/catch.hpp>
#include <sqlite3.h>

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

routed_message upstream_msg(int i, std::string device = "dev") {
  return routed_message{message_builder{}.body(std::to_string(i)).build(), std::move(device), "filter",
                        "out"};
}

/// Asks the store actor (query, device, since_ms, after_seq, limit) and waits
/// for the answer: the records, or the error.
expected<std::vector<upstream_record>> query(fixture& f, const caf::actor& a, std::string device,
                                             std::int64_t since_ms, std::int64_t after_seq,
                                             std::uint64_t limit) {
  expected<std::vector<upstream_record>> out = make_error(errc::failed, "no answer");
  (*f.self)
    ->request(a, 5s, atoms::query::value, std::move(device), since_ms, after_seq, limit)
    .receive([&](std::vector<upstream_record>& recs) { out = std::move(recs); },
             [&](caf::error& err) {
               std::string text = caf::to_string(err);
               if (err.context().match_elements<std::string>())
                 text = err.context().get_as<std::string>(0);
               out = make_error(errc::failed, std::move(text));
               CHECK(err == caf::sec::runtime_error);
             });
  return out;
}

std::vector<std::string> bodies(const std::vector<upstream_record>& recs) {
  std::vector<std::string> out;
  for (const auto& r : recs)
    out.emplace_back(r.msg.body());
  return out;
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
    CHECK((*recs)[i].source_device == "dev");
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
  // Every record, from the backlog (read back from the file) or live, names its device.
  auto cb = std::make_shared<std::function<void(upstream_record)>>([got, mtx](upstream_record r) {
    std::lock_guard<std::mutex> g{*mtx};
    got->emplace_back(r.source_device + ":" + std::string(r.msg.body()));
  });
  (*f.self)->send(a, atoms::subscribe::value, std::uint64_t{1}, std::int64_t{0}, std::uint64_t{3},
                  upstream_callback{cb});
  (*f.self)->send(a, atoms::route_msg::value, upstream_msg(10, "dev-b"), std::uint64_t{11});
  for (int i = 0; i < 500; ++i) {
    {
      std::lock_guard<std::mutex> g{*mtx};
      if (got->size() >= 4)
        break;
    }
    std::this_thread::sleep_for(10ms);
  }
  std::lock_guard<std::mutex> g{*mtx};
  CHECK(*got == std::vector<std::string>{"dev:7", "dev:8", "dev:9", "dev-b:10"});
  caf::anon_send_exit(a, caf::exit_reason::user_shutdown);
}

TEST_CASE("queries answer by device, time and seq, including what is still batched") {
  fixture f;
  auto store = f.open();
  auto a = spawn_store_actor(*f.sys, store, f.clk);
  // No wait between the messages and the query: the query writes the batch first.
  for (int i = 0; i < 6; ++i)
    (*f.self)->send(a, atoms::route_msg::value, upstream_msg(i, i % 2 ? "dev-b" : "dev-a"),
                    std::uint64_t(i + 1));
  auto first = query(f, a, "dev-a", 0, 0, 100);
  REQUIRE(first.ok());
  CHECK(bodies(*first) == std::vector<std::string>{"0", "2", "4"});
  const std::int64_t t0 = f.clk.wall_ms();
  for (const auto& r : *first) {
    CHECK(r.source_device == "dev-a");
    CHECK(r.source_module == "filter");
    CHECK(r.output == "out");
    CHECK(r.enqueued_ms == t0);
  }

  f.clk.advance(1min);
  const std::int64_t t1 = f.clk.wall_ms();
  for (int i = 6; i < 10; ++i)
    (*f.self)->send(a, atoms::route_msg::value, upstream_msg(i, i % 2 ? "dev-b" : "dev-a"),
                    std::uint64_t(i + 1));
  auto recent = query(f, a, "dev-b", t1, 0, 100);
  REQUIRE(recent.ok());
  CHECK(bodies(*recent) == std::vector<std::string>{"7", "9"});
  auto everyone = query(f, a, "", t1, 0, 100);
  REQUIRE(everyone.ok());
  CHECK(bodies(*everyone) == std::vector<std::string>{"6", "7", "8", "9"});
  auto page = query(f, a, "", 0, (*first)[1].seq, 3);
  REQUIRE(page.ok());
  CHECK(bodies(*page) == std::vector<std::string>{"3", "4", "5"});
  auto none = query(f, a, "dev-c", 0, 0, 100);
  REQUIRE(none.ok());
  CHECK(none->empty());
  caf::anon_send_exit(a, caf::exit_reason::user_shutdown);
}

TEST_CASE("a query the store cannot answer is an error the requester sees, and the actor lives on") {
  fixture f;
  auto store = f.open();
  auto a = spawn_store_actor(*f.sys, store, f.clk);
  (*f.self)->send(a, atoms::route_msg::value, upstream_msg(1, "dev-a"), std::uint64_t{1});
  REQUIRE(query(f, a, "dev-a", 0, 0, 10).ok());
  // Break the file under the store: the by-device query needs its index.
  sqlite3* db = nullptr;
  REQUIRE(sqlite3_open((f.dir.path + "/canopy.db").c_str(), &db) == SQLITE_OK);
  REQUIRE(sqlite3_exec(db, "DROP INDEX upstream_by_device", nullptr, nullptr, nullptr) == SQLITE_OK);
  sqlite3_close(db);
  auto r = query(f, a, "dev-a", 0, 0, 10);
  REQUIRE_FALSE(r.ok());
  CHECK_THAT(r.err().message, Catch::Contains("upstream_by_device"));
  CHECK_THAT(r.err().message, Catch::Contains(f.dir.path + "/canopy.db"));
  // The actor still answers (and still stores).
  (*f.self)->send(a, atoms::route_msg::value, upstream_msg(2, "dev-a"), std::uint64_t{2});
  auto all = query(f, a, "", 0, 0, 10);
  REQUIRE(all.ok());
  CHECK(bodies(*all) == std::vector<std::string>{"1", "2"});
  caf::anon_send_exit(a, caf::exit_reason::user_shutdown);
}
