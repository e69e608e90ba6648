#include "gateway/mqtt_codec.hpp"

#include <algorithm>
#include <cstring>
#include <utility>

namespace canopy::mqtt {

namespace {

constexpr std::size_t max_string = 65535;
constexpr std::size_t npos = std::string_view::npos;
// A buffer larger than this is freed once everything in it is decoded.
constexpr std::size_t keep_capacity = 4096;

const char* const type_names[16] = {
  "reserved packet type 0",
  "CONNECT",
  "CONNACK",
  "PUBLISH",
  "PUBACK",
  "PUBREC",
  "PUBREL",
  "PUBCOMP",
  "SUBSCRIBE",
  "SUBACK",
  "UNSUBSCRIBE",
  "UNSUBACK",
  "PINGREQ",
  "PINGRESP",
  "DISCONNECT",
  "reserved packet type 15",
};

std::string hex_byte(unsigned b) {
  static const char digits[] = "0123456789abcdef";
  std::string s = "0x";
  s += digits[(b >> 4) & 0xf];
  s += digits[b & 0xf];
  return s;
}

// A string from the network, quoted for a log line: printable ASCII as is,
// anything else as \xNN, at most 32 bytes.
std::string quoted(std::string_view s) {
  static const char digits[] = "0123456789abcdef";
  std::string out = "\"";
  const std::size_t n = std::min<std::size_t>(s.size(), 32);
  for (std::size_t i = 0; i < n; ++i) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c >= 0x20 && c < 0x7f && c != '"' && c != '\\') {
      out += static_cast<char>(c);
    } else {
      out += "\\x";
      out += digits[c >> 4];
      out += digits[c & 0xf];
    }
  }
  out += '"';
  if (s.size() > n)
    out += "...";
  return out;
}

// "PUBLISH at byte 7: <message>"
error packet_error(const char* type_name, std::size_t at, std::string_view message,
                   errc code = errc::invalid_argument) {
  std::string m = type_name;
  m += " at byte ";
  m += std::to_string(at);
  m += ": ";
  m += message;
  return make_error(code, std::move(m));
}

// What is wrong with a string, and where in it.
struct string_problem {
  std::size_t at;
  std::string what;
};

std::string utf8_problem(std::string_view s, std::size_t at) {
  const auto c = static_cast<unsigned char>(s[at]);
  if (c == 0)
    return "U+0000 is not allowed";
  return "ill-formed UTF-8 (sequence starting " + hex_byte(c) + ")";
}

std::optional<string_problem> utf8_string_problem(std::string_view s) {
  if (s.size() > max_string)
    return string_problem{max_string, "longer than 65535 bytes"};
  const std::size_t bad = find_bad_utf8(s);
  if (bad != npos)
    return string_problem{bad, utf8_problem(s, bad)};
  return std::nullopt;
}

std::optional<string_problem> topic_name_problem(std::string_view s) {
  if (s.empty())
    return string_problem{0, "must not be empty"};
  if (auto p = utf8_string_problem(s))
    return p;
  const std::size_t w = s.find_first_of("+#");
  if (w != npos)
    return string_problem{w, std::string("wildcard '") + s[w] + "' is not allowed in a topic name"};
  return std::nullopt;
}

std::optional<string_problem> topic_filter_problem(std::string_view s) {
  if (s.empty())
    return string_problem{0, "must not be empty"};
  if (auto p = utf8_string_problem(s))
    return p;
  const std::size_t n = s.size();
  for (std::size_t i = s.find_first_of("+#"); i != npos; i = s.find_first_of("+#", i + 1)) {
    const bool starts_level = i == 0 || s[i - 1] == '/';
    if (s[i] == '+') {
      if (!starts_level || (i + 1 < n && s[i + 1] != '/'))
        return string_problem{i, "'+' must be a whole level"};
    } else if (!starts_level || i + 1 != n) {
      return string_problem{i, "'#' must be a whole level and the last one"};
    }
  }
  return std::nullopt;
}

// Reads the fields of one packet's body (the bytes after the fixed header).
// Offsets in errors count from the start of the packet (its first header byte).
class body_cursor {
 public:
  body_cursor(packet_type type, std::string_view body, std::size_t header_len) noexcept
      : name_(type_names[static_cast<unsigned>(type)]), body_(body), header_len_(header_len) {}

  std::size_t at() const noexcept { return header_len_ + pos_; }
  std::size_t left() const noexcept { return body_.size() - pos_; }

  bool fail_at(std::size_t at, std::string_view message, errc code = errc::invalid_argument) {
    err_ = packet_error(name_, at, message, code);
    return false;
  }

  bool read_u8(const char* field, std::uint8_t& out) {
    if (left() < 1)
      return fail_at(at(), std::string(field) + " is missing (the packet ends)");
    out = static_cast<std::uint8_t>(body_[pos_]);
    ++pos_;
    return true;
  }

  bool read_u16(const char* field, std::uint16_t& out) {
    if (left() < 2)
      return fail_at(at(), std::string(field) + " needs 2 bytes, " + std::to_string(left()) +
                             " left in the packet");
    out = static_cast<std::uint16_t>((static_cast<unsigned char>(body_[pos_]) << 8) |
                                     static_cast<unsigned char>(body_[pos_ + 1]));
    pos_ += 2;
    return true;
  }

  bool read_packet_id(std::uint16_t& out) {
    const std::size_t start = at();
    if (!read_u16("packet identifier", out))
      return false;
    if (out == 0)
      return fail_at(start, "packet identifier is 0 (must be non-zero)");
    return true;
  }

  // A 2-byte length and that many bytes (MQTT-1.5.3 strings, binary data).
  bool read_binary(const char* field, std::string_view& out) {
    const std::size_t start = at();
    std::uint16_t len = 0;
    if (left() < 2)
      return fail_at(start, std::string(field) + " length needs 2 bytes, " +
                              std::to_string(left()) + " left in the packet");
    read_u16(field, len);
    if (len > left())
      return fail_at(start, std::string(field) + " length " + std::to_string(len) +
                              " exceeds the packet (" + std::to_string(left()) + " bytes left)");
    out = body_.substr(pos_, len);
    pos_ += len;
    return true;
  }

  bool read_utf8(const char* field, std::string_view& out) {
    if (!read_binary(field, out))
      return false;
    const std::size_t bad = find_bad_utf8(out);
    if (bad != npos)
      return fail_at(at() - out.size() + bad, std::string(field) + ": " + utf8_problem(out, bad));
    return true;
  }

  bool read_checked(const char* field, std::string_view& out,
                    std::optional<string_problem> (*check)(std::string_view)) {
    if (!read_binary(field, out))
      return false;
    if (auto p = check(out))
      return fail_at(at() - out.size() + p->at, std::string(field) + ": " + p->what);
    return true;
  }

  std::string_view read_rest() noexcept {
    auto rest = body_.substr(pos_);
    pos_ = body_.size();
    return rest;
  }

  // No bytes may follow the last field.
  bool finish() {
    if (left() != 0)
      return fail_at(at(), std::to_string(left()) + " unexpected bytes after the last field");
    return true;
  }

  error take_error() { return std::move(err_); }

 private:
  const char* name_;
  std::string_view body_;
  std::size_t header_len_;
  std::size_t pos_ = 0;
  error err_;
};

expected<packet> decode_connect(body_cursor& c) {
  connect_packet p;
  const std::size_t name_at = c.at();
  std::string_view name;
  if (!c.read_binary("protocol name", name))
    return c.take_error();
  if (name == "MQIsdp") {
    c.fail_at(name_at,
              "protocol \"MQIsdp\" (MQTT 3.1) is not supported, only \"MQTT\" level 4 (MQTT 3.1.1)",
              errc::incompatible);
    return c.take_error();
  }
  if (name != "MQTT") {
    c.fail_at(name_at, "protocol name " + quoted(name) + " is not \"MQTT\"");
    return c.take_error();
  }
  const std::size_t level_at = c.at();
  if (!c.read_u8("protocol level", p.protocol_level))
    return c.take_error();
  if (p.protocol_level != 4) {
    c.fail_at(level_at,
              "protocol level " + std::to_string(p.protocol_level) +
                " is not supported, only 4 (MQTT 3.1.1)",
              errc::incompatible);
    return c.take_error();
  }
  const std::size_t flags_at = c.at();
  std::uint8_t flags = 0;
  if (!c.read_u8("connect flags", flags))
    return c.take_error();
  const bool will = flags & 0x04;
  const std::uint8_t will_qos = (flags >> 3) & 3;
  const bool will_retain = flags & 0x20;
  const bool has_password = flags & 0x40;
  const bool has_user = flags & 0x80;
  if (flags & 0x01) {
    c.fail_at(flags_at, "connect flags " + hex_byte(flags) + ": the reserved bit 0 is set");
    return c.take_error();
  }
  if (!will && (will_qos != 0 || will_retain)) {
    c.fail_at(flags_at, "connect flags " + hex_byte(flags) +
                          ": will QoS or will retain set without the will flag");
    return c.take_error();
  }
  if (will_qos == 3) {
    c.fail_at(flags_at, "connect flags " + hex_byte(flags) + ": will QoS 3 is invalid");
    return c.take_error();
  }
  if (has_password && !has_user) {
    c.fail_at(flags_at, "connect flags " + hex_byte(flags) +
                          ": password flag set without the user name flag");
    return c.take_error();
  }
  p.protocol_name.assign(name);
  p.clean_session = flags & 0x02;
  if (!c.read_u16("keep alive", p.keep_alive_s))
    return c.take_error();
  std::string_view s;
  if (!c.read_utf8("client id", s))
    return c.take_error();
  p.client_id.assign(s);
  if (will) {
    will_message w;
    w.qos = will_qos;
    w.retain = will_retain;
    if (!c.read_checked("will topic", s, topic_name_problem))
      return c.take_error();
    w.topic.assign(s);
    if (!c.read_binary("will message", s))
      return c.take_error();
    w.payload.assign(s);
    p.will = std::move(w);
  }
  if (has_user) {
    if (!c.read_utf8("user name", s))
      return c.take_error();
    p.username.emplace(s);
  }
  if (has_password) {
    if (!c.read_binary("password", s))
      return c.take_error();
    p.password.emplace(s);
  }
  if (!c.finish())
    return c.take_error();
  return packet(std::move(p));
}

expected<packet> decode_connack(body_cursor& c) {
  connack_packet p;
  const std::size_t flags_at = c.at();
  std::uint8_t flags = 0, code = 0;
  if (!c.read_u8("acknowledge flags", flags))
    return c.take_error();
  if (flags & 0xfe) {
    c.fail_at(flags_at, "acknowledge flags " + hex_byte(flags) + ": reserved bits 7-1 are set");
    return c.take_error();
  }
  const std::size_t code_at = c.at();
  if (!c.read_u8("return code", code))
    return c.take_error();
  if (code > 5) {
    c.fail_at(code_at, "return code " + std::to_string(code) + " is reserved");
    return c.take_error();
  }
  if (code != 0 && flags != 0) {
    c.fail_at(flags_at,
              "session present set with the refusing return code " + std::to_string(code));
    return c.take_error();
  }
  p.session_present = flags != 0;
  p.return_code = static_cast<connack_code>(code);
  if (!c.finish())
    return c.take_error();
  return packet(p);
}

expected<packet> decode_publish(body_cursor& c, std::uint8_t flags) {
  // The flags were checked with the fixed header (QoS 3, DUP with QoS 0).
  publish_packet p;
  p.retain = flags & 0x01;
  p.qos = (flags >> 1) & 3;
  p.dup = flags & 0x08;
  std::string_view topic;
  if (!c.read_checked("topic name", topic, topic_name_problem))
    return c.take_error();
  if (p.qos != 0 && !c.read_packet_id(p.packet_id))
    return c.take_error();
  p.topic.assign(topic);
  p.payload.assign(c.read_rest());
  return packet(std::move(p));
}

template <class Ack>
expected<packet> decode_ack(body_cursor& c) {
  Ack p;
  if (!c.read_packet_id(p.packet_id) || !c.finish())
    return c.take_error();
  return packet(p);
}

expected<packet> decode_subscribe(body_cursor& c) {
  subscribe_packet p;
  if (!c.read_packet_id(p.packet_id))
    return c.take_error();
  if (c.left() == 0) {
    c.fail_at(c.at(), "no topic filter (a SUBSCRIBE needs at least one)");
    return c.take_error();
  }
  while (c.left() != 0) {
    subscription sub;
    std::string_view filter;
    if (!c.read_checked("topic filter", filter, topic_filter_problem))
      return c.take_error();
    const std::size_t qos_at = c.at();
    if (!c.read_u8("requested QoS", sub.qos))
      return c.take_error();
    if (sub.qos > 2) {
      c.fail_at(qos_at, "requested QoS byte " + hex_byte(sub.qos) +
                          (sub.qos == 3 ? " is invalid (QoS 3)" : " has reserved bits set"));
      return c.take_error();
    }
    sub.filter.assign(filter);
    p.subscriptions.push_back(std::move(sub));
  }
  return packet(std::move(p));
}

expected<packet> decode_suback(body_cursor& c) {
  suback_packet p;
  if (!c.read_packet_id(p.packet_id))
    return c.take_error();
  if (c.left() == 0) {
    c.fail_at(c.at(), "no return code (a SUBACK needs at least one)");
    return c.take_error();
  }
  const std::size_t codes_at = c.at();
  const std::string_view codes = c.read_rest();
  for (std::size_t i = 0; i < codes.size(); ++i) {
    const auto code = static_cast<std::uint8_t>(codes[i]);
    if (code > 2 && code != suback_failure) {
      c.fail_at(codes_at + i, "return code " + hex_byte(code) + " is reserved");
      return c.take_error();
    }
  }
  p.return_codes.assign(codes.begin(), codes.end());
  return packet(std::move(p));
}

expected<packet> decode_unsubscribe(body_cursor& c) {
  unsubscribe_packet p;
  if (!c.read_packet_id(p.packet_id))
    return c.take_error();
  if (c.left() == 0) {
    c.fail_at(c.at(), "no topic filter (an UNSUBSCRIBE needs at least one)");
    return c.take_error();
  }
  while (c.left() != 0) {
    std::string_view filter;
    if (!c.read_checked("topic filter", filter, topic_filter_problem))
      return c.take_error();
    p.filters.emplace_back(filter);
  }
  return packet(std::move(p));
}

expected<packet> decode_body(std::uint8_t byte0, std::string_view body, std::size_t header_len) {
  const auto type = static_cast<packet_type>(byte0 >> 4);
  body_cursor c(type, body, header_len);
  switch (type) {
    case packet_type::connect:
      return decode_connect(c);
    case packet_type::connack:
      return decode_connack(c);
    case packet_type::publish:
      return decode_publish(c, byte0 & 0x0f);
    case packet_type::puback:
      return decode_ack<puback_packet>(c);
    case packet_type::pubrec:
      return decode_ack<pubrec_packet>(c);
    case packet_type::pubrel:
      return decode_ack<pubrel_packet>(c);
    case packet_type::pubcomp:
      return decode_ack<pubcomp_packet>(c);
    case packet_type::subscribe:
      return decode_subscribe(c);
    case packet_type::suback:
      return decode_suback(c);
    case packet_type::unsubscribe:
      return decode_unsubscribe(c);
    case packet_type::unsuback:
      return decode_ack<unsuback_packet>(c);
    case packet_type::pingreq:
      return packet(pingreq_packet{});
    case packet_type::pingresp:
      return packet(pingresp_packet{});
    case packet_type::disconnect:
      return packet(disconnect_packet{});
  }
  // Unreachable: the fixed header check refuses types 0 and 15.
  return packet_error("packet", 0, "reserved packet type " + std::to_string(byte0 >> 4));
}

// The fixed header's first byte: a known type with the flags MQTT-2.2.2 allows.
std::optional<error> check_first_byte(std::uint8_t byte0) {
  const unsigned type = byte0 >> 4;
  const unsigned flags = byte0 & 0x0f;
  if (type == 0 || type == 15)
    return packet_error("packet", 0, "reserved packet type " + std::to_string(type));
  const char* name = type_names[type];
  const auto t = static_cast<packet_type>(type);
  if (t == packet_type::publish) {
    const unsigned qos = (flags >> 1) & 3;
    if (qos == 3)
      return packet_error(name, 0, "fixed header flags " + hex_byte(flags) + ": QoS 3 is invalid");
    if (qos == 0 && (flags & 0x08))
      return packet_error(name, 0,
                          "fixed header flags " + hex_byte(flags) + ": DUP is set with QoS 0");
    return std::nullopt;
  }
  const unsigned required =
    t == packet_type::pubrel || t == packet_type::subscribe || t == packet_type::unsubscribe ? 2
                                                                                             : 0;
  if (flags != required)
    return packet_error(
      name, 0, "fixed header flags are " + hex_byte(flags) + ", must be " + hex_byte(required));
  return std::nullopt;
}

// The remaining length a packet type requires, or npos when it varies.
std::size_t fixed_remaining_length(packet_type t) noexcept {
  switch (t) {
    case packet_type::connack:
    case packet_type::puback:
    case packet_type::pubrec:
    case packet_type::pubrel:
    case packet_type::pubcomp:
    case packet_type::unsuback:
      return 2;
    case packet_type::pingreq:
    case packet_type::pingresp:
    case packet_type::disconnect:
      return 0;
    default:
      return npos;
  }
}

struct fixed_header {
  std::uint8_t byte0;
  std::size_t header_len;  // 2..5
  std::size_t remaining;
};

// Reads the fixed header at the start of data: nullopt when more bytes are
// needed, an error as soon as the bytes seen are wrong.
expected<std::optional<fixed_header>> read_fixed_header(std::string_view data,
                                                        std::size_t max_packet_size) {
  if (data.empty())
    return std::optional<fixed_header>{};
  const auto byte0 = static_cast<std::uint8_t>(data[0]);
  if (auto err = check_first_byte(byte0))
    return std::move(*err);
  const char* name = type_names[byte0 >> 4];
  std::size_t remaining = 0;
  std::size_t i = 1;
  for (unsigned shift = 0;; shift += 7, ++i) {
    if (i >= data.size())
      return std::optional<fixed_header>{};
    const auto b = static_cast<unsigned char>(data[i]);
    remaining |= static_cast<std::size_t>(b & 0x7f) << shift;
    if ((b & 0x80) == 0)
      break;
    if (i == 4)
      return packet_error(name, 4, "remaining length uses more than 4 bytes");
  }
  if (remaining > max_packet_size)
    return packet_error(name, 1,
                        "packet of " + std::to_string(remaining) +
                          " bytes (remaining length) exceeds the maximum of " +
                          std::to_string(max_packet_size));
  const std::size_t required = fixed_remaining_length(static_cast<packet_type>(byte0 >> 4));
  if (required != npos && remaining != required)
    return packet_error(
      name, 1,
      "remaining length is " + std::to_string(remaining) + ", must be " + std::to_string(required));
  return std::optional<fixed_header>(fixed_header{byte0, i + 1, remaining});
}

// ---- encoding ----

std::size_t varint_size(std::size_t n) noexcept {
  std::size_t size = 1;
  while (n >= 128) {
    n >>= 7;
    ++size;
  }
  return size;
}

void put_header(std::string& out, std::uint8_t byte0, std::size_t remaining) {
  out.push_back(static_cast<char>(byte0));
  do {
    auto b = static_cast<unsigned char>(remaining & 0x7f);
    remaining >>= 7;
    if (remaining != 0)
      b |= 0x80;
    out.push_back(static_cast<char>(b));
  } while (remaining != 0);
}

void put_u16(std::string& out, std::uint16_t v) {
  const char bytes[2] = {static_cast<char>(v >> 8), static_cast<char>(v & 0xff)};
  out.append(bytes, 2);
}

void put_string(std::string& out, std::string_view s) {
  put_u16(out, static_cast<std::uint16_t>(s.size()));
  out.append(s);
}

std::uint8_t type_byte(packet_type t, unsigned flags = 0) {
  return static_cast<std::uint8_t>((static_cast<unsigned>(t) << 4) | flags);
}

// The remaining length of each packet's wire form.
struct body_size {
  std::size_t operator()(const connect_packet& p) const noexcept {
    std::size_t n = 2 + p.protocol_name.size() + 1 + 1 + 2 + 2 + p.client_id.size();
    if (p.will)
      n += 2 + p.will->topic.size() + 2 + p.will->payload.size();
    if (p.username)
      n += 2 + p.username->size();
    if (p.password)
      n += 2 + p.password->size();
    return n;
  }
  std::size_t operator()(const connack_packet&) const noexcept { return 2; }
  std::size_t operator()(const publish_packet& p) const noexcept {
    return 2 + p.topic.size() + (p.qos != 0 ? 2 : 0) + p.payload.size();
  }
  std::size_t operator()(const puback_packet&) const noexcept { return 2; }
  std::size_t operator()(const pubrec_packet&) const noexcept { return 2; }
  std::size_t operator()(const pubrel_packet&) const noexcept { return 2; }
  std::size_t operator()(const pubcomp_packet&) const noexcept { return 2; }
  std::size_t operator()(const subscribe_packet& p) const noexcept {
    std::size_t n = 2;
    for (const auto& s : p.subscriptions)
      n += 2 + s.filter.size() + 1;
    return n;
  }
  std::size_t operator()(const suback_packet& p) const noexcept {
    return 2 + p.return_codes.size();
  }
  std::size_t operator()(const unsubscribe_packet& p) const noexcept {
    std::size_t n = 2;
    for (const auto& f : p.filters)
      n += 2 + f.size();
    return n;
  }
  std::size_t operator()(const unsuback_packet&) const noexcept { return 2; }
  std::size_t operator()(const pingreq_packet&) const noexcept { return 0; }
  std::size_t operator()(const pingresp_packet&) const noexcept { return 0; }
  std::size_t operator()(const disconnect_packet&) const noexcept { return 0; }
};

// Writes the fixed header and body; `out` has room reserved already.
struct body_writer {
  std::string& out;
  std::size_t remaining;

  void operator()(const connect_packet& p) const {
    put_header(out, type_byte(packet_type::connect), remaining);
    put_string(out, p.protocol_name);
    out.push_back(static_cast<char>(p.protocol_level));
    unsigned flags = p.clean_session ? 0x02 : 0;
    if (p.will)
      flags |= 0x04 | ((p.will->qos & 3u) << 3) | (p.will->retain ? 0x20 : 0);
    if (p.password)
      flags |= 0x40;
    if (p.username)
      flags |= 0x80;
    out.push_back(static_cast<char>(flags));
    put_u16(out, p.keep_alive_s);
    put_string(out, p.client_id);
    if (p.will) {
      put_string(out, p.will->topic);
      put_string(out, p.will->payload);
    }
    if (p.username)
      put_string(out, *p.username);
    if (p.password)
      put_string(out, *p.password);
  }
  void operator()(const connack_packet& p) const {
    put_header(out, type_byte(packet_type::connack), remaining);
    out.push_back(p.session_present ? 1 : 0);
    out.push_back(static_cast<char>(p.return_code));
  }
  void operator()(const publish_packet& p) const {
    encode_publish(out, p.topic, p.payload, p.qos, p.retain, p.dup, p.packet_id);
  }
  void ack(packet_type t, unsigned flags, std::uint16_t id) const {
    put_header(out, type_byte(t, flags), 2);
    put_u16(out, id);
  }
  void operator()(const puback_packet& p) const { ack(packet_type::puback, 0, p.packet_id); }
  void operator()(const pubrec_packet& p) const { ack(packet_type::pubrec, 0, p.packet_id); }
  void operator()(const pubrel_packet& p) const { ack(packet_type::pubrel, 2, p.packet_id); }
  void operator()(const pubcomp_packet& p) const { ack(packet_type::pubcomp, 0, p.packet_id); }
  void operator()(const unsuback_packet& p) const { ack(packet_type::unsuback, 0, p.packet_id); }
  void operator()(const subscribe_packet& p) const {
    put_header(out, type_byte(packet_type::subscribe, 2), remaining);
    put_u16(out, p.packet_id);
    for (const auto& s : p.subscriptions) {
      put_string(out, s.filter);
      out.push_back(static_cast<char>(s.qos));
    }
  }
  void operator()(const suback_packet& p) const {
    put_header(out, type_byte(packet_type::suback), remaining);
    put_u16(out, p.packet_id);
    out.append(reinterpret_cast<const char*>(p.return_codes.data()), p.return_codes.size());
  }
  void operator()(const unsubscribe_packet& p) const {
    put_header(out, type_byte(packet_type::unsubscribe, 2), remaining);
    put_u16(out, p.packet_id);
    for (const auto& f : p.filters)
      put_string(out, f);
  }
  void operator()(const pingreq_packet&) const {
    put_header(out, type_byte(packet_type::pingreq), 0);
  }
  void operator()(const pingresp_packet&) const {
    put_header(out, type_byte(packet_type::pingresp), 0);
  }
  void operator()(const disconnect_packet&) const {
    put_header(out, type_byte(packet_type::disconnect), 0);
  }
};

// ---- validation of packets built in memory ----

error invalid(const char* type_name, std::string_view message) {
  std::string m = type_name;
  m += ": ";
  m += message;
  return make_error(errc::invalid_argument, std::move(m));
}

std::optional<error> check_string(const char* type_name, const char* field, std::string_view s,
                                  std::optional<string_problem> (*check)(std::string_view)) {
  if (auto p = check(s))
    return invalid(type_name,
                   std::string(field) + " at byte " + std::to_string(p->at) + ": " + p->what);
  return std::nullopt;
}

std::optional<string_problem> binary_problem(std::string_view s) {
  if (s.size() > max_string)
    return string_problem{max_string, "longer than 65535 bytes"};
  return std::nullopt;
}

std::optional<error> check_id(const char* type_name, std::uint16_t id) {
  if (id == 0)
    return invalid(type_name, "packet identifier is 0 (must be non-zero)");
  return std::nullopt;
}

struct validator {
  const char* name;

  std::optional<error> operator()(const connect_packet& p) const {
    if (p.protocol_name != "MQTT" || p.protocol_level != 4)
      return invalid(name, "protocol " + quoted(p.protocol_name) + " level " +
                             std::to_string(p.protocol_level) +
                             " is not MQTT 3.1.1 (\"MQTT\" level 4)");
    if (auto e = check_string(name, "client id", p.client_id, utf8_string_problem))
      return e;
    if (p.will) {
      if (p.will->qos > 2)
        return invalid(name, "will QoS " + std::to_string(p.will->qos) + " is invalid");
      if (auto e = check_string(name, "will topic", p.will->topic, topic_name_problem))
        return e;
      if (auto e = check_string(name, "will message", p.will->payload, binary_problem))
        return e;
    }
    if (p.password && !p.username)
      return invalid(name, "a password without a user name is not allowed in MQTT 3.1.1");
    if (p.username) {
      if (auto e = check_string(name, "user name", *p.username, utf8_string_problem))
        return e;
    }
    if (p.password) {
      if (auto e = check_string(name, "password", *p.password, binary_problem))
        return e;
    }
    return std::nullopt;
  }
  std::optional<error> operator()(const connack_packet& p) const {
    const auto code = static_cast<unsigned>(p.return_code);
    if (code > 5)
      return invalid(name, "return code " + std::to_string(code) + " is reserved");
    if (code != 0 && p.session_present)
      return invalid(name,
                     "session present set with the refusing return code " + std::to_string(code));
    return std::nullopt;
  }
  std::optional<error> operator()(const publish_packet& p) const {
    if (p.qos > 2)
      return invalid(name, "QoS " + std::to_string(p.qos) + " is invalid");
    if (auto e = check_string(name, "topic name", p.topic, topic_name_problem))
      return e;
    if (p.qos == 0 && p.packet_id != 0)
      return invalid(name, "packet identifier " + std::to_string(p.packet_id) +
                             " with QoS 0 (must be 0: it is not sent)");
    if (p.qos == 0 && p.dup)
      return invalid(name, "DUP is set with QoS 0");
    if (p.qos != 0)
      return check_id(name, p.packet_id);
    return std::nullopt;
  }
  std::optional<error> operator()(const puback_packet& p) const {
    return check_id(name, p.packet_id);
  }
  std::optional<error> operator()(const pubrec_packet& p) const {
    return check_id(name, p.packet_id);
  }
  std::optional<error> operator()(const pubrel_packet& p) const {
    return check_id(name, p.packet_id);
  }
  std::optional<error> operator()(const pubcomp_packet& p) const {
    return check_id(name, p.packet_id);
  }
  std::optional<error> operator()(const unsuback_packet& p) const {
    return check_id(name, p.packet_id);
  }
  std::optional<error> operator()(const subscribe_packet& p) const {
    if (auto e = check_id(name, p.packet_id))
      return e;
    if (p.subscriptions.empty())
      return invalid(name, "no topic filter (a SUBSCRIBE needs at least one)");
    for (std::size_t i = 0; i < p.subscriptions.size(); ++i) {
      const auto& s = p.subscriptions[i];
      const std::string field = "topic filter " + std::to_string(i);
      if (auto e = check_string(name, field.c_str(), s.filter, topic_filter_problem))
        return e;
      if (s.qos > 2)
        return invalid(name, "requested QoS " + std::to_string(s.qos) + " of topic filter " +
                               std::to_string(i) + " is invalid");
    }
    return std::nullopt;
  }
  std::optional<error> operator()(const suback_packet& p) const {
    if (auto e = check_id(name, p.packet_id))
      return e;
    if (p.return_codes.empty())
      return invalid(name, "no return code (a SUBACK needs at least one)");
    for (std::size_t i = 0; i < p.return_codes.size(); ++i) {
      const auto code = p.return_codes[i];
      if (code > 2 && code != suback_failure)
        return invalid(
          name, "return code " + std::to_string(i) + " (" + hex_byte(code) + ") is reserved");
    }
    return std::nullopt;
  }
  std::optional<error> operator()(const unsubscribe_packet& p) const {
    if (auto e = check_id(name, p.packet_id))
      return e;
    if (p.filters.empty())
      return invalid(name, "no topic filter (an UNSUBSCRIBE needs at least one)");
    for (std::size_t i = 0; i < p.filters.size(); ++i) {
      const std::string field = "topic filter " + std::to_string(i);
      if (auto e = check_string(name, field.c_str(), p.filters[i], topic_filter_problem))
        return e;
    }
    return std::nullopt;
  }
  std::optional<error> operator()(const pingreq_packet&) const { return std::nullopt; }
  std::optional<error> operator()(const pingresp_packet&) const { return std::nullopt; }
  std::optional<error> operator()(const disconnect_packet&) const { return std::nullopt; }
};

}  // namespace

const char* to_string(packet_type type) noexcept {
  return type_names[static_cast<unsigned>(type) & 0x0f];
}

packet_type type_of(const packet& p) noexcept {
  return static_cast<packet_type>(p.index() + 1);
}

// ---- frame_reader ----

frame_reader::frame_reader(std::size_t max_packet_size) noexcept
    : max_packet_size_(std::min(max_packet_size, max_remaining_length)) {}

void frame_reader::feed(std::string_view bytes) {
  if (failed_ || bytes.empty())
    return;
  if (read_ != 0) {  // only the incomplete packet's bytes move
    buffer_.erase(0, read_);
    read_ = 0;
  }
  buffer_.append(bytes);
}

expected<std::optional<packet>> frame_reader::fail(error err) {
  failed_ = err;
  std::string().swap(buffer_);
  read_ = 0;
  return err;
}

expected<std::optional<packet>> frame_reader::next() {
  if (failed_)
    return *failed_;
  const std::string_view data(buffer_.data() + read_, buffer_.size() - read_);
  auto header = read_fixed_header(data, max_packet_size_);
  if (!header)
    return fail(std::move(header).err());
  if (!*header)
    return std::optional<packet>{};
  const fixed_header h = **header;
  if (data.size() - h.header_len < h.remaining)
    return std::optional<packet>{};
  auto p = decode_body(h.byte0, data.substr(h.header_len, h.remaining), h.header_len);
  if (!p)
    return fail(std::move(p).err());
  const std::size_t size = h.header_len + h.remaining;
  read_ += size;
  consumed_ += size;
  if (read_ == buffer_.size()) {
    read_ = 0;
    if (buffer_.capacity() > keep_capacity)
      std::string().swap(buffer_);
    else
      buffer_.clear();
  }
  return std::optional<packet>(std::move(*p));
}

expected<packet> decode_packet(std::string_view bytes, std::size_t max_packet_size) {
  max_packet_size = std::min(max_packet_size, max_remaining_length);
  auto header = read_fixed_header(bytes, max_packet_size);
  if (!header)
    return std::move(header).err();
  if (!*header) {
    const char* name =
      bytes.empty() ? "packet" : type_names[static_cast<unsigned char>(bytes[0]) >> 4];
    return packet_error(name, bytes.size(), "truncated in the fixed header");
  }
  const fixed_header h = **header;
  const std::size_t size = h.header_len + h.remaining;
  const char* name = type_names[h.byte0 >> 4];
  if (bytes.size() < size)
    return packet_error(name, bytes.size(),
                        "truncated: the packet has " + std::to_string(size) + " bytes, " +
                          std::to_string(bytes.size()) + " given");
  if (bytes.size() > size)
    return packet_error(name, size,
                        std::to_string(bytes.size() - size) + " bytes after the end of the packet");
  return decode_body(h.byte0, bytes.substr(h.header_len, h.remaining), h.header_len);
}

// ---- encoding ----

expected<void> validate(const packet& p) {
  const char* name = to_string(type_of(p));
  if (auto e = std::visit(validator{name}, p))
    return std::move(*e);
  const std::size_t size = std::visit(body_size{}, p);
  if (size > max_remaining_length)
    return invalid(name, "packet of " + std::to_string(size) + " bytes exceeds the maximum of " +
                           std::to_string(max_remaining_length));
  return {};
}

void encode(const packet& p, std::string& out) {
  const std::size_t remaining = std::visit(body_size{}, p);
  out.reserve(out.size() + 1 + varint_size(remaining) + remaining);
  std::visit(body_writer{out, remaining}, p);
}

std::string encode(const packet& p) {
  std::string out;
  encode(p, out);
  return out;
}

void encode_publish(std::string& out, std::string_view topic, std::string_view payload,
                    std::uint8_t qos, bool retain, bool dup, std::uint16_t packet_id) {
  const std::size_t remaining = 2 + topic.size() + (qos != 0 ? 2 : 0) + payload.size();
  out.reserve(out.size() + 1 + varint_size(remaining) + remaining);
  const unsigned flags = (dup ? 0x08 : 0) | ((qos & 3u) << 1) | (retain ? 0x01 : 0);
  put_header(out, type_byte(packet_type::publish, flags), remaining);
  put_string(out, topic);
  if (qos != 0)
    put_u16(out, packet_id);
  out.append(payload);
}

// ---- strings and topics ----

std::size_t find_bad_utf8(std::string_view s) noexcept {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const std::size_t n = s.size();
  std::size_t i = 0;
  while (i < n) {
    if (n - i >= 8) {
      // Eight bytes of ASCII without a NUL at a time: the common case.
      std::uint64_t w;
      std::memcpy(&w, p + i, 8);
      constexpr std::uint64_t high = 0x8080808080808080ull;
      constexpr std::uint64_t low = 0x0101010101010101ull;
      if ((w & high) == 0 && ((w - low) & ~w & high) == 0) {
        i += 8;
        continue;
      }
    }
    const unsigned c = p[i];
    if (c < 0x80) {
      if (c == 0)
        return i;
      ++i;
      continue;
    }
    // Unicode 3.9 table 3-7: the well-formed sequences (no overlong forms,
    // no surrogates, nothing above U+10FFFF).
    std::size_t len = 0;
    unsigned lo = 0x80, hi = 0xbf;  // the range of the second byte
    if (c >= 0xc2 && c <= 0xdf) {
      len = 2;
    } else if (c >= 0xe0 && c <= 0xef) {
      len = 3;
      if (c == 0xe0)
        lo = 0xa0;
      else if (c == 0xed)
        hi = 0x9f;
    } else if (c >= 0xf0 && c <= 0xf4) {
      len = 4;
      if (c == 0xf0)
        lo = 0x90;
      else if (c == 0xf4)
        hi = 0x8f;
    } else {
      return i;
    }
    if (n - i < len || p[i + 1] < lo || p[i + 1] > hi)
      return i;
    for (std::size_t k = 2; k < len; ++k) {
      if ((p[i + k] & 0xc0) != 0x80)
        return i;
    }
    i += len;
  }
  return npos;
}

expected<void> check_topic_name(std::string_view name) {
  if (auto p = topic_name_problem(name))
    return make_error(errc::invalid_argument,
                      "topic name at byte " + std::to_string(p->at) + ": " + p->what);
  return {};
}

expected<void> check_topic_filter(std::string_view filter) {
  if (auto p = topic_filter_problem(filter))
    return make_error(errc::invalid_argument,
                      "topic filter at byte " + std::to_string(p->at) + ": " + p->what);
  return {};
}

bool topic_matches(std::string_view filter, std::string_view topic) noexcept {
  // MQTT-4.7.2-1: "#" or "+/..." must not match "$SYS/...".
  if (!topic.empty() && topic[0] == '$' && !filter.empty() &&
      (filter[0] == '+' || filter[0] == '#'))
    return false;
  std::size_t f = 0, t = 0;
  bool topic_done = false;  // every level of the topic has been matched
  for (;;) {
    const std::size_t f_end = filter.find('/', f);
    const std::string_view level = filter.substr(f, f_end == npos ? npos : f_end - f);
    if (level == "#")
      return true;  // the parent level and any number of child levels
    if (topic_done)
      return false;
    const std::size_t t_end = topic.find('/', t);
    const std::string_view t_level = topic.substr(t, t_end == npos ? npos : t_end - t);
    if (level != "+" && level != t_level)
      return false;
    if (f_end == npos)
      return t_end == npos;
    if (t_end == npos)
      topic_done = true;
    else
      t = t_end + 1;
    f = f_end + 1;
  }
}

}  // namespace canopy::mqtt
