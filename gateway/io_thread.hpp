// canopy::io_thread — the node's KJ event loop on a dedicated thread (DESIGN.md
// "Threads and I/O"). Network parts (the control socket; later TLS links and the
// MQTT head) live on this loop; actors and other threads reach it only through
// the hand-offs below. No actor logic and no CAF here.
//
// Threading: start(), stop() and run_sync() are for threads other than the I/O
// thread (typically main()). post(), post_task() and executor() may be used from
// any thread. Everything a posted function creates on the loop belongs to the
// I/O thread and must be destroyed there (post_task() arranges that).
//
// canopy::cross_thread_queue<T> is the matching one-way hand-off for streams of
// items produced on arbitrary threads and consumed on the I/O thread.
#pragma once

#include "runtime/expected.hpp"

#include <kj/async-io.h>
#include <kj/async.h>
#include <kj/function.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <future>
#include <limits>
#include <memory>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

namespace canopy {

/// A bounded multi-producer queue whose consumer waits on a KJ event loop.
///
/// push() and close() may be called from any thread, never block beyond a short
/// mutex, and need no event loop. when_ready(), take() and take_dropped() belong
/// to one consumer on one event loop thread. Share it through std::shared_ptr
/// when producers may outlive the consumer.
template <class T>
class cross_thread_queue {
 public:
  /// A queue holding at most `capacity` items; further pushes are dropped and counted.
  explicit cross_thread_queue(std::size_t capacity = std::numeric_limits<std::size_t>::max())
      : capacity_(capacity) {}

  cross_thread_queue(const cross_thread_queue&) = delete;
  cross_thread_queue& operator=(const cross_thread_queue&) = delete;

  /// Any thread: appends `item` and wakes the consumer. Returns false (and drops
  /// the item) when the queue is closed, or full (then the drop is counted).
  bool push(T item) {
    kj::Own<kj::CrossThreadPromiseFulfiller<void>> waiter;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (closed_) return false;
      if (items_.size() >= capacity_) {
        ++dropped_;
        return false;
      }
      items_.push_back(std::move(item));
      waiter = std::move(waiter_);
    }
    if (waiter.get() != nullptr) waiter->fulfill();
    return true;
  }

  /// Any thread: refuses later pushes and wakes the consumer. Queued items stay takeable.
  void close() {
    kj::Own<kj::CrossThreadPromiseFulfiller<void>> waiter;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      closed_ = true;
      waiter = std::move(waiter_);
    }
    if (waiter.get() != nullptr) waiter->fulfill();
  }

  /// Consumer thread (must run a KJ event loop): resolves once the queue holds an
  /// item, has dropped one, or is closed; at once if that is already so. One
  /// outstanding call at a time.
  kj::Promise<void> when_ready() {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!items_.empty() || dropped_ != 0 || closed_) return kj::READY_NOW;
    auto paf = kj::newPromiseAndCrossThreadFulfiller<void>();
    waiter_ = kj::mv(paf.fulfiller);
    return kj::mv(paf.promise);
  }

  /// Consumer thread: removes and returns everything queued, oldest first.
  std::vector<T> take() {
    std::lock_guard<std::mutex> lock(mutex_);
    std::vector<T> out;
    out.reserve(items_.size());
    for (auto& item : items_) out.push_back(std::move(item));
    items_.clear();
    return out;
  }

  /// Consumer thread: the number of items dropped since the last call (then resets it).
  std::uint64_t take_dropped() {
    std::lock_guard<std::mutex> lock(mutex_);
    return std::exchange(dropped_, 0);
  }

  /// Any thread: true once close() was called.
  bool closed() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return closed_;
  }

 private:
  mutable std::mutex mutex_;
  std::deque<T> items_;
  std::size_t capacity_;
  std::uint64_t dropped_ = 0;
  bool closed_ = false;
  kj::Own<kj::CrossThreadPromiseFulfiller<void>> waiter_;
};

/// Owns a std::thread running kj::setupAsyncIo() and its event loop.
class io_thread {
 public:
  /// A stopped I/O thread; call start().
  io_thread();

  /// Stops the thread (see stop()).
  ~io_thread();

  io_thread(const io_thread&) = delete;
  io_thread& operator=(const io_thread&) = delete;

  /// Starts the thread and blocks until its event loop runs. Fails with io_error
  /// if KJ cannot set up async I/O (e.g. epoll; then start() may be tried again),
  /// with invalid_argument if already started (an io_thread runs once).
  /// Not from the I/O thread.
  expected<void> start();

  /// Drains and stops: fulfils the loop's shutdown promise, which runs the posted
  /// functions still queued, cancels every task added with post_task() (their
  /// destructors run on the I/O thread), and joins. Idempotent; safe if never
  /// started. Not from the I/O thread.
  void stop();

  /// True between a successful start() and stop().
  bool running() const noexcept;

  /// True when called on the I/O thread itself.
  bool on_io_thread() const noexcept;

  /// The loop's executor, for cross-thread hand-offs (executeSync from any thread,
  /// executeAsync from threads with their own event loop). Valid after start()
  /// for the life of this object; after stop() its calls throw DISCONNECTED.
  const kj::Executor& executor() const;

  /// Any thread, never blocks: runs `fn` on the I/O thread with the loop's I/O
  /// context, in posting order. Returns false (and drops `fn`) when not running.
  /// An exception thrown by `fn` is logged.
  bool post(kj::Function<void(kj::AsyncIoContext&)> fn);

  /// Like post(), for long-running work: the promise `fn` returns is kept on the
  /// loop until it completes or stop() cancels it (then its continuations are
  /// destroyed on the I/O thread). A failure is logged.
  bool post_task(kj::Function<kj::Promise<void>(kj::AsyncIoContext&)> fn);

  /// I/O thread only: keeps `task` on the loop until it completes or stop()
  /// cancels it. A failure is logged.
  void add_task(kj::Promise<void> task);

  /// Runs `fn(kj::AsyncIoContext&)` on the I/O thread and blocks until it returns;
  /// if it returns a kj::Promise<T>, waits for it and returns the T. Exceptions
  /// (including DISCONNECTED after stop()) are rethrown here as kj::Exception.
  /// Not from the I/O thread. No ordering with post().
  template <class F>
  auto run_sync(F&& fn) {
    auto* self = this;
    return executor().executeSync([self, &fn]() { return fn(self->context()); });
  }

 private:
  void run(std::promise<expected<void>>& started);
  kj::Promise<void> pump_posts();
  kj::AsyncIoContext& context();

  struct loop_state;
  using posted = kj::Function<void(kj::AsyncIoContext&)>;

  std::thread thread_;
  std::atomic<std::thread::id> thread_id_{};
  bool started_ = false;
  std::atomic<bool> running_{false};
  std::shared_ptr<cross_thread_queue<posted>> posts_;
  kj::Own<const kj::Executor> executor_;
  kj::Own<kj::CrossThreadPromiseFulfiller<void>> shutdown_;
  loop_state* loop_ = nullptr;  // lives on the I/O thread's stack while it runs
};

}  // namespace canopy
