#include "runtime/manifest.hpp"

#include "temp_dir.hpp"

#include <catch2/catch.hpp>

#include <nlohmann/json.hpp>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

using namespace canopy;
using json = nlohmann::json;
using namespace std::chrono_literals;

namespace {

const std::string agent = "$.modulesContent.$edgeAgent['properties.desired']";
const std::string hub = "$.modulesContent.$edgeHub['properties.desired']";

std::string fixture(const std::string& name) {
  namespace fs = std::filesystem;
  // meson test sets CANOPY_SOURCE_ROOT; run by hand, __FILE__ is relative to
  // the build directory (the executable's parent's parent).
  std::vector<fs::path> dirs;
  if (const char* root = std::getenv("CANOPY_SOURCE_ROOT"))
    dirs.push_back(fs::path(root) / "tests" / "runtime" / "manifests");
  fs::path here = fs::path(__FILE__).parent_path() / "manifests";
  dirs.push_back(here);
  std::error_code ec;
  dirs.push_back(fs::read_symlink("/proc/self/exe", ec).parent_path().parent_path() / here);
  fs::path dir = dirs.front();
  for (const auto& d : dirs)
    if (fs::exists(d / name, ec)) {
      dir = d;
      break;
    }
  std::ifstream in(dir / name, std::ios::binary);
  REQUIRE(in);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

// A small valid manifest that the tables below break one piece at a time.
json minimal() {
  return json::parse(R"json({
    "modulesContent": {
      "$edgeAgent": {"properties.desired": {
        "schemaVersion": "1.1",
        "modules": {
          "sensor": {"settings": {"library": "builtin:sensor"}},
          "filter": {"restartPolicy": "on-failure", "settings": {"library": "builtin:filter"}}
        }}},
      "$edgeHub": {"properties.desired": {
        "schemaVersion": "1.1",
        "routes": {"r1": "FROM /messages/modules/sensor/* INTO BrokeredEndpoint(\"/modules/filter/inputs/in\")"}
      }}
    }})json");
}

const char* const agent_ptr = "/modulesContent/$edgeAgent/properties.desired";
const char* const hub_ptr = "/modulesContent/$edgeHub/properties.desired";

// One change to minimal(): set `pointer` to `value`, or remove it if value is nullopt.
struct edit {
  std::string pointer;
  std::optional<json> value;
};

std::string errors_of(const std::vector<edit>& edits, const manifest_options& opts = {}) {
  json m = minimal();
  for (const auto& e : edits) {
    json::json_pointer p{e.pointer};
    if (e.value)
      m[p] = *e.value;
    else
      m[p.parent_pointer()].erase(p.back());
  }
  auto d = parse_manifest(m.dump(), opts);
  if (d)
    return "(valid)";
  return d.err().message;
}

manifest_options with_base(std::string base) {
  manifest_options o;
  o.base_dir = std::move(base);
  return o;
}

}  // namespace

TEST_CASE("manifest: a full, valid manifest", "[manifest]") {
  auto text = fixture("good.json");
  auto d = parse_manifest(text, with_base("/srv/deploy"));
  if (!d)
    FAIL(d.err().message);

  CHECK(d->schema_version == "1.1");
  CHECK(d->base_dir == "/srv/deploy");
  CHECK(d->manifest == json::parse(text));
  CHECK(d->store_ttl_secs == 86400);

  // Modules by (startupOrder, name); no startupOrder sorts last.
  REQUIRE(d->modules.size() == 4);
  CHECK(d->modules[0].name == "sensor");
  CHECK(d->modules[1].name == "alerts");
  CHECK(d->modules[2].name == "filter");
  CHECK(d->modules[3].name == "archiver");

  const module_spec& sensor = d->modules[0];
  CHECK(sensor.type == "actor");
  CHECK(sensor.version == "1.0");
  CHECK(sensor.startup_order == 1);
  CHECK(sensor.library == "builtin:simulated_temperature_sensor");
  CHECK(sensor.library_path.empty());
  CHECK(sensor.settings.at("interval_ms") == 1000);
  CHECK(sensor.settings.at("library") == "builtin:simulated_temperature_sensor");
  CHECK(sensor.env
        == std::map<std::string, std::string>{{"SITE_ID", "line-3"}, {"UNITS", "celsius"}});
  CHECK(sensor.status == desired_status::running);
  CHECK(sensor.restart == restart_policy::always);
  // Node-wide restart settings apply to every module.
  CHECK(sensor.limits.max_restarts == 3);
  CHECK(sensor.limits.backoff_base == 500ms);
  CHECK(sensor.limits.within == restart_settings{}.within);
  CHECK(sensor.limits.backoff_cap == restart_settings{}.backoff_cap);
  CHECK(sensor.health == health_settings{});
  CHECK(sensor.desired_properties == json::object());

  const module_spec& filter = d->modules[2];
  CHECK(filter.version == "2.1");
  CHECK(filter.restart == restart_policy::on_failure);
  CHECK(filter.library == "plugins/libtemperature_filter.so");
  CHECK(filter.library_path == "/srv/deploy/plugins/libtemperature_filter.so");
  CHECK(filter.settings.at("threshold") == 25.5);
  // ... and a module's own restart settings override them.
  CHECK(filter.limits.max_restarts == 10);
  CHECK(filter.limits.within == 60s);
  CHECK(filter.limits.backoff_base == 500ms);
  CHECK(filter.limits.backoff_cap == 30s);
  CHECK(filter.limits.stable_period == 120s);
  CHECK(filter.limits.jitter == 0.0);
  CHECK(filter.health.period == 5s);
  CHECK(filter.health.deadline == 2s);
  CHECK(filter.desired_properties == json{{"TemperatureThreshold", 25}});

  const module_spec& archiver = d->modules[3];
  CHECK(archiver.status == desired_status::stopped);
  CHECK(archiver.restart == restart_policy::never);
  CHECK(archiver.startup_order == 4294967295u);
  CHECK(archiver.library_path == "/opt/canopy/modules/libarchiver.so");
  CHECK(d->find("archiver") == &archiver);

  // Routes by name, string and object forms.
  REQUIRE(d->routes.size() == 3);
  CHECK(d->routes[0].name == "allToAlerts");
  CHECK(
    d->routes[1]
    == route_spec{"filterToUpstream",
                  "FROM /messages/modules/filter/outputs/* WHERE temperature > 30 INTO $upstream",
                  2, 3600});
  CHECK(d->routes[2].name == "sensorToFilter");
  CHECK(d->routes[2].priority == 0);
  CHECK(d->routes[2].ttl_secs == 0);
}

TEST_CASE("manifest: minimal forms", "[manifest]") {
  CHECK(errors_of({}) == "(valid)");

  // $edgeHub is optional; so are routes.
  json m = minimal();
  m["modulesContent"].erase("$edgeHub");
  auto d = parse_manifest(m.dump(), {});
  REQUIRE(d);
  CHECK(d->routes.empty());
  CHECK(d->store_ttl_secs == 7200);
  // Defaults of a module with only settings.
  const module_spec* s = d->find("sensor");
  REQUIRE(s);
  CHECK(s->type == "actor");
  CHECK(s->status == desired_status::running);
  CHECK(s->restart == restart_policy::always);
  CHECK(s->startup_order == 4294967295u);
  CHECK(s->limits == restart_settings{});

  // No modules at all.
  CHECK(errors_of({{std::string(agent_ptr) + "/modules", json::object()},
                   {std::string(hub_ptr) + "/routes", json::object()}})
        == "(valid)");
  // Integral floats count as integers; unknown keys that are not near a known one are ignored.
  CHECK(errors_of({{std::string(agent_ptr) + "/modules/filter/startupOrder", 3.0},
                   {std::string(agent_ptr) + "/modules/filter/imagePullPolicy", "never"},
                   {std::string(agent_ptr) + "/modules/filter/createOptions", json::object()},
                   {std::string(agent_ptr) + "/modules/filter/settings/librarySearchPath", "x"}})
        == "(valid)");
}

TEST_CASE("manifest: each problem names its JSON path", "[manifest]") {
  const std::string a = agent_ptr;
  const std::string h = hub_ptr;
  const std::string mods = agent + ".modules";
  struct bad_case {
    std::vector<edit> edits;
    std::string expected;  // exact substring of the error text
  };
  const std::vector<bad_case> table = {
    // $edgeAgent modules
    {{{a + "/modules/filter/restartPolicy", "sometimes"}},
     mods
       + ".filter.restartPolicy: \"sometimes\" is not one of never, on-failure, on-unhealthy, "
         "always"},
    {{{a + "/modules/filter/status", "paused"}},
     mods + ".filter.status: \"paused\" is not one of running, stopped"},
    {{{a + "/modules/filter/type", "docker"}},
     mods + ".filter.type: \"docker\" is not one of actor"},
    {{{a + "/modules/filter/version", 2}},
     mods + ".filter.version: expected a string, found an integer"},
    {{{a + "/modules/filter/startupOrder", -1}},
     mods + ".filter.startupOrder: -1 is out of range 0..4294967295"},
    {{{a + "/modules/filter/startupOrder", 4294967296}},
     mods + ".filter.startupOrder: 4294967296 is out of range 0..4294967295"},
    {{{a + "/modules/filter/startupOrder", "1"}},
     mods + ".filter.startupOrder: expected an integer, found a string"},
    {{{a + "/modules/filter/startupOrder", 1.5}},
     mods + ".filter.startupOrder: expected an integer, found 1.5"},
    {{{a + "/modules/filter/restartpolicy", "always"}},
     mods + ".filter.restartpolicy: unknown key; did you mean \"restartPolicy\"?"},
    {{{a + "/modules/filter/startupOrdr", 1}},
     mods + ".filter.startupOrdr: unknown key; did you mean \"startupOrder\"?"},
    {{{a + "/modules/filter/settings", std::nullopt}},
     mods + ".filter.settings: required key is missing"},
    {{{a + "/modules/filter/settings", "builtin:filter"}},
     mods + ".filter.settings: expected an object, found a string"},
    {{{a + "/modules/filter/settings/library", std::nullopt}},
     mods + ".filter.settings.library: required key is missing"},
    {{{a + "/modules/filter/settings", json{{"libary", "builtin:filter"}}}},
     mods + ".filter.settings.libary: unknown key; did you mean \"library\"?"},
    {{{a + "/modules/filter/settings/library", 5}},
     mods + ".filter.settings.library: expected a string, found an integer"},
    {{{a + "/modules/filter/settings/library", ""}},
     mods
       + ".filter.settings.library: must not be empty (\"builtin:NAME\" or a path to a module "
         "library)"},
    {{{a + "/modules/filter/settings/library", "builtin:"}},
     mods + ".filter.settings.library: \"builtin:\" needs a module name, e.g. \"builtin:NAME\""},
    {{{a + "/modules/filter", "x"}}, mods + ".filter: expected an object, found a string"},
    {{{a + "/modules/bad name", json{{"settings", {{"library", "builtin:x"}}}}}},
     mods + "['bad name']: invalid module name (use 1 to 64 of A-Z a-z 0-9 _ . -)"},
    {{{a + "/modules/it's", json{{"settings", {{"library", "builtin:x"}}}}}},
     mods + "['it\\'s']: invalid module name (use 1 to 64 of A-Z a-z 0-9 _ . -)"},
    {{{a + "/modules/" + std::string(65, 'm'), json{{"settings", {{"library", "builtin:x"}}}}}},
     mods + "." + std::string(65, 'm') + ": invalid module name"},
    {{{a + "/modules/$sys", json{{"settings", {{"library", "builtin:x"}}}}}},
     mods + ".$sys: module names must not start with '$'"},
    {{{a + "/modules/filter/env", json{{"1BAD", {{"value", "x"}}}}}},
     mods
       + ".filter.env['1BAD']: invalid variable name (use A-Z a-z 0-9 _, not starting with a "
         "digit)"},
    {{{a + "/modules/filter/env", json{{"X", "plain"}}}},
     mods + ".filter.env.X: expected an object, found a string"},
    {{{a + "/modules/filter/env", json{{"X", {{"value", 5}}}}}},
     mods + ".filter.env.X.value: expected a string, found an integer"},
    {{{a + "/modules/filter/env", json{{"X", {{"valu", "a"}}}}}},
     mods + ".filter.env.X.valu: unknown key; did you mean \"value\"?\n" + mods
       + ".filter.env.X.value: required key is missing"},
    {{{a + "/modules/filter/env", json::array()}},
     mods + ".filter.env: expected an object, found an array"},
    {{{a + "/modules/filter/restart", json{{"maxRestarts", -1}}}},
     mods + ".filter.restart.maxRestarts: -1 is out of range 0..2147483647"},
    {{{a + "/modules/filter/restart", json{{"withinSecs", 0}}}},
     mods + ".filter.restart.withinSecs: 0 is out of range 1..2147483647"},
    {{{a + "/modules/filter/restart", json{{"backoffBaseMs", 5000}, {"backoffCapSecs", 1}}}},
     mods + ".filter.restart: backoffCapSecs (1 s) is less than backoffBaseMs (5000 ms)"},
    {{{a + "/modules/filter/restart", json{{"jitter", 2}}}},
     mods + ".filter.restart.jitter: 2 is out of range 0..1"},
    {{{a + "/modules/filter/restart", json{{"jitter", "x"}}}},
     mods + ".filter.restart.jitter: expected a number, found a string"},
    {{{a + "/modules/filter/restart", "x"}},
     mods + ".filter.restart: expected an object, found a string"},
    {{{a + "/modules/filter/restart", json{{"maxRetries", 1}}}}, "(valid)"},
    {{{a + "/modules/filter/restart", json{{"maxRestart", 1}}}},
     mods + ".filter.restart.maxRestart: unknown key; did you mean \"maxRestarts\"?"},
    {{{a + "/modules/filter/healthCheck", json{{"deadlineSecs", 0}}}},
     mods + ".filter.healthCheck.deadlineSecs: 0 is out of range 1..86400"},
    {{{a + "/modules/filter/healthCheck", json{{"periodsecs", 3}}}},
     mods + ".filter.healthCheck.periodsecs: unknown key; did you mean \"periodSecs\"?"},
    // $edgeAgent itself
    {{{a + "/schemaVersion", "2.0"}},
     agent
       + ".schemaVersion: \"2.0\" is not a supported schema version (expected 1.x, e.g. \"1.1\")"},
    {{{a + "/schemaVersion", std::nullopt}}, agent + ".schemaVersion: required key is missing"},
    {{{a + "/schemaVersion", 1.1}}, agent + ".schemaVersion: expected a string, found a number"},
    {{{a + "/modules", std::nullopt}}, agent + ".modules: required key is missing"},
    {{{a + "/modules", json::array()}}, agent + ".modules: expected an object, found an array"},
    {{{a + "/modlues", json::object()}},
     agent + ".modlues: unknown key; did you mean \"modules\"?"},
    {{{a + "/runtime", json{{"settings", {{"restart", {{"maxRestart", 2}}}}}}}},
     agent + ".runtime.settings.restart.maxRestart: unknown key; did you mean \"maxRestarts\"?"},
    {{{a + "/runtime", json{{"settings", {{"restart", {{"withinSecs", -3}}}}}}}},
     agent + ".runtime.settings.restart.withinSecs: -3 is out of range 1..2147483647"},
    {{{a + "/runtime", 7}}, agent + ".runtime: expected an object, found an integer"},
    {{{a, std::nullopt}},
     "$.modulesContent.$edgeAgent['properties.desired']: required key is missing"},
    {{{"/modulesContent/$edgeAgent", std::nullopt}},
     "$.modulesContent.$edgeAgent: required key is missing"},
    {{{"/modulesContent/$edgeAgent", json::array()}},
     "$.modulesContent.$edgeAgent: expected an object, found an array"},
    {{{"/modulesContent", std::nullopt}}, "$.modulesContent: required key is missing"},
    {{{"/modulesContent", "x"}}, "$.modulesContent: expected an object, found a string"},
    {{{"/modulescontent", json::object()}},
     "$.modulescontent: unknown key; did you mean \"modulesContent\"?"},
    {{{"/modulesContent/$edgeagent", json::object()}},
     "$.modulesContent.$edgeagent: unknown key; did you mean \"$edgeAgent\"?"},
    {{{"/modulesContent/$other", json::object()}},
     "$.modulesContent.$other: unknown system module (expected $edgeAgent or $edgeHub)"},
    // Desired properties of modules
    {{{"/modulesContent/filter", json{{"properties.desired", {{"x", 1}}}}}}, "(valid)"},
    {{{"/modulesContent/ghost", json{{"properties.desired", json::object()}}}},
     "$.modulesContent.ghost: desired properties for module \"ghost\", which is not in " + mods},
    {{{"/modulesContent/filter", json{{"properties.desired", 5}}}},
     "$.modulesContent.filter['properties.desired']: expected an object, found an integer"},
    {{{"/modulesContent/filter", json{{"properties", json::object()}}}},
     "$.modulesContent.filter['properties.desired']: required key is missing"},
    {{{"/modulesContent/filter", json{{"properties.desried", json::object()}}}},
     "$.modulesContent.filter['properties.desried']: unknown key; did you mean "
     "\"properties.desired\"?"},
    // $edgeHub routes
    {{{h + "/routes/r1", "FROM /messages/modules/nope/* INTO $upstream"}},
     hub + ".routes.r1: route 'r1' reads from module 'nope', which is not in the deployment"},
    {{{h + "/routes/r1", "FROM /* INTO BrokeredEndpoint(\"/modules/nope/inputs/x\")"}},
     hub + ".routes.r1: route 'r1' delivers to module 'nope', which is not in the deployment"},
    {{{h + "/routes/my route", "FROM /messages/modules/Sensor/* INTO $upstream"}},
     hub
       + ".routes['my route']: route 'my route' reads from module 'Sensor', which is not in the "
         "deployment"},
    {{{h + "/routes/r1", "FROM /* WHERE INTO $upstream"}},
     hub + ".routes.r1: route 'r1': column 15: expected a condition after WHERE, found INTO"},
    {{{h + "/routes/r1", json{{"route", "FROM /* INTO nowhere"}}}},
     hub + ".routes.r1.route: route 'r1': column 14: expected $upstream or BrokeredEndpoint"},
    {{{h + "/routes/r1", json{{"route", "FROM /* INTO $upstream"}, {"priority", 10}}}},
     hub + ".routes.r1.priority: 10 is out of range 0..9"},
    {{{h + "/routes/r1", json{{"route", "FROM /* INTO $upstream"}, {"timeToLiveSecs", -1}}}},
     hub + ".routes.r1.timeToLiveSecs: -1 is out of range 0..4294967295"},
    {{{h + "/routes/r1", json{{"priority", 1}}}},
     hub + ".routes.r1.route: required key is missing"},
    {{{h + "/routes/r1", json{{"route", "FROM /* INTO $upstream"}, {"prority", 1}}}},
     hub + ".routes.r1.prority: unknown key; did you mean \"priority\"?"},
    {{{h + "/routes/r1", 5}},
     hub + ".routes.r1: expected a route string or an object, found an integer"},
    {{{h + "/routes/", "FROM /* INTO $upstream"}},
     hub + ".routes['']: route names must not be empty"},
    {{{h + "/routes", json::array()}}, hub + ".routes: expected an object, found an array"},
    {{{h + "/storeAndForwardConfiguration", json{{"timeToLiveSecs", -5}}}},
     hub + ".storeAndForwardConfiguration.timeToLiveSecs: -5 is out of range 0..4294967295"},
    {{{h + "/storeAndForwardConfiguration", json{{"timeToLiveSec", 5}}}},
     hub
       + ".storeAndForwardConfiguration.timeToLiveSec: unknown key; did you mean "
         "\"timeToLiveSecs\"?"},
    {{{h + "/schemaVersion", "abc"}},
     hub
       + ".schemaVersion: \"abc\" is not a supported schema version (expected 1.x, e.g. \"1.1\")"},
    {{{h, std::nullopt}},
     "$.modulesContent.$edgeHub['properties.desired']: required key is missing"},
    {{{h + "/routs", json::object()}}, hub + ".routs: unknown key; did you mean \"routes\"?"},
  };
  for (const auto& c : table) {
    std::string got = errors_of(c.edits);
    INFO("expected: " << c.expected << "\ngot: " << got);
    if (c.expected == "(valid)")
      CHECK(got == "(valid)");
    else
      CHECK(got.find(c.expected) != std::string::npos);
  }
}

TEST_CASE("manifest: all problems are reported, one per line", "[manifest]") {
  const std::string a = agent_ptr;
  std::string got = errors_of({{a + "/modules/filter/restartPolicy", "sometimes"},
                               {a + "/modules/sensor/status", "paused"},
                               {std::string(hub_ptr) + "/routes/r2",
                                "FROM /* INTO BrokeredEndpoint(\"/modules/x/inputs/y\")"}});
  CHECK(got == agent + ".modules.filter.restartPolicy: \"sometimes\" is not one of never, on-failure, on-unhealthy, always\n"
               + agent + ".modules.sensor.status: \"paused\" is not one of running, stopped\n"
               + hub + ".routes.r2: route 'r2' delivers to module 'x', which is not in the deployment");

  // Errors are capped so that a huge manifest cannot make a huge message.
  json m = minimal();
  for (int i = 0; i < 150; ++i)
    m["modulesContent"]["$edgeAgent"]["properties.desired"]["modules"]["m" + std::to_string(i)] = 1;
  auto d = parse_manifest(m.dump(), {});
  REQUIRE_FALSE(d);
  CHECK(d.err().code == errc::invalid_argument);
  CHECK(d.err().message.find("\n... and 50 more problems") != std::string::npos);
}

TEST_CASE("manifest: malformed JSON names the byte", "[manifest]") {
  struct json_case {
    std::string text;
    std::string expected_prefix;
  };
  const std::vector<json_case> table = {
    {"{\"a\": }", "invalid JSON at byte 7: "},
    {"", "invalid JSON at byte 1: "},
    {"{\"modulesContent\": {} ", "invalid JSON at byte 23: "},
    {"{\"a\": \"\xff\"}", "invalid JSON at byte 8: "},
    {"[1, 2] x", "invalid JSON at byte 8: "},
    {std::string(100, '['), "invalid JSON at byte 65: nested deeper than 64 levels"},
    {"{\"a\": " + std::string(70, '{'), "invalid JSON at byte 70: nested deeper than 64 levels"},
  };
  for (const auto& c : table) {
    INFO(c.text);
    auto d = parse_manifest(c.text, {});
    REQUIRE_FALSE(d);
    CHECK(d.err().code == errc::invalid_argument);
    CHECK(d.err().message.rfind(c.expected_prefix, 0) == 0);
    CHECK(d.err().message.find("json.exception") == std::string::npos);
    INFO(d.err().message);
  }
  // Brackets inside strings do not count as nesting.
  json m = minimal();
  m["modulesContent"]["filter"]["properties.desired"]["s"] = std::string(200, '[');
  CHECK(parse_manifest(m.dump(), {}));
  // Too large.
  auto big = parse_manifest(std::string(max_manifest_size + 1, ' '), {});
  REQUIRE_FALSE(big);
  CHECK(big.err().message.find("the limit is") != std::string::npos);
}

TEST_CASE("manifest: libraries go through the resolver", "[manifest]") {
  std::vector<std::pair<std::string, std::string>> calls;
  manifest_options opts;
  opts.base_dir = "/srv/deploy";
  opts.resolve_library = [&](std::string_view library,
                             const std::string& base_dir) -> expected<std::string> {
    calls.emplace_back(std::string(library), base_dir);
    if (library == "builtin:filter")
      return make_error(errc::not_found, "no builtin module \"filter\" (have: sensor)");
    if (library.substr(0, 8) == "builtin:")
      return std::string{};
    return "/resolved/" + std::string(library);
  };
  auto d = parse_manifest(minimal().dump(), opts);
  REQUIRE_FALSE(d);
  CHECK(d.err().code == errc::not_found);
  CHECK(d.err().message
        == agent + ".modules.filter.settings.library: no builtin module \"filter\" (have: sensor)");
  CHECK(calls
        == std::vector<std::pair<std::string, std::string>>{{"builtin:filter", "/srv/deploy"},
                                                            {"builtin:sensor", "/srv/deploy"}});

  json m = minimal();
  m["modulesContent"]["$edgeAgent"]["properties.desired"]["modules"]["filter"]["settings"]
   ["library"] = "libf.so";
  auto ok = parse_manifest(m.dump(), opts);
  REQUIRE(ok);
  CHECK(ok->find("filter")->library == "libf.so");
  CHECK(ok->find("filter")->library_path == "/resolved/libf.so");
  CHECK(ok->find("sensor")->library_path.empty());
}

TEST_CASE("manifest: default library resolution", "[manifest]") {
  CHECK(resolve_library_path("builtin:x", "/a").value().empty());
  CHECK(resolve_library_path("/abs/lib.so", "/a").value() == "/abs/lib.so");
  CHECK(resolve_library_path("lib.so", "/a/b").value() == "/a/b/lib.so");
  CHECK(resolve_library_path("../lib/./x.so", "/srv/deploy").value() == "/srv/lib/x.so");
  CHECK(std::filesystem::path(resolve_library_path("x.so", "").value()).is_absolute());
  CHECK_FALSE(resolve_library_path("builtin:", "/a"));
  CHECK_FALSE(resolve_library_path("", "/a"));
  CHECK_FALSE(resolve_library_path(std::string_view("a\0b", 3), "/a"));
}

TEST_CASE("manifest: JSON path notation", "[manifest]") {
  CHECK(json_path_key("$", "modulesContent") == "$.modulesContent");
  CHECK(json_path_key("$.m", "$edgeAgent") == "$.m.$edgeAgent");
  CHECK(json_path_key("$.m", "temp-sensor") == "$.m.temp-sensor");
  CHECK(json_path_key("$.m", "properties.desired") == "$.m['properties.desired']");
  CHECK(json_path_key("$.m", "1st") == "$.m['1st']");
  CHECK(json_path_key("$.m", "-x") == "$.m['-x']");
  CHECK(json_path_key("$.m", "") == "$.m['']");
  CHECK(json_path_key("$.m", "a'b\\c") == "$.m['a\\'b\\\\c']");
}

TEST_CASE("manifest: never throws on odd input", "[manifest]") {
  for (std::string text :
       {std::string("null"), std::string("[]"), std::string("\"x\""),
        std::string("{\"modulesContent\": null}"),
        std::string("{\"modulesContent\": {\"$edgeAgent\": {\"properties.desired\": []}}}"),
        std::string("\x00\x01\x02", 3), std::string("{\"a\":1e99999}")}) {
    INFO(text);
    auto d = parse_manifest(text, {});
    CHECK_FALSE(d);
  }
}

namespace {

// A manifest with one process module `proc` whose settings are `settings`.
std::string process_manifest(const json& settings, const json& extra = json::object()) {
  json m = json::parse(R"json({"modulesContent": {"$edgeAgent": {"properties.desired": {
    "schemaVersion": "1.1", "modules": {}}}}})json");
  json mod = {{"type", "process"}, {"settings", settings}};
  mod.update(extra);
  m["modulesContent"]["$edgeAgent"]["properties.desired"]["modules"]["proc"] = mod;
  return m.dump();
}

std::string process_errors(const json& settings, const manifest_options& opts,
                           const json& extra = json::object()) {
  auto d = parse_manifest(process_manifest(settings, extra), opts);
  return d ? "(valid)" : d.err().message;
}

}  // namespace

TEST_CASE("manifest: process modules", "[manifest]") {
  namespace fs = std::filesystem;
  canopy::unit_test::temp_dir dir{"canopy-manifest"};
  auto write = [&](const std::string& name, fs::perms mode) {
    std::ofstream{dir.path + "/" + name} << "#!/bin/sh\n";
    fs::permissions(dir.path + "/" + name, mode);
  };
  write("run.sh", fs::perms::owner_all);
  write("plain.txt", fs::perms::owner_read | fs::perms::owner_write);
  fs::create_directory(dir.path + "/work");
  auto opts = with_base(dir.path);
  const std::string set = agent + ".modules.proc.settings";

  SECTION("a valid process module, with defaults and with every setting") {
    auto d = parse_manifest(process_manifest({{"executable", "run.sh"}}, {{"env", {{"A", {{"value", "1"}}}}}}),
                            opts);
    REQUIRE(d);
    const module_spec& m = d->modules.at(0);
    CHECK(m.type == "process");
    CHECK(m.library.empty());
    CHECK(m.process.executable == "run.sh");
    CHECK(m.process.executable_path == dir.path + "/run.sh");
    CHECK(m.process.args.empty());
    CHECK(m.process.working_dir == dir.path);  // the manifest's directory
    CHECK(m.process.stop_grace == 10s);
    CHECK(m.env == std::map<std::string, std::string>{{"A", "1"}});

    auto full = parse_manifest(process_manifest({{"executable", dir.path + "/run.sh"},
                                                 {"args", {"--port", "1883"}},
                                                 {"workingDir", "work"},
                                                 {"stopGraceSecs", 3}}),
                               opts);
    REQUIRE(full);
    const module_spec& f = full->modules.at(0);
    CHECK(f.process.executable_path == dir.path + "/run.sh");
    CHECK(f.process.args == std::vector<std::string>{"--port", "1883"});
    CHECK(f.process.working_dir == dir.path + "/work");
    CHECK(f.process.stop_grace == 3s);
    // A change of what runs restarts the module.
    CHECK(m.needs_restart_for(f));
    module_spec same = m;
    CHECK_FALSE(m.needs_restart_for(same));
    same.process.args = {"x"};
    CHECK(m.needs_restart_for(same));
  }

  SECTION("errors name the field") {
    CHECK(process_errors(json::object(), opts) == set + ".executable: required key is missing");
    CHECK(process_errors({{"executable", "missing.sh"}}, opts)
          == set + ".executable: \"" + dir.path + "/missing.sh\": No such file or directory");
    CHECK(process_errors({{"executable", "plain.txt"}}, opts)
          == set + ".executable: \"" + dir.path + "/plain.txt\" is not executable (mode 0600)");
    CHECK(process_errors({{"executable", "work"}}, opts)
          == set + ".executable: \"" + dir.path + "/work\" is not a regular file");
    CHECK(process_errors({{"executable", ""}}, opts) == set + ".executable: must not be empty");
    CHECK(process_errors({{"executable", 5}}, opts) == set + ".executable: expected a string, found an integer");
    CHECK(process_errors({{"executable", "run.sh"}, {"args", "-v"}}, opts)
          == set + ".args: expected an array of strings, found a string");
    CHECK(process_errors({{"executable", "run.sh"}, {"args", {"-v", 2}}}, opts)
          == set + ".args[1]: expected a string, found an integer");
    CHECK(process_errors({{"executable", "run.sh"}, {"workingDir", "run.sh"}}, opts)
          == set + ".workingDir: \"" + dir.path + "/run.sh\" is not a directory");
    CHECK(process_errors({{"executable", "run.sh"}, {"workingDir", "nowhere"}}, opts)
          == set + ".workingDir: \"" + dir.path + "/nowhere\": No such file or directory");
    CHECK(process_errors({{"executable", "run.sh"}, {"stopGraceSecs", 5000}}, opts)
          == set + ".stopGraceSecs: 5000 is out of range 0..3600");
    CHECK(process_errors({{"executable", "run.sh"}, {"library", "builtin:x"}}, opts)
          == set + ".library: a process module has no library (it runs settings.executable)");
    CHECK(process_errors({{"executable", "run.sh"}, {"executible", "run.sh"}}, opts)
          == set + ".executible: unknown key; did you mean \"executable\"?");
    CHECK(process_errors({{"executable", "run.sh"}}, opts, {{"env", {{"A", {{"value", std::string("a\0b", 3)}}}}}})
          == agent + ".modules.proc.env.A.value: must not contain a NUL character (it is a process's environment)");
    CHECK(process_errors({{"executable", "run.sh"}}, opts, {{"type", "docker"}})
            .rfind(agent + ".modules.proc.type: \"docker\" is not one of actor, process\n", 0)
          == 0);
  }

  SECTION("an actor module still needs its library") {
    CHECK(process_errors({{"executable", "run.sh"}}, opts, {{"type", "actor"}})
          == set + ".library: required key is missing");
  }

  SECTION("the hub checks no files: paths resolve lexically") {
    manifest_options hub_opts = with_base("/srv/deploy");
    hub_opts.check_process_files = false;
    auto d = parse_manifest(process_manifest({{"executable", "bin/../run.py"}, {"workingDir", "data"}}), hub_opts);
    REQUIRE(d);
    CHECK(d->modules.at(0).process.executable_path == "/srv/deploy/run.py");
    CHECK(d->modules.at(0).process.working_dir == "/srv/deploy/data");
  }
}
