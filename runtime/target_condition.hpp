// Deployment target conditions in Azure IoT Edge's syntax, compiled once and
// evaluated against a device's id and tags (DESIGN.md "Registry"):
//   *                                         every device
//   tags.site = 'plant-1' AND tags.line = 3
//   deviceId IN ['gw1', "gw2"] OR NOT IS_DEFINED(tags.retired)
// See target_condition.cpp for the grammar and the comparison rules.
// Plain C++ (no CAF, no KJ, no SQLite): the registry and the fuzz target use it.
#pragma once

#include "runtime/expected.hpp"

#include <nlohmann/json_fwd.hpp>

#include <cstddef>
#include <memory>
#include <string>
#include <string_view>

namespace canopy {

namespace detail {
struct condition_node;  // compiled expression (target_condition.cpp)
}  // namespace detail

/// Longest condition text compile() accepts, in bytes.
inline constexpr std::size_t max_target_condition_length = 4096;

/// Deepest nesting of parentheses and NOT that compile() accepts.
inline constexpr int max_target_condition_depth = 32;

/// A compiled target condition. Immutable after compile(): cheap to copy (the
/// compiled tree is shared) and safe to use from any thread.
class target_condition {
 public:
  /// Parses and compiles `text`. Errors are invalid_argument and name the
  /// 1-based byte column: "target condition: column 12: expected a value".
  /// Costs O(length of text); the text is bounded (max_target_condition_length)
  /// and so is nesting (max_target_condition_depth), so no input exhausts the stack.
  static expected<target_condition> compile(std::string_view text);

  /// True if the condition holds for the device `device_id` with tags `tags`
  /// (the device's tags object; anything else counts as no tags). A comparison
  /// with a missing tag, or between values of different types, is false.
  /// Never throws; costs O(size of the condition).
  bool matches(std::string_view device_id, const nlohmann::json& tags) const;

  /// True if the condition is `*` (every device).
  bool matches_all() const noexcept { return root_ == nullptr; }

  /// The text as given to compile().
  const std::string& text() const noexcept { return text_; }

 private:
  target_condition() = default;

  std::string text_;
  // Null for `*`.
  std::shared_ptr<const detail::condition_node> root_;
};

}  // namespace canopy
