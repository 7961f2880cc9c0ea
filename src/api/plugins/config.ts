// /api/v1/config: show, validate, apply (with history), rollback. The cluster config lives in
// the store under /corral/<cluster>/config, each applied version under config-history/.
import type { FastifyInstance } from 'fastify';
import { dirname, resolve } from 'node:path';
import { readFileSync } from 'node:fs';
import { route } from '../route.js';
import type { ApiContext } from '../context.js';
import { ApiError } from '../errors.js';
import { writeEvent } from '../ops.js';
import { ConfigBody, ConfigHistory, ConfigValidation, ConfigView, RollbackBody } from '../schemas.js';
import { parseClusterConfig } from '../../config/schema.js';
import type { Caller } from '../auth.js';
import type { z } from 'zod';

type Stored = z.infer<typeof ConfigView>;
/** versions kept in config-history/ */
export const configHistoryMax = 100;

export function configRoutes(ctx: ApiContext) {
  const histPrefix = `${ctx.k.prefix}config-history/`;
  const histKey = (v: number) => histPrefix + String(v).padStart(10, '0');
  const validate = (yaml: string) => {
    const r = parseClusterConfig(yaml, 'config', dirname(resolve(ctx.configPath)), { checkSecrets: false });
    if (r.ok) {
      if (r.value.cluster.name !== ctx.cluster)
        return {
          ok: false,
          errors: [
            {
              line: 1,
              column: 1,
              path: 'cluster.name',
              message: `cluster name "${r.value.cluster.name}" differs from this cluster's "${ctx.cluster}"`,
            },
          ],
        };
      return { ok: true, errors: [] };
    }
    return {
      ok: false,
      errors: r.errors.map((e) => ({ line: e.line, column: e.column, path: e.path, message: e.message })),
    };
  };
  const current = async (): Promise<{ view: Stored; modRevision: number }> => {
    const kv = await ctx.store.get(ctx.k.config);
    if (kv) {
      try {
        return { view: JSON.parse(kv.value) as Stored, modRevision: kv.modRevision };
      } catch {
        // a corrupt stored config: fall back to the file
      }
    }
    return {
      view: {
        version: 0,
        yaml: readFileSync(ctx.configPath, 'utf8'),
        atMs: 0,
        by: 'file',
        source: ctx.configPath,
      },
      modRevision: kv?.modRevision ?? 0,
    };
  };
  const apply = async (yaml: string, caller: Caller, source: string): Promise<Stored> => {
    const v = validate(yaml);
    if (!v.ok) {
      const e = v.errors[0]!;
      throw new ApiError(
        'CORRAL_API_BAD_REQUEST',
        v.errors.map((x) => `line ${x.line}: ${x.path ? x.path + ': ' : ''}${x.message}`).join('; '),
        `body.yaml.${e.path}`,
        'POST /api/v1/config/validate lists every problem',
      );
    }
    const cur = await current();
    const next: Stored = {
      version: cur.view.version + 1,
      yaml,
      atMs: Date.now(),
      by: `token:${caller.name}`,
      source,
    };
    const r = await ctx.store.txn({
      compare: [{ key: ctx.k.config, target: 'modRevision', op: '==', value: cur.modRevision }],
      success: [
        { type: 'put', key: ctx.k.config, value: JSON.stringify(next) },
        { type: 'put', key: histKey(next.version), value: JSON.stringify(next) },
        ...(next.version > configHistoryMax
          ? [{ type: 'delete' as const, key: histKey(next.version - configHistoryMax) }]
          : []),
      ],
    });
    if (!r.succeeded)
      throw new ApiError(
        'CORRAL_CONFLICT',
        'the config changed while applying',
        'body.yaml',
        'read it again and retry',
      );
    await writeEvent(
      ctx.ops(caller),
      'cluster',
      ctx.cluster,
      'config-applied',
      `config version ${next.version} applied (${source}) by token:${caller.name}`,
    );
    return next;
  };
  return async (app: FastifyInstance) => {
    const p = '/api/v1';
    route(
      app,
      p,
      {
        method: 'GET',
        url: '/config',
        summary: 'the current cluster config (version 0: the file, never applied through the API)',
        tag: 'config',
        role: 'viewer',
        reply: ConfigView,
      },
      async () => (await current()).view,
    );
    route(
      app,
      p,
      {
        method: 'POST',
        url: '/config/validate',
        summary: 'validate a config without applying it: every problem with line and field',
        tag: 'config',
        role: 'viewer',
        body: ConfigBody,
        reply: ConfigValidation,
      },
      async ({ body }) => validate(body.yaml),
    );
    route(
      app,
      p,
      {
        method: 'PUT',
        url: '/config',
        summary: 'validate and apply a config; the previous one stays in the history',
        tag: 'config',
        role: 'admin',
        body: ConfigBody,
        reply: ConfigView,
      },
      async ({ body, req }) => apply(body.yaml, req.caller as Caller, 'PUT /config'),
    );
    route(
      app,
      p,
      {
        method: 'GET',
        url: '/config/history',
        summary: 'applied versions, oldest first',
        tag: 'config',
        role: 'viewer',
        reply: ConfigHistory,
      },
      async () => {
        const r = await ctx.store.range(histPrefix);
        return r.kvs.map((kv) => {
          const { yaml: _y, ...rest } = JSON.parse(kv.value) as Stored;
          return rest;
        });
      },
    );
    route(
      app,
      p,
      {
        method: 'POST',
        url: '/config/rollback',
        summary: 'apply an earlier version again (as a new version)',
        tag: 'config',
        role: 'admin',
        body: RollbackBody,
        reply: ConfigView,
      },
      async ({ body, req }) => {
        const kv = await ctx.store.get(histKey(body.version));
        if (!kv)
          throw new ApiError(
            'CORRAL_NOT_FOUND',
            `no config version ${body.version} in the history`,
            'body.version',
            'see GET /api/v1/config/history',
          );
        return apply(
          (JSON.parse(kv.value) as Stored).yaml,
          req.caller as Caller,
          `rollback to version ${body.version}`,
        );
      },
    );
  };
}
