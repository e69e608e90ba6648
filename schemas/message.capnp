# A telemetry message, built once and carried as the same bytes between actors,
# into the store and across gateway links (DESIGN.md "Messages").
@0xffb575073e41a626;

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("canopy::schema");

struct Property {
  key @0 :Text;
  value @1 :Text;
}

# System properties, named as in Azure IoT Hub.
struct SystemProperties {
  messageId @0 :Text;
  correlationId @1 :Text;
  contentType @2 :Text;
  contentEncoding @3 :Text;
  creationTimeUtcMs @4 :Int64;       # ms since the Unix epoch; 0 = unset
  connectionDeviceId @5 :Text;       # source device
  connectionModuleId @6 :Text;       # source module
  outputName @7 :Text;               # source output
  ttlSecs @8 :UInt32;                # 0 = the route's / node's default
  userId @9 :Text;
}

struct Message {
  body @0 :Data;
  properties @1 :List(Property);     # application properties, in insertion order
  system @2 :SystemProperties;
}
