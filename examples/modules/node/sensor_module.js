#!/usr/bin/env node
// A Canopy process module in Node.js: the same simulated sensor as
// ../python/sensor_module.py, on Debian's node-mqtt (MQTT.js 4.3), speaking
// Azure IoT Hub's MQTT device protocol to its node — no Azure SDK.
//
// - a reading every `interval` seconds on output "telemetry";
// - every message on any input forwarded to output "forwarded";
// - `interval` from the twin's desired properties (read at start, then every
//   patch), reported back;
// - direct methods "ping" and "setInterval" ({"seconds": N}).
//
// Debian installs node-mqtt under /usr/share/nodejs, which Debian's own
// nodejs searches; another build of node needs NODE_PATH=/usr/share/nodejs
// (the example manifest sets it). Exits non-zero when it cannot connect, is
// refused or loses its connection, so that the node restarts it with backoff;
// SIGTERM disconnects and exits 0.
'use strict';

const fs = require('fs');
const mqtt = require('mqtt');

const API_VERSION = '2021-04-12';

function env(name, fallback) {
  const v = process.env[name] !== undefined ? process.env[name] : fallback;
  if (v === undefined) {
    console.error(`${name} is not set: start this program as a Canopy process module`);
    process.exit(2);
  }
  return v;
}

const DEVICE = env('CANOPY_DEVICE_ID');
const MODULE = env('CANOPY_MODULE_ID');
const HOST = env('CANOPY_MQTT_HOST', 'localhost');
const PORT = Number(env('CANOPY_MQTT_PORT', '8883'));
const USE_TLS = !['0', 'false', 'no'].includes(env('CANOPY_MQTT_TLS', '1'));
const CA_FILE = process.env.CANOPY_MQTT_CA_FILE;
const USERNAME = env('CANOPY_MQTT_USERNAME', `${HOST}/${DEVICE}/${MODULE}/?api-version=${API_VERSION}`);
const PASSWORD = process.env.CANOPY_MQTT_PASSWORD;

const EVENTS = `devices/${DEVICE}/modules/${MODULE}/messages/events/`;
const INPUTS = `devices/${DEVICE}/modules/${MODULE}/inputs/`;

let interval = 5;
let rid = 0;
let timer = null;
let stopping = false;

// IoT Hub's property bag: URL-encoded key=value pairs joined by '&'.
function propertyBag(props) {
  return Object.entries(props)
    .map(([k, v]) => `${encodeURIComponent(k).replace(/%24/g, '$')}=${encodeURIComponent(v)}`)
    .join('&');
}

function parseBag(bag) {
  const out = {};
  for (const pair of bag.split('&')) {
    if (!pair) continue;
    const at = pair.indexOf('=');
    const k = at < 0 ? pair : pair.slice(0, at);
    const v = at < 0 ? '' : pair.slice(at + 1);
    out[decodeURIComponent(k)] = decodeURIComponent(v);
  }
  return out;
}

const queryOf = (topic) => parseBag(topic.split('?')[1] || '');

const options = {
  clientId: `${DEVICE}/${MODULE}`,
  username: USERNAME,
  password: PASSWORD,
  protocolVersion: 4, // MQTT 3.1.1
  clean: true,
  keepalive: 60,
  reconnectPeriod: 1000,
};
if (USE_TLS && CA_FILE) options.ca = fs.readFileSync(CA_FILE);
const client = mqtt.connect(`${USE_TLS ? 'mqtts' : 'mqtt'}://${HOST}:${PORT}`, options);

function sendOutput(output, body, props = {}) {
  const bag = Object.assign({ '$.on': output, '$.ct': 'application/json', '$.ce': 'utf-8' }, props);
  client.publish(EVENTS + propertyBag(bag), body, { qos: 1 });
}

function report(patch) {
  client.publish(`$iothub/twin/PATCH/properties/reported/?$rid=${++rid}`, JSON.stringify(patch), { qos: 0 });
}

function schedule() {
  if (timer) clearInterval(timer);
  let temperature = 21;
  let humidity = 45;
  timer = setInterval(() => {
    temperature += Math.random() * 0.7 - 0.2;
    humidity = Math.min(100, Math.max(0, humidity + Math.random() * 2 - 1));
    sendOutput('telemetry', JSON.stringify({
      temperature: Math.round(temperature * 100) / 100,
      humidity: Math.round(humidity * 10) / 10,
      timeCreated: new Date().toISOString(),
    }));
  }, interval * 1000);
}

function applyDesired(desired) {
  if (typeof desired.interval === 'number' && desired.interval > 0) {
    interval = desired.interval;
    console.log(`interval is now ${interval} s (desired properties)`);
    schedule();
  }
  report({ interval });
}

function onMethod(topic, payload) {
  // $iothub/methods/POST/{name}/?$rid={rid}
  const name = topic.slice('$iothub/methods/POST/'.length).split('/')[0];
  const id = queryOf(topic)['$rid'] || '0';
  let args;
  try {
    args = payload.length ? JSON.parse(payload.toString()) : {};
  } catch (e) {
    args = null;
  }
  let status;
  let answer;
  if (args === null) {
    [status, answer] = [400, { error: 'payload is not JSON' }];
  } else if (name === 'ping') {
    [status, answer] = [200, { pong: true, module: MODULE }];
  } else if (name === 'setInterval' && typeof args.seconds === 'number' && args.seconds > 0) {
    interval = args.seconds;
    schedule();
    report({ interval });
    [status, answer] = [200, { interval }];
  } else {
    [status, answer] = [404, { error: `unknown method or bad arguments: ${name}` }];
  }
  console.log(`method ${name}: ${status}`);
  client.publish(`$iothub/methods/res/${status}/?$rid=${id}`, JSON.stringify(answer), { qos: 0 });
}

client.on('connect', () => {
  console.log(`connected to ${HOST}:${PORT} as ${DEVICE}/${MODULE}`);
  client.subscribe({
    [`${INPUTS}#`]: { qos: 1 },
    '$iothub/methods/POST/#': { qos: 0 },
    '$iothub/twin/res/#': { qos: 0 },
    '$iothub/twin/PATCH/properties/desired/#': { qos: 0 },
  });
  client.publish(`$iothub/twin/GET/?$rid=${++rid}`, '', { qos: 0 });
  schedule();
});

client.on('message', (topic, payload) => {
  if (topic.startsWith(INPUTS)) {
    // devices/{d}/modules/{m}/inputs/{input}/{property bag}
    const rest = topic.slice(INPUTS.length);
    const slash = rest.indexOf('/');
    const input = slash < 0 ? rest : rest.slice(0, slash);
    const props = {};
    for (const [k, v] of Object.entries(parseBag(slash < 0 ? '' : rest.slice(slash + 1))))
      if (!k.startsWith('$.')) props[k] = v;
    console.log(`input ${input}: ${payload.length} bytes; forwarding`);
    sendOutput('forwarded', payload, props);
  } else if (topic.startsWith('$iothub/methods/POST/')) {
    onMethod(topic, payload);
  } else if (topic.startsWith('$iothub/twin/res/')) {
    const status = topic.slice('$iothub/twin/res/'.length).split('/')[0];
    if (status === '200' && payload.length) applyDesired(JSON.parse(payload.toString()).desired || {});
    else if (!status.startsWith('2')) console.error(`twin request failed with status ${status}`);
  } else if (topic.startsWith('$iothub/twin/PATCH/properties/desired/')) {
    applyDesired(JSON.parse(payload.toString() || '{}'));
  }
});

client.on('error', (err) => {
  // A refused CONNECT (bad credentials, not authorized) or a failed first
  // connection: exit, and let the node restart the module with backoff.
  console.error(`MQTT error: ${err.message}`);
  process.exit(3);
});

client.on('close', () => {
  if (!stopping) console.error('connection lost; reconnecting');
});

function stop() {
  stopping = true;
  console.log('stopping: disconnecting');
  if (timer) clearInterval(timer);
  client.end(false, {}, () => process.exit(0));
}
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
