'use strict';
// protocol.origins allow-list (§1: hostname:port, hostname:*, *:port
// patterns; others refused with HTTP 403 during the upgrade). Own cluster.
const {describe, it, before, after} = require('node:test');
const assert = require('node:assert/strict');
const h = require('../lib/harness');
const {rawSocket, RawSocket, short} = h;

let target;
const tc = (fn) => h.wrap(() => target, fn);

describe(`origins allow-list against ${h.TARGET}`, {timeout: 60000}, () => {
  before(async () => {
    target = await h.startTarget({name: 'origins', origins: ['allowed.example:*', 'localhost:8080', '*:9443'], workers: 2, brokers: 2});
    console.log(`# ${target.kind} origins target ready in ${target.readyAfterMs} ms on ${target.url}`);
  });
  after(async () => {
    h.closeAll();
    if (!target) return;
    if (h.state.failures > 0) target.printLogs(`${h.state.failures} test(s) failed`);
    await target.stop();
  });

  for (const origin of ['http://allowed.example:1234', 'https://allowed.example', 'http://localhost:8080', 'https://anyhost.example:9443']) {
    it(`Origin ${origin} is admitted`, tc(async () => {
      const r = await rawSocket(target, {headers: {Origin: origin}});
      const resp = await r.handshake();
      assert.equal(resp.error, undefined, short(resp));
    }));
  }

  for (const origin of ['http://evil.example', 'http://localhost:9090', 'http://allowed.example.evil.example:80', 'https://notallowed.example:443']) {
    it(`Origin ${origin} is refused with HTTP 403`, tc(async () => {
      const r = new RawSocket(target, {headers: {Origin: origin}});
      const ci = await r.closed(5000);
      assert.equal(r.httpStatus, 403, `HTTP ${r.httpStatus} (${short(ci)})`);
    }));
  }
});
