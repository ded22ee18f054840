'use strict';
// The official socketcluster-client v20, unmodified, against one cluster
// (2 workers, 2 brokers, 1 s pings / 3 s ping timeout) — or against the
// official socketcluster-server v20 with SHOAL_COMPAT_TARGET=reference.
// What each test expects is ../../../shared/reference/socketcluster-protocol.md
// (section numbers in the test names' comments).
const {describe, it, before, after} = require('node:test');
const assert = require('node:assert/strict');
const crypto = require('node:crypto');
const net = require('node:net');
const h = require('../lib/harness');
const {connect, rawSocket, signToken, nowSec, waitFor, sleep, tap, short, IS_REFERENCE, CLUSTER_ONLY} = h;

let target;
const T = () => target;
const tc = (fn) => h.wrap(T, fn);
let uniq = 0;
const chan = (p) => `${p}-${process.pid}-${++uniq}`;

// Shoal only: wait until the admin API shows every worker holding ≥ min
// connections (the clients of a test are spread over both workers).
async function onBothWorkers(min = 1) {
  if (IS_REFERENCE) return;
  await waitFor(async () => {
    const ws = (await target.processes()).filter((p) => p.role === 'worker');
    return ws.length === 2 && ws.every((w) => w.connections >= min) && ws;
  }, {timeout: 5000, interval: 100, what: `admin API: both workers hold ≥ ${min} connection(s)`});
}

// Does a raw frame carry a server → client #publish for this channel?
function publishFramesFor(list, channel) {
  return list.filter((f) => f.dir === '<' && f.text.includes('"#publish"') && f.text.includes(JSON.stringify(channel)));
}

describe(`socketcluster-client@20 against ${h.TARGET}`, {timeout: 200000}, () => {
  before(async () => {
    target = await h.startTarget({name: 'main', socketChannelLimit: 50});
    console.log(`# ${target.kind} target ready in ${target.readyAfterMs} ms on ${target.url}`);
  });

  after(async () => {
    h.closeAll();
    if (!target) return;
    if (h.state.failures > 0) target.printLogs(`${h.state.failures} test(s) failed`);
    const orphans = await target.stop();
    if (orphans.length) console.error(`# WARNING: pids ${orphans.join(', ')} outlived the cluster and were killed by the harness`);
  });

  // §1: health check on the public port (and the harness's readiness contract).
  it('GET /healthz on the public port answers 200', tc(async () => {
    const r = await fetch(`${target.httpBase}/healthz`);
    assert.equal(r.status, 200);
  }));

  it('cluster: /api/cluster lists 2 ready workers, 2 ready brokers and a balancer with pids', {skip: CLUSTER_ONLY}, tc(async () => {
    const procs = await target.processes();
    const by = (r) => procs.filter((p) => p.role === r);
    assert.equal(by('worker').length, 2, `workers in ${short(procs.map((p) => p.raw), 800)}`);
    assert.equal(by('broker').length, 2);
    assert.ok(by('balancer').length >= 1);
    for (const p of procs) {
      assert.equal(p.state, 'ready', `${p.name} state`);
      assert.ok(p.pid > 0, `${p.name} has a pid`);
    }
  }));

  // §2 handshake.
  it('handshake: socket.id set, state open, unauthenticated, pingTimeout from the server', tc(async () => {
    const since = h.stamp();
    const c = await connect(target);
    const status = await c.waitEvent('connect');
    assert.equal(typeof c.socket.id, 'string');
    assert.ok(c.socket.id.length > 0, 'socket.id is non-empty');
    assert.equal(c.socket.state, 'open');
    assert.equal(c.socket.authState, 'unauthenticated');
    assert.equal(status.isAuthenticated, false);
    assert.equal(status.id, c.socket.id);
    assert.equal(status.pingTimeout, 3000, 'handshake pingTimeout is protocol.ping_timeout in ms');
    assert.equal(status.authError, undefined, 'no authError without a token');
    // Wire: the response answers cid 1 with a numeric rid.
    const first = tap.of(c.ws, {since, dir: '<'}).find((f) => f.text.startsWith('{'));
    assert.ok(first, 'got a response frame');
    const resp = JSON.parse(first.text);
    assert.equal(typeof resp.rid, 'number');
    assert.equal(c.eventsOf('error').length, 0, `no client errors: ${c.eventSummary()}`);
  }));

  it('handshake: a second client gets a different id', tc(async () => {
    const a = await connect(target);
    const b = await connect(target);
    assert.notEqual(a.socket.id, b.socket.id);
  }));

  // §3 keep-alive: 1 s pings, 3 s timeout; stay > 2 × pingTimeout without app traffic.
  it('keep-alive: connection stays open past 2 × pingTimeout with no app traffic, pings are "" and answered', tc(async () => {
    const c = await connect(target);
    const id = c.socket.id;
    const ws = c.ws;
    const t0 = h.stamp();
    await sleep(7000); // observation window, not synchronisation: 2 × 3 s + 1 s
    assert.equal(c.socket.state, 'open', `events: ${c.eventSummary()}`);
    assert.equal(c.socket.id, id, 'same session (no reconnect)');
    assert.equal(c.ws, ws, 'same transport');
    assert.equal(c.eventsOf('disconnect').length + c.eventsOf('close').length, 0, `no disconnect: ${c.eventSummary()}`);
    const pings = tap.of(ws, {since: t0, dir: '<'}).filter((f) => f.text === '');
    const pongs = tap.of(ws, {since: t0, dir: '>'}).filter((f) => f.text === '');
    assert.ok(pings.length >= 4, `≥ 4 pings ("" text frames) in 7 s with ping_interval 1 s, got ${pings.length}`);
    assert.ok(pongs.length >= 4, `client answered pings, got ${pongs.length}`);
    const other = tap.of(ws, {since: t0, dir: '<'}).filter((f) => f.text !== '');
    assert.equal(other.length, 0, `only pings arrive on an idle socket: ${short(other.map((f) => f.text))}`);
  }));

  // §4 event layer.
  it('invoke of an unknown procedure gets an error response (not a timeout) naming it', tc(async () => {
    const c = await connect(target);
    const t0 = h.stamp();
    const err = await c.socket.invoke('noSuchProcedure', {a: 1}, {ackTimeout: 6000}).then(
      (v) => assert.fail(`resolved with ${short(v)}`), (e) => e);
    assert.ok(err instanceof Error, `rejected with an Error: ${short(err)}`);
    assert.notEqual(err.name, 'TimeoutError', `got an error response, not a client timeout (${err.message})`);
    assert.notEqual(err.name, 'BadConnectionError', `connection stayed up (${err.message})`);
    assert.ok(Date.now() - t0 < 5000, 'answered promptly');
    assert.match(err.message, /noSuchProcedure/, 'the error names the procedure');
    assert.equal(typeof err.name, 'string');
    assert.equal(c.socket.state, 'open');
  }));

  it('transmit of an unknown event is accepted silently; the socket keeps working', tc(async () => {
    const c = await connect(target);
    const ws = c.ws;
    const t0 = h.stamp();
    c.socket.transmit('someEvent', {x: 1});
    c.socket.transmit('other', 'string data');
    c.socket.transmit('noData');
    // A round trip after the transmits proves they were processed (same socket, in order).
    const ch = chan('after-transmit');
    await c.subscribe(ch);
    assert.equal(c.socket.state, 'open');
    assert.equal(c.eventsOf('error').length, 0, c.eventSummary());
    const replies = tap.of(ws, {since: t0, dir: '<'}).filter((f) => f.text !== '' && !f.text.includes('#subscribe') && !/"rid"\s*:/.test(f.text));
    assert.equal(replies.length, 0, `no reply to transmits: ${short(replies.map((f) => f.text))}`);
    assert.equal(tap.of(ws, {since: t0, dir: '<'}).filter((f) => /"rid"/.test(f.text)).length, 1, 'exactly one response (the #subscribe ack)');
  }));

  // §1: query strings on the WebSocket URL.
  it('client options query and timestampRequests (query string on the upgrade URL) connect normally', tc(async () => {
    const c = await connect(target, {query: {app: 'compat', tags: ['a', 'b']}, timestampRequests: true});
    assert.match(c.ws.url, /\/socketcluster\/\?app=compat&tags=a&tags=b&t=\d+$/, c.ws.url);
    await c.subscribe(chan('query'));
  }));

  // §1 batching from the official client's own API.
  it('client batching (batchOnHandshake, startBatch/flushBatch) sends array frames the server processes in order', tc(async () => {
    const ch = chan('batching');
    const sub = await connect(target);
    const e = await sub.subscribe(ch);
    const c = new h.Client(target, {batchOnHandshake: true, batchOnHandshakeDuration: 100});
    const early = await c.subscribe(chan('early'), undefined, {wait: false});
    for (let i = 0; i < 5; i++) c.socket.transmitPublish(ch, i);
    await c.connected();
    await waitFor(() => early.channel.state === 'subscribed', {what: 'subscription made during batchOnHandshake'});
    c.socket.startBatch();
    for (let i = 5; i < 10; i++) c.socket.transmitPublish(ch, i);
    c.socket.flushBatch();
    await c.socket.invokePublish(ch, 'end');
    await waitFor(() => e.messages.includes('end'), {what: 'end marker'});
    assert.deepEqual(e.messages, [...Array.from({length: 10}, (_, i) => i), 'end']);
    const arrays = tap.of(c.ws, {dir: '>'}).filter((f) => f.text.startsWith('['));
    assert.ok(arrays.length >= 1, `the client sent array frames (${arrays.length})`);
  }));

  // §5 pub/sub.
  it('subscribe/publish across workers: every subscriber gets every message exactly once, in order', tc(async () => {
    const ch = chan('fanout');
    const subs = [];
    for (let i = 0; i < 4; i++) subs.push(await connect(target));
    const pub = await connect(target);
    if (!IS_REFERENCE) {
      // 5 sockets on 2 workers (least connections): both workers must hold some.
      await waitFor(async () => {
        const ws = (await target.processes()).filter((p) => p.role === 'worker');
        return ws.length === 2 && ws.every((w) => w.connections >= 1) && ws.reduce((s, w) => s + w.connections, 0) >= 5 && ws;
      }, {timeout: 5000, interval: 100, what: 'admin API: both workers hold connections (clients spread over workers)'});
    }
    const entries = [];
    for (const s of subs) entries.push(await s.subscribe(ch));
    const own = await pub.subscribe(ch);
    const N = 200;
    for (let i = 0; i < N; i++) pub.socket.transmitPublish(ch, {seq: i, from: 'pub'});
    await pub.socket.invokePublish(ch, {seq: N, last: true});
    const want = Array.from({length: N + 1}, (_, i) => i);
    for (const [k, e] of [...entries, own].entries()) {
      await waitFor(() => e.messages.some((m) => m && m.last), {timeout: 10000, what: `subscriber ${k} to get the last message (has ${e.messages.length})`});
      assert.deepEqual(e.messages.map((m) => m.seq), want, `subscriber ${k} got every message exactly once, in order`);
    }
    // The publisher got its own messages because it is subscribed.
    assert.equal(own.messages.length, N + 1);
  }));

  it('two publishers on different workers, 8 channels (both brokers): per-publisher order, exactly once, same bytes to every subscriber', tc(async () => {
    const chans = Array.from({length: 8}, () => chan('multi'));
    const subs = [];
    for (let i = 0; i < 3; i++) subs.push(await connect(target));
    const pubs = [await connect(target), await connect(target)];
    if (!IS_REFERENCE) {
      await waitFor(async () => (await target.processes()).filter((p) => p.role === 'worker').every((w) => w.connections >= 2),
        {timeout: 5000, interval: 100, what: 'admin API: both workers hold ≥ 2 of the 5 sockets'});
    }
    const entries = [];
    for (const s of subs) for (const ch of chans) entries.push({s, ch, e: await s.subscribe(ch)});
    const N = 60;
    const t0 = h.stamp();
    for (let i = 0; i < N; i++) {
      for (const [k, p] of pubs.entries()) p.socket.transmitPublish(chans[i % chans.length], {p: k, seq: i});
    }
    for (const [k, p] of pubs.entries()) for (const ch of chans) await p.socket.invokePublish(ch, {p: k, end: true});
    for (const {ch, e} of entries) {
      await waitFor(() => e.messages.filter((m) => m.end).length === 2, {timeout: 10000, what: `both end markers on ${ch} (has ${e.messages.length})`});
      for (const k of [0, 1]) {
        const got = e.messages.filter((m) => m.p === k && !m.end).map((m) => m.seq);
        const want = Array.from({length: N}, (_, i) => i).filter((i) => chans[i % chans.length] === ch);
        assert.deepEqual(got, want, `publisher ${k} on ${ch}: every message once, in order`);
      }
    }
    // The server frames a publish once: every subscriber gets the same bytes.
    const byMsg = new Map();
    for (const s of subs) {
      for (const f of tap.of(s.ws, {since: t0, dir: '<'}).filter((x) => x.text.includes('"#publish"'))) {
        const pkt = JSON.parse(f.text);
        for (const one of Array.isArray(pkt) ? pkt : [pkt]) {
          if (one.event !== '#publish') continue;
          const key = `${one.data.channel}|${JSON.stringify(one.data.data)}`;
          if (!Array.isArray(pkt)) {
            if (!byMsg.has(key)) byMsg.set(key, new Set());
            byMsg.get(key).add(f.text);
          }
        }
      }
    }
    for (const [key, texts] of byMsg) assert.equal(texts.size, 1, `identical bytes for ${key}: ${short([...texts])}`);
  }));

  it('200 official clients connect at once, all subscribe, all receive one publish', {timeout: 60000}, tc(async (t) => {
    const ch = chan('crowd');
    const clients = await Promise.all(Array.from({length: 200}, () => connect(target)));
    const ids = new Set(clients.map((c) => c.socket.id));
    assert.equal(ids.size, 200, 'distinct socket ids');
    const entries = await Promise.all(clients.map((c) => c.subscribe(ch, undefined, {timeout: 15000})));
    if (!IS_REFERENCE) {
      const ws = await waitFor(async () => {
        const w = (await target.processes()).filter((p) => p.role === 'worker');
        return w.reduce((n, x) => n + x.connections, 0) >= 200 && w;
      }, {timeout: 8000, interval: 100, what: 'admin API: 200 connections counted'});
      t.diagnostic(`connections per worker: ${ws.map((w) => `${w.name}=${w.connections}`).join(' ')}`);
      for (const w of ws) assert.ok(w.connections >= 50, `least-connections spreads the crowd (${w.name}: ${w.connections})`);
    }
    await clients[0].socket.invokePublish(ch, 'to everyone');
    await waitFor(() => entries.every((e) => e.messages.length === 1), {timeout: 10000,
      what: `all 200 got it (${entries.filter((e) => e.messages.length === 1).length} did)`});
  }));

  it('channel names with quotes, backslashes, slashes, spaces, unicode and control characters', tc(async () => {
    const names = ['chat/room 1', 'quote"in"name', 'back\\slash\\', 'ünï/😀/日本', 'ctl\u0001\ttab', 'a'.repeat(200), 'x/**/y'];
    const a = await connect(target);
    const b = await connect(target);
    const es = [];
    for (const n of names) es.push(await b.subscribe(n));
    for (const [i, n] of names.entries()) await a.socket.invokePublish(n, {i, n});
    for (const [i, n] of names.entries()) {
      await waitFor(() => es[i].messages.length === 1, {what: `message on ${JSON.stringify(n)}`});
      assert.deepEqual(es[i].messages, [{i, n}], `only its own message on ${JSON.stringify(n)}`);
    }
  }));

  it('cluster: channels starting with "#" are Shoal-internal: subscribe refused with InvalidActionError', {skip: IS_REFERENCE ? 'Shoal rule: the official server has no internal channels and accepts "#…" names' : false}, tc(async () => {
    const c = await connect(target);
    const e = await c.subscribe('#presence/x', undefined, {wait: false});
    const f = await c.waitEvent('subscribeFail', {timeout: 5000});
    assert.equal(f.channel, '#presence/x');
    assert.equal(f.error.name, 'InvalidActionError', `${f.error.name}: ${f.error.message}`);
    assert.notEqual(e.channel.state, 'subscribed');
    assert.equal(c.socket.state, 'open');
  }));

  it('publish payload types pass through unchanged (object, string, number, null, array, unicode)', tc(async () => {
    const ch = chan('types');
    const a = await connect(target);
    const b = await connect(target);
    await onBothWorkers();
    const e = await b.subscribe(ch);
    const values = [{nested: {a: [1, 2, {b: null}]}, s: 'x'}, 'plain string', 42, 3.5, -0.25, null, true, [1, 'two', {three: 3}],
      'quote " backslash \\ newline \n tab \t', 'ünïcødé ✓ 😀 日本語', '', 0, false, {}];
    for (const v of values) await a.socket.invokePublish(ch, v);
    await a.socket.invokePublish(ch, 'END');
    await waitFor(() => e.messages.includes('END'), {timeout: 5000, what: 'END marker'});
    assert.deepEqual(e.messages.slice(0, -1), values);
  }));

  it('unsubscribe: after #unsubscribe the server sends nothing more for that channel', tc(async () => {
    const ch = chan('unsub');
    const pub = await connect(target);
    const a = await connect(target);
    const b = await connect(target);
    const ea = await a.subscribe(ch);
    const eb = await b.subscribe(ch);
    await pub.socket.invokePublish(ch, 'before');
    await waitFor(() => ea.messages.length === 1 && eb.messages.length === 1, {what: 'both got "before"'});
    const t0 = h.stamp();
    a.socket.unsubscribe(ch);
    // The client sends a transmit with the bare channel name (§5).
    const unsubFrame = tap.of(a.ws, {since: t0, dir: '>'}).find((f) => f.text.includes('#unsubscribe'));
    assert.ok(unsubFrame, 'client sent #unsubscribe');
    assert.deepEqual(JSON.parse(unsubFrame.text), {event: '#unsubscribe', data: ch});
    // A round trip on the same socket after the unsubscribe: the worker has processed it.
    await a.subscribe(chan('barrier'));
    const t1 = h.stamp();
    for (let i = 0; i < 5; i++) await pub.socket.invokePublish(ch, `after-${i}`);
    await waitFor(() => eb.messages.includes('after-4'), {what: 'control subscriber got every "after" message'});
    await sleep(300); // observation window for stray deliveries
    const stray = publishFramesFor(tap.of(a.ws, {since: t1}), ch);
    assert.equal(stray.length, 0, `no #publish for ${ch} after unsubscribe: ${short(stray.map((f) => f.text))}`);
    assert.deepEqual(ea.messages, ['before']);
  }));

  it('server → client #publish is a transmit (no cid) with {channel, data}', tc(async () => {
    const ch = chan('shape');
    const c = await connect(target);
    await c.subscribe(ch);
    const t0 = h.stamp();
    await c.socket.invokePublish(ch, {k: 'v'});
    const f = await waitFor(() => publishFramesFor(tap.of(c.ws, {since: t0}), ch)[0], {what: '#publish frame'});
    const pkt = JSON.parse(f.text);
    const one = Array.isArray(pkt) ? pkt.find((p) => p.event === '#publish') : pkt;
    assert.deepEqual(one, {event: '#publish', data: {channel: ch, data: {k: 'v'}}});
  }));

  it('invokePublish is acked (with no subscription needed); transmitPublish is accepted', tc(async () => {
    const ch = chan('ack');
    const c = await connect(target);
    const t0 = h.stamp();
    await c.socket.invokePublish(ch, {hello: 'world'}); // resolves on the ack, rejects on an error response
    const resp = tap.of(c.ws, {since: t0, dir: '<'}).find((f) => /"rid"/.test(f.text));
    assert.ok(resp, 'a response frame arrived');
    assert.equal(JSON.parse(resp.text).error, undefined, `ack without error: ${resp.text}`);
    c.socket.transmitPublish(ch, 'fire and forget');
    await c.subscribe(chan('barrier'));
    assert.equal(c.socket.state, 'open');
    assert.equal(c.eventsOf('error').length, 0, c.eventSummary());
  }));

  it('subscribe with data and waitForAuth fields set (after auth) is answered', tc(async () => {
    const c = await connect(target);
    const t0 = h.stamp();
    await c.subscribe(chan('with-data'), {data: {z: 1}});
    const f = tap.of(c.ws, {since: t0, dir: '>'}).find((x) => x.text.includes('#subscribe'));
    assert.deepEqual(JSON.parse(f.text).data.data, {z: 1});
  }));

  // §6 auth.
  describe('auth', () => {
    it('valid token in the handshake → isAuthenticated true, authToken decoded', tc(async () => {
      const token = signToken({sub: 'alice', exp: nowSec() + 3600});
      const c = await connect(target, {autoConnect: false}, {wait: false});
      await c.socket.auth.saveToken(c.socket.authTokenName, token);
      const t0 = h.stamp();
      c.socket.connect();
      await c.connected();
      const status = await c.waitEvent('connect');
      const hs = tap.of(c.ws, {since: t0, dir: '>'}).find((f) => f.text.includes('#handshake'));
      assert.equal(JSON.parse(hs.text).data.authToken, token, 'client sent the stored token');
      assert.equal(status.isAuthenticated, true, `handshake isAuthenticated (authError: ${short(status.authError)})`);
      assert.equal(status.authError, undefined);
      assert.equal(c.socket.authState, 'authenticated');
      assert.equal(c.socket.authToken.sub, 'alice');
      assert.equal(c.socket.signedAuthToken, token);
    }));

    async function handshakeWith(token) {
      const c = await connect(target, {autoConnect: false}, {wait: false});
      await c.socket.auth.saveToken(c.socket.authTokenName, token);
      c.socket.connect();
      await c.connected();
      const status = await c.waitEvent('connect');
      return {c, status};
    }

    it('bad signature → authError AuthTokenInvalidError, #removeAuthToken, stored token removed', tc(async () => {
      const token = signToken({sub: 'mallory', exp: nowSec() + 3600}, {key: 'not-the-key'});
      const {c, status} = await handshakeWith(token);
      assert.equal(status.isAuthenticated, false);
      assert.ok(status.authError, 'connect status carries authError');
      assert.equal(status.authError.name, 'AuthTokenInvalidError');
      assert.equal(typeof status.authError.message, 'string');
      await c.waitEvent('removeAuthToken');
      assert.equal(await c.socket.auth.loadToken(c.socket.authTokenName), null, 'stored token removed');
      assert.equal(c.socket.authState, 'unauthenticated');
      assert.equal(c.socket.authToken, null);
    }));

    it('expired token → authError AuthTokenExpiredError, #removeAuthToken', tc(async () => {
      const token = signToken({sub: 'bob', iat: nowSec() - 7200, exp: nowSec() - 3600});
      const {c, status} = await handshakeWith(token);
      assert.equal(status.isAuthenticated, false);
      assert.equal(status.authError && status.authError.name, 'AuthTokenExpiredError', short(status.authError));
      await c.waitEvent('removeAuthToken');
      assert.equal(await c.socket.auth.loadToken(c.socket.authTokenName), null);
    }));

    it('token with nbf in the future → AuthTokenNotBeforeError (not a bad token: kept)', tc(async () => {
      const token = signToken({sub: 'carol', nbf: nowSec() + 3600, exp: nowSec() + 7200});
      const {c, status} = await handshakeWith(token);
      assert.equal(status.isAuthenticated, false);
      assert.equal(status.authError && status.authError.name, 'AuthTokenNotBeforeError', short(status.authError));
      // Reference: isBadToken false and no #removeAuthToken (§2). Give a stray one time to arrive.
      await sleep(300);
      assert.equal(c.eventsOf('removeAuthToken').length, 0, 'no #removeAuthToken for a not-yet-valid token');
      assert.equal(await c.socket.auth.loadToken(c.socket.authTokenName), token);
    }));

    it('alg "none" token is rejected (never authenticated)', tc(async () => {
      const token = signToken({sub: 'admin', exp: nowSec() + 3600}, {alg: 'none'});
      const {c, status} = await handshakeWith(token);
      assert.equal(status.isAuthenticated, false);
      assert.equal(c.socket.authState, 'unauthenticated');
      assert.equal(status.authError && status.authError.name, 'AuthTokenInvalidError', short(status.authError));
      await c.waitEvent('removeAuthToken');
    }));

    it('token signed with HS512 while algorithms is [HS256] → AuthTokenInvalidError', tc(async () => {
      const token = signToken({sub: 'ivan', exp: nowSec() + 3600}, {alg: 'HS512'});
      const {c, status} = await handshakeWith(token);
      assert.equal(status.isAuthenticated, false);
      assert.equal(status.authError && status.authError.name, 'AuthTokenInvalidError', short(status.authError));
      await c.waitEvent('removeAuthToken');
    }));

    it('malformed token → AuthTokenInvalidError, #removeAuthToken', tc(async () => {
      const {c, status} = await handshakeWith('not.a.jwt');
      assert.equal(status.isAuthenticated, false);
      assert.equal(status.authError && status.authError.name, 'AuthTokenInvalidError', short(status.authError));
      await c.waitEvent('removeAuthToken');
    }));

    it('socket.authenticate(token) after connect → authenticated, token stored', tc(async () => {
      const c = await connect(target);
      assert.equal(c.socket.authState, 'unauthenticated');
      const token = signToken({sub: 'dave', exp: nowSec() + 3600});
      const t0 = h.stamp();
      const r = await c.socket.authenticate(token);
      assert.equal(r.isAuthenticated, true, short(r));
      assert.ok(r.authError == null, `no authError: ${short(r.authError)}`);
      assert.equal(c.socket.authState, 'authenticated');
      assert.equal(c.socket.authToken.sub, 'dave');
      assert.equal(await c.socket.auth.loadToken(c.socket.authTokenName), token);
      await c.waitEvent('authenticate', {since: t0});
      const resp = tap.of(c.ws, {since: t0, dir: '<'}).find((f) => /"rid"/.test(f.text));
      assert.equal(JSON.parse(resp.text).data.isAuthenticated, true, resp.text);
    }));

    it('a token minted by `shoal token -c <config> --sub alice` authenticates the official client', {skip: IS_REFERENCE ? 'needs the shoal binary and the cluster config' : false}, tc(async () => {
      const {execFileSync} = require('node:child_process');
      const token = execFileSync(process.env.SHOAL_BIN, ['token', '-c', target.configFile, '--sub', 'alice', '--ttl', '10m', '--claim', 'role=admin'],
        {env: {...process.env, [h.AUTH_KEY_ENV]: h.AUTH_KEY}, timeout: 10000}).toString().trim();
      const c = await connect(target);
      const r = await c.socket.authenticate(token);
      assert.equal(r.isAuthenticated, true, short(r));
      assert.equal(c.socket.authToken.sub, 'alice');
      assert.equal(c.socket.authToken.role, 'admin');
      assert.ok(c.socket.authToken.exp - nowSec() <= 600 && c.socket.authToken.exp - nowSec() > 500, `exp ≈ now + 10 min: ${c.socket.authToken.exp}`);
    }));

    it('an authenticated client that reconnects sends its stored token and is authenticated again', tc(async () => {
      const token = signToken({sub: 'judy', exp: nowSec() + 3600});
      const c = await connect(target);
      await c.socket.authenticate(token);
      const t0 = h.stamp();
      c.socket.transport.close(4000, 'compat test: reconnect');
      const status = await c.waitEvent('connect', {since: t0, timeout: 8000});
      const hs = tap.of(c.ws, {since: t0, dir: '>'}).find((f) => f.text.includes('#handshake'));
      assert.equal(JSON.parse(hs.text).data.authToken, token, 'the new handshake carries the stored token');
      assert.equal(status.isAuthenticated, true, short(status));
      assert.equal(c.socket.authState, 'authenticated');
    }));

    it('socket.authenticate(bad token) rejects with AuthTokenInvalidError, stays unauthenticated', tc(async () => {
      const c = await connect(target);
      const bad = signToken({sub: 'eve', exp: nowSec() + 3600}, {key: 'wrong'});
      const err = await c.socket.authenticate(bad).then((v) => assert.fail(`resolved ${short(v)}`), (e) => e);
      assert.equal(err.name, 'AuthTokenInvalidError', `${err.name}: ${err.message}`);
      assert.equal(c.socket.authState, 'unauthenticated');
      await c.waitEvent('removeAuthToken');
      assert.equal(c.socket.state, 'open');
    }));

    it('socket.authenticate(expired token) rejects with AuthTokenExpiredError', tc(async () => {
      const c = await connect(target);
      const expired = signToken({sub: 'eve', iat: nowSec() - 7200, exp: nowSec() - 3600});
      const err = await c.socket.authenticate(expired).then((v) => assert.fail(`resolved ${short(v)}`), (e) => e);
      assert.equal(err.name, 'AuthTokenExpiredError', `${err.name}: ${err.message}`);
      assert.equal(c.socket.authState, 'unauthenticated');
    }));

    it('deauthenticate() → #removeAuthToken transmit, unauthenticated, socket keeps working; reconnect handshake is anonymous', tc(async () => {
      const token = signToken({sub: 'frank', exp: nowSec() + 3600});
      const c = await connect(target);
      await c.socket.authenticate(token);
      assert.equal(c.socket.authState, 'authenticated');
      const t0 = h.stamp();
      await c.socket.deauthenticate();
      assert.equal(c.socket.authState, 'unauthenticated');
      assert.equal(await c.socket.auth.loadToken(c.socket.authTokenName), null);
      const f = tap.of(c.ws, {since: t0, dir: '>'}).find((x) => x.text.includes('#removeAuthToken'));
      assert.ok(f, 'client sent #removeAuthToken');
      await c.subscribe(chan('after-deauth'));
      assert.equal(c.socket.state, 'open');
      // Force a reconnect: the new handshake carries no token and is unauthenticated.
      const t1 = h.stamp();
      c.socket.transport.close(4000, 'compat test: reconnect');
      const status = await c.waitEvent('connect', {since: t1, timeout: 8000});
      assert.equal(status.isAuthenticated, false);
    }));

    it('token expiring while connected: server deauthenticates and sends #removeAuthToken', tc(async () => {
      // exp 2 s ahead; leeway is 1 s in the test config; pongs every 1 s trigger the check.
      const token = signToken({sub: 'gina', exp: nowSec() + 2});
      const c = await connect(target);
      await c.socket.authenticate(token);
      assert.equal(c.socket.authState, 'authenticated');
      await c.waitEvent('removeAuthToken', {timeout: 10000});
      assert.equal(c.socket.authState, 'unauthenticated');
      assert.equal(c.socket.state, 'open', 'socket stays connected');
    }));

    it('waitForAuth channel: no #subscribe until authenticated, then subscribed and receiving', tc(async () => {
      const ch = chan('wfa');
      const c = await connect(target);
      const pub = await connect(target);
      const t0 = h.stamp();
      const e = await c.subscribe(ch, {waitForAuth: true}, {wait: false});
      await sleep(300); // observation window: nothing may be sent
      assert.equal(e.channel.state, 'pending');
      assert.equal(tap.of(c.ws, {since: t0, dir: '>'}).filter((f) => f.text.includes('#subscribe')).length, 0, 'no #subscribe before auth');
      await c.socket.authenticate(signToken({sub: 'henry', exp: nowSec() + 3600}));
      await waitFor(() => e.channel.state === 'subscribed', {what: `waitForAuth channel subscribed (state ${e.channel.state}; ${c.eventSummary()})`});
      const sf = tap.of(c.ws, {since: t0, dir: '>'}).find((f) => f.text.includes('#subscribe'));
      assert.equal(JSON.parse(sf.text).data.waitForAuth, true);
      await pub.socket.invokePublish(ch, 'for authenticated eyes');
      await waitFor(() => e.messages.length === 1, {what: 'message on the waitForAuth channel'});
      assert.deepEqual(e.messages, ['for authenticated eyes']);
    }));
  });

  // Sizes (§1 maxPayload).
  it('a 512 KiB message is delivered intact to a subscriber on the other worker', tc(async () => {
    const ch = chan('big');
    const pub = await connect(target);
    const sub = await connect(target);
    await onBothWorkers(); // publisher and subscriber on different workers
    const e = await sub.subscribe(ch);
    // 512 KiB of text with characters JSON must escape, multi-byte UTF-8 and random base64.
    const chunk = crypto.randomBytes(3000).toString('base64') + '"\\\n\t/ünï😀';
    let s = '';
    while (s.length < 512 * 1024) s += chunk;
    s = s.slice(0, 512 * 1024);
    const digest = crypto.createHash('sha256').update(s).digest('hex');
    await pub.socket.invokePublish(ch, {blob: s, digest});
    await waitFor(() => e.messages.length === 1, {timeout: 10000, what: '512 KiB message'});
    const got = e.messages[0];
    assert.equal(got.blob.length, s.length);
    assert.equal(crypto.createHash('sha256').update(got.blob).digest('hex'), digest, 'content identical');
    assert.equal(got.digest, digest);
  }));

  for (const [label, size] of [['1 MiB + 1 KiB', 1024 * 1024 + 1024], ['8 MiB', 8 * 1024 * 1024]]) {
    it(`an oversized frame (${label} > max_payload 1 MiB) closes that socket with 1009; another client is unaffected`, tc(async () => {
      const ch = chan('bystander');
      const big = await connect(target, {autoReconnect: false});
      const other = await connect(target);
      const e = await other.subscribe(ch);
      const otherId = other.socket.id;
      const t0 = h.stamp();
      big.socket.transmit('huge', 'x'.repeat(size));
      const d = await big.waitEvent('close', {since: t0, timeout: 8000});
      assert.equal(d.code, 1009, `close code ${d.code} (${d.reason})`);
      // The bystander is still connected, same session, and still receives.
      await other.socket.invokePublish(ch, 'still here');
      await waitFor(() => e.messages.includes('still here'), {what: 'bystander still receives'});
      assert.equal(other.socket.state, 'open');
      assert.equal(other.socket.id, otherId);
      assert.equal(other.eventsOf('disconnect').length, 0, other.eventSummary());
    }));
  }

  it('a message just under max_payload (~1000 KiB frame) is accepted', tc(async () => {
    const ch = chan('near-limit');
    const c = await connect(target);
    const e = await c.subscribe(ch);
    const s = 'y'.repeat(1000 * 1024);
    await c.socket.invokePublish(ch, s);
    await waitFor(() => e.messages.length === 1, {timeout: 10000, what: 'near-limit message'});
    assert.equal(e.messages[0].length, s.length);
    assert.equal(c.socket.state, 'open');
  }));

  // §2/§3 server-side timeouts and strictness, with a raw WebSocket.
  describe('raw protocol (ws package)', () => {
    it('no #handshake within handshake_timeout (2 s) → close 4005', tc(async () => {
      const r = await rawSocket(target);
      const ci = await r.closed(6000);
      assert.equal(ci.code, 4005, short(ci));
    }));

    it('an event before #handshake → close 4009 (strict handshake)', tc(async () => {
      const r = await rawSocket(target);
      r.sendJSON({event: 'hello', data: 1});
      const ci = await r.closed(4000);
      assert.equal(ci.code, 4009, short(ci));
    }));

    it('#handshake without a numeric cid → close 4008', tc(async () => {
      const r = await rawSocket(target);
      r.sendJSON({event: '#handshake', data: {authToken: null}});
      const ci = await r.closed(4000);
      assert.equal(ci.code, 4008, short(ci));
    }));

    it('handshake response: numeric rid = cid, data {id, pingTimeout, isAuthenticated}; cid > 1 accepted', tc(async () => {
      const r = await rawSocket(target);
      const resp = await r.handshake(null, 17);
      assert.equal(resp.rid, 17);
      assert.equal(typeof resp.data.id, 'string');
      assert.equal(resp.data.pingTimeout, 3000);
      assert.equal(resp.data.isAuthenticated, false);
      assert.equal(resp.error, undefined);
    }));

    it('no pongs → server closes with 4001 after pingTimeout', tc(async () => {
      const r = await rawSocket(target);
      await r.handshake();
      const t0 = h.stamp();
      const ci = await r.closed(8000);
      assert.equal(ci.code, 4001, short(ci));
      const waited = ci.t - t0;
      assert.ok(waited >= 2000, `closed after ${waited} ms (≥ ~pingTimeout)`);
    }));

    it('batched array frame: packets are processed in order, each answered', tc(async () => {
      const r = (await rawSocket(target)).autoPong();
      await r.handshake();
      const ch = chan('batch');
      r.send(JSON.stringify([
        {event: '#subscribe', data: {channel: ch}, cid: 2},
        {event: '#publish', data: {channel: ch, data: 'b1'}, cid: 3},
        {event: '#publish', data: {channel: ch, data: 'b2'}}
      ]));
      const r2 = await r.response(2);
      const r3 = await r.response(3);
      assert.equal(r2.error, undefined, short(r2));
      assert.equal(r3.error, undefined, short(r3));
      await waitFor(() => r.packets().filter((p) => p.event === '#publish').length === 2, {what: 'both published messages back'});
      const pubs = r.packets().filter((p) => p.event === '#publish');
      assert.deepEqual(pubs.map((p) => p.data.data), ['b1', 'b2']);
      for (const p of pubs) assert.equal(p.cid, undefined, '#publish to a client carries no cid');
    }));

    it('#subscribe with a non-string channel → error response (InvalidActionError), socket stays', tc(async () => {
      const r = (await rawSocket(target)).autoPong();
      await r.handshake();
      r.sendJSON({event: '#subscribe', data: {channel: {not: 'a string'}}, cid: 2});
      const resp = await r.response(2);
      assert.ok(resp.error && typeof resp.error === 'object', `error object: ${short(resp)}`);
      assert.equal(typeof resp.error.message, 'string');
      assert.equal(typeof resp.error.name, 'string');
      r.sendJSON({event: '#subscribe', data: {channel: 'ok-after-bad'}, cid: 3});
      const ok = await r.response(3);
      assert.equal(ok.error, undefined);
    }));

    it('#subscribe carrying unknown keys (legacy batch:true) is accepted', tc(async () => {
      const r = (await rawSocket(target)).autoPong();
      await r.handshake();
      r.sendJSON({event: '#subscribe', data: {channel: chan('legacy'), batch: true, whatever: [1]}, cid: 2});
      const resp = await r.response(2);
      assert.equal(resp.error, undefined, short(resp));
    }));

    it('envelope variations: key order, whitespace, escaped event name and channel are understood', tc(async () => {
      const r = (await rawSocket(target)).autoPong();
      await r.handshake();
      r.send('{"cid":2,"data":{"channel":"env-a"},"event":"#subscribe"}');
      r.send(' \n{ "event" : "#subscribe" , "data" : { "channel" : "env-b" } , "cid" : 3 }\n');
      r.send('{"event":"\\u0023subscribe","data":{"channel":"env-\\u0063"},"cid":4}');
      for (const rid of [2, 3, 4]) {
        const resp = await r.response(rid);
        assert.equal(resp.error, undefined, `rid ${rid}: ${short(resp)}`);
      }
      r.send('{"data":{"data":"pa","channel":"env-a"},"event":"#publish"}');
      r.send('{"event":"#publish","data":{"channel":"env-\\u0063","data":"pc"},"cid":5}');
      await r.response(5);
      await waitFor(() => r.packets().filter((p) => p.event === '#publish').length === 2, {what: 'two #publish back'});
      const got = r.packets().filter((p) => p.event === '#publish').map((p) => [p.data.channel, p.data.data]).sort();
      assert.deepEqual(got, [['env-a', 'pa'], ['env-c', 'pc']]);
    }));

    it('#unsubscribe as an invoke is answered; delivery stops', tc(async () => {
      const r = (await rawSocket(target)).autoPong();
      await r.handshake();
      const ch = chan('unsub-invoke');
      r.sendJSON({event: '#subscribe', data: {channel: ch}, cid: 2});
      await r.response(2);
      r.sendJSON({event: '#unsubscribe', data: ch, cid: 3});
      const resp = await r.response(3);
      assert.equal(resp.error, undefined, short(resp));
      const p = await connect(target);
      const b = await connect(target);
      const eb = await b.subscribe(ch);
      await p.socket.invokePublish(ch, 'after');
      await waitFor(() => eb.messages.length === 1, {what: 'control subscriber got it'});
      await sleep(300); // observation window
      assert.equal(r.packets().filter((x) => x.event === '#publish').length, 0, 'nothing delivered after the invoke-form unsubscribe');
    }));

    it('#subscribe sent as a transmit (no cid) subscribes nothing (as the official server)', tc(async () => {
      const r = (await rawSocket(target)).autoPong();
      await r.handshake();
      const ch = chan('sub-transmit');
      r.sendJSON({event: '#subscribe', data: {channel: ch}});
      r.sendJSON({event: '#subscribe', data: {channel: chan('barrier')}, cid: 2});
      await r.response(2);
      const p = await connect(target);
      const b = await connect(target);
      const eb = await b.subscribe(ch);
      await p.socket.invokePublish(ch, 'x');
      await waitFor(() => eb.messages.length === 1, {what: 'control subscriber got it'});
      await sleep(300); // observation window
      assert.equal(r.packets().filter((x) => x.event === '#publish').length, 0, 'a transmit #subscribe must not subscribe');
    }));

    it('upgrade on a path other than listen.path is refused (HTTP 4xx, no WebSocket)', tc(async () => {
      const r = new h.RawSocket(target, {path: '/not-socketcluster/'});
      const ci = await r.closed(5000);
      assert.ok(r.httpStatus >= 400 && r.httpStatus < 500, `HTTP status ${r.httpStatus} (${short(ci)})`);
    }));

    it('no subprotocol required or echoed; any Origin accepted with the default origins ["*"]', tc(async () => {
      const r = await rawSocket(target, {headers: {Origin: 'http://some-page.example:1234'}});
      assert.equal(r.ws.protocol, '', 'no Sec-WebSocket-Protocol in the answer');
      const resp = await r.handshake();
      assert.equal(resp.error, undefined);
    }));

    it('a binary frame holding a JSON packet is decoded like text (as the official server does)', tc(async () => {
      const r = (await rawSocket(target)).autoPong();
      await r.handshake();
      r.send(Buffer.from(JSON.stringify({event: '#subscribe', data: {channel: chan('binary')}, cid: 2})), {binary: true});
      const resp = await r.response(2);
      assert.equal(resp.error, undefined, short(resp));
      assert.ok(r.messages.every((m) => !m.binary), 'the server sends text frames only');
    }));

    it('socket_channel_limit (50 in this config): the 51st #subscribe gets an error response', tc(async () => {
      const r = (await rawSocket(target)).autoPong();
      await r.handshake();
      const base = chan('limit');
      r.send(JSON.stringify(Array.from({length: 51}, (_, i) => ({event: '#subscribe', data: {channel: `${base}-${i}`}, cid: i + 2}))));
      const resps = [];
      for (let i = 0; i < 51; i++) resps.push(await r.response(i + 2));
      const errs = resps.filter((x) => x.error);
      assert.equal(errs.length, 1, `exactly one subscribe refused: ${short(errs)}`);
      assert.equal(errs[0].rid, 52, 'the 51st');
      assert.equal(typeof errs[0].error.message, 'string');
      assert.equal(typeof errs[0].error.name, 'string');
      // Unsubscribing one frees a slot.
      r.sendJSON({event: '#unsubscribe', data: `${base}-0`});
      r.sendJSON({event: '#subscribe', data: {channel: `${base}-50`}, cid: 60});
      const again = await r.response(60);
      assert.equal(again.error, undefined, short(again));
    }));

    it('garbage frames crash nothing: no process restarts, a normal client still works', tc(async () => {
      const before = IS_REFERENCE ? null : await target.processes();
      const deep = (n) => '['.repeat(n) + ']'.repeat(n);
      const garbage = [
        'not json at all', '{', '{"event":', '}{', '[', '[]', '[1,2,null]', 'null', '123', '"str"', 'true',
        '{}', '{"data":1}', '{"event":123,"data":1,"cid":9}', '{"event":null,"cid":10}', '{"event":"","cid":11}',
        '{"event":"x","cid":"12"}', '{"rid":99999,"data":1}', '{"rid":"x"}',
        deep(1000), deep(100000), `{"event":"deep","data":${deep(50000)},"cid":13}`,
        '{"event":"#subscribe","data":null,"cid":14}', '{"event":"#subscribe","data":"chan","cid":15}',
        '{"event":"#subscribe","cid":16}', '{"event":"#unsubscribe","data":{"x":1}}', '{"event":"#unsubscribe"}',
        '{"event":"#publish","data":"notobject","cid":17}', '{"event":"#publish","data":{"channel":5},"cid":18}',
        '{"event":"#publish","cid":19}', '{"event":"#authenticate","data":123,"cid":20}', '{"event":"#authenticate","cid":21}',
        '{"event":"#removeAuthToken","data":{"a":1}}', '{"event":"#handshake","data":{"authToken":null},"cid":22}',
        '{"event":"x","cid":1e400}', '{"event":"x","cid":123456789012345678901234567890}', '{"event":"x","cid":-1}',
        '{"event":"x","cid":1.5}', '{"event":"#publish","data":{"channel":"g","data":1e999}}',
        `{"event":"#publish","data":{"channel":"g","data":${'9'.repeat(5000)}}}`,
        '{"event":"x","data":"\\ud800"}', '{"event":"x","data":"\u0000"}', ' \n\t ', '#2', '#1', '""',
        '{"event":"#setAuthToken","data":{"token":"x"}}', '{"event":"#kickOut","data":{"channel":"g"}}',
        '[{"event":"#subscribe","data":{"channel":"g"},"cid":23},"junk",7,{"rid":1}]'
      ];
      // Several raw sockets, each handshaken, each fed a share of the garbage (a
      // socket the server closes for misbehaving is allowed; a crash is not).
      const outcomes = [];
      for (let i = 0; i < garbage.length; i += 8) {
        const r = (await rawSocket(target)).autoPong();
        await r.handshake();
        for (const g of garbage.slice(i, i + 8)) {
          if (r.ws.readyState !== h.WebSocket.OPEN) break;
          r.send(g);
        }
        // Binary frames: a JSON packet and random bytes.
        if (r.ws.readyState === h.WebSocket.OPEN) r.send(Buffer.from('{"event":"bin","data":1}'), {binary: true});
        if (r.ws.readyState === h.WebSocket.OPEN) r.send(crypto.randomBytes(1024), {binary: true});
        // Invalid UTF-8 in a text frame.
        if (r.ws.readyState === h.WebSocket.OPEN) r.send(Buffer.from([0x7b, 0xff, 0xfe, 0x7d]), {binary: false});
        outcomes.push(r);
      }
      // Raw TCP garbage on the public port: not HTTP, and a bogus upgrade.
      for (const payload of [crypto.randomBytes(4096), Buffer.from('GET /socketcluster/ HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: !!!\r\n\r\n')]) {
        await new Promise((resolve) => {
          const s = net.connect(target.port, target.host, () => s.end(payload));
          s.on('error', resolve);
          s.on('close', resolve);
          s.setTimeout(3000, () => s.destroy());
          s.resume();
        });
      }
      // A WebSocket frame header announcing 2^62 bytes, then hang up.
      {
        const r = await rawSocket(target);
        r.ws._socket.write(Buffer.from([0x81, 0xff, 0x3f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 1, 2, 3, 4]));
        await r.closed(5000).catch(() => r.close());
      }
      await sleep(500); // let the server chew on everything
      // A normal client still works end to end (on both workers: two clients).
      const ch = chan('after-garbage');
      const a = await connect(target);
      const b = await connect(target);
      const eb = await b.subscribe(ch);
      await a.socket.invokePublish(ch, 'alive');
      await waitFor(() => eb.messages.includes('alive'), {what: 'publish after garbage'});
      if (!IS_REFERENCE) {
        const after = await target.processes();
        for (const p of before) {
          const q = after.find((x) => x.name === p.name);
          assert.ok(q, `${p.name} still listed`);
          assert.equal(q.pid, p.pid, `${p.name} was not restarted (pid ${p.pid} → ${q.pid})`);
          assert.equal(q.restarts, p.restarts, `${p.name} restart count unchanged`);
          assert.equal(q.state, 'ready', `${p.name} still ready`);
        }
        const log = target.logTail(400);
        assert.doesNotMatch(log, /panic:|goroutine \d+ \[running\]/, 'no panic in the cluster log');
      }
      const open = outcomes.filter((r) => r.ws.readyState === h.WebSocket.OPEN).length;
      console.log(`# garbage: ${open}/${outcomes.length} garbage-sending sockets were left open; close codes of the others: ${outcomes.filter((r) => r.closeInfo).map((r) => r.closeInfo.code).join(',') || '-'}`);
    }));
  });

  // docs/connecting.md: the Node example must work as written (host and port substituted).
  it('docs/connecting.md Node example runs against the target', tc(async () => {
    const fs = require('node:fs');
    const path = require('node:path');
    const {execFile} = require('node:child_process');
    const doc = fs.readFileSync(path.join(__dirname, '..', '..', '..', 'docs', 'connecting.md'), 'utf8');
    const m = doc.match(/<!-- compat:node-example[^>]*-->\s*```js\n([\s\S]*?)```/);
    assert.ok(m, 'docs/connecting.md has a compat:node-example js block');
    const code = m[1].replace("hostname: 'localhost'", `hostname: '${target.host}'`).replace('port: 8000', `port: ${target.port}`);
    assert.notEqual(code, m[1], 'hostname/port substituted');
    const file = path.join(target.dir, 'docs-example.js');
    fs.writeFileSync(file, code);
    const out = await new Promise((resolve, reject) => {
      execFile(process.execPath, [file], {
        timeout: 20000,
        env: {...process.env, SHOAL_AUTH_KEY: h.AUTH_KEY, NODE_PATH: path.join(__dirname, '..', 'node_modules')}
      }, (err, stdout, stderr) => (err ? reject(new Error(`example failed: ${err.message}\nstdout:\n${stdout}\nstderr:\n${stderr}`)) : resolve(stdout)));
    });
    assert.match(out, /^connected as \S+$/m, out);
    assert.match(out, /^authenticated as alice$/m, out);
    assert.match(out, /^chat\/lobby: \{ from: 'alice', text: 'hello' \}$/m, out);
    assert.match(out, /^invoke getProfile: \S+$/m, out);
    assert.doesNotMatch(out, /TimeoutError/, out);
  }));

  // docs/connecting.md: the browser example in headless Chromium, when one is installed.
  const chromium = ['chromium', 'chromium-browser', 'google-chrome'].map((b) => {
    for (const dir of (process.env.PATH || '').split(':')) {
      const f = require('node:path').join(dir, b);
      if (require('node:fs').existsSync(f)) return f;
    }
    return null;
  }).find(Boolean);
  it('docs/connecting.md browser example runs in headless Chromium', {skip: chromium ? false : 'no chromium on PATH (apt-get install chromium to run it)', timeout: 60000}, tc(async () => {
    const fs = require('node:fs');
    const path = require('node:path');
    const http = require('node:http');
    const {spawn} = require('node:child_process');
    const doc = fs.readFileSync(path.join(__dirname, '..', '..', '..', 'docs', 'connecting.md'), 'utf8');
    const m = doc.match(/```html\n([\s\S]*?)```/);
    assert.ok(m, 'docs/connecting.md has an html block');
    const page = m[1].replace('port: 8000', `port: ${target.port}`);
    const lib = fs.readFileSync(path.join(__dirname, '..', 'node_modules', 'socketcluster-client', 'socketcluster-client.min.js'));
    const srv = http.createServer((req, res) => {
      if (req.url === '/socketcluster-client.min.js') { res.writeHead(200, {'content-type': 'text/javascript'}); res.end(lib); return; }
      res.writeHead(200, {'content-type': 'text/html'});
      res.end(page);
    });
    await new Promise((r) => srv.listen(0, '127.0.0.1', r));
    const profile = fs.mkdtempSync(path.join(target.dir, 'chromium-'));
    // Real time, not virtual time: Chromium exposes the DevTools protocol and
    // the test polls the page's log list through it until the example is done.
    const proc = spawn(chromium, ['--headless', '--no-sandbox', '--disable-gpu', '--no-first-run', `--user-data-dir=${profile}`,
      '--remote-debugging-address=127.0.0.1', '--remote-debugging-port=0', `http://localhost:${srv.address().port}/`],
    {stdio: 'ignore', detached: true});
    let cdp;
    try {
      const port = await waitFor(() => {
        try { return Number(fs.readFileSync(path.join(profile, 'DevToolsActivePort'), 'utf8').split('\n')[0]) || false; } catch (_) { return false; }
      }, {timeout: 20000, interval: 100, what: 'chromium DevToolsActivePort'});
      const pageUrl = await waitFor(async () => {
        const list = await (await fetch(`http://127.0.0.1:${port}/json/list`)).json();
        const pg = list.find((x) => x.type === 'page' && x.url.startsWith('http://localhost'));
        return pg && pg.webSocketDebuggerUrl;
      }, {timeout: 10000, interval: 100, what: 'chromium page target'});
      cdp = new h.WebSocket(pageUrl, {perMessageDeflate: false});
      await new Promise((resolve, reject) => { cdp.once('open', resolve); cdp.once('error', reject); });
      let seq = 0;
      const evaluate = (expression) => new Promise((resolve, reject) => {
        const id = ++seq;
        const onMsg = (d) => {
          const msg = JSON.parse(d.toString());
          if (msg.id !== id) return;
          cdp.off('message', onMsg);
          if (msg.error) reject(new Error(JSON.stringify(msg.error)));
          else resolve(msg.result.result.value);
        };
        cdp.on('message', onMsg);
        cdp.send(JSON.stringify({id, method: 'Runtime.evaluate', params: {expression, returnByValue: true}}));
      });
      let items = [];
      await waitFor(async () => {
        items = await evaluate("[...document.querySelectorAll('#log li')].map((li) => li.textContent)") || [];
        return items.includes('browser: hi');
      }, {timeout: 20000, interval: 100, what: `the page to log "browser: hi" (page log so far: ${short(items)})`});
      assert.ok(items.some((x) => /^connected as \S+ \(authenticated: false\)$/.test(x)), `page log: ${short(items)}`);
      assert.ok(!items.some((x) => x.startsWith('error')), `no errors on the page: ${short(items)}`);
    } finally {
      if (cdp) cdp.terminate();
      try { process.kill(-proc.pid, 'SIGKILL'); } catch (_) {}
      srv.close();
      srv.closeAllConnections();
    }
  }));

  // §5 re-subscribe after reconnect.
  it('reconnect (client-side close) restores subscriptions and delivery', tc(async () => {
    const ch = chan('resub');
    const c = await connect(target);
    const pub = await connect(target);
    const e = await c.subscribe(ch);
    await pub.socket.invokePublish(ch, 'one');
    await waitFor(() => e.messages.length === 1, {what: 'first message'});
    const oldId = c.socket.id;
    const oldWs = c.ws;
    const t0 = h.stamp();
    c.socket.transport.close(4000, 'compat test: forced reconnect'); // client reconnects at once on 4000
    await c.waitEvent('connect', {since: t0, timeout: 8000});
    assert.notEqual(c.ws, oldWs, 'a new transport');
    assert.notEqual(c.socket.id, oldId, 'a new session id');
    await waitFor(() => e.channel.state === 'subscribed', {what: `resubscribed (state ${e.channel.state}; ${c.eventSummary()})`});
    const resub = tap.of(c.ws, {since: t0, dir: '>'}).filter((f) => f.text.includes('#subscribe') && f.text.includes(ch));
    assert.equal(resub.length, 1, 'the client re-sent #subscribe once on the new connection');
    await pub.socket.invokePublish(ch, 'two');
    await waitFor(() => e.messages.includes('two'), {what: 'message after reconnect'});
    assert.deepEqual(e.messages, ['one', 'two']);
  }));

  it('cluster: SIGKILL of the worker holding the client → worker restarted, client reconnects, resubscribes, receives', {skip: CLUSTER_ONLY}, tc(async (t) => {
    const ch = chan('killed-worker');
    // Only this client is connected (every other test closed its sockets).
    await waitFor(async () => (await target.processes()).filter((p) => p.role === 'worker').every((w) => w.connections === 0),
      {timeout: 8000, interval: 100, what: 'admin API: no connections left from earlier tests'});
    const c = await connect(target, {autoReconnectOptions: {initialDelay: 100, randomness: 100, multiplier: 1, maxDelay: 500}});
    const e = await c.subscribe(ch);
    const workers = await waitFor(async () => {
      const ws = (await target.processes()).filter((p) => p.role === 'worker');
      return ws.some((w) => w.connections === 1) && ws;
    }, {timeout: 5000, interval: 100, what: 'admin API: the worker holding the client'});
    const victim = workers.find((w) => w.connections === 1);
    t.diagnostic(`killing ${victim.name} pid ${victim.pid}`);
    const t0 = h.stamp();
    process.kill(victim.pid, 'SIGKILL');
    await c.waitEvent('disconnect', {since: t0, timeout: 5000});
    await c.waitEvent('connect', {since: t0, timeout: 15000});
    await waitFor(() => e.channel.state === 'subscribed', {timeout: 5000, what: 'resubscribed after worker kill'});
    // The supervisor restarted the worker (issue 2: within 1 s).
    const restarted = await waitFor(async () => {
      const q = (await target.processes()).find((p) => p.name === victim.name);
      return q && q.pid !== victim.pid && q.state === 'ready' && q;
    }, {timeout: 10000, interval: 100, what: `${victim.name} restarted with a new pid and ready`});
    assert.ok(restarted.restarts >= victim.restarts + 1, `restart count grew (${victim.restarts} → ${restarted.restarts})`);
    const pub = await connect(target);
    await pub.socket.invokePublish(ch, 'after kill');
    await waitFor(() => e.messages.includes('after kill'), {what: 'message after worker kill'});
    await target.waitAllReady();
  }));
  it('cluster: SIGKILL of a broker → delivery resumes on every channel, then exactly once and in order again', {skip: CLUSTER_ONLY, timeout: 60000}, tc(async (t) => {
    const chans = Array.from({length: 8}, () => chan('broker-kill'));
    const subs = [await connect(target), await connect(target)];
    const pub = await connect(target);
    const entries = [];
    for (const s of subs) for (const ch of chans) entries.push({ch, e: await s.subscribe(ch)});
    const brokers = (await target.processes()).filter((p) => p.role === 'broker');
    assert.ok(brokers.length >= 2, 'two brokers');
    const victim = brokers[0];
    t.diagnostic(`killing ${victim.name} pid ${victim.pid}`);
    const t0 = Date.now();
    process.kill(victim.pid, 'SIGKILL');
    // Publish rounds until every subscriber has a post-kill message on every channel.
    let round = 0;
    await waitFor(async () => {
      round++;
      for (const ch of chans) pub.socket.transmitPublish(ch, {round});
      await pub.socket.invokePublish(chans[0], {round, probe: true}).catch(() => {});
      return entries.every(({e}) => e.messages.some((m) => m && m.round));
    }, {timeout: 20000, interval: 200, what: `delivery on all ${chans.length} channels after the broker kill (${entries.filter(({e}) => e.messages.some((m) => m && m.round)).length}/${entries.length} have some)`});
    t.diagnostic(`delivery resumed on every channel ${Date.now() - t0} ms after the kill (${round} rounds)`);
    const restarted = await waitFor(async () => {
      const q = (await target.processes()).find((p) => p.name === victim.name);
      return q && q.pid !== victim.pid && q.state === 'ready' && q;
    }, {timeout: 15000, interval: 100, what: `${victim.name} restarted and ready`});
    assert.ok(restarted.restarts >= 1);
    await target.waitAllReady();
    // Steady state again: a fresh batch arrives exactly once, in order, everywhere.
    // (Wait until a probe round trip shows the ring settled: every subscriber sees it.)
    let probe = 0;
    await waitFor(async () => {
      probe++;
      for (const ch of chans) await pub.socket.invokePublish(ch, {settle: probe});
      await sleep(100);
      return entries.every(({e}) => e.messages.some((m) => m && m.settle === probe));
    }, {timeout: 15000, interval: 200, what: 'ring settled after the broker restart'});
    const mark = entries.map(({e}) => e.messages.length);
    const N = 30;
    for (let i = 0; i < N; i++) for (const ch of chans) pub.socket.transmitPublish(ch, {after: i});
    for (const ch of chans) await pub.socket.invokePublish(ch, {after: 'end'});
    for (const [k, {ch, e}] of entries.entries()) {
      await waitFor(() => e.messages.slice(mark[k]).some((m) => m && m.after === 'end'), {timeout: 10000, what: `end marker on ${ch}`});
      const got = e.messages.slice(mark[k]).filter((m) => m && m.after !== undefined).map((m) => m.after);
      assert.deepEqual(got, [...Array.from({length: N}, (_, i) => i), 'end'], `after recovery, ${ch}: exactly once, in order`);
    }
  }));
});
