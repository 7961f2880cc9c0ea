// The cluster's records as the core sees them, and the timings that bound every wait.
// Every record here is stored as JSON under /corral/<cluster>/ (see src/core/keys.ts).
import type { ResourceSpec } from './spec.js';

export type NodeState = 'online' | 'maintenance' | 'unknown' | 'fencing' | 'fenced' | 'offline';
export const nodeStates: readonly NodeState[] = [
  'online',
  'maintenance',
  'unknown',
  'fencing',
  'fenced',
  'offline',
];

export type ResourceState =
  'stopped' | 'starting' | 'started' | 'stopping' | 'migrating' | 'recovering' | 'failed';
export const resourceStates: readonly ResourceState[] = [
  'stopped',
  'starting',
  'started',
  'stopping',
  'migrating',
  'recovering',
  'failed',
];

export interface Capacity {
  cpus: number;
  /** MiB */
  memory: number;
}

/** nodes/<node>: written by the node's agent when it starts and when it leaves cleanly. */
/** A node's VM-relevant facts, recorded at join. */
export interface HostInfo {
  cpuModel: string;
  /** /proc/cpuinfo flags of the first CPU, sorted */
  cpuFlags: string[];
  /** Linux bridges present on the node */
  bridges: string[];
  /** `qemu-system-x86_64 -version` first line, or null when QEMU is missing */
  qemu: string | null;
}

export interface NodeRegistration {
  name: string;
  address: string;
  capacity: Capacity;
  labels: Record<string, string>;
  /** what the host offers VMs (set by agents that probe it; `corral check` compares nodes) */
  host?: HostInfo;
  /** a new number every time an agent (re)joins; fence records name the incarnation they ended */
  incarnation: number;
  /** set by a clean shutdown once every resource is stopped: the node needs no fencing */
  left: boolean;
  /** ms, agent clock */
  sinceMs: number;
}

/** alive/<node>: bound to the node's lease; gone = the lease expired or was revoked. */
export interface Alive {
  incarnation: number;
  /** false until the agent has stopped whatever the store does not assign to it */
  ready: boolean;
  /** the node reaches none of its known external addresses: move its resources away */
  isolated?: boolean;
}

/** nodeadmin/<node>: operator intent. */
export interface NodeAdmin {
  maintenance: boolean;
}

/** nstate/<node>: the manager's view of a node's lifecycle. */
export interface NodeStatus {
  state: NodeState;
  reason: string;
  sinceMs: number;
  /** incarnation this status is about */
  incarnation: number;
  /** when the manager saw the lease gone */
  lostAtMs?: number;
  /**
   * the lease was lost while the cluster was disarmed: the agent did not self-fence then and may
   * never learn of a later re-arm (cut off), so only a fence device or the node's return ends it
   */
  lostDisarmed?: boolean;
  fenceAttempts: number;
  nextFenceAtMs?: number;
}

/** fence/<node>: the last fence outcome for a node. */
export interface FenceRecord {
  node: string;
  incarnation: number;
  ok: boolean;
  /** device that succeeded ('self-fence deadline' when the node has no device) or the errors */
  device: string;
  error?: string;
  atMs: number;
  /** manager term that fenced */
  term: number;
}

/** A failure the manager counted against a resource (restart limits). */
export interface FailureMark {
  node: string;
  atMs: number;
  reason: string;
}

/** assign/<id>: the manager's decision and lifecycle for one resource. */
export interface ResourceRecord {
  id: string;
  state: ResourceState;
  reason: string;
  /** node that holds (or last held) the resource's copy, null when none */
  node: string | null;
  /** whether the agent on `node` should run it at `epoch` */
  run: boolean;
  /** fencing token: grows with every new placement or restart; agents act only on the current one */
  epoch: number;
  sinceMs: number;
  failures: FailureMark[];
  relocations: number;
  /** set while a live migration runs (state 'migrating') */
  migration?: Migration;
  /** the highest epoch ever handed out for this resource (an aborted migration's target epoch) */
  epochIssued?: number;
}

/**
 * status/<node>/<id>: what the agent observed, at which epoch. Live migration adds:
 * on the target 'incoming' (ready to receive, at the target epoch, with host:port);
 * on the source 'migrating' (transfer under way, with progress) then 'migrated' (done:
 * the source copy is paused for good), or back to 'started' with migrateError.
 */
export interface AgentStatus {
  epoch: number;
  state: 'starting' | 'started' | 'stopping' | 'stopped' | 'failed' | 'incoming' | 'migrating' | 'migrated';
  reason: string;
  sinceMs: number;
  /** target side: where the source must send the migration stream */
  incoming?: { host: string; port: number };
  /** source side: transfer progress */
  progress?: MigrationProgress;
  /** source side: the last migration attempt failed (the source copy still runs) */
  migrateError?: { targetEpoch: number; reason: string };
}

export interface MigrationProgress {
  transferredBytes: number;
  totalBytes: number;
  /** bytes per second */
  rateBps: number;
  /** guest downtime QEMU reports (known at the end) */
  downtimeMs?: number;
  elapsedMs: number;
}

/** A live migration in progress (two-phase hand-over recorded in the store). */
export interface Migration {
  source: string;
  target: string;
  /** the epoch the target copy runs at once it owns the resource */
  targetEpoch: number;
  /** prepare: target starts an incoming copy; transfer: source sends; abort: target drops its copy */
  phase: 'prepare' | 'transfer' | 'abort';
  incoming?: { host: string; port: number };
  startedAtMs: number;
  deadlineMs: number;
  reason: string;
}

/** cluster/flags */
export interface ClusterFlags {
  /** disarmed: agents do not self-fence, the manager neither fences nor recovers */
  armed: boolean;
  /** halted: every resource is stopped; agents exit once theirs are stopped */
  halted: boolean;
  /** forced halt: agents kill their resources at once and exit */
  haltForce: boolean;
  /** false after `cluster form --no-apps`: nodes join, resources are not started */
  appsEnabled: boolean;
  /**
   * when the leader first saw the cluster armed again (stamped by the manager, cleared while
   * disarmed): a node cut off before the re-arm never saw it and does not self-fence
   */
  armedAtMs?: number;
}
export const defaultFlags: ClusterFlags = { armed: true, halted: false, haltForce: false, appsEnabled: true };

/** requests/cleanup/<id>: operator asked to clear a resource's failures. */
export interface CleanupRequest {
  atMs: number;
}

export interface Timings {
  leaseTtlMs: number;
  renewIntervalMs: number;
  selfFenceMarginMs: number;
  fenceTimeoutMs: number;
  fenceRetryBackoffMs: number;
  fenceRetryBackoffMaxMs: number;
  noDeviceFenceMarginMs: number;
  twoNodeFenceDelayMs: number;
  failureExpiryMs: number;
  monitorIntervalMs: number;
  /** a live migration not finished by then is aborted (the source keeps the resource) */
  migrationTimeoutMs?: number;
}

export const defaultTimings: Timings = {
  leaseTtlMs: 4000,
  renewIntervalMs: 1000,
  selfFenceMarginMs: 1000,
  fenceTimeoutMs: 10000,
  fenceRetryBackoffMs: 2000,
  fenceRetryBackoffMaxMs: 30000,
  noDeviceFenceMarginMs: 2000,
  twoNodeFenceDelayMs: 3000,
  failureExpiryMs: 600000,
  monitorIntervalMs: 1000,
};

/** Everything the manager decides from: one consistent read of the store. */
export interface ClusterView {
  nowMs: number;
  /** the manager's leadership term */
  term: number;
  timings: Timings;
  flags: ClusterFlags;
  /** node name of the manager making the decision */
  self: string;
  nodes: Map<string, NodeView>;
  resources: Map<string, ResourceView>;
  /** nodes whose fencing is running right now (the manager's own in-flight work) */
  fencing: Set<string>;
  /**
   * when this manager's node last got the store back after losing it past its lease deadline
   * (kept alive meanwhile by the heartbeat disk's vouch); undefined if never. Leases that
   * vanished as the store returned are given storeReturnGraceMs to be taken again.
   */
  storeBackAtMs?: number;
}

export interface NodeView {
  name: string;
  reg?: NodeRegistration;
  alive?: Alive;
  admin: NodeAdmin;
  status?: NodeStatus;
  fence?: FenceRecord;
  fenceDevices: number;
}

export interface ResourceView {
  id: string;
  spec?: ResourceSpec;
  rec?: ResourceRecord;
  /** agent observations by node */
  statuses: Map<string, AgentStatus>;
  cleanup?: CleanupRequest;
}

/** An event for the log: who decided what, why, at which epoch. */
export interface ClusterEvent {
  atMs: number;
  kind: 'node' | 'resource' | 'fence' | 'leader' | 'cluster' | 'agent' | 'operator';
  /** node or resource the event is about */
  object: string;
  /** short machine-readable verb, e.g. 'state', 'fence-ok', 'fence-failed', 'placed' */
  action: string;
  message: string;
  /** who: 'manager@node1', 'agent@node2', 'operator' */
  by: string;
  term?: number;
  epoch?: number;
  from?: string;
  to?: string;
}

export type Action =
  /** event: absent when another action of the round says it (a fence attempt's 'fence-start') */
  | { type: 'setNode'; node: string; next: NodeStatus; event?: ClusterEvent }
  | { type: 'fence'; node: string; incarnation: number; deadlineMs: number; event: ClusterEvent }
  | { type: 'fenceRecord'; record: FenceRecord; event: ClusterEvent }
  | { type: 'setResource'; id: string; prev?: ResourceRecord; next: ResourceRecord; event?: ClusterEvent }
  | { type: 'deleteResource'; id: string; event: ClusterEvent }
  | { type: 'consumeCleanup'; id: string };
