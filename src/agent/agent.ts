// The node agent: holds the node's lease, reconciles what the store assigns to it through
// its driver, reports what it observes, and self-fences when it cannot renew in time.
// Runs the manager loop beside it (only the leader acts). Every effect goes through Env,
// the Store, the Driver and the Watchdog, so the simulator runs this same code.
import type {
  Env,
  Driver,
  Fencer,
  LocalResource,
  NodeMonitor,
  NodeMonitorContext,
  Watchdog,
} from '../env/types.js';
import type { Store, WatchEvent, Watcher } from '../store/types.js';
import { StoreError } from '../store/types.js';
import { keys as keysOf, type Keys } from '../core/keys.js';
import { invariant } from '../core/errors.js';
import {
  defaultFlags,
  type AgentStatus,
  type Alive,
  type Capacity,
  type ClusterEvent,
  type ClusterFlags,
  type NodeAdmin,
  type NodeRegistration,
  type HostInfo,
  type ResourceRecord,
  type Timings,
} from '../core/types.js';
import { ResourceSpec, stopGraceMs } from '../core/spec.js';
import { Manager } from '../manager/manager.js';

export const agentLimits = {
  /** a full reconcile runs at least this often even without store events */
  reconcileEveryMs: 1000,
  /** after a failed renewal, try again this soon (not a whole renew interval: a short store blip must not cost the lease) */
  renewRetryMs: 250,
  /** wait between attempts to rejoin after losing the lease */
  rejoinBackoffMs: 500,
  rejoinBackoffMaxMs: 5000,
  /** graceful leave: how long to wait for the manager to move resources away */
  leaveWaitMs: 60000,
  /** migration progress is written to the store at most this often */
  migrationReportEveryMs: 1000,
  /**
   * starts in flight at once (claim, spawn, health check); more wait in priority order.
   * Fifty spawns at once stalled the event loop for seconds on a busy host (each spawn blocks
   * until the child execs), long enough for the lease to lapse: a node taking over many
   * resources must still renew its lease.
   */
  startsInFlightMax: 16,
  /** while a monitor vouches for the node past its lease deadline, look again this often */
  vouchRecheckMs: 100,
  /**
   * With a monitor that can vouch, look this long before the lease deadline: the watchdog was
   * fed up to the deadline itself, so a vouch found only at the deadline raced the watchdog
   * (the simulator's watchdog won every time and reset vouched nodes during store outages).
   */
  vouchLeadMs: 200,
};

export interface AgentOptions {
  env: Env;
  store: Store;
  driver: Driver;
  fencer: Fencer;
  watchdog?: Watchdog;
  /** node health monitors beside the lease: disk heartbeat, reachability */
  monitors?: NodeMonitor[];
  cluster: string;
  node: string;
  address: string;
  capacity: Capacity;
  labels: Record<string, string>;
  timings: Timings;
  /** what this host offers VMs (CPU model and flags, bridges, QEMU): recorded for `corral check` */
  hostInfo?: HostInfo;
  /** run the manager loop in this agent (default true) */
  manager?: boolean;
  onEvent?: (e: ClusterEvent) => void;
}

export type AgentPhase = 'starting' | 'joined' | 'fenced' | 'leaving' | 'stopped';

export class Agent {
  readonly k: Keys;
  readonly manager: Manager | undefined;
  phase: AgentPhase = 'starting';
  private lease: number | undefined;
  private incarnation = 0;
  private lastRenewOkSentMs = 0;
  private cancelSelfFence: (() => void) | undefined;
  /** past the lease deadline, kept alive by a monitor's vouch (see leaseDeadline) */
  private vouched = false;
  /** when a renewal last succeeded after the lease deadline had passed under a vouch */
  private storeBackAtMs: number | undefined;
  private flags: ClusterFlags = defaultFlags;
  private watcher: Watcher | undefined;
  private readonly busy = new Map<string, Promise<void>>();
  /** starts holding a slot (at most agentLimits.startsInFlightMax) and those waiting for one */
  private startsInFlight = 0;
  private readonly startsWaiting: { priority: number; go: () => void }[] = [];
  /** epochs assigned to us before we (re)joined: never started again, the manager must re-place */
  private readonly epochFloor = new Map<string, number>();
  /** modRevision of each assignment we last read, for the claim txn before a start */
  private readonly assignRevs = new Map<string, number>();
  private reconcileQueued = false;
  private disarmedFeeding = false;
  private stopping = false;
  private loops: Promise<void>[] = [];
  private wakeRenew: (() => void) | undefined;
  private eventSeq = 0;
  /** set when the cluster halts: the agent exits once its resources are stopped */
  private halted: (() => void) | undefined;

  constructor(private readonly o: AgentOptions) {
    this.k = keysOf(o.cluster);
    invariant(o.timings.selfFenceMarginMs < o.timings.leaseTtlMs, 'selfFenceMarginMs < leaseTtlMs');
    invariant(
      o.timings.renewIntervalMs < o.timings.leaseTtlMs - o.timings.selfFenceMarginMs,
      'renew before the deadline',
    );
    this.manager =
      o.manager === false
        ? undefined
        : new Manager({
            env: o.env,
            store: o.store,
            cluster: o.cluster,
            self: o.node,
            timings: o.timings,
            fencer: o.fencer,
            lease: () => (this.phase === 'joined' ? this.lease : undefined),
            onEvent: o.onEvent,
            storeBackAtMs: () => this.storeBackAtMs,
          });
    o.driver.onEvent((ev) => {
      // the store may be unreachable right now: never let a lost report crash the agent
      if (ev.type === 'failed')
        this.report(ev.id, { epoch: ev.epoch, state: 'failed', reason: ev.reason }).catch((e: unknown) =>
          this.o.env.log('warn', 'could not report a resource failure; reconcile retries', {
            id: ev.id,
            error: String(e),
          }),
        );
      // 'received': the incoming copy runs the guest (the stream completed): report it now, not
      // after a full reconcile read, so the manager hands over in one round (a source 'migrated'
      // seen first costs a 'starting' round and a second report); the reconcile still covers it
      if (ev.type === 'received' && this.phase === 'joined')
        this.serial(ev.id, () =>
          this.report(ev.id, { epoch: ev.epoch, state: 'started', reason: 'received the guest' }),
        );
      this.queueReconcile();
    });
  }

  currentLease(): number | undefined {
    return this.lease;
  }

  /** Join the cluster and run until stop(). Resolves once joined. */
  async start(): Promise<void> {
    const leftovers = await this.o.driver.recover();
    if (leftovers.length > 0)
      this.o.env.log('info', 'found resources left by an earlier agent', { ids: leftovers.map((l) => l.id) });
    await this.join();
    this.watcher = await this.o.store.watch(this.k.prefix, {
      onEvents: (evs) => this.onStoreEvents(evs),
      onError: (e) => {
        this.o.env.log('warn', 'store watch ended; polling until it is re-established', { error: e.message });
        this.watcher = undefined;
      },
    });
    this.loops.push(this.renewLoop(), this.reconcileLoop());
    if (this.manager) this.loops.push(this.manager.run());
    for (const m of this.o.monitors ?? []) await m.start(this.monitorContext());
  }

  private isolated = false;
  /**
   * The kill of the current fenced spell (resolved once every resource is dead); undefined
   * while not fenced, and while fenced without a kill (the lease was lost while disarmed).
   */
  private selfFenceKill: Promise<void> | undefined;

  private monitorContext(): NodeMonitorContext {
    const t = this.o.timings;
    return {
      node: this.o.node,
      selfFence: (why) => this.selfFence(why),
      setIsolated: (isolated, why) => {
        if (isolated === this.isolated) return;
        this.isolated = isolated;
        this.o.env.log(
          isolated ? 'warn' : 'info',
          isolated ? `node isolated: ${why}` : `node reachable again: ${why}`,
        );
        const lease = this.lease;
        if (this.phase !== 'joined' || lease === undefined) return;
        const alive: Alive = { incarnation: this.incarnation, ready: true, isolated: isolated || undefined };
        this.o.store
          .put(this.k.alive(this.o.node), JSON.stringify(alive), { lease })
          .then(() =>
            this.agentEvent(
              isolated ? 'isolated' : 'reachable',
              `${this.o.node}: ${isolated ? 'isolated' : 'reachable again'}: ${why}`,
            ),
          )
          .catch((e: unknown) => this.o.env.log('warn', 'could not record isolation', { error: String(e) }));
      },
      storeHealthy: () => this.o.env.nowMs() - this.lastRenewOkSentMs < 2 * t.renewIntervalMs,
      joined: () => this.phase === 'joined',
    };
  }

  /** Resolves when the cluster is halted and this agent's resources are stopped. */
  whenHalted(): Promise<void> {
    return new Promise((resolve) => (this.halted = resolve));
  }

  // ------------------------------------------------------------ lease and joining

  private async join(): Promise<void> {
    const env = this.o.env;
    let backoffMs = agentLimits.rejoinBackoffMs;
    for (;;) {
      if (this.stopping) return;
      try {
        await this.joinOnce();
        return;
      } catch (e) {
        if (!(e instanceof StoreError)) throw e;
        env.log('warn', 'cannot join yet; retrying', { error: e.message, backoffMs });
        await env.sleep(backoffMs);
        backoffMs = Math.min(agentLimits.rejoinBackoffMaxMs, backoffMs * 2);
      }
    }
  }

  private async joinOnce(): Promise<void> {
    const env = this.o.env;
    this.phase = 'starting';
    this.selfFenceKill = undefined;
    const sentMs = env.nowMs();
    const lease = await this.o.store.leaseGrant(this.o.timings.leaseTtlMs);
    this.incarnation = sentMs * 1000 + env.rng.int(0, 999);
    const reg: NodeRegistration = {
      name: this.o.node,
      address: this.o.address,
      capacity: this.o.capacity,
      labels: this.o.labels,
      ...(this.o.hostInfo ? { host: this.o.hostInfo } : {}),
      incarnation: this.incarnation,
      left: false,
      sinceMs: sentMs,
    };
    const alive: Alive = {
      incarnation: this.incarnation,
      ready: false,
      isolated: this.isolated || undefined,
    };
    await this.o.store.txn({
      compare: [],
      success: [
        { type: 'put', key: this.k.node(this.o.node), value: JSON.stringify(reg) },
        { type: 'put', key: this.k.alive(this.o.node), value: JSON.stringify(alive), lease },
      ],
    });
    this.lease = lease;
    this.renewed(sentMs);
    // Stop whatever the store does not assign to us before taking work (safety rule 5).
    await this.reconcile();
    await this.o.store.put(this.k.alive(this.o.node), JSON.stringify({ ...alive, ready: true }), { lease });
    if (this.phase !== 'starting' || this.lease !== lease) {
      // self-fenced while joining (a slow store ate the deadline): the renew loop joins again
      this.o.env.log('warn', 'join interrupted by a self-fence; joining again');
      return;
    }
    this.phase = 'joined';
    await this.agentEvent('joined', `${this.o.node} joined (incarnation ${this.incarnation})`);
    this.manager?.poke();
  }

  private renewed(sentMs: number): void {
    this.lastRenewOkSentMs = sentMs;
    const t = this.o.timings;
    const allowMs = sentMs + t.leaseTtlMs - t.selfFenceMarginMs - this.o.env.nowMs();
    if (this.flags.armed) this.o.watchdog?.feed(Math.max(0, allowMs));
    if (this.vouched) {
      this.vouched = false;
      this.storeBackAtMs = this.o.env.nowMs();
      this.o.env.log('info', 'store reachable again: the lease is renewed');
    }
    this.cancelSelfFence?.();
    const leadMs = (this.o.monitors ?? []).some((m) => m.vouchUntilMs) ? agentLimits.vouchLeadMs : 0;
    this.cancelSelfFence = this.o.env.setTimer(Math.max(0, allowMs - leadMs), () => this.leaseDeadline());
  }

  /**
   * The lease was not renewed in time. Self-fence, unless a monitor the manager can fence
   * through (the heartbeat disk with an sbd device) vouches for this node: then the store is
   * lost alone (etcd without quorum, say), and a manager that still has the store must fence
   * us through the disk, whose poison pill we obey within one interval. Resources keep running
   * while the vouch lasts; the watchdog is fed up to its end, so a frozen agent still dies.
   */
  private leaseDeadline(): void {
    const env = this.o.env;
    const t = this.o.timings;
    const nowMs = env.nowMs();
    const deadlineAtMs = this.lastRenewOkSentMs + t.leaseTtlMs - t.selfFenceMarginMs;
    const untilMs = this.vouchUntilMs();
    // a vouch counts only if it reaches past the deadline (the watchdog is already fed that far)
    if (this.flags.armed && this.phase === 'joined' && untilMs > Math.max(nowMs, deadlineAtMs)) {
      if (!this.vouched)
        env.log(
          'warn',
          'lease not renewed in time, but the heartbeat disk vouches for this node: not self-fencing',
          {
            monitors: (this.o.monitors ?? [])
              .filter((m) => (m.vouchUntilMs?.() ?? 0) > nowMs)
              .map((m) => m.name),
          },
        );
      this.vouched = true;
      this.o.watchdog?.feed(untilMs - nowMs);
      this.cancelSelfFence?.();
      this.cancelSelfFence = env.setTimer(Math.min(untilMs - nowMs, agentLimits.vouchRecheckMs), () =>
        this.leaseDeadline(),
      );
      return;
    }
    if (nowMs < deadlineAtMs) {
      // looked early (vouchLeadMs) and nothing vouches past the deadline yet: look again then
      this.cancelSelfFence?.();
      this.cancelSelfFence = env.setTimer(deadlineAtMs - nowMs, () => this.leaseDeadline());
      return;
    }
    void this.selfFence('lease not renewed in time');
  }

  private async renewLoop(): Promise<void> {
    const env = this.o.env;
    let waitMs = this.o.timings.renewIntervalMs;
    while (!this.stopping) {
      await new Promise<void>((resolve) => {
        const cancel = env.setTimer(waitMs, resolve);
        this.wakeRenew = () => {
          cancel();
          resolve();
        };
      });
      if (this.stopping) return;
      if (this.phase === 'fenced') {
        await this.join();
        continue;
      }
      const lease = this.lease;
      if (lease === undefined || this.phase !== 'joined') continue;
      const sentMs = env.nowMs();
      waitMs = this.o.timings.renewIntervalMs;
      try {
        await this.o.store.leaseKeepAlive(lease);
        const tookMs = env.nowMs() - sentMs;
        if (tookMs > this.o.timings.renewIntervalMs)
          env.log('warn', 'lease renewal slow', { tookMs, renewIntervalMs: this.o.timings.renewIntervalMs });
        if (this.lease === lease && this.phase === 'joined') this.renewed(sentMs);
      } catch (e) {
        if (!(e instanceof StoreError)) throw e;
        if (e.code === 'CORRAL_STORE_LEASE_NOT_FOUND' && this.vouchedNow()) {
          if (!(await this.leaseAgain()))
            waitMs = Math.min(agentLimits.renewRetryMs, this.o.timings.renewIntervalMs);
        } else if (e.code === 'CORRAL_STORE_LEASE_NOT_FOUND')
          await this.selfFence('lease lost (expired in the store)', true);
        else {
          env.log('warn', 'lease renewal failed', { error: e.message });
          waitMs = Math.min(agentLimits.renewRetryMs, this.o.timings.renewIntervalMs);
        }
      }
    }
  }

  /** until when a monitor (the heartbeat disk) vouches for this node; 0 when none does */
  private vouchUntilMs(): number {
    return Math.max(0, ...(this.o.monitors ?? []).map((m) => m.vouchUntilMs?.() ?? 0));
  }

  /** past the lease deadline and still vouched for by a monitor (see leaseDeadline) */
  private vouchedNow(): boolean {
    const nowMs = this.o.env.nowMs();
    return this.vouched && this.flags.armed && this.phase === 'joined' && this.vouchUntilMs() > nowMs;
  }

  /**
   * The store came back without our lease while the heartbeat disk vouched for us: an etcd
   * leader that lost quorum revokes the leases that ran out meanwhile when it resumes. Nothing
   * was fenced through the store alone: with an sbd device the manager can fence us only by a
   * poison pill, which we obey within one disk interval. So take a new lease and put our alive
   * key back under it, same incarnation, resources untouched (self-fencing here would stop
   * every workload of the cluster after a store outage that the disk proved harmless).
   * Returns false when the store refused; the vouch keeps us until the next try or its end.
   */
  private async leaseAgain(): Promise<boolean> {
    const env = this.o.env;
    const sentMs = env.nowMs();
    try {
      const lease = await this.o.store.leaseGrant(this.o.timings.leaseTtlMs);
      if (!this.vouchedNow()) {
        await this.o.store.leaseRevoke(lease).catch(() => undefined);
        return true;
      }
      const alive: Alive = {
        incarnation: this.incarnation,
        ready: true,
        isolated: this.isolated || undefined,
      };
      await this.o.store.put(this.k.alive(this.o.node), JSON.stringify(alive), { lease });
      if (this.phase !== 'joined') {
        // a poison pill (or the vouch's end) self-fenced us meanwhile: the renew loop joins anew
        await this.o.store.leaseRevoke(lease).catch(() => undefined);
        return true;
      }
      this.lease = lease;
      env.log(
        'warn',
        'lease gone from the store while the heartbeat disk vouched for this node: leased again, resources untouched',
      );
      this.renewed(sentMs);
      void this.agentEvent(
        'lease-again',
        `${this.o.node} took a new lease after the store came back without its old one (the heartbeat disk vouched for it meanwhile); nothing was stopped`,
      ).catch(() => undefined);
      this.manager?.poke();
      return true;
    } catch (e) {
      if (!(e instanceof StoreError)) throw e;
      env.log('warn', 'could not take a new lease yet', { error: e.message });
      return false;
    }
  }

  /**
   * Kill everything at once: the lease is (or may be) gone, so the manager may recover our
   * resources elsewhere. Disarmed clusters skip this (planned maintenance). Resolves true once
   * every resource is down by a kill of this fenced spell (now or earlier), false when nothing
   * was killed: only then may a caller act on "self-fenced" (the poison-pill acknowledgement on
   * the heartbeat disk is a fence record; acknowledging a kill that did not happen let a
   * resource run twice: sim/scenarios/disk-pill-after-disarmed-loss.scn).
   */
  async selfFence(why: string, leaseGone = false): Promise<boolean> {
    if (this.phase === 'fenced' && this.selfFenceKill) {
      // already fenced: wait for the kill still under way
      await this.selfFenceKill;
      return true;
    }
    if (this.phase !== 'joined' && this.phase !== 'starting' && this.phase !== 'fenced') return false;
    const t = this.o.timings;
    if (!this.flags.armed) {
      // Disarmed (planned maintenance): resources keep running. A lost lease is taken
      // again without killing anything; a late renewal just keeps trying.
      this.o.env.log('warn', `not self-fencing (${why}): the cluster is disarmed`);
      if (this.phase === 'fenced') return false; // gave the lease up already, killed nothing
      if (leaseGone) {
        this.phase = 'fenced';
        this.selfFenceKill = undefined;
        this.lease = undefined;
        this.wakeRenew?.();
      } else {
        this.cancelSelfFence = this.o.env.setTimer(t.renewIntervalMs, () => void this.selfFence(why));
      }
      return false;
    }
    // armed: from joined or starting, or fenced without a kill (the lease was lost while disarmed)
    this.phase = 'fenced';
    this.lease = undefined;
    this.cancelSelfFence?.();
    this.o.env.log('error', `self-fencing: ${why}`);
    const kill = this.o.driver.killAll();
    this.selfFenceKill = kill;
    await kill;
    this.wakeRenew?.();
    void this.agentEvent('self-fenced', `${this.o.node} self-fenced: ${why}`).catch(() => undefined);
    return true;
  }

  // ------------------------------------------------------------ reconciling

  private onStoreEvents(evs: WatchEvent[]): void {
    let mine = false;
    for (const e of evs) {
      const key = e.kv.key;
      if (key === this.k.flags && e.type === 'put') this.applyFlags(e.kv.value);
      if (key.startsWith(this.k.assigns) || key === this.k.flags || key.startsWith(this.k.nodeAdmins))
        mine = true;
      if (!key.startsWith(this.k.events) && !key.startsWith(this.k.statuses)) this.manager?.poke();
      else if (key.startsWith(this.k.statuses)) this.manager?.poke();
    }
    if (mine) this.queueReconcile();
  }

  private applyFlags(value: string): void {
    try {
      const prev = this.flags;
      this.flags = { ...defaultFlags, ...(JSON.parse(value) as Partial<ClusterFlags>) };
      if (prev.armed && !this.flags.armed) this.feedWhileDisarmed();
      if (!prev.armed && this.flags.armed && this.phase === 'joined') this.renewed(this.lastRenewOkSentMs);
    } catch {
      this.o.env.log('warn', 'unreadable cluster flags ignored');
    }
  }

  /**
   * Disarmed: a lost store no longer self-fences, but the watchdog keeps guarding against this
   * agent dying or freezing (fed from a timer, not from renewals). Disarming it instead let a
   * node whose agent died while disarmed keep its resources after the re-arm, when the manager
   * counts the self-fence deadline as proof of death: a double run.
   */
  private feedWhileDisarmed(): void {
    const t = this.o.timings;
    if (this.flags.armed || this.stopping || !this.o.watchdog || this.disarmedFeeding) return;
    this.disarmedFeeding = true;
    this.o.watchdog.feed(t.leaseTtlMs - t.selfFenceMarginMs);
    this.o.env.setTimer(t.renewIntervalMs, () => {
      this.disarmedFeeding = false;
      this.feedWhileDisarmed();
    });
  }

  private queueReconcile(): void {
    if (this.reconcileQueued) return;
    this.reconcileQueued = true;
    this.o.env.setTimer(0, () => {
      this.reconcileQueued = false;
      void this.reconcile().catch((e: unknown) =>
        this.o.env.log('warn', 'reconcile failed', { error: String(e) }),
      );
    });
  }

  private async reconcileLoop(): Promise<void> {
    while (!this.stopping) {
      await this.o.env.sleep(agentLimits.reconcileEveryMs);
      if (this.stopping) return;
      if (!this.watcher) {
        try {
          this.watcher = await this.o.store.watch(this.k.prefix, {
            onEvents: (evs) => this.onStoreEvents(evs),
            onError: () => (this.watcher = undefined),
          });
        } catch {
          // store still unreachable; the lease logic handles safety
        }
      }
      await this.reconcile().catch((e: unknown) =>
        this.o.env.log('warn', 'reconcile failed', { error: String(e) }),
      );
    }
  }

  /** Compare what the store assigns to us with what runs here, and act on the difference. */
  async reconcile(): Promise<void> {
    if (this.phase === 'fenced' || this.phase === 'stopped') return;
    const store = this.o.store;
    const snap = await store.txn({
      compare: [],
      success: [
        { type: 'range', prefix: this.k.assigns },
        { type: 'range', prefix: this.k.resources },
        { type: 'range', prefix: this.k.statusesOf(this.o.node) },
        { type: 'get', key: this.k.flags },
        { type: 'range', prefix: this.k.alives },
      ],
    });
    const [assignR, specR, statusR, flagsR, alivesR] = snap.results;
    if (flagsR?.type === 'get' && flagsR.kv) this.applyFlags(flagsR.kv.value);
    const assigned = new Map<string, ResourceRecord>();
    /** live migrations that name this node as their target */
    const incoming = new Map<string, ResourceRecord>();
    if (assignR?.type === 'range')
      for (const kv of assignR.kvs) {
        try {
          const rec = JSON.parse(kv.value) as ResourceRecord;
          if (rec.node === this.o.node) assigned.set(rec.id, rec);
          if (rec.migration?.target === this.o.node && rec.migration.phase !== 'abort')
            incoming.set(rec.id, rec);
          if (rec.node === this.o.node || incoming.has(rec.id)) this.assignRevs.set(rec.id, kv.modRevision);
        } catch {
          // unreadable record: never act on it
        }
      }
    const specs = new Map<string, ResourceSpec>();
    if (specR?.type === 'range')
      for (const kv of specR.kvs) {
        try {
          const s = ResourceSpec.safeParse(JSON.parse(kv.value));
          if (s.success) specs.set(s.data.id, s.data);
        } catch {
          // ignored: the manager reports unreadable specs
        }
      }
    const reported = new Map<string, AgentStatus>();
    if (statusR?.type === 'range')
      for (const kv of statusR.kvs) {
        try {
          reported.set(
            kv.key.slice(this.k.statusesOf(this.o.node).length),
            JSON.parse(kv.value) as AgentStatus,
          );
        } catch {
          // rewritten below
        }
      }
    if (this.flags.haltForce) {
      await this.o.driver.killAll();
      this.halted?.();
      return;
    }
    const local = new Map(this.o.driver.list().map((l) => [l.id, l]));
    const canStart = this.phase === 'joined';
    if (!canStart) {
      // joining: whatever the store assigned to us before now is not started again here
      for (const a of assigned.values()) {
        const l = local.get(a.id);
        const adopted = l && l.epoch === a.epoch && l.state !== 'stopped' && l.state !== 'failed';
        if (!adopted) this.epochFloor.set(a.id, a.epoch);
      }
    }
    // 1. stop what runs here but is not (or no longer) ours at its epoch
    for (const l of local.values()) {
      if (l.state === 'stopped' || l.state === 'failed') continue;
      const a = assigned.get(l.id);
      const target = incoming.get(l.id)?.migration;
      const keep =
        this.phase !== 'leaving' &&
        ((a && a.run && a.epoch === l.epoch) || (target !== undefined && target.targetEpoch === l.epoch));
      if (!keep) {
        const spec = specs.get(l.id);
        // a destroy while a graceful stop waits out its grace: the driver kills at once
        if (l.state === 'stopping' && this.busy.has(l.id) && spec && stopGraceMs(spec) === 0)
          void this.o.driver.stop(l.id, { graceMs: 0 }).catch(() => undefined);
        this.serial(l.id, () => this.stopLocal(l, a, spec));
      }
    }
    // live migration: prepare incoming copies here; send outgoing ones when told to
    if (canStart) this.reconcileMigrations(assigned, incoming, local, specs, reported);
    // 2. start what is ours and not running at its epoch; 3. report what we see
    for (const a of assigned.values()) {
      const l = local.get(a.id);
      const s = reported.get(a.id);
      if (a.run && canStart) {
        const spec = specs.get(a.id);
        const running = l && l.epoch === a.epoch && l.state !== 'stopped' && l.state !== 'failed';
        const failedHere = s && s.epoch === a.epoch && s.state === 'failed';
        const stale = a.epoch <= (this.epochFloor.get(a.id) ?? 0);
        if (!running && !failedHere && !stale && spec)
          this.serial(a.id, () => this.startLocal(spec, a.epoch));
        // (a copy handed over by live migration keeps its 'migrated' report for the manager)
        if (
          !running &&
          stale &&
          (!s || s.epoch !== a.epoch || (s.state !== 'stopped' && s.state !== 'migrated'))
        )
          this.serial(a.id, () =>
            this.report(a.id, {
              epoch: a.epoch,
              state: 'stopped',
              reason: 'not running here (agent rejoined)',
            }),
          );
        // running at its epoch but reported otherwise (adopted after an agent restart whose
        // predecessor died mid-start): say so, or the manager waits on 'starting' forever
        if (
          running &&
          l.state === 'started' &&
          !l.outgoing &&
          (!s || s.epoch !== a.epoch || s.state !== 'started')
        )
          this.serial(a.id, () =>
            this.report(a.id, { epoch: a.epoch, state: 'started', reason: 'running (adopted)' }),
          );
      } else if (!a.run) {
        const running = l && l.state !== 'stopped' && l.state !== 'failed';
        if (!running && (!s || s.epoch !== a.epoch || (s.state !== 'stopped' && s.state !== 'failed')))
          this.serial(a.id, () =>
            this.report(a.id, { epoch: a.epoch, state: 'stopped', reason: 'not running here' }),
          );
      }
      const runningHere = l && l.epoch === a.epoch && l.state !== 'stopped' && l.state !== 'failed';
      if (
        a.run &&
        !canStart &&
        !runningHere &&
        (!s || s.epoch !== a.epoch || (s.state !== 'stopped' && s.state !== 'failed'))
      ) {
        this.serial(a.id, () =>
          this.report(a.id, { epoch: a.epoch, state: 'stopped', reason: 'not running here (agent joining)' }),
        );
      }
    }
    if (
      this.flags.halted &&
      this.halted &&
      [...local.values()].every((l) => l.state === 'stopped' || l.state === 'failed') &&
      [...assigned.values()].every((a) => !a.run && (a.state === 'stopped' || a.state === 'failed'))
    ) {
      // the leader leaves last, so the manager records every other node's clean exit
      const others =
        alivesR?.type === 'range' ? alivesR.kvs.filter((kv) => kv.key !== this.k.alive(this.o.node)) : [];
      if (!this.manager?.isLeader() || others.length === 0) this.halted();
    }
  }

  private readonly migratingOut = new Set<string>();

  private reconcileMigrations(
    assigned: Map<string, ResourceRecord>,
    incoming: Map<string, ResourceRecord>,
    local: Map<string, LocalResource>,
    specs: Map<string, ResourceSpec>,
    reported: Map<string, AgentStatus>,
  ): void {
    const driver = this.o.driver;
    for (const rec of incoming.values()) {
      const m = rec.migration;
      const spec = specs.get(rec.id);
      if (!m || !spec) continue;
      const l = local.get(rec.id);
      const s = reported.get(rec.id);
      const have = l && l.epoch === m.targetEpoch && l.state !== 'stopped' && l.state !== 'failed';
      const reportedHere = s && s.epoch === m.targetEpoch;
      if (!have && !reportedHere && m.phase === 'prepare')
        this.serial(rec.id, () => this.prepareIncoming(spec, m.targetEpoch));
      // the stream completed and the copy runs here: say so (if the source is lost now, the
      // manager hands the guest over to this copy instead of aborting)
      if (have && l.state === 'started' && s?.epoch === m.targetEpoch && s.state === 'incoming')
        this.serial(rec.id, () =>
          this.report(rec.id, { epoch: m.targetEpoch, state: 'started', reason: 'received the guest' }),
        );
    }
    for (const a of assigned.values()) {
      const m = a.migration;
      const l = local.get(a.id);
      if (this.migratingOut.has(a.id) && (!m || m.phase === 'abort')) {
        void driver.cancelMigration?.(a.id).catch(() => undefined);
        continue;
      }
      const transfer = m?.phase === 'transfer' && m.incoming !== undefined;
      // adopted after an agent restart with an outgoing migration the store no longer wants
      if (l?.outgoing && l.epoch === a.epoch && !transfer && !this.migratingOut.has(a.id)) {
        this.serial(a.id, () => this.settleOutgoing(a, l));
        continue;
      }
      if (!m || m.phase !== 'transfer' || !m.incoming || this.migratingOut.has(a.id)) continue;
      const s = reported.get(a.id);
      if (s?.migrateError?.targetEpoch === m.targetEpoch) continue; // already failed; the manager aborts
      if (!l || l.epoch !== a.epoch || l.state !== 'started' || !driver.migrateOut) continue;
      const dest = m.incoming;
      this.serial(a.id, () => this.migrateOut(a, m.targetEpoch, dest));
    }
  }

  private async prepareIncoming(spec: ResourceSpec, targetEpoch: number): Promise<void> {
    const driver = this.o.driver;
    if (this.phase !== 'joined') return;
    const claim: AgentStatus = {
      epoch: targetEpoch,
      state: 'starting',
      reason: 'preparing to receive a live migration',
      sinceMs: this.o.env.nowMs(),
    };
    const r0 = await this.o.store.txn({
      compare: [
        {
          key: this.k.assign(spec.id),
          target: 'modRevision',
          op: '==',
          value: this.assignRevs.get(spec.id) ?? 0,
        },
      ],
      success: [{ type: 'put', key: this.k.status(this.o.node, spec.id), value: JSON.stringify(claim) }],
    });
    if (!r0.succeeded) return;
    if (!driver.prepareIncoming) {
      await this.report(spec.id, {
        epoch: targetEpoch,
        state: 'failed',
        reason: 'driver cannot receive live migrations',
      });
      return;
    }
    const r = await driver.prepareIncoming(spec, targetEpoch);
    if (r.ok)
      await this.report(spec.id, {
        epoch: targetEpoch,
        state: 'incoming',
        reason: `waiting for the migration stream on ${r.host}:${r.port}`,
        incoming: { host: r.host, port: r.port },
      });
    else await this.report(spec.id, { epoch: targetEpoch, state: 'failed', reason: r.reason });
  }

  private async migrateOut(
    a: ResourceRecord,
    targetEpoch: number,
    dest: { host: string; port: number },
  ): Promise<void> {
    const driver = this.o.driver;
    if (!driver.migrateOut) return;
    this.migratingOut.add(a.id);
    let lastReportMs = 0;
    try {
      // written while QEMU starts sending (one store round trip less before the stream)
      const sending = this.report(a.id, {
        epoch: a.epoch,
        state: 'migrating',
        reason: `sending to ${dest.host}:${dest.port}`,
      });
      const out = await driver.migrateOut(a.id, dest, (progress) => {
        const now = this.o.env.nowMs();
        if (now - lastReportMs < agentLimits.migrationReportEveryMs) return;
        lastReportMs = now;
        this.report(a.id, { epoch: a.epoch, state: 'migrating', reason: 'sending', progress }).catch(
          () => undefined,
        );
      });
      await sending.catch(() => undefined); // only informative: the outcome below matters
      // never start this epoch here again: the guest now lives on the target
      if (out.ok) this.epochFloor.set(a.id, Math.max(a.epoch, this.epochFloor.get(a.id) ?? 0));
      if (out.ok)
        await this.report(a.id, {
          epoch: a.epoch,
          state: 'migrated',
          reason: 'handed over',
          progress: out.progress,
        });
      else
        await this.report(a.id, {
          epoch: a.epoch,
          state: 'started',
          reason: `migration failed: ${out.reason}`,
          progress: out.progress,
          migrateError: { targetEpoch, reason: out.reason },
        });
    } finally {
      this.migratingOut.delete(a.id);
    }
  }

  /** An adopted copy's migration is not wanted: resume the guest, or (sent away) give it up. */
  private async settleOutgoing(a: ResourceRecord, l: LocalResource): Promise<void> {
    if (l.outgoing !== 'sent') return this.o.driver.cancelMigration?.(a.id);
    await this.o.driver.stop(a.id);
    await this.report(a.id, {
      epoch: a.epoch,
      state: 'failed',
      reason: 'the guest left by a live migration that was not handed over; this copy was paused for good',
    });
  }

  /** Run one action per resource at a time; later calls wait for the one in flight. */
  private serial(id: string, fn: () => Promise<void>): void {
    if (this.busy.has(id)) return; // the in-flight action re-queues a reconcile when done
    const p = fn()
      .catch((e: unknown) => this.o.env.log('warn', 'resource action failed', { id, error: String(e) }))
      .finally(() => {
        this.busy.delete(id);
        this.queueReconcile();
      });
    this.busy.set(id, p);
  }

  private async startLocal(spec: ResourceSpec, epoch: number): Promise<void> {
    if (this.phase !== 'joined') return;
    await this.startSlot(spec.priority);
    try {
      await this.startLocalInSlot(spec, epoch);
    } finally {
      this.startsInFlight--;
      this.startsWaiting.shift()?.go();
    }
  }

  /** Wait for one of agentLimits.startsInFlightMax start slots; higher priority goes first. */
  private startSlot(priority: number): Promise<void> {
    if (this.startsInFlight < agentLimits.startsInFlightMax) {
      this.startsInFlight++;
      return Promise.resolve();
    }
    return new Promise((resolve) => {
      const w = {
        priority,
        go: () => {
          this.startsInFlight++;
          resolve();
        },
      };
      const at = this.startsWaiting.findIndex((x) => x.priority < priority);
      if (at < 0) this.startsWaiting.push(w);
      else this.startsWaiting.splice(at, 0, w);
    });
  }

  private async startLocalInSlot(spec: ResourceSpec, epoch: number): Promise<void> {
    if (this.phase !== 'joined') return; // fenced or leaving while waiting for a slot
    // Claim: the 'starting' report lands only if the assignment is still the one we read,
    // and the manager's re-placement is guarded on this report: one of the two wins.
    const claim: AgentStatus = { epoch, state: 'starting', reason: 'starting', sinceMs: this.o.env.nowMs() };
    const r0 = await this.o.store.txn({
      compare: [
        {
          key: this.k.assign(spec.id),
          target: 'modRevision',
          op: '==',
          value: this.assignRevs.get(spec.id) ?? 0,
        },
      ],
      success: [{ type: 'put', key: this.k.status(this.o.node, spec.id), value: JSON.stringify(claim) }],
    });
    if (!r0.succeeded) return; // the assignment changed: reconcile again
    const r = await this.o.driver.start(spec, epoch);
    if ((this.phase as AgentPhase) === 'fenced') return; // killAll already took it down
    await this.report(spec.id, {
      epoch,
      state: r.state === 'started' ? 'started' : 'failed',
      reason: r.reason,
    });
  }

  private async stopLocal(
    l: LocalResource,
    a: ResourceRecord | undefined,
    spec: ResourceSpec | undefined,
  ): Promise<void> {
    const epoch = a && a.epoch >= l.epoch ? a.epoch : l.epoch;
    await this.report(l.id, { epoch, state: 'stopping', reason: 'stopping' });
    // the grace of the current definition (a destroy asks for none), not the one it started with
    const graceMs = spec ? stopGraceMs(spec) : undefined;
    const r = await this.o.driver.stop(l.id, graceMs === undefined ? {} : { graceMs });
    await this.report(l.id, { epoch, state: 'stopped', reason: r.reason || 'stopped' });
  }

  private async report(id: string, s: Omit<AgentStatus, 'sinceMs'>): Promise<void> {
    const status: AgentStatus = { ...s, sinceMs: this.o.env.nowMs() };
    await this.o.store.put(this.k.status(this.o.node, id), JSON.stringify(status));
  }

  private async agentEvent(action: string, message: string): Promise<void> {
    const e: ClusterEvent = {
      atMs: this.o.env.nowMs(),
      kind: 'agent',
      object: this.o.node,
      action,
      message,
      by: `agent@${this.o.node}`,
    };
    this.eventSeq = (this.eventSeq + 1) % 1_000_000;
    await this.o.store.put(this.k.event(e.atMs, `a.${this.o.node}`, this.eventSeq), JSON.stringify(e));
    this.o.onEvent?.(e);
  }

  // ------------------------------------------------------------ leaving

  /**
   * Graceful stop. With leave: ask the manager to move our resources away (maintenance)
   * and wait for it; then stop what is left, mark the node as left and drop the lease.
   */
  async stop(opts: { leave?: boolean; kill?: boolean } = {}): Promise<void> {
    const env = this.o.env;
    for (const m of this.o.monitors ?? []) await m.stop().catch(() => undefined);
    if (opts.leave && this.phase === 'joined') {
      const admin: NodeAdmin = { maintenance: true };
      await this.o.store.put(this.k.nodeAdmin(this.o.node), JSON.stringify(admin));
      const deadline = env.nowMs() + agentLimits.leaveWaitMs;
      while (
        env.nowMs() < deadline &&
        this.o.driver.list().some((l) => l.state === 'started' || l.state === 'starting')
      ) {
        await env.sleep(200);
      }
    }
    this.phase = 'leaving';
    this.stopping = true;
    this.manager?.stop();
    this.cancelSelfFence?.();
    this.wakeRenew?.();
    await this.watcher?.cancel().catch(() => undefined);
    if (opts.kill) await this.o.driver.killAll();
    else {
      for (const l of this.o.driver.list()) {
        if (l.state === 'stopped' || l.state === 'failed') continue;
        await this.o.driver.stop(l.id);
        await this.report(l.id, { epoch: l.epoch, state: 'stopped', reason: 'agent shut down' }).catch(
          () => undefined,
        );
      }
    }
    await Promise.allSettled([...this.busy.values()]);
    this.o.watchdog?.disarm();
    try {
      const reg = await this.o.store.get(this.k.node(this.o.node));
      if (reg) {
        const r = JSON.parse(reg.value) as NodeRegistration;
        if (r.incarnation === this.incarnation)
          await this.o.store.put(
            this.k.node(this.o.node),
            JSON.stringify({ ...r, left: true, sinceMs: env.nowMs() }),
          );
      }
      await this.agentEvent(
        'left',
        `${this.o.node} left the cluster${opts.leave ? ' (resources moved away)' : ''}`,
      );
      if (this.lease !== undefined) await this.o.store.leaseRevoke(this.lease);
    } catch (e) {
      env.log('warn', 'could not record a clean leave; the node will be fenced', { error: String(e) });
    }
    this.lease = undefined;
    this.phase = 'stopped';
    await Promise.allSettled(this.loops);
  }
}
