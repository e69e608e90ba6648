// ASCII character helpers for the hand-written lexers and parsers (route.cpp's
// route language, target_condition.cpp's target conditions, gateway/'s HTTP and
// IoT Hub protocol parsing): locale-free classification, case-insensitive
// comparison, hex digits, and how a byte is shown in an error message. Internal
// to Canopy; header-only, no allocation except describe_char(). A source brings
// them in with `using namespace ascii;` (or names them ascii::...).
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

namespace canopy::ascii {

/// `c` in lower case if it is an ASCII capital letter, else `c` unchanged.
inline char to_lower(char c) noexcept {
  return (c >= 'A' && c <= 'Z') ? static_cast<char>(c - 'A' + 'a') : c;
}

/// `c` in upper case if it is an ASCII small letter, else `c` unchanged.
inline char to_upper(char c) noexcept {
  return (c >= 'a' && c <= 'z') ? static_cast<char>(c - 'a' + 'A') : c;
}

/// True if `a` and `b` are equal ignoring the case of ASCII letters.
inline bool iequals(std::string_view a, std::string_view b) noexcept {
  if (a.size() != b.size())
    return false;
  for (std::size_t i = 0; i < a.size(); ++i)
    if (to_lower(a[i]) != to_lower(b[i]))
      return false;
  return true;
}

/// A-Z a-z.
inline bool is_alpha(char c) noexcept {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
}

/// 0-9.
inline bool is_digit(char c) noexcept {
  return c >= '0' && c <= '9';
}

/// The first character of a keyword or name: A-Z a-z _.
inline bool is_ident_start(char c) noexcept {
  return is_alpha(c) || c == '_';
}

/// A later character of a keyword or name: A-Z a-z 0-9 _.
inline bool is_ident_char(char c) noexcept {
  return is_alpha(c) || is_digit(c) || c == '_';
}

/// The value of hex digit `c` (0-9, a-f, A-F), or -1 if it is not one.
inline int hex_value(char c) noexcept {
  if (c >= '0' && c <= '9')
    return c - '0';
  if (c >= 'a' && c <= 'f')
    return c - 'a' + 10;
  if (c >= 'A' && c <= 'F')
    return c - 'A' + 10;
  return -1;
}

/// Space, tab, line feed, carriage return, form feed or vertical tab.
inline bool is_space(char c) noexcept {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v';
}

/// How a character is shown in an error message: 'x' if printable ASCII,
/// else "byte 0x1f".
inline std::string describe_char(char c) {
  const auto u = static_cast<unsigned char>(c);
  if (u >= 0x20 && u < 0x7f)
    return std::string("'") + c + "'";
  static constexpr char hex[] = "0123456789abcdef";
  std::string s = "byte 0x";
  s += hex[u >> 4];
  s += hex[u & 0xf];
  return s;
}

}  // namespace canopy::ascii
