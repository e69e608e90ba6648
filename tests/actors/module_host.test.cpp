#include "actors/module_host.hpp"

#include "actor_fixture.hpp"
#include "runtime/atoms.hpp"
#include "runtime/router.hpp"

#include <caf/all.hpp>
#include <catch2/catch.hpp>
#include <spdlog/sinks/null_sink.h>

#include <atomic>

using namespace canopy;
using namespace std::chrono_literals;

namespace {

// What the test module saw; one per test (tests run one at a time).
struct probe {
  std::atomic<int> starts{0}, stops{0}, messages{0}, desired_calls{0};
  std::atomic<bool> last_desired_complete{false};
  std::string last_input;
};
probe* current = nullptr;

class test_module : public module {
 public:
  void start(module_context& ctx, const json& settings) override {
    ++current->starts;
    if (settings.value("throwOnStart", false))
      throw std::runtime_error("bad settings");
    ctx_ = &ctx;
    ctx.on_method("echo", [](const json& p) { return method_result{200, p}; });
    ctx.on_method("boom", [](const json&) -> method_result { throw std::runtime_error("method exploded"); });
    ctx.on_method("report", [this](const json& p) {
      ctx_->report(p);
      return method_result{};
    });
    ctx.on_method("later", [this](const json&) {
      ctx_->after(1ms, [this] { ctx_->send("timer", message_builder{}.body("fired").build()); });
      return method_result{};
    });
    ctx.on_method("finish", [this](const json&) {
      ctx_->finish();
      return method_result{};
    });
    ctx.on_method("env", [this](const json&) {
      return method_result{200, json{{"v", ctx_->env("A").value_or("none")}}};
    });
  }
  void stop() override { ++current->stops; }
  void on_message(std::string_view input, const message& m) override {
    ++current->messages;
    if (input == "crash")
      throw std::runtime_error("crash requested");
    ctx_->send("out", m);
  }
  void on_desired_properties(const json&, bool complete) override {
    ++current->desired_calls;
    current->last_desired_complete = complete;
  }

 private:
  module_context* ctx_ = nullptr;
};

const canopy_module_descriptor* test_descriptor() {
  static const canopy_module_descriptor d{module_abi_version, sdk_version, "test_module",
                                          []() -> module* { return new test_module(); },
                                          [](module* m) { delete m; }};
  return &d;
}

struct fixture : canopy::unit_test::actor_fixture {
  probe p;

  fixture() { current = &p; }
  ~fixture() {
    shutdown();  // the modules go before the probe they write to
    current = nullptr;
  }

  caf::actor spawn(nlohmann::json settings = nlohmann::json::object()) {
    module_host_config hc;
    hc.name = "m";
    hc.device_id = "dev";
    hc.type = std::make_shared<const module_type>("builtin:test", test_descriptor(), nullptr);
    hc.settings = std::move(settings);
    hc.env = {{"A", "1"}};
    hc.desired = {{"threshold", 3}};
    hc.router = caf::actor{*self};
    hc.agent = caf::actor{*self};
    hc.logger = std::make_shared<spdlog::logger>("m", std::make_shared<spdlog::sinks::null_sink_mt>());
    return spawn_module_host(*sys, hc);
  }

  caf::actor wait_up() {
    caf::actor up;
    (*self)->receive([&](atoms::module_up, const std::string& name, caf::actor& a, std::uint64_t) {
      CHECK(name == "m");
      up = a;
    }, caf::after(5s) >> [] { FAIL("no module_up"); });
    return up;
  }

  std::pair<int, std::string> call(caf::actor a, const std::string& method, const std::string& payload) {
    std::pair<int, std::string> out{0, ""};
    (*self)->request(a, 5s, atoms::method::value, method, payload)
      .receive([&](int status, std::string& body) { out = {status, body}; },
               [&](caf::error& err) { FAIL("method failed: " << caf::to_string(err)); });
    return out;
  }

  caf::error wait_down(caf::actor a) {
    caf::error reason;
    (*self)->monitor(a);
    (*self)->receive([&](caf::down_msg& dm) { reason = dm.reason; },
                     caf::after(5s) >> [] { FAIL("the module did not stop"); });
    return reason;
  }
};

}  // namespace

TEST_CASE("a module host starts the module, gives it its desired properties, then registers") {
  fixture f;
  auto a = f.spawn();
  CHECK(f.wait_up() == a);
  CHECK(f.p.starts == 1);
  CHECK(f.p.desired_calls == 1);
  CHECK(f.p.last_desired_complete);
  caf::anon_send_exit(a, caf::exit_reason::user_shutdown);
}

TEST_CASE("inputs reach on_message and send() goes to the router with its source") {
  fixture f;
  auto a = f.spawn();
  f.wait_up();
  auto m = message_builder{}.body("hello").build();
  (*f.self)->send(a, atoms::input::value, std::string{"in"}, m, std::uint64_t{7});
  (*f.self)->receive([&](atoms::route_msg, const routed_message& rm) {
    CHECK(rm.module == "m");
    CHECK(rm.output == "out");
    CHECK(rm.device == "dev");
    CHECK(rm.msg.same_buffer(m));  // forwarded, not re-encoded
  }, caf::after(5s) >> [] { FAIL("nothing routed"); });
  // The input is acknowledged to the router after on_message returned.
  (*f.self)->receive([&](atoms::delivered, const std::string& name, std::uint64_t token, std::uint64_t sent) {
    CHECK(name == "m");
    CHECK(token == 7);
    CHECK(sent == 1);  // it sent one message before acknowledging
  }, caf::after(5s) >> [] { FAIL("no acknowledgement"); });
  caf::anon_send_exit(a, caf::exit_reason::user_shutdown);
}

TEST_CASE("inputs are acknowledged cumulatively; the one that crashed the instance is not") {
  fixture f;
  auto a = f.spawn();
  f.wait_up();
  // The test module forwards input "in" as a send: tokens 1..3 handled, 4 crashes.
  for (std::uint64_t t = 1; t <= 3; ++t)
    (*f.self)->send(a, atoms::input::value, std::string{"in"}, message_builder{}.body("x").build(), t);
  (*f.self)->send(a, atoms::input::value, std::string{"crash"}, message{}, std::uint64_t{4});
  std::uint64_t acked = 0;
  bool down = false;
  (*f.self)->monitor(a);
  while (!down)
    (*f.self)->receive([&](atoms::route_msg, const routed_message&) {},
                       [&](atoms::delivered, const std::string&, std::uint64_t token, std::uint64_t) {
                         CHECK(token > acked);
                         acked = token;
                       },
                       [&](caf::down_msg&) { down = true; },
                       caf::after(5s) >> [&] { FAIL("no crash"); });
  // Anything queued before the down message has arrived (same sender order).
  CHECK(acked == 3);
}

TEST_CASE("direct methods: handlers, unknown names, bad payloads, env") {
  fixture f;
  auto a = f.spawn();
  f.wait_up();
  auto [s1, b1] = f.call(a, "echo", R"({"x":1})");
  CHECK(s1 == 200);
  CHECK(nlohmann::json::parse(b1) == nlohmann::json{{"x", 1}});
  auto [s2, b2] = f.call(a, "nope", "{}");
  CHECK(s2 == 501);
  CHECK(b2.find("nope") != std::string::npos);
  auto [s3, b3] = f.call(a, "echo", "{not json");
  CHECK(s3 == 400);
  auto [s4, b4] = f.call(a, "env", "{}");
  CHECK(nlohmann::json::parse(b4)["v"] == "1");
  caf::anon_send_exit(a, caf::exit_reason::user_shutdown);
}

TEST_CASE("a throwing method answers 500 and crashes the instance with the exception's text") {
  fixture f;
  auto a = f.spawn();
  f.wait_up();
  (*f.self)->monitor(a);
  auto [status, body] = f.call(a, "boom", "{}");
  CHECK(status == 500);
  CHECK(body.find("method exploded") != std::string::npos);
  caf::error reason;
  (*f.self)->receive([&](caf::down_msg& dm) { reason = dm.reason; }, caf::after(5s) >> [] { FAIL("alive"); });
  CHECK(caf::to_string(reason).find("method exploded") != std::string::npos);
  CHECK(f.p.stops == 0);  // a crash is not an orderly stop
}

TEST_CASE("a throwing on_message crashes the instance with the exception's text") {
  fixture f;
  auto a = f.spawn();
  f.wait_up();
  (*f.self)->send(a, atoms::input::value, std::string{"crash"}, message{}, std::uint64_t{1});
  auto reason = f.wait_down(a);
  CHECK(caf::to_string(reason).find("crash requested") != std::string::npos);
}

TEST_CASE("a throwing start() ends the instance before it registers") {
  fixture f;
  auto a = f.spawn({{"throwOnStart", true}});
  auto reason = f.wait_down(a);
  CHECK(caf::to_string(reason).find("bad settings") != std::string::npos);
  CHECK(f.p.stops == 0);
}

TEST_CASE("an orderly stop calls stop(); finish() ends the instance normally") {
  fixture f;
  auto a = f.spawn();
  f.wait_up();
  (*f.self)->monitor(a);
  caf::anon_send_exit(a, caf::exit_reason::user_shutdown);
  (*f.self)->receive([](caf::down_msg&) {}, caf::after(5s) >> [] { FAIL("alive"); });
  CHECK(f.p.stops == 1);
  auto b = f.spawn();
  f.wait_up();
  (*f.self)->monitor(b);
  f.call(b, "finish", "{}");
  caf::error reason = caf::make_error(caf::sec::runtime_error);
  (*f.self)->receive([&](caf::down_msg& dm) { reason = dm.reason; }, caf::after(5s) >> [] { FAIL("alive"); });
  CHECK(reason == caf::exit_reason::normal);
}

TEST_CASE("health pings are answered; reports reach the agent; timers fire; desired patches arrive") {
  fixture f;
  auto a = f.spawn();
  f.wait_up();
  (*f.self)->send(a, atoms::health_ping::value, std::uint64_t{7});
  (*f.self)->receive([](atoms::health_pong, std::uint64_t seq) { CHECK(seq == 7); },
                     caf::after(5s) >> [] { FAIL("no pong"); });
  f.call(a, "report", R"({"level":2})");
  (*f.self)->receive([](atoms::reported, const std::string& name, const std::string& doc) {
    CHECK(name == "m");
    CHECK(nlohmann::json::parse(doc) == nlohmann::json{{"level", 2}});
  }, caf::after(5s) >> [] { FAIL("no report"); });
  f.call(a, "later", "{}");
  (*f.self)->receive([](atoms::route_msg, const routed_message& rm) {
    CHECK(rm.output == "timer");
    CHECK(rm.msg.body() == "fired");
  }, caf::after(5s) >> [] { FAIL("timer did not fire"); });
  (*f.self)->send(a, atoms::desired::value, std::string{R"({"threshold":4})"}, false);
  f.call(a, "echo", "{}");  // the patch is handled before this answer
  CHECK(f.p.desired_calls == 2);
  CHECK_FALSE(f.p.last_desired_complete);
  caf::anon_send_exit(a, caf::exit_reason::user_shutdown);
}
