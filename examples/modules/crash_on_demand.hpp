// crash_on_demand — a module that fails when asked to, to watch supervision
// work (restart policies, backoff, restart budgets, health checks).
//
// Header-only so that the same class builds both as a module library
// (crash_on_demand_plugin.cpp, CANOPY_MODULE) and into the node as
// builtin:crash-on-demand. This header defines no entry point.
//
//   direct method "crash" {"delayMs": N}  throws std::runtime_error from a handler:
//                                         at once (the caller gets 500), or after
//                                         N ms from a timer (the caller gets 200)
//   direct method "hang"  {"seconds": S}  blocks its handler for S seconds (default
//                                         30), so the health check marks it unhealthy
//   input "crash"                         any message crashes the instance
//   any other input                       echoed unchanged on output "echo"
//   settings {"crashOnStart": true}       start() throws: a crash loop
//   settings {"logStartCount": true}      logs and reports how often this node
//                                         process has started the module
#pragma once

#include <canopy/module.hpp>

#include <chrono>
#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <thread>

namespace canopy::examples {

/// Counts the starts of each module name in this process. Deliberately state
/// that outlives a module instance — the point of the demo is to make restarts
/// visible — and so the one piece of process-wide state in the examples.
/// Thread-safe.
inline std::uint64_t count_crash_on_demand_start(const std::string& module_id) {
  static std::mutex mutex;
  static std::map<std::string, std::uint64_t> starts;
  std::lock_guard<std::mutex> lock{mutex};
  return ++starts[module_id];
}

/// Crash-on-demand module. One instance per (re)start; the runtime calls its
/// members one at a time.
class crash_on_demand : public module {
 public:
  /// Longest "hang" accepted, seconds.
  static constexpr double max_hang_secs = 3600;

  /// Reads the flags, then registers "crash" and "hang" (or throws if asked to).
  void start(module_context& ctx, const json& settings) override {
    ctx_ = &ctx;
    const std::uint64_t starts = count_crash_on_demand_start(ctx.module_id());
    if (flag(settings, "logStartCount")) {
      ctx.log().info("start #{} of '{}' in this node process", starts, ctx.module_id());
      ctx.report({{"startCount", starts}});
    }
    if (flag(settings, "crashOnStart"))
      throw std::runtime_error("crash_on_demand: crashOnStart is set (start #" +
                               std::to_string(starts) + ")");

    ctx.on_method("crash", [this](const json& payload) { return crash(payload); });
    ctx.on_method("hang", [this](const json& payload) { return hang(payload); });
  }

  /// Input "crash" throws; anything else is echoed on "echo".
  void on_message(std::string_view input, const message& msg) override {
    if (input == "crash")
      throw std::runtime_error("crash_on_demand: message '" + std::string{msg.message_id()} +
                               "' on input 'crash'");
    ctx_->send("echo", msg);
  }

 private:
  method_result crash(const json& payload) {
    std::int64_t delay_ms = 0;
    if (payload.is_object()) {
      if (auto it = payload.find("delayMs"); it != payload.end()) {
        if (!it->is_number_integer() || it->get<std::int64_t>() < 0)
          return {400, {{"error", "delayMs: expected a non-negative integer, got " + it->dump()}}};
        delay_ms = it->get<std::int64_t>();
      }
    } else if (!payload.is_null()) {
      return {400, {{"error", "payload: expected an object such as {\"delayMs\": 1000}"}}};
    }
    if (delay_ms == 0) {
      ctx_->log().warn("crashing now, as asked by direct method 'crash'");
      throw std::runtime_error("crash_on_demand: direct method 'crash'");
    }
    ctx_->log().warn("crashing in {} ms, as asked by direct method 'crash'", delay_ms);
    ctx_->after(std::chrono::milliseconds{delay_ms}, [delay_ms] {
      throw std::runtime_error("crash_on_demand: direct method 'crash' (after " +
                               std::to_string(delay_ms) + " ms)");
    });
    return {200, {{"crashingInMs", delay_ms}}};
  }

  method_result hang(const json& payload) {
    double secs = 30;
    if (payload.is_object()) {
      if (auto it = payload.find("seconds"); it != payload.end()) {
        if (!it->is_number() || it->get<double>() < 0 || it->get<double>() > max_hang_secs)
          return {400, {{"error", "seconds: expected a number from 0 to 3600, got " + it->dump()}}};
        secs = it->get<double>();
      }
    } else if (!payload.is_null()) {
      return {400, {{"error", "payload: expected an object such as {\"seconds\": 30}"}}};
    }
    ctx_->log().warn("hanging for {} s, as asked by direct method 'hang'", secs);
    // Deliberately blocks this instance's thread: nothing else of this module
    // runs until it returns, which is what the health check notices. The
    // context may be gone by then (the instance was replaced), so it is not
    // touched afterwards.
    std::this_thread::sleep_for(std::chrono::duration<double>{secs});
    return {200, {{"hungSecs", secs}}};
  }

  static bool flag(const json& settings, const char* key) {
    auto it = settings.find(key);
    return it != settings.end() && it->is_boolean() && it->get<bool>();
  }

  module_context* ctx_ = nullptr;
};

}  // namespace canopy::examples
