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
  std::string cert_label = "node certificate " + files.cert_path;
  std::string key_label = "node key " + files.key_path;
  std::string ca_label = "CA certificate " + files.ca_path;
  auto read = [](const std::string& path, const std::string& label) -> expected<std::string> {
    auto text = certs::read_file(path);
    if (!text) {
      // certs::read_file says "cannot read <path>: <reason>"; the label names the path already.
      auto message = text.err().message;
      auto prefix = "cannot read " + path + ": ";
      if (message.rfind(prefix, 0) == 0)
        message = "cannot read: " + message.substr(prefix.size());
      return make_error(text.err().code, label + ": " + message);
    }
    return text;
  };
  auto cert_pem = read(files.cert_path, cert_label);
  if (!cert_pem)
    return std::move(cert_pem).err();
  auto key_pem = read(files.key_path, key_label);
  if (!key_pem)
    return std::move(key_pem).err();
  auto ca_pem = read(files.ca_path, ca_label);
  if (!ca_pem)
    return std::move(ca_pem).err();
  return build(certs::key_and_cert{std::move(*cert_pem), std::move(*key_pem)}, *ca_pem, role, timer,
               cert_label, key_label, ca_label);
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
  // The chain must hold; the validity period is checked separately: a node
  // whose certificate expired keeps running (offline), its links refused.
  auto info = certs::inspect(identity.cert_pem);
  if (!info)
    return make_error(errc::invalid_argument, cert_label + ": " + info.err().message);
  auto cn = certs::verify_chain(identity.cert_pem, ca_pem);
  if (!cn)
    return make_error(errc::invalid_argument, cert_label + ": " + cn.err().message);
  std::string problem;
  if (auto now_ok = certs::verify(identity.cert_pem, ca_pem, std::chrono::system_clock::now()); !now_ok)
    problem = cert_label + ": " + now_ok.err().message;
  auto thumbprint = certs::thumbprint_sha256(identity.cert_pem);
  if (!thumbprint)
    return make_error(errc::invalid_argument, cert_label + ": " + thumbprint.err().message);

  auto config = std::make_unique<tls_config>(
    token{}, kj::TlsKeypair{kj::mv(KJ_ASSERT_NONNULL(key)), kj::mv(KJ_ASSERT_NONNULL(cert))},
    kj::mv(*trusted), std::move(*cn), std::move(*thumbprint));
  config->problem_ = std::move(problem);

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
