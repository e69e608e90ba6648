#!/usr/bin/python3
"""A small device written for Azure IoT Hub's MQTT protocol, on paho-mqtt 1.6
(Debian's python3-paho-mqtt), the way a device program that has never heard
of Canopy would talk to IoT Hub: client id "{device}", user name
"{host}/{device}/?api-version=...", a SAS token as the password (or an X.509
client certificate), TLS or plain TCP.

It is the test's independent client (tests/integration/mqtt.test.cpp): its
SAS tokens are made here the way Azure's device SDKs make them, not by
Canopy's code.

Every event goes to stdout as one JSON object per line, e.g.
  {"event": "connack", "rc": 0, "session_present": false}
  {"event": "suback", "granted": [1]}
  {"event": "message", "topic": "...", "payload": "...", "qos": 1}
Exit codes: 0 done; 2 usage; 3 connection refused or failed (the "connack"
or "error" line says why); 4 timed out; 5 connection lost unexpectedly.

Subcommands (common options before the subcommand):
  sas                   print a SAS token (for mosquitto_pub -P)
  connect               connect, print the CONNACK, disconnect
  telemetry             send --count messages at QoS 1; exit 0 once all are PUBACKed
  twin-get              GET the twin, print it ("twin" line, body as JSON)
  twin-report           PATCH reported properties with --patch; print the answer
  twin-wait-desired     wait for --count desired patches and print them
  methods               serve direct methods for --seconds (200, echoing the request)
  c2d                   wait for --count cloud-to-device messages and print them
  publish               publish to --topic; exit 0 if the server closes the connection
  subscribe             subscribe to --filter; print the granted QoS
"""

import argparse
import base64
import hashlib
import hmac
import json
import ssl
import sys
import threading
import time
import urllib.parse

import paho.mqtt.client as mqtt

API_VERSION = "2021-04-12"


def emit(event, **fields):
    print(json.dumps(dict(event=event, **fields)), flush=True)


def generate_sas_token(resource_uri, key_b64, expiry):
    """SharedAccessSignature for `resource_uri` ("{host}/devices/{id}"), as
    Azure's device SDKs make it: HMAC-SHA256, keyed with the base64-decoded
    device key, over the URL-encoded resource, a newline and the expiry;
    the signature base64, then URL-encoded."""
    encoded_uri = urllib.parse.quote(resource_uri, safe="")
    message = (encoded_uri + "\n" + str(expiry)).encode("utf-8")
    digest = hmac.HMAC(base64.b64decode(key_b64), message, hashlib.sha256).digest()
    signature = urllib.parse.quote(base64.b64encode(digest).decode("ascii"), safe="")
    return f"SharedAccessSignature sr={encoded_uri}&sig={signature}&se={expiry}"


def property_bag(props):
    """IoT Hub's property bag: key=value pairs, URL-encoded, joined by '&'."""
    return "&".join(
        f"{urllib.parse.quote(k, safe='$.')}={urllib.parse.quote(v, safe='')}" for k, v in props.items()
    )


def parse_bag(bag):
    out = {}
    for pair in bag.split("&"):
        if pair:
            k, _, v = pair.partition("=")
            out[urllib.parse.unquote(k)] = urllib.parse.unquote(v)
    return out


def query_of(topic):
    return parse_bag(topic.partition("?")[2])


def text(payload):
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError:
        return base64.b64encode(payload).decode("ascii")


class Device:
    """One paho connection with the options of the command line."""

    def __init__(self, args):
        self.args = args
        self.connected = threading.Event()
        self.closed = threading.Event()
        self.subscribed = threading.Event()
        self.lock = threading.Lock()
        self.connack_rc = None
        self.session_present = None
        self.disconnect_rc = None
        self.on_msg = None
        self.acked = set()
        self.granted = None
        identity = args.device + (f"/{args.module}" if args.module else "")
        self.client_id = args.client_id if args.client_id is not None else identity
        kwargs = {
            "client_id": self.client_id,
            "clean_session": not args.persistent,
            "protocol": mqtt.MQTTv311,
            "reconnect_on_failure": False,
        }
        if hasattr(mqtt, "CallbackAPIVersion"):  # paho-mqtt 2.x; Debian 12 has 1.6
            kwargs["callback_api_version"] = mqtt.CallbackAPIVersion.VERSION1
        self.client = mqtt.Client(**kwargs)
        user = args.user if args.user is not None else f"{args.hub_host}/{identity}/?api-version={API_VERSION}"
        password = password_of(args)
        if user != "" or password is not None:
            self.client.username_pw_set(user, password)
        if args.tls:
            self.client.tls_set(ca_certs=args.ca, certfile=args.cert, keyfile=args.key_file,
                                cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        self.client.max_inflight_messages_set(100)
        self.client.max_queued_messages_set(0)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message

    def _on_connect(self, _c, _u, flags, rc):
        self.connack_rc = rc
        self.session_present = bool(flags.get("session present", 0))
        emit("connack", rc=rc, session_present=self.session_present, reason=mqtt.connack_string(rc))
        self.connected.set()

    def _on_disconnect(self, _c, _u, rc):
        self.disconnect_rc = rc
        emit("disconnect", rc=rc)
        self.closed.set()
        self.connected.set()  # wake a waiter for the CONNACK

    def _on_publish(self, _c, _u, mid):
        with self.lock:
            self.acked.add(mid)

    def _on_subscribe(self, _c, _u, _mid, granted):
        self.granted = list(granted)
        emit("suback", granted=self.granted)
        self.subscribed.set()

    def _on_message(self, _c, _u, msg):
        emit("message", topic=msg.topic, payload=text(msg.payload), qos=msg.qos, retain=bool(msg.retain))
        if self.on_msg is not None:
            self.on_msg(msg)

    def connect(self):
        """Connects; returns only when accepted (exits 3 otherwise)."""
        try:
            self.client.connect(self.args.host, self.args.port, keepalive=self.args.keepalive)
        except (OSError, ssl.SSLError) as e:
            emit("error", error=f"{type(e).__name__}: {e}")
            sys.exit(3)
        self.client.loop_start()
        if not self.connected.wait(self.args.timeout):
            emit("error", error="no CONNACK in time")
            self.stop()
            sys.exit(4)
        if self.connack_rc != 0:
            self.stop()
            sys.exit(3)
        if self.closed.is_set():
            emit("error", error="connection closed before CONNACK")
            self.stop()
            sys.exit(3)

    def subscribe(self, topics):
        self.subscribed.clear()
        self.client.subscribe(topics)
        if not wait_either(self.subscribed, self.closed, self.args.timeout) or not self.subscribed.is_set():
            emit("error", error="no SUBACK")
            self.stop()
            sys.exit(5 if self.closed.is_set() else 4)
        emit("subscribed")

    def publish(self, topic, payload, qos):
        info = self.client.publish(topic, payload, qos=qos)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            emit("error", error=f"publish failed: {mqtt.error_string(info.rc)}")
            self.stop()
            sys.exit(5)
        return info.mid

    def stop(self):
        try:
            self.client.disconnect()
        except Exception:  # noqa: BLE001 - already gone
            pass
        self.client.loop_stop()


def wait_either(a, b, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if a.is_set() or b.is_set():
            return True
        time.sleep(0.01)
    return a.is_set() or b.is_set()


def password_of(args):
    if args.no_password:
        return None
    if args.password is not None:
        return args.password
    if args.key is None:
        return None
    expiry = args.expiry if args.expiry is not None else int(time.time()) + args.ttl
    identity = args.sas_device or args.device
    resource = f"{args.hub_host}/devices/{identity}"
    if args.module:
        resource += f"/modules/{args.module}"
    return generate_sas_token(resource, args.key, expiry)


# --- subcommands --------------------------------------------------------------------


def cmd_sas(args):
    print(password_of(args), flush=True)
    return 0


def cmd_connect(args):
    d = Device(args)
    d.connect()
    d.stop()
    return 0


def cmd_telemetry(args):
    d = Device(args)
    d.connect()
    base = f"devices/{args.device}/messages/events/"
    mids = []
    for i in range(args.first, args.first + args.count):
        props = {"$.mid": f"{args.mid_prefix}{i}"}
        if args.content_type:
            props["$.ct"] = args.content_type
            props["$.ce"] = "utf-8"
        for p in args.prop:
            k, _, v = p.partition("=")
            props[k] = v
        body = json.dumps({"n": i, "temperature": 21.5})
        mids.append(d.publish(base + property_bag(props), body, 1))
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline and not d.closed.is_set():
        with d.lock:
            if all(m in d.acked for m in mids):
                break
        time.sleep(0.01)
    with d.lock:
        acked = sum(1 for m in mids if m in d.acked)
    emit("telemetry", sent=len(mids), acked=acked)
    closed = d.closed.is_set()
    d.stop()
    if acked == len(mids):
        return 0
    return 5 if closed else 4


def twin_request(d, topic, payload, args):
    """Publishes a twin request with a fresh $rid and waits for its answer."""
    rid = str(int(time.time() * 1000) % 1000000)
    answer = {}
    done = threading.Event()

    def on_msg(msg):
        if msg.topic.startswith("$iothub/twin/res/") and query_of(msg.topic).get("$rid") == rid:
            answer["status"] = int(msg.topic[len("$iothub/twin/res/"):].partition("/")[0])
            answer["query"] = query_of(msg.topic)
            answer["body"] = text(msg.payload)
            done.set()

    d.on_msg = on_msg
    d.publish(f"{topic}?$rid={rid}", payload, 0)
    if not wait_either(done, d.closed, args.timeout) or not done.is_set():
        emit("error", error="no twin answer")
        d.stop()
        sys.exit(5 if d.closed.is_set() else 4)
    return answer


def cmd_twin_get(args):
    d = Device(args)
    d.connect()
    d.subscribe([("$iothub/twin/res/#", 0)])
    a = twin_request(d, "$iothub/twin/GET/", b"", args)
    body = json.loads(a["body"]) if a["status"] == 200 and a["body"] else None
    emit("twin", status=a["status"], body=body)
    d.stop()
    return 0 if a["status"] == 200 else 1


def cmd_twin_report(args):
    d = Device(args)
    d.connect()
    d.subscribe([("$iothub/twin/res/#", 0)])
    a = twin_request(d, "$iothub/twin/PATCH/properties/reported/", args.patch, args)
    emit("reported", status=a["status"], version=a["query"].get("$version"))
    d.stop()
    return 0 if a["status"] == 204 else 1


def cmd_twin_wait_desired(args):
    d = Device(args)
    patches = []
    done = threading.Event()

    def on_msg(msg):
        if msg.topic.startswith("$iothub/twin/PATCH/properties/desired/"):
            emit("desired", topic=msg.topic, version=query_of(msg.topic).get("$version"),
                 body=json.loads(msg.payload or b"{}"))
            patches.append(msg)
            if len(patches) >= args.count:
                done.set()

    d.on_msg = on_msg
    d.connect()
    d.subscribe([("$iothub/twin/PATCH/properties/desired/#", 0)])
    ok = wait_either(done, d.closed, args.timeout) and done.is_set()
    d.stop()
    return 0 if ok else 4


def cmd_methods(args):
    d = Device(args)
    served = []

    def on_msg(msg):
        if not msg.topic.startswith("$iothub/methods/POST/"):
            return
        name = msg.topic[len("$iothub/methods/POST/"):].partition("/")[0]
        rid = query_of(msg.topic).get("$rid", "")
        try:
            request = json.loads(msg.payload) if msg.payload else None
        except ValueError:
            request = text(msg.payload)
        answer = {"method": name, "request": request, "device": args.device}
        d.client.publish(f"$iothub/methods/res/200/?$rid={rid}", json.dumps(answer), qos=0)
        emit("method", name=name, rid=rid, request=request)
        served.append(name)

    d.on_msg = on_msg
    d.connect()
    d.subscribe([("$iothub/methods/POST/#", 0)])
    deadline = time.monotonic() + args.seconds
    while time.monotonic() < deadline and not d.closed.is_set():
        time.sleep(0.05)
    lost = d.closed.is_set()
    d.stop()
    emit("methods", served=len(served))
    return 5 if lost else 0


def cmd_c2d(args):
    d = Device(args)
    got = []
    done = threading.Event()
    prefix = f"devices/{args.device}/messages/devicebound/"

    def on_msg(msg):
        if msg.topic.startswith(prefix):
            emit("c2d", topic=msg.topic, properties=parse_bag(msg.topic[len(prefix):]), body=text(msg.payload),
                 qos=msg.qos)
            got.append(msg)
            if len(got) >= args.count:
                done.set()

    d.on_msg = on_msg
    d.connect()
    if not args.no_subscribe:
        d.subscribe([(prefix + "#", 1)])
    if args.count == 0:
        d.stop()
        return 0
    ok = wait_either(done, d.closed, args.timeout) and done.is_set()
    # Give paho a moment to send the PUBACK before disconnecting.
    time.sleep(0.2)
    d.stop()
    return 0 if ok else 4


def cmd_publish(args):
    d = Device(args)
    d.connect()
    mid = d.publish(args.topic, args.payload, args.qos)
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline and not d.closed.is_set():
        with d.lock:
            if mid in d.acked and args.qos == 1:
                break
        time.sleep(0.01)
    closed = d.closed.is_set()
    with d.lock:
        acked = mid in d.acked
    emit("published", acked=acked, closed=closed)
    d.stop()
    # Success here means the server closed the connection (the refusal the test wants).
    return 0 if closed and not (acked and args.qos == 1) else 1


def cmd_subscribe(args):
    d = Device(args)
    d.connect()
    d.subscribe([(args.filter, args.qos)])
    d.stop()
    return 0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8883)
    p.add_argument("--tls", action="store_true", help="TLS (with --ca, the server's trust root)")
    p.add_argument("--ca", help="trust root of the server's certificate (PEM)")
    p.add_argument("--cert", help="client certificate (PEM)")
    p.add_argument("--key-file", help="client certificate's key (PEM)")
    p.add_argument("--device", required=True)
    p.add_argument("--module", default="")
    p.add_argument("--hub-host", required=True, help="the host name SAS tokens are signed for")
    p.add_argument("--key", help="the device's base64 key: sign a SAS token with it")
    p.add_argument("--sas-device", help="sign the token for this device's resource instead")
    p.add_argument("--ttl", type=int, default=3600, help="token lifetime in seconds")
    p.add_argument("--expiry", type=int, help="token expiry, Unix seconds (overrides --ttl)")
    p.add_argument("--password", help="use this password as it is")
    p.add_argument("--no-password", action="store_true")
    p.add_argument("--client-id", help="MQTT client id (default: device[/module])")
    p.add_argument("--user", help="MQTT user name (default: IoT Hub's for the identity)")
    p.add_argument("--persistent", action="store_true", help="clean_session=False")
    p.add_argument("--keepalive", type=int, default=60)
    p.add_argument("--timeout", type=float, default=30, help="seconds to wait for anything")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("sas").set_defaults(run=cmd_sas)
    sub.add_parser("connect").set_defaults(run=cmd_connect)
    t = sub.add_parser("telemetry")
    t.add_argument("--count", type=int, default=1)
    t.add_argument("--first", type=int, default=1)
    t.add_argument("--mid-prefix", default="msg-")
    t.add_argument("--content-type", default="application/json")
    t.add_argument("--prop", action="append", default=[], help="application property k=v (repeatable)")
    t.set_defaults(run=cmd_telemetry)
    sub.add_parser("twin-get").set_defaults(run=cmd_twin_get)
    r = sub.add_parser("twin-report")
    r.add_argument("--patch", required=True)
    r.set_defaults(run=cmd_twin_report)
    w = sub.add_parser("twin-wait-desired")
    w.add_argument("--count", type=int, default=1)
    w.set_defaults(run=cmd_twin_wait_desired)
    m = sub.add_parser("methods")
    m.add_argument("--seconds", type=float, default=20)
    m.set_defaults(run=cmd_methods)
    c = sub.add_parser("c2d")
    c.add_argument("--count", type=int, default=1, help="0: subscribe and leave")
    c.add_argument("--no-subscribe", action="store_true", help="rely on the persistent session's subscription")
    c.set_defaults(run=cmd_c2d)
    pub = sub.add_parser("publish")
    pub.add_argument("--topic", required=True)
    pub.add_argument("--payload", default="{}")
    pub.add_argument("--qos", type=int, default=1)
    pub.set_defaults(run=cmd_publish)
    s = sub.add_parser("subscribe")
    s.add_argument("--filter", required=True)
    s.add_argument("--qos", type=int, default=1)
    s.set_defaults(run=cmd_subscribe)
    args = p.parse_args()
    if args.command != "sas" and args.tls and not args.ca:
        p.error("--tls needs --ca")
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
