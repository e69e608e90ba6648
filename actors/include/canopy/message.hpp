// canopy::message — an immutable telemetry message (part of the module SDK).
//
// A message is encoded exactly once, by message_builder::build(), into a
// Cap'n Proto buffer (schemas/message.capnp). After that it is an immutable,
// reference-counted buffer: copying a message copies a pointer, and the same
// bytes travel between modules, into the store and across links.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace canopy {

class message_buffer;  // the encoded words; defined in actors/message.cpp

/// An immutable message. Cheap to copy (one atomic increment). Thread-safe to
/// read from any number of threads.
class message {
 public:
  /// An empty message (no body, no properties).
  message();

  /// Body bytes. The view lives as long as any copy of this message.
  std::string_view body() const;

  /// Application property `key`, or nullopt.
  std::optional<std::string_view> property(std::string_view key) const;

  /// All application properties, in insertion order.
  std::vector<std::pair<std::string_view, std::string_view>> properties() const;

  // System properties (empty string_view / 0 when unset).
  std::string_view message_id() const;
  std::string_view correlation_id() const;
  std::string_view content_type() const;
  std::string_view content_encoding() const;
  std::int64_t creation_time_utc_ms() const;
  std::string_view connection_device_id() const;
  std::string_view connection_module_id() const;
  std::string_view output_name() const;
  std::uint32_t ttl_secs() const;
  std::string_view user_id() const;

  /// The encoded bytes (Cap'n Proto flat array, word-aligned), as stored and sent.
  std::string_view encoded() const;

  /// Size of the encoded form in bytes.
  std::size_t encoded_size() const;

  /// Decodes bytes produced by encoded(). Validates the structure with tight
  /// limits; returns nullopt for malformed input (never crashes). Copies once.
  static std::optional<message> decode(std::string_view bytes);

  /// True if both share the very same buffer (zero-copy checks in tests).
  bool same_buffer(const message& other) const noexcept { return buf_ == other.buf_; }

 private:
  friend class message_builder;
  explicit message(std::shared_ptr<const message_buffer> buf);
  std::shared_ptr<const message_buffer> buf_;
};

/// Builds a message. Set what you need, then build() once.
class message_builder {
 public:
  message_builder();
  ~message_builder();
  message_builder(message_builder&&) noexcept;
  message_builder& operator=(message_builder&&) noexcept;

  message_builder& body(std::string_view bytes);
  message_builder& property(std::string_view key, std::string_view value);
  message_builder& message_id(std::string_view v);
  message_builder& correlation_id(std::string_view v);
  message_builder& content_type(std::string_view v);
  message_builder& content_encoding(std::string_view v);
  message_builder& creation_time_utc_ms(std::int64_t v);
  message_builder& connection_device_id(std::string_view v);
  message_builder& connection_module_id(std::string_view v);
  message_builder& output_name(std::string_view v);
  message_builder& ttl_secs(std::uint32_t v);
  message_builder& user_id(std::string_view v);

  /// Starts from an existing message's body and properties (one copy, here).
  static message_builder from(const message& m);

  /// Encodes the message. The builder is empty afterwards.
  message build();

 private:
  struct fields;
  std::unique_ptr<fields> f_;
};

}  // namespace canopy
