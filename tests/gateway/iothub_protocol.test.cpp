// Unit test of the Azure IoT Hub device protocol layer: client ids, user
// names, property bags, topics, subscriptions and SAS tokens, with what the
// real SDKs send (azure-iot-sdk-c, azure-iot-sdk-python, azure-sdk-for-c,
// edgeHub / .NET).
#include "gateway/iothub_protocol.hpp"

#include <canopy/message.hpp>

#include <catch2/catch.hpp>

#include <string>
#include <vector>

using namespace canopy;
using namespace canopy::iothub;

namespace {

const client_identity dev1{"dev1", ""};
const client_identity dev2{"dev2", ""};
const client_identity mod1{"dev1", "mod1"};

bool contains(const std::string& s, const std::string& part) {
  return s.find(part) != std::string::npos;
}

std::string value_of(const property_bag& bag, const std::string& key) {
  for (auto& [k, v] : bag)
    if (k == key)
      return v;
  return "<absent>";
}

// Known-answer key: base64 of the bytes 0..31.
const std::string key = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const std::string other_key = "HxwdHhobGBkWFxQVEhMQEQ4PDA0KCwgJBgcEBQIDAAE=";

}  // namespace

// -- client ids and user names ---------------------------------------------------

TEST_CASE("iothub: client ids", "[iothub]") {
  struct row {
    std::string client_id;
    bool ok;
    std::string device, module, error_part;
  };
  auto rows = GENERATE(values<row>({
    {"dev1", true, "dev1", "", ""},
    {"dev1/mod1", true, "dev1", "mod1", ""},
    {"plant:1/$edgeHub", true, "plant:1", "$edgeHub", ""},
    {"a-b.c_d%e*f?g!h(i)j,k:l=m@n$o'p+q#r", true, "a-b.c_d%e*f?g!h(i)j,k:l=m@n$o'p+q#r", "", ""},
    {"", false, "", "", "client id is empty"},
    {"/mod1", false, "", "", "empty device id"},
    {"dev1/", false, "", "", "empty module id"},
    {"dev1/mod1/x", false, "", "", "more than one '/'"},
    {"dev 1", false, "", "", "device id 'dev 1' is not a valid id"},
    {"dev1/m\xc3\xa9", false, "", "", "module id 'm\\xc3\\xa9' is not a valid id"},
    {std::string(129, 'a'), false, "", "", "is not a valid id"},
  }));
  CAPTURE(rows.client_id);
  auto r = parse_client_id(rows.client_id);
  REQUIRE(r.ok() == rows.ok);
  if (rows.ok) {
    CHECK(r->device_id == rows.device);
    CHECK(r->module_id == rows.module);
    CHECK(r->to_string() == rows.client_id);
  } else {
    CHECK(contains(r.err().message, rows.error_part));
  }
}

TEST_CASE("iothub: user names as the SDKs write them", "[iothub]") {
  struct row {
    std::string user_name;
    std::string host, device, module, api_version;
  };
  auto rows = GENERATE(values<row>({
    // azure-iot-sdk-c (buildConfigForUsernameStep2IfNeeded)
    {"myhub.azure-devices.net/dev1/"
     "?api-version=2020-09-30&DeviceClientType=iothubclient%2F1.9.0%20(native%3B%20Linux%3B%20x86_"
     "64)",
     "myhub.azure-devices.net", "dev1", "", "2020-09-30"},
    // azure-sdk-for-c (az_iot_hub_client_get_user_name), with a module and model-id
    {"myhub.azure-devices.net/dev1/mod1/"
     "?api-version=2020-05-31-preview&DeviceClientType=c%2F1.0.0&model-id=dtmi%3Acom%3Aexample%"
     "3BThermostat%3B1",
     "myhub.azure-devices.net", "dev1", "mod1", "2020-05-31-preview"},
    // Azure's docs for plain MQTT
    {"myhub.azure-devices.net/dev1/?api-version=2021-04-12", "myhub.azure-devices.net", "dev1", "",
     "2021-04-12"},
    // edgeHub's older form: no '?'
    {"gw.local/dev1/api-version=2017-06-30&DeviceClientType=x", "gw.local", "dev1", "",
     "2017-06-30"},
    // a '?' inside an id is an id character
    {"h/dev?1/?api-version=1", "h", "dev?1", "", "1"},
  }));
  CAPTURE(rows.user_name);
  auto u = parse_username(rows.user_name);
  REQUIRE(u.ok());
  CHECK(u->host == rows.host);
  CHECK(u->device_id == rows.device);
  CHECK(u->module_id == rows.module);
  CHECK(u->api_version == rows.api_version);
  CHECK(u->identity() == client_identity{rows.device, rows.module});
}

TEST_CASE("iothub: user name query parameters are decoded, the first of a name wins", "[iothub]") {
  auto u = parse_username(
    "h/d/"
    "?api-version=2020-09-30&DeviceClientType=iothubclient%2F1.9.0%20(native)&api-version=x&flag");
  REQUIRE(u.ok());
  REQUIRE(u->query.size() == 3);
  CHECK(u->query[1].first == "DeviceClientType");
  CHECK(u->query[1].second == "iothubclient/1.9.0 (native)");
  CHECK(u->query[2].first == "flag");
  CHECK(u->query[2].second.empty());
  CHECK(u->api_version == "2020-09-30");
}

TEST_CASE("iothub: bad user names say which part is wrong", "[iothub]") {
  struct row {
    std::string user_name, error_part;
  };
  auto rows = GENERATE(values<row>({
    {"", "user name is empty"},
    {"myhub/dev1", "no query"},
    {"myhub/dev1/", "no query"},
    {"myhub/?api-version=1", "got 0 id segments"},
    {"myhub/a/b/c/?api-version=1", "got 3 id segments"},
    {"/dev1/?api-version=1", "empty host name"},
    {"my hub/dev1/?api-version=1", "host name 'my hub'"},
    {"h/dev 1/?api-version=1", "device id 'dev 1' is not a valid id"},
    {"h/dev1/m%/x/?api-version=1", "got 3 id segments"},
    {"h/dev1/m^/?api-version=1", "module id 'm^' is not a valid id"},
    {"h/dev1/?DeviceClientType=x", "no api-version"},
    {"h/dev1/?api-version=", "no api-version"},
    {std::string(3000, 'x'), "at most 2048"},
  }));
  CAPTURE(rows.user_name);
  auto u = parse_username(rows.user_name);
  REQUIRE_FALSE(u.ok());
  CHECK(u.err().code == errc::invalid_argument);
  CHECK(contains(u.err().message, rows.error_part));
}

TEST_CASE("iothub: client id and user name must agree", "[iothub]") {
  auto u_dev = *parse_username("h/dev1/?api-version=1");
  auto u_mod = *parse_username("h/dev1/mod1/?api-version=1");
  CHECK(check_same_identity(dev1, u_dev).ok());
  CHECK(check_same_identity(mod1, u_mod).ok());

  auto r = check_same_identity(dev2, u_dev);
  REQUIRE_FALSE(r.ok());
  CHECK(r.err().message == "client id names device 'dev2', user name names device 'dev1'");

  r = check_same_identity(dev1, u_mod);
  REQUIRE_FALSE(r.ok());
  CHECK(r.err().message ==
        "client id names no module, user name names module 'mod1' (device 'dev1')");

  r = check_same_identity(client_identity{"DEV1", ""}, u_dev);  // ids are case-sensitive
  CHECK_FALSE(r.ok());
}

TEST_CASE("iothub: identity resources", "[iothub]") {
  CHECK(identity_resource("myhub.azure-devices.net", dev1) ==
        "myhub.azure-devices.net/devices/dev1");
  CHECK(identity_resource("h", mod1) == "h/devices/dev1/modules/mod1");
}

// -- property bags ---------------------------------------------------------------

TEST_CASE("iothub: percent encoding is RFC 3986 with upper-case hex", "[iothub]") {
  CHECK(percent_encode("$.ct") == "%24.ct");
  CHECK(percent_encode("application/json") == "application%2Fjson");
  CHECK(percent_encode("text/plain; charset=UTF-8") == "text%2Fplain%3B%20charset%3DUTF-8");
  CHECK(percent_encode("a+b c~_-.") == "a%2Bb%20c~_-.");
  CHECK(percent_encode("\xc3\xa9") == "%C3%A9");

  CHECK(percent_decode("%24.ct") == "$.ct");
  CHECK(percent_decode("application%2fjson") == "application/json");
  CHECK(percent_decode("a+b") == "a+b");    // '+' is a plus, not a space
  CHECK(percent_decode("100%") == "100%");  // a bad escape is kept
  CHECK(percent_decode("%zz%4") == "%zz%4");
  CHECK(percent_decode("%2") == "%2");
}

TEST_CASE("iothub: property bags as the SDKs and IoT Hub write them", "[iothub]") {
  struct row {
    std::string text;
    property_bag want;
  };
  auto rows = GENERATE(values<row>({
    // IoT Hub's C2D bag (azure-iot-sdk-csharp UrlEncodedDictionarySerializerTests)
    {"%24.to=%2Fdevices%2FdelMe%2Fmessages%2FdeviceBound&%24.ct=text%2Fplain%3B%20charset%3DUTF-8&%"
     "24.ce=utf-8",
     {{"$.to", "/devices/delMe/messages/deviceBound"},
      {"$.ct", "text/plain; charset=UTF-8"},
      {"$.ce", "utf-8"}}},
    // azure-iot-sdk-c without auto URL encoding: user properties first, "%24." system names
    {"temperatureAlert=true&%24.cid=c1&%24.mid=m1&%24.ct=application%2Fjson&%24.ce=utf-8",
     {{"temperatureAlert", "true"},
      {"$.cid", "c1"},
      {"$.mid", "m1"},
      {"$.ct", "application/json"},
      {"$.ce", "utf-8"}}},
    // raw '$' and raw '/' (clients that do not encode): accepted as written
    {"$.ct=application/json&$.ce=utf-8", {{"$.ct", "application/json"}, {"$.ce", "utf-8"}}},
    // Azure's docs example: leading '?', names without values
    {"?prop1&prop2=&prop3=a%20string", {{"prop1", ""}, {"prop2", ""}, {"prop3", "a string"}}},
    // '=' inside a value, empty segments, a repeated name (the later value wins, in place)
    {"a=x=y&&b=1&a=2&", {{"a", "2"}, {"b", "1"}}},
    {"", {}},
    {"?", {}},
    {"k=%E2%82%AC", {{"k", "\xe2\x82\xac"}}},
  }));
  CAPTURE(rows.text);
  auto bag = parse_property_bag(rows.text);
  REQUIRE(bag.ok());
  CHECK(*bag == rows.want);
}

TEST_CASE("iothub: bad property bags name the property and byte", "[iothub]") {
  struct row {
    std::string text, error;
  };
  auto rows = GENERATE(values<row>({
    {"=v", "property bag: property 1 at byte 0: empty name"},
    {"a=1&=v", "property bag: property 2 at byte 4: empty name"},
    {"?a=1&=v", "property bag: property 2 at byte 5: empty name"},
    {"a=%FF",
     "property bag: property 1 at byte 0 ('a'): value is not UTF-8 text once decoded (bad byte or "
     "U+0000 at byte 0 of the value)"},
    {"a=1&b%00=1",
     "property bag: property 2 at byte 4: name 'b%00' is not UTF-8 text once decoded (bad byte or "
     "U+0000 at byte 1 of the name)"},
    {"a=%C0%80", "value is not UTF-8"},     // overlong NUL
    {"a=%ED%A0%80", "value is not UTF-8"},  // surrogate
  }));
  CAPTURE(rows.text);
  auto bag = parse_property_bag(rows.text);
  REQUIRE_FALSE(bag.ok());
  CHECK(contains(bag.err().message, rows.error));
}

TEST_CASE("iothub: a bag holds at most max_bag_properties", "[iothub]") {
  std::string text;
  for (std::size_t i = 0; i < max_bag_properties; ++i)
    text += "p" + std::to_string(i) + "=v&";
  CHECK(parse_property_bag(text).ok());
  text += "one=more";
  auto bag = parse_property_bag(text);
  REQUIRE_FALSE(bag.ok());
  CHECK(contains(bag.err().message, "more than 256 properties"));
}

TEST_CASE("iothub: encode and parse round-trip", "[iothub]") {
  property_bag bag{{"$.mid", "m-1"},   {"$.ct", "application/json; charset=utf-8"},
                   {"a&b=c", "x=y&z"}, {"plus+space", "1 + 1"},
                   {"empty", ""},      {"unicode", "\xe2\x82\xac/\xf0\x9f\x98\x80"}};
  auto text = encode_property_bag(bag);
  CHECK(text.find('/') == std::string::npos);
  CHECK(text.starts_with("%24.mid=m-1&%24.ct=application%2Fjson%3B%20charset%3Dutf-8&"));
  auto back = parse_property_bag(text);
  REQUIRE(back.ok());
  CHECK(*back == bag);
  CHECK(encode_property_bag({}) == "");
}

TEST_CASE("iothub: system properties map to the message's fields", "[iothub]") {
  auto bag = *parse_property_bag(
    "%24.mid=m1&%24.cid=c1&%24.ct=application%2Fjson&%24.ce=utf-8&%24.uid=u1&%24.on=out1"
    "&%24.ctime=2023-11-14T22%3A13%3A20.250Z&%24.exp=2030-01-01T00%3A00%3A00Z&%24.to=%2Fx"
    "&%24.ifid=urn%3Aazureiot%3ASecurity&%24.cdid=spoofed&%24.cmid=spoofed&app=1");
  message_builder b;
  apply_property_bag(b, bag);
  auto m = b.build();
  CHECK(m.message_id() == "m1");
  CHECK(m.correlation_id() == "c1");
  CHECK(m.content_type() == "application/json");
  CHECK(m.content_encoding() == "utf-8");
  CHECK(m.user_id() == "u1");
  CHECK(m.output_name() == "out1");
  CHECK(m.creation_time_utc_ms() == 1700000000250);
  // Not settable from the wire.
  CHECK(m.connection_device_id().empty());
  CHECK(m.connection_module_id().empty());
  // No field in canopy::message: kept under their $. names.
  CHECK(m.property("$.exp") == std::optional<std::string_view>{"2030-01-01T00:00:00Z"});
  CHECK(m.property("$.to") == std::optional<std::string_view>{"/x"});
  CHECK(m.property("$.ifid") == std::optional<std::string_view>{"urn:azureiot:Security"});
  CHECK(m.property("app") == std::optional<std::string_view>{"1"});
  CHECK_FALSE(m.property("$.mid"));
  CHECK_FALSE(m.property("$.cdid"));
}

TEST_CASE("iothub: $.ctime forms", "[iothub]") {
  struct row {
    std::string text;
    std::int64_t ms;  // 0 = kept as a property
  };
  auto rows = GENERATE(values<row>({
    {"1970-01-01T00:00:00Z", 0},  // parses to 0, which is "unset"
    {"2023-11-14T22:13:20Z", 1700000000000},
    {"2023-11-14T22:13:20.5Z", 1700000000500},
    {"2023-11-14T22:13:20.123456Z", 1700000000123},
    {"2023-11-14T23:13:20+01:00", 1700000000000},
    {"2023-11-14T22:13:20", 1700000000000},
    {"2000-02-29T00:00:00Z", 951782400000},
    {"1969-12-31T23:59:59.999Z", -1},
    {"yesterday", 0},
    {"2023-13-01T00:00:00Z", 0},
    {"2023-11-14T22:13:20.Z", 0},
  }));
  CAPTURE(rows.text);
  message_builder b;
  apply_property_bag(b, {{"$.ctime", rows.text}});
  auto m = b.build();
  CHECK(m.creation_time_utc_ms() == rows.ms);
  if (rows.ms == 0 && rows.text != "1970-01-01T00:00:00Z")
    CHECK(m.property("$.ctime") == std::optional<std::string_view>{rows.text});
}

TEST_CASE("iothub: bag_of a message, system properties first", "[iothub]") {
  auto m = message_builder{}
             .body("x")
             .property("app", "1")
             .property("$.exp", "2030-01-01T00:00:00Z")
             .message_id("m1")
             .correlation_id("c1")
             .content_type("application/json")
             .content_encoding("utf-8")
             .user_id("u1")
             .creation_time_utc_ms(1700000000250)
             .connection_device_id("dev1")
             .connection_module_id("mod1")
             .output_name("out1")
             .build();
  property_bag want{{"$.mid", "m1"},
                    {"$.cid", "c1"},
                    {"$.ct", "application/json"},
                    {"$.ce", "utf-8"},
                    {"$.uid", "u1"},
                    {"$.ctime", "2023-11-14T22:13:20.250Z"},
                    {"$.cdid", "dev1"},
                    {"$.cmid", "mod1"},
                    {"$.on", "out1"},
                    {"app", "1"},
                    {"$.exp", "2030-01-01T00:00:00Z"}};
  CHECK(bag_of(m) == want);
  CHECK(bag_of(message_builder{}.body("x").build()).empty());
}

// -- inbound topics --------------------------------------------------------------

TEST_CASE("iothub: telemetry topics", "[iothub]") {
  struct row {
    std::string topic;
    client_identity who;
    inbound_kind kind;
    std::size_t properties;
    std::string output;
  };
  auto rows = GENERATE(values<row>({
    {"devices/dev1/messages/events/", dev1, inbound_kind::telemetry, 0, ""},
    {"devices/dev1/messages/events", dev1, inbound_kind::telemetry, 0, ""},
    {"devices/dev1/messages/events/%24.ct=application%2Fjson&%24.ce=utf-8&k=v", dev1,
     inbound_kind::telemetry, 3, ""},
    {"devices/dev1/modules/mod1/messages/events/", mod1, inbound_kind::module_output, 0, ""},
    {"devices/dev1/modules/mod1/messages/events/%24.on=alerts&%24.mid=1", mod1,
     inbound_kind::module_output, 2, "alerts"},
    // output name with a raw '/' (azure-iot-sdk-c issue 2043)
    {"devices/dev1/modules/mod1/messages/events/%24.on=v1/sb", mod1, inbound_kind::module_output, 1,
     "v1/sb"},
    // ids percent-encoded, as older Python SDKs wrote them
    {"devices/plant%3A1/messages/events/", client_identity{"plant:1", ""}, inbound_kind::telemetry,
     0, ""},
    {"devices/plant:1/modules/%24edgeAgent/messages/events/",
     client_identity{"plant:1", "$edgeAgent"}, inbound_kind::module_output, 0, ""},
  }));
  CAPTURE(rows.topic);
  auto in = parse_publish_topic(rows.topic, rows.who);
  REQUIRE(in.ok());
  CHECK(in->kind == rows.kind);
  CHECK(in->properties.size() == rows.properties);
  CHECK(in->output == rows.output);
}

TEST_CASE("iothub: twin and method topics", "[iothub]") {
  auto in = parse_publish_topic("$iothub/twin/GET/?$rid=42", dev1);
  REQUIRE(in.ok());
  CHECK(in->kind == inbound_kind::twin_get);
  CHECK(in->rid == "42");

  in = parse_publish_topic("$iothub/twin/GET/?$rid=3e0f8a1c-1c7f-4bd7-9d6e-3d2ad0b6a0aa", mod1);
  REQUIRE(in.ok());
  CHECK(in->rid == "3e0f8a1c-1c7f-4bd7-9d6e-3d2ad0b6a0aa");

  in = parse_publish_topic("$iothub/twin/PATCH/properties/reported/?$rid=7", dev1);
  REQUIRE(in.ok());
  CHECK(in->kind == inbound_kind::twin_patch_reported);
  CHECK(in->rid == "7");
  CHECK_FALSE(in->version);

  in = parse_publish_topic("$iothub/twin/PATCH/properties/reported/?$rid=7&$version=12", dev1);
  REQUIRE(in.ok());
  CHECK(in->version == std::optional<std::int64_t>{12});

  in = parse_publish_topic("$iothub/methods/res/200/?$rid=abc", dev1);
  REQUIRE(in.ok());
  CHECK(in->kind == inbound_kind::method_response);
  CHECK(in->status == 200);
  CHECK(in->rid == "abc");

  in = parse_publish_topic("$iothub/methods/res/-1/?$rid=1&foo=bar", dev1);
  REQUIRE(in.ok());
  CHECK(in->status == -1);

  in = parse_publish_topic("$iothub/twin/GET?$rid=a%20b", dev1);  // no '/', encoded rid
  REQUIRE(in.ok());
  CHECK(in->rid == "a b");
}

TEST_CASE("iothub: refused publishes say which part is wrong", "[iothub]") {
  struct row {
    std::string topic;
    client_identity who;
    std::string error;
  };
  auto rows = GENERATE(values<row>({
    {"devices/dev2/messages/events/", dev1, "topic names device 'dev2', but the client is 'dev1'"},
    {"devices/dev1/modules/mod1/messages/events/", dev1,
     "topic names module 'mod1' of device 'dev1', but the client is the device itself"},
    {"devices/dev1/messages/events/", mod1,
     "topic is the device's own telemetry, but the client is module 'dev1/mod1' (a module "
     "publishes to devices/dev1/modules/mod1/messages/events/)"},
    {"devices/dev1/modules/mod2/messages/events/", mod1,
     "topic names module 'mod2', but the client is module 'dev1/mod1'"},
    {"devices/dev2/modules/mod1/messages/events/", mod1, "topic names device 'dev2'"},
    {"devices/dev1/messages/devicebound/", dev1, "a client publishes telemetry to"},
    {"devices/dev1/messages/eventsX", dev1, "a client publishes telemetry to"},
    {"devices/dev1", dev1, "expected devices/{deviceId}/messages/events/"},
    {"devices/dev1/modules/mod1", mod1, "expected devices/{deviceId}/modules/{moduleId}"},
    {"devices/dev1/messages/events/=x", dev1, "empty name"},
    {"telemetry", dev1, "not an IoT Hub topic"},
    {"$iothub/twin/GET/", dev1, "expected '/?$rid=' after"},
    {"$iothub/twin/GET/?foo=1", dev1, "no $rid"},
    {"$iothub/twin/GET/?$rid=", dev1, "no $rid"},
    {"$iothub/twin/PATCH/properties/reported/?$rid=1&$version=x", dev1, "$version 'x'"},
    {"$iothub/twin/PATCH/properties/desired/?$version=1", dev1,
     "not an $iothub topic a client publishes to"},
    {"$iothub/methods/res/ok/?$rid=1", dev1, "method status 'ok' is not an integer"},
    {"$iothub/methods/res/99999999999/?$rid=1", dev1, "is not an integer"},
    {"$iothub/methods/res/200", dev1, "no $rid"},
    {"$iothub/methods/POST/reboot/?$rid=1", dev1, "not an $iothub topic a client publishes to"},
    {"$iothub/twin/GET/?$rid=" + std::string(300, 'r'), dev1, "$rid is 300 bytes, at most 256"},
  }));
  CAPTURE(rows.topic);
  auto in = parse_publish_topic(rows.topic, rows.who);
  REQUIRE_FALSE(in.ok());
  CHECK(in.err().code == errc::invalid_argument);
  CHECK(contains(in.err().message, rows.error));
}

TEST_CASE("iothub: build_message takes the identity from the connection", "[iothub]") {
  auto in = *parse_publish_topic(
    "devices/dev1/modules/mod1/messages/events/%24.on=alerts&%24.cdid=dev9&%24.mid=1&k=v", mod1);
  auto m = build_message(in, mod1, "{\"t\":21}");
  CHECK(m.body() == "{\"t\":21}");
  CHECK(m.connection_device_id() == "dev1");
  CHECK(m.connection_module_id() == "mod1");
  CHECK(m.output_name() == "alerts");
  CHECK(m.message_id() == "1");
  CHECK(m.property("k") == std::optional<std::string_view>{"v"});
  CHECK(m.properties().size() == 1);

  auto t = build_message(*parse_publish_topic("devices/dev1/messages/events/", dev1), dev1, "");
  CHECK(t.connection_device_id() == "dev1");
  CHECK(t.connection_module_id().empty());
}

// -- subscriptions ---------------------------------------------------------------

TEST_CASE("iothub: subscriptions the SDKs make", "[iothub]") {
  struct row {
    std::string filter;
    client_identity who;
    subscription want;
  };
  auto rows = GENERATE(values<row>({
    {"devices/dev1/messages/devicebound/#", dev1, subscription::c2d},
    {"devices/+/messages/devicebound/#", dev1, subscription::c2d},  // azure-sdk-for-c
    {"$iothub/twin/res/#", dev1, subscription::twin_responses},
    {"$iothub/twin/res/#", mod1, subscription::twin_responses},
    {"$iothub/twin/PATCH/properties/desired/#", dev1, subscription::desired_patches},
    {"$iothub/methods/POST/#", mod1, subscription::methods},
    {"$iothub/methods/POST/+/#", dev1, subscription::methods},           // prefix, as edgeHub
    {"devices/dev1/modules/mod1/#", mod1, subscription::module_inputs},  // C, .NET
    {"devices/dev1/modules/mod1/inputs/#", mod1, subscription::module_inputs},  // Python, Node
  }));
  CAPTURE(rows.filter);
  auto s = check_subscription(rows.filter, rows.who);
  REQUIRE(s.ok());
  CHECK(*s == rows.want);
}

TEST_CASE("iothub: refused subscriptions give the reason", "[iothub]") {
  struct row {
    std::string filter;
    client_identity who;
    std::string error;
  };
  auto rows = GENERATE(values<row>({
    {"devices/dev2/messages/devicebound/#", dev1, "names device 'dev2', but the client is 'dev1'"},
    {"devices/dev1/messages/devicebound/#", mod1, "C2D messages are for devices"},
    {"devices/dev1/modules/mod1/#", dev1, "module inputs are for modules"},
    {"devices/dev1/modules/mod2/#", mod1,
     "names module 'mod2', but the client is module 'dev1/mod1'"},
    {"devices/dev2/modules/mod1/inputs/#", mod1, "names device 'dev2'"},
    {"devices/+/modules/+/#", mod1, "names device '+'"},
    {"#", dev1, "not a topic filter IoT Hub offers"},
    {"$iothub/#", dev1, "not a topic filter IoT Hub offers"},
    {"devices/#", dev1, "not a topic filter IoT Hub offers"},
    {"devices/dev1/messages/events/#", dev1, "not a topic filter IoT Hub offers"},
    {"devices/dev1/modules/mod1/inputs/in1", mod1, "not a topic filter IoT Hub offers"},
  }));
  CAPTURE(rows.filter);
  auto s = check_subscription(rows.filter, rows.who);
  REQUIRE_FALSE(s.ok());
  CHECK(contains(s.err().message, rows.error));
}

// -- outbound topics --------------------------------------------------------------

TEST_CASE("iothub: topics the server publishes", "[iothub]") {
  auto m = message_builder{}
             .body("b")
             .message_id("m1")
             .content_type("text/plain")
             .property("k", "v 1")
             .build();
  CHECK(c2d_topic("dev1", m) ==
        "devices/dev1/messages/devicebound/%24.mid=m1&%24.ct=text%2Fplain&k=v%201"
        "&%24.to=%2Fdevices%2Fdev1%2Fmessages%2FdeviceBound");
  auto with_to = message_builder{}.property("$.to", "/elsewhere").build();
  CHECK(c2d_topic("dev1", with_to) == "devices/dev1/messages/devicebound/%24.to=%2Felsewhere");

  auto from_module = message_builder{}
                       .connection_device_id("dev1")
                       .connection_module_id("filter")
                       .output_name("out")
                       .build();
  CHECK(module_input_topic("dev1", "mod1", "input1", from_module) ==
        "devices/dev1/modules/mod1/inputs/input1/%24.cdid=dev1&%24.cmid=filter&%24.on=out");
  CHECK(module_input_topic("dev1", "mod1", "input1", message{}) ==
        "devices/dev1/modules/mod1/inputs/input1/");

  CHECK(twin_response_topic(200, "1") == "$iothub/twin/res/200/?$rid=1");
  CHECK(twin_response_topic(204, "4", 12) == "$iothub/twin/res/204/?$rid=4&$version=12");
  CHECK(twin_response_topic(400, "a b") == "$iothub/twin/res/400/?$rid=a%20b");
  CHECK(desired_patch_topic(5) == "$iothub/twin/PATCH/properties/desired/?$version=5");
  CHECK(method_request_topic("reboot", "1f") == "$iothub/methods/POST/reboot/?$rid=1f");
  CHECK(method_request_topic("a/b", "1") == "$iothub/methods/POST/a%2Fb/?$rid=1");
}

TEST_CASE("iothub: what the server publishes parses back", "[iothub]") {
  auto m = message_builder{}.message_id("m&1").property("x=y", "a/b").build();
  auto topic = module_input_topic("dev1", "mod1", "in", m);
  constexpr std::string_view fixed = "devices/dev1/modules/mod1/inputs/in/";
  REQUIRE(topic.starts_with(fixed));
  auto bag = parse_property_bag(std::string_view{topic}.substr(fixed.size()));
  REQUIRE(bag.ok());
  CHECK(value_of(*bag, "$.mid") == "m&1");
  CHECK(value_of(*bag, "x=y") == "a/b");
}

// -- SAS tokens -------------------------------------------------------------------

// Known answers computed independently with Python's standard library:
//   python3 -c "import hmac,hashlib,base64,urllib.parse
//   key='AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8='
//   uri=urllib.parse.quote('myhub.azure-devices.net/devices/dev1', safe='')
//   se=1700000000
//   sig=base64.b64encode(hmac.new(base64.b64decode(key), ('%s\n%d'%(uri,se)).encode(),
//                                 hashlib.sha256).digest()).decode()
//   print('SharedAccessSignature sr=%s&sig=%s&se=%d'%(uri, urllib.parse.quote(sig, safe=''), se))"
const std::string kat_device =
  "SharedAccessSignature sr=myhub.azure-devices.net%2Fdevices%2Fdev1"
  "&sig=i%2BYmMcSSZc4KzBi6ejz3l0iL%2B2sN0CE3q6vSm837h2g%3D&se=1700000000";
// The same for 'myhub.azure-devices.net/devices/plant:1/modules/filter' with '&skn=device'.
const std::string kat_module =
  "SharedAccessSignature sr=myhub.azure-devices.net%2Fdevices%2Fplant%3A1%2Fmodules%2Ffilter"
  "&sig=OGAt%2FaNbYM07sQJae50c0%2Blh63mCyA919BcIEaw49sU%3D&se=1700000000&skn=device";
// The .NET SDK's form: the device id encoded, then the whole resource again
// (uri = quote('myhub.azure-devices.net/devices/' + quote('plant:1', safe=''), safe='')).
const std::string kat_dotnet =
  "SharedAccessSignature sr=myhub.azure-devices.net%2Fdevices%2Fplant%253A1"
  "&sig=Srkioq9S5vjqMNHkEvdGtukRey7DrSewRHPMnKj2x%2Fc%3D&se=1700000000";

TEST_CASE("iothub: SAS known answers", "[iothub][sas]") {
  auto t = parse_sas(kat_device);
  REQUIRE(t.ok());
  CHECK(t->resource == "myhub.azure-devices.net/devices/dev1");
  CHECK(t->expiry_s == 1700000000);
  CHECK(t->key_name.empty());
  CHECK(t->signature.size() == 32);
  CHECK(verify_sas(*t, key, "myhub.azure-devices.net/devices/dev1", 1699999999).ok());

  // make_sas writes exactly what Python wrote.
  auto made = make_sas("myhub.azure-devices.net/devices/dev1", key, 1700000000);
  REQUIRE(made.ok());
  CHECK(*made == kat_device);

  auto tm = parse_sas(kat_module);
  REQUIRE(tm.ok());
  CHECK(tm->key_name == "device");
  CHECK(verify_sas(*tm, key, "myhub.azure-devices.net/devices/plant:1/modules/filter", 1).ok());
  CHECK(*make_sas("myhub.azure-devices.net/devices/plant:1/modules/filter", key, 1700000000,
                  "device") == kat_module);

  auto td = parse_sas(kat_dotnet);
  REQUIRE(td.ok());
  CHECK(td->resource == "myhub.azure-devices.net/devices/plant%3A1");
  CHECK(verify_sas(*td, key, "myhub.azure-devices.net/devices/plant:1", 1).ok());
}

TEST_CASE("iothub: SAS resource comparison", "[iothub][sas]") {
  auto t = *parse_sas(kat_device);
  CHECK(verify_sas(t, key, "MyHub.Azure-Devices.NET/devices/dev1", 0).ok());   // host: any case
  CHECK(verify_sas(t, key, "myhub.azure-devices.net/devices/dev1/", 0).ok());  // trailing '/'
  auto r = verify_sas(t, key, "myhub.azure-devices.net/devices/DEV1", 0);      // ids: exact
  REQUIRE_FALSE(r.ok());
  CHECK(r.err().message ==
        "SAS token: signed for resource 'myhub.azure-devices.net/devices/dev1', expected "
        "'myhub.azure-devices.net/devices/DEV1'");
  CHECK_FALSE(verify_sas(t, key, "myhub.azure-devices.net/devices/dev1/modules/m", 0).ok());
  CHECK_FALSE(verify_sas(t, key, "otherhub.azure-devices.net/devices/dev1", 0).ok());
}

TEST_CASE("iothub: SAS make and verify round trip, and what fails", "[iothub][sas]") {
  const std::string res = "hub.local/devices/dev1/modules/mod1";
  auto token = make_sas(res, key, 2000);
  REQUIRE(token.ok());
  auto t = parse_sas(*token);
  REQUIRE(t.ok());
  CHECK(verify_sas(*t, key, res, 1999).ok());

  auto expired = verify_sas(*t, key, res, 2000);
  REQUIRE_FALSE(expired.ok());
  CHECK(expired.err().message == "SAS token: expired at 2000 (now 2000)");

  auto wrong_key = verify_sas(*t, other_key, res, 0);
  REQUIRE_FALSE(wrong_key.ok());
  CHECK(wrong_key.err().message == "SAS token: signature does not match");

  auto wrong_res = verify_sas(*t, key, "hub.local/devices/dev1", 0);
  REQUIRE_FALSE(wrong_res.ok());
  CHECK(contains(wrong_res.err().message, "signed for resource"));

  // A token altered after signing: a later expiry, another resource.
  auto forged = *token;
  forged.replace(forged.find("se=2000"), 7, "se=9000");
  CHECK(verify_sas(*parse_sas(forged), key, res, 0).err().message ==
        "SAS token: signature does not match");

  auto bad_key = verify_sas(*t, "not base64!", res, 0);
  REQUIRE_FALSE(bad_key.ok());
  CHECK(contains(bad_key.err().message, "malformed: key"));
  CHECK_FALSE(make_sas(res, "not base64!", 1).ok());
  CHECK_FALSE(make_sas(res, "", 1).ok());
}

TEST_CASE("iothub: SAS fields in any order, names in any case, unknown ones ignored",
          "[iothub][sas]") {
  auto t = parse_sas(
    "sharedaccesssignature "
    "SE=1700000000&foo=bar&SIG=i%2BYmMcSSZc4KzBi6ejz3l0iL%2B2sN0CE3q6vSm837h2g%3D"
    "&sr=myhub.azure-devices.net%2Fdevices%2Fdev1");
  REQUIRE(t.ok());
  CHECK(verify_sas(*t, key, "myhub.azure-devices.net/devices/dev1", 0).ok());
  // A signature that was not URL-encoded (raw '+' and '=') still verifies.
  auto raw = parse_sas(
    "SharedAccessSignature sr=myhub.azure-devices.net%2Fdevices%2Fdev1"
    "&sig=i+YmMcSSZc4KzBi6ejz3l0iL+2sN0CE3q6vSm837h2g=&se=1700000000");
  REQUIRE(raw.ok());
  CHECK(verify_sas(*raw, key, "myhub.azure-devices.net/devices/dev1", 0).ok());
}

TEST_CASE("iothub: malformed SAS tokens name the field", "[iothub][sas]") {
  const std::string sig = "sig=i%2BYmMcSSZc4KzBi6ejz3l0iL%2B2sN0CE3q6vSm837h2g%3D";
  struct row {
    std::string token, error;
  };
  auto rows = GENERATE_COPY(values<row>({
    {"", "malformed: does not start with 'SharedAccessSignature '"},
    {"sr=a&" + sig + "&se=1", "malformed: does not start with"},
    {"SharedAccessSignature " + sig + "&se=1", "malformed: field sr (resource) missing"},
    {"SharedAccessSignature sr=a&se=1", "malformed: field sig (signature) missing"},
    {"SharedAccessSignature sr=a&" + sig, "malformed: field se (expiry) missing"},
    {"SharedAccessSignature sr=&" + sig + "&se=1", "malformed: field sr is empty"},
    {"SharedAccessSignature sr=a&sr=b&" + sig + "&se=1", "malformed: field sr given twice"},
    {"SharedAccessSignature sr=a&" + sig + "&se=soon",
     "malformed: field se 'soon' is not a number"},
    {"SharedAccessSignature sr=a&" + sig + "&se=-5", "malformed: field se '-5'"},
    {"SharedAccessSignature sr=a&" + sig + "&se=99999999999999999999", "malformed: field se"},
    {"SharedAccessSignature sr=a&sig=%%%&se=1", "malformed: field sig is not base64"},
    {"SharedAccessSignature sr=a&sig=AAAA&se=1",
     "malformed: field sig is 3 bytes, an HMAC-SHA256 is 32"},
    {"SharedAccessSignature sr=a&" + sig + "&se", "malformed: field 'se' has no '='"},
    {"SharedAccessSignature sr=a&" + sig + "&se=1&" + std::string(5000, 'x'), "at most 4096"},
  }));
  CAPTURE(rows.token);
  auto t = parse_sas(rows.token);
  REQUIRE_FALSE(t.ok());
  CHECK(t.err().code == errc::invalid_argument);
  CHECK(contains(t.err().message, "SAS token: "));
  CHECK(contains(t.err().message, rows.error));
}

TEST_CASE("iothub: base64", "[iothub]") {
  CHECK(base64_encode("") == "");
  CHECK(base64_encode("f") == "Zg==");
  CHECK(base64_encode("fo") == "Zm8=");
  CHECK(base64_encode("foo") == "Zm9v");
  CHECK(base64_encode("foob") == "Zm9vYg==");
  CHECK(base64_decode("Zm9vYg==") == std::optional<std::string>{"foob"});
  CHECK(base64_decode("Zm9vYg") == std::optional<std::string>{"foob"});
  CHECK(base64_decode("Zm9vYmE=") == std::optional<std::string>{"fooba"});
  CHECK(base64_decode("") == std::optional<std::string>{""});
  CHECK_FALSE(base64_decode("Zm9v YmE="));
  CHECK_FALSE(base64_decode("Zm9vY"));
  CHECK_FALSE(
    base64_decode("Zm9vYmE"
                  "=="));
  CHECK_FALSE(base64_decode("Zg=a"));
  CHECK_FALSE(base64_decode("Zm9v-_"));
  std::string all;
  for (int i = 0; i < 256; ++i)
    all += static_cast<char>(i);
  CHECK(base64_decode(base64_encode(all)) == std::optional<std::string>{all});
}
