// /api/v1/resources (CRUD and actions) and /api/v1/vms (the same records, kind vm; migrate = move;
// destroy = kill at once).
import type { FastifyInstance } from 'fastify';
import { z } from 'zod';
import { route } from '../route.js';
import type { ApiContext } from '../context.js';
import { ApiError } from '../errors.js';
import {
  cleanupResource,
  defineResource,
  destroyVm,
  getSpec,
  moveResource,
  setDesired,
  undefineResource,
} from '../ops.js';
import { Event, IdParams, MoveBody, Ok, ResourceRow } from '../schemas.js';
import { ResourceSpec } from '../../core/spec.js';
import type { AgentStatus, ClusterEvent, ResourceRecord } from '../../core/types.js';
import type { Caller } from '../auth.js';

/** events shown on a resource's page */
export const resourceHistoryMax = 200;

const ResourceDetail = z.object({
  spec: z.record(z.string(), z.unknown()),
  record: z.looseObject({ state: z.string(), node: z.string().nullable(), epoch: z.number() }).nullable(),
  observed: z.array(z.looseObject({ node: z.string(), state: z.string(), epoch: z.number() })),
  history: z.array(Event),
});

export function resourceRoutes(ctx: ApiContext) {
  return async (app: FastifyInstance) => {
    const p = '/api/v1';
    const caller = (req: { caller?: Caller }) => ctx.ops(req.caller as Caller);

    const detail = async (id: string) => {
      const o = ctx.ops({ name: 'reader', role: 'viewer' });
      const spec = await getSpec(o, id);
      const rec = await ctx.store.get(ctx.k.assign(id));
      const statuses = await ctx.store.range(ctx.k.statuses);
      const observed = statuses.kvs
        .filter((kv) => kv.key.endsWith(`/${id}`))
        .map((kv) => ({
          node: kv.key.slice(ctx.k.statuses.length).split('/')[0] ?? '',
          ...(JSON.parse(kv.value) as AgentStatus),
        }));
      const evs = await ctx.store.range(ctx.k.events);
      const history: (ClusterEvent & { key: string })[] = [];
      for (const kv of evs.kvs) {
        try {
          const e = JSON.parse(kv.value) as ClusterEvent;
          if (e.object === id) history.push({ ...e, key: kv.key.slice(ctx.k.events.length) });
        } catch {
          // skip unreadable
        }
      }
      return {
        spec,
        record: rec ? (JSON.parse(rec.value) as ResourceRecord) : null,
        observed,
        history: history.slice(-resourceHistoryMax),
      };
    };

    for (const [base, kind] of [
      ['resources', undefined],
      ['vms', 'vm'],
    ] as const) {
      const tag = base;
      const filter = (rows: z.infer<typeof ResourceRow>[]) =>
        kind ? rows.filter((r) => r.kind === kind) : rows;
      const checkKind = async (id: string) => {
        const s = await getSpec(ctx.ops({ name: 'reader', role: 'viewer' }), id);
        if (kind && s.kind !== kind)
          throw new ApiError(
            'CORRAL_NOT_FOUND',
            `"${id}" is a ${s.kind} resource, not a VM`,
            'params.id',
            `use /api/v1/resources/${id}`,
          );
        return s;
      };
      route(
        app,
        p,
        {
          method: 'GET',
          url: `/${base}`,
          summary: `every ${kind ?? 'resource'} with its state, node and reason`,
          tag,
          role: 'viewer',
          reply: z.array(ResourceRow),
        },
        async () => filter((await ctx.status()).resources),
      );

      route(
        app,
        p,
        {
          method: 'GET',
          url: `/${base}/:id`,
          summary: 'definition, manager record, agent observations, transition history',
          tag,
          role: 'viewer',
          params: IdParams,
          reply: ResourceDetail,
        },
        async ({ params }) => {
          await checkKind(params.id);
          return detail(params.id);
        },
      );

      route(
        app,
        p,
        {
          method: 'POST',
          url: `/${base}`,
          summary: `define a ${kind ?? 'resource'} (409 if it exists)`,
          tag,
          role: 'operator',
          body: ResourceSpec,
          reply: Ok,
          status: 201,
        },
        async ({ body, req }) => {
          if (kind && body.kind !== kind)
            throw new ApiError(
              'CORRAL_API_BAD_REQUEST',
              'a VM needs kind: vm',
              'body.kind',
              'set "kind": "vm" and a "vm" section',
            );
          if (await ctx.store.get(ctx.k.resource(body.id)))
            throw new ApiError(
              'CORRAL_CONFLICT',
              `resource "${body.id}" exists`,
              'body.id',
              `PUT /api/v1/${base}/${body.id} to update it`,
            );
          await defineResource(caller(req), body, 'the API');
          return { ok: true as const, message: `${body.id}: defined` };
        },
      );

      route(
        app,
        p,
        {
          method: 'PUT',
          url: `/${base}/:id`,
          summary: 'create or replace a definition',
          tag,
          role: 'operator',
          params: IdParams,
          body: ResourceSpec,
          reply: Ok,
        },
        async ({ params, body, req }) => {
          if (body.id !== params.id)
            throw new ApiError(
              'CORRAL_API_BAD_REQUEST',
              `body.id "${body.id}" differs from the URL's "${params.id}"`,
              'body.id',
              'make them equal',
            );
          const verb = await defineResource(caller(req), body, 'the API');
          return { ok: true as const, message: `${body.id}: ${verb}` };
        },
      );

      route(
        app,
        p,
        {
          method: 'DELETE',
          url: `/${base}/:id`,
          summary: 'stop and forget',
          tag,
          role: 'operator',
          params: IdParams,
          reply: Ok,
        },
        async ({ params, req }) => {
          await checkKind(params.id);
          await undefineResource(caller(req), params.id);
          return { ok: true as const, message: `${params.id}: undefined (stopping)` };
        },
      );

      for (const verb of ['start', 'stop'] as const)
        route(
          app,
          p,
          {
            method: 'POST',
            url: `/${base}/:id/${verb}`,
            summary:
              verb === 'start' ? 'set to run (the manager places it)' : 'set to stop (it stays defined)',
            tag,
            role: 'operator',
            params: IdParams,
            reply: Ok,
          },
          async ({ params, req }) => {
            await checkKind(params.id);
            await setDesired(caller(req), params.id, verb === 'start' ? 'started' : 'stopped');
            return {
              ok: true as const,
              message: `${params.id}: desired ${verb === 'start' ? 'started' : 'stopped'}`,
            };
          },
        );

      if (kind)
        route(
          app,
          p,
          {
            method: 'POST',
            url: `/${base}/:id/destroy`,
            summary: 'kill the QEMU at once (no ACPI power-down, no grace); start or stop end it',
            tag,
            role: 'operator',
            params: IdParams,
            reply: Ok,
          },
          async ({ params, req }) => {
            await checkKind(params.id);
            await destroyVm(caller(req), params.id);
            return { ok: true as const, message: `${params.id}: destroy requested` };
          },
        );

      for (const verb of kind ? (['migrate', 'move'] as const) : (['move'] as const))
        route(
          app,
          p,
          {
            method: 'POST',
            url: `/${base}/:id/${verb}`,
            summary:
              verb === 'migrate'
                ? 'live-migrate to a node'
                : 'move to a node (it becomes the preferred node); node null clears it',
            tag,
            role: 'operator',
            params: IdParams,
            body: MoveBody,
            reply: Ok,
          },
          async ({ params, body, req }) => {
            await checkKind(params.id);
            await moveResource(caller(req), params.id, body.node, verb);
            return {
              ok: true as const,
              message: body.node
                ? `${params.id}: ${verb === 'migrate' ? 'migrating' : 'moving'} to ${body.node}`
                : `${params.id}: preferred node cleared`,
            };
          },
        );

      route(
        app,
        p,
        {
          method: 'POST',
          url: `/${base}/:id/cleanup`,
          summary: 'clear the failure count at once',
          tag,
          role: 'operator',
          params: IdParams,
          reply: Ok,
        },
        async ({ params, req }) => {
          await checkKind(params.id);
          await cleanupResource(caller(req), params.id);
          return { ok: true as const, message: `${params.id}: failures cleared` };
        },
      );
    }
  };
}
