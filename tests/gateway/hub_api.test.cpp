// Unit test of the hub's REST API (gateway/hub_api) and its client
// (gateway/hub_client): an http_server on an io_thread (loopback, port 0) with
// add_hub_routes over an in-memory hub_control, driven by hub_client on the
// test thread; one case over HTTPS with certificates from gateway/certs.
#include "gateway/hub_api.hpp"

#include "gateway/certs.hpp"
#include "gateway/http_server.hpp"
#include "gateway/hub_client.hpp"
#include "gateway/hub_control.hpp"
#include "gateway/io_thread.hpp"
#include "gateway/tls.hpp"

#include "temp_dir.hpp"

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

using namespace canopy;
using namespace std::chrono_literals;
using json = nlohmann::json;

namespace {

/// An in-memory hub: devices, twins, deployments and telemetry in maps. Answers
/// at once on the calling thread, except invoke(), which answers from a thread
/// of its own (as the real hub answers from an actor's thread).
class fake_hub final : public hub_control {
 public:
  ~fake_hub() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& t : threads_)
      t.join();
  }

  void device_create(device_record rec, reply_fn<device_record> done) override {
    std::lock_guard<std::mutex> lock(mutex_);
    if (devices_.count(rec.id) != 0) {
      return done(
        make_error(errc::already_exists, "registry: device '" + rec.id + "' exists already"));
    }
    if (rec.parent.empty())
      rec.parent = "hub";
    if (rec.parent != "hub" && devices_.count(rec.parent) == 0)
      return done(
        make_error(errc::not_found, "registry: parent: '" + rec.parent + "' is not registered"));
    rec.created_ms = rec.updated_ms = 1000;
    devices_[rec.id] = rec;
    done(rec);
  }
  void device_list(reply_fn<std::vector<device_record>> done) override {
    std::lock_guard<std::mutex> lock(mutex_);
    std::vector<device_record> out;
    for (const auto& [id, d] : devices_)
      out.push_back(d);
    done(out);
  }
  void device_get(std::string id, reply_fn<device_record> done) override {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = devices_.find(id);
    if (it == devices_.end())
      return done(not_found(id));
    done(it->second);
  }
  void device_delete(std::string id, reply_fn<void> done) override {
    std::lock_guard<std::mutex> lock(mutex_);
    if (devices_.erase(id) == 0)
      return done(not_found(id));
    done(expected<void>{});
  }
  void device_set_tags(std::string id, nlohmann::json tags, reply_fn<device_record> done) override {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = devices_.find(id);
    if (it == devices_.end())
      return done(not_found(id));
    it->second.tags = std::move(tags);
    it->second.updated_ms = 2000;
    done(it->second);
  }

  void deployment_create(deployment_record rec, reply_fn<deployment_record> done) override {
    std::lock_guard<std::mutex> lock(mutex_);
    if (deployments_.count(rec.id) != 0)
      return done(
        make_error(errc::already_exists, "registry: deployment '" + rec.id + "' exists already"));
    rec.created_ms = 3000;
    deployments_[rec.id] = rec;
    done(rec);
  }
  void deployment_list(reply_fn<std::vector<deployment_summary>> done) override {
    std::lock_guard<std::mutex> lock(mutex_);
    std::vector<deployment_summary> out;
    for (const auto& [id, d] : deployments_)
      out.push_back(summary(d));
    done(out);
  }
  void deployment_get(std::string id, reply_fn<deployment_summary> done) override {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = deployments_.find(id);
    if (it == deployments_.end())
      return done(make_error(errc::not_found, "registry: no deployment '" + id + "'"));
    done(summary(it->second));
  }
  void deployment_delete(std::string id, reply_fn<void> done) override {
    std::lock_guard<std::mutex> lock(mutex_);
    if (deployments_.erase(id) == 0)
      return done(make_error(errc::not_found, "registry: no deployment '" + id + "'"));
    done(expected<void>{});
  }

  void twin_get(std::string device, std::string module, reply_fn<twin_record> done) override {
    std::lock_guard<std::mutex> lock(mutex_);
    if (devices_.count(device) == 0)
      return done(not_found(device));
    done(twin(device, module));
  }
  void twin_patch(std::string device, std::string module, nlohmann::json patch,
                  reply_fn<twin_record> done) override {
    std::lock_guard<std::mutex> lock(mutex_);
    if (devices_.count(device) == 0)
      return done(not_found(device));
    auto& t = twin(device, module);
    t.desired.merge_patch(patch);
    ++t.desired_version;
    t.desired_updated_ms = 4000;
    last_patch_ = patch;
    done(t);
  }

  void invoke(std::string device, std::string module, std::string method, std::string payload_json,
              std::chrono::milliseconds timeout, reply_fn<method_reply> done) override {
    std::lock_guard<std::mutex> lock(mutex_);
    bool known = devices_.count(device) != 0;
    threads_.emplace_back([=, done = std::move(done)] {
      std::this_thread::sleep_for(5ms);
      if (!known)
        return done(make_error(errc::not_found, "no device '" + device + "'"));
      if (method == "slow")
        return done(make_error(errc::timeout, "method 'slow' did not answer within " +
                                                std::to_string(timeout.count()) + " ms"));
      method_reply r;
      r.status = method == "fail" ? 500 : 200;
      r.payload_json = json{{"module", module},
                            {"method", method},
                            {"payload", json::parse(payload_json)},
                            {"timeoutMs", timeout.count()}}
                         .dump();
      done(r);
    });
  }

  void status(reply_fn<std::vector<fleet_node>> done) override {
    std::lock_guard<std::mutex> lock(mutex_);
    std::vector<fleet_node> out;
    for (const auto& [id, d] : devices_) {
      fleet_node n;
      n.device = d;
      n.connected = d.kind == "gateway";
      n.last_seen_ms = 5000;
      if (d.kind == "gateway") {
        n.deployment = "dep1";
        n.deployment_status = "succeeded";
        module_row m;
        m.name = "filter";
        m.type = "actor";
        m.status = "running";
        m.desired_status = "running";
        m.restart_policy = "always";
        m.restart_count = 2;
        m.last_start_ms = 4500;
        n.modules.push_back(m);
      }
      out.push_back(n);
    }
    done(out);
  }

  void telemetry(std::string device, std::int64_t since_ms, std::int64_t after_seq,
                 std::size_t limit, reply_fn<std::vector<telemetry_record>> done) override {
    std::lock_guard<std::mutex> lock(mutex_);
    std::vector<telemetry_record> out;
    for (const auto& r : telemetry_) {
      if ((device.empty() || r.device == device) && r.enqueued_ms >= since_ms &&
          r.seq > after_seq && out.size() < limit) {
        out.push_back(r);
      }
    }
    done(out);
  }

  /// Test side: a telemetry record to serve.
  void add_telemetry(telemetry_record r) {
    std::lock_guard<std::mutex> lock(mutex_);
    telemetry_.push_back(std::move(r));
  }

  /// Test side: the patch the last twin_patch() got.
  json last_patch() {
    std::lock_guard<std::mutex> lock(mutex_);
    return last_patch_;
  }

 private:
  static error not_found(const std::string& id) {
    return make_error(errc::not_found, "registry: device '" + id + "' is not registered");
  }

  twin_record& twin(const std::string& device, const std::string& module) {
    auto& t = twins_[{device, module}];
    t.device = device;
    t.module = module;
    return t;
  }

  static deployment_summary summary(const deployment_record& d) {
    deployment_summary s;
    s.deployment = d;
    s.targeted = {"gw1", "gw2"};
    s.succeeded = {"gw1"};
    s.failed = {"gw2"};
    s.statuses.push_back({d.id, "gw1", "succeeded", "", 3500});
    s.statuses.push_back({d.id, "gw2", "failed", "filter: exited with 1", 3600});
    return s;
  }

  std::mutex mutex_;
  std::map<std::string, device_record> devices_;
  std::map<std::pair<std::string, std::string>, twin_record> twins_;
  std::map<std::string, deployment_record> deployments_;
  std::vector<telemetry_record> telemetry_;
  std::vector<std::thread> threads_;
  json last_patch_;
};

/// An io_thread, a fake hub and an http_server with the hub's routes on
/// 127.0.0.1:<any port>.
struct api_fixture {
  explicit api_fixture(std::string token = "", kj::TlsContext* tls = nullptr) {
    REQUIRE(io.start());
    http_options opts;
    opts.listen = "127.0.0.1:0";
    opts.bearer_token = std::move(token);
    opts.tls = tls;
    server = std::make_unique<http_server>(opts);
    add_hub_routes(*server, hub);
    REQUIRE(server->start(io));
  }
  ~api_fixture() {
    server->stop();
    io.stop();
  }

  std::string url() const { return "http://127.0.0.1:" + std::to_string(server->port()); }

  /// A plain-HTTP client of this server.
  std::unique_ptr<hub_client> client(std::string token = "") const {
    hub_client_options o;
    o.url = url();
    o.token = std::move(token);
    o.request_timeout = 5000ms;
    auto c = hub_client::connect(o);
    REQUIRE(c);
    return std::move(*c);
  }

  fake_hub hub;
  io_thread io;
  std::unique_ptr<http_server> server;
};

/// The error text of a failed request (and that it failed).
std::string error_of(const expected<json>& r) {
  REQUIRE_FALSE(r);
  return r.err().message;
}

}  // namespace

TEST_CASE("hub API: create, list, show, tag and delete devices", "[hub_api]") {
  api_fixture f;
  auto c = f.client();

  auto created = c->request(
    "POST", "/devices",
    {{"deviceId", "gw1"}, {"kind", "gateway"}, {"tags", {{"site", "plant-1"}, {"line", 3}}}});
  REQUIRE(created);
  CHECK(c->last_status() == 201);
  CHECK(*created == json{{"deviceId", "gw1"},
                         {"parentId", "hub"},
                         {"kind", "gateway"},
                         {"tags", {{"site", "plant-1"}, {"line", 3}}},
                         {"authentication", {{"type", "x509_ca"}}},
                         {"createdMs", 1000},
                         {"updatedMs", 1000},
                         {"lastSeenMs", 0}});

  auto sensor = c->request("POST", "/devices",
                           {{"deviceId", "plant-1:sensor.7_a"},
                            {"parentId", "gw1"},
                            {"authentication", {{"type", "sas"}, {"primaryKey", "cHJpbWFyeQ=="}}}});
  REQUIRE(sensor);
  CHECK((*sensor)["kind"] == "device");
  CHECK((*sensor)["parentId"] == "gw1");
  CHECK((*sensor)["authentication"] ==
        json{{"type", "sas"}, {"primaryKey", "cHJpbWFyeQ=="}, {"secondaryKey", ""}});

  auto list = c->request("GET", "/devices");
  REQUIRE(list);
  CHECK(c->last_status() == 200);
  REQUIRE(list->size() == 2);
  CHECK((*list)[0]["deviceId"] == "gw1");
  CHECK((*list)[1]["deviceId"] == "plant-1:sensor.7_a");

  // Ids with ':' '.' '-' '_' travel percent-encoded in the path.
  auto shown = c->request("GET", "/devices/" + hub_client::escape("plant-1:sensor.7_a"));
  REQUIRE(shown);
  CHECK(*shown == *sensor);

  auto tagged = c->request("PUT", "/devices/gw1/tags", {{"site", "plant-2"}});
  REQUIRE(tagged);
  CHECK((*tagged)["tags"] == json{{"site", "plant-2"}});
  CHECK((*tagged)["updatedMs"] == 2000);

  auto deleted = c->request("DELETE", "/devices/plant-1:sensor.7_a");
  REQUIRE(deleted);
  CHECK(c->last_status() == 204);
  CHECK(deleted->is_null());
  auto gone = c->request("GET", "/devices/plant-1:sensor.7_a");
  CHECK(error_of(gone) == "registry: device 'plant-1:sensor.7_a' is not registered");
  CHECK(gone.err().code == errc::not_found);
  CHECK(c->last_status() == 404);
}

TEST_CASE("hub API: bad requests answer 400 naming the field, 404 and 409", "[hub_api]") {
  api_fixture f;
  auto c = f.client();
  REQUIRE(c->request("POST", "/devices", {{"deviceId", "gw1"}, {"kind", "gateway"}}));

  auto expect_400 = [&](const json& body, const std::string& text) {
    auto r = c->request("POST", "/devices", body);
    CAPTURE(body.dump());
    CHECK(error_of(r) == text);
    CHECK(r.err().code == errc::invalid_argument);
    CHECK(c->last_status() == 400);
  };
  expect_400({{"deviceId", "d1"}, {"kind", "sensor"}},
             "kind: must be 'gateway' or 'device', got 'sensor'");
  expect_400({{"kind", "device"}}, "deviceId: missing");
  expect_400({{"deviceId", 7}}, "deviceId: must be a string, got number");
  expect_400({{"deviceId", "a b"}}, "deviceId: 'a b' must be 1 to 128 of A-Z a-z 0-9 - . : _");
  expect_400({{"deviceId", "d1"}, {"parent", "gw1"}},
             "parent: unknown field (expected deviceId, parentId, kind, tags, authentication)");
  expect_400({{"deviceId", "d1"}, {"tags", json::array()}},
             "tags: must be a JSON object, got array");
  expect_400({{"deviceId", "d1"}, {"authentication", {{"type", "password"}}}},
             "authentication.type: must be 'x509_ca', 'x509_thumbprint' or 'sas', got 'password'");
  expect_400({{"deviceId", "d1"}, {"authentication", {{"type", "x509_thumbprint"}}}},
             "authentication.thumbprint: required for type 'x509_thumbprint'");
  expect_400(
    {{"deviceId", "d1"}, {"authentication", {{"type", "x509_thumbprint"}, {"thumbprint", "xyz"}}}},
    "authentication.thumbprint: must be 40 (SHA-1) or 64 (SHA-256) hex digits");
  expect_400({{"deviceId", "d1"}, {"authentication", {{"type", "sas"}}}},
             "authentication.primaryKey: required for type 'sas'");
  expect_400({{"deviceId", "d1"}, {"authentication", {{"primaryKey", "k"}}}},
             "authentication.primaryKey: only for type 'sas'");
  expect_400(json::array({1, 2}), "request body: expected a JSON object, got array");

  // A thumbprint device is accepted.
  auto tp = c->request(
    "POST", "/devices",
    {{"deviceId", "d2"},
     {"authentication", {{"type", "x509_thumbprint"}, {"thumbprint", std::string(64, 'A')}}}});
  REQUIRE(tp);
  CHECK((*tp)["authentication"] ==
        json{{"type", "x509_thumbprint"}, {"thumbprint", std::string(64, 'A')}});

  // 409 for a duplicate (errc::already_exists), 404 for an unknown parent.
  auto dup = c->request("POST", "/devices", {{"deviceId", "gw1"}});
  CHECK(error_of(dup) == "registry: device 'gw1' exists already");
  CHECK(dup.err().code == errc::already_exists);
  CHECK(c->last_status() == 409);
  auto orphan = c->request("POST", "/devices", {{"deviceId", "d3"}, {"parentId", "nowhere"}});
  CHECK(error_of(orphan) == "registry: parent: 'nowhere' is not registered");
  CHECK(c->last_status() == 404);

  // Paths: a bad id in the path, an unknown sub-resource, no route at all.
  auto bad_id = c->request("GET", "/devices/" + hub_client::escape("a b"));
  CHECK(error_of(bad_id) == "path: device id 'a b': must be 1 to 128 of A-Z a-z 0-9 - . : _");
  CHECK(c->last_status() == 400);
  auto sub = c->request("GET", "/devices/gw1/whatever");
  CHECK(error_of(sub) == "no such resource: GET /devices/gw1/whatever");
  CHECK(c->last_status() == 404);
  CHECK_FALSE(c->request("GET", "/nothing"));
  CHECK(c->last_status() == 404);
  auto tags = c->request("PUT", "/devices/gw1/tags", json::array());
  CHECK(error_of(tags) == "tags: request body: expected a JSON object, got array");
  auto raw_tags = c->request("PUT", "/devices/gw1/tags", "plant");
  CHECK(error_of(raw_tags) == "tags: request body: expected a JSON object, got string");
}

TEST_CASE("hub API: twins read and patched, device and module", "[hub_api]") {
  api_fixture f;
  auto c = f.client();
  REQUIRE(c->request("POST", "/devices", {{"deviceId", "gw1"}, {"kind", "gateway"}}));

  auto empty = c->request("GET", "/twins/gw1");
  REQUIRE(empty);
  CHECK(*empty ==
        json{{"deviceId", "gw1"},
             {"moduleId", ""},
             {"properties", {{"desired", {{"$version", 0}}}, {"reported", {{"$version", 0}}}}},
             {"desiredUpdatedMs", 0},
             {"reportedUpdatedMs", 0}});

  // Azure's shape: {properties: {desired: {...}}}.
  auto patched = c->request("PATCH", "/twins/gw1/modules/filter",
                            {{"properties", {{"desired", {{"threshold", 30}, {"$version", 7}}}}}});
  REQUIRE(patched);
  CHECK(f.hub.last_patch() == json{{"threshold", 30}});  // "$version" is not patched
  CHECK((*patched)["moduleId"] == "filter");
  CHECK((*patched)["properties"]["desired"] == json{{"threshold", 30}, {"$version", 1}});
  CHECK((*patched)["desiredUpdatedMs"] == 4000);

  // A bare object is the desired patch; null deletes (merge patch).
  patched =
    c->request("PATCH", "/twins/gw1/modules/filter", {{"threshold", nullptr}, {"mode", "fast"}});
  REQUIRE(patched);
  CHECK((*patched)["properties"]["desired"] == json{{"mode", "fast"}, {"$version", 2}});
  auto read = c->request("GET", "/twins/gw1/modules/filter");
  REQUIRE(read);
  CHECK(*read == *patched);

  auto agent = c->request("GET", "/twins/gw1/modules/$edgeAgent");
  REQUIRE(agent);
  CHECK((*agent)["moduleId"] == "$edgeAgent");

  auto reported = c->request("PATCH", "/twins/gw1", {{"properties", {{"reported", {{"x", 1}}}}}});
  CHECK(error_of(reported) ==
        "properties.reported: reported properties are set by the device; patch desired ones");
  auto not_object = c->request("PATCH", "/twins/gw1", {{"properties", {{"desired", 3}}}});
  CHECK(error_of(not_object) == "properties.desired: must be a JSON object, got number");
  auto bad_module = c->request("GET", "/twins/gw1/modules/$bad");
  CHECK(error_of(bad_module) ==
        "path: module '$bad': must be $edgeAgent, $edgeHub or 1 to 64 of A-Z a-z 0-9 _ . -");
  auto bad_path = c->request("GET", "/twins/gw1/filter");
  CHECK(c->last_status() == 404);
  CHECK(error_of(bad_path) == "no such resource: GET /twins/gw1/filter");
  CHECK_FALSE(c->request("GET", "/twins/nobody"));
  CHECK(c->last_status() == 404);
}

TEST_CASE("hub API: direct methods answer {status, payload}, from another thread", "[hub_api]") {
  api_fixture f;
  auto c = f.client();
  REQUIRE(c->request("POST", "/devices", {{"deviceId", "gw1"}, {"kind", "gateway"}}));

  auto r = c->request(
    "POST", "/devices/gw1/modules/filter/methods",
    {{"methodName", "reset"}, {"payload", {{"hard", true}}}, {"responseTimeoutInSeconds", 5}});
  REQUIRE(r);
  CHECK(c->last_status() == 200);
  CHECK(*r == json{{"status", 200},
                   {"payload",
                    {{"module", "filter"},
                     {"method", "reset"},
                     {"payload", {{"hard", true}}},
                     {"timeoutMs", 5000}}}});

  // Defaults: payload null, 30 s.
  r = c->request("POST", "/devices/gw1/modules/$edgeAgent/methods", {{"methodName", "ping"}});
  REQUIRE(r);
  CHECK((*r)["payload"]["payload"].is_null());
  CHECK((*r)["payload"]["timeoutMs"] == 30000);

  // A method's own failure status is an answer, not an error.
  r = c->request("POST", "/devices/gw1/modules/filter/methods", {{"methodName", "fail"}});
  REQUIRE(r);
  CHECK((*r)["status"] == 500);

  r = c->request("POST", "/devices/gw1/modules/filter/methods", {{"methodName", "slow"}});
  CHECK(error_of(r) == "method 'slow' did not answer within 30000 ms");
  CHECK(r.err().code == errc::timeout);
  CHECK(c->last_status() == 504);

  r = c->request("POST", "/devices/gw9/modules/filter/methods", {{"methodName", "reset"}});
  CHECK(r.err().code == errc::not_found);

  r = c->request("POST", "/devices/gw1/modules/filter/methods", {{"payload", 1}});
  CHECK(error_of(r) == "methodName: missing");
  r = c->request("POST", "/devices/gw1/modules/filter/methods",
                 {{"methodName", "x"}, {"responseTimeoutInSeconds", 0}});
  CHECK(error_of(r) == "responseTimeoutInSeconds: must be more than 0 and at most 300");
  r = c->request("POST", "/devices/gw1/modules/filter/methods",
                 {{"methodName", "x"}, {"responseTimeoutInSeconds", "10"}});
  CHECK(error_of(r) == "responseTimeoutInSeconds: must be a number of seconds, got string");
  r = c->request("POST", "/devices/gw1/modules/filter/method", {{"methodName", "x"}});
  CHECK(c->last_status() == 404);
}

TEST_CASE("hub API: telemetry with JSON or base64 bodies, filtered by the query", "[hub_api]") {
  api_fixture f;
  auto add = [&](std::int64_t seq, std::string device, std::string body) {
    telemetry_record r;
    r.seq = seq;
    r.enqueued_ms = 1000 * seq;
    r.device = device;
    r.module = "filter";
    r.output = "alerts";
    r.msg = message_builder()
              .body(body)
              .property("level", "high")
              .content_type("application/json")
              .connection_device_id(device)
              .connection_module_id("filter")
              .build();
    f.hub.add_telemetry(std::move(r));
  };
  add(1, "gw1", R"({"temperature": 21.5})");
  add(2, "gw2", std::string("\xff\x00\x01", 3));
  add(3, "gw1", "not json");
  add(4, "gw1", "");

  auto c = f.client();
  auto all = c->request("GET", "/telemetry");
  REQUIRE(all);
  REQUIRE(all->size() == 4);
  CHECK((*all)[0] == json{{"seq", 1},
                          {"enqueuedMs", 1000},
                          {"deviceId", "gw1"},
                          {"moduleId", "filter"},
                          {"outputName", "alerts"},
                          {"properties", {{"level", "high"}}},
                          {"systemProperties",
                           {{"contentType", "application/json"},
                            {"connectionDeviceId", "gw1"},
                            {"connectionModuleId", "filter"}}},
                          {"body", {{"temperature", 21.5}}}});
  CHECK((*all)[1]["body"] == json{{"base64", "/wAB"}});
  CHECK((*all)[2]["body"] == json{{"base64", "bm90IGpzb24="}});
  CHECK((*all)[3]["body"] == json{{"base64", ""}});

  auto some = c->request("GET", "/telemetry?device=gw1&since=1500&limit=1");
  REQUIRE(some);
  REQUIRE(some->size() == 1);
  CHECK((*some)[0]["seq"] == 3);
  auto after = c->request("GET", "/telemetry?after=3");
  REQUIRE(after);
  REQUIRE(after->size() == 1);
  CHECK((*after)[0]["seq"] == 4);

  CHECK(error_of(c->request("GET", "/telemetry?limit=0")) ==
        "query parameter 'limit': '0' must be an integer from 1 to 10000");
  CHECK(error_of(c->request("GET", "/telemetry?since=10m")) ==
        "query parameter 'since': '10m' must be an integer from 0 to 9223372036854775807");
  CHECK(error_of(c->request("GET", "/telemetry?dev=gw1")) ==
        "query parameter 'dev': unknown (expected device, since, after, limit)");
  CHECK(c->last_status() == 400);
}

TEST_CASE("hub API: deployments and fleet status", "[hub_api]") {
  api_fixture f;
  auto c = f.client();
  json manifest = {{"modules", {{"filter", {{"library", "libfilter.so"}}}}}};
  auto created = c->request("POST", "/deployments",
                            {{"id", "dep1"},
                             {"content", manifest},
                             {"targetCondition", "tags.site='plant-1' AND tags.line=3"},
                             {"priority", 10}});
  REQUIRE(created);
  CHECK(c->last_status() == 201);
  CHECK(*created == json{{"id", "dep1"},
                         {"content", manifest},
                         {"targetCondition", "tags.site='plant-1' AND tags.line=3"},
                         {"priority", 10},
                         {"createdMs", 3000}});

  auto shown = c->request("GET", "/deployments/dep1");
  REQUIRE(shown);
  CHECK((*shown)["targeted"] == json{"gw1", "gw2"});
  CHECK((*shown)["applied"] == json::array());
  CHECK((*shown)["succeeded"] == json{"gw1"});
  CHECK((*shown)["failed"] == json{"gw2"});
  CHECK((*shown)["statuses"][1] == json{{"deviceId", "gw2"},
                                        {"status", "failed"},
                                        {"detail", "filter: exited with 1"},
                                        {"updatedMs", 3600}});
  auto list = c->request("GET", "/deployments");
  REQUIRE(list);
  REQUIRE(list->size() == 1);
  CHECK((*list)[0] == *shown);

  auto dup = c->request("POST", "/deployments",
                        {{"id", "dep1"}, {"content", manifest}, {"targetCondition", "*"}});
  CHECK(dup.err().code == errc::already_exists);
  CHECK(c->last_status() == 409);
  auto bad_condition =
    c->request("POST", "/deployments",
               {{"id", "dep2"}, {"content", manifest}, {"targetCondition", "tags.site ="}});
  CHECK(error_of(bad_condition).rfind("targetCondition: target condition: column ", 0) == 0);
  auto bad_content = c->request("POST", "/deployments",
                                {{"id", "dep2"}, {"content", "x"}, {"targetCondition", "*"}});
  CHECK(error_of(bad_content) ==
        "content: must be a JSON object (the deployment manifest), got string");
  auto bad_priority =
    c->request("POST", "/deployments",
               {{"id", "dep2"}, {"content", manifest}, {"targetCondition", "*"}, {"priority", -1}});
  CHECK(error_of(bad_priority) == "priority: must be 0 to 2147483647");

  REQUIRE(c->request("DELETE", "/deployments/dep1"));
  CHECK(c->last_status() == 204);
  CHECK(c->request("DELETE", "/deployments/dep1").err().code == errc::not_found);

  REQUIRE(c->request("POST", "/devices", {{"deviceId", "gw1"}, {"kind", "gateway"}}));
  REQUIRE(c->request("POST", "/devices", {{"deviceId", "s1"}, {"parentId", "gw1"}}));
  auto status = c->request("GET", "/status");
  REQUIRE(status);
  REQUIRE(status->size() == 2);
  CHECK((*status)[0] == json{{"deviceId", "gw1"},
                             {"parentId", "hub"},
                             {"kind", "gateway"},
                             {"connected", true},
                             {"lastSeenMs", 5000},
                             {"deployment", "dep1"},
                             {"deploymentStatus", "succeeded"},
                             {"modules",
                              {{{"name", "filter"},
                                {"type", "actor"},
                                {"version", ""},
                                {"status", "running"},
                                {"desiredStatus", "running"},
                                {"restartPolicy", "always"},
                                {"restartCount", 2},
                                {"lastStartMs", 4500},
                                {"lastExitMs", 0},
                                {"lastExitReason", ""}}}}});
  CHECK((*status)[1]["parentId"] == "gw1");
  CHECK((*status)[1]["modules"] == json::array());
}

TEST_CASE("hub API: a server with a token answers 401 to a client without it", "[hub_api]") {
  api_fixture f("s3cret");
  {
    auto anonymous = f.client();
    auto r = anonymous->request("GET", "/devices");
    CHECK(error_of(r) == "missing bearer token: send the header 'Authorization: Bearer <token>'");
    CHECK(r.err().code == errc::failed);
    CHECK(anonymous->last_status() == 401);
  }
  {
    auto wrong = f.client("guess");
    CHECK(error_of(wrong->request("GET", "/devices")) == "invalid bearer token");
    CHECK(wrong->last_status() == 401);
  }
  auto authorized = f.client("s3cret");
  auto r = authorized->request("GET", "/devices");
  REQUIRE(r);
  CHECK(*r == json::array());
}

TEST_CASE("hub_client: the connection is kept, and refused connections are reported", "[hub_api]") {
  std::uint16_t port = 0;
  {
    api_fixture f;
    port = f.server->port();
    auto c = f.client();
    for (int i = 0; i < 20; ++i)
      REQUIRE(c->request("GET", "/devices"));
    CHECK(c->url() == f.url());
    CHECK(c->pause(1ms));
  }
  hub_client_options o;
  o.url = "http://127.0.0.1:" + std::to_string(port);
  auto refused = hub_client::connect(o);
  REQUIRE_FALSE(refused);
  CHECK(refused.err().code == errc::unavailable);
  CHECK(refused.err().message.rfind("cannot connect to " + o.url + ": ", 0) == 0);

  o.url = "ftp://hub:21";
  CHECK(
    hub_client::connect(o).err().message ==
    "hub URL 'ftp://hub:21': the scheme must be https:// or http:// (expected https://HOST:PORT)");
  o.url = "https://hub:8443";
  CHECK(hub_client::connect(o).err().message ==
        "hub URL https://hub:8443: https needs the fleet CA certificate (--ca FILE or CANOPY_CA)");
  o.url = "http://hub:0";
  CHECK(hub_client::connect(o).err().code == errc::invalid_argument);
  CHECK(hub_client::escape("plant-1:sensor 7/$x") == "plant-1%3Asensor%207%2F%24x");
}

TEST_CASE("hub API over HTTPS with the fleet's certificates", "[hub_api][tls]") {
  unit_test::temp_dir dir("canopy-hub-api");
  auto ca = certs::create_root_ca("Test fleet root CA", 24h);
  REQUIRE(ca);
  auto hub_identity = certs::issue(*ca, certs::for_id("hub", 24h));
  REQUIRE(hub_identity);
  auto tls = tls_config::from_pem(*hub_identity, ca->cert_pem, tls_role::server);
  REQUIRE(tls);
  std::string ca_path = dir.path + "/ca.crt";
  std::ofstream(ca_path) << ca->cert_pem;

  api_fixture f("s3cret", &(*tls)->context());
  hub_client_options o;
  o.url = "https://127.0.0.1:" + std::to_string(f.server->port()) + "/";
  o.hub_id = "hub";
  o.ca_path = ca_path;
  o.token = "s3cret";
  {
    auto c = hub_client::connect(o);
    REQUIRE(c);
    auto created = (*c)->request("POST", "/devices", {{"deviceId", "gw1"}, {"kind", "gateway"}});
    REQUIRE(created);
    CHECK((*c)->last_status() == 201);
    auto list = (*c)->request("GET", "/devices");
    REQUIRE(list);
    CHECK(list->size() == 1);
  }

  // The hub's certificate does not name "other-hub": the handshake fails.
  o.hub_id = "other-hub";
  auto wrong_name = hub_client::connect(o);
  REQUIRE_FALSE(wrong_name);
  CHECK(wrong_name.err().code == errc::unavailable);

  // A client that trusts another CA refuses the hub.
  auto other_ca = certs::create_root_ca("Other CA", 24h);
  REQUIRE(other_ca);
  std::string other_path = dir.path + "/other.crt";
  std::ofstream(other_path) << other_ca->cert_pem;
  o.hub_id = "hub";
  o.ca_path = other_path;
  auto untrusted = hub_client::connect(o);
  REQUIRE_FALSE(untrusted);
  CHECK(untrusted.err().code == errc::unavailable);

  o.ca_path = dir.path + "/missing.crt";
  CHECK(hub_client::connect(o).err().code == errc::not_found);
}
