#!/usr/bin/python3
"""A Canopy process module in Python: a simulated sensor that speaks Azure IoT
Hub's MQTT device protocol to its node (Debian's python3-paho-mqtt, no Azure SDK).

What it does, all over MQTT:
- sends a reading {"temperature": ..., "humidity": ...} every `interval`
  seconds on its output "telemetry";
- forwards every message that arrives on any of its inputs to its output
  "forwarded", properties kept;
- reads its twin at start, takes `interval` from the desired properties (and
  from every desired patch), and reports the interval it uses;
- answers the direct methods "ping" and "setInterval" ({"seconds": N}).

The node starts it with its connection variables (see README.md); it exits
with a non-zero code when it cannot connect or is refused, and the node
restarts it with backoff. SIGTERM (the node stopping it) disconnects cleanly
and exits 0.
"""

import json
import os
import random
import signal
import ssl
import sys
import threading
import time
import urllib.parse

import paho.mqtt.client as mqtt

API_VERSION = "2021-04-12"

# Lines reach `canopyctl logs` as they are written, not when a buffer fills.
sys.stdout.reconfigure(line_buffering=True)
sys.stderr.reconfigure(line_buffering=True)


def log(*args):
    print(*args, flush=True)


def warn(*args):
    print(*args, file=sys.stderr, flush=True)


def env(name, default=None):
    value = os.environ.get(name, default)
    if value is None:
        warn(f"{name} is not set: start this program as a Canopy process module")
        sys.exit(2)
    return value


DEVICE = env("CANOPY_DEVICE_ID")
MODULE = env("CANOPY_MODULE_ID")
HOST = env("CANOPY_MQTT_HOST", "localhost")
PORT = int(env("CANOPY_MQTT_PORT", "8883"))
# TLS unless told otherwise (plain TCP is for a node run with --mqtt-plain).
USE_TLS = env("CANOPY_MQTT_TLS", "1") not in ("0", "false", "no")
CA_FILE = os.environ.get("CANOPY_MQTT_CA_FILE")  # the node's trust root
USERNAME = env("CANOPY_MQTT_USERNAME", f"{HOST}/{DEVICE}/{MODULE}/?api-version={API_VERSION}")
PASSWORD = os.environ.get("CANOPY_MQTT_PASSWORD")  # a SAS token

# Azure IoT Hub's topics for a module identity.
EVENTS = f"devices/{DEVICE}/modules/{MODULE}/messages/events/"
INPUTS = f"devices/{DEVICE}/modules/{MODULE}/inputs/"
SUBSCRIPTIONS = [
    (INPUTS + "#", 1),
    ("$iothub/methods/POST/#", 0),
    ("$iothub/twin/res/#", 0),
    ("$iothub/twin/PATCH/properties/desired/#", 0),
]

stop = threading.Event()
interval = 5.0
rid_counter = 0
rid_lock = threading.Lock()


def next_rid():
    global rid_counter
    with rid_lock:
        rid_counter += 1
        return str(rid_counter)


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
    """The query part of "$iothub/...?$rid=1&$version=2" as a dict."""
    return parse_bag(topic.partition("?")[2])


def send_output(client, output, body, props=None):
    bag = {"$.on": output, "$.ct": "application/json", "$.ce": "utf-8"}
    bag.update(props or {})
    client.publish(EVENTS + property_bag(bag), body, qos=1)


def report(client, patch):
    client.publish(f"$iothub/twin/PATCH/properties/reported/?$rid={next_rid()}", json.dumps(patch), qos=0)


def apply_desired(client, desired):
    global interval
    value = desired.get("interval")
    if isinstance(value, (int, float)) and value > 0:
        interval = float(value)
        log(f"interval is now {interval} s (desired properties)")
    report(client, {"interval": interval})


def on_method(client, topic, payload):
    # $iothub/methods/POST/{name}/?$rid={rid}
    name = topic[len("$iothub/methods/POST/"):].partition("/")[0]
    rid = query_of(topic).get("$rid", "0")
    try:
        args = json.loads(payload) if payload else {}
    except ValueError:
        args = None
    global interval
    if args is None:
        status, answer = 400, {"error": "payload is not JSON"}
    elif name == "ping":
        status, answer = 200, {"pong": True, "module": MODULE}
    elif name == "setInterval" and isinstance(args.get("seconds"), (int, float)) and args["seconds"] > 0:
        interval = float(args["seconds"])
        report(client, {"interval": interval})
        status, answer = 200, {"interval": interval}
    else:
        status, answer = 404, {"error": f"unknown method or bad arguments: {name}"}
    log(f"method {name}: {status}")
    client.publish(f"$iothub/methods/res/{status}/?$rid={rid}", json.dumps(answer), qos=0)


def on_message(client, _userdata, msg):
    topic = msg.topic
    if topic.startswith(INPUTS):
        # devices/{d}/modules/{m}/inputs/{input}/{property bag}
        input_name, _, bag = topic[len(INPUTS):].partition("/")
        props = {k: v for k, v in parse_bag(bag).items() if not k.startswith("$.")}
        log(f"input {input_name}: {len(msg.payload)} bytes; forwarding")
        send_output(client, "forwarded", msg.payload, props)
    elif topic.startswith("$iothub/methods/POST/"):
        on_method(client, topic, msg.payload)
    elif topic.startswith("$iothub/twin/res/"):
        # $iothub/twin/res/{status}/?$rid={rid}: the answer to our GET (or to a report)
        status = topic[len("$iothub/twin/res/"):].partition("/")[0]
        if status == "200" and msg.payload:
            twin = json.loads(msg.payload)
            apply_desired(client, twin.get("desired", {}))
        elif not status.startswith("2"):
            warn(f"twin request failed with status {status}")
    elif topic.startswith("$iothub/twin/PATCH/properties/desired/"):
        apply_desired(client, json.loads(msg.payload or b"{}"))


def on_connect(client, _userdata, _flags, rc):
    if rc != 0:
        # 4: bad user name or password, 5: not authorized. Exiting lets the
        # node show it and restart the module with backoff.
        warn(f"connection refused: {mqtt.connack_string(rc)}")
        os._exit(3)
    log(f"connected to {HOST}:{PORT} as {DEVICE}/{MODULE}")
    client.subscribe(SUBSCRIPTIONS)
    client.publish(f"$iothub/twin/GET/?$rid={next_rid()}", b"", qos=0)


def on_disconnect(_client, _userdata, rc):
    if rc != 0 and not stop.is_set():
        warn(f"connection lost ({mqtt.error_string(rc)}); reconnecting")


def make_client():
    kwargs = {"client_id": f"{DEVICE}/{MODULE}", "clean_session": True, "protocol": mqtt.MQTTv311}
    if hasattr(mqtt, "CallbackAPIVersion"):  # paho-mqtt 2.x; Debian 12 has 1.6
        kwargs["callback_api_version"] = mqtt.CallbackAPIVersion.VERSION1
    client = mqtt.Client(**kwargs)
    client.username_pw_set(USERNAME, PASSWORD)
    if USE_TLS:
        client.tls_set(ca_certs=CA_FILE, tls_version=ssl.PROTOCOL_TLS_CLIENT)
    client.on_connect = on_connect
    client.on_message = on_message
    client.on_disconnect = on_disconnect
    client.reconnect_delay_set(min_delay=1, max_delay=30)
    return client


def main():
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    client = make_client()
    try:
        client.connect(HOST, PORT, keepalive=60)
    except (OSError, ssl.SSLError) as e:
        warn(f"cannot connect to {HOST}:{PORT}: {e}")
        return 1
    client.loop_start()
    temperature, humidity = 21.0, 45.0
    last = time.monotonic()
    # Wakes ten times a second, so that a new interval applies at once.
    while not stop.wait(0.1):
        if time.monotonic() - last < interval:
            continue
        last = time.monotonic()
        temperature += random.uniform(-0.2, 0.5)
        humidity = min(100.0, max(0.0, humidity + random.uniform(-1, 1)))
        reading = {"temperature": round(temperature, 2), "humidity": round(humidity, 1),
                   "timeCreated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        send_output(client, "telemetry", json.dumps(reading))
    log("stopping: disconnecting")
    client.disconnect()
    client.loop_stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
