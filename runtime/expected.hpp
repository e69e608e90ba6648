// canopy::expected<T> — the result type for expected outcomes of input (tier 1 of
// CONVENTIONS.md "Errors"): a value, or an error with a code and a message that
// names the field, column or byte at fault. Never thrown.
#pragma once

#include <string>
#include <utility>
#include <variant>

namespace canopy {

/// What went wrong, coarsely; the message says precisely where and why.
enum class errc {
  invalid_argument = 1,  ///< bad input: a field, value or syntax error
  not_found,             ///< a named thing (module, file, method) does not exist
  incompatible,          ///< a plugin or file of the wrong version/ABI
  io_error,              ///< the OS or a library refused (open, write, dlopen)
  store_error,           ///< SQLite failed or the store is corrupt
  timeout,               ///< no answer within the deadline
  unavailable,           ///< the target exists but is not running now
  failed,                ///< the operation ran and failed (e.g. a handler threw)
  already_exists,        ///< a thing with that name/id exists already (e.g. a device id)
};

/// Short, stable name of an errc, for logs and CLI output.
const char* to_string(errc code) noexcept;

/// An error: code plus a human message naming what was at fault.
struct error {
  errc code = errc::failed;
  std::string message;
};

/// Either a T or an error. Cheap to move; check with `ok()` / `operator bool`.
template <class T>
class [[nodiscard]] expected {
 public:
  expected(T value) : v_(std::move(value)) {}
  expected(error err) : v_(std::move(err)) {}

  bool ok() const noexcept { return v_.index() == 0; }
  explicit operator bool() const noexcept { return ok(); }

  T& value() & { return std::get<0>(v_); }
  const T& value() const& { return std::get<0>(v_); }
  T&& value() && { return std::get<0>(std::move(v_)); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }

  const error& err() const& { return std::get<1>(v_); }
  error&& err() && { return std::get<1>(std::move(v_)); }

 private:
  std::variant<T, error> v_;
};

/// expected<void>: success or an error.
template <>
class [[nodiscard]] expected<void> {
 public:
  expected() = default;
  expected(error err) : err_(std::move(err)), ok_(false) {}

  bool ok() const noexcept { return ok_; }
  explicit operator bool() const noexcept { return ok_; }
  const error& err() const& { return err_; }
  error&& err() && { return std::move(err_); }

 private:
  error err_;
  bool ok_ = true;
};

/// Shorthand to build an error.
inline error make_error(errc code, std::string message) {
  return error{code, std::move(message)};
}

}  // namespace canopy
