// bench-link-memory: resident memory per connected child link at the parent.
//
// The parent is a real `canopy run --role hub` process. The children live in
// this process, cheaply: one io_thread and N link_client objects (the child
// end of a link as a gateway runs it: TCP, mutually authenticated TLS, hello
// over Cap'n Proto RPC), each with its own certificate issued in-process, and
// a downstream_handler that answers everything at once. The N gateway ids are
// registered at the hub first (POST /devices through hub_client, in-process).
// Measured: the hub's VmRSS (/proc/PID/status) after a settle, with the N ids
// registered and no child connected, and again with N children connected and
// admitted; per link = delta / N.
//
// Baseline (same run): mosquitto (Debian's) with N idle MQTT connections
// (CONNECT over a raw socket, CONNACK read, then nothing), once over mutually
// authenticated TLS (TLS 1.3, EC P-256 certificates from the same fleet CA;
// the clients share one certificate, which changes nothing at the broker) and
// once over plain TCP; per connection = delta of its VmRSS / N. ratio = canopy
// per link / mosquitto per TLS connection (tcp_ratio: per plain connection).
// The broker gets set_tcp_nodelay, or each handshake waits ~40 ms on delayed
// ACKs (it changes no memory figure).
//
// Where a link's memory goes: the same links once more against a link_server
// run in this process with a trivial link_host (no CAF, no registry: the
// network side alone — TCP, kj-tls, Cap'n Proto RPC), this process's VmRSS
// delta less the child side's share (measured while connecting to the hub)
// = `server_side_kb`; the rest of the hub's figure is its actor side (a child
// link actor, the fleet's bookkeeping, metrics).
//
//   RESULT bench-link-memory canopy_link_kb=... mosquitto_tls_kb=... mosquitto_tcp_kb=... ratio=...
//          tcp_ratio=... server_side_kb=... child_side_kb=... hub_idle_mb=... links=N
//
// Options (--name=value or --name value): --links=N (at most 1000), --settle-ms=N.
// The programs: CANOPY_BIN, else the build's; MOSQUITTO_BIN, else /usr/sbin/mosquitto.
#include "bench/bench_common.hpp"
#include "bench/bench_fleet.hpp"
#include "gateway/certs.hpp"
#include "gateway/control_client.hpp"
#include "gateway/hub_client.hpp"
#include "gateway/io_thread.hpp"
#include "gateway/link.hpp"
#include "gateway/tls.hpp"
#include "integration/process.hpp"

#include <nlohmann/json.hpp>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <spdlog/spdlog.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <thread>

using namespace canopy;
using namespace std::chrono_literals;
using bench::bench_clock;

namespace {

constexpr std::string_view bench_name = "bench-link-memory";

using bench::check_stop;
using bench::end_with;
using bench::fail;
using bench::free_port;
using bench::loopback;
using bench::option;
using bench::tracked_process;
using bench::wait_or_fail;

/// VmRSS of `pid` ("self" for this process) in KiB; fails if unreadable.
long rss_kb(const std::string& pid) {
  if (long kb = bench::rss_kb(pid); kb > 0)
    return kb;
  check_stop();  // killed by the signal handler
  fail("no VmRSS in /proc/" + pid + "/status (has the process exited?)");
}

long rss_kb(pid_t pid) {
  return rss_kb(std::to_string(pid));
}

/// Waits `settle`, then the median of three VmRSS readings 100 ms apart.
long settled_rss_kb(pid_t pid, std::chrono::milliseconds settle) {
  std::this_thread::sleep_for(settle);
  std::vector<double> v;
  for (int i = 0; i < 3; ++i) {
    if (i > 0)
      std::this_thread::sleep_for(100ms);
    v.push_back(static_cast<double>(rss_kb(pid)));
  }
  return static_cast<long>(bench::percentile(v, 50));
}

const auto started = bench_clock::now();

/// Seconds since the program started (progress lines).
double elapsed_s() {
  std::fflush(stdout);
  return std::chrono::duration<double>(bench_clock::now() - started).count();
}

double per_item_kb(long before_kb, long after_kb, long n) {
  return static_cast<double>(after_kb - before_kb) / static_cast<double>(n);
}

/// A blocking TCP connection to 127.0.0.1:port; -1 on failure.
int tcp_connect(int port) {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0)
    return -1;
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = htons(static_cast<std::uint16_t>(port));
  if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
    ::close(fd);
    return -1;
  }
  int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  timeval tv{10, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  return fd;
}

// --- mosquitto ----------------------------------------------------------------

/// An MQTT 3.1.1 CONNECT: clean session, keep-alive 600 s, client id `id`.
std::string mqtt_connect_packet(const std::string& id) {
  std::string var{"\x00\x04MQTT\x04\x02\x02\x58", 10};
  std::string payload;
  payload += static_cast<char>(id.size() >> 8);
  payload += static_cast<char>(id.size() & 0xff);
  payload += id;
  const std::size_t remaining = var.size() + payload.size();  // < 128: one length byte
  return std::string(1, '\x10') + static_cast<char>(remaining) + var + payload;
}

bool is_connack_ok(const unsigned char* p) {
  return p[0] == 0x20 && p[1] == 0x02 && p[3] == 0x00;
}

/// OpenSSL's last error, as text.
std::string ssl_error() {
  char buf[256] = "unknown error";
  if (unsigned long e = ERR_get_error(); e != 0)
    ERR_error_string_n(e, buf, sizeof buf);
  return buf;
}

/// Idle MQTT clients of one mosquitto: sockets (and TLS sessions) kept open.
class mqtt_idlers {
 public:
  /// Plain TCP when `tls` is null; otherwise a client context with the fleet
  /// CA and a client certificate.
  explicit mqtt_idlers(SSL_CTX* tls) : tls_(tls) {}
  ~mqtt_idlers() {
    for (auto* s : ssl_)
      SSL_free(s);
    for (int fd : fds_)
      ::close(fd);
  }
  mqtt_idlers(const mqtt_idlers&) = delete;
  mqtt_idlers& operator=(const mqtt_idlers&) = delete;

  /// Opens connection number `i`: CONNECT, then waits for a CONNACK.
  void open(int port, long i) {
    int fd = tcp_connect(port);
    if (fd < 0)
      fail("connect to mosquitto: " + std::string(std::strerror(errno)));
    fds_.push_back(fd);
    auto packet = mqtt_connect_packet("idle-" + std::to_string(i));
    unsigned char ack[4] = {};
    if (tls_ == nullptr) {
      if (::write(fd, packet.data(), packet.size()) != static_cast<ssize_t>(packet.size()))
        fail("MQTT CONNECT: " + std::string(std::strerror(errno)));
      std::size_t got = 0;
      while (got < sizeof ack) {
        auto n = ::read(fd, ack + got, sizeof ack - got);
        if (n <= 0)
          fail("MQTT CONNACK: connection closed or timed out");
        got += static_cast<std::size_t>(n);
      }
    } else {
      SSL* ssl = SSL_new(tls_);
      if (ssl == nullptr)
        fail("SSL_new: " + ssl_error());
      ssl_.push_back(ssl);
      SSL_set_fd(ssl, fd);
      SSL_set_tlsext_host_name(ssl, "mqtt-broker");
      SSL_set1_host(ssl, "mqtt-broker");
      if (SSL_connect(ssl) != 1)
        fail("TLS handshake with mosquitto: " + ssl_error());
      if (SSL_write(ssl, packet.data(), static_cast<int>(packet.size())) != static_cast<int>(packet.size()))
        fail("MQTT CONNECT over TLS: " + ssl_error());
      int got = 0;
      while (got < 4) {
        int n = SSL_read(ssl, ack + got, 4 - got);
        if (n <= 0)
          fail("MQTT CONNACK over TLS: " + ssl_error());
        got += n;
      }
    }
    if (!is_connack_ok(ack))
      fail("mosquitto refused MQTT connection " + std::to_string(i));
  }

 private:
  SSL_CTX* tls_;
  std::vector<int> fds_;
  std::vector<SSL*> ssl_;
};

/// The mosquitto figures of one transport.
struct mosquitto_figures {
  long idle_kb = 0;       ///< VmRSS with no client
  long loaded_kb = 0;     ///< VmRSS with N idle clients
  double per_conn_kb = 0;
};

/// Owns an SSL_CTX.
struct ssl_ctx_deleter {
  void operator()(SSL_CTX* c) const { SSL_CTX_free(c); }
};
using ssl_ctx_ptr = std::unique_ptr<SSL_CTX, ssl_ctx_deleter>;

/// A TLS client context trusting `ca_pem`, presenting `client`.
ssl_ctx_ptr client_context(const std::string& ca_pem, const certs::key_and_cert& client) {
  ssl_ctx_ptr ctx{SSL_CTX_new(TLS_client_method())};
  if (!ctx)
    fail("SSL_CTX_new: " + ssl_error());
  auto pem_bio = [](const std::string& text) {
    return std::unique_ptr<BIO, decltype(&BIO_free)>(BIO_new_mem_buf(text.data(), static_cast<int>(text.size())),
                                                      &BIO_free);
  };
  auto cb = pem_bio(client.cert_pem);
  X509* cert = PEM_read_bio_X509(cb.get(), nullptr, nullptr, nullptr);
  auto kb = pem_bio(client.key_pem);
  EVP_PKEY* key = PEM_read_bio_PrivateKey(kb.get(), nullptr, nullptr, nullptr);
  auto ab = pem_bio(ca_pem);
  X509* ca = PEM_read_bio_X509(ab.get(), nullptr, nullptr, nullptr);
  if (cert == nullptr || key == nullptr || ca == nullptr)
    fail("client certificate for mosquitto: " + ssl_error());
  bool ok = SSL_CTX_use_certificate(ctx.get(), cert) == 1 && SSL_CTX_use_PrivateKey(ctx.get(), key) == 1 &&
            X509_STORE_add_cert(SSL_CTX_get_cert_store(ctx.get()), ca) == 1;
  X509_free(cert);
  EVP_PKEY_free(key);
  X509_free(ca);
  if (!ok)
    fail("TLS client context for mosquitto: " + ssl_error());
  SSL_CTX_set_verify(ctx.get(), SSL_VERIFY_PEER, nullptr);
  return ctx;
}

/// Starts a mosquitto on a fresh port (TLS with the files in `certs` when
/// `tls`), opens N idle clients, and measures its RSS before and after.
mosquitto_figures measure_mosquitto(const std::string& mosquitto, const test::temp_dir& dir, bool tls, long n,
                                    SSL_CTX* client_tls, std::chrono::milliseconds settle) {
  const int port = free_port();
  std::string conf = "per_listener_settings false\n"
                     "user root\n"
                     "listener " + std::to_string(port) + " 127.0.0.1\n"
                     "allow_anonymous true\n"
                     "set_tcp_nodelay true\n"
                     "persistence false\n"
                     "max_connections -1\n"
                     "log_dest stderr\n"
                     "log_type error\n";
  if (tls) {
    const std::string c = dir.file("certs");
    conf += "cafile " + c + "/ca.crt\ncertfile " + c + "/mqtt-broker.crt\nkeyfile " + c +
            "/mqtt-broker.key\nrequire_certificate true\n";
  }
  const std::string conf_path = dir.file(tls ? "mosquitto-tls.conf" : "mosquitto-tcp.conf");
  test::write_text_file(conf_path, conf);
  tracked_process broker({mosquitto, "-c", conf_path}, {}, end_with::sigterm);
  wait_or_fail([&] {
    broker.check_alive("mosquitto");
    int fd = tcp_connect(port);
    if (fd < 0)
      return false;
    ::close(fd);
    return true;
  }, 10s, "mosquitto to listen", 20ms);

  mosquitto_figures f;
  f.idle_kb = settled_rss_kb(broker.pid(), settle);
  mqtt_idlers clients(tls ? client_tls : nullptr);
  for (long i = 0; i < n; ++i) {
    check_stop();
    clients.open(port, i);
  }
  f.loaded_kb = settled_rss_kb(broker.pid(), settle);
  broker.check_alive("mosquitto");
  f.per_conn_kb = per_item_kb(f.idle_kb, f.loaded_kb, n);
  return f;
}

// --- canopy -------------------------------------------------------------------

/// A child that takes whatever its parent says.
class quiet_child final : public downstream_handler {
 public:
  void sync_scope(std::vector<device_record>, reply_fn<void> done) override { done(expected<void>{}); }
  void desired(std::vector<twin_update>, reply_fn<void> done) override { done(expected<void>{}); }
  void invoke(std::string, std::string, std::string, std::string, std::chrono::milliseconds,
              reply_fn<method_reply> done) override {
    done(method_reply{404, "null"});
  }
};

/// A parent that admits everyone and keeps nothing but the channels; on
/// child_up it syncs an empty scope down, as the fleet syncs a real one.
class plain_parent final : public link_host {
 public:
  void admit(std::string, reply_fn<void> done) override { done(expected<void>{}); }
  void child_up(std::shared_ptr<child_channel> channel) override {
    channel->sync_scope({}, [](expected<void>) {});
    std::lock_guard<std::mutex> lock(mutex_);
    channels_.push_back(std::move(channel));
  }
  void child_down(std::string, std::uint64_t, std::string) override {}
  void upload(std::string, std::uint64_t, std::vector<link_envelope>, reply_fn<std::uint32_t> done) override {
    done(std::uint32_t{0});
  }
  void report_twins(std::string, std::uint64_t, std::vector<twin_update>, reply_fn<void> done) override {
    done(expected<void>{});
  }

 private:
  std::mutex mutex_;
  std::vector<std::shared_ptr<child_channel>> channels_;
};

/// N children's links on one io_thread, connecting to one parent.
class child_links {
 public:
  /// One link_client per identity in `tls` (borrowed: must outlive this).
  child_links(io_thread& io, const std::vector<std::unique_ptr<tls_config>>& tls, const std::string& parent_address,
              const std::string& parent_id) {
    for (auto& t : tls) {
      link_client_options o;
      o.parent_address = parent_address;
      o.parent_id = parent_id;
      o.node_id = t->common_name();
      o.tls = t.get();
      clients_.push_back(std::make_unique<link_client>(io, std::move(o), handler_));
    }
  }
  ~child_links() {
    for (auto& c : clients_)
      c->stop();
  }
  child_links(const child_links&) = delete;
  child_links& operator=(const child_links&) = delete;

  /// Connects them all, `batch` at a time, each batch up before the next.
  void connect_all(std::size_t batch) {
    for (std::size_t first = 0; first < clients_.size(); first += batch) {
      const std::size_t last = std::min(clients_.size(), first + batch);
      for (std::size_t i = first; i < last; ++i)
        clients_[i]->connect([this](link_event e) {
          if (e.up) {
            ++up_;
          } else {
            ++down_;
            std::lock_guard<std::mutex> lock(mutex_);
            if (last_error_.empty())
              last_error_ = e.error;
          }
        });
      wait_or_fail([&] {
        if (down_ > 0)
          fail("a child link failed: " + last_error());
        return up_ >= static_cast<long>(last);
      }, 30s, "child links to come up");
    }
  }

  /// Down events so far (none should come while measuring).
  long downs() const { return down_; }

  /// The first error a down event carried.
  std::string last_error() {
    std::lock_guard<std::mutex> lock(mutex_);
    return last_error_;
  }

 private:
  quiet_child handler_;
  std::vector<std::unique_ptr<link_client>> clients_;
  std::atomic<long> up_{0};
  std::atomic<long> down_{0};
  std::mutex mutex_;
  std::string last_error_;
};

/// The canopy figures.
struct canopy_figures {
  long idle_kb = 0;         ///< hub VmRSS with N gateways registered, none connected
  long loaded_kb = 0;       ///< hub VmRSS with the N connected
  double per_link_kb = 0;   ///< the hub's cost of one link
  double child_side_kb = 0;   ///< this process's cost of one link_client connection
  double server_side_kb = 0;  ///< an in-process link_server's cost of one link (no CAF, no registry)
};

canopy_figures measure_canopy(const std::string& canopy, const test::temp_dir& dir, const certs::key_and_cert& ca,
                              long n, std::chrono::milliseconds settle) {
  const std::string certs_dir = dir.file("certs");
  const int link_port = free_port(), api_port = free_port();
  const std::string data = dir.file("hub"), socket = dir.file("hub.sock");
  tracked_process hub(bench::node_argv(canopy, "hub", certs_dir, data, socket,
                                       {"--role", "hub", "--link-listen", loopback(link_port), "--api-listen",
                                        loopback(api_port)}),
                      {}, end_with::sigterm);

  // Register the gateways, then let go of the REST client (its event loop is this thread's).
  {
    std::unique_ptr<hub_client> api;
    wait_or_fail([&] {
      hub.check_alive("the hub");
      api = bench::try_hub_client(loopback(api_port), certs_dir, data);
      return api != nullptr;
    }, 20s, "the hub's REST API", 50ms);
    for (long i = 0; i < n; ++i) {
      check_stop();
      auto r = api->request("POST", "/devices",
                            {{"deviceId", "child-" + std::to_string(i)}, {"parentId", "hub"}, {"kind", "gateway"}});
      if (!r)
        fail("POST /devices child-" + std::to_string(i) + ": " + r.err().message);
    }
  }

  std::printf("canopy: %ld gateways registered at the hub (%.1f s)\n", n, elapsed_s());
  // The children's identities, before anything connects.
  std::vector<std::unique_ptr<tls_config>> tls;
  for (long i = 0; i < n; ++i) {
    auto kc = certs::issue(ca, certs::for_id("child-" + std::to_string(i), std::chrono::hours{24}));
    if (!kc)
      fail("certificate of child-" + std::to_string(i) + ": " + kc.err().message);
    auto t = tls_config::from_pem(*kc, ca.cert_pem, tls_role::client);
    if (!t)
      fail("TLS identity of child-" + std::to_string(i) + ": " + t.err().message);
    tls.push_back(std::move(*t));
  }
  io_thread io;
  if (auto s = io.start(); !s)
    fail("io_thread: " + s.err().message);

  std::printf("canopy: %ld child identities issued (%.1f s)\n", n, elapsed_s());
  canopy_figures f;
  f.idle_kb = settled_rss_kb(hub.pid(), settle);
  const long self_before = rss_kb("self");
  {
    child_links to_hub(io, tls, loopback(link_port), "hub");
    to_hub.connect_all(50);
    std::printf("canopy: %ld child links up (%.1f s)\n", n, elapsed_s());
    wait_or_fail([&] {
      hub.check_alive("the hub");
      return bench::links_up(socket, "child") == n;
    }, 30s, "the hub to show every child link up", 100ms);
    f.loaded_kb = settled_rss_kb(hub.pid(), settle);
    const long self_after = rss_kb("self");
    if (to_hub.downs() != 0)
      fail("a child link went down while measuring: " + to_hub.last_error());
    if (bench::links_up(socket, "child") != n)
      fail("the hub lost child links while measuring");
    f.per_link_kb = per_item_kb(f.idle_kb, f.loaded_kb, n);
    f.child_side_kb = per_item_kb(self_before, self_after, n);

    // The network side alone: an in-process link_server, the same identities
    // connecting once more (the links to the hub stay up).
    auto server_id = certs::issue(ca, certs::for_id("plain-parent", std::chrono::hours{24}));
    if (!server_id)
      fail("certificate of the in-process parent: " + server_id.err().message);
    auto server_tls = tls_config::from_pem(*server_id, ca.cert_pem, tls_role::server_verify_clients);
    if (!server_tls)
      fail("TLS identity of the in-process parent: " + server_tls.err().message);
    plain_parent host;
    link_server_options so;
    so.listen = "127.0.0.1:0";
    so.node_id = "plain-parent";
    so.tls = server_tls->get();
    link_server server(so, host);
    if (auto s = server.start(io); !s)
      fail("in-process link_server: " + s.err().message);
    std::this_thread::sleep_for(settle);
    const long self_plain_before = rss_kb("self");
    {
      child_links to_plain(io, tls, loopback(server.port()), "plain-parent");
      to_plain.connect_all(50);
      std::this_thread::sleep_for(settle);
      const long self_plain_after = rss_kb("self");
      f.server_side_kb = per_item_kb(self_plain_before, self_plain_after, n) - f.child_side_kb;
    }
    server.stop();
  }
  io.stop();
  return f;
}

int run(int argc, char** argv) {
  const long n = option(argc, argv, "links", 500);
  const auto settle = std::chrono::milliseconds{option(argc, argv, "settle-ms", 1000)};
  if (n < 1 || n > 1000 || settle.count() < 0)
    fail("bad arguments: 1 <= --links <= 1000 (the hub's max_connections is 1024), --settle-ms >= 0");
  const std::string canopy = bench::find_program("CANOPY_BIN", CANOPY_BIN, "build it: ninja -C build canopy");
  const std::string mosquitto = bench::find_program("MOSQUITTO_BIN", "/usr/sbin/mosquitto",
                                                    "apt-get install mosquitto, or set MOSQUITTO_BIN");
  bench::install_stop_handler();
  ::signal(SIGPIPE, SIG_IGN);
  // The links log every connect and disconnect at info: 2N lines per round.
  spdlog::set_level(spdlog::level::err);

  // One fleet CA for everything: the hub, the children, mosquitto and its clients.
  test::temp_dir dir("cnbl");
  const std::string certs_dir = dir.file("certs");
  const auto ca = bench::make_fleet_ca(certs_dir);
  for (const char* id : {"hub", "mqtt-broker"})
    bench::issue_cert(ca, certs_dir, id);
  auto mqtt_client_id = certs::issue(ca, certs::for_id("mqtt-client", std::chrono::hours{24}));
  if (!mqtt_client_id)
    fail("certificate of the MQTT clients: " + mqtt_client_id.err().message);

  auto client_tls = client_context(ca.cert_pem, *mqtt_client_id);
  const auto t0 = bench_clock::now();
  auto mq_tcp = measure_mosquitto(mosquitto, dir, false, n, nullptr, settle);
  std::printf("(%.1f s) ", elapsed_s());
  std::printf("mosquitto, plain TCP: %ld idle MQTT connections: VmRSS %ld -> %ld KiB, %.2f KiB each\n", n,
              mq_tcp.idle_kb, mq_tcp.loaded_kb, mq_tcp.per_conn_kb);
  auto mq_tls = measure_mosquitto(mosquitto, dir, true, n, client_tls.get(), settle);
  std::printf("(%.1f s) ", elapsed_s());
  std::printf("mosquitto, mutual TLS: %ld idle MQTT connections: VmRSS %ld -> %ld KiB, %.2f KiB each\n", n,
              mq_tls.idle_kb, mq_tls.loaded_kb, mq_tls.per_conn_kb);
  std::fflush(stdout);

  auto cn = measure_canopy(canopy, dir, ca, n, settle);
  std::printf("canopy hub: %ld child links (mutual TLS, Cap'n Proto RPC): VmRSS %ld -> %ld KiB, %.2f KiB each\n", n,
              cn.idle_kb, cn.loaded_kb, cn.per_link_kb);
  std::printf("  of which the network side (a link_server alone, in-process: TCP + kj-tls + RPC) %.2f KiB; the "
              "child's end of a link %.2f KiB\n",
              cn.server_side_kb, cn.child_side_kb);
  std::printf("(%.1f s)\n", std::chrono::duration<double>(bench_clock::now() - t0).count());

  std::printf("RESULT bench-link-memory canopy_link_kb=%.1f mosquitto_tls_kb=%.1f mosquitto_tcp_kb=%.2f ratio=%.1f "
              "tcp_ratio=%.0f server_side_kb=%.1f child_side_kb=%.1f hub_idle_mb=%.1f links=%ld\n",
              cn.per_link_kb, mq_tls.per_conn_kb, mq_tcp.per_conn_kb,
              mq_tls.per_conn_kb > 0 ? cn.per_link_kb / mq_tls.per_conn_kb : 0,
              mq_tcp.per_conn_kb > 0 ? cn.per_link_kb / mq_tcp.per_conn_kb : 0, cn.server_side_kb, cn.child_side_kb,
              static_cast<double>(cn.idle_kb) / 1024, n);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  return bench::run_main(bench_name, run, argc, argv);
}
