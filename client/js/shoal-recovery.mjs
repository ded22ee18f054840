// shoal-recovery.mjs — message recovery for socketcluster-client apps on Shoal.
//
// Shoal adds "offset" and "epoch" to every #publish of a channel with history
// (docs/history.md). The official client hands listeners only the inner
// `data`, so this helper reads the raw messages, remembers each channel's last
// position, and puts it in the channel's subscribe data as
// {"recover":{"offset":N,"epoch":"E"}}. socketcluster-client resubscribes on
// reconnect with the same subscribe options object, so updating that object
// in place is enough: every resubscription asks for exactly what was missed.
// The server tells the outcome with a "#recovery" event
// {"channel","recovered","epoch","offset"} before the missed messages.
//
// Usage:
//   import {create} from 'socketcluster-client';
//   import {withRecovery} from './shoal-recovery.mjs';
//   const socket = create({hostname: 'localhost', port: 8000});
//   const rec = withRecovery(socket, {onRecovery: (ch, r) => {
//     if (!r.recovered) reloadFromServer(ch);   // the gap could not be filled
//   }});
//   const channel = rec.subscribe('chat/room');  // instead of socket.subscribe
//   for await (const data of channel) { ... }     // missed messages arrive here too, in order
//
// No dependencies; works with socketcluster-client v16+ (the socket's
// 'message' listener and receiver()).

/**
 * @param {object} socket an AGClientSocket
 * @param {{onRecovery?: (channel: string, r: {recovered: boolean, epoch: string, offset: number}) => void}} [opts]
 */
export function withRecovery(socket, opts = {}) {
  const positions = new Map(); // channel -> the data object given to subscribe
  const onRecovery = opts.onRecovery || (() => {});

  // observe handles one raw inbound message (a JSON string).
  function observe(raw) {
    if (typeof raw !== 'string' || raw.length === 0 || raw[0] !== '{') return;
    let packet;
    try {
      packet = JSON.parse(raw);
    } catch {
      return;
    }
    if (!packet || typeof packet.event !== 'string' || !packet.data) return;
    const d = packet.data;
    if (packet.event === '#publish') {
      const data = positions.get(d.channel);
      if (data && typeof d.offset === 'number' && typeof d.epoch === 'string') {
        data.recover = {offset: d.offset, epoch: d.epoch};
      }
    } else if (packet.event === '#recovery') {
      const data = positions.get(d.channel);
      if (data && !d.recovered && typeof d.epoch === 'string') {
        // What came before is lost to this subscription: continue from
        // the server's position.
        data.recover = {offset: d.offset, epoch: d.epoch};
      }
      onRecovery(d.channel, {recovered: !!d.recovered, epoch: d.epoch, offset: d.offset});
    }
  }

  let stopped = false;
  (async () => {
    for await (const ev of socket.listener('message')) {
      if (stopped) break;
      observe(ev && typeof ev === 'object' ? ev.message : ev);
    }
  })();

  return {
    /** Subscribe with recovery; same arguments as socket.subscribe. */
    subscribe(channel, options = {}) {
      let data = positions.get(channel);
      if (!data) {
        data = options.data && typeof options.data === 'object' ? options.data : {};
        positions.set(channel, data);
      }
      return socket.subscribe(channel, {...options, data});
    },
    /** Forget a channel's position (after unsubscribing for good). */
    forget(channel) {
      positions.delete(channel);
    },
    /** The last position seen on a channel, or undefined. */
    position(channel) {
      const d = positions.get(channel);
      return d && d.recover ? {...d.recover} : undefined;
    },
    /** Stop observing messages. */
    stop() {
      stopped = true;
    },
    observe, // exposed for tests and for apps that feed raw messages themselves
  };
}
