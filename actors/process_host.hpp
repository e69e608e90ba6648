// The actor that runs one instance of a process module ("type": "process" in
// the manifest): any executable, started and supervised by the node in place
// of a module_host, under the same modules supervisor and restart policies.
//
// Life of one instance (one actor = one process; a restart is a new actor):
// - Start: posix_spawn of the executable in a process group of its own
//   (pgid = its pid), stdin /dev/null, stdout and stderr into pipes, every
//   other descriptor closed (O_CLOEXEC pipes plus closefrom(3) in the child),
//   default signal dispositions and an empty signal mask, the environment of
//   process_environment() below (PATH: the node's, or
//   /usr/local/bin:/usr/bin:/bin if it has none). A spawn that fails ("cannot start PATH: ...")
//   ends the actor at once with that error, which the supervisor counts as a
//   crash.
// - Output: stdout lines go to the module's logger at info, stderr lines at
//   warn (so `canopyctl logs NAME` shows both), split by line_splitter.
// - Exit: the process's exit ends the actor. Exit code 0 ends it with
//   exit_reason::user_shutdown carrying the text "exited with code 0" (CAF's
//   exit_reason::normal is "no error" and carries no text; the supervisor
//   treats both as normal: restartPolicy on-failure then leaves the module
//   stopped, always restarts it); anything else is a
//   crash with the reason as its text, e.g. "exited with code 3" or
//   "killed by signal 9 (SIGKILL)". When the leader of the group exits, what
//   is left of its group is SIGKILLed and reaped, as a container's processes
//   die with its main process. For that, the node makes itself a child
//   subreaper (prctl PR_SET_CHILD_SUBREAPER) when it starts a process: the
//   group's orphans come back to it rather than to PID 1, which in a container
//   often reaps nothing. A process that leaves its group (setsid, setpgid) is
//   outside supervision: it is not stopped with the module.
// - Stop: an exit message (user_shutdown from the supervisor on a deployment
//   change, `canopyctl restart`, node shutdown) sends SIGTERM to the process
//   group, then SIGKILL after `stop_grace` (on the injected clock); the actor
//   ends with the exit message's reason only once the process is reaped.
//   Even if the actor is killed outright (exit_reason::kill), its state's
//   destructor SIGKILLs the group and waits for the reap: no zombie and no
//   orphan of the group is ever left behind.
//
// One watcher thread per instance reads both pipes and notices the exit
// (pidfd_open + poll; a 100 ms waitid(WNOWAIT) poll where pidfds are not
// available), so no CAF worker ever blocks on the process. See
// process_host.cpp for why a thread per instance rather than one shared poll
// thread.
//
// Protocol (atoms in runtime/atoms.hpp), what a module_host would receive:
//   (health_ping, uint64 seq)                      -> (health_pong, seq) to the sender
//   (method, std::string name, std::string json)   -> (int 503, error JSON): a process
//                                                     module takes direct methods over MQTT
//   (desired, std::string json, bool complete)     ignored (the module reads its twin over MQTT)
//   (input, std::string, message, uint64 token)    dropped, never acknowledged
// A process host never announces itself to the router (no module_up): the
// router hands a module's inputs only to announced instances, so messages for
// a process module stay queued until its MQTT session announces itself as
// that module's instance.
#pragma once

#include "runtime/clock.hpp"
#include "runtime/deployment.hpp"
#include "runtime/supervisor.hpp"

#include <caf/actor.hpp>
#include <caf/fwd.hpp>
#include <spdlog/logger.h>

#include <chrono>
#include <cstddef>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace canopy {

/// The variables the node gives a process module so that it can connect
/// (CANOPY_DEVICE_ID, CANOPY_MODULE_ID; later the MQTT endpoint and a
/// credential). Called with the module's name on the actor's thread at every
/// (re)start; must be cheap and thread-safe.
using process_env_provider =
  std::function<std::map<std::string, std::string>(const std::string& module)>;

/// Everything one process host needs.
struct process_host_config {
  std::string name;                  ///< the module's name in the deployment
  std::string executable;            ///< absolute path (module_spec::process.executable_path)
  std::vector<std::string> args;     ///< argv[1..]; argv[0] is `executable`
  std::string working_dir;           ///< "" = the node's working directory
  std::map<std::string, std::string> env;  ///< the manifest's "env" of the module
  process_env_provider runtime_env;  ///< the node's variables; may be empty
  /// Time between SIGTERM and SIGKILL when the instance is stopped.
  std::chrono::milliseconds stop_grace{std::chrono::seconds{10}};
  clock* clk = nullptr;                    ///< schedules the SIGKILL; required, must outlive the actor
  std::shared_ptr<spdlog::logger> logger;  ///< the module's logger; required
  std::size_t max_line_bytes = 16 * 1024;  ///< longer output lines are split
  /// The module's MQTT session (actors/mqtt_head.hpp) if it is connected, else
  /// an invalid handle; may be empty. Direct methods and desired properties
  /// for the module go there.
  std::function<caf::actor(const std::string& module)> session_of;
};

/// Spawns a process host, which starts the process at once (see above).
caf::actor spawn_process_host(caf::actor_system& sys, process_host_config cfg);

/// The configuration for running process module `m` (name, executable, args,
/// working directory, env, stop grace); the caller adds clk, logger and
/// runtime_env.
process_host_config process_host_config_for(const module_spec& m);

/// The supervisor child spec of process module `m`: module_child_spec(m)
/// (restart policy, budget, backoff) with a shutdown timeout that leaves the
/// host its stop grace plus 5 s to reap the process, and a start function
/// that spawns a process host with `logger`, `clk` and `runtime_env`.
child_spec process_child_spec(const module_spec& m, std::shared_ptr<spdlog::logger> logger,
                              clock* clk, process_env_provider runtime_env,
                              std::function<caf::actor(const std::string& module)> session_of = {});

/// The environment of a process module, as "NAME=value" strings sorted by
/// name: PATH from the node (`inherited_path`, if not empty), then the
/// manifest's variables (which may replace PATH), then the runtime's, which
/// always win — as IoT Edge, where a module's env cannot replace the
/// runtime's IOTEDGE_* variables. Names of manifest variables that a runtime
/// variable replaced are appended to `*overridden` (if given). Pure.
std::vector<std::string> process_environment(const std::map<std::string, std::string>& runtime,
                                             const std::map<std::string, std::string>& manifest,
                                             std::string_view inherited_path,
                                             std::vector<std::string>* overridden = nullptr);

/// A wait status as an operator reads it: "exited with code 3",
/// "killed by signal 9 (SIGKILL)", "killed by signal 11 (SIGSEGV), core dumped";
/// a negative status stands for one nobody could read (the process was
/// reaped elsewhere).
std::string describe_wait_status(int status);

/// Cuts a byte stream into log lines: '\n' ends a line (a '\r' before it is
/// dropped); a line longer than max_line bytes is emitted in pieces of at most
/// max_line bytes, cut before a UTF-8 sequence where one starts near the
/// limit. Memory is bounded by max_line. Not thread-safe; cheap.
class line_splitter {
 public:
  /// Receives each line, without its '\n'.
  using emit_fn = std::function<void(std::string_view line)>;

  /// `max_line` >= 4 (smaller values are raised to 4).
  explicit line_splitter(std::size_t max_line);

  /// Takes the next bytes of the stream; calls `emit` for every line they complete.
  void feed(std::string_view bytes, const emit_fn& emit);

  /// End of the stream: emits the last line if it had no '\n'.
  void finish(const emit_fn& emit);

 private:
  void push(std::string_view piece, const emit_fn& emit);

  std::size_t max_;
  std::string partial_;
};

}  // namespace canopy
