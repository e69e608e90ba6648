// The Canopy module SDK: write a module as a C++ class, build it as a shared
// library with CANOPY_MODULE(YourClass), name it in a deployment manifest.
//
//   class my_module : public canopy::module {
//    public:
//     void start(canopy::module_context& ctx, const canopy::json& settings) override {
//       ctx_ = &ctx;
//       ctx.every(std::chrono::seconds{1}, [this] { ctx_->send("out", ...); });
//     }
//     void on_message(std::string_view input, const canopy::message& m) override { ... }
//    private:
//     canopy::module_context* ctx_ = nullptr;
//   };
//   CANOPY_MODULE(my_module)
//
// Threading: the runtime calls a module's members one at a time, never
// concurrently (each module instance is one actor). A handler that throws
// crashes the instance; its supervisor restarts a fresh one per the module's
// restartPolicy. A handler that never returns cannot be pre-empted: the health
// check marks the module unhealthy and a fresh instance takes its place, but the
// stuck thread stays stuck — use a process module where isolation matters.
#pragma once

#include <canopy/message.hpp>

#include <nlohmann/json.hpp>
#include <spdlog/logger.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>

namespace canopy {

/// JSON values in the SDK (settings, twins, method payloads).
using json = nlohmann::json;

/// The module ABI this SDK builds. The runtime refuses a library built for
/// another one, naming both versions.
inline constexpr std::uint32_t module_abi_version = 1;

/// The SDK's version string, recorded in every module library.
inline constexpr const char* sdk_version = "0.1.0";

/// What a direct method returns: an HTTP-like status and a JSON payload.
struct method_result {
  int status = 200;
  json payload = json::object();
};

/// A direct-method handler: payload in, result out. May throw (the instance
/// crashes and the caller gets status 500).
using method_handler = std::function<method_result(const json& payload)>;

/// Identifies a timer for cancel_timer().
using timer_handle = std::uint64_t;

/// The runtime, as a module sees it. Owned by the runtime; valid from start()
/// until stop() returns. Call it only from within the module's own callbacks.
class module_context {
 public:
  virtual ~module_context() = default;

  /// This module's name in the deployment (e.g. "filter").
  virtual const std::string& module_id() const = 0;

  /// The node's device id.
  virtual const std::string& device_id() const = 0;

  /// A variable from the manifest's `env` for this module, or nullopt.
  virtual std::optional<std::string> env(std::string_view name) const = 0;

  /// Sends `msg` on output `output`; the node's routes decide where it goes.
  /// The message is not copied or re-encoded.
  virtual void send(std::string_view output, message msg) = 0;

  /// Patches this module's reported properties (merged as JSON merge-patch).
  virtual void report(const json& patch) = 0;

  /// Registers (or replaces) the handler of direct method `name`.
  virtual void on_method(std::string name, method_handler handler) = 0;

  /// Calls `fn` every `interval` until cancelled or the module stops.
  virtual timer_handle every(std::chrono::milliseconds interval, std::function<void()> fn) = 0;

  /// Calls `fn` once after `delay`.
  virtual timer_handle after(std::chrono::milliseconds delay, std::function<void()> fn) = 0;

  /// Cancels a timer; no effect if it already fired or was cancelled.
  virtual void cancel_timer(timer_handle handle) = 0;

  /// This module's logger (named after the module; level from the node's config).
  virtual spdlog::logger& log() = 0;

  /// Ends this instance normally (exit code 0): with restartPolicy `on-failure`
  /// or `never` it stays stopped; with `always` it is started again.
  virtual void finish() = 0;
};

/// Base class of a module. The runtime creates one instance per (re)start.
class module {
 public:
  virtual ~module() = default;

  /// Called once, first. `settings` is the module's `settings` object from the
  /// manifest. Throwing here counts as a crash.
  virtual void start(module_context& ctx, const json& settings) = 0;

  /// Called once, last, on an orderly stop (not after a crash).
  virtual void stop() {}

  /// A message arrived on input `input`.
  virtual void on_message(std::string_view input, const message& msg) {
    (void) input;
    (void) msg;
  }

  /// Desired properties: the whole document right after start() (complete =
  /// true), then each patch as it is deployed (complete = false).
  virtual void on_desired_properties(const json& desired, bool complete) {
    (void) desired;
    (void) complete;
  }
};

}  // namespace canopy

extern "C" {

/// What a module library exports, through its one C entry point
/// `canopy_module_entry` (see CANOPY_MODULE).
struct canopy_module_descriptor {
  std::uint32_t abi_version;  ///< canopy::module_abi_version the library was built with
  const char* sdk_version;    ///< canopy::sdk_version the library was built with
  const char* type_name;      ///< the C++ class, for logs
  canopy::module* (*create)();
  void (*destroy)(canopy::module*);
};

/// Signature of the entry point.
typedef const canopy_module_descriptor* (*canopy_module_entry_fn)();
}

/// Exports `Type` (a canopy::module with a default constructor) as this
/// library's module. Use exactly once per shared library.
#define CANOPY_MODULE(Type)                                                         \
  extern "C" __attribute__((visibility("default"))) const canopy_module_descriptor* \
  canopy_module_entry() {                                                           \
    static const canopy_module_descriptor descriptor{                               \
      ::canopy::module_abi_version, ::canopy::sdk_version, #Type,                   \
      []() -> ::canopy::module* { return new Type(); },                             \
      [](::canopy::module* m) { delete m; }};                                       \
    return &descriptor;                                                             \
  }
