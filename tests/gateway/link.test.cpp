// Unit test of the links between nodes: link_server and link_client over
// loopback TCP with kj-tls (mutual TLS, certificates minted in memory), against
// a fake link_host (the parent's actor side) and a fake downstream_handler (the
// child's), plus hand-made hostile clients.
#include "gateway/link.hpp"

#include "gateway/certs.hpp"
#include "gateway/io_thread.hpp"
#include "gateway/tls.hpp"
#include "test_certs.hpp"

#include <link.capnp.h>

#include <capnp/rpc-twoparty.h>
#include <kj/compat/tls.h>
#include <spdlog/sinks/ringbuffer_sink.h>
#include <spdlog/spdlog.h>
#include <canopy/message.hpp>
#include <catch2/catch.hpp>

#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

using namespace canopy;
using namespace canopy::unit_test;
using namespace std::chrono_literals;

namespace {

// --- Waiting for things that happen on other threads ------------------------------

/// A queue filled from any thread; pop() waits up to 5 s.
template <class T>
class mailbox {
 public:
  void push(T item) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      items_.push_back(std::move(item));
    }
    cv_.notify_all();
  }
  std::optional<T> pop(std::chrono::milliseconds timeout = 5s) {
    std::unique_lock<std::mutex> lock(mutex_);
    if (!cv_.wait_for(lock, timeout, [this] { return !items_.empty(); }))
      return std::nullopt;
    T item = std::move(items_.front());
    items_.pop_front();
    return item;
  }
  bool empty() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return items_.empty();
  }

 private:
  mutable std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<T> items_;
};

/// A reply_fn that drops its answer into a mailbox.
template <class T>
reply_fn<T> into(mailbox<expected<T>>& box) {
  return [&box](expected<T> r) { box.push(std::move(r)); };
}

/// The next answer in `box`, which must come and be a success.
template <class T>
expected<T> next_ok(mailbox<expected<T>>& box) {
  auto answer = box.pop();
  REQUIRE(answer.has_value());
  INFO((answer->ok() ? std::string() : answer->err().message));
  REQUIRE(answer->ok());
  return std::move(*answer);
}

/// The error of the next answer in `box`, which must come and be a failure.
template <class T>
error next_error(mailbox<expected<T>>& box) {
  auto answer = box.pop();
  REQUIRE(answer.has_value());
  REQUIRE_FALSE(answer->ok());
  return std::move(*answer).err();
}

/// Connects `c`, its events going to `events`, and waits for the first one.
link_event connect(link_client& c, mailbox<link_event>& events) {
  auto generation = c.connect([&events](link_event e) { events.push(std::move(e)); });
  auto first = events.pop();
  REQUIRE(first.has_value());
  CHECK(first->generation == generation);
  return *first;
}

// --- The fakes of the actor side ----------------------------------------------------

struct upload_call {
  std::string child;
  std::uint64_t channel = 0;
  std::vector<link_envelope> batch;
  reply_fn<std::uint32_t> done;
};

struct down_call {
  std::string child;
  std::uint64_t channel = 0;
  std::string reason;
};

/// The parent's actor side: admits only "gw1"; uploads are answered at once
/// (with the batch size) unless hold_uploads is set, then by the test.
class fake_host final : public link_host {
 public:
  bool hold_uploads = false;
  std::optional<error> upload_error;

  void admit(std::string child_id, reply_fn<void> done) override {
    admits.push(child_id);
    if (child_id == "gw1")
      return done({});
    done(make_error(errc::not_found, "device '" + child_id + "' is not registered under 'hub'"));
  }
  void child_up(std::shared_ptr<child_channel> channel) override { ups.push(std::move(channel)); }
  void child_down(std::string child_id, std::uint64_t channel_id, std::string reason) override {
    downs.push(down_call{std::move(child_id), channel_id, std::move(reason)});
  }
  void upload(std::string child_id, std::uint64_t channel_id, std::vector<link_envelope> batch,
              reply_fn<std::uint32_t> done) override {
    if (upload_error)
      return done(*upload_error);
    auto n = static_cast<std::uint32_t>(batch.size());
    if (!hold_uploads) {
      done(n);
      return;
    }
    uploads.push(upload_call{std::move(child_id), channel_id, std::move(batch), std::move(done)});
  }
  void report_twins(std::string child_id, std::uint64_t, std::vector<twin_update> updates,
                    reply_fn<void> done) override {
    reports.push({std::move(child_id), std::move(updates)});
    done({});
  }

  mailbox<std::string> admits;
  mailbox<std::shared_ptr<child_channel>> ups;
  mailbox<down_call> downs;
  mailbox<upload_call> uploads;
  mailbox<std::pair<std::string, std::vector<twin_update>>> reports;
};

struct invoke_call {
  std::string device, module, method, payload;
  std::chrono::milliseconds timeout{0};
};

/// The child's actor side: records what the parent sends; invoke answers from another thread.
class fake_handler final : public downstream_handler {
 public:
  ~fake_handler() override {
    for (auto& t : threads_)
      t.join();
  }
  void sync_scope(std::vector<device_record> entries, reply_fn<void> done) override {
    scopes.push(std::move(entries));
    done({});
  }
  void desired(std::vector<twin_update> updates, reply_fn<void> done) override {
    desireds.push(std::move(updates));
    done({});
  }
  void invoke(std::string device, std::string module, std::string method, std::string payload_json,
              std::chrono::milliseconds timeout, reply_fn<method_reply> done) override {
    invokes.push(invoke_call{device, module, method, payload_json, timeout});
    std::lock_guard<std::mutex> lock(mutex_);
    threads_.emplace_back([done = std::move(done), payload_json] {
      done(method_reply{201, "{\"echo\":" + payload_json + "}"});
    });
  }

  mailbox<std::vector<device_record>> scopes;
  mailbox<std::vector<twin_update>> desireds;
  mailbox<invoke_call> invokes;

 private:
  std::mutex mutex_;
  std::vector<std::thread> threads_;
};

// --- The fixture ---------------------------------------------------------------------

struct fixture {
  explicit fixture(link_limits limits = {}) {
    REQUIRE(io.start().ok());
    server = std::make_unique<link_server>(
      link_server_options{"127.0.0.1:0", "hub", server_tls.get(), limits}, host);
    auto started = server->start(io);
    INFO((started.ok() ? std::string() : started.err().message));
    REQUIRE(started.ok());
    REQUIRE(server->port() != 0);
  }
  ~fixture() {
    gw1.reset();
    if (server)
      server->stop();
    io.stop();
  }

  std::string address() const { return "127.0.0.1:" + std::to_string(server->port()); }

  std::unique_ptr<link_client> client(tls_config* tls, const std::string& node_id = "gw1",
                                      const std::string& parent_id = "hub",
                                      link_limits limits = {}) {
    return std::make_unique<link_client>(
      io, link_client_options{address(), parent_id, node_id, tls, limits}, handler);
  }

  /// Connects gw1 (its client in `gw1`, its events in `gw1_events`) and
  /// requires it to come up; returns the up event.
  link_event connect_gw1() {
    gw1 = client(gw1_tls.get());
    auto up = connect(*gw1, gw1_events);
    INFO(up.error);
    REQUIRE(up.up);
    return up;
  }

  /// The server's channel to the next child that comes up.
  std::shared_ptr<child_channel> next_channel() {
    auto channel = host.ups.pop();
    REQUIRE(channel.has_value());
    return *channel;
  }

  // Declaration order is destruction order reversed: the server stops before
  // the fakes and the TLS contexts it borrows go, and the I/O thread last.
  io_thread io;
  fake_host host;
  fake_handler handler;
  std::unique_ptr<tls_config> server_tls = config(issue("hub"), tls_role::server_verify_clients);
  std::unique_ptr<tls_config> gw1_tls = config(issue("gw1"), tls_role::client);
  std::unique_ptr<link_server> server;
  mailbox<link_event> gw1_events;
  std::unique_ptr<link_client> gw1;  // reset first: it talks to the server on `io`
};

/// The child's side alone (gw1's identity, a fake handler, an I/O thread), for
/// parents played by the test.
struct child_fixture {
  child_fixture() { REQUIRE(io.start().ok()); }
  ~child_fixture() { io.stop(); }

  /// A client of the parent "hub" at `address`, as gw1.
  std::unique_ptr<link_client> client(const std::string& address, link_limits limits = {}) {
    return std::make_unique<link_client>(
      io, link_client_options{address, "hub", "gw1", tls.get(), limits}, handler);
  }

  io_thread io;
  fake_handler handler;
  std::unique_ptr<tls_config> tls = config(issue("gw1"), tls_role::client);
};

message make_message(int i) {
  return message_builder()
    .body("{\"n\":" + std::to_string(i) + "}")
    .property("seq", std::to_string(i))
    .connection_module_id("sensor")
    .output_name("temp")
    .build();
}

std::vector<link_envelope> make_batch(int n) {
  std::vector<link_envelope> batch;
  for (int i = 0; i < n; ++i)
    batch.push_back(link_envelope{make_message(i), "gw1", "sensor", "temp"});
  return batch;
}

/// Captures the default logger's lines while it lives.
class log_capture {
 public:
  log_capture() : sink_(std::make_shared<spdlog::sinks::ringbuffer_sink_mt>(256)) {
    spdlog::default_logger()->sinks().push_back(sink_);
  }
  ~log_capture() {
    auto& sinks = spdlog::default_logger()->sinks();
    sinks.erase(std::remove(sinks.begin(), sinks.end(), sink_), sinks.end());
  }
  bool contains(const std::string& text) const {
    for (const auto& line : sink_->last_formatted()) {
      if (line.find(text) != std::string::npos)
        return true;
    }
    return false;
  }

 private:
  std::shared_ptr<spdlog::sinks::ringbuffer_sink_mt> sink_;
};

// --- Hostile clients (on the I/O thread, through run_sync) -----------------------------

kj::Promise<void> read_to_end(kj::AsyncIoStream& stream, kj::Array<kj::byte>& buffer) {
  return stream.tryRead(buffer.begin(), 1, buffer.size())
    .then([&stream, &buffer](size_t n) -> kj::Promise<void> {
      if (n == 0)
        return kj::READY_NOW;
      return read_to_end(stream, buffer);
    });
}

/// True if the server ends the connection within `limit` (EOF or error).
kj::Promise<bool> closed_by_peer(kj::Own<kj::AsyncIoStream> stream, kj::Timer& timer,
                                 kj::Duration limit) {
  auto buffer = kj::heap(kj::heapArray<kj::byte>(4096));
  auto& s = *stream;
  auto& b = *buffer;
  return read_to_end(s, b)
    .then([] { return true; }, [](kj::Exception&&) { return true; })
    .exclusiveJoin(timer.afterDelay(limit).then([] { return false; }))
    .attach(kj::mv(stream), kj::mv(buffer));
}

kj::Promise<kj::Own<kj::AsyncIoStream>> tcp_connect(kj::AsyncIoContext& ctx,
                                                    const std::string& address) {
  return ctx.provider->getNetwork().parseAddress(address).then(
    [](kj::Own<kj::NetworkAddress> a) { return a->connect().attach(kj::mv(a)); });
}

/// A hostile client on `io`: connects to `address`, completes a TLS handshake
/// with the parent "hub" using `tls` (unless null), writes `bytes` (if any) and
/// reports whether the server ends the connection within 5 s.
bool closed_after_sending(io_thread& io, const std::string& address, tls_config* tls,
                          kj::Array<kj::byte> bytes = nullptr) {
  return io.run_sync([&](kj::AsyncIoContext& ctx) {
    auto& timer = ctx.provider->getTimer();
    return tcp_connect(ctx, address)
      .then([tls](kj::Own<kj::AsyncIoStream> tcp) -> kj::Promise<kj::Own<kj::AsyncIoStream>> {
        if (tls == nullptr)
          return kj::mv(tcp);
        return tls->context().wrapClient(kj::mv(tcp), "hub");
      })
      .then([&timer, bytes = kj::mv(bytes)](kj::Own<kj::AsyncIoStream> stream) mutable {
        if (bytes.size() == 0)
          return closed_by_peer(kj::mv(stream), timer, 5 * kj::SECONDS);
        auto& s = *stream;
        return s.write(bytes.begin(), bytes.size())
          .attach(kj::mv(bytes))
          .then([stream = kj::mv(stream), &timer]() mutable {
            return closed_by_peer(kj::mv(stream), timer, 5 * kj::SECONDS);
          });
      });
  });
}

kj::Array<kj::byte> garbage(std::size_t n) {
  auto bytes = kj::heapArray<kj::byte>(n);
  for (std::size_t i = 0; i < n; ++i)
    bytes[i] = static_cast<kj::byte>((i * 7919u + 13u) ^ 0xA5u);
  return bytes;
}

/// A parent played by the test: on hello it sends the child a syncScope whose
/// second entry has broken tagsJson, and reports how that call ended.
class scripted_parent final : public schema::Parent::Server {
 public:
  explicit scripted_parent(std::shared_ptr<mailbox<std::string>> outcome)
      : outcome_(std::move(outcome)) {}

  kj::Promise<void> hello(HelloContext context) override {
    auto child = context.getParams().getChild();
    auto req = child.syncScopeRequest();
    auto entries = req.initEntries(2);
    entries[0].setId("leaf-1");
    entries[0].setTagsJson(R"({"site":"a"})");
    entries[1].setId("bad");
    entries[1].setTagsJson("{not json");
    auto outcome = outcome_;
    tasks_.add(req.send().then(
      [outcome](capnp::Response<schema::Child::SyncScopeResults>&&) { outcome->push("ok"); },
      [outcome](kj::Exception&& e) { outcome->push(e.getDescription().cStr()); }));
    context.getResults().setParent("hub");
    return kj::READY_NOW;
  }

 private:
  struct ignore final : kj::TaskSet::ErrorHandler {
    void taskFailed(kj::Exception&&) override {}
  };
  std::shared_ptr<mailbox<std::string>> outcome_;
  ignore ignore_;
  kj::TaskSet tasks_{ignore_};
};

/// Serves one connection with `parent` as the bootstrap, on the I/O thread (the
/// listener and the connection live in a task of `io`). Returns the port.
std::uint16_t serve_scripted_parent(io_thread& io, tls_config& tls,
                                    kj::Own<scripted_parent> parent) {
  return io.run_sync([&](kj::AsyncIoContext& ctx) {
    return ctx.provider->getNetwork()
      .parseAddress("127.0.0.1:0")
      .then([&io, &tls, parent = kj::mv(parent)](kj::Own<kj::NetworkAddress> address) mutable {
        auto receiver = address->listen();
        auto port = static_cast<std::uint16_t>(receiver->getPort());
        auto& r = *receiver;
        auto served =
          r.accept()
            .then([&tls](kj::Own<kj::AsyncIoStream> tcp) {
              return tls.context().wrapServer(kj::mv(tcp));
            })
            .then([parent = kj::mv(parent)](kj::Own<kj::AsyncIoStream> stream) mutable {
              auto network =
                kj::heap<capnp::TwoPartyVatNetwork>(*stream, capnp::rpc::twoparty::Side::SERVER);
              auto rpc = kj::heap<capnp::RpcSystem<capnp::rpc::twoparty::VatId>>(
                capnp::makeRpcServer(*network, capnp::Capability::Client(kj::mv(parent))));
              // Nested attachments go innermost first: the RPC system, then
              // the network, then the stream it reads.
              auto done = network->onDisconnect();
              return done.attach(kj::mv(rpc)).attach(kj::mv(network)).attach(kj::mv(stream));
            });
        io.add_task(served.attach(kj::mv(receiver), kj::mv(address)));
        return port;
      });
  });
}

/// A TCP port that accepts connections (the kernel completes them) but never answers.
class silent_listener {
 public:
  silent_listener() : fd_(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0)) {
    REQUIRE(fd_ >= 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    REQUIRE(::bind(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0);
    REQUIRE(::listen(fd_, 8) == 0);
    socklen_t len = sizeof(addr);
    REQUIRE(::getsockname(fd_, reinterpret_cast<sockaddr*>(&addr), &len) == 0);
    port_ = ntohs(addr.sin_port);
  }
  ~silent_listener() { ::close(fd_); }
  silent_listener(const silent_listener&) = delete;
  silent_listener& operator=(const silent_listener&) = delete;
  std::uint16_t port() const { return port_; }

 private:
  int fd_;
  std::uint16_t port_ = 0;
};

}  // namespace

// --- Tests ------------------------------------------------------------------------------

TEST_CASE("a child connects: hello answers the parent's id, ping and reportTwins work", "[link]") {
  fixture f;
  auto up = f.connect_gw1();
  CHECK(up.parent_id == "hub");
  CHECK(f.host.admits.pop() == std::optional<std::string>("gw1"));
  auto channel = f.next_channel();
  CHECK(channel->child_id() == "gw1");
  CHECK(channel->id() != 0);

  mailbox<expected<std::chrono::microseconds>> pings;
  f.gw1->ping(up.generation, into(pings));
  CHECK(next_ok(pings)->count() > 0);

  mailbox<expected<void>> reported;
  f.gw1->report_twins(up.generation,
                      {twin_update{"gw1", "$edgeAgent", R"({"modules":{}})", 7, true}},
                      into(reported));
  CHECK(next_ok(reported).ok());
  auto report = f.host.reports.pop();
  REQUIRE(report.has_value());
  CHECK(report->first == "gw1");
  REQUIRE(report->second.size() == 1);
  CHECK(report->second[0].module == "$edgeAgent");
  CHECK(report->second[0].json == R"({"modules":{}})");
  CHECK(report->second[0].version == 7);
  CHECK(report->second[0].full);
}

TEST_CASE("an upload reaches the link host intact and is answered only after the host replies",
          "[link]") {
  fixture f;
  f.host.hold_uploads = true;
  auto up = f.connect_gw1();
  auto channel = f.next_channel();

  mailbox<expected<std::uint32_t>> answers;
  auto sent = make_batch(3);
  sent[2].device = "leaf-7";
  sent[2].module = "";
  sent[2].output = "";
  f.gw1->upload(up.generation, sent, into(answers));

  auto call = f.host.uploads.pop();
  REQUIRE(call.has_value());
  CHECK(call->child == "gw1");
  CHECK(call->channel == channel->id());
  REQUIRE(call->batch.size() == 3);
  for (int i = 0; i < 3; ++i) {
    const auto& got = call->batch[i];
    CHECK(got.msg.encoded() == sent[i].msg.encoded());
    CHECK(got.msg.body() == "{\"n\":" + std::to_string(i) + "}");
    CHECK(got.msg.property("seq") == std::optional<std::string_view>(std::to_string(i)));
    CHECK(got.device == sent[i].device);
    CHECK(got.module == sent[i].module);
    CHECK(got.output == sent[i].output);
  }
  // The host has not answered: neither has the parent.
  CHECK(answers.empty());
  std::thread replier([done = call->done] { done(3u); });
  replier.join();
  CHECK(*next_ok(answers) == 3u);
}

TEST_CASE("a failure of the link host reaches the child with its code and message", "[link]") {
  fixture f;
  f.host.upload_error = make_error(errc::unavailable, "store full: 100 MiB limit");
  auto up = f.connect_gw1();
  mailbox<expected<std::uint32_t>> answers;
  f.gw1->upload(up.generation, make_batch(1), into(answers));
  auto failed = next_error(answers);
  CHECK(failed.code == errc::unavailable);
  CHECK(failed.message == "store full: 100 MiB limit");
}

TEST_CASE("an unregistered child is refused and learns why", "[link]") {
  log_capture log;
  fixture f;
  auto stranger_tls = config(issue("stranger"), tls_role::client);
  mailbox<link_event> events;
  auto client = f.client(stranger_tls.get(), "stranger");
  auto down = connect(*client, events);
  CHECK_FALSE(down.up);
  CHECK(down.error == "parent refused: device 'stranger' is not registered under 'hub'");
  CHECK(f.host.admits.pop() == std::optional<std::string>("stranger"));
  CHECK(f.host.ups.empty());
  CHECK(log.contains("link: refused child 'stranger' from 127.0.0.1:"));
  CHECK(log.contains(": device 'stranger' is not registered under 'hub'"));
  // One event per attempt.
  CHECK_FALSE(events.pop(200ms).has_value());
}

TEST_CASE("a client certificate from another CA fails the TLS handshake before admission",
          "[link]") {
  fixture f;
  auto other_ca = certs::create_root_ca("Other CA", 24h);
  REQUIRE(other_ca.ok());
  // It claims a registered id, and trusts the hub's CA so it could verify the hub.
  auto intruder_tls =
    config(issue("gw1", *other_ca), tls_role::client, other_ca->cert_pem + fleet_ca().cert_pem);
  mailbox<link_event> events;
  auto client = f.client(intruder_tls.get());
  auto down = connect(*client, events);
  CHECK_FALSE(down.up);
  INFO(down.error);
  CHECK_THAT(down.error, Catch::Contains("parent 'hub'"));
  CHECK_THAT(down.error, Catch::Contains("alert") || Catch::Contains("certificate"));
  CHECK(f.host.admits.empty());
  CHECK(f.host.ups.empty());
}

TEST_CASE("an expired client certificate is refused", "[link]") {
  fixture f;
  auto expired = issue_expired("gw1", 1h);
  raw_tls_client raw(&expired);
  auto address = f.address();
  bool closed = f.io.run_sync([&](kj::AsyncIoContext& ctx) {
    auto& timer = ctx.provider->getTimer();
    return tcp_connect(ctx, address)
      .then(
        [&](kj::Own<kj::AsyncIoStream> tcp) { return raw.context->wrapClient(kj::mv(tcp), "hub"); })
      .then(
        [&timer](kj::Own<kj::AsyncIoStream> tls) -> kj::Promise<bool> {
          // TLS 1.3: the client finishes first; the server's refusal arrives as an alert.
          return closed_by_peer(kj::mv(tls), timer, 5 * kj::SECONDS);
        },
        [](kj::Exception&&) -> kj::Promise<bool> { return true; });
  });
  CHECK(closed);
  CHECK(f.host.admits.empty());
  CHECK(f.host.ups.empty());
}

TEST_CASE("a parent whose certificate names another id is refused by the child", "[link]") {
  fixture f;
  mailbox<link_event> events;
  auto client = f.client(f.gw1_tls.get(), "gw1", "other");
  auto down = connect(*client, events);
  CHECK_FALSE(down.up);
  INFO(down.error);
  CHECK_THAT(down.error, Catch::StartsWith("TLS handshake with parent 'other': "));
  CHECK(f.host.ups.empty());
}

TEST_CASE("hello naming another node than the certificate is refused", "[link]") {
  fixture f;
  mailbox<link_event> events;
  auto client = f.client(f.gw1_tls.get(), "gw2");
  auto down = connect(*client, events);
  CHECK_FALSE(down.up);
  CHECK(down.error == "parent refused: hello: node 'gw2' does not match certificate 'gw1'");
  CHECK(f.host.ups.empty());
}

TEST_CASE("the parent invokes a method on the child and gets the handler's answer", "[link]") {
  fixture f;
  f.connect_gw1();
  auto channel = f.next_channel();

  mailbox<expected<method_reply>> replies;
  channel->invoke("gw1", "sensor", "reset", R"({"hard":true})", 1500ms, into(replies));
  auto call = f.handler.invokes.pop();
  REQUIRE(call.has_value());
  CHECK(call->device == "gw1");
  CHECK(call->module == "sensor");
  CHECK(call->method == "reset");
  CHECK(call->payload == R"({"hard":true})");
  CHECK(call->timeout == 1500ms);
  auto reply = next_ok(replies);
  CHECK(reply->status == 201);
  CHECK(reply->payload_json == R"({"echo":{"hard":true}})");
}

TEST_CASE("syncScope and desired reach the child's handler", "[link]") {
  fixture f;
  f.connect_gw1();
  auto channel = f.next_channel();

  device_record leaf;
  leaf.id = "leaf-7";
  leaf.parent = "gw1";
  leaf.kind = "device";
  leaf.tags = nlohmann::json{{"site", "plant-1"}, {"line", 3}};
  leaf.auth = "sas";
  leaf.primary_key = "cHJpbWFyeQ==";
  leaf.secondary_key = "c2Vjb25kYXJ5";
  device_record sub;
  sub.id = "gw3";
  sub.parent = "gw1";
  sub.kind = "gateway";
  sub.auth = "x509_thumbprint";
  sub.thumbprint = std::string(64, 'A');

  mailbox<expected<void>> answers;
  channel->sync_scope({leaf, sub}, into(answers));
  auto scope = f.handler.scopes.pop();
  REQUIRE(scope.has_value());
  REQUIRE(scope->size() == 2);
  CHECK((*scope)[0] == leaf);
  CHECK((*scope)[1] == sub);
  CHECK(next_ok(answers).ok());

  channel->desired({twin_update{"gw1", "$edgeAgent", R"({"deployment":"d1"})", 4, false}},
                   into(answers));
  auto desired = f.handler.desireds.pop();
  REQUIRE(desired.has_value());
  REQUIRE(desired->size() == 1);
  CHECK((*desired)[0].device == "gw1");
  CHECK((*desired)[0].module == "$edgeAgent");
  CHECK((*desired)[0].json == R"({"deployment":"d1"})");
  CHECK((*desired)[0].version == 4);
  CHECK_FALSE((*desired)[0].full);
  CHECK(next_ok(answers).ok());
}

TEST_CASE("stopping the server takes the child down", "[link]") {
  fixture f;
  auto up = f.connect_gw1();
  auto channel = f.next_channel();

  f.server->stop();
  auto gone = f.host.downs.pop();
  REQUIRE(gone.has_value());
  CHECK(gone->child == "gw1");
  CHECK(gone->channel == channel->id());
  CHECK(gone->reason == "the parent stopped");
  auto down = f.gw1_events.pop();
  REQUIRE(down.has_value());
  CHECK_FALSE(down->up);
  CHECK(down->generation == up.generation);
  CHECK_THAT(down->error, Catch::StartsWith("connection to parent 'hub' lost"));

  mailbox<expected<std::uint32_t>> answers;
  f.gw1->upload(up.generation, make_batch(1), into(answers));
  CHECK(next_error(answers).code == errc::unavailable);
}

TEST_CASE("closing the client ends its channel on the server", "[link]") {
  fixture f;
  f.connect_gw1();
  auto channel = f.next_channel();

  f.gw1->close();
  auto down = f.gw1_events.pop();
  REQUIRE(down.has_value());
  CHECK_FALSE(down->up);
  CHECK(down->error == "closed");
  auto gone = f.host.downs.pop();
  REQUIRE(gone.has_value());
  CHECK(gone->child == "gw1");
  CHECK(gone->channel == channel->id());
  CHECK_FALSE(f.host.downs.pop(200ms).has_value());  // exactly once

  mailbox<expected<void>> answers;
  channel->desired({twin_update{"gw1", "", "{}", 1, true}}, into(answers));
  CHECK(next_error(answers).code == errc::unavailable);
}

TEST_CASE("an upload over the parent's limits is refused naming the limit", "[link]") {
  link_limits limits;
  limits.max_batch_messages = 2;
  limits.max_batch_bytes = 4096;
  fixture f(limits);
  auto up = f.connect_gw1();

  mailbox<expected<std::uint32_t>> answers;
  f.gw1->upload(up.generation, make_batch(3), into(answers));
  auto too_many = next_error(answers);
  CHECK(too_many.code == errc::invalid_argument);
  CHECK(too_many.message == "upload: 3 messages exceed the limit of 2 (max_batch_messages)");

  auto big = message_builder().body(std::string(5000, 'x')).build();
  f.gw1->upload(up.generation, {link_envelope{big, "gw1", "sensor", "temp"}}, into(answers));
  CHECK_THAT(next_error(answers).message, Catch::Contains("(max_batch_bytes)"));

  // The connection is still good.
  f.gw1->upload(up.generation, make_batch(2), into(answers));
  CHECK(next_ok(answers).ok());
}

TEST_CASE("a child may keep only max_pending_uploads uploads waiting for the host", "[link]") {
  link_limits limits;
  limits.max_pending_uploads = 2;
  fixture f(limits);
  f.host.hold_uploads = true;
  auto up = f.connect_gw1();

  mailbox<expected<std::uint32_t>> answers;
  f.gw1->upload(up.generation, make_batch(1), into(answers));
  f.gw1->upload(up.generation, make_batch(2), into(answers));
  auto first = f.host.uploads.pop();
  auto second = f.host.uploads.pop();
  REQUIRE(first.has_value());
  REQUIRE(second.has_value());
  f.gw1->upload(up.generation, make_batch(3), into(answers));
  auto refused = next_error(answers);
  CHECK(refused.code == errc::unavailable);
  CHECK(refused.message ==
        "upload: 2 uploads of this connection are still pending (max_pending_uploads)");

  first->done(1u);
  CHECK(next_ok(answers).ok());
  // A slot is free again.
  f.gw1->upload(up.generation, make_batch(4), into(answers));
  auto third = f.host.uploads.pop();
  REQUIRE(third.has_value());
  CHECK(third->batch.size() == 4);
  second->done(2u);
  third->done(4u);
  CHECK(next_ok(answers).ok());
  CHECK(next_ok(answers).ok());
}

TEST_CASE("start reports an address it cannot listen on", "[link]") {
  io_thread io;
  REQUIRE(io.start().ok());
  fake_host host;
  auto tls = config(issue("hub"), tls_role::server_verify_clients);
  {
    link_server first(link_server_options{"127.0.0.1:0", "hub", tls.get(), {}}, host);
    REQUIRE(first.start(io).ok());
    auto taken = "127.0.0.1:" + std::to_string(first.port());
    link_server second(link_server_options{taken, "hub", tls.get(), {}}, host);
    auto busy = second.start(io);
    REQUIRE_FALSE(busy.ok());
    CHECK(busy.err().code == errc::io_error);
    CHECK_THAT(busy.err().message,
               Catch::StartsWith("link server: cannot listen on " + taken + ": "));
    CHECK_THAT(busy.err().message, Catch::Contains("in use"));

    link_server bad(link_server_options{"127.0.0.1:99999", "hub", tls.get(), {}}, host);
    CHECK_FALSE(bad.start(io).ok());
    link_server no_tls(link_server_options{"127.0.0.1:0", "hub", nullptr, {}}, host);
    auto missing = no_tls.start(io);
    REQUIRE_FALSE(missing.ok());
    CHECK(missing.err().code == errc::invalid_argument);
  }
  io.stop();
}

TEST_CASE("hostile clients don't hurt the server, and a good child connects afterwards", "[link]") {
  link_limits limits;
  limits.handshake_timeout = 500ms;
  fixture f(limits);
  auto address = f.address();

  SECTION("garbage instead of a TLS handshake") {
    CHECK(closed_after_sending(f.io, address, nullptr, garbage(3000)));
  }
  SECTION("garbage after a good TLS handshake") {
    CHECK(closed_after_sending(f.io, address, f.gw1_tls.get(), garbage(20000)));
    CHECK(f.host.admits.pop() == std::optional<std::string>("gw1"));
  }
  SECTION("a plausible frame header announcing a huge message after TLS") {
    // One segment of 0x7fffffff words.
    auto header = kj::heapArray<kj::byte>({0, 0, 0, 0, 0xff, 0xff, 0xff, 0x7f});
    CHECK(closed_after_sending(f.io, address, f.gw1_tls.get(), kj::mv(header)));
  }
  SECTION("a client that connects and never says anything") {
    CHECK(closed_after_sending(f.io, address, nullptr));
    CHECK(f.host.admits.empty());
  }
  SECTION("a child that passes TLS and admission but never says hello") {
    CHECK(closed_after_sending(f.io, address, f.gw1_tls.get()));
    CHECK(f.host.ups.empty());
  }

  f.connect_gw1();
}

TEST_CASE("max_connections refuses connections beyond the limit", "[link]") {
  link_limits limits;
  limits.max_connections = 1;
  fixture f(limits);
  f.connect_gw1();

  mailbox<link_event> second_events;
  auto second = f.client(f.gw1_tls.get());
  auto refused = connect(*second, second_events);
  CHECK_FALSE(refused.up);
  INFO(refused.error);
}

TEST_CASE("calls on an older generation fail at once with unavailable", "[link]") {
  fixture f;
  auto first = f.connect_gw1();
  auto& events = f.gw1_events;

  auto second_generation = f.gw1->connect([&events](link_event e) { events.push(std::move(e)); });
  CHECK(second_generation > first.generation);
  // The old connection's down event, then the new one's up.
  auto old_down = events.pop();
  REQUIRE(old_down.has_value());
  CHECK(old_down->generation == first.generation);
  CHECK_FALSE(old_down->up);
  CHECK(old_down->error == "closed");
  auto second = events.pop();
  REQUIRE(second.has_value());
  CHECK(second->generation == second_generation);
  REQUIRE(second->up);

  mailbox<expected<std::uint32_t>> answers;
  f.gw1->upload(first.generation, make_batch(1), into(answers));
  auto stale = next_error(answers);
  CHECK(stale.code == errc::unavailable);
  CHECK_THAT(stale.message, Catch::Contains("link down"));

  f.gw1->upload(second_generation, make_batch(1), into(answers));
  CHECK(next_ok(answers).ok());
}

TEST_CASE("a connection refused by the network is reported with the address", "[link]") {
  child_fixture c;
  // A port nobody listens on: bind one, then close it.
  std::uint16_t port = c.io.run_sync([](kj::AsyncIoContext& ctx) {
    return ctx.provider->getNetwork()
      .parseAddress("127.0.0.1:0")
      .then([](kj::Own<kj::NetworkAddress> a) {
        return static_cast<std::uint16_t>(a->listen()->getPort());
      });
  });
  std::string address = "127.0.0.1:" + std::to_string(port);
  mailbox<link_event> events;
  auto client = c.client(address);
  auto down = connect(*client, events);
  CHECK_FALSE(down.up);
  CHECK_THAT(down.error, Catch::StartsWith("connect " + address + ": "));
  CHECK_THAT(down.error, Catch::Contains("refused"));
}

TEST_CASE("a parent that never answers the TLS handshake runs into handshake_timeout", "[link]") {
  child_fixture c;
  silent_listener silent;
  link_limits limits;
  limits.handshake_timeout = 300ms;
  mailbox<link_event> events;
  auto client = c.client("127.0.0.1:" + std::to_string(silent.port()), limits);
  auto down = connect(*client, events);
  CHECK_FALSE(down.up);
  CHECK(down.error ==
        "TLS handshake with parent 'hub': no answer within 300 ms (handshake_timeout)");
}

TEST_CASE("a syncScope entry with broken tagsJson fails the call naming the entry", "[link]") {
  // Declared before the child's side, so that they outlive its I/O thread.
  auto hub_tls = config(issue("hub"), tls_role::server_verify_clients);
  auto outcome = std::make_shared<mailbox<std::string>>();
  child_fixture c;
  auto port = serve_scripted_parent(c.io, *hub_tls, kj::heap<scripted_parent>(outcome));
  mailbox<link_event> events;
  auto client = c.client("127.0.0.1:" + std::to_string(port));
  auto up = connect(*client, events);
  INFO(up.error);
  REQUIRE(up.up);
  auto result = outcome->pop();
  REQUIRE(result.has_value());
  CHECK_THAT(*result, Catch::Contains("syncScope: entry 1 ('bad'): tagsJson: not valid JSON"));
  CHECK(c.handler.scopes.empty());
}
