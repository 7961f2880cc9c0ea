// The one door to the world for the agent and the manager (STYLE habit 2). Production:
// src/env/node.ts (real clock, real store, real processes). Simulation: src/sim/env.ts
// (virtual clock, simulated store, drivers and fence devices). Agent and manager code
// never touch Date.now, timers, child_process or the network directly.
import type { Rng } from '../core/rng.js';
import type { ResourceSpec } from '../core/spec.js';
import type { MigrationProgress } from '../core/types.js';

export interface Env {
  /** wall-clock ms (virtual in the simulator) */
  nowMs(): number;
  /** resolves after ms (virtual in the simulator) */
  sleep(ms: number): Promise<void>;
  /** run fn after ms unless cancelled; returns the cancel function */
  setTimer(ms: number, fn: () => void): () => void;
  rng: Rng;
  log(level: 'debug' | 'info' | 'warn' | 'error', msg: string, fields?: Record<string, unknown>): void;
}

/** How a stop proceeds (the agent passes the resource's current definition). */
export interface StopOptions {
  /** the grace before the kill (overrides the one the copy was started with); 0 kills at once */
  graceMs?: number;
}

/** What a driver observes of one resource on this node. */
export interface LocalResource {
  id: string;
  /** the assignment epoch it was started for */
  epoch: number;
  /** incoming: a live-migration target waiting for the stream (the guest does not run yet) */
  state: 'starting' | 'started' | 'stopping' | 'stopped' | 'failed' | 'incoming';
  reason: string;
  /**
   * Found after an agent restart with an outgoing live migration the earlier agent started:
   * sending (QEMU still sends the guest), sent (the stream completed: this copy is paused for
   * good and must never run again), failed (the migration failed or was cancelled). Cleared
   * by migrateOut (which follows or reports it) or cancelMigration (which resumes the guest).
   */
  outgoing?: 'sending' | 'sent' | 'failed';
}

export type MigrateOutcome =
  { ok: true; progress: MigrationProgress } | { ok: false; reason: string; progress?: MigrationProgress };

export type DriverEvent =
  /** the resource left the started state on its own: exited, crashed, health check failed */
  | { type: 'failed'; id: string; epoch: number; reason: string }
  /** an incoming live-migration copy received the guest and runs it (list() shows it started) */
  | { type: 'received'; id: string; epoch: number; reason: string };

/**
 * Runs resources on one node. One implementation per kind (process, qemu, ocf) and a
 * simulated one. Implementations are idempotent: starting a started resource at the same
 * epoch or stopping a stopped one succeeds at once.
 */
export interface Driver {
  /** find resources left running by an earlier agent on this node (after a restart) */
  recover(): Promise<LocalResource[]>;
  /** start and wait until healthy; resolves with started, or failed and a reason (never throws for expected failures) */
  start(spec: ResourceSpec, epoch: number): Promise<LocalResource>;
  /** stop gracefully (signal, timeout, then kill); resolves once it no longer runs */
  stop(id: string, opts?: StopOptions): Promise<LocalResource>;
  /** kill at once, without grace (self-fence); resolves once it no longer runs */
  killAll(): Promise<void>;
  list(): LocalResource[];
  /**
   * Live migration (drivers that support it, e.g. qemu). Target: start a copy waiting for
   * the stream at `epoch`; once the stream completes the copy runs on its own and list()
   * shows it 'started'. Source: send the running copy to host:port; on success the local
   * copy is stopped for good (the driver forgets it), on failure it keeps running.
   */
  supportsMigration?(spec: ResourceSpec): boolean;
  prepareIncoming?(
    spec: ResourceSpec,
    epoch: number,
  ): Promise<{ ok: true; host: string; port: number } | { ok: false; reason: string }>;
  migrateOut?(
    id: string,
    target: { host: string; port: number },
    onProgress: (p: MigrationProgress) => void,
  ): Promise<MigrateOutcome>;
  /** cancel an outgoing migration; the local guest runs again unless the stream had completed */
  cancelMigration?(id: string): Promise<void>;
  /** events that happen on their own (crash, health check failure), delivered at once */
  onEvent(handler: (ev: DriverEvent) => void): void;
  close(): Promise<void>;
}

/**
 * A node-level watchdog (softdog-like): if not fed before its deadline, it kills every
 * resource of the node. Protects against a frozen or killed agent whose node has no fence device.
 */
export interface Watchdog {
  /** the node's resources may keep running for at most this long from now */
  feed(allowMs: number): void;
  /** stop watching (clean shutdown, or cluster disarmed) */
  disarm(): void;
  close(): Promise<void>;
}

export type FenceOutcome =
  | { ok: true; device: string; durationMs: number }
  | { ok: false; attempts: { device: string; error: string }[]; durationMs: number };

/** Runs a node's fence devices in the configured order until one succeeds. */
export interface Fencer {
  /** number of devices configured for the node (0: fall back to the self-fence deadline) */
  deviceCount(node: string): number;
  fence(node: string, deadlineMs: number): Promise<FenceOutcome>;
}

/**
 * A node-level health monitor beside the lease (disk heartbeat, reachability): it may
 * declare the node isolated (its resources move away) or demand a self-fence at once.
 */
export interface NodeMonitor {
  readonly name: string;
  start(ctx: NodeMonitorContext): Promise<void>;
  stop(): Promise<void>;
  /**
   * Until when (Env time) this monitor vouches that the node may keep its resources without
   * the store, or 0. Only a channel the manager can fence through (the heartbeat disk with an
   * sbd device: a poison pill is obeyed within one interval) may vouch: see DiskHeartbeat.
   */
  vouchUntilMs?(): number;
}

export interface NodeMonitorContext {
  node: string;
  /**
   * kill every resource now and rejoin later (the agent's self-fence); true once every resource
   * is down by a kill, false when nothing was killed (cluster disarmed, agent stopping)
   */
  selfFence(why: string): Promise<boolean>;
  /** report the node isolated (or no longer) in its alive record */
  setIsolated(isolated: boolean, why: string): void;
  /** true while the lease was renewed within its renew interval (the store is reachable) */
  storeHealthy(): boolean;
  /** the agent's lease is currently held */
  joined(): boolean;
}
