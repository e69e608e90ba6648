#include "runtime/clock.hpp"

#include <catch2/catch.hpp>

#include <chrono>
#include <condition_variable>
#include <mutex>
#include <string>
#include <vector>

using namespace canopy;
using namespace std::chrono_literals;

TEST_CASE("manual_clock runs due callbacks in deadline order, only on advance") {
  manual_clock clk;
  std::vector<std::string> fired;
  auto start = clk.now();
  clk.call_after(3s, [&] { fired.push_back("c"); });
  clk.call_after(1s, [&] { fired.push_back("a"); });
  clk.call_after(2s, [&] { fired.push_back("b"); });
  clk.call_after(2s, [&] { fired.push_back("b2"); });  // same deadline: scheduling order
  CHECK(clk.pending() == 4);
  CHECK(clk.next_due() == 1s);
  CHECK(fired.empty());
  clk.advance(999ms);
  CHECK(fired.empty());
  clk.advance(1ms);
  CHECK(fired == std::vector<std::string>{"a"});
  clk.advance(10s);
  CHECK(fired == std::vector<std::string>{"a", "b", "b2", "c"});
  CHECK(clk.pending() == 0);
  CHECK(clk.next_due() == clock::duration::max());
  CHECK(clk.now() - start == 11s);
}

TEST_CASE("manual_clock: a callback sees its own deadline as now and may schedule more") {
  manual_clock clk;
  auto start = clk.now();
  std::vector<clock::duration> seen;
  clk.call_after(1s, [&] {
    seen.push_back(clk.now() - start);
    clk.call_after(1s, [&] { seen.push_back(clk.now() - start); });
  });
  clk.advance(5s);
  CHECK(seen == std::vector<clock::duration>{1s, 2s});
  CHECK(clk.now() - start == 5s);
}

TEST_CASE("manual_clock cancel removes a pending callback; cancelling twice is harmless") {
  manual_clock clk;
  int a = 0;
  int b = 0;
  auto ida = clk.call_after(1s, [&] { ++a; });
  clk.call_after(1s, [&] { ++b; });
  clk.cancel(ida);
  clk.cancel(ida);
  clk.cancel(12345);
  CHECK(clk.pending() == 1);
  clk.advance(2s);
  CHECK(a == 0);
  CHECK(b == 1);
  auto idc = clk.call_after(0s, [&] { ++a; });
  clk.advance(0s);
  CHECK(a == 1);
  clk.cancel(idc);  // already ran: no effect
}

TEST_CASE("manual_clock wall_ms moves with advance") {
  manual_clock clk;
  auto w = clk.wall_ms();
  clk.advance(1500ms);
  CHECK(clk.wall_ms() - w == 1500);
}

TEST_CASE("manual_clock: huge delays saturate instead of overflowing") {
  manual_clock clk;
  int fired = 0;
  clk.call_after(clock::duration::max(), [&] { ++fired; });
  clk.advance(24h);
  CHECK(fired == 0);
  CHECK(clk.pending() == 1);
}

namespace {

/// A flag set by a clock callback, waited on with a bound.
struct latch {
  std::mutex mtx;
  std::condition_variable cv;
  int count = 0;

  void hit() {
    std::lock_guard<std::mutex> guard{mtx};
    ++count;
    cv.notify_all();
  }

  bool wait_for_count(int n, std::chrono::seconds bound = 5s) {
    std::unique_lock<std::mutex> guard{mtx};
    return cv.wait_for(guard, bound, [&] { return count >= n; });
  }
};

}  // namespace

TEST_CASE("system_clock fires a callback on its own thread") {
  system_clock clk;
  latch l;
  auto before = clk.now();
  clk.call_after(1ms, [&] { l.hit(); });
  REQUIRE(l.wait_for_count(1));
  CHECK(clk.now() >= before + 1ms);
  CHECK(clk.wall_ms() > 1'600'000'000'000);
}

TEST_CASE("system_clock: cancelled callbacks never run, others still do") {
  system_clock clk;
  latch l;
  int cancelled_ran = 0;
  auto id = clk.call_after(1h, [&] { ++cancelled_ran; });
  clk.cancel(id);
  clk.call_after(0s, [&] { l.hit(); });
  REQUIRE(l.wait_for_count(1));
  clk.stop();
  CHECK(cancelled_ran == 0);
}

TEST_CASE("system_clock: stop drops pending callbacks and is idempotent") {
  latch l;
  {
    system_clock clk;
    clk.call_after(1h, [&] { l.hit(); });
    clk.stop();
    clk.stop();
  }  // destructor after stop
  CHECK(l.count == 0);
}
