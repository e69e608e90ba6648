// libFuzzer target: route::compile, then evaluation against fixed messages.
// Input: the route text, optionally followed by a NUL byte and a message body
// that is evaluated as application/json (so $body paths meet arbitrary JSON).
#include "runtime/route.hpp"

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <string>
#include <string_view>
#include <vector>

namespace {

// Stops the run with a message libFuzzer will show next to the crashing input.
void check(bool ok, const char* what, const std::string& detail) {
  if (!ok) {
    std::fprintf(stderr, "invariant violated: %s: %s\n", what, detail.c_str());
    __builtin_trap();
  }
}

const std::vector<canopy::message>& messages() {
  static const std::vector<canopy::message> all = [] {
    std::vector<canopy::message> v;
    v.push_back(
      canopy::message_builder{}
        .body(
          R"({"a": {"b": [1, 2, {"c": "x"}]}, "temp": 21.5, "n": null, "ok": true, "s": "h\u00e9llo"})")
        .content_type("application/json")
        .content_encoding("utf-8")
        .message_id("m1")
        .correlation_id("c1")
        .user_id("u1")
        .ttl_secs(60)
        .connection_device_id("devA")
        .property("temperature", "30.5")
        .property("humidity", "40")
        .property("name", "sensor-1")
        .property("$contentType", "custom")
        .property("empty", "")
        .build());
    v.push_back(canopy::message_builder{}
                  .body("not json")
                  .content_type("text/plain")
                  .property("a", "1")
                  .build());
    v.push_back(canopy::message{});
    return v;
  }();
  return all;
}

const canopy::message_source sources[] = {
  {"", "sensor", "temp"},
  {"leaf-1", "", ""},
  {"child", "filter", "out"},
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  std::string_view input(reinterpret_cast<const char*>(data), size);
  std::string_view text = input;
  std::string_view body;
  bool has_body = false;
  if (auto nul = input.find('\0'); nul != std::string_view::npos) {
    text = input.substr(0, nul);
    body = input.substr(nul + 1);
    has_body = true;
  }

  auto r = canopy::route::compile("fuzz", text);
  if (!r) {
    const auto& msg = r.err().message;
    check(msg.rfind("route 'fuzz': column ", 0) == 0, "error names route and column", msg);
    return 0;
  }

  for (const auto& m : messages())
    for (const auto& s : sources)
      (void) r->matches(m, s);
  if (has_body) {
    auto m = canopy::message_builder{}
               .body(body)
               .content_type("application/json")
               .content_encoding("utf-8")
               .property("temperature", "30.5")
               .build();
    for (const auto& s : sources)
      (void) r->matches(m, s);
  }

  // The sink prints back to something that compiles to the same sink.
  const auto& sink = r->sink();
  std::string again = sink.type == canopy::route_sink::kind::upstream
                        ? "FROM /* INTO " + sink.to_string()
                        : "FROM /* INTO BrokeredEndpoint(\"" + sink.to_string() + "\")";
  auto r2 = canopy::route::compile("fuzz", again);
  check(r2.ok(), "printed sink compiles", again);
  check(r2->sink() == sink, "printed sink round-trips", again);
  // A named source module is a valid module name.
  check(r->source_module().empty() || canopy::is_valid_module_name(r->source_module()),
        "source module valid", r->source_module());
  return 0;
}
