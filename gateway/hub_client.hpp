// canopy::hub_client — a synchronous client of the hub's REST API
// (gateway/hub_api), for canopyctl's fleet commands. kj-http over kj-tls on its
// own KJ event loop (kj::setupAsyncIo) on the calling thread: no CAF, no
// io_thread.
//
// HTTPS checks the hub's certificate against the fleet CA only (no system
// trust store) and against the hub's id as the expected host name (the hub's
// certificate carries SAN DNS:<hub id>); canopyctl presents no certificate and
// authenticates with the bearer token. Plain http:// works too (tests).
//
// Connections: connect() opens the first one (so "cannot connect" is known at
// once); it is kept for later requests and replaced when it broke, timed out
// or sat idle for longer than the server keeps idle connections.
//
// Threading: a hub_client belongs to the thread that created it, which must
// not run another KJ event loop (one hub_client per thread at a time). Not
// copyable.
#pragma once

#include "runtime/expected.hpp"

#include <nlohmann/json.hpp>

#include <chrono>
#include <memory>
#include <string>
#include <string_view>

namespace canopy {

/// Where the hub is and how to talk to it.
struct hub_client_options {
  /// "https://HOST:PORT" or "http://HOST:PORT" (IPv6 as "[::1]"); a trailing '/' is ignored.
  std::string url = "https://127.0.0.1:8443";
  /// The name the hub's certificate must carry (its id); "" = the URL's host.
  std::string hub_id;
  /// The fleet CA certificate(s), PEM; required for https.
  std::string ca_path;
  /// The API's bearer token; "" = send none.
  std::string token;
  /// For the TCP connection and the TLS handshake.
  std::chrono::milliseconds connect_timeout{10000};
  /// For a whole request (send and read the answer) unless request() is given one.
  std::chrono::milliseconds request_timeout{60000};
};

/// A connection to the hub's REST API. See the file comment.
class hub_client {
 private:
  struct impl;

 public:
  /// Parses the URL, loads the CA, and connects (TCP, then the TLS handshake
  /// for https). Errors: invalid_argument (a bad URL, https without ca_path, a
  /// CA file without certificates), not_found / io_error (the CA file cannot
  /// be read), unavailable ("cannot connect to <url>: ..." — refused,
  /// unresolvable, the handshake failed, e.g. the certificate does not match
  /// hub_id), timeout (connect_timeout passed).
  static expected<std::unique_ptr<hub_client>> connect(hub_client_options options);

  /// For connect() only.
  explicit hub_client(std::unique_ptr<impl> state);
  ~hub_client();

  hub_client(const hub_client&) = delete;
  hub_client& operator=(const hub_client&) = delete;

  /// Sends `method` ("GET", "POST", "PUT", "PATCH", "DELETE") to `path` (with
  /// an optional "?query"; escape segments with escape()) with `body` as JSON
  /// (null: no body), and waits for the answer, at most `timeout` (0: the
  /// options' request_timeout). Returns the answer's JSON (null for an empty
  /// body, e.g. 204). A status other than 2xx is an error whose message is the
  /// server's "error" text (else the status line) and whose code follows
  /// errc_of_http_status (401 is failed); last_status() tells the status.
  /// Transport errors: unavailable (the connection broke; a GET/PUT/DELETE on
  /// a reused connection is retried once on a new one), timeout, failed
  /// (interrupted by a signal of interrupt_on(): see interrupted()).
  expected<nlohmann::json> request(
    std::string_view method, std::string_view path, const nlohmann::json& body = nullptr,
    std::chrono::milliseconds timeout = std::chrono::milliseconds(0));

  /// The HTTP status of the last answer; 0 if the last request got none.
  int last_status() const noexcept;

  /// Waits `duration` on the client's event loop (monitor's polling). False if
  /// a signal of interrupt_on() arrived meanwhile (or before).
  bool pause(std::chrono::milliseconds duration);

  /// Makes `signo` (SIGINT, SIGTERM) end a running request() or pause() (which
  /// then fail / return false) instead of the process. Blocks the signal on
  /// this thread (kj::UnixEventPort::captureSignal): call it before starting
  /// other threads. Once per signal.
  void interrupt_on(int signo);

  /// True once a signal of interrupt_on() arrived.
  bool interrupted() const noexcept;

  /// The URL given to connect(), without a trailing '/'.
  const std::string& url() const noexcept;

  /// Percent-encodes `text` for a path segment or a query value (everything
  /// except A-Z a-z 0-9 - . _ ~ is escaped).
  static std::string escape(std::string_view text);

 private:
  std::unique_ptr<impl> impl_;
};

}  // namespace canopy
