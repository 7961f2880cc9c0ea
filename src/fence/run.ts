// Runs a fence device process with a hard timeout: its own process group, killed whole
// with SIGKILL when the time is up; the result keeps the exit code and the last line of stderr.
import { spawn } from 'node:child_process';
import { signalGroup } from '../drivers/proc.js';
import type { DeviceResult } from './types.js';

/** stderr kept per device run, for the error message */
const STDERR_KEEP_BYTES = 4096;
/** after the device exits, wait at most this long for the rest of its stderr */
const STDERR_DRAIN_MS = 100;

function lastLine(text: string): string {
  const lines = text.split('\n').filter((l) => l.trim() !== '');
  return lines[lines.length - 1]?.trim() ?? '';
}

export interface RunOptions {
  timeoutMs: number;
  /** written to stdin, then stdin is closed */
  stdin?: string;
  env?: NodeJS.ProcessEnv;
  /** appended to a timeout message, e.g. "(fence deadline)" */
  timeoutNote?: string;
}

export function runDevice(argv: string[], opts: RunOptions): Promise<DeviceResult> {
  return new Promise((resolve) => {
    const [cmd, ...args] = argv as [string, ...string[]];
    let stderr = '';
    let settled = false;
    const finish = (r: DeviceResult) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      resolve(r);
    };
    const child = spawn(cmd, args, {
      detached: true,
      stdio: [opts.stdin === undefined ? 'ignore' : 'pipe', 'ignore', 'pipe'],
      env: opts.env ?? process.env,
    });
    const timer = setTimeout(() => {
      if (child.pid) signalGroup(child.pid, 'SIGKILL');
      finish({
        ok: false,
        error: `timed out after ${opts.timeoutMs} ms${opts.timeoutNote ? ` ${opts.timeoutNote}` : ''}`,
      });
    }, opts.timeoutMs);
    child.stderr?.setEncoding('utf8');
    child.stderr?.on('data', (d: string) => {
      stderr = (stderr + d).slice(-STDERR_KEEP_BYTES);
    });
    child.on('error', (e: NodeJS.ErrnoException) =>
      finish({ ok: false, error: `cannot execute ${cmd}: ${e.code ?? e.message}` }),
    );
    if (opts.stdin !== undefined && child.stdin) {
      child.stdin.on('error', () => {
        // the device exited without reading: its exit status tells
      });
      child.stdin.end(opts.stdin);
    }
    const report = (code: number | null, signal: NodeJS.Signals | null) => {
      if (code === 0) return finish({ ok: true });
      const why = code !== null ? `exit code ${code}` : `killed by ${signal}`;
      const line = lastLine(stderr);
      finish({ ok: false, error: line ? `${why}: ${line}` : why });
    };
    // 'close' waits for stdio: a background child holding stderr open must not turn success into a timeout
    child.on('exit', (code, signal) => setTimeout(() => report(code, signal), STDERR_DRAIN_MS));
    child.on('close', report);
  });
}
