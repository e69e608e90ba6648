// node_control (gateway/node_control.hpp) on the actor side: turns each call from
// the control socket into a request to the agent, the store actor or the
// router, and the answer into the caller's callback. Nothing here blocks the
// calling thread.
#pragma once

#include "gateway/node_control.hpp"

#include <caf/actor.hpp>
#include <caf/fwd.hpp>

#include <atomic>
#include <functional>
#include <map>
#include <memory>
#include <mutex>

namespace canopy {

class log_hub;
class plugin_loader;

class node_control_impl final : public node_control {
 public:
  /// `agent`, `store` and `router` return the current handles (they change
  /// when a supervisor restarts them; invalid while the node starts). All
  /// references are borrowed.
  node_control_impl(caf::actor_system& sys, std::function<caf::actor()> agent,
                    std::function<caf::actor()> store, std::function<caf::actor()> router,
                    log_hub& logs, plugin_loader& loader);
  ~node_control_impl() override;

  void list(reply_fn<std::vector<module_row>> done) override;
  void restart(std::string module, reply_fn<void> done) override;
  void deploy(std::string manifest_json, std::string base_dir, reply_fn<void> done) override;
  void invoke(std::string module, std::string method, std::string payload_json,
              std::chrono::milliseconds timeout, reply_fn<method_reply> done) override;
  void twin(std::string module, reply_fn<twin_doc> done) override;
  void logs(std::string module, std::size_t tail, reply_fn<std::vector<std::string>> done) override;
  expected<subscription_id> follow_logs(std::string module,
                                        std::function<void(std::string line)> on_line) override;
  expected<subscription_id> monitor(std::int64_t after_seq, std::size_t backlog,
                                    std::function<void(upstream_record)> on_record) override;
  void unsubscribe(subscription_id id) override;
  void metrics(reply_fn<node_metrics> done) override;
  void send(std::string device, std::string module, std::string output, message msg,
            reply_fn<std::uint64_t> done) override;
  void send_batch(std::vector<send_item> items,
                  std::function<void(std::vector<expected<std::uint64_t>>)> done) override;

  /// Adds what the router does not know to every metrics answer (the links).
  /// `fill` runs on arbitrary threads. Set before the control socket serves.
  void set_metrics_extra(std::function<void(node_metrics&)> fill) { extra_metrics_ = std::move(fill); }

 private:
  struct subscription;

  caf::actor_system& sys_;
  std::function<caf::actor()> agent_;
  std::function<caf::actor()> store_;
  std::function<caf::actor()> router_;
  std::function<void(node_metrics&)> extra_metrics_;
  caf::actor sender_;  ///< forwards sends to the router, in order
  log_hub& logs_;
  plugin_loader& loader_;
  std::atomic<subscription_id> next_id_{1};
  std::mutex mtx_;
  std::map<subscription_id, std::shared_ptr<subscription>> subs_;
};

}  // namespace canopy
