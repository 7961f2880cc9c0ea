// bench/api: GET /api/v1/status latency (p50/p99) and requests/s from a `corral api` process,
// at rest and during a failover of 50 services (a 3-agent cluster from test/helpers/cluster.ts;
// the node running the most of them is crashed with the local fence). Target: p99 < 50 ms during failover.
// Usage: npx tsx bench/api.ts [--services 50] [--concurrency 8] [--rest-ms 5000] [--think-ms 25]
//        [--rest-think-ms 0] [--lease-ms 4000]
//        [--compare DIR]   also run `corral api` from another checkout DIR (e.g. an older commit:
//                          git archive C | tar -x -C DIR; ln -s $PWD/node_modules DIR) on the same
//                          cluster; the clients alternate between the two servers, so both are
//                          measured under the same load and the ratio is fair on a busy machine.
import { spawn, type ChildProcess } from 'node:child_process';

function run(cmd: string, args: string[]): Promise<{ code: number; stderr: string }> {
  return new Promise((resolve) => {
    const p = spawn(cmd, args, { stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    p.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    p.on('close', (code) => resolve({ code: code ?? -1, stderr }));
  });
}
import { readFileSync } from 'node:fs';
import { cpus, loadavg } from 'node:os';
import { join, resolve } from 'node:path';
import { Worker } from 'node:worker_threads';
import { Agent, request } from 'node:http';
import { TestCluster, corralBin } from '../test/helpers/cluster.js';
import { ResourceSpec } from '../src/core/spec.js';
import { createToken } from '../src/api/auth.js';

const arg = (name: string, dflt: string) => {
  const i = process.argv.indexOf(name);
  return i >= 0 ? (process.argv[i + 1] ?? dflt) : dflt;
};
const services = Number(arg('--services', '50'));
const concurrency = Number(arg('--concurrency', '8'));
const restMs = Number(arg('--rest-ms', '5000'));
const failoverTimeoutMs = 60000;
const port = 27000 + (process.pid % 1000);
const requestTimeoutMs = 5000;
/** during the failover each client pauses between requests (about concurrency x 40 req/s), so the
 * benchmark's own load does not starve the agents of CPU on a 2-core machine */
const duringThinkMs = Number(arg('--think-ms', '25'));
/** at rest the clients do not pause by default (requests/s); on a crowded machine that can starve the agents */
const restThinkMs = Number(arg('--rest-think-ms', '0'));
/** agents' lease; a longer one keeps a crowded machine's starved agents from being fenced at rest */
const leaseTtlMs = Number(arg('--lease-ms', '4000'));
const compareDir = arg('--compare', '');

/**
 * The load generator runs in a worker thread: this thread polls the store (SQLite, synchronous) to
 * follow the failover, and those stalls must not count as API latency. Plain JavaScript, so the
 * worker needs no TypeScript loader.
 */
const loadWorkerSource = `
const { parentPort, workerData } = require('node:worker_threads');
const { Agent, request } = require('node:http');
const { ports, token, concurrency, thinkMs, timeoutMs, path } = workerData;
const agent = new Agent({ keepAlive: true, maxSockets: concurrency });
let done = false;
parentPort.on('message', () => (done = true));
function get(port) {
  return new Promise((resolve, reject) => {
    const t0 = performance.now();
    const req = request({ host: '127.0.0.1', port, path, agent, headers: { authorization: 'Bearer ' + token }, timeout: timeoutMs }, (res) => {
      res.resume();
      res.on('end', () => (res.statusCode === 200 ? resolve(performance.now() - t0) : reject(new Error('HTTP ' + res.statusCode))));
    });
    req.on('error', reject);
    req.on('timeout', () => req.destroy(new Error('timeout')));
    req.end();
  });
}
(async () => {
  const lat = ports.map(() => []);
  const errors = ports.map(() => 0);
  const t0 = performance.now();
  // client i talks to ports[i % n]: with two servers, each gets half the clients at the same time
  await Promise.all(Array.from({ length: concurrency }, async (_, i) => {
    const j = i % ports.length;
    while (!done) {
      try {
        lat[j].push(await get(ports[j]));
        if (thinkMs > 0) await new Promise((r) => setTimeout(r, thinkMs));
      } catch {
        errors[j]++;
      }
    }
  }));
  agent.destroy();
  parentPort.postMessage({ lat, errors, ms: performance.now() - t0 });
})();
`;

/** one request from this thread (health checks, warm-up) */
const agent = new Agent({ keepAlive: true, maxSockets: 1 });
function get(path: string, token: string, toPort = port): Promise<number> {
  return new Promise((resolve, reject) => {
    const t0 = performance.now();
    const req = request(
      {
        host: '127.0.0.1',
        port: toPort,
        path,
        agent,
        headers: { authorization: `Bearer ${token}` },
        timeout: requestTimeoutMs,
      },
      (res) => {
        res.resume();
        res.on('end', () =>
          res.statusCode === 200
            ? resolve(performance.now() - t0)
            : reject(new Error(`HTTP ${res.statusCode}`)),
        );
      },
    );
    req.on('error', reject);
    req.on('timeout', () => req.destroy(new Error('timeout')));
    req.end();
  });
}

interface Load {
  /** latencies in ms, per server */
  lat: number[][];
  errors: number[];
  ms: number;
  /** CPU ms each API server process used during the phase (user + system, from /proc) */
  cpuMs?: number[];
  /** p99 as each API server measured it (request read to response written), bucket bound in ms */
  serverP99Ms?: number[];
}

/** user + system CPU time of a process in ms (Linux /proc; NaN elsewhere) */
function cpuMsOf(pid: number | undefined): number {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return ((Number(f[11]) + Number(f[12])) * 1000) / clockTicksPerS;
  } catch {
    return NaN;
  }
}
/** USER_HZ: 100 on every Linux architecture Node runs on */
const clockTicksPerS = 100;

/** cumulative counts of the API's own latency histogram for GET /api/v1/status (bucket bound in s -> count) */
async function serverBuckets(port: number): Promise<Map<number, number>> {
  const out = new Map<number, number>();
  const text = await fetch(`http://127.0.0.1:${port}/metrics`).then(
    (r) => r.text(),
    () => '',
  );
  const re = /^corral_api_request_duration_seconds_bucket\{([^}]*)\} (\d+)/gm;
  for (const m of text.matchAll(re)) {
    const labels = m[1]!;
    if (!labels.includes('route="/api/v1/status"') || !labels.includes('status="200"')) continue;
    const le = /le="([^"]+)"/.exec(labels)?.[1] ?? '';
    out.set(le === '+Inf' ? Infinity : Number(le), Number(m[2]));
  }
  return out;
}

/** the smallest bucket bound (ms) under which 99% of the phase's requests were answered, server side */
function serverP99Ms(before: Map<number, number>, after: Map<number, number>): number {
  const bounds = [...after.keys()].sort((a, b) => a - b);
  const total = (after.get(Infinity) ?? 0) - (before.get(Infinity) ?? 0);
  for (const b of bounds) if ((after.get(b) ?? 0) - (before.get(b) ?? 0) >= 0.99 * total) return b * 1000;
  return NaN;
}

/** load() with the CPU each API process spent meanwhile and its own (server-side) p99 */
async function measured(
  pids: (number | undefined)[],
  ports: number[],
  run: () => Promise<Load>,
): Promise<Load> {
  const before = pids.map(cpuMsOf);
  const hBefore = await Promise.all(ports.map(serverBuckets));
  const r = await run();
  const cpuMs = pids.map((p, i) => cpuMsOf(p) - before[i]!);
  const hAfter = await Promise.all(ports.map(serverBuckets));
  return { ...r, cpuMs, serverP99Ms: ports.map((_, i) => serverP99Ms(hBefore[i]!, hAfter[i]!)) };
}

/** closed-loop load from a worker thread until `until` resolves */
async function load(ports: number[], token: string, until: Promise<void>, thinkMs = 0): Promise<Load> {
  const w = new Worker(loadWorkerSource, {
    eval: true,
    workerData: {
      ports,
      token,
      concurrency,
      thinkMs,
      timeoutMs: requestTimeoutMs,
      path: '/api/v1/status',
    },
  });
  const result = new Promise<Load>((resolve, reject) => {
    w.once('message', resolve);
    w.once('error', reject);
  });
  try {
    await until;
  } finally {
    w.postMessage('stop');
  }
  const r = await result;
  await w.terminate();
  return r;
}

const pct = (xs: number[], p: number) => {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))] ?? NaN;
};

async function main(): Promise<void> {
  const c = new TestCluster({
    nodes: [
      { name: 'n1', cpus: 64 },
      { name: 'n2', cpus: 64 },
      { name: 'n3', cpus: 64 },
    ],
    leaseTtlMs,
  });
  const servers = [
    { label: 'this tree', port, bin: corralBin },
    ...(compareDir
      ? [{ label: compareDir, port: port + 1, bin: join(resolve(compareDir), 'bin', 'corral.js') }]
      : []),
  ];
  const apis: ChildProcess[] = [];
  try {
    await c.start();
    for (let i = 0; i < services; i++)
      await c.store.put(
        c.k.resource(`s${i}`),
        JSON.stringify(
          ResourceSpec.parse({
            id: `s${i}`,
            process: { command: ['sleep', '100000'], stopTimeoutMs: 1000 },
            memory: 16,
            cpus: 0.1,
            preferredNode: 'n1',
          }),
        ),
      );
    await c.waitFor(
      `${services} services started`,
      async () => {
        const s = await c.snapshot();
        return [...s.resources.values()].filter((r) => r.rec?.state === 'started').length === services;
      },
      180000,
    );
    // the preference only placed them: clear it so the failover moves them away from n1
    for (let i = 0; i < services; i++) {
      const kv = await c.store.get(c.k.resource(`s${i}`));
      const spec = JSON.parse(kv!.value) as { preferredNode?: string };
      delete spec.preferredNode;
      await c.store.put(c.k.resource(`s${i}`), JSON.stringify(spec));
    }
    const token = (await createToken(c.store, 'test', 'bench', 'viewer', Date.now())).token;
    for (const sv of servers) {
      apis.push(
        spawn(
          process.execPath,
          [
            sv.bin,
            'api',
            '--config',
            c.configPath,
            '--listen',
            `127.0.0.1:${sv.port}`,
            '--state-root',
            c.stateRoot,
          ],
          { stdio: 'ignore' },
        ),
      );
      await c.waitFor(
        `the API (${sv.label}) to answer`,
        () =>
          get('/api/v1/health', token, sv.port).then(
            () => true,
            () => false,
          ),
        30000,
      );
      for (let i = 0; i < 50; i++) await get('/api/v1/status', token, sv.port); // warm up
    }
    const ports = servers.map((sv) => sv.port);

    const pids = apis.map((a) => a.pid);
    const rest = await measured(pids, ports, () =>
      load(ports, token, new Promise((r) => setTimeout(r, restMs)), restThinkMs),
    );
    await c.waitFor(
      'every node online again after the load',
      async () => {
        const s = await c.snapshot();
        return [...s.nodes.values()].every((n) => n.status?.state === 'online');
      },
      60000,
    );
    let failoverMs = 0;
    let victimCount = 0;
    let victim = 'n1';
    const during = await measured(pids, ports, () =>
      load(
        ports,
        token,
        (async () => {
          const t0 = Date.now();
          const before = await c.snapshot();
          const per = new Map<string, number>();
          for (const x of before.resources.values())
            if (x.rec?.node) per.set(x.rec.node, (per.get(x.rec.node) ?? 0) + 1);
          victim = [...per.entries()].sort((a, b) => b[1] - a[1])[0]?.[0] ?? 'n1';
          victimCount = per.get(victim) ?? 0;
          // async: a spawnSync here would stall this process's load generator
          const r = await run(process.execPath, [
            corralBin,
            'node',
            'crash',
            victim,
            '--config',
            c.configPath,
            '--state-root',
            c.stateRoot,
          ]);
          if (r.code !== 0) throw new Error(`crash failed: ${r.stderr}`);
          await c.waitFor(
            'every service started off the crashed node',
            async () => {
              const s = await c.snapshot();
              return (
                [...s.resources.values()].filter((x) => x.rec?.state === 'started' && x.rec.node !== victim)
                  .length === services
              );
            },
            failoverTimeoutMs,
            50,
          );
          failoverMs = Date.now() - t0;
        })(),
        duringThinkMs,
      ),
    );
    const row = (name: string, x: Load, i: number) => {
      const lat = x.lat[i]!;
      return `${name.padEnd(34)} ${String(lat.length).padStart(8)} ${(lat.length / (x.ms / 1000)).toFixed(0).padStart(8)} ${pct(lat, 50).toFixed(2).padStart(8)} ${pct(lat, 99).toFixed(2).padStart(8)} ${Math.max(
        ...lat,
      )
        .toFixed(2)
        .padStart(
          8,
        )} ${String(x.errors[i]).padStart(6)} ${(x.cpuMs![i]! / lat.length).toFixed(3).padStart(10)} ${('<' + String(x.serverP99Ms![i])).padStart(10)}`;
    };
    process.stdout.write(
      `\nbench/api: GET /api/v1/status, ${concurrency} concurrent keep-alive clients in a worker thread${servers.length > 1 ? `, alternating between ${servers.length} API servers` : ''} (each pauses ${restThinkMs} ms between requests at rest, ${duringThinkMs} ms during the failover), ${cpus().length} cores, load average ${loadavg()[0]!.toFixed(1)}, store sqlite, ${services} services\n\n`,
    );
    process.stdout.write(
      `${'phase'.padEnd(34)} ${'requests'.padStart(8)} ${'req/s'.padStart(8)} ${'p50 ms'.padStart(8)} ${'p99 ms'.padStart(8)} ${'max ms'.padStart(8)} ${'errors'.padStart(6)} ${'API cpu ms/req'.padStart(10)} ${'server p99 ms'.padStart(10)}\n`,
    );
    const phases = [
      [`at rest (${(rest.ms / 1000).toFixed(1)} s)`, rest],
      [`failover of ${victimCount} on ${victim} (${(failoverMs / 1000).toFixed(1)} s)`, during],
    ] as const;
    for (const [name, x] of phases)
      servers.forEach((sv, i) =>
        process.stdout.write(row(servers.length > 1 ? `${name} [${sv.label}]` : name, x, i) + '\n'),
      );
    if (servers.length > 1) {
      process.stdout.write('\nthis tree / compared, same run:\n');
      for (const [name, x] of phases)
        process.stdout.write(
          `  ${name}: p50 ${(pct(x.lat[0]!, 50) / pct(x.lat[1]!, 50)).toFixed(2)}, p99 ${(pct(x.lat[0]!, 99) / pct(x.lat[1]!, 99)).toFixed(2)}, API cpu per request ${(x.cpuMs![0]! / x.lat[0]!.length / (x.cpuMs![1]! / x.lat[1]!.length)).toFixed(2)}\n`,
        );
    }
    const p99 = pct(during.lat[0]!, 99);
    process.stdout.write(
      `\ntarget p99 < 50 ms during failover: ${p99 < 50 ? 'met' : 'NOT met'} (${p99.toFixed(2)} ms; ratio to target ${(p99 / 50).toFixed(2)})\n`,
    );
  } finally {
    for (const a of apis) a.kill('SIGTERM');
    await c.stop();
    agent.destroy();
  }
}

await main();
