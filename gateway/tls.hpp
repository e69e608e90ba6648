// canopy::tls_config — a node's TLS identity as a kj::TlsContext (kj-tls on
// OpenSSL): its certificate and key, the fleet CA(s) it trusts, and the context
// built from them. Used by the gateway links (mTLS, DESIGN.md "Between nodes")
// and the hub's HTTPS API.
//
// Threading: load()/from_pem() may run on any thread; the TlsContext itself is
// used on the I/O thread (its wrapServer/wrapClient promises belong to that
// loop's event loop, as does the optional kj::Timer).
#pragma once

#include "gateway/certs.hpp"
#include "runtime/expected.hpp"

#include <kj/async-io.h>
#include <kj/compat/tls.h>
#include <kj/memory.h>
#include <kj/timer.h>

#include <memory>
#include <string>

namespace canopy {

/// Where a node's TLS identity lives: its certificate (optionally followed by
/// intermediates), its private key and the trusted fleet CA certificate(s), all PEM.
struct tls_files {
  std::string cert_path;  ///< e.g. <dir>/<id>.crt
  std::string key_path;   ///< e.g. <dir>/<id>.key
  std::string ca_path;    ///< e.g. <dir>/ca.crt (one or more trust anchors)
};

/// The PEM texts of a node's TLS identity with the labels errors name them by
/// (what read_tls_files() returns; shared by tls_config and tls_server_context).
struct tls_pem {
  certs::key_and_cert identity;  ///< the certificate (chain) and its key
  std::string ca_pem;            ///< the trusted CA certificate(s)
  std::string cert_label;        ///< "node certificate /x/gw1.crt"
  std::string key_label;         ///< "node key /x/gw1.key"
  std::string ca_label;          ///< "CA certificate /x/ca.crt"
};

/// Reads the three PEM files of `files`. Errors name the file ("CA certificate
/// /x/ca.crt: cannot read: No such file or directory"), with certs::read_file()'s
/// code. Any thread; costs three small file reads.
expected<tls_pem> read_tls_files(const tls_files& files);

/// What a TLS context keeps about its own certificate.
struct tls_identity {
  std::string common_name;  ///< subject CN of the certificate
  std::string thumbprint;   ///< SHA-256 thumbprint, uppercase hex
  std::string problem;      ///< why peers refuse it now ("<cert_label>: ..."), or ""
};

/// Checks that `identity.cert_pem` chains to the CA(s) in `ca_pem`, ignoring
/// validity periods (a certificate outside its validity is reported in
/// tls_identity::problem, so that a node keeps running offline), and computes its
/// thumbprint. invalid_argument naming `cert_label` otherwise. Does not check the
/// key. Any thread; costs two chain verifications and a hash.
expected<tls_identity> check_tls_identity(const certs::key_and_cert& identity,
                                          const std::string& ca_pem, const std::string& cert_label);

/// How a context will be used.
enum class tls_role {
  server_verify_clients,  ///< server that requires a client certificate chaining to the CA (mTLS)
  server,                 ///< server that asks for no client certificate (e.g. the HTTPS API)
  client,                 ///< client: presents its certificate if asked, verifies the server's
};

/// A kj::TlsContext with everything it points into. TlsContext::Options keeps
/// pointers to the keypair and trusted certificates, so they live together here;
/// hence neither copyable nor movable (hold it in the unique_ptr the factories return).
///
/// Settings: no system trust store (only the given CA certificates), TLS 1.2 or
/// later, client certificates required for tls_role::server_verify_clients, and a
/// 10 s handshake timeout on the server side when a timer is given.
class tls_config {
 private:
  struct token {};

 public:
  /// Reads the PEM files, checks that the key belongs to the certificate and that
  /// the certificate chains to the CA, and builds the context. A certificate
  /// outside its validity period is accepted and reported by problem().
  /// Errors name the file ("node certificate /x/gw1.crt: certificate has expired
  /// (notAfter ...)"). `timer`, if given, must outlive the result.
  static expected<std::unique_ptr<tls_config>> load(const tls_files& files, tls_role role,
                                                    kj::Timer* timer = nullptr);

  /// As load(), from PEM text in memory (tests, or identities kept elsewhere).
  static expected<std::unique_ptr<tls_config>> from_pem(const certs::key_and_cert& identity,
                                                        const std::string& ca_pem, tls_role role,
                                                        kj::Timer* timer = nullptr);

  /// For the factories only (the token is private).
  tls_config(token, kj::TlsKeypair keypair, kj::Array<kj::TlsCertificate> trusted,
             std::string common_name, std::string thumbprint);
  ~tls_config();

  tls_config(const tls_config&) = delete;
  tls_config& operator=(const tls_config&) = delete;
  tls_config(tls_config&&) = delete;
  tls_config& operator=(tls_config&&) = delete;

  /// The context: wrapServer()/wrapClient()/wrapPort(). Valid as long as this object.
  kj::TlsContext& context() { return *context_; }

  /// Subject CN of this node's certificate (its id).
  const std::string& common_name() const { return common_name_; }

  /// SHA-256 thumbprint of this node's certificate (uppercase hex).
  const std::string& thumbprint() const { return thumbprint_; }

  /// Why peers will refuse this certificate now although it chains to the CA
  /// ("node certificate /x/gw1.crt expired at ..."), or "" if it is valid now.
  /// load() accepts such a certificate so that a node keeps running offline.
  const std::string& problem() const { return problem_; }

 private:
  static expected<std::unique_ptr<tls_config>> build(
    const certs::key_and_cert& identity, const std::string& ca_pem, tls_role role, kj::Timer* timer,
    const std::string& cert_label, const std::string& key_label, const std::string& ca_label);

  kj::TlsKeypair keypair_;                 // own key + certificate (chain)
  kj::Array<kj::TlsCertificate> trusted_;  // one per trust anchor
  std::string common_name_;
  std::string problem_;
  std::string thumbprint_;
  kj::Own<kj::TlsContext> context_;  // points into keypair_ and trusted_; destroyed first
};

/// Parses the CA certificate(s) in `ca_pem` as trust anchors, one
/// kj::TlsCertificate per PEM block (kj trusts only the first certificate of
/// each). invalid_argument naming `label` ("CA certificate /x/ca.crt: no PEM
/// certificate found", "...: cannot parse certificate #2: ...") if there is
/// none or one does not parse. Any thread.
expected<kj::Array<kj::TlsCertificate>> parse_trust_anchors(const std::string& ca_pem,
                                                            const std::string& label);

/// The subject CN of the peer's certificate on a stream from
/// TlsContext::wrapServer/wrapClient(kj::AuthenticatedStream); "" if the stream is
/// not TLS or the peer presented no certificate. I/O thread.
std::string peer_common_name(kj::AuthenticatedStream& stream);

}  // namespace canopy
