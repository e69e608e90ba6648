#include "gateway/io_thread.hpp"

#include <kj/debug.h>
#include <spdlog/spdlog.h>

namespace canopy {

/// What lives on the I/O thread's stack while the loop runs.
struct io_thread::loop_state final : kj::TaskSet::ErrorHandler {
  explicit loop_state(kj::AsyncIoContext ctx) : io(kj::mv(ctx)), tasks(kj::heap<kj::TaskSet>(*this)) {}

  void taskFailed(kj::Exception&& e) override {
    spdlog::warn("io thread: a task failed: {}", e.getDescription().cStr());
  }

  kj::AsyncIoContext io;
  kj::Own<kj::TaskSet> tasks;
};

io_thread::io_thread() : posts_(std::make_shared<cross_thread_queue<posted>>()) {}

io_thread::~io_thread() { stop(); }

expected<void> io_thread::start() {
  if (started_) return make_error(errc::invalid_argument, "io_thread: start() called twice");
  started_ = true;
  std::promise<expected<void>> started;
  auto ready = started.get_future();
  thread_ = std::thread([this, &started] { run(started); });
  auto result = ready.get();
  if (!result) {
    thread_.join();
    started_ = false;  // may be tried again
    return result;
  }
  running_ = true;
  return result;
}

void io_thread::stop() {
  KJ_REQUIRE(!on_io_thread(), "io_thread::stop() called on the I/O thread");
  running_ = false;
  if (!thread_.joinable()) return;
  posts_->close();
  if (shutdown_.get() != nullptr) shutdown_->fulfill();
  thread_.join();
  shutdown_ = nullptr;
}

bool io_thread::running() const noexcept { return running_; }

bool io_thread::on_io_thread() const noexcept { return thread_id_.load() == std::this_thread::get_id(); }

const kj::Executor& io_thread::executor() const {
  KJ_REQUIRE(executor_.get() != nullptr, "io_thread::executor() before start()");
  return *executor_;
}

bool io_thread::post(kj::Function<void(kj::AsyncIoContext&)> fn) {
  if (!running_) return false;
  return posts_->push(kj::mv(fn));
}

bool io_thread::post_task(kj::Function<kj::Promise<void>(kj::AsyncIoContext&)> fn) {
  return post([this, fn = kj::mv(fn)](kj::AsyncIoContext& io) mutable {
    add_task(fn(io));
  });
}

void io_thread::add_task(kj::Promise<void> task) {
  KJ_REQUIRE(on_io_thread() && loop_ != nullptr && loop_->tasks.get() != nullptr,
             "io_thread::add_task() off the I/O thread or after stop()");
  loop_->tasks->add(kj::mv(task));
}

kj::AsyncIoContext& io_thread::context() {
  KJ_REQUIRE(loop_ != nullptr, "io_thread: the event loop is not running");
  return loop_->io;
}

namespace {

void run_posted(std::vector<kj::Function<void(kj::AsyncIoContext&)>> batch, kj::AsyncIoContext& io) {
  for (auto& fn : batch) {
    KJ_IF_MAYBE (e, kj::runCatchingExceptions([&] { fn(io); })) {
      spdlog::warn("io thread: a posted function threw: {}", e->getDescription().cStr());
    }
  }
}

}  // namespace

kj::Promise<void> io_thread::pump_posts() {
  return posts_->when_ready().then([this]() -> kj::Promise<void> {
    run_posted(posts_->take(), loop_->io);
    if (posts_->closed()) return kj::READY_NOW;  // stop() takes the rest
    return pump_posts();
  });
}

void io_thread::run(std::promise<expected<void>>& started) {
  kj::Own<loop_state> state;
  kj::Promise<void> shutdown = nullptr;
  KJ_IF_MAYBE (e, kj::runCatchingExceptions([&] {
                 state = kj::heap<loop_state>(kj::setupAsyncIo());
                 auto paf = kj::newPromiseAndCrossThreadFulfiller<void>();
                 shutdown = kj::mv(paf.promise);
                 shutdown_ = kj::mv(paf.fulfiller);
                 executor_ = kj::getCurrentThreadExecutor().addRef();
               })) {
    started.set_value(make_error(errc::io_error, std::string("io_thread: cannot set up KJ async I/O: ") +
                                                     e->getDescription().cStr()));
    return;
  }
  loop_ = state.get();
  thread_id_ = std::this_thread::get_id();
  state->tasks->add(pump_posts());
  started.set_value({});  // `started` dangles from here on

  KJ_IF_MAYBE (e, kj::runCatchingExceptions([&] { shutdown.wait(state->io.waitScope); })) {
    spdlog::error("io thread: the event loop failed: {}", e->getDescription().cStr());
  }

  // Drain: what was posted before stop() still runs, then the tasks are
  // cancelled here, on their own thread, and the loop settles before it goes.
  KJ_IF_MAYBE (e, kj::runCatchingExceptions([&] {
                 run_posted(posts_->take(), state->io);
                 state->tasks = nullptr;
                 state->io.waitScope.poll();
               })) {
    spdlog::warn("io thread: error while draining: {}", e->getDescription().cStr());
  }
  loop_ = nullptr;
  state = nullptr;
  thread_id_ = std::thread::id{};
}

}  // namespace canopy
