#include "gateway/certs.hpp"

#include "gateway/x509_text.hpp"

#include <openssl/asn1.h>
#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509_vfy.h>
#include <openssl/x509v3.h>

#include <arpa/inet.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <memory>
#include <optional>
#include <set>
#include <string_view>
#include <utility>

namespace canopy::certs {

namespace {

// --- OpenSSL ownership ------------------------------------------------------------

/// unique_ptr deleter calling an OpenSSL free function.
template <auto Free>
struct ossl_free {
  template <class T>
  void operator()(T* p) const noexcept {
    Free(p);
  }
};

void free_x509_stack(STACK_OF(X509) * s) {
  sk_X509_pop_free(s, X509_free);
}
void free_general_names(GENERAL_NAMES* n) {
  GENERAL_NAMES_free(n);
}
void free_openssl_string(char* s) {
  OPENSSL_free(s);
}
void free_openssl_bytes(unsigned char* s) {
  OPENSSL_free(s);
}

using bio_ptr = std::unique_ptr<BIO, ossl_free<&BIO_free>>;
using x509_ptr = x509_text::x509_ptr;
using pkey_ptr = std::unique_ptr<EVP_PKEY, ossl_free<&EVP_PKEY_free>>;
using bn_ptr = std::unique_ptr<BIGNUM, ossl_free<&BN_free>>;
using ext_ptr = std::unique_ptr<X509_EXTENSION, ossl_free<&X509_EXTENSION_free>>;
using store_ptr = std::unique_ptr<X509_STORE, ossl_free<&X509_STORE_free>>;
using store_ctx_ptr = std::unique_ptr<X509_STORE_CTX, ossl_free<&X509_STORE_CTX_free>>;
using x509_stack_ptr = std::unique_ptr<STACK_OF(X509), ossl_free<&free_x509_stack>>;
using general_names_ptr = std::unique_ptr<GENERAL_NAMES, ossl_free<&free_general_names>>;
using general_name_ptr = std::unique_ptr<GENERAL_NAME, ossl_free<&GENERAL_NAME_free>>;
using ia5_ptr = std::unique_ptr<ASN1_IA5STRING, ossl_free<&ASN1_IA5STRING_free>>;
using octets_ptr = std::unique_ptr<ASN1_OCTET_STRING, ossl_free<&ASN1_OCTET_STRING_free>>;
using ossl_string_ptr = std::unique_ptr<char, ossl_free<&free_openssl_string>>;
using ossl_bytes_ptr = std::unique_ptr<unsigned char, ossl_free<&free_openssl_bytes>>;

/// Drains this thread's OpenSSL error queue into one line ("error:...; error:...").
std::string openssl_errors() {
  std::string out;
  while (unsigned long e = ERR_get_error()) {
    char buf[256];
    ERR_error_string_n(e, buf, sizeof(buf));
    if (!out.empty())
      out += "; ";
    out += buf;
  }
  return out.empty() ? std::string("unknown OpenSSL error") : out;
}

/// An error for a failed OpenSSL call: "<what>: <OpenSSL's reasons>".
error ossl_error(const std::string& what, errc code = errc::failed) {
  return make_error(code, what + ": " + openssl_errors());
}

/// Never prompts for a pass phrase (OpenSSL's default callback reads the terminal).
int no_password(char*, int, int, void*) {
  return 0;
}

bio_ptr memory_bio(const std::string& text) {
  return bio_ptr(BIO_new_mem_buf(text.data(), static_cast<int>(text.size())));
}

/// Every certificate in `pem`, in order; `what` names the input in errors.
expected<std::vector<x509_ptr>> parse_certs(const std::string& pem, const std::string& what) {
  ERR_clear_error();
  if (pem.find("-----BEGIN") == std::string::npos) {
    return make_error(errc::invalid_argument, what + ": no PEM certificate found");
  }
  std::vector<x509_ptr> out;
  switch (x509_text::read_pem_certificates(pem, out)) {
    case x509_text::pem_read::end:
      return out;
    case x509_text::pem_read::out_of_memory:
      return ossl_error(what);
    case x509_text::pem_read::bad_block:
      break;
  }
  return ossl_error(what + ": not a PEM certificate", errc::invalid_argument);
}

/// The first certificate in `pem`.
expected<x509_ptr> parse_cert(const std::string& pem, const std::string& what) {
  auto all = parse_certs(pem, what);
  if (!all)
    return std::move(all).err();
  return std::move(all->front());
}

expected<pkey_ptr> parse_key(const std::string& pem, const std::string& what) {
  ERR_clear_error();
  auto bio = memory_bio(pem);
  if (!bio)
    return ossl_error(what);
  pkey_ptr key(PEM_read_bio_PrivateKey(bio.get(), nullptr, &no_password, nullptr));
  if (!key)
    return ossl_error(what + ": not an unencrypted PEM private key", errc::invalid_argument);
  return key;
}

expected<std::string> cert_to_pem(X509* cert) {
  bio_ptr bio(BIO_new(BIO_s_mem()));
  if (!bio || PEM_write_bio_X509(bio.get(), cert) != 1)
    return ossl_error("writing the certificate");
  char* data = nullptr;
  long n = BIO_get_mem_data(bio.get(), &data);
  return std::string(data, static_cast<std::size_t>(n));
}

expected<std::string> key_to_pem(EVP_PKEY* key) {
  bio_ptr bio(BIO_new(BIO_s_mem()));
  if (!bio ||
      PEM_write_bio_PrivateKey(bio.get(), key, nullptr, nullptr, 0, nullptr, nullptr) != 1) {
    return ossl_error("writing the private key");
  }
  char* data = nullptr;
  long n = BIO_get_mem_data(bio.get(), &data);
  return std::string(data, static_cast<std::size_t>(n));
}

// --- Names and times ---------------------------------------------------------------

std::chrono::system_clock::time_point to_time_point(const ASN1_TIME* t) {
  std::tm tm{};
  if (t == nullptr || ASN1_TIME_to_tm(t, &tm) != 1)
    return {};
  return std::chrono::system_clock::from_time_t(::timegm(&tm));
}

bool set_time(ASN1_TIME* field, std::chrono::system_clock::time_point t) {
  return ASN1_TIME_set(field, std::chrono::system_clock::to_time_t(t)) != nullptr;
}

/// True for a host name Canopy puts in SAN DNS: dot-separated labels of 1-63
/// letters, digits, '-' or '_' (ids may hold '_'), not starting or ending with '-',
/// at most 253 characters in all.
bool valid_dns_name(std::string_view s) {
  if (s.empty() || s.size() > 253)
    return false;
  std::size_t start = 0;
  for (;;) {
    auto dot = s.find('.', start);
    auto label =
      s.substr(start, dot == std::string_view::npos ? std::string_view::npos : dot - start);
    if (label.empty() || label.size() > 63 || label.front() == '-' || label.back() == '-')
      return false;
    for (char c : label) {
      bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                c == '-' || c == '_';
      if (!ok)
        return false;
    }
    if (dot == std::string_view::npos)
      return true;
    start = dot + 1;
  }
}

/// Checks a subject CN: not empty, at most 64 bytes (X.520 ub-common-name), no
/// control characters.
expected<void> check_common_name(const std::string& cn, const std::string& field) {
  if (cn.empty())
    return make_error(errc::invalid_argument, field + ": empty");
  if (cn.size() > 64) {
    return make_error(
      errc::invalid_argument,
      field + ": '" + cn + "' is longer than 64 characters (" + std::to_string(cn.size()) + ")");
  }
  for (std::size_t i = 0; i < cn.size(); ++i) {
    auto c = static_cast<unsigned char>(cn[i]);
    if (c < 0x20 || c == 0x7f) {
      return make_error(errc::invalid_argument,
                        field + ": control character at byte " + std::to_string(i));
    }
  }
  return {};
}

expected<void> check_validity(std::chrono::system_clock::time_point not_before,
                              std::chrono::system_clock::time_point not_after) {
  if (not_after <= not_before) {
    return make_error(errc::invalid_argument, "not_after (" + format_time(not_after) +
                                                ") must be after not_before (" +
                                                format_time(not_before) + ")");
  }
  return {};
}

// --- Building certificates -----------------------------------------------------------

expected<pkey_ptr> new_ec_key() {
  ERR_clear_error();
  pkey_ptr key(EVP_PKEY_Q_keygen(nullptr, nullptr, "EC", "P-256"));
  if (!key)
    return ossl_error("generating an EC P-256 key");
  return key;
}

/// Adds an extension given in OpenSSL's config syntax (fixed strings only, never user input).
expected<void> add_ext(X509* cert, X509* issuer, int nid, const char* value) {
  X509V3_CTX ctx;
  X509V3_set_ctx_nodb(&ctx);
  X509V3_set_ctx(&ctx, issuer, cert, nullptr, nullptr, 0);
  ext_ptr ext(X509V3_EXT_conf_nid(nullptr, &ctx, nid, value));
  if (!ext || X509_add_ext(cert, ext.get(), -1) != 1) {
    return ossl_error(std::string("adding extension ") + OBJ_nid2sn(nid) + " = " + value);
  }
  return {};
}

/// A new v3 certificate for `key` with subject CN `cn`, a random 128-bit serial
/// and the given validity; issuer name and signature are left to the caller.
expected<x509_ptr> new_cert(EVP_PKEY* key, const std::string& cn,
                            std::chrono::system_clock::time_point not_before,
                            std::chrono::system_clock::time_point not_after) {
  x509_ptr cert(X509_new());
  if (!cert || X509_set_version(cert.get(), X509_VERSION_3) != 1)
    return ossl_error("creating a certificate");

  bn_ptr serial(BN_new());
  if (!serial)
    return ossl_error("creating a serial number");
  do {
    if (BN_rand(serial.get(), 128, BN_RAND_TOP_ANY, BN_RAND_BOTTOM_ANY) != 1) {
      return ossl_error("creating a random serial number");
    }
  } while (BN_is_zero(serial.get()));
  if (BN_to_ASN1_INTEGER(serial.get(), X509_get_serialNumber(cert.get())) == nullptr) {
    return ossl_error("setting the serial number");
  }

  if (!set_time(X509_getm_notBefore(cert.get()), not_before)) {
    return ossl_error("not_before: " + format_time(not_before) + " cannot be encoded",
                      errc::invalid_argument);
  }
  if (!set_time(X509_getm_notAfter(cert.get()), not_after)) {
    return ossl_error("not_after: " + format_time(not_after) + " cannot be encoded",
                      errc::invalid_argument);
  }
  if (X509_set_pubkey(cert.get(), key) != 1)
    return ossl_error("setting the public key");
  if (X509_NAME_add_entry_by_txt(X509_get_subject_name(cert.get()), "CN", MBSTRING_UTF8,
                                 reinterpret_cast<const unsigned char*>(cn.data()),
                                 static_cast<int>(cn.size()), -1, 0) != 1) {
    return ossl_error("common_name: '" + cn + "' cannot be encoded", errc::invalid_argument);
  }
  return cert;
}

/// subjectAltName with the given DNS names and IP addresses (already validated).
expected<void> add_san(X509* cert, const std::vector<std::string>& dns,
                       const std::vector<std::pair<std::string, std::vector<unsigned char>>>& ips) {
  general_names_ptr names(sk_GENERAL_NAME_new_null());
  if (!names)
    return ossl_error("creating subjectAltName");
  // Takes `value` (an ASN1 string of the right kind); false if OpenSSL ran out of memory.
  auto push = [&](int type, auto value) -> bool {
    general_name_ptr gn(GENERAL_NAME_new());
    if (!gn || !value)
      return false;
    GENERAL_NAME_set0_value(gn.get(), type, value.release());
    if (sk_GENERAL_NAME_push(names.get(), gn.get()) <= 0)
      return false;
    gn.release();  // owned by `names` now
    return true;
  };
  for (const auto& d : dns) {
    ia5_ptr s(ASN1_IA5STRING_new());
    if (s && ASN1_STRING_set(s.get(), d.data(), static_cast<int>(d.size())) != 1)
      s.reset();
    if (!push(GEN_DNS, std::move(s)))
      return ossl_error("subjectAltName DNS:" + d);
  }
  for (const auto& [text, bytes] : ips) {
    octets_ptr s(ASN1_OCTET_STRING_new());
    if (s && ASN1_OCTET_STRING_set(s.get(), bytes.data(), static_cast<int>(bytes.size())) != 1)
      s.reset();
    if (!push(GEN_IPADD, std::move(s)))
      return ossl_error("subjectAltName IP:" + text);
  }
  if (sk_GENERAL_NAME_num(names.get()) == 0)
    return {};
  if (X509_add1_ext_i2d(cert, NID_subject_alt_name, names.get(), 0, X509V3_ADD_DEFAULT) != 1) {
    return ossl_error("adding subjectAltName");
  }
  return {};
}

std::string describe_errno(int err) {
  return std::strerror(err);
}

// --- Files -----------------------------------------------------------------------------

/// mkdir -p with mode 0755 for the directories it creates.
expected<void> make_dirs(const std::string& dir) {
  if (dir.empty())
    return make_error(errc::invalid_argument, "dir: empty");
  std::string path;
  std::size_t pos = 0;
  while (pos <= dir.size()) {
    auto slash = dir.find('/', pos);
    if (slash == std::string::npos)
      slash = dir.size();
    path = dir.substr(0, slash);
    pos = slash + 1;
    if (path.empty())
      continue;  // the leading '/'
    if (::mkdir(path.c_str(), 0755) == 0)
      continue;
    int err = errno;
    struct stat st {};
    if (err == EEXIST && ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode))
      continue;
    if (err == EEXIST)
      return make_error(errc::io_error, "cannot create directory " + path + ": not a directory");
    return make_error(errc::io_error,
                      "cannot create directory " + path + ": " + describe_errno(err));
  }
  return {};
}

expected<void> write_all(int fd, const std::string& content, const std::string& path) {
  std::size_t done = 0;
  while (done < content.size()) {
    auto n = ::write(fd, content.data() + done, content.size() - done);
    if (n < 0 && errno == EINTR)
      continue;
    if (n < 0)
      return make_error(errc::io_error, "cannot write " + path + ": " + describe_errno(errno));
    done += static_cast<std::size_t>(n);
  }
  if (::fsync(fd) != 0)
    return make_error(errc::io_error, "cannot sync " + path + ": " + describe_errno(errno));
  return {};
}

/// Closes a file descriptor when it goes out of scope.
struct fd_guard {
  int fd = -1;
  ~fd_guard() {
    if (fd >= 0)
      ::close(fd);
  }
};

/// Writes `path` with exactly `mode`. Without `replace` the file must not exist
/// (O_EXCL); with it, a temporary file (created 0600) is renamed over it.
expected<void> write_file(const std::string& path, const std::string& content, mode_t mode,
                          bool replace) {
  if (!replace) {
    fd_guard f{
      ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, mode & 0600)};
    if (f.fd < 0) {
      int err = errno;
      if (err == EEXIST) {
        return make_error(errc::invalid_argument,
                          "refusing to overwrite the existing file " + path);
      }
      return make_error(errc::io_error, "cannot create " + path + ": " + describe_errno(err));
    }
    // Created no wider than 0600; widen only now (for the certificate), past the umask.
    if (::fchmod(f.fd, mode) != 0) {
      int err = errno;
      ::unlink(path.c_str());
      return make_error(errc::io_error,
                        "cannot set the mode of " + path + ": " + describe_errno(err));
    }
    auto written = write_all(f.fd, content, path);
    if (!written)
      ::unlink(path.c_str());
    return written;
  }
  std::string tmp = path + ".tmp-XXXXXX";
  fd_guard f{::mkostemp(tmp.data(), O_CLOEXEC)};  // mode 0600
  if (f.fd < 0)
    return make_error(errc::io_error,
                      "cannot create a temporary file for " + path + ": " + describe_errno(errno));
  auto fail = [&](error e) {
    ::unlink(tmp.c_str());
    return e;
  };
  if (::fchmod(f.fd, mode) != 0) {
    return fail(
      make_error(errc::io_error, "cannot set the mode of " + tmp + ": " + describe_errno(errno)));
  }
  auto written = write_all(f.fd, content, path);
  if (!written)
    return fail(std::move(written).err());
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    return fail(
      make_error(errc::io_error, "cannot replace " + path + ": " + describe_errno(errno)));
  }
  return {};
}

expected<void> check_file_name(const std::string& name) {
  if (name.empty())
    return make_error(errc::invalid_argument, "name: empty");
  if (name == "." || name == ".." || name.find('/') != std::string::npos ||
      name.find('\0') != std::string::npos) {
    return make_error(errc::invalid_argument, "name: '" + name + "' is not a plain file name");
  }
  return {};
}

}  // namespace

// --- Public API ------------------------------------------------------------------------

std::string format_time(std::chrono::system_clock::time_point t) {
  std::time_t secs = std::chrono::system_clock::to_time_t(t);
  std::tm tm{};
  ::gmtime_r(&secs, &tm);
  char buf[40];
  std::strftime(buf, sizeof(buf), "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

issue_options for_id(std::string id, std::chrono::hours validity) {
  issue_options o;
  auto now = std::chrono::system_clock::now();
  o.not_before = now - std::chrono::minutes(5);
  o.not_after = now + validity;
  o.dns_names.push_back(id);
  o.common_name = std::move(id);
  return o;
}

expected<key_and_cert> create_root_ca(const std::string& common_name, std::chrono::hours validity) {
  if (auto ok = check_common_name(common_name, "common_name"); !ok)
    return std::move(ok).err();
  auto now = std::chrono::system_clock::now();
  auto not_before = now - std::chrono::minutes(5);
  auto not_after = now + validity;
  if (validity.count() <= 0) {
    return make_error(errc::invalid_argument, "validity: must be positive (got " +
                                                std::to_string(validity.count()) + " hours)");
  }
  if (auto ok = check_validity(not_before, not_after); !ok)
    return std::move(ok).err();

  auto key = new_ec_key();
  if (!key)
    return std::move(key).err();
  auto cert = new_cert(key->get(), common_name, not_before, not_after);
  if (!cert)
    return std::move(cert).err();
  X509* c = cert->get();
  if (X509_set_issuer_name(c, X509_get_subject_name(c)) != 1)
    return ossl_error("setting the issuer");
  for (auto [nid, value] : {std::pair{NID_basic_constraints, "critical,CA:TRUE"},
                            std::pair{NID_key_usage, "critical,keyCertSign,cRLSign"},
                            std::pair{NID_subject_key_identifier, "hash"},
                            std::pair{NID_authority_key_identifier, "keyid:always"}}) {
    if (auto ok = add_ext(c, c, nid, value); !ok)
      return std::move(ok).err();
  }
  if (X509_sign(c, key->get(), EVP_sha256()) <= 0)
    return ossl_error("signing the CA certificate");

  auto cert_pem = cert_to_pem(c);
  if (!cert_pem)
    return std::move(cert_pem).err();
  auto key_pem = key_to_pem(key->get());
  if (!key_pem)
    return std::move(key_pem).err();
  return key_and_cert{std::move(*cert_pem), std::move(*key_pem)};
}

expected<key_and_cert> issue(const key_and_cert& ca, const issue_options& o) {
  // Inputs first: cheap and the likeliest mistakes.
  if (auto ok = check_common_name(o.common_name, "common_name"); !ok)
    return std::move(ok).err();
  if (auto ok = check_validity(o.not_before, o.not_after); !ok)
    return std::move(ok).err();
  std::vector<std::string> dns;
  std::set<std::string> seen;
  auto add_dns = [&](const std::string& d) {
    if (seen.insert(d).second)
      dns.push_back(d);
  };
  if (valid_dns_name(o.common_name))
    add_dns(o.common_name);
  for (std::size_t i = 0; i < o.dns_names.size(); ++i) {
    if (!valid_dns_name(o.dns_names[i])) {
      return make_error(errc::invalid_argument, "dns_names[" + std::to_string(i) + "]: '" +
                                                  o.dns_names[i] + "' is not a valid DNS name");
    }
    add_dns(o.dns_names[i]);
  }
  std::vector<std::pair<std::string, std::vector<unsigned char>>> ips;
  for (std::size_t i = 0; i < o.ip_addresses.size(); ++i) {
    const auto& text = o.ip_addresses[i];
    unsigned char buf[16];
    if (::inet_pton(AF_INET, text.c_str(), buf) == 1) {
      ips.emplace_back(text, std::vector<unsigned char>(buf, buf + 4));
    } else if (::inet_pton(AF_INET6, text.c_str(), buf) == 1) {
      ips.emplace_back(text, std::vector<unsigned char>(buf, buf + 16));
    } else {
      return make_error(errc::invalid_argument, "ip_addresses[" + std::to_string(i) + "]: '" +
                                                  text + "' is not an IPv4 or IPv6 address");
    }
  }

  auto ca_certs = parse_certs(ca.cert_pem, "CA certificate");
  if (!ca_certs)
    return std::move(ca_certs).err();
  X509* ca_cert = ca_certs->front().get();
  auto ca_key = parse_key(ca.key_pem, "CA key");
  if (!ca_key)
    return std::move(ca_key).err();
  if (X509_check_private_key(ca_cert, ca_key->get()) != 1) {
    ERR_clear_error();
    return make_error(errc::invalid_argument,
                      "CA key: does not match the CA certificate (CN " +
                        x509_text::common_name(X509_get_subject_name(ca_cert)) + ")");
  }
  if ((X509_get_extension_flags(ca_cert) & EXFLAG_CA) == 0) {
    return make_error(errc::invalid_argument,
                      "CA certificate: '" + x509_text::common_name(X509_get_subject_name(ca_cert)) +
                        "' is not a CA (basicConstraints CA:TRUE missing)");
  }

  auto key = new_ec_key();
  if (!key)
    return std::move(key).err();
  auto cert = new_cert(key->get(), o.common_name, o.not_before, o.not_after);
  if (!cert)
    return std::move(cert).err();
  X509* c = cert->get();
  if (X509_set_issuer_name(c, X509_get_subject_name(ca_cert)) != 1)
    return ossl_error("setting the issuer");
  const char* constraints = o.is_ca ? "critical,CA:TRUE" : "critical,CA:FALSE";
  const char* usage =
    o.is_ca ? "critical,digitalSignature,keyCertSign,cRLSign" : "critical,digitalSignature";
  for (auto [nid, value] :
       {std::pair{NID_basic_constraints, constraints}, std::pair{NID_key_usage, usage},
        std::pair{NID_ext_key_usage, "serverAuth,clientAuth"},
        std::pair{NID_subject_key_identifier, "hash"},
        std::pair{NID_authority_key_identifier, "keyid:always"}}) {
    if (auto ok = add_ext(c, ca_cert, nid, value); !ok)
      return std::move(ok).err();
  }
  if (auto ok = add_san(c, dns, ips); !ok)
    return std::move(ok).err();
  if (X509_sign(c, ca_key->get(), EVP_sha256()) <= 0)
    return ossl_error("signing the certificate");

  auto cert_pem = cert_to_pem(c);
  if (!cert_pem)
    return std::move(cert_pem).err();
  // Issued by an intermediate: append its chain so that the files are usable as they are.
  if (X509_check_issued(ca_cert, ca_cert) != X509_V_OK) {
    *cert_pem += ca.cert_pem;
    if (cert_pem->back() != '\n')
      *cert_pem += '\n';
  }
  ERR_clear_error();  // X509_check_issued may leave entries
  auto key_pem = key_to_pem(key->get());
  if (!key_pem)
    return std::move(key_pem).err();
  return key_and_cert{std::move(*cert_pem), std::move(*key_pem)};
}

namespace {
expected<std::string> verify_at(const std::string& cert_pem, const std::string& ca_pem,
                                std::optional<std::chrono::system_clock::time_point> at);
}  // namespace

expected<std::string> verify(const std::string& cert_pem, const std::string& ca_pem,
                             std::chrono::system_clock::time_point at) {
  return verify_at(cert_pem, ca_pem, at);
}

expected<std::string> verify_chain(const std::string& cert_pem, const std::string& ca_pem) {
  return verify_at(cert_pem, ca_pem, std::nullopt);
}

namespace {
expected<std::string> verify_at(const std::string& cert_pem, const std::string& ca_pem,
                                std::optional<std::chrono::system_clock::time_point> at) {
  auto chain = parse_certs(cert_pem, "certificate");
  if (!chain)
    return std::move(chain).err();
  auto anchors = parse_certs(ca_pem, "CA certificate");
  if (!anchors)
    return std::move(anchors).err();

  store_ptr store(X509_STORE_new());
  if (!store)
    return ossl_error("creating a certificate store");
  for (auto& a : *anchors) {
    if (X509_STORE_add_cert(store.get(), a.get()) != 1)
      return ossl_error("adding a CA certificate");
  }
  x509_stack_ptr untrusted(sk_X509_new_null());
  if (!untrusted)
    return ossl_error("creating a certificate chain");
  for (std::size_t i = 1; i < chain->size(); ++i) {
    if (sk_X509_push(untrusted.get(), (*chain)[i].get()) <= 0)
      return ossl_error("building the chain");
    X509_up_ref((*chain)[i].get());  // the stack frees what it holds
  }
  X509* leaf = chain->front().get();
  store_ctx_ptr ctx(X509_STORE_CTX_new());
  if (!ctx || X509_STORE_CTX_init(ctx.get(), store.get(), leaf, untrusted.get()) != 1) {
    return ossl_error("setting up verification");
  }
  if (at)
    X509_STORE_CTX_set_time(ctx.get(), 0, std::chrono::system_clock::to_time_t(*at));
  else
    X509_STORE_CTX_set_flags(ctx.get(), X509_V_FLAG_NO_CHECK_TIME);
  if (X509_verify_cert(ctx.get()) != 1) {
    int code = X509_STORE_CTX_get_error(ctx.get());
    int depth = X509_STORE_CTX_get_error_depth(ctx.get());
    X509* bad = X509_STORE_CTX_get_current_cert(ctx.get());
    std::string msg = x509_text::verify_error(code, depth, bad);
    ERR_clear_error();
    return make_error(errc::invalid_argument, msg);
  }
  return x509_text::common_name(X509_get_subject_name(leaf));
}
}  // namespace

expected<std::string> thumbprint_sha256(const std::string& cert_pem) {
  auto cert = parse_cert(cert_pem, "certificate");
  if (!cert)
    return std::move(cert).err();
  auto thumbprint = x509_text::thumbprint_sha256(cert->get());
  if (thumbprint.empty())
    return ossl_error("hashing the certificate");
  return thumbprint;
}

expected<std::string> common_name(const std::string& cert_pem) {
  auto cert = parse_cert(cert_pem, "certificate");
  if (!cert)
    return std::move(cert).err();
  auto cn = x509_text::common_name(X509_get_subject_name(cert->get()));
  if (cn.empty())
    return make_error(errc::not_found, "certificate: the subject has no common name (CN)");
  return cn;
}

expected<void> check_key_matches(const key_and_cert& kc) {
  auto cert = parse_cert(kc.cert_pem, "certificate");
  if (!cert)
    return std::move(cert).err();
  auto key = parse_key(kc.key_pem, "key");
  if (!key)
    return std::move(key).err();
  if (X509_check_private_key(cert->get(), key->get()) != 1) {
    ERR_clear_error();
    return make_error(errc::invalid_argument,
                      "the key does not belong to the certificate (CN " +
                        x509_text::common_name(X509_get_subject_name(cert->get())) + ")");
  }
  return {};
}

expected<cert_info> inspect(const std::string& cert_pem) {
  auto cert = parse_cert(cert_pem, "certificate");
  if (!cert)
    return std::move(cert).err();
  X509* c = cert->get();
  cert_info info;
  info.common_name = x509_text::common_name(X509_get_subject_name(c));
  info.issuer_common_name = x509_text::common_name(X509_get_issuer_name(c));
  info.not_before = to_time_point(X509_get0_notBefore(c));
  info.not_after = to_time_point(X509_get0_notAfter(c));
  info.is_ca = (X509_get_extension_flags(c) & EXFLAG_CA) != 0;
  general_names_ptr names(
    static_cast<GENERAL_NAMES*>(X509_get_ext_d2i(c, NID_subject_alt_name, nullptr, nullptr)));
  if (names) {
    for (int i = 0; i < sk_GENERAL_NAME_num(names.get()); ++i) {
      const GENERAL_NAME* gn = sk_GENERAL_NAME_value(names.get(), i);
      if (gn->type == GEN_DNS) {
        const ASN1_IA5STRING* s = gn->d.dNSName;
        info.dns_names.emplace_back(reinterpret_cast<const char*>(ASN1_STRING_get0_data(s)),
                                    static_cast<std::size_t>(ASN1_STRING_length(s)));
      } else if (gn->type == GEN_IPADD) {
        const ASN1_OCTET_STRING* s = gn->d.iPAddress;
        char text[INET6_ADDRSTRLEN] = {};
        int len = ASN1_STRING_length(s);
        int family = len == 4 ? AF_INET : len == 16 ? AF_INET6 : 0;
        if (family != 0 &&
            ::inet_ntop(family, ASN1_STRING_get0_data(s), text, sizeof(text)) != nullptr) {
          info.ip_addresses.emplace_back(text);
        }
      }
    }
  }
  bn_ptr serial(ASN1_INTEGER_to_BN(X509_get0_serialNumber(c), nullptr));
  if (serial) {
    ossl_string_ptr hex(BN_bn2hex(serial.get()));
    if (hex)
      info.serial_hex = hex.get();
  }
  ERR_clear_error();  // X509_get_ext_d2i reports a missing extension this way
  auto thumb = thumbprint_sha256(cert_pem);
  if (!thumb)
    return std::move(thumb).err();
  info.thumbprint_sha256 = std::move(*thumb);
  return info;
}

expected<std::string> read_file(const std::string& path) {
  fd_guard f{::open(path.c_str(), O_RDONLY | O_CLOEXEC)};
  if (f.fd < 0) {
    int err = errno;
    return make_error(err == ENOENT ? errc::not_found : errc::io_error,
                      "cannot read " + path + ": " + describe_errno(err));
  }
  std::string out;
  char buf[8192];
  for (;;) {
    auto n = ::read(f.fd, buf, sizeof(buf));
    if (n < 0 && errno == EINTR)
      continue;
    if (n < 0)
      return make_error(errc::io_error, "cannot read " + path + ": " + describe_errno(errno));
    if (n == 0)
      break;
    out.append(buf, static_cast<std::size_t>(n));
    if (out.size() > (1u << 20)) {
      return make_error(errc::invalid_argument,
                        path + ": larger than 1 MiB; not a certificate or key file");
    }
  }
  return out;
}

expected<void> write_files(const std::string& dir, const std::string& name, const key_and_cert& kc,
                           bool overwrite) {
  if (auto ok = check_file_name(name); !ok)
    return std::move(ok).err();
  if (kc.cert_pem.empty())
    return make_error(errc::invalid_argument, "cert_pem: empty");
  if (kc.key_pem.empty())
    return make_error(errc::invalid_argument, "key_pem: empty");
  if (auto ok = make_dirs(dir); !ok)
    return std::move(ok).err();
  std::string base = dir.back() == '/' ? dir : dir + "/";
  std::string crt = base + name + ".crt";
  std::string key = base + name + ".key";
  if (!overwrite) {
    // Check both first so that a refusal writes nothing.
    for (const auto& path : {crt, key}) {
      struct stat st {};
      if (::lstat(path.c_str(), &st) == 0) {
        return make_error(errc::invalid_argument,
                          "refusing to overwrite the existing file " + path);
      }
    }
  }
  if (auto ok = write_file(key, kc.key_pem, 0600, overwrite); !ok)
    return std::move(ok).err();
  if (auto ok = write_file(crt, kc.cert_pem, 0644, overwrite); !ok) {
    if (!overwrite)
      ::unlink(key.c_str());  // ours, created a moment ago
    return std::move(ok).err();
  }
  // Make the new directory entries durable.
  fd_guard d{::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC)};
  if (d.fd >= 0)
    ::fsync(d.fd);
  return {};
}

expected<key_and_cert> read_files(const std::string& dir, const std::string& name) {
  if (auto ok = check_file_name(name); !ok)
    return std::move(ok).err();
  std::string base = !dir.empty() && dir.back() == '/' ? dir : dir + "/";
  std::string crt = base + name + ".crt";
  std::string key = base + name + ".key";
  auto cert_pem = read_file(crt);
  if (!cert_pem)
    return std::move(cert_pem).err();
  auto key_pem = read_file(key);
  if (!key_pem)
    return std::move(key_pem).err();
  if (auto cert = parse_certs(*cert_pem, crt); !cert)
    return std::move(cert).err();
  if (auto k = parse_key(*key_pem, key); !k)
    return std::move(k).err();
  key_and_cert kc{std::move(*cert_pem), std::move(*key_pem)};
  if (auto ok = check_key_matches(kc); !ok) {
    return make_error(errc::invalid_argument, key + ": " + ok.err().message + " in " + crt);
  }
  return kc;
}

}  // namespace canopy::certs
