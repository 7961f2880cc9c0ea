// bench/partition: failover time on 3 namespaced hosts (real etcd, real agents; issue 8).
// Failover = from the fault to the service reported started (health check passed) on another
// host. Four kinds, default timings (leaseTtlMs 4000, selfFenceMarginMs 1000,
// noDeviceFenceMarginMs 2000):
//   crash       kill -9 of every process of the host but its etcd member (agent, watchdog,
//               services); a power-switch fence device that answers (a `command` device that
//               kills the host's processes, as a PDU would): Pacemaker's setup, which needs
//               a fence device too
//   crash-nodev the same crash with no fence device: recovery waits for the self-fence deadline
//   partition   the host cut off the network; no fence device: the same deadline
//   pill        the host cut off the network, heartbeat disk + sbd device: the poison pill's
//               acknowledgement is the fence record
// Usage: npx tsx bench/partition.ts [--runs N] [--kinds crash,crash-nodev,partition,pill]
// (needs root; N defaults to 10)
import { NetCluster, netnsMissing } from '../test/cluster/netcluster.js';

const runsArg = process.argv.indexOf('--runs');
const runs = runsArg > 0 ? Number(process.argv[runsArg + 1]) : 10;
const allKinds = ['crash', 'crash-nodev', 'partition', 'pill'] as const;
type Kind = (typeof allKinds)[number];
const kindsArg = process.argv.indexOf('--kinds');
const kinds = (kindsArg > 0 ? (process.argv[kindsArg + 1] ?? '').split(',') : [...allKinds]) as Kind[];
for (const k of kinds)
  if (!allKinds.includes(k)) {
    process.stderr.write(`bench/partition: unknown kind '${k}' in --kinds; use ${allKinds.join(',')}\n`);
    process.exit(2);
  }
if (!(runs >= 1)) {
  process.stderr.write('bench/partition: --runs needs a number >= 1\n');
  process.exit(2);
}
/** bound on one failover */
const failoverTimeoutMs = 60_000;

function pct(sorted: number[], p: number): number {
  if (sorted.length === 0) return NaN;
  return sorted[Math.min(sorted.length - 1, Math.ceil((p / 100) * sorted.length) - 1)]!;
}

async function online(c: NetCluster, node: string): Promise<void> {
  await c.waitFor(
    `${node} online`,
    async () => {
      const n = (await c.snapshot()).nodes.get(node);
      return n?.status?.state === 'online' && n.alive?.ready === true;
    },
    60_000,
  );
}

interface Phases {
  detect: number[];
  fence: number[];
  restart: number[];
}

async function runKind(kind: Kind): Promise<{ times: number[]; doubles: number; phases: Phases }> {
  const phases: Phases = { detect: [], fence: [], restart: [] };
  const c = new NetCluster({ hosts: 3, disk: kind === 'pill', powerFence: kind === 'crash' });
  const times: number[] = [];
  try {
    await c.start();
    await online(c, c.hosts[0]!.name);
    for (let n = 0; n < runs; n++) {
      const leader = (await c.snapshot()).leader?.node;
      const victim = c.hosts.filter((h) => h.name !== leader)[n % 2]!;
      const id = `svc${n}`;
      await c.defineService(id, 9000 + n, { preferredNode: victim.name });
      await c.waitFor(`${id} on ${victim.name}`, async () => {
        const r = await c.resourceOn(id);
        return r.node === victim.name && r.state === 'started';
      });
      const evBefore = (await c.events()).length;
      const t0 = Date.now();
      if (kind === 'crash' || kind === 'crash-nodev') c.crash(victim.name);
      else c.isolate(victim.name);
      await c.waitStarted(id, victim.name, failoverTimeoutMs);
      const tUp = Date.now();
      times.push(tUp - t0);
      const evs = (await c.events()).slice(evBefore);
      const lost = evs.find((e) => e.object === victim.name && e.action === 'state' && e.to === 'unknown');
      const fenced = evs.find((e) => e.object === victim.name && e.action === 'state' && e.to === 'fenced');
      if (lost) phases.detect.push(lost.atMs - t0);
      if (lost && fenced) phases.fence.push(fenced.atMs - lost.atMs);
      if (fenced) phases.restart.push(tUp - fenced.atMs);
      process.stderr.write(`${kind} run ${n + 1}/${runs}: ${times.at(-1)} ms\n`);
      if (kind === 'crash' || kind === 'crash-nodev') c.startAgent(victim.name);
      else c.heal(victim.name);
      await online(c, victim.name);
    }
    return { times, doubles: c.overlaps().length, phases };
  } finally {
    await c.stop();
  }
}

const why = netnsMissing();
if (why) {
  process.stderr.write(`bench/partition: ${why}\n`);
  process.exit(1);
}
const rows: string[][] = [];
for (const kind of kinds) {
  const { times, doubles, phases } = await runKind(kind);
  const s = [...times].sort((a, b) => a - b);
  const mid = (xs: number[]) =>
    String(
      pct(
        [...xs].sort((a, b) => a - b),
        50,
      ),
    );
  rows.push([
    kind,
    String(s.length),
    String(pct(s, 50)),
    String(pct(s, 99)),
    String(s[0]),
    mid(phases.detect),
    mid(phases.fence),
    mid(phases.restart),
    String(doubles),
  ]);
}
const head = [
  'failover',
  'runs',
  'p50 ms',
  'p99 ms',
  'min ms',
  'detect p50',
  'fence p50',
  'restart p50',
  'double runs',
];
const widths = head.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]!.length)));
const line = (r: string[]) => r.map((c, i) => c.padEnd(widths[i]!)).join('  ');
console.log(line(head));
for (const r of rows) console.log(line(r));
const p50 = (k: string) => Number(rows.find((r) => r[0] === k)?.[2]);
const ratio = (a: number, b: number) => (Number.isFinite(a / b) ? `${(a / b).toFixed(2)}x` : 'n/a');
console.log(
  `\nPacemaker+Corosync defaults (issue 8 reference, with a fence device): ~9000 ms median for a ` +
    `crashed node; crash ${ratio(9000, p50('crash'))} faster (target 1.8x), without a device ` +
    `${ratio(9000, p50('crash-nodev'))}; pill vs partition ${ratio(p50('partition'), p50('pill'))} faster`,
);
