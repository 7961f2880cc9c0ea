// Test and bench support for `corral clone`: seeded images, real CLI processes with bounded waits.
import { spawn, type ChildProcess } from 'node:child_process';
import { open } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

export const repoRoot = join(dirname(fileURLToPath(import.meta.url)), '..', '..', '..');

/**
 * A deterministic image: chunks alternate zeros and pseudo-random bytes (xorshift32 from seed),
 * so half of it is zero blocks the stream skips.
 */
export async function makeImage(
  path: string,
  sizeBytes: number,
  seed: number,
  chunkBytes = 1024 * 1024,
): Promise<void> {
  const fh = await open(path, 'w');
  try {
    let x = seed >>> 0 || 1;
    const buf = Buffer.alloc(chunkBytes);
    const words = new Uint32Array(buf.buffer, buf.byteOffset, chunkBytes / 4);
    for (let off = 0, i = 0; off < sizeBytes; off += chunkBytes, i++) {
      const n = Math.min(chunkBytes, sizeBytes - off);
      if (i % 2 === 0) continue; // a hole: reads as zeros
      for (let w = 0; w < words.length; w++) {
        x ^= x << 13;
        x >>>= 0;
        x ^= x >>> 17;
        x ^= x << 5;
        x >>>= 0;
        words[w] = x;
      }
      await fh.write(buf, 0, n, off);
    }
    await fh.truncate(sizeBytes);
  } finally {
    await fh.close();
  }
}

export interface Proc {
  child: ChildProcess;
  stdout: () => string;
  stderr: () => string;
  exited: Promise<number | null>;
  /** Resolves with the first match of re in stderr (or rejects after timeoutMs). */
  waitFor: (re: RegExp, timeoutMs: number) => Promise<RegExpMatchArray>;
  kill: (signal?: NodeJS.Signals) => void;
}

const live = new Set<ChildProcess>();

/** Runs `corral ARGS...` as a real process (optionally under a prefix such as `ip netns exec NS`). */
export function corral(args: string[], opts: { prefix?: string[]; env?: NodeJS.ProcessEnv } = {}): Proc {
  // CORRAL_CLONE_STANDALONE=1 runs only the clone commands (through tsx), e.g. for the bench.
  const entry = process.env.CORRAL_CLONE_STANDALONE
    ? ['--import', 'tsx', join(repoRoot, 'src', 'provision', 'clone', 'standalone.ts')]
    : [join(repoRoot, 'bin', 'corral.js')];
  // CORRAL_CLONE_PROFILE_DIR=DIR writes a V8 CPU profile of every clone process there (bench profiling).
  const prof = process.env.CORRAL_CLONE_PROFILE_DIR;
  const profArgs = prof ? ['--cpu-prof', `--cpu-prof-dir=${prof}`] : [];
  const cmd = [...(opts.prefix ?? []), process.execPath, ...profArgs, ...entry, ...args];
  const child = spawn(cmd[0]!, cmd.slice(1), {
    cwd: repoRoot,
    env: { ...process.env, ...opts.env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  live.add(child);
  let out = '';
  let err = '';
  const watchers: { re: RegExp; resolve: (m: RegExpMatchArray) => void }[] = [];
  child.stdout!.on('data', (d: Buffer) => (out += d.toString()));
  child.stderr!.on('data', (d: Buffer) => {
    err += d.toString();
    for (const w of [...watchers]) {
      const m = err.match(w.re);
      if (m) {
        watchers.splice(watchers.indexOf(w), 1);
        w.resolve(m);
      }
    }
  });
  const exited = new Promise<number | null>((resolve) =>
    child.on('exit', (code, sig) => {
      live.delete(child);
      resolve(code ?? (sig ? 128 : null));
    }),
  );
  return {
    child,
    stdout: () => out,
    stderr: () => err,
    exited,
    waitFor: (re, timeoutMs) =>
      new Promise((resolve, reject) => {
        const m = err.match(re);
        if (m) return resolve(m);
        const t = setTimeout(
          () => reject(new Error(`timed out after ${timeoutMs} ms waiting for ${re} in:\n${err}`)),
          timeoutMs,
        );
        watchers.push({
          re,
          resolve: (mm) => {
            clearTimeout(t);
            resolve(mm);
          },
        });
        void exited.then(() => {
          setTimeout(() => {
            clearTimeout(t);
            reject(new Error(`process exited while waiting for ${re}:\n${err}`));
          }, 50);
        });
      }),
    kill: (signal = 'SIGKILL') => {
      if (child.exitCode === null && child.signalCode === null) child.kill(signal);
    },
  };
}

/** Kills every process started with corral() that is still running (test cleanup). */
/** `corral clone serve` for tests: loopback, any free port, JSON lines, a 60 s join timeout */
export function serveLoopback(o: {
  source: string;
  expect: number;
  session: string;
  secretFile: string;
  extra?: string[];
}): Proc {
  return corral([
    'clone',
    'serve',
    '--source',
    o.source,
    '--expect',
    String(o.expect),
    '--session',
    o.session,
    '--host',
    '127.0.0.1',
    '--port',
    '0',
    '--secret-file',
    o.secretFile,
    '--json',
    '--timeout-ms',
    '60000',
    ...(o.extra ?? []),
  ]);
}

export function killAll(): void {
  for (const c of live) if (c.exitCode === null) c.kill('SIGKILL');
}

/** Waits for a process to exit, killing it past timeoutMs. */
export async function exitWithin(p: Proc, timeoutMs: number): Promise<number | null> {
  let t: NodeJS.Timeout | undefined;
  const timeout = new Promise<'timeout'>((r) => (t = setTimeout(() => r('timeout'), timeoutMs)));
  const r = await Promise.race([p.exited, timeout]);
  clearTimeout(t);
  if (r === 'timeout') {
    p.kill();
    throw new Error(`process did not exit within ${timeoutMs} ms:\n${p.stderr()}`);
  }
  return r;
}
