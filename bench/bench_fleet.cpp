#include "bench/bench_fleet.hpp"

#include "bench/bench_common.hpp"
#include "gateway/control_client.hpp"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <sstream>
#include <stdexcept>
#include <thread>

namespace canopy::bench {

namespace {

// SIGINT/SIGTERM: the handler kills the children (kill() is async-signal safe)
// and sets the flag; the next wait sees it and unwinds.
std::atomic<bool> stop_flag{false};
constexpr int max_children = 1100;
std::atomic<pid_t> child_pids[max_children];

void on_stop_signal(int) {
  stop_flag = true;
  for (auto& p : child_pids)
    if (pid_t pid = p.load(); pid > 0)
      ::kill(pid, SIGKILL);
}

void remember_child(pid_t pid) {
  for (auto& p : child_pids) {
    pid_t expected = 0;
    if (p.compare_exchange_strong(expected, pid))
      return;
  }
}

void forget_child(pid_t pid) {
  for (auto& p : child_pids) {
    pid_t expected = pid;
    if (p.compare_exchange_strong(expected, 0))
      return;
  }
}

sockaddr_in loopback_address(int port) {
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = htons(static_cast<std::uint16_t>(port));
  return a;
}

/// The number after `field` at the start of a line of `path`; 0 if none.
long proc_field(const std::string& path, std::string_view field) {
  std::ifstream in(path);
  std::string line;
  while (std::getline(in, line))
    if (line.rfind(field, 0) == 0)
      return std::stol(line.substr(field.size()));
  return 0;
}

}  // namespace

void fail(const std::string& what) {
  throw std::runtime_error(what);
}

int run_main(std::string_view bench, int (*run)(int, char**), int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%.*s: %s\n", static_cast<int>(bench.size()), bench.data(), e.what());
    return 1;
  }
}

// --- stopping ---------------------------------------------------------------

void install_stop_handler() {
  struct sigaction sa {};
  sa.sa_handler = on_stop_signal;
  sigemptyset(&sa.sa_mask);
  ::sigaction(SIGINT, &sa, nullptr);
  ::sigaction(SIGTERM, &sa, nullptr);
}

bool stop_requested() {
  return stop_flag;
}

void check_stop() {
  if (stop_flag)
    fail("interrupted");
}

tracked_process::tracked_process(const std::vector<std::string>& argv, const std::string& stdin_path, end_with end)
    : proc_(argv, {}, stdin_path), end_(end) {
  remember_child(proc_.pid());
}

tracked_process::~tracked_process() {
  forget_child(proc_.pid());
  if (end_ == end_with::sigterm)
    stop();
  else
    proc_.kill();
}

void tracked_process::stop(std::chrono::milliseconds timeout) {
  proc_.send_signal(SIGTERM);
  if (!proc_.wait_for(timeout))
    proc_.kill();
}

std::string tracked_process::output_tail(std::size_t keep) const {
  auto out = proc_.output();
  return out.size() > keep ? "..." + out.substr(out.size() - keep) : out;
}

void tracked_process::check_alive(const std::string& name) {
  if (!proc_.running())
    fail(name + " exited:\n" + output_tail());
}

void wait_or_fail(const std::function<bool()>& pred, std::chrono::milliseconds timeout, const std::string& what,
                  std::chrono::milliseconds interval) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  while (!pred()) {
    check_stop();
    if (std::chrono::steady_clock::now() >= deadline)
      fail("timed out waiting for " + what);
    std::this_thread::sleep_for(interval);
  }
}

// --- arguments and programs ---------------------------------------------------

long option(int argc, char** argv, const std::string& name, long fallback) {
  const std::string flag = "--" + name;
  for (int i = 1; i + 1 < argc; ++i)
    if (argv[i] == flag)
      return std::stol(argv[i + 1]);
  return arg(argc, argv, name, fallback);
}

std::string find_program(const char* env_var, const std::string& fallback, std::string_view hint) {
  const char* env = std::getenv(env_var);
  std::string path = env != nullptr && *env != '\0' ? env : fallback;
  if (::access(path.c_str(), X_OK) != 0)
    fail(path + " is not an executable (" + std::string(hint) + ")");
  return path;
}

std::vector<std::string> node_argv(const std::string& canopy, const std::string& id, const std::string& certs,
                                   const std::string& data, const std::string& socket,
                                   const std::vector<std::string>& extra) {
  std::vector<std::string> argv{canopy, "run", "--device-id", id,     "--certs",     certs,
                                "-d",   data,  "-s",          socket, "--log-level", "warn"};
  argv.insert(argv.end(), extra.begin(), extra.end());
  return argv;
}

// --- loopback -----------------------------------------------------------------

int free_port() {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0)
    fail("socket: " + std::string(std::strerror(errno)));
  sockaddr_in a = loopback_address(0);
  socklen_t len = sizeof a;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) != 0) {
    ::close(fd);
    fail("bind 127.0.0.1:0: " + std::string(std::strerror(errno)));
  }
  ::close(fd);
  return ntohs(a.sin_port);
}

bool port_accepts(int port) {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0)
    return false;
  sockaddr_in a = loopback_address(port);
  bool ok = ::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0;
  ::close(fd);
  return ok;
}

std::string loopback(int port) {
  return "127.0.0.1:" + std::to_string(port);
}

// --- /proc --------------------------------------------------------------------

long rss_kb(const std::string& pid) {
  return proc_field("/proc/" + pid + "/status", "VmRSS:");
}

long rss_kb(pid_t pid) {
  return rss_kb(std::to_string(pid));
}

long pss_kb(pid_t pid) {
  return proc_field("/proc/" + std::to_string(pid) + "/smaps_rollup", "Pss:");
}

long mem_available_mb() {
  return proc_field("/proc/meminfo", "MemAvailable:") / 1024;
}

long cpu_ticks(pid_t pid) {
  if (pid <= 0)
    return 0;
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  std::string stat((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  auto close = stat.rfind(')');
  if (close == std::string::npos)
    return 0;
  std::istringstream rest(stat.substr(close + 2));
  std::string field;
  long ticks = 0;
  for (int i = 3; rest >> field && i <= 15; ++i)
    if (i == 14 || i == 15)
      ticks += std::stol(field);
  return ticks;
}

double cpu_ms(pid_t pid) {
  return 1000.0 * static_cast<double>(cpu_ticks(pid)) / static_cast<double>(::sysconf(_SC_CLK_TCK));
}

// --- a fleet ------------------------------------------------------------------

certs::key_and_cert make_fleet_ca(const std::string& certs_dir) {
  auto ca = certs::create_root_ca("bench fleet CA", std::chrono::hours{24});
  if (!ca)
    fail("root CA: " + ca.err().message);
  if (auto w = certs::write_files(certs_dir, "ca", *ca); !w)
    fail(w.err().message);
  return std::move(*ca);
}

void issue_cert(const certs::key_and_cert& ca, const std::string& certs_dir, const std::string& id) {
  auto kc = certs::issue(ca, certs::for_id(id, std::chrono::hours{24}));
  if (!kc)
    fail("certificate of " + id + ": " + kc.err().message);
  if (auto w = certs::write_files(certs_dir, id, *kc); !w)
    fail(w.err().message);
}

std::unique_ptr<hub_client> try_hub_client(const std::string& api_address, const std::string& certs_dir,
                                           const std::string& hub_data, std::chrono::milliseconds connect_timeout) {
  auto token = certs::read_file(hub_data + "/api-token");
  if (!token || token->empty())
    return nullptr;
  hub_client_options o;
  o.url = "https://" + api_address;
  o.hub_id = "hub";
  o.ca_path = certs_dir + "/ca.crt";
  o.token = *token;
  while (!o.token.empty() && (o.token.back() == '\n' || o.token.back() == '\r'))
    o.token.pop_back();
  o.connect_timeout = connect_timeout;
  auto c = hub_client::connect(o);
  if (!c)
    return nullptr;
  return std::move(*c);
}

long links_up(const std::string& socket, std::string_view role) {
  auto client = control_client::connect(socket);
  if (!client)
    return -1;
  auto m = client->metrics();
  if (!m)
    return -1;
  long n = 0;
  for (const auto& l : m->links)
    if (l.role == role && l.up)
      ++n;
  return n;
}

bool parent_link_up(const std::string& socket) {
  return links_up(socket, "parent") > 0;
}

}  // namespace canopy::bench
