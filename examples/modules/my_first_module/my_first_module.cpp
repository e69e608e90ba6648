// my_first_module — the module of examples/README.md ("Your first module in
// ten minutes"): reads the sensor's JSON readings on input "input1", converts
// the temperatures from Celsius to Fahrenheit, tags the message with the
// application property "temperatureScale": "fahrenheit" and sends it on
// "output1". Direct method "getCount" says how many it converted.
//
// Build it out of the Canopy tree with ./build.sh; only the SDK headers
// (actors/include) and libcanopy-sdk.so are needed.
#include <canopy/module.hpp>

#include <cmath>
#include <cstdint>
#include <string>

namespace {

/// °C to °F, rounded to two decimals.
double to_fahrenheit(double celsius) { return std::round((celsius * 9.0 / 5.0 + 32.0) * 100.0) / 100.0; }

/// Converts a "temperature" member from °C to °F, if there is one.
void convert(canopy::json& section) {
  if (!section.is_object())
    return;
  if (auto t = section.find("temperature"); t != section.end() && t->is_number())
    *t = to_fahrenheit(t->get<double>());
}

class my_first_module : public canopy::module {
 public:
  void start(canopy::module_context& ctx, const canopy::json& settings) override {
    (void) settings;
    ctx_ = &ctx;
    ctx.on_method("getCount", [this](const canopy::json&) {
      return canopy::method_result{200, {{"converted", converted_}}};
    });
    ctx.log().info("my first module is running");
  }

  void on_message(std::string_view input, const canopy::message& msg) override {
    if (input != "input1")
      return;
    // allow_exceptions = false: bad JSON gives a "discarded" value, no throw.
    auto body = canopy::json::parse(msg.body().begin(), msg.body().end(), nullptr, false);
    if (!body.is_object()) {
      ctx_->log().warn("dropped message '{}': body is not a JSON object", msg.message_id());
      return;
    }
    for (const char* section : {"machine", "ambient"})
      if (auto it = body.find(section); it != body.end())
        convert(*it);

    // A new message from the old one: from() copies the body and all
    // properties; then set what differs. Its id is derived from the original's,
    // which becomes the correlation id.
    std::string id{msg.message_id()};
    auto out = canopy::message_builder::from(msg)
                 .body(body.dump())
                 .property("temperatureScale", "fahrenheit")
                 .message_id(id.empty() ? id : id + "-F")
                 .correlation_id(id)
                 .connection_module_id(ctx_->module_id())
                 .output_name("output1")
                 .build();
    ctx_->send("output1", std::move(out));
    ++converted_;
  }

 private:
  canopy::module_context* ctx_ = nullptr;
  std::uint64_t converted_ = 0;
};

}  // namespace

CANOPY_MODULE(my_first_module)
