// What the hub's operator interface (the REST API, gateway/hub_api) may ask of
// the hub node: the fleet registry, twins, deployments, direct methods, fleet
// status and telemetry. Implemented on the actor side (actors/fleet); called
// from the I/O thread. No CAF or KJ types cross this interface.
//
// Threading: as gateway/node_control.hpp — every call returns at once and its
// callback runs exactly once, later, on an arbitrary thread.
#pragma once

#include "gateway/node_control.hpp"
#include "runtime/expected.hpp"
#include "runtime/registry.hpp"

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

namespace canopy {

/// A deployment with where it applies (`canopyctl deployment show`).
struct deployment_summary {
  deployment_record deployment;
  std::vector<std::string> targeted;   ///< gateways its target condition matches
  std::vector<std::string> applied;    ///< of those, the ones it is the chosen (highest-priority) deployment of
  std::vector<std::string> succeeded;  ///< of the applied, those that reported it applied
  std::vector<std::string> failed;     ///< of the applied, those that reported a failure (detail in statuses)
  std::vector<deployment_status> statuses;
};

/// One node or device of the fleet (`canopyctl status`).
struct fleet_node {
  device_record device;
  bool connected = false;          ///< its link to its parent is up (gateways), as the hub knows it
  std::int64_t last_seen_ms = 0;   ///< last time anything arrived from or about it
  std::string deployment;          ///< id of the deployment it runs ("" = none)
  std::string deployment_status;   ///< applied | succeeded | failed | ""
  std::vector<module_row> modules; ///< as last reported
};

/// A telemetry message kept by the hub, with the device it came from.
struct telemetry_record {
  std::int64_t seq = 0;
  std::int64_t enqueued_ms = 0;
  std::string device;
  std::string module;
  std::string output;
  message msg;
};

/// The reserved method name that carries a cloud-to-device message down the
/// tree, hop by hop like a direct method, to the node its device is connected
/// to (actors/mqtt_head.hpp). Its payload is the message as JSON: "body" (text)
/// or "bodyBase64", "properties" (an object of strings), "messageId",
/// "correlationId", "contentType", "contentEncoding". The answer: 200 once the
/// device acknowledged it, 202 if it waits in the device's session. Method
/// names that users give may not start with '$'.
inline constexpr const char* c2d_method = "$c2d";

class hub_control {
 public:
  virtual ~hub_control() = default;

  virtual void device_create(device_record rec, reply_fn<device_record> done) = 0;
  virtual void device_list(reply_fn<std::vector<device_record>> done) = 0;
  virtual void device_get(std::string id, reply_fn<device_record> done) = 0;
  /// Deletes a device (refused while it has children); disconnects it if connected.
  virtual void device_delete(std::string id, reply_fn<void> done) = 0;
  /// Replaces a device's tags (deployments are reassigned).
  virtual void device_set_tags(std::string id, nlohmann::json tags, reply_fn<device_record> done) = 0;

  /// Validates the manifest and the target condition, stores, assigns.
  virtual void deployment_create(deployment_record rec, reply_fn<deployment_record> done) = 0;
  virtual void deployment_list(reply_fn<std::vector<deployment_summary>> done) = 0;
  virtual void deployment_get(std::string id, reply_fn<deployment_summary> done) = 0;
  virtual void deployment_delete(std::string id, reply_fn<void> done) = 0;

  /// A device's or module's twin (module "" = the device twin).
  virtual void twin_get(std::string device, std::string module, reply_fn<twin_record> done) = 0;
  /// Merges `patch` into the desired properties; the change flows down the tree.
  virtual void twin_patch(std::string device, std::string module, nlohmann::json patch,
                          reply_fn<twin_record> done) = 0;

  /// A direct method on module `module` of node `device`, hop by hop.
  virtual void invoke(std::string device, std::string module, std::string method,
                      std::string payload_json, std::chrono::milliseconds timeout,
                      reply_fn<method_reply> done) = 0;

  /// Every node and device of the fleet.
  virtual void status(reply_fn<std::vector<fleet_node>> done) = 0;

  /// Telemetry that reached the hub: `device` ("" = all), enqueued at or after
  /// `since_ms`, with seq > after_seq, oldest first, at most `limit`.
  virtual void telemetry(std::string device, std::int64_t since_ms, std::int64_t after_seq,
                         std::size_t limit, reply_fn<std::vector<telemetry_record>> done) = 0;
};

}  // namespace canopy
