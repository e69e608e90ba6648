// A thread that runs one piece of work at a time for an actor — a group
// commit's SQLite transaction and fsync — so that the actor goes on taking
// messages (and the CAF worker is not blocked) while it is written. The actor
// starts work only when the thread is idle and touches what the work uses only
// after wait(); `on_done` runs on the writer thread after each piece (it posts
// a message to the actor).
#pragma once

#include <condition_variable>
#include <functional>
#include <mutex>
#include <thread>
#include <utility>

namespace canopy {

class writer_thread {
 public:
  explicit writer_thread(std::function<void()> on_done)
    : on_done_(std::move(on_done)), thread_([this] { run(); }) {}
  ~writer_thread() {
    {
      std::lock_guard<std::mutex> guard{mtx_};
      stop_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }
  writer_thread(const writer_thread&) = delete;
  writer_thread& operator=(const writer_thread&) = delete;

  /// Starts `work`; the thread must be idle (after wait(), or never started).
  void start(std::function<void()> work) {
    {
      std::lock_guard<std::mutex> guard{mtx_};
      work_ = std::move(work);
      busy_ = true;
    }
    cv_.notify_all();
  }

  /// Waits until no work runs.
  void wait() {
    std::unique_lock<std::mutex> lock{mtx_};
    cv_.wait(lock, [this] { return !busy_; });
  }

  bool busy() {
    std::lock_guard<std::mutex> guard{mtx_};
    return busy_;
  }

 private:
  void run() {
    std::unique_lock<std::mutex> lock{mtx_};
    for (;;) {
      cv_.wait(lock, [this] { return stop_ || busy_; });
      if (!busy_)
        return;  // stopping, idle
      auto work = std::move(work_);
      lock.unlock();
      work();
      lock.lock();
      busy_ = false;
      cv_.notify_all();
      lock.unlock();
      on_done_();
      lock.lock();
    }
  }

  std::function<void()> on_done_;
  std::mutex mtx_;
  std::condition_variable cv_;
  std::function<void()> work_;
  bool busy_ = false;
  bool stop_ = false;
  std::thread thread_;  // last: starts after the members it uses
};

}  // namespace canopy
