// Zod schemas of the API's requests and replies (requests are validated with them; all of
// them feed /api/v1/openapi.json).
import { z } from 'zod';
import { ResourceId } from '../core/spec.js';
import { nodeStates, resourceStates } from '../core/types.js';
import { RoleSchema } from './auth.js';

export const NodeName = z.string().regex(/^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$/, 'expected a node name');
export const IdParams = z.strictObject({ id: ResourceId });
export const NodeParams = z.strictObject({ node: NodeName });

export const NodeState = z.enum([...nodeStates, 'never joined'] as unknown as [string, ...string[]]);
export const ResourceState = z.enum(resourceStates as [string, ...string[]]);

export const NodeRow = z.object({
  name: z.string(),
  state: NodeState,
  reason: z.string(),
  address: z.string(),
  leader: z.boolean(),
  cpus: z.object({ used: z.number(), total: z.number() }),
  memory: z.object({ used: z.number(), total: z.number() }),
  resources: z.number().int(),
  labels: z.record(z.string(), z.string()),
  maintenance: z.boolean(),
  lastFence: z
    .object({ ok: z.boolean(), device: z.string(), atMs: z.number(), error: z.string().optional() })
    .optional(),
});

export const ResourceRow = z.object({
  id: z.string(),
  kind: z.enum(['process', 'vm']).optional(),
  node: z.string().nullable(),
  state: ResourceState,
  desired: z.enum(['started', 'stopped', 'undefined']),
  reason: z.string(),
  epoch: z.number().int(),
  priority: z.number().int(),
  failures: z.number().int(),
  sinceMs: z.number(),
  observed: z.object({ state: z.string(), reason: z.string(), epoch: z.number() }).optional(),
});

export const Event = z.object({
  key: z.string().optional(),
  atMs: z.number(),
  kind: z.string(),
  object: z.string(),
  action: z.string(),
  message: z.string(),
  by: z.string(),
  term: z.number().optional(),
  epoch: z.number().optional(),
  from: z.string().optional(),
  to: z.string().optional(),
});

export const Status = z.object({
  cluster: z.string(),
  revision: z.number().int(),
  nowMs: z.number(),
  leader: z.object({ node: z.string(), term: z.number() }).nullable(),
  flags: z.object({
    armed: z.boolean(),
    halted: z.boolean(),
    haltForce: z.boolean(),
    appsEnabled: z.boolean(),
  }),
  nodes: z.array(NodeRow),
  resources: z.array(ResourceRow),
  events: z.array(Event),
});

export const Ok = z.object({ ok: z.literal(true), message: z.string() });
export const MoveBody = z.strictObject({ node: NodeName.nullable() });
export const MaintenanceBody = z.strictObject({ on: z.boolean() });
export const EventsQuery = z.strictObject({
  limit: z.coerce.number().int().min(1).max(1000).default(100),
  /** page forward: events after this key */
  after: z.string().max(200).optional(),
  /** only events about this node or resource */
  object: z.string().max(100).optional(),
  access_token: z.string().optional(),
});
export const EventsPage = z.object({ events: z.array(Event), next: z.string().nullable() });

export const TokenCreateBody = z.strictObject({ name: z.string().min(1).max(64), role: RoleSchema });
export const TokenCreated = z.object({ token: z.string(), name: z.string(), role: RoleSchema });
export const TokenList = z.array(
  z.object({ name: z.string(), role: RoleSchema, createdAtMs: z.number(), prefix: z.string() }),
);

export const ConfigBody = z.strictObject({
  yaml: z
    .string()
    .min(1)
    .max(1024 * 1024),
});
export const ConfigIssue = z.object({
  line: z.number(),
  column: z.number(),
  path: z.string(),
  message: z.string(),
});
export const ConfigValidation = z.object({ ok: z.boolean(), errors: z.array(ConfigIssue) });
export const ConfigView = z.object({
  version: z.number().int(),
  yaml: z.string(),
  atMs: z.number(),
  by: z.string(),
  source: z.string(),
});
export const ConfigHistory = z.array(ConfigView.omit({ yaml: true }));
export const RollbackBody = z.strictObject({ version: z.number().int().min(1) });

export const ConsoleTicket = z.object({
  token: z.string(),
  expiresAtMs: z.number(),
  url: z.string(),
  node: z.string(),
});
