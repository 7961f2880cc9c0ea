// Placement: which node a resource should run on. Pure: capacity (cpus, memory), node
// labels, affinity and anti-affinity, stickiness and the operator's preferred node.
// Callers place resources in priority order and charge each placement to a Usage, so a
// high-priority resource takes capacity before a low-priority one when it is short.
import type { ClusterView, Capacity } from './types.js';
import type { ResourceSpec } from './spec.js';

export type Usage = Map<string, Capacity>;

/** Capacity used on each node by resources that hold (or are about to hold) a copy there. */
export function usageOf(view: ClusterView): Usage {
  const used: Usage = new Map();
  for (const r of view.resources.values()) {
    const node = r.rec?.node;
    if (!node || !r.spec || r.rec?.state === 'stopped' || r.rec?.state === 'failed') continue;
    charge(used, node, r.spec);
    // a live migration reserves room on its target too
    const m = r.rec?.migration;
    if (m && m.phase !== 'abort') charge(used, m.target, r.spec);
  }
  return used;
}

export function charge(used: Usage, node: string, spec: ResourceSpec): void {
  const u = used.get(node) ?? { cpus: 0, memory: 0 };
  used.set(node, { cpus: u.cpus + spec.cpus, memory: u.memory + spec.memory });
}

export function release(used: Usage, node: string, spec: ResourceSpec): void {
  const u = used.get(node);
  if (u) used.set(node, { cpus: u.cpus - spec.cpus, memory: u.memory - spec.memory });
}

/** Nodes that can take new work: online (not in maintenance), lease alive and ready. */
export function placeableNodes(view: ClusterView): string[] {
  const out: string[] = [];
  for (const n of view.nodes.values()) {
    if (n.status?.state === 'online' && n.alive?.ready && !n.alive.isolated && n.reg && !n.admin.maintenance)
      out.push(n.name);
  }
  return out.sort();
}

/** Where each resource's copy is (or is going), for affinity rules. */
function locations(view: ClusterView, id: string): string | undefined {
  const rec = view.resources.get(id)?.rec;
  if (!rec || !rec.node || rec.state === 'stopped' || rec.state === 'failed') return undefined;
  return rec.node;
}

export type PlacementResult = { ok: true; node: string; why: string } | { ok: false; why: string };

export interface PlaceOptions {
  /** nodes not to use (the node it failed on, the node it is moving off) */
  avoid?: ReadonlySet<string>;
  /** prefer this node when eligible (stickiness: where it ran before) */
  sticky?: string | null;
}

export function place(
  view: ClusterView,
  spec: ResourceSpec,
  used: Usage,
  opts: PlaceOptions = {},
): PlacementResult {
  const rejected: string[] = [];
  const fits: string[] = [];
  const online = placeableNodes(view);
  if (online.length === 0) return { ok: false, why: 'no node online' };
  // affinity: every placed partner pins the resource to its node
  const pinned = new Set<string>();
  for (const other of spec.affinity) {
    const at = locations(view, other);
    if (at) pinned.add(at);
  }
  if (pinned.size > 1)
    return { ok: false, why: `affinity partners run on different nodes (${[...pinned].join(', ')})` };
  for (const name of online) {
    const node = view.nodes.get(name);
    if (!node?.reg) continue;
    if (opts.avoid?.has(name)) {
      rejected.push(`${name}: avoided`);
      continue;
    }
    const missing = Object.entries(spec.nodeSelector).filter(([k, v]) => node.reg?.labels[k] !== v);
    if (missing.length > 0) {
      rejected.push(`${name}: lacks label ${missing.map(([k, v]) => `${k}=${v}`).join(',')}`);
      continue;
    }
    if (pinned.size === 1 && !pinned.has(name)) {
      rejected.push(`${name}: affinity`);
      continue;
    }
    const anti = antiAffinityClash(view, spec, name);
    if (anti) {
      rejected.push(`${name}: anti-affinity with ${anti}`);
      continue;
    }
    const u = used.get(name) ?? { cpus: 0, memory: 0 };
    const cap = node.reg.capacity;
    if (u.cpus + spec.cpus > cap.cpus + 1e-9 || u.memory + spec.memory > cap.memory) {
      rejected.push(`${name}: capacity (free ${fmt(cap.cpus - u.cpus)} cpus, ${cap.memory - u.memory} MiB)`);
      continue;
    }
    fits.push(name);
  }
  if (fits.length === 0) {
    const capacityOnly = rejected.every((r) => r.includes('capacity') || r.includes('avoided'));
    return { ok: false, why: `${capacityOnly ? 'capacity' : 'constraints'}: ${rejected.join('; ')}` };
  }
  const pick = (n: string, why: string): PlacementResult => ({ ok: true, node: n, why });
  if (spec.preferredNode && fits.includes(spec.preferredNode))
    return pick(spec.preferredNode, 'preferred node');
  if (opts.sticky && fits.includes(opts.sticky)) return pick(opts.sticky, 'sticky');
  // least loaded by memory share, then cpu share, then name: deterministic
  const score = (n: string): number => {
    const cap = view.nodes.get(n)?.reg?.capacity ?? { cpus: 1, memory: 1 };
    const u = used.get(n) ?? { cpus: 0, memory: 0 };
    return (u.memory + spec.memory) / cap.memory + (u.cpus + spec.cpus) / cap.cpus / 1000;
  };
  const best = [...fits].sort((a, b) => score(a) - score(b) || (a < b ? -1 : 1))[0] as string;
  return pick(best, 'least loaded');
}

function antiAffinityClash(view: ClusterView, spec: ResourceSpec, node: string): string | undefined {
  for (const other of spec.antiAffinity) if (locations(view, other) === node) return other;
  // symmetric: others that declared anti-affinity with this resource
  for (const r of view.resources.values()) {
    if (r.id !== spec.id && r.spec?.antiAffinity.includes(spec.id) && locations(view, r.id) === node)
      return r.id;
  }
  return undefined;
}

function fmt(n: number): string {
  return Number.isInteger(n) ? String(n) : n.toFixed(2);
}
