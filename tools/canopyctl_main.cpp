// canopyctl — the local command line of a canopy node, like `iotedge`: talks to
// the node's control socket (gateway/control_server) through control_client.
//
// Exit codes: 0 ok, 1 the operation failed, 2 usage, 3 cannot connect to the
// node, 130 a one-shot command interrupted by Ctrl-C (streams end with 0; `send
// --stdin`, whose unanswered messages are unaccounted for, ends with 130).
// `canopyctl certs ...` works on files only and needs no running node.
// `canopyctl device|deployment|status|telemetry`, `twin show|patch`, `invoke
// --device` and `monitor --hub` talk to the hub's REST API (gateway/hub_client;
// --hub, --hub-id, --ca, --token-file) instead; 3 then means the hub is unreachable.
#include "gateway/control_client.hpp"

#include "gateway/certs.hpp"
#include "gateway/hub_client.hpp"

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <chrono>
#include <cerrno>
#include <csignal>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iomanip>
#include <iostream>
#include <iterator>
#include <map>
#include <memory>
#include <optional>
#include <set>
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
    auto links = nlohmann::ordered_json::array();
    for (const auto& l : m->links) {
      links.push_back({{"peer", l.peer},
                       {"role", l.role},
                       {"up", l.up},
                       {"rtt_us", l.rtt_us},
                       {"connects", l.connects},
                       {"disconnects", l.disconnects},
                       {"offline_ms_total", l.offline_ms_total},
                       {"last_change_ms", l.last_change_ms},
                       {"last_error", l.last_error}});
    }
    out["links"] = links;
    out["refused_messages"] = m->refused_messages;
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
  if (!m->links.empty()) {
    std::vector<std::vector<std::string>> links{{"LINK", "PEER", "STATE", "RTT", "CONNECTS", "OFFLINE", "LAST ERROR"}};
    for (const auto& l : m->links)
      links.push_back({l.role, l.peer, l.up ? "up" : "down", l.rtt_us > 0 ? human_micros(l.rtt_us) : "-",
                       std::to_string(l.connects), human_duration(l.offline_ms_total), l.last_error});
    print_table(links);
    if (m->refused_messages > 0)
      std::cout << "refused (outside a child's subtree): " << m->refused_messages << "\n";
    std::cout << "\n";
  }
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

// --- certs: the fleet's X.509 identities (files only; no node needed) ----------------

/// What `canopyctl certs ca|issue|show` was given.
struct certs_cli {
  CLI::App* certs = nullptr;
  CLI::App* ca = nullptr;
  CLI::App* issue = nullptr;
  CLI::App* show = nullptr;
  // certs ca
  std::string ca_out;
  std::string ca_cn = "Canopy fleet root CA";
  int ca_days = 3650;
  bool ca_force = false;
  // certs issue
  std::string ca_dir;
  std::string id;
  std::string issue_out;
  int days = 365;
  std::vector<std::string> dns;
  std::vector<std::string> ips;
  bool force = false;
  // certs show
  std::string file;

  bool selected() const { return certs != nullptr && certs->parsed(); }
};

void add_certs_commands(CLI::App& app, certs_cli& c) {
  c.certs = app.add_subcommand("certs", "create and inspect the fleet's X.509 certificates (no node needed)");
  c.certs->require_subcommand(1);

  c.ca = c.certs->add_subcommand("ca", "create the fleet root CA: DIR/ca.crt and DIR/ca.key");
  c.ca->add_option("--out", c.ca_out, "directory to write to (created if missing)")->required();
  c.ca->add_option("--cn", c.ca_cn, "subject common name")->capture_default_str();
  c.ca->add_option("--days", c.ca_days, "validity in days")->check(CLI::Range(1, 36500))->capture_default_str();
  c.ca->add_flag("--force", c.ca_force, "replace existing files");

  c.issue = c.certs->add_subcommand("issue", "issue a node or device certificate: DIR/ID.crt and DIR/ID.key");
  c.issue->add_option("--ca-dir", c.ca_dir, "directory holding ca.crt and ca.key")->required();
  c.issue->add_option("--id", c.id, "node or device id (subject CN, SAN DNS:ID)")->required();
  c.issue->add_option("--out", c.issue_out, "directory to write to (default: --ca-dir)");
  c.issue->add_option("--days", c.days, "validity in days")->check(CLI::Range(1, 36500))->capture_default_str();
  c.issue->add_option("--dns", c.dns, "extra subjectAltName DNS name (repeatable)")->allow_extra_args(false);
  c.issue->add_option("--ip", c.ips, "subjectAltName IP address (repeatable)")->allow_extra_args(false);
  c.issue->add_flag("--force", c.force, "replace existing files");

  c.show = c.certs->add_subcommand("show", "print a certificate's subject, names, validity and thumbprint");
  c.show->add_option("FILE", c.file, "certificate file (PEM)")->required();
}

int certs_failed(const char* command, const error& err) {
  std::cerr << "canopyctl: certs " << command << ": " << err.message;
  if (err.message.rfind("refusing to overwrite", 0) == 0) std::cerr << " (--force replaces it)";
  std::cerr << "\n";
  return exit_failed;
}

std::string path_in(const std::string& dir, const std::string& name) {
  return !dir.empty() && dir.back() == '/' ? dir + name : dir + "/" + name;
}

int cmd_certs_ca(const certs_cli& c) {
  auto ca = certs::create_root_ca(c.ca_cn, std::chrono::hours(24) * c.ca_days);
  if (!ca) return certs_failed("ca", ca.err());
  auto written = certs::write_files(c.ca_out, "ca", *ca, c.ca_force);
  if (!written) return certs_failed("ca", written.err());
  auto thumbprint = certs::thumbprint_sha256(ca->cert_pem);
  std::cout << "wrote " << path_in(c.ca_out, "ca.crt") << " and " << path_in(c.ca_out, "ca.key") << " (CN \""
            << c.ca_cn << "\", SHA-256 " << (thumbprint ? *thumbprint : std::string("?")) << ")\n";
  return exit_ok;
}

int cmd_certs_issue(const certs_cli& c) {
  auto ca = certs::read_files(c.ca_dir, "ca");
  if (!ca) return certs_failed("issue", ca.err());
  auto options = certs::for_id(c.id, std::chrono::hours(24) * c.days);
  options.dns_names.insert(options.dns_names.end(), c.dns.begin(), c.dns.end());
  options.ip_addresses = c.ips;
  auto issued = certs::issue(*ca, options);
  if (!issued) return certs_failed("issue", issued.err());
  const auto& out = c.issue_out.empty() ? c.ca_dir : c.issue_out;
  auto written = certs::write_files(out, c.id, *issued, c.force);
  if (!written) return certs_failed("issue", written.err());
  if (auto ca_info = certs::inspect(ca->cert_pem); ca_info && ca_info->not_after < options.not_after) {
    std::cerr << "canopyctl: certs issue: warning: the CA expires first (" << certs::format_time(ca_info->not_after)
              << "); the certificate is unusable after that\n";
  }
  auto thumbprint = certs::thumbprint_sha256(issued->cert_pem);
  std::cout << "wrote " << path_in(out, c.id + ".crt") << " and " << path_in(out, c.id + ".key") << " (CN \"" << c.id
            << "\", SHA-256 " << (thumbprint ? *thumbprint : std::string("?")) << ")\n";
  return exit_ok;
}

int cmd_certs_show(const certs_cli& c) {
  auto pem = certs::read_file(c.file);
  if (!pem) return certs_failed("show", pem.err());
  auto info = certs::inspect(*pem);
  if (!info) return certs_failed("show", error{info.err().code, c.file + ": " + info.err().message});
  std::string names;
  for (const auto& d : info->dns_names) names += (names.empty() ? "DNS:" : ", DNS:") + d;
  for (const auto& ip : info->ip_addresses) names += (names.empty() ? "IP:" : ", IP:") + ip;
  auto now = std::chrono::system_clock::now();
  std::string state = now < info->not_before ? " (not yet valid)" : now >= info->not_after ? " (expired)" : "";
  std::cout << "subject CN      " << info->common_name << "\n"
            << "issuer CN       " << info->issuer_common_name << "\n"
            << "names           " << (names.empty() ? "(none)" : names) << "\n"
            << "CA              " << (info->is_ca ? "yes" : "no") << "\n"
            << "not before      " << certs::format_time(info->not_before) << "\n"
            << "not after       " << certs::format_time(info->not_after) << state << "\n"
            << "serial          " << info->serial_hex << "\n"
            << "SHA-256         " << info->thumbprint_sha256 << "\n";
  return exit_ok;
}

int run_certs(const certs_cli& c) {
  if (c.ca->parsed()) return cmd_certs_ca(c);
  if (c.issue->parsed()) return cmd_certs_issue(c);
  if (c.show->parsed()) return cmd_certs_show(c);
  return exit_usage;
}

// --- fleet: the hub's REST API (gateway/hub_client; no control socket) ---------------

/// What the fleet commands were given. `twin show|patch`, `invoke --device` and
/// `monitor --hub` extend the local commands of the same name.
struct fleet_cli {
  // Global options.
  CLI::Option* hub_opt = nullptr;
  std::string hub_url;
  std::string hub_id;
  std::string ca;
  std::string token_file;
  // Shared by the commands that have them.
  std::string id;
  bool as_json = false;
  std::vector<std::string> tags;
  // device ...
  CLI::App* device = nullptr;
  CLI::App* device_create = nullptr;
  CLI::App* device_list = nullptr;
  CLI::App* device_show = nullptr;
  CLI::App* device_delete = nullptr;
  CLI::App* device_tags = nullptr;
  std::string parent;
  std::string kind = "device";
  std::string auth = "x509_ca";
  std::string thumbprint;
  std::string primary_key;
  std::string secondary_key;
  std::string tags_json;
  // deployment ...
  CLI::App* deployment = nullptr;
  CLI::App* deployment_create = nullptr;
  CLI::App* deployment_list = nullptr;
  CLI::App* deployment_show = nullptr;
  CLI::App* deployment_delete = nullptr;
  std::string manifest;
  std::string target_condition;
  int priority = 0;
  // twin show|patch (under the local `twin MODULE`)
  CLI::App* twin = nullptr;
  CLI::App* twin_show = nullptr;
  CLI::App* twin_patch = nullptr;
  std::string module;
  std::string desired;
  // invoke --device (the local `invoke MODULE METHOD [JSON]` otherwise)
  CLI::App* invoke = nullptr;
  std::string invoke_device;
  std::string method;
  std::string payload;
  // c2d DEVICE BODY
  CLI::App* c2d = nullptr;
  std::string c2d_body;
  std::vector<std::string> c2d_properties;
  std::string c2d_message_id;
  // status, telemetry, monitor --hub
  CLI::App* status = nullptr;
  CLI::App* telemetry = nullptr;
  CLI::App* monitor = nullptr;
  std::string device_filter;
  std::string since;
  std::size_t limit = 100;
  std::int64_t after_seq = 0;

  bool monitor_on_hub() const {
    return monitor->parsed() && (hub_opt->count() > 0 || !device_filter.empty() || !since.empty());
  }

  /// True if the command line asks the hub rather than the local node.
  bool selected() const {
    return device->parsed() || deployment->parsed() || status->parsed() || telemetry->parsed() || c2d->parsed() ||
           twin_show->parsed() || twin_patch->parsed() || (invoke->parsed() && !invoke_device.empty()) ||
           monitor_on_hub();
  }
};

void add_fleet_commands(CLI::App& app, fleet_cli& f, CLI::App* twin, CLI::App* invoke, CLI::App* monitor) {
  f.hub_opt = app.add_option("--hub", f.hub_url,
                             "the hub's REST API for the fleet commands (env CANOPY_HUB; default "
                             "https://127.0.0.1:8443)");
  app.add_option("--hub-id", f.hub_id, "the id the hub's certificate carries (default: the URL's host)")
      ->envname("CANOPY_HUB_ID");
  app.add_option("--ca", f.ca, "the fleet CA certificate that signed the hub's")->envname("CANOPY_CA");
  app.add_option("--token-file", f.token_file, "file holding the hub API's token (or env CANOPY_TOKEN: the token)")
      ->envname("CANOPY_TOKEN_FILE");

  f.device = app.add_subcommand("device", "the hub's device registry: gateways and devices");
  f.device->require_subcommand(1);
  f.device_create = f.device->add_subcommand("create", "register a gateway or device");
  f.device_create->add_option("ID", f.id, "its id (certificate CN)")->required();
  f.device_create->add_option("--parent", f.parent, "its parent gateway (default: the hub)");
  f.device_create->add_option("--kind", f.kind, "gateway (a canopy node) or device (a leaf)")
      ->check(CLI::IsMember({"gateway", "device"}))
      ->capture_default_str();
  f.device_create
      ->add_option("--tag", f.tags, "tag key=value (repeatable; 3, true, null and \"quoted\" values are JSON)")
      ->allow_extra_args(false);
  f.device_create->add_option("--auth", f.auth, "x509_ca, x509_thumbprint or sas")
      ->check(CLI::IsMember({"x509_ca", "x509_thumbprint", "sas"}))
      ->capture_default_str();
  f.device_create->add_option("--thumbprint", f.thumbprint, "x509_thumbprint: the certificate's SHA-256 (hex)");
  f.device_create->add_option("--primary-key", f.primary_key, "sas: the primary key");
  f.device_create->add_option("--secondary-key", f.secondary_key, "sas: the secondary key");
  f.device_list = f.device->add_subcommand("list", "list the registered gateways and devices");
  f.device_list->add_flag("--json", f.as_json, "machine-readable output");
  f.device_show = f.device->add_subcommand("show", "print one gateway or device");
  f.device_show->add_option("ID", f.id, "its id")->required();
  f.device_show->add_flag("--json", f.as_json, "machine-readable output");
  f.device_delete = f.device->add_subcommand("delete", "remove a gateway (without children) or device");
  f.device_delete->add_option("ID", f.id, "its id")->required();
  f.device_tags = f.device->add_subcommand("tags", "replace a device's tags (deployments follow)");
  f.device_tags->add_option("ID", f.id, "its id")->required();
  auto* tag_opt = f.device_tags->add_option("--tag", f.tags, "tag key=value (repeatable)")->allow_extra_args(false);
  auto* doc_opt = f.device_tags->add_option("--json", f.tags_json, "all tags as one JSON object");
  tag_opt->excludes(doc_opt);

  f.deployment = app.add_subcommand("deployment", "the hub's deployments: manifests for the gateways they target");
  f.deployment->require_subcommand(1);
  f.deployment_create = f.deployment->add_subcommand("create", "store a deployment and apply it where it matches");
  f.deployment_create->add_option("ID", f.id, "its id")->required();
  f.deployment_create->add_option("--manifest", f.manifest, "the deployment manifest (JSON file)")->required();
  f.deployment_create
      ->add_option("--target-condition", f.target_condition, "which gateways, e.g. \"tags.site='plant-1'\" or '*'")
      ->required();
  f.deployment_create->add_option("--priority", f.priority, "higher wins where several match")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  f.deployment_list = f.deployment->add_subcommand("list", "list the deployments and where they stand");
  f.deployment_list->add_flag("--json", f.as_json, "machine-readable output");
  f.deployment_show = f.deployment->add_subcommand("show", "a deployment: its target condition and its gateways");
  f.deployment_show->add_option("ID", f.id, "its id")->required();
  f.deployment_show->add_flag("--json", f.as_json, "machine-readable output");
  f.deployment_delete = f.deployment->add_subcommand("delete", "remove a deployment");
  f.deployment_delete->add_option("ID", f.id, "its id")->required();

  // `twin MODULE` stays the local node's; `twin show|patch DEVICE` ask the hub.
  f.twin = twin;
  twin->get_option("MODULE")->required(false);
  f.twin_show = twin->add_subcommand("show", "print a device's or module's twin at the hub");
  f.twin_show->add_option("DEVICE", f.id, "device or gateway id")->required();
  f.twin_show->add_option("--module", f.module, "the module's twin (default: the device's)");
  f.twin_patch = twin->add_subcommand("patch", "merge a patch into a twin's desired properties at the hub");
  f.twin_patch->add_option("DEVICE", f.id, "device or gateway id")->required();
  f.twin_patch->add_option("--module", f.module, "the module's twin (default: the device's)");
  f.twin_patch->add_option("--desired", f.desired, "the patch (a JSON object; null deletes a key)")->required();

  // `invoke MODULE METHOD [JSON]` stays the local node's; with --device it asks the hub.
  f.invoke = invoke;
  invoke->get_option("MODULE")->required(false);
  invoke->get_option("METHOD")->required(false);
  invoke->add_option("--device", f.invoke_device,
                     "call a method of this device or node of the fleet (with --module: of its module), through "
                     "the hub");
  invoke->add_option("--module", f.module, "with --device: the module (or MODULE; none = the device itself)");
  invoke->add_option("--method", f.method, "with --device: the method (or METHOD)");
  invoke->add_option("--payload", f.payload, "with --device: the payload, JSON (or JSON; default {})");

  f.c2d = app.add_subcommand("c2d", "send a cloud-to-device message to a leaf device, through the hub");
  f.c2d->add_option("DEVICE", f.id, "the device (connected over MQTT to its gateway)")->required();
  f.c2d->add_option("BODY", f.c2d_body, "the message body")->required();
  f.c2d->add_option("--property", f.c2d_properties, "application property key=value (repeatable)")
      ->allow_extra_args(false);
  f.c2d->add_option("--message-id", f.c2d_message_id, "the message id (default: a random one)");

  f.status = app.add_subcommand("status", "the fleet at the hub: every node, its deployment and modules");
  f.status->add_flag("--json", f.as_json, "machine-readable output");

  f.telemetry = app.add_subcommand("telemetry", "telemetry stored at the hub, oldest first");
  f.telemetry->add_option("--device", f.device_filter, "from this device or gateway only");
  f.telemetry->add_option("--since", f.since, "enqueued since: 30s, 10m, 2h, 1d ago, or ms since the epoch");
  f.telemetry->add_option("--limit", f.limit, "at most N records")
      ->check(CLI::Range(std::size_t{1}, std::size_t{10000}))
      ->capture_default_str();
  f.telemetry->add_option("--after", f.after_seq, "only records after this seq (to page through)");
  f.telemetry->add_flag("--json", f.as_json, "machine-readable output");

  // `monitor` watches the local $upstream; with --hub (or --device/--since) the hub's telemetry.
  f.monitor = monitor;
  monitor->add_option("--device", f.device_filter, "hub: from this device or gateway only");
  monitor->add_option("--since", f.since, "hub: start with records since 10m, 2h, ... (default: now)");
}

/// `--since`: "30s", "10m", "2h", "1d" ago (as ms since the epoch), or ms since the epoch.
std::optional<std::int64_t> parse_since(const std::string& text) {
  if (text.empty()) return std::nullopt;
  std::size_t digits = 0;
  while (digits < text.size() && text[digits] >= '0' && text[digits] <= '9') ++digits;
  if (digits == 0 || digits > 15) return std::nullopt;
  auto n = std::stoll(text.substr(0, digits));
  auto unit = text.substr(digits);
  if (unit.empty()) return n;
  std::int64_t ms = unit == "s" ? 1000 : unit == "m" ? 60000 : unit == "h" ? 3600000 : unit == "d" ? 86400000 : 0;
  if (ms == 0) return std::nullopt;
  return std::max<std::int64_t>(0, now_ms() - n * ms);
}

/// A tag value from the command line: JSON numbers, true/false/null and quoted
/// strings as JSON, anything else as the string itself.
nlohmann::json tag_value(const std::string& text) {
  auto parsed = nlohmann::json::parse(text, nullptr, false);
  if (!parsed.is_discarded() && (parsed.is_primitive())) return parsed;
  return text;
}

/// "site=plant-1,line=3".
std::string tags_text(const nlohmann::json& tags) {
  std::string out;
  if (!tags.is_object()) return out;
  for (const auto& [key, value] : tags.items()) {
    if (!out.empty()) out += ",";
    out += key + "=" + (value.is_string() ? value.get<std::string>() : value.dump());
  }
  return out;
}

std::string json_text(const nlohmann::json& doc, int indent = 2) {
  return doc.dump(indent, ' ', false, nlohmann::json::error_handler_t::replace);
}

std::int64_t json_int(const nlohmann::json& doc, const char* key) {
  auto it = doc.find(key);
  return it != doc.end() && it->is_number() ? it->get<std::int64_t>() : 0;
}

std::string json_str(const nlohmann::json& doc, const char* key) {
  auto it = doc.find(key);
  return it != doc.end() && it->is_string() ? it->get<std::string>() : std::string();
}

/// "5 minutes ago", or "never" for 0.
std::string ago(std::int64_t ms) {
  if (ms <= 0) return "never";
  return human_duration(std::max<std::int64_t>(0, now_ms() - ms)) + " ago";
}

/// Prints a failed request's error and picks the exit code.
int hub_failed(const hub_client& hub, const std::string& what, const error& err) {
  std::cerr << "canopyctl: " << what << ": " << err.message;
  if (hub.last_status() == 401) std::cerr << " (the API token: --token-file FILE, CANOPY_TOKEN_FILE or CANOPY_TOKEN)";
  std::cerr << "\n";
  if (hub.interrupted()) return exit_interrupted;
  if (hub.last_status() == 0 && err.code == errc::unavailable) return exit_no_connection;
  return exit_failed;
}

/// Connects to the hub named by the global options and the environment.
int connect_hub(const fleet_cli& f, std::unique_ptr<hub_client>& out) {
  hub_client_options o;
  const char* env_url = std::getenv("CANOPY_HUB");
  o.url = f.hub_opt->count() > 0 ? f.hub_url : env_url != nullptr && *env_url != '\0' ? env_url : o.url;
  o.hub_id = f.hub_id;
  o.ca_path = f.ca;
  if (!f.token_file.empty()) {
    auto text = certs::read_file(f.token_file);
    if (!text) {
      std::cerr << "canopyctl: --token-file: " << text.err().message << "\n";
      return exit_failed;
    }
    o.token = *text;
    while (!o.token.empty() && std::isspace(static_cast<unsigned char>(o.token.back()))) o.token.pop_back();
  } else if (const char* token = std::getenv("CANOPY_TOKEN"); token != nullptr) {
    o.token = token;
  }
  auto connected = hub_client::connect(o);
  if (!connected) {
    std::cerr << "canopyctl: " << connected.err().message << "\n";
    return connected.err().code == errc::invalid_argument ? exit_usage
           : connected.err().code == errc::unavailable || connected.err().code == errc::timeout ? exit_no_connection
                                                                                              : exit_failed;
  }
  out = std::move(*connected);
  out->interrupt_on(SIGINT);
  out->interrupt_on(SIGTERM);
  return exit_ok;
}

/// `--tag k=v ...` as a tags object; false (after saying why) on a malformed one.
bool tags_from(const std::vector<std::string>& texts, nlohmann::json& tags) {
  tags = nlohmann::json::object();
  for (const auto& text : texts) {
    auto kv = parse_property(text);
    if (!kv) {
      std::cerr << "canopyctl: --tag: expected key=value, got '" << text << "'\n";
      return false;
    }
    tags[kv->first] = tag_value(kv->second);
  }
  return true;
}

void print_device(const nlohmann::json& d) {
  const auto& auth = d.value("authentication", nlohmann::json::object());
  std::string auth_type = json_str(auth, "type");
  std::cout << "id          " << json_str(d, "deviceId") << "\n"
            << "kind        " << json_str(d, "kind") << "\n"
            << "parent      " << json_str(d, "parentId") << "\n"
            << "tags        " << json_text(d.value("tags", nlohmann::json::object()), -1) << "\n"
            << "auth        " << auth_type << "\n";
  if (auth_type == "x509_thumbprint") std::cout << "thumbprint  " << json_str(auth, "thumbprint") << "\n";
  if (auth_type == "sas") {
    std::cout << "primary     " << json_str(auth, "primaryKey") << "\n";
    if (!json_str(auth, "secondaryKey").empty()) std::cout << "secondary   " << json_str(auth, "secondaryKey") << "\n";
  }
  auto last_seen = json_int(d, "lastSeenMs");
  std::cout << "created     " << iso_time(json_int(d, "createdMs")) << "\n"
            << "updated     " << iso_time(json_int(d, "updatedMs")) << "\n"
            << "last seen   " << (last_seen > 0 ? iso_time(last_seen) + " (" + ago(last_seen) + ")" : "never")
            << "\n";
}

int cmd_device(hub_client& hub, const fleet_cli& f) {
  std::string path = "/devices/" + hub_client::escape(f.id);
  if (f.device_create->parsed()) {
    nlohmann::json tags;
    if (!tags_from(f.tags, tags)) return exit_usage;
    nlohmann::json auth{{"type", f.auth}};
    if (!f.thumbprint.empty()) auth["thumbprint"] = f.thumbprint;
    if (!f.primary_key.empty()) auth["primaryKey"] = f.primary_key;
    if (!f.secondary_key.empty()) auth["secondaryKey"] = f.secondary_key;
    nlohmann::json body{{"deviceId", f.id}, {"kind", f.kind}, {"tags", tags}, {"authentication", auth}};
    if (!f.parent.empty()) body["parentId"] = f.parent;
    auto created = hub.request("POST", "/devices", body);
    if (!created) return hub_failed(hub, "device create", created.err());
    print_device(*created);
    return exit_ok;
  }
  if (f.device_list->parsed()) {
    auto list = hub.request("GET", "/devices");
    if (!list) return hub_failed(hub, "device list", list.err());
    if (f.as_json) {
      std::cout << json_text(*list) << "\n";
      return exit_ok;
    }
    std::vector<std::vector<std::string>> table{{"ID", "KIND", "PARENT", "TAGS", "LAST SEEN"}};
    for (const auto& d : *list) {
      table.push_back({json_str(d, "deviceId"), json_str(d, "kind"), json_str(d, "parentId"),
                       tags_text(d.value("tags", nlohmann::json::object())), ago(json_int(d, "lastSeenMs"))});
    }
    print_table(table);
    return exit_ok;
  }
  if (f.device_show->parsed()) {
    auto d = hub.request("GET", path);
    if (!d) return hub_failed(hub, "device show", d.err());
    if (f.as_json) {
      std::cout << json_text(*d) << "\n";
    } else {
      print_device(*d);
    }
    return exit_ok;
  }
  if (f.device_delete->parsed()) {
    auto done = hub.request("DELETE", path);
    if (!done) return hub_failed(hub, "device delete", done.err());
    std::cout << "deleted " << f.id << "\n";
    return exit_ok;
  }
  if (f.device_tags->parsed()) {
    nlohmann::json tags;
    if (!f.tags_json.empty()) {
      tags = nlohmann::json::parse(f.tags_json, nullptr, false);
      if (tags.is_discarded() || !tags.is_object()) {
        std::cerr << "canopyctl: device tags: --json: not a JSON object: " << f.tags_json << "\n";
        return exit_usage;
      }
    } else if (f.tags.empty()) {
      std::cerr << "canopyctl: device tags: give the tags: --tag key=value ... or --json DOC\n";
      return exit_usage;
    } else if (!tags_from(f.tags, tags)) {
      return exit_usage;
    }
    auto d = hub.request("PUT", path + "/tags", tags);
    if (!d) return hub_failed(hub, "device tags", d.err());
    std::cout << json_text(d->value("tags", nlohmann::json::object())) << "\n";
    return exit_ok;
  }
  return exit_usage;
}

/// "gw1, gw2" ("-" for none); failed devices with their status detail.
std::string device_names(const nlohmann::json& summary, const char* key) {
  std::string out;
  for (const auto& id : summary.value(key, nlohmann::json::array())) {
    if (!id.is_string()) continue;
    std::string name = id.get<std::string>();
    if (std::string_view(key) == "failed") {
      for (const auto& st : summary.value("statuses", nlohmann::json::array())) {
        if (json_str(st, "deviceId") == name && !json_str(st, "detail").empty()) {
          name += " (" + json_str(st, "detail") + ")";
        }
      }
    }
    out += (out.empty() ? "" : ", ") + name;
  }
  return out.empty() ? "-" : out;
}

int cmd_deployment(hub_client& hub, const fleet_cli& f) {
  std::string path = "/deployments/" + hub_client::escape(f.id);
  if (f.deployment_create->parsed()) {
    auto text = certs::read_file(f.manifest);
    if (!text) {
      std::cerr << "canopyctl: deployment create: --manifest: " << text.err().message << "\n";
      return exit_failed;
    }
    auto manifest = nlohmann::json::parse(*text, nullptr, false);
    if (manifest.is_discarded() || !manifest.is_object()) {
      std::cerr << "canopyctl: deployment create: --manifest: " << f.manifest << " is not a JSON object\n";
      return exit_failed;
    }
    nlohmann::json body{
        {"id", f.id}, {"content", manifest}, {"targetCondition", f.target_condition}, {"priority", f.priority}};
    auto created = hub.request("POST", "/deployments", body);
    if (!created) return hub_failed(hub, "deployment create", created.err());
    std::cout << "created deployment " << f.id << " (priority " << json_int(*created, "priority") << ", target "
              << json_str(*created, "targetCondition") << ")\n";
    return exit_ok;
  }
  if (f.deployment_list->parsed()) {
    auto list = hub.request("GET", "/deployments");
    if (!list) return hub_failed(hub, "deployment list", list.err());
    if (f.as_json) {
      std::cout << json_text(*list) << "\n";
      return exit_ok;
    }
    auto count = [](const nlohmann::json& s, const char* key) {
      return std::to_string(s.value(key, nlohmann::json::array()).size());
    };
    std::vector<std::vector<std::string>> table{
        {"ID", "PRIORITY", "TARGET CONDITION", "TARGETED", "APPLIED", "SUCCEEDED", "FAILED"}};
    for (const auto& s : *list) {
      table.push_back({json_str(s, "id"), std::to_string(json_int(s, "priority")), json_str(s, "targetCondition"),
                       count(s, "targeted"), count(s, "applied"), count(s, "succeeded"), count(s, "failed")});
    }
    print_table(table);
    return exit_ok;
  }
  if (f.deployment_show->parsed()) {
    auto s = hub.request("GET", path);
    if (!s) return hub_failed(hub, "deployment show", s.err());
    if (f.as_json) {
      std::cout << json_text(*s) << "\n";
      return exit_ok;
    }
    std::cout << "id                 " << json_str(*s, "id") << "\n"
              << "priority           " << json_int(*s, "priority") << "\n"
              << "target condition   " << json_str(*s, "targetCondition") << "\n"
              << "created            " << iso_time(json_int(*s, "createdMs")) << "\n"
              << "targeted           " << device_names(*s, "targeted") << "\n"
              << "applied            " << device_names(*s, "applied") << "\n"
              << "succeeded          " << device_names(*s, "succeeded") << "\n"
              << "failed             " << device_names(*s, "failed") << "\n";
    return exit_ok;
  }
  if (f.deployment_delete->parsed()) {
    auto done = hub.request("DELETE", path);
    if (!done) return hub_failed(hub, "deployment delete", done.err());
    std::cout << "deleted deployment " << f.id << "\n";
    return exit_ok;
  }
  return exit_usage;
}

int cmd_hub_twin(hub_client& hub, const fleet_cli& f) {
  std::string path = "/twins/" + hub_client::escape(f.id);
  if (!f.module.empty()) path += "/modules/" + hub_client::escape(f.module);
  if (f.twin_patch->parsed()) {
    auto patch = nlohmann::json::parse(f.desired, nullptr, false);
    if (patch.is_discarded() || !patch.is_object()) {
      std::cerr << "canopyctl: twin patch: --desired: not a JSON object: " << f.desired << "\n";
      return exit_usage;
    }
    auto twin = hub.request("PATCH", path, {{"properties", {{"desired", patch}}}});
    if (!twin) return hub_failed(hub, "twin patch", twin.err());
    std::cout << json_text(*twin) << "\n";
    return exit_ok;
  }
  auto twin = hub.request("GET", path);
  if (!twin) return hub_failed(hub, "twin show", twin.err());
  std::cout << json_text(*twin) << "\n";
  return exit_ok;
}

/// The value of positional `name` of `app`, if given.
std::string positional(CLI::App* app, const char* name) {
  auto* opt = app->get_option(name);
  return opt->count() > 0 ? opt->results().front() : std::string();
}

int cmd_hub_invoke(hub_client& hub, const fleet_cli& f, double timeout_secs) {
  std::string module = !f.module.empty() ? f.module : positional(f.invoke, "MODULE");
  std::string method = !f.method.empty() ? f.method : positional(f.invoke, "METHOD");
  std::string payload = !f.payload.empty() ? f.payload : positional(f.invoke, "JSON");
  if (payload.empty()) payload = "{}";
  if (method.empty()) {
    std::cerr << "canopyctl: invoke --device: give --method NAME (and --module M for a module's method)\n";
    return exit_usage;
  }
  auto doc = nlohmann::json::parse(payload, nullptr, false);
  if (doc.is_discarded()) {
    std::cerr << "canopyctl: invoke: the payload is not valid JSON: " << payload << "\n";
    return exit_usage;
  }
  nlohmann::json body{{"methodName", method}, {"payload", doc}, {"responseTimeoutInSeconds", timeout_secs}};
  // No module: a method of the device itself (a leaf device connected over MQTT).
  auto path = "/devices/" + hub_client::escape(f.invoke_device) +
              (module.empty() ? std::string{} : "/modules/" + hub_client::escape(module)) + "/methods";
  // The hub answers a method's timeout itself; give it a little longer.
  auto wait = std::chrono::milliseconds(static_cast<std::int64_t>(timeout_secs * 1000) + 10000);
  auto reply = hub.request("POST", path, body, wait);
  if (!reply) return hub_failed(hub, "invoke", reply.err());
  auto status = json_int(*reply, "status");
  auto answer = reply->contains("payload") ? (*reply)["payload"] : nlohmann::json();
  std::cout << "status: " << status << "\n" << (answer.is_string() ? answer.get<std::string>() : json_text(answer)) << "\n";
  return status >= 200 && status < 300 ? exit_ok : exit_failed;
}

/// `c2d DEVICE BODY [--property k=v]...`: a cloud-to-device message.
int cmd_c2d(hub_client& hub, const fleet_cli& f) {
  nlohmann::json body{{"body", f.c2d_body}};
  nlohmann::json props = nlohmann::json::object();
  for (const auto& kv : f.c2d_properties) {
    auto eq = kv.find('=');
    if (eq == std::string::npos || eq == 0) {
      std::cerr << "canopyctl: c2d: --property wants key=value, got '" << kv << "'\n";
      return exit_usage;
    }
    props[kv.substr(0, eq)] = kv.substr(eq + 1);
  }
  if (!props.empty()) body["properties"] = props;
  if (!f.c2d_message_id.empty()) body["messageId"] = f.c2d_message_id;
  auto reply = hub.request("POST", "/devices/" + hub_client::escape(f.id) + "/messages/devicebound", body,
                           std::chrono::seconds{40});
  if (!reply) return hub_failed(hub, "c2d", reply.err());
  auto status = json_int(*reply, "status");
  auto answer = reply->contains("payload") ? (*reply)["payload"] : nlohmann::json();
  std::cout << "status: " << status << "\n" << (answer.is_string() ? answer.get<std::string>() : json_text(answer)) << "\n";
  return status >= 200 && status < 300 ? exit_ok : exit_failed;
}

int cmd_status(hub_client& hub, const fleet_cli& f) {
  auto nodes = hub.request("GET", "/status");
  if (!nodes) return hub_failed(hub, "status", nodes.err());
  if (f.as_json) {
    std::cout << json_text(*nodes) << "\n";
    return exit_ok;
  }
  // Tree order: every node under its parent, indented by depth.
  std::map<std::string, std::vector<const nlohmann::json*>> children;
  std::set<std::string> ids;
  for (const auto& n : *nodes) ids.insert(json_str(n, "deviceId"));
  std::vector<const nlohmann::json*> roots;
  for (const auto& n : *nodes) {
    auto parent = json_str(n, "parentId");
    if (ids.count(parent) != 0) {
      children[parent].push_back(&n);
    } else {
      roots.push_back(&n);
    }
  }
  std::vector<std::vector<std::string>> table{
      {"NODE", "PARENT", "KIND", "CONNECTED", "LAST SEEN", "DEPLOYMENT", "STATUS", "MODULES"}};
  std::function<void(const nlohmann::json&, std::size_t)> add = [&](const nlohmann::json& n, std::size_t depth) {
    std::string modules = "-";
    const auto& rows = n.value("modules", nlohmann::json::array());
    if (json_str(n, "kind") == "gateway") {
      auto running = std::count_if(rows.begin(), rows.end(), [](const nlohmann::json& m) {
        return json_str(m, "status") == "running";
      });
      modules = std::to_string(running) + "/" + std::to_string(rows.size());
    }
    auto dash = [](std::string s) { return s.empty() ? std::string("-") : s; };
    auto id = json_str(n, "deviceId");
    table.push_back({std::string(2 * depth, ' ') + id, json_str(n, "parentId"), json_str(n, "kind"),
                     n.value("connected", false) ? "yes" : "no", ago(json_int(n, "lastSeenMs")),
                     dash(json_str(n, "deployment")), dash(json_str(n, "deploymentStatus")), modules});
    if (depth < 64) {
      for (const auto* child : children[id]) add(*child, depth + 1);
    }
  };
  for (const auto* root : roots) add(*root, 0);
  print_table(table);
  return exit_ok;
}

/// One telemetry record on one line: time, source, properties and body.
std::string format_hub_record(const nlohmann::json& r) {
  std::string source = json_str(r, "deviceId");
  for (const char* key : {"moduleId", "outputName"}) {
    if (!json_str(r, key).empty()) source += "/" + json_str(r, key);
  }
  std::string line = iso_time(json_int(r, "enqueuedMs")) + " " + source +
                     " properties=" + json_text(r.value("properties", nlohmann::json::object()), -1);
  auto body = r.value("body", nlohmann::json());
  if (body.is_object() && body.size() == 1 && body.contains("base64") && body["base64"].is_string()) {
    line += " body(base64)=" + body["base64"].get<std::string>();
  } else {
    line += " body=" + json_text(body, -1);
  }
  return line;
}

std::string telemetry_query(const fleet_cli& f, std::int64_t since, std::int64_t after, std::size_t limit) {
  std::string q = "/telemetry?limit=" + std::to_string(limit);
  if (!f.device_filter.empty()) q += "&device=" + hub_client::escape(f.device_filter);
  if (since > 0) q += "&since=" + std::to_string(since);
  if (after > 0) q += "&after=" + std::to_string(after);
  return q;
}

int cmd_telemetry(hub_client& hub, const fleet_cli& f) {
  std::int64_t since = 0;
  if (!f.since.empty()) {
    auto parsed = parse_since(f.since);
    if (!parsed) {
      std::cerr << "canopyctl: telemetry: --since: expected 30s, 10m, 2h, 1d or ms since the epoch, got '" << f.since
                << "'\n";
      return exit_usage;
    }
    since = *parsed;
  }
  auto records = hub.request("GET", telemetry_query(f, since, f.after_seq, f.limit));
  if (!records) return hub_failed(hub, "telemetry", records.err());
  if (f.as_json) {
    std::cout << json_text(*records) << "\n";
    return exit_ok;
  }
  for (const auto& r : *records) std::cout << format_hub_record(r) << "\n";
  return exit_ok;
}

/// `monitor --hub`: polls /telemetry every 500 ms and prints each new record as
/// one JSON object per line, until Ctrl-C, `count` records, or `idle_secs`
/// seconds without a new one.
int cmd_hub_monitor(hub_client& hub, const fleet_cli& f, std::size_t count, double idle_secs) {
  constexpr std::size_t page = 1000;
  std::int64_t since = now_ms();
  if (!f.since.empty()) {
    auto parsed = parse_since(f.since);
    if (!parsed) {
      std::cerr << "canopyctl: monitor: --since: expected 30s, 10m, 2h, 1d or ms since the epoch, got '" << f.since
                << "'\n";
      return exit_usage;
    }
    since = *parsed;
  }
  auto idle = std::chrono::milliseconds(static_cast<std::int64_t>(idle_secs * 1000));
  auto last_new = std::chrono::steady_clock::now();
  std::int64_t after = 0;
  std::size_t seen = 0;
  for (;;) {
    auto records = hub.request("GET", telemetry_query(f, since, after, page));
    if (!records) {
      if (hub.interrupted()) return exit_ok;
      return hub_failed(hub, "monitor", records.err());
    }
    for (const auto& r : *records) {
      std::cout << json_text(r, -1) << "\n" << std::flush;
      if (!std::cout) return exit_ok;  // stdout is gone
      after = std::max(after, json_int(r, "seq"));
      if (count != 0 && ++seen >= count) return exit_ok;
    }
    if (!records->empty()) last_new = std::chrono::steady_clock::now();
    if (records->size() >= page) continue;  // more are waiting
    if (idle.count() > 0 && std::chrono::steady_clock::now() - last_new >= idle) break;
    if (!hub.pause(std::chrono::milliseconds(500))) return exit_ok;  // Ctrl-C
  }
  if (count != 0 && seen < count) {
    std::cerr << "canopyctl: monitor: " << seen << " of " << count << " messages within " << idle_secs
              << " s of the last one\n";
    return exit_failed;
  }
  return exit_ok;
}

/// Runs the fleet command that fleet_cli::selected() found.
int run_fleet(const fleet_cli& f, double invoke_timeout, std::size_t monitor_count, double monitor_timeout) {
  std::unique_ptr<hub_client> hub;
  if (int rc = connect_hub(f, hub); rc != exit_ok) return rc;
  if (f.device->parsed()) return cmd_device(*hub, f);
  if (f.deployment->parsed()) return cmd_deployment(*hub, f);
  if (f.twin_show->parsed() || f.twin_patch->parsed()) return cmd_hub_twin(*hub, f);
  if (f.invoke->parsed()) return cmd_hub_invoke(*hub, f, invoke_timeout);
  if (f.status->parsed()) return cmd_status(*hub, f);
  if (f.c2d->parsed()) return cmd_c2d(*hub, f);
  if (f.telemetry->parsed()) return cmd_telemetry(*hub, f);
  if (f.monitor->parsed()) return cmd_hub_monitor(*hub, f, monitor_count, monitor_timeout);
  return exit_usage;
}

/// The local `twin MODULE` and `invoke MODULE METHOD` lost their required
/// positionals to the fleet forms; checks them (exit_ok if fine).
int check_local_usage(const fleet_cli& f) {
  if (f.twin->parsed() && f.twin->get_option("MODULE")->count() == 0) {
    std::cerr << "canopyctl: twin: give MODULE (this node), or show|patch DEVICE (the hub)\n";
    return exit_usage;
  }
  if (f.invoke->parsed() && (f.invoke->get_option("MODULE")->count() == 0 ||
                             f.invoke->get_option("METHOD")->count() == 0)) {
    std::cerr << "canopyctl: invoke: give MODULE METHOD (this node), or --device D [--module M] --method NAME "
                 "(the hub)\n";
    return exit_usage;
  }
  if (f.invoke->parsed() && (!f.module.empty() || !f.method.empty() || !f.payload.empty())) {
    std::cerr << "canopyctl: invoke: --module, --method and --payload go with --device\n";
    return exit_usage;
  }
  return exit_ok;
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

  certs_cli certs_options;
  add_certs_commands(app, certs_options);

  fleet_cli fleet;
  add_fleet_commands(app, fleet, twin, invoke, monitor);

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? exit_ok : exit_usage;
  }

  if (certs_options.selected()) return run_certs(certs_options);  // files only: no node, no socket
  if (fleet.selected()) return run_fleet(fleet, invoke_timeout, count, monitor_timeout);  // the hub: no socket
  if (int rc = check_local_usage(fleet); rc != exit_ok) return rc;

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
