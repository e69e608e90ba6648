// A scratch directory for unit tests (header-only). The integration tests have
// their own, canopy::test::temp_dir in tests/integration/process.hpp.
#pragma once

#include <catch2/catch.hpp>

#include <stdlib.h>  // mkdtemp

#include <filesystem>
#include <string>
#include <string_view>
#include <system_error>

namespace canopy::unit_test {

/// A fresh directory /tmp/<prefix>-XXXXXX (mkdtemp), removed with everything in
/// it when the object goes out of scope. Fails the test (REQUIRE) if it cannot be
/// created. Not copyable.
struct temp_dir {
  /// Creates the directory.
  explicit temp_dir(std::string_view prefix = "canopy-test") {
    std::string tmpl = "/tmp/" + std::string(prefix) + "-XXXXXX";
    const char* p = ::mkdtemp(tmpl.data());
    REQUIRE(p != nullptr);
    path = p;
  }
  /// Removes the directory and its contents; errors are ignored. A test may
  /// have made the directory read-only: write access is given back first.
  ~temp_dir() {
    namespace fs = std::filesystem;
    std::error_code ec;
    fs::permissions(path, fs::perms::owner_all, fs::perm_options::add, ec);
    fs::remove_all(path, ec);
  }
  temp_dir(const temp_dir&) = delete;
  temp_dir& operator=(const temp_dir&) = delete;

  /// The directory's absolute path (no trailing slash).
  std::string path;
};

}  // namespace canopy::unit_test
