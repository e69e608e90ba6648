#include "runtime/manifest.hpp"

#include "runtime/route.hpp"

#include <nlohmann/json.hpp>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <initializer_list>
#include <optional>
#include <set>
#include <vector>

namespace canopy {

namespace {

using json = nlohmann::json;

constexpr std::size_t max_reported_problems = 100;

const char* type_name(const json& j) noexcept {
  switch (j.type()) {
    case json::value_t::null: return "null";
    case json::value_t::boolean: return "a boolean";
    case json::value_t::number_integer:
    case json::value_t::number_unsigned: return "an integer";
    case json::value_t::number_float: return "a number";
    case json::value_t::string: return "a string";
    case json::value_t::array: return "an array";
    case json::value_t::object: return "an object";
    default: return "an unknown value";
  }
}

// A scalar as it appears in JSON, shortened for messages. Never throws on
// invalid UTF-8 (replaced).
std::string show(const json& j) {
  std::string s = j.dump(-1, ' ', false, json::error_handler_t::replace);
  if (s.size() > 80)
    s = s.substr(0, 77) + "...";
  return s;
}

std::string quote(std::string_view s) {
  return show(json(std::string(s)));
}

char lower(char c) noexcept {
  return (c >= 'A' && c <= 'Z') ? static_cast<char>(c - 'A' + 'a') : c;
}

// Optimal string alignment distance (edits and adjacent swaps), ASCII
// case-insensitive. Callers bound the lengths.
std::size_t edit_distance(std::string_view a, std::string_view b) {
  std::vector<std::vector<std::size_t>> d(a.size() + 1, std::vector<std::size_t>(b.size() + 1));
  for (std::size_t i = 0; i <= a.size(); ++i)
    d[i][0] = i;
  for (std::size_t j = 0; j <= b.size(); ++j)
    d[0][j] = j;
  for (std::size_t i = 1; i <= a.size(); ++i) {
    for (std::size_t j = 1; j <= b.size(); ++j) {
      std::size_t cost = lower(a[i - 1]) == lower(b[j - 1]) ? 0 : 1;
      d[i][j] = std::min({d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + cost});
      if (i > 1 && j > 1 && lower(a[i - 1]) == lower(b[j - 2])
          && lower(a[i - 2]) == lower(b[j - 1]))
        d[i][j] = std::min(d[i][j], d[i - 2][j - 2] + 1);
    }
  }
  return d[a.size()][b.size()];
}

// The known key `key` looks like a misspelling of, if any.
std::optional<std::string_view> near_miss(std::string_view key,
                                          std::initializer_list<std::string_view> known) {
  for (auto k : known)
    if (key == k)
      return std::nullopt;
  if (key.size() > 64)
    return std::nullopt;
  for (auto k : known) {
    std::size_t longer = std::max(key.size(), k.size());
    std::size_t shorter = std::min(key.size(), k.size());
    std::size_t allowed = k.size() <= 4 ? 1 : 2;
    if (longer - shorter > allowed)
      continue;
    if (edit_distance(key, k) <= allowed)
      return k;
  }
  return std::nullopt;
}

bool is_env_name(std::string_view s) noexcept {
  if (s.empty() || (s[0] >= '0' && s[0] <= '9'))
    return false;
  return std::all_of(s.begin(), s.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_';
  });
}

bool is_schema_version(std::string_view s) noexcept {
  if (s.size() < 3 || s.substr(0, 2) != "1.")
    return false;
  return std::all_of(s.begin() + 2, s.end(), [](char c) { return c >= '0' && c <= '9'; });
}


struct problem {
  errc code;
  std::string text;
};

// A route as compiled during validation, for the module checks.
struct checked_route {
  std::string path;  // JSON path of the route text
  route compiled;
};

// Walks the manifest, collecting every problem.
class validator {
 public:
  explicit validator(const manifest_options& opts) : opts_(opts) {}

  void run(const json& root, deployment& out);

  std::vector<problem> problems;

 private:
  void fail(const std::string& path, std::string what, errc code = errc::invalid_argument) {
    problems.push_back({code, path + ": " + what});
  }

  static const json* member(const json& obj, std::string_view key) {
    auto it = obj.find(key);
    return it == obj.end() ? nullptr : &*it;
  }

  const json* require(const json& obj, const std::string& obj_path, std::string_view key) {
    const json* j = member(obj, key);
    if (!j)
      fail(json_path_key(obj_path, key), "required key is missing");
    return j;
  }

  bool expect_object(const json& j, const std::string& path) {
    if (j.is_object())
      return true;
    fail(path, std::string("expected an object, found ") + type_name(j));
    return false;
  }

  std::optional<std::string> get_string(const json& j, const std::string& path) {
    if (j.is_string())
      return j.get<std::string>();
    fail(path, std::string("expected a string, found ") + type_name(j));
    return std::nullopt;
  }

  std::optional<std::uint64_t> get_uint(const json& j, const std::string& path, std::uint64_t lo,
                                        std::uint64_t hi) {
    auto range = [&] {
      return " is out of range " + std::to_string(lo) + ".." + std::to_string(hi);
    };
    if (j.is_number_unsigned()) {
      auto v = j.get<std::uint64_t>();
      if (v < lo || v > hi) {
        fail(path, std::to_string(v) + range());
        return std::nullopt;
      }
      return v;
    }
    if (j.is_number_integer()) {  // negative
      fail(path, std::to_string(j.get<std::int64_t>()) + range());
      return std::nullopt;
    }
    if (j.is_number_float()) {
      double d = j.get<double>();
      if (std::isfinite(d) && d == std::floor(d) && d >= static_cast<double>(lo)
          && d <= static_cast<double>(hi))
        return static_cast<std::uint64_t>(d);
      fail(path, std::isfinite(d) && d == std::floor(d) ? show(j) + range()
                                                        : "expected an integer, found " + show(j));
      return std::nullopt;
    }
    fail(path, std::string("expected an integer, found ") + type_name(j));
    return std::nullopt;
  }

  std::optional<std::string> get_enum(const json& j, const std::string& path,
                                      std::initializer_list<std::string_view> allowed) {
    auto s = get_string(j, path);
    if (!s)
      return std::nullopt;
    for (auto a : allowed)
      if (*s == a)
        return s;
    std::string list;
    for (auto a : allowed)
      list += (list.empty() ? "" : ", ") + std::string(a);
    fail(path, quote(*s) + " is not one of " + list);
    return std::nullopt;
  }

  // Flags keys that look like a misspelt known key; other unknown keys pass.
  void check_keys(const json& obj, const std::string& path,
                  std::initializer_list<std::string_view> known) {
    for (const auto& [key, val] : obj.items()) {
      (void) val;
      if (auto k = near_miss(key, known))
        fail(json_path_key(path, key), "unknown key; did you mean " + quote(*k) + "?");
    }
  }

  void parse_agent(const json& d, const std::string& path, deployment& out);
  void parse_restart(const json& r, const std::string& path, restart_settings& s);
  module_spec parse_module(const std::string& name, const json& spec, const std::string& path,
                           const restart_settings& node_limits);
  void parse_process(const json& set, const std::string& path, process_settings& p);
  std::optional<std::string> resolve_process_path(const json& j, const std::string& path,
                                                  bool directory);
  void parse_hub(const json& d, const std::string& path, deployment& out);

  const manifest_options& opts_;
  bool modules_known_ = false;
  std::set<std::string, std::less<>> module_names_;
  std::string modules_path_;
  std::vector<checked_route> routes_;
};

void validator::run(const json& root, deployment& out) {
  const std::string top = "$";
  if (!expect_object(root, top))
    return;
  check_keys(root, top, {"modulesContent"});
  const json* mc = require(root, top, "modulesContent");
  std::string mc_path = json_path_key(top, "modulesContent");
  if (!mc || !expect_object(*mc, mc_path))
    return;

  std::string agent_path = json_path_key(mc_path, "$edgeAgent");
  if (const json* agent = require(*mc, mc_path, "$edgeAgent");
      agent && expect_object(*agent, agent_path)) {
    check_keys(*agent, agent_path, {"properties.desired"});
    std::string d_path = json_path_key(agent_path, "properties.desired");
    if (const json* d = require(*agent, agent_path, "properties.desired");
        d && expect_object(*d, d_path))
      parse_agent(*d, d_path, out);
  }

  std::string hub_path = json_path_key(mc_path, "$edgeHub");
  if (const json* hub = member(*mc, "$edgeHub"); hub && expect_object(*hub, hub_path)) {
    check_keys(*hub, hub_path, {"properties.desired"});
    std::string d_path = json_path_key(hub_path, "properties.desired");
    if (const json* d = require(*hub, hub_path, "properties.desired");
        d && expect_object(*d, d_path))
      parse_hub(*d, d_path, out);
  }

  // Routes may name only modules of this deployment.
  if (modules_known_) {
    for (const auto& r : routes_) {
      const route& c = r.compiled;
      if (!c.source_module().empty() && !module_names_.count(c.source_module()))
        fail(r.path, "route '" + c.name() + "' reads from module '" + c.source_module()
                       + "', which is not in the deployment");
      if (c.sink().type == route_sink::kind::module_input && !module_names_.count(c.sink().module))
        fail(r.path, "route '" + c.name() + "' delivers to module '" + c.sink().module
                       + "', which is not in the deployment");
    }
  }

  // Desired properties of the modules.
  for (const auto& [key, val] : mc->items()) {
    if (key == "$edgeAgent" || key == "$edgeHub")
      continue;
    std::string path = json_path_key(mc_path, key);
    if (!key.empty() && key[0] == '$') {
      if (auto k = near_miss(key, {"$edgeAgent", "$edgeHub"}))
        fail(path, "unknown key; did you mean " + quote(*k) + "?");
      else
        fail(path, "unknown system module (expected $edgeAgent or $edgeHub)");
      continue;
    }
    if (!expect_object(val, path))
      continue;
    check_keys(val, path, {"properties.desired"});
    std::string d_path = json_path_key(path, "properties.desired");
    const json* d = require(val, path, "properties.desired");
    if (!d || !expect_object(*d, d_path) || !modules_known_)
      continue;
    const std::string& name = key;  // clang 14 cannot capture structured bindings
    auto it = std::find_if(out.modules.begin(), out.modules.end(),
                           [&](const module_spec& m) { return m.name == name; });
    if (it == out.modules.end()) {
      fail(path,
           "desired properties for module " + quote(key) + ", which is not in " + modules_path_);
      continue;
    }
    it->desired_properties = *d;
  }
}

void validator::parse_agent(const json& d, const std::string& path, deployment& out) {
  check_keys(d, path, {"schemaVersion", "runtime", "systemModules", "modules"});
  std::string sv_path = json_path_key(path, "schemaVersion");
  if (const json* sv = require(d, path, "schemaVersion")) {
    if (auto s = get_string(*sv, sv_path)) {
      if (is_schema_version(*s))
        out.schema_version = *s;
      else
        fail(sv_path,
             quote(*s) + " is not a supported schema version (expected 1.x, e.g. \"1.1\")");
    }
  }

  restart_settings node_limits;
  std::string rt_path = json_path_key(path, "runtime");
  if (const json* rt = member(d, "runtime"); rt && expect_object(*rt, rt_path)) {
    check_keys(*rt, rt_path, {"type", "settings"});
    std::string set_path = json_path_key(rt_path, "settings");
    if (const json* set = member(*rt, "settings"); set && expect_object(*set, set_path)) {
      check_keys(*set, set_path,
                 {"restart", "minDockerVersion", "loggingOptions", "registryCredentials"});
      if (const json* r = member(*set, "restart"))
        parse_restart(*r, json_path_key(set_path, "restart"), node_limits);
    }
  }

  modules_path_ = json_path_key(path, "modules");
  const json* mods = require(d, path, "modules");
  if (!mods || !expect_object(*mods, modules_path_))
    return;
  modules_known_ = true;
  for (const auto& [name, spec] : mods->items()) {
    module_names_.insert(name);
    out.modules.push_back(
      parse_module(name, spec, json_path_key(modules_path_, name), node_limits));
  }
  std::stable_sort(out.modules.begin(), out.modules.end(),
                   [](const module_spec& a, const module_spec& b) {
                     if (a.startup_order != b.startup_order)
                       return a.startup_order < b.startup_order;
                     return a.name < b.name;
                   });
}

void validator::parse_restart(const json& r, const std::string& path, restart_settings& s) {
  if (!expect_object(r, path))
    return;
  check_keys(
    r, path,
    {"maxRestarts", "withinSecs", "backoffBaseMs", "backoffCapSecs", "stablePeriodSecs", "jitter"});
  constexpr std::uint64_t int_max = 2147483647;
  auto field = [&](std::string_view key, std::uint64_t lo, auto apply) {
    if (const json* j = member(r, key))
      if (auto v = get_uint(*j, json_path_key(path, key), lo, int_max))
        apply(*v);
  };
  using std::chrono::milliseconds;
  using std::chrono::seconds;
  field("maxRestarts", 0, [&](std::uint64_t v) { s.max_restarts = static_cast<int>(v); });
  field("withinSecs", 1, [&](std::uint64_t v) { s.within = seconds{v}; });
  field("backoffBaseMs", 0, [&](std::uint64_t v) { s.backoff_base = milliseconds{v}; });
  field("backoffCapSecs", 0, [&](std::uint64_t v) { s.backoff_cap = seconds{v}; });
  field("stablePeriodSecs", 0, [&](std::uint64_t v) { s.stable_period = seconds{v}; });
  if (const json* j = member(r, "jitter")) {
    std::string jp = json_path_key(path, "jitter");
    if (!j->is_number())
      fail(jp, std::string("expected a number, found ") + type_name(*j));
    else if (double v = j->get<double>(); !(v >= 0 && v <= 1))
      fail(jp, show(*j) + " is out of range 0..1");
    else
      s.jitter = v;
  }
  if (s.backoff_cap < s.backoff_base)
    fail(path, "backoffCapSecs (" + std::to_string(s.backoff_cap.count() / 1000)
                 + " s) is less than backoffBaseMs (" + std::to_string(s.backoff_base.count())
                 + " ms)");
}

module_spec validator::parse_module(const std::string& name, const json& spec,
                                    const std::string& path, const restart_settings& node_limits) {
  module_spec m;
  m.name = name;
  m.limits = node_limits;
  if (!name.empty() && name[0] == '$')
    fail(path, "module names must not start with '$'");
  else if (!is_valid_module_name(name))
    fail(path, "invalid module name (use 1 to 64 of A-Z a-z 0-9 _ . -)");
  if (!expect_object(spec, path))
    return m;
  check_keys(spec, path,
             {"version", "type", "status", "restartPolicy", "startupOrder", "settings", "env",
              "restart", "healthCheck", "imagePullPolicy"});
  auto key_path = [&](std::string_view key) { return json_path_key(path, key); };

  if (const json* j = member(spec, "version"))
    if (auto s = get_string(*j, key_path("version")))
      m.version = *s;
  if (const json* j = member(spec, "type"))
    if (auto s = get_enum(*j, key_path("type"), {"actor", "process"}))
      m.type = *s;
  if (const json* j = member(spec, "status"))
    if (auto s = get_enum(*j, key_path("status"), {"running", "stopped"}))
      m.status = *s == "running" ? desired_status::running : desired_status::stopped;
  if (const json* j = member(spec, "restartPolicy"))
    if (auto s = get_enum(*j, key_path("restartPolicy"),
                          {"never", "on-failure", "on-unhealthy", "always"}))
      parse_restart_policy(*s, m.restart);
  if (const json* j = member(spec, "startupOrder"))
    if (auto v = get_uint(*j, key_path("startupOrder"), 0, 4294967295u))
      m.startup_order = static_cast<std::uint32_t>(*v);

  std::string set_path = key_path("settings");
  const json* set = require(spec, path, "settings");
  if (set && expect_object(*set, set_path) && m.type == "process") {
    m.settings = *set;
    parse_process(*set, set_path, m.process);
  } else if (set && set->is_object()) {
    m.settings = *set;
    std::string lib_path = json_path_key(set_path, "library");
    if (!member(*set, "library"))
      check_keys(*set, set_path, {"library"});
    if (const json* lib = require(*set, set_path, "library")) {
      if (auto s = get_string(*lib, lib_path)) {
        m.library = *s;
        if (s->empty()) {
          fail(lib_path, "must not be empty (\"builtin:NAME\" or a path to a module library)");
        } else {
          auto r = opts_.resolve_library ? opts_.resolve_library(*s, opts_.base_dir)
                                         : resolve_library_path(*s, opts_.base_dir);
          if (r)
            m.library_path = std::move(r).value();
          else
            fail(lib_path, r.err().message, r.err().code);
        }
      }
    }
  }

  std::string env_path = key_path("env");
  if (const json* env = member(spec, "env"); env && expect_object(*env, env_path)) {
    for (const auto& [var, val] : env->items()) {
      std::string var_path = json_path_key(env_path, var);
      if (!is_env_name(var)) {
        fail(var_path, "invalid variable name (use A-Z a-z 0-9 _, not starting with a digit)");
        continue;
      }
      if (!expect_object(val, var_path))
        continue;
      check_keys(val, var_path, {"value"});
      std::string value_path = json_path_key(var_path, "value");
      if (const json* v = require(val, var_path, "value"))
        if (auto s = get_string(*v, value_path)) {
          // A process's environment is C strings: a NUL would cut the value.
          if (m.type == "process" && s->find('\0') != std::string::npos)
            fail(value_path, "must not contain a NUL character (it is a process's environment)");
          m.env[var] = *s;
        }
    }
  }

  if (const json* r = member(spec, "restart"))
    parse_restart(*r, key_path("restart"), m.limits);

  std::string hc_path = key_path("healthCheck");
  if (const json* hc = member(spec, "healthCheck"); hc && expect_object(*hc, hc_path)) {
    check_keys(*hc, hc_path, {"periodSecs", "deadlineSecs"});
    if (const json* j = member(*hc, "periodSecs"))
      if (auto v = get_uint(*j, json_path_key(hc_path, "periodSecs"), 0, 86400))
        m.health.period = std::chrono::seconds{*v};
    if (const json* j = member(*hc, "deadlineSecs"))
      if (auto v = get_uint(*j, json_path_key(hc_path, "deadlineSecs"), 1, 86400))
        m.health.deadline = std::chrono::seconds{*v};
  }
  return m;
}

// A process module's "executable" or "workingDir": resolved against the
// manifest's directory and, when opts_.check_process_files, checked on disk.
std::optional<std::string> validator::resolve_process_path(const json& j, const std::string& path,
                                                           bool directory) {
  auto s = get_string(j, path);
  if (!s)
    return std::nullopt;
  if (s->empty()) {
    fail(path, "must not be empty");
    return std::nullopt;
  }
  if (s->find('\0') != std::string::npos) {
    fail(path, "must not contain a NUL character");
    return std::nullopt;
  }
  namespace fs = std::filesystem;
  fs::path p{*s};
  if (p.is_relative()) {
    std::error_code ec;
    fs::path base = opts_.base_dir.empty() ? fs::current_path(ec) : fs::path(opts_.base_dir);
    p = base / p;
  }
  std::string full = p.lexically_normal().string();
  if (!opts_.check_process_files)
    return full;
  struct stat st {};
  if (::stat(full.c_str(), &st) != 0) {
    fail(path, quote(full) + ": " + std::strerror(errno));
    return std::nullopt;
  }
  if (directory) {
    if (!S_ISDIR(st.st_mode)) {
      fail(path, quote(full) + " is not a directory");
      return std::nullopt;
    }
    return full;
  }
  if (!S_ISREG(st.st_mode)) {
    fail(path, quote(full) + " is not a regular file");
    return std::nullopt;
  }
  if (::faccessat(AT_FDCWD, full.c_str(), X_OK, AT_EACCESS) != 0) {
    char mode[8];
    std::snprintf(mode, sizeof mode, "%04o", static_cast<unsigned>(st.st_mode & 07777));
    fail(path, quote(full) + " is not executable (mode " + mode + ")");
    return std::nullopt;
  }
  return full;
}

void validator::parse_process(const json& set, const std::string& path, process_settings& p) {
  check_keys(set, path, {"executable", "args", "workingDir", "stopGraceSecs"});
  if (member(set, "library"))
    fail(json_path_key(path, "library"),
         "a process module has no library (it runs settings.executable)");
  if (const json* exe = require(set, path, "executable")) {
    std::string exe_path = json_path_key(path, "executable");
    if (exe->is_string())
      p.executable = exe->get<std::string>();
    if (auto r = resolve_process_path(*exe, exe_path, false))
      p.executable_path = std::move(*r);
  }
  std::string args_path = json_path_key(path, "args");
  if (const json* args = member(set, "args")) {
    if (!args->is_array()) {
      fail(args_path, std::string("expected an array of strings, found ") + type_name(*args));
    } else {
      for (std::size_t i = 0; i < args->size(); ++i) {
        std::string arg_path = args_path + "[" + std::to_string(i) + "]";
        auto a = get_string((*args)[i], arg_path);
        if (!a)
          continue;
        if (a->find('\0') != std::string::npos)
          fail(arg_path, "must not contain a NUL character");
        else
          p.args.push_back(std::move(*a));
      }
    }
  }
  if (const json* wd = member(set, "workingDir")) {
    if (auto r = resolve_process_path(*wd, json_path_key(path, "workingDir"), true))
      p.working_dir = std::move(*r);
  } else if (!opts_.base_dir.empty()) {
    p.working_dir = std::filesystem::path(opts_.base_dir).lexically_normal().string();
  }
  if (const json* j = member(set, "stopGraceSecs"))
    if (auto v = get_uint(*j, json_path_key(path, "stopGraceSecs"), 0, 3600))
      p.stop_grace = std::chrono::seconds{*v};
}

void validator::parse_hub(const json& d, const std::string& path, deployment& out) {
  check_keys(d, path, {"schemaVersion", "routes", "storeAndForwardConfiguration", "mqttBroker"});
  std::string sv_path = json_path_key(path, "schemaVersion");
  if (const json* sv = require(d, path, "schemaVersion"))
    if (auto s = get_string(*sv, sv_path); s && !is_schema_version(*s))
      fail(sv_path, quote(*s) + " is not a supported schema version (expected 1.x, e.g. \"1.1\")");

  std::string routes_path = json_path_key(path, "routes");
  if (const json* routes = member(d, "routes"); routes && expect_object(*routes, routes_path)) {
    for (const auto& [name, val] : routes->items()) {
      std::string r_path = json_path_key(routes_path, name);
      if (name.empty()) {
        fail(r_path, "route names must not be empty");
        continue;
      }
      route_spec rs;
      rs.name = name;
      std::string text_path = r_path;
      if (val.is_string()) {
        rs.text = val.get<std::string>();
      } else if (val.is_object()) {
        check_keys(val, r_path, {"route", "priority", "timeToLiveSecs"});
        text_path = json_path_key(r_path, "route");
        const json* t = require(val, r_path, "route");
        auto text = t ? get_string(*t, text_path) : std::nullopt;
        if (const json* j = member(val, "priority"))
          if (auto v = get_uint(*j, json_path_key(r_path, "priority"), 0, 9))
            rs.priority = static_cast<int>(*v);
        if (const json* j = member(val, "timeToLiveSecs"))
          if (auto v = get_uint(*j, json_path_key(r_path, "timeToLiveSecs"), 0, 4294967295u))
            rs.ttl_secs = static_cast<std::uint32_t>(*v);
        if (!text)
          continue;
        rs.text = *text;
      } else {
        fail(r_path, std::string("expected a route string or an object, found ") + type_name(val));
        continue;
      }
      auto compiled = route::compile(name, rs.text);
      if (!compiled) {
        fail(text_path, compiled.err().message);
        continue;
      }
      routes_.push_back({text_path, std::move(compiled).value()});
      out.routes.push_back(std::move(rs));
    }
  }
  std::sort(out.routes.begin(), out.routes.end(),
            [](const route_spec& a, const route_spec& b) { return a.name < b.name; });

  std::string sf_path = json_path_key(path, "storeAndForwardConfiguration");
  if (const json* sf = member(d, "storeAndForwardConfiguration");
      sf && expect_object(*sf, sf_path)) {
    check_keys(*sf, sf_path, {"timeToLiveSecs"});
    if (const json* j = member(*sf, "timeToLiveSecs"))
      if (auto v = get_uint(*j, json_path_key(sf_path, "timeToLiveSecs"), 0, 4294967295u))
        out.store_ttl_secs = static_cast<std::uint32_t>(*v);
  }
}

error join(const std::vector<problem>& problems) {
  std::string text;
  std::size_t n = std::min(problems.size(), max_reported_problems);
  for (std::size_t i = 0; i < n; ++i) {
    if (i)
      text += '\n';
    text += problems[i].text;
  }
  if (problems.size() > n)
    text += "\n... and " + std::to_string(problems.size() - n) + " more problems";
  return make_error(problems.front().code, std::move(text));
}

}  // namespace

std::string json_path_key(std::string_view parent, std::string_view key) {
  auto plain = [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_'
           || c == '-' || c == '$';
  };
  bool dotted = !key.empty() && !(key[0] >= '0' && key[0] <= '9') && key[0] != '-'
                && std::all_of(key.begin(), key.end(), plain);
  std::string out{parent};
  if (dotted) {
    out += '.';
    out += key;
    return out;
  }
  out += "['";
  for (char c : key) {
    if (c == '\'' || c == '\\')
      out += '\\';
    out += c;
  }
  out += "']";
  return out;
}

expected<std::string> resolve_library_path(std::string_view library, const std::string& base_dir) {
  if (library.empty())
    return make_error(errc::invalid_argument, "library must not be empty");
  if (library.find('\0') != std::string_view::npos)
    return make_error(errc::invalid_argument, "library contains a NUL byte");
  constexpr std::string_view builtin = "builtin:";
  if (library.substr(0, builtin.size()) == builtin) {
    if (library.size() == builtin.size())
      return make_error(errc::invalid_argument,
                        "\"builtin:\" needs a module name, e.g. \"builtin:NAME\"");
    return std::string{};
  }
  namespace fs = std::filesystem;
  fs::path p{std::string(library)};
  if (p.is_relative()) {
    std::error_code ec;
    fs::path base = base_dir.empty() ? fs::current_path(ec) : fs::path(base_dir);
    p = base / p;
  }
  return p.lexically_normal().string();
}

expected<deployment> parse_manifest(std::string_view json_text, const manifest_options& opts) {
  try {
    if (json_text.size() > max_manifest_size)
      return make_error(errc::invalid_argument, "manifest is " + std::to_string(json_text.size())
                                                  + " bytes; the limit is "
                                                  + std::to_string(max_manifest_size));
    if (auto at = json_too_deep(json_text, max_manifest_depth))
      return make_error(errc::invalid_argument, "invalid JSON at byte " + std::to_string(*at)
                                                  + ": nested deeper than "
                                                  + std::to_string(max_manifest_depth) + " levels");
    json root;
    try {
      root = json::parse(json_text.begin(), json_text.end());
    } catch (const json::parse_error& e) {
      std::string what = e.what();
      if (auto close = what.find("] ");
          what.rfind("[json.exception", 0) == 0 && close != std::string::npos)
        what = what.substr(close + 2);
      return make_error(errc::invalid_argument,
                        "invalid JSON at byte " + std::to_string(e.byte) + ": " + what);
    }

    deployment out;
    out.base_dir = opts.base_dir;
    validator v{opts};
    v.run(root, out);
    if (!v.problems.empty())
      return join(v.problems);
    out.manifest = std::move(root);
    return out;
  } catch (const std::exception& e) {
    return make_error(errc::failed, std::string("manifest validation failed: ") + e.what());
  }
}

std::optional<std::size_t> json_too_deep(std::string_view text, int limit) noexcept {
  int depth = 0;
  bool in_string = false;
  bool escaped = false;
  for (std::size_t i = 0; i < text.size(); ++i) {
    char c = text[i];
    if (in_string) {
      if (escaped)
        escaped = false;
      else if (c == '\\')
        escaped = true;
      else if (c == '"')
        in_string = false;
      continue;
    }
    if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > limit)
        return i + 1;
    } else if (c == ']' || c == '}') {
      --depth;
    }
  }
  return std::nullopt;
}

}  // namespace canopy
