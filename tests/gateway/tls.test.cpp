// Unit test of canopy::tls_config: real TLS handshakes over loopback TCP with
// kj-tls, between a server that verifies clients and clients with good, foreign,
// expired or missing certificates.
#include "gateway/tls.hpp"

#include "gateway/certs.hpp"
#include "temp_dir.hpp"

#include <kj/async-io.h>
#include <kj/compat/tls.h>
#include <kj/exception.h>
#include <catch2/catch.hpp>

#include <chrono>
#include <fstream>
#include <string>

using namespace canopy;
using namespace std::chrono_literals;

namespace {

const certs::key_and_cert& fleet_ca() {
  static const certs::key_and_cert ca = [] {
    auto made = certs::create_root_ca("Test fleet root CA", 24h * 30);
    REQUIRE(made.ok());
    return *made;
  }();
  return ca;
}

certs::key_and_cert issue(const std::string& id, const certs::key_and_cert& ca = fleet_ca()) {
  auto kc = certs::issue(ca, certs::for_id(id, 24h));
  REQUIRE(kc.ok());
  return *kc;
}

std::unique_ptr<tls_config> config(const certs::key_and_cert& identity, tls_role role,
                                   kj::Timer* timer = nullptr) {
  auto made = tls_config::from_pem(identity, fleet_ca().cert_pem, role, timer);
  INFO((made.ok() ? std::string() : made.err().message));
  REQUIRE(made.ok());
  return std::move(*made);
}

/// A TlsContext built by hand, bypassing tls_config's own checks: plays a client
/// whose certificate tls_config would refuse to load (or that has none).
struct raw_client {
  raw_client(const certs::key_and_cert* identity, const std::string& ca_pem) {
    trusted =
      kj::heapArray<kj::TlsCertificate>({kj::TlsCertificate(kj::StringPtr(ca_pem.c_str()))});
    if (identity != nullptr) {
      keypair = kj::TlsKeypair{kj::TlsPrivateKey(kj::StringPtr(identity->key_pem.c_str())),
                               kj::TlsCertificate(kj::StringPtr(identity->cert_pem.c_str()))};
    }
    kj::TlsContext::Options options;
    options.useSystemTrustStore = false;
    options.trustedCertificates = trusted.asPtr();
    KJ_IF_MAYBE (kp, keypair) {
      options.defaultKeypair = *kp;
    }
    context = kj::heap<kj::TlsContext>(kj::mv(options));
  }
  kj::Array<kj::TlsCertificate> trusted;
  kj::Maybe<kj::TlsKeypair> keypair;
  kj::Own<kj::TlsContext> context;
};

std::string describe(const kj::Exception& e) {
  auto d = e.getDescription();
  return std::string(d.cStr(), d.size());
}

/// What each side of one handshake saw.
struct outcome {
  bool server_ok = false;
  std::string server_error;
  std::string server_saw;  // the client's CN, as peer_common_name() gives it
  kj::Own<kj::AsyncIoStream> server_stream;
  bool client_ok = false;
  std::string client_error;
  std::string client_saw;  // the server's CN
  kj::Own<kj::AsyncIoStream> client_stream;
};

/// A TCP listener on 127.0.0.1 (ephemeral port) wrapped by `server`, one
/// connection from `client` expecting `hostname`; waits until both sides are done
/// (at most 5 s; a hang fails the test).
outcome handshake(kj::AsyncIoContext& io, kj::TlsContext& server, kj::TlsContext& client,
                  kj::StringPtr hostname) {
  auto& network = io.provider->getNetwork();
  auto listener = network.parseAddress("127.0.0.1", 0).wait(io.waitScope)->listen();
  auto target = network.parseAddress("127.0.0.1", listener->getPort()).wait(io.waitScope);
  outcome out;
  auto server_side =
    listener->acceptAuthenticated()
      .then([&](kj::AuthenticatedStream s) { return server.wrapServer(kj::mv(s)); })
      .then(
        [&](kj::AuthenticatedStream s) {
          out.server_ok = true;
          out.server_saw = peer_common_name(s);
          out.server_stream = kj::mv(s.stream);
        },
        [&](kj::Exception&& e) { out.server_error = describe(e); });
  auto client_side =
    target->connectAuthenticated()
      .then([&](kj::AuthenticatedStream s) { return client.wrapClient(kj::mv(s), hostname); })
      .then(
        [&](kj::AuthenticatedStream s) {
          out.client_ok = true;
          out.client_saw = peer_common_name(s);
          out.client_stream = kj::mv(s.stream);
        },
        [&](kj::Exception&& e) { out.client_error = describe(e); });
  auto both = kj::joinPromises(kj::arr(kj::mv(server_side), kj::mv(client_side)));
  io.provider->getTimer().timeoutAfter(5 * kj::SECONDS, kj::mv(both)).wait(io.waitScope);
  return out;
}

void write_text(const std::string& path, const std::string& text) {
  std::ofstream f(path, std::ios::binary);
  f << text;
  REQUIRE(f.good());
}

}  // namespace

TEST_CASE("mutual TLS: each side sees the other's id, and bytes flow", "[tls]") {
  auto io = kj::setupAsyncIo();
  auto server = config(issue("hub"), tls_role::server_verify_clients, &io.provider->getTimer());
  auto client = config(issue("gw1"), tls_role::client);
  CHECK(server->common_name() == "hub");
  CHECK(client->common_name() == "gw1");
  CHECK(client->thumbprint().size() == 64);

  auto out = handshake(io, server->context(), client->context(), "hub");
  INFO(out.server_error << " / " << out.client_error);
  REQUIRE(out.server_ok);
  REQUIRE(out.client_ok);
  CHECK(out.server_saw == "gw1");
  CHECK(out.client_saw == "hub");

  out.client_stream->write("ping", 4).wait(io.waitScope);
  char buf[4];
  REQUIRE(out.server_stream->tryRead(buf, 4, 4).wait(io.waitScope) == 4);
  CHECK(std::string(buf, 4) == "ping");
  out.server_stream->write("pong", 4).wait(io.waitScope);
  REQUIRE(out.client_stream->tryRead(buf, 4, 4).wait(io.waitScope) == 4);
  CHECK(std::string(buf, 4) == "pong");
}

TEST_CASE("a client certificate issued by an intermediate CA is accepted", "[tls]") {
  auto io = kj::setupAsyncIo();
  auto server = config(issue("hub"), tls_role::server_verify_clients);
  auto opts = certs::for_id("line-3", 24h);
  opts.is_ca = true;
  auto intermediate = certs::issue(fleet_ca(), opts);
  REQUIRE(intermediate.ok());
  auto client =
    config(issue("thermostat-17", *intermediate), tls_role::client);  // file holds the chain

  auto out = handshake(io, server->context(), client->context(), "hub");
  INFO(out.server_error << " / " << out.client_error);
  CHECK(out.server_ok);
  CHECK(out.client_ok);
  CHECK(out.server_saw == "thermostat-17");
}

TEST_CASE("the server refuses a client certificate from another CA", "[tls]") {
  auto io = kj::setupAsyncIo();
  auto server = config(issue("hub"), tls_role::server_verify_clients);
  auto other_ca = certs::create_root_ca("Other CA", 24h);
  REQUIRE(other_ca.ok());
  auto intruder = issue("gw1", *other_ca);  // claims a registered id
  raw_client client(&intruder, fleet_ca().cert_pem);

  auto out = handshake(io, server->context(), *client.context, "hub");
  CHECK_FALSE(out.server_ok);
  CHECK_THAT(out.server_error, Catch::Contains("certificate verify failed"));
  CHECK(out.server_saw.empty());
}

TEST_CASE("the server refuses an expired client certificate", "[tls]") {
  auto io = kj::setupAsyncIo();
  auto server = config(issue("hub"), tls_role::server_verify_clients);
  auto opts = certs::for_id("gw1", 24h);
  auto now = std::chrono::system_clock::now();
  opts.not_before = now - 2min;
  opts.not_after = now - 1min;
  auto expired = certs::issue(fleet_ca(), opts);
  REQUIRE(expired.ok());
  raw_client client(&*expired, fleet_ca().cert_pem);

  auto out = handshake(io, server->context(), *client.context, "hub");
  CHECK_FALSE(out.server_ok);
  CHECK_THAT(out.server_error, Catch::Contains("certificate verify failed"));
}

TEST_CASE("the client refuses a server whose certificate is not for the expected id", "[tls]") {
  auto io = kj::setupAsyncIo();
  auto server = config(issue("gw2"), tls_role::server_verify_clients);
  auto client = config(issue("gw1"), tls_role::client);

  auto out = handshake(io, server->context(), client->context(), "hub");
  CHECK_FALSE(out.client_ok);
  CHECK_THAT(out.client_error, Catch::Contains("hostname mismatch"));
}

TEST_CASE("a client without a certificate is refused when clients must be verified", "[tls]") {
  auto io = kj::setupAsyncIo();
  auto server = config(issue("hub"), tls_role::server_verify_clients);
  raw_client anonymous(nullptr, fleet_ca().cert_pem);

  auto out = handshake(io, server->context(), *anonymous.context, "hub");
  CHECK_FALSE(out.server_ok);
  CHECK_THAT(out.server_error, Catch::Contains("peer did not return a certificate"));
}

TEST_CASE("a plain server accepts a client without a certificate", "[tls]") {
  auto io = kj::setupAsyncIo();
  auto server = config(issue("hub"), tls_role::server);
  raw_client anonymous(nullptr, fleet_ca().cert_pem);

  auto out = handshake(io, server->context(), *anonymous.context, "hub");
  INFO(out.server_error << " / " << out.client_error);
  CHECK(out.server_ok);
  CHECK(out.client_ok);
  CHECK(out.server_saw.empty());
  CHECK(out.client_saw == "hub");
}

TEST_CASE("tls_config::load reads the files and names the one at fault", "[tls]") {
  unit_test::temp_dir tmp("canopy-tls");
  auto& dir = tmp.path;
  REQUIRE(certs::write_files(dir, "ca", fleet_ca()).ok());
  REQUIRE(certs::write_files(dir, "gw1", issue("gw1")).ok());
  tls_files files{dir + "/gw1.crt", dir + "/gw1.key", dir + "/ca.crt"};

  SECTION("good files") {
    auto io = kj::setupAsyncIo();
    auto loaded =
      tls_config::load(files, tls_role::server_verify_clients, &io.provider->getTimer());
    INFO((loaded.ok() ? std::string() : loaded.err().message));
    REQUIRE(loaded.ok());
    CHECK((*loaded)->common_name() == "gw1");
  }
  SECTION("an expired certificate") {
    auto opts = certs::for_id("gw1", 24h);
    auto now = std::chrono::system_clock::now();
    opts.not_before = now - 2h;
    opts.not_after = now - 1h;
    auto expired = certs::issue(fleet_ca(), opts);
    REQUIRE(expired.ok());
    REQUIRE(certs::write_files(dir, "gw1", *expired, true).ok());
    // Loaded (a node with an expired certificate keeps running offline), with
    // the problem named.
    auto loaded = tls_config::load(files, tls_role::client);
    REQUIRE(loaded.ok());
    CHECK_THAT((*loaded)->problem(), Catch::StartsWith("node certificate " + files.cert_path +
                                                       ": certificate has expired (notAfter "));
  }
  SECTION("a certificate from another CA") {
    auto other_ca = certs::create_root_ca("Other CA", 24h);
    REQUIRE(other_ca.ok());
    REQUIRE(certs::write_files(dir, "gw1", issue("gw1", *other_ca), true).ok());
    auto loaded = tls_config::load(files, tls_role::client);
    REQUIRE_FALSE(loaded.ok());
    CHECK_THAT(loaded.err().message, Catch::Contains(files.cert_path) &&
                                       Catch::Contains("unable to get local issuer certificate"));
  }
  SECTION("a key that belongs to another certificate") {
    write_text(files.key_path, issue("gw2").key_pem);
    auto loaded = tls_config::load(files, tls_role::client);
    REQUIRE_FALSE(loaded.ok());
    CHECK_THAT(loaded.err().message, Catch::Contains("node key " + files.key_path) &&
                                       Catch::Contains("does not belong to"));
  }
  SECTION("garbage PEM") {
    write_text(files.ca_path,
               "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n");
    auto loaded = tls_config::load(files, tls_role::client);
    REQUIRE_FALSE(loaded.ok());
    CHECK_THAT(loaded.err().message,
               Catch::StartsWith("CA certificate " + files.ca_path + ": cannot parse"));

    write_text(files.key_path, "nonsense");
    loaded = tls_config::load(files, tls_role::client);
    REQUIRE_FALSE(loaded.ok());
    CHECK_THAT(loaded.err().message,
               Catch::StartsWith("node key " + files.key_path + ": cannot parse"));
  }
  SECTION("a missing file") {
    files.ca_path = dir + "/missing.crt";
    auto loaded = tls_config::load(files, tls_role::client);
    REQUIRE_FALSE(loaded.ok());
    CHECK(loaded.err().code == errc::not_found);
    CHECK_THAT(loaded.err().message,
               Catch::StartsWith("CA certificate " + files.ca_path + ": cannot read"));
  }
}

TEST_CASE("peer_common_name is empty on a stream that is not TLS", "[tls]") {
  auto io = kj::setupAsyncIo();
  auto& network = io.provider->getNetwork();
  auto listener = network.parseAddress("127.0.0.1", 0).wait(io.waitScope)->listen();
  auto target = network.parseAddress("127.0.0.1", listener->getPort()).wait(io.waitScope);
  auto accepted = listener->acceptAuthenticated();
  auto connected = target->connectAuthenticated().wait(io.waitScope);
  auto stream = accepted.wait(io.waitScope);
  CHECK(peer_common_name(stream).empty());
  CHECK(peer_common_name(connected).empty());
}
