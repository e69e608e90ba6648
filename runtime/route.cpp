#include "runtime/route.hpp"

// The route language, compiled once into an AST that is evaluated per message.
//
//   route     := [SELECT '*'] FROM source [WHERE condition] INTO sink
//   source    := /* | /messages/* | /messages/modules/* | /messages/modules/{id}/*
//              | /messages/modules/{id}/outputs/* | /messages/modules/{id}/outputs/{name}
//   sink      := $upstream | BrokeredEndpoint("/modules/{id}/inputs/{name}")
//
// Keywords (SELECT FROM WHERE INTO AND OR NOT true false null undefined), the
// words of the source and sink paths, system property names and function names
// are case-insensitive; property names, module ids and strings are not.
//
// Conditions (the IoT Hub routing query language), loosest binding first:
//   a ?? b                       coalesce: a unless a is undefined
//   OR, AND                      three-valued: false AND undefined = false,
//                                true OR undefined = true, otherwise undefined
//   NOT a                        (SQL-style: NOT a = b is NOT (a = b); NOT also
//                                works as a prefix operand: a = NOT b)
//   = != <>                      equality
//   < <= > >=                    ordering (numbers, or strings byte-wise)
//   + - ||                       arithmetic; || concatenates two strings
//   * / %
//   -a                           negation
//   primary: 'str' "str" (escapes \' \" \\ \/ \uXXXX), 12 1.5 .5 1e3 0x1F,
//            true false null undefined, (expr), name (application property:
//            [A-Za-z_][A-Za-z0-9_.]*), $name (system property; an application
//            property literally named "$name" wins), {$name} (always the system
//            property), $body, $body.a.b[2]['odd key'], f(args) with f one of
//            abs exp power square ceiling floor sign sqrt as_number is_array
//            is_bool is_defined is_null is_number is_object is_primitive
//            is_string concat length lower upper substring index_of starts_with
//            ends_with contains. Comments /* ... */ are skipped.
// System properties: $contentType $contentEncoding $messageId $correlationId
// $connectionDeviceId $connectionModuleId $outputName $userId (strings) and $ttl
// (a number of seconds); an unset one is undefined. The connection ids and the
// output name come from the message_source the router passes, falling back to
// the message's own system properties.
//
// Values are undefined, null, booleans, numbers (double), strings, and the
// arrays/objects of a JSON body. Property values are strings; wherever a number
// is wanted (arithmetic, math functions, comparing with a number) a string that
// parses fully as a number counts as that number. Any other type mismatch, and
// any operation on undefined, yields undefined; so do division by zero and
// results that are not finite. String positions (length, substring, index_of)
// count UTF-8 code points. $body is evaluated only for content type
// application/json and content encoding utf-8 (both case-insensitive); the body
// is parsed at most once per evaluation, and only when a $body term is reached.
// The WHERE clause holds only if the condition is true: undefined, null and
// non-boolean results count as false.
//
// Errors read "route 'NAME': column N: what" with N the 1-based byte column in
// the route text. The text is bounded (max_route_length), and so are nesting
// (64 levels of parentheses, unary operators and calls) and the height of the
// expression tree (256), so no input can exhaust the stack.

#include "runtime/ascii.hpp"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <forward_list>
#include <limits>
#include <optional>
#include <vector>

namespace canopy {

// -- names --------------------------------------------------------------------

bool is_valid_module_name(std::string_view name) noexcept {
  if (name.empty() || name.size() > 64)
    return false;
  for (char c : name) {
    bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_'
              || c == '.' || c == '-';
    if (!ok)
      return false;
  }
  return true;
}

std::string route_sink::to_string() const {
  if (type == kind::upstream)
    return "$upstream";
  return "/modules/" + module + "/inputs/" + input;
}

namespace route_detail {

constexpr int max_nesting = 64;
constexpr int max_height = 256;

using namespace ascii;

// A number written in full, as in a property value: optional sign, digits with
// an optional fraction and exponent. No "inf"/"nan", no spaces, no hex.
std::optional<double> parse_full_number(std::string_view s) noexcept {
  if (!s.empty() && s.front() == '+')
    s.remove_prefix(1);
  std::string_view digits = s;
  if (!digits.empty() && digits.front() == '-')
    digits.remove_prefix(1);
  if (digits.empty() || !(is_digit(digits.front()) || digits.front() == '.'))
    return std::nullopt;
  double v = 0;
  auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v, std::chars_format::general);
  if (ec != std::errc{} || end != s.data() + s.size() || !std::isfinite(v))
    return std::nullopt;
  return v;
}

// -- values -------------------------------------------------------------------

enum class kind : std::uint8_t { undefined, null, boolean, number, string, array, object };

// A value during evaluation. Strings are views: into the message, the compiled
// route (literals), the parsed body or the evaluation's scratch storage, all of
// which outlive the evaluation.
struct value {
  kind k = kind::undefined;
  bool b = false;
  double n = 0;
  std::string_view s;

  static value undefined() { return {}; }
  static value null() { return {kind::null, false, 0, {}}; }
  static value boolean(bool v) { return {kind::boolean, v, 0, {}}; }
  static value number(double v) {
    return std::isfinite(v) ? value{kind::number, false, v, {}} : value{};
  }
  static value string(std::string_view v) { return {kind::string, false, 0, v}; }
};

// A number, or a string that parses fully as one.
std::optional<double> as_number(const value& v) noexcept {
  if (v.k == kind::number)
    return v.n;
  if (v.k == kind::string)
    return parse_full_number(v.s);
  return std::nullopt;
}

// UTF-8 code points: every byte that is not a continuation byte starts one.
bool starts_code_point(char c) noexcept {
  return (static_cast<unsigned char>(c) & 0xC0) != 0x80;
}

std::size_t code_points(std::string_view s) noexcept {
  std::size_t n = 0;
  for (char c : s)
    n += starts_code_point(c) ? 1 : 0;
  return n;
}

// Byte offset of code point `index` (s.size() if past the end).
std::size_t byte_offset(std::string_view s, std::size_t index) noexcept {
  std::size_t seen = 0;
  for (std::size_t i = 0; i < s.size(); ++i) {
    if (starts_code_point(s[i])) {
      if (seen == index)
        return i;
      ++seen;
    }
  }
  return s.size();
}

// -- the tree -----------------------------------------------------------------

enum class op : std::uint8_t {
  literal,
  app_property,  // name
  sys_property,  // $name: application property "$name" first, then the system one
  sys_forced,    // {$name}
  body,          // $body path
  negate,
  not_,
  mul,
  div,
  mod,
  add,
  sub,
  concat,
  lt,
  le,
  gt,
  ge,
  eq,
  ne,
  and_,
  or_,
  coalesce,
  call,
};

enum class sys_prop : std::uint8_t {
  content_type,
  content_encoding,
  message_id,
  correlation_id,
  connection_device_id,
  connection_module_id,
  output_name,
  user_id,
  ttl,
  body,
};

struct sys_prop_name {
  std::string_view name;
  sys_prop prop;
};

constexpr sys_prop_name sys_prop_names[] = {
  {"contentType", sys_prop::content_type},
  {"contentEncoding", sys_prop::content_encoding},
  {"messageId", sys_prop::message_id},
  {"correlationId", sys_prop::correlation_id},
  {"connectionDeviceId", sys_prop::connection_device_id},
  {"connectionModuleId", sys_prop::connection_module_id},
  {"outputName", sys_prop::output_name},
  {"userId", sys_prop::user_id},
  {"ttl", sys_prop::ttl},
  {"body", sys_prop::body},
};

enum class fn : std::uint8_t {
  abs,
  exp,
  power,
  square,
  ceiling,
  floor,
  sign,
  sqrt,
  as_number,
  is_array,
  is_bool,
  is_defined,
  is_null,
  is_number,
  is_object,
  is_primitive,
  is_string,
  concat,
  length,
  lower,
  upper,
  substring,
  index_of,
  starts_with,
  ends_with,
  contains,
};

struct fn_info {
  std::string_view name;
  fn f;
  std::size_t min_args;
  std::size_t max_args;
};

constexpr fn_info functions[] = {
  {"abs", fn::abs, 1, 1},
  {"exp", fn::exp, 1, 1},
  {"power", fn::power, 2, 2},
  {"square", fn::square, 1, 1},
  {"ceiling", fn::ceiling, 1, 1},
  {"floor", fn::floor, 1, 1},
  {"sign", fn::sign, 1, 1},
  {"sqrt", fn::sqrt, 1, 1},
  {"as_number", fn::as_number, 1, 1},
  {"is_array", fn::is_array, 1, 1},
  {"is_bool", fn::is_bool, 1, 1},
  {"is_defined", fn::is_defined, 1, 1},
  {"is_null", fn::is_null, 1, 1},
  {"is_number", fn::is_number, 1, 1},
  {"is_object", fn::is_object, 1, 1},
  {"is_primitive", fn::is_primitive, 1, 1},
  {"is_string", fn::is_string, 1, 1},
  {"concat", fn::concat, 2, 64},
  {"length", fn::length, 1, 1},
  {"lower", fn::lower, 1, 1},
  {"upper", fn::upper, 1, 1},
  {"substring", fn::substring, 2, 3},
  {"index_of", fn::index_of, 2, 2},
  {"starts_with", fn::starts_with, 2, 2},
  {"ends_with", fn::ends_with, 2, 2},
  {"contains", fn::contains, 2, 2},
};

// One step of a $body path: .key / ['key'] or [index].
struct body_step {
  bool is_index = false;
  std::size_t index = 0;
  std::string key;
};

struct node {
  op oper = op::literal;
  int height = 1;
  value lit;         // literal (strings point into text)
  std::string text;  // string literal or property name
  sys_prop prop = sys_prop::content_type;
  fn func = fn::abs;
  std::vector<body_step> path;
  std::vector<std::unique_ptr<node>> args;
};

// -- evaluation ---------------------------------------------------------------

struct eval_context {
  const message& msg;
  const message_source& src;
  bool body_tried = false;
  std::optional<nlohmann::json> body;      // set once parsed as JSON
  std::forward_list<std::string> scratch;  // strings computed during evaluation (stable
                                           // addresses; no allocation until used)

  std::string_view keep(std::string s) { return scratch.emplace_front(std::move(s)); }
};

bool is_json_utf8(const message& msg) {
  std::string_view type = msg.content_type();
  if (auto semi = type.find(';'); semi != std::string_view::npos)
    type = type.substr(0, semi);
  while (!type.empty() && is_space(type.front()))
    type.remove_prefix(1);
  while (!type.empty() && is_space(type.back()))
    type.remove_suffix(1);
  return iequals(type, "application/json") && iequals(msg.content_encoding(), "utf-8");
}

value from_json(const nlohmann::json& j) {
  switch (j.type()) {
    case nlohmann::json::value_t::null: return value::null();
    case nlohmann::json::value_t::boolean: return value::boolean(j.get<bool>());
    case nlohmann::json::value_t::number_integer:
    case nlohmann::json::value_t::number_unsigned:
    case nlohmann::json::value_t::number_float: return value::number(j.get<double>());
    case nlohmann::json::value_t::string: return value::string(j.get_ref<const std::string&>());
    case nlohmann::json::value_t::array: return {kind::array, false, 0, {}};
    case nlohmann::json::value_t::object: return {kind::object, false, 0, {}};
    default: return value::undefined();
  }
}

value body_value(const node& n, eval_context& ctx) {
  if (!ctx.body_tried) {
    ctx.body_tried = true;
    if (is_json_utf8(ctx.msg)) {
      std::string_view text = ctx.msg.body();
      // Never throws: invalid JSON (including invalid UTF-8) gives a discarded value.
      auto j = nlohmann::json::parse(text.begin(), text.end(), nullptr, false);
      if (!j.is_discarded())
        ctx.body.emplace(std::move(j));
    }
  }
  if (!ctx.body)
    return value::undefined();
  const nlohmann::json* cur = &*ctx.body;
  for (const body_step& step : n.path) {
    if (step.is_index) {
      if (!cur->is_array() || step.index >= cur->size())
        return value::undefined();
      cur = &(*cur)[step.index];
    } else {
      if (!cur->is_object())
        return value::undefined();
      auto it = cur->find(step.key);
      if (it == cur->end())
        return value::undefined();
      cur = &*it;
    }
  }
  return from_json(*cur);
}

value string_or_undefined(std::string_view s) {
  return s.empty() ? value::undefined() : value::string(s);
}

value system_value(const node& n, eval_context& ctx) {
  const message& m = ctx.msg;
  switch (n.prop) {
    case sys_prop::content_type: return string_or_undefined(m.content_type());
    case sys_prop::content_encoding: return string_or_undefined(m.content_encoding());
    case sys_prop::message_id: return string_or_undefined(m.message_id());
    case sys_prop::correlation_id: return string_or_undefined(m.correlation_id());
    case sys_prop::connection_device_id:
      return string_or_undefined(!ctx.src.device.empty() ? ctx.src.device
                                                         : m.connection_device_id());
    case sys_prop::connection_module_id:
      return string_or_undefined(!ctx.src.module.empty() ? ctx.src.module
                                                         : m.connection_module_id());
    case sys_prop::output_name:
      return string_or_undefined(!ctx.src.output.empty() ? ctx.src.output : m.output_name());
    case sys_prop::user_id: return string_or_undefined(m.user_id());
    case sys_prop::ttl: return m.ttl_secs() == 0 ? value::undefined() : value::number(m.ttl_secs());
    case sys_prop::body: return body_value(n, ctx);
  }
  return value::undefined();
}

value eval(const node& n, eval_context& ctx);

value arithmetic(op o, const value& a, const value& b) {
  auto x = as_number(a);
  auto y = as_number(b);
  if (!x || !y)
    return value::undefined();
  switch (o) {
    case op::add: return value::number(*x + *y);
    case op::sub: return value::number(*x - *y);
    case op::mul: return value::number(*x * *y);
    case op::div: return *y == 0 ? value::undefined() : value::number(*x / *y);
    case op::mod: return *y == 0 ? value::undefined() : value::number(std::fmod(*x, *y));
    default: return value::undefined();
  }
}

// -1, 0, 1, or nullopt when the two cannot be compared.
std::optional<int> order(const value& a, const value& b) {
  if (a.k == kind::string && b.k == kind::string) {
    int c = a.s.compare(b.s);
    return c < 0 ? -1 : (c > 0 ? 1 : 0);
  }
  if ((a.k == kind::number || a.k == kind::string)
      && (b.k == kind::number || b.k == kind::string)) {
    auto x = as_number(a);
    auto y = as_number(b);
    if (!x || !y)
      return std::nullopt;
    return *x < *y ? -1 : (*x > *y ? 1 : 0);
  }
  return std::nullopt;
}

value compare(op o, const value& a, const value& b) {
  if (a.k == kind::undefined || b.k == kind::undefined)
    return value::undefined();
  if (o == op::eq || o == op::ne) {
    std::optional<bool> equal;
    if (a.k == kind::boolean && b.k == kind::boolean)
      equal = a.b == b.b;
    else if (a.k == kind::null && b.k == kind::null)
      equal = true;
    else if (auto c = order(a, b))
      equal = *c == 0;
    if (!equal)
      return value::undefined();
    return value::boolean(o == op::eq ? *equal : !*equal);
  }
  auto c = order(a, b);
  if (!c)
    return value::undefined();
  switch (o) {
    case op::lt: return value::boolean(*c < 0);
    case op::le: return value::boolean(*c <= 0);
    case op::gt: return value::boolean(*c > 0);
    case op::ge: return value::boolean(*c >= 0);
    default: return value::undefined();
  }
}

value math1(fn f, const value& a) {
  auto x = as_number(a);
  if (!x)
    return value::undefined();
  switch (f) {
    case fn::abs: return value::number(std::fabs(*x));
    case fn::exp: return value::number(std::exp(*x));
    case fn::square: return value::number(*x * *x);
    case fn::ceiling: return value::number(std::ceil(*x));
    case fn::floor: return value::number(std::floor(*x));
    case fn::sign: return value::number(*x > 0 ? 1.0 : (*x < 0 ? -1.0 : 0.0));
    case fn::sqrt: return *x < 0 ? value::undefined() : value::number(std::sqrt(*x));
    default: return value::undefined();
  }
}

// A string position or length argument: a number (or numeric string),
// truncated toward zero and clamped to [0, limit].
std::optional<std::size_t> position_arg(const value& v, std::size_t limit) {
  auto x = as_number(v);
  if (!x)
    return std::nullopt;
  double t = std::trunc(*x);
  if (t <= 0)
    return 0;
  if (t >= static_cast<double>(limit))
    return limit;
  return static_cast<std::size_t>(t);
}

value call(const node& n, eval_context& ctx) {
  // Evaluate every argument once; only concat() may have more than 3.
  std::array<value, 3> small;
  std::vector<value> big;
  const std::size_t argc = n.args.size();
  value* a = small.data();
  if (argc > small.size()) {
    big.resize(argc);
    a = big.data();
  }
  for (std::size_t i = 0; i < argc; ++i)
    a[i] = eval(*n.args[i], ctx);
  auto both_strings = [&] { return a[0].k == kind::string && a[1].k == kind::string; };
  switch (n.func) {
    case fn::abs:
    case fn::exp:
    case fn::square:
    case fn::ceiling:
    case fn::floor:
    case fn::sign:
    case fn::sqrt: return math1(n.func, a[0]);
    case fn::power: {
      auto x = as_number(a[0]);
      auto y = as_number(a[1]);
      if (!x || !y)
        return value::undefined();
      return value::number(std::pow(*x, *y));
    }
    case fn::as_number: {
      auto x = as_number(a[0]);
      return x ? value::number(*x) : value::undefined();
    }
    case fn::is_array: return value::boolean(a[0].k == kind::array);
    case fn::is_bool: return value::boolean(a[0].k == kind::boolean);
    case fn::is_defined: return value::boolean(a[0].k != kind::undefined);
    case fn::is_null: return value::boolean(a[0].k == kind::null);
    case fn::is_number: return value::boolean(a[0].k == kind::number);
    case fn::is_object: return value::boolean(a[0].k == kind::object);
    case fn::is_primitive:
      return value::boolean(a[0].k == kind::null || a[0].k == kind::boolean
                            || a[0].k == kind::number || a[0].k == kind::string);
    case fn::is_string: return value::boolean(a[0].k == kind::string);
    case fn::concat: {
      std::string out;
      for (std::size_t i = 0; i < argc; ++i) {
        if (a[i].k != kind::string)
          return value::undefined();
        out += a[i].s;
      }
      return value::string(ctx.keep(std::move(out)));
    }
    case fn::length:
      if (a[0].k != kind::string)
        return value::undefined();
      return value::number(static_cast<double>(code_points(a[0].s)));
    case fn::lower:
    case fn::upper: {
      if (a[0].k != kind::string)
        return value::undefined();
      std::string out{a[0].s};
      for (char& c : out)
        c = n.func == fn::lower ? to_lower(c) : to_upper(c);
      return value::string(ctx.keep(std::move(out)));
    }
    case fn::substring: {
      if (a[0].k != kind::string)
        return value::undefined();
      std::size_t total = code_points(a[0].s);
      auto start = position_arg(a[1], total);
      if (!start)
        return value::undefined();
      std::size_t count = total - *start;
      if (argc == 3) {
        auto c = position_arg(a[2], total - *start);
        if (!c)
          return value::undefined();
        count = *c;
      }
      std::size_t from = byte_offset(a[0].s, *start);
      std::size_t to = byte_offset(a[0].s, *start + count);
      return value::string(a[0].s.substr(from, to - from));
    }
    case fn::index_of: {
      if (!both_strings())
        return value::undefined();
      auto at = a[0].s.find(a[1].s);
      if (at == std::string_view::npos)
        return value::number(-1);
      return value::number(static_cast<double>(code_points(a[0].s.substr(0, at))));
    }
    case fn::starts_with:
      if (!both_strings())
        return value::undefined();
      return value::boolean(a[0].s.substr(0, a[1].s.size()) == a[1].s);
    case fn::ends_with:
      if (!both_strings())
        return value::undefined();
      return value::boolean(a[0].s.size() >= a[1].s.size()
                            && a[0].s.substr(a[0].s.size() - a[1].s.size()) == a[1].s);
    case fn::contains:
      if (!both_strings())
        return value::undefined();
      return value::boolean(a[0].s.find(a[1].s) != std::string_view::npos);
  }
  return value::undefined();
}

value eval(const node& n, eval_context& ctx) {
  switch (n.oper) {
    case op::literal: return n.lit;
    case op::app_property: {
      auto p = ctx.msg.property(n.text);
      return p ? value::string(*p) : value::undefined();
    }
    case op::sys_property:
      if (n.prop != sys_prop::body) {
        if (auto p = ctx.msg.property(n.text))
          return value::string(*p);
      }
      return system_value(n, ctx);
    case op::sys_forced: return system_value(n, ctx);
    case op::body: return body_value(n, ctx);
    case op::negate: {
      auto x = as_number(eval(*n.args[0], ctx));
      return x ? value::number(-*x) : value::undefined();
    }
    case op::not_: {
      value v = eval(*n.args[0], ctx);
      return v.k == kind::boolean ? value::boolean(!v.b) : value::undefined();
    }
    case op::mul:
    case op::div:
    case op::mod:
    case op::add:
    case op::sub: return arithmetic(n.oper, eval(*n.args[0], ctx), eval(*n.args[1], ctx));
    case op::concat: {
      value a = eval(*n.args[0], ctx);
      value b = eval(*n.args[1], ctx);
      if (a.k != kind::string || b.k != kind::string)
        return value::undefined();
      std::string out;
      out.reserve(a.s.size() + b.s.size());
      out.append(a.s).append(b.s);
      return value::string(ctx.keep(std::move(out)));
    }
    case op::lt:
    case op::le:
    case op::gt:
    case op::ge:
    case op::eq:
    case op::ne: {
      value a = eval(*n.args[0], ctx);
      value b = eval(*n.args[1], ctx);
      return compare(n.oper, a, b);
    }
    case op::and_: {
      value a = eval(*n.args[0], ctx);
      if (a.k == kind::boolean && !a.b)
        return value::boolean(false);
      value b = eval(*n.args[1], ctx);
      if (b.k == kind::boolean && !b.b)
        return value::boolean(false);
      if (a.k == kind::boolean && b.k == kind::boolean)
        return value::boolean(true);
      return value::undefined();
    }
    case op::or_: {
      value a = eval(*n.args[0], ctx);
      if (a.k == kind::boolean && a.b)
        return value::boolean(true);
      value b = eval(*n.args[1], ctx);
      if (b.k == kind::boolean && b.b)
        return value::boolean(true);
      if (a.k == kind::boolean && b.k == kind::boolean)
        return value::boolean(false);
      return value::undefined();
    }
    case op::coalesce: {
      value a = eval(*n.args[0], ctx);
      return a.k != kind::undefined ? a : eval(*n.args[1], ctx);
    }
    case op::call: return call(n, ctx);
  }
  return value::undefined();
}

// -- lexing -------------------------------------------------------------------

enum class tok : std::uint8_t {
  end,
  ident,    // text = the identifier
  sysprop,  // text = the name after '$'; path for $body
  string,   // text = decoded contents
  number,   // num
  lparen,
  rparen,
  lbrace,
  rbrace,
  comma,
  plus,
  minus,
  star,
  slash,
  percent,
  concat,    // ||
  coalesce,  // ??
  eq,
  ne,
  lt,
  le,
  gt,
  ge,
};

struct token {
  tok type = tok::end;
  std::size_t pos = 0;  // byte offset of the token's first character
  std::size_t len = 0;
  std::string text;
  double num = 0;
  std::vector<body_step> path;
};

struct syntax_error {
  std::size_t pos = 0;
  std::string what;
};

// The parsed pieces of a route, before they become a route.
struct route_parts {
  bool modules_only = false;
  std::string source_module;
  std::string source_output;
  bool any_output = true;
  route_sink sink;
  std::unique_ptr<node> where;
};

// The parser of one route. Functions that can fail return false / nullptr after
// recording the first error in err_.
class parser {
 public:
  explicit parser(std::string_view text) : text_(text) {}

  std::optional<syntax_error> err_;

  // route := [SELECT '*'] FROM source [WHERE condition] INTO sink
  bool parse_route(route_parts& out);

 private:
  // ---- character level ----
  bool at_end() const { return pos_ >= text_.size(); }
  char peek(std::size_t ahead = 0) const {
    return pos_ + ahead < text_.size() ? text_[pos_ + ahead] : '\0';
  }

  bool fail(std::size_t pos, std::string what) {
    if (!err_)
      err_ = syntax_error{pos, std::move(what)};
    return false;
  }

  std::nullptr_t fail_node(std::size_t pos, std::string what) {
    fail(pos, std::move(what));
    return nullptr;
  }

  // Skips white space, and in conditions also /* comments */ (not elsewhere:
  // "FROM /* WHERE" is a source path).
  bool skip_space(bool comments = false) {
    for (;;) {
      while (!at_end() && is_space(peek()))
        ++pos_;
      if (comments && peek() == '/' && peek(1) == '*') {
        auto close = text_.find("*/", pos_ + 2);
        if (close == std::string_view::npos)
          return fail(pos_, "unterminated comment");
        pos_ = close + 2;
        continue;
      }
      return true;
    }
  }

  // The word (letters, digits, '_') at the cursor, without consuming it.
  std::string_view peek_word() const {
    std::size_t end = pos_;
    while (end < text_.size() && is_ident_char(text_[end]))
      ++end;
    return text_.substr(pos_, end - pos_);
  }

  // What the cursor is on, for "found ..." in messages.
  std::string found_here() const {
    if (at_end())
      return "end of route";
    auto w = peek_word();
    if (!w.empty())
      return "'" + std::string(w) + "'";
    return describe_char(peek());
  }

  bool expect_keyword(std::string_view kw) {
    if (!skip_space())
      return false;
    if (!iequals(peek_word(), kw))
      return fail(pos_, "expected " + std::string(kw) + ", found " + found_here());
    pos_ += kw.size();
    return true;
  }

  bool parse_source(route_parts& out);
  bool parse_sink(route_parts& out);

  // ---- condition tokens ----
  bool next();  // lexes the token after cur_ into cur_
  bool lex_string(token& t);
  bool lex_number(token& t);
  bool lex_sysprop(token& t);
  std::string describe(const token& t) const;

  // ---- condition grammar ----
  std::unique_ptr<node> parse_coalesce();
  std::unique_ptr<node> parse_or();
  std::unique_ptr<node> parse_and();
  std::unique_ptr<node> parse_not();
  std::unique_ptr<node> parse_equality();
  std::unique_ptr<node> parse_relational();
  std::unique_ptr<node> parse_additive();
  std::unique_ptr<node> parse_multiplicative();
  std::unique_ptr<node> parse_unary();
  std::unique_ptr<node> parse_primary();
  std::unique_ptr<node> parse_call(token name);
  std::unique_ptr<node> make_binary(op o, std::size_t pos, std::unique_ptr<node> l,
                                    std::unique_ptr<node> r);
  std::unique_ptr<node> make_unary(op o, std::size_t pos, std::unique_ptr<node> a);

  bool is_keyword(const token& t, std::string_view kw) const {
    return t.type == tok::ident && iequals(t.text, kw);
  }

  // Counts one level of nesting; fails past max_nesting.
  bool enter(std::size_t pos) {
    if (++depth_ > max_nesting)
      return fail(
        pos, "expression nested too deeply (more than " + std::to_string(max_nesting) + " levels)");
    return true;
  }
  void leave() { --depth_; }

  std::string_view text_;
  std::size_t pos_ = 0;
  token cur_;
  int depth_ = 0;
};

}  // namespace route_detail

/// A compiled WHERE clause.
class condition {
 public:
  explicit condition(std::unique_ptr<route_detail::node> root) : root_(std::move(root)) {}

  bool holds(const message& msg, const message_source& src) const {
    route_detail::eval_context ctx{msg, src, false, std::nullopt, {}};
    route_detail::value v = route_detail::eval(*root_, ctx);
    return v.k == route_detail::kind::boolean && v.b;
  }

 private:
  std::unique_ptr<route_detail::node> root_;
};

namespace route_detail {

// ---- route structure --------------------------------------------------------

bool parser::parse_route(route_parts& out) {
  if (!skip_space())
    return false;
  if (iequals(peek_word(), "select")) {
    pos_ += 6;
    if (!skip_space())
      return false;
    if (peek() != '*')
      return fail(pos_, "expected '*' after SELECT, found " + found_here());
    ++pos_;
    if (!expect_keyword("FROM"))
      return false;
  } else if (iequals(peek_word(), "from")) {
    pos_ += 4;
  } else {
    return fail(pos_, "expected FROM, found " + found_here());
  }
  if (!parse_source(out) || !skip_space())
    return false;

  if (iequals(peek_word(), "where")) {
    pos_ += 5;
    if (!next())
      return false;
    if (cur_.type == tok::end || is_keyword(cur_, "into"))
      return fail(cur_.pos, "expected a condition after WHERE, found " + describe(cur_));
    out.where = parse_coalesce();
    if (!out.where)
      return false;
    if (!is_keyword(cur_, "into")) {
      if (cur_.type == tok::end)
        return fail(cur_.pos, "expected INTO, found end of route");
      return fail(cur_.pos, "expected an operator or INTO, found " + describe(cur_));
    }
    pos_ = cur_.pos + 4;
  } else if (iequals(peek_word(), "into")) {
    pos_ += 4;
  } else {
    return fail(pos_, "expected WHERE or INTO, found " + found_here());
  }

  if (!parse_sink(out) || !skip_space())
    return false;
  if (!at_end())
    return fail(pos_, "unexpected " + found_here() + " after the sink");
  return true;
}

// The segments of a '/'-separated path, each with its byte offset.
struct segment {
  std::string_view text;
  std::size_t pos;
};

std::vector<segment> split_path(std::string_view path, std::size_t base) {
  std::vector<segment> out;
  std::size_t start = 1;  // after the leading '/'
  for (;;) {
    auto slash = path.find('/', start);
    auto end = slash == std::string_view::npos ? path.size() : slash;
    out.push_back({path.substr(start, end - start), base + start});
    if (slash == std::string_view::npos)
      return out;
    start = slash + 1;
  }
}

const char* const name_rule = "use 1 to 64 of A-Z a-z 0-9 _ . -";

bool parser::parse_source(route_parts& out) {
  if (!skip_space())
    return false;
  std::size_t start = pos_;
  while (!at_end() && !is_space(peek()))
    ++pos_;
  std::string_view path = text_.substr(start, pos_ - start);
  if (path.empty())
    return fail(start, "expected a source after FROM, found end of route");
  if (path.front() != '/')
    return fail(start,
                "expected a source path starting with '/', found " + describe_char(path.front()));
  auto seg = split_path(path, start);
  auto end_pos = start + path.size();
  for (const auto& s : seg)
    if (s.text.empty() && &s != &seg.back())
      return fail(s.pos, "empty segment in source path");

  // Reports what may follow after segment `i` when the path ends or goes wrong there.
  auto expect_at = [&](std::size_t i, const char* what) {
    std::size_t p = i < seg.size() ? seg[i].pos : end_pos;
    std::string found = i < seg.size()
                          ? (seg[i].text.empty() ? "nothing" : "'" + std::string(seg[i].text) + "'")
                          : "end of path";
    return fail(p, std::string("expected ") + what + " in the source, found " + found);
  };
  auto must_end_after = [&](std::size_t i) {
    if (seg.size() > i + 1)
      return fail(seg[i + 1].pos - 1, "unexpected '/" + std::string(seg[i + 1].text) + "' after '"
                                        + std::string(seg[i].text) + "' in the source");
    return true;
  };

  if (seg[0].text == "*")
    return must_end_after(0);
  if (!iequals(seg[0].text, "messages"))
    return expect_at(0, "'*' or 'messages'");
  if (seg.size() < 2)
    return expect_at(1, "'/*' or '/modules' after /messages");
  if (seg[1].text == "*")
    return must_end_after(1);
  if (!iequals(seg[1].text, "modules"))
    return expect_at(1, "'*' or 'modules'");
  out.modules_only = true;
  if (seg.size() < 3 || seg[2].text.empty())
    return expect_at(2, "'*' or a module id after /messages/modules/");
  if (seg[2].text == "*")
    return must_end_after(2);
  if (!is_valid_module_name(seg[2].text))
    return fail(seg[2].pos, "invalid module id '" + std::string(seg[2].text) + "' in the source ("
                              + name_rule + ")");
  out.source_module = std::string(seg[2].text);
  if (seg.size() < 4 || seg[3].text.empty())
    return expect_at(3, "'*' or 'outputs' after the module id");
  if (seg[3].text == "*")
    return must_end_after(3);
  if (!iequals(seg[3].text, "outputs"))
    return expect_at(3, "'*' or 'outputs' after the module id");
  if (seg.size() < 5 || seg[4].text.empty())
    return expect_at(4, "'*' or an output name after /outputs/");
  if (seg[4].text == "*")
    return must_end_after(4);
  if (!is_valid_module_name(seg[4].text))
    return fail(seg[4].pos, "invalid output name '" + std::string(seg[4].text) + "' in the source ("
                              + name_rule + ")");
  out.any_output = false;
  out.source_output = std::string(seg[4].text);
  return must_end_after(4);
}

bool parser::parse_sink(route_parts& out) {
  if (!skip_space())
    return false;
  std::size_t start = pos_;
  if (peek() == '$') {
    ++pos_;
    auto w = peek_word();
    pos_ += w.size();
    if (!iequals(w, "upstream"))
      return fail(start,
                  "unknown endpoint '$" + std::string(w)
                    + "'; expected $upstream or BrokeredEndpoint(\"/modules/{id}/inputs/{name}\")");
    out.sink = route_sink{};
    return true;
  }
  auto w = peek_word();
  if (!iequals(w, "BrokeredEndpoint"))
    return fail(start,
                "expected $upstream or BrokeredEndpoint(\"/modules/{id}/inputs/{name}\"), found "
                  + found_here());
  pos_ += w.size();
  if (!skip_space())
    return false;
  if (peek() != '(')
    return fail(pos_, "expected '(' after BrokeredEndpoint, found " + found_here());
  ++pos_;
  if (!skip_space())
    return false;
  if (peek() != '"' && peek() != '\'')
    return fail(pos_, "expected a quoted endpoint path, found " + found_here());
  token t;
  t.pos = pos_;
  if (!lex_string(t))
    return false;
  std::string_view path = t.text;
  std::size_t path_pos = t.pos + 1;  // the path's first character (no escapes expected)
  if (!skip_space())
    return false;
  if (peek() != ')')
    return fail(pos_, "expected ')' after the endpoint path, found " + found_here());
  ++pos_;

  static const char* const shape = "/modules/{id}/inputs/{name}";
  if (path.empty() || path.front() != '/')
    return fail(path_pos, std::string("expected an endpoint path of the form ") + shape);
  auto seg = split_path(path, path_pos);
  if (!iequals(seg[0].text, "modules"))
    return fail(seg[0].pos, std::string("expected 'modules' in the endpoint path (") + shape + ")");
  if (seg.size() < 2 || !is_valid_module_name(seg[1].text)) {
    std::string id = seg.size() < 2 ? "" : std::string(seg[1].text);
    return fail(seg.size() < 2 ? path_pos + path.size() : seg[1].pos,
                "invalid module id '" + id + "' in the endpoint path (" + name_rule + ")");
  }
  if (seg.size() < 3 || !iequals(seg[2].text, "inputs"))
    return fail(
      seg.size() < 3 ? path_pos + path.size() : seg[2].pos,
      std::string("expected 'inputs' after the module id in the endpoint path (") + shape + ")");
  if (seg.size() < 4 || !is_valid_module_name(seg[3].text)) {
    std::string in = seg.size() < 4 ? "" : std::string(seg[3].text);
    return fail(seg.size() < 4 ? path_pos + path.size() : seg[3].pos,
                "invalid input name '" + in + "' in the endpoint path (" + name_rule + ")");
  }
  if (seg.size() > 4)
    return fail(
      seg[4].pos - 1,
      std::string("unexpected text after the input name in the endpoint path (") + shape + ")");
  out.sink.type = route_sink::kind::module_input;
  out.sink.module = std::string(seg[1].text);
  out.sink.input = std::string(seg[3].text);
  return true;
}

// ---- condition tokens --------------------------------------------------------

std::string parser::describe(const token& t) const {
  switch (t.type) {
    case tok::end: return "end of route";
    case tok::ident:
      for (std::string_view kw : {"INTO", "AND", "OR", "NOT"})
        if (iequals(t.text, kw))
          return std::string(kw);
      return "'" + t.text + "'";
    default: return "'" + std::string(text_.substr(t.pos, std::min<std::size_t>(t.len, 32))) + "'";
  }
}

bool parser::lex_string(token& t) {
  char quote = text_[pos_];
  std::size_t start = pos_;
  ++pos_;
  std::string out;
  for (;;) {
    if (at_end())
      return fail(start, "unterminated string");
    char c = text_[pos_];
    if (c == quote) {
      ++pos_;
      break;
    }
    if (c != '\\') {
      out += c;
      ++pos_;
      continue;
    }
    std::size_t esc = pos_;
    char e = peek(1);
    pos_ += 2;
    switch (e) {
      case '\\':
      case '\'':
      case '"':
      case '/': out += e; break;
      case 'u': {
        auto hex4 = [&](std::size_t at, std::uint32_t& v) {
          v = 0;
          for (std::size_t i = 0; i < 4; ++i) {
            char h = at + i < text_.size() ? text_[at + i] : '\0';
            int d = is_digit(h)                                        ? h - '0'
                    : (to_lower(h) >= 'a' && to_lower(h) <= 'f') ? to_lower(h) - 'a' + 10
                                                                       : -1;
            if (d < 0)
              return false;
            v = v * 16 + static_cast<std::uint32_t>(d);
          }
          return true;
        };
        std::uint32_t cp = 0;
        if (!hex4(pos_, cp))
          return fail(esc, "invalid \\u escape (expected 4 hex digits)");
        pos_ += 4;
        if (cp >= 0xD800 && cp <= 0xDBFF) {
          std::uint32_t lo = 0;
          if (peek() != '\\' || peek(1) != 'u' || !hex4(pos_ + 2, lo) || lo < 0xDC00 || lo > 0xDFFF)
            return fail(esc, "unpaired surrogate in \\u escape");
          pos_ += 6;
          cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
        } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
          return fail(esc, "unpaired surrogate in \\u escape");
        }
        // UTF-8 encode.
        if (cp < 0x80) {
          out += static_cast<char>(cp);
        } else if (cp < 0x800) {
          out += static_cast<char>(0xC0 | (cp >> 6));
          out += static_cast<char>(0x80 | (cp & 0x3F));
        } else if (cp < 0x10000) {
          out += static_cast<char>(0xE0 | (cp >> 12));
          out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
          out += static_cast<char>(0x80 | (cp & 0x3F));
        } else {
          out += static_cast<char>(0xF0 | (cp >> 18));
          out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
          out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
          out += static_cast<char>(0x80 | (cp & 0x3F));
        }
        break;
      }
      default:
        if (esc + 1 >= text_.size())
          return fail(start, "unterminated string");
        return fail(
          esc, "invalid escape '\\" + std::string(1, e) + "' (use \\\\ \\' \\\" \\/ or \\uXXXX)");
    }
  }
  t.type = tok::string;
  t.len = pos_ - start;
  t.text = std::move(out);
  return true;
}

bool parser::lex_number(token& t) {
  std::size_t start = pos_;
  if (peek() == '0' && (peek(1) == 'x' || peek(1) == 'X')) {
    pos_ += 2;
    std::uint64_t v = 0;
    std::size_t digits = 0;
    for (;; ++pos_, ++digits) {
      char h = to_lower(peek());
      int d = is_digit(h) ? h - '0' : (h >= 'a' && h <= 'f') ? h - 'a' + 10 : -1;
      if (d < 0)
        break;
      if (v > (std::numeric_limits<std::uint64_t>::max() >> 4))
        return fail(start, "hex number out of range");
      v = v * 16 + static_cast<std::uint64_t>(d);
    }
    if (digits == 0 || is_ident_char(peek())) {
      std::size_t end = pos_;
      while (end < text_.size() && is_ident_char(text_[end]))
        ++end;
      return fail(start,
                  "invalid hex number '" + std::string(text_.substr(start, end - start)) + "'");
    }
    t.type = tok::number;
    t.num = static_cast<double>(v);
    t.len = pos_ - start;
    return true;
  }
  while (is_digit(peek()))
    ++pos_;
  if (peek() == '.') {
    ++pos_;
    if (!is_digit(peek()))
      return fail(start, "invalid number '" + std::string(text_.substr(start, pos_ - start))
                           + "' (expected a digit after '.')");
    while (is_digit(peek()))
      ++pos_;
  }
  if (peek() == 'e' || peek() == 'E') {
    std::size_t e = pos_;
    ++pos_;
    if (peek() == '+' || peek() == '-')
      ++pos_;
    if (!is_digit(peek()))
      return fail(
        e, "invalid exponent in number '" + std::string(text_.substr(start, pos_ - start)) + "'");
    while (is_digit(peek()))
      ++pos_;
  }
  if (is_ident_char(peek()) || peek() == '.') {
    std::size_t end = pos_;
    while (end < text_.size() && (is_ident_char(text_[end]) || text_[end] == '.'))
      ++end;
    return fail(start, "invalid number '" + std::string(text_.substr(start, end - start)) + "'");
  }
  double v = 0;
  auto [ptr, ec] =
    std::from_chars(text_.data() + start, text_.data() + pos_, v, std::chars_format::general);
  if (ec != std::errc{} || ptr != text_.data() + pos_ || !std::isfinite(v))
    return fail(start,
                "number '" + std::string(text_.substr(start, pos_ - start)) + "' out of range");
  t.type = tok::number;
  t.num = v;
  t.len = pos_ - start;
  return true;
}

bool parser::lex_sysprop(token& t) {
  std::size_t start = pos_;
  ++pos_;  // '$'
  if (!is_ident_start(peek()))
    return fail(start, "expected a system property name after '$'");
  std::size_t name_start = pos_;
  while (is_ident_char(peek()))
    ++pos_;
  t.type = tok::sysprop;
  t.text = std::string(text_.substr(name_start, pos_ - name_start));
  if (iequals(t.text, "body")) {
    for (;;) {
      if (peek() == '.') {
        ++pos_;
        std::size_t key_start = pos_;
        while (is_ident_char(peek()))
          ++pos_;
        if (pos_ == key_start)
          return fail(key_start,
                      "expected a property name after '.' in $body path, found "
                        + (at_end() ? std::string("end of route") : describe_char(peek())));
        t.path.push_back({false, 0, std::string(text_.substr(key_start, pos_ - key_start))});
      } else if (peek() == '[') {
        std::size_t open = pos_;
        ++pos_;
        if (peek() == '\'' || peek() == '"') {
          token key;
          key.pos = pos_;
          if (!lex_string(key))
            return false;
          t.path.push_back({false, 0, std::move(key.text)});
        } else if (is_digit(peek())) {
          std::size_t idx_start = pos_;
          while (is_digit(peek()))
            ++pos_;
          std::size_t idx = 0;
          auto [ptr, ec] = std::from_chars(text_.data() + idx_start, text_.data() + pos_, idx);
          if (ec != std::errc{} || ptr != text_.data() + pos_ || idx > 0xFFFFFFFFu)
            return fail(idx_start, "array index out of range");
          t.path.push_back({true, idx, {}});
        } else {
          return fail(pos_, "expected an array index or a quoted key after '[' in $body path");
        }
        if (peek() != ']')
          return fail(open, "expected ']' to close '[' in $body path");
        ++pos_;
      } else {
        break;
      }
    }
  }
  t.len = pos_ - start;
  return true;
}

bool parser::next() {
  token t;
  if (!skip_space(true))
    return false;
  t.pos = pos_;
  if (at_end()) {
    cur_ = std::move(t);
    return true;
  }
  char c = peek();
  auto single = [&](tok type, std::size_t len = 1) {
    t.type = type;
    t.len = len;
    pos_ += len;
    return true;
  };
  bool ok = true;
  if (is_ident_start(c)) {
    std::size_t start = pos_;
    while (is_ident_char(peek()) || (peek() == '.' && is_ident_char(peek(1))))
      ++pos_;
    t.type = tok::ident;
    t.text = std::string(text_.substr(start, pos_ - start));
    t.len = pos_ - start;
  } else if (is_digit(c) || (c == '.' && is_digit(peek(1)))) {
    ok = lex_number(t);
  } else if (c == '\'' || c == '"') {
    ok = lex_string(t);
  } else if (c == '$') {
    ok = lex_sysprop(t);
  } else {
    switch (c) {
      case '(': ok = single(tok::lparen); break;
      case ')': ok = single(tok::rparen); break;
      case '{': ok = single(tok::lbrace); break;
      case '}': ok = single(tok::rbrace); break;
      case ',': ok = single(tok::comma); break;
      case '+': ok = single(tok::plus); break;
      case '-': ok = single(tok::minus); break;
      case '*': ok = single(tok::star); break;
      case '/': ok = single(tok::slash); break;
      case '%': ok = single(tok::percent); break;
      case '=': ok = single(tok::eq); break;
      case '!':
        if (peek(1) != '=')
          return fail(pos_, "unexpected '!' (use != or NOT)");
        ok = single(tok::ne, 2);
        break;
      case '<':
        if (peek(1) == '=')
          ok = single(tok::le, 2);
        else if (peek(1) == '>')
          ok = single(tok::ne, 2);
        else
          ok = single(tok::lt);
        break;
      case '>': ok = peek(1) == '=' ? single(tok::ge, 2) : single(tok::gt); break;
      case '|':
        if (peek(1) != '|')
          return fail(pos_, "unexpected '|' (use || or OR)");
        ok = single(tok::concat, 2);
        break;
      case '?':
        if (peek(1) != '?')
          return fail(pos_, "unexpected '?' (use ?\?)");
        ok = single(tok::coalesce, 2);
        break;
      default: return fail(pos_, "unexpected character " + describe_char(c));
    }
  }
  if (!ok)
    return false;
  cur_ = std::move(t);
  return true;
}

// ---- condition grammar --------------------------------------------------------

std::unique_ptr<node> parser::make_binary(op o, std::size_t pos, std::unique_ptr<node> l,
                                          std::unique_ptr<node> r) {
  auto n = std::make_unique<node>();
  n->oper = o;
  n->height = 1 + std::max(l->height, r->height);
  if (n->height > max_height)
    return fail_node(pos, "expression too complex (more than " + std::to_string(max_height)
                            + " levels of operators)");
  n->args.push_back(std::move(l));
  n->args.push_back(std::move(r));
  return n;
}

std::unique_ptr<node> parser::make_unary(op o, std::size_t pos, std::unique_ptr<node> a) {
  auto n = std::make_unique<node>();
  n->oper = o;
  n->height = 1 + a->height;
  if (n->height > max_height)
    return fail_node(pos, "expression too complex (more than " + std::to_string(max_height)
                            + " levels of operators)");
  n->args.push_back(std::move(a));
  return n;
}

std::unique_ptr<node> parser::parse_coalesce() {
  auto l = parse_or();
  while (l && cur_.type == tok::coalesce) {
    std::size_t p = cur_.pos;
    if (!next())
      return nullptr;
    auto r = parse_or();
    if (!r)
      return nullptr;
    l = make_binary(op::coalesce, p, std::move(l), std::move(r));
  }
  return l;
}

std::unique_ptr<node> parser::parse_or() {
  auto l = parse_and();
  while (l && is_keyword(cur_, "or")) {
    std::size_t p = cur_.pos;
    if (!next())
      return nullptr;
    auto r = parse_and();
    if (!r)
      return nullptr;
    l = make_binary(op::or_, p, std::move(l), std::move(r));
  }
  return l;
}

std::unique_ptr<node> parser::parse_and() {
  auto l = parse_not();
  while (l && is_keyword(cur_, "and")) {
    std::size_t p = cur_.pos;
    if (!next())
      return nullptr;
    auto r = parse_not();
    if (!r)
      return nullptr;
    l = make_binary(op::and_, p, std::move(l), std::move(r));
  }
  return l;
}

std::unique_ptr<node> parser::parse_not() {
  if (!is_keyword(cur_, "not"))
    return parse_equality();
  std::size_t p = cur_.pos;
  if (!enter(p) || !next())
    return nullptr;
  auto a = parse_not();
  leave();
  if (!a)
    return nullptr;
  return make_unary(op::not_, p, std::move(a));
}

std::unique_ptr<node> parser::parse_equality() {
  auto l = parse_relational();
  while (l && (cur_.type == tok::eq || cur_.type == tok::ne)) {
    op o = cur_.type == tok::eq ? op::eq : op::ne;
    std::size_t p = cur_.pos;
    if (!next())
      return nullptr;
    auto r = parse_relational();
    if (!r)
      return nullptr;
    l = make_binary(o, p, std::move(l), std::move(r));
  }
  return l;
}

std::unique_ptr<node> parser::parse_relational() {
  auto l = parse_additive();
  for (;;) {
    if (!l)
      return nullptr;
    op o;
    switch (cur_.type) {
      case tok::lt: o = op::lt; break;
      case tok::le: o = op::le; break;
      case tok::gt: o = op::gt; break;
      case tok::ge: o = op::ge; break;
      default: return l;
    }
    std::size_t p = cur_.pos;
    if (!next())
      return nullptr;
    auto r = parse_additive();
    if (!r)
      return nullptr;
    l = make_binary(o, p, std::move(l), std::move(r));
  }
}

std::unique_ptr<node> parser::parse_additive() {
  auto l = parse_multiplicative();
  for (;;) {
    if (!l)
      return nullptr;
    op o;
    switch (cur_.type) {
      case tok::plus: o = op::add; break;
      case tok::minus: o = op::sub; break;
      case tok::concat: o = op::concat; break;
      default: return l;
    }
    std::size_t p = cur_.pos;
    if (!next())
      return nullptr;
    auto r = parse_multiplicative();
    if (!r)
      return nullptr;
    l = make_binary(o, p, std::move(l), std::move(r));
  }
}

std::unique_ptr<node> parser::parse_multiplicative() {
  auto l = parse_unary();
  for (;;) {
    if (!l)
      return nullptr;
    op o;
    switch (cur_.type) {
      case tok::star: o = op::mul; break;
      case tok::slash: o = op::div; break;
      case tok::percent: o = op::mod; break;
      default: return l;
    }
    std::size_t p = cur_.pos;
    if (!next())
      return nullptr;
    auto r = parse_unary();
    if (!r)
      return nullptr;
    l = make_binary(o, p, std::move(l), std::move(r));
  }
}

std::unique_ptr<node> parser::parse_unary() {
  bool minus = cur_.type == tok::minus;
  if (!minus && !is_keyword(cur_, "not"))
    return parse_primary();
  std::size_t p = cur_.pos;
  if (!enter(p) || !next())
    return nullptr;
  auto a = parse_unary();
  leave();
  if (!a)
    return nullptr;
  if (minus && a->oper == op::literal && a->lit.k == kind::number) {
    a->lit.n = -a->lit.n;  // fold "-5" into a literal
    return a;
  }
  return make_unary(minus ? op::negate : op::not_, p, std::move(a));
}

std::unique_ptr<node> parser::parse_call(token name) {
  const fn_info* info = nullptr;
  for (const auto& f : functions)
    if (iequals(f.name, name.text))
      info = &f;
  if (!info)
    return fail_node(name.pos, "unknown function '" + name.text + "'");
  if (!enter(name.pos) || !next())  // consume '('
    return nullptr;
  auto n = std::make_unique<node>();
  n->oper = op::call;
  n->func = info->f;
  if (cur_.type != tok::rparen) {
    for (;;) {
      if (n->args.size() == info->max_args)
        return fail_node(cur_.pos, "too many arguments to " + std::string(info->name) + "() (takes "
                                     + (info->min_args == info->max_args
                                          ? std::to_string(info->max_args)
                                          : "at most " + std::to_string(info->max_args))
                                     + ")");
      auto a = parse_coalesce();
      if (!a)
        return nullptr;
      n->height = std::max(n->height, 1 + a->height);
      n->args.push_back(std::move(a));
      if (cur_.type == tok::comma) {
        if (!next())
          return nullptr;
        continue;
      }
      if (cur_.type != tok::rparen)
        return fail_node(cur_.pos, "expected ',' or ')' in the arguments of "
                                     + std::string(info->name) + "(), found " + describe(cur_));
      break;
    }
  }
  if (n->args.size() < info->min_args)
    return fail_node(name.pos, std::string(info->name) + "() takes "
                                 + (info->min_args == info->max_args ? "" : "at least ")
                                 + std::to_string(info->min_args) + " argument"
                                 + (info->min_args == 1 ? "" : "s") + ", found "
                                 + std::to_string(n->args.size()));
  if (n->height > max_height)
    return fail_node(name.pos, "expression too complex (more than " + std::to_string(max_height)
                                 + " levels of operators)");
  leave();
  if (!next())  // consume ')'
    return nullptr;
  return n;
}

std::unique_ptr<node> parser::parse_primary() {
  token t = cur_;
  switch (t.type) {
    case tok::number: {
      auto n = std::make_unique<node>();
      n->lit = value::number(t.num);
      if (!next())
        return nullptr;
      return n;
    }
    case tok::string: {
      auto n = std::make_unique<node>();
      n->text = std::move(t.text);
      n->lit = value::string(n->text);  // n is heap-allocated and never moved: the view stays valid
      if (!next())
        return nullptr;
      return n;
    }
    case tok::lparen: {
      if (!enter(t.pos) || !next())
        return nullptr;
      if (cur_.type == tok::rparen)
        return fail_node(cur_.pos, "expected an expression inside '()'");
      auto n = parse_coalesce();
      if (!n)
        return nullptr;
      if (cur_.type != tok::rparen)
        return fail_node(cur_.pos, "expected ')' to close '(' at column "
                                     + std::to_string(t.pos + 1) + ", found " + describe(cur_));
      leave();
      if (!next())
        return nullptr;
      return n;
    }
    case tok::lbrace: {
      if (!next())
        return nullptr;
      if (cur_.type != tok::sysprop)
        return fail_node(cur_.pos,
                         "expected a system property ($name) after '{', found " + describe(cur_));
      token prop = cur_;
      if (!next())
        return nullptr;
      if (cur_.type != tok::rbrace)
        return fail_node(cur_.pos, "expected '}' after {"
                                     + std::string(text_.substr(prop.pos, prop.len)) + ", found "
                                     + describe(cur_));
      if (!next())
        return nullptr;
      auto n = std::make_unique<node>();
      for (const auto& s : sys_prop_names)
        if (iequals(s.name, prop.text))
          n->prop = s.prop;
      bool known = std::any_of(std::begin(sys_prop_names), std::end(sys_prop_names),
                               [&](const sys_prop_name& s) { return iequals(s.name, prop.text); });
      if (!known)
        return fail_node(prop.pos, "unknown system property '$" + prop.text + "'");
      n->oper = n->prop == sys_prop::body ? op::body : op::sys_forced;
      n->path = std::move(prop.path);
      return n;
    }
    case tok::sysprop: {
      auto n = std::make_unique<node>();
      bool known = false;
      for (const auto& s : sys_prop_names)
        if (iequals(s.name, t.text)) {
          n->prop = s.prop;
          known = true;
        }
      if (!known)
        return fail_node(t.pos, "unknown system property '$" + t.text + "'");
      n->oper = n->prop == sys_prop::body ? op::body : op::sys_property;
      n->text = "$" + t.text;  // the application property that would win
      n->path = std::move(t.path);
      if (!next())
        return nullptr;
      return n;
    }
    case tok::ident: {
      for (std::string_view kw : {"and", "or", "not", "into", "select", "from", "where"})
        if (iequals(t.text, kw))
          return fail_node(t.pos, "expected an expression, found " + describe(t));
      auto n = std::make_unique<node>();
      if (iequals(t.text, "true") || iequals(t.text, "false")) {
        n->lit = value::boolean(iequals(t.text, "true"));
      } else if (iequals(t.text, "null")) {
        n->lit = value::null();
      } else if (iequals(t.text, "undefined")) {
        n->lit = value::undefined();
      } else {
        if (!next())
          return nullptr;
        if (cur_.type == tok::lparen)
          return parse_call(std::move(t));
        n->oper = op::app_property;
        n->text = std::move(t.text);
        return n;
      }
      if (!next())
        return nullptr;
      return n;
    }
    default: return fail_node(t.pos, "expected an expression, found " + describe(t));
  }
}

}  // namespace route_detail

// -- route --------------------------------------------------------------------

expected<route> route::compile(std::string_view name, std::string_view text) {
  auto error_at = [&](std::size_t pos, const std::string& what) {
    return make_error(errc::invalid_argument, "route '" + std::string(name) + "': column "
                                                + std::to_string(pos + 1) + ": " + what);
  };
  if (text.size() > max_route_length)
    return error_at(max_route_length,
                    "route text longer than " + std::to_string(max_route_length) + " bytes");
  try {
    route_detail::route_parts parts;
    route_detail::parser p{text};
    if (!p.parse_route(parts)) {
      const auto& e = *p.err_;
      return error_at(e.pos, e.what);
    }
    route r;
    r.name_ = std::string(name);
    r.modules_only_ = parts.modules_only;
    r.source_module_ = std::move(parts.source_module);
    r.source_output_ = std::move(parts.source_output);
    r.any_output_ = parts.any_output;
    r.sink_ = std::move(parts.sink);
    if (parts.where)
      r.where_ = std::make_shared<const condition>(std::move(parts.where));
    return r;
  } catch (const std::exception& e) {
    return make_error(errc::failed, "route '" + std::string(name) + "': " + e.what());
  }
}

bool route::matches_source(const message_source& src) const noexcept {
  if (modules_only_ && src.module.empty())
    return false;
  if (!source_module_.empty() && src.module != source_module_)
    return false;
  if (!any_output_ && src.output != source_output_)
    return false;
  return true;
}

bool route::matches_condition(const message& msg, const message_source& src) const {
  if (!where_)
    return true;
  try {
    return where_->holds(msg, src);
  } catch (...) {
    return false;  // e.g. out of memory while parsing a huge body: do not route
  }
}

}  // namespace canopy
