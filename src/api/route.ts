// One way to declare a route: zod schemas for params, query, body and reply; the same
// schemas validate requests (400 naming the field) and build the OpenAPI 3 document.
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { z } from 'zod';
import { ApiError, fromZod } from './errors.js';
import type { Role } from './auth.js';

export interface RouteDef<
  P extends z.ZodType,
  Q extends z.ZodType,
  B extends z.ZodType,
  R extends z.ZodType,
> {
  method: 'GET' | 'POST' | 'PUT' | 'DELETE';
  /** fastify path, e.g. /resources/:id */
  url: string;
  summary: string;
  tag: string;
  /** least role that may call it; 'public' for no token */
  role: Role | 'public';
  params?: P;
  query?: Q;
  body?: B;
  /** 200/201 reply */
  reply?: R;
  status?: 200 | 201 | 202;
}

export interface Ctx<P, Q, B> {
  params: P;
  query: Q;
  body: B;
  req: FastifyRequest;
  reply: FastifyReply;
}

interface DocEntry {
  method: string;
  path: string;
  summary: string;
  tag: string;
  role: string;
  params?: z.ZodType;
  query?: z.ZodType;
  body?: z.ZodType;
  reply?: z.ZodType;
  status: number;
}

/** Every route declared through route(), for the OpenAPI document. */
export const apiDocs: DocEntry[] = [];

export function route<
  P extends z.ZodType = z.ZodType<Record<string, never>>,
  Q extends z.ZodType = z.ZodType<Record<string, never>>,
  B extends z.ZodType = z.ZodType<undefined>,
  R extends z.ZodType = z.ZodType<unknown>,
>(
  app: FastifyInstance,
  prefix: string,
  def: RouteDef<P, Q, B, R>,
  handler: (c: Ctx<z.infer<P>, z.infer<Q>, z.infer<B>>) => Promise<unknown>,
): void {
  const path = prefix + def.url;
  if (!apiDocs.some((d) => d.method === def.method && d.path === path))
    apiDocs.push({
      method: def.method,
      path,
      summary: def.summary,
      tag: def.tag,
      role: def.role,
      params: def.params,
      query: def.query,
      body: def.body,
      reply: def.reply,
      status: def.status ?? 200,
    });
  app.route({
    method: def.method,
    url: path,
    config: { role: def.role },
    handler: async (req, reply) => {
      const parse = <S extends z.ZodType>(
        where: 'params' | 'query' | 'body',
        s: S | undefined,
        v: unknown,
      ) => {
        if (!s) return v as z.infer<S>;
        const r = s.safeParse(v ?? (where === 'body' ? undefined : {}));
        if (!r.success) throw fromZod(where, r.error);
        return r.data;
      };
      if (def.body && (req.body === undefined || req.body === null) && def.method !== 'GET') {
        const r = def.body.safeParse({});
        if (!r.success)
          throw new ApiError(
            'CORRAL_API_BAD_REQUEST',
            'expected a JSON body',
            'body',
            'send Content-Type: application/json',
          );
      }
      const out = await handler({
        params: parse('params', def.params, req.params) as z.infer<P>,
        query: parse('query', def.query, req.query) as z.infer<Q>,
        body: parse('body', def.body, req.body ?? {}) as z.infer<B>,
        req,
        reply,
      });
      if (reply.sent) return reply;
      void reply.code(def.status ?? 200);
      return out ?? {};
    },
  });
}

function schemaOf(s: z.ZodType, io: 'input' | 'output'): unknown {
  try {
    const j = z.toJSONSchema(s, { io, unrepresentable: 'any' }) as Record<string, unknown>;
    delete j.$schema;
    return j;
  } catch {
    return {};
  }
}

/** OpenAPI 3.1 from the declared routes. */
export function openApiDocument(version: string): unknown {
  const paths: Record<string, Record<string, unknown>> = {};
  for (const d of apiDocs) {
    const oaPath = d.path.replace(/:([A-Za-z]+)/g, '{$1}');
    const parameters: unknown[] = [];
    const addParams = (s: z.ZodType | undefined, where: 'path' | 'query') => {
      if (!s) return;
      const j = schemaOf(s, 'input') as { properties?: Record<string, unknown>; required?: string[] };
      for (const [name, schema] of Object.entries(j.properties ?? {}))
        parameters.push({
          name,
          in: where,
          required: where === 'path' || (j.required ?? []).includes(name),
          schema,
        });
    };
    addParams(d.params, 'path');
    addParams(d.query, 'query');
    (paths[oaPath] ??= {})[d.method.toLowerCase()] = {
      summary: d.summary,
      tags: [d.tag],
      description:
        d.role === 'public' ? 'no token needed' : `needs a bearer token with role ${d.role} or higher`,
      security: d.role === 'public' ? [] : [{ bearer: [] }],
      parameters,
      ...(d.body
        ? {
            requestBody: {
              required: true,
              content: { 'application/json': { schema: schemaOf(d.body, 'input') } },
            },
          }
        : {}),
      responses: {
        [String(d.status)]: {
          description: 'ok',
          content: { 'application/json': { schema: d.reply ? schemaOf(d.reply, 'output') : {} } },
        },
        '4XX': {
          description: 'bad input, auth or state',
          content: { 'application/json': { schema: { $ref: '#/components/schemas/Error' } } },
        },
      },
    };
  }
  return {
    openapi: '3.1.0',
    info: {
      title: 'Corral API',
      version,
      description: 'HA cluster manager: nodes, resources, VMs, events, config',
    },
    servers: [{ url: '/' }],
    paths,
    components: {
      securitySchemes: { bearer: { type: 'http', scheme: 'bearer' } },
      schemas: {
        Error: {
          type: 'object',
          required: ['code', 'message', 'path'],
          properties: {
            code: { type: 'string' },
            message: { type: 'string' },
            path: { type: 'string' },
            hint: { type: 'string' },
          },
        },
      },
    },
  };
}
