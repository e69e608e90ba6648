// Helpers shared by the benchmarks: percentiles, arguments, stopping on a
// failure, a scratch directory. (The message_store benchmarks' helpers are in
// bench_store.hpp.)
#pragma once

#include <stdlib.h>  // mkdtemp

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

namespace canopy::bench {

using bench_clock = std::chrono::steady_clock;

inline double micros(bench_clock::duration d) {
  return std::chrono::duration<double, std::micro>(d).count();
}

/// The p-th percentile (0..100) of `v` (sorted in place).
inline double percentile(std::vector<double>& v, double p) {
  if (v.empty())
    return 0;
  std::sort(v.begin(), v.end());
  auto idx = static_cast<std::size_t>(p / 100.0 * static_cast<double>(v.size() - 1) + 0.5);
  return v[std::min(idx, v.size() - 1)];
}

/// Reads `--name=value` from argv, else `fallback`.
inline long arg(int argc, char** argv, const std::string& name, long fallback) {
  auto prefix = "--" + name + "=";
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a.rfind(prefix, 0) == 0)
      return std::stol(a.substr(prefix.size()));
  }
  return fallback;
}

/// Stops the benchmark `bench` (its name, e.g. "bench-drain") at the first
/// failure: prints "<bench>: <what>" on stderr and exits with status 1.
[[noreturn]] inline void die(std::string_view bench, const std::string& what) {
  std::fprintf(stderr, "%.*s: %s\n", static_cast<int>(bench.size()), bench.data(), what.c_str());
  std::exit(1);
}

/// A fresh directory /tmp/canopy-<bench>-XXXXXX, removed with its contents at
/// scope end. Not copyable.
struct temp_dir {
  /// Creates it, or dies.
  explicit temp_dir(std::string_view bench) {
    std::string tmpl = "/tmp/canopy-" + std::string(bench) + "-XXXXXX";
    if (::mkdtemp(tmpl.data()) == nullptr)
      die(bench, "mkdtemp failed");
    path = tmpl;
  }
  ~temp_dir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  temp_dir(const temp_dir&) = delete;
  temp_dir& operator=(const temp_dir&) = delete;

  /// The directory's absolute path.
  std::string path;
};

}  // namespace canopy::bench
