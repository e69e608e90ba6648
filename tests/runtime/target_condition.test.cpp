#include "runtime/target_condition.hpp"

#include <catch2/catch.hpp>

#include <nlohmann/json.hpp>

#include <string>
#include <vector>

using namespace canopy;
using json = nlohmann::json;

namespace {

const json& sample_tags() {
  static const json tags = json::parse(R"({
    "site": "plant-1",
    "line": 3,
    "weight": 2.5,
    "big": 9007199254740993,
    "enabled": true,
    "nothing": null,
    "building-id": "b7",
    "location": {"region": "eu", "floor": 2, "room": {"name": "r1"}},
    "list": [1, 2],
    "key with space": "yes"
  })");
  return tags;
}

bool eval(const std::string& text, const std::string& device = "gw1",
          const json& tags = sample_tags()) {
  auto c = target_condition::compile(text);
  INFO(text << " -> " << (c ? std::string("ok") : c.err().message));
  REQUIRE(c.ok());
  CHECK(c->text() == text);
  return c->matches(device, tags);
}

std::string compile_error(const std::string& text) {
  auto c = target_condition::compile(text);
  INFO(text);
  REQUIRE_FALSE(c.ok());
  CHECK(c.err().code == errc::invalid_argument);
  return c.err().message;
}

struct row {
  const char* text;
  bool expected;
};

void check_rows(const std::vector<row>& rows) {
  for (const auto& r : rows) {
    INFO("condition: " << r.text);
    CHECK(eval(r.text) == r.expected);
  }
}

}  // namespace

TEST_CASE("target_condition: '*' matches every device", "[target_condition]") {
  for (const char* text : {"*", "  *  ", "\t*\n"}) {
    auto c = target_condition::compile(text);
    REQUIRE(c.ok());
    CHECK(c->matches_all());
    CHECK(c->matches("anything", json::object()));
    CHECK(c->matches("", json()));
  }
  auto c = target_condition::compile("tags.site = 'x'");
  REQUIRE(c.ok());
  CHECK_FALSE(c->matches_all());
}

TEST_CASE("target_condition: string comparisons, each operator", "[target_condition]") {
  check_rows({
    {"tags.site = 'plant-1'", true},
    {"tags.site = \"plant-1\"", true},
    {"tags.site = 'plant-2'", false},
    {"tags.site != 'plant-2'", true},
    {"tags.site != 'plant-1'", false},
    {"tags.site <> 'plant-2'", true},
    {"tags.site <> 'plant-1'", false},
    {"tags.site < 'plant-2'", true},
    {"tags.site < 'plant-1'", false},
    {"tags.site <= 'plant-1'", true},
    {"tags.site <= 'plant-0'", false},
    {"tags.site > 'plant-0'", true},
    {"tags.site > 'plant-1'", false},
    {"tags.site >= 'plant-1'", true},
    {"tags.site >= 'plant-2'", false},
    {"'plant-1' = tags.site", true},
    {"tags.site='plant-1'", true},
  });
}

TEST_CASE("target_condition: number comparisons, each operator", "[target_condition]") {
  check_rows({
    {"tags.line = 3", true},
    {"tags.line = 3.0", true},
    {"tags.line = 4", false},
    {"tags.line != 4", true},
    {"tags.line <> 3", false},
    {"tags.line < 4", true},
    {"tags.line < 3", false},
    {"tags.line <= 3", true},
    {"tags.line > 2.5", true},
    {"tags.line > 3", false},
    {"tags.line >= 3", true},
    {"tags.line >= 3e0", true},
    {"tags.line > -1", true},
    {"tags.weight = 2.5", true},
    {"tags.weight < 3", true},
    {"tags.weight > 25e-1", false},
    // Integers compare exactly, even past 2^53.
    {"tags.big = 9007199254740993", true},
    {"tags.big = 9007199254740992", false},
    {"tags.big > 9007199254740992", true},
  });
}

TEST_CASE("target_condition: mixed types and missing tags are false", "[target_condition]") {
  check_rows({
    {"tags.line = '3'", false},       {"tags.line != '3'", false},
    {"tags.site = 1", false},         {"tags.site != 1", false},
    {"tags.missing = 'x'", false},    {"tags.missing != 'x'", false},
    {"tags.missing < 1", false},      {"NOT tags.missing = 'x'", true},
    {"tags.site.inner = 'x'", false}, {"tags.location = 'eu'", false},
    {"tags.list = 1", false},         {"tags.enabled = true", true},
    {"tags.enabled = false", false},  {"tags.enabled != false", true},
    {"tags.enabled > false", false},  {"tags.enabled = 1", false},
    {"tags.nothing = null", true},    {"tags.nothing != null", false},
    {"tags.site = null", false},      {"tags.nothing < null", false},
  });
}

TEST_CASE("target_condition: nested tags, bracket names, deviceId", "[target_condition]") {
  check_rows({
    {"tags.location.region = 'eu'", true},
    {"tags.location.floor = 2", true},
    {"tags.location.room.name = 'r1'", true},
    {"tags.location.room.name = 'r2'", false},
    {"tags['location'].region = 'eu'", true},
    {"tags[\"key with space\"] = 'yes'", true},
    {"tags.building-id = 'b7'", true},
    {"deviceId = 'gw1'", true},
    {"DEVICEID = 'gw1'", true},
    {"deviceid = 'gw2'", false},
    {"deviceId > 'gw0'", true},
    {"TAGS.site = 'plant-1'", true},
    {"tags.Site = 'plant-1'", false},  // tag names are case-sensitive
  });
}

TEST_CASE("target_condition: AND, OR, NOT and their precedence", "[target_condition]") {
  check_rows({
    {"tags.site = 'plant-1' AND tags.line = 3", true},
    {"tags.site = 'plant-1' AND tags.line = 4", false},
    {"tags.site = 'plant-2' OR tags.line = 3", true},
    {"tags.site = 'plant-2' OR tags.line = 4", false},
    {"NOT tags.line = 4", true},
    {"NOT NOT tags.line = 3", true},
    {"not tags.line = 3", false},
    {"tags.site = 'plant-1' and tags.line = 3 or false = true", true},
    // AND binds tighter than OR.
    {"tags.line = 4 AND tags.line = 3 OR tags.site = 'plant-1'", true},
    {"tags.line = 4 AND (tags.line = 3 OR tags.site = 'plant-1')", false},
    {"tags.site = 'plant-1' OR tags.line = 4 AND tags.line = 5", true},
    {"(tags.site = 'plant-1' OR tags.line = 4) AND tags.line = 5", false},
    // NOT binds tighter than AND.
    {"NOT tags.line = 4 AND tags.line = 3", true},
    {"NOT (tags.line = 4 OR tags.line = 3)", false},
    {"NOT tags.line = 3 OR tags.site = 'plant-1'", true},
    {"((((tags.line = 3))))", true},
    {"tags.line = 1 OR tags.line = 2 OR tags.line = 3 OR tags.line = 4", true},
    {"tags.line = 3 AND tags.line >= 3 AND tags.line <= 3 AND deviceId = 'gw1'", true},
  });
}

TEST_CASE("target_condition: IN and IS_DEFINED", "[target_condition]") {
  check_rows({
    {"tags.site IN ['plant-1', 'plant-2']", true},
    {"tags.site in [\"plant-2\", 'plant-3']", false},
    {"tags.line IN [1, 2, 3]", true},
    {"tags.line IN ['3']", false},
    {"tags.missing IN ['x']", false},
    {"tags.site IN []", false},
    {"deviceId IN ['gw0', 'gw1']", true},
    {"NOT tags.site IN ['plant-9']", true},
    {"IS_DEFINED(tags.site)", true},
    {"is_defined(tags.location.room.name)", true},
    {"IS_DEFINED(tags.missing)", false},
    {"IS_DEFINED(tags.site.inner)", false},
    {"IS_DEFINED(tags.nothing)", true},
    {"IS_DEFINED(deviceId)", true},
    {"NOT IS_DEFINED(tags.retired) AND tags.line = 3", true},
  });
}

TEST_CASE("target_condition: tags that are not an object match nothing", "[target_condition]") {
  CHECK_FALSE(eval("tags.site = 'plant-1'", "gw1", json()));
  CHECK_FALSE(eval("tags.site = 'plant-1'", "gw1", json::array({1})));
  CHECK(eval("NOT IS_DEFINED(tags.site)", "gw1", json("text")));
  CHECK(eval("deviceId = 'd'", "d", json()));
}

TEST_CASE("target_condition: strings with escapes and quotes", "[target_condition]") {
  const json tags = {{"a", "it's"}, {"b", "say \"hi\""}, {"c", "back\\slash"}};
  CHECK(eval(R"(tags.a = 'it\'s')", "d", tags));
  CHECK(eval(R"(tags.a = "it's")", "d", tags));
  CHECK(eval(R"(tags.b = 'say "hi"')", "d", tags));
  CHECK(eval(R"(tags.b = "say \"hi\"")", "d", tags));
  CHECK(eval(R"(tags.c = 'back\\slash')", "d", tags));
}

TEST_CASE("target_condition: errors name the column", "[target_condition]") {
  struct bad {
    const char* text;
    const char* message;
  };
  const std::vector<bad> cases = {
    {"",
     "target condition: column 1: expected a condition ('*' for every device), found the end "
     "of the condition"},
    {"   ", "target condition: column 4: expected a condition"},
    {"tags.site = ", "target condition: column 13: expected a value"},
    {"tags.site = AND", "target condition: column 13: expected a value"},
    {"tags.site 'x'", "target condition: column 11: expected a comparison"},
    {"tags.site == 'x'", "target condition: column 12: expected a value"},
    {"tags = 'x'", "target condition: column 5: expected '.' and a tag name after 'tags'"},
    {"tags. = 'x'", "target condition: column 6: expected a tag name after '.'"},
    {"tags .a = 'x'", "target condition: column 5: expected '.' and a tag name after 'tags'"},
    {"properties.reported.x = 1",
     "target condition: column 1: expected a value, found "
     "'properties' (a path is tags.<name> or deviceId)"},
    {"tags.a = 'x", "target condition: column 10: unterminated string"},
    {"tags.a = 'x\\n'", "target condition: column 12: unknown escape"},
    {"tags.a = 1.", "target condition: column 10: malformed number"},
    {"tags.a = .5", "target condition: column 10: a number must start with a digit"},
    {"tags.a = 1e999", "target condition: column 10: number out of range"},
    {"tags.a = 12abc", "target condition: column 10: malformed number"},
    {"tags.a = 1 AND", "target condition: column 15: expected a value"},
    {"tags.a = 1 tags.b = 2", "target condition: column 12: expected AND, OR or the end"},
    {"(tags.a = 1", "target condition: column 12: expected ')' to close the '(' at column 1"},
    {"tags.a = 1)", "target condition: column 11: expected AND, OR or the end"},
    {"tags.a IN 'x'", "target condition: column 11: expected '[' after IN"},
    {"tags.a IN ['x' 'y']", "target condition: column 16: expected ',' or ']'"},
    {"tags.a IN [tags.b]", "target condition: column 12: expected a value"},
    {"IS_DEFINED tags.a", "target condition: column 12: expected '(' after IS_DEFINED"},
    {"IS_DEFINED('x')", "target condition: column 12: IS_DEFINED takes a path"},
    {"* AND tags.a = 1", "target condition: column 3: '*' (every device) must be the whole"},
    {"tags.a ! 1", "target condition: column 8: unexpected '!'"},
    {"tags.a = 1 # x", "target condition: column 12: unexpected '#'"},
    {"tags.a = \x01", "target condition: column 10: unexpected byte 0x01"},
    {"tags[1] = 2", "target condition: column 6: expected a quoted tag name"},
  };
  for (const auto& c : cases) {
    const std::string msg = compile_error(c.text);
    INFO("condition: '" << c.text << "'");
    CHECK_THAT(msg, Catch::StartsWith(c.message));
  }
}

TEST_CASE("target_condition: length and nesting are bounded", "[target_condition]") {
  SECTION("text longer than the limit") {
    std::string text = "tags.a = '" + std::string(max_target_condition_length, 'x') + "'";
    CHECK_THAT(compile_error(text),
               Catch::StartsWith("target condition: column 4097: condition longer than 4096"));
    std::string ok = "tags.a = '" + std::string(max_target_condition_length - 11, 'x') + "'";
    REQUIRE(ok.size() == max_target_condition_length);
    CHECK(target_condition::compile(ok).ok());
  }
  SECTION("parentheses") {
    const auto nested = [](int depth) {
      return std::string(static_cast<std::size_t>(depth), '(') + "tags.line = 3" +
             std::string(static_cast<std::size_t>(depth), ')');
    };
    CHECK(eval(nested(max_target_condition_depth)));
    CHECK_THAT(compile_error(nested(max_target_condition_depth + 1)),
               Catch::StartsWith("target condition: column 33: nested too deeply"));
    // Deep input of the maximal length fails cleanly too.
    CHECK_THAT(compile_error(std::string(4000, '(')), Catch::Contains("nested too deeply"));
  }
  SECTION("NOT") {
    std::string text;
    for (int i = 0; i < max_target_condition_depth; ++i)
      text += "NOT ";
    CHECK(eval(text + "tags.line = 3"));  // an even number of NOTs
    CHECK_THAT(compile_error("NOT " + text + "tags.line = 3"),
               Catch::Contains("nested too deeply"));
  }
  SECTION("long flat chains are fine") {
    std::string text = "tags.line = 3";
    while (text.size() < 4000)
      text += " AND tags.line = 3";
    CHECK(eval(text));
  }
}

TEST_CASE("target_condition: copies share the compiled condition", "[target_condition]") {
  auto c = target_condition::compile("tags.line = 3");
  REQUIRE(c.ok());
  const target_condition copy = *c;
  CHECK(copy.matches("gw", sample_tags()));
  CHECK(copy.text() == "tags.line = 3");
}
