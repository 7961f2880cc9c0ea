// bench/api-churn: the cost of GET /api/v1/status itself while the store changes all the time
// (like during a failover), without agents: one SQLite store with 50 resources, 150 agent statuses
// and 3000 events; a writer changes one status every --write-every-ms; clients fetch the status
// back to back. Reports p50/p99, requests/s and the API process's CPU per request. With
// --compare DIR a second `corral api` from another checkout (see bench/api.ts) serves the same
// store and the clients alternate between the two: a same-run ratio, fair on a busy machine.
// Usage: npx tsx bench/api-churn.ts [--duration-ms 15000] [--write-every-ms 10] [--clients 2] [--compare DIR]
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { cpus, loadavg, tmpdir } from 'node:os';
import { spawn, type ChildProcess } from 'node:child_process';
import { openStore } from '../src/store/index.js';
import { keys } from '../src/core/keys.js';
import { ResourceSpec } from '../src/core/spec.js';
import { createToken } from '../src/api/auth.js';
import { corralBin } from '../test/helpers/cluster.js';

const arg = (name: string, dflt: string) => {
  const i = process.argv.indexOf(name);
  return i >= 0 ? (process.argv[i + 1] ?? dflt) : dflt;
};
const durationMs = Number(arg('--duration-ms', '15000'));
const writeEveryMs = Number(arg('--write-every-ms', '10'));
const clientsPerServer = Number(arg('--clients', '2'));
const compareDir = arg('--compare', '');
const resources = 50;
const events = 3000;
const startWaitMs = 30000;
const basePort = 28000 + (process.pid % 1000) * 2;

/** user + system CPU ms of a process (Linux /proc; USER_HZ is 100) */
function cpuMsOf(pid: number | undefined): number {
  try {
    const st = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const f = st.slice(st.lastIndexOf(')') + 2).split(' ');
    return (Number(f[11]) + Number(f[12])) * 10;
  } catch {
    return NaN;
  }
}
const pct = (xs: number[], p: number) => {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))] ?? NaN;
};

/** --writer DIR: change one agent status every --write-every-ms until killed */
async function writer(dir: string): Promise<void> {
  const store = await openStore(`sqlite:${join(dir, 'store.db')}`);
  const k = keys('test');
  for (let w = 0; ; w++) {
    await store.put(
      k.status('n2', `s${w % resources}`),
      JSON.stringify({ state: 'running', reason: `w${w}`, epoch: 3 }),
    );
    await new Promise((r) => setTimeout(r, writeEveryMs));
  }
}

async function main(): Promise<void> {
  const dir = mkdtempSync(join(tmpdir(), 'corral-bench-churn-'));
  const configPath = join(dir, 'cluster.yaml');
  writeFileSync(
    configPath,
    [
      'version: 1',
      'cluster: { name: test }',
      'store: sqlite:./store.db',
      'nodes:',
      ...[1, 2, 3].map(
        (i) => `  - { name: n${i}, address: 127.0.1.${i}, capacity: { cpus: 64, memory: 65536 } }`,
      ),
      '',
    ].join('\n'),
  );
  const store = await openStore(`sqlite:${join(dir, 'store.db')}`);
  const k = keys('test');
  const procs: ChildProcess[] = [];
  try {
    for (let i = 0; i < resources; i++) {
      const id = `s${i}`;
      const spec = ResourceSpec.parse({ id, process: { command: ['sleep', '1'] }, memory: 16, cpus: 0.1 });
      await store.put(k.resource(id), JSON.stringify(spec));
      await store.put(
        k.assign(id),
        JSON.stringify({
          id,
          state: 'started',
          reason: 'placed',
          node: 'n1',
          run: true,
          epoch: 3,
          sinceMs: Date.now(),
          failures: [],
          relocations: 0,
        }),
      );
      for (const n of ['n1', 'n2', 'n3'])
        await store.put(k.status(n, id), JSON.stringify({ state: 'running', reason: 'ok', epoch: 3 }));
    }
    for (let i = 0; i < events; i++)
      await store.put(
        k.event(Date.now(), 'bench', i),
        JSON.stringify({
          atMs: Date.now(),
          kind: 'resource',
          object: `s${i % resources}`,
          action: 'state',
          message: `s${i % resources}: started on n1`,
          by: 'manager',
        }),
      );
    const token = (await createToken(store, 'test', 'bench', 'viewer', Date.now())).token;
    const servers = [
      { label: 'this tree', bin: corralBin, port: basePort },
      ...(compareDir
        ? [{ label: compareDir, bin: join(resolve(compareDir), 'bin', 'corral.js'), port: basePort + 1 }]
        : []),
    ];
    for (const sv of servers)
      procs.push(
        spawn(
          process.execPath,
          [sv.bin, 'api', '--config', configPath, '--listen', `127.0.0.1:${sv.port}`, '--state-root', dir],
          { stdio: 'ignore' },
        ),
      );
    const get = async (port: number) => {
      const r = await fetch(`http://127.0.0.1:${port}/api/v1/status`, {
        headers: { authorization: `Bearer ${token}` },
      });
      await r.text();
      if (r.status !== 200) throw new Error(`HTTP ${r.status}`);
    };
    for (const sv of servers) {
      const t0 = Date.now();
      for (;;) {
        if (
          await get(sv.port).then(
            () => true,
            () => false,
          )
        )
          break;
        if (Date.now() - t0 > startWaitMs) throw new Error(`the API (${sv.label}) did not answer`);
        await new Promise((r) => setTimeout(r, 200));
      }
    }

    // the writer is another process: SQLite writes block their thread, which must not be the clients'
    const rev0 = await store.revision();
    const writerProc = spawn(
      process.execPath,
      ['--import', 'tsx', import.meta.filename, '--writer', dir, '--write-every-ms', String(writeEveryMs)],
      { stdio: 'ignore' },
    );
    procs.push(writerProc);
    const cpu0 = servers.map((_, i) => cpuMsOf(procs[i]!.pid));
    const lat: number[][] = servers.map(() => []);
    const errors = servers.map(() => 0);
    const t0 = Date.now();
    await Promise.all(
      servers.flatMap((sv, j) =>
        Array.from({ length: clientsPerServer }, async () => {
          while (Date.now() - t0 < durationMs) {
            const a = performance.now();
            try {
              await get(sv.port);
              lat[j]!.push(performance.now() - a);
            } catch {
              errors[j]!++;
            }
          }
        }),
      ),
    );
    const cpu = servers.map((_, i) => cpuMsOf(procs[i]!.pid) - cpu0[i]!);
    writerProc.kill('SIGTERM');
    const writes = (await store.revision()) - rev0;

    process.stdout.write(
      `\nbench/api-churn: GET /api/v1/status, ${resources} resources, ${events} events, one store write every ${writeEveryMs} ms (${writes} writes), ${clientsPerServer} clients per server, ${durationMs / 1000} s, ${cpus().length} cores, load average ${loadavg()[0]!.toFixed(1)}\n\n`,
    );
    process.stdout.write(
      `${'server'.padEnd(24)} ${'requests'.padStart(8)} ${'req/s'.padStart(8)} ${'p50 ms'.padStart(8)} ${'p99 ms'.padStart(8)} ${'errors'.padStart(6)} ${'API cpu ms/req'.padStart(14)}\n`,
    );
    servers.forEach((sv, j) => {
      const l = lat[j]!;
      process.stdout.write(
        `${sv.label.padEnd(24)} ${String(l.length).padStart(8)} ${(l.length / (durationMs / 1000)).toFixed(0).padStart(8)} ${pct(l, 50).toFixed(2).padStart(8)} ${pct(l, 99).toFixed(2).padStart(8)} ${String(errors[j]).padStart(6)} ${(cpu[j]! / l.length).toFixed(3).padStart(14)}\n`,
      );
    });
    if (servers.length > 1) {
      const [a, b] = [lat[0]!, lat[1]!];
      process.stdout.write(
        `\nthis tree / compared, same run: requests ${(a.length / b.length).toFixed(2)}, p50 ${(pct(a, 50) / pct(b, 50)).toFixed(2)}, p99 ${(pct(a, 99) / pct(b, 99)).toFixed(2)}, API cpu per request ${(cpu[0]! / a.length / (cpu[1]! / b.length)).toFixed(2)}\n`,
      );
    }
  } finally {
    for (const p of procs) p.kill('SIGTERM');
    await store.close();
    rmSync(dir, { recursive: true, force: true });
  }
}

const writerDir = arg('--writer', '');
await (writerDir ? writer(writerDir) : main());
