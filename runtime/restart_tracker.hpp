// Restart bookkeeping for supervision (DESIGN.md "One node, as a tree of
// actors"): the restart-intensity window (at most N restarts within T) and the
// exponential backoff with jitter and a reset after a stable period. Plain C++
// (no CAF): the supervisor actor feeds it times read from the injected
// canopy::clock, so every decision here is deterministic under manual_clock and
// a fixed seed.
#pragma once

#include "runtime/clock.hpp"

#include <cstdint>
#include <deque>
#include <optional>
#include <random>

namespace canopy {

/// At most `max_restarts` within `period`, else give up (OTP's MaxR/MaxT).
struct restart_intensity {
  int max_restarts = 3;
  clock::duration period = std::chrono::seconds{5};
};

/// First restart immediate; then base * 2^(n-1), +/- jitter, capped; the count
/// resets once a child has run for `stable_period`.
struct backoff_policy {
  clock::duration base = std::chrono::seconds{1};
  clock::duration cap = std::chrono::seconds{60};
  clock::duration stable_period = std::chrono::minutes{10};
  double jitter = 0.2;  ///< each delay is multiplied by a factor in [1-j, 1+j]
};

/// A sliding window of restart times: "at most N restarts within T".
/// Used once per child (own_limit) and once per supervisor (its intensity).
/// Not thread-safe: owned by one actor. Memory is O(max_restarts).
class intensity_window {
 public:
  /// A window enforcing `limit`. A negative max_restarts is treated as 0.
  explicit intensity_window(restart_intensity limit = {});

  /// Records one restart at `now`. Returns true if it is within the limit, false
  /// if it is one too many: more than max_restarts restarts in (now - period, now].
  /// A refused restart is still recorded (the window stays "hot").
  bool record(clock::time_point now);

  /// Restarts recorded in (now - period, now].
  int count(clock::time_point now) const;

  /// Forgets every recorded restart.
  void reset();

  /// The limit this window enforces.
  const restart_intensity& limit() const noexcept { return limit_; }

 private:
  void prune(clock::time_point now);

  restart_intensity limit_;
  std::deque<clock::time_point> times_;
};

/// What to do after a child exited and its restart type asks for a restart.
struct restart_decision {
  enum class kind {
    restart_now,    ///< start a fresh instance at once
    restart_after,  ///< start a fresh instance after `delay`
    give_up,        ///< the child's own limit is exceeded: leave it down
  };
  kind action = kind::restart_now;
  clock::duration delay = clock::duration::zero();  ///< only for restart_after
  int consecutive = 0;  ///< consecutive crashes so far, this one included
};

/// Restart bookkeeping of one child: backoff schedule and optional own limit.
///
/// Backoff: the k-th consecutive exit (k = 1, 2, ...) is restarted
///   k = 1: immediately;
///   k >= 2: after min(cap, base * 2^(k-2) * f), f uniform in [1-jitter, 1+jitter]
/// (so the delayed restarts go base, 2*base, 4*base, ... — "base * 2^(n-1)" for
/// the n-th delayed restart). The consecutive count resets to zero when the
/// instance that just exited had run for at least `stable_period`.
/// A computed delay of zero (base zero) is reported as restart_now.
///
/// Not thread-safe: owned by one actor.
class restart_tracker {
 public:
  /// `own_limit` unset: on_exit never gives up. `seed` feeds the jitter RNG.
  restart_tracker(backoff_policy backoff, std::optional<restart_intensity> own_limit,
                  std::uint64_t seed);

  /// An instance started at `now` (the start of its run for stable_period).
  void record_start(clock::time_point now);

  /// The current instance exited at `now` and will be restarted unless this
  /// says give_up. Counts the restart against the own limit (if any) and
  /// advances the backoff schedule.
  restart_decision on_exit(clock::time_point now);

  /// Clears the consecutive count and the own-limit window (e.g. an operator's
  /// restart_child after the child was marked failed). Keeps the RNG state.
  void reset();

  /// Consecutive exits not yet forgiven by a stable run.
  int consecutive() const noexcept { return consecutive_; }

  /// The backoff policy in force.
  const backoff_policy& backoff() const noexcept { return backoff_; }

 private:
  clock::duration delay_for(int consecutive);

  backoff_policy backoff_;
  std::optional<intensity_window> own_limit_;
  std::mt19937_64 rng_;
  std::optional<clock::time_point> started_at_;
  int consecutive_ = 0;
};

/// Mixes `seed` with `index` (SplitMix64), for deriving independent per-child
/// seeds from one supervisor seed.
std::uint64_t mix_seed(std::uint64_t seed, std::uint64_t index) noexcept;

}  // namespace canopy
