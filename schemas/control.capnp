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

# One queue of the message store: a lane (endpoint, priority) (canopy::queue_metrics).
struct Queue {
  endpoint @0 :Text;           # "$upstream" or "/modules/{id}/inputs/{name}"
  priority @1 :Int32;          # 0 (most urgent) .. 9
  length @2 :Int64;            # messages not yet acknowledged by the receiver
  checkpoint @3 :Int64;        # last acknowledged seq
  lastSeq @4 :Int64;           # highest seq given to a stored message
}

# The node's message metrics (canopy::node_metrics): counters since the router
# started, and the store's state now.
struct Metrics {
  received @0 :UInt64;
  sent @1 :UInt64;
  droppedNoRoute @2 :UInt64;
  droppedTtlExpiry @3 :UInt64;
  droppedStoreFull @4 :UInt64;
  redelivered @5 :UInt64;
  queues @6 :List(Queue);      # by endpoint, then priority
  storeBytes @7 :Int64;
  storeFreeBytes @8 :Int64;
  storeLimitBytes @9 :Int64;   # 0 = no limit
  commits @10 :UInt64;
  commitP50Us @11 :Int64;
  commitP99Us @12 :Int64;
  commitMaxUs @13 :Int64;
  links @14 :List(Link);       # the parent link and the child links
  refusedMessages @15 :UInt64; # uploads of children outside their subtree
}

# One link between two nodes of the tree (canopy::link_metrics).
struct Link {
  peer @0 :Text;
  role @1 :Text;               # "parent" | "child"
  up @2 :Bool;
  rttUs @3 :Int64;
  connects @4 :UInt64;
  disconnects @5 :UInt64;
  offlineMsTotal @6 :Int64;
  lastChangeMs @7 :Int64;
  lastError @8 :Text;
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

  # The router's counters and the store's state.
  metrics @8 () -> (status :Status, metrics :Metrics);

  # Routes `message` (canopy::message::encoded() bytes) as if module `module`'s
  # output `output` sent it, or as telemetry of leaf device `device` when
  # `module` is empty. Answers once the message is durable: `targets` is the
  # number of endpoints it was queued to (0 = it matched no route). Bytes that
  # do not decode are `invalidArgument`; a full store is `unavailable`.
  # Calls may be pipelined: many in flight on one connection.
  send @9 (device :Text, module :Text, output :Text, message :Data) -> (status :Status, targets :UInt64);

  # `send` for many messages in one call (at most 4096), each answered on its
  # own: `results[i]` belongs to `items[i]`. Answers once every item is durable
  # or refused. `canopyctl send --stdin` uses it for what its input holds.
  sendBatch @10 (items :List(SendItem)) -> (results :List(SendResult));
}

# One message of sendBatch (the parameters of send).
struct SendItem {
  device @0 :Text;
  module @1 :Text;
  output @2 :Text;
  message @3 :Data;
}

# The answer for one SendItem (the results of send).
struct SendResult {
  status @0 :Status;
  targets @1 :UInt64;
}
