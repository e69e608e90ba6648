// libFuzzer target: the link's schema conversions (gateway/link_rpc) on
// arbitrary bytes read as a Cap'n Proto message, the way a link connection
// reads its calls' parameters: FlatArrayMessageReader over an aligned copy,
// with the link's ReaderOptions (reader_options(), a tighter traversal limit).
//
// The first byte picks what the rest is read as:
//   0: Child.syncScope params  (List(DeviceEntry) -> device_record, read_entry)
//   1: Parent.upload params    (List(Envelope) -> link_envelope, message::decode)
//   2: Parent.reportTwins / Child.desired params (List(TwinUpdate), read_twins)
// Malformed Cap'n Proto is Cap'n Proto's to refuse (a kj::Exception, which the
// RPC system turns into a failed call); our conversions must never crash nor
// throw anything else, must report bad content as expected<> errors, and what
// they accept must survive the trip back through fill().
#include "gateway/link.hpp"
#include "gateway/link_rpc.hpp"

#include <canopy/message.hpp>
#include <link.capnp.h>

#include <capnp/message.h>
#include <capnp/serialize.h>
#include <kj/array.h>
#include <kj/exception.h>

#include <nlohmann/json.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <string_view>
#include <vector>

namespace {

using namespace canopy;
using namespace canopy::link_rpc;

void check(bool ok, const char* what, const std::string& detail) {
  if (!ok) {
    std::fprintf(stderr, "invariant violated: %s: %s\n", what, detail.c_str());
    __builtin_trap();
  }
}

capnp::ReaderOptions options() {
  link_limits limits;
  // The link's default (8 Mi words) allows amplification far beyond these
  // inputs; a small limit keeps each run fast and still exercises the check.
  limits.traversal_limit_words = 1u << 16;
  return reader_options(limits);
}

void sync_scope(capnp::FlatArrayMessageReader& reader) {
  auto list = reader.getRoot<schema::Child::SyncScopeParams>().getEntries();
  for (unsigned i = 0; i < list.size(); ++i) {
    auto rec = read_entry(list[i], i);
    if (!rec) {
      const auto& msg = rec.err().message;
      check(rec.err().code == errc::invalid_argument, "bad entries are invalid_argument", msg);
      check(msg.rfind("syncScope: entry " + std::to_string(i) + " (", 0) == 0,
            "the error names the entry", msg);
      continue;
    }
    check(rec->tags.is_object(), "tags are an object", rec->id);
    // Back through fill() (as the hub sends it) and read again: the same record.
    capnp::MallocMessageBuilder builder;
    auto out = builder.initRoot<schema::DeviceEntry>();
    fill(out, *rec);
    auto again = read_entry(out.asReader(), i);
    check(again.ok(), "a filled entry reads back", again ? "" : again.err().message);
    check(*again == *rec, "a filled entry reads back the same", rec->id);
  }
}

void upload(capnp::FlatArrayMessageReader& reader) {
  auto list = reader.getRoot<schema::Parent::UploadParams>().getMessages();
  for (unsigned i = 0; i < list.size(); ++i) {
    auto e = list[i];
    auto data = e.getMessage();
    // As link_server's upload: decode, or refuse the call naming message i.
    auto msg = message::decode(view_of(data));
    if (!msg)
      continue;
    link_envelope env{std::move(*msg), string_of(e.getDevice()), string_of(e.getModule()),
                      string_of(e.getOutput())};
    check(env.msg.encoded() == view_of(data), "a decoded message keeps its bytes", env.device);
    std::size_t total = env.msg.body().size() + env.msg.message_id().size();
    for (const auto& [k, v] : env.msg.properties())
      total += k.size() + v.size();
    (void) total;
    // As link_client's upload: the same bytes go out again.
    capnp::MallocMessageBuilder builder;
    auto out = builder.initRoot<schema::Envelope>();
    out.setMessage(bytes_of(env.msg.encoded()));
    out.setDevice(env.device);
    check(view_of(out.asReader().getMessage()) == view_of(data), "re-sent bytes are the same",
          env.device);
  }
}

void twins(capnp::FlatArrayMessageReader& reader) {
  auto list = reader.getRoot<schema::Parent::ReportTwinsParams>().getUpdates();
  auto updates = read_twins(list);
  check(updates.size() == list.size(), "one twin_update per TwinUpdate", "");
  capnp::MallocMessageBuilder builder;
  auto out = builder.initRoot<schema::Child::DesiredParams>().initUpdates(
    static_cast<unsigned>(updates.size()));
  fill(out, updates);
  auto again = read_twins(out.asReader());
  check(again.size() == updates.size(), "the same number back", "");
  for (std::size_t i = 0; i < updates.size(); ++i) {
    const auto& a = updates[i];
    const auto& b = again[i];
    check(a.device == b.device && a.module == b.module && a.json == b.json &&
            a.version == b.version && a.full == b.full,
          "a filled update reads back the same", a.device);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size < 1 + sizeof(capnp::word))
    return 0;
  const auto kind = data[0] % 3;
  ++data;
  --size;
  // An aligned copy: FlatArrayMessageReader reads words in place.
  auto words = kj::heapArray<capnp::word>(size / sizeof(capnp::word));
  std::memcpy(words.begin(), data, words.size() * sizeof(capnp::word));
  try {
    capnp::FlatArrayMessageReader reader(words.asPtr(), options());
    switch (kind) {
      case 0:
        sync_scope(reader);
        break;
      case 1:
        upload(reader);
        break;
      default:
        twins(reader);
        break;
    }
  } catch (const kj::Exception&) {
    // Malformed Cap'n Proto: refused by Cap'n Proto itself, as in the RPC system.
  }
  return 0;
}
