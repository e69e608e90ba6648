#include "actors/node_control_impl.hpp"

#include "actors/plugin_loader.hpp"
#include "runtime/agent.hpp"
#include "runtime/atoms.hpp"
#include "runtime/log.hpp"
#include "runtime/manifest.hpp"
#include "runtime/router.hpp"
#include "runtime/store_actor.hpp"

#include <caf/all.hpp>

namespace canopy {

namespace {

/// What `done` of a send_job gets: each message's answer, in order.
using batch_reply = std::function<void(std::vector<expected<std::uint64_t>>)>;

/// One `send` or `send_batch` on its way to the router.
struct send_job {
  caf::actor router;
  std::vector<routed_message> rms;
  batch_reply done;
};

/// The forwarding actor's sends waiting for its next flush.
struct sender_state {
  std::vector<send_job> jobs;
  bool flush_scheduled = false;
};

}  // namespace
}  // namespace canopy

CAF_ALLOW_UNSAFE_MESSAGE_TYPE(canopy::send_job)

namespace canopy {

/// One follow/monitor subscription. The callback runs under `mtx` only while
/// `active`, so unsubscribe() returning means no callback runs any more.
struct node_control_impl::subscription {
  std::mutex mtx;
  bool active = true;
  bool is_log = false;
  std::uint64_t log_follow_id = 0;
};

namespace {

constexpr auto control_timeout = std::chrono::seconds{30};

/// The human text of an error: our actors put it in the error's context.
std::string error_text(const caf::error& err) {
  if (err.context().match_elements<std::string>())
    return err.context().get_as<std::string>(0);
  return caf::to_string(err);
}

error from_caf(const caf::error& err) {
  if (err == caf::sec::request_timeout)
    return make_error(errc::timeout, "the node did not answer in time");
  return make_error(errc::failed, error_text(err));
}

/// The router's answers to inject: a refusal because the store is full is
/// overload (back off and retry), not a failure of the message.
error from_router(const caf::error& err) {
  if (err == caf::sec::request_timeout)
    return make_error(errc::timeout, "the router did not answer in time");
  auto text = error_text(err);
  if (text.rfind("store full: ", 0) == 0)
    return make_error(errc::unavailable, std::move(text));
  return make_error(errc::failed, std::move(text));
}

/// Calls `done(err)` on a worker thread: node_control never answers inside the call.
template <class T>
void fail_later(caf::actor_system& sys, reply_fn<T> done, error err) {
  sys.spawn([done = std::move(done), err = std::move(err)](int) mutable { done(std::move(err)); },
            0);
}

/// What metrics and send answer before the router exists.
error router_missing() {
  return make_error(errc::unavailable, "node is starting, try again");
}

/// Sends `msg...` to `target` from a short-lived actor and hands the answer to
/// `on_ok` or the error to `on_err`, on a CAF worker thread.
template <class OnOk, class OnErr, class... Ts>
void ask(caf::actor_system& sys, caf::actor target, caf::duration timeout, OnOk on_ok,
         OnErr on_err, Ts... msg) {
  if (!target) {
    on_err(make_error(errc::unavailable, "the node is restarting its core; try again"));
    return;
  }
  // The unused int works around CAF 0.17's init_fun_factory, which binds a
  // reference to a null tuple for argument-less functors (flagged by UBSan).
  sys.spawn(
    [=](caf::event_based_actor* self, int) {
      self->request(target, timeout, msg...).then(on_ok, [on_err](caf::error& err) { on_err(from_caf(err)); });
    },
    0);
}

}  // namespace

node_control_impl::node_control_impl(caf::actor_system& sys, std::function<caf::actor()> agent,
                                     std::function<caf::actor()> store,
                                     std::function<caf::actor()> router, log_hub& logs,
                                     plugin_loader& loader)
  : sys_(sys),
    agent_(std::move(agent)),
    store_(std::move(store)),
    router_(std::move(router)),
    logs_(logs),
    loader_(loader) {
  // One actor forwards every send, so that the router sees them in the order
  // they were made (CAF orders messages per sender only); what arrives
  // together goes to the router as one batch.
  sender_ = sys.spawn(
    [](caf::stateful_actor<sender_state>* self, int) -> caf::behavior {
      return {
        [self](send_job& job) {
          auto& st = self->state;
          st.jobs.push_back(std::move(job));
          if (!st.flush_scheduled) {
            st.flush_scheduled = true;
            self->send(self, atoms::flush::value);  // after what is already in the mailbox
          }
        },
        [self](atoms::flush) {
          auto& st = self->state;
          st.flush_scheduled = false;
          auto jobs = std::make_shared<std::vector<send_job>>(std::move(st.jobs));
          st.jobs.clear();
          // Jobs of one router go together (there is one router, unless it just restarted).
          std::size_t begin = 0;
          while (begin < jobs->size()) {
            std::size_t end = begin;
            std::vector<routed_message> batch;
            while (end < jobs->size() && (*jobs)[end].router == (*jobs)[begin].router) {
              auto& rms = (*jobs)[end++].rms;  // moved from, its size stays (the answers count it)
              batch.insert(batch.end(), std::make_move_iterator(rms.begin()), std::make_move_iterator(rms.end()));
            }
            self->request((*jobs)[begin].router, caf::duration{control_timeout}, atoms::inject::value,
                          std::move(batch))
              .then(
                [jobs, begin, end](std::vector<std::uint64_t>& targets) {
                  std::size_t k = 0;  // position in the router's answer
                  for (std::size_t i = begin; i < end; ++i) {
                    auto& job = (*jobs)[i];
                    std::vector<expected<std::uint64_t>> answers;
                    answers.reserve(job.rms.size());
                    for (std::size_t n = 0; n < job.rms.size(); ++n, ++k)
                      answers.emplace_back(k < targets.size() ? targets[k] : std::uint64_t{0});
                    job.done(std::move(answers));
                  }
                },
                [jobs, begin, end](caf::error& err) {
                  for (std::size_t i = begin; i < end; ++i) {
                    auto& job = (*jobs)[i];
                    job.done(std::vector<expected<std::uint64_t>>(job.rms.size(), from_router(err)));
                  }
                });
            begin = end;
          }
        },
      };
    },
    0);
}

node_control_impl::~node_control_impl() {
  caf::anon_send_exit(sender_, caf::exit_reason::user_shutdown);
  std::map<subscription_id, std::shared_ptr<subscription>> subs;
  {
    std::lock_guard<std::mutex> guard{mtx_};
    subs.swap(subs_);
  }
  for (auto& [id, s] : subs) {
    {
      std::lock_guard<std::mutex> guard{s->mtx};
      s->active = false;
    }
    // Not under s->mtx: the log sink calls back into it with its own lock held.
    if (s->is_log)
      logs_.unfollow(s->log_follow_id);
  }
}

void node_control_impl::list(reply_fn<std::vector<module_row>> done) {
  ask(sys_, agent_(), caf::duration{control_timeout},
      [done](std::vector<module_row>& rows) { done(std::move(rows)); },
      [done](error err) { done(std::move(err)); }, atoms::list::value);
}

void node_control_impl::restart(std::string module, reply_fn<void> done) {
  ask(sys_, agent_(), caf::duration{control_timeout}, [done]() { done(expected<void>{}); },
      [done](error err) { done(std::move(err)); }, atoms::restart::value, std::move(module));
}

void node_control_impl::deploy(std::string manifest_json, std::string base_dir, reply_fn<void> done) {
  // Validate completely before anything reaches the agent: a bad manifest
  // never half-applies.
  manifest_options mo;
  mo.base_dir = base_dir;
  mo.resolve_library = [this](std::string_view lib, const std::string& dir) {
    return loader_.resolve(lib, dir);
  };
  auto dep = parse_manifest(manifest_json, mo);
  if (!dep) {
    done(std::move(dep).err());
    return;
  }
  ask(sys_, agent_(), caf::duration{control_timeout}, [done]() { done(expected<void>{}); },
      [done](error err) { done(std::move(err)); }, atoms::deploy::value, std::move(*dep));
}

void node_control_impl::invoke(std::string module, std::string method, std::string payload_json,
                               std::chrono::milliseconds timeout, reply_fn<method_reply> done) {
  auto ms = static_cast<std::uint32_t>(std::max<std::int64_t>(1, timeout.count()));
  ask(sys_, agent_(), caf::duration{timeout + std::chrono::seconds{5}},
      [done](method_reply& r) { done(std::move(r)); }, [done](error err) { done(std::move(err)); },
      atoms::invoke::value, std::move(module), std::move(method), std::move(payload_json), ms);
}

void node_control_impl::twin(std::string module, reply_fn<twin_doc> done) {
  ask(sys_, agent_(), caf::duration{control_timeout}, [done](twin_doc& t) { done(std::move(t)); },
      [done](error err) { done(std::move(err)); }, atoms::twin::value, std::move(module));
}

void node_control_impl::logs(std::string module, std::size_t tail,
                             reply_fn<std::vector<std::string>> done) {
  // Reading a bounded tail of a file: cheap enough to answer from here, but
  // the contract says the callback runs later, so hand it to a worker.
  auto lines = logs_.tail(module, tail);
  sys_.spawn([done, lines = std::move(lines)](int) mutable { done(std::move(lines)); }, 0);
}

expected<node_control::subscription_id>
node_control_impl::follow_logs(std::string module, std::function<void(std::string line)> on_line) {
  auto sub = std::make_shared<subscription>();
  sub->is_log = true;
  auto id = next_id_++;
  std::weak_ptr<subscription> weak = sub;
  sub->log_follow_id = logs_.follow(module, [weak, on_line](const std::string& line) {
    if (auto s = weak.lock()) {
      std::lock_guard<std::mutex> g{s->mtx};
      if (s->active)
        on_line(line);
    }
  });
  std::lock_guard<std::mutex> guard{mtx_};
  subs_.emplace(id, std::move(sub));
  return id;
}

expected<node_control::subscription_id>
node_control_impl::monitor(std::int64_t after_seq, std::size_t backlog,
                           std::function<void(upstream_record)> on_record) {
  auto store = store_();
  if (!store)
    return make_error(errc::unavailable, "the node is restarting its store; try again");
  auto sub = std::make_shared<subscription>();
  auto id = next_id_++;
  std::weak_ptr<subscription> weak = sub;
  auto cb = std::make_shared<std::function<void(upstream_record)>>(
    [weak, on_record](upstream_record rec) {
      if (auto s = weak.lock()) {
        std::lock_guard<std::mutex> g{s->mtx};
        if (s->active)
          on_record(std::move(rec));
      }
    });
  {
    std::lock_guard<std::mutex> guard{mtx_};
    subs_.emplace(id, sub);
  }
  caf::anon_send(store, atoms::subscribe::value, std::uint64_t{id}, after_seq,
                 std::uint64_t{backlog}, upstream_callback{cb});
  return id;
}

void node_control_impl::unsubscribe(subscription_id id) {
  std::shared_ptr<subscription> sub;
  {
    std::lock_guard<std::mutex> guard{mtx_};
    auto i = subs_.find(id);
    if (i == subs_.end())
      return;
    sub = std::move(i->second);
    subs_.erase(i);
  }
  {
    std::lock_guard<std::mutex> guard{sub->mtx};
    sub->active = false;
  }
  if (sub->is_log)
    logs_.unfollow(sub->log_follow_id);
  else if (auto store = store_())
    caf::anon_send(store, atoms::unsubscribe::value, std::uint64_t{id});
}

void node_control_impl::metrics(reply_fn<node_metrics> done) {
  auto router = router_();
  if (!router) {
    fail_later(sys_, std::move(done), router_missing());
    return;
  }
  ask(sys_, std::move(router), caf::duration{control_timeout},
      [done, extra = extra_metrics_](node_metrics& m) {
        if (extra)
          extra(m);
        done(std::move(m));
      },
      [done](error err) { done(std::move(err)); }, atoms::stats::value);
}

void node_control_impl::send(std::string device, std::string module, std::string output,
                             message msg, reply_fn<std::uint64_t> done) {
  auto router = router_();
  if (!router) {
    fail_later(sys_, std::move(done), router_missing());
    return;
  }
  std::vector<routed_message> one;
  one.push_back(routed_message{std::move(msg), std::move(device), std::move(module), std::move(output)});
  // Not ask(): in order, and a refusal of the router is classified by from_router().
  caf::anon_send(sender_, send_job{std::move(router), std::move(one),
                                   [done = std::move(done)](std::vector<expected<std::uint64_t>> r) {
                                     done(std::move(r.front()));
                                   }});
}

void node_control_impl::send_batch(std::vector<send_item> items, batch_reply done) {
  auto router = router_();
  if (!router) {
    sys_.spawn([n = items.size(), done = std::move(done)](int) mutable {
      done(std::vector<expected<std::uint64_t>>(n, router_missing()));
    }, 0);
    return;
  }
  std::vector<routed_message> rms;
  rms.reserve(items.size());
  for (auto& it : items)
    rms.push_back(routed_message{std::move(it.msg), std::move(it.device), std::move(it.module), std::move(it.output)});
  caf::anon_send(sender_, send_job{std::move(router), std::move(rms), std::move(done)});
}

}  // namespace canopy
