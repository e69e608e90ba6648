// Child processes, temporary directories and polling for the multi-process
// integration tests: they start real `canopy` nodes and run the real
// `canopyctl`, as a user would. No shell is involved: argv goes to
// posix_spawn as given. canopy_node (below) bundles one node's temp dir,
// process and canopyctl calls.
//
// Every wait here is bounded; nothing asserts on speed. Test helpers, not
// product code: a failure to spawn or to create a directory is a broken test
// environment and throws std::runtime_error (Catch2 reports it).
//
// Threading: use each object from one thread.
#pragma once

#include <nlohmann/json.hpp>

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace canopy::test {

/// How a finished child ended: its exit code (0..255), or -N when signal N
/// killed it.
using exit_status = int;

/// What run() saw.
struct run_result {
  exit_status exit_code = -1;  ///< see exit_status; -9 (SIGKILL) after a timeout
  std::string output;          ///< stdout and stderr interleaved, as written
  bool timed_out = false;      ///< the child did not finish in time and was killed
};

/// A directory made with mkdtemp under /tmp and removed (recursively) by the
/// destructor. The path stays short so that Unix socket paths inside it fit
/// the 108-byte sun_path.
class temp_dir {
 public:
  /// Creates /tmp/<prefix>XXXXXX. Throws std::runtime_error on failure.
  explicit temp_dir(std::string_view prefix = "cnp");
  /// Removes the directory and everything in it (errors ignored).
  ~temp_dir();
  temp_dir(const temp_dir&) = delete;
  temp_dir& operator=(const temp_dir&) = delete;

  /// The directory's absolute path.
  const std::string& path() const noexcept { return path_; }

  /// path() + "/" + name.
  std::string file(std::string_view name) const;

 private:
  std::string path_;
};

/// A running child process whose stdout and stderr go to one in-memory file
/// (a memfd), readable at any time with output(). Killed (SIGKILL) and reaped
/// by the destructor if still running. Movable, not copyable.
class child_process {
 public:
  /// Starts argv[0] (an absolute or PATH-less relative path: no PATH search)
  /// with argv, the current environment plus `env` (entries override
  /// variables of the same name), stdin from `stdin_path` (default
  /// /dev/null), and the default signal dispositions and an empty signal
  /// mask. Throws std::runtime_error when the process cannot be spawned.
  child_process(const std::vector<std::string>& argv,
                const std::map<std::string, std::string>& env = {},
                const std::string& stdin_path = {});
  ~child_process();
  child_process(child_process&& other) noexcept;
  child_process& operator=(child_process&& other) noexcept;
  child_process(const child_process&) = delete;
  child_process& operator=(const child_process&) = delete;

  /// The child's process id (0 once moved from).
  pid_t pid() const noexcept { return pid_; }

  /// True until the child has been seen to exit (reaps it if it just did).
  bool running();

  /// Waits up to `timeout` for the child to exit; its status, or nullopt if it
  /// is still running then. Polls every few milliseconds.
  std::optional<exit_status> wait_for(std::chrono::milliseconds timeout);

  /// The exit status, once running() is false.
  std::optional<exit_status> status() const noexcept { return status_; }

  /// Sends `signo` (e.g. SIGTERM, SIGKILL) if the child still runs.
  void send_signal(int signo);

  /// SIGKILL and reap, if still running. Idempotent.
  void kill();

  /// Everything the child wrote to stdout and stderr so far.
  std::string output() const;

 private:
  void reset() noexcept;

  pid_t pid_ = 0;
  int out_fd_ = -1;
  std::optional<exit_status> status_;
};

/// Runs argv to completion (as child_process does) and returns its status
/// and output. A child still running after `timeout` is killed with SIGKILL
/// and reported with timed_out = true.
run_result run(const std::vector<std::string>& argv, std::chrono::milliseconds timeout,
               const std::map<std::string, std::string>& env = {});

/// Calls `predicate` every `interval` until it returns true (then true) or
/// `timeout` has passed (then false; the predicate is tried once more at the
/// end).
bool wait_until(const std::function<bool()>& predicate, std::chrono::milliseconds timeout,
                std::chrono::milliseconds interval = std::chrono::milliseconds{20});

/// The value of environment variable `name`; throws std::runtime_error naming
/// it when it is unset or empty (the tests need meson's test environment).
std::string required_env(const char* name);

/// Reads a whole file; throws std::runtime_error naming it on failure.
std::string read_text_file(const std::string& path);

/// Writes (replaces) a whole file; throws std::runtime_error naming it on failure.
void write_text_file(const std::string& path, std::string_view text);

/// Writes `line` repeated to at least 8 KiB (a file that is no database) as
/// `path`, creating its directory; returns the contents written.
std::string write_garbage_file(const std::string& path, std::string_view line);

// --- A canopy node as the tests drive it -------------------------------------

/// Where the programs and libraries under test are, from meson's test
/// environment (tests/meson.build).
struct canopy_paths {
  std::string canopy;       ///< CANOPY_BIN: the node
  std::string canopyctl;    ///< CANOPYCTL_BIN: the CLI
  std::string examples;     ///< CANOPY_EXAMPLES_BUILD: the example module libraries
  std::string plugins;      ///< CANOPY_TEST_PLUGINS: the test plugin libraries
  std::string source_root;  ///< CANOPY_SOURCE_ROOT

  /// Reads the variables; throws std::runtime_error naming a missing one.
  static canopy_paths from_env();
};

/// Reads tests/integration/manifests/<name>, replaces "@EXAMPLES@" and
/// "@TEST_PLUGINS@" by the absolute directories of `paths`, and parses it.
nlohmann::json manifest_fixture(const canopy_paths& paths, std::string_view name);

/// The parts of a `canopyctl list --json` row the tests look at.
struct module_view {
  std::string name;
  std::string status;  ///< running | stopped | failed | backoff | unhealthy
  int restart_count = 0;
  std::int64_t last_start_ms = 0;
  std::string last_exit_reason;
};

/// One node: a temp dir holding its data dir (DIR/data) and control socket
/// (DIR/s.sock), the `canopy run` process, and canopyctl calls against it.
/// The destructor kills the node if it still runs; if it runs during stack
/// unwinding (a REQUIRE failed), it first prints the node's output to stderr.
class canopy_node {
 public:
  /// A node not yet started, in a fresh temp dir.
  explicit canopy_node(canopy_paths paths);
  ~canopy_node();
  canopy_node(const canopy_node&) = delete;
  canopy_node& operator=(const canopy_node&) = delete;

  /// The programs and libraries in use.
  const canopy_paths& paths() const noexcept { return paths_; }
  /// The temp dir (manifests may be written there).
  const temp_dir& dir() const noexcept { return dir_; }
  /// The node's --data-dir.
  std::string data_dir() const { return dir_.file("data"); }
  /// The node's --socket.
  std::string socket() const { return dir_.file("s.sock"); }

  /// Writes `manifest` as DIR/<file_name>; returns its path.
  std::string write_manifest(std::string_view file_name, const nlohmann::json& manifest) const;

  /// Starts `canopy run --data-dir D --socket S --log-level info` (plus
  /// `--manifest M` when `manifest_path` is not empty, plus `extra`). Any node
  /// this object started before must have been stopped.
  void start(const std::string& manifest_path, const std::vector<std::string>& extra = {});

  /// Waits until `canopyctl list` succeeds (the control socket serves); false
  /// if the node exited or `timeout` passed first.
  bool wait_ready(std::chrono::milliseconds timeout = std::chrono::seconds{20});

  /// Runs `canopyctl --socket S args...`.
  run_result ctl(const std::vector<std::string>& args,
                 std::chrono::milliseconds timeout = std::chrono::seconds{25}) const;

  /// `canopyctl list --json`, parsed; nullopt if it failed or did not parse.
  std::optional<std::vector<module_view>> list() const;

  /// The row of `module` in list(), if listed.
  std::optional<module_view> module(const std::string& name) const;

  /// Waits until list() shows `module` and `pred` holds for its row.
  bool wait_module(const std::string& name, const std::function<bool(const module_view&)>& pred,
                   std::chrono::milliseconds timeout = std::chrono::seconds{20}) const;

  /// SIGTERM, then waits up to `timeout` for the exit; the status, or nullopt
  /// if it still runs (then it is killed).
  std::optional<exit_status> stop(std::chrono::milliseconds timeout = std::chrono::seconds{20});

  /// The node process (valid after start()).
  child_process& process() { return *process_; }

  /// Everything the current node process wrote (its log on stderr).
  std::string output() const;

 private:
  canopy_paths paths_;
  temp_dir dir_;
  std::optional<child_process> process_;
};

/// The rows of `canopyctl list --json` output; nullopt if it does not parse.
std::optional<std::vector<module_view>> parse_module_list(std::string_view json_text);

/// The number of times `needle` occurs in `haystack`.
std::size_t count_occurrences(std::string_view haystack, std::string_view needle);

}  // namespace canopy::test
