// Pidfiles of the process driver: <stateDir>/run/<id>.json, one per running resource.
// Read by the driver after an agent restart (recover), by the watchdog when it fires and by
// the local fence device. A pidfile is an edge (another process wrote it): parsed with zod.
import { mkdirSync, readFileSync, readdirSync, renameSync, unlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { z } from 'zod';
import { ResourceSpec } from '../core/spec.js';

export const RUN_DIR = 'run';
export const LOG_DIR = 'logs';

export const Pidfile = z.object({
  id: z.string(),
  node: z.string(),
  pid: z.number().int().positive(),
  /** process group id; equals pid (the resource runs in its own group) */
  pgid: z.number().int().positive(),
  epoch: z.number().int().nonnegative(),
  /** /proc/<pid>/stat field 22: identifies the process across pid reuse */
  startTime: z.number().int().nonnegative(),
  specHash: z.string(),
  /** wall-clock ms when it was spawned */
  startedAtMs: z.number(),
  logPath: z.string(),
  /**
   * the spec it runs, so a new agent can monitor and stop it the same way. Checked apart
   * (pidfileSpec): a spec written by an older version must never hide a running process.
   */
  spec: z.unknown().optional(),
});
export type Pidfile = z.infer<typeof Pidfile>;

export function runDir(stateDir: string): string {
  return join(stateDir, RUN_DIR);
}

export function pidfilePath(stateDir: string, id: string): string {
  return join(stateDir, RUN_DIR, `${id}.json`);
}

/** Atomic write (temp file + rename), so a reader never sees half a pidfile. */
export function writePidfile(stateDir: string, pf: Pidfile): void {
  mkdirSync(runDir(stateDir), { recursive: true });
  const path = pidfilePath(stateDir, pf.id);
  const tmp = `${path}.${process.pid}.tmp`;
  writeFileSync(tmp, JSON.stringify(pf) + '\n', { mode: 0o600 });
  renameSync(tmp, path);
}

export function removePidfile(stateDir: string, id: string): void {
  try {
    unlinkSync(pidfilePath(stateDir, id));
  } catch {
    // already gone
  }
}

/** One resource's pidfile, or null when absent or malformed. */
export function readPidfile(stateDir: string, id: string): Pidfile | null {
  try {
    const parsed = Pidfile.safeParse(JSON.parse(readFileSync(pidfilePath(stateDir, id), 'utf8')));
    return parsed.success ? parsed.data : null;
  } catch {
    return null;
  }
}

export interface PidfileEntry {
  path: string;
  /** null when the file is unreadable or malformed */
  pidfile: Pidfile | null;
  error?: string;
}

/** Every pidfile of a state dir (malformed ones reported with their error). */
export function readPidfiles(stateDir: string): PidfileEntry[] {
  let names: string[];
  try {
    names = readdirSync(runDir(stateDir));
  } catch {
    return [];
  }
  const out: PidfileEntry[] = [];
  for (const name of names.sort()) {
    if (!name.endsWith('.json')) continue;
    const path = join(runDir(stateDir), name);
    try {
      const parsed = Pidfile.safeParse(JSON.parse(readFileSync(path, 'utf8')));
      out.push(
        parsed.success
          ? { path, pidfile: parsed.data }
          : { path, pidfile: null, error: parsed.error.issues[0]?.message ?? 'invalid' },
      );
    } catch (e) {
      out.push({ path, pidfile: null, error: (e as Error).message });
    }
  }
  return out;
}

/** The spec recorded in a pidfile, or null when absent or no longer valid. */
export function pidfileSpec(pf: Pidfile): ResourceSpec | null {
  const r = ResourceSpec.safeParse(pf.spec);
  return r.success ? r.data : null;
}
