// `corral vm console NAME` through the API: a one-time ticket (printed with the dashboard's console
// page and the WebSocket URL), or with --listen a local TCP port for a native VNC viewer: each
// connection gets its own ticket and is bridged to the console WebSocket of whichever API server
// answers (which forwards to the node running the VM).
import { createServer, type Socket } from 'node:net';
import { WebSocket } from 'ws';
import { CorralError } from '../core/errors.js';
import type { HttpClient } from './client.js';
import { printJson } from './table.js';

/** how long a viewer's connection waits for the console WebSocket to open */
export const consoleOpenTimeoutMs = 10000;
export const consoleBridgeBufferMaxBytes = 4 * 1024 * 1024;

export interface ConsoleCliOpts {
  listen?: string;
  once?: boolean;
  json?: boolean;
}

export function wsUrl(api: HttpClient, path: string): string {
  return api.url.replace(/^http/, 'ws') + path;
}

export async function vmConsoleViaApi(api: HttpClient, name: string, o: ConsoleCliOpts): Promise<number> {
  if (!o.listen) {
    const t = await api.consoleTicket(name);
    const page = `${api.url}/ui/console.html#${encodeURIComponent(name)}`;
    if (o.json) printJson({ name, node: t.node, url: wsUrl(api, t.url), page, expiresAtMs: t.expiresAtMs });
    else
      process.stdout.write(
        [
          `${name}: console on node ${t.node} through ${api.url}`,
          `  browser    ${page}`,
          `  websocket  ${wsUrl(api, t.url)}  (one-time, valid ${Math.round((t.expiresAtMs - Date.now()) / 1000)} s)`,
          `  VNC viewer corral vm console ${name} --listen 127.0.0.1:5900`,
          '',
        ].join('\n'),
      );
    return 0;
  }
  const m = /^(.*):(\d+)$/.exec(o.listen);
  if (!m)
    throw new CorralError('CORRAL_USAGE', `--listen ${o.listen}: expected HOST:PORT`, 'e.g. 127.0.0.1:5900');
  // a first ticket checks the VM and the token before anything listens
  await api.consoleTicket(name);
  const server = createServer();
  const sessions = new Set<Socket>();
  const done = new Promise<void>((resolve) => server.on('close', resolve));
  server.on('connection', (sock) => {
    if (o.once) server.close(); // no second viewer; 'close' comes when this session ends
    sessions.add(sock);
    void bridgeViewer(api, name, sock).finally(() => sessions.delete(sock));
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(Number(m[2]), m[1]!.replace(/^\[|\]$/g, ''), resolve);
  });
  const addr = server.address();
  const where = typeof addr === 'object' && addr ? `${addr.address}:${addr.port}` : o.listen;
  process.stdout.write(
    `${name}: VNC viewer port ${where} (${o.once ? 'one session' : 'Ctrl-C to stop'}; each connection gets a new ticket from ${api.url})\n`,
  );
  const stop = () => {
    server.close();
    for (const sock of sessions) sock.destroy();
  };
  process.once('SIGINT', stop);
  process.once('SIGTERM', stop);
  await done;
  process.off('SIGINT', stop);
  process.off('SIGTERM', stop);
  return 0;
}

async function bridgeViewer(api: HttpClient, name: string, sock: Socket): Promise<void> {
  sock.pause();
  sock.on('error', () => undefined);
  let ws: WebSocket;
  try {
    const t = await api.consoleTicket(name);
    ws = await new Promise<WebSocket>((resolve, reject) => {
      const w = new WebSocket(wsUrl(api, t.url), ['binary'], { handshakeTimeout: consoleOpenTimeoutMs });
      w.once('open', () => resolve(w));
      w.once('unexpected-response', (_req, res) => {
        let body = '';
        res.on('data', (d: Buffer) => (body += d.toString()));
        res.on('end', () => reject(new Error(`HTTP ${res.statusCode}: ${body}`)));
      });
      w.once('error', reject);
      // the VNC server speaks first: nothing may be lost before the bridge is wired
      w.on('message', (d: Buffer) => {
        if (!sock.write(d)) {
          w.pause();
          sock.once('drain', () => w.resume());
        }
      });
    });
  } catch (e) {
    process.stderr.write(`${name}: console refused: ${(e as Error).message}\n`);
    sock.destroy();
    return;
  }
  process.stderr.write(`${name}: viewer connected\n`);
  sock.on('data', (d) => {
    ws.send(d);
    if (ws.bufferedAmount > consoleBridgeBufferMaxBytes) {
      sock.pause();
      const timer = setInterval(() => {
        if (ws.bufferedAmount < consoleBridgeBufferMaxBytes / 2 || ws.readyState !== ws.OPEN) {
          clearInterval(timer);
          sock.resume();
        }
      }, 20);
    }
  });
  sock.resume();
  await new Promise<void>((resolve) => {
    const end = () => {
      sock.destroy();
      if (ws.readyState === ws.OPEN || ws.readyState === ws.CONNECTING) ws.close();
      resolve();
    };
    sock.on('close', end);
    ws.on('close', end);
    ws.on('error', end);
  });
  process.stderr.write(`${name}: viewer disconnected\n`);
}
