// canopy — the node. `canopy run [--manifest FILE]` runs a deployment until
// SIGINT/SIGTERM; `canopy check FILE` validates a manifest.
#include "actors/node.hpp"

#include <canopy/module.hpp>

#include <CLI/CLI.hpp>

#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <pthread.h>

#include <chrono>
#include <thread>

int main(int argc, char** argv) {
  CLI::App app{"canopy: the Canopy IoT edge node"};
  app.require_subcommand(1);
  canopy::node_options opts;
  if (const char* env = std::getenv("CANOPY_SOCKET"))
    opts.socket_path = env;
  if (const char* env = std::getenv("CANOPY_DATA_DIR"))
    opts.data_dir = env;

  auto* run = app.add_subcommand("run", "Run the node: the given manifest, or the last applied deployment");
  run->add_option("-m,--manifest", opts.manifest_path, "Deployment manifest (JSON) to apply at start")
    ->check(CLI::ExistingFile);
  run->add_option("-d,--data-dir", opts.data_dir, "State directory (SQLite store, logs)")->capture_default_str();
  run->add_option("-s,--socket", opts.socket_path, "Control socket for canopyctl (\"\" = none)")->capture_default_str();
  run->add_option("--device-id", opts.device_id, "This node's device id (default: host name)");
  run->add_option("--log-level", opts.log.level, "trace|debug|info|warn|error|critical|off")->capture_default_str();
  run->add_flag("--log-json", opts.log.json, "Log one JSON object per line");
  run->add_option("--module-path", opts.module_path, "Directories searched for relative module libraries");
  run->add_option("--threads", opts.worker_threads, "Actor worker threads (0 = one per core, at least 2)");
  double store_limit_mb = 0;
  run->add_option("--store-limit-mb", store_limit_mb,
                  "Size limit of the message store in MiB (0 = none): at the limit new messages "
                  "are refused with \"store full\" instead of filling the disk")
    ->check(CLI::NonNegativeNumber);
  unsigned upstream_hold_ms = 20;
  run->add_option("--upstream-hold-ms", upstream_hold_ms,
                  "How long a message bound only for $upstream whose sender waits may wait for the "
                  "parent's acknowledgement before this node writes it itself (0 = write at every hop)")
    ->capture_default_str();
  run->add_option("--role", opts.role, "edge | hub (the root of the tree)")
    ->check(CLI::IsMember({"edge", "hub"}))->capture_default_str();
  run->add_option("--certs", opts.certs_dir,
                  "Directory with <device-id>.crt, <device-id>.key and ca.crt (canopyctl certs)");
  run->add_option("--cert", opts.cert_path, "This node's certificate (PEM)");
  run->add_option("--key", opts.key_path, "This node's private key (PEM)");
  run->add_option("--ca", opts.ca_path, "The fleet's root CA certificate (PEM)");
  run->add_option("--link-listen", opts.link_listen, "Accept child gateways on HOST:PORT (TLS)");
  run->add_option("--parent", opts.parent_address, "Connect to the parent node at HOST:PORT (TLS)");
  run->add_option("--parent-id", opts.parent_id, "The parent's device id (its certificate must name it)");
  run->add_option("--metrics-listen", opts.metrics_listen, "Serve Prometheus metrics on http://HOST:PORT/metrics");
  run->add_option("--api-listen", opts.api_listen, "Hub: serve the operator REST API on https://HOST:PORT");
  run->add_option("--mqtt-listen", opts.mqtt_listen,
                  "Serve leaf devices and process modules over MQTT (Azure IoT Hub's protocol) on HOST:PORT "
                  "(TLS with this node's certificate; 8883 is MQTT's TLS port)");
  run->add_flag("--mqtt-plain", opts.mqtt_plain, "Plain TCP instead of TLS on --mqtt-listen (loopback development)");
  run->add_option("--hub-host", opts.hub_host,
                  "The host name devices sign SAS tokens for (default: this node's device id)");
  run->add_option("--api-token-file", opts.api_token_file,
                  "Hub: the REST API's bearer token (created if missing; default DATA/api-token)");
  unsigned stop_timeout = 60;
  run->add_option("--stop-timeout", stop_timeout,
                  "Seconds an orderly stop may take before the process exits anyway")
    ->capture_default_str();

  std::string check_file;
  auto* check = app.add_subcommand("check", "Validate a deployment manifest and exit");
  check->add_option("manifest", check_file, "Manifest file")->required();
  check->add_option("--module-path", opts.module_path, "Directories searched for relative module libraries");

  app.add_subcommand("version", "Print versions and exit");

  CLI11_PARSE(app, argc, argv);
  opts.max_store_bytes = static_cast<std::int64_t>(store_limit_mb * 1024 * 1024);
  opts.upstream_hold = std::chrono::milliseconds{upstream_hold_ms};

  if (app.got_subcommand("version")) {
    std::printf("canopy %s (module ABI %u)\n", canopy::sdk_version, canopy::module_abi_version);
    return 0;
  }
  if (app.got_subcommand("check")) {
    auto r = canopy::check_manifest_file(check_file, opts.module_path);
    if (!r) {
      std::fprintf(stderr, "invalid manifest: %s\n", r.err().message.c_str());
      return 1;
    }
    std::printf("%s: ok\n", check_file.c_str());
    return 0;
  }
  // Block the stop signals in every thread the node starts; wait for them here.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGINT);
  sigaddset(&stop_signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);
  std::signal(SIGPIPE, SIG_IGN);

  auto n = canopy::node::start(opts);
  if (!n) {
    std::fprintf(stderr, "canopy: cannot start: %s\n", n.err().message.c_str());
    return 1;
  }
  int sig = 0;
  sigwait(&stop_signals, &sig);
  std::fprintf(stderr, "canopy: %s received, stopping\n", sig == SIGINT ? "SIGINT" : "SIGTERM");
  // A module handler that never returns holds its worker thread, and the
  // actor system waits for every worker at shutdown: bound the wait. The store
  // is SQLite in WAL mode, so ending the process here loses nothing committed.
  std::thread([stop_timeout] {
    std::this_thread::sleep_for(std::chrono::seconds{stop_timeout});
    std::fprintf(stderr,
                 "canopy: stop did not finish within %u s (a module handler is stuck); exiting now\n",
                 stop_timeout);
    std::_Exit(3);
  }).detach();
  (*n)->stop();
  return (*n)->failed() ? 1 : 0;
}
