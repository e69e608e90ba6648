// What the local control socket (gateway/control_server) may ask of a running
// node. Implemented on the actor side (actors/node_control_impl); called from
// the I/O thread. No CAF or KJ types cross this interface.
//
// Threading: every call returns at once; its callback is invoked exactly once,
// later, on an arbitrary thread (never inside the call). Subscription callbacks
// run on arbitrary threads too, one at a time per subscription, until
// unsubscribe() returns.
#pragma once

#include "runtime/expected.hpp"
#include "runtime/metrics.hpp"

#include <canopy/message.hpp>

#include <chrono>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace canopy {

/// One line of `canopyctl list`.
struct module_row {
  std::string name;
  std::string type;            ///< "actor"
  std::string version;
  std::string status;          ///< running | stopped | failed | backoff | unhealthy
  std::string desired_status;  ///< running | stopped
  std::string restart_policy;
  int restart_count = 0;
  std::int64_t last_start_ms = 0;  ///< wall clock, ms since epoch; 0 = never
  std::int64_t last_exit_ms = 0;
  std::string last_exit_reason;
};

/// The answer of a direct method.
struct method_reply {
  int status = 200;
  std::string payload_json;
};

/// A module twin: desired and reported properties as JSON documents.
struct twin_doc {
  std::string desired_json;
  std::string reported_json;
};

/// A message that arrived at $upstream, as kept in the store.
struct upstream_record {
  std::int64_t seq = 0;
  std::int64_t enqueued_ms = 0;
  std::string source_module;
  std::string output;
  message msg;
  std::string source_device{};  ///< connectionDeviceId of the sender ("" if stored before it was kept)
};

template <class T>
using reply_fn = std::function<void(expected<T>)>;

/// One message of node_control::send_batch: as the arguments of send().
struct send_item {
  std::string device;
  std::string module;
  std::string output;
  message msg;
};

class node_control {
 public:
  using subscription_id = std::uint64_t;

  virtual ~node_control() = default;

  /// The modules of the current deployment and their runtime state.
  virtual void list(reply_fn<std::vector<module_row>> done) = 0;

  /// Restarts a module now (also clears `failed`).
  virtual void restart(std::string module, reply_fn<void> done) = 0;

  /// Validates and applies a manifest (JSON text); relative library paths
  /// resolve against `base_dir`. All or nothing: on error nothing changes.
  virtual void deploy(std::string manifest_json, std::string base_dir, reply_fn<void> done) = 0;

  /// Calls direct method `method` of `module` with a JSON payload.
  virtual void invoke(std::string module, std::string method, std::string payload_json,
                      std::chrono::milliseconds timeout, reply_fn<method_reply> done) = 0;

  /// The module's twin.
  virtual void twin(std::string module, reply_fn<twin_doc> done) = 0;

  /// The last `tail` log lines of `module` (oldest first).
  virtual void logs(std::string module, std::size_t tail, reply_fn<std::vector<std::string>> done) = 0;

  /// Streams new log lines of `module` to `on_line` until unsubscribed.
  virtual expected<subscription_id> follow_logs(std::string module,
                                                std::function<void(std::string line)> on_line) = 0;

  /// Streams messages arriving at $upstream: first the newest `backlog` stored
  /// ones with seq > after_seq, oldest first, then new ones as they arrive.
  virtual expected<subscription_id> monitor(std::int64_t after_seq, std::size_t backlog,
                                            std::function<void(upstream_record)> on_record) = 0;

  /// The router's counters and the message store's state (`canopyctl metrics`).
  virtual void metrics(reply_fn<node_metrics> done) = 0;

  /// Routes `msg` as if module `module`'s output `output` sent it
  /// (connectionModuleId / outputName), or, when `module` is empty, as
  /// telemetry of leaf device `device` (connectionDeviceId; a stand-in for the
  /// MQTT head). `device` may also name a module sender's device; empty fields
  /// fall back to the message's own system properties. Answers once the message
  /// is durable, with the number of endpoints it was queued to (0: it matched no
  /// route); errc::unavailable "store full: ..." if the store refused it.
  virtual void send(std::string device, std::string module, std::string output, message msg,
                    reply_fn<std::uint64_t> done) = 0;

  /// send() for each item, in order, answered once for all: `done` gets each
  /// item's answer, in order, once the last is known. This one calls send()
  /// per item; a node overrides it to hand the router one batch.
  virtual void send_batch(std::vector<send_item> items,
                          std::function<void(std::vector<expected<std::uint64_t>>)> done);

  /// Ends a subscription; no callback of it runs after this returns.
  virtual void unsubscribe(subscription_id id) = 0;
};

}  // namespace canopy
