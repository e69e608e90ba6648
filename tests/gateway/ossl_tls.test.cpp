// Unit test of canopy::tls_server_context / tls_server_stream (OpenSSL 3 server
// over kj streams): real handshakes on loopback TCP against kj-tls clients with
// no, CA-signed, self-signed, foreign and expired certificates; bulk and small
// transfers in both directions at once; TLS 1.2 and KeyUpdate (with a blocking
// OpenSSL client on a thread); timeouts, garbage and disconnections; no buffers
// kept after a transfer; and (printed, not asserted) the heap held per idle
// established connection, against plain TCP and kj-tls (clients in a child process).
#include "gateway/ossl_tls.hpp"

#include "gateway/certs.hpp"
#include "temp_dir.hpp"
#include "test_certs.hpp"

#include <kj/async-io.h>
#include <kj/compat/tls.h>
#include <kj/debug.h>
#include <kj/exception.h>
#include <catch2/catch.hpp>

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>

#include <arpa/inet.h>
#include <malloc.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

using namespace canopy;
using namespace canopy::unit_test;
using namespace std::chrono_literals;

namespace {

/// Bytes of heap in use (glibc), for memory figures.
size_t heap_in_use() {
  auto m = mallinfo2();
  return m.uordblks + m.hblkhd;
}

std::string describe(const kj::Exception& e) {
  auto d = e.getDescription();
  return std::string(d.cStr(), d.size());
}

/// The node's MQTT server identity: "hub", issued by the fleet CA.
const certs::key_and_cert& hub_identity() {
  static const certs::key_and_cert hub = issue("hub");
  return hub;
}

std::unique_ptr<tls_server_context> server_context() {
  auto made = tls_server_context::from_pem(hub_identity(), fleet_ca().cert_pem);
  INFO((made.ok() ? std::string() : made.err().message));
  REQUIRE(made.ok());
  return std::move(*made);
}

/// A self-signed leaf certificate (no extensions, like many device stacks make),
/// EC P-256, valid from five minutes ago for a day.
certs::key_and_cert self_signed(const std::string& cn) {
  std::unique_ptr<EVP_PKEY, decltype(&EVP_PKEY_free)> key(EVP_EC_gen("P-256"), &EVP_PKEY_free);
  REQUIRE(key);
  std::unique_ptr<X509, decltype(&X509_free)> cert(X509_new(), &X509_free);
  REQUIRE(cert);
  REQUIRE(X509_set_version(cert.get(), 2) == 1);
  REQUIRE(ASN1_INTEGER_set(X509_get_serialNumber(cert.get()), 4242) == 1);
  REQUIRE(X509_gmtime_adj(X509_getm_notBefore(cert.get()), -300) != nullptr);
  REQUIRE(X509_gmtime_adj(X509_getm_notAfter(cert.get()), 86400) != nullptr);
  REQUIRE(X509_set_pubkey(cert.get(), key.get()) == 1);
  X509_NAME* name = X509_get_subject_name(cert.get());
  REQUIRE(X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_UTF8,
                                     reinterpret_cast<const unsigned char*>(cn.c_str()), -1, -1,
                                     0) == 1);
  REQUIRE(X509_set_issuer_name(cert.get(), name) == 1);
  REQUIRE(X509_sign(cert.get(), key.get(), EVP_sha256()) > 0);
  auto to_string = [](BIO* bio) {
    char* data = nullptr;
    long n = BIO_get_mem_data(bio, &data);
    return std::string(data, static_cast<size_t>(n));
  };
  std::unique_ptr<BIO, decltype(&BIO_free)> cert_bio(BIO_new(BIO_s_mem()), &BIO_free);
  std::unique_ptr<BIO, decltype(&BIO_free)> key_bio(BIO_new(BIO_s_mem()), &BIO_free);
  REQUIRE(PEM_write_bio_X509(cert_bio.get(), cert.get()) == 1);
  REQUIRE(
    PEM_write_bio_PrivateKey(key_bio.get(), key.get(), nullptr, nullptr, 0, nullptr, nullptr) == 1);
  return certs::key_and_cert{to_string(cert_bio.get()), to_string(key_bio.get())};
}

/// Both ends of one loopback TCP connection.
struct tcp_pair {
  kj::Own<kj::AsyncIoStream> server;
  kj::Own<kj::AsyncIoStream> client;
};

tcp_pair connect_tcp(kj::AsyncIoContext& io) {
  auto& network = io.provider->getNetwork();
  auto listener = network.parseAddress("127.0.0.1", 0).wait(io.waitScope)->listen();
  auto target = network.parseAddress("127.0.0.1", listener->getPort()).wait(io.waitScope);
  auto accepted = listener->accept();
  auto client = target->connect().wait(io.waitScope);
  auto server = accepted.wait(io.waitScope);
  return {kj::mv(server), kj::mv(client)};
}

/// A client-side stream that can be cut: with a budget set, it passes on only
/// that many more bytes of what is written, then shuts the TCP write side (the
/// server sees the end of the stream) and swallows the rest.
class cut_stream final : public kj::AsyncIoStream {
 public:
  explicit cut_stream(kj::Own<kj::AsyncIoStream> inner) : inner_(kj::mv(inner)) {}

  /// From now on pass `bytes` more bytes, then end the stream.
  void cut_after(size_t bytes) {
    budget_ = bytes;
    if (bytes == 0)
      end();
  }

  kj::Promise<size_t> tryRead(void* buffer, size_t min_bytes, size_t max_bytes) override {
    return inner_->tryRead(buffer, min_bytes, max_bytes);
  }
  kj::Promise<void> write(const void* buffer, size_t size) override {
    if (ended_)
      return kj::READY_NOW;
    KJ_IF_MAYBE (budget, budget_) {
      size_t n = std::min(size, *budget);
      *budget -= n;
      auto written = n == 0 ? kj::Promise<void>(kj::READY_NOW) : inner_->write(buffer, n);
      if (*budget == 0)
        return written.then([this] { end(); });
      return written;
    }
    return inner_->write(buffer, size);
  }
  kj::Promise<void> write(kj::ArrayPtr<const kj::ArrayPtr<const kj::byte>> pieces) override {
    std::string joined;
    for (auto& p : pieces)
      joined.append(reinterpret_cast<const char*>(p.begin()), p.size());
    auto owned = kj::heap<std::string>(std::move(joined));
    auto& ref = *owned;
    return write(ref.data(), ref.size()).attach(kj::mv(owned));
  }
  kj::Promise<void> whenWriteDisconnected() override { return inner_->whenWriteDisconnected(); }
  void shutdownWrite() override {
    if (!ended_)
      inner_->shutdownWrite();
    ended_ = true;
  }

 private:
  void end() {
    if (!ended_)
      inner_->shutdownWrite();
    ended_ = true;
  }

  kj::Own<kj::AsyncIoStream> inner_;
  kj::Maybe<size_t> budget_;
  bool ended_ = false;
};

/// One TLS connection: our server side, the kj-tls client side, and what failed.
struct tls_session {
  kj::Own<tls_server_stream> server;
  kj::Own<kj::AsyncIoStream> client;
  cut_stream* client_raw = nullptr;  // to cut the client's TCP stream
  bool server_ok = false;
  std::string server_error;
  kj::Exception::Type server_error_type = kj::Exception::Type::FAILED;
  bool client_ok = false;
  std::string client_error;
};

/// Connects `client` (expecting the server "hub") to `server` over loopback
/// TCP and runs both handshakes; waits for both sides (at most 10 s).
tls_session open_session(kj::AsyncIoContext& io, const tls_server_context& server,
                         kj::TlsContext& client, kj::Duration handshake_timeout = 5 * kj::SECONDS) {
  auto tcp = connect_tcp(io);
  auto cut = kj::heap<cut_stream>(kj::mv(tcp.client));
  tls_session out;
  out.client_raw = cut.get();
  auto& timer = io.provider->getTimer();
  auto server_side = server.accept(kj::mv(tcp.server), timer, handshake_timeout)
                       .then(
                         [&](kj::Own<tls_server_stream> s) {
                           out.server_ok = true;
                           out.server = kj::mv(s);
                         },
                         [&](kj::Exception&& e) {
                           out.server_error = describe(e);
                           out.server_error_type = e.getType();
                         });
  auto client_side = client.wrapClient(kj::mv(cut), "hub")
                       .then(
                         [&](kj::Own<kj::AsyncIoStream> s) {
                           out.client_ok = true;
                           out.client = kj::mv(s);
                         },
                         [&](kj::Exception&& e) { out.client_error = describe(e); });
  auto both = kj::joinPromises(kj::arr(kj::mv(server_side), kj::mv(client_side)));
  timer.timeoutAfter(10 * kj::SECONDS, kj::mv(both)).wait(io.waitScope);
  return out;
}

/// A session that must succeed.
tls_session established(kj::AsyncIoContext& io, const tls_server_context& server,
                        kj::TlsContext& client) {
  auto s = open_session(io, server, client);
  INFO("server: " << s.server_error << " / client: " << s.client_error);
  REQUIRE(s.server_ok);
  REQUIRE(s.client_ok);
  return s;
}

std::string pattern(size_t size, unsigned seed) {
  std::string out(size, '\0');
  unsigned x = seed * 2654435761u + 1;
  for (auto& c : out) {
    x = x * 1103515245u + 12345u;
    c = static_cast<char>(x >> 16);
  }
  return out;
}

/// Runs `promise` to completion (at most 10 s).
template <class T>
T wait_for(kj::AsyncIoContext& io, kj::Promise<T> promise) {
  return io.provider->getTimer().timeoutAfter(10 * kj::SECONDS, kj::mv(promise)).wait(io.waitScope);
}

/// The exception `promise` rejects with (it must reject within 10 s).
template <class T>
kj::Exception failure_of(kj::AsyncIoContext& io, kj::Promise<T> promise) {
  kj::Maybe<kj::Exception> failure;
  auto watched = promise.then([](T&&) {}, [&](kj::Exception&& e) { failure = kj::mv(e); });
  wait_for(io, kj::mv(watched));
  KJ_IF_MAYBE (e, failure) {
    return kj::mv(*e);
  }
  FAIL("the promise did not fail");
  return KJ_EXCEPTION(FAILED, "unreachable");
}

kj::Exception failure_of(kj::AsyncIoContext& io, kj::Promise<void> promise) {
  kj::Maybe<kj::Exception> failure;
  auto watched = promise.then([] {}, [&](kj::Exception&& e) { failure = kj::mv(e); });
  wait_for(io, kj::mv(watched));
  KJ_IF_MAYBE (e, failure) {
    return kj::mv(*e);
  }
  FAIL("the promise did not fail");
  return KJ_EXCEPTION(FAILED, "unreachable");
}

std::string read_exactly(kj::AsyncIoContext& io, kj::AsyncInputStream& in, size_t size) {
  std::string buf(size, '\0');
  wait_for(io, in.read(buf.data(), size));
  return buf;
}

/// A blocking OpenSSL client on its own thread, for what a kj-tls client cannot
/// do: cap the version at TLS 1.2, or verify the server inside the handshake
/// (and so abort it with an alert). Connects to 127.0.0.1:`port`, sends `send`,
/// reads `expect` bytes, sends close_notify. Sockets time out after 5 s.
class openssl_client {
 public:
  struct options {
    const certs::key_and_cert* identity = nullptr;  ///< client certificate, if any
    std::string trusted_ca_pem;  ///< verify the server against this (else no check)
    int max_version = 0;         ///< e.g. TLS1_2_VERSION; 0 = OpenSSL's default
    std::string send;            ///< written after the handshake
    size_t expect = 0;           ///< bytes to read after writing
    bool key_update = false;     ///< TLS 1.3 KeyUpdate (update_requested) before writing
  };

  openssl_client(int port, options o)
      : options_(std::move(o)), thread_([this, port] { run(port); }) {}

  /// Waits for the client to finish; then error(), received() may be read.
  void join() {
    if (thread_.joinable())
      thread_.join();
  }
  bool handshake_ok() const { return handshake_ok_; }
  const std::string& error() const { return error_; }
  const std::string& received() const { return received_; }

 private:
  void run(int port) {
    SSL_CTX* ctx = SSL_CTX_new(TLS_client_method());
    if (ctx == nullptr) {
      error_ = "SSL_CTX_new";
      return;
    }
    if (options_.max_version != 0)
      SSL_CTX_set_max_proto_version(ctx, options_.max_version);
    if (!options_.trusted_ca_pem.empty()) {
      BIO* bio =
        BIO_new_mem_buf(options_.trusted_ca_pem.data(), int(options_.trusted_ca_pem.size()));
      X509* ca = PEM_read_bio_X509(bio, nullptr, nullptr, nullptr);
      X509_STORE_add_cert(SSL_CTX_get_cert_store(ctx), ca);
      X509_free(ca);
      BIO_free(bio);
      SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, nullptr);
    }
    if (options_.identity != nullptr) {
      const auto& id = *options_.identity;
      BIO* cert_bio = BIO_new_mem_buf(id.cert_pem.data(), int(id.cert_pem.size()));
      BIO* key_bio = BIO_new_mem_buf(id.key_pem.data(), int(id.key_pem.size()));
      X509* cert = PEM_read_bio_X509(cert_bio, nullptr, nullptr, nullptr);
      EVP_PKEY* key = PEM_read_bio_PrivateKey(key_bio, nullptr, nullptr, nullptr);
      SSL_CTX_use_certificate(ctx, cert);
      SSL_CTX_use_PrivateKey(ctx, key);
      X509_free(cert);
      EVP_PKEY_free(key);
      BIO_free(cert_bio);
      BIO_free(key_bio);
    }
    int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    timeval timeout{5, 0};
    ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout));
    ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof(timeout));
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(static_cast<std::uint16_t>(port));
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    SSL* ssl = SSL_new(ctx);
    if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
      error_ = "connect failed";
    } else if (SSL_set_fd(ssl, fd); SSL_connect(ssl) != 1) {
      char buf[256];
      ERR_error_string_n(ERR_get_error(), buf, sizeof(buf));
      error_ = buf;
    } else {
      handshake_ok_ = true;
      if (options_.key_update && SSL_key_update(ssl, SSL_KEY_UPDATE_REQUESTED) != 1)
        error_ = "SSL_key_update failed";
      if (!options_.send.empty() &&
          SSL_write(ssl, options_.send.data(), int(options_.send.size())) <= 0)
        error_ = "write failed";
      char buf[4096];
      while (error_.empty() && received_.size() < options_.expect) {
        int n = SSL_read(ssl, buf, int(std::min(sizeof(buf), options_.expect - received_.size())));
        if (n <= 0)
          error_ = "read failed";
        else
          received_.append(buf, size_t(n));
      }
      SSL_shutdown(ssl);
    }
    ERR_clear_error();
    SSL_free(ssl);
    ::close(fd);
    SSL_CTX_free(ctx);
  }

  options options_;
  bool handshake_ok_ = false;
  std::string error_;
  std::string received_;
  std::thread thread_;  // last: starts once the rest is set up
};

/// A listener on 127.0.0.1 (ephemeral port).
kj::Own<kj::ConnectionReceiver> listen_loopback(kj::AsyncIoContext& io) {
  return io.provider->getNetwork().parseAddress("127.0.0.1", 0).wait(io.waitScope)->listen();
}

}  // namespace

TEST_CASE("a client without a certificate connects and bytes flow both ways", "[ossl_tls]") {
  auto io = kj::setupAsyncIo();
  auto server = server_context();
  CHECK(server->common_name() == "hub");
  CHECK(server->problem().empty());
  raw_tls_client anonymous(nullptr);
  auto s = established(io, *server, *anonymous.context);

  const auto& peer = s.server->peer();
  CHECK_FALSE(peer.has_cert);
  CHECK_FALSE(peer.chain_ok);
  CHECK(peer.chain_error.empty());
  CHECK(peer.common_name.empty());
  CHECK(peer.thumbprint_sha256_hex.empty());
  CHECK(std::string(s.server->protocol_version()) == "TLSv1.3");
  CHECK_FALSE(std::string(s.server->cipher()).empty());

  SECTION("large payloads, both directions at once") {
    // Each side has a read and a write in flight together; neither finishes
    // unless the other side reads concurrently (the socket buffers are smaller).
    const auto up = pattern(3 * 1024 * 1024 + 17, 1);
    const auto down = pattern(2 * 1024 * 1024 + 5, 2);
    std::string got_up(up.size(), '\0');
    std::string got_down(down.size(), '\0');
    auto all = kj::joinPromises(kj::arr(
      s.client->write(up.data(), up.size()), s.server->read(got_up.data(), got_up.size()),
      s.server->write(down.data(), down.size()), s.client->read(got_down.data(), got_down.size())));
    wait_for(io, kj::mv(all));
    CHECK(got_up == up);
    CHECK(got_down == down);
  }

  SECTION("many small writes, both directions") {
    constexpr int count = 2000;
    std::string expected_up;
    std::string expected_down;
    for (int i = 0; i < count; ++i) {
      expected_up += "u" + std::to_string(i) + ";";
      expected_down += "d" + std::to_string(i) + ";";
    }
    // Chains of sequential writes (one write in flight per stream, as kj requires).
    auto writes = [&](kj::AsyncOutputStream& out, char tag) {
      kj::Promise<void> chain = kj::READY_NOW;
      for (int i = 0; i < count; ++i) {
        chain = chain.then([&out, tag, i] {
          auto text = kj::heap<std::string>(tag + std::to_string(i) + ";");
          auto& ref = *text;
          return out.write(ref.data(), ref.size()).attach(kj::mv(text));
        });
      }
      return chain;
    };
    std::string got_up(expected_up.size(), '\0');
    std::string got_down(expected_down.size(), '\0');
    auto all = kj::joinPromises(kj::arr(writes(*s.client, 'u'), writes(*s.server, 'd'),
                                        s.server->read(got_up.data(), got_up.size()),
                                        s.client->read(got_down.data(), got_down.size())));
    wait_for(io, kj::mv(all));
    CHECK(got_up == expected_up);
    CHECK(got_down == expected_down);
  }

  SECTION("write(pieces): small pieces gathered, large ones split") {
    const auto big = pattern(40000, 3);
    const std::string a = "alpha", b = "beta", c = "gamma";
    auto piece = [](const std::string& t) {
      return kj::arrayPtr(reinterpret_cast<const kj::byte*>(t.data()), t.size());
    };
    kj::ArrayPtr<const kj::byte> pieces[] = {piece(a), kj::ArrayPtr<const kj::byte>(), piece(b),
                                             piece(big), piece(c)};
    const auto expected = a + b + big + c;
    std::string got(expected.size(), '\0');
    auto all = kj::joinPromises(
      kj::arr(s.server->write(kj::arrayPtr(pieces, 5)), s.client->read(got.data(), got.size())));
    wait_for(io, kj::mv(all));
    CHECK(got == expected);
  }

  SECTION("tryRead returns what is there once min_bytes arrived") {
    wait_for(io, s.client->write("hello", 5));
    char buf[64];
    auto n = wait_for(io, s.server->tryRead(buf, 1, sizeof(buf)));
    CHECK(std::string(buf, n) == "hello");
  }
}

TEST_CASE("after a transfer an idle connection holds no more heap than before", "[ossl_tls]") {
  auto io = kj::setupAsyncIo();
  auto server = server_context();
  raw_tls_client anonymous(nullptr);
  const auto data = pattern(1024 * 1024, 6);
  std::string got(data.size(), '\0');
  auto both_ways = [&](tls_session& s) {
    wait_for(io,
             kj::joinPromises(kj::arr(
               s.client->write(data.data(), data.size()), s.server->read(got.data(), got.size()),
               s.server->write(data.data(), data.size()), s.client->read(got.data(), got.size()))));
  };
  // A first connection pays for one-time allocations (kj's and OpenSSL's).
  auto warm = established(io, *server, *anonymous.context);
  both_ways(warm);

  auto s = established(io, *server, *anonymous.context);
  // Idle, with a read pending on each side as an MQTT session keeps one.
  char sink[1];
  auto idle_heap = [&] {
    auto pending = s.server->tryRead(sink, 1, 1);
    auto client_pending = s.client->tryRead(sink, 1, 1);
    wait_for(io, io.provider->getTimer().afterDelay(10 * kj::MILLISECONDS));
    return heap_in_use();
  };
  const size_t before = idle_heap();
  both_ways(s);
  const bool same = got == data;  // (not CHECK(got == data): Catch -s would keep copies)
  // No read or write buffer is left behind (neither ours nor OpenSSL's record
  // buffers; kj-tls's client buffers are fixed from the start).
  const size_t after = idle_heap();
  CHECK(same);
  // A retained record buffer would be >= 16 KiB; glibc's tcache (freed chunks
  // mallinfo2 still counts as in use) makes up to ~2 KiB of noise.
  INFO("heap grown by " << (long(after) - long(before)) << " B");
  CHECK(long(after) - long(before) < 4096);
}

TEST_CASE("a client certificate from the fleet CA is seen and its chain verified", "[ossl_tls]") {
  auto io = kj::setupAsyncIo();
  auto server = server_context();

  SECTION("issued by the root") {
    auto device = issue("device-1");
    raw_tls_client client(&device);
    auto s = established(io, *server, *client.context);
    const auto& peer = s.server->peer();
    CHECK(peer.has_cert);
    CHECK(peer.common_name == "device-1");
    CHECK(peer.chain_ok);
    CHECK(peer.chain_error.empty());
    auto thumbprint = certs::thumbprint_sha256(device.cert_pem);
    REQUIRE(thumbprint.ok());
    CHECK(peer.thumbprint_sha256_hex == *thumbprint);
  }
  SECTION("issued by an intermediate CA, the chain sent by the client") {
    auto opts = certs::for_id("line-3", 24h);
    opts.is_ca = true;
    auto intermediate = certs::issue(fleet_ca(), opts);
    REQUIRE(intermediate.ok());
    auto device = issue("thermostat-17", *intermediate);
    device.cert_pem += intermediate->cert_pem;
    raw_tls_client client(&device);
    auto s = established(io, *server, *client.context);
    CHECK(s.server->peer().common_name == "thermostat-17");
    CHECK(s.server->peer().chain_ok);
    INFO(s.server->peer().chain_error);
  }
}

TEST_CASE("a self-signed client certificate gets through for thumbprint authentication",
          "[ossl_tls]") {
  auto io = kj::setupAsyncIo();
  auto server = server_context();

  SECTION("a leaf without extensions") {
    auto device = self_signed("sensor-9");
    raw_tls_client client(&device);
    auto s = established(io, *server, *client.context);
    const auto& peer = s.server->peer();
    CHECK(peer.has_cert);
    CHECK(peer.common_name == "sensor-9");
    CHECK_FALSE(peer.chain_ok);
    CHECK_THAT(peer.chain_error, Catch::Contains("self") && Catch::Contains("signed"));
    auto thumbprint = certs::thumbprint_sha256(device.cert_pem);
    REQUIRE(thumbprint.ok());
    CHECK(peer.thumbprint_sha256_hex == *thumbprint);
    CHECK(peer.thumbprint_sha256_hex.size() == 64);
  }
  SECTION("a self-signed CA certificate (as `openssl req -x509` makes)") {
    auto device = certs::create_root_ca("sensor-10", 24h);
    REQUIRE(device.ok());
    raw_tls_client client(&*device);
    auto s = established(io, *server, *client.context);
    const auto& peer = s.server->peer();
    CHECK(peer.has_cert);
    CHECK(peer.common_name == "sensor-10");
    CHECK_FALSE(peer.chain_ok);
    CHECK_FALSE(peer.chain_error.empty());
    auto thumbprint = certs::thumbprint_sha256(device->cert_pem);
    REQUIRE(thumbprint.ok());
    CHECK(peer.thumbprint_sha256_hex == *thumbprint);
  }
}

TEST_CASE("client certificates that do not chain to the fleet CA are reported", "[ossl_tls]") {
  auto io = kj::setupAsyncIo();
  auto server = server_context();

  SECTION("another CA") {
    auto other_ca = certs::create_root_ca("Other CA", 24h);
    REQUIRE(other_ca.ok());
    auto intruder = issue("device-1", *other_ca);  // claims a registered id
    raw_tls_client client(&intruder);
    auto s = established(io, *server, *client.context);
    CHECK(s.server->peer().has_cert);
    CHECK(s.server->peer().common_name == "device-1");
    CHECK_FALSE(s.server->peer().chain_ok);
    CHECK_THAT(s.server->peer().chain_error,
               Catch::Contains("unable to get local issuer certificate"));
  }
  SECTION("expired") {
    auto expired = issue_expired("device-2", 1h);
    raw_tls_client client(&expired);
    auto s = established(io, *server, *client.context);
    CHECK(s.server->peer().has_cert);
    CHECK_FALSE(s.server->peer().chain_ok);
    CHECK_THAT(s.server->peer().chain_error,
               Catch::StartsWith("certificate has expired (notAfter "));
  }
}

TEST_CASE("handshake failures are kj exceptions that say why", "[ossl_tls]") {
  auto io = kj::setupAsyncIo();
  auto server = server_context();
  auto& timer = io.provider->getTimer();

  SECTION("a client that sends nothing times out") {
    auto tcp = connect_tcp(io);
    auto e = failure_of(io, server->accept(kj::mv(tcp.server), timer, 100 * kj::MILLISECONDS));
    CHECK(e.getType() == kj::Exception::Type::OVERLOADED);
    CHECK(describe(e) == "TLS handshake not finished within 100 ms");
  }
  SECTION("a client that is not speaking TLS") {
    auto tcp = connect_tcp(io);
    auto accepted = server->accept(kj::mv(tcp.server), timer, 5 * kj::SECONDS);
    wait_for(io, tcp.client->write("GET / HTTP/1.1\r\nHost: hub\r\n\r\n", 29));
    auto e = failure_of(io, kj::mv(accepted));
    CHECK(e.getType() == kj::Exception::Type::FAILED);
    CHECK_THAT(describe(e), Catch::StartsWith("TLS handshake failed: "));
  }
  SECTION("a client that closes the connection during the handshake") {
    auto tcp = connect_tcp(io);
    auto accepted = server->accept(kj::mv(tcp.server), timer, 5 * kj::SECONDS);
    wait_for(io, tcp.client->write("\x16\x03\x01\x00\x80", 5));  // a record header, then nothing
    tcp.client = nullptr;
    auto e = failure_of(io, kj::mv(accepted));
    CHECK(e.getType() == kj::Exception::Type::DISCONNECTED);
  }
  SECTION("a client that does not trust our certificate (and says so with an alert)") {
    auto other_ca = certs::create_root_ca("Other CA", 24h);
    REQUIRE(other_ca.ok());
    auto listener = listen_loopback(io);
    openssl_client::options o;
    o.trusted_ca_pem = other_ca->cert_pem;
    openssl_client client(int(listener->getPort()), o);
    auto raw = wait_for(io, listener->accept());
    auto e = failure_of(io, server->accept(kj::mv(raw), timer, 5 * kj::SECONDS));
    client.join();
    CHECK_FALSE(client.handshake_ok());
    CHECK_THAT(client.error(), Catch::Contains("certificate verify failed"));
    CHECK(e.getType() == kj::Exception::Type::FAILED);
    CHECK(describe(e) == "TLS handshake failed: tlsv1 alert unknown ca");
  }
}

TEST_CASE("a TLS 1.2 client with a certificate", "[ossl_tls]") {
  auto io = kj::setupAsyncIo();
  auto server = server_context();
  auto listener = listen_loopback(io);
  auto device = issue("legacy-4");
  openssl_client::options o;
  o.identity = &device;
  o.trusted_ca_pem = fleet_ca().cert_pem;
  o.max_version = TLS1_2_VERSION;
  o.send = "hello over 1.2";
  o.expect = 5;
  openssl_client client(int(listener->getPort()), o);
  auto raw = wait_for(io, listener->accept());
  auto stream = wait_for(io, server->accept(kj::mv(raw), io.provider->getTimer(), 5 * kj::SECONDS));
  CHECK(std::string(stream->protocol_version()) == "TLSv1.2");
  CHECK(stream->peer().has_cert);
  CHECK(stream->peer().common_name == "legacy-4");
  CHECK(stream->peer().chain_ok);
  CHECK(read_exactly(io, *stream, o.send.size()) == o.send);
  wait_for(io, stream->write("world", 5));
  char buf[16];
  CHECK(wait_for(io, stream->tryRead(buf, 1, sizeof(buf))) == 0);  // its close_notify
  client.join();
  CHECK(client.error().empty());
  CHECK(client.received() == "world");
}

TEST_CASE("a KeyUpdate from the client is answered in order during a large write", "[ossl_tls]") {
  auto io = kj::setupAsyncIo();
  auto server = server_context();
  auto listener = listen_loopback(io);
  const auto big = pattern(1024 * 1024, 5);
  openssl_client::options o;
  o.key_update = true;  // the server must switch its keys too, between two of its records
  o.send = "ping";
  o.expect = big.size();
  openssl_client client(int(listener->getPort()), o);
  auto raw = wait_for(io, listener->accept());
  auto stream = wait_for(io, server->accept(kj::mv(raw), io.provider->getTimer(), 5 * kj::SECONDS));
  std::string got(4, '\0');
  // The write fills the socket buffers and waits for the client, which reads only
  // after its KeyUpdate and "ping" have been written: the read takes the
  // KeyUpdate while the write is under way, and OpenSSL sends its own KeyUpdate
  // before the next record it encrypts (then uses the new keys).
  wait_for(io, kj::joinPromises(kj::arr(stream->write(big.data(), big.size()),
                                        stream->read(got.data(), got.size()))));
  CHECK(got == "ping");
  client.join();
  CHECK(client.error().empty());
  CHECK(client.received() == big);
}

TEST_CASE("the end of the client's stream", "[ossl_tls]") {
  auto io = kj::setupAsyncIo();
  auto server = server_context();
  raw_tls_client anonymous(nullptr);
  auto s = established(io, *server, *anonymous.context);
  wait_for(io, s.client->write("before", 6));
  CHECK(read_exactly(io, *s.server, 6) == "before");
  char buf[64];

  SECTION("close_notify: a read of 0, and the server may still write (half close)") {
    s.client->shutdownWrite();
    CHECK(wait_for(io, s.server->tryRead(buf, 1, sizeof(buf))) == 0);
    CHECK(wait_for(io, s.server->tryRead(buf, 1, sizeof(buf))) == 0);  // and stays at the end
    wait_for(io, s.server->write("after", 5));
    CHECK(read_exactly(io, *s.client, 5) == "after");
    s.server->shutdownWrite();
    CHECK(wait_for(io, s.client->tryRead(buf, 1, sizeof(buf))) == 0);
  }
  SECTION("TCP closed between records without close_notify: a read of 0") {
    s.client_raw->cut_after(0);
    CHECK(wait_for(io, s.server->tryRead(buf, 1, sizeof(buf))) == 0);
  }
  SECTION("TCP closed in the middle of a record: DISCONNECTED") {
    s.client_raw->cut_after(100);
    wait_for(io, s.client->write(std::string(1000, 'x').data(), 1000));
    // The 100 bytes (the start of one record) may arrive in several reads.
    auto e = failure_of(io, s.server->tryRead(buf, sizeof(buf), sizeof(buf)));
    CHECK(e.getType() == kj::Exception::Type::DISCONNECTED);
    CHECK_THAT(describe(e), Catch::Contains("middle of a record"));
  }
  SECTION("a read pending when the client vanishes") {
    auto pending = s.server->tryRead(buf, 1, sizeof(buf));
    s.client = nullptr;  // kj-tls sends no close_notify; the socket closes
    CHECK(wait_for(io, kj::mv(pending)) == 0);
  }
  SECTION("writing to a client that has gone fails with DISCONNECTED") {
    s.client = nullptr;
    const auto chunk = pattern(1024 * 1024, 4);
    kj::Maybe<kj::Exception> failure;
    for (int i = 0; i < 64; ++i) {  // the first writes may still fit the socket buffers
      wait_for(io, s.server->write(chunk.data(), chunk.size())
                     .then([] {}, [&](kj::Exception&& e) { failure = kj::mv(e); }));
      if (failure != nullptr)
        break;
    }
    KJ_IF_MAYBE (e, failure) {
      CHECK(e->getType() == kj::Exception::Type::DISCONNECTED);
    } else {
      FAIL("64 MiB written to a closed connection without an error");
    }
    // Later writes fail at once with the same error.
    auto again = failure_of(io, s.server->write("x", 1));
    CHECK(again.getType() == kj::Exception::Type::DISCONNECTED);
  }
}

TEST_CASE("tls_server_context::load reads the files and names the one at fault", "[ossl_tls]") {
  unit_test::temp_dir tmp("canopy-ossl-tls");
  auto& dir = tmp.path;
  REQUIRE(certs::write_files(dir, "ca", fleet_ca()).ok());
  REQUIRE(certs::write_files(dir, "hub", hub_identity()).ok());
  tls_files files{dir + "/hub.crt", dir + "/hub.key", dir + "/ca.crt"};
  auto write_text = [](const std::string& path, const std::string& text) {
    std::ofstream f(path, std::ios::binary);
    f << text;
    REQUIRE(f.good());
  };
  auto load_error = [&] {
    auto loaded = tls_server_context::load(files);
    REQUIRE_FALSE(loaded.ok());
    return loaded.err();
  };

  SECTION("good files") {
    auto loaded = tls_server_context::load(files);
    INFO((loaded.ok() ? std::string() : loaded.err().message));
    REQUIRE(loaded.ok());
    CHECK((*loaded)->common_name() == "hub");
    auto thumbprint = certs::thumbprint_sha256(hub_identity().cert_pem);
    REQUIRE(thumbprint.ok());
    CHECK((*loaded)->thumbprint() == *thumbprint);
  }
  SECTION("an expired certificate is loaded, with the problem named") {
    REQUIRE(certs::write_files(dir, "hub", issue_expired("hub", 1h), true).ok());
    auto loaded = tls_server_context::load(files);
    REQUIRE(loaded.ok());
    CHECK_THAT((*loaded)->problem(), Catch::StartsWith("node certificate " + files.cert_path +
                                                       ": certificate has expired (notAfter "));
  }
  SECTION("a certificate from another CA") {
    auto other_ca = certs::create_root_ca("Other CA", 24h);
    REQUIRE(other_ca.ok());
    REQUIRE(certs::write_files(dir, "hub", issue("hub", *other_ca), true).ok());
    CHECK_THAT(load_error().message, Catch::StartsWith("node certificate " + files.cert_path) &&
                                       Catch::Contains("unable to get local issuer certificate"));
  }
  SECTION("a key that belongs to another certificate") {
    write_text(files.key_path, issue("gw2").key_pem);
    CHECK(load_error().message ==
          "node key " + files.key_path + " does not belong to node certificate " + files.cert_path);
  }
  SECTION("garbage") {
    write_text(files.ca_path,
               "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n");
    CHECK_THAT(load_error().message, Catch::StartsWith("CA certificate " + files.ca_path +
                                                       ": cannot parse certificate #1"));
    write_text(files.ca_path, "nothing here");
    CHECK(load_error().message == "CA certificate " + files.ca_path + ": no PEM certificate found");
    write_text(files.key_path, "nonsense");
    CHECK_THAT(load_error().message,
               Catch::StartsWith("node key " + files.key_path + ": cannot parse"));
  }
  SECTION("a missing file") {
    files.ca_path = dir + "/missing.crt";
    auto missing = load_error();
    CHECK(missing.code == errc::not_found);
    CHECK_THAT(missing.message,
               Catch::StartsWith("CA certificate " + files.ca_path + ": cannot read"));
  }
}

TEST_CASE("a stream may outlive its context", "[ossl_tls]") {
  auto io = kj::setupAsyncIo();
  auto server = server_context();
  raw_tls_client anonymous(nullptr);
  auto s = established(io, *server, *anonymous.context);
  server.reset();
  wait_for(io, s.client->write("still here", 10));
  CHECK(read_exactly(io, *s.server, 10) == "still here");
}

// --- Memory per idle connection (printed, not asserted) -----------------------------

namespace {

/// The client side of the memory measurement, in a child process (so that its
/// allocations are not counted): blocking OpenSSL clients, with `identity` or
/// without a certificate, driven by one-byte commands on `commands` ('o' +
/// 4-byte count + mode: open that many connections, then 'h' handshake with the
/// certificate, 'a' without, 't' none (plain TCP); 'c': close them all), each
/// acknowledged on `acks`.
[[noreturn]] void idle_clients(int port, int commands, int acks,
                               const certs::key_and_cert& identity) {
  SSL_CTX* anonymous = SSL_CTX_new(TLS_client_method());
  if (anonymous == nullptr)
    _exit(2);
  SSL_CTX_set_verify(anonymous, SSL_VERIFY_NONE, nullptr);
  SSL_CTX* ctx = SSL_CTX_new(TLS_client_method());
  BIO* cert_bio = BIO_new_mem_buf(identity.cert_pem.data(), int(identity.cert_pem.size()));
  BIO* key_bio = BIO_new_mem_buf(identity.key_pem.data(), int(identity.key_pem.size()));
  X509* cert = PEM_read_bio_X509(cert_bio, nullptr, nullptr, nullptr);
  EVP_PKEY* key = PEM_read_bio_PrivateKey(key_bio, nullptr, nullptr, nullptr);
  if (ctx == nullptr || cert == nullptr || key == nullptr ||
      SSL_CTX_use_certificate(ctx, cert) != 1 || SSL_CTX_use_PrivateKey(ctx, key) != 1) {
    _exit(2);
  }
  SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, nullptr);
  std::vector<std::pair<int, SSL*>> open;
  char command = 0;
  while (::read(commands, &command, 1) == 1) {
    if (command == 'o') {
      std::uint32_t count = 0;
      if (::read(commands, &count, sizeof(count)) != sizeof(count))
        _exit(3);
      char mode = 0;
      if (::read(commands, &mode, 1) != 1)
        _exit(5);
      for (std::uint32_t i = 0; i < count; ++i) {
        int fd = ::socket(AF_INET, SOCK_STREAM, 0);
        sockaddr_in addr{};
        addr.sin_family = AF_INET;
        addr.sin_port = htons(static_cast<std::uint16_t>(port));
        addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        if (fd < 0 || ::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0)
          _exit(4);
        SSL* ssl = SSL_new(mode == 'a' ? anonymous : ctx);
        if (ssl == nullptr || SSL_set_fd(ssl, fd) != 1)
          _exit(5);
        open.emplace_back(fd, ssl);
      }
      if (mode != 't') {
        for (auto& [fd, ssl] : open) {
          if (SSL_connect(ssl) != 1)
            _exit(6);
        }
      }
    } else if (command == 'c') {
      for (auto& [fd, ssl] : open) {
        SSL_free(ssl);
        ::close(fd);
      }
      open.clear();
    }
    if (::write(acks, "k", 1) != 1)
      _exit(7);
  }
  _exit(0);
}

enum class server_kind { plain_tcp, kj_tls, ours, ours_anonymous };

/// The server side: accepts connections, wraps them as `kind` says, and keeps
/// each established one with a 1-byte read pending (as an idle MQTT session).
struct idle_server {
  idle_server(server_kind k, kj::ConnectionReceiver& l, kj::Timer& t, const tls_server_context& o,
              kj::TlsContext& th)
      : kind(k), listener(l), timer(t), ours(o), theirs(th) {}

  server_kind kind;
  kj::ConnectionReceiver& listener;
  kj::Timer& timer;
  const tls_server_context& ours;
  kj::TlsContext& theirs;

  kj::Vector<kj::Own<kj::AsyncIoStream>> streams;
  kj::Vector<kj::Promise<void>> tasks;  // handshakes, then pending reads; before streams
  size_t established = 0;
  size_t target = 0;
  kj::Own<kj::PromiseFulfiller<void>> all_established;
  kj::byte sink[1] = {};

  void keep(kj::Own<kj::AsyncIoStream> s) {
    tasks.add(s->tryRead(sink, 1, 1).ignoreResult().eagerlyEvaluate(nullptr));
    streams.add(kj::mv(s));
    if (++established == target)
      all_established->fulfill();
  }

  void start(kj::Own<kj::AsyncIoStream> raw) {
    switch (kind) {
      case server_kind::plain_tcp:
        keep(kj::mv(raw));
        break;
      case server_kind::kj_tls:
        tasks.add(theirs.wrapServer(kj::mv(raw))
                    .then([this](kj::Own<kj::AsyncIoStream> s) { keep(kj::mv(s)); })
                    .eagerlyEvaluate(nullptr));
        break;
      case server_kind::ours:
      case server_kind::ours_anonymous:
        tasks.add(ours.accept(kj::mv(raw), timer, 10 * kj::SECONDS)
                    .then([this](kj::Own<tls_server_stream> s) { keep(kj::mv(s)); })
                    .eagerlyEvaluate(nullptr));
        break;
    }
  }

  kj::Promise<void> accept(size_t n) {
    return listener.accept().then([this, n](kj::Own<kj::AsyncIoStream> raw) -> kj::Promise<void> {
      start(kj::mv(raw));
      if (n > 1)
        return accept(n - 1);
      return kj::READY_NOW;
    });
  }

  /// Accepts and establishes `n` connections (the child opens them meanwhile).
  kj::Promise<void> open(size_t n) {
    established = 0;
    target = n;
    auto paf = kj::newPromiseAndFulfiller<void>();
    all_established = kj::mv(paf.fulfiller);
    return accept(n).then([p = kj::mv(paf.promise)]() mutable { return kj::mv(p); });
  }

  void close_all() {
    tasks.clear();
    streams.clear();
  }
};

void send_command(int fd, char command, std::uint32_t count, char mode) {
  REQUIRE(::write(fd, &command, 1) == 1);
  if (command == 'o') {
    REQUIRE(::write(fd, &count, sizeof(count)) == sizeof(count));
    REQUIRE(::write(fd, &mode, 1) == 1);
  }
}

void wait_ack(int fd) {
  char ack = 0;
  REQUIRE(::read(fd, &ack, 1) == 1);
  REQUIRE(ack == 'k');
}

}  // namespace

TEST_CASE("heap held per idle established connection (printed)", "[ossl_tls][memory]") {
  auto io = kj::setupAsyncIo();
  auto& timer = io.provider->getTimer();
  auto ours = server_context();
  auto theirs = config(hub_identity(), tls_role::server_verify_clients);
  const auto device = issue("device-1");  // mutual TLS, as the benchmark compares
  auto listener =
    io.provider->getNetwork().parseAddress("127.0.0.1", 0).wait(io.waitScope)->listen();
  const int port = static_cast<int>(listener->getPort());

  int commands[2];
  int acks[2];
  REQUIRE(::pipe(commands) == 0);
  REQUIRE(::pipe(acks) == 0);
  std::fflush(nullptr);
  pid_t child = ::fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    ::close(commands[1]);
    ::close(acks[0]);
    idle_clients(port, commands[0], acks[1], device);
  }
  ::close(commands[0]);
  ::close(acks[1]);

  constexpr std::uint32_t warm_up = 4;
  constexpr std::uint32_t count = 200;
  struct result {
    const char* name;
    double per_connection;
  };
  std::vector<result> results;
  for (auto kind : {server_kind::plain_tcp, server_kind::kj_tls, server_kind::ours,
                    server_kind::ours_anonymous}) {
    idle_server server(kind, *listener, timer, *ours, theirs->context());
    server.streams.reserve(count);
    server.tasks.reserve(2 * count);
    const char mode = kind == server_kind::plain_tcp        ? 't'
                      : kind == server_kind::ours_anonymous ? 'a'
                                                            : 'h';
    // Warm up (OpenSSL's and kj's one-time allocations), then measure.
    auto opened = server.open(warm_up);
    send_command(commands[1], 'o', warm_up, mode);
    wait_for(io, kj::mv(opened));
    wait_ack(acks[0]);
    server.close_all();
    send_command(commands[1], 'c', 0, 0);
    wait_ack(acks[0]);
    server.streams.reserve(count);
    server.tasks.reserve(2 * count);

    const size_t before = heap_in_use();
    opened = server.open(count);
    send_command(commands[1], 'o', count, mode);
    wait_for(io, kj::mv(opened));
    wait_ack(acks[0]);
    // Let any post-handshake traffic (kj-tls sends session tickets) settle.
    wait_for(io, timer.afterDelay(50 * kj::MILLISECONDS));
    const size_t after = heap_in_use();
    const double per = (double(after) - double(before)) / count;
    const char* name = kind == server_kind::plain_tcp ? "plain TCP (kj stream + pending read)"
                       : kind == server_kind::kj_tls  ? "kj-tls server, mutual TLS"
                       : kind == server_kind::ours    ? "tls_server_stream, mutual TLS"
                                                      : "tls_server_stream, no client cert";
    results.push_back({name, per});
    server.close_all();
    send_command(commands[1], 'c', 0, 0);
    wait_ack(acks[0]);
  }
  ::close(commands[1]);  // the child exits at the end of its commands
  int status = 0;
  REQUIRE(::waitpid(child, &status, 0) == child);
  CHECK(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);

  std::string report = "heap per idle established connection (" + std::to_string(count) +
                       " connections, mallinfo2 in-use bytes):";
  for (auto& r : results) {
    char line[160];
    std::snprintf(line, sizeof(line), "\n  %-40s %8.0f B (%.1f KiB)", r.name, r.per_connection,
                  r.per_connection / 1024);
    report += line;
  }
  WARN(report);
}
