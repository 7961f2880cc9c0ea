// `corral sim run FILE... [--json] [--update]` and `corral sim fuzz --seeds N`: the
// deterministic simulator (src/sim) running the real agent and manager code on virtual time.
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { basename, dirname, extname, join } from 'node:path';
import { performance } from 'node:perf_hooks';
import type { Command } from 'commander';
import { action, exitCodes, UsageError } from '../program.js';
import { parseScenario, formatScenario } from '../../sim/scenario.js';
import { runScenario, describeFailure, type RunResult } from '../../sim/run.js';
import { formatLog } from '../../sim/log.js';
import { fuzzScenario, shrink, type FuzzOptions } from '../../sim/fuzz.js';
import { runFuzzSeeds } from '../../sim/pool.js';
import type { DrainMode } from '../../sim/queue.js';

export const simCliLimits = {
  seedsMax: 10_000_000,
  /** failing seeds shrunk into reproduction files per fuzz run */
  shrinkFailuresMax: 3,
};

/** <dir>/<name>.log beside the scenario file */
export function logPathOf(file: string): string {
  return join(dirname(file), `${basename(file, extname(file))}.log`);
}

export function scenarioName(file: string): string {
  return basename(file, extname(file));
}

/** The stable JSON form of one run (README: "Transition log"). */
export function runJson(r: RunResult) {
  return {
    scenario: r.name,
    seed: r.seed,
    ok: r.ok,
    simMs: r.simMs,
    log: r.log,
    expectations: r.expectations.map((e) => ({
      line: e.line,
      text: e.text,
      atMs: e.atMs,
      ok: e.ok,
      detail: e.detail,
    })),
    violations: r.violations.map((v) => ({ atMs: v.atMs, message: v.message })),
    unconverged: r.unconverged,
  };
}

function readScenario(file: string) {
  if (!existsSync(file))
    throw new UsageError(`sim run: no such file ${file}`, 'pass scenario files, e.g. sim/scenarios/*.scn');
  return parseScenario(readFileSync(file, 'utf8'), scenarioName(file), file);
}

function intOption(v: string, name: string, min: number, max: number): number {
  const n = Number(v);
  if (!Number.isInteger(n) || n < min || n > max)
    throw new UsageError(
      `sim: ${name} must be an integer from ${min} to ${max}, got "${v}"`,
      `e.g. ${name} ${min}`,
    );
  return n;
}

export function registerSim(program: Command): void {
  const sim = program
    .command('sim')
    .description('deterministic simulator: scenarios and seed sweeps of the HA engine');

  sim
    .command('run')
    .description(
      'run scenario files (.scn text or .json); compare each transition log with <name>.log beside it',
    )
    .argument('<files...>', 'scenario files')
    .option('--json', 'print the full transition logs as JSON (stable form, see README)')
    .option('--update', 'rewrite <name>.log with the new transition log')
    .option('--drain <mode>', 'microtask draining between events: micro (default) or immediate', 'micro')
    .action(
      action(async (files: string[], o: { json?: boolean; update?: boolean; drain: string }) => {
        if (o.drain !== 'micro' && o.drain !== 'immediate')
          throw new UsageError(
            `sim run: --drain must be micro or immediate, got "${o.drain}"`,
            'omit it for the default',
          );
        const scenarios = files.map((f) => ({ file: f, scn: readScenario(f) }));
        let failed = 0;
        const json: ReturnType<typeof runJson>[] = [];
        for (const { file, scn } of scenarios) {
          const r = await runScenario(scn, { drain: o.drain as DrainMode });
          const text = formatLog(r.log);
          const logFile = logPathOf(file);
          let logNote = '';
          if (o.update || !existsSync(logFile)) {
            writeFileSync(logFile, text);
            logNote = o.update ? ' (log rewritten)' : ' (new log written)';
          } else if (readFileSync(logFile, 'utf8') !== text) {
            logNote = ` (transition log differs from ${logFile}: ${firstDiff(readFileSync(logFile, 'utf8'), text)}; review, then --update)`;
            failed++;
          }
          if (!r.ok) failed++;
          if (o.json) json.push(runJson(r));
          else {
            const line = `${r.ok ? 'ok  ' : 'FAIL'} ${file}  ${(r.simMs / 1000).toFixed(0)}s simulated in ${r.wallMs.toFixed(0)} ms${logNote}`;
            process.stdout.write(`${line}\n`);
            if (!r.ok) process.stdout.write(`${describeFailure(r)}\n`);
          }
        }
        if (o.json) process.stdout.write(`${JSON.stringify({ version: 1, runs: json }, null, 1)}\n`);
        else process.stdout.write(`${scenarios.length} scenario(s), ${failed} problem(s)\n`);
        return failed > 0 ? exitCodes.problem : exitCodes.ok;
      }),
    );

  sim
    .command('fuzz')
    .description(
      'random clusters and fault schedules, healed at the end; any invariant violation or failure to converge prints the seed and writes a shrunk reproduction scenario',
    )
    .option('--seeds <n>', 'number of seeds', '100')
    .option('--seed-start <n>', 'first seed', '1')
    .option('--nodes <n>', 'nodes per cluster (default: random 2..4)')
    .option('--resources <n>', 'resources per cluster (default: random 1..5)')
    .option(
      '--disk',
      'a shared heartbeat disk with an sbd device per node; adds disk loss and lease-revoking store outages to the faults',
    )
    .option('--jobs <n>', 'worker threads', '1')
    .option('--out <dir>', 'where reproduction scenarios are written', 'sim/repro')
    .action(
      action(
        async (o: {
          seeds: string;
          seedStart: string;
          nodes?: string;
          resources?: string;
          disk?: boolean;
          jobs: string;
          out: string;
        }) => {
          const count = intOption(o.seeds, '--seeds', 1, simCliLimits.seedsMax);
          const start = intOption(o.seedStart, '--seed-start', 0, 2 ** 31 - 1);
          const jobs = intOption(o.jobs, '--jobs', 1, 64);
          const opts: FuzzOptions = {};
          if (o.nodes !== undefined) opts.nodes = intOption(o.nodes, '--nodes', 1, 1000);
          if (o.resources !== undefined) opts.resources = intOption(o.resources, '--resources', 1, 5000);
          if (o.disk) opts.disk = true;
          const seeds = Array.from({ length: count }, (_, i) => start + i);
          const failures: { seed: number; problem: string }[] = [];
          const t0 = performance.now();
          let simMs = 0;
          let done = 0;
          await runFuzzSeeds(seeds, opts, jobs, (r) => {
            done++;
            simMs += r.simMs;
            if (!r.ok) {
              failures.push({ seed: r.seed, problem: r.problem ?? 'failed' });
              process.stdout.write(`seed ${r.seed} FAILED: ${(r.problem ?? '').split('\n')[0]}\n`);
            }
          });
          const wallS = (performance.now() - t0) / 1000;
          process.stdout.write(
            `${done} seeds (${start}..${start + count - 1}), ${failures.length} failed, ${(done / wallS).toFixed(1)} seeds/s, ` +
              `${(simMs / 1000 / wallS).toFixed(0)} simulated s per wall s, ${jobs} job(s)\n`,
          );
          for (const f of failures.sort((a, b) => a.seed - b.seed).slice(0, simCliLimits.shrinkFailuresMax)) {
            const s = await shrink(fuzzScenario(f.seed, opts), f.problem);
            mkdirSync(o.out, { recursive: true });
            const file = join(o.out, `fuzz-${f.seed}.scn`);
            writeFileSync(file, formatScenario(s.scenario));
            process.stdout.write(
              `seed ${f.seed}: reproduction (${s.runs} shrink runs) written to ${file}: corral sim run ${file}\n`,
            );
          }
          return failures.length > 0 ? exitCodes.problem : exitCodes.ok;
        },
      ),
    );
}

function firstDiff(a: string, b: string): string {
  const x = a.split('\n');
  const y = b.split('\n');
  for (let i = 0; i < Math.max(x.length, y.length); i++) {
    if (x[i] !== y[i])
      return `line ${i + 1}: expected "${(x[i] ?? '').trim()}", got "${(y[i] ?? '').trim()}"`;
  }
  return 'same lines';
}
