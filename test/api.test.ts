// The REST API in-process on a real SQLite store (no agents needed): auth and roles, precise 4xx
// errors (never 500 for bad input), resource CRUD and actions with events naming the token, paged
// events and the live SSE stream, config apply/history/rollback, OpenAPI, metrics, TLS.
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { spawnSync } from 'node:child_process';
import { request as httpsRequest } from 'node:https';
import { openStore } from '../src/store/index.js';
import type { Store } from '../src/store/types.js';
import { loadClusterConfig } from '../src/config/schema.js';
import { startApi, type ApiServer } from '../src/api/server.js';
import { createToken, revokeToken, tokenCacheMs } from '../src/api/auth.js';
import { startApiThread, ApiThreadError } from '../src/api/thread.js';
import { keys } from '../src/core/keys.js';
import { corralBin } from './helpers/cluster.js';
import type { ClusterEvent } from '../src/core/types.js';

const configYaml = (extra = '') => `version: 1
cluster: { name: apitest }
store: sqlite:./store.db
${extra}nodes:
  - { name: n1, address: 127.0.0.1, capacity: { cpus: 2, memory: 512 } }
  - { name: n2, address: 127.0.0.2, capacity: { cpus: 2, memory: 512 } }
`;

describe('REST API', { timeout: 60_000 }, () => {
  const dir = mkdtempSync(join(tmpdir(), 'corral-api-'));
  const configPath = join(dir, 'cluster.yaml');
  let store: Store;
  let api: ApiServer;
  const tok: Record<string, string> = {};

  const call = async (
    method: string,
    path: string,
    opts: { token?: string; body?: unknown; raw?: string; type?: string } = {},
  ) => {
    const headers: Record<string, string> = {};
    if (opts.token) headers.authorization = `Bearer ${opts.token}`;
    if (opts.body !== undefined || opts.raw !== undefined)
      headers['content-type'] = opts.type ?? 'application/json';
    const res = await fetch(api.url + path, {
      method,
      headers,
      body: opts.raw ?? (opts.body === undefined ? undefined : JSON.stringify(opts.body)),
    });
    const text = await res.text();
    let json: Record<string, unknown>;
    try {
      json = JSON.parse(text) as Record<string, unknown>;
    } catch {
      json = { text };
    }
    return { status: res.status, json };
  };

  before(async () => {
    writeFileSync(configPath, configYaml());
    store = await openStore(`sqlite:${join(dir, 'store.db')}`);
    for (const role of ['viewer', 'operator', 'admin'] as const)
      tok[role] = (await createToken(store, 'apitest', `t-${role}`, role, Date.now())).token;
    api = await startApi({
      store,
      config: loadClusterConfig(configPath),
      configPath,
      listen: '127.0.0.1:0',
      stateRoot: join(dir, 'state'),
      log: () => undefined,
    });
  });
  after(async () => {
    await api?.close();
    await store?.close();
    rmSync(dir, { recursive: true, force: true });
  });

  it('asks for a token, and checks roles', async () => {
    let r = await call('GET', '/api/v1/status');
    assert.equal(r.status, 401);
    assert.equal(r.json.code, 'CORRAL_API_UNAUTHORIZED');
    assert.equal(r.json.path, 'headers.authorization');
    r = await call('GET', '/api/v1/status', { token: 'crl_' + 'x'.repeat(43) });
    assert.equal(r.status, 401);
    r = await call('GET', '/api/v1/status', { token: tok.viewer });
    assert.equal(r.status, 200);
    assert.equal(r.json.cluster, 'apitest');
    r = await call('POST', '/api/v1/resources', {
      token: tok.viewer,
      body: { id: 'x', process: { command: ['true'] } },
    });
    assert.equal(r.status, 403);
    assert.equal(r.json.code, 'CORRAL_API_FORBIDDEN');
    r = await call('GET', '/api/v1/tokens', { token: tok.operator });
    assert.equal(r.status, 403);
  });

  it('answers bad input with a 4xx naming the field, never a 500', async () => {
    const cases: [string, string, { body?: unknown; raw?: string; type?: string }, number, string][] = [
      ['POST', '/api/v1/resources', { raw: '{not json' }, 400, 'body'],
      [
        'POST',
        '/api/v1/resources',
        { body: { id: 'Bad Id', process: { command: ['true'] } } },
        400,
        'body.id',
      ],
      [
        'POST',
        '/api/v1/resources',
        { body: { id: 'ok', process: { command: [] } } },
        400,
        'body.process.command',
      ],
      [
        'POST',
        '/api/v1/resources',
        { body: { id: 'ok', process: { command: ['true'] }, bogus: 1 } },
        400,
        'body',
      ],
      ['POST', '/api/v1/resources', { body: [1, 2] }, 400, 'body'],
      ['POST', '/api/v1/resources', { raw: 'x'.repeat(2 * 1024 * 1024) }, 413, 'body'],
      ['POST', '/api/v1/resources', { raw: 'id=x', type: 'text/plain' }, 400, 'body'],
      ['POST', '/api/v1/resources', { raw: 'id=x', type: 'application/x-www-form-urlencoded' }, 415, 'body'],
      ['GET', '/api/v1/resources/NOT..VALID', {}, 400, 'params.id'],
      ['GET', '/api/v1/resources/missing', {}, 404, 'params.id'],
      ['GET', '/api/v1/events?limit=0', {}, 400, 'query.limit'],
      ['GET', '/api/v1/events?limit=abc', {}, 400, 'query.limit'],
      ['POST', '/api/v1/nodes/n9/maintenance', { body: { on: true } }, 404, 'params.node'],
      ['POST', '/api/v1/nodes/n1/maintenance', { body: { on: 'yes' } }, 400, 'body.on'],
      ['GET', '/api/v1/nope', {}, 404, ''],
    ];
    for (const [method, path, o, status, field] of cases) {
      const r = await call(method, path, { token: tok.admin, ...o });
      assert.equal(r.status, status, `${method} ${path}: ${JSON.stringify(r.json)}`);
      assert.equal(typeof r.json.code, 'string');
      assert.equal(typeof r.json.message, 'string');
      assert.ok(
        String(r.json.path).startsWith(field),
        `${method} ${path}: path ${String(r.json.path)} should start with ${field}`,
      );
    }
  });

  it('defines, operates and undefines resources; every mutation is an event naming its token', async () => {
    let r = await call('POST', '/api/v1/resources', {
      token: tok.operator,
      body: { id: 'web', process: { command: ['sleep', '100'] } },
    });
    assert.equal(r.status, 201, JSON.stringify(r.json));
    r = await call('POST', '/api/v1/resources', {
      token: tok.operator,
      body: { id: 'web', process: { command: ['sleep', '100'] } },
    });
    assert.equal(r.status, 409);
    for (const [path, body] of [
      ['/api/v1/resources/web/stop', undefined],
      ['/api/v1/resources/web/start', undefined],
      ['/api/v1/resources/web/move', { node: 'n2' }],
      ['/api/v1/resources/web/cleanup', undefined],
      ['/api/v1/nodes/n1/maintenance', { on: true }],
    ] as const) {
      r = await call('POST', path, { token: tok.operator, body });
      assert.equal(r.status, 200, `${path}: ${JSON.stringify(r.json)}`);
    }
    r = await call('POST', '/api/v1/resources/web/move', { token: tok.operator, body: { node: 'n7' } });
    assert.equal(r.status, 404);
    assert.equal(r.json.path, 'body.node');
    r = await call('POST', '/api/v1/vms/web/migrate', { token: tok.operator, body: { node: 'n2' } });
    assert.equal(r.status, 404, 'a process resource is not a VM');
    r = await call('GET', '/api/v1/resources/web', { token: tok.viewer });
    assert.equal(r.status, 200);
    const spec = r.json.spec as { preferredNode?: string; desired: string };
    assert.equal(spec.preferredNode, 'n2');
    assert.equal(spec.desired, 'started');
    const history = r.json.history as ClusterEvent[];
    assert.deepEqual(
      history.map((e) => e.action),
      ['defined', 'stop', 'start', 'move', 'cleanup'],
    );
    assert.ok(history.every((e) => e.by === 'token:t-operator'));
    // VMs: same records, migrate = move
    r = await call('POST', '/api/v1/vms', {
      token: tok.operator,
      body: { id: 'vm1', kind: 'vm', vm: { memory: 32 } },
    });
    assert.equal(r.status, 201, JSON.stringify(r.json));
    r = await call('POST', '/api/v1/vms/vm1/migrate', { token: tok.operator, body: { node: 'n1' } });
    assert.equal(r.status, 200, JSON.stringify(r.json));
    r = await call('GET', '/api/v1/vms', { token: tok.viewer });
    assert.deepEqual(
      (r.json as unknown as { id: string }[]).map((x) => x.id),
      ['vm1'],
    );
    // destroy = kill at once (killOnStop) until an API start/stop or `corral resource start`
    const vmSpec = async () =>
      (await call('GET', '/api/v1/vms/vm1', { token: tok.viewer })).json.spec as {
        desired: string;
        killOnStop?: boolean;
      };
    r = await call('POST', '/api/v1/vms/vm1/destroy', { token: tok.operator });
    assert.equal(r.status, 200, JSON.stringify(r.json));
    let after = await vmSpec();
    assert.equal(after.desired, 'stopped');
    assert.equal(after.killOnStop, true);
    r = await call('POST', '/api/v1/resources/web/destroy', { token: tok.operator });
    assert.equal(r.status, 404, 'only VMs are destroyed');
    r = await call('POST', '/api/v1/vms/vm1/start', { token: tok.operator });
    assert.equal(r.status, 200, JSON.stringify(r.json));
    after = await vmSpec();
    assert.equal(after.desired, 'started');
    assert.equal(after.killOnStop, undefined, 'an API start ends the kill-at-once');
    for (const [verb, desired] of [
      ['stop', 'stopped'],
      ['start', 'started'],
    ] as const) {
      r = await call('POST', '/api/v1/vms/vm1/destroy', { token: tok.operator });
      assert.equal(r.status, 200, JSON.stringify(r.json));
      assert.equal((await vmSpec()).killOnStop, true);
      const cli = spawnSync(
        process.execPath,
        [
          join(import.meta.dirname, '..', 'bin', 'corral.js'),
          'resource',
          verb,
          'vm1',
          '--config',
          configPath,
        ],
        { encoding: 'utf8', timeout: 30_000, env: { ...process.env, CORRAL_HOME: join(dir, 'home') } },
      );
      assert.equal(cli.status, 0, cli.stdout + cli.stderr);
      after = await vmSpec();
      assert.equal(after.desired, desired);
      assert.equal(after.killOnStop, undefined, `\`corral resource ${verb}\` ends the kill-at-once`);
    }
    r = await call('DELETE', '/api/v1/resources/web', { token: tok.operator });
    assert.equal(r.status, 200);
    assert.equal((await store.get(keys('apitest').resource('web'))) === undefined, true);
    // status: resources carry id, node, state
    r = await call('GET', '/api/v1/status', { token: tok.viewer });
    const res = (r.json.resources as { id: string; node: unknown; state: string }[])[0]!;
    assert.deepEqual(
      Object.keys(res)
        .filter((k) => ['id', 'node', 'state'].includes(k))
        .sort(),
      ['id', 'node', 'state'],
    );
  });

  it('pages the event log and streams new events live (SSE)', async () => {
    let r = await call('GET', '/api/v1/events?limit=3', { token: tok.viewer });
    const page1 = r.json.events as (ClusterEvent & { key: string })[];
    assert.equal(page1.length, 3);
    r = await call('GET', '/api/v1/events?limit=2&after=' + encodeURIComponent(page1[0]!.key), {
      token: tok.viewer,
    });
    assert.deepEqual(
      (r.json.events as { key: string }[]).map((e) => e.key),
      [page1[1]!.key, page1[2]!.key],
    );
    const ac = new AbortController();
    const res = await fetch(`${api.url}/api/v1/events/stream?access_token=${tok.viewer}`, {
      signal: ac.signal,
    });
    assert.equal(res.status, 200);
    assert.match(res.headers.get('content-type') ?? '', /text\/event-stream/);
    const reader = res.body!.getReader();
    let buf = '';
    const readUntil = async (re: RegExp) => {
      const deadline = Date.now() + 5000;
      while (!re.test(buf)) {
        if (Date.now() > deadline) throw new Error(`no ${re} in SSE stream: ${buf}`);
        const { value, done } = await reader.read();
        if (done) throw new Error('stream ended');
        buf += new TextDecoder().decode(value);
      }
    };
    await readUntil(/event: hello/);
    await call('POST', '/api/v1/nodes/n1/maintenance', { token: tok.operator, body: { on: false } });
    await readUntil(/event: event\ndata: .*maintenance-off/);
    await readUntil(/event: change/);
    ac.abort();
    await reader.cancel().catch(() => undefined);
  });

  it('shows, validates, applies and rolls back the cluster config with history', async () => {
    let r = await call('GET', '/api/v1/config', { token: tok.viewer });
    assert.equal(r.json.version, 0);
    r = await call('POST', '/api/v1/config/validate', {
      token: tok.viewer,
      body: { yaml: configYaml().replace('memory: 512 }', 'memory: -5 }') },
    });
    assert.equal(r.json.ok, false);
    const errs = r.json.errors as { line: number; path: string }[];
    assert.equal(errs[0]!.path, 'nodes[0].capacity.memory');
    assert.equal(errs[0]!.line, 5);
    r = await call('PUT', '/api/v1/config', { token: tok.operator, body: { yaml: configYaml() } });
    assert.equal(r.status, 403);
    r = await call('PUT', '/api/v1/config', {
      token: tok.admin,
      body: { yaml: 'version: 1\ncluster: { name: apitest }\nnodes: 5\n' },
    });
    assert.equal(r.status, 400);
    assert.match(String(r.json.path), /^body\.yaml/);
    r = await call('PUT', '/api/v1/config', {
      token: tok.admin,
      body: { yaml: configYaml().replace('cluster: { name: apitest }', 'cluster: { name: other }') },
    });
    assert.equal(r.status, 400);
    r = await call('PUT', '/api/v1/config', { token: tok.admin, body: { yaml: configYaml() } });
    assert.equal(r.json.version, 1);
    const v2 = configYaml('timings: { leaseTtlMs: 6000 }\n');
    r = await call('PUT', '/api/v1/config', { token: tok.admin, body: { yaml: v2 } });
    assert.equal(r.json.version, 2);
    r = await call('POST', '/api/v1/config/rollback', { token: tok.admin, body: { version: 1 } });
    assert.equal(r.json.version, 3);
    r = await call('GET', '/api/v1/config', { token: tok.viewer });
    assert.equal(r.json.yaml, configYaml());
    r = await call('GET', '/api/v1/config/history', { token: tok.viewer });
    assert.deepEqual(
      (r.json as unknown as { version: number }[]).map((h) => h.version),
      [1, 2, 3],
    );
    r = await call('POST', '/api/v1/config/rollback', { token: tok.admin, body: { version: 99 } });
    assert.equal(r.status, 404);
  });

  it('creates, lists and revokes tokens; a revoked token stops working', async () => {
    let r = await call('POST', '/api/v1/tokens', { token: tok.admin, body: { name: 'bob', role: 'viewer' } });
    assert.equal(r.status, 201);
    const bob = String(r.json.token);
    assert.match(bob, /^crl_[A-Za-z0-9_-]{43}$/);
    r = await call('GET', '/api/v1/tokens', { token: tok.admin });
    const list = r.json as unknown as { name: string }[];
    assert.ok(list.some((t) => t.name === 'bob'));
    assert.ok(!JSON.stringify(list).includes(bob), 'listing never shows the secret');
    const stored = await store.range('/corral/apitest/tokens/');
    assert.ok(
      !stored.kvs.some((kv) => kv.key.includes(bob) || kv.value.includes(bob)),
      'the store keeps only a hash',
    );
    assert.equal((await call('GET', '/api/v1/whoami', { token: bob })).json.name, 'bob');
    r = await call('DELETE', '/api/v1/tokens/bob', { token: tok.admin });
    assert.equal(r.status, 200);
    await new Promise((res) => setTimeout(res, 1100));
    assert.equal((await call('GET', '/api/v1/whoami', { token: bob })).status, 401);
  });

  it('serves the OpenAPI document from the same schemas, the dashboard and /metrics', async () => {
    const r = await call('GET', '/api/v1/openapi.json');
    assert.equal(r.json.openapi, '3.1.0');
    const paths = r.json.paths as Record<
      string,
      Record<
        string,
        { requestBody?: { content: Record<string, { schema: { properties?: Record<string, unknown> } }> } }
      >
    >;
    for (const p of [
      '/api/v1/status',
      '/api/v1/resources',
      '/api/v1/resources/{id}/move',
      '/api/v1/vms/{id}/migrate',
      '/api/v1/events',
      '/api/v1/config',
      '/api/v1/vms/{id}/console',
    ])
      assert.ok(paths[p], `openapi has ${p}`);
    const body = paths['/api/v1/resources']!.post!.requestBody!.content['application/json']!.schema;
    assert.ok(
      body.properties?.id && body.properties?.process,
      'resource body schema comes from ResourceSpec',
    );
    const page = await fetch(api.url + '/');
    assert.match(await page.text(), /<title>Corral<\/title>/);
    const novnc = await fetch(api.url + '/novnc/core/rfb.js');
    assert.equal(novnc.status, 200);
    const m = await fetch(api.url + '/metrics');
    const text = await m.text();
    assert.equal(m.status, 200);
    for (const name of [
      'corral_nodes{state="never joined"} 2',
      'corral_resources{state="stopped"}',
      'corral_api_request_duration_seconds_bucket',
      'corral_store_read_duration_seconds',
      'corral_fence_attempts_total',
      'corral_failovers_total',
    ])
      assert.ok(text.includes(name), `metrics has ${name}`);
  });

  it('serves HTTPS when network.api.tls is configured', async (t) => {
    const cert = join(dir, 'cert.pem');
    const key = join(dir, 'key.pem');
    const o = spawnSync(
      'openssl',
      [
        'req',
        '-x509',
        '-newkey',
        'rsa:2048',
        '-nodes',
        '-keyout',
        key,
        '-out',
        cert,
        '-days',
        '1',
        '-subj',
        '/CN=127.0.0.1',
      ],
      { encoding: 'utf8' },
    );
    if (o.status !== 0) return t.skip('needs openssl to make a test certificate');
    const tlsPath = join(dir, 'tls.yaml');
    writeFileSync(
      tlsPath,
      configYaml(`network: { api: { listen: 127.0.0.1:7440, tls: { cert: ${cert}, key: ${key} } } }\n`),
    );
    const s = await startApi({
      store,
      config: loadClusterConfig(tlsPath),
      configPath: tlsPath,
      listen: '127.0.0.1:0',
      log: () => undefined,
    });
    try {
      assert.match(s.url, /^https:/);
      const body = await new Promise<string>((resolve, reject) => {
        const req = httpsRequest(
          `${s.url}/api/v1/status`,
          { rejectUnauthorized: false, headers: { authorization: `Bearer ${tok.viewer}` } },
          (res) => {
            let b = '';
            res.on('data', (d: Buffer) => (b += d.toString()));
            res.on('end', () => resolve(b));
          },
        );
        req.on('error', reject);
        req.end();
      });
      assert.equal((JSON.parse(body) as { cluster: string }).cluster, 'apitest');
    } finally {
      await s.close();
    }
  });

  it('drops a token changed in the store as soon as its watch delivers the change, not after the cache time', async () => {
    // as `corral token create|revoke` from another process: straight into the store
    const carol = (await createToken(store, 'apitest', 'carol', 'viewer', Date.now())).token;
    assert.equal((await call('GET', '/api/v1/whoami', { token: carol })).json.name, 'carol');
    assert.equal(await revokeToken(store, 'apitest', 'carol'), 1);
    const t0 = Date.now();
    while ((await call('GET', '/api/v1/whoami', { token: carol })).status === 200) {
      assert.ok(
        Date.now() - t0 < tokenCacheMs / 2,
        'the revoked token still worked after half the cache time',
      );
      await new Promise((r) => setTimeout(r, 10));
    }
    assert.equal((await call('GET', '/api/v1/whoami', { token: carol })).status, 401);
  });

  it("serves an agent's API from a worker thread with its own store connection", async () => {
    const th = await startApiThread({
      configPath,
      stateRoot: join(dir, 'state'),
      listen: '127.0.0.1:0',
      opTimeoutMs: 3000,
      log: () => undefined,
    });
    try {
      const r = await fetch(`${th.url}/api/v1/status`, {
        headers: { authorization: `Bearer ${tok.viewer}` },
      });
      assert.equal(r.status, 200);
      assert.equal(((await r.json()) as { cluster: string }).cluster, 'apitest');
      await assert.rejects(
        startApiThread({
          configPath,
          listen: `127.0.0.1:${th.port}`,
          opTimeoutMs: 3000,
          log: () => undefined,
        }),
        (e: unknown) => e instanceof ApiThreadError && e.code === 'EADDRINUSE',
      );
    } finally {
      await th.close();
    }
    await assert.rejects(fetch(`${th.url}/api/v1/health`), 'the thread closed its server');
  });

  it('corral api refuses a bad --nice with a usage error naming the flag', () => {
    for (const bad of ['99', '-3.5', 'high']) {
      const r = spawnSync(process.execPath, [corralBin, 'api', '--config', configPath, '--nice', bad], {
        encoding: 'utf8',
        timeout: 30_000,
      });
      assert.equal(r.status, 2, `--nice ${bad}: ${r.stderr}`);
      assert.match(
        r.stderr,
        new RegExp(`--nice ${bad.replace('.', '\\.')}: expected a whole number from -20 to 19`),
      );
    }
  });
});
