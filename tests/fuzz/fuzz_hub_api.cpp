// libFuzzer target: the hub's REST API (gateway/hub_api) without a network.
// Each input is a short session of requests against one in-memory hub that
// answers synchronously, so that a device created by one request is there for
// the next. handle_hub_request() routes them as the http_server would.
//
// Input format (the seeds in corpus/hub_api are readable): requests separated
// by NUL bytes; each is a request line "METHOD PATH[?k=v&k=v...]", a newline,
// and the body. GET /telemetry answers one record whose message body is the
// request's body (so arbitrary bytes reach the body encoder).
//
// Invariants: exactly one answer per request; a status from 200 to 599; a 2xx
// other than 204 has a JSON body, a 204 none; a status >= 400 has a JSON
// object body {"error": "<non-empty string>"}; never 500 (this hub never
// fails, so a 500 is the API's own fault: a throw or an encoding failure).
#include "gateway/http_server.hpp"
#include "gateway/hub_api.hpp"
#include "gateway/hub_control.hpp"

#include <canopy/message.hpp>
#include <nlohmann/json.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace {

using nlohmann::json;
using namespace canopy;

void check(bool ok, const char* what, const std::string& detail) {
  if (!ok) {
    std::fprintf(stderr, "invariant violated: %s: %s\n", what, detail.c_str());
    __builtin_trap();
  }
}

/// A hub in memory: the registry's answers, at once, on the calling thread.
class fake_hub final : public hub_control {
 public:
  /// The body of the request being handled (telemetry answers it as a message body).
  std::string current_body;

  void device_create(device_record rec, reply_fn<device_record> done) override {
    if (devices_.count(rec.id) != 0)
      return done(make_error(errc::already_exists, "registry: device '" + rec.id + "' exists"));
    if (!rec.parent.empty() && devices_.count(rec.parent) == 0)
      return done(make_error(errc::not_found, "registry: parent '" + rec.parent + "' unknown"));
    rec.created_ms = rec.updated_ms = 1700000000000;
    devices_[rec.id] = rec;
    done(std::move(rec));
  }
  void device_list(reply_fn<std::vector<device_record>> done) override {
    std::vector<device_record> out;
    for (auto& [id, d] : devices_)
      out.push_back(d);
    done(std::move(out));
  }
  void device_get(std::string id, reply_fn<device_record> done) override {
    auto it = devices_.find(id);
    if (it == devices_.end())
      return done(unknown(id));
    done(it->second);
  }
  void device_delete(std::string id, reply_fn<void> done) override {
    if (devices_.erase(id) == 0)
      return done(unknown(id));
    done(expected<void>{});
  }
  void device_set_tags(std::string id, json tags, reply_fn<device_record> done) override {
    auto it = devices_.find(id);
    if (it == devices_.end())
      return done(unknown(id));
    it->second.tags = std::move(tags);
    done(it->second);
  }

  void deployment_create(deployment_record rec, reply_fn<deployment_record> done) override {
    if (deployments_.count(rec.id) != 0)
      return done(make_error(errc::already_exists, "registry: deployment '" + rec.id + "' exists"));
    deployments_[rec.id] = rec;
    done(std::move(rec));
  }
  void deployment_list(reply_fn<std::vector<deployment_summary>> done) override {
    std::vector<deployment_summary> out;
    for (auto& [id, d] : deployments_)
      out.push_back(summary(d));
    done(std::move(out));
  }
  void deployment_get(std::string id, reply_fn<deployment_summary> done) override {
    auto it = deployments_.find(id);
    if (it == deployments_.end())
      return done(make_error(errc::not_found, "registry: deployment '" + id + "' unknown"));
    done(summary(it->second));
  }
  void deployment_delete(std::string id, reply_fn<void> done) override {
    if (deployments_.erase(id) == 0)
      return done(make_error(errc::not_found, "registry: deployment '" + id + "' unknown"));
    done(expected<void>{});
  }

  void twin_get(std::string device, std::string module, reply_fn<twin_record> done) override {
    if (devices_.count(device) == 0)
      return done(unknown(device));
    done(twin(device, module));
  }
  void twin_patch(std::string device, std::string module, json patch,
                  reply_fn<twin_record> done) override {
    if (devices_.count(device) == 0)
      return done(unknown(device));
    auto& t = twin(device, module);
    t.desired.merge_patch(patch);
    if (!t.desired.is_object())
      t.desired = json::object();
    ++t.desired_version;
    // What a device would report back: the desired document, as it is.
    t.reported = t.desired;
    ++t.reported_version;
    done(t);
  }

  void invoke(std::string device, std::string module, std::string method,
              std::string payload_json, std::chrono::milliseconds timeout,
              reply_fn<method_reply> done) override {
    (void) module;
    (void) timeout;
    if (devices_.count(device) == 0)
      return done(unknown(device));
    if (method == "slow")
      return done(make_error(errc::timeout, "invoke: no answer within the timeout"));
    if (method == "offline")
      return done(make_error(errc::unavailable, "invoke: '" + device + "' is not connected"));
    // A module answers what it likes: the payload back, or any text.
    done(method_reply{static_cast<int>(method.size()) * 7 - 100,
                      method == "echo" ? std::move(payload_json) : method});
  }

  void status(reply_fn<std::vector<fleet_node>> done) override {
    std::vector<fleet_node> out;
    for (auto& [id, d] : devices_) {
      fleet_node n;
      n.device = d;
      n.connected = d.kind == "gateway";
      n.deployment = deployments_.empty() ? "" : deployments_.begin()->first;
      n.modules.push_back(module_row{"m", "actor", "1.0", "running", "running", "always", 2, 1, 2,
                                     id});
      out.push_back(std::move(n));
    }
    done(std::move(out));
  }

  void telemetry(std::string device, std::int64_t since_ms, std::int64_t after_seq,
                 std::size_t limit, reply_fn<std::vector<telemetry_record>> done) override {
    std::vector<telemetry_record> out;
    if (limit == 0)
      return done(std::move(out));
    telemetry_record r;
    r.seq = after_seq + 1;
    r.enqueued_ms = since_ms;
    r.device = device;
    r.module = "m";
    r.output = current_body.substr(0, 16);
    r.msg = message_builder{}
              .body(current_body)
              .property(current_body.substr(0, 8), current_body)
              .message_id(current_body.substr(0, 4))
              .content_type("application/json")
              .build();
    out.push_back(std::move(r));
    done(std::move(out));
  }

 private:
  static error unknown(const std::string& id) {
    return make_error(errc::not_found, "registry: device '" + id + "' unknown");
  }
  deployment_summary summary(const deployment_record& d) {
    deployment_summary s;
    s.deployment = d;
    for (auto& [id, dev] : devices_) {
      s.targeted.push_back(id);
      s.statuses.push_back(deployment_status{d.id, id, "failed", dev.tags.dump(), 1});
    }
    return s;
  }
  twin_record& twin(const std::string& device, const std::string& module) {
    auto& t = twins_[{device, module}];
    t.device = device;
    t.module = module;
    return t;
  }

  std::map<std::string, device_record> devices_;
  std::map<std::string, deployment_record> deployments_;
  std::map<std::pair<std::string, std::string>, twin_record> twins_;
};

/// "METHOD PATH?QUERY\nBODY" -> a request (the server's decoding already done).
http_request parse_request(std::string_view text) {
  http_request req;
  auto nl = text.find('\n');
  std::string_view line = text.substr(0, nl);
  req.body = nl == std::string_view::npos ? "" : std::string(text.substr(nl + 1));
  auto sp = line.find(' ');
  req.method = std::string(line.substr(0, sp));
  std::string_view target = sp == std::string_view::npos ? "/" : line.substr(sp + 1);
  auto q = target.find('?');
  req.path = std::string(target.substr(0, q));
  if (q != std::string_view::npos) {
    auto rest = target.substr(q + 1);
    while (!rest.empty()) {
      auto amp = rest.find('&');
      auto pair = rest.substr(0, amp);
      auto eq = pair.find('=');
      req.query[std::string(pair.substr(0, eq))] =
        eq == std::string_view::npos ? "" : std::string(pair.substr(eq + 1));
      if (amp == std::string_view::npos)
        break;
      rest.remove_prefix(amp + 1);
    }
  }
  return req;
}

void check_answer(const http_request& req, int answers, const http_response& r) {
  const std::string what = req.method + " " + req.path + " -> " + std::to_string(r.status) + " " +
                           r.body.substr(0, 300);
  check(answers == 1, "exactly one answer", what + " (" + std::to_string(answers) + " answers)");
  check(r.status >= 200 && r.status <= 599, "a valid status", what);
  check(r.status != 500, "no 500 from a hub that never fails", what);
  if (r.status == 204) {
    check(r.body.empty(), "204 has no body", what);
    return;
  }
  check(r.content_type == "application/json", "JSON content type", what);
  auto doc = json::parse(r.body, nullptr, false);
  check(!doc.is_discarded(), "the body is JSON", what);
  if (r.status >= 400) {
    check(doc.is_object() && doc.size() == 1 && doc.contains("error"), "errors are {\"error\"}",
          what);
    check(doc["error"].is_string() && !doc["error"].get<std::string>().empty(),
          "the error says something", what);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  std::string_view input(reinterpret_cast<const char*>(data), size);
  fake_hub hub;
  // At most 8 requests per session: enough to create, use and delete.
  for (int n = 0; n < 8 && !input.empty(); ++n) {
    auto nul = input.find('\0');
    auto req = parse_request(input.substr(0, nul));
    input = nul == std::string_view::npos ? std::string_view{} : input.substr(nul + 1);

    hub.current_body = req.body;
    const auto copy = req;
    int answers = 0;
    http_response last;
    handle_hub_request(hub, std::move(req), [&](http_response r) {
      ++answers;
      last = std::move(r);
    });
    check_answer(copy, answers, last);
  }
  return 0;
}
