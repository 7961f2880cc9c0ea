// The API's in-memory status view answers exactly what one store read (readStatus) answers, after
// any mix of writes, deletes, lease expiry and a watch restart; its JSON is serialised once per change.
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { openStore } from '../src/store/index.js';
import type { Store } from '../src/store/types.js';
import { keys } from '../src/core/keys.js';
import { ResourceSpec } from '../src/core/spec.js';
import { readStatus, type StatusData } from '../src/cli/status.js';
import { Hub } from '../src/api/hub.js';
import { StatusView, statusEventsMax, statusRebuildEveryMs } from '../src/api/status-view.js';

const nodes = ['n1', 'n2', 'n3'];
const k = keys('sv');

function without(s: StatusData): Omit<StatusData, 'nowMs'> {
  const { nowMs: _n, ...rest } = s;
  return rest;
}

describe('status view', { timeout: 60_000 }, () => {
  const dir = mkdtempSync(join(tmpdir(), 'corral-status-view-'));
  let store: Store;
  let hub: Hub;
  let view: StatusView;
  let builds = 0;
  let loads = 0;

  /** wait until the hub has seen every write, then compare with a fresh store read */
  async function same(what: string): Promise<void> {
    const rev = await store.revision();
    const t0 = Date.now();
    while (hub.revision < rev) {
      if (Date.now() - t0 > 10_000) throw new Error(`${what}: hub stuck at ${hub.revision} < ${rev}`);
      await new Promise((r) => setTimeout(r, 10));
    }
    const fromStore = await readStatus(store, 'sv', k, nodes, statusEventsMax);
    const fromView = await view.status();
    assert.deepEqual(without(fromView), without(fromStore), what);
    const json = JSON.parse(await view.json()) as StatusData;
    assert.deepEqual(
      without(json),
      JSON.parse(JSON.stringify(without(fromStore))) as object,
      `${what} (json)`,
    );
    assert.ok(Math.abs(json.nowMs - Date.now()) < 1000);
  }

  let seq = 0;
  const event = (object: string, message: string) =>
    store.put(
      k.event(Date.now(), 'test', ++seq),
      JSON.stringify({ atMs: Date.now(), kind: 'resource', object, action: 'state', message, by: 'test' }),
    );

  before(async () => {
    store = await openStore(`sqlite:${join(dir, 'store.db')}`);
    for (let i = 0; i < 30; i++) await event('x', `old event ${i}`);
    for (const n of nodes)
      await store.put(
        k.node(n),
        JSON.stringify({ name: n, address: '127.0.0.1', capacity: { cpus: 4, memory: 1024 }, labels: {} }),
      );
    hub = new Hub(store, k, () => undefined);
    await hub.start();
    view = new StatusView(
      store,
      'sv',
      k,
      nodes,
      hub,
      () => loads++,
      () => builds++,
    );
    await view.start();
  });
  after(async () => {
    await hub.close();
    await store.close();
    rmSync(dir, { recursive: true, force: true });
  });

  it('matches a store read after writes, deletes and lease expiry', async () => {
    await same('at start');
    for (let i = 0; i < 10; i++) {
      await store.put(
        k.resource(`r${i}`),
        JSON.stringify(ResourceSpec.parse({ id: `r${i}`, process: { command: ['true'] }, memory: 8 })),
      );
      await store.put(
        k.assign(`r${i}`),
        JSON.stringify({
          id: `r${i}`,
          state: 'started',
          reason: 'placed',
          node: nodes[i % 3],
          run: true,
          epoch: 1,
          sinceMs: 1000 + i,
          failures: [],
          relocations: 0,
        }),
      );
      await store.put(
        k.status(nodes[i % 3]!, `r${i}`),
        JSON.stringify({ state: 'running', reason: 'ok', epoch: 1 }),
      );
      await event(`r${i}`, `r${i}: started`);
    }
    await store.put(
      k.nodeStatus('n2'),
      JSON.stringify({ state: 'suspect', reason: 'lease expired', sinceMs: 5 }),
    );
    await store.put(k.nodeAdmin('n3'), JSON.stringify({ maintenance: true }));
    await same('after defining 10 resources');

    const lease = await store.leaseGrant(300);
    await store.put(k.leader, JSON.stringify({ node: 'n1', term: 4, sinceMs: 1 }), { lease });
    await store.put(k.term, '4');
    await same('with a leader');
    assert.equal((await view.status()).leader?.node, 'n1');

    await store.delete(k.resource('r3'));
    await store.delete(k.assign('r3'));
    await store.deletePrefix(k.statusesOf('n1'));
    await store.put(k.flags, JSON.stringify({ armed: false }));
    // the leader's lease runs out: its key goes, the view sees the delete
    const t0 = Date.now();
    while ((await store.get(k.leader)) && Date.now() - t0 < 5000)
      await new Promise((r) => setTimeout(r, 100));
    await same('after deletes and the leader lease expiring');
    assert.equal((await view.status()).leader, null);
  });

  it('builds once per change, not per request', async () => {
    await same('before');
    const b0 = builds;
    for (let i = 0; i < 50; i++) await view.json();
    assert.equal(builds, b0, 'no change: no rebuild');
    await event('r1', 'one more');
    await same('after one event');
    assert.equal(builds, b0 + 1);
  });

  it('reads everything again after a watch restart, keeping writes made meanwhile', async () => {
    const l0 = loads;
    const writes = (async () => {
      for (let i = 0; i < 20; i++) {
        await store.put(k.nodeStatus('n1'), JSON.stringify({ state: 'online', reason: `w${i}`, sinceMs: i }));
        await event('n1', `w${i}`);
      }
    })();
    hub.emit('reset', hub.revision);
    await writes;
    await same('after a reset during writes');
    assert.equal(loads, l0 + 1);
    assert.equal((await view.status()).events.at(-1)?.message, 'w19');
  });

  it(`during a storm of changes json() rebuilds at most every ${statusRebuildEveryMs} ms and is never older than that`, async () => {
    await same('before the storm');
    const b0 = builds;
    const t0 = performance.now();
    let stalest = 0;
    let writing = true;
    const writes = (async () => {
      for (let i = 0; performance.now() - t0 < 6 * statusRebuildEveryMs; i++) {
        await store.put(k.nodeStatus('n2'), JSON.stringify({ state: 'online', reason: `s${i}`, sinceMs: i }));
        await new Promise((r) => setTimeout(r, 3));
      }
      writing = false;
    })();
    // the revision each answer carries, against when the hub saw it
    const seenAt = new Map<number, number>();
    hub.on('change', (rev: number) => seenAt.set(rev, performance.now()));
    while (writing) {
      const s = JSON.parse(await view.json()) as StatusData;
      // the first revision after the one served: how long ago the served status became outdated
      const newer = [...seenAt].filter(([rev]) => rev > s.revision).map(([, at]) => at);
      if (newer.length) stalest = Math.max(stalest, performance.now() - Math.min(...newer));
      await new Promise((r) => setTimeout(r, 2));
    }
    await writes;
    const storm = performance.now() - t0;
    assert.ok(
      builds - b0 <= storm / statusRebuildEveryMs + 2,
      `${builds - b0} rebuilds in ${storm.toFixed(0)} ms of changes`,
    );
    // one rebuild's time beyond the bound on this busy machine
    assert.ok(stalest < statusRebuildEveryMs + 150, `a status outdated for ${stalest.toFixed(0)} ms`);
    // after the storm the timer brings json() up to date without a status() call
    const rev = await store.revision();
    const t1 = Date.now();
    while ((JSON.parse(await view.json()) as StatusData).revision < rev) {
      assert.ok(Date.now() - t1 < 2000, 'json() did not catch up after the storm');
      await new Promise((r) => setTimeout(r, 10));
    }
    await same('after the storm');
  });
});
