#include "runtime/log.hpp"

#include "temp_dir.hpp"

#include <catch2/catch.hpp>

#include <nlohmann/json.hpp>
#include <spdlog/logger.h>
#include <spdlog/spdlog.h>

#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

using namespace canopy;
namespace fs = std::filesystem;

namespace {

using canopy::unit_test::temp_dir;

/// Options for a quiet hub writing files to `dir`.
log_options files_in(const std::string& dir, bool json = false) {
  log_options o;
  o.dir = dir;
  o.json = json;
  o.to_stderr = false;
  o.level = "trace";
  return o;
}

std::unique_ptr<log_hub> make_hub(const log_options& o) {
  auto h = log_hub::create(o);
  INFO((h ? std::string() : h.err().message));
  REQUIRE(h.ok());
  return std::move(h).value();
}

std::vector<std::string> read_lines(const std::string& path) {
  std::ifstream in(path);
  std::vector<std::string> out;
  for (std::string line; std::getline(in, line);) out.push_back(line);
  return out;
}

}  // namespace

TEST_CASE("log: level names parse; unknown ones are a clear error", "[log]") {
  using spdlog::level::level_enum;
  CHECK(*parse_log_level("trace") == level_enum::trace);
  CHECK(*parse_log_level("debug") == level_enum::debug);
  CHECK(*parse_log_level("info") == level_enum::info);
  CHECK(*parse_log_level("INFO") == level_enum::info);
  CHECK(*parse_log_level("warn") == level_enum::warn);
  CHECK(*parse_log_level("warning") == level_enum::warn);
  CHECK(*parse_log_level("error") == level_enum::err);
  CHECK(*parse_log_level("critical") == level_enum::critical);
  CHECK(*parse_log_level("off") == level_enum::off);

  auto bad = parse_log_level("verbose");
  REQUIRE_FALSE(bad.ok());
  CHECK(bad.err().code == errc::invalid_argument);
  CHECK_THAT(bad.err().message, Catch::Contains("'verbose'") && Catch::Contains("trace") &&
                                    Catch::Contains("off"));
  CHECK_FALSE(parse_log_level("").ok());

  log_options o;
  o.level = "loud";
  o.to_stderr = false;
  auto hub = log_hub::create(o);
  REQUIRE_FALSE(hub.ok());
  CHECK(hub.err().code == errc::invalid_argument);
  CHECK_THAT(hub.err().message, Catch::Contains("'loud'"));
}

TEST_CASE("log: the level filters lines and can change at run time", "[log]") {
  temp_dir tmp;
  auto o = files_in(tmp.path);
  o.level = "warn";
  auto hub = make_hub(o);
  CHECK(hub->level() == spdlog::level::warn);
  auto lg = hub->module_logger("sensor");
  lg->info("hidden");
  lg->warn("shown {}", 1);
  REQUIRE(hub->set_level("debug").ok());
  CHECK(hub->level() == spdlog::level::debug);
  lg->debug("shown {}", 2);
  hub->module_logger("late")->debug("late logger gets the new level");
  auto bad = hub->set_level("nope");
  REQUIRE_FALSE(bad.ok());
  CHECK(hub->level() == spdlog::level::debug);

  auto lines = read_lines(tmp.path + "/sensor.log");
  REQUIRE(lines.size() == 2);
  CHECK_THAT(lines[0], Catch::Contains("[warning] sensor: shown 1"));
  CHECK_THAT(lines[1], Catch::Contains("[debug] sensor: shown 2"));
  CHECK(read_lines(tmp.path + "/late.log").size() == 1);
}

TEST_CASE("log: each module's file gets only that module's lines", "[log]") {
  temp_dir tmp;
  auto hub = make_hub(files_in(tmp.path));
  auto a = hub->module_logger("alpha");
  auto b = hub->module_logger("beta");
  CHECK(hub->module_logger("alpha") == a);  // cached
  CHECK(hub->module_logger("canopy") == hub->node_logger());
  a->info("from alpha 1");
  b->info("from beta");
  a->info("from alpha 2");
  hub->node_logger()->info("from the node");

  auto la = read_lines(tmp.path + "/alpha.log");
  auto lb = read_lines(tmp.path + "/beta.log");
  auto ln = read_lines(tmp.path + "/canopy.log");
  REQUIRE(la.size() == 2);
  CHECK_THAT(la[0], Catch::EndsWith("alpha: from alpha 1"));
  CHECK_THAT(la[1], Catch::EndsWith("alpha: from alpha 2"));
  REQUIRE(lb.size() == 1);
  CHECK_THAT(lb[0], Catch::EndsWith("beta: from beta"));
  REQUIRE(ln.size() == 1);
  CHECK_THAT(ln[0], Catch::EndsWith("canopy: from the node"));

  // Odd module names cannot escape the directory.
  CHECK(hub->file_path("../evil/x") == tmp.path + "/_.._evil_x.log");
  CHECK(hub->file_path(".hidden") == tmp.path + "/_.hidden.log");
  hub->module_logger("../evil/x")->info("contained");
  CHECK(fs::exists(tmp.path + "/_.._evil_x.log"));
}

TEST_CASE("log: JSON lines are valid JSON with ts, level, logger and msg", "[log]") {
  temp_dir tmp;
  auto hub = make_hub(files_in(tmp.path, true));
  auto lg = hub->module_logger("filter");
  const std::string tricky = "quote \" backslash \\ newline \n tab \t bell \x07 del \x7f é ✓";
  lg->info("{}", tricky);
  lg->error("bad utf8 \xff\xfe end");
  lg->warn("plain");

  auto lines = read_lines(tmp.path + "/filter.log");
  REQUIRE(lines.size() == 3);  // the newline in the message was escaped
  std::vector<nlohmann::json> docs;
  for (const auto& l : lines) {
    INFO(l);
    auto j = nlohmann::json::parse(l, nullptr, false);
    REQUIRE_FALSE(j.is_discarded());
    REQUIRE(j.is_object());
    CHECK(j.size() == 4);
    docs.push_back(j);
  }
  CHECK(docs[0]["level"] == "info");
  CHECK(docs[0]["logger"] == "filter");
  CHECK(docs[0]["msg"] == tricky);
  CHECK(docs[1]["level"] == "error");
  CHECK(docs[1]["msg"] == "bad utf8 \xef\xbf\xbd\xef\xbf\xbd end");
  CHECK(docs[2]["level"] == "warning");
  const std::string ts = docs[0]["ts"];
  // 2024-05-01T12:00:00.123Z
  REQUIRE(ts.size() == 24);
  CHECK(ts[4] == '-');
  CHECK(ts[10] == 'T');
  CHECK(ts[19] == '.');
  CHECK(ts.back() == 'Z');
}

TEST_CASE("log: tail returns the last n lines, oldest first", "[log]") {
  temp_dir tmp;
  auto hub = make_hub(files_in(tmp.path));
  auto lg = hub->module_logger("sensor");
  // Long enough to span several 16 KiB read blocks.
  const std::string pad(300, 'p');
  for (int i = 0; i < 500; ++i) lg->info("line {} {}", i, pad);

  auto t = hub->tail("sensor", 3);
  REQUIRE(t.ok());
  REQUIRE(t->size() == 3);
  CHECK_THAT((*t)[0], Catch::Contains("line 497 "));
  CHECK_THAT((*t)[1], Catch::Contains("line 498 "));
  CHECK_THAT((*t)[2], Catch::Contains("line 499 "));

  auto many = hub->tail("sensor", 120);
  REQUIRE(many.ok());
  REQUIRE(many->size() == 120);
  for (int i = 0; i < 120; ++i) CHECK_THAT((*many)[i], Catch::EndsWith("line " + std::to_string(380 + i) + " " + pad));

  auto all = hub->tail("sensor", 10000);
  REQUIRE(all.ok());
  CHECK(all->size() == 500);
  CHECK_THAT(all->front(), Catch::Contains("line 0 "));

  auto none = hub->tail("sensor", 0);
  REQUIRE(none.ok());
  CHECK(none->empty());

  auto missing = hub->tail("nobody", 5);
  REQUIRE_FALSE(missing.ok());
  CHECK(missing.err().code == errc::not_found);
  CHECK_THAT(missing.err().message, Catch::Contains(tmp.path + "/nobody.log"));

  // A logger that has not logged yet has an empty file.
  hub->module_logger("quiet");
  auto quiet = hub->tail("quiet", 5);
  REQUIRE(quiet.ok());
  CHECK(quiet->empty());
}

TEST_CASE("log: tail handles files written by others, edge cases included", "[log]") {
  temp_dir tmp;
  auto hub = make_hub(files_in(tmp.path));
  auto write = [&](const std::string& name, const std::string& text) {
    std::ofstream(tmp.path + "/" + name + ".log", std::ios::binary) << text;
  };
  write("a", "one\ntwo\nthree");  // no final newline
  write("b", "\n\nx\n");          // empty lines
  write("c", "only\n");
  write("d", "\n");
  auto a = hub->tail("a", 2);
  REQUIRE(a.ok());
  CHECK(*a == std::vector<std::string>{"two", "three"});
  auto b = hub->tail("b", 10);
  REQUIRE(b.ok());
  CHECK(*b == std::vector<std::string>{"", "", "x"});
  auto c = hub->tail("c", 10);
  REQUIRE(c.ok());
  CHECK(*c == std::vector<std::string>{"only"});
  auto d = hub->tail("d", 10);
  REQUIRE(d.ok());
  CHECK(*d == std::vector<std::string>{""});
}

TEST_CASE("log: tail reads on into rotated files", "[log]") {
  temp_dir tmp;
  auto o = files_in(tmp.path);
  o.max_file_bytes = 4096;
  o.max_files = 3;
  auto hub = make_hub(o);
  auto lg = hub->module_logger("chatty");
  for (int i = 0; i < 100; ++i) lg->info("message number {:04}", i);  // ~60 bytes a line
  REQUIRE(fs::exists(tmp.path + "/chatty.1.log"));
  CHECK(fs::file_size(tmp.path + "/chatty.log") <= 4096);

  auto t = hub->tail("chatty", 90);
  REQUIRE(t.ok());
  REQUIRE(t->size() == 90);
  for (int i = 0; i < 90; ++i) {
    char expect[32];
    std::snprintf(expect, sizeof expect, "message number %04d", 10 + i);
    CHECK_THAT((*t)[i], Catch::EndsWith(expect));
  }
}

TEST_CASE("log: without a log directory there are no files and tail says so", "[log]") {
  log_options o;
  o.to_stderr = false;
  auto hub = make_hub(o);
  CHECK(hub->file_path("x").empty());
  hub->module_logger("x")->info("nowhere to go but followers");
  auto t = hub->tail("x", 1);
  REQUIRE_FALSE(t.ok());
  CHECK(t.err().code == errc::unavailable);
}

TEST_CASE("log: a log directory that cannot be created is a clear error", "[log]") {
  temp_dir tmp;
  const std::string file = tmp.path + "/plain-file";
  std::ofstream(file) << "x";
  auto o = files_in(file + "/logs");
  auto hub = log_hub::create(o);
  REQUIRE_FALSE(hub.ok());
  CHECK(hub.err().code == errc::io_error);
  CHECK_THAT(hub.err().message, Catch::Contains(file + "/logs"));

  // canopy.log is a directory: the node's own file cannot open.
  fs::create_directory(tmp.path + "/logs2");
  fs::create_directory(tmp.path + "/logs2/canopy.log");
  auto hub2 = log_hub::create(files_in(tmp.path + "/logs2"));
  REQUIRE_FALSE(hub2.ok());
  CHECK(hub2.err().code == errc::io_error);
  CHECK_THAT(hub2.err().message, Catch::Contains(tmp.path + "/logs2/canopy.log"));
}

TEST_CASE("log: a module whose file cannot open still logs, and the node says why", "[log]") {
  temp_dir tmp;
  auto hub = make_hub(files_in(tmp.path));
  fs::create_directory(tmp.path + "/blocked.log");
  std::vector<std::string> node_lines;
  auto id = hub->follow("canopy", [&](const std::string& l) { node_lines.push_back(l); });
  std::vector<std::string> lines;
  auto id2 = hub->follow("blocked", [&](const std::string& l) { lines.push_back(l); });
  hub->module_logger("blocked")->info("still delivered");
  hub->unfollow(id);
  hub->unfollow(id2);
  REQUIRE(node_lines.size() == 1);
  CHECK_THAT(node_lines[0], Catch::Contains(tmp.path + "/blocked.log"));
  REQUIRE(lines.size() == 1);
  CHECK_THAT(lines[0], Catch::EndsWith("still delivered"));
}

TEST_CASE("log: follow gets each new line of that module until unfollow", "[log]") {
  temp_dir tmp;
  auto hub = make_hub(files_in(tmp.path));
  auto a = hub->module_logger("alpha");
  a->info("before following");

  std::vector<std::string> got1, got2;
  const auto id1 = hub->follow("alpha", [&](const std::string& l) { got1.push_back(l); });
  const auto id2 = hub->follow("alpha", [&](const std::string& l) { got2.push_back(l); });
  CHECK(id1 != id2);
  a->info("first");
  hub->module_logger("beta")->info("other module");
  a->info("second");
  hub->unfollow(id1);
  a->info("third");
  hub->unfollow(id2);
  hub->unfollow(id2);    // twice: ignored
  hub->unfollow(12345);  // unknown: ignored
  a->info("fourth");

  REQUIRE(got1.size() == 2);
  CHECK_THAT(got1[0], Catch::EndsWith("alpha: first"));
  CHECK_THAT(got1[1], Catch::EndsWith("alpha: second"));
  REQUIRE(got2.size() == 3);
  CHECK_THAT(got2[2], Catch::EndsWith("alpha: third"));
  // Lines come formatted as in the file, without the newline.
  auto file = read_lines(tmp.path + "/alpha.log");
  REQUIRE(file.size() == 5);
  CHECK(file[1] == got2[0]);
  for (const auto& l : got2) CHECK(l.find('\n') == std::string::npos);

  // A module that has not logged yet can be followed before it starts.
  std::vector<std::string> early;
  const auto id3 = hub->follow("later", [&](const std::string& l) { early.push_back(l); });
  hub->module_logger("later")->warn("hello");
  hub->unfollow(id3);
  REQUIRE(early.size() == 1);
}

TEST_CASE("log: subscriptions end with the hub; its loggers keep working", "[log]") {
  std::shared_ptr<spdlog::logger> kept;
  std::vector<std::string> got;
  {
    log_options o;
    o.to_stderr = false;
    auto hub = make_hub(o);
    kept = hub->module_logger("m");
    hub->follow("m", [&](const std::string& l) { got.push_back(l); });
    kept->info("one");
  }
  kept->info("two");
  CHECK(got.size() == 1);
}

TEST_CASE("log: follow in JSON mode delivers JSON lines", "[log]") {
  auto o = log_options{};
  o.json = true;
  o.to_stderr = false;
  auto hub = make_hub(o);
  std::vector<std::string> got;
  auto id = hub->follow("m", [&](const std::string& l) { got.push_back(l); });
  hub->module_logger("m")->info("x={}", 1);
  hub->unfollow(id);
  REQUIRE(got.size() == 1);
  auto j = nlohmann::json::parse(got[0]);
  CHECK(j["msg"] == "x=1");
  CHECK(j["logger"] == "m");
}

TEST_CASE("log: follow and unfollow are safe while other threads log", "[log]") {
  temp_dir tmp;
  auto hub = make_hub(files_in(tmp.path));
  auto lg = hub->module_logger("busy");
  std::atomic<bool> stop{false};
  std::thread writer([&] {
    int i = 0;
    while (!stop.load()) lg->info("n {}", i++);
  });
  for (int round = 0; round < 50; ++round) {
    std::atomic<int> calls{0};
    std::atomic<bool> unsubscribed{false};
    std::atomic<bool> late_call{false};
    const auto id = hub->follow("busy", [&](const std::string&) {
      if (unsubscribed.load()) late_call = true;
      ++calls;
    });
    while (calls.load() < 3) std::this_thread::yield();
    hub->unfollow(id);
    unsubscribed = true;
    CHECK_FALSE(late_call.load());
  }
  stop = true;
  writer.join();
}

TEST_CASE("log: make_default points spdlog's default logger at the node", "[log]") {
  temp_dir tmp;
  {
    auto hub = make_hub(files_in(tmp.path));
    hub->make_default();
    CHECK(spdlog::default_logger() == hub->node_logger());
    spdlog::info("via the default logger");
    auto lines = read_lines(tmp.path + "/canopy.log");
    REQUIRE(lines.size() == 1);
    CHECK_THAT(lines[0], Catch::EndsWith("canopy: via the default logger"));
  }
  // The hub is gone: the default logger no longer writes to its files.
  spdlog::default_logger()->set_level(spdlog::level::off);
  spdlog::info("after");
  CHECK(read_lines(tmp.path + "/canopy.log").size() == 1);
}
