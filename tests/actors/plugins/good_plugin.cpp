// A well-formed module library, for plugin_loader tests: built with the SDK's
// CANOPY_MODULE, so it carries this build's ABI and SDK versions.
// The module echoes every input on output "echo" and answers direct method
// "ping" with {"pong": true}.
#include <canopy/module.hpp>

namespace {

class good_module final : public canopy::module {
 public:
  void start(canopy::module_context& ctx, const canopy::json& settings) override {
    (void) settings;
    ctx_ = &ctx;
    ctx.on_method("ping", [](const canopy::json&) {
      return canopy::method_result{200, {{"pong", true}}};
    });
  }

  void on_message(std::string_view input, const canopy::message& msg) override {
    (void) input;
    ctx_->send("echo", msg);
  }

 private:
  canopy::module_context* ctx_ = nullptr;
};

}  // namespace

CANOPY_MODULE(good_module)
