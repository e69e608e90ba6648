// canopy::x509_text — what an OpenSSL X.509 certificate says, as the text Canopy
// shows: its subject CN, its SHA-256 thumbprint and why verification refused it.
// Internal to gateway/: shared by certs.cpp and ossl_tls.cpp, the two places that
// hold OpenSSL objects (certs.hpp keeps OpenSSL out of its interface).
//
// Threading: pure functions, any thread.
#pragma once

#include <openssl/types.h>  // X509, X509_NAME

#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace canopy::x509_text {

/// Frees an X509.
struct x509_free {
  void operator()(X509* x) const noexcept;
};
/// Owns an X509.
using x509_ptr = std::unique_ptr<X509, x509_free>;

/// How read_pem_certificates ended.
enum class pem_read {
  end,            ///< every block was a certificate, up to the end of the input
  bad_block,      ///< a block is not a certificate (OpenSSL's error queue says why)
  out_of_memory,  ///< the input could not be wrapped in a BIO
};

/// Appends every PEM certificate of `pem` to `out`, in order, never asking
/// for a password; at a block that is not a certificate it stops (`out`
/// holds those before it). Input with no certificate at all is bad_block.
/// Callers format their own errors (the file, the certificate's position).
pem_read read_pem_certificates(std::string_view pem, std::vector<x509_ptr>& out);

/// The first CN of `name` as UTF-8, or "" if it has none (or `name` is null).
std::string common_name(const X509_NAME* name);

/// SHA-256 of `cert`'s DER as uppercase hex without separators (64 characters),
/// as Azure shows thumbprints; "" if hashing fails (OpenSSL's error queue says why).
std::string thumbprint_sha256(const X509* cert);

/// SHA-1 of `cert`'s DER as uppercase hex (40 characters): the other thumbprint
/// Azure's registry accepts for self-signed device certificates; "" if hashing fails.
std::string thumbprint_sha1(const X509* cert);

/// OpenSSL's reason for verification error `code` about `bad` (the certificate at
/// `depth` of the chain; may be null), with the date of an expired or not yet valid
/// certificate and the CN of an issuer above the leaf: "certificate has expired
/// (notAfter 2026-01-02T03:04:05Z)", "... [issuer certificate 'Fleet CA', depth 1]".
std::string verify_error(int code, int depth, const X509* bad);

}  // namespace canopy::x509_text
