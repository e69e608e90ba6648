#include "gateway/hub_client.hpp"

#include "gateway/certs.hpp"
#include "gateway/hub_api.hpp"
#include "gateway/tls.hpp"

#include <kj/async-io.h>
#include <kj/async-unix.h>
#include <kj/compat/http.h>
#include <kj/compat/tls.h>
#include <kj/exception.h>

#include <algorithm>
#include <charconv>
#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

namespace canopy {

namespace {

/// Longest answer body read, in bytes.
constexpr std::uint64_t max_answer_bytes = 64ull << 20;

/// A kept connection idle for this long is replaced before the next request
/// (the server closes idle connections after http_options::pipeline_timeout, 5 s).
constexpr auto max_idle = std::chrono::seconds(2);

std::string describe(const kj::Exception& e) {
  auto d = e.getDescription();
  return std::string(d.cStr(), d.size());
}

/// The parts of a hub URL.
struct parsed_url {
  bool tls = true;
  std::string authority;  // "host:port" as given ("[::1]:8443")
  std::string host;       // without brackets
  unsigned port = 443;
  std::string base_path;  // "" or "/prefix" (no trailing '/')
};

expected<parsed_url> parse_url(const std::string& url) {
  auto fail = [&](const std::string& why) {
    return make_error(errc::invalid_argument,
                      "hub URL '" + url + "': " + why + " (expected https://HOST:PORT)");
  };
  parsed_url out;
  std::string_view rest(url);
  if (rest.rfind("https://", 0) == 0) {
    rest.remove_prefix(8);
  } else if (rest.rfind("http://", 0) == 0) {
    out.tls = false;
    out.port = 80;
    rest.remove_prefix(7);
  } else {
    return fail("the scheme must be https:// or http://");
  }
  if (rest.find_first_of("?#") != std::string_view::npos)
    return fail("no query or fragment allowed");
  auto slash = rest.find('/');
  if (slash != std::string_view::npos) {
    std::string_view path = rest.substr(slash);
    while (!path.empty() && path.back() == '/')
      path.remove_suffix(1);
    out.base_path = std::string(path);
    rest = rest.substr(0, slash);
  }
  if (rest.find('@') != std::string_view::npos)
    return fail("no user information allowed");
  out.authority = std::string(rest);
  std::string_view port_text;
  if (!rest.empty() && rest.front() == '[') {
    auto close = rest.find(']');
    if (close == std::string_view::npos)
      return fail("unclosed '[' in the host");
    out.host = std::string(rest.substr(1, close - 1));
    auto after = rest.substr(close + 1);
    if (!after.empty()) {
      if (after.front() != ':')
        return fail("expected ':PORT' after ']'");
      port_text = after.substr(1);
    }
  } else {
    auto colon = rest.rfind(':');
    out.host = std::string(rest.substr(0, colon));
    if (colon != std::string_view::npos)
      port_text = rest.substr(colon + 1);
  }
  if (out.host.empty())
    return fail("no host");
  if (!port_text.empty() || (rest.size() > 0 && rest.back() == ':')) {
    unsigned port = 0;
    auto [end, ec] = std::from_chars(port_text.data(), port_text.data() + port_text.size(), port);
    if (ec != std::errc{} || end != port_text.data() + port_text.size() || port == 0 ||
        port > 65535) {
      return fail("port '" + std::string(port_text) + "' must be 1 to 65535");
    }
    out.port = port;
  }
  return out;
}

enum class wait_end { done, timed_out, interrupted };

}  // namespace

struct hub_client::impl {
  impl(hub_client_options o, parsed_url u, kj::AsyncIoContext ctx)
      : options(std::move(o)), url(std::move(u)), io(kj::mv(ctx)) {
    auth_value = options.token.empty() ? std::string() : "Bearer " + options.token;
    url_text = options.url;
    while (!url_text.empty() && url_text.back() == '/')
      url_text.pop_back();
  }

  ~impl() {
    http = nullptr;  // before the stream it speaks over
    stream = nullptr;
  }

  hub_client_options options;
  parsed_url url;
  std::string url_text;
  std::string auth_value;
  kj::AsyncIoContext io;
  kj::HttpHeaderTable table;
  kj::Array<kj::TlsCertificate> trusted;  // the context points into it
  kj::Own<kj::TlsContext> tls;
  kj::Own<kj::NetworkAddress> address;
  kj::Own<kj::AsyncIoStream> stream;
  kj::Own<kj::HttpClient> http;
  std::chrono::steady_clock::time_point last_used{};
  std::vector<int> signals;
  bool interrupted = false;
  int last_status = 0;

  /// Waits for `work`, at most `timeout` (0: no limit), ending early on a captured
  /// signal. Rethrows the work's kj::Exception.
  wait_end wait_for(kj::Promise<void> work, std::chrono::milliseconds timeout) {
    if (interrupted)
      return wait_end::interrupted;
    wait_end end = wait_end::done;
    if (timeout.count() > 0) {
      work = work.exclusiveJoin(
        io.provider->getTimer().afterDelay(timeout.count() * kj::MILLISECONDS).then([&end] {
          end = wait_end::timed_out;
        }));
    }
    for (int signo : signals) {
      work = work.exclusiveJoin(io.unixEventPort.onSignal(signo).then([this, &end](siginfo_t) {
        interrupted = true;
        end = wait_end::interrupted;
      }));
    }
    work.wait(io.waitScope);
    return end;
  }

  void drop_connection() {
    http = nullptr;
    stream = nullptr;
  }

  /// Opens a new connection (TCP, then TLS) in place of the current one.
  expected<void> open() {
    drop_connection();
    kj::Own<kj::AsyncIoStream> opened;
    auto work = kj::Promise<void>(kj::READY_NOW);
    if (address.get() == nullptr) {
      work = io.provider->getNetwork()
               .parseAddress(kj::StringPtr(url.authority.c_str()), url.port)
               .then([this](kj::Own<kj::NetworkAddress> a) { address = kj::mv(a); });
    }
    auto connected =
      work.then([this] { return address->connect(); })
        .then([this](kj::Own<kj::AsyncIoStream> raw) -> kj::Promise<kj::Own<kj::AsyncIoStream>> {
          if (tls.get() == nullptr)
            return kj::mv(raw);
          return tls->wrapClient(kj::mv(raw), kj::StringPtr(options.hub_id.c_str()));
        })
        .then([&opened](kj::Own<kj::AsyncIoStream> s) { opened = kj::mv(s); });
    wait_end end = wait_end::done;
    KJ_IF_MAYBE (e, kj::runCatchingExceptions(
                      [&] { end = wait_for(kj::mv(connected), options.connect_timeout); })) {
      std::string why = describe(*e);
      if (tls.get() != nullptr && why.find("certificate") != std::string::npos)
        why += " (the hub's certificate must chain to " + options.ca_path + " and name '" +
               options.hub_id + "': see --hub-id)";
      return make_error(errc::unavailable, "cannot connect to " + url_text + ": " + why);
    }
    if (end == wait_end::timed_out) {
      return make_error(errc::timeout, "cannot connect to " + url_text + ": no connection within " +
                                         std::to_string(options.connect_timeout.count()) + " ms");
    }
    if (end == wait_end::interrupted)
      return make_error(errc::failed, "connecting to " + url_text + ": interrupted");
    stream = kj::mv(opened);
    http = kj::newHttpClient(table, *stream);
    last_used = std::chrono::steady_clock::now();
    return {};
  }

  struct answer {
    int status = 0;
    std::string status_text;
    std::string body;
  };

  /// One request on the current connection.
  kj::Promise<void> exchange(kj::HttpMethod method, const std::string& target,
                             const std::string& body, bool has_body, answer& out) {
    kj::HttpHeaders headers(table);
    headers.set(kj::HttpHeaderId::HOST, kj::StringPtr(url.authority.c_str()));
    headers.add("Accept", "application/json");
    if (!auth_value.empty())
      headers.add("Authorization", kj::StringPtr(auth_value.c_str()));
    if (has_body)
      headers.set(kj::HttpHeaderId::CONTENT_TYPE, "application/json");
    // request() serializes the headers at once: `headers` may go after it.
    auto req = http->request(method, kj::StringPtr(target.c_str()), headers,
                             static_cast<std::uint64_t>(has_body ? body.size() : 0));
    kj::Promise<void> sent = kj::READY_NOW;
    if (has_body && !body.empty())
      sent = req.body->write(body.data(), body.size());
    auto response = kj::mv(req.response);
    return sent
      .then([body_stream = kj::mv(req.body), response = kj::mv(response)]() mutable {
        body_stream = nullptr;  // the request is complete
        return kj::mv(response);
      })
      .then([&out](kj::HttpClient::Response r) {
        out.status = static_cast<int>(r.statusCode);
        out.status_text = std::string(r.statusText.cStr(), r.statusText.size());
        auto& in = *r.body;
        return in.readAllText(max_answer_bytes).attach(kj::mv(r.body)).then([&out](kj::String s) {
          out.body.assign(s.cStr(), s.size());
        });
      });
  }
};

hub_client::hub_client(std::unique_ptr<impl> state) : impl_(std::move(state)) {}

hub_client::~hub_client() = default;

expected<std::unique_ptr<hub_client>> hub_client::connect(hub_client_options options) {
  auto url = parse_url(options.url);
  if (!url)
    return std::move(url).err();
  if (options.hub_id.empty())
    options.hub_id = url->host;

  kj::Array<kj::TlsCertificate> trusted;
  if (url->tls) {
    if (options.ca_path.empty()) {
      return make_error(errc::invalid_argument,
                        "hub URL " + options.url +
                          ": https needs the fleet CA certificate (--ca FILE or CANOPY_CA)");
    }
    auto pem = certs::read_file(options.ca_path);
    if (!pem)
      return std::move(pem).err();
    auto anchors = parse_trust_anchors(*pem, "CA certificate " + options.ca_path);
    if (!anchors)
      return std::move(anchors).err();
    trusted = kj::mv(*anchors);
  }

  bool use_tls = url->tls;
  std::unique_ptr<impl> state;
  KJ_IF_MAYBE (e, kj::runCatchingExceptions([&] {
                 state =
                   std::make_unique<impl>(std::move(options), std::move(*url), kj::setupAsyncIo());
               })) {
    return make_error(errc::io_error, "cannot set up the KJ event loop: " + describe(*e));
  }
  if (use_tls) {
    state->trusted = kj::mv(trusted);
    kj::TlsContext::Options tls_options;
    tls_options.useSystemTrustStore = false;
    tls_options.trustedCertificates = state->trusted.asPtr();
    tls_options.minVersion = kj::TlsVersion::TLS_1_2;
    KJ_IF_MAYBE (e, kj::runCatchingExceptions(
                      [&] { state->tls = kj::heap<kj::TlsContext>(kj::mv(tls_options)); })) {
      return make_error(errc::failed, "cannot set up TLS: " + describe(*e));
    }
  }
  auto opened = state->open();
  if (!opened)
    return std::move(opened).err();
  return std::make_unique<hub_client>(std::move(state));
}

expected<nlohmann::json> hub_client::request(std::string_view method, std::string_view path,
                                             const nlohmann::json& body,
                                             std::chrono::milliseconds timeout) {
  auto& s = *impl_;
  s.last_status = 0;
  std::string method_text(method);
  kj::HttpMethod kj_method;
  KJ_IF_MAYBE (m, kj::tryParseHttpMethod(kj::StringPtr(method_text.c_str()))) {
    kj_method = *m;
  } else {
    return make_error(errc::invalid_argument, "request: unknown HTTP method '" + method_text + "'");
  }
  if (path.empty() || path.front() != '/')
    return make_error(errc::invalid_argument,
                      "request: path '" + std::string(path) + "' must start with '/'");
  std::string target = s.url.base_path + std::string(path);
  bool has_body = !body.is_null();
  std::string body_text =
    has_body ? body.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) : std::string();
  if (timeout.count() <= 0)
    timeout = s.options.request_timeout;
  std::string what = method_text + " " + std::string(path);
  bool idempotent = kj_method == kj::HttpMethod::GET || kj_method == kj::HttpMethod::PUT ||
                    kj_method == kj::HttpMethod::DELETE || kj_method == kj::HttpMethod::HEAD;

  impl::answer out;
  for (int attempt = 0;; ++attempt) {
    bool reused = s.http.get() != nullptr;
    if (reused && std::chrono::steady_clock::now() - s.last_used > max_idle) {
      s.drop_connection();
      reused = false;
    }
    if (!reused) {
      if (auto opened = s.open(); !opened)
        return std::move(opened).err();
    }
    out = impl::answer{};
    wait_end end = wait_end::done;
    auto failure = kj::runCatchingExceptions(
      [&] { end = s.wait_for(s.exchange(kj_method, target, body_text, has_body, out), timeout); });
    s.last_used = std::chrono::steady_clock::now();
    KJ_IF_MAYBE (e, failure) {
      s.drop_connection();
      if (reused && idempotent && attempt == 0 &&
          e->getType() == kj::Exception::Type::DISCONNECTED) {
        continue;  // the hub closed the kept connection: once more on a new one
      }
      return make_error(errc::unavailable, "lost the connection to the hub at " + s.url_text +
                                             " (" + what + "): " + describe(*e));
    }
    if (end == wait_end::timed_out) {
      s.drop_connection();
      return make_error(errc::timeout, "the hub at " + s.url_text + " did not answer " + what +
                                         " within " + std::to_string(timeout.count()) + " ms");
    }
    if (end == wait_end::interrupted) {
      s.drop_connection();
      return make_error(errc::failed, what + ": interrupted");
    }
    break;
  }

  s.last_status = out.status;
  nlohmann::json doc;
  bool parsed = true;
  if (!out.body.empty()) {
    doc = nlohmann::json::parse(out.body, nullptr, false);
    parsed = !doc.is_discarded();
  }
  if (out.status >= 200 && out.status < 300) {
    if (!parsed) {
      return make_error(
        errc::failed,
        "the hub answered " + what + " with a body that is not JSON: " + out.body.substr(0, 200));
    }
    return doc;
  }
  std::string message;
  if (parsed && doc.is_object() && doc.contains("error") && doc["error"].is_string())
    message = doc["error"].get<std::string>();
  else
    message = "HTTP " + std::to_string(out.status) + " " + out.status_text;
  return make_error(errc_of_http_status(out.status), message);
}

int hub_client::last_status() const noexcept {
  return impl_->last_status;
}

bool hub_client::pause(std::chrono::milliseconds duration) {
  auto& s = *impl_;
  if (s.interrupted)
    return false;
  wait_end end = wait_end::done;
  KJ_IF_MAYBE (e, kj::runCatchingExceptions([&] {
                 end = s.wait_for(
                   s.io.provider->getTimer().afterDelay(duration.count() * kj::MILLISECONDS),
                   std::chrono::milliseconds(0));
               })) {
    (void) e;  // a timer does not fail
  }
  return end != wait_end::interrupted;
}

void hub_client::interrupt_on(int signo) {
  auto& signals = impl_->signals;
  if (std::find(signals.begin(), signals.end(), signo) != signals.end())
    return;
  kj::UnixEventPort::captureSignal(signo);
  signals.push_back(signo);
}

bool hub_client::interrupted() const noexcept {
  return impl_->interrupted;
}

const std::string& hub_client::url() const noexcept {
  return impl_->url_text;
}

std::string hub_client::escape(std::string_view text) {
  static constexpr char hex[] = "0123456789ABCDEF";
  std::string out;
  out.reserve(text.size());
  for (char c : text) {
    auto u = static_cast<unsigned char>(c);
    if ((u >= 'A' && u <= 'Z') || (u >= 'a' && u <= 'z') || (u >= '0' && u <= '9') || c == '-' ||
        c == '.' || c == '_' || c == '~') {
      out += c;
    } else {
      out += '%';
      out += hex[u >> 4];
      out += hex[u & 15];
    }
  }
  return out;
}

}  // namespace canopy
