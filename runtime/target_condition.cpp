#include "runtime/target_condition.hpp"

// Grammar (keywords, `tags` and `deviceId` are case-insensitive; tag names are not):
//
//   condition  := '*' | or_expr
//   or_expr    := and_expr { OR and_expr }
//   and_expr   := not_expr { AND not_expr }
//   not_expr   := NOT not_expr | primary
//   primary    := '(' or_expr ')'
//               | IS_DEFINED '(' path ')'
//               | operand ( cmp_op operand | IN '[' [ literal { ',' literal } ] ']' )
//   cmp_op     := '=' | '!=' | '<>' | '<' | '<=' | '>' | '>='
//   operand    := path | literal
//   path       := deviceId | tags segment { segment }    (no spaces before a segment)
//   segment    := '.' name | '[' string ']'       name: 1+ of A-Z a-z 0-9 _ - $
//   literal    := string | number | true | false | null
//   string     := '...' | "..."   (backslash escapes \\ \' \")
//   number     := [-] digits [ '.' digits ] [ (e|E) [+|-] digits ]
//
// Comparison rules: a missing tag (or a path through something that is not an
// object) is undefined, and any comparison with undefined is false — `!=`
// included, so `tags.x != 'a'` needs tags.x to exist; `NOT tags.x = 'a'` does
// not. Numbers compare numerically (integers exactly), strings byte-wise,
// booleans and null only with = and != (<>). Values of different types, and
// objects or arrays, never compare: the comparison is false. `x IN [a, b]`
// holds if x = a or x = b.
//
// Errors read "target condition: column N: what", N the 1-based byte column.

#include "runtime/ascii.hpp"

#include <nlohmann/json.hpp>

#include <charconv>
#include <cstdint>
#include <optional>
#include <system_error>
#include <utility>
#include <vector>

namespace canopy {

namespace detail {

/// A value in a comparison: a path to look up, or a literal.
struct condition_operand {
  enum class kind { literal, tag_path, device_id };
  kind type = kind::literal;
  nlohmann::json literal;         ///< for kind::literal
  std::vector<std::string> path;  ///< for kind::tag_path: the names below `tags`
};

enum class compare_op { eq, ne, lt, le, gt, ge };

/// One node of a compiled condition.
struct condition_node {
  enum class kind { all_of, any_of, negate, compare, in_list, is_defined };
  kind type = kind::compare;
  std::vector<condition_node> children;  ///< all_of, any_of (2+), negate (1)
  compare_op op = compare_op::eq;        ///< compare
  condition_operand lhs;                 ///< compare, in_list, is_defined
  condition_operand rhs;                 ///< compare
  std::vector<nlohmann::json> list;      ///< in_list
};

}  // namespace detail

namespace {

using detail::compare_op;
using detail::condition_node;
using detail::condition_operand;
using json = nlohmann::json;

// -- characters -----------------------------------------------------------------

using namespace ascii;

bool is_name_char(char c) noexcept {
  return is_ident_char(c) || c == '-' || c == '$';
}

// -- tokens -----------------------------------------------------------------------

enum class tok {
  end,
  word,    // keyword or field name
  string,  // quoted
  number,
  star,  // *
  lparen,
  rparen,
  lbracket,
  rbracket,
  comma,
  dot,
  op,  // comparison operator (token.op)
};

struct token {
  tok type = tok::end;
  std::size_t pos = 0;   ///< byte offset of its first character
  std::string_view raw;  ///< its text as written
  std::string text;      ///< string: the unescaped value
  json number;           ///< number: its value
  compare_op op = compare_op::eq;
};

/// The parse failure: where and what.
struct parse_error {
  std::size_t pos;
  std::string what;
};

std::string describe(const token& t) {
  if (t.type == tok::end)
    return "the end of the condition";
  if (t.raw.size() > 40)
    return "'" + std::string(t.raw.substr(0, 40)) + "...'";
  return "'" + std::string(t.raw) + "'";
}

class parser {
 public:
  explicit parser(std::string_view text) : text_(text) {}

  /// The whole condition; nullopt with err_ set on failure. For `*` the node
  /// returned is meaningless and matches_all_ is set.
  std::optional<condition_node> parse_condition() {
    if (!advance())
      return std::nullopt;
    if (cur_.type == tok::star) {
      const std::size_t star = cur_.pos;
      if (!advance())
        return std::nullopt;
      if (cur_.type != tok::end)
        return fail(cur_.pos, "'*' (every device) must be the whole condition; found " +
                                describe(cur_) + " after the '*' at column " +
                                std::to_string(star + 1));
      matches_all_ = true;
      return condition_node{};
    }
    if (cur_.type == tok::end)
      return fail(cur_.pos, "expected a condition ('*' for every device), found " + describe(cur_));
    auto n = parse_or();
    if (!n)
      return std::nullopt;
    if (cur_.type != tok::end)
      return fail(cur_.pos,
                  "expected AND, OR or the end of the condition, found " + describe(cur_));
    return n;
  }

  bool matches_all_ = false;
  std::optional<parse_error> err_;

 private:
  std::nullopt_t fail(std::size_t pos, std::string what) {
    if (!err_)
      err_ = parse_error{pos, std::move(what)};
    return std::nullopt;
  }

  /// fail() for the lexer, which reports success as a bool.
  bool lex_fail(std::size_t pos, std::string what) {
    fail(pos, std::move(what));
    return false;
  }

  bool is_keyword(const token& t, std::string_view kw) const {
    return t.type == tok::word && iequals(t.raw, kw);
  }

  // -- lexer --------------------------------------------------------------------

  /// Reads the next token into cur_; false (err_ set) on a lexical error.
  bool advance() {
    while (pos_ < text_.size() && is_space(text_[pos_]))
      ++pos_;
    cur_ = token{};
    cur_.pos = pos_;
    if (pos_ >= text_.size()) {
      cur_.type = tok::end;
      return true;
    }
    const std::size_t start = pos_;
    const char c = text_[pos_];
    auto single = [&](tok t) {
      cur_.type = t;
      ++pos_;
      cur_.raw = text_.substr(start, 1);
      return true;
    };
    switch (c) {
      case '*':
        return single(tok::star);
      case '(':
        return single(tok::lparen);
      case ')':
        return single(tok::rparen);
      case '[':
        return single(tok::lbracket);
      case ']':
        return single(tok::rbracket);
      case ',':
        return single(tok::comma);
      case '.':
        if (pos_ + 1 < text_.size() && is_digit(text_[pos_ + 1]))
          return lex_fail(pos_, "a number must start with a digit (write 0.5, not .5)");
        return single(tok::dot);
      case '\'':
      case '"':
        return lex_string();
      case '=':
        return lex_op(1, compare_op::eq);
      case '!':
        if (peek(1) == '=')
          return lex_op(2, compare_op::ne);
        return lex_fail(pos_, "unexpected '!' (did you mean '!='?)");
      case '<':
        if (peek(1) == '>')
          return lex_op(2, compare_op::ne);
        if (peek(1) == '=')
          return lex_op(2, compare_op::le);
        return lex_op(1, compare_op::lt);
      case '>':
        if (peek(1) == '=')
          return lex_op(2, compare_op::ge);
        return lex_op(1, compare_op::gt);
      default:
        break;
    }
    if (is_digit(c) || c == '-')
      return lex_number();
    if (is_ident_start(c)) {
      while (pos_ < text_.size() && is_ident_char(text_[pos_]))
        ++pos_;
      cur_.type = tok::word;
      cur_.raw = text_.substr(start, pos_ - start);
      return true;
    }
    return lex_fail(pos_, "unexpected " + describe_char(c));
  }

  char peek(std::size_t ahead) const {
    return pos_ + ahead < text_.size() ? text_[pos_ + ahead] : '\0';
  }

  bool lex_op(std::size_t len, compare_op op) {
    cur_.type = tok::op;
    cur_.op = op;
    cur_.raw = text_.substr(pos_, len);
    pos_ += len;
    return true;
  }

  bool lex_string() {
    const std::size_t start = pos_;
    const char quote = text_[pos_++];
    std::string value;
    while (true) {
      if (pos_ >= text_.size())
        return lex_fail(start, "unterminated string (no closing " + describe_char(quote) + ")");
      const char c = text_[pos_];
      if (c == quote) {
        ++pos_;
        break;
      }
      if (c == '\\') {
        const char e = peek(1);
        if (e != '\\' && e != '\'' && e != '"')
          return lex_fail(pos_, "unknown escape in a string (only \\\\, \\' and \\\" are known)");
        value += e;
        pos_ += 2;
        continue;
      }
      value += c;
      ++pos_;
    }
    cur_.type = tok::string;
    cur_.raw = text_.substr(start, pos_ - start);
    cur_.text = std::move(value);
    return true;
  }

  bool lex_number() {
    const std::size_t start = pos_;
    bool integral = true;
    if (text_[pos_] == '-')
      ++pos_;
    auto digits = [&] {
      const std::size_t from = pos_;
      while (pos_ < text_.size() && is_digit(text_[pos_]))
        ++pos_;
      return pos_ > from;
    };
    if (!digits())
      return lex_fail(start, "malformed number (expected a digit after '-')");
    if (pos_ < text_.size() && text_[pos_] == '.') {
      ++pos_;
      integral = false;
      if (!digits())
        return lex_fail(start, "malformed number (expected a digit after '.')");
    }
    if (pos_ < text_.size() && (text_[pos_] == 'e' || text_[pos_] == 'E')) {
      ++pos_;
      integral = false;
      if (pos_ < text_.size() && (text_[pos_] == '+' || text_[pos_] == '-'))
        ++pos_;
      if (!digits())
        return lex_fail(start, "malformed number (expected a digit in the exponent)");
    }
    if (pos_ < text_.size() && (is_ident_char(text_[pos_]) || text_[pos_] == '.'))
      return lex_fail(start, "malformed number (followed by " + describe_char(text_[pos_]) + ")");
    const std::string_view raw = text_.substr(start, pos_ - start);
    const char* first = raw.data();
    const char* last = raw.data() + raw.size();
    if (integral) {
      std::int64_t v = 0;
      const auto r = std::from_chars(first, last, v);
      if (r.ec == std::errc() && r.ptr == last) {
        cur_.number = v;
      } else {
        integral = false;  // too large for 64 bits: keep it as a double
      }
    }
    if (!integral) {
      double d = 0;
      const auto r = std::from_chars(first, last, d);
      if (r.ec != std::errc() || r.ptr != last)
        return lex_fail(start, "number out of range");
      cur_.number = d;
    }
    cur_.type = tok::number;
    cur_.raw = raw;
    return true;
  }

  // -- parser -------------------------------------------------------------------

  bool enter(std::size_t pos) {
    if (++depth_ > max_target_condition_depth) {
      fail(pos, "nested too deeply (more than " + std::to_string(max_target_condition_depth) +
                  " levels of parentheses and NOT)");
      return false;
    }
    return true;
  }
  void leave() { --depth_; }

  std::optional<condition_node> parse_or() {
    auto first = parse_and();
    if (!first)
      return std::nullopt;
    if (!is_keyword(cur_, "or"))
      return first;
    condition_node n;
    n.type = condition_node::kind::any_of;
    n.children.push_back(std::move(*first));
    while (is_keyword(cur_, "or")) {
      if (!advance())
        return std::nullopt;
      auto next = parse_and();
      if (!next)
        return std::nullopt;
      n.children.push_back(std::move(*next));
    }
    return n;
  }

  std::optional<condition_node> parse_and() {
    auto first = parse_not();
    if (!first)
      return std::nullopt;
    if (!is_keyword(cur_, "and"))
      return first;
    condition_node n;
    n.type = condition_node::kind::all_of;
    n.children.push_back(std::move(*first));
    while (is_keyword(cur_, "and")) {
      if (!advance())
        return std::nullopt;
      auto next = parse_not();
      if (!next)
        return std::nullopt;
      n.children.push_back(std::move(*next));
    }
    return n;
  }

  std::optional<condition_node> parse_not() {
    if (!is_keyword(cur_, "not"))
      return parse_primary();
    if (!enter(cur_.pos))
      return std::nullopt;
    if (!advance())
      return std::nullopt;
    auto inner = parse_not();
    if (!inner)
      return std::nullopt;
    leave();
    condition_node n;
    n.type = condition_node::kind::negate;
    n.children.push_back(std::move(*inner));
    return n;
  }

  std::optional<condition_node> parse_primary() {
    if (cur_.type == tok::lparen) {
      const std::size_t open = cur_.pos;
      if (!enter(open))
        return std::nullopt;
      if (!advance())
        return std::nullopt;
      auto inner = parse_or();
      if (!inner)
        return std::nullopt;
      if (cur_.type != tok::rparen)
        return fail(cur_.pos, "expected ')' to close the '(' at column " +
                                std::to_string(open + 1) + ", found " + describe(cur_));
      if (!advance())
        return std::nullopt;
      leave();
      return inner;
    }
    if (is_keyword(cur_, "is_defined"))
      return parse_is_defined();

    condition_node n;
    auto lhs = parse_operand();
    if (!lhs)
      return std::nullopt;
    n.lhs = std::move(*lhs);
    if (cur_.type == tok::op) {
      n.type = condition_node::kind::compare;
      n.op = cur_.op;
      if (!advance())
        return std::nullopt;
      auto rhs = parse_operand();
      if (!rhs)
        return std::nullopt;
      n.rhs = std::move(*rhs);
      return n;
    }
    if (is_keyword(cur_, "in")) {
      n.type = condition_node::kind::in_list;
      if (!advance())
        return std::nullopt;
      if (cur_.type != tok::lbracket)
        return fail(cur_.pos, "expected '[' after IN, found " + describe(cur_));
      if (!advance())
        return std::nullopt;
      if (cur_.type != tok::rbracket) {
        while (true) {
          auto v = parse_literal();
          if (!v)
            return std::nullopt;
          n.list.push_back(std::move(*v));
          if (cur_.type == tok::rbracket)
            break;
          if (cur_.type != tok::comma)
            return fail(cur_.pos, "expected ',' or ']' in the IN list, found " + describe(cur_));
          if (!advance())
            return std::nullopt;
        }
      }
      if (!advance())
        return std::nullopt;
      return n;
    }
    return fail(cur_.pos,
                "expected a comparison (=, !=, <>, <, <=, >, >=) or IN, found " + describe(cur_));
  }

  std::optional<condition_node> parse_is_defined() {
    if (!advance())
      return std::nullopt;
    if (cur_.type != tok::lparen)
      return fail(cur_.pos, "expected '(' after IS_DEFINED, found " + describe(cur_));
    const std::size_t open = cur_.pos;
    if (!advance())
      return std::nullopt;
    const std::size_t at = cur_.pos;
    auto path = parse_operand();
    if (!path)
      return std::nullopt;
    if (path->type == condition_operand::kind::literal)
      return fail(at, "IS_DEFINED takes a path (tags.<name> or deviceId), not a value");
    if (cur_.type != tok::rparen)
      return fail(cur_.pos, "expected ')' to close the '(' at column " + std::to_string(open + 1) +
                              ", found " + describe(cur_));
    if (!advance())
      return std::nullopt;
    condition_node n;
    n.type = condition_node::kind::is_defined;
    n.lhs = std::move(*path);
    return n;
  }

  /// A literal (string, number, true, false, null); advances past it.
  std::optional<json> parse_literal() {
    json v;
    if (cur_.type == tok::string) {
      v = std::move(cur_.text);
    } else if (cur_.type == tok::number) {
      v = std::move(cur_.number);
    } else if (is_keyword(cur_, "true")) {
      v = true;
    } else if (is_keyword(cur_, "false")) {
      v = false;
    } else if (is_keyword(cur_, "null")) {
      v = nullptr;
    } else {
      return fail(cur_.pos, "expected a value (a string, number, true, false or null), found " +
                              describe(cur_));
    }
    if (!advance())
      return std::nullopt;
    return v;
  }

  std::optional<condition_operand> parse_operand() {
    condition_operand o;
    if (cur_.type == tok::word && !is_keyword(cur_, "true") && !is_keyword(cur_, "false") &&
        !is_keyword(cur_, "null")) {
      if (is_keyword(cur_, "deviceid")) {
        o.type = condition_operand::kind::device_id;
        if (!advance())
          return std::nullopt;
        return o;
      }
      if (!is_keyword(cur_, "tags"))
        return fail(cur_.pos, "expected a value, found " + describe(cur_) +
                                " (a path is tags.<name> or deviceId)");
      o.type = condition_operand::kind::tag_path;
      return parse_tag_path(std::move(o));
    }
    auto v = parse_literal();
    if (!v)
      return std::nullopt;
    o.literal = std::move(*v);
    return o;
  }

  /// After the word `tags` (cur_): one or more `.name` or `['name']` segments,
  /// with no spaces between them. Names are read straight from the text (they
  /// may contain '-' and digits).
  std::optional<condition_operand> parse_tag_path(condition_operand o) {
    // cur_ is `tags`; pos_ is just past it.
    while (true) {
      const std::size_t p = pos_;  // no spaces inside a path
      if (p < text_.size() && text_[p] == '.') {
        const std::size_t name_start = p + 1;
        std::size_t e = name_start;
        while (e < text_.size() && is_name_char(text_[e]))
          ++e;
        if (e == name_start)
          return fail(name_start, "expected a tag name after '.'");
        o.path.emplace_back(text_.substr(name_start, e - name_start));
        pos_ = e;
        continue;
      }
      if (p < text_.size() && text_[p] == '[') {
        pos_ = p + 1;
        if (!advance())
          return std::nullopt;
        if (cur_.type != tok::string)
          return fail(cur_.pos, "expected a quoted tag name after '[', found " + describe(cur_));
        o.path.push_back(std::move(cur_.text));
        if (!advance())
          return std::nullopt;
        if (cur_.type != tok::rbracket)
          return fail(cur_.pos, "expected ']' after the tag name, found " + describe(cur_));
        // pos_ is just past the ']'.
        continue;
      }
      break;
    }
    if (o.path.empty())
      return fail(pos_, "expected '.' and a tag name after 'tags'");
    if (!advance())
      return std::nullopt;
    return o;
  }

  std::string_view text_;
  std::size_t pos_ = 0;
  token cur_;
  int depth_ = 0;
};

// -- evaluation ---------------------------------------------------------------------

/// A resolved operand: undefined, or a JSON value, or the device id.
struct value_view {
  enum class kind { undefined, null, boolean, number, string, other };
  kind type = kind::undefined;
  bool b = false;
  long double n = 0;  // exact for every int64 and uint64
  std::string_view s;
};

value_view view_of(const json& j) {
  value_view v;
  switch (j.type()) {
    case json::value_t::null:
      v.type = value_view::kind::null;
      break;
    case json::value_t::boolean:
      v.type = value_view::kind::boolean;
      v.b = j.get<bool>();
      break;
    case json::value_t::number_integer:
      v.type = value_view::kind::number;
      v.n = static_cast<long double>(j.get<std::int64_t>());
      break;
    case json::value_t::number_unsigned:
      v.type = value_view::kind::number;
      v.n = static_cast<long double>(j.get<std::uint64_t>());
      break;
    case json::value_t::number_float:
      v.type = value_view::kind::number;
      v.n = static_cast<long double>(j.get<double>());
      break;
    case json::value_t::string:
      v.type = value_view::kind::string;
      v.s = j.get_ref<const std::string&>();
      break;
    default:
      v.type = value_view::kind::other;
      break;
  }
  return v;
}

value_view resolve(const condition_operand& o, std::string_view device_id, const json& tags) {
  switch (o.type) {
    case condition_operand::kind::literal:
      return view_of(o.literal);
    case condition_operand::kind::device_id: {
      value_view v;
      v.type = value_view::kind::string;
      v.s = device_id;
      return v;
    }
    case condition_operand::kind::tag_path: {
      const json* at = &tags;
      for (const auto& name : o.path) {
        if (!at->is_object())
          return {};
        auto it = at->find(name);
        if (it == at->end())
          return {};
        at = &*it;
      }
      return view_of(*at);
    }
  }
  return {};
}

template <class T>
bool apply(compare_op op, const T& a, const T& b) {
  switch (op) {
    case compare_op::eq:
      return a == b;
    case compare_op::ne:
      return a != b;
    case compare_op::lt:
      return a < b;
    case compare_op::le:
      return a <= b;
    case compare_op::gt:
      return a > b;
    case compare_op::ge:
      return a >= b;
  }
  return false;
}

bool compare(compare_op op, const value_view& a, const value_view& b) {
  if (a.type != b.type)
    return false;  // includes undefined on either side
  switch (a.type) {
    case value_view::kind::number:
      return apply(op, a.n, b.n);
    case value_view::kind::string:
      return apply(op, a.s, b.s);
    case value_view::kind::boolean:
      if (op == compare_op::eq || op == compare_op::ne)
        return apply(op, a.b, b.b);
      return false;
    case value_view::kind::null:
      if (op == compare_op::eq || op == compare_op::ne)
        return op == compare_op::eq;
      return false;
    default:
      return false;
  }
}

bool evaluate(const condition_node& n, std::string_view device_id, const json& tags) {
  switch (n.type) {
    case condition_node::kind::all_of:
      for (const auto& c : n.children)
        if (!evaluate(c, device_id, tags))
          return false;
      return true;
    case condition_node::kind::any_of:
      for (const auto& c : n.children)
        if (evaluate(c, device_id, tags))
          return true;
      return false;
    case condition_node::kind::negate:
      return !evaluate(n.children.front(), device_id, tags);
    case condition_node::kind::compare:
      return compare(n.op, resolve(n.lhs, device_id, tags), resolve(n.rhs, device_id, tags));
    case condition_node::kind::in_list: {
      const value_view v = resolve(n.lhs, device_id, tags);
      for (const auto& item : n.list)
        if (compare(compare_op::eq, v, view_of(item)))
          return true;
      return false;
    }
    case condition_node::kind::is_defined:
      return resolve(n.lhs, device_id, tags).type != value_view::kind::undefined;
  }
  return false;
}

}  // namespace

// -- target_condition -------------------------------------------------------------

expected<target_condition> target_condition::compile(std::string_view text) {
  auto error_at = [](std::size_t pos, const std::string& what) {
    return make_error(errc::invalid_argument,
                      "target condition: column " + std::to_string(pos + 1) + ": " + what);
  };
  if (text.size() > max_target_condition_length)
    return error_at(
      max_target_condition_length,
      "condition longer than " + std::to_string(max_target_condition_length) + " bytes");
  parser p(text);
  auto root = p.parse_condition();
  if (!root) {
    const auto& e = *p.err_;
    return error_at(e.pos, e.what);
  }
  target_condition c;
  c.text_ = std::string(text);
  if (!p.matches_all_)
    c.root_ = std::make_shared<const condition_node>(std::move(*root));
  return c;
}

bool target_condition::matches(std::string_view device_id, const nlohmann::json& tags) const {
  if (root_ == nullptr)
    return true;
  return evaluate(*root_, device_id, tags);
}

}  // namespace canopy
