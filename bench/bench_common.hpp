// Helpers shared by the benchmarks: percentiles and the RESULT line.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <string>
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

}  // namespace canopy::bench
