#include "actors/mqtt_head.hpp"

#include "actors/fleet.hpp"
#include "actors/reply_guard.hpp"
#include "gateway/iothub_protocol.hpp"
#include "gateway/mqtt_auth.hpp"
#include "runtime/agent.hpp"
#include "runtime/atoms.hpp"
#include "runtime/clock.hpp"
#include "runtime/router.hpp"
#include "runtime/send_later.hpp"
#include "runtime/session_store.hpp"
#include "runtime/supervisor.hpp"

#include <caf/all.hpp>
#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include <openssl/rand.h>

#include <algorithm>
#include <deque>
#include <set>

namespace canopy {

// --- directory and keys ----------------------------------------------------------

caf::actor mqtt_directory::find(const std::string& client_id) const {
  std::lock_guard<std::mutex> lock{mtx_};
  auto it = sessions_.find(client_id);
  return it == sessions_.end() ? caf::actor{} : it->second.session;
}

caf::actor mqtt_directory::find(const std::string& device, const std::string& module) const {
  return find(module.empty() ? device : device + "/" + module);
}

caf::actor mqtt_directory::find_persistent(const std::string& client_id) const {
  std::lock_guard<std::mutex> lock{mtx_};
  auto it = sessions_.find(client_id);
  return it == sessions_.end() || !it->second.persistent ? caf::actor{} : it->second.session;
}

caf::actor mqtt_directory::put(const std::string& client_id, caf::actor session, bool persistent) {
  std::lock_guard<std::mutex> lock{mtx_};
  auto& slot = sessions_[client_id];
  auto old = std::exchange(slot.session, std::move(session));
  slot.persistent = persistent;
  slot.connected = true;
  return old;
}

bool mqtt_directory::put_restored(const std::string& client_id, caf::actor session) {
  std::lock_guard<std::mutex> lock{mtx_};
  auto [it, inserted] = sessions_.try_emplace(client_id);
  if (!inserted)
    return false;
  it->second.session = std::move(session);
  it->second.persistent = true;
  it->second.connected = false;
  return true;
}

void mqtt_directory::erase(const std::string& client_id, const caf::actor& session) {
  std::lock_guard<std::mutex> lock{mtx_};
  auto it = sessions_.find(client_id);
  if (it != sessions_.end() && it->second.session == session)
    sessions_.erase(it);
}

void mqtt_directory::set_connected(const std::string& client_id, const caf::actor& session, bool connected) {
  std::lock_guard<std::mutex> lock{mtx_};
  auto it = sessions_.find(client_id);
  if (it != sessions_.end() && it->second.session == session)
    it->second.connected = connected;
}

std::vector<std::string> mqtt_directory::connected_devices() const {
  std::lock_guard<std::mutex> lock{mtx_};
  std::vector<std::string> out;
  for (auto& [id, e] : sessions_)
    if (e.connected && id.find('/') == std::string::npos)
      out.push_back(id);
  return out;
}

std::size_t mqtt_directory::size() const {
  std::lock_guard<std::mutex> lock{mtx_};
  return sessions_.size();
}

std::string mqtt_module_keys::key_for(const std::string& module) {
  std::lock_guard<std::mutex> lock{mtx_};
  auto it = keys_.find(module);
  if (it != keys_.end())
    return it->second;
  unsigned char raw[32];
  if (RAND_bytes(raw, sizeof raw) != 1)
    throw std::runtime_error("OpenSSL RAND_bytes failed: no key for module '" + module + "'");
  auto key = iothub::base64_encode(std::string_view{reinterpret_cast<const char*>(raw), sizeof raw});
  keys_.emplace(module, key);
  return key;
}

std::optional<std::string> mqtt_module_keys::find(const std::string& module) const {
  std::lock_guard<std::mutex> lock{mtx_};
  auto it = keys_.find(module);
  if (it == keys_.end())
    return std::nullopt;
  return it->second;
}

std::map<std::string, std::string> mqtt_module_env(const std::string& node_id, const std::string& module,
                                                   const std::string& hub_host, const std::string& host,
                                                   std::uint16_t port, bool tls, const std::string& ca_file,
                                                   mqtt_module_keys& keys, std::int64_t now_s) {
  const iothub::client_identity who{node_id, module};
  std::map<std::string, std::string> env{
    {"CANOPY_MQTT_HOST", host},
    {"CANOPY_MQTT_PORT", std::to_string(port)},
    {"CANOPY_MQTT_TLS", tls ? "1" : "0"},
    {"CANOPY_MQTT_USERNAME", hub_host + "/" + node_id + "/" + module + "/?api-version=2021-04-12"},
  };
  if (tls)
    env["CANOPY_MQTT_CA_FILE"] = ca_file;
  auto token = iothub::make_sas(iothub::identity_resource(hub_host, who), keys.key_for(module),
                                now_s + 365 * 24 * 3600);
  if (token)
    env["CANOPY_MQTT_PASSWORD"] = *token;
  return env;
}

// --- the session actor ---------------------------------------------------------------

namespace {

/// What every session shares with the gateway.
struct head_env {
  mqtt_head_config cfg;
};

/// Answers a publish batch exactly once: if the session actor is gone before
/// it answered, every packet gets "the session ended".
class publish_reply {
 public:
  publish_reply(std::size_t n, std::function<void(std::vector<mqtt_publish_result>)> done)
      : n_(n), done_(std::move(done)) {}
  ~publish_reply() {
    if (done_) {
      std::vector<mqtt_publish_result> r;
      r.emplace_back(make_error(errc::unavailable, "the client's session ended"));
      done_(std::move(r));
    }
  }
  publish_reply(const publish_reply&) = delete;
  publish_reply& operator=(const publish_reply&) = delete;
  void operator()(std::vector<mqtt_publish_result> r) {
    if (auto f = std::exchange(done_, nullptr))
      f(std::move(r));
  }
  std::size_t size() const { return n_; }

 private:
  std::size_t n_;
  std::function<void(std::vector<mqtt_publish_result>)> done_;
};

// Calls from the I/O thread into a session, each tagged with its connection.
struct publish_call {
  std::uint64_t conn = 0;
  std::vector<mqtt::publish_packet> batch;
  std::shared_ptr<publish_reply> done;
};
struct subscribe_call {
  std::uint64_t conn = 0;
  std::vector<mqtt::subscription> filters;
  reply_ptr<std::vector<std::uint8_t>> done;
};
struct unsubscribe_call {
  std::uint64_t conn = 0;
  std::vector<std::string> filters;
  reply_ptr<void> done;
};
struct acked_call {
  std::uint64_t conn = 0;
  std::uint16_t packet_id = 0;
};
struct closed_call {
  std::uint64_t conn = 0;
  std::string reason;
  bool clean = false;
};
struct attach_call {
  std::uint64_t conn = 0;
  std::shared_ptr<mqtt_channel> channel;
  std::optional<mqtt::will_message> will;
  /// Answered true once the session took the connection; false (by its
  /// destructor) if the session ended first.
  std::shared_ptr<struct attach_reply> done;
};
struct attach_reply {
  explicit attach_reply(std::function<void(bool)> f) : fn(std::move(f)) {}
  ~attach_reply() {
    if (fn)
      fn(false);
  }
  attach_reply(const attach_reply&) = delete;
  attach_reply& operator=(const attach_reply&) = delete;
  void operator()(bool ok) {
    if (auto f = std::exchange(fn, nullptr))
      f(ok);
  }
  std::function<void(bool)> fn;
};
/// The twin a leaf device was last given (from a GET answered off the actor).
struct desired_seen {
  nlohmann::json desired;
};
/// A direct method's time ran out.
struct method_timeout {
  std::string rid;
};

}  // namespace
}  // namespace canopy

CAF_ALLOW_UNSAFE_MESSAGE_TYPE(canopy::publish_call)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(canopy::subscribe_call)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(canopy::unsubscribe_call)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(canopy::acked_call)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(canopy::closed_call)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(canopy::attach_call)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(canopy::desired_seen)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(canopy::method_timeout)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(canopy::reply_ptr<std::vector<std::uint8_t>>)

namespace canopy {
namespace {

using json = nlohmann::json;

/// The RFC 7386 merge patch that turns `from` into `to` (objects).
json merge_diff(const json& from, const json& to) {
  json patch = json::object();
  for (auto& [k, v] : to.items()) {
    auto it = from.find(k);
    if (it == from.end()) {
      patch[k] = v;
    } else if (*it != v) {
      if (it->is_object() && v.is_object())
        patch[k] = merge_diff(*it, v);
      else
        patch[k] = v;
    }
  }
  for (auto& [k, v] : from.items())
    if (!to.contains(k))
      patch[k] = nullptr;
  return patch;
}

/// A method's answer body as JSON text (a body that is not JSON becomes a
/// JSON string; an empty one null).
std::string json_body(const std::string& body) {
  if (body.empty())
    return "null";
  auto j = json::parse(body, nullptr, false);
  if (j.is_discarded())
    return json(body).dump();
  return body;
}

/// A QoS 1 message the session sends and waits to see acknowledged.
struct outbound {
  mqtt::publish_packet packet;  ///< packet_id set when sent
  iothub::subscription needs = iothub::subscription::c2d;
  std::uint64_t token = 0;       ///< module input: the router's delivery token
  bool input = false;
  std::function<void()> on_ack;  ///< C2D: answers the sender once acknowledged
  std::int64_t stored_seq = 0;   ///< kept in the session store under this seq (0: not)
  std::uint64_t order = 0;       ///< when it was first sent (resent in this order)
};

struct session_state {
  std::shared_ptr<head_env> env;
  iothub::client_identity who;
  std::string client_id;
  bool persistent = false;  ///< clean_session = 0: outlives its connection
  std::shared_ptr<mqtt_channel> channel;
  /// The channel the actor's end closes (the current one).
  std::shared_ptr<std::shared_ptr<mqtt_channel>> last_channel;
  std::uint64_t conn = 0;
  bool connected = false;
  std::set<iothub::subscription> subs;
  std::uint16_t next_pid = 1;
  std::map<std::uint16_t, outbound> inflight;  ///< sent, not yet acknowledged
  std::uint64_t next_order = 1;
  /// Module inputs sent, by router token: acknowledged or not. The router's
  /// acknowledgement is cumulative, so it hears of a token only once every
  /// earlier one is acknowledged too (a client may PUBACK out of order).
  std::map<std::uint64_t, bool> input_acks;
  std::deque<outbound> queued;                 ///< waiting for a connection or a subscription
  std::uint64_t next_rid = 1;
  std::map<std::string, std::function<void(method_reply)>> methods;  ///< by $rid
  std::optional<json> known_desired;  ///< the desired properties the client has seen
  std::int64_t module_desired_version = 0;
  std::int64_t module_reported_version = 0;
  /// The connection's Will: sent as telemetry if it ends without DISCONNECT.
  std::optional<mqtt::will_message> will;

  static inline const char* name = "mqtt_session";
};

using session_actor = caf::stateful_actor<session_state>;

/// The session store if this session is kept on disk.
mqtt_session_store* stored(session_state& st) {
  return st.persistent ? st.env->cfg.sessions.get() : nullptr;
}

/// stored(), unless another session of the same client replaced this one
/// (it owns the client's stored state now).
mqtt_session_store* stored(session_actor* self) {
  auto& st = self->state;
  auto* store = stored(st);
  if (store == nullptr || st.env->cfg.directory->find(st.client_id) != caf::actor_cast<caf::actor>(self))
    return nullptr;
  return store;
}

std::uint32_t subscription_mask(const std::set<iothub::subscription>& subs) {
  std::uint32_t mask = 0;
  for (auto s : subs)
    mask |= 1u << static_cast<unsigned>(s);
  return mask;
}

void log_refusal(session_actor* self, const std::string& what) {
  spdlog::warn("mqtt: client '{}': {}", self->state.client_id, what);
}

std::uint16_t take_pid(session_state& st) {
  // Callers keep inflight far below the 65,535 packet ids (max_queued C2D,
  // the router's window of inputs).
  for (;;) {
    auto pid = st.next_pid++;
    if (st.next_pid == 0)
      st.next_pid = 1;
    if (pid != 0 && !st.inflight.count(pid))
      return pid;
  }
}

/// Sends what waits and may go now: the client is connected and subscribed to
/// what the message needs.
void pump(session_actor* self) {
  auto& st = self->state;
  if (!st.connected)
    return;
  std::deque<outbound> keep;
  while (!st.queued.empty()) {
    auto o = std::move(st.queued.front());
    st.queued.pop_front();
    if (!st.subs.count(o.needs)) {
      keep.push_back(std::move(o));
      continue;
    }
    if (st.inflight.size() >= 65000) {
      keep.push_back(std::move(o));  // no packet id free: it waits for acknowledgements
      continue;
    }
    const auto pid = take_pid(st);
    o.packet.packet_id = pid;
    o.packet.qos = 1;
    if (o.order == 0)
      o.order = st.next_order++;
    st.channel->publish(o.packet);
    st.inflight.emplace(pid, std::move(o));
  }
  st.queued = std::move(keep);
}

/// The connection went: what was sent and not acknowledged goes out again
/// (DUP), first and in the order it was first sent, on the next connection.
void requeue_inflight(session_state& st) {
  std::vector<outbound> again;
  for (auto& [pid, o] : st.inflight) {
    o.packet.dup = true;
    again.push_back(std::move(o));
  }
  st.inflight.clear();
  std::sort(again.begin(), again.end(), [](const outbound& a, const outbound& b) { return a.order < b.order; });
  for (auto it = again.rbegin(); it != again.rend(); ++it)
    st.queued.push_front(std::move(*it));
}

/// Publishes a QoS 0 answer to the client (dropped if not connected).
void answer(session_actor* self, std::string topic, std::string body) {
  auto& st = self->state;
  if (!st.connected)
    return;
  mqtt::publish_packet p;
  p.topic = std::move(topic);
  p.payload = std::move(body);
  p.qos = 0;
  st.channel->publish(std::move(p));
}

/// A desired-properties document `doc` (version `version`) reached the
/// session: the client gets the difference to what it has seen.
void push_desired(session_actor* self, const json& doc, std::int64_t version) {
  auto& st = self->state;
  if (!st.connected || !st.subs.count(iothub::subscription::desired_patches)) {
    return;  // it reads its twin when it (re)subscribes
  }
  json patch = st.known_desired ? merge_diff(*st.known_desired, doc) : doc;
  st.known_desired = doc;
  patch["$version"] = version;
  answer(self, iothub::desired_patch_topic(version), patch.dump());
}

/// A module's twin, from the agent's memory.
json module_twin(session_actor* self) {
  auto& st = self->state;
  json desired = json::object(), reported = json::object();
  if (st.env->cfg.memory) {
    desired = st.env->cfg.memory->desired_of(st.who.module_id);
    std::lock_guard<std::mutex> lock{st.env->cfg.memory->mtx};
    if (auto it = st.env->cfg.memory->reported.find(st.who.module_id); it != st.env->cfg.memory->reported.end())
      reported = it->second;
  }
  if (!desired.is_object())
    desired = json::object();
  st.known_desired = desired;
  if (st.module_desired_version == 0)
    st.module_desired_version = 1;
  desired["$version"] = st.module_desired_version;
  reported["$version"] = st.module_reported_version;
  return json{{"desired", std::move(desired)}, {"reported", std::move(reported)}};
}

bool is_node_module(const session_state& st) {
  return st.who.is_module() && st.who.device_id == st.env->cfg.node_id;
}

void twin_get(session_actor* self, const std::string& rid) {
  auto& st = self->state;
  if (is_node_module(st)) {
    answer(self, iothub::twin_response_topic(200, rid), module_twin(self).dump());
    return;
  }
  if (!st.env->cfg.fleet) {
    answer(self, iothub::twin_response_topic(503, rid), R"({"message":"this node keeps no twins"})");
    return;
  }
  auto channel = st.channel;
  auto me = caf::actor_cast<caf::actor>(self);
  st.env->cfg.fleet->twin_get(st.who.device_id, st.who.module_id, [channel, rid, me](expected<twin_record> t) {
    if (!t) {
      channel->publish(mqtt::publish_packet{iothub::twin_response_topic(t.err().code == errc::not_found ? 404 : 500,
                                                                      rid),
                                            json{{"message", t.err().message}}.dump(), 0, false, false, 0});
      return;
    }
    json desired = t->desired.is_object() ? t->desired : json::object();
    caf::anon_send(me, desired_seen{desired});
    json reported = t->reported.is_object() ? t->reported : json::object();
    desired["$version"] = t->desired_version;
    reported["$version"] = t->reported_version;
    channel->publish(mqtt::publish_packet{iothub::twin_response_topic(200, rid),
                                          json{{"desired", desired}, {"reported", reported}}.dump(), 0, false,
                                          false, 0});
  });
}

void twin_report(session_actor* self, const std::string& rid, const std::string& body) {
  auto& st = self->state;
  auto patch = json::parse(body, nullptr, false);
  if (patch.is_discarded() || !patch.is_object()) {
    answer(self, iothub::twin_response_topic(400, rid),
           json{{"message", "the reported properties patch is not a JSON object"}}.dump());
    return;
  }
  if (is_node_module(st)) {
    auto agent = st.env->cfg.agent ? st.env->cfg.agent() : caf::actor{};
    if (!agent) {
      answer(self, iothub::twin_response_topic(503, rid), R"({"message":"the agent is restarting; try again"})");
      return;
    }
    self->send(agent, atoms::reported::value, st.who.module_id, patch.dump());
    answer(self, iothub::twin_response_topic(204, rid, ++st.module_reported_version), "");
    return;
  }
  if (!st.env->cfg.fleet) {
    answer(self, iothub::twin_response_topic(503, rid), R"({"message":"this node keeps no twins"})");
    return;
  }
  auto channel = st.channel;
  st.env->cfg.fleet->report_leaf(st.who.device_id, st.who.module_id, std::move(patch),
                                 [channel, rid](expected<std::int64_t> v) {
                                   mqtt::publish_packet p;
                                   if (v) {
                                     p.topic = iothub::twin_response_topic(204, rid, *v);
                                   } else {
                                     p.topic = iothub::twin_response_topic(
                                       v.err().code == errc::invalid_argument ? 400 : 500, rid);
                                     p.payload = json{{"message", v.err().message}}.dump();
                                   }
                                   channel->publish(std::move(p));
                                 });
}

/// Starts a direct method call to the client; `done` gets the answer.
void call_method(session_actor* self, const std::string& method, const std::string& payload,
                 std::uint32_t timeout_ms, std::function<void(method_reply)> done) {
  auto& st = self->state;
  if (!st.connected) {
    done(method_reply{404, json{{"error", "'" + st.client_id + "' is not connected"}}.dump()});
    return;
  }
  if (!st.subs.count(iothub::subscription::methods)) {
    done(method_reply{404, json{{"error", "'" + st.client_id + "' has not subscribed to direct methods"}}.dump()});
    return;
  }
  char buf[24];
  std::snprintf(buf, sizeof buf, "%llx", static_cast<unsigned long long>(st.next_rid++));
  std::string rid = buf;
  st.methods.emplace(rid, std::move(done));
  send_later(self, *st.env->cfg.clk, std::chrono::milliseconds{timeout_ms}, method_timeout{rid});
  answer(self, iothub::method_request_topic(method, rid), payload.empty() ? "{}" : payload);
}

/// Fails the methods in flight (the connection went).
void drop_methods(session_actor* self, const std::string& why) {
  auto pending = std::move(self->state.methods);
  self->state.methods.clear();
  for (auto& [rid, done] : pending)
    done(method_reply{404, json{{"error", why}}.dump()});
}

/// A cloud-to-device message for this device (payload: body/bodyBase64,
/// properties, messageId, correlationId, contentType, contentEncoding).
method_reply c2d(session_actor* self, const std::string& payload, std::function<void(method_reply)> later,
                 bool& answered_later) {
  auto& st = self->state;
  answered_later = false;
  if (st.who.is_module())
    return method_reply{400, json{{"error", "cloud-to-device messages are for devices, not modules"}}.dump()};
  auto doc = json::parse(payload, nullptr, false);
  if (!doc.is_object())
    return method_reply{400, json{{"error", "c2d: the message is not a JSON object"}}.dump()};
  message_builder b;
  if (auto it = doc.find("bodyBase64"); it != doc.end() && it->is_string()) {
    auto raw = iothub::base64_decode(it->get<std::string>());
    if (!raw)
      return method_reply{400, json{{"error", "c2d: bodyBase64 is not base64"}}.dump()};
    b.body(*raw);
  } else if (auto body = doc.find("body"); body != doc.end()) {
    b.body(body->is_string() ? body->get<std::string>() : body->dump());
  }
  if (auto props = doc.find("properties"); props != doc.end() && props->is_object())
    for (auto& [k, v] : props->items())
      b.property(k, v.is_string() ? v.get<std::string>() : v.dump());
  std::string mid = doc.value("messageId", std::string{});
  if (mid.empty()) {
    unsigned char raw[16];
    if (RAND_bytes(raw, sizeof raw) == 1) {
      static constexpr char hex[] = "0123456789abcdef";
      for (unsigned char c : raw) {
        mid += hex[c >> 4];
        mid += hex[c & 15];
      }
    }
  }
  b.message_id(mid);
  if (auto v = doc.value("correlationId", std::string{}); !v.empty())
    b.correlation_id(v);
  if (auto v = doc.value("contentType", std::string{}); !v.empty())
    b.content_type(v);
  if (auto v = doc.value("contentEncoding", std::string{}); !v.empty())
    b.content_encoding(v);
  auto m = b.build();
  if (st.queued.size() + st.inflight.size() >= st.env->cfg.max_queued)
    return method_reply{429, json{{"error", "'" + st.client_id + "' has " +
                                              std::to_string(st.queued.size() + st.inflight.size()) +
                                              " cloud-to-device messages not yet acknowledged (the most a "
                                              "device may have)"}}
                               .dump()};
  outbound o;
  o.packet.topic = iothub::c2d_topic(st.who.device_id, m);
  o.packet.payload = std::string{m.body()};
  o.needs = iothub::subscription::c2d;
  if (auto* store = stored(self)) {
    auto seq = store->add_message(st.client_id, o.packet.topic, o.packet.payload);
    if (!seq)
      return method_reply{503, json{{"error", "cannot keep the message: " + seq.err().message}}.dump()};
    o.stored_seq = *seq;
  }
  const bool now = st.connected && st.subs.count(iothub::subscription::c2d);
  if (now) {
    answered_later = true;
    o.on_ack = [later, mid] { later(method_reply{200, json{{"messageId", mid}, {"delivered", true}}.dump()}); };
  }
  st.queued.push_back(std::move(o));
  pump(self);
  if (now)
    return {};
  return method_reply{202, json{{"messageId", mid}, {"queued", true}}.dump()};
}

void handle_publish(session_actor* self, publish_call& c) {
  auto& st = self->state;
  std::vector<mqtt_publish_result> results;
  results.reserve(c.batch.size());
  std::vector<routed_message> batch;
  bool refused = false;
  for (auto& p : c.batch) {
    auto in = iothub::parse_publish_topic(p.topic, st.who);
    if (!in) {
      auto why = "publish to '" + p.topic + "' refused: " + in.err().message;
      log_refusal(self, why);
      results.emplace_back(make_error(errc::invalid_argument, why));
      refused = true;
      break;
    }
    switch (in->kind) {
      case iothub::inbound_kind::telemetry:
      case iothub::inbound_kind::module_output: {
        auto m = iothub::build_message(*in, st.who, p.payload);
        batch.push_back(routed_message{std::move(m), st.who.device_id, st.who.module_id, in->output});
        break;
      }
      case iothub::inbound_kind::twin_get:
        twin_get(self, in->rid);
        break;
      case iothub::inbound_kind::twin_patch_reported:
        twin_report(self, in->rid, p.payload);
        break;
      case iothub::inbound_kind::method_response: {
        auto it = st.methods.find(in->rid);
        if (it != st.methods.end()) {
          auto done = std::move(it->second);
          st.methods.erase(it);
          done(method_reply{in->status, json_body(p.payload)});
        } else {
          spdlog::debug("mqtt: client '{}' answered method $rid={}, which is not waiting (timed out?)",
                        st.client_id, in->rid);
        }
        break;
      }
    }
    results.emplace_back();
  }
  (void)refused;
  if (batch.empty()) {
    (*c.done)(std::move(results));
    return;
  }
  auto router = st.env->cfg.router ? st.env->cfg.router() : caf::actor{};
  if (!router) {
    std::vector<mqtt_publish_result> r;
    r.emplace_back(make_error(errc::unavailable, "the router is restarting"));
    (*c.done)(std::move(r));
    return;
  }
  auto done = c.done;
  auto client = st.client_id;
  self->request(router, caf::infinite, atoms::inject::value, std::move(batch))
    .then([done, results = std::move(results)](std::vector<std::uint64_t>&) mutable { (*done)(std::move(results)); },
          [done, client](caf::error& err) {
            auto why = caf::to_string(err);
            spdlog::warn("mqtt: client '{}': messages not accepted: {}", client, why);
            std::vector<mqtt_publish_result> r;
            r.emplace_back(make_error(errc::unavailable, "messages not accepted: " + why));
            (*done)(std::move(r));
          });
}

/// The connection ended without DISCONNECT: its Will, if any, goes out as
/// telemetry with iothub-MessageType=Will (as IoT Hub does).
void send_will(session_actor* self) {
  auto& st = self->state;
  auto will = std::exchange(st.will, std::nullopt);
  if (!will)
    return;
  auto in = iothub::parse_publish_topic(will->topic, st.who);
  if (!in || (in->kind != iothub::inbound_kind::telemetry && in->kind != iothub::inbound_kind::module_output)) {
    log_refusal(self, "will to '" + will->topic + "' not sent: " +
                        (in ? std::string{"a will must go to the client's telemetry topic"} : in.err().message));
    return;
  }
  auto b = message_builder::from(iothub::build_message(*in, st.who, will->payload));
  b.property("iothub-MessageType", "Will");
  auto router = st.env->cfg.router ? st.env->cfg.router() : caf::actor{};
  if (!router)
    return;
  std::vector<routed_message> batch;
  batch.push_back(routed_message{b.build(), st.who.device_id, st.who.module_id, in->output});
  self->request(router, caf::infinite, atoms::inject::value, std::move(batch))
    .then([](std::vector<std::uint64_t>&) {},
          [client = st.client_id](caf::error& err) {
            spdlog::warn("mqtt: client '{}': will not accepted: {}", client, caf::to_string(err));
          });
}

caf::behavior session_impl(session_actor* self, std::shared_ptr<head_env> env, iothub::client_identity who,
                           bool persistent, std::shared_ptr<mqtt_channel> channel, std::uint64_t conn,
                           std::optional<mqtt::will_message> will, std::shared_ptr<stored_session> restored) {
  auto& st = self->state;
  st.will = std::move(will);
  if (restored) {
    // Brought back from disk: disconnected until its client returns.
    for (unsigned i = 0; i < 32; ++i)
      if (restored->subscriptions & (1u << i))
        st.subs.insert(static_cast<iothub::subscription>(i));
    for (auto& m : restored->messages) {
      outbound o;
      o.packet.topic = std::move(m.topic);
      o.packet.payload = std::move(m.payload);
      o.needs = iothub::subscription::c2d;
      o.stored_seq = m.seq;
      st.queued.push_back(std::move(o));
    }
  }
  st.env = std::move(env);
  st.who = std::move(who);
  st.client_id = st.who.to_string();
  st.persistent = persistent;
  st.channel = std::move(channel);
  st.conn = conn;
  st.connected = st.channel != nullptr;
  // Whatever ends this actor ends its connection.
  st.last_channel = std::make_shared<std::shared_ptr<mqtt_channel>>(st.channel);
  self->attach_functor([cell = st.last_channel](const caf::error& reason) {
    if (*cell)
      (*cell)->close(reason ? "the session ended: " + caf::to_string(reason) : "the session ended");
  });
  // Stopped (replaced, or the node stops): the methods waiting for the
  // client are answered now, not by their callers' timeouts.
  self->set_exit_handler([self](caf::exit_msg& m) {
    drop_methods(self, "'" + self->state.client_id + "''s session ended");
    self->quit(m.reason);
  });
  if (is_node_module(st)) {
    // The module's instance at the router: its inputs come here.
    if (auto router = st.env->cfg.router ? st.env->cfg.router() : caf::actor{})
      self->send(router, atoms::module_up::value, st.who.module_id, caf::actor_cast<caf::actor>(self));
  }
  // A restored session's waiting messages go out at once (the server sends
  // them after its CONNACK).
  pump(self);
  return {
    [self](publish_call& c) {
      if (c.conn != self->state.conn)
        return;  // an old connection's: its guard answers
      handle_publish(self, c);
    },
    [self](subscribe_call& c) {
      auto& st = self->state;
      if (c.conn != st.conn)
        return;
      std::vector<std::uint8_t> codes;
      for (auto& f : c.filters) {
        auto kind = iothub::check_subscription(f.filter, st.who);
        if (!kind) {
          log_refusal(self, "subscription '" + f.filter + "' refused: " + kind.err().message);
          codes.push_back(0x80);
          continue;
        }
        st.subs.insert(*kind);
        codes.push_back(f.qos >= 1 ? 1 : 0);
      }
      if (auto* store = stored(self))
        if (auto ok = store->save(st.client_id, subscription_mask(st.subs)); !ok)
          spdlog::error("mqtt: client '{}': subscriptions not kept: {}", st.client_id, ok.err().message);
      (*c.done)(std::move(codes));
      pump(self);
    },
    [self](unsubscribe_call& c) {
      auto& st = self->state;
      if (c.conn != st.conn)
        return;
      for (auto& f : c.filters)
        if (auto kind = iothub::check_subscription(f, st.who))
          st.subs.erase(*kind);
      if (auto* store = stored(self))
        if (auto ok = store->save(st.client_id, subscription_mask(st.subs)); !ok)
          spdlog::error("mqtt: client '{}': subscriptions not kept: {}", st.client_id, ok.err().message);
      (*c.done)(expected<void>{});
    },
    [self](acked_call& c) {
      auto& st = self->state;
      if (c.conn != st.conn)
        return;
      auto it = st.inflight.find(c.packet_id);
      if (it == st.inflight.end())
        return;
      auto o = std::move(it->second);
      st.inflight.erase(it);
      if (o.input) {
        st.input_acks[o.token] = true;
        std::uint64_t upto = 0;
        while (!st.input_acks.empty() && st.input_acks.begin()->second) {
          upto = st.input_acks.begin()->first;
          st.input_acks.erase(st.input_acks.begin());
        }
        if (upto != 0)
          if (auto router = st.env->cfg.router ? st.env->cfg.router() : caf::actor{})
            self->send(router, atoms::delivered::value, st.who.module_id, upto);
      }
      if (o.stored_seq != 0)
        if (auto* store = stored(self))
          if (auto ok = store->remove_message(st.client_id, o.stored_seq); !ok)
            spdlog::error("mqtt: client '{}': acknowledged message not removed: {}", st.client_id, ok.err().message);
      if (o.on_ack)
        o.on_ack();
    },
    [self](closed_call& c) {
      auto& st = self->state;
      if (c.conn != st.conn)
        return;
      st.connected = false;
      st.env->cfg.directory->set_connected(st.client_id, caf::actor_cast<caf::actor>(self), false);
      if (c.clean)
        st.will.reset();
      else
        send_will(self);
      drop_methods(self, "'" + st.client_id + "' disconnected");
      if (!st.persistent) {
        self->quit();
        return;
      }
      // Unacknowledged QoS 1 messages go out again (DUP) when it comes back.
      requeue_inflight(st);
    },
    [self](attach_call& c) {
      auto& st = self->state;
      if (st.connected && st.channel)
        st.channel->close("replaced by a new connection with the same client id");
      // Its old connection's close will not count (another connection's id).
      requeue_inflight(st);
      drop_methods(self, "'" + st.client_id + "' reconnected");
      (*c.done)(true);
      st.channel = std::move(c.channel);
      st.conn = c.conn;
      st.will = std::move(c.will);
      st.connected = true;
      st.env->cfg.directory->set_connected(st.client_id, caf::actor_cast<caf::actor>(self), true);
      *st.last_channel = st.channel;
      pump(self);
    },
    [self](desired_seen& d) { self->state.known_desired = std::move(d.desired); },
    [self](method_timeout& t) {
      auto& st = self->state;
      auto it = st.methods.find(t.rid);
      if (it == st.methods.end())
        return;
      auto done = std::move(it->second);
      st.methods.erase(it);
      done(method_reply{504, json{{"error", "'" + st.client_id + "' did not answer in time"}}.dump()});
    },
    // From the fleet: a method (or a C2D message) for this device.
    [self](atoms::invoke, const std::string&, const std::string& method, const std::string& payload,
           std::uint32_t timeout_ms) -> caf::result<method_reply> {
      auto rp = self->make_response_promise<method_reply>();
      auto done = [rp](method_reply r) mutable { rp.deliver(std::move(r)); };
      if (method == c2d_method) {
        bool later = false;
        auto r = c2d(self, payload, done, later);
        if (!later)
          rp.deliver(std::move(r));
        return rp;
      }
      call_method(self, method, payload, timeout_ms, done);
      return rp;
    },
    // From a process module's host: a method for the module.
    [self](atoms::method, const std::string& method, const std::string& payload) -> caf::result<int, std::string> {
      auto rp = self->make_response_promise<int, std::string>();
      call_method(self, method, payload, 30000,
                  [rp](method_reply r) mutable { rp.deliver(r.status, std::move(r.payload_json)); });
      return rp;
    },
    // From the fleet: the whole desired document of a leaf device, and its version.
    [self](atoms::desired, const std::string& doc, std::int64_t version) {
      auto j = json::parse(doc, nullptr, false);
      if (j.is_object())
        push_desired(self, j, version);
    },
    // From a process module's host: its desired properties (whole or a patch).
    [self](atoms::desired, const std::string& doc, bool complete) {
      auto& st = self->state;
      auto j = json::parse(doc, nullptr, false);
      if (!j.is_object())
        return;
      ++st.module_desired_version;
      if (complete) {
        push_desired(self, j, st.module_desired_version);
      } else if (st.connected && st.subs.count(iothub::subscription::desired_patches)) {
        if (st.known_desired)
          st.known_desired->merge_patch(j);
        j["$version"] = st.module_desired_version;
        answer(self, iothub::desired_patch_topic(st.module_desired_version), j.dump());
      }
    },
    // From the router: a message for one of this module's inputs.
    [self](atoms::input, const std::string& input, const message& m, std::uint64_t token) {
      auto& st = self->state;
      outbound o;
      o.packet.topic = iothub::module_input_topic(st.who.device_id, st.who.module_id, input, m);
      o.packet.payload = std::string{m.body()};
      o.needs = iothub::subscription::module_inputs;
      o.input = true;
      o.token = token;
      st.input_acks.emplace(token, false);
      st.queued.push_back(std::move(o));
      pump(self);
    },
    // The router resends after a nack; a session never nacks, so it only
    // follows the protocol.
    [](atoms::resume) {},
  };
}

/// The mqtt_session the server holds for one connection: hands every call
/// to the session actor, tagged with the connection.
class session_proxy final : public mqtt_session {
 public:
  session_proxy(caf::actor session, std::uint64_t conn) : session_(std::move(session)), conn_(conn) {}

  void publish(std::vector<mqtt::publish_packet> batch,
               std::function<void(std::vector<mqtt_publish_result>)> done) override {
    auto n = batch.size();
    caf::anon_send(session_, publish_call{conn_, std::move(batch), std::make_shared<publish_reply>(n, std::move(done))});
  }
  void subscribe(std::vector<mqtt::subscription> filters, reply_fn<std::vector<std::uint8_t>> done) override {
    caf::anon_send(session_, subscribe_call{conn_, std::move(filters), guard(std::move(done))});
  }
  void unsubscribe(std::vector<std::string> filters, reply_fn<void> done) override {
    caf::anon_send(session_, unsubscribe_call{conn_, std::move(filters), guard(std::move(done))});
  }
  void acked(std::uint16_t packet_id) override { caf::anon_send(session_, acked_call{conn_, packet_id}); }
  void closed(std::string reason, bool clean) override {
    caf::anon_send(session_, closed_call{conn_, std::move(reason), clean});
  }

 private:
  caf::actor session_;
  std::uint64_t conn_;
};

}  // namespace

// --- the gateway ------------------------------------------------------------------------

struct mqtt_gateway::impl : std::enable_shared_from_this<mqtt_gateway::impl> {
  caf::actor_system& sys;
  std::shared_ptr<head_env> env;

  impl(caf::actor_system& s, mqtt_head_config cfg) : sys(s), env(std::make_shared<head_env>()) {
    env->cfg = std::move(cfg);
  }

  using done_fn = std::function<void(std::variant<mqtt_accept, mqtt_refusal>)>;

  void refuse(const std::string& client_id, mqtt_refusal r, const done_fn& done) {
    spdlog::warn("mqtt: client '{}' refused: {}", client_id, r.reason);
    done(std::move(r));
  }

  /// Makes `session` a temporary child `child_id` of `downstream`; when it
  /// ends it leaves the directory and the supervisor.
  void supervise(const caf::actor& session, const std::string& client_id, const std::string& child_id,
                 const caf::actor& downstream) {
    auto dir = env->cfg.directory;
    session->attach_functor([dir, client_id, downstream, child_id,
                             weak = caf::actor_cast<caf::weak_actor_ptr>(session)](const caf::error&) {
      if (auto self = caf::actor_cast<caf::actor>(weak.lock()))
        dir->erase(client_id, self);
      if (downstream)
        caf::anon_send(downstream, atoms::remove_child::value, child_id);
    });
    if (downstream) {
      child_spec spec;
      spec.id = child_id;
      spec.restart = restart_type::temporary;
      spec.start = [session](caf::actor_system&) { return session; };
      caf::anon_send(downstream, atoms::add_child::value, std::move(spec));
    }
  }

  /// Authenticated: makes (or resumes) the client's session.
  void accept(const mqtt_connect_info& info, const mqtt_identity& id, std::shared_ptr<mqtt_channel> channel,
              const done_fn& done) {
    auto& cfg = env->cfg;
    const auto client_id = id.who.to_string();
    const bool persistent = !info.packet.clean_session && !id.who.is_module();
    if (persistent) {
      if (auto old = cfg.directory->find_persistent(client_id)) {
        // Resume: the session actor takes the new connection; if it ended
        // in the meantime, a new one starts from what is stored.
        auto self = shared_from_this();
        auto reply = std::make_shared<attach_reply>([self, info, id, channel, done, old, client_id](bool ok) {
          if (!ok) {
            self->start_session(info, id, channel, done);
            return;
          }
          spdlog::info("mqtt: client '{}' connected ({}), session resumed", client_id, id.auth);
          done(mqtt_accept{std::make_shared<session_proxy>(old, info.connection_id), true});
        });
        caf::anon_send(old, attach_call{info.connection_id, channel, info.packet.will, std::move(reply)});
        return;
      }
    }
    start_session(info, id, channel, done);
  }

  /// A new session actor for the client: a persistent one starts from what
  /// the session store keeps of it (a node restart, or a client that came
  /// back before the stored sessions were restored).
  void start_session(const mqtt_connect_info& info, const mqtt_identity& id, std::shared_ptr<mqtt_channel> channel,
                     const done_fn& done) {
    auto& cfg = env->cfg;
    const auto client_id = id.who.to_string();
    const bool persistent = !info.packet.clean_session && !id.who.is_module();
    std::shared_ptr<stored_session> restored;
    if (persistent && cfg.sessions) {
      auto kept = cfg.sessions->load(client_id);
      if (!kept)
        spdlog::error("mqtt: client '{}': session store: {}", client_id, kept.err().message);
      else if (*kept)
        restored = std::make_shared<stored_session>(std::move(**kept));
    }
    auto session = sys.spawn(session_impl, env, id.who, persistent, channel, info.connection_id, info.packet.will,
                             restored);
    auto downstream = cfg.downstream ? cfg.downstream() : caf::actor{};
    supervise(session, client_id, client_id + "#" + std::to_string(info.connection_id), downstream);
    if (auto old = cfg.directory->put(client_id, session, persistent)) {
      // Another connection of the same client: it goes (as IoT Hub does).
      caf::anon_send_exit(old, caf::exit_reason::user_shutdown);
    }
    if (!id.who.is_module() && cfg.sessions) {
      // A clean session ends a persistent one (after the new session took
      // the client's place, so the old one no longer writes); a persistent
      // one is kept.
      auto ok = !persistent ? cfg.sessions->drop(client_id)
                            : restored ? expected<void>{} : cfg.sessions->save(client_id, 0);
      if (!ok)
        spdlog::error("mqtt: client '{}': session store: {}", client_id, ok.err().message);
    }
    spdlog::info("mqtt: client '{}' connected ({}{})", client_id, id.auth,
                 persistent ? (restored ? ", persistent session restored" : ", persistent session") : "");
    done(mqtt_accept{std::make_shared<session_proxy>(session, info.connection_id), restored != nullptr});
  }
};

mqtt_gateway::mqtt_gateway(caf::actor_system& sys, mqtt_head_config cfg)
    : impl_(std::make_shared<impl>(sys, std::move(cfg))) {}

mqtt_gateway::~mqtt_gateway() = default;

void mqtt_gateway::restore_sessions(const caf::actor& downstream) {
  auto& cfg = impl_->env->cfg;
  if (!cfg.sessions)
    return;
  auto all = cfg.sessions->load_all();
  if (!all) {
    spdlog::error("mqtt: persistent sessions not restored: {}", all.err().message);
    return;
  }
  std::size_t n = 0;
  for (auto& s : *all) {
    auto who = iothub::parse_client_id(s.client_id);
    if (!who || who->is_module())
      continue;
    auto restored = std::make_shared<stored_session>(std::move(s));
    auto session = impl_->sys.spawn(session_impl, impl_->env, *who, true, std::shared_ptr<mqtt_channel>{},
                                    std::uint64_t{0}, std::optional<mqtt::will_message>{}, restored);
    if (!cfg.directory->put_restored(restored->client_id, session)) {
      // Its client connected already (and resumed or replaced it).
      caf::anon_send_exit(session, caf::exit_reason::user_shutdown);
      continue;
    }
    impl_->supervise(session, restored->client_id, restored->client_id + "#restored", downstream);
    ++n;
  }
  if (n > 0)
    spdlog::info("mqtt: {} persistent session(s) restored", n);
}

void mqtt_gateway::connect(mqtt_connect_info info, std::shared_ptr<mqtt_channel> channel,
                           std::function<void(std::variant<mqtt_accept, mqtt_refusal>)> done) {
  auto self = impl_;
  auto& cfg = self->env->cfg;
  const auto& client_id = info.packet.client_id;
  auto claimed = mqtt_claimed_identity(info);
  if (auto* r = std::get_if<mqtt_refusal>(&claimed)) {
    self->refuse(client_id, std::move(*r), done);
    return;
  }
  auto who = std::get<iothub::client_identity>(claimed);
  auto decide = [self, info, channel, done](std::optional<mqtt_credentials> creds) {
    auto& cfg = self->env->cfg;
    mqtt_auth_context ctx{cfg.node_id, cfg.hub_host, cfg.clk->wall_ms() / 1000};
    auto r = authenticate_mqtt(info, creds, ctx);
    if (auto* refusal = std::get_if<mqtt_refusal>(&r)) {
      self->refuse(info.packet.client_id, std::move(*refusal), done);
      return;
    }
    self->accept(info, std::get<mqtt_identity>(r), channel, done);
  };
  if (who.is_module()) {
    if (who.device_id != cfg.node_id) {
      self->refuse(client_id,
                   mqtt_refusal{mqtt::connack_code::not_authorized,
                                "module identities connect only to their own node: '" + who.device_id +
                                  "' is not this node ('" + cfg.node_id + "')"},
                   done);
      return;
    }
    std::optional<mqtt_credentials> creds;
    if (auto key = cfg.keys->find(who.module_id)) {
      mqtt_credentials c;
      c.auth = "sas";
      c.primary_key = *key;
      creds = std::move(c);
    }
    decide(std::move(creds));
    return;
  }
  if (!cfg.fleet) {
    self->refuse(client_id,
                 mqtt_refusal{mqtt::connack_code::not_authorized,
                              "this node has no device registry (it is neither the hub nor linked to one)"},
                 done);
    return;
  }
  cfg.fleet->device_get(who.device_id, [decide, self, client_id, done](expected<device_record> rec) {
    if (!rec) {
      if (rec.err().code == errc::not_found) {
        decide(std::nullopt);
        return;
      }
      self->refuse(client_id,
                   mqtt_refusal{mqtt::connack_code::server_unavailable, "registry: " + rec.err().message}, done);
      return;
    }
    if (rec->kind != "device") {
      self->refuse(client_id,
                   mqtt_refusal{mqtt::connack_code::not_authorized,
                                "'" + rec->id + "' is a " + rec->kind + ", which links with `--parent`, not MQTT"},
                   done);
      return;
    }
    mqtt_credentials c;
    c.parent = rec->parent;
    c.auth = rec->auth;
    c.thumbprint = rec->thumbprint;
    c.primary_key = rec->primary_key;
    c.secondary_key = rec->secondary_key;
    decide(std::move(c));
  });
}

}  // namespace canopy
