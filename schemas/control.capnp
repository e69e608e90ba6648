# The local control API (canopyctl <-> canopy over a Unix socket).
#
# Served by gateway/control_server on the node's I/O thread; one method per
# operation of gateway/node_control.hpp. Expected failures (unknown module, bad
# manifest, timeout) come back as a `Status` in the results, never as an RPC
# exception: an exception means the connection or the node itself broke.
@0x8fc0048f9659d364;

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("canopy::schema");

# canopy::errc, plus `ok`. The numbers match canopy::errc.
enum ErrorCode {
  ok @0;
  invalidArgument @1;
  notFound @2;
  incompatible @3;
  ioError @4;
  storeError @5;
  timeout @6;
  unavailable @7;
  failed @8;
}

# The outcome of an operation: `ok`, or a code and a message naming what was at fault.
struct Status {
  code @0 :ErrorCode;
  message @1 :Text;
}

# One module of the current deployment (canopy::module_row).
struct ModuleRow {
  name @0 :Text;
  type @1 :Text;
  version @2 :Text;
  status @3 :Text;             # running | stopped | failed | backoff | unhealthy
  desiredStatus @4 :Text;      # running | stopped
  restartPolicy @5 :Text;
  restartCount @6 :Int32;
  lastStartMs @7 :Int64;       # wall clock, ms since the Unix epoch; 0 = never
  lastExitMs @8 :Int64;
  lastExitReason @9 :Text;
}

# A message that arrived at $upstream (canopy::upstream_record).
struct UpstreamRecord {
  seq @0 :Int64;
  enqueuedMs @1 :Int64;
  sourceModule @2 :Text;
  output @3 :Text;
  message @4 :Data;            # canopy::message::encoded(); decode with message::decode
}

# Implemented by the client: receives the lines of `followLogs`.
interface LogSink {
  line @0 (text :Text) -> stream;
  # The node dropped `count` lines because the client did not keep up.
  dropped @1 (count :UInt64) -> stream;
}

# Implemented by the client: receives the records of `monitor`.
interface MessageSink {
  record @0 (record :UpstreamRecord) -> stream;
  # The node dropped `count` records because the client did not keep up.
  dropped @1 (count :UInt64) -> stream;
}

# The bootstrap capability of the control socket.
interface Control {
  list @0 () -> (status :Status, modules :List(ModuleRow));
  restart @1 (module :Text) -> (status :Status);
  deploy @2 (manifestJson :Text, baseDir :Text) -> (status :Status);
  invoke @3 (module :Text, method :Text, payloadJson :Text, timeoutMs :UInt32)
      -> (status :Status, methodStatus :Int32, payloadJson :Text);
  twin @4 (module :Text) -> (status :Status, desiredJson :Text, reportedJson :Text);
  logs @5 (module :Text, tail :UInt32) -> (status :Status, lines :List(Text));

  # Streams new log lines of `module` into `sink`. Returns only on an error (at
  # once) or when the stream ends; the subscription lasts until the caller
  # cancels this call, disconnects, or a call on `sink` fails.
  followLogs @6 (module :Text, sink :LogSink) -> (status :Status);

  # Streams $upstream messages into `sink`: first the stored ones with
  # seq > afterSeq (at most `backlog`), then new ones. Lifetime as followLogs.
  monitor @7 (afterSeq :Int64, backlog :UInt32, sink :MessageSink) -> (status :Status);
}
