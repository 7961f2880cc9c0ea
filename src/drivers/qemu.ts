// The qemu driver: runs `kind: vm` resources as QEMU processes driven through QMP.
// - QEMU runs directly (no shell) in its own process group, output to vm/<id>/qemu.log, one
//   QMP socket and (with vnc) one VNC socket per VM under vm/<id>/ (qemu-paths.ts);
// - a pidfile run/<id>.json in the process driver's format (pid, pgid, /proc start time,
//   spec), so the watchdog and the local fence device kill VMs like any resource, and a
//   restarted agent re-attaches to running VMs (recover) without rebooting them;
// - QEMU's exit is seen at once (child exit, QMP connection closed) and so are guest
//   errors (STOP with a failed run state, GUEST_PANICKED): a started VM then emits `failed`;
// - stop = ACPI power-down, shutdownTimeoutMs, then QMP quit, then SIGKILL;
// - live migration: prepareIncoming starts QEMU with `-incoming tcp:<address>:<port>`,
//   migrateOut runs QMP migrate and follows query-migrate, then quits the source.
import { spawn, type ChildProcess } from 'node:child_process';
import { closeSync, mkdirSync, openSync, rmSync, statSync, unlinkSync, writeSync } from 'node:fs';
import { createServer } from 'node:net';
import { isAbsolute, join } from 'node:path';
import { invariant } from '../core/errors.js';
import { ResourceSpec } from '../core/spec.js';
import type { MigrationProgress } from '../core/types.js';
import type { Driver, DriverEvent, Env, LocalResource, MigrateOutcome, StopOptions } from '../env/types.js';
import { describeGuestCheck, probeGuest } from '../health/guest.js';
import { pidfileSpec, readPidfile, readPidfiles, removePidfile, writePidfile } from './pidfile.js';
import { DriverError, readLogTail, specHash } from './process.js';
import { groupAlive, isAlive, readProcStat, signalGroup, waitFor } from './proc.js';
import { QEMU_BINARY_DEFAULT, qemuArgs } from './qemu-args.js';
import { vmGuestAgentSocket, vmPaths } from './qemu-paths.js';
import { QmpClient } from './qmp.js';
import { resetChildNice } from './priority.js';

/** QEMU must answer on its QMP socket within this after spawn (or after -incoming) */
export const QEMU_START_TIMEOUT_MS = 15000;
/** poll period while waiting for the QMP socket to appear */
export const QMP_SOCKET_POLL_MS = 20;
/** after QMP `quit`, QEMU must be gone within this before SIGKILL */
export const QUIT_WAIT_MS = 3000;
/** after SIGKILL, bound on waiting for the group to vanish */
export const KILL_WAIT_MS = 5000;
export const GONE_POLL_MS = 20;
/** adopted QEMUs are not our children: poll /proc this often as well as watching QMP */
export const ADOPTED_POLL_MS = 250;
/** query-migrate polling period during an outgoing migration */
export const MIGRATE_POLL_MS = 50;
/** QMP command bound during migration polling */
export const MIGRATE_QMP_TIMEOUT_MS = 5000;
/** an incoming copy checks its run state this often (beside the RESUME event) */
export const INCOMING_POLL_MS = 100;
/** migration bandwidth cap set on the source unless the VM sets migrationBandwidthMiBps (QEMU's own default is 32 MiB/s) */
export const MIGRATE_MAX_BANDWIDTH_BPS = 4 * 1024 * 1024 * 1024;
/** allowed guest pause at the end of a migration */
export const MIGRATE_DOWNTIME_LIMIT_MS = 300;
/** adopted in finish-migrate (the last phase of a migration): wait this long for it to settle */
export const MIGRATE_SETTLE_MS = 10000;
/** a migration QEMU does not show as under way (or done) this long after `migrate` counts as failed */
export const MIGRATE_START_GRACE_MS = 2000;
/** cancelMigration: bound on waiting for QEMU to leave the active migration states */
export const MIGRATE_CANCEL_WAIT_MS = 10000;
/** query-migrate states of a migration still under way */
const MIGRATION_ACTIVE = new Set([
  'setup',
  'active',
  'pre-switchover',
  'device',
  'wait-unplug',
  'cancelling',
  'postcopy-active',
  'postcopy-paused',
  'postcopy-recover',
  'colo',
]);
/** run states in which a VM counts as failed */
const FAILED_RUN_STATES = new Set(['internal-error', 'io-error', 'guest-panicked', 'shutdown']);

export interface QemuDriverOptions {
  node: string;
  /** the node's address: live-migration targets listen here */
  address: string;
  stateDir: string;
  env: Pick<Env, 'log'>;
  /** QEMU binary (default qemu-system-x86_64 on PATH) */
  qemuBinary?: string;
  /** nice value for QEMU processes (the agent raised its own: see drivers/priority.ts) */
  childNice?: number;
}

type State = LocalResource['state'];

interface VmEntry {
  id: string;
  epoch: number;
  state: State;
  reason: string;
  spec: ResourceSpec;
  pid?: number;
  startTime?: number;
  startedAtMs?: number;
  child?: ChildProcess;
  adopted: boolean;
  qmp?: QmpClient;
  gone: boolean;
  exited: Promise<void>;
  markExited: () => void;
  /** set by stop/kill/migration: QEMU going away is expected, not a failure */
  leaving: boolean;
  logOffset: number;
  incoming?: { host: string; port: number };
  /** a stop without grace arrived while a graceful one waited for the guest */
  killNow?: boolean;
  /** wakes migrateOut's wait for the next query-migrate (QEMU's MIGRATION event) */
  migrationWake?: () => void;
  /** adopted with an outgoing migration left by the earlier agent (see LocalResource.outgoing) */
  outgoing?: 'sending' | 'sent' | 'failed';
  pollTimer?: NodeJS.Timeout;
  livenessTimer?: NodeJS.Timeout;
  livenessFailures: number;
  starting?: Promise<LocalResource>;
  stopping?: Promise<LocalResource>;
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

interface QueryMigrate {
  status?: string;
  'total-time'?: number;
  downtime?: number;
  'error-desc'?: string;
  ram?: { transferred?: number; total?: number; remaining?: number; mbps?: number };
}

export class QemuDriver implements Driver {
  private readonly entries = new Map<string, VmEntry>();
  private readonly handlers: ((ev: DriverEvent) => void)[] = [];
  private closed = false;
  private readonly qemu: string;

  constructor(private readonly o: QemuDriverOptions) {
    if (!isAbsolute(o.stateDir))
      throw new DriverError('qemu driver', `stateDir ${o.stateDir} is not absolute`, 'pass an absolute path');
    this.qemu = o.qemuBinary ?? QEMU_BINARY_DEFAULT;
    mkdirSync(join(o.stateDir, 'vm'), { recursive: true });
  }

  /** ids this driver runs or watches (the composite driver routes by it) */
  owns(id: string): boolean {
    return this.entries.has(id);
  }

  list(): LocalResource[] {
    return [...this.entries.values()].map((e) => this.snapshot(e));
  }

  onEvent(h: (ev: DriverEvent) => void): void {
    this.handlers.push(h);
  }

  supportsMigration(spec: ResourceSpec): boolean {
    return spec.kind === 'vm';
  }

  /** the QMP connection of a running VM (tests, benchmarks, `corral check`) */
  qmpOf(id: string): QmpClient | undefined {
    return this.entries.get(id)?.qmp;
  }

  async close(): Promise<void> {
    // VMs keep running: a new agent re-attaches through recover()
    this.closed = true;
    for (const e of this.entries.values()) {
      this.clearTimers(e);
      e.child?.removeAllListeners('exit');
      e.qmp?.close();
    }
  }

  // ---- start ----------------------------------------------------------------------------------

  async start(specIn: ResourceSpec, epoch: number): Promise<LocalResource> {
    const parsed = ResourceSpec.safeParse(specIn);
    if (!parsed.success || parsed.data.kind !== 'vm' || !parsed.data.vm) {
      const issue = parsed.success ? undefined : parsed.error.issues[0];
      const why = issue
        ? `invalid spec at ${issue.path.join('.') || '(root)'}: ${issue.message}`
        : 'not a vm';
      return { id: String(specIn?.id), epoch, state: 'failed', reason: why };
    }
    const spec = parsed.data;
    invariant(
      Number.isInteger(epoch) && epoch >= 0,
      `start ${spec.id}: epoch must be a non-negative integer`,
    );
    const e = this.entries.get(spec.id) ?? (await this.adoptFromPidfile(spec.id));
    if (e) {
      if (e.starting) return e.starting;
      if (e.stopping) await e.stopping;
      else if (e.state === 'incoming' && e.epoch === epoch) return this.snapshot(e);
      else if ((e.state === 'started' || e.state === 'starting') && e.outgoing !== 'sent') {
        if (e.epoch !== epoch) this.reEpoch(e, epoch);
        return this.snapshot(e);
      } else if (!e.gone) {
        await this.kill(e);
      }
      if (this.entries.get(spec.id) === e) this.entries.delete(spec.id);
    }
    return this.launch(spec, epoch, undefined);
  }

  private launch(
    spec: ResourceSpec,
    epoch: number,
    incoming: { host: string; port: number } | undefined,
  ): Promise<LocalResource> {
    if (this.closed)
      return Promise.resolve({ id: spec.id, epoch, state: 'failed', reason: 'qemu driver is closed' });
    let markExited!: () => void;
    const exited = new Promise<void>((r) => (markExited = r));
    const e: VmEntry = {
      id: spec.id,
      epoch,
      state: incoming ? 'incoming' : 'starting',
      reason: incoming ? 'starting to receive a live migration' : 'starting',
      spec,
      adopted: false,
      gone: false,
      exited,
      markExited,
      leaving: false,
      logOffset: 0,
      incoming,
      livenessFailures: 0,
    };
    this.entries.set(spec.id, e);
    e.starting = this.doLaunch(e).finally(() => (e.starting = undefined));
    return e.starting;
  }

  private async doLaunch(e: VmEntry): Promise<LocalResource> {
    const p = vmPaths(this.o.stateDir, e.id);
    for (const d of e.spec.vm?.disks ?? []) {
      try {
        statSync(d.path);
      } catch {
        return this.failStart(e, `disk ${d.path} does not exist on ${this.o.node}`);
      }
    }
    let fd: number;
    try {
      mkdirSync(p.dir, { recursive: true, mode: 0o700 });
      for (const s of [
        p.qmpSocket,
        p.adminQmpSocket,
        p.vncSocket,
        vmGuestAgentSocket(this.o.stateDir, e.id),
      ]) {
        try {
          unlinkSync(s);
        } catch {
          // absent
        }
      }
      fd = openSync(p.log, 'a', 0o640);
      writeSync(
        fd,
        `--- corral: ${e.incoming ? 'incoming' : 'start'} ${e.id} epoch ${e.epoch} on ${this.o.node} at ${new Date().toISOString()}\n`,
      );
      e.logOffset = statSync(p.log).size;
    } catch (err) {
      return this.failStart(e, `cannot prepare ${p.dir}: ${(err as Error).message}`);
    }
    const args = qemuArgs(e.spec, { stateDir: this.o.stateDir, incoming: e.incoming });
    let child: ChildProcess;
    try {
      child = spawn(this.qemu, args, { detached: true, stdio: ['ignore', fd, fd] });
    } catch (err) {
      closeSync(fd);
      return this.failStart(e, `cannot execute ${this.qemu}: ${(err as Error).message}`);
    }
    closeSync(fd);
    const spawned = await new Promise<string | null>((resolve) => {
      child.once('spawn', () => resolve(null));
      child.once('error', (err: NodeJS.ErrnoException) => resolve(err.code ?? err.message));
    });
    if (spawned !== null || child.pid === undefined) {
      const hint = spawned === 'ENOENT' ? ' (not installed? Debian: apt-get install qemu-system-x86)' : '';
      return this.failStart(e, `cannot execute ${this.qemu}: ${spawned ?? 'no pid'}${hint}`);
    }
    resetChildNice(child.pid, this.o.childNice);
    child.unref();
    e.child = child;
    e.pid = child.pid;
    e.startTime = readProcStat(child.pid)?.startTime ?? 0;
    e.startedAtMs = Date.now();
    child.on('exit', (code, signal) =>
      this.onGone(e, code !== null ? `QEMU exited with code ${code}` : `QEMU killed by signal ${signal}`),
    );
    this.writeEntryPidfile(e);
    const qmp = await this.connectQmp(e, QEMU_START_TIMEOUT_MS);
    if (!qmp)
      return this.failStart(e, `QEMU did not answer on ${p.qmpSocket} within ${QEMU_START_TIMEOUT_MS} ms`);
    if (e.gone) return this.failStart(e, 'QEMU exited during start');
    if (e.incoming) {
      this.watchIncoming(e);
      return this.snapshot(e);
    }
    try {
      const st = await qmp.execute<{ status: string }>('query-status');
      if (st.status !== 'running') return this.failStart(e, `QEMU run state is ${st.status} after start`);
    } catch (err) {
      return this.failStart(e, (err as Error).message);
    }
    if (e.state !== 'starting' || this.entries.get(e.id) !== e) return this.snapshot(e);
    e.state = 'started';
    e.reason = `QEMU ${e.pid} running`;
    this.o.env.log('info', `${e.id} started`, { id: e.id, epoch: e.epoch, pid: e.pid });
    this.scheduleLiveness(e, true);
    return this.snapshot(e);
  }

  /** connect to the VM's QMP socket (retrying until it appears) and watch its events */
  private async connectQmp(e: VmEntry, timeoutMs: number): Promise<QmpClient | undefined> {
    const sock = vmPaths(this.o.stateDir, e.id).qmpSocket;
    const deadline = performance.now() + timeoutMs;
    while (performance.now() < deadline && !e.gone) {
      try {
        const qmp = await QmpClient.connect(sock, Math.max(100, deadline - performance.now()));
        e.qmp = qmp;
        qmp.onEvent((ev) => this.onQmpEvent(e, ev.event, ev.data));
        qmp.onClose(() => {
          if (e.qmp === qmp) e.qmp = undefined;
          // QEMU closes QMP when it exits: confirm with /proc before calling it gone
          if (!this.closed && e.pid !== undefined && !isAlive(e.pid, e.startTime))
            this.onGone(e, 'QEMU exited');
        });
        return qmp;
      } catch {
        await sleep(QMP_SOCKET_POLL_MS);
      }
    }
    return undefined;
  }

  private onQmpEvent(e: VmEntry, event: string, data: Record<string, unknown> | undefined): void {
    if (event === 'MIGRATION') e.migrationWake?.();
    if (this.closed || this.entries.get(e.id) !== e) return;
    if (event === 'RESUME' && e.state === 'incoming') return void this.checkIncoming(e);
    if (e.state !== 'started' || e.leaving) return;
    if (event === 'GUEST_PANICKED') return this.fail(e, 'guest panicked');
    if (event === 'SHUTDOWN' && data?.guest === true) return this.fail(e, 'the guest powered itself off');
    if (event === 'STOP') {
      // a pause we did not ask for: find out why (an I/O or internal error fails the VM)
      void e.qmp
        ?.execute<{ status: string }>('query-status')
        .then((st) => {
          if (FAILED_RUN_STATES.has(st.status) && e.state === 'started' && !e.leaving)
            this.fail(e, `QEMU stopped the guest: run state ${st.status}`);
        })
        .catch(() => undefined);
    }
  }

  /** QEMU went away (child exit, QMP closed and /proc confirms, adopted poll) */
  private onGone(e: VmEntry, why: string): void {
    if (e.gone) return;
    e.gone = true;
    e.markExited();
    this.clearTimers(e);
    e.qmp?.close();
    if (this.closed || e.leaving) return;
    if (e.state !== 'started' && e.state !== 'incoming') return; // a start in progress reports it itself
    const tail = readLogTail(vmPaths(this.o.stateDir, e.id).log, e.logOffset);
    e.state = 'failed';
    e.reason = `${why}${tail ? `; last output: ${tail}` : ''}`;
    this.removeEntryPidfile(e);
    this.o.env.log('warn', `${e.id} failed`, { id: e.id, epoch: e.epoch, reason: e.reason });
    this.emit({ type: 'failed', id: e.id, epoch: e.epoch, reason: e.reason });
  }

  /** the VM failed while QEMU still runs (guest error, liveness): kill it and report */
  private fail(e: VmEntry, reason: string): void {
    if (e.state !== 'started') return;
    e.state = 'failed';
    e.reason = reason;
    e.leaving = true;
    this.clearTimers(e);
    this.o.env.log('warn', `${e.id} failed`, { id: e.id, epoch: e.epoch, reason });
    void this.kill(e);
    this.emit({ type: 'failed', id: e.id, epoch: e.epoch, reason });
  }

  private reEpoch(e: VmEntry, epoch: number): void {
    this.o.env.log('info', `${e.id} already running, epoch ${e.epoch} -> ${epoch}`, { id: e.id });
    e.epoch = epoch;
    this.writeEntryPidfile(e);
  }

  private async failStart(e: VmEntry, reason: string): Promise<LocalResource> {
    const tail = readLogTail(vmPaths(this.o.stateDir, e.id).log, e.logOffset);
    e.state = 'failed';
    e.reason = `start failed: ${reason}${tail ? `; QEMU said: ${tail}` : ''}`;
    e.leaving = true;
    this.o.env.log('warn', `${e.id} failed to start`, { id: e.id, epoch: e.epoch, reason: e.reason });
    await this.kill(e);
    return this.snapshot(e);
  }

  // ---- liveness -------------------------------------------------------------------------------

  private scheduleLiveness(e: VmEntry, first: boolean): void {
    const c = e.spec.vm?.liveness;
    if (!c || this.closed || e.state !== 'started') return;
    const delay = first ? Math.max(c.startGraceMs, c.intervalMs) : c.intervalMs;
    e.livenessTimer = setTimeout(() => {
      e.livenessTimer = undefined;
      void probeGuest(c, vmGuestAgentSocket(this.o.stateDir, e.id)).then((r) => {
        if (this.closed || e.state !== 'started' || e.leaving || this.entries.get(e.id) !== e) return;
        if (r.ok) {
          e.livenessFailures = 0;
          return this.scheduleLiveness(e, false);
        }
        e.livenessFailures++;
        if (e.livenessFailures < c.failures) return this.scheduleLiveness(e, false);
        this.fail(e, `${describeGuestCheck(c)} failed ${e.livenessFailures} times in a row: ${r.error}`);
      });
    }, delay);
  }

  // ---- stop / kill ----------------------------------------------------------------------------

  async stop(id: string, opts: StopOptions = {}): Promise<LocalResource> {
    const e = this.entries.get(id) ?? (await this.adoptFromPidfile(id));
    if (!e) return { id, epoch: 0, state: 'stopped', reason: 'not running' };
    if (e.stopping) {
      // a destroy during a graceful shutdown: kill now, do not wait out the grace
      if (opts.graceMs === 0 && !e.killNow && !e.gone && this.live(e)) {
        e.killNow = true;
        void this.kill(e);
      }
      return e.stopping;
    }
    e.stopping = this.doStop(e, opts).finally(() => (e.stopping = undefined));
    return e.stopping;
  }

  private async doStop(e: VmEntry, opts: StopOptions): Promise<LocalResource> {
    const prev = e.state;
    e.leaving = true;
    this.clearTimers(e);
    e.state = 'stopping';
    e.reason = 'stopping';
    let reason = prev === 'failed' ? `stopped after failure: ${e.reason}` : 'not running';
    const timeoutMs = opts.graceMs ?? e.spec.vm?.shutdownTimeoutMs ?? 0;
    if (!e.gone && this.live(e)) {
      if (prev === 'started' && timeoutMs > 0 && e.qmp && e.outgoing !== 'sent') {
        await e.qmp.execute('system_powerdown').catch(() => undefined);
        const t0 = performance.now();
        await Promise.race([e.exited, sleep(timeoutMs), this.goneByPoll(e, timeoutMs)]);
        reason = e.killNow
          ? `killed at once during the ACPI shutdown (after ${Math.round(performance.now() - t0)} ms)`
          : `guest shut down after ACPI power-down (${Math.round(performance.now() - t0)} ms)`;
      }
      if (this.live(e)) {
        reason =
          prev === 'started' && timeoutMs > 0
            ? `killed: no ACPI shutdown within shutdownTimeoutMs ${timeoutMs} ms`
            : timeoutMs === 0
              ? 'killed at once (no grace: destroy or shutdownTimeoutMs 0)'
              : 'killed';
        await this.kill(e);
      }
    }
    if (this.live(e)) {
      e.state = 'failed';
      e.reason = `QEMU ${e.pid} still present after SIGKILL`;
      return this.snapshot(e);
    }
    this.forget(e);
    e.state = 'stopped';
    e.reason = reason;
    this.o.env.log('info', `${e.id} stopped`, { id: e.id, epoch: e.epoch, reason });
    return this.snapshot(e);
  }

  private goneByPoll(e: VmEntry, timeoutMs: number): Promise<boolean> {
    return waitFor(() => !this.live(e), timeoutMs, GONE_POLL_MS);
  }

  /** quit through QMP, then SIGKILL; resolves once the process group is gone (bounded) */
  private async kill(e: VmEntry): Promise<void> {
    e.leaving = true;
    if (e.pid === undefined) return;
    if (e.qmp && this.live(e)) {
      await e.qmp.execute('quit', undefined, QUIT_WAIT_MS).catch(() => undefined);
      await this.goneByPoll(e, QUIT_WAIT_MS);
    }
    if (this.live(e)) {
      signalGroup(e.pid, 'SIGKILL');
      if (!(await this.goneByPoll(e, KILL_WAIT_MS)))
        this.o.env.log('error', `${e.id}: QEMU ${e.pid} survives SIGKILL`, { id: e.id });
    }
    if (!this.live(e)) {
      this.onGone(e, 'killed');
      this.removeEntryPidfile(e);
    }
  }

  async killAll(): Promise<void> {
    const all = [...this.entries.values()];
    for (const e of all) {
      e.leaving = true;
      this.clearTimers(e);
      if (e.pid !== undefined && this.live(e)) signalGroup(e.pid, 'SIGKILL');
    }
    await waitFor(() => all.every((e) => !this.live(e)), KILL_WAIT_MS, 10);
    for (const e of all) {
      if (!this.live(e)) {
        this.onGone(e, 'killed (killAll: self-fence)');
        this.forget(e);
      }
    }
  }

  private live(e: VmEntry): boolean {
    return e.pid !== undefined && groupAlive(e.pid, e.startTime ?? -1);
  }

  private forget(e: VmEntry): void {
    this.clearTimers(e);
    e.qmp?.close();
    this.removeEntryPidfile(e);
    if (this.entries.get(e.id) === e) this.entries.delete(e.id);
  }

  // ---- live migration -------------------------------------------------------------------------

  async prepareIncoming(
    specIn: ResourceSpec,
    epoch: number,
  ): Promise<{ ok: true; host: string; port: number } | { ok: false; reason: string }> {
    const parsed = ResourceSpec.safeParse(specIn);
    if (!parsed.success || !parsed.data.vm) return { ok: false, reason: 'not a valid vm spec' };
    const spec = parsed.data;
    const old = this.entries.get(spec.id);
    if (old && !old.gone && old.state !== 'failed' && old.state !== 'stopped') {
      if (old.state === 'incoming' && old.epoch === epoch && old.incoming)
        return { ok: true, ...old.incoming };
      return {
        ok: false,
        reason: `${spec.id} already runs on ${this.o.node} (${old.state} at epoch ${old.epoch})`,
      };
    }
    if (old) this.entries.delete(spec.id);
    let port: number;
    try {
      port = await freePort(this.o.address);
    } catch (err) {
      return { ok: false, reason: `no free port on ${this.o.address}: ${(err as Error).message}` };
    }
    const r = await this.launch(spec, epoch, { host: this.o.address, port });
    if (r.state !== 'incoming' && r.state !== 'started') return { ok: false, reason: r.reason };
    return { ok: true, host: this.o.address, port };
  }

  private watchIncoming(e: VmEntry): void {
    e.reason = `waiting for the migration stream on ${e.incoming?.host}:${e.incoming?.port}`;
    e.pollTimer = setInterval(() => void this.checkIncoming(e), INCOMING_POLL_MS);
  }

  /** an incoming copy becomes 'started' once QEMU runs the guest after the stream */
  private async checkIncoming(e: VmEntry): Promise<void> {
    if (e.state !== 'incoming' || !e.qmp) return;
    try {
      const st = await e.qmp.execute<{ status: string }>('query-status');
      if (st.status !== 'running' || e.state !== 'incoming') return;
    } catch {
      return;
    }
    if (e.pollTimer) clearInterval(e.pollTimer);
    e.pollTimer = undefined;
    e.state = 'started';
    e.reason = 'running after an incoming live migration';
    e.incoming = undefined;
    this.o.env.log('info', `${e.id} received`, { id: e.id, epoch: e.epoch, pid: e.pid });
    this.scheduleLiveness(e, false);
    this.emit({ type: 'received', id: e.id, epoch: e.epoch, reason: e.reason });
  }

  async migrateOut(
    id: string,
    target: { host: string; port: number },
    onProgress: (p: MigrationProgress) => void,
  ): Promise<MigrateOutcome> {
    const e = this.entries.get(id);
    if (!e || e.state !== 'started' || !e.qmp)
      return { ok: false, reason: `${id} does not run here under QMP` };
    const qmp = e.qmp;
    const t0 = performance.now();
    let last: MigrationProgress = { transferredBytes: 0, totalBytes: 0, rateBps: 0, elapsedMs: 0 };
    const progressOf = (q: QueryMigrate): MigrationProgress => ({
      transferredBytes: q.ram?.transferred ?? last.transferredBytes,
      totalBytes: q.ram?.total ?? last.totalBytes,
      rateBps: Math.round(((q.ram?.mbps ?? 0) * 1e6) / 8),
      downtimeMs: q.downtime,
      elapsedMs: Math.round(performance.now() - t0),
    });
    // adopted after an agent restart: follow (or report) what the earlier agent started
    const adopted = e.outgoing;
    if (adopted === 'failed') {
      const q = await qmp.execute<QueryMigrate>('query-migrate').catch((): QueryMigrate => ({}));
      await this.resumeAfterFailedMigration(e);
      e.outgoing = undefined;
      return {
        ok: false,
        reason: `the migration started before the agent restart ${q.status ?? 'failed'}${q['error-desc'] ? `: ${q['error-desc']}` : ''}`,
      };
    }
    if (adopted === undefined) {
      try {
        await qmp.execute('migrate-set-parameters', {
          'max-bandwidth': migrationBandwidthBps(e.spec),
          'downtime-limit': MIGRATE_DOWNTIME_LIMIT_MS,
        });
        // MIGRATION events: the end of the stream is seen at once, not at the next poll
        await qmp.execute('migrate-set-capabilities', {
          capabilities: [{ capability: 'events', state: true }],
        });
        await qmp.execute('migrate', { uri: `tcp:${target.host}:${target.port}` });
      } catch (err) {
        return { ok: false, reason: `migrate to ${target.host}:${target.port}: ${(err as Error).message}` };
      }
    } else {
      this.o.env.log('info', `${id}: following the outgoing migration an earlier agent started`, { id });
    }
    for (;;) {
      let q: QueryMigrate;
      try {
        q = await qmp.execute<QueryMigrate>('query-migrate', undefined, MIGRATE_QMP_TIMEOUT_MS);
      } catch (err) {
        return { ok: false, reason: `query-migrate: ${(err as Error).message}`, progress: last };
      }
      last = progressOf(q);
      if (q.status === 'completed') break;
      const notStarted =
        !MIGRATION_ACTIVE.has(q.status ?? '') && performance.now() - t0 > MIGRATE_START_GRACE_MS;
      if (q.status === 'failed' || q.status === 'cancelled' || notStarted) {
        // a migration that failed at its very end can leave the guest paused: it still lives here
        await this.resumeAfterFailedMigration(e);
        e.outgoing = undefined;
        return {
          ok: false,
          reason: `QEMU: migration ${q.status ?? 'not under way'}${q['error-desc'] ? `: ${q['error-desc']}` : ''}`,
          progress: last,
        };
      }
      onProgress(last);
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, MIGRATE_POLL_MS);
        e.migrationWake = () => {
          clearTimeout(t);
          resolve();
        };
      });
      e.migrationWake = undefined;
    }
    // the guest now runs on the target: this copy is paused for good; quit it and forget it
    e.outgoing = 'sent';
    e.leaving = true;
    e.state = 'stopping';
    e.reason = `migrated to ${target.host}:${target.port}`;
    this.o.env.log('info', `${id} migrated out`, { id, ...last });
    // paused for good (postmigrate): report at once, quit in the background
    this.clearTimers(e);
    if (this.entries.get(id) === e) this.entries.delete(id);
    void this.kill(e).then(() => {
      e.qmp?.close();
      this.removeEntryPidfile(e);
    });
    return { ok: true, progress: last };
  }

  /**
   * Cancel an outgoing migration and make sure the guest runs here again. A stream that had
   * already completed cannot be taken back: that copy stays paused for good (outgoing 'sent').
   */
  async cancelMigration(id: string): Promise<void> {
    const e = this.entries.get(id);
    const qmp = e?.qmp;
    if (!e || !qmp || e.outgoing === 'sent') return;
    await qmp.execute('migrate_cancel').catch(() => undefined);
    let q: QueryMigrate;
    const deadline = performance.now() + MIGRATE_CANCEL_WAIT_MS;
    for (;;) {
      q = await qmp.execute<QueryMigrate>('query-migrate').catch((): QueryMigrate => ({}));
      if (!MIGRATION_ACTIVE.has(q.status ?? '') || performance.now() > deadline) break;
      await sleep(MIGRATE_POLL_MS);
    }
    if (MIGRATION_ACTIVE.has(q.status ?? '')) return; // still cancelling: the agent asks again
    if (q.status === 'completed') {
      const st = await qmp.execute<{ status: string }>('query-status').catch(() => ({ status: 'unknown' }));
      if (st.status !== 'running') {
        // the cancel came too late: the guest left; never resume this copy
        e.outgoing = 'sent';
        e.reason = 'paused for good: the migration completed before it could be cancelled';
        return;
      }
    }
    await this.resumeAfterFailedMigration(e);
    e.outgoing = undefined;
  }

  /** a migration that did not complete may leave the guest paused: run it again (`cont`) */
  private async resumeAfterFailedMigration(e: VmEntry): Promise<void> {
    const qmp = e.qmp;
    if (!qmp || e.outgoing === 'sent') return;
    const st = await qmp.execute<{ status: string }>('query-status').catch(() => ({ status: 'unknown' }));
    if (st.status !== 'paused' && st.status !== 'finish-migrate') return;
    const q = await qmp.execute<QueryMigrate>('query-migrate').catch((): QueryMigrate => ({}));
    if (q.status === 'completed') return; // the guest left: never resume this copy
    await qmp.execute('cont').catch((err: unknown) =>
      this.o.env.log('error', `${e.id}: cannot resume the guest after a failed migration`, {
        id: e.id,
        error: (err as Error).message,
      }),
    );
    this.o.env.log('info', `${e.id}: guest resumed after a migration that did not complete`, { id: e.id });
  }

  // ---- recover --------------------------------------------------------------------------------

  /** Re-attach to VMs an earlier agent left running (pidfile + /proc start time); never restarts them. */
  async recover(): Promise<LocalResource[]> {
    for (const { pidfile } of readPidfiles(this.o.stateDir)) {
      if (!pidfile || this.entries.has(pidfile.id)) continue;
      if (pidfileSpec(pidfile)?.kind !== 'vm') continue;
      await this.adoptFromPidfile(pidfile.id);
    }
    return this.list().filter((r) => r.state === 'started' || r.state === 'incoming');
  }

  private async adoptFromPidfile(id: string): Promise<VmEntry | undefined> {
    const pf = readPidfile(this.o.stateDir, id);
    const spec = pf ? pidfileSpec(pf) : null;
    if (!pf || !spec || spec.kind !== 'vm') return undefined;
    if (!isAlive(pf.pid, pf.startTime)) {
      if (groupAlive(pf.pgid, pf.startTime)) signalGroup(pf.pgid, 'SIGKILL');
      removePidfile(this.o.stateDir, id);
      this.o.env.log('info', `removing stale pidfile of VM ${id} (QEMU ${pf.pid} is gone)`, { id });
      return undefined;
    }
    let markExited!: () => void;
    const exited = new Promise<void>((r) => (markExited = r));
    const e: VmEntry = {
      id,
      epoch: pf.epoch,
      state: 'started',
      reason: `re-attached to running QEMU ${pf.pid} after an agent restart`,
      spec,
      pid: pf.pid,
      startTime: pf.startTime,
      startedAtMs: pf.startedAtMs,
      adopted: true,
      gone: false,
      exited,
      markExited,
      leaving: false,
      logOffset: fileSize(vmPaths(this.o.stateDir, id).log),
      livenessFailures: 0,
    };
    this.entries.set(id, e);
    const qmp = await this.connectQmp(e, QEMU_START_TIMEOUT_MS);
    e.pollTimer = setInterval(() => {
      if (!isAlive(pf.pid, pf.startTime)) this.onGone(e, `QEMU ${pf.pid} exited`);
    }, ADOPTED_POLL_MS);
    if (!qmp) e.reason += ' (QMP does not answer)';
    else {
      const st = await qmp.execute<{ status: string }>('query-status').catch(() => ({ status: 'unknown' }));
      if (st.status === 'inmigrate') {
        e.state = 'incoming';
        this.watchIncoming(e);
      } else await this.adoptOutgoing(e, qmp, st.status);
    }
    this.o.env.log('info', `VM ${id} re-attached`, { id, epoch: pf.epoch, pid: pf.pid, state: e.state });
    this.scheduleLiveness(e, false);
    return e;
  }

  /**
   * An adopted source copy: find out whether the earlier agent left an outgoing migration
   * behind (QEMU goes on sending without it). finish-migrate is QEMU's last, short phase:
   * wait for it to settle into completed (postmigrate) or failed.
   */
  private async adoptOutgoing(e: VmEntry, qmp: QmpClient, runState: string): Promise<void> {
    const query = () => qmp.execute<QueryMigrate>('query-migrate').catch((): QueryMigrate => ({}));
    let q = await query();
    const deadline = performance.now() + MIGRATE_SETTLE_MS;
    while (runState === 'finish-migrate' && performance.now() < deadline) {
      await sleep(MIGRATE_POLL_MS);
      runState = (await qmp.execute<{ status: string }>('query-status').catch(() => ({ status: 'unknown' })))
        .status;
      q = await query();
    }
    if (MIGRATION_ACTIVE.has(q.status ?? '') || runState === 'finish-migrate') {
      e.outgoing = 'sending';
      e.reason = `re-attached to QEMU ${e.pid} while it sends the guest (outgoing live migration ${q.status ?? runState})`;
    } else if (runState === 'postmigrate' || (q.status === 'completed' && runState !== 'running')) {
      e.outgoing = 'sent';
      e.reason = `re-attached to QEMU ${e.pid}: paused for good after an outgoing live migration completed`;
    } else if (q.status === 'failed' || q.status === 'cancelled') {
      e.outgoing = 'failed';
      e.reason = `re-attached to QEMU ${e.pid} (run state ${runState}) after an outgoing live migration ${q.status}`;
    }
  }

  // ---- helpers --------------------------------------------------------------------------------

  private snapshot(e: VmEntry): LocalResource {
    return {
      id: e.id,
      epoch: e.epoch,
      state: e.state,
      reason: e.reason,
      ...(e.outgoing ? { outgoing: e.outgoing } : {}),
    };
  }

  private clearTimers(e: VmEntry): void {
    if (e.pollTimer) clearInterval(e.pollTimer);
    if (e.livenessTimer) clearTimeout(e.livenessTimer);
    e.pollTimer = undefined;
    e.livenessTimer = undefined;
  }

  private emit(ev: DriverEvent): void {
    for (const h of this.handlers) {
      try {
        h(ev);
      } catch (err) {
        this.o.env.log('error', 'driver event handler threw', { error: (err as Error).message });
      }
    }
  }

  private writeEntryPidfile(e: VmEntry): void {
    invariant(e.pid !== undefined && e.startTime !== undefined, `${e.id}: pidfile needs a pid`);
    writePidfile(this.o.stateDir, {
      id: e.id,
      node: this.o.node,
      pid: e.pid,
      pgid: e.pid,
      epoch: e.epoch,
      startTime: e.startTime,
      specHash: specHash(e.spec),
      startedAtMs: e.startedAtMs ?? Date.now(),
      logPath: vmPaths(this.o.stateDir, e.id).log,
      spec: e.spec,
    });
  }

  private removeEntryPidfile(e: VmEntry): void {
    const current = readPidfile(this.o.stateDir, e.id);
    if (!current || current.pid === e.pid) removePidfile(this.o.stateDir, e.id);
  }
}

function fileSize(path: string): number {
  try {
    return statSync(path).size;
  } catch {
    return 0;
  }
}

/** the bandwidth cap of a VM's outgoing live migrations, bytes/s */
export function migrationBandwidthBps(spec: ResourceSpec): number {
  const mibps = spec.vm?.migrationBandwidthMiBps;
  return mibps === undefined ? MIGRATE_MAX_BANDWIDTH_BPS : Math.max(1, Math.round(mibps * 1024 * 1024));
}

/** a TCP port free on `host` right now (the kernel picks it) */
export function freePort(host: string): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.once('error', reject);
    srv.listen({ host, port: 0 }, () => {
      const addr = srv.address();
      const port = typeof addr === 'object' && addr ? addr.port : 0;
      srv.close(() => (port > 0 ? resolve(port) : reject(new Error('no port'))));
    });
  });
}

/** remove a VM's runtime directory (after undefine); never while QEMU runs */
export function removeVmDir(stateDir: string, id: string): void {
  rmSync(vmPaths(stateDir, id).dir, { recursive: true, force: true });
}
