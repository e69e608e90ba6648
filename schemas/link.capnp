# The link between two nodes of the tree (DESIGN.md "Between nodes"): a child
# gateway and its parent (a gateway or the hub). Cap'n Proto RPC over mutually
# authenticated TLS; served by gateway/link_server (parent side) and called by
# gateway/link_client (child side).
#
# Authorization by construction: the bootstrap capability of a parent's link
# port is a `Parent` bound to the child that the TLS handshake authenticated
# (its certificate's subject CN). Everything it accepts is checked against that
# child's subtree (the child and its registered descendants); anything else is
# refused with an exception naming the device. The child exports a `Child` in
# `hello` through which the parent sends things down.
#
# Expected failures (unknown device, outside the subtree, store full) come back
# as exceptions with a message naming the field: the link is a trusted-but-
# checked peer, and the caller treats any failure of a call as "not done".
@0xc1f3a6d2b4e59a17;

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("canopy::schema");

# One telemetry message on its way up, with where it came from.
struct Envelope {
  message @0 :Data;            # canopy::message::encoded() (schemas/message.capnp), never re-encoded
  device @1 :Text;             # connectionDeviceId: a node or leaf device of the sender's subtree
  module @2 :Text;             # connectionModuleId ("" for a leaf device)
  output @3 :Text;             # outputName
}

# One device or gateway of the registry (the part of it a gateway caches).
struct DeviceEntry {
  id @0 :Text;
  parent @1 :Text;
  kind @2 :Text;               # "gateway" | "device"
  tagsJson @3 :Text;           # JSON object
  auth @4 :Text;               # "x509_ca" | "x509_thumbprint" | "sas"
  thumbprint @5 :Text;         # SHA-256, uppercase hex (x509_thumbprint)
  primaryKey @6 :Text;         # base64 (sas)
  secondaryKey @7 :Text;
}

# The runtime state of one module of a node (canopy::module_row).
struct ModuleStatus {
  name @0 :Text;
  type @1 :Text;
  version @2 :Text;
  status @3 :Text;             # running | stopped | failed | backoff | unhealthy
  desiredStatus @4 :Text;
  restartPolicy @5 :Text;
  restartCount @6 :Int32;
  lastStartMs @7 :Int64;
  lastExitMs @8 :Int64;
  lastExitReason @9 :Text;
}

# A twin document or patch of a device's or module's twin.
struct TwinUpdate {
  device @0 :Text;
  module @1 :Text;             # "" = the device twin; "$edgeAgent" carries deployments
  json @2 :Text;               # the whole document (full) or a JSON merge patch
  version @3 :Int64;           # the version after this update
  full @4 :Bool;               # true: `json` replaces the document
}

interface Parent {
  # First call of a link: who the child is (must equal its certificate's CN)
  # and its downstream capability. Returns the parent's id.
  hello @0 (node :Text, child :Child, software :Text) -> (parent :Text);

  # Telemetry. Answered once every message is durable in the parent's store:
  # until then the child keeps them. Calls are answered in order. A child keeps
  # a bounded number of calls in flight (credits), so a fast child cannot
  # exhaust the parent's memory; the parent also refuses batches over its limit.
  upload @1 (messages :List(Envelope)) -> (accepted :UInt32);

  # Liveness and round-trip time.
  ping @2 () -> (parentTimeMs :Int64);

  # Reported properties and module statuses of nodes and devices in the subtree
  # (for a node, module "$edgeAgent" holds its deployment status and modules).
  reportTwins @3 (updates :List(TwinUpdate)) -> ();
}

interface Child {
  # The registry of the child's subtree, replacing what it cached.
  syncScope @0 (entries :List(DeviceEntry)) -> ();

  # Desired properties for twins in the child's subtree (deployments travel as
  # the "$edgeAgent" twin's desired properties of the gateway they target).
  desired @1 (updates :List(TwinUpdate)) -> ();

  # A direct method on a module of a node in the child's subtree, hop by hop.
  invoke @2 (device :Text, module :Text, method :Text, payload :Text, timeoutMs :UInt32)
      -> (status :Int32, payload :Text);
}
