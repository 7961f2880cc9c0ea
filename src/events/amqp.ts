// Publishes every cluster event to an AMQP topic exchange ('corral.events', routing key
// <cluster>.<kind>.<object>, persistent, publisher confirms). The store is the queue: a cursor
// key (/corral/<cluster>/amqp/cursor) names the last event the broker confirmed, so while the
// broker is down events simply wait in the store's event log and are published once it is back.
// Delivery is at least once: a crash between the broker's confirm and the cursor write repeats
// a batch (consumers can dedupe on the message id, which is the event key).
import amqp from 'amqplib';
import type { Store } from '../store/types.js';
import { keys } from '../core/keys.js';

export const amqpExchange = 'corral.events';
export const amqpBatchMax = 100;
export const amqpPollEveryMs = 200;
export const amqpRetryMinMs = 250;
export const amqpRetryMaxMs = 5000;
export const amqpConnectTimeoutMs = 3000;

export interface AmqpPublisherOptions {
  store: Store;
  cluster: string;
  url: string;
  log?: (level: 'info' | 'warn', msg: string) => void;
}

export interface AmqpPublisher {
  /** events confirmed by the broker since start */
  published(): number;
  connected(): boolean;
  close(): Promise<void>;
}

export function amqpCursorKey(cluster: string): string {
  return `${keys(cluster).prefix}amqp/cursor`;
}

/** routing-key words are separated by dots: dots inside a word become '_' */
export function routingKey(cluster: string, kind: string, object: string): string {
  const w = (s: string) => s.replace(/[.*#]/g, '_') || '_';
  return `${w(cluster)}.${w(kind)}.${w(object)}`;
}

export async function startAmqpPublisher(o: AmqpPublisherOptions): Promise<AmqpPublisher> {
  const k = keys(o.cluster);
  const cursorKey = amqpCursorKey(o.cluster);
  const log = o.log ?? ((level, msg) => process.stderr.write(`amqp ${level}: ${msg}\n`));
  let stopped = false;
  let published = 0;
  let conn: amqp.ChannelModel | undefined;
  let ch: amqp.ConfirmChannel | undefined;
  let wake: (() => void) | undefined;
  const sleep = (ms: number) =>
    new Promise<void>((r) => {
      const t = setTimeout(r, ms);
      wake = () => {
        clearTimeout(t);
        r();
      };
    });

  const drop = async () => {
    const c = conn;
    conn = undefined;
    ch = undefined;
    await c?.close().catch(() => undefined);
  };

  const connect = async () => {
    const c = await amqp.connect(o.url, { timeout: amqpConnectTimeoutMs });
    c.on('error', () => undefined);
    c.on('close', () => {
      if (conn === c) {
        conn = undefined;
        ch = undefined;
      }
    });
    const channel = await c.createConfirmChannel();
    channel.on('error', () => undefined);
    await channel.assertExchange(amqpExchange, 'topic', { durable: true });
    conn = c;
    ch = channel;
    log('info', `connected to ${o.url.replace(/\/\/[^@]*@/, '//')}; publishing to exchange ${amqpExchange}`);
  };

  /** publish one batch after the cursor; returns how many were confirmed */
  const pump = async (): Promise<number> => {
    const cur = await o.store.get(cursorKey);
    const after = cur?.value ?? '';
    const r = await o.store.range(k.events, {
      fromKey: after ? k.events + after + '\0' : k.events,
      limit: amqpBatchMax,
    });
    if (r.kvs.length === 0) return 0;
    const channel = ch;
    if (!channel) throw new Error('no channel');
    for (const kv of r.kvs) {
      let kind = 'unknown';
      let object = 'unknown';
      try {
        const e = JSON.parse(kv.value) as { kind: string; object: string };
        kind = e.kind;
        object = e.object;
      } catch {
        // published as is, under unknown.unknown
      }
      const id = kv.key.slice(k.events.length);
      channel.publish(amqpExchange, routingKey(o.cluster, kind, object), Buffer.from(kv.value), {
        persistent: true,
        contentType: 'application/json',
        messageId: id,
        appId: 'corral',
      });
    }
    await channel.waitForConfirms();
    const last = r.kvs[r.kvs.length - 1]!.key.slice(k.events.length);
    // compare-and-swap: another publisher may have advanced it (then we re-read)
    await o.store.txn({
      compare: [{ key: cursorKey, target: 'modRevision', op: '==', value: cur?.modRevision ?? 0 }],
      success: [{ type: 'put', key: cursorKey, value: last }],
    });
    published += r.kvs.length;
    return r.kvs.length;
  };

  const loop = async () => {
    let backoffMs = amqpRetryMinMs;
    while (!stopped) {
      try {
        if (!ch) await connect();
        const n = await pump();
        backoffMs = amqpRetryMinMs;
        if (n < amqpBatchMax) await sleep(amqpPollEveryMs);
      } catch (err) {
        if (stopped) break;
        log(
          'warn',
          `publishing paused (${(err as Error).message}); events stay queued in the store; retry in ${backoffMs} ms`,
        );
        await drop();
        await sleep(backoffMs);
        backoffMs = Math.min(amqpRetryMaxMs, backoffMs * 2);
      }
    }
  };
  const running = loop();
  return {
    published: () => published,
    connected: () => ch !== undefined,
    close: async () => {
      stopped = true;
      wake?.();
      await running;
      await drop();
    },
  };
}
