// Running one scenario: build the world, run it on virtual time, check expectations,
// invariants and (when the cluster ends healthy) convergence.
import { performance } from 'node:perf_hooks';
import { World, type ExpectResult, type Violation } from './world.js';
import type { Scenario } from './scenario.js';
import type { DrainMode } from './queue.js';
import { formatLog, type LogEntry } from './log.js';

export interface RunResult {
  name: string;
  seed: number;
  ok: boolean;
  log: LogEntry[];
  violations: Violation[];
  expectations: ExpectResult[];
  /** problems left at the end (only checked when the cluster ends healthy) */
  unconverged: string[];
  endedHealthy: boolean;
  simMs: number;
  wallMs: number;
  steps: number;
}

export async function runScenario(
  scn: Scenario,
  opts: { stopOnViolation?: boolean; drain?: DrainMode } = {},
): Promise<RunResult> {
  const t0 = performance.now();
  const w = new World(scn);
  if (opts.drain) w.drain = opts.drain;
  w.setup();
  await w.run({ stopOnViolation: opts.stopOnViolation ?? true });
  const endedHealthy = w.violations.length === 0 && w.healthy();
  const unconverged = endedHealthy ? w.convergenceProblems() : [];
  for (const u of unconverged) w.entry({ type: 'violation', reason: `not converged at the end: ${u}` });
  const ok = w.violations.length === 0 && unconverged.length === 0 && w.expectations.every((e) => e.ok);
  return {
    name: scn.name,
    seed: scn.seed,
    ok,
    log: w.log,
    violations: w.violations,
    expectations: w.expectations,
    unconverged,
    endedHealthy,
    simMs: w.q.nowMs(),
    wallMs: performance.now() - t0,
    steps: w.q.steps,
  };
}

/** A readable failure report: what failed, the trace before it and the state. */
export function describeFailure(r: RunResult): string {
  const out: string[] = [`scenario ${r.name} (seed ${r.seed}) FAILED`];
  for (const v of r.violations) {
    out.push(
      `invariant violated at ${(v.atMs / 1000).toFixed(3)}s: ${v.message}`,
      '--- trace (last lines) ---',
      ...v.trace,
    );
    out.push('--- state ---', v.state);
  }
  for (const e of r.expectations.filter((x) => !x.ok))
    out.push(`expectation failed (line ${e.line}) at ${(e.atMs / 1000).toFixed(3)}s: ${e.text}: ${e.detail}`);
  for (const u of r.unconverged) out.push(`not converged at the end: ${u}`);
  if (r.violations.length === 0 && (r.unconverged.length > 0 || r.expectations.some((x) => !x.ok))) {
    out.push('--- log (last lines) ---', ...formatLog(r.log).trimEnd().split('\n').slice(-40));
  }
  return out.join('\n');
}
