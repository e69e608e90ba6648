// canopy::x509_text — what an OpenSSL X.509 certificate says, as the text Canopy
// shows: its subject CN, its SHA-256 thumbprint and why verification refused it.
// Internal to gateway/: shared by certs.cpp and ossl_tls.cpp, the two places that
// hold OpenSSL objects (certs.hpp keeps OpenSSL out of its interface).
//
// Threading: pure functions, any thread.
#pragma once

#include <openssl/types.h>  // X509, X509_NAME

#include <string>

namespace canopy::x509_text {

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
