#include "runtime/restart_tracker.hpp"

#include <catch2/catch.hpp>

#include <chrono>
#include <cmath>
#include <vector>

using namespace canopy;
using namespace std::chrono_literals;
using kind = restart_decision::kind;

namespace {

backoff_policy no_jitter(clock::duration base = 1s, clock::duration cap = 60s) {
  backoff_policy b;
  b.base = base;
  b.cap = cap;
  b.jitter = 0.0;
  b.stable_period = 10min;
  return b;
}

clock::time_point t0() { return clock::time_point{} + 1000h; }

}  // namespace

TEST_CASE("intensity_window allows max_restarts within the period, refuses one more") {
  intensity_window w{restart_intensity{3, 5s}};
  auto t = t0();
  CHECK(w.record(t));
  CHECK(w.record(t + 1s));
  CHECK(w.record(t + 2s));
  CHECK(w.count(t + 2s) == 3);
  CHECK_FALSE(w.record(t + 3s));  // the 4th within 5 s
}

TEST_CASE("intensity_window slides: old restarts leave the window") {
  intensity_window w{restart_intensity{2, 10s}};
  auto t = t0();
  CHECK(w.record(t));
  CHECK(w.record(t + 4s));
  // t has left (t + 10 s is exactly one period later).
  CHECK(w.count(t + 10s) == 1);
  CHECK(w.record(t + 10s));
  CHECK_FALSE(w.record(t + 11s));  // t+4, t+10, t+11: three in (t+1, t+11]
  // Long quiet period: everything is forgotten.
  CHECK(w.count(t + 1h) == 0);
  CHECK(w.record(t + 1h));
}

TEST_CASE("intensity_window with zero restarts refuses the first one, and reset forgets") {
  intensity_window w{restart_intensity{0, 5s}};
  CHECK_FALSE(w.record(t0()));
  intensity_window w2{restart_intensity{1, 5s}};
  CHECK(w2.record(t0()));
  CHECK_FALSE(w2.record(t0() + 1s));
  w2.reset();
  CHECK(w2.count(t0() + 1s) == 0);
  CHECK(w2.record(t0() + 1s));
}

TEST_CASE("backoff: first restart immediate, then base * 2^(n-1), capped") {
  restart_tracker tr{no_jitter(1s, 10s), std::nullopt, 42};
  auto t = t0();
  std::vector<clock::duration> delays;
  for (int i = 0; i < 7; ++i) {
    tr.record_start(t);
    t += 1s;  // crashes one second after each start: never stable
    auto d = tr.on_exit(t);
    CHECK(d.consecutive == i + 1);
    if (i == 0) {
      CHECK(d.action == kind::restart_now);
      CHECK(d.delay == clock::duration::zero());
    } else {
      CHECK(d.action == kind::restart_after);
    }
    delays.push_back(d.delay);
  }
  CHECK(delays == std::vector<clock::duration>{0s, 1s, 2s, 4s, 8s, 10s, 10s});
}

TEST_CASE("backoff: large crash counts saturate at the cap without overflow") {
  restart_tracker tr{no_jitter(1s, 60s), std::nullopt, 1};
  auto t = t0();
  restart_decision d;
  for (int i = 0; i < 200; ++i) {
    tr.record_start(t);
    d = tr.on_exit(t);
  }
  CHECK(d.consecutive == 200);
  CHECK(d.delay == 60s);
}

TEST_CASE("backoff: jitter stays within [1-j, 1+j] and is deterministic per seed") {
  backoff_policy b = no_jitter(1s, 1h);
  b.jitter = 0.25;
  auto run = [&](std::uint64_t seed) {
    restart_tracker tr{b, std::nullopt, seed};
    std::vector<clock::duration> out;
    auto t = t0();
    for (int i = 0; i < 12; ++i) {
      tr.record_start(t);
      auto d = tr.on_exit(t);
      out.push_back(d.delay);
    }
    return out;
  };
  auto a = run(7);
  CHECK(a == run(7));
  CHECK(a != run(8));
  bool varied = false;
  for (std::size_t n = 1; n < a.size(); ++n) {
    auto nominal = std::chrono::duration<double>(1s).count() * std::exp2(static_cast<double>(n) - 1);
    auto got = std::chrono::duration<double>(a[n]).count();
    CHECK(got >= nominal * 0.75 - 1e-9);
    CHECK(got <= nominal * 1.25 + 1e-9);
    if (std::abs(got - nominal) > 1e-6)
      varied = true;
  }
  CHECK(varied);
}

TEST_CASE("backoff: jitter never pushes a delay past the cap") {
  backoff_policy b = no_jitter(1s, 3s);
  b.jitter = 0.5;
  for (std::uint64_t seed = 1; seed < 50; ++seed) {
    restart_tracker tr{b, std::nullopt, seed};
    auto t = t0();
    for (int i = 0; i < 6; ++i) {
      tr.record_start(t);
      auto d = tr.on_exit(t);
      CHECK(d.delay <= 3s);
    }
  }
}

TEST_CASE("backoff: the count resets after a stable run, not before") {
  restart_tracker tr{no_jitter(1s, 60s), std::nullopt, 3};
  auto t = t0();
  tr.record_start(t);
  CHECK(tr.on_exit(t + 1s).action == kind::restart_now);
  t += 1s;
  tr.record_start(t);
  CHECK(tr.on_exit(t + 1s).delay == 1s);
  t += 2s;
  // Runs for just under the stable period: still counts as consecutive.
  tr.record_start(t);
  t += 10min - 1s;
  auto d = tr.on_exit(t);
  CHECK(d.consecutive == 3);
  CHECK(d.delay == 2s);
  // Runs for the stable period: forgiven, restart is immediate again.
  tr.record_start(t);
  t += 10min;
  d = tr.on_exit(t);
  CHECK(d.consecutive == 1);
  CHECK(d.action == kind::restart_now);
  CHECK(tr.consecutive() == 1);
}

TEST_CASE("backoff with base zero restarts immediately every time") {
  restart_tracker tr{no_jitter(0s), std::nullopt, 3};
  for (int i = 0; i < 5; ++i) {
    tr.record_start(t0());
    CHECK(tr.on_exit(t0()).action == kind::restart_now);
  }
}

TEST_CASE("own limit: gives up past N restarts in T; reset clears it") {
  restart_tracker tr{no_jitter(0s), restart_intensity{2, 1min}, 9};
  auto t = t0();
  tr.record_start(t);
  CHECK(tr.on_exit(t + 1s).action == kind::restart_now);
  tr.record_start(t + 1s);
  CHECK(tr.on_exit(t + 2s).action == kind::restart_now);
  tr.record_start(t + 2s);
  CHECK(tr.on_exit(t + 3s).action == kind::give_up);
  tr.reset();
  CHECK(tr.consecutive() == 0);
  tr.record_start(t + 4s);
  CHECK(tr.on_exit(t + 5s).action == kind::restart_now);
}

TEST_CASE("own limit: restarts spread wider than the period never give up") {
  restart_tracker tr{no_jitter(0s), restart_intensity{1, 10s}, 9};
  auto t = t0();
  for (int i = 0; i < 10; ++i) {
    tr.record_start(t);
    t += 11s;
    CHECK(tr.on_exit(t).action != kind::give_up);
  }
}

TEST_CASE("mix_seed gives distinct seeds per index") {
  CHECK(mix_seed(1, 0) != mix_seed(1, 1));
  CHECK(mix_seed(1, 0) != mix_seed(2, 0));
  CHECK(mix_seed(5, 3) == mix_seed(5, 3));
}
