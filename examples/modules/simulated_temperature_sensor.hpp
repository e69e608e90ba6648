// simulated_temperature_sensor — Canopy's take on Azure IoT Edge's
// SimulatedTemperatureSensor: a machine whose temperature creeps upward, sent
// as JSON telemetry on output "temperatureOutput".
//
// Header-only so that the same class builds both as a module library
// (simulated_temperature_sensor_plugin.cpp, CANOPY_MODULE) and into the node as
// builtin:simulated-temperature-sensor. This header defines no entry point.
//
// Configuration (manifest `settings` win over `env`):
//   sendIntervalMs  / env SendInterval (seconds)   default 5 s
//   messageCount    / env MessageCount (0 = unlimited) default 0
//   sensorId        (application property "sensorID") default: the module's name
//   seed            (unsigned integer: repeatable readings) default: random
// Desired properties (as Azure's sensor): "SendInterval" (seconds) and
// "SendData" (false pauses sending), applied live.
// Input "control": {"command": "reset"} resets the machine temperature; so does
// direct method "reset".
#pragma once

#include <canopy/module.hpp>

#include <algorithm>
#include <array>
#include <cctype>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <ctime>
#include <optional>
#include <random>
#include <string>
#include <string_view>
#include <system_error>

namespace canopy::examples {

/// The simulation's constants (Azure's SimulatorParameters).
struct sensor_parameters {
  double machine_temp_min = 21.0;     ///< machine temperature at start and after a reset, °C
  double machine_temp_max = 100.0;    ///< above this the temperature only wanders, °C
  double machine_pressure_min = 1.0;  ///< pressure at machine_temp_min
  double machine_pressure_max = 10.0; ///< pressure at machine_temp_max
  double ambient_temp = 21.0;         ///< ambient temperature, °C (±0.5 noise)
  int humidity_min = 24;              ///< ambient humidity range, % (inclusive)
  int humidity_max = 26;              ///< (inclusive)
};

/// One reading of the simulated machine and its surroundings.
struct sensor_reading {
  double machine_temperature = 0;  ///< °C
  double machine_pressure = 0;     ///< bar
  double ambient_temperature = 0;  ///< °C
  int ambient_humidity = 0;        ///< %
};

/// Simulated temperature sensor module. One instance per (re)start; the
/// runtime calls its members one at a time.
class simulated_temperature_sensor : public module {
 public:
  /// The output every reading is sent on.
  static constexpr std::string_view output_name = "temperatureOutput";

  /// Default interval between readings.
  static constexpr std::chrono::milliseconds default_interval{5000};

  /// Reported properties are refreshed every this many messages.
  static constexpr std::uint64_t report_every = 10;

  /// Reads settings/env, registers "reset", starts the send timer.
  void start(module_context& ctx, const json& settings) override {
    ctx_ = &ctx;
    sensor_id_ = ctx.module_id();
    if (auto it = settings.find("sensorId"); it != settings.end()) {
      if (it->is_string())
        sensor_id_ = it->get<std::string>();
      else
        warn_setting("sensorId", *it, "a string");
    }

    interval_ = default_interval;
    if (auto it = settings.find("sendIntervalMs"); it != settings.end()) {
      if (auto ms = positive_integer(*it))
        interval_ = std::chrono::milliseconds{*ms};
      else
        warn_setting("sendIntervalMs", *it, "a positive integer");
    } else if (auto text = ctx.env("SendInterval")) {
      if (auto secs = parse_number(*text); secs && *secs > 0 && *secs < 1e9)
        interval_ = std::chrono::milliseconds{static_cast<std::int64_t>(std::llround(*secs * 1000))};
      else
        ctx.log().warn("env SendInterval: '{}' is not a positive number of seconds; using {} ms",
                       *text, interval_.count());
    }
    interval_ = std::max(interval_, std::chrono::milliseconds{1});

    if (auto it = settings.find("messageCount"); it != settings.end()) {
      if (auto n = non_negative_integer(*it))
        message_count_ = *n;
      else
        warn_setting("messageCount", *it, "a non-negative integer (0 = unlimited)");
    } else if (auto text = ctx.env("MessageCount")) {
      std::uint64_t n = 0;
      auto [end, ec] = std::from_chars(text->data(), text->data() + text->size(), n);
      if (ec == std::errc{} && end == text->data() + text->size())
        message_count_ = n;
      else
        ctx.log().warn("env MessageCount: '{}' is not a non-negative integer; sending without limit",
                       *text);
    }

    if (auto it = settings.find("seed"); it != settings.end()) {
      if (auto seed = non_negative_integer(*it))
        rng_.seed(*seed);
      else
        warn_setting("seed", *it, "a non-negative integer");
    } else {
      rng_.seed(std::random_device{}());
    }
    id_rng_.seed((std::uint64_t{std::random_device{}()} << 32) ^ std::random_device{}());
    temperature_ = params_.machine_temp_min;

    ctx.on_method("reset", [this](const json&) {
      reset();
      return method_result{200, {{"reset", true}, {"machineTemperature", temperature_}}};
    });

    ctx.log().info("sending on '{}' every {} ms{}", output_name, interval_.count(),
                   message_count_ ? ", " + std::to_string(message_count_) + " messages" : "");
    report_state();
    schedule();
  }

  /// Input "control": {"command": "reset"}. Other inputs are ignored.
  void on_message(std::string_view input, const message& msg) override {
    if (input != "control") {
      ctx_->log().warn("ignoring a message on unknown input '{}' (inputs: control)", input);
      return;
    }
    json body = json::parse(msg.body().begin(), msg.body().end(), nullptr, false);
    auto command = body.is_object() ? body.find("command") : body.end();
    if (!body.is_object() || command == body.end() || !command->is_string()) {
      ctx_->log().warn("control message ignored: expected a JSON body {}",
                       R"({"command": "reset"})");
      return;
    }
    std::string text = command->get<std::string>();
    std::transform(text.begin(), text.end(), text.begin(),
                   [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
    if (text == "reset")
      reset();
    else
      ctx_->log().warn("control message ignored: unknown command '{}' (commands: reset)", text);
  }

  /// Desired "SendInterval" (seconds) and "SendData" (bool), as Azure's sensor.
  void on_desired_properties(const json& desired, bool complete) override {
    (void) complete;
    bool changed = false;
    if (auto it = desired.find("SendInterval"); it != desired.end() && !it->is_null()) {
      if (it->is_number() && it->get<double>() > 0 && it->get<double>() < 1e9) {
        interval_ = std::max(std::chrono::milliseconds{std::llround(it->get<double>() * 1000)},
                             std::chrono::milliseconds{1});
        changed = true;
      } else {
        ctx_->log().warn("desired SendInterval: expected a positive number of seconds, got {}",
                         it->dump());
      }
    }
    if (auto it = desired.find("SendData"); it != desired.end() && !it->is_null()) {
      if (it->is_boolean()) {
        send_data_ = it->get<bool>();
        changed = true;
      } else {
        ctx_->log().warn("desired SendData: expected true or false, got {}", it->dump());
      }
    }
    if (changed) {
      ctx_->log().info("desired properties: interval {} ms, sending {}", interval_.count(),
                       send_data_ ? "on" : "paused");
      schedule();
      report_state();
    }
  }

  /// Advances the simulation by one step (exposed for tests and demos).
  sensor_reading next_reading() {
    std::uniform_real_distribution<double> unit{0.0, 1.0};
    if (temperature_ > params_.machine_temp_max)
      temperature_ += unit(rng_) - 0.5;           // wanders by [-0.5, 0.5)
    else
      temperature_ += -0.25 + unit(rng_) * 1.5;   // [-0.25, 1.25): on average +0.5
    const double slope = (params_.machine_pressure_max - params_.machine_pressure_min) /
                         (params_.machine_temp_max - params_.machine_temp_min);
    std::uniform_int_distribution<int> humidity{params_.humidity_min, params_.humidity_max};
    sensor_reading r;
    r.machine_temperature = temperature_;
    r.machine_pressure =
      params_.machine_pressure_min + (temperature_ - params_.machine_temp_min) * slope;
    r.ambient_temperature = params_.ambient_temp + unit(rng_) - 0.5;
    r.ambient_humidity = humidity(rng_);
    return r;
  }

  /// The JSON body of a reading, in Azure's shape.
  static std::string body_of(const sensor_reading& r, std::int64_t created_ms) {
    nlohmann::ordered_json body;
    body["machine"]["temperature"] = round2(r.machine_temperature);
    body["machine"]["pressure"] = round2(r.machine_pressure);
    body["ambient"]["temperature"] = round2(r.ambient_temperature);
    body["ambient"]["humidity"] = r.ambient_humidity;
    body["timeCreated"] = iso8601_utc(created_ms);
    return body.dump();
  }

  /// `ms` since the Unix epoch as ISO-8601 UTC with milliseconds
  /// ("2024-05-01T12:00:00.250Z").
  static std::string iso8601_utc(std::int64_t ms) {
    std::int64_t secs = ms / 1000;
    std::int64_t frac = ms % 1000;
    if (frac < 0) {
      frac += 1000;
      secs -= 1;
    }
    std::time_t t = static_cast<std::time_t>(secs);
    std::tm tm{};
    gmtime_r(&t, &tm);
    std::array<char, 80> buf{};  // room for any int fields (keeps -Wformat-truncation quiet)
    std::snprintf(buf.data(), buf.size(), "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900,
                  tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
                  static_cast<int>(frac));
    return buf.data();
  }

 private:
  void schedule() {
    if (timer_) {
      ctx_->cancel_timer(*timer_);
      timer_.reset();
    }
    if (send_data_ && !done())
      timer_ = ctx_->every(interval_, [this] { send_reading(); });
  }

  bool done() const { return message_count_ != 0 && sent_ >= message_count_; }

  void send_reading() {
    if (done())
      return;
    const std::int64_t now_ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                                  std::chrono::system_clock::now().time_since_epoch())
                                  .count();
    const std::string seq = std::to_string(sent_ + 1);
    auto msg = message_builder{}
                 .body(body_of(next_reading(), now_ms))
                 .content_type("application/json")
                 .content_encoding("utf-8")
                 .message_id(new_message_id())
                 .creation_time_utc_ms(now_ms)
                 .connection_device_id(ctx_->device_id())
                 .connection_module_id(ctx_->module_id())
                 .output_name(output_name)
                 .property("sensorID", sensor_id_)
                 .property("sequenceNumber", seq)
                 .build();
    ctx_->send(output_name, std::move(msg));
    ++sent_;
    if (done()) {
      ctx_->log().info("done sending {} messages; no more will be sent", sent_);
      schedule();  // cancels the timer
      report_state();
    } else if (sent_ % report_every == 0) {
      report_state();
    }
  }

  void reset() {
    ctx_->log().info("reset: machine temperature {:.2f} -> {:.2f}", temperature_,
                     params_.machine_temp_min);
    temperature_ = params_.machine_temp_min;
  }

  void report_state() {
    ctx_->report({{"sendIntervalMs", interval_.count()}, {"messagesSent", sent_}});
  }

  std::string new_message_id() {
    // A random (version 4) UUID.
    std::uniform_int_distribution<std::uint64_t> bits;
    std::uint64_t hi = bits(id_rng_), lo = bits(id_rng_);
    hi = (hi & ~std::uint64_t{0xF000}) | 0x4000;
    lo = (lo & ~(std::uint64_t{0xC} << 60)) | (std::uint64_t{0x8} << 60);
    std::array<char, 40> buf{};
    std::snprintf(buf.data(), buf.size(), "%08x-%04x-%04x-%04x-%012llx",
                  static_cast<unsigned>(hi >> 32), static_cast<unsigned>((hi >> 16) & 0xFFFF),
                  static_cast<unsigned>(hi & 0xFFFF), static_cast<unsigned>(lo >> 48),
                  static_cast<unsigned long long>(lo & 0xFFFFFFFFFFFFull));
    return buf.data();
  }

  void warn_setting(std::string_view key, const json& value, std::string_view expected) {
    ctx_->log().warn("settings.{}: expected {}, got {}; using the default", key, expected,
                     value.dump());
  }

  static double round2(double v) { return std::round(v * 100.0) / 100.0; }

  static std::optional<std::uint64_t> non_negative_integer(const json& v) {
    if (v.is_number_unsigned())
      return v.get<std::uint64_t>();
    if (v.is_number_integer() && v.get<std::int64_t>() >= 0)
      return static_cast<std::uint64_t>(v.get<std::int64_t>());
    return std::nullopt;
  }

  static std::optional<std::int64_t> positive_integer(const json& v) {
    auto n = non_negative_integer(v);
    if (!n || *n == 0 || *n > std::uint64_t{1} << 40)
      return std::nullopt;
    return static_cast<std::int64_t>(*n);
  }

  static std::optional<double> parse_number(std::string_view text) {
    double v = 0;
    auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
    if (ec != std::errc{} || end != text.data() + text.size() || !std::isfinite(v))
      return std::nullopt;
    return v;
  }

  module_context* ctx_ = nullptr;
  sensor_parameters params_;
  std::string sensor_id_;
  std::chrono::milliseconds interval_ = default_interval;
  std::uint64_t message_count_ = 0;  // 0 = unlimited
  std::uint64_t sent_ = 0;
  bool send_data_ = true;
  double temperature_ = 21.0;
  std::optional<timer_handle> timer_;
  std::mt19937_64 rng_;     // the simulation (seedable)
  std::mt19937_64 id_rng_;  // message ids (never seeded from settings)
};

}  // namespace canopy::examples
