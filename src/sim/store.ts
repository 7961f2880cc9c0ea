// The simulated store: one in-memory state with etcd v3 semantics (src/store/types.ts),
// seen by each node through its own client, so each node has its own reachability:
// a cut-off node's calls fail after a timeout and its watches stall; a down store fails
// every call at once. Leases expire on the scheduler's time (virtual in the simulator).
import {
  StoreError,
  type Compare,
  type KeyValue,
  type LeaseInfo,
  type RangeResult,
  type Store,
  type StoreErrorCode,
  type TxnOp,
  type TxnOpResult,
  type TxnRequest,
  type TxnResult,
  type WatchEvent,
  type WatchOptions,
  type Watcher,
} from '../store/types.js';
import type { Owner, Scheduler } from './queue.js';

export const simStoreLimits = {
  /** watch history kept for watches from an old revision; older revisions are compacted */
  historyRevisionsMax: 100_000,
};

interface Lease {
  id: number;
  ttlMs: number;
  expiresAtMs: number;
  keys: Set<string>;
  cancelExpiry?: () => void;
}

interface CoreWatcher {
  prefix: string;
  /** next revision to deliver */
  nextRevision: number;
  push: (events: WatchEvent[]) => void;
  fail: (err: StoreError) => void;
}

/** Observer of every committed write (the simulator's transition log and invariant checks). */
export type CommitHook = (revision: number, events: WatchEvent[]) => void;

function err(code: StoreErrorCode, message: string, hint?: string, compactRevision?: number): StoreError {
  return new StoreError(code, `sim store: ${message}`, hint, compactRevision);
}

/** The shared state of the simulated store (the "server"). */
export class SimStoreCore {
  revision = 0;
  compactRevision = 0;
  private readonly kvs = new Map<string, KeyValue>();
  private sorted: string[] = [];
  private readonly leases = new Map<number, Lease>();
  private nextLeaseId = 1;
  private history: { revision: number; events: WatchEvent[] }[] = [];
  private readonly watchers = new Set<CoreWatcher>();
  /** down: every call fails; leases do not expire (like an etcd cluster without quorum) */
  down = false;
  onCommit: CommitHook | undefined;

  constructor(readonly sched: Scheduler) {}

  // ---------------------------------------------------------------- reads
  get(key: string): KeyValue | undefined {
    return this.kvs.get(key);
  }

  range(prefix: string, limit = 0, fromKey?: string): { kvs: KeyValue[]; more: boolean } {
    if (limit < 0)
      throw err(
        'CORRAL_STORE_BAD_REQUEST',
        `range ${prefix}: negative limit ${limit}`,
        'pass 0 for no limit',
      );
    const start = fromKey !== undefined && keyLess(prefix, fromKey) ? fromKey : prefix;
    let i = lowerBound(this.sorted, start);
    const out: KeyValue[] = [];
    for (; i < this.sorted.length; i++) {
      const k = this.sorted[i] as string;
      if (!k.startsWith(prefix)) break;
      if (limit > 0 && out.length === limit) return { kvs: out, more: true };
      out.push(this.kvs.get(k) as KeyValue);
    }
    return { kvs: out, more: false };
  }

  // ---------------------------------------------------------------- writes
  txn(req: TxnRequest): TxnResult {
    for (const op of [...req.success, ...(req.failure ?? [])]) this.validateOp(op);
    for (const branch of [req.success, req.failure ?? []]) this.checkDuplicates(branch);
    const ok = req.compare.every((c) => this.compare(c));
    const ops = ok ? req.success : (req.failure ?? []);
    const events: WatchEvent[] = [];
    const rev = this.revision + 1;
    const results: TxnOpResult[] = [];
    for (const op of ops) results.push(this.applyOp(op, rev, events));
    if (events.length > 0) this.commit(rev, events);
    return { succeeded: ok, revision: this.revision, results };
  }

  private validateOp(op: TxnOp): void {
    if ((op.type === 'put' || op.type === 'delete' || op.type === 'get') && op.key === '')
      throw err(
        'CORRAL_STORE_BAD_REQUEST',
        `${op.type} with an empty key`,
        'every key needs at least one character',
      );
    if (op.type === 'put' && op.lease && !this.leases.has(op.lease))
      throw err(
        'CORRAL_STORE_LEASE_NOT_FOUND',
        `put ${op.key}: lease ${op.lease} not found`,
        'grant a new lease',
      );
    if (op.type === 'range' && (op.limit ?? 0) < 0)
      throw err('CORRAL_STORE_BAD_REQUEST', `range ${op.prefix}: negative limit`, 'pass 0 for no limit');
  }

  /** etcd rule: a branch may not write one key twice (puts, deletes, overlapping deletePrefix) */
  private checkDuplicates(ops: TxnOp[]): void {
    const written = new Set<string>();
    const prefixes: string[] = [];
    for (const op of ops) {
      if (op.type === 'put' || op.type === 'delete') {
        if (written.has(op.key) || prefixes.some((p) => op.key.startsWith(p)))
          throw err(
            'CORRAL_STORE_BAD_REQUEST',
            `txn writes ${op.key} twice`,
            'write each key at most once per txn branch',
          );
        written.add(op.key);
      } else if (op.type === 'deletePrefix') {
        if (
          [...written].some((k) => k.startsWith(op.prefix)) ||
          prefixes.some((p) => p.startsWith(op.prefix) || op.prefix.startsWith(p))
        )
          throw err(
            'CORRAL_STORE_BAD_REQUEST',
            `txn deletePrefix ${op.prefix} overlaps another write`,
            'write each key at most once per txn branch',
          );
        prefixes.push(op.prefix);
      }
    }
  }

  private compare(c: Compare): boolean {
    const kv = this.kvs.get(c.key);
    const cmp = <T extends string | number>(a: T, b: T): boolean => {
      switch (c.op) {
        case '==':
          return a === b;
        case '!=':
          return a !== b;
        case '<':
          return a < b;
        case '>':
          return a > b;
      }
    };
    switch (c.target) {
      case 'value':
        return cmp(kv?.value ?? '', c.value);
      case 'version':
        return cmp(kv?.version ?? 0, c.value);
      case 'createRevision':
        return cmp(kv?.createRevision ?? 0, c.value);
      case 'modRevision':
        return cmp(kv?.modRevision ?? 0, c.value);
    }
  }

  private applyOp(op: TxnOp, rev: number, events: WatchEvent[]): TxnOpResult {
    switch (op.type) {
      case 'put': {
        this.putKey(op.key, op.value, op.lease ?? 0, rev, events);
        return { type: 'put', revision: rev };
      }
      case 'delete':
        return { type: 'delete', deleted: this.deleteKey(op.key, rev, events) };
      case 'deletePrefix': {
        let n = 0;
        for (const kv of this.range(op.prefix).kvs) n += this.deleteKey(kv.key, rev, events);
        return { type: 'delete', deleted: n };
      }
      case 'get':
        return { type: 'get', kv: this.kvs.get(op.key) };
      case 'range': {
        const r = this.range(op.prefix, op.limit ?? 0);
        return { type: 'range', kvs: r.kvs, more: r.more };
      }
    }
  }

  private putKey(key: string, value: string, lease: number, rev: number, events: WatchEvent[]): void {
    const old = this.kvs.get(key);
    if (old?.lease && old.lease !== lease) this.leases.get(old.lease)?.keys.delete(key);
    const kv: KeyValue = {
      key,
      value,
      createRevision: old ? old.createRevision : rev,
      modRevision: rev,
      version: (old?.version ?? 0) + 1,
      lease,
    };
    if (!old) this.sorted.splice(lowerBound(this.sorted, key), 0, key);
    this.kvs.set(key, kv);
    if (lease) this.leases.get(lease)?.keys.add(key);
    events.push({ type: 'put', kv, revision: rev });
  }

  private deleteKey(key: string, rev: number, events: WatchEvent[]): number {
    const old = this.kvs.get(key);
    if (!old) return 0;
    if (old.lease) this.leases.get(old.lease)?.keys.delete(key);
    this.kvs.delete(key);
    this.sorted.splice(lowerBound(this.sorted, key), 1);
    events.push({
      type: 'delete',
      kv: { key, value: '', createRevision: 0, modRevision: rev, version: 0, lease: 0 },
      revision: rev,
    });
    return 1;
  }

  private commit(rev: number, events: WatchEvent[]): void {
    this.revision = rev;
    this.history.push({ revision: rev, events });
    if (this.history.length > simStoreLimits.historyRevisionsMax) {
      const drop = this.history.length - simStoreLimits.historyRevisionsMax;
      this.compactRevision = (this.history[drop - 1] as { revision: number }).revision;
      this.history = this.history.slice(drop);
    }
    this.onCommit?.(rev, events);
    for (const w of this.watchers) this.feed(w);
  }

  private feed(w: CoreWatcher): void {
    // deliver every revision from w.nextRevision on, one batch per revision
    if (w.nextRevision > this.revision) return;
    let i = lowerBoundRev(this.history, w.nextRevision);
    for (; i < this.history.length; i++) {
      const h = this.history[i] as { revision: number; events: WatchEvent[] };
      const evs = h.events.filter((e) => e.kv.key.startsWith(w.prefix));
      if (evs.length > 0) w.push(evs);
    }
    w.nextRevision = this.revision + 1;
  }

  addWatcher(
    prefix: string,
    startRevision: number | undefined,
    push: CoreWatcher['push'],
    fail: CoreWatcher['fail'],
  ): CoreWatcher {
    const start = startRevision ?? this.revision + 1;
    const w: CoreWatcher = { prefix, nextRevision: Math.max(1, start), push, fail };
    if (start > 0 && start <= this.compactRevision) {
      const oldest = this.compactRevision + 1;
      const e = err(
        'CORRAL_STORE_COMPACTED',
        `watch ${prefix} from revision ${start}: history compacted, oldest revision kept is ${oldest}`,
        'reload the state and watch from the current revision',
        oldest,
      );
      this.sched.at(this.sched.nowMs(), () => fail(e));
      return w;
    }
    this.watchers.add(w);
    this.feed(w);
    return w;
  }

  removeWatcher(w: CoreWatcher): void {
    this.watchers.delete(w);
  }

  compact(revision: number): void {
    if (revision > this.revision)
      throw err(
        'CORRAL_STORE_BAD_REQUEST',
        `compact ${revision}: beyond the current revision ${this.revision}`,
        'compact at most the current revision',
      );
    if (revision <= this.compactRevision) return;
    this.compactRevision = revision - 1;
    this.history = this.history.filter((h) => h.revision >= revision);
  }

  // ---------------------------------------------------------------- leases
  leaseGrant(ttlMs: number): number {
    if (!(ttlMs > 0))
      throw err('CORRAL_STORE_BAD_REQUEST', `lease TTL ${ttlMs} ms`, 'a lease TTL must be positive');
    const id = this.nextLeaseId++;
    const l: Lease = { id, ttlMs, expiresAtMs: this.sched.nowMs() + ttlMs, keys: new Set() };
    this.leases.set(id, l);
    this.armExpiry(l);
    return id;
  }

  leaseKeepAlive(id: number): { remainingTtlMs: number } {
    const l = this.leases.get(id);
    if (!l)
      throw err(
        'CORRAL_STORE_LEASE_NOT_FOUND',
        `lease ${id} not found (expired or revoked)`,
        'grant a new lease',
      );
    l.expiresAtMs = this.sched.nowMs() + l.ttlMs;
    this.armExpiry(l);
    return { remainingTtlMs: l.ttlMs };
  }

  leaseRevoke(id: number): void {
    const l = this.leases.get(id);
    if (!l)
      throw err(
        'CORRAL_STORE_LEASE_NOT_FOUND',
        `lease ${id} not found (expired or revoked)`,
        'nothing to revoke',
      );
    this.dropLease(l);
  }

  leaseInfo(id: number): LeaseInfo | undefined {
    const l = this.leases.get(id);
    if (!l) return undefined;
    return {
      id,
      grantedTtlMs: l.ttlMs,
      remainingTtlMs: Math.max(0, l.expiresAtMs - this.sched.nowMs()),
      keys: [...l.keys].sort(),
    };
  }

  /** when the store comes back after being down, every lease gets a full TTL again (etcd: new leader) */
  refreshLeases(): void {
    for (const l of this.leases.values()) {
      l.expiresAtMs = this.sched.nowMs() + l.ttlMs;
      this.armExpiry(l);
    }
  }

  /**
   * The store comes back after being down and revokes every lease whose TTL ran out meanwhile
   * (an etcd leader that was paused, without quorum, resumes and expires what it owes); the
   * others keep their deadline. Returns the revoked lease ids.
   */
  revokeExpiredLeases(): number[] {
    const now = this.sched.nowMs();
    const out: number[] = [];
    for (const l of [...this.leases.values()].sort((a, b) => a.id - b.id)) {
      if (l.expiresAtMs <= now) {
        out.push(l.id);
        this.dropLease(l);
      } else this.armExpiry(l);
    }
    return out;
  }

  private armExpiry(l: Lease): void {
    l.cancelExpiry?.();
    l.cancelExpiry = this.sched.at(l.expiresAtMs, () => {
      if (this.down || this.leases.get(l.id) !== l || l.expiresAtMs > this.sched.nowMs()) return;
      this.dropLease(l);
    });
  }

  private dropLease(l: Lease): void {
    l.cancelExpiry?.();
    this.leases.delete(l.id);
    const keys = [...l.keys].sort();
    if (keys.length === 0) return;
    const rev = this.revision + 1;
    const events: WatchEvent[] = [];
    for (const k of keys) this.deleteKey(k, rev, events);
    this.commit(rev, events);
  }
}

/** How one node reaches the store right now. */
export interface Link {
  /** false: calls time out, watches stall */
  reachable(): boolean;
  /** one-way latency added to every call and watch delivery, ms */
  latencyMs(): number;
  /** requests reach the store but replies are lost (one-way loss) */
  dropReplies?(): boolean;
}

export interface SimStoreClientOptions {
  /** a call that cannot reach the store fails after this long (CORRAL_STORE_UNAVAILABLE) */
  opTimeoutMs: number;
  /** the owner whose code awaits this client's promises (an agent incarnation) */
  owner?: Owner;
  link?: Link;
  url?: string;
}

const alwaysUp: Link = { reachable: () => true, latencyMs: () => 1 };

/** One node's client of the simulated store. */
export class SimStoreClient implements Store {
  readonly url: string;
  private closed = false;
  private readonly watches = new Set<ClientWatch>();
  private readonly link: Link;

  constructor(
    private readonly core: SimStoreCore,
    private readonly o: SimStoreClientOptions,
  ) {
    this.link = o.link ?? alwaysUp;
    this.url = o.url ?? 'sim:';
  }

  private call<T>(what: string, fn: () => T): Promise<T> {
    const sched = this.core.sched;
    if (this.closed)
      return Promise.reject(err('CORRAL_STORE_CLOSED', `${what}: client closed`, 'open a new client'));
    return new Promise<T>((resolve, reject) => {
      const sentMs = sched.nowMs();
      const owner = this.o.owner;
      const fail = (e: StoreError, atMs: number) =>
        sched.at(atMs, () => sched.deliver(owner, () => reject(e)), owner);
      sched.at(sentMs + this.link.latencyMs(), () => {
        const now = sched.nowMs();
        if (!this.link.reachable())
          return void fail(
            err(
              'CORRAL_STORE_UNAVAILABLE',
              `${what}: store unreachable (timed out after ${this.o.opTimeoutMs} ms)`,
              'check the network between this node and the store',
            ),
            sentMs + this.o.opTimeoutMs,
          );
        if (this.core.down)
          return void fail(
            err('CORRAL_STORE_UNAVAILABLE', `${what}: store down (connection refused)`, 'start the store'),
            now + this.link.latencyMs(),
          );
        let v: T;
        try {
          v = fn();
        } catch (e) {
          return void fail(e as StoreError, now + this.link.latencyMs());
        }
        if (this.link.dropReplies?.())
          return void fail(
            err(
              'CORRAL_STORE_TIMEOUT',
              `${what}: no reply within ${this.o.opTimeoutMs} ms`,
              'check the network',
            ),
            sentMs + this.o.opTimeoutMs,
          );
        sched.at(now + this.link.latencyMs(), () => sched.deliver(owner, () => resolve(v)), owner);
      });
    });
  }

  get(key: string): Promise<KeyValue | undefined> {
    return this.call(`get ${key}`, () => {
      if (key === '') throw err('CORRAL_STORE_BAD_REQUEST', 'get with an empty key', 'pass a key');
      return this.core.get(key);
    });
  }
  range(prefix: string, opts?: { limit?: number; fromKey?: string }): Promise<RangeResult> {
    return this.call(`range ${prefix}`, () => ({
      ...this.core.range(prefix, opts?.limit ?? 0, opts?.fromKey),
      revision: this.core.revision,
    }));
  }
  put(key: string, value: string, opts?: { lease?: number }): Promise<{ revision: number }> {
    return this.call(`put ${key}`, () => {
      const r = this.core.txn({ compare: [], success: [{ type: 'put', key, value, lease: opts?.lease }] });
      return { revision: r.revision };
    });
  }
  delete(key: string): Promise<{ revision: number; deleted: number }> {
    return this.call(`delete ${key}`, () => {
      const r = this.core.txn({ compare: [], success: [{ type: 'delete', key }] });
      const d = r.results[0];
      return { revision: r.revision, deleted: d?.type === 'delete' ? d.deleted : 0 };
    });
  }
  deletePrefix(prefix: string): Promise<{ revision: number; deleted: number }> {
    return this.call(`deletePrefix ${prefix}`, () => {
      const r = this.core.txn({ compare: [], success: [{ type: 'deletePrefix', prefix }] });
      const d = r.results[0];
      return { revision: r.revision, deleted: d?.type === 'delete' ? d.deleted : 0 };
    });
  }
  txn(req: TxnRequest): Promise<TxnResult> {
    return this.call('txn', () => this.core.txn(req));
  }
  revision(): Promise<number> {
    return this.call('revision', () => this.core.revision);
  }
  leaseGrant(ttlMs: number): Promise<number> {
    return this.call('leaseGrant', () => this.core.leaseGrant(ttlMs));
  }
  leaseKeepAlive(id: number): Promise<{ remainingTtlMs: number }> {
    return this.call(`leaseKeepAlive ${id}`, () => this.core.leaseKeepAlive(id));
  }
  leaseRevoke(id: number): Promise<void> {
    return this.call(`leaseRevoke ${id}`, () => this.core.leaseRevoke(id));
  }
  leaseInfo(id: number): Promise<LeaseInfo | undefined> {
    return this.call(`leaseInfo ${id}`, () => this.core.leaseInfo(id));
  }
  compact(revision: number): Promise<void> {
    return this.call(`compact ${revision}`, () => this.core.compact(revision));
  }

  async watch(prefix: string, opts: WatchOptions): Promise<Watcher> {
    // registered at the store when the request arrives, so no event in between is missed
    const w = await this.call(`watch ${prefix}`, () => {
      const cw = new ClientWatch(this, prefix, opts, this.o.owner);
      cw.start(this.core, opts.startRevision);
      this.watches.add(cw);
      return cw;
    });
    if (this.closed) {
      w.cancelNow();
      throw err('CORRAL_STORE_CLOSED', `watch ${prefix}: client closed`, 'open a new client');
    }
    return w;
  }

  /** the node can reach the store again: flush stalled watches */
  resumeWatches(): void {
    for (const w of this.watches) w.pump();
  }

  forget(w: ClientWatch): void {
    this.watches.delete(w);
  }

  sched(): Scheduler {
    return this.core.sched;
  }

  linkUp(): boolean {
    return this.link.reachable() && !this.core.down;
  }

  latency(): number {
    return this.link.latencyMs();
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    for (const w of [...this.watches]) {
      w.cancelNow();
      const owner = this.o.owner;
      this.core.sched.deliver(owner, () =>
        w.opts.onError(err('CORRAL_STORE_CLOSED', `watch ${w.prefix}: client closed`, 'open a new client')),
      );
    }
    this.watches.clear();
  }

  /** kill -9: forget everything without telling anyone */
  abandon(): void {
    this.closed = true;
    for (const w of this.watches) w.cancelNow();
    this.watches.clear();
  }
}

class ClientWatch implements Watcher {
  private core: SimStoreCore | undefined;
  private cw: ReturnType<SimStoreCore['addWatcher']> | undefined;
  private pending: WatchEvent[][] = [];
  private pumpAtMs = -1;
  private cancelled = false;

  constructor(
    private readonly client: SimStoreClient,
    readonly prefix: string,
    readonly opts: WatchOptions,
    private readonly owner: Owner | undefined,
  ) {}

  start(core: SimStoreCore, startRevision: number | undefined): void {
    this.core = core;
    this.cw = core.addWatcher(
      this.prefix,
      startRevision,
      (evs) => {
        this.pending.push(evs);
        this.schedulePump();
      },
      (e) => this.client.sched().deliver(this.owner, () => this.opts.onError(e)),
    );
  }

  private schedulePump(): void {
    const sched = this.client.sched();
    // deliveries keep their order even when latency changes
    const atMs = Math.max(this.pumpAtMs, sched.nowMs() + this.client.latency());
    if (this.pumpAtMs >= sched.nowMs() && this.pumpAtMs === atMs) return;
    this.pumpAtMs = atMs;
    sched.at(atMs, () => this.pump(), this.owner);
  }

  pump(): void {
    if (this.cancelled || this.pending.length === 0) return;
    if (!this.client.linkUp()) return; // stalled until the link comes back
    const batches = this.pending;
    this.pending = [];
    for (const b of batches) if (!this.cancelled) this.opts.onEvents(b);
  }

  cancelNow(): void {
    this.cancelled = true;
    if (this.core && this.cw) this.core.removeWatcher(this.cw);
    this.client.forget(this);
  }

  async cancel(): Promise<void> {
    this.cancelNow();
  }
}

const beyondBmpLow = /[\uD800-\uFFFF]/;
const utf8 = new TextEncoder();

/** key order of etcd: UTF-8 bytes (differs from UTF-16 code units only around surrogates) */
export function keyLess(a: string, b: string): boolean {
  if (!beyondBmpLow.test(a) && !beyondBmpLow.test(b)) return a < b;
  const x = utf8.encode(a);
  const y = utf8.encode(b);
  const n = Math.min(x.length, y.length);
  for (let i = 0; i < n; i++) if (x[i] !== y[i]) return (x[i] as number) < (y[i] as number);
  return x.length < y.length;
}

function lowerBound(xs: string[], key: string): number {
  let lo = 0;
  let hi = xs.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (keyLess(xs[mid] as string, key)) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

function lowerBoundRev(xs: { revision: number }[], rev: number): number {
  let lo = 0;
  let hi = xs.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if ((xs[mid] as { revision: number }).revision < rev) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}
