// The `local` fence device (demo and tests: every node runs on this host): kills the node's
// agent, its watchdog and every resource process group listed in its state directory, then
// waits until all are gone. Processes are identified by pid AND /proc start time, so a
// reused pid is never killed.
import { mkdirSync, readFileSync, renameSync, statSync, unlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { WATCHDOG_PIDFILE } from '../agent/watchdog-files.js';
import { readPidfiles } from '../drivers/pidfile.js';
import {
  groupAlive,
  isAlive,
  readPidRecord,
  readProcStat,
  signalGroup,
  signalPid,
  waitFor,
  type PidRecord,
} from '../drivers/proc.js';
import type { DeviceResult } from './types.js';

/** the agent writes its pid here: plain "1234" or JSON {pid, startTime} */
export const AGENT_PIDFILE = 'agent.pid';
/** Linux USER_HZ: /proc start times count these ticks per second */
const CLOCK_TICKS_PER_S = 100;
/** a plain-pid agent.pid may be written this long after the agent started... and no earlier */
const PIDFILE_WRITE_SLACK_MS = 2000;
const GONE_POLL_MS = 10;

/**
 * For the agent: record this process in <stateDir>/agent.pid as JSON {pid, startTime}, the
 * form the local fence device trusts without guessing. Returns a remover for clean exits.
 */
export function writeAgentPidfile(stateDir: string, pid = process.pid): () => void {
  mkdirSync(stateDir, { recursive: true });
  const path = join(stateDir, AGENT_PIDFILE);
  const tmp = `${path}.${pid}.tmp`;
  writeFileSync(tmp, JSON.stringify({ pid, startTime: readProcStat(pid)?.startTime }) + '\n', {
    mode: 0o600,
  });
  renameSync(tmp, path);
  return () => {
    if (readPidRecord(path)?.pid !== pid) return;
    try {
      unlinkSync(path);
    } catch {
      // already gone
    }
  };
}

function bootTimeMs(): number | null {
  try {
    const m = /^btime (\d+)$/m.exec(readFileSync('/proc/stat', 'utf8'));
    return m ? Number(m[1]) * 1000 : null;
  } catch {
    return null;
  }
}

/**
 * A plain pid (no recorded start time) is trusted only if that process started before its
 * pidfile was written: a process that reused the pid later started after the file's mtime.
 */
function plainPidTrusted(pid: number, pidfile: string): boolean {
  const st = readProcStat(pid);
  const boot = bootTimeMs();
  if (!st || boot === null) return false;
  let mtimeMs: number;
  try {
    mtimeMs = statSync(pidfile).mtimeMs;
  } catch {
    return false;
  }
  const startedAtMs = boot + (st.startTime * 1000) / CLOCK_TICKS_PER_S;
  return startedAtMs <= mtimeMs + PIDFILE_WRITE_SLACK_MS;
}

interface Victim {
  what: string;
  alive: () => boolean;
  kill: () => void;
}

function processVictim(what: string, rec: PidRecord, pidfile: string): Victim | null {
  if (!isAlive(rec.pid, rec.startTime)) return null;
  if (rec.startTime === undefined && !plainPidTrusted(rec.pid, pidfile)) return null;
  const startTime = rec.startTime ?? readProcStat(rec.pid)?.startTime;
  return {
    what: `${what} ${rec.pid}`,
    alive: () => isAlive(rec.pid, startTime),
    kill: () => {
      // a group leader takes its group along (an agent's non-detached helpers)
      if (readProcStat(rec.pid)?.pgrp === rec.pid) signalGroup(rec.pid, 'SIGKILL');
      signalPid(rec.pid, 'SIGKILL');
    },
  };
}

export async function fenceLocal(
  stateDir: string,
  timeoutMs: number,
  timeoutNote?: string,
): Promise<DeviceResult> {
  const victims: Victim[] = [];
  const agentFile = join(stateDir, AGENT_PIDFILE);
  const agent = readPidRecord(agentFile);
  const agentVictim = agent && processVictim('agent', agent, agentFile);
  if (agentVictim) victims.push(agentVictim);
  for (const { pidfile } of readPidfiles(stateDir)) {
    if (!pidfile || !groupAlive(pidfile.pgid, pidfile.startTime)) continue;
    const { pgid, startTime } = pidfile;
    victims.push({
      what: `${pidfile.id}[${pgid}]`,
      alive: () => groupAlive(pgid, startTime),
      kill: () => signalGroup(pgid, 'SIGKILL'),
    });
  }
  const wdFile = join(stateDir, WATCHDOG_PIDFILE);
  const wd = readPidRecord(wdFile);
  const wdVictim = wd && processVictim('watchdog', wd, wdFile);
  if (wdVictim) victims.push(wdVictim);
  // every signal first (the agent first: it must not start anything more), then wait
  for (const v of victims) v.kill();
  const gone = await waitFor(
    () => {
      const left = victims.filter((v) => v.alive());
      for (const v of left) v.kill();
      return left.length === 0;
    },
    timeoutMs,
    GONE_POLL_MS,
  );
  if (gone) return { ok: true };
  const left = victims.filter((v) => v.alive()).map((v) => v.what);
  return {
    ok: false,
    error: `timed out after ${timeoutMs} ms${timeoutNote ? ` ${timeoutNote}` : ''}: still running: ${left.join(', ')}`,
  };
}
