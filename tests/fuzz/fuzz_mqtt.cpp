// libFuzzer target: the MQTT 3.1.1 codec (gateway/mqtt_codec) on arbitrary
// bytes read as a client's stream, the way the MQTT server reads a connection.
//
// Input: byte 0 picks the reader's maximum packet size, byte 1 seeds the
// sizes of the chunks the stream is fed in, the rest is the stream.
//
// Invariants checked:
// - the stream decodes to the same packets and the same error whether it is
//   fed at once or in chunks (1..16 bytes, sometimes up to 1024);
// - errors are invalid_argument (incompatible for another protocol version)
//   with a message "<TYPE> at byte N: ...", and a failed reader stays failed;
// - what the reader holds stays bounded by the maximum packet size;
// - every decoded packet passes validate(), and encode() then decode gives it
//   back, with the same bytes when encoded again;
// - decoded topic names are valid names and filters and match themselves;
//   decoded filters are valid, and topic_matches never misbehaves on them.
#include "gateway/mqtt_codec.hpp"

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace {

using namespace canopy;
using namespace canopy::mqtt;

void check(bool ok, const char* what, const std::string& detail) {
  if (!ok) {
    std::fprintf(stderr, "invariant violated: %s: %s\n", what, detail.c_str());
    __builtin_trap();
  }
}

constexpr std::size_t max_sizes[8] = {1 << 20, 0, 2, 16, 64, 256, 1024, 65536};

struct outcome {
  std::vector<packet> packets;
  std::optional<error> err;
  std::uint64_t consumed = 0;
};

void drain(frame_reader& reader, outcome& out, std::size_t last_chunk) {
  for (;;) {
    auto r = reader.next();
    if (!r) {
      out.err = r.err();
      return;
    }
    if (!*r)
      break;
    out.packets.push_back(std::move(**r));
  }
  // At most one incomplete packet (fixed header <= 5 bytes) plus the last chunk.
  check(reader.buffered() <= 5 + reader.max_packet_size() + last_chunk, "the reader stays bounded",
        std::to_string(reader.buffered()));
}

outcome read_at_once(std::string_view stream, std::size_t max) {
  outcome out;
  frame_reader reader(max);
  reader.feed(stream);
  drain(reader, out, stream.size());
  out.consumed = reader.consumed();
  return out;
}

outcome read_chunked(std::string_view stream, std::size_t max, std::uint32_t seed) {
  outcome out;
  frame_reader reader(max);
  std::uint32_t state = seed * 2654435761u + 1;
  std::size_t pos = 0;
  while (pos < stream.size() && !out.err) {
    state ^= state << 13;
    state ^= state >> 17;
    state ^= state << 5;
    std::size_t n = (state % 64 < 4) ? 1 + (state >> 8) % 1024 : 1 + (state >> 8) % 16;
    n = std::min(n, stream.size() - pos);
    reader.feed(stream.substr(pos, n));
    pos += n;
    drain(reader, out, n);
  }
  if (out.err) {
    // A failed reader stays failed and drops what it is fed.
    reader.feed(stream);
    check(reader.buffered() == 0, "a failed reader drops its input", out.err->message);
    auto again = reader.next();
    check(!again && again.err().message == out.err->message, "a failed reader stays failed",
          out.err->message);
  }
  out.consumed = reader.consumed();
  return out;
}

void check_error(const error& e) {
  check(e.code == errc::invalid_argument || e.code == errc::incompatible, "error codes", e.message);
  static const char* const names[] = {"packet",    "CONNECT",  "CONNACK",     "PUBLISH",
                                      "PUBACK",    "PUBREC",   "PUBREL",      "PUBCOMP",
                                      "SUBSCRIBE", "SUBACK",   "UNSUBSCRIBE", "UNSUBACK",
                                      "PINGREQ",   "PINGRESP", "DISCONNECT"};
  bool named = false;
  for (const char* n : names) {
    const std::string prefix = std::string(n) + " at byte ";
    named = named || e.message.rfind(prefix, 0) == 0;
  }
  check(named, "an error names the packet and the byte", e.message);
}

void check_topics(const packet& p) {
  if (const auto* pub = std::get_if<publish_packet>(&p)) {
    const std::string& t = pub->topic;
    check(check_topic_name(t).ok(), "a decoded topic is a valid name", t);
    check(check_topic_filter(t).ok(), "a topic name is a valid filter", t);
    check(topic_matches(t, t), "a topic name matches itself", t);
    check(topic_matches("#", t) == (t[0] != '$'), "# matches all but $ topics", t);
  }
  if (const auto* sub = std::get_if<subscribe_packet>(&p)) {
    for (const auto& s : sub->subscriptions) {
      check(check_topic_filter(s.filter).ok(), "a decoded filter is valid", s.filter);
      if (s.filter.find_first_of("+#") == std::string::npos)
        check(topic_matches(s.filter, s.filter), "a plain filter matches itself", s.filter);
      for (const auto& other : sub->subscriptions)
        (void) topic_matches(s.filter, other.filter);
    }
  }
  if (const auto* unsub = std::get_if<unsubscribe_packet>(&p)) {
    for (const auto& f : unsub->filters)
      check(check_topic_filter(f).ok(), "a decoded filter is valid", f);
  }
  if (const auto* con = std::get_if<connect_packet>(&p)) {
    if (con->will)
      check(check_topic_name(con->will->topic).ok(), "a will topic is a valid name",
            con->will->topic);
  }
}

void round_trip(const packet& p, std::size_t max) {
  const char* name = to_string(type_of(p));
  auto valid = validate(p);
  check(valid.ok(), "a decoded packet is valid", valid ? name : valid.err().message);
  const std::string wire = encode(p);
  auto back = decode_packet(wire, max);
  check(back.ok(), "an encoded packet decodes", back ? name : back.err().message);
  check(*back == p, "an encoded packet decodes to itself", name);
  check(encode(*back) == wire, "encoding is stable", name);
  frame_reader reader(max);
  reader.feed(wire);
  auto again = reader.next();
  check(again.ok() && again->has_value() && **again == p, "the reader reads an encoded packet",
        name);
  check_topics(p);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size < 2)
    return 0;
  const std::size_t max = max_sizes[data[0] & 7];
  const std::uint32_t seed = data[1];
  const std::string_view stream(reinterpret_cast<const char*>(data) + 2, size - 2);

  const outcome whole = read_at_once(stream, max);
  const outcome chunked = read_chunked(stream, max, seed);
  check(whole.packets == chunked.packets, "chunking does not change the packets",
        std::to_string(whole.packets.size()) + " vs " + std::to_string(chunked.packets.size()));
  check(whole.err.has_value() == chunked.err.has_value(), "chunking does not change the error",
        whole.err     ? whole.err->message
        : chunked.err ? chunked.err->message
                      : "");
  if (whole.err) {
    check(whole.err->message == chunked.err->message, "the same error message",
          whole.err->message + " / " + chunked.err->message);
    check_error(*whole.err);
  }
  check(whole.consumed == chunked.consumed, "the same bytes consumed", "");
  for (const auto& p : whole.packets)
    round_trip(p, max);
  return 0;
}
