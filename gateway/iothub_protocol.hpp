// The Azure IoT Hub device protocol over MQTT 3.1.1: what a device or module
// written for Azure IoT Hub (or IoT Edge's edgeHub) sends and expects, so that
// it works against a Canopy node unchanged. Pure C++ (no CAF, no KJ); OpenSSL's
// libcrypto for HMAC-SHA256. Everything here is a pure function of its
// arguments: callable from any thread.
//
// What the real SDKs and services do, and so what this accepts and produces
// (sources: Azure's "Communicate with an IoT hub using the MQTT protocol";
// azure-iot-sdk-c iothub_client/src/iothubtransport_mqtt_common.c;
// azure-iot-sdk-python azure-iot-device/.../pipeline/mqtt_topic_iothub.py;
// azure-sdk-for-c az_iot_hub_client*.c; Azure/iotedge edge-hub MqttUsernameParser.cs,
// SessionStatePersistenceProvider.cs, SystemProperties.cs, MessageAddressConverter.cs;
// azure-iot-sdk-csharp UrlEncodedDictionarySerializer.cs):
//
//   CONNECT client id   {deviceId} | {deviceId}/{moduleId}
//   CONNECT user name   {host}/{deviceId}[/{moduleId}]/?api-version=...[&DeviceClientType=...]
//                       (edgeHub also takes the old form without the '?')
//   CONNECT password    SharedAccessSignature sr={url-encoded resource}&sig={url-encoded
//                       base64 HMAC-SHA256}&se={unix seconds}[&skn={policy}]
//   publish (in)        devices/{d}/messages/events/{bag}             telemetry
//                       devices/{d}/modules/{m}/messages/events/{bag}  module output ($.on)
//                       $iothub/twin/GET/?$rid={rid}
//                       $iothub/twin/PATCH/properties/reported/?$rid={rid}[&$version=..]
//                       $iothub/methods/res/{status}/?$rid={rid}
//   subscribe           devices/{d}/messages/devicebound/#  (azure-sdk-for-c: devices/+/...)
//                       $iothub/twin/res/#   $iothub/twin/PATCH/properties/desired/#
//                       $iothub/methods/POST/#
//                       devices/{d}/modules/{m}/#  (C, .NET)  devices/{d}/modules/{m}/inputs/#
//                       (Python)
//   publish (out)       devices/{d}/messages/devicebound/{bag}
//                       devices/{d}/modules/{m}/inputs/{input}/{bag}
//                       $iothub/twin/res/{status}/?$rid={rid}[&$version={v}]
//                       $iothub/twin/PATCH/properties/desired/?$version={v}
//                       $iothub/methods/POST/{method}/?$rid={rid}
//
// Property bags are "k1=v1&k2=v2", each name and value percent-encoded (RFC 3986:
// all but A-Z a-z 0-9 - . _ ~, upper-case hex; '+' is a literal plus, not a
// space). System properties are the names starting "$." (on the wire "%24."):
// $.mid message-id, $.cid correlation-id, $.ct content-type, $.ce
// content-encoding, $.uid user-id, $.ctime creation time, $.on output name,
// $.cdid / $.cmid connection device / module id. The others Azure defines
// ($.to, $.exp, $.ifid, $.schema, $.sub, $.diagid, $.diagctx, $.mop, ack,
// iothub-operation) have no field in canopy::message: they travel as
// application properties under their "$." names, so they come out again
// exactly as they went in.
#pragma once

#include "runtime/expected.hpp"

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace canopy {
class message;
class message_builder;
}  // namespace canopy

namespace canopy::iothub {

// -- identities ----------------------------------------------------------------

/// Who a connection is: a device (module_id empty) or one of its modules.
struct client_identity {
  std::string device_id;  ///< never empty once parsed
  std::string module_id;  ///< "" for a device

  /// True for a module identity.
  bool is_module() const noexcept { return !module_id.empty(); }
  /// "dev" or "dev/mod", as in the MQTT client id.
  std::string to_string() const;
  /// Same device and module (case-sensitive).
  friend bool operator==(const client_identity&, const client_identity&) = default;
};

/// Longest device or module id (IoT Hub's limit).
inline constexpr std::size_t max_id_length = 128;

/// True if `id` is a device or module id IoT Hub allows: 1 to 128 ASCII
/// letters, digits and - . + % _ # * ? ! ( ) , : = @ $ ' (no '/'). The node's
/// registry may be stricter; this is the protocol's rule.
bool is_valid_id(std::string_view id) noexcept;

/// Parses an MQTT client id: "{deviceId}" or "{deviceId}/{moduleId}". Errors
/// name the part ("client id: module id ... is not a valid id").
expected<client_identity> parse_client_id(std::string_view client_id);

/// A parsed CONNECT user name.
struct username_info {
  std::string host;         ///< the hub's host name as the client wrote it
  std::string device_id;    ///< the device the user name names
  std::string module_id;    ///< "" for a device
  std::string api_version;  ///< required by IoT Hub and edgeHub; its value is not checked
  /// Every query parameter, percent-decoded, in order (api-version,
  /// DeviceClientType, model-id, ...); a repeated name keeps its first value.
  std::vector<std::pair<std::string, std::string>> query;

  /// The identity the user name names.
  client_identity identity() const { return {device_id, module_id}; }
};

/// Parses "{host}/{deviceId}[/{moduleId}]/?{query}" (also edgeHub's older form
/// "{host}/{deviceId}[/{moduleId}]/{query}" whose last segment holds
/// "api-version="). Errors name the part at fault.
expected<username_info> parse_username(std::string_view user_name);

/// Checks that the client id and the user name name the same identity
/// (case-sensitive, as IoT Hub ids are). The error says what each one names.
expected<void> check_same_identity(const client_identity& from_client_id,
                                   const username_info& from_user_name);

/// The SAS resource of an identity: "{host}/devices/{d}" or
/// "{host}/devices/{d}/modules/{m}" (not encoded). A leaf device behind a
/// transparent gateway signs for the hub's HostName, not the GatewayHostName.
std::string identity_resource(std::string_view host, const client_identity& who);

// -- property bags -------------------------------------------------------------

/// Decoded (name, value) pairs in wire order, names unique.
using property_bag = std::vector<std::pair<std::string, std::string>>;

/// Most properties one bag may hold.
inline constexpr std::size_t max_bag_properties = 256;

/// On-the-wire names of the system properties (decoded form).
namespace sys {
inline constexpr std::string_view message_id = "$.mid";             ///< message_id()
inline constexpr std::string_view correlation_id = "$.cid";         ///< correlation_id()
inline constexpr std::string_view content_type = "$.ct";            ///< content_type()
inline constexpr std::string_view content_encoding = "$.ce";        ///< content_encoding()
inline constexpr std::string_view user_id = "$.uid";                ///< user_id()
inline constexpr std::string_view creation_time = "$.ctime";        ///< ISO 8601 UTC
inline constexpr std::string_view output_name = "$.on";             ///< output_name()
inline constexpr std::string_view connection_device_id = "$.cdid";  ///< outbound only
inline constexpr std::string_view connection_module_id = "$.cmid";  ///< outbound only
inline constexpr std::string_view to = "$.to";                      ///< a property (no field)
inline constexpr std::string_view expiry = "$.exp";                 ///< ISO 8601 UTC, absolute
}  // namespace sys

/// Percent-encodes every byte but A-Z a-z 0-9 - . _ ~ (RFC 3986 unreserved),
/// with upper-case hex: what IoT Hub, edgeHub and the SDKs put in topics.
std::string percent_encode(std::string_view s);

/// Decodes %XX escapes (either case). Like .NET's Uri.UnescapeDataString and
/// Python's unquote, an escape that is not % followed by two hex digits is
/// kept as it is, and '+' stays '+'. Never fails.
std::string percent_decode(std::string_view s);

/// Parses a property bag "k1=v1&k2&k3=" (a name without '=' has an empty
/// value). A leading '?' is skipped (the C2D example in Azure's docs has one;
/// edgeHub ignores it), empty segments are skipped, a value may hold '=' and
/// '/', a repeated name takes the later value (in the first one's place).
/// Errors name the property and the byte: an empty name, more than
/// max_bag_properties, a name or value that is not UTF-8 (or holds U+0000)
/// once decoded.
expected<property_bag> parse_property_bag(std::string_view bag);

/// Encodes a bag: percent_encode(name) "=" percent_encode(value), joined by '&'.
/// A property with an empty value is written "name=" (the SDKs read both forms).
std::string encode_property_bag(const property_bag& bag);

/// Applies a bag from a device to a message being built: $.mid $.cid $.ct $.ce
/// $.uid $.on to their fields, $.ctime to creation_time_utc_ms when it is an
/// ISO 8601 UTC time (else kept as a property); $.cdid and $.cmid are dropped
/// (a client does not choose its connection ids: the server sets them from the
/// authenticated identity); everything else becomes an application property
/// under its own name.
void apply_property_bag(message_builder& b, const property_bag& bag);

/// The bag IoT Hub / edgeHub would send for `m`: its system properties that are
/// set ($.mid $.cid $.ct $.ce $.uid $.ctime $.cdid $.cmid $.on, in that order),
/// then its application properties in order.
property_bag bag_of(const message& m);

// -- topics a client publishes to ---------------------------------------------

/// What an inbound PUBLISH is.
enum class inbound_kind {
  telemetry,            ///< devices/{d}/messages/events/{bag}
  module_output,        ///< devices/{d}/modules/{m}/messages/events/{bag}
  twin_get,             ///< $iothub/twin/GET/?$rid=
  twin_patch_reported,  ///< $iothub/twin/PATCH/properties/reported/?$rid=
  method_response,      ///< $iothub/methods/res/{status}/?$rid=
};

/// "telemetry", "module output", ... for logs.
const char* to_string(inbound_kind k) noexcept;

/// A parsed inbound PUBLISH topic.
struct inbound {
  inbound_kind kind = inbound_kind::telemetry;
  /// telemetry / module_output: the decoded bag, system properties included
  /// (apply_property_bag / build_message make a message of it).
  property_bag properties;
  /// module_output (and a device's telemetry if it set one): $.on.
  std::string output;
  /// twin_get / twin_patch_reported / method_response: the request id, decoded.
  std::string rid;
  /// method_response: the status the method returned.
  int status = 0;
  /// twin_patch_reported: $version when the client gave one.
  std::optional<std::int64_t> version;
};

/// Longest $rid accepted.
inline constexpr std::size_t max_rid_length = 256;

/// Parses the topic of a PUBLISH from the authenticated client `who`. A device
/// publishing as another device, a device using a module topic, a module
/// using its device's or another module's topic, an unknown topic: errors
/// whose text says which part is wrong, for a log line such as
/// "client X: publish to Y refused: <message>". A device or module id in the
/// topic may be written raw (as the SDKs do) or percent-encoded.
expected<inbound> parse_publish_topic(std::string_view topic, const client_identity& who);

/// Builds the message for a telemetry / module_output PUBLISH: `body`, the bag
/// applied (apply_property_bag), connection device/module id from `who`, output
/// name from `in.output`.
message build_message(const inbound& in, const client_identity& who, std::string_view body);

// -- topic filters a client subscribes to -------------------------------------

/// What a client subscribed to (the server delivers by kind).
enum class subscription {
  c2d,              ///< devices/{d}/messages/devicebound/#, devices/+/messages/devicebound/#
  twin_responses,   ///< $iothub/twin/res/#
  desired_patches,  ///< $iothub/twin/PATCH/properties/desired/#
  methods,          ///< $iothub/methods/POST/#
  module_inputs,    ///< devices/{d}/modules/{m}/# or devices/{d}/modules/{m}/inputs/#
};

/// "c2d", "twin responses", ... for logs.
const char* to_string(subscription s) noexcept;

/// Checks a SUBSCRIBE filter of client `who`. Accepted: the filters above,
/// and (as edgeHub does) any filter that starts "$iothub/twin/res/",
/// "$iothub/twin/PATCH/properties/desired/" or "$iothub/methods/POST/".
/// C2D is for devices, inputs for modules. Another device's or module's topics
/// and anything else are refused with the reason (the server answers 0x80).
expected<subscription> check_subscription(std::string_view filter, const client_identity& who);

// -- topics the server publishes to -------------------------------------------

/// "devices/{device}/messages/devicebound/" + the bag of `m` with $.to set to
/// "/devices/{device}/messages/deviceBound" (as IoT Hub sends; kept if `m`
/// has a "$.to" property). Always ends the fixed part with '/': the C SDK
/// needs it.
std::string c2d_topic(std::string_view device, const message& m);

/// "devices/{device}/modules/{module}/inputs/{input}/" + the bag of `m`
/// (the trailing '/' after the input name is required by the C SDK).
std::string module_input_topic(std::string_view device, std::string_view module,
                               std::string_view input, const message& m);

/// "$iothub/twin/res/{status}/?$rid={rid}[&$version={version}]".
std::string twin_response_topic(int status, std::string_view rid,
                                std::optional<std::int64_t> version = std::nullopt);

/// "$iothub/twin/PATCH/properties/desired/?$version={version}".
std::string desired_patch_topic(std::int64_t version);

/// "$iothub/methods/POST/{method}/?$rid={rid}" (both percent-encoded; plain
/// names are unchanged).
std::string method_request_topic(std::string_view method, std::string_view rid);

// -- SAS tokens ----------------------------------------------------------------

/// A parsed shared access signature token.
struct sas_token {
  std::string resource;          ///< sr, percent-decoded ("hub.example/devices/dev1")
  std::string resource_as_sent;  ///< sr exactly as in the token: what was signed
  std::string signature;         ///< sig, base64-decoded: the 32 HMAC-SHA256 bytes
  std::string expiry_text;       ///< se exactly as in the token: what was signed
  std::int64_t expiry_s = 0;     ///< se, seconds since the Unix epoch
  std::string key_name;          ///< skn, decoded ("" if absent: a device or module key)
};

/// Longest token parse_sas reads.
inline constexpr std::size_t max_sas_length = 4096;

/// Parses "SharedAccessSignature sr=..&sig=..&se=..[&skn=..]" (fields in any
/// order, names case-insensitive, unknown fields ignored). Errors say
/// "malformed: field X" and why.
expected<sas_token> parse_sas(std::string_view token);

/// Verifies `token` against a base64 key: the resource (compared decoded, host
/// case-insensitive, a trailing '/' tolerated; a path encoded twice, as the
/// .NET SDK does for ids with reserved characters, also matches), then the
/// HMAC-SHA256 of "{sr as sent}\n{se as sent}" (compared in constant time),
/// then the expiry (valid while now_s < expiry). Errors: "signed for resource R,
/// expected E", "signature does not match", "expired at T (now N)",
/// "malformed: key ..." for a key that is not base64.
expected<void> verify_sas(const sas_token& token, std::string_view key_base64,
                          std::string_view expected_resource, std::int64_t now_s);

/// Makes a token as the SDKs do: sr = percent_encode(resource), sig =
/// percent_encode(base64(HMAC-SHA256(key, sr + "\n" + se))), skn if given. For
/// tests, the bench and process modules. Fails only for a key that is not
/// base64 (or is empty).
expected<std::string> make_sas(std::string_view resource, std::string_view key_base64,
                               std::int64_t expiry_s, std::string_view key_name = {});

/// Standard base64 with '=' padding (for keys in tests and tools, and the hub
/// API's binary message bodies). Any thread.
std::string base64_encode(std::string_view bytes);

/// Decodes standard base64, padding optional; nullopt for any other byte.
std::optional<std::string> base64_decode(std::string_view text);

}  // namespace canopy::iothub
