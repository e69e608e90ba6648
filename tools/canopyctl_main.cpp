// canopyctl — the local command line of a canopy node, like `iotedge`: talks to
// the node's control socket (gateway/control_server) through control_client.
//
// Exit codes: 0 ok, 1 the operation failed, 2 usage, 3 cannot connect to the
// node, 130 a one-shot command interrupted by Ctrl-C (streams end with 0; `send
// --stdin`, whose unanswered messages are unaccounted for, ends with 130).
#include "gateway/control_client.hpp"

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cerrno>
#include <csignal>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <iterator>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include <unistd.h>

namespace {

using namespace canopy;

constexpr int exit_ok = 0;
constexpr int exit_failed = 1;
constexpr int exit_usage = 2;
constexpr int exit_no_connection = 3;
constexpr int exit_interrupted = 130;

// --- Formatting -----------------------------------------------------------------

/// Docker's "human duration": "less than a second", "5 minutes", "about an hour", ...
std::string human_duration(std::int64_t ms) {
  auto seconds = ms / 1000;
  if (seconds < 1) return "less than a second";
  if (seconds == 1) return "1 second";
  if (seconds < 60) return std::to_string(seconds) + " seconds";
  auto minutes = seconds / 60;
  if (minutes == 1) return "about a minute";
  if (minutes < 60) return std::to_string(minutes) + " minutes";
  auto hours = (seconds + 1800) / 3600;
  if (hours == 1) return "about an hour";
  if (hours < 48) return std::to_string(hours) + " hours";
  if (hours < 24 * 7 * 2) return std::to_string(hours / 24) + " days";
  if (hours < 24 * 30 * 2) return std::to_string(hours / 24 / 7) + " weeks";
  if (hours < 24 * 365 * 2) return std::to_string(hours / 24 / 30) + " months";
  return std::to_string(hours / 24 / 365) + " years";
}

/// "Up 5 minutes", "Failed 2 seconds ago", ... as of `now_ms`.
std::string describe(const module_row& row, std::int64_t now_ms) {
  auto since = [&](std::int64_t t) { return human_duration(std::max<std::int64_t>(0, now_ms - t)); };
  if (row.status == "running") return row.last_start_ms > 0 ? "Up " + since(row.last_start_ms) : "Up";
  if (row.status == "unhealthy") {
    return row.last_start_ms > 0 ? "Unhealthy, up " + since(row.last_start_ms) : "Unhealthy";
  }
  if (row.status == "failed") return row.last_exit_ms > 0 ? "Failed " + since(row.last_exit_ms) + " ago" : "Failed";
  if (row.status == "backoff") {
    return row.last_exit_ms > 0 ? "Backing off, exited " + since(row.last_exit_ms) + " ago" : "Backing off";
  }
  if (row.status == "stopped") {
    return row.last_exit_ms > 0 ? "Stopped " + since(row.last_exit_ms) + " ago" : "Stopped";
  }
  return row.status;
}

std::int64_t now_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

/// "2024-05-01T10:00:00.123Z".
std::string iso_time(std::int64_t ms) {
  std::time_t secs = static_cast<std::time_t>(ms / 1000);
  std::tm tm{};
  ::gmtime_r(&secs, &tm);
  char buf[32];
  std::strftime(buf, sizeof(buf), "%Y-%m-%dT%H:%M:%S", &tm);
  char out[48];
  std::snprintf(out, sizeof(out), "%s.%03dZ", buf, static_cast<int>(((ms % 1000) + 1000) % 1000));
  return out;
}

/// True if `s` is valid UTF-8 without control characters other than tab, CR and LF.
bool printable_utf8(std::string_view s) {
  std::size_t i = 0;
  while (i < s.size()) {
    auto c = static_cast<unsigned char>(s[i]);
    if (c < 0x80) {
      if ((c < 0x20 && c != '\t' && c != '\n' && c != '\r') || c == 0x7f) return false;
      ++i;
      continue;
    }
    std::size_t len = (c & 0xe0) == 0xc0 ? 2 : (c & 0xf0) == 0xe0 ? 3 : (c & 0xf8) == 0xf0 ? 4 : 0;
    if (len == 0 || i + len > s.size()) return false;
    for (std::size_t k = 1; k < len; ++k) {
      if ((static_cast<unsigned char>(s[i + k]) & 0xc0) != 0x80) return false;
    }
    i += len;
  }
  return true;
}

std::string base64(std::string_view in) {
  static constexpr char table[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  out.reserve((in.size() + 2) / 3 * 4);
  std::size_t i = 0;
  for (; i + 2 < in.size(); i += 3) {
    std::uint32_t v = (static_cast<unsigned char>(in[i]) << 16) | (static_cast<unsigned char>(in[i + 1]) << 8) |
                      static_cast<unsigned char>(in[i + 2]);
    out += table[(v >> 18) & 63];
    out += table[(v >> 12) & 63];
    out += table[(v >> 6) & 63];
    out += table[v & 63];
  }
  if (i < in.size()) {
    std::uint32_t v = static_cast<unsigned char>(in[i]) << 16;
    if (i + 1 < in.size()) v |= static_cast<unsigned char>(in[i + 1]) << 8;
    out += table[(v >> 18) & 63];
    out += table[(v >> 12) & 63];
    out += i + 1 < in.size() ? table[(v >> 6) & 63] : '=';
    out += '=';
  }
  return out;
}

/// One line per $upstream message: time, source, properties and body.
std::string format_record(const upstream_record& rec) {
  nlohmann::ordered_json props = nlohmann::ordered_json::object();
  for (const auto& [key, value] : rec.msg.properties()) props[std::string(key)] = std::string(value);
  std::string line = iso_time(rec.enqueued_ms) + " " + rec.source_module + "/" + rec.output +
                     " properties=" + props.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  auto body = rec.msg.body();
  if (printable_utf8(body)) {
    std::string text;
    for (char c : body) {
      if (c == '\n') {
        text += "\\n";
      } else if (c == '\r') {
        text += "\\r";
      } else {
        text += c;
      }
    }
    line += " body=" + text;
  } else {
    line += " body(base64)=" + base64(body);
  }
  return line;
}

/// `text` pretty-printed if it is JSON, else as it is.
std::string pretty_json(const std::string& text) {
  auto parsed = nlohmann::ordered_json::parse(text, nullptr, false);
  if (parsed.is_discarded()) return text;
  return parsed.dump(2);
}

nlohmann::ordered_json json_or_string(const std::string& text) {
  if (text.empty()) return nullptr;
  auto parsed = nlohmann::ordered_json::parse(text, nullptr, false);
  if (parsed.is_discarded()) return text;
  return parsed;
}

/// Prints rows (the first is the header) as columns three spaces apart.
void print_table(const std::vector<std::vector<std::string>>& table) {
  std::vector<std::size_t> width(table[0].size(), 0);
  for (const auto& row : table) {
    for (std::size_t c = 0; c < row.size(); ++c) width[c] = std::max(width[c], row[c].size());
  }
  for (const auto& row : table) {
    std::string line;
    for (std::size_t c = 0; c < row.size(); ++c) {
      line += row[c];
      if (c + 1 < row.size()) line += std::string(width[c] - row[c].size() + 3, ' ');
    }
    while (!line.empty() && line.back() == ' ') line.pop_back();
    std::cout << line << "\n";
  }
}

/// "512 B", "1.5 KiB", "3.2 MiB", ...
std::string human_bytes(std::int64_t bytes) {
  static constexpr const char* units[] = {"KiB", "MiB", "GiB", "TiB"};
  if (bytes < 1024) return std::to_string(bytes) + " B";
  double v = static_cast<double>(bytes);
  std::size_t u = 0;
  for (v /= 1024; v >= 1024 && u + 1 < std::size(units); ++u) v /= 1024;
  char out[32];
  std::snprintf(out, sizeof(out), "%.1f %s", v, units[u]);
  return out;
}

/// "850 us", "2.3 ms", "1.20 s".
std::string human_micros(std::int64_t us) {
  char out[32];
  if (us < 1000) {
    std::snprintf(out, sizeof(out), "%lld us", static_cast<long long>(us));
  } else if (us < 1000000) {
    std::snprintf(out, sizeof(out), "%.1f ms", static_cast<double>(us) / 1e3);
  } else {
    std::snprintf(out, sizeof(out), "%.2f s", static_cast<double>(us) / 1e6);
  }
  return out;
}

/// `text` on one line (an error text inside a line of `send --stdin`).
std::string one_line(std::string text) {
  for (auto& c : text) {
    if (c == '\n' || c == '\r') c = ' ';
  }
  return text;
}

// --- Commands ----------------------------------------------------------------------

/// Prints a failed operation's error exactly as the node worded it.
int report(const control_client& client, const error& err) {
  std::cerr << err.message << "\n";
  return client.interrupted() ? exit_interrupted : exit_failed;
}

int cmd_list(control_client& client, bool as_json) {
  auto rows = client.list();
  if (!rows) return report(client, rows.err());
  auto now = now_ms();
  if (as_json) {
    auto out = nlohmann::ordered_json::array();
    for (const auto& r : *rows) {
      out.push_back({{"name", r.name},
                     {"type", r.type},
                     {"version", r.version},
                     {"status", r.status},
                     {"desired_status", r.desired_status},
                     {"description", describe(r, now)},
                     {"restart_policy", r.restart_policy},
                     {"restart_count", r.restart_count},
                     {"last_start_ms", r.last_start_ms},
                     {"last_exit_ms", r.last_exit_ms},
                     {"last_exit_reason", r.last_exit_reason}});
    }
    std::cout << out.dump(2) << "\n";
    return exit_ok;
  }
  std::vector<std::vector<std::string>> table{{"NAME", "STATUS", "DESCRIPTION", "RESTARTS", "LAST EXIT"}};
  for (const auto& r : *rows) {
    bool show_exit = r.status != "running" && !r.last_exit_reason.empty();
    table.push_back({r.name, r.status, describe(r, now), std::to_string(r.restart_count),
                     show_exit ? r.last_exit_reason : ""});
  }
  print_table(table);
  return exit_ok;
}

int cmd_logs(control_client& client, const std::string& module, std::size_t tail, bool follow) {
  auto lines = client.logs(module, tail);
  if (!lines) return report(client, lines.err());
  for (const auto& line : *lines) std::cout << line << "\n";
  std::cout << std::flush;
  if (!follow) return exit_ok;
  stream_options options;
  options.on_dropped = [](std::uint64_t n) {
    std::cerr << "canopyctl: " << n << " log lines dropped (output too slow)\n";
  };
  auto followed = client.follow_logs(module, [](const std::string& line) {
    std::cout << line << "\n" << std::flush;
    return static_cast<bool>(std::cout);  // stop when stdout is gone (EPIPE)
  }, options);
  if (!followed) return report(client, followed.err());
  return exit_ok;
}

int cmd_restart(control_client& client, const std::string& module) {
  auto done = client.restart(module);
  if (!done) return report(client, done.err());
  std::cout << module << "\n";
  return exit_ok;
}

int cmd_deploy(control_client& client, const std::string& file) {
  std::ifstream in(file, std::ios::binary);
  if (!in) {
    std::cerr << "canopyctl: cannot read the manifest " << file << ": " << std::strerror(errno) << "\n";
    return exit_failed;
  }
  std::ostringstream text;
  text << in.rdbuf();
  auto base_dir = std::filesystem::absolute(file).lexically_normal().parent_path().string();
  auto done = client.deploy(text.str(), base_dir);
  if (!done) return report(client, done.err());
  std::cout << "deployment " << file << " applied\n";
  return exit_ok;
}

int cmd_invoke(control_client& client, const std::string& module, const std::string& method,
               const std::string& payload, double timeout_secs) {
  if (nlohmann::json::parse(payload, nullptr, false).is_discarded()) {
    std::cerr << "canopyctl: invoke: the payload is not valid JSON: " << payload << "\n";
    return exit_usage;
  }
  auto timeout = std::chrono::milliseconds(static_cast<std::int64_t>(timeout_secs * 1000));
  auto reply = client.invoke(module, method, payload, timeout);
  if (!reply) return report(client, reply.err());
  std::cout << "status: " << reply->status << "\n" << pretty_json(reply->payload_json) << "\n";
  return reply->status >= 200 && reply->status < 300 ? exit_ok : exit_failed;
}

int cmd_twin(control_client& client, const std::string& module) {
  auto twin = client.twin(module);
  if (!twin) return report(client, twin.err());
  nlohmann::ordered_json doc{{"desired", json_or_string(twin->desired_json)},
                             {"reported", json_or_string(twin->reported_json)}};
  std::cout << doc.dump(2) << "\n";
  return exit_ok;
}

int cmd_monitor(control_client& client, std::size_t count, double timeout_secs, std::size_t backlog) {
  stream_options options;
  options.max_count = count;
  options.max_duration = std::chrono::milliseconds(static_cast<std::int64_t>(timeout_secs * 1000));
  options.on_dropped = [](std::uint64_t n) {
    std::cerr << "canopyctl: " << n << " messages dropped (output too slow)\n";
  };
  auto seen = client.monitor(0, backlog, [](const upstream_record& rec) {
    std::cout << format_record(rec) << "\n" << std::flush;
    return static_cast<bool>(std::cout);
  }, options);
  if (!seen) return report(client, seen.err());
  if (count != 0 && *seen < count && !client.interrupted() && std::cout) {
    std::cerr << "canopyctl: monitor: " << *seen << " of " << count << " messages within " << timeout_secs
              << " s\n";
    return exit_failed;
  }
  return exit_ok;
}

int cmd_metrics(control_client& client, bool as_json) {
  auto m = client.metrics();
  if (!m) return report(client, m.err());
  if (as_json) {
    // Keys are node_metrics' field names (runtime/metrics.hpp).
    auto queues = nlohmann::ordered_json::array();
    for (const auto& q : m->queues) {
      queues.push_back({{"endpoint", q.endpoint},
                        {"priority", q.priority},
                        {"length", q.length},
                        {"checkpoint", q.checkpoint},
                        {"last_seq", q.last_seq}});
    }
    nlohmann::ordered_json out{{"received", m->received},
                               {"sent", m->sent},
                               {"dropped_no_route", m->dropped_no_route},
                               {"dropped_ttl_expiry", m->dropped_ttl_expiry},
                               {"dropped_store_full", m->dropped_store_full},
                               {"redelivered", m->redelivered},
                               {"queues", queues},
                               {"store_bytes", m->store_bytes},
                               {"store_free_bytes", m->store_free_bytes},
                               {"store_limit_bytes", m->store_limit_bytes},
                               {"commits", m->commits},
                               {"commit_p50_us", m->commit_p50_us},
                               {"commit_p99_us", m->commit_p99_us},
                               {"commit_max_us", m->commit_max_us}};
    std::cout << out.dump(2) << "\n";
    return exit_ok;
  }
  auto dropped = m->dropped_no_route + m->dropped_ttl_expiry + m->dropped_store_full;
  std::cout << "received      " << m->received << "\n"
            << "sent          " << m->sent << "\n"
            << "dropped       " << dropped << " (no_route " << m->dropped_no_route << ", ttl_expiry "
            << m->dropped_ttl_expiry << ", store_full " << m->dropped_store_full << ")\n"
            << "redelivered   " << m->redelivered << "\n"
            << "store         " << human_bytes(m->store_bytes) << " (" << human_bytes(m->store_free_bytes)
            << " free), limit "
            << (m->store_limit_bytes > 0 ? human_bytes(m->store_limit_bytes) : std::string("none")) << "\n"
            << "commits       " << m->commits << " (latency p50 " << human_micros(m->commit_p50_us) << ", p99 "
            << human_micros(m->commit_p99_us) << ", max " << human_micros(m->commit_max_us) << ")\n\n";
  if (m->queues.empty()) {
    std::cout << "no queues\n";
    return exit_ok;
  }
  std::vector<std::vector<std::string>> table{{"ENDPOINT", "PRIORITY", "LENGTH", "CHECKPOINT"}};
  for (const auto& q : m->queues) {
    table.push_back({q.endpoint, std::to_string(q.priority), std::to_string(q.length), std::to_string(q.checkpoint)});
  }
  print_table(table);
  return exit_ok;
}

/// What `canopyctl send` puts in every message besides the body, and who sends it.
struct send_template {
  std::string device;
  std::string module;
  std::string output;
  std::vector<std::pair<std::string, std::string>> properties;
  std::string content_type;
  std::string content_encoding;
  std::string message_id;

  message build(std::string_view body) const {
    message_builder b;
    b.body(body);
    for (const auto& [key, value] : properties) b.property(key, value);
    if (!content_type.empty()) b.content_type(content_type);
    if (!content_encoding.empty()) b.content_encoding(content_encoding);
    if (!message_id.empty()) b.message_id(message_id);
    return b.build();
  }
};

int cmd_send(control_client& client, const send_template& t, const std::string& body) {
  auto targets = client.send(t.device, t.module, t.output, t.build(body));
  if (!targets) return report(client, targets.err());
  if (*targets == 0) {
    std::cout << "matched no route\n";
  } else {
    std::cout << "queued to " << *targets << " endpoint(s)\n";
  }
  return exit_ok;
}

/// What the stdin reader of `send --stdin` shares with main (it may outlive it).
struct stdin_feed {
  explicit stdin_feed(std::size_t window) : feed(window) {}
  send_feed feed;
  std::atomic<bool> read_failed{false};
};

/// The reader thread of `send --stdin`: one message per line (a trailing CR is
/// dropped; a last line without a newline counts), pushed into the feed, which
/// blocks while the window is full. Ends at EOF, a read error, or when the stream ended.
void read_stdin_lines(const std::shared_ptr<stdin_feed>& in, const send_template& t) {
  std::string pending;
  char buf[65536];
  auto push_line = [&](std::string_view line) {
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    return in->feed.push(send_request{t.device, t.module, t.output, t.build(line)});
  };
  for (;;) {
    auto n = ::read(STDIN_FILENO, buf, sizeof(buf));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      std::cerr << "canopyctl: send: cannot read stdin: " << std::strerror(errno) << "\n";
      in->read_failed = true;
      break;
    }
    if (n == 0) {
      if (!pending.empty() && !push_line(pending)) return;
      break;
    }
    pending.append(buf, static_cast<std::size_t>(n));
    std::size_t start = 0;
    for (auto nl = pending.find('\n', start); nl != std::string::npos; nl = pending.find('\n', start)) {
      if (!push_line(std::string_view(pending).substr(start, nl - start))) return;
      start = nl + 1;
    }
    pending.erase(0, start);
  }
  in->feed.close();
}

/// `send --stdin`: prints "<n> ok <targets>" or "<n> error <text>" per input
/// line n (from 1), in input order, each flushed once it and every earlier one
/// were answered.
int cmd_send_stdin(control_client& client, const send_template& t, std::size_t window) {
  auto in = std::make_shared<stdin_feed>(window);
  std::thread reader([in, t] { read_stdin_lines(in, t); });
  std::size_t acknowledged = 0;
  bool any_failed = false;
  auto streamed = client.send_stream(in->feed, [&](std::size_t index, const expected<std::uint64_t>& targets) {
    if (targets) {
      std::cout << index + 1 << " ok " << *targets << "\n";
    } else {
      any_failed = true;
      std::cout << index + 1 << " error " << one_line(targets.err().message) << "\n";
    }
    std::cout << std::flush;
    ++acknowledged;
  });
  if (streamed) {
    reader.join();
    return any_failed || in->read_failed ? exit_failed : exit_ok;
  }
  // The reader may be blocked reading stdin: leave it (it only touches `in`, and
  // gets refusals from the ended feed); the process ends now.
  reader.detach();
  std::cerr << streamed.err().message << "\n";
  if (client.interrupted()) {
    std::cerr << "canopyctl: send: interrupted after " << acknowledged << " acknowledged\n";
    return exit_interrupted;
  }
  if (streamed.err().code == errc::unavailable) {
    std::cerr << "canopyctl: send: connection lost after " << acknowledged << " acknowledged\n";
  }
  return exit_failed;
}

/// "key=value" → (key, value); the key must not be empty.
std::optional<std::pair<std::string, std::string>> parse_property(const std::string& text) {
  auto eq = text.find('=');
  if (eq == std::string::npos || eq == 0) return std::nullopt;
  return std::make_pair(text.substr(0, eq), text.substr(eq + 1));
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"canopyctl: the local command line of a canopy node"};
  app.require_subcommand(1);
  app.fallthrough();

  std::string socket = canopy::default_control_socket;
  app.add_option("--socket", socket, "the node's control socket")->envname("CANOPY_SOCKET")->capture_default_str();

  bool list_json = false;
  auto* list = app.add_subcommand("list", "list the modules and their state");
  list->add_flag("--json", list_json, "machine-readable output");

  std::string module;
  std::size_t tail = 100;
  bool follow = false;
  auto* logs = app.add_subcommand("logs", "print a module's log lines");
  logs->add_option("MODULE", module, "module name")->required();
  logs->add_option("--tail", tail, "how many recent lines")->capture_default_str();
  logs->add_flag("-f,--follow", follow, "keep printing new lines until Ctrl-C");

  auto* restart = app.add_subcommand("restart", "restart a module now");
  restart->add_option("MODULE", module, "module name")->required();

  std::string file;
  auto* deploy = app.add_subcommand("deploy", "validate and apply a deployment manifest");
  deploy->add_option("FILE", file, "manifest file")->required();

  std::string method;
  std::string payload = "{}";
  double invoke_timeout = 30;
  auto* invoke = app.add_subcommand("invoke", "call a module's direct method");
  invoke->add_option("MODULE", module, "module name")->required();
  invoke->add_option("METHOD", method, "method name")->required();
  invoke->add_option("JSON", payload, "payload (JSON)")->capture_default_str();
  invoke->add_option("--timeout", invoke_timeout, "seconds to wait for the answer")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();

  auto* twin = app.add_subcommand("twin", "print a module's twin");
  twin->add_option("MODULE", module, "module name")->required();

  std::size_t count = 0;
  double monitor_timeout = 0;
  std::size_t backlog = 0;
  auto* monitor = app.add_subcommand("monitor", "print messages sent to $upstream until Ctrl-C");
  monitor->add_option("--count", count, "stop after N messages (0: no limit)");
  monitor->add_option("--timeout", monitor_timeout, "stop after SECS seconds (0: no limit)")
      ->check(CLI::NonNegativeNumber);
  monitor->add_option("--backlog", backlog, "first print up to N stored messages");

  bool metrics_json = false;
  auto* metrics = app.add_subcommand("metrics", "print the router's counters, the store and its queues");
  metrics->add_flag("--json", metrics_json, "machine-readable output (keys as in node_metrics)");

  send_template tmpl;
  std::string body;
  bool from_stdin = false;
  std::vector<std::string> properties;
  std::size_t window = 64;
  auto* send = app.add_subcommand("send", "route a message as a module output or a leaf device would send it");
  auto* device_opt = send->add_option("--device", tmpl.device, "send as leaf device ID (its telemetry)");
  auto* module_opt = send->add_option("--module", tmpl.module, "send as module M (needs --output)");
  auto* output_opt = send->add_option("--output", tmpl.output, "the module's output O");
  device_opt->excludes(module_opt);
  module_opt->needs(output_opt);
  output_opt->needs(module_opt);
  auto* body_opt = send->add_option("--body", body, "the message body");
  auto* stdin_opt = send->add_flag("--stdin", from_stdin,
                                   "one message per line of stdin; prints \"<line> ok <endpoints>\" or "
                                   "\"<line> error <text>\" for each, in order");
  body_opt->excludes(stdin_opt);
  send->add_option("--property", properties, "application property key=value (repeatable)")
      ->allow_extra_args(false);
  send->add_option("--content-type", tmpl.content_type, "contentType system property");
  send->add_option("--content-encoding", tmpl.content_encoding, "contentEncoding system property");
  send->add_option("--message-id", tmpl.message_id, "messageId system property (every message with --stdin)");
  send->add_option("--window", window, "with --stdin: most messages in flight at once")
      ->check(CLI::Range(std::size_t{1}, std::size_t{100000}))
      ->capture_default_str();

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? exit_ok : exit_usage;
  }

  if (*send) {
    if (tmpl.device.empty() && tmpl.module.empty()) {
      std::cerr << "canopyctl: send: give the sender: --device ID, or --module M --output O\n";
      return exit_usage;
    }
    if (!tmpl.module.empty() && tmpl.output.empty()) {
      std::cerr << "canopyctl: send: --output: empty; a module sends on a named output\n";
      return exit_usage;
    }
    for (const auto& text : properties) {
      auto kv = parse_property(text);
      if (!kv) {
        std::cerr << "canopyctl: send: --property: expected key=value, got '" << text << "'\n";
        return exit_usage;
      }
      tmpl.properties.push_back(std::move(*kv));
    }
  }

  auto connected = control_client::connect(socket);
  if (!connected) {
    std::cerr << connected.err().message << "\n";
    return exit_no_connection;
  }
  auto& client = *connected;
  client.interrupt_on(SIGINT);
  client.interrupt_on(SIGTERM);

  if (*list) return cmd_list(client, list_json);
  if (*logs) return cmd_logs(client, module, tail, follow);
  if (*restart) return cmd_restart(client, module);
  if (*deploy) return cmd_deploy(client, file);
  if (*invoke) return cmd_invoke(client, module, method, payload, invoke_timeout);
  if (*twin) return cmd_twin(client, module);
  if (*monitor) return cmd_monitor(client, count, monitor_timeout, backlog);
  if (*metrics) return cmd_metrics(client, metrics_json);
  if (*send) return from_stdin ? cmd_send_stdin(client, tmpl, window) : cmd_send(client, tmpl, body);
  return exit_usage;
}
