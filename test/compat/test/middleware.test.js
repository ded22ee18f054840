'use strict';
// Middleware rules (docs/middleware.md) seen by the official client, one
// stage after the other, against one cluster (one worker, so the rate test's
// two sockets share it). A small HTTP backend started here answers the
// connect, transmit, rpc and publishOut hooks.
//
// Stage → what the client sees (protocol reference §7):
//   handshakeWS  cidr / origins / ban by address: HTTP status, no WebSocket
//   handshakeSC  ban / jwt / conn_limit / connect hook: error, then close
//   transmit     hook sees it, a deny is silent, the socket stays
//   invoke       rate: RateLimitError; rpc hook: the backend's answer
//   subscribe    channels: subscribeFail with the configured name/message
//   publishIn    channels deny / max_payload: the invoke's error
//   authenticate jwt required_claims: authenticate() rejects, unauthenticated
//   publishOut   outbound hook: that socket does not get the message
const {describe, it, before, after} = require('node:test');
const assert = require('node:assert/strict');
const http = require('node:http');
const h = require('../lib/harness');
const {connect, sleep, short, signToken, nowSec, waitFor} = h;

let target;
let backend;
const seen = {connect: [], transmit: [], rpc: [], out: []};
const tc = (fn) => h.wrap(() => target, fn);

// startBackend answers the hooks: POST /connect, /transmit, /rpc, /out.
async function startBackend() {
  const srv = http.createServer((req, res) => {
    let body = '';
    req.on('data', (d) => { body += d; });
    req.on('end', () => {
      let j = {};
      try { j = JSON.parse(body); } catch (_) {}
      let reply = {};
      switch (req.url) {
        case '/connect':
          seen.connect.push(j);
          if (j.user === 'hooked-out') reply = {error: {name: 'NotMemberError', message: 'hooked-out is not a member', code: 4502}};
          break;
        case '/transmit':
          seen.transmit.push(j);
          if (j.method === 'forbidden') reply = {error: {name: 'ForbiddenError', message: 'no'}};
          break;
        case '/rpc':
          seen.rpc.push(j);
          if (j.method === 'rpc.fail') reply = {error: {name: 'LookupError', message: `no such thing: ${JSON.stringify(j.data)}`}};
          else reply = {result: {data: {echo: j.data, user: j.user || null}}};
          break;
        case '/out':
          seen.out.push(j);
          if (j.user === 'nosy') reply = {error: {name: 'ForbiddenError', message: 'not for you'}};
          break;
        default:
          res.statusCode = 404;
      }
      res.setHeader('content-type', 'application/json');
      res.end(JSON.stringify(reply));
    });
  });
  await new Promise((resolve) => srv.listen(0, '127.0.0.1', resolve));
  return srv;
}

function middlewareYaml(hook) {
  return `middleware:
  handshake:
    - cidr: {deny: ["127.0.0.3/32"], error: {status: 401}}
    - origins: {allow: ["http://good.example"]}
    - ban: {error: {name: BannedError, message: "You are banned, {user}", code: 4503}}
    - jwt: {require: false, algorithms: [HS256]}
    - conn_limit: {per_user: 2}
    - hook: {url: "${hook}/connect", actions: [connect], timeout: 2s}
  inbound:
    - rate: {per_socket: 20/s, burst: 20, actions: [invoke]}
    - max_payload: {bytes: 1KiB, actions: [publishIn]}
    - channels:
        - match: "private/**"
          subscribe: {require: authenticated}
          error: {name: AuthError, message: "Cannot subscribe to {channel} without authentication"}
        - match: "readonly/**"
          publish: deny
          error: {name: InvalidActionError, message: "Clients cannot publish to {channel}"}
    - jwt: {required_claims: [role]}
    - hook: {url: "${hook}/transmit", actions: [transmit], timeout: 2s}
    - rpc: {url: "${hook}/rpc", procedures: ["rpc.*"], timeout: 2s}
  outbound:
    - hook: {url: "${hook}/out", channels: ["filtered/*"], timeout: 2s}
`;
}

// withToken connects an official client that sends token in its handshake.
async function withToken(token, opts = {}) {
  const c = await connect(target, {autoConnect: false, autoReconnect: false, ...opts}, {wait: false});
  await c.socket.auth.saveToken(c.socket.authTokenName, token);
  c.socket.connect();
  return c;
}

const tok = (sub, extra = {}) => signToken({sub, role: 'user', exp: nowSec() + 3600, ...extra});

// refusedHandshake waits for a client's handshake to fail and returns the
// error and close code it saw.
async function refusedHandshake(c) {
  const err = await c.waitEvent('error', {timeout: 5000});
  const cl = await c.waitEvent('close', {timeout: 5000});
  assert.notEqual(c.socket.state, 'open');
  return {error: err.error, code: cl.code};
}

// rawUpgrade tries a WebSocket upgrade (from localAddress, with headers)
// and resolves with the HTTP status of a refusal, or 101.
function rawUpgrade({localAddress, headers} = {}) {
  return new Promise((resolve, reject) => {
    const ws = new h.WebSocket(target.url, [], {localAddress, headers});
    const timer = setTimeout(() => { ws.terminate(); reject(new Error('upgrade timed out')); }, 5000);
    ws.on('unexpected-response', (req, res) => {
      let body = '';
      res.on('data', (d) => { body += d; });
      res.on('end', () => { clearTimeout(timer); resolve({status: res.statusCode, body}); });
    });
    ws.on('open', () => { clearTimeout(timer); ws.terminate(); resolve({status: 101}); });
    ws.on('error', () => {});
  });
}

const pct = (arr, p) => {
  const s = [...arr].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor(p * s.length))];
};

describe(`middleware rules with the official client against ${h.TARGET}`, {timeout: 120000, skip: h.IS_REFERENCE && 'shoal middleware config'}, () => {
  before(async () => {
    backend = await startBackend();
    const hook = `http://127.0.0.1:${backend.address().port}`;
    target = await h.startTarget({name: 'middleware', workers: 1, brokers: 1, extraYaml: middlewareYaml(hook)});
    console.log(`# ${target.kind} middleware target ready in ${target.readyAfterMs} ms on ${target.url}`);
  });
  after(async () => {
    h.closeAll();
    if (backend) backend.close();
    if (!target) return;
    if (h.state.failures > 0) target.printLogs(`${h.state.failures} test(s) failed`);
    await target.stop();
  });

  // ---- handshake ----------------------------------------------------------

  it('handshakeWS cidr: an address in the deny list gets HTTP 401, no WebSocket', tc(async () => {
    const r = await rawUpgrade({localAddress: '127.0.0.3'});
    assert.equal(r.status, 401, short(r));
    assert.match(r.body, /127\.0\.0\.3/);
    assert.equal((await rawUpgrade({localAddress: '127.0.0.5'})).status, 101);
  }));

  it('handshakeWS origins: a foreign Origin gets HTTP 403; the allowed one and none pass', tc(async () => {
    assert.equal((await rawUpgrade({headers: {Origin: 'http://evil.example'}})).status, 403);
    assert.equal((await rawUpgrade({headers: {Origin: 'http://good.example'}})).status, 101);
    const c = await connect(target); // the official client in Node sends no Origin
    assert.equal(c.socket.state, 'open');
  }));

  it('ban rule: a user banned through the API is refused with the custom error and close code; an address at the upgrade', tc(async () => {
    let r = await target.api('ban', {user: 'mallory', reason: 'spam'});
    assert.equal(r.status, 200, short(r.body));
    const c = await withToken(tok('mallory'));
    const {error, code} = await refusedHandshake(c);
    assert.equal(error.name, 'BannedError', short(error));
    assert.equal(error.message, 'You are banned, mallory');
    assert.equal(code, 4503);
    r = await target.api('ban', {ip: '127.0.0.4/32', reason: 'flood'});
    assert.equal(r.status, 200, short(r.body));
    assert.equal((await rawUpgrade({localAddress: '127.0.0.4'})).status, 403);
    r = await target.api('unban', {user: 'mallory'});
    assert.equal(r.status, 200, short(r.body));
    const ok = await withToken(tok('mallory'));
    await ok.connected();
  }));

  it('jwt rule: a token auth.jwt refuses denies the handshake (AuthTokenInvalidError, 4008); no token passes (require: false)', tc(async () => {
    const c = await withToken(signToken({sub: 'eve', role: 'user', exp: nowSec() + 3600}, {key: 'not-the-key'}));
    const {error, code} = await refusedHandshake(c);
    assert.equal(error.name, 'AuthTokenInvalidError', short(error));
    assert.equal(error.message, 'invalid signature');
    assert.equal(code, 4008);
    const anon = await connect(target);
    assert.equal(anon.socket.authState, 'unauthenticated');
    const alg = await withToken(signToken({sub: 'eve', role: 'user', exp: nowSec() + 3600}, {alg: 'HS512'}));
    const r = await refusedHandshake(alg);
    assert.equal(r.error.name, 'AuthTokenInvalidError', short(r.error));
  }));

  it('conn_limit per_user: the third socket of a user is refused with ConnectionLimitError', tc(async () => {
    const a = await withToken(tok('multi'));
    await a.connected();
    const b = await withToken(tok('multi'));
    await b.connected();
    const c = await withToken(tok('multi'));
    const {error, code} = await refusedHandshake(c);
    assert.equal(error.name, 'ConnectionLimitError', short(error));
    assert.equal(code, 4008);
  }));

  it('connect hook: the backend sees the user and its error reaches the client with its close code', tc(async () => {
    const c = await withToken(tok('hooked-out'));
    const {error, code} = await refusedHandshake(c);
    assert.equal(error.name, 'NotMemberError', short(error));
    assert.equal(error.message, 'hooked-out is not a member');
    assert.equal(code, 4502);
    const ok = await withToken(tok('hooked-in'));
    await ok.connected();
    const req = seen.connect.find((j) => j.user === 'hooked-in');
    assert.ok(req, `connect hook calls: ${short(seen.connect)}`);
    assert.equal(req.action, 'connect');
    assert.equal(req.claims.role, 'user');
  }));

  // ---- inbound --------------------------------------------------------------

  it('transmit: the hook sees transmits; its deny is silent and the socket stays open', tc(async () => {
    const c = await connect(target);
    c.socket.transmit('forbidden', {n: 1});
    c.socket.transmit('fine', {n: 2});
    await waitFor(() => seen.transmit.some((j) => j.method === 'fine'), {what: 'transmit hook call for "fine"'});
    const f = seen.transmit.find((j) => j.method === 'forbidden');
    assert.ok(f, short(seen.transmit));
    assert.deepEqual(f.data, {n: 1});
    await c.subscribe('after-transmit'); // a round trip: the socket still works
    assert.equal(c.socket.state, 'open');
    assert.equal(c.eventsOf('error').length, 0, c.eventSummary());
  }));

  it('invoke: the rpc hook answers rpc.* (data and error); other procedures are not for it', tc(async () => {
    const c = await withToken(tok('rpc-user'));
    await c.connected();
    const res = await c.socket.invoke('rpc.echo', {q: 42});
    assert.deepEqual(res, {echo: {q: 42}, user: 'rpc-user'});
    const err = await c.socket.invoke('rpc.fail', 'x').then((v) => assert.fail(`resolved ${short(v)}`), (e) => e);
    assert.equal(err.name, 'LookupError');
    assert.equal(err.message, 'no such thing: "x"');
    const other = await c.socket.invoke('other', 1).then((v) => assert.fail(`resolved ${short(v)}`), (e) => e);
    assert.notEqual(other.name, 'LookupError', short(other));
  }));

  it('subscribe: channels rule denies with the configured name and message; authenticated sockets pass', tc(async () => {
    const anon = await connect(target);
    const t0 = h.stamp();
    anon.socket.subscribe('private/room1');
    const fail = await anon.waitEvent('subscribeFail', {since: t0});
    assert.equal(fail.channel, 'private/room1');
    assert.equal(fail.error.name, 'AuthError');
    assert.equal(fail.error.message, 'Cannot subscribe to private/room1 without authentication');
    const user = await withToken(tok('alice'));
    await user.connected();
    await user.subscribe('private/room1');
  }));

  it('publishIn: a denied channel and an oversized payload reject the invoke with the rule\'s error', tc(async () => {
    const c = await connect(target);
    let err = await c.socket.invokePublish('readonly/news', 'x').then((v) => assert.fail(`resolved ${short(v)}`), (e) => e);
    assert.equal(err.name, 'InvalidActionError');
    assert.equal(err.message, 'Clients cannot publish to readonly/news');
    err = await c.socket.invokePublish('open/big', 'y'.repeat(2000)).then((v) => assert.fail(`resolved ${short(v)}`), (e) => e);
    assert.equal(err.name, 'PayloadTooLargeError', short(err));
    await c.socket.invokePublish('open/small', 'fine');
    assert.equal(c.socket.state, 'open');
  }));

  it('authenticate: a token without the required claim is refused, the socket stays unauthenticated', tc(async () => {
    const c = await connect(target);
    // As socketcluster-server answers a blocked #authenticate: a result
    // with isAuthenticated false and the block error as authError.
    const res = await c.socket.authenticate(signToken({sub: 'norole', exp: nowSec() + 3600}));
    assert.equal(res.isAuthenticated, false, short(res));
    assert.equal(res.authError.name, 'AuthError', short(res));
    assert.equal(res.authError.message, 'The auth token has no role claim');
    assert.equal(c.socket.authState, 'unauthenticated');
    await c.socket.authenticate(tok('withrole'));
    assert.equal(c.socket.authState, 'authenticated');
    // At the handshake the same rule makes it an authError; the socket connects.
    const h2 = await withToken(signToken({sub: 'norole', exp: nowSec() + 3600}));
    const status = await h2.waitEvent('connect');
    assert.equal(status.isAuthenticated, false);
    assert.equal(status.authError && status.authError.name, 'AuthError', short(status));
  }));

  // ---- outbound -------------------------------------------------------------

  it('publishOut: the outbound hook keeps a message from one socket; the others and the publisher are unaffected', tc(async () => {
    const nosy = await withToken(tok('nosy'));
    await nosy.connected();
    const fine = await withToken(tok('fine'));
    await fine.connected();
    const ns = await nosy.subscribe('filtered/a');
    const fs = await fine.subscribe('filtered/a');
    const pub = await connect(target);
    await pub.socket.invokePublish('filtered/a', {n: 1});
    await waitFor(() => fs.messages.length === 1, {what: 'delivery to the allowed socket'});
    await pub.subscribe('barrier'); // a round trip after the delivery
    await sleep(200); // observation window for a stray delivery
    assert.deepEqual(ns.messages, []);
    assert.deepEqual(fs.messages, [{n: 1}]);
    assert.ok(seen.out.some((j) => j.user === 'nosy' && j.channel === 'filtered/a'), short(seen.out));
  }));

  // ---- rate -----------------------------------------------------------------

  it('rate: a flooding socket is throttled while a calm socket on the same worker keeps its latency', tc(async () => {
    // Both invoke a procedure no rule answers (the worker replies
    // UnknownProcedureError at once): the round trip is the worker's own
    // path, with no backend in it. One worker, so both share it.
    const calm = await connect(target);
    const flood = await connect(target);
    const timeInvoke = async (c) => {
      const t = process.hrtime.bigint();
      const e = await c.socket.invoke('calm.ping', 1).then(() => null, (x) => x);
      assert.equal(e && e.name, 'UnknownProcedureError', short(e));
      return Number(process.hrtime.bigint() - t) / 1e6;
    };
    const base = [];
    for (let i = 0; i < 15; i++) { base.push(await timeInvoke(calm)); await sleep(60); }
    const counts = {answered: 0, limited: 0, other: 0};
    let flooding = true;
    const floodLoop = (async () => {
      const pending = [];
      for (let round = 0; flooding && round < 600; round++) {
        for (let i = 0; i < 10; i++) {
          pending.push(flood.socket.invoke('flood', i).then(() => { counts.other++; }, (e) => {
            if (e.name === 'RateLimitError') counts.limited++;
            else if (e.name === 'UnknownProcedureError') counts.answered++;
            else counts.other++;
          }));
        }
        await sleep(5);
      }
      await Promise.all(pending);
    })();
    await sleep(100);
    const during = [];
    for (let i = 0; i < 15; i++) { during.push(await timeInvoke(calm)); await sleep(60); }
    flooding = false;
    await floodLoop;
    const f = (a) => `p50 ${pct(a, 0.5).toFixed(1)} ms, p95 ${pct(a, 0.95).toFixed(1)} ms, max ${Math.max(...a).toFixed(1)} ms`;
    console.log(`# rate: calm invoke round trip before the flood: ${f(base)}; during: ${f(during)}; flooder: ${counts.answered} answered, ${counts.limited} RateLimitError, ${counts.other} other`);
    assert.ok(counts.limited > 5 * counts.answered, `flooder throttled: ${JSON.stringify(counts)}`);
    assert.equal(counts.other, 0, JSON.stringify(counts));
    assert.equal(flood.socket.state, 'open', 'a throttled socket is not disconnected');
    assert.ok(pct(during, 0.5) < Math.max(50, 5 * pct(base, 0.5)), `calm p50 during the flood: ${f(during)} (before: ${f(base)})`);
    assert.ok(Math.max(...during) < 1000, `calm max during the flood: ${f(during)}`);
  }));
});
