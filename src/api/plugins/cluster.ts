// /api/v1/status, /nodes, node actions (maintenance, fence), cluster arm/disarm.
import type { FastifyInstance } from 'fastify';
import { z } from 'zod';
import { route } from '../route.js';
import type { ApiContext } from '../context.js';
import { ApiError } from '../errors.js';
import { checkNodeName, setFlags, setMaintenance, writeEvent } from '../ops.js';
import { MaintenanceBody, NodeParams, NodeRow, Ok, ResourceRow, Status } from '../schemas.js';
import { createFencer } from '../../fence/index.js';
import { nodeEnv } from '../../env/node.js';
import { nodeStateDir } from '../../cli/commands/agent.js';
import type { Caller } from '../auth.js';

export function clusterRoutes(ctx: ApiContext) {
  return async (app: FastifyInstance) => {
    const p = '/api/v1';
    route(
      app,
      p,
      {
        method: 'GET',
        url: '/status',
        summary:
          'cluster, nodes, resources, leader and last events (from the in-memory view the store watch keeps current)',
        tag: 'cluster',
        role: 'viewer',
        reply: Status,
      },
      // serialised once per store change, not per request
      async ({ reply }) => reply.type('application/json; charset=utf-8').send(await ctx.statusJson()),
    );

    route(
      app,
      p,
      {
        method: 'GET',
        url: '/nodes',
        summary: 'every node with state, capacity use and reason',
        tag: 'nodes',
        role: 'viewer',
        reply: z.array(NodeRow),
      },
      async () => (await ctx.status()).nodes,
    );

    route(
      app,
      p,
      {
        method: 'GET',
        url: '/nodes/:node',
        summary: 'one node and the resources it holds',
        tag: 'nodes',
        role: 'viewer',
        params: NodeParams,
        reply: NodeRow.extend({ resourceList: z.array(ResourceRow) }),
      },
      async ({ params }) => {
        const s = await ctx.status();
        const n = s.nodes.find((x) => x.name === params.node);
        if (!n)
          throw new ApiError(
            'CORRAL_NOT_FOUND',
            `node "${params.node}" is not in the cluster`,
            'params.node',
            `known nodes: ${ctx.nodeNames.join(', ')}`,
          );
        return { ...n, resourceList: s.resources.filter((r) => r.node === params.node) };
      },
    );

    route(
      app,
      p,
      {
        method: 'POST',
        url: '/nodes/:node/maintenance',
        summary: 'maintenance on (resources move away) or off',
        tag: 'nodes',
        role: 'operator',
        params: NodeParams,
        body: MaintenanceBody,
        reply: Ok,
      },
      async ({ params, body, req }) => {
        await setMaintenance(ctx.ops(req.caller as Caller), params.node, body.on);
        return { ok: true as const, message: `${params.node}: maintenance ${body.on ? 'on' : 'off'}` };
      },
    );

    route(
      app,
      p,
      {
        method: 'POST',
        url: '/nodes/:node/fence',
        summary: 'fence a node now with its configured devices (it loses its resources)',
        tag: 'nodes',
        role: 'admin',
        params: NodeParams,
        reply: Ok,
      },
      async ({ params, req }) => {
        const o = ctx.ops(req.caller as Caller);
        checkNodeName(o, params.node);
        const env = nodeEnv({ name: 'api', level: 'warn' });
        const fencer = createFencer(ctx.config.nodes, {
          log: env.log,
          localStateDir: (n) => nodeStateDir(ctx.stateRoot, n),
        });
        if (fencer.deviceCount(params.node) === 0)
          throw new ApiError(
            'CORRAL_API_BAD_REQUEST',
            `node ${params.node} has no fence device`,
            'params.node',
            `add one under nodes[].fence in ${ctx.configPath}`,
          );
        await writeEvent(
          o,
          'fence',
          params.node,
          'fence-requested',
          `${params.node}: fence requested by ${o.by}`,
        );
        const out = await fencer.fence(params.node, Date.now() + ctx.config.timings.fenceTimeoutMs);
        const msg = out.ok
          ? `${params.node}: fenced by ${out.device} (${o.by})`
          : `${params.node}: fence failed: ${out.attempts.map((a) => `${a.device}: ${a.error}`).join('; ')}`;
        await writeEvent(o, 'fence', params.node, out.ok ? 'fence-ok' : 'fence-failed', msg);
        if (!out.ok) throw new ApiError('CORRAL_CONFLICT', msg, 'params.node', 'check the fence device');
        return { ok: true as const, message: msg };
      },
    );

    for (const [verb, patch, text] of [
      ['arm', { armed: true }, 'cluster armed'],
      [
        'disarm',
        { armed: false },
        'cluster disarmed: agents do not self-fence, the manager does not fence or recover',
      ],
    ] as const)
      route(
        app,
        p,
        { method: 'POST', url: `/cluster/${verb}`, summary: text, tag: 'cluster', role: 'admin', reply: Ok },
        async ({ req }) => {
          const o = ctx.ops(req.caller as Caller);
          await setFlags(o, patch);
          await writeEvent(o, 'cluster', ctx.cluster, verb, `${text} (${o.by})`);
          return { ok: true as const, message: text };
        },
      );
  };
}
