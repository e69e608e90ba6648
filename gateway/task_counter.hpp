// canopy::task_counter — counts the live tasks of a part that runs on the I/O
// thread (connections, calls, subscriptions), so that its stop() can wait until
// they have wound down; canopy::counted holds one count while it lives. Used by
// the link server and client and the control server.
//
// Threading: I/O thread only. Held by shared_ptr, so that the counts (and the
// tasks holding them) may outlive the part that made the counter.
#pragma once

#include <kj/async.h>
#include <kj/memory.h>

#include <cstddef>
#include <memory>
#include <utility>

namespace canopy {

/// Counts live tasks (connections, calls, subscriptions) so stop() can wait for
/// them. I/O thread only.
class task_counter {
 public:
  /// One more.
  void added() { ++active_; }
  /// One fewer; wakes when_idle() at zero.
  void removed() {
    if (--active_ == 0 && idle_.get() != nullptr) {
      idle_->fulfill();
      idle_ = nullptr;
    }
  }
  /// Resolves once nothing is counted. One waiter at a time.
  kj::Promise<void> when_idle() {
    if (active_ == 0)
      return kj::READY_NOW;
    auto paf = kj::newPromiseAndFulfiller<void>();
    idle_ = kj::mv(paf.fulfiller);
    return kj::mv(paf.promise);
  }

 private:
  std::size_t active_ = 0;
  kj::Own<kj::PromiseFulfiller<void>> idle_;
};

/// Holds one count of a task_counter while it lives.
class counted {
 public:
  /// Counts one on `counter` until destroyed.
  explicit counted(std::shared_ptr<task_counter> counter) : counter_(std::move(counter)) {
    counter_->added();
  }
  ~counted() { counter_->removed(); }
  counted(const counted&) = delete;
  counted& operator=(const counted&) = delete;

 private:
  std::shared_ptr<task_counter> counter_;
};

}  // namespace canopy
