// The process driver: runs a resource as a supervised command on this node.
// - argv is run directly (a shell only with `shell: true`), in its own process group, its
//   output appended to a log file, with CORRAL_RESOURCE / CORRAL_EPOCH / CORRAL_NODE set;
// - a pidfile <stateDir>/run/<id>.json records pid, pgid, epoch and the /proc start time,
//   so a restarted agent adopts what runs (recover) and the watchdog or the local fence
//   device can kill it without the agent;
// - started = the health check passed once (or, without one, the process still lives after
//   START_SETTLE_MS), within startTimeoutMs; then the check runs every intervalMs, and
//   `failures` consecutive failures kill the group and emit a `failed` event;
// - an exit is seen at once (child 'exit'; adopted processes are polled every ADOPTED_POLL_MS).
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import {
  closeSync,
  fstatSync,
  mkdirSync,
  openSync,
  readSync,
  renameSync,
  statSync,
  writeSync,
} from 'node:fs';
import { dirname, isAbsolute, join } from 'node:path';
import { CorralError, invariant } from '../core/errors.js';
import { ResourceSpec, type ProcessSpec } from '../core/spec.js';
import type { Driver, DriverEvent, Env, LocalResource, StopOptions } from '../env/types.js';
import { describeCheck, probe } from './health.js';
import { resetChildNice } from './priority.js';
import {
  LOG_DIR,
  pidfileSpec,
  readPidfile,
  readPidfiles,
  removePidfile,
  writePidfile,
  type Pidfile,
} from './pidfile.js';
import { groupAlive, groupsAlive, isAlive, readProcStat, signalGroup, waitFor } from './proc.js';

/** without a health check: the process must still live this long after spawn to count as started */
export const START_SETTLE_MS = 200;
/** during start, a failing health check is retried this often (faster than intervalMs: quick failover) */
export const START_PROBE_INTERVAL_MS = 100;
/** processes adopted after an agent restart are not our children: poll /proc this often */
export const ADOPTED_POLL_MS = 250;
/** how long to wait for a process group to vanish after SIGKILL */
export const KILL_WAIT_MS = 5000;
/** killAll: bound on waiting for every group to vanish after SIGKILL */
export const KILL_ALL_WAIT_MS = 5000;
/** poll period while waiting for a process group to vanish */
export const GONE_POLL_MS = 20;
/** `id -u USER` bound */
export const USER_LOOKUP_TIMEOUT_MS = 2000;
/** failure reasons quote at most this many of the last lines of the log */
export const LOG_TAIL_LINES = 5;
export const LOG_TAIL_BYTES = 4096;
/** a log larger than this at start is moved to <log>.1 (one generation kept) */
export const LOG_ROTATE_BYTES = 16 * 1024 * 1024;
/** start() waits for an in-flight start/stop of the same id, then re-checks, at most this often */
const START_RETRIES_MAX = 4;

export class DriverError extends CorralError {
  constructor(where: string, message: string, hint?: string) {
    super('CORRAL_DRIVER', `${where}: ${message}`, hint);
  }
}

export interface ProcessDriverOptions {
  node: string;
  /** the node's state directory: run/ (pidfiles) and logs/ live here */
  stateDir: string;
  env: Pick<Env, 'log'>;
  /** nice value for started commands (the agent raised its own: see drivers/priority.ts) */
  childNice?: number;
}

interface Entry {
  id: string;
  epoch: number;
  state: LocalResource['state'];
  reason: string;
  /** why a start in flight was taken over, kept after the stop rewrites reason */
  abortedBecause?: string;
  spec: ResourceSpec;
  specHash: string;
  logPath: string;
  /** byte offset of this run's output in the log (failure reasons quote from here) */
  logOffset: number;
  pid?: number;
  pgid?: number;
  startTime?: number;
  startedAtMs?: number;
  child?: ChildProcess;
  adopted: boolean;
  /** set once the leader process has exited */
  exit?: { code: number | null; signal: NodeJS.Signals | null };
  exited: Promise<void>;
  markExited: () => void;
  healthFailures: number;
  healthTimer?: NodeJS.Timeout;
  pollTimer?: NodeJS.Timeout;
  starting?: Promise<LocalResource>;
  stopping?: Promise<LocalResource>;
}

export function specHash(spec: ResourceSpec): string {
  return createHash('sha256').update(JSON.stringify(spec)).digest('hex').slice(0, 16);
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

function describeExit(code: number | null, signal: NodeJS.Signals | null): string {
  if (code !== null) return `exited with code ${code}`;
  if (signal !== null) return `killed by signal ${signal}`;
  return 'exited';
}

/** The process section of a spec this driver runs (start() refuses any other kind). */
function procOf(spec: ResourceSpec): ProcessSpec {
  invariant(spec.process, `${spec.id}: not a process resource`);
  return spec.process;
}

export class ProcessDriver implements Driver {
  private readonly node: string;
  private readonly stateDir: string;
  private readonly env: Pick<Env, 'log'>;
  private readonly entries = new Map<string, Entry>();
  /** the last spawn queued by spawnTurn() */
  private spawnChain: Promise<void> = Promise.resolve();
  private readonly handlers: ((ev: DriverEvent) => void)[] = [];
  private closed = false;
  /** an in-flight killAll(): starts wait for it */
  private killing: Promise<void> | undefined;
  private readonly childNice: number | undefined;

  constructor(opts: ProcessDriverOptions) {
    if (!isAbsolute(opts.stateDir)) {
      throw new DriverError(
        'process driver',
        `stateDir ${opts.stateDir} is not absolute`,
        'pass an absolute path',
      );
    }
    this.node = opts.node;
    this.stateDir = opts.stateDir;
    this.env = opts.env;
    this.childNice = opts.childNice;
    mkdirSync(join(this.stateDir, LOG_DIR), { recursive: true });
  }

  list(): LocalResource[] {
    return [...this.entries.values()].map((e) => this.snapshot(e));
  }

  onEvent(handler: (ev: DriverEvent) => void): void {
    this.handlers.push(handler);
  }

  async close(): Promise<void> {
    // resources keep running: a new agent adopts them through recover()
    this.closed = true;
    for (const e of this.entries.values()) {
      this.clearTimers(e);
      e.child?.removeAllListeners('exit');
    }
  }

  // ---- start ----------------------------------------------------------------------------------

  async start(specIn: ResourceSpec, epoch: number): Promise<LocalResource> {
    const parsed = ResourceSpec.safeParse(specIn);
    if (!parsed.success) {
      const issue = parsed.error.issues[0];
      const where = issue?.path.join('.') || '(root)';
      return this.failedResult(
        String(specIn?.id),
        epoch,
        `invalid spec at ${where}: ${issue?.message ?? 'invalid'}`,
      );
    }
    const spec = parsed.data;
    invariant(
      Number.isInteger(epoch) && epoch >= 0,
      `start ${spec.id}: epoch must be a non-negative integer`,
    );
    for (let i = 0; i < START_RETRIES_MAX; i++) {
      if (this.killing) await this.killing;
      const e = this.entries.get(spec.id) ?? this.adoptFromPidfile(spec.id);
      if (!e) return this.freshStart(spec, epoch);
      if (e.starting) {
        await e.starting;
        continue;
      }
      if (e.stopping) {
        await e.stopping;
        continue;
      }
      if (e.state === 'started') {
        if (e.epoch !== epoch) this.reEpoch(e, epoch);
        return this.snapshot(e);
      }
      if (this.groupLive(e)) {
        // a failed resource's group is being killed; one that survives SIGKILL blocks a new copy
        if (!(await waitFor(() => !this.groupLive(e), KILL_WAIT_MS, GONE_POLL_MS))) {
          return this.failedResult(
            spec.id,
            epoch,
            `previous process group ${e.pgid} of ${spec.id} survives SIGKILL`,
          );
        }
      }
      // failed and gone: forget it and start anew
      if (this.entries.get(spec.id) !== e) continue;
      this.entries.delete(spec.id);
      return this.freshStart(spec, epoch);
    }
    return this.failedResult(spec.id, epoch, `start ${spec.id}: still busy after ${START_RETRIES_MAX} waits`);
  }

  private freshStart(spec: ResourceSpec, epoch: number): Promise<LocalResource> {
    if (this.closed) return Promise.resolve(this.failedResult(spec.id, epoch, 'process driver is closed'));
    let markExited!: () => void;
    const exited = new Promise<void>((r) => (markExited = r));
    const e: Entry = {
      id: spec.id,
      epoch,
      state: 'starting',
      reason: 'starting',
      spec,
      specHash: specHash(spec),
      logPath: this.logPathOf(spec),
      logOffset: 0,
      adopted: false,
      exited,
      markExited,
      healthFailures: 0,
    };
    this.entries.set(spec.id, e);
    e.starting = this.doStart(e).finally(() => (e.starting = undefined));
    return e.starting;
  }

  /** still the live start attempt? (stop/killAll/close may have taken it over) */
  private current(e: Entry): boolean {
    return !this.closed && e.state === 'starting' && this.entries.get(e.id) === e;
  }

  /**
   * One spawn per turn of the event loop. spawn() blocks until the child has exec'd, which on
   * a loaded host takes from tens to hundreds of ms; fifty in one turn stalled the agent's
   * timers (lease renewal, self-fence) for seconds. Each caller waits for the spawn before it
   * and for one more turn, so due timers run between two spawns.
   */
  private spawnTurn(): Promise<void> {
    const turn = this.spawnChain.then(() => new Promise<void>((resolve) => setImmediate(resolve)));
    this.spawnChain = turn;
    return turn;
  }

  private async doStart(e: Entry): Promise<LocalResource> {
    if (!e.spec.process) return this.failStart(e, `kind ${e.spec.kind} is not run by the process driver`);
    const p = procOf(e.spec);
    let ids: { uid: number; gid: number } | undefined;
    if (p.user !== undefined) {
      const r = await lookupUser(p.user);
      if ('error' in r) return this.failStart(e, r.error);
      ids = r;
    }
    await this.spawnTurn();
    if (!this.current(e)) return this.aborted(e);
    if (p.cwd !== undefined) {
      let isDir = false;
      try {
        isDir = statSync(p.cwd).isDirectory();
      } catch {
        // reported below
      }
      if (!isDir) return this.failStart(e, `cwd ${p.cwd} is not an existing directory`);
    }
    let fd: number;
    try {
      mkdirSync(dirname(e.logPath), { recursive: true });
      if (fileSize(e.logPath) > LOG_ROTATE_BYTES) renameSync(e.logPath, `${e.logPath}.1`);
      fd = openSync(e.logPath, 'a', 0o640);
      writeSync(
        fd,
        `--- corral: start ${e.id} epoch ${e.epoch} on ${this.node} at ${new Date().toISOString()}\n`,
      );
      e.logOffset = fstatSync(fd).size;
    } catch (err) {
      return this.failStart(e, `cannot open log file ${e.logPath}: ${(err as Error).message}`);
    }
    const [cmd, ...args] = p.shell
      ? ['/bin/sh', '-c', p.command[0] as string, e.id, ...p.command.slice(1)]
      : (p.command as [string, ...string[]]);
    let child: ChildProcess;
    try {
      child = spawn(cmd, args, {
        detached: true,
        stdio: ['ignore', fd, fd],
        env: this.resourceEnv(e),
        cwd: p.cwd,
        uid: ids?.uid,
        gid: ids?.gid,
      });
    } catch (err) {
      closeSync(fd);
      return this.failStart(e, `cannot execute ${cmd}: ${(err as Error).message}`);
    }
    closeSync(fd);
    if (child.pid !== undefined) {
      // the child exists from here on: record it at once, so stop(), killAll() and the watchdog see it
      resetChildNice(child.pid, this.childNice);
      child.unref();
      e.child = child;
      e.pid = child.pid;
      e.pgid = child.pid;
      e.startedAtMs = Date.now();
      e.startTime = readProcStat(child.pid)?.startTime ?? 0;
      child.on('exit', (code, signal) => this.onLeaderExit(e, code, signal));
      this.writeEntryPidfile(e);
    }
    const spawned = await new Promise<string | null>((resolve) => {
      child.once('spawn', () => resolve(null));
      child.once('error', (err: NodeJS.ErrnoException) => resolve(err.code ?? err.message));
    });
    if (spawned !== null || child.pid === undefined) {
      const hint = spawned === 'ENOENT' ? ' (no such file: command not found)' : '';
      return this.failStart(e, `cannot execute ${cmd}: ${spawned ?? 'no pid'}${hint}`);
    }
    if (!this.current(e)) return this.aborted(e);
    return this.awaitStarted(e);
  }

  /** wait until the health check passes once (or the settle time passes) within startTimeoutMs */
  private async awaitStarted(e: Entry): Promise<LocalResource> {
    const p = procOf(e.spec);
    const check = e.spec.health;
    const t0 = performance.now();
    const deadline = t0 + p.startTimeoutMs;
    let lastError = '';
    if (!check) {
      await Promise.race([sleep(START_SETTLE_MS), e.exited]);
      if (!this.current(e)) return this.aborted(e);
      if (e.exit) return this.failStart(e, this.exitReason(e, 'during start'));
      return this.markStarted(e, `alive after ${START_SETTLE_MS} ms (no health check)`);
    }
    for (;;) {
      const remaining = deadline - performance.now();
      if (remaining <= 0) break;
      const r = await probe(
        { ...check, timeoutMs: Math.max(1, Math.min(check.timeoutMs, Math.ceil(remaining))) },
        this.resourceEnv(e),
      );
      if (!this.current(e)) return this.aborted(e);
      if (e.exit) return this.failStart(e, this.exitReason(e, 'during start'));
      if (r.ok) {
        return this.markStarted(e, `health check passed after ${Math.round(performance.now() - t0)} ms`);
      }
      lastError = r.error;
      const wait = Math.min(START_PROBE_INTERVAL_MS, deadline - performance.now());
      if (wait > 0) await Promise.race([sleep(wait), e.exited]);
      if (!this.current(e)) return this.aborted(e);
      if (e.exit) return this.failStart(e, this.exitReason(e, 'during start'));
    }
    return this.failStart(
      e,
      `${describeCheck(check)} did not pass within startTimeoutMs ${p.startTimeoutMs} ms: ${lastError || 'no answer'}`,
    );
  }

  private markStarted(e: Entry, reason: string): LocalResource {
    e.state = 'started';
    e.reason = reason;
    this.env.log('info', `${e.id} started`, { id: e.id, epoch: e.epoch, pid: e.pid, reason });
    this.scheduleHealth(e);
    return this.snapshot(e);
  }

  /** the start attempt was taken over by stop(), killAll() or close() */
  private aborted(e: Entry): LocalResource {
    return {
      id: e.id,
      epoch: e.epoch,
      state: 'failed',
      reason: `start aborted: ${e.abortedBecause ?? e.reason}`,
    };
  }

  private async failStart(e: Entry, reason: string): Promise<LocalResource> {
    e.state = 'failed';
    e.reason = `start failed: ${reason}`;
    this.env.log('warn', `${e.id} failed to start`, { id: e.id, epoch: e.epoch, reason });
    this.clearTimers(e);
    if (e.pgid !== undefined) await this.killAndForgetGroup(e);
    return this.snapshot(e);
  }

  private reEpoch(e: Entry, epoch: number): void {
    // already running on this node: take the new epoch without a restart
    this.env.log('info', `${e.id} already started, epoch ${e.epoch} -> ${epoch}`, { id: e.id });
    e.epoch = epoch;
    this.writeEntryPidfile(e);
  }

  // ---- monitoring -----------------------------------------------------------------------------

  private onLeaderExit(e: Entry, code: number | null, signal: NodeJS.Signals | null): void {
    if (e.exit) return;
    e.exit = { code, signal };
    e.markExited();
    if (this.closed) return;
    if (e.state !== 'started') return; // starting: awaitStarted reports; stopping: expected
    this.clearTimers(e);
    e.state = 'failed';
    e.reason = this.exitReason(e, 'while started');
    this.env.log('warn', `${e.id} failed`, { id: e.id, epoch: e.epoch, reason: e.reason });
    void this.killAndForgetGroup(e);
    this.emit({ type: 'failed', id: e.id, epoch: e.epoch, reason: e.reason });
  }

  private scheduleHealth(e: Entry): void {
    const check = e.spec.health;
    if (!check || this.closed || e.state !== 'started') return;
    e.healthTimer = setTimeout(() => {
      e.healthTimer = undefined;
      void probe(check, this.resourceEnv(e)).then((r) => {
        if (this.closed || e.state !== 'started' || this.entries.get(e.id) !== e) return;
        if (r.ok) {
          e.healthFailures = 0;
          return this.scheduleHealth(e);
        }
        if (e.pid !== undefined && !isAlive(e.pid, e.startTime)) {
          // the process is gone: report the exit, not the failed probe (a child's 'exit' event is imminent)
          return e.adopted ? this.onLeaderExit(e, null, null) : undefined;
        }
        e.healthFailures++;
        if (e.healthFailures < check.failures) return this.scheduleHealth(e);
        this.clearTimers(e);
        e.state = 'failed';
        e.reason = `${describeCheck(check)} failed ${e.healthFailures} times in a row: ${r.error}`;
        this.env.log('warn', `${e.id} failed`, { id: e.id, epoch: e.epoch, reason: e.reason });
        if (e.pgid !== undefined) signalGroup(e.pgid, 'SIGKILL');
        void this.killAndForgetGroup(e);
        this.emit({ type: 'failed', id: e.id, epoch: e.epoch, reason: e.reason });
      });
    }, check.intervalMs);
  }

  private startPolling(e: Entry): void {
    e.pollTimer = setInterval(() => {
      if (e.pid !== undefined && !isAlive(e.pid, e.startTime)) {
        if (e.pollTimer) clearInterval(e.pollTimer);
        e.pollTimer = undefined;
        this.onLeaderExit(e, null, null);
      }
    }, ADOPTED_POLL_MS);
  }

  private clearTimers(e: Entry): void {
    if (e.healthTimer) clearTimeout(e.healthTimer);
    if (e.pollTimer) clearInterval(e.pollTimer);
    e.healthTimer = undefined;
    e.pollTimer = undefined;
  }

  private emit(ev: DriverEvent): void {
    for (const h of this.handlers) {
      try {
        h(ev);
      } catch (err) {
        this.env.log('error', 'driver event handler threw', { error: (err as Error).message });
      }
    }
  }

  // ---- stop / kill ----------------------------------------------------------------------------

  async stop(id: string, opts: StopOptions = {}): Promise<LocalResource> {
    const e = this.entries.get(id) ?? this.adoptFromPidfile(id);
    if (!e) return { id, epoch: 0, state: 'stopped', reason: 'not running' };
    if (e.stopping) return e.stopping;
    e.stopping = this.doStop(e, opts).finally(() => (e.stopping = undefined));
    return e.stopping;
  }

  private async doStop(e: Entry, opts: StopOptions): Promise<LocalResource> {
    const prev = e.state;
    const p = procOf(e.spec);
    const graceMs = opts.graceMs ?? p.stopTimeoutMs;
    let reason = prev === 'failed' ? `stopped after failure: ${e.reason}` : 'not running';
    this.clearTimers(e);
    e.state = 'stopping';
    e.reason = prev === 'starting' ? 'stopped while starting' : 'stopping';
    if (prev === 'starting') e.abortedBecause = e.reason;
    if (e.pgid !== undefined && e.startTime !== undefined && this.groupLive(e)) {
      signalGroup(e.pgid, p.stopSignal);
      reason = `stopped with ${p.stopSignal}`;
      if (!(await waitFor(() => !this.groupLive(e), graceMs, GONE_POLL_MS))) {
        signalGroup(e.pgid, 'SIGKILL');
        const what = graceMs === p.stopTimeoutMs ? 'stopTimeoutMs' : 'a grace of';
        reason = `killed with SIGKILL after ${p.stopSignal} and ${what} ${graceMs} ms`;
        if (!(await waitFor(() => !this.groupLive(e), KILL_WAIT_MS, GONE_POLL_MS))) {
          e.state = 'failed';
          e.reason = `process group ${e.pgid} still present ${KILL_WAIT_MS} ms after SIGKILL (uninterruptible sleep?)`;
          this.env.log('error', `${e.id} cannot be stopped`, { id: e.id, reason: e.reason });
          return this.snapshot(e);
        }
      }
    }
    this.removeEntryPidfile(e);
    if (this.entries.get(e.id) === e) this.entries.delete(e.id);
    e.state = 'stopped';
    e.reason = reason;
    this.env.log('info', `${e.id} stopped`, { id: e.id, epoch: e.epoch, reason });
    return this.snapshot(e);
  }

  killAll(): Promise<void> {
    const run = this.doKillAll().finally(() => {
      if (this.killing === run) this.killing = undefined;
    });
    this.killing = run;
    return run;
  }

  private async doKillAll(): Promise<void> {
    // signals first, synchronously: self-fencing must be fast
    const marked = [...this.entries.values()];
    const targets: Entry[] = [];
    for (const e of marked) {
      this.clearTimers(e);
      const wasLive = e.state !== 'stopped';
      e.state = 'stopping';
      e.reason = 'killed (killAll: self-fence)';
      if (e.pgid === undefined || !wasLive) continue;
      if (!e.adopted || this.groupLive(e)) signalGroup(e.pgid, 'SIGKILL');
      targets.push(e);
    }
    const known = new Set([...this.entries.values()].map((e) => e.pgid));
    const strays: Pidfile[] = [];
    for (const { pidfile } of readPidfiles(this.stateDir)) {
      if (!pidfile || known.has(pidfile.pgid)) continue;
      if (groupAlive(pidfile.pgid, pidfile.startTime)) signalGroup(pidfile.pgid, 'SIGKILL');
      strays.push(pidfile);
    }
    const all = [
      ...targets.map((e) => ({ pgid: e.pgid as number, startTime: e.startTime ?? -1 })),
      ...strays.map((pf) => ({ pgid: pf.pgid, startTime: pf.startTime })),
    ];
    const allGone = () => !groupsAlive(all).some(Boolean);
    const gone = await waitFor(allGone, KILL_ALL_WAIT_MS, 10);
    if (!gone)
      this.env.log('error', `killAll: some process groups survive ${KILL_ALL_WAIT_MS} ms after SIGKILL`);
    for (const e of targets) {
      if (!this.groupLive(e)) this.removeEntryPidfile(e);
    }
    for (const pf of strays) {
      if (!groupAlive(pf.pgid, pf.startTime)) removePidfile(this.stateDir, pf.id);
    }
    for (const e of marked) {
      if (this.entries.get(e.id) === e && (e.pgid === undefined || !this.groupLive(e))) {
        e.state = 'stopped';
        this.entries.delete(e.id);
      }
    }
  }

  /** SIGKILL the group, wait (bounded) until it is gone, then drop the pidfile */
  private async killAndForgetGroup(e: Entry): Promise<void> {
    if (e.pgid === undefined) return;
    signalGroup(e.pgid, 'SIGKILL');
    if (await waitFor(() => !this.groupLive(e), KILL_WAIT_MS, GONE_POLL_MS)) this.removeEntryPidfile(e);
    else this.env.log('error', `${e.id}: process group ${e.pgid} survives SIGKILL`, { id: e.id });
  }

  private groupLive(e: Entry): boolean {
    if (e.pgid === undefined) return false;
    return groupAlive(e.pgid, e.startTime ?? -1);
  }

  // ---- recover --------------------------------------------------------------------------------

  /**
   * Adopt what an earlier agent left running (pidfile + live pid + matching /proc start time).
   * Stale pidfiles are removed (and leftover members of a dead resource's group killed).
   * Returns every resource this driver now runs.
   */
  async recover(): Promise<LocalResource[]> {
    for (const { path, pidfile, error } of readPidfiles(this.stateDir)) {
      if (!pidfile) {
        this.env.log('warn', `removing malformed pidfile ${path}: ${error}`);
        removePidfile(this.stateDir, path.slice(path.lastIndexOf('/') + 1, -'.json'.length));
        continue;
      }
      if (!this.entries.has(pidfile.id)) await this.adopt(pidfile, true);
    }
    return this.list().filter((r) => r.state === 'started' || r.state === 'starting');
  }

  private adoptFromPidfile(id: string): Entry | undefined {
    const pf = readPidfile(this.stateDir, id);
    if (!pf) return undefined;
    void this.adopt(pf, false);
    return this.entries.get(id);
  }

  /** adopt one pidfile; the synchronous part registers the entry (so callers see it at once) */
  private async adopt(pf: Pidfile, waitForLeftovers: boolean): Promise<void> {
    if (pf.node !== this.node) {
      this.env.log('warn', `pidfile of ${pf.id} names node ${pf.node}, this is ${this.node}`, { id: pf.id });
    }
    if (!isAlive(pf.pid, pf.startTime)) {
      // the resource died while no agent watched; kill what is left of its group, drop the pidfile
      const leftovers = groupAlive(pf.pgid, pf.startTime);
      if (leftovers) signalGroup(pf.pgid, 'SIGKILL');
      this.env.log('info', `removing stale pidfile of ${pf.id} (pid ${pf.pid} is gone)`, { id: pf.id });
      const done = () => {
        if (!groupAlive(pf.pgid, pf.startTime)) removePidfile(this.stateDir, pf.id);
      };
      if (!leftovers) return done();
      const waiting = waitFor(() => !groupAlive(pf.pgid, pf.startTime), KILL_WAIT_MS, GONE_POLL_MS).then(
        done,
      );
      if (waitForLeftovers) await waiting;
      return;
    }
    let spec = pidfileSpec(pf);
    if (!spec) {
      this.env.log(
        'warn',
        `pidfile of ${pf.id} has no valid spec: adopting with default stop settings, no health check`,
      );
      spec = ResourceSpec.parse({ id: pf.id, process: { command: ['(adopted)'] } });
    }
    let markExited!: () => void;
    const exited = new Promise<void>((r) => (markExited = r));
    const e: Entry = {
      id: pf.id,
      epoch: pf.epoch,
      state: 'started',
      reason: `adopted running process ${pf.pid} after an agent restart`,
      spec,
      specHash: pf.specHash,
      logPath: pf.logPath,
      logOffset: fileSize(pf.logPath),
      pid: pf.pid,
      pgid: pf.pgid,
      startTime: pf.startTime,
      startedAtMs: pf.startedAtMs,
      adopted: true,
      exited,
      markExited,
      healthFailures: 0,
    };
    this.entries.set(pf.id, e);
    this.env.log('info', `${pf.id} adopted`, { id: pf.id, epoch: pf.epoch, pid: pf.pid });
    this.startPolling(e);
    this.scheduleHealth(e);
  }

  // ---- helpers --------------------------------------------------------------------------------

  private snapshot(e: Entry): LocalResource {
    return { id: e.id, epoch: e.epoch, state: e.state, reason: e.reason };
  }

  private failedResult(id: string, epoch: number, reason: string): LocalResource {
    return { id, epoch, state: 'failed', reason };
  }

  private logPathOf(spec: ResourceSpec): string {
    const log = procOf(spec).log;
    if (log === undefined) return join(this.stateDir, LOG_DIR, `${spec.id}.log`);
    return isAbsolute(log) ? log : join(this.stateDir, log);
  }

  private resourceEnv(e: Entry): NodeJS.ProcessEnv {
    return {
      ...process.env,
      ...procOf(e.spec).env,
      CORRAL_RESOURCE: e.id,
      CORRAL_EPOCH: String(e.epoch),
      CORRAL_NODE: this.node,
    };
  }

  private exitReason(e: Entry, when: string): string {
    const how = e.adopted
      ? `process ${e.pid} exited (status unknown: adopted after an agent restart)`
      : `${describeExit(e.exit?.code ?? null, e.exit?.signal ?? null)}`;
    const tail = readLogTail(e.logPath, e.logOffset);
    return `${how} ${when}${tail ? `; last output: ${tail}` : ''}`;
  }

  private writeEntryPidfile(e: Entry): void {
    invariant(
      e.pid !== undefined && e.pgid !== undefined && e.startTime !== undefined,
      `${e.id}: pidfile needs pid`,
    );
    writePidfile(this.stateDir, {
      id: e.id,
      node: this.node,
      pid: e.pid,
      pgid: e.pgid,
      epoch: e.epoch,
      startTime: e.startTime,
      specHash: e.specHash,
      startedAtMs: e.startedAtMs ?? Date.now(),
      logPath: e.logPath,
      spec: e.spec,
    });
  }

  /** remove the pidfile only if it still describes this entry's process (a newer start may own it) */
  private removeEntryPidfile(e: Entry): void {
    const current = readPidfile(this.stateDir, e.id);
    if (!current || current.pid === e.pid) removePidfile(this.stateDir, e.id);
  }
}

function fileSize(path: string): number {
  try {
    return statSync(path).size;
  } catch {
    return 0;
  }
}

/** the last LOG_TAIL_LINES lines written after `fromOffset`, joined with " | " */
export function readLogTail(path: string, fromOffset: number): string {
  let fd: number;
  try {
    fd = openSync(path, 'r');
  } catch {
    return '';
  }
  try {
    const size = fstatSync(fd).size;
    const start = Math.max(fromOffset, size - LOG_TAIL_BYTES);
    const len = size - start;
    if (len <= 0) return '';
    const buf = Buffer.alloc(len);
    readSync(fd, buf, 0, len, start);
    const lines = buf
      .toString('utf8')
      .split('\n')
      .map((l) => l.trimEnd())
      .filter((l) => l !== '');
    return lines.slice(-LOG_TAIL_LINES).join(' | ');
  } finally {
    closeSync(fd);
  }
}

/** uid/gid of a user through `id -u/-g USER` (covers NSS: LDAP, sssd...) */
export async function lookupUser(user: string): Promise<{ uid: number; gid: number } | { error: string }> {
  const run = (flag: string) =>
    new Promise<string>((resolve, reject) => {
      execFile('id', [flag, '--', user], { timeout: USER_LOOKUP_TIMEOUT_MS }, (err, stdout, stderr) => {
        if (err) reject(new Error(stderr.trim() || err.message));
        else resolve(stdout.trim());
      });
    });
  try {
    const [uid, gid] = [Number(await run('-u')), Number(await run('-g'))];
    if (!Number.isInteger(uid) || !Number.isInteger(gid))
      return { error: `user ${user}: id gave no numeric ids` };
    return { uid, gid };
  } catch (err) {
    return { error: `unknown user ${user} (${(err as Error).message}); create it or fix process.user` };
  }
}
