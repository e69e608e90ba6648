// Loads module types: shared libraries through dlopen() (checking the module ABI
// version they were built with) and compiled-in builtin:NAME modules.
#pragma once

#include "runtime/expected.hpp"

#include <canopy/module.hpp>

#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>

namespace canopy {

/// Destroys a module instance through its library's own destroy function and
/// keeps the library loaded until then.
struct module_deleter {
  void (*destroy)(module*) = nullptr;
  std::shared_ptr<void> library;
  void operator()(module* m) const {
    if (m != nullptr)
      destroy(m);
  }
};

/// A module instance, owned.
using module_ptr = std::unique_ptr<module, module_deleter>;

/// One loadable module type (a library or a builtin). Immutable; shareable.
class module_type {
 public:
  module_type(std::string source, const canopy_module_descriptor* descriptor,
              std::shared_ptr<void> library);

  /// "builtin:NAME" or the library's absolute path.
  const std::string& source() const noexcept { return source_; }

  /// The C++ class name the library declared.
  const char* type_name() const noexcept { return descriptor_->type_name; }

  /// A fresh instance. Never null.
  module_ptr create() const;

 private:
  std::string source_;
  const canopy_module_descriptor* descriptor_;
  std::shared_ptr<void> library_;  ///< dlclose()d when the last user lets go
};

/// The modules compiled into the node, by name (the part after "builtin:").
using builtin_catalog = std::map<std::string, canopy_module_entry_fn, std::less<>>;

/// Loads module types. Thread-safe (the agent and manifest validation share it).
class plugin_loader {
 public:
  explicit plugin_loader(builtin_catalog builtins);

  /// Resolves a manifest `library` value: "builtin:NAME" → "" (if NAME exists),
  /// a path → the absolute path (relative ones against `base_dir`, then against
  /// the search directories). Loads it to check it is a compatible Canopy module.
  expected<std::string> resolve(std::string_view library, const std::string& base_dir);

  /// Loads (or returns the cached) type for a resolved library: `library` as
  /// written, `resolved_path` from resolve() ("" for builtins).
  expected<std::shared_ptr<const module_type>> load(std::string_view library,
                                                    const std::string& resolved_path);

  /// Extra directories searched for relative library paths (e.g. --module-path).
  void add_search_dir(std::string dir);

 private:
  expected<std::shared_ptr<const module_type>> load_file(const std::string& path);

  builtin_catalog builtins_;
  std::mutex mtx_;
  std::vector<std::string> search_dirs_;
  std::map<std::string, std::shared_ptr<const module_type>> loaded_;
};

/// The builtin catalog of this build: the example modules, compiled in.
builtin_catalog make_builtin_catalog();

}  // namespace canopy
