// Unit test of the MQTT 3.1.1 codec: round trips of every packet type, any
// chunking, the specification's rules (each malformed case names the packet,
// the byte and the field), the maximum packet size, UTF-8, topic matching
// (the examples of MQTT 3.1.1 section 4.7), and the allocations of a PUBLISH.
#include "gateway/mqtt_codec.hpp"

#include <catch2/catch.hpp>

#include <atomic>
#include <cstdlib>
#include <new>
#include <string>
#include <vector>

// Counts allocations while counting_ is set, to check what decoding a
// PUBLISH allocates: the global allocation functions of this test executable
// are replaced (all of the plain and nothrow forms, so that new and delete
// always pair up, under ASan too).
namespace {
std::atomic<bool> counting_{false};
std::atomic<long> allocations_{0};

void* counted_alloc(std::size_t size) noexcept {
  if (counting_.load(std::memory_order_relaxed))
    allocations_.fetch_add(1, std::memory_order_relaxed);
  return std::malloc(size == 0 ? 1 : size);
}
}  // namespace

// g++ 12 warns that free() meets memory from operator new: both are replaced
// here, so they match.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
#endif

void* operator new(std::size_t size) {
  if (void* p = counted_alloc(size))
    return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t size) {
  return operator new(size);
}
void* operator new(std::size_t size, const std::nothrow_t&) noexcept {
  return counted_alloc(size);
}
void* operator new[](std::size_t size, const std::nothrow_t&) noexcept {
  return counted_alloc(size);
}
void operator delete(void* p) noexcept {
  std::free(p);
}
void operator delete[](void* p) noexcept {
  std::free(p);
}
void operator delete(void* p, std::size_t) noexcept {
  std::free(p);
}
void operator delete[](void* p, std::size_t) noexcept {
  std::free(p);
}
void operator delete(void* p, const std::nothrow_t&) noexcept {
  std::free(p);
}
void operator delete[](void* p, const std::nothrow_t&) noexcept {
  std::free(p);
}

using namespace canopy;
using namespace canopy::mqtt;

namespace {

std::string bytes(std::initializer_list<int> list) {
  std::string s;
  for (int b : list)
    s += static_cast<char>(b);
  return s;
}

// A length-prefixed MQTT string.
std::string str(std::string_view s) {
  std::string out;
  out += static_cast<char>(s.size() >> 8);
  out += static_cast<char>(s.size() & 0xff);
  out += s;
  return out;
}

// A packet: first byte, remaining length, body.
std::string frame(int byte0, const std::string& body) {
  std::string out(1, static_cast<char>(byte0));
  std::size_t n = body.size();
  do {
    int b = static_cast<int>(n % 128);
    n /= 128;
    if (n)
      b |= 0x80;
    out += static_cast<char>(b);
  } while (n);
  return out + body;
}

// The variable header of a CONNECT up to (not including) the flags byte.
std::string connect_head() {
  return str("MQTT") + bytes({4});
}

std::vector<packet> sample_packets() {
  std::vector<packet> v;
  connect_packet c;
  c.client_id = "thermostat-17";
  c.keep_alive_s = 60;
  c.clean_session = false;
  c.username = "hub.azure-devices.net/thermostat-17/?api-version=2021-04-12";
  c.password = std::string("SharedAccessSignature sr=x\0y", 28);
  v.push_back(c);
  connect_packet c2;
  c2.client_id = "";
  c2.will = will_message{"devices/d/status", std::string("gone\0\xff", 6), 1, true};
  c2.username = "user";
  v.push_back(c2);
  connect_packet c3;
  c3.client_id = "d\xc3\xa9vice-\xe2\x82\xac-\xf0\x9d\x84\x9e";  // é, €, U+1D11E
  c3.will = will_message{"a", "", 2, false};
  v.push_back(c3);
  v.push_back(connect_packet{});
  v.push_back(connack_packet{true, connack_code::accepted});
  v.push_back(connack_packet{false, connack_code::not_authorized});
  v.push_back(
    publish_packet{"devices/d/messages/events/", std::string(100, 'x'), 0, false, false, 0});
  v.push_back(publish_packet{"a/b", std::string("\0\1\2\xff", 4), 1, true, true, 65535});
  v.push_back(publish_packet{"$iothub/twin/GET/?$rid=1", "", 1, false, false, 1});
  v.push_back(publish_packet{"q2", "payload", 2, false, false, 7});
  v.push_back(publish_packet{"/", std::string(20000, 'p'), 1, false, false, 9});
  v.push_back(puback_packet{1});
  v.push_back(pubrec_packet{2});
  v.push_back(pubrel_packet{3});
  v.push_back(pubcomp_packet{4});
  v.push_back(subscribe_packet{10, {{"devices/d/messages/devicebound/#", 1}, {"+", 0}, {"#", 2}}});
  v.push_back(suback_packet{10, {1, 0, 2, suback_failure}});
  v.push_back(unsubscribe_packet{11, {"a/+/c", "$iothub/twin/res/#"}});
  v.push_back(unsuback_packet{11});
  v.push_back(pingreq_packet{});
  v.push_back(pingresp_packet{});
  v.push_back(disconnect_packet{});
  return v;
}

// Feeds `stream` in chunks of the given sizes (cycled) and decodes everything.
expected<std::vector<packet>> read_all(const std::string& stream, std::vector<std::size_t> chunks,
                                       std::size_t max = 1 << 20) {
  frame_reader reader(max);
  std::vector<packet> out;
  std::size_t pos = 0, k = 0;
  while (pos < stream.size()) {
    const std::size_t n = std::min(chunks[k++ % chunks.size()], stream.size() - pos);
    reader.feed(std::string_view(stream).substr(pos, n));
    pos += n;
    for (;;) {
      auto r = reader.next();
      if (!r)
        return std::move(r).err();
      if (!*r)
        break;
      out.push_back(std::move(**r));
    }
  }
  CHECK(reader.buffered() == 0);
  CHECK(reader.consumed() == stream.size());
  return out;
}

// The error a reader gives for `stream` fed at once (after any valid packets).
error first_error(const std::string& stream, std::size_t max = 1 << 20) {
  frame_reader reader(max);
  reader.feed(stream);
  for (int i = 0; i < 100; ++i) {
    auto r = reader.next();
    if (!r)
      return r.err();
    if (!*r)
      break;
  }
  FAIL("no error for " << stream.size() << " bytes");
  return {};
}

}  // namespace

TEST_CASE("every packet type round-trips through encode and decode", "[mqtt_codec]") {
  const auto packets = sample_packets();
  std::vector<bool> seen(15, false);
  for (const auto& p : packets) {
    INFO(to_string(type_of(p)));
    seen[static_cast<std::size_t>(type_of(p))] = true;
    REQUIRE(validate(p).ok());
    const std::string wire = encode(p);
    auto back = decode_packet(wire);
    REQUIRE(back.ok());
    CHECK(*back == p);
    CHECK(type_of(*back) == type_of(p));
    CHECK(encode(*back) == wire);
    // encode(p, out) appends.
    std::string out = "prefix";
    encode(p, out);
    CHECK(out == "prefix" + wire);
  }
  for (int t = 1; t <= 14; ++t)
    CHECK(seen[static_cast<std::size_t>(t)]);
}

TEST_CASE("the wire bytes are the specification's", "[mqtt_codec]") {
  CHECK(encode(pingreq_packet{}) == bytes({0xc0, 0x00}));
  CHECK(encode(pingresp_packet{}) == bytes({0xd0, 0x00}));
  CHECK(encode(disconnect_packet{}) == bytes({0xe0, 0x00}));
  CHECK(encode(puback_packet{0x1234}) == bytes({0x40, 0x02, 0x12, 0x34}));
  CHECK(encode(pubrel_packet{1}) == bytes({0x62, 0x02, 0x00, 0x01}));
  CHECK(encode(connack_packet{true, connack_code::accepted}) == bytes({0x20, 0x02, 0x01, 0x00}));
  CHECK(encode(suback_packet{5, {0, 0x80}}) == bytes({0x90, 0x04, 0x00, 0x05, 0x00, 0x80}));
  CHECK(encode(subscribe_packet{5, {{"a/b", 1}}}) ==
        bytes({0x82, 0x08, 0x00, 0x05, 0x00, 0x03, 'a', '/', 'b', 0x01}));
  CHECK(encode(unsubscribe_packet{5, {"a"}}) == bytes({0xa2, 0x05, 0x00, 0x05, 0x00, 0x01, 'a'}));
  // MQTT-3.3.1: DUP 0x08, QoS << 1, RETAIN 0x01.
  CHECK(encode(publish_packet{"a/b", "hi", 1, true, true, 10}) ==
        bytes({0x3b, 0x09, 0x00, 0x03, 'a', '/', 'b', 0x00, 0x0a, 'h', 'i'}));
  CHECK(encode(publish_packet{"t", "", 0, false, false, 0}) ==
        bytes({0x30, 0x03, 0x00, 0x01, 't'}));
  // The CONNECT variable header example of MQTT-3.1.2.10: flags 0xce
  // (user name, password, will QoS 1, will, clean session), keep alive 10.
  connect_packet c;
  c.client_id = "c";
  c.keep_alive_s = 10;
  c.will = will_message{"w", "m", 1, false};
  c.username = "u";
  c.password = "p";
  CHECK(encode(c) == frame(0x10, connect_head() + bytes({0xce, 0x00, 0x0a}) + str("c") + str("w") +
                                   str("m") + str("u") + str("p")));
}

TEST_CASE("the remaining length is a varint of up to 4 bytes", "[mqtt_codec]") {
  // Payload sizes that put the remaining length (2 + 1 + payload) on the
  // varint's boundaries: 127/128, 16383/16384.
  struct row {
    std::size_t remaining;
    std::string header;
  };
  const std::vector<row> rows = {
    {3, bytes({0x30, 0x03})},
    {127, bytes({0x30, 0x7f})},
    {128, bytes({0x30, 0x80, 0x01})},
    {16383, bytes({0x30, 0xff, 0x7f})},
    {16384, bytes({0x30, 0x80, 0x80, 0x01})},
    {2097152, bytes({0x30, 0x80, 0x80, 0x80, 0x01})},
  };
  for (const auto& r : rows) {
    publish_packet p{"t", std::string(r.remaining - 3, 'x'), 0, false, false, 0};
    const std::string wire = encode(p);
    CHECK(wire.substr(0, r.header.size()) == r.header);
    CHECK(wire.size() == r.header.size() + r.remaining);
    auto back = decode_packet(wire);
    REQUIRE(back.ok());
    CHECK(*back == packet(p));
  }
  // A non-minimal encoding of a small length is accepted (MQTT 3.1.1 does not forbid it).
  auto padded = decode_packet(bytes({0xc0, 0x80, 0x00}));
  REQUIRE(padded.ok());
  CHECK(std::holds_alternative<pingreq_packet>(*padded));

  // A fifth length byte is an error once the fourth one says "more".
  frame_reader reader(max_remaining_length);
  reader.feed(bytes({0x30, 0xff, 0xff, 0xff}));
  auto r = reader.next();
  REQUIRE(r.ok());
  CHECK_FALSE(r->has_value());
  reader.feed(bytes({0xff}));
  r = reader.next();
  REQUIRE_FALSE(r.ok());
  CHECK(r.err().message == "PUBLISH at byte 4: remaining length uses more than 4 bytes");
}

TEST_CASE("a stream decodes the same whatever the chunking", "[mqtt_codec]") {
  const auto packets = sample_packets();
  std::string stream;
  for (const auto& p : packets)
    encode(p, stream);
  const std::vector<std::vector<std::size_t>> chunkings = {
    {1}, {2}, {3}, {7, 1, 13}, {64}, {1000}, {stream.size()}};
  for (const auto& chunks : chunkings) {
    INFO("first chunk size " << chunks[0]);
    auto got = read_all(stream, chunks);
    REQUIRE(got.ok());
    CHECK(*got == packets);
  }
}

TEST_CASE("a packet larger than the maximum is refused at its fixed header", "[mqtt_codec]") {
  frame_reader reader(100);
  CHECK(reader.max_packet_size() == 100);
  // Exactly the maximum passes.
  const std::string ok = encode(publish_packet{"t", std::string(97, 'x'), 0, false, false, 0});
  reader.feed(ok);
  auto r = reader.next();
  REQUIRE(r.ok());
  REQUIRE(r->has_value());
  // 1000 bytes announced: refused before the body arrives.
  reader.feed(bytes({0x30, 0xe8, 0x07}));
  r = reader.next();
  REQUIRE_FALSE(r.ok());
  CHECK(r.err().code == errc::invalid_argument);
  CHECK(r.err().message ==
        "PUBLISH at byte 1: packet of 1000 bytes (remaining length) exceeds the maximum of 100");
  CHECK(reader.failed());
  // The reader stays failed: more input is dropped, the same error comes back.
  reader.feed(encode(pingreq_packet{}));
  CHECK(reader.buffered() == 0);
  auto again = reader.next();
  REQUIRE_FALSE(again.ok());
  CHECK(again.err().message == r.err().message);

  // A maximum above what MQTT can express is clamped.
  CHECK(frame_reader(std::size_t(1) << 40).max_packet_size() == max_remaining_length);
  auto big =
    decode_packet(encode(publish_packet{"t", std::string(200, 'x'), 0, false, false, 0}), 100);
  REQUIRE_FALSE(big.ok());
  CHECK(big.err().message.find("exceeds the maximum of 100") != std::string::npos);
}

TEST_CASE("packets before a malformed one are returned first", "[mqtt_codec]") {
  frame_reader reader(1024);
  reader.feed(encode(pingreq_packet{}) + encode(puback_packet{3}) +
              bytes({0x40, 0x02, 0x00, 0x00}));
  auto a = reader.next();
  REQUIRE(a.ok());
  CHECK(std::holds_alternative<pingreq_packet>(**a));
  auto b = reader.next();
  REQUIRE(b.ok());
  CHECK(std::get<puback_packet>(**b).packet_id == 3);
  auto c = reader.next();
  REQUIRE_FALSE(c.ok());
  CHECK(c.err().message == "PUBACK at byte 2: packet identifier is 0 (must be non-zero)");
  CHECK(reader.consumed() == 6);
}

TEST_CASE("a malformed first byte is an error before the rest arrives", "[mqtt_codec]") {
  frame_reader reader(1024);
  reader.feed(bytes({0x80}));  // SUBSCRIBE with flags 0000
  auto r = reader.next();
  REQUIRE_FALSE(r.ok());
  CHECK(r.err().message == "SUBSCRIBE at byte 0: fixed header flags are 0x00, must be 0x02");
}

TEST_CASE("malformed packets are refused, naming the packet, byte and field", "[mqtt_codec]") {
  struct row {
    const char* what;
    std::string bytes;
    std::string message;  // the whole message
    errc code = errc::invalid_argument;
  };
  const std::string flags_ok = bytes({0x02, 0x00, 0x3c});  // clean session, keep alive 60
  const std::vector<row> rows = {
    // Fixed header.
    {"type 0", bytes({0x00, 0x00}), "packet at byte 0: reserved packet type 0"},
    {"type 15", bytes({0xf0, 0x00}), "packet at byte 0: reserved packet type 15"},
    {"PUBREL flags", bytes({0x60, 0x02, 0x00, 0x01}),
     "PUBREL at byte 0: fixed header flags are 0x00, must be 0x02"},
    {"UNSUBSCRIBE flags", frame(0xa0, str("a")),
     "UNSUBSCRIBE at byte 0: fixed header flags are 0x00, must be 0x02"},
    {"PUBACK flags", bytes({0x41, 0x02, 0x00, 0x01}),
     "PUBACK at byte 0: fixed header flags are 0x01, must be 0x00"},
    {"CONNECT flags", bytes({0x12, 0x00}),
     "CONNECT at byte 0: fixed header flags are 0x02, must be 0x00"},
    {"PINGREQ flags", bytes({0xc1, 0x00}),
     "PINGREQ at byte 0: fixed header flags are 0x01, must be 0x00"},
    {"PUBLISH QoS 3", frame(0x36, str("t") + bytes({0, 1})),
     "PUBLISH at byte 0: fixed header flags 0x06: QoS 3 is invalid"},
    {"PUBLISH DUP with QoS 0", frame(0x38, str("t")),
     "PUBLISH at byte 0: fixed header flags 0x08: DUP is set with QoS 0"},
    {"PUBACK length", bytes({0x40, 0x03, 0x00, 0x01, 0x00}),
     "PUBACK at byte 1: remaining length is 3, must be 2"},
    {"PINGREQ length", bytes({0xc0, 0x01, 0x00}),
     "PINGREQ at byte 1: remaining length is 1, must be 0"},
    {"DISCONNECT length", bytes({0xe0, 0x02, 0x00, 0x00}),
     "DISCONNECT at byte 1: remaining length is 2, must be 0"},
    // CONNECT.
    {"protocol name", frame(0x10, str("MQTX") + bytes({4}) + flags_ok + str("c")),
     "CONNECT at byte 2: protocol name \"MQTX\" is not \"MQTT\""},
    {"MQTT 3.1", frame(0x10, str("MQIsdp") + bytes({3}) + flags_ok + str("c")),
     "CONNECT at byte 2: protocol \"MQIsdp\" (MQTT 3.1) is not supported, only \"MQTT\" level 4 "
     "(MQTT 3.1.1)",
     errc::incompatible},
    {"MQTT 5", frame(0x10, str("MQTT") + bytes({5}) + flags_ok + str("c")),
     "CONNECT at byte 8: protocol level 5 is not supported, only 4 (MQTT 3.1.1)",
     errc::incompatible},
    {"protocol name truncated", frame(0x10, bytes({0x00})),
     "CONNECT at byte 2: protocol name length needs 2 bytes, 1 left in the packet"},
    {"no protocol level", frame(0x10, str("MQTT")),
     "CONNECT at byte 8: protocol level is missing (the packet ends)"},
    {"reserved connect flag", frame(0x10, connect_head() + bytes({0x03, 0, 60}) + str("c")),
     "CONNECT at byte 9: connect flags 0x03: the reserved bit 0 is set"},
    {"will QoS without will", frame(0x10, connect_head() + bytes({0x0a, 0, 60}) + str("c")),
     "CONNECT at byte 9: connect flags 0x0a: will QoS or will retain set without the will flag"},
    {"will retain without will", frame(0x10, connect_head() + bytes({0x22, 0, 60}) + str("c")),
     "CONNECT at byte 9: connect flags 0x22: will QoS or will retain set without the will flag"},
    {"will QoS 3",
     frame(0x10, connect_head() + bytes({0x1e, 0, 60}) + str("c") + str("w") + str("m")),
     "CONNECT at byte 9: connect flags 0x1e: will QoS 3 is invalid"},
    {"password without user name",
     frame(0x10, connect_head() + bytes({0x42, 0, 60}) + str("c") + str("p")),
     "CONNECT at byte 9: connect flags 0x42: password flag set without the user name flag"},
    {"keep alive truncated", frame(0x10, connect_head() + bytes({0x02, 0})),
     "CONNECT at byte 10: keep alive needs 2 bytes, 1 left in the packet"},
    {"client id overlong NUL", frame(0x10, connect_head() + flags_ok + str("ab\xc0\x80")),
     "CONNECT at byte 16: client id: ill-formed UTF-8 (sequence starting 0xc0)"},
    {"client id U+0000", frame(0x10, connect_head() + flags_ok + str(std::string("a\0b", 3))),
     "CONNECT at byte 15: client id: U+0000 is not allowed"},
    {"client id beyond the packet", frame(0x10, connect_head() + flags_ok + bytes({0, 70}) + "abc"),
     "CONNECT at byte 12: client id length 70 exceeds the packet (3 bytes left)"},
    {"user name surrogate",
     frame(0x10, connect_head() + bytes({0x82, 0, 60}) + str("c") + str("u\xed\xa0\x80")),
     "CONNECT at byte 18: user name: ill-formed UTF-8 (sequence starting 0xed)"},
    {"user name missing", frame(0x10, connect_head() + bytes({0x82, 0, 60}) + str("c")),
     "CONNECT at byte 15: user name length needs 2 bytes, 0 left in the packet"},
    {"will topic wildcard",
     frame(0x10, connect_head() + bytes({0x06, 0, 60}) + str("c") + str("w/#") + str("m")),
     "CONNECT at byte 19: will topic: wildcard '#' is not allowed in a topic name"},
    {"will topic empty",
     frame(0x10, connect_head() + bytes({0x06, 0, 60}) + str("c") + str("") + str("m")),
     "CONNECT at byte 17: will topic: must not be empty"},
    {"will message missing",
     frame(0x10, connect_head() + bytes({0x06, 0, 60}) + str("c") + str("w")),
     "CONNECT at byte 18: will message length needs 2 bytes, 0 left in the packet"},
    {"password missing", frame(0x10, connect_head() + bytes({0xc2, 0, 60}) + str("c") + str("u")),
     "CONNECT at byte 18: password length needs 2 bytes, 0 left in the packet"},
    {"CONNECT trailing bytes", frame(0x10, connect_head() + flags_ok + str("c") + "zz"),
     "CONNECT at byte 15: 2 unexpected bytes after the last field"},
    // CONNACK.
    {"CONNACK flags", bytes({0x20, 0x02, 0x02, 0x00}),
     "CONNACK at byte 2: acknowledge flags 0x02: reserved bits 7-1 are set"},
    {"CONNACK code", bytes({0x20, 0x02, 0x00, 0x06}),
     "CONNACK at byte 3: return code 6 is reserved"},
    {"CONNACK session with refusal", bytes({0x20, 0x02, 0x01, 0x05}),
     "CONNACK at byte 2: session present set with the refusing return code 5"},
    // PUBLISH.
    {"topic wildcard +", frame(0x30, str("a/+/c") + "x"),
     "PUBLISH at byte 6: topic name: wildcard '+' is not allowed in a topic name"},
    {"topic empty", frame(0x30, str("") + "x"), "PUBLISH at byte 4: topic name: must not be empty"},
    {"topic NUL", frame(0x30, str(std::string("a\0", 2)) + "x"),
     "PUBLISH at byte 5: topic name: U+0000 is not allowed"},
    {"topic above U+10FFFF", frame(0x30, str("\xf4\x90\x80\x80")),
     "PUBLISH at byte 4: topic name: ill-formed UTF-8 (sequence starting 0xf4)"},
    {"topic length beyond the packet", frame(0x30, bytes({0x11, 0x70}) + std::string(12, 'x')),
     "PUBLISH at byte 2: topic name length 4464 exceeds the packet (12 bytes left)"},
    {"topic length truncated", frame(0x30, bytes({0x00})),
     "PUBLISH at byte 2: topic name length needs 2 bytes, 1 left in the packet"},
    {"QoS 1 packet id 0", frame(0x32, str("t") + bytes({0, 0}) + "x"),
     "PUBLISH at byte 5: packet identifier is 0 (must be non-zero)"},
    {"QoS 1 packet id truncated", frame(0x32, str("t") + bytes({0})),
     "PUBLISH at byte 5: packet identifier needs 2 bytes, 1 left in the packet"},
    // Acknowledgements.
    {"PUBREC id 0", bytes({0x50, 0x02, 0x00, 0x00}),
     "PUBREC at byte 2: packet identifier is 0 (must be non-zero)"},
    {"UNSUBACK id 0", bytes({0xb0, 0x02, 0x00, 0x00}),
     "UNSUBACK at byte 2: packet identifier is 0 (must be non-zero)"},
    // SUBSCRIBE.
    {"SUBSCRIBE without filters", frame(0x82, bytes({0, 1})),
     "SUBSCRIBE at byte 4: no topic filter (a SUBSCRIBE needs at least one)"},
    {"SUBSCRIBE id 0", frame(0x82, bytes({0, 0}) + str("a") + bytes({0})),
     "SUBSCRIBE at byte 2: packet identifier is 0 (must be non-zero)"},
    {"filter # not last", frame(0x82, bytes({0, 1}) + str("a/#/b") + bytes({0})),
     "SUBSCRIBE at byte 8: topic filter: '#' must be a whole level and the last one"},
    {"filter a#", frame(0x82, bytes({0, 1}) + str("sport/tennis#") + bytes({0})),
     "SUBSCRIBE at byte 18: topic filter: '#' must be a whole level and the last one"},
    {"filter sport+", frame(0x82, bytes({0, 1}) + str("sport+") + bytes({0})),
     "SUBSCRIBE at byte 11: topic filter: '+' must be a whole level"},
    {"filter empty", frame(0x82, bytes({0, 1}) + str("") + bytes({0})),
     "SUBSCRIBE at byte 6: topic filter: must not be empty"},
    {"requested QoS 3", frame(0x82, bytes({0, 1}) + str("a") + bytes({3})),
     "SUBSCRIBE at byte 7: requested QoS byte 0x03 is invalid (QoS 3)"},
    {"requested QoS reserved bits", frame(0x82, bytes({0, 1}) + str("a") + bytes({0x41})),
     "SUBSCRIBE at byte 7: requested QoS byte 0x41 has reserved bits set"},
    {"requested QoS missing", frame(0x82, bytes({0, 1}) + str("a") + bytes({1}) + str("b")),
     "SUBSCRIBE at byte 11: requested QoS is missing (the packet ends)"},
    // SUBACK.
    {"SUBACK reserved code", frame(0x90, bytes({0, 1, 0, 3})),
     "SUBACK at byte 5: return code 0x03 is reserved"},
    {"SUBACK without codes", frame(0x90, bytes({0, 1})),
     "SUBACK at byte 4: no return code (a SUBACK needs at least one)"},
    // UNSUBSCRIBE.
    {"UNSUBSCRIBE without filters", frame(0xa2, bytes({0, 1})),
     "UNSUBSCRIBE at byte 4: no topic filter (an UNSUBSCRIBE needs at least one)"},
    {"UNSUBSCRIBE bad filter", frame(0xa2, bytes({0, 1}) + str("ok") + str("a/b+")),
     "UNSUBSCRIBE at byte 13: topic filter: '+' must be a whole level"},
    {"UNSUBSCRIBE filter beyond the packet", frame(0xa2, bytes({0, 1, 0, 9}) + "abc"),
     "UNSUBSCRIBE at byte 4: topic filter length 9 exceeds the packet (3 bytes left)"},
  };
  for (const auto& r : rows) {
    INFO(r.what);
    const error e = first_error(r.bytes);
    CHECK(e.message == r.message);
    CHECK(e.code == r.code);
    // The same error, fed one byte at a time.
    frame_reader reader(1 << 20);
    std::optional<error> chunked;
    for (char b : r.bytes) {
      reader.feed(std::string_view(&b, 1));
      auto n = reader.next();
      if (!n) {
        chunked = n.err();
        break;
      }
      REQUIRE_FALSE(n->has_value());
    }
    REQUIRE(chunked.has_value());
    CHECK(chunked->message == r.message);
    // And decode_packet agrees.
    auto d = decode_packet(r.bytes);
    REQUIRE_FALSE(d.ok());
    CHECK(d.err().message == r.message);
  }
}

TEST_CASE("CONNECT edge cases that are valid decode", "[mqtt_codec]") {
  // An empty client id with clean_session=0 is returned: the server decides (CONNACK 0x02).
  auto p = decode_packet(frame(0x10, connect_head() + bytes({0x00, 0, 0}) + str("")));
  REQUIRE(p.ok());
  const auto& c = std::get<connect_packet>(*p);
  CHECK(c.client_id.empty());
  CHECK_FALSE(c.clean_session);
  CHECK(c.protocol_name == "MQTT");
  CHECK(c.protocol_level == 4);
  // A user name without a password is fine; a QoS 2 will is decoded.
  auto q = decode_packet(
    frame(0x10, connect_head() + bytes({0x96, 0, 5}) + str("id") + str("w") + str("") + str("u")));
  REQUIRE(q.ok());
  const auto& d = std::get<connect_packet>(*q);
  REQUIRE(d.will.has_value());
  CHECK(d.will->qos == 2);
  CHECK(d.will->payload.empty());
  CHECK(d.username == "u");
  CHECK_FALSE(d.password.has_value());
  // PUBLISH with QoS 2 decodes so that the server can refuse it.
  auto pub = decode_packet(frame(0x34, str("t") + bytes({0, 9}) + "x"));
  REQUIRE(pub.ok());
  CHECK(std::get<publish_packet>(*pub).qos == 2);
}

TEST_CASE("decode_packet needs exactly one whole packet", "[mqtt_codec]") {
  auto empty = decode_packet("");
  REQUIRE_FALSE(empty.ok());
  CHECK(empty.err().message == "packet at byte 0: truncated in the fixed header");
  auto header = decode_packet(bytes({0x30, 0x80}));
  REQUIRE_FALSE(header.ok());
  CHECK(header.err().message == "PUBLISH at byte 2: truncated in the fixed header");
  auto truncated = decode_packet(bytes({0x40, 0x02, 0x00}));
  REQUIRE_FALSE(truncated.ok());
  CHECK(truncated.err().message == "PUBACK at byte 3: truncated: the packet has 4 bytes, 3 given");
  auto trailing = decode_packet(bytes({0xc0, 0x00, 0xc0}));
  REQUIRE_FALSE(trailing.ok());
  CHECK(trailing.err().message == "PINGREQ at byte 2: 1 bytes after the end of the packet");
}

TEST_CASE("validate refuses packets the decoder would refuse, naming the field", "[mqtt_codec]") {
  struct row {
    packet p;
    std::string message;
  };
  connect_packet v31;
  v31.protocol_name = "MQIsdp";
  v31.protocol_level = 3;
  connect_packet no_user;
  no_user.password = "p";
  connect_packet bad_will;
  bad_will.will = will_message{"a/+", "", 0, false};
  const std::vector<row> rows = {
    {v31, "CONNECT: protocol \"MQIsdp\" level 3 is not MQTT 3.1.1 (\"MQTT\" level 4)"},
    {no_user, "CONNECT: a password without a user name is not allowed in MQTT 3.1.1"},
    {bad_will, "CONNECT: will topic at byte 2: wildcard '+' is not allowed in a topic name"},
    {connack_packet{true, connack_code::server_unavailable},
     "CONNACK: session present set with the refusing return code 3"},
    {publish_packet{"a/#", "", 0, false, false, 0},
     "PUBLISH: topic name at byte 2: wildcard '#' is not allowed in a topic name"},
    {publish_packet{"a", "", 3, false, false, 1}, "PUBLISH: QoS 3 is invalid"},
    {publish_packet{"a", "", 1, false, false, 0},
     "PUBLISH: packet identifier is 0 (must be non-zero)"},
    {publish_packet{"a", "", 0, false, false, 5},
     "PUBLISH: packet identifier 5 with QoS 0 (must be 0: it is not sent)"},
    {publish_packet{"a", "", 0, false, true, 0}, "PUBLISH: DUP is set with QoS 0"},
    {publish_packet{std::string(70000, 'a'), "", 0, false, false, 0},
     "PUBLISH: topic name at byte 65535: longer than 65535 bytes"},
    {puback_packet{0}, "PUBACK: packet identifier is 0 (must be non-zero)"},
    {subscribe_packet{1, {}}, "SUBSCRIBE: no topic filter (a SUBSCRIBE needs at least one)"},
    {subscribe_packet{1, {{"a", 0}, {"a/#/b", 0}}},
     "SUBSCRIBE: topic filter 1 at byte 2: '#' must be a whole level and the last one"},
    {subscribe_packet{1, {{"a", 3}}}, "SUBSCRIBE: requested QoS 3 of topic filter 0 is invalid"},
    {suback_packet{1, {0, 0x81}}, "SUBACK: return code 1 (0x81) is reserved"},
    {unsubscribe_packet{1, {}}, "UNSUBSCRIBE: no topic filter (an UNSUBSCRIBE needs at least one)"},
  };
  for (const auto& r : rows) {
    auto v = validate(r.p);
    REQUIRE_FALSE(v.ok());
    CHECK(v.err().message == r.message);
    CHECK(v.err().code == errc::invalid_argument);
  }
}

TEST_CASE("topic matching follows MQTT 3.1.1 section 4.7", "[mqtt_codec]") {
  struct row {
    const char* filter;
    const char* topic;
    bool matches;
  };
  const std::vector<row> rows = {
    // 4.7.1.2 multi-level wildcard.
    {"sport/tennis/player1/#", "sport/tennis/player1", true},
    {"sport/tennis/player1/#", "sport/tennis/player1/ranking", true},
    {"sport/tennis/player1/#", "sport/tennis/player1/score/wimbledon", true},
    {"sport/#", "sport", true},
    {"#", "sport/tennis/player1", true},
    {"#", "/", true},
    {"sport/tennis/#", "sport/tennis", true},
    {"sport/tennis/#", "sport/tennisplayer1", false},
    // 4.7.1.3 single-level wildcard.
    {"sport/tennis/+", "sport/tennis/player1", true},
    {"sport/tennis/+", "sport/tennis/player2", true},
    {"sport/tennis/+", "sport/tennis/player1/ranking", false},
    {"sport/+", "sport", false},
    {"sport/+", "sport/", true},
    {"+/+", "/finance", true},
    {"/+", "/finance", true},
    {"+", "/finance", false},
    {"+/tennis/#", "sport/tennis/player1", true},
    {"+/tennis/#", "sport/tennis", true},
    {"sport/+/player1", "sport/tennis/player1", true},
    {"sport/+/player1", "sport/tennis/player2", false},
    // 4.7.2 topics beginning with $.
    {"#", "$SYS/monitor/Clients", false},
    {"+/monitor/Clients", "$SYS/monitor/Clients", false},
    {"$SYS/#", "$SYS/monitor/Clients", true},
    {"$SYS/monitor/+", "$SYS/monitor/Clients", true},
    {"+", "$SYS", false},
    {"$iothub/twin/res/#", "$iothub/twin/res/200/?$rid=1", true},
    // 4.7.3 semantics: case-sensitive, spaces allowed, leading '/' is a level.
    {"ACCOUNTS", "Accounts", false},
    {"Accounts payable", "Accounts payable", true},
    {"/finance", "finance", false},
    {"finance", "/finance", false},
    // Plain levels.
    {"a/b", "a/b", true},
    {"a/b", "a/b/c", false},
    {"a/b/c", "a/b", false},
    {"a/b/", "a/b", false},
    {"a/+/#", "a/b", true},
    {"+/#", "/", true},
    {"+/+", "/", true},
    {"+", "", true},
    {"devices/d/messages/devicebound/#", "devices/d/messages/devicebound/%24.mid=1", true},
    {"devices/d/messages/devicebound/#", "devices/e/messages/devicebound/x", false},
  };
  for (const auto& r : rows) {
    INFO(r.filter << " vs " << r.topic);
    CHECK(topic_matches(r.filter, r.topic) == r.matches);
  }
}

TEST_CASE("topic names and filters are checked as section 4.7 says", "[mqtt_codec]") {
  for (const char* ok : {"sport/tennis/player1", "/", "//", "a b", "$SYS/x", "\xe2\x82\xac"})
    CHECK(check_topic_name(ok).ok());
  for (const char* ok : {"#", "+", "+/tennis/#", "sport/tennis/#", "sport/+/player1", "/+", "+/+",
                         "$SYS/#", "a//+//#"})
    CHECK(check_topic_filter(ok).ok());
  struct row {
    std::string s;
    std::string message;
  };
  for (const auto& r : std::vector<row>{
         {"", "topic name at byte 0: must not be empty"},
         {"sport/+", "topic name at byte 6: wildcard '+' is not allowed in a topic name"},
         {"#", "topic name at byte 0: wildcard '#' is not allowed in a topic name"},
         {std::string("a\0", 2), "topic name at byte 1: U+0000 is not allowed"},
         {"a\xff", "topic name at byte 1: ill-formed UTF-8 (sequence starting 0xff)"},
       }) {
    auto e = check_topic_name(r.s);
    REQUIRE_FALSE(e.ok());
    CHECK(e.err().message == r.message);
  }
  for (const auto& r : std::vector<row>{
         {"", "topic filter at byte 0: must not be empty"},
         {"sport/tennis#", "topic filter at byte 12: '#' must be a whole level and the last one"},
         {"sport/tennis/#/ranking",
          "topic filter at byte 13: '#' must be a whole level and the last one"},
         {"sport+", "topic filter at byte 5: '+' must be a whole level"},
         {"+a", "topic filter at byte 0: '+' must be a whole level"},
         {"##", "topic filter at byte 0: '#' must be a whole level and the last one"},
         {"a/\xed\xbf\xbf", "topic filter at byte 2: ill-formed UTF-8 (sequence starting 0xed)"},
       }) {
    auto e = check_topic_filter(r.s);
    REQUIRE_FALSE(e.ok());
    CHECK(e.err().message == r.message);
  }
}

TEST_CASE("UTF-8 strings: well-formed, no U+0000, no surrogates", "[mqtt_codec]") {
  constexpr auto ok = std::string_view::npos;
  struct row {
    std::string s;
    std::size_t bad;
  };
  const std::vector<row> rows = {
    {"", ok},
    {"plain ascii, longer than eight bytes", ok},
    {"\xc3\xa9", ok},           // U+00E9
    {"\xdf\xbf", ok},           // U+07FF
    {"\xe0\xa0\x80", ok},       // U+0800
    {"\xed\x9f\xbf", ok},       // U+D7FF, just below the surrogates
    {"\xee\x80\x80", ok},       // U+E000, just above
    {"\xef\xbf\xbf", ok},       // U+FFFF (a noncharacter: allowed)
    {"\xf0\x90\x80\x80", ok},   // U+10000
    {"\xf4\x8f\xbf\xbf", ok},   // U+10FFFF
    {"\x7f\x01", ok},           // control characters are allowed (MQTT-1.5.3-2 SHOULD NOT)
    {std::string("\0", 1), 0},  // U+0000
    {"\xc0\x80", 0},            // overlong U+0000
    {"\xc1\xbf", 0},            // overlong
    {"\xe0\x9f\xbf", 0},        // overlong 3-byte
    {"\xf0\x8f\xbf\xbf", 0},    // overlong 4-byte
    {"\xed\xa0\x80", 0},        // U+D800
    {"\xed\xbf\xbf", 0},        // U+DFFF
    {"\xf4\x90\x80\x80", 0},    // above U+10FFFF
    {"\xf5\x80\x80\x80", 0},
    {"\xff", 0},
    {"ab\x80", 2},                // lone continuation byte
    {"ab\xc3", 2},                // truncated
    {"ab\xe2\x82", 2},            // truncated
    {"ab\xe2\x28\xa1", 2},        // bad continuation
    {"abcdefgh\xf0\x9d\x84", 8},  // truncated after the fast path
  };
  for (const auto& r : rows) {
    INFO("row " << (&r - rows.data()));
    CHECK(find_bad_utf8(r.s) == r.bad);
  }
  // A NUL anywhere in a long ASCII string (the 8-byte fast path) is found.
  for (std::size_t i = 0; i < 40; ++i) {
    std::string s(40, 'a');
    s[i] = '\0';
    CHECK(find_bad_utf8(s) == i);
  }
}

TEST_CASE("decoding a PUBLISH allocates only its topic and payload", "[mqtt_codec]") {
  frame_reader reader(1 << 16);
  std::string wire;
  encode_publish(wire, "devices/thermostat-17/messages/events/", std::string(100, 'x'), 1, false,
                 false, 42);
  CHECK(wire == encode(publish_packet{"devices/thermostat-17/messages/events/",
                                      std::string(100, 'x'), 1, false, false, 42}));
  for (int round = 0; round < 3; ++round) {
    reader.feed(wire + wire);
    for (int i = 0; i < 2; ++i) {
      allocations_ = 0;
      counting_ = true;
      auto r = reader.next();
      counting_ = false;
      REQUIRE(r.ok());
      REQUIRE(r->has_value());
      CHECK(allocations_.load() ==
            2);  // the topic (longer than the small-string buffer) and the payload
    }
    CHECK(reader.buffered() == 0);
  }
  // Encoding into a buffer with room allocates nothing.
  std::string out;
  out.reserve(4096);
  allocations_ = 0;
  counting_ = true;
  encode_publish(out, "devices/thermostat-17/messages/events/", "payload", 1, false, false, 1);
  encode(puback_packet{1}, out);
  counting_ = false;
  CHECK(allocations_.load() == 0);
}

TEST_CASE("the reader frees a big buffer once it has decoded everything", "[mqtt_codec]") {
  frame_reader reader(1 << 20);
  const std::string big = encode(publish_packet{"t", std::string(100000, 'x'), 0, false, false, 0});
  // Half a packet stays buffered...
  reader.feed(std::string_view(big).substr(0, 50000));
  auto r = reader.next();
  REQUIRE(r.ok());
  CHECK_FALSE(r->has_value());
  CHECK(reader.buffered() == 50000);
  CHECK(reader.buffer_capacity() >= 50000);
  // ...and goes once the packet is complete.
  reader.feed(std::string_view(big).substr(50000));
  r = reader.next();
  REQUIRE(r.ok());
  REQUIRE(r->has_value());
  CHECK(reader.buffered() == 0);
  CHECK(reader.buffer_capacity() <= 4096);
  CHECK(reader.consumed() == big.size());
  r = reader.next();
  REQUIRE(r.ok());
  CHECK_FALSE(r->has_value());
}
