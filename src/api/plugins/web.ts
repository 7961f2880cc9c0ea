// The dashboard: web/ at /, noVNC (npm @novnc/novnc) at /novnc/, and /metrics.
import { readFile } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { extname, join, normalize, resolve, sep, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { createRequire } from 'node:module';
import type { FastifyInstance, FastifyReply } from 'fastify';
import type { ApiContext } from '../context.js';
import { authenticate } from '../auth.js';

const mime: Record<string, string> = {
  '.html': 'text/html; charset=utf-8',
  '.js': 'text/javascript; charset=utf-8',
  '.css': 'text/css; charset=utf-8',
  '.svg': 'image/svg+xml',
  '.png': 'image/png',
  '.json': 'application/json',
  '.ico': 'image/x-icon',
};

const here = dirname(fileURLToPath(import.meta.url));
/** web/ at the repository root (from src/api/plugins or dist/src/api/plugins) */
export const webRoot =
  [resolve(here, '..', '..', '..', 'web'), resolve(here, '..', '..', '..', '..', 'web')].find((d) =>
    existsSync(d),
  ) ?? resolve('web');

function novncRoot(): string | undefined {
  try {
    const req = createRequire(import.meta.url);
    return dirname(dirname(req.resolve('@novnc/novnc')));
  } catch {
    return undefined;
  }
}

async function sendFile(reply: FastifyReply, root: string, rel: string): Promise<FastifyReply> {
  const p = normalize(join(root, rel));
  if (!p.startsWith(root + sep) && p !== root)
    return reply.code(404).send({ code: 'CORRAL_API_NOT_FOUND', message: 'no such file', path: '' });
  try {
    const body = await readFile(p);
    return reply
      .type(mime[extname(p)] ?? 'application/octet-stream')
      .header('cache-control', 'no-cache')
      .send(body);
  } catch {
    return reply.code(404).send({ code: 'CORRAL_API_NOT_FOUND', message: `no such file ${rel}`, path: '' });
  }
}

export function webRoutes(ctx: ApiContext) {
  const novnc = novncRoot();
  return async (app: FastifyInstance) => {
    app.get('/', { config: { role: 'public' } }, (_req, reply) => sendFile(reply, webRoot, 'index.html'));
    app.get('/ui/*', { config: { role: 'public' } }, (req, reply) =>
      sendFile(reply, webRoot, (req.params as { '*': string })['*']),
    );
    app.get('/novnc/*', { config: { role: 'public' } }, (req, reply) =>
      novnc
        ? sendFile(reply, novnc, (req.params as { '*': string })['*'])
        : reply.code(404).send({
            code: 'CORRAL_API_NOT_FOUND',
            message: '@novnc/novnc is not installed',
            path: '',
            hint: 'npm install',
          }),
    );
    app.get('/metrics', { config: { role: 'public' } }, async (req, reply) => {
      if (ctx.config.network.api.metricsAuth) await authenticate(ctx.verifier, req, 'viewer');
      ctx.metrics.setState(await ctx.status());
      return reply.type(ctx.metrics.registry.contentType).send(await ctx.metrics.registry.metrics());
    });
  };
}
