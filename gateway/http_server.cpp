#include "gateway/http_server.hpp"

#include "gateway/io_thread.hpp"
#include "runtime/ascii.hpp"

#include <kj/compat/http.h>
#include <kj/compat/tls.h>
#include <kj/debug.h>
#include <spdlog/spdlog.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <charconv>
#include <memory>
#include <mutex>
#include <string_view>

namespace canopy {

namespace {

// --- Small text helpers ------------------------------------------------------

std::string lower(std::string_view text) {
  std::string out(text);
  for (auto& c : out) {
    if (c >= 'A' && c <= 'Z')
      c = static_cast<char>(c - 'A' + 'a');
  }
  return out;
}

bool iequals(std::string_view a, std::string_view b) {
  return a.size() == b.size() && lower(a) == lower(b);
}

/// {"error": message}; invalid UTF-8 in the message is replaced, never thrown.
std::string error_json(const std::string& message) {
  nlohmann::json doc = nlohmann::json::object();
  doc["error"] = message;
  return doc.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

http_response error_response(int status, const std::string& message) {
  http_response r;
  r.status = status;
  r.body = error_json(message);
  return r;
}

const char* status_text(int status) {
  switch (status) {
    case 200:
      return "OK";
    case 201:
      return "Created";
    case 202:
      return "Accepted";
    case 204:
      return "No Content";
    case 301:
      return "Moved Permanently";
    case 302:
      return "Found";
    case 304:
      return "Not Modified";
    case 400:
      return "Bad Request";
    case 401:
      return "Unauthorized";
    case 403:
      return "Forbidden";
    case 404:
      return "Not Found";
    case 405:
      return "Method Not Allowed";
    case 408:
      return "Request Timeout";
    case 409:
      return "Conflict";
    case 412:
      return "Precondition Failed";
    case 413:
      return "Payload Too Large";
    case 415:
      return "Unsupported Media Type";
    case 422:
      return "Unprocessable Entity";
    case 429:
      return "Too Many Requests";
    case 431:
      return "Request Header Fields Too Large";
    case 500:
      return "Internal Server Error";
    case 501:
      return "Not Implemented";
    case 502:
      return "Bad Gateway";
    case 503:
      return "Service Unavailable";
    case 504:
      return "Gateway Timeout";
    default:
      break;
  }
  if (status < 300)
    return "OK";
  if (status < 400)
    return "Redirection";
  if (status < 500)
    return "Client Error";
  return "Server Error";
}

/// RFC 9110 token characters (header names).
bool is_token(std::string_view s) {
  if (s.empty())
    return false;
  for (unsigned char c : s) {
    if (c >= '0' && c <= '9')
      continue;
    if ((c | 0x20) >= 'a' && (c | 0x20) <= 'z')
      continue;
    if (std::string_view("!#$%&'*+-.^_`|~").find(static_cast<char>(c)) != std::string_view::npos)
      continue;
    return false;
  }
  return true;
}

/// A header value that cannot split the response: no CR, LF or NUL.
bool is_safe_value(std::string_view s) {
  return s.find_first_of(std::string_view("\r\n\0", 3)) == std::string_view::npos;
}

/// Headers KJ writes itself (framing and connection management).
bool is_framing_header(std::string_view name) {
  static constexpr std::string_view framing[] = {
    "content-length", "transfer-encoding", "connection",  "keep-alive", "te",
    "trailer",        "upgrade",           "content-type"};
  auto l = lower(name);
  return std::find(std::begin(framing), std::end(framing), l) != std::end(framing);
}

/// Routes and public paths: a prefix ending in '/' covers every path under it,
/// any other prefix that exact path.
bool prefix_matches(std::string_view prefix, std::string_view path) {
  if (!prefix.empty() && prefix.back() == '/')
    return path.substr(0, prefix.size()) == prefix;
  return path == prefix;
}

/// Decodes %XX escapes (and '+' as a space in query parts). `offset` is where
/// `in` starts in the request target, for the error message.
expected<std::string> percent_decode(std::string_view in, bool plus_is_space, std::size_t offset) {
  std::string out;
  out.reserve(in.size());
  for (std::size_t i = 0; i < in.size(); ++i) {
    char c = in[i];
    if (c == '%') {
      int hi = i + 1 < in.size() ? ascii::hex_value(in[i + 1]) : -1;
      int lo = i + 2 < in.size() ? ascii::hex_value(in[i + 2]) : -1;
      if (hi < 0 || lo < 0) {
        return make_error(errc::invalid_argument, "request target: bad percent-escape at byte " +
                                                    std::to_string(offset + i) + " (expected %XX)");
      }
      char decoded = static_cast<char>(hi * 16 + lo);
      if (decoded == '\0') {
        return make_error(errc::invalid_argument, "request target: %00 (NUL) at byte " +
                                                    std::to_string(offset + i) + " is not allowed");
      }
      out.push_back(decoded);
      i += 2;
    } else if (c == '+' && plus_is_space) {
      out.push_back(' ');
    } else {
      out.push_back(c);
    }
  }
  return out;
}

struct request_target {
  std::string path;
  std::map<std::string, std::string> query;
};

/// Splits an origin-form request target "/path?a=1&b=2" and decodes its parts.
expected<request_target> parse_target(std::string_view url) {
  if (url.empty() || url.front() != '/') {
    std::string shown(url.substr(0, 80));
    return make_error(errc::invalid_argument, "request target '" + shown +
                                                "' is not a path (expected /path or /path?query)");
  }
  auto fragment = url.find('#');
  if (fragment != std::string_view::npos)
    url = url.substr(0, fragment);
  auto q = url.find('?');
  request_target out;
  auto path = percent_decode(url.substr(0, q), false, 0);
  if (!path)
    return path.err();
  out.path = std::move(*path);
  if (q == std::string_view::npos)
    return out;
  std::size_t pos = q + 1;
  while (pos <= url.size()) {
    auto amp = url.find('&', pos);
    if (amp == std::string_view::npos)
      amp = url.size();
    auto part = url.substr(pos, amp - pos);
    if (!part.empty()) {
      auto eq = part.find('=');
      auto key = percent_decode(part.substr(0, eq), true, pos);
      if (!key)
        return key.err();
      std::string value;
      if (eq != std::string_view::npos) {
        auto v = percent_decode(part.substr(eq + 1), true, pos + eq + 1);
        if (!v)
          return v.err();
        value = std::move(*v);
      }
      out.query[std::move(*key)] = std::move(value);
    }
    pos = amp + 1;
  }
  return out;
}

/// Compares a presented token with the secret in time that depends only on
/// the secret's length.
bool tokens_equal(std::string_view given, std::string_view secret) {
  volatile unsigned char diff = given.size() == secret.size() ? 0 : 1;
  for (std::size_t i = 0; i < secret.size(); ++i) {
    unsigned char g = given.empty() ? 0 : static_cast<unsigned char>(given[i % given.size()]);
    diff = static_cast<unsigned char>(diff | (g ^ static_cast<unsigned char>(secret[i])));
  }
  return diff == 0;
}

/// "HOST:PORT" with a non-empty host and a numeric port.
expected<void> check_listen(const std::string& listen) {
  auto colon = listen.rfind(':');
  if (listen.empty() || colon == std::string::npos || colon == 0 || colon + 1 == listen.size() ||
      listen.back() == ']') {
    return make_error(errc::invalid_argument,
                      "listen: '" + listen + "' is not HOST:PORT (e.g. 127.0.0.1:9600, [::1]:0)");
  }
  unsigned port = 0;
  auto digits = std::string_view(listen).substr(colon + 1);
  auto [end, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), port);
  if (ec != std::errc{} || end != digits.data() + digits.size() || port > 65535) {
    return make_error(errc::invalid_argument, "listen: port '" + std::string(digits) + "' of '" +
                                                listen + "' is not a number 0..65535");
  }
  return {};
}

kj::Duration to_kj(std::chrono::milliseconds ms) {
  return ms.count() * kj::MILLISECONDS;
}

/// The one-shot hand-off of a handler's reply from any thread to the loop.
/// A second reply is ignored; destroying it unanswered breaks the promise.
class reply_slot {
 public:
  explicit reply_slot(kj::Own<kj::CrossThreadPromiseFulfiller<http_response>> f)
      : fulfiller_(kj::mv(f)) {}

  void fulfill(http_response r) {
    kj::Own<kj::CrossThreadPromiseFulfiller<http_response>> f;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      f = kj::mv(fulfiller_);
    }
    if (f.get() == nullptr) {
      spdlog::warn("http: a handler replied twice; the second reply (status {}) is dropped",
                   r.status);
      return;
    }
    f->fulfill(kj::mv(r));
  }

 private:
  std::mutex mutex_;
  kj::Own<kj::CrossThreadPromiseFulfiller<http_response>> fulfiller_;
};

}  // namespace

// --- The part that lives on the I/O thread --------------------------------------

struct http_server::loop_state final : kj::HttpService,
                                       kj::HttpServerErrorHandler,
                                       kj::TaskSet::ErrorHandler {
  loop_state(http_options opts, std::vector<route_entry> r, kj::Timer& t)
      : options(std::move(opts)), routes(std::move(r)), timer(t) {
    kj::HttpHeaderTable::Builder builder;
    table = builder.build();
    kj::HttpServerSettings settings;
    settings.headerTimeout = to_kj(options.header_timeout);
    settings.pipelineTimeout = to_kj(options.pipeline_timeout);
    settings.errorHandler = static_cast<kj::HttpServerErrorHandler&>(*this);
    server =
      kj::heap<kj::HttpServer>(timer, *table, static_cast<kj::HttpService&>(*this), settings);
    connections = kj::heap<kj::TaskSet>(static_cast<kj::TaskSet::ErrorHandler&>(*this));
  }

  ~loop_state() noexcept(false) {
    connections = nullptr;  // first: they use the server
    accepting = nullptr;
    server = nullptr;
    receiver = nullptr;
  }

  // --- Accepting ---

  kj::Promise<void> accept_next() {
    return receiver->accept().then(
      [this](kj::Own<kj::AsyncIoStream> conn) {
        on_connection(kj::mv(conn));
        return accept_next();
      },
      [this](kj::Exception&& e) -> kj::Promise<void> {
        if (stopping)
          return kj::READY_NOW;
        // E.g. EMFILE: keep the listener, try again shortly.
        spdlog::warn("http {}: accept failed: {}; retrying in 100 ms", options.listen,
                     e.getDescription().cStr());
        return timer.afterDelay(100 * kj::MILLISECONDS).then([this] { return accept_next(); });
      });
  }

  void on_connection(kj::Own<kj::AsyncIoStream> conn) {
    if (active >= options.max_connections) {
      if (!limit_logged) {  // once per time at the limit, not once per refused connection
        spdlog::warn("http {}: {} connections open (the limit); closing new ones", options.listen,
                     active);
        limit_logged = true;
      }
      return;  // dropping `conn` closes it
    }
    ++active;
    auto release = kj::defer([this] {
      if (--active < options.max_connections)
        limit_logged = false;
    });
    kj::Promise<kj::Own<kj::AsyncIoStream>> ready = nullptr;
    if (options.tls != nullptr) {
      ready =
        timer.timeoutAfter(to_kj(options.header_timeout), options.tls->wrapServer(kj::mv(conn)));
    } else {
      ready = kj::mv(conn);
    }
    connections->add(ready
                       .then([this](kj::Own<kj::AsyncIoStream> stream) {
                         return server->listenHttp(kj::mv(stream));
                       })
                       .attach(kj::mv(release)));
  }

  void taskFailed(kj::Exception&& e) override {
    // A client that hangs up, times out or fails the TLS handshake: normal.
    spdlog::debug("http {}: a connection ended: {}", options.listen, e.getDescription().cStr());
  }

  // --- Shutdown ---

  kj::Promise<void> shutdown() {
    stopping = true;
    accepting = nullptr;
    receiver = nullptr;  // closes the listening socket
    auto grace = timer.afterDelay(to_kj(options.stop_grace)).then([this] {
      spdlog::warn("http {}: {} connection(s) still busy {} ms after stop; closing them",
                   options.listen, active, options.stop_grace.count());
    });
    return server->drain().exclusiveJoin(kj::mv(grace)).then([this] {
      connections = nullptr;  // cancels what is left
      server = nullptr;
      if (done.get() != nullptr)
        done->fulfill();
    });
  }

  // --- Requests ---

  kj::Promise<void> request(kj::HttpMethod method, kj::StringPtr url,
                            const kj::HttpHeaders& headers, kj::AsyncInputStream& body,
                            Response& response) override {
    // `url` and `headers` die at the first body read: copy what we need now.
    http_request req;
    req.method = kj::str(method).cStr();
    std::size_t header_bytes = req.method.size() + url.size() + 12;
    headers.forEach([&](kj::StringPtr name, kj::StringPtr value) {
      header_bytes += name.size() + value.size() + 4;
      auto key = lower(std::string_view(name.begin(), name.size()));
      auto [it, inserted] = req.headers.emplace(std::move(key), value.cStr());
      if (!inserted) {
        it->second += ", ";
        it->second += value.cStr();
      }
    });
    if (header_bytes > options.max_header_bytes) {
      return send(response,
                  error_response(431, "request head of " + std::to_string(header_bytes) +
                                        " bytes exceeds the limit of " +
                                        std::to_string(options.max_header_bytes) + " bytes"));
    }
    auto target = parse_target(std::string_view(url.begin(), url.size()));
    if (!target)
      return send(response, error_response(400, target.err().message));
    req.path = std::move(target->path);
    req.query = std::move(target->query);

    if (auto denied = check_token(req); denied.status != 0)
      return send(response, std::move(denied));

    const route_entry* route = find_route(req.method, req.path);
    if (route == nullptr)
      return send(response, no_route(req.method, req.path));

    if (auto it = req.headers.find("content-length"); it != req.headers.end()) {
      std::uint64_t length = 0;
      const auto& text = it->second;
      auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), length);
      if (ec == std::errc::result_out_of_range ||
          (ec == std::errc{} && length > options.max_body)) {
        return send(response, too_large(text + " bytes (Content-Length)"));
      }
      (void) end;
    }

    auto buffer = kj::heap<body_buffer>();
    auto& b = *buffer;
    return read_body(body, b).then(
      [this, &response, route, req = std::move(req),
       buffer = kj::mv(buffer)](bool complete) mutable -> kj::Promise<void> {
        if (!complete)
          return send(response,
                      too_large("more than " + std::to_string(options.max_body) + " bytes"));
        req.body = std::move(buffer->data);
        return call(*route, std::move(req)).then([this, &response](http_response r) {
          return send(response, std::move(r));
        });
      });
  }

  struct body_buffer {
    std::string data;
    kj::Array<kj::byte> chunk = kj::heapArray<kj::byte>(16 << 10);
  };

  /// Reads the body into `b`: true at its end, false once it exceeds max_body.
  kj::Promise<bool> read_body(kj::AsyncInputStream& in, body_buffer& b) {
    return in.tryRead(b.chunk.begin(), 1, b.chunk.size())
      .then([this, &in, &b](std::size_t n) -> kj::Promise<bool> {
        if (n == 0)
          return true;
        if (b.data.size() + n > options.max_body)
          return false;
        b.data.append(reinterpret_cast<const char*>(b.chunk.begin()), n);
        return read_body(in, b);
      });
  }

  http_response too_large(const std::string& what) const {
    return error_response(413, "request body of " + what + " exceeds the limit of " +
                                 std::to_string(options.max_body) + " bytes");
  }

  /// status 0: allowed; else the 401 to send.
  http_response check_token(const http_request& req) const {
    http_response ok;
    ok.status = 0;
    if (options.bearer_token.empty())
      return ok;
    for (const auto& p : options.public_paths) {
      if (prefix_matches(p, req.path))
        return ok;
    }
    auto it = req.headers.find("authorization");
    std::string message;
    std::string challenge = "Bearer realm=\"canopy\"";
    if (it == req.headers.end()) {
      message = "missing bearer token: send the header 'Authorization: Bearer <token>'";
    } else {
      std::string_view value = it->second;
      auto space = value.find(' ');
      if (space == std::string_view::npos || !iequals(value.substr(0, space), "bearer")) {
        message = "Authorization header: expected the scheme 'Bearer <token>'";
      } else {
        auto token = value.substr(space);
        token.remove_prefix(std::min(token.find_first_not_of(' '), token.size()));
        while (!token.empty() && token.back() == ' ')
          token.remove_suffix(1);
        if (tokens_equal(token, options.bearer_token))
          return ok;
        message = "invalid bearer token";
        challenge += ", error=\"invalid_token\"";
      }
    }
    auto r = error_response(401, message);
    r.headers.emplace_back("WWW-Authenticate", challenge);
    return r;
  }

  const route_entry* find_route(const std::string& method, const std::string& path) const {
    auto best_for = [&](const std::string& m) -> const route_entry* {
      const route_entry* best = nullptr;
      for (const auto& r : routes) {
        if (r.method == m && prefix_matches(r.prefix, path) &&
            (best == nullptr || r.prefix.size() > best->prefix.size())) {
          best = &r;
        }
      }
      return best;
    };
    const route_entry* found = best_for(method);
    if (found == nullptr && method == "HEAD")
      found = best_for("GET");
    return found;
  }

  http_response no_route(const std::string& method, const std::string& path) const {
    std::vector<std::string> allowed;
    for (const auto& r : routes) {
      if (prefix_matches(r.prefix, path) &&
          std::find(allowed.begin(), allowed.end(), r.method) == allowed.end()) {
        allowed.push_back(r.method);
      }
    }
    if (allowed.empty())
      return error_response(404, "no resource at " + path);
    std::sort(allowed.begin(), allowed.end());
    std::string list;
    for (const auto& m : allowed)
      list += (list.empty() ? "" : ", ") + m;
    auto r = error_response(
      405, "method " + method + " is not allowed on " + path + " (allowed: " + list + ")");
    r.headers.emplace_back("Allow", list);
    return r;
  }

  /// Runs the handler and waits for its reply (from any thread), at most reply_timeout.
  kj::Promise<http_response> call(const route_entry& route, http_request req) {
    auto what = req.method + " " + req.path;
    auto paf = kj::newPromiseAndCrossThreadFulfiller<http_response>();
    auto slot = std::make_shared<reply_slot>(kj::mv(paf.fulfiller));
    try {
      route.handler(std::move(req), [slot](http_response r) { slot->fulfill(std::move(r)); });
    } catch (const std::exception& e) {
      spdlog::warn("http {}: the handler of {} threw: {}", options.listen, what, e.what());
      return error_response(500, "the handler of " + what + " failed: " + e.what());
    } catch (...) {
      spdlog::warn("http {}: the handler of {} threw", options.listen, what);
      return error_response(500, "the handler of " + what + " failed");
    }
    slot.reset();  // only the handler's copies keep it now
    auto replied = paf.promise.catch_([what](kj::Exception&&) {
      return error_response(500, "the handler of " + what + " dropped the request without a reply");
    });
    auto ms = options.reply_timeout.count();
    auto late = timer.afterDelay(to_kj(options.reply_timeout)).then([what, ms] {
      return error_response(
        504, "the handler of " + what + " did not reply within " + std::to_string(ms) + " ms");
    });
    return replied.exclusiveJoin(kj::mv(late));
  }

  kj::Promise<void> send(Response& response, http_response r) {
    if (r.status < 200 || r.status > 599) {
      spdlog::warn("http {}: a handler answered with status {}; sending 500", options.listen,
                   r.status);
      r = error_response(
        500, "the handler answered with the invalid status " + std::to_string(r.status));
    }
    auto held = kj::heap<http_response>(std::move(r));
    kj::HttpHeaders headers(*table);
    bool bodyless = held->status == 204 || held->status == 304;
    if (!bodyless) {
      if (!is_safe_value(held->content_type))
        held->content_type = "application/octet-stream";
      headers.set(kj::HttpHeaderId::CONTENT_TYPE, held->content_type);
    }
    for (const auto& [name, value] : held->headers) {
      if (!is_token(name) || !is_safe_value(value)) {
        spdlog::warn("http {}: dropping the invalid response header '{}'", options.listen, name);
        continue;
      }
      if (is_framing_header(name))
        continue;
      headers.add(name, value);
    }
    if (bodyless) {
      response.send(static_cast<kj::uint>(held->status), status_text(held->status), headers,
                    std::uint64_t{0});
      return kj::READY_NOW;
    }
    auto stream = response.send(static_cast<kj::uint>(held->status), status_text(held->status),
                                headers, std::uint64_t{held->body.size()});
    auto& body = held->body;
    return stream->write(body.data(), body.size()).attach(kj::mv(stream), kj::mv(held));
  }

  // --- kj::HttpServerErrorHandler ---

  kj::Promise<void> handleClientProtocolError(kj::HttpHeaders::ProtocolError error,
                                              kj::HttpService::Response& response) override {
    spdlog::debug("http {}: bad request: {}", options.listen, error.description.cStr());
    int status =
      error.statusCode >= 400 && error.statusCode <= 599 ? static_cast<int>(error.statusCode) : 400;
    return send(response, error_response(
                            status, std::string("malformed request: ") + error.description.cStr()));
  }

  kj::Promise<void> handleApplicationError(
    kj::Exception exception, kj::Maybe<kj::HttpService::Response&> response) override {
    if (exception.getType() == kj::Exception::Type::DISCONNECTED)
      return kj::READY_NOW;  // client gone
    // KJ's parser gives up on a head past its 128 KiB buffer with this FAILED
    // exception and no response to send: the connection just closes.
    std::string_view description(exception.getDescription().cStr());
    if (description.find("request headers too large") != std::string_view::npos) {
      spdlog::debug("http {}: a request head exceeded KJ's 128 KiB buffer; closing",
                    options.listen);
      return kj::READY_NOW;
    }
    spdlog::warn("http {}: request failed: {}", options.listen, exception.getDescription().cStr());
    KJ_IF_MAYBE (r, response) {
      return send(*r, error_response(
                        500, std::string("internal error: ") + exception.getDescription().cStr()));
    }
    return kj::READY_NOW;
  }

  kj::Promise<void> handleNoResponse(kj::HttpService::Response& response) override {
    return send(response, error_response(500, "internal error: no response"));
  }

  // Declared in destruction-safe order (the destructor also orders them).
  http_options options;
  std::vector<route_entry> routes;  // read-only once started
  kj::Timer& timer;
  kj::Own<kj::HttpHeaderTable> table;
  kj::Own<kj::HttpServer> server;
  kj::Own<kj::ConnectionReceiver> receiver;
  kj::Promise<void> accepting = nullptr;
  std::size_t active = 0;  // connections open (TLS handshakes included)
  bool limit_logged = false;
  bool stopping = false;
  kj::Own<kj::PromiseFulfiller<void>> done;  // ends the loop task that owns this state
  kj::Own<kj::TaskSet> connections;
};

// --- http_server ------------------------------------------------------------------

http_server::http_server(http_options options) : options_(std::move(options)) {}

http_server::~http_server() {
  stop();
}

void http_server::route(std::string method, std::string path_prefix, http_handler handler) {
  if (state_ != nullptr) {
    spdlog::error("http {}: route {} {} added after start(); ignored", options_.listen, method,
                  path_prefix);
    return;
  }
  if (path_prefix.empty() || path_prefix.front() != '/' || method.empty() || !handler) {
    spdlog::error(
      "http {}: route '{}' '{}' needs a method, a handler and a prefix starting with '/'; ignored",
      options_.listen, method, path_prefix);
    return;
  }
  for (auto& c : method) {
    if (c >= 'a' && c <= 'z')
      c = static_cast<char>(c - 'a' + 'A');
  }
  for (auto& r : routes_) {
    if (r.method == method && r.prefix == path_prefix) {
      r.handler = std::move(handler);
      return;
    }
  }
  routes_.push_back(route_entry{std::move(method), std::move(path_prefix), std::move(handler)});
}

expected<void> http_server::start(io_thread& io) {
  if (state_ != nullptr)
    return make_error(errc::invalid_argument, "http " + options_.listen + ": already started");
  if (!io.running())
    return make_error(errc::unavailable,
                      "http " + options_.listen + ": the I/O thread is not running");
  if (auto ok = check_listen(options_.listen); !ok)
    return ok.err();

  loop_state* started = nullptr;
  std::uint16_t bound = 0;
  KJ_IF_MAYBE (e, kj::runCatchingExceptions([&] {
                 io.run_sync([&](kj::AsyncIoContext& ctx) {
                   return ctx.provider->getNetwork()
                     .parseAddress(options_.listen)
                     .then([&](kj::Own<kj::NetworkAddress> address) {
                       auto state =
                         kj::heap<loop_state>(options_, routes_, ctx.provider->getTimer());
                       state->receiver = address->listen();
                       bound = static_cast<std::uint16_t>(state->receiver->getPort());
                       auto* s = state.get();
                       state->accepting = s->accept_next().eagerlyEvaluate([s](kj::Exception&& e) {
                         if (!s->stopping) {
                           spdlog::error("http {}: stopped accepting: {}", s->options.listen,
                                         e.getDescription().cStr());
                         }
                       });
                       auto life = kj::newPromiseAndFulfiller<void>();
                       state->done = kj::mv(life.fulfiller);
                       io.add_task(kj::mv(life.promise).attach(kj::mv(state)));
                       started = s;
                     });
                 });
               })) {
    return make_error(errc::io_error, "http: cannot listen on " + options_.listen + ": " +
                                        e->getDescription().cStr());
  }
  io_ = &io;
  state_ = started;
  port_ = bound;
  spdlog::info("http: listening on {} (port {}, {})", options_.listen, bound,
               options_.tls != nullptr ? "https" : "http");
  return {};
}

void http_server::stop() {
  if (state_ == nullptr)
    return;
  if (io_->running()) {
    auto* s = state_;
    KJ_IF_MAYBE (e, kj::runCatchingExceptions(
                      [&] { io_->run_sync([s](kj::AsyncIoContext&) { return s->shutdown(); }); })) {
      // The loop went away meanwhile: it destroyed the server state itself.
      spdlog::debug("http {}: stop after the I/O thread: {}", options_.listen,
                    e->getDescription().cStr());
    }
  }
  state_ = nullptr;
  io_ = nullptr;
  port_ = 0;
}

}  // namespace canopy
