// Integration: devices and process modules over MQTT (issue 5), driven with
// clients nobody here wrote — Debian's mosquitto_pub / mosquitto_sub and
// Python paho (mqtt_clients/azure_device.py, a device written for Azure IoT
// Hub's MQTT protocol whose SAS tokens are made the way Azure's SDKs make
// them) — against real `canopy` processes on loopback: a hub, a gateway
// linked to it over mutually authenticated TLS serving MQTT to its leaf
// devices, and a node running process modules.
//
// The hub, gw-a and their registry are shared by the test cases tagged
// [mqtt-gw] (started by the first of them to run, killed when the program
// exits): starting a fleet costs seconds. The cases connect as leaf1 one
// after another; none leaves a connection or a persistent session behind,
// and none depends on another's outcome (message ids and twin keys differ).
#include "integration/fleet.hpp"
#include "integration/process.hpp"

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <csignal>
#include <cstdio>
#include <ctime>
#include <functional>
#include <map>
#include <memory>
#include <regex>
#include <sstream>
#include <string>
#include <vector>

using namespace canopy::test;
using namespace std::chrono_literals;

namespace {

// --- Clients and their output --------------------------------------------------------

/// Debian's Python (the python3 on a developer's PATH may lack paho).
const std::string python = "/usr/bin/python3";
const std::string mosquitto_pub = "/usr/bin/mosquitto_pub";
const std::string mosquitto_sub = "/usr/bin/mosquitto_sub";

/// The host name SAS tokens are signed for (the nodes' --hub-host).
const std::string hub_host = "canopy-hub.test";
const std::string api_version = "2021-04-12";

// The devices' SAS keys (32 bytes, base64), as an operator gives them to `device create`.
const std::string leaf1_key = "bGVhZjEgcHJpbWFyeSBrZXkgZm9yIHRoZSB0ZXN0cy4=";
const std::string leaf2_key = "bGVhZjIgcHJpbWFyeSBrZXkgZm9yIHRoZSB0ZXN0cy4=";
const std::string leaf6_key = "bGVhZjYgcHJpbWFyeSBrZXkgZm9yIHRoZSB0ZXN0cy4=";
const std::string leafhub_key = "bGVhZmh1YiBwcmltYXJ5IGtleSwgdGhlIHRlc3RzLi4=";
const std::string nobodys_key = "YSBrZXkgbm9ib2R5IHdhcyBldmVyIGdpdmVuLi4uLg==";

std::string user_name(const std::string& identity) {
  return hub_host + "/" + identity + "/?api-version=" + api_version;
}

/// The JSON event lines azure_device.py printed (other lines skipped).
std::vector<nlohmann::json> events_of(const std::string& output) {
  std::vector<nlohmann::json> out;
  std::istringstream in{output};
  for (std::string line; std::getline(in, line);) {
    auto j = nlohmann::json::parse(line, nullptr, false);
    if (!j.is_discarded() && j.is_object() && j.contains("event"))
      out.push_back(std::move(j));
  }
  return out;
}

/// The first event named `name`, or an empty object.
nlohmann::json event_of(const std::string& output, const std::string& name) {
  for (auto& e : events_of(output))
    if (e.value("event", "") == name)
      return e;
  return nlohmann::json::object();
}

/// The value at JSON pointer `pointer` ("/a/b") in `j`, or null when there
/// is none (never throws, so a check on a missing field fails cleanly).
nlohmann::json at(const nlohmann::json& j, const std::string& pointer) {
  nlohmann::json::json_pointer p{pointer};
  return j.contains(p) ? j.at(p) : nlohmann::json{};
}

/// The string at `pointer` in `j`, or "".
std::string text_at(const nlohmann::json& j, const std::string& pointer) {
  auto v = at(j, pointer);
  return v.is_string() ? v.get<std::string>() : std::string{};
}

/// The last `n` bytes of a node's log, for a failure message.
std::string tail(const std::string& text, std::size_t n = 6000) {
  return text.size() <= n ? text : "...\n" + text.substr(text.size() - n);
}

/// Where a node serves MQTT and how a client reaches it.
struct mqtt_endpoint {
  int port = 0;
  bool tls = true;
  std::string ca;  ///< the trust root of the node's server certificate
};

/// The script's path.
std::string azure_device_script(const canopy_paths& paths) {
  return paths.source_root + "/tests/integration/mqtt_clients/azure_device.py";
}

/// argv of azure_device.py as `device` at `ep`: common `options`, then `command`.
std::vector<std::string> device_argv(const canopy_paths& paths, const mqtt_endpoint& ep,
                                     const std::string& device,
                                     const std::vector<std::string>& options,
                                     const std::vector<std::string>& command) {
  std::vector<std::string> argv{python,       azure_device_script(paths),
                                "--port",     std::to_string(ep.port),
                                "--hub-host", hub_host,
                                "--device",   device};
  if (ep.tls) {
    argv.insert(argv.end(), {"--tls", "--ca", ep.ca});
  }
  argv.insert(argv.end(), options.begin(), options.end());
  argv.insert(argv.end(), command.begin(), command.end());
  return argv;
}

/// A SAS token made by azure_device.py (as Azure's SDKs make one).
std::string sas_token(const canopy_paths& paths, const std::string& device, const std::string& key,
                      const std::vector<std::string>& options = {}) {
  std::vector<std::string> argv{
    python, azure_device_script(paths), "--hub-host", hub_host, "--device", device, "--key", key};
  argv.insert(argv.end(), options.begin(), options.end());
  argv.push_back("sas");
  auto r = run(argv, 20s);
  INFO(r.output);
  REQUIRE(r.exit_code == 0);
  auto token = r.output.substr(0, r.output.find('\n'));
  REQUIRE(token.rfind("SharedAccessSignature sr=", 0) == 0);
  return token;
}

/// The clients the tests rely on are installed (Debian's mosquitto-clients and python3-paho-mqtt).
void require_clients() {
  auto r = run({python, "-c", "import paho.mqtt.client"}, 20s);
  INFO("needs Debian's python3-paho-mqtt for /usr/bin/python3: " << r.output);
  REQUIRE(r.exit_code == 0);
  REQUIRE(::access(mosquitto_pub.c_str(), X_OK) == 0);
  REQUIRE(::access(mosquitto_sub.c_str(), X_OK) == 0);
}

/// Waits until `node` logged `needle` after byte `from` of its output.
bool logged_since(const canopy_node& node, std::size_t from, const std::string& needle,
                  std::chrono::milliseconds timeout = 10s) {
  return wait_until(
    [&] {
      auto out = node.output();
      return out.size() > from && out.find(needle, from) != std::string::npos;
    },
    timeout, 50ms);
}

// --- A fleet: certificates, hub, gateways ------------------------------------------------


/// The hub's telemetry record of `device` with message id `mid`, or null.
nlohmann::json record_with_mid(const nlohmann::json& records, const std::string& mid) {
  for (auto& r : records)
    if (at(r, "/systemProperties/messageId") == mid)
      return r;
  return {};
}



/// Starts gateway `id` under the hub, serving MQTT over TLS on `mqtt_port`.
void start_mqtt_gateway(canopy_node& gw, const std::string& id, const fleet_certs& certs,
                        int parent_port, int mqtt_port) {
  gw.start("",
           {"--device-id", id, "--certs", certs.dir(), "--parent", loopback(parent_port),
            "--parent-id", "hub", "--mqtt-listen", loopback(mqtt_port), "--hub-host", hub_host});
  REQUIRE(gw.wait_ready());
}

/// Waits until `device` (SAS, `key`) is admitted at `ep`: a gateway learns
/// its children from its parent's registry scope, a moment after its link is up.
bool wait_admitted(const canopy_paths& paths, const mqtt_endpoint& ep, const std::string& device,
                   const std::string& key, std::chrono::milliseconds timeout = 30s) {
  return wait_until(
    [&] {
      return run(device_argv(paths, ep, device, {"--key", key, "--timeout", "5"}, {"connect"}), 20s)
               .exit_code == 0;
    },
    timeout, 250ms);
}

/// The fleet the [mqtt-gw] cases share: hub, gw-a (MQTT over TLS) and the
/// devices of gw-a.
struct gateway_fleet {
  canopy_paths paths = canopy_paths::from_env();
  fleet_certs certs{paths};
  fleet_certs rogue{paths};  // another fleet's CA, which issues a "leafx" too
  temp_dir self_signed{"cns"};
  hub_node hub{paths, certs};
  canopy_node gw{paths};
  mqtt_endpoint ep;
  std::string leaftp_thumbprint;

  gateway_fleet() {
    require_clients();
    certs.issue("hub");
    certs.issue("gw-a");
    certs.issue("leafx");
    rogue.issue("leafx");
    // A self-signed certificate for the device known by its thumbprint.
    auto tp =
      run({paths.canopyctl, "certs", "ca", "--out", self_signed.path(), "--cn", "leaftp"}, 30s);
    INFO(tp.output);
    REQUIRE(tp.exit_code == 0);
    std::smatch m;
    REQUIRE(std::regex_search(tp.output, m, std::regex{"SHA-256 ([0-9A-Fa-f]{64})"}));
    leaftp_thumbprint = m[1];

    hub.start();
    hub.must({"device", "create", "gw-a", "--parent", "hub", "--kind", "gateway"});
    for (auto& [id, key] : std::vector<std::pair<std::string, std::string>>{{"leaf1", leaf1_key},
                                                                            {"leaf2", leaf2_key}})
      hub.must({"device", "create", id, "--parent", "gw-a", "--kind", "device", "--auth", "sas",
                "--primary-key", key});
    hub.must(
      {"device", "create", "leafx", "--parent", "gw-a", "--kind", "device", "--auth", "x509_ca"});
    hub.must({"device", "create", "leaftp", "--parent", "gw-a", "--kind", "device", "--auth",
              "x509_thumbprint", "--thumbprint", leaftp_thumbprint});
    // A device of the hub itself: not gw-a's to admit.
    hub.must({"device", "create", "leafhub", "--kind", "device", "--auth", "sas", "--primary-key",
              leafhub_key});

    ep.port = free_port();
    ep.ca = certs.ca();
    start_mqtt_gateway(gw, "gw-a", certs, hub.link_port, ep.port);
    bool up = wait_until([&] { return link_up(gw, "parent", "hub"); }, 30s, 100ms);
    if (!up)
      std::fprintf(stderr, "gw-a log:\n%s\n", tail(gw.output()).c_str());
    REQUIRE(up);
    bool admitted = wait_admitted(paths, ep, "leaf1", leaf1_key);
    if (!admitted)
      std::fprintf(stderr, "gw-a log:\n%s\n", tail(gw.output()).c_str());
    REQUIRE(admitted);
  }

  /// azure_device.py as leaf1 (SAS) against gw-a.
  std::vector<std::string> leaf1(const std::vector<std::string>& command,
                                 const std::vector<std::string>& options = {}) const {
    std::vector<std::string> o{"--key", leaf1_key};
    o.insert(o.end(), options.begin(), options.end());
    return device_argv(paths, ep, "leaf1", o, command);
  }

  /// Prints gw-a's recent log when `ok` is false (shared nodes outlive a failed case).
  bool explain(bool ok, const char* what) const {
    if (!ok)
      std::fprintf(stderr, "---- %s: gw-a's log ----\n%s\n---- hub's log ----\n%s\n---- end ----\n",
                   what, tail(gw.output()).c_str(), tail(hub.node.output(), 3000).c_str());
    return ok;
  }
};

/// The shared fleet, started on first use; its nodes are killed when the program exits.
gateway_fleet& shared_fleet() {
  static std::unique_ptr<gateway_fleet> fleet;
  if (!fleet)
    fleet = std::make_unique<gateway_fleet>();
  return *fleet;
}

/// A child process's output once it has printed `needle` (bounded).
bool wait_output(child_process& p, const std::string& needle,
                 std::chrono::milliseconds timeout = 20s) {
  return wait_until([&] { return p.output().find(needle) != std::string::npos || !p.running(); },
                    timeout, 20ms) &&
         p.output().find(needle) != std::string::npos;
}

}  // namespace

// --- 1. Telemetry --------------------------------------------------------------------------

TEST_CASE("a leaf device's telemetry over MQTT reaches the hub with its properties",
          "[mqtt][mqtt-gw]") {
  auto& f = shared_fleet();
  auto& hub = f.hub;

  // paho, as an IoT Hub device: QoS 1, system and application properties in the bag.
  auto sent = run(f.leaf1({"telemetry", "--count", "3", "--mid-prefix", "s1-", "--prop",
                           "app=canopy", "--prop", "colour=dark blue"}),
                  60s);
  INFO(sent.output);
  REQUIRE(f.explain(sent.exit_code == 0, "paho telemetry"));
  auto summary = event_of(sent.output, "telemetry");
  CHECK(at(summary, "/acked") == 3);

  nlohmann::json records;
  bool arrived = wait_until(
    [&] {
      records = hub.telemetry("leaf1");
      return !record_with_mid(records, "s1-1").is_null() &&
             !record_with_mid(records, "s1-3").is_null();
    },
    30s, 250ms);
  INFO(records.dump(1));
  REQUIRE(f.explain(arrived, "telemetry at the hub"));
  for (int i = 1; i <= 3; ++i) {
    auto r = record_with_mid(records, "s1-" + std::to_string(i));
    REQUIRE_FALSE(r.is_null());
    CHECK(at(r, "/deviceId") == "leaf1");
    CHECK(at(r, "/properties/app") == "canopy");
    CHECK(at(r, "/properties/colour") == "dark blue");
    CHECK(
      at(r, "/properties/$.mid").is_null());  // system properties are not application properties
    CHECK(at(r, "/systemProperties/contentType") == "application/json");
    CHECK(at(r, "/systemProperties/contentEncoding") == "utf-8");
    CHECK(at(r, "/systemProperties/connectionDeviceId") == "leaf1");
    CHECK(at(r, "/body/n") == i);
  }

  // mosquitto_pub, as the same device (user name, SAS password, client id), at QoS 1 and 0.
  auto token = sas_token(f.paths, "leaf1", leaf1_key);
  for (const char* qos : {"1", "0"}) {
    const std::string mid = std::string{"mosq-q"} + qos;
    auto mosq = run(
      {mosquitto_pub, "-h", "127.0.0.1", "-p", std::to_string(f.ep.port), "--cafile", f.ep.ca, "-i",
       "leaf1", "-u", user_name("leaf1"), "-P", token, "-q", qos, "-t",
       "devices/leaf1/messages/events/$.mid=" + mid + "&$.ct=application%2Fjson&source=mosquitto",
       "-m", R"({"n":100})"},
      30s);
    INFO("QoS " << qos << ": " << mosq.output);
    REQUIRE(f.explain(mosq.exit_code == 0, "mosquitto_pub telemetry"));
    bool mosq_arrived = wait_until(
      [&] {
        records = hub.telemetry("leaf1");
        return !record_with_mid(records, mid).is_null();
      },
      30s, 250ms);
    REQUIRE(f.explain(mosq_arrived, "mosquitto_pub's message at the hub"));
    auto r = record_with_mid(records, mid);
    CHECK(at(r, "/properties/source") == "mosquitto");
    CHECK(at(r, "/systemProperties/contentType") == "application/json");
    CHECK(at(r, "/body/n") == 100);
  }
}

TEST_CASE("a second connection with the same client id closes the first", "[mqtt][mqtt-gw]") {
  auto& f = shared_fleet();
  child_process first{f.leaf1({"methods", "--seconds", "30"})};
  REQUIRE(f.explain(wait_output(first, R"("event": "subscribed")"), "first connection"));
  auto second = run(f.leaf1({"connect"}), 30s);
  INFO(second.output);
  CHECK(second.exit_code == 0);
  auto st = first.wait_for(15s);
  INFO(first.output());
  CHECK(st.value_or(-1) == 5);  // azure_device.py: connection lost
  CHECK(at(event_of(first.output(), "disconnect"), "/rc") != 0);
}

// --- 2. Twins --------------------------------------------------------------------------------

TEST_CASE("a leaf device's twin over MQTT: get, report, desired patches", "[mqtt][mqtt-gw]") {
  auto& f = shared_fleet();
  auto& hub = f.hub;

  // Desired properties set at the hub before the device asks.
  hub.must({"twin", "patch", "leaf1", "--desired", R"({"mode":"eco","threshold":30})"});
  nlohmann::json twin;
  std::string last_output;
  bool got = wait_until(
    [&] {
      auto r = run(f.leaf1({"twin-get"}, {"--timeout", "10"}), 30s);
      last_output = r.output;
      twin = event_of(r.output, "twin");
      return r.exit_code == 0 && at(twin, "/body/desired/mode") == "eco";
    },
    30s, 500ms);
  INFO(last_output);
  REQUIRE(f.explain(got, "twin GET"));
  CHECK(at(twin, "/status") == 200);
  const nlohmann::json body = twin["body"];
  CHECK(at(body, "/desired/threshold") == 30);
  const auto first_version = at(body, "/desired/$version");
  REQUIRE(first_version.is_number_integer());
  CHECK(at(body, "/reported/$version").is_number_integer());

  // A reported patch reaches the hub (reports travel up once per second).
  auto rep = run(f.leaf1({"twin-report", "--patch", R"({"firmware":"1.2.3","battery":87})"}), 30s);
  INFO(rep.output);
  REQUIRE(f.explain(rep.exit_code == 0, "twin PATCH reported"));
  auto reported = event_of(rep.output, "reported");
  CHECK(at(reported, "/status") == 204);
  CHECK_FALSE(at(reported, "/version").is_null());
  bool at_hub = wait_until(
    [&] {
      twin = hub.twin("leaf1");
      return at(twin, "/properties/reported/firmware") == "1.2.3";
    },
    30s, 250ms);
  INFO(twin.dump(1));
  REQUIRE(f.explain(at_hub, "reported properties at the hub"));
  CHECK(at(twin, "/properties/reported/battery") == 87);

  // A desired patch made while the device is connected arrives on
  // $iothub/twin/PATCH/properties/desired/?$version=N.
  child_process waiter{f.leaf1({"twin-wait-desired", "--count", "1"}, {"--timeout", "40"})};
  REQUIRE(
    f.explain(wait_output(waiter, R"("event": "subscribed")"), "twin-wait-desired subscribed"));
  hub.must({"twin", "patch", "leaf1", "--desired", R"({"threshold":35})"});
  auto st = waiter.wait_for(45s);
  INFO(waiter.output());
  REQUIRE(f.explain(st.value_or(-1) == 0, "desired patch at the device"));
  auto patch = event_of(waiter.output(), "desired");
  REQUIRE_FALSE(patch.empty());
  std::smatch m;
  std::string topic = text_at(patch, "/topic");
  REQUIRE(std::regex_match(
    topic, m, std::regex{R"(\$iothub/twin/PATCH/properties/desired/\?\$version=(\d+))"}));
  const int version = std::stoi(m[1]);
  CHECK(at(patch, "/body/threshold") == 35);
  if (!at(patch, "/body/$version").is_null())
    CHECK(at(patch, "/body/$version") == version);
  CHECK(version > first_version.get<int>());
  twin = hub.twin("leaf1");
  CHECK(at(twin, "/properties/desired/$version") == version);
}

// --- 3. Direct methods ---------------------------------------------------------------------

TEST_CASE("a direct method invoked at the hub is answered by the leaf device over MQTT",
          "[mqtt][mqtt-gw]") {
  auto& f = shared_fleet();
  auto& hub = f.hub;

  child_process server{f.leaf1({"methods", "--seconds", "40"})};
  REQUIRE(f.explain(wait_output(server, R"("event": "subscribed")"), "methods subscribed"));
  auto r = hub.ctl({"invoke", "--device", "leaf1", "--method", "echo", "--payload", R"({"x":1})",
                    "--timeout", "15"});
  INFO(r.output);
  INFO(server.output());
  REQUIRE(f.explain(r.exit_code == 0, "invoke echo"));
  CHECK(r.output.find("status: 200") != std::string::npos);
  // The answer: the device echoes what it was asked.
  auto answer = nlohmann::json::parse(r.output.substr(r.output.find('\n') + 1), nullptr, false);
  REQUIRE(answer.is_object());
  CHECK(at(answer, "/method") == "echo");
  CHECK(at(answer, "/device") == "leaf1");
  CHECK(at(answer, "/request") == nlohmann::json{{"x", 1}});
  CHECK(at(event_of(server.output(), "method"), "/name") == "echo");

  // The hub's fleet status shows it connected (gw-a reports its MQTT devices).
  auto leaf_connected = [&](bool want) {
    auto st = hub.ctl({"status", "--json"});
    auto doc = nlohmann::json::parse(st.output, nullptr, false);
    if (!doc.is_array())
      return false;
    for (auto& n : doc)
      if (n.value("deviceId", "") == "leaf1")
        return n.value("connected", !want) == want;
    return false;
  };
  CHECK(f.explain(wait_until([&] { return leaf_connected(true); }, 20s, 250ms), "status: leaf1 connected"));

  // Gone: the method fails at once, "not connected".
  server.kill();
  CHECK(f.explain(wait_until([&] { return leaf_connected(false); }, 20s, 250ms), "status: leaf1 not connected"));
  run_result gone;
  bool not_found = wait_until(
    [&] {
      gone = hub.ctl({"invoke", "--device", "leaf1", "--method", "echo", "--timeout", "5"});
      // The hub answers 404 "device ... is not connected"; canopyctl prints the reason.
      return gone.exit_code != 0 && gone.output.find("is not connected") != std::string::npos;
    },
    20s, 250ms);
  INFO(gone.output);
  CHECK(f.explain(not_found, "invoke on a disconnected device"));
}

// --- 4. Cloud-to-device ----------------------------------------------------------------------

TEST_CASE("cloud-to-device messages reach the leaf device, also across a persistent session",
          "[mqtt][mqtt-gw]") {
  auto& f = shared_fleet();
  auto& hub = f.hub;

  SECTION("mosquitto_sub gets a C2D message with its properties in the topic") {
    auto token = sas_token(f.paths, "leaf1", leaf1_key);
    // stdbuf: mosquitto_sub's debug lines ("received SUBACK") are stdio-buffered otherwise.
    child_process sub{{"/usr/bin/stdbuf",
                       "-oL",
                       mosquitto_sub,
                       "-h",
                       "127.0.0.1",
                       "-p",
                       std::to_string(f.ep.port),
                       "--cafile",
                       f.ep.ca,
                       "-i",
                       "leaf1",
                       "-u",
                       user_name("leaf1"),
                       "-P",
                       token,
                       "-q",
                       "1",
                       "-t",
                       "devices/leaf1/messages/devicebound/#",
                       "-C",
                       "1",
                       "-v",
                       "-d",
                       "-W",
                       "40"}};
    REQUIRE(f.explain(wait_output(sub, "SUBACK"), "mosquitto_sub subscribed"));
    hub.must({"c2d", "leaf1", "hello", "--property", "k=v"});
    auto st = sub.wait_for(45s);
    INFO(sub.output());
    REQUIRE(f.explain(st.value_or(-1) == 0, "C2D at mosquitto_sub"));
    std::smatch m;
    auto out = sub.output();
    REQUIRE(std::regex_search(
      out, m, std::regex{R"((?:^|\n)devices/leaf1/messages/devicebound/(\S*) hello(?:\n|$))"}));
    std::string bag = m[1];
    CHECK(std::regex_search(bag, std::regex{"(^|&)k=v(&|$)"}));
  }

  SECTION(
    "a persistent session keeps the subscription and the message sent while the device was away") {
    // Subscribe with clean_session=0, and leave.
    auto first = run(f.leaf1({"c2d", "--count", "0"}, {"--persistent"}), 30s);
    INFO(first.output);
    REQUIRE(f.explain(first.exit_code == 0, "persistent subscribe"));
    hub.must({"c2d", "leaf1", "while you were away", "--property", "seq=2"});
    // Back, without subscribing again.
    auto back = run(
      f.leaf1({"c2d", "--count", "1", "--no-subscribe"}, {"--persistent", "--timeout", "30"}), 40s);
    INFO(back.output);
    REQUIRE(f.explain(back.exit_code == 0, "C2D kept in the persistent session"));
    CHECK(at(event_of(back.output, "connack"), "/session_present") == true);
    auto c2d = event_of(back.output, "c2d");
    CHECK(at(c2d, "/body") == "while you were away");
    CHECK(at(c2d, "/properties/seq") == "2");
    CHECK(at(c2d, "/qos") == 1);
    // A clean session ends it.
    auto clean = run(f.leaf1({"connect"}), 30s);
    CHECK(clean.exit_code == 0);
    auto again = run(f.leaf1({"connect"}, {"--persistent"}), 30s);
    INFO(again.output);
    CHECK(at(event_of(again.output, "connack"), "/session_present") == false);
    CHECK(run(f.leaf1({"connect"}), 30s).exit_code == 0);
  }
}

// --- 5. Refusals ----------------------------------------------------------------------------

TEST_CASE("clients that cannot prove who they are, or overstep, are refused and logged",
          "[mqtt][mqtt-gw]") {
  auto& f = shared_fleet();
  auto& gw = f.gw;
  const std::string port = std::to_string(f.ep.port);

  /// mosquitto_pub as `client_id` with user name for `identity` and `password`.
  auto mosq = [&](const std::string& client_id, const std::string& password, bool tls = true) {
    std::vector<std::string> argv{mosquitto_pub, "-h", "127.0.0.1", "-p", port};
    if (tls)
      argv.insert(argv.end(), {"--cafile", f.ep.ca});
    argv.insert(argv.end(), {"-i", client_id, "-u", user_name(client_id), "-P", password, "-q", "1",
                             "-t", "devices/" + client_id + "/messages/events/", "-m", "{}"});
    return run(argv, 30s);
  };
  /// Runs `attempt` and checks it was refused and gw-a logged the refusal naming `client_id`.
  auto refused = [&](const std::string& client_id, const std::function<run_result()>& attempt,
                     const std::string& client_says = "") {
    auto from = gw.output().size();
    auto r = attempt();
    const std::string line = "mqtt: client '" + client_id + "' refused";
    bool logged = logged_since(gw, from, line);
    INFO("client output: " << r.output);
    INFO("expected in gw-a's log: " << line << "\ngw-a's log since:\n"
                                    << tail(gw.output().substr(from), 3000));
    CHECK(r.exit_code != 0);
    CHECK_FALSE(r.timed_out);
    if (!client_says.empty())
      CHECK(r.output.find(client_says) != std::string::npos);
    CHECK(logged);
  };

  SECTION("a SAS token signed with the wrong key") {
    auto token = sas_token(f.paths, "leaf2", nobodys_key);
    refused(
      "leaf2", [&] { return mosq("leaf2", token); }, "not authorised");
  }
  SECTION("an expired SAS token") {
    auto token = sas_token(f.paths, "leaf2", leaf2_key,
                           {"--expiry", std::to_string(std::time(nullptr) - 3600)});
    refused(
      "leaf2", [&] { return mosq("leaf2", token); }, "not authorised");
  }
  SECTION("another device's token") {
    // Client id and user name leaf1, the token leaf2's, signed with leaf2's key.
    refused("leaf1", [&] {
      return run(device_argv(f.paths, f.ep, "leaf1", {"--key", leaf2_key, "--sas-device", "leaf2"},
                             {"connect"}),
                 30s);
    });
  }
  SECTION("a user name naming another device") {
    refused("leaf1", [&] {
      return run(device_argv(f.paths, f.ep, "leaf1",
                             {"--key", leaf1_key, "--user", user_name("leaf2")}, {"connect"}),
                 30s);
    });
  }
  SECTION("another device's client id with its own credentials") {
    // Client id leaf1, user name and token leaf2's.
    refused("leaf1", [&] {
      return run(device_argv(f.paths, f.ep, "leaf2", {"--key", leaf2_key, "--client-id", "leaf1"},
                             {"connect"}),
                 30s);
    });
  }
  SECTION("plain TCP on the TLS port") {
    auto token = sas_token(f.paths, "leaf2", leaf2_key);
    refused("leaf2", [&] { return mosq("leaf2", token, false); }, "not authorised");
  }
  SECTION("a client certificate from another CA") {
    refused("leafx", [&] {
      return run(device_argv(f.paths, f.ep, "leafx",
                             {"--cert", f.rogue.cert("leafx"), "--key-file", f.rogue.key("leafx"),
                              "--no-password"},
                             {"connect"}),
                 30s);
    });
  }
  SECTION("no credentials at all for a certificate device") {
    refused("leafx", [&] {
      return run(device_argv(f.paths, f.ep, "leafx", {"--no-password"}, {"connect"}), 30s);
    });
  }
  SECTION("an unknown device") {
    auto token = sas_token(f.paths, "ghost", nobodys_key);
    refused(
      "ghost", [&] { return mosq("ghost", token); }, "not authorised");
  }
  SECTION("a device that belongs to another node (the hub)") {
    auto token = sas_token(f.paths, "leafhub", leafhub_key);
    refused(
      "leafhub", [&] { return mosq("leafhub", token); }, "not authorised");
  }
  SECTION("the certificate devices with the right certificates are admitted") {
    auto ca = run(device_argv(f.paths, f.ep, "leafx",
                              {"--cert", f.certs.cert("leafx"), "--key-file", f.certs.key("leafx"),
                               "--no-password"},
                              {"connect"}),
                  30s);
    INFO(ca.output);
    CHECK(f.explain(ca.exit_code == 0, "x509_ca device"));
    auto tp = run(device_argv(f.paths, f.ep, "leaftp",
                              {"--cert", f.self_signed.file("ca.crt"), "--key-file",
                               f.self_signed.file("ca.key"), "--no-password"},
                              {"connect"}),
                  30s);
    INFO(tp.output);
    CHECK(f.explain(tp.exit_code == 0, "x509_thumbprint device"));
  }
  SECTION("publishing to another device's topic closes the connection") {
    auto from = gw.output().size();
    const std::string topic = "devices/leaf2/messages/events/";
    auto r = run(f.leaf1({"publish", "--topic", topic}), 30s);
    INFO(r.output);
    CHECK(r.exit_code == 0);  // closed without a PUBACK
    CHECK(at(event_of(r.output, "published"), "/acked") == false);
    const std::string line = "mqtt: client 'leaf1': publish to '" + topic + "' refused";
    INFO("gw-a's log since:\n" << tail(gw.output().substr(from), 3000));
    CHECK(logged_since(gw, from, line));
    CHECK(f.hub.telemetry("leaf2").empty());
  }
  SECTION("subscribing to another device's topics is refused with SUBACK 0x80") {
    auto from = gw.output().size();
    const std::string filter = "devices/leaf2/messages/devicebound/#";
    auto r = run(f.leaf1({"subscribe", "--filter", filter}), 30s);
    INFO(r.output);
    auto suback = event_of(r.output, "suback");
    CHECK(at(suback, "/granted") == nlohmann::json::array({128}));
    const std::string line = "mqtt: client 'leaf1': subscription '" + filter + "' refused";
    INFO("gw-a's log since:\n" << tail(gw.output().substr(from), 3000));
    CHECK(logged_since(gw, from, line));
  }
}

// --- 6. QoS 1 across a crash ------------------------------------------------------------------

TEST_CASE("QoS 1 messages PUBACKed by a gateway survive its kill -9 and reach the hub", "[mqtt]") {
  require_clients();
  auto paths = canopy_paths::from_env();
  fleet_certs certs{paths};
  certs.issue("hub");
  certs.issue("gw-b");
  hub_node hub{paths, certs};
  hub.start();
  hub.must({"device", "create", "gw-b", "--parent", "hub", "--kind", "gateway"});
  hub.must({"device", "create", "leaf6", "--parent", "gw-b", "--kind", "device", "--auth", "sas",
            "--primary-key", leaf6_key});
  canopy_node gw{paths};
  mqtt_endpoint ep{free_port(), true, certs.ca()};
  start_mqtt_gateway(gw, "gw-b", certs, hub.link_port, ep.port);
  REQUIRE(wait_until([&] { return link_up(gw, "parent", "hub"); }, 30s, 100ms));
  REQUIRE(wait_admitted(paths, ep, "leaf6", leaf6_key));
  // A persistent session subscribes to C2D and leaves: it must outlive the kill -9 below.
  auto subscribed = run(device_argv(paths, ep, "leaf6", {"--key", leaf6_key, "--persistent"},
                                    {"c2d", "--count", "0"}),
                        30s);
  INFO(subscribed.output);
  REQUIRE(subscribed.exit_code == 0);

  // The hub goes away: the gateway admits from its cached scope and keeps what it acknowledges.
  REQUIRE(hub.node.stop().value_or(-1) == 0);
  REQUIRE(wait_until([&] { return !link_up(gw, "parent", "hub"); }, 30s, 100ms));
  constexpr int total = 300;
  auto sent =
    run(device_argv(paths, ep, "leaf6", {"--key", leaf6_key, "--timeout", "60", "--persistent"},
                    {"telemetry", "--count", std::to_string(total), "--mid-prefix", "k-"}),
        90s);
  INFO(sent.output);
  REQUIRE(sent.exit_code == 0);
  REQUIRE(at(event_of(sent.output, "telemetry"), "/acked") == total);

  // kill -9, restart (still without its parent), then the hub comes back.
  gw.process().send_signal(SIGKILL);
  REQUIRE(gw.process().wait_for(10s).value_or(0) == -SIGKILL);
  start_mqtt_gateway(gw, "gw-b", certs, hub.link_port, ep.port);
  hub.start();
  REQUIRE(wait_until([&] { return link_up(gw, "parent", "hub"); }, 60s, 100ms));

  nlohmann::json records;
  std::map<std::string, int> seen;
  bool complete = wait_until(
    [&] {
      records = hub.telemetry("leaf6");
      seen.clear();
      for (auto& r : records)
        ++seen[text_at(r, "/systemProperties/messageId")];
      for (int i = 1; i <= total; ++i)
        if (seen.count("k-" + std::to_string(i)) == 0)
          return false;
      return true;
    },
    60s, 250ms);
  std::vector<std::string> missing, duplicated;
  for (int i = 1; i <= total; ++i) {
    auto id = "k-" + std::to_string(i);
    if (seen.count(id) == 0)
      missing.push_back(id);
    else if (seen[id] > 1)
      duplicated.push_back(id);
  }
  INFO(missing.size() << " missing, e.g. " << (missing.empty() ? "-" : missing.front()) << "; "
                      << duplicated.size() << " duplicated");
  if (!complete)
    std::fprintf(stderr, "gw-b's log:\n%s\n", tail(gw.output()).c_str());
  REQUIRE(complete);
  // Exactly once here: every message was PUBACKed after it was durable, and
  // nothing had been sent upstream before the crash.
  CHECK(duplicated.empty());
  CHECK(records.size() == static_cast<std::size_t>(total));
  // In the order sent.
  int expected = 1;
  bool in_order = true;
  for (auto& r : records) {
    if (at(r, "/systemProperties/messageId") == "k-" + std::to_string(expected))
      ++expected;
    else
      in_order = false;
  }
  CHECK(in_order);

  // The persistent session came back from disk: a C2D message sent while the
  // device is away waits in it, and the device gets it without subscribing again.
  auto c2d = hub.ctl({"c2d", "leaf6", "after the crash"});
  INFO(c2d.output);
  CHECK(c2d.output.find("status: 202") != std::string::npos);
  auto back = run(device_argv(paths, ep, "leaf6", {"--key", leaf6_key, "--persistent", "--timeout", "30"},
                              {"c2d", "--count", "1", "--no-subscribe"}),
                  40s);
  INFO(back.output);
  REQUIRE(back.exit_code == 0);
  CHECK(at(event_of(back.output, "connack"), "/session_present") == true);
  CHECK(at(event_of(back.output, "c2d"), "/body") == "after the crash");
  CHECK(gw.stop().value_or(-1) == 0);
  CHECK(hub.node.stop().value_or(-1) == 0);
}

// --- 7. Process modules --------------------------------------------------------------------------

namespace {

/// tests/integration/manifests/<name> with @MQTT_CLIENTS@ and @SOURCE_ROOT@
/// replaced by absolute directories (process modules name their executables).
nlohmann::json process_manifest(const canopy_paths& paths, const std::string& name) {
  std::string text = read_text_file(paths.source_root + "/tests/integration/manifests/" + name);
  for (auto& [from, to] : std::vector<std::pair<std::string, std::string>>{
         {"@MQTT_CLIENTS@", paths.source_root + "/tests/integration/mqtt_clients"},
         {"@SOURCE_ROOT@", paths.source_root}})
    for (auto pos = text.find(from); pos != std::string::npos;
         pos = text.find(from, pos + to.size()))
      text.replace(pos, from.size(), to);
  return nlohmann::json::parse(text);
}

}  // namespace

TEST_CASE("a crash-looping process module backs off with its restart count growing, then fails",
          "[mqtt]") {
  auto paths = canopy_paths::from_env();
  canopy_node node{paths};
  node.start(node.write_manifest("crashloop.json", process_manifest(paths, "mqtt_crashloop.json")),
             {"--device-id", "edge-c"});
  REQUIRE(node.wait_ready());

  // exit3.sh exits 3 at once; a large budget keeps it restarting with backoff.
  module_view seen;
  REQUIRE(node.wait_module(
    "crashloop",
    [&](const module_view& m) {
      seen = m;
      return m.restart_count >= 2 && m.last_exit_reason == "exited with code 3";
    },
    30s));
  CHECK((seen.status == "backoff" || seen.status == "running"));
  const int before = seen.restart_count;
  CHECK(node.wait_module(
    "crashloop", [&](const module_view& m) { return m.restart_count > before; }, 30s));
  // The same script with a budget of two restarts ends up failed.
  module_view failed;
  bool is_failed = node.wait_module(
    "crashbudget",
    [&](const module_view& m) {
      failed = m;
      return m.status == "failed";
    },
    30s);
  INFO("crashbudget: " << failed.status << ", restarts " << failed.restart_count << ", "
                       << failed.last_exit_reason);
  CHECK(is_failed);
  CHECK(failed.last_exit_reason == "exited with code 3");
  CHECK(failed.restart_count == 2);
  // What it wrote to stderr is in its log.
  auto logs = node.ctl({"logs", "crashloop"});
  INFO(logs.output);
  CHECK(logs.output.find("crashing on purpose") != std::string::npos);
  CHECK(node.stop().value_or(-1) == 0);
}

TEST_CASE(
  "process modules in Python and Node.js connect with the node's CANOPY_MQTT_* variables, take their twin and "
  "methods over MQTT, and their telemetry goes upstream",
  "[mqtt]") {
  require_clients();
  // The two examples: Debian's python3-paho-mqtt and node-mqtt (nodejs).
  struct example {
    const char* module;
    const char* manifest;
    const char* interval_line;  // its log line once it took the desired interval
  };
  const auto ex = GENERATE(example{"pysensor", "mqtt_python.json", "interval is now 0.2"},
                           example{"jssensor", "mqtt_node.json", "interval is now 0.2"});
  const std::string module = ex.module;
  INFO("module " << module);
  auto paths = canopy_paths::from_env();
  fleet_certs certs{paths};
  certs.issue("edge-p");
  canopy_node node{paths};
  const int mqtt_port = free_port();
  node.start(node.write_manifest("module.json", process_manifest(paths, ex.manifest)),
             {"--device-id", "edge-p", "--certs", certs.dir(), "--mqtt-listen", loopback(mqtt_port)});
  REQUIRE(node.wait_ready());

  // The module sends a reading every 0.2 s (its desired "interval").
  auto monitor = node.ctl({"monitor", "--count", "2", "--timeout", "40", "--backlog", "10"}, 50s);
  INFO(monitor.output);
  auto logs = node.ctl({"logs", module});
  INFO("the module's log: " << logs.output);
  INFO("node's log: " << tail(node.output()));
  REQUIRE(monitor.exit_code == 0);
  CHECK(monitor.output.find(module) != std::string::npos);
  CHECK(monitor.output.find("temperature") != std::string::npos);
  auto m = node.module(module);
  REQUIRE(m);
  CHECK(m->status == "running");
  CHECK(m->restart_count == 0);
  CHECK(logs.output.find("connected to") != std::string::npos);
  // Its twin: it read "interval" and reported it.
  CHECK(wait_until(
    [&] { return node.ctl({"logs", module}).output.find(ex.interval_line) != std::string::npos; }, 20s,
    200ms));
  // Its direct method, over MQTT.
  auto ping = node.ctl({"invoke", module, "ping", "{}"});
  INFO(ping.output);
  CHECK(ping.exit_code == 0);
  CHECK(ping.output.find("pong") != std::string::npos);
  CHECK(node.stop().value_or(-1) == 0);
}
