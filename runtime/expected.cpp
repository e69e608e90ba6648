#include "runtime/expected.hpp"

namespace canopy {

const char* to_string(errc code) noexcept {
  switch (code) {
    case errc::invalid_argument: return "invalid_argument";
    case errc::not_found: return "not_found";
    case errc::incompatible: return "incompatible";
    case errc::io_error: return "io_error";
    case errc::store_error: return "store_error";
    case errc::timeout: return "timeout";
    case errc::unavailable: return "unavailable";
    case errc::failed: return "failed";
    case errc::already_exists: return "already_exists";
  }
  return "unknown";
}

}  // namespace canopy
