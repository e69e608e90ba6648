#include "runtime/registry.hpp"

#include "temp_dir.hpp"

#include <catch2/catch.hpp>

#include "sqlite_inspect.hpp"

#include <chrono>
#include <string>
#include <vector>

using namespace canopy;
using json = nlohmann::json;
using namespace std::chrono_literals;

namespace {

using canopy::unit_test::temp_dir;

const std::string hub = "hub";

std::unique_ptr<fleet_registry> open_ok(const std::string& dir, const canopy::clock& clk,
                                        const std::string& root = hub) {
  auto r = fleet_registry::open(dir, root, clk);
  INFO((r ? std::string() : r.err().message));
  REQUIRE(r.ok());
  return std::move(r).value();
}

template <class T>
T ok(expected<T> r) {
  INFO((r ? std::string() : r.err().message));
  REQUIRE(r.ok());
  return std::move(r).value();
}

void ok(expected<void> r) {
  INFO((r ? std::string() : r.err().message));
  REQUIRE(r.ok());
}

template <class T>
error fails(expected<T> r) {
  REQUIRE_FALSE(r.ok());
  return std::move(r).err();
}

device_record gateway(const std::string& id, const std::string& parent,
                      json tags = json::object()) {
  device_record d;
  d.id = id;
  d.parent = parent;
  d.kind = "gateway";
  d.tags = std::move(tags);
  return d;
}

device_record leaf(const std::string& id, const std::string& parent) {
  device_record d;
  d.id = id;
  d.parent = parent;
  d.kind = "device";
  return d;
}

std::vector<std::string> ids(const std::vector<device_record>& records) {
  std::vector<std::string> out;
  for (const auto& r : records)
    out.push_back(r.id);
  return out;
}

/// hub -> g1 -> g2 -> g3 -> d1 (four levels under the hub), g1 -> d2,
/// hub -> g4 -> d3.
void build_tree(fleet_registry& reg) {
  ok(reg.create_device(gateway("g1", hub)));
  ok(reg.create_device(gateway("g2", "g1")));
  ok(reg.create_device(gateway("g3", "g2")));
  ok(reg.create_device(leaf("d1", "g3")));
  ok(reg.create_device(leaf("d2", "g1")));
  ok(reg.create_device(gateway("g4", "")));
  ok(reg.create_device(leaf("d3", "g4")));
}

deployment_record deployment(const std::string& id, const std::string& condition, int priority,
                             const std::string& manifest = R"({"modules": {}})") {
  deployment_record d;
  d.id = id;
  d.manifest_json = manifest;
  d.target_condition = condition;
  d.priority = priority;
  return d;
}

}  // namespace

TEST_CASE("registry: open creates registry.db in WAL mode with the current schema", "[registry]") {
  temp_dir tmp;
  manual_clock clk;
  const std::string dir = tmp.path + "/data";
  auto reg = open_ok(dir, clk);
  CHECK(reg->path() == dir + "/registry.db");
  CHECK(reg->root_id() == hub);
  CHECK(unit_test::query_text(reg->path(), "PRAGMA journal_mode") == "wal");
  CHECK(unit_test::query_int(reg->path(), "PRAGMA user_version") ==
        fleet_registry::current_schema_version);
  CHECK(ok(reg->list_devices()).empty());
  CHECK(ok(reg->list_deployments()).empty());

  auto bad = fleet_registry::open(dir, "bad id", clk);
  REQUIRE_FALSE(bad.ok());
  CHECK(bad.err().code == errc::invalid_argument);
  CHECK_THAT(bad.err().message, Catch::StartsWith("registry: root_id: 'bad id'"));
}

TEST_CASE("registry: create, get, list and the parent rules", "[registry]") {
  temp_dir tmp;
  manual_clock clk;
  auto reg = open_ok(tmp.path, clk);

  auto g1 = ok(reg->create_device(gateway("g1", "", {{"site", "a"}})));
  CHECK(g1.parent == hub);  // "" = the root
  CHECK(g1.created_ms == clk.wall_ms());
  CHECK(g1.updated_ms == clk.wall_ms());
  CHECK(g1.last_seen_ms == 0);
  CHECK(ok(reg->get_device("g1")) == g1);

  clk.advance(5s);
  device_record sas = leaf("sensor-1.a:b_c", "g1");
  sas.auth = "sas";
  sas.primary_key = "cHJpbWFyeQ==";
  sas.secondary_key = "c2Vjb25kYXJ5";
  auto d = ok(reg->create_device(sas));
  CHECK(d.created_ms == g1.created_ms + 5000);
  device_record thumb = leaf("cam", "g1");
  thumb.auth = "x509_thumbprint";
  thumb.thumbprint = std::string(64, 'a');
  ok(reg->create_device(thumb));

  CHECK(ids(ok(reg->list_devices())) == std::vector<std::string>{"cam", "g1", "sensor-1.a:b_c"});
  CHECK(ok(reg->get_device("sensor-1.a:b_c")) == d);

  SECTION("duplicate id") {
    auto e = fails(reg->create_device(leaf("cam", "g1")));
    CHECK(e.code == errc::already_exists);
    CHECK(e.message == "registry: id: device 'cam' is already registered");
  }
  SECTION("unknown parent") {
    auto e = fails(reg->create_device(leaf("x", "nope")));
    CHECK(e.code == errc::not_found);
    CHECK_THAT(e.message, Catch::StartsWith("registry: parent: 'nope' is not registered"));
  }
  SECTION("a device cannot be a parent") {
    auto e = fails(reg->create_device(leaf("x", "cam")));
    CHECK(e.code == errc::invalid_argument);
    CHECK(e.message == "registry: parent: 'cam' is a device; only gateways can have children");
  }
  SECTION("own parent, root id") {
    CHECK_THAT(fails(reg->create_device(gateway("x", "x"))).message,
               Catch::StartsWith("registry: parent: device 'x' cannot be its own parent"));
    CHECK_THAT(fails(reg->create_device(gateway(hub, ""))).message,
               Catch::StartsWith("registry: id: 'hub' is the registry's own (root) id"));
  }
  SECTION("bad ids") {
    for (const std::string& id : {std::string(), std::string(129, 'a'), std::string("a b"),
                                  std::string("a/b"), std::string("é")}) {
      auto e = fails(reg->create_device(leaf(id, "")));
      CHECK(e.code == errc::invalid_argument);
      CHECK_THAT(e.message, Catch::StartsWith("registry: id: "));
    }
    CHECK(ok(reg->create_device(leaf(std::string(128, 'z'), ""))).id.size() == 128);
  }
  SECTION("bad fields name the field") {
    device_record r = leaf("x", "");
    r.kind = "router";
    CHECK_THAT(fails(reg->create_device(r)).message, Catch::StartsWith("registry: kind: "));
    r = leaf("x", "");
    r.auth = "password";
    CHECK_THAT(fails(reg->create_device(r)).message, Catch::StartsWith("registry: auth: "));
    r = leaf("x", "");
    r.auth = "sas";
    CHECK_THAT(fails(reg->create_device(r)).message,
               Catch::StartsWith("registry: primary_key: required for auth 'sas'"));
    r = leaf("x", "");
    r.auth = "x509_thumbprint";
    r.thumbprint = "xyz";
    CHECK_THAT(fails(reg->create_device(r)).message, Catch::StartsWith("registry: thumbprint: "));
    r = leaf("x", "");
    r.primary_key = "k";
    CHECK_THAT(fails(reg->create_device(r)).message,
               Catch::StartsWith("registry: primary_key: only for auth 'sas'"));
    r = leaf("x", "");
    r.tags = json::array();
    CHECK(fails(reg->create_device(r)).message ==
          "registry: tags: must be a JSON object, not array");
    r.tags = {{"big", std::string(fleet_registry::max_document_bytes, 'x')}};
    CHECK_THAT(fails(reg->create_device(r)).message, Catch::StartsWith("registry: tags: "));
    CHECK_FALSE(reg->get_device("x").ok());
  }
  SECTION("get of an unknown id") {
    auto e = fails(reg->get_device("nope"));
    CHECK(e.code == errc::not_found);
    CHECK(e.message == "registry: device 'nope' is not registered");
  }
}

TEST_CASE("registry: the tree is at most max_tree_depth deep", "[registry]") {
  temp_dir tmp;
  manual_clock clk;
  auto reg = open_ok(tmp.path, clk);
  std::string parent = hub;
  for (int i = 1; i <= fleet_registry::max_tree_depth; ++i) {
    const std::string id = "g" + std::to_string(i);
    ok(reg->create_device(gateway(id, parent)));
    parent = id;
  }
  auto e = fails(reg->create_device(leaf("too-deep", parent)));
  CHECK_THAT(e.message, Catch::Contains("the tree is at most 32 levels deep"));
  CHECK(ok(reg->path_to(parent)).size() == 33);
}

TEST_CASE("registry: delete refuses a node with children and removes twins and statuses",
          "[registry]") {
  temp_dir tmp;
  manual_clock clk;
  auto reg = open_ok(tmp.path, clk);
  build_tree(*reg);

  auto e = fails(reg->delete_device("g1"));
  CHECK(e.code == errc::invalid_argument);
  CHECK(e.message == "registry: device 'g1' has children (d2, g2); delete them first");
  CHECK(fails(reg->delete_device("nope")).code == errc::not_found);

  ok(reg->patch_desired("g4", "", {{"a", 1}}));
  ok(reg->patch_reported("g4", "$edgeAgent", {{"b", 2}}));
  ok(reg->create_deployment(deployment("dep", "*", 1)));
  ok(reg->set_status({"dep", "g4", "applied", "", 0}));

  ok(reg->delete_device("d3"));
  ok(reg->delete_device("g4"));
  CHECK(fails(reg->get_device("g4")).code == errc::not_found);
  CHECK(ok(reg->statuses_of("dep")).empty());
  CHECK(unit_test::query_int(reg->path(), "SELECT count(*) FROM twins WHERE device = 'g4'") == 0);

  // Leaves first, then their parents.
  for (const char* id : {"d1", "g3", "g2", "d2", "g1"})
    ok(reg->delete_device(id));
  CHECK(ok(reg->list_devices()).empty());
}

TEST_CASE("registry: tags are replaced or merge-patched; last seen only moves forward",
          "[registry]") {
  temp_dir tmp;
  manual_clock clk;
  auto reg = open_ok(tmp.path, clk);
  ok(reg->create_device(gateway("g1", "", {{"site", "a"}, {"line", 1}})));

  clk.advance(1s);
  auto r = ok(reg->patch_tags("g1", {{"line", nullptr}, {"zone", {{"x", 1}}}}));
  CHECK(r.tags == json({{"site", "a"}, {"zone", {{"x", 1}}}}));
  CHECK(r.updated_ms == r.created_ms + 1000);
  r = ok(reg->patch_tags("g1", {{"zone", {{"y", 2}}}}));
  CHECK(r.tags == json({{"site", "a"}, {"zone", {{"x", 1}, {"y", 2}}}}));
  r = ok(reg->set_tags("g1", {{"only", true}}));
  CHECK(r.tags == json({{"only", true}}));
  CHECK(ok(reg->get_device("g1")).tags == json({{"only", true}}));

  CHECK(fails(reg->set_tags("g1", json("x"))).message ==
        "registry: tags: must be a JSON object, not string");
  CHECK(fails(reg->patch_tags("g1", json::array())).message ==
        "registry: tags patch: must be a JSON object, not array");
  CHECK(fails(reg->set_tags("nope", json::object())).code == errc::not_found);
  CHECK(fails(reg->patch_tags("nope", json::object())).code == errc::not_found);

  ok(reg->touch_last_seen("g1", 5000));
  ok(reg->touch_last_seen("g1", 4000));
  CHECK(ok(reg->get_device("g1")).last_seen_ms == 5000);
  ok(reg->touch_last_seen("g1", 6000));
  CHECK(ok(reg->get_device("g1")).last_seen_ms == 6000);
  CHECK(fails(reg->touch_last_seen("nope", 1)).code == errc::not_found);
}

TEST_CASE("registry: children, subtree, in_subtree, path_to and next_hop on a 4-level tree",
          "[registry]") {
  temp_dir tmp;
  manual_clock clk;
  auto reg = open_ok(tmp.path, clk);
  build_tree(*reg);
  using strings = std::vector<std::string>;

  CHECK(ids(ok(reg->children(hub))) == strings{"g1", "g4"});
  CHECK(ids(ok(reg->children("g1"))) == strings{"d2", "g2"});
  CHECK(ok(reg->children("d1")).empty());
  CHECK(fails(reg->children("nope")).code == errc::not_found);

  CHECK(ids(ok(reg->subtree(hub))) == strings{"d1", "d2", "d3", "g1", "g2", "g3", "g4"});
  CHECK(ids(ok(reg->subtree("g1"))) == strings{"d1", "d2", "g2", "g3"});
  CHECK(ids(ok(reg->subtree("g2"))) == strings{"d1", "g3"});
  CHECK(ok(reg->subtree("d1")).empty());
  CHECK(fails(reg->subtree("nope")).code == errc::not_found);

  CHECK(ok(reg->in_subtree("g1", "g1")));
  CHECK(ok(reg->in_subtree("g1", "d1")));
  CHECK(ok(reg->in_subtree("g2", "d1")));
  CHECK(ok(reg->in_subtree(hub, "d3")));
  CHECK(ok(reg->in_subtree(hub, hub)));
  CHECK_FALSE(ok(reg->in_subtree("g1", "g4")));  // sibling
  CHECK_FALSE(ok(reg->in_subtree("g1", "d3")));  // sibling's child
  CHECK_FALSE(ok(reg->in_subtree("g2", "d2")));  // the parent's other child
  CHECK_FALSE(ok(reg->in_subtree("g2", "g1")));  // an ancestor
  CHECK_FALSE(ok(reg->in_subtree("g1", hub)));
  CHECK_FALSE(ok(reg->in_subtree("g1", "nope")));
  CHECK_FALSE(ok(reg->in_subtree("nope", "d1")));

  CHECK(ok(reg->path_to("d1")) == strings{hub, "g1", "g2", "g3", "d1"});
  CHECK(ok(reg->path_to("g4")) == strings{hub, "g4"});
  CHECK(ok(reg->path_to(hub)) == strings{hub});
  CHECK(fails(reg->path_to("nope")).code == errc::not_found);

  CHECK(ok(reg->next_hop(hub, "d1")) == std::optional<std::string>("g1"));
  CHECK(ok(reg->next_hop("g1", "d1")) == std::optional<std::string>("g2"));
  CHECK(ok(reg->next_hop("g2", "d1")) == std::optional<std::string>("g3"));
  CHECK(ok(reg->next_hop("g3", "d1")) == std::optional<std::string>("d1"));
  CHECK(ok(reg->next_hop(hub, "g1")) == std::optional<std::string>("g1"));
  CHECK(ok(reg->next_hop("g1", "d2")) == std::optional<std::string>("d2"));
  CHECK(ok(reg->next_hop(hub, "d3")) == std::optional<std::string>("g4"));
  CHECK_FALSE(ok(reg->next_hop("d1", "d1")).has_value());
  CHECK_FALSE(ok(reg->next_hop("g4", "d1")).has_value());  // not below g4
  CHECK_FALSE(ok(reg->next_hop("g2", "g1")).has_value());  // above, not below
  CHECK_FALSE(ok(reg->next_hop(hub, "nope")).has_value());
}

TEST_CASE("registry: a gateway's scope is exported and replaces a gateway's cache", "[registry]") {
  temp_dir hub_dir;
  temp_dir gw_dir;
  manual_clock clk;
  auto central = open_ok(hub_dir.path, clk);
  build_tree(*central);
  device_record sas = leaf("d4", "g2");
  sas.auth = "sas";
  sas.primary_key = "key";
  ok(central->create_device(sas));

  auto scope = ok(central->export_subtree("g1"));
  CHECK(ids(scope) == std::vector<std::string>{"g1", "d1", "d2", "d4", "g2", "g3"});
  CHECK(scope[0].parent == hub);
  CHECK(fails(central->export_subtree("d1")).code == errc::invalid_argument);
  CHECK(fails(central->export_subtree("nope")).code == errc::not_found);

  // On the gateway g1 the registry's root is g1 itself.
  auto cache = open_ok(gw_dir.path, clk, "g1");
  ok(cache->replace_scope("g1", scope));
  auto local = ok(cache->list_devices());
  REQUIRE(local.size() == scope.size());
  for (const auto& d : scope)
    CHECK(ok(cache->get_device(d.id)) == d);
  CHECK(ok(cache->get_device("d4")).primary_key == "key");
  CHECK(ok(cache->in_subtree("g1", "d1")));
  CHECK(ok(cache->path_to("d1")) == std::vector<std::string>{"g1", "g2", "g3", "d1"});
  CHECK(ok(cache->next_hop("g1", "d1")) == std::optional<std::string>("g2"));
  CHECK(ids(ok(cache->children("g1"))) == std::vector<std::string>{"d2", "g2"});

  // Local state: a twin of d2 and a newer last-seen of d1.
  ok(cache->patch_reported("d2", "", {{"x", 1}}));
  ok(cache->patch_reported("d1", "", {{"y", 1}}));
  ok(cache->touch_last_seen("d1", 9000));

  // The hub deletes d2 and adds d5; the next sync drops d2 with its twin.
  ok(central->delete_device("d2"));
  ok(central->create_device(leaf("d5", "g3")));
  ok(central->touch_last_seen("d1", 100));
  ok(cache->replace_scope("g1", ok(central->export_subtree("g1"))));
  CHECK(ids(ok(cache->list_devices())) ==
        std::vector<std::string>{"d1", "d4", "d5", "g1", "g2", "g3"});
  CHECK(ok(cache->get_device("d1")).last_seen_ms == 9000);  // the later one is kept
  CHECK(ok(cache->get_twin("d1", "")).reported == json({{"y", 1}}));
  CHECK(unit_test::query_int(cache->path(), "SELECT count(*) FROM twins WHERE device = 'd2'") == 0);

  SECTION("bad scopes are refused and change nothing") {
    auto good = ok(central->export_subtree("g1"));
    auto e = fails(cache->replace_scope("g2", good));
    CHECK_THAT(e.message, Catch::StartsWith("registry: replace_scope: gateway_id 'g2' is not"));

    auto without_gw = std::vector<device_record>(good.begin() + 1, good.end());
    CHECK_THAT(fails(cache->replace_scope("g1", without_gw)).message,
               Catch::Contains("do not include the gateway 'g1'"));

    // Why replace_scope("g1", ...) refuses `good` with `extra` added.
    auto refusal_with = [&](const std::vector<device_record>& extra) {
      auto records = good;
      records.insert(records.end(), extra.begin(), extra.end());
      return fails(cache->replace_scope("g1", records)).message;
    };
    CHECK_THAT(refusal_with({leaf("lost", "elsewhere")}),
               Catch::Contains("device 'lost': parent 'elsewhere' is not in the records"));
    CHECK_THAT(refusal_with({gateway("c1", "c2"), gateway("c2", "c1")}),
               Catch::Contains("form a cycle"));
    CHECK_THAT(refusal_with({good.back()}), Catch::Contains("appears more than once"));
    CHECK_THAT(refusal_with({leaf("x", "d1")}), Catch::Contains("parent 'd1' is a device"));

    auto bad_field = good;
    bad_field.back().kind = "other";
    CHECK_THAT(fails(cache->replace_scope("g1", bad_field)).message,
               Catch::StartsWith("registry: replace_scope: kind: "));

    CHECK(ids(ok(cache->list_devices())) ==
          std::vector<std::string>{"d1", "d4", "d5", "g1", "g2", "g3"});
  }
}

TEST_CASE("registry: twins keep versions; merge patches delete keys with null", "[registry]") {
  temp_dir tmp;
  manual_clock clk;
  auto reg = open_ok(tmp.path, clk);
  build_tree(*reg);

  auto t = ok(reg->get_twin("g1", "$edgeAgent"));
  CHECK(t.device == "g1");
  CHECK(t.module == "$edgeAgent");
  CHECK(t.desired == json::object());
  CHECK(t.reported == json::object());
  CHECK(t.desired_version == 0);
  CHECK(t.reported_version == 0);
  CHECK(ok(reg->list_twins("g1")).empty());

  clk.advance(1s);
  t = ok(reg->patch_desired("g1", "filter", {{"threshold", 10}, {"mode", {{"a", 1}, {"b", 2}}}}));
  CHECK(t.desired_version == 1);
  CHECK(t.desired_updated_ms == clk.wall_ms());
  CHECK(t.reported_version == 0);
  t = ok(reg->patch_desired("g1", "filter", {{"threshold", nullptr}, {"mode", {{"b", nullptr}}}}));
  CHECK(t.desired == json({{"mode", {{"a", 1}}}}));
  CHECK(t.desired_version == 2);
  t = ok(reg->set_desired("g1", "filter", {{"fresh", true}}));
  CHECK(t.desired == json({{"fresh", true}}));
  CHECK(t.desired_version == 3);
  CHECK(ok(reg->get_twin("g1", "filter")) == t);

  clk.advance(1s);
  t = ok(reg->patch_reported("g1", "filter", {{"temp", 20}}));
  CHECK(t.reported_version == 1);
  CHECK(t.reported_updated_ms == clk.wall_ms());
  CHECK(t.desired_version == 3);
  t = ok(reg->patch_reported("g1", "filter", {{"temp", 21}, {"ok", true}}));
  CHECK(t.reported == json({{"temp", 21}, {"ok", true}}));
  CHECK(t.reported_version == 2);

  // A resync keeps whichever version is newer.
  t = ok(reg->set_reported_full("g1", "filter", {{"old", 1}}, 1));
  CHECK(t.reported == json({{"temp", 21}, {"ok", true}}));
  CHECK(t.reported_version == 2);
  t = ok(reg->set_reported_full("g1", "filter", {{"new", 1}}, 7));
  CHECK(t.reported == json({{"new", 1}}));
  CHECK(t.reported_version == 7);
  CHECK(ok(reg->get_twin("g1", "filter")).reported_version == 7);

  // The device twin (module ""), and a twin of the root itself.
  ok(reg->patch_desired("d1", "", {{"interval", 5}}));
  ok(reg->patch_desired(hub, "$edgeHub", {{"routes", json::object()}}));
  CHECK(ok(reg->get_twin(hub, "$edgeHub")).desired_version == 1);
  ok(reg->patch_reported("g1", "$edgeAgent", {{"modules", json::object()}}));
  std::vector<std::string> modules;
  for (const auto& tw : ok(reg->list_twins("g1")))
    modules.push_back(tw.module);
  CHECK(modules == std::vector<std::string>{"$edgeAgent", "filter"});

  SECTION("bad input") {
    CHECK(fails(reg->patch_desired("g1", "filter", json::array())).message ==
          "registry: desired patch: must be a JSON object, not array");
    CHECK(fails(reg->patch_reported("g1", "filter", json(3))).message ==
          "registry: reported patch: must be a JSON object, not number");
    CHECK(fails(reg->set_desired("g1", "filter", json())).message ==
          "registry: desired: must be a JSON object, not null");
    CHECK(fails(reg->get_twin("nope", "")).code == errc::not_found);
    CHECK(fails(reg->patch_desired("nope", "", json::object())).code == errc::not_found);
    CHECK(fails(reg->list_twins("nope")).code == errc::not_found);
    auto e = fails(reg->get_twin("g1", "bad/module"));
    CHECK(e.code == errc::invalid_argument);
    CHECK_THAT(e.message, Catch::StartsWith("registry: module: 'bad/module'"));
    CHECK(fails(reg->get_twin("g1", "$other")).code == errc::invalid_argument);
    CHECK(fails(reg->set_reported_full("g1", "filter", json::object(), -1)).code ==
          errc::invalid_argument);

    // Documents over 32 KiB.
    const json big = {{"blob", std::string(fleet_registry::max_document_bytes, 'x')}};
    e = fails(reg->patch_desired("g1", "filter", big));
    CHECK_THAT(e.message, Catch::StartsWith("registry: desired properties of 'g1/filter': ") &&
                            Catch::EndsWith(" bytes of JSON, more than 32768"));
    CHECK_THAT(fails(reg->set_reported_full("g1", "filter", big, 99)).message,
               Catch::StartsWith("registry: reported properties of 'g1/filter'"));
    // Growing past the limit patch by patch fails too; nothing changes.
    const json half = {{"h1", std::string(fleet_registry::max_document_bytes / 2, 'x')}};
    const json other = {{"h2", std::string(fleet_registry::max_document_bytes / 2, 'x')}};
    ok(reg->patch_desired("g1", "filter", half));
    fails(reg->patch_desired("g1", "filter", other));
    CHECK(ok(reg->get_twin("g1", "filter")).desired_version == 4);

    // Nesting deeper than the limit.
    json deep = json::object();
    for (int i = 0; i < fleet_registry::max_document_depth + 1; ++i)
      deep = json{{"a", deep}};
    CHECK_THAT(fails(reg->patch_desired("g1", "filter", deep)).message,
               Catch::Contains("nested deeper than 32 levels"));
  }
}

TEST_CASE("registry: everything survives a close and reopen", "[registry]") {
  temp_dir tmp;
  manual_clock clk;
  std::vector<device_record> devices;
  twin_record twin;
  deployment_record dep;
  deployment_status st;
  {
    auto reg = open_ok(tmp.path, clk);
    build_tree(*reg);
    ok(reg->patch_tags("g2", {{"site", "b"}}));
    ok(reg->touch_last_seen("d1", 1234));
    ok(reg->patch_desired("g2", "m", {{"k", "v"}}));
    twin = ok(reg->patch_reported("g2", "m", {{"r", 1}}));
    dep = ok(reg->create_deployment(deployment("dep1", "tags.site = 'b'", 5)));
    st = ok(reg->set_status({"dep1", "g2", "failed", "module m: exit 1", 0}));
    devices = ok(reg->list_devices());
  }
  auto reg = open_ok(tmp.path, clk);
  CHECK(ok(reg->list_devices()) == devices);
  CHECK(ok(reg->get_twin("g2", "m")) == twin);
  CHECK(ok(reg->get_deployment("dep1")) == dep);
  CHECK(ok(reg->statuses_of("dep1")) == std::vector<deployment_status>{st});
  CHECK(ok(reg->assignments()) == std::map<std::string, std::string>{{"g2", "dep1"}});
  CHECK(ok(reg->path_to("d1")) == std::vector<std::string>{hub, "g1", "g2", "g3", "d1"});
}

TEST_CASE("registry: deployments are validated and stored", "[registry]") {
  temp_dir tmp;
  manual_clock clk;
  auto reg = open_ok(tmp.path, clk);

  auto d = ok(reg->create_deployment(deployment("base", "*", 0)));
  CHECK(d.created_ms == clk.wall_ms());
  CHECK(ok(reg->get_deployment("base")) == d);

  auto e = fails(reg->create_deployment(deployment("base", "*", 1)));
  CHECK(e.code == errc::already_exists);
  CHECK(e.message == "registry: deployment 'base': already exists");

  e = fails(reg->create_deployment(deployment("x", "tags.site = ", 1)));
  CHECK(e.code == errc::invalid_argument);
  CHECK(e.message ==
        "registry: deployment 'x': target condition: column 13: expected a value (a string, "
        "number, true, false or null), found the end of the condition");

  e = fails(reg->create_deployment(deployment("x", "*", 1, "{not json")));
  CHECK_THAT(e.message,
             Catch::StartsWith("registry: deployment 'x': manifest_json: not valid JSON"));
  CHECK_THAT(fails(reg->create_deployment(deployment("x", "*", 1, "[1]"))).message,
             Catch::EndsWith("manifest_json: must be a JSON object, not array"));
  CHECK_THAT(fails(reg->create_deployment(deployment("x", "*", -1))).message,
             Catch::EndsWith("priority: must be >= 0, not -1"));
  CHECK_THAT(fails(reg->create_deployment(deployment("bad id", "*", 1))).message,
             Catch::StartsWith("registry: id: 'bad id'"));
  const std::string big =
    "{\"a\": \"" + std::string(fleet_registry::max_document_bytes, 'x') + "\"}";
  CHECK_THAT(fails(reg->create_deployment(deployment("x", "*", 1, big))).message,
             Catch::Contains("manifest_json: 32777 bytes, more than 32768"));

  ok(reg->create_deployment(deployment("a-first", "*", 0)));
  std::vector<std::string> names;
  for (const auto& dep : ok(reg->list_deployments()))
    names.push_back(dep.id);
  CHECK(names == std::vector<std::string>{"a-first", "base"});

  ok(reg->delete_deployment("base"));
  CHECK(fails(reg->get_deployment("base")).code == errc::not_found);
  CHECK(fails(reg->delete_deployment("base")).code == errc::not_found);
}

TEST_CASE("registry: the highest-priority matching deployment applies to each gateway",
          "[registry]") {
  temp_dir tmp;
  manual_clock clk;
  auto reg = open_ok(tmp.path, clk);
  ok(reg->create_device(gateway("gw-a", "", {{"site", "plant-1"}, {"line", 3}})));
  ok(reg->create_device(gateway("gw-b", "", {{"site", "plant-2"}})));
  ok(reg->create_device(gateway("gw-c", "")));
  ok(reg->create_device(leaf("sensor", "gw-a")));
  using assignment = std::map<std::string, std::string>;

  CHECK(ok(reg->assignments()).empty());
  CHECK_FALSE(ok(reg->deployment_for(ok(reg->get_device("gw-a")))).has_value());

  ok(reg->create_deployment(deployment("all", "*", 0)));
  clk.advance(1s);
  ok(reg->create_deployment(deployment("plant1", "tags.site = 'plant-1'", 10)));
  clk.advance(1s);
  ok(reg->create_deployment(deployment("line3", "tags.site = 'plant-1' AND tags.line = 3", 5)));

  CHECK(ok(reg->assignments()) == assignment{{"gw-a", "plant1"}, {"gw-b", "all"}, {"gw-c", "all"}});
  auto for_a = ok(reg->deployment_for(ok(reg->get_device("gw-a"))));
  REQUIRE(for_a.has_value());
  CHECK(for_a->id == "plant1");
  // Leaf devices run no deployments.
  CHECK_FALSE(ok(reg->deployment_for(ok(reg->get_device("sensor")))).has_value());

  SECTION("a tie on priority goes to the newest, then the smallest id") {
    clk.advance(1s);
    ok(reg->create_deployment(deployment("plant1-v2", "tags.site = 'plant-1'", 10)));
    CHECK(ok(reg->assignments()).at("gw-a") == "plant1-v2");
    ok(reg->create_deployment(deployment("plant1-v0", "tags.site = 'plant-1'", 10)));
    CHECK(ok(reg->assignments()).at("gw-a") == "plant1-v0");  // same time: smaller id
  }
  SECTION("a tag change moves a gateway to another deployment") {
    ok(reg->patch_tags("gw-b", {{"site", "plant-1"}}));
    CHECK(ok(reg->assignments()).at("gw-b") == "plant1");
    ok(reg->set_tags("gw-a", {{"site", "plant-9"}}));
    CHECK(ok(reg->assignments()).at("gw-a") == "all");
    auto a = ok(reg->get_device("gw-a"));
    CHECK(ok(reg->deployment_for(a))->id == "all");
  }
  SECTION("deleting a deployment moves its gateways to the next one") {
    ok(reg->delete_deployment("plant1"));
    CHECK(ok(reg->assignments()).at("gw-a") == "line3");
    ok(reg->delete_deployment("line3"));
    CHECK(ok(reg->assignments()).at("gw-a") == "all");
    ok(reg->delete_deployment("all"));
    CHECK(ok(reg->assignments()).empty());
  }
  SECTION("deviceId conditions") {
    ok(reg->create_deployment(deployment("only-c", "deviceId = 'gw-c'", 1)));
    CHECK(ok(reg->assignments()) ==
          assignment{{"gw-a", "plant1"}, {"gw-b", "all"}, {"gw-c", "only-c"}});
  }
}

TEST_CASE("registry: per-device deployment statuses", "[registry]") {
  temp_dir tmp;
  manual_clock clk;
  auto reg = open_ok(tmp.path, clk);
  build_tree(*reg);
  ok(reg->create_deployment(deployment("dep1", "*", 1)));
  ok(reg->create_deployment(deployment("dep2", "*", 2)));

  auto s1 = ok(reg->set_status({"dep1", "g1", "applied", "", 42}));
  CHECK(s1.updated_ms == clk.wall_ms());  // stamped by the registry
  ok(reg->set_status({"dep1", "g2", "applied", "", 0}));
  clk.advance(1s);
  auto s2 = ok(reg->set_status({"dep1", "g2", "succeeded", "", 0}));
  clk.advance(1s);
  auto s3 = ok(reg->set_status({"dep2", "g2", "failed", "module m: exit code 3", 0}));

  CHECK(ok(reg->statuses_of("dep1")) == std::vector<deployment_status>{s1, s2});
  CHECK(ok(reg->statuses_of("dep2")) == std::vector<deployment_status>{s3});
  CHECK(ok(reg->status_of("g2")) == std::vector<deployment_status>{s3, s2});  // newest first
  CHECK(ok(reg->status_of("g3")).empty());

  CHECK_THAT(fails(reg->set_status({"dep1", "g1", "done", "", 0})).message,
             Catch::StartsWith("registry: status: must be 'applied', 'succeeded' or 'failed'"));
  CHECK(fails(reg->set_status({"nope", "g1", "applied", "", 0})).code == errc::not_found);
  CHECK(fails(reg->set_status({"dep1", "nope", "applied", "", 0})).code == errc::not_found);

  ok(reg->delete_deployment("dep1"));
  CHECK(ok(reg->statuses_of("dep1")).empty());
  CHECK(ok(reg->status_of("g2")) == std::vector<deployment_status>{s3});
}
