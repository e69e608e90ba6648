// bench-chain: throughput of 100-byte telemetry through a three-hop chain of
// real canopy processes on loopback — a leaf device (`canopyctl send --stdin`,
// as a device's program) → gateway gw-b → gateway gw-a → hub, mutually
// authenticated TLS links — against a chain of three mosquitto brokers on the
// same machine, C → B → A, bridged with QoS 1 (plain TCP, persistence off), a
// libmosquitto publisher on C (QoS 1, a window of messages in flight) and a
// subscriber on A (QoS 1). The same bodies on both sides.
//
// Durable at every hop: a canopy node answers its sender (the device's
// program, or the child whose upload it took) only once the message is
// committed to its store (SQLite WAL, synchronous=FULL) or its own parent has
// answered for it (the router does not write a message its receiver
// acknowledged within the commit interval); the hub commits every message to
// its telemetry store. The mosquitto chain holds messages in memory only.
//
// canopy: from spawning the senders until the hub's router counts N
// deliveries acknowledged by its telemetry store (`sent`, polled every 5 ms
// over the hub's control socket). mosquitto: from the first publish until the
// subscriber on A has received the N-th message. Rounds alternate between the
// two chains; the best round of each counts. Then, unless --split=0, the
// canopy chain's halves apart: with gw-a stopped the senders' messages stay
// at gw-b (ingress alone: until every sender has all its answers), then gw-a
// comes back and gw-b's stored backlog goes up to the hub (forwarding alone:
// from gw-b's link being up again until the hub has them all).
//   RESULT bench-chain canopy_msg_s=... mosquitto_msg_s=... ratio=... messages=N hops=3 ...
//
// Options (--name=value): --messages=N (each side, each round), --window=N
// (canopyctl send's window and the publisher's in-flight window), --senders=K
// (parallel `canopyctl send` processes, each its own leaf device),
// --mqtt-inflight=N (the brokers' max_inflight_messages), --rounds=N,
// --node-threads=N (each canopy node's --threads; 0 = its default),
// --upstream-hold-ms=N (each canopy node's --upstream-hold-ms; default: the
// node's, 20 — 0 makes every hop write every message before it answers),
// --split=0|1. The programs: $CANOPY_BIN / $CANOPYCTL_BIN, else the build's;
// mosquitto: /usr/sbin/mosquitto (Debian's `mosquitto`).
#include "bench/bench_common.hpp"
#include "bench/bench_fleet.hpp"
#include "gateway/control_client.hpp"
#include "integration/process.hpp"

#include <mosquitto.h>

#include <unistd.h>

#include <condition_variable>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <thread>

using namespace canopy;
using namespace std::chrono_literals;
using canopy::bench::bench_clock;

namespace {

constexpr std::string_view bench_name = "bench-chain";
constexpr std::size_t body_size = 100;

using bench::check_stop;
using bench::cpu_ticks;
using bench::fail;
using bench::free_port;
using bench::loopback;
using bench::parent_link_up;
using bench::port_accepts;
using bench::tracked_process;
using bench::wait_or_fail;

// --- the messages -----------------------------------------------------------

/// Body i: a JSON reading padded to exactly body_size bytes (no newline).
std::string body_of(long device, long i) {
  char head[64];
  int n = std::snprintf(head, sizeof head, R"({"device":%ld,"n":%ld,"temperature":21.5,"pad":")",
                        device, i);
  std::string b(head, static_cast<std::size_t>(n));
  b.append(body_size - b.size() - 2, 'x');
  b += "\"}";
  return b;
}

/// The paths of the programs under test.
struct programs {
  std::string canopy;
  std::string canopyctl;

  static programs find() {
    constexpr std::string_view hint = "build it: ninja -C build canopy canopyctl";
    programs p;
    p.canopy = bench::find_program("CANOPY_BIN", CANOPY_BIN, hint);
    p.canopyctl = bench::find_program("CANOPYCTL_BIN", CANOPYCTL_BIN, hint);
    return p;
  }
};

// --- canopy -----------------------------------------------------------------

/// The router counters of the node behind `socket`, over its control socket.
node_metrics metrics_of(const std::string& socket) {
  auto client = control_client::connect(socket);
  if (!client)
    fail(client.err().message);
  auto m = client->metrics();
  if (!m)
    fail("metrics of " + socket + ": " + m.err().message);
  return std::move(m).value();
}

/// One canopy node process with its data dir and control socket in `dir`.
struct canopy_process {
  std::string id;
  std::string data;
  std::string socket;
  std::optional<tracked_process> proc;
};

/// hub ← gw-a ← gw-b, certificates, registry: everything but the load.
class canopy_chain {
 public:
  /// `threads`: each node's --threads (0: the node's default); `hold_ms`:
  /// each node's --upstream-hold-ms (< 0: the node's default).
  canopy_chain(programs progs, long devices, long threads, long hold_ms)
      : progs_(std::move(progs)), threads_(threads), hold_ms_(hold_ms), dir_("cnbc") {
    certs_ = dir_.file("certs");
    ctl_ok({progs_.canopyctl, "certs", "ca", "--out", certs_});
    for (auto id : {"hub", "gw-a", "gw-b"})
      ctl_ok({progs_.canopyctl, "certs", "issue", "--ca-dir", certs_, "--id", id});

    const int hub_link = free_port(), api = free_port();
    gwa_link_ = free_port();
    start(hub_, "hub",
          {"--role", "hub", "--link-listen", loopback(hub_link), "--api-listen", loopback(api)});
    wait_or_fail(
      [&] {
        return running(hub_) && std::filesystem::exists(hub_.data + "/api-token") &&
               port_accepts(api);
      },
      20s, "the hub's REST API");
    std::vector<std::string> hub_ctl{
      progs_.canopyctl,   "--hub",        "https://" + loopback(api), "--hub-id", "hub",   "--ca",
      certs_ + "/ca.crt", "--token-file", hub_.data + "/api-token",   "device",   "create"};
    auto create = [&](std::vector<std::string> args) {
      auto argv = hub_ctl;
      argv.insert(argv.end(), args.begin(), args.end());
      ctl_ok(argv);
    };
    create({"gw-a", "--parent", "hub", "--kind", "gateway"});
    create({"gw-b", "--parent", "gw-a", "--kind", "gateway"});
    for (long d = 1; d <= devices; ++d)
      create({device_id(d), "--parent", "gw-b", "--kind", "device", "--auth", "x509_ca"});

    gwa_args_ = {"--parent", loopback(hub_link), "--parent-id",
                 "hub",      "--link-listen",    loopback(gwa_link_)};
    start(gwa_, "gw-a", gwa_args_);
    start(gwb_, "gw-b", {"--parent", loopback(gwa_link_), "--parent-id", "gw-a"});
    wait_or_fail([&] { return running(gwa_) && parent_link_up(gwa_.socket); }, 30s,
                 "gw-a's link to the hub", 100ms);
    // gw-b is admitted once gw-a has its registry scope from the hub.
    wait_or_fail([&] { return running(gwb_) && parent_link_up(gwb_.socket); }, 60s,
                 "gw-b's link to gw-a", 100ms);
  }

  ~canopy_chain() {
    // Leaf first, so no node is left waiting for its parent.
    for (auto* n : {&gwb_, &gwa_, &hub_})
      if (n->proc)
        n->proc->stop();
  }
  canopy_chain(const canopy_chain&) = delete;
  canopy_chain& operator=(const canopy_chain&) = delete;

  static std::string device_id(long d) { return "dev-" + std::to_string(d); }

  const programs& progs() const { return progs_; }
  const test::temp_dir& dir() const { return dir_; }
  const canopy_process& hub() const { return hub_; }
  const canopy_process& gwa() const { return gwa_; }
  const canopy_process& gwb() const { return gwb_; }

  /// Pids, for CPU accounting: hub, gw-a, gw-b (0 for one stopped).
  std::vector<pid_t> pids() {
    std::vector<pid_t> out;
    for (auto* n : {&hub_, &gwa_, &gwb_})
      out.push_back(n->proc ? n->proc->get().pid() : 0);
    return out;
  }

  /// Stops gw-a (SIGTERM; gw-b keeps what it gets and retries its link).
  void stop_gwa() {
    gwa_.proc->stop();
    gwa_.proc.reset();
  }

  /// Starts gw-a again over the same data dir (it admits gw-b from its cached
  /// registry scope); returns at once.
  void restart_gwa() { start(gwa_, "gw-a", gwa_args_); }

  /// Fails, with the node's log, if one of them exited.
  void check_alive() {
    for (auto* n : {&hub_, &gwa_, &gwb_})
      running(*n);
  }

 private:
  void ctl_ok(const std::vector<std::string>& argv) {
    auto r = test::run(argv, 30s);
    if (r.exit_code != 0) {
      std::string cmd;
      for (const auto& a : argv)
        cmd += (cmd.empty() ? "" : " ") + a;
      fail(cmd + " failed:\n" + r.output);
    }
  }

  /// True if `n` runs; fails with its log if it exited.
  static bool running(canopy_process& n) {
    if (!n.proc || !n.proc->get().running())
      fail("canopy node " + n.id + " exited:\n" + (n.proc ? n.proc->output_tail() : std::string{}));
    return true;
  }

  void start(canopy_process& n, const std::string& id, std::vector<std::string> extra) {
    n.id = id;
    n.data = dir_.file(id);
    n.socket = dir_.file(id + ".sock");
    auto argv = bench::node_argv(progs_.canopy, id, certs_, n.data, n.socket);
    if (threads_ > 0) {
      argv.push_back("--threads");
      argv.push_back(std::to_string(threads_));
    }
    if (hold_ms_ >= 0) {
      argv.push_back("--upstream-hold-ms");
      argv.push_back(std::to_string(hold_ms_));
    }
    argv.insert(argv.end(), extra.begin(), extra.end());
    n.proc.emplace(argv);
  }

  programs progs_;
  long threads_ = 0;
  long hold_ms_ = -1;
  test::temp_dir dir_;
  std::string certs_;
  int gwa_link_ = 0;
  std::vector<std::string> gwa_args_;
  canopy_process hub_, gwa_, gwb_;
};

/// CPU time used by `pids` between construction and stop(), as percent of
/// one core over `seconds`.
class cpu_meter {
 public:
  explicit cpu_meter(std::vector<pid_t> pids) : pids_(std::move(pids)) {
    for (auto p : pids_)
      start_.push_back(cpu_ticks(p));
  }
  /// Percent of one core per pid, over `seconds`.
  std::vector<double> stop(double seconds) const {
    const double hz = static_cast<double>(::sysconf(_SC_CLK_TCK));
    std::vector<double> out;
    for (std::size_t i = 0; i < pids_.size(); ++i)
      out.push_back(100.0 * static_cast<double>(cpu_ticks(pids_[i]) - start_[i]) / hz / seconds);
    return out;
  }

 private:
  std::vector<pid_t> pids_;
  std::vector<long> start_;
};

/// The leaf devices' programs: one `canopyctl send --stdin` per body file,
/// each as its own leaf device dev-<k>, through gw-b's control socket.
class sender_group {
 public:
  sender_group(const canopy_chain& chain, const std::vector<std::string>& files, long window) {
    for (std::size_t k = 0; k < files.size(); ++k)
      procs_.push_back(std::make_unique<tracked_process>(
        std::vector<std::string>{chain.progs().canopyctl, "--socket", chain.gwb().socket, "send",
                                 "--device", canopy_chain::device_id(static_cast<long>(k) + 1),
                                 "--content-type", "application/json", "--stdin", "--window",
                                 std::to_string(window)},
        files[k]));
    ticks_.assign(procs_.size(), 0);
  }

  /// True once every sender exited (then done_at() is set); fails if one
  /// exited with an error.
  bool poll() {
    if (done_at_)
      return true;
    bool all = true;
    for (std::size_t i = 0; i < procs_.size(); ++i) {
      auto& p = procs_[i]->get();
      if (p.running()) {
        ticks_[i] = cpu_ticks(p.pid());  // the last reading before it exits
        all = false;
      } else if (p.status().value_or(-1) != 0) {
        fail("canopyctl send exited with " + std::to_string(p.status().value_or(-1)) + ":\n" +
             procs_[i]->output_tail());
      }
    }
    if (all)
      done_at_ = bench_clock::now();
    return all;
  }

  /// When poll() first saw them all gone.
  std::optional<bench_clock::time_point> done_at() const { return done_at_; }

  /// Waits until all exited (at most `timeout`), then checks that each
  /// acknowledged `per_sender` messages ("<n> ok 1": durable at gw-b, one endpoint).
  void finish(long per_sender, std::chrono::milliseconds timeout) {
    wait_or_fail([&] { return poll(); }, timeout, "canopyctl send to finish", 5ms);
    for (auto& p : procs_) {
      auto oks = test::count_occurrences(p->get().output(), " ok 1\n");
      if (static_cast<long>(oks) != per_sender)
        fail("canopyctl send acknowledged " + std::to_string(oks) + " of " +
             std::to_string(per_sender) + ":\n" + p->output_tail());
    }
  }

  /// Their CPU as percent of one core over `seconds` (ticks read while they ran).
  double cpu_percent(double seconds) const {
    const double hz = static_cast<double>(::sysconf(_SC_CLK_TCK));
    double sum = 0;
    for (auto t : ticks_)
      sum += static_cast<double>(t);
    return 100.0 * sum / hz / seconds;
  }

 private:
  std::vector<std::unique_ptr<tracked_process>> procs_;
  std::vector<long> ticks_;
  std::optional<bench_clock::time_point> done_at_;
};

/// Polls the hub's `sent` counter (deliveries its telemetry store
/// acknowledged) over one control connection (KJ: one client per thread, so
/// no other control_client may live meanwhile).
class hub_counter {
 public:
  explicit hub_counter(const std::string& socket) {
    auto c = control_client::connect(socket);
    if (!c)
      fail(c.err().message);
    client_.emplace(std::move(c).value());
  }
  std::uint64_t sent() {
    auto m = client_->metrics();
    if (!m)
      fail("metrics of the hub: " + m.err().message);
    return m->sent;
  }

 private:
  std::optional<control_client> client_;
};

/// Writes `senders` files of `per_sender` bodies (one per line) into the chain's dir.
std::vector<std::string> write_body_files(const canopy_chain& chain, long per_sender,
                                          long senders) {
  std::vector<std::string> files;
  for (long s = 1; s <= senders; ++s) {
    auto path = chain.dir().file("bodies-" + std::to_string(s) + ".txt");
    std::ofstream out(path);
    for (long i = 0; i < per_sender; ++i)
      out << body_of(s, i) << '\n';
    if (!out)
      fail("cannot write " + path);
    files.push_back(path);
  }
  return files;
}

struct canopy_figures {
  double msg_s = 0;
  double producer_msg_s =
    0;  ///< until every sender had all its messages acknowledged (durable at gw-b)
  double seconds = 0;
  std::vector<double> cpu_percent;  ///< hub, gw-a, gw-b, senders (of one core, over the run)
  std::uint64_t commits_hub = 0, commits_gwa = 0, commits_gwb = 0;
};

/// One round of the whole chain: the senders run while every hop forwards;
/// timed from spawning the senders until the hub's telemetry store
/// acknowledged every message.
canopy_figures run_canopy(canopy_chain& chain, const std::vector<std::string>& files,
                          long per_sender, long window) {
  const long total = per_sender * static_cast<long>(files.size());
  auto before_hub = metrics_of(chain.hub().socket), before_gwa = metrics_of(chain.gwa().socket),
       before_gwb = metrics_of(chain.gwb().socket);
  std::optional<bench_clock::time_point> t1;
  canopy_figures f;
  {
    hub_counter hub(chain.hub().socket);
    const auto target = before_hub.sent + static_cast<std::uint64_t>(total);
    cpu_meter cpu(chain.pids());
    const auto t0 = bench_clock::now();
    sender_group senders(chain, files, window);
    const auto deadline = t0 + std::chrono::seconds(30 + total / 2000);
    while (!t1) {
      check_stop();
      senders.poll();
      if (hub.sent() >= target) {
        t1 = bench_clock::now();
        break;
      }
      if (bench_clock::now() > deadline) {
        chain.check_alive();
        fail("the hub got " + std::to_string(hub.sent() - before_hub.sent) + " of " +
             std::to_string(total) + " messages");
      }
      std::this_thread::sleep_for(5ms);
    }
    f.seconds = std::chrono::duration<double>(*t1 - t0).count();
    f.cpu_percent = cpu.stop(f.seconds);
    senders.finish(per_sender, 10s);
    f.cpu_percent.push_back(senders.cpu_percent(f.seconds));
    f.msg_s = static_cast<double>(total) / f.seconds;
    f.producer_msg_s =
      static_cast<double>(total) /
      std::chrono::duration<double>(std::min(*senders.done_at(), *t1) - t0).count();
  }
  f.commits_hub = metrics_of(chain.hub().socket).commits - before_hub.commits;
  f.commits_gwa = metrics_of(chain.gwa().socket).commits - before_gwa.commits;
  f.commits_gwb = metrics_of(chain.gwb().socket).commits - before_gwb.commits;
  return f;
}

struct split_figures {
  double ingress_msg_s = 0;         ///< senders → gw-b alone (gw-a down): durable at gw-b
  double forward_msg_s = 0;         ///< gw-b's backlog → gw-a → hub, from the link's return
  std::vector<double> ingress_cpu;  ///< gw-b, senders
  std::vector<double> forward_cpu;  ///< hub, gw-a, gw-b
};

/// The two halves apart: with gw-a stopped, the senders' messages stay at
/// gw-b (ingress alone); then gw-a comes back and gw-b's backlog goes up
/// the two links to the hub (forwarding alone), timed from the moment gw-b's
/// link is up again.
split_figures run_split(canopy_chain& chain, const std::vector<std::string>& files, long per_sender,
                        long window) {
  const long total = per_sender * static_cast<long>(files.size());
  split_figures f;
  const auto base = metrics_of(chain.hub().socket).sent;
  chain.stop_gwa();
  wait_or_fail([&] { return !parent_link_up(chain.gwb().socket); }, 20s, "gw-b to see gw-a gone",
               10ms);
  {
    const auto gwb_pid = chain.pids()[2];
    cpu_meter cpu({gwb_pid});
    const auto t0 = bench_clock::now();
    sender_group senders(chain, files, window);
    senders.finish(per_sender, std::chrono::seconds(30 + total / 1000));
    const double secs = std::chrono::duration<double>(*senders.done_at() - t0).count();
    f.ingress_msg_s = static_cast<double>(total) / secs;
    f.ingress_cpu = cpu.stop(secs);
    f.ingress_cpu.push_back(senders.cpu_percent(secs));
  }
  chain.restart_gwa();
  // gw-b retries with its backoff (up to a few seconds here).
  wait_or_fail(
    [&] {
      chain.check_alive();
      return parent_link_up(chain.gwb().socket);
    },
    40s, "gw-b's link to gw-a to return", 5ms);
  hub_counter hub(chain.hub().socket);
  cpu_meter cpu(chain.pids());
  const auto t_up = bench_clock::now();
  wait_or_fail([&] { return hub.sent() >= base + static_cast<std::uint64_t>(total); },
               std::chrono::seconds(30 + total / 2000), "gw-b's backlog at the hub", 5ms);
  const double secs = std::chrono::duration<double>(bench_clock::now() - t_up).count();
  f.forward_msg_s = static_cast<double>(total) / secs;
  f.forward_cpu = cpu.stop(secs);
  return f;
}

// --- mosquitto --------------------------------------------------------------

/// Brokers A ← B ← C on loopback, each bridging telemetry/# to the next with QoS 1.
class mosquitto_chain {
 public:
  explicit mosquitto_chain(long max_inflight) : dir_("cnbm") {
    const char* bin = "/usr/sbin/mosquitto";
    if (::access(bin, X_OK) != 0)
      fail(std::string(bin) + " missing: apt-get install mosquitto");
    port_a = free_port();
    port_b = free_port();
    port_c = free_port();
    start("a", port_a, 0, max_inflight);
    start("b", port_b, port_a, max_inflight);
    start("c", port_c, port_b, max_inflight);
    for (int p : {port_a, port_b, port_c})
      wait_or_fail([p] { return port_accepts(p); }, 10s, "mosquitto on " + loopback(p));
  }
  ~mosquitto_chain() {
    for (auto it = brokers_.rbegin(); it != brokers_.rend(); ++it)
      (*it)->stop();
  }
  mosquitto_chain(const mosquitto_chain&) = delete;
  mosquitto_chain& operator=(const mosquitto_chain&) = delete;

  /// Pids of brokers A, B, C, for CPU accounting.
  std::vector<pid_t> pids() {
    std::vector<pid_t> out;
    for (auto& b : brokers_)
      out.push_back(b->get().pid());
    return out;
  }

  /// Fails, with its log, if a broker exited.
  void check_alive() {
    for (auto& b : brokers_)
      if (!b->get().running())
        fail("a mosquitto broker exited:\n" + b->output_tail());
  }

  int port_a = 0, port_b = 0,
      port_c = 0;  ///< listeners; A is the end (the subscriber's), C the start

 private:
  void start(const std::string& name, int port, int bridge_to, long max_inflight) {
    std::string conf =
      "per_listener_settings false\n"
      "listener " +
      std::to_string(port) +
      " 127.0.0.1\n"
      "allow_anonymous true\n"
      "set_tcp_nodelay true\n"
      "persistence false\n"
      "max_queued_messages 0\n"
      "max_inflight_messages " +
      std::to_string(max_inflight) +
      "\n"
      "log_dest stderr\n"
      "log_type error\n"
      "log_type warning\n";
    if (bridge_to != 0)
      conf += "connection " + name +
              "-up\n"
              "address " +
              loopback(bridge_to) +
              "\n"
              "topic telemetry/# out 1\n"
              "bridge_protocol_version mqttv311\n"
              "try_private true\n"
              "cleansession true\n"
              "notifications false\n"
              "start_type automatic\n"
              "restart_timeout 1\n"
              "keepalive_interval 60\n";
    auto path = dir_.file(name + ".conf");
    test::write_text_file(path, conf);
    brokers_.push_back(std::make_unique<tracked_process>(
      std::vector<std::string>{"/usr/sbin/mosquitto", "-c", path}));
  }

  test::temp_dir dir_;
  std::vector<std::unique_ptr<tracked_process>> brokers_;
};

/// A libmosquitto client with its network thread; callbacks on that thread.
class mqtt_client {
 public:
  mqtt_client(const std::string& id, int port, long max_inflight) {
    mosq_ = mosquitto_new(id.c_str(), true, this);
    if (mosq_ == nullptr)
      fail("mosquitto_new failed");
    mosquitto_int_option(mosq_, MOSQ_OPT_PROTOCOL_VERSION, MQTT_PROTOCOL_V311);
    mosquitto_int_option(mosq_, MOSQ_OPT_TCP_NODELAY, 1);
    // (No mosquitto_threaded_set: loop_start() refuses a client marked threaded.)
    mosquitto_max_inflight_messages_set(mosq_, static_cast<unsigned>(max_inflight));
    mosquitto_connect_callback_set(mosq_, [](mosquitto*, void* self, int rc) {
      static_cast<mqtt_client*>(self)->on_connect(rc);
    });
    mosquitto_subscribe_callback_set(mosq_, [](mosquitto*, void* self, int, int, const int*) {
      static_cast<mqtt_client*>(self)->on_subscribe();
    });
    mosquitto_publish_callback_set(
      mosq_, [](mosquitto*, void* self, int) { static_cast<mqtt_client*>(self)->on_publish(); });
    mosquitto_message_callback_set(mosq_, [](mosquitto*, void* self, const mosquitto_message* m) {
      static_cast<mqtt_client*>(self)->on_message(m);
    });
    int rc = mosquitto_connect(mosq_, "127.0.0.1", port, 60);
    if (rc != MOSQ_ERR_SUCCESS)
      fail("mosquitto_connect to " + loopback(port) + ": " + mosquitto_strerror(rc));
    rc = mosquitto_loop_start(mosq_);
    if (rc != MOSQ_ERR_SUCCESS)
      fail(std::string("mosquitto_loop_start: ") + mosquitto_strerror(rc));
    wait([this] { return connected_; }, 10s, "the MQTT CONNACK");
  }
  ~mqtt_client() {
    mosquitto_disconnect(mosq_);
    mosquitto_loop_stop(mosq_, true);
    mosquitto_destroy(mosq_);
  }
  mqtt_client(const mqtt_client&) = delete;
  mqtt_client& operator=(const mqtt_client&) = delete;

  void subscribe(const std::string& pattern) {
    int rc = mosquitto_subscribe(mosq_, nullptr, pattern.c_str(), 1);
    if (rc != MOSQ_ERR_SUCCESS)
      fail(std::string("mosquitto_subscribe: ") + mosquitto_strerror(rc));
    wait([this] { return subscribed_; }, 10s, "the MQTT SUBACK");
  }

  /// Publishes with QoS 1, first waiting while `window` are unacknowledged.
  void publish(const std::string& topic, const std::string& body, long window) {
    {
      std::unique_lock<std::mutex> lock(mtx_);
      if (!cv_.wait_for(lock, 30s, [&] { return inflight_ < window || bench::stop_requested(); }))
        fail("no PUBACK from broker C for 30 s");
      ++inflight_;
    }
    check_stop();
    int rc = mosquitto_publish(mosq_, nullptr, topic.c_str(), static_cast<int>(body.size()),
                               body.data(), 1, false);
    if (rc != MOSQ_ERR_SUCCESS)
      fail(std::string("mosquitto_publish: ") + mosquitto_strerror(rc));
  }

  /// Messages received on `topic` so far.
  long received(const std::string& topic) {
    std::lock_guard<std::mutex> lock(mtx_);
    auto it = counts_.find(topic);
    return it == counts_.end() ? 0 : it->second;
  }

  /// Waits until `n` messages on `topic` arrived; the time the n-th did.
  bench_clock::time_point wait_received(const std::string& topic, long n,
                                        std::chrono::milliseconds timeout) {
    wait([&] { return counts_[topic] >= n; }, timeout,
         std::to_string(n) + " messages on " + topic + " at broker A");
    std::lock_guard<std::mutex> lock(mtx_);
    return last_at_[topic];
  }

  /// Arms the clock of `topic`: last_at records when its `n`-th message arrives.
  void expect(const std::string& topic, long n) {
    std::lock_guard<std::mutex> lock(mtx_);
    counts_[topic] = 0;
    target_[topic] = n;
  }

 private:
  template <class Pred>
  void wait(Pred pred, std::chrono::milliseconds timeout, const std::string& what) {
    std::unique_lock<std::mutex> lock(mtx_);
    auto deadline = bench_clock::now() + timeout;
    while (!pred()) {
      check_stop();
      if (cv_.wait_until(lock, std::min(deadline, bench_clock::now() + 100ms)) ==
            std::cv_status::timeout &&
          bench_clock::now() >= deadline)
        fail("timed out waiting for " + what);
    }
  }

  void on_connect(int rc) {
    std::lock_guard<std::mutex> lock(mtx_);
    connected_ = rc == 0;
    cv_.notify_all();
  }
  void on_subscribe() {
    std::lock_guard<std::mutex> lock(mtx_);
    subscribed_ = true;
    cv_.notify_all();
  }
  void on_publish() {
    std::lock_guard<std::mutex> lock(mtx_);
    --inflight_;
    cv_.notify_all();
  }
  void on_message(const mosquitto_message* m) {
    auto now = bench_clock::now();
    std::lock_guard<std::mutex> lock(mtx_);
    std::string topic = m->topic;
    long c = ++counts_[topic];
    if (auto it = target_.find(topic); it != target_.end() && c == it->second) {
      last_at_[topic] = now;
      cv_.notify_all();
    } else if (c == 1) {
      cv_.notify_all();
    }
  }

  mosquitto* mosq_ = nullptr;
  std::mutex mtx_;
  std::condition_variable cv_;
  bool connected_ = false;
  bool subscribed_ = false;
  long inflight_ = 0;
  std::map<std::string, long> counts_;
  std::map<std::string, long> target_;
  std::map<std::string, bench_clock::time_point> last_at_;
};

struct mosquitto_figures {
  double msg_s = 0;
  double seconds = 0;
  std::vector<double> cpu_percent;  ///< brokers A, B, C, then this process (both clients)
};

mosquitto_figures run_mosquitto(mosquitto_chain& chain, mqtt_client& pub, mqtt_client& sub, long n,
                                long window, long round) {
  std::vector<std::string> bodies;
  bodies.reserve(static_cast<std::size_t>(n));
  for (long i = 0; i < n; ++i)
    bodies.push_back(body_of(1, i));
  const std::string topic = "telemetry/dev-1/r" + std::to_string(round);
  sub.expect(topic, n);
  auto pids = chain.pids();
  pids.push_back(::getpid());
  std::vector<long> ticks0;
  for (auto p : pids)
    ticks0.push_back(cpu_ticks(p));

  const auto t0 = bench_clock::now();
  for (const auto& b : bodies)
    pub.publish(topic, b, window);
  const auto t1 = sub.wait_received(topic, n, std::chrono::seconds(30 + n / 2000));
  std::vector<long> ticks1;
  for (auto p : pids)
    ticks1.push_back(cpu_ticks(p));
  chain.check_alive();

  mosquitto_figures f;
  f.seconds = std::chrono::duration<double>(t1 - t0).count();
  f.msg_s = static_cast<double>(n) / f.seconds;
  const double hz = static_cast<double>(::sysconf(_SC_CLK_TCK));
  for (std::size_t i = 0; i < pids.size(); ++i)
    f.cpu_percent.push_back(100.0 * static_cast<double>(ticks1[i] - ticks0[i]) / hz / f.seconds);
  // Anything more than n (a duplicate after a retry) would show here.
  if (sub.received(topic) != n)
    fail("the subscriber got " + std::to_string(sub.received(topic)) + " messages, expected " +
         std::to_string(n));
  return f;
}

/// mosquitto_lib_init() for the object's lifetime.
struct mosquitto_library {
  mosquitto_library() { mosquitto_lib_init(); }
  ~mosquitto_library() { mosquitto_lib_cleanup(); }
  mosquitto_library(const mosquitto_library&) = delete;
  mosquitto_library& operator=(const mosquitto_library&) = delete;
};

/// The 1-minute load average (/proc/loadavg), or -1.
double load_average() {
  std::ifstream in("/proc/loadavg");
  double v = -1;
  in >> v;
  return v;
}

int run(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // progress lines as they come, also into a pipe
  const long messages = bench::arg(argc, argv, "messages", 20000);
  const long window = bench::arg(argc, argv, "window", 1024);
  const long senders = bench::arg(argc, argv, "senders", 1);
  const long mqtt_inflight = bench::arg(argc, argv, "mqtt-inflight", 100);
  const long rounds = bench::arg(argc, argv, "rounds", 2);
  const long node_threads = bench::arg(argc, argv, "node-threads", 0);
  const long hold_ms = bench::arg(argc, argv, "upstream-hold-ms", -1);
  const bool with_split = bench::arg(argc, argv, "split", 1) != 0;
  if (messages < senders || senders < 1 || window < 1 || rounds < 1 || mqtt_inflight < 0 ||
      node_threads < 0)
    fail(
      "bad arguments: --messages >= --senders >= 1, --window >= 1, --rounds >= 1, --mqtt-inflight "
      ">= 0, --node-threads >= 0");
  const long per_sender = messages / senders;
  const long total = per_sender * senders;
  auto progs = programs::find();

  bench::install_stop_handler();

  std::printf(
    "bench-chain: %ld messages of %zu bytes per round, best of %ld rounds, window %ld, %ld "
    "sender(s)\n",
    total, body_size, rounds, window, senders);

  std::printf("load average (1 min) at start: %.2f (other work on the machine slows both sides)\n",
              load_average());
  mosquitto_library lib;
  mosquitto_chain mq(mqtt_inflight);
  canopy_chain chain(progs, senders, node_threads, hold_ms);
  std::printf(
    "mosquitto: A <- B <- C bridged (QoS 1); canopy: hub <- gw-a <- gw-b linked (TLS)%s%s\n",
    node_threads > 0 ? (", --threads " + std::to_string(node_threads)).c_str() : "",
    hold_ms >= 0 ? (", --upstream-hold-ms " + std::to_string(hold_ms)).c_str() : "");
  mqtt_client sub("bench-sub", mq.port_a, mqtt_inflight);
  sub.subscribe("telemetry/#");
  mqtt_client pub("bench-pub", mq.port_c, window);
  // The bridges connect on their own: publish until one message gets through.
  wait_or_fail(
    [&] {
      pub.publish("telemetry/warmup", "warm-up", window);
      return sub.received("telemetry/warmup") > 0;
    },
    20s, "the mosquitto bridges C -> B -> A", 100ms);
  auto files = write_body_files(chain, per_sender, senders);

  // Rounds alternate between the two chains, so that a change in the
  // machine's load hits both alike.
  mosquitto_figures best_mq;
  canopy_figures best_cn;
  for (long r = 1; r <= rounds; ++r) {
    auto m = run_mosquitto(mq, pub, sub, total, window, r);
    std::printf(
      "mosquitto round %ld: %.0f msg/s (%.2f s); CPU %% of a core: A %.0f, B %.0f, C %.0f, "
      "publisher and subscriber %.0f\n",
      r, m.msg_s, m.seconds, m.cpu_percent[0], m.cpu_percent[1], m.cpu_percent[2],
      m.cpu_percent[3]);
    if (m.msg_s > best_mq.msg_s)
      best_mq = m;
    auto f = run_canopy(chain, files, per_sender, window);
    std::printf(
      "canopy round %ld: %.0f msg/s (%.2f s; senders done at %.0f msg/s); CPU %% of a core: hub "
      "%.0f, "
      "gw-a %.0f, gw-b %.0f, canopyctl send %.0f; commits hub %llu, gw-a %llu, gw-b %llu\n",
      r, f.msg_s, f.seconds, f.producer_msg_s, f.cpu_percent[0], f.cpu_percent[1], f.cpu_percent[2],
      f.cpu_percent[3], static_cast<unsigned long long>(f.commits_hub),
      static_cast<unsigned long long>(f.commits_gwa),
      static_cast<unsigned long long>(f.commits_gwb));
    if (f.msg_s > best_cn.msg_s)
      best_cn = f;
  }
  std::optional<split_figures> split;
  if (with_split) {
    split = run_split(chain, files, per_sender, window);
    std::printf(
      "canopy apart: ingress alone (senders -> gw-b, durable there; gw-a down) %.0f msg/s, CPU %% "
      "gw-b "
      "%.0f, canopyctl send %.0f\n",
      split->ingress_msg_s, split->ingress_cpu[0], split->ingress_cpu[1]);
    std::printf(
      "canopy apart: forwarding alone (gw-b's stored backlog -> gw-a -> hub, from the link's "
      "return) "
      "%.0f msg/s, CPU %% hub %.0f, gw-a %.0f, gw-b %.0f\n",
      split->forward_msg_s, split->forward_cpu[0], split->forward_cpu[1], split->forward_cpu[2]);
  }
  std::printf("load average (1 min) at the end: %.2f\n", load_average());

  std::printf(
    "canopy is durable at every hop (SQLite WAL, synchronous=FULL) over mutually authenticated "
    "TLS; the "
    "mosquitto chain keeps messages in memory only (persistence off) over plain TCP\n");
  std::printf(
    "RESULT bench-chain canopy_msg_s=%.0f mosquitto_msg_s=%.0f ratio=%.2f messages=%ld hops=3 "
    "window=%ld senders=%ld producer_msg_s=%.0f",
    best_cn.msg_s, best_mq.msg_s, best_cn.msg_s / best_mq.msg_s, total, window, senders,
    best_cn.producer_msg_s);
  if (split)
    std::printf(" ingress_msg_s=%.0f forward_msg_s=%.0f", split->ingress_msg_s,
                split->forward_msg_s);
  std::printf("\n");
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  return bench::run_main(bench_name, run, argc, argv);
}
