// canopy::link_client and canopy::link_server — the link between a child node
// and its parent (schemas/link.capnp): Cap'n Proto RPC over mutually
// authenticated TLS, on the node's io_thread (DESIGN.md "Between nodes").
//
// Only the network side lives here: connections, TLS, RPC, limits. What the
// link means — admission against the registry, scope checks, durability,
// backoff — is decided by the actors through the two callback interfaces
// (link_host on the parent, downstream_handler on the child), the way
// node_control serves the control socket. No CAF here.
//
// Threading: construct, start() and stop() from a thread that is not the I/O
// thread (main()). Every other method may be called from any thread, returns
// at once, and answers through its callback exactly once, later, on an
// arbitrary thread (never inside the call). Callbacks into link_host and
// downstream_handler are made on the I/O thread; they must return at once and
// answer their reply_fn exactly once, from any thread.
#pragma once

#include "gateway/node_control.hpp"  // reply_fn, method_reply
#include "runtime/expected.hpp"
#include "runtime/registry.hpp"      // device_record

#include <canopy/message.hpp>

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace canopy {

class io_thread;
class tls_config;

/// One telemetry message on its way up, with where it came from.
struct link_envelope {
  message msg;         ///< sent as msg.encoded(), never re-encoded
  std::string device;  ///< connectionDeviceId
  std::string module;  ///< connectionModuleId ("" for a leaf device)
  std::string output;  ///< outputName
};

/// A twin document or merge patch travelling up or down the tree.
struct twin_update {
  std::string device;
  std::string module;      ///< "" = the device twin; "$edgeAgent" carries deployments
  std::string json;        ///< the whole document (full) or an RFC 7386 merge patch
  std::int64_t version = 0;  ///< the version after this update
  bool full = false;
};

/// Limits that protect a parent from its children (and a child from its parent).
struct link_limits {
  std::size_t max_batch_messages = 4096;      ///< envelopes in one upload call
  std::size_t max_batch_bytes = 16u << 20;    ///< encoded bytes in one upload call
  std::size_t max_connections = 1024;         ///< concurrent child connections
  std::size_t max_pending_uploads = 16;       ///< upload calls of one connection awaiting link_host; more fail (unavailable)
  std::uint64_t traversal_limit_words = 8u << 20;  ///< capnp ReaderOptions for every message
  std::chrono::milliseconds handshake_timeout{10000};  ///< TCP accept .. hello answered
};

// --- Child side ----------------------------------------------------------------

/// What the parent may ask of this node; implemented by the actor side.
class downstream_handler {
 public:
  virtual ~downstream_handler() = default;
  /// Replace the cached registry of this node's subtree.
  virtual void sync_scope(std::vector<device_record> entries, reply_fn<void> done) = 0;
  /// Desired properties for twins in this node's subtree.
  virtual void desired(std::vector<twin_update> updates, reply_fn<void> done) = 0;
  /// A direct method on a module of a node in this subtree (this node or further down).
  virtual void invoke(std::string device, std::string module, std::string method,
                      std::string payload_json, std::chrono::milliseconds timeout,
                      reply_fn<method_reply> done) = 0;
};

/// One up/down change of a link_client connection.
struct link_event {
  std::uint64_t generation = 0;  ///< which connect() this is about
  bool up = false;               ///< true: hello answered; false: failed or lost
  std::string parent_id;         ///< the parent's id from hello (when up)
  std::string error;             ///< why it failed or was lost (when down)
};

struct link_client_options {
  std::string parent_address;  ///< "host:port"
  std::string parent_id;       ///< the parent's id: its certificate must name it (SAN DNS)
  std::string node_id;         ///< this node's id: our certificate's CN
  tls_config* tls = nullptr;   ///< client role, with our certificate; borrowed, required
  link_limits limits;
};

/// The calls a parent link makes on its connection: link_client implements
/// them; tests of the parent link actor substitute their own.
class uplink {
 public:
  virtual ~uplink() = default;
  /// See link_client::connect.
  virtual std::uint64_t connect(std::function<void(link_event)> on_event) = 0;
  /// See link_client::upload.
  virtual void upload(std::uint64_t generation, std::vector<link_envelope> batch,
                      reply_fn<std::uint32_t> done) = 0;
  /// See link_client::ping.
  virtual void ping(std::uint64_t generation, reply_fn<std::chrono::microseconds> done) = 0;
  /// See link_client::report_twins.
  virtual void report_twins(std::uint64_t generation, std::vector<twin_update> updates,
                            reply_fn<void> done) = 0;
  /// See link_client::close.
  virtual void close() = 0;
};

/// The child's end of the link to its parent. One connection at a time.
class link_client final : public uplink {
 public:
  /// Borrows `io`, `handler` and options.tls; they must outlive stop().
  link_client(io_thread& io, link_client_options options, downstream_handler& handler);
  /// Calls stop().
  ~link_client();
  link_client(const link_client&) = delete;
  link_client& operator=(const link_client&) = delete;

  /// Any thread: closes the current connection (if any) and starts one attempt:
  /// TCP connect, TLS (checking the parent's certificate against parent_id),
  /// hello. `on_event` is called (on the I/O thread) once with up=true or
  /// up=false; after an up, once more with up=false when the connection is lost
  /// or closed. Returns the attempt's generation; calls naming an older
  /// generation fail with errc::unavailable.
  std::uint64_t connect(std::function<void(link_event)> on_event) override;

  /// Any thread: uploads `batch` on connection `generation`. `done` gets the
  /// number accepted once the parent made them durable, or an error (then the
  /// caller keeps them and sends them again on a later connection).
  void upload(std::uint64_t generation, std::vector<link_envelope> batch,
              reply_fn<std::uint32_t> done) override;

  /// Any thread: a ping; `done` gets the round-trip time.
  void ping(std::uint64_t generation, reply_fn<std::chrono::microseconds> done) override;

  /// Any thread: reported properties / statuses for twins of this subtree.
  void report_twins(std::uint64_t generation, std::vector<twin_update> updates,
                    reply_fn<void> done) override;

  /// Any thread: closes the current connection (its down event follows).
  void close() override;

  /// Not from the I/O thread: closes and waits until nothing of this client
  /// is left on the I/O thread; no callback runs after it returns. Idempotent.
  void stop();

  struct impl;

 private:
  std::shared_ptr<impl> impl_;
};

// --- Parent side ---------------------------------------------------------------

/// The way down to one connected child; every method from any thread.
class child_channel {
 public:
  virtual ~child_channel() = default;
  /// Unique per connection (a reconnecting child gets a new one).
  virtual std::uint64_t id() const = 0;
  /// The authenticated child's id.
  virtual const std::string& child_id() const = 0;
  virtual void sync_scope(std::vector<device_record> entries, reply_fn<void> done) = 0;
  virtual void desired(std::vector<twin_update> updates, reply_fn<void> done) = 0;
  virtual void invoke(std::string device, std::string module, std::string method,
                      std::string payload_json, std::chrono::milliseconds timeout,
                      reply_fn<method_reply> done) = 0;
  /// Disconnects the child (e.g. it was deleted from the registry).
  virtual void close(std::string reason) = 0;
};

/// What connected children may do; implemented by the actor side.
class link_host {
 public:
  virtual ~link_host() = default;
  /// After the TLS handshake: may `child_id` (its certificate's CN) connect?
  /// An error refuses it; its message is logged and sent to the child.
  virtual void admit(std::string child_id, reply_fn<void> done) = 0;
  /// hello succeeded: the child is connected through `channel`.
  virtual void child_up(std::shared_ptr<child_channel> channel) = 0;
  /// The connection `channel_id` of `child_id` ended.
  virtual void child_down(std::string child_id, std::uint64_t channel_id, std::string reason) = 0;
  /// Telemetry from the child: answer with the number accepted once durable.
  virtual void upload(std::string child_id, std::uint64_t channel_id, std::vector<link_envelope> batch,
                      reply_fn<std::uint32_t> done) = 0;
  /// Reported properties from the child's subtree.
  virtual void report_twins(std::string child_id, std::uint64_t channel_id,
                            std::vector<twin_update> updates, reply_fn<void> done) = 0;
};

struct link_server_options {
  std::string listen;          ///< "host:port"; port 0 picks one (see port())
  std::string node_id;         ///< this node's id (answered in hello)
  tls_config* tls = nullptr;   ///< server role verifying clients; borrowed, required
  link_limits limits;
};

/// The parent's link port.
class link_server {
 public:
  /// Borrows `host` and options.tls; they must outlive stop().
  link_server(link_server_options options, link_host& host);
  /// Calls stop().
  ~link_server();
  link_server(const link_server&) = delete;
  link_server& operator=(const link_server&) = delete;

  /// Binds and starts accepting on `io` (running). Blocks until it listens.
  expected<void> start(io_thread& io);
  /// The bound port (after start()).
  std::uint16_t port() const noexcept;
  /// Stops accepting, closes every child connection (child_down for each) and
  /// waits. Idempotent. Not from the I/O thread.
  void stop();

  struct impl;

 private:
  std::shared_ptr<impl> impl_;
};

}  // namespace canopy
