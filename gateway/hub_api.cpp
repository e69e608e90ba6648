#include "gateway/hub_api.hpp"

#include "runtime/manifest.hpp"

#include "gateway/http_server.hpp"
#include "gateway/hub_control.hpp"
#include "gateway/iothub_protocol.hpp"  // base64_encode
#include "runtime/registry.hpp"
#include "runtime/route.hpp"
#include "runtime/target_condition.hpp"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <exception>
#include <functional>
#include <initializer_list>
#include <limits>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace canopy {

int http_status(errc code) noexcept {
  switch (code) {
    case errc::invalid_argument:
      return 400;
    case errc::not_found:
      return 404;
    case errc::already_exists:
      return 409;
    case errc::unavailable:
      return 503;
    case errc::timeout:
      return 504;
    default:
      return 500;
  }
}

errc errc_of_http_status(int status) noexcept {
  switch (status) {
    case 400:
    case 405:
    case 413:
    case 415:
    case 422:
    case 431:
      return errc::invalid_argument;
    case 404:
      return errc::not_found;
    case 409:
      return errc::already_exists;
    case 503:
      return errc::unavailable;
    case 408:
    case 504:
      return errc::timeout;
    default:
      return errc::failed;
  }
}

namespace {

using json = nlohmann::json;
using reply_t = std::function<void(http_response)>;

constexpr std::string_view id_rule = "must be 1 to 128 of A-Z a-z 0-9 - . : _";

// --- Responses -------------------------------------------------------------------

http_response json_response(int status, const json& doc) {
  http_response r;
  r.status = status;
  if (status != 204)
    r.body = doc.dump(-1, ' ', false, json::error_handler_t::replace);
  return r;
}

http_response error_response(int status, const std::string& message) {
  return json_response(status, json{{"error", message}});
}

http_response error_response(const error& e) {
  return error_response(http_status(e.code), e.message);
}

/// A hub_control callback that answers `ok_status` with to_json(value), or the error.
template <class T, class ToJson>
reply_fn<T> answer(reply_t reply, int ok_status, ToJson to_json) {
  return [reply = std::move(reply), ok_status, to_json = std::move(to_json)](expected<T> result) {
    if (!result) {
      reply(error_response(result.err()));
      return;
    }
    http_response r;
    try {
      r = json_response(ok_status, to_json(*result));
    } catch (const std::exception& e) {
      r = error_response(500, std::string("encoding the answer: ") + e.what());
    }
    reply(std::move(r));
  };
}

/// A hub_control callback that answers 204, or the error.
reply_fn<void> answer_no_content(reply_t reply) {
  return [reply = std::move(reply)](expected<void> result) {
    reply(result ? json_response(204, nullptr) : error_response(result.err()));
  };
}

// --- Encoding --------------------------------------------------------------------

/// True if the arrays/objects in the JSON text `text` nest at most `limit` deep.
bool nesting_within(std::string_view text, int limit) { return !json_too_deep(text, limit); }

/// JSON text as JSON: null when empty, the text itself (a string) when it is
/// not JSON.
json json_or_text(const std::string& text) {
  if (text.empty())
    return nullptr;
  if (!nesting_within(text, hub_api_max_json_depth))
    return text;
  auto doc = json::parse(text, nullptr, false);
  return doc.is_discarded() ? json(text) : doc;
}

json device_json(const device_record& d) {
  json auth{{"type", d.auth}};
  if (d.auth == "x509_thumbprint")
    auth["thumbprint"] = d.thumbprint;
  if (d.auth == "sas") {
    auth["primaryKey"] = d.primary_key;
    auth["secondaryKey"] = d.secondary_key;
  }
  return json{{"deviceId", d.id},
              {"parentId", d.parent},
              {"kind", d.kind},
              {"tags", d.tags.is_object() ? d.tags : json::object()},
              {"authentication", std::move(auth)},
              {"createdMs", d.created_ms},
              {"updatedMs", d.updated_ms},
              {"lastSeenMs", d.last_seen_ms}};
}

json devices_json(const std::vector<device_record>& devices) {
  json out = json::array();
  for (const auto& d : devices)
    out.push_back(device_json(d));
  return out;
}

json deployment_json(const deployment_record& d) {
  return json{{"id", d.id},
              {"content", json_or_text(d.manifest_json)},
              {"targetCondition", d.target_condition},
              {"priority", d.priority},
              {"createdMs", d.created_ms}};
}

json summary_json(const deployment_summary& s) {
  json out = deployment_json(s.deployment);
  out["targeted"] = s.targeted;
  out["applied"] = s.applied;
  out["succeeded"] = s.succeeded;
  out["failed"] = s.failed;
  json statuses = json::array();
  for (const auto& st : s.statuses) {
    statuses.push_back(json{{"deviceId", st.device},
                            {"status", st.status},
                            {"detail", st.detail},
                            {"updatedMs", st.updated_ms}});
  }
  out["statuses"] = std::move(statuses);
  return out;
}

json summaries_json(const std::vector<deployment_summary>& list) {
  json out = json::array();
  for (const auto& s : list)
    out.push_back(summary_json(s));
  return out;
}

json twin_json(const twin_record& t) {
  json desired = t.desired.is_object() ? t.desired : json::object();
  desired["$version"] = t.desired_version;
  json reported = t.reported.is_object() ? t.reported : json::object();
  reported["$version"] = t.reported_version;
  return json{{"deviceId", t.device},
              {"moduleId", t.module},
              {"properties", {{"desired", std::move(desired)}, {"reported", std::move(reported)}}},
              {"desiredUpdatedMs", t.desired_updated_ms},
              {"reportedUpdatedMs", t.reported_updated_ms}};
}

json module_json(const module_row& m) {
  return json{{"name", m.name},
              {"type", m.type},
              {"version", m.version},
              {"status", m.status},
              {"desiredStatus", m.desired_status},
              {"restartPolicy", m.restart_policy},
              {"restartCount", m.restart_count},
              {"lastStartMs", m.last_start_ms},
              {"lastExitMs", m.last_exit_ms},
              {"lastExitReason", m.last_exit_reason}};
}

json fleet_json(const std::vector<fleet_node>& nodes) {
  json out = json::array();
  for (const auto& n : nodes) {
    json modules = json::array();
    for (const auto& m : n.modules)
      modules.push_back(module_json(m));
    out.push_back(json{{"deviceId", n.device.id},
                       {"parentId", n.device.parent},
                       {"kind", n.device.kind},
                       {"connected", n.connected},
                       {"lastSeenMs", n.last_seen_ms},
                       {"deployment", n.deployment},
                       {"deploymentStatus", n.deployment_status},
                       {"modules", std::move(modules)}});
  }
  return out;
}

/// A message body: the JSON it holds when it is valid UTF-8 JSON, else {"base64": ...}.
json body_json(std::string_view body) {
  if (!body.empty() && nesting_within(body, hub_api_max_json_depth)) {
    auto doc = json::parse(body.begin(), body.end(), nullptr, false);
    if (!doc.is_discarded())
      return doc;
  }
  return json{{"base64", iothub::base64_encode(body)}};
}

json telemetry_json(const std::vector<telemetry_record>& records) {
  json out = json::array();
  for (const auto& r : records) {
    json properties = json::object();
    for (const auto& [key, value] : r.msg.properties())
      properties[std::string(key)] = std::string(value);
    json system = json::object();
    auto put = [&](const char* key, std::string_view value) {
      if (!value.empty())
        system[key] = std::string(value);
    };
    put("messageId", r.msg.message_id());
    put("correlationId", r.msg.correlation_id());
    put("contentType", r.msg.content_type());
    put("contentEncoding", r.msg.content_encoding());
    put("connectionDeviceId", r.msg.connection_device_id());
    put("connectionModuleId", r.msg.connection_module_id());
    put("outputName", r.msg.output_name());
    put("userId", r.msg.user_id());
    if (r.msg.creation_time_utc_ms() != 0)
      system["creationTimeUtcMs"] = r.msg.creation_time_utc_ms();
    if (r.msg.ttl_secs() != 0)
      system["ttlSecs"] = r.msg.ttl_secs();
    out.push_back(json{{"seq", r.seq},
                       {"enqueuedMs", r.enqueued_ms},
                       {"deviceId", r.device},
                       {"moduleId", r.module},
                       {"outputName", r.output},
                       {"properties", std::move(properties)},
                       {"systemProperties", std::move(system)},
                       {"body", body_json(r.msg.body())}});
  }
  return out;
}

// --- Decoding and validation -------------------------------------------------------

error bad(std::string message) {
  return make_error(errc::invalid_argument, std::move(message));
}

/// The request body as a JSON object.
expected<json> parse_object(const std::string& body) {
  if (body.find_first_not_of(" \t\r\n") == std::string::npos)
    return bad("request body: empty (expected a JSON object)");
  if (!nesting_within(body, hub_api_max_json_depth)) {
    return bad("request body: nested deeper than " + std::to_string(hub_api_max_json_depth) +
               " levels");
  }
  json doc;
  try {
    doc = json::parse(body);
  } catch (const json::exception& e) {  // parse_error, or out_of_range for a number overflow
    std::string what = e.what();
    // "[json.exception.parse_error.101] parse error at ..." -> "parse error at ..."
    if (auto close = what.find("] ");
        what.rfind("[json.exception", 0) == 0 && close != std::string::npos)
      what.erase(0, close + 2);
    return bad("request body: not valid JSON: " + what);
  }
  if (!doc.is_object())
    return bad(std::string("request body: expected a JSON object, got ") + doc.type_name());
  return doc;
}

/// Refuses keys of `obj` outside `allowed`; `where` prefixes the field name ("authentication.").
expected<void> check_keys(const json& obj, std::initializer_list<std::string_view> allowed,
                          std::string_view where = "") {
  for (const auto& [key, value] : obj.items()) {
    if (std::find(allowed.begin(), allowed.end(), key) != allowed.end())
      continue;
    std::string list;
    for (auto a : allowed)
      list += (list.empty() ? "" : ", ") + std::string(a);
    return bad(std::string(where) + key + ": unknown field (expected " + list + ")");
  }
  return {};
}

/// Field `key` of `obj` as a string; `fallback` when missing or null.
expected<std::string> string_field(const json& obj, const char* key, std::string_view where,
                                   std::optional<std::string> fallback) {
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) {
    if (fallback)
      return *fallback;
    return bad(std::string(where) + key + ": missing");
  }
  if (!it->is_string())
    return bad(std::string(where) + key + ": must be a string, got " + it->type_name());
  return it->get<std::string>();
}

bool valid_module(std::string_view name) {
  return name == "$edgeAgent" || name == "$edgeHub" || is_valid_module_name(name);
}

expected<std::string> path_device(const std::string& segment) {
  if (!fleet_registry::is_valid_id(segment))
    return bad("path: device id '" + segment + "': " + std::string(id_rule));
  return segment;
}

expected<std::string> path_module(const std::string& segment) {
  if (!valid_module(segment)) {
    return bad("path: module '" + segment +
               "': must be $edgeAgent, $edgeHub or 1 to 64 of A-Z a-z 0-9 _ . -");
  }
  return segment;
}

bool is_hex(std::string_view s) {
  return std::all_of(s.begin(), s.end(), [](char c) {
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F');
  });
}

expected<device_record> parse_device(const json& doc) {
  if (auto ok = check_keys(doc, {"deviceId", "parentId", "kind", "tags", "authentication"}); !ok)
    return ok.err();
  device_record rec;
  auto id = string_field(doc, "deviceId", "", std::nullopt);
  if (!id)
    return id.err();
  if (!fleet_registry::is_valid_id(*id))
    return bad("deviceId: '" + *id + "' " + std::string(id_rule));
  rec.id = std::move(*id);
  auto parent = string_field(doc, "parentId", "", std::string());
  if (!parent)
    return parent.err();
  if (!parent->empty() && !fleet_registry::is_valid_id(*parent))
    return bad("parentId: '" + *parent + "' " + std::string(id_rule) + " (or empty: the hub)");
  rec.parent = std::move(*parent);
  auto kind = string_field(doc, "kind", "", std::string("device"));
  if (!kind)
    return kind.err();
  if (*kind != "gateway" && *kind != "device")
    return bad("kind: must be 'gateway' or 'device', got '" + *kind + "'");
  rec.kind = std::move(*kind);
  if (auto it = doc.find("tags"); it != doc.end() && !it->is_null()) {
    if (!it->is_object())
      return bad(std::string("tags: must be a JSON object, got ") + it->type_name());
    rec.tags = *it;
  }

  json auth = json::object();
  if (auto it = doc.find("authentication"); it != doc.end() && !it->is_null()) {
    if (!it->is_object()) {
      return bad(std::string("authentication: must be a JSON object, got ") + it->type_name());
    }
    auth = *it;
  }
  constexpr std::string_view where = "authentication.";
  if (auto ok = check_keys(auth, {"type", "thumbprint", "primaryKey", "secondaryKey"}, where); !ok)
    return ok.err();
  auto type = string_field(auth, "type", where, std::string("x509_ca"));
  if (!type)
    return type.err();
  if (*type != "x509_ca" && *type != "x509_thumbprint" && *type != "sas") {
    return bad("authentication.type: must be 'x509_ca', 'x509_thumbprint' or 'sas', got '" + *type +
               "'");
  }
  rec.auth = std::move(*type);
  auto thumbprint = string_field(auth, "thumbprint", where, std::string());
  if (!thumbprint)
    return thumbprint.err();
  auto primary = string_field(auth, "primaryKey", where, std::string());
  if (!primary)
    return primary.err();
  auto secondary = string_field(auth, "secondaryKey", where, std::string());
  if (!secondary)
    return secondary.err();
  if (rec.auth == "x509_thumbprint") {
    if (thumbprint->empty())
      return bad("authentication.thumbprint: required for type 'x509_thumbprint'");
    if ((thumbprint->size() != 40 && thumbprint->size() != 64) || !is_hex(*thumbprint)) {
      return bad("authentication.thumbprint: must be 40 (SHA-1) or 64 (SHA-256) hex digits");
    }
  } else if (!thumbprint->empty()) {
    return bad("authentication.thumbprint: only for type 'x509_thumbprint'");
  }
  if (rec.auth == "sas") {
    if (primary->empty())
      return bad("authentication.primaryKey: required for type 'sas'");
  } else if (!primary->empty() || !secondary->empty()) {
    return bad(std::string("authentication.") + (primary->empty() ? "secondaryKey" : "primaryKey") +
               ": only for type 'sas'");
  }
  rec.thumbprint = std::move(*thumbprint);
  rec.primary_key = std::move(*primary);
  rec.secondary_key = std::move(*secondary);
  return rec;
}

expected<deployment_record> parse_deployment(const json& doc) {
  if (auto ok = check_keys(doc, {"id", "content", "targetCondition", "priority"}); !ok)
    return ok.err();
  deployment_record rec;
  auto id = string_field(doc, "id", "", std::nullopt);
  if (!id)
    return id.err();
  if (!fleet_registry::is_valid_id(*id))
    return bad("id: '" + *id + "' " + std::string(id_rule));
  rec.id = std::move(*id);
  auto content = doc.find("content");
  if (content == doc.end() || content->is_null())
    return bad("content: missing (the deployment manifest, a JSON object)");
  if (!content->is_object()) {
    return bad(std::string("content: must be a JSON object (the deployment manifest), got ") +
               content->type_name());
  }
  rec.manifest_json = content->dump();
  auto condition = string_field(doc, "targetCondition", "", std::nullopt);
  if (!condition)
    return condition.err();
  if (condition->empty())
    return bad("targetCondition: empty (use '*' for every gateway)");
  if (auto compiled = target_condition::compile(*condition); !compiled)
    return bad("targetCondition: " + compiled.err().message);
  rec.target_condition = std::move(*condition);
  if (auto it = doc.find("priority"); it != doc.end() && !it->is_null()) {
    if (!it->is_number_integer())
      return bad(std::string("priority: must be an integer, got ") + it->type_name());
    if (it->is_number_unsigned()
          ? it->get<std::uint64_t>() > static_cast<std::uint64_t>(std::numeric_limits<int>::max())
          : (it->get<std::int64_t>() < 0 ||
             it->get<std::int64_t>() > std::numeric_limits<int>::max())) {
      return bad("priority: must be 0 to " + std::to_string(std::numeric_limits<int>::max()));
    }
    rec.priority = it->get<int>();
  }
  return rec;
}

/// The desired patch of a PATCH /twins body: {properties: {desired: {...}}} or
/// a bare object. A top-level "$version" (from a twin read back) is dropped.
expected<json> parse_twin_patch(json doc) {
  json patch;
  if (doc.contains("properties")) {
    if (auto ok = check_keys(
          doc, {"properties", "deviceId", "moduleId", "desiredUpdatedMs", "reportedUpdatedMs"});
        !ok) {
      return ok.err();
    }
    auto& props = doc["properties"];
    if (!props.is_object())
      return bad(std::string("properties: must be a JSON object, got ") + props.type_name());
    if (props.contains("reported")) {
      return bad(
        "properties.reported: reported properties are set by the device; patch desired ones");
    }
    if (auto ok = check_keys(props, {"desired"}, "properties."); !ok)
      return ok.err();
    auto it = props.find("desired");
    if (it == props.end())
      return bad("properties.desired: missing (the desired patch)");
    if (!it->is_object())
      return bad(std::string("properties.desired: must be a JSON object, got ") + it->type_name());
    patch = std::move(*it);
  } else {
    patch = std::move(doc);
  }
  patch.erase("$version");
  return patch;
}

struct method_call {
  std::string method;
  std::string payload_json;
  std::chrono::milliseconds timeout{30000};
};

/// A cloud-to-device message (POST /devices/{d}/messages/devicebound): the
/// c2d_method payload, checked field by field.
expected<std::string> parse_c2d_message(const json& doc) {
  if (auto ok = check_keys(doc, {"body", "bodyBase64", "properties", "messageId", "correlationId", "contentType",
                                 "contentEncoding"});
      !ok)
    return ok.err();
  if (doc.contains("body") && doc.contains("bodyBase64"))
    return bad("body, bodyBase64: give one of them");
  for (const char* key : {"body", "bodyBase64", "messageId", "correlationId", "contentType", "contentEncoding"})
    if (auto it = doc.find(key); it != doc.end() && !it->is_string())
      return bad(std::string(key) + ": must be a string, got " + it->type_name());
  if (auto it = doc.find("bodyBase64"); it != doc.end() && !iothub::base64_decode(it->get<std::string>()))
    return bad("bodyBase64: not base64");
  if (auto it = doc.find("properties"); it != doc.end()) {
    if (!it->is_object())
      return bad(std::string("properties: must be an object of strings, got ") + it->type_name());
    for (auto& [k, v] : it->items())
      if (!v.is_string())
        return bad("properties." + k + ": must be a string, got " + v.type_name());
  }
  return doc.dump();
}

expected<method_call> parse_method_call(const json& doc) {
  if (auto ok = check_keys(
        doc, {"methodName", "payload", "responseTimeoutInSeconds", "connectTimeoutInSeconds"});
      !ok) {
    return ok.err();
  }
  method_call call;
  auto name = string_field(doc, "methodName", "", std::nullopt);
  if (!name)
    return name.err();
  if (name->empty() || name->size() > 128)
    return bad("methodName: must be 1 to 128 characters");
  if (std::any_of(name->begin(), name->end(),
                  [](char c) { return static_cast<unsigned char>(c) < 0x20 || c == 0x7f; })) {
    return bad("methodName: must not contain control characters");
  }
  if (name->front() == '$')
    return bad("methodName: names starting with '$' are reserved");
  call.method = std::move(*name);
  auto payload = doc.find("payload");
  call.payload_json = payload == doc.end() ? "null" : payload->dump();
  for (const char* key : {"responseTimeoutInSeconds", "connectTimeoutInSeconds"}) {
    auto it = doc.find(key);
    if (it == doc.end() || it->is_null())
      continue;
    if (!it->is_number())
      return bad(std::string(key) + ": must be a number of seconds, got " + it->type_name());
    double secs = it->get<double>();
    bool response = std::string_view(key) == "responseTimeoutInSeconds";
    if (!std::isfinite(secs) || secs < 0 || secs > hub_api_max_method_timeout_secs ||
        (secs == 0 && response)) {
      return bad(std::string(key) +
                 (response ? ": must be more than 0 and at most " : ": must be 0 to ") +
                 std::to_string(hub_api_max_method_timeout_secs));
    }
    // connectTimeoutInSeconds (Azure's) is accepted; the call's one deadline is the response's.
    if (response)
      call.timeout = std::chrono::milliseconds(
        std::max<std::int64_t>(1, static_cast<std::int64_t>(std::llround(secs * 1000))));
  }
  return call;
}

expected<std::int64_t> query_int(const http_request& req, const char* key, std::int64_t fallback,
                                 std::int64_t min, std::int64_t max) {
  auto it = req.query.find(key);
  if (it == req.query.end() || it->second.empty())
    return fallback;
  const auto& text = it->second;
  std::int64_t value = 0;
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (ec != std::errc{} || end != text.data() + text.size() || value < min || value > max) {
    return bad(std::string("query parameter '") + key + "': '" + text +
               "' must be an integer from " + std::to_string(min) + " to " + std::to_string(max));
  }
  return value;
}

struct telemetry_query {
  std::string device;
  std::int64_t since_ms = 0;
  std::int64_t after_seq = 0;
  std::size_t limit = 100;
};

expected<telemetry_query> parse_telemetry_query(const http_request& req) {
  for (const auto& [key, value] : req.query) {
    if (key != "device" && key != "since" && key != "after" && key != "limit") {
      return bad("query parameter '" + key + "': unknown (expected device, since, after, limit)");
    }
  }
  telemetry_query q;
  if (auto it = req.query.find("device"); it != req.query.end() && !it->second.empty()) {
    if (!fleet_registry::is_valid_id(it->second))
      return bad("query parameter 'device': '" + it->second + "' " + std::string(id_rule));
    q.device = it->second;
  }
  constexpr auto int64_max = std::numeric_limits<std::int64_t>::max();
  auto since = query_int(req, "since", 0, 0, int64_max);
  if (!since)
    return since.err();
  auto after = query_int(req, "after", 0, 0, int64_max);
  if (!after)
    return after.err();
  auto limit = query_int(req, "limit", 100, 1, hub_api_max_telemetry_limit);
  if (!limit)
    return limit.err();
  q.since_ms = *since;
  q.after_seq = *after;
  q.limit = static_cast<std::size_t>(*limit);
  return q;
}

/// The path segments after `prefix` ("/devices/"): "/devices/a/b" -> [a, b];
/// one trailing '/' is ignored.
std::vector<std::string> segments_after(const std::string& path, std::string_view prefix) {
  std::vector<std::string> out;
  std::string_view rest(path);
  rest.remove_prefix(std::min(prefix.size(), rest.size()));
  if (!rest.empty() && rest.back() == '/')
    rest.remove_suffix(1);
  if (rest.empty())
    return out;
  for (;;) {
    auto slash = rest.find('/');
    out.emplace_back(rest.substr(0, slash));
    if (slash == std::string_view::npos)
      break;
    rest.remove_prefix(slash + 1);
  }
  return out;
}

http_response no_such_resource(const http_request& req) {
  return error_response(404, "no such resource: " + req.method + " " + req.path);
}

/// Wraps a handler: a throw becomes a 500 naming it, so no exception reaches the server.
http_handler guarded(std::function<void(http_request&, reply_t&)> body) {
  return [body = std::move(body)](http_request req, reply_t reply) {
    try {
      body(req, reply);
    } catch (const std::exception& e) {
      if (reply)
        reply(error_response(500, std::string("internal error: ") + e.what()));
    }
  };
}

// --- Handlers ----------------------------------------------------------------------

/// The API's routes, collected before they go to an http_server (add_hub_routes)
/// or are matched without one (handle_hub_request).
struct route_table {
  struct entry {
    std::string method;
    std::string prefix;
    http_handler handler;
  };
  std::vector<entry> entries;

  void route(std::string method, std::string prefix, http_handler handler) {
    entries.push_back(entry{std::move(method), std::move(prefix), std::move(handler)});
  }
};

void devices_routes(route_table& routes, hub_control& hub) {
  routes.route("POST", "/devices", guarded([&hub](http_request& req, reply_t& reply) {
                 auto doc = parse_object(req.body);
                 if (!doc)
                   return reply(error_response(doc.err()));
                 auto rec = parse_device(*doc);
                 if (!rec)
                   return reply(error_response(rec.err()));
                 hub.device_create(std::move(*rec),
                                   answer<device_record>(std::move(reply), 201, device_json));
               }));
  routes.route(
    "GET", "/devices", guarded([&hub](http_request&, reply_t& reply) {
      hub.device_list(answer<std::vector<device_record>>(std::move(reply), 200, devices_json));
    }));
  routes.route("GET", "/devices/", guarded([&hub](http_request& req, reply_t& reply) {
                 auto seg = segments_after(req.path, "/devices/");
                 if (seg.empty()) {
                   return hub.device_list(
                     answer<std::vector<device_record>>(std::move(reply), 200, devices_json));
                 }
                 if (seg.size() != 1)
                   return reply(no_such_resource(req));
                 auto id = path_device(seg[0]);
                 if (!id)
                   return reply(error_response(id.err()));
                 hub.device_get(std::move(*id),
                                answer<device_record>(std::move(reply), 200, device_json));
               }));
  routes.route("DELETE", "/devices/", guarded([&hub](http_request& req, reply_t& reply) {
                 auto seg = segments_after(req.path, "/devices/");
                 if (seg.size() != 1)
                   return reply(no_such_resource(req));
                 auto id = path_device(seg[0]);
                 if (!id)
                   return reply(error_response(id.err()));
                 hub.device_delete(std::move(*id), answer_no_content(std::move(reply)));
               }));
  routes.route("PUT", "/devices/", guarded([&hub](http_request& req, reply_t& reply) {
                 auto seg = segments_after(req.path, "/devices/");
                 if (seg.size() != 2 || seg[1] != "tags")
                   return reply(no_such_resource(req));
                 auto id = path_device(seg[0]);
                 if (!id)
                   return reply(error_response(id.err()));
                 auto tags = parse_object(req.body);
                 if (!tags) {
                   auto e = tags.err();
                   e.message = "tags: " + e.message;
                   return reply(error_response(e));
                 }
                 hub.device_set_tags(std::move(*id), std::move(*tags),
                                     answer<device_record>(std::move(reply), 200, device_json));
               }));
  // POST /devices/{device}/modules/{module}/methods: a direct method (Azure's invoke API);
  // POST /devices/{device}/methods: a method of the device itself (a leaf device over MQTT);
  // POST /devices/{device}/messages/devicebound: a cloud-to-device message.
  routes.route("POST", "/devices/", guarded([&hub](http_request& req, reply_t& reply) {
                 auto seg = segments_after(req.path, "/devices/");
                 const bool device_method = seg.size() == 2 && seg[1] == "methods";
                 const bool c2d = seg.size() == 3 && seg[1] == "messages" && seg[2] == "devicebound";
                 if (!device_method && !c2d && (seg.size() != 4 || seg[1] != "modules" || seg[3] != "methods"))
                   return reply(no_such_resource(req));
                 auto device = path_device(seg[0]);
                 if (!device)
                   return reply(error_response(device.err()));
                 if (c2d) {
                   auto doc = parse_object(req.body);
                   if (!doc)
                     return reply(error_response(doc.err()));
                   auto msg = parse_c2d_message(*doc);
                   if (!msg)
                     return reply(error_response(msg.err()));
                   hub.invoke(std::move(*device), "", c2d_method, std::move(*msg), std::chrono::seconds{30},
                              answer<method_reply>(std::move(reply), 200, [](const method_reply& r) {
                                return json{{"status", r.status}, {"payload", json_or_text(r.payload_json)}};
                              }));
                   return;
                 }
                 auto module = device_method ? expected<std::string>{std::string{}} : path_module(seg[2]);
                 if (!module)
                   return reply(error_response(module.err()));
                 auto doc = parse_object(req.body);
                 if (!doc)
                   return reply(error_response(doc.err()));
                 auto call = parse_method_call(*doc);
                 if (!call)
                   return reply(error_response(call.err()));
                 hub.invoke(
                   std::move(*device), std::move(*module), std::move(call->method),
                   std::move(call->payload_json), call->timeout,
                   answer<method_reply>(std::move(reply), 200, [](const method_reply& r) {
                     return json{{"status", r.status}, {"payload", json_or_text(r.payload_json)}};
                   }));
               }));
}

void deployments_routes(route_table& routes, hub_control& hub) {
  routes.route("POST", "/deployments", guarded([&hub](http_request& req, reply_t& reply) {
                 auto doc = parse_object(req.body);
                 if (!doc)
                   return reply(error_response(doc.err()));
                 auto rec = parse_deployment(*doc);
                 if (!rec)
                   return reply(error_response(rec.err()));
                 hub.deployment_create(std::move(*rec), answer<deployment_record>(
                                                          std::move(reply), 201, deployment_json));
               }));
  auto list = [&hub](reply_t reply) {
    hub.deployment_list(
      answer<std::vector<deployment_summary>>(std::move(reply), 200, summaries_json));
  };
  routes.route("GET", "/deployments",
               guarded([list](http_request&, reply_t& reply) { list(std::move(reply)); }));
  routes.route(
    "GET", "/deployments/", guarded([&hub, list](http_request& req, reply_t& reply) {
      auto seg = segments_after(req.path, "/deployments/");
      if (seg.empty())
        return list(std::move(reply));
      if (seg.size() != 1)
        return reply(no_such_resource(req));
      if (!fleet_registry::is_valid_id(seg[0]))
        return reply(
          error_response(bad("path: deployment id '" + seg[0] + "': " + std::string(id_rule))));
      hub.deployment_get(seg[0], answer<deployment_summary>(std::move(reply), 200, summary_json));
    }));
  routes.route("DELETE", "/deployments/", guarded([&hub](http_request& req, reply_t& reply) {
                 auto seg = segments_after(req.path, "/deployments/");
                 if (seg.size() != 1)
                   return reply(no_such_resource(req));
                 if (!fleet_registry::is_valid_id(seg[0]))
                   return reply(error_response(
                     bad("path: deployment id '" + seg[0] + "': " + std::string(id_rule))));
                 hub.deployment_delete(seg[0], answer_no_content(std::move(reply)));
               }));
}

/// /twins/{device} or /twins/{device}/modules/{module} -> (device, module).
expected<std::pair<std::string, std::string>> twin_target(const http_request& req) {
  auto seg = segments_after(req.path, "/twins/");
  if (seg.size() != 1 && (seg.size() != 3 || seg[1] != "modules"))
    return make_error(errc::not_found, "no such resource: " + req.method + " " + req.path);
  auto device = path_device(seg[0]);
  if (!device)
    return device.err();
  if (seg.size() == 1)
    return std::make_pair(std::move(*device), std::string());
  auto module = path_module(seg[2]);
  if (!module)
    return module.err();
  return std::make_pair(std::move(*device), std::move(*module));
}

void twins_routes(route_table& routes, hub_control& hub) {
  routes.route("GET", "/twins/", guarded([&hub](http_request& req, reply_t& reply) {
                 auto target = twin_target(req);
                 if (!target)
                   return reply(error_response(target.err()));
                 hub.twin_get(std::move(target->first), std::move(target->second),
                              answer<twin_record>(std::move(reply), 200, twin_json));
               }));
  routes.route("PATCH", "/twins/", guarded([&hub](http_request& req, reply_t& reply) {
                 auto target = twin_target(req);
                 if (!target)
                   return reply(error_response(target.err()));
                 auto doc = parse_object(req.body);
                 if (!doc)
                   return reply(error_response(doc.err()));
                 auto patch = parse_twin_patch(std::move(*doc));
                 if (!patch)
                   return reply(error_response(patch.err()));
                 hub.twin_patch(std::move(target->first), std::move(target->second),
                                std::move(*patch),
                                answer<twin_record>(std::move(reply), 200, twin_json));
               }));
}

void fleet_routes(route_table& routes, hub_control& hub) {
  routes.route("GET", "/status", guarded([&hub](http_request&, reply_t& reply) {
                 hub.status(answer<std::vector<fleet_node>>(std::move(reply), 200, fleet_json));
               }));
  routes.route("GET", "/telemetry", guarded([&hub](http_request& req, reply_t& reply) {
                 auto q = parse_telemetry_query(req);
                 if (!q)
                   return reply(error_response(q.err()));
                 hub.telemetry(
                   std::move(q->device), q->since_ms, q->after_seq, q->limit,
                   answer<std::vector<telemetry_record>>(std::move(reply), 200, telemetry_json));
               }));
}

route_table hub_route_table(hub_control& hub) {
  route_table routes;
  devices_routes(routes, hub);
  deployments_routes(routes, hub);
  twins_routes(routes, hub);
  fleet_routes(routes, hub);
  return routes;
}

/// http_server's matching: a prefix ending in '/' covers every path under it,
/// any other prefix that exact path.
bool prefix_matches(std::string_view prefix, std::string_view path) {
  if (!prefix.empty() && prefix.back() == '/')
    return path.substr(0, prefix.size()) == prefix;
  return path == prefix;
}

}  // namespace

void add_hub_routes(http_server& server, hub_control& hub) {
  for (auto& e : hub_route_table(hub).entries)
    server.route(std::move(e.method), std::move(e.prefix), std::move(e.handler));
}

void handle_hub_request(hub_control& hub, http_request req,
                        std::function<void(http_response)> reply) {
  auto table = hub_route_table(hub);
  auto best_for = [&](const std::string& method) -> const route_table::entry* {
    const route_table::entry* best = nullptr;
    for (const auto& e : table.entries) {
      if (e.method == method && prefix_matches(e.prefix, req.path) &&
          (best == nullptr || e.prefix.size() > best->prefix.size()))
        best = &e;
    }
    return best;
  };
  const auto* found = best_for(req.method);
  if (found == nullptr && req.method == "HEAD")
    found = best_for("GET");
  if (found != nullptr) {
    found->handler(std::move(req), std::move(reply));
    return;
  }
  std::vector<std::string> allowed;
  for (const auto& e : table.entries) {
    if (prefix_matches(e.prefix, req.path) &&
        std::find(allowed.begin(), allowed.end(), e.method) == allowed.end())
      allowed.push_back(e.method);
  }
  if (allowed.empty())
    return reply(error_response(404, "no resource at " + req.path));
  std::sort(allowed.begin(), allowed.end());
  std::string list;
  for (const auto& m : allowed)
    list += (list.empty() ? "" : ", ") + m;
  auto r = error_response(
    405, "method " + req.method + " is not allowed on " + req.path + " (allowed: " + list + ")");
  r.headers.emplace_back("Allow", list);
  reply(std::move(r));
}

}  // namespace canopy
