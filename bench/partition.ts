// bench/partition: failover time on 3 namespaced hosts (real etcd, real agents; issue 8).
// Failover = from the fault to the service reported started (health check passed) on another
// host. Three kinds, default timings (leaseTtlMs 4000, selfFenceMarginMs 1000,
// noDeviceFenceMarginMs 2000):
//   crash       kill -9 of every process of the host but its etcd member (agent, watchdog,
//               services); no fence device: recovery waits for the self-fence deadline
//   partition   the host cut off the network; no fence device: the same deadline
//   pill        the host cut off the network, heartbeat disk + sbd device: the poison pill's
//               acknowledgement is the fence record
// Usage: npx tsx bench/partition.ts [--runs N] (needs root; N defaults to 10)
import { spawnSync } from 'node:child_process';
import { NetCluster, netnsMissing } from '../test/cluster/netcluster.js';

const runsArg = process.argv.indexOf('--runs');
const runs = runsArg > 0 ? Number(process.argv[runsArg + 1]) : 10;
/** bound on one failover */
const failoverTimeoutMs = 60_000;

type Kind = 'crash' | 'partition' | 'pill';

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

async function runKind(kind: Kind): Promise<{ times: number[]; doubles: number }> {
  const c = new NetCluster({ hosts: 3, disk: kind === 'pill' });
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
      const t0 = Date.now();
      if (kind === 'crash') {
        const etcdPid = String(victim.etcd?.pid);
        const pids = spawnSync('ip', ['netns', 'pids', victim.ns], { encoding: 'utf8' })
          .stdout.split(/\s+/)
          .filter((p) => p && p !== etcdPid);
        for (const p of pids) spawnSync('kill', ['-9', p]);
      } else c.isolate(victim.name);
      await c.waitStarted(id, victim.name, failoverTimeoutMs);
      times.push(Date.now() - t0);
      process.stderr.write(`${kind} run ${n + 1}/${runs}: ${times.at(-1)} ms\n`);
      if (kind === 'crash') c.startAgent(victim.name);
      else c.heal(victim.name);
      await online(c, victim.name);
    }
    return { times, doubles: c.overlaps().length };
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
for (const kind of ['crash', 'partition', 'pill'] as Kind[]) {
  const { times, doubles } = await runKind(kind);
  const s = [...times].sort((a, b) => a - b);
  rows.push([kind, String(s.length), String(pct(s, 50)), String(pct(s, 99)), String(s[0]), String(doubles)]);
}
const head = ['failover', 'runs', 'p50 ms', 'p99 ms', 'min ms', 'double runs'];
const widths = head.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]!.length)));
const line = (r: string[]) => r.map((c, i) => c.padEnd(widths[i]!)).join('  ');
console.log(line(head));
for (const r of rows) console.log(line(r));
const p50 = (k: string) => Number(rows.find((r) => r[0] === k)?.[2]);
console.log(
  `\nPacemaker+Corosync defaults (issue 8 reference): ~9000 ms median for a crashed node; ` +
    `crash ratio ${(9000 / p50('crash')).toFixed(2)}x; pill vs partition ${(p50('partition') / p50('pill')).toFixed(2)}x`,
);
