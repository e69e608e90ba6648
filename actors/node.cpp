#include "actors/node.hpp"

#include "actors/fleet.hpp"
#include "actors/module_host.hpp"
#include "actors/mqtt_head.hpp"
#include "actors/process_host.hpp"
#include "actors/parent_link.hpp"
#include "actors/node_control_impl.hpp"
#include "actors/plugin_loader.hpp"
#include "gateway/control_server.hpp"
#include "gateway/hub_api.hpp"
#include "gateway/http_server.hpp"
#include "gateway/io_thread.hpp"
#include "gateway/prometheus.hpp"
#include "gateway/link.hpp"
#include "gateway/mqtt_server.hpp"
#include "gateway/ossl_tls.hpp"
#include "gateway/tls.hpp"
#include "runtime/agent.hpp"
#include "runtime/atoms.hpp"
#include "runtime/clock.hpp"
#include "runtime/manifest.hpp"
#include "runtime/message_store.hpp"
#include "runtime/registry.hpp"
#include "runtime/session_store.hpp"
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

#include <algorithm>
#include <atomic>
#include <csignal>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

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
  caf::actor store, router, modules, agent, fleet, parent_link, downstream;

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
  // The tree (issue 4).
  std::shared_ptr<fleet_registry> registry;
  std::unique_ptr<tls_config> tls_server, tls_client;
  std::unique_ptr<fleet_bridge> bridge;
  std::unique_ptr<link_server> links;
  std::unique_ptr<link_client> uplink_client;
  std::unique_ptr<tls_config> tls_api;
  std::unique_ptr<http_server> metrics_http, api_http;
  std::string api_token;
  // MQTT (issue 5).
  std::unique_ptr<tls_server_context> tls_mqtt;
  std::shared_ptr<mqtt_directory> mqtt_sessions = std::make_shared<mqtt_directory>();
  std::shared_ptr<mqtt_module_keys> module_keys = std::make_shared<mqtt_module_keys>();
  std::unique_ptr<mqtt_gateway> mqtt_host;
  std::unique_ptr<mqtt_server> mqtt;
  std::string mqtt_host_name;  ///< what process modules connect to
  std::atomic<std::uint16_t> mqtt_port{0};
  std::shared_ptr<link_board> parent_board = std::make_shared<link_board>();
  std::shared_ptr<children_board> child_board = std::make_shared<children_board>();
  route_table default_routes;
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

namespace {

/// The API token in `path`, or a new random one written there (mode 0600).
expected<std::string> read_or_create_token(const std::string& path) {
  {
    std::ifstream in{path};
    if (in) {
      std::string token;
      std::getline(in, token);
      if (token.size() < 16)
        return make_error(errc::invalid_argument, "API token file " + path + ": the token must have at least "
                                                  "16 characters");
      return token;
    }
  }
  unsigned char raw[24];
  std::ifstream rnd{"/dev/urandom", std::ios::binary};
  if (!rnd.read(reinterpret_cast<char*>(raw), sizeof raw))
    return make_error(errc::io_error, "cannot read /dev/urandom for a new API token");
  static constexpr char hex[] = "0123456789abcdef";
  std::string token;
  for (unsigned char c : raw) {
    token += hex[c >> 4];
    token += hex[c & 15];
  }
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0)
    return make_error(errc::io_error, "cannot create API token file " + path + ": " + std::strerror(errno));
  auto line = token + "\n";
  const bool ok = ::write(fd, line.data(), line.size()) == static_cast<ssize_t>(line.size());
  ::close(fd);
  if (!ok)
    return make_error(errc::io_error, "cannot write API token file " + path);
  spdlog::info("created a new API token in {}", path);
  return token;
}

/// Checks the tree options, opens the fleet registry and loads the TLS
/// identity when the node links to a parent or children (or is the hub).
expected<void> prepare_tree(node::impl& n) {
  auto& o = n.opts;
  if (o.role != "edge" && o.role != "hub")
    return make_error(errc::invalid_argument, "--role: '" + o.role + "' is neither 'edge' nor 'hub'");
  const bool hub = o.role == "hub";
  if (hub && !o.parent_address.empty())
    return make_error(errc::invalid_argument, "--parent: the hub is the root of the tree and has no parent");
  if (!o.parent_address.empty() && o.parent_id.empty())
    return make_error(errc::invalid_argument, "--parent-id: required with --parent (the id the parent's "
                                              "certificate names)");
  if (!o.api_listen.empty() && !hub)
    return make_error(errc::invalid_argument, "--api-listen: only the hub (--role hub) serves the operator API");
  if (o.mqtt_plain && o.mqtt_listen.empty())
    return make_error(errc::invalid_argument, "--mqtt-plain: give --mqtt-listen HOST:PORT too");
  if (o.hub_host.empty())
    o.hub_host = o.device_id;
  const bool links = !o.link_listen.empty() || !o.parent_address.empty() || !o.api_listen.empty();
  const bool mqtt_tls = !o.mqtt_listen.empty() && !o.mqtt_plain;
  if (!hub && !links && o.mqtt_listen.empty())
    return {};
  auto reg = fleet_registry::open(o.data_dir, o.device_id, n.clk);
  if (!reg)
    return std::move(reg).err();
  n.registry = std::move(*reg);
  if (!links && !mqtt_tls)
    return {};
  if (!o.certs_dir.empty()) {
    auto dir = fs::path{o.certs_dir};
    if (o.cert_path.empty()) o.cert_path = (dir / (o.device_id + ".crt")).string();
    if (o.key_path.empty()) o.key_path = (dir / (o.device_id + ".key")).string();
    if (o.ca_path.empty()) o.ca_path = (dir / "ca.crt").string();
  }
  if (o.cert_path.empty() || o.key_path.empty() || o.ca_path.empty())
    return make_error(errc::invalid_argument,
                      std::string{links ? "links" : "--mqtt-listen (TLS)"} +
                        " need a certificate: give --certs DIR, or --cert, --key and --ca (create them with "
                        "`canopyctl certs`)" + (links ? "" : "; or --mqtt-plain for plain TCP"));
  tls_files files{o.cert_path, o.key_path, o.ca_path};
  if (mqtt_tls) {
    auto t = tls_server_context::load(files);
    if (!t) {
      auto err = std::move(t).err();
      return make_error(err.code, "--mqtt-listen: " + err.message);
    }
    n.tls_mqtt = std::move(*t);
  }
  if (!o.link_listen.empty()) {
    auto t = tls_config::load(files, tls_role::server_verify_clients);
    if (!t)
      return std::move(t).err();
    if (!(*t)->problem().empty())
      spdlog::error("{}: children will refuse this node until it is renewed", (*t)->problem());
    n.tls_server = std::move(*t);
  }
  if (!o.parent_address.empty()) {
    auto t = tls_config::load(files, tls_role::client);
    if (!t)
      return std::move(t).err();
    if (!(*t)->problem().empty())
      spdlog::error("{}: the parent will refuse this node until it is renewed; running offline", (*t)->problem());
    n.tls_client = std::move(*t);
  }
  if (!o.api_listen.empty()) {
    auto t = tls_config::load(files, tls_role::server);
    if (!t)
      return std::move(t).err();
    n.tls_api = std::move(*t);
    if (o.api_token_file.empty())
      o.api_token_file = (fs::path{o.data_dir} / "api-token").string();
    auto token = read_or_create_token(o.api_token_file);
    if (!token)
      return std::move(token).err();
    n.api_token = std::move(*token);
  }
  return {};
}

/// Replaces the desired properties of one module of the running deployment
/// (a twin patch from the hub): the agent gets the changed deployment and
/// sends the running instance the difference.
void set_module_desired(caf::actor agent, agent_memory& memory, const std::string& module, nlohmann::json desired,
                        reply_fn<void> done) {
  std::optional<deployment> dep;
  {
    std::lock_guard<std::mutex> guard{memory.mtx};
    dep = memory.current;
  }
  if (!dep) {
    done(make_error(errc::not_found, "no deployment runs on this node"));
    return;
  }
  auto it = std::find_if(dep->modules.begin(), dep->modules.end(),
                         [&](const module_spec& m) { return m.name == module; });
  if (it == dep->modules.end()) {
    done(make_error(errc::not_found, "no module '" + module + "' in this node's deployment"));
    return;
  }
  if (!agent) {
    done(make_error(errc::unavailable, "the agent is restarting; try again"));
    return;
  }
  it->desired_properties = desired;
  if (dep->manifest.is_object())
    dep->manifest["modulesContent"][module]["properties.desired"] = std::move(desired);
  agent->home_system().spawn(
    [agent, dep = std::move(*dep), done](caf::event_based_actor* self, int) {
      self->request(agent, std::chrono::seconds{60}, atoms::deploy::value, dep)
        .then([done] { done(expected<void>{}); },
              [done](caf::error& err) { done(make_error(errc::failed, caf::to_string(err))); });
    },
    0);
}

/// Serves /metrics: the router's counters, the modules and the links.
expected<void> start_metrics(node::impl& n) {
  http_options ho;
  ho.listen = n.opts.metrics_listen;
  n.metrics_http = std::make_unique<http_server>(std::move(ho));
  auto* np = &n;
  n.metrics_http->route("GET", "/metrics", [np](http_request, std::function<void(http_response)> reply) {
    np->control->metrics([np, reply](expected<node_metrics> m) {
      if (!m) {
        reply(http_response{503, "text/plain", m.err().message + "\n", {}});
        return;
      }
      np->control->list([np, reply, m = std::move(*m)](expected<std::vector<module_row>> rows) mutable {
        metrics_snapshot s;
        s.device_id = np->opts.device_id;
        s.links = m.links;
        for (auto& l : s.links)
          if (l.role == "child" && l.up)
            ++s.connected_clients;
        s.messages = std::move(m);
        if (rows)
          s.modules = std::move(*rows);
        s.now_ms = np->clk.wall_ms();
        reply(http_response{200, prometheus_content_type, render_prometheus(s), {}});
      });
    });
  });
  if (auto r = n.metrics_http->start(*n.io); !r) {
    auto err = std::move(r).err();
    return make_error(err.code, "--metrics-listen " + n.opts.metrics_listen + ": " + err.message);
  }
  spdlog::info("metrics: http://{}/metrics (port {})", n.opts.metrics_listen, n.metrics_http->port());
  return {};
}

/// Serves MQTT (issue 5) on --mqtt-listen: TLS with the node's certificate,
/// or plain TCP with --mqtt-plain.
expected<void> start_mqtt(node::impl& n, std::shared_ptr<agent_memory> memory) {
  auto* hp = &n.handles;
  mqtt_head_config hc;
  hc.node_id = n.opts.device_id;
  hc.hub_host = n.opts.hub_host;
  hc.clk = &n.clk;
  hc.fleet = n.bridge.get();
  hc.router = [hp] { return hp->get(&node_handles::router); };
  hc.agent = [hp] { return hp->get(&node_handles::agent); };
  hc.downstream = [hp] { return hp->get(&node_handles::downstream); };
  hc.directory = n.mqtt_sessions;
  hc.keys = n.module_keys;
  hc.memory = std::move(memory);
  auto sessions = mqtt_session_store::open(n.opts.data_dir);
  if (!sessions)
    return std::move(sessions).err();
  hc.sessions = std::move(*sessions);
  n.mqtt_host = std::make_unique<mqtt_gateway>(*n.sys, std::move(hc));
  mqtt_server_options mo;
  mo.listen = n.opts.mqtt_listen;
  mo.tls = n.tls_mqtt.get();
  n.mqtt = std::make_unique<mqtt_server>(std::move(mo), *n.mqtt_host);
  if (auto r = n.mqtt->start(*n.io); !r) {
    auto err = std::move(r).err();
    return make_error(err.code, "--mqtt-listen " + n.opts.mqtt_listen + ": " + err.message);
  }
  n.mqtt_port = n.mqtt->port();
  // Process modules connect to the address it listens on (any address: loopback).
  auto host = n.opts.mqtt_listen.substr(0, n.opts.mqtt_listen.rfind(':'));
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']')
    host = host.substr(1, host.size() - 2);
  if (host.empty() || host == "0.0.0.0" || host == "*")
    host = "127.0.0.1";
  else if (host == "::")
    host = "::1";
  n.mqtt_host_name = host;
  spdlog::info("mqtt: leaf devices and process modules on {} (port {}, {}); SAS tokens for host '{}'",
               n.opts.mqtt_listen, n.mqtt->port(), n.opts.mqtt_plain ? "plain TCP" : "TLS", n.opts.hub_host);
  return {};
}

/// Serves the hub's operator REST API (HTTPS, bearer token).
expected<void> start_api(node::impl& n) {
  http_options ho;
  ho.listen = n.opts.api_listen;
  ho.tls = &n.tls_api->context();
  ho.bearer_token = n.api_token;
  // A direct method may take up to 300 s (Azure's limit); the API waits for it.
  ho.reply_timeout = std::chrono::seconds{310};
  n.api_http = std::make_unique<http_server>(std::move(ho));
  add_hub_routes(*n.api_http, *n.bridge);
  if (auto r = n.api_http->start(*n.io); !r) {
    auto err = std::move(r).err();
    return make_error(err.code, "--api-listen " + n.opts.api_listen + ": " + err.message);
  }
  spdlog::info("operator API: https://{} (port {}); token in {}", n.opts.api_listen, n.api_http->port(),
               n.opts.api_token_file);
  return {};
}

}  // namespace

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
  {
    auto routes = compile_routes({route_spec{"default", "FROM /* INTO $upstream"}}, 7200);
    if (!routes)
      return std::move(routes).err();
    n.default_routes = std::move(*routes);
  }
  // The node's place in the tree: registry, certificates.
  if (auto r = prepare_tree(n); !r)
    return std::move(r).err();
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
  // One worker per core (CAF 0.17's default is at least 4), and no "moderate"
  // polling: an idle CAF 0.17 worker otherwise sleeps 50 us at a time, 500
  // times, before it waits on its condition variable — on a 2-core gateway
  // running several nodes that is tens of thousands of wake-ups a second,
  // and it took a quarter of the three-hop chain's throughput (bench-chain).
  const unsigned cores = std::max(2u, std::thread::hardware_concurrency());
  n.cfg->set("scheduler.max-threads",
             n.opts.worker_threads > 0 ? n.opts.worker_threads : std::size_t{cores});
  n.cfg->set("work-stealing.moderate-poll-attempts", 0);
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
    // A child's $upstream is its parent link, which announces itself when
    // connected; elsewhere it is the local telemetry store.
    rc.upstream = np->opts.parent_address.empty() ? hp->get(&node_handles::store)
                                                  : hp->get(&node_handles::parent_link);
    rc.store = np->messages;
    // Until a deployment says otherwise, everything goes up the tree (as
    // IoT Edge's default route `FROM /messages/* INTO $upstream`).
    rc.initial_routes = np->default_routes;
    rc.clk = &np->clk;
    rc.upstream_hold = np->opts.upstream_hold;
    auto a = spawn_router(sys, rc);
    hp->set(&node_handles::router, a);
    return a;
  };
  child_spec modules_child;
  modules_child.id = "modules";
  // It stops each module within that module's own time (a process module's
  // stopGraceSecs + 5 s); the whole node is bounded by --stop-timeout anyway.
  modules_child.shutdown_timeout = std::chrono::seconds{55};
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
      // A process module gets its connection variables at every (re)start.
      if (m.type == "process")
        return process_child_spec(
          m, np->logs->module_logger(m.name), &np->clk,
          [np](const std::string& module) {
            std::map<std::string, std::string> env{{"CANOPY_DEVICE_ID", np->opts.device_id},
                                                   {"CANOPY_MODULE_ID", module}};
            if (np->mqtt) {
              // Where and as whom it connects: a fresh token at every start.
              auto more = mqtt_module_env(np->opts.device_id, module, np->opts.hub_host, np->mqtt_host_name,
                                          np->mqtt_port.load(), !np->opts.mqtt_plain, np->opts.ca_path,
                                          *np->module_keys, np->clk.wall_ms() / 1000);
              env.insert(more.begin(), more.end());
            }
            return env;
          },
          [np](const std::string& module) { return np->mqtt_sessions->find(np->opts.device_id, module); });
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
  const bool network = !n.opts.socket_path.empty() || !n.opts.link_listen.empty() ||
                       !n.opts.parent_address.empty() || !n.opts.metrics_listen.empty() ||
                       !n.opts.api_listen.empty() || !n.opts.mqtt_listen.empty();
  if (network) {
    n.io = std::make_unique<io_thread>();
    if (auto r = n.io->start(); !r)
      return std::move(r).err();
  }
  if (n.registry)
    n.bridge = std::make_unique<fleet_bridge>(*n.sys, [hp] { return hp->get(&node_handles::fleet); });
  if (!n.opts.parent_address.empty()) {
    link_client_options lo;
    lo.parent_address = n.opts.parent_address;
    lo.parent_id = n.opts.parent_id;
    lo.node_id = n.opts.device_id;
    lo.tls = n.tls_client.get();
    n.uplink_client = std::make_unique<link_client>(*n.io, std::move(lo), *n.bridge);
  }
  n.control->set_metrics_extra([np](node_metrics& m) {
    const auto now = np->clk.wall_ms();
    if (np->uplink_client)
      m.links.push_back(np->parent_board->snapshot(now));
    std::lock_guard<std::mutex> guard{np->child_board->mtx};
    for (auto& [id, l] : np->child_board->children)
      m.links.push_back(l);
    m.refused_messages = np->child_board->refused_messages;
  });
  if (!n.opts.socket_path.empty()) {
    n.server = std::make_unique<control_server>(n.opts.socket_path, *n.control);
    if (auto r = n.server->start(*n.io); !r) {
      auto err = std::move(r).err();
      return make_error(err.code, "control socket " + n.opts.socket_path + ": " + err.message);
    }
    spdlog::info("control socket: {}", n.opts.socket_path);
  }
  if (!n.opts.metrics_listen.empty())
    if (auto r = start_metrics(n); !r)
      return std::move(r).err();
  if (!n.opts.api_listen.empty())
    if (auto r = start_api(n); !r)
      return std::move(r).err();
  // Children may connect from now on; until the fleet actor runs they are
  // told to try again.
  if (!n.opts.link_listen.empty()) {
    link_server_options so;
    so.listen = n.opts.link_listen;
    so.node_id = n.opts.device_id;
    so.tls = n.tls_server.get();
    n.links = std::make_unique<link_server>(std::move(so), *n.bridge);
    if (auto r = n.links->start(*n.io); !r) {
      auto err = std::move(r).err();
      return make_error(err.code, "--link-listen " + n.opts.link_listen + ": " + err.message);
    }
    spdlog::info("accepting child gateways on {} (port {})", n.opts.link_listen, n.links->port());
  }
  // Leaf devices and process modules; until the tree runs they are told to
  // try again (the fleet is not there yet).
  if (!n.opts.mqtt_listen.empty())
    if (auto r = start_mqtt(n, memory); !r)
      return std::move(r).err();
  // 6. The tree.
  root_cfg.children = {store_child, router_child, agent_child, modules_child};
  if (n.registry) {
    child_spec fleet_child;
    fleet_child.id = "fleet";
    fleet_child.start = [hp, np, memory](caf::actor_system& sys) {
      fleet_config fc;
      fc.node_id = np->opts.device_id;
      fc.hub = np->opts.role == "hub";
      fc.registry = np->registry;
      fc.router = [hp] { return hp->get(&node_handles::router); };
      fc.agent = [hp] { return hp->get(&node_handles::agent); };
      fc.store = [hp] { return hp->get(&node_handles::store); };
      fc.parent_link = [hp] { return hp->get(&node_handles::parent_link); };
      fc.uplink_up = [np] {
        std::lock_guard<std::mutex> guard{np->parent_board->mtx};
        return np->parent_board->parent.up;
      };
      fc.memory = memory;
      fc.deploy = [np](std::string manifest_json, reply_fn<void> done) {
        np->control->deploy(std::move(manifest_json), std::string{}, std::move(done));
      };
      fc.module_desired = [hp, memory](std::string module, nlohmann::json desired, reply_fn<void> done) {
        set_module_desired(hp->get(&node_handles::agent), *memory, module, std::move(desired), std::move(done));
      };
      fc.clk = &np->clk;
      fc.board = np->child_board;
      fc.session_of = [np](const std::string& device, const std::string& module) {
        return np->mqtt_sessions->find(device, module);
      };
      fc.leaf_devices = [np] { return np->mqtt_sessions->connected_devices(); };
      auto a = spawn_fleet(sys, std::move(fc));
      hp->set(&node_handles::fleet, a);
      return a;
    };
    root_cfg.children.push_back(fleet_child);
  }
  if (n.mqtt) {
    // downstream (one_for_one) └── one temporary session actor per MQTT client
    child_spec downstream_child;
    downstream_child.id = "downstream";
    downstream_child.start = [hp, np](caf::actor_system& sys) {
      supervisor_config dc;
      dc.name = "downstream";
      dc.strategy = supervision_strategy::one_for_one;
      dc.intensity = restart_intensity{100000, std::chrono::seconds{1}};
      dc.clk = &np->clk;
      auto a = spawn_supervisor(sys, std::move(dc));
      hp->set(&node_handles::downstream, a);
      // Persistent sessions come back from disk, waiting for their clients.
      np->mqtt_host->restore_sessions(a);
      return a;
    };
    root_cfg.children.push_back(downstream_child);
  }
  if (n.uplink_client) {
    // upstream (one_for_one) └── the parent link
    child_spec upstream_child;
    upstream_child.id = "upstream";
    upstream_child.start = [hp, np](caf::actor_system& sys) {
      child_spec link_child;
      link_child.id = "parent";
      link_child.start = [hp, np](caf::actor_system& sys) {
        parent_link_config pc;
        pc.link = np->uplink_client.get();
        pc.router = [hp] { return hp->get(&node_handles::router); };
        pc.clk = &np->clk;
        pc.board = np->parent_board;
        pc.parent_id = np->opts.parent_id;
        pc.identity_problem = np->tls_client->problem();
        pc.on_state = [hp](bool up) {
          if (auto fleet = hp->get(&node_handles::fleet))
            caf::anon_send(fleet, atoms::uplink::value, up);
        };
        auto a = spawn_parent_link(sys, std::move(pc));
        hp->set(&node_handles::parent_link, a);
        return a;
      };
      supervisor_config uc;
      uc.name = "upstream";
      uc.strategy = supervision_strategy::one_for_one;
      uc.intensity = restart_intensity{10, std::chrono::seconds{60}};
      uc.clk = &np->clk;
      uc.children = {link_child};
      return spawn_supervisor(sys, std::move(uc));
    };
    root_cfg.children.push_back(upstream_child);
  }
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
  spdlog::info("node '{}' started (data dir {}, role {})", n.opts.device_id, n.opts.data_dir, n.opts.role);
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
  if (n.api_http)
    n.api_http->stop();
  if (n.metrics_http)
    n.metrics_http->stop();
  if (n.links)
    n.links->stop();
  if (n.mqtt)
    n.mqtt->stop();
  if (n.uplink_client)
    n.uplink_client->stop();
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
