// MQTT 3.1.1 packet codec (OASIS standard, 29 October 2014): the control
// packets as plain structs, a frame_reader that cuts a byte stream into
// packets and checks them against the specification, encoders, and the topic
// rules of section 4.7. Pure C++: no CAF, no KJ, no I/O. Everything it reads
// comes from the network, so decoding is bounded (a maximum packet size given
// at construction), never throws, never recurses, and reports malformed input
// as a canopy::expected error naming the packet type, the byte offset in the
// packet and the field, e.g.
//   "PUBLISH at byte 2: topic name length 70000 exceeds the packet (12 bytes left)".
//
// Threads: a frame_reader belongs to one connection (one thread at a time);
// the free functions are pure and may be called from anywhere.
#pragma once

#include "runtime/expected.hpp"

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

namespace canopy::mqtt {

/// Control packet types (MQTT-2.2.1), with their wire values.
enum class packet_type : std::uint8_t {
  connect = 1,
  connack = 2,
  publish = 3,
  puback = 4,
  pubrec = 5,
  pubrel = 6,
  pubcomp = 7,
  subscribe = 8,
  suback = 9,
  unsubscribe = 10,
  unsuback = 11,
  pingreq = 12,
  pingresp = 13,
  disconnect = 14,
};

/// The specification's upper-case name of a packet type ("PUBLISH"), for logs.
const char* to_string(packet_type type) noexcept;

/// The largest remaining length the 4-byte varint can express (MQTT-2.2.3).
inline constexpr std::size_t max_remaining_length = 268'435'455;

/// The SUBACK return code for a refused subscription (MQTT-3.9.3).
inline constexpr std::uint8_t suback_failure = 0x80;

/// CONNACK return codes (MQTT-3.2.2.3); 6..255 are reserved and refused.
enum class connack_code : std::uint8_t {
  accepted = 0,
  unacceptable_protocol_version = 1,
  identifier_rejected = 2,
  server_unavailable = 3,
  bad_user_name_or_password = 4,
  not_authorized = 5,
};

/// The Will of a CONNECT: published by the server when the client goes away
/// without a DISCONNECT. The topic is a valid topic name (no wildcards).
struct will_message {
  std::string topic;     ///< a valid topic name
  std::string payload;   ///< binary
  std::uint8_t qos = 0;  ///< 0, 1 or 2
  bool retain = false;
  bool operator==(const will_message&) const = default;
};

/// CONNECT (MQTT-3.1). The decoder accepts only protocol "MQTT" level 4; the
/// fields are kept so that tests can encode other versions.
struct connect_packet {
  std::string protocol_name = "MQTT";
  std::uint8_t protocol_level = 4;
  /// Well-formed UTF-8, possibly empty: an empty id is decoded whatever
  /// clean_session says; the server refuses it (CONNACK 0x02) when
  /// clean_session is false (MQTT-3.1.3-8).
  std::string client_id;
  bool clean_session = true;
  std::uint16_t keep_alive_s = 0;
  std::optional<will_message> will;
  std::optional<std::string> username;  ///< well-formed UTF-8
  std::optional<std::string> password;  ///< binary; only together with a user name
  bool operator==(const connect_packet&) const = default;
};

/// CONNACK (MQTT-3.2). session_present only with return code accepted.
struct connack_packet {
  bool session_present = false;
  connack_code return_code = connack_code::accepted;
  bool operator==(const connack_packet&) const = default;
};

/// PUBLISH (MQTT-3.3). QoS 2 decodes (qos == 2) so that the server can refuse
/// it with a reason; Canopy does not support QoS 2. packet_id is 0 exactly
/// when qos is 0; dup only with qos > 0.
struct publish_packet {
  std::string topic;    ///< a valid topic name: non-empty, no '+' or '#'
  std::string payload;  ///< binary, may be empty
  std::uint8_t qos = 0;
  bool retain = false;
  bool dup = false;
  std::uint16_t packet_id = 0;
  bool operator==(const publish_packet&) const = default;
};

/// PUBACK (MQTT-3.4): acknowledges a QoS 1 PUBLISH.
struct puback_packet {
  std::uint16_t packet_id = 0;  ///< non-zero
  bool operator==(const puback_packet&) const = default;
};

/// PUBREC (MQTT-3.5), QoS 2 step 1 (decoded, not otherwise supported).
struct pubrec_packet {
  std::uint16_t packet_id = 0;  ///< non-zero
  bool operator==(const pubrec_packet&) const = default;
};

/// PUBREL (MQTT-3.6), QoS 2 step 2 (decoded, not otherwise supported).
struct pubrel_packet {
  std::uint16_t packet_id = 0;  ///< non-zero
  bool operator==(const pubrel_packet&) const = default;
};

/// PUBCOMP (MQTT-3.7), QoS 2 step 3 (decoded, not otherwise supported).
struct pubcomp_packet {
  std::uint16_t packet_id = 0;  ///< non-zero
  bool operator==(const pubcomp_packet&) const = default;
};

/// One entry of a SUBSCRIBE: a valid topic filter and the requested QoS.
struct subscription {
  std::string filter;
  std::uint8_t qos = 0;  ///< 0, 1 or 2
  bool operator==(const subscription&) const = default;
};

/// SUBSCRIBE (MQTT-3.8): at least one subscription.
struct subscribe_packet {
  std::uint16_t packet_id = 0;  ///< non-zero
  std::vector<subscription> subscriptions;
  bool operator==(const subscribe_packet&) const = default;
};

/// SUBACK (MQTT-3.9): one return code per subscription, in order; each is
/// the granted QoS (0, 1, 2) or suback_failure (0x80).
struct suback_packet {
  std::uint16_t packet_id = 0;  ///< non-zero
  std::vector<std::uint8_t> return_codes;
  bool operator==(const suback_packet&) const = default;
};

/// UNSUBSCRIBE (MQTT-3.10): at least one valid topic filter.
struct unsubscribe_packet {
  std::uint16_t packet_id = 0;  ///< non-zero
  std::vector<std::string> filters;
  bool operator==(const unsubscribe_packet&) const = default;
};

/// UNSUBACK (MQTT-3.11).
struct unsuback_packet {
  std::uint16_t packet_id = 0;  ///< non-zero
  bool operator==(const unsuback_packet&) const = default;
};

/// PINGREQ (MQTT-3.12).
struct pingreq_packet {
  bool operator==(const pingreq_packet&) const = default;
};

/// PINGRESP (MQTT-3.13).
struct pingresp_packet {
  bool operator==(const pingresp_packet&) const = default;
};

/// DISCONNECT (MQTT-3.14).
struct disconnect_packet {
  bool operator==(const disconnect_packet&) const = default;
};

/// Any control packet. The alternatives are in wire order: index() + 1 is
/// the packet type's value (see type_of).
using packet =
  std::variant<connect_packet, connack_packet, publish_packet, puback_packet, pubrec_packet,
               pubrel_packet, pubcomp_packet, subscribe_packet, suback_packet, unsubscribe_packet,
               unsuback_packet, pingreq_packet, pingresp_packet, disconnect_packet>;

/// The type of a packet.
packet_type type_of(const packet& p) noexcept;

/// Cuts a byte stream into MQTT packets. feed() the bytes as they arrive, in
/// any chunking, then call next() until it returns nullopt (needs more bytes)
/// or an error.
///
/// Errors (canopy::expected, never thrown): errc::incompatible for a CONNECT
/// of another protocol version (the server answers CONNACK 0x01 and closes,
/// MQTT-3.1.2-2); errc::invalid_argument for everything else malformed,
/// including a fixed header announcing a remaining length above the maximum
/// (reported as soon as the fixed header is read, before the body arrives).
/// After an error the reader stays failed: next() returns the same error and
/// feed() drops its input.
///
/// Memory: the reader copies what feed() gives it and releases bytes once
/// decoded. Called as intended (next() until nullopt after each feed()), it
/// holds at most one incomplete packet — at most 5 + max_packet_size bytes —
/// plus the last chunk fed. A buffer grown past 4 KiB is freed whenever the
/// reader has consumed everything, so an idle connection holds no big buffer.
/// Decoding a PUBLISH allocates only its topic and payload strings; a decoded
/// packet takes memory proportional to its size (at most about 11 times, for
/// a SUBSCRIBE or UNSUBSCRIBE of one-byte filters, each a std::string).
class frame_reader {
 public:
  /// max_packet_size bounds the remaining length (the packet after its fixed
  /// header), at most max_remaining_length (larger values are clamped).
  explicit frame_reader(std::size_t max_packet_size) noexcept;

  /// Appends bytes read from the connection. Cost: a copy of the bytes.
  void feed(std::string_view bytes);

  /// The next complete packet; nullopt when more bytes are needed; an error
  /// for malformed input (then the reader stays failed).
  expected<std::optional<packet>> next();

  /// True once next() has returned an error.
  bool failed() const noexcept { return failed_.has_value(); }

  /// Bytes fed but not yet decoded.
  std::size_t buffered() const noexcept { return buffer_.size() - read_; }

  /// Bytes the reader's buffer has allocated (its capacity), for memory checks.
  std::size_t buffer_capacity() const noexcept { return buffer_.capacity(); }

  /// Bytes of the stream decoded so far (the offset of the next packet).
  std::uint64_t consumed() const noexcept { return consumed_; }

  /// The maximum remaining length this reader accepts.
  std::size_t max_packet_size() const noexcept { return max_packet_size_; }

 private:
  expected<std::optional<packet>> fail(error err);

  std::string buffer_;
  std::size_t read_ = 0;  // offset in buffer_ of the next packet
  std::uint64_t consumed_ = 0;
  std::size_t max_packet_size_;
  std::optional<error> failed_;
};

/// Decodes exactly one complete packet (fixed header included) from bytes,
/// with the same checks and errors as frame_reader; an incomplete packet or
/// bytes after it are errors too. For tests, tools and the bench.
expected<packet> decode_packet(std::string_view bytes,
                               std::size_t max_packet_size = max_remaining_length);

/// Checks a packet built in memory against the rules the decoder enforces
/// (string lengths <= 65535, well-formed UTF-8, topic names and filters, QoS,
/// packet ids, CONNECT flags, remaining length). The encoders expect packets
/// that pass: call this first on packets made from untrusted content. The
/// message names the packet type and the field.
expected<void> validate(const packet& p);

/// Appends the wire form of p to out. p must be valid (see validate()):
/// for invalid packets the output is unspecified (but memory-safe), e.g. an
/// over-long string's length is written modulo 65536. Cost: one append of the
/// packet's size; no other allocation.
void encode(const packet& p, std::string& out);

/// The wire form of p (see encode(const packet&, std::string&)).
std::string encode(const packet& p);

/// Appends a PUBLISH built from views, without building a publish_packet
/// (the broker's fan-out path). Same preconditions as the publish_packet
/// fields: a valid topic name, qos <= 2, packet_id != 0 exactly when qos > 0.
void encode_publish(std::string& out, std::string_view topic, std::string_view payload,
                    std::uint8_t qos, bool retain, bool dup, std::uint16_t packet_id);

/// Checks a topic name (MQTT-4.7): non-empty, at most 65535 bytes,
/// well-formed UTF-8 without U+0000, no wildcard ('+', '#'). The message
/// names the byte at fault, e.g. "topic name: wildcard '+' at byte 4".
expected<void> check_topic_name(std::string_view name);

/// Checks a topic filter (MQTT-4.7): non-empty, at most 65535 bytes,
/// well-formed UTF-8 without U+0000, '#' only as the whole last level, '+'
/// only as a whole level.
expected<void> check_topic_filter(std::string_view filter);

/// Checks an MQTT UTF-8 string (MQTT-1.5.3): well-formed UTF-8 (no overlong
/// forms, no surrogates U+D800..U+DFFF, nothing above U+10FFFF) and no U+0000.
/// Returns the offset of the first bad byte, or npos when s is fine.
std::size_t find_bad_utf8(std::string_view s) noexcept;

/// Whether a topic name matches a subscription's filter (MQTT-4.7): '+'
/// matches exactly one level, '#' the parent level and any number of child
/// levels, and a filter starting with a wildcard does not match a topic
/// starting with '$' (MQTT-4.7.2-1). Meant for a valid filter and topic name;
/// other inputs give some answer, never undefined behaviour. Allocates nothing.
bool topic_matches(std::string_view filter, std::string_view topic) noexcept;

}  // namespace canopy::mqtt
