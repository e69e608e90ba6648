// canopy::send_later — a message an actor sends itself after a delay on the
// injected clock (runtime/clock.hpp), so that backoff, timeouts and sweeps are
// driven by manual_clock in tests. The message is dropped if the actor is gone
// by then; it holds only a weak reference.
#pragma once

#include "runtime/clock.hpp"

#include <caf/actor_cast.hpp>
#include <caf/local_actor.hpp>
#include <caf/send.hpp>
#include <caf/weak_intrusive_ptr.hpp>

namespace canopy {

/// After `delay` on `clk`, sends `xs...` to `self` (anonymously). Any thread
/// may own `clk`; the callback only sends. Returns the clock's timer id.
template <class... Ts>
clock::timer_id send_later(caf::local_actor* self, clock& clk, clock::duration delay, Ts... xs) {
  auto weak = caf::actor_cast<caf::weak_actor_ptr>(self->ctrl());
  return clk.call_after(delay, [weak, xs...] {
    if (auto a = caf::actor_cast<caf::actor>(weak.lock()))
      caf::anon_send(a, xs...);
  });
}

}  // namespace canopy
