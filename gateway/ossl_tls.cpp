#include "gateway/ossl_tls.hpp"

#include "gateway/x509_text.hpp"

#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <openssl/x509_vfy.h>

#include <kj/debug.h>

#include <sys/ioctl.h>

#include <algorithm>
#include <cstring>
#include <utility>

// How the TLS engine meets the kj stream (the "memory BIO" question).
//
// OpenSSL offers two ready-made ways to run TLS over I/O it does not own:
//   - SSL_set_bio() with two BIO_s_mem(): each keeps a BUF_MEM that grows to the
//     largest burst it ever held and never shrinks (BIO_reset() only rewinds), so
//     a connection that once received or sent a 16 KiB record keeps ~2 x 16 KiB
//     for the rest of its life — and everything is copied once more through it;
//   - BIO_new_bio_pair(): two fixed ring buffers (17 KiB each by default),
//     malloc'ed when the pair is made and kept until the pair is freed — the
//     per-connection cost we are here to avoid (kj-tls holds 2 x 8 KiB).
// So we use a third, equally standard pattern: a BIO_METHOD of our own
// (BIO_meth_new) whose read callback hands OpenSSL the ciphertext the stream has
// just read from the raw kj stream, and whose write callback appends OpenSSL's
// output to a vector the stream then writes to the raw stream. Both buffers
// exist only while bytes are in transit: an idle connection holds neither, only
// the 512-byte array its pending raw read lands in (small messages need no heap
// buffer at all). The BIO never blocks: reads with nothing buffered say "retry"
// (SSL_ERROR_WANT_READ, the stream then reads the raw stream), writes always
// succeed (so SSL_ERROR_WANT_WRITE cannot happen; instead writes are fed to
// SSL_write_ex one record at a time and each waits until its ciphertext is
// written, which bounds the buffered ciphertext to a record).
//
// Memory held by OpenSSL per connection: SSL_MODE_RELEASE_BUFFERS frees its
// 16 KiB read and write record buffers whenever no record is half read or
// half written; no session cache and no tickets (TLS 1.2 SSL_OP_NO_TICKET, TLS
// 1.3 num_tickets 0), so a session is never kept after its connection and no
// NewSessionTicket is sent. Resumption would save devices ~1 ms of handshake CPU
// on reconnect, at the cost of server memory (cache) or of re-deriving peer
// facts from a ticket the verify callback never sees; every connection is a full
// handshake instead, which also re-checks the certificate each time.

namespace canopy {

namespace detail {

/// What every stream of a context needs from it: the SSL_CTX (reference-counted
/// by OpenSSL too) and the BIO method (which must outlive every BIO made from it).
struct tls_core {
  SSL_CTX* ctx = nullptr;
  BIO_METHOD* method = nullptr;

  tls_core() = default;
  tls_core(const tls_core&) = delete;
  tls_core& operator=(const tls_core&) = delete;
  ~tls_core() {
    SSL_CTX_free(ctx);
    BIO_meth_free(method);
  }
};

}  // namespace detail

namespace {

/// Largest plaintext per SSL_write_ex: one full TLS record.
constexpr size_t max_record_plaintext = 16 * 1024;
/// Raw read buffer while a burst is arriving: a whole record (16 KiB + TLS 1.3
/// overhead 22 B, TLS 1.2 CBC at most 16 KiB + 2 KiB is read in two gulps).
constexpr size_t large_input_size = 17 * 1024;
/// Largest certificate chain a client may send (OpenSSL's default is 100 KiB);
/// device chains are 1-6 KiB. Bounds what one handshake can make us allocate.
constexpr long max_client_chain = 32 * 1024;
/// A fixed BIO type (below BIO_TYPE_START, unused by OpenSSL): BIO_get_new_index()
/// would use up one of OpenSSL's ~127 dynamic indices per context, and contexts
/// are rebuilt whenever certificates are renewed.
constexpr int bio_type = 0x7e | BIO_TYPE_SOURCE_SINK;

template <auto Free>
struct ossl_free {
  template <class T>
  void operator()(T* p) const noexcept {
    Free(p);
  }
};
using bio_ptr = std::unique_ptr<BIO, ossl_free<&BIO_free>>;
using x509_ptr = x509_text::x509_ptr;
using pkey_ptr = std::unique_ptr<EVP_PKEY, ossl_free<&EVP_PKEY_free>>;

/// This thread's OpenSSL error queue as one line of reasons ("no shared cipher;
/// ..."), drained. `fallback` if it is empty.
std::string drain_errors(const char* fallback) {
  std::string out;
  while (unsigned long e = ERR_get_error()) {
    const char* reason = ERR_reason_error_string(e);
    std::string text;
    if (reason != nullptr) {
      text = reason;
    } else {
      char buf[256];
      ERR_error_string_n(e, buf, sizeof(buf));
      text = buf;
    }
    if (out.find(text) != std::string::npos)
      continue;  // OpenSSL often queues the same reason at several levels
    if (!out.empty())
      out += "; ";
    out += text;
  }
  return out.empty() ? std::string(fallback) : out;
}

/// A kj exception for a failed SSL call: "<what>: <OpenSSL's reasons>".
kj::Exception ssl_exception(kj::Exception::Type type, const char* what, int ssl_error) {
  std::string reason;
  switch (ssl_error) {
    case SSL_ERROR_SSL:
      reason = drain_errors("protocol error");
      break;
    case SSL_ERROR_SYSCALL:
      // Our BIO never reports an end of stream; this is a failed BIO write (out of memory).
      reason = drain_errors("internal I/O error");
      break;
    case SSL_ERROR_WANT_READ:
      reason = "OpenSSL needs to read first (renegotiation is disabled; this is a bug)";
      ERR_clear_error();
      break;
    default:
      reason = drain_errors(("SSL error " + std::to_string(ssl_error)).c_str());
      break;
  }
  return kj::Exception(type, __FILE__, __LINE__, kj::str(what, ": ", reason.c_str()));
}

/// Every certificate in `pem`; errors name `label` and the certificate's position.
expected<std::vector<x509_ptr>> parse_certificates(const std::string& pem,
                                                   const std::string& label) {
  ERR_clear_error();
  if (pem.find("-----BEGIN CERTIFICATE-----") == std::string::npos)
    return make_error(errc::invalid_argument, label + ": no PEM certificate found");
  std::vector<x509_ptr> out;
  switch (x509_text::read_pem_certificates(pem, out)) {
    case x509_text::pem_read::end:
      return out;
    case x509_text::pem_read::out_of_memory:
      return make_error(errc::failed, label + ": " + drain_errors("out of memory"));
    case x509_text::pem_read::bad_block:
      break;
  }
  return make_error(errc::invalid_argument, label + ": cannot parse certificate #" + std::to_string(out.size() + 1) +
                                              ": " + drain_errors("not a PEM certificate"));
}

expected<pkey_ptr> parse_private_key(const std::string& pem, const std::string& label) {
  ERR_clear_error();
  bio_ptr bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
  if (!bio)
    return make_error(errc::failed, label + ": " + drain_errors("out of memory"));
  // An empty pass phrase: never prompt on the terminal for an encrypted key.
  pkey_ptr key(PEM_read_bio_PrivateKey(bio.get(), nullptr, nullptr, const_cast<char*>("")));
  if (!key) {
    return make_error(errc::invalid_argument, label + ": cannot parse: " +
                                                drain_errors("not an unencrypted PEM private key"));
  }
  return key;
}

}  // namespace

// --- Callbacks from OpenSSL --------------------------------------------------------

/// The BIO and certificate-verification callbacks (friends of tls_server_stream).
/// None may throw: they run inside OpenSSL's C code.
struct tls_callbacks {
  static tls_server_stream* stream_of(BIO* bio) {
    return static_cast<tls_server_stream*>(BIO_get_data(bio));
  }

  static int bio_create(BIO* bio) {
    BIO_set_init(bio, 1);
    return 1;
  }

  static int bio_destroy(BIO* bio) {
    BIO_set_data(bio, nullptr);
    return 1;
  }

  static int bio_read(BIO* bio, char* out, size_t size, size_t* read) {
    BIO_clear_retry_flags(bio);
    auto* s = stream_of(bio);
    if (s == nullptr || s->in_left_ == 0) {
      BIO_set_retry_read(bio);  // SSL_ERROR_WANT_READ: the stream reads the raw stream
      *read = 0;
      return 0;
    }
    size_t n = std::min(size, s->in_left_);
    std::memcpy(out, s->in_next_, n);
    s->track_record_framing(s->in_next_, n);
    s->in_next_ += n;
    s->in_left_ -= n;
    *read = n;
    return 1;
  }

  static int bio_write(BIO* bio, const char* data, size_t size, size_t* written) {
    BIO_clear_retry_flags(bio);
    auto* s = stream_of(bio);
    *written = 0;
    if (s == nullptr)
      return 0;
    try {
      auto* bytes = reinterpret_cast<const kj::byte*>(data);
      s->out_.insert(s->out_.end(), bytes, bytes + size);
    } catch (...) {
      return 0;  // out of memory: SSL_ERROR_SYSCALL
    }
    *written = size;
    return 1;
  }

  static long bio_ctrl(BIO* bio, int cmd, long, void*) {
    switch (cmd) {
      case BIO_CTRL_FLUSH:
        return 1;  // the stream flushes after every SSL call
      case BIO_CTRL_PENDING: {
        auto* s = stream_of(bio);
        return s == nullptr ? 0 : static_cast<long>(s->in_left_);
      }
      default:
        return 0;  // BIO_CTRL_EOF: never (the stream handles the raw end itself), WPENDING: 0, ...
    }
  }

  /// SSL_VERIFY_PEER callback: records the first problem with the client's chain
  /// (and any error still set at the final depth-0 call), never fails the
  /// handshake. Whether the certificate is acceptable is the caller's decision,
  /// made from tls_peer.
  static int verify(int preverify_ok, X509_STORE_CTX* store) {
    try {
      auto* ssl =
        static_cast<SSL*>(X509_STORE_CTX_get_ex_data(store, SSL_get_ex_data_X509_STORE_CTX_idx()));
      auto* s = ssl == nullptr ? nullptr : static_cast<tls_server_stream*>(SSL_get_app_data(ssl));
      if (s == nullptr)
        return 1;  // cannot happen; SSL_get_verify_result() still holds the result
      int depth = X509_STORE_CTX_get_error_depth(store);
      int error = X509_STORE_CTX_get_error(store);
      if (preverify_ok == 1 && !(depth == 0 && error != X509_V_OK))
        return 1;
      if (error == X509_V_OK)
        error = X509_V_ERR_UNSPECIFIED;
      X509* bad = X509_STORE_CTX_get_current_cert(store);
      std::string detail = x509_text::verify_error(error, depth, bad);
      s->note_verify_failure(error, depth, detail);
    } catch (...) {
      // Out of memory while describing the problem: record_peer() falls back on
      // SSL_get_verify_result().
    }
    return 1;
  }
};

// --- tls_server_context ------------------------------------------------------------

tls_server_context::tls_server_context(token, std::shared_ptr<const detail::tls_core> core,
                                       std::string common_name, std::string thumbprint,
                                       std::string problem)
    : core_(std::move(core)),
      common_name_(std::move(common_name)),
      thumbprint_(std::move(thumbprint)),
      problem_(std::move(problem)) {}

tls_server_context::~tls_server_context() = default;

expected<std::unique_ptr<tls_server_context>> tls_server_context::load(const tls_files& files) {
  auto pem = read_tls_files(files);
  if (!pem)
    return std::move(pem).err();
  return build(pem->identity, pem->ca_pem, pem->cert_label, pem->key_label, pem->ca_label);
}

expected<std::unique_ptr<tls_server_context>> tls_server_context::from_pem(
  const certs::key_and_cert& identity, const std::string& ca_pem) {
  return build(identity, ca_pem, "node certificate", "node key", "CA certificate");
}

expected<std::unique_ptr<tls_server_context>> tls_server_context::build(
  const certs::key_and_cert& identity, const std::string& ca_pem, const std::string& cert_label,
  const std::string& key_label, const std::string& ca_label) {
  auto chain = parse_certificates(identity.cert_pem, cert_label);
  if (!chain)
    return std::move(chain).err();
  auto key = parse_private_key(identity.key_pem, key_label);
  if (!key)
    return std::move(key).err();
  auto anchors = parse_certificates(ca_pem, ca_label);
  if (!anchors)
    return std::move(anchors).err();
  if (X509_check_private_key(chain->front().get(), key->get()) != 1) {
    ERR_clear_error();
    return make_error(errc::invalid_argument, key_label + " does not belong to " + cert_label);
  }
  // The chain must hold; the validity period is reported, not enforced, so that
  // a node whose certificate expired keeps running (as tls_config does).
  auto own = check_tls_identity(identity, ca_pem, cert_label);
  if (!own)
    return std::move(own).err();

  auto core = std::make_shared<detail::tls_core>();
  auto fail = [&](const std::string& what) {
    return make_error(errc::failed, cert_label + ": cannot set up TLS (" + what +
                                      "): " + drain_errors("unknown OpenSSL error"));
  };
  ERR_clear_error();
  core->method = BIO_meth_new(bio_type, "canopy kj stream");
  if (core->method == nullptr ||
      BIO_meth_set_create(core->method, &tls_callbacks::bio_create) != 1 ||
      BIO_meth_set_destroy(core->method, &tls_callbacks::bio_destroy) != 1 ||
      BIO_meth_set_read_ex(core->method, &tls_callbacks::bio_read) != 1 ||
      BIO_meth_set_write_ex(core->method, &tls_callbacks::bio_write) != 1 ||
      BIO_meth_set_ctrl(core->method, &tls_callbacks::bio_ctrl) != 1) {
    return fail("BIO method");
  }
  SSL_CTX* ctx = SSL_CTX_new(TLS_server_method());
  if (ctx == nullptr)
    return fail("SSL_CTX_new");
  core->ctx = ctx;
  // No system trust store: only the given anchors (SSL_CTX_set_default_verify_paths is never
  // called).
  if (SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION) != 1)
    return fail("minimum version");
  SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION | SSL_OP_NO_TICKET |
                             SSL_OP_CIPHER_SERVER_PREFERENCE | SSL_OP_NO_COMPRESSION);
  SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS);
  SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
  if (SSL_CTX_set_num_tickets(ctx, 0) != 1)
    return fail("tickets");
  static constexpr unsigned char sid_context[] = "canopy-tls-server";
  if (SSL_CTX_set_session_id_context(ctx, sid_context, sizeof(sid_context) - 1) != 1)
    return fail("session id context");
  SSL_CTX_set_max_cert_list(ctx, max_client_chain);
  if (SSL_CTX_use_certificate(ctx, chain->front().get()) != 1)
    return fail("certificate");
  for (size_t i = 1; i < chain->size(); ++i) {
    if (SSL_CTX_add1_chain_cert(ctx, (*chain)[i].get()) != 1)
      return fail("intermediate certificate #" + std::to_string(i + 1));
  }
  if (SSL_CTX_use_PrivateKey(ctx, key->get()) != 1 || SSL_CTX_check_private_key(ctx) != 1)
    return fail("private key");
  X509_STORE* store = SSL_CTX_get_cert_store(ctx);
  for (size_t i = 0; i < anchors->size(); ++i) {
    if (X509_STORE_add_cert(store, (*anchors)[i].get()) != 1)
      return fail("CA certificate #" + std::to_string(i + 1));
  }
  // Ask for a client certificate, do not require one (no
  // SSL_VERIFY_FAIL_IF_NO_PEER_CERT), and let the callback accept any chain: the
  // client still proves it holds the key (CertificateVerify), and the caller
  // checks chain_ok or the thumbprint. No CA names are sent in the request, so
  // clients offer self-signed certificates too.
  SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, &tls_callbacks::verify);

  return std::make_unique<tls_server_context>(token{}, std::move(core), std::move(own->common_name),
                                              std::move(own->thumbprint), std::move(own->problem));
}

kj::Promise<kj::Own<tls_server_stream>> tls_server_context::accept(
  kj::Own<kj::AsyncIoStream> raw, kj::Timer& timer, kj::Duration handshake_timeout) const {
  auto stream = kj::heap<tls_server_stream>(tls_server_stream::token{}, core_, kj::mv(raw));
  if (!stream->init())
    return ssl_exception(kj::Exception::Type::FAILED, "TLS: cannot set up a connection",
                         SSL_ERROR_SSL);
  auto& ref = *stream;
  auto done = kj::evalNow([&] {
                return ref.handshake();
              }).then([stream = kj::mv(stream)]() mutable { return kj::mv(stream); });
  auto ms = handshake_timeout / kj::MILLISECONDS;
  auto expired =
    timer.afterDelay(handshake_timeout).then([ms]() -> kj::Promise<kj::Own<tls_server_stream>> {
      return KJ_EXCEPTION(OVERLOADED, kj::str("TLS handshake not finished within ", ms, " ms"));
    });
  return done.exclusiveJoin(kj::mv(expired));
}

// --- tls_server_stream: set-up and handshake ----------------------------------------

tls_server_stream::tls_server_stream(token, std::shared_ptr<const detail::tls_core> core,
                                     kj::Own<kj::AsyncIoStream> raw)
    : core_(std::move(core)), raw_(kj::mv(raw)) {}

tls_server_stream::~tls_server_stream() {
  sender_ = nullptr;  // cancels a raw write in flight (it points into raw_)
  if (ssl_ != nullptr)
    SSL_free(ssl_);  // frees the BIO too; core_ (its method) is released after
}

bool tls_server_stream::init() {
  ERR_clear_error();
  ssl_ = SSL_new(core_->ctx);
  if (ssl_ == nullptr)
    return false;
  BIO* bio = BIO_new(core_->method);
  if (bio == nullptr)
    return false;
  BIO_set_data(bio, this);
  SSL_set_bio(ssl_, bio, bio);  // one BIO for both directions; the SSL owns it
  SSL_set_app_data(ssl_, this);
  SSL_set_accept_state(ssl_);
  return true;
}

kj::Promise<void> tls_server_stream::handshake() {
  ERR_clear_error();
  int r = SSL_do_handshake(ssl_);
  int err = r == 1 ? SSL_ERROR_NONE : SSL_get_error(ssl_, r);
  release_drained_input();
  if (err == SSL_ERROR_NONE) {
    record_peer();
    return flush();
  }
  if (err == SSL_ERROR_ZERO_RETURN) {
    return KJ_EXCEPTION(DISCONNECTED, "the client closed the connection during the TLS handshake");
  }
  if (err == SSL_ERROR_WANT_READ) {
    return flush().then([this] { return fill_input(); }).then([this](bool eof) {
      if (eof) {
        return kj::Promise<void>(
          KJ_EXCEPTION(DISCONNECTED, "the client closed the connection during the TLS handshake"));
      }
      return handshake();
    });
  }
  auto failure = ssl_exception(kj::Exception::Type::FAILED, "TLS handshake failed", err);
  // Let the client see the alert OpenSSL queued (if the socket takes it), then fail.
  return flush().then([] {}, [](kj::Exception&&) {}).then([failure = kj::mv(failure)]() mutable {
    return kj::Promise<void>(kj::mv(failure));
  });
}

void tls_server_stream::note_verify_failure(int error, int depth, const std::string& detail) {
  (void) depth;  // part of `detail` when it matters
  if (verify_error_ != X509_V_OK)
    return;  // keep the first: later ones follow from it
  verify_error_ = error;
  verify_detail_ = detail;
}

void tls_server_stream::record_peer() {
  peer_ = tls_peer{};
  X509* cert = SSL_get0_peer_certificate(ssl_);
  if (cert != nullptr) {
    peer_.has_cert = true;
    peer_.common_name = x509_text::common_name(X509_get_subject_name(cert));
    peer_.thumbprint_sha256_hex = x509_text::thumbprint_sha256(cert);
    peer_.thumbprint_sha1_hex = x509_text::thumbprint_sha1(cert);
    ERR_clear_error();
    long result = SSL_get_verify_result(ssl_);
    if (verify_error_ != X509_V_OK)
      peer_.chain_error = verify_detail_;
    else if (result != X509_V_OK)
      peer_.chain_error = X509_verify_cert_error_string(result);
    peer_.chain_ok = peer_.chain_error.empty();
  }
  verify_detail_ = std::string();  // frees it
}

const char* tls_server_stream::protocol_version() const {
  return SSL_get_version(ssl_);
}

const char* tls_server_stream::cipher() const {
  return SSL_CIPHER_get_name(SSL_get_current_cipher(ssl_));
}

// --- Reading -----------------------------------------------------------------------

void tls_server_stream::track_record_framing(const kj::byte* data, size_t size) {
  while (size > 0) {
    if (body_left_ > 0) {
      size_t n = std::min(size, body_left_);
      body_left_ -= n;
      data += n;
      size -= n;
      continue;
    }
    header_[header_have_++] = *data++;
    --size;
    if (header_have_ == sizeof(header_)) {
      body_left_ = (size_t(header_[3]) << 8) | header_[4];
      header_have_ = 0;
    }
  }
}

kj::Promise<bool> tls_server_stream::fill_input() {
  KJ_IREQUIRE(in_left_ == 0, "ciphertext left unread");
  // Idle, or small records arriving: the inline buffer, so that a connection
  // waiting for its next packet holds no heap buffer. A big record under way, or
  // a burst (the last read filled its buffer and more is already in the socket):
  // a heap buffer of up to one record, freed as soon as OpenSSL has taken it.
  const size_t record_rest = body_left_ + (header_have_ > 0 ? sizeof(header_) - header_have_ : 0);
  size_t heap_size = 0;
  if (record_rest > sizeof(in_small_)) {
    heap_size = std::min(record_rest + sizeof(in_small_), large_input_size);
  } else if (last_fill_full_) {
    heap_size = large_input_size;
    KJ_IF_MAYBE (fd, raw_->getFd()) {
      // Only if the burst goes on: a connection whose last read happened to fill
      // the buffer exactly may be idle now.
      int available = 0;
      if (::ioctl(*fd, FIONREAD, &available) == 0) {
        heap_size =
          size_t(available) > sizeof(in_small_) ? std::min(size_t(available), large_input_size) : 0;
      }
    }
  }
  kj::byte* target = in_small_;
  size_t capacity = sizeof(in_small_);
  if (heap_size > 0) {
    in_heap_ = kj::heapArray<kj::byte>(heap_size);
    target = in_heap_.begin();
    capacity = in_heap_.size();
  }
  return raw_->tryRead(target, 1, capacity).then([this, target, capacity](size_t n) {
    last_fill_full_ = n == capacity;
    if (n == 0) {
      in_heap_ = nullptr;
      return true;
    }
    in_next_ = target;
    in_left_ = n;
    return false;
  });
}

void tls_server_stream::release_drained_input() {
  if (in_left_ == 0) {
    in_next_ = nullptr;
    in_heap_ = nullptr;
  }
}

kj::Promise<size_t> tls_server_stream::tryRead(void* buffer, size_t min_bytes, size_t max_bytes) {
  return kj::evalNow(
    [&] { return read_loop(static_cast<kj::byte*>(buffer), min_bytes, max_bytes, 0); });
}

kj::Promise<size_t> tls_server_stream::read_loop(kj::byte* buffer, size_t min_bytes,
                                                 size_t max_bytes, size_t done) {
  while (done < max_bytes && !read_eof_) {
    ERR_clear_error();
    size_t n = 0;
    int r = SSL_read_ex(ssl_, buffer + done, max_bytes - done, &n);
    int err = r == 1 ? SSL_ERROR_NONE : SSL_get_error(ssl_, r);
    release_drained_input();
    start_sender();  // reading may have produced output (a KeyUpdate answer, an alert)
    if (err == SSL_ERROR_NONE) {
      done += n;
      continue;
    }
    if (err == SSL_ERROR_ZERO_RETURN) {  // close_notify
      read_eof_ = true;
      break;
    }
    if (err != SSL_ERROR_WANT_READ)
      return ssl_exception(kj::Exception::Type::FAILED, "TLS read failed", err);
    if (done >= min_bytes)
      return done;
    return fill_input().then(
      [this, buffer, min_bytes, max_bytes, done](bool eof) -> kj::Promise<size_t> {
        if (!eof)
          return read_loop(buffer, min_bytes, max_bytes, done);
        if (header_have_ > 0 || body_left_ > 0) {
          return KJ_EXCEPTION(DISCONNECTED, "TLS: the connection ended in the middle of a record");
        }
        read_eof_ = true;  // between records, without close_notify
        return done;
      });
  }
  return done;
}

// --- Writing -----------------------------------------------------------------------

void tls_server_stream::check_writable() const {
  if (write_error_.get() != nullptr)
    kj::throwFatalException(kj::cp(*write_error_));
  if (shutdown_requested_)
    kj::throwFatalException(KJ_EXCEPTION(FAILED, "TLS: write after shutdownWrite()"));
}

void tls_server_stream::encrypt(const kj::byte* data, size_t size) {
  ERR_clear_error();
  size_t written = 0;
  int r = SSL_write_ex(ssl_, data, size, &written);
  if (r == 1 && written == size)
    return;
  int err = SSL_get_error(ssl_, r);
  start_sender();  // an alert, if OpenSSL queued one
  kj::throwFatalException(ssl_exception(kj::Exception::Type::FAILED, "TLS write failed", err));
}

kj::Promise<void> tls_server_stream::write(const void* buffer, size_t size) {
  return kj::evalNow([&] { return write_loop(static_cast<const kj::byte*>(buffer), size); });
}

kj::Promise<void> tls_server_stream::write_loop(const kj::byte* data, size_t size) {
  if (size == 0)
    return kj::READY_NOW;
  check_writable();
  size_t chunk = std::min(size, max_record_plaintext);
  encrypt(data, chunk);
  return flush().then([this, data, size, chunk] { return write_loop(data + chunk, size - chunk); });
}

kj::Promise<void> tls_server_stream::write(
  kj::ArrayPtr<const kj::ArrayPtr<const kj::byte>> pieces) {
  return kj::evalNow([&] { return write_pieces(pieces, 0, 0); });
}

kj::Promise<void> tls_server_stream::write_pieces(
  kj::ArrayPtr<const kj::ArrayPtr<const kj::byte>> pieces, size_t index, size_t offset) {
  while (index < pieces.size() && offset == pieces[index].size()) {
    ++index;
    offset = 0;
  }
  if (index == pieces.size())
    return kj::READY_NOW;
  check_writable();
  size_t rest = pieces[index].size() - offset;
  size_t following = 0;  // plaintext in the pieces after this one, up to a record
  for (size_t i = index + 1; i < pieces.size() && following < max_record_plaintext; ++i)
    following += pieces[i].size();
  if (rest >= max_record_plaintext || following == 0) {
    // This record's plaintext is all in one piece: encrypt it from there.
    size_t chunk = std::min(rest, max_record_plaintext);
    encrypt(pieces[index].begin() + offset, chunk);
    offset += chunk;
  } else {
    // Gather small pieces into one record (one header and tag, not one per piece).
    std::vector<kj::byte> record;
    record.reserve(std::min(rest + following, max_record_plaintext));
    while (index < pieces.size() && record.size() < max_record_plaintext) {
      size_t take = std::min(pieces[index].size() - offset, max_record_plaintext - record.size());
      record.insert(record.end(), pieces[index].begin() + offset,
                    pieces[index].begin() + offset + take);
      offset += take;
      if (offset == pieces[index].size()) {
        ++index;
        offset = 0;
      }
    }
    encrypt(record.data(), record.size());
  }
  return flush().then(
    [this, pieces, index, offset] { return write_pieces(pieces, index, offset); });
}

kj::Promise<void> tls_server_stream::flush() {
  if (write_error_.get() != nullptr)
    return kj::cp(*write_error_);
  start_sender();
  if (!sending_)
    return kj::READY_NOW;
  auto paf = kj::newPromiseAndFulfiller<void>();
  flushed_.add(kj::mv(paf.fulfiller));
  return kj::mv(paf.promise);
}

void tls_server_stream::start_sender() {
  if (sending_ || out_.empty() || write_error_.get() != nullptr)
    return;
  sending_ = true;
  // Never reassigned while its own continuation runs: sending_ stays true until
  // the loop's last step, and waiters resume only on a later turn of the loop.
  sender_ = kj::evalNow([this] { return send_next(); }).eagerlyEvaluate([this](kj::Exception&& e) {
    on_send_failed(kj::mv(e));
  });
}

kj::Promise<void> tls_server_stream::send_next() {
  std::vector<kj::byte> chunk;
  chunk.swap(out_);  // new output goes to a fresh (unallocated) out_ meanwhile
  // kj's socket streams throw from write() itself when the write fails at once
  // (EPIPE): make that a rejection, so that on_send_failed() sees it.
  auto written = kj::evalNow([&] { return raw_->write(chunk.data(), chunk.size()); });
  return written.attach(kj::mv(chunk)).then([this]() -> kj::Promise<void> {
    if (!out_.empty())
      return send_next();
    sending_ = false;
    auto waiters = kj::mv(flushed_);
    for (auto& w : waiters)
      w->fulfill();
    if (shutdown_requested_)
      shut_raw_write();
    return kj::READY_NOW;
  });
}

void tls_server_stream::on_send_failed(kj::Exception&& e) {
  sending_ = false;
  out_ = std::vector<kj::byte>();
  write_error_ = kj::heap<kj::Exception>(kj::cp(e));
  auto waiters = kj::mv(flushed_);
  for (auto& w : waiters)
    w->reject(kj::cp(e));
}

void tls_server_stream::shut_raw_write() {
  if (raw_write_shut_)
    return;
  raw_write_shut_ = true;
  // A socket the peer has reset refuses shutdown(); there is nothing left to close then.
  KJ_IF_MAYBE (e, kj::runCatchingExceptions([this] { raw_->shutdownWrite(); })) {
    if (write_error_.get() == nullptr)
      write_error_ = kj::heap<kj::Exception>(kj::mv(*e));
  }
}

kj::Promise<void> tls_server_stream::whenWriteDisconnected() {
  return raw_->whenWriteDisconnected();
}

void tls_server_stream::shutdownWrite() {
  if (shutdown_requested_)
    return;
  shutdown_requested_ = true;
  if (write_error_.get() == nullptr) {
    ERR_clear_error();
    SSL_shutdown(ssl_);  // queues close_notify; 0 ("the client's not seen yet") is fine
    ERR_clear_error();
  }
  start_sender();
  if (!sending_)
    shut_raw_write();
}

void tls_server_stream::abortRead() {
  raw_->abortRead();
}

void tls_server_stream::getsockopt(int level, int option, void* value, kj::uint* length) {
  raw_->getsockopt(level, option, value, length);
}

void tls_server_stream::setsockopt(int level, int option, const void* value, kj::uint length) {
  raw_->setsockopt(level, option, value, length);
}

void tls_server_stream::getsockname(struct sockaddr* addr, kj::uint* length) {
  raw_->getsockname(addr, length);
}

void tls_server_stream::getpeername(struct sockaddr* addr, kj::uint* length) {
  raw_->getpeername(addr, length);
}

kj::Maybe<int> tls_server_stream::getFd() const {
  return raw_->getFd();
}

}  // namespace canopy
