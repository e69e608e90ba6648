// Routes in Azure IoT Edge's syntax, parsed and compiled once per deployment:
//   [SELECT *] FROM <source> [WHERE <condition>] INTO <sink>
// Sources: /* | /messages/* | /messages/modules/* | /messages/modules/{id}/* |
//          /messages/modules/{id}/outputs/* | /messages/modules/{id}/outputs/{name}
// Sinks:   $upstream | BrokeredEndpoint("/modules/{id}/inputs/{name}")
// Conditions: the IoT Hub routing query language (see route.cpp for the subset).
// No CAF or KJ here: the router actor and the fuzz target both use it.
#pragma once

#include "runtime/expected.hpp"

#include <canopy/message.hpp>

#include <cstddef>
#include <memory>
#include <string>
#include <string_view>

namespace canopy {

/// Where a message came from, as the router knows it (kept beside the encoded
/// message so forwarding never re-encodes it).
struct message_source {
  std::string_view device;  ///< connectionDeviceId ("" for the node's own modules)
  std::string_view module;  ///< connectionModuleId ("" for a leaf device)
  std::string_view output;  ///< outputName
};

/// A route's destination.
struct route_sink {
  enum class kind { module_input, upstream };
  kind type = kind::upstream;
  std::string module;  ///< for module_input
  std::string input;   ///< for module_input

  /// "$upstream" or "/modules/{module}/inputs/{input}".
  std::string to_string() const;
  bool operator==(const route_sink&) const = default;
};

class condition;  // compiled WHERE clause (route.cpp)

/// True if `name` can name a module (in a manifest, a FROM path or a sink), and
/// likewise an output or input name: 1 to 64 of A-Z a-z 0-9 _ . - (so never
/// starting with '$', which is reserved for $edgeAgent, $edgeHub, $upstream).
bool is_valid_module_name(std::string_view name) noexcept;

/// Longest route text compile() accepts, in bytes.
inline constexpr std::size_t max_route_length = 8192;

/// A compiled route. Immutable after compile(); safe to share across threads.
class route {
 public:
  /// Parses and compiles `text`. Errors name the route and the 1-based column:
  /// "route 'r1': column 23: expected INTO".
  static expected<route> compile(std::string_view name, std::string_view text);

  const std::string& name() const noexcept { return name_; }
  const route_sink& sink() const noexcept { return sink_; }

  /// True if messages from `src` are selected by this route's FROM clause.
  bool matches_source(const message_source& src) const noexcept;

  /// True if the WHERE clause holds for `msg` (always true without WHERE).
  /// Undefined or null results count as false. Never throws.
  bool matches_condition(const message& msg, const message_source& src) const;

  /// matches_source && matches_condition.
  bool matches(const message& msg, const message_source& src) const {
    return matches_source(src) && matches_condition(msg, src);
  }

  /// Modules named by the FROM clause ("" if it names none, e.g. /messages/*).
  const std::string& source_module() const noexcept { return source_module_; }

 private:
  std::string name_;
  // FROM: which sources; empty strings mean "any".
  bool modules_only_ = false;  ///< /messages/modules/...: leaf-device messages excluded
  std::string source_module_;
  std::string source_output_;
  bool any_output_ = true;
  route_sink sink_;
  std::shared_ptr<const condition> where_;  ///< null: no WHERE clause
};

}  // namespace canopy
