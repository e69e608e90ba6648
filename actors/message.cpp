#include <canopy/message.hpp>

#include "message.capnp.h"

#include <capnp/message.h>
#include <capnp/serialize.h>
#include <kj/exception.h>

#include <cstring>
#include <limits>

namespace canopy {

/// The encoded words of one message. Immutable once built.
class message_buffer {
 public:
  explicit message_buffer(kj::Array<capnp::word> words) : words_(kj::mv(words)) {}

  kj::ArrayPtr<const capnp::word> words() const { return words_.asPtr(); }

 private:
  kj::Array<capnp::word> words_;
};

namespace {

// Our own buffers were built by message_builder or validated by decode(), so
// reading them cannot fail; the reader is cheap to construct (it parses the
// segment table) and is made per access because its traversal-limit counter is
// mutable state that must not be shared between threads.
class root_reader {
 public:
  explicit root_reader(const message_buffer& buf)
    : reader_(buf.words(), reader_options()), root_(reader_.getRoot<schema::Message>()) {}

  schema::Message::Reader* operator->() { return &root_; }

  static capnp::ReaderOptions reader_options() {
    capnp::ReaderOptions opts;
    opts.traversalLimitInWords = std::numeric_limits<uint64_t>::max() / 16;
    opts.nestingLimit = 16;
    return opts;
  }

 private:
  capnp::FlatArrayMessageReader reader_;
  schema::Message::Reader root_;
};

std::string_view view(capnp::Text::Reader t) { return {t.begin(), t.size()}; }

kj::Array<capnp::word> encode_empty() {
  capnp::MallocMessageBuilder b{16};
  b.initRoot<schema::Message>();
  return capnp::messageToFlatArray(b);
}

}  // namespace

// -- message ------------------------------------------------------------------

message::message() : buf_(std::make_shared<const message_buffer>(encode_empty())) {}

message::message(std::shared_ptr<const message_buffer> buf) : buf_(std::move(buf)) {}

std::string_view message::body() const {
  root_reader r{*buf_};
  auto d = r->getBody();
  return {reinterpret_cast<const char*>(d.begin()), d.size()};
}

std::optional<std::string_view> message::property(std::string_view key) const {
  root_reader r{*buf_};
  for (auto p : r->getProperties())
    if (view(p.getKey()) == key)
      return view(p.getValue());
  return std::nullopt;
}

std::vector<std::pair<std::string_view, std::string_view>> message::properties() const {
  root_reader r{*buf_};
  std::vector<std::pair<std::string_view, std::string_view>> out;
  auto props = r->getProperties();
  out.reserve(props.size());
  for (auto p : props)
    out.emplace_back(view(p.getKey()), view(p.getValue()));
  return out;
}

#define CANOPY_SYSTEM_TEXT(fn, getter)        \
  std::string_view message::fn() const {      \
    root_reader r{*buf_};                     \
    return view(r->getSystem().getter());     \
  }
CANOPY_SYSTEM_TEXT(message_id, getMessageId)
CANOPY_SYSTEM_TEXT(correlation_id, getCorrelationId)
CANOPY_SYSTEM_TEXT(content_type, getContentType)
CANOPY_SYSTEM_TEXT(content_encoding, getContentEncoding)
CANOPY_SYSTEM_TEXT(connection_device_id, getConnectionDeviceId)
CANOPY_SYSTEM_TEXT(connection_module_id, getConnectionModuleId)
CANOPY_SYSTEM_TEXT(output_name, getOutputName)
CANOPY_SYSTEM_TEXT(user_id, getUserId)
#undef CANOPY_SYSTEM_TEXT

std::int64_t message::creation_time_utc_ms() const {
  root_reader r{*buf_};
  return r->getSystem().getCreationTimeUtcMs();
}

std::uint32_t message::ttl_secs() const {
  root_reader r{*buf_};
  return r->getSystem().getTtlSecs();
}

std::string_view message::encoded() const {
  auto bytes = buf_->words().asBytes();
  return {reinterpret_cast<const char*>(bytes.begin()), bytes.size()};
}

std::size_t message::encoded_size() const { return buf_->words().size() * sizeof(capnp::word); }

std::optional<message> message::decode(std::string_view bytes) {
  // Untrusted input: bound everything and touch every field once, inside a
  // try block, so a malformed buffer is refused here and never later.
  constexpr std::size_t max_bytes = 64u << 20;
  if (bytes.empty() || bytes.size() % sizeof(capnp::word) != 0 || bytes.size() > max_bytes)
    return std::nullopt;
  auto words = kj::heapArray<capnp::word>(bytes.size() / sizeof(capnp::word));
  std::memcpy(words.begin(), bytes.data(), bytes.size());
  try {
    kj::ArrayPtr<const capnp::word> ptr = words.asPtr();
    // The segment table must account for exactly these bytes.
    if (capnp::expectedSizeInWordsFromPrefix(ptr) != ptr.size())
      return std::nullopt;
    capnp::ReaderOptions opts;
    opts.traversalLimitInWords = ptr.size() * 2 + 64;
    opts.nestingLimit = 8;
    capnp::FlatArrayMessageReader reader{ptr, opts};
    if (reader.getEnd() != ptr.end())
      return std::nullopt;
    auto root = reader.getRoot<schema::Message>();
    (void) root.getBody();
    for (auto p : root.getProperties()) {
      (void) p.getKey();
      (void) p.getValue();
    }
    auto sys = root.getSystem();
    (void) sys.getMessageId();
    (void) sys.getCorrelationId();
    (void) sys.getContentType();
    (void) sys.getContentEncoding();
    (void) sys.getConnectionDeviceId();
    (void) sys.getConnectionModuleId();
    (void) sys.getOutputName();
    (void) sys.getUserId();
  } catch (const kj::Exception&) {
    return std::nullopt;
  }
  return message{std::make_shared<const message_buffer>(kj::mv(words))};
}

// -- message_builder ----------------------------------------------------------

struct message_builder::fields {
  std::string body;
  std::vector<std::pair<std::string, std::string>> properties;
  std::string message_id, correlation_id, content_type, content_encoding;
  std::string device_id, module_id, output_name, user_id;
  std::int64_t creation_time_utc_ms = 0;
  std::uint32_t ttl_secs = 0;
};

message_builder::message_builder() : f_(std::make_unique<fields>()) {}
message_builder::~message_builder() = default;
message_builder::message_builder(message_builder&&) noexcept = default;
message_builder& message_builder::operator=(message_builder&&) noexcept = default;

#define CANOPY_SETTER(fn, member)                            \
  message_builder& message_builder::fn(std::string_view v) { \
    f_->member.assign(v.data(), v.size());                   \
    return *this;                                            \
  }
CANOPY_SETTER(body, body)
CANOPY_SETTER(message_id, message_id)
CANOPY_SETTER(correlation_id, correlation_id)
CANOPY_SETTER(content_type, content_type)
CANOPY_SETTER(content_encoding, content_encoding)
CANOPY_SETTER(connection_device_id, device_id)
CANOPY_SETTER(connection_module_id, module_id)
CANOPY_SETTER(output_name, output_name)
CANOPY_SETTER(user_id, user_id)
#undef CANOPY_SETTER

message_builder& message_builder::property(std::string_view key, std::string_view value) {
  for (auto& kv : f_->properties)
    if (kv.first == key) {
      kv.second.assign(value.data(), value.size());
      return *this;
    }
  f_->properties.emplace_back(std::string{key}, std::string{value});
  return *this;
}

message_builder& message_builder::creation_time_utc_ms(std::int64_t v) {
  f_->creation_time_utc_ms = v;
  return *this;
}

message_builder& message_builder::ttl_secs(std::uint32_t v) {
  f_->ttl_secs = v;
  return *this;
}

message_builder message_builder::from(const message& m) {
  message_builder b;
  b.body(m.body());
  for (auto& [k, v] : m.properties())
    b.property(k, v);
  b.message_id(m.message_id())
    .correlation_id(m.correlation_id())
    .content_type(m.content_type())
    .content_encoding(m.content_encoding())
    .creation_time_utc_ms(m.creation_time_utc_ms())
    .connection_device_id(m.connection_device_id())
    .connection_module_id(m.connection_module_id())
    .output_name(m.output_name())
    .ttl_secs(m.ttl_secs())
    .user_id(m.user_id());
  return b;
}

message message_builder::build() {
  auto& f = *f_;
  // Size the first segment so the whole message fits in one (a flat array).
  std::size_t bytes = 256 + f.body.size() + f.message_id.size() + f.correlation_id.size()
                      + f.content_type.size() + f.content_encoding.size() + f.device_id.size()
                      + f.module_id.size() + f.output_name.size() + f.user_id.size();
  for (auto& kv : f.properties)
    bytes += kv.first.size() + kv.second.size() + 48;
  capnp::MallocMessageBuilder mb{static_cast<unsigned>(bytes / sizeof(capnp::word) + 16),
                                 capnp::AllocationStrategy::FIXED_SIZE};
  auto root = mb.initRoot<schema::Message>();
  root.setBody(kj::arrayPtr(reinterpret_cast<const kj::byte*>(f.body.data()), f.body.size()));
  auto props = root.initProperties(static_cast<unsigned>(f.properties.size()));
  for (unsigned i = 0; i < f.properties.size(); ++i) {
    props[i].setKey(kj::StringPtr{f.properties[i].first.c_str(), f.properties[i].first.size()});
    props[i].setValue(kj::StringPtr{f.properties[i].second.c_str(), f.properties[i].second.size()});
  }
  auto sys = root.initSystem();
  auto text = [](const std::string& s) { return kj::StringPtr{s.c_str(), s.size()}; };
  if (!f.message_id.empty())
    sys.setMessageId(text(f.message_id));
  if (!f.correlation_id.empty())
    sys.setCorrelationId(text(f.correlation_id));
  if (!f.content_type.empty())
    sys.setContentType(text(f.content_type));
  if (!f.content_encoding.empty())
    sys.setContentEncoding(text(f.content_encoding));
  if (!f.device_id.empty())
    sys.setConnectionDeviceId(text(f.device_id));
  if (!f.module_id.empty())
    sys.setConnectionModuleId(text(f.module_id));
  if (!f.output_name.empty())
    sys.setOutputName(text(f.output_name));
  if (!f.user_id.empty())
    sys.setUserId(text(f.user_id));
  sys.setCreationTimeUtcMs(f.creation_time_utc_ms);
  sys.setTtlSecs(f.ttl_secs);
  auto words = capnp::messageToFlatArray(mb);
  f_ = std::make_unique<fields>();
  return message{std::make_shared<const message_buffer>(kj::mv(words))};
}

}  // namespace canopy
