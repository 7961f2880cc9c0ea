// The Corral API server: fastify, one plugin per area (cluster, resources/vms, events, config,
// tokens, console, web). Reads come from the store (a cached consistent snapshot invalidated by a
// store watch), so status answers at once even while a failover runs.
import { readFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import Fastify, { type FastifyInstance } from 'fastify';
import type { Store } from '../store/types.js';
import { keys } from '../core/keys.js';
import type { ClusterConfig } from '../config/schema.js';
import { Hub } from './hub.js';
import { TokenVerifier, authenticate, type Caller, type Role } from './auth.js';
import { ApiMetrics } from './metrics.js';
import { installErrorHandler } from './errors.js';
import { openApiDocument } from './route.js';
import type { ApiContext } from './context.js';
import { StatusView } from './status-view.js';
import { clusterRoutes } from './plugins/cluster.js';
import { resourceRoutes } from './plugins/resources.js';
import { eventRoutes } from './plugins/events.js';
import { configRoutes } from './plugins/config.js';
import { tokenRoutes } from './plugins/tokens.js';
import { consoleRoutes, attachConsoleUpgrade, ConsoleTickets, recordApiEndpoint } from './plugins/console.js';
import { webRoutes } from './plugins/web.js';
import { localInfo } from '../cli/local.js';

declare module 'fastify' {
  interface FastifyRequest {
    caller?: Caller;
  }
  interface FastifyContextConfig {
    role?: Role | 'public';
  }
}

export const apiLimits = {
  bodyLimitBytes: 1024 * 1024,
  requestTimeoutMs: 15000,
  connectionTimeoutMs: 0,
  keepAliveTimeoutMs: 5000,
};
export const apiVersion = '1.0.0';

export interface ApiOptions {
  store: Store;
  config: ClusterConfig;
  configPath: string;
  /** state root of local agents (default: local.json beside the config, else $CORRAL_STATE_ROOT) */
  stateRoot?: string;
  /** host:port to listen on (default: config network.api.listen); port 0 picks one */
  listen?: string;
  /**
   * the node whose agent serves this API: its URL is recorded in the store
   * (/corral/<cluster>/api/<node>) so other API servers forward that node's VM consoles here
   */
  node?: string;
  log?: (level: 'info' | 'warn' | 'error', msg: string) => void;
}

export interface ApiServer {
  app: FastifyInstance;
  ctx: ApiContext;
  /** e.g. http://127.0.0.1:7440 */
  url: string;
  port: number;
  close(): Promise<void>;
}

export async function startApi(o: ApiOptions): Promise<ApiServer> {
  const cluster = o.config.cluster.name;
  const k = keys(cluster);
  const log = o.log ?? ((level, msg) => process.stderr.write(`api ${level}: ${msg}\n`));
  const metrics = new ApiMetrics();
  const hub = new Hub(o.store, k, (m) => log('warn', m));
  await hub.start();
  hub.on('event', (e) => metrics.onEvent(e));
  const nodeNames = o.config.nodes.map((n) => n.name);
  const status = new StatusView(
    o.store,
    cluster,
    k,
    nodeNames,
    hub,
    (ms) => metrics.storeLatency.observe(ms / 1000),
    (ms) => metrics.statusBuild.observe(ms / 1000),
  );
  await status.start();
  const ctx: ApiContext = {
    store: o.store,
    config: o.config,
    configPath: resolve(o.configPath),
    cluster,
    k,
    hub,
    verifier: new TokenVerifier(o.store, cluster, hub),
    metrics,
    stateRoot: o.stateRoot ?? localInfo(o.configPath).stateRoot,
    node: o.node,
    nodeNames,
    log,
    status: () => status.status(),
    statusJson: () => status.json(),
    ops: (caller) => ({ store: o.store, k, by: `token:${caller.name}`, nodeNames }),
  };
  const tls = o.config.network.api.tls;
  const app = Fastify({
    logger: false,
    bodyLimit: apiLimits.bodyLimitBytes,
    requestTimeout: apiLimits.requestTimeoutMs,
    keepAliveTimeout: apiLimits.keepAliveTimeoutMs,
    return503OnClosing: true,
    ...(tls ? { https: { cert: readFileSync(tls.cert), key: readFileSync(tls.key) } } : {}),
  }) as unknown as FastifyInstance;
  installErrorHandler(app);
  app.addHook('onRequest', async (req) => {
    const role = req.routeOptions.config?.role;
    if (!role || role === 'public') return;
    req.caller = await authenticate(ctx.verifier, req, role);
  });
  app.addHook('onResponse', async (req, reply) => {
    metrics.apiLatency.observe(
      { method: req.method, route: req.routeOptions.url ?? 'unknown', status: String(reply.statusCode) },
      reply.elapsedTime / 1000,
    );
  });
  const tickets = new ConsoleTickets(o.store, k);
  await app.register(clusterRoutes(ctx));
  await app.register(resourceRoutes(ctx));
  await app.register(eventRoutes(ctx));
  await app.register(configRoutes(ctx));
  await app.register(tokenRoutes(ctx));
  await app.register(consoleRoutes(ctx, tickets));
  await app.register(webRoutes(ctx));
  app.get('/api/v1/openapi.json', { config: { role: 'public' } }, async () => openApiDocument(apiVersion));
  app.get('/api/v1/health', { config: { role: 'public' } }, async () => ({
    ok: true,
    cluster,
    revision: hub.revision,
  }));

  const listen = o.listen ?? o.config.network.api.listen;
  const m = /^(.*):(\d+)$/.exec(listen);
  const host = (m?.[1] ?? '127.0.0.1').replace(/^\[|\]$/g, '');
  await app.listen({ host, port: Number(m?.[2] ?? 7440) });
  const addr = app.server.address();
  const port = typeof addr === 'object' && addr ? addr.port : 0;
  const detach = attachConsoleUpgrade(ctx, app.server, tickets);
  const shownHost = host.includes(':') ? `[${host}]` : host === '0.0.0.0' ? '127.0.0.1' : host;
  const scheme = tls ? 'https' : 'http';
  let forget: (() => Promise<void>) | undefined;
  if (o.node) {
    // other nodes reach this one at its configured address when it listens on every interface
    const wildcard = host === '0.0.0.0' || host === '::';
    const addr = o.config.nodes.find((n) => n.name === o.node)?.address ?? host;
    const h = wildcard ? addr : host;
    const loopback = (a: string) => a === 'localhost' || a === '::1' || a.startsWith('127.');
    if (loopback(h) && !loopback(addr))
      log(
        'warn',
        `the API listens on ${h}: other nodes cannot forward ${o.node}'s VM consoles here; listen on 0.0.0.0 or ${addr}`,
      );
    forget = await recordApiEndpoint(o.store, k, {
      node: o.node,
      url: `${scheme}://${h.includes(':') ? `[${h}]` : h}:${port}`,
      pid: process.pid,
      sinceMs: Date.now(),
    });
  }
  return {
    app,
    ctx,
    port,
    url: `${scheme}://${shownHost}:${port}`,
    close: async () => {
      await forget?.().catch(() => undefined);
      detach();
      await hub.close();
      app.server.closeAllConnections?.();
      await app.close();
    },
  };
}

/** Where the demo (or `corral api --write-client`) leaves the URL and token for the CLI. */
export function clientFileFor(configPath: string): string {
  return join(dirname(resolve(configPath)), 'api.json');
}
