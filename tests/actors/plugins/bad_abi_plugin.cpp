// A module library built for another module ABI (999, SDK "9.9.9"), for
// plugin_loader tests: the loader must refuse it, naming both versions, and
// never call create().
#include <canopy/module.hpp>

#include <memory>

namespace {

class bad_abi_module final : public canopy::module {
 public:
  void start(canopy::module_context& ctx, const canopy::json& settings) override {
    (void) ctx;
    (void) settings;
  }
};

canopy::module* create_bad_abi_module() {
  return std::make_unique<bad_abi_module>().release();
}

void destroy_bad_abi_module(canopy::module* m) {
  std::unique_ptr<canopy::module> owned{m};
}

}  // namespace

extern "C" __attribute__((visibility("default"))) const canopy_module_descriptor*
canopy_module_entry() {
  static const canopy_module_descriptor descriptor{
    999, "9.9.9", "bad_abi_module", &create_bad_abi_module, &destroy_bad_abi_module};
  return &descriptor;
}
