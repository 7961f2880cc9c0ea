// /api/v1/events: paged log; /api/v1/events/stream: live Server-Sent Events from the hub.
import type { FastifyInstance } from 'fastify';
import { route } from '../route.js';
import type { ApiContext } from '../context.js';
import { ApiError } from '../errors.js';
import { EventsPage, EventsQuery } from '../schemas.js';
import type { ClusterEvent } from '../../core/types.js';
import type { KeyedEvent } from '../hub.js';

export const sseClientsMax = 200;
export const sseKeepAliveMs = 15000;
/** change notifications per client are coalesced to at most one per this interval */
export const sseChangeEveryMs = 250;

export function eventRoutes(ctx: ApiContext) {
  let clients = 0;
  return async (app: FastifyInstance) => {
    const p = '/api/v1';
    route(
      app,
      p,
      {
        method: 'GET',
        url: '/events',
        summary: 'the event log: the latest `limit`, or a page after a key (oldest first)',
        tag: 'events',
        role: 'viewer',
        query: EventsQuery,
        reply: EventsPage,
      },
      async ({ query }) => {
        const pre = ctx.k.events;
        const r = query.after
          ? await ctx.store.range(pre, {
              fromKey: pre + query.after + '\0',
              limit: query.object ? 0 : query.limit,
            })
          : await ctx.store.range(pre);
        const all: KeyedEvent[] = [];
        for (const kv of r.kvs) {
          try {
            const e = JSON.parse(kv.value) as ClusterEvent;
            if (!query.object || e.object === query.object) all.push({ ...e, key: kv.key.slice(pre.length) });
          } catch {
            // skip unreadable
          }
        }
        const events = query.after ? all.slice(0, query.limit) : all.slice(-query.limit);
        const last = events[events.length - 1];
        return { events, next: last ? last.key : (query.after ?? null) };
      },
    );

    route(
      app,
      p,
      {
        method: 'GET',
        url: '/events/stream',
        summary:
          "live Server-Sent Events: 'event' (a cluster event) and 'change' (store revision; re-read status)",
        tag: 'events',
        role: 'viewer',
      },
      async ({ req, reply }) => {
        if (clients >= sseClientsMax)
          throw new ApiError(
            'CORRAL_API_TOO_MANY',
            `${sseClientsMax} live streams are open`,
            '',
            'close another dashboard or try later',
          );
        clients++;
        reply.hijack();
        const res = reply.raw;
        res.writeHead(200, {
          'content-type': 'text/event-stream; charset=utf-8',
          'cache-control': 'no-cache, no-transform',
          connection: 'keep-alive',
          'x-accel-buffering': 'no',
        });
        res.write(`retry: 2000\nevent: hello\ndata: ${JSON.stringify({ revision: ctx.hub.revision })}\n\n`);
        let changeTimer: NodeJS.Timeout | undefined;
        const onEvent = (e: KeyedEvent) =>
          res.write(`id: ${e.key}\nevent: event\ndata: ${JSON.stringify(e)}\n\n`);
        const onChange = () => {
          if (changeTimer) return;
          changeTimer = setTimeout(() => {
            changeTimer = undefined;
            res.write(`event: change\ndata: ${JSON.stringify({ revision: ctx.hub.revision })}\n\n`);
          }, sseChangeEveryMs);
        };
        const keep = setInterval(() => res.write(': keep-alive\n\n'), sseKeepAliveMs);
        ctx.hub.on('event', onEvent);
        ctx.hub.on('change', onChange);
        const done = () => {
          clients--;
          clearInterval(keep);
          if (changeTimer) clearTimeout(changeTimer);
          ctx.hub.off('event', onEvent);
          ctx.hub.off('change', onChange);
        };
        req.raw.once('close', done);
        return undefined;
      },
    );
  };
}
