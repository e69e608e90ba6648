#include "runtime/route.hpp"

#include <catch2/catch.hpp>

#include <string>
#include <vector>

using namespace canopy;

namespace {

// What a condition evaluates to: true, false, or neither (undefined / null /
// not a boolean). Observed through the public API as matches(cond) and
// matches(NOT (cond)): NOT of an undefined value is undefined, so both fail.
enum class tri { t, f, u };

const char* to_string(tri v) {
  return v == tri::t ? "true" : v == tri::f ? "false" : "undefined";
}

bool holds(const std::string& cond, const message& msg, const message_source& src) {
  auto r = route::compile("t", "FROM /* WHERE " + cond + " INTO $upstream");
  INFO(cond);
  if (!r)
    FAIL(r.err().message);
  return r->matches_condition(msg, src);
}

tri evaluate(const std::string& cond, const message& msg, const message_source& src) {
  bool yes = holds(cond, msg, src);
  bool no = holds("NOT (" + cond + ")", msg, src);
  INFO(cond);
  REQUIRE(!(yes && no));
  return yes ? tri::t : no ? tri::f : tri::u;
}

const char* json_body = R"({"a": {"b": [1, 2, {"c": "x"}]}, "temp": 21.5, "n": null, "ok": true,
                           "s": "h\u00e9llo", "odd key": 7})";

message telemetry() {
  return message_builder{}
    .body(json_body)
    .content_type("application/json")
    .content_encoding("utf-8")
    .message_id("m1")
    .correlation_id("c1")
    .user_id("u1")
    .ttl_secs(60)
    .connection_device_id("devA")
    .connection_module_id("modA")
    .output_name("outA")
    .property("temperature", "30.5")
    .property("humidity", "40")
    .property("name", "sensor-1")
    .property("flag", "true")
    .property("empty", "")
    .property("alert.level", "high")
    .build();
}

const message_source from_sensor{"", "sensor", "temp"};

struct cond_case {
  const char* cond;
  tri expect;
};

void check_table(const std::vector<cond_case>& table, const message& msg,
                 const message_source& src) {
  for (const auto& c : table) {
    INFO("condition: " << c.cond << "  expected: " << to_string(c.expect));
    CHECK(to_string(evaluate(c.cond, msg, src)) == std::string(to_string(c.expect)));
  }
}

std::string compile_error(const std::string& text) {
  auto r = route::compile("r", text);
  if (r)
    return "(compiled)";
  CHECK(r.err().code == errc::invalid_argument);
  return r.err().message;
}

}  // namespace

TEST_CASE("route conditions: application properties and coercion", "[route]") {
  check_table(
    {
      {"temperature > 30", tri::t},
      {"temperature > 31", tri::f},
      {"temperature = 30.5", tri::t},
      {"30.5 = temperature", tri::t},
      {"temperature = '30.5'", tri::t},
      {"temperature = '30.50'", tri::f},  // both strings: compared as strings
      {"temperature > '4'", tri::f},      // "30.5" < "4" byte-wise
      {"humidity >= 40 AND humidity <= 40", tri::t},
      {"humidity <> 41", tri::t},
      {"humidity != 40", tri::f},
      {"name = 'sensor-1'", tri::t},
      {"name = \"sensor-1\"", tri::t},
      {"name = 'SENSOR-1'", tri::f},  // values are case-sensitive
      {"name > 1", tri::u},           // not a number: type mismatch
      {"name < 't'", tri::t},
      {"flag = true", tri::u},  // a string is not a boolean
      {"flag = 'true'", tri::t},
      {"empty = ''", tri::t},
      {"empty = 0", tri::u},             // "" does not parse as a number
      {"alert.level = 'high'", tri::t},  // dotted property names
      {"missing > 1", tri::u},
      {"missing = 'x'", tri::u},
      {"missing = missing", tri::u},
      {"missing != 'x'", tri::u},
      {"is_defined(missing)", tri::f},
      {"is_defined(temperature)", tri::t},
      {"NOT is_defined(missing)", tri::t},
      {"is_string(temperature)", tri::t},
      {"is_number(temperature)", tri::f},
      {"is_number(as_number(temperature))", tri::t},
      {"is_defined(as_number(name))", tri::f},
      {"as_number('1e3') = 1000", tri::t},
      {"as_number(' 1') = 1", tri::u},  // must parse fully
      {"as_number('inf') = 1", tri::u},
      {"as_number('+2') = 2", tri::t},
    },
    telemetry(), from_sensor);
}

TEST_CASE("route conditions: operators and precedence", "[route]") {
  check_table(
    {
      {"temperature * 2 = 61", tri::t},
      {"humidity + 1 = 41", tri::t},
      {"humidity % 7 = 5", tri::t},
      {"humidity / 8 = 5", tri::t},
      {"humidity / 0 = 1", tri::u},  // division by zero
      {"humidity % 0 = 1", tri::u},
      {"name + 1 = 1", tri::u},
      {"1 + 2 * 3 = 7", tri::t},
      {"(1 + 2) * 3 = 9", tri::t},
      {"10 - 2 - 3 = 5", tri::t},  // left-associative
      {"2 * -3 = -6", tri::t},
      {"-humidity = -40", tri::t},
      {"- -1 = 1", tri::t},
      {"1 < 2 = true", tri::t},             // comparison binds tighter than equality
      {"true OR false AND false", tri::t},  // AND binds tighter than OR
      {"(true OR false) AND false", tri::f},
      {"NOT true = false", tri::t},     // NOT (true = false)
      {"NOT false AND false", tri::f},  // (NOT false) AND false
      {"true = NOT false", tri::t},     // NOT as an operand
      {"true AND missing > 1", tri::u},
      {"false AND missing > 1", tri::f},
      {"missing > 1 AND false", tri::f},
      {"true OR missing > 1", tri::t},
      {"missing > 1 OR true", tri::t},
      {"false OR missing > 1", tri::u},
      {"NOT missing", tri::u},
      {"NOT name", tri::u},  // NOT of a string
      {"'yes' AND true", tri::u},
      {"(missing ?? 'x') = 'x'", tri::t},
      {"(temperature ?? 'x') = '30.5'", tri::t},
      {"missing ?? true", tri::t},  // ?? binds loosest
      {"null ?? true", tri::u},     // null is defined: stays null
      {"'a' || 'b' = 'ab'", tri::t},
      {"name || '!' = 'sensor-1!'", tri::t},
      {"'a' || 1 = 'a1'", tri::u},
      {"missing || 'a' = 'a'", tri::u},
      {"true and false or true", tri::t},  // keywords are case-insensitive
      {"true /* comment */ AND true", tri::t},
      {"1 = 1 = true", tri::t},
      {"true", tri::t},
      {"1", tri::u},  // not a boolean: does not route
      {"null", tri::u},
      {"undefined", tri::u},
    },
    telemetry(), from_sensor);
}

TEST_CASE("route conditions: literals", "[route]") {
  check_table(
    {
      {"0x10 = 16", tri::t},
      {"0XfF = 255", tri::t},
      {"1e2 = 100", tri::t},
      {"1.5E-1 = 0.15", tri::t},
      {".5 = 0.5", tri::t},
      {"\"dq\" = 'dq'", tri::t},
      {R"('it\'s' = "it's")", tri::t},
      {R"('a\\b' = "a\\b")", tri::t},
      {R"('\u00e9' = 'é')", tri::t},
      {R"('\ud83d\ude00' = '😀')", tri::t},
      {"null = null", tri::t},
      {"null != null", tri::f},
      {"null = 0", tri::u},
      {"is_null(null)", tri::t},
      {"is_defined(undefined)", tri::f},
      {"undefined = undefined", tri::u},
      {"TRUE = true", tri::t},
      {"true = 1", tri::u},
      {"false != true", tri::t},
      {"true < false", tri::u},  // booleans have no order
    },
    telemetry(), from_sensor);
}

TEST_CASE("route conditions: functions", "[route]") {
  check_table(
    {
      {"abs(-2) = 2", tri::t},
      {"abs(humidity) = 40", tri::t},  // numeric strings coerce
      {"abs(name) = 1", tri::u},
      {"exp(0) = 1", tri::t},
      {"power(2, 10) = 1024", tri::t},
      {"square(3) = 9", tri::t},
      {"ceiling(1.2) = 2", tri::t},
      {"floor(-1.5) = -2", tri::t},
      {"sign(-3) = -1", tri::t},
      {"sign(0) = 0", tri::t},
      {"sqrt(16) = 4", tri::t},
      {"sqrt(-1) = 1", tri::u},
      {"exp(1000) > 1", tri::u},        // not finite
      {"length('héllo') = 5", tri::t},  // code points
      {"length(name) = 8", tri::t},
      {"length(1) = 1", tri::u},
      {"lower('AbC') = 'abc'", tri::t},
      {"upper('AbC') = 'ABC'", tri::t},
      {"substring('hello', 1, 3) = 'ell'", tri::t},
      {"substring('hello', 2) = 'llo'", tri::t},
      {"substring('héllo', 1, 2) = 'él'", tri::t},
      {"substring('abc', 5) = ''", tri::t},
      {"substring('abc', -1, 2) = 'ab'", tri::t},
      {"substring('abc', 1, 100) = 'bc'", tri::t},
      {"substring(1, 1) = ''", tri::u},
      {"index_of('hello', 'l') = 2", tri::t},
      {"index_of('héllo', 'l') = 2", tri::t},
      {"index_of('hello', 'z') = -1", tri::t},
      {"starts_with(name, 'sen')", tri::t},
      {"starts_with(name, 'x')", tri::f},
      {"ends_with(name, '-1')", tri::t},
      {"ends_with('a', 'abc')", tri::f},
      {"contains(name, 'sor')", tri::t},
      {"contains(name, 1)", tri::u},
      {"concat('a', 'b', 'c') = 'abc'", tri::t},
      {"concat(name, '/', humidity) = 'sensor-1/40'", tri::t},
      {"concat('a', 1) = 'a1'", tri::u},
      {"LENGTH(name) = 8", tri::t},  // function names are case-insensitive
      {"Is_Defined(temperature)", tri::t},
      {"is_bool(true)", tri::t},
      {"is_bool(flag)", tri::f},
      {"is_primitive(name)", tri::t},
      {"is_primitive(missing)", tri::f},
    },
    telemetry(), from_sensor);
}

TEST_CASE("route conditions: system properties", "[route]") {
  check_table(
    {
      {"$contentType = 'application/json'", tri::t},
      {"$CONTENTTYPE = 'application/json'", tri::t},
      {"$contentEncoding = 'utf-8'", tri::t},
      {"$messageId = 'm1'", tri::t},
      {"$correlationId = 'c1'", tri::t},
      {"$userId = 'u1'", tri::t},
      {"$ttl = 60", tri::t},
      {"$connectionModuleId = 'sensor'", tri::t},  // from the message_source
      {"$outputName = 'temp'", tri::t},
      {"$connectionDeviceId = 'devA'", tri::t},  // source has none: the message's
      {"{$messageId} = 'm1'", tri::t},
      {"{ $messageId } = 'm1'", tri::t},
      {"contentType = 'application/json'", tri::u},  // a bare name is an application property
    },
    telemetry(), from_sensor);

  // Without a source, the message's own system properties count.
  check_table({{"$connectionModuleId = 'modA'", tri::t}, {"$outputName = 'outA'", tri::t}},
              telemetry(), message_source{});

  // Unset system properties are undefined.
  check_table({{"is_defined($messageId)", tri::f},
               {"is_defined($ttl)", tri::f},
               {"is_defined($contentType)", tri::f}},
              message{}, message_source{});

  // An application property named "$contentType" wins over the system one,
  // unless the system one is forced with {}.
  auto shadowed = message_builder{}
                    .content_type("application/json")
                    .property("$contentType", "custom")
                    .property("contentType", "bare")
                    .build();
  check_table(
    {
      {"$contentType = 'custom'", tri::t},
      {"{$contentType} = 'application/json'", tri::t},
      {"contentType = 'bare'", tri::t},
    },
    shadowed, message_source{});
}

TEST_CASE("route conditions: $body", "[route]") {
  check_table(
    {
      {"$body.temp > 21", tri::t},
      {"$body.temp = '21.5'", tri::t},  // string coerced to the body's number
      {"$body.a.b[1] = 2", tri::t},
      {"$body.a.b[2].c = 'x'", tri::t},
      {"$body.a.b[3] = 1", tri::u},
      {"is_defined($body.a.b[3])", tri::f},
      {"$body.a.b.c = 1", tri::u},    // key into an array
      {"$body.temp[0] = 1", tri::u},  // index into a number
      {"is_array($body.a.b)", tri::t},
      {"is_object($body.a)", tri::t},
      {"is_object($body)", tri::t},
      {"$body.a = 1", tri::u},  // objects do not compare
      {"$body.ok = true", tri::t},
      {"$body.ok", tri::t},
      {"is_null($body.n)", tri::t},
      {"is_defined($body.n)", tri::t},
      {"$body.s = 'héllo'", tri::t},
      {"length($body.s) = 5", tri::t},
      {"$body['a'].b[0] = 1", tri::t},
      {"$body[\"odd key\"] = 7", tri::t},
      {"$body.missing.x = 1", tri::u},
      {"{$body.temp} = 21.5", tri::t},
      {"$BODY.temp = 21.5", tri::t},
    },
    telemetry(), from_sensor);

  auto with = [](std::string_view body, std::string_view type, std::string_view encoding) {
    return message_builder{}
      .body(body)
      .content_type(type)
      .content_encoding(encoding)
      .property("p", "1")
      .build();
  };
  const char* body = R"({"temp": 21.5})";

  // Content type and encoding are case-insensitive; parameters are ignored.
  check_table({{"$body.temp = 21.5", tri::t}},
              with(body, "Application/JSON; charset=utf-8", "UTF-8"), message_source{});
  // Not JSON by its content type, or not UTF-8: $body is undefined.
  for (auto [type, enc] :
       std::vector<std::pair<const char*, const char*>>{{"text/plain", "utf-8"},
                                                        {"application/json", "utf-16"},
                                                        {"application/json", ""},
                                                        {"", "utf-8"},
                                                        {"application/jsonx", "utf-8"}}) {
    INFO(type << " / " << enc);
    check_table({{"$body.temp = 21.5", tri::u}, {"is_defined($body)", tri::f}},
                with(body, type, enc), message_source{});
  }
  // Invalid JSON, invalid UTF-8 inside JSON, an empty body: undefined, never an error.
  for (std::string bad : {std::string("{not json"), std::string("{\"temp\": \"\xff\"}"),
                          std::string(""), std::string("{\"temp\": 21.5} trailing")}) {
    INFO(bad);
    auto m = with(bad, "application/json", "utf-8");
    check_table({{"$body.temp = 21.5", tri::u},
                 {"is_defined($body)", tri::f},
                 {"$body.temp = 21.5 OR p = '1'", tri::t},
                 {"p = 1", tri::t}},
                m, message_source{});
  }
  // A top-level array and scalars.
  check_table({{"$body[1] = 2", tri::t}, {"$body.x = 2", tri::u}},
              with("[1, 2]", "application/json", "utf-8"), message_source{});
  check_table({{"$body = 'hi'", tri::t}}, with("\"hi\"", "application/json", "utf-8"),
              message_source{});
  // Deeply nested bodies neither crash nor match.
  std::string deep(100000, '[');
  check_table({{"is_defined($body)", tri::f}}, with(deep, "application/json", "utf-8"),
              message_source{});
  std::string deep_ok = std::string(5000, '[') + std::string(5000, ']');
  check_table({{"is_array($body)", tri::t}, {"is_array($body[0][0][0])", tri::t}},
              with(deep_ok, "application/json", "utf-8"), message_source{});
}

TEST_CASE("route FROM clause: which sources match", "[route]") {
  const message_source leaf{"leaf-1", "", ""};
  const message_source sensor_temp{"", "sensor", "temp"};
  const message_source sensor_other{"", "sensor", "humidity"};
  const message_source sensor_none{"", "sensor", ""};
  const message_source filter_out{"", "filter", "out"};
  const message_source remote_module{"child-gw", "sensor", "temp"};

  struct from_case {
    const char* source;
    const char* source_module;
    bool leaf, sensor_temp, sensor_other, sensor_none, filter_out, remote_module;
  };
  const std::vector<from_case> table = {
    {"/*", "", true, true, true, true, true, true},
    {"/messages/*", "", true, true, true, true, true, true},
    {"/messages/modules/*", "", false, true, true, true, true, true},
    {"/messages/modules/sensor/*", "sensor", false, true, true, true, false, true},
    {"/messages/modules/sensor/outputs/*", "sensor", false, true, true, true, false, true},
    {"/messages/modules/sensor/outputs/temp", "sensor", false, true, false, false, false, true},
    {"/Messages/Modules/sensor/OUTPUTS/temp", "sensor", false, true, false, false, false, true},
    {"/messages/modules/Sensor/*", "Sensor", false, false, false, false, false,
     false},  // ids are case-sensitive
  };
  for (const auto& c : table) {
    INFO(c.source);
    auto r = route::compile("r", std::string("FROM ") + c.source + " INTO $upstream");
    REQUIRE(r);
    CHECK(r->source_module() == c.source_module);
    CHECK(r->matches_source(leaf) == c.leaf);
    CHECK(r->matches_source(sensor_temp) == c.sensor_temp);
    CHECK(r->matches_source(sensor_other) == c.sensor_other);
    CHECK(r->matches_source(sensor_none) == c.sensor_none);
    CHECK(r->matches_source(filter_out) == c.filter_out);
    CHECK(r->matches_source(remote_module) == c.remote_module);
  }
}

TEST_CASE("route: matches combines FROM and WHERE", "[route]") {
  auto r = route::compile("hot",
                          "FROM /messages/modules/sensor/outputs/temp WHERE temperature > 30 "
                          "INTO BrokeredEndpoint(\"/modules/filter/inputs/in\")");
  REQUIRE(r);
  CHECK(r->name() == "hot");
  auto hot = message_builder{}.property("temperature", "35").build();
  auto cold = message_builder{}.property("temperature", "25").build();
  CHECK(r->matches(hot, {"", "sensor", "temp"}));
  CHECK_FALSE(r->matches(cold, {"", "sensor", "temp"}));
  CHECK_FALSE(r->matches(hot, {"", "sensor", "other"}));
  CHECK_FALSE(r->matches(hot, {"leaf", "", ""}));

  // Without WHERE every message from the source matches.
  auto all = route::compile("all", "FROM /* INTO $upstream");
  REQUIRE(all);
  CHECK(all->matches_condition(message{}, {}));
  CHECK(all->matches(cold, {"leaf", "", ""}));

  // A compiled route is a value: copies share the compiled condition.
  route copy = *r;
  CHECK(copy.matches(hot, {"", "sensor", "temp"}));
}

TEST_CASE("route sinks", "[route]") {
  struct sink_case {
    const char* text;
    route_sink::kind type;
    const char* module;
    const char* input;
    const char* printed;
  };
  const std::vector<sink_case> table = {
    {"FROM /* INTO $upstream", route_sink::kind::upstream, "", "", "$upstream"},
    {"FROM /* INTO $UpStream", route_sink::kind::upstream, "", "", "$upstream"},
    {"FROM /* INTO BrokeredEndpoint(\"/modules/filter/inputs/in\")", route_sink::kind::module_input,
     "filter", "in", "/modules/filter/inputs/in"},
    {"from /* into brokeredendpoint ( '/modules/my.mod-2/inputs/input_1' ) ",
     route_sink::kind::module_input, "my.mod-2", "input_1", "/modules/my.mod-2/inputs/input_1"},
    {"SELECT * FROM /* WHERE true INTO BrokeredEndpoint(\"/Modules/f/Inputs/i\")",
     route_sink::kind::module_input, "f", "i", "/modules/f/inputs/i"},
    {"  select*from /messages/* where a=1 into $upstream  ", route_sink::kind::upstream, "", "",
     "$upstream"},
  };
  for (const auto& c : table) {
    INFO(c.text);
    auto r = route::compile("r", c.text);
    REQUIRE(r);
    CHECK(r->sink().type == c.type);
    CHECK(r->sink().module == c.module);
    CHECK(r->sink().input == c.input);
    CHECK(r->sink().to_string() == c.printed);
  }
}

TEST_CASE("route syntax errors name the route and the column", "[route]") {
  struct error_case {
    std::string text;
    std::string message;
  };
  const std::string deep =
    "FROM /* WHERE " + std::string(65, '(') + "true" + std::string(65, ')') + " INTO $upstream";
  const std::string ok_deep =
    "FROM /* WHERE " + std::string(64, '(') + "true" + std::string(64, ')') + " INTO $upstream";
  std::string chain = "FROM /* WHERE 1";
  for (int i = 0; i < 300; ++i)
    chain += " + 1";
  chain += " = 301 INTO $upstream";
  const std::vector<error_case> table = {
    {"", "route 'r': column 1: expected FROM, found end of route"},
    {"TO /* INTO $upstream", "route 'r': column 1: expected FROM, found 'TO'"},
    {"SELECT FROM /* INTO $upstream",
     "route 'r': column 8: expected '*' after SELECT, found 'FROM'"},
    {"SELECT * /* INTO $upstream", "route 'r': column 10: expected FROM, found '/'"},
    {"FROM /* WHERE a /* x INTO $upstream", "route 'r': column 17: unterminated comment"},
    {"FROM", "route 'r': column 5: expected a source after FROM, found end of route"},
    {"FROM messages/* INTO $upstream",
     "route 'r': column 6: expected a source path starting with '/', found 'm'"},
    {"FROM /devices/* INTO $upstream",
     "route 'r': column 7: expected '*' or 'messages' in the source, found 'devices'"},
    {"FROM /*/x INTO $upstream", "route 'r': column 8: unexpected '/x' after '*' in the source"},
    {"FROM /messages INTO $upstream",
     "route 'r': column 15: expected '/*' or '/modules' after /messages in the source, found end "
     "of path"},
    {"FROM /messages//* INTO $upstream", "route 'r': column 16: empty segment in source path"},
    {"FROM /messages/modules/sensor/outptus/x INTO $upstream",
     "route 'r': column 31: expected '*' or 'outputs' after the module id in the source, found "
     "'outptus'"},
    {"FROM /messages/modules/bad$id/* INTO $upstream",
     "route 'r': column 24: invalid module id 'bad$id' in the source (use 1 to 64 of A-Z a-z 0-9 _ "
     ". -)"},
    {"FROM /messages/modules/s/outputs/ INTO $upstream",
     "route 'r': column 34: expected '*' or an output name after /outputs/ in the source, found "
     "nothing"},
    {"FROM /messages/modules/s/outputs/o/x INTO $upstream",
     "route 'r': column 35: unexpected '/x' after 'o' in the source"},
    {"FROM /messages/* TO $upstream", "route 'r': column 18: expected WHERE or INTO, found 'TO'"},
    {"FROM /messages/* INTO",
     "route 'r': column 22: expected $upstream or "
     "BrokeredEndpoint(\"/modules/{id}/inputs/{name}\"), found end "
     "of route"},
    {"FROM /* INTO $downstream",
     "route 'r': column 14: unknown endpoint '$downstream'; expected $upstream or "
     "BrokeredEndpoint(\"/modules/{id}/inputs/{name}\")"},
    {"FROM /* INTO BrokeredEndpoint \"/modules/f/inputs/i\"",
     "route 'r': column 31: expected '(' after BrokeredEndpoint, found '\"'"},
    {"FROM /* INTO BrokeredEndpoint(\"/modules/filter/input/in\")",
     "route 'r': column 48: expected 'inputs' after the module id in the endpoint path "
     "(/modules/{id}/inputs/{name})"},
    {"FROM /* INTO BrokeredEndpoint(\"/modules/filter/inputs/\")",
     "route 'r': column 55: invalid input name '' in the endpoint path (use 1 to 64 of A-Z a-z 0-9 "
     "_ . -)"},
    {"FROM /* INTO BrokeredEndpoint(\"/modules/filter/inputs/in\"",
     "route 'r': column 58: expected ')' after the endpoint path, found end of route"},
    {"FROM /* INTO BrokeredEndpoint(\"/modules/filter/inputs/in)",
     "route 'r': column 31: unterminated string"},
    {"FROM /* INTO $upstream extra", "route 'r': column 24: unexpected 'extra' after the sink"},
    {"FROM /* WHERE INTO $upstream",
     "route 'r': column 15: expected a condition after WHERE, found INTO"},
    {"FROM /* WHERE", "route 'r': column 14: expected a condition after WHERE, found end of route"},
    {"FROM /* WHERE a = 1", "route 'r': column 20: expected INTO, found end of route"},
    {"FROM /* WHERE a = 1 $upstream",
     "route 'r': column 21: expected an operator or INTO, found '$upstream'"},
    {"FROM /* WHERE a b INTO $upstream",
     "route 'r': column 17: expected an operator or INTO, found 'b'"},
    {"FROM /* WHERE 1 + INTO $upstream",
     "route 'r': column 19: expected an expression, found INTO"},
    {"FROM /* WHERE a = = 1 INTO $upstream",
     "route 'r': column 19: expected an expression, found '='"},
    {"FROM /* WHERE a AND OR b INTO $upstream",
     "route 'r': column 21: expected an expression, found OR"},
    {"FROM /* WHERE (a = 1 INTO $upstream",
     "route 'r': column 22: expected ')' to close '(' at column 15, found INTO"},
    {"FROM /* WHERE a = 1) INTO $upstream",
     "route 'r': column 20: expected an operator or INTO, found ')'"},
    {"FROM /* WHERE () INTO $upstream", "route 'r': column 16: expected an expression inside '()'"},
    {"FROM /* WHERE foo(1) INTO $upstream", "route 'r': column 15: unknown function 'foo'"},
    {"FROM /* WHERE abs(1, 2) = 1 INTO $upstream",
     "route 'r': column 22: too many arguments to abs() (takes 1)"},
    {"FROM /* WHERE substring('a') = 'a' INTO $upstream",
     "route 'r': column 15: substring() takes at least 2 arguments, found 1"},
    {"FROM /* WHERE abs() = 1 INTO $upstream",
     "route 'r': column 15: abs() takes 1 argument, found 0"},
    {"FROM /* WHERE abs(1 INTO $upstream",
     "route 'r': column 21: expected ',' or ')' in the arguments of abs(), found INTO"},
    {"FROM /* WHERE 'abc = 1 INTO $upstream", "route 'r': column 15: unterminated string"},
    {"FROM /* WHERE 'a\\qb' = 1 INTO $upstream",
     "route 'r': column 17: invalid escape '\\q' (use \\\\ \\' \\\" \\/ or \\uXXXX)"},
    {"FROM /* WHERE '\\u12' = 1 INTO $upstream",
     "route 'r': column 16: invalid \\u escape (expected 4 hex digits)"},
    {"FROM /* WHERE '\\ud800' = 1 INTO $upstream",
     "route 'r': column 16: unpaired surrogate in \\u escape"},
    {"FROM /* WHERE a # 1 INTO $upstream", "route 'r': column 17: unexpected character '#'"},
    {"FROM /* WHERE a ! 1 INTO $upstream", "route 'r': column 17: unexpected '!' (use != or NOT)"},
    {"FROM /* WHERE a | b INTO $upstream", "route 'r': column 17: unexpected '|' (use || or OR)"},
    {"FROM /* WHERE a ? b INTO $upstream", "route 'r': column 17: unexpected '?' (use ?\?)"},
    {"FROM /* WHERE a = \x01 INTO $upstream",
     "route 'r': column 19: unexpected character byte 0x01"},
    {"FROM /* WHERE $foo = 1 INTO $upstream",
     "route 'r': column 15: unknown system property '$foo'"},
    {"FROM /* WHERE {$foo} = 1 INTO $upstream",
     "route 'r': column 16: unknown system property '$foo'"},
    {"FROM /* WHERE $ = 1 INTO $upstream",
     "route 'r': column 15: expected a system property name after '$'"},
    {"FROM /* WHERE {$contentType = 'x' INTO $upstream",
     "route 'r': column 29: expected '}' after {$contentType, found '='"},
    {"FROM /* WHERE {a} = 'x' INTO $upstream",
     "route 'r': column 16: expected a system property ($name) after '{', found 'a'"},
    {"FROM /* WHERE $body.a[x] = 1 INTO $upstream",
     "route 'r': column 23: expected an array index or a quoted key after '[' in $body path"},
    {"FROM /* WHERE $body.a[1 = 1 INTO $upstream",
     "route 'r': column 22: expected ']' to close '[' in $body path"},
    {"FROM /* WHERE $body. = 1 INTO $upstream",
     "route 'r': column 21: expected a property name after '.' in $body path, found ' '"},
    {"FROM /* WHERE a = 0x INTO $upstream", "route 'r': column 19: invalid hex number '0x'"},
    {"FROM /* WHERE a = 0x1g INTO $upstream", "route 'r': column 19: invalid hex number '0x1g'"},
    {"FROM /* WHERE a = 0x11111111111111111 INTO $upstream",
     "route 'r': column 19: hex number out of range"},
    {"FROM /* WHERE a = 1.e5 INTO $upstream",
     "route 'r': column 19: invalid number '1.' (expected a digit after '.')"},
    {"FROM /* WHERE a = 1e INTO $upstream",
     "route 'r': column 20: invalid exponent in number '1e'"},
    {"FROM /* WHERE a = 12abc INTO $upstream", "route 'r': column 19: invalid number '12abc'"},
    {"FROM /* WHERE a = 1e999 INTO $upstream", "route 'r': column 19: number '1e999' out of range"},
    {"FROM /* WHERE a = 1 AND INTO $upstream",
     "route 'r': column 25: expected an expression, found INTO"},
    {deep, "route 'r': column 79: expression nested too deeply (more than 64 levels)"},
    {chain, "route 'r': column 1037: expression too complex (more than 256 levels of operators)"},
    {std::string(max_route_length + 1, ' '),
     "route 'r': column 8193: route text longer than 8192 bytes"},
  };
  for (const auto& c : table) {
    INFO(c.text);
    CHECK(compile_error(c.text) == c.message);
  }
  CHECK(route::compile("r", ok_deep));
  // The name appears as given.
  CHECK(compile_error("FROM").find("route 'r': ") == 0);
  auto named = route::compile("to-filter", "FROM /x INTO $upstream");
  REQUIRE_FALSE(named);
  CHECK(named.err().message.rfind("route 'to-filter': column 7: ", 0) == 0);
}

TEST_CASE("route: deep unary chains and long inputs are bounded", "[route]") {
  std::string nots = "FROM /* WHERE ";
  for (int i = 0; i < 1000; ++i)
    nots += "NOT ";
  nots += "true INTO $upstream";
  CHECK(compile_error(nots).find("expression nested too deeply") != std::string::npos);

  std::string minus = "FROM /* WHERE " + std::string(1000, '-') + "1 = 1 INTO $upstream";
  CHECK(compile_error(minus).find("expression nested too deeply") != std::string::npos);

  std::string calls = "FROM /* WHERE ";
  for (int i = 0; i < 100; ++i)
    calls += "abs(";
  calls += "1" + std::string(100, ')') + " = 1 INTO $upstream";
  CHECK(compile_error(calls).find("expression nested too deeply") != std::string::npos);

  // A long but flat condition is fine.
  std::string wide = "FROM /* WHERE a = 1";
  for (int i = 0; i < 200; ++i)
    wide += " OR a = " + std::to_string(i);
  wide += " INTO $upstream";
  auto r = route::compile("wide", wide);
  REQUIRE(r);
  CHECK(r->matches_condition(message_builder{}.property("a", "150").build(), {}));
}
