// Helpers shared by the benchmarks that run real canopy processes on loopback
// (bench-chain, bench-deploy-propagation, bench-link-memory): failing by
// exception, stopping on SIGINT/SIGTERM with every child killed, child
// processes, loopback ports, /proc readers, a fleet CA, the hub's REST client
// and control-socket link counts. Built on the integration tests' process
// helpers (tests/integration/process.cpp).
#pragma once

#include "gateway/certs.hpp"
#include "gateway/hub_client.hpp"
#include "integration/process.hpp"

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace canopy::bench {

/// A failure: throws std::runtime_error(what), so that the benchmark's run()
/// unwinds and every child process and temp dir goes.
[[noreturn]] void fail(const std::string& what);

/// Runs `run(argc, argv)`; an exception's text is printed as "<bench>: <what>"
/// on stderr and gives status 1. For main().
int run_main(std::string_view bench, int (*run)(int, char**), int argc, char** argv);

// --- stopping ---------------------------------------------------------------

/// Installs the SIGINT/SIGTERM handler: it kills every live tracked_process
/// (SIGKILL) and sets the flag that check_stop() sees.
void install_stop_handler();

/// True once SIGINT or SIGTERM came (for waits of their own).
bool stop_requested();

/// Fails with "interrupted" once SIGINT or SIGTERM came.
void check_stop();

/// How a tracked_process goes when destroyed.
enum class end_with {
  kill,     ///< SIGKILL at once
  sigterm,  ///< SIGTERM, up to 10 s to exit, then SIGKILL
};

/// A child process known to the stop handler (up to 1100 at a time).
class tracked_process {
 public:
  /// Starts argv (stdin from `stdin_path`, default /dev/null).
  explicit tracked_process(const std::vector<std::string>& argv, const std::string& stdin_path = {},
                           end_with end = end_with::kill);
  ~tracked_process();
  tracked_process(const tracked_process&) = delete;
  tracked_process& operator=(const tracked_process&) = delete;

  /// The process itself.
  test::child_process& get() { return proc_; }

  /// Its pid.
  pid_t pid() const { return proc_.pid(); }

  /// SIGTERM and up to `timeout` to exit; then SIGKILL.
  void stop(std::chrono::milliseconds timeout = std::chrono::seconds{10});

  /// The last `keep` bytes of its output (for failure messages).
  std::string output_tail(std::size_t keep = 2000) const;

  /// Fails with "<name> exited:" and the end of its output if it exited.
  void check_alive(const std::string& name);

 private:
  test::child_process proc_;
  end_with end_;
};

/// Calls `pred` every `interval` until true; fails with "timed out waiting for
/// <what>" after `timeout`, or at check_stop().
void wait_or_fail(const std::function<bool()>& pred, std::chrono::milliseconds timeout, const std::string& what,
                  std::chrono::milliseconds interval = std::chrono::milliseconds{20});

// --- arguments and programs ---------------------------------------------------

/// `--name=value` or `--name value`, else `fallback`.
long option(int argc, char** argv, const std::string& name, long fallback);

/// The program named by the environment variable `env_var` if set and not
/// empty, else `fallback`; fails with "<path> is not an executable (<hint>)"
/// unless it is one.
std::string find_program(const char* env_var, const std::string& fallback, std::string_view hint);

/// The argv of `canopy run` for node `id` with certificates in `certs`, data in
/// `data`, control socket `socket`, log level warn, then `extra`.
std::vector<std::string> node_argv(const std::string& canopy, const std::string& id, const std::string& certs,
                                   const std::string& data, const std::string& socket,
                                   const std::vector<std::string>& extra = {});

// --- loopback -----------------------------------------------------------------

/// A TCP port on 127.0.0.1 that was free a moment ago.
int free_port();

/// True if something accepts a TCP connection on 127.0.0.1:port.
bool port_accepts(int port);

/// "127.0.0.1:<port>".
std::string loopback(int port);

// --- /proc --------------------------------------------------------------------

/// VmRSS of process `pid` ("self" for this one) in KiB; 0 if gone.
long rss_kb(const std::string& pid);

/// VmRSS of `pid` in KiB; 0 if gone.
long rss_kb(pid_t pid);

/// Pss of `pid` in KiB (its share of the pages it uses: shared libraries
/// count once across processes), from /proc/PID/smaps_rollup; 0 if gone.
long pss_kb(pid_t pid);

/// MemAvailable of the machine in MiB.
long mem_available_mb();

/// utime + stime of `pid` in clock ticks, from /proc/PID/stat (0 if gone or 0).
long cpu_ticks(pid_t pid);

/// utime + stime of `pid` in ms (0 if gone).
double cpu_ms(pid_t pid);

// --- a fleet ------------------------------------------------------------------

/// Creates a root CA ("bench fleet CA", valid 24 h) and writes it as
/// `certs_dir`/ca.crt and ca.key; fails on an error.
certs::key_and_cert make_fleet_ca(const std::string& certs_dir);

/// Issues `id`'s certificate (24 h) from `ca` and writes it as
/// `certs_dir`/<id>.crt and .key; fails on an error.
void issue_cert(const certs::key_and_cert& ca, const std::string& certs_dir, const std::string& id);

/// A REST client of hub "hub" at https://`api_address`, trusting
/// `certs_dir`/ca.crt, with the token the hub wrote to `hub_data`/api-token;
/// null while that file is missing or empty or the hub does not answer.
std::unique_ptr<hub_client> try_hub_client(const std::string& api_address, const std::string& certs_dir,
                                           const std::string& hub_data,
                                           std::chrono::milliseconds connect_timeout = std::chrono::seconds{10});

/// How many links of `role` ("parent", "child") the node behind the control
/// socket `socket` shows up; -1 if it does not answer.
long links_up(const std::string& socket, std::string_view role);

/// True if the node behind `socket` shows its parent link up.
bool parent_link_up(const std::string& socket);

}  // namespace canopy::bench
