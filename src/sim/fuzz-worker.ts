// Worker thread for `corral sim fuzz --jobs N`: runs the seeds it is given, one result a message.
import { parentPort } from 'node:worker_threads';
import { fuzzOne, type FuzzOptions } from './fuzz.js';

export interface FuzzJob {
  seeds: number[];
  opts: FuzzOptions;
}

export interface FuzzCaseResult {
  seed: number;
  ok: boolean;
  problem?: string;
  simMs: number;
  steps: number;
}

const port = parentPort;
if (port) {
  port.on('message', (job: FuzzJob) => {
    void (async () => {
      for (const seed of job.seeds) {
        const r = await fuzzOne(seed, job.opts);
        const out: FuzzCaseResult = { seed, ok: r.ok, problem: r.problem, simMs: r.simMs, steps: r.steps };
        port.postMessage(out);
      }
      port.postMessage('done');
    })();
  });
}
