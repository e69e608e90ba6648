// The child's end of the link (gateway/link.hpp): connects to the parent,
// checks its certificate against the parent's id, says hello with a Child
// capability that forwards to downstream_handler, and sends on the current
// connection only.
#include "gateway/link.hpp"

// GCC 12 reports a false -Wmaybe-uninitialized inside std::variant when an
// expected<T> is moved through a kj::Promise (ExceptionOr<expected<T>>).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include "gateway/io_thread.hpp"
#include "gateway/link_rpc.hpp"
#include "gateway/reply_bridge.hpp"
#include "gateway/tls.hpp"

#include <link.capnp.h>
#include <canopy/module.hpp>  // sdk_version

#include <capnp/message.h>
#include <capnp/rpc-twoparty.h>
#include <capnp/rpc.h>
#include <kj/compat/tls.h>
#include <kj/debug.h>
#include <spdlog/spdlog.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <utility>

namespace canopy {

using namespace link_rpc;

namespace {
class client_connection;
}

struct link_client::impl : std::enable_shared_from_this<link_client::impl> {
  impl(io_thread& i, link_client_options o, downstream_handler& h)
      : io(i), options(std::move(o)), handler(h) {}

  /// I/O thread: the attempt of connect() number `generation`.
  void start(kj::AsyncIoContext& ctx, std::uint64_t generation,
             std::function<void(link_event)> on_event);

  /// Posts a call on the current connection if it is `generation` and up.
  template <class T, class F>
  void call(const char* what, std::uint64_t generation, reply_fn<T> done, F make_call);

  io_thread& io;
  link_client_options options;
  downstream_handler& handler;
  std::atomic<std::uint64_t> last_generation{0};
  std::atomic<bool> stopped{false};

  // I/O thread only.
  client_connection* current = nullptr;
  std::shared_ptr<task_counter> tasks = std::make_shared<task_counter>();
};

namespace {

void send_event(const std::function<void(link_event)>& on_event, link_event event) {
  if (!on_event)
    return;
  call_safely("link_client event callback", [&] { on_event(std::move(event)); });
}

/// What this node offers its parent: calls into downstream_handler.
class child_service final : public schema::Child::Server {
 public:
  explicit child_service(std::shared_ptr<link_client::impl> client) : client_(std::move(client)) {}

  kj::Promise<void> syncScope(SyncScopeContext context) override {
    auto list = context.getParams().getEntries();
    std::vector<device_record> entries;
    entries.reserve(list.size());
    for (unsigned i = 0; i < list.size(); ++i) {
      auto entry = read_entry(list[i], i);
      if (!entry)
        return to_exception(entry.err());
      entries.push_back(std::move(*entry));
    }
    context.releaseParams();
    auto bridge = make_bridge<void>("syncScope", "the downstream handler");
    call_safely("downstream_handler::sync_scope",
                [&] { client_->handler.sync_scope(std::move(entries), bridge.callback); });
    return answer(kj::mv(bridge.promise));
  }

  kj::Promise<void> desired(DesiredContext context) override {
    auto updates = read_twins(context.getParams().getUpdates());
    context.releaseParams();
    auto bridge = make_bridge<void>("desired", "the downstream handler");
    call_safely("downstream_handler::desired",
                [&] { client_->handler.desired(std::move(updates), bridge.callback); });
    return answer(kj::mv(bridge.promise));
  }

  kj::Promise<void> invoke(InvokeContext context) override {
    auto p = context.getParams();
    auto bridge = make_bridge<method_reply>("invoke", "the downstream handler");
    call_safely("downstream_handler::invoke", [&] {
      client_->handler.invoke(string_of(p.getDevice()), string_of(p.getModule()),
                              string_of(p.getMethod()), string_of(p.getPayload()),
                              std::chrono::milliseconds(p.getTimeoutMs()), bridge.callback);
    });
    return bridge.promise.then(
      [context](expected<method_reply> reply) mutable -> kj::Promise<void> {
        if (!reply)
          return to_exception(reply.err());
        auto results = context.getResults();
        results.setStatus(reply->status);
        results.setPayload(reply->payload_json);
        return kj::READY_NOW;
      });
  }

 private:
  static kj::Promise<void> answer(kj::Promise<expected<void>> promise) {
    return promise.then([](expected<void> done) -> kj::Promise<void> {
      if (!done)
        return to_exception(done.err());
      return kj::READY_NOW;
    });
  }

  std::shared_ptr<link_client::impl> client_;
};

/// One connect() attempt and, if it succeeds, the connection. Lives on the I/O
/// thread, owned by its task (run() with the object attached).
class client_connection {
 public:
  client_connection(std::shared_ptr<link_client::impl> client, std::uint64_t generation,
                    std::function<void(link_event)> on_event)
      : counted_(client->tasks),
        client_(std::move(client)),
        generation_(generation),
        on_event_(std::move(on_event)) {
    auto paf = kj::newPromiseAndFulfiller<void>();
    close_fulfiller_ = kj::mv(paf.fulfiller);
    closed_ = kj::mv(paf.promise);
  }

  ~client_connection() {
    if (client_->current == this)
      client_->current = nullptr;
    fire_down("the I/O thread stopped");
  }
  client_connection(const client_connection&) = delete;
  client_connection& operator=(const client_connection&) = delete;

  std::uint64_t generation() const { return generation_; }
  bool is_up() const { return state_ == state::up; }
  schema::Parent::Client& parent() { return KJ_ASSERT_NONNULL(parent_); }

  /// Fires the down event now (if not yet) and ends the connection on a later turn.
  void close(std::string reason) {
    fire_down(std::move(reason));
    if (close_fulfiller_->isWaiting())
      close_fulfiller_->fulfill();
  }

  kj::Promise<void> run(kj::AsyncIoContext& ctx) {
    const auto& o = client_->options;
    auto attempt =
      ctx.provider->getNetwork()
        .parseAddress(o.parent_address)
        .then([](kj::Own<kj::NetworkAddress> address) {
          return address->connect().attach(kj::mv(address));
        })
        .then([this](kj::Own<kj::AsyncIoStream> tcp) {
          stage_ = stage::tls;
          return client_->options.tls->context().wrapClient(kj::mv(tcp),
                                                            client_->options.parent_id);
        })
        .then([this](kj::Own<kj::AsyncIoStream> tls) {
          stage_ = stage::hello;
          stream_ = kj::mv(tls);
          start_rpc();
          auto req = parent().helloRequest();
          req.setNode(client_->options.node_id);
          req.setChild(kj::heap<child_service>(client_));
          req.setSoftware(std::string("canopy ") + sdk_version);
          return req.send();
        })
        .then([this](capnp::Response<schema::Parent::HelloResults>&& answer) {
          stage_ = stage::up;
          fire_up(string_of(answer.getParent()));
          return network_->onDisconnect();
        })
        .then(
          [this] { fire_down("connection to parent '" + client_->options.parent_id + "' lost"); },
          [this](kj::Exception&& e) { fire_down(describe(e)); });
    auto limit = o.limits.handshake_timeout;
    auto deadline =
      ctx.provider->getTimer()
        .afterDelay(static_cast<std::int64_t>(limit.count()) * kj::MILLISECONDS)
        .then([this, limit]() -> kj::Promise<void> {
          if (state_ != state::connecting)
            return kj::NEVER_DONE;
          fire_down(prefix() + "no answer within " + ms_text(limit) + " (handshake_timeout)");
          return kj::READY_NOW;
        });
    return attempt.exclusiveJoin(kj::mv(closed_)).exclusiveJoin(kj::mv(deadline));
  }

 private:
  enum class state { connecting, up, down };
  enum class stage { connect, tls, hello, up };

  void start_rpc() {
    network_ = kj::heap<capnp::TwoPartyVatNetwork>(*stream_, capnp::rpc::twoparty::Side::CLIENT,
                                                   reader_options(client_->options.limits));
    rpc_ = kj::heap<rpc_system>(capnp::makeRpcClient(*network_));
    capnp::word scratch[4]{};
    capnp::MallocMessageBuilder vat_message(scratch);
    auto vat = vat_message.getRoot<capnp::rpc::twoparty::VatId>();
    vat.setSide(capnp::rpc::twoparty::Side::SERVER);
    parent_ = rpc_->bootstrap(vat).castAs<schema::Parent>();
  }

  /// What the connection was doing, to start an error message.
  std::string prefix() const {
    const auto& o = client_->options;
    switch (stage_) {
      case stage::connect:
        return "connect " + o.parent_address + ": ";
      case stage::tls:
        return "TLS handshake with parent '" + o.parent_id + "': ";
      case stage::hello:
        return "hello to parent '" + o.parent_id + "': ";
      case stage::up:
        return "connection to parent '" + o.parent_id + "' lost: ";
    }
    return "";
  }

  std::string describe(const kj::Exception& e) const {
    if (stage_ == stage::hello && is_remote(e))
      return "parent refused: " + from_exception(e).message;
    // TLS 1.3: the client's side of the handshake ends before the parent has
    // checked our certificate; its refusal arrives as an alert during hello.
    if (stage_ == stage::hello && is_tls_error(e)) {
      return "TLS handshake with parent '" + client_->options.parent_id + "': " + text_of(e);
    }
    return prefix() + from_exception(e).message;
  }

  void fire_up(std::string parent_id) {
    if (state_ != state::connecting)
      return;
    state_ = state::up;
    spdlog::info("link: connected to parent '{}' at {} (connection {})", parent_id,
                 client_->options.parent_address, generation_);
    send_event(on_event_, link_event{generation_, true, std::move(parent_id), {}});
  }

  void fire_down(std::string why) {
    if (state_ == state::down)
      return;
    bool was_up = state_ == state::up;
    state_ = state::down;
    if (was_up) {
      spdlog::warn("link: connection {} to parent '{}' down: {}", generation_,
                   client_->options.parent_id, why);
    } else {
      spdlog::info("link: connection {} to parent '{}' failed: {}", generation_,
                   client_->options.parent_id, why);
    }
    send_event(on_event_, link_event{generation_, false, {}, std::move(why)});
  }

  counted counted_;
  std::shared_ptr<link_client::impl> client_;
  std::uint64_t generation_;
  std::function<void(link_event)> on_event_;
  state state_ = state::connecting;
  stage stage_ = stage::connect;
  kj::Own<kj::PromiseFulfiller<void>> close_fulfiller_;
  kj::Promise<void> closed_ = nullptr;
  // Destroyed in reverse order: the RPC system first, the stream last.
  kj::Own<kj::AsyncIoStream> stream_;
  kj::Own<capnp::TwoPartyVatNetwork> network_;
  kj::Own<rpc_system> rpc_;
  kj::Maybe<schema::Parent::Client> parent_;
};

}  // namespace

void link_client::impl::start(kj::AsyncIoContext& ctx, std::uint64_t generation,
                              std::function<void(link_event)> on_event) {
  if (current != nullptr)
    current->close("closed");
  auto refuse = [&](std::string why) {
    send_event(on_event, link_event{generation, false, {}, std::move(why)});
  };
  if (stopped)
    return refuse("the link client is stopped");
  if (generation != last_generation.load())
    return refuse("superseded by a newer connect()");
  if (options.tls == nullptr)
    return refuse("no TLS configuration (link_client_options::tls)");
  auto conn = kj::heap<client_connection>(shared_from_this(), generation, std::move(on_event));
  current = conn.get();
  auto life = conn->run(ctx);
  io.add_task(life.attach(kj::mv(conn)));
}

template <class T, class F>
void link_client::impl::call(const char* what, std::uint64_t generation, reply_fn<T> done,
                             F make_call) {
  auto reply = std::make_shared<once_reply<T>>(std::move(done), what);
  auto self = shared_from_this();
  bool posted = io.post(
    [self, reply, generation, make_call = std::move(make_call)](kj::AsyncIoContext&) mutable {
      auto* c = self->current;
      if (self->stopped || c == nullptr || c->generation() != generation || !c->is_up()) {
        reply->answer(make_error(errc::unavailable, reply->what() + ": link down"));
        return;
      }
      auto promise = kj::evalNow([&] { return make_call(c->parent()); });
      self->io.add_task(answer_when_settled(kj::mv(promise), reply, self->tasks));
    });
  if (!posted)
    reply->answer(
      make_error(errc::unavailable, reply->what() + ": link down (the I/O thread is not running)"));
}

link_client::link_client(io_thread& io, link_client_options options, downstream_handler& handler)
    : impl_(std::make_shared<impl>(io, std::move(options), handler)) {}

link_client::~link_client() {
  stop();
}

std::uint64_t link_client::connect(std::function<void(link_event)> on_event) {
  auto s = impl_;
  auto generation = ++s->last_generation;
  if (s->stopped) {
    send_event(on_event, link_event{generation, false, {}, "the link client is stopped"});
    return generation;
  }
  auto fallback = on_event;
  bool posted =
    s->io.post([s, generation, on_event = std::move(on_event)](kj::AsyncIoContext& ctx) mutable {
      s->start(ctx, generation, std::move(on_event));
    });
  if (!posted)
    send_event(fallback, link_event{generation, false, {}, "the I/O thread is not running"});
  return generation;
}

void link_client::upload(std::uint64_t generation, std::vector<link_envelope> batch,
                         reply_fn<std::uint32_t> done) {
  impl_->call<std::uint32_t>(
    "upload", generation, std::move(done),
    [batch = std::move(batch)](schema::Parent::Client& parent) {
      std::size_t bytes = 0;
      for (const auto& e : batch)
        bytes += e.msg.encoded_size();
      // One segment for the whole batch: the message bytes plus ~8 words per envelope.
      capnp::MessageSize hint{bytes / sizeof(capnp::word) + batch.size() * 8 + 16, 0};
      auto req = parent.uploadRequest(hint);
      auto list = req.initMessages(static_cast<unsigned>(batch.size()));
      for (unsigned i = 0; i < batch.size(); ++i) {
        const auto& e = batch[i];
        auto out = list[i];
        out.setMessage(bytes_of(e.msg.encoded()));
        out.setDevice(e.device);
        out.setModule(e.module);
        out.setOutput(e.output);
      }
      return req.send().then([](capnp::Response<schema::Parent::UploadResults>&& r) {
        return expected<std::uint32_t>(r.getAccepted());
      });
    });
}

void link_client::ping(std::uint64_t generation, reply_fn<std::chrono::microseconds> done) {
  impl_->call<std::chrono::microseconds>(
    "ping", generation, std::move(done), [](schema::Parent::Client& parent) {
      auto sent = std::chrono::steady_clock::now();
      return parent.pingRequest().send().then(
        [sent](capnp::Response<schema::Parent::PingResults>&&) {
          return expected<std::chrono::microseconds>(
            std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() -
                                                                  sent));
        });
    });
}

void link_client::report_twins(std::uint64_t generation, std::vector<twin_update> updates,
                               reply_fn<void> done) {
  impl_->call<void>(
    "report_twins", generation, std::move(done),
    [updates = std::move(updates)](schema::Parent::Client& parent) {
      auto req = parent.reportTwinsRequest();
      fill(req.initUpdates(static_cast<unsigned>(updates.size())), updates);
      return req.send().then(
        [](capnp::Response<schema::Parent::ReportTwinsResults>&&) { return expected<void>{}; });
    });
}

void link_client::close() {
  auto s = impl_;
  s->io.post([s](kj::AsyncIoContext&) {
    if (s->current != nullptr)
      s->current->close("closed");
  });
}

void link_client::stop() {
  auto s = impl_;
  if (s->stopped.exchange(true))
    return;
  if (!s->io.running())
    return;
  // Calls and connects posted before stop() run (and answer) first.
  drain_posts(s->io);
  KJ_IF_MAYBE (e, kj::runCatchingExceptions([&] {
                 s->io.run_sync([s](kj::AsyncIoContext& ctx) {
                   if (s->current != nullptr)
                     s->current->close("closed");
                   return wait_idle(*s->tasks, ctx, "link client");
                 });
               })) {
    spdlog::debug("link client: stop after the I/O thread: {}", text_of(*e));
  }
}

}  // namespace canopy
