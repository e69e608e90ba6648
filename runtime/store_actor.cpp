#include "runtime/store_actor.hpp"

#include "runtime/agent.hpp"
#include "runtime/atoms.hpp"
#include "runtime/router.hpp"

#include <caf/all.hpp>
#include <spdlog/spdlog.h>

namespace canopy {

namespace {

struct store_state {
  std::shared_ptr<node_store> store;
  const clock* clk = nullptr;
  std::vector<routed_message> batch;
  caf::actor router;             ///< who handed over the batch (acknowledged after the commit)
  std::uint64_t last_token = 0;  ///< token of the batch's last message
  bool flush_pending = false;
  bool discarding = false;       ///< after a failed write, until the router's (resume)
  std::map<std::uint64_t, upstream_callback> subscribers;
  static inline const char* name = "canopy.store";
};

using store_actor = caf::stateful_actor<store_state>;

void log_failure(const char* what, const error& err) {
  spdlog::error("store: {} failed: {}", what, err.message);
}

void flush(store_actor* self) {
  auto& st = self->state;
  st.flush_pending = false;
  if (st.batch.empty())
    return;
  auto now = st.clk->wall_ms();
  std::vector<upstream_entry> entries;
  entries.reserve(st.batch.size());
  for (auto& rm : st.batch)
    entries.push_back(upstream_entry{rm.module, rm.output, now, rm.msg.encoded(), rm.device});
  // The table keeps the newest default_upstream_keep records: each batch
  // removes as many old ones as it adds, in its own transaction (deleting
  // ten thousand at once stalled the commit, and every sender, for 25 ms).
  auto seqs = st.store->append_upstream(entries, node_store::default_upstream_keep);
  if (!seqs) {
    // The router keeps the messages in its store and hands them over again
    // after a backoff (a busy or full disk may recover).
    log_failure("storing $upstream messages", seqs.err());
    st.batch.clear();
    // What the router sent after the failed batch is stale too: it hands
    // everything over again, in order, after (resume).
    st.discarding = true;
    if (st.router)
      self->send(st.router, atoms::nack::value, std::string{upstream_endpoint});
    return;
  }
  if (st.router)
    self->send(st.router, atoms::delivered::value, std::string{upstream_endpoint}, st.last_token);
  if (!st.subscribers.empty()) {
    for (std::size_t i = 0; i < st.batch.size(); ++i) {
      const auto& rm = st.batch[i];
      upstream_record rec{(*seqs)[i], now, rm.module, rm.output, rm.msg, rm.device};
      for (auto& [id, cb] : st.subscribers)
        (*cb)(rec);
    }
  }
  st.batch.clear();
}

caf::behavior store_impl(store_actor* self, std::shared_ptr<node_store> store, const clock* clk) {
  self->state.store = std::move(store);
  self->state.clk = clk;
  // An orderly stop writes what is still batched before the actor goes.
  self->set_exit_handler([self](caf::exit_msg& em) {
    flush(self);
    self->quit(em.reason);
  });
  return {
    [self](atoms::put, const module_row& row) {
      module_state_record rec{row.name, row.status, row.restart_count, row.last_start_ms,
                              row.last_exit_ms, row.last_exit_reason};
      if (auto r = self->state.store->save_module_state(rec); !r)
        log_failure("saving module state", r.err());
    },
    [self](atoms::forget, const std::string& module) {
      if (auto r = self->state.store->delete_module_state(module); !r)
        log_failure("deleting module state", r.err());
      if (auto r = self->state.store->delete_reported(module); !r)
        log_failure("deleting reported properties", r.err());
    },
    [self](atoms::reported, const std::string& module, const std::string& json) {
      if (auto r = self->state.store->save_reported(module, json); !r)
        log_failure("saving reported properties", r.err());
    },
    [self](atoms::deploy, const deployment& d) {
      if (auto r = self->state.store->save_deployment(d.manifest.dump(), d.base_dir); !r)
        log_failure("saving the deployment", r.err());
    },
    [self](atoms::route_msg, routed_message& rm, std::uint64_t token) {
      auto& st = self->state;
      auto sender = caf::actor_cast<caf::actor>(self->current_sender());
      if (sender != st.router) {
        flush(self);  // acknowledges the previous router's batch (or nacks)
        st.router = sender;
        st.discarding = false;
      }
      if (st.discarding)
        return;
      st.batch.push_back(std::move(rm));
      st.last_token = token;
      // Group commit: everything that arrives before the flush message is
      // processed goes into one transaction.
      if (!st.flush_pending) {
        st.flush_pending = true;
        self->send(self, atoms::flush::value);
      }
      if (st.batch.size() >= 4096)
        flush(self);
    },
    [self](atoms::flush) { flush(self); },
    [self](atoms::resume) { self->state.discarding = false; },
    [self](atoms::subscribe, std::uint64_t id, std::int64_t after_seq, std::uint64_t backlog,
           upstream_callback& cb) {
      auto& st = self->state;
      flush(self);
      if (backlog > 0) {
        auto last = st.store->last_upstream_seq();
        std::int64_t from = after_seq;
        if (last && *last - static_cast<std::int64_t>(backlog) > from)
          from = *last - static_cast<std::int64_t>(backlog);
        auto recs = st.store->read_upstream(from, backlog);
        if (recs)
          for (auto& r : *recs)
            (*cb)(std::move(r));
        else
          log_failure("reading $upstream", recs.err());
      }
      st.subscribers.emplace(id, std::move(cb));
    },
    [self](atoms::unsubscribe, std::uint64_t id) { self->state.subscribers.erase(id); },
    [self](atoms::query, const std::string& device, std::int64_t since_ms, std::int64_t after_seq,
           std::uint64_t limit) -> caf::result<std::vector<upstream_record>> {
      // What the router handed over before the query is part of the answer.
      flush(self);
      auto recs = self->state.store->query_upstream(device, since_ms, after_seq, limit);
      if (!recs) {
        log_failure("querying $upstream", recs.err());
        return caf::make_error(caf::sec::runtime_error, std::move(recs).err().message);
      }
      return std::move(*recs);
    },
  };
}

}  // namespace

caf::actor spawn_store_actor(caf::actor_system& sys, std::shared_ptr<node_store> store,
                             const clock& clk) {
  return sys.spawn(store_impl, std::move(store), &clk);
}

}  // namespace canopy
