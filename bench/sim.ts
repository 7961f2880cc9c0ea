// Simulation speed against cluster size: how many simulated seconds the simulator runs per
// wall-clock second with 10, 100 and 1000 nodes (one resource per 5 nodes, the first on node2;
// node2 fails at 5 s and is fenced and recovered), running the real agent and manager code on
// every node. Every agent reads every assignment on each change, so the work per simulated
// second grows about with nodes x resources; the larger sizes simulate less time.
// Run: npx tsx bench/sim.ts [sizes...]   e.g. npx tsx bench/sim.ts 10 100
import { performance } from 'node:perf_hooks';
import { parseScenarioText } from '../src/sim/scenario.js';
import { World } from '../src/sim/world.js';

/** simulated time per size: enough to cover the failure and the recovery, bounded in wall time */
const simMsBySize = (n: number): number => (n <= 10 ? 60_000 : n <= 100 ? 20_000 : 7_000);

async function bench(
  nodes: number,
): Promise<{ nodes: number; simS: number; wallS: number; steps: number; recovered: string }> {
  const lines = [`description bench ${nodes} nodes`];
  for (let i = 1; i <= nodes; i++) lines.push(`node node${i} cpus=8 memory=16384`);
  for (let i = 1; i <= Math.max(1, Math.floor(nodes / 5)); i++)
    lines.push(`resource r${i} prefer=node${i === 1 ? 2 : i * 5} start=500ms`);
  const simMs = simMsBySize(nodes);
  lines.push('at 5s power node2 off', `end ${simMs / 1000}s`);
  const w = new World(parseScenarioText(lines.join('\n'), `bench-${nodes}`));
  w.setup();
  const t0 = performance.now();
  await w.run({ untilMs: simMs });
  const wallS = (performance.now() - t0) / 1000;
  const r1 = w.runningOn('r1')[0];
  return {
    nodes,
    simS: simMs / 1000,
    wallS,
    steps: w.q.steps,
    recovered: r1 && r1.node !== 'node2' ? `r1 recovered on ${r1.node}` : 'r1 not yet recovered',
  };
}

const sizes = process.argv
  .slice(2)
  .map(Number)
  .filter((n) => n > 1);
const rows = [];
for (const n of sizes.length ? sizes : [10, 100, 1000]) {
  const r = await bench(n);
  rows.push(r);
  process.stdout.write(
    `${String(r.nodes).padStart(5)} nodes: ${r.simS.toFixed(0).padStart(3)} s simulated in ${r.wallS.toFixed(1).padStart(6)} s wall = ` +
      `${(r.simS / r.wallS).toFixed(2).padStart(7)} sim-s/wall-s, ${Math.round(r.steps / r.wallS)
        .toString()
        .padStart(7)} events/s, ${r.steps} events; ${r.recovered}\n`,
  );
}
const base = rows[0];
if (base && rows.length > 1) {
  process.stdout.write('\nspeed relative to the smallest cluster (sim-s per wall-s), and per node-second:\n');
  for (const r of rows) {
    const speed = r.simS / r.wallS;
    const baseSpeed = base.simS / base.wallS;
    process.stdout.write(
      `${String(r.nodes).padStart(5)} nodes: x${(speed / baseSpeed).toFixed(4)}  ${((r.nodes * r.simS) / r.wallS).toFixed(0)} node-s per wall-s\n`,
    );
  }
}
