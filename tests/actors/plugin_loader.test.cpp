#include "actors/plugin_loader.hpp"

#include <catch2/catch.hpp>

#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>

using namespace canopy;
namespace fs = std::filesystem;

namespace {

std::string plugins_dir() {
  const char* d = std::getenv("CANOPY_TEST_PLUGINS");
  REQUIRE(d != nullptr);
  return d;
}

bool contains(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

}  // namespace

TEST_CASE("a module library built with this SDK loads and makes instances") {
  plugin_loader loader{{}};
  auto path = loader.resolve("libtest_plugin_good.so", plugins_dir());
  REQUIRE(path.ok());
  CHECK(fs::path{*path}.is_absolute());
  auto type = loader.load("libtest_plugin_good.so", *path);
  REQUIRE(type.ok());
  auto a = (*type)->create();
  auto b = (*type)->create();
  CHECK(a.get() != nullptr);
  CHECK(a.get() != b.get());
  // The same file loads once.
  auto again = loader.load("libtest_plugin_good.so", *path);
  REQUIRE(again.ok());
  CHECK(again->get() == type->get());
}

TEST_CASE("a library built for another module ABI is refused, naming the file and both versions") {
  plugin_loader loader{{}};
  auto r = loader.resolve("libtest_plugin_bad_abi.so", plugins_dir());
  REQUIRE_FALSE(r.ok());
  CHECK(r.err().code == errc::incompatible);
  auto& msg = r.err().message;
  CHECK(contains(msg, "libtest_plugin_bad_abi.so"));
  CHECK(contains(msg, "module ABI 999"));
  CHECK(contains(msg, "SDK 9.9.9"));
  CHECK(contains(msg, "supports module ABI " + std::to_string(module_abi_version)));
}

TEST_CASE("a shared library without the entry point is not a module") {
  plugin_loader loader{{}};
  auto r = loader.resolve("libtest_plugin_no_entry.so", plugins_dir());
  REQUIRE_FALSE(r.ok());
  CHECK(r.err().code == errc::incompatible);
  CHECK(contains(r.err().message, "libtest_plugin_no_entry.so"));
  CHECK(contains(r.err().message, "canopy_module_entry"));
}

TEST_CASE("a missing library is a clear error naming where it was looked for") {
  plugin_loader loader{{}};
  loader.add_search_dir("/nonexistent-search-dir");
  auto r = loader.resolve("libnope.so", "/tmp");
  REQUIRE_FALSE(r.ok());
  CHECK(r.err().code == errc::not_found);
  CHECK(contains(r.err().message, "libnope.so"));
  CHECK(contains(r.err().message, "/tmp/libnope.so"));
  CHECK(contains(r.err().message, "/nonexistent-search-dir/libnope.so"));
}

TEST_CASE("a file that is not a shared library fails to load with dlopen's reason") {
  auto file = fs::temp_directory_path() / "canopy-not-a-library.so";
  { std::FILE* f = std::fopen(file.c_str(), "w"); std::fputs("hello", f); std::fclose(f); }
  plugin_loader loader{{}};
  auto r = loader.resolve(file.string(), "/");
  fs::remove(file);
  REQUIRE_FALSE(r.ok());
  CHECK(r.err().code == errc::io_error);
  CHECK(contains(r.err().message, "cannot load module library"));
}

TEST_CASE("relative libraries resolve against the search directories too") {
  plugin_loader loader{{}};
  loader.add_search_dir(plugins_dir());
  auto r = loader.resolve("libtest_plugin_good.so", "/nonexistent-base");
  REQUIRE(r.ok());
  CHECK(*r == fs::weakly_canonical(fs::path{plugins_dir()} / "libtest_plugin_good.so").string());
}

TEST_CASE("builtin modules resolve by name; unknown ones list the known names") {
  plugin_loader loader{make_builtin_catalog()};
  auto ok = loader.resolve("builtin:temperature-filter", "");
  REQUIRE(ok.ok());
  CHECK(ok->empty());
  auto type = loader.load("builtin:temperature-filter", "");
  REQUIRE(type.ok());
  CHECK((*type)->create().get() != nullptr);
  auto bad = loader.resolve("builtin:nope", "");
  REQUIRE_FALSE(bad.ok());
  CHECK(contains(bad.err().message, "unknown builtin module 'nope'"));
  CHECK(contains(bad.err().message, "simulated-temperature-sensor"));
}

TEST_CASE("a rebuilt library at the same path is loaded anew") {
  auto dir = fs::temp_directory_path() / ("canopy-reload-" + std::to_string(::getpid()));
  fs::create_directories(dir);
  auto lib = dir / "libm.so";
  fs::copy_file(fs::path{plugins_dir()} / "libtest_plugin_good.so", lib);
  plugin_loader loader{{}};
  auto first = loader.load("libm.so", lib.string());
  REQUIRE(first.ok());
  // "Rebuild": replace the file with a different size and a newer time.
  fs::remove(lib);
  fs::copy_file(fs::path{plugins_dir()} / "libtest_plugin_good.so", lib);
  { std::FILE* f = std::fopen(lib.c_str(), "a"); std::fputs("padding", f); std::fclose(f); }
  auto second = loader.load("libm.so", lib.string());
  fs::remove_all(dir);
  REQUIRE(second.ok());
  CHECK(second->get() != first->get());
}
