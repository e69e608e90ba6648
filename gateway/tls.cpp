#include "gateway/tls.hpp"

#include <kj/debug.h>
#include <kj/exception.h>
#include <kj/vector.h>

#include <chrono>
#include <string_view>
#include <utility>
#include <vector>

namespace canopy {

namespace {

constexpr std::string_view pem_begin = "-----BEGIN CERTIFICATE-----";
constexpr std::string_view pem_end = "-----END CERTIFICATE-----";

/// The PEM certificate blocks of `pem`, each on its own (kj trusts only the first
/// certificate of each TlsCertificate, so every anchor needs its own).
std::vector<std::string> split_certificates(const std::string& pem) {
  std::vector<std::string> out;
  std::size_t pos = 0;
  for (;;) {
    auto begin = pem.find(pem_begin, pos);
    if (begin == std::string::npos)
      break;
    auto end = pem.find(pem_end, begin);
    if (end == std::string::npos) {
      out.push_back(pem.substr(begin));  // truncated: let the parser say so
      break;
    }
    end += pem_end.size();
    out.push_back(pem.substr(begin, end - begin) + "\n");
    pos = end;
  }
  return out;
}

std::string describe(const kj::Exception& e) {
  auto d = e.getDescription();
  return std::string(d.cStr(), d.size());
}

kj::StringPtr as_kj(const std::string& s) {
  return kj::StringPtr(s.c_str(), s.size());
}

}  // namespace

tls_config::tls_config(token, kj::TlsKeypair keypair, kj::Array<kj::TlsCertificate> trusted,
                       std::string common_name, std::string thumbprint)
    : keypair_(kj::mv(keypair)),
      trusted_(kj::mv(trusted)),
      common_name_(std::move(common_name)),
      thumbprint_(std::move(thumbprint)) {}

tls_config::~tls_config() = default;

expected<std::unique_ptr<tls_config>> tls_config::load(const tls_files& files, tls_role role,
                                                       kj::Timer* timer) {
  auto pem = read_tls_files(files);
  if (!pem)
    return std::move(pem).err();
  return build(pem->identity, pem->ca_pem, role, timer, pem->cert_label, pem->key_label,
               pem->ca_label);
}

expected<std::unique_ptr<tls_config>> tls_config::from_pem(const certs::key_and_cert& identity,
                                                           const std::string& ca_pem, tls_role role,
                                                           kj::Timer* timer) {
  return build(identity, ca_pem, role, timer, "node certificate", "node key", "CA certificate");
}

expected<std::unique_ptr<tls_config>> tls_config::build(
  const certs::key_and_cert& identity, const std::string& ca_pem, tls_role role, kj::Timer* timer,
  const std::string& cert_label, const std::string& key_label, const std::string& ca_label) {
  // Parse with kj first: it is what the context will use, and it throws on bad PEM.
  kj::Maybe<kj::TlsCertificate> cert;
  KJ_IF_MAYBE (e, kj::runCatchingExceptions(
                    [&] { cert = kj::TlsCertificate(as_kj(identity.cert_pem)); })) {
    return make_error(errc::invalid_argument, cert_label + ": cannot parse: " + describe(*e));
  }
  kj::Maybe<kj::TlsPrivateKey> key;
  KJ_IF_MAYBE (e, kj::runCatchingExceptions(
                    [&] { key = kj::TlsPrivateKey(as_kj(identity.key_pem)); })) {
    return make_error(errc::invalid_argument, key_label + ": cannot parse: " + describe(*e));
  }
  auto trusted = parse_trust_anchors(ca_pem, ca_label);
  if (!trusted)
    return std::move(trusted).err();

  // Our own checks, with clearer messages than a failed handshake would give.
  if (auto ok = certs::check_key_matches(identity); !ok) {
    return make_error(errc::invalid_argument, key_label + " does not belong to " + cert_label);
  }
  auto info = certs::inspect(identity.cert_pem);
  if (!info)
    return make_error(errc::invalid_argument, cert_label + ": " + info.err().message);
  auto own = check_tls_identity(identity, ca_pem, cert_label);
  if (!own)
    return std::move(own).err();

  auto config = std::make_unique<tls_config>(
    token{}, kj::TlsKeypair{kj::mv(KJ_ASSERT_NONNULL(key)), kj::mv(KJ_ASSERT_NONNULL(cert))},
    kj::mv(*trusted), std::move(own->common_name), std::move(own->thumbprint));
  config->problem_ = std::move(own->problem);

  kj::TlsContext::Options options;
  options.useSystemTrustStore = false;
  options.verifyClients = role == tls_role::server_verify_clients;
  options.trustedCertificates = config->trusted_.asPtr();
  options.minVersion = kj::TlsVersion::TLS_1_2;
  options.defaultKeypair = config->keypair_;
  if (timer != nullptr) {
    options.timer = *timer;
    options.acceptTimeout = 10 * kj::SECONDS;
  }
  KJ_IF_MAYBE (e, kj::runCatchingExceptions(
                    [&] { config->context_ = kj::heap<kj::TlsContext>(kj::mv(options)); })) {
    return make_error(errc::failed, cert_label + ": cannot set up TLS: " + describe(*e));
  }
  return config;
}

expected<tls_pem> read_tls_files(const tls_files& files) {
  tls_pem out;
  out.cert_label = "node certificate " + files.cert_path;
  out.key_label = "node key " + files.key_path;
  out.ca_label = "CA certificate " + files.ca_path;
  auto read = [](const std::string& path, const std::string& label,
                 std::string& out_text) -> expected<void> {
    auto text = certs::read_file(path);
    if (!text) {
      // certs::read_file says "cannot read <path>: <reason>"; the label names the path already.
      auto message = text.err().message;
      auto prefix = "cannot read " + path + ": ";
      if (message.rfind(prefix, 0) == 0)
        message = "cannot read: " + message.substr(prefix.size());
      return make_error(text.err().code, label + ": " + message);
    }
    out_text = std::move(*text);
    return {};
  };
  if (auto ok = read(files.cert_path, out.cert_label, out.identity.cert_pem); !ok)
    return std::move(ok).err();
  if (auto ok = read(files.key_path, out.key_label, out.identity.key_pem); !ok)
    return std::move(ok).err();
  if (auto ok = read(files.ca_path, out.ca_label, out.ca_pem); !ok)
    return std::move(ok).err();
  return out;
}

expected<tls_identity> check_tls_identity(const certs::key_and_cert& identity,
                                          const std::string& ca_pem,
                                          const std::string& cert_label) {
  // The chain must hold; the validity period is reported, not enforced: a node
  // whose certificate expired keeps running (offline), its links refused.
  auto cn = certs::verify_chain(identity.cert_pem, ca_pem);
  if (!cn)
    return make_error(errc::invalid_argument, cert_label + ": " + cn.err().message);
  tls_identity out;
  out.common_name = std::move(*cn);
  if (auto now_ok = certs::verify(identity.cert_pem, ca_pem, std::chrono::system_clock::now());
      !now_ok) {
    out.problem = cert_label + ": " + now_ok.err().message;
  }
  auto thumbprint = certs::thumbprint_sha256(identity.cert_pem);
  if (!thumbprint)
    return make_error(errc::invalid_argument, cert_label + ": " + thumbprint.err().message);
  out.thumbprint = std::move(*thumbprint);
  return out;
}

expected<kj::Array<kj::TlsCertificate>> parse_trust_anchors(const std::string& ca_pem,
                                                            const std::string& label) {
  auto blocks = split_certificates(ca_pem);
  if (blocks.empty())
    return make_error(errc::invalid_argument, label + ": no PEM certificate found");
  kj::Vector<kj::TlsCertificate> trusted;
  for (std::size_t i = 0; i < blocks.size(); ++i) {
    KJ_IF_MAYBE (e, kj::runCatchingExceptions(
                      [&] { trusted.add(kj::TlsCertificate(as_kj(blocks[i]))); })) {
      return make_error(errc::invalid_argument, label + ": cannot parse certificate #" +
                                                  std::to_string(i + 1) + ": " + describe(*e));
    }
  }
  return trusted.releaseAsArray();
}

std::string peer_common_name(kj::AuthenticatedStream& stream) {
  auto* identity = dynamic_cast<kj::TlsPeerIdentity*>(stream.peerIdentity.get());
  if (identity == nullptr || !identity->hasCertificate())
    return "";
  std::string out;
  KJ_IF_MAYBE (e, kj::runCatchingExceptions([&] {
                 auto cn = identity->getCommonName();
                 out.assign(cn.cStr(), cn.size());
               })) {
    (void) e;  // a certificate without a CN
    return "";
  }
  return out;
}

}  // namespace canopy
