// Console proxy (like Synnefo's vncauthproxy): POST /api/v1/vms/:id/console hands out a one-time
// ticket (30 s, one VM, one caller, single use, 32 random bytes); GET /api/v1/console/ws?ticket=
// upgrades to a WebSocket that is bridged byte for byte to the VM's VNC Unix socket
// (<stateRoot>/<node>/vm/<id>/vnc.sock, src/drivers/qemu-paths.ts) when it is on this host.
//
// Remote nodes (not implemented yet): the API server that holds the ticket would open a WebSocket
// to the VM node's own API (network.api.listen of that node, reached at its address) at
// /api/v1/console/ws-node?vm=<id>, authenticated by an HMAC of (vm, expiry) with the cluster
// authKey, and bridge the two sockets; the node's API then connects its local vnc.sock.
import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { connect, type Socket } from 'node:net';
import type { IncomingMessage } from 'node:http';
import type { Duplex } from 'node:stream';
import type { FastifyInstance } from 'fastify';
import { WebSocketServer, type WebSocket } from 'ws';
import { route } from '../route.js';
import type { ApiContext } from '../context.js';
import { ApiError } from '../errors.js';
import { getSpec, writeEvent } from '../ops.js';
import { ConsoleTicket, IdParams } from '../schemas.js';
import { vmPaths } from '../../drivers/qemu-paths.js';
import { nodeStateDir } from '../../cli/commands/agent.js';
import type { ResourceRecord } from '../../core/types.js';
import type { Caller } from '../auth.js';

export const consoleTicketTtlMs = 30000;
export const consoleTicketsMax = 1000;
export const consoleTicketBytes = 32;
/** bytes buffered towards a slow browser before the VNC side is paused */
export const consoleBufferMaxBytes = 4 * 1024 * 1024;

interface Ticket {
  vm: string;
  node: string;
  socketPath: string;
  caller: string;
  expiresAtMs: number;
}

export class ConsoleTickets {
  private tickets = new Map<string, Ticket>();
  issue(t: Omit<Ticket, 'expiresAtMs'>, nowMs: number): { token: string; expiresAtMs: number } {
    for (const [k, v] of this.tickets) if (v.expiresAtMs <= nowMs) this.tickets.delete(k);
    if (this.tickets.size >= consoleTicketsMax)
      throw new ApiError(
        'CORRAL_API_TOO_MANY',
        `${consoleTicketsMax} console tickets are pending`,
        '',
        'try again in 30 s',
      );
    const token = randomBytes(consoleTicketBytes).toString('base64url');
    const expiresAtMs = nowMs + consoleTicketTtlMs;
    this.tickets.set(token, { ...t, expiresAtMs });
    return { token, expiresAtMs };
  }
  /** single use: a ticket is gone once presented, valid or not */
  take(token: string, nowMs: number): Ticket | undefined {
    const t = this.tickets.get(token);
    if (!t) return undefined;
    this.tickets.delete(token);
    return t.expiresAtMs > nowMs ? t : undefined;
  }
}

export function consoleRoutes(ctx: ApiContext, tickets: ConsoleTickets) {
  return async (app: FastifyInstance) => {
    route(
      app,
      '/api/v1',
      {
        method: 'POST',
        url: '/vms/:id/console',
        summary:
          'a one-time console ticket (30 s, single use) for the VM; connect a WebSocket to the returned url',
        tag: 'vms',
        role: 'operator',
        params: IdParams,
        reply: ConsoleTicket,
        status: 201,
      },
      async ({ params, req }) => {
        const caller = req.caller as Caller;
        const o = ctx.ops(caller);
        const spec = await getSpec(o, params.id);
        if (spec.kind !== 'vm')
          throw new ApiError(
            'CORRAL_API_BAD_REQUEST',
            `${params.id} is a ${spec.kind} resource; only VMs have a console`,
            'params.id',
          );
        const kv = await ctx.store.get(ctx.k.assign(params.id));
        const rec = kv ? (JSON.parse(kv.value) as ResourceRecord) : undefined;
        if (!rec?.node || !['started', 'migrating', 'starting'].includes(rec.state))
          throw new ApiError(
            'CORRAL_CONFLICT',
            `${params.id} is not running (${rec?.state ?? 'stopped'})`,
            'params.id',
            `start it: POST /api/v1/vms/${params.id}/start`,
          );
        const socketPath = vmPaths(nodeStateDir(ctx.stateRoot, rec.node), params.id).vncSocket;
        if (!existsSync(socketPath))
          throw new ApiError(
            'CORRAL_API_UNAVAILABLE',
            `${params.id} runs on ${rec.node}, whose VNC socket is not on this host`,
            'params.id',
            `ask the API of ${rec.node} (console forwarding between nodes is not implemented yet)`,
          );
        const t = tickets.issue(
          { vm: params.id, node: rec.node, socketPath, caller: caller.name },
          Date.now(),
        );
        await writeEvent(
          o,
          'operator',
          params.id,
          'console',
          `${params.id}: console ticket issued to ${o.by}`,
        );
        return {
          token: t.token,
          expiresAtMs: t.expiresAtMs,
          node: rec.node,
          url: `/api/v1/console/ws?ticket=${t.token}`,
        };
      },
    );
  };
}

/** Handle WebSocket upgrades on /api/v1/console/ws. */
export function attachConsoleUpgrade(
  ctx: ApiContext,
  server: import('node:http').Server,
  tickets: ConsoleTickets,
): () => void {
  const wss = new WebSocketServer({
    noServer: true,
    maxPayload: 1024 * 1024,
    handleProtocols: (p) => (p.has('binary') ? 'binary' : false),
  });
  const onUpgrade = (req: IncomingMessage, sock: Duplex, head: Buffer) => {
    const url = new URL(req.url ?? '/', 'http://x');
    if (url.pathname !== '/api/v1/console/ws') {
      sock.destroy();
      return;
    }
    const ticket = tickets.take(url.searchParams.get('ticket') ?? '', Date.now());
    if (!ticket) {
      sock.end(
        'HTTP/1.1 403 Forbidden\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n' +
          JSON.stringify({
            code: 'CORRAL_API_FORBIDDEN',
            message: 'console ticket unknown, used or expired',
            path: 'query.ticket',
            hint: 'ask POST /api/v1/vms/{id}/console for a new one',
          }),
      );
      return;
    }
    wss.handleUpgrade(req, sock, head, (ws) => bridge(ctx, ws, ticket));
  };
  server.on('upgrade', onUpgrade);
  return () => {
    server.off('upgrade', onUpgrade);
    for (const c of wss.clients) c.terminate();
    wss.close();
  };
}

function bridge(ctx: ApiContext, ws: WebSocket, t: Ticket): void {
  const vnc: Socket = connect(t.socketPath);
  ctx.log('info', `console: ${t.caller} connected to ${t.vm} on ${t.node}`);
  vnc.on('data', (d) => {
    ws.send(d);
    if (ws.bufferedAmount > consoleBufferMaxBytes) {
      vnc.pause();
      const resume = setInterval(() => {
        if (ws.bufferedAmount < consoleBufferMaxBytes / 2 || ws.readyState !== ws.OPEN) {
          clearInterval(resume);
          vnc.resume();
        }
      }, 20);
    }
  });
  ws.on('message', (d: Buffer) => vnc.write(d));
  const end = () => {
    vnc.destroy();
    if (ws.readyState === ws.OPEN || ws.readyState === ws.CONNECTING) ws.close();
  };
  vnc.on('error', (e) => {
    ctx.log('warn', `console ${t.vm}: ${e.message}`);
    end();
  });
  vnc.on('close', end);
  ws.on('close', end);
  ws.on('error', end);
}
