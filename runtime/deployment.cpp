#include "runtime/deployment.hpp"

namespace canopy {

bool parse_restart_policy(std::string_view text, restart_policy& out) {
  if (text == "never")
    out = restart_policy::never;
  else if (text == "on-failure")
    out = restart_policy::on_failure;
  else if (text == "on-unhealthy")
    out = restart_policy::on_unhealthy;
  else if (text == "always")
    out = restart_policy::always;
  else
    return false;
  return true;
}

const char* to_string(restart_policy p) noexcept {
  switch (p) {
    case restart_policy::never: return "never";
    case restart_policy::on_failure: return "on-failure";
    case restart_policy::on_unhealthy: return "on-unhealthy";
    case restart_policy::always: return "always";
  }
  return "?";
}

bool module_spec::needs_restart_for(const module_spec& o) const {
  return name != o.name || type != o.type || library != o.library
         || library_path != o.library_path || settings != o.settings || env != o.env
         || status != o.status || restart != o.restart || startup_order != o.startup_order
         || version != o.version || !(limits == o.limits) || !(health == o.health)
         || !(process == o.process);
}

const module_spec* deployment::find(std::string_view module_name) const {
  for (auto& m : modules)
    if (m.name == module_name)
      return &m;
  return nullptr;
}

}  // namespace canopy
