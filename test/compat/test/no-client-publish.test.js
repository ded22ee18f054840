'use strict';
// protocol.allow_client_publish: false (§5): a client #publish invoke gets
// InvalidActionError "Client publish feature is disabled"; the transmit form
// fails silently; subscribers receive nothing; subscribing still works.
const {describe, it, before, after} = require('node:test');
const assert = require('node:assert/strict');
const h = require('../lib/harness');
const {connect, sleep, short} = h;

function isAlive(pid) {
  try { process.kill(pid, 0); return true; } catch (e) { return e.code === 'EPERM'; }
}

let target;
const tc = (fn) => h.wrap(() => target, fn);

describe(`allow_client_publish: false against ${h.TARGET}`, {timeout: 120000}, () => {
  before(async () => {
    target = await h.startTarget({name: 'nopub', allowClientPublish: false, workers: 2, brokers: 2});
    console.log(`# ${target.kind} no-publish target ready in ${target.readyAfterMs} ms on ${target.url}`);
  });
  after(async () => {
    h.closeAll();
    if (!target) return;
    if (h.state.failures > 0) target.printLogs(`${h.state.failures} test(s) failed`);
    await target.stop();
  });

  it('invokePublish rejects with InvalidActionError; transmitPublish is dropped silently; nobody receives', tc(async () => {
    const sub = await connect(target);
    const pub = await connect(target);
    const e = await sub.subscribe('locked');
    const err = await pub.socket.invokePublish('locked', 'nope').then((v) => assert.fail(`resolved ${short(v)}`), (x) => x);
    assert.equal(err.name, 'InvalidActionError', `${err.name}: ${err.message}`);
    assert.equal(typeof err.message, 'string');
    pub.socket.transmitPublish('locked', 'nope either');
    await pub.subscribe('barrier'); // round trip after the transmit
    await sleep(300); // observation window
    assert.deepEqual(e.messages, []);
    assert.equal(pub.socket.state, 'open');
    assert.equal(sub.socket.state, 'open');
  }));
  it('cluster: SIGTERM → clients closed with 1001 (going away), supervisor exits 0, no process left', {skip: h.CLUSTER_ONLY}, tc(async () => {
    const clients = [await connect(target, {autoReconnect: false}), await connect(target, {autoReconnect: false})];
    const procs = await target.processes();
    const t0 = h.stamp();
    const orphans = await target.stop({grace: 10000});
    assert.deepEqual(orphans, [], 'no process outlived the supervisor');
    assert.equal(target.exited && target.exited.code, 0, `supervisor exit: ${JSON.stringify(target.exited)}`);
    for (const p of procs) assert.equal(isAlive(p.pid), false, `${p.name} (pid ${p.pid}) is gone`);
    for (const c of clients) {
      const d = await c.waitEvent('close', {since: t0, timeout: 5000});
      assert.equal(d.code, 1001, `close code ${d.code} (${d.reason})`);
    }
  }));
});
