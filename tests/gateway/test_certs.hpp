// Test certificates shared by the gateway tests (header-only): one fleet root
// CA per test executable, node certificates it issues, tls_configs that trust
// it, and a hand-built kj::TlsContext for clients that tls_config would refuse
// to build. Every failure ends the test (REQUIRE).
#pragma once

#include "gateway/certs.hpp"
#include "gateway/tls.hpp"

#include <kj/compat/tls.h>
#include <catch2/catch.hpp>

#include <chrono>
#include <memory>
#include <string>

namespace canopy::unit_test {

/// The fleet CA, "Test fleet root CA", valid for 30 days. Made on first use and
/// kept for the whole executable: there is no need to make it again.
inline const certs::key_and_cert& fleet_ca() {
  static const certs::key_and_cert ca = [] {
    auto made = certs::create_root_ca("Test fleet root CA", std::chrono::hours(24 * 30));
    REQUIRE(made.ok());
    return *made;
  }();
  return ca;
}

/// A certificate for node `id`, valid for 24 h from now, issued by `ca`.
inline certs::key_and_cert issue(const std::string& id,
                                 const certs::key_and_cert& ca = fleet_ca()) {
  auto kc = certs::issue(ca, certs::for_id(id, std::chrono::hours(24)));
  REQUIRE(kc.ok());
  return *kc;
}

/// A certificate for node `id` from the fleet CA that expired `ago` ago: it was
/// valid from 2 x `ago` before now until `ago` before now.
inline certs::key_and_cert issue_expired(const std::string& id,
                                         std::chrono::system_clock::duration ago) {
  auto opts = certs::for_id(id, std::chrono::hours(24));
  const auto now = std::chrono::system_clock::now();
  opts.not_before = now - 2 * ago;
  opts.not_after = now - ago;
  auto kc = certs::issue(fleet_ca(), opts);
  REQUIRE(kc.ok());
  return *kc;
}

/// The tls_config of `identity` in `role`, trusting `ca_pem`; `timer` as
/// tls_config::from_pem() takes it.
inline std::unique_ptr<tls_config> config(const certs::key_and_cert& identity, tls_role role,
                                          const std::string& ca_pem = fleet_ca().cert_pem,
                                          kj::Timer* timer = nullptr) {
  auto made = tls_config::from_pem(identity, ca_pem, role, timer);
  INFO((made.ok() ? std::string() : made.err().message));
  REQUIRE(made.ok());
  return std::move(*made);
}

/// A kj::TlsContext built by hand, bypassing tls_config's checks: plays a
/// client whose certificate tls_config would refuse to load (expired, foreign),
/// or that has none (`identity` null). Trusts `ca_pem` only. Not copyable.
struct raw_tls_client {
  /// Builds the context; `identity` is copied, null for no certificate.
  explicit raw_tls_client(const certs::key_and_cert* identity,
                          const std::string& ca_pem = fleet_ca().cert_pem) {
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

  kj::Array<kj::TlsCertificate> trusted;  ///< the CA it trusts
  kj::Maybe<kj::TlsKeypair> keypair;      ///< its certificate and key, if any
  kj::Own<kj::TlsContext> context;        ///< the context to wrapClient() with
};

}  // namespace canopy::unit_test
