#include "gateway/x509_text.hpp"

#include "gateway/certs.hpp"  // format_time

#include <openssl/asn1.h>
#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/x509.h>
#include <openssl/x509_vfy.h>

#include <chrono>
#include <cstddef>
#include <ctime>

namespace canopy::x509_text {

namespace {

std::string hex_upper(const unsigned char* data, std::size_t n) {
  static constexpr char digits[] = "0123456789ABCDEF";
  std::string out;
  out.reserve(n * 2);
  for (std::size_t i = 0; i < n; ++i) {
    out += digits[data[i] >> 4];
    out += digits[data[i] & 15];
  }
  return out;
}

/// "2026-01-02T03:04:05Z", or "?" if OpenSSL cannot read `t`.
std::string format_asn1_time(const ASN1_TIME* t) {
  std::tm tm{};
  if (t == nullptr || ASN1_TIME_to_tm(t, &tm) != 1)
    return "?";
  return certs::format_time(std::chrono::system_clock::from_time_t(::timegm(&tm)));
}

}  // namespace

std::string common_name(const X509_NAME* name) {
  if (name == nullptr)
    return "";
  int index = X509_NAME_get_index_by_NID(name, NID_commonName, -1);
  if (index < 0)
    return "";
  const ASN1_STRING* data = X509_NAME_ENTRY_get_data(X509_NAME_get_entry(name, index));
  unsigned char* utf8 = nullptr;
  int len = ASN1_STRING_to_UTF8(&utf8, data);
  if (len < 0)
    return "";
  std::string out(reinterpret_cast<const char*>(utf8), static_cast<std::size_t>(len));
  OPENSSL_free(utf8);
  return out;
}

namespace {

/// `type` digest of `cert`'s DER as uppercase hex; "" if hashing fails.
std::string digest_hex(const X509* cert, const EVP_MD* type) {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  if (X509_digest(cert, type, md, &len) != 1)
    return "";
  return hex_upper(md, len);
}

}  // namespace

std::string thumbprint_sha256(const X509* cert) {
  return digest_hex(cert, EVP_sha256());
}

std::string thumbprint_sha1(const X509* cert) {
  return digest_hex(cert, EVP_sha1());
}

std::string verify_error(int code, int depth, const X509* bad) {
  std::string out = X509_verify_cert_error_string(code);
  if (bad != nullptr && code == X509_V_ERR_CERT_HAS_EXPIRED)
    out += " (notAfter " + format_asn1_time(X509_get0_notAfter(bad)) + ")";
  else if (bad != nullptr && code == X509_V_ERR_CERT_NOT_YET_VALID)
    out += " (notBefore " + format_asn1_time(X509_get0_notBefore(bad)) + ")";
  if (bad != nullptr && depth > 0) {
    out += " [issuer certificate '" + common_name(X509_get_subject_name(bad)) + "', depth " +
           std::to_string(depth) + "]";
  }
  return out;
}

void x509_free::operator()(X509* x) const noexcept { X509_free(x); }

namespace {

int no_password(char*, int, int, void*) { return 0; }

}  // namespace

pem_read read_pem_certificates(std::string_view pem, std::vector<x509_ptr>& out) {
  std::unique_ptr<BIO, decltype(&BIO_free)> bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())),
                                                &BIO_free);
  if (!bio)
    return pem_read::out_of_memory;
  const auto before = out.size();
  for (;;) {
    x509_ptr cert(PEM_read_bio_X509(bio.get(), nullptr, &no_password, nullptr));
    if (cert) {
      out.push_back(std::move(cert));
      continue;
    }
    auto e = ERR_peek_last_error();
    if (out.size() > before && ERR_GET_LIB(e) == ERR_LIB_PEM && ERR_GET_REASON(e) == PEM_R_NO_START_LINE) {
      ERR_clear_error();  // the end of the input
      return pem_read::end;
    }
    return pem_read::bad_block;
  }
}

}  // namespace canopy::x509_text
