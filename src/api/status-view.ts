// The API's status without reading the store per request: an in-memory mirror of the keys a
// snapshot reads (src/manager/load.ts) and of the last events, loaded once by one consistent read
// and kept current by the hub's store watch. A rebuild from the mirror does no I/O and parses only
// the keys that changed since the last one (a parse memo keyed by the mirror's objects); the JSON
// is serialised once per rebuild and every request gets it with a fresh nowMs. During a storm of
// changes (a failover writes every few ms) GET /api/v1/status rebuilds at most once per
// statusRebuildEveryMs: meanwhile it answers with the last status (its revision says how old,
// never more than statusRebuildEveryMs plus one rebuild) and a timer rebuilds it. So a request
// rarely pays for a rebuild, the API's CPU stays flat, and it never waits for the store.
import type { KeyValue, Store, TxnRequest, TxnResult, WatchEvent } from '../store/types.js';
import type { Keys } from '../core/keys.js';
import type { ClusterEvent } from '../core/types.js';
import { loadSnapshot, snapshotSections, type SnapshotParseMemo } from '../manager/load.js';
import { statusFromSnapshot, type StatusData } from '../cli/status.js';
import type { Hub } from './hub.js';

/** events carried by the status (the last ones, oldest first) */
export const statusEventsMax = 20;
/** watch batches kept while the mirror (re)loads; beyond this the load starts over */
export const statusPendingBatchesMax = 10_000;
/** json() rebuilds at most this often; in between it answers with the last status */
export const statusRebuildEveryMs = 100;

interface Cached {
  data: StatusData;
  /** JSON of data without nowMs, from its second character on (after the opening brace) */
  bodyTail: string;
}

export class StatusView {
  private kvs = new Map<string, KeyValue>();
  private events: { key: string; event: ClusterEvent }[] = [];
  private revision = 0;
  private loaded = false;
  private pending: WatchEvent[][] | undefined;
  private loading: Promise<void> | undefined;
  private cached: Cached | undefined;
  /** the last status built, still served by json() for up to statusRebuildEveryMs after a change */
  private last: Cached | undefined;
  private lastBuiltMs = 0;
  private rebuildTimer: NodeJS.Timeout | undefined;
  private building: Promise<Cached> | undefined;
  /** the mirror's keys in order, for ranges; undefined after a change */
  private sorted: KeyValue[] | undefined;
  private readonly memo: SnapshotParseMemo = new WeakMap();
  private readonly prefixes: string[];
  private readonly singles: Set<string>;

  constructor(
    private store: Store,
    private cluster: string,
    private k: Keys,
    private nodeNames: string[],
    hub: Hub,
    /** ms of each full read of the store (start, after a watch restart) */
    private observeLoad: (ms: number) => void,
    /** ms of each rebuild from the mirror */
    private observeBuild: (ms: number) => void = () => undefined,
  ) {
    this.prefixes = snapshotSections.map((s) => `${k.prefix}${s}/`);
    this.singles = new Set([k.flags, k.leader, k.term]);
    hub.on('kvs', (evs: WatchEvent[]) => this.onBatch(evs));
    hub.on('reset', () => void this.load());
  }

  /** The first full read; call after the hub started watching (its watch covers what follows). */
  async start(): Promise<void> {
    await this.load();
  }

  private mirrored(key: string): boolean {
    return this.singles.has(key) || this.prefixes.some((p) => key.startsWith(p));
  }

  private onBatch(evs: WatchEvent[]): void {
    if (this.pending) {
      if (this.pending.length >= statusPendingBatchesMax) this.pending = [];
      this.pending.push(evs);
      return;
    }
    if (this.loaded) this.apply(evs);
  }

  private apply(evs: WatchEvent[]): void {
    for (const e of evs) {
      if (e.revision <= this.revision) continue; // already in the loaded read
      const key = e.kv.key;
      if (key.startsWith(this.k.events)) this.applyEvent(e);
      else if (this.mirrored(key)) {
        if (e.type === 'put') this.kvs.set(key, e.kv);
        else this.kvs.delete(key);
        this.sorted = undefined;
      }
    }
    const last = evs[evs.length - 1];
    if (last && last.revision > this.revision) {
      this.revision = last.revision;
      this.cached = undefined;
    }
  }

  private applyEvent(e: WatchEvent): void {
    const key = e.kv.key;
    const i = this.events.findIndex((x) => x.key >= key);
    if (e.type === 'delete') {
      if (i >= 0 && this.events[i]!.key === key) this.events.splice(i, 1);
      return;
    }
    let event: ClusterEvent;
    try {
      event = JSON.parse(e.kv.value) as ClusterEvent;
    } catch {
      return; // an unreadable event is skipped, as readEvents does
    }
    if (i < 0) this.events.push({ key, event });
    else if (this.events[i]!.key === key) this.events[i] = { key, event };
    else this.events.splice(i, 0, { key, event });
    if (this.events.length > statusEventsMax) this.events.splice(0, this.events.length - statusEventsMax);
  }

  /** One consistent read of every mirrored key and the last events; watch batches wait meanwhile. */
  private load(): Promise<void> {
    if (this.loading) return this.loading;
    this.pending = [];
    this.loading = (async () => {
      const t0 = performance.now();
      try {
        const res = await this.store.txn({
          compare: [],
          success: [
            ...this.prefixes.map((prefix) => ({ type: 'range' as const, prefix })),
            ...[...this.singles].map((key) => ({ type: 'get' as const, key })),
            { type: 'range', prefix: this.k.events },
          ],
        });
        this.kvs.clear();
        this.sorted = undefined;
        this.events = [];
        const eventsRange = res.results[res.results.length - 1];
        for (const r of res.results.slice(0, -1)) {
          if (r.type === 'range') for (const kv of r.kvs) this.kvs.set(kv.key, kv);
          else if (r.type === 'get' && r.kv) this.kvs.set(r.kv.key, r.kv);
        }
        for (const kv of eventsRange?.type === 'range' ? eventsRange.kvs.slice(-statusEventsMax) : []) {
          try {
            this.events.push({ key: kv.key, event: JSON.parse(kv.value) as ClusterEvent });
          } catch {
            // an unreadable event is skipped
          }
        }
        this.revision = res.revision;
        this.loaded = true;
        this.cached = undefined;
        this.observeLoad(performance.now() - t0);
      } finally {
        const batches = this.pending ?? [];
        this.pending = undefined;
        this.loading = undefined;
        if (this.loaded) for (const b of batches) this.apply(b);
      }
    })();
    return this.loading;
  }

  /** The mirror answers loadSnapshot's one txn (ranges and gets) from memory. */
  private reader(): Pick<Store, 'txn'> {
    return {
      txn: (req: TxnRequest): Promise<TxnResult> => {
        const sorted = (this.sorted ??= [...this.kvs.values()].sort((a, b) =>
          a.key < b.key ? -1 : a.key > b.key ? 1 : 0,
        ));
        const results = req.success.map((op) => {
          if (op.type === 'range')
            return {
              type: 'range' as const,
              kvs: sorted.filter((kv) => kv.key.startsWith(op.prefix)),
              more: false,
            };
          if (op.type === 'get') return { type: 'get' as const, kv: this.kvs.get(op.key) };
          throw new Error(`status view: ${op.type} is not a read`);
        });
        return Promise.resolve({ succeeded: true, revision: this.revision, results });
      },
    };
  }

  private async build(): Promise<Cached> {
    if (!this.loaded) await this.load();
    const t0 = performance.now();
    const revision = this.revision;
    const snap = await loadSnapshot(this.reader(), this.cluster, this.memo);
    const data = statusFromSnapshot(
      snap,
      this.cluster,
      this.nodeNames,
      this.events.map((e) => e.event),
      Date.now(),
    );
    const { nowMs: _now, ...rest } = data;
    const c: Cached = { data, bodyTail: JSON.stringify(rest).slice(1) };
    // a batch applied meanwhile (none can: no await above does I/O) would have cleared the cache
    if (this.revision === revision) this.cached = c;
    this.last = c;
    this.lastBuiltMs = performance.now();
    this.observeBuild(this.lastBuiltMs - t0);
    return c;
  }

  private current(): Promise<Cached> {
    if (this.cached) return Promise.resolve(this.cached);
    this.building ??= this.build().finally(() => (this.building = undefined));
    return this.building;
  }

  async status(): Promise<StatusData> {
    const c = await this.current();
    return { ...c.data, nowMs: Date.now() };
  }

  /**
   * The status as JSON, serialised once per rebuild. After a change it is the last one built for
   * up to statusRebuildEveryMs; a timer rebuilds it then (status() always rebuilds after a change).
   */
  async json(): Promise<string> {
    let c = this.cached ?? this.last;
    if (!this.cached && c && performance.now() - this.lastBuiltMs < statusRebuildEveryMs) {
      this.rebuildTimer ??= setTimeout(
        () => {
          this.rebuildTimer = undefined;
          void this.current().catch(() => undefined);
        },
        Math.max(0, this.lastBuiltMs + statusRebuildEveryMs - performance.now()),
      );
      this.rebuildTimer.unref();
    } else c = await this.current();
    return c.bodyTail === '}' ? `{"nowMs":${Date.now()}}` : `{"nowMs":${Date.now()},${c.bodyTail}`;
  }
}
