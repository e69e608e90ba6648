// bench-deploy-propagation: how long a deployment created at the hub takes
// until the targeted gateways run its module, in two trees of real canopy
// processes on loopback (mutually authenticated TLS links):
//
//   chain  hub → g1 → g2 → g3 → g4 → g5 (--depth=5); the deployment targets
//          only the bottom gateway, by tag (tags.role='leaf');
//   fleet  100 gateways (--gateways=100), all direct children of the hub, each
//          its own `canopy run` process; the deployment targets all of them
//          (tags.fleet='bench').
//
// Timed from just before `POST /deployments` (what `canopyctl deployment
// create` sends; made in-process with hub_client so no process start is
// timed) until the hub's `GET /status` (`canopyctl status --json`, what an
// operator sees) shows the new module running on every target (`deploy_ms`,
// polled every --poll-ms). Also printed: until the gateways themselves ran it
// (`gw_ms`: the latest module start, `lastStartTimeUtc` from each gateway's
// control socket, against the wall clock at the POST; read after the fact, so
// it costs no polling).
//
// Baseline (same trees, same run): the transport's floor, a desired twin patch
// of the running module (`PATCH /twins/<g>/modules/<m>` {TemperatureThreshold}
// — `canopyctl twin patch`, one per target) until the module's reported
// TemperatureThreshold is the new value at the hub for every target
// (`twin_ms`, polled likewise). A module's reported properties go up with its
// gateway's next report (once a second), so each repetition first pauses
// (rep - 0.5) / reps of that interval: the repetitions sample the report cycle
// evenly instead of all landing just after a report. ratio = deploy_ms /
// twin_ms (p50s); the RESULT's `ratio` is the larger of the two trees'. Also
// printed: a direct method's round trip to a target (`method_ms`: the
// transport without the report cycle), and for the fleet its memory (PSS:
// shared libraries counted once) and its CPU use while idle.
//
// Each repetition (--reps=N) creates a new deployment (a higher priority, a new
// module name) and then patches that module's twin.
//
//   RESULT bench-deploy-propagation depth=5 chain_deploy_ms=... chain_gw_ms=... chain_twin_ms=...
//          chain_method_ms=... chain_ratio=... gateways=100 fleet_deploy_ms=... fleet_gw_ms=...
//          fleet_twin_ms=... fleet_method_ms=... fleet_ratio=... fleet_pss_mb=... gw_pss_mb=...
//          fleet_idle_cpu_pct=... reps=3 ratio=...
//
// Options (--name=value or --name value): --depth=N (0: no chain), --gateways=N
// (0: no fleet), --reps=N, --poll-ms=N, --gw-threads=N (each gateway's
// --threads; 0 = the node's default). The program: CANOPY_BIN, else the build's.
#include "bench/bench_common.hpp"
#include "bench/bench_fleet.hpp"
#include "gateway/certs.hpp"
#include "gateway/control_client.hpp"
#include "gateway/hub_client.hpp"
#include "integration/process.hpp"

#include <nlohmann/json.hpp>

#include <signal.h>

#include <future>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <stdexcept>
#include <thread>

using namespace canopy;
using namespace std::chrono_literals;
using bench::bench_clock;
using nlohmann::json;

namespace {

constexpr std::string_view bench_name = "bench-deploy-propagation";

using bench::check_stop;
using bench::cpu_ms;
using bench::fail;
using bench::free_port;
using bench::loopback;
using bench::mem_available_mb;
using bench::option;
using bench::parent_link_up;
using bench::pss_kb;
using bench::rss_kb;
using bench::tracked_process;
using bench::wait_or_fail;

std::int64_t wall_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch())
    .count();
}

double ms_since(bench_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(bench_clock::now() - t0).count();
}

/// Runs `fn` on a thread of its own and returns its result: a control_client
/// owns a KJ event loop, and this thread's is the hub_client's.
template <class F>
auto on_own_thread(F fn) {
  return std::async(std::launch::async, std::move(fn)).get();
}

/// The deployment manifest: the temperature filter as module `module`.
json filter_manifest(const std::string& module) {
  return {{"modulesContent",
           {{"$edgeAgent",
             {{"properties.desired",
               {{"schemaVersion", "1.1"},
                {"modules",
                 {{module,
                   {{"version", "1.0"},
                    {"type", "actor"},
                    {"status", "running"},
                    {"restartPolicy", "always"},
                    {"settings", {{"library", "builtin:temperature-filter"}}}}}}}}}}},
            {"$edgeHub",
             {{"properties.desired",
               {{"schemaVersion", "1.1"},
                {"routes", {{"up", "FROM /messages/modules/" + module + "/outputs/* INTO $upstream"}}}}}}},
            {module, {{"properties.desired", {{"TemperatureThreshold", 25}}}}}}}};
}

// --- a tree of canopy processes ----------------------------------------------------

/// One gateway of a tree: its place, its process.
struct gateway {
  std::string id;
  std::string parent;
  json tags;
  int link_port = 0;  ///< its --link-listen, if it has children
  std::string data;
  std::string socket;
  std::unique_ptr<tracked_process> proc;
};

/// A hub and gateways: certificates (issued in-process), the registry, the
/// processes, the REST client. Gateways start level by level (a gateway is
/// admitted once its parent has its registry scope from the hub).
class tree {
 public:
  /// `gateways` in order, parents before children.
  tree(std::string canopy, std::vector<gateway> gateways, long gw_threads)
      : canopy_(std::move(canopy)), gw_threads_(gw_threads), dir_("cnbd"), gws_(std::move(gateways)) {
    certs_ = dir_.file("certs");
    const auto ca = bench::make_fleet_ca(certs_);
    bench::issue_cert(ca, certs_, "hub");
    for (auto& g : gws_)
      bench::issue_cert(ca, certs_, g.id);

    hub_link_ = free_port();
    const int api = free_port();
    hub_data_ = dir_.file("hub");
    hub_.emplace(bench::node_argv(canopy_, "hub", certs_, hub_data_, dir_.file("hub.sock"),
                                  {"--role", "hub", "--link-listen", loopback(hub_link_), "--api-listen",
                                   loopback(api)}));
    wait_or_fail([&] {
      check_hub();
      api_ = bench::try_hub_client(loopback(api), certs_, hub_data_, 15s);
      return api_ != nullptr;
    }, 20s, "the hub's REST API", 50ms);

    for (auto& g : gws_)
      request("POST", "/devices",
              {{"deviceId", g.id}, {"parentId", g.parent}, {"kind", "gateway"}, {"tags", g.tags}});

    // Level by level: every gateway whose parent is linked starts together.
    std::set<std::string> linked{"hub"};
    std::map<std::string, int> ports{{"hub", hub_link_}};
    for (auto& g : gws_)
      if (std::any_of(gws_.begin(), gws_.end(), [&](const gateway& c) { return c.parent == g.id; }))
        ports[g.id] = g.link_port = free_port();
    while (linked.size() < gws_.size() + 1) {
      std::vector<gateway*> level;
      for (auto& g : gws_)
        if (!g.proc && linked.count(g.parent) != 0)
          level.push_back(&g);
      if (level.empty())
        fail("a gateway's parent is not in the tree");
      for (auto* g : level)
        start(*g, ports.at(g->parent));
      wait_or_fail([&] {
        check_alive();
        return on_own_thread([&] {
          bool all = true;
          for (auto* g : level)
            if (linked.count(g->id) == 0) {
              if (parent_link_up(g->socket))
                linked.insert(g->id);
              else
                all = false;
            }
          return all;
        });
      }, 60s, "the gateways' links to their parents", 50ms);
    }
    // ...and the operator sees them all connected (deeper ones as their parents report them).
    wait_or_fail([&] {
      auto s = status();
      std::size_t connected = 0;
      for (auto& n : s)
        if (n.value("kind", "") == "gateway" && n.value("connected", false))
          ++connected;
      return connected == gws_.size();
    }, 30s, "the hub's status to show every gateway connected", 100ms);
  }

  ~tree() {
    // Leaves first, so that no node waits for its parent; all of a level at once.
    for (auto it = gws_.rbegin(); it != gws_.rend(); ++it)
      if (it->proc)
        it->proc->get().send_signal(SIGTERM);
    for (auto& g : gws_)
      if (g.proc && !g.proc->get().wait_for(10s))
        g.proc->get().kill();
    if (hub_)
      hub_->stop();
  }
  tree(const tree&) = delete;
  tree& operator=(const tree&) = delete;

  const std::vector<gateway>& gateways() const { return gws_; }

  /// A REST call that must succeed.
  json request(std::string_view method, const std::string& path, const json& body = nullptr) {
    auto r = api_->request(method, path, body, 20s);
    if (!r)
      fail(std::string(method) + " " + path + ": " + r.err().message);
    return std::move(*r);
  }

  /// GET /status: every node as the hub sees it.
  json status() { return request("GET", "/status"); }

  /// Fails, with its log, if a node exited.
  void check_alive() {
    check_hub();
    for (auto& g : gws_)
      if (g.proc)
        g.proc->check_alive("gateway " + g.id);
  }

  /// CPU time used so far by the hub and by all gateways together, ms.
  std::pair<double, double> cpu() {
    double gws = 0;
    for (auto& g : gws_)
      gws += cpu_ms(g.proc->get().pid());
    return {cpu_ms(hub_->get().pid()), gws};
  }

  /// Resident memory (RSS and PSS) of the hub and of all gateways together, KiB.
  struct memory {
    long hub_rss = 0, hub_pss = 0, gws_rss = 0, gws_pss = 0;
  };
  memory mem() {
    memory m{rss_kb(hub_->get().pid()), pss_kb(hub_->get().pid())};
    for (auto& g : gws_) {
      m.gws_rss += rss_kb(g.proc->get().pid());
      m.gws_pss += pss_kb(g.proc->get().pid());
    }
    return m;
  }

 private:
  void check_hub() { hub_->check_alive("the hub"); }

  void start(gateway& g, int parent_port) {
    g.data = dir_.file(g.id);
    g.socket = dir_.file(g.id + ".sock");
    auto argv = bench::node_argv(canopy_, g.id, certs_, g.data, g.socket,
                                 {"--parent", loopback(parent_port), "--parent-id", g.parent});
    if (g.link_port != 0) {
      argv.push_back("--link-listen");
      argv.push_back(loopback(g.link_port));
    }
    if (gw_threads_ > 0) {
      argv.push_back("--threads");
      argv.push_back(std::to_string(gw_threads_));
    }
    g.proc = std::make_unique<tracked_process>(argv);
  }

  std::string canopy_;
  long gw_threads_ = 0;
  test::temp_dir dir_;
  std::string certs_;
  std::string hub_data_;
  int hub_link_ = 0;
  std::optional<tracked_process> hub_;
  std::unique_ptr<hub_client> api_;
  std::vector<gateway> gws_;
};

// --- the measurements ---------------------------------------------------------------

/// One repetition's figures, ms.
struct rep_figures {
  double deploy_ms = 0;  ///< until the hub's status shows the module running on every target
  double gw_ms = 0;      ///< until the last target started it (its own clock of record)
  double gw_first_ms = 0;  ///< until the first target started it
  double hub_cpu_ms = 0;   ///< CPU the hub used from the POST until deploy_ms
  double gws_cpu_ms = 0;   ///< CPU all gateways used meanwhile
  double twin_ms = 0;    ///< twin patch until every target's reported value is at the hub
  double twin_stored_ms = 0;  ///< the same, by the hub's own record (reportedUpdatedMs: no polling)
  double twin_sent_ms = 0;    ///< until the hub had answered every PATCH
  double method_ms = 0;  ///< a direct method's round trip to a target (p50 over the targets)
};

/// The status of `module` per target in a GET /status answer.
std::map<std::string, std::string> module_states(const json& status, const std::string& module) {
  std::map<std::string, std::string> out;
  for (auto& n : status)
    for (auto& m : n.value("modules", json::array()))
      if (m.value("name", "") == module)
        out[n.value("deviceId", "")] = m.value("status", "");
  return out;
}

/// How often a gateway compares its own reported state and sends the changes
/// up (fleet_config::report_interval, not a command-line option): a module's
/// reported properties wait for it; a deployment's completion does not.
constexpr std::chrono::milliseconds report_interval{1000};

rep_figures measure(tree& t, const std::vector<std::string>& targets, const std::string& condition, long rep,
                    long reps, std::chrono::milliseconds poll) {
  rep_figures f;
  const std::string module = "m" + std::to_string(rep);

  // The deployment.
  const auto cpu0 = t.cpu();
  const auto wall0 = wall_ms();
  const auto t0 = bench_clock::now();
  t.request("POST", "/deployments",
            {{"id", "d" + std::to_string(rep)},
             {"content", filter_manifest(module)},
             {"targetCondition", condition},
             {"priority", rep}});
  wait_or_fail([&] {
    auto states = module_states(t.status(), module);
    for (auto& id : targets)
      if (states[id] != "running")
        return false;
    return true;
  }, 40s, "deployment d" + std::to_string(rep) + " to run on every target", poll);
  f.deploy_ms = ms_since(t0);
  const auto cpu1 = t.cpu();
  f.hub_cpu_ms = cpu1.first - cpu0.first;
  f.gws_cpu_ms = cpu1.second - cpu0.second;
  t.check_alive();

  // When each gateway started it, by its own account (wall clock, same machine).
  std::map<std::string, std::string> sockets;
  for (auto& g : t.gateways())
    sockets[g.id] = g.socket;
  auto [first, last] = on_own_thread([&] {
    std::int64_t earliest = std::numeric_limits<std::int64_t>::max(), latest = 0;
    for (auto& id : targets) {
      auto client = control_client::connect(sockets.at(id));
      if (!client)
        fail(client.err().message);
      auto rows = client->list();
      if (!rows)
        fail("list on " + id + ": " + rows.err().message);
      auto it = std::find_if(rows->begin(), rows->end(), [&](const module_row& r) { return r.name == module; });
      if (it == rows->end() || it->last_start_ms == 0)
        fail(id + " does not list " + module + " as started");
      earliest = std::min(earliest, it->last_start_ms);
      latest = std::max(latest, it->last_start_ms);
    }
    return std::make_pair(static_cast<double>(earliest - wall0), static_cast<double>(latest - wall0));
  });
  f.gw_first_ms = first;
  f.gw_ms = last;

  // The baseline: a desired twin patch down, the reported value up. Each
  // repetition would otherwise patch at the same point of the gateways'
  // report cycle (the previous twin came back just after a report): pause
  // (rep - 0.5) / reps of the interval, so the repetitions sample the cycle
  // evenly and their p50 estimates what an operator waits on average.
  std::this_thread::sleep_for(std::chrono::duration_cast<std::chrono::milliseconds>(
    report_interval * ((static_cast<double>(rep) - 0.5) / static_cast<double>(reps))));
  const double value = 30 + static_cast<double>(rep);
  std::set<std::string> waiting(targets.begin(), targets.end());
  const auto wall1 = wall_ms();
  const auto t1 = bench_clock::now();
  std::int64_t stored = 0;
  for (auto& id : targets)
    t.request("PATCH", "/twins/" + id + "/modules/" + module, {{"TemperatureThreshold", value}});
  f.twin_sent_ms = ms_since(t1);
  wait_or_fail([&] {
    for (auto it = waiting.begin(); it != waiting.end();) {
      auto twin = t.request("GET", "/twins/" + *it + "/modules/" + module);
      auto reported = twin["properties"]["reported"];
      if (reported.is_object() && reported.value("TemperatureThreshold", 0.0) == value) {
        stored = std::max(stored, twin.value("reportedUpdatedMs", std::int64_t{0}));
        it = waiting.erase(it);
      } else
        ++it;
    }
    return waiting.empty();
  }, 40s, "the twin patch of " + module + " to be reported back", poll);
  f.twin_ms = ms_since(t1);
  f.twin_stored_ms = static_cast<double>(stored - wall1);

  // The transport alone: a direct method down to the module and its answer back.
  std::vector<double> calls;
  for (auto& id : targets) {
    const auto t2 = bench_clock::now();
    t.request("POST", "/devices/" + id + "/modules/" + module + "/methods",
              {{"methodName", "getStats"}, {"responseTimeoutInSeconds", 10}});
    calls.push_back(ms_since(t2));
  }
  f.method_ms = bench::percentile(calls, 50);
  return f;
}

/// p50s over the repetitions of one tree.
struct tree_figures {
  double deploy_ms = 0, gw_ms = 0, twin_ms = 0, method_ms = 0;
  double ratio() const { return twin_ms > 0 ? deploy_ms / twin_ms : 0; }
};

tree_figures run_tree(tree& t, const char* label, const std::vector<std::string>& targets,
                      const std::string& condition, long reps, std::chrono::milliseconds poll) {
  std::vector<double> deploy, gw, twin, method;
  for (long r = 1; r <= reps; ++r) {
    auto f = measure(t, targets, condition, r, reps, poll);
    std::printf("%s rep %ld: deploy %.0f ms at the hub (gateways ran it after %.0f..%.0f ms; CPU meanwhile: hub "
                "%.0f ms, gateways %.0f ms), twin round trip %.0f ms (patches sent in %.0f ms, stored at the hub after "
                "%.0f ms), method round trip %.1f ms\n",
                label, r, f.deploy_ms, f.gw_first_ms, f.gw_ms, f.hub_cpu_ms, f.gws_cpu_ms, f.twin_ms,
                f.twin_sent_ms, f.twin_stored_ms, f.method_ms);
    std::fflush(stdout);
    deploy.push_back(f.deploy_ms);
    gw.push_back(f.gw_ms);
    twin.push_back(f.twin_ms);
    method.push_back(f.method_ms);
  }
  return {bench::percentile(deploy, 50), bench::percentile(gw, 50), bench::percentile(twin, 50),
          bench::percentile(method, 50)};
}

int run(int argc, char** argv) {
  const long depth = option(argc, argv, "depth", 5);
  const long fleet_size = option(argc, argv, "gateways", 100);
  const long reps = option(argc, argv, "reps", 3);
  const auto poll = std::chrono::milliseconds{option(argc, argv, "poll-ms", 20)};
  const long gw_threads = option(argc, argv, "gw-threads", 0);
  if (depth < 0 || fleet_size < 0 || reps < 1 || poll.count() < 1 || gw_threads < 0 || fleet_size > 1000)
    fail("bad arguments: --depth >= 0, 0 <= --gateways <= 1000, --reps >= 1, --poll-ms >= 1, --gw-threads >= 0");
  const std::string canopy = bench::find_program("CANOPY_BIN", CANOPY_BIN, "build it: ninja -C build canopy");
  bench::install_stop_handler();

  std::optional<tree_figures> chain, fleet;
  double fleet_pss_mb = 0, gw_pss_mb = 0;
  double fleet_idle_cpu = 0;  // % of one core
  if (depth > 0) {
    std::vector<gateway> gws;
    for (long i = 1; i <= depth; ++i) {
      gateway g;
      g.id = "g" + std::to_string(i);
      g.parent = i == 1 ? "hub" : "g" + std::to_string(i - 1);
      g.tags = {{"role", i == depth ? "leaf" : "relay"}};
      gws.push_back(std::move(g));
    }
    const auto t0 = bench_clock::now();
    tree t(canopy, std::move(gws), gw_threads);
    std::printf("chain: hub -> g1 -> ... -> g%ld up in %.1f s\n", depth, ms_since(t0) / 1000);
    chain = run_tree(t, "chain", {"g" + std::to_string(depth)}, "tags.role='leaf'", reps, poll);
  }
  if (fleet_size > 0) {
    std::vector<gateway> gws;
    std::vector<std::string> ids;
    for (long i = 1; i <= fleet_size; ++i) {
      gateway g;
      g.id = "f" + std::to_string(i);
      g.parent = "hub";
      g.tags = {{"fleet", "bench"}};
      ids.push_back(g.id);
      gws.push_back(std::move(g));
    }
    const long available_before = mem_available_mb();
    const auto t0 = bench_clock::now();
    tree t(canopy, std::move(gws), gw_threads);
    // Idle cost: CPU of the linked, idle fleet over a second.
    const auto idle0 = t.cpu();
    const auto ti = bench_clock::now();
    std::this_thread::sleep_for(1s);
    const auto idle1 = t.cpu();
    fleet_idle_cpu = (idle1.second - idle0.second + idle1.first - idle0.first) / ms_since(ti) * 100;
    const auto m = t.mem();
    fleet_pss_mb = static_cast<double>(m.hub_pss + m.gws_pss) / 1024;
    gw_pss_mb = static_cast<double>(m.gws_pss) / 1024 / static_cast<double>(fleet_size);
    std::printf("fleet: %ld gateways linked to the hub in %.1f s; hub RSS %ld MiB (PSS %ld), gateways RSS %.1f MiB "
                "each (PSS %.1f: shared libraries counted once), all PSS %.0f MiB; MemAvailable %ld -> %ld MiB; "
                "idle, the fleet uses %.0f%% of a core\n",
                fleet_size, ms_since(t0) / 1000, m.hub_rss / 1024, m.hub_pss / 1024,
                static_cast<double>(m.gws_rss) / 1024 / static_cast<double>(fleet_size), gw_pss_mb, fleet_pss_mb,
                available_before, mem_available_mb(), fleet_idle_cpu);
    fleet = run_tree(t, "fleet", ids, "tags.fleet='bench'", reps, poll);
  }

  std::printf("RESULT bench-deploy-propagation");
  double ratio = 0;
  if (chain) {
    std::printf(" depth=%ld chain_deploy_ms=%.0f chain_gw_ms=%.0f chain_twin_ms=%.0f chain_method_ms=%.1f "
                "chain_ratio=%.2f",
                depth, chain->deploy_ms, chain->gw_ms, chain->twin_ms, chain->method_ms, chain->ratio());
    ratio = std::max(ratio, chain->ratio());
  }
  if (fleet) {
    std::printf(" gateways=%ld fleet_deploy_ms=%.0f fleet_gw_ms=%.0f fleet_twin_ms=%.0f fleet_method_ms=%.1f "
                "fleet_ratio=%.2f fleet_pss_mb=%.0f gw_pss_mb=%.1f fleet_idle_cpu_pct=%.0f",
                fleet_size, fleet->deploy_ms, fleet->gw_ms, fleet->twin_ms, fleet->method_ms, fleet->ratio(),
                fleet_pss_mb, gw_pss_mb, fleet_idle_cpu);
    ratio = std::max(ratio, fleet->ratio());
  }
  std::printf(" reps=%ld ratio=%.2f\n", reps, ratio);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  return bench::run_main(bench_name, run, argc, argv);
}
