#include "gateway/prometheus.hpp"

#include <array>
#include <charconv>
#include <cmath>
#include <initializer_list>
#include <string_view>
#include <type_traits>
#include <utility>

namespace canopy {

namespace {

using label = std::pair<std::string_view, std::string_view>;

/// Appends `text` with backslash and line feed escaped, and the double quote
/// too if `in_quotes` (label values need it; HELP text does not).
void append_escaped(std::string& out, std::string_view text, bool in_quotes) {
  for (char c : text) {
    if (c == '\\')
      out += "\\\\";
    else if (c == '\n')
      out += "\\n";
    else if (c == '"' && in_quotes)
      out += "\\\"";
    else
      out.push_back(c);
  }
}

void append_number(std::string& out, double v) {
  if (std::isnan(v)) {
    out += "NaN";
  } else if (std::isinf(v)) {
    out += v > 0 ? "+Inf" : "-Inf";
  } else {
    std::array<char, 32> buf{};
    auto [end, ec] = std::to_chars(buf.data(), buf.data() + buf.size(), v);
    out.append(buf.data(), ec == std::errc{} ? end : buf.data());
  }
}

template <class Int>
void append_integer(std::string& out, Int v) {
  std::array<char, 24> buf{};
  auto [end, ec] = std::to_chars(buf.data(), buf.data() + buf.size(), v);
  out.append(buf.data(), ec == std::errc{} ? end : buf.data());
}

double seconds_from_us(std::int64_t us) {
  return static_cast<double>(us) / 1e6;
}
double seconds_from_ms(std::int64_t ms) {
  return static_cast<double>(ms) / 1e3;
}

/// Writes families one after another: family() starts one (HELP + TYPE),
/// sample() adds its lines, each with the node's common labels last.
class writer {
 public:
  explicit writer(const metrics_snapshot& s) : snapshot_(s) {}

  void family(std::string_view name, std::string_view type, std::string_view help) {
    name_ = name;
    out_ += "# HELP ";
    out_ += name;
    out_ += ' ';
    append_escaped(out_, help, false);
    out_ += "\n# TYPE ";
    out_ += name;
    out_ += ' ';
    out_ += type;
    out_ += '\n';
  }

  /// A sample of the current family; `suffix` for a summary's _sum / _count.
  template <class Value>
  void sample(std::initializer_list<label> labels, Value value, std::string_view suffix = {}) {
    out_ += name_;
    out_ += suffix;
    out_ += '{';
    bool first = true;
    auto add = [&](std::string_view k, std::string_view v) {
      if (!first)
        out_ += ',';
      first = false;
      out_ += k;
      out_ += "=\"";
      append_escaped(out_, v, true);
      out_ += '"';
    };
    for (const auto& [k, v] : labels)
      add(k, v);
    add("edge_device", snapshot_.device_id);
    if (!snapshot_.instance_number.empty())
      add("instance_number", snapshot_.instance_number);
    out_ += "} ";
    if constexpr (std::is_floating_point_v<Value>) {
      append_number(out_, value);
    } else {
      append_integer(out_, value);
    }
    out_ += '\n';
  }

  /// A family of one sample, labelled with the common labels only.
  template <class Value>
  void single(std::string_view name, std::string_view type, std::string_view help, Value value) {
    family(name, type, help);
    sample({}, value);
  }

  std::string take() { return std::move(out_); }

 private:
  const metrics_snapshot& snapshot_;
  std::string out_;
  std::string_view name_;
};

constexpr std::array<std::string_view, 5> known_module_states = {"running", "stopped", "failed",
                                                                 "backoff", "unhealthy"};

}  // namespace

std::string render_prometheus(const metrics_snapshot& s) {
  writer w(s);
  const auto& m = s.messages;

  // --- Messages (edgeHub) ---
  w.single("edgehub_messages_received_total", "counter",
           "Total number of messages received from clients", m.received);
  w.single("edgehub_messages_sent_total", "counter",
           "Total number of messages sent to clients or upstream (deliveries acknowledged by their "
           "receiver)",
           m.sent);
  w.family("edgehub_messages_dropped_total", "counter",
           "Total number of messages removed because of reason (no_route: matched no route; "
           "ttl_expiry: expired "
           "before delivery, once per endpoint)");
  w.sample({{"reason", "no_route"}}, m.dropped_no_route);
  w.sample({{"reason", "ttl_expiry"}}, m.dropped_ttl_expiry);
  w.family("edgehub_messages_unack_total", "counter",
           "Total number of messages refused (not acknowledged) because the store was full");
  w.sample({{"reason", "storage_failure"}}, m.dropped_store_full);
  w.single("canopy_messages_redelivered_total", "counter",
           "Messages delivered again after a restart (possible duplicates)", m.redelivered);

  w.family("edgehub_queue_length", "gauge",
           "Current length of the queue of an endpoint for a given priority");
  for (const auto& q : m.queues) {
    auto priority = std::to_string(q.priority);
    w.sample({{"endpoint", q.endpoint}, {"priority", priority}}, q.length);
  }
  w.family("canopy_queue_checkpoint", "gauge",
           "Sequence number of the last message of the queue acknowledged by its receiver");
  for (const auto& q : m.queues) {
    auto priority = std::to_string(q.priority);
    w.sample({{"endpoint", q.endpoint}, {"priority", priority}}, q.checkpoint);
  }

  w.single("edgehub_connected_clients", "gauge",
           "Current number of clients (modules, leaf devices) connected", s.connected_clients);

  // --- Message store ---
  w.single("canopy_store_size_bytes", "gauge",
           "Size of the message store file (without its write-ahead log)", m.store_bytes);
  w.single("canopy_store_free_bytes", "gauge",
           "Free pages in the message store file, reused before it grows", m.store_free_bytes);
  w.family("canopy_store_limit_bytes", "gauge", "Configured size limit of the message store");
  if (m.store_limit_bytes > 0)
    w.sample({}, m.store_limit_bytes);
  w.single("canopy_store_commits_total", "counter",
           "Group commits (transactions with fsync) of the message store", m.commits);
  w.single("canopy_store_commit_p50_seconds", "gauge",
           "Median latency of the recent message store commits", seconds_from_us(m.commit_p50_us));
  w.single("canopy_store_commit_p99_seconds", "gauge",
           "99th percentile latency of the recent message store commits",
           seconds_from_us(m.commit_p99_us));
  w.single("canopy_store_commit_max_seconds", "gauge",
           "Longest of the recent message store commits", seconds_from_us(m.commit_max_us));

  // --- Modules (edgeAgent) ---
  w.family("canopy_module_restarts_total", "counter", "Restarts of the module by its supervisor");
  for (const auto& mod : s.modules) {
    w.sample({{"module_name", mod.name}, {"module_version", mod.version}},
             static_cast<std::uint64_t>(mod.restart_count < 0 ? 0 : mod.restart_count));
  }
  w.family("canopy_module_status", "gauge",
           "Runtime status of the module: 1 for its current status, 0 otherwise");
  for (const auto& mod : s.modules) {
    bool known = false;
    for (auto state : known_module_states) {
      known = known || state == mod.status;
      w.sample({{"module_name", mod.name}, {"status", state}}, state == mod.status ? 1 : 0);
    }
    if (!known && !mod.status.empty())
      w.sample({{"module_name", mod.name}, {"status", mod.status}}, 1);
  }
  w.family("canopy_module_last_start_timestamp_seconds", "gauge",
           "When the module last started (Unix time)");
  for (const auto& mod : s.modules) {
    if (mod.last_start_ms > 0)
      w.sample({{"module_name", mod.name}}, seconds_from_ms(mod.last_start_ms));
  }
  w.family("canopy_module_last_exit_timestamp_seconds", "gauge",
           "When the module last exited (Unix time)");
  for (const auto& mod : s.modules) {
    if (mod.last_exit_ms > 0)
      w.sample({{"module_name", mod.name}}, seconds_from_ms(mod.last_exit_ms));
  }

  // --- Links ---
  w.family("edgehub_offline_count_total", "counter",
           "Total number of times the link to the parent went down");
  for (const auto& l : s.links) {
    if (l.role == "parent")
      w.sample({{"peer", l.peer}}, l.disconnects);
  }
  w.family("edgehub_offline_duration_seconds", "summary",
           "Time the link to the parent was down (_sum: total seconds, until now; _count: times it "
           "went down)");
  for (const auto& l : s.links) {
    if (l.role != "parent")
      continue;
    w.sample({{"peer", l.peer}}, seconds_from_ms(l.offline_ms_total), "_sum");
    w.sample({{"peer", l.peer}}, l.disconnects, "_count");
  }
  w.family("canopy_link_up", "gauge", "1 if the link is connected and authenticated, else 0");
  for (const auto& l : s.links)
    w.sample({{"peer", l.peer}, {"role", l.role}}, l.up ? 1 : 0);
  w.family("canopy_link_rtt_seconds", "gauge", "Last measured round-trip time of the link");
  for (const auto& l : s.links) {
    if (l.rtt_us > 0)
      w.sample({{"peer", l.peer}, {"role", l.role}}, seconds_from_us(l.rtt_us));
  }
  w.family("canopy_link_connects_total", "counter", "Successful connections of the link");
  for (const auto& l : s.links)
    w.sample({{"peer", l.peer}, {"role", l.role}}, l.connects);
  w.family("canopy_link_disconnects_total", "counter", "Connections of the link that were lost");
  for (const auto& l : s.links)
    w.sample({{"peer", l.peer}, {"role", l.role}}, l.disconnects);
  w.family("canopy_link_offline_seconds_total", "counter", "Time the link spent down, until now");
  for (const auto& l : s.links)
    w.sample({{"peer", l.peer}, {"role", l.role}}, seconds_from_ms(l.offline_ms_total));
  w.family("canopy_link_last_change_timestamp_seconds", "gauge",
           "When the link last went up or down (Unix time)");
  for (const auto& l : s.links) {
    if (l.last_change_ms > 0)
      w.sample({{"peer", l.peer}, {"role", l.role}}, seconds_from_ms(l.last_change_ms));
  }
  return w.take();
}

}  // namespace canopy
