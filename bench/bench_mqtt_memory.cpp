// bench-mqtt-memory: resident memory per idle connected MQTT device over TLS,
// a canopy hub's MQTT port against Debian's mosquitto, in the same run; and
// whether one canopy node holds 10,000 concurrent device connections.
//
// The clients live in this process, cheaply: non-blocking OpenSSL clients
// driven by one epoll loop (TLS with server authentication only, the fleet CA
// as trust anchor and the server's name checked; SSL_MODE_RELEASE_BUFFERS),
// at most 64 handshakes under way at a time. Each is an Azure IoT Hub device
// authenticating with a SAS token (client id = device id, user name
// "bench-hub/<id>/?api-version=2021-04-12"), keep-alive 300 s, and stays idle
// after its CONNACK.
//
//   canopy     `canopy run --role hub --hub-host bench-hub --mqtt-listen
//              127.0.0.1:PORT` (TLS with the node's certificate, issued by a
//              fleet CA made here), its registry holding every device (SAS,
//              parent: the hub; written before the hub starts).
//   mosquitto  /usr/sbin/mosquitto with a TLS listener (cafile, certfile,
//              keyfile: the same certificate and key as the hub's;
//              require_certificate false, anonymous clients allowed, so the
//              same CONNECT works), persistence off.
//
// Per connection: the server's VmRSS (/proc/PID/status; settled, the median
// of three readings) with W = 20 warm-up clients connected, and again with
// N more (--clients, 2,000); (after - before) / N. PSS (smaps_rollup) is
// printed too. Then, canopy only, more clients up to --connections (10,000;
// 0 skips it) in all: held_10000=yes if every one got CONNACK 0 and none was
// closed during a hold of --hold-ms (2,000) afterwards. RLIMIT_NOFILE is
// raised (soft and hard, as root) before the servers start, so that they
// inherit it: a node serving 10,000 devices needs more than 10,000
// descriptors (and so does this process).
//
//   RESULT bench-mqtt-memory connections=N canopy_kib_per_conn=... mosquitto_kib_per_conn=...
//   ratio=...
//          held_10000=yes|no ...
//
// Options (--name=value or --name value): --clients=N, --connections=M,
// --hold-ms=N, --settle-ms=N, --canopy=PATH (else $CANOPY_BIN, else the
// build's), --mosquitto=PATH (else $MOSQUITTO_BIN, else /usr/sbin/mosquitto),
// --only=canopy|mosquitto, --hub-args="..." (extra flags for the hub),
// --plain=1 (both servers on plain TCP, canopy with --mqtt-plain: what a
// connection costs without TLS; the RESULT line then says transport=plain).
#include "bench/bench_common.hpp"
#include "bench/bench_fleet.hpp"
#include "bench/mqtt_load.hpp"
#include "gateway/certs.hpp"
#include "integration/process.hpp"

#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>

#include <signal.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <sstream>
#include <thread>

using namespace canopy;
using namespace std::chrono_literals;
using bench::bench_clock;

namespace {

constexpr std::string_view bench_name = "bench-mqtt-memory";
constexpr std::uint16_t keep_alive_s = 300;
constexpr long warmup_clients = 20;
constexpr std::size_t max_handshakes = 64;

using bench::check_stop;
using bench::fail;
using bench::option;

const auto started = bench_clock::now();

/// Seconds since the program started (progress lines).
double elapsed_s() {
  std::fflush(stdout);
  return std::chrono::duration<double>(bench_clock::now() - started).count();
}

/// OpenSSL's last error, as text.
std::string ssl_error() {
  char buf[256] = "unknown error";
  if (unsigned long e = ERR_get_error(); e != 0)
    ERR_error_string_n(e, buf, sizeof buf);
  return buf;
}

/// Owns an SSL_CTX.
struct ssl_ctx_deleter {
  void operator()(SSL_CTX* c) const { SSL_CTX_free(c); }
};
using ssl_ctx_ptr = std::unique_ptr<SSL_CTX, ssl_ctx_deleter>;

/// A TLS client context trusting `ca_pem` (no client certificate), with small
/// idle connections and no session cache.
ssl_ctx_ptr client_context(const std::string& ca_pem) {
  ssl_ctx_ptr ctx{SSL_CTX_new(TLS_client_method())};
  if (!ctx)
    fail("SSL_CTX_new: " + ssl_error());
  std::unique_ptr<BIO, decltype(&BIO_free)> bio(
    BIO_new_mem_buf(ca_pem.data(), static_cast<int>(ca_pem.size())), &BIO_free);
  X509* ca = PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr);
  if (ca == nullptr || X509_STORE_add_cert(SSL_CTX_get_cert_store(ctx.get()), ca) != 1)
    fail("the fleet CA for the clients: " + ssl_error());
  X509_free(ca);
  SSL_CTX_set_verify(ctx.get(), SSL_VERIFY_PEER, nullptr);
  SSL_CTX_set_mode(ctx.get(), SSL_MODE_RELEASE_BUFFERS);
  SSL_CTX_set_session_cache_mode(ctx.get(), SSL_SESS_CACHE_OFF);
  return ctx;
}

/// Idle TLS MQTT clients of one server, driven by one epoll loop.
class idle_clients {
 public:
  idle_clients(SSL_CTX* ctx, int port, std::string server_name, bench::tracked_process& server,
               std::string server_label)
      : ctx_(ctx),
        port_(port),
        server_name_(std::move(server_name)),
        server_(server),
        label_(std::move(server_label)) {
    ep_ = ::epoll_create1(EPOLL_CLOEXEC);
    if (ep_ < 0)
      fail("epoll_create1: " + std::string(std::strerror(errno)));
  }
  ~idle_clients() {
    for (auto& c : conns_) {
      if (c.ssl != nullptr)
        SSL_free(c.ssl);
      if (c.fd >= 0)
        ::close(c.fd);
    }
    ::close(ep_);
  }
  idle_clients(const idle_clients&) = delete;
  idle_clients& operator=(const idle_clients&) = delete;

  /// Connects `devices` (in order, at most max_handshakes at a time) and
  /// returns once each has its CONNACK; fails on a refusal or a lost connection.
  void connect(const std::vector<bench::mqtt_device>& devices, std::size_t first,
               std::size_t last) {
    std::size_t next = first;
    conns_.reserve(conns_.size() + (last - first));
    auto start_next = [&] {
      const auto& d = devices[next++];
      conn c;
      c.id = d.id;
      c.out = bench::mqtt_connect_bytes(d, bench::mqtt_hub_id, keep_alive_s);
      c.fd = bench::connect_nonblocking(port_);
      conns_.push_back(std::move(c));
      const std::size_t i = conns_.size() - 1;
      epoll_event ev{};
      ev.events = EPOLLOUT;
      ev.data.u64 = i;
      if (::epoll_ctl(ep_, EPOLL_CTL_ADD, conns_[i].fd, &ev) != 0)
        fail("epoll_ctl: " + std::string(std::strerror(errno)));
      conns_[i].events = EPOLLOUT;
      ++pending_;
    };
    auto last_progress = bench_clock::now();
    const std::size_t target_idle = idle_ + (last - first);
    while (idle_ < target_idle) {
      check_stop();
      while (next < last && pending_ < max_handshakes)
        start_next();
      const std::size_t before = idle_;
      poll(100);
      if (idle_ != before) {
        last_progress = bench_clock::now();
      } else if (bench_clock::now() - last_progress > 20s) {
        server_.check_alive(label_);
        fail(label_ + ": no CONNACK for 20 s (" + std::to_string(idle_) + " connected)\n" +
             server_.output_tail());
      }
    }
  }

  /// Runs the loop for `d` (closed connections are counted, not fatal).
  void hold(std::chrono::milliseconds d) {
    const auto until = bench_clock::now() + d;
    while (bench_clock::now() < until) {
      check_stop();
      poll(50);
    }
  }

  /// Connections that completed CONNACK and are still open.
  std::size_t open() const { return idle_ - closed_; }
  /// Connections closed by the server after their CONNACK.
  std::size_t closed() const { return closed_; }

 private:
  enum class state { connecting, handshaking, writing, reading, idle, closed };
  struct conn {
    std::string id;
    int fd = -1;
    SSL* ssl = nullptr;
    state st = state::connecting;
    std::string out;  ///< the CONNECT, until written
    std::string in;   ///< the CONNACK, until complete
    std::uint32_t events = 0;
  };

  [[noreturn]] void lost(const conn& c, const std::string& why) {
    server_.check_alive(label_);
    fail(label_ + ": connection of " + c.id + ": " + why + "\n" + server_.output_tail());
  }

  void want(conn& c, std::size_t i, std::uint32_t events) {
    if (events == c.events)
      return;
    epoll_event ev{};
    ev.events = events;
    ev.data.u64 = i;
    ::epoll_ctl(ep_, EPOLL_CTL_MOD, c.fd, &ev);
    c.events = events;
  }

  /// Waits on SSL_get_error's answer; fails on anything but WANT_READ/WRITE.
  void wait_for_ssl(conn& c, std::size_t i, int ret, const char* step) {
    const int e = SSL_get_error(c.ssl, ret);
    if (e == SSL_ERROR_WANT_READ)
      want(c, i, EPOLLIN);
    else if (e == SSL_ERROR_WANT_WRITE)
      want(c, i, EPOLLOUT);
    else
      lost(c, std::string(step) + " failed: SSL error " + std::to_string(e) + " (" + ssl_error() +
                ", " + std::strerror(errno) + ")");
  }

  /// One read or write of `n` bytes at `buf`, through TLS or (plain mode) on
  /// the socket: the bytes moved (> 0); 0 when it must wait (the wait is
  /// registered); -1 when the connection ended or failed — fatal (lost())
  /// when `step_name` is given.
  int transfer(conn& c, std::size_t i, bool write, void* buf, int n, const char* step_name) {
    if (ctx_ != nullptr) {
      const int r = write ? SSL_write(c.ssl, buf, n) : SSL_read(c.ssl, buf, n);
      if (r > 0)
        return r;
      const int e = SSL_get_error(c.ssl, r);
      if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
        want(c, i, e == SSL_ERROR_WANT_READ ? EPOLLIN : EPOLLOUT);
        return 0;
      }
      if (step_name != nullptr)
        lost(c, std::string(step_name) + " failed: SSL error " + std::to_string(e) + " (" +
                  ssl_error() + ", " + std::strerror(errno) + ")");
      return -1;
    }
    const auto r = write ? ::write(c.fd, buf, static_cast<std::size_t>(n))
                         : ::read(c.fd, buf, static_cast<std::size_t>(n));
    if (r > 0)
      return static_cast<int>(r);
    if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) {
      want(c, i, write ? EPOLLOUT : EPOLLIN);
      return 0;
    }
    if (step_name != nullptr)
      lost(c, std::string(step_name) + " failed: " +
                (r == 0 ? std::string("closed by the server") : std::strerror(errno)));
    return -1;
  }

  void step(std::size_t i) {
    conn& c = conns_[i];
    if (c.st == state::connecting) {
      int err = 0;
      socklen_t len = sizeof err;
      ::getsockopt(c.fd, SOL_SOCKET, SO_ERROR, &err, &len);
      if (err != 0)
        lost(c, "TCP connect: " + std::string(std::strerror(err)));
      if (ctx_ == nullptr) {
        c.st = state::writing;
      } else {
        c.ssl = SSL_new(ctx_);
        if (c.ssl == nullptr)
          fail("SSL_new: " + ssl_error());
        SSL_set_fd(c.ssl, c.fd);
        SSL_set_tlsext_host_name(c.ssl, server_name_.c_str());
        SSL_set1_host(c.ssl, server_name_.c_str());
        SSL_set_connect_state(c.ssl);
        c.st = state::handshaking;
      }
    }
    if (c.st == state::handshaking) {
      const int r = SSL_do_handshake(c.ssl);
      if (r != 1)
        return wait_for_ssl(c, i, r, "TLS handshake");
      c.st = state::writing;
    }
    if (c.st == state::writing) {
      // A CONNECT of ~200 bytes goes out in one write (TLS record or segment).
      const int r =
        transfer(c, i, true, c.out.data(), static_cast<int>(c.out.size()), "writing CONNECT");
      if (r == 0)
        return;
      if (static_cast<std::size_t>(r) < c.out.size()) {  // plain TCP: the rest later
        c.out.erase(0, static_cast<std::size_t>(r));
        return want(c, i, EPOLLOUT);
      }
      std::string().swap(c.out);
      c.st = state::reading;
      want(c, i, EPOLLIN);
    }
    if (c.st == state::reading) {
      char buf[64];
      while (c.in.size() < 4) {
        const int r = transfer(c, i, false, buf, sizeof buf, "reading CONNACK");
        if (r == 0)
          return;
        c.in.append(buf, static_cast<std::size_t>(r));
      }
      const auto* a = reinterpret_cast<const unsigned char*>(c.in.data());
      if (a[0] != 0x20 || a[1] != 0x02)
        lost(c, "the answer to CONNECT is not a CONNACK");
      if (a[3] != 0)
        lost(c, "CONNACK refused with code " + std::to_string(a[3]));
      std::string().swap(c.in);
      c.st = state::idle;
      ++idle_;
      --pending_;
      want(c, i, EPOLLIN);
      return;
    }
    if (c.st == state::idle) {
      // Idle clients expect nothing; whatever comes is read and dropped, and
      // the end of the stream counts as a closed connection.
      char buf[256];
      for (;;) {
        const int r = transfer(c, i, false, buf, sizeof buf, nullptr);
        if (r > 0)
          continue;
        if (r == 0)
          return;
        c.st = state::closed;
        ++closed_;
        ::epoll_ctl(ep_, EPOLL_CTL_DEL, c.fd, nullptr);
        return;
      }
    }
  }

  void poll(int timeout_ms) {
    epoll_event events[256];
    const int n = ::epoll_wait(ep_, events, 256, timeout_ms);
    if (n < 0 && errno != EINTR)
      fail("epoll_wait: " + std::string(std::strerror(errno)));
    for (int k = 0; k < n; ++k)
      step(static_cast<std::size_t>(events[k].data.u64));
  }

  SSL_CTX* ctx_;
  int port_;
  std::string server_name_;
  bench::tracked_process& server_;
  std::string label_;
  int ep_ = -1;
  std::vector<conn> conns_;
  std::size_t pending_ = 0;
  std::size_t idle_ = 0;
  std::size_t closed_ = 0;
};

/// VmRSS after `settle`: the median of three readings 100 ms apart; fails if
/// the process is gone.
long settled_rss_kb(pid_t pid, std::chrono::milliseconds settle) {
  std::this_thread::sleep_for(settle);
  std::vector<double> v;
  for (int i = 0; i < 3; ++i) {
    if (i > 0)
      std::this_thread::sleep_for(100ms);
    const long kb = bench::rss_kb(pid);
    if (kb <= 0) {
      check_stop();
      fail("no VmRSS for pid " + std::to_string(pid) + " (has it exited?)");
    }
    v.push_back(static_cast<double>(kb));
  }
  return static_cast<long>(bench::percentile(v, 50));
}

/// One server's figures.
struct memory_figures {
  long rss_before_kb = 0;
  long rss_after_kb = 0;
  long pss_before_kb = 0;
  long pss_after_kb = 0;
  double kib_per_conn = 0;
  double pss_kib_per_conn = 0;
  double connect_s = 0;  ///< connecting the N
  bool measured = false;
};

/// Warm-up clients, then N more; RSS and PSS before and after.
memory_figures measure(idle_clients& clients, bench::tracked_process& server,
                       const std::vector<bench::mqtt_device>& devs, long n,
                       std::chrono::milliseconds settle) {
  memory_figures f;
  clients.connect(devs, 0, warmup_clients);
  f.rss_before_kb = settled_rss_kb(server.pid(), settle);
  f.pss_before_kb = bench::pss_kb(server.pid());
  const auto t0 = bench_clock::now();
  clients.connect(devs, warmup_clients, static_cast<std::size_t>(warmup_clients + n));
  f.connect_s = std::chrono::duration<double>(bench_clock::now() - t0).count();
  f.rss_after_kb = settled_rss_kb(server.pid(), settle);
  f.pss_after_kb = bench::pss_kb(server.pid());
  if (clients.closed() != 0)
    fail(std::to_string(clients.closed()) +
         " connections were closed by the server while measuring");
  f.kib_per_conn = static_cast<double>(f.rss_after_kb - f.rss_before_kb) / static_cast<double>(n);
  f.pss_kib_per_conn =
    static_cast<double>(f.pss_after_kb - f.pss_before_kb) / static_cast<double>(n);
  f.measured = true;
  return f;
}

void print_figures(const char* name, const char* transport, long n, const memory_figures& f) {
  std::printf(
    "%s: %ld idle %s devices (+%ld warm-up) connected in %.1f s (%.0f/s): VmRSS %ld -> %ld KiB, "
    "%.2f KiB each; PSS %ld -> %ld KiB, %.2f KiB each (%.1f s)\n",
    name, n, transport, warmup_clients, f.connect_s, static_cast<double>(n) / f.connect_s,
    f.rss_before_kb, f.rss_after_kb, f.kib_per_conn, f.pss_before_kb, f.pss_after_kb,
    f.pss_kib_per_conn, elapsed_s());
}

int run(int argc, char** argv) {
  const long n = option(argc, argv, "clients", 2000);
  const long connections = option(argc, argv, "connections", 10000);
  const auto hold = std::chrono::milliseconds{option(argc, argv, "hold-ms", 2000)};
  const auto settle = std::chrono::milliseconds{option(argc, argv, "settle-ms", 1000)};
  if (n < 1 || connections < 0 || connections > 60000 || hold.count() < 0 || settle.count() < 0)
    fail("bad arguments: --clients >= 1, 0 <= --connections <= 60000, --hold-ms, --settle-ms >= 0");
  auto servers = bench::mqtt_servers_from_options(argc, argv, CANOPY_BIN);
  const bool run_canopy = servers.run_canopy, run_mosquitto = servers.run_mosquitto;
  const std::string canopy = servers.canopy, mosquitto = servers.mosquitto;
  const std::vector<std::string> hub_args = servers.hub_args;
  const long total = std::max(warmup_clients + n, connections);
  // This process holds every client socket; each server as many again (plus
  // its own files). The servers inherit the limit.
  const long limit = bench::raise_file_limit(total + 4096);
  if (limit < total + 100)
    fail("RLIMIT_NOFILE is " + std::to_string(limit) + ", need " + std::to_string(total + 100) +
         " (run as root, or lower --connections)");
  bench::install_stop_handler();
  ::signal(SIGPIPE, SIG_IGN);

  test::temp_dir dir("cnbn");
  const std::string certs_dir = dir.file("certs");
  const auto ca = bench::make_fleet_ca(certs_dir);
  bench::issue_cert(ca, certs_dir, bench::mqtt_hub_id);
  // --plain=1: both servers on plain TCP (to tell TLS's share from the rest).
  const bool plain = option(argc, argv, "plain", 0) != 0;
  auto ctx = plain ? ssl_ctx_ptr{} : client_context(ca.cert_pem);
  const auto devices = bench::make_mqtt_devices(total);
  const char* transport = plain ? "plain TCP" : "TLS";
  std::printf(
    "bench-mqtt-memory: %ld idle %s devices per server (keep-alive %u s), then %ld on canopy; "
    "RLIMIT_NOFILE %ld\n",
    n, transport, keep_alive_s, connections, limit);

  memory_figures mq, cn;
  if (run_mosquitto) {
    bench::mosquitto_options o;
    o.port = bench::free_port();
    if (!plain) {
      o.ca_file = certs_dir + "/ca.crt";
      o.cert_file = certs_dir + "/" + bench::mqtt_hub_id + ".crt";
      o.key_file = certs_dir + "/" + bench::mqtt_hub_id + ".key";
    }
    auto broker = bench::start_mosquitto(mosquitto, dir.path(), "mosquitto", o);
    idle_clients clients(ctx.get(), o.port, bench::mqtt_hub_id, *broker, "mosquitto");
    mq = measure(clients, *broker, devices, n, settle);
    print_figures("mosquitto", transport, n, mq);
  }

  bool held = false;
  long held_count = 0;
  long rss_held_kb = 0;
  if (run_canopy) {
    bench::canopy_hub_options o;
    o.canopy = canopy;
    o.certs_dir = certs_dir;
    o.data_dir = dir.file("hub");
    o.socket = dir.file("hub.sock");
    o.mqtt_port = bench::free_port();
    o.extra = hub_args;
    o.plain = plain;
    bench::register_mqtt_devices(o.data_dir, bench::mqtt_hub_id, devices);
    std::printf("canopy: %ld devices registered (%.1f s)\n", total, elapsed_s());
    auto hub = bench::start_canopy_hub(o);
    std::printf("canopy: hub up (%.1f s)\n", elapsed_s());
    idle_clients clients(ctx.get(), o.mqtt_port, bench::mqtt_hub_id, *hub, "the canopy hub");
    cn = measure(clients, *hub, devices, n, settle);
    print_figures("canopy", transport, n, cn);
    if (connections > 0) {
      const auto t0 = bench_clock::now();
      const auto have = static_cast<std::size_t>(warmup_clients + n);
      if (static_cast<std::size_t>(connections) > have)
        clients.connect(devices, have, static_cast<std::size_t>(connections));
      const double secs = std::chrono::duration<double>(bench_clock::now() - t0).count();
      clients.hold(hold);
      hub->check_alive("the canopy hub");
      held_count = static_cast<long>(clients.open());
      held = held_count >= connections && clients.closed() == 0;
      rss_held_kb = bench::rss_kb(hub->pid());
      std::printf(
        "canopy: %ld concurrent %s devices (the last %ld connected in %.1f s), %zu closed during "
        "a %.1f s hold; VmRSS %ld KiB (%.1f MiB), PSS %ld KiB (%.1f s)\n",
        held_count, transport, connections - static_cast<long>(have), secs, clients.closed(),
        static_cast<double>(hold.count()) / 1000, rss_held_kb,
        static_cast<double>(rss_held_kb) / 1024, bench::pss_kb(hub->pid()), elapsed_s());
    }
  }

  const double r = mq.kib_per_conn > 0 ? cn.kib_per_conn / mq.kib_per_conn : 0;
  std::printf(
    "RESULT bench-mqtt-memory connections=%ld canopy_kib_per_conn=%.1f mosquitto_kib_per_conn=%.1f "
    "ratio=%.2f held_10000=%s held=%ld canopy_pss_kib_per_conn=%.1f "
    "mosquitto_pss_kib_per_conn=%.1f "
    "canopy_idle_mb=%.1f canopy_held_mb=%.1f transport=%s\n",
    n, cn.kib_per_conn, mq.kib_per_conn, r, held && connections >= 10000 ? "yes" : "no", held_count,
    cn.pss_kib_per_conn, mq.pss_kib_per_conn, static_cast<double>(cn.rss_before_kb) / 1024,
    static_cast<double>(rss_held_kb) / 1024, plain ? "plain" : "tls");
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  return bench::run_main(bench_name, run, argc, argv);
}
