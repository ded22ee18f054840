// The reference server for `shoal bench`: the official socketcluster-server
// v20, unmodified, with allowClientPublish true and every other option at its
// default. It exists so that the same bench run can measure SocketCluster and
// Shoal side by side.
//
//   node test/reference/server.js --port 8100 [--host 127.0.0.1]
//
// --port 0 picks a free port. Once listening it prints one line to stdout,
// `listening <host>:<port> pid <pid>`, which tests and the bench wait for.
'use strict';

const http = require('http');
const socketClusterServer = require('socketcluster-server');

function flag(name, def) {
  const i = process.argv.indexOf('--' + name);
  if (i === -1 || i + 1 >= process.argv.length) return def;
  return process.argv[i + 1];
}

const port = Number(flag('port', process.env.PORT || '8000'));
const host = flag('host', '127.0.0.1');

const httpServer = http.createServer();
const agServer = socketClusterServer.attach(httpServer, { allowClientPublish: true });

// The server's streams are async iterables; nothing has to consume the
// connection stream, but errors are drained so a bad client never crashes
// the reference mid-run (and are not printed: at 10k connections they would
// swamp the terminal and cost CPU the measurement should not pay).
(async () => {
  for await (const { error } of agServer.listener('error')) {
    void error;
  }
})();

httpServer.listen(port, host, () => {
  const addr = httpServer.address();
  process.stdout.write(`listening ${addr.address}:${addr.port} pid ${process.pid}\n`);
});

function stop() {
  httpServer.close();
  agServer.close();
  process.exit(0);
}
process.on('SIGINT', stop);
process.on('SIGTERM', stop);
