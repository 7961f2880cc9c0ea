// The data behind `corral status` and `corral node|resource list`: one read of the store
// (answers at once, even mid-failover), shaped for humans and for --json.
import type { Store } from '../store/types.js';
import { loadSnapshot, type Snapshot } from '../manager/load.js';
import type { ClusterEvent, NodeState, ResourceState } from '../core/types.js';
import type { Keys } from '../core/keys.js';

export interface NodeRow {
  name: string;
  state: NodeState | 'never joined';
  reason: string;
  address: string;
  leader: boolean;
  cpus: { used: number; total: number };
  memory: { used: number; total: number };
  resources: number;
  labels: Record<string, string>;
  maintenance: boolean;
  lastFence?: { ok: boolean; device: string; atMs: number; error?: string };
}

export interface ResourceRow {
  id: string;
  kind: 'process' | 'vm';
  node: string | null;
  state: ResourceState;
  desired: 'started' | 'stopped' | 'undefined';
  reason: string;
  epoch: number;
  priority: number;
  failures: number;
  sinceMs: number;
  observed?: { state: string; reason: string; epoch: number };
}

export interface StatusData {
  cluster: string;
  revision: number;
  nowMs: number;
  leader: { node: string; term: number } | null;
  flags: Snapshot['flags'];
  nodes: NodeRow[];
  resources: ResourceRow[];
  events: ClusterEvent[];
}

export async function readStatus(
  store: Store,
  cluster: string,
  k: Keys,
  configNodes: string[],
  eventsMax = 8,
): Promise<StatusData> {
  const snap = await loadSnapshot(store, cluster);
  const events = await readEvents(store, k, eventsMax);
  return statusFromSnapshot(snap, cluster, configNodes, events, Date.now());
}

/** The status rows of one snapshot (pure: the API's status view builds it from its mirror). */
export function statusFromSnapshot(
  snap: Snapshot,
  cluster: string,
  configNodes: string[],
  events: ClusterEvent[],
  nowMs: number,
): StatusData {
  const used = new Map<string, { cpus: number; memory: number; n: number }>();
  const resources: ResourceRow[] = [];
  for (const r of snap.resources.values()) {
    const rec = r.rec;
    const node = rec?.node ?? null;
    if (node && rec && rec.state !== 'stopped' && rec.state !== 'failed' && r.spec) {
      const u = used.get(node) ?? { cpus: 0, memory: 0, n: 0 };
      used.set(node, { cpus: u.cpus + r.spec.cpus, memory: u.memory + r.spec.memory, n: u.n + 1 });
    }
    const obs = node ? r.statuses.get(node) : undefined;
    resources.push({
      id: r.id,
      kind: r.spec?.kind ?? 'process',
      node: rec?.state === 'stopped' ? null : node,
      state: rec?.state ?? 'stopped',
      desired: r.spec?.desired ?? 'undefined',
      reason: rec?.reason ?? 'not yet seen by the manager',
      epoch: rec?.epoch ?? 0,
      priority: r.spec?.priority ?? 0,
      failures: rec?.failures.length ?? 0,
      sinceMs: rec?.sinceMs ?? 0,
      observed: obs ? { state: obs.state, reason: obs.reason, epoch: obs.epoch } : undefined,
    });
  }
  resources.sort((a, b) => (a.id < b.id ? -1 : 1));
  const names = new Set([...configNodes, ...snap.nodes.keys()]);
  const nodes: NodeRow[] = [...names].sort().map((name) => {
    const n = snap.nodes.get(name);
    const u = used.get(name) ?? { cpus: 0, memory: 0, n: 0 };
    return {
      name,
      state: n?.status?.state ?? (n?.alive ? 'online' : 'never joined'),
      reason: n?.status?.reason ?? '',
      address: n?.reg?.address ?? '',
      leader: snap.leader?.node === name,
      cpus: { used: u.cpus, total: n?.reg?.capacity.cpus ?? 0 },
      memory: { used: u.memory, total: n?.reg?.capacity.memory ?? 0 },
      resources: u.n,
      labels: n?.reg?.labels ?? {},
      maintenance: n?.admin.maintenance ?? false,
      lastFence: n?.fence
        ? { ok: n.fence.ok, device: n.fence.device, atMs: n.fence.atMs, error: n.fence.error }
        : undefined,
    };
  });
  return {
    cluster,
    revision: snap.revision,
    nowMs,
    leader: snap.leader ? { node: snap.leader.node, term: snap.leader.term } : null,
    flags: snap.flags,
    nodes,
    resources,
    events,
  };
}

/** The last `limit` events, oldest first. */
export async function readEvents(store: Store, k: Keys, limit: number): Promise<ClusterEvent[]> {
  const all = await store.range(k.events);
  const out: ClusterEvent[] = [];
  for (const kv of all.kvs.slice(-limit)) {
    try {
      out.push(JSON.parse(kv.value) as ClusterEvent);
    } catch {
      // an unreadable event is skipped
    }
  }
  return out;
}
