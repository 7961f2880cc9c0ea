// How the CLI reaches a cluster: through the REST API (--url/--token, $CORRAL_URL/$CORRAL_TOKEN,
// or the api.json the demo writes beside its config) or, without one, straight through the store.
// Both implement one interface, so every command works either way.
import { existsSync, readFileSync } from 'node:fs';
import type { Command } from 'commander';
import type { ClusterEvent } from '../core/types.js';
import { ResourceSpec } from '../core/spec.js';
import { CorralError } from '../core/errors.js';
import { readStatus, readEvents, type StatusData } from './status.js';
import { openCluster, resolveConfigPath, type ClusterContext, type GlobalOpts } from './context.js';
import * as ops from '../api/ops.js';
import { clientFileFor } from '../api/server.js';

/** every API call fails after this long instead of hanging */
export const clientRequestTimeoutMs = 10000;

export interface ResourceDetail {
  spec: ResourceSpec;
  record: Record<string, unknown> | null;
  observed: ({ node: string; state: string; epoch: number; reason: string } & Record<string, unknown>)[];
}

export interface CorralClient {
  /** 'api http://…' or 'store sqlite:…' (for messages) */
  readonly via: string;
  status(eventsMax?: number): Promise<StatusData>;
  events(limit: number): Promise<ClusterEvent[]>;
  resource(id: string): Promise<ResourceDetail>;
  define(spec: ResourceSpec, source: string): Promise<string>;
  undefine(id: string): Promise<void>;
  setDesired(id: string, desired: 'started' | 'stopped'): Promise<void>;
  move(id: string, node: string | null): Promise<void>;
  cleanup(id: string): Promise<void>;
  maintenance(node: string, on: boolean): Promise<void>;
  close(): Promise<void>;
}

export interface ClientOpts extends GlobalOpts {
  url?: string;
  token?: string;
}

export function addClientOptions(cmd: Command): Command {
  return cmd
    .option('--url <url>', 'talk to this Corral API (default: $CORRAL_URL, or the demo API)')
    .option('--token <token>', 'API bearer token (default: $CORRAL_TOKEN)');
}

export class ApiClientError extends CorralError {
  constructor(
    code: string,
    message: string,
    readonly status: number,
    hint?: string,
  ) {
    super(code, message, hint);
  }
}

export class HttpClient implements CorralClient {
  readonly via: string;
  constructor(
    readonly url: string,
    readonly token: string,
  ) {
    this.url = url.replace(/\/+$/, '');
    this.via = `api ${this.url}`;
  }

  private async call<T>(method: string, path: string, body?: unknown): Promise<T> {
    let res: Response;
    try {
      res = await fetch(`${this.url}/api/v1${path}`, {
        method,
        headers: {
          authorization: `Bearer ${this.token}`,
          ...(body === undefined ? {} : { 'content-type': 'application/json' }),
        },
        body: body === undefined ? undefined : JSON.stringify(body),
        signal: AbortSignal.timeout(clientRequestTimeoutMs),
      });
    } catch (err) {
      throw new CorralError(
        'CORRAL_STORE_UNAVAILABLE',
        `cannot reach the Corral API at ${this.url}: ${(err as Error).cause ?? (err as Error).message}`,
        'is `corral api` (or the demo) running? pass --url, or --config to use the store directly',
      );
    }
    const data = (await res.json().catch(() => ({}))) as Record<string, unknown>;
    if (!res.ok)
      throw new ApiClientError(
        String(data.code ?? 'CORRAL_API_ERROR'),
        `${String(data.message ?? res.statusText)}${data.path ? ` (at ${String(data.path)})` : ''}`,
        res.status,
        data.hint as string | undefined,
      );
    return data as T;
  }

  status(): Promise<StatusData> {
    return this.call('GET', '/status');
  }
  async events(limit: number): Promise<ClusterEvent[]> {
    return (await this.call<{ events: ClusterEvent[] }>('GET', `/events?limit=${limit}`)).events;
  }
  resource(id: string): Promise<ResourceDetail> {
    return this.call('GET', `/resources/${encodeURIComponent(id)}`);
  }
  async define(spec: ResourceSpec): Promise<string> {
    const r = await this.call<{ message: string }>('PUT', `/resources/${encodeURIComponent(spec.id)}`, spec);
    return r.message.split(': ')[1] ?? 'defined';
  }
  async undefine(id: string): Promise<void> {
    await this.call('DELETE', `/resources/${encodeURIComponent(id)}`);
  }
  async setDesired(id: string, desired: 'started' | 'stopped'): Promise<void> {
    await this.call(
      'POST',
      `/resources/${encodeURIComponent(id)}/${desired === 'started' ? 'start' : 'stop'}`,
    );
  }
  async move(id: string, node: string | null): Promise<void> {
    await this.call('POST', `/resources/${encodeURIComponent(id)}/move`, { node });
  }
  async cleanup(id: string): Promise<void> {
    await this.call('POST', `/resources/${encodeURIComponent(id)}/cleanup`);
  }
  async maintenance(node: string, on: boolean): Promise<void> {
    await this.call('POST', `/nodes/${encodeURIComponent(node)}/maintenance`, { on });
  }
  /** a one-time console ticket for a VM (POST /vms/ID/console); its url is relative to this.url */
  consoleTicket(id: string): Promise<{ token: string; expiresAtMs: number; url: string; node: string }> {
    return this.call('POST', `/vms/${encodeURIComponent(id)}/console`);
  }
  async close(): Promise<void> {}
}

export class StoreClient implements CorralClient {
  readonly via: string;
  private o: ops.OpsContext;
  constructor(readonly c: ClusterContext) {
    this.via = `store ${c.store.url}`;
    this.o = {
      store: c.store,
      k: c.k,
      by: `operator@${process.env.USER ?? 'cli'}`,
      nodeNames: c.config.nodes.map((n) => n.name),
    };
  }
  status(eventsMax = 8): Promise<StatusData> {
    return readStatus(this.c.store, this.c.config.cluster.name, this.c.k, this.o.nodeNames, eventsMax);
  }
  events(limit: number): Promise<ClusterEvent[]> {
    return readEvents(this.c.store, this.c.k, limit);
  }
  async resource(id: string): Promise<ResourceDetail> {
    const spec = await ops.getSpec(this.o, id);
    const recKv = await this.c.store.get(this.c.k.assign(id));
    const statuses = await this.c.store.range(this.c.k.statuses);
    const observed = statuses.kvs
      .filter((kv) => kv.key.endsWith(`/${id}`))
      .map((kv) => ({
        node: kv.key.slice(this.c.k.statuses.length).split('/')[0] ?? '',
        ...(JSON.parse(kv.value) as { state: string; epoch: number; reason: string }),
      }));
    return { spec, record: recKv ? (JSON.parse(recKv.value) as Record<string, unknown>) : null, observed };
  }
  define(spec: ResourceSpec, source: string): Promise<string> {
    return ops.defineResource(this.o, spec, source);
  }
  undefine(id: string): Promise<void> {
    return ops.undefineResource(this.o, id);
  }
  setDesired(id: string, desired: 'started' | 'stopped'): Promise<void> {
    return ops.setDesired(this.o, id, desired);
  }
  async move(id: string, node: string | null): Promise<void> {
    await ops.moveResource(this.o, id, node);
  }
  cleanup(id: string): Promise<void> {
    return ops.cleanupResource(this.o, id);
  }
  maintenance(node: string, on: boolean): Promise<void> {
    return ops.setMaintenance(this.o, node, on);
  }
  close(): Promise<void> {
    return this.c.close();
  }
}

/** --url/--token, $CORRAL_URL/$CORRAL_TOKEN, the demo's api.json beside the config, else the store. */
export async function openClient(opts: ClientOpts): Promise<CorralClient> {
  return (await openApiClient(opts)) ?? new StoreClient(await openCluster(opts));
}

/** The API client openClient would use, or undefined when it would go to the store. */
export async function openApiClient(opts: ClientOpts): Promise<HttpClient | undefined> {
  const url = opts.url ?? process.env.CORRAL_URL;
  const token = opts.token ?? process.env.CORRAL_TOKEN;
  if (url) {
    if (!token)
      throw new CorralError(
        'CORRAL_USAGE',
        `--url ${url} needs a token`,
        'pass --token or set CORRAL_TOKEN (corral token create --role operator)',
      );
    return new HttpClient(url, token);
  }
  let configPath: string | undefined;
  try {
    configPath = resolveConfigPath(opts.config);
  } catch (err) {
    if (!opts.config) throw err;
  }
  if (configPath && !opts.config) {
    const f = clientFileFor(configPath);
    if (existsSync(f)) {
      try {
        const j = JSON.parse(readFileSync(f, 'utf8')) as { url?: string; token?: string };
        if (j.url && j.token) {
          const h = new HttpClient(j.url, token ?? j.token);
          // a demo that died leaves its file behind: fall back to the store when nobody answers
          const up = await fetch(`${j.url}/api/v1/health`, { signal: AbortSignal.timeout(1000) }).then(
            (r) => r.ok,
            () => false,
          );
          if (up) return h;
        }
      } catch {
        // unreadable file: use the store
      }
    }
  }
  return undefined;
}

export async function withClient<T>(opts: ClientOpts, fn: (c: CorralClient) => Promise<T>): Promise<T> {
  const c = await openClient(opts);
  try {
    return await fn(c);
  } finally {
    await c.close();
  }
}
