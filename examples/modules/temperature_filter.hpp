// temperature_filter — Canopy's take on Azure IoT Edge's filter-module
// tutorial: forwards a reading only when the machine is running hot.
//
// Header-only so that the same class builds both as a module library
// (temperature_filter_plugin.cpp, CANOPY_MODULE) and into the node as
// builtin:temperature-filter. This header defines no entry point.
//
// Input "input1": a JSON body with machine.temperature (as sent by
// simulated_temperature_sensor). A reading above the threshold is forwarded on
// "output1" as the very same message (not copied, not re-encoded, nothing
// added); anything else is dropped and counted. A body that is not JSON is
// logged with the byte offset at fault and dropped.
// Desired property "TemperatureThreshold" (default 25) is applied live and
// reported back. Direct method "getStats" returns the counters.
#pragma once

#include <canopy/module.hpp>

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace canopy::examples {

/// What read_machine_temperature() found in a body.
struct temperature_reading {
  std::optional<double> value;  ///< machine.temperature, if the body has one
  std::string error;            ///< why not, otherwise (names the byte or field at fault)
};

/// Reads machine.temperature from a JSON body. Never throws.
inline temperature_reading read_machine_temperature(std::string_view body) {
  json doc;
  try {
    doc = json::parse(body.begin(), body.end());
  } catch (const json::parse_error& e) {
    // e.byte counts the bytes read, including the offending one.
    const std::size_t offset = e.byte > 0 ? e.byte - 1 : 0;
    return {std::nullopt, "body is not valid JSON: error at byte offset " + std::to_string(offset) +
                            " of " + std::to_string(body.size())};
  } catch (const json::exception& e) {
    // e.g. out_of_range 406: a number too large for a double.
    return {std::nullopt, std::string{"body is not usable JSON: "} + e.what()};
  }
  if (!doc.is_object())
    return {std::nullopt, "body is not a JSON object"};
  auto machine = doc.find("machine");
  if (machine == doc.end() || !machine->is_object())
    return {std::nullopt, "body has no object 'machine'"};
  auto temperature = machine->find("temperature");
  if (temperature == machine->end() || !temperature->is_number())
    return {std::nullopt, "body has no number 'machine.temperature'"};
  return {temperature->get<double>(), {}};
}

/// Temperature filter module. One instance per (re)start; the runtime calls
/// its members one at a time.
class temperature_filter : public module {
 public:
  /// The threshold until desired properties say otherwise, °C.
  static constexpr double default_threshold = 25.0;

  /// Registers "getStats".
  void start(module_context& ctx, const json& settings) override {
    (void) settings;
    ctx_ = &ctx;
    ctx.on_method("getStats", [this](const json&) { return method_result{200, stats()}; });
    ctx.log().info("forwarding input1 -> output1 when machine.temperature > {}", threshold_);
  }

  /// Filters input "input1".
  void on_message(std::string_view input, const message& msg) override {
    if (input != "input1") {
      ++dropped_;
      ctx_->log().warn("dropped a message on unknown input '{}' (inputs: input1)", input);
      return;
    }
    auto reading = read_machine_temperature(msg.body());
    if (!reading.value) {
      ++dropped_;
      ++malformed_;
      ctx_->log().warn("dropped message '{}': {}", msg.message_id(), reading.error);
      return;
    }
    if (*reading.value > threshold_) {
      ctx_->send("output1", msg);
      ++forwarded_;
    } else {
      ++dropped_;
    }
  }

  /// Applies "TemperatureThreshold" (a number; null restores the default) and
  /// reports the threshold in force.
  void on_desired_properties(const json& desired, bool complete) override {
    auto it = desired.find("TemperatureThreshold");
    if (it == desired.end() && !complete)
      return;  // a patch about something else
    if (it != desired.end()) {
      if (it->is_number()) {
        threshold_ = it->get<double>();
      } else if (it->is_null()) {
        threshold_ = default_threshold;
      } else {
        ctx_->log().warn("desired TemperatureThreshold: expected a number, got {}; keeping {}",
                         it->dump(), threshold_);
      }
    }
    ctx_->log().info("temperature threshold: {}", threshold_);
    ctx_->report({{"TemperatureThreshold", threshold_}});
  }

  /// The counters, as "getStats" returns them.
  json stats() const {
    return {{"forwarded", forwarded_},
            {"dropped", dropped_},
            {"malformed", malformed_},
            {"TemperatureThreshold", threshold_}};
  }

 private:
  module_context* ctx_ = nullptr;
  double threshold_ = default_threshold;
  std::uint64_t forwarded_ = 0;
  std::uint64_t dropped_ = 0;    // every message not forwarded
  std::uint64_t malformed_ = 0;  // of those, bodies without a readable temperature
};

}  // namespace canopy::examples
