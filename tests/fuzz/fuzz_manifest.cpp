// libFuzzer target: parse_manifest on arbitrary text, with a resolver that
// accepts most libraries and refuses some, and the invariants of a success.
#include "runtime/manifest.hpp"
#include "runtime/route.hpp"

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <string>
#include <string_view>

namespace {

void check(bool ok, const char* what, const std::string& detail) {
  if (!ok) {
    std::fprintf(stderr, "invariant violated: %s: %s\n", what, detail.c_str());
    __builtin_trap();
  }
}

canopy::manifest_options make_options() {
  canopy::manifest_options o;
  o.base_dir = "/srv/deploy";
  o.resolve_library = [](std::string_view library,
                         const std::string& base_dir) -> canopy::expected<std::string> {
    if (library.find("missing") != std::string_view::npos)
      return canopy::make_error(canopy::errc::not_found,
                                "no such library: " + std::string(library));
    if (library.substr(0, 8) == "builtin:")
      return std::string{};
    return canopy::resolve_library_path(library, base_dir);
  };
  return o;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static const canopy::manifest_options opts = make_options();
  std::string_view text(reinterpret_cast<const char*>(data), size);
  auto d = canopy::parse_manifest(text, opts);
  if (!d) {
    check(!d.err().message.empty(), "errors have a message", "");
    return 0;
  }
  for (std::size_t i = 0; i < d->modules.size(); ++i) {
    const auto& m = d->modules[i];
    check(canopy::is_valid_module_name(m.name), "module names are valid", m.name);
    check(m.type == "process" ? !m.process.executable_path.empty() : !m.library.empty(),
          "every actor module has a library, every process module an executable", m.name);
    check(m.limits.backoff_base <= m.limits.backoff_cap, "backoff base <= cap", m.name);
    if (i > 0) {
      const auto& p = d->modules[i - 1];
      bool ordered = p.startup_order < m.startup_order
                     || (p.startup_order == m.startup_order && p.name < m.name);
      check(ordered, "modules sorted by (startup_order, name)", p.name + " / " + m.name);
    }
  }
  for (std::size_t i = 0; i < d->routes.size(); ++i) {
    const auto& r = d->routes[i];
    check(i == 0 || d->routes[i - 1].name < r.name, "routes sorted by name", r.name);
    check(r.priority >= 0 && r.priority <= 9, "priority in range", r.name);
    auto compiled = canopy::route::compile(r.name, r.text);
    check(compiled.ok(), "accepted routes compile", r.text);
    if (!compiled->source_module().empty())
      check(d->find(compiled->source_module()) != nullptr, "route sources are modules", r.text);
    if (compiled->sink().type == canopy::route_sink::kind::module_input)
      check(d->find(compiled->sink().module) != nullptr, "route sinks are modules", r.text);
  }
  check(d->manifest.is_object(), "manifest kept", "");
  return 0;
}
