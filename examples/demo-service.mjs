#!/usr/bin/env node
/* global process, console */
// The demo's service: a small HTTP server that says which node serves it.
// Usage: demo-service.mjs PORT   (Corral sets CORRAL_RESOURCE, CORRAL_NODE and CORRAL_EPOCH)
import { createServer } from 'node:http';

const port = Number(process.argv[2]);
if (!Number.isInteger(port) || port < 1 || port > 65535) {
  console.error(`demo-service: expected a port number (1-65535), got ${JSON.stringify(process.argv[2])}`);
  process.exit(2);
}
const who = {
  resource: process.env.CORRAL_RESOURCE ?? 'demo',
  node: process.env.CORRAL_NODE ?? 'unknown',
  epoch: Number(process.env.CORRAL_EPOCH ?? 0),
  pid: process.pid,
  startedAt: new Date().toISOString(),
};
const server = createServer((req, res) => {
  res.setHeader('content-type', 'text/plain');
  res.end(
    `${who.resource} served by ${who.node} (epoch ${who.epoch}, pid ${who.pid}, up since ${who.startedAt})\n`,
  );
});
server.listen(port, '127.0.0.1', () =>
  console.log(`${who.resource} listening on 127.0.0.1:${port} on ${who.node}`),
);
const stop = () => server.close(() => process.exit(0));
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
