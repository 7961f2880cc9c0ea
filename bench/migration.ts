// bench/migration: live migration of idle VMs (64, 256, 1024 MiB) on a 2-node Corral cluster
// (real agents, SQLite store, QEMU under TCG), from the migrate request (preferred node
// written, as `corral vm migrate` does) to the target owning the VM (record on the target,
// started), side by side with a bare QMP script migrating the same kind of VM between two
// QEMUs; the ratio, Corral's added time, QEMU's reported downtime; then a drain of 10 VMs
// versus moving them one by one. The bare script is timed twice: from its `migrate` (the
// target QEMU already up) and from the start of the target QEMU (which any migration needs
// and Corral's figure includes); the target budget (20% or 300 ms) is judged against the
// latter, Corral's orchestration overhead.
// Usage: npx tsx bench/migration.ts [--sizes 64,256,1024] [--runs 3] [--drain 10] [--timeline] [--help]
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { TestCluster } from '../test/helpers/cluster.js';
import { openStore } from '../src/store/index.js';
import { ResourceSpec } from '../src/core/spec.js';
import { VmDefinition, vmResourceInput } from '../src/core/vm-spec.js';
import type { AgentStatus, NodeAdmin, ResourceRecord } from '../src/core/types.js';
import { QmpClient } from '../src/drivers/qmp.js';
import { qemuArgs, QEMU_BINARY_DEFAULT } from '../src/drivers/qemu-args.js';
import { vmPaths } from '../src/drivers/qemu-paths.js';
import { freePort, MIGRATE_DOWNTIME_LIMIT_MS, MIGRATE_MAX_BANDWIDTH_BPS } from '../src/drivers/qemu.js';

if (process.argv.includes('--help')) {
  console.log(
    'usage: npx tsx bench/migration.ts [--sizes 64,256,1024|none] [--runs 3] [--drain 10]\n' +
      '  --sizes  idle VM sizes in MiB to migrate (none: only the drain comparison)\n' +
      '  --runs   migrations per size (the median is reported)\n' +
      '  --drain  VMs in the drain comparison (0: none)\n' +
      '  --timeline  print when each store record of a Corral migration changed (ms from the request)',
  );
  process.exit(0);
}

const arg = (name: string, dflt: string) => {
  const i = process.argv.indexOf(name);
  return i >= 0 ? (process.argv[i + 1] ?? dflt) : dflt;
};
const sizes = arg('--sizes', '64,256,1024')
  .split(',')
  .filter((x) => x !== '' && x !== 'none')
  .map(Number);
const runs = Number(arg('--runs', '3'));
const drainCount = Number(arg('--drain', '10'));
const timeline = process.argv.includes('--timeline');
/** bound on any single wait in this benchmark */
const WAIT_MS = 300_000;
const POLL_MS = 10;

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)] ?? NaN;

async function until(what: string, cond: () => Promise<boolean>): Promise<void> {
  const t0 = performance.now();
  while (!(await cond())) {
    if (performance.now() - t0 > WAIT_MS) throw new Error(`timed out waiting for ${what}`);
    await sleep(POLL_MS);
  }
}

function vmSpec(id: string, memory: number, preferredNode?: string): ResourceSpec {
  const def = VmDefinition.parse({ name: id, memory, vnc: false, shutdownTimeoutMs: 0, preferredNode });
  return ResourceSpec.parse(vmResourceInput(def));
}

async function main(): Promise<void> {
  const c = new TestCluster({
    nodes: [
      { name: 'n1', memory: 32768, cpus: 32 },
      { name: 'n2', memory: 32768, cpus: 32 },
    ],
    leaseTtlMs: 6000,
  });
  const started: ChildProcess[] = [];
  try {
    for (const n of ['n1', 'n2']) c.startAgent(n);
    c.store = await openStore(`sqlite:${join(c.dir, 'store.db')}`);
    await until('nodes online', async () => {
      const s = await c.snapshot();
      return ['n1', 'n2'].every((n) => s.nodes.get(n)?.status?.state === 'online');
    });
    const rec = async (id: string) => {
      const kv = await c.store.get(c.k.assign(id));
      return kv ? (JSON.parse(kv.value) as ResourceRecord) : undefined;
    };
    const on = async (id: string, node: string) => {
      const r = await rec(id);
      return r?.node === node && r.state === 'started' && !r.migration;
    };
    const put = (s: ResourceSpec) => c.store.put(c.k.resource(s.id), JSON.stringify(s));

    const rows: string[][] = [];
    for (const mib of sizes) {
      const corral: number[] = [];
      const bare: number[] = [];
      const bareStart: number[] = [];
      const downC: number[] = [];
      const downB: number[] = [];
      for (let run = 0; run < runs; run++) {
        // Corral: request -> target owns the VM
        const id = `m${mib}-${run}.bench`;
        await put(vmSpec(id, mib, 'n1'));
        await until(`${id} on n1`, () => on(id, 'n1'));
        await sleep(300);
        const steps: string[] = [];
        let t0 = performance.now();
        const watcher = timeline
          ? await c.store.watch(c.k.prefix, {
              onEvents: (evs) => {
                const at = (performance.now() - t0).toFixed(0).padStart(6);
                for (const ev of evs) {
                  const k = ev.kv.key;
                  if (k !== c.k.assign(id) && !(k.startsWith(c.k.statuses) && k.endsWith(`/${id}`))) continue;
                  const v = ev.kv.value ? (JSON.parse(ev.kv.value) as Record<string, unknown>) : {};
                  const m = v.migration as { phase?: string } | undefined;
                  const who = k === c.k.assign(id) ? 'assign' : k.slice(c.k.statuses.length).split('/')[0];
                  steps.push(
                    `${at} ${who} ${String(v.state)}${m ? `/${m.phase}` : ''} ${String(v.reason ?? '')}`,
                  );
                }
              },
              onError: () => undefined,
            })
          : undefined;
        t0 = performance.now();
        await put(vmSpec(id, mib, 'n2'));
        await until(`${id} on n2`, () => on(id, 'n2'));
        corral.push(performance.now() - t0);
        await watcher?.cancel();
        if (timeline) console.log(`${id}:\n${steps.join('\n')}`);
        const st = await c.store.get(c.k.status('n1', id));
        const p = st ? (JSON.parse(st.value) as AgentStatus).progress : undefined;
        if (p?.downtimeMs !== undefined) downC.push(p.downtimeMs);
        await c.store.delete(c.k.resource(id));
        // bare QMP: two QEMUs, migrate, poll until the target runs
        const b = await bareMigration(join(c.dir, 'bare'), `b${mib}-${run}`, mib, started);
        bare.push(b.ms);
        bareStart.push(b.withStartMs);
        downB.push(b.downtimeMs);
      }
      const mc = median(corral);
      const mb = median(bare);
      const ms = median(bareStart);
      const budget = Math.max(ms * 1.2, ms + 300);
      rows.push([
        `${mib} MiB`,
        mc.toFixed(0),
        mb.toFixed(0),
        ms.toFixed(0),
        (mc / ms).toFixed(2),
        (mc - ms).toFixed(0),
        mc <= budget ? 'yes' : 'no',
        median(downC).toFixed(0),
        median(downB).toFixed(0),
      ]);
    }
    if (rows.length > 0) console.log(`\nlive migration, idle VMs, median of ${runs} runs (ms)`);
    if (rows.length > 0)
      printTable(
        [
          'size',
          'corral',
          'bare migrate',
          'bare incl. target start',
          'ratio',
          'added',
          'within target',
          'downtime corral',
          'downtime bare',
        ],
        rows,
      );

    // drain of N VMs vs one by one
    const ids = Array.from({ length: drainCount }, (_, i) => `d${i}.bench`);
    for (const id of ids) await put(vmSpec(id, 64, 'n1'));
    for (const id of ids) await until(`${id} on n1`, () => on(id, 'n1'));
    await sleep(500);
    let t0 = performance.now();
    for (const id of ids) {
      await put(vmSpec(id, 64, 'n2'));
      await until(`${id} on n2`, () => on(id, 'n2'));
    }
    const oneByOne = performance.now() - t0;
    for (const id of ids) await put(vmSpec(id, 64, 'n1'));
    for (const id of ids) await until(`${id} back on n1`, () => on(id, 'n1'));
    await sleep(500);
    t0 = performance.now();
    const admin: NodeAdmin = { maintenance: true };
    await c.store.put(c.k.nodeAdmin('n1'), JSON.stringify(admin));
    for (const id of ids) await until(`${id} drained`, () => on(id, 'n2'));
    const drain = performance.now() - t0;
    console.log(`\ndrain of ${drainCount} idle 64 MiB VMs (at most 3 migrations leave a node at once)`);
    printTable(
      ['how', 'total ms', 'per VM ms'],
      [
        ['one by one', oneByOne.toFixed(0), (oneByOne / drainCount).toFixed(0)],
        ['node drain', drain.toFixed(0), (drain / drainCount).toFixed(0)],
        ['speed-up', (oneByOne / drain).toFixed(2), ''],
      ],
    );
    console.log('\nsettings: TCG (no KVM), loopback TCP, lease TTL 6000 ms, 2 agents on one SQLite store');
  } finally {
    for (const p of started) if (p.exitCode === null) p.kill('SIGKILL');
    await c.stop();
  }
}

/** the peer: QEMU's own migration driven by a bare QMP script (same QEMU arguments and parameters) */
async function bareMigration(
  root: string,
  id: string,
  mib: number,
  started: ChildProcess[],
): Promise<{ ms: number; withStartMs: number; downtimeMs: number }> {
  const spec = vmSpec(id, mib);
  const port = await freePort('127.0.0.1');
  const launch = (side: string, incoming?: { host: string; port: number }) => {
    const stateDir = join(root, side);
    mkdirSync(vmPaths(stateDir, id).dir, { recursive: true });
    const p = spawn(QEMU_BINARY_DEFAULT, qemuArgs(spec, { stateDir, incoming }), { stdio: 'ignore' });
    started.push(p);
    return { p, sock: vmPaths(stateDir, id).qmpSocket };
  };
  const src = launch('src');
  const connect = async (sock: string) => {
    const t0 = performance.now();
    for (;;) {
      try {
        return await QmpClient.connect(sock);
      } catch (e) {
        if (performance.now() - t0 > WAIT_MS) throw e;
        await sleep(20);
      }
    }
  };
  const qs = await connect(src.sock);
  await sleep(300);
  // what a script must do too: start the target QEMU, wait for its QMP, then migrate
  const tStart = performance.now();
  const dst = launch('dst', { host: '127.0.0.1', port });
  const qd = await connect(dst.sock);
  const t0 = performance.now();
  await qs.execute('migrate-set-parameters', {
    'max-bandwidth': MIGRATE_MAX_BANDWIDTH_BPS,
    'downtime-limit': MIGRATE_DOWNTIME_LIMIT_MS,
  });
  // the same capabilities as Corral's source (MIGRATION events on)
  await qs.execute('migrate-set-capabilities', { capabilities: [{ capability: 'events', state: true }] });
  await qs.execute('migrate', { uri: `tcp:127.0.0.1:${port}` });
  let downtimeMs: number;
  for (;;) {
    const q = await qs.execute<{ status: string; downtime?: number }>('query-migrate');
    if (q.status === 'completed') {
      downtimeMs = q.downtime ?? NaN;
      break;
    }
    if (q.status === 'failed' || q.status === 'cancelled') throw new Error(`bare migration ${q.status}`);
    await sleep(POLL_MS);
  }
  for (;;) {
    const s = await qd.execute<{ status: string }>('query-status');
    if (s.status === 'running') break;
    await sleep(POLL_MS);
  }
  const ms = performance.now() - t0;
  const withStartMs = performance.now() - tStart;
  await qs.execute('quit').catch(() => undefined);
  await qd.execute('quit').catch(() => undefined);
  qs.close();
  qd.close();
  return { ms, withStartMs, downtimeMs };
}

function printTable(headers: string[], rows: string[][]): void {
  const w = headers.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)));
  const line = (cells: string[]) => cells.map((x, i) => x.padStart(w[i] ?? 0)).join('  ');
  console.log(line(headers));
  for (const r of rows) console.log(line(r));
}

main().catch((e: unknown) => {
  console.error(e);
  process.exit(1);
});
