// canopy::add_hub_routes — the hub's operator REST API (issue 4, "Operator
// interface"): the routes of an http_server that translate JSON requests into
// hub_control calls and their answers back into JSON. `canopyctl device|
// deployment|twin|invoke|status|telemetry|monitor` is its client
// (gateway/hub_client).
//
// JSON in and out, camelCase keys as in Azure IoT Hub's REST API:
//   POST   /devices                          {deviceId, parentId, kind, tags, authentication}
//                                             -> 201 device
//   GET    /devices                          -> [device]
//   GET    /devices/{id}                     -> device
//   DELETE /devices/{id}                     -> 204
//   PUT    /devices/{id}/tags                {tags object} -> device
//   POST   /devices/{d}/modules/{m}/methods  {methodName, payload, responseTimeoutInSeconds}
//                                             -> {status, payload}
//   POST   /deployments                      {id, content, targetCondition, priority} -> 201
//   GET    /deployments                      -> [deployment summary]
//   GET    /deployments/{id}                 -> deployment summary
//   DELETE /deployments/{id}                 -> 204
//   GET    /twins/{d}[/modules/{m}]          -> twin
//   PATCH  /twins/{d}[/modules/{m}]          {properties: {desired: {...}}} or a bare
//                                             desired patch -> twin
//   GET    /status                           -> [fleet node]
//   GET    /telemetry?device=&since=&after=&limit=  -> [telemetry record]
// where
//   device  = {deviceId, parentId, kind, tags, authentication: {type, thumbprint?,
//              primaryKey?, secondaryKey?}, createdMs, updatedMs, lastSeenMs}
//   twin    = {deviceId, moduleId, properties: {desired: {..., "$version": n},
//              reported: {..., "$version": n}}, desiredUpdatedMs, reportedUpdatedMs}
//   summary = {id, content, targetCondition, priority, createdMs, targeted, applied,
//              succeeded, failed, statuses: [{deviceId, status, detail, updatedMs}]}
//   node    = {deviceId, parentId, kind, connected, lastSeenMs, deployment,
//              deploymentStatus, modules: [{name, type, version, status, desiredStatus,
//              restartPolicy, restartCount, lastStartMs, lastExitMs, lastExitReason}]}
//   record  = {seq, enqueuedMs, deviceId, moduleId, outputName, properties,
//              systemProperties, body}; body is the parsed JSON when the message
//              body is valid UTF-8 JSON, else {"base64": "..."}.
//
// Errors are {"error": "..."} naming the field at fault ("kind: must be
// 'gateway' or 'device'"), with the status of http_status(errc). Request
// objects reject unknown keys (a misspelt "parent" is an error, not ignored).
//
// Threading: add_hub_routes() before http_server::start(), from the thread
// that owns the server. The handlers run on the I/O thread and answer from
// whichever thread hub_control calls back on.
#pragma once

#include "runtime/expected.hpp"

#include <functional>

namespace canopy {

class http_server;
class hub_control;
struct http_request;
struct http_response;

/// Largest nesting of arrays/objects accepted in a request body.
inline constexpr int hub_api_max_json_depth = 64;

/// Most records one GET /telemetry answers (its `limit`; default 100).
inline constexpr int hub_api_max_telemetry_limit = 10000;

/// Longest responseTimeoutInSeconds of a direct method.
inline constexpr int hub_api_max_method_timeout_secs = 300;

/// Registers the routes above on `server` (before its start()). `hub` is
/// borrowed and must outlive the server's stop().
void add_hub_routes(http_server& server, hub_control& hub);

/// Answers `req` as an http_server with add_hub_routes() would, without a
/// server or a socket (tests, fuzzing): the route of the longest matching
/// prefix for req.method (HEAD falls back to GET), else the server's own 404
/// or 405. `reply` is called exactly once, at once or from whichever thread
/// `hub` answers on. Only the server's parts before routing (token, limits)
/// are left out; an exception a handler lets through propagates (the server
/// would answer it 500).
void handle_hub_request(hub_control& hub, http_request req,
                        std::function<void(http_response)> reply);

/// The HTTP status the API answers for an error of code `code`:
/// invalid_argument 400, not_found 404, already_exists 409, unavailable 503,
/// timeout 504, anything else 500.
int http_status(errc code) noexcept;

/// The reverse, for clients: 400/405/413/415/422/431 invalid_argument, 404
/// not_found, 409 already_exists, 503 unavailable, 408/504 timeout, anything
/// else (401 included) failed.
errc errc_of_http_status(int status) noexcept;

}  // namespace canopy
