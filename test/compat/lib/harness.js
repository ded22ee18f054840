'use strict';
// Harness for the compatibility suite: starts a target (a real `shoal run`
// cluster, or with SHOAL_COMPAT_TARGET=reference the official
// socketcluster-server v20 in one process), makes official clients and raw
// WebSockets, signs JWTs, reads the cluster's process table, records every
// WebSocket frame the test process sends or receives (for failure reports)
// and tears everything down, even when a test fails.
const assert = require('node:assert/strict');
const {spawn} = require('node:child_process');
const crypto = require('node:crypto');
const dgram = require('node:dgram');
const fs = require('node:fs');
const net = require('node:net');
const os = require('node:os');
const path = require('node:path');
const WebSocket = require('ws');
const scClient = require('socketcluster-client');

// The frame tap below patches the ws module the client itself loads: both
// must resolve to the same copy (package.json pins ws to the client's).
{
  const clientWs = require.resolve('ws', {paths: [path.dirname(require.resolve('socketcluster-client'))]});
  if (clientWs !== require.resolve('ws')) {
    throw new Error(`socketcluster-client loads ${clientWs} but the harness loads ${require.resolve('ws')}: pin ws in package.json to the client's version`);
  }
}

const TARGET = (process.env.SHOAL_COMPAT_TARGET || 'shoal').toLowerCase();
const IS_REFERENCE = TARGET === 'reference';
const AUTH_KEY_ENV = 'SHOAL_COMPAT_AUTH_KEY';
const AUTH_KEY = process.env[AUTH_KEY_ENV] || crypto.randomBytes(32).toString('hex');
const API_KEY_ENV = 'SHOAL_COMPAT_API_KEY';
const API_KEY = crypto.randomBytes(24).toString('hex');
// cluster.balancers for every target of the run (default 1, a balancer
// process); `npm test` runs the TLS and real-address files a second time with
// SHOAL_COMPAT_BALANCERS=0 (kernel balancing: the workers share the ports).
const BALANCERS = process.env.SHOAL_COMPAT_BALANCERS === undefined ? 1 : Number(process.env.SHOAL_COMPAT_BALANCERS);
const MODE = BALANCERS === 0 ? 'kernel balancing (balancers: 0)' : `balancers: ${BALANCERS}`;
const CLUSTER_ONLY = IS_REFERENCE ? 'cluster-only: needs the shoal process table / several workers (reference target is one process)' : false;
// Whole-file watchdog: a test file never outlives this, whatever hangs.
const FILE_DEADLINE_MS = Number(process.env.SHOAL_COMPAT_FILE_DEADLINE_MS || 200000);

// ---------------------------------------------------------------- utilities

// Strictly increasing time stamps (ms, fractional when several fall in one
// ms): frames, client events and test marks share this clock, so "since a
// mark" never includes what happened before it.
let lastStamp = 0;
function stamp() {
  let n = Date.now();
  if (n <= lastStamp) n = lastStamp + 0.001;
  lastStamp = n;
  return n;
}

function fatal(msg) { const e = new Error(msg); e.fatal = true; return e; }
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// Poll fn until it returns a truthy value (returned) or the deadline passes.
// An error with .fatal set ends the wait at once (other errors are retried).
async function waitFor(fn, {timeout = 5000, interval = 25, what = 'condition'} = {}) {
  const deadline = Date.now() + timeout;
  let last;
  let lastErr;
  for (;;) {
    try {
      last = await fn();
      if (last) return last;
    } catch (e) {
      if (e && e.fatal) throw e; // no point waiting any longer
      lastErr = e;
    }
    if (Date.now() >= deadline) break;
    await sleep(interval);
  }
  const extra = lastErr ? ` (last error: ${lastErr.message})` : (last !== undefined ? ` (last value: ${short(last)})` : '');
  throw new Error(`timed out after ${timeout} ms waiting for ${what}${extra}`);
}

function short(v, n = 300) {
  let s;
  if (typeof v === 'string') s = v;
  else if (Buffer.isBuffer(v)) s = v.toString('utf8');
  else {
    try { s = JSON.stringify(v); } catch (_) { s = String(v); }
  }
  if (s === undefined) s = String(v);
  return s.length > n ? `${s.slice(0, n)}…(${s.length} chars)` : s;
}

async function freePort(host = '127.0.0.1', {udpToo = false} = {}) {
  for (let i = 0; i < 20; i++) {
    const port = await new Promise((resolve, reject) => {
      const srv = net.createServer();
      srv.unref();
      srv.on('error', reject);
      srv.listen(0, host, () => {
        const p = srv.address().port;
        srv.close(() => resolve(p));
      });
    });
    if (!udpToo) return port;
    const ok = await new Promise((resolve) => {
      const s = dgram.createSocket('udp4');
      s.on('error', () => { s.close(); resolve(false); });
      s.bind(port, host, () => s.close(() => resolve(true)));
    });
    if (ok) return port;
  }
  throw new Error('no free port found');
}

async function portFree(port, host) {
  const tcp = await new Promise((resolve) => {
    const srv = net.createServer();
    srv.unref();
    srv.once('error', () => resolve(false));
    srv.listen(port, host, () => srv.close(() => resolve(true)));
  });
  if (!tcp) return false;
  return new Promise((resolve) => {
    const u = dgram.createSocket('udp4');
    u.once('error', () => { u.close(); resolve(false); });
    u.bind(port, host, () => u.close(() => resolve(true)));
  });
}

// n consecutive ports free for TCP and UDP (memberlist): brokers bind
// cluster.gossip's port + index - 1. Drawn below the kernel's ephemeral range
// so an outgoing connection cannot take one before the cluster binds it.
async function freePortRange(n, host = '127.0.0.1') {
  for (let attempt = 0; attempt < 50; attempt++) {
    const base = 20000 + Math.floor(Math.random() * (32000 - 20000 - n));
    let ok = true;
    for (let i = 0; i < n && ok; i++) ok = await portFree(base + i, host);
    if (ok) return base;
  }
  throw new Error(`no ${n} consecutive free ports found`);
}

// --------------------------------------------------------------- frame tap
// Every ws.WebSocket in this process (the official client's transports and
// our raw sockets) records what it sends and receives, so a failing test can
// show the frames involved. Observation only: the client is not modified.

const WS_ID = Symbol('shoalCompatWsId');
let wsSeq = 0;
const frames = [];
const MAX_FRAMES = 5000;

function wsId(ws) {
  if (!ws[WS_ID]) ws[WS_ID] = ++wsSeq;
  return ws[WS_ID];
}

function record(ws, dir, data, binary) {
  let text;
  if (typeof data === 'string') text = data;
  else if (Buffer.isBuffer(data)) text = data.toString('utf8');
  else if (data instanceof ArrayBuffer) text = Buffer.from(data).toString('utf8');
  else if (Array.isArray(data)) text = Buffer.concat(data).toString('utf8');
  else text = String(data);
  frames.push({t: stamp(), ws: wsId(ws), dir, binary: !!binary, len: text.length, text});
  if (frames.length > MAX_FRAMES) frames.splice(0, frames.length - MAX_FRAMES);
}

const origSend = WebSocket.prototype.send;
WebSocket.prototype.send = function (data, opts, cb) {
  const binary = typeof opts === 'object' && opts && opts.binary !== undefined ? opts.binary : typeof data !== 'string';
  record(this, '>', data, binary);
  return origSend.call(this, data, opts, cb);
};
const origEmit = WebSocket.prototype.emit;
WebSocket.prototype.emit = function (ev, ...args) {
  if (ev === 'message') record(this, '<', args[0], args[1]);
  else if (ev === 'close') record(this, 'close', `code=${args[0]} reason=${short(args[1] ? args[1].toString() : '')}`);
  else if (ev === 'open') record(this, 'open', this.url || '');
  else if (ev === 'unexpected-response') record(this, 'http', `status=${args[1] && args[1].statusCode}`);
  return origEmit.call(this, ev, ...args);
};

const tap = {
  mark: stamp,
  // Frames of one ws (or all) since a time, optionally filtered.
  of(ws, {since = 0, dir} = {}) {
    const id = ws ? wsId(ws) : null;
    return frames.filter((f) => (id === null || f.ws === id) && f.t >= since && (!dir || f.dir === dir));
  },
  since(t) { return frames.filter((f) => f.t >= t); },
  dump(list, n = 80) {
    const sel = list.slice(-n);
    return sel.map((f) => `${new Date(f.t).toISOString().slice(11, 23)} ws#${f.ws} ${f.dir}${f.binary ? '(bin)' : ''} ${short(f.text, 240)}`).join('\n');
  }
};

// ------------------------------------------------------------------ tokens

const b64url = (buf) => Buffer.from(buf).toString('base64url');

// Sign a JWT with node's crypto. alg: HS256/HS384/HS512 or 'none'.
function signToken(payload, {key = AUTH_KEY, alg = 'HS256'} = {}) {
  const header = {alg, typ: 'JWT'};
  const body = {iat: Math.floor(Date.now() / 1000), ...payload};
  const input = `${b64url(JSON.stringify(header))}.${b64url(JSON.stringify(body))}`;
  if (alg === 'none') return `${input}.`;
  const hash = {HS256: 'sha256', HS384: 'sha384', HS512: 'sha512'}[alg];
  if (!hash) throw new Error(`unsupported alg ${alg}`);
  return `${input}.${b64url(crypto.createHmac(hash, key).update(input).digest())}`;
}
const nowSec = () => Math.floor(Date.now() / 1000);

// ----------------------------------------------------------------- targets

const liveTargets = new Set();

function killGroup(pid, sig) {
  try { process.kill(-pid, sig); return true; } catch (_) {}
  try { process.kill(pid, sig); return true; } catch (_) {}
  return false;
}

function alive(pid) {
  try { process.kill(pid, 0); return true; } catch (e) { return e.code === 'EPERM'; }
}

process.on('exit', () => {
  for (const t of liveTargets) t.killNow();
});
// The target runs in its own process group (so it can be killed as a tree),
// which also means a Ctrl-C or a kill of the test run does not reach it: pass it on.
for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP']) {
  process.once(sig, () => {
    for (const t of liveTargets) t.killNow();
    process.exit(130);
  });
}

let watchdog = null;
function armWatchdog() {
  if (watchdog) return;
  watchdog = setTimeout(() => {
    console.error(`[compat] file deadline of ${FILE_DEADLINE_MS} ms passed: killing targets and exiting`);
    for (const t of liveTargets) {
      t.printLogs('watchdog');
      t.killNow();
    }
    process.exit(1);
  }, FILE_DEADLINE_MS);
  watchdog.unref();
}

function yamlConfig(o) {
  return `# written by test/compat/lib/harness.js
cluster:
  workers: ${o.workers}
  brokers: ${o.brokers}
  balancers: ${o.balancers}
  gossip: "127.0.0.1:${o.gossipPort}"
  restart: {backoff_min: 100ms, backoff_max: 1s, crash_loop: {crashes: 20, window: 60s}}
listen:
  public: "127.0.0.1:${o.port}"
  admin: "127.0.0.1:${o.adminPort}"
  path: ${o.path}${o.tlsPort ? `
  tls: {listen: "127.0.0.1:${o.tlsPort}", auto: true}` : ''}
protocol:
  version: ${o.protocolVersion}
  ping_interval: ${o.pingInterval}ms
  ping_timeout: ${o.pingTimeout}ms
  handshake_timeout: ${o.handshakeTimeout}ms
  max_payload: ${o.maxPayload}
  allow_client_publish: ${o.allowClientPublish ? 'true' : 'false'}
  socket_channel_limit: ${o.socketChannelLimit}
  origins: ${JSON.stringify(o.origins)}
auth:
  jwt:
    algorithms: [HS256]
    key_env: ${AUTH_KEY_ENV}
    leeway: 1s
api:
  key_env: ${API_KEY_ENV}
storage:
  dir: "${o.dataDir}"
log:
  level: ${o.logLevel}
${o.extraYaml || ''}`;
}

// Normalise the admin API's process table: accepts a bare array or an object
// holding one (processes / peers / children …); keys are matched
// case-insensitively. Each row: {name, role, pid, state, restarts, connections}.
function normaliseProcesses(j) {
  let arr = null;
  if (Array.isArray(j)) arr = j;
  else if (j && typeof j === 'object') {
    for (const k of ['processes', 'Processes', 'peers', 'Peers', 'children', 'Children', 'table']) {
      if (Array.isArray(j[k])) { arr = j[k]; break; }
    }
    if (!arr) arr = Object.values(j).find((v) => Array.isArray(v) && v.length && typeof v[0] === 'object');
  }
  if (!arr) return null;
  return arr.map((row) => {
    const lc = {};
    for (const [k, v] of Object.entries(row || {})) lc[k.toLowerCase()] = v;
    const stats = lc.stats && typeof lc.stats === 'object' ? Object.fromEntries(Object.entries(lc.stats).map(([k, v]) => [k.toLowerCase(), v])) : {};
    return {
      name: String(lc.name ?? ''),
      role: String(lc.role ?? '').toLowerCase(),
      pid: Number(lc.pid ?? 0),
      state: String(lc.state ?? lc.status ?? '').toLowerCase(),
      restarts: Number(lc.restarts ?? lc.restart_count ?? lc.restartcount ?? 0),
      connections: Number(lc.connections ?? lc.conns ?? stats.connections ?? 0),
      raw: row
    };
  });
}

class Target {
  constructor(opts) {
    this.opts = opts;
    this.kind = IS_REFERENCE ? 'reference' : 'shoal';
    this.host = '127.0.0.1';
    this.path = opts.path;
    this.protocolVersion = opts.protocolVersion;
    this.child = null;
    this.exited = null;
    this.knownPids = new Set();
  }

  get url() { return `ws://${this.host}:${this.port}${this.path}`; }
  get httpBase() { return `http://${this.host}:${this.port}`; }
  get adminBase() { return `http://${this.host}:${this.adminPort}`; }

  async start() {
    armWatchdog();
    const o = this.opts;
    this.dir = fs.mkdtempSync(path.join(os.tmpdir(), `shoal-compat-${o.name}-`));
    this.dataDir = path.join(this.dir, 'data');
    this.port = await freePort();
    this.adminPort = await freePort();
    this.gossipPort = await freePortRange(o.brokers);
    if (o.tls) this.tlsPort = await freePort();
    this.outFile = path.join(this.dir, 'stdout-stderr.log');
    const out = fs.openSync(this.outFile, 'a');
    const env = {...process.env, [AUTH_KEY_ENV]: AUTH_KEY, [API_KEY_ENV]: API_KEY};
    let cmd;
    let args;
    if (IS_REFERENCE) {
      cmd = process.execPath;
      args = [path.join(__dirname, 'reference-server.js')];
      env.REF_CONFIG = JSON.stringify({
        port: this.port,
        host: this.host,
        path: o.path,
        keyEnv: AUTH_KEY_ENV,
        algorithms: ['HS256'],
        allowClientPublish: o.allowClientPublish,
        maxPayload: o.maxPayload,
        pingInterval: o.pingInterval,
        pingTimeout: o.pingTimeout,
        handshakeTimeout: o.handshakeTimeout,
        protocolVersion: o.protocolVersion,
        socketChannelLimit: o.socketChannelLimit,
        origins: o.origins.includes('*') ? '*:*' : o.origins
      });
    } else {
      const bin = process.env.SHOAL_BIN;
      if (!bin) throw new Error('SHOAL_BIN is not set: run through `make compat`, or set it to the absolute path of bin/shoal (or SHOAL_COMPAT_TARGET=reference)');
      if (!fs.existsSync(bin)) throw new Error(`SHOAL_BIN=${bin} does not exist (run make build)`);
      this.configFile = path.join(this.dir, 'shoal.yaml');
      fs.writeFileSync(this.configFile, yamlConfig({...o, port: this.port, adminPort: this.adminPort, gossipPort: this.gossipPort, tlsPort: this.tlsPort, dataDir: this.dataDir}));
      cmd = bin;
      args = ['run', '-c', this.configFile];
    }
    this.startedAt = Date.now();
    this.child = spawn(cmd, args, {cwd: this.dir, env, stdio: ['ignore', out, out], detached: true});
    fs.closeSync(out);
    liveTargets.add(this);
    this.child.on('exit', (code, sig) => { this.exited = {code, sig, t: Date.now()}; });
    this.child.on('error', (err) => { this.exited = {error: err.message, t: Date.now()}; });

    try {
      await waitFor(async () => {
        if (this.exited) throw fatal(`target exited early: ${JSON.stringify(this.exited)}`);
        const r = await fetch(`${this.httpBase}/healthz`, {signal: AbortSignal.timeout(1000)});
        await r.arrayBuffer();
        return r.status === 200;
      }, {timeout: o.startTimeout, interval: 100, what: `GET ${this.httpBase}/healthz → 200`});
      if (!IS_REFERENCE) {
        await waitFor(async () => {
          if (this.exited) throw fatal(`target exited early: ${JSON.stringify(this.exited)}`);
          const procs = await this.processes();
          return this.allReady(procs);
        }, {timeout: o.startTimeout, interval: 100, what: `GET ${this.adminBase}/api/cluster → ${o.workers} workers + ${o.brokers} brokers${o.balancers === 0 ? '' : ' + balancer'} ready`});
      }
    } catch (e) {
      this.printLogs('start failed');
      await this.stop();
      throw e;
    }
    this.readyAfterMs = Date.now() - this.startedAt;
    return this;
  }

  allReady(procs) {
    if (!procs) return false;
    const ready = (role) => procs.filter((p) => p.role === role && p.state === 'ready').length;
    return ready('worker') >= this.opts.workers && ready('broker') >= this.opts.brokers && ready('balancer') >= (this.opts.balancers === 0 ? 0 : 1) &&
      procs.every((p) => p.state === 'ready') && procs;
  }

  // POST /api/v1/<method> on the public port (shoal's server API).
  async api(method, body) {
    const r = await fetch(`${this.httpBase}/api/v1/${method}`, {method: 'POST', signal: AbortSignal.timeout(5000),
      headers: {'content-type': 'application/json', 'x-api-key': API_KEY}, body: JSON.stringify(body)});
    const text = await r.text();
    let json;
    try { json = JSON.parse(text); } catch (_) { json = text; }
    return {status: r.status, body: json};
  }

  // The cluster's process table (shoal only), normalised; pids are remembered
  // so stop() can make sure none outlives the suite.
  async processes() {
    const r = await fetch(`${this.adminBase}/api/cluster`, {signal: AbortSignal.timeout(2000)});
    const body = await r.text();
    if (r.status !== 200) throw new Error(`/api/cluster → HTTP ${r.status}: ${short(body)}`);
    const procs = normaliseProcesses(JSON.parse(body));
    if (!procs) throw new Error(`/api/cluster: no process table found in ${short(body)}`);
    for (const p of procs) if (p.pid) this.knownPids.add(p.pid);
    return procs;
  }

  async waitAllReady(timeout = 15000) {
    return waitFor(async () => this.allReady(await this.processes()), {timeout, interval: 100, what: 'every process ready again'});
  }

  logTail(n = 80) {
    const parts = [];
    for (const f of [this.outFile, path.join(this.dataDir || '', 'log', 'shoal.log')]) {
      try {
        const lines = fs.readFileSync(f, 'utf8').split('\n');
        parts.push(`--- ${f} (last ${n} lines) ---\n${lines.slice(-n - 1).join('\n')}`);
      } catch (_) {}
    }
    return parts.join('\n');
  }

  printLogs(why) {
    console.error(`\n[compat] ${this.kind} target "${this.opts.name}" logs (${why}):\n${this.logTail()}\n`);
  }

  killNow() {
    if (this.child && !this.exited) killGroup(this.child.pid, 'SIGKILL');
    for (const pid of this.knownPids) if (alive(pid)) { try { process.kill(pid, 'SIGKILL'); } catch (_) {} }
  }

  // SIGTERM the process group, SIGKILL after a grace period; then make sure
  // no process the admin API ever named is still alive.
  async stop({grace = 5000} = {}) {
    if (!this.child) return [];
    if (!this.exited) killGroup(this.child.pid, 'SIGTERM');
    try {
      await waitFor(() => this.exited, {timeout: grace, interval: 50, what: 'target exit after SIGTERM'});
    } catch (_) {
      killGroup(this.child.pid, 'SIGKILL');
      await waitFor(() => this.exited, {timeout: 3000, interval: 50, what: 'target exit after SIGKILL'}).catch(() => {});
    }
    let left = [];
    try {
      left = await waitFor(() => {
        const l = [...this.knownPids].filter(alive);
        return l.length === 0 ? [] : false;
      }, {timeout: 3000, interval: 50, what: 'children to exit'});
    } catch (_) {
      left = [...this.knownPids].filter(alive);
      for (const pid of left) { try { process.kill(pid, 'SIGKILL'); } catch (_) {} }
    }
    killGroup(this.child.pid, 'SIGKILL');
    liveTargets.delete(this);
    // The temp dir (config, data, logs) is kept when something failed, for a post-mortem.
    if (state.failures === 0 && !process.env.SHOAL_COMPAT_KEEP) {
      try { fs.rmSync(this.dir, {recursive: true, force: true}); } catch (_) {}
    } else {
      console.error(`# ${this.kind} target "${this.opts.name}" files kept in ${this.dir}`);
    }
    return left; // pids that had to be killed by hand (orphans)
  }
}

const DEFAULTS = {
  name: 'main',
  workers: 2,
  brokers: 2,
  path: '/socketcluster/',
  protocolVersion: 2,
  pingInterval: 1000,
  pingTimeout: 3000,
  handshakeTimeout: 2000,
  maxPayload: 1024 * 1024,
  allowClientPublish: true,
  socketChannelLimit: 1000,
  tls: false,
  origins: ['*'],
  logLevel: 'info',
  startTimeout: 20000,
  balancers: BALANCERS,
  extraYaml: '' // appended to the generated config (top-level keys, e.g. middleware)
};

async function startTarget(opts = {}) {
  const t = new Target({...DEFAULTS, ...opts});
  return t.start();
}

// ----------------------------------------------------------------- clients

const EVENTS = ['connecting', 'connect', 'connectAbort', 'disconnect', 'close', 'error', 'raw',
  'authenticate', 'deauthenticate', 'authStateChange', 'removeAuthToken', 'subscribe',
  'subscribeRequest', 'subscribeStateChange', 'subscribeFail', 'unsubscribe', 'kickOut'];

const openClients = new Set();

class Client {
  constructor(target, options = {}) {
    this.target = target;
    this.events = [];
    this.channels = new Map();
    this.socket = scClient.create({
      hostname: target.host,
      port: target.port,
      path: target.path,
      secure: false,
      protocolVersion: target.protocolVersion,
      autoReconnectOptions: {initialDelay: 200, randomness: 200, multiplier: 1.2, maxDelay: 2000},
      ...options
    });
    for (const name of EVENTS) {
      (async () => {
        for await (const data of this.socket.listener(name)) {
          this.events.push({name, data, t: stamp()});
        }
      })();
    }
    openClients.add(this);
  }

  get ws() { return this.socket.transport && this.socket.transport.socket; }

  eventsOf(name, since = 0) { return this.events.filter((e) => e.name === name && e.t >= since); }

  async waitEvent(name, {since = 0, timeout = 5000, pred = () => true} = {}) {
    const e = await waitFor(() => this.events.find((ev) => ev.name === name && ev.t >= since && pred(ev.data)),
      {timeout, what: `client event "${name}"${since ? ' since mark' : ''} (events so far: ${this.eventSummary()})`});
    return e.data;
  }

  eventSummary() {
    return this.events.map((e) => {
      const d = e.data || {};
      if (e.name === 'error') return `error(${d.error && d.error.name}: ${d.error && d.error.message})`;
      if (e.name === 'disconnect' || e.name === 'close' || e.name === 'connectAbort') return `${e.name}(${d.code})`;
      if (e.name === 'subscribe' || e.name === 'subscribeFail' || e.name === 'unsubscribe') return `${e.name}(${d.channel}${d.error ? ' ' + d.error.name : ''})`;
      return e.name;
    }).join(', ') || 'none';
  }

  async connected(timeout = 8000) {
    await waitFor(() => this.socket.state === 'open', {timeout, what: `client open (state=${this.socket.state}; events: ${this.eventSummary()})`});
    return this;
  }

  // Subscribe and collect every message; resolves once the server acked the subscription.
  async subscribe(name, options, {wait = true, timeout = 5000} = {}) {
    const channel = this.socket.subscribe(name, options);
    const entry = {channel, messages: []};
    this.channels.set(name, entry);
    (async () => {
      for await (const data of channel) entry.messages.push(data);
    })();
    if (wait) {
      await waitFor(() => {
        const fail = this.events.find((e) => e.name === 'subscribeFail' && e.data.channel === name);
        if (fail) throw new Error(`subscribeFail ${name}: ${fail.data.error && fail.data.error.name}: ${fail.data.error && fail.data.error.message}`);
        return channel.state === 'subscribed';
      }, {timeout, what: `subscription to ${name} (state=${channel.state})`});
    }
    return entry;
  }

  close() {
    try { this.socket.disconnect(); } catch (_) {}
    try { this.socket.killAllListeners(); } catch (_) {}
    try { this.socket.closeAllChannels(); } catch (_) {}
    openClients.delete(this);
  }
}

async function connect(target, options = {}, {wait = true} = {}) {
  const c = new Client(target, options);
  if (wait && options.autoConnect !== false) await c.connected();
  return c;
}

// A raw WebSocket (the ws package) with a message log and helpers.
class RawSocket {
  constructor(target, {path: p = target.path, headers} = {}) {
    this.target = target;
    this.messages = [];
    this.closeInfo = null;
    this.ws = new WebSocket(`ws://${target.host}:${target.port}${p}`, [], {headers, maxPayload: 64 * 1024 * 1024});
    this.ws.on('message', (data, isBinary) => this.messages.push({t: stamp(), text: isBinary ? null : data.toString('utf8'), binary: isBinary, data}));
    this.ws.on('close', (code, reason) => { this.closeInfo = {code, reason: reason.toString(), t: stamp()}; });
    this.ws.on('error', (err) => { this.error = err; });
    this.ws.on('unexpected-response', (req, res) => { this.httpStatus = res.statusCode; res.resume(); this.closeInfo = {code: null, http: res.statusCode, t: Date.now()}; });
    openClients.add(this);
    this.pongs = 0;
  }

  async open(timeout = 5000) {
    await waitFor(() => {
      if (this.closeInfo) throw new Error(`closed before open: ${JSON.stringify(this.closeInfo)}`);
      return this.ws.readyState === WebSocket.OPEN;
    }, {timeout, what: 'raw websocket open'});
    return this;
  }

  // Answer the server's pings like the official client does.
  autoPong() {
    const ping = this.target.protocolVersion === 1 ? '#1' : '';
    const pong = this.target.protocolVersion === 1 ? '#2' : '';
    this.ws.on('message', (data, isBinary) => {
      if (!isBinary && data.toString('utf8') === ping && this.ws.readyState === WebSocket.OPEN) {
        this.ws.send(pong);
        this.pongs++;
      }
    });
    return this;
  }

  send(data, opts) { this.ws.send(data, opts); }
  sendJSON(obj) { this.ws.send(JSON.stringify(obj)); }

  // Parsed JSON packets received (pings and non-JSON skipped); batches flattened.
  packets() {
    const out = [];
    for (const m of this.messages) {
      if (m.text === null || m.text === '' || m.text === '#1') continue;
      let v;
      try { v = JSON.parse(m.text); } catch (_) { continue; }
      if (Array.isArray(v)) out.push(...v);
      else out.push(v);
    }
    return out;
  }

  async response(rid, timeout = 5000) {
    return waitFor(() => {
      const r = this.packets().find((p) => p && p.rid === rid);
      if (r) return r;
      if (this.closeInfo) throw new Error(`socket closed (${JSON.stringify(this.closeInfo)}) before response rid=${rid}`);
      return false;
    }, {timeout, what: `response rid=${rid}`});
  }

  async handshake(authToken = null, cid = 1) {
    this.sendJSON({event: '#handshake', data: {authToken}, cid});
    const r = await this.response(cid);
    assert.ok(r.data && typeof r.data.id === 'string', `handshake response has an id: ${short(r)}`);
    return r;
  }

  async closed(timeout = 5000) {
    return waitFor(() => this.closeInfo, {timeout, what: `raw socket close (messages: ${short(this.messages.map((m) => m.text), 400)})`});
  }

  close() {
    try { this.ws.terminate(); } catch (_) {}
    openClients.delete(this);
  }
}

async function rawSocket(target, opts) {
  const r = new RawSocket(target, opts);
  await r.open();
  return r;
}

function closeAll() {
  for (const c of [...openClients]) c.close();
}

// -------------------------------------------------------- test case wrapper
// Wraps a test body: on failure the error message gets the frames this test
// saw on the wire and (once per file) the target's log tail; every client
// and raw socket the test opened is closed afterwards.
const state = {failures: 0};

function wrap(target, fn) {
  return async (t) => {
    const since = stamp();
    try {
      await fn(t);
    } catch (e) {
      state.failures++;
      const tgt = typeof target === 'function' ? target() : target;
      let extra = `\n--- frames seen by this test (client side; > sent, < received) ---\n${tap.dump(tap.since(since), 60)}`;
      if (tgt && state.failures <= 3) extra += `\n${tgt.logTail(40)}`;
      if (e && typeof e === 'object') {
        // The reporter prints the stack (built when the error was made), so
        // put the diagnostics into both.
        const orig = String(e.message);
        try { e.message = `${orig}${extra}`; } catch (_) {}
        try {
          const st = String(e.stack || '');
          e.stack = st.includes(orig) ? st.replace(orig, `${orig}${extra}`) : `${st}${extra}`;
        } catch (_) {}
      }
      throw e;
    } finally {
      closeAll();
    }
  };
}

module.exports = {
  TARGET, IS_REFERENCE, CLUSTER_ONLY, BALANCERS, MODE, AUTH_KEY, AUTH_KEY_ENV, API_KEY,
  sleep, waitFor, short, freePort, stamp,
  tap, signToken, nowSec,
  startTarget, normaliseProcesses,
  connect, Client, rawSocket, RawSocket, closeAll,
  wrap, state, WebSocket
};
