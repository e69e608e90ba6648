// canopy::authenticate_mqtt — who an MQTT client is (issue 5): the decision
// a node's MQTT host makes on a CONNECT, from the CONNECT itself, the TLS
// client certificate and the device's registry record, as Azure IoT Hub and
// edgeHub make it. Pure: the caller looks the record up (the fleet registry,
// or its cached scope while the node is offline) and gives the time.
//
//   client id   "{device}" or "{device}/{module}"; the user name
//               "{host}/{device}[/{module}]/?api-version=..." must name the same
//   sas         the password is a SharedAccessSignature for
//               "{hub host}/devices/{device}[/modules/{module}]", signed with the
//               record's primary or secondary key, not expired
//   x509_ca     a client certificate that chains to the fleet CA, CN = device id
//   x509_thumbprint  a client certificate whose SHA-256 (or SHA-1) thumbprint is
//               the record's (self-signed is fine: the thumbprint pins it)
//
// A device may connect only to its parent: the record's parent must be this
// node. Every refusal carries the CONNACK code and a reason for the log.
#pragma once

#include "gateway/iothub_protocol.hpp"
#include "gateway/mqtt_server.hpp"

#include <cstdint>
#include <optional>
#include <string>
#include <variant>

namespace canopy {

/// The credentials of one identity, as the registry keeps a device's (or the
/// node keeps one of its modules').
struct mqtt_credentials {
  std::string parent;         ///< for a device: the gateway it belongs to ("" = not checked)
  std::string auth = "sas";   ///< "sas", "x509_ca" or "x509_thumbprint"
  std::string thumbprint;     ///< x509_thumbprint: SHA-256 (64) or SHA-1 (40) hex
  std::string primary_key;    ///< sas: base64
  std::string secondary_key;  ///< sas: base64, optional
};

/// What authenticate_mqtt needs besides the CONNECT and the credentials.
struct mqtt_auth_context {
  std::string node_id;    ///< this node: a device's parent must be it
  std::string hub_host;   ///< the host name SAS tokens are signed for (the hub's)
  std::int64_t now_s = 0; ///< Unix time, for token expiry
};

/// An accepted client.
struct mqtt_identity {
  iothub::client_identity who;
  std::string auth;  ///< how it proved it: "sas", "x509_ca" or "x509_thumbprint"
};

/// Parses the client's identity from the CONNECT (client id and user name);
/// the refusal says which part is wrong.
std::variant<iothub::client_identity, mqtt_refusal> mqtt_claimed_identity(const mqtt_connect_info& info);

/// Decides a CONNECT whose claimed identity (mqtt_claimed_identity) has
/// `credentials` (nullopt: unknown here). Never throws.
std::variant<mqtt_identity, mqtt_refusal> authenticate_mqtt(const mqtt_connect_info& info,
                                                            const std::optional<mqtt_credentials>& credentials,
                                                            const mqtt_auth_context& ctx);

}  // namespace canopy
