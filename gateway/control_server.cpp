#include "gateway/control_server.hpp"

// GCC 12 reports a false -Wmaybe-uninitialized inside std::variant when an
// expected<T> is moved through a kj::Promise (ExceptionOr<expected<T>>).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include "gateway/io_thread.hpp"
#include "gateway/reply_bridge.hpp"
#include "gateway/task_counter.hpp"

#include <control.capnp.h>

#include <capnp/rpc-twoparty.h>
#include <kj/debug.h>
#include <spdlog/spdlog.h>

#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <memory>
#include <string_view>
#include <system_error>

#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

namespace canopy {

namespace {

// --- Results ---------------------------------------------------------------

schema::ErrorCode to_schema(errc code) {
  switch (code) {
    case errc::invalid_argument: return schema::ErrorCode::INVALID_ARGUMENT;
    case errc::not_found: return schema::ErrorCode::NOT_FOUND;
    case errc::incompatible: return schema::ErrorCode::INCOMPATIBLE;
    case errc::io_error: return schema::ErrorCode::IO_ERROR;
    case errc::store_error: return schema::ErrorCode::STORE_ERROR;
    case errc::timeout: return schema::ErrorCode::TIMEOUT;
    case errc::unavailable: return schema::ErrorCode::UNAVAILABLE;
    case errc::failed: return schema::ErrorCode::FAILED;
    case errc::already_exists: return schema::ErrorCode::INVALID_ARGUMENT;
  }
  return schema::ErrorCode::FAILED;
}

void set_error(schema::Status::Builder status, const error& err) {
  status.setCode(to_schema(err.code));
  status.setMessage(err.message);
}

/// Fills `status` from `result`; true if it is a success.
template <class T>
bool set_status(schema::Status::Builder status, const expected<T>& result) {
  if (result) {
    status.setCode(schema::ErrorCode::OK);
    return true;
  }
  set_error(status, result.err());
  return false;
}

// --- Subscriptions -----------------------------------------------------------

/// Ends a node_control subscription when the call that owns it goes away (on the I/O thread).
template <class T>
class subscription_guard {
 public:
  subscription_guard(node_control& node, node_control::subscription_id id,
                     std::shared_ptr<cross_thread_queue<T>> queue, std::shared_ptr<task_counter> tracker)
      : node_(node), id_(id), queue_(std::move(queue)), count_(std::move(tracker)) {}
  ~subscription_guard() {
    queue_->close();
    node_.unsubscribe(id_);
  }
  subscription_guard(const subscription_guard&) = delete;
  subscription_guard& operator=(const subscription_guard&) = delete;

 private:
  node_control& node_;
  node_control::subscription_id id_;
  std::shared_ptr<cross_thread_queue<T>> queue_;
  counted count_;  // declared last: the server's count ends once the rest is done
};

kj::Promise<void> send_line(schema::LogSink::Client& sink, const std::string& line) {
  auto req = sink.lineRequest();
  req.setText(line);
  return req.send();
}

kj::Promise<void> send_line(schema::MessageSink::Client& sink, const upstream_record& rec) {
  auto req = sink.recordRequest();
  auto r = req.initRecord();
  r.setSeq(rec.seq);
  r.setEnqueuedMs(rec.enqueued_ms);
  r.setSourceModule(rec.source_module);
  r.setOutput(rec.output);
  auto bytes = rec.msg.encoded();
  r.setMessage(kj::arrayPtr(reinterpret_cast<const kj::byte*>(bytes.data()), bytes.size()));
  return req.send();
}

/// Moves items from `queue` into `sink`, one streaming call at a time, so the
/// sink's flow control holds items back in `queue` (which drops, and counts, the
/// excess). Never resolves; rejects when a sink call fails.
template <class Sink, class T>
kj::Promise<void> pump(Sink sink, std::shared_ptr<cross_thread_queue<T>> queue) {
  auto ready = queue->when_ready();
  return ready.then([sink = kj::mv(sink), queue = kj::mv(queue)]() mutable -> kj::Promise<void> {
    auto items = std::make_shared<std::vector<T>>(queue->take());
    auto dropped = queue->take_dropped();
    kj::Promise<void> sent = kj::READY_NOW;
    for (std::size_t i = 0; i < items->size(); ++i) {
      sent = sent.then([sink, items, i]() mutable { return send_line(sink, (*items)[i]); });
    }
    if (dropped != 0) {
      sent = sent.then([sink, dropped]() mutable {
        auto req = sink.droppedRequest();
        req.setCount(dropped);
        return req.send();
      });
    }
    return sent.then([sink = kj::mv(sink), queue = kj::mv(queue)]() mutable {
      return pump(kj::mv(sink), kj::mv(queue));
    });
  });
}

// --- The service ---------------------------------------------------------------

class control_service final : public schema::Control::Server {
 public:
  control_service(node_control& node, const control_limits& limits, std::shared_ptr<task_counter> tracker)
      : node_(node), limits_(limits), tracker_(std::move(tracker)) {}

  kj::Promise<void> list(ListContext context) override {
    auto bridge = make_bridge<std::vector<module_row>>("list");
    node_.list(std::move(bridge.callback));
    return bridge.promise.then([context](expected<std::vector<module_row>> rows) mutable {
      auto results = context.getResults();
      if (!set_status(results.initStatus(), rows)) return;
      auto out = results.initModules(static_cast<unsigned>(rows->size()));
      for (unsigned i = 0; i < rows->size(); ++i) {
        const auto& row = (*rows)[i];
        auto o = out[i];
        o.setName(row.name);
        o.setType(row.type);
        o.setVersion(row.version);
        o.setStatus(row.status);
        o.setDesiredStatus(row.desired_status);
        o.setRestartPolicy(row.restart_policy);
        o.setRestartCount(row.restart_count);
        o.setLastStartMs(row.last_start_ms);
        o.setLastExitMs(row.last_exit_ms);
        o.setLastExitReason(row.last_exit_reason);
      }
    });
  }

  kj::Promise<void> restart(RestartContext context) override {
    auto bridge = make_bridge<void>("restart");
    node_.restart(context.getParams().getModule(), std::move(bridge.callback));
    return bridge.promise.then([context](expected<void> done) mutable {
      set_status(context.getResults().initStatus(), done);
    });
  }

  kj::Promise<void> deploy(DeployContext context) override {
    auto params = context.getParams();
    auto bridge = make_bridge<void>("deploy");
    node_.deploy(params.getManifestJson(), params.getBaseDir(), std::move(bridge.callback));
    return bridge.promise.then([context](expected<void> done) mutable {
      set_status(context.getResults().initStatus(), done);
    });
  }

  kj::Promise<void> invoke(InvokeContext context) override {
    auto params = context.getParams();
    auto bridge = make_bridge<method_reply>("invoke");
    node_.invoke(params.getModule(), params.getMethod(), params.getPayloadJson(),
                 std::chrono::milliseconds(params.getTimeoutMs()), std::move(bridge.callback));
    return bridge.promise.then([context](expected<method_reply> reply) mutable {
      auto results = context.getResults();
      if (!set_status(results.initStatus(), reply)) return;
      results.setMethodStatus(reply->status);
      results.setPayloadJson(reply->payload_json);
    });
  }

  kj::Promise<void> twin(TwinContext context) override {
    auto bridge = make_bridge<twin_doc>("twin");
    node_.twin(context.getParams().getModule(), std::move(bridge.callback));
    return bridge.promise.then([context](expected<twin_doc> doc) mutable {
      auto results = context.getResults();
      if (!set_status(results.initStatus(), doc)) return;
      results.setDesiredJson(doc->desired_json);
      results.setReportedJson(doc->reported_json);
    });
  }

  kj::Promise<void> logs(LogsContext context) override {
    auto params = context.getParams();
    auto bridge = make_bridge<std::vector<std::string>>("logs");
    node_.logs(params.getModule(), params.getTail(), std::move(bridge.callback));
    return bridge.promise.then([context](expected<std::vector<std::string>> lines) mutable {
      auto results = context.getResults();
      if (!set_status(results.initStatus(), lines)) return;
      auto out = results.initLines(static_cast<unsigned>(lines->size()));
      for (unsigned i = 0; i < lines->size(); ++i) out.set(i, (*lines)[i]);
    });
  }

  kj::Promise<void> followLogs(FollowLogsContext context) override {
    auto params = context.getParams();
    auto queue = std::make_shared<cross_thread_queue<std::string>>(limits_.log_queue);
    auto id = node_.follow_logs(params.getModule(), [queue](std::string line) { queue->push(std::move(line)); });
    if (!id) {
      set_error(context.getResults().initStatus(), id.err());
      return kj::READY_NOW;
    }
    auto guard = kj::heap<subscription_guard<std::string>>(node_, *id, queue, tracker_);
    context.allowCancellation();  // a client that goes away ends the subscription
    return pump(params.getSink(), kj::mv(queue)).attach(kj::mv(guard));
  }

  kj::Promise<void> monitor(MonitorContext context) override {
    auto params = context.getParams();
    if (params.getBacklog() > limits_.max_backlog) {
      set_error(context.getResults().initStatus(),
                make_error(errc::invalid_argument, "backlog: " + std::to_string(params.getBacklog()) +
                                                       " exceeds the limit of " +
                                                       std::to_string(limits_.max_backlog)));
      return kj::READY_NOW;
    }
    auto queue = std::make_shared<cross_thread_queue<upstream_record>>(limits_.record_queue + params.getBacklog());
    auto id = node_.monitor(params.getAfterSeq(), params.getBacklog(),
                            [queue](upstream_record rec) { queue->push(std::move(rec)); });
    if (!id) {
      set_error(context.getResults().initStatus(), id.err());
      return kj::READY_NOW;
    }
    auto guard = kj::heap<subscription_guard<upstream_record>>(node_, *id, queue, tracker_);
    context.allowCancellation();
    return pump(params.getSink(), kj::mv(queue)).attach(kj::mv(guard));
  }

  kj::Promise<void> metrics(MetricsContext context) override {
    auto bridge = make_bridge<node_metrics>("metrics");
    node_.metrics(std::move(bridge.callback));
    return bridge.promise.then([context](expected<node_metrics> m) mutable {
      auto results = context.getResults();
      if (!set_status(results.initStatus(), m)) return;
      auto out = results.initMetrics();
      out.setReceived(m->received);
      out.setSent(m->sent);
      out.setDroppedNoRoute(m->dropped_no_route);
      out.setDroppedTtlExpiry(m->dropped_ttl_expiry);
      out.setDroppedStoreFull(m->dropped_store_full);
      out.setRedelivered(m->redelivered);
      auto queues = out.initQueues(static_cast<unsigned>(m->queues.size()));
      for (unsigned i = 0; i < m->queues.size(); ++i) {
        const auto& q = m->queues[i];
        auto o = queues[i];
        o.setEndpoint(q.endpoint);
        o.setPriority(q.priority);
        o.setLength(q.length);
        o.setCheckpoint(q.checkpoint);
        o.setLastSeq(q.last_seq);
      }
      out.setStoreBytes(m->store_bytes);
      out.setStoreFreeBytes(m->store_free_bytes);
      out.setStoreLimitBytes(m->store_limit_bytes);
      out.setCommits(m->commits);
      out.setCommitP50Us(m->commit_p50_us);
      out.setCommitP99Us(m->commit_p99_us);
      out.setCommitMaxUs(m->commit_max_us);
      auto links = out.initLinks(static_cast<unsigned>(m->links.size()));
      for (unsigned i = 0; i < m->links.size(); ++i) {
        const auto& l = m->links[i];
        auto o = links[i];
        o.setPeer(l.peer);
        o.setRole(l.role);
        o.setUp(l.up);
        o.setRttUs(l.rtt_us);
        o.setConnects(l.connects);
        o.setDisconnects(l.disconnects);
        o.setOfflineMsTotal(l.offline_ms_total);
        o.setLastChangeMs(l.last_change_ms);
        o.setLastError(l.last_error);
      }
      out.setRefusedMessages(m->refused_messages);
    });
  }

  kj::Promise<void> send(SendContext context) override {
    auto params = context.getParams();
    return send_one(params.getDevice(), params.getModule(), params.getOutput(), params.getMessage())
      .then([context](expected<std::uint64_t> targets) mutable {
        auto results = context.getResults();
        if (!set_status(results.initStatus(), targets)) return;
        results.setTargets(*targets);
      });
  }

  kj::Promise<void> sendBatch(SendBatchContext context) override {
    auto items = context.getParams().getItems();
    constexpr unsigned max_items = 4096;
    if (items.size() > max_items) {
      auto results = context.getResults().initResults(1);
      set_error(results[0].initStatus(), make_error(errc::invalid_argument,
                                                    "sendBatch: " + std::to_string(items.size()) +
                                                      " items; at most " + std::to_string(max_items)));
      return kj::READY_NOW;
    }
    // Checked here; what passes goes to the node as one batch (one answer
    // crosses back to this thread for all of it).
    std::vector<expected<std::uint64_t>> checked;
    std::vector<send_item> batch;
    checked.reserve(items.size());
    batch.reserve(items.size());
    for (auto item : items) {
      auto one = check_one(item.getDevice(), item.getModule(), item.getMessage());
      if (!one) {
        checked.push_back(std::move(one).err());
        continue;
      }
      checked.push_back(std::uint64_t{0});
      batch.push_back(send_item{std::move(one->device), std::move(one->module), std::string{item.getOutput()},
                                std::move(one->msg)});
    }
    auto bridge = make_bridge<std::vector<expected<std::uint64_t>>>("sendBatch");
    node_.send_batch(std::move(batch), [cb = std::move(bridge.callback)](std::vector<expected<std::uint64_t>> r) {
      cb(std::move(r));
    });
    return bridge.promise.then([context, checked = std::move(checked)](
                                 expected<std::vector<expected<std::uint64_t>>> answered) mutable {
      auto results = context.getResults().initResults(static_cast<unsigned>(checked.size()));
      std::size_t next = 0;  // the next answer of the node
      for (unsigned i = 0; i < checked.size(); ++i) {
        expected<std::uint64_t> r = std::move(checked[i]);
        if (r) {
          if (!answered)
            r = answered.err();
          else if (next < answered->size())
            r = std::move((*answered)[next++]);
          else
            r = make_error(errc::failed, "sendBatch: the node answered fewer items");
        }
        if (set_status(results[i].initStatus(), r))
          results[i].setTargets(*r);
      }
    });
  }

 private:
  /// A message of send / sendBatch as the client gave it: it names a sender
  /// and decodes.
  struct checked_send {
    std::string device;
    std::string module;
    message msg;
  };
  static expected<checked_send> check_one(capnp::Text::Reader device_text, capnp::Text::Reader module_text,
                                          capnp::Data::Reader bytes) {
    std::string device = device_text;
    std::string module = module_text;
    if (device.empty() && module.empty())
      return make_error(errc::invalid_argument, "send: no sender: give a device or a module");
    auto msg = message::decode(std::string_view(reinterpret_cast<const char*>(bytes.begin()), bytes.size()));
    if (!msg) {
      return make_error(errc::invalid_argument,
                        "send: message: " + std::to_string(bytes.size()) +
                          " bytes that do not decode as a canopy message (expected canopy::message::encoded())");
    }
    return checked_send{std::move(device), std::move(module), std::move(*msg)};
  }

  /// One message of send: checked, handed to the node, answered once durable.
  kj::Promise<expected<std::uint64_t>> send_one(capnp::Text::Reader device_text, capnp::Text::Reader module_text,
                                                capnp::Text::Reader output, capnp::Data::Reader bytes) {
    auto one = check_one(device_text, module_text, bytes);
    if (!one)
      return expected<std::uint64_t>(std::move(one).err());
    auto bridge = make_bridge<std::uint64_t>("send");
    node_.send(std::move(one->device), std::move(one->module), std::string{output}, std::move(one->msg),
               std::move(bridge.callback));
    return kj::mv(bridge.promise);
  }

  node_control& node_;
  control_limits limits_;
  std::shared_ptr<task_counter> tracker_;
};

}  // namespace

void node_control::send_batch(std::vector<send_item> items,
                              std::function<void(std::vector<expected<std::uint64_t>>)> done) {
  struct join {
    std::vector<expected<std::uint64_t>> results;
    std::atomic<std::size_t> remaining;
    std::function<void(std::vector<expected<std::uint64_t>>)> done;
  };
  if (items.empty()) {
    done({});
    return;
  }
  auto j = std::make_shared<join>();
  j->results.assign(items.size(), expected<std::uint64_t>(std::uint64_t{0}));
  j->remaining = items.size();
  j->done = std::move(done);
  for (std::size_t i = 0; i < items.size(); ++i) {
    auto& it = items[i];
    send(std::move(it.device), std::move(it.module), std::move(it.output), std::move(it.msg),
         [j, i](expected<std::uint64_t> r) {
           j->results[i] = std::move(r);
           if (j->remaining.fetch_sub(1, std::memory_order_acq_rel) == 1)
             j->done(std::move(j->results));
         });
  }
}

namespace {

// --- The socket ------------------------------------------------------------------

std::string errno_text(int err) { return std::strerror(err); }

/// A closed-on-scope-exit file descriptor.
class unique_fd {
 public:
  explicit unique_fd(int fd = -1) : fd_(fd) {}
  ~unique_fd() {
    if (fd_ >= 0) ::close(fd_);
  }
  unique_fd(const unique_fd&) = delete;
  unique_fd& operator=(const unique_fd&) = delete;
  int get() const { return fd_; }
  int release() { return std::exchange(fd_, -1); }

 private:
  int fd_;
};

expected<sockaddr_un> unix_address(const std::string& path) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.empty()) return make_error(errc::invalid_argument, "control socket path is empty");
  if (path.size() >= sizeof(addr.sun_path)) {
    return make_error(errc::invalid_argument, "control socket path is too long (" + std::to_string(path.size()) +
                                                  " bytes, at most " + std::to_string(sizeof(addr.sun_path) - 1) +
                                                  "): " + path);
  }
  std::memcpy(addr.sun_path, path.data(), path.size());
  return addr;
}

/// Removes a socket file nobody listens on; refuses a live one or any other file.
expected<void> clear_stale_socket(const std::string& path, const sockaddr_un& addr) {
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0) {
    if (errno == ENOENT) return {};
    return make_error(errc::io_error, "cannot stat control socket " + path + ": " + errno_text(errno));
  }
  if (!S_ISSOCK(st.st_mode)) {
    return make_error(errc::io_error, path + " exists and is not a socket; refusing to replace it");
  }
  unique_fd probe(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (probe.get() < 0) return make_error(errc::io_error, "socket(AF_UNIX): " + errno_text(errno));
  if (::connect(probe.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)) == 0) {
    return make_error(errc::unavailable, "another process is already serving the control socket " + path);
  }
  if (errno != ECONNREFUSED) {
    return make_error(errc::io_error, "cannot probe existing control socket " + path + ": " + errno_text(errno));
  }
  if (::unlink(path.c_str()) != 0 && errno != ENOENT) {
    return make_error(errc::io_error, "cannot remove stale control socket " + path + ": " + errno_text(errno));
  }
  spdlog::info("control socket: removed stale socket file {}", path);
  return {};
}

/// socket + bind (mode 0660) + listen; the returned fd is non-blocking and close-on-exec.
expected<int> open_listen_socket(const std::string& path) {
  auto addr = unix_address(path);
  if (!addr) return addr.err();
  auto parent = std::filesystem::path(path).parent_path();
  if (!parent.empty()) {
    std::error_code ec;
    std::filesystem::create_directories(parent, ec);
    if (ec) {
      return make_error(errc::io_error,
                        "cannot create the control socket's directory " + parent.string() + ": " + ec.message());
    }
  }
  if (auto cleared = clear_stale_socket(path, *addr); !cleared) return cleared.err();

  unique_fd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (fd.get() < 0) return make_error(errc::io_error, "socket(AF_UNIX): " + errno_text(errno));
  if (::bind(fd.get(), reinterpret_cast<const sockaddr*>(&*addr), sizeof(*addr)) != 0) {
    return make_error(errc::io_error, "cannot bind the control socket " + path + ": " + errno_text(errno));
  }
  // TODO(security): the file exists with the umask's mode until this chmod;
  // the parent directory's mode is what guards that moment.
  if (::chmod(path.c_str(), 0660) != 0) {
    int err = errno;
    ::unlink(path.c_str());
    return make_error(errc::io_error, "cannot chmod 0660 the control socket " + path + ": " + errno_text(err));
  }
  if (::listen(fd.get(), 64) != 0) {
    int err = errno;
    ::unlink(path.c_str());
    return make_error(errc::io_error, "cannot listen on the control socket " + path + ": " + errno_text(err));
  }
  return fd.release();
}

}  // namespace

// --- control_server ------------------------------------------------------------------

struct control_server::impl {
  // All touched only on the I/O thread.
  kj::Canceler canceler;
  bool stopping = false;
  std::shared_ptr<task_counter> tracker = std::make_shared<task_counter>();
};

control_server::control_server(std::string socket_path, node_control& node, control_limits limits)
    : path_(std::move(socket_path)), node_(node), limits_(limits) {}

control_server::~control_server() { stop(); }

expected<void> control_server::start(io_thread& io) {
  if (impl_) return make_error(errc::invalid_argument, "control server for " + path_ + " already started");
  if (!io.running()) return make_error(errc::unavailable, "control server: the I/O thread is not running");

  auto fd = open_listen_socket(path_);
  if (!fd) return fd.err();
  struct stat st {};
  if (::stat(path_.c_str(), &st) == 0) {
    socket_dev_ = st.st_dev;
    socket_ino_ = st.st_ino;
  }

  auto state = std::make_unique<impl>();
  bool handed_over = false;
  KJ_IF_MAYBE (e, kj::runCatchingExceptions([&] {
                 io.run_sync([&](kj::AsyncIoContext& ctx) {
                   handed_over = true;
                   auto receiver = ctx.lowLevelProvider->wrapListenSocketFd(
                       *fd, kj::LowLevelAsyncIoProvider::TAKE_OWNERSHIP |
                                kj::LowLevelAsyncIoProvider::ALREADY_CLOEXEC |
                                kj::LowLevelAsyncIoProvider::ALREADY_NONBLOCK);
                   auto server = kj::heap<capnp::TwoPartyServer>(kj::heap<control_service>(node_, limits_, state->tracker));
                   auto listening = server->listen(*receiver).attach(kj::mv(server), kj::mv(receiver));
                   auto* s = state.get();
                   io.add_task(s->canceler.wrap(kj::mv(listening)).catch_([s, path = path_](kj::Exception&& e) {
                     if (!s->stopping) {
                       spdlog::error("control socket {}: stopped accepting: {}", path, e.getDescription().cStr());
                     }
                   }));
                 });
               })) {
    if (!handed_over) ::close(*fd);
    ::unlink(path_.c_str());
    return make_error(errc::io_error,
                      "cannot serve the control socket " + path_ + ": " + e->getDescription().cStr());
  }
  io_ = &io;
  impl_ = std::move(state);
  spdlog::info("control socket: listening on {}", path_);
  return {};
}

void control_server::stop() {
  if (!impl_) return;
  if (io_->running()) {
    auto* s = impl_.get();
    KJ_IF_MAYBE (e, kj::runCatchingExceptions([&] {
                   io_->run_sync([s](kj::AsyncIoContext& ctx) {
                     s->stopping = true;
                     s->canceler.cancel("the control server stopped");
                     // The RPC system cancels the calls of the connections it just
                     // lost on later turns: wait for their subscriptions to end.
                     return s->tracker->when_idle().exclusiveJoin(
                         ctx.provider->getTimer().afterDelay(5 * kj::SECONDS).then([] {
                           spdlog::warn("control socket: subscriptions still open 5 s after stop");
                         }));
                   });
                 })) {
      // The loop went away meanwhile: it destroyed the connections itself.
      spdlog::debug("control socket: stop after the I/O thread: {}", e->getDescription().cStr());
    }
  }
  // Remove the socket file only if it is still the one we bound.
  struct stat st {};
  if (::lstat(path_.c_str(), &st) == 0 && S_ISSOCK(st.st_mode) && st.st_dev == socket_dev_ &&
      st.st_ino == socket_ino_) {
    ::unlink(path_.c_str());
  }
  impl_.reset();
  io_ = nullptr;
}

}  // namespace canopy
