// canopy::make_bridge — hands one reply from an arbitrary thread back to the
// I/O thread's event loop (DESIGN.md "Threads and I/O"). An RPC method on the
// I/O thread calls into the actor side (node_control, link_host,
// downstream_handler) with the bridge's callback and waits on its promise; the
// actor side answers later, from any thread, without blocking.
#pragma once

#include "gateway/node_control.hpp"  // reply_fn
#include "runtime/expected.hpp"

#include <kj/async.h>

#include <functional>
#include <memory>
#include <string>

namespace canopy {

/// A promise on the I/O thread and a callback that fulfils it from any thread
/// with any value. Dropping the callback unanswered rejects the promise (a
/// kj exception); make_bridge turns that into an error.
template <class T>
struct value_bridge {
  kj::Promise<T> promise;
  std::function<void(T)> callback;  ///< call at most once, from any thread
};

/// On the I/O thread: see value_bridge. Costs one allocation for the shared fulfiller.
template <class T>
value_bridge<T> make_value_bridge() {
  auto paf = kj::newPromiseAndCrossThreadFulfiller<T>();
  // std::function needs a copyable functor: share the (move-only) fulfiller.
  auto fulfiller = std::make_shared<kj::Own<kj::CrossThreadPromiseFulfiller<T>>>(kj::mv(paf.fulfiller));
  return {kj::mv(paf.promise), [fulfiller](T value) { (*fulfiller)->fulfill(kj::mv(value)); }};
}

/// A promise on the I/O thread and the callback that resolves it from any thread.
template <class T>
struct reply_bridge {
  kj::Promise<expected<T>> promise;  ///< resolves on the loop that made the bridge
  reply_fn<T> callback;              ///< call exactly once, from any thread
};

/// On the I/O thread: a promise and a callback that fulfils it from any thread
/// without blocking. If the promise was dropped meanwhile (call cancelled,
/// client gone), fulfilling is a no-op; if the callback is destroyed unused,
/// the promise resolves to errc::failed "<what>: <who> dropped the request
/// without an answer". Costs one allocation for the shared fulfiller.
template <class T>
reply_bridge<T> make_bridge(const char* what, const char* who = "the node") {
  auto bridge = make_value_bridge<expected<T>>();
  auto promise = bridge.promise.catch_(
    [what = std::string(what), who = std::string(who)](kj::Exception&&) -> expected<T> {
      return make_error(errc::failed, what + ": " + who + " dropped the request without an answer");
    });
  return {kj::mv(promise), std::move(bridge.callback)};
}

}  // namespace canopy
