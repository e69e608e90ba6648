// libFuzzer target: target_condition::compile on arbitrary bytes, then
// evaluation against fixed device ids and tags documents.
#include "runtime/target_condition.hpp"

#include <nlohmann/json.hpp>

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

const std::vector<nlohmann::json>& tag_docs() {
  static const std::vector<nlohmann::json> all = [] {
    std::vector<nlohmann::json> v;
    v.push_back(nlohmann::json::parse(R"({
      "site": "plant-1", "line": 3, "weight": 2.5, "big": 18446744073709551615,
      "neg": -9223372036854775808, "enabled": true, "nothing": null, "building-id": "b7",
      "location": {"region": "eu", "floor": 2, "room": {"name": "r\u00e9"}},
      "list": [1, "a", {"b": 2}], "key with space": "yes", "": "empty", "$x": 1
    })"));
    v.push_back(nlohmann::json::object());
    v.push_back(nlohmann::json());            // not an object: no tags
    v.push_back(nlohmann::json::array({1}));  // not an object either
    return v;
  }();
  return all;
}

const char* const device_ids[] = {"gw1", "", "plant-1", "device with space"};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  auto c = canopy::target_condition::compile(text);
  if (!c) {
    const auto& msg = c.err().message;
    check(msg.rfind("target condition: column ", 0) == 0, "error names the column", msg);
    const auto column =
      std::stoul(msg.substr(std::string_view("target condition: column ").size()));
    check(column >= 1 && column <= size + 1, "column within the text (or just past it)", msg);
    return 0;
  }
  check(c->text() == text, "text() is the input", c->text());

  std::vector<bool> results;
  for (const auto& tags : tag_docs())
    for (const char* id : device_ids)
      results.push_back(c->matches(id, tags));
  if (c->matches_all())
    for (bool r : results)
      check(r, "'*' matches everything", std::string(text));

  // NOT (condition) is the negation, where the limits allow wrapping it.
  if (!c->matches_all()) {
    const std::string wrapped = "NOT (" + std::string(text) + ")";
    auto n = canopy::target_condition::compile(wrapped);
    if (!n) {
      const auto& msg = n.err().message;
      check(msg.find("nested too deeply") != std::string::npos ||
              msg.find("longer than") != std::string::npos,
            "wrapping fails only on the limits", msg);
    } else {
      std::size_t i = 0;
      for (const auto& tags : tag_docs())
        for (const char* id : device_ids)
          check(n->matches(id, tags) == !results[i++], "NOT (c) is the negation of c", wrapped);
    }
  }
  return 0;
}
