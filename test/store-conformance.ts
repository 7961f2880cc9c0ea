// The Store conformance suite: the definition of the semantics in src/store/types.ts. Every
// backend runs it (test/store-sqlite.test.ts, the etcd backend's test, the simulator's store).
//
// Tests never assume an empty store or absolute revision numbers (etcd starts at revision 1
// with no write, and a backend may share one server between suites): every test works under
// its own unique key prefix and checks revision differences. Lease TTLs are 1000-2000 ms
// because etcd rounds TTLs up to whole seconds (and may raise them to its minimum); waits
// poll with a bound instead of sleeping a fixed long time.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import type { KeyValue, Store, StoreError, TxnOpResult, WatchEvent } from '../src/store/types.js';

export interface OpenedStore {
  store: Store;
  /** a second, independent client of the same store (another connection / instance) */
  openAnother?: () => Promise<Store>;
  /** close what open() created and remove its files/servers */
  cleanup: () => Promise<void>;
}

/** how long any single expectation may wait for the store to catch up */
export const conformanceWaitMsMax = 10_000;
const testTimeoutMs = 60_000;
/** a lease granted by the lease tests */
const leaseTtlMs = 1000;
/** time given to a cancelled watcher to (wrongly) deliver something */
const quietPeriodMs = 300;

let uniqueSeq = 0;
/** a fresh key prefix, unique across processes and runs */
export function uniquePrefix(name: string): string {
  uniqueSeq += 1;
  return `/conformance/${process.pid}-${Date.now().toString(36)}-${uniqueSeq}/${name}/`;
}

export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/** poll until check() returns a truthy value; fails naming `what` after timeoutMs */
export async function waitFor<T>(
  what: string,
  check: () => T | Promise<T>,
  timeoutMs = conformanceWaitMsMax,
  everyMs = 20,
): Promise<NonNullable<T>> {
  const deadlineMs = Date.now() + timeoutMs;
  for (;;) {
    const v = await check();
    if (v) return v as NonNullable<T>;
    if (Date.now() >= deadlineMs) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(everyMs);
  }
}

/** assert that p rejects with a StoreError of this code; returns it */
export async function rejectsWith(p: Promise<unknown>, code: string, what = code): Promise<StoreError> {
  let err: unknown;
  try {
    await p;
  } catch (e) {
    err = e;
  }
  assert.ok(err, `${what}: expected a ${code} error, but the call succeeded`);
  const se = err as StoreError;
  assert.equal(se.code, code, `${what}: expected ${code}, got ${se.code}: ${se.message}`);
  assert.ok(se.message.length > 0, `${what}: error has a message`);
  return se;
}

/** a watch callback pair recording every batch and error */
export class WatchLog {
  batches: WatchEvent[][] = [];
  errors: StoreError[] = [];
  readonly onEvents = (events: WatchEvent[]): void => {
    this.batches.push(events);
  };
  readonly onError = (err: StoreError): void => {
    this.errors.push(err);
  };
  get events(): WatchEvent[] {
    return this.batches.flat();
  }
  async waitEvents(n: number, what = `${n} watch events`): Promise<WatchEvent[]> {
    await waitFor(what, () => {
      if (this.errors.length > 0) throw new Error(`${what}: watch failed: ${this.errors[0]?.message}`);
      return this.events.length >= n;
    });
    return this.events;
  }
  async waitError(what = 'a watch error'): Promise<StoreError> {
    return waitFor(what, () => this.errors[0]);
  }
}

/** revisions are strictly ordered and each revision arrives in exactly one batch */
export function assertWellFormedBatches(batches: WatchEvent[][]): void {
  let last = 0;
  for (const b of batches) {
    assert.ok(b.length > 0, 'no empty batches');
    for (const e of b) {
      assert.ok(e.revision >= last, `events out of order: ${e.revision} after ${last}`);
      assert.equal(e.kv.modRevision, e.revision, 'event revision = kv.modRevision');
      last = e.revision;
    }
  }
  const seenIn = new Map<number, number>();
  batches.forEach((b, i) => {
    for (const e of b) {
      const j = seenIn.get(e.revision);
      assert.ok(j === undefined || j === i, `revision ${e.revision} split across batches ${j} and ${i}`);
      seenIn.set(e.revision, i);
    }
  });
}

function opGet(r: TxnOpResult | undefined): KeyValue | undefined {
  assert.equal(r?.type, 'get');
  return r.type === 'get' ? r.kv : undefined;
}

export function storeConformance(name: string, open: () => Promise<OpenedStore>): void {
  describe(`Store conformance: ${name}`, { timeout: 10 * testTimeoutMs }, () => {
    let opened: OpenedStore;
    let s: Store;
    const t = { timeout: testTimeoutMs };
    before(async () => {
      opened = await open();
      s = opened.store;
    });
    after(async () => {
      await opened?.store.close();
      await opened?.cleanup();
    });

    describe('keys, ranges and revisions', () => {
      it('put/get: a new key has version 1 and create = mod revision; revisions grow by one', t, async () => {
        const p = uniquePrefix('put');
        assert.equal(await s.get(`${p}missing`), undefined);
        const r0 = await s.revision();
        const w1 = await s.put(`${p}a`, 'one');
        assert.equal(w1.revision, r0 + 1, 'a put is one revision');
        assert.equal(await s.revision(), w1.revision);
        assert.deepEqual(await s.get(`${p}a`), {
          key: `${p}a`,
          value: 'one',
          createRevision: w1.revision,
          modRevision: w1.revision,
          version: 1,
          lease: 0,
        });
        const w2 = await s.put(`${p}a`, 'two');
        assert.equal(w2.revision, w1.revision + 1);
        const kv = await s.get(`${p}a`);
        assert.equal(kv?.value, 'two');
        assert.equal(kv?.version, 2);
        assert.equal(kv?.createRevision, w1.revision);
        assert.equal(kv?.modRevision, w2.revision);
        const w3 = await s.put(`${p}b`, '');
        assert.equal(w3.revision, w2.revision + 1);
        assert.equal((await s.get(`${p}b`))?.value, '', 'empty values are values');
      });

      it('delete and recreate: the recreated key starts again at version 1', t, async () => {
        const p = uniquePrefix('delete');
        const c = await s.put(`${p}k`, 'v1');
        await s.put(`${p}k`, 'v2');
        const d = await s.delete(`${p}k`);
        assert.equal(d.deleted, 1);
        assert.equal(d.revision, c.revision + 2);
        assert.equal(await s.get(`${p}k`), undefined);
        const d2 = await s.delete(`${p}k`);
        assert.equal(d2.deleted, 0, 'deleting a missing key deletes nothing');
        assert.equal(d2.revision, d.revision, 'and writes no revision');
        assert.equal(await s.revision(), d.revision);
        const again = await s.put(`${p}k`, 'v3');
        const kv = await s.get(`${p}k`);
        assert.equal(kv?.version, 1);
        assert.equal(kv?.createRevision, again.revision);
        assert.equal(kv?.modRevision, again.revision);
      });

      it('deletePrefix deletes only that prefix, in one revision', t, async () => {
        const p = uniquePrefix('delprefix');
        for (const k of ['a/1', 'a/2', 'a/3', 'ab', 'b/1']) await s.put(`${p}${k}`, k);
        const r0 = await s.revision();
        const d = await s.deletePrefix(`${p}a/`);
        assert.equal(d.deleted, 3);
        assert.equal(d.revision, r0 + 1);
        const left = await s.range(p);
        assert.deepEqual(
          left.kvs.map((kv) => kv.key),
          [`${p}ab`, `${p}b/1`],
        );
        const none = await s.deletePrefix(`${p}zzz/`);
        assert.equal(none.deleted, 0);
        assert.equal(none.revision, d.revision);
      });

      it('range: prefix, key order (UTF-8 bytes), limit and more, served revision', t, async () => {
        const p = uniquePrefix('range');
        // in UTF-8 byte order: 'z' (7a) < 'é' (c3 a9) < U+FFFD (ef bf bd) < U+1F600 (f0 9f 98 80);
        // JavaScript's default sort (UTF-16) would put U+1F600 before U+FFFD
        const names = ['\u{1F600}', 'z', '\uFFFD', 'é', 'a/2', 'a/10', 'a/1', 'a'];
        for (const n of names) await s.put(`${p}${n}`, `v-${n}`);
        await s.put(`${p.slice(0, -1)}X`, 'sibling outside the prefix');
        const all = await s.range(p);
        assert.deepEqual(
          all.kvs.map((kv) => kv.key.slice(p.length)),
          ['a', 'a/1', 'a/10', 'a/2', 'z', 'é', '\uFFFD', '\u{1F600}'],
        );
        assert.equal(all.more, false);
        assert.equal(all.revision, await s.revision());
        assert.equal(all.kvs[0]?.value, 'v-a');
        const sub = await s.range(`${p}a/`);
        assert.deepEqual(
          sub.kvs.map((kv) => kv.key.slice(p.length)),
          ['a/1', 'a/10', 'a/2'],
        );
        const lim = await s.range(p, { limit: 3 });
        assert.equal(lim.kvs.length, 3);
        assert.equal(lim.more, true);
        const exact = await s.range(`${p}a/`, { limit: 3 });
        assert.equal(exact.kvs.length, 3);
        assert.equal(exact.more, false, 'limit equal to the count is not cut short');
        const unicode = await s.range(`${p}\u{1F600}`);
        assert.equal(unicode.kvs.length, 1);
        const empty = await s.range(`${p}nothing/`);
        assert.deepEqual(empty.kvs, []);
        assert.equal(empty.more, false);
      });

      it('range fromKey pages through a prefix', t, async () => {
        const p = uniquePrefix('page');
        for (let i = 0; i < 7; i++) await s.put(`${p}k${i}`, String(i));
        const page1 = await s.range(p, { limit: 3 });
        assert.equal(page1.more, true);
        const last = page1.kvs[2]?.key ?? '';
        const page2 = await s.range(p, { limit: 3, fromKey: `${last}\0` });
        assert.deepEqual(
          page2.kvs.map((kv) => kv.value),
          ['3', '4', '5'],
          'fromKey starts the page at that key',
        );
        const page3 = await s.range(p, { limit: 3, fromKey: `${page2.kvs[2]?.key}\0` });
        assert.deepEqual(
          page3.kvs.map((kv) => kv.value),
          ['6'],
        );
        assert.equal(page3.more, false);
        const incl = await s.range(p, { fromKey: `${p}k5` });
        assert.deepEqual(
          incl.kvs.map((kv) => kv.value),
          ['5', '6'],
          'fromKey is inclusive',
        );
      });

      it('bad requests are rejected with CORRAL_STORE_BAD_REQUEST', t, async () => {
        await rejectsWith(s.put('', 'x'), 'CORRAL_STORE_BAD_REQUEST', 'put with an empty key');
        await rejectsWith(s.range('x', { limit: -1 }), 'CORRAL_STORE_BAD_REQUEST', 'negative limit');
        await rejectsWith(s.leaseGrant(0), 'CORRAL_STORE_BAD_REQUEST', 'lease TTL 0');
        await rejectsWith(
          s.compact((await s.revision()) + 1000),
          'CORRAL_STORE_BAD_REQUEST',
          'future compact',
        );
      });
    });

    describe('transactions', () => {
      it('compares on value, version, createRevision and modRevision', t, async () => {
        const p = uniquePrefix('cmp');
        const k = `${p}k`;
        const c = await s.put(k, 'm');
        const m = await s.put(k, 'm');
        const check = async (cmp: Parameters<Store['txn']>[0]['compare'][number], expect: boolean) => {
          const r = await s.txn({ compare: [cmp], success: [] });
          assert.equal(r.succeeded, expect, `${cmp.target} ${cmp.op} ${JSON.stringify(cmp.value)}`);
        };
        await check({ key: k, target: 'value', op: '==', value: 'm' }, true);
        await check({ key: k, target: 'value', op: '==', value: 'x' }, false);
        await check({ key: k, target: 'value', op: '!=', value: 'x' }, true);
        await check({ key: k, target: 'value', op: '<', value: 'n' }, true);
        await check({ key: k, target: 'value', op: '<', value: 'm' }, false);
        await check({ key: k, target: 'value', op: '>', value: 'l' }, true);
        await check({ key: k, target: 'value', op: '>', value: 'mm' }, false);
        await check({ key: k, target: 'version', op: '==', value: 2 }, true);
        await check({ key: k, target: 'version', op: '>', value: 1 }, true);
        await check({ key: k, target: 'version', op: '<', value: 2 }, false);
        await check({ key: k, target: 'createRevision', op: '==', value: c.revision }, true);
        await check({ key: k, target: 'createRevision', op: '!=', value: c.revision }, false);
        await check({ key: k, target: 'modRevision', op: '==', value: m.revision }, true);
        await check({ key: k, target: 'modRevision', op: '<', value: m.revision + 1 }, true);
        await check({ key: k, target: 'modRevision', op: '>', value: m.revision }, false);
      });

      it("a compare on a missing key sees value '', version 0 and revisions 0", t, async () => {
        const k = `${uniquePrefix('missing')}k`;
        const ok = async (cmp: Parameters<Store['txn']>[0]['compare'][number]) =>
          (await s.txn({ compare: [cmp], success: [] })).succeeded;
        assert.equal(await ok({ key: k, target: 'version', op: '==', value: 0 }), true);
        assert.equal(await ok({ key: k, target: 'version', op: '>', value: 0 }), false);
        assert.equal(await ok({ key: k, target: 'createRevision', op: '==', value: 0 }), true);
        assert.equal(await ok({ key: k, target: 'modRevision', op: '==', value: 0 }), true);
        assert.equal(await ok({ key: k, target: 'modRevision', op: '<', value: 1 }), true);
        assert.equal(await ok({ key: k, target: 'value', op: '==', value: 'x' }), false);
        assert.equal(await ok({ key: k, target: 'value', op: '==', value: '' }), true);
        assert.equal(await ok({ key: k, target: 'value', op: '!=', value: 'x' }), true);
      });

      it('then/else branches: all four ops, results, one revision per write txn', t, async () => {
        const p = uniquePrefix('txn');
        await s.put(`${p}del`, 'd');
        await s.put(`${p}r/1`, '1');
        await s.put(`${p}r/2`, '2');
        await s.put(`${p}dp/1`, '1');
        await s.put(`${p}dp/2`, '2');
        const r0 = await s.revision();
        const res = await s.txn({
          compare: [{ key: `${p}guard`, target: 'version', op: '==', value: 0 }],
          success: [
            { type: 'put', key: `${p}guard`, value: 'g' },
            { type: 'put', key: `${p}other`, value: 'o' },
            { type: 'delete', key: `${p}del` },
            { type: 'deletePrefix', prefix: `${p}dp/` },
            { type: 'get', key: `${p}r/1` },
            { type: 'range', prefix: `${p}r/`, limit: 1 },
          ],
          failure: [{ type: 'put', key: `${p}lost`, value: 'x' }],
        });
        assert.equal(res.succeeded, true);
        assert.equal(res.revision, r0 + 1, 'one write txn = one revision');
        assert.deepEqual(res.results[0], { type: 'put', revision: r0 + 1 });
        assert.deepEqual(res.results[1], { type: 'put', revision: r0 + 1 });
        assert.deepEqual(res.results[2], { type: 'delete', deleted: 1 });
        assert.deepEqual(res.results[3], { type: 'delete', deleted: 2 });
        assert.equal(opGet(res.results[4])?.value, '1');
        const rr = res.results[5];
        assert.equal(rr?.type, 'range');
        if (rr?.type === 'range') {
          assert.deepEqual(
            rr.kvs.map((kv) => kv.key),
            [`${p}r/1`],
          );
          assert.equal(rr.more, true);
        }
        assert.equal((await s.get(`${p}guard`))?.modRevision, r0 + 1);
        assert.equal((await s.get(`${p}other`))?.modRevision, r0 + 1);
        assert.equal(await s.get(`${p}lost`), undefined);

        const again = await s.txn({
          compare: [{ key: `${p}guard`, target: 'version', op: '==', value: 0 }],
          success: [{ type: 'put', key: `${p}lost`, value: 'x' }],
          failure: [
            { type: 'get', key: `${p}guard` },
            { type: 'put', key: `${p}else`, value: 'e' },
          ],
        });
        assert.equal(again.succeeded, false);
        assert.equal(again.revision, r0 + 2);
        assert.equal(opGet(again.results[0])?.value, 'g');
        assert.deepEqual(again.results[1], { type: 'put', revision: r0 + 2 });
        assert.equal(await s.get(`${p}lost`), undefined);
        assert.equal((await s.get(`${p}else`))?.value, 'e');

        const noElse = await s.txn({
          compare: [{ key: `${p}guard`, target: 'value', op: '==', value: 'nope' }],
          success: [{ type: 'put', key: `${p}lost`, value: 'x' }],
        });
        assert.equal(noElse.succeeded, false);
        assert.deepEqual(noElse.results, []);
        assert.equal(noElse.revision, r0 + 2, 'a txn that writes nothing keeps the revision');

        const readOnly = await s.txn({ compare: [], success: [{ type: 'get', key: `${p}guard` }] });
        assert.equal(readOnly.succeeded, true);
        assert.equal(readOnly.revision, r0 + 2);
        assert.equal(await s.revision(), r0 + 2);
      });

      it('a branch may not write one key twice (etcd rule)', t, async () => {
        const p = uniquePrefix('dup');
        const r0 = await s.revision();
        const branches: Parameters<Store['txn']>[0]['success'][] = [
          [
            { type: 'put', key: `${p}a`, value: '1' },
            { type: 'put', key: `${p}a`, value: '2' },
          ],
          [
            { type: 'put', key: `${p}a`, value: '1' },
            { type: 'delete', key: `${p}a` },
          ],
          [
            { type: 'deletePrefix', prefix: p },
            { type: 'put', key: `${p}a`, value: '1' },
          ],
        ];
        for (const success of branches)
          await rejectsWith(
            s.txn({ compare: [], success }),
            'CORRAL_STORE_BAD_REQUEST',
            JSON.stringify(success),
          );
        assert.equal(await s.revision(), r0, 'nothing written');
        const ok = await s.txn({
          compare: [],
          success: [
            { type: 'put', key: `${p}a`, value: '1' },
            { type: 'get', key: `${p}a` },
            { type: 'delete', key: `${p}b` },
            { type: 'deletePrefix', prefix: `${p}c/` },
          ],
        });
        assert.equal(ok.succeeded, true, 'reads and disjoint deletes beside a put are fine');
      });

      it('several compares must all hold', t, async () => {
        const p = uniquePrefix('multi');
        await s.put(`${p}a`, '1');
        await s.put(`${p}b`, '2');
        const both = await s.txn({
          compare: [
            { key: `${p}a`, target: 'value', op: '==', value: '1' },
            { key: `${p}b`, target: 'value', op: '==', value: '2' },
          ],
          success: [{ type: 'put', key: `${p}c`, value: 'yes' }],
        });
        assert.equal(both.succeeded, true);
        const one = await s.txn({
          compare: [
            { key: `${p}a`, target: 'value', op: '==', value: '1' },
            { key: `${p}b`, target: 'value', op: '==', value: 'x' },
          ],
          success: [{ type: 'put', key: `${p}d`, value: 'yes' }],
        });
        assert.equal(one.succeeded, false);
        assert.equal(await s.get(`${p}d`), undefined);
      });

      it('CAS race: concurrent clients incrementing one counter lose no update', t, async () => {
        const key = `${uniquePrefix('cas')}counter`;
        const clients = 6;
        const incrementsPerClient = 25;
        const attemptsMax = 5_000;
        const extra: Store[] = [];
        try {
          for (let i = 1; i < clients && opened.openAnother; i++) extra.push(await opened.openAnother());
          const stores = [s, ...extra];
          let conflicts = 0;
          const client = async (c: Store) => {
            for (let done = 0, attempts = 0; done < incrementsPerClient; attempts++) {
              assert.ok(attempts < attemptsMax, 'CAS client gave up: too many conflicts');
              const kv = await c.get(key);
              const next = String(Number(kv?.value ?? '0') + 1);
              const r = await c.txn({
                compare: [{ key, target: 'modRevision', op: '==', value: kv?.modRevision ?? 0 }],
                success: [{ type: 'put', key, value: next }],
              });
              if (r.succeeded) done++;
              else conflicts++;
            }
          };
          await Promise.all(
            Array.from({ length: clients }, (_, i) => client(stores[i % stores.length] ?? s)),
          );
          const kv = await s.get(key);
          assert.equal(kv?.value, String(clients * incrementsPerClient));
          assert.equal(kv?.version, clients * incrementsPerClient);
          // conflicts happen (or not) depending on scheduling; the count above is what matters
          assert.ok(conflicts >= 0);
        } finally {
          for (const e of extra) await e.close();
        }
      });

      it('a second client sees the first one’s writes', t, async (tt) => {
        if (!opened.openAnother) return tt.skip('backend has no second client');
        const other = await opened.openAnother();
        try {
          const k = `${uniquePrefix('another')}k`;
          const w = await s.put(k, 'from-first');
          const kv = await other.get(k);
          assert.equal(kv?.value, 'from-first');
          assert.equal(kv?.modRevision, w.revision);
          const w2 = await other.put(k, 'from-second');
          assert.equal(w2.revision, w.revision + 1, 'revisions are store-wide, not per client');
          assert.equal((await s.get(k))?.value, 'from-second');
        } finally {
          await other.close();
        }
      });
    });

    describe('leases', () => {
      it('grant, bind keys, info, revoke deletes the keys in one revision', t, async () => {
        const p = uniquePrefix('lease');
        const id = await s.leaseGrant(leaseTtlMs * 5);
        assert.ok(Number.isSafeInteger(id) && id > 0, `lease id ${id}`);
        await s.put(`${p}a`, 'A', { lease: id });
        await s.put(`${p}b`, 'B', { lease: id });
        await s.put(`${p}c`, 'C');
        assert.equal((await s.get(`${p}a`))?.lease, id);
        const info = await s.leaseInfo(id);
        assert.ok(info, 'leaseInfo of a live lease');
        assert.equal(info.id, id);
        assert.ok(info.grantedTtlMs >= leaseTtlMs * 5, `granted ${info.grantedTtlMs}`);
        assert.ok(info.remainingTtlMs > 0 && info.remainingTtlMs <= info.grantedTtlMs);
        assert.deepEqual([...info.keys].sort(), [`${p}a`, `${p}b`]);
        const r0 = await s.revision();
        await s.leaseRevoke(id);
        assert.equal(await s.revision(), r0 + 1, 'revoke deletes its keys in one revision');
        assert.equal(await s.get(`${p}a`), undefined);
        assert.equal(await s.get(`${p}b`), undefined);
        assert.equal((await s.get(`${p}c`))?.value, 'C');
        assert.equal(await s.leaseInfo(id), undefined);
        await rejectsWith(s.leaseRevoke(id), 'CORRAL_STORE_LEASE_NOT_FOUND', 'revoke twice');
        await rejectsWith(s.leaseKeepAlive(id), 'CORRAL_STORE_LEASE_NOT_FOUND', 'keepAlive after revoke');
        await rejectsWith(
          s.put(`${p}d`, 'D', { lease: id }),
          'CORRAL_STORE_LEASE_NOT_FOUND',
          'put on revoked',
        );
      });

      it('a put without a lease detaches the key from its lease', t, async () => {
        const p = uniquePrefix('detach');
        const id = await s.leaseGrant(leaseTtlMs * 5);
        await s.put(`${p}k`, 'leased', { lease: id });
        await s.put(`${p}k`, 'free');
        assert.equal((await s.get(`${p}k`))?.lease, 0);
        assert.deepEqual((await s.leaseInfo(id))?.keys, []);
        await s.leaseRevoke(id);
        assert.equal((await s.get(`${p}k`))?.value, 'free', 'revoking the lease leaves the detached key');
      });

      it('unknown leases: keepAlive, revoke, put and txn put fail with LEASE_NOT_FOUND', t, async () => {
        const p = uniquePrefix('nolease');
        const unknown = 987_654_321;
        await rejectsWith(s.leaseKeepAlive(unknown), 'CORRAL_STORE_LEASE_NOT_FOUND', 'keepAlive unknown');
        await rejectsWith(s.leaseRevoke(unknown), 'CORRAL_STORE_LEASE_NOT_FOUND', 'revoke unknown');
        assert.equal(await s.leaseInfo(unknown), undefined);
        await rejectsWith(
          s.put(`${p}k`, 'v', { lease: unknown }),
          'CORRAL_STORE_LEASE_NOT_FOUND',
          'put unknown',
        );
        const r0 = await s.revision();
        await rejectsWith(
          s.txn({
            compare: [],
            success: [
              { type: 'put', key: `${p}ok`, value: 'v' },
              { type: 'put', key: `${p}k`, value: 'v', lease: unknown },
            ],
          }),
          'CORRAL_STORE_LEASE_NOT_FOUND',
          'txn put unknown',
        );
        assert.equal(await s.get(`${p}ok`), undefined, 'a failed txn writes nothing');
        assert.equal(await s.revision(), r0);
      });

      it('keepAlive extends a lease past its TTL', t, async () => {
        const p = uniquePrefix('keepalive');
        const id = await s.leaseGrant(leaseTtlMs);
        await s.put(`${p}k`, 'v', { lease: id });
        const granted = (await s.leaseInfo(id))?.grantedTtlMs ?? leaseTtlMs;
        const untilMs = Date.now() + granted * 2 + 500;
        while (Date.now() < untilMs) {
          const ka = await s.leaseKeepAlive(id);
          assert.ok(ka.remainingTtlMs > granted / 2, `remaining ${ka.remainingTtlMs} after keepAlive`);
          await sleep(Math.min(250, granted / 4));
        }
        assert.equal((await s.get(`${p}k`))?.value, 'v', 'kept alive past two TTLs');
        await s.leaseRevoke(id);
      });

      it('an expired lease deletes its keys, watchers see deletes, the lease is gone', t, async () => {
        const p = uniquePrefix('expire');
        const log = new WatchLog();
        const w = await s.watch(p, log);
        try {
          const startMs = Date.now();
          const id = await s.leaseGrant(leaseTtlMs);
          await s.put(`${p}a`, 'A', { lease: id });
          await s.put(`${p}b`, 'B', { lease: id });
          await s.put(`${p}keep`, 'K');
          await waitFor('the leased keys to expire', async () => (await s.range(p)).kvs.length === 1);
          const tookMs = Date.now() - startMs;
          assert.ok(tookMs >= leaseTtlMs - 100, `keys vanished after ${tookMs} ms, before the TTL`);
          const events = await log.waitEvents(5, 'three puts and two delete events');
          const deletes = events.filter((e) => e.type === 'delete');
          assert.deepEqual(deletes.map((e) => e.kv.key).sort(), [`${p}a`, `${p}b`]);
          for (const d of deletes) {
            assert.equal(d.kv.value, '');
            assert.equal(d.kv.version, 0);
          }
          assertWellFormedBatches(log.batches);
          assert.equal(await s.leaseInfo(id), undefined);
          await rejectsWith(s.leaseKeepAlive(id), 'CORRAL_STORE_LEASE_NOT_FOUND', 'keepAlive of expired');
          await rejectsWith(s.leaseRevoke(id), 'CORRAL_STORE_LEASE_NOT_FOUND', 'revoke of expired');
          await rejectsWith(
            s.put(`${p}c`, 'C', { lease: id }),
            'CORRAL_STORE_LEASE_NOT_FOUND',
            'put on expired',
          );
        } finally {
          await w.cancel();
        }
      });
    });

    describe('watch', () => {
      it('from the current revision: puts and deletes in order, with full key-values', t, async () => {
        const p = uniquePrefix('watch');
        await s.put(`${p}before`, 'not seen');
        const log = new WatchLog();
        const w = await s.watch(p, log);
        try {
          const a = await s.put(`${p}a`, '1');
          const b = await s.put(`${p}a`, '2');
          const d = await s.delete(`${p}a`);
          const ev = await log.waitEvents(3);
          assert.equal(ev.length, 3, 'nothing from before the watch');
          assert.deepEqual(ev[0], {
            type: 'put',
            revision: a.revision,
            kv: {
              key: `${p}a`,
              value: '1',
              createRevision: a.revision,
              modRevision: a.revision,
              version: 1,
              lease: 0,
            },
          });
          assert.equal(ev[1]?.type, 'put');
          assert.equal(ev[1]?.kv.version, 2);
          assert.equal(ev[1]?.kv.createRevision, a.revision);
          assert.equal(ev[1]?.revision, b.revision);
          assert.equal(ev[2]?.type, 'delete');
          assert.equal(ev[2]?.kv.key, `${p}a`);
          assert.equal(ev[2]?.kv.value, '');
          assert.equal(ev[2]?.kv.version, 0);
          assert.equal(ev[2]?.kv.modRevision, d.revision);
          assert.equal(ev[2]?.revision, d.revision);
        } finally {
          await w.cancel();
        }
      });

      it('from an older revision: history is replayed in order, then live events follow', t, async () => {
        const p = uniquePrefix('replay');
        const first = await s.put(`${p}1`, 'a');
        await s.put(`${p}2`, 'b');
        await s.put(`${p.slice(0, -1)}-other`, 'not under the prefix');
        await s.delete(`${p}1`);
        const log = new WatchLog();
        const w = await s.watch(p, { ...log, startRevision: first.revision });
        try {
          await log.waitEvents(3);
          const live = await s.put(`${p}3`, 'c');
          const ev = await log.waitEvents(4);
          assert.deepEqual(
            ev.map((e) => `${e.type} ${e.kv.key.slice(p.length)}`),
            ['put 1', 'put 2', 'delete 1', 'put 3'],
          );
          assert.equal(ev[0]?.revision, first.revision);
          assert.equal(ev[3]?.revision, live.revision);
          assertWellFormedBatches(log.batches);
        } finally {
          await w.cancel();
        }
      });

      it("one txn's events arrive together, in op order, with one revision", t, async () => {
        const p = uniquePrefix('batch');
        await s.put(`${p}old`, 'x');
        const log = new WatchLog();
        const w = await s.watch(p, log);
        try {
          const r = await s.txn({
            compare: [],
            success: [
              { type: 'put', key: `${p}c`, value: '1' },
              { type: 'put', key: `${p}a`, value: '2' },
              { type: 'delete', key: `${p}old` },
              { type: 'put', key: `${p}b`, value: '3' },
            ],
          });
          await s.put(`${p}after`, 'y');
          await log.waitEvents(5);
          const batch = log.batches.find((b) => b.some((e) => e.revision === r.revision)) ?? [];
          assert.deepEqual(
            batch
              .filter((e) => e.revision === r.revision)
              .map((e) => `${e.type} ${e.kv.key.slice(p.length)}`),
            ['put c', 'put a', 'delete old', 'put b'],
          );
          assertWellFormedBatches(log.batches);
        } finally {
          await w.cancel();
        }
      });

      it('a burst of 1000 writes: every event arrives once, in revision order', t, async () => {
        const p = uniquePrefix('burst');
        const n = 1000;
        const log = new WatchLog();
        const w = await s.watch(p, log);
        try {
          const writes = await Promise.all(
            Array.from({ length: n }, (_, i) => s.put(`${p}${i % 50}`, String(i))),
          );
          const ev = await log.waitEvents(n, `${n} burst events`);
          await sleep(50);
          assert.equal(log.events.length, n, 'no duplicates');
          assertWellFormedBatches(log.batches);
          const revs = ev.map((e) => e.revision);
          assert.deepEqual(
            revs,
            writes.map((x) => x.revision).sort((a, b) => a - b),
          );
          for (let i = 1; i < revs.length; i++)
            assert.ok((revs[i] ?? 0) > (revs[i - 1] ?? 0), 'strictly increasing');
          const byRev = new Map(writes.map((x, i) => [x.revision, String(i)]));
          for (const e of ev)
            assert.equal(e.kv.value, byRev.get(e.revision), `value of revision ${e.revision}`);
        } finally {
          await w.cancel();
        }
      });

      it('prefix filtering: only keys under the prefix', t, async () => {
        const p = uniquePrefix('filter');
        const log = new WatchLog();
        const w = await s.watch(`${p}a/`, log);
        try {
          await s.put(`${p}a`, 'no');
          await s.put(`${p}a/1`, 'yes');
          await s.put(`${p}a2`, 'no');
          await s.put(`${p}b/1`, 'no');
          await s.txn({
            compare: [],
            success: [
              { type: 'put', key: `${p}b/2`, value: 'no' },
              { type: 'put', key: `${p}a/2`, value: 'yes' },
            ],
          });
          await s.deletePrefix(p);
          const ev = await log.waitEvents(4);
          await sleep(50);
          assert.deepEqual(
            log.events.map((e) => `${e.type} ${e.kv.key.slice(p.length)}`),
            ['put a/1', 'put a/2', 'delete a/1', 'delete a/2'],
          );
          assert.equal(ev[2]?.revision, ev[3]?.revision, 'deletePrefix is one revision');
          assertWellFormedBatches(log.batches);
        } finally {
          await w.cancel();
        }
      });

      it('cancel stops delivery', t, async () => {
        const p = uniquePrefix('cancel');
        const cancelled = new WatchLog();
        const control = new WatchLog();
        const w1 = await s.watch(p, cancelled);
        const w2 = await s.watch(p, control);
        try {
          await s.put(`${p}1`, 'a');
          await cancelled.waitEvents(1);
          await w1.cancel();
          await s.put(`${p}2`, 'b');
          await control.waitEvents(2);
          await sleep(quietPeriodMs);
          assert.equal(cancelled.events.length, 1, 'no event after cancel');
          assert.deepEqual(cancelled.errors, [], 'cancel is not an error');
        } finally {
          await w1.cancel();
          await w2.cancel();
        }
      });

      it(
        'resume after a disconnect from the last seen revision + 1 yields exactly the missed events',
        t,
        async () => {
          const p = uniquePrefix('resume');
          const watcherStore = opened.openAnother ? await opened.openAnother() : s;
          const log = new WatchLog();
          const w = await watcherStore.watch(p, log);
          for (let i = 0; i < 3; i++) await s.put(`${p}${i}`, `seen-${i}`);
          const seen = await log.waitEvents(3);
          const lastSeen = seen[2]?.revision ?? 0;
          // disconnect: the watcher (and its client, when there is a second one) goes away
          await w.cancel();
          if (watcherStore !== s) await watcherStore.close();
          const missed: number[] = [];
          for (let i = 3; i < 8; i++) missed.push((await s.put(`${p}${i}`, `missed-${i}`)).revision);
          await s.put(`${p.slice(0, -1)}-elsewhere`, 'not under the prefix');
          const again = opened.openAnother ? await opened.openAnother() : s;
          const log2 = new WatchLog();
          const w2 = await again.watch(p, { ...log2, startRevision: lastSeen + 1 });
          try {
            await log2.waitEvents(5);
            const live = await s.put(`${p}8`, 'live');
            const ev = await log2.waitEvents(6);
            await sleep(50);
            assert.deepEqual(
              log2.events.map((e) => e.revision),
              [...missed, live.revision],
            );
            assert.deepEqual(
              ev.slice(0, 5).map((e) => e.kv.value),
              ['missed-3', 'missed-4', 'missed-5', 'missed-6', 'missed-7'],
            );
          } finally {
            await w2.cancel();
            if (again !== s) await again.close();
          }
        },
      );

      it(
        'compaction: watching from before it fails with CORRAL_STORE_COMPACTED; state is kept',
        t,
        async () => {
          const p = uniquePrefix('compact');
          const r1 = await s.put(`${p}a`, '1');
          await s.put(`${p}a`, '2');
          const r3 = await s.put(`${p}b`, '3');
          await s.compact(r3.revision);
          await s.compact(r3.revision - 1); // compacting less than already compacted is a no-op
          assert.equal((await s.get(`${p}a`))?.value, '2', 'compaction keeps the current state');
          assert.equal((await s.get(`${p}a`))?.createRevision, r1.revision);
          assert.equal((await s.range(p)).kvs.length, 2);

          const old = new WatchLog();
          const w = await s.watch(p, { ...old, startRevision: r1.revision });
          try {
            const err = await old.waitError('the compacted error');
            assert.equal(err.code, 'CORRAL_STORE_COMPACTED');
            assert.equal(err.compactRevision, r3.revision);
            assert.match(err.message, /compact/i);
            assert.equal(old.events.length, 0);
          } finally {
            await w.cancel();
          }

          const fromCompact = new WatchLog();
          const w2 = await s.watch(p, { ...fromCompact, startRevision: r3.revision });
          try {
            const ev = await fromCompact.waitEvents(1, 'the event at the compact revision');
            assert.equal(ev[0]?.revision, r3.revision);
            assert.deepEqual(fromCompact.errors, []);
          } finally {
            await w2.cancel();
          }
        },
      );
    });

    describe('sizes', () => {
      it('large values (1 MiB) round-trip through put, get and watch', t, async () => {
        const p = uniquePrefix('large');
        const unit = 'corral-0123456789abcdef-\u00e9\u4e2d-'; // multi-byte too
        const big = unit.repeat(Math.ceil((1 << 20) / unit.length)).slice(0, 1 << 20);
        const log = new WatchLog();
        const w = await s.watch(p, log);
        try {
          await s.put(`${p}big`, big);
          const kv = await s.get(`${p}big`);
          assert.equal(kv?.value.length, big.length);
          assert.ok(kv?.value === big, 'value comes back unchanged');
          const ev = await log.waitEvents(1);
          assert.ok(ev[0]?.kv.value === big, 'watch carries the whole value');
        } finally {
          await w.cancel();
        }
        await s.delete(`${p}big`);
      });

      it(
        'many keys (10,000): counted, paged with limit and fromKey, deleted in one revision',
        t,
        async () => {
          const p = uniquePrefix('many');
          const n = 10_000;
          const perTxn = 100;
          for (let i = 0; i < n; i += perTxn) {
            const ops = Array.from({ length: perTxn }, (_, j) => ({
              type: 'put' as const,
              key: `${p}${String(i + j).padStart(5, '0')}`,
              value: String(i + j),
            }));
            await s.txn({ compare: [], success: ops });
          }
          const all = await s.range(p);
          assert.equal(all.kvs.length, n);
          assert.equal(all.more, false);
          const pageSize = 1000;
          const keys: string[] = [];
          let fromKey: string | undefined;
          for (let page = 0; page < n / pageSize + 1; page++) {
            const r = await s.range(p, { limit: pageSize, fromKey });
            keys.push(...r.kvs.map((kv) => kv.key));
            if (!r.more) break;
            assert.equal(r.kvs.length, pageSize);
            fromKey = `${r.kvs[r.kvs.length - 1]?.key}\0`;
          }
          assert.equal(keys.length, n);
          assert.deepEqual(
            keys,
            all.kvs.map((kv) => kv.key),
          );
          assert.equal(keys[1234], `${p}01234`);
          const r0 = await s.revision();
          const d = await s.deletePrefix(p);
          assert.equal(d.deleted, n);
          assert.equal(d.revision, r0 + 1);
          assert.equal((await s.range(p, { limit: 1 })).kvs.length, 0);
        },
      );
    });

    describe('closed store', () => {
      it('every call fails with CORRAL_STORE_CLOSED; watchers get onError', t, async () => {
        const mine = await open();
        try {
          const c = mine.store;
          const p = uniquePrefix('closed');
          await c.put(`${p}k`, 'v');
          const id = await c.leaseGrant(leaseTtlMs * 5);
          const log = new WatchLog();
          await c.watch(p, log);
          await c.close();
          await c.close(); // closing twice is fine
          const err = await log.waitError('onError for a watch on a closed store');
          assert.equal(err.code, 'CORRAL_STORE_CLOSED');
          const calls: [string, () => Promise<unknown>][] = [
            ['get', () => c.get(`${p}k`)],
            ['range', () => c.range(p)],
            ['put', () => c.put(`${p}k`, 'x')],
            ['delete', () => c.delete(`${p}k`)],
            ['deletePrefix', () => c.deletePrefix(p)],
            ['txn', () => c.txn({ compare: [], success: [{ type: 'get', key: `${p}k` }] })],
            ['revision', () => c.revision()],
            ['leaseGrant', () => c.leaseGrant(leaseTtlMs)],
            ['leaseKeepAlive', () => c.leaseKeepAlive(id)],
            ['leaseRevoke', () => c.leaseRevoke(id)],
            ['leaseInfo', () => c.leaseInfo(id)],
            ['watch', () => c.watch(p, new WatchLog())],
            ['compact', () => c.compact(1)],
          ];
          for (const [what, call] of calls) await rejectsWith(call(), 'CORRAL_STORE_CLOSED', what);
        } finally {
          await mine.store.close();
          await mine.cleanup();
        }
      });
    });
  });
}
