// Who an MQTT client is (gateway/mqtt_auth.hpp): the bad-credential matrix
// of issue 5 at the level of the decision, with real SAS tokens.
#include "gateway/mqtt_auth.hpp"

#include "gateway/iothub_protocol.hpp"

#include <catch2/catch.hpp>

#include <string>

using namespace canopy;

namespace {

constexpr std::int64_t now = 1'800'000'000;
const std::string hub = "hub.example.net";
// Two base64 keys (32 bytes each).
const std::string key1 = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
const std::string key2 = "ZmVkY2JhOTg3NjU0MzIxMGZlZGNiYTk4NzY1NDMyMTA=";

std::string token(const std::string& resource, const std::string& key, std::int64_t expiry = now + 3600) {
  auto t = iothub::make_sas(resource, key, expiry);
  REQUIRE(t.ok());
  return *t;
}

mqtt_connect_info connect_as(const std::string& client_id, std::optional<std::string> password = std::nullopt) {
  mqtt_connect_info info;
  info.packet.client_id = client_id;
  info.packet.username = hub + "/" + client_id + "/?api-version=2021-04-12";
  info.packet.password = std::move(password);
  info.tls = true;
  return info;
}

mqtt_credentials sas_device(std::string parent = "gw-1") {
  mqtt_credentials c;
  c.parent = std::move(parent);
  c.auth = "sas";
  c.primary_key = key1;
  c.secondary_key = key2;
  return c;
}

const mqtt_auth_context ctx{"gw-1", hub, now};

/// The refusal's reason, or "" if accepted.
std::string refusal(const std::variant<mqtt_identity, mqtt_refusal>& r) {
  if (auto* no = std::get_if<mqtt_refusal>(&r))
    return no->reason;
  return "";
}

}  // namespace

TEST_CASE("mqtt auth: SAS tokens signed with the primary or secondary key, for the right resource, in time",
          "[mqtt_auth]") {
  const auto resource = hub + "/devices/dev-1";
  for (const auto& key : {key1, key2}) {
    auto r = authenticate_mqtt(connect_as("dev-1", token(resource, key)), sas_device(), ctx);
    REQUIRE(std::holds_alternative<mqtt_identity>(r));
    CHECK(std::get<mqtt_identity>(r).who.device_id == "dev-1");
    CHECK(std::get<mqtt_identity>(r).auth == "sas");
  }
  // A module of a device: its own resource.
  auto m = authenticate_mqtt(connect_as("gw-1/py", token(hub + "/devices/gw-1/modules/py", key1)), sas_device(""), ctx);
  REQUIRE(std::holds_alternative<mqtt_identity>(m));
  CHECK(std::get<mqtt_identity>(m).who.module_id == "py");
}

TEST_CASE("mqtt auth: the bad-credential matrix is refused, each with its CONNACK code and reason", "[mqtt_auth]") {
  const auto resource = hub + "/devices/dev-1";
  struct row {
    const char* what;
    mqtt_connect_info info;
    std::optional<mqtt_credentials> creds;
    mqtt::connack_code code;
    const char* reason;
  };
  const std::string other_key = "b3RoZXJrZXlvdGhlcmtleW90aGVya2V5b3RoZXJrZXk=";
  auto no_user = connect_as("dev-1", token(resource, key1));
  no_user.packet.username.reset();
  auto mismatched = connect_as("dev-1", token(resource, key1));
  mismatched.packet.username = hub + "/dev-2/?api-version=2021-04-12";
  std::vector<row> rows = {
    {"wrong key", connect_as("dev-1", token(resource, other_key)), sas_device(),
     mqtt::connack_code::not_authorized, "signature does not match"},
    {"expired token", connect_as("dev-1", token(resource, key1, now - 1)), sas_device(),
     mqtt::connack_code::not_authorized, "expired"},
    {"another device's token", connect_as("dev-1", token(hub + "/devices/dev-2", key1)), sas_device(),
     mqtt::connack_code::not_authorized, "signed for resource"},
    {"unknown device", connect_as("dev-9", token(hub + "/devices/dev-9", key1)), std::nullopt,
     mqtt::connack_code::not_authorized, "is not registered with 'gw-1'"},
    {"a sibling gateway's device", connect_as("dev-1", token(resource, key1)), sas_device("gw-2"),
     mqtt::connack_code::not_authorized, "belongs to 'gw-2', not to 'gw-1'"},
    {"no password", connect_as("dev-1"), sas_device(), mqtt::connack_code::bad_user_name_or_password,
     "no password was sent"},
    {"not a SAS token", connect_as("dev-1", std::string("hunter2")), sas_device(),
     mqtt::connack_code::bad_user_name_or_password, "SharedAccessSignature"},
    {"no user name", no_user, sas_device(), mqtt::connack_code::bad_user_name_or_password, "no user name"},
    {"user name of another device", mismatched, sas_device(), mqtt::connack_code::identifier_rejected, "dev-2"},
    {"bad client id", connect_as("", token(resource, key1)), sas_device(), mqtt::connack_code::identifier_rejected,
     "client id"},
  };
  for (const auto& r : rows) {
    INFO(r.what);
    auto out = authenticate_mqtt(r.info, r.creds, ctx);
    REQUIRE(std::holds_alternative<mqtt_refusal>(out));
    CHECK(std::get<mqtt_refusal>(out).code == r.code);
    CHECK_THAT(std::get<mqtt_refusal>(out).reason, Catch::Contains(r.reason));
  }
}

TEST_CASE("mqtt auth: X.509 by the fleet CA (CN = device id) or by thumbprint", "[mqtt_auth]") {
  mqtt_credentials ca;
  ca.parent = "gw-1";
  ca.auth = "x509_ca";
  auto info = connect_as("dev-x");
  info.cert_cn = "dev-x";
  info.cert_thumbprint = std::string(64, 'A');
  info.cert_thumbprint_sha1 = std::string(40, 'B');
  info.cert_chain_ok = true;
  CHECK(refusal(authenticate_mqtt(info, ca, ctx)).empty());

  auto other_ca = info;
  other_ca.cert_chain_ok = false;
  other_ca.cert_chain_error = "unable to get local issuer certificate";
  CHECK_THAT(refusal(authenticate_mqtt(other_ca, ca, ctx)), Catch::Contains("does not chain to the fleet CA"));

  auto other_cn = info;
  other_cn.cert_cn = "dev-y";
  CHECK_THAT(refusal(authenticate_mqtt(other_cn, ca, ctx)), Catch::Contains("the certificate is for 'dev-y'"));

  auto none = connect_as("dev-x");
  CHECK_THAT(refusal(authenticate_mqtt(none, ca, ctx)), Catch::Contains("none was sent"));

  auto plain = info;
  plain.tls = false;  // a certificate can only come over TLS
  CHECK_THAT(refusal(authenticate_mqtt(plain, ca, ctx)), Catch::Contains("none was sent"));

  mqtt_credentials pinned;
  pinned.parent = "gw-1";
  pinned.auth = "x509_thumbprint";
  auto self_signed = info;
  self_signed.cert_chain_ok = false;  // self-signed: the thumbprint pins it
  pinned.thumbprint = std::string(64, 'a');  // case does not matter
  CHECK(refusal(authenticate_mqtt(self_signed, pinned, ctx)).empty());
  pinned.thumbprint = std::string(40, 'b');  // a SHA-1 registration
  CHECK(refusal(authenticate_mqtt(self_signed, pinned, ctx)).empty());
  pinned.thumbprint = std::string(64, 'C');
  CHECK_THAT(refusal(authenticate_mqtt(self_signed, pinned, ctx)), Catch::Contains("is not the registered one"));
}
