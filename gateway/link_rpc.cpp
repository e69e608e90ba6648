#include "gateway/link_rpc.hpp"

#include <algorithm>
#include <cctype>
#include <future>
#include <limits>

namespace canopy::link_rpc {

namespace {

/// What Cap'n Proto puts before the reason of an exception the other end threw.
constexpr std::string_view remote_prefix = "remote exception: ";

/// `s` as a Text field, all of it: the implicit conversion stops at the first
/// NUL, and string_of() keeps embedded NULs, so what is read is sent on as is.
capnp::Text::Reader text(const std::string& s) {
  return capnp::Text::Reader(s.data(), s.size());
}

}  // namespace

std::string tidy(std::string text) {
  constexpr std::string_view openssl = "OpenSSL error; message = error:";
  if (auto at = text.find(openssl); at != std::string::npos) {
    if (auto sep = text.find("::", at + openssl.size()); sep != std::string::npos) {
      text = text.substr(0, at) + text.substr(sep + 2);
    }
  }
  std::size_t i = text.rfind("::", 0) == 0 ? 2 : 0;
  std::size_t name = i;
  while (i < text.size() && (std::isalnum(static_cast<unsigned char>(text[i])) || text[i] == '_'))
    ++i;
  if (i > name && i < text.size() && text[i] == '(') {
    if (auto close = text.find("): ", i); close != std::string::npos)
      text.erase(0, close + 3);
  }
  return text;
}

bool is_tls_error(const kj::Exception& e) {
  return std::string_view(e.getDescription().cStr()).find("OpenSSL error") !=
         std::string_view::npos;
}

std::string text_of(const kj::Exception& e) {
  return tidy(e.getDescription().cStr());
}

bool is_remote(const kj::Exception& e) {
  return std::string_view(e.getDescription().cStr()).substr(0, remote_prefix.size()) ==
         remote_prefix;
}

kj::Exception to_exception(const error& err) {
  auto type = err.code == errc::unavailable || err.code == errc::timeout
                ? kj::Exception::Type::OVERLOADED
                : kj::Exception::Type::FAILED;
  return kj::Exception(type, __FILE__, __LINE__, kj::str(to_string(err.code), ": ", err.message));
}

kj::Promise<void> fail(errc code, std::string message) {
  return to_exception(make_error(code, std::move(message)));
}

error from_exception(const kj::Exception& e) {
  std::string text = text_of(e);
  if (text.rfind(remote_prefix, 0) == 0)
    text.erase(0, remote_prefix.size());
  for (int c = 1; c < 64; ++c) {
    auto code = static_cast<errc>(c);
    std::string name = to_string(code);
    if (name == "unknown")
      break;
    name += ": ";
    if (text.rfind(name, 0) == 0)
      return make_error(code, text.substr(name.size()));
  }
  auto type = e.getType();
  bool transient =
    type == kj::Exception::Type::DISCONNECTED || type == kj::Exception::Type::OVERLOADED;
  return make_error(transient ? errc::unavailable : errc::failed, std::move(text));
}

void drain_posts(io_thread& io) {
  auto done = std::make_shared<std::promise<void>>();
  auto finished = done->get_future();
  if (!io.post([done](kj::AsyncIoContext&) { done->set_value(); }))
    return;
  finished.wait();
}

kj::Promise<void> wait_idle(task_counter& counter, kj::AsyncIoContext& ctx, const char* what) {
  return counter.when_idle().exclusiveJoin(ctx.provider->getTimer().afterDelay(stop_wait).then(
    [what] { spdlog::warn("link: {}: connections or calls still open 5 s after stop", what); }));
}

namespace {

/// What an accept loop needs, shared by its continuations.
struct accept_state {
  std::string listen;
  const char* log_name;
  accept_hooks hooks;
};

kj::Promise<void> accept_loop(std::shared_ptr<accept_state> st, kj::ConnectionReceiver& receiver,
                              kj::Timer& timer) {
  return receiver.acceptAuthenticated().then(
    [st, &receiver, &timer](kj::AuthenticatedStream stream) mutable {
      st->hooks.accept(kj::mv(stream), timer);
      return accept_loop(kj::mv(st), receiver, timer);
    },
    [st, &receiver, &timer](kj::Exception&& e) mutable {
      // E.g. EMFILE: keep the port, try again shortly.
      spdlog::error("{}: accepting on {} failed: {}; retrying in 1 s", st->log_name, st->listen,
                    text_of(e));
      return timer.afterDelay(1 * kj::SECONDS).then([st = kj::mv(st), &receiver, &timer]() mutable {
        return accept_loop(kj::mv(st), receiver, timer);
      });
    });
}

}  // namespace

expected<void> listen_and_accept(io_thread& io, const std::string& listen, const char* log_name,
                                 std::atomic<std::uint16_t>& port, kj::Canceler& accepting,
                                 accept_hooks hooks) {
  auto st = std::make_shared<accept_state>(accept_state{listen, log_name, std::move(hooks)});
  KJ_IF_MAYBE (e, kj::runCatchingExceptions([&] {
                 io.run_sync([st, &io, &port, &accepting](kj::AsyncIoContext& ctx) {
                   return ctx.provider->getNetwork()
                     .parseAddress(st->listen)
                     .then([st, &ctx, &io, &port, &accepting](kj::Own<kj::NetworkAddress> address) {
                       auto receiver = address->listen();
                       port = static_cast<std::uint16_t>(receiver->getPort());
                       auto& r = *receiver;
                       auto loop =
                         accept_loop(st, r, ctx.provider->getTimer()).attach(kj::mv(receiver));
                       io.add_task(accepting.wrap(kj::mv(loop)).catch_([st](kj::Exception&& e) {
                         if (!st->hooks.stopping()) {
                           spdlog::error("{}: stopped accepting on {}: {}", st->log_name,
                                         st->listen, text_of(e));
                         }
                       }));
                     });
                 });
               })) {
    return make_error(errc::io_error, "cannot listen on " + listen + ": " + text_of(*e));
  }
  return {};
}

void stop_serving(io_thread& io, task_counter& tasks, const char* what,
                  const std::function<void()>& shut) {
  if (!io.running())
    return;
  KJ_IF_MAYBE (e, kj::runCatchingExceptions([&] {
                 io.run_sync([&](kj::AsyncIoContext& ctx) {
                   shut();
                   return wait_idle(tasks, ctx, what);
                 });
               })) {
    spdlog::debug("{}: stop after the I/O thread: {}", what, text_of(*e));
  }
  // Channel calls posted before the connections closed answer now.
  drain_posts(io);
}

std::string ms_text(std::chrono::milliseconds ms) {
  return std::to_string(ms.count()) + " ms";
}

capnp::ReaderOptions reader_options(const link_limits& limits) {
  capnp::ReaderOptions options;
  options.traversalLimitInWords = limits.traversal_limit_words;
  return options;
}

std::uint32_t clamp_ms(std::chrono::milliseconds ms) {
  if (ms.count() <= 0)
    return 0;
  return static_cast<std::uint32_t>(
    std::min<std::int64_t>(ms.count(), std::numeric_limits<std::uint32_t>::max()));
}

// --- Conversions ---------------------------------------------------------------------

kj::ArrayPtr<const kj::byte> bytes_of(std::string_view s) {
  return kj::arrayPtr(reinterpret_cast<const kj::byte*>(s.data()), s.size());
}

std::string_view view_of(capnp::Data::Reader d) {
  return {reinterpret_cast<const char*>(d.begin()), d.size()};
}

std::string string_of(capnp::Text::Reader t) {
  return std::string(t.begin(), t.size());
}

void fill(schema::TwinUpdate::Builder out, const twin_update& in) {
  out.setDevice(text(in.device));
  out.setModule(text(in.module));
  out.setJson(text(in.json));
  out.setVersion(in.version);
  out.setFull(in.full);
}

void fill(capnp::List<schema::TwinUpdate>::Builder out, const std::vector<twin_update>& in) {
  for (unsigned i = 0; i < in.size(); ++i)
    fill(out[i], in[i]);
}

std::vector<twin_update> read_twins(capnp::List<schema::TwinUpdate>::Reader in) {
  std::vector<twin_update> out;
  out.reserve(in.size());
  for (auto u : in) {
    out.push_back(twin_update{string_of(u.getDevice()), string_of(u.getModule()),
                              string_of(u.getJson()), u.getVersion(), u.getFull()});
  }
  return out;
}

void fill(schema::DeviceEntry::Builder out, const device_record& in) {
  out.setId(text(in.id));
  out.setParent(text(in.parent));
  out.setKind(text(in.kind));
  out.setTagsJson(in.tags.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace));
  out.setAuth(text(in.auth));
  out.setThumbprint(text(in.thumbprint));
  out.setPrimaryKey(text(in.primary_key));
  out.setSecondaryKey(text(in.secondary_key));
}

expected<device_record> read_entry(schema::DeviceEntry::Reader in, unsigned index) {
  device_record out;
  out.id = string_of(in.getId());
  out.parent = string_of(in.getParent());
  out.kind = string_of(in.getKind());
  out.auth = string_of(in.getAuth());
  out.thumbprint = string_of(in.getThumbprint());
  out.primary_key = string_of(in.getPrimaryKey());
  out.secondary_key = string_of(in.getSecondaryKey());
  auto where = [&] {
    return "syncScope: entry " + std::to_string(index) + " ('" + out.id + "'): tagsJson: ";
  };
  auto tags = in.getTagsJson();
  if (tags.size() == 0)
    return out;  // tags default to {}
  if (tags.size() > fleet_registry::max_document_bytes) {
    return make_error(errc::invalid_argument, where() + std::to_string(tags.size()) +
                                                " bytes exceed the limit of " +
                                                std::to_string(fleet_registry::max_document_bytes));
  }
  auto json = nlohmann::json::parse(tags.begin(), tags.end(), nullptr, false);
  if (json.is_discarded())
    return make_error(errc::invalid_argument, where() + "not valid JSON");
  if (!json.is_object())
    return make_error(errc::invalid_argument, where() + "not a JSON object");
  out.tags = std::move(json);
  return out;
}

}  // namespace canopy::link_rpc
