// Pieces shared by the MQTT benchmarks (bench-mqtt, bench-mqtt-memory): the
// bench's device identities and their SAS credentials, the hub's registry
// filled before the hub starts, the MQTT CONNECT they send, the two servers
// under test started the same way in both benchmarks (Debian's mosquitto with
// a generated configuration; a `canopy run --role hub` serving MQTT), a
// non-blocking loopback connect and the process's file limit. Built on
// bench_fleet.hpp (tracked processes, ports, failing by exception).
#pragma once

#include "bench/bench_fleet.hpp"

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace canopy::bench {

/// The hub's device id, and the host name the devices' SAS tokens are signed
/// for (`--hub-host`).
inline constexpr const char* mqtt_hub_id = "bench-hub";

/// One device of the bench: its id (client id) and its SAS primary key (base64).
struct mqtt_device {
  std::string id;
  std::string key;
};

/// `n` devices "<prefix>0", "<prefix>1", ..., each with its own 32-byte key
/// (pseudo-random, fixed seed: the bench needs distinct keys, not secret ones).
std::vector<mqtt_device> make_mqtt_devices(long n, const std::string& prefix = "dev-");

/// Registers `devices` as SAS devices of the hub (parent: the hub, the
/// registry's root `hub_id`) in `data_dir`/registry.db, before the hub starts.
/// The file is written in a scratch directory on /dev/shm (every
/// registration is a transaction with fsync: 10,000 of them take seconds on a
/// disk) and then copied into `data_dir`. Fails on an error.
void register_mqtt_devices(const std::string& data_dir, const std::string& hub_id,
                           const std::vector<mqtt_device>& devices);

/// The bytes of the CONNECT of `d` as an Azure IoT Hub device: client id = id,
/// user name "<hub_host>/<id>/?api-version=2021-04-12", password a SAS token
/// for "<hub_host>/devices/<id>" valid for an hour, clean session.
std::string mqtt_connect_bytes(const mqtt_device& d, const std::string& hub_host,
                               std::uint16_t keep_alive_s);

/// How to start mosquitto.
struct mosquitto_options {
  int port = 0;
  /// TLS (server authentication only) with these PEM files when cert_file is set.
  std::string ca_file;
  std::string cert_file;
  std::string key_file;
  /// max_inflight_messages / max_queued_messages per client (0 = no limit).
  long max_inflight = 0;
  long max_queued = 0;
};

/// Writes `dir`/<name>.conf for `o` (listener on 127.0.0.1, anonymous clients
/// allowed — their SAS user names and passwords are ignored —, TCP_NODELAY,
/// no persistence, no connection limit), starts `mosquitto -c` on it and waits
/// until it accepts connections.
std::unique_ptr<tracked_process> start_mosquitto(const std::string& mosquitto,
                                                 const std::string& dir, const std::string& name,
                                                 const mosquitto_options& o);

/// How to start the canopy hub.
struct canopy_hub_options {
  std::string canopy;     ///< the program
  std::string certs_dir;  ///< holds ca.crt and <mqtt_hub_id>.crt/.key
  std::string data_dir;   ///< its registry filled by register_mqtt_devices
  std::string socket;     ///< control socket ("" = none)
  int mqtt_port = 0;
  bool plain = false;              ///< --mqtt-plain
  std::vector<std::string> extra;  ///< more flags
};

/// The argv of `canopy run --role hub --device-id bench-hub --hub-host
/// bench-hub --mqtt-listen 127.0.0.1:PORT [--mqtt-plain]` with `o`.
std::vector<std::string> canopy_hub_argv(const canopy_hub_options& o);

/// Starts the hub and waits (up to 30 s) until its MQTT port accepts TCP
/// connections; fails with its output if it exits first.
std::unique_ptr<tracked_process> start_canopy_hub(const canopy_hub_options& o);

/// True if `canopy run --help` mentions --mqtt-listen (the node serves MQTT).
bool canopy_serves_mqtt(const std::string& canopy);

/// Which servers a benchmark run measures and how to start them, from its
/// options: --only=canopy|mosquitto, --canopy=PATH (else $CANOPY_BIN, else
/// `canopy_default`), --mosquitto=PATH (else $MOSQUITTO_BIN, else
/// /usr/sbin/mosquitto), --hub-args="..." (split at spaces). Fails (throws)
/// on a bad --only or a missing program.
struct mqtt_servers {
  bool run_canopy = true;
  bool run_mosquitto = true;
  std::string canopy;     ///< "" unless run_canopy
  std::string mosquitto;  ///< "" unless run_mosquitto
  std::vector<std::string> hub_args;
};
mqtt_servers mqtt_servers_from_options(int argc, char** argv, const char* canopy_default);

/// A non-blocking TCP socket connecting to 127.0.0.1:port (TCP_NODELAY,
/// close-on-exec); the connect may still be in progress. Fails on an error
/// other than EINPROGRESS.
int connect_nonblocking(int port);

/// Raises RLIMIT_NOFILE (soft and hard, as root may) to at least `n`, so that
/// this process and the servers it starts afterwards (they inherit it) can
/// hold that many descriptors; returns the soft limit now.
long raise_file_limit(long n);

/// A string option: `--name=value` or `--name value`, else `fallback`.
std::string string_option(int argc, char** argv, const std::string& name,
                          const std::string& fallback);

/// utime + stime of this process in ms.
double self_cpu_ms();

}  // namespace canopy::bench
