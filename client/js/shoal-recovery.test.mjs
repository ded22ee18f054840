// node --test client/js/  — the helper against a minimal stand-in socket
// that keeps subscribe options by reference, as socketcluster-client does.
import test from 'node:test';
import assert from 'node:assert/strict';
import {withRecovery} from './shoal-recovery.mjs';

function fakeSocket() {
  const channels = new Map();
  let push;
  const queue = [];
  return {
    channels,
    subscribe(name, options) {
      channels.set(name, {options});
      return {name};
    },
    // Resubscribe as the official client does after a reconnect: the same
    // options.data object goes out again.
    resubscribeFrame(name) {
      return JSON.stringify({event: '#subscribe', data: {channel: name, data: channels.get(name).options.data}});
    },
    listener() {
      return {
        [Symbol.asyncIterator]() {
          return {
            next: () => new Promise((resolve) => {
              if (queue.length) resolve({value: queue.shift(), done: false});
              else push = (v) => resolve({value: v, done: false});
            }),
          };
        },
      };
    },
    deliver(raw) {
      const ev = {message: raw};
      if (push) { const p = push; push = null; p(ev); } else queue.push(ev);
    },
  };
}

const tick = () => new Promise((r) => setImmediate(r));

test('tracks offsets and resubscribes with recover data', async () => {
  const s = fakeSocket();
  const seen = [];
  const rec = withRecovery(s, {onRecovery: (ch, r) => seen.push([ch, r.recovered])});
  rec.subscribe('chat/a');
  assert.equal(rec.position('chat/a'), undefined);
  for (const off of [1, 2, 3]) {
    s.deliver(JSON.stringify({event: '#publish', data: {channel: 'chat/a', data: {n: off}, offset: off, epoch: 'e1'}}));
    await tick();
  }
  assert.deepEqual(rec.position('chat/a'), {offset: 3, epoch: 'e1'});
  assert.deepEqual(JSON.parse(s.resubscribeFrame('chat/a')).data.data, {recover: {offset: 3, epoch: 'e1'}});

  s.deliver(JSON.stringify({event: '#recovery', data: {channel: 'chat/a', recovered: false, epoch: 'e2', offset: 9}}));
  await tick();
  assert.deepEqual(seen, [['chat/a', false]]);
  assert.deepEqual(rec.position('chat/a'), {offset: 9, epoch: 'e2'});

  // Messages without offsets (no history) and other events leave it alone.
  s.deliver(JSON.stringify({event: '#publish', data: {channel: 'chat/a', data: 1}}));
  s.deliver('');
  s.deliver('not json');
  await tick();
  assert.deepEqual(rec.position('chat/a'), {offset: 9, epoch: 'e2'});
  rec.stop();
});

test('keeps the app subscribe data', () => {
  const s = fakeSocket();
  const rec = withRecovery(s);
  rec.subscribe('chat/b', {data: {room: 7}, waitForAuth: true});
  rec.observe(JSON.stringify({event: '#publish', data: {channel: 'chat/b', data: 0, offset: 5, epoch: 'x'}}));
  const opts = s.channels.get('chat/b').options;
  assert.equal(opts.waitForAuth, true);
  assert.deepEqual(opts.data, {room: 7, recover: {offset: 5, epoch: 'x'}});
  rec.stop();
});
