// Running many fuzz seeds on several cores (worker threads), results streamed back in any
// order; each seed's outcome is still deterministic.
import { Worker } from 'node:worker_threads';
import { fuzzOne, type FuzzOptions } from './fuzz.js';
import type { FuzzCaseResult, FuzzJob } from './fuzz-worker.js';

export const poolLimits = {
  jobsMax: 64,
};

export async function runFuzzSeeds(
  seeds: number[],
  opts: FuzzOptions,
  jobs: number,
  onResult: (r: FuzzCaseResult) => void,
): Promise<void> {
  const n = Math.max(1, Math.min(jobs, poolLimits.jobsMax, seeds.length));
  if (n === 1) {
    for (const seed of seeds) {
      const r = await fuzzOne(seed, opts);
      onResult({ seed, ok: r.ok, problem: r.problem, simMs: r.simMs, steps: r.steps });
    }
    return;
  }
  const url = new URL(
    import.meta.url.endsWith('.ts') ? './fuzz-worker.ts' : './fuzz-worker.js',
    import.meta.url,
  );
  const fromSource = import.meta.url.endsWith('.ts');
  const runs: Promise<void>[] = [];
  for (let w = 0; w < n; w++) {
    const mine = seeds.filter((_, i) => i % n === w);
    runs.push(
      new Promise<void>((resolve, reject) => {
        const worker = fromSource ? tsxWorker(url) : new Worker(url);
        worker.on('message', (m: FuzzCaseResult | 'done') => {
          if (m === 'done') {
            void worker.terminate().then(() => resolve());
            return;
          }
          onResult(m);
        });
        worker.on('error', reject);
        worker.on('exit', (code) =>
          code === 0 || code === 1 ? resolve() : reject(new Error(`fuzz worker exited with ${code}`)),
        );
        const job: FuzzJob = { seeds: mine, opts };
        worker.postMessage(job);
      }),
    );
  }
  await Promise.all(runs);
}

/** A worker running TypeScript sources (development checkout): register tsx in it first. */
function tsxWorker(url: URL): Worker {
  const api = import.meta.resolve('tsx/esm/api');
  const code = `import(${JSON.stringify(api)}).then((m) => { m.register(); return import(${JSON.stringify(url.href)}); })`;
  return new Worker(code, { eval: true });
}
