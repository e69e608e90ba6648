#include "actors/process_host.hpp"

#include "actor_fixture.hpp"
#include "runtime/atoms.hpp"
#include "runtime/log.hpp"
#include "runtime/router.hpp"
#include "runtime/supervisor.hpp"
#include "temp_dir.hpp"

#include <caf/all.hpp>
#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <fstream>
#include <thread>

using namespace canopy;
using namespace std::chrono_literals;

namespace {

/// True when no process of group `pgid` exists any more (not even a zombie).
bool group_gone(pid_t pgid) {
  return ::kill(-pgid, 0) == -1 && errno == ESRCH;
}

struct fixture : canopy::unit_test::actor_fixture {
  canopy::unit_test::temp_dir dir{"canopy-proc"};
  manual_clock clk;
  std::unique_ptr<log_hub> logs;

  fixture() {
    log_options o;
    o.dir = dir.path + "/logs";
    o.to_stderr = false;
    auto hub = log_hub::create(o);
    REQUIRE(hub);
    logs = std::move(*hub);
  }
  ~fixture() { shutdown(); }  // the hosts go before the clock and the logs

  /// Writes an executable /bin/sh script; returns its path.
  std::string script(const std::string& name, const std::string& body, mode_t mode = 0755) {
    auto path = dir.path + "/" + name;
    {
      std::ofstream out{path};
      out << "#!/bin/sh\n" << body << "\n";
    }
    REQUIRE(::chmod(path.c_str(), mode) == 0);
    return path;
  }

  process_host_config config(const std::string& exe) {
    process_host_config pc;
    pc.name = "m";
    pc.executable = exe;
    pc.runtime_env = [](const std::string& module) {
      return std::map<std::string, std::string>{{"CANOPY_DEVICE_ID", "dev"}, {"CANOPY_MODULE_ID", module}};
    };
    pc.stop_grace = 1s;
    pc.clk = &clk;
    pc.logger = logs->module_logger("m");
    return pc;
  }

  /// The module's log lines so far.
  std::vector<std::string> lines() {
    auto t = logs->tail("m", 10000);
    return t ? *t : std::vector<std::string>{};
  }

  /// The first log line containing `text`, waiting up to 5 s for it.
  std::string wait_for_line(const std::string& text) {
    for (int i = 0; i < 500; ++i) {
      for (auto& l : lines())
        if (l.find(text) != std::string::npos)
          return l;
      std::this_thread::sleep_for(10ms);
    }
    FAIL("no log line with '" << text << "'");
    return {};
  }

  bool has_line(const std::string& text) {
    for (auto& l : lines())
      if (l.find(text) != std::string::npos)
        return true;
    return false;
  }

  /// The pid a script printed as "ready PID".
  pid_t ready_pid() {
    auto l = wait_for_line("ready ");
    return static_cast<pid_t>(std::stol(l.substr(l.find("ready ") + 6)));
  }

  caf::error wait_down(const caf::actor& a) {
    caf::error reason;
    (*self)->monitor(a);
    (*self)->receive([&](caf::down_msg& dm) { reason = dm.reason; },
                     caf::after(10s) >> [] { FAIL("the process host did not end"); });
    return reason;
  }
};

/// A script that runs until stopped; on SIGTERM it says so and exits 0.
const char* const polite = "trap 'echo got TERM; exit 0' TERM\necho \"ready $$\"\nwhile :; do sleep 0.05; done";

/// A script that ignores SIGTERM (as do its children: an ignored signal stays
/// ignored across exec).
const char* const stubborn = "trap '' TERM\necho \"ready $$\"\nwhile :; do sleep 1; done";

}  // namespace

TEST_CASE("process_host: wait statuses read as an operator expects", "[process_host]") {
  CHECK(describe_wait_status(0) == "exited with code 0");
  CHECK(describe_wait_status(3 << 8) == "exited with code 3");
  CHECK(describe_wait_status(SIGKILL) == "killed by signal 9 (SIGKILL)");
  CHECK(describe_wait_status(SIGSEGV | 0x80) == "killed by signal 11 (SIGSEGV), core dumped");
  CHECK(describe_wait_status(-1) == "ended with an unknown exit status (reaped elsewhere)");
}

TEST_CASE("process_host: the environment: PATH, then the manifest's, then the runtime's", "[process_host]") {
  std::vector<std::string> overridden;
  auto env = process_environment({{"CANOPY_DEVICE_ID", "dev"}, {"CANOPY_MODULE_ID", "m"}},
                                 {{"CANOPY_DEVICE_ID", "spoof"}, {"SITE", "x"}, {"PATH", "/opt/bin"}},
                                 "/usr/bin:/bin", &overridden);
  CHECK(env == std::vector<std::string>{"CANOPY_DEVICE_ID=dev", "CANOPY_MODULE_ID=m", "PATH=/opt/bin", "SITE=x"});
  CHECK(overridden == std::vector<std::string>{"CANOPY_DEVICE_ID"});
  CHECK(process_environment({}, {}, "/bin") == std::vector<std::string>{"PATH=/bin"});
  CHECK(process_environment({}, {}, "").empty());
}

TEST_CASE("process_host: line splitting: newlines, CR LF, long lines, UTF-8 kept whole", "[process_host]") {
  std::vector<std::string> out;
  auto emit = [&](std::string_view l) { out.emplace_back(l); };
  line_splitter s{8};
  s.feed("ab", emit);
  s.feed("c\r\nd\n\nxyz", emit);
  CHECK(out == std::vector<std::string>{"abc", "d", ""});
  s.finish(emit);
  CHECK(out.back() == "xyz");
  out.clear();
  s.feed("0123456789abcdefghij\n", emit);
  CHECK(out == std::vector<std::string>{"01234567", "89abcdef", "ghij"});
  out.clear();
  // "é" is 2 bytes: the cut moves before it rather than through it.
  s.feed("1234567\xc3\xa9" "89\n", emit);
  CHECK(out == std::vector<std::string>{"1234567", "\xc3\xa9" "89"});
  out.clear();
  s.finish(emit);
  CHECK(out.empty());
}

TEST_CASE("process_host: runs the executable with its env; stdout at info, stderr at warn", "[process_host]") {
  fixture f;
  // A descriptor the node has open without O_CLOEXEC must not reach the module.
  int leak = ::open("/dev/null", O_RDONLY);
  REQUIRE(leak >= 0);
  REQUIRE(::dup2(leak, 200) == 200);
  ::close(leak);
  auto exe = f.script("env.sh",
                      "echo \"device=$CANOPY_DEVICE_ID module=$CANOPY_MODULE_ID site=$SITE path=${PATH:+set}\"\n"
                      "echo \"to stderr\" >&2\n"
                      "echo \"cwd=$(pwd) arg1=$1 arg2=$2\"\n"
                      "if [ -e /proc/$$/fd/200 ]; then echo fd200=open; else echo fd200=closed; fi\n"
                      "echo \"stdin=$(readlink /proc/$$/fd/0)\"\n"
                      "printf 'no newline at the end'");
  auto cfg = f.config(exe);
  cfg.env = {{"SITE", "line-3"}, {"CANOPY_DEVICE_ID", "spoof"}};
  cfg.args = {"one", "two words"};
  cfg.working_dir = f.dir.path;
  auto a = spawn_process_host(*f.sys, cfg);
  auto reason = f.wait_down(a);
  ::close(200);
  CHECK(reason == caf::exit_reason::user_shutdown);  // not a crash
  CHECK(caf::to_string(reason).find("exited with code 0") != std::string::npos);
  CHECK(f.wait_for_line("device=").find("[info] m: device=dev module=m site=line-3 path=set") != std::string::npos);
  CHECK(f.wait_for_line("to stderr").find("[warning] m: to stderr") != std::string::npos);
  CHECK(f.has_line("cwd=" + f.dir.path + " arg1=one arg2=two words"));
  CHECK(f.has_line("fd200=closed"));
  CHECK(f.has_line("stdin=/dev/null"));
  CHECK(f.has_line("[info] m: no newline at the end"));
  // The runtime's variable won over the manifest's, and the log says so.
  CHECK(f.has_line("env CANOPY_DEVICE_ID: the manifest's value is ignored"));
  CHECK(f.has_line("started " + exe + " (pid "));
}

TEST_CASE("process_host: a non-zero exit or a signal is a crash with a readable reason", "[process_host]") {
  fixture f;
  auto r3 = f.wait_down(spawn_process_host(*f.sys, f.config(f.script("three.sh", "echo working\nexit 3"))));
  CHECK(r3 == caf::sec::runtime_error);
  CHECK(caf::to_string(r3).find("exited with code 3") != std::string::npos);
  CHECK(f.has_line("[error] m: exited with code 3"));
  CHECK(f.has_line("[info] m: working"));

  auto r9 = f.wait_down(spawn_process_host(*f.sys, f.config(f.script("nine.sh", "kill -9 $$"))));
  CHECK(r9 == caf::sec::runtime_error);
  CHECK(caf::to_string(r9).find("killed by signal 9 (SIGKILL)") != std::string::npos);
}

TEST_CASE("process_host: an executable that cannot start ends the host with the reason", "[process_host]") {
  fixture f;
  auto exe = f.script("noexec.sh", "echo never", 0644);
  auto reason = f.wait_down(spawn_process_host(*f.sys, f.config(exe)));
  CHECK(reason == caf::sec::runtime_error);
  CHECK(caf::to_string(reason).find("cannot start " + exe + ": Permission denied") != std::string::npos);
  CHECK(f.has_line("[error] m: cannot start"));
  auto cfg = f.config(f.script("ok.sh", "exit 0"));
  cfg.working_dir = f.dir.path + "/missing";
  auto r2 = f.wait_down(spawn_process_host(*f.sys, cfg));
  CHECK(caf::to_string(r2).find("No such file or directory") != std::string::npos);
}

TEST_CASE("process_host: very long output lines are split", "[process_host]") {
  fixture f;
  auto cfg = f.config(f.script("long.sh", "head -c 40000 /dev/zero | tr '\\0' 'a'; echo; echo after"));
  cfg.max_line_bytes = 16384;
  f.wait_down(spawn_process_host(*f.sys, cfg));
  f.wait_for_line("after");
  std::vector<std::size_t> sizes;
  for (auto& l : f.lines())
    if (auto at = l.find("m: a"); at != std::string::npos && l.find("after") == std::string::npos)
      sizes.push_back(l.size() - (at + 3));
  CHECK(sizes == std::vector<std::size_t>{16384, 16384, 40000 - 2 * 16384});
}

TEST_CASE("process_host: a stop sends SIGTERM to the group; the host ends once it is reaped", "[process_host]") {
  fixture f;
  auto a = spawn_process_host(*f.sys, f.config(f.script("polite.sh", polite)));
  auto pgid = f.ready_pid();
  CHECK(::getpgid(pgid) == pgid);  // the leader of its own group
  CHECK_FALSE(group_gone(pgid));
  (*f.self)->monitor(a);
  caf::anon_send_exit(a, caf::exit_reason::user_shutdown);
  caf::error reason;
  (*f.self)->receive([&](caf::down_msg& dm) { reason = dm.reason; },
                     caf::after(10s) >> [] { FAIL("the process host did not end"); });
  CHECK(reason == caf::exit_reason::user_shutdown);
  CHECK(group_gone(pgid));
  CHECK(f.has_line("got TERM"));
  CHECK(f.has_line("stopped (exited with code 0)"));
}

TEST_CASE("process_host: a child that ignores SIGTERM is SIGKILLed after the grace", "[process_host]") {
  fixture f;
  // Through the modules supervisor, as a deployment change removes a module.
  module_spec m;
  m.name = "m";
  m.type = "process";
  m.process.executable_path = f.script("stubborn.sh", stubborn);
  m.process.stop_grace = 1s;
  m.health.period = 0s;
  supervisor_config sc;
  sc.name = "modules";
  sc.clk = &f.clk;
  sc.intensity = restart_intensity{100, 1s};
  sc.children = {process_child_spec(m, f.logs->module_logger("m"), &f.clk, {})};
  CHECK(sc.children[0].shutdown_timeout == 6s);  // the grace, then time to reap
  auto sup = spawn_supervisor(*f.sys, std::move(sc));
  auto pgid = f.ready_pid();
  std::optional<bool> removed;
  // The supervisor answers a plain send with a message (bool) once the child is down.
  (*f.self)->send(sup, atoms::remove_child::value, std::string{"m"});
  f.wait_for_line("stopping: SIGTERM");
  // SIGTERM is ignored: the group lives on, and so does the host.
  std::this_thread::sleep_for(200ms);
  CHECK_FALSE(group_gone(pgid));
  (*f.self)->receive([&](bool ok) { removed = ok; }, caf::after(0s) >> [] {});
  CHECK_FALSE(removed);
  f.clk.advance(1s);  // the grace is over
  (*f.self)->receive([&](bool ok) { removed = ok; }, caf::after(10s) >> [] { FAIL("not removed"); });
  CHECK(removed == std::optional<bool>{true});
  CHECK(group_gone(pgid));
  CHECK(f.has_line("SIGKILL to process group"));
  CHECK(f.has_line("stopped (killed by signal 9 (SIGKILL))"));
  caf::anon_send_exit(sup, caf::exit_reason::user_shutdown);
}

TEST_CASE("process_host: when the leader exits, the rest of its group is killed and reaped", "[process_host]") {
  fixture f;
  auto exe = f.script("orphans.sh", "sleep 1000 &\nsleep 1000 &\necho \"ready $$\"\nexit 0");
  auto a = spawn_process_host(*f.sys, f.config(exe));
  auto reason = f.wait_down(a);
  CHECK(reason == caf::exit_reason::user_shutdown);  // exited with code 0
  CHECK(group_gone(f.ready_pid()));  // no process, not even a zombie
}

TEST_CASE("process_host: answers the module-host protocol without taking messages", "[process_host]") {
  fixture f;
  auto a = spawn_process_host(*f.sys, f.config(f.script("polite.sh", polite)));
  auto pgid = f.ready_pid();
  (*f.self)->send(a, atoms::health_ping::value, std::uint64_t{7});
  (*f.self)->receive([](atoms::health_pong, std::uint64_t seq) { CHECK(seq == 7); },
                     caf::after(5s) >> [] { FAIL("no pong"); });
  (*f.self)->send(a, atoms::desired::value, std::string{"{}"}, true);
  (*f.self)->send(a, atoms::input::value, std::string{"in"}, message{}, std::uint64_t{1});
  (*f.self)
    ->request(a, 5s, atoms::method::value, std::string{"reset"}, std::string{"{}"})
    .receive(
      [](int status, std::string& body) {
        CHECK(status == 503);
        CHECK(body.find("MQTT") != std::string::npos);
      },
      [](caf::error& err) { FAIL(caf::to_string(err)); });
  // No acknowledgement of the input, and nothing announced to a router.
  (*f.self)->receive([](atoms::delivered, const std::string&, std::uint64_t, std::uint64_t) { FAIL("acked"); },
                     caf::after(50ms) >> [] {});
  caf::anon_send_exit(a, caf::exit_reason::user_shutdown);
  f.wait_down(a);
  CHECK(group_gone(pgid));
}

TEST_CASE("process_host: killing the host outright still kills and reaps the group", "[process_host]") {
  fixture f;
  auto a = spawn_process_host(*f.sys, f.config(f.script("stubborn.sh", stubborn)));
  auto pgid = f.ready_pid();
  (*f.self)->monitor(a);
  caf::anon_send_exit(a, caf::exit_reason::kill);
  (*f.self)->receive([](caf::down_msg&) {}, caf::after(10s) >> [] { FAIL("alive"); });
  CHECK(group_gone(pgid));
}

namespace {

/// Runs one process module under a modules supervisor and returns its events
/// until it ends up `failed` or `stopped`, advancing the clock through backoff.
std::vector<child_event_info> run_supervised(fixture& f, const module_spec& m) {
  supervisor_config sc;
  sc.name = "modules";
  sc.clk = &f.clk;
  sc.observer = caf::actor{*f.self};
  sc.intensity = restart_intensity{100, 1s};
  sc.children = {process_child_spec(m, f.logs->module_logger("m"), &f.clk, {})};
  auto sup = spawn_supervisor(*f.sys, std::move(sc));
  std::vector<child_event_info> events;
  bool done = false;
  while (!done)
    (*f.self)->receive(
      [&](atoms::child_event, child_event_info& e) {
        events.push_back(e);
        if (e.kind == child_event_kind::restarting && e.delay > clock::duration::zero())
          f.clk.advance(e.delay);
        done = e.kind == child_event_kind::failed || e.kind == child_event_kind::stopped;
      },
      caf::after(10s) >> [&] {
        FAIL("no child event");
        done = true;
      });
  caf::anon_send_exit(sup, caf::exit_reason::user_shutdown);
  return events;
}

module_spec supervised(const std::string& exe, restart_policy policy) {
  module_spec m;
  m.name = "m";
  m.type = "process";
  m.process.executable_path = exe;
  m.restart = policy;
  m.health.period = 0s;
  m.limits.max_restarts = 2;
  m.limits.within = 60s;
  m.limits.backoff_base = 1s;
  m.limits.backoff_cap = 1s;
  m.limits.jitter = 0;
  return m;
}

}  // namespace

TEST_CASE("process_host: a crash loop restarts with backoff, then the module is failed", "[process_host]") {
  fixture f;
  auto events = run_supervised(f, supervised(f.script("crash.sh", "exit 3"), restart_policy::always));
  int started = 0, crashed = 0, restarting = 0;
  for (auto& e : events) {
    started += e.kind == child_event_kind::started;
    restarting += e.kind == child_event_kind::restarting;
    if (e.kind == child_event_kind::exited) {
      ++crashed;
      CHECK(e.abnormal);
      CHECK(e.reason == "exited with code 3");
    }
  }
  CHECK(started == 3);  // the first start and two restarts
  CHECK(crashed == 3);
  CHECK(restarting == 2);
  REQUIRE_FALSE(events.empty());
  CHECK(events.back().kind == child_event_kind::failed);
  CHECK(events.back().reason == "exited with code 3");
}

TEST_CASE("process_host: exit code 0 with on-failure leaves the module stopped", "[process_host]") {
  fixture f;
  auto events = run_supervised(f, supervised(f.script("done.sh", "echo done"), restart_policy::on_failure));
  REQUIRE(events.size() == 3);
  CHECK(events[0].kind == child_event_kind::started);
  CHECK(events[1].kind == child_event_kind::exited);
  CHECK_FALSE(events[1].abnormal);
  CHECK(events[1].reason == "exited with code 0");
  CHECK(events[2].kind == child_event_kind::stopped);
}

TEST_CASE("process_host: process_host_config_for takes the module's process settings", "[process_host]") {
  module_spec m;
  m.name = "py";
  m.type = "process";
  m.process.executable_path = "/srv/m/run.py";
  m.process.args = {"--fast"};
  m.process.working_dir = "/srv/m";
  m.process.stop_grace = 3s;
  m.env = {{"A", "1"}};
  auto pc = process_host_config_for(m);
  CHECK(pc.name == "py");
  CHECK(pc.executable == "/srv/m/run.py");
  CHECK(pc.args == std::vector<std::string>{"--fast"});
  CHECK(pc.working_dir == "/srv/m");
  CHECK(pc.stop_grace == 3s);
  CHECK(pc.env == std::map<std::string, std::string>{{"A", "1"}});
}
