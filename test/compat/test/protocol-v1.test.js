'use strict';
// Protocol v1 (legacy '#1'/'#2' heartbeat, §9): a short-lived target started
// with protocol.version: 1; the official client with protocolVersion: 1 must
// stay connected past 2 × pingTimeout, and everything else is unchanged.
const {describe, it, before, after} = require('node:test');
const assert = require('node:assert/strict');
const h = require('../lib/harness');
const {connect, rawSocket, sleep, tap, waitFor, short} = h;

let target;
const tc = (fn) => h.wrap(() => target, fn);

describe(`protocol v1 against ${h.TARGET}`, {timeout: 120000}, () => {
  before(async () => {
    target = await h.startTarget({name: 'v1', protocolVersion: 1, workers: 2, brokers: 2});
    console.log(`# ${target.kind} v1 target ready in ${target.readyAfterMs} ms on ${target.url}`);
  });
  after(async () => {
    h.closeAll();
    if (!target) return;
    if (h.state.failures > 0) target.printLogs(`${h.state.failures} test(s) failed`);
    await target.stop();
  });

  it('v1 client stays connected past 2 × pingTimeout; pings are "#1", pongs "#2"', tc(async () => {
    const c = await connect(target, {protocolVersion: 1});
    const id = c.socket.id;
    const ws = c.ws;
    const t0 = h.stamp();
    await sleep(7000); // observation window: 2 × 3 s + 1 s
    assert.equal(c.socket.state, 'open', c.eventSummary());
    assert.equal(c.socket.id, id);
    assert.equal(c.ws, ws);
    assert.equal(c.eventsOf('disconnect').length, 0, c.eventSummary());
    const pings = tap.of(ws, {since: t0, dir: '<'}).filter((f) => f.text === '#1');
    const pongs = tap.of(ws, {since: t0, dir: '>'}).filter((f) => f.text === '#2');
    assert.ok(pings.length >= 4, `≥ 4 "#1" pings, got ${pings.length}`);
    assert.ok(pongs.length >= 4, `≥ 4 "#2" pongs, got ${pongs.length}`);
    const empty = tap.of(ws, {since: t0, dir: '<'}).filter((f) => f.text === '');
    assert.equal(empty.length, 0, 'no v2 "" pings on a v1 endpoint');
  }));

  it('v1: handshake, subscribe and publish work as in v2', tc(async () => {
    const a = await connect(target, {protocolVersion: 1});
    const b = await connect(target, {protocolVersion: 1});
    const status = await a.waitEvent('connect');
    assert.equal(status.pingTimeout, 3000);
    const e = await b.subscribe('v1-chan');
    for (let i = 0; i < 20; i++) a.socket.transmitPublish('v1-chan', i);
    await a.socket.invokePublish('v1-chan', 'end');
    await waitFor(() => e.messages.includes('end'), {what: 'v1 messages'});
    assert.deepEqual(e.messages, [...Array.from({length: 20}, (_, i) => i), 'end']);
  }));

  it('v1: a raw socket that never answers "#1" is closed with 4001', tc(async () => {
    const r = await rawSocket(target);
    await r.handshake();
    const ci = await r.closed(8000);
    assert.equal(ci.code, 4001, short(ci));
    assert.ok(r.messages.some((m) => m.text === '#1'), 'server sent "#1" pings');
  }));
});
