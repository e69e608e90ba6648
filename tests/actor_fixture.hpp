// A CAF actor system for a unit test, quiet, with a blocking scoped actor to
// talk to the actors under test. Derived fixtures whose members the actors
// use (clocks, temp dirs, probes) call shutdown() first in their destructor,
// so the actors are gone before those members are.
#pragma once

#include <caf/all.hpp>

#include <memory>

namespace canopy::unit_test {

struct actor_fixture {
  caf::actor_system_config cfg;
  std::unique_ptr<caf::actor_system> sys;
  std::unique_ptr<caf::scoped_actor> self;

  actor_fixture() {
    cfg.set("logger.verbosity", caf::atom("quiet"));
    sys = std::make_unique<caf::actor_system>(cfg);
    self = std::make_unique<caf::scoped_actor>(*sys);
  }
  ~actor_fixture() { shutdown(); }
  actor_fixture(const actor_fixture&) = delete;
  actor_fixture& operator=(const actor_fixture&) = delete;

  /// Stops the actor system (waits for every actor). Idempotent.
  void shutdown() {
    self.reset();
    sys.reset();
  }
};

}  // namespace canopy::unit_test
