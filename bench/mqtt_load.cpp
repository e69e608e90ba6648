#include "bench/mqtt_load.hpp"

#include "gateway/iothub_protocol.hpp"
#include "gateway/mqtt_codec.hpp"
#include "integration/process.hpp"
#include "runtime/clock.hpp"
#include "runtime/registry.hpp"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <random>

namespace canopy::bench {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

std::vector<mqtt_device> make_mqtt_devices(long n, const std::string& prefix) {
  std::mt19937_64 rng{0x5eedULL};
  std::vector<mqtt_device> out;
  out.reserve(static_cast<std::size_t>(n));
  for (long i = 0; i < n; ++i) {
    std::string raw(32, '\0');
    for (auto& c : raw)
      c = static_cast<char>(rng() & 0xff);
    out.push_back({prefix + std::to_string(i), iothub::base64_encode(raw)});
  }
  return out;
}

void register_mqtt_devices(const std::string& data_dir, const std::string& hub_id,
                           const std::vector<mqtt_device>& devices) {
  test::temp_dir scratch_parent("cnbm");  // only for a unique name
  const std::string scratch = "/dev/shm/" + fs::path{scratch_parent.path()}.filename().string();
  struct remove_dir {
    std::string path;
    ~remove_dir() {
      std::error_code ec;
      fs::remove_all(path, ec);
    }
  } cleanup{scratch};
  {
    canopy::system_clock wall;
    auto reg = fleet_registry::open(scratch, hub_id, wall);
    if (!reg)
      fail("registry in " + scratch + ": " + reg.err().message);
    for (const auto& d : devices) {
      device_record r;
      r.id = d.id;
      r.kind = "device";
      r.auth = "sas";
      r.primary_key = d.key;
      if (auto c = (*reg)->create_device(r); !c)
        fail("registering " + d.id + ": " + c.err().message);
    }
  }  // closed: SQLite checkpoints the WAL into registry.db
  std::error_code ec;
  fs::create_directories(data_dir, ec);
  for (const char* f : {"registry.db", "registry.db-wal", "registry.db-shm"}) {
    const fs::path from = fs::path{scratch} / f;
    if (!fs::exists(from))
      continue;
    fs::copy_file(from, fs::path{data_dir} / f, fs::copy_options::overwrite_existing, ec);
    if (ec)
      fail("copying " + from.string() + " to " + data_dir + ": " + ec.message());
  }
}

std::string mqtt_connect_bytes(const mqtt_device& d, const std::string& hub_host,
                               std::uint16_t keep_alive_s) {
  mqtt::connect_packet c;
  c.client_id = d.id;
  c.clean_session = true;
  c.keep_alive_s = keep_alive_s;
  c.username = hub_host + "/" + d.id + "/?api-version=2021-04-12";
  auto sas = iothub::make_sas(hub_host + "/devices/" + d.id, d.key,
                              static_cast<std::int64_t>(std::time(nullptr)) + 3600);
  if (!sas)
    fail("SAS token of " + d.id + ": " + sas.err().message);
  c.password = std::move(*sas);
  if (auto v = mqtt::validate(c); !v)
    fail("CONNECT of " + d.id + ": " + v.err().message);
  return mqtt::encode(c);
}

std::unique_ptr<tracked_process> start_mosquitto(const std::string& mosquitto,
                                                 const std::string& dir, const std::string& name,
                                                 const mosquitto_options& o) {
  std::string conf =
    "per_listener_settings false\n"
    "user root\n"
    "listener " +
    std::to_string(o.port) +
    " 127.0.0.1\n"
    "allow_anonymous true\n"
    "set_tcp_nodelay true\n"
    "persistence false\n"
    "max_connections -1\n"
    "max_inflight_messages " +
    std::to_string(o.max_inflight) +
    "\n"
    "max_queued_messages " +
    std::to_string(o.max_queued) +
    "\n"
    "log_dest stderr\n"
    "log_type error\n";
  if (!o.cert_file.empty())
    conf += "cafile " + o.ca_file + "\ncertfile " + o.cert_file + "\nkeyfile " + o.key_file +
            "\nrequire_certificate false\n";
  const std::string path = dir + "/" + name + ".conf";
  test::write_text_file(path, conf);
  auto broker = std::make_unique<tracked_process>(std::vector<std::string>{mosquitto, "-c", path},
                                                  std::string{}, end_with::sigterm);
  wait_or_fail(
    [&] {
      broker->check_alive("mosquitto");
      return port_accepts(o.port);
    },
    10s, "mosquitto to listen on " + loopback(o.port));
  return broker;
}

std::vector<std::string> canopy_hub_argv(const canopy_hub_options& o) {
  std::vector<std::string> extra{"--role",    "hub",           "--hub-host",
                                 mqtt_hub_id, "--mqtt-listen", loopback(o.mqtt_port)};
  if (o.plain)
    extra.push_back("--mqtt-plain");
  extra.insert(extra.end(), o.extra.begin(), o.extra.end());
  return node_argv(o.canopy, mqtt_hub_id, o.certs_dir, o.data_dir, o.socket, extra);
}

std::unique_ptr<tracked_process> start_canopy_hub(const canopy_hub_options& o) {
  auto hub =
    std::make_unique<tracked_process>(canopy_hub_argv(o), std::string{}, end_with::sigterm);
  wait_or_fail(
    [&] {
      hub->check_alive("the canopy hub");
      return port_accepts(o.mqtt_port);
    },
    30s, "the canopy hub to listen for MQTT on " + loopback(o.mqtt_port), 50ms);
  return hub;
}

bool canopy_serves_mqtt(const std::string& canopy) {
  auto r = test::run({canopy, "run", "--help"}, 10s);
  return r.output.find("--mqtt-listen") != std::string::npos;
}

int connect_nonblocking(int port) {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0)
    fail("socket: " + std::string(std::strerror(errno)));
  int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = htons(static_cast<std::uint16_t>(port));
  if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 && errno != EINPROGRESS) {
    const int e = errno;
    ::close(fd);
    fail("connect to " + loopback(port) + ": " + std::strerror(e));
  }
  return fd;
}

long raise_file_limit(long n) {
  rlimit rl{};
  ::getrlimit(RLIMIT_NOFILE, &rl);
  const auto want = static_cast<rlim_t>(n);
  if (rl.rlim_cur < want || rl.rlim_max < want) {
    rlimit up{std::max(rl.rlim_cur, want), std::max(rl.rlim_max, want)};
    if (::setrlimit(RLIMIT_NOFILE, &up) != 0) {
      // Not root: as far as the hard limit goes.
      up = {std::max(rl.rlim_cur, std::min(want, rl.rlim_max)), rl.rlim_max};
      ::setrlimit(RLIMIT_NOFILE, &up);
    }
    ::getrlimit(RLIMIT_NOFILE, &rl);
  }
  return static_cast<long>(rl.rlim_cur);
}

std::string string_option(int argc, char** argv, const std::string& name,
                          const std::string& fallback) {
  const std::string flag = "--" + name, prefix = flag + "=";
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a.rfind(prefix, 0) == 0)
      return a.substr(prefix.size());
    if (a == flag && i + 1 < argc)
      return argv[i + 1];
  }
  return fallback;
}

double self_cpu_ms() {
  rusage ru{};
  ::getrusage(RUSAGE_SELF, &ru);
  auto ms = [](const timeval& t) {
    return static_cast<double>(t.tv_sec) * 1e3 + static_cast<double>(t.tv_usec) / 1e3;
  };
  return ms(ru.ru_utime) + ms(ru.ru_stime);
}

mqtt_servers mqtt_servers_from_options(int argc, char** argv, const char* canopy_default) {
  mqtt_servers out;
  const std::string only = string_option(argc, argv, "only", "");
  if (!only.empty() && only != "canopy" && only != "mosquitto")
    fail("--only: canopy or mosquitto");
  out.run_canopy = only != "mosquitto";
  out.run_mosquitto = only != "canopy";
  if (out.run_canopy) {
    const std::string flag = string_option(argc, argv, "canopy", "");
    if (!flag.empty())
      ::setenv("CANOPY_BIN", flag.c_str(), 1);
    out.canopy = find_program("CANOPY_BIN", canopy_default, "build it: ninja -C build canopy");
    if (!canopy_serves_mqtt(out.canopy))
      fail(out.canopy +
           " does not serve MQTT (no --mqtt-listen in `canopy run --help`); --only=mosquitto runs the "
           "baseline alone");
  }
  if (out.run_mosquitto) {
    const std::string flag = string_option(argc, argv, "mosquitto", "");
    if (!flag.empty())
      ::setenv("MOSQUITTO_BIN", flag.c_str(), 1);
    out.mosquitto =
      find_program("MOSQUITTO_BIN", "/usr/sbin/mosquitto", "apt-get install mosquitto, or set MOSQUITTO_BIN");
  }
  std::istringstream in(string_option(argc, argv, "hub-args", ""));
  for (std::string a; in >> a;)
    out.hub_args.push_back(a);
  return out;
}

}  // namespace canopy::bench
