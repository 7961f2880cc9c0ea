// The store writes behind every operator action, shared by the API and the CLI's store
// client: one place decides what "start", "move" or "maintenance on" writes, and every
// mutation leaves an event naming who asked.
import type { Store } from '../store/types.js';
import type { Keys } from '../core/keys.js';
import { ResourceSpec, resourceIdPattern } from '../core/spec.js';
import type { ClusterEvent, ClusterFlags, NodeAdmin } from '../core/types.js';
import { defaultFlags } from '../core/types.js';
import { ApiError } from './errors.js';

/** read-modify-write attempts before giving up on a record that keeps changing */
export const casAttemptsMax = 10;

export interface OpsContext {
  store: Store;
  k: Keys;
  /** who asks, e.g. 'token:alice' or 'operator@root' */
  by: string;
  /** node names in the config (to reject moves to unknown nodes) */
  nodeNames: string[];
}

let seq = 0;
export async function writeEvent(
  c: OpsContext,
  kind: ClusterEvent['kind'],
  object: string,
  action: string,
  message: string,
): Promise<ClusterEvent> {
  const e: ClusterEvent = { atMs: Date.now(), kind, object, action, message, by: c.by };
  await c.store.put(c.k.event(e.atMs, `o.${process.pid}`, ++seq), JSON.stringify(e));
  return e;
}

export function checkResourceId(id: string): void {
  if (!resourceIdPattern.test(id))
    throw new ApiError(
      'CORRAL_API_BAD_REQUEST',
      `"${id}" is not a resource id`,
      'params.id',
      'ids are lowercase letters, digits, ".", "_" or "-"',
    );
}

export function checkNodeName(c: OpsContext, node: string, path = 'params.node'): void {
  if (!c.nodeNames.includes(node))
    throw new ApiError(
      'CORRAL_NOT_FOUND',
      `node "${node}" is not in the cluster`,
      path,
      `known nodes: ${c.nodeNames.join(', ')}`,
    );
}

export async function getSpec(c: OpsContext, id: string): Promise<ResourceSpec> {
  checkResourceId(id);
  const kv = await c.store.get(c.k.resource(id));
  if (!kv)
    throw new ApiError('CORRAL_NOT_FOUND', `no resource "${id}"`, 'params.id', 'see GET /api/v1/resources');
  return ResourceSpec.parse(JSON.parse(kv.value));
}

export async function updateSpec(
  c: OpsContext,
  id: string,
  f: (s: ResourceSpec) => ResourceSpec,
): Promise<ResourceSpec> {
  checkResourceId(id);
  for (let attempt = 0; attempt < casAttemptsMax; attempt++) {
    const kv = await c.store.get(c.k.resource(id));
    if (!kv)
      throw new ApiError('CORRAL_NOT_FOUND', `no resource "${id}"`, 'params.id', 'see GET /api/v1/resources');
    const next = f(ResourceSpec.parse(JSON.parse(kv.value)));
    const r = await c.store.txn({
      compare: [{ key: kv.key, target: 'modRevision', op: '==', value: kv.modRevision }],
      success: [{ type: 'put', key: kv.key, value: JSON.stringify(next) }],
    });
    if (r.succeeded) return next;
  }
  throw new ApiError('CORRAL_CONFLICT', `resource "${id}" keeps changing`, 'params.id', 'try again');
}

export async function defineResource(
  c: OpsContext,
  spec: ResourceSpec,
  source: string,
): Promise<'defined' | 'updated'> {
  const existed = await c.store.get(c.k.resource(spec.id));
  await c.store.put(c.k.resource(spec.id), JSON.stringify(spec));
  const verb = existed ? 'updated' : 'defined';
  await writeEvent(
    c,
    'operator',
    spec.id,
    verb,
    `${spec.id}: ${verb}${source ? ` from ${source}` : ''} by ${c.by}`,
  );
  return verb;
}

export async function undefineResource(c: OpsContext, id: string): Promise<void> {
  await getSpec(c, id);
  await c.store.delete(c.k.resource(id));
  await writeEvent(c, 'operator', id, 'undefined', `${id}: undefined by ${c.by}`);
}

export async function setDesired(c: OpsContext, id: string, desired: 'started' | 'stopped'): Promise<void> {
  // a start or a (graceful) stop ends an earlier destroy's kill-at-once, as `corral vm start|stop` do
  await updateSpec(c, id, (s) => ({ ...s, desired, killOnStop: undefined }));
  const verb = desired === 'started' ? 'start' : 'stop';
  await writeEvent(c, 'operator', id, verb, `${id}: ${verb} requested by ${c.by}`);
}

/** Stop a VM by killing its QEMU at once (no ACPI power-down, no grace), like `corral vm destroy`. */
export async function destroyVm(c: OpsContext, id: string): Promise<void> {
  await updateSpec(c, id, (s) => {
    if (s.kind !== 'vm')
      throw new ApiError(
        'CORRAL_API_BAD_REQUEST',
        `${id} is a ${s.kind} resource; only VMs are destroyed`,
        'params.id',
        'use POST /api/v1/resources/{id}/stop',
      );
    return { ...s, desired: 'stopped', killOnStop: true };
  });
  await writeEvent(c, 'operator', id, 'destroy', `${id}: destroy requested by ${c.by}`);
}

/** Move (for a VM: live-migrate) to a node; null clears the preferred node. */
export async function moveResource(
  c: OpsContext,
  id: string,
  node: string | null,
  verb: 'move' | 'migrate' = 'move',
): Promise<ResourceSpec> {
  if (node) checkNodeName(c, node, 'body.node');
  const spec = await updateSpec(c, id, (s) => {
    if (verb === 'migrate' && s.kind !== 'vm')
      throw new ApiError(
        'CORRAL_API_BAD_REQUEST',
        `${id} is a ${s.kind} resource; only VMs migrate`,
        'params.id',
        'use POST /api/v1/resources/{id}/move',
      );
    const next = { ...s };
    if (node) next.preferredNode = node;
    else delete next.preferredNode;
    return next;
  });
  await writeEvent(
    c,
    'operator',
    id,
    verb,
    node ? `${id}: ${verb} to ${node} requested by ${c.by}` : `${id}: preferred node cleared by ${c.by}`,
  );
  return spec;
}

export async function cleanupResource(c: OpsContext, id: string): Promise<void> {
  await getSpec(c, id);
  await c.store.put(c.k.cleanup(id), JSON.stringify({ atMs: Date.now() }));
  await writeEvent(c, 'operator', id, 'cleanup', `${id}: failure count cleared by ${c.by}`);
}

export async function setMaintenance(c: OpsContext, node: string, on: boolean): Promise<void> {
  checkNodeName(c, node);
  const admin: NodeAdmin = { maintenance: on };
  await c.store.put(c.k.nodeAdmin(node), JSON.stringify(admin));
  await writeEvent(
    c,
    'operator',
    node,
    `maintenance-${on ? 'on' : 'off'}`,
    `${node}: maintenance ${on ? 'on' : 'off'} by ${c.by}`,
  );
}

export async function setFlags(c: OpsContext, patch: Partial<ClusterFlags>): Promise<ClusterFlags> {
  for (let attempt = 0; attempt < casAttemptsMax; attempt++) {
    const kv = await c.store.get(c.k.flags);
    const cur = { ...defaultFlags, ...(kv ? (JSON.parse(kv.value) as Partial<ClusterFlags>) : {}) };
    const next = { ...cur, ...patch };
    const r = await c.store.txn({
      compare: [{ key: c.k.flags, target: 'modRevision', op: '==', value: kv?.modRevision ?? 0 }],
      success: [{ type: 'put', key: c.k.flags, value: JSON.stringify(next) }],
    });
    if (r.succeeded) return next;
  }
  throw new ApiError('CORRAL_CONFLICT', 'cluster flags keep changing', '', 'try again');
}
