// The persistent MQTT sessions on disk (runtime/session_store).
#include "runtime/session_store.hpp"

#include "temp_dir.hpp"

#include <catch2/catch.hpp>

#include <fstream>

using namespace canopy;

TEST_CASE("mqtt session store: sessions and their messages survive a reopen", "[session_store]") {
  unit_test::temp_dir dir{"canopy-sessions"};
  {
    auto store = mqtt_session_store::open(dir.path);
    REQUIRE(store);
    auto& s = **store;
    REQUIRE(s.save("leaf1", 0));
    REQUIRE(s.save("leaf1", 0b101));  // updated in place
    REQUIRE(s.save("leaf2", 1));
    auto a = s.add_message("leaf1", "devices/leaf1/messages/devicebound/k=v", "one");
    auto b = s.add_message("leaf1", "devices/leaf1/messages/devicebound/", std::string("t\0wo", 4));
    auto c = s.add_message("leaf2", "devices/leaf2/messages/devicebound/", "three");
    REQUIRE(a);
    REQUIRE(b);
    REQUIRE(c);
    CHECK(*b > *a);
    REQUIRE(s.remove_message("leaf1", *a));
  }
  auto store = mqtt_session_store::open(dir.path);
  REQUIRE(store);
  auto all = (*store)->load_all();
  REQUIRE(all);
  REQUIRE(all->size() == 2);
  CHECK((*all)[0].client_id == "leaf1");
  CHECK((*all)[0].subscriptions == 0b101u);
  REQUIRE((*all)[0].messages.size() == 1);
  CHECK((*all)[0].messages[0].payload == std::string("t\0wo", 4));
  CHECK((*all)[0].messages[0].topic == "devices/leaf1/messages/devicebound/");
  CHECK((*all)[1].client_id == "leaf2");
  REQUIRE((*all)[1].messages.size() == 1);

  // One session alone.
  auto one = (*store)->load("leaf1");
  REQUIRE(one);
  REQUIRE(*one);
  CHECK((*one)->subscriptions == 0b101u);
  CHECK((*one)->messages.size() == 1);
  auto none = (*store)->load("nobody");
  REQUIRE(none);
  CHECK_FALSE(*none);

  // A clean session drops one, with its messages.
  REQUIRE((*store)->drop("leaf1"));
  all = (*store)->load_all();
  REQUIRE(all);
  REQUIRE(all->size() == 1);
  CHECK((*all)[0].client_id == "leaf2");
}

TEST_CASE("mqtt session store: a file that is not a session store is refused by name", "[session_store]") {
  unit_test::temp_dir dir{"canopy-sessions"};
  std::ofstream{dir.path + "/mqtt-sessions.db"} << "this is not a database, just text of some length..........";
  auto store = mqtt_session_store::open(dir.path);
  REQUIRE_FALSE(store);
  CHECK(store.err().message.find("mqtt-sessions.db") != std::string::npos);
}
