// canopy::reply_guard — a callback answered exactly once, carried in actor
// messages: by the actor that handles the call, or, if that actor dies with
// the message in its mailbox or state, by the guard's destructor with
// errc::unavailable. Shared through reply_ptr; called by one thread at a time.
#pragma once

#include "gateway/node_control.hpp"  // reply_fn
#include "runtime/expected.hpp"

#include <caf/allowed_unsafe_message_type.hpp>

#include <cstdint>
#include <memory>
#include <string>
#include <utility>

namespace canopy {

template <class T>
class reply_guard {
 public:
  /// `fn` is answered once; `lost` is the message if nobody answers.
  explicit reply_guard(reply_fn<T> fn, std::string lost = "the node's fleet service restarted; try again")
      : fn_(std::move(fn)), lost_(std::move(lost)) {}
  ~reply_guard() {
    if (fn_)
      fn_(make_error(errc::unavailable, lost_));
  }
  reply_guard(const reply_guard&) = delete;
  reply_guard& operator=(const reply_guard&) = delete;

  /// Answers (the first call only).
  void operator()(expected<T> r) {
    if (auto f = std::exchange(fn_, nullptr))
      f(std::move(r));
  }

 private:
  reply_fn<T> fn_;
  std::string lost_;
};

template <class T>
using reply_ptr = std::shared_ptr<reply_guard<T>>;

/// A guard around `fn`.
template <class T>
reply_ptr<T> guard(reply_fn<T> fn) {
  return std::make_shared<reply_guard<T>>(std::move(fn));
}

}  // namespace canopy

CAF_ALLOW_UNSAFE_MESSAGE_TYPE(canopy::reply_ptr<void>)
