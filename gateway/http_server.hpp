// canopy::http_server — a small HTTP/1.1 server (kj-http) on the node's
// io_thread, for the Prometheus /metrics endpoint of every node (plain HTTP)
// and the hub's REST API (HTTPS with a bearer token). No CAF and no KJ types in
// this header except the borrowed kj::TlsContext.
//
// Threading: construct, route(), start() and stop() from one thread that is not
// the I/O thread (main()). Handlers run on the I/O thread and must return at
// once; each calls its `reply` exactly once, at once or later, from any thread
// (the reply is handed back to the loop through a cross-thread fulfiller).
//
// Routing: a route's prefix that ends in '/' matches every path under it
// ("/devices/" matches "/devices/d1/twin"); any other prefix matches that exact
// path only. The longest matching prefix with the request's method wins (HEAD
// falls back to GET). http_request::path is always the full decoded path.
//
// Answers of the server itself (a JSON body {"error": "..."} naming what is
// wrong): 400 malformed request, 401 (with WWW-Authenticate: Bearer) missing or
// wrong token, 404 no route, 405 (with Allow) known path but another method,
// 413 body over max_body, 431 headers over max_header_bytes, 500 a handler
// threw or dropped its reply, 504 no reply within reply_timeout.
//
// Limits against bad input: header bytes (max_header_bytes answers 431; past
// KJ's own 128 KiB parse buffer the connection is closed unanswered), body
// bytes, open connections (more are closed at once), header and pipeline
// timeouts (kj::HttpServerSettings), the TLS handshake time (header_timeout).
// KJ 0.9 keeps a connection open after a response even when the client asked
// "Connection: close" (the client closes it, or pipeline_timeout does), and
// sends no "100 Continue": a client that sends "Expect: 100-continue" waits for
// its own timeout before sending the body.
//
// Shutdown order: stop the http_server before the io_thread, before the
// TlsContext it borrows, and before whatever its handlers borrow.
#pragma once

#include "runtime/expected.hpp"

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace kj {
class TlsContext;
}  // namespace kj

namespace canopy {

class io_thread;

/// One request as a handler sees it.
struct http_request {
  std::string method;                        ///< "GET", "POST", ... (upper case)
  std::string path;                          ///< percent-decoded, without the query
  std::map<std::string, std::string> query;  ///< decoded query parameters (last one wins)
  std::map<std::string, std::string>
    headers;         ///< lower-case names; repeated headers joined with ", "
  std::string body;  ///< at most http_options::max_body bytes
};

/// What a handler answers.
struct http_response {
  int status = 200;                               ///< 200..599
  std::string content_type = "application/json";  ///< the Content-Type header
  std::string body;                               ///< not sent for 204, 304 and HEAD
  std::vector<std::pair<std::string, std::string>>
    headers;  ///< extra headers (framing headers are ignored)
};

/// Handles one request: called on the I/O thread, returns at once, and calls
/// `reply` exactly once (at once or later, from any thread). A reply after the
/// client went away or the server stopped is dropped; a handler that throws, or
/// drops `reply` uncalled, answers 500.
using http_handler = std::function<void(http_request, std::function<void(http_response)> reply)>;

/// Where and how an http_server listens.
struct http_options {
  std::string listen;  ///< "HOST:PORT": "127.0.0.1:9600", "[::1]:0" (port 0: any free port)
  kj::TlsContext* tls = nullptr;   ///< borrowed; null = plain HTTP. Needs a server keypair.
  std::string bearer_token;        ///< "" = no authentication
  std::size_t max_body = 1 << 20;  ///< larger request bodies answer 413
  std::vector<std::string>
    public_paths;  ///< served without the token (same matching as routes): "/metrics"
  std::size_t max_connections = 256;        ///< connections beyond this are closed at once
  std::size_t max_header_bytes = 32 << 10;  ///< request line + headers; more answers 431
  std::chrono::milliseconds header_timeout{
    15000};  ///< to send a complete request head (and the TLS handshake)
  std::chrono::milliseconds pipeline_timeout{5000};  ///< idle keep-alive time between requests
  std::chrono::milliseconds reply_timeout{30000};    ///< a handler's reply after this answers 504
  std::chrono::milliseconds stop_grace{2000};  ///< stop() lets running requests finish this long
};

/// An HTTP(S) server on the io_thread. Not copyable.
class http_server {
 public:
  /// A server with `options`; nothing listens until start().
  explicit http_server(http_options options);

  /// Calls stop().
  ~http_server();

  http_server(const http_server&) = delete;
  http_server& operator=(const http_server&) = delete;

  /// Serves requests `method` ("GET", ...) whose path matches `path_prefix`
  /// (see the file comment) with `handler`. Before start() only; a later call,
  /// or an empty/relative prefix, is ignored and logged. A second route for the
  /// same method and prefix replaces the first.
  void route(std::string method, std::string path_prefix, http_handler handler);

  /// Binds options.listen and starts serving on `io` (which must be running);
  /// blocks until the socket listens. Errors: invalid_argument (listen is not
  /// HOST:PORT, started twice), unavailable (io not running), io_error
  /// (resolve or bind failed, e.g. the port is taken).
  expected<void> start(io_thread& io);

  /// The bound port (the real one when listening on port 0); 0 before start().
  /// Any thread.
  std::uint16_t port() const noexcept { return port_.load(); }

  /// Closes the listener, lets running requests finish for up to
  /// options.stop_grace, then closes every connection. Blocks until done.
  /// Idempotent; safe if never started or if the io_thread already stopped.
  void stop();

 private:
  struct route_entry {
    std::string method;
    std::string prefix;
    http_handler handler;
  };
  struct loop_state;

  http_options options_;
  std::vector<route_entry> routes_;
  io_thread* io_ = nullptr;
  loop_state* state_ = nullptr;  // owned by a task on the I/O thread; touched there only
  std::atomic<std::uint16_t> port_{0};
};

}  // namespace canopy
