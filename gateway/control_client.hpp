// canopy::control_client — a small synchronous client of the control socket
// (schemas/control.capnp), used by canopyctl and by integration tests.
//
// Threading: a control_client owns a KJ event loop for the thread that created
// it (KJ allows one per thread), so use it on that thread only and keep at most
// one alive per thread. Every method blocks until the node answers, the call
// times out, the connection breaks or a captured signal arrives.
#pragma once

#include "gateway/control_server.hpp"
#include "gateway/node_control.hpp"
#include "runtime/expected.hpp"

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace canopy {

/// When follow_logs() / monitor() return (besides errors and interrupts).
struct stream_options {
  std::size_t max_count = 0;                       ///< after this many items; 0 = no limit
  std::chrono::milliseconds max_duration{0};       ///< after this long; 0 = no limit
  std::function<void(std::uint64_t)> on_dropped;   ///< told when the node dropped items for us (too slow)
};

/// One message for control_client::send(): who sent it (node_control::send)
/// and the message.
struct send_request {
  std::string device;  ///< connectionDeviceId: the leaf device, or empty
  std::string module;  ///< connectionModuleId; empty for a leaf device
  std::string output;  ///< outputName of a module sender
  message msg;
};

/// Hands messages from a producer thread to control_client::send_stream(),
/// with back-pressure: at most `window` messages are queued or unanswered at
/// once. push() and close() may be called from any thread (typically one that
/// reads input); send_stream() consumes on the client's thread. One
/// send_stream() per feed. Share it through std::shared_ptr when the producer
/// may outlive the stream (e.g. a thread blocked reading stdin).
class send_feed {
 public:
  /// A feed that lets at most `window` (at least 1) messages be queued or in flight.
  explicit send_feed(std::size_t window);
  ~send_feed();
  send_feed(const send_feed&) = delete;
  send_feed& operator=(const send_feed&) = delete;

  /// Any thread: queues `req` to be sent, blocking while `window` messages are
  /// queued or unanswered. Returns false (and drops `req`) once close() was
  /// called or the stream ended (the connection broke, an interrupt).
  bool push(send_request req);

  /// Any thread: no more messages; send_stream() returns once every queued
  /// message is answered.
  void close();

  /// Any thread: true once the stream that consumed this feed ended (push()
  /// then returns false).
  bool ended() const;

 private:
  friend class control_client;
  struct state;
  std::shared_ptr<state> state_;
};

/// A connection to a running node's control socket.
class control_client {
 public:
  /// Connects to the control socket at `socket_path`. On failure the error
  /// (errc::unavailable) reads "cannot connect to the canopy node at PATH: WHY
  /// (is `canopy run` running? use --socket or CANOPY_SOCKET)".
  static expected<control_client> connect(const std::string& socket_path);

  /// Closes the connection (the node ends this client's subscriptions).
  ~control_client();
  control_client(control_client&&) noexcept;
  control_client& operator=(control_client&&) noexcept;
  control_client(const control_client&) = delete;
  control_client& operator=(const control_client&) = delete;

  /// The modules of the current deployment.
  expected<std::vector<module_row>> list();

  /// Restarts `module` now.
  expected<void> restart(const std::string& module);

  /// Validates and applies a manifest; relative paths resolve against `base_dir`.
  /// A validation error comes back exactly as the node words it.
  expected<void> deploy(const std::string& manifest_json, const std::string& base_dir);

  /// Calls direct method `method` of `module`; the node enforces `timeout`
  /// (this client gives up 5 s after it, with errc::timeout).
  expected<method_reply> invoke(const std::string& module, const std::string& method,
                                const std::string& payload_json, std::chrono::milliseconds timeout);

  /// The module's twin.
  expected<twin_doc> twin(const std::string& module);

  /// The last `tail` log lines of `module`, oldest first.
  expected<std::vector<std::string>> logs(const std::string& module, std::size_t tail);

  /// Streams new log lines of `module` to `on_line` (return false to stop) until
  /// a limit of `options` is reached or an interrupt; returns the number of lines
  /// delivered. Errors: what the node answered, the connection's loss, or an
  /// exception thrown by `on_line` (errc::failed). The node ends the subscription
  /// when this returns.
  expected<std::size_t> follow_logs(const std::string& module,
                                    const std::function<bool(const std::string&)>& on_line,
                                    const stream_options& options = {});

  /// Streams $upstream messages (first the stored ones with seq > after_seq, at
  /// most `backlog`, then new ones) to `on_record`, like follow_logs().
  expected<std::size_t> monitor(std::int64_t after_seq, std::size_t backlog,
                                const std::function<bool(const upstream_record&)>& on_record,
                                const stream_options& options = {});

  /// The router's counters and the message store's state.
  expected<node_metrics> metrics();

  /// Routes one message as if module `module`'s output `output` sent it, or as
  /// leaf device `device`'s telemetry when `module` is empty (see
  /// node_control::send). Returns once the node holds it durably: the number of
  /// endpoints it was queued to (0 = it matched no route).
  expected<std::uint64_t> send(const std::string& device, const std::string& module, const std::string& output,
                               const message& msg);

  /// Sends every message pushed into `feed` (by another thread) on this
  /// connection, pipelined: up to the feed's window are in flight at once. Each
  /// answer goes to `on_result(index, targets or the node's error)` in push
  /// order (index from 0), as soon as it and every earlier one are answered,
  /// and only if its answer arrived. A message the node does not answer within
  /// the call timeout is reported as errc::timeout and the stream goes on.
  /// Returns the number of messages reported once `feed` is closed and every
  /// message answered. Errors end the stream (and the feed) early: the
  /// connection's loss (errc::unavailable), an interrupt ("send: interrupted"),
  /// or an exception thrown by `on_result` (errc::failed); messages not yet
  /// reported then are never reported.
  expected<std::size_t> send_stream(
      send_feed& feed, const std::function<void(std::size_t, const expected<std::uint64_t>&)>& on_result);

  /// How long a call other than invoke() may take before it fails with
  /// errc::timeout (default 60 s).
  void set_call_timeout(std::chrono::milliseconds timeout);

  /// Makes signal `signo` (e.g. SIGINT) end the current wait: a stream returns
  /// what it has delivered, any other call fails with "interrupted"; then
  /// interrupted() is true. Captures the signal process-wide (it is blocked and
  /// read through the event loop), so call it before starting other threads.
  void interrupt_on(int signo);

  /// True once a captured signal ended a wait.
  bool interrupted() const noexcept;

  /// The socket path this client connected to.
  const std::string& socket_path() const noexcept;

 private:
  struct impl;
  explicit control_client(std::unique_ptr<impl> p);
  std::unique_ptr<impl> impl_;
};

}  // namespace canopy
