// canopy::link_rpc — what both ends of a link share (internal to gateway/,
// used by link_server.cpp and link_client.cpp): errors across the wire,
// conversions between schemas/link.capnp and gateway/link.hpp's types, and the
// bookkeeping that answers every reply exactly once and lets stop() wait
// (with gateway/task_counter.hpp).
//
// Threading: everything here runs on the I/O thread, except drain_posts()
// (any thread but the I/O thread) and the pure functions (any thread).
#pragma once

#include "gateway/io_thread.hpp"
#include "gateway/link.hpp"
#include "gateway/node_control.hpp"  // reply_fn
#include "gateway/task_counter.hpp"
#include "runtime/expected.hpp"

#include <link.capnp.h>

#include <capnp/rpc-twoparty.h>
#include <capnp/rpc.h>
#include <kj/async-io.h>
#include <spdlog/spdlog.h>

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace canopy::link_rpc {

/// The RPC system of one link connection.
using rpc_system = capnp::RpcSystem<capnp::rpc::twoparty::VatId>;

/// How long stop() waits for connections and calls to wind down.
inline constexpr auto stop_wait = 5 * kj::SECONDS;

// --- Errors across the link ------------------------------------------------------

/// Drops the plumbing kj puts into some descriptions: the system call of an OS
/// error ("connect(): Connection refused" -> "Connection refused") and OpenSSL's
/// error code ("OpenSSL error; message = error:0A000086:SSL routines::certificate
/// verify failed" -> "certificate verify failed").
std::string tidy(std::string text);

/// kj's description of `e`, tidied.
std::string text_of(const kj::Exception& e);

/// True if kj's description of `e` is an OpenSSL error (a TLS failure).
bool is_tls_error(const kj::Exception& e);

/// True if `e` is an answer from the other end (it threw), not a failure of
/// the connection itself.
bool is_remote(const kj::Exception& e);

/// An error as an RPC exception. The reason is "<errc name>: <message>", so that
/// from_exception() on the other end gets the code back.
kj::Exception to_exception(const error& err);

/// A failed promise carrying to_exception(make_error(code, message)).
kj::Promise<void> fail(errc code, std::string message);

/// The error an RPC exception stands for: the code and message to_exception()
/// put in (on either end), or unavailable for a lost connection / failed otherwise.
error from_exception(const kj::Exception& e);

/// Runs a callback into the actor side; an exception it throws is logged, never
/// passed to the event loop.
template <class F>
void call_safely(const char* what, F&& fn) {
  try {
    fn();
  } catch (const kj::Exception& e) {
    spdlog::error("link: {} threw: {}", what, text_of(e));
  } catch (const std::exception& e) {
    spdlog::error("link: {} threw: {}", what, e.what());
  } catch (...) {
    spdlog::error("link: {} threw an unknown exception", what);
  }
}

// --- Replies and stop() ------------------------------------------------------------

/// A caller's reply_fn, answered exactly once: by answer(), or with
/// errc::unavailable "<what>: link down" when it is destroyed unanswered (the
/// call was cancelled: connection gone, I/O thread stopped).
template <class T>
class once_reply {
 public:
  /// `what` starts every error message ("upload", "invoke to child 'gw1'").
  once_reply(reply_fn<T> fn, std::string what) : fn_(std::move(fn)), what_(std::move(what)) {}
  ~once_reply() {
    if (fn_)
      answer(make_error(errc::unavailable, what_ + ": link down"));
  }
  once_reply(const once_reply&) = delete;
  once_reply& operator=(const once_reply&) = delete;

  /// Answers (the first call only).
  void answer(expected<T> result) {
    if (!fn_)
      return;
    auto fn = std::move(fn_);
    fn_ = nullptr;
    call_safely(what_.c_str(), [&] { fn(std::move(result)); });
  }

  /// The call's name, for messages.
  const std::string& what() const { return what_; }

 private:
  reply_fn<T> fn_;
  std::string what_;
};

/// Answers `reply` once `promise` settles: with its result, or with the error
/// its exception stands for (from_exception(); prefixed with reply->what()
/// unless the other end threw it). The returned task holds a count of `tasks`
/// until then; add it to the I/O thread's tasks. I/O thread.
template <class T>
kj::Promise<void> answer_when_settled(kj::Promise<expected<T>> promise,
                                      std::shared_ptr<once_reply<T>> reply,
                                      std::shared_ptr<task_counter> tasks) {
  return promise
    .then([reply](expected<T> r) { reply->answer(std::move(r)); },
          [reply](kj::Exception&& e) {
            auto err = from_exception(e);
            if (!is_remote(e))
              err.message = reply->what() + ": " + err.message;
            reply->answer(std::move(err));
          })
    .attach(kj::heap<counted>(std::move(tasks)));
}

/// Blocks until every function posted to `io` before this call has run.
/// Not from the I/O thread.
void drain_posts(io_thread& io);

/// On the I/O thread: resolves once `counter` is idle, or after stop_wait (then
/// logs a warning naming `what`).
kj::Promise<void> wait_idle(task_counter& counter, kj::AsyncIoContext& ctx, const char* what);

// --- Listening (link_server and mqtt_server) -----------------------------------------

/// What listen_and_accept() calls on the I/O thread. Both may hold the server's
/// state alive: they live as long as its accept loop.
struct accept_hooks {
  /// Takes one accepted connection (`timer` is the loop's).
  std::function<void(kj::AuthenticatedStream stream, kj::Timer& timer)> accept;
  /// True once the server is stopping: its accept loop ending is then no error.
  std::function<bool()> stopping;
};

/// A server's start(), from a thread other than the I/O thread, which it blocks
/// until the address is bound: binds `listen` on the I/O thread, stores the port
/// in `port` and accepts connections, handing each to `hooks.accept`, until
/// `accepting` is cancelled. A failed accept (EMFILE) is logged ("<log_name>:
/// accepting on <listen> failed: ...; retrying in 1 s") and retried a second
/// later, keeping the port; a loop that ends while not stopping is logged as an
/// error. io_error "cannot listen on <listen>: <reason>" if the address does not
/// parse or bind (or the I/O thread stopped).
expected<void> listen_and_accept(io_thread& io, const std::string& listen, const char* log_name,
                                 std::atomic<std::uint16_t>& port, kj::Canceler& accepting,
                                 accept_hooks hooks);

/// A server's stop(), from a thread other than the I/O thread, which it blocks:
/// if `io` runs, runs `shut` on the I/O thread (mark the server stopping, cancel
/// its accepting, close its connections), waits for `tasks` (wait_idle() naming
/// `what`; a debug log if the I/O thread stopped meanwhile), then drain_posts().
/// Does nothing if `io` is not running.
void stop_serving(io_thread& io, task_counter& tasks, const char* what,
                  const std::function<void()>& shut);

// --- Small conversions ---------------------------------------------------------------

/// "1500 ms".
std::string ms_text(std::chrono::milliseconds ms);

/// ReaderOptions for every message read from a link connection.
capnp::ReaderOptions reader_options(const link_limits& limits);

/// `ms` clamped to 0 .. UINT32_MAX (invoke's timeoutMs).
std::uint32_t clamp_ms(std::chrono::milliseconds ms);

/// The bytes of `s`, for Data fields (no copy).
kj::ArrayPtr<const kj::byte> bytes_of(std::string_view s);

/// The bytes of a Data field (no copy).
std::string_view view_of(capnp::Data::Reader d);

/// A Text field as a std::string (embedded NULs kept).
std::string string_of(capnp::Text::Reader t);

/// twin_update -> TwinUpdate.
void fill(schema::TwinUpdate::Builder out, const twin_update& in);

/// A list of twin_update -> List(TwinUpdate) of the same size.
void fill(capnp::List<schema::TwinUpdate>::Builder out, const std::vector<twin_update>& in);

/// List(TwinUpdate) -> twin_update.
std::vector<twin_update> read_twins(capnp::List<schema::TwinUpdate>::Reader in);

/// device_record -> DeviceEntry (tags as compact JSON; the time stamps stay behind).
void fill(schema::DeviceEntry::Builder out, const device_record& in);

/// DeviceEntry number `index` of a syncScope -> device_record. An empty
/// tagsJson means {}; tagsJson that is not a JSON object (or is larger than
/// fleet_registry::max_document_bytes) is invalid_argument
/// "syncScope: entry <index> ('<id>'): tagsJson: ...".
expected<device_record> read_entry(schema::DeviceEntry::Reader in, unsigned index);

}  // namespace canopy::link_rpc
