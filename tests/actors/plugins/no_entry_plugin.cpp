// A shared library that is not a module library, for plugin_loader tests: it
// exports a function, but not canopy_module_entry.

extern "C" __attribute__((visibility("default"))) int canopy_test_not_a_module() {
  return 42;
}
