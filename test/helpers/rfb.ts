// The client side of a console session for tests: a WebSocket to the console proxy and the RFB
// handshake (ProtocolVersion, security None, ClientInit, ServerInit) against a real QEMU VNC server.
import assert from 'node:assert/strict';
import type { Socket } from 'node:net';
import { WebSocket } from 'ws';

export const rfbWaitMs = 15000;

/** Reads exactly n bytes from a WebSocket's binary frames. */
export function reader(ws: WebSocket): (n: number) => Promise<Buffer> {
  let buf = Buffer.alloc(0);
  let wake: (() => void) | undefined;
  ws.on('message', (d: Buffer) => {
    buf = Buffer.concat([buf, d]);
    wake?.();
  });
  return async (n: number): Promise<Buffer> => {
    const deadline = Date.now() + rfbWaitMs;
    while (buf.length < n) {
      if (Date.now() > deadline) throw new Error(`wanted ${n} bytes, have ${buf.length}`);
      await new Promise<void>((r) => {
        wake = r;
        setTimeout(r, 200);
      });
    }
    const out = buf.subarray(0, n);
    buf = buf.subarray(n);
    return out;
  };
}

const readers = new WeakMap<WebSocket, (n: number) => Promise<Buffer>>();

/**
 * Opens a WebSocket; rejects with `HTTP <status>: <body>` when the upgrade is refused. Its reader is
 * attached before the upgrade: the first frames can arrive with the 101 response, before 'open' resolves.
 */
export function openWs(url: string): Promise<WebSocket> {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url, ['binary']);
    readers.set(ws, reader(ws));
    ws.once('open', () => resolve(ws));
    ws.once('unexpected-response', (_req, res) => {
      let body = '';
      res.on('data', (d: Buffer) => (body += d.toString()));
      res.on('end', () => reject(new Error(`HTTP ${res.statusCode}: ${body}`)));
      res.on('error', () => reject(new Error(`HTTP ${res.statusCode}`)));
    });
    ws.once('error', reject);
  });
}

/** RFB over a console WebSocket (see rfbHandshakeOver). */
export function rfbHandshake(ws: WebSocket): Promise<{ width: number; height: number; name: string }> {
  return rfbHandshakeOver(readers.get(ws) ?? reader(ws), (b) => ws.send(b));
}

/** RFB over a plain TCP connection (what a VNC viewer speaks to `corral vm console --listen`). */
export function rfbHandshakeTcp(sock: Socket): Promise<{ width: number; height: number; name: string }> {
  let buf = Buffer.alloc(0);
  let wake: (() => void) | undefined;
  sock.on('data', (d: Buffer) => {
    buf = Buffer.concat([buf, d]);
    wake?.();
  });
  const read = async (n: number): Promise<Buffer> => {
    const deadline = Date.now() + rfbWaitMs;
    while (buf.length < n) {
      if (Date.now() > deadline) throw new Error(`wanted ${n} bytes, have ${buf.length}`);
      await new Promise<void>((r) => {
        wake = r;
        setTimeout(r, 200);
      });
    }
    const out = buf.subarray(0, n);
    buf = buf.subarray(n);
    return out;
  };
  return rfbHandshakeOver(read, (b) => sock.write(b));
}

/** Speaks RFB 3.8 up to ServerInit; returns the framebuffer size and the desktop name. */
export async function rfbHandshakeOver(
  read: (n: number) => Promise<Buffer>,
  send: (b: Buffer) => void,
): Promise<{ width: number; height: number; name: string }> {
  const version = (await read(12)).toString('latin1');
  assert.match(version, /^RFB 003\.00[378]\n$/);
  send(Buffer.from('RFB 003.008\n', 'latin1'));
  const n = (await read(1))[0]!;
  assert.ok(n > 0, 'server offers security types');
  const types = [...(await read(n))];
  assert.ok(types.includes(1), `security None offered (got ${types.join(',')})`);
  send(Buffer.from([1]));
  assert.equal((await read(4)).readUInt32BE(0), 0, 'SecurityResult ok');
  send(Buffer.from([1])); // ClientInit: shared
  const init = await read(24);
  const width = init.readUInt16BE(0);
  const height = init.readUInt16BE(2);
  const nameLen = init.readUInt32BE(20);
  const name = (await read(nameLen)).toString('utf8');
  return { width, height, name };
}
