// Unit test of canopy::certs: a fleet CA, issued node certificates, chain
// verification at chosen times, thumbprints and the certificate/key files.
#include "gateway/certs.hpp"

#include "temp_dir.hpp"
#include "test_certs.hpp"

#include <catch2/catch.hpp>

#include <sys/stat.h>

#include <cctype>
#include <chrono>
#include <fstream>
#include <string>

using namespace canopy;
using canopy::unit_test::fleet_ca;
using namespace std::chrono_literals;

namespace {

mode_t file_mode(const std::string& path) {
  struct stat st {};
  REQUIRE(::stat(path.c_str(), &st) == 0);
  return st.st_mode & 07777;
}

}  // namespace

TEST_CASE("a root CA is self-signed, a CA, and verifies against itself", "[certs]") {
  const auto& ca = fleet_ca();
  CHECK(ca.cert_pem.find("-----BEGIN CERTIFICATE-----") == 0);
  CHECK(ca.key_pem.find("-----BEGIN PRIVATE KEY-----") == 0);
  auto cn = certs::verify(ca.cert_pem, ca.cert_pem, std::chrono::system_clock::now());
  REQUIRE(cn.ok());
  CHECK(*cn == "Test fleet root CA");
  auto info = certs::inspect(ca.cert_pem);
  REQUIRE(info.ok());
  CHECK(info->is_ca);
  CHECK(info->issuer_common_name == "Test fleet root CA");
  CHECK(info->serial_hex.size() >= 30);  // 128 random bits
  CHECK(certs::check_key_matches(ca).ok());
}

TEST_CASE("an issued certificate verifies and names its id", "[certs]") {
  auto opts = certs::for_id("gw1", 24h);
  opts.dns_names.push_back("gw1.plant.example");
  opts.ip_addresses = {"10.0.0.7", "fd00::1"};
  auto kc = certs::issue(fleet_ca(), opts);
  REQUIRE(kc.ok());
  auto cn = certs::verify(kc->cert_pem, fleet_ca().cert_pem, std::chrono::system_clock::now());
  REQUIRE(cn.ok());
  CHECK(*cn == "gw1");
  CHECK(certs::common_name(kc->cert_pem).value() == "gw1");
  CHECK(certs::check_key_matches(*kc).ok());

  auto info = certs::inspect(kc->cert_pem);
  REQUIRE(info.ok());
  CHECK_FALSE(info->is_ca);
  CHECK(info->issuer_common_name == "Test fleet root CA");
  CHECK(info->dns_names == std::vector<std::string>{"gw1", "gw1.plant.example"});
  CHECK(info->ip_addresses == std::vector<std::string>{"10.0.0.7", "fd00::1"});
  CHECK(info->not_after - info->not_before >= 24h);
}

TEST_CASE("an intermediate CA issues certificates that chain to the root", "[certs]") {
  auto opts = certs::for_id("line-3-gateway", 24h);
  opts.is_ca = true;
  auto intermediate = certs::issue(fleet_ca(), opts);
  REQUIRE(intermediate.ok());
  CHECK(certs::inspect(intermediate->cert_pem)->is_ca);
  auto leaf = certs::issue(*intermediate, certs::for_id("thermostat-17", 24h));
  REQUIRE(leaf.ok());
  // The leaf's file carries the intermediate, so the root alone is enough to verify.
  auto cn = certs::verify(leaf->cert_pem, fleet_ca().cert_pem, std::chrono::system_clock::now());
  REQUIRE(cn.ok());
  CHECK(*cn == "thermostat-17");
}

TEST_CASE("a certificate from another CA is refused", "[certs]") {
  auto other_ca = certs::create_root_ca("Other CA", 24h);
  REQUIRE(other_ca.ok());
  auto kc = certs::issue(*other_ca, certs::for_id("intruder", 24h));
  REQUIRE(kc.ok());
  auto cn = certs::verify(kc->cert_pem, fleet_ca().cert_pem, std::chrono::system_clock::now());
  REQUIRE_FALSE(cn.ok());
  CHECK_THAT(cn.err().message, Catch::Contains("unable to get local issuer certificate"));
}

TEST_CASE("expired and not yet valid certificates are refused, with the date", "[certs]") {
  auto now = std::chrono::system_clock::now();
  auto opts = certs::for_id("old", 24h);
  opts.not_before = now - 48h;
  opts.not_after = now - 24h;
  auto expired = certs::issue(fleet_ca(), opts);
  REQUIRE(expired.ok());
  auto cn = certs::verify(expired->cert_pem, fleet_ca().cert_pem, now);
  REQUIRE_FALSE(cn.ok());
  CHECK_THAT(cn.err().message, Catch::Contains("expired"));
  CHECK_THAT(cn.err().message, Catch::Contains("notAfter " + certs::format_time(opts.not_after)));
  // Back then the certificate was valid, but the CA (made minutes ago) was not yet.
  auto then = certs::verify(expired->cert_pem, fleet_ca().cert_pem, now - 36h);
  REQUIRE_FALSE(then.ok());
  CHECK_THAT(then.err().message,
             Catch::Contains("not yet valid") && Catch::Contains("Test fleet root CA"));

  opts.not_before = now + 1h;
  opts.not_after = now + 24h;
  auto future = certs::issue(fleet_ca(), opts);
  REQUIRE(future.ok());
  cn = certs::verify(future->cert_pem, fleet_ca().cert_pem, now);
  REQUIRE_FALSE(cn.ok());
  CHECK_THAT(cn.err().message, Catch::Contains("not yet valid"));
  CHECK_THAT(cn.err().message, Catch::Contains("notBefore"));
}

TEST_CASE("bad issue options are refused, naming the field", "[certs]") {
  auto opts = certs::for_id("", 24h);
  auto r = certs::issue(fleet_ca(), opts);
  REQUIRE_FALSE(r.ok());
  CHECK(r.err().code == errc::invalid_argument);
  CHECK_THAT(r.err().message, Catch::Contains("common_name"));

  opts = certs::for_id("gw1", 24h);
  opts.not_after = opts.not_before;
  r = certs::issue(fleet_ca(), opts);
  REQUIRE_FALSE(r.ok());
  CHECK_THAT(r.err().message, Catch::Contains("not_after"));

  opts = certs::for_id("gw1", 24h);
  opts.ip_addresses = {"10.0.0.1", "10.0.0.300"};
  r = certs::issue(fleet_ca(), opts);
  REQUIRE_FALSE(r.ok());
  CHECK_THAT(r.err().message, Catch::Contains("ip_addresses[1]") && Catch::Contains("10.0.0.300"));

  opts = certs::for_id("gw1", 24h);
  opts.dns_names = {"bad name"};
  r = certs::issue(fleet_ca(), opts);
  REQUIRE_FALSE(r.ok());
  CHECK_THAT(r.err().message, Catch::Contains("dns_names[0]"));

  auto ca = certs::create_root_ca("", 24h);
  REQUIRE_FALSE(ca.ok());
  CHECK_THAT(ca.err().message, Catch::Contains("common_name"));

  // A leaf certificate cannot sign.
  auto leaf = certs::issue(fleet_ca(), certs::for_id("leaf", 24h));
  REQUIRE(leaf.ok());
  r = certs::issue(*leaf, certs::for_id("x", 24h));
  REQUIRE_FALSE(r.ok());
  CHECK_THAT(r.err().message, Catch::Contains("not a CA"));

  // A CA key that does not match its certificate.
  auto other = certs::create_root_ca("Other", 24h);
  REQUIRE(other.ok());
  r =
    certs::issue(certs::key_and_cert{fleet_ca().cert_pem, other->key_pem}, certs::for_id("x", 24h));
  REQUIRE_FALSE(r.ok());
  CHECK_THAT(r.err().message, Catch::Contains("does not match"));
}

TEST_CASE("garbage PEM is an error, not a crash", "[certs]") {
  auto r = certs::common_name("not a certificate");
  REQUIRE_FALSE(r.ok());
  CHECK(r.err().code == errc::invalid_argument);
  r = certs::thumbprint_sha256("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n");
  REQUIRE_FALSE(r.ok());
  CHECK_THAT(r.err().message, Catch::Contains("not a PEM certificate"));
  auto v = certs::verify(fleet_ca().cert_pem, "", std::chrono::system_clock::now());
  REQUIRE_FALSE(v.ok());
  CHECK_THAT(v.err().message, Catch::Contains("CA certificate"));
}

TEST_CASE("the SHA-256 thumbprint is stable uppercase hex", "[certs]") {
  auto kc = certs::issue(fleet_ca(), certs::for_id("gw1", 24h));
  REQUIRE(kc.ok());
  auto a = certs::thumbprint_sha256(kc->cert_pem);
  auto b = certs::thumbprint_sha256(kc->cert_pem);
  REQUIRE(a.ok());
  REQUIRE(b.ok());
  CHECK(*a == *b);
  CHECK(a->size() == 64);
  for (char c : *a)
    CHECK(((c >= '0' && c <= '9') || (c >= 'A' && c <= 'F')));
  auto other = certs::thumbprint_sha256(fleet_ca().cert_pem);
  REQUIRE(other.ok());
  CHECK(*other != *a);
}

TEST_CASE("write_files sets the modes, refuses to overwrite, and reads back", "[certs]") {
  unit_test::temp_dir tmp("canopy-certs");
  auto dir = tmp.path + "/nested/certs";
  auto kc = certs::issue(fleet_ca(), certs::for_id("gw1", 24h));
  REQUIRE(kc.ok());

  auto old_umask = ::umask(0077);  // the certificate must still come out 0644
  auto written = certs::write_files(dir, "gw1", *kc);
  ::umask(old_umask);
  REQUIRE(written.ok());
  CHECK(file_mode(dir + "/gw1.crt") == 0644);
  CHECK(file_mode(dir + "/gw1.key") == 0600);

  auto back = certs::read_files(dir, "gw1");
  REQUIRE(back.ok());
  CHECK(back->cert_pem == kc->cert_pem);
  CHECK(back->key_pem == kc->key_pem);

  auto again = certs::issue(fleet_ca(), certs::for_id("gw1", 24h));
  REQUIRE(again.ok());
  auto refused = certs::write_files(dir, "gw1", *again);
  REQUIRE_FALSE(refused.ok());
  CHECK_THAT(refused.err().message, Catch::Contains(dir + "/gw1.crt"));
  CHECK(certs::read_files(dir, "gw1")->cert_pem == kc->cert_pem);  // untouched

  // Only the key exists: still refused, and the certificate is not written either.
  REQUIRE(::unlink((dir + "/gw1.crt").c_str()) == 0);
  refused = certs::write_files(dir, "gw1", *again);
  REQUIRE_FALSE(refused.ok());
  CHECK_THAT(refused.err().message, Catch::Contains(dir + "/gw1.key"));
  struct stat st {};
  CHECK(::stat((dir + "/gw1.crt").c_str(), &st) != 0);

  // With overwrite, both are replaced, with the same modes.
  REQUIRE(::chmod((dir + "/gw1.key").c_str(), 0644) == 0);
  REQUIRE(certs::write_files(dir, "gw1", *again, true).ok());
  CHECK(file_mode(dir + "/gw1.crt") == 0644);
  CHECK(file_mode(dir + "/gw1.key") == 0600);
  back = certs::read_files(dir, "gw1");
  REQUIRE(back.ok());
  CHECK(back->cert_pem == again->cert_pem);
  CHECK(back->key_pem == again->key_pem);
}

TEST_CASE("read_files names the missing or mismatched file", "[certs]") {
  unit_test::temp_dir tmp("canopy-certs");
  auto missing = certs::read_files(tmp.path, "nope");
  REQUIRE_FALSE(missing.ok());
  CHECK(missing.err().code == errc::not_found);
  CHECK_THAT(missing.err().message, Catch::Contains(tmp.path + "/nope.crt"));

  auto a = certs::issue(fleet_ca(), certs::for_id("a", 24h));
  auto b = certs::issue(fleet_ca(), certs::for_id("b", 24h));
  REQUIRE(a.ok());
  REQUIRE(b.ok());
  REQUIRE(certs::write_files(tmp.path, "a", certs::key_and_cert{a->cert_pem, b->key_pem}).ok());
  auto mismatched = certs::read_files(tmp.path, "a");
  REQUIRE_FALSE(mismatched.ok());
  CHECK_THAT(mismatched.err().message, Catch::Contains(tmp.path + "/a.key"));

  auto bad_name = certs::write_files(tmp.path, "../escape", *a);
  REQUIRE_FALSE(bad_name.ok());
  CHECK_THAT(bad_name.err().message, Catch::Contains("name"));
}
