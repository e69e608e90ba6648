// libFuzzer target: canopy::message::decode, the parser of encoded messages
// read back from the store and received over the control socket (and, later,
// over gateway links). Anything it accepts must be safe to read in full and
// must re-encode to the very same bytes.
#include <canopy/message.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <string_view>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  auto m = canopy::message::decode(std::string_view{reinterpret_cast<const char*>(data), size});
  if (!m)
    return 0;
  std::size_t total = m->body().size();
  for (auto& [k, v] : m->properties())
    total += k.size() + v.size();
  total += m->message_id().size() + m->correlation_id().size() + m->content_type().size()
           + m->content_encoding().size() + m->connection_device_id().size()
           + m->connection_module_id().size() + m->output_name().size() + m->user_id().size();
  (void) m->creation_time_utc_ms();
  (void) m->ttl_secs();
  // (Cap'n Proto lets pointers share bytes, so `total` may exceed `size`.)
  (void) total;
  if (m->encoded() != std::string_view{reinterpret_cast<const char*>(data), size}) {
    std::fprintf(stderr, "decode accepted bytes it does not hold\n");
    __builtin_trap();
  }
  // A round trip through the builder must decode again.
  auto copy = canopy::message_builder::from(*m).build();
  if (!canopy::message::decode(copy.encoded())) {
    std::fprintf(stderr, "a rebuilt message does not decode\n");
    __builtin_trap();
  }
  return 0;
}
