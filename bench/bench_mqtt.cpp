// bench-mqtt: MQTT 3.1.1 publish throughput and latency of a canopy hub's
// MQTT port against Debian's mosquitto, with one load generator of our own
// used identically against both, in the same run.
//
// The load generator: one thread, epoll, non-blocking sockets with
// TCP_NODELAY, packets encoded and decoded with gateway/mqtt_codec.hpp. Its
// clients are Azure IoT Hub devices: client id = device id, user name
// "bench-hub/<id>/?api-version=2021-04-12", a SAS token as password, telemetry
// to "devices/<id>/messages/events/", 100-byte payloads.
//
//   canopy     `canopy run --role hub --hub-host bench-hub --mqtt-listen
//              127.0.0.1:PORT --mqtt-plain` over a data dir whose registry
//              holds the devices (SAS, parent: the hub; written before the
//              hub starts). Telemetry takes the default route into the hub's
//              telemetry store (SQLite WAL, synchronous=FULL); a QoS 1 PUBACK
//              comes once the message is durable there.
//   mosquitto  /usr/sbin/mosquitto on a generated configuration (persistence
//              off, TCP_NODELAY, no in-flight or queue limits), plus one QoS 1
//              subscriber of "devices/+/messages/events/#" in the generator's
//              loop that takes (and acknowledges) everything, so that the
//              broker really delivers each message. Its PUBACK means "in
//              memory, queued for the subscriber".
//
// Phases, for each server (mosquitto first, then canopy), after a warm-up
// (20,000 QoS 1 messages). Throughput counts a message once the server has
// delivered it: to the subscriber (mosquitto), into the hub's telemetry store
// (canopy; its router's `sent` count over the control socket, polled every
// millisecond where a PUBACK does not already say so).
//   qos1     N clients (--clients, 8), each keeping W QoS 1 publishes
//            unacknowledged (--window, 256), M messages in all (--messages,
//            200,000): from the first publish until the last PUBACK (and,
//            mosquitto, the subscriber has them all).
//   qos0     M0 QoS 0 publishes (--qos0-messages, 2 × M) written as fast as
//            the sockets take them, then one QoS 1 publish per client as a
//            fence (both servers answer a client's packets in order): from
//            the first publish until the last fence's PUBACK and every
//            message delivered, whichever is later. Until the fences alone
//            is printed as "accepted" (qos0_accepted_msgs_per_s): canopy
//            acknowledges the fence once the router has everything before it
//            (in its store if need be), before the telemetry store has them.
//   latency  QoS 1 at a fixed rate, round robin over the clients, each
//            message written when due (timerfd, timer slack 1 ns): publish →
//            PUBACK time, p50/p90/p99/p99.9, at 1,000 msg/s
//            (--lat-seconds-1k, 3 s) and at 10,000 msg/s (--lat-seconds-10k,
//            2 s); the first 10% are a warm-up.
// Each phase prints the server's CPU and the generator's (both in % of one
// core), to show which side was the bottleneck (2 cores here); for canopy
// also the router store's group commits (messages the telemetry store did not
// take within the router's commit interval go through it).
//
//   RESULT bench-mqtt qos1_msgs_per_s=... mosquitto_qos1_msgs_per_s=... qos1_ratio=...
//          qos0_msgs_per_s=... mosquitto_qos0_msgs_per_s=... qos0_ratio=...
//          p50_1k_us=... p99_1k_us=... mosquitto_p50_1k_us=... mosquitto_p99_1k_us=...
//          p50_10k_us=... p99_10k_us=... mosquitto_p50_10k_us=... mosquitto_p99_10k_us=...
//          qos0_accepted_msgs_per_s=... mosquitto_qos0_accepted_msgs_per_s=...
//          clients=N window=W messages=M ratio=<qos1_ratio>
//
// Options (--name=value or --name value): --messages, --qos0-messages,
// --clients, --window, --lat-seconds-1k, --lat-seconds-10k, --canopy=PATH
// (else $CANOPY_BIN, else the build's), --mosquitto=PATH (else
// $MOSQUITTO_BIN, else /usr/sbin/mosquitto), --only=canopy|mosquitto (one
// side; the RESULT line then shows 0 for the other), --hub-args="..."
// (extra flags for the canopy hub, split at spaces, e.g. "--threads 2"),
// --subscriber=0 (mosquitto without its subscriber: what it does when it
// delivers nothing), --dump-latency=PATH (each latency phase's samples to
// PATH-<server>-<rate>.txt: send time since the phase began and latency, µs).
#include "bench/bench_common.hpp"
#include "bench/bench_fleet.hpp"
#include "bench/mqtt_load.hpp"
#include "gateway/control_client.hpp"
#include "gateway/mqtt_codec.hpp"
#include "integration/process.hpp"

#include <signal.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/timerfd.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstring>
#include <optional>
#include <sstream>
#include <thread>

using namespace canopy;
using namespace std::chrono_literals;
using bench::bench_clock;

namespace {

constexpr std::string_view bench_name = "bench-mqtt";
constexpr std::size_t payload_size = 100;
constexpr std::uint16_t keep_alive_s = 120;

using bench::check_stop;
using bench::fail;
using bench::option;

std::int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(bench_clock::now().time_since_epoch())
    .count();
}

const auto started = bench_clock::now();

/// Seconds since the program started (progress lines).
double elapsed_s() {
  std::fflush(stdout);
  return std::chrono::duration<double>(bench_clock::now() - started).count();
}

/// What the generator needs to know about the server under test.
struct server_ref {
  std::string name;  ///< "canopy" or "mosquitto"
  int port = 0;
  pid_t pid = 0;
  bench::tracked_process* proc = nullptr;
  bool subscriber = false;  ///< run a draining subscriber (mosquitto)
  std::string socket;       ///< canopy's control socket ("" = none)
};

/// One MQTT connection of the generator.
struct client {
  int fd = -1;
  std::string id;
  std::string topic;
  mqtt::frame_reader reader{1u << 20};
  std::string out;  ///< bytes to write, from out_off
  std::size_t out_off = 0;
  bool want_out = false;  ///< EPOLLOUT registered
  bool subscriber = false;
  std::uint64_t tag = 0;  ///< epoll data: index, or subscriber_tag
  bool connacked = false;
  bool subacked = false;
  std::uint16_t next_pid = 1;
  long quota = 0;      ///< messages still to send in this phase
  long in_flight = 0;  ///< QoS 1 publishes not yet acknowledged
  bool fence_sent = false;
  bool fence_acked = false;
  std::uint16_t fence_pid = 0;
  std::vector<std::int64_t> sent_ns = std::vector<std::int64_t>(65536, 0);  ///< by packet id
  std::vector<bool> timed = std::vector<bool>(65536, false);  ///< by packet id: counts in latency
  bool dirty = false;  ///< may send more after the acks just read

  std::uint16_t take_pid() {
    std::uint16_t p = next_pid++;
    if (next_pid == 0)
      next_pid = 1;
    return p;
  }
};

/// The figures of one timed phase.
struct phase_figures {
  double msgs_per_s = 0;
  double seconds = 0;
  double server_cpu_pct = 0;
  double generator_cpu_pct = 0;
  long delivered = -1;       ///< what the subscriber / the hub's router got (-1: unknown)
  double fence_seconds = 0;  ///< QoS 0: until the last fence's PUBACK
  long count = 0;            ///< messages sent in the phase
};

/// Latency figures.
struct latency_figures {
  double p50_us = 0;
  double p99_us = 0;
  double p90_us = 0;
  double p999_us = 0;
  double max_us = 0;
  long samples = 0;
  double achieved_rate = 0;
  double server_cpu_pct = 0;
  double generator_cpu_pct = 0;
};

/// The load generator: the clients of one server, one epoll loop.
class load_generator {
 public:
  load_generator(const server_ref& server, const std::vector<bench::mqtt_device>& devices)
      : server_(server), payload_(make_payload()) {
    ep_ = ::epoll_create1(EPOLL_CLOEXEC);
    timer_ = ::timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    if (ep_ < 0 || timer_ < 0)
      fail("epoll/timerfd: " + std::string(std::strerror(errno)));
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.u64 = timer_tag;
    ::epoll_ctl(ep_, EPOLL_CTL_ADD, timer_, &ev);
    for (const auto& d : devices) {
      auto c = std::make_unique<client>();
      c->id = d.id;
      c->topic = "devices/" + d.id + "/messages/events/";
      c->out = bench::mqtt_connect_bytes(d, bench::mqtt_hub_id, keep_alive_s);
      clients_.push_back(std::move(c));
    }
    if (server_.subscriber) {
      subscriber_ = std::make_unique<client>();
      subscriber_->id = "bench-subscriber";
      subscriber_->subscriber = true;
      mqtt::connect_packet c;
      c.client_id = subscriber_->id;
      c.keep_alive_s = keep_alive_s;
      subscriber_->out = mqtt::encode(c);
    }
  }
  ~load_generator() {
    for (auto& c : clients_)
      if (c->fd >= 0)
        ::close(c->fd);
    if (subscriber_ && subscriber_->fd >= 0)
      ::close(subscriber_->fd);
    ::close(timer_);
    ::close(ep_);
  }
  load_generator(const load_generator&) = delete;
  load_generator& operator=(const load_generator&) = delete;

  /// Connects every client (and the subscriber, subscribed) and waits for
  /// their CONNACKs (and SUBACK).
  void connect_all() {
    auto open = [&](client& c, std::uint64_t tag) {
      c.fd = bench::connect_nonblocking(server_.port);
      c.tag = tag;
      epoll_event ev{};
      ev.events = EPOLLIN | EPOLLOUT;
      ev.data.u64 = tag;
      c.want_out = true;
      if (::epoll_ctl(ep_, EPOLL_CTL_ADD, c.fd, &ev) != 0)
        fail("epoll_ctl: " + std::string(std::strerror(errno)));
    };
    if (subscriber_)
      open(*subscriber_, subscriber_tag);
    for (std::size_t i = 0; i < clients_.size(); ++i)
      open(*clients_[i], i);
    run_until(
      [&] {
        if (subscriber_ && !subscriber_->subacked)
          return false;
        for (auto& c : clients_)
          if (!c->connacked)
            return false;
        return true;
      },
      "CONNACKs");
  }

  /// QoS 1 with `window` in flight per client, `total` in all; timed until
  /// the last PUBACK and, with a subscriber, until it has every message too.
  phase_figures run_window(long total, long window) {
    mode_ = mode::window;
    window_ = window;
    share(total);
    const long sub_before = sub_received_;
    const long hub_before = hub_delivered_ ? hub_delivered_() : -1;
    const auto m = meter_start();
    const std::int64_t t0 = now_ns();
    for (auto& c : clients_) {
      top_up(*c);
      flush(*c);
    }
    run_until([&] { return acked_ == total; }, "PUBACKs");
    std::int64_t t_end = last_ack_ns_;
    long delivered = -1;
    if (subscriber_) {
      t_end = std::max(t_end, drain_subscriber(sub_before + total));
      delivered = sub_received_ - sub_before;
    } else if (hub_before >= 0) {
      // A canopy PUBACK already means "durable in the hub's telemetry
      // store": the router's count is checked, not timed.
      await_hub(hub_before + total, 10s);
      delivered = hub_delivered_() - hub_before;
    }
    auto f = meter_stop(m, t0, t_end, total);
    f.delivered = delivered;
    return f;
  }

  /// `total` QoS 0 publishes as fast as the sockets take them, then a QoS 1
  /// fence per client; timed until the last fence's PUBACK and every message
  /// delivered (to the subscriber; counted by the hub's router), whichever
  /// comes later.
  phase_figures run_qos0(long total) {
    mode_ = mode::qos0;
    share(total);
    const long fences = static_cast<long>(clients_.size());
    const long sub_before = sub_received_;
    const long hub_before = hub_delivered_ ? hub_delivered_() : -1;
    const auto m = meter_start();
    const std::int64_t t0 = now_ns();
    for (auto& c : clients_) {
      c->fence_sent = c->fence_acked = false;
      pump_qos0(*c);
    }
    run_until(
      [&] {
        for (auto& c : clients_)
          if (!c->fence_acked)
            return false;
        return true;
      },
      "the fences' PUBACKs", true);
    fence_ns_ = last_ack_ns_;
    std::int64_t t_end = fence_ns_;
    long delivered = -1;
    if (subscriber_) {
      t_end = std::max(t_end, drain_subscriber(sub_before + total + fences, 5s));
      delivered = sub_received_ - sub_before - fences;
    } else if (hub_before >= 0) {
      t_end = std::max(t_end, await_hub(hub_before + total + fences, 10s));
      delivered = hub_delivered_() - hub_before - fences;
    }
    auto f = meter_stop(m, t0, t_end, total);
    f.delivered = delivered;
    f.fence_seconds = static_cast<double>(fence_ns_ - t0) / 1e9;
    return f;
  }

  /// QoS 1 at `rate` msg/s for `duration`, round robin over the clients; the
  /// first 10% not counted.
  latency_figures run_paced(double rate, std::chrono::milliseconds duration) {
    mode_ = mode::paced;
    samples_.clear();
    sample_at_.clear();
    const long total =
      std::max(1L, static_cast<long>(rate * static_cast<double>(duration.count()) / 1000.0));
    const long warmup = total / 10;
    const long acked_before = acked_;
    const auto m = meter_start();
    const std::int64_t t0 = now_ns();
    long sent = 0;
    std::size_t next_client = 0;
    const double interval_ns = 1e9 / rate;
    auto send_due = [&] {
      const std::int64_t now = now_ns();
      const long due =
        std::min(total, static_cast<long>(static_cast<double>(now - t0) / interval_ns) + 1);
      while (sent < due) {
        client& c = *clients_[next_client];
        next_client = (next_client + 1) % clients_.size();
        const std::uint16_t pid = c.take_pid();
        mqtt::encode_publish(c.out, c.topic, payload_, 1, false, false, pid);
        c.timed[pid] = sent >= warmup;
        c.sent_ns[pid] = now_ns();
        ++c.in_flight;
        flush(c);
        ++sent;
      }
      if (sent < total) {
        const std::int64_t next =
          t0 + static_cast<std::int64_t>(static_cast<double>(sent) * interval_ns);
        itimerspec its{};
        its.it_value.tv_sec = next / 1'000'000'000;
        its.it_value.tv_nsec = next % 1'000'000'000;
        // bench_clock is steady_clock, which is CLOCK_MONOTONIC on Linux.
        ::timerfd_settime(timer_, TFD_TIMER_ABSTIME, &its, nullptr);
      }
    };
    on_timer_ = send_due;
    send_due();
    run_until([&] { return sent == total && acked_ - acked_before == total; }, "paced PUBACKs");
    on_timer_ = nullptr;
    const std::int64_t t1 = last_ack_ns_;
    auto pf = meter_stop(m, t0, t1, total);
    if (!dump_path_.empty()) {
      const std::string path =
        dump_path_ + "-" + server_.name + "-" + std::to_string(static_cast<long>(rate)) + ".txt";
      if (std::FILE* out = std::fopen(path.c_str(), "w")) {
        for (std::size_t i = 0; i < samples_.size(); ++i)
          std::fprintf(out, "%.1f %.1f\n", static_cast<double>(sample_at_[i] - t0) / 1e3,
                       samples_[i]);
        std::fclose(out);
      }
    }
    latency_figures f;
    f.samples = static_cast<long>(samples_.size());
    f.p50_us = bench::percentile(samples_, 50);
    f.p99_us = bench::percentile(samples_, 99);
    f.p90_us = bench::percentile(samples_, 90);
    f.p999_us = bench::percentile(samples_, 99.9);
    f.max_us = samples_.empty() ? 0 : samples_.back();
    f.achieved_rate = pf.msgs_per_s;
    f.server_cpu_pct = pf.server_cpu_pct;
    f.generator_cpu_pct = pf.generator_cpu_pct;
    return f;
  }

  /// Writes each paced phase's samples to <path>-<server>-<rate>.txt: "send time
  /// since the phase began (us) latency (us)" per line.
  void dump_latency_to(std::string path) { dump_path_ = std::move(path); }

  /// How the hub's router count is read (canopy); each throughput phase then
  /// waits for it.
  void count_hub_deliveries_with(std::function<long()> fn) { hub_delivered_ = std::move(fn); }

  /// Messages the subscriber received so far.
  long subscriber_received() const { return sub_received_; }

 private:
  enum class mode { idle, window, qos0, paced };
  static constexpr std::uint64_t timer_tag = ~std::uint64_t{0};
  static constexpr std::uint64_t subscriber_tag = ~std::uint64_t{0} - 1;

  struct meter {
    double server_ms;
    double self_ms;
  };

  static std::string make_payload() {
    std::string p = R"({"temperature":21.5,"humidity":40,"pad":")";
    p.append(payload_size - p.size() - 2, 'x');
    p += "\"}";
    return p;
  }

  meter meter_start() const { return {bench::cpu_ms(server_.pid), bench::self_cpu_ms()}; }

  phase_figures meter_stop(const meter& m, std::int64_t t0, std::int64_t t1, long n) const {
    phase_figures f;
    f.count = n;
    f.seconds = static_cast<double>(t1 - t0) / 1e9;
    f.msgs_per_s = f.seconds > 0 ? static_cast<double>(n) / f.seconds : 0;
    const double wall_ms = static_cast<double>(now_ns() - t0) / 1e6;
    f.server_cpu_pct = 100.0 * (bench::cpu_ms(server_.pid) - m.server_ms) / wall_ms;
    f.generator_cpu_pct = 100.0 * (bench::self_cpu_ms() - m.self_ms) / wall_ms;
    return f;
  }

  void share(long total) {
    acked_ = 0;
    const long n = static_cast<long>(clients_.size());
    for (long i = 0; i < n; ++i)
      clients_[static_cast<std::size_t>(i)]->quota = total / n + (i < total % n ? 1 : 0);
  }

  /// Window mode: sends until the client has window_ in flight or its quota is spent.
  void top_up(client& c) {
    while (c.in_flight < window_ && c.quota > 0) {
      const std::uint16_t pid = c.take_pid();
      mqtt::encode_publish(c.out, c.topic, payload_, 1, false, false, pid);
      ++c.in_flight;
      --c.quota;
    }
  }

  /// QoS 0 mode: writes chunks of publishes until the socket is full or the
  /// quota is spent, then the fence.
  void pump_qos0(client& c) {
    constexpr std::size_t chunk = 64 * 1024;
    if (c.want_out)
      return;  // the socket is full: EPOLLOUT comes first
    while (c.out.size() - c.out_off < chunk && c.quota > 0) {
      mqtt::encode_publish(c.out, c.topic, payload_, 0, false, false, 0);
      --c.quota;
    }
    if (c.quota == 0 && !c.fence_sent) {
      c.fence_pid = c.take_pid();
      mqtt::encode_publish(c.out, c.topic, payload_, 1, false, false, c.fence_pid);
      ++c.in_flight;
      c.fence_sent = true;
    }
    flush(c);  // one chunk per turn, so that the clients take turns
  }

  /// Writes what it can; registers EPOLLOUT for the rest.
  void flush(client& c) {
    while (c.out_off < c.out.size()) {
      auto n = ::write(c.fd, c.out.data() + c.out_off, c.out.size() - c.out_off);
      if (n > 0) {
        c.out_off += static_cast<std::size_t>(n);
        written_ += n;
        continue;
      }
      if (n < 0 && errno == EINTR)
        continue;
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == ENOTCONN))
        break;
      lost(c, "write: " + std::string(n < 0 ? std::strerror(errno) : "0 bytes"));
    }
    if (c.out_off == c.out.size()) {
      c.out.clear();
      c.out_off = 0;
    } else if (c.out_off > (1u << 20)) {
      c.out.erase(0, c.out_off);
      c.out_off = 0;
    }
    const bool need = c.out_off < c.out.size();
    if (need != c.want_out) {
      epoll_event ev{};
      ev.events = EPOLLIN | (need ? EPOLLOUT : 0u);
      ev.data.u64 = c.tag;
      ::epoll_ctl(ep_, EPOLL_CTL_MOD, c.fd, &ev);
      c.want_out = need;
    }
  }

  [[noreturn]] void lost(const client& c, const std::string& why) {
    std::string tail;
    if (server_.proc != nullptr)
      tail = "\n" + server_.name + " output:\n" + server_.proc->output_tail(3000);
    fail(server_.name + ": connection of " + c.id + " lost: " + why + tail);
  }

  void on_readable(client& c, std::int64_t now) {
    char buf[64 * 1024];
    for (;;) {
      auto n = ::read(c.fd, buf, sizeof buf);
      if (n > 0) {
        c.reader.feed(std::string_view{buf, static_cast<std::size_t>(n)});
        for (;;) {
          auto p = c.reader.next();
          if (!p)
            lost(c, "malformed packet from the server: " + p.err().message);
          if (!*p)
            break;
          on_packet(c, **p, now);
        }
        if (static_cast<std::size_t>(n) < sizeof buf)
          break;
        continue;
      }
      if (n < 0 && errno == EINTR)
        continue;
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
        break;
      lost(c, n == 0 ? "closed by the server" : std::string(std::strerror(errno)));
    }
    if (c.dirty) {
      c.dirty = false;
      if (mode_ == mode::window)
        top_up(c);
    }
    if (!c.out.empty())
      flush(c);
  }

  void on_packet(client& c, const mqtt::packet& p, std::int64_t now) {
    if (auto* ack = std::get_if<mqtt::puback_packet>(&p)) {
      --c.in_flight;
      last_ack_ns_ = now;
      if (mode_ == mode::qos0 && ack->packet_id == c.fence_pid && c.fence_sent) {
        c.fence_acked = true;
        return;
      }
      ++acked_;
      if (mode_ == mode::paced && c.timed[ack->packet_id]) {
        samples_.push_back(static_cast<double>(now - c.sent_ns[ack->packet_id]) / 1e3);
        sample_at_.push_back(c.sent_ns[ack->packet_id]);
      }
      c.dirty = true;
    } else if (auto* pub = std::get_if<mqtt::publish_packet>(&p)) {
      ++sub_received_;
      last_delivery_ns_ = now;
      if (pub->qos == 1)
        mqtt::encode(mqtt::puback_packet{pub->packet_id}, c.out);
    } else if (auto* ca = std::get_if<mqtt::connack_packet>(&p)) {
      if (ca->return_code != mqtt::connack_code::accepted)
        lost(c, "CONNACK refused with code " + std::to_string(static_cast<int>(ca->return_code)));
      c.connacked = true;
      if (c.subscriber) {
        mqtt::subscribe_packet s;
        s.packet_id = 1;
        s.subscriptions.push_back({"devices/+/messages/events/#", 1});
        mqtt::encode(s, c.out);
      }
    } else if (auto* sa = std::get_if<mqtt::suback_packet>(&p)) {
      if (sa->return_codes.empty() || sa->return_codes[0] == mqtt::suback_failure)
        lost(c, "subscription refused");
      c.subacked = true;
    } else if (std::holds_alternative<mqtt::pingresp_packet>(p)) {
    } else {
      lost(c, std::string("unexpected ") + mqtt::to_string(mqtt::type_of(p)));
    }
  }

  /// Runs the loop until `done`; fails after 20 s without progress. With
  /// `pump`, clients with QoS 0 messages left get a turn between waits.
  void run_until(const std::function<bool()>& done, const std::string& what, bool pump = false) {
    epoll_event events[256];
    std::int64_t last_progress = now_ns();
    long last_count = -1;
    while (!done()) {
      check_stop();
      bool more = false;
      if (pump)
        for (auto& c : clients_)
          if (!c->want_out && (c->quota > 0 || !c->fence_sent)) {
            pump_qos0(*c);
            more = more || (!c->want_out && c->quota > 0);
          }
      const int n = ::epoll_wait(ep_, events, 256, more ? 0 : 100);
      if (n < 0 && errno != EINTR)
        fail("epoll_wait: " + std::string(std::strerror(errno)));
      const std::int64_t now = now_ns();
      for (int i = 0; i < n; ++i) {
        const std::uint64_t tag = events[i].data.u64;
        if (tag == timer_tag) {
          std::uint64_t expirations;
          [[maybe_unused]] auto r = ::read(timer_, &expirations, sizeof expirations);
          if (on_timer_)
            on_timer_();
          continue;
        }
        client& c = tag == subscriber_tag ? *subscriber_ : *clients_[tag];
        if (events[i].events & (EPOLLERR | EPOLLHUP | EPOLLIN))
          on_readable(c, now);
        if (events[i].events & EPOLLOUT) {
          flush(c);
          if (pump && !c.want_out)
            pump_qos0(c);
        }
      }
      const long count = acked_ + sub_received_ + written_;
      if (count != last_count) {
        last_count = count;
        last_progress = now;
      } else if (now - last_progress > 20'000'000'000) {
        std::string tail;
        if (server_.proc != nullptr) {
          server_.proc->check_alive(server_.name);
          tail = "\n" + server_.name + " output:\n" + server_.proc->output_tail(3000);
        }
        fail(server_.name + ": no progress for 20 s waiting for " + what + " (acked " +
             std::to_string(acked_) + ")" + tail);
      }
    }
  }

  /// Waits (up to `limit`) until the subscriber has `target` messages; the
  /// time the last one arrived.
  std::int64_t drain_subscriber(long target, std::chrono::milliseconds limit = 10s) {
    const auto deadline = bench_clock::now() + limit;
    epoll_event events[64];
    while (sub_received_ < target && bench_clock::now() < deadline) {
      check_stop();
      const int n = ::epoll_wait(ep_, events, 64, 50);
      const std::int64_t now = now_ns();
      for (int i = 0; i < n; ++i) {
        const std::uint64_t tag = events[i].data.u64;
        if (tag == timer_tag)
          continue;
        client& c = tag == subscriber_tag ? *subscriber_ : *clients_[tag];
        if (events[i].events & (EPOLLERR | EPOLLHUP | EPOLLIN))
          on_readable(c, now);
        if (events[i].events & EPOLLOUT)
          flush(c);
      }
    }
    return last_delivery_ns_;
  }

  /// Polls the hub's router count every millisecond until it reaches
  /// `target` (at most `limit`); the time it was first seen there.
  std::int64_t await_hub(long target, std::chrono::milliseconds limit) {
    const auto deadline = bench_clock::now() + limit;
    while (hub_delivered_() < target) {
      check_stop();
      if (bench_clock::now() >= deadline)
        break;
      std::this_thread::sleep_for(1ms);
    }
    return now_ns();
  }

  server_ref server_;
  std::string payload_;
  int ep_ = -1;
  int timer_ = -1;
  std::vector<std::unique_ptr<client>> clients_;
  std::unique_ptr<client> subscriber_;
  mode mode_ = mode::idle;
  long window_ = 0;
  long acked_ = 0;
  long sub_received_ = 0;
  long written_ = 0;  ///< bytes written to the server, for the progress check
  std::int64_t last_ack_ns_ = 0;
  std::int64_t last_delivery_ns_ = 0;
  std::vector<double> samples_;
  std::vector<std::int64_t> sample_at_;  ///< send time of each sample (for --dump-latency)
  std::function<void()> on_timer_;
  std::string dump_path_;
  std::function<long()> hub_delivered_;
  std::int64_t fence_ns_ = 0;
};

/// Everything measured against one server.
struct server_figures {
  phase_figures qos1;
  phase_figures qos0;
  latency_figures lat_1k;
  latency_figures lat_10k;
  bool measured = false;
};

struct settings {
  long messages = 200'000;
  long qos0_messages = 400'000;
  long clients = 8;
  long window = 256;
  long lat_ms_1k = 3000;
  long lat_ms_10k = 2000;
  std::string dump_latency;  ///< --dump-latency=PATH ("" = none)
};

/// The hub's router counters (over its control socket); nullopt if it does not answer.
std::optional<node_metrics> hub_metrics(const std::string& socket) {
  auto c = control_client::connect(socket);
  if (!c)
    return std::nullopt;
  auto m = c->metrics();
  if (!m)
    return std::nullopt;
  return std::move(*m);
}

/// The hub's router deliveries; -1 if it does not answer.
long hub_sent(const std::string& socket) {
  auto m = hub_metrics(socket);
  return m ? static_cast<long>(m->sent) : -1;
}

/// Prints the hub's group commits since `before` and its recent commit latency.
void print_commits(const std::string& socket, const std::optional<node_metrics>& before) {
  auto m = hub_metrics(socket);
  if (!m || !before)
    return;
  std::printf(
    "  hub: router store %llu group commits (%.0f messages delivered per commit), commit latency "
    "(recent) "
    "p50 %lld us, p99 %lld us, max %lld us\n",
    static_cast<unsigned long long>(m->commits - before->commits),
    m->commits > before->commits ? static_cast<double>(m->sent - before->sent) /
                                     static_cast<double>(m->commits - before->commits)
                                 : 0.0,
    static_cast<long long>(m->commit_p50_us), static_cast<long long>(m->commit_p99_us),
    static_cast<long long>(m->commit_max_us));
}

void print_phase(const char* server, const char* what, const phase_figures& f, long n) {
  std::printf(
    "%s %s: %ld messages in %.3f s = %.0f msg/s; CPU: server %.0f%%, generator %.0f%% of a core",
    server, what, n, f.seconds, f.msgs_per_s, f.server_cpu_pct, f.generator_cpu_pct);
  if (f.delivered >= 0)
    std::printf("; delivered %ld%s", f.delivered, f.delivered < n ? " (NOT ALL)" : "");
  if (f.fence_seconds > 0)
    std::printf("; fences acknowledged after %.3f s", f.fence_seconds);
  std::printf(" (%.1f s)\n", elapsed_s());
}

void print_latency(const char* server, int rate, const latency_figures& f) {
  std::printf(
    "%s latency at %d msg/s: p50 %.0f us, p90 %.0f us, p99 %.0f us, p99.9 %.0f us, max %.0f us "
    "over %ld "
    "samples (achieved %.0f msg/s); CPU: server %.0f%%, generator %.0f%% (%.1f s)\n",
    server, rate, f.p50_us, f.p90_us, f.p99_us, f.p999_us, f.max_us, f.samples, f.achieved_rate,
    f.server_cpu_pct, f.generator_cpu_pct, elapsed_s());
}

/// The phases against one server.
server_figures measure(const server_ref& server, const std::vector<bench::mqtt_device>& devices,
                       const settings& s) {
  server_figures f;
  load_generator gen(server, devices);
  gen.dump_latency_to(s.dump_latency);
  gen.connect_all();
  const char* name = server.name.c_str();
  std::printf("%s: %zu clients connected%s (%.1f s)\n", name, devices.size(),
              server.subscriber ? " and a subscriber" : "", elapsed_s());

  const bool hub = !server.socket.empty();
  if (hub)
    gen.count_hub_deliveries_with([socket = server.socket] { return hub_sent(socket); });
  // Warm-up (with canopy, until the hub's router has counted it all, so that
  // the phases below start from a settled count).
  gen.run_window(std::min(20'000L, s.messages), s.window);
  auto before = hub ? hub_metrics(server.socket) : std::nullopt;
  f.qos1 = gen.run_window(s.messages, s.window);
  print_phase(name, "QoS 1", f.qos1, s.messages);
  print_commits(server.socket, before);

  before = hub ? hub_metrics(server.socket) : std::nullopt;
  f.qos0 = gen.run_qos0(s.qos0_messages);
  print_phase(name, "QoS 0", f.qos0, s.qos0_messages);
  print_commits(server.socket, before);

  before = hub ? hub_metrics(server.socket) : std::nullopt;
  f.lat_1k = gen.run_paced(1000, std::chrono::milliseconds{s.lat_ms_1k});
  print_latency(name, 1000, f.lat_1k);
  print_commits(server.socket, before);
  before = hub ? hub_metrics(server.socket) : std::nullopt;
  f.lat_10k = gen.run_paced(10000, std::chrono::milliseconds{s.lat_ms_10k});
  print_latency(name, 10000, f.lat_10k);
  print_commits(server.socket, before);
  f.measured = true;
  return f;
}

double ratio(double a, double b) {
  return b > 0 ? a / b : 0;
}

int run(int argc, char** argv) {
  settings s;
  s.messages = option(argc, argv, "messages", s.messages);
  s.qos0_messages = option(argc, argv, "qos0-messages", 2 * s.messages);
  s.clients = option(argc, argv, "clients", s.clients);
  s.window = option(argc, argv, "window", s.window);
  s.lat_ms_1k = static_cast<long>(option(argc, argv, "lat-seconds-1k", 3) * 1000);
  s.lat_ms_10k = static_cast<long>(option(argc, argv, "lat-seconds-10k", 2) * 1000);
  if (s.messages < s.clients || s.qos0_messages < s.clients || s.clients < 1 || s.clients > 1000 ||
      s.window < 1 || s.window > 60000 || s.lat_ms_1k < 100 || s.lat_ms_10k < 100)
    fail(
      "bad arguments: --clients 1..1000, --messages and --qos0-messages >= --clients, --window "
      "1..60000, "
      "--lat-seconds-* >= 1");
  s.dump_latency = bench::string_option(argc, argv, "dump-latency", "");
  auto servers = bench::mqtt_servers_from_options(argc, argv, CANOPY_BIN);
  const bool run_canopy = servers.run_canopy, run_mosquitto = servers.run_mosquitto;
  const std::string canopy = servers.canopy, mosquitto = servers.mosquitto;
  const std::vector<std::string> hub_args = servers.hub_args;
  bench::install_stop_handler();
  ::signal(SIGPIPE, SIG_IGN);
  ::prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0);  // paced sends on time, not 50 us late

  const auto devices = bench::make_mqtt_devices(s.clients);
  test::temp_dir dir("cnbq");
  std::printf(
    "bench-mqtt: %ld clients, QoS 1 window %ld, %ld QoS 1 + %ld QoS 0 messages of %zu bytes\n",
    s.clients, s.window, s.messages, s.qos0_messages, payload_size);

  server_figures mq, cn;
  if (run_mosquitto) {
    bench::mosquitto_options o;
    o.port = bench::free_port();
    auto broker = bench::start_mosquitto(mosquitto, dir.path(), "mosquitto", o);
    server_ref ref{
      "mosquitto", o.port, broker->pid(), broker.get(), option(argc, argv, "subscriber", 1) != 0,
      ""};
    mq = measure(ref, devices, s);
    broker->check_alive("mosquitto");
  }
  if (run_canopy) {
    const std::string certs_dir = dir.file("certs");
    const auto ca = bench::make_fleet_ca(certs_dir);
    bench::issue_cert(ca, certs_dir, bench::mqtt_hub_id);
    bench::canopy_hub_options o;
    o.canopy = canopy;
    o.certs_dir = certs_dir;
    o.data_dir = dir.file("hub");
    o.socket = dir.file("hub.sock");
    o.mqtt_port = bench::free_port();
    o.plain = true;
    o.extra = hub_args;
    bench::register_mqtt_devices(o.data_dir, bench::mqtt_hub_id, devices);
    auto hub = bench::start_canopy_hub(o);
    std::printf("canopy: hub up (%.1f s)\n", elapsed_s());
    server_ref ref{"canopy", o.mqtt_port, hub->pid(), hub.get(), false, o.socket};
    cn = measure(ref, devices, s);
    hub->check_alive("the canopy hub");
  }

  const double qos1_ratio = ratio(cn.qos1.msgs_per_s, mq.qos1.msgs_per_s);
  const double qos0_ratio = ratio(cn.qos0.msgs_per_s, mq.qos0.msgs_per_s);
  auto accepted = [](const phase_figures& f) {
    return f.fence_seconds > 0 ? static_cast<double>(f.count) / f.fence_seconds : 0;
  };
  std::printf(
    "RESULT bench-mqtt qos1_msgs_per_s=%.0f mosquitto_qos1_msgs_per_s=%.0f qos1_ratio=%.2f "
    "qos0_msgs_per_s=%.0f mosquitto_qos0_msgs_per_s=%.0f qos0_ratio=%.2f "
    "p50_1k_us=%.0f p99_1k_us=%.0f mosquitto_p50_1k_us=%.0f mosquitto_p99_1k_us=%.0f "
    "p50_10k_us=%.0f p99_10k_us=%.0f mosquitto_p50_10k_us=%.0f mosquitto_p99_10k_us=%.0f "
    "qos0_accepted_msgs_per_s=%.0f mosquitto_qos0_accepted_msgs_per_s=%.0f "
    "clients=%ld window=%ld messages=%ld ratio=%.2f\n",
    cn.qos1.msgs_per_s, mq.qos1.msgs_per_s, qos1_ratio, cn.qos0.msgs_per_s, mq.qos0.msgs_per_s,
    qos0_ratio, cn.lat_1k.p50_us, cn.lat_1k.p99_us, mq.lat_1k.p50_us, mq.lat_1k.p99_us,
    cn.lat_10k.p50_us, cn.lat_10k.p99_us, mq.lat_10k.p50_us, mq.lat_10k.p99_us, accepted(cn.qos0),
    accepted(mq.qos0), s.clients, s.window, s.messages, qos1_ratio);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  return bench::run_main(bench_name, run, argc, argv);
}
