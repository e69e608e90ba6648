// Unit test of canopy::tls_config: real TLS handshakes over loopback TCP with
// kj-tls, between a server that verifies clients and clients with good, foreign,
// expired or missing certificates.
#include "gateway/tls.hpp"

#include "gateway/certs.hpp"
#include "temp_dir.hpp"
#include "test_certs.hpp"

#include <kj/async-io.h>
#include <kj/compat/tls.h>
#include <kj/exception.h>
#include <catch2/catch.hpp>

#include <chrono>
#include <fstream>
#include <string>

using namespace canopy;
using namespace canopy::unit_test;
using namespace std::chrono_literals;

namespace {

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

/// The error tls_config::load() gives for `files` as a client (it must fail).
error load_error(const tls_files& files) {
  auto loaded = tls_config::load(files, tls_role::client);
  REQUIRE_FALSE(loaded.ok());
  return loaded.err();
}

void write_text(const std::string& path, const std::string& text) {
  std::ofstream f(path, std::ios::binary);
  f << text;
  REQUIRE(f.good());
}

}  // namespace

TEST_CASE("mutual TLS: each side sees the other's id, and bytes flow", "[tls]") {
  auto io = kj::setupAsyncIo();
  auto server = config(issue("hub"), tls_role::server_verify_clients, fleet_ca().cert_pem,
                       &io.provider->getTimer());
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
  raw_tls_client client(&intruder);

  auto out = handshake(io, server->context(), *client.context, "hub");
  CHECK_FALSE(out.server_ok);
  CHECK_THAT(out.server_error, Catch::Contains("certificate verify failed"));
  CHECK(out.server_saw.empty());
}

TEST_CASE("the server refuses an expired client certificate", "[tls]") {
  auto io = kj::setupAsyncIo();
  auto server = config(issue("hub"), tls_role::server_verify_clients);
  auto expired = issue_expired("gw1", 1min);
  raw_tls_client client(&expired);

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
  raw_tls_client anonymous(nullptr);

  auto out = handshake(io, server->context(), *anonymous.context, "hub");
  CHECK_FALSE(out.server_ok);
  CHECK_THAT(out.server_error, Catch::Contains("peer did not return a certificate"));
}

TEST_CASE("a plain server accepts a client without a certificate", "[tls]") {
  auto io = kj::setupAsyncIo();
  auto server = config(issue("hub"), tls_role::server);
  raw_tls_client anonymous(nullptr);

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
    REQUIRE(certs::write_files(dir, "gw1", issue_expired("gw1", 1h), true).ok());
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
    CHECK_THAT(load_error(files).message,
               Catch::Contains(files.cert_path) &&
                 Catch::Contains("unable to get local issuer certificate"));
  }
  SECTION("a key that belongs to another certificate") {
    write_text(files.key_path, issue("gw2").key_pem);
    CHECK_THAT(load_error(files).message, Catch::Contains("node key " + files.key_path) &&
                                            Catch::Contains("does not belong to"));
  }
  SECTION("garbage PEM") {
    write_text(files.ca_path,
               "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n");
    CHECK_THAT(load_error(files).message,
               Catch::StartsWith("CA certificate " + files.ca_path + ": cannot parse"));

    write_text(files.key_path, "nonsense");
    CHECK_THAT(load_error(files).message,
               Catch::StartsWith("node key " + files.key_path + ": cannot parse"));
  }
  SECTION("a missing file") {
    files.ca_path = dir + "/missing.crt";
    auto missing = load_error(files);
    CHECK(missing.code == errc::not_found);
    CHECK_THAT(missing.message,
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
