#include "actors/parent_link.hpp"

#include "actor_fixture.hpp"
#include "actors/reply_guard.hpp"
#include "gateway/link.hpp"
#include "runtime/atoms.hpp"
#include "runtime/clock.hpp"
#include "runtime/router.hpp"

#include <caf/all.hpp>
#include <catch2/catch.hpp>

#include <atomic>
#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

using namespace canopy;
using namespace std::chrono_literals;

namespace {

/// An uplink that records every call. The test decides when the connection
/// comes up or goes down and answers the calls' reply_fns, all from the test
/// thread. One deliberate wrinkle: while `hold()` is in force, the next
/// report_twins call blocks the actor's thread until release(), so that the
/// test can fill the actor's mailbox and have it read the lot in one go.
class fake_uplink final : public uplink {
  template <class F>
  auto locked(F f) const {
    std::lock_guard<std::mutex> guard{mtx_};
    return f();
  }

 public:
  struct upload_call {
    std::uint64_t gen = 0;
    std::vector<link_envelope> batch;
    reply_fn<std::uint32_t> done;
  };
  struct ping_call {
    std::uint64_t gen = 0;
    reply_fn<std::chrono::microseconds> done;
  };
  struct report_call {
    std::uint64_t gen = 0;
    std::vector<twin_update> updates;
    reply_fn<void> done;
  };

  explicit fake_uplink(canopy::clock& clk) : clk_(clk) {}

  std::uint64_t connect(std::function<void(link_event)> on_event) override {
    std::lock_guard<std::mutex> guard{mtx_};
    on_event_ = std::move(on_event);
    connect_times_.push_back(clk_.now());
    cv_.notify_all();
    return ++gen_;
  }
  void upload(std::uint64_t generation, std::vector<link_envelope> batch, reply_fn<std::uint32_t> done) override {
    std::lock_guard<std::mutex> guard{mtx_};
    uploads_.push_back({generation, std::move(batch), std::move(done)});
    cv_.notify_all();
  }
  void ping(std::uint64_t generation, reply_fn<std::chrono::microseconds> done) override {
    std::lock_guard<std::mutex> guard{mtx_};
    pings_.push_back({generation, std::move(done)});
    cv_.notify_all();
  }
  void report_twins(std::uint64_t generation, std::vector<twin_update> updates, reply_fn<void> done) override {
    std::unique_lock<std::mutex> guard{mtx_};
    reports_.push_back({generation, std::move(updates), std::move(done)});
    if (hold_) {
      held_ = true;
      cv_.notify_all();
      cv_.wait(guard, [this] { return !hold_; });
      held_ = false;
    }
    cv_.notify_all();
  }
  void close() override {
    std::lock_guard<std::mutex> guard{mtx_};
    ++closes_;
    cv_.notify_all();
  }

  // --- the test's side -------------------------------------------------------

  /// Waits (at most 5 s) until `pred` holds under the lock.
  template <class Pred>
  bool wait_for(Pred pred) {
    std::unique_lock<std::mutex> guard{mtx_};
    return cv_.wait_for(guard, 5s, [&] { return pred(); });
  }
  bool wait_connects(std::size_t n) {
    return wait_for([&] { return connect_times_.size() >= n; });
  }
  bool wait_uploads(std::size_t n) {
    return wait_for([&] { return uploads_.size() >= n; });
  }
  bool wait_pings(std::size_t n) {
    return wait_for([&] { return pings_.size() >= n; });
  }
  bool wait_reports(std::size_t n) {
    return wait_for([&] { return reports_.size() >= n; });
  }

  std::size_t connects() const { return locked([&] { return connect_times_.size(); }); }
  canopy::clock::time_point connect_time(std::size_t i) const { return locked([&] { return connect_times_.at(i); }); }
  std::uint64_t gen() const { return locked([&] { return gen_; }); }
  std::size_t uploads() const { return locked([&] { return uploads_.size(); }); }
  std::size_t pings() const { return locked([&] { return pings_.size(); }); }
  std::size_t reports() const { return locked([&] { return reports_.size(); }); }
  int closes() const { return locked([&] { return closes_; }); }

  /// Generation and message bodies of upload call `i`.
  std::uint64_t upload_gen(std::size_t i) const { return locked([&] { return uploads_.at(i).gen; }); }
  std::vector<std::string> upload_bodies(std::size_t i) const {
    return locked([&] {
      std::vector<std::string> out;
      for (auto& e : uploads_.at(i).batch)
        out.emplace_back(e.msg.body());
      return out;
    });
  }
  link_envelope envelope(std::size_t call, std::size_t i) const {
    return locked([&] { return uploads_.at(call).batch.at(i); });
  }
  std::uint64_t ping_gen(std::size_t i) const { return locked([&] { return pings_.at(i).gen; }); }
  report_call report(std::size_t i) {
    std::lock_guard<std::mutex> guard{mtx_};
    auto& r = reports_.at(i);
    return {r.gen, r.updates, std::exchange(r.done, nullptr)};
  }

  /// The connection (the latest connect()) comes up / goes down.
  void fire_up(const std::string& parent = "hub") { fire(link_event{gen(), true, parent, {}}); }
  void fire_down(const std::string& error) { fire(link_event{gen(), false, {}, error}); }
  /// An event of an older (or any) generation.
  void fire(link_event ev) {
    auto fn = locked([&] { return on_event_; });
    REQUIRE(fn);
    fn(std::move(ev));
  }

  /// Answers upload call `i`.
  void answer_upload(std::size_t i, expected<std::uint32_t> r) {
    reply_fn<std::uint32_t> fn;
    {
      std::lock_guard<std::mutex> guard{mtx_};
      fn = std::exchange(uploads_.at(i).done, nullptr);
    }
    REQUIRE(fn);
    fn(std::move(r));
  }
  void answer_ping(std::size_t i, expected<std::chrono::microseconds> r) {
    reply_fn<std::chrono::microseconds> fn;
    {
      std::lock_guard<std::mutex> guard{mtx_};
      fn = std::exchange(pings_.at(i).done, nullptr);
    }
    REQUIRE(fn);
    fn(std::move(r));
  }

  /// The next report_twins call blocks until release(); returns once it does.
  void hold() {
    std::lock_guard<std::mutex> guard{mtx_};
    hold_ = true;
  }
  bool wait_held() {
    return wait_for([&] { return held_; });
  }
  void release() {
    std::lock_guard<std::mutex> guard{mtx_};
    hold_ = false;
    cv_.notify_all();
  }

  /// Drops the recorded callbacks (they hold the actor weakly, and guards).
  void forget_callbacks() {
    std::lock_guard<std::mutex> guard{mtx_};
    on_event_ = nullptr;
    uploads_.clear();
    pings_.clear();
    reports_.clear();
  }

 private:
  canopy::clock& clk_;
  mutable std::mutex mtx_;
  std::condition_variable cv_;
  std::function<void(link_event)> on_event_;
  std::uint64_t gen_ = 0;
  std::vector<canopy::clock::time_point> connect_times_;
  std::vector<upload_call> uploads_;
  std::vector<ping_call> pings_;
  std::vector<report_call> reports_;
  int closes_ = 0;
  bool hold_ = false;
  bool held_ = false;
};

/// What the parent link told the router (the test's scoped actor).
struct router_msg {
  std::string kind;  ///< "module_up" | "delivered" | "nack"
  std::string name;
  std::uint64_t token = 0;
  caf::actor who;
};

/// The answer of a (reported, ...) call, kept past the test body's locals.
struct report_result {
  std::mutex mtx;
  std::optional<expected<void>> r;
};

struct fixture : canopy::unit_test::actor_fixture {
  manual_clock clk;
  fake_uplink fake{clk};
  std::shared_ptr<link_board> board = std::make_shared<link_board>();
  parent_link_config pc;
  caf::actor link;
  std::shared_ptr<std::vector<bool>> states = std::make_shared<std::vector<bool>>();
  std::shared_ptr<std::mutex> states_mtx = std::make_shared<std::mutex>();

  fixture() {
    pc.link = &fake;
    pc.router = [this] { return caf::actor{*self}; };
    pc.clk = &clk;
    pc.board = board;
    pc.parent_id = "hub";
    pc.seed = 42;
    pc.ping_interval = 1h;  // out of the way unless a test wants pings
    pc.ping_timeout = 3h;
    pc.on_state = [states = states, mtx = states_mtx](bool up) {
      std::lock_guard<std::mutex> guard{*mtx};
      states->push_back(up);
    };
  }
  ~fixture() {
    if (link) {
      (*self)->monitor(link);
      (*self)->send_exit(link, caf::exit_reason::kill);
      (*self)->receive([](const caf::down_msg&) {}, caf::after(5s) >> [] {});
      link = caf::actor{};
    }
    // The recorded callbacks hold the actor weakly: let go while the system lives.
    fake.forget_callbacks();
    shutdown();
  }

  /// Spawns the link and waits for its first connect().
  void start() {
    link = spawn_parent_link(*sys, pc);
    REQUIRE(fake.wait_connects(1));
  }

  /// Returns once the link has handled everything sent to it so far, and
  /// what that made it send itself (its flush marker) too.
  void settle() {
    for (int i = 0; i < 3; ++i) {
      bool answered = false;
      (*self)
        ->request(link, 5s, caf::sys_atom::value, caf::get_atom::value, std::string{"info"})
        .receive([&](caf::ok_atom, std::string&, caf::strong_actor_ptr&, std::string&) { answered = true; },
                 [](caf::error&) {});
      REQUIRE(answered);
    }
  }

  /// The next message from the link to the router, if one comes within `wait`.
  std::optional<router_msg> next(std::chrono::milliseconds wait = 5s) {
    std::optional<router_msg> out;
    (*self)->receive(
      [&](atoms::module_up, std::string& name, caf::actor& who) {
        out = router_msg{"module_up", name, 0, who};
      },
      [&](atoms::delivered, std::string& name, std::uint64_t token) {
        out = router_msg{"delivered", name, token, {}};
      },
      [&](atoms::nack, std::string& name) { out = router_msg{"nack", name, 0, {}}; },
      caf::after(wait) >> [] {});
    return out;
  }
  /// Nothing more from the link (after settle()).
  bool quiet() {
    settle();
    auto m = next(0ms);
    if (m)
      UNSCOPED_INFO("unexpected " << m->kind << " " << m->name << " " << m->token);
    return !m;
  }
  /// The next message to the router, which must be a `kind` about "$upstream".
  router_msg expect(const std::string& kind) {
    auto m = next();
    REQUIRE(m);
    CHECK(m->kind == kind);
    CHECK(m->name == "$upstream");
    return *m;
  }
  void expect_delivered(std::uint64_t token) { CHECK(expect("delivered").token == token); }
  void expect_nack() { expect("nack"); }
  void expect_module_up() { CHECK(expect("module_up").who == link); }

  /// Starts the link and brings the first connection up.
  void start_up() {
    start();
    fake.fire_up();
    expect_module_up();
    REQUIRE(fake.wait_pings(1));
  }

  /// The router hands over message `token` (body = the token in decimal).
  void deliver(std::uint64_t token) {
    (*self)->send(link, atoms::route_msg::value,
                  routed_message{message_builder{}.body(std::to_string(token)).build(), "dev-" + std::to_string(token),
                                 "mod", "out"},
                  token);
  }
  /// Delivers `from`..`to` so that the link reads them all before it runs
  /// anything they make it send itself (it is held inside report_twins
  /// meanwhile). Only while the link is up.
  void deliver_at_once(std::uint64_t from, std::uint64_t to) {
    auto reports_before = fake.reports();
    fake.hold();
    (*self)->send(link, atoms::reported::value, std::vector<twin_update>{},
                  guard<void>([](expected<void>) {}));
    REQUIRE(fake.wait_held());
    for (auto t = from; t <= to; ++t)
      deliver(t);
    fake.release();
    REQUIRE(fake.wait_reports(reports_before + 1));
  }

  std::shared_ptr<report_result> report(std::vector<twin_update> updates) {
    auto res = std::make_shared<report_result>();
    (*self)->send(link, atoms::reported::value, std::move(updates), guard<void>([res](expected<void> r) {
                    std::lock_guard<std::mutex> g{res->mtx};
                    res->r = std::move(r);
                  }));
    return res;
  }

  link_metrics snapshot() const { return board->snapshot(clk.wall_ms()); }

  std::vector<bool> state_changes() const {
    std::lock_guard<std::mutex> guard{*states_mtx};
    return *states;
  }

  /// Advances the clock by `d` in steps of `step`, letting the link handle
  /// whatever fell due (and schedule what follows) after each step.
  void advance(canopy::clock::duration d, canopy::clock::duration step) {
    for (canopy::clock::duration done{0}; done < d; done += step) {
      clk.advance(step);
      settle();
    }
  }
};

std::vector<std::string> bodies(std::initializer_list<int> xs) {
  std::vector<std::string> out;
  for (int x : xs)
    out.push_back(std::to_string(x));
  return out;
}

}  // namespace

TEST_CASE_METHOD(fixture, "parent_link: connects at once, before any clock time passes") {
  start();
  settle();
  CHECK(fake.connects() == 1);
  CHECK(fake.connect_time(0) == clk.now());
  CHECK(fake.pings() == 0);
  CHECK(fake.uploads() == 0);
  CHECK(quiet());  // nothing announced before the link is up
  auto m = snapshot();
  CHECK_FALSE(m.up);
  CHECK(m.role == "parent");
  CHECK(m.peer == "hub");
}

TEST_CASE_METHOD(fixture, "parent_link: on link up it announces itself as $upstream and pings") {
  start();
  fake.fire_up("hub");
  expect_module_up();
  REQUIRE(fake.wait_pings(1));
  CHECK(fake.ping_gen(0) == fake.gen());
  settle();
  CHECK(state_changes() == std::vector<bool>{true});
  CHECK(snapshot().up);

  SECTION("an event of an older connection attempt is ignored") {
    fake.fire_down("lost");
    REQUIRE(fake.wait_connects(2));  // the first retry goes at once
    fake.fire(link_event{1, true, "hub", {}});
    CHECK(quiet());
    CHECK_FALSE(snapshot().up);
    fake.fire_up();
    expect_module_up();  // re-announced on every connection
    REQUIRE(fake.wait_pings(2));
    CHECK(fake.ping_gen(1) == 2);
    settle();
    CHECK(state_changes() == std::vector<bool>{true, false, true});
  }
}

TEST_CASE_METHOD(fixture, "parent_link: uploads in batches of at most max_batch_messages, "
                          "at most max_inflight calls outstanding") {
  pc.max_batch_messages = 3;
  pc.max_inflight = 2;
  start_up();
  deliver_at_once(1, 8);
  REQUIRE(fake.wait_uploads(2));
  settle();
  // 1-3 and 4-6 went as soon as each batch was full; 7-8 wait for a credit.
  REQUIRE(fake.uploads() == 2);
  CHECK(fake.upload_bodies(0) == bodies({1, 2, 3}));
  CHECK(fake.upload_bodies(1) == bodies({4, 5, 6}));
  CHECK(fake.upload_gen(0) == fake.gen());
  // Where each message came from travels with it.
  CHECK(fake.envelope(0, 1).device == "dev-2");
  CHECK(fake.envelope(0, 1).module == "mod");
  CHECK(fake.envelope(0, 1).output == "out");
  CHECK(quiet());

  fake.answer_upload(0, std::uint32_t{3});
  expect_delivered(3);
  REQUIRE(fake.wait_uploads(3));
  CHECK(fake.upload_bodies(2) == bodies({7, 8}));
  fake.answer_upload(1, std::uint32_t{3});
  expect_delivered(6);
  fake.answer_upload(2, std::uint32_t{2});
  expect_delivered(8);
  CHECK(quiet());
  CHECK(fake.uploads() == 3);

  SECTION("a lone message goes without waiting for a full batch") {
    deliver(9);
    REQUIRE(fake.wait_uploads(4));
    CHECK(fake.upload_bodies(3) == bodies({9}));
  }
}

TEST_CASE_METHOD(fixture, "parent_link: a batch also ends at max_batch_bytes") {
  pc.max_batch_messages = 100;
  // Each test message encodes to the same size: room for two of them.
  auto one = message_builder{}.body("1").build().encoded().size();
  pc.max_batch_bytes = 2 * one + one / 2;
  pc.max_inflight = 1;
  start_up();
  deliver_at_once(1, 5);
  REQUIRE(fake.wait_uploads(1));
  CHECK(fake.upload_bodies(0) == bodies({1, 2}));
  fake.answer_upload(0, std::uint32_t{2});
  expect_delivered(2);
  REQUIRE(fake.wait_uploads(2));
  CHECK(fake.upload_bodies(1) == bodies({3, 4}));
}

TEST_CASE_METHOD(fixture, "parent_link: the acknowledgement is cumulative and covers only "
                          "the answered prefix of the batches") {
  pc.max_batch_messages = 2;
  pc.max_inflight = 3;
  start_up();
  deliver_at_once(1, 6);
  REQUIRE(fake.wait_uploads(3));
  CHECK(fake.upload_bodies(0) == bodies({1, 2}));
  CHECK(fake.upload_bodies(1) == bodies({3, 4}));
  CHECK(fake.upload_bodies(2) == bodies({5, 6}));

  // Batch 2 answers before batch 1: nothing is acknowledged yet.
  fake.answer_upload(1, std::uint32_t{2});
  CHECK(quiet());
  // Batch 1 answers: one acknowledgement covering batch 2 as well.
  fake.answer_upload(0, std::uint32_t{2});
  expect_delivered(4);
  CHECK(quiet());

  SECTION("a parent that refuses part of a batch still has it acknowledged (it logged why)") {
    fake.answer_upload(2, std::uint32_t{1});
    expect_delivered(6);
  }
}

TEST_CASE_METHOD(fixture, "parent_link: an upload failure is nacked once; deliveries are dropped until resume") {
  pc.max_batch_messages = 2;
  start_up();
  deliver_at_once(1, 4);
  REQUIRE(fake.wait_uploads(2));
  fake.answer_upload(0, make_error(errc::unavailable, "parent store full"));
  expect_nack();
  // The other batch was given back too: its late answer acknowledges nothing.
  fake.answer_upload(1, std::uint32_t{2});
  // Stale deliveries (sent before the router saw the nack) are dropped.
  deliver(5);
  deliver(6);
  CHECK(quiet());
  CHECK(fake.uploads() == 2);

  (*self)->send(link, atoms::resume::value);
  deliver(7);
  REQUIRE(fake.wait_uploads(3));
  CHECK(fake.upload_bodies(2) == bodies({7}));
  fake.answer_upload(2, std::uint32_t{1});
  expect_delivered(7);
  CHECK(quiet());
}

TEST_CASE_METHOD(fixture, "parent_link: link down with batches in flight is a nack") {
  pc.max_batch_messages = 1;
  start_up();
  deliver_at_once(1, 2);
  REQUIRE(fake.wait_uploads(2));
  fake.fire_down("connection reset by peer");
  expect_nack();
  REQUIRE(fake.wait_connects(2));
  settle();
  CHECK_FALSE(snapshot().up);
  // Late answers of the lost connection acknowledge nothing; deliveries while
  // down are dropped without another nack until the router's resume.
  fake.answer_upload(0, std::uint32_t{1});
  fake.answer_upload(1, make_error(errc::unavailable, "connection lost"));
  deliver(3);
  CHECK(quiet());
  CHECK(fake.uploads() == 2);

  (*self)->send(link, atoms::resume::value);
  deliver(4);  // still down: given back at once
  expect_nack();

  (*self)->send(link, atoms::resume::value);
  fake.fire_up();
  expect_module_up();
  deliver(5);
  REQUIRE(fake.wait_uploads(3));
  CHECK(fake.upload_gen(2) == 2);
  CHECK(fake.upload_bodies(2) == bodies({5}));
  fake.answer_upload(2, std::uint32_t{1});
  expect_delivered(5);
}

TEST_CASE_METHOD(fixture, "parent_link: link down with nothing in flight nacks nothing") {
  start_up();
  fake.fire_down("connection reset by peer");
  REQUIRE(fake.wait_connects(2));
  CHECK(quiet());
}

TEST_CASE_METHOD(fixture, "parent_link: reconnects at once, then after base, 2 base, ... cap, within the jitter") {
  pc.reconnect = backoff_policy{1s, 8s, 60s, 0.25};
  start();
  fake.fire_down("connection refused");
  // The first retry goes at once: no clock time passes.
  REQUIRE(fake.wait_connects(2));
  CHECK(fake.connect_time(1) == fake.connect_time(0));

  const std::vector<canopy::clock::duration> nominal{1s, 2s, 4s, 8s, 8s};
  for (std::size_t i = 0; i < nominal.size(); ++i) {
    INFO("delayed retry " << i + 1);
    fake.fire_down("connection refused");
    settle();
    auto due = clk.next_due();
    REQUIRE(due != canopy::clock::duration::max());
    CHECK(due >= nominal[i] * 3 / 4);
    CHECK(due <= std::min<canopy::clock::duration>(nominal[i] * 5 / 4, 8s));
    // Not a nanosecond early.
    clk.advance(due - 1ns);
    settle();
    CHECK(fake.connects() == i + 2);
    clk.advance(1ns);
    REQUIRE(fake.wait_connects(i + 3));
  }

  SECTION("a connection that came up and stayed up resets the backoff") {
    fake.fire_up();
    expect_module_up();
    settle();
    clk.advance(61s);
    settle();
    fake.fire_down("connection reset");
    REQUIRE(fake.wait_connects(nominal.size() + 3));  // at once again
  }
  SECTION("a connection that came up briefly does not") {
    fake.fire_up();
    expect_module_up();
    settle();
    clk.advance(1s);
    settle();
    fake.fire_down("connection reset");
    settle();
    CHECK(fake.connects() == nominal.size() + 2);
    CHECK(clk.next_due() >= 6s);
  }
}

TEST_CASE_METHOD(fixture, "parent_link: a ping not answered within ping_timeout closes the connection") {
  pc.ping_interval = 1s;
  pc.ping_timeout = 3s;
  start_up();
  // The first ping answers: its round-trip time shows on the board.
  fake.answer_ping(0, std::chrono::microseconds{1500});
  settle();
  CHECK(snapshot().rtt_us == 1500);

  advance(1s, 1s);  // t = 1 s: the next ping
  REQUIRE(fake.pings() == 2);
  CHECK(fake.ping_gen(1) == fake.gen());
  advance(2s, 1s);  // t = 3 s: outstanding for 2 s, no new ping, not closed
  CHECK(fake.pings() == 2);
  CHECK(fake.closes() == 0);
  advance(1s, 1s);  // t = 4 s: outstanding for 3 s
  CHECK(fake.closes() == 1);
  advance(5s, 1s);  // the ping chain of that connection has ended
  CHECK(fake.pings() == 2);
  CHECK(fake.closes() == 1);

  // The uplink reports the closed connection: reconnect at once.
  fake.fire_down("closed");
  REQUIRE(fake.wait_connects(2));

  SECTION("a failed ping is not a timeout: the next interval pings again") {
    fake.fire_up();
    expect_module_up();
    REQUIRE(fake.wait_pings(3));
    fake.answer_ping(2, make_error(errc::unavailable, "busy"));
    settle();
    advance(1s, 1s);
    CHECK(fake.pings() == 4);
    CHECK(fake.closes() == 1);
    CHECK(snapshot().rtt_us == 1500);  // unchanged by the failure
  }
}

TEST_CASE_METHOD(fixture, "parent_link: the link board shows up/down, counts, offline time and the last error") {
  pc.identity_problem = "certificate expired on 2024-01-01";
  const auto t0 = clk.wall_ms();
  start();
  settle();
  auto m = snapshot();
  CHECK_FALSE(m.up);
  CHECK(m.connects == 0);
  CHECK(board->down_since_ms == t0);

  fake.fire_down("connection refused");
  REQUIRE(fake.wait_connects(2));
  settle();
  m = snapshot();
  CHECK(m.last_error == "connection refused (certificate expired on 2024-01-01)");
  CHECK(m.disconnects == 0);  // never was up
  clk.advance(10s);
  CHECK(snapshot().offline_ms_total == 10000);

  fake.fire_up();
  expect_module_up();
  settle();
  m = snapshot();
  CHECK(m.up);
  CHECK(m.connects == 1);
  CHECK(m.last_error.empty());
  CHECK(m.last_change_ms == t0 + 10000);
  CHECK(m.offline_ms_total == 10000);
  clk.advance(5s);
  CHECK(snapshot().offline_ms_total == 10000);  // up: not counting

  fake.fire_down("peer closed the connection");
  settle();
  m = snapshot();
  CHECK_FALSE(m.up);
  CHECK(m.disconnects == 1);
  CHECK(m.last_change_ms == t0 + 15000);
  CHECK(m.last_error == "peer closed the connection (certificate expired on 2024-01-01)");
  // (Up for 5 s only: this retry waits its backoff, well within 2 s.)
  clk.advance(2s);
  CHECK(snapshot().offline_ms_total == 12000);

  REQUIRE(fake.wait_connects(3));
  fake.fire_up();
  expect_module_up();
  settle();
  m = snapshot();
  CHECK(m.connects == 2);
  CHECK(m.offline_ms_total == 12000);
}

TEST_CASE_METHOD(fixture, "parent_link: reported properties go up only while the link is up") {
  start();
  auto down = report({twin_update{"dev", "mod", R"({"a":1})", 3, false}});
  settle();
  {
    std::lock_guard<std::mutex> g{down->mtx};
    REQUIRE(down->r);
    REQUIRE_FALSE(down->r->ok());
    CHECK(down->r->err().code == errc::unavailable);
    CHECK_THAT(down->r->err().message, Catch::Contains("'hub'"));
  }
  CHECK(fake.reports() == 0);

  fake.fire_up();
  expect_module_up();
  auto ok = report({twin_update{"dev", "mod", R"({"a":1})", 3, false}, twin_update{"dev", "", "{}", 1, true}});
  auto bad = report({twin_update{"gw", "$edgeAgent", "{}", 7, true}});
  REQUIRE(fake.wait_reports(2));
  auto r0 = fake.report(0);
  auto r1 = fake.report(1);
  CHECK(r0.gen == fake.gen());
  REQUIRE(r0.updates.size() == 2);
  CHECK(r0.updates[0].device == "dev");
  CHECK(r0.updates[0].module == "mod");
  CHECK(r0.updates[0].json == R"({"a":1})");
  CHECK(r0.updates[0].version == 3);
  CHECK(r0.updates[1].full);
  REQUIRE(r1.updates.size() == 1);
  CHECK(r1.updates[0].module == "$edgeAgent");
  {
    std::lock_guard<std::mutex> g{ok->mtx};
    CHECK_FALSE(ok->r);  // not before the parent answered
  }
  r0.done(expected<void>{});
  r1.done(make_error(errc::invalid_argument, "device 'gw' is outside this subtree"));
  {
    std::lock_guard<std::mutex> g{ok->mtx};
    REQUIRE(ok->r);
    CHECK(ok->r->ok());
  }
  {
    std::lock_guard<std::mutex> g{bad->mtx};
    REQUIRE(bad->r);
    REQUIRE_FALSE(bad->r->ok());
    CHECK(bad->r->err().code == errc::invalid_argument);
    CHECK(bad->r->err().message == "device 'gw' is outside this subtree");
  }
}

TEST_CASE_METHOD(fixture, "parent_link: its exit closes the uplink and marks the board down") {
  start_up();
  settle();
  CHECK(fake.closes() == 0);
  (*self)->monitor(link);
  (*self)->send_exit(link, caf::exit_reason::user_shutdown);
  (*self)->receive([](const caf::down_msg&) {});
  // The exit's clean-up may run just after the down message went out.
  for (int i = 0; i < 5000 && snapshot().up; ++i)
    std::this_thread::sleep_for(1ms);
  CHECK(fake.closes() == 1);
  auto m = snapshot();
  CHECK_FALSE(m.up);
  CHECK(m.disconnects == 1);
  CHECK(board->down_since_ms == clk.wall_ms());
}

TEST_CASE_METHOD(fixture, "parent_link: a delivery before the first connection does not block later ones") {
  // A router configured with the link as its $upstream (router_config::upstream)
  // may hand over before the link ever announced itself: there is no router
  // to nack yet, so nothing may wait for a (resume) that cannot come.
  start();
  deliver(1);
  CHECK(quiet());
  fake.fire_up();
  expect_module_up();
  deliver(2);
  REQUIRE(fake.wait_uploads(1));
  CHECK(fake.upload_bodies(0) == bodies({2}));
}
