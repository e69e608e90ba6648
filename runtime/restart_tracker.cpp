#include "runtime/restart_tracker.hpp"

#include <algorithm>
#include <cmath>

namespace canopy {

// -- intensity_window ---------------------------------------------------------

intensity_window::intensity_window(restart_intensity limit) : limit_(limit) {
  limit_.max_restarts = std::max(limit_.max_restarts, 0);
}

void intensity_window::prune(clock::time_point now) {
  // Keep the restarts in (now - period, now]: one exactly `period` old has left.
  while (!times_.empty() && now - times_.front() >= limit_.period)
    times_.pop_front();
}

bool intensity_window::record(clock::time_point now) {
  prune(now);
  times_.push_back(now);
  auto within = static_cast<int>(times_.size()) <= limit_.max_restarts;
  // Only the newest max_restarts + 1 entries can ever matter.
  while (static_cast<int>(times_.size()) > limit_.max_restarts + 1)
    times_.pop_front();
  return within;
}

int intensity_window::count(clock::time_point now) const {
  return static_cast<int>(std::count_if(times_.begin(), times_.end(), [&](auto t) {
    return now - t < limit_.period && t <= now;
  }));
}

void intensity_window::reset() { times_.clear(); }

// -- restart_tracker ----------------------------------------------------------

restart_tracker::restart_tracker(backoff_policy backoff, std::optional<restart_intensity> own_limit,
                                 std::uint64_t seed)
  : backoff_(backoff), rng_(seed) {
  backoff_.jitter = std::clamp(backoff_.jitter, 0.0, 1.0);
  if (own_limit)
    own_limit_.emplace(*own_limit);
}

void restart_tracker::record_start(clock::time_point now) { started_at_ = now; }

clock::duration restart_tracker::delay_for(int consecutive) {
  if (consecutive <= 1 || backoff_.base <= clock::duration::zero())
    return clock::duration::zero();
  // Work in double nanoseconds so that large exponents saturate at the cap
  // instead of overflowing.
  auto raw = static_cast<double>(backoff_.base.count()) * std::exp2(consecutive - 2);
  auto factor = 1.0;
  if (backoff_.jitter > 0.0) {
    std::uniform_real_distribution<double> dist{1.0 - backoff_.jitter, 1.0 + backoff_.jitter};
    factor = dist(rng_);
  }
  auto cap = static_cast<double>(backoff_.cap.count());
  auto jittered = std::min(raw * factor, cap);
  return clock::duration{static_cast<clock::duration::rep>(std::max(jittered, 0.0))};
}

restart_decision restart_tracker::on_exit(clock::time_point now) {
  if (started_at_ && now - *started_at_ >= backoff_.stable_period)
    consecutive_ = 0;
  started_at_.reset();
  ++consecutive_;
  restart_decision result;
  result.consecutive = consecutive_;
  if (own_limit_ && !own_limit_->record(now)) {
    result.action = restart_decision::kind::give_up;
    return result;
  }
  result.delay = delay_for(consecutive_);
  result.action = result.delay > clock::duration::zero() ? restart_decision::kind::restart_after
                                                         : restart_decision::kind::restart_now;
  return result;
}

void restart_tracker::reset() {
  consecutive_ = 0;
  started_at_.reset();
  if (own_limit_)
    own_limit_->reset();
}

std::uint64_t mix_seed(std::uint64_t seed, std::uint64_t index) noexcept {
  auto z = seed + 0x9E3779B97F4A7C15ULL * (index + 1);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

}  // namespace canopy
