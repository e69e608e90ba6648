#include "gateway/mqtt_auth.hpp"

#include "runtime/ascii.hpp"

namespace canopy {

namespace {

mqtt_refusal refuse(mqtt::connack_code code, std::string reason) {
  return mqtt_refusal{code, std::move(reason)};
}

std::string named(const iothub::client_identity& who) {
  return (who.is_module() ? "module '" : "device '") + who.to_string() + "'";
}

}  // namespace

std::variant<iothub::client_identity, mqtt_refusal> mqtt_claimed_identity(const mqtt_connect_info& info) {
  auto who = iothub::parse_client_id(info.packet.client_id);
  if (!who)
    return refuse(mqtt::connack_code::identifier_rejected, "client id: " + who.err().message);
  if (!info.packet.username)
    return refuse(mqtt::connack_code::bad_user_name_or_password,
                  "no user name (expected \"{hub host}/" + who->to_string() + "/?api-version=...\")");
  auto user = iothub::parse_username(*info.packet.username);
  if (!user)
    return refuse(mqtt::connack_code::bad_user_name_or_password, "user name: " + user.err().message);
  if (auto same = iothub::check_same_identity(*who, *user); !same)
    return refuse(mqtt::connack_code::identifier_rejected, same.err().message);
  return std::move(*who);
}

std::variant<mqtt_identity, mqtt_refusal> authenticate_mqtt(const mqtt_connect_info& info,
                                                            const std::optional<mqtt_credentials>& credentials,
                                                            const mqtt_auth_context& ctx) {
  auto claimed = mqtt_claimed_identity(info);
  if (auto* refused = std::get_if<mqtt_refusal>(&claimed))
    return std::move(*refused);
  auto who = std::get<iothub::client_identity>(std::move(claimed));
  if (!credentials)
    return refuse(mqtt::connack_code::not_authorized, named(who) + " is not registered with '" + ctx.node_id + "'");
  const auto& c = *credentials;
  if (!who.is_module() && !c.parent.empty() && c.parent != ctx.node_id)
    return refuse(mqtt::connack_code::not_authorized,
                  named(who) + " belongs to '" + c.parent + "', not to '" + ctx.node_id + "'");

  if (c.auth == "sas") {
    if (!info.packet.password || info.packet.password->empty())
      return refuse(mqtt::connack_code::bad_user_name_or_password,
                    named(who) + " authenticates with a SAS token: no password was sent");
    auto token = iothub::parse_sas(*info.packet.password);
    if (!token)
      return refuse(mqtt::connack_code::bad_user_name_or_password, token.err().message);
    const auto resource = iothub::identity_resource(ctx.hub_host, who);
    auto ok = iothub::verify_sas(*token, c.primary_key, resource, ctx.now_s);
    if (!ok && !c.secondary_key.empty() && iothub::verify_sas(*token, c.secondary_key, resource, ctx.now_s))
      ok = expected<void>{};
    if (!ok)
      return refuse(mqtt::connack_code::not_authorized, named(who) + ": " + ok.err().message);
    return mqtt_identity{std::move(who), "sas"};
  }

  if (c.auth == "x509_ca" || c.auth == "x509_thumbprint") {
    if (!info.tls || (info.cert_cn.empty() && info.cert_thumbprint.empty()))
      return refuse(mqtt::connack_code::bad_user_name_or_password,
                    named(who) + " authenticates with an X.509 certificate (" + c.auth + "): none was sent");
    if (c.auth == "x509_ca") {
      if (!info.cert_chain_ok)
        return refuse(mqtt::connack_code::not_authorized,
                      named(who) + ": the certificate does not chain to the fleet CA (" + info.cert_chain_error +
                        ")");
      if (info.cert_cn != who.device_id)
        return refuse(mqtt::connack_code::not_authorized,
                      named(who) + ": the certificate is for '" + info.cert_cn + "'");
      return mqtt_identity{std::move(who), "x509_ca"};
    }
    const auto& presented = c.thumbprint.size() == 40 ? info.cert_thumbprint_sha1 : info.cert_thumbprint;
    if (presented.empty() || !ascii::iequals(presented, c.thumbprint))
      return refuse(mqtt::connack_code::not_authorized,
                    named(who) + ": the certificate's thumbprint " + presented + " is not the registered one");
    return mqtt_identity{std::move(who), "x509_thumbprint"};
  }
  return refuse(mqtt::connack_code::not_authorized,
                named(who) + ": unknown authentication type '" + c.auth + "' in the registry");
}

}  // namespace canopy
