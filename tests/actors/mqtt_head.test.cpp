// The actor side of the MQTT port (actors/mqtt_head): a process module's
// session against a recording router, with the channel the server would give.
// Leaf devices (registry, twins, C2D, persistent sessions) are covered with
// real processes and clients in tests/integration/mqtt.test.cpp.
#include "actors/mqtt_head.hpp"

#include "actor_fixture.hpp"
#include "gateway/iothub_protocol.hpp"
#include "runtime/atoms.hpp"
#include "runtime/clock.hpp"
#include "runtime/router.hpp"

#include <caf/all.hpp>
#include <catch2/catch.hpp>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

using namespace canopy;
using namespace std::chrono_literals;

namespace {

/// What the server's channel would write to the client, recorded.
class recording_channel final : public mqtt_channel {
 public:
  std::uint64_t id() const override { return 1; }
  void publish(mqtt::publish_packet p) override {
    std::lock_guard<std::mutex> lock{mtx_};
    published_.push_back(std::move(p));
    cv_.notify_all();
  }
  void close(std::string reason) override {
    std::lock_guard<std::mutex> lock{mtx_};
    closes_.push_back(std::move(reason));
    cv_.notify_all();
  }
  /// The n-th PUBLISH (0-based), waiting up to `wait` for it.
  std::optional<mqtt::publish_packet> nth(std::size_t n, std::chrono::milliseconds wait = 5s) {
    std::unique_lock<std::mutex> lock{mtx_};
    if (!cv_.wait_for(lock, wait, [&] { return published_.size() > n; }))
      return std::nullopt;
    return published_[n];
  }
  bool wait_closed() {
    std::unique_lock<std::mutex> lock{mtx_};
    return cv_.wait_for(lock, 5s, [&] { return !closes_.empty(); });
  }
  std::size_t count() {
    std::lock_guard<std::mutex> lock{mtx_};
    return published_.size();
  }

 private:
  std::mutex mtx_;
  std::condition_variable cv_;
  std::vector<mqtt::publish_packet> published_;
  std::vector<std::string> closes_;
};

/// A router that tells `observer` what it gets and answers injects only on (flush).
caf::behavior holding_router(caf::event_based_actor* self, caf::actor observer) {
  auto held = std::make_shared<std::vector<caf::response_promise>>();
  return {
    [=](atoms::inject, std::vector<routed_message>& batch) {
      held->push_back(self->make_response_promise());
      self->send(observer, atoms::inject::value, batch);
    },
    [=](atoms::flush) {
      for (auto& rp : *held)
        rp.deliver(std::vector<std::uint64_t>{1});
      held->clear();
    },
    [=](atoms::module_up, const std::string& name, const caf::actor& a) {
      self->send(observer, atoms::module_up::value, name, a);
    },
    [=](atoms::delivered, const std::string& receiver, std::uint64_t token) {
      self->send(observer, atoms::delivered::value, receiver, token);
    },
  };
}

template <class T>
struct waiter {
  std::mutex mtx;
  std::condition_variable cv;
  std::optional<T> value;
  void set(T v) {
    std::lock_guard<std::mutex> lock{mtx};
    value = std::move(v);
    cv.notify_all();
  }
  bool wait() {
    std::unique_lock<std::mutex> lock{mtx};
    return cv.wait_for(lock, 5s, [&] { return value.has_value(); });
  }
  bool has() {
    std::lock_guard<std::mutex> lock{mtx};
    return value.has_value();
  }
};

struct head_fixture : unit_test::actor_fixture {
  manual_clock clk;
  caf::actor router;
  std::shared_ptr<mqtt_directory> directory = std::make_shared<mqtt_directory>();
  std::shared_ptr<mqtt_module_keys> keys = std::make_shared<mqtt_module_keys>();
  std::unique_ptr<mqtt_gateway> gateway;

  head_fixture() {
    router = sys->spawn(holding_router, caf::actor{*self});
    mqtt_head_config cfg;
    cfg.node_id = "gw";
    cfg.hub_host = "hub.test";
    cfg.clk = &clk;
    cfg.router = [r = router] { return r; };
    cfg.directory = directory;
    cfg.keys = keys;
    gateway = std::make_unique<mqtt_gateway>(*sys, cfg);
  }
  ~head_fixture() {
    // Sessions live until their connection ends; end the one left.
    if (auto a = directory->find("gw", "mod1"))
      (*self)->send_exit(a, caf::exit_reason::user_shutdown);
    gateway.reset();
    (*self)->send_exit(router, caf::exit_reason::user_shutdown);
  }

  mqtt_connect_info module_connect(const std::string& module, const std::string& key) {
    mqtt_connect_info info;
    info.connection_id = 1;
    info.peer_address = "127.0.0.1:5000";
    info.packet.client_id = "gw/" + module;
    info.packet.username = "hub.test/gw/" + module + "/?api-version=2021-04-12";
    auto token = iothub::make_sas("hub.test/devices/gw/modules/" + module, key, clk.wall_ms() / 1000 + 3600);
    REQUIRE(token);
    info.packet.password = *token;
    return info;
  }

  std::variant<mqtt_accept, mqtt_refusal> connect(mqtt_connect_info info, std::shared_ptr<mqtt_channel> ch) {
    waiter<std::variant<mqtt_accept, mqtt_refusal>> w;
    gateway->connect(std::move(info), std::move(ch), [&](std::variant<mqtt_accept, mqtt_refusal> r) { w.set(r); });
    REQUIRE(w.wait());
    return *w.value;
  }
};

mqtt::publish_packet pub(std::string topic, std::string body, std::uint8_t qos = 1, std::uint16_t id = 1) {
  mqtt::publish_packet p;
  p.topic = std::move(topic);
  p.payload = std::move(body);
  p.qos = qos;
  p.packet_id = qos ? id : 0;
  return p;
}

std::string rid_of(const std::string& topic) {
  auto at = topic.find("$rid=");
  REQUIRE(at != std::string::npos);
  return topic.substr(at + 5);
}

}  // namespace

TEST_CASE_METHOD(head_fixture, "mqtt head: a process module's session routes, acknowledges and serves", "[mqtt_head]") {
  const auto key = keys->key_for("mod1");
  auto channel = std::make_shared<recording_channel>();
  auto answer = connect(module_connect("mod1", key), channel);
  REQUIRE(std::holds_alternative<mqtt_accept>(answer));
  auto session = std::get<mqtt_accept>(answer).session;
  REQUIRE(session);
  CHECK_FALSE(std::get<mqtt_accept>(answer).session_present);

  // It becomes the module's instance at the router.
  caf::actor instance;
  (*self)->receive([&](atoms::module_up, const std::string& name, const caf::actor& a) {
    CHECK(name == "mod1");
    instance = a;
  });
  CHECK(directory->find("gw", "mod1") == instance);

  SECTION("its outputs enter the router; the publish is answered only once the router answered") {
    waiter<std::vector<mqtt_publish_result>> done;
    session->publish({pub("devices/gw/modules/mod1/messages/events/%24.on=out1&k=v", "hello")},
                     [&](std::vector<mqtt_publish_result> r) { done.set(std::move(r)); });
    (*self)->receive([&](atoms::inject, const std::vector<routed_message>& batch) {
      REQUIRE(batch.size() == 1);
      CHECK(batch[0].device == "gw");
      CHECK(batch[0].module == "mod1");
      CHECK(batch[0].output == "out1");
      CHECK(batch[0].msg.body() == "hello");
      CHECK(batch[0].msg.property("k") == std::optional<std::string_view>{"v"});
      CHECK(batch[0].msg.connection_module_id() == "mod1");
    });
    CHECK_FALSE(done.has());  // not durable yet: no PUBACK
    (*self)->send(router, atoms::flush::value);
    REQUIRE(done.wait());
    REQUIRE(done.value->size() == 1);
    CHECK(static_cast<bool>((*done.value)[0]));
  }

  SECTION("a module publishing as its device is refused, and nothing is routed") {
    waiter<std::vector<mqtt_publish_result>> done;
    session->publish({pub("devices/gw/messages/events/", "x")},
                     [&](std::vector<mqtt_publish_result> r) { done.set(std::move(r)); });
    REQUIRE(done.wait());
    REQUIRE(done.value->size() == 1);
    CHECK_FALSE(static_cast<bool>((*done.value)[0]));
    bool routed = false;
    (*self)->receive([&](atoms::inject, const std::vector<routed_message>&) { routed = true; },
                  caf::after(100ms) >> [] {});
    CHECK_FALSE(routed);
  }

  SECTION("subscriptions to its own topics are granted, others refused") {
    waiter<std::vector<std::uint8_t>> codes;
    session->subscribe({{"devices/gw/modules/mod1/inputs/#", 1}, {"devices/other/messages/devicebound/#", 1},
                        {"$iothub/methods/POST/#", 0}},
                       [&](expected<std::vector<std::uint8_t>> r) {
                         REQUIRE(r);
                         codes.set(*r);
                       });
    REQUIRE(codes.wait());
    CHECK(*codes.value == std::vector<std::uint8_t>{1, 0x80, 0});
  }

  SECTION("inputs go out as QoS 1 PUBLISH once subscribed; the PUBACK acknowledges the delivery") {
    auto m = message_builder{}.body("in-body").property("a", "b").build();
    (*self)->send(instance, atoms::input::value, std::string{"in1"}, m, std::uint64_t{42});
    CHECK_FALSE(channel->nth(0, 200ms));  // not subscribed yet: it waits
    waiter<std::vector<std::uint8_t>> codes;
    session->subscribe({{"devices/gw/modules/mod1/inputs/#", 1}},
                       [&](expected<std::vector<std::uint8_t>> r) { codes.set(*r); });
    REQUIRE(codes.wait());
    auto p = channel->nth(0);
    REQUIRE(p);
    CHECK(p->topic == "devices/gw/modules/mod1/inputs/in1/a=b");
    CHECK(p->payload == "in-body");
    CHECK(p->qos == 1);
    session->acked(p->packet_id);
    (*self)->receive([&](atoms::delivered, const std::string& receiver, std::uint64_t token) {
      CHECK(receiver == "mod1");
      CHECK(token == 42);
    });
  }

  SECTION("PUBACKs out of order: the router hears of an input only once every earlier one is acknowledged") {
    for (std::uint64_t token : {50, 51, 52})
      (*self)->send(instance, atoms::input::value, std::string{"in1"}, message_builder{}.body("b").build(), token);
    waiter<std::vector<std::uint8_t>> codes;
    session->subscribe({{"devices/gw/modules/mod1/inputs/#", 1}},
                       [&](expected<std::vector<std::uint8_t>> r) { codes.set(*r); });
    REQUIRE(codes.wait());
    auto p0 = channel->nth(0), p1 = channel->nth(1), p2 = channel->nth(2);
    REQUIRE(p0);
    REQUIRE(p1);
    REQUIRE(p2);
    session->acked(p1->packet_id);
    session->acked(p2->packet_id);
    bool early = false;
    (*self)->receive([&](atoms::delivered, const std::string&, std::uint64_t) { early = true; },
                     caf::after(200ms) >> [] {});
    CHECK_FALSE(early);
    session->acked(p0->packet_id);
    (*self)->receive([&](atoms::delivered, const std::string& receiver, std::uint64_t token) {
      CHECK(receiver == "mod1");
      CHECK(token == 52);  // cumulative: all three
    });
  }

  SECTION("a direct method goes to the client and its answer comes back") {
    waiter<std::vector<std::uint8_t>> codes;
    session->subscribe({{"$iothub/methods/POST/#", 0}},
                       [&](expected<std::vector<std::uint8_t>> r) { codes.set(*r); });
    REQUIRE(codes.wait());
    auto call = (*self)->request(instance, 5s, atoms::method::value, std::string{"reboot"}, std::string{R"({"in":1})"});
    auto p = channel->nth(0);
    REQUIRE(p);
    CHECK(p->topic.rfind("$iothub/methods/POST/reboot/?$rid=", 0) == 0);
    CHECK(p->payload == R"({"in":1})");
    waiter<std::vector<mqtt_publish_result>> done;
    session->publish({pub("$iothub/methods/res/201/?$rid=" + rid_of(p->topic), R"({"ok":true})", 0)},
                     [&](std::vector<mqtt_publish_result> r) { done.set(std::move(r)); });
    call.receive(
      [](int status, const std::string& body) {
        CHECK(status == 201);
        CHECK(body == R"({"ok":true})");
      },
      [](caf::error& err) { FAIL(caf::to_string(err)); });
  }

  SECTION("a method to a module that has not subscribed to methods answers 404 at once") {
    auto call = (*self)->request(instance, 5s, atoms::method::value, std::string{"reboot"}, std::string{"{}"});
    call.receive([](int status, const std::string&) { CHECK(status == 404); },
                 [](caf::error& err) { FAIL(caf::to_string(err)); });
  }

  SECTION("the connection ends: the session ends and leaves the directory") {
    (*self)->monitor(instance);
    session->closed("the client closed the connection", true);
    (*self)->receive([](const caf::down_msg&) {});
    // The entry goes in the actor's cleanup, which may finish just after the down message.
    for (int i = 0; i < 500 && directory->find("gw", "mod1"); ++i)
      std::this_thread::sleep_for(10ms);
    CHECK_FALSE(directory->find("gw", "mod1"));
  }
}

TEST_CASE_METHOD(head_fixture, "mqtt head: a Will goes out as telemetry only when the connection ends without "
                               "DISCONNECT", "[mqtt_head]") {
  const auto key = keys->key_for("mod1");
  auto info = module_connect("mod1", key);
  info.packet.will = mqtt::will_message{"devices/gw/modules/mod1/messages/events/%24.on=status", "gone", 1, false};
  auto channel = std::make_shared<recording_channel>();
  auto answer = connect(info, channel);
  REQUIRE(std::holds_alternative<mqtt_accept>(answer));
  auto session = std::get<mqtt_accept>(answer).session;
  caf::actor instance;
  (*self)->receive([&](atoms::module_up, const std::string&, const caf::actor& a) { instance = a; });
  (*self)->monitor(instance);
  const bool clean = GENERATE(false, true);
  session->closed(clean ? "DISCONNECT" : "the connection was reset", clean);
  bool will_sent = false;
  // The router passes the inject on; it may arrive before or after the down message.
  for (int i = 0; i < 2; ++i)
    (*self)->receive(
      [&](atoms::inject, const std::vector<routed_message>& batch) {
        REQUIRE(batch.size() == 1);
        CHECK(batch[0].output == "status");
        CHECK(batch[0].msg.body() == "gone");
        CHECK(batch[0].msg.property("iothub-MessageType") == std::optional<std::string_view>{"Will"});
        will_sent = true;
      },
      [&](const caf::down_msg&) {}, caf::after(clean ? 300ms : 5s) >> [] {});
  CHECK(will_sent == !clean);
}

TEST_CASE_METHOD(head_fixture, "mqtt head: who may connect as a module", "[mqtt_head]") {
  (void)keys->key_for("mod1");
  auto channel = std::make_shared<recording_channel>();

  SECTION("a token signed with another key") {
    auto r = connect(module_connect("mod1", iothub::base64_encode(std::string(32, 'x'))), channel);
    REQUIRE(std::holds_alternative<mqtt_refusal>(r));
    CHECK(std::get<mqtt_refusal>(r).code == mqtt::connack_code::not_authorized);
  }
  SECTION("a module the node never started") {
    auto r = connect(module_connect("nobody", iothub::base64_encode(std::string(32, 'x'))), channel);
    REQUIRE(std::holds_alternative<mqtt_refusal>(r));
    CHECK(std::get<mqtt_refusal>(r).code == mqtt::connack_code::not_authorized);
  }
  SECTION("a module of another node") {
    auto info = module_connect("mod1", keys->key_for("mod1"));
    info.packet.client_id = "other/mod1";
    info.packet.username = "hub.test/other/mod1/?api-version=2021-04-12";
    auto r = connect(info, channel);
    REQUIRE(std::holds_alternative<mqtt_refusal>(r));
    CHECK(std::get<mqtt_refusal>(r).reason.find("own node") != std::string::npos);
  }
  SECTION("a device on a node without a registry") {
    auto info = module_connect("mod1", keys->key_for("mod1"));
    info.packet.client_id = "leaf1";
    info.packet.username = "hub.test/leaf1/?api-version=2021-04-12";
    auto r = connect(info, channel);
    REQUIRE(std::holds_alternative<mqtt_refusal>(r));
    CHECK(std::get<mqtt_refusal>(r).code == mqtt::connack_code::not_authorized);
  }
  SECTION("a second connection of the same module replaces the first") {
    auto first = connect(module_connect("mod1", keys->key_for("mod1")), channel);
    REQUIRE(std::holds_alternative<mqtt_accept>(first));
    auto other = std::make_shared<recording_channel>();
    auto second = connect(module_connect("mod1", keys->key_for("mod1")), other);
    REQUIRE(std::holds_alternative<mqtt_accept>(second));
    CHECK(channel->wait_closed());
  }
}

TEST_CASE("mqtt head: process module connection variables", "[mqtt_head]") {
  mqtt_module_keys keys;
  auto env = mqtt_module_env("gw", "mod1", "hub.test", "127.0.0.1", 8883, true, "/etc/ca.crt", keys, 1000);
  CHECK(env["CANOPY_MQTT_HOST"] == "127.0.0.1");
  CHECK(env["CANOPY_MQTT_PORT"] == "8883");
  CHECK(env["CANOPY_MQTT_TLS"] == "1");
  CHECK(env["CANOPY_MQTT_CA_FILE"] == "/etc/ca.crt");
  CHECK(env["CANOPY_MQTT_USERNAME"] == "hub.test/gw/mod1/?api-version=2021-04-12");
  auto token = iothub::parse_sas(env["CANOPY_MQTT_PASSWORD"]);
  REQUIRE(token);
  CHECK(iothub::verify_sas(*token, *keys.find("mod1"), "hub.test/devices/gw/modules/mod1", 1000));
  // Another module gets another key.
  (void)mqtt_module_env("gw", "mod2", "hub.test", "127.0.0.1", 8883, false, "", keys, 1000);
  CHECK(*keys.find("mod1") != *keys.find("mod2"));
}
