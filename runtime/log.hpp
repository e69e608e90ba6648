// canopy::log_hub — the node's logging, on spdlog 1.10 (synchronous loggers).
//
// One hub per node, built by main() and passed to whoever logs. It owns the
// node logger ("canopy") and one logger per module, all writing to stderr
// (coloured when stderr is a terminal) and, when a log directory is set, to
// `dir/<module>.log` (rotating) and `dir/canopy.log` for the node. Lines are
// plain text:
//     2024-05-01 12:00:00.123 +00:00 [info] filter: started
// or, with log_options::json, one JSON object per line:
//     {"ts":"2024-05-01T12:00:00.123Z","level":"info","logger":"filter","msg":"started"}
//
// The hub registers nothing in spdlog's registry; make_default() is the one
// global effect (spdlog's default logger becomes the node logger).
//
// Threading: every member of log_hub may be called from any thread. The loggers
// it hands out are thread-safe (spdlog *_mt sinks); each call logs synchronously
// on the calling thread and flushes its files at once, so tail() and external
// readers see every line that was logged before.
#pragma once

#include "runtime/expected.hpp"

#include <spdlog/common.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

namespace spdlog {
class logger;
namespace sinks {
class sink;
}  // namespace sinks
}  // namespace spdlog

namespace canopy {

/// How the node logs (from the node's configuration / command line).
struct log_options {
  std::string level = "info";  ///< trace | debug | info | warn | error | critical | off
  bool json = false;           ///< one JSON object per line instead of plain text
  std::string dir;             ///< directory for <module>.log files; "" = no files
  bool to_stderr = true;       ///< also write every line to stderr
  std::size_t max_file_bytes = 5 * 1024 * 1024;  ///< rotate a file past this size
  std::size_t max_files = 3;   ///< rotated files kept per logger (<name>.1.log ...)
};

/// Parses a level name: trace, debug, info, warn (or warning), error (or err),
/// critical, off; case-insensitive. Unknown names are an invalid_argument error
/// that lists the valid ones.
expected<spdlog::level::level_enum> parse_log_level(std::string_view text);

/// Owns the node's loggers. Not copyable. Loggers it handed out keep working
/// after it is destroyed (they own their sinks); follow() subscriptions end
/// with it.
class log_hub {
 public:
  /// Identifies a follow() subscription.
  using follow_id = std::uint64_t;

  /// Called with each new formatted line (no trailing newline).
  using line_fn = std::function<void(const std::string& line)>;

  /// Name of the node's own logger (and of its file, canopy.log).
  static constexpr const char* node_logger_name = "canopy";

  /// Checks the options (level name; creates `dir` if set and opens canopy.log
  /// there) and builds the hub. Errors: invalid_argument for an unknown level,
  /// io_error naming the directory or file that cannot be created.
  static expected<std::unique_ptr<log_hub>> create(const log_options& options);

  ~log_hub();
  log_hub(const log_hub&) = delete;
  log_hub& operator=(const log_hub&) = delete;

  /// The node's logger ("canopy").
  std::shared_ptr<spdlog::logger> node_logger() const;

  /// The logger of `module`, created on first use (then cached: later calls
  /// return the same logger). Its file is dir/<module>.log, where characters
  /// other than [A-Za-z0-9._-] in the name become '_'. "canopy" is the node
  /// logger. If the module's file cannot be opened, the logger writes to stderr
  /// only and the node logger says why.
  std::shared_ptr<spdlog::logger> module_logger(const std::string& module);

  /// Sets the level of every logger, present and future.
  expected<void> set_level(std::string_view level);

  /// The current level.
  spdlog::level::level_enum level() const;

  /// Makes the node logger spdlog's default logger (spdlog::info(...) etc.).
  /// Undone by the destructor if it is still the default then.
  void make_default();

  /// The file `module` logs to, or "" when there is no log directory.
  std::string file_path(const std::string& module) const;

  /// The last `n` lines of the module's log (oldest first), read backwards from
  /// the end of dir/<module>.log and, if it holds fewer, of its rotated files.
  /// Memory is bounded by the lines returned plus one 16 KiB block.
  /// Errors: unavailable when there is no log directory; not_found when the
  /// module has no log file.
  expected<std::vector<std::string>> tail(const std::string& module, std::size_t n);

  /// Calls `on_line` with every line `module` logs from now on (formatted as in
  /// its file, without the newline), until unfollow(). The callback runs on the
  /// logging thread while that module's follow sink is locked: it must be cheap,
  /// must not call this hub and must not log to the same module.
  follow_id follow(const std::string& module, line_fn on_line);

  /// Ends a subscription; once this returns, its callback is not running and
  /// will not run again. Unknown ids are ignored.
  void unfollow(follow_id id);

  /// Flushes every logger's files.
  void flush();

 private:
  struct channel;
  struct token {
    explicit token() = default;
  };

 public:
  /// For create() only (token is private); use create().
  log_hub(token, const log_options& options, spdlog::level::level_enum level);

 private:
  /// Returns the channel of `module`, creating it; mutex_ must be held. If its
  /// file cannot be opened, says why in `*file_error` (if given).
  channel& channel_for(const std::string& module, std::string* file_error);
  std::shared_ptr<spdlog::sinks::sink> make_stderr_sink() const;

  log_options options_;
  mutable std::mutex mutex_;
  spdlog::level::level_enum level_;
  std::shared_ptr<spdlog::sinks::sink> stderr_sink_;  ///< shared by all loggers; null if off
  std::map<std::string, std::unique_ptr<channel>> channels_;  ///< by module name
  std::map<follow_id, std::string> follows_;                  ///< subscription -> module
  follow_id next_follow_ = 1;
  std::shared_ptr<spdlog::logger> node_;
};

}  // namespace canopy
