// canopy::tls_server_context / tls_server_stream — a TLS server written directly
// on OpenSSL 3 over a kj::AsyncIoStream, for the node's MQTT port (issue 5).
//
// Why not kj-tls (gateway/tls.hpp): kj::TlsContext cannot make a client
// certificate optional while still asking for one (verifyClients requires it),
// does not expose its SSL_CTX (no verify callback, so a self-signed device
// certificate cannot get through the handshake to be checked by thumbprint),
// and keeps two fixed 8 KiB buffers per stream. Here:
//   - a client certificate is requested but optional (devices using SAS tokens
//     send none); any certificate the client proves it holds the key of is
//     accepted by the handshake, and peer() says whether it chains to the fleet
//     CA(s) (chain_ok) and why not (chain_error), plus its SHA-256 thumbprint for
//     Azure's "X.509 self-signed" authentication — the caller decides;
//   - an idle connection holds no read or write buffers: OpenSSL's own record
//     buffers are released between records (SSL_MODE_RELEASE_BUFFERS), ciphertext
//     is only buffered while a read or write is under way, and no TLS session is
//     cached or ticketed (every connection is a full handshake, so the server
//     keeps nothing per client after it goes; see ossl_tls.cpp).
//     Measured (tests/gateway/ossl_tls.test.cpp, heap per idle established
//     connection with a read pending, kj socket stream included): ~23 KiB with
//     a client certificate, ~17 KiB without (OpenSSL's SSL object alone is
//     ~8.5 KiB; a parsed client certificate ~5 KiB); kj-tls: ~71 KiB.
//
// Threading: load()/from_pem() may run on any thread. accept() and everything on
// a tls_server_stream belong to the thread of the kj event loop the raw stream and
// timer belong to (the I/O thread). A context may be destroyed while streams it
// accepted are still open (they share what they need with it).
#pragma once

#include "gateway/certs.hpp"
#include "gateway/tls.hpp"  // tls_files
#include "runtime/expected.hpp"

#include <kj/async-io.h>
#include <kj/async.h>
#include <kj/exception.h>
#include <kj/memory.h>
#include <kj/time.h>
#include <kj/timer.h>
#include <kj/vector.h>

#include <cstddef>
#include <memory>
#include <string>
#include <vector>

struct ssl_st;  // OpenSSL's SSL; no OpenSSL header is included here

namespace canopy {

namespace detail {
struct tls_core;  // the SSL_CTX and the BIO method, shared by a context and its streams
}  // namespace detail

/// What the client proved about itself during the TLS handshake.
struct tls_peer {
  /// The client presented a certificate (and proved it holds its key).
  bool has_cert = false;
  /// Subject CN of the client certificate ("" if none or no CN).
  std::string common_name;
  /// SHA-256 of the client certificate's DER, uppercase hex (64 characters), as
  /// certs::thumbprint_sha256() gives it; "" without a certificate.
  std::string thumbprint_sha256_hex;
  /// SHA-1 of the same, uppercase hex (40 characters); "" without a certificate.
  std::string thumbprint_sha1_hex;
  /// The certificate chains to one of the context's CA certificates and every
  /// certificate of the chain is valid now (OpenSSL's usual checks, purpose
  /// "TLS client"). False without a certificate.
  bool chain_ok = false;
  /// Why chain_ok is false although there is a certificate, in OpenSSL's words
  /// with details ("self-signed certificate", "unable to get local issuer
  /// certificate", "certificate has expired (notAfter 2026-01-02T03:04:05Z)");
  /// "" otherwise.
  std::string chain_error;
};

class tls_server_stream;

/// A TLS server identity and policy: the node's certificate (chain) and key, the
/// CA certificate(s) client certificates are checked against, TLS 1.2 or later,
/// a client certificate requested but not required, no renegotiation, no session
/// resumption (no cache, no tickets). Neither copyable nor movable.
class tls_server_context {
 private:
  struct token {};

 public:
  /// Reads the PEM files and builds the context. Checks that the key belongs to
  /// the certificate and that the certificate chains to the CA (ignoring validity
  /// periods: a certificate outside its validity is accepted and reported by
  /// problem()). Errors name the file ("node key /x/gw1.key does not belong to
  /// node certificate /x/gw1.crt", "CA certificate /x/ca.crt: cannot read: ...").
  static expected<std::unique_ptr<tls_server_context>> load(const tls_files& files);

  /// As load(), from PEM text in memory; errors say "node certificate", "node
  /// key" or "CA certificate". `ca_pem` may hold several trust anchors.
  static expected<std::unique_ptr<tls_server_context>> from_pem(const certs::key_and_cert& identity,
                                                                const std::string& ca_pem);

  /// For the factories only (the token is private).
  tls_server_context(token, std::shared_ptr<const detail::tls_core> core, std::string common_name,
                     std::string thumbprint, std::string problem);
  ~tls_server_context();

  tls_server_context(const tls_server_context&) = delete;
  tls_server_context& operator=(const tls_server_context&) = delete;
  tls_server_context(tls_server_context&&) = delete;
  tls_server_context& operator=(tls_server_context&&) = delete;

  /// Runs the server side of a TLS handshake on `raw` (an accepted connection).
  /// Resolves to the established stream, or rejects with a kj::Exception:
  /// DISCONNECTED if the client closes or resets during the handshake, OVERLOADED
  /// if the handshake is not done within `handshake_timeout` ("TLS handshake not
  /// finished within 10000 ms"), FAILED for a protocol error ("TLS handshake
  /// failed: no shared cipher"; "...: tlsv1 alert unknown ca" when the client
  /// refuses our certificate). Dropping the promise closes the connection.
  /// I/O thread; `timer` must belong to the same event loop. Costs one ECDHE
  /// exchange and one signature (plus verifying the client's chain, if any).
  kj::Promise<kj::Own<tls_server_stream>> accept(kj::Own<kj::AsyncIoStream> raw, kj::Timer& timer,
                                                 kj::Duration handshake_timeout) const;

  /// Subject CN of this node's certificate.
  const std::string& common_name() const { return common_name_; }

  /// SHA-256 thumbprint of this node's certificate (uppercase hex).
  const std::string& thumbprint() const { return thumbprint_; }

  /// Why clients will refuse this certificate now although it chains to the CA
  /// ("node certificate /x/gw1.crt: certificate has expired (notAfter ...)"), or
  /// "" if it is valid now.
  const std::string& problem() const { return problem_; }

 private:
  static expected<std::unique_ptr<tls_server_context>> build(const certs::key_and_cert& identity,
                                                             const std::string& ca_pem,
                                                             const std::string& cert_label,
                                                             const std::string& key_label,
                                                             const std::string& ca_label);

  std::shared_ptr<const detail::tls_core> core_;
  std::string common_name_;
  std::string thumbprint_;
  std::string problem_;
};

/// An established TLS connection (server side) over a raw kj stream, made by
/// tls_server_context::accept(). Follows the kj stream contract: at most one
/// tryRead() and one write() in flight at a time, and they may be in flight
/// together. Plaintext is encrypted in records of at most 16 KiB; a write
/// resolves once its ciphertext has been handed to the raw stream (so at most
/// one record of ciphertext is buffered per connection). Failures are kj
/// exceptions: DISCONNECTED for the transport (a reset, an end of stream in the
/// middle of a record), FAILED for TLS protocol errors. I/O thread only.
class tls_server_stream final : public kj::AsyncIoStream {
 private:
  struct token {};
  friend class tls_server_context;
  friend struct tls_callbacks;  // BIO and verify callbacks (ossl_tls.cpp) use the state here

 public:
  /// For tls_server_context::accept() only (the token is private).
  tls_server_stream(token, std::shared_ptr<const detail::tls_core> core,
                    kj::Own<kj::AsyncIoStream> raw);
  ~tls_server_stream();

  tls_server_stream(const tls_server_stream&) = delete;
  tls_server_stream& operator=(const tls_server_stream&) = delete;

  /// Reads and decrypts at least `min_bytes` (unless the stream ends) and at
  /// most `max_bytes`. Returns fewer than `min_bytes` at the end of the stream:
  /// after the client's close_notify, or when the connection ends between two
  /// records without one (many device stacks just close the socket; MQTT frames
  /// its own packets, so truncation is detected above). An end of stream in the
  /// middle of a record is a DISCONNECTED exception.
  kj::Promise<size_t> tryRead(void* buffer, size_t min_bytes, size_t max_bytes) override;

  /// Encrypts `buffer` (in records of at most 16 KiB) and writes it; resolves
  /// once the last record has been written to the raw stream.
  kj::Promise<void> write(const void* buffer, size_t size) override;

  /// As write(buffer, size) for the concatenation of `pieces`; small pieces are
  /// gathered into one record.
  kj::Promise<void> write(kj::ArrayPtr<const kj::ArrayPtr<const kj::byte>> pieces) override;

  /// The raw stream's whenWriteDisconnected().
  kj::Promise<void> whenWriteDisconnected() override;

  /// Sends close_notify, then shuts the raw stream's write side once everything
  /// queued before it has been written. Reading may go on. Later writes fail.
  /// Never throws (a connection already reset has nothing left to shut).
  void shutdownWrite() override;

  /// Shuts the raw stream's read side (after an error).
  void abortRead() override;

  /// Forwarded to the raw stream (e.g. TCP_NODELAY, or the client's address for logs).
  void getsockopt(int level, int option, void* value, kj::uint* length) override;
  /// Forwarded to the raw stream.
  void setsockopt(int level, int option, const void* value, kj::uint length) override;
  /// Forwarded to the raw stream.
  void getsockname(struct sockaddr* addr, kj::uint* length) override;
  /// Forwarded to the raw stream.
  void getpeername(struct sockaddr* addr, kj::uint* length) override;
  /// The raw stream's file descriptor, if it has one.
  kj::Maybe<int> getFd() const override;

  /// What the client proved during the handshake (fixed once accept() resolved).
  const tls_peer& peer() const { return peer_; }

  /// The negotiated protocol version ("TLSv1.3", "TLSv1.2").
  const char* protocol_version() const;

  /// The negotiated cipher suite ("TLS_AES_128_GCM_SHA256").
  const char* cipher() const;

 private:
  bool init();  // creates the SSL object; false (OpenSSL's error queue says why) on failure
  kj::Promise<void> handshake();
  void record_peer();
  void note_verify_failure(int error, int depth, const std::string& detail);

  kj::Promise<bool> fill_input();  // true at the raw stream's end
  void release_drained_input();
  kj::Promise<size_t> read_loop(kj::byte* buffer, size_t min_bytes, size_t max_bytes, size_t done);

  void encrypt(const kj::byte* data, size_t size);
  kj::Promise<void> write_loop(const kj::byte* data, size_t size);
  kj::Promise<void> write_pieces(kj::ArrayPtr<const kj::ArrayPtr<const kj::byte>> pieces,
                                 size_t index, size_t offset);
  void check_writable() const;
  kj::Promise<void> flush();
  void start_sender();
  kj::Promise<void> send_next();
  void on_send_failed(kj::Exception&& e);
  void shut_raw_write();
  void track_record_framing(const kj::byte* data, size_t size);

  static constexpr size_t small_input_size = 512;

  std::shared_ptr<const detail::tls_core> core_;  // outlives ssl_ (its BIO uses the method)
  kj::Own<kj::AsyncIoStream> raw_;
  ssl_st* ssl_ = nullptr;  // owned; freed first in the destructor

  // Ciphertext read from raw_ and not yet taken by OpenSSL: [in_next_, +in_left_)
  // inside in_small_ or in_heap_ (allocated only for a burst, freed when drained).
  kj::Array<kj::byte> in_heap_;
  const kj::byte* in_next_ = nullptr;
  size_t in_left_ = 0;
  bool last_fill_full_ = false;  // the last raw read filled its buffer: more is probably coming
  bool read_eof_ = false;
  // TLS record framing of the ciphertext handed to OpenSSL, to tell an end of
  // stream between records from one inside a record.
  kj::byte header_[5] = {};
  kj::byte header_have_ = 0;  // bytes of the next record header seen (0..4)
  size_t body_left_ = 0;      // bytes of the current record body still to come

  // Ciphertext produced by OpenSSL, not yet handed to raw_ (empty when idle).
  std::vector<kj::byte> out_;
  bool sending_ = false;  // a raw_ write is in flight (one at a time)
  bool shutdown_requested_ = false;
  bool raw_write_shut_ = false;
  kj::Vector<kj::Own<kj::PromiseFulfiller<void>>> flushed_;  // resolved when out_ is all sent
  kj::Own<kj::Exception> write_error_;                       // the raw stream failed (null if not)

  // The first chain problem the verify callback saw (X509_V_OK = none).
  int verify_error_ = 0;
  std::string verify_detail_;
  tls_peer peer_;

  kj::Maybe<kj::Promise<void>> sender_;  // drains out_ into raw_; destroyed before raw_

  kj::byte in_small_[small_input_size];  // raw reads while idle land here: no heap buffer
};

}  // namespace canopy
