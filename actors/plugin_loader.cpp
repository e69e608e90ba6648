#include "actors/plugin_loader.hpp"

#include <dlfcn.h>

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include <filesystem>

namespace canopy {

namespace fs = std::filesystem;

module_type::module_type(std::string source, const canopy_module_descriptor* descriptor,
                         std::shared_ptr<void> library)
  : source_(std::move(source)), descriptor_(descriptor), library_(std::move(library)) {}

module_ptr module_type::create() const {
  return module_ptr{descriptor_->create(), module_deleter{descriptor_->destroy, library_}};
}

plugin_loader::plugin_loader(builtin_catalog builtins) : builtins_(std::move(builtins)) {}

void plugin_loader::add_search_dir(std::string dir) {
  std::lock_guard<std::mutex> guard{mtx_};
  search_dirs_.push_back(std::move(dir));
}

namespace {

constexpr std::string_view builtin_prefix = "builtin:";

std::string known_builtins(const builtin_catalog& cat) {
  std::string out;
  for (auto& [name, fn] : cat) {
    if (!out.empty())
      out += ", ";
    out += name;
  }
  return out.empty() ? "none" : out;
}

/// Copies the file at `path` into `fd`; false on any error (errno set).
bool copy_to_fd(const std::string& path, int fd) {
  int in = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (in < 0)
    return false;
  char buf[1 << 16];
  for (;;) {
    auto n = ::read(in, buf, sizeof(buf));
    if (n == 0)
      break;
    if (n < 0 || ::write(fd, buf, static_cast<std::size_t>(n)) != n) {
      ::close(in);
      return false;
    }
  }
  ::close(in);
  return true;
}

}  // namespace

expected<std::string> plugin_loader::resolve(std::string_view library, const std::string& base_dir) {
  if (library.empty())
    return make_error(errc::invalid_argument, "library is empty");
  if (library.substr(0, builtin_prefix.size()) == builtin_prefix) {
    auto name = library.substr(builtin_prefix.size());
    if (builtins_.find(name) == builtins_.end())
      return make_error(errc::not_found, "unknown builtin module '" + std::string{name}
                                           + "' (builtins: " + known_builtins(builtins_) + ")");
    return std::string{};
  }
  fs::path p{std::string{library}};
  std::vector<fs::path> candidates;
  if (p.is_absolute()) {
    candidates.push_back(p);
  } else {
    candidates.push_back(fs::path{base_dir.empty() ? "." : base_dir} / p);
    std::lock_guard<std::mutex> guard{mtx_};
    for (auto& d : search_dirs_)
      candidates.push_back(fs::path{d} / p);
  }
  std::error_code ec;
  for (auto& c : candidates) {
    if (fs::exists(c, ec)) {
      auto abs = fs::weakly_canonical(c, ec);
      auto path = (ec ? fs::absolute(c) : abs).string();
      auto t = load_file(path);
      if (!t)
        return std::move(t).err();
      return path;
    }
  }
  std::string tried;
  for (auto& c : candidates)
    tried += (tried.empty() ? "" : ", ") + c.string();
  return make_error(errc::not_found, "module library '" + std::string{library}
                                       + "' not found (looked for " + tried + ")");
}

expected<std::shared_ptr<const module_type>> plugin_loader::load(std::string_view library,
                                                                 const std::string& resolved_path) {
  if (library.substr(0, builtin_prefix.size()) == builtin_prefix) {
    auto name = library.substr(builtin_prefix.size());
    auto i = builtins_.find(name);
    if (i == builtins_.end())
      return make_error(errc::not_found, "unknown builtin module '" + std::string{name} + "'");
    auto* d = i->second();
    return std::make_shared<const module_type>(std::string{library}, d, nullptr);
  }
  if (resolved_path.empty())
    return make_error(errc::invalid_argument, "module library '" + std::string{library}
                                                + "' was not resolved to a path");
  return load_file(resolved_path);
}

expected<std::shared_ptr<const module_type>> plugin_loader::load_file(const std::string& path) {
  std::lock_guard<std::mutex> guard{mtx_};
  // A rebuilt library at the same path must be loaded anew, but dlopen() of a
  // path that is still open returns the old code: key the cache by the file's
  // identity and load a changed file through a private copy.
  std::error_code ec;
  auto stamp = std::to_string(fs::last_write_time(path, ec).time_since_epoch().count()) + ":"
               + std::to_string(fs::file_size(path, ec));
  auto key = path + "@" + stamp;
  if (auto i = loaded_.find(key); i != loaded_.end())
    return i->second;
  bool seen_before = false;
  for (auto& [k, t] : loaded_)
    if (k.compare(0, path.size() + 1, path + "@") == 0)
      seen_before = true;
  std::string open_path = path;
  int copy_fd = -1;
  if (seen_before) {
    // Load the new file through an anonymous in-memory copy: no file name
    // another user could race, and nothing left behind.
    copy_fd = ::memfd_create("canopy-module", MFD_CLOEXEC);
    bool copied = copy_fd >= 0 && copy_to_fd(path, copy_fd);
    if (!copied) {
      if (copy_fd >= 0)
        ::close(copy_fd);
      return make_error(errc::io_error, "cannot load the changed module library " + path
                                          + ": copying it failed: " + std::strerror(errno));
    }
    open_path = "/proc/self/fd/" + std::to_string(copy_fd);
  }
  dlerror();
  void* handle = dlopen(open_path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (copy_fd >= 0)
    ::close(copy_fd);  // the mapping stays valid
  if (handle == nullptr) {
    const char* why = dlerror();
    return make_error(errc::io_error,
                      "cannot load module library " + path + ": " + (why ? why : "dlopen failed"));
  }
  std::shared_ptr<void> lib{handle, [](void* h) { dlclose(h); }};
  auto entry = reinterpret_cast<canopy_module_entry_fn>(dlsym(handle, "canopy_module_entry"));
  if (entry == nullptr)
    return make_error(errc::incompatible,
                      path + ": not a Canopy module: it exports no canopy_module_entry "
                             "(build it with CANOPY_MODULE(YourClass) from <canopy/module.hpp>)");
  auto* d = entry();
  if (d == nullptr)
    return make_error(errc::incompatible, path + ": canopy_module_entry returned no descriptor");
  if (d->abi_version != module_abi_version)
    return make_error(errc::incompatible,
                      path + ": built for module ABI " + std::to_string(d->abi_version) + " (SDK "
                        + (d->sdk_version ? d->sdk_version : "?")
                        + "), but this runtime supports module ABI "
                        + std::to_string(module_abi_version) + " (SDK " + sdk_version
                        + "); rebuild the module against this SDK");
  if (d->create == nullptr || d->destroy == nullptr)
    return make_error(errc::incompatible, path + ": descriptor has no create/destroy function");
  auto t = std::make_shared<const module_type>(path, d, std::move(lib));
  loaded_.emplace(key, t);
  return t;
}

}  // namespace canopy
