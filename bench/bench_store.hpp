// Helpers for the benchmarks that use the message_store directly
// (bench-durable-enqueue's store-alone figure, bench-drain's backlog):
// opening a store and filling it. Router helpers: bench_router.hpp.
#pragma once

#include "bench/bench_common.hpp"
#include "runtime/message_store.hpp"

#include <algorithm>
#include <cstdio>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace canopy::bench {

/// Opens (creating) a message_store in `dir` with default options, or dies.
inline std::unique_ptr<message_store> open_store(std::string_view bench, const std::string& dir) {
  auto s = message_store::open(dir);
  if (!s)
    die(bench, s.err().message);
  return std::move(s).value();
}

/// `count` messages with distinct 100-byte bodies ("0xx...", "1xx...", ...)
/// from module "sensor" output "temp", each to `targets` (borrowed: it must
/// outlive the entries). Build it before a clock starts: building is the
/// sender's cost.
inline std::vector<append_entry> sample_batch(long count, std::span<const route_target> targets) {
  std::vector<append_entry> batch;
  for (long i = 0; i < count; ++i) {
    std::string body(100, 'x');
    std::snprintf(body.data(), body.size(), "%ld", i);
    batch.push_back({message_builder{}.body(body).build(), {"", "sensor", "temp"}, targets});
  }
  return batch;
}

/// Appends `n` messages to `store`, `batch` again and again with one
/// transaction per batch (the last one cut short); dies on the first failure.
inline void append_n(std::string_view bench, message_store& store,
                     const std::vector<append_entry>& batch, long n) {
  const auto size = static_cast<long>(batch.size());
  for (long done = 0; done < n; done += size) {
    const auto take = static_cast<std::size_t>(std::min(size, n - done));
    if (auto r = store.append(std::span<const append_entry>(batch.data(), take)); !r)
      die(bench, r.err().message);
  }
}

}  // namespace canopy::bench
