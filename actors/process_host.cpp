#include "actors/process_host.hpp"

#include "runtime/agent.hpp"  // module_child_spec
#include "runtime/atoms.hpp"
#include "runtime/router.hpp"  // canopy::message as a CAF message type

#include <caf/all.hpp>
#include <nlohmann/json.hpp>

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <optional>
#include <system_error>
#include <thread>
#include <utility>

extern char** environ;

namespace canopy {

// -- pure helpers -------------------------------------------------------------

std::vector<std::string> process_environment(const std::map<std::string, std::string>& runtime,
                                             const std::map<std::string, std::string>& manifest,
                                             std::string_view inherited_path,
                                             std::vector<std::string>* overridden) {
  std::map<std::string, std::string> vars;
  if (!inherited_path.empty())
    vars["PATH"] = std::string{inherited_path};
  for (auto& [k, v] : manifest)
    vars[k] = v;
  for (auto& [k, v] : runtime) {
    if (overridden != nullptr && manifest.count(k) > 0 && manifest.at(k) != v)
      overridden->push_back(k);
    vars[k] = v;
  }
  std::vector<std::string> out;
  out.reserve(vars.size());
  for (auto& [k, v] : vars)
    out.push_back(k + "=" + v);
  return out;
}

std::string describe_wait_status(int status) {
  if (status < 0)
    return "ended with an unknown exit status (reaped elsewhere)";
  if (WIFEXITED(status))
    return "exited with code " + std::to_string(WEXITSTATUS(status));
  if (WIFSIGNALED(status)) {
    int sig = WTERMSIG(status);
    std::string text = "killed by signal " + std::to_string(sig);
    if (const char* abbrev = ::sigabbrev_np(sig))
      text += std::string(" (SIG") + abbrev + ")";
    if (WCOREDUMP(status))
      text += ", core dumped";
    return text;
  }
  return "ended with wait status " + std::to_string(status);
}

line_splitter::line_splitter(std::size_t max_line) : max_(std::max<std::size_t>(max_line, 4)) {}

void line_splitter::push(std::string_view piece, const emit_fn& emit) {
  // Bytes of one line arrive in pieces; a line that outgrows max_ is cut.
  while (!piece.empty()) {
    std::size_t room = max_ - partial_.size();
    if (piece.size() < room) {
      partial_.append(piece);
      return;
    }
    partial_.append(piece.substr(0, room));
    piece.remove_prefix(room);
    // Cut before a UTF-8 sequence that straddles the limit, if one starts in
    // the last 3 bytes: the rest goes to the next piece.
    std::size_t cut = partial_.size();
    for (std::size_t back = 1; back <= 3 && back < partial_.size(); ++back) {
      auto c = static_cast<unsigned char>(partial_[partial_.size() - back]);
      if ((c & 0xc0) == 0x80)
        continue;  // a continuation byte: look further back
      if (c >= 0xc0) {
        std::size_t need = c >= 0xf0 ? 4 : c >= 0xe0 ? 3 : 2;
        if (need > back)
          cut = partial_.size() - back;
      }
      break;
    }
    std::string carry = partial_.substr(cut);
    partial_.resize(cut);
    emit(partial_);
    partial_ = std::move(carry);
  }
}

void line_splitter::feed(std::string_view bytes, const emit_fn& emit) {
  while (!bytes.empty()) {
    auto nl = bytes.find('\n');
    if (nl == std::string_view::npos) {
      push(bytes, emit);
      return;
    }
    push(bytes.substr(0, nl), emit);
    if (!partial_.empty() && partial_.back() == '\r')
      partial_.pop_back();
    emit(partial_);
    partial_.clear();
    bytes.remove_prefix(nl + 1);
  }
}

void line_splitter::finish(const emit_fn& emit) {
  if (partial_.empty())
    return;
  emit(partial_);
  partial_.clear();
}

namespace {

// -- the process and its watcher thread ----------------------------------------

/// A file descriptor that closes itself.
class unique_fd {
 public:
  unique_fd() = default;
  explicit unique_fd(int fd) : fd_(fd) {}
  ~unique_fd() { reset(); }
  unique_fd(unique_fd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  unique_fd& operator=(unique_fd&& o) noexcept {
    if (this != &o) {
      reset();
      fd_ = std::exchange(o.fd_, -1);
    }
    return *this;
  }
  unique_fd(const unique_fd&) = delete;
  unique_fd& operator=(const unique_fd&) = delete;
  int get() const noexcept { return fd_; }
  void reset() noexcept {
    if (fd_ >= 0)
      ::close(fd_);
    fd_ = -1;
  }

 private:
  int fd_ = -1;
};

/// The posix_spawn attribute objects, destroyed however spawn() returns.
struct spawn_objects {
  posix_spawn_file_actions_t actions;
  posix_spawnattr_t attr;
  spawn_objects() {
    ::posix_spawn_file_actions_init(&actions);
    ::posix_spawnattr_init(&attr);
  }
  ~spawn_objects() {
    ::posix_spawn_file_actions_destroy(&actions);
    ::posix_spawnattr_destroy(&attr);
  }
  spawn_objects(const spawn_objects&) = delete;
  spawn_objects& operator=(const spawn_objects&) = delete;
};

/// One running process (the leader of its own process group) and the thread
/// that watches it.
///
/// Why a thread per process rather than one poll thread for all of them: a
/// node runs tens of process modules, not thousands, so the cost (one mostly
/// idle thread, a small resident stack) is small, while the gain is that each
/// process's lifetime is exactly its runner's — no registry shared between
/// hosts, no thread that must outlive every host (the node would have to own
/// and join it), and a module that floods its output slows only its own
/// reader. Logging is synchronous
/// (log_hub flushes every line), so the reader is also where that cost lands.
///
/// Threading: start(), signal_group() and the destructor are called by the
/// owning actor; the thread runs watch(). `mtx_` guards `reaped_`, so that no
/// signal is ever sent to a process group after its leader was reaped (its
/// id could then name someone else's group).
class process_runner {
 public:
  /// Called on the watcher thread once the process is reaped, with its wait status.
  using exit_fn = std::function<void(int status)>;

  /// Spawns the process and starts its watcher. Errors: "cannot start PATH: reason".
  static expected<std::unique_ptr<process_runner>> start(const process_host_config& cfg,
                                                         const std::vector<std::string>& envp,
                                                         exit_fn on_exit) {
    std::unique_ptr<process_runner> r{new process_runner(cfg.logger, cfg.max_line_bytes)};
    auto fail = [&](int err, const char* what) {
      return make_error(errc::io_error, "cannot start " + cfg.executable + ": " + what
                                        + (what[0] ? ": " : "") + std::strerror(err));
    };
    int out[2], err[2];
    if (::pipe2(out, O_CLOEXEC) != 0)
      return fail(errno, "pipe");
    unique_fd out_r{out[0]}, out_w{out[1]};
    if (::pipe2(err, O_CLOEXEC) != 0)
      return fail(errno, "pipe");
    unique_fd err_r{err[0]}, err_w{err[1]};

    spawn_objects so;
    // The child: stdin /dev/null, stdout/stderr the pipes (dup2 clears
    // O_CLOEXEC on 1 and 2), then every descriptor from 3 up closed — the
    // node's sockets, files and the pipes' other copies — whatever their
    // flags.
    int rc = ::posix_spawn_file_actions_addopen(&so.actions, 0, "/dev/null", O_RDONLY, 0);
    if (rc == 0)
      rc = ::posix_spawn_file_actions_adddup2(&so.actions, out_w.get(), 1);
    if (rc == 0)
      rc = ::posix_spawn_file_actions_adddup2(&so.actions, err_w.get(), 2);
    if (rc == 0)
      rc = ::posix_spawn_file_actions_addclosefrom_np(&so.actions, 3);
    if (rc == 0 && !cfg.working_dir.empty())
      rc = ::posix_spawn_file_actions_addchdir_np(&so.actions, cfg.working_dir.c_str());
    // Its own process group (so that a stop reaches its children too), the
    // default action for every signal (the node ignores SIGPIPE, say) and
    // no blocked signals.
    sigset_t all, none;
    ::sigfillset(&all);
    ::sigemptyset(&none);
    if (rc == 0)
      rc = ::posix_spawnattr_setflags(
        &so.attr, POSIX_SPAWN_SETPGROUP | POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
    if (rc == 0)
      rc = ::posix_spawnattr_setpgroup(&so.attr, 0);
    if (rc == 0)
      rc = ::posix_spawnattr_setsigmask(&so.attr, &none);
    if (rc == 0)
      rc = ::posix_spawnattr_setsigdefault(&so.attr, &all);
    if (rc != 0)
      return fail(rc, "posix_spawn attributes");

    std::vector<char*> argv;
    argv.push_back(const_cast<char*>(cfg.executable.c_str()));
    for (auto& a : cfg.args)
      argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    std::vector<char*> env;
    for (auto& e : envp)
      env.push_back(const_cast<char*>(e.c_str()));
    env.push_back(nullptr);

    // The node becomes a child subreaper (idempotent, process-wide): the
    // orphans of a module's processes are re-parented to it, not to PID 1,
    // so that reap_group() can reap them whatever PID 1 does (in a container
    // it often reaps nothing).
    ::prctl(PR_SET_CHILD_SUBREAPER, 1);
    pid_t pid = -1;
    // glibc's posix_spawn reports a failed chdir or exec as its result.
    rc = ::posix_spawn(&pid, cfg.executable.c_str(), &so.actions, &so.attr, argv.data(), env.data());
    if (rc != 0)
      return fail(rc, "");
    r->pid_ = pid;
    out_w.reset();
    err_w.reset();
    ::fcntl(out_r.get(), F_SETFL, O_NONBLOCK);
    ::fcntl(err_r.get(), F_SETFL, O_NONBLOCK);
    r->out_ = std::move(out_r);
    r->err_ = std::move(err_r);
    // A pidfd (Linux 5.3+, always close-on-exec) becomes readable when the
    // process exits; without one the watcher polls waitid(WNOWAIT).
    r->pidfd_ = unique_fd{static_cast<int>(::syscall(SYS_pidfd_open, pid, 0))};
    r->on_exit_ = std::move(on_exit);
    try {
      r->thread_ = std::thread([p = r.get()] { p->watch(); });
    } catch (const std::system_error& e) {
      // No watcher: end and reap the process here rather than leave a zombie.
      ::kill(-pid, SIGKILL);
      while (::waitpid(pid, nullptr, 0) < 0 && errno == EINTR) {
      }
      r->reaped_ = true;
      return make_error(errc::io_error, "cannot start " + cfg.executable
                                        + ": no thread to watch it: " + e.what());
    }
    return r;
  }

  /// SIGKILLs the group if the process was not reaped yet and waits for the
  /// watcher to reap it (a SIGKILLed process ends at once, short of an
  /// uninterruptible sleep in the kernel). Runs only when the actor ends
  /// without the process having exited (exit_reason::kill).
  ~process_runner() {
    signal_group(SIGKILL);
    if (thread_.joinable())
      thread_.join();
  }
  process_runner(const process_runner&) = delete;
  process_runner& operator=(const process_runner&) = delete;

  pid_t pid() const noexcept { return pid_; }

  /// Sends `signo` to the process group; false if the leader is already reaped.
  bool signal_group(int signo) {
    std::lock_guard<std::mutex> guard{mtx_};
    if (reaped_ || pid_ <= 0)
      return false;
    ::kill(-pid_, signo);
    return true;
  }

 private:
  process_runner(std::shared_ptr<spdlog::logger> logger, std::size_t max_line)
    : logger_(std::move(logger)), out_lines_(max_line), err_lines_(max_line) {}

  /// Reads what `fd` has now (at most a few buffers, so that the other
  /// stream gets its turn); false at end of file or on an error.
  bool read_some(int fd, line_splitter& lines, spdlog::level::level_enum level) {
    std::array<char, 16 * 1024> buf;
    auto emit = [&](std::string_view line) { logger_->log(level, line); };
    for (int round = 0; round < 4; ++round) {
      ssize_t n = ::read(fd, buf.data(), buf.size());
      if (n > 0) {
        lines.feed(std::string_view(buf.data(), static_cast<std::size_t>(n)), emit);
        continue;
      }
      if (n < 0 && errno == EINTR)
        continue;
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
        return true;
      lines.finish(emit);  // end of file (or a read error: the same for us)
      return false;
    }
    return true;
  }

  /// Reads until the stream is empty for now or ended (the process is gone).
  void drain(unique_fd& fd, line_splitter& lines, spdlog::level::level_enum level) {
    std::array<char, 16 * 1024> buf;
    auto emit = [&](std::string_view line) { logger_->log(level, line); };
    while (fd.get() >= 0) {
      ssize_t n = ::read(fd.get(), buf.data(), buf.size());
      if (n > 0) {
        lines.feed(std::string_view(buf.data(), static_cast<std::size_t>(n)), emit);
        continue;
      }
      if (n < 0 && errno == EINTR)
        continue;
      // End of file, or nothing more now: a process that escaped the group
      // (setsid) may hold the pipe open forever; what it writes is lost.
      break;
    }
    lines.finish(emit);
    fd.reset();
  }

  /// True once the leader has exited (it stays a zombie until reaped).
  bool leader_exited(short pidfd_events) {
    if (pidfd_.get() >= 0)
      return (pidfd_events & (POLLIN | POLLHUP | POLLERR)) != 0;
    siginfo_t info{};
    int rc;
    do {
      rc = ::waitid(P_PID, static_cast<id_t>(pid_), &info, WEXITED | WNOHANG | WNOWAIT);
    } while (rc < 0 && errno == EINTR);
    return rc < 0 || info.si_pid == pid_;
  }

  void watch() {
    using spdlog::level::info;
    using spdlog::level::warn;
    std::array<pollfd, 3> fds{};
    fds[0] = {out_.get(), POLLIN, 0};
    fds[1] = {err_.get(), POLLIN, 0};
    fds[2] = {pidfd_.get(), POLLIN, 0};
    for (;;) {
      // Without a pidfd, look for the exit ten times a second.
      int n = ::poll(fds.data(), fds.size(), pidfd_.get() >= 0 ? -1 : 100);
      if (n < 0 && errno != EINTR)
        break;  // cannot happen with valid descriptors; reap below
      if (n < 0)
        continue;
      // A negative fd is ignored by poll: that is how a closed stream drops out.
      if (fds[0].revents != 0 && !read_some(out_.get(), out_lines_, info))
        fds[0].fd = -1;
      if (fds[1].revents != 0 && !read_some(err_.get(), err_lines_, warn))
        fds[1].fd = -1;
      if (leader_exited(fds[2].revents))
        break;
    }
    int status = 0;
    {
      std::lock_guard<std::mutex> guard{mtx_};
      // The leader is a zombie, so its id still names its group: SIGKILL what
      // is left of the group (as a container's processes end with its main
      // process), then reap.
      ::kill(-pid_, SIGKILL);
      pid_t r;
      do {
        r = ::waitpid(pid_, &status, 0);
      } while (r < 0 && errno == EINTR);
      if (r < 0)
        status = -1;  // reaped elsewhere (nothing in the node does; SIGCHLD ignored?)
      reaped_ = true;
    }
    reap_group();
    // Whatever the process wrote before it exited is in the pipes by now.
    drain(out_, out_lines_, info);
    drain(err_, err_lines_, warn);
    on_exit_(status);
  }

  /// Reaps the rest of the (SIGKILLed) group: the leader's orphans were
  /// re-parented to the node, its child subreaper. Members still there (not
  /// yet re-parented) keep the group's id alive, so it names no other group.
  /// Bounded: a process stuck in the kernel must not hold the module's stop.
  void reap_group() {
    using namespace std::chrono;
    const auto give_up = steady_clock::now() + seconds{2};
    for (;;) {
      siginfo_t info{};
      int rc = ::waitid(P_PGID, static_cast<id_t>(pid_), &info, WEXITED | WNOHANG);
      if (rc < 0 && errno == EINTR)
        continue;
      if (rc < 0)
        return;  // ECHILD: none left
      if (info.si_pid != 0)
        continue;  // reaped one; look for more
      if (steady_clock::now() >= give_up) {
        logger_->warn("process group {}: processes still running 2 s after SIGKILL", pid_);
        return;
      }
      std::this_thread::sleep_for(milliseconds{2});
    }
  }

  std::shared_ptr<spdlog::logger> logger_;
  line_splitter out_lines_, err_lines_;
  unique_fd out_, err_, pidfd_;
  pid_t pid_ = -1;
  exit_fn on_exit_;
  std::mutex mtx_;
  bool reaped_ = false;
  std::thread thread_;  // last: joined before the members it uses go
};

// -- the actor ------------------------------------------------------------------

using proc_exit_atom = caf::atom_constant<caf::atom("procexit")>;
using proc_grace_atom = caf::atom_constant<caf::atom("procgrace")>;

// Member order matters: the runner (which joins its thread) goes before the
// configuration whose logger that thread uses; the destructor body cancels
// the grace timer first.
struct process_state {
  process_host_config cfg;
  std::unique_ptr<process_runner> runner;
  std::optional<caf::error> stop_reason;  ///< set once a stop was asked for
  clock::timer_id grace_timer = 0;
  static inline const char* name = "canopy.process";

  ~process_state() {
    if (grace_timer != 0 && cfg.clk != nullptr)
      cfg.clk->cancel(grace_timer);
  }
};

using process_actor = caf::stateful_actor<process_state>;

/// An exit with code 0: not a crash for the supervisor, with the text for the
/// module's status. CAF's exit_reason::normal is its "no error" and carries
/// no text; user_shutdown is the other reason the supervisor treats as normal.
caf::error normal_exit(std::string text) {
  auto e = caf::make_error(caf::exit_reason::user_shutdown);
  return caf::error{e.code(), e.category(), caf::make_message(std::move(text))};
}

caf::behavior process_host_impl(process_actor* self, process_host_config cfg) {
  auto& st = self->state;
  st.cfg = std::move(cfg);
  auto& log = *st.cfg.logger;

  std::map<std::string, std::string> runtime;
  if (st.cfg.runtime_env)
    runtime = st.cfg.runtime_env(st.cfg.name);
  const char* path = std::getenv("PATH");
  std::vector<std::string> overridden;
  auto envp = process_environment(runtime, st.cfg.env, path != nullptr ? path : "/usr/local/bin:/usr/bin:/bin",
                                  &overridden);
  for (auto& name : overridden)
    log.warn("env {}: the manifest's value is ignored; the runtime sets this variable", name);

  // The watcher thread reaches the actor only through a weak handle: it must
  // not keep a finished actor alive, and a message to a gone actor is dropped.
  auto weak = caf::actor_cast<caf::weak_actor_ptr>(self->ctrl());
  auto runner = process_runner::start(st.cfg, envp, [weak](int status) {
    if (auto a = caf::actor_cast<caf::actor>(weak))
      caf::anon_send(a, proc_exit_atom::value, status);
  });
  if (!runner) {
    log.error("{}", runner.err().message);
    self->quit(caf::make_error(caf::sec::runtime_error, runner.err().message));
    return {};
  }
  st.runner = std::move(*runner);
  log.info("started {} (pid {})", st.cfg.executable, st.runner->pid());

  self->set_exit_handler([self](caf::exit_msg& em) {
    auto& st = self->state;
    if (st.stop_reason)
      return;  // already stopping
    st.stop_reason = em.reason;
    if (!st.runner->signal_group(SIGTERM))
      return;  // it has exited; its proc_exit is on the way
    // The timer is armed before the line is logged: whoever reads the line
    // may rely on it (a test advancing a manual clock).
    auto weak = caf::actor_cast<caf::weak_actor_ptr>(self->ctrl());
    st.grace_timer = st.cfg.clk->call_after(st.cfg.stop_grace, [weak] {
      if (auto a = caf::actor_cast<caf::actor>(weak))
        caf::anon_send(a, proc_grace_atom::value);
    });
    st.cfg.logger->info("stopping: SIGTERM to process group {}; SIGKILL in {} ms", st.runner->pid(),
                        st.cfg.stop_grace.count());
  });

  return {
    [self](proc_exit_atom, int status) {
      auto& st = self->state;
      auto text = describe_wait_status(status);
      if (st.stop_reason) {
        st.cfg.logger->info("stopped ({})", text);
        self->quit(*st.stop_reason);
      } else if (WIFEXITED(status) && WEXITSTATUS(status) == 0) {
        st.cfg.logger->info("{}", text);
        self->quit(normal_exit(text));
      } else {
        st.cfg.logger->error("{}", text);
        self->quit(caf::make_error(caf::sec::runtime_error, text));
      }
    },
    [self](proc_grace_atom) {
      auto& st = self->state;
      st.grace_timer = 0;
      if (st.runner->signal_group(SIGKILL))
        st.cfg.logger->warn("still running {} ms after SIGTERM: SIGKILL to process group {}",
                            st.cfg.stop_grace.count(), st.runner->pid());
    },
    [self](atoms::health_ping, std::uint64_t seq) {
      // The instance is alive as long as its process is: this actor ends with it.
      if (auto sender = caf::actor_cast<caf::actor>(self->current_sender()))
        self->send(sender, atoms::health_pong::value, seq);
    },
    [self](atoms::method, const std::string& method, const std::string& payload) -> caf::result<int, std::string> {
      // A process module takes its direct methods over its MQTT connection.
      auto& st = self->state;
      if (auto session = st.cfg.session_of ? st.cfg.session_of(st.cfg.name) : caf::actor{}) {
        auto rp = self->make_response_promise<int, std::string>();
        // IoT Hub's longest method timeout; the agent's own request times out first.
        self->request(session, std::chrono::seconds{300}, atoms::method::value, method, payload)
          .then([rp](int status, std::string& body) mutable { rp.deliver(status, std::move(body)); },
                [rp](caf::error& err) mutable {
                  rp.deliver(503, nlohmann::json{{"error", caf::to_string(err)}}.dump());
                });
        return rp;
      }
      return {503, nlohmann::json{{"error", "method '" + method + "': process module '" + st.cfg.name
                                              + "' takes direct methods over its MQTT connection, and it "
                                                "is not connected"}}
                     .dump()};
    },
    [self](atoms::desired, const std::string& doc, bool complete) {
      // Passed on to its MQTT session as a desired patch; a module that is not
      // connected reads its twin when it connects.
      auto& st = self->state;
      if (auto session = st.cfg.session_of ? st.cfg.session_of(st.cfg.name) : caf::actor{})
        self->send(session, atoms::desired::value, doc, complete);
    },
    [](atoms::input, const std::string&, const message&, std::uint64_t) {
      // Never announced to the router, so nothing is delivered here; if
      // something is, it is not acknowledged (it waits for the real instance).
    },
  };
}

}  // namespace

caf::actor spawn_process_host(caf::actor_system& sys, process_host_config cfg) {
  return sys.spawn(process_host_impl, std::move(cfg));
}

process_host_config process_host_config_for(const module_spec& m) {
  process_host_config pc;
  pc.name = m.name;
  pc.executable = m.process.executable_path;
  pc.args = m.process.args;
  pc.working_dir = m.process.working_dir;
  pc.env = m.env;
  pc.stop_grace = m.process.stop_grace;
  return pc;
}

child_spec process_child_spec(const module_spec& m, std::shared_ptr<spdlog::logger> logger,
                              clock* clk, process_env_provider runtime_env,
                              std::function<caf::actor(const std::string& module)> session_of) {
  auto spec = module_child_spec(m);
  // The supervisor kills an instance that takes longer than this to stop;
  // the host needs its grace, then a moment to reap.
  spec.shutdown_timeout = m.process.stop_grace + std::chrono::seconds{5};
  auto pc = process_host_config_for(m);
  pc.logger = std::move(logger);
  pc.clk = clk;
  pc.runtime_env = std::move(runtime_env);
  pc.session_of = std::move(session_of);
  spec.start = [pc](caf::actor_system& sys) { return spawn_process_host(sys, pc); };
  return spec;
}

}  // namespace canopy
