// Events to AMQP against a real rabbitmq-server started by the test on loopback (own node name,
// ports, mnesia dir, epmd port). The broker is stopped mid-run: events written meanwhile wait in
// the store and are published once it is back; none is lost.
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { connect as tcpConnect } from 'node:net';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import amqp from 'amqplib';
import { openStore } from '../src/store/index.js';
import type { Store } from '../src/store/types.js';
import { keys } from '../src/core/keys.js';
import { amqpCursorKey, amqpExchange, startAmqpPublisher, type AmqpPublisher } from '../src/events/amqp.js';
import type { ClusterEvent } from '../src/core/types.js';

const rabbitBin = '/usr/lib/rabbitmq/bin/rabbitmq-server';
/** a broker on a loaded 2-core machine can take half a minute to start */
const brokerStartMs = 90000;
const base = 21000 + (process.pid % 500) * 4;
const amqpPort = base;
const distPort = base + 1;
const epmdPort = base + 2;

function portOpen(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = tcpConnect(port, '127.0.0.1');
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
}

async function waitFor(
  what: string,
  cond: () => Promise<boolean> | boolean,
  timeoutMs: number,
): Promise<void> {
  const t0 = Date.now();
  while (!(await cond())) {
    if (Date.now() - t0 > timeoutMs) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

describe('AMQP event publisher', { timeout: 300_000 }, () => {
  if (!existsSync(rabbitBin)) {
    it('needs rabbitmq-server', (t) =>
      t.skip('needs rabbitmq-server: apt-get install rabbitmq-server (scripts/setup.sh does)'));
    return;
  }
  const dir = mkdtempSync(join(tmpdir(), 'corral-amqp-'));
  const env = {
    ...process.env,
    HOME: dir,
    RABBITMQ_NODENAME: `corral${process.pid}@localhost`,
    RABBITMQ_NODE_IP_ADDRESS: '127.0.0.1',
    RABBITMQ_NODE_PORT: String(amqpPort),
    RABBITMQ_DIST_PORT: String(distPort),
    ERL_EPMD_ADDRESS: '127.0.0.1',
    ERL_EPMD_PORT: String(epmdPort),
    RABBITMQ_MNESIA_BASE: join(dir, 'mnesia'),
    RABBITMQ_LOG_BASE: join(dir, 'log'),
    RABBITMQ_ENABLED_PLUGINS_FILE: join(dir, 'enabled_plugins'),
    RABBITMQ_CONFIG_FILE: join(dir, 'rabbitmq'),
    RABBITMQ_ADVANCED_CONFIG_FILE: join(dir, 'advanced.config'),
    RABBITMQ_PID_FILE: join(dir, 'rabbit.pid'),
  };
  let broker: ChildProcess | undefined;
  let store: Store;
  let pub: AmqpPublisher | undefined;
  const url = `amqp://guest:guest@127.0.0.1:${amqpPort}`;
  const k = keys('amq');
  let n = 0;

  const startBroker = async () => {
    broker = spawn(rabbitBin, [], { env, cwd: dir, detached: true, stdio: 'ignore' });
    await waitFor('rabbitmq to listen', () => portOpen(amqpPort), brokerStartMs);
  };
  const stopBroker = async () => {
    if (!broker?.pid) return;
    try {
      process.kill(-broker.pid, 'SIGTERM');
    } catch {
      // already gone
    }
    await waitFor('rabbitmq to stop', async () => !(await portOpen(amqpPort)), 30000);
    await waitFor(
      'rabbitmq process group to exit',
      () => broker?.exitCode !== null || broker.signalCode !== null,
      30000,
    );
    broker = undefined;
  };
  const event = async () => {
    const e: ClusterEvent = {
      atMs: Date.now(),
      kind: 'resource',
      object: `svc.${++n}`,
      action: 'state',
      message: `event ${n}`,
      by: 'test',
    };
    await store.put(k.event(e.atMs, 'test', n), JSON.stringify(e));
  };
  /** consume everything in the durable test queue for a while; returns message ids and routing keys */
  const drain = async (want: number): Promise<{ id: string; key: string }[]> => {
    const conn = await amqp.connect(url);
    const ch = await conn.createChannel();
    const got: { id: string; key: string }[] = [];
    await ch.consume('corral-test', (m) => {
      if (!m) return;
      got.push({ id: String(m.properties.messageId), key: m.fields.routingKey });
      ch.ack(m);
    });
    await waitFor(`${want} messages`, () => got.length >= want, 30000).finally(() => conn.close());
    return got;
  };

  before(async () => {
    writeFileSync(join(dir, 'enabled_plugins'), '[].\n');
    store = await openStore(`sqlite:${join(dir, 'store.db')}`);
    await startBroker();
    const conn = await amqp.connect(url);
    const ch = await conn.createChannel();
    await ch.assertExchange(amqpExchange, 'topic', { durable: true });
    await ch.assertQueue('corral-test', { durable: true });
    await ch.bindQueue('corral-test', amqpExchange, 'amq.#');
    await conn.close();
  });
  after(async () => {
    await pub?.close();
    await store?.close();
    await stopBroker().catch(() => undefined);
    spawnSync('epmd', ['-kill'], { env, timeout: 5000 });
    rmSync(dir, { recursive: true, force: true });
  });

  it('publishes every event with its routing key, and none is lost while the broker is down', async () => {
    for (let i = 0; i < 3; i++) await event();
    pub = await startAmqpPublisher({ store, cluster: 'amq', url, log: () => undefined });
    const first = await drain(3);
    assert.deepEqual(
      first.map((m) => m.key),
      ['amq.resource.svc_1', 'amq.resource.svc_2', 'amq.resource.svc_3'],
    );

    await stopBroker();
    for (let i = 0; i < 5; i++) await event();
    await waitFor('the publisher to notice the broker is gone', () => !pub!.connected(), 15000);
    const cursor = (await store.get(amqpCursorKey('amq')))?.value ?? '';
    assert.match(cursor, /-test-000003$/, 'the cursor stays at the last confirmed event');

    await startBroker();
    await waitFor('the backlog to be published', () => pub!.published() >= 8, 30000);
    const rest = await drain(5);
    const all = [...first, ...rest];
    assert.equal(new Set(all.map((m) => m.id)).size, 8, 'every event arrived');
    assert.deepEqual(
      rest.map((m) => m.key),
      [4, 5, 6, 7, 8].map((i) => `amq.resource.svc_${i}`),
    );
    assert.match((await store.get(amqpCursorKey('amq')))?.value ?? '', /-test-000008$/);
  });
});
