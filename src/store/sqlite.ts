// The embedded store: etcd v3 semantics on one SQLite file (better-sqlite3, WAL mode).
//
// Several processes on one host share one file safely:
// - every write runs in a `BEGIN IMMEDIATE` transaction, so writers are serialised by SQLite's
//   file lock and a txn's compares and writes see one consistent state;
// - the store revision lives in the file (meta.revision), +1 per write transaction;
// - every write is also appended to the `log` table, which is the watch history: each open
//   store instance polls it (cheap `SELECT revision FROM meta` first) and delivers events
//   per revision, strictly in order, to its watchers; writes from this process nudge the
//   pollers of every instance on the same file at once; after each write transaction a process
//   also writes one byte to `<file>-notify`, which instances with watchers watch (inotify), so
//   another process's write wakes them at once and the poll is only the fallback;
// - leases carry wall-clock deadlines (Date.now() ms; every process on the host shares the
//   clock); every open instance runs a sweeper that revokes expired leases (deleting their keys
//   as delete events), so a lease expires even when the process that owned it died. Expired
//   leases are also treated as absent by keep-alive, revoke, leaseInfo and put.
// - log growth is bounded: the sweeper compacts automatically once the log holds more than
//   logRetainRevisions + autoCompactSlackRevisions revisions, keeping the last logRetainRevisions.
//   A watcher that lags further behind than that gets CORRAL_STORE_COMPACTED and must re-read.
//
// Durability: synchronous=FULL. In WAL mode NORMAL may lose the last acknowledged commits on
// power loss; the store holds fencing epochs and fence records, and a write that was
// acknowledged and then lost could let a stale epoch be issued again. FULL costs one fsync of
// the WAL per commit, which is what etcd pays too.
//
// Blocking: better-sqlite3 is synchronous. busy_timeout is kept short (sqliteBusyTimeoutMsMax)
// so a locked file never blocks the event loop for long; the remaining wait up to opTimeoutMs is
// an asynchronous retry loop that ends in CORRAL_STORE_TIMEOUT.
//
// `:memory:` opens a private in-memory store (one instance, one process): for unit tests and
// the simulator. It cannot be shared, not even with another instance in the same process.
import Database from 'better-sqlite3';
import {
  closeSync,
  constants,
  existsSync,
  openSync,
  statSync,
  watch,
  writeSync,
  type FSWatcher,
} from 'node:fs';
import { dirname, resolve } from 'node:path';
import { invariant } from '../core/errors.js';
import {
  StoreError,
  storeOpTimeoutMsDefault,
  type Compare,
  type KeyValue,
  type LeaseInfo,
  type RangeResult,
  type Store,
  type StoreOptions,
  type TxnOp,
  type TxnOpResult,
  type TxnRequest,
  type TxnResult,
  type WatchEvent,
  type Watcher,
  type WatchOptions,
} from './types.js';

/** longest a single SQLite call may block the event loop waiting for another process's lock */
export const sqliteBusyTimeoutMsMax = 20;
/** a process leaves the file unlocked this long between two queued writes (fairness to other processes) */
export const writeGapMs = 2;
/** upper bound of the random pause between two attempts on a locked file */
export const busyRetryDelayMsMax = 4;
/** how often each open instance revokes expired leases (and checks auto-compaction) */
export const leaseSweepIntervalMs = 200;
/** how often watchers poll the log for writes made by other processes (a fallback: `<file>-notify` wakes them at once) */
export const watchPollIntervalMs = 20;
/** a watcher reads at most this many revisions per poll; the rest follows on the next turn */
export const watchRevisionsPerPollMax = 1000;
/** ... and at most this many events (whole revisions, except one revision bigger than that) */
export const watchRowsPerPollMax = 256;
/** automatic compaction keeps this many revisions of watch history */
export const logRetainRevisions = 100_000;
/** ... and runs only when that many more (at most a tenth of the retained) have piled up */
export const autoCompactSlackRevisions = 10_000;
/** at most this many expired leases are revoked per sweep transaction */
export const sweepLeasesPerTxnMax = 100;
/** ops per txn branch: etcd's default --max-txn-ops, so what works here works on etcd */
export const txnOpsMax = 128;
/** longest lease a caller may ask for (one day) */
export const leaseTtlMsMax = 24 * 3600 * 1000;
const schemaVersion = 1;

interface KvRow {
  key: string;
  value: string;
  create_rev: number;
  mod_rev: number;
  version: number;
  lease: number;
}
interface LogRow extends KvRow {
  rev: number;
  type: 'put' | 'delete';
}
interface MetaRow {
  revision: number;
  compact_rev: number;
}
interface LeaseRow {
  id: number;
  ttl_ms: number;
  expires_at_ms: number;
}

interface WatchState {
  prefix: string;
  end: string | undefined;
  nextRev: number;
  opts: WatchOptions;
  done: boolean;
}

const schemaSql = `
CREATE TABLE meta (
  id INTEGER PRIMARY KEY CHECK (id = 1),
  revision INTEGER NOT NULL,
  compact_rev INTEGER NOT NULL
);
INSERT INTO meta (id, revision, compact_rev) VALUES (1, 0, 0);
CREATE TABLE kv (
  key TEXT PRIMARY KEY,
  value TEXT NOT NULL,
  create_rev INTEGER NOT NULL,
  mod_rev INTEGER NOT NULL,
  version INTEGER NOT NULL,
  lease INTEGER NOT NULL
);
CREATE INDEX kv_lease ON kv (lease) WHERE lease <> 0;
CREATE TABLE log (
  id INTEGER PRIMARY KEY,
  rev INTEGER NOT NULL,
  key TEXT NOT NULL,
  type TEXT NOT NULL CHECK (type IN ('put', 'delete')),
  value TEXT NOT NULL,
  create_rev INTEGER NOT NULL,
  version INTEGER NOT NULL,
  lease INTEGER NOT NULL
);
CREATE INDEX log_rev ON log (rev);
CREATE TABLE leases (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  ttl_ms INTEGER NOT NULL,
  expires_at_ms INTEGER NOT NULL
);
CREATE INDEX leases_expiry ON leases (expires_at_ms);
PRAGMA user_version = ${schemaVersion};
`;

/**
 * The smallest string greater than every string starting with prefix, in UTF-8 byte order
 * (= code point order, SQLite's BINARY collation, etcd's order); undefined when unbounded.
 */
export function prefixEnd(prefix: string): string | undefined {
  const cps = Array.from(prefix, (c) => c.codePointAt(0) ?? 0);
  while (cps.length > 0) {
    const last = cps.pop() ?? 0;
    if (last < 0x10ffff) {
      cps.push(last === 0xd7ff ? 0xe000 : last + 1);
      return String.fromCodePoint(...cps);
    }
  }
  return undefined;
}

function utf8Compare(a: string, b: string): number {
  return Buffer.compare(Buffer.from(a, 'utf8'), Buffer.from(b, 'utf8'));
}

function sqliteCode(e: unknown): string {
  const code = (e as { code?: unknown } | null)?.code;
  return typeof code === 'string' ? code : '';
}

function isBusy(e: unknown): boolean {
  const c = sqliteCode(e);
  return c.startsWith('SQLITE_BUSY') || c.startsWith('SQLITE_LOCKED');
}

function yieldToEventLoop(): Promise<void> {
  return new Promise((resolve) => setImmediate(resolve));
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

function toKv(r: KvRow): KeyValue {
  return {
    key: r.key,
    value: r.value,
    createRevision: r.create_rev,
    modRevision: r.mod_rev,
    version: r.version,
    lease: r.lease,
  };
}

function badRequest(where: string, msg: string, hint?: string): StoreError {
  return new StoreError('CORRAL_STORE_BAD_REQUEST', `${where}: ${msg}`, hint);
}

function checkKey(where: string, key: unknown): void {
  if (typeof key !== 'string' || key === '')
    throw badRequest(where, `key must be a non-empty string, got ${JSON.stringify(key)}`);
}

function checkString(where: string, what: string, v: unknown): void {
  if (typeof v !== 'string') throw badRequest(where, `${what} must be a string, got ${typeof v}`);
}

function checkLimit(where: string, limit: unknown): number {
  if (limit === undefined) return 0;
  if (typeof limit !== 'number' || !Number.isSafeInteger(limit) || limit < 0)
    throw badRequest(where, `limit must be a non-negative integer (0 = no limit), got ${String(limit)}`);
  return limit;
}

function compareOk(c: Compare, kv: KvRow | undefined): boolean {
  let cmp: number;
  if (c.target === 'value') {
    checkString('txn compare', 'value', c.value);
    cmp = utf8Compare(kv?.value ?? '', c.value);
  } else {
    if (typeof c.value !== 'number' || !Number.isFinite(c.value))
      throw badRequest('txn compare', `${c.target} compare needs a number, got ${String(c.value)}`);
    const actual =
      c.target === 'version'
        ? (kv?.version ?? 0)
        : c.target === 'createRevision'
          ? (kv?.create_rev ?? 0)
          : c.target === 'modRevision'
            ? (kv?.mod_rev ?? 0)
            : undefined;
    if (actual === undefined) throw badRequest('txn compare', `unknown target ${JSON.stringify(c.target)}`);
    cmp = actual - c.value;
  }
  switch (c.op) {
    case '==':
      return cmp === 0;
    case '!=':
      return cmp !== 0;
    case '<':
      return cmp < 0;
    case '>':
      return cmp > 0;
    default:
      throw badRequest('txn compare', `unknown op ${JSON.stringify(c.op)}; use ==, !=, < or >`);
  }
}

/** etcd's rules, kept here too: bounded size, and no key written twice in one branch */
function checkBranch(where: string, ops: TxnOp[]): void {
  if (ops.length > txnOpsMax)
    throw badRequest(
      where,
      `${ops.length} ops; at most ${txnOpsMax} per branch`,
      'split it into several txns',
    );
  const puts = new Set<string>();
  for (const op of ops) {
    if (op?.type !== 'put') continue;
    if (puts.has(op.key)) throw badRequest(where, `key ${JSON.stringify(op.key)} is put twice`);
    puts.add(op.key);
  }
  for (const op of ops) {
    const hit =
      op?.type === 'delete'
        ? puts.has(op.key)
        : op?.type === 'deletePrefix' && [...puts].some((k) => k.startsWith(op.prefix));
    if (hit) throw badRequest(where, `a put and a delete of the same key (${JSON.stringify(op)})`);
  }
}

type LeaseOutcome<T> = { ok: true; value: T } | { ok: false };

/** the file a store's writers touch after each commit so other processes' watchers wake at once */
export function notifyPath(storePath: string): string {
  return `${storePath}-notify`;
}
const notifyByte = Buffer.from([0]);

/** instances per file in this process, so a local write wakes every local watcher at once */
const instancesByFile = new Map<string, Set<SqliteStore>>();
let memoryStoresOpened = 0;

export class SqliteStore implements Store {
  readonly url: string;
  private readonly db: Database.Database;
  private readonly fileKey: string;
  private readonly opTimeoutMs: number;
  private closed = false;
  private readonly watchers = new Set<WatchState>();
  private sweepTimer: NodeJS.Timeout | undefined;
  private pollTimer: NodeJS.Timeout | undefined;
  private pollScheduled = false;
  /** `<file>-notify`: written after each commit, watched while there are watchers (undefined: poll only) */
  private notifyFd: number | undefined;
  private notifyWatch: FSWatcher | undefined;
  private readonly st: ReturnType<typeof prepareStatements>;

  constructor(
    readonly path: string,
    db: Database.Database,
    opTimeoutMs: number,
    private readonly retainRevisions: number,
  ) {
    this.url = `sqlite:${path}`;
    this.db = db;
    this.opTimeoutMs = opTimeoutMs;
    this.fileKey = path === ':memory:' ? `:memory:${++memoryStoresOpened}` : path;
    this.st = prepareStatements(db);
    let set = instancesByFile.get(this.fileKey);
    if (!set) instancesByFile.set(this.fileKey, (set = new Set()));
    set.add(this);
    this.sweepTimer = setInterval(() => this.sweepTick(), leaseSweepIntervalMs);
    this.sweepTimer.unref();
    if (path !== ':memory:')
      try {
        this.notifyFd = openSync(notifyPath(path), constants.O_RDWR | constants.O_CREAT, 0o644);
      } catch {
        // not writable by this user (a read-only CLI, say): the others still see our writes by polling
      }
  }

  // ---- plumbing ---------------------------------------------------------------------------

  private checkOpen(what: string): void {
    if (this.closed)
      throw new StoreError(
        'CORRAL_STORE_CLOSED',
        `${this.url}: ${what} on a closed store`,
        'open the store again (openStore) before using it',
      );
  }

  private mapError(e: unknown, what: string): unknown {
    if (e instanceof StoreError) return e;
    const c = sqliteCode(e);
    const msg = (e as Error)?.message ?? String(e);
    if (c === 'SQLITE_NOTADB' || c.startsWith('SQLITE_CORRUPT')) return corruptError(this.path, msg);
    if (
      c.startsWith('SQLITE_IOERR') ||
      c === 'SQLITE_FULL' ||
      c.startsWith('SQLITE_READONLY') ||
      c.startsWith('SQLITE_CANTOPEN')
    )
      return new StoreError(
        'CORRAL_STORE_UNAVAILABLE',
        `${this.url}: ${what} failed: ${msg} (${c})`,
        'check the disk (space, permissions, read-only mount) under the store file',
      );
    return e;
  }

  /** a call holds the turn (see takeTurn); the others wait here, urgent ones (leases) first */
  private turnTaken = false;
  private readonly turnQueue: (() => void)[] = [];
  private turnQueueUrgent = 0;
  private turnWrote = false;

  /** run fn in its turn; while another process holds the write lock, retry until opTimeoutMs has passed */
  private async run<T>(what: string, fn: () => T, urgent = false): Promise<T> {
    this.checkOpen(what);
    await this.takeTurn(urgent);
    try {
      this.checkOpen(what);
      return await this.runNow(what, fn);
    } finally {
      this.passTurn();
    }
  }

  /**
   * One call per turn of the event loop, lease calls first. better-sqlite3 answers
   * synchronously (a commit includes its fsync), so without this a burst of awaited calls
   * (sixty resource starts, say) runs as one long chain of microtasks, and due timers (lease
   * renewal, the self-fence deadline) wait behind all of it: agents lost their leases.
   */
  private takeTurn(urgent: boolean): Promise<void> {
    if (!this.turnTaken) {
      this.turnTaken = true;
      return yieldToEventLoop();
    }
    return new Promise((go) => {
      if (urgent) this.turnQueue.splice(this.turnQueueUrgent++, 0, go);
      else this.turnQueue.push(go);
    });
  }

  private passTurn(): void {
    const next = this.turnQueue.shift();
    if (this.turnQueueUrgent > 0) this.turnQueueUrgent--;
    const wrote = this.turnWrote;
    this.turnWrote = false;
    if (!next) this.turnTaken = false;
    // After a write with more queued, leave the file unlocked for writeGapMs: other processes
    // poll for the lock every few ms, and a gap of one event-loop turn starved them (an agent's
    // lease renewal waited 400-700 ms behind another agent's burst of starts).
    else if (wrote) setTimeout(next, writeGapMs);
    else setImmediate(next);
  }

  private async runNow<T>(what: string, fn: () => T): Promise<T> {
    const deadlineMs = Date.now() + this.opTimeoutMs;
    for (;;) {
      try {
        return fn();
      } catch (e) {
        if (!isBusy(e)) throw this.mapError(e, what);
        if (Date.now() >= deadlineMs)
          throw new StoreError(
            'CORRAL_STORE_TIMEOUT',
            `${this.url}: ${what} timed out after ${this.opTimeoutMs} ms: the file stayed locked by another process`,
            'look for a process holding the store file in a long transaction, or raise opTimeoutMs',
          );
        await sleep(1 + Math.random() * busyRetryDelayMsMax);
        this.checkOpen(what);
      }
    }
  }

  private write<T>(fn: (nowMs: number) => T): T {
    this.turnWrote = true;
    const result = this.db
      .transaction(() => {
        const nowMs = Date.now();
        this.sweepSync(nowMs, sweepLeasesPerTxnMax);
        return fn(nowMs);
      })
      .immediate();
    this.nudgeWatchers();
    this.notifyOthers();
    return result;
  }

  private read<T>(fn: () => T): T {
    return this.db.transaction(fn).deferred();
  }

  private meta(): MetaRow {
    const m = this.st.meta.get() as MetaRow | undefined;
    invariant(m, `${this.url}: meta row missing`);
    return m;
  }

  // ---- write primitives (inside a write transaction) ---------------------------------------

  private logEvent(rev: number, type: 'put' | 'delete', r: KvRow): void {
    this.st.logInsert.run(rev, r.key, type, r.value, r.create_rev, r.version, r.lease);
  }

  private putSync(rev: number, key: string, value: string, lease: number): void {
    const old = this.st.getKv.get(key) as KvRow | undefined;
    const row: KvRow = {
      key,
      value,
      create_rev: old ? old.create_rev : rev,
      mod_rev: rev,
      version: old ? old.version + 1 : 1,
      lease,
    };
    this.st.upsertKv.run(row.key, row.value, row.create_rev, row.mod_rev, row.version, row.lease);
    this.logEvent(rev, 'put', row);
  }

  private deleteRowsSync(rev: number, rows: KvRow[]): number {
    for (const r of rows) {
      this.st.deleteKv.run(r.key);
      this.logEvent(rev, 'delete', {
        key: r.key,
        value: '',
        create_rev: 0,
        mod_rev: rev,
        version: 0,
        lease: 0,
      });
    }
    return rows.length;
  }

  private rangeRows(prefix: string, limit: number, fromKey?: string): KvRow[] {
    const start = fromKey !== undefined && utf8Compare(fromKey, prefix) > 0 ? fromKey : prefix;
    const end = prefixEnd(prefix);
    const lim = limit > 0 ? limit : -1;
    return (
      end === undefined ? this.st.rangeOpen.all(start, lim) : this.st.rangeBounded.all(start, end, lim)
    ) as KvRow[];
  }

  private checkLeaseLive(lease: number, nowMs: number): void {
    if (lease === 0) return;
    const l = this.st.getLease.get(lease) as LeaseRow | undefined;
    if (!l || l.expires_at_ms <= nowMs) throw this.leaseNotFound(lease, 'put');
  }

  private leaseNotFound(id: number, what: string): StoreError {
    return new StoreError(
      'CORRAL_STORE_LEASE_NOT_FOUND',
      `${this.url}: ${what}: lease ${id} not found (expired, revoked or never granted)`,
      'grant a new lease and re-create the keys bound to it',
    );
  }

  /** delete a lease and its keys; one revision if it had keys */
  private revokeSync(id: number): void {
    const keys = this.st.keysOfLease.all(id) as KvRow[];
    if (keys.length > 0) {
      const rev = this.meta().revision + 1;
      this.deleteRowsSync(rev, keys);
      this.st.setRevision.run(rev);
    }
    this.st.deleteLease.run(id);
  }

  /** revoke up to max expired leases; true if some may remain */
  private sweepSync(nowMs: number, max: number): boolean {
    const expired = this.st.expiredLeases.all(nowMs, max) as { id: number }[];
    for (const l of expired) this.revokeSync(l.id);
    return expired.length >= max;
  }

  private applyOp(op: TxnOp, rev: number, nowMs: number): { result: TxnOpResult; wrote: boolean } {
    switch (op.type) {
      case 'put': {
        checkKey('txn put', op.key);
        checkString('txn put', 'value', op.value);
        const lease = op.lease ?? 0;
        if (!Number.isSafeInteger(lease) || lease < 0)
          throw badRequest('txn put', `lease must be a lease id or 0, got ${String(lease)}`);
        this.checkLeaseLive(lease, nowMs);
        this.putSync(rev, op.key, op.value, lease);
        return { result: { type: 'put', revision: rev }, wrote: true };
      }
      case 'delete': {
        checkKey('txn delete', op.key);
        const row = this.st.getKv.get(op.key) as KvRow | undefined;
        const deleted = row ? this.deleteRowsSync(rev, [row]) : 0;
        return { result: { type: 'delete', deleted }, wrote: deleted > 0 };
      }
      case 'deletePrefix': {
        checkString('txn deletePrefix', 'prefix', op.prefix);
        const deleted = this.deleteRowsSync(rev, this.rangeRows(op.prefix, 0));
        return { result: { type: 'delete', deleted }, wrote: deleted > 0 };
      }
      case 'get': {
        checkKey('txn get', op.key);
        const row = this.st.getKv.get(op.key) as KvRow | undefined;
        return { result: { type: 'get', kv: row ? toKv(row) : undefined }, wrote: false };
      }
      case 'range': {
        checkString('txn range', 'prefix', op.prefix);
        const limit = checkLimit('txn range', op.limit);
        const rows = this.rangeRows(op.prefix, limit > 0 ? limit + 1 : 0);
        const more = limit > 0 && rows.length > limit;
        if (more) rows.pop();
        return { result: { type: 'range', kvs: rows.map(toKv), more }, wrote: false };
      }
      default:
        throw badRequest('txn', `unknown op type ${JSON.stringify((op as { type?: unknown }).type)}`);
    }
  }

  private txnSync(req: TxnRequest, nowMs: number): TxnResult {
    const current = this.meta().revision;
    const rev = current + 1;
    const succeeded = req.compare.every((c) => {
      checkKey('txn compare', c.key);
      return compareOk(c, this.st.getKv.get(c.key) as KvRow | undefined);
    });
    const ops = succeeded ? req.success : (req.failure ?? []);
    let wrote = false;
    const results: TxnOpResult[] = [];
    for (const op of ops) {
      const r = this.applyOp(op, rev, nowMs);
      wrote ||= r.wrote;
      results.push(r.result);
    }
    if (wrote) this.st.setRevision.run(rev);
    return { succeeded, revision: wrote ? rev : current, results };
  }

  // ---- Store: key-value ---------------------------------------------------------------------

  get(key: string): Promise<KeyValue | undefined> {
    return this.run('get', () => {
      checkKey('get', key);
      const row = this.st.getKv.get(key) as KvRow | undefined;
      return row ? toKv(row) : undefined;
    });
  }

  range(prefix: string, opts: { limit?: number; fromKey?: string } = {}): Promise<RangeResult> {
    return this.run('range', () => {
      checkString('range', 'prefix', prefix);
      const limit = checkLimit('range', opts.limit);
      if (opts.fromKey !== undefined) checkString('range', 'fromKey', opts.fromKey);
      return this.read(() => {
        const rows = this.rangeRows(prefix, limit > 0 ? limit + 1 : 0, opts.fromKey);
        const more = limit > 0 && rows.length > limit;
        if (more) rows.pop();
        return { kvs: rows.map(toKv), more, revision: this.meta().revision };
      });
    });
  }

  async put(key: string, value: string, opts: { lease?: number } = {}): Promise<{ revision: number }> {
    const r = await this.txn({ compare: [], success: [{ type: 'put', key, value, lease: opts.lease }] });
    return { revision: r.revision };
  }

  async delete(key: string): Promise<{ revision: number; deleted: number }> {
    const r = await this.txn({ compare: [], success: [{ type: 'delete', key }] });
    const d = r.results[0];
    invariant(d?.type === 'delete', 'delete result');
    return { revision: r.revision, deleted: d.deleted };
  }

  async deletePrefix(prefix: string): Promise<{ revision: number; deleted: number }> {
    const r = await this.txn({ compare: [], success: [{ type: 'deletePrefix', prefix }] });
    const d = r.results[0];
    invariant(d?.type === 'delete', 'deletePrefix result');
    return { revision: r.revision, deleted: d.deleted };
  }

  txn(req: TxnRequest): Promise<TxnResult> {
    return this.run('txn', () => {
      if (!req || !Array.isArray(req.compare) || !Array.isArray(req.success))
        throw badRequest('txn', 'request needs compare[] and success[] (failure[] optional)');
      if (req.failure !== undefined && !Array.isArray(req.failure))
        throw badRequest('txn', 'failure must be an array of ops');
      checkBranch('txn success', req.success);
      checkBranch('txn failure', req.failure ?? []);
      const writes = [...req.success, ...(req.failure ?? [])].some(
        (o) => o.type !== 'get' && o.type !== 'range',
      );
      if (writes) return this.write((nowMs) => this.txnSync(req, nowMs));
      return this.read(() => this.txnSync(req, Date.now()));
    });
  }

  revision(): Promise<number> {
    return this.run('revision', () => this.meta().revision);
  }

  // ---- Store: leases ------------------------------------------------------------------------

  leaseGrant(ttlMs: number): Promise<number> {
    return this.run('leaseGrant', () => {
      if (typeof ttlMs !== 'number' || !Number.isFinite(ttlMs) || ttlMs <= 0 || ttlMs > leaseTtlMsMax)
        throw badRequest('leaseGrant', `ttlMs must be between 1 and ${leaseTtlMsMax}, got ${String(ttlMs)}`);
      const ttl = Math.ceil(ttlMs);
      return this.write((nowMs) => Number(this.st.insertLease.run(ttl, nowMs + ttl).lastInsertRowid));
    });
  }

  private leaseWrite<T>(id: number, what: string, fn: (l: LeaseRow, nowMs: number) => T): Promise<T> {
    return this.run(
      what,
      () => {
        if (typeof id !== 'number' || !Number.isSafeInteger(id) || id <= 0)
          throw this.leaseNotFound(id, what);
        const out: LeaseOutcome<T> = this.write((nowMs) => {
          const l = this.st.getLease.get(id) as LeaseRow | undefined;
          if (!l || l.expires_at_ms <= nowMs) {
            if (l) this.revokeSync(l.id); // expired: revoke it now, as the sweeper would
            return { ok: false };
          }
          return { ok: true, value: fn(l, nowMs) };
        });
        if (!out.ok) throw this.leaseNotFound(id, what);
        return out.value;
      },
      true,
    );
  }

  leaseKeepAlive(id: number): Promise<{ remainingTtlMs: number }> {
    return this.leaseWrite(id, 'leaseKeepAlive', (l, nowMs) => {
      this.st.setLeaseExpiry.run(nowMs + l.ttl_ms, l.id);
      return { remainingTtlMs: l.ttl_ms };
    });
  }

  leaseRevoke(id: number): Promise<void> {
    return this.leaseWrite(id, 'leaseRevoke', (l) => this.revokeSync(l.id));
  }

  leaseInfo(id: number): Promise<LeaseInfo | undefined> {
    return this.run('leaseInfo', () =>
      this.read(() => {
        const l = this.st.getLease.get(id) as LeaseRow | undefined;
        const nowMs = Date.now();
        if (!l || l.expires_at_ms <= nowMs) return undefined;
        const keys = (this.st.keysOfLease.all(id) as KvRow[]).map((r) => r.key);
        return { id, grantedTtlMs: l.ttl_ms, remainingTtlMs: l.expires_at_ms - nowMs, keys };
      }),
    );
  }

  // ---- Store: watch and compaction ----------------------------------------------------------

  watch(prefix: string, opts: WatchOptions): Promise<Watcher> {
    return this.run('watch', () => {
      checkString('watch', 'prefix', prefix);
      const sr = opts.startRevision ?? 0;
      if (!Number.isSafeInteger(sr) || sr < 0)
        throw badRequest('watch', `startRevision must be a non-negative integer, got ${String(sr)}`);
      const m = this.meta();
      const w: WatchState = {
        prefix,
        end: prefixEnd(prefix),
        nextRev: sr === 0 ? m.revision + 1 : sr,
        opts,
        done: false,
      };
      if (w.nextRev < m.compact_rev) {
        const err = this.compactedError(w.nextRev, m.compact_rev);
        setImmediate(() => this.endWatch(w, err));
      } else {
        this.watchers.add(w);
        this.ensurePolling();
        if (w.nextRev <= m.revision) this.schedulePoll();
      }
      return {
        cancel: async () => {
          w.done = true;
          this.watchers.delete(w);
          this.stopPollingIfIdle();
        },
      };
    });
  }

  private compactedError(fromRev: number, compactRev: number): StoreError {
    return new StoreError(
      'CORRAL_STORE_COMPACTED',
      `${this.url}: watch from revision ${fromRev}: history before revision ${compactRev} was compacted`,
      `re-read the current state (range) and watch from its revision + 1 (>= ${compactRev})`,
      compactRev,
    );
  }

  private endWatch(w: WatchState, err: StoreError): void {
    if (w.done) return;
    w.done = true;
    this.watchers.delete(w);
    this.stopPollingIfIdle();
    w.opts.onError(err);
  }

  private ensurePolling(): void {
    if (this.pollTimer) return;
    this.pollTimer = setInterval(() => this.poll(), watchPollIntervalMs);
    if (this.path !== ':memory:' && !this.notifyWatch)
      try {
        const w = watch(notifyPath(this.path), { persistent: false }, () => this.schedulePoll());
        w.on('error', () => {
          w.close();
          if (this.notifyWatch === w) this.notifyWatch = undefined; // polling goes on
        });
        this.notifyWatch = w;
      } catch {
        // no notify file (no writer could create it), no inotify, or its limit reached: polling alone
      }
  }

  private stopPollingIfIdle(): void {
    if (this.watchers.size === 0 && this.pollTimer) {
      clearInterval(this.pollTimer);
      this.pollTimer = undefined;
      this.notifyWatch?.close();
      this.notifyWatch = undefined;
    }
  }

  /** wake the watchers of other processes: one byte written to `<file>-notify` (inotify IN_MODIFY) */
  private notifyOthers(): void {
    if (this.notifyFd === undefined) return;
    try {
      writeSync(this.notifyFd, notifyByte, 0, 1, 0);
    } catch {
      // best effort: the others poll anyway
    }
  }

  private schedulePoll(): void {
    if (this.pollScheduled || this.closed || this.watchers.size === 0) return;
    this.pollScheduled = true;
    setImmediate(() => {
      this.pollScheduled = false;
      this.poll();
    });
  }

  private nudgeWatchers(): void {
    for (const s of instancesByFile.get(this.fileKey) ?? []) s.schedulePoll();
  }

  private poll(): void {
    if (this.closed || this.watchers.size === 0) return;
    let head: number;
    try {
      head = this.meta().revision; // the cheap check: nothing new, nothing to read
    } catch {
      return; // busy or damaged: the next poll (or the next call) tells
    }
    let behind = false;
    for (const w of [...this.watchers]) {
      if (w.done || w.nextRev > head) continue;
      let batches: WatchEvent[][];
      try {
        const b = this.read(() => this.readWatchBatch(w));
        if (b instanceof StoreError) {
          this.endWatch(w, b);
          continue;
        }
        batches = b.batches;
        behind ||= b.behind;
      } catch (e) {
        if (isBusy(e)) continue; // retried on the next poll
        const err = this.mapError(e, 'watch');
        this.endWatch(
          w,
          err instanceof StoreError
            ? err
            : new StoreError('CORRAL_STORE_UNAVAILABLE', `${this.url}: watch: ${String(e)}`),
        );
        continue;
      }
      for (const events of batches) {
        if (w.done || this.closed) break;
        try {
          w.opts.onEvents(events);
        } catch (e) {
          this.endWatch(
            w,
            badRequest(`${this.url}: watch ${JSON.stringify(w.prefix)}`, `onEvents threw: ${String(e)}`),
          );
        }
      }
    }
    if (behind) this.schedulePoll();
  }

  /** the next revisions for one watcher, grouped per revision; advances w.nextRev */
  private readWatchBatch(w: WatchState): StoreError | { batches: WatchEvent[][]; behind: boolean } {
    const m = this.meta();
    if (w.nextRev > m.revision) return { batches: [], behind: false };
    if (w.nextRev < m.compact_rev) return this.compactedError(w.nextRev, m.compact_rev);
    let upto = Math.min(m.revision, w.nextRev + watchRevisionsPerPollMax - 1);
    const logRows = (from: number, to: number, limit: number) =>
      (w.end === undefined
        ? this.st.logOpen.all(from, to, w.prefix, limit)
        : this.st.logBounded.all(from, to, w.prefix, w.end, limit)) as LogRow[];
    let rows = logRows(w.nextRev, upto, watchRowsPerPollMax + 1);
    if (rows.length > watchRowsPerPollMax) {
      // cut at a revision boundary: the last revision read may be incomplete
      const firstRev = rows[0]?.rev ?? w.nextRev;
      const lastRev = rows[rows.length - 1]?.rev ?? upto;
      if (firstRev === lastRev) {
        rows = logRows(firstRev, firstRev, -1); // one revision is delivered whole, however big
        upto = firstRev;
      } else {
        rows = rows.filter((r) => r.rev < lastRev);
        upto = lastRev - 1;
      }
    }
    const batches: WatchEvent[][] = [];
    let lastRev = -1;
    for (const r of rows) {
      if (r.rev !== lastRev) batches.push([]);
      lastRev = r.rev;
      const kv: KeyValue =
        r.type === 'put'
          ? toKv({ ...r, mod_rev: r.rev })
          : { key: r.key, value: '', createRevision: 0, modRevision: r.rev, version: 0, lease: 0 };
      batches[batches.length - 1]?.push({ type: r.type, kv, revision: r.rev });
    }
    w.nextRev = upto + 1;
    return { batches, behind: upto < m.revision };
  }

  compact(revision: number): Promise<void> {
    return this.run('compact', () => {
      if (!Number.isSafeInteger(revision) || revision < 0)
        throw badRequest('compact', `revision must be a non-negative integer, got ${String(revision)}`);
      this.write(() => {
        const m = this.meta();
        if (revision > m.revision)
          throw badRequest('compact', `revision ${revision} is in the future (current ${m.revision})`);
        this.compactSync(revision, m);
      });
    });
  }

  private compactSync(revision: number, m: MetaRow): void {
    if (revision <= m.compact_rev) return; // already compacted that far: nothing to do
    this.st.deleteLogBefore.run(revision);
    this.st.setCompactRev.run(revision);
  }

  // ---- background ---------------------------------------------------------------------------

  private sweepTick(): void {
    if (this.closed) return;
    try {
      const nowMs = Date.now();
      const due = this.st.anyExpired.get(nowMs) !== undefined;
      const m = this.meta();
      const slack = Math.min(autoCompactSlackRevisions, Math.ceil(this.retainRevisions / 10));
      const compactDue = m.revision - m.compact_rev > this.retainRevisions + slack;
      if (!due && !compactDue) return;
      this.write(() => {
        const now = this.meta();
        if (compactDue) this.compactSync(now.revision - this.retainRevisions, now);
      });
    } catch {
      // busy or a transient I/O error: the next tick tries again; real damage shows up on the
      // next call a user makes, with its own clear error.
    }
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    clearInterval(this.sweepTimer);
    this.sweepTimer = undefined;
    if (this.pollTimer) clearInterval(this.pollTimer);
    this.pollTimer = undefined;
    this.notifyWatch?.close();
    this.notifyWatch = undefined;
    if (this.notifyFd !== undefined)
      try {
        closeSync(this.notifyFd);
      } catch {
        // already closed
      }
    this.notifyFd = undefined;
    const set = instancesByFile.get(this.fileKey);
    set?.delete(this);
    if (set?.size === 0) instancesByFile.delete(this.fileKey);
    const ws = [...this.watchers];
    this.watchers.clear();
    for (const w of ws) {
      if (w.done) continue;
      w.done = true;
      w.opts.onError(new StoreError('CORRAL_STORE_CLOSED', `${this.url}: store closed while watching`));
    }
    try {
      this.db.close();
    } catch {
      // closing a damaged file can fail; it is closed either way
    }
  }
}

function prepareStatements(db: Database.Database) {
  const cols = 'key, value, create_rev, mod_rev, version, lease';
  const logCols = 'rev, key, type, value, create_rev, version, lease';
  return {
    meta: db.prepare('SELECT revision, compact_rev FROM meta WHERE id = 1'),
    setRevision: db.prepare('UPDATE meta SET revision = ? WHERE id = 1'),
    setCompactRev: db.prepare('UPDATE meta SET compact_rev = ? WHERE id = 1'),
    getKv: db.prepare(`SELECT ${cols} FROM kv WHERE key = ?`),
    upsertKv: db.prepare(
      `INSERT INTO kv (${cols}) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (key) DO UPDATE SET
       value = excluded.value, create_rev = excluded.create_rev, mod_rev = excluded.mod_rev,
       version = excluded.version, lease = excluded.lease`,
    ),
    deleteKv: db.prepare('DELETE FROM kv WHERE key = ?'),
    rangeOpen: db.prepare(`SELECT ${cols} FROM kv WHERE key >= ? ORDER BY key LIMIT ?`),
    rangeBounded: db.prepare(`SELECT ${cols} FROM kv WHERE key >= ? AND key < ? ORDER BY key LIMIT ?`),
    keysOfLease: db.prepare(`SELECT ${cols} FROM kv WHERE lease = ? AND lease <> 0 ORDER BY key`),
    logInsert: db.prepare(`INSERT INTO log (${logCols}) VALUES (?, ?, ?, ?, ?, ?, ?)`),
    logOpen: db.prepare(
      `SELECT ${logCols} FROM log WHERE rev >= ? AND rev <= ? AND key >= ? ORDER BY rev, id LIMIT ?`,
    ),
    logBounded: db.prepare(
      `SELECT ${logCols} FROM log WHERE rev >= ? AND rev <= ? AND key >= ? AND key < ? ORDER BY rev, id LIMIT ?`,
    ),
    deleteLogBefore: db.prepare('DELETE FROM log WHERE rev < ?'),
    insertLease: db.prepare('INSERT INTO leases (ttl_ms, expires_at_ms) VALUES (?, ?)'),
    getLease: db.prepare('SELECT id, ttl_ms, expires_at_ms FROM leases WHERE id = ?'),
    setLeaseExpiry: db.prepare('UPDATE leases SET expires_at_ms = ? WHERE id = ?'),
    deleteLease: db.prepare('DELETE FROM leases WHERE id = ?'),
    anyExpired: db.prepare('SELECT 1 AS due FROM leases WHERE expires_at_ms <= ? LIMIT 1'),
    expiredLeases: db.prepare('SELECT id FROM leases WHERE expires_at_ms <= ? ORDER BY id LIMIT ?'),
  };
}

function corruptError(path: string, detail: string): StoreError {
  return new StoreError(
    'CORRAL_STORE_CORRUPT',
    `sqlite:${path}: the file is not a usable Corral store (${detail})`,
    `if it is a damaged store, restore it from a backup; otherwise move ${path} aside (or point the store URL ` +
      'at another file) and Corral creates a fresh store there',
  );
}

export interface SqliteStoreOptions extends StoreOptions {
  /** revisions of watch history kept by automatic compaction (tests lower it) */
  logRetainRevisions?: number;
  /**
   * 'full' (default): every acknowledged write survives power loss. 'normal': one fsync per WAL
   * checkpoint instead of per commit (about 20x faster writes here); a power loss may drop the
   * last acknowledged writes, a process crash never does. For benchmarks and throw-away stores.
   */
  synchronous?: 'full' | 'normal';
}

/** open (creating if needed) the store file; path ':memory:' gives a private in-memory store */
export async function openSqliteStore(path: string, opts: SqliteStoreOptions = {}): Promise<Store> {
  const opTimeoutMs = opts.opTimeoutMs ?? storeOpTimeoutMsDefault;
  if (!Number.isSafeInteger(opTimeoutMs) || opTimeoutMs <= 0)
    throw new StoreError(
      'CORRAL_STORE_BAD_REQUEST',
      `sqlite:${path}: opTimeoutMs must be a positive integer (ms), got ${String(opTimeoutMs)}`,
    );
  const retain = opts.logRetainRevisions ?? logRetainRevisions;
  if (!Number.isSafeInteger(retain) || retain < 1)
    throw new StoreError(
      'CORRAL_STORE_BAD_REQUEST',
      `sqlite:${path}: logRetainRevisions must be a positive integer, got ${String(retain)}`,
    );
  const memory = path === ':memory:';
  const abs = memory ? path : resolve(path);
  if (!memory) checkPlace(abs);
  const deadlineMs = Date.now() + opTimeoutMs;
  let db: Database.Database | undefined;
  for (;;) {
    try {
      db ??= new Database(abs, { timeout: Math.min(sqliteBusyTimeoutMsMax, opTimeoutMs) });
      initDb(db, abs, memory, opts.synchronous === 'normal' ? 'NORMAL' : 'FULL');
      return new SqliteStore(abs, db, opTimeoutMs, retain);
    } catch (e) {
      if (isBusy(e) && Date.now() < deadlineMs) {
        await sleep(1 + Math.random() * busyRetryDelayMsMax);
        continue;
      }
      try {
        db?.close();
      } catch {
        // already unusable
      }
      throw openError(e, abs, opTimeoutMs);
    }
  }
}

function checkPlace(abs: string): void {
  const dir = dirname(abs);
  if (!existsSync(dir) || !statSync(dir).isDirectory())
    throw new StoreError(
      'CORRAL_STORE_UNAVAILABLE',
      `sqlite:${abs}: directory ${dir} does not exist`,
      `create it (mkdir -p ${dir}) or point the store URL at a file in an existing directory`,
    );
  if (existsSync(abs) && !statSync(abs).isFile())
    throw new StoreError(
      'CORRAL_STORE_UNAVAILABLE',
      `sqlite:${abs}: exists but is not a regular file`,
      'point the store URL at a file (e.g. sqlite:/var/lib/corral/store.db)',
    );
}

function openError(e: unknown, abs: string, opTimeoutMs: number): unknown {
  if (e instanceof StoreError) return e;
  const c = sqliteCode(e);
  const msg = (e as Error)?.message ?? String(e);
  if (c === 'SQLITE_NOTADB' || c.startsWith('SQLITE_CORRUPT')) return corruptError(abs, msg);
  if (isBusy(e))
    return new StoreError(
      'CORRAL_STORE_TIMEOUT',
      `sqlite:${abs}: could not open within ${opTimeoutMs} ms: the file stayed locked`,
      'look for a process holding the store file in a long transaction',
    );
  return new StoreError(
    'CORRAL_STORE_UNAVAILABLE',
    `sqlite:${abs}: cannot open: ${msg}${c ? ` (${c})` : ''}`,
    'check the path, its permissions and the free space on its file system',
  );
}

function initDb(db: Database.Database, abs: string, memory: boolean, synchronous: 'FULL' | 'NORMAL'): void {
  if (!memory) {
    const mode = db.pragma('journal_mode = WAL', { simple: true });
    if (String(mode).toLowerCase() !== 'wal')
      throw new StoreError(
        'CORRAL_STORE_UNAVAILABLE',
        `sqlite:${abs}: cannot switch the file to WAL mode (got ${String(mode)})`,
        'the store needs a local file system that supports shared memory (not NFS)',
      );
  }
  db.pragma(`synchronous = ${synchronous}`);
  // an existing store needs no write lock to open
  if (Number(db.pragma('user_version', { simple: true })) === schemaVersion) return;
  db.transaction(() => {
    const version = Number(db.pragma('user_version', { simple: true }));
    if (version === schemaVersion) return;
    if (version > schemaVersion)
      throw new StoreError(
        'CORRAL_STORE_CORRUPT',
        `sqlite:${abs}: store schema version ${version} is newer than this Corral understands (${schemaVersion})`,
        'upgrade Corral on this host',
      );
    const tables = db.prepare("SELECT name FROM sqlite_master WHERE type = 'table'").all() as {
      name: string;
    }[];
    if (tables.length > 0)
      throw corruptError(
        abs,
        `a SQLite database of another program: tables ${tables.map((t) => t.name).join(', ')}`,
      );
    db.exec(schemaSql);
  }).immediate();
}
