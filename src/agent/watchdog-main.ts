// The per-node software watchdog: a tiny standalone process (node watchdog-main.js STATEDIR).
// The agent feeds it over a Unix socket (<stateDir>/watchdog.sock). When a deadline passes
// without a new feed, it SIGKILLs every process group listed in <stateDir>/run/*.json and
// exits. It runs in its own session, so it keeps working when the agent is SIGKILLed or
// SIGSTOPped; a new agent instance reconnects to it (one watchdog per state dir, enforced
// by an exclusive pidfile). It imports nothing heavy: it must start fast and stay small.
import { appendFileSync, mkdirSync, readFileSync, readdirSync, unlinkSync, writeFileSync } from 'node:fs';
import { createServer, type Socket } from 'node:net';
import { join } from 'node:path';
import {
  groupAlive,
  groupsAlive,
  readPidRecord,
  recordAlive,
  signalGroup,
  startTimeOf,
} from '../drivers/proc.js';
import { parseWatchdogCommand, watchdogPaths } from './watchdog-files.js';

/** disarmed and no client for this long: nobody needs us, exit (the grace lets a restarting agent reconnect) */
const IDLE_EXIT_MS = 2000;
/** after SIGKILL, wait at most this long for the groups to vanish before exiting */
const FIRE_KILL_WAIT_MS = 5000;
/** a client line longer than this is garbage: drop the client */
const LINE_MAX_BYTES = 256;
/** a sender's monotonic stamp older than this is not trusted (receipt time is used) */
const SENT_STAMP_MAX_AGE_MS = 10_000;
/** pidfile acquisition attempts (a stale pidfile is removed between attempts) */
const PIDFILE_ATTEMPTS_MAX = 3;

const stateDir = process.argv[2];
if (!stateDir) {
  console.error('usage: watchdog-main STATEDIR');
  process.exit(2);
}
const paths = watchdogPaths(stateDir);
mkdirSync(join(stateDir, 'logs'), { recursive: true });

function log(msg: string): void {
  try {
    appendFileSync(paths.log, `${new Date().toISOString()} watchdog[${process.pid}] ${msg}\n`);
  } catch {
    // logging must never stop the watchdog
  }
}

function nowNs(): bigint {
  return process.hrtime.bigint();
}

/** one watchdog per state dir: create the pidfile exclusively; a live owner wins */
function acquirePidfile(): boolean {
  const me = JSON.stringify({ pid: process.pid, startTime: startTimeOf(process.pid) ?? undefined });
  for (let i = 0; i < PIDFILE_ATTEMPTS_MAX; i++) {
    try {
      writeFileSync(paths.pidfile, me + '\n', { flag: 'wx', mode: 0o600 });
      return true;
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
    }
    const owner = readPidRecord(paths.pidfile);
    if (owner && owner.pid !== process.pid && recordAlive(owner)) return false;
    try {
      unlinkSync(paths.pidfile);
    } catch {
      // someone else removed it
    }
  }
  return false;
}

interface Target {
  id: string;
  pgid: number;
  startTime: number;
}

/** every process group listed in run/*.json (minimal parsing: no zod in this process) */
function listTargets(): Target[] {
  const dir = join(stateDir as string, 'run');
  let names: string[];
  try {
    names = readdirSync(dir);
  } catch {
    return [];
  }
  const out: Target[] = [];
  for (const name of names) {
    if (!name.endsWith('.json')) continue;
    try {
      const v = JSON.parse(readFileSync(join(dir, name), 'utf8')) as Record<string, unknown>;
      if (typeof v.pgid === 'number' && typeof v.startTime === 'number') {
        out.push({ id: String(v.id ?? name), pgid: v.pgid, startTime: v.startTime });
      }
    } catch {
      // a malformed pidfile names nothing we could kill safely
    }
  }
  return out;
}

let deadlineNs: bigint | null = null;
let timer: NodeJS.Timeout | undefined;
let clients = 0;
let idleTimer: NodeJS.Timeout | undefined;
let firing = false;

function cleanupAndExit(code: number): never {
  try {
    const owner = readPidRecord(paths.pidfile);
    if (owner?.pid === process.pid) unlinkSync(paths.pidfile);
  } catch {
    // already gone
  }
  try {
    unlinkSync(paths.socket);
  } catch {
    // already gone
  }
  process.exit(code);
}

function fire(why: string): void {
  if (firing) return;
  firing = true;
  const targets = listTargets();
  const killed: Target[] = [];
  for (const t of targets) {
    if (groupAlive(t.pgid, t.startTime) && signalGroup(t.pgid, 'SIGKILL')) killed.push(t);
  }
  const atMs = Date.now();
  log(`FIRED (${why}): SIGKILL ${killed.map((t) => `${t.id}[${t.pgid}]`).join(' ') || 'nothing running'}`);
  try {
    writeFileSync(paths.fired, JSON.stringify({ atMs, why, killed }) + '\n');
  } catch {
    // the kill is what matters
  }
  const start = Date.now();
  const check = () => {
    const alive = groupsAlive(killed);
    const left = killed.filter((_, i) => alive[i]);
    if (left.length === 0) return cleanupAndExit(0);
    if (Date.now() - start > FIRE_KILL_WAIT_MS) {
      log(`groups still present after SIGKILL: ${left.map((t) => t.pgid).join(' ')}`);
      return cleanupAndExit(1);
    }
    for (const t of left) signalGroup(t.pgid, 'SIGKILL');
    setTimeout(check, 20);
  };
  check();
}

function arm(): void {
  if (timer) clearTimeout(timer);
  timer = undefined;
  if (deadlineNs === null) return;
  const leftMs = Number(deadlineNs - nowNs()) / 1e6;
  if (leftMs <= 0) return fire('deadline passed without a feed');
  // re-check on wake-up: a timer may fire early, never late by design
  timer = setTimeout(arm, Math.ceil(leftMs));
}

function updateIdle(): void {
  if (idleTimer) clearTimeout(idleTimer);
  idleTimer = undefined;
  if (deadlineNs === null && clients === 0) {
    idleTimer = setTimeout(() => {
      log(`disarmed with no client for ${IDLE_EXIT_MS} ms: exiting`);
      cleanupAndExit(0);
    }, IDLE_EXIT_MS);
  }
}

function handle(line: string, sock: Socket): void {
  const c = parseWatchdogCommand(line);
  if ('error' in c) {
    sock.write(`error ${c.error}\n`);
    return;
  }
  switch (c.cmd) {
    case 'feed': {
      const now = nowNs();
      let base = now;
      if (
        c.sentMonoNs !== undefined &&
        c.sentMonoNs <= now &&
        now - c.sentMonoNs < BigInt(SENT_STAMP_MAX_AGE_MS) * 1_000_000n
      ) {
        base = c.sentMonoNs;
      }
      const wasArmed = deadlineNs !== null;
      deadlineNs = base + BigInt(c.allowMs) * 1_000_000n;
      if (!wasArmed) log(`armed: allow ${c.allowMs} ms`);
      arm();
      updateIdle();
      sock.write(`ok ${c.allowMs}\n`);
      return;
    }
    case 'disarm':
      if (deadlineNs !== null) log('disarmed');
      deadlineNs = null;
      arm();
      updateIdle();
      sock.write('ok disarmed\n');
      return;
    case 'status': {
      const remainingMs = deadlineNs === null ? null : Math.round(Number(deadlineNs - nowNs()) / 1e6);
      sock.write(JSON.stringify({ armed: deadlineNs !== null, remainingMs, pid: process.pid }) + '\n');
      return;
    }
    case 'quit':
      if (deadlineNs !== null) {
        sock.write('error armed: disarm before quit\n');
        return;
      }
      if (clients > 1) {
        // another agent instance still uses us: it decides when we go
        sock.end(`ok staying for ${clients - 1} other client(s)\n`);
        return;
      }
      log('quit on request');
      sock.end('ok bye\n', () => cleanupAndExit(0));
      return;
  }
}

if (!acquirePidfile()) {
  // another watchdog owns this state dir: the client will connect to it
  process.exit(0);
}
try {
  unlinkSync(paths.socket);
} catch {
  // no stale socket
}
const server = createServer((sock) => {
  clients++;
  updateIdle();
  let buf = '';
  sock.setEncoding('utf8');
  sock.on('data', (chunk: string) => {
    buf += chunk;
    let nl: number;
    while ((nl = buf.indexOf('\n')) >= 0) {
      const line = buf.slice(0, nl);
      buf = buf.slice(nl + 1);
      if (line.trim() !== '') handle(line, sock);
    }
    if (buf.length > LINE_MAX_BYTES) sock.destroy();
  });
  sock.on('error', () => {
    // a client that vanished: its deadline stands
  });
  sock.on('close', () => {
    clients--;
    updateIdle();
  });
});
server.on('error', (e) => {
  log(`cannot listen on ${paths.socket}: ${e.message}`);
  cleanupAndExit(1);
});
server.listen(paths.socket, () => {
  log(`listening on ${paths.socket}`);
  updateIdle();
});
for (const sig of ['SIGTERM', 'SIGINT', 'SIGHUP'] as const) {
  // fail safe: stopped while armed means nobody guards the resources any more
  process.on(sig, () => (deadlineNs !== null ? fire(`received ${sig} while armed`) : cleanupAndExit(0)));
}
