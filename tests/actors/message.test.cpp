#include <canopy/message.hpp>

#include <catch2/catch.hpp>

#include <random>
#include <string>

using namespace canopy;

namespace {

message sample() {
  return message_builder{}
    .body(R"({"temperature": 31.5})")
    .property("sensorID", "s-1")
    .property("alert", "true")
    .message_id("m-1")
    .correlation_id("c-1")
    .content_type("application/json")
    .content_encoding("utf-8")
    .creation_time_utc_ms(1700000000123)
    .connection_device_id("dev")
    .connection_module_id("sensor")
    .output_name("temperatureOutput")
    .ttl_secs(60)
    .user_id("u")
    .build();
}

}  // namespace

TEST_CASE("a built message reads back every field") {
  auto m = sample();
  CHECK(m.body() == R"({"temperature": 31.5})");
  CHECK(m.property("sensorID") == std::optional<std::string_view>{"s-1"});
  CHECK_FALSE(m.property("missing").has_value());
  auto props = m.properties();
  REQUIRE(props.size() == 2);
  CHECK(props[0].first == "sensorID");
  CHECK(props[1].first == "alert");
  CHECK(m.message_id() == "m-1");
  CHECK(m.correlation_id() == "c-1");
  CHECK(m.content_type() == "application/json");
  CHECK(m.content_encoding() == "utf-8");
  CHECK(m.creation_time_utc_ms() == 1700000000123);
  CHECK(m.connection_device_id() == "dev");
  CHECK(m.connection_module_id() == "sensor");
  CHECK(m.output_name() == "temperatureOutput");
  CHECK(m.ttl_secs() == 60);
  CHECK(m.user_id() == "u");
}

TEST_CASE("setting a property twice keeps one, with the last value") {
  auto m = message_builder{}.property("k", "1").property("k", "2").build();
  REQUIRE(m.properties().size() == 1);
  CHECK(m.property("k") == std::optional<std::string_view>{"2"});
}

TEST_CASE("copies share one immutable buffer (zero-copy)") {
  auto m = sample();
  auto copy = m;
  CHECK(copy.same_buffer(m));
  CHECK(copy.encoded().data() == m.encoded().data());
  CHECK(copy.body().data() == m.body().data());
}

TEST_CASE("binary bodies survive, including NUL bytes") {
  std::string body{"a\0b\xff", 4};
  auto m = message_builder{}.body(body).build();
  CHECK(m.body() == body);
}

TEST_CASE("an empty message has empty fields") {
  message m;
  CHECK(m.body().empty());
  CHECK(m.properties().empty());
  CHECK(m.message_id().empty());
  CHECK(m.creation_time_utc_ms() == 0);
}

TEST_CASE("encoded bytes decode to the same message") {
  auto m = sample();
  auto d = message::decode(m.encoded());
  REQUIRE(d.has_value());
  CHECK(d->encoded() == m.encoded());
  CHECK(d->body() == m.body());
  CHECK(d->property("alert") == std::optional<std::string_view>{"true"});
  CHECK_FALSE(d->same_buffer(m));
}

TEST_CASE("decode refuses malformed input without crashing") {
  auto good = std::string{sample().encoded()};
  CHECK_FALSE(message::decode("").has_value());
  CHECK_FALSE(message::decode("abc").has_value());                     // not whole words
  CHECK_FALSE(message::decode(good.substr(0, good.size() - 8)).has_value());  // truncated
  CHECK_FALSE(message::decode(good + std::string(8, '\0')).has_value());      // trailing words
  std::string huge_segments = good;
  huge_segments[0] = '\x7f';  // segment count far beyond the bytes
  CHECK_FALSE(message::decode(huge_segments).has_value());
  std::mt19937 rng{42};
  for (int i = 0; i < 2000; ++i) {
    auto mutated = good;
    for (int k = 0; k < 4; ++k)
      mutated[rng() % mutated.size()] = static_cast<char>(rng());
    auto d = message::decode(mutated);
    if (d) {  // if accepted, every accessor must be safe
      (void) d->body();
      (void) d->properties();
      (void) d->message_id();
    }
  }
}

TEST_CASE("message_builder::from copies body and properties") {
  auto m = sample();
  auto copy = message_builder::from(m).property("extra", "1").build();
  CHECK(copy.body() == m.body());
  CHECK(copy.property("sensorID") == std::optional<std::string_view>{"s-1"});
  CHECK(copy.property("extra") == std::optional<std::string_view>{"1"});
  CHECK(copy.content_type() == "application/json");
  CHECK_FALSE(copy.same_buffer(m));
}
