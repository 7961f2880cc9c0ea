// The manager loop: runs inside every agent; only the holder of the leader key acts.
// Each round: one consistent read, decide() (pure), then one guarded txn that applies
// every decision only if this manager still leads and nothing it read has changed.
// Fencing runs in the background and writes its outcome as a fence record.
import type { Env, Fencer } from '../env/types.js';
import type { Store, TxnOp, Compare } from '../store/types.js';
import { StoreError } from '../store/types.js';
import { keys as keysOf, type Keys } from '../core/keys.js';
import { decide } from '../core/decide.js';
import { invariant } from '../core/errors.js';
import type { Action, ClusterEvent, ClusterFlags, ClusterView, FenceRecord, Timings } from '../core/types.js';
import { loadSnapshot, type LeaderRecord, type Snapshot } from './load.js';

export const managerLimits = {
  /** a round runs at least this often, so time-based transitions happen without store events */
  tickEveryMs: 250,
  /** ops (and compares) in one txn: etcd's default --max-txn-ops; larger rounds are split */
  txnOpsMax: 128,
  /** events kept in the store; older ones are trimmed */
  eventsMax: 5000,
  /** trim the event log every this many rounds */
  trimEveryRounds: 200,
};

export interface ManagerOptions {
  env: Env;
  store: Store;
  cluster: string;
  self: string;
  timings: Timings;
  fencer: Fencer;
  /** the node's current lease; leadership is bound to it. undefined while the node has none */
  lease: () => number | undefined;
  /** notified of every event this manager writes (logging) */
  onEvent?: (e: ClusterEvent) => void;
  /** when the node got the store back after losing it past its lease deadline (see ClusterView) */
  storeBackAtMs?: () => number | undefined;
}

export class Manager {
  private readonly k: Keys;
  private leaderModRevision = 0;
  private term = 0;
  private readonly fencing = new Set<string>();
  private stopped = false;
  private wake: (() => void) | undefined;
  private rounds = 0;
  private eventSeq = 0;
  private lastLeaseId: number | undefined;

  constructor(private readonly o: ManagerOptions) {
    this.k = keysOf(o.cluster);
  }

  isLeader(): boolean {
    return this.leaderModRevision !== 0;
  }

  currentTerm(): number {
    return this.term;
  }

  /** ask for a round as soon as possible (store change seen) */
  poke(): void {
    this.wake?.();
  }

  stop(): void {
    this.stopped = true;
    this.poke();
  }

  async run(): Promise<void> {
    while (!this.stopped) {
      try {
        await this.round();
      } catch (e) {
        if (e instanceof StoreError) {
          this.leaderModRevision = 0;
          this.o.env.log('warn', 'manager round failed on the store', { error: e.message });
        } else {
          throw e;
        }
      }
      if (this.stopped) break;
      await new Promise<void>((resolve) => {
        const cancel = this.o.env.setTimer(managerLimits.tickEveryMs, () => {
          this.wake = undefined;
          resolve();
        });
        this.wake = () => {
          cancel();
          this.wake = undefined;
          resolve();
        };
      });
    }
  }

  /** One round: lead (or try to), read, decide, apply. */
  async round(): Promise<void> {
    const lease = this.o.lease();
    if (lease === undefined) {
      this.leaderModRevision = 0;
      return;
    }
    if (lease !== this.lastLeaseId) {
      this.lastLeaseId = lease;
      this.leaderModRevision = 0;
    }
    // Followers only need to know that someone else leads: one get, not a full snapshot (with N
    // agents, N full reads every tick and on every store change made the store load quadratic).
    const leaderKv = await this.o.store.get(this.k.leader);
    if (leaderKv && leaderKv.lease !== lease) {
      this.leaderModRevision = 0;
      return;
    }
    const snap = await loadSnapshot(this.o.store, this.o.cluster);
    if (!this.checkLeadership(snap, lease)) {
      await this.campaign(snap, lease);
      return;
    }
    for (const c of snap.corrupt) this.o.env.log('warn', 'unreadable record ignored', c);
    if (await this.stampArmed(snap)) return; // the flags changed: decide from a fresh read
    const view = this.viewOf(snap);
    const actions = decide(view);
    await this.apply(snap, actions);
    if (++this.rounds % managerLimits.trimEveryRounds === 0) await this.trimEvents();
  }

  /**
   * Keep flags.armedAtMs: set when first seen armed after a disarm, cleared while disarmed.
   * decide() treats nodes lost shortly after a re-arm like nodes lost while disarmed.
   */
  private async stampArmed(snap: Snapshot): Promise<boolean> {
    const f = snap.flags;
    if (snap.flagsModRevision === 0) return false; // never disarmed
    if (f.armed === (f.armedAtMs !== undefined)) return false;
    const next: ClusterFlags = { ...f };
    if (f.armed) next.armedAtMs = this.o.env.nowMs();
    else delete next.armedAtMs;
    await this.o.store.txn({
      compare: [
        this.leaderGuard(),
        { key: this.k.flags, target: 'modRevision', op: '==', value: snap.flagsModRevision },
      ],
      success: [{ type: 'put', key: this.k.flags, value: JSON.stringify(next) }],
    });
    return true;
  }

  private checkLeadership(snap: Snapshot, lease: number): boolean {
    const l = snap.leader;
    // Our own key, of the term we won, still bound to our live lease: a failed round made us
    // forget it, not lose it (nobody else can hold it while our lease lives). Without this the
    // key blocks every campaign, ours included, for as long as we keep renewing: no leader acts.
    if (
      l &&
      this.leaderModRevision === 0 &&
      this.term > 0 &&
      l.node === this.o.self &&
      l.term === this.term &&
      l.lease === lease
    )
      this.leaderModRevision = l.modRevision;
    const mine = l !== undefined && l.node === this.o.self && l.modRevision === this.leaderModRevision;
    if (!mine) this.leaderModRevision = 0;
    return mine;
  }

  private async campaign(snap: Snapshot, lease: number): Promise<void> {
    if (snap.leader) return; // someone leads; their lease decides how long
    const term = snap.term + 1;
    const rec: LeaderRecord = { node: this.o.self, term, sinceMs: this.o.env.nowMs() };
    const r = await this.o.store.txn({
      compare: [
        { key: this.k.leader, target: 'createRevision', op: '==', value: 0 },
        { key: this.k.term, target: 'modRevision', op: '==', value: snap.termModRevision },
      ],
      success: [
        { type: 'put', key: this.k.leader, value: JSON.stringify(rec), lease },
        { type: 'put', key: this.k.term, value: String(term) },
      ],
    });
    if (!r.succeeded) return;
    invariant(term > this.term, 'leader term must grow');
    this.term = term;
    this.leaderModRevision = r.revision;
    const e: ClusterEvent = {
      atMs: this.o.env.nowMs(),
      kind: 'leader',
      object: this.o.self,
      action: 'elected',
      message: `${this.o.self} leads (term ${term})`,
      by: `manager@${this.o.self}`,
      term,
    };
    await this.o.store.put(this.eventKey(e), JSON.stringify(e)).catch(() => undefined);
    this.o.onEvent?.(e);
    this.poke();
  }

  private viewOf(snap: Snapshot): ClusterView {
    for (const n of snap.nodes.values()) n.fenceDevices = this.o.fencer.deviceCount(n.name);
    return {
      nowMs: this.o.env.nowMs(),
      term: this.term,
      timings: this.o.timings,
      flags: snap.flags,
      self: this.o.self,
      nodes: snap.nodes,
      resources: snap.resources,
      fencing: new Set(this.fencing),
      storeBackAtMs: this.o.storeBackAtMs?.(),
    };
  }

  private leaderGuard(): Compare {
    return { key: this.k.leader, target: 'modRevision', op: '==', value: this.leaderModRevision };
  }

  /**
   * Apply a round's decisions. Each decision becomes a unit (its writes, the guards it
   * depends on, its events); units are packed in order into txns within etcd's limits, each
   * txn guarded by our leadership plus every unit's own guards. The first txn that fails
   * ends the round: the next round decides again from a fresh read.
   */
  private async apply(snap: Snapshot, actions: Action[]): Promise<void> {
    interface Unit {
      compare: Compare[];
      ops: TxnOp[];
      events: ClusterEvent[];
      fences: Extract<Action, { type: 'fence' }>[];
    }
    const units: Unit[] = [];
    const guardOf = (key: string): Compare => ({
      key,
      target: 'modRevision',
      op: '==',
      value: snap.modRevisions.get(key) ?? 0,
    });
    for (const a of actions) {
      const u: Unit = { compare: [], ops: [], events: [], fences: [] };
      switch (a.type) {
        case 'setNode':
          u.compare.push(guardOf(this.k.nodeStatus(a.node)));
          u.ops.push({ type: 'put', key: this.k.nodeStatus(a.node), value: JSON.stringify(a.next) });
          if (a.event) u.events.push(a.event);
          break;
        case 'fence': {
          // runs only if the round's setNode for this node (the attempt count) committed
          const statusKey = this.k.nodeStatus(a.node);
          const owner = [...units]
            .reverse()
            .find((x) => x.ops.some((o) => o.type === 'put' && o.key === statusKey));
          (owner ?? u).fences.push(a);
          (owner ?? u).events.push(a.event);
          break;
        }
        case 'fenceRecord':
          u.compare.push(guardOf(this.k.fence(a.record.node)));
          u.ops.push({ type: 'put', key: this.k.fence(a.record.node), value: JSON.stringify(a.record) });
          u.events.push(a.event);
          break;
        case 'setResource': {
          const prev = a.prev;
          if (prev) invariant(a.next.epoch >= prev.epoch, `${a.id}: epoch must not shrink`);
          u.compare.push(guardOf(this.k.assign(a.id)));
          // A new epoch is only safe while the old copy's evidence stands: the old node's
          // report and lease must be exactly what we read (an agent that just rejoined and
          // claimed the resource invalidates this decision).
          if (prev?.node && (a.next.epoch !== prev.epoch || a.next.node !== prev.node)) {
            u.compare.push(guardOf(this.k.status(prev.node, a.id)), guardOf(this.k.alive(prev.node)));
          }
          u.ops.push({ type: 'put', key: this.k.assign(a.id), value: JSON.stringify(a.next) });
          if (a.event) u.events.push(a.event);
          break;
        }
        case 'deleteResource':
          u.compare.push(guardOf(this.k.assign(a.id)));
          u.ops.push({ type: 'delete', key: this.k.assign(a.id) });
          u.events.push(a.event);
          break;
        case 'consumeCleanup':
          u.ops.push({ type: 'delete', key: this.k.cleanup(a.id) });
          break;
      }
      if (u.ops.length > 0 || u.fences.length > 0) units.push(u);
    }
    let batch: Unit[] = [];
    let nOps = 0;
    let nCompare = 1;
    const flush = async (): Promise<boolean> => {
      if (batch.length === 0) return true;
      const compare = [this.leaderGuard(), ...batch.flatMap((u) => u.compare)];
      const ops = batch.flatMap((u) => [
        ...u.ops,
        ...u.events.map((e): TxnOp => ({ type: 'put', key: this.eventKey(e), value: JSON.stringify(e) })),
      ]);
      const done = batch;
      batch = [];
      nOps = 0;
      nCompare = 1;
      const r = ops.length > 0 ? await this.o.store.txn({ compare, success: ops }) : { succeeded: true };
      if (!r.succeeded) return false; // something changed under us (or we lost the lead)
      for (const u of done) {
        for (const e of u.events) this.o.onEvent?.(e);
        for (const f of u.fences) void this.runFence(f.node, f.incarnation, f.deadlineMs);
      }
      return true;
    };
    for (const u of units) {
      const uOps = u.ops.length + u.events.length;
      if (nOps + uOps > managerLimits.txnOpsMax || nCompare + u.compare.length > managerLimits.txnOpsMax) {
        if (!(await flush())) return;
      }
      batch.push(u);
      nOps += uOps;
      nCompare += u.compare.length;
    }
    await flush();
  }

  private async runFence(node: string, incarnation: number, deadlineMs: number): Promise<void> {
    if (this.fencing.has(node)) return;
    this.fencing.add(node);
    try {
      const out = await this.o.fencer.fence(node, deadlineMs);
      const now = this.o.env.nowMs();
      const record: FenceRecord = out.ok
        ? { node, incarnation, ok: true, device: out.device, atMs: now, term: this.term }
        : {
            node,
            incarnation,
            ok: false,
            device: out.attempts.map((a) => a.device).join(', ') || 'none',
            error: out.attempts.map((a) => `${a.device}: ${a.error}`).join('; '),
            atMs: now,
            term: this.term,
          };
      const e: ClusterEvent = {
        atMs: now,
        kind: 'fence',
        object: node,
        action: out.ok ? 'fence-ok' : 'fence-failed',
        message: out.ok
          ? `${node}: fenced by ${record.device} in ${out.durationMs} ms`
          : `${node}: every fence device failed (${record.error}); recovery waits, retrying with back-off`,
        by: `manager@${this.o.self}`,
        term: this.term,
      };
      await this.o.store.txn({
        compare: [this.leaderGuard()],
        success: [
          { type: 'put', key: this.k.fence(node), value: JSON.stringify(record) },
          { type: 'put', key: this.eventKey(e), value: JSON.stringify(e) },
        ],
      });
      this.o.onEvent?.(e);
    } catch (e) {
      this.o.env.log('warn', 'fence outcome not recorded', { node, error: (e as Error).message });
    } finally {
      this.fencing.delete(node);
      this.poke();
    }
  }

  private eventKey(e: ClusterEvent): string {
    this.eventSeq = (this.eventSeq + 1) % 1_000_000;
    return this.k.event(e.atMs, `m.${this.o.self}`, this.eventSeq);
  }

  private async trimEvents(): Promise<void> {
    const all = await this.o.store.range(this.k.events);
    const surplus = all.kvs.length - managerLimits.eventsMax;
    if (surplus <= 0) return;
    const ops: TxnOp[] = all.kvs.slice(0, surplus).map((kv) => ({ type: 'delete', key: kv.key }));
    for (let i = 0; i < ops.length; i += managerLimits.txnOpsMax) {
      await this.o.store.txn({ compare: [], success: ops.slice(i, i + managerLimits.txnOpsMax) });
    }
  }
}
