// bench/api: GET /api/v1/status latency (p50/p99) and requests/s at rest and during a failover of
// 50 services (a 3-agent cluster from test/helpers/cluster.ts; n1 runs them all and is crashed with
// the local fence). Target: p99 < 50 ms during failover. Two servers answer in the same run, the
// clients alternating between them: `corral api` alone, and the agent of n2 started with --api (it
// takes over services and may lead the manager). Both are printed; the target line names both.
// Three phases: requests/s at rest (closed loop: --concurrency clients back to back), latency at
// rest and latency during the failover (open loop: --rate requests/s to each server at fixed
// times, whatever the answers, so a slow answer never delays the next request).
// Usage: npx tsx bench/api.ts [--services 50] [--concurrency 8] [--rest-ms 5000] [--rate 100]
//        [--rest-think-ms 0] [--lease-ms 4000] [--served-by both|api|agent] [--cpu-prof DIR]
//        [--client-nice -10] [--api-nice 0] [--burn 0]
//        --burn N: N busy-loop processes at nice 0 through the measured phases: other work on the
//          host, the same in every run (counted as other work in the machine lines)
//        --api-nice N: `corral api --nice N` (default: its own default, -10); the --compare
//          checkout, which may not know --nice, is started under `nice -n N` instead
//        --client-nice N: the load generator's thread runs at this priority (needs root or
//          CAP_SYS_NICE; printed, with the reason when refused) so the instrument does not queue
//          for a CPU behind the cluster it measures; its own delays are printed per phase
//        --cpu-prof DIR: the API and agent processes write V8 CPU profiles (node --cpu-prof) to DIR
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
import { existsSync, readdirSync, readFileSync, statSync } from 'node:fs';
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
/** requests/s sent to each server in the latency phases (open loop, fixed times): a few dashboards
 * and scripts, not a flood that would starve the agents of CPU on a 2-core machine */
const rateHz = Number(arg('--rate', '100'));
if (!(rateHz > 0 && rateHz <= 1000)) throw new Error(`--rate: expected 1-1000 requests/s, got ${rateHz}`);
/** in the requests/s phase the clients do not pause by default; on a crowded machine that can starve the agents */
const restThinkMs = Number(arg('--rest-think-ms', '0'));
/** agents' lease; a longer one keeps a crowded machine's starved agents from being fenced at rest */
const leaseTtlMs = Number(arg('--lease-ms', '4000'));
const compareDir = arg('--compare', '');
/** who serves the API: `corral api` alone, the agent of apiNode (--api), or both in the same run */
const servedBy = arg('--served-by', 'both');
if (!['both', 'api', 'agent'].includes(servedBy))
  throw new Error(`--served-by: expected both, api or agent, got ${JSON.stringify(servedBy)}`);
/** the load generator thread's CPU priority (see the worker) */
const clientNice = Number(arg('--client-nice', '-10'));
if (!Number.isInteger(clientNice) || clientNice < -20 || clientNice > 19)
  throw new Error(`--client-nice: expected a whole number from -20 to 19, got ${arg('--client-nice', '')}`);
/** `corral api --nice apiNice` (the checkout of --compare: under nice -n apiNice); '' its default */
const apiNiceArg = arg('--api-nice', '');
const apiNice = Number(apiNiceArg);
if (apiNiceArg !== '' && (!Number.isInteger(apiNice) || apiNice < -20 || apiNice > 19))
  throw new Error(`--api-nice: expected a whole number from -20 to 19, got ${arg('--api-nice', '')}`);
/** busy-loop processes beside the cluster during the measured phases */
const burn = Number(arg('--burn', '0'));
if (!Number.isInteger(burn) || burn < 0 || burn > 16)
  throw new Error(`--burn: expected 0-16 busy processes, got ${arg('--burn', '')}`);
/** node --cpu-prof for the API and agent processes: profiles go to this directory on exit */
const cpuProfDir = arg('--cpu-prof', '');
const profFlags = cpuProfDir ? ['--cpu-prof', '--cpu-prof-dir', resolve(cpuProfDir)] : [];
if (cpuProfDir) process.env.CORRAL_AGENT_NODE_FLAGS = profFlags.join(' ');
/** the node whose agent serves the API (never the crashed one) and its address in the test cluster */
const apiNode = 'n2';
const apiNodeHost = '127.0.1.2';

/**
 * The load generator runs in a worker thread: this thread polls the store (SQLite, synchronous) to
 * follow the failover, and those stalls must not count as API latency. Plain JavaScript, so the
 * worker needs no TypeScript loader.
 */
const loadWorkerSource = `
const { parentPort, workerData } = require('node:worker_threads');
const { Agent, request } = require('node:http');
const { monitorEventLoopDelay } = require('node:perf_hooks');
const { targets, token, concurrency, thinkMs, rateHz, timeoutMs, path, clientNice } = workerData;
// the measuring instrument must not wait for a CPU behind the cluster it measures (an operator's
// browser runs elsewhere): this thread alone gets clientNice (Linux priorities are per thread)
let niceError = '';
try {
  require('node:os').setPriority(0, clientNice);
} catch (e) {
  niceError = String(e.code || e.message);
}
const nice = require('node:os').getPriority(0);
const agent = new Agent({ keepAlive: true, maxSockets: concurrency });
/** monitorEventLoopDelay records whole sampling intervals; the delay is what exceeds one */
const loopResolutionMs = 5;
let done = false;
parentPort.on('message', () => (done = true));
// the clients' own event-loop delay: a late client inflates the latency it records
const loop = monitorEventLoopDelay({ resolution: loopResolutionMs });
loop.enable();
function get(t) {
  return new Promise((resolve, reject) => {
    const t0 = performance.now();
    const req = request({ host: t.host, port: t.port, path, agent, headers: { authorization: 'Bearer ' + token }, timeout: timeoutMs }, (res) => {
      res.resume();
      res.on('end', () => (res.statusCode === 200 ? resolve(performance.now() - t0) : reject(new Error('HTTP ' + res.statusCode))));
    });
    req.on('error', reject);
    req.on('timeout', () => req.destroy(new Error('timeout')));
    req.end();
  });
}
/** open loop: one request to each target every 1000/rateHz ms, on schedule whatever the answers */
async function fixedRate(lat, errors, late) {
  const inflight = new Set();
  const everyMs = 1000 / rateHz;
  await Promise.all(targets.map(async (t, j) => {
    // the targets' schedules are offset so they do not send at the same instant
    let due = performance.now() + (everyMs * j) / targets.length;
    while (!done) {
      const wait = due - performance.now();
      if (wait > 0) await new Promise((r) => setTimeout(r, wait));
      if (done) break;
      late.push(Math.max(0, performance.now() - due));
      const p = get(t).then((ms) => lat[j].push(ms), () => errors[j]++);
      inflight.add(p);
      void p.finally(() => inflight.delete(p));
      due += everyMs;
    }
  }));
  await Promise.all(inflight);
}
(async () => {
  const lat = targets.map(() => []);
  const errors = targets.map(() => 0);
  const late = [];
  const t0 = performance.now();
  if (rateHz > 0) await fixedRate(lat, errors, late);
  // closed loop: client i talks to targets[i % n]; with two servers, each gets half the clients
  else await Promise.all(Array.from({ length: concurrency }, async (_, i) => {
    const j = i % targets.length;
    while (!done) {
      try {
        lat[j].push(await get(targets[j]));
        if (thinkMs > 0) await new Promise((r) => setTimeout(r, thinkMs));
      } catch {
        errors[j]++;
      }
    }
  }));
  agent.destroy();
  loop.disable();
  const over = (ns) => Math.max(0, ns / 1e6 - loopResolutionMs);
  late.sort((a, b) => a - b);
  const clientLoop = {
    p99: over(loop.percentile(99)),
    max: over(loop.max),
    lateP99: late.length ? late[Math.floor(0.99 * late.length)] : NaN,
  };
  parentPort.postMessage({ lat, errors, ms: performance.now() - t0, clientLoop, nice, niceError });
})();
`;

/** whether bin/corral.js runs the compiled dist/ (as it decides: dist/.stamp newer than every source) */
function runsCompiled(): boolean {
  const root = resolve(import.meta.dirname, '..');
  const stamp = join(root, 'dist', '.stamp');
  if (process.env.CORRAL_FROM_SOURCE || !existsSync(stamp)) return false;
  const newest = (dir: string): number =>
    readdirSync(dir, { withFileTypes: true }).reduce((m, e) => {
      const p = join(dir, e.name);
      return Math.max(m, e.isDirectory() ? newest(p) : e.name.endsWith('.ts') ? statSync(p).mtimeMs : 0);
    }, 0);
  return statSync(stamp).mtimeMs >= newest(join(root, 'src'));
}

/** one request from this thread (health checks, warm-up) */
const agent = new Agent({ keepAlive: true, maxSockets: 1 });
function get(path: string, token: string, toPort = port, host = '127.0.0.1'): Promise<number> {
  return new Promise((resolve, reject) => {
    const t0 = performance.now();
    const req = request(
      {
        host,
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
  /** each API server process's event-loop delay over the phase (prom-client's monitor), ms */
  serverLoop?: { p99: number; max: number }[];
  /** each server's status rebuilds during the phase and their mean ms */
  builds?: { n: number; meanMs: number }[];
  /** the load generator's own event-loop delay, ms; lateP99: how late the open loop sent */
  clientLoop: { p99: number; max: number; lateP99: number };
  /** the load generator thread's nice value, and why it could not set --client-nice */
  nice: number;
  niceError: string;
  /** CPU ms this bench process (clients and failover polling) used during the phase */
  benchCpuMs?: number;
  machine?: Machine;
}

interface Target {
  host: string;
  port: number;
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
/** a process's nice value (its main thread's; threads it starts later inherit it) */
function niceOf(pid: number | undefined): number {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[16]);
  } catch {
    return NaN;
  }
}
/** USER_HZ: 100 on every Linux architecture Node runs on */
const clockTicksPerS = 100;

/** the API's own latency histogram for GET /api/v1/status (cumulative: bucket bound in s -> count)
 * and the process's event-loop delay since the previous scrape (a scrape resets prom-client's monitor) */
async function serverBuckets(t: Target): Promise<{
  buckets: Map<number, number>;
  loop: { p99: number; max: number };
  /** status rebuilds so far and their total seconds */
  builds: { n: number; s: number };
}> {
  const out = new Map<number, number>();
  const text = await fetch(`http://${t.host}:${t.port}/metrics`).then(
    (r) => r.text(),
    () => '',
  );
  // prom-client samples every 10 ms and reports whole intervals: the delay is what exceeds one
  const loopMs = (name: string) => {
    const re = new RegExp(`^corral_api_process_nodejs_eventloop_lag_${name}_seconds (\\S+)`, 'm');
    return Math.max(0, Number(re.exec(text)?.[1]) * 1000 - 10);
  };
  const re = /^corral_api_request_duration_seconds_bucket\{([^}]*)\} (\d+)/gm;
  for (const m of text.matchAll(re)) {
    const labels = m[1]!;
    if (!labels.includes('route="/api/v1/status"') || !labels.includes('status="200"')) continue;
    const le = /le="([^"]+)"/.exec(labels)?.[1] ?? '';
    out.set(le === '+Inf' ? Infinity : Number(le), Number(m[2]));
  }
  const num = (name: string) => Number(new RegExp(`^${name} (\\S+)`, 'm').exec(text)?.[1] ?? NaN);
  return {
    buckets: out,
    loop: { p99: loopMs('p99'), max: loopMs('max') },
    builds: {
      n: num('corral_status_build_duration_seconds_count'),
      s: num('corral_status_build_duration_seconds_sum'),
    },
  };
}

/** the smallest bucket bound (ms) under which 99% of the phase's requests were answered, server side */
function serverP99Ms(before: Map<number, number>, after: Map<number, number>): number {
  const bounds = [...after.keys()].sort((a, b) => a - b);
  const total = (after.get(Infinity) ?? 0) - (before.get(Infinity) ?? 0);
  for (const b of bounds) if ((after.get(b) ?? 0) - (before.get(b) ?? 0) >= 0.99 * total) return b * 1000;
  return NaN;
}

/** load() with the CPU each API process spent meanwhile and its own (server-side) p99 */
/** busy and total CPU ms of the whole machine (all cores; /proc/stat) */
function machineCpuMs(): { busy: number; total: number } {
  try {
    const f = readFileSync('/proc/stat', 'utf8').split('\n')[0]!.trim().split(/\s+/).slice(1).map(Number);
    const total = f.slice(0, 8).reduce((a, b) => a + b, 0);
    const idle = f[3]! + f[4]!;
    return { busy: ((total - idle) * 1000) / clockTicksPerS, total: (total * 1000) / clockTicksPerS };
  } catch {
    return { busy: NaN, total: NaN };
  }
}

/** µs some task waited for a CPU (Linux PSI, /proc/pressure/cpu) */
function cpuPressureUs(): number {
  try {
    return Number(/^some .*total=(\d+)/m.exec(readFileSync('/proc/pressure/cpu', 'utf8'))?.[1]);
  } catch {
    return NaN;
  }
}

/** the machine during a phase: how busy, how much of it this bench's own cluster, CPU pressure */
interface Machine {
  /** busy share of all cores, 0-1 */
  busy: number;
  /** share of all cores used by this bench, its agents and API processes, 0-1 */
  ours: number;
  /** share of the time some runnable task waited for a CPU, 0-1 */
  pressure: number;
}

async function measured(
  pids: (number | undefined)[],
  targets: Target[],
  clusterPids: () => (number | undefined)[],
  run: () => Promise<Load>,
): Promise<Load> {
  const before = pids.map(cpuMsOf);
  const hBefore = await Promise.all(targets.map(serverBuckets));
  const benchBefore = cpuMsOf(process.pid);
  const ours0 = clusterPids().map(cpuMsOf);
  const m0 = machineCpuMs();
  const psi0 = cpuPressureUs();
  const t0 = performance.now();
  const r = await run();
  const wallMs = performance.now() - t0;
  const psi1 = cpuPressureUs();
  const m1 = machineCpuMs();
  const ours1 = clusterPids().map(cpuMsOf);
  const benchCpuMs = cpuMsOf(process.pid) - benchBefore;
  const cpuMs = pids.map((p, i) => cpuMsOf(p) - before[i]!);
  const hAfter = await Promise.all(targets.map(serverBuckets));
  // a process that ended during the phase (the crashed agent) counts for nothing
  const oursMs = ours1.reduce((a, x, i) => a + (Number.isNaN(x - ours0[i]!) ? 0 : x - ours0[i]!), 0);
  const allMs = m1.total - m0.total;
  return {
    ...r,
    cpuMs,
    benchCpuMs,
    machine: {
      busy: (m1.busy - m0.busy) / allMs,
      ours: oursMs / allMs,
      pressure: (psi1 - psi0) / 1000 / wallMs,
    },
    serverP99Ms: targets.map((_, i) => serverP99Ms(hBefore[i]!.buckets, hAfter[i]!.buckets)),
    serverLoop: hAfter.map((h) => h.loop),
    builds: hAfter.map((h, i) => {
      const n = h.builds.n - hBefore[i]!.builds.n;
      return { n, meanMs: n > 0 ? ((h.builds.s - hBefore[i]!.builds.s) * 1000) / n : 0 };
    }),
  };
}

/** load from a worker thread until `until` resolves: open loop at rateHz per server, or (rateHz 0)
 * closed loop, each client pausing thinkMs between requests */
async function load(
  targets: Target[],
  token: string,
  until: Promise<void>,
  mode: { rateHz: number; thinkMs?: number },
): Promise<Load> {
  const w = new Worker(loadWorkerSource, {
    eval: true,
    workerData: {
      targets,
      token,
      concurrency,
      thinkMs: mode.thinkMs ?? 0,
      clientNice,
      rateHz: mode.rateHz,
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
  const agentPort = port + 2;
  const compiled = runsCompiled();
  const c = new TestCluster({
    nodes: [
      { name: 'n1', cpus: 64 },
      { name: 'n2', cpus: 64 },
      { name: 'n3', cpus: 64 },
    ],
    leaseTtlMs,
    agentArgs: (node) =>
      node === apiNode && servedBy !== 'api' ? ['--api', `${apiNodeHost}:${agentPort}`] : [],
  });
  interface Server {
    label: string;
    host: string;
    port: number;
    /** spawn a `corral api` process from this executable; undefined: the agent of apiNode */
    bin?: string;
    pid?: number;
  }
  const servers: Server[] = [
    ...(servedBy !== 'agent' ? [{ label: 'corral api', host: '127.0.0.1', port, bin: corralBin }] : []),
    ...(servedBy !== 'api' ? [{ label: `agent ${apiNode} --api`, host: apiNodeHost, port: agentPort }] : []),
    ...(compareDir
      ? [
          {
            label: compareDir,
            host: '127.0.0.1',
            port: port + 1,
            bin: join(resolve(compareDir), 'bin', 'corral.js'),
          },
        ]
      : []),
  ];
  const apis: ChildProcess[] = [];
  const burners: ChildProcess[] = [];
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
      if (sv.bin) {
        const argv = [
          process.execPath,
          ...profFlags,
          sv.bin,
          'api',
          '--config',
          c.configPath,
          '--listen',
          `${sv.host}:${sv.port}`,
          '--state-root',
          c.stateRoot,
        ];
        // nice(1) execs node in place: the pid is the API process's
        const thisTree = sv.bin === corralBin;
        if (thisTree && apiNiceArg !== '') argv.push('--nice', apiNiceArg);
        const p =
          !thisTree && apiNiceArg !== ''
            ? spawn('nice', ['-n', apiNiceArg, ...argv], { stdio: 'ignore' })
            : spawn(argv[0]!, argv.slice(1), { stdio: 'ignore' });
        apis.push(p);
        sv.pid = p.pid;
      } else sv.pid = c.agentPid(apiNode);
      await c.waitFor(
        `the API (${sv.label}) to answer`,
        () =>
          get('/api/v1/health', token, sv.port, sv.host).then(
            () => true,
            () => false,
          ),
        30000,
      );
      for (let i = 0; i < 50; i++) await get('/api/v1/status', token, sv.port, sv.host); // warm up
    }
    const ports = servers.map((sv) => ({ host: sv.host, port: sv.port }));

    const pids = servers.map((sv) => sv.pid);
    const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));
    const agentPids = ['n1', 'n2', 'n3'].map((n) => c.agentPid(n));
    for (let i = 0; i < burn; i++)
      burners.push(spawn(process.execPath, ['-e', 'for (;;) {}'], { stdio: 'ignore' }));
    const clusterPids = () => [process.pid, ...agentPids, ...apis.map((a) => a.pid)];
    const capacity = await measured(pids, ports, clusterPids, () =>
      load(ports, token, sleep(restMs), { rateHz: 0, thinkMs: restThinkMs }),
    );
    const allOnline = () =>
      c.waitFor(
        'every node online again after the load',
        async () => {
          const s = await c.snapshot();
          return [...s.nodes.values()].every((n) => n.status?.state === 'online');
        },
        60000,
      );
    await allOnline();
    const rest = await measured(pids, ports, clusterPids, () =>
      load(ports, token, sleep(restMs), { rateHz }),
    );
    await allOnline();
    let failoverMs = 0;
    let victimCount = 0;
    let victim = 'n1';
    const during = await measured(pids, ports, clusterPids, () =>
      load(
        ports,
        token,
        (async () => {
          const t0 = Date.now();
          const before = await c.snapshot();
          const per = new Map<string, number>();
          for (const x of before.resources.values())
            if (x.rec?.node && x.rec.node !== apiNode) per.set(x.rec.node, (per.get(x.rec.node) ?? 0) + 1);
          // the busiest node, never the one whose agent serves the API
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
        { rateHz },
      ),
    );
    for (const b of burners) b.kill('SIGKILL');
    const leaderAfter = (await c.snapshot()).leader?.node ?? 'none';
    const w = [44, 8, 7, 7, 7, 7, 6, 8, 8, 13, 12];
    const line = (cells: string[]) =>
      cells.map((x, i) => (i === 0 ? x.padEnd(w[0]!) : x.padStart(w[i]!))).join(' ') + '\n';
    const row = (name: string, x: Load, i: number) => {
      const lat = x.lat[i]!;
      const loop = x.serverLoop![i]!;
      return line([
        name,
        String(lat.length),
        (lat.length / (x.ms / 1000)).toFixed(0),
        pct(lat, 50).toFixed(2),
        pct(lat, 99).toFixed(2),
        Math.max(...lat).toFixed(2),
        String(x.errors[i]),
        (x.cpuMs![i]! / lat.length).toFixed(3),
        '<' + String(x.serverP99Ms![i]),
        `${loop.p99.toFixed(0)}/${loop.max.toFixed(0)}`,
        `${x.builds![i]!.n}/${x.builds![i]!.meanMs.toFixed(2)}`,
      ]);
    };
    process.stdout.write(
      `\nbench/api: GET /api/v1/status from a worker thread, keep-alive; requests/s: ${concurrency} clients back to back${restThinkMs ? ` (pausing ${restThinkMs} ms)` : ''}${servers.length > 1 ? `, split between ${servers.length} API servers` : ''}; latency: ${rateHz} requests/s to each server at fixed times; ${cpus().length} cores, load average ${loadavg()[0]!.toFixed(1)}, store sqlite, ${services} services,${burn ? ` ${burn} busy-loop processes beside it (--burn),` : ''} leader after the failover: ${leaderAfter}, corral ${compiled ? 'compiled (dist/)' : 'from sources through tsx (dist/ is older than src/)'}\n\n`,
    );
    process.stdout.write(
      line([
        'phase [server]',
        'requests',
        'req/s',
        'p50 ms',
        'p99 ms',
        'max ms',
        'errors',
        'cpu/req',
        'srv p99',
        'loop p99/max',
        'builds/mean',
      ]),
    );
    const phases = [
      [`requests/s at rest (${(capacity.ms / 1000).toFixed(1)} s)`, capacity],
      [`at rest (${(rest.ms / 1000).toFixed(1)} s)`, rest],
      [`failover of ${victimCount} on ${victim} (${(failoverMs / 1000).toFixed(1)} s)`, during],
    ] as const;
    for (const [name, x] of phases)
      servers.forEach((sv, i) => process.stdout.write(row(`${name} [${sv.label}]`, x, i)));
    process.stdout.write(
      `\nCPU priority (nice): ${servers.map((sv) => `${sv.label} ${niceOf(sv.pid)}`).join(', ')}, agents ${['n2', 'n3'].map((n) => `${n} ${niceOf(c.agentPid(n))}`).join(', ')}, this bench ${niceOf(process.pid)}\n`,
    );
    process.stdout.write(
      "\ncpu/req: the server process's CPU ms per request it answered (an agent's includes its failover work);\n" +
        "srv p99: the server's own histogram (request read to reply written), bucket bound in ms;\n" +
        "loop p99/max: the server process's event-loop delay over the phase, ms;\n" +
        'builds/mean: status rebuilds during the phase, and their mean ms.\n',
    );
    const pc = (x: number) => `${(x * 100).toFixed(0)}%`;
    for (const [name, x] of phases)
      process.stdout.write(
        `machine, ${name}: CPU ${pc(x.machine!.busy)} busy (${cpus().length} cores), this bench's cluster ${pc(x.machine!.ours)}, other work ${pc(x.machine!.busy - x.machine!.ours)}; some task waited for a CPU ${pc(x.machine!.pressure)} of the time\n`,
      );
    for (const [name, x] of phases)
      process.stdout.write(
        `client side, ${name}: load generator (nice ${x.nice}${x.niceError ? `, --client-nice refused: ${x.niceError}` : ''}) event-loop delay p99 ${x.clientLoop.p99.toFixed(1)} ms, max ${x.clientLoop.max.toFixed(1)} ms${Number.isNaN(x.clientLoop.lateP99) ? '' : `, sends late by p99 ${x.clientLoop.lateP99.toFixed(1)} ms`}; bench process CPU ${((x.benchCpuMs! / x.ms) * 100).toFixed(0)}% of one core\n`,
      );
    if (compareDir) {
      const j = servers.length - 1;
      process.stdout.write(`\n${servers[0]!.label} / ${compareDir}, same run:\n`);
      for (const [name, x] of phases)
        process.stdout.write(
          `  ${name}: p50 ${(pct(x.lat[0]!, 50) / pct(x.lat[j]!, 50)).toFixed(2)}, p99 ${(pct(x.lat[0]!, 99) / pct(x.lat[j]!, 99)).toFixed(2)}, API cpu per request ${(x.cpuMs![0]! / x.lat[0]!.length / (x.cpuMs![j]! / x.lat[j]!.length)).toFixed(2)}\n`,
        );
    }
    process.stdout.write('\n');
    servers.forEach((sv, i) => {
      const p99 = pct(during.lat[i]!, 99);
      process.stdout.write(
        `target p99 < 50 ms during failover [${sv.label}]: ${p99 < 50 ? 'met' : 'NOT met'} (${p99.toFixed(2)} ms; ratio to target ${(p99 / 50).toFixed(2)})\n`,
      );
    });
  } finally {
    for (const b of burners) b.kill('SIGKILL');
    // wait for the API processes to close (with --cpu-prof they write their profiles then)
    await Promise.all(
      apis.map(
        (a) =>
          new Promise<void>((r) => {
            if (a.exitCode !== null || a.signalCode !== null) return r();
            const t = setTimeout(() => (a.kill('SIGKILL'), r()), 10000);
            a.once('exit', () => (clearTimeout(t), r()));
            a.kill('SIGTERM');
          }),
      ),
    );
    await c.stop();
    agent.destroy();
  }
}

await main();
