// Seed sweeps: a random cluster and a random fault schedule from one seed, then every fault
// healed; the run must never break an invariant and must converge within a bound. A failing
// seed is shrunk greedily (drop fault commands, then resources) to a minimal scenario file.
import { makeRng, type Rng } from '../core/rng.js';
import {
  defaultResource,
  formatDuration,
  parseScenarioText,
  formatScenario,
  formatNode,
  formatResource,
  type NodeDef,
  type ResourceDef,
  type Scenario,
} from './scenario.js';
import { World } from './world.js';
import type { DrainMode } from './queue.js';

export const fuzzLimits = {
  /** faults are injected in [faultStartMs, healMs) */
  faultStartMs: 3000,
  healMs: 20000,
  /** after healing, the cluster must converge within this long */
  convergeBoundMs: 40000,
  /** converged must hold this long to count */
  stableMs: 3000,
  checkEveryMs: 1000,
  /** reruns spent shrinking one failure */
  shrinkRunsMax: 150,
};

export interface FuzzOptions {
  /** node count; default random 2..4 */
  nodes?: number;
  /** resource count; default random 1..5 */
  resources?: number;
  /**
   * a shared heartbeat disk (sbd device first on every node): the faults include losing the
   * disk and a store outage that ends revoking the leases that expired meanwhile; a node
   * without a watchdog is never frozen nor its agent killed (a silent slot counts as fenced)
   */
  disk?: boolean;
}

/** the fuzzer's disk: vouches for msgwait/2 = 3 s (more than 2 intervals, see vouchMsOf) */
export const fuzzDiskLine = 'disk interval=1s msgwait=6s timeout=10s';

export interface FuzzResult {
  seed: number;
  ok: boolean;
  /** first violation or convergence problem */
  problem?: string;
  simMs: number;
  steps: number;
  scenario: Scenario;
}

/** Build the random scenario of a seed (text form, so a reproduction is just this file). */
export function fuzzScenario(seed: number, o: FuzzOptions = {}): Scenario {
  const rng = makeRng(seed);
  const nodeCount = o.nodes ?? rng.int(2, 4);
  const nodes: NodeDef[] = [];
  for (let i = 1; i <= nodeCount; i++) {
    const fence = rng.pick([['ok'], ['ok'], ['fail', 'ok'], ['timeout', 'ok'], []] as const);
    const node: NodeDef = {
      name: `node${i}`,
      cpus: rng.pick([2, 4, 8]),
      memory: 4096,
      labels: rng.chance(0.3) ? { zone: rng.pick(['a', 'b']) } : {},
      fence: fence.map((mode) => ({ mode, delayMs: rng.pick([500, 1000, 3000]) })),
      // a node without a fence device needs its watchdog: a frozen or killed agent cannot self-fence
      watchdog: fence.length === 0 || rng.chance(0.3),
      off: false,
    };
    // with sbd first, a silent slot counts as fenced: a node without a watchdog is then never
    // frozen and its agent never killed (randomFault); half of them get one anyway
    if (o.disk && !node.watchdog) node.watchdog = rng.chance(0.5);
    nodes.push(node);
  }
  const resCount = o.resources ?? rng.int(1, 5);
  const resources: ResourceDef[] = [];
  for (let i = 1; i <= resCount; i++) {
    const r: ResourceDef = {
      ...defaultResource,
      id: `r${i}`,
      cpus: rng.pick([1, 1, 2]),
      priority: rng.pick([0, 0, 10, 100]),
      selector: rng.chance(0.1) ? { zone: rng.pick(['a', 'b']) } : {},
      affinity: [],
      anti: [],
      maxRestarts: rng.int(0, 3),
      maxRelocations: rng.int(0, 2),
      startMs: rng.pick([200, 1000, 3000]),
      stopMs: rng.pick([100, 500, 2000]),
    };
    if (i > 1 && rng.chance(0.15)) r.affinity = [`r${rng.int(1, i - 1)}`];
    else if (i > 1 && rng.chance(0.2)) r.anti = [`r${rng.int(1, i - 1)}`];
    if (rng.chance(0.3)) r.prefer = `node${rng.int(1, nodeCount)}`;
    resources.push(r);
  }
  const lines: string[] = [
    `description fuzz seed ${seed}: random faults, healed at ${formatDuration(fuzzLimits.healMs)}`,
    `seed ${seed}`,
  ];
  for (const n of nodes) lines.push(formatNode(n));
  if (o.disk) lines.push(fuzzDiskLine);
  for (const r of resources) lines.push(formatResource(r));
  const faultCount = rng.int(1, 8);
  const cmds: { atMs: number; text: string }[] = [];
  for (let i = 0; i < faultCount; i++) {
    const atMs = rng.int(fuzzLimits.faultStartMs / 100, fuzzLimits.healMs / 100 - 10) * 100;
    for (const c of randomFault(rng, nodes, resources, o.disk === true))
      cmds.push({ atMs: Math.min(atMs + c.afterMs, fuzzLimits.healMs - 100), text: c.text });
  }
  cmds.sort((a, b) => a.atMs - b.atMs);
  for (const c of cmds) lines.push(`at ${formatDuration(c.atMs)} ${c.text}`);
  lines.push(`at ${formatDuration(fuzzLimits.healMs)} heal`);
  const endMs = fuzzLimits.healMs + fuzzLimits.convergeBoundMs;
  lines.push(`expect converged by ${formatDuration(endMs)}`, `end ${formatDuration(endMs)}`);
  return parseScenarioText(lines.join('\n'), `fuzz-${seed}`);
}

function randomFault(
  rng: Rng,
  nodes: NodeDef[],
  resources: ResourceDef[],
  disk: boolean,
): { afterMs: number; text: string }[] {
  const picked = rng.pick(nodes);
  const n = picked.name;
  const node = rng.chance(0.15) ? 'leader' : n;
  const r = rng.pick(resources).id;
  const back = () => rng.int(10, 120) * 100;
  let kind = rng.int(0, disk ? 20 : 17);
  // sbd without a watchdog: an agent frozen or killed (its processes alive) would pass as fenced
  // once its slot is silent, as with real SBD; such nodes are only cut off, powered off, ...
  if (disk && (kind === 4 || kind === 5) && !picked.watchdog) kind = 19;
  // `crash agent leader` could hit a node without a watchdog: name the (checked) node instead
  const target = disk && nodes.some((x) => !x.watchdog) ? n : node;
  switch (kind) {
    case 18:
      return [
        { afterMs: 0, text: `disk ${node} lost` },
        ...(rng.chance(0.7) ? [{ afterMs: back(), text: `disk ${n} back` }] : []),
      ];
    case 19:
      return [
        { afterMs: 0, text: 'store down' },
        { afterMs: rng.int(5, 150) * 100, text: 'store up revoke' },
      ];
    case 20: {
      const backMs = back();
      return [
        { afterMs: 0, text: `disk ${n} lost` },
        { afterMs: rng.int(0, 30) * 100, text: `network ${n} off` },
        ...(rng.chance(0.7)
          ? [
              { afterMs: backMs, text: `disk ${n} back` },
              { afterMs: backMs, text: `network ${n} on` },
            ]
          : []),
      ];
    }
    case 0:
      return [
        { afterMs: 0, text: `power ${node} off` },
        ...(rng.chance(0.6) ? [{ afterMs: back(), text: `power ${n} on` }] : []),
      ];
    case 1:
      return [
        { afterMs: 0, text: `network ${node} off` },
        ...(rng.chance(0.7) ? [{ afterMs: back(), text: `network ${n} on` }] : []),
      ];
    case 2:
      return [
        { afterMs: 0, text: `network ${n} oneway` },
        { afterMs: back(), text: `network ${n} on` },
      ];
    case 3:
      return [{ afterMs: 0, text: `reboot ${node}` }];
    case 4:
      return [
        { afterMs: 0, text: `crash agent ${target}` },
        ...(rng.chance(0.6) ? [{ afterMs: back(), text: `start agent ${n}` }] : []),
      ];
    case 5:
      return [
        { afterMs: 0, text: `freeze ${n}` },
        { afterMs: back(), text: `thaw ${n}` },
      ];
    case 6:
      return [
        { afterMs: 0, text: `maintenance ${n} on` },
        ...(rng.chance(0.6) ? [{ afterMs: back(), text: `maintenance ${n} off` }] : []),
      ];
    case 7:
      return [
        { afterMs: 0, text: 'store down' },
        { afterMs: rng.int(5, 80) * 100, text: 'store up' },
      ];
    case 8:
      return [
        { afterMs: 0, text: `store slow ${rng.pick([50, 300, 1000])}ms` },
        { afterMs: back(), text: 'store slow 0ms' },
      ];
    case 9:
      return [
        { afterMs: 0, text: `fence ${n} ${rng.pick(['fail', 'timeout'])}` },
        ...(rng.chance(0.5) ? [{ afterMs: back(), text: `fence ${n} ok` }] : []),
      ];
    case 10:
      return [{ afterMs: 0, text: `resource ${r} crash` }];
    case 11:
      return [{ afterMs: 0, text: `resource ${r} health-fails` }];
    case 12:
      return [{ afterMs: 0, text: `resource ${r} start-fails ${rng.int(1, 4)}` }];
    case 13:
      return [{ afterMs: 0, text: `resource ${r} stop-hang on` }];
    case 14:
      return [{ afterMs: 0, text: `resource ${r} ${rng.pick(['migrate', 'relocate'])} ${n}` }];
    case 15:
      return [
        { afterMs: 0, text: `resource ${r} stop` },
        { afterMs: back(), text: `resource ${r} start` },
      ];
    case 16:
      return [
        { afterMs: 0, text: 'cluster disarm' },
        { afterMs: back(), text: 'cluster arm' },
      ];
    default:
      return [{ afterMs: 0, text: `delay ${n} ${rng.pick([100, 500, 1500])}ms` }];
  }
}

/** Run one scenario as a fuzz case: safety throughout, then convergence (early exit once stable). */
export async function runFuzzCase(
  scn: Scenario,
  drain: DrainMode = 'micro',
): Promise<{ ok: boolean; problem?: string; simMs: number; steps: number }> {
  const w = new World(scn);
  w.drain = drain;
  w.setup();
  const healMs = Math.max(0, ...scn.steps.filter((s) => s.kind === 'command').map((s) => s.atMs));
  await w.run({ untilMs: healMs });
  let stableSinceMs: number | undefined;
  let problems: string[] = [];
  for (
    let t = healMs + fuzzLimits.checkEveryMs;
    w.violations.length === 0 && t <= scn.endMs;
    t += fuzzLimits.checkEveryMs
  ) {
    await w.run({ untilMs: t });
    const sick = w.unhealthy();
    problems = sick === undefined ? w.convergenceProblems() : [`cluster not healthy: ${sick}`];
    if (problems.length > 0) stableSinceMs = undefined;
    else if (stableSinceMs === undefined) stableSinceMs = t;
    else if (t - stableSinceMs >= fuzzLimits.stableMs) return { ok: true, simMs: t, steps: w.q.steps };
  }
  const v = w.violations[0];
  const problem = v
    ? `${v.message} at ${(v.atMs / 1000).toFixed(3)}s`
    : `not converged ${fuzzLimits.convergeBoundMs / 1000}s after healing: ${problems.join('; ')}`;
  return { ok: false, problem, simMs: w.q.nowMs(), steps: w.q.steps };
}

export async function fuzzOne(seed: number, o: FuzzOptions = {}): Promise<FuzzResult> {
  const scenario = fuzzScenario(seed, o);
  const r = await runFuzzCase(scenario);
  return { seed, scenario, ...r };
}

const kindOf = (problem: string | undefined): string =>
  !problem ? 'ok' : problem.startsWith('not converged') ? 'unconverged' : (problem.split(':')[0] ?? problem);

/**
 * Greedy shrink: drop fault commands one at a time (heal commands stay), then resources not
 * referenced, keeping each removal that still fails the same way. Returns the smallest text.
 */
export async function shrink(
  scn: Scenario,
  problem: string,
): Promise<{ scenario: Scenario; problem: string; runs: number }> {
  const kind = kindOf(problem);
  const healMs = Math.max(0, ...scn.steps.filter((s) => s.kind === 'command').map((s) => s.atMs));
  let best = scn;
  let bestProblem = problem;
  let runs = 0;
  const tryCandidate = async (cand: Scenario): Promise<boolean> => {
    if (runs >= fuzzLimits.shrinkRunsMax) return false;
    runs++;
    let text: Scenario;
    try {
      text = parseScenarioText(formatScenario(cand), cand.name);
    } catch {
      return false;
    }
    const r = await runFuzzCase(text);
    if (!r.ok && kindOf(r.problem) === kind) {
      best = text;
      bestProblem = r.problem ?? bestProblem;
      return true;
    }
    return false;
  };
  for (let i = best.steps.length - 1; i >= 0; i--) {
    const s = best.steps[i];
    if (!s || s.kind !== 'command' || s.atMs >= healMs) continue;
    await tryCandidate({ ...best, steps: best.steps.filter((_, j) => j !== i) });
  }
  for (let i = best.resources.length - 1; i >= 0 && best.resources.length > 1; i--) {
    const r = best.resources[i];
    if (!r) continue;
    const used = best.resources.some(
      (o) => o.id !== r.id && (o.affinity.includes(r.id) || o.anti.includes(r.id)),
    );
    const mentioned = best.steps.some((s) => s.atMs < healMs && s.text.split(/\s+/).includes(r.id));
    if (used || mentioned) continue;
    await tryCandidate({
      ...best,
      resources: best.resources.filter((x) => x.id !== r.id),
      steps: best.steps.filter((s) => !s.text.split(/\s+/).includes(r.id)),
    });
  }
  return {
    scenario: { ...best, description: `${best.description} (shrunk: ${bestProblem.split('\n')[0]})` },
    problem: bestProblem,
    runs,
  };
}
