'use strict';
// A tiny official socketcluster-server v20 (single process) configured like a
// Shoal cluster, so the compatibility suite can be checked against the real
// thing (SHOAL_COMPAT_TARGET=reference). Started by harness.js as a child
// process; its settings arrive as JSON in REF_CONFIG.
//
// The only application code here is what a SocketCluster app would write to
// get Shoal's documented defaults:
//   - GET /healthz answers 200 (Shoal serves it on the public port);
//   - an invoke of a procedure nobody handles gets an error response naming
//     it (Shoal's rule, issue 3 item 3); the bare official server never
//     answers it and the client times out.
const http = require('http');
const socketClusterServer = require('socketcluster-server');

const cfg = JSON.parse(process.env.REF_CONFIG || '{}');

const httpServer = http.createServer((req, res) => {
  if (req.url === '/healthz') {
    res.writeHead(200, {'content-type': 'application/json'});
    res.end('{"status":"ok"}');
    return;
  }
  res.writeHead(404, {'content-type': 'text/plain'});
  res.end('not found');
});

const agServer = socketClusterServer.attach(httpServer, {
  path: cfg.path || '/socketcluster/',
  authKey: process.env[cfg.keyEnv],
  authVerifyAlgorithms: cfg.algorithms || ['HS256'],
  allowClientPublish: cfg.allowClientPublish !== false,
  maxPayload: cfg.maxPayload || 1024 * 1024,
  pingInterval: cfg.pingInterval || 8000,
  pingTimeout: cfg.pingTimeout || 30000,
  handshakeTimeout: cfg.handshakeTimeout || 10000,
  protocolVersion: cfg.protocolVersion || 2,
  socketChannelLimit: cfg.socketChannelLimit || 1000,
  origins: cfg.origins || '*:*'
});

// Unknown procedures: error response naming the procedure (see header).
agServer.setMiddleware(agServer.MIDDLEWARE_INBOUND, async (stream) => {
  for await (const action of stream) {
    if (action.type === action.INVOKE) {
      const err = new Error(`Unknown procedure "${action.procedure}"`);
      err.name = 'UnknownProcedureError';
      action.block(err);
      continue;
    }
    action.allow();
  }
});

(async () => {
  for await (const {error} of agServer.listener('error')) {
    console.error('[reference] server error:', error && error.message);
  }
})();
(async () => {
  for await (const {warning} of agServer.listener('warning')) {
    console.error('[reference] warning:', warning && (warning.name + ': ' + warning.message));
  }
})();

httpServer.listen(cfg.port, cfg.host || '127.0.0.1', () => {
  console.log(`[reference] listening on ${cfg.host || '127.0.0.1'}:${cfg.port}`);
});

for (const sig of ['SIGTERM', 'SIGINT']) {
  process.on(sig, () => {
    agServer.close();
    httpServer.close();
    process.exit(0);
  });
}
