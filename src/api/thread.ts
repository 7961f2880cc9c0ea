// An agent's API server in a worker thread of the agent process. The thread has its own event
// loop and its own store connection, so the agent's synchronous work (SQLite commits with their
// fsync, spawns, the manager's passes, a burst of starts during a failover) does not hold API
// requests up; on a crowded host that work stalled the agent's loop for 100-200 ms at a time.
// It shares the process: it ends with the agent and records the agent's pid for consoles.
import { Worker } from 'node:worker_threads';
import { CorralError } from '../core/errors.js';

export interface ApiThreadData {
  configPath: string;
  stateRoot?: string;
  listen?: string;
  node?: string;
  opTimeoutMs: number;
}

export type ApiThreadMessage =
  | { type: 'log'; level: 'info' | 'warn' | 'error'; msg: string }
  | { type: 'ready'; url: string; port: number }
  | { type: 'failed'; message: string; code?: string; hint?: string }
  | { type: 'closed' };

/** how long close() waits for the thread to close its server and store before terminating it */
export const apiThreadCloseMs = 5000;

export interface ApiThread {
  url: string;
  port: number;
  close(): Promise<void>;
}

/** The worker's entry: compiled JS next to this file, or the TypeScript source through tsx. */
function newWorker(workerData: ApiThreadData): Worker {
  const here = import.meta.url;
  if (!here.endsWith('.ts')) return new Worker(new URL('./thread-main.js', here), { workerData });
  // a worker does not inherit tsx's loader registered by bin/corral.js: register it in the thread
  const tsx = import.meta.resolve('tsx/esm/api');
  const entry = new URL('./thread-main.ts', here).href;
  const boot = `import(${JSON.stringify(tsx)}).then((m) => { m.register(); return import(${JSON.stringify(entry)}); });`;
  return new Worker(boot, { eval: true, workerData });
}

/** startApi's error in the thread, with its code and hint (e.g. the address is taken) */
export class ApiThreadError extends CorralError {}

export function startApiThread(
  o: ApiThreadData & { log: (level: 'info' | 'warn' | 'error', msg: string) => void },
): Promise<ApiThread> {
  const { log, ...data } = o;
  const w = newWorker(data);
  let closed: (() => void) | undefined;
  let closing = false;
  w.on('message', (m: ApiThreadMessage) => {
    if (m.type === 'log') log(m.level, m.msg);
    else if (m.type === 'closed') closed?.();
  });
  return new Promise<ApiThread>((resolve, reject) => {
    let started = false;
    w.on('message', (m: ApiThreadMessage) => {
      if (m.type === 'ready') {
        started = true;
        resolve({
          url: m.url,
          port: m.port,
          close: () => {
            closing = true;
            return new Promise<void>((done) => {
              const t = setTimeout(() => void w.terminate().then(() => done()), apiThreadCloseMs);
              closed = () => {
                clearTimeout(t);
                done();
              };
              w.once('exit', () => closed?.());
              w.postMessage('close');
            });
          },
        });
      } else if (m.type === 'failed')
        reject(new ApiThreadError(m.code ?? 'CORRAL_API_THREAD', m.message, m.hint));
    });
    w.on('error', (e) => {
      if (!started) reject(e);
      else log('error', `the API thread failed (${(e as Error).message}); the agent runs on without its API`);
    });
    w.on('exit', (code) => {
      if (!started) reject(new Error(`the API thread exited (code ${code}) before it served`));
      else if (!closing)
        log('error', `the API thread exited (code ${code}); the agent runs on without its API`);
    });
  });
}
