// libFuzzer target: the Azure IoT Hub protocol layer (gateway/iothub_protocol)
// on what a client controls: the input is split at the first three '\n' into
// (topic, property bag, user name, SAS token), and every parser runs on its
// part, as the MQTT server would on a CONNECT, SUBSCRIBE or PUBLISH.
//
// Invariants checked beyond "never crashes, never throws":
// - percent_decode(percent_encode(x)) == x, base64_decode(base64_encode(x)) == x;
// - a bag that parses re-encodes to a bag that parses to the same pairs;
// - what the server would publish (c2d / module input topics) from a message
//   built of a parsed bag parses back as a bag;
// - a token make_sas makes for any resource parses and verifies for that
//   resource, and fails for another key;
// - errors are non-empty.
#include "gateway/iothub_protocol.hpp"

#include <canopy/message.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <string>
#include <string_view>

namespace {

using namespace canopy;
using namespace canopy::iothub;

void check(bool ok, const char* what, const std::string& detail) {
  if (!ok) {
    std::fprintf(stderr, "invariant violated: %s: %s\n", what, detail.c_str());
    __builtin_trap();
  }
}

template <class T>
void check_error(const expected<T>& r, const char* what) {
  if (!r.ok())
    check(!r.err().message.empty(), what, "empty error message");
}

const std::string key = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const std::string other_key = "HxwdHhobGBkWFxQVEhMQEQ4PDA0KCwgJBgcEBQIDAAE=";

void codecs(std::string_view s) {
  check(percent_decode(percent_encode(s)) == s, "percent round trip", std::string{s});
  auto b = base64_decode(base64_encode(s));
  check(b && *b == s, "base64 round trip", std::string{s});
  (void) base64_decode(s);
}

void bag(std::string_view text) {
  auto parsed = parse_property_bag(text);
  check_error(parsed, "parse_property_bag");
  if (!parsed)
    return;
  auto again = parse_property_bag(encode_property_bag(*parsed));
  check(again.ok() && *again == *parsed, "bag re-encodes", std::string{text});

  message_builder b;
  b.body(text);
  apply_property_bag(b, *parsed);
  auto m = b.build();
  for (auto topic : {c2d_topic("dev1", m), module_input_topic("dev1", "mod1", "in1", m)}) {
    constexpr std::string_view marker = "devicebound/";
    auto at = topic.find(marker);
    std::string_view rest = at != std::string::npos
                              ? std::string_view{topic}.substr(at + marker.size())
                              : std::string_view{topic}.substr(
                                  std::string_view{"devices/dev1/modules/mod1/inputs/in1/"}.size());
    auto back = parse_property_bag(rest);
    check(back.ok(), "outbound bag parses", topic + (back ? "" : ": " + back.err().message));
  }
}

void topic(std::string_view t, const client_identity& who) {
  auto in = parse_publish_topic(t, who);
  check_error(in, "parse_publish_topic");
  if (in) {
    if (in->kind == inbound_kind::telemetry || in->kind == inbound_kind::module_output) {
      auto m = build_message(*in, who, "x");
      check(m.connection_device_id() == who.device_id, "build_message device", std::string{t});
    } else {
      (void) twin_response_topic(in->status, in->rid, in->version);
    }
  }
  check_error(check_subscription(t, who), "check_subscription");
}

void identities(std::string_view user_name, std::string_view t) {
  auto cid = parse_client_id(user_name);
  check_error(cid, "parse_client_id");
  auto u = parse_username(user_name);
  check_error(u, "parse_username");
  if (u) {
    check(!u->device_id.empty() && !u->api_version.empty(), "parse_username fields",
          std::string{user_name});
    auto who = u->identity();
    check_error(check_same_identity(who, *u), "check_same_identity");
    check(check_same_identity(who, *u).ok(), "identity agrees with itself", std::string{user_name});
    if (cid)
      (void) check_same_identity(*cid, *u);
    topic(t, who);
    (void) identity_resource(u->host, who);
  }
}

void sas(std::string_view token, std::string_view resource) {
  auto t = parse_sas(token);
  check_error(t, "parse_sas");
  if (t) {
    check(t->signature.size() == 32, "signature size", std::string{token});
    check_error(verify_sas(*t, key, t->resource, 0), "verify_sas");
    check_error(verify_sas(*t, key, resource, t->expiry_s), "verify_sas");
  }
  // make_sas for the fuzzed resource must verify for it.
  if (!resource.empty() && resource.size() <= 1000) {
    auto made = make_sas(resource, key, 1700000000, "skn");
    check(made.ok(), "make_sas", std::string{resource});
    auto parsed = parse_sas(*made);
    check(parsed.ok(), "made token parses", *made + (parsed ? "" : ": " + parsed.err().message));
    check(parsed->resource == resource, "made token resource", *made);
    auto ok = verify_sas(*parsed, key, resource, 1699999999);
    check(ok.ok(), "made token verifies", *made + (ok ? "" : ": " + ok.err().message));
    check(!verify_sas(*parsed, other_key, resource, 0).ok(), "other key refused", *made);
    check(!verify_sas(*parsed, key, resource, 1700000000).ok(), "expiry enforced", *made);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  std::string_view in(reinterpret_cast<const char*>(data), size);
  std::string_view parts[4];
  for (int i = 0; i < 3; ++i) {
    auto nl = in.find('\n');
    parts[i] = in.substr(0, nl);
    in = nl == std::string_view::npos ? std::string_view{} : in.substr(nl + 1);
  }
  parts[3] = in;

  for (auto p : parts)
    codecs(p);
  topic(parts[0], client_identity{"dev1", ""});
  topic(parts[0], client_identity{"dev1", "mod1"});
  bag(parts[1]);
  identities(parts[2], parts[0]);
  sas(parts[3], parts[0]);
  return 0;
}
