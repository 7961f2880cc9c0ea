// One consistent read of the cluster's state (one txn of ranges = one revision), parsed
// into the core's records. Used by the manager, the CLI and the API. Stored values that
// fail to parse are reported, never fatal: a corrupt record must not stop the manager.
import type { Store, KeyValue } from '../store/types.js';
import { keys as keysOf } from '../core/keys.js';
import { ResourceSpec } from '../core/spec.js';
import {
  defaultFlags,
  type Alive,
  type AgentStatus,
  type CleanupRequest,
  type ClusterFlags,
  type FenceRecord,
  type NodeAdmin,
  type NodeRegistration,
  type NodeStatus,
  type ResourceRecord,
  type NodeView,
  type ResourceView,
} from '../core/types.js';

export interface LeaderRecord {
  node: string;
  term: number;
  sinceMs: number;
}

export interface Snapshot {
  revision: number;
  flags: ClusterFlags;
  /** modRevision of the flags key, 0 when absent */
  flagsModRevision: number;
  /** lease: the lease the leader key is bound to */
  leader?: LeaderRecord & { modRevision: number; lease: number };
  term: number;
  termModRevision: number;
  nodes: Map<string, NodeView>;
  resources: Map<string, ResourceView>;
  /** modRevision of every key a decision may depend on (assign/, nstate/, fence/, alive/, status/), 0 when absent */
  modRevisions: Map<string, number>;
  /** records that failed to parse: key and why */
  corrupt: { key: string; error: string }[];
}

/** the key sections (under /corral/<cluster>/) one snapshot reads, besides flags, leader and term */
export const snapshotSections = [
  'nodes',
  'alive',
  'nodeadmin',
  'nstate',
  'fence',
  'resources',
  'assign',
  'status',
  'requests/cleanup',
] as const;
const sections = snapshotSections;

/**
 * Parsed records by the KeyValue object they were parsed from. A caller that passes the same
 * objects again (the API's in-memory mirror keeps one per key until the key changes) parses only
 * the keys that changed: during a failover that is a few of hundreds, and the resource specs'
 * schema check is most of a snapshot's cost. Records are shared between snapshots: read only.
 */
export type SnapshotParseMemo = WeakMap<KeyValue, { v?: unknown; error?: string }>;

/** `store` needs only txn (ranges and gets): the API's status view passes an in-memory mirror. */
export async function loadSnapshot(
  store: Pick<Store, 'txn'>,
  cluster: string,
  memo?: SnapshotParseMemo,
): Promise<Snapshot> {
  const k = keysOf(cluster);
  const res = await store.txn({
    compare: [],
    success: [
      ...sections.map((s) => ({ type: 'range' as const, prefix: `${k.prefix}${s}/` })),
      { type: 'get', key: k.flags },
      { type: 'get', key: k.leader },
      { type: 'get', key: k.term },
    ],
  });
  const corrupt: Snapshot['corrupt'] = [];
  const memoized = <T>(kv: KeyValue, f: () => { v?: unknown; error?: string }): T | undefined => {
    let m = memo?.get(kv);
    if (!m) {
      m = f();
      memo?.set(kv, m);
    }
    if (m.error !== undefined) corrupt.push({ key: kv.key, error: m.error });
    return m.v as T | undefined;
  };
  const parse = <T>(kv: KeyValue): T | undefined =>
    memoized<T>(kv, () => {
      try {
        return { v: JSON.parse(kv.value) as unknown };
      } catch (e) {
        return { error: (e as Error).message };
      }
    });
  const ranges = res.results.slice(0, sections.length).map((r) => (r.type === 'range' ? r.kvs : []));
  const get = (i: number): KeyValue | undefined => {
    const r = res.results[sections.length + i];
    return r?.type === 'get' ? r.kv : undefined;
  };
  const nodes = new Map<string, NodeView>();
  const node = (name: string): NodeView => {
    let n = nodes.get(name);
    if (!n) {
      n = { name, admin: { maintenance: false }, fenceDevices: 0 };
      nodes.set(name, n);
    }
    return n;
  };
  const resources = new Map<string, ResourceView>();
  const resource = (id: string): ResourceView => {
    let r = resources.get(id);
    if (!r) {
      r = { id, statuses: new Map() };
      resources.set(id, r);
    }
    return r;
  };
  const modRevisions = new Map<string, number>();
  const tail = (kv: KeyValue, section: string) => kv.key.slice(`${k.prefix}${section}/`.length);
  const [regs, alives, admins, nstates, fences, specs, assigns, statuses, cleanups] = ranges as KeyValue[][];
  for (const kv of regs ?? []) {
    const v = parse<NodeRegistration>(kv);
    if (v) node(tail(kv, 'nodes')).reg = v;
  }
  for (const kv of alives ?? []) {
    modRevisions.set(kv.key, kv.modRevision);
    const v = parse<Alive>(kv);
    if (v) node(tail(kv, 'alive')).alive = v;
  }
  for (const kv of admins ?? []) {
    const v = parse<NodeAdmin>(kv);
    if (v) node(tail(kv, 'nodeadmin')).admin = v;
  }
  for (const kv of nstates ?? []) {
    modRevisions.set(kv.key, kv.modRevision);
    const v = parse<NodeStatus>(kv);
    if (v) node(tail(kv, 'nstate')).status = v;
  }
  for (const kv of fences ?? []) {
    modRevisions.set(kv.key, kv.modRevision);
    const v = parse<FenceRecord>(kv);
    if (v) node(tail(kv, 'fence')).fence = v;
  }
  for (const kv of specs ?? []) {
    const spec = memoized<ResourceSpec>(kv, () => {
      let raw: unknown;
      try {
        raw = JSON.parse(kv.value);
      } catch (e) {
        return { error: (e as Error).message };
      }
      const v = ResourceSpec.safeParse(raw);
      return v.success
        ? { v: v.data }
        : { error: v.error.issues.map((i) => `${i.path.join('.')}: ${i.message}`).join('; ') };
    });
    if (spec) resource(tail(kv, 'resources')).spec = spec;
  }
  for (const kv of assigns ?? []) {
    modRevisions.set(kv.key, kv.modRevision);
    const v = parse<ResourceRecord>(kv);
    if (v) resource(tail(kv, 'assign')).rec = v;
  }
  for (const kv of statuses ?? []) {
    modRevisions.set(kv.key, kv.modRevision);
    const [n, id] = tail(kv, 'status').split('/');
    const v = parse<AgentStatus>(kv);
    if (v && n && id) resource(id).statuses.set(n, v);
  }
  for (const kv of cleanups ?? []) {
    const v = parse<CleanupRequest>(kv);
    if (v) resource(tail(kv, 'requests/cleanup')).cleanup = v;
  }
  // statuses alone (a resource undefined and already forgotten) do not make a resource
  for (const [id, r] of resources) if (!r.spec && !r.rec) resources.delete(id);
  const flagsKv = get(0);
  const leaderKv = get(1);
  const termKv = get(2);
  const flags = { ...defaultFlags, ...(flagsKv ? (parse<Partial<ClusterFlags>>(flagsKv) ?? {}) : {}) };
  const leader = leaderKv ? parse<LeaderRecord>(leaderKv) : undefined;
  return {
    revision: res.revision,
    flags,
    flagsModRevision: flagsKv?.modRevision ?? 0,
    leader:
      leader && leaderKv
        ? { ...leader, modRevision: leaderKv.modRevision, lease: leaderKv.lease }
        : undefined,
    term: termKv ? Number(termKv.value) || 0 : 0,
    termModRevision: termKv?.modRevision ?? 0,
    nodes,
    resources,
    modRevisions,
    corrupt,
  };
}
