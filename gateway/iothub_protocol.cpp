// The Azure IoT Hub device protocol over MQTT (see the header for the sources).
#include "gateway/iothub_protocol.hpp"

#include "runtime/ascii.hpp"

#include <canopy/message.hpp>

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <limits>

namespace canopy::iothub {

namespace {

constexpr std::size_t max_user_name_length = 2048;
constexpr std::size_t max_client_id_length = 2 * max_id_length + 1;
constexpr std::size_t hmac_size = 32;  // SHA-256

error bad(std::string message) {
  return make_error(errc::invalid_argument, std::move(message));
}

bool istarts_with(std::string_view s, std::string_view prefix) noexcept {
  return s.size() >= prefix.size() && ascii::iequals(s.substr(0, prefix.size()), prefix);
}

// Untrusted text in an error message: quoted, at most 80 bytes, bytes outside
// printable ASCII as \xNN.
std::string shown(std::string_view s) {
  constexpr std::size_t limit = 80;
  std::string out = "'";
  for (std::size_t i = 0; i < s.size() && i < limit; ++i) {
    auto c = static_cast<unsigned char>(s[i]);
    if (c < 0x20 || c >= 0x7f || c == '\'' || c == '\\') {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", c);
      out += buf;
    } else {
      out += static_cast<char>(c);
    }
  }
  out += s.size() > limit ? "'..." : "'";
  return out;
}

// Offset of the first byte that is not part of well-formed UTF-8 (or is a
// U+0000), or npos.
std::size_t bad_utf8_at(std::string_view s) noexcept {
  std::size_t i = 0;
  while (i < s.size()) {
    auto c = static_cast<unsigned char>(s[i]);
    if (c == 0)
      return i;
    if (c < 0x80) {
      ++i;
      continue;
    }
    std::size_t len = 0;
    std::uint32_t cp = 0;
    if ((c & 0xe0) == 0xc0) {
      len = 2;
      cp = c & 0x1f;
    } else if ((c & 0xf0) == 0xe0) {
      len = 3;
      cp = c & 0x0f;
    } else if ((c & 0xf8) == 0xf0) {
      len = 4;
      cp = c & 0x07;
    } else {
      return i;
    }
    if (i + len > s.size())
      return i;
    for (std::size_t k = 1; k < len; ++k) {
      auto cc = static_cast<unsigned char>(s[i + k]);
      if ((cc & 0xc0) != 0x80)
        return i;
      cp = (cp << 6) | (cc & 0x3f);
    }
    // Overlong forms, surrogates and code points past U+10FFFF are not UTF-8.
    if ((len == 2 && cp < 0x80) || (len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000) ||
        cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
      return i;
    i += len;
  }
  return std::string_view::npos;
}

// A non-negative decimal that fits an int64 (at most 18 digits, so always fits).
std::optional<std::int64_t> parse_unsigned(std::string_view s) noexcept {
  if (s.empty() || s.size() > 18)
    return std::nullopt;
  std::int64_t v = 0;
  for (char c : s) {
    if (c < '0' || c > '9')
      return std::nullopt;
    v = v * 10 + (c - '0');
  }
  return v;
}

// A decimal int, optionally negative.
std::optional<int> parse_int(std::string_view s) noexcept {
  bool neg = !s.empty() && s[0] == '-';
  auto mag = parse_unsigned(neg ? s.substr(1) : s);
  if (!mag)
    return std::nullopt;
  std::int64_t v = neg ? -*mag : *mag;
  if (v < std::numeric_limits<int>::min() || v > std::numeric_limits<int>::max())
    return std::nullopt;
  return static_cast<int>(v);
}

bool id_char(char c) noexcept {
  if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9'))
    return true;
  switch (c) {
    case '-':
    case '.':
    case '+':
    case '%':
    case '_':
    case '#':
    case '*':
    case '?':
    case '!':
    case '(':
    case ')':
    case ',':
    case ':':
    case '=':
    case '@':
    case '$':
    case '\'':
      return true;
    default:
      return false;
  }
}

const char* id_rule = "1 to 128 ASCII letters, digits and - . + % _ # * ? ! ( ) , : = @ $ '";

// A device or module id segment of a topic names `id`: raw (as the SDKs write
// it) or percent-encoded (older Python SDKs).
bool segment_names(std::string_view segment, std::string_view id) {
  return segment == id ||
         (segment.find('%') != std::string_view::npos && percent_decode(segment) == id);
}

// -- ISO 8601 times ($.ctime) ---------------------------------------------------

// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
std::int64_t days_from_civil(std::int64_t y, unsigned m, unsigned d) noexcept {
  y -= m <= 2;
  const std::int64_t era = (y >= 0 ? y : y - 399) / 400;
  const auto yoe = static_cast<unsigned>(y - era * 400);
  const unsigned doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
  const unsigned doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
  return era * 146097 + static_cast<std::int64_t>(doe) - 719468;
}

void civil_from_days(std::int64_t z, std::int64_t& y, unsigned& m, unsigned& d) noexcept {
  z += 719468;
  const std::int64_t era = (z >= 0 ? z : z - 146096) / 146097;
  const auto doe = static_cast<unsigned>(z - era * 146097);
  const unsigned yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
  const unsigned doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
  const unsigned mp = (5 * doy + 2) / 153;
  d = doy - (153 * mp + 2) / 5 + 1;
  m = mp < 10 ? mp + 3 : mp - 9;
  y = static_cast<std::int64_t>(yoe) + era * 400 + (m <= 2);
}

// "YYYY-MM-DDTHH:MM:SS[.fraction](Z|+HH:MM|-HH:MM)" -> ms since the epoch.
std::optional<std::int64_t> parse_iso8601_ms(std::string_view s) noexcept {
  auto num = [&](std::size_t at, std::size_t n) -> std::optional<unsigned> {
    if (at + n > s.size())
      return std::nullopt;
    unsigned v = 0;
    for (std::size_t i = at; i < at + n; ++i) {
      if (s[i] < '0' || s[i] > '9')
        return std::nullopt;
      v = v * 10 + static_cast<unsigned>(s[i] - '0');
    }
    return v;
  };
  auto at = [&](std::size_t i, char c) { return i < s.size() && s[i] == c; };
  auto y = num(0, 4), mo = num(5, 2), d = num(8, 2), h = num(11, 2), mi = num(14, 2),
       se = num(17, 2);
  if (!y || !mo || !d || !h || !mi || !se || !at(4, '-') || !at(7, '-') ||
      !(at(10, 'T') || at(10, 't') || at(10, ' ')) || !at(13, ':') || !at(16, ':'))
    return std::nullopt;
  if (*mo < 1 || *mo > 12 || *d < 1 || *d > 31 || *h > 23 || *mi > 59 || *se > 60)
    return std::nullopt;
  std::size_t i = 19;
  std::int64_t ms = 0;
  if (at(i, '.')) {
    ++i;
    std::size_t digits = 0;
    while (i < s.size() && s[i] >= '0' && s[i] <= '9') {
      if (digits < 3)
        ms = ms * 10 + (s[i] - '0');
      ++digits;
      ++i;
    }
    if (digits == 0)
      return std::nullopt;
    for (std::size_t k = digits; k < 3; ++k)
      ms *= 10;
  }
  std::int64_t offset_s = 0;
  if (at(i, 'Z') || at(i, 'z')) {
    ++i;
  } else if (at(i, '+') || at(i, '-')) {
    auto oh = num(i + 1, 2), om = num(i + 4, 2);
    if (!oh || !om || !at(i + 3, ':') || *oh > 23 || *om > 59)
      return std::nullopt;
    offset_s = (s[i] == '-' ? -1 : 1) * static_cast<std::int64_t>(*oh * 3600 + *om * 60);
    i += 6;
  }
  if (i != s.size())
    return std::nullopt;
  std::int64_t secs = days_from_civil(*y, *mo, *d) * 86400 + *h * 3600 + *mi * 60 + *se - offset_s;
  return secs * 1000 + ms;
}

std::string format_iso8601_ms(std::int64_t ms) {
  std::int64_t secs = ms >= 0 ? ms / 1000 : -((-ms + 999) / 1000);
  auto frac = static_cast<unsigned>(ms - secs * 1000);
  std::int64_t days = secs >= 0 ? secs / 86400 : -((-secs + 86399) / 86400);
  auto rem = static_cast<unsigned>(secs - days * 86400);
  std::int64_t y;
  unsigned m, d;
  civil_from_days(days, y, m, d);
  char buf[64];
  std::snprintf(buf, sizeof buf, "%04lld-%02u-%02uT%02u:%02u:%02u.%03uZ", static_cast<long long>(y),
                m, d, rem / 3600, rem / 60 % 60, rem % 60, frac);
  return buf;
}

// -- crypto ---------------------------------------------------------------------

std::optional<std::array<unsigned char, hmac_size>> hmac_sha256(std::string_view key,
                                                                std::string_view data) {
  std::array<unsigned char, hmac_size> out{};
  unsigned int len = 0;
  if (HMAC(EVP_sha256(), key.data(), static_cast<int>(key.size()),
           reinterpret_cast<const unsigned char*>(data.data()), data.size(), out.data(),
           &len) == nullptr ||
      len != hmac_size)
    return std::nullopt;
  return out;
}

std::string to_string(const std::array<unsigned char, hmac_size>& a) {
  return std::string(reinterpret_cast<const char*>(a.data()), a.size());
}

// sr and path of a resource, decoded, without one trailing '/'.
std::pair<std::string_view, std::string_view> split_resource(std::string_view r) noexcept {
  if (!r.empty() && r.back() == '/')
    r.remove_suffix(1);
  auto slash = r.find('/');
  if (slash == std::string_view::npos)
    return {r, {}};
  return {r.substr(0, slash), r.substr(slash)};
}

bool same_resource(std::string_view got, std::string_view want) {
  auto [got_host, got_path] = split_resource(got);
  auto [want_host, want_path] = split_resource(want);
  if (!ascii::iequals(got_host, want_host))
    return false;
  if (got_path == want_path)
    return true;
  // The .NET SDK encodes the device id before it encodes the whole resource.
  return got_path.find('%') != std::string_view::npos && percent_decode(got_path) == want_path;
}

// The query of an $iothub topic: `rest` is what follows the fixed part, "/?..."
// or "?...". Fills rid (required) and version (if asked for).
expected<void> parse_iothub_query(std::string_view topic, std::string_view rest, inbound& in,
                                  bool want_version) {
  if (!rest.empty() && rest[0] == '/')
    rest.remove_prefix(1);
  if (rest.empty() || rest[0] != '?')
    return bad("topic " + shown(topic) + ": expected '/?$rid=' after " +
               shown(topic.substr(0, topic.size() - rest.size())));
  auto query = parse_property_bag(rest);
  if (!query)
    return bad("topic " + shown(topic) + ": query: " + query.err().message);
  bool have_rid = false;
  for (auto& [k, v] : *query) {
    if (k == "$rid") {
      have_rid = true;
      in.rid = v;
    } else if (k == "$version" && want_version) {
      auto n = parse_unsigned(v);
      if (!n)
        return bad("topic " + shown(topic) + ": $version " + shown(v) +
                   " is not a non-negative integer");
      in.version = *n;
    }
  }
  if (!have_rid || in.rid.empty())
    return bad("topic " + shown(topic) + ": no $rid (request id) in the query");
  if (in.rid.size() > max_rid_length)
    return bad("topic " + shown(topic) + ": $rid is " + std::to_string(in.rid.size()) +
               " bytes, at most " + std::to_string(max_rid_length));
  return {};
}

expected<inbound> parse_iothub_topic(std::string_view topic) {
  constexpr std::string_view get = "$iothub/twin/GET";
  constexpr std::string_view reported = "$iothub/twin/PATCH/properties/reported";
  constexpr std::string_view method_res = "$iothub/methods/res/";
  inbound in;
  if (topic.starts_with(get)) {
    in.kind = inbound_kind::twin_get;
    if (auto r = parse_iothub_query(topic, topic.substr(get.size()), in, false); !r)
      return std::move(r).err();
    return in;
  }
  if (topic.starts_with(reported)) {
    in.kind = inbound_kind::twin_patch_reported;
    if (auto r = parse_iothub_query(topic, topic.substr(reported.size()), in, true); !r)
      return std::move(r).err();
    return in;
  }
  if (topic.starts_with(method_res)) {
    in.kind = inbound_kind::method_response;
    auto rest = topic.substr(method_res.size());
    auto end = rest.find_first_of("/?");
    auto status_text = rest.substr(0, end);
    auto status = parse_int(status_text);
    if (!status)
      return bad("topic " + shown(topic) + ": method status " + shown(status_text) +
                 " is not an integer");
    in.status = *status;
    if (end == std::string_view::npos)
      return bad("topic " + shown(topic) + ": no $rid (request id) after the status");
    if (auto r = parse_iothub_query(topic, rest.substr(end), in, false); !r)
      return std::move(r).err();
    return in;
  }
  return bad("topic " + shown(topic) +
             ": not an $iothub topic a client publishes to ($iothub/twin/GET/?$rid=, "
             "$iothub/twin/PATCH/properties/reported/?$rid=, $iothub/methods/res/{status}/?$rid=)");
}

// devices/{d}/messages/events[/bag] and devices/{d}/modules/{m}/messages/events[/bag].
expected<inbound> parse_devices_topic(std::string_view topic, const client_identity& who) {
  constexpr std::string_view events = "messages/events";
  constexpr std::string_view modules = "modules/";
  auto rest = topic.substr(8);  // after "devices/"
  auto slash = rest.find('/');
  if (slash == std::string_view::npos)
    return bad("topic " + shown(topic) + ": expected devices/{deviceId}/messages/events/");
  auto device = rest.substr(0, slash);
  rest = rest.substr(slash + 1);
  std::optional<std::string_view> module;
  if (rest.starts_with(modules)) {
    rest = rest.substr(modules.size());
    slash = rest.find('/');
    if (slash == std::string_view::npos)
      return bad("topic " + shown(topic) +
                 ": expected devices/{deviceId}/modules/{moduleId}/messages/events/");
    module = rest.substr(0, slash);
    rest = rest.substr(slash + 1);
  }
  if (!rest.starts_with(events) || (rest.size() > events.size() && rest[events.size()] != '/'))
    return bad("topic " + shown(topic) + ": a client publishes telemetry to " +
               (module ? "devices/{deviceId}/modules/{moduleId}/messages/events/"
                       : "devices/{deviceId}/messages/events/") +
               ", not " + shown(rest));
  // Whose topic it is, against who is publishing.
  if (!segment_names(device, who.device_id))
    return bad("topic names device " + shown(device) + ", but the client is " +
               shown(who.to_string()));
  if (module && !who.is_module())
    return bad("topic names module " + shown(*module) + " of device " + shown(device) +
               ", but the client is the device itself (a device publishes to devices/" +
               who.device_id + "/messages/events/)");
  if (!module && who.is_module())
    return bad("topic is the device's own telemetry, but the client is module " +
               shown(who.to_string()) + " (a module publishes to devices/" + who.device_id +
               "/modules/" + who.module_id + "/messages/events/)");
  if (module && !segment_names(*module, who.module_id))
    return bad("topic names module " + shown(*module) + ", but the client is module " +
               shown(who.to_string()));
  inbound in;
  in.kind = module ? inbound_kind::module_output : inbound_kind::telemetry;
  auto bag_text = rest.size() > events.size() ? rest.substr(events.size() + 1) : std::string_view{};
  auto bag = parse_property_bag(bag_text);
  if (!bag)
    return bad("topic " + shown(topic) + ": " + bag.err().message);
  in.properties = std::move(*bag);
  for (auto& [k, v] : in.properties)
    if (k == sys::output_name)
      in.output = v;
  return in;
}

}  // namespace

// -- identities ----------------------------------------------------------------

std::string client_identity::to_string() const {
  return module_id.empty() ? device_id : device_id + "/" + module_id;
}

bool is_valid_id(std::string_view id) noexcept {
  return !id.empty() && id.size() <= max_id_length && std::all_of(id.begin(), id.end(), id_char);
}

expected<client_identity> parse_client_id(std::string_view client_id) {
  if (client_id.empty())
    return bad("client id is empty: IoT Hub needs {deviceId} or {deviceId}/{moduleId}");
  if (client_id.size() > max_client_id_length)
    return bad("client id " + shown(client_id) + " is " + std::to_string(client_id.size()) +
               " bytes, at most " + std::to_string(max_client_id_length));
  auto slash = client_id.find('/');
  client_identity who;
  who.device_id = std::string{client_id.substr(0, slash)};
  if (slash != std::string_view::npos) {
    auto module = client_id.substr(slash + 1);
    if (module.find('/') != std::string_view::npos)
      return bad("client id " + shown(client_id) +
                 ": more than one '/' (expected {deviceId} or {deviceId}/{moduleId})");
    if (module.empty())
      return bad("client id " + shown(client_id) + ": empty module id after '/'");
    if (!is_valid_id(module))
      return bad("client id " + shown(client_id) + ": module id " + shown(module) +
                 " is not a valid id (" + id_rule + ")");
    who.module_id = std::string{module};
  }
  if (who.device_id.empty())
    return bad("client id " + shown(client_id) + ": empty device id");
  if (!is_valid_id(who.device_id))
    return bad("client id " + shown(client_id) + ": device id " + shown(who.device_id) +
               " is not a valid id (" + id_rule + ")");
  return who;
}

expected<username_info> parse_username(std::string_view user_name) {
  constexpr const char* form = "{host}/{deviceId}[/{moduleId}]/?api-version=...";
  if (user_name.empty())
    return bad(std::string{"user name is empty: IoT Hub needs "} + form);
  if (user_name.size() > max_user_name_length)
    return bad("user name is " + std::to_string(user_name.size()) + " bytes, at most " +
               std::to_string(max_user_name_length));
  std::vector<std::string_view> segments;
  for (std::size_t pos = 0;;) {
    auto slash = user_name.find('/', pos);
    segments.push_back(user_name.substr(pos, slash - pos));
    if (slash == std::string_view::npos)
      break;
    pos = slash + 1;
  }
  std::string_view query_text;
  if (segments.back().starts_with('?')) {
    query_text = segments.back().substr(1);
  } else if (segments.back().find("api-version=") != std::string_view::npos) {
    query_text = segments.back();  // edgeHub's older form, without '?'
  } else {
    return bad("user name " + shown(user_name) + ": no query after the ids (expected " + form +
               ")");
  }
  // Segments: host, 1 or 2 ids, query.
  std::size_t ids = segments.size() >= 2 ? segments.size() - 2 : 0;
  if (ids < 1 || ids > 2)
    return bad("user name " + shown(user_name) + ": expected " + form + ", got " +
               std::to_string(ids) + " id segments");
  username_info u;
  u.host = std::string{segments[0]};
  if (u.host.empty())
    return bad("user name " + shown(user_name) + ": empty host name");
  if (bad_utf8_at(u.host) != std::string_view::npos ||
      std::any_of(u.host.begin(), u.host.end(),
                  [](char c) { return static_cast<unsigned char>(c) <= ' '; }))
    return bad("user name " + shown(user_name) + ": host name " + shown(u.host) +
               " holds spaces, control characters or bad UTF-8");
  u.device_id = std::string{segments[1]};
  if (!is_valid_id(u.device_id))
    return bad("user name " + shown(user_name) + ": device id " + shown(u.device_id) +
               " is not a valid id (" + id_rule + ")");
  if (ids == 2) {
    u.module_id = std::string{segments[2]};
    if (!is_valid_id(u.module_id))
      return bad("user name " + shown(user_name) + ": module id " + shown(u.module_id) +
                 " is not a valid id (" + id_rule + ")");
  }
  for (std::size_t pos = 0; pos <= query_text.size();) {
    auto amp = query_text.find('&', pos);
    if (amp == std::string_view::npos)
      amp = query_text.size();
    auto param = query_text.substr(pos, amp - pos);
    if (!param.empty()) {
      auto eq = param.find('=');
      auto name = percent_decode(param.substr(0, eq));
      auto value =
        eq == std::string_view::npos ? std::string{} : percent_decode(param.substr(eq + 1));
      bool seen = std::any_of(u.query.begin(), u.query.end(),
                              [&](const auto& kv) { return kv.first == name; });
      if (!seen) {
        if (name == "api-version")
          u.api_version = value;
        u.query.emplace_back(std::move(name), std::move(value));
      }
    }
    pos = amp + 1;
  }
  if (u.api_version.empty())
    return bad("user name " + shown(user_name) + ": no api-version in the query (expected " + form +
               ")");
  return u;
}

expected<void> check_same_identity(const client_identity& from_client_id,
                                   const username_info& from_user_name) {
  if (from_client_id.device_id != from_user_name.device_id)
    return bad("client id names device " + shown(from_client_id.device_id) +
               ", user name names device " + shown(from_user_name.device_id));
  if (from_client_id.module_id != from_user_name.module_id) {
    auto what = [](const std::string& m) {
      return m.empty() ? std::string{"no module"} : "module " + shown(m);
    };
    return bad("client id names " + what(from_client_id.module_id) + ", user name names " +
               what(from_user_name.module_id) + " (device " + shown(from_client_id.device_id) +
               ")");
  }
  return {};
}

std::string identity_resource(std::string_view host, const client_identity& who) {
  std::string r{host};
  r += "/devices/";
  r += who.device_id;
  if (who.is_module()) {
    r += "/modules/";
    r += who.module_id;
  }
  return r;
}

// -- property bags -------------------------------------------------------------

std::string percent_encode(std::string_view s) {
  static constexpr char hex[] = "0123456789ABCDEF";
  std::string out;
  out.reserve(s.size());
  for (char ch : s) {
    auto c = static_cast<unsigned char>(ch);
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' ||
        c == '.' || c == '_' || c == '~') {
      out += ch;
    } else {
      out += '%';
      out += hex[c >> 4];
      out += hex[c & 0xf];
    }
  }
  return out;
}

std::string percent_decode(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  for (std::size_t i = 0; i < s.size(); ++i) {
    int hi, lo;
    if (s[i] == '%' && i + 2 < s.size() && (hi = ascii::hex_value(s[i + 1])) >= 0 &&
        (lo = ascii::hex_value(s[i + 2])) >= 0) {
      out += static_cast<char>(hi * 16 + lo);
      i += 2;
    } else {
      out += s[i];
    }
  }
  return out;
}

expected<property_bag> parse_property_bag(std::string_view bag) {
  std::size_t base = 0;
  if (!bag.empty() && bag[0] == '?') {
    bag.remove_prefix(1);
    base = 1;
  }
  property_bag out;
  std::size_t index = 0;
  for (std::size_t pos = 0; pos <= bag.size();) {
    auto amp = bag.find('&', pos);
    if (amp == std::string_view::npos)
      amp = bag.size();
    auto segment = bag.substr(pos, amp - pos);
    if (!segment.empty()) {
      ++index;
      auto at = "property bag: property " + std::to_string(index) + " at byte " +
                std::to_string(base + pos);
      auto eq = segment.find('=');
      auto raw_name = segment.substr(0, eq);
      if (raw_name.empty())
        return bad(at + ": empty name");
      auto name = percent_decode(raw_name);
      auto value =
        eq == std::string_view::npos ? std::string{} : percent_decode(segment.substr(eq + 1));
      if (auto b = bad_utf8_at(name); b != std::string_view::npos)
        return bad(at + ": name " + shown(raw_name) +
                   " is not UTF-8 text once decoded (bad byte or U+0000 at byte " +
                   std::to_string(b) + " of the name)");
      if (auto b = bad_utf8_at(value); b != std::string_view::npos)
        return bad(at + " (" + shown(name) +
                   "): value is not UTF-8 text once decoded (bad byte or U+0000 at byte " +
                   std::to_string(b) + " of the value)");
      auto same = std::find_if(out.begin(), out.end(), [&](auto& kv) { return kv.first == name; });
      if (same != out.end()) {
        same->second = std::move(value);
      } else {
        if (out.size() == max_bag_properties)
          return bad(at + ": more than " + std::to_string(max_bag_properties) + " properties");
        out.emplace_back(std::move(name), std::move(value));
      }
    }
    pos = amp + 1;
  }
  return out;
}

std::string encode_property_bag(const property_bag& bag) {
  std::string out;
  for (auto& [k, v] : bag) {
    if (!out.empty())
      out += '&';
    out += percent_encode(k);
    out += '=';
    out += percent_encode(v);
  }
  return out;
}

void apply_property_bag(message_builder& b, const property_bag& bag) {
  for (auto& [k, v] : bag) {
    if (k == sys::message_id) {
      b.message_id(v);
    } else if (k == sys::correlation_id) {
      b.correlation_id(v);
    } else if (k == sys::content_type) {
      b.content_type(v);
    } else if (k == sys::content_encoding) {
      b.content_encoding(v);
    } else if (k == sys::user_id) {
      b.user_id(v);
    } else if (k == sys::output_name) {
      b.output_name(v);
    } else if (k == sys::creation_time) {
      if (auto ms = parse_iso8601_ms(v))
        b.creation_time_utc_ms(*ms);
      else
        b.property(k, v);
    } else if (k == sys::connection_device_id || k == sys::connection_module_id) {
      // Never taken from the wire: the server sets them from the identity.
    } else {
      b.property(k, v);
    }
  }
}

property_bag bag_of(const message& m) {
  property_bag bag;
  auto add = [&](std::string_view name, std::string_view value) {
    if (!value.empty())
      bag.emplace_back(std::string{name}, std::string{value});
  };
  add(sys::message_id, m.message_id());
  add(sys::correlation_id, m.correlation_id());
  add(sys::content_type, m.content_type());
  add(sys::content_encoding, m.content_encoding());
  add(sys::user_id, m.user_id());
  if (m.creation_time_utc_ms() != 0)
    add(sys::creation_time, format_iso8601_ms(m.creation_time_utc_ms()));
  add(sys::connection_device_id, m.connection_device_id());
  add(sys::connection_module_id, m.connection_module_id());
  add(sys::output_name, m.output_name());
  for (auto& prop : m.properties()) {
    // A property that shadows a system field set above would be a duplicate.
    bool dup =
      std::any_of(bag.begin(), bag.end(), [&](auto& kv) { return kv.first == prop.first; });
    if (!dup)
      bag.emplace_back(std::string{prop.first}, std::string{prop.second});
  }
  return bag;
}

// -- inbound topics --------------------------------------------------------------

const char* to_string(inbound_kind k) noexcept {
  switch (k) {
    case inbound_kind::telemetry:
      return "telemetry";
    case inbound_kind::module_output:
      return "module output";
    case inbound_kind::twin_get:
      return "twin get";
    case inbound_kind::twin_patch_reported:
      return "twin reported patch";
    case inbound_kind::method_response:
      return "method response";
  }
  return "?";
}

expected<inbound> parse_publish_topic(std::string_view topic, const client_identity& who) {
  if (topic.starts_with("$iothub/"))
    return parse_iothub_topic(topic);
  if (topic.starts_with("devices/"))
    return parse_devices_topic(topic, who);
  return bad("topic " + shown(topic) +
             ": not an IoT Hub topic (devices/{deviceId}/messages/events/, "
             "devices/{deviceId}/modules/{moduleId}/messages/events/, $iothub/twin/..., "
             "$iothub/methods/res/...)");
}

message build_message(const inbound& in, const client_identity& who, std::string_view body) {
  message_builder b;
  b.body(body);
  apply_property_bag(b, in.properties);
  b.connection_device_id(who.device_id);
  if (who.is_module())
    b.connection_module_id(who.module_id);
  if (!in.output.empty())
    b.output_name(in.output);
  return b.build();
}

// -- subscriptions ---------------------------------------------------------------

const char* to_string(subscription s) noexcept {
  switch (s) {
    case subscription::c2d:
      return "c2d";
    case subscription::twin_responses:
      return "twin responses";
    case subscription::desired_patches:
      return "desired patches";
    case subscription::methods:
      return "methods";
    case subscription::module_inputs:
      return "module inputs";
  }
  return "?";
}

expected<subscription> check_subscription(std::string_view filter, const client_identity& who) {
  if (filter.starts_with("$iothub/twin/res/"))
    return subscription::twin_responses;
  if (filter.starts_with("$iothub/twin/PATCH/properties/desired/"))
    return subscription::desired_patches;
  if (filter.starts_with("$iothub/methods/POST/"))
    return subscription::methods;
  if (filter.starts_with("devices/")) {
    auto rest = filter.substr(8);
    auto slash = rest.find('/');
    auto device = rest.substr(0, slash);
    rest = slash == std::string_view::npos ? std::string_view{} : rest.substr(slash + 1);
    if (rest == "messages/devicebound/#") {
      if (who.is_module())
        return bad("filter " + shown(filter) + ": C2D messages are for devices; module " +
                   shown(who.to_string()) + " subscribes to devices/" + who.device_id +
                   "/modules/" + who.module_id + "/#");
      if (device != "+" && !segment_names(device, who.device_id))
        return bad("filter " + shown(filter) + ": names device " + shown(device) +
                   ", but the client is " + shown(who.to_string()));
      return subscription::c2d;
    }
    if (rest.starts_with("modules/")) {
      rest = rest.substr(8);
      slash = rest.find('/');
      auto module = rest.substr(0, slash);
      rest = slash == std::string_view::npos ? std::string_view{} : rest.substr(slash + 1);
      if (rest == "#" || rest == "inputs/#") {
        if (!segment_names(device, who.device_id))
          return bad("filter " + shown(filter) + ": names device " + shown(device) +
                     ", but the client is " + shown(who.to_string()));
        if (!who.is_module())
          return bad("filter " + shown(filter) + ": module inputs are for modules; device " +
                     shown(who.device_id) + " subscribes to devices/" + who.device_id +
                     "/messages/devicebound/#");
        if (!segment_names(module, who.module_id))
          return bad("filter " + shown(filter) + ": names module " + shown(module) +
                     ", but the client is module " + shown(who.to_string()));
        return subscription::module_inputs;
      }
    }
  }
  return bad("filter " + shown(filter) +
             ": not a topic filter IoT Hub offers (devices/{deviceId}/messages/devicebound/#, "
             "devices/{deviceId}/modules/{moduleId}/#, $iothub/twin/res/#, "
             "$iothub/twin/PATCH/properties/desired/#, $iothub/methods/POST/#)");
}

// -- outbound topics -------------------------------------------------------------

std::string c2d_topic(std::string_view device, const message& m) {
  auto bag = bag_of(m);
  bool has_to = std::any_of(bag.begin(), bag.end(), [](auto& kv) { return kv.first == sys::to; });
  if (!has_to)
    bag.emplace_back(std::string{sys::to},
                     "/devices/" + std::string{device} + "/messages/deviceBound");
  std::string topic = "devices/";
  topic += device;
  topic += "/messages/devicebound/";
  topic += encode_property_bag(bag);
  return topic;
}

std::string module_input_topic(std::string_view device, std::string_view module,
                               std::string_view input, const message& m) {
  std::string topic = "devices/";
  topic += device;
  topic += "/modules/";
  topic += module;
  topic += "/inputs/";
  topic += input;
  topic += '/';
  topic += encode_property_bag(bag_of(m));
  return topic;
}

std::string twin_response_topic(int status, std::string_view rid,
                                std::optional<std::int64_t> version) {
  std::string topic =
    "$iothub/twin/res/" + std::to_string(status) + "/?$rid=" + percent_encode(rid);
  if (version)
    topic += "&$version=" + std::to_string(*version);
  return topic;
}

std::string desired_patch_topic(std::int64_t version) {
  return "$iothub/twin/PATCH/properties/desired/?$version=" + std::to_string(version);
}

std::string method_request_topic(std::string_view method, std::string_view rid) {
  return "$iothub/methods/POST/" + percent_encode(method) + "/?$rid=" + percent_encode(rid);
}

// -- SAS tokens ----------------------------------------------------------------

std::string base64_encode(std::string_view bytes) {
  static constexpr char alphabet[] =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  out.reserve((bytes.size() + 2) / 3 * 4);
  std::size_t i = 0;
  for (; i + 3 <= bytes.size(); i += 3) {
    std::uint32_t v = (static_cast<unsigned char>(bytes[i]) << 16) |
                      (static_cast<unsigned char>(bytes[i + 1]) << 8) |
                      static_cast<unsigned char>(bytes[i + 2]);
    out += alphabet[(v >> 18) & 63];
    out += alphabet[(v >> 12) & 63];
    out += alphabet[(v >> 6) & 63];
    out += alphabet[v & 63];
  }
  if (auto left = bytes.size() - i; left > 0) {
    std::uint32_t v = static_cast<unsigned char>(bytes[i]) << 16;
    if (left == 2)
      v |= static_cast<unsigned char>(bytes[i + 1]) << 8;
    out += alphabet[(v >> 18) & 63];
    out += alphabet[(v >> 12) & 63];
    out += left == 2 ? alphabet[(v >> 6) & 63] : '=';
    out += '=';
  }
  return out;
}

std::optional<std::string> base64_decode(std::string_view text) {
  auto value = [](char c) -> int {
    if (c >= 'A' && c <= 'Z')
      return c - 'A';
    if (c >= 'a' && c <= 'z')
      return c - 'a' + 26;
    if (c >= '0' && c <= '9')
      return c - '0' + 52;
    if (c == '+')
      return 62;
    if (c == '/')
      return 63;
    return -1;
  };
  // Padding: none, or enough to make whole quads (at most two '=').
  std::size_t pad = 0;
  while (pad < text.size() && pad < 2 && text[text.size() - 1 - pad] == '=')
    ++pad;
  auto body = text.substr(0, text.size() - pad);
  if (pad > 0 && text.size() % 4 != 0)
    return std::nullopt;
  if (body.size() % 4 == 1)
    return std::nullopt;
  std::string out;
  out.reserve(body.size() * 3 / 4);
  std::uint32_t acc = 0;
  int bits = 0;
  for (char c : body) {
    int v = value(c);
    if (v < 0)
      return std::nullopt;
    acc = (acc << 6) | static_cast<std::uint32_t>(v);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out += static_cast<char>((acc >> bits) & 0xff);
    }
  }
  return out;
}

expected<sas_token> parse_sas(std::string_view token) {
  constexpr std::string_view prefix = "SharedAccessSignature ";
  if (token.size() > max_sas_length)
    return bad("SAS token: malformed: " + std::to_string(token.size()) + " bytes, at most " +
               std::to_string(max_sas_length));
  if (!istarts_with(token, prefix))
    return bad("SAS token: malformed: does not start with 'SharedAccessSignature '");
  auto fields = token.substr(prefix.size());
  sas_token t;
  bool have_sr = false, have_sig = false, have_se = false, have_skn = false;
  for (std::size_t pos = 0; pos <= fields.size();) {
    auto amp = fields.find('&', pos);
    if (amp == std::string_view::npos)
      amp = fields.size();
    auto field = fields.substr(pos, amp - pos);
    pos = amp + 1;
    if (field.empty())
      continue;
    auto eq = field.find('=');
    auto name = field.substr(0, eq);
    if (eq == std::string_view::npos)
      return bad("SAS token: malformed: field " + shown(name) + " has no '='");
    auto value = field.substr(eq + 1);
    auto once = [&](bool& have) -> expected<void> {
      if (have)
        return bad("SAS token: malformed: field " + std::string{name} + " given twice");
      have = true;
      return {};
    };
    if (ascii::iequals(name, "sr")) {
      if (auto r = once(have_sr); !r)
        return std::move(r).err();
      if (value.empty())
        return bad("SAS token: malformed: field sr is empty");
      t.resource_as_sent = std::string{value};
      t.resource = percent_decode(value);
    } else if (ascii::iequals(name, "sig")) {
      if (auto r = once(have_sig); !r)
        return std::move(r).err();
      auto raw = base64_decode(percent_decode(value));
      if (!raw)
        return bad("SAS token: malformed: field sig is not base64");
      if (raw->size() != hmac_size)
        return bad("SAS token: malformed: field sig is " + std::to_string(raw->size()) +
                   " bytes, an HMAC-SHA256 is 32");
      t.signature = std::move(*raw);
    } else if (ascii::iequals(name, "se")) {
      if (auto r = once(have_se); !r)
        return std::move(r).err();
      auto se = parse_unsigned(value);
      if (!se)
        return bad("SAS token: malformed: field se " + shown(value) +
                   " is not a number of seconds since 1970");
      t.expiry_s = *se;
      t.expiry_text = std::string{value};
    } else if (ascii::iequals(name, "skn")) {
      if (auto r = once(have_skn); !r)
        return std::move(r).err();
      t.key_name = percent_decode(value);
    }
    // Other fields: ignored, as the services do.
  }
  if (!have_sr)
    return bad("SAS token: malformed: field sr (resource) missing");
  if (!have_sig)
    return bad("SAS token: malformed: field sig (signature) missing");
  if (!have_se)
    return bad("SAS token: malformed: field se (expiry) missing");
  return t;
}

expected<void> verify_sas(const sas_token& token, std::string_view key_base64,
                          std::string_view expected_resource, std::int64_t now_s) {
  if (!same_resource(token.resource, expected_resource))
    return bad("SAS token: signed for resource " + shown(token.resource) + ", expected " +
               shown(expected_resource));
  auto key = base64_decode(key_base64);
  if (!key || key->empty())
    return bad("SAS token: malformed: key is not base64 (or is empty)");
  auto mac = hmac_sha256(*key, token.resource_as_sent + "\n" + token.expiry_text);
  if (!mac)
    return make_error(errc::failed, "SAS token: HMAC-SHA256 failed (OpenSSL)");
  if (token.signature.size() != hmac_size ||
      CRYPTO_memcmp(mac->data(), token.signature.data(), hmac_size) != 0)
    return bad("SAS token: signature does not match");
  if (now_s >= token.expiry_s)
    return bad("SAS token: expired at " + std::to_string(token.expiry_s) + " (now " +
               std::to_string(now_s) + ")");
  return {};
}

expected<std::string> make_sas(std::string_view resource, std::string_view key_base64,
                               std::int64_t expiry_s, std::string_view key_name) {
  auto key = base64_decode(key_base64);
  if (!key || key->empty())
    return bad("make_sas: key is not base64 (or is empty)");
  auto sr = percent_encode(resource);
  auto se = std::to_string(expiry_s);
  auto mac = hmac_sha256(*key, sr + "\n" + se);
  if (!mac)
    return make_error(errc::failed, "make_sas: HMAC-SHA256 failed (OpenSSL)");
  std::string token = "SharedAccessSignature sr=" + sr +
                      "&sig=" + percent_encode(base64_encode(to_string(*mac))) + "&se=" + se;
  if (!key_name.empty())
    token += "&skn=" + percent_encode(key_name);
  return token;
}

}  // namespace canopy::iothub
