'use strict';
// wss:// through the balancer's TLS termination (listen.tls.auto: a generated
// development certificate under <storage.dir>/tls/, trusted explicitly here),
// then PROXY v2 to a worker: the same protocol must come out the other end.
// With SHOAL_COMPAT_BALANCERS=0 (`npm test` runs it both ways) the workers
// terminate TLS themselves on the shared port, all with the one certificate.
const {describe, it, before, after} = require('node:test');
const assert = require('node:assert/strict');
const crypto = require('node:crypto');
const fs = require('node:fs');
const path = require('node:path');
const h = require('../lib/harness');
const {connect, waitFor, short, IS_REFERENCE} = h;

let target;
let ca;
const tc = (fn) => h.wrap(() => target, fn);
const SKIP = IS_REFERENCE ? 'cluster-only: TLS termination is the shoal balancer\'s (the reference target is plain ws)' : false;

describe(`wss:// (listen.tls.auto, ${h.MODE}) against ${h.TARGET}`, {timeout: 120000, skip: SKIP}, () => {
  before(async () => {
    target = await h.startTarget({name: 'tls', tls: true});
    const certFile = path.join(target.dataDir, 'tls', 'dev-cert.pem');
    ca = await waitFor(() => { try { return fs.readFileSync(certFile); } catch (_) { return false; } },
      {timeout: 10000, what: `the development certificate at ${certFile}`});
    console.log(`# ${target.kind} TLS target ready in ${target.readyAfterMs} ms, wss on 127.0.0.1:${target.tlsPort}`);
  });
  after(async () => {
    h.closeAll();
    if (!target) return;
    if (h.state.failures > 0) target.printLogs(`${h.state.failures} test(s) failed`);
    await target.stop();
  });

  const wss = (extra = {}) => connect(target, {hostname: 'localhost', port: target.tlsPort, secure: true, wsOptions: {ca}, ...extra});

  it('official client over wss:// with the certificate trusted: handshake, pub/sub, 512 KiB', tc(async () => {
    const a = await wss();
    const b = await wss();
    const status = await a.waitEvent('connect');
    assert.equal(status.pingTimeout, 3000);
    assert.equal(a.ws.url.startsWith('wss://'), true);
    const e = await b.subscribe('tls-chan');
    const blob = crypto.randomBytes(384 * 1024).toString('base64').slice(0, 512 * 1024);
    for (let i = 0; i < 50; i++) a.socket.transmitPublish('tls-chan', i);
    await a.socket.invokePublish('tls-chan', blob);
    await waitFor(() => e.messages.length === 51, {timeout: 10000, what: `51 messages over TLS (got ${e.messages.length})`});
    assert.deepEqual(e.messages.slice(0, 50), Array.from({length: 50}, (_, i) => i));
    assert.equal(e.messages[50], blob);
  }));

  it('wss and ws clients share channels', tc(async () => {
    const s = await wss();
    const p = await connect(target); // plain ws on the public port
    const e = await s.subscribe('mixed');
    await p.socket.invokePublish('mixed', 'plain → tls');
    await waitFor(() => e.messages.length === 1, {what: 'message across ws → wss'});
    assert.deepEqual(e.messages, ['plain → tls']);
  }));

  for (const [label, size] of [['1 MiB + 1 KiB', 1024 * 1024 + 1024], ['8 MiB', 8 * 1024 * 1024]]) {
    it(`an oversized frame (${label}) over wss closes that socket with 1009; the bystander stays`, tc(async () => {
      const big = await wss({autoReconnect: false});
      const other = await wss();
      const e = await other.subscribe(`tls-bystander-${size}`);
      const t0 = h.stamp();
      big.socket.transmit('huge', 'x'.repeat(size));
      const d = await big.waitEvent('close', {since: t0, timeout: 8000});
      assert.equal(d.code, 1009, short(d));
      await other.socket.invokePublish(`tls-bystander-${size}`, 'ok');
      await waitFor(() => e.messages.includes('ok'), {what: 'bystander still receives'});
      assert.equal(other.eventsOf('disconnect').length, 0, other.eventSummary());
    }));
  }

  it('a client that does not trust the certificate cannot connect', tc(async () => {
    const c = await connect(target, {hostname: 'localhost', port: target.tlsPort, secure: true, autoReconnect: false}, {wait: false});
    const d = await c.waitEvent('connectAbort', {timeout: 8000});
    assert.notEqual(c.socket.state, 'open');
    assert.ok(d.code >= 1000, short(d));
  }));
});
