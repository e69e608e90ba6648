// canopy::mqtt_server — the MQTT 3.1.1 port of a node (issue 5): leaf devices
// and process modules connect here with Azure IoT Hub's device protocol.
//
// Only the network side lives here: TCP (or TLS), the MQTT codec
// (gateway/mqtt_codec.hpp), keep-alive, packet size and connection limits, the
// order of acknowledgements. What a client may do — authentication, topics,
// routing, durability, sessions — is decided by the actor side through
// mqtt_host and the mqtt_session it hands back for each accepted client, the
// way link_host serves child links. No CAF here.
//
// Threading: construct, start() and stop() from a thread that is not the I/O
// thread. mqtt_channel's methods may be called from any thread and return at
// once. Calls into mqtt_host and mqtt_session are made on the I/O thread; they
// must return at once and answer their callbacks exactly once, from any
// thread. Per connection, calls into its session are made in the order the
// packets arrived, and the answers to its publish() calls are written to the
// client in that same order, whatever order they come back in.
#pragma once

#include "gateway/mqtt_codec.hpp"
#include "gateway/node_control.hpp"  // reply_fn
#include "runtime/expected.hpp"

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <variant>
#include <vector>

namespace canopy {

class io_thread;
class tls_server_context;

/// Limits that protect a node from its MQTT clients.
struct mqtt_limits {
  /// Largest packet a client may send (its remaining length). Azure IoT Hub
  /// accepts messages up to 256 KiB; its topic and property bag come on top.
  std::size_t max_packet_bytes = 256 * 1024 + 16 * 1024;
  std::size_t max_connections = 20000;  ///< concurrent clients
  /// From TCP accept until CONNECT has arrived (and, with TLS, the handshake).
  std::chrono::milliseconds connect_timeout{10000};
  /// Publishes (QoS 0 and 1) of one client not yet answered by its session;
  /// the server stops reading from that client while it has this many.
  std::size_t max_pending_publishes = 4096;
  /// Bytes written to one client and not yet taken by the kernel; a client
  /// that reads nothing is disconnected beyond it.
  std::size_t max_write_backlog = 8u << 20;
};

struct mqtt_server_options {
  std::string listen;          ///< "host:port"; port 0 picks one (see port())
  /// TLS (gateway/ossl_tls.hpp: a client certificate is optional, and one
  /// that does not chain to the CA still gets through, for the host to check
  /// its thumbprint); null = plain TCP, which the node allows only when
  /// configured to. Borrowed; must outlive stop().
  const tls_server_context* tls = nullptr;
  mqtt_limits limits;
};

/// What the host gets to decide on a CONNECT.
struct mqtt_connect_info {
  std::uint64_t connection_id = 0;   ///< unique per TCP connection
  std::string peer_address;          ///< "ip:port"
  mqtt::connect_packet packet;       ///< client id, user name, password, clean session, keep-alive, will
  bool tls = false;                  ///< the connection is TLS
  /// The client certificate (TLS only; empty if none was sent): its subject CN
  /// and SHA-256 thumbprint (uppercase hex); `cert_chain_ok` if it chains to
  /// the fleet's CA, else `cert_chain_error` says why not.
  std::string cert_cn;
  std::string cert_thumbprint;       ///< SHA-256
  std::string cert_thumbprint_sha1;  ///< SHA-1 (Azure registries hold either)
  bool cert_chain_ok = false;
  std::string cert_chain_error;
};

/// One result of mqtt_session::publish, per packet in order.
using mqtt_publish_result = expected<void>;

/// The way to one connected client; every method from any thread.
class mqtt_channel {
 public:
  virtual ~mqtt_channel() = default;
  /// Unique per connection.
  virtual std::uint64_t id() const = 0;
  /// Sends a PUBLISH (`packet_id` must be set for QoS 1; the client's PUBACK
  /// reaches mqtt_session::acked). Dropped if the connection is gone.
  virtual void publish(mqtt::publish_packet packet) = 0;
  /// Closes the connection (mqtt_session::closed follows). The first reason wins.
  virtual void close(std::string reason) = 0;
};

/// One accepted client, on the actor side.
class mqtt_session {
 public:
  virtual ~mqtt_session() = default;
  /// PUBLISH packets the client sent, in order (QoS 0 and 1). `done` gets one
  /// result per packet, in order: for QoS 1, only once the message is durable
  /// (the server then sends PUBACK); an error closes the connection (the
  /// message names why, for the log).
  virtual void publish(std::vector<mqtt::publish_packet> batch,
                       std::function<void(std::vector<mqtt_publish_result>)> done) = 0;
  /// SUBSCRIBE: `done` gets the SUBACK return codes (0x00/0x01 granted QoS,
  /// 0x80 refused), one per filter.
  virtual void subscribe(std::vector<mqtt::subscription> filters,
                         reply_fn<std::vector<std::uint8_t>> done) = 0;
  /// UNSUBSCRIBE.
  virtual void unsubscribe(std::vector<std::string> filters, reply_fn<void> done) = 0;
  /// The client acknowledged our QoS 1 PUBLISH `packet_id`.
  virtual void acked(std::uint16_t packet_id) = 0;
  /// The connection ended (the last call). `clean`: the client sent
  /// DISCONNECT (then its will is dropped); otherwise it is due.
  virtual void closed(std::string reason, bool clean) = 0;
};

/// What the host answers to a CONNECT it accepts.
struct mqtt_accept {
  std::shared_ptr<mqtt_session> session;
  bool session_present = false;  ///< CONNACK's flag: a persistent session was resumed
};

/// Why a CONNECT is refused: the CONNACK return code and the reason for the log.
struct mqtt_refusal {
  mqtt::connack_code code = mqtt::connack_code::not_authorized;
  std::string reason;
};

/// Authenticates clients and makes their sessions; implemented by the actor side.
class mqtt_host {
 public:
  virtual ~mqtt_host() = default;
  /// A CONNECT arrived. Answer with a session (CONNACK accepted, and the
  /// session gets every later packet) or a refusal (CONNACK with its code,
  /// then the connection closes; the reason is logged with the client id).
  /// `channel` is how the session reaches the client.
  virtual void connect(mqtt_connect_info info, std::shared_ptr<mqtt_channel> channel,
                       std::function<void(std::variant<mqtt_accept, mqtt_refusal>)> done) = 0;
};

/// The node's MQTT port.
class mqtt_server {
 public:
  /// Borrows `host` and options.tls; they must outlive stop().
  mqtt_server(mqtt_server_options options, mqtt_host& host);
  /// Calls stop().
  ~mqtt_server();
  mqtt_server(const mqtt_server&) = delete;
  mqtt_server& operator=(const mqtt_server&) = delete;

  /// Binds and starts accepting on `io` (running). Blocks until it listens.
  expected<void> start(io_thread& io);
  /// The bound port (after start()).
  std::uint16_t port() const noexcept;
  /// Connections open now.
  std::size_t connections() const noexcept;
  /// Stops accepting, closes every connection (each session's closed() runs)
  /// and waits. Idempotent. Not from the I/O thread.
  void stop();

  struct impl;

 private:
  std::shared_ptr<impl> impl_;
};

}  // namespace canopy
