'use strict';
// What the official client sees of Shoal's server HTTP API (docs/api.md):
// server-side #publish, #kickOut, #setAuthToken and a disconnect with a
// chosen code. Shoal only: the official server has no HTTP API.
const {describe, it, before, after} = require('node:test');
const assert = require('node:assert/strict');
const h = require('../lib/harness');
const {connect, signToken, nowSec, waitFor, sleep, tap, short, IS_REFERENCE} = h;

let target;
const tc = (fn) => h.wrap(() => target, fn);
const SKIP = IS_REFERENCE ? 'cluster-only: the server HTTP API is Shoal\'s (socketcluster-server has none)' : false;

async function asUser(sub) {
  const c = await connect(target);
  await c.socket.authenticate(signToken({sub, exp: nowSec() + 3600}));
  return c;
}

describe(`server API → official client against ${h.TARGET}`, {timeout: 120000, skip: SKIP}, () => {
  before(async () => {
    target = await h.startTarget({name: 'api'});
    console.log(`# ${target.kind} API target ready in ${target.readyAfterMs} ms on ${target.url}`);
  });
  after(async () => {
    h.closeAll();
    if (!target) return;
    if (h.state.failures > 0) target.printLogs(`${h.state.failures} test(s) failed`);
    await target.stop();
  });

  it('API publish reaches every subscriber as a #publish transmit (no cid)', tc(async () => {
    const a = await connect(target);
    const b = await connect(target);
    const ea = await a.subscribe('api/pub');
    const eb = await b.subscribe('api/pub');
    const t0 = h.stamp();
    const r = await target.api('publish', {channel: 'api/pub', data: {text: 'from the backend'}});
    assert.equal(r.status, 200, short(r));
    await waitFor(() => ea.messages.length === 1 && eb.messages.length === 1, {what: 'both subscribers got the API publish'});
    assert.deepEqual(ea.messages, [{text: 'from the backend'}]);
    assert.deepEqual(eb.messages, [{text: 'from the backend'}]);
    const f = tap.of(a.ws, {since: t0, dir: '<'}).find((x) => x.text.includes('"#publish"'));
    const pkt = JSON.parse(f.text);
    assert.equal(pkt.cid, undefined, 'no cid on a server #publish');
  }));

  it('API kick → the client gets #kickOut (kickOut event, channel dropped) and nothing more on it', tc(async () => {
    const c = await asUser('kick-me');
    const e = await c.subscribe('api/kick');
    const r = await target.api('kick', {user: 'kick-me', channel: 'api/kick', reason: 'Spam'});
    assert.equal(r.status, 200, short(r));
    const k = await c.waitEvent('kickOut', {timeout: 5000});
    assert.equal(k.channel, 'api/kick');
    assert.equal(k.message, 'Spam');
    assert.notEqual(e.channel.state, 'subscribed');
    const t1 = h.stamp();
    await target.api('publish', {channel: 'api/kick', data: 'after kick'});
    await sleep(300); // observation window
    const stray = tap.of(c.ws, {since: t1, dir: '<'}).filter((x) => x.text.includes('"#publish"'));
    assert.equal(stray.length, 0, `no #publish after the kick: ${short(stray.map((x) => x.text))}`);
  }));

  it('API push_token → #setAuthToken: the client stores the signed token and is authenticated with the new claims', tc(async () => {
    const c = await asUser('push-me');
    const t0 = h.stamp();
    const r = await target.api('push_token', {user: 'push-me', claims: {role: 'moderator'}});
    assert.equal(r.status, 200, short(r));
    await c.waitEvent('authenticate', {since: t0, timeout: 5000});
    assert.equal(c.socket.authState, 'authenticated');
    assert.equal(c.socket.authToken.sub, 'push-me');
    assert.equal(c.socket.authToken.role, 'moderator');
    const stored = await c.socket.auth.loadToken(c.socket.authTokenName);
    assert.equal(stored, c.socket.signedAuthToken);
    // The pushed token is a real one: a new connection authenticates with it.
    const d = await connect(target);
    const rr = await d.socket.authenticate(stored);
    assert.equal(rr.isAuthenticated, true);
  }));

  it('API disconnect with code 4403 closes the user\'s socket with that code', tc(async () => {
    const c = await asUser('bye');
    const other = await asUser('stay');
    const t0 = h.stamp();
    const r = await target.api('disconnect', {user: 'bye', code: 4403, reason: 'Account closed'});
    assert.equal(r.status, 200, short(r));
    const d = await c.waitEvent('close', {since: t0, timeout: 5000});
    assert.equal(d.code, 4403, short(d));
    assert.equal(other.socket.state, 'open');
  }));

  it('API without the key is refused (401)', tc(async () => {
    const r = await fetch(`${target.httpBase}/api/v1/publish`, {method: 'POST', headers: {'content-type': 'application/json'}, body: '{"channel":"x","data":1}'});
    assert.equal(r.status, 401);
  }));
});
