// Console proxy (like Synnefo's vncauthproxy): POST /api/v1/vms/:id/console hands out a one-time
// ticket (30 s, one VM, one caller, single use cluster-wide, 32 random bytes); GET
// /api/v1/console/ws?vm=<id>&ticket=<t> upgrades to a WebSocket bridged byte for byte to the VM's
// VNC Unix socket (<stateRoot>/<node>/vm/<id>/vnc.sock, src/drivers/qemu-paths.ts).
//
// Tickets live in the store (only their SHA-256, under /corral/<cluster>/console/tickets/), so any
// API server of the cluster accepts a ticket another one issued, and a ticket is consumed by one
// compare-and-delete transaction: it opens one console, once, anywhere.
//
// A VM on another node: every agent that serves the API records its URL under
// /corral/<cluster>/api/<node>. The API server that receives the browser consumes the ticket,
// issues a short-lived "hop" ticket in the store for the same VM and caller, and opens a WebSocket
// to the API of the node running the VM with it; that server consumes the hop ticket and bridges its
// local VNC socket. A hop ticket is never forwarded again, so no API server is an open relay: each
// hop needs a ticket only a store writer (a cluster member) can create.
import { randomBytes, X509Certificate } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import { connect, type Socket } from 'node:net';
import { rootCertificates } from 'node:tls';
import type { IncomingMessage, Server } from 'node:http';
import type { Duplex } from 'node:stream';
import type { FastifyInstance } from 'fastify';
import { WebSocketServer, WebSocket } from 'ws';
import { z } from 'zod';
import { route } from '../route.js';
import type { ApiContext } from '../context.js';
import { ApiError, type ApiErrorBody } from '../errors.js';
import { getSpec, writeEvent } from '../ops.js';
import { ConsoleTicket, IdParams } from '../schemas.js';
import { hashToken, type Caller } from '../auth.js';
import { vmPaths } from '../../drivers/qemu-paths.js';
import { nodeStateDir } from '../../cli/commands/agent.js';
import type { ResourceRecord } from '../../core/types.js';
import type { Store } from '../../store/types.js';
import type { Keys } from '../../core/keys.js';

export const consoleTicketTtlMs = 30000;
/** a hop ticket (API server to API server) only has to survive one connection attempt */
export const consoleHopTicketTtlMs = 10000;
export const consoleTicketsMax = 1000;
export const consoleTicketBytes = 32;
/** bytes buffered towards a slow peer before the other side is paused */
export const consoleBufferMaxBytes = 4 * 1024 * 1024;
export const consoleBufferPollMs = 20;
/** how long the forwarding server waits for the VM node's API to accept the WebSocket */
export const consoleForwardTimeoutMs = 5000;
export const consoleMaxPayloadBytes = 1024 * 1024;
const ticketPattern = /^[A-Za-z0-9_-]{43}$/;
const runningStates = ['started', 'migrating', 'starting'];

export const StoredTicket = z.object({
  vm: z.string(),
  /** the node that ran the VM when the ticket was issued (for a hop ticket: the node that must bridge) */
  node: z.string(),
  /** token name of the caller it was issued to */
  caller: z.string(),
  expiresAtMs: z.number(),
  /** issued by an API server to reach the VM node's API; never forwarded again */
  hop: z.boolean().default(false),
});
export type StoredTicket = z.infer<typeof StoredTicket>;

export const ApiEndpoint = z.object({
  node: z.string(),
  /** e.g. http://10.0.0.2:7440 */
  url: z.string(),
  pid: z.number(),
  sinceMs: z.number(),
});
export type ApiEndpoint = z.infer<typeof ApiEndpoint>;

/** One-time console tickets in the store: issued by any API server, consumed once cluster-wide. */
export class ConsoleTickets {
  constructor(
    private store: Store,
    private k: Keys,
  ) {}

  async issue(
    t: Omit<StoredTicket, 'expiresAtMs' | 'hop'> & { hop?: boolean },
    nowMs: number,
    ttlMs = consoleTicketTtlMs,
  ): Promise<{ token: string; expiresAtMs: number }> {
    const pending = await this.store.range(this.k.consoleTickets);
    const expired: string[] = [];
    for (const kv of pending.kvs) {
      const p = StoredTicket.safeParse(safeJson(kv.value));
      if (!p.success || p.data.expiresAtMs <= nowMs) expired.push(kv.key);
    }
    if (expired.length > 0)
      await this.store.txn({ compare: [], success: expired.map((key) => ({ type: 'delete', key })) });
    if (pending.kvs.length - expired.length >= consoleTicketsMax)
      throw new ApiError(
        'CORRAL_API_TOO_MANY',
        `${consoleTicketsMax} console tickets are pending`,
        '',
        `try again in ${consoleTicketTtlMs / 1000} s`,
      );
    const token = randomBytes(consoleTicketBytes).toString('base64url');
    const expiresAtMs = nowMs + ttlMs;
    const rec: StoredTicket = { ...t, hop: t.hop ?? false, expiresAtMs };
    await this.store.put(this.k.consoleTicket(hashToken(token)), JSON.stringify(rec));
    return { token, expiresAtMs };
  }

  /** single use: a ticket is gone once presented (valid or expired), by one atomic get-and-delete */
  async take(token: string, nowMs: number): Promise<StoredTicket | undefined> {
    if (!ticketPattern.test(token)) return undefined;
    const key = this.k.consoleTicket(hashToken(token));
    const r = await this.store.txn({
      compare: [{ key, target: 'version', op: '>', value: 0 }],
      success: [
        { type: 'get', key },
        { type: 'delete', key },
      ],
    });
    if (!r.succeeded) return undefined;
    const got = r.results[0];
    const kv = got?.type === 'get' ? got.kv : undefined;
    const t = kv ? StoredTicket.safeParse(safeJson(kv.value)) : undefined;
    return t?.success && t.data.expiresAtMs > nowMs ? t.data : undefined;
  }
}

function safeJson(s: string): unknown {
  try {
    return JSON.parse(s);
  } catch {
    return undefined;
  }
}

/** The API URL a node's agent recorded, if any. */
export async function readApiEndpoint(ctx: ApiContext, node: string): Promise<ApiEndpoint | undefined> {
  const kv = await ctx.store.get(ctx.k.apiEndpoint(node));
  const p = kv ? ApiEndpoint.safeParse(safeJson(kv.value)) : undefined;
  return p?.success ? p.data : undefined;
}

/** Record this API server as the one of `node` (an agent with --api); returns the remover. */
export async function recordApiEndpoint(
  store: Store,
  k: Keys,
  ep: ApiEndpoint,
): Promise<() => Promise<void>> {
  const value = JSON.stringify(ep);
  await store.put(k.apiEndpoint(ep.node), value);
  return async () => {
    // only ours: a newer server of the same node may have replaced the record
    await store.txn({
      compare: [{ key: k.apiEndpoint(ep.node), target: 'value', op: '==', value }],
      success: [{ type: 'delete', key: k.apiEndpoint(ep.node) }],
    });
  };
}

function socketOf(ctx: ApiContext, node: string, vm: string): string {
  return vmPaths(nodeStateDir(ctx.stateRoot, node), vm).vncSocket;
}

/** Is the VNC socket of a VM on `node` bridged by this server? An agent's API: its own node only. */
function isLocal(ctx: ApiContext, node: string, vm: string): boolean {
  return ctx.node ? node === ctx.node : existsSync(socketOf(ctx, node, vm));
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
          'a one-time console ticket (30 s, single use, any API server of the cluster); connect a WebSocket to the returned url',
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
        if (spec.vm && !spec.vm.vnc)
          throw new ApiError(
            'CORRAL_CONFLICT',
            `${params.id} has no VNC console`,
            'params.id',
            'set `vnc: true` in its definition',
          );
        const kv = await ctx.store.get(ctx.k.assign(params.id));
        const rec = kv ? (JSON.parse(kv.value) as ResourceRecord) : undefined;
        if (!rec?.node || !runningStates.includes(rec.state))
          throw new ApiError(
            'CORRAL_CONFLICT',
            `${params.id} is not running (${rec?.state ?? 'stopped'})`,
            'params.id',
            `start it: POST /api/v1/vms/${params.id}/start`,
          );
        if (isLocal(ctx, rec.node, params.id)) {
          if (!existsSync(socketOf(ctx, rec.node, params.id)))
            throw new ApiError(
              'CORRAL_API_UNAVAILABLE',
              `${params.id} runs on ${rec.node} but its VNC socket ${socketOf(ctx, rec.node, params.id)} is missing`,
              'params.id',
              'wait until QEMU has started, then ask again',
            );
        } else if (!(await readApiEndpoint(ctx, rec.node)))
          throw new ApiError(
            'CORRAL_API_UNAVAILABLE',
            `${params.id} runs on ${rec.node}, which serves no API to forward the console to`,
            'params.id',
            `run the agent of ${rec.node} with --api, or ask the API on ${rec.node}'s host`,
          );
        const t = await tickets.issue({ vm: params.id, node: rec.node, caller: caller.name }, Date.now());
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
          url: `/api/v1/console/ws?vm=${encodeURIComponent(params.id)}&ticket=${t.token}`,
        };
      },
    );
  };
}

/** Refuse an upgrade with a JSON error (the browser sees the HTTP status). */
function refuse(sock: Duplex, status: 403 | 502 | 503, body: ApiErrorBody): void {
  if (sock.destroyed) return;
  const text = { 403: 'Forbidden', 502: 'Bad Gateway', 503: 'Service Unavailable' }[status];
  sock.end(
    `HTTP/1.1 ${status} ${text}\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n` +
      JSON.stringify(body),
  );
}

const forbidden = (message: string): ApiErrorBody => ({
  code: 'CORRAL_API_FORBIDDEN',
  message,
  path: 'query.ticket',
  hint: 'ask POST /api/v1/vms/{id}/console for a new one',
});

/** CAs for wss:// to other nodes: the system's plus this server's own certificate (a cluster certificate). */
function forwardCas(ctx: ApiContext): string[] | undefined {
  const tls = ctx.config.network.api.tls;
  if (!tls) return undefined;
  const own = readFileSync(tls.cert, 'utf8');
  try {
    new X509Certificate(own);
  } catch {
    return undefined;
  }
  return [...rootCertificates, own];
}

/** Handle WebSocket upgrades on /api/v1/console/ws. */
export function attachConsoleUpgrade(ctx: ApiContext, server: Server, tickets: ConsoleTickets): () => void {
  const wss = new WebSocketServer({
    noServer: true,
    maxPayload: consoleMaxPayloadBytes,
    handleProtocols: (p) => (p.has('binary') ? 'binary' : false),
  });
  const upstreams = new Set<WebSocket>();
  const cas = forwardCas(ctx);

  const handle = async (req: IncomingMessage, sock: Duplex, head: Buffer, url: URL) => {
    const t = await tickets.take(url.searchParams.get('ticket') ?? '', Date.now());
    const vmAsked = url.searchParams.get('vm');
    if (!t) return refuse(sock, 403, forbidden('console ticket unknown, used or expired'));
    if (vmAsked !== null && vmAsked !== t.vm)
      return refuse(sock, 403, forbidden(`the console ticket is for ${t.vm}, not ${vmAsked}`));
    // the VM may have moved since the ticket was issued: follow it (a hop ticket names its node)
    let node = t.node;
    if (!t.hop) {
      const kv = await ctx.store.get(ctx.k.assign(t.vm));
      const rec = kv ? (JSON.parse(kv.value) as ResourceRecord) : undefined;
      if (rec?.node && runningStates.includes(rec.state)) node = rec.node;
    }
    if (isLocal(ctx, node, t.vm)) {
      const path = socketOf(ctx, node, t.vm);
      if (!existsSync(path))
        return refuse(sock, 503, {
          code: 'CORRAL_API_UNAVAILABLE',
          message: `${t.vm}: VNC socket ${path} is missing on ${ctx.node ?? 'this host'}`,
          path: 'query.vm',
          hint: 'is the VM still running here? ask for a new ticket',
        });
      ctx.metrics.consoleSessions.inc({ path: 'local' });
      wss.handleUpgrade(req, sock, head, (ws) => bridgeSocket(ctx, ws, t, node, path));
      return;
    }
    if (t.hop)
      return refuse(
        sock,
        403,
        forbidden(`hop ticket for ${t.vm} on ${node} presented to ${ctx.node ?? 'an API without a node'}`),
      );
    const ep = await readApiEndpoint(ctx, node);
    if (!ep)
      return refuse(sock, 503, {
        code: 'CORRAL_API_UNAVAILABLE',
        message: `${t.vm} runs on ${node}, which serves no API to forward the console to`,
        path: 'query.vm',
        hint: `run the agent of ${node} with --api`,
      });
    const hop = await tickets.issue(
      { vm: t.vm, node, caller: t.caller, hop: true },
      Date.now(),
      consoleHopTicketTtlMs,
    );
    const target = `${ep.url.replace(/^http/, 'ws').replace(/\/+$/, '')}/api/v1/console/ws?vm=${encodeURIComponent(t.vm)}&ticket=${hop.token}`;
    const up = new WebSocket(target, ['binary'], {
      handshakeTimeout: consoleForwardTimeoutMs,
      maxPayload: consoleMaxPayloadBytes,
      ...(cas ? { ca: cas } : {}),
    });
    upstreams.add(up);
    up.on('close', () => upstreams.delete(up));
    // the VNC server speaks first: keep what arrives before the browser side is upgraded
    const early: Buffer[] = [];
    const keep = (d: Buffer) => early.push(d);
    up.on('message', keep);
    let opened = false;
    let failed = false;
    const fail = (why: string) => {
      if (opened || failed) return;
      failed = true;
      ctx.metrics.consoleSessions.inc({ path: 'refused' });
      ctx.log('warn', `console ${t.vm}: forwarding to ${node} (${ep.url}) failed: ${why}`);
      refuse(sock, 502, {
        code: 'CORRAL_API_UNAVAILABLE',
        message: `${t.vm} runs on ${node}, whose API (${ep.url}) did not open the console: ${why}`,
        path: 'query.vm',
        hint: `check that the agent of ${node} serves its API at ${ep.url}`,
      });
      up.terminate();
    };
    up.once('unexpected-response', (_r, res) => fail(`HTTP ${res.statusCode}`));
    // after the upgrade, bridgeWs handles errors; before it, they refuse the browser
    up.on('error', (e) => fail(e.message));
    up.once('open', () => {
      opened = true;
      if (sock.destroyed) {
        up.terminate();
        return;
      }
      ctx.metrics.consoleSessions.inc({ path: 'forwarded' });
      wss.handleUpgrade(req, sock, head, (ws) => {
        up.off('message', keep);
        ctx.log('info', `console: ${t.caller} connected to ${t.vm} on ${node} through ${ep.url}`);
        for (const d of early) ws.send(d);
        bridgeWs(ctx, ws, up, t.vm);
      });
    });
  };

  const onUpgrade = (req: IncomingMessage, sock: Duplex, head: Buffer) => {
    const url = new URL(req.url ?? '/', 'http://x');
    if (url.pathname !== '/api/v1/console/ws') {
      sock.destroy();
      return;
    }
    sock.on('error', () => undefined);
    handle(req, sock, head, url).catch((e: unknown) => {
      ctx.log('warn', `console: ${(e as Error).message}`);
      refuse(sock, 503, {
        code: 'CORRAL_API_UNAVAILABLE',
        message: `console: ${(e as Error).message}`,
        path: '',
        hint: 'try again with a new ticket',
      });
    });
  };
  server.on('upgrade', onUpgrade);
  return () => {
    server.off('upgrade', onUpgrade);
    for (const c of wss.clients) c.terminate();
    for (const u of upstreams) u.terminate();
    wss.close();
  };
}

/** Pause `from` while `to` has more than consoleBufferMaxBytes queued. */
function throttle(to: WebSocket, pause: () => void, resume: () => void): void {
  if (to.bufferedAmount <= consoleBufferMaxBytes) return;
  pause();
  const timer = setInterval(() => {
    if (to.bufferedAmount < consoleBufferMaxBytes / 2 || to.readyState !== to.OPEN) {
      clearInterval(timer);
      resume();
    }
  }, consoleBufferPollMs);
}

function bridgeSocket(ctx: ApiContext, ws: WebSocket, t: StoredTicket, node: string, path: string): void {
  const vnc: Socket = connect(path);
  ctx.log('info', `console: ${t.caller} connected to ${t.vm} on ${node}${t.hop ? ' (forwarded)' : ''}`);
  vnc.on('data', (d) => {
    ws.send(d);
    throttle(
      ws,
      () => vnc.pause(),
      () => vnc.resume(),
    );
  });
  ws.on('message', (d: Buffer) => {
    if (!vnc.write(d)) {
      ws.pause();
      vnc.once('drain', () => ws.resume());
    }
  });
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

function bridgeWs(ctx: ApiContext, a: WebSocket, b: WebSocket, vm: string): void {
  const pipe = (from: WebSocket, to: WebSocket) =>
    from.on('message', (d: Buffer) => {
      if (to.readyState !== to.OPEN) return;
      to.send(d, { binary: true });
      throttle(
        to,
        () => from.pause(),
        () => from.resume(),
      );
    });
  pipe(a, b);
  pipe(b, a);
  const end = () => {
    for (const s of [a, b]) if (s.readyState === s.OPEN || s.readyState === s.CONNECTING) s.close();
  };
  for (const s of [a, b]) {
    s.on('close', end);
    s.on('error', (e) => {
      ctx.log('warn', `console ${vm}: ${e.message}`);
      end();
    });
  }
}
