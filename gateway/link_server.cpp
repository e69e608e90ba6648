// The parent's end of the links (gateway/link.hpp): listens, authenticates
// children by TLS client certificate, asks link_host to admit them, and serves
// each one a Parent bound to its certificate's CN.
#include "gateway/link.hpp"

// GCC 12 reports a false -Wmaybe-uninitialized inside std::variant when an
// expected<T> is moved through a kj::Promise (ExceptionOr<expected<T>>).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include "gateway/io_thread.hpp"
#include "gateway/link_rpc.hpp"
#include "gateway/reply_bridge.hpp"
#include "gateway/tls.hpp"

#include <link.capnp.h>

#include <capnp/rpc-twoparty.h>
#include <capnp/rpc.h>
#include <kj/compat/tls.h>
#include <kj/debug.h>
#include <spdlog/spdlog.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <map>
#include <optional>
#include <utility>

namespace canopy {

using namespace link_rpc;

namespace {

/// How long a refused child gets to read the refusal before the parent hangs up.
constexpr auto refusal_grace = 1 * kj::SECONDS;
/// How long a parent waits for a child's invoke answer beyond the method's own timeout.
constexpr std::chrono::milliseconds invoke_grace{2000};

std::string peer_address(kj::AuthenticatedStream& stream) {
  if (auto* id = dynamic_cast<kj::NetworkPeerIdentity*>(stream.peerIdentity.get())) {
    return id->getAddress().toString().cStr();
  }
  return "(unknown address)";
}

class server_connection;

}  // namespace

struct link_server::impl {
  impl(link_server_options o, link_host& h) : options(std::move(o)), host(h) {}

  link_server_options options;
  link_host& host;
  std::atomic<io_thread*> io{nullptr};  // set by start(), cleared by stop() (main thread)
  std::atomic<std::uint16_t> port{0};

  // I/O thread only.
  kj::Canceler accepting;
  bool stopping = false;
  std::uint64_t next_id = 1;
  std::map<std::uint64_t, server_connection*> connections;  // every accepted one, until it ends
  std::shared_ptr<task_counter> tasks = std::make_shared<task_counter>();
};

namespace {

/// What a connection's service objects and its channel share with it. `live`
/// is touched on the I/O thread only; `id` and `child_id` never change once the
/// channel exists, so any thread may read them.
struct connection_shared {
  std::uint64_t id = 0;
  std::string address;
  std::string child_id;               // the certificate's CN, after TLS
  server_connection* live = nullptr;  // null once the connection ended
  std::size_t pending_uploads = 0;    // upload calls waiting for link_host
};

/// Counts one pending upload of a connection while it lives.
class pending_upload {
 public:
  explicit pending_upload(std::shared_ptr<connection_shared> conn) : conn_(std::move(conn)) {
    ++conn_->pending_uploads;
  }
  ~pending_upload() { --conn_->pending_uploads; }
  pending_upload(const pending_upload&) = delete;
  pending_upload& operator=(const pending_upload&) = delete;

 private:
  std::shared_ptr<connection_shared> conn_;
};

/// One child's TCP connection, from accept to close. Lives on the I/O thread,
/// owned by its task (run() with the object attached).
class server_connection {
 public:
  server_connection(std::shared_ptr<link_server::impl> server, kj::AuthenticatedStream raw,
                    std::uint64_t id, std::string address, kj::Timer& timer);
  ~server_connection();
  server_connection(const server_connection&) = delete;
  server_connection& operator=(const server_connection&) = delete;

  /// The whole life of the connection; resolves when it is over (never fails).
  kj::Promise<void> run();

  /// Ends the connection soon (on a later turn). The first reason wins.
  void close(std::string reason);

  bool closing() const { return closing_; }
  bool up() const { return up_; }
  schema::Child::Client& child() { return KJ_ASSERT_NONNULL(child_); }

  /// hello succeeded: the child is connected through a new channel.
  void bring_up(schema::Child::Client child, std::string software);

  /// A refused child's call was answered: hang up after a grace period.
  void refusal_answered();

 private:
  kj::Promise<void> handshake();
  kj::Promise<void> refuse(const error& why);
  void start_rpc(capnp::Capability::Client bootstrap);
  void set_reason(std::string reason) {
    if (reason_.empty())
      reason_ = std::move(reason);
  }

  counted counted_;
  std::shared_ptr<link_server::impl> server_;
  std::shared_ptr<connection_shared> shared_;
  kj::Timer& timer_;
  kj::AuthenticatedStream raw_;
  std::string reason_;
  bool closing_ = false;
  bool up_ = false;
  kj::Own<kj::PromiseFulfiller<void>> close_fulfiller_;
  kj::Promise<void> closed_ = nullptr;
  kj::Own<kj::PromiseFulfiller<void>> refusal_fulfiller_;
  // Destroyed in reverse order: the RPC system first, the stream last.
  kj::Own<kj::AsyncIoStream> stream_;
  kj::Own<capnp::TwoPartyVatNetwork> network_;
  kj::Own<rpc_system> rpc_;
  kj::Maybe<schema::Child::Client> child_;
};

/// The way down to one connected child (link_host's handle).
class channel_impl final : public child_channel {
 public:
  channel_impl(std::shared_ptr<link_server::impl> server, std::shared_ptr<connection_shared> conn)
      : server_(std::move(server)), conn_(std::move(conn)) {}

  std::uint64_t id() const override { return conn_->id; }
  const std::string& child_id() const override { return conn_->child_id; }

  void sync_scope(std::vector<device_record> entries, reply_fn<void> done) override {
    call<void>("sync_scope", std::move(done),
               [entries = std::move(entries)](schema::Child::Client& child, kj::AsyncIoContext&) {
                 auto req = child.syncScopeRequest();
                 auto list = req.initEntries(static_cast<unsigned>(entries.size()));
                 for (unsigned i = 0; i < entries.size(); ++i)
                   fill(list[i], entries[i]);
                 return req.send().then([](capnp::Response<schema::Child::SyncScopeResults>&&) {
                   return expected<void>{};
                 });
               });
  }

  void desired(std::vector<twin_update> updates, reply_fn<void> done) override {
    call<void>("desired", std::move(done),
               [updates = std::move(updates)](schema::Child::Client& child, kj::AsyncIoContext&) {
                 auto req = child.desiredRequest();
                 fill(req.initUpdates(static_cast<unsigned>(updates.size())), updates);
                 return req.send().then([](capnp::Response<schema::Child::DesiredResults>&&) {
                   return expected<void>{};
                 });
               });
  }

  void invoke(std::string device, std::string module, std::string method, std::string payload_json,
              std::chrono::milliseconds timeout, reply_fn<method_reply> done) override {
    std::string child = conn_->child_id;
    call<method_reply>(
      "invoke", std::move(done),
      [device = std::move(device), module = std::move(module), method = std::move(method),
       payload = std::move(payload_json), timeout,
       child](schema::Child::Client& c, kj::AsyncIoContext& ctx) {
        auto req = c.invokeRequest();
        req.setDevice(device);
        req.setModule(module);
        req.setMethod(method);
        req.setPayload(payload);
        req.setTimeoutMs(clamp_ms(timeout));
        auto answer = req.send().then([](capnp::Response<schema::Child::InvokeResults>&& r) {
          return expected<method_reply>(method_reply{r.getStatus(), string_of(r.getPayload())});
        });
        // The child answers at its timeout; this only guards against one that never does.
        auto limit = timeout + invoke_grace;
        auto late = ctx.provider->getTimer()
                      .afterDelay(static_cast<std::int64_t>(limit.count()) * kj::MILLISECONDS)
                      .then([child, limit]() -> expected<method_reply> {
                        return make_error(errc::timeout, "no answer from child '" + child +
                                                           "' within " + ms_text(limit));
                      });
        return answer.exclusiveJoin(kj::mv(late));
      });
  }

  void close(std::string reason) override {
    auto conn = conn_;
    auto* io = server_->io.load();
    if (io == nullptr)
      return;
    io->post([conn, reason = std::move(reason)](kj::AsyncIoContext&) mutable {
      if (conn->live != nullptr)
        conn->live->close(std::move(reason));
    });
  }

 private:
  /// Posts `make_call(child, ctx)` (returning kj::Promise<expected<T>>) to the
  /// I/O thread and answers `done` with its outcome, exactly once.
  template <class T, class F>
  void call(const char* what, reply_fn<T> done, F make_call) {
    auto reply = std::make_shared<once_reply<T>>(
      std::move(done), std::string(what) + " to child '" + conn_->child_id + "'");
    auto* io = server_->io.load();
    if (io == nullptr) {
      reply->answer(make_error(errc::unavailable, reply->what() + ": the link server is stopped"));
      return;
    }
    auto conn = conn_;
    auto server = server_;
    bool posted = io->post(
      [reply, conn, server, make_call = std::move(make_call)](kj::AsyncIoContext& ctx) mutable {
        auto* c = conn->live;
        if (c == nullptr || c->closing() || !c->up()) {
          reply->answer(
            make_error(errc::unavailable, reply->what() + ": the link to the child is down"));
          return;
        }
        auto promise = kj::evalNow([&] { return make_call(c->child(), ctx); });
        server->io.load()->add_task(answer_when_settled(kj::mv(promise), reply, server->tasks));
      });
    if (!posted)
      reply->answer(
        make_error(errc::unavailable, reply->what() + ": the I/O thread is not running"));
  }

  std::shared_ptr<link_server::impl> server_;
  std::shared_ptr<connection_shared> conn_;
};

/// The bootstrap capability of one connection: a Parent bound to the child the
/// TLS handshake authenticated, or, for a refused child, one whose every call
/// fails with the reason.
class parent_service final : public schema::Parent::Server {
 public:
  parent_service(std::shared_ptr<link_server::impl> server, std::shared_ptr<connection_shared> conn,
                 std::optional<error> refusal)
      : server_(std::move(server)), conn_(std::move(conn)), refusal_(std::move(refusal)) {}

  kj::Promise<void> hello(HelloContext context) override {
    if (refusal_)
      return refused();
    auto* c = conn_->live;
    if (c == nullptr || c->closing())
      return fail(errc::unavailable, "hello: the connection is closing");
    auto params = context.getParams();
    auto node = string_of(params.getNode());
    if (node != conn_->child_id) {
      return fail(
        errc::invalid_argument,
        "hello: node '" + node + "' does not match certificate '" + conn_->child_id + "'");
    }
    if (c->up())
      return fail(errc::invalid_argument, "hello: already called on this connection");
    auto software = string_of(params.getSoftware());
    if (software.size() > 128)
      software.resize(128);
    c->bring_up(params.getChild(), std::move(software));
    context.getResults().setParent(server_->options.node_id);
    return kj::READY_NOW;
  }

  kj::Promise<void> upload(UploadContext context) override {
    if (refusal_)
      return refused();
    if (auto not_up = check_up("upload"))
      return kj::mv(*not_up);
    const auto& limits = server_->options.limits;
    if (conn_->pending_uploads >= limits.max_pending_uploads) {
      return fail(errc::unavailable,
                  "upload: " + std::to_string(conn_->pending_uploads) +
                    " uploads of this connection are still pending (max_pending_uploads)");
    }
    auto list = context.getParams().getMessages();
    if (list.size() > limits.max_batch_messages) {
      return fail(errc::invalid_argument,
                  "upload: " + std::to_string(list.size()) + " messages exceed the limit of " +
                    std::to_string(limits.max_batch_messages) + " (max_batch_messages)");
    }
    std::size_t bytes = 0;
    for (auto e : list)
      bytes += e.getMessage().size();
    if (bytes > limits.max_batch_bytes) {
      return fail(errc::invalid_argument,
                  "upload: " + std::to_string(bytes) + " bytes of messages exceed the limit of " +
                    std::to_string(limits.max_batch_bytes) + " (max_batch_bytes)");
    }
    std::vector<link_envelope> batch;
    batch.reserve(list.size());
    for (unsigned i = 0; i < list.size(); ++i) {
      auto e = list[i];
      auto data = e.getMessage();
      auto msg = message::decode(view_of(data));
      if (!msg) {
        return fail(errc::invalid_argument, "upload: message " + std::to_string(i) + ": " +
                                              std::to_string(data.size()) +
                                              " bytes that do not decode as a canopy message");
      }
      batch.push_back(link_envelope{std::move(*msg), string_of(e.getDevice()),
                                    string_of(e.getModule()), string_of(e.getOutput())});
    }
    context.releaseParams();  // the messages are copied out: free the RPC message now
    auto bridge = make_bridge<std::uint32_t>("upload", "the link host");
    auto pending = kj::heap<pending_upload>(conn_);
    call_safely("link_host::upload", [&] {
      server_->host.upload(conn_->child_id, conn_->id, std::move(batch), bridge.callback);
    });
    return bridge.promise
      .then([context](expected<std::uint32_t> accepted) mutable -> kj::Promise<void> {
        if (!accepted)
          return to_exception(accepted.err());
        context.getResults().setAccepted(*accepted);
        return kj::READY_NOW;
      })
      .attach(kj::mv(pending));
  }

  kj::Promise<void> ping(PingContext context) override {
    if (refusal_)
      return refused();
    auto now = std::chrono::duration_cast<std::chrono::milliseconds>(
      std::chrono::system_clock::now().time_since_epoch());
    context.getResults().setParentTimeMs(now.count());
    return kj::READY_NOW;
  }

  kj::Promise<void> reportTwins(ReportTwinsContext context) override {
    if (refusal_)
      return refused();
    if (auto not_up = check_up("reportTwins"))
      return kj::mv(*not_up);
    auto updates = read_twins(context.getParams().getUpdates());
    context.releaseParams();
    auto bridge = make_bridge<void>("reportTwins", "the link host");
    call_safely("link_host::report_twins", [&] {
      server_->host.report_twins(conn_->child_id, conn_->id, std::move(updates), bridge.callback);
    });
    return bridge.promise.then([](expected<void> done) -> kj::Promise<void> {
      if (!done)
        return to_exception(done.err());
      return kj::READY_NOW;
    });
  }

 private:
  kj::Promise<void> refused() {
    if (conn_->live != nullptr)
      conn_->live->refusal_answered();
    return to_exception(*refusal_);
  }

  std::optional<kj::Promise<void>> check_up(const char* what) {
    auto* c = conn_->live;
    if (c == nullptr || c->closing()) {
      return fail(errc::unavailable, std::string(what) + ": the connection is closing");
    }
    if (!c->up())
      return fail(errc::invalid_argument, std::string(what) + ": call hello first");
    return std::nullopt;
  }

  std::shared_ptr<link_server::impl> server_;
  std::shared_ptr<connection_shared> conn_;
  std::optional<error> refusal_;
};

server_connection::server_connection(std::shared_ptr<link_server::impl> server,
                                     kj::AuthenticatedStream raw, std::uint64_t id,
                                     std::string address, kj::Timer& timer)
    : counted_(server->tasks),
      server_(std::move(server)),
      shared_(std::make_shared<connection_shared>()),
      timer_(timer),
      raw_(kj::mv(raw)) {
  shared_->id = id;
  shared_->address = std::move(address);
  shared_->live = this;
  auto paf = kj::newPromiseAndFulfiller<void>();
  close_fulfiller_ = kj::mv(paf.fulfiller);
  closed_ = kj::mv(paf.promise);
  server_->connections[id] = this;
}

server_connection::~server_connection() {
  shared_->live = nullptr;
  server_->connections.erase(shared_->id);
  if (reason_.empty())
    reason_ = "the I/O thread stopped";
  if (!up_ && !shared_->child_id.empty() && reason_.rfind("refused: ", 0) != 0) {
    spdlog::warn("link: connection of '{}' from {} ended before hello: {}", shared_->child_id,
                 shared_->address, reason_);
  }
  if (up_) {
    spdlog::info("link: child '{}' (channel {}) down: {}", shared_->child_id, shared_->id, reason_);
    call_safely("link_host::child_down",
                [&] { server_->host.child_down(shared_->child_id, shared_->id, reason_); });
  }
  child_ = nullptr;
}

void server_connection::close(std::string reason) {
  set_reason(std::move(reason));
  if (closing_)
    return;
  closing_ = true;
  close_fulfiller_->fulfill();
}

kj::Promise<void> server_connection::run() {
  auto limit = server_->options.limits.handshake_timeout;
  auto deadline =
    timer_.afterDelay(static_cast<std::int64_t>(limit.count()) * kj::MILLISECONDS)
      .then([this, limit]() -> kj::Promise<void> {
        if (up_)
          return kj::NEVER_DONE;
        std::string why = "no hello within " + ms_text(limit) + " (handshake_timeout)";
        spdlog::warn("link: dropped the connection from {}: {}", shared_->address, why);
        set_reason(std::move(why));
        return kj::READY_NOW;
      });
  return handshake()
    .exclusiveJoin(kj::mv(closed_))
    .exclusiveJoin(kj::mv(deadline))
    .catch_([this](kj::Exception&& e) {
      std::string why = "connection failed: " + text_of(e);
      spdlog::warn("link: connection from {}: {}", shared_->address, why);
      set_reason(std::move(why));
    });
}

kj::Promise<void> server_connection::handshake() {
  return server_->options.tls->context()
    .wrapServer(kj::mv(raw_))
    .then(
      [this](kj::AuthenticatedStream tls) -> kj::Promise<void> {
        shared_->child_id = peer_common_name(tls);
        stream_ = kj::mv(tls.stream);
        if (shared_->child_id.empty()) {
          return refuse(
            make_error(errc::invalid_argument, "the client certificate has no subject CN"));
        }
        auto bridge = make_bridge<void>("admit", "the link host");
        call_safely("link_host::admit",
                    [&] { server_->host.admit(shared_->child_id, bridge.callback); });
        return bridge.promise.then([this](expected<void> admitted) -> kj::Promise<void> {
          if (!admitted)
            return refuse(admitted.err());
          start_rpc(kj::heap<parent_service>(server_, shared_, std::nullopt));
          return network_->onDisconnect().then([this] { set_reason("the connection ended"); });
        });
      },
      [this](kj::Exception&& e) {
        std::string why = "TLS handshake failed: " + text_of(e);
        spdlog::warn("link: TLS handshake with {} failed: {}", shared_->address, text_of(e));
        set_reason(std::move(why));
      });
}

kj::Promise<void> server_connection::refuse(const error& why) {
  spdlog::warn("link: refused child '{}' from {}: {}", shared_->child_id, shared_->address,
               why.message);
  set_reason("refused: " + why.message);
  auto paf = kj::newPromiseAndFulfiller<void>();
  refusal_fulfiller_ = kj::mv(paf.fulfiller);
  start_rpc(kj::heap<parent_service>(server_, shared_, why));
  // Keep the connection until the child has read the refusal and hangs up, or
  // for a grace period after the first refused call (the handshake deadline
  // bounds a child that never calls).
  auto grace = paf.promise.then([this] { return timer_.afterDelay(refusal_grace); });
  return network_->onDisconnect().exclusiveJoin(kj::mv(grace));
}

void server_connection::refusal_answered() {
  if (refusal_fulfiller_.get() != nullptr && refusal_fulfiller_->isWaiting())
    refusal_fulfiller_->fulfill();
}

void server_connection::start_rpc(capnp::Capability::Client bootstrap) {
  network_ = kj::heap<capnp::TwoPartyVatNetwork>(*stream_, capnp::rpc::twoparty::Side::SERVER,
                                                 reader_options(server_->options.limits));
  rpc_ = kj::heap<rpc_system>(capnp::makeRpcServer(*network_, kj::mv(bootstrap)));
}

void server_connection::bring_up(schema::Child::Client child, std::string software) {
  child_ = kj::mv(child);
  up_ = true;
  spdlog::info("link: child '{}' up (channel {}, from {}, {})", shared_->child_id, shared_->id,
               shared_->address, software);
  auto channel = std::make_shared<channel_impl>(server_, shared_);
  call_safely("link_host::child_up", [&] { server_->host.child_up(std::move(channel)); });
}

void accept_connection(const std::shared_ptr<link_server::impl>& s, kj::AuthenticatedStream stream,
                       kj::Timer& timer) {
  auto address = peer_address(stream);
  if (s->connections.size() >= s->options.limits.max_connections) {
    spdlog::warn("link: refused a connection from {}: {} connections open (max_connections)",
                 address, s->connections.size());
    return;  // dropping the stream closes it
  }
  auto id = s->next_id++;
  auto conn = kj::heap<server_connection>(s, kj::mv(stream), id, std::move(address), timer);
  auto life = conn->run();
  s->io.load()->add_task(life.attach(kj::mv(conn)));
}

}  // namespace

link_server::link_server(link_server_options options, link_host& host)
    : impl_(std::make_shared<impl>(std::move(options), host)) {}

link_server::~link_server() {
  stop();
}

expected<void> link_server::start(io_thread& io) {
  auto s = impl_;
  if (s->io != nullptr)
    return make_error(errc::invalid_argument, "link server: already started");
  if (s->options.tls == nullptr) {
    return make_error(errc::invalid_argument, "link server: no TLS configuration (options.tls)");
  }
  if (!io.running())
    return make_error(errc::unavailable, "link server: the I/O thread is not running");
  s->io = &io;
  auto listening =
    listen_and_accept(io, s->options.listen, "link", s->port, s->accepting,
                      accept_hooks{[s](kj::AuthenticatedStream stream, kj::Timer& timer) {
                                     accept_connection(s, kj::mv(stream), timer);
                                   },
                                   [s] { return s->stopping; }});
  if (!listening) {
    s->io = nullptr;
    return make_error(listening.err().code, "link server: " + listening.err().message);
  }
  spdlog::info("link: listening on {} (port {})", s->options.listen, s->port.load());
  return {};
}

std::uint16_t link_server::port() const noexcept {
  return impl_->port.load();
}

void link_server::stop() {
  auto s = impl_;
  if (s->io == nullptr)
    return;
  stop_serving(*s->io.load(), *s->tasks, "link server", [&s] {
    s->stopping = true;
    s->accepting.cancel("the link server stopped");
    for (auto& entry : s->connections)
      entry.second->close("the parent stopped");
  });
  s->io = nullptr;
}

}  // namespace canopy
