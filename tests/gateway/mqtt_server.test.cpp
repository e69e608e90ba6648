// The MQTT port's network side (gateway/mqtt_server.hpp) against a scripted
// host and sessions, with a plain-socket client on loopback speaking the codec.
#include "gateway/mqtt_server.hpp"

#include "gateway/io_thread.hpp"
#include "gateway/mqtt_codec.hpp"
#include "gateway/ossl_tls.hpp"
#include "temp_dir.hpp"
#include "test_certs.hpp"

#include <catch2/catch.hpp>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

using namespace canopy;
using namespace std::chrono_literals;

namespace {

/// What the scripted sessions saw, shared with the test thread.
struct journal {
  std::mutex mtx;
  std::condition_variable cv;
  std::vector<mqtt_connect_info> connects;
  std::vector<std::string> published;  // topics, in the order the session got them
  std::vector<std::function<void()>> held;  // publish answers the test releases
  std::vector<std::uint16_t> acked;
  std::vector<std::vector<mqtt::subscription>> subscribed;
  std::optional<std::pair<std::string, bool>> closed;  // reason, clean
  std::shared_ptr<mqtt_channel> channel;

  template <class Pred>
  bool wait(Pred pred, std::chrono::milliseconds limit = 5s) {
    std::unique_lock<std::mutex> lock{mtx};
    return cv.wait_for(lock, limit, pred);
  }
};

class scripted_session final : public mqtt_session {
 public:
  scripted_session(std::shared_ptr<journal> j, bool hold) : j_(std::move(j)), hold_(hold) {}

  void publish(std::vector<mqtt::publish_packet> batch,
               std::function<void(std::vector<mqtt_publish_result>)> done) override {
    std::vector<mqtt_publish_result> results;
    for (auto& p : batch) {
      if (p.topic == "refuse")
        results.emplace_back(make_error(errc::invalid_argument, "topic 'refuse' is not allowed"));
      else
        results.emplace_back();
    }
    std::lock_guard<std::mutex> lock{j_->mtx};
    for (auto& p : batch)
      j_->published.push_back(p.topic);
    if (hold_)
      j_->held.push_back([done = std::move(done), results = std::move(results)]() mutable { done(std::move(results)); });
    else
      done(std::move(results));
    j_->cv.notify_all();
  }
  void subscribe(std::vector<mqtt::subscription> filters, reply_fn<std::vector<std::uint8_t>> done) override {
    std::vector<std::uint8_t> codes;
    for (auto& f : filters)
      codes.push_back(f.filter.rfind("allowed/", 0) == 0 ? std::uint8_t{1} : mqtt::suback_failure);
    {
      std::lock_guard<std::mutex> lock{j_->mtx};
      j_->subscribed.push_back(std::move(filters));
      j_->cv.notify_all();
    }
    done(std::move(codes));
  }
  void unsubscribe(std::vector<std::string>, reply_fn<void> done) override { done(expected<void>{}); }
  void acked(std::uint16_t packet_id) override {
    std::lock_guard<std::mutex> lock{j_->mtx};
    j_->acked.push_back(packet_id);
    j_->cv.notify_all();
  }
  void closed(std::string reason, bool clean) override {
    std::lock_guard<std::mutex> lock{j_->mtx};
    j_->closed.emplace(std::move(reason), clean);
    j_->cv.notify_all();
  }

 private:
  std::shared_ptr<journal> j_;
  bool hold_;
};

/// Accepts client ids that start with "ok", refuses the others.
class scripted_host final : public mqtt_host {
 public:
  explicit scripted_host(std::shared_ptr<journal> j) : j_(std::move(j)) {}
  bool hold = false;

  void connect(mqtt_connect_info info, std::shared_ptr<mqtt_channel> channel,
               std::function<void(std::variant<mqtt_accept, mqtt_refusal>)> done) override {
    const bool ok = info.packet.client_id.rfind("ok", 0) == 0;
    {
      std::lock_guard<std::mutex> lock{j_->mtx};
      j_->connects.push_back(info);
      j_->channel = channel;
      j_->cv.notify_all();
    }
    if (!ok) {
      done(mqtt_refusal{mqtt::connack_code::bad_user_name_or_password, "wrong key for " + info.packet.client_id});
      return;
    }
    done(mqtt_accept{std::make_shared<scripted_session>(j_, hold), false});
  }

 private:
  std::shared_ptr<journal> j_;
};

/// A blocking MQTT client on a plain socket.
class test_client {
 public:
  explicit test_client(std::uint16_t port) : reader_(1 << 20) {
    fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    REQUIRE(::connect(fd_, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
  }
  ~test_client() { ::close(fd_); }

  void send_raw(const std::string& bytes) {
    std::size_t off = 0;
    while (off < bytes.size()) {
      auto n = ::send(fd_, bytes.data() + off, bytes.size() - off, MSG_NOSIGNAL);
      if (n <= 0)
        return;  // the server hung up: the test checks what it got
      off += static_cast<std::size_t>(n);
    }
  }
  void send(const mqtt::packet& p) { send_raw(mqtt::encode(p)); }

  /// The next packet, or nullopt if none came within `limit` or the server closed.
  std::optional<mqtt::packet> next(std::chrono::milliseconds limit = 5s) {
    const auto until = std::chrono::steady_clock::now() + limit;
    for (;;) {
      auto r = reader_.next();
      REQUIRE(r.ok());
      if (*r)
        return std::move(**r);
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(until - std::chrono::steady_clock::now());
      if (left.count() <= 0)
        return std::nullopt;
      pollfd pfd{fd_, POLLIN, 0};
      if (::poll(&pfd, 1, static_cast<int>(left.count())) <= 0)
        return std::nullopt;
      char buf[4096];
      auto n = ::recv(fd_, buf, sizeof buf, 0);
      if (n <= 0) {
        eof_ = true;
        return std::nullopt;
      }
      reader_.feed(std::string_view(buf, static_cast<std::size_t>(n)));
    }
  }

  /// True once the server closed the connection (within `limit`).
  bool closed_by_server(std::chrono::milliseconds limit = 5s) {
    while (!eof_) {
      if (!next(limit) && !eof_)
        return false;
    }
    return true;
  }

  template <class T>
  T expect(std::chrono::milliseconds limit = 5s) {
    auto p = next(limit);
    REQUIRE(p.has_value());
    REQUIRE(std::holds_alternative<T>(*p));
    return std::get<T>(*p);
  }

  mqtt::connack_packet connect(const std::string& client_id, std::uint16_t keep_alive = 0) {
    mqtt::connect_packet c;
    c.client_id = client_id;
    c.keep_alive_s = keep_alive;
    c.username = "hub.example/" + client_id + "/?api-version=2021-04-12";
    c.password = "SharedAccessSignature sr=x&sig=y&se=1";
    send(mqtt::packet{c});
    return expect<mqtt::connack_packet>();
  }

 private:
  int fd_ = -1;
  mqtt::frame_reader reader_;
  bool eof_ = false;
};

mqtt::publish_packet pub(std::string topic, std::uint8_t qos, std::uint16_t id) {
  mqtt::publish_packet p;
  p.topic = std::move(topic);
  p.payload = "{\"t\":21.5}";
  p.qos = qos;
  p.packet_id = id;
  return p;
}

struct fixture {
  std::shared_ptr<journal> j = std::make_shared<journal>();
  scripted_host host{j};
  io_thread io;
  std::unique_ptr<mqtt_server> server;

  explicit fixture(mqtt_limits limits = {}, const tls_server_context* tls = nullptr) {
    REQUIRE(io.start().ok());
    mqtt_server_options o;
    o.listen = "127.0.0.1:0";
    o.limits = limits;
    o.tls = tls;
    server = std::make_unique<mqtt_server>(o, host);
    REQUIRE(server->start(io).ok());
  }
  ~fixture() {
    server->stop();
    io.stop();
  }
  std::uint16_t port() const { return server->port(); }
};

}  // namespace

TEST_CASE("mqtt server: CONNECT goes to the host; an accepted client's publishes reach its session in order",
          "[mqtt_server]") {
  fixture f;
  test_client c{f.port()};
  auto ack = c.connect("ok-dev-1", 60);
  CHECK(ack.return_code == mqtt::connack_code::accepted);
  CHECK_FALSE(ack.session_present);
  {
    std::lock_guard<std::mutex> lock{f.j->mtx};
    REQUIRE(f.j->connects.size() == 1);
    const auto& info = f.j->connects[0];
    CHECK(info.packet.client_id == "ok-dev-1");
    CHECK(info.packet.username == std::optional<std::string>("hub.example/ok-dev-1/?api-version=2021-04-12"));
    CHECK(info.packet.password == std::optional<std::string>("SharedAccessSignature sr=x&sig=y&se=1"));
    CHECK(info.packet.keep_alive_s == 60);
    CHECK_FALSE(info.tls);
    CHECK_THAT(info.peer_address, Catch::StartsWith("127.0.0.1:"));
  }
  // Several packets in one write: one batch, PUBACKs in order for the QoS 1 ones.
  c.send_raw(mqtt::encode(mqtt::packet{pub("t/1", 1, 11)}) + mqtt::encode(mqtt::packet{pub("t/2", 0, 0)}) +
             mqtt::encode(mqtt::packet{pub("t/3", 1, 13)}));
  CHECK(c.expect<mqtt::puback_packet>().packet_id == 11);
  CHECK(c.expect<mqtt::puback_packet>().packet_id == 13);
  std::lock_guard<std::mutex> lock{f.j->mtx};
  CHECK(f.j->published == std::vector<std::string>{"t/1", "t/2", "t/3"});
}

TEST_CASE("mqtt server: a PUBACK goes out only once the session answered, and answers keep the publish order",
          "[mqtt_server]") {
  fixture f;
  f.host.hold = true;
  test_client c{f.port()};
  REQUIRE(c.connect("ok-dev").return_code == mqtt::connack_code::accepted);
  c.send(mqtt::packet{pub("a", 1, 1)});
  REQUIRE(f.j->wait([&] { return f.j->held.size() == 1; }));
  c.send(mqtt::packet{pub("b", 1, 2)});
  REQUIRE(f.j->wait([&] { return f.j->held.size() == 2; }));
  CHECK_FALSE(c.next(200ms).has_value());  // nothing acknowledged yet
  // The second batch is answered first: its PUBACK still waits for the first.
  std::function<void()> first, second;
  {
    std::lock_guard<std::mutex> lock{f.j->mtx};
    first = f.j->held[0];
    second = f.j->held[1];
  }
  second();
  CHECK_FALSE(c.next(200ms).has_value());
  first();
  CHECK(c.expect<mqtt::puback_packet>().packet_id == 1);
  CHECK(c.expect<mqtt::puback_packet>().packet_id == 2);
}

TEST_CASE("mqtt server: a refused CONNECT gets its CONNACK code and the connection closes", "[mqtt_server]") {
  fixture f;
  test_client c{f.port()};
  auto ack = c.connect("stranger");
  CHECK(ack.return_code == mqtt::connack_code::bad_user_name_or_password);
  CHECK(c.closed_by_server());
}

TEST_CASE("mqtt server: protocol violations close the connection with a reason", "[mqtt_server]") {
  SECTION("the first packet is not CONNECT") {
    fixture f;
    test_client c{f.port()};
    c.send(mqtt::packet{mqtt::pingreq_packet{}});
    CHECK(c.closed_by_server());
    std::lock_guard<std::mutex> lock{f.j->mtx};
    CHECK(f.j->connects.empty());
  }
  SECTION("MQTT 3.1 (MQIsdp) gets CONNACK 0x01") {
    fixture f;
    test_client c{f.port()};
    mqtt::connect_packet old;
    old.protocol_name = "MQIsdp";
    old.protocol_level = 3;
    old.client_id = "ok-old";
    c.send(mqtt::packet{old});
    CHECK(c.expect<mqtt::connack_packet>().return_code == mqtt::connack_code::unacceptable_protocol_version);
    CHECK(c.closed_by_server());
  }
  SECTION("a packet larger than the maximum") {
    mqtt_limits limits;
    limits.max_packet_bytes = 1024;
    fixture f{limits};
    test_client c{f.port()};
    REQUIRE(c.connect("ok-big").return_code == mqtt::connack_code::accepted);
    auto big = pub("t", 0, 0);
    big.payload.assign(4096, 'x');
    c.send(mqtt::packet{big});
    CHECK(c.closed_by_server());
    REQUIRE(f.j->wait([&] { return f.j->closed.has_value(); }));
    std::lock_guard<std::mutex> lock{f.j->mtx};
    CHECK_THAT(f.j->closed->first, Catch::Contains("exceeds the maximum of 1024"));
    CHECK_FALSE(f.j->closed->second);
  }
  SECTION("QoS 2") {
    fixture f;
    test_client c{f.port()};
    REQUIRE(c.connect("ok-q2").return_code == mqtt::connack_code::accepted);
    c.send(mqtt::packet{pub("t", 2, 5)});
    CHECK(c.closed_by_server());
    REQUIRE(f.j->wait([&] { return f.j->closed.has_value(); }));
    std::lock_guard<std::mutex> lock{f.j->mtx};
    CHECK_THAT(f.j->closed->first, Catch::Contains("QoS 2 is not supported"));
  }
  SECTION("a publish the session refuses") {
    fixture f;
    test_client c{f.port()};
    REQUIRE(c.connect("ok-r").return_code == mqtt::connack_code::accepted);
    c.send(mqtt::packet{pub("refuse", 1, 7)});
    CHECK(c.closed_by_server());
    REQUIRE(f.j->wait([&] { return f.j->closed.has_value(); }));
    std::lock_guard<std::mutex> lock{f.j->mtx};
    CHECK_THAT(f.j->closed->first, Catch::Contains("topic 'refuse' is not allowed"));
  }
  SECTION("a second CONNECT") {
    fixture f;
    test_client c{f.port()};
    REQUIRE(c.connect("ok-twice").return_code == mqtt::connack_code::accepted);
    mqtt::connect_packet again;
    again.client_id = "ok-twice";
    c.send(mqtt::packet{again});
    CHECK(c.closed_by_server());
  }
}

TEST_CASE("mqtt server: subscribe, ping, server-to-client publishes and their acknowledgements", "[mqtt_server]") {
  fixture f;
  test_client c{f.port()};
  REQUIRE(c.connect("ok-sub").return_code == mqtt::connack_code::accepted);
  mqtt::subscribe_packet s;
  s.packet_id = 3;
  s.subscriptions = {{"allowed/#", 1}, {"other/#", 1}};
  c.send(mqtt::packet{s});
  auto suback = c.expect<mqtt::suback_packet>();
  CHECK(suback.packet_id == 3);
  CHECK(suback.return_codes == std::vector<std::uint8_t>{1, mqtt::suback_failure});
  c.send(mqtt::packet{mqtt::pingreq_packet{}});
  c.expect<mqtt::pingresp_packet>();
  // The session reaches the client through its channel, from any thread.
  std::shared_ptr<mqtt_channel> channel;
  {
    std::lock_guard<std::mutex> lock{f.j->mtx};
    channel = f.j->channel;
  }
  REQUIRE(channel != nullptr);
  std::thread([&] { channel->publish(pub("allowed/x", 1, 42)); }).join();
  auto got = c.expect<mqtt::publish_packet>();
  CHECK(got.topic == "allowed/x");
  CHECK(got.packet_id == 42);
  c.send(mqtt::packet{mqtt::puback_packet{42}});
  REQUIRE(f.j->wait([&] { return !f.j->acked.empty(); }));
  // DISCONNECT: a clean end.
  c.send(mqtt::packet{mqtt::disconnect_packet{}});
  REQUIRE(f.j->wait([&] { return f.j->closed.has_value(); }));
  std::lock_guard<std::mutex> lock{f.j->mtx};
  CHECK(f.j->acked == std::vector<std::uint16_t>{42});
  CHECK(f.j->closed->second);
}

TEST_CASE("mqtt server: a client that goes silent is dropped after 1.5 keep-alive periods; one that never "
          "connects after connect_timeout",
          "[mqtt_server]") {
  mqtt_limits limits;
  limits.connect_timeout = 300ms;
  fixture f{limits};
  test_client quiet{f.port()};
  CHECK(quiet.closed_by_server(3s));
  test_client c{f.port()};
  REQUIRE(c.connect("ok-ka", 1).return_code == mqtt::connack_code::accepted);
  CHECK(c.closed_by_server(4s));
  REQUIRE(f.j->wait([&] { return f.j->closed.has_value(); }));
  std::lock_guard<std::mutex> lock{f.j->mtx};
  CHECK_THAT(f.j->closed->first, Catch::Contains("keep-alive"));
  CHECK_FALSE(f.j->closed->second);
}

TEST_CASE("mqtt server: stop closes every client and each session hears of it", "[mqtt_server]") {
  fixture f;
  test_client c{f.port()};
  REQUIRE(c.connect("ok-stop").return_code == mqtt::connack_code::accepted);
  CHECK(f.server->connections() == 1);
  f.server->stop();
  CHECK(c.closed_by_server());
  std::lock_guard<std::mutex> lock{f.j->mtx};
  REQUIRE(f.j->closed.has_value());
  CHECK_THAT(f.j->closed->first, Catch::Contains("stopping"));
}

TEST_CASE("mqtt server: over TLS, mosquitto_pub connects with or without a client certificate and the host "
          "sees the certificate",
          "[mqtt_server]") {
  canopy::unit_test::temp_dir dir{"canopy-mqtt-tls"};
  const auto server_id = canopy::unit_test::issue("gw-1");
  const auto device = canopy::unit_test::issue("ok-x509");
  auto write = [&](const std::string& name, const std::string& text) {
    std::ofstream{dir.path + "/" + name} << text;
    return dir.path + "/" + name;
  };
  const auto ca = write("ca.crt", canopy::unit_test::fleet_ca().cert_pem);
  const auto cert = write("dev.crt", device.cert_pem);
  const auto key = write("dev.key", device.key_pem);
  auto tls = tls_server_context::from_pem(server_id, canopy::unit_test::fleet_ca().cert_pem);
  REQUIRE(tls.ok());
  fixture f{{}, tls->get()};
  // --insecure: the server's certificate names "gw-1", not 127.0.0.1; the
  // chain is still checked against --cafile.
  const std::string common = "mosquitto_pub -h 127.0.0.1 -p " + std::to_string(f.port()) + " --cafile " + ca +
                             " --insecure -q 1 -m hello ";
  auto run = [&](const std::string& args) {
    return std::system((common + args + " > " + dir.path + "/out.txt 2>&1").c_str());
  };
  CHECK(run("--cert " + cert + " --key " + key + " -i ok-x509 -t devices/ok-x509/messages/events/") == 0);
  CHECK(run("-i ok-sas -u hub/ok-sas/?api-version=2021-04-12 -P token -t devices/ok-sas/messages/events/") == 0);
  // Plain MQTT on the TLS port is refused (CONNACK 5) before the host
  // sees it, and the connection closes.
  test_client plain{f.port()};
  mqtt::connect_packet c;
  c.client_id = "ok-plain";
  plain.send(mqtt::packet{c});
  CHECK(plain.expect<mqtt::connack_packet>().return_code == mqtt::connack_code::not_authorized);
  CHECK(plain.closed_by_server());
  std::lock_guard<std::mutex> lock{f.j->mtx};
  REQUIRE(f.j->connects.size() == 2);
  const auto& with_cert = f.j->connects[0];
  CHECK(with_cert.tls);
  CHECK(with_cert.cert_cn == "ok-x509");
  CHECK(with_cert.cert_chain_ok);
  CHECK(with_cert.cert_thumbprint.size() == 64);
  CHECK(with_cert.cert_thumbprint_sha1.size() == 40);
  const auto& without = f.j->connects[1];
  CHECK(without.tls);
  CHECK(without.cert_cn.empty());
  CHECK(without.packet.password == std::optional<std::string>("token"));
  CHECK(f.j->published == std::vector<std::string>{"devices/ok-x509/messages/events/", "devices/ok-sas/messages/events/"});
}
