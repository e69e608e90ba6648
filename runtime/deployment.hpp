// A validated deployment: what runtime/manifest.cpp produces from a manifest
// file and what the agent reconciles against the running modules.
// Plain data; no CAF or KJ.
#pragma once

#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace canopy {

/// Azure IoT Edge's module restartPolicy.
enum class restart_policy { never, on_failure, on_unhealthy, always };

/// Parses "never" | "on-failure" | "on-unhealthy" | "always".
bool parse_restart_policy(std::string_view text, restart_policy& out);
const char* to_string(restart_policy p) noexcept;

/// The status a manifest asks for.
enum class desired_status { running, stopped };

/// Restart limits and backoff for a module (node defaults, overridable per module
/// under the module's "restart" object in the manifest).
struct restart_settings {
  int max_restarts = 5;                                   ///< restarts allowed ...
  std::chrono::milliseconds within{std::chrono::minutes{5}};  ///< ... within this window
  std::chrono::milliseconds backoff_base{std::chrono::seconds{1}};
  std::chrono::milliseconds backoff_cap{std::chrono::seconds{60}};
  std::chrono::milliseconds stable_period{std::chrono::minutes{10}};
  double jitter = 0.2;  ///< +/- fraction applied to each backoff delay
  bool operator==(const restart_settings&) const = default;
};

/// Health checking for on-unhealthy / always (period 0 = off).
struct health_settings {
  std::chrono::milliseconds period{std::chrono::seconds{10}};
  std::chrono::milliseconds deadline{std::chrono::seconds{5}};
  bool operator==(const health_settings&) const = default;
};

/// How a process module ("type": "process") runs, from its "settings".
struct process_settings {
  std::string executable;       ///< as written in settings.executable
  std::string executable_path;  ///< resolved absolute path
  std::vector<std::string> args;  ///< settings.args: argv[1..]
  /// settings.workingDir resolved against the manifest's directory; that
  /// directory if not given ("" = the node's working directory).
  std::string working_dir;
  /// settings.stopGraceSecs: SIGTERM, then SIGKILL after this long.
  std::chrono::milliseconds stop_grace{std::chrono::seconds{10}};
  bool operator==(const process_settings&) const = default;
};

/// One module of a deployment.
struct module_spec {
  std::string name;
  std::string type = "actor";           ///< "actor" or "process"
  std::string library;                  ///< actors: as written: "builtin:NAME" or a path
  std::string library_path;             ///< actors: resolved absolute path; empty for builtins
  process_settings process;             ///< processes: what to run (empty for actors)
  nlohmann::json settings = nlohmann::json::object();  ///< passed to module::start
  std::map<std::string, std::string> env;
  desired_status status = desired_status::running;
  restart_policy restart = restart_policy::always;
  std::uint32_t startup_order = 4294967295;  ///< Azure's default (UINT32_MAX): after every ordered module
  std::string version;
  restart_settings limits;
  health_settings health;
  nlohmann::json desired_properties = nlohmann::json::object();

  /// True if running `o` instead of this needs a restart (anything but the
  /// desired properties changed).
  bool needs_restart_for(const module_spec& o) const;
};

/// One route, as written in $edgeHub's routes (string or object form).
struct route_spec {
  std::string name;
  std::string text;
  int priority = 0;           ///< 0 (highest) .. 9
  std::uint32_t ttl_secs = 0; ///< 0 = the store's default
  bool operator==(const route_spec&) const = default;
};

/// A whole, validated deployment.
struct deployment {
  std::string schema_version;
  std::vector<module_spec> modules;  ///< sorted by (startup_order, name)
  std::vector<route_spec> routes;    ///< sorted by name
  std::uint32_t store_ttl_secs = 7200;
  nlohmann::json manifest;           ///< the manifest as given, for persistence
  std::string base_dir;              ///< directory relative library paths resolve against

  const module_spec* find(std::string_view module_name) const;
};

}  // namespace canopy
