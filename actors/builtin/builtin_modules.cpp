// The builtin:NAME modules of this build: the example modules, compiled in, so a
// manifest can name them without a library path.
#include "actors/plugin_loader.hpp"

#include "crash_on_demand.hpp"
#include "simulated_temperature_sensor.hpp"
#include "temperature_filter.hpp"

namespace canopy {

namespace {

template <class Module>
const canopy_module_descriptor* builtin_descriptor() {
  static const canopy_module_descriptor descriptor{
    module_abi_version, sdk_version, "builtin",
    []() -> module* { return new Module(); },
    [](module* m) { delete m; }};
  return &descriptor;
}

}  // namespace

builtin_catalog make_builtin_catalog() {
  return builtin_catalog{
    {"simulated-temperature-sensor", &builtin_descriptor<examples::simulated_temperature_sensor>},
    {"temperature-filter", &builtin_descriptor<examples::temperature_filter>},
    {"crash-on-demand", &builtin_descriptor<examples::crash_on_demand>},
  };
}

}  // namespace canopy
