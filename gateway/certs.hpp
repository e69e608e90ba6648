// canopy::certs — the X.509 identities of a Canopy fleet (DESIGN.md "Between
// nodes"): a fleet root CA, node/device certificates issued by it (subject CN =
// the id, SAN DNS:<id>), chain verification, thumbprints, and the files
// <dir>/<name>.crt and <dir>/<name>.key.
//
// Built on OpenSSL 3; no OpenSSL type appears here. Keys are EC P-256, signatures
// ECDSA with SHA-256. Every function is self-contained and may be called from any
// thread (OpenSSL's error queue is per thread). Nothing throws: errors come back as
// canopy::expected naming the field or file at fault, with OpenSSL's reason.
#pragma once

#include "runtime/expected.hpp"

#include <chrono>
#include <string>
#include <vector>

namespace canopy::certs {

/// A certificate and its private key, both PEM ("-----BEGIN CERTIFICATE-----",
/// "-----BEGIN PRIVATE KEY-----" PKCS#8, unencrypted). cert_pem may hold a chain
/// (the certificate first, then intermediates).
struct key_and_cert {
  std::string cert_pem;  ///< the certificate (and optional chain), PEM
  std::string key_pem;   ///< its private key, PEM PKCS#8
};

/// What to put in a certificate issued by issue().
struct issue_options {
  /// Subject CN (the node or device id). Must not be empty; at most 64 characters.
  std::string common_name;
  /// Extra subjectAltName DNS entries. The CN is added as DNS too when it is a
  /// valid host name (labels of letters, digits, '-' and '_').
  std::vector<std::string> dns_names;
  /// subjectAltName IP entries, as text ("10.0.0.7", "fd00::1").
  std::vector<std::string> ip_addresses;
  /// True for an intermediate CA (basicConstraints CA:TRUE, may sign certificates).
  bool is_ca = false;
  /// Start of validity (default: five minutes ago, to allow for clock skew).
  std::chrono::system_clock::time_point not_before =
    std::chrono::system_clock::now() - std::chrono::minutes(5);
  /// End of validity; must be after not_before (default: a year from now).
  std::chrono::system_clock::time_point not_after =
    std::chrono::system_clock::now() + std::chrono::hours(24 * 365);
};

/// Options for the identity of node/device `id`: CN = id, SAN DNS:id, valid from
/// five minutes ago for `validity`.
issue_options for_id(std::string id, std::chrono::hours validity);

/// Creates a self-signed fleet root CA: new EC P-256 key, random 128-bit serial,
/// basicConstraints critical CA:TRUE, keyUsage keyCertSign+cRLSign, SKI; valid
/// from five minutes ago for `validity`. Costs a key generation (~1 ms).
expected<key_and_cert> create_root_ca(const std::string& common_name, std::chrono::hours validity);

/// Issues a certificate for `o` signed by `ca` (a root or intermediate CA whose
/// key_pem matches its cert_pem): new EC P-256 key, SAN from o, extendedKeyUsage
/// serverAuth+clientAuth, AKI/SKI, basicConstraints CA:FALSE (CA:TRUE if o.is_ca).
/// The result's cert_pem is the new certificate alone (no chain).
expected<key_and_cert> issue(const key_and_cert& ca, const issue_options& o);

/// Verifies `cert_pem` (a certificate, optionally followed by intermediates)
/// against the trust anchor(s) in `ca_pem` as of time `at`. Returns the subject
/// CN of the certificate; errors use OpenSSL's reason, with the date for
/// expired / not yet valid certificates ("certificate has expired (notAfter
/// 2026-01-02T03:04:05Z)").
/// As verify(), ignoring every validity period: does the chain hold at all?
expected<std::string> verify_chain(const std::string& cert_pem, const std::string& ca_pem);

expected<std::string> verify(const std::string& cert_pem, const std::string& ca_pem,
                             std::chrono::system_clock::time_point at);

/// SHA-256 of the certificate's DER, uppercase hex without separators (64 chars),
/// as Azure shows thumbprints.
expected<std::string> thumbprint_sha256(const std::string& cert_pem);

/// The subject CN of the (first) certificate in `cert_pem`.
expected<std::string> common_name(const std::string& cert_pem);

/// Checks that `kc.key_pem` is the private key of the first certificate in `kc.cert_pem`.
expected<void> check_key_matches(const key_and_cert& kc);

/// Human-readable facts about a certificate, for `canopyctl certs show`.
struct cert_info {
  std::string common_name;                           ///< subject CN ("" if none)
  std::string issuer_common_name;                    ///< issuer CN ("" if none)
  std::vector<std::string> dns_names;                ///< SAN DNS entries
  std::vector<std::string> ip_addresses;             ///< SAN IP entries, as text
  bool is_ca = false;                                ///< basicConstraints CA:TRUE
  std::chrono::system_clock::time_point not_before;  ///< start of validity
  std::chrono::system_clock::time_point not_after;   ///< end of validity
  std::string serial_hex;                            ///< serial number, uppercase hex
  std::string thumbprint_sha256;                     ///< as thumbprint_sha256()
};

/// Reads the facts of the (first) certificate in `cert_pem`.
expected<cert_info> inspect(const std::string& cert_pem);

/// "2026-01-02T03:04:05Z" (UTC, seconds).
std::string format_time(std::chrono::system_clock::time_point t);

/// Writes `dir`/`name`.crt (mode 0644) and `dir`/`name`.key (0600; created with
/// that mode, never readable by others even briefly), creating `dir` (0755) and
/// its parents if missing. Without `overwrite`, refuses (errc::invalid_argument,
/// naming the file) if either file exists and writes nothing; with it, replaces
/// the files atomically (write to a temporary file, then rename).
expected<void> write_files(const std::string& dir, const std::string& name, const key_and_cert& kc,
                           bool overwrite = false);

/// Reads `dir`/`name`.crt and `dir`/`name`.key, checking that they parse and that
/// the key belongs to the certificate. Errors name the file.
expected<key_and_cert> read_files(const std::string& dir, const std::string& name);

/// Reads a whole (small) file; errors name it (errc::not_found if missing).
expected<std::string> read_file(const std::string& path);

}  // namespace canopy::certs
