#include "runtime/clock.hpp"

#include <algorithm>
#include <vector>

namespace canopy {

namespace {

// now + delay, saturating instead of overflowing for huge delays.
clock::time_point deadline_after(clock::time_point now, clock::duration delay) {
  if (delay > clock::duration::zero() && now > clock::time_point::max() - delay)
    return clock::time_point::max();
  return now + delay;
}

}  // namespace

// -- system_clock -------------------------------------------------------------

system_clock::system_clock() : thread_([this] { run(); }) {}

system_clock::~system_clock() { stop(); }

clock::time_point system_clock::now() const { return std::chrono::steady_clock::now(); }

std::int64_t system_clock::wall_ms() const {
  using namespace std::chrono;
  return duration_cast<milliseconds>(std::chrono::system_clock::now().time_since_epoch()).count();
}

clock::timer_id system_clock::call_after(duration delay, std::function<void()> fn) {
  std::lock_guard<std::mutex> guard{mtx_};
  auto id = timers_.add(deadline_after(now(), delay), std::move(fn));
  cv_.notify_one();
  return id;
}

void system_clock::cancel(timer_id id) {
  std::lock_guard<std::mutex> guard{mtx_};
  timers_.cancel(id);
}

void system_clock::stop() {
  {
    std::lock_guard<std::mutex> guard{mtx_};
    if (stopping_)
      return;
    stopping_ = true;
    cv_.notify_one();
  }
  if (thread_.joinable())
    thread_.join();
  // Other threads may still call call_after/cancel: clear under the lock.
  std::lock_guard<std::mutex> guard{mtx_};
  timers_.clear();
}

void system_clock::run() {
  std::unique_lock<std::mutex> guard{mtx_};
  while (!stopping_) {
    if (timers_.empty()) {
      cv_.wait(guard);
      continue;
    }
    if (auto due = timers_.first_deadline(); due > now()) {
      cv_.wait_until(guard, due);
      continue;
    }
    auto fn = timers_.pop_first();
    // Run outside the lock: a callback may schedule another.
    guard.unlock();
    fn();
    guard.lock();
  }
}

// -- detail::timer_table -------------------------------------------------------

namespace detail {

timer_table::timer_id timer_table::add(time_point at, std::function<void()> fn) {
  auto id = next_id_++;
  pending_.emplace(std::make_pair(at, id), std::move(fn));
  deadline_of_.emplace(id, at);
  return id;
}

void timer_table::cancel(timer_id id) {
  auto i = deadline_of_.find(id);
  if (i == deadline_of_.end())
    return;
  pending_.erase(std::make_pair(i->second, id));
  deadline_of_.erase(i);
}

std::function<void()> timer_table::pop_first() {
  auto first = pending_.begin();
  auto fn = std::move(first->second);
  deadline_of_.erase(first->first.second);
  pending_.erase(first);
  return fn;
}

void timer_table::clear() {
  pending_.clear();
  deadline_of_.clear();
}

}  // namespace detail

// -- manual_clock -------------------------------------------------------------

manual_clock::manual_clock()
  : now_(time_point{} + std::chrono::hours{24}), wall_base_ms_(1'700'000'000'000) {}

clock::time_point manual_clock::now() const {
  std::lock_guard<std::mutex> guard{mtx_};
  return now_;
}

std::int64_t manual_clock::wall_ms() const {
  using namespace std::chrono;
  std::lock_guard<std::mutex> guard{mtx_};
  return wall_base_ms_ + duration_cast<milliseconds>(now_.time_since_epoch() - hours{24}).count();
}

clock::timer_id manual_clock::call_after(duration delay, std::function<void()> fn) {
  std::lock_guard<std::mutex> guard{mtx_};
  return timers_.add(deadline_after(now_, delay), std::move(fn));
}

void manual_clock::cancel(timer_id id) {
  std::lock_guard<std::mutex> guard{mtx_};
  timers_.cancel(id);
}

void manual_clock::advance(duration d) {
  std::unique_lock<std::mutex> guard{mtx_};
  auto target = deadline_after(now_, d);
  for (;;) {
    if (timers_.empty() || timers_.first_deadline() > target)
      break;
    now_ = std::max(now_, timers_.first_deadline());
    auto fn = timers_.pop_first();
    guard.unlock();
    fn();
    guard.lock();
  }
  // Another thread may have advanced further meanwhile: never go back.
  now_ = std::max(now_, target);
}

std::size_t manual_clock::pending() const {
  std::lock_guard<std::mutex> guard{mtx_};
  return timers_.size();
}

clock::duration manual_clock::next_due() const {
  std::lock_guard<std::mutex> guard{mtx_};
  if (timers_.empty())
    return duration::max();
  return timers_.first_deadline() - now_;
}

}  // namespace canopy
