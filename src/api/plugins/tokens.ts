// /api/v1/tokens: create (the secret is in the reply once), list, revoke. Admin only.
import type { FastifyInstance } from 'fastify';
import { z } from 'zod';
import { route } from '../route.js';
import type { ApiContext } from '../context.js';
import { ApiError } from '../errors.js';
import { createToken, listTokens, revokeToken, type Caller } from '../auth.js';
import { writeEvent } from '../ops.js';
import { Ok, TokenCreateBody, TokenCreated, TokenList } from '../schemas.js';

export function tokenRoutes(ctx: ApiContext) {
  return async (app: FastifyInstance) => {
    const p = '/api/v1';
    route(
      app,
      p,
      {
        method: 'GET',
        url: '/tokens',
        summary: 'every token: name, role, creation time (never the secret)',
        tag: 'tokens',
        role: 'admin',
        reply: TokenList,
      },
      async () => (await listTokens(ctx.store, ctx.cluster)).map((t) => t.record),
    );
    route(
      app,
      p,
      {
        method: 'POST',
        url: '/tokens',
        summary: 'create a token; the reply holds the secret, shown only this once',
        tag: 'tokens',
        role: 'admin',
        body: TokenCreateBody,
        reply: TokenCreated,
        status: 201,
      },
      async ({ body, req }) => {
        const o = ctx.ops(req.caller as Caller);
        const t = await createToken(ctx.store, ctx.cluster, body.name, body.role, Date.now());
        await writeEvent(
          o,
          'operator',
          body.name,
          'token-created',
          `token ${body.name} (${body.role}) created by ${o.by}`,
        );
        return { token: t.token, name: body.name, role: body.role };
      },
    );
    route(
      app,
      p,
      {
        method: 'DELETE',
        url: '/tokens/:name',
        summary: 'revoke a token by name',
        tag: 'tokens',
        role: 'admin',
        params: z.strictObject({ name: z.string().min(1).max(64) }),
        reply: Ok,
      },
      async ({ params, req }) => {
        const o = ctx.ops(req.caller as Caller);
        const n = await revokeToken(ctx.store, ctx.cluster, params.name);
        if (n === 0)
          throw new ApiError(
            'CORRAL_NOT_FOUND',
            `no token named "${params.name}"`,
            'params.name',
            'see GET /api/v1/tokens',
          );
        await writeEvent(
          o,
          'operator',
          params.name,
          'token-revoked',
          `token ${params.name} revoked by ${o.by}`,
        );
        return { ok: true as const, message: `${params.name}: revoked` };
      },
    );
    route(
      app,
      p,
      {
        method: 'GET',
        url: '/whoami',
        summary: "the calling token's name and role",
        tag: 'tokens',
        role: 'viewer',
        reply: z.object({ name: z.string(), role: z.string() }),
      },
      async ({ req }) => req.caller as Caller,
    );
  };
}
