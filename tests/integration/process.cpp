#include "integration/process.hpp"

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <thread>

extern char** environ;

namespace canopy::test {

namespace {

std::runtime_error sys_error(const std::string& what, int err) {
  return std::runtime_error{what + ": " + std::strerror(err)};
}

exit_status decode(int wstatus) {
  if (WIFEXITED(wstatus))
    return WEXITSTATUS(wstatus);
  if (WIFSIGNALED(wstatus))
    return -WTERMSIG(wstatus);
  return -1;
}

/// The current environment with `extra` overriding (or adding) variables.
std::vector<std::string> merged_environment(const std::map<std::string, std::string>& extra) {
  std::vector<std::string> out;
  for (char** e = environ; e != nullptr && *e != nullptr; ++e) {
    std::string_view entry{*e};
    auto eq = entry.find('=');
    std::string name{entry.substr(0, eq)};
    if (extra.count(name) == 0)
      out.emplace_back(entry);
  }
  for (auto& [name, value] : extra)
    out.push_back(name + "=" + value);
  return out;
}

std::vector<char*> c_strings(std::vector<std::string>& strings) {
  std::vector<char*> out;
  out.reserve(strings.size() + 1);
  for (auto& s : strings)
    out.push_back(s.data());
  out.push_back(nullptr);
  return out;
}

}  // namespace

// --- temp_dir ---------------------------------------------------------------

temp_dir::temp_dir(std::string_view prefix) {
  std::string templ = "/tmp/" + std::string{prefix} + "XXXXXX";
  if (::mkdtemp(templ.data()) == nullptr)
    throw sys_error("mkdtemp " + templ, errno);
  path_ = templ;
}

temp_dir::~temp_dir() {
  std::error_code ec;
  std::filesystem::remove_all(path_, ec);
}

std::string temp_dir::file(std::string_view name) const {
  return path_ + "/" + std::string{name};
}

// --- child_process ----------------------------------------------------------

child_process::child_process(const std::vector<std::string>& argv,
                             const std::map<std::string, std::string>& env,
                             const std::string& stdin_path) {
  if (argv.empty())
    throw std::runtime_error{"child_process: empty argv"};
  out_fd_ = ::memfd_create("child-output", MFD_CLOEXEC);
  if (out_fd_ < 0)
    throw sys_error("memfd_create", errno);

  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 0, stdin_path.empty() ? "/dev/null" : stdin_path.c_str(),
                                   O_RDONLY, 0);
  posix_spawn_file_actions_adddup2(&actions, out_fd_, 1);
  posix_spawn_file_actions_adddup2(&actions, out_fd_, 2);

  // The child starts with default dispositions and nothing blocked, whatever
  // this test process has set up.
  posix_spawnattr_t attr;
  posix_spawnattr_init(&attr);
  sigset_t none;
  sigemptyset(&none);
  sigset_t defaults;
  sigemptyset(&defaults);
  for (int s : {SIGINT, SIGTERM, SIGPIPE, SIGHUP, SIGCHLD, SIGUSR1, SIGUSR2})
    sigaddset(&defaults, s);
  posix_spawnattr_setsigmask(&attr, &none);
  posix_spawnattr_setsigdefault(&attr, &defaults);
  posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);

  std::vector<std::string> args = argv;
  auto c_args = c_strings(args);
  auto env_strings = merged_environment(env);
  auto c_env = c_strings(env_strings);
  pid_t pid = 0;
  int rc = ::posix_spawn(&pid, args[0].c_str(), &actions, &attr, c_args.data(), c_env.data());
  posix_spawn_file_actions_destroy(&actions);
  posix_spawnattr_destroy(&attr);
  if (rc != 0) {
    ::close(out_fd_);
    out_fd_ = -1;
    throw sys_error("posix_spawn " + args[0], rc);
  }
  pid_ = pid;
}

child_process::~child_process() {
  reset();
}

child_process::child_process(child_process&& other) noexcept
    : pid_(other.pid_), out_fd_(other.out_fd_), status_(other.status_) {
  other.pid_ = 0;
  other.out_fd_ = -1;
  other.status_.reset();
}

child_process& child_process::operator=(child_process&& other) noexcept {
  if (this != &other) {
    reset();
    pid_ = other.pid_;
    out_fd_ = other.out_fd_;
    status_ = other.status_;
    other.pid_ = 0;
    other.out_fd_ = -1;
    other.status_.reset();
  }
  return *this;
}

void child_process::reset() noexcept {
  kill();
  if (out_fd_ >= 0)
    ::close(out_fd_);
  out_fd_ = -1;
  pid_ = 0;
}

bool child_process::running() {
  if (pid_ == 0 || status_)
    return false;
  int wstatus = 0;
  pid_t r = ::waitpid(pid_, &wstatus, WNOHANG);
  if (r == pid_) {
    status_ = decode(wstatus);
    return false;
  }
  if (r < 0 && errno == ECHILD) {
    status_ = -1;  // someone else reaped it; should not happen
    return false;
  }
  return true;
}

std::optional<exit_status> child_process::wait_for(std::chrono::milliseconds timeout) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  while (running()) {
    if (std::chrono::steady_clock::now() >= deadline)
      return std::nullopt;
    std::this_thread::sleep_for(std::chrono::milliseconds{5});
  }
  return status_;
}

void child_process::send_signal(int signo) {
  if (running())
    ::kill(pid_, signo);
}

void child_process::kill() {
  if (!running())
    return;
  ::kill(pid_, SIGKILL);
  int wstatus = 0;
  while (::waitpid(pid_, &wstatus, 0) < 0 && errno == EINTR) {
  }
  status_ = decode(wstatus);
}

std::string child_process::output() const {
  std::string out;
  if (out_fd_ < 0)
    return out;
  char buf[65536];
  off_t offset = 0;
  for (;;) {
    ssize_t n = ::pread(out_fd_, buf, sizeof(buf), offset);
    if (n < 0 && errno == EINTR)
      continue;
    if (n <= 0)
      break;
    out.append(buf, static_cast<std::size_t>(n));
    offset += n;
  }
  return out;
}

// --- free functions ---------------------------------------------------------

run_result run(const std::vector<std::string>& argv, std::chrono::milliseconds timeout,
               const std::map<std::string, std::string>& env) {
  child_process child{argv, env};
  run_result r;
  if (auto st = child.wait_for(timeout)) {
    r.exit_code = *st;
  } else {
    r.timed_out = true;
    child.kill();
    r.exit_code = child.status().value_or(-SIGKILL);
  }
  r.output = child.output();
  return r;
}

bool wait_until(const std::function<bool()>& predicate, std::chrono::milliseconds timeout,
                std::chrono::milliseconds interval) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < deadline) {
    if (predicate())
      return true;
    std::this_thread::sleep_for(interval);
  }
  return predicate();
}

std::string required_env(const char* name) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0')
    throw std::runtime_error{std::string{"environment variable "} + name +
                             " is not set (run the tests with `meson test`)"};
  return v;
}

std::string read_text_file(const std::string& path) {
  std::ifstream in{path, std::ios::binary};
  if (!in)
    throw std::runtime_error{"cannot read " + path};
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void write_text_file(const std::string& path, std::string_view text) {
  std::ofstream out{path, std::ios::binary | std::ios::trunc};
  out.write(text.data(), static_cast<std::streamsize>(text.size()));
  out.close();
  if (!out)
    throw std::runtime_error{"cannot write " + path};
}

std::string write_garbage_file(const std::string& path, std::string_view line) {
  std::filesystem::create_directories(std::filesystem::path{path}.parent_path());
  std::string garbage{line};
  while (garbage.size() < 8192)
    garbage += garbage;
  write_text_file(path, garbage);
  return garbage;
}

// --- canopy_node ------------------------------------------------------------

namespace {

/// Member `key` of `row`, if present and not null.
const nlohmann::json* field(const nlohmann::json& row, const char* key) {
  if (auto it = row.find(key); it != row.end() && !it->is_null())
    return &*it;
  return nullptr;
}

std::int64_t as_int(const nlohmann::json* j) {
  if (j == nullptr)
    return 0;
  if (j->is_number())
    return j->get<std::int64_t>();
  if (j->is_string()) {
    try {
      return std::stoll(j->get<std::string>());
    } catch (const std::exception&) {
      return 0;
    }
  }
  return 0;
}

std::string as_string(const nlohmann::json* j) {
  if (j == nullptr)
    return {};
  return j->is_string() ? j->get<std::string>() : j->dump();
}

void replace_all(std::string& text, std::string_view from, std::string_view to) {
  for (auto pos = text.find(from); pos != std::string::npos; pos = text.find(from, pos + to.size()))
    text.replace(pos, from.size(), to);
}

}  // namespace

canopy_paths canopy_paths::from_env() {
  canopy_paths p;
  p.canopy = required_env("CANOPY_BIN");
  p.canopyctl = required_env("CANOPYCTL_BIN");
  p.examples = required_env("CANOPY_EXAMPLES_BUILD");
  p.plugins = required_env("CANOPY_TEST_PLUGINS");
  p.source_root = required_env("CANOPY_SOURCE_ROOT");
  return p;
}

nlohmann::json manifest_fixture(const canopy_paths& paths, std::string_view name) {
  const std::string file = paths.source_root + "/tests/integration/manifests/" + std::string{name};
  std::string text = read_text_file(file);
  replace_all(text, "@EXAMPLES@", std::filesystem::absolute(paths.examples).string());
  replace_all(text, "@TEST_PLUGINS@", std::filesystem::absolute(paths.plugins).string());
  auto j = nlohmann::json::parse(text, nullptr, false);
  if (j.is_discarded())
    throw std::runtime_error{"fixture " + file + " is not valid JSON"};
  return j;
}

std::optional<std::vector<module_view>> parse_module_list(std::string_view json_text) {
  auto doc = nlohmann::json::parse(json_text, nullptr, false);
  if (doc.is_discarded())
    return std::nullopt;
  if (!doc.is_array())
    return std::nullopt;
  std::vector<module_view> rows;
  for (auto& row : doc) {
    if (!row.is_object())
      return std::nullopt;
    module_view m;
    m.name = as_string(field(row, "name"));
    m.status = as_string(field(row, "status"));
    m.restart_count = static_cast<int>(as_int(field(row, "restart_count")));
    m.last_start_ms = as_int(field(row, "last_start_ms"));
    m.last_exit_reason = as_string(field(row, "last_exit_reason"));
    rows.push_back(std::move(m));
  }
  return rows;
}

std::size_t count_occurrences(std::string_view haystack, std::string_view needle) {
  if (needle.empty())
    return 0;
  std::size_t n = 0;
  for (auto pos = haystack.find(needle); pos != std::string_view::npos;
       pos = haystack.find(needle, pos + needle.size()))
    ++n;
  return n;
}

canopy_node::canopy_node(canopy_paths paths) : paths_(std::move(paths)), dir_("cnp") {}

canopy_node::~canopy_node() {
  if (process_ && std::uncaught_exceptions() > 0) {
    std::string out = process_->output();
    constexpr std::size_t keep = 20000;
    if (out.size() > keep)
      out = "...\n" + out.substr(out.size() - keep);
    std::fprintf(stderr, "---- output of the canopy node (pid %d) ----\n%s\n---- end ----\n",
                 static_cast<int>(process_->pid()), out.c_str());
  }
  process_.reset();
}

std::string canopy_node::write_manifest(std::string_view file_name,
                                        const nlohmann::json& manifest) const {
  std::string path = dir_.file(file_name);
  write_text_file(path, manifest.dump(2));
  return path;
}

void canopy_node::start(const std::string& manifest_path, const std::vector<std::string>& extra) {
  if (process_ && process_->running())
    throw std::runtime_error{"canopy_node::start: the node is already running"};
  std::vector<std::string> argv{paths_.canopy, "run",    "--data-dir",  data_dir(),
                                "--socket",    socket(), "--log-level", "info"};
  if (!manifest_path.empty()) {
    argv.push_back("--manifest");
    argv.push_back(manifest_path);
  }
  argv.insert(argv.end(), extra.begin(), extra.end());
  // The node must not pick up a developer's CANOPY_* settings.
  process_.emplace(argv, std::map<std::string, std::string>{{"CANOPY_SOCKET", socket()},
                                                            {"CANOPY_DATA_DIR", data_dir()}});
}

bool canopy_node::wait_ready(std::chrono::milliseconds timeout) {
  auto exited = [this] { return !process_ || !process_->running(); };
  wait_until([&] { return exited() || ctl({"list"}, std::chrono::seconds{5}).exit_code == 0; },
             timeout, std::chrono::milliseconds{50});
  return !exited() && ctl({"list"}, std::chrono::seconds{5}).exit_code == 0;
}

run_result canopy_node::ctl(const std::vector<std::string>& args,
                            std::chrono::milliseconds timeout) const {
  std::vector<std::string> argv{paths_.canopyctl, "--socket", socket()};
  argv.insert(argv.end(), args.begin(), args.end());
  return run(argv, timeout, {{"CANOPY_SOCKET", socket()}, {"CANOPY_DATA_DIR", data_dir()}});
}

std::optional<std::vector<module_view>> canopy_node::list() const {
  auto r = ctl({"list", "--json"}, std::chrono::seconds{10});
  if (r.exit_code != 0)
    return std::nullopt;
  return parse_module_list(r.output);
}

std::optional<module_view> canopy_node::module(const std::string& name) const {
  auto rows = list();
  if (!rows)
    return std::nullopt;
  for (auto& m : *rows)
    if (m.name == name)
      return m;
  return std::nullopt;
}

bool canopy_node::wait_module(const std::string& name,
                              const std::function<bool(const module_view&)>& pred,
                              std::chrono::milliseconds timeout) const {
  return wait_until(
    [&] {
      auto m = module(name);
      return m && pred(*m);
    },
    timeout, std::chrono::milliseconds{50});
}

std::optional<exit_status> canopy_node::stop(std::chrono::milliseconds timeout) {
  if (!process_)
    return std::nullopt;
  process_->send_signal(SIGTERM);
  auto st = process_->wait_for(timeout);
  if (!st)
    process_->kill();
  return st;
}

std::string canopy_node::output() const {
  return process_ ? process_->output() : std::string{};
}

}  // namespace canopy::test
