// Unit test of the control socket: io_thread + control_server served to
// control_client, against a fake node_control (the test double of the actor side).
#include "gateway/control_server.hpp"

#include "gateway/control_client.hpp"
#include "gateway/io_thread.hpp"

#include <control.capnp.h>

#include <canopy/message.hpp>
#include <capnp/rpc-twoparty.h>
#include <catch2/catch.hpp>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <deque>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <mutex>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

using namespace canopy;
using namespace std::chrono_literals;

namespace {

/// Runs jobs on its own thread: node_control callbacks fire "on an arbitrary thread".
class worker {
 public:
  worker() : thread_([this] { run(); }) {}
  ~worker() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      done_ = true;
    }
    cv_.notify_one();
    thread_.join();
  }
  void post(std::function<void()> job) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      jobs_.push_back(std::move(job));
    }
    cv_.notify_one();
  }

 private:
  void run() {
    for (;;) {
      std::function<void()> job;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        cv_.wait(lock, [this] { return done_ || !jobs_.empty(); });
        if (jobs_.empty()) return;
        job = std::move(jobs_.front());
        jobs_.pop_front();
      }
      job();
    }
  }
  std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> jobs_;
  bool done_ = false;
  std::thread thread_;
};

message make_message(int i) {
  return message_builder()
      .body("{\"n\":" + std::to_string(i) + "}")
      .property("alert", i % 2 == 0 ? "even" : "odd")
      .connection_module_id("sensor")
      .output_name("temp")
      .build();
}

/// The fake node: answers from a worker thread; subscriptions emit a few items at once.
class fake_node final : public node_control {
 public:
  int log_lines_per_subscription = 5;
  int live_records_per_monitor = 2;

  void list(reply_fn<std::vector<module_row>> done) override {
    worker_.post([done = std::move(done)] {
      module_row a;
      a.name = "sensor";
      a.type = "actor";
      a.version = "1.0";
      a.status = "running";
      a.desired_status = "running";
      a.restart_policy = "always";
      a.last_start_ms = 1700000000000;
      module_row b = a;
      b.name = "filter";
      b.status = "failed";
      b.restart_count = 3;
      b.last_exit_ms = 1700000005000;
      b.last_exit_reason = "handler threw: boom";
      done(std::vector<module_row>{a, b});
    });
  }

  void restart(std::string module, reply_fn<void> done) override {
    worker_.post([this, module = std::move(module), done = std::move(done)] {
      if (module == "missing") return done(make_error(errc::not_found, "module 'missing' is not deployed"));
      std::lock_guard<std::mutex> lock(mutex_);
      restarted_.push_back(module);
      done({});
    });
  }

  void deploy(std::string manifest_json, std::string base_dir, reply_fn<void> done) override {
    worker_.post([this, manifest_json = std::move(manifest_json), base_dir = std::move(base_dir),
                  done = std::move(done)] {
      if (manifest_json.find("bad") != std::string::npos) {
        return done(make_error(errc::invalid_argument, "modules.sensor.library: missing (line 3, column 5)"));
      }
      std::lock_guard<std::mutex> lock(mutex_);
      deployed_ = manifest_json + "@" + base_dir;
      done({});
    });
  }

  void invoke(std::string module, std::string method, std::string payload_json, std::chrono::milliseconds timeout,
              reply_fn<method_reply> done) override {
    if (method == "drop") return;  // a buggy node that never answers: the callback dies unused
    worker_.post([module, method, payload_json, timeout, done = std::move(done)] {
      if (method == "slow") return done(make_error(errc::timeout, "method slow of " + module + " timed out"));
      done(method_reply{method == "missing" ? 404 : 200,
                        "{\"echo\":" + payload_json + ",\"timeout\":" + std::to_string(timeout.count()) + "}"});
    });
  }

  void twin(std::string module, reply_fn<twin_doc> done) override {
    worker_.post([module, done = std::move(done)] {
      if (module == "missing") return done(make_error(errc::not_found, "no twin for module 'missing'"));
      done(twin_doc{"{\"interval\":5}", "{\"interval\":5,\"module\":\"" + module + "\"}"});
    });
  }

  void logs(std::string module, std::size_t tail, reply_fn<std::vector<std::string>> done) override {
    worker_.post([module, tail, done = std::move(done)] {
      std::vector<std::string> lines;
      for (std::size_t i = 0; i < tail; ++i) lines.push_back(module + " old " + std::to_string(i));
      done(lines);
    });
  }

  expected<subscription_id> follow_logs(std::string module, std::function<void(std::string)> on_line) override {
    if (module == "missing") return make_error(errc::not_found, "module 'missing' is not deployed");
    subscription_id id;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      id = next_id_++;
      log_subs_[id] = std::move(on_line);
    }
    int n = log_lines_per_subscription;
    worker_.post([this, id, n, module] {
      for (int i = 0; i < n; ++i) emit_log(id, module + " line " + std::to_string(i));
    });
    return id;
  }

  expected<subscription_id> monitor(std::int64_t after_seq, std::size_t backlog,
                                    std::function<void(upstream_record)> on_record) override {
    subscription_id id;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      id = next_id_++;
      monitor_subs_[id] = std::move(on_record);
    }
    auto total = static_cast<std::int64_t>(backlog) + live_records_per_monitor;
    worker_.post([this, id, after_seq, total] {
      for (std::int64_t seq = after_seq + 1; seq <= after_seq + total; ++seq) {
        std::lock_guard<std::mutex> lock(mutex_);
        auto it = monitor_subs_.find(id);
        if (it == monitor_subs_.end()) return;
        it->second(upstream_record{seq, 1700000000000 + seq, "sensor", "temp", make_message(static_cast<int>(seq))});
      }
    });
    return id;
  }

  void metrics(reply_fn<node_metrics> done) override {
    worker_.post([done = std::move(done)] {
      node_metrics m;
      m.received = 1000;
      m.sent = 990;
      m.dropped_no_route = 3;
      m.dropped_ttl_expiry = 4;
      m.dropped_store_full = 5;
      m.redelivered = 6;
      m.queues.push_back(queue_metrics{"$upstream", 0, 7, 93, 100});
      m.queues.push_back(queue_metrics{"/modules/filter/inputs/in", 9, 0, 42, 42});
      m.store_bytes = 1 << 20;
      m.store_free_bytes = 4096;
      m.store_limit_bytes = 1 << 30;
      m.commits = 77;
      m.commit_p50_us = 310;
      m.commit_p99_us = 2200;
      m.commit_max_us = 9000;
      done(std::move(m));
    });
  }

  /// What the fake does with a sent message, by its sender:
  /// device "full": the store's refusal; output "nowhere": no route; output
  /// "hold": held until `hold_batch` are held, then answered in reverse order
  /// (property fail=yes: an error); otherwise 1 endpoint for a device, 2 for a module.
  std::size_t hold_batch = 4;

  struct sent_message {
    std::string device;
    std::string module;
    std::string output;
    message msg;
  };

  void send(std::string device, std::string module, std::string output, message msg,
            reply_fn<std::uint64_t> done) override {
    std::vector<std::pair<message, reply_fn<std::uint64_t>>> release;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      sent_.push_back(sent_message{device, module, output, msg});
      max_in_flight_ = std::max(max_in_flight_, ++in_flight_);
      if (output == "hold") {
        held_.emplace_back(msg, std::move(done));
        if (held_.size() < hold_batch) return;
        release.swap(held_);
      }
    }
    if (!release.empty()) {
      worker_.post([this, release = std::move(release)]() mutable {
        for (auto it = release.rbegin(); it != release.rend(); ++it) {
          answered();
          if (it->first.property("fail")) {
            it->second(make_error(errc::failed, "the router refused " + std::string(it->first.body())));
          } else {
            it->second(std::uint64_t{std::stoul(std::string(it->first.body()))});
          }
        }
      });
      return;
    }
    worker_.post([this, device, module, output, done = std::move(done)] {
      answered();
      if (device == "full") return done(make_error(errc::unavailable, "store full: messages.db is at its limit"));
      if (output == "nowhere") return done(std::uint64_t{0});
      done(std::uint64_t{module.empty() ? 1u : 2u});
    });
  }

  void unsubscribe(subscription_id id) override {
    std::lock_guard<std::mutex> lock(mutex_);
    log_subs_.erase(id);
    monitor_subs_.erase(id);
    unsubscribed_.insert(id);
  }

  void answered() {
    std::lock_guard<std::mutex> lock(mutex_);
    --in_flight_;
  }

  /// Sends `line` to subscription `id`, if it is still subscribed.
  void emit_log(subscription_id id, const std::string& line) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = log_subs_.find(id);
    if (it != log_subs_.end()) it->second(line);
  }

  /// The newest subscription id handed out.
  subscription_id last_subscription() {
    std::lock_guard<std::mutex> lock(mutex_);
    return next_id_ - 1;
  }
  std::size_t active_subscriptions() {
    std::lock_guard<std::mutex> lock(mutex_);
    return log_subs_.size() + monitor_subs_.size();
  }
  std::size_t unsubscribed_count() {
    std::lock_guard<std::mutex> lock(mutex_);
    return unsubscribed_.size();
  }
  std::vector<std::string> restarted() {
    std::lock_guard<std::mutex> lock(mutex_);
    return restarted_;
  }
  std::string deployed() {
    std::lock_guard<std::mutex> lock(mutex_);
    return deployed_;
  }
  std::vector<sent_message> sent() {
    std::lock_guard<std::mutex> lock(mutex_);
    return sent_;
  }
  std::size_t held() {
    std::lock_guard<std::mutex> lock(mutex_);
    return held_.size();
  }
  /// The most sends that were unanswered at once.
  std::size_t max_in_flight() {
    std::lock_guard<std::mutex> lock(mutex_);
    return max_in_flight_;
  }

 private:
  std::mutex mutex_;
  subscription_id next_id_ = 1;
  std::map<subscription_id, std::function<void(std::string)>> log_subs_;
  std::map<subscription_id, std::function<void(upstream_record)>> monitor_subs_;
  std::set<subscription_id> unsubscribed_;
  std::vector<std::string> restarted_;
  std::string deployed_;
  std::vector<sent_message> sent_;
  std::vector<std::pair<message, reply_fn<std::uint64_t>>> held_;
  std::size_t in_flight_ = 0;
  std::size_t max_in_flight_ = 0;
  worker worker_;  // last: stops (joins) before the state above goes
};

/// Polls `pred` for up to 5 s; the I/O thread gets there in milliseconds.
bool eventually(const std::function<bool()>& pred) {
  auto deadline = std::chrono::steady_clock::now() + 5s;
  while (std::chrono::steady_clock::now() < deadline) {
    if (pred()) return true;
    std::this_thread::sleep_for(2ms);
  }
  return pred();
}

/// A fresh directory under /tmp (short: Unix socket paths are limited to 107 bytes).
struct temp_dir {
  temp_dir() {
    std::string tmpl = "/tmp/canopy-ctl-XXXXXX";
    path = ::mkdtemp(tmpl.data());
  }
  ~temp_dir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  std::string path;
};

/// A running io_thread + control_server over a fake node.
struct fixture {
  fixture() : socket(dir.path + "/run/canopy.sock"), server(socket, node) {
    REQUIRE(io.start().ok());
    auto started = server.start(io);
    INFO((started ? "" : started.err().message));
    REQUIRE(started.ok());
  }
  ~fixture() {
    server.stop();
    io.stop();
  }
  control_client connect() {
    auto client = control_client::connect(socket);
    INFO((client ? "" : client.err().message));
    REQUIRE(client.ok());
    return std::move(client).value();
  }
  temp_dir dir;
  std::string socket;
  fake_node node;
  io_thread io;
  control_server server;
};

}  // namespace

TEST_CASE("io_thread runs posted work and run_sync on its own loop", "[io_thread]") {
  io_thread io;
  REQUIRE_FALSE(io.post([](kj::AsyncIoContext&) {}));  // not started
  REQUIRE(io.start().ok());
  REQUIRE(io.running());

  std::atomic<int> ran{0};
  std::atomic<bool> on_loop{false};
  REQUIRE(io.post([&](kj::AsyncIoContext&) {
    on_loop = io.on_io_thread();
    ++ran;
  }));
  REQUIRE(eventually([&] { return ran.load() == 1; }));
  CHECK(on_loop.load());
  CHECK_FALSE(io.on_io_thread());

  // run_sync returns a value, or waits for a promise on the loop.
  CHECK(io.run_sync([](kj::AsyncIoContext&) { return 41 + 1; }) == 42);
  auto waited = io.run_sync([](kj::AsyncIoContext& ctx) {
    return ctx.provider->getTimer().afterDelay(1 * kj::MILLISECONDS).then([] { return std::string("timer"); });
  });
  CHECK(waited == "timer");

  // A task kept on the loop is cancelled (destroyed on the I/O thread) by stop().
  struct on_destroy {
    std::atomic<bool>* flag;
    std::thread::id* where;
    ~on_destroy() {
      *where = std::this_thread::get_id();
      *flag = true;
    }
  };
  std::atomic<bool> destroyed{false};
  std::thread::id destroyed_on;
  std::thread::id io_id;
  REQUIRE(io.post_task([&](kj::AsyncIoContext&) {
    io_id = std::this_thread::get_id();
    return kj::Promise<void>(kj::NEVER_DONE).attach(kj::heap<on_destroy>(on_destroy{&destroyed, &destroyed_on}));
  }));
  io.run_sync([](kj::AsyncIoContext&) {});  // after the post has run (same thread, FIFO enough here)
  REQUIRE(eventually([&] { return io_id != std::thread::id{}; }));
  io.stop();
  CHECK(destroyed.load());
  CHECK(destroyed_on == io_id);
  CHECK_FALSE(io.running());
  CHECK_FALSE(io.post([](kj::AsyncIoContext&) {}));
  io.stop();  // idempotent
}

TEST_CASE("cross_thread_queue hands items to the loop and counts what it drops", "[io_thread]") {
  io_thread io;
  REQUIRE(io.start().ok());
  auto queue = std::make_shared<cross_thread_queue<int>>(3);

  std::thread producer([queue] {
    for (int i = 0; i < 5; ++i) queue->push(i);  // 3 fit, 2 are dropped
  });
  producer.join();
  auto got = io.run_sync([queue](kj::AsyncIoContext&) {
    return queue->when_ready().then([queue] { return queue->take(); });
  });
  CHECK(got == std::vector<int>{0, 1, 2});
  CHECK(queue->take_dropped() == 2);
  CHECK(queue->take_dropped() == 0);

  // The consumer waits on the loop until another thread pushes.
  std::thread later([queue] {
    std::this_thread::sleep_for(5ms);
    queue->push(7);
  });
  auto next = io.run_sync([queue](kj::AsyncIoContext&) {
    return queue->when_ready().then([queue] { return queue->take(); });
  });
  later.join();
  CHECK(next == std::vector<int>{7});

  queue->close();
  CHECK_FALSE(queue->push(8));
  io.stop();
}

TEST_CASE("every one-shot method round-trips, errors included", "[control_server]") {
  fixture f;
  auto client = f.connect();
  CHECK(client.socket_path() == f.socket);

  SECTION("list") {
    auto rows = client.list();
    REQUIRE(rows.ok());
    REQUIRE(rows->size() == 2);
    CHECK((*rows)[0].name == "sensor");
    CHECK((*rows)[0].status == "running");
    CHECK((*rows)[0].version == "1.0");
    CHECK((*rows)[0].restart_policy == "always");
    CHECK((*rows)[0].last_start_ms == 1700000000000);
    CHECK((*rows)[1].status == "failed");
    CHECK((*rows)[1].restart_count == 3);
    CHECK((*rows)[1].last_exit_ms == 1700000005000);
    CHECK((*rows)[1].last_exit_reason == "handler threw: boom");
  }
  SECTION("restart") {
    CHECK(client.restart("sensor").ok());
    CHECK(f.node.restarted() == std::vector<std::string>{"sensor"});
    auto missing = client.restart("missing");
    REQUIRE_FALSE(missing.ok());
    CHECK(missing.err().code == errc::not_found);
    CHECK(missing.err().message == "module 'missing' is not deployed");
  }
  SECTION("deploy") {
    CHECK(client.deploy("{\"modules\":{}}", "/etc/canopy").ok());
    CHECK(f.node.deployed() == "{\"modules\":{}}@/etc/canopy");
    auto bad = client.deploy("{\"bad\":true}", "/etc/canopy");
    REQUIRE_FALSE(bad.ok());
    CHECK(bad.err().code == errc::invalid_argument);
    CHECK(bad.err().message == "modules.sensor.library: missing (line 3, column 5)");
  }
  SECTION("invoke") {
    auto reply = client.invoke("sensor", "reset", "{\"hard\":true}", 1500ms);
    REQUIRE(reply.ok());
    CHECK(reply->status == 200);
    CHECK(reply->payload_json == "{\"echo\":{\"hard\":true},\"timeout\":1500}");
    auto not_found = client.invoke("sensor", "missing", "null", 1s);
    REQUIRE(not_found.ok());
    CHECK(not_found->status == 404);
    auto slow = client.invoke("sensor", "slow", "null", 1s);
    REQUIRE_FALSE(slow.ok());
    CHECK(slow.err().code == errc::timeout);
    CHECK(slow.err().message == "method slow of sensor timed out");
  }
  SECTION("a reply the node never sends fails the call instead of hanging") {
    auto dropped = client.invoke("sensor", "drop", "null", 1s);
    REQUIRE_FALSE(dropped.ok());
    CHECK(dropped.err().code == errc::failed);
    CHECK(dropped.err().message == "invoke: the node dropped the request without an answer");
    // The connection stays usable.
    CHECK(client.restart("sensor").ok());
  }
  SECTION("twin") {
    auto twin = client.twin("sensor");
    REQUIRE(twin.ok());
    CHECK(twin->desired_json == "{\"interval\":5}");
    CHECK(twin->reported_json == "{\"interval\":5,\"module\":\"sensor\"}");
    auto missing = client.twin("missing");
    REQUIRE_FALSE(missing.ok());
    CHECK(missing.err().code == errc::not_found);
  }
  SECTION("logs") {
    auto lines = client.logs("sensor", 3);
    REQUIRE(lines.ok());
    CHECK(*lines == std::vector<std::string>{"sensor old 0", "sensor old 1", "sensor old 2"});
  }
}

TEST_CASE("follow_logs streams lines and unsubscribes when the client stops", "[control_server]") {
  fixture f;
  auto client = f.connect();

  std::vector<std::string> got;
  stream_options limit;
  limit.max_count = 3;
  auto n = client.follow_logs("sensor", [&](const std::string& line) {
    got.push_back(line);
    return true;
  }, limit);
  REQUIRE(n.ok());
  CHECK(*n == 3);
  CHECK(got == std::vector<std::string>{"sensor line 0", "sensor line 1", "sensor line 2"});
  CHECK(eventually([&] { return f.node.unsubscribed_count() == 1 && f.node.active_subscriptions() == 0; }));

  // The callback can stop the stream too; the connection is reused.
  got.clear();
  n = client.follow_logs("filter", [&](const std::string& line) {
    got.push_back(line);
    return got.size() < 2;
  });
  REQUIRE(n.ok());
  CHECK(got == std::vector<std::string>{"filter line 0", "filter line 1"});
  CHECK(eventually([&] { return f.node.unsubscribed_count() == 2; }));

  // A callback that throws ends the stream with an error, and the subscription.
  auto threw = client.follow_logs("sensor", [](const std::string&) -> bool { throw std::runtime_error("full"); });
  REQUIRE_FALSE(threw.ok());
  CHECK(threw.err().message == "the stream callback threw: full");
  CHECK(eventually([&] { return f.node.unsubscribed_count() == 3; }));

  // A duration limit ends a quiet stream.
  f.node.log_lines_per_subscription = 0;
  stream_options brief;
  brief.max_duration = 20ms;
  n = client.follow_logs("sensor", [](const std::string&) { return true; }, brief);
  REQUIRE(n.ok());
  CHECK(*n == 0);
  CHECK(eventually([&] { return f.node.unsubscribed_count() == 4; }));

  auto missing = client.follow_logs("missing", [](const std::string&) { return true; });
  REQUIRE_FALSE(missing.ok());
  CHECK(missing.err().code == errc::not_found);
  CHECK(missing.err().message == "module 'missing' is not deployed");
}

TEST_CASE("monitor streams records with their encoded messages", "[control_server]") {
  fixture f;
  auto client = f.connect();

  std::vector<upstream_record> got;
  stream_options limit;
  limit.max_count = 4;
  auto n = client.monitor(10, 2, [&](const upstream_record& rec) {
    got.push_back(rec);
    return true;
  }, limit);
  REQUIRE(n.ok());
  REQUIRE(got.size() == 4);
  for (std::size_t i = 0; i < got.size(); ++i) {
    auto seq = static_cast<int>(11 + i);
    CHECK(got[i].seq == seq);
    CHECK(got[i].enqueued_ms == 1700000000000 + seq);
    CHECK(got[i].source_module == "sensor");
    CHECK(got[i].output == "temp");
    CHECK(got[i].msg.body() == "{\"n\":" + std::to_string(seq) + "}");
    CHECK(got[i].msg.property("alert") == std::optional<std::string_view>(seq % 2 == 0 ? "even" : "odd"));
    CHECK(got[i].msg.output_name() == "temp");
  }
  CHECK(eventually([&] { return f.node.unsubscribed_count() == 1 && f.node.active_subscriptions() == 0; }));
}

TEST_CASE("a subscription ends when the client disconnects or its sink fails", "[control_server]") {
  fixture f;

  // A raw Cap'n Proto client, so the test controls the sink and the connection.
  struct counting_sink final : schema::LogSink::Server {
    int* lines;
    kj::Own<kj::PromiseFulfiller<void>>* got_two;
    bool fail;
    counting_sink(int* l, kj::Own<kj::PromiseFulfiller<void>>* g, bool f) : lines(l), got_two(g), fail(f) {}
    kj::Promise<void> line(LineContext) override {
      if (++*lines == 2) (*got_two)->fulfill();
      if (fail && *lines >= 2) return KJ_EXCEPTION(FAILED, "the sink gave up");
      return kj::READY_NOW;
    }
  };

  for (bool sink_fails : {false, true}) {
    auto before = f.node.unsubscribed_count();
    {
      auto io = kj::setupAsyncIo();
      auto addr = io.provider->getNetwork().parseAddress("unix:" + f.socket).wait(io.waitScope);
      auto stream = addr->connect().wait(io.waitScope);
      capnp::TwoPartyClient rpc(*stream);
      auto control = rpc.bootstrap().castAs<schema::Control>();
      int lines = 0;
      auto paf = kj::newPromiseAndFulfiller<void>();
      auto req = control.followLogsRequest();
      req.setModule("sensor");
      req.setSink(kj::heap<counting_sink>(&lines, &paf.fulfiller, sink_fails));
      auto call = req.send();
      paf.promise.wait(io.waitScope);
      CHECK(lines >= 2);
      if (sink_fails) {
        // A streaming call's failure shows on the node's next call to the sink:
        // keep lines coming until the node ends the subscription and fails the call.
        bool failed = false;
        for (int i = 0; i < 500 && !failed; ++i) {
          f.node.emit_log(f.node.last_subscription(), "one more");
          io.provider->getTimer().afterDelay(1 * kj::MILLISECONDS).wait(io.waitScope);
          if (call.poll(io.waitScope)) {
            try {
              call.wait(io.waitScope);
            } catch (const kj::Exception&) {
              failed = true;
            }
            break;
          }
        }
        CHECK(failed);
        CHECK(eventually([&] { return f.node.unsubscribed_count() == before + 1; }));
      } else {
        CHECK(f.node.active_subscriptions() == 1);
      }
    }  // disconnect: the connection and everything on it go away here
    CHECK(eventually([&] { return f.node.unsubscribed_count() == before + 1; }));
    CHECK(f.node.active_subscriptions() == 0);
  }
}

TEST_CASE("stopping the server ends streams and subscriptions", "[control_server]") {
  fixture f;
  f.node.log_lines_per_subscription = 1;
  std::atomic<bool> streaming{false};
  expected<std::size_t> result = std::size_t{0};
  std::thread follower([&] {  // a client on its own thread (its own event loop)
    auto client = control_client::connect(f.socket);
    if (!client) {
      result = client.err();
      return;
    }
    result = client->follow_logs("sensor", [&](const std::string&) {
      streaming = true;
      return true;
    });
  });
  REQUIRE(eventually([&] { return streaming.load(); }));
  f.server.stop();
  follower.join();
  REQUIRE_FALSE(result.ok());
  CHECK(result.err().code == errc::unavailable);
  CHECK(f.node.active_subscriptions() == 0);
  CHECK(f.node.unsubscribed_count() == 1);
  CHECK_FALSE(std::filesystem::exists(f.socket));  // removed on stop
}

TEST_CASE("connecting to a missing socket says what to do", "[control_client]") {
  temp_dir dir;
  auto path = dir.path + "/nobody.sock";
  auto client = control_client::connect(path);
  REQUIRE_FALSE(client.ok());
  CHECK(client.err().code == errc::unavailable);
  CHECK(client.err().message == "cannot connect to the canopy node at " + path +
                                    ": No such file or directory (is `canopy run` running? use --socket or "
                                    "CANOPY_SOCKET)");
}

TEST_CASE("the socket file: parent created, stale replaced, mode 0660, others refused", "[control_server]") {
  temp_dir dir;
  fake_node node;
  io_thread io;
  REQUIRE(io.start().ok());
  auto path = dir.path + "/a/b/canopy.sock";

  SECTION("a stale socket file is replaced") {
    std::filesystem::create_directories(dir.path + "/a/b");
    {  // bind and close: leaves a socket file nobody listens on
      int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
      sockaddr_un addr{};
      addr.sun_family = AF_UNIX;
      std::snprintf(addr.sun_path, sizeof(addr.sun_path), "%s", path.c_str());
      REQUIRE(::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0);
      ::close(fd);
    }
    REQUIRE(std::filesystem::is_socket(path));
    control_server server(path, node);
    auto started = server.start(io);
    INFO((started ? "" : started.err().message));
    REQUIRE(started.ok());
    auto client = control_client::connect(path);
    REQUIRE(client.ok());
    CHECK(client->list().ok());
  }
  SECTION("the parent directory is created and the socket is 0660") {
    control_server server(path, node);
    REQUIRE(server.start(io).ok());
    struct stat st {};
    REQUIRE(::stat(path.c_str(), &st) == 0);
    CHECK(S_ISSOCK(st.st_mode));
    CHECK((st.st_mode & 0777) == 0660);
    server.stop();
    CHECK_FALSE(std::filesystem::exists(path));
  }
  SECTION("a socket someone listens on is not stolen") {
    control_server first(path, node);
    REQUIRE(first.start(io).ok());
    control_server second(path, node);
    auto started = second.start(io);
    REQUIRE_FALSE(started.ok());
    CHECK(started.err().code == errc::unavailable);
    CHECK(started.err().message == "another process is already serving the control socket " + path);
    second.stop();  // must not remove the first one's socket
    CHECK(std::filesystem::is_socket(path));
    auto client = control_client::connect(path);
    REQUIRE(client.ok());
    CHECK(client->list().ok());
  }
  SECTION("a regular file is left alone") {
    std::filesystem::create_directories(dir.path + "/a/b");
    std::ofstream(path) << "not a socket";
    control_server server(path, node);
    auto started = server.start(io);
    REQUIRE_FALSE(started.ok());
    CHECK(started.err().code == errc::io_error);
    CHECK(started.err().message == path + " exists and is not a socket; refusing to replace it");
    CHECK(std::filesystem::is_regular_file(path));
  }
  SECTION("a path too long for sun_path is named") {
    control_server server(dir.path + "/" + std::string(120, 'x') + ".sock", node);
    auto started = server.start(io);
    REQUIRE_FALSE(started.ok());
    CHECK(started.err().code == errc::invalid_argument);
    CHECK(started.err().message.find("too long") != std::string::npos);
  }
  io.stop();
}

TEST_CASE("metrics round-trips with the queue list", "[control_server]") {
  fixture f;
  auto client = f.connect();
  auto m = client.metrics();
  REQUIRE(m.ok());
  CHECK(m->received == 1000);
  CHECK(m->sent == 990);
  CHECK(m->dropped_no_route == 3);
  CHECK(m->dropped_ttl_expiry == 4);
  CHECK(m->dropped_store_full == 5);
  CHECK(m->redelivered == 6);
  REQUIRE(m->queues.size() == 2);
  CHECK(m->queues[0].endpoint == "$upstream");
  CHECK(m->queues[0].priority == 0);
  CHECK(m->queues[0].length == 7);
  CHECK(m->queues[0].checkpoint == 93);
  CHECK(m->queues[0].last_seq == 100);
  CHECK(m->queues[1].endpoint == "/modules/filter/inputs/in");
  CHECK(m->queues[1].priority == 9);
  CHECK(m->queues[1].length == 0);
  CHECK(m->queues[1].checkpoint == 42);
  CHECK(m->queues[1].last_seq == 42);
  CHECK(m->store_bytes == 1 << 20);
  CHECK(m->store_free_bytes == 4096);
  CHECK(m->store_limit_bytes == 1 << 30);
  CHECK(m->commits == 77);
  CHECK(m->commit_p50_us == 310);
  CHECK(m->commit_p99_us == 2200);
  CHECK(m->commit_max_us == 9000);
}

TEST_CASE("send round-trips as a leaf device or a module output, errors included", "[control_server]") {
  fixture f;
  auto client = f.connect();
  auto msg = message_builder().body("{\"t\":21.5}").property("unit", "C").content_type("application/json").build();

  SECTION("a leaf device") {
    auto targets = client.send("leaf-1", "", "", msg);
    REQUIRE(targets.ok());
    CHECK(*targets == 1);
    auto sent = f.node.sent();
    REQUIRE(sent.size() == 1);
    CHECK(sent[0].device == "leaf-1");
    CHECK(sent[0].module.empty());
    CHECK(sent[0].output.empty());
    CHECK(sent[0].msg.body() == "{\"t\":21.5}");
    CHECK(sent[0].msg.property("unit") == std::optional<std::string_view>("C"));
    CHECK(sent[0].msg.content_type() == "application/json");
  }
  SECTION("a module output") {
    auto targets = client.send("", "sensor", "temp", msg);
    REQUIRE(targets.ok());
    CHECK(*targets == 2);
    auto sent = f.node.sent();
    REQUIRE(sent.size() == 1);
    CHECK(sent[0].device.empty());
    CHECK(sent[0].module == "sensor");
    CHECK(sent[0].output == "temp");
    CHECK(sent[0].msg.encoded() == msg.encoded());
  }
  SECTION("no route") {
    auto targets = client.send("", "sensor", "nowhere", msg);
    REQUIRE(targets.ok());
    CHECK(*targets == 0);
  }
  SECTION("the node's error comes back as its code and text") {
    auto full = client.send("full", "", "", msg);
    REQUIRE_FALSE(full.ok());
    CHECK(full.err().code == errc::unavailable);
    CHECK(full.err().message == "store full: messages.db is at its limit");
  }
  SECTION("a sender is required") {
    auto nobody = client.send("", "", "temp", msg);
    REQUIRE_FALSE(nobody.ok());
    CHECK(nobody.err().code == errc::invalid_argument);
    CHECK(nobody.err().message == "send: no sender: give a device or a module");
    CHECK(f.node.sent().empty());
  }
}

TEST_CASE("send refuses message bytes that do not decode", "[control_server]") {
  fixture f;
  auto io = kj::setupAsyncIo();
  auto addr = io.provider->getNetwork().parseAddress("unix:" + f.socket).wait(io.waitScope);
  auto stream = addr->connect().wait(io.waitScope);
  capnp::TwoPartyClient rpc(*stream);
  auto control = rpc.bootstrap().castAs<schema::Control>();

  for (std::string bytes : {std::string(), std::string("not a message"), std::string(64, '\xff')}) {
    auto req = control.sendRequest();
    req.setModule("sensor");
    req.setOutput("temp");
    req.setMessage(kj::arrayPtr(reinterpret_cast<const kj::byte*>(bytes.data()), bytes.size()));
    auto response = req.send().wait(io.waitScope);
    CHECK(response.getStatus().getCode() == schema::ErrorCode::INVALID_ARGUMENT);
    CHECK(std::string(response.getStatus().getMessage()) ==
          "send: message: " + std::to_string(bytes.size()) +
              " bytes that do not decode as a canopy message (expected canopy::message::encoded())");
  }
  CHECK(f.node.sent().empty());
  // The connection stays usable.
  auto ok = control.metricsRequest().send().wait(io.waitScope);
  CHECK(ok.getStatus().getCode() == schema::ErrorCode::OK);
}

TEST_CASE("send_stream pipelines up to the window and reports answers in order", "[control_server]") {
  fixture f;
  auto client = f.connect();
  constexpr std::size_t window = 4;
  f.node.hold_batch = window;  // answers only once `window` are in flight, last first

  send_feed feed(window);
  std::atomic<int> pushed{0};
  std::atomic<bool> refused_after_close{false};
  std::thread producer([&] {  // no Catch2 assertions off the main thread
    for (int i = 0; i < 8; ++i) {
      auto b = message_builder();
      b.body(std::to_string(10 + i));
      if (i == 5) b.property("fail", "yes");
      if (feed.push(send_request{"", "sensor", "hold", b.build()})) ++pushed;
    }
    feed.close();
    refused_after_close = !feed.push(send_request{"", "sensor", "hold", message()});
  });
  std::vector<std::size_t> order;
  std::vector<std::string> outcomes;
  auto n = client.send_stream(feed, [&](std::size_t index, const expected<std::uint64_t>& targets) {
    order.push_back(index);
    outcomes.push_back(targets ? std::to_string(*targets) : "error " + targets.err().message);
  });
  producer.join();
  CHECK(pushed.load() == 8);
  CHECK(refused_after_close.load());
  REQUIRE(n.ok());
  CHECK(*n == 8);
  CHECK(order == std::vector<std::size_t>{0, 1, 2, 3, 4, 5, 6, 7});
  CHECK(outcomes == std::vector<std::string>{"10", "11", "12", "13", "14", "error the router refused 15", "16", "17"});
  CHECK(f.node.max_in_flight() == window);  // never more, and all of it used
  CHECK(feed.ended());

  // The connection is reused afterwards.
  CHECK(client.send("leaf", "", "", message_builder().body("x").build()).ok());
}

TEST_CASE("send_stream ends when the connection breaks, reporting only what was answered", "[control_server]") {
  fixture f;
  auto client = f.connect();
  f.node.hold_batch = 100;  // the held ones are never answered

  auto feed = std::make_shared<send_feed>(8);
  REQUIRE(feed->push(send_request{"leaf", "", "", message_builder().body("1").build()}));
  std::atomic<bool> held{false};
  std::atomic<std::size_t> answered{0};
  // Once the first answer was reported, two more that the node holds (what
  // the feed holds at once goes as one batch, answered together); then break
  // the connection (answers travel asynchronously: waiting only for the hold races).
  std::thread breaker([&f, &held, &answered, feed] {
    if (!eventually([&answered] { return answered.load() == 1; }))
      return f.server.stop();
    (void)feed->push(send_request{"", "sensor", "hold", message_builder().body("2").build()});
    (void)feed->push(send_request{"", "sensor", "hold", message_builder().body("3").build()});
    held = eventually([&f] { return f.node.held() == 2; });
    f.server.stop();
  });
  std::vector<std::size_t> reported;
  auto n = client.send_stream(*feed, [&](std::size_t index, const expected<std::uint64_t>& targets) {
    CHECK(targets.ok());
    reported.push_back(index);
    ++answered;
  });
  breaker.join();
  CHECK(held.load());
  REQUIRE_FALSE(n.ok());
  CHECK(n.err().code == errc::unavailable);
  CHECK(n.err().message.find("lost the connection to the canopy node at " + f.socket) == 0);
  CHECK(reported == std::vector<std::size_t>{0});
  CHECK(feed->ended());
  CHECK_FALSE(feed->push(send_request{"leaf", "", "", message()}));  // refused, never blocks
}

TEST_CASE("send_stream waiting for input notices the connection's loss", "[control_server]") {
  fixture f;
  auto client = f.connect();
  send_feed feed(4);  // the producer sends nothing and never closes
  REQUIRE(feed.push(send_request{"leaf", "", "", message_builder().body("1").build()}));
  std::atomic<bool> answered{false};
  std::thread breaker([&] {
    eventually([&] { return answered.load(); });
    f.server.stop();
  });
  std::size_t reported = 0;
  auto n = client.send_stream(feed, [&](std::size_t, const expected<std::uint64_t>&) {
    ++reported;
    answered = true;
  });
  breaker.join();
  REQUIRE_FALSE(n.ok());
  CHECK(n.err().code == errc::unavailable);
  CHECK(reported == 1);
  CHECK(feed.ended());
}
