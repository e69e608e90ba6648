#include "runtime/log.hpp"

#include <spdlog/details/log_msg.h>
#include <spdlog/formatter.h>
#include <spdlog/logger.h>
#include <spdlog/pattern_formatter.h>
#include <spdlog/sinks/base_sink.h>
#include <spdlog/sinks/rotating_file_sink.h>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <system_error>

namespace canopy {

namespace {

/// Plain-text line: "2024-05-01 12:00:00.123 +00:00 [info] filter: message".
/// %^...%$ marks the coloured range (ignored by file sinks).
constexpr const char* text_pattern = "%Y-%m-%d %H:%M:%S.%e %z [%^%l%$] %n: %v";

// -- JSON lines ---------------------------------------------------------------

void append_hex_escape(spdlog::memory_buf_t& out, unsigned code) {
  static constexpr char hex[] = "0123456789abcdef";
  const char esc[6] = {'\\', 'u', hex[(code >> 12) & 0xf], hex[(code >> 8) & 0xf],
                       hex[(code >> 4) & 0xf], hex[code & 0xf]};
  out.append(esc, esc + 6);
}

/// Length of the valid UTF-8 sequence starting at s[i], or 0 if it is invalid
/// (overlong forms, surrogates and code points past U+10FFFF are invalid).
std::size_t utf8_sequence_length(std::string_view s, std::size_t i) {
  const auto b0 = static_cast<unsigned char>(s[i]);
  std::size_t len;
  unsigned min_cp;
  unsigned cp;
  if (b0 < 0x80) return 1;
  if ((b0 & 0xe0) == 0xc0) {
    len = 2, min_cp = 0x80, cp = b0 & 0x1f;
  } else if ((b0 & 0xf0) == 0xe0) {
    len = 3, min_cp = 0x800, cp = b0 & 0x0f;
  } else if ((b0 & 0xf8) == 0xf0) {
    len = 4, min_cp = 0x10000, cp = b0 & 0x07;
  } else {
    return 0;
  }
  if (i + len > s.size()) return 0;
  for (std::size_t k = 1; k < len; ++k) {
    const auto b = static_cast<unsigned char>(s[i + k]);
    if ((b & 0xc0) != 0x80) return 0;
    cp = (cp << 6) | (b & 0x3f);
  }
  if (cp < min_cp || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return 0;
  return len;
}

/// Appends `s` as the inside of a JSON string: quotes, backslashes and control
/// characters escaped, invalid UTF-8 bytes replaced by U+FFFD, so that every
/// line parses as JSON whatever a module logged.
void append_json_escaped(spdlog::memory_buf_t& out, std::string_view s) {
  std::size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c >= 0x80) {
      const std::size_t len = utf8_sequence_length(s, i);
      if (len == 0) {
        append_hex_escape(out, 0xfffd);
        ++i;
      } else {
        out.append(s.data() + i, s.data() + i + len);
        i += len;
      }
      continue;
    }
    switch (c) {
      case '"': out.append(std::string_view("\\\"")); break;
      case '\\': out.append(std::string_view("\\\\")); break;
      case '\n': out.append(std::string_view("\\n")); break;
      case '\r': out.append(std::string_view("\\r")); break;
      case '\t': out.append(std::string_view("\\t")); break;
      case '\b': out.append(std::string_view("\\b")); break;
      case '\f': out.append(std::string_view("\\f")); break;
      default:
        if (c < 0x20 || c == 0x7f) {
          append_hex_escape(out, c);
        } else {
          out.push_back(static_cast<char>(c));
        }
    }
    ++i;
  }
}

/// {"ts":"2024-05-01T12:00:00.123Z","level":"info","logger":"filter","msg":"..."}
/// Time in UTC with milliseconds.
class json_line_formatter final : public spdlog::formatter {
 public:
  explicit json_line_formatter(std::string eol) : eol_(std::move(eol)) {}

  void format(const spdlog::details::log_msg& msg, spdlog::memory_buf_t& dest) override {
    using namespace std::chrono;
    const auto since_epoch = msg.time.time_since_epoch();
    const auto secs = duration_cast<seconds>(since_epoch);
    const auto ms = duration_cast<milliseconds>(since_epoch - secs).count();
    const std::time_t t = static_cast<std::time_t>(secs.count());
    std::tm tm{};
    gmtime_r(&t, &tm);
    char ts[40];
    const int n = std::snprintf(ts, sizeof ts, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ",
                                tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour,
                                tm.tm_min, tm.tm_sec, static_cast<int>(ms));
    dest.append(std::string_view("{\"ts\":\""));
    dest.append(ts, ts + std::max(n, 0));
    dest.append(std::string_view("\",\"level\":\""));
    const auto lvl = spdlog::level::to_string_view(msg.level);
    dest.append(lvl.data(), lvl.data() + lvl.size());
    dest.append(std::string_view("\",\"logger\":\""));
    append_json_escaped(dest, std::string_view(msg.logger_name.data(), msg.logger_name.size()));
    dest.append(std::string_view("\",\"msg\":\""));
    append_json_escaped(dest, std::string_view(msg.payload.data(), msg.payload.size()));
    dest.append(std::string_view("\"}"));
    dest.append(eol_.data(), eol_.data() + eol_.size());
  }

  std::unique_ptr<spdlog::formatter> clone() const override {
    return std::make_unique<json_line_formatter>(eol_);
  }

 private:
  std::string eol_;
};

std::unique_ptr<spdlog::formatter> make_formatter(bool json, std::string eol) {
  if (json) return std::make_unique<json_line_formatter>(std::move(eol));
  return std::make_unique<spdlog::pattern_formatter>(text_pattern,
                                                     spdlog::pattern_time_type::local,
                                                     std::move(eol));
}

/// File name for a logger: [A-Za-z0-9._-] kept, anything else '_'; never
/// hidden, never empty, never a path.
std::string file_stem(const std::string& name) {
  std::string out;
  out.reserve(name.size() + 1);
  for (char c : name) {
    const auto u = static_cast<unsigned char>(c);
    out.push_back(std::isalnum(u) || c == '.' || c == '_' || c == '-' ? c : '_');
  }
  if (out.empty() || out[0] == '.') out.insert(out.begin(), '_');
  return out;
}

// -- tail ----------------------------------------------------------------------

/// Closes a file descriptor.
class fd_guard {
 public:
  explicit fd_guard(int fd) noexcept : fd_(fd) {}
  ~fd_guard() {
    if (fd_ >= 0) ::close(fd_);
  }
  fd_guard(const fd_guard&) = delete;
  fd_guard& operator=(const fd_guard&) = delete;
  int get() const noexcept { return fd_; }

 private:
  int fd_;
};

/// The last `n` lines of the file at `path`, newest first. A missing file gives
/// no lines (`exists` false). Reads backwards in blocks: memory is the lines
/// kept plus one block.
expected<std::vector<std::string>> tail_lines_newest_first(const std::string& path, std::size_t n,
                                                           bool& exists) {
  std::vector<std::string> lines;
  exists = false;
  fd_guard fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (fd.get() < 0) {
    if (errno == ENOENT) return lines;
    return make_error(errc::io_error, "cannot open log file '" + path + "': " + std::strerror(errno));
  }
  exists = true;
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0)
    return make_error(errc::io_error, "cannot stat log file '" + path + "': " + std::strerror(errno));
  if (n == 0) return lines;

  constexpr std::size_t block = 16 * 1024;
  std::string buf(block, '\0');
  off_t pos = st.st_size;
  std::string partial;       // the end of a line whose beginning is not read yet
  bool skip_final_newline = true;
  while (pos > 0 && lines.size() < n) {
    const auto len = static_cast<std::size_t>(std::min<off_t>(pos, static_cast<off_t>(block)));
    pos -= static_cast<off_t>(len);
    std::size_t got = 0;
    while (got < len) {
      const ssize_t r = ::pread(fd.get(), buf.data() + got, len - got, pos + static_cast<off_t>(got));
      if (r < 0 && errno == EINTR) continue;
      if (r < 0)
        return make_error(errc::io_error, "cannot read log file '" + path + "': " + std::strerror(errno));
      if (r == 0) break;  // the file shrank (rotated) under us: use what we have
      got += static_cast<std::size_t>(r);
    }
    std::size_t end = got;
    if (skip_final_newline) {
      // The file's last newline ends the last line; it does not start a new one.
      if (end > 0 && buf[end - 1] == '\n') --end;
      skip_final_newline = false;
    }
    for (std::size_t i = end; i > 0 && lines.size() < n; --i) {
      if (buf[i - 1] == '\n') {
        lines.push_back(std::string(buf.data() + i, end - i) + partial);
        partial.clear();
        end = i - 1;
      }
    }
    if (lines.size() < n) partial = std::string(buf.data(), end) + partial;
  }
  // What remains is the file's first line (empty if the file begins with a
  // newline). An empty file has no line.
  if (pos == 0 && lines.size() < n && st.st_size > 0) lines.push_back(std::move(partial));
  return lines;
}

// -- follow ----------------------------------------------------------------------

/// A sink that hands each formatted line to its subscribers. Does nothing
/// (not even formatting) while it has none.
class follow_sink final : public spdlog::sinks::base_sink<std::mutex> {
 public:
  void add(log_hub::follow_id id, log_hub::line_fn fn) {
    std::lock_guard<std::mutex> lock(mutex_);
    subscribers_.emplace(id, std::move(fn));
  }

  /// After this returns the callback of `id` is not running (the sink's mutex
  /// is held while callbacks run).
  void remove(log_hub::follow_id id) {
    std::lock_guard<std::mutex> lock(mutex_);
    subscribers_.erase(id);
  }

 protected:
  void sink_it_(const spdlog::details::log_msg& msg) override {
    if (subscribers_.empty()) return;
    spdlog::memory_buf_t buf;
    formatter_->format(msg, buf);
    const std::string line(buf.data(), buf.size());
    for (auto& [id, fn] : subscribers_) {
      try {
        fn(line);
      } catch (...) {
        // A subscriber's failure must not stop the others or the logger.
      }
    }
  }
  void flush_() override {}

 private:
  std::map<log_hub::follow_id, log_hub::line_fn> subscribers_;
};

}  // namespace

// -- parse_log_level ------------------------------------------------------------

expected<spdlog::level::level_enum> parse_log_level(std::string_view text) {
  std::string lower(text);
  std::transform(lower.begin(), lower.end(), lower.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  using spdlog::level::level_enum;
  static constexpr std::pair<std::string_view, level_enum> names[] = {
      {"trace", level_enum::trace}, {"debug", level_enum::debug},
      {"info", level_enum::info},   {"warn", level_enum::warn},
      {"warning", level_enum::warn}, {"error", level_enum::err},
      {"err", level_enum::err},     {"critical", level_enum::critical},
      {"off", level_enum::off},
  };
  for (const auto& [name, lvl] : names)
    if (lower == name) return lvl;
  return make_error(errc::invalid_argument,
                    "log level '" + std::string(text) +
                        "' is unknown; use one of trace, debug, info, warn, error, critical, off");
}

// -- log_hub ----------------------------------------------------------------------

struct log_hub::channel {
  std::shared_ptr<spdlog::logger> logger;
  std::shared_ptr<follow_sink> followers;
};

log_hub::log_hub(token, const log_options& options, spdlog::level::level_enum level)
    : options_(options), level_(level) {
  if (options_.to_stderr) stderr_sink_ = make_stderr_sink();
}

log_hub::~log_hub() {
  if (node_ && spdlog::default_logger_raw() == node_.get()) {
    // Leave spdlog a default logger that does not depend on this hub's files.
    auto fallback = std::make_shared<spdlog::logger>(
        "", std::make_shared<spdlog::sinks::stderr_color_sink_mt>());
    spdlog::set_default_logger(std::move(fallback));
  }
  // Loggers handed out may outlive the hub; the subscriptions do not.
  std::lock_guard<std::mutex> lock(mutex_);
  for (auto& [id, module] : follows_)
    if (auto ch = channels_.find(module); ch != channels_.end()) ch->second->followers->remove(id);
  follows_.clear();
  for (auto& [name, ch] : channels_) ch->logger->flush();
}

std::shared_ptr<spdlog::sinks::sink> log_hub::make_stderr_sink() const {
  auto sink = std::make_shared<spdlog::sinks::stderr_color_sink_mt>();  // colour iff a tty
  sink->set_formatter(make_formatter(options_.json, "\n"));
  return sink;
}

expected<std::unique_ptr<log_hub>> log_hub::create(const log_options& options) {
  auto level = parse_log_level(options.level);
  if (!level) return std::move(level).err();
  if (!options.dir.empty()) {
    std::error_code ec;
    std::filesystem::create_directories(options.dir, ec);
    if (ec)
      return make_error(errc::io_error,
                        "cannot create log directory '" + options.dir + "': " + ec.message());
    if (!std::filesystem::is_directory(options.dir, ec))
      return make_error(errc::io_error, "log directory '" + options.dir + "' is not a directory");
  }
  if (options.max_files == 0 || options.max_file_bytes == 0)
    return make_error(errc::invalid_argument,
                      "log options: max_files and max_file_bytes must be positive");

  auto hub = std::make_unique<log_hub>(token{}, options, *level);
  std::lock_guard<std::mutex> lock(hub->mutex_);
  // The node's own file must open: a node that cannot write its log is
  // misconfigured, and says so now.
  std::string file_error;
  hub->node_ = hub->channel_for(node_logger_name, &file_error).logger;
  if (!file_error.empty()) return make_error(errc::io_error, std::move(file_error));
  return hub;
}

log_hub::channel& log_hub::channel_for(const std::string& module, std::string* file_error_out) {
  if (auto it = channels_.find(module); it != channels_.end()) return *it->second;

  auto ch = std::make_unique<channel>();
  std::vector<spdlog::sink_ptr> sinks;
  if (stderr_sink_) sinks.push_back(stderr_sink_);
  std::string file_error;
  if (!options_.dir.empty()) {
    const std::string path = file_path(module);
    try {
      auto file = std::make_shared<spdlog::sinks::rotating_file_sink_mt>(
          path, options_.max_file_bytes, options_.max_files);
      file->set_formatter(make_formatter(options_.json, "\n"));
      sinks.push_back(std::move(file));
    } catch (const spdlog::spdlog_ex& e) {
      file_error = "cannot open log file '" + path + "' for '" + module + "': " + e.what();
    }
  }
  ch->followers = std::make_shared<follow_sink>();
  ch->followers->set_formatter(make_formatter(options_.json, ""));
  sinks.push_back(ch->followers);

  ch->logger = std::make_shared<spdlog::logger>(module, sinks.begin(), sinks.end());
  ch->logger->set_level(level_);
  // Flush every line: tail(), `canopyctl logs` and `tail -f` see it at once,
  // and nothing is lost if the node crashes. Costs one write(2) per line.
  ch->logger->flush_on(spdlog::level::trace);

  auto& ref = *ch;
  channels_.emplace(module, std::move(ch));
  if (!file_error.empty()) {
    if (file_error_out != nullptr) *file_error_out = file_error;
    if (node_) node_->error("{}; logging it to stderr only", file_error);
  }
  return ref;
}

std::shared_ptr<spdlog::logger> log_hub::node_logger() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return node_;
}

std::shared_ptr<spdlog::logger> log_hub::module_logger(const std::string& module) {
  std::lock_guard<std::mutex> lock(mutex_);
  return channel_for(module, nullptr).logger;
}

expected<void> log_hub::set_level(std::string_view level) {
  auto parsed = parse_log_level(level);
  if (!parsed) return std::move(parsed).err();
  std::lock_guard<std::mutex> lock(mutex_);
  level_ = *parsed;
  for (auto& [name, ch] : channels_) ch->logger->set_level(level_);
  return {};
}

spdlog::level::level_enum log_hub::level() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return level_;
}

void log_hub::make_default() { spdlog::set_default_logger(node_logger()); }

std::string log_hub::file_path(const std::string& module) const {
  if (options_.dir.empty()) return {};
  return (std::filesystem::path(options_.dir) / (file_stem(module) + ".log")).string();
}

expected<std::vector<std::string>> log_hub::tail(const std::string& module, std::size_t n) {
  if (options_.dir.empty())
    return make_error(errc::unavailable,
                      "no log files for '" + module + "': logging to files is off (no log dir set)");
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (auto it = channels_.find(module); it != channels_.end()) it->second->logger->flush();
  }
  const std::string path = file_path(module);
  std::vector<std::string> newest_first;
  bool any_file = false;
  // The live file, then <stem>.1.log, <stem>.2.log, ... (older and older).
  for (std::size_t index = 0; index <= options_.max_files; ++index) {
    if (index > 0 && newest_first.size() >= n) break;
    const std::string p =
        index == 0 ? path : spdlog::sinks::rotating_file_sink_mt::calc_filename(path, index);
    bool exists = false;
    auto lines = tail_lines_newest_first(p, n - newest_first.size(), exists);
    if (!lines) return std::move(lines).err();
    if (!exists) {
      if (index == 0) continue;  // rotated files may exist even if the live one is gone
      break;
    }
    any_file = true;
    for (auto& l : *lines) newest_first.push_back(std::move(l));
  }
  if (!any_file)
    return make_error(errc::not_found, "no log file '" + path + "' for '" + module + "'");
  std::reverse(newest_first.begin(), newest_first.end());
  return newest_first;
}

log_hub::follow_id log_hub::follow(const std::string& module, line_fn on_line) {
  std::shared_ptr<follow_sink> sink;
  follow_id id;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    sink = channel_for(module, nullptr).followers;
    id = next_follow_++;
  }
  // The sink's lock is never taken under mutex_ (a running callback holds it).
  sink->add(id, std::move(on_line));
  std::lock_guard<std::mutex> lock(mutex_);
  follows_.emplace(id, module);
  return id;
}

void log_hub::unfollow(follow_id id) {
  std::shared_ptr<follow_sink> sink;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = follows_.find(id);
    if (it == follows_.end()) return;
    if (auto ch = channels_.find(it->second); ch != channels_.end()) sink = ch->second->followers;
    follows_.erase(it);
  }
  // Outside mutex_: waiting for a running callback must not block the hub.
  if (sink) sink->remove(id);
}

void log_hub::flush() {
  std::lock_guard<std::mutex> lock(mutex_);
  for (auto& [name, ch] : channels_) ch->logger->flush();
}

}  // namespace canopy
