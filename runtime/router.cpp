#include "runtime/router.hpp"

#include "runtime/send_later.hpp"

#include "runtime/atoms.hpp"
#include "runtime/clock.hpp"
#include "runtime/message_store.hpp"
#include "runtime/writer_thread.hpp"

#include <caf/all.hpp>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <deque>
#include <limits>
#include <map>
#include <optional>
#include <unordered_map>

namespace canopy {

std::string module_endpoint(const std::string& module, const std::string& input) {
  return "/modules/" + module + "/inputs/" + input;
}

expected<route_table> compile_routes(const std::vector<route_spec>& specs,
                                     std::uint32_t store_ttl_secs) {
  std::vector<table_route> out;
  out.reserve(specs.size());
  for (const auto& s : specs) {
    auto r = route::compile(s.name, s.text);
    if (!r)
      return std::move(r).err();
    table_route t{std::move(*r), s.priority, {}, {}};
    const std::uint32_t secs = s.ttl_secs != 0 ? s.ttl_secs : store_ttl_secs;
    t.ttl = secs == 0 ? message_store_options::no_expiry : std::chrono::milliseconds{std::int64_t{secs} * 1000};
    t.endpoint = t.r.sink().to_string();
    out.push_back(std::move(t));
  }
  return route_table{std::make_shared<const std::vector<table_route>>(std::move(out))};
}

namespace {

using shared_rm = std::shared_ptr<const routed_message>;

/// One message in one lane's memory window.
struct entry {
  shared_rm rm;
  std::int64_t seq = 0;        ///< 0 = not committed (yet)
  std::int64_t expiry_ms = 0;  ///< wall ms; 0 = never
  std::uint64_t token = 0;     ///< delivery token while handed over; 0 = not handed
  bool done = false;           ///< acknowledged, expired or dropped
  bool handed_before = false;  ///< handed to an earlier instance (or before a restart)
};

struct receiver;

/// A lane (endpoint, priority): its window in memory and its cursors.
struct lane {
  std::string endpoint;
  std::string input;  ///< module input name ("" for $upstream)
  int priority = 0;
  receiver* rcv = nullptr;
  std::deque<entry> mem;
  std::uint64_t front_pos = 0;   ///< stream position of mem.front()
  std::size_t handed = 0;        ///< mem[0, handed) are handed over or done
  bool spilled = false;          ///< stored rows exist beyond the window
  std::int64_t read_cursor = 0;  ///< highest seq that entered the window (refill reads after it)
  std::int64_t checkpoint = 0;   ///< persisted
  std::int64_t ack_seq = 0;      ///< highest acknowledged stored seq (the checkpoint to reach)
  /// Acknowledged seqs not yet persisted as the checkpoint, each with the
  /// number of the next message routed when it came: it may be persisted once
  /// every message routed before that is stored or done.
  std::deque<std::pair<std::int64_t, std::uint64_t>> pending_acks;
  std::int64_t mark = 0;         ///< persisted delivery mark
  std::int64_t want_mark = 0;    ///< mark to persist at the next commit
  std::int64_t restart_mark = 0; ///< the mark found at start: seqs <= it were handed before
  std::int64_t mem_bytes = 0;    ///< encoded bytes held in the window
  std::int64_t unstored_spill = 0;  ///< messages past the window not yet committed
  int passed = 0;                ///< times passed over for a more urgent lane, in a row
};

struct outstanding {
  std::uint64_t token;
  lane* l;
  std::uint64_t pos;
};

/// Whoever takes the messages of some lanes: a module (its instances) or $upstream.
struct receiver {
  std::string name;
  bool is_upstream = false;
  caf::actor instance;              ///< invalid while down
  std::deque<outstanding> out;      ///< handed over, not yet acknowledged, in token order
  std::vector<lane*> lanes;         ///< sorted by priority
  int retry_attempt = 0;
  bool retry_wait = false;
  // Acknowledgements come with high priority and so may overtake the messages
  // the instance sent before them; one is applied only once the router has
  // routed that many messages from the instance (so an input's checkpoint
  // never passes the outputs it caused).
  std::uint64_t routed = 0;          ///< messages routed from the current instance
  std::uint64_t held_token = 0;      ///< an acknowledgement waiting for them
  std::uint64_t held_sent = 0;
};

struct pending_target {
  lane* l;
  std::uint64_t pos;  ///< stream position in l->mem when in_mem
  bool in_mem;
  std::chrono::milliseconds ttl;
};

struct pending_msg {
  shared_rm rm;
  std::int64_t at_ms;  ///< wall time it entered the batch (injected clock)
  std::size_t first;  ///< index of its first target in router_state::targets
  std::size_t count;
  std::uint64_t no;   ///< its number among all messages routed (router_state::next_msg_no)
  bool waited = false;  ///< a sender waits for it (it is not answered before it is safe)
};

/// The senders of one (inject_batch): answered together once the last of
/// their messages is durable, or at the first failure.
struct batch_waiter {
  caf::typed_response_promise<std::vector<std::uint64_t>> promise;
  std::vector<std::uint64_t> targets;  ///< per message, in order
  std::size_t remaining = 0;           ///< messages not yet durable
  bool answered = false;
};

struct waiting_sender {
  caf::typed_response_promise<std::uint64_t> promise;  ///< (inject); unused for a batch member
  std::uint64_t targets;
  std::uint64_t msg_no = 0;             ///< pending_msg::no of its message
  /// Its message goes to a module input too: what the module sends while
  /// handling it must be durable before this sender hears "done".
  bool to_module = false;
  std::shared_ptr<batch_waiter> batch;  ///< set for a member of an (inject_batch)
  std::size_t index = 0;                ///< its position in the batch

  /// The message is durable (or needed no storing).
  void done() {
    if (!batch) {
      promise.deliver(targets);
      return;
    }
    batch->targets[index] = targets;
    if (--batch->remaining == 0 && !batch->answered) {
      batch->answered = true;
      batch->promise.deliver(std::move(batch->targets));
    }
  }

  /// The message was refused.
  void fail(const std::string& why) {
    if (!batch) {
      promise.deliver(caf::make_error(caf::sec::runtime_error, why));
      return;
    }
    if (!batch->answered) {
      batch->answered = true;
      batch->promise.deliver(caf::make_error(caf::sec::runtime_error, why));
    }
  }
};

/// One group commit, handed to the writer thread.
struct commit_job {
  std::vector<route_target> flat;            ///< targets of `entries` (spans into it)
  std::vector<append_entry> entries;
  std::vector<shared_rm> keep;               ///< owns what `entries` refer to
  std::vector<pending_target> written;       ///< each written target, in append order
  std::map<lane*, std::int64_t> next_seq;    ///< each lane's last seq before the append
  std::vector<waiting_sender> waiting;       ///< senders answered once it is done
  std::optional<expected<append_result>> result;  ///< set by the writer
};

struct router_state {
  router_config cfg;
  route_table routes = std::make_shared<const std::vector<table_route>>();
  std::map<std::pair<std::string, int>, std::unique_ptr<lane>> lanes;
  std::unordered_map<std::string, std::unique_ptr<receiver>> receivers;
  std::unordered_map<caf::actor_addr, receiver*> by_instance;  ///< live module instances
  std::vector<lane*> route_lanes;  ///< lane of each route of `routes` (null: not resolved yet)
  // The group-commit batch.
  std::vector<pending_msg> batch;
  std::vector<pending_target> targets;
  std::vector<waiting_sender> waiting;  ///< in message order
  std::uint64_t next_msg_no = 0;
  std::size_t waiting_to_module = 0;  ///< members of `waiting` with to_module
  bool flush_scheduled = false;   ///< a flush message (delayed or not) is on its way
  bool flush_soon = false;        ///< an immediate one is
  bool refill_wanted = false;
  bool store_failing = false;        ///< the last append failed (not "full"): retrying
  std::uint64_t dropped_failing = 0; ///< messages given up after the store kept failing
  std::uint64_t next_token = 0;
  node_metrics counters;             ///< received, sent, no_route, redelivered, mem ttl drops
  std::uint64_t store_errors_logged = 0;
  std::unique_ptr<commit_job> inflight;    ///< the commit the writer runs (or failed and will retry)
  // Last member: destroyed first, joining the writer before what it uses goes.
  /// Runs message_store::append, so that routing goes on while a commit is
  /// written (group-commit pipelining); the router touches the store only
  /// while it is idle (it waits for it first).
  std::unique_ptr<writer_thread> writer;
  static inline const char* name = "canopy.router";
};

using router_actor = caf::stateful_actor<router_state>;

std::int64_t expiry_for(std::int64_t now, std::chrono::milliseconds ttl) {
  if (ttl == message_store_options::no_expiry)
    return 0;
  if (ttl.count() > std::numeric_limits<std::int64_t>::max() - now)
    return 0;
  return now + ttl.count();
}

/// Receiver and input of a stored endpoint name; false if it names neither.
bool parse_endpoint(const std::string& ep, std::string& rcv, std::string& input) {
  if (ep == upstream_endpoint) {
    rcv = upstream_endpoint;
    input.clear();
    return true;
  }
  static constexpr std::string_view prefix = "/modules/";
  static constexpr std::string_view mid = "/inputs/";
  if (ep.compare(0, prefix.size(), prefix) != 0)
    return false;
  auto m = ep.find(mid, prefix.size());
  if (m == std::string::npos)
    return false;
  rcv = ep.substr(prefix.size(), m - prefix.size());
  input = ep.substr(m + mid.size());
  return !rcv.empty() && !input.empty();
}

receiver& receiver_of(router_state& st, const std::string& name) {
  auto& r = st.receivers[name];
  if (!r) {
    r = std::make_unique<receiver>();
    r->name = name;
    r->is_upstream = name == upstream_endpoint;
    if (r->is_upstream)
      r->instance = st.cfg.upstream;
  }
  return *r;
}

lane* lane_of(router_state& st, const std::string& endpoint, int priority) {
  auto it = st.lanes.find({endpoint, priority});
  if (it != st.lanes.end())
    return it->second.get();
  std::string rname, input;
  if (!parse_endpoint(endpoint, rname, input))
    return nullptr;
  auto& l = st.lanes[{endpoint, priority}];
  {
    l = std::make_unique<lane>();
    l->endpoint = endpoint;
    l->input = input;
    l->priority = priority;
    auto& r = receiver_of(st, rname);
    l->rcv = &r;
    r.lanes.push_back(l.get());
    std::stable_sort(r.lanes.begin(), r.lanes.end(),
                     [](const lane* a, const lane* b) { return a->priority < b->priority; });
  }
  return l.get();
}

void schedule_flush(router_actor* self, bool soon);

/// Deliveries `r` may have unacknowledged.
std::size_t window_of(const router_state& st, const receiver& r) {
  return r.is_upstream ? st.cfg.upstream_window : st.cfg.receiver_window;
}

/// Messages `l` holds in memory: a $upstream lane at least what its receiver
/// may have unacknowledged.
std::size_t lane_window_of(const router_state& st, const lane& l) {
  return l.rcv->is_upstream ? std::max(st.cfg.lane_window, st.cfg.upstream_window)
                            : st.cfg.lane_window;
}

/// True if `l` has room for a new message in its window.
bool window_has_room(const router_state& st, const lane& l) {
  return l.mem.size() < lane_window_of(st, l) && l.mem_bytes < st.cfg.lane_window_bytes;
}

/// True if a spilled lane's window has drained enough to read the next part.
bool wants_refill(const router_state& st, const lane& l) {
  return l.spilled && l.mem.size() <= lane_window_of(st, l) / 2 &&
         l.mem_bytes <= st.cfg.lane_window_bytes / 2;
}

/// The highest stored seq of `l` its receiver's free slots can take now: the
/// delivery mark to persist before handing those over.
std::int64_t mark_target(const router_state& st, const lane& l) {
  const std::size_t window = window_of(st, *l.rcv);
  std::size_t free = window > l.rcv->out.size() ? window - l.rcv->out.size() : 0;
  std::int64_t target = 0;
  for (std::size_t i = l.handed; i < l.mem.size() && free > 0; ++i) {
    const entry& e = l.mem[i];
    if (e.done || e.token != 0)
      continue;
    --free;
    target = std::max(target, e.seq);
  }
  return target;
}

/// What is still open of a message of the batch.
struct open_state {
  bool none = true;           ///< every target acknowledged (or expired): nothing to write
  bool upstream_only = true;  ///< the open ones are all deliveries to $upstream under way
};

open_state open_targets(const router_state& st, const pending_msg& pm) {
  open_state o;
  for (std::size_t k = pm.first; k < pm.first + pm.count; ++k) {
    const pending_target& t = st.targets[k];
    if (t.in_mem && t.pos < t.l->front_pos)
      continue;  // acknowledged and popped
    const entry* e = t.in_mem ? &t.l->mem[t.pos - t.l->front_pos] : nullptr;
    if (e != nullptr && e->done)
      continue;
    o.none = false;
    if (e == nullptr || e->token == 0 || !t.l->rcv->is_upstream)
      o.upstream_only = false;
  }
  return o;
}

/// The lowest number of a message routed so far that is neither stored nor
/// done (acknowledged everywhere, or expired): a checkpoint whose
/// acknowledgement came after it was routed must not move yet.
std::uint64_t first_unresolved(const router_state& st) {
  for (const auto& pm : st.batch)
    if (!open_targets(st, pm).none)
      return pm.no;
  return st.next_msg_no;
}

/// `seq` of `l` is acknowledged: its checkpoint may move once everything
/// routed before now is stored (what the module sent before acknowledging).
void note_ack(router_state& st, lane& l, std::int64_t seq) {
  if (seq <= l.ack_seq)
    return;
  l.ack_seq = seq;
  if (!l.pending_acks.empty() && l.pending_acks.back().second == st.next_msg_no)
    l.pending_acks.back().first = seq;
  else
    l.pending_acks.emplace_back(seq, st.next_msg_no);
}

/// Pops acknowledged/expired entries from the front of the window; committed
/// ones move the checkpoint to persist.
void pop_done(router_actor* self, lane& l) {
  bool popped = false;
  while (!l.mem.empty() && l.mem.front().done) {
    if (l.mem.front().seq > 0)
      note_ack(self->state, l, l.mem.front().seq);
    if (l.mem.front().rm)
      l.mem_bytes -= static_cast<std::int64_t>(l.mem.front().rm->msg.encoded_size());
    l.mem.pop_front();
    ++l.front_pos;
    if (l.handed > 0)
      --l.handed;
    popped = true;
  }
  if (!popped)
    return;
  if (l.ack_seq > l.checkpoint)
    schedule_flush(self, false);
  if (wants_refill(self->state, l)) {
    self->state.refill_wanted = true;
    schedule_flush(self, true);
  }
}

/// The next entry of `l` to hand over, or null; skips (and counts) expired ones.
/// A stored entry beyond the persisted delivery mark must wait for the mark:
/// then `*blocked` is set (the entry is returned all the same, so that the
/// lane keeps its place in the priority order).
entry* next_entry(router_actor* self, lane& l, std::int64_t now, bool* blocked) {
  *blocked = false;
  auto& st = self->state;
  while (l.handed < l.mem.size()) {
    entry& e = l.mem[l.handed];
    if (e.done || e.token != 0) {
      ++l.handed;
      continue;
    }
    if (e.expiry_ms != 0 && e.expiry_ms <= now) {
      e.done = true;
      ++st.counters.dropped_ttl_expiry;
      ++l.handed;
      continue;
    }
    if (e.seq > 0 && e.seq > l.mark) {
      // Persist a mark covering what can be handed over now, first.
      l.want_mark = std::max(l.want_mark, mark_target(st, l));
      schedule_flush(self, true);
      *blocked = true;
    }
    return &e;
  }
  return nullptr;
}

/// Hands over messages to `r` while its window has room, most urgent lane first
/// (with the anti-starvation rule).
void pump(router_actor* self, receiver& r, std::int64_t now_ms = -1) {
  auto& st = self->state;
  if (!r.instance || r.retry_wait)
    return;
  const std::int64_t now = now_ms >= 0 ? now_ms : st.cfg.clk->wall_ms();
  while (r.out.size() < window_of(st, r)) {
    lane* chosen = nullptr;
    entry* chosen_e = nullptr;
    bool chosen_blocked = false;
    for (lane* l : r.lanes) {
      bool blocked = false;
      entry* e = next_entry(self, *l, now, &blocked);
      if (e == nullptr)
        continue;
      if (chosen == nullptr) {
        chosen = l;
        chosen_e = e;
        chosen_blocked = blocked;
        continue;
      }
      // A starved lane goes first; among equals (same priority, or both
      // starved) the one passed over more often.
      const bool l_starved = l->passed >= st.cfg.starvation_limit;
      const bool c_starved = chosen->passed >= st.cfg.starvation_limit;
      bool better;
      if (l_starved != c_starved)
        better = l_starved;
      else if (l_starved || l->priority == chosen->priority)
        better = l->passed > chosen->passed || (l->passed == chosen->passed && l->priority < chosen->priority);
      else
        better = l->priority < chosen->priority;
      if (better) {
        chosen = l;
        chosen_e = e;
        chosen_blocked = blocked;
      }
    }
    // Nothing to hand over, or the lane whose turn it is waits for its mark
    // (the flush that writes it pumps again).
    if (chosen == nullptr || chosen_blocked)
      break;
    for (lane* l : r.lanes)
      if (l != chosen && l->handed < l->mem.size())
        ++l->passed;
    chosen->passed = 0;
    entry& e = *chosen_e;
    e.token = ++st.next_token;
    if (e.handed_before || (e.seq > 0 && e.seq <= chosen->restart_mark))
      ++st.counters.redelivered;
    r.out.push_back({e.token, chosen, chosen->front_pos + chosen->handed});
    ++chosen->handed;
    if (r.is_upstream)
      self->send(r.instance, atoms::route_msg::value, *e.rm, e.token);
    else
      self->send(r.instance, atoms::input::value, chosen->input, e.rm->msg, e.token);
  }
}

/// The receiver's unacknowledged deliveries go back to their lanes.
void reset_outstanding(receiver& r) {
  for (auto& o : r.out) {
    if (o.pos < o.l->front_pos)
      continue;
    entry& e = o.l->mem[o.pos - o.l->front_pos];
    if (e.token == o.token) {
      e.token = 0;
      e.handed_before = true;
    }
  }
  r.out.clear();
  for (lane* l : r.lanes)
    l->handed = 0;
}

void log_store_error(router_actor* self, const std::string& what, const error& err) {
  auto& st = self->state;
  // Loud but bounded: the first errors, then one in a thousand.
  if (st.store_errors_logged++ < 10 || st.store_errors_logged % 1000 == 0)
    spdlog::error("router: {}: {} ({} store errors so far)", what, err.message,
                  st.store_errors_logged);
}

/// Sends `xs...` to the router itself after `delay` on the injected clock
/// (nothing happens if the router is gone by then).
template <class... Ts>
void send_later(router_actor* self, clock::duration delay, Ts... xs) {
  canopy::send_later(self, *self->state.cfg.clk, delay, xs...);
}

/// Commits again after a pause (the store failed).
void retry_later(router_actor* self) {
  self->state.refill_wanted = true;
  send_later(self, std::chrono::seconds{1}, atoms::flush::value);
}

/// Reads the next part of a spilled lane from the store into its window (in
/// chunks, so that large messages stay within the window's byte budget).
void refill(router_actor* self, lane& l) {
  auto& st = self->state;
  if (!wants_refill(st, l))
    return;
  constexpr std::size_t chunk = 100;
  while (l.spilled && window_has_room(st, l)) {
    const std::size_t want = std::min(chunk, lane_window_of(st, l) - l.mem.size());
    auto rows = st.cfg.store->read(l.endpoint, l.priority, l.read_cursor, want);
    if (!rows) {
      log_store_error(self, "reading " + l.endpoint, rows.err());
      retry_later(self);
      break;
    }
    for (auto& q : *rows) {
      l.read_cursor = q.seq;
      auto msg = q.decode();
      entry e;
      e.seq = q.seq;
      if (!msg) {
        // A stored message that no longer decodes can never be delivered: it
        // is skipped (the checkpoint moves past it) rather than blocking its lane.
        log_store_error(self, "skipping a message of " + l.endpoint, msg.err());
        e.done = true;
        l.mem.push_back(std::move(e));
        continue;
      }
      l.mem_bytes += static_cast<std::int64_t>(msg->encoded_size());
      e.rm = std::make_shared<const routed_message>(
        routed_message{std::move(*msg), q.source_device, q.source_module, q.source_output});
      e.expiry_ms = q.expiry_ms;
      e.handed_before = q.seq <= l.restart_mark;
      l.mem.push_back(std::move(e));
    }
    if (rows->size() < want && l.unstored_spill == 0)
      l.spilled = false;
    if (rows->size() < want)
      break;
  }
  // The receiver is about to get part of this window: the mark covering it is
  // written with the checkpoints of this commit.
  l.want_mark = std::max(l.want_mark, mark_target(st, l));
  pop_done(self, l);
}

/// Steps after a commit (or a flush with nothing to write): read the next
/// windows of lanes that caught up, persist checkpoints and delivery marks in
/// one transaction, and hand over what became deliverable. The store is idle.
void after_commit(router_actor* self) {
  auto& st = self->state;
  auto& store = *st.cfg.store;
  if (st.refill_wanted) {
    st.refill_wanted = false;
    for (auto& [key, l] : st.lanes)
      if (l->spilled && l->rcv->instance)
        refill(self, *l);
  }
  // A checkpoint moves only as far as acknowledgements whose module's
  // outputs (routed before them) are all stored or done.
  // (The batch is scanned only when some checkpoint waits: not on every commit.)
  const bool acks_wait = std::any_of(st.lanes.begin(), st.lanes.end(),
                                     [](const auto& kv) { return !kv.second->pending_acks.empty(); });
  const std::uint64_t resolved = acks_wait ? first_unresolved(st) : st.next_msg_no;
  std::vector<lane_ack> acks, marks;
  std::vector<std::pair<lane*, std::int64_t>> moves;
  for (auto& [key, l] : st.lanes) {
    std::int64_t movable = l->checkpoint;
    for (const auto& [seq, horizon] : l->pending_acks)
      if (horizon <= resolved)
        movable = std::max(movable, seq);
    if (movable > l->checkpoint) {
      acks.push_back({l->endpoint, l->priority, movable});
      moves.emplace_back(l.get(), movable);
    }
    if (l->want_mark > l->mark)
      marks.push_back({l->endpoint, l->priority, l->want_mark});
  }
  if (!acks.empty() || !marks.empty()) {
    if (auto r = store.ack_many(acks, marks); r) {
      for (auto& [l, movable] : moves) {
        l->checkpoint = std::max(l->checkpoint, movable);
        while (!l->pending_acks.empty() && l->pending_acks.front().first <= l->checkpoint)
          l->pending_acks.pop_front();
      }
      for (auto& [key, l] : st.lanes)
        l->mark = std::max(l->mark, l->want_mark);
    } else {
      log_store_error(self, "moving checkpoints", r.err());
      schedule_flush(self, false);  // try again with the next commit
    }
  }
  for (auto& [name, r] : st.receivers)
    pump(self, *r);
}

/// Starts writing `job` (which outlives the append) on the writer thread.
void start_append(router_state& st, commit_job& job) {
  st.writer->start([&job, store = st.cfg.store.get()] { job.result.emplace(store->append(job.entries)); });
}

/// Completes the commit in flight: waits for the writer, gives the committed
/// window entries their seqs (entries acknowledged meanwhile move the
/// checkpoint), answers its waiting senders, then after_commit(). False if the
/// store failed (not "full") and the commit is kept to be tried again.
bool finish_commit(router_actor* self) {
  auto& st = self->state;
  auto& job = *st.inflight;
  st.writer->wait();
  if (!job.result) {  // a retry
    start_append(st, job);
    st.writer->wait();
  }
  auto r = std::move(*job.result);
  job.result.reset();
  const bool give_up = st.batch.size() >= 4 * st.cfg.commit_batch;
  if (!r && r.err().code != errc::unavailable && !give_up) {
    // Keep it and try again shortly. Checkpoints wait too, so that no input's
    // checkpoint passes the outputs its module sent before acknowledging it.
    if (!st.store_failing)
      log_store_error(self, "storing " + std::to_string(job.entries.size()) + " message(s), will retry",
                      r.err());
    st.store_failing = true;
    retry_later(self);
    return false;
  }
  st.store_failing = false;
  if (r) {
    for (const auto& t : job.written) {
      const std::int64_t seq = ++job.next_seq[t.l];
      lane& l = *t.l;
      if (!t.in_mem) {
        --l.unstored_spill;  // now on disk, where refill finds it
        if (wants_refill(st, l))
          st.refill_wanted = true;
        continue;
      }
      if (t.pos < l.front_pos) {
        // Acknowledged while its commit ran (windows pop in order, so every
        // earlier entry of the lane is done too).
        note_ack(st, l, seq);
        l.read_cursor = std::max(l.read_cursor, seq);
        continue;
      }
      entry& e = l.mem[t.pos - l.front_pos];
      e.seq = seq;
      l.read_cursor = std::max(l.read_cursor, seq);
      if (e.token != 0 || e.handed_before)
        l.want_mark = std::max(l.want_mark, seq);
    }
    for (auto& w : job.waiting)
      w.done();
  } else {
    const error err = std::move(r).err();
    log_store_error(self, "storing " + std::to_string(job.entries.size()) + " message(s)", err);
    // Full (the store counted the batch as store_full), or failing for too
    // long (counted here): refused; what was not handed over yet is dropped.
    if (err.code != errc::unavailable)
      st.dropped_failing += job.entries.size();
    for (const auto& t : job.written) {
      if (!t.in_mem) {
        --t.l->unstored_spill;
        continue;
      }
      if (t.pos < t.l->front_pos)
        continue;
      entry& e = t.l->mem[t.pos - t.l->front_pos];
      if (e.token == 0 && !e.done)
        e.done = true;
    }
    for (const auto& t : job.written)
      pop_done(self, *t.l);
    for (auto& w : job.waiting)
      w.fail(err.message);
  }
  st.inflight.reset();
  after_commit(self);
  return true;
}

/// Answers, in order, the waiting senders whose messages every target has
/// acknowledged and that went to no module input: they need no commit to be
/// answered.
void answer_acknowledged(router_state& st) {
  if (st.batch.empty())
    return;
  std::size_t n = 0;
  for (; n < st.waiting.size(); ++n) {
    // One whose message a module took waits for the commit (see waiting_sender).
    if (st.waiting[n].to_module)
      break;
    const std::uint64_t i = st.waiting[n].msg_no - st.batch.front().no;  // consecutive numbers
    if (i >= st.batch.size() || !open_targets(st, st.batch[i]).none)
      break;
    st.waiting[n].done();
  }
  st.waiting.erase(st.waiting.begin(), st.waiting.begin() + static_cast<std::ptrdiff_t>(n));
}

/// How many messages at the front of the batch a timed flush commits. A
/// message waits in memory for its acknowledgement for `commit_interval`, or
/// not at all while a sender waits, except one whose every open target is a
/// delivery to $upstream under way and whose sender waits: that receiver
/// acknowledges only once the message is durable beyond this node (the
/// parent's store, or the local telemetry store), and the sender is answered
/// only then, so it may wait up to `upstream_hold` and, acknowledged in time,
/// is never written here — unless a sender waits for a message that went
/// to a module. The batch goes in order, so the first message that may still
/// wait ends the cut.
std::size_t commit_cut(const router_state& st) {
  using std::chrono::duration_cast;
  using std::chrono::milliseconds;
  if (st.cfg.commit_interval.count() == 0)
    return st.batch.size();
  const std::int64_t now = st.cfg.clk->wall_ms();
  const std::int64_t base =
    st.waiting.empty() ? duration_cast<milliseconds>(st.cfg.commit_interval).count() : 0;
  // While a sender waits for a message a module took, everything routed
  // before its answer must be durable (the module's outputs too): no holding.
  const std::int64_t hold =
    st.waiting_to_module == 0 ? duration_cast<milliseconds>(st.cfg.upstream_hold).count() : 0;
  std::size_t cut = 0;
  for (; cut < st.batch.size(); ++cut) {
    const pending_msg& pm = st.batch[cut];
    const std::int64_t age = now - pm.at_ms;
    if (age >= std::max(base, hold))
      continue;  // waited long enough whatever its targets
    const auto open = open_targets(st, pm);
    if (open.none)
      continue;  // nothing to write: costs the commit nothing
    // Only a message whose sender waits: that sender sends it again if this
    // node goes. A module's output gets no longer than any message.
    if (age < (pm.waited && open.upstream_only ? std::max(base, hold) : base))
      break;
  }
  return cut;
}

/// Group commit: hands the batch to the writer thread (what every endpoint
/// acknowledged before this point is left out) and goes on routing while it is
/// written. A commit still in flight is completed first, so commits stay in
/// order and at most one runs. Unless `all`, only messages that waited a whole
/// commit interval go (a message gets that long to be acknowledged and so
/// never written); younger ones wait for the next commit, unless a sender waits.
void flush(router_actor* self, bool all = true) {
  auto& st = self->state;
  st.flush_scheduled = false;
  st.flush_soon = false;
  if (st.inflight && !finish_commit(self))
    return;  // the store is failing: retried on its timer
  const std::size_t cut = all ? st.batch.size() : commit_cut(st);
  // The first message that stays (its senders, and those after it, wait for a
  // later commit); taken before the batch is cut.
  const std::uint64_t kept_from = cut < st.batch.size() ? st.batch[cut].no : st.next_msg_no;
  auto job = std::make_unique<commit_job>();
  job->flat.reserve(st.targets.size());
  for (std::size_t bi = 0; bi < cut; ++bi) {
    const auto& pm = st.batch[bi];
    const std::size_t before = job->flat.size();
    for (std::size_t k = pm.first; k < pm.first + pm.count; ++k) {
      const auto& t = st.targets[k];
      if (t.in_mem && (t.pos < t.l->front_pos || t.l->mem[t.pos - t.l->front_pos].done))
        continue;
      job->flat.push_back(route_target{t.l->endpoint, t.l->priority, t.ttl});
      job->written.push_back(t);
    }
    if (job->flat.size() > before) {
      job->entries.push_back(append_entry{pm.rm->msg, pm.rm->source(), {}});
      job->entries.back().targets =
        std::span<const route_target>(job->flat.data() + before, job->flat.size() - before);
      job->keep.push_back(pm.rm);
    }
  }
  if (cut == st.batch.size()) {
    st.batch.clear();
    st.targets.clear();
  } else {
    // The young rest stays, in order (its targets follow the written ones).
    const std::size_t first_kept = st.batch[cut].first;
    st.batch.erase(st.batch.begin(), st.batch.begin() + static_cast<std::ptrdiff_t>(cut));
    st.targets.erase(st.targets.begin(), st.targets.begin() + static_cast<std::ptrdiff_t>(first_kept));
    for (auto& pm : st.batch)
      pm.first -= first_kept;
    schedule_flush(self, false);
  }
  // The senders of the messages that go (or were acknowledged) are answered
  // by this commit; those of the held rest wait for a later one.
  auto split = std::find_if(st.waiting.begin(), st.waiting.end(),
                            [&](const waiting_sender& w) { return w.msg_no >= kept_from; });
  for (auto it = st.waiting.begin(); it != split; ++it)
    st.waiting_to_module -= it->to_module ? 1 : 0;
  job->waiting.assign(std::make_move_iterator(st.waiting.begin()), std::make_move_iterator(split));
  st.waiting.erase(st.waiting.begin(), split);
  if (job->entries.empty()) {
    for (auto& w : job->waiting)
      w.done();
    after_commit(self);
    return;
  }
  for (const auto& t : job->written)
    job->next_seq.emplace(t.l, st.cfg.store->last_seq(t.l->endpoint, t.l->priority));
  st.inflight = std::move(job);
  start_append(st, *st.inflight);
}

void schedule_flush(router_actor* self, bool soon) {
  auto& st = self->state;
  if (st.store_failing)  // a failing store retries on its own timer
    return;
  if (soon || st.cfg.commit_interval.count() == 0) {
    // Even if a delayed one is pending: refills and marks must not wait for it.
    if (st.flush_soon)
      return;
    st.flush_soon = true;
    st.flush_scheduled = true;
    self->send(self, atoms::flush::value);
    return;
  }
  if (st.flush_scheduled)
    return;
  st.flush_scheduled = true;
  self->delayed_send(self, st.cfg.commit_interval, atoms::flush::value);
}

/// Routes one message: finds its lanes, puts it in their windows (handing it
/// over at once where the receiver has room) and in the commit batch.
/// Returns the number of targets.
std::uint64_t enqueue(router_actor* self, routed_message&& in, waiting_sender* waiter) {
  auto& st = self->state;
  ++st.counters.received;
  const auto src = in.source();
  const std::int64_t now = st.cfg.clk->wall_ms();
  lane* found[16];
  std::chrono::milliseconds ttls[16];
  std::size_t n = 0;
  std::vector<std::pair<lane*, std::chrono::milliseconds>> more;  // past 16 targets
  if (st.route_lanes.size() != st.routes->size())
    st.route_lanes.assign(st.routes->size(), nullptr);
  for (std::size_t ri = 0; ri < st.routes->size(); ++ri) {
    const auto& tr = (*st.routes)[ri];
    if (!tr.r.matches(in.msg, src))
      continue;
    lane*& l = st.route_lanes[ri];
    if (l == nullptr)
      l = lane_of(st, tr.endpoint, tr.priority);
    if (l == nullptr)
      continue;
    // One copy per lane, even if several routes lead there.
    bool dup = std::find(found, found + n, l) != found + n;
    for (auto& m : more)
      dup = dup || m.first == l;
    if (dup)
      continue;
    if (n < 16) {
      found[n] = l;
      ttls[n] = tr.ttl;
      ++n;
    } else {
      more.emplace_back(l, tr.ttl);
    }
  }
  const std::size_t total = n + more.size();
  if (total == 0) {
    ++st.counters.dropped_no_route;
    return 0;
  }
  auto rm = std::make_shared<const routed_message>(std::move(in));
  const std::size_t first = st.targets.size();
  for (std::size_t i = 0; i < total; ++i) {
    lane& l = i < n ? *found[i] : *more[i - n].first;
    const auto ttl = i < n ? ttls[i] : more[i - n].second;
    pending_target t{&l, 0, false, ttl};
    if (!l.spilled && window_has_room(st, l)) {
      entry e;
      e.rm = rm;
      l.mem_bytes += static_cast<std::int64_t>(rm->msg.encoded_size());
      e.expiry_ms = expiry_for(now, ttl);
      t.pos = l.front_pos + l.mem.size();
      t.in_mem = true;
      l.mem.push_back(std::move(e));
    } else {
      l.spilled = true;
      ++l.unstored_spill;
    }
    st.targets.push_back(t);
  }
  const std::uint64_t no = st.next_msg_no++;
  st.batch.push_back({std::move(rm), now, first, total, no, waiter != nullptr});
  // Answered by the flush that commits this message (possibly the one below).
  if (waiter != nullptr) {
    waiter->targets = total;
    waiter->msg_no = no;
    for (std::size_t i = 0; i < total && !waiter->to_module; ++i)
      waiter->to_module = !st.targets[first + i].l->rcv->is_upstream;
    st.waiting_to_module += waiter->to_module ? 1 : 0;
    st.waiting.push_back(std::move(*waiter));
  }
  for (std::size_t i = 0; i < total; ++i) {
    const pending_target& t = st.targets[first + i];
    if (t.in_mem)
      pump(self, *t.l->rcv, now);
  }
  if (st.batch.size() >= st.cfg.commit_batch &&
      (!st.store_failing || st.batch.size() >= 4 * st.cfg.commit_batch))
    flush(self);
  else
    schedule_flush(self, false);
  return total;
}

void acknowledge(router_actor* self, receiver& r, std::uint64_t token) {
  auto& st = self->state;
  lane* last = nullptr;
  while (!r.out.empty() && r.out.front().token <= token) {
    const auto o = r.out.front();
    r.out.pop_front();
    if (o.pos >= o.l->front_pos) {
      entry& e = o.l->mem[o.pos - o.l->front_pos];
      if (e.token == o.token && !e.done) {
        e.done = true;
        ++st.counters.sent;
      }
    }
    if (o.l != last) {
      if (last != nullptr)
        pop_done(self, *last);
      last = o.l;
    }
  }
  if (last != nullptr) {
    pop_done(self, *last);
    r.retry_attempt = 0;
    answer_acknowledged(st);
  }
  pump(self, r);
}

void sweep_expired(router_actor* self) {
  auto& st = self->state;
  if (st.inflight && !finish_commit(self))
    return;  // the store is failing
  const std::int64_t now = st.cfg.clk->wall_ms();
  for (auto& [key, l] : st.lanes) {
    // The window: entries not handed over.
    for (auto& e : l->mem)
      if (!e.done && e.token == 0 && e.expiry_ms != 0 && e.expiry_ms <= now) {
        e.done = true;
        ++st.counters.dropped_ttl_expiry;
      }
    pop_done(self, *l);
  }
  // Stored rows beyond the windows (rows in a window are the router's).
  auto r = st.cfg.store->expire(100000, [&st](std::string_view ep, int prio) -> std::int64_t {
    auto it = st.lanes.find({std::string(ep), prio});
    return it == st.lanes.end() ? 0 : it->second->read_cursor;
  });
  if (!r)
    log_store_error(self, "expiring messages", r.err());
}

void arm_expire_timer(router_actor* self) {
  send_later(self, self->state.cfg.expire_interval, atoms::tick::value);
}

node_metrics metrics_of(router_actor* self) {
  auto& st = self->state;
  auto& store = *st.cfg.store;
  node_metrics m = st.counters;
  const auto& c = store.counters();
  m.dropped_ttl_expiry += static_cast<std::uint64_t>(c.dropped_ttl_expiry);
  m.dropped_store_full = static_cast<std::uint64_t>(c.dropped_store_full) + st.dropped_failing;
  m.commits = static_cast<std::uint64_t>(c.commits);
  // After the flush every undelivered message is either stored or in a window.
  for (auto& ls : store.lanes()) {
    queue_metrics q;
    q.endpoint = ls.endpoint;
    q.priority = ls.priority;
    q.length = ls.length;
    q.checkpoint = ls.checkpoint;
    q.last_seq = ls.last_seq;
    m.queues.push_back(std::move(q));
  }
  // Lanes known only in memory, and window entries never stored (handed
  // over, not yet acknowledged).
  for (auto& [key, l] : st.lanes) {
    std::int64_t unstored = 0;
    for (auto& e : l->mem)
      if (!e.done && e.seq == 0)
        ++unstored;
    auto it = std::lower_bound(m.queues.begin(), m.queues.end(), key,
                               [](const queue_metrics& q, const std::pair<std::string, int>& k) {
                                 return std::tie(q.endpoint, q.priority) < std::tie(k.first, k.second);
                               });
    if (it == m.queues.end() || it->endpoint != l->endpoint || it->priority != l->priority) {
      queue_metrics q;
      q.endpoint = l->endpoint;
      q.priority = l->priority;
      it = m.queues.insert(it, std::move(q));
    }
    it->length += unstored;
  }
  if (auto sz = store.size()) {
    m.store_bytes = sz->file_bytes;
    m.store_free_bytes = sz->free_bytes;
    m.store_limit_bytes = sz->limit_bytes;
  }
  auto lat = store.commit_latencies();
  if (!lat.empty()) {
    std::sort(lat.begin(), lat.end());
    auto at = [&](double q) {
      return lat[std::min(lat.size() - 1, static_cast<std::size_t>(q * static_cast<double>(lat.size())))]
        .count();
    };
    m.commit_p50_us = at(0.5);
    m.commit_p99_us = at(0.99);
    m.commit_max_us = lat.back().count();
  }
  return m;
}

/// An instance of module `name` is ready for input; it had sent `sent`
/// messages before it said so (all routed already: same sender, same order).
void module_up(router_actor* self, const std::string& name, caf::actor instance, std::uint64_t sent) {
  auto& st = self->state;
  auto& r = receiver_of(st, name);
  self->monitor(instance);
  if (r.instance)
    st.by_instance.erase(r.instance.address());
  r.instance = instance;
  st.by_instance[instance.address()] = &r;
  r.routed = sent;
  r.held_token = 0;
  // A receiver that announces itself (again) is ready now: a $upstream link
  // that reconnected must not wait out the backoff of its last nack.
  r.retry_wait = false;
  r.retry_attempt = 0;
  reset_outstanding(r);
  if (std::any_of(r.lanes.begin(), r.lanes.end(), [](const lane* l) { return l->spilled; })) {
    self->state.refill_wanted = true;
    schedule_flush(self, true);
  }
  pump(self, r);
}

caf::behavior router_impl(router_actor* self, router_config cfg) {
  auto& st = self->state;
  st.cfg = std::move(cfg);
  if (st.cfg.initial_routes)
    st.routes = st.cfg.initial_routes;
  {
    auto weak = caf::actor_cast<caf::weak_actor_ptr>(self->ctrl());
    st.writer = std::make_unique<writer_thread>([weak] {
      if (auto a = caf::actor_cast<caf::actor>(weak.lock()))
        caf::anon_send(a, atoms::committed::value);
    });
  }
  // Resume every stored lane from its checkpoint.
  for (auto& ls : st.cfg.store->lanes()) {
    lane* l = lane_of(st, ls.endpoint, ls.priority);
    if (l == nullptr) {
      spdlog::warn("router: stored endpoint '{}' names no module input; its messages stay until they expire",
                   ls.endpoint);
      continue;
    }
    l->checkpoint = l->ack_seq = ls.checkpoint;
    l->read_cursor = ls.checkpoint;
    l->mark = l->want_mark = ls.delivered;
    l->restart_mark = ls.delivered;
    l->spilled = ls.length > 0;
    st.refill_wanted = st.refill_wanted || l->spilled;
  }
  if (st.cfg.upstream)
    self->monitor(st.cfg.upstream);
  if (st.refill_wanted)
    schedule_flush(self, true);
  arm_expire_timer(self);
  self->set_down_handler([self](caf::down_msg& dm) {
    for (auto& [name, r] : self->state.receivers)
      if (r->instance && r->instance.address() == dm.source) {
        self->state.by_instance.erase(dm.source);
        r->instance = caf::actor{};
        r->held_token = 0;
        reset_outstanding(*r);
      }
  });
  // An orderly stop commits what is batched.
  self->set_exit_handler([self](caf::exit_msg& em) {
    flush(self);
    if (self->state.inflight)
      finish_commit(self);
    self->quit(em.reason);
  });
  return {
    [self](atoms::route_msg, routed_message& rm) {
      enqueue(self, std::move(rm), nullptr);
      // Count it for its sender, if that is a receiver (see receiver::routed).
      auto& st = self->state;
      if (st.by_instance.empty())
        return;
      auto it = st.by_instance.find(caf::actor_cast<caf::actor_addr>(self->current_sender()));
      if (it == st.by_instance.end())
        return;
      receiver& r = *it->second;
      ++r.routed;
      if (r.held_token != 0 && r.routed >= r.held_sent) {
        const auto token = r.held_token;
        r.held_token = 0;
        acknowledge(self, r, token);
      }
    },
    [self](atoms::inject, routed_message& rm) -> caf::result<std::uint64_t> {
      waiting_sender w;
      w.promise = self->make_response_promise<std::uint64_t>();
      auto rp = w.promise;
      if (enqueue(self, std::move(rm), &w) == 0)
        rp.deliver(std::uint64_t{0});
      return rp;
    },
    [self](atoms::inject, std::vector<routed_message>& batch) -> caf::result<std::vector<std::uint64_t>> {
      auto b = std::make_shared<batch_waiter>();
      b->promise = self->make_response_promise<std::vector<std::uint64_t>>();
      auto rp = b->promise;
      b->targets.assign(batch.size(), 0);
      // Counted up front, so that an early commit cannot answer half a batch.
      b->remaining = batch.size() + 1;
      for (std::size_t i = 0; i < batch.size(); ++i) {
        waiting_sender w;
        w.batch = b;
        w.index = i;
        if (enqueue(self, std::move(batch[i]), &w) == 0)
          --b->remaining;  // no route: nothing to wait for
      }
      if (--b->remaining == 0 && !b->answered) {
        b->answered = true;
        rp.deliver(std::move(b->targets));
      }
      return rp;
    },
    [self](atoms::set_routes, route_table& routes) {
      self->state.routes = std::move(routes);
      self->state.route_lanes.clear();
    },
    [self](atoms::module_up, const std::string& name, caf::actor& instance) {
      module_up(self, name, instance, 0);
    },
    [self](atoms::module_up, const std::string& name, caf::actor& instance, std::uint64_t sent) {
      module_up(self, name, instance, sent);
    },
    [self](atoms::delivered, const std::string& name, std::uint64_t token) {
      auto it = self->state.receivers.find(name);
      if (it == self->state.receivers.end())
        return;
      auto& r = *it->second;
      // Acknowledgements from an instance that was replaced are stale.
      if (!r.instance || r.instance.address() != self->current_sender())
        return;
      acknowledge(self, r, token);
    },
    [self](atoms::delivered, const std::string& name, std::uint64_t token, std::uint64_t sent) {
      auto it = self->state.receivers.find(name);
      if (it == self->state.receivers.end())
        return;
      auto& r = *it->second;
      if (!r.instance || r.instance.address() != self->current_sender())
        return;
      if (r.routed >= sent) {
        acknowledge(self, r, token);
      } else {
        r.held_token = std::max(r.held_token, token);
        r.held_sent = std::max(r.held_sent, sent);
      }
    },
    [self](atoms::nack, const std::string& name) {
      auto& st = self->state;
      auto it = st.receivers.find(name);
      if (it == st.receivers.end())
        return;
      auto& r = *it->second;
      if (!r.instance || r.instance.address() != self->current_sender() || r.retry_wait)
        return;
      reset_outstanding(r);
      // Whatever it still has from us is stale: the marker tells it where the
      // stale part ends (same sender, so it arrives after all of it).
      self->send(r.instance, atoms::resume::value);
      r.retry_wait = true;
      auto delay = st.cfg.retry_base * (std::int64_t{1} << std::min(r.retry_attempt, 20));
      delay = std::min(delay, st.cfg.retry_cap);
      ++r.retry_attempt;
      send_later(self, delay, atoms::restart::value, name);
    },
    [self](atoms::restart, const std::string& name) {
      auto it = self->state.receivers.find(name);
      if (it == self->state.receivers.end())
        return;
      it->second->retry_wait = false;
      pump(self, *it->second);
    },
    [self](atoms::flush) { flush(self, false); },
    [self](atoms::committed) {
      auto& st = self->state;
      if (!st.inflight || !st.inflight->result)
        return;  // completed already (or a retry is pending)
      if (!finish_commit(self))
        return;
      // Pipelining: a full batch waiting goes to the writer at once.
      if (st.batch.size() >= st.cfg.commit_batch)
        flush(self);
    },
    [self](atoms::tick) {
      sweep_expired(self);
      arm_expire_timer(self);
    },
    [self](atoms::stats) {
      flush(self);
      if (self->state.inflight)
        finish_commit(self);
      return metrics_of(self);
    },
  };
}

}  // namespace

caf::actor spawn_router(caf::actor_system& sys, router_config cfg) {
  return sys.spawn(router_impl, std::move(cfg));
}

}  // namespace canopy
