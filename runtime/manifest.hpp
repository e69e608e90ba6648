// The deployment manifest: parsing and validation of Azure IoT Edge-shaped JSON
// into a canopy::deployment (runtime/deployment.hpp). Plain C++; no CAF or KJ.
//
//   {"modulesContent": {
//     "$edgeAgent": {"properties.desired": {
//       "schemaVersion": "1.1",
//       "runtime": {"settings": {"restart": {...node-wide restart settings}}},   optional
//       "systemModules": {...},                                                  ignored
//       "modules": {"NAME": {
//         "version": "1.0", "type": "actor", "status": "running" | "stopped",
//         "restartPolicy": "never" | "on-failure" | "on-unhealthy" | "always",
//         "startupOrder": 0..4294967295,
//         "settings": {"library": "builtin:NAME" | "path/libx.so", ...passed to the module},
//                                                           "type": "actor" (the default)
//         "settings": {"executable": "path", "args": ["..."], "workingDir": "path",
//                      "stopGraceSecs": 10},                 "type": "process" (no library)
//         "env": {"VAR": {"value": "..."}},
//         "restart": {"maxRestarts": 5, "withinSecs": 300, "backoffBaseMs": 1000,
//                     "backoffCapSecs": 60, "stablePeriodSecs": 600, "jitter": 0.2},
//         "healthCheck": {"periodSecs": 10, "deadlineSecs": 5}}}}},
//     "$edgeHub": {"properties.desired": {                                        optional
//       "schemaVersion": "1.1",
//       "routes": {"NAME": "FROM ... INTO ..." |
//                  {"route": "FROM ... INTO ...", "priority": 0..9, "timeToLiveSecs": N}},
//       "storeAndForwardConfiguration": {"timeToLiveSecs": N}}},
//     "MODULENAME": {"properties.desired": {...that module's desired properties}}}}
//
// Only "modulesContent", "$edgeAgent", its "schemaVersion" and "modules", each
// module's "settings" with its "library" (actors) or "executable" (processes),
// and each object route's "route" are required. A process module's
// "executable" and "workingDir" are relative to base_dir like libraries; its
// "workingDir" defaults to base_dir. Unknown keys are ignored, except those that look like a misspelt
// known key ("restartpolicy", "libary"), which are errors.
//
// Errors: every problem found, one per line, each "PATH: problem", e.g.
//   $.modulesContent.$edgeAgent['properties.desired'].modules.filter.restartPolicy:
//     "sometimes" is not one of never, on-failure, on-unhealthy, always
// PATH notation (JSONPath-like): "$" is the document; a key made only of ASCII
// letters, digits, '_', '-' and '$' that does not start with a digit or '-' is
// written ".key"; any other key is written ['key'] with ' and \ escaped by a
// backslash. Malformed JSON gives a single "invalid JSON at byte N: ..." error
// (N as counted by nlohmann::json, 1-based).
#pragma once

#include "runtime/deployment.hpp"
#include "runtime/expected.hpp"

#include <cstddef>
#include <functional>
#include <optional>
#include <string>
#include <string_view>

namespace canopy {

/// Resolves a module's "library" value: returns the absolute path of the library
/// file, "" for "builtin:NAME", or an error (its message is prefixed with the
/// JSON path of the "library" field). May load the library to check it.
using library_resolver =
  std::function<expected<std::string>(std::string_view library, const std::string& base_dir)>;

/// How parse_manifest() treats library references.
struct manifest_options {
  /// Directory relative library paths resolve against (usually the manifest's
  /// directory); copied into deployment::base_dir.
  std::string base_dir;
  /// Checks and resolves each module library. If empty, any library is accepted
  /// and resolved with resolve_library_path() (no file-system checks).
  library_resolver resolve_library;
  /// If true, a process module's executable must be an executable regular
  /// file and its workingDir a directory, now, on this machine. The hub sets
  /// false: it checks manifests that run on other machines.
  bool check_process_files = true;
};

/// Largest manifest parse_manifest() accepts, in bytes.
inline constexpr std::size_t max_manifest_size = 16 * 1024 * 1024;

/// Deepest nesting of JSON arrays/objects parse_manifest() accepts.
inline constexpr int max_manifest_depth = 64;

/// Parses and validates a manifest. On success: modules sorted by
/// (startup_order, name), routes sorted by name (each compiled once to check
/// it), manifest = the parsed JSON. On failure: errc::invalid_argument (or the
/// resolver's code for the first error if that came from the resolver) and all
/// problems, one per line. Never throws. Cost: linear in the manifest size plus
/// one resolver call per module.
expected<deployment> parse_manifest(std::string_view json_text, const manifest_options& opts);

/// Byte offset (1-based) of the first '[' or '{' of the JSON text `text` nested
/// deeper than `limit` (strings skipped), or nullopt. nlohmann parses
/// iteratively, but dump() and comparisons recurse: callers bound the depth of
/// untrusted documents with this before parsing. Linear, never throws.
std::optional<std::size_t> json_too_deep(std::string_view text, int limit) noexcept;

/// The resolution used when no resolver is given: "builtin:NAME" → "" (error if
/// NAME is empty), an absolute path → itself, a relative one → base_dir/path
/// (against the working directory if base_dir is empty), lexically normalised.
/// Touches no files.
expected<std::string> resolve_library_path(std::string_view library, const std::string& base_dir);

/// `parent` extended by object key `key` in the notation above, e.g.
/// json_path_key("$.modules", "my.mod") == "$.modules['my.mod']".
std::string json_path_key(std::string_view parent, std::string_view key);

}  // namespace canopy
