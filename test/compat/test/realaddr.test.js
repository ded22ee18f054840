'use strict';
// What must hold in both balancing modes (`npm test` runs this file with a
// balancer process, then again with SHOAL_COMPAT_BALANCERS=0, where the
// workers share the public ports with SO_REUSEPORT and terminate TLS
// themselves):
// - the worker's middleware sees the client's real address, over ws:// and
//   wss://: a handshake cidr rule denying 127.0.0.3 refuses a client bound to
//   that source (HTTP 403) and admits one bound to 127.0.0.2;
// - a protocol smoke over both schemes with the official client: handshake,
//   authenticate, pub/sub across ws and wss, invoke error, clients on both
//   workers;
// - `shoal reload`: ws:// and wss:// clients handed over with 4000 (the
//   draining worker closes its listener first in kernel mode);
// - SIGKILL of a worker mid-stream: new connections succeed right after, and
//   its clients reconnect, resubscribe and receive again.
const {describe, it, before, after} = require('node:test');
const assert = require('node:assert/strict');
const {execFile} = require('node:child_process');
const fs = require('node:fs');
const path = require('node:path');
const h = require('../lib/harness');
const {connect, waitFor, short, signToken, IS_REFERENCE, WebSocket} = h;

let target;
let ca;
const tc = (fn) => h.wrap(() => target, fn);
const SKIP = IS_REFERENCE ? 'cluster-only: middleware config, TLS and worker processes are shoal\'s' : false;
let uniq = 0;
const chan = (p) => `${p}-${process.pid}-${++uniq}`;

const MIDDLEWARE = `middleware:
  handshake:
    - cidr: {deny: ["127.0.0.3/32"]}
`;

describe(`real client address, protocol smoke and worker SIGKILL (${h.MODE}) against ${h.TARGET}`, {timeout: 120000, skip: SKIP}, () => {
  before(async () => {
    target = await h.startTarget({name: 'realaddr', tls: true, extraYaml: MIDDLEWARE});
    const certFile = path.join(target.dataDir, 'tls', 'dev-cert.pem');
    ca = await waitFor(() => { try { return fs.readFileSync(certFile); } catch (_) { return false; } },
      {timeout: 10000, what: `the development certificate at ${certFile}`});
    console.log(`# ${target.kind} target (${h.MODE}) ready in ${target.readyAfterMs} ms, ws ${target.port}, wss ${target.tlsPort}`);
  });
  after(async () => {
    h.closeAll();
    if (!target) return;
    if (h.state.failures > 0) target.printLogs(`${h.state.failures} test(s) failed`);
    await target.stop();
  });

  // The official client from a given source address; the certificate's IP
  // SAN covers 127.0.0.1, so wss:// needs no host name.
  const client = (scheme, from, extra = {}, opts = {}) => connect(target, {
    hostname: '127.0.0.1',
    port: scheme === 'wss' ? target.tlsPort : target.port,
    secure: scheme === 'wss',
    wsOptions: scheme === 'wss' ? {ca, localAddress: from} : {localAddress: from},
    ...extra
  }, opts);

  // A raw WebSocket upgrade from a source address: resolves to
  // {status} when refused over HTTP, {open: true} when upgraded.
  const upgrade = (scheme, from) => new Promise((resolve) => {
    const port = scheme === 'wss' ? target.tlsPort : target.port;
    const ws = new WebSocket(`${scheme}://127.0.0.1:${port}${target.path}`, [], {localAddress: from, ca, handshakeTimeout: 5000});
    ws.on('unexpected-response', (req, res) => { res.resume(); resolve({status: res.statusCode}); ws.terminate(); });
    ws.on('open', () => { resolve({open: true}); ws.terminate(); });
    ws.on('error', (err) => resolve({error: err.message}));
  });

  it('the process table shows the mode: a balancer, or workers holding the public ports', tc(async () => {
    const procs = await target.processes();
    const workers = procs.filter((p) => p.role === 'worker');
    const balancers = procs.filter((p) => p.role === 'balancer');
    assert.equal(workers.length, 2);
    if (h.BALANCERS === 0) {
      assert.equal(balancers.length, 0, short(procs.map((p) => p.raw)));
      for (const w of workers) {
        const addrs = w.raw.addrs || {};
        assert.equal(addrs.public, `127.0.0.1:${target.port}`, short(w.raw));
        assert.equal(addrs.tls, `127.0.0.1:${target.tlsPort}`, short(w.raw));
      }
    } else {
      assert.ok(balancers.length >= 1);
    }
  }));

  for (const scheme of ['ws', 'wss']) {
    it(`${scheme}://: the cidr rule refuses 127.0.0.3 (403) and admits 127.0.0.2`, tc(async () => {
      assert.deepEqual(await upgrade(scheme, '127.0.0.3'), {status: 403});
      assert.deepEqual(await upgrade(scheme, '127.0.0.2'), {open: true});
      const ok = await client(scheme, '127.0.0.2');
      assert.equal(ok.socket.state, 'open');
      const denied = await client(scheme, '127.0.0.3', {autoReconnect: false}, {wait: false});
      await denied.waitEvent('connectAbort', {timeout: 8000});
      assert.notEqual(denied.socket.state, 'open');
    }));
  }

  it('protocol smoke over ws:// and wss://: handshake, authenticate, pub/sub across schemes, invoke error', tc(async () => {
    const a = await client('ws', '127.0.0.2');
    const b = await client('wss', '127.0.0.2');
    for (const c of [a, b]) {
      const status = await c.waitEvent('connect');
      assert.equal(status.pingTimeout, 3000);
      assert.equal(c.socket.authState, 'unauthenticated');
    }
    await b.socket.authenticate(signToken({sub: 'alice'}));
    assert.equal(b.socket.authState, 'authenticated');
    const name = chan('smoke');
    const ea = await a.subscribe(name);
    const eb = await b.subscribe(name);
    await a.socket.invokePublish(name, 'from ws');
    await b.socket.invokePublish(name, 'from wss');
    await waitFor(() => ea.messages.length === 2 && eb.messages.length === 2, {what: `both messages on both schemes (ws ${ea.messages.length}, wss ${eb.messages.length})`});
    // Two publishers on two workers: with publish_ack local an ack means the
    // worker took the publish, not that the broker ordered it, so the two may
    // be ordered either way (as with socketcluster-server's workers); every
    // subscriber sees the broker's one order.
    assert.deepEqual([...ea.messages].sort(), ['from ws', 'from wss']);
    assert.deepEqual(eb.messages, ea.messages);
    const err = await b.socket.invoke('noSuchProcedure', {}, {ackTimeout: 5000}).then(() => null, (e) => e);
    assert.ok(err, 'invoke of an unknown procedure fails');
  }));

  it('clients land on both workers', tc(async () => {
    // Balancer: least connections. Kernel: hashing the client's random
    // port, so 16 clients all on one of 2 workers has a chance of 2^-15.
    const cs = [];
    for (let i = 0; i < 16; i++) cs.push(await client(i % 2 ? 'wss' : 'ws', '127.0.0.2'));
    await waitFor(async () => {
      const ws = (await target.processes()).filter((p) => p.role === 'worker');
      return ws.length === 2 && ws.every((w) => w.connections >= 1) && ws;
    }, {timeout: 8000, interval: 200, what: 'admin API: both workers hold connections'});
  }));

  it('shoal reload: ws:// and wss:// clients are handed over with 4000, reconnect and receive', tc(async () => {
    const name = chan('reload');
    const subs = [];
    for (let i = 0; i < 6; i++) {
      const c = await client(i % 2 ? 'wss' : 'ws', '127.0.0.2');
      subs.push({c, e: await c.subscribe(name)});
    }
    const t0 = h.stamp();
    const out = await new Promise((resolve, reject) => {
      execFile(process.env.SHOAL_BIN, ['reload', '--admin', `127.0.0.1:${target.adminPort}`, '--timeout', '60s'],
        {timeout: 70000}, (err, stdout, stderr) => {
          if (err) reject(new Error(`shoal reload failed: ${err.message}\nstdout: ${stdout}\nstderr: ${stderr}`));
          else resolve(stdout.trim());
        });
    });
    assert.equal(out, 'restarted worker-1, worker-2');
    for (const s of subs) {
      const closes = s.c.eventsOf('close', t0).map((e) => e.data.code);
      assert.ok(closes.length >= 1 && closes.every((code) => code === 4000), `${s.c.ws ? s.c.ws.url : ''} closes ${short(closes)}`);
    }
    await waitFor(() => subs.every((s) => s.c.socket.state === 'open' && s.c.channels.get(name).channel.state === 'subscribed'),
      {timeout: 10000, what: 'every client open and subscribed again'});
    const pub = await client('ws', '127.0.0.2');
    await waitFor(async () => {
      await pub.socket.invokePublish(name, 'after reload');
      return subs.every((s) => s.e.messages.includes('after reload'));
    }, {timeout: 10000, interval: 300, what: 'every client receives after the reload'});
  }));

  it('SIGKILL of a worker mid-stream: new connections succeed right after, its clients reconnect and receive', tc(async () => {
    const name = chan('sigkill');
    const subs = [];
    for (let i = 0; i < 8; i++) {
      const c = await client(i % 2 ? 'wss' : 'ws', '127.0.0.2', {autoReconnectOptions: {initialDelay: 100, randomness: 100, multiplier: 1, maxDelay: 500}});
      subs.push({c, e: await c.subscribe(name)});
    }
    const pub = await client('ws', '127.0.0.2');
    await pub.socket.invokePublish(name, 'before');
    await waitFor(() => subs.every((s) => s.e.messages.includes('before')), {what: 'every subscriber got "before"'});

    const victim = (await target.processes()).find((p) => p.name === 'worker-1');
    assert.ok(victim && victim.pid, short(victim));
    const t0 = h.stamp();
    process.kill(victim.pid, 'SIGKILL');
    // Reaped (its sockets closed): from then on, no connection may fail.
    await waitFor(() => !fs.existsSync(`/proc/${victim.pid}`), {timeout: 5000, interval: 10, what: `worker-1 (pid ${victim.pid}) reaped`});
    const fresh = [];
    for (let i = 0; i < 6; i++) fresh.push(await client(i % 2 ? 'wss' : 'ws', '127.0.0.2', {autoReconnect: false}));
    for (const f of fresh) assert.equal(f.socket.state, 'open');

    // The killed worker's clients reconnect (to the survivor, or to the
    // restarted worker-1) and resubscribe.
    const dropped = subs.filter((s) => s.c.eventsOf('disconnect', t0).length > 0);
    assert.ok(dropped.length > 0, 'some subscribers were on worker-1');
    await waitFor(() => subs.every((s) => s.c.socket.state === 'open' && s.c.channels.get(name).channel.state === 'subscribed'),
      {timeout: 10000, what: 'every subscriber open and subscribed again'});
    await waitFor(async () => {
      await pub.socket.invokePublish(name, 'after');
      return subs.every((s) => s.e.messages.includes('after'));
    }, {timeout: 10000, interval: 300, what: 'every subscriber receives after the kill'});
    await target.waitAllReady(15000); // worker-1 restarted before the next file
  }));
});
