// The injectable clock (DESIGN.md "Supervision"): every piece of time-dependent
// logic — restart backoff, restart intensity windows, health-check deadlines,
// TTLs — reads time and schedules callbacks through this interface, so tests
// drive it with `manual_clock` and never sleep.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <thread>

namespace canopy {

namespace detail {

/// Pending callbacks ordered by (deadline, id), so equal deadlines fire in
/// scheduling order. Not thread-safe: each clock guards its own.
class timer_table {
 public:
  using time_point = std::chrono::steady_clock::time_point;
  using timer_id = std::uint64_t;

  /// Adds `fn` due at `at`; returns its id.
  timer_id add(time_point at, std::function<void()> fn);
  /// Removes a pending callback; no effect if it is gone.
  void cancel(timer_id id);
  bool empty() const noexcept { return pending_.empty(); }
  std::size_t size() const noexcept { return pending_.size(); }
  /// Deadline of the earliest callback; only when !empty().
  time_point first_deadline() const { return pending_.begin()->first.first; }
  /// Removes and returns the earliest callback; only when !empty().
  std::function<void()> pop_first();
  void clear();

 private:
  std::map<std::pair<time_point, timer_id>, std::function<void()>> pending_;
  std::map<timer_id, time_point> deadline_of_;
  timer_id next_id_ = 1;
};

}  // namespace detail

/// Source of monotonic time and of delayed callbacks.
/// Thread-safe: any thread may call any member. Callbacks run on a thread the
/// clock owns (system_clock) or on the thread that calls advance() (manual_clock),
/// so a callback must only do thread-safe things — typically `caf::anon_send`.
class clock {
 public:
  using duration = std::chrono::nanoseconds;
  using time_point = std::chrono::steady_clock::time_point;
  using timer_id = std::uint64_t;

  virtual ~clock() = default;

  /// Monotonic now.
  virtual time_point now() const = 0;

  /// Wall-clock now in milliseconds since the Unix epoch (for status reports).
  virtual std::int64_t wall_ms() const = 0;

  /// Runs `fn` once, `delay` from now. Returns an id usable with cancel().
  virtual timer_id call_after(duration delay, std::function<void()> fn) = 0;

  /// Cancels a pending callback; no effect if it already ran.
  virtual void cancel(timer_id id) = 0;
};

/// The real clock: std::chrono::steady_clock plus one timer thread.
/// stop() (or the destructor) joins the thread; pending callbacks are dropped.
class system_clock final : public clock {
 public:
  system_clock();
  ~system_clock() override;
  system_clock(const system_clock&) = delete;
  system_clock& operator=(const system_clock&) = delete;

  time_point now() const override;
  std::int64_t wall_ms() const override;
  timer_id call_after(duration delay, std::function<void()> fn) override;
  void cancel(timer_id id) override;

  /// Stops the timer thread. Idempotent.
  void stop();

 private:
  void run();

  std::mutex mtx_;
  std::condition_variable cv_;
  // Ordered by (deadline, id) so equal deadlines fire in scheduling order.
  detail::timer_table timers_;
  bool stopping_ = false;
  std::thread thread_;
};

/// A clock that moves only when told: for tests. Starts at an arbitrary fixed
/// point. advance() runs due callbacks, in deadline order, on the calling thread.
class manual_clock final : public clock {
 public:
  manual_clock();

  time_point now() const override;
  std::int64_t wall_ms() const override;
  timer_id call_after(duration delay, std::function<void()> fn) override;
  void cancel(timer_id id) override;

  /// Moves time forward by `d`, running every callback that falls due.
  void advance(duration d);

  /// Number of callbacks still pending.
  std::size_t pending() const;

  /// Delay until the earliest pending callback, or duration::max() if none.
  duration next_due() const;

 private:
  mutable std::mutex mtx_;
  time_point now_;
  std::int64_t wall_base_ms_;
  detail::timer_table timers_;
};

}  // namespace canopy
