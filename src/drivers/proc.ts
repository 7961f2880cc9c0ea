// Linux /proc helpers shared by the process driver, the watchdog and the local fence device.
// A pid alone is not an identity (pids are reused): a process is "ours" only when its
// start time (field 22 of /proc/<pid>/stat, clock ticks since boot) matches the recorded one.
// Zombies count as gone: PID 1 here may not reap orphans, and a zombie runs nothing.
import { readFileSync, readdirSync } from 'node:fs';

export interface ProcStat {
  pid: number;
  /** one-letter state: R, S, D, Z, T, X... */
  state: string;
  ppid: number;
  pgrp: number;
  /** start time in clock ticks after boot (field 22) */
  startTime: number;
}

/** Parse /proc/<pid>/stat; null when the process does not exist. */
export function readProcStat(pid: number): ProcStat | null {
  let text: string;
  try {
    text = readFileSync(`/proc/${pid}/stat`, 'utf8');
  } catch {
    return null;
  }
  return parseProcStat(pid, text);
}

export function parseProcStat(pid: number, text: string): ProcStat | null {
  // comm (field 2) is in parentheses and may contain spaces or ')': split after the last ')'
  const close = text.lastIndexOf(')');
  if (close < 0) return null;
  const rest = text.slice(close + 2).split(' ');
  // rest[0] is field 3 (state); field N is rest[N - 3]
  const state = rest[0];
  const ppid = Number(rest[1]);
  const pgrp = Number(rest[2]);
  const startTime = Number(rest[19]);
  if (state === undefined || !Number.isFinite(pgrp) || !Number.isFinite(startTime)) return null;
  return { pid, state, ppid, pgrp, startTime };
}

function isGoneState(state: string): boolean {
  return state === 'Z' || state === 'X' || state === 'x';
}

/** The process exists, is not a zombie, and (when given) started at startTime. */
export function isAlive(pid: number, startTime?: number): boolean {
  const st = readProcStat(pid);
  if (!st || isGoneState(st.state)) return false;
  return startTime === undefined || st.startTime === startTime;
}

/** Start time of a live process, or null. */
export function startTimeOf(pid: number): number | null {
  const st = readProcStat(pid);
  return st && !isGoneState(st.state) ? st.startTime : null;
}

/**
 * False only when no process (not even a zombie) is in the group: kill(-pgid, 0) fails with
 * ESRCH. One system call, where a /proc scan reads every process on the host; EPERM (someone
 * else's group) counts as existing.
 */
function groupExists(pgid: number): boolean {
  if (!Number.isInteger(pgid) || pgid <= 1) return false;
  try {
    process.kill(-pgid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code !== 'ESRCH';
  }
}

/** Live (non-zombie) members of a process group, by scanning /proc. */
export function groupMembers(pgid: number): number[] {
  const out: number[] = [];
  let names: string[];
  try {
    names = readdirSync('/proc');
  } catch {
    return out;
  }
  for (const name of names) {
    const c = name.charCodeAt(0);
    if (c < 48 || c > 57) continue;
    const st = readProcStat(Number(name));
    if (st && st.pgrp === pgid && !isGoneState(st.state)) out.push(st.pid);
  }
  return out;
}

/**
 * Is the process group we recorded (leader pid = pgid, started at startTime) still present?
 * The leader itself must match its start time; when the leader is gone, remaining members
 * still carry our pgid (Linux never reuses a pid while it names a live group).
 */
export function groupAlive(pgid: number, leaderStartTime: number): boolean {
  if (!groupExists(pgid)) return false;
  const leader = readProcStat(pgid);
  if (leader && !isGoneState(leader.state)) {
    if (leader.startTime === leaderStartTime) return true;
    // pid reused by a stranger: if it leads its own group, that group is not ours
    if (leader.pgrp === pgid) return false;
  }
  return groupMembers(pgid).some((p) => p !== pgid);
}

/**
 * groupAlive for many groups with at most one /proc scan (a scan costs ~10 ms): live
 * leaders answer at once; only groups whose leader is gone need the scan.
 */
export function groupsAlive(groups: { pgid: number; startTime: number }[]): boolean[] {
  const out: boolean[] = [];
  const unsure: number[] = [];
  groups.forEach((g, i) => {
    if (!groupExists(g.pgid)) return (out[i] = false);
    const leader = readProcStat(g.pgid);
    if (leader && !isGoneState(leader.state)) {
      if (leader.startTime === g.startTime) return (out[i] = true);
      if (leader.pgrp === g.pgid) return (out[i] = false);
    }
    out[i] = false;
    unsure.push(i);
  });
  if (unsure.length === 0) return out;
  const live = new Set<number>();
  let names: string[] = [];
  try {
    names = readdirSync('/proc');
  } catch {
    // no /proc: nothing found
  }
  const wanted = new Set(unsure.map((i) => (groups[i] as { pgid: number }).pgid));
  for (const name of names) {
    const c = name.charCodeAt(0);
    if (c < 48 || c > 57) continue;
    const st = readProcStat(Number(name));
    if (st && wanted.has(st.pgrp) && st.pid !== st.pgrp && !isGoneState(st.state)) live.add(st.pgrp);
  }
  for (const i of unsure) out[i] = live.has((groups[i] as { pgid: number }).pgid);
  return out;
}

/** Send a signal to a process group; false when the group no longer exists. Never throws for ESRCH/EPERM. */
export function signalGroup(pgid: number, signal: NodeJS.Signals): boolean {
  if (!Number.isInteger(pgid) || pgid <= 1) return false;
  try {
    process.kill(-pgid, signal);
    return true;
  } catch {
    return false;
  }
}

/** Send a signal to one process; false when it no longer exists. */
export function signalPid(pid: number, signal: NodeJS.Signals): boolean {
  if (!Number.isInteger(pid) || pid <= 1) return false;
  try {
    process.kill(pid, signal);
    return true;
  } catch {
    return false;
  }
}

/** Poll `done` every pollMs until it returns true or timeoutMs passes; resolves whether it became true. */
export async function waitFor(done: () => boolean, timeoutMs: number, pollMs = 20): Promise<boolean> {
  const deadline = performance.now() + timeoutMs;
  for (;;) {
    if (done()) return true;
    if (performance.now() >= deadline) return false;
    await new Promise((r) => setTimeout(r, Math.max(1, Math.min(pollMs, deadline - performance.now()))));
  }
}

export interface PidRecord {
  pid: number;
  /** /proc start time when the writer recorded it (guards against pid reuse) */
  startTime?: number;
}

/**
 * Read a pid file written by another process: either a plain pid ("1234\n") or JSON
 * `{"pid":1234,"startTime":5678}`. null when absent or malformed.
 */
export function readPidRecord(path: string): PidRecord | null {
  let text: string;
  try {
    text = readFileSync(path, 'utf8').trim();
  } catch {
    return null;
  }
  if (/^\d+$/.test(text)) return { pid: Number(text) };
  try {
    const v = JSON.parse(text) as { pid?: unknown; startTime?: unknown };
    if (typeof v.pid !== 'number' || !Number.isInteger(v.pid) || v.pid <= 1) return null;
    return typeof v.startTime === 'number' ? { pid: v.pid, startTime: v.startTime } : { pid: v.pid };
  } catch {
    return null;
  }
}

/** Does this pid record name a live process (start time checked when recorded)? */
export function recordAlive(rec: PidRecord): boolean {
  return isAlive(rec.pid, rec.startTime);
}
