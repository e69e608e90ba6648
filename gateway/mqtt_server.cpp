// The node's MQTT port (gateway/mqtt_server.hpp): accepts TCP (or TLS)
// connections, decodes MQTT 3.1.1 with gateway/mqtt_codec, and hands each
// client's packets to the session its host made for it.
#include "gateway/mqtt_server.hpp"

// GCC 12 reports a false -Wmaybe-uninitialized inside std::variant when an
// expected<T> is moved through a kj::Promise (ExceptionOr<expected<T>>).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include "gateway/io_thread.hpp"
#include "gateway/link_rpc.hpp"  // text_of, call_safely, wait_idle, drain_posts
#include "gateway/task_counter.hpp"
#include "gateway/ossl_tls.hpp"
#include "gateway/reply_bridge.hpp"

#include <kj/async-io.h>
#include <kj/debug.h>
#include <spdlog/spdlog.h>

#include <netinet/in.h>
#include <netinet/tcp.h>

#include <atomic>
#include <cstring>
#include <deque>
#include <map>
#include <utility>

namespace canopy {

using link_rpc::call_safely;
using link_rpc::text_of;

namespace {

/// Bytes asked of the socket per read. The buffer is held while a connection
/// waits for its client, so an idle one keeps a small buffer: it grows to
/// `read_chunk` when a read fills it (a busy client) and shrinks back after
/// `shrink_after` reads in a row that the small one would have held.
constexpr std::size_t read_chunk = 4096;
constexpr std::size_t read_chunk_idle = 256;
constexpr int shrink_after = 8;

std::string peer_address_of(kj::AuthenticatedStream& stream) {
  if (auto* id = dynamic_cast<kj::NetworkPeerIdentity*>(stream.peerIdentity.get()))
    return id->getAddress().toString().cStr();
  return "(unknown address)";
}

const char* packet_name(const mqtt::packet& p) {
  return mqtt::to_string(mqtt::type_of(p));
}

class mqtt_connection;

/// What a connection shares with its channel. `live` is touched on the I/O
/// thread only; `id` never changes.
struct connection_shared {
  std::uint64_t id = 0;
  io_thread* io = nullptr;
  mqtt_connection* live = nullptr;  // null once the connection ended
};

}  // namespace

struct mqtt_server::impl {
  impl(mqtt_server_options o, mqtt_host& h) : options(std::move(o)), host(h) {}

  mqtt_server_options options;
  mqtt_host& host;
  std::atomic<io_thread*> io{nullptr};  // set by start(), cleared by stop() (main thread)
  std::atomic<std::uint16_t> port{0};
  std::atomic<std::size_t> open{0};

  // I/O thread only.
  kj::Canceler accepting;
  bool stopping = false;
  std::uint64_t next_id = 1;
  std::map<std::uint64_t, mqtt_connection*> connections;
  std::shared_ptr<task_counter> tasks = std::make_shared<task_counter>();
};

namespace {

/// The way to one client, from any thread: posts to the I/O thread.
/// A stream that first gives back bytes already read from `inner` (the byte
/// the server looked at to tell TLS from plain MQTT), then reads on from it.
class replay_stream final : public kj::AsyncIoStream {
 public:
  replay_stream(kj::Own<kj::AsyncIoStream> inner, std::string prefix)
      : inner_(kj::mv(inner)), prefix_(std::move(prefix)) {}

  kj::Promise<size_t> tryRead(void* buffer, size_t min_bytes, size_t max_bytes) override {
    if (pos_ >= prefix_.size())
      return inner_->tryRead(buffer, min_bytes, max_bytes);
    const size_t n = std::min(max_bytes, prefix_.size() - pos_);
    std::memcpy(buffer, prefix_.data() + pos_, n);
    pos_ += n;
    if (n >= min_bytes)
      return n;
    return inner_->tryRead(static_cast<kj::byte*>(buffer) + n, min_bytes - n, max_bytes - n)
      .then([n](size_t m) { return n + m; });
  }
  kj::Promise<void> write(const void* buffer, size_t size) override { return inner_->write(buffer, size); }
  kj::Promise<void> write(kj::ArrayPtr<const kj::ArrayPtr<const kj::byte>> pieces) override {
    return inner_->write(pieces);
  }
  kj::Promise<void> whenWriteDisconnected() override { return inner_->whenWriteDisconnected(); }
  void shutdownWrite() override { inner_->shutdownWrite(); }
  void abortRead() override { inner_->abortRead(); }
  void getsockopt(int level, int option, void* value, kj::uint* length) override {
    inner_->getsockopt(level, option, value, length);
  }
  void setsockopt(int level, int option, const void* value, kj::uint length) override {
    inner_->setsockopt(level, option, value, length);
  }
  void getsockname(struct sockaddr* addr, kj::uint* length) override { inner_->getsockname(addr, length); }
  void getpeername(struct sockaddr* addr, kj::uint* length) override { inner_->getpeername(addr, length); }

 private:
  kj::Own<kj::AsyncIoStream> inner_;
  std::string prefix_;
  size_t pos_ = 0;
};

class channel_impl final : public mqtt_channel {
 public:
  explicit channel_impl(std::shared_ptr<connection_shared> shared) : shared_(std::move(shared)) {}
  std::uint64_t id() const override { return shared_->id; }
  void publish(mqtt::publish_packet packet) override;
  void close(std::string reason) override;

 private:
  std::shared_ptr<connection_shared> shared_;
};

/// One client's TCP connection, from accept to close. Lives on the I/O thread,
/// owned by its task (run() with the object attached).
class mqtt_connection final : public kj::TaskSet::ErrorHandler {
 public:
  mqtt_connection(std::shared_ptr<mqtt_server::impl> server, kj::AuthenticatedStream raw,
                  std::uint64_t id, std::string address, kj::Timer& timer)
      : server_(std::move(server)),
        raw_(kj::mv(raw)),
        address_(std::move(address)),
        timer_(timer),
        reader_(server_->options.limits.max_packet_bytes),
        shared_(std::make_shared<connection_shared>()),
        tasks_(*this) {
    shared_->id = id;
    shared_->io = server_->io.load();
    shared_->live = this;
    server_->connections.emplace(id, this);
    ++server_->open;
    server_->tasks->added();
  }

  ~mqtt_connection() noexcept(false) {
    shared_->live = nullptr;
    server_->connections.erase(shared_->id);
    --server_->open;
    server_->tasks->removed();
  }

  mqtt_connection(const mqtt_connection&) = delete;
  mqtt_connection& operator=(const mqtt_connection&) = delete;

  /// The whole life of the connection; resolves when it is over (never fails).
  kj::Promise<void> run() {
    auto closed = kj::newPromiseAndFulfiller<void>();
    closed_ = kj::mv(closed.fulfiller);
    const auto limit = server_->options.limits.connect_timeout;
    auto deadline = timer_.afterDelay(limit.count() * kj::MILLISECONDS).then([this, limit]() -> kj::Promise<void> {
      if (session_ != nullptr)
        return kj::NEVER_DONE;  // connected: the deadline no longer applies
      close("no CONNECT within " + link_rpc::ms_text(limit) + " (connect_timeout)");
      return kj::READY_NOW;
    });
    return serve()
      .exclusiveJoin(kj::mv(closed.promise))
      .exclusiveJoin(kj::mv(deadline))
      .catch_([this](kj::Exception&& e) { set_reason("connection failed: " + text_of(e)); })
      .then([this]() { return finish(); });
  }

  /// Ends the connection soon. The first reason wins.
  void close(std::string reason) {
    set_reason(std::move(reason));
    if (closing_)
      return;
    closing_ = true;
    if (closed_.get() != nullptr && closed_->isWaiting())
      closed_->fulfill();
  }

  /// Sends a PUBLISH from the session.
  void send_publish(const mqtt::publish_packet& p) {
    if (closing_)
      return;
    if (session_ == nullptr) {
      // The session may send before its CONNACK is out (a resumed session
      // with messages waiting): they follow the CONNACK.
      if (early_.size() < server_->options.limits.max_pending_publishes)
        early_.push_back(p);
      return;
    }
    write(mqtt::encode(mqtt::packet{p}));
  }

  /// The client broke the protocol or a rule: logged with its id, then closed.
  void violation(std::string reason) {
    if (!closing_)
      spdlog::warn("mqtt: client {}: {}; closing the connection", who(), reason);
    close(std::move(reason));
  }

  void taskFailed(kj::Exception&& e) override { close("connection failed: " + text_of(e)); }

 private:
  void set_reason(std::string reason) {
    if (reason_.empty())
      reason_ = std::move(reason);
  }

  std::string who() const {
    return client_id_.empty() ? address_ : "'" + client_id_ + "' (" + address_ + ")";
  }

  kj::Promise<void> serve() {
    if (server_->options.tls == nullptr) {
      stream_ = kj::mv(raw_.stream);
      return read_connect();
    }
    // The first byte tells a TLS ClientHello (0x16) from a plain MQTT
    // CONNECT (0x10): a client that forgot TLS is told so by name.
    return raw_.stream->tryRead(&first_byte_, 1, 1).then([this](size_t n) -> kj::Promise<void> {
      if (n == 0) {
        set_reason("the client closed the connection before CONNECT");
        return kj::READY_NOW;
      }
      auto replay = kj::heap<replay_stream>(kj::mv(raw_.stream), std::string(1, static_cast<char>(first_byte_)));
      if (first_byte_ == 0x10) {
        plain_on_tls_ = true;
        stream_ = kj::mv(replay);
        return read_connect();
      }
      const auto limit = server_->options.limits.connect_timeout;
      return server_->options.tls->accept(kj::mv(replay), timer_, limit.count() * kj::MILLISECONDS)
        .then([this](kj::Own<tls_server_stream> tls) {
          tls_ = true;
          peer_ = tls->peer();
          stream_ = kj::mv(tls);
          return read_connect();
        });
    });
  }

  /// Reads until the first packet, which must be CONNECT.
  kj::Promise<void> read_connect() {
    return read_some().then([this](std::size_t n) -> kj::Promise<void> {
      if (n == 0) {
        set_reason("the client closed the connection before CONNECT");
        return kj::READY_NOW;
      }
      auto next = reader_.next();
      if (!next) {
        if (next.err().code == errc::incompatible) {
          // Another protocol version: CONNACK 0x01, then hang up (MQTT-3.1.2-2).
          set_reason(next.err().message);
          mqtt::connack_packet ack;
          ack.return_code = mqtt::connack_code::unacceptable_protocol_version;
          auto data = kj::heap<std::string>(mqtt::encode(mqtt::packet{ack}));
          auto& d = *data;
          return stream_->write(d.data(), d.size()).attach(kj::mv(data));
        }
        violation("protocol error before CONNECT: " + next.err().message);
        return kj::READY_NOW;
      }
      if (!*next)
        return read_connect();
      auto* c = std::get_if<mqtt::connect_packet>(&**next);
      if (c == nullptr) {
        violation(std::string("the first packet is ") + packet_name(**next) + ", not CONNECT");
        return kj::READY_NOW;
      }
      return on_connect(std::move(*c));
    });
  }

  kj::Promise<void> on_connect(mqtt::connect_packet packet) {
    client_id_ = packet.client_id;
    if (plain_on_tls_) {
      // Refused before the host sees anything: its credentials crossed the
      // network in clear text.
      const std::string reason = "plain TCP on the TLS port: this node serves MQTT over TLS only (connect with "
                                 "TLS, e.g. mosquitto_pub --cafile CA)";
      spdlog::warn("mqtt: client '{}' refused: {} (from {})", client_id_, reason, address_);
      set_reason("refused: " + reason);
      mqtt::connack_packet ack;
      ack.return_code = mqtt::connack_code::not_authorized;
      auto data = kj::heap<std::string>(mqtt::encode(mqtt::packet{ack}));
      auto& d = *data;
      return stream_->write(d.data(), d.size()).attach(kj::mv(data));
    }
    keep_alive_s_ = packet.keep_alive_s;
    mqtt_connect_info info;
    info.connection_id = shared_->id;
    info.peer_address = address_;
    info.packet = std::move(packet);
    info.tls = tls_;
    if (peer_.has_cert) {
      info.cert_cn = peer_.common_name;
      info.cert_thumbprint = peer_.thumbprint_sha256_hex;
      info.cert_thumbprint_sha1 = peer_.thumbprint_sha1_hex;
      info.cert_chain_ok = peer_.chain_ok;
      info.cert_chain_error = peer_.chain_error;
    }
    auto bridge = make_value_bridge<std::variant<mqtt_accept, mqtt_refusal>>();
    auto channel = std::make_shared<channel_impl>(shared_);
    call_safely("mqtt_host::connect", [&] {
      server_->host.connect(std::move(info), std::move(channel), std::move(bridge.callback));
    });
    return bridge.promise.then([this](std::variant<mqtt_accept, mqtt_refusal> answer) -> kj::Promise<void> {
      if (auto* refused = std::get_if<mqtt_refusal>(&answer)) {
        spdlog::debug("mqtt: refused client {}: {}", who(), refused->reason);  // the host logs why
        set_reason("refused: " + refused->reason);
        mqtt::connack_packet ack;
        ack.return_code = refused->code;
        // CONNACK, then hang up (MQTT-3.2.2-5).
        auto data = kj::heap<std::string>(mqtt::encode(mqtt::packet{ack}));
        auto& d = *data;
        return stream_->write(d.data(), d.size()).attach(kj::mv(data));
      }
      auto& accepted = std::get<mqtt_accept>(answer);
      session_ = std::move(accepted.session);
      if (session_ == nullptr) {
        close("the host accepted the client without a session");
        return kj::READY_NOW;
      }
      spdlog::debug("mqtt: client {} connected", who());
      mqtt::connack_packet ack;
      ack.session_present = accepted.session_present;
      ack.return_code = mqtt::connack_code::accepted;
      write(mqtt::encode(mqtt::packet{ack}));
      for (auto& p : std::exchange(early_, {}))
        write(mqtt::encode(mqtt::packet{p}));
      // Packets the client sent right behind CONNECT are already read.
      if (!drain_reader())
        return kj::READY_NOW;
      return read_loop();
    });
  }

  /// Reads what the client sends after CONNECT: each read's packets are
  /// handled in order, the read's PUBLISHes go to the session as one batch.
  kj::Promise<void> read_loop() {
    if (closing_)
      return kj::READY_NOW;
    if (pending_qos1_ >= server_->options.limits.max_pending_publishes) {
      // Back-pressure: read on once the session answered.
      auto paf = kj::newPromiseAndFulfiller<void>();
      room_ = kj::mv(paf.fulfiller);
      return paf.promise.then([this] { return read_loop(); });
    }
    auto read = read_some();
    if (keep_alive_s_ > 0) {
      // MQTT-3.1.2-24: nothing for one and a half keep-alive periods.
      const auto limit_ms = static_cast<std::int64_t>(keep_alive_s_) * 1500;
      read = read.exclusiveJoin(
        timer_.afterDelay(limit_ms * kj::MILLISECONDS).then([this, limit_ms]() -> std::size_t {
          close("nothing received for " + std::to_string(limit_ms / 1000) + " s (1.5 x keep-alive " +
                std::to_string(keep_alive_s_) + " s)");
          return 0;
        }));
    }
    return read.then([this](std::size_t n) -> kj::Promise<void> {
      if (n == 0) {
        set_reason("the client closed the connection");
        return kj::READY_NOW;
      }
      if (!drain_reader())
        return kj::READY_NOW;
      return read_loop();
    });
  }

  /// Reads once into the frame reader; resolves to the bytes read (0 = end).
  kj::Promise<std::size_t> read_some() {
    if (buffer_ == nullptr)
      buffer_ = kj::heapArray<kj::byte>(read_chunk_idle);
    return stream_->tryRead(buffer_.begin(), 1, buffer_.size()).then([this](std::size_t n) {
      if (n > 0)
        reader_.feed(std::string_view(reinterpret_cast<const char*>(buffer_.begin()), n));
      if (n == buffer_.size() && n < read_chunk) {
        buffer_ = kj::heapArray<kj::byte>(read_chunk);  // busy: read more at a time
        small_reads_ = 0;
      } else if (buffer_.size() > read_chunk_idle && n <= read_chunk_idle && ++small_reads_ >= shrink_after) {
        buffer_ = kj::heapArray<kj::byte>(read_chunk_idle);  // quiet again
        small_reads_ = 0;
      } else if (n > read_chunk_idle) {
        small_reads_ = 0;
      }
      return n;
    });
  }

  /// Handles every complete packet read so far. False if the connection closes.
  bool drain_reader() {
    for (;;) {
      auto next = reader_.next();
      if (!next) {
        violation("protocol error: " + next.err().message);
        break;
      }
      if (!*next)
        break;
      handle(std::move(**next));
      if (closing_)
        break;
    }
    flush_publishes();
    return !closing_;
  }

  void handle(mqtt::packet&& p) {
    if (auto* pub = std::get_if<mqtt::publish_packet>(&p)) {
      if (pub->qos > 1) {
        violation("QoS 2 is not supported (PUBLISH to '" + pub->topic + "')");
        return;
      }
      gathering_.push_back(std::move(*pub));
      return;
    }
    // Whatever came before goes first.
    flush_publishes();
    std::visit(
      [this](auto& packet) {
        using T = std::decay_t<decltype(packet)>;
        if constexpr (std::is_same_v<T, mqtt::puback_packet>) {
          call_safely("mqtt_session::acked", [&] { session_->acked(packet.packet_id); });
        } else if constexpr (std::is_same_v<T, mqtt::subscribe_packet>) {
          on_subscribe(std::move(packet));
        } else if constexpr (std::is_same_v<T, mqtt::unsubscribe_packet>) {
          on_unsubscribe(std::move(packet));
        } else if constexpr (std::is_same_v<T, mqtt::pingreq_packet>) {
          write(mqtt::encode(mqtt::packet{mqtt::pingresp_packet{}}));
        } else if constexpr (std::is_same_v<T, mqtt::disconnect_packet>) {
          clean_ = true;
          close("the client disconnected");
        } else {
          violation(std::string("unexpected ") + packet_name(mqtt::packet{packet}) + " from a client");
        }
      },
      p);
  }

  void on_subscribe(mqtt::subscribe_packet&& s) {
    const auto id = s.packet_id;
    const auto n = s.subscriptions.size();
    auto bridge = make_bridge<std::vector<std::uint8_t>>("subscribe", "the session");
    call_safely("mqtt_session::subscribe",
                [&] { session_->subscribe(std::move(s.subscriptions), std::move(bridge.callback)); });
    tasks_.add(bridge.promise.then([this, id, n](expected<std::vector<std::uint8_t>> codes) {
      mqtt::suback_packet ack;
      ack.packet_id = id;
      if (codes && codes->size() == n)
        ack.return_codes = std::move(*codes);
      else
        ack.return_codes.assign(n, 0x80);
      write(mqtt::encode(mqtt::packet{ack}));
    }));
  }

  void on_unsubscribe(mqtt::unsubscribe_packet&& u) {
    const auto id = u.packet_id;
    auto bridge = make_bridge<void>("unsubscribe", "the session");
    call_safely("mqtt_session::unsubscribe",
                [&] { session_->unsubscribe(std::move(u.filters), std::move(bridge.callback)); });
    tasks_.add(bridge.promise.then([this, id](expected<void>) {
      mqtt::unsuback_packet ack;
      ack.packet_id = id;
      write(mqtt::encode(mqtt::packet{ack}));
    }));
  }

  /// Hands the PUBLISHes gathered from one read to the session as one batch;
  /// their PUBACKs go out in order once it answered.
  void flush_publishes() {
    if (gathering_.empty() || closing_)
      return;
    auto& entry = pending_.emplace_back();
    entry.ids.reserve(gathering_.size());
    for (const auto& p : gathering_) {
      entry.ids.push_back(p.qos == 1 ? p.packet_id : 0);
      ++entry.qos1;  // every publish counts against the limit: QoS 0 ones wait for the session too
    }
    pending_qos1_ += entry.qos1;
    const std::uint64_t seq = next_batch_++;
    entry.seq = seq;
    auto bridge = make_value_bridge<std::vector<mqtt_publish_result>>();
    auto batch = std::move(gathering_);
    gathering_.clear();
    call_safely("mqtt_session::publish",
                [&] { session_->publish(std::move(batch), std::move(bridge.callback)); });
    tasks_.add(bridge.promise.then([this, seq](std::vector<mqtt_publish_result> results) {
      for (auto& e : pending_)
        if (e.seq == seq) {
          e.results = std::move(results);
          e.ready = true;
          break;
        }
      answer_ready();
    }));
  }

  /// Writes the PUBACKs of the answered batches at the front, in order.
  void answer_ready() {
    std::string out;
    while (!pending_.empty() && pending_.front().ready) {
      auto& e = pending_.front();
      for (std::size_t i = 0; i < e.ids.size(); ++i) {
        if (i < e.results.size() && !e.results[i]) {
          if (!out.empty())
            write(std::move(out));
          violation("publish refused: " + e.results[i].err().message);
          return;
        }
        if (i >= e.results.size()) {
          close("the session answered fewer publishes than it was given");
          return;
        }
        if (e.ids[i] != 0)
          out += mqtt::encode(mqtt::packet{mqtt::puback_packet{e.ids[i]}});
      }
      pending_qos1_ -= e.qos1;
      pending_.pop_front();
    }
    if (!out.empty())
      write(std::move(out));
    if (room_.get() != nullptr && room_->isWaiting() &&
        pending_qos1_ < server_->options.limits.max_pending_publishes)
      room_->fulfill();
  }

  /// Queues bytes for the client; one write runs at a time.
  void write(std::string bytes) {
    if (closing_)
      return;
    out_ += bytes;
    if (out_.size() > server_->options.limits.max_write_backlog) {
      violation("the client does not read: " + std::to_string(out_.size()) +
                " bytes waiting (max_write_backlog)");
      return;
    }
    if (!writing_)
      start_write();
  }

  void start_write() {
    writing_ = true;
    auto data = kj::heap<std::string>(std::move(out_));
    out_.clear();
    auto& d = *data;
    tasks_.add(stream_->write(d.data(), d.size()).attach(kj::mv(data)).then([this] {
      writing_ = false;
      if (!out_.empty() && !closing_)
        start_write();
    }));
  }

  /// After the connection ended: the session hears of it, once.
  kj::Promise<void> finish() {
    if (reason_.empty())
      reason_ = "closed";
    if (session_ != nullptr) {
      spdlog::debug("mqtt: client {} gone: {}", who(), reason_);
      auto session = std::move(session_);
      call_safely("mqtt_session::closed", [&] { session->closed(reason_, clean_); });
    } else if (!reason_.empty()) {
      spdlog::info("mqtt: connection from {} ended: {}", who(), reason_);
    }
    closing_ = true;
    // Let a last write (a refusal's CONNACK) go out, briefly.
    if (writing_ && stream_.get() != nullptr)
      return timer_.afterDelay(200 * kj::MILLISECONDS);
    return kj::READY_NOW;
  }

  struct pending_batch {
    std::uint64_t seq = 0;
    std::vector<std::uint16_t> ids;  // 0 = QoS 0 (no PUBACK)
    std::size_t qos1 = 0;  // publishes (QoS 0 and 1) in this batch
    bool ready = false;
    std::vector<mqtt_publish_result> results;
  };

  std::shared_ptr<mqtt_server::impl> server_;
  kj::AuthenticatedStream raw_;
  std::string address_;
  kj::Timer& timer_;
  mqtt::frame_reader reader_;
  std::shared_ptr<connection_shared> shared_;
  kj::Own<kj::AsyncIoStream> stream_;
  kj::Array<kj::byte> buffer_;
  int small_reads_ = 0;  // reads in a row that read_chunk_idle would have held
  bool tls_ = false;
  tls_peer peer_;
  std::string client_id_;
  std::uint16_t keep_alive_s_ = 0;
  std::shared_ptr<mqtt_session> session_;
  kj::Own<kj::PromiseFulfiller<void>> closed_;
  kj::Own<kj::PromiseFulfiller<void>> room_;
  std::string reason_;
  bool clean_ = false;
  bool closing_ = false;
  std::vector<mqtt::publish_packet> gathering_;
  std::deque<pending_batch> pending_;
  std::size_t pending_qos1_ = 0;
  std::uint64_t next_batch_ = 1;
  std::string out_;
  std::vector<mqtt::publish_packet> early_;  // sent by the session before its CONNACK
  kj::byte first_byte_ = 0;                  // TLS port: the connection's first byte
  bool plain_on_tls_ = false;                // ... was a plain CONNECT
  bool writing_ = false;
  kj::TaskSet tasks_;  // last: its tasks use the members above
};

void channel_impl::publish(mqtt::publish_packet packet) {
  auto shared = shared_;
  auto* io = shared->io;
  if (io == nullptr)
    return;
  io->post([shared, packet = std::move(packet)](kj::AsyncIoContext&) mutable {
    if (shared->live != nullptr)
      shared->live->send_publish(packet);
  });
}

void channel_impl::close(std::string reason) {
  auto shared = shared_;
  auto* io = shared->io;
  if (io == nullptr)
    return;
  io->post([shared, reason = std::move(reason)](kj::AsyncIoContext&) mutable {
    if (shared->live != nullptr)
      shared->live->close(std::move(reason));
  });
}

void accept_connection(const std::shared_ptr<mqtt_server::impl>& s, kj::AuthenticatedStream stream,
                       kj::Timer& timer) {
  auto address = peer_address_of(stream);
  if (s->connections.size() >= s->options.limits.max_connections) {
    spdlog::warn("mqtt: refused a connection from {}: {} connections open (max_connections)", address,
                 s->connections.size());
    return;  // dropping the stream closes it
  }
  auto id = s->next_id++;
  auto conn = kj::heap<mqtt_connection>(s, kj::mv(stream), id, std::move(address), timer);
  auto life = conn->run();
  s->io.load()->add_task(life.attach(kj::mv(conn)));
}

}  // namespace

mqtt_server::mqtt_server(mqtt_server_options options, mqtt_host& host)
    : impl_(std::make_shared<impl>(std::move(options), host)) {}

mqtt_server::~mqtt_server() {
  stop();
}

expected<void> mqtt_server::start(io_thread& io) {
  auto s = impl_;
  if (s->io != nullptr)
    return make_error(errc::invalid_argument, "mqtt server: already started");
  if (!io.running())
    return make_error(errc::unavailable, "mqtt server: the I/O thread is not running");
  s->io = &io;
  auto accept = [s](kj::AuthenticatedStream stream, kj::Timer& timer) {
    // Telemetry is latency-sensitive and small: no Nagle.
    int one = 1;
    KJ_IF_MAYBE (e, kj::runCatchingExceptions(
                      [&] { stream.stream->setsockopt(IPPROTO_TCP, TCP_NODELAY, &one, sizeof one); })) {
      (void)e;  // not a TCP socket (tests): fine
    }
    accept_connection(s, kj::mv(stream), timer);
  };
  auto listening = link_rpc::listen_and_accept(io, s->options.listen, "mqtt", s->port, s->accepting,
                                               link_rpc::accept_hooks{accept, [s] { return s->stopping; }});
  if (!listening) {
    s->io = nullptr;
    return make_error(listening.err().code, "mqtt server: " + listening.err().message);
  }
  spdlog::info("mqtt: listening on {} (port {}, {})", s->options.listen, s->port.load(),
               s->options.tls != nullptr ? "TLS" : "plain TCP");
  return {};
}

std::uint16_t mqtt_server::port() const noexcept {
  return impl_->port.load();
}

std::size_t mqtt_server::connections() const noexcept {
  return impl_->open.load();
}

void mqtt_server::stop() {
  auto s = impl_;
  if (s->io == nullptr)
    return;
  link_rpc::stop_serving(*s->io.load(), *s->tasks, "mqtt server", [&s] {
    s->stopping = true;
    s->accepting.cancel("the MQTT server stopped");
    for (auto& entry : s->connections)
      entry.second->close("the node is stopping");
  });
  s->io = nullptr;
}

}  // namespace canopy
