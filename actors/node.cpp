#include "actors/node.hpp"

#include "actors/module_host.hpp"
#include "actors/node_control_impl.hpp"
#include "actors/plugin_loader.hpp"
#include "gateway/control_server.hpp"
#include "gateway/io_thread.hpp"
#include "runtime/agent.hpp"
#include "runtime/atoms.hpp"
#include "runtime/clock.hpp"
#include "runtime/manifest.hpp"
#include "runtime/message_store.hpp"
#include "runtime/router.hpp"
#include "runtime/store.hpp"
#include "runtime/store_actor.hpp"
#include "runtime/supervisor.hpp"

#include <caf/all.hpp>
#include <spdlog/spdlog.h>

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include <atomic>
#include <csignal>
#include <filesystem>
#include <fstream>
#include <sstream>

namespace canopy {

namespace fs = std::filesystem;

namespace {

expected<std::string> read_file(const std::string& path) {
  std::ifstream in{path, std::ios::binary};
  if (!in)
    return make_error(errc::not_found, "cannot read manifest " + path + ": " + std::strerror(errno));
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::string host_name() {
  char buf[256] = {};
  if (gethostname(buf, sizeof(buf) - 1) != 0)
    return "canopy-node";
  return buf;
}

manifest_options options_for(plugin_loader& loader, std::string base_dir) {
  manifest_options mo;
  mo.base_dir = std::move(base_dir);
  mo.resolve_library = [&loader](std::string_view lib, const std::string& dir) {
    return loader.resolve(lib, dir);
  };
  return mo;
}

}  // namespace

/// Handles of the node's long-lived actors, refreshed when a supervisor restarts
/// one; read by child start functions and the control bridge.
struct node_handles {
  mutable std::mutex mtx;
  caf::actor store, router, modules, agent;

  caf::actor get(caf::actor node_handles::*which) const {
    std::lock_guard<std::mutex> guard{mtx};
    return this->*which;
  }
  void set(caf::actor node_handles::*which, caf::actor a) {
    std::lock_guard<std::mutex> guard{mtx};
    this->*which = std::move(a);
  }
};

/// Holds an exclusive lock on the data directory, so that two nodes never share
/// one store. Released when the process ends, however it ends.
class data_dir_lock {
 public:
  static expected<std::unique_ptr<data_dir_lock>> acquire(const std::string& dir) {
    auto path = (fs::path{dir} / "canopy.lock").string();
    int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0)
      return make_error(errc::io_error, "cannot open " + path + ": " + std::strerror(errno));
    if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
      ::close(fd);
      return make_error(errc::unavailable, "data directory " + dir + " is in use by another canopy "
                                             "process (it holds " + path + ")");
    }
    return std::unique_ptr<data_dir_lock>{new data_dir_lock(fd)};
  }
  ~data_dir_lock() { ::close(fd_); }
  data_dir_lock(const data_dir_lock&) = delete;
  data_dir_lock& operator=(const data_dir_lock&) = delete;

 private:
  explicit data_dir_lock(int fd) : fd_(fd) {}
  int fd_;
};

struct node::impl {
  node_options opts;
  std::unique_ptr<data_dir_lock> lock;
  std::unique_ptr<log_hub> logs;
  system_clock clk;
  std::shared_ptr<node_store> store;
  std::shared_ptr<message_store> messages;
  std::unique_ptr<plugin_loader> loader;
  std::unique_ptr<caf::actor_system_config> cfg;
  std::unique_ptr<caf::actor_system> sys;
  node_handles handles;
  caf::actor root;
  std::unique_ptr<node_control_impl> control;
  std::unique_ptr<io_thread> io;
  std::unique_ptr<control_server> server;
  bool stopped = false;
  std::shared_ptr<std::atomic<bool>> failed = std::make_shared<std::atomic<bool>>(false);
};

node::node(std::unique_ptr<impl> p) : impl_(std::move(p)) {}

node::~node() { stop(); }

expected<void> check_manifest_file(const std::string& path, const std::vector<std::string>& module_path) {
  auto text = read_file(path);
  if (!text)
    return std::move(text).err();
  plugin_loader loader{make_builtin_catalog()};
  for (auto& d : module_path)
    loader.add_search_dir(d);
  auto base = fs::absolute(fs::path{path}).parent_path().string();
  auto dep = parse_manifest(*text, options_for(loader, base));
  if (!dep)
    return make_error(dep.err().code, path + ":\n" + dep.err().message);
  return {};
}

expected<std::unique_ptr<node>> node::start(node_options opts) {
  auto p = std::make_unique<impl>();
  auto& n = *p;
  n.opts = std::move(opts);
  if (n.opts.device_id.empty())
    n.opts.device_id = host_name();
  // 1. Logging.
  if (n.opts.log.dir.empty())
    n.opts.log.dir = (fs::path{n.opts.data_dir} / "logs").string();
  std::error_code ec;
  fs::create_directories(n.opts.data_dir, ec);
  if (ec)
    return make_error(errc::io_error, "cannot create data directory " + n.opts.data_dir + ": " + ec.message());
  auto lock = data_dir_lock::acquire(n.opts.data_dir);
  if (!lock)
    return std::move(lock).err();
  n.lock = std::move(*lock);
  auto logs = log_hub::create(n.opts.log);
  if (!logs)
    return std::move(logs).err();
  n.logs = std::move(*logs);
  n.logs->make_default();
  // 2. The store: a corrupt or unwritable one stops the node here, loudly.
  auto store = node_store::open(n.opts.data_dir, &n.clk);
  if (!store)
    return std::move(store).err();
  n.store = std::move(*store);
  // The message queues, likewise: never a silent fall-back to memory.
  message_store_options mso;
  mso.max_bytes = n.opts.max_store_bytes;
  mso.wall_clock = &n.clk;
  auto messages = message_store::open(n.opts.data_dir, mso);
  if (!messages)
    return std::move(messages).err();
  n.messages = std::move(*messages);
  // 3. Module loading and the deployment to run.
  n.loader = std::make_unique<plugin_loader>(make_builtin_catalog());
  for (auto& d : n.opts.module_path)
    n.loader->add_search_dir(d);
  std::optional<deployment> initial;
  if (!n.opts.manifest_path.empty()) {
    auto text = read_file(n.opts.manifest_path);
    if (!text)
      return std::move(text).err();
    auto base = fs::absolute(fs::path{n.opts.manifest_path}).parent_path().string();
    auto dep = parse_manifest(*text, options_for(*n.loader, base));
    if (!dep)
      return make_error(dep.err().code, n.opts.manifest_path + ":\n" + dep.err().message);
    initial = std::move(*dep);
    spdlog::info("running manifest {}", n.opts.manifest_path);
  } else {
    auto last = n.store->load_deployment();
    if (!last)
      return std::move(last).err();
    if (*last) {
      auto dep = parse_manifest((*last)->manifest_json, options_for(*n.loader, (*last)->base_dir));
      if (dep) {
        initial = std::move(*dep);
        spdlog::info("running the last applied deployment (version {})", (*last)->version);
      } else {
        spdlog::error("the last applied deployment no longer validates; running none: {}",
                      dep.err().message);
      }
    } else {
      spdlog::info("no manifest and no previous deployment: waiting for `canopyctl deploy`");
    }
  }
  std::vector<module_row> rows;
  std::map<std::string, std::string> reported;
  if (auto states = n.store->load_module_states())
    for (auto& s : *states) {
      module_row r;
      r.name = s.name;
      r.status = s.status;
      r.restart_count = s.restart_count;
      r.last_start_ms = s.last_start_ms;
      r.last_exit_ms = s.last_exit_ms;
      r.last_exit_reason = s.last_exit_reason;
      rows.push_back(std::move(r));
      if (auto rep = n.store->load_reported(s.name); rep && *rep)
        reported.emplace(s.name, **rep);
    }
  // 4. The actor system and the tree.
  n.cfg = std::make_unique<caf::actor_system_config>();
  n.cfg->set("logger.verbosity", caf::atom("quiet"));
  // Bound how long one busy actor keeps a worker (fairness between modules).
  n.cfg->set("scheduler.max-throughput", 500);
  if (n.opts.worker_threads > 0)
    n.cfg->set("scheduler.max-threads", n.opts.worker_threads);
  n.sys = std::make_unique<caf::actor_system>(*n.cfg);
  auto* hp = &n.handles;
  auto* np = &n;

  supervisor_config root_cfg;
  root_cfg.name = "root";
  root_cfg.strategy = supervision_strategy::rest_for_one;
  root_cfg.intensity = restart_intensity{5, std::chrono::seconds{60}};
  root_cfg.backoff.base = std::chrono::milliseconds{100};
  root_cfg.clk = &n.clk;

  child_spec store_child;
  store_child.id = "store";
  store_child.start = [hp, np](caf::actor_system& sys) {
    auto a = spawn_store_actor(sys, np->store, np->clk);
    hp->set(&node_handles::store, a);
    return a;
  };
  child_spec router_child;
  router_child.id = "router";
  router_child.start = [hp, np](caf::actor_system& sys) {
    router_config rc;
    rc.upstream = hp->get(&node_handles::store);
    rc.store = np->messages;
    rc.clk = &np->clk;
    auto a = spawn_router(sys, rc);
    hp->set(&node_handles::router, a);
    return a;
  };
  child_spec modules_child;
  modules_child.id = "modules";
  modules_child.start = [hp, np](caf::actor_system& sys) {
    supervisor_config mc;
    mc.name = "modules";
    mc.strategy = supervision_strategy::one_for_one;
    // Each module has its own budget (own_limit); the modules supervisor as a
    // whole only escalates on a storm no per-module limit would catch.
    mc.intensity = restart_intensity{100000, std::chrono::seconds{1}};
    mc.clk = &np->clk;
    auto agent = hp->get(&node_handles::agent);
    mc.observer = agent;
    auto a = spawn_supervisor(sys, std::move(mc));
    hp->set(&node_handles::modules, a);
    if (agent)
      caf::anon_send(agent, atoms::modules_ready::value, a);
    return a;
  };
  // What the store knew at start seeds the agent's memory; later agents
  // continue from the memory, never from the store (its actor owns it).
  auto memory = std::make_shared<agent_memory>();
  for (auto& row : rows)
    memory->rows[row.name] = row;
  for (auto& [name, doc] : reported) {
    auto j = nlohmann::json::parse(doc, nullptr, false);
    if (!j.is_discarded())
      memory->reported[name] = std::move(j);
  }
  auto initial_dep = std::make_shared<std::optional<deployment>>(std::move(initial));
  child_spec agent_child;
  agent_child.id = "agent";
  agent_child.start = [hp, np, memory, initial_dep](caf::actor_system& sys) {
    agent_config ac;
    ac.router = hp->get(&node_handles::router);
    ac.store = hp->get(&node_handles::store);
    ac.clk = &np->clk;
    ac.memory = memory;
    // The first agent runs the initial deployment; a restarted one continues
    // with the deployment in the shared memory.
    if (*initial_dep) {
      ac.initial = std::move(**initial_dep);
      initial_dep->reset();
    }
    ac.make_child = [hp, np, memory](const module_spec& m, caf::actor agent) -> expected<child_spec> {
      auto type = np->loader->load(m.library, m.library_path);
      if (!type)
        return std::move(type).err();
      auto spec = module_child_spec(m);
      module_host_config hc;
      hc.name = m.name;
      hc.device_id = np->opts.device_id;
      hc.type = *type;
      hc.settings = m.settings;
      hc.env = m.env;
      hc.agent = agent;
      hc.logger = np->logs->module_logger(m.name);
      spec.start = [hp, hc, memory](caf::actor_system& sys) mutable {
        hc.router = hp->get(&node_handles::router);
        // Every (re)start gets the desired properties as they are now, not as
        // they were when the module was deployed.
        hc.desired = memory->desired_of(hc.name);
        return spawn_module_host(sys, hc);
      };
      return spec;
    };
    auto a = spawn_agent(sys, std::move(ac));
    hp->set(&node_handles::agent, a);
    return a;
  };
  // 5. The control socket on the I/O thread, before the tree runs: if it
  //    cannot be served (e.g. another node serves it), nothing has started.
  //    Requests in the moment before the tree is up get "try again".
  n.control = std::make_unique<node_control_impl>(
    *n.sys, [hp] { return hp->get(&node_handles::agent); },
    [hp] { return hp->get(&node_handles::store); },
    [hp] { return hp->get(&node_handles::router); }, *n.logs, *n.loader);
  if (!n.opts.socket_path.empty()) {
    n.io = std::make_unique<io_thread>();
    if (auto r = n.io->start(); !r)
      return std::move(r).err();
    n.server = std::make_unique<control_server>(n.opts.socket_path, *n.control);
    if (auto r = n.server->start(*n.io); !r) {
      auto err = std::move(r).err();
      return make_error(err.code, "control socket " + n.opts.socket_path + ": " + err.message);
    }
    spdlog::info("control socket: {}", n.opts.socket_path);
  }
  // 6. The tree.
  root_cfg.children = {store_child, router_child, agent_child, modules_child};
  n.root = spawn_supervisor(*n.sys, std::move(root_cfg));
  // If the root itself gives up (its restart intensity exceeded), the process
  // must end so that the service manager restarts it: a node with no actors
  // must not look alive.
  auto failed = n.failed;
  n.root->attach_functor([failed](const caf::error& reason) {
    if (!reason || reason == caf::exit_reason::normal || reason == caf::exit_reason::user_shutdown)
      return;
    failed->store(true);
    spdlog::critical("the node's root supervisor gave up; stopping the process");
    ::kill(::getpid(), SIGTERM);
  });
  spdlog::info("node '{}' started (data dir {})", n.opts.device_id, n.opts.data_dir);
  return std::unique_ptr<node>{new node(std::move(p))};
}

bool node::failed() const { return impl_ && impl_->failed->load(); }

void node::stop() {
  if (!impl_ || impl_->stopped)
    return;
  auto& n = *impl_;
  n.stopped = true;
  // Ordered shutdown: stop taking requests, then the tree (the root supervisor
  // stops its children in reverse start order: agent, modules, router, store).
  if (n.server)
    n.server->stop();
  if (n.io)
    n.io->stop();
  if (n.root) {
    caf::scoped_actor self{*n.sys};
    self->monitor(n.root);
    self->send_exit(n.root, caf::exit_reason::user_shutdown);
    self->receive([](const caf::down_msg&) {}, caf::after(std::chrono::seconds{30}) >> [] {
      spdlog::warn("the actor tree did not stop within 30 s");
    });
  }
  n.control.reset();
  n.sys.reset();
  n.clk.stop();
  if (n.logs)
    n.logs->flush();
  spdlog::info("node stopped");
}

}  // namespace canopy
