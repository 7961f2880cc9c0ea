// The production Env: the real clock, real timers, a seeded-from-entropy Rng, and a
// logger writing one JSON object a line (or plain text on a TTY).
import { randomInt } from 'node:crypto';
import type { Env } from './types.js';
import { makeRng } from '../core/rng.js';

export interface NodeEnvOptions {
  /** prefix of every log line, e.g. the node name */
  name: string;
  level?: 'debug' | 'info' | 'warn' | 'error';
  /** where log lines go (default stderr) */
  write?: (line: string) => void;
  json?: boolean;
}

const levels = { debug: 10, info: 20, warn: 30, error: 40 } as const;

export function nodeEnv(o: NodeEnvOptions): Env {
  const min = levels[o.level ?? 'info'];
  const write = o.write ?? ((line: string) => process.stderr.write(line + '\n'));
  const json = o.json ?? !process.stderr.isTTY;
  return {
    nowMs: () => Date.now(),
    sleep: (ms) => new Promise((resolve) => setTimeout(resolve, ms)),
    setTimer: (ms, fn) => {
      const t = setTimeout(fn, ms);
      return () => clearTimeout(t);
    },
    rng: makeRng(randomInt(1, 2 ** 31)),
    log: (level, msg, fields) => {
      if (levels[level] < min) return;
      if (json) write(JSON.stringify({ t: new Date().toISOString(), level, node: o.name, msg, ...fields }));
      else
        write(
          `${new Date().toISOString()} ${level.padEnd(5)} ${o.name}: ${msg}${fields ? ' ' + JSON.stringify(fields) : ''}`,
        );
    },
  };
}

/** a stall of the event loop longer than this is logged (timers, renewals and I/O all wait behind it) */
export const eventLoopStallWarnMs = 500;
/** how often the stall monitor's timer is due */
const stallProbeEveryMs = 100;

/**
 * Log every stall of this process's event loop longer than eventLoopStallWarnMs: a stalled
 * agent cannot renew its lease, so a stall is the first thing to look for when an agent
 * self-fences on a busy machine. Returns a function that stops the monitor.
 */
export function watchEventLoopStalls(env: Env): () => void {
  let dueMs = Date.now() + stallProbeEveryMs;
  const t = setInterval(() => {
    const now = Date.now();
    const lateMs = now - dueMs;
    if (lateMs > eventLoopStallWarnMs) env.log('warn', 'event loop stalled', { stalledMs: lateMs });
    dueMs = now + stallProbeEveryMs;
  }, stallProbeEveryMs);
  t.unref();
  return () => clearInterval(t);
}
