#include "gateway/control_client.hpp"

// GCC 12 reports a false -Wmaybe-uninitialized inside std::variant when an
// expected<T> is moved through a kj::Promise (ExceptionOr<expected<T>>).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include "gateway/io_thread.hpp"

#include <control.capnp.h>

#include <capnp/rpc-twoparty.h>
#include <kj/async-io.h>
#include <kj/async-unix.h>
#include <kj/debug.h>

#include <algorithm>
#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <exception>
#include <mutex>
#include <optional>
#include <string_view>

#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

namespace canopy {

namespace {

errc from_schema(schema::ErrorCode code) {
  switch (code) {
    case schema::ErrorCode::OK: break;
    case schema::ErrorCode::INVALID_ARGUMENT: return errc::invalid_argument;
    case schema::ErrorCode::NOT_FOUND: return errc::not_found;
    case schema::ErrorCode::INCOMPATIBLE: return errc::incompatible;
    case schema::ErrorCode::IO_ERROR: return errc::io_error;
    case schema::ErrorCode::STORE_ERROR: return errc::store_error;
    case schema::ErrorCode::TIMEOUT: return errc::timeout;
    case schema::ErrorCode::UNAVAILABLE: return errc::unavailable;
    case schema::ErrorCode::FAILED: return errc::failed;
  }
  return errc::failed;
}

/// The node's error, if `status` is not ok.
std::optional<error> status_error(schema::Status::Reader status) {
  if (status.getCode() == schema::ErrorCode::OK) return std::nullopt;
  return error{from_schema(status.getCode()), status.getMessage()};
}

/// How much longer than a direct method's timeout the client waits for the node.
constexpr std::chrono::milliseconds invoke_grace{5000};

std::string connect_error(const std::string& path, const std::string& why) {
  return "cannot connect to the canopy node at " + path + ": " + why +
         " (is `canopy run` running? use --socket or CANOPY_SOCKET)";
}

/// What a stream's sink shares with the waiting call. Lives on the client's thread.
struct stream_state {
  const std::function<bool(const std::string&)>* on_line = nullptr;
  const std::function<bool(const upstream_record&)>* on_record = nullptr;
  const stream_options* options = nullptr;
  std::size_t count = 0;
  bool finished = false;
  std::optional<error> failure;
  kj::Own<kj::PromiseFulfiller<void>> done;

  void finish() {
    if (finished) return;
    finished = true;
    on_line = nullptr;
    on_record = nullptr;
    options = nullptr;
    if (done.get() != nullptr && done->isWaiting()) done->fulfill();
  }

  /// Hands an item to the caller's callback; stops if it says so, throws, or the
  /// count is reached.
  template <class Callback, class Item>
  void deliver(const Callback& callback, const Item& item) {
    bool go_on = false;
    try {
      go_on = callback(item);
    } catch (const std::exception& e) {
      failure = make_error(errc::failed, std::string("the stream callback threw: ") + e.what());
    }
    delivered(go_on);
  }

  /// After an item was delivered: stop if the callback said so or the count is reached.
  void delivered(bool go_on) {
    ++count;
    if (!go_on || (options->max_count != 0 && count >= options->max_count)) finish();
  }

  void dropped(std::uint64_t n) {
    if (!finished && options->on_dropped) options->on_dropped(n);
  }
};

/// The answer of followLogs / monitor: an error, or the node ended the stream.
template <class Response>
expected<void> stream_answer(Response&& response) {
  if (auto err = status_error(response.getStatus())) return *err;
  return {};
}

class log_sink final : public schema::LogSink::Server {
 public:
  explicit log_sink(std::shared_ptr<stream_state> state) : state_(std::move(state)) {}

  kj::Promise<void> line(LineContext context) override {
    if (!state_->finished) {
      std::string text = context.getParams().getText();
      state_->deliver(*state_->on_line, text);
    }
    return kj::READY_NOW;
  }

  kj::Promise<void> dropped(DroppedContext context) override {
    state_->dropped(context.getParams().getCount());
    return kj::READY_NOW;
  }

 private:
  std::shared_ptr<stream_state> state_;
};

class message_sink final : public schema::MessageSink::Server {
 public:
  explicit message_sink(std::shared_ptr<stream_state> state) : state_(std::move(state)) {}

  kj::Promise<void> record(RecordContext context) override {
    if (state_->finished) return kj::READY_NOW;
    auto r = context.getParams().getRecord();
    auto bytes = r.getMessage();
    auto msg = message::decode(std::string_view(reinterpret_cast<const char*>(bytes.begin()), bytes.size()));
    if (!msg) {
      state_->failure = make_error(errc::failed, "monitor: record seq " + std::to_string(r.getSeq()) +
                                                     ": the message bytes (" + std::to_string(bytes.size()) +
                                                     ") do not decode");
      state_->finish();
      return kj::READY_NOW;
    }
    upstream_record rec;
    rec.seq = r.getSeq();
    rec.enqueued_ms = r.getEnqueuedMs();
    rec.source_module = r.getSourceModule();
    rec.output = r.getOutput();
    rec.msg = std::move(*msg);
    state_->deliver(*state_->on_record, rec);
    return kj::READY_NOW;
  }

  kj::Promise<void> dropped(DroppedContext context) override {
    state_->dropped(context.getParams().getCount());
    return kj::READY_NOW;
  }

 private:
  std::shared_ptr<stream_state> state_;
};

/// Fills a send call's parameters.
void fill_send(schema::Control::SendParams::Builder req, const std::string& device, const std::string& module,
               const std::string& output, const message& msg) {
  req.setDevice(device);
  req.setModule(module);
  req.setOutput(output);
  auto bytes = msg.encoded();
  req.setMessage(kj::arrayPtr(reinterpret_cast<const kj::byte*>(bytes.data()), bytes.size()));
}

/// The answer of a send call.
template <class Response>
expected<std::uint64_t> send_answer(Response&& response) {
  if (auto err = status_error(response.getStatus())) return *err;
  return response.getTargets();
}

}  // namespace

// --- send_feed ------------------------------------------------------------------

struct send_feed::state {
  explicit state(std::size_t w) : window(std::max<std::size_t>(1, w)) {}

  /// Any thread: `n` messages were reported (or dropped): room for as many more.
  void release(std::size_t n) {
    if (n == 0) return;
    {
      std::lock_guard<std::mutex> lock(mutex);
      outstanding -= n;
    }
    cv.notify_all();
  }

  /// The stream ended: refuse and wake every producer.
  void end() {
    {
      std::lock_guard<std::mutex> lock(mutex);
      ended = true;
    }
    cv.notify_all();
    queue.close();
  }

  std::mutex mutex;
  std::condition_variable cv;
  const std::size_t window;
  std::size_t outstanding = 0;  ///< pushed and not yet reported
  bool closed = false;
  bool ended = false;
  cross_thread_queue<send_request> queue;  ///< never over `window` items: unbounded is fine
};

send_feed::send_feed(std::size_t window) : state_(std::make_shared<state>(window)) {}

send_feed::~send_feed() = default;

bool send_feed::push(send_request req) {
  auto& s = *state_;
  {
    std::unique_lock<std::mutex> lock(s.mutex);
    s.cv.wait(lock, [&s] { return s.closed || s.ended || s.outstanding < s.window; });
    if (s.closed || s.ended) return false;
    ++s.outstanding;
  }
  if (!s.queue.push(std::move(req))) {  // closed meanwhile by another thread
    s.release(1);
    return false;
  }
  return true;
}

void send_feed::close() {
  {
    std::lock_guard<std::mutex> lock(state_->mutex);
    state_->closed = true;
  }
  state_->cv.notify_all();
  state_->queue.close();
}

bool send_feed::ended() const {
  std::lock_guard<std::mutex> lock(state_->mutex);
  return state_->ended;
}

// --- control_client -------------------------------------------------------------

struct control_client::impl {
  explicit impl(std::string p, kj::AsyncIoContext ctx) : path(std::move(p)), io(kj::mv(ctx)) {}

  std::string path;
  kj::AsyncIoContext io;
  kj::Own<kj::AsyncIoStream> stream;
  kj::Own<capnp::TwoPartyClient> rpc;
  schema::Control::Client control = nullptr;
  std::vector<int> signals;
  bool interrupted = false;
  std::chrono::milliseconds call_timeout{60000};

  struct send_run;

  /// Waits for `call`, bounded by `timeout` (0 = none) and the captured signals.
  /// `on_limit` / `on_interrupt` are what the wait yields in those cases.
  template <class T>
  expected<T> await(kj::Promise<expected<T>> call, std::chrono::milliseconds timeout, expected<T> on_limit,
                    expected<T> on_interrupt) {
    if (timeout.count() > 0) {
      call = call.exclusiveJoin(io.provider->getTimer()
                                    .afterDelay(timeout.count() * kj::MILLISECONDS)
                                    .then([r = kj::mv(on_limit)]() mutable { return kj::mv(r); }));
    }
    if (!signals.empty()) {
      auto shared = std::make_shared<expected<T>>(kj::mv(on_interrupt));
      for (int signo : signals) {
        call = call.exclusiveJoin(io.unixEventPort.onSignal(signo).then([this, shared](siginfo_t) {
          interrupted = true;
          return *shared;
        }));
      }
    }
    try {
      return call.wait(io.waitScope);
    } catch (const kj::Exception& e) {
      if (e.getType() == kj::Exception::Type::DISCONNECTED) {
        return make_error(errc::unavailable, "lost the connection to the canopy node at " + path + ": " +
                                                 e.getDescription().cStr());
      }
      return make_error(errc::failed, "the canopy node at " + path + " failed the call: " +
                                          e.getDescription().cStr());
    }
  }

  /// A one-shot call: the call timeout, and "interrupted" on a signal.
  template <class T>
  expected<T> call(kj::Promise<expected<T>> promise, const char* what) {
    return call_within<T>(kj::mv(promise), what, call_timeout);
  }

  /// A one-shot call bounded by `timeout`, and "interrupted" on a signal.
  template <class T>
  expected<T> call_within(kj::Promise<expected<T>> promise, const char* what, std::chrono::milliseconds timeout) {
    return await<T>(kj::mv(promise), timeout,
                    make_error(errc::timeout, std::string("the canopy node at ") + path + " did not answer " + what +
                                                  " within " + std::to_string(timeout.count()) + " ms"),
                    make_error(errc::failed, std::string(what) + ": interrupted"));
  }

  /// Runs a stream call (`answered`: its status, if the node ever answers)
  /// until its sink finishes, a limit, or an interrupt.
  expected<std::size_t> run_stream(kj::Promise<expected<void>> answered, std::shared_ptr<stream_state> state,
                                   const stream_options& options) {
    auto paf = kj::newPromiseAndFulfiller<void>();
    state->done = kj::mv(paf.fulfiller);
    state->options = &options;
    kj::Promise<expected<void>> ended = answered.exclusiveJoin(paf.promise.then([]() { return expected<void>{}; }));
    auto result = await<void>(kj::mv(ended), options.max_duration, expected<void>{}, expected<void>{});
    auto failure = state->failure;
    state->finish();  // late sink calls are ignored; the callbacks may go away
    // The call was dropped above: let the loop send its cancellation now, so the
    // node ends the subscription even if this client stays idle.
    io.waitScope.poll();
    if (!result) return std::move(result).err();
    if (failure) return *failure;
    return state->count;
  }
};

control_client::control_client(std::unique_ptr<impl> p) : impl_(std::move(p)) {}
control_client::~control_client() = default;
control_client::control_client(control_client&&) noexcept = default;
control_client& control_client::operator=(control_client&&) noexcept = default;

expected<control_client> control_client::connect(const std::string& socket_path) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (socket_path.empty()) return make_error(errc::unavailable, connect_error(socket_path, "the socket path is empty"));
  if (socket_path.size() >= sizeof(addr.sun_path)) {
    return make_error(errc::unavailable,
                      connect_error(socket_path, "the socket path is too long (at most " +
                                                     std::to_string(sizeof(addr.sun_path) - 1) + " bytes)"));
  }
  std::memcpy(addr.sun_path, socket_path.data(), socket_path.size());

  std::unique_ptr<impl> p;
  KJ_IF_MAYBE (e, kj::runCatchingExceptions([&] { p = std::make_unique<impl>(socket_path, kj::setupAsyncIo()); })) {
    return make_error(errc::failed, std::string("control client: cannot set up KJ async I/O (one client per "
                                                "thread): ") +
                                        e->getDescription().cStr());
  }

  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return make_error(errc::unavailable, connect_error(socket_path, std::strerror(errno)));
  if (::connect(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)) != 0) {
    int err = errno;
    ::close(fd);
    return make_error(errc::unavailable, connect_error(socket_path, std::strerror(err)));
  }
  p->stream = p->io.lowLevelProvider->wrapSocketFd(
      fd, kj::LowLevelAsyncIoProvider::TAKE_OWNERSHIP | kj::LowLevelAsyncIoProvider::ALREADY_CLOEXEC);
  p->rpc = kj::heap<capnp::TwoPartyClient>(*p->stream);
  p->control = p->rpc->bootstrap().castAs<schema::Control>();
  return control_client(std::move(p));
}

expected<std::vector<module_row>> control_client::list() {
  auto call = impl_->control.listRequest().send().then([](auto&& r) -> expected<std::vector<module_row>> {
    if (auto err = status_error(r.getStatus())) return *err;
    std::vector<module_row> rows;
    for (auto m : r.getModules()) {
      module_row row;
      row.name = m.getName();
      row.type = m.getType();
      row.version = m.getVersion();
      row.status = m.getStatus();
      row.desired_status = m.getDesiredStatus();
      row.restart_policy = m.getRestartPolicy();
      row.restart_count = m.getRestartCount();
      row.last_start_ms = m.getLastStartMs();
      row.last_exit_ms = m.getLastExitMs();
      row.last_exit_reason = m.getLastExitReason();
      rows.push_back(std::move(row));
    }
    return rows;
  });
  return impl_->call<std::vector<module_row>>(kj::mv(call), "list");
}

expected<void> control_client::restart(const std::string& module) {
  auto req = impl_->control.restartRequest();
  req.setModule(module);
  auto call = req.send().then([](auto&& r) -> expected<void> {
    if (auto err = status_error(r.getStatus())) return *err;
    return {};
  });
  return impl_->call<void>(kj::mv(call), "restart");
}

expected<void> control_client::deploy(const std::string& manifest_json, const std::string& base_dir) {
  auto req = impl_->control.deployRequest();
  req.setManifestJson(manifest_json);
  req.setBaseDir(base_dir);
  auto call = req.send().then([](auto&& r) -> expected<void> {
    if (auto err = status_error(r.getStatus())) return *err;
    return {};
  });
  return impl_->call<void>(kj::mv(call), "deploy");
}

expected<method_reply> control_client::invoke(const std::string& module, const std::string& method,
                                              const std::string& payload_json, std::chrono::milliseconds timeout) {
  auto req = impl_->control.invokeRequest();
  req.setModule(module);
  req.setMethod(method);
  req.setPayloadJson(payload_json);
  auto ms = std::max<std::int64_t>(0, timeout.count());
  req.setTimeoutMs(static_cast<std::uint32_t>(std::min<std::int64_t>(ms, UINT32_MAX)));
  auto call = req.send().then([](auto&& r) -> expected<method_reply> {
    if (auto err = status_error(r.getStatus())) return *err;
    return method_reply{r.getMethodStatus(), r.getPayloadJson()};
  });
  // The node enforces `timeout`; allow for the trip and the node's own answer.
  return impl_->call_within<method_reply>(kj::mv(call), "invoke", std::chrono::milliseconds(ms) + invoke_grace);
}

expected<twin_doc> control_client::twin(const std::string& module) {
  auto req = impl_->control.twinRequest();
  req.setModule(module);
  auto call = req.send().then([](auto&& r) -> expected<twin_doc> {
    if (auto err = status_error(r.getStatus())) return *err;
    return twin_doc{r.getDesiredJson(), r.getReportedJson()};
  });
  return impl_->call<twin_doc>(kj::mv(call), "twin");
}

expected<std::vector<std::string>> control_client::logs(const std::string& module, std::size_t tail) {
  auto req = impl_->control.logsRequest();
  req.setModule(module);
  req.setTail(static_cast<std::uint32_t>(std::min<std::size_t>(tail, UINT32_MAX)));
  auto call = req.send().then([](auto&& r) -> expected<std::vector<std::string>> {
    if (auto err = status_error(r.getStatus())) return *err;
    std::vector<std::string> lines;
    for (auto line : r.getLines()) lines.emplace_back(line);
    return lines;
  });
  return impl_->call<std::vector<std::string>>(kj::mv(call), "logs");
}

expected<std::size_t> control_client::follow_logs(const std::string& module,
                                                  const std::function<bool(const std::string&)>& on_line,
                                                  const stream_options& options) {
  auto state = std::make_shared<stream_state>();
  state->on_line = &on_line;
  auto req = impl_->control.followLogsRequest();
  req.setModule(module);
  req.setSink(kj::heap<log_sink>(state));
  // The RemotePromise (and its pipeline) must die with this statement: only then
  // does dropping `answered` cancel the call on the node.
  kj::Promise<expected<void>> answered = req.send().then([](auto&& r) { return stream_answer(r); });
  return impl_->run_stream(kj::mv(answered), state, options);
}

expected<std::size_t> control_client::monitor(std::int64_t after_seq, std::size_t backlog,
                                              const std::function<bool(const upstream_record&)>& on_record,
                                              const stream_options& options) {
  auto state = std::make_shared<stream_state>();
  state->on_record = &on_record;
  auto req = impl_->control.monitorRequest();
  req.setAfterSeq(after_seq);
  req.setBacklog(static_cast<std::uint32_t>(std::min<std::size_t>(backlog, UINT32_MAX)));
  req.setSink(kj::heap<message_sink>(state));
  kj::Promise<expected<void>> answered = req.send().then([](auto&& r) { return stream_answer(r); });
  return impl_->run_stream(kj::mv(answered), state, options);
}

expected<node_metrics> control_client::metrics() {
  auto call = impl_->control.metricsRequest().send().then([](auto&& r) -> expected<node_metrics> {
    if (auto err = status_error(r.getStatus())) return *err;
    auto m = r.getMetrics();
    node_metrics out;
    out.received = m.getReceived();
    out.sent = m.getSent();
    out.dropped_no_route = m.getDroppedNoRoute();
    out.dropped_ttl_expiry = m.getDroppedTtlExpiry();
    out.dropped_store_full = m.getDroppedStoreFull();
    out.redelivered = m.getRedelivered();
    for (auto q : m.getQueues()) {
      queue_metrics row;
      row.endpoint = q.getEndpoint();
      row.priority = q.getPriority();
      row.length = q.getLength();
      row.checkpoint = q.getCheckpoint();
      row.last_seq = q.getLastSeq();
      out.queues.push_back(std::move(row));
    }
    out.store_bytes = m.getStoreBytes();
    out.store_free_bytes = m.getStoreFreeBytes();
    out.store_limit_bytes = m.getStoreLimitBytes();
    out.commits = m.getCommits();
    out.commit_p50_us = m.getCommitP50Us();
    out.commit_p99_us = m.getCommitP99Us();
    out.commit_max_us = m.getCommitMaxUs();
    for (auto l : m.getLinks()) {
      link_metrics row;
      row.peer = l.getPeer();
      row.role = l.getRole();
      row.up = l.getUp();
      row.rtt_us = l.getRttUs();
      row.connects = l.getConnects();
      row.disconnects = l.getDisconnects();
      row.offline_ms_total = l.getOfflineMsTotal();
      row.last_change_ms = l.getLastChangeMs();
      row.last_error = l.getLastError();
      out.links.push_back(std::move(row));
    }
    out.refused_messages = m.getRefusedMessages();
    return out;
  });
  return impl_->call<node_metrics>(kj::mv(call), "metrics");
}

expected<std::uint64_t> control_client::send(const std::string& device, const std::string& module,
                                             const std::string& output, const message& msg) {
  auto req = impl_->control.sendRequest();
  fill_send(req, device, module, output, msg);
  auto call = req.send().then([](auto&& r) { return send_answer(r); });
  return impl_->call<std::uint64_t>(kj::mv(call), "send");
}

/// The client-thread side of one send_stream(): answers in flight, reported in order.
struct control_client::impl::send_run final : kj::TaskSet::ErrorHandler {
  const std::function<void(std::size_t, const expected<std::uint64_t>&)>* on_result = nullptr;
  std::shared_ptr<send_feed::state> feed;
  std::deque<std::optional<expected<std::uint64_t>>> waiting;  ///< answers of [first, next)
  std::size_t first = 0;      ///< index of waiting.front(): every earlier one was reported
  std::size_t next = 0;       ///< index of the next message sent
  bool input_done = false;    ///< the feed is closed and every message of it was sent
  bool stopped = false;       ///< the stream ended: report nothing more
  kj::Own<kj::PromiseFulfiller<expected<void>>> done;

  void finish(expected<void> result) {
    if (stopped) return;
    stopped = true;
    if (done.get() != nullptr && done->isWaiting()) done->fulfill(kj::mv(result));
  }

  /// Message `index` was answered: report it and every answered one after it,
  /// in order, up to the first still unanswered.
  void answered(std::size_t index, expected<std::uint64_t> answer) {
    if (stopped) return;
    waiting[index - first] = kj::mv(answer);
    std::size_t reported = 0;
    while (!stopped && !waiting.empty() && waiting.front().has_value()) {
      auto result = std::move(*waiting.front());
      waiting.pop_front();
      auto i = first++;
      ++reported;
      try {
        (*on_result)(i, result);
      } catch (const std::exception& e) {
        finish(make_error(errc::failed, std::string("the send callback threw: ") + e.what()));
      }
    }
    feed->release(reported);
    if (input_done && first == next) finish({});
  }

  void taskFailed(kj::Exception&& e) override {
    finish(make_error(errc::failed, std::string("send: ") + e.getDescription().cStr()));
  }
};

expected<std::size_t> control_client::send_stream(
    send_feed& feed, const std::function<void(std::size_t, const expected<std::uint64_t>&)>& on_result) {
  auto& p = *impl_;
  expected<void> result;
  std::size_t reported = 0;
  {
    impl::send_run run;
    run.on_result = &on_result;
    run.feed = feed.state_;
    auto timeout = p.call_timeout;
    std::function<void(std::vector<send_request>)> start;
    std::function<kj::Promise<void>()> pump;
    kj::TaskSet tasks(run);  // destroyed first: cancels the calls still in flight

    // One sendBatch call for what the producer pushed since the last one
    // (at most max_batch): a call per message would cost a round of the node's
    // I/O thread each.
    constexpr std::size_t max_batch = 512;
    start = [&](std::vector<send_request> items) {
      const auto base = run.next;
      const auto count = items.size();
      run.next += count;
      for (std::size_t i = 0; i < count; ++i) run.waiting.emplace_back();
      auto req = p.control.sendBatchRequest();
      auto list = req.initItems(static_cast<unsigned>(count));
      for (unsigned i = 0; i < count; ++i) {
        auto& item = items[i];
        auto out = list[i];
        out.setDevice(item.device);
        out.setModule(item.module);
        out.setOutput(item.output);
        auto bytes = item.msg.encoded();
        out.setMessage(kj::arrayPtr(reinterpret_cast<const kj::byte*>(bytes.data()), bytes.size()));
      }
      using answers = std::vector<expected<std::uint64_t>>;
      kj::Promise<answers> call = req.send().then([count](auto&& r) {
        answers out;
        auto results = r.getResults();
        for (std::size_t i = 0; i < count; ++i) {
          if (i >= results.size()) {
            // The node refused the batch as a whole (one result): that answers every item.
            out.push_back(results.size() == 1 ? send_answer(results[0]) : expected<std::uint64_t>(make_error(
                                                    errc::failed, "sendBatch: the node answered fewer items")));
            continue;
          }
          out.push_back(send_answer(results[static_cast<unsigned>(i)]));
        }
        return out;
      });
      if (timeout.count() > 0) {
        call = call.exclusiveJoin(
            p.io.provider->getTimer().afterDelay(timeout.count() * kj::MILLISECONDS).then([&p, timeout, count]() {
              return answers(count, expected<std::uint64_t>(make_error(
                                        errc::timeout, "the canopy node at " + p.path + " did not answer send within " +
                                                           std::to_string(timeout.count()) + " ms")));
            }));
      }
      tasks.add(call.then(
          [&run, base](answers all) -> kj::Promise<void> {
            for (std::size_t i = 0; i < all.size(); ++i) run.answered(base + i, kj::mv(all[i]));
            return kj::READY_NOW;
          },
          [&run, &p, base, count](kj::Exception&& e) -> kj::Promise<void> {
            std::string why = e.getDescription().cStr();
            if (e.getType() != kj::Exception::Type::DISCONNECTED) {
              for (std::size_t i = 0; i < count; ++i)
                run.answered(base + i,
                             make_error(errc::failed, "the canopy node at " + p.path + " failed the call: " + why));
              return kj::READY_NOW;
            }
            // evalLast: answers that arrived before the end are reported first.
            return kj::evalLast([&run, &p, why = kj::mv(why)]() {
              run.finish(
                  make_error(errc::unavailable, "lost the connection to the canopy node at " + p.path + ": " + why));
            });
          }));
    };

    // Takes what the producer pushed, a batch at a time; the feed's window
    // bounds how much that can be.
    pump = [&]() -> kj::Promise<void> {
      return run.feed->queue.when_ready().then([&]() -> kj::Promise<void> {
        if (run.stopped) return kj::READY_NOW;
        bool closed = run.feed->queue.closed();  // before take(): nothing is pushed after close
        std::vector<send_request> batch;
        for (auto& item : run.feed->queue.take()) {
          batch.push_back(std::move(item));
          if (batch.size() == max_batch) start(std::exchange(batch, {}));
        }
        if (!batch.empty()) start(std::move(batch));
        if (closed) {
          run.input_done = true;
          if (run.first == run.next) run.finish({});
          return kj::READY_NOW;
        }
        return pump();
      });
    };

    auto paf = kj::newPromiseAndFulfiller<expected<void>>();
    run.done = kj::mv(paf.fulfiller);
    tasks.add(pump());
    // Calls in flight fail when the connection breaks; this notices it while
    // none is (the producer is waiting for input).
    auto lost = [&run, &p]() {
      return kj::evalLast([&run, &p]() {
        run.finish(make_error(errc::unavailable,
                              "lost the connection to the canopy node at " + p.path + ": the node closed it"));
      });
    };
    tasks.add(p.rpc->onDisconnect().then(lost, [lost](kj::Exception&&) { return lost(); }));
    result = p.await<void>(kj::mv(paf.promise), std::chrono::milliseconds{0}, expected<void>{},
                           make_error(errc::failed, "send: interrupted"));
    run.stopped = true;
    run.feed->end();
    reported = run.first;
  }
  // The calls were dropped above: let the loop send their cancellations now.
  p.io.waitScope.poll();
  if (!result) return std::move(result).err();
  return reported;
}

void control_client::set_call_timeout(std::chrono::milliseconds timeout) { impl_->call_timeout = timeout; }

void control_client::interrupt_on(int signo) {
  for (int s : impl_->signals) {
    if (s == signo) return;
  }
  kj::UnixEventPort::captureSignal(signo);
  impl_->signals.push_back(signo);
}

bool control_client::interrupted() const noexcept { return impl_->interrupted; }

const std::string& control_client::socket_path() const noexcept { return impl_->path; }

}  // namespace canopy
