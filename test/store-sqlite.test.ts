// The sqlite backend: the conformance suite on real files, plus what only a shared file can
// show: CAS races and lease expiry across real processes, watches across processes, a corrupt
// file, a missing directory, a locked file, bad URLs.
import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { closeSync, mkdtempSync, openSync, rmSync, writeFileSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import Database from 'better-sqlite3';
import { openStore, parseStoreUrl } from '../src/store/index.js';
import { openSqliteStore, type SqliteStoreOptions } from '../src/store/sqlite.js';
import type { Store } from '../src/store/types.js';
import {
  assertWellFormedBatches,
  rejectsWith,
  storeConformance,
  uniquePrefix,
  waitFor,
  WatchLog,
} from './store-conformance.js';

const root = join(fileURLToPath(import.meta.url), '..', '..');
const childScript = join(root, 'test', 'helpers', 'store-child.ts');
/** a child process must report within this long (tsx start-up included) */
const childReportMsMax = 30_000;

const tempDirs: string[] = [];
function tempDir(): string {
  const d = mkdtempSync(join(tmpdir(), 'corral-store-'));
  tempDirs.push(d);
  return d;
}
after(() => {
  for (const d of tempDirs) rmSync(d, { recursive: true, force: true });
});

storeConformance('sqlite (file)', async () => {
  const dir = tempDir();
  const url = `sqlite:${join(dir, 'store.db')}`;
  return {
    store: await openStore(url),
    openAnother: () => openStore(url),
    cleanup: async () => rmSync(dir, { recursive: true, force: true }),
  };
});

// ---- child processes ---------------------------------------------------------------------

const children = new Set<ChildProcess>();
after(() => {
  for (const c of children) c.kill('SIGKILL');
});

interface Child {
  proc: ChildProcess;
  /** resolves with the next JSON line the child prints */
  nextReport: () => Promise<unknown>;
  exited: Promise<number | null>;
}

function startChild(...args: string[]): Child {
  const proc = spawn(process.execPath, ['--import', 'tsx', childScript, ...args], {
    cwd: root,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  children.add(proc);
  let stderr = '';
  proc.stderr?.on('data', (d: Buffer) => (stderr += d.toString()));
  const lines: string[] = [];
  const waiting: ((line: string) => void)[] = [];
  let buf = '';
  proc.stdout?.on('data', (d: Buffer) => {
    buf += d.toString();
    for (let i = buf.indexOf('\n'); i >= 0; i = buf.indexOf('\n')) {
      const line = buf.slice(0, i);
      buf = buf.slice(i + 1);
      const w = waiting.shift();
      if (w) w(line);
      else lines.push(line);
    }
  });
  const exited = new Promise<number | null>((res) =>
    proc.on('exit', (code) => {
      children.delete(proc);
      res(code);
    }),
  );
  const nextReport = () =>
    new Promise<unknown>((res, rej) => {
      const timer = setTimeout(
        () =>
          rej(
            new Error(`child ${args.join(' ')}: no report within ${childReportMsMax} ms; stderr: ${stderr}`),
          ),
        childReportMsMax,
      );
      void exited.then((code) => {
        clearTimeout(timer);
        rej(new Error(`child ${args.join(' ')} exited (${code}) without a report; stderr: ${stderr}`));
      });
      const take = (line: string) => {
        clearTimeout(timer);
        res(JSON.parse(line));
      };
      const line = lines.shift();
      if (line !== undefined) take(line);
      else waiting.push(take);
    });
  return { proc, nextReport, exited };
}

describe('sqlite store across processes', { timeout: 120_000 }, () => {
  it('CAS race between 4 processes and this one: the counter is exact', { timeout: 60_000 }, async () => {
    const dir = tempDir();
    const url = `sqlite:${join(dir, 'store.db')}`;
    const store = await openStore(url);
    try {
      const key = `${uniquePrefix('xcas')}counter`;
      const processes = 4;
      const increments = 50;
      const kids = Array.from({ length: processes }, () => startChild('cas', url, key, String(increments)));
      // this process races too, while the children run
      let mine = 0;
      for (let attempts = 0; mine < increments && attempts < 100_000; attempts++) {
        const kv = await store.get(key);
        const r = await store.txn({
          compare: [{ key, target: 'modRevision', op: '==', value: kv?.modRevision ?? 0 }],
          success: [{ type: 'put', key, value: String(Number(kv?.value ?? '0') + 1) }],
        });
        if (r.succeeded) mine++;
        await new Promise((r) => setImmediate(r));
      }
      const reports = (await Promise.all(kids.map((k) => k.nextReport()))) as {
        done: number;
        conflicts: number;
      }[];
      for (const r of reports) assert.equal(r.done, increments);
      assert.equal(mine, increments);
      const kv = await store.get(key);
      assert.equal(kv?.value, String((processes + 1) * increments));
      assert.equal(kv?.version, (processes + 1) * increments);
      const conflicts = reports.reduce((n, r) => n + r.conflicts, 0);
      assert.ok(conflicts >= 0, 'conflicts counted');
      await Promise.all(kids.map((k) => k.exited));
    } finally {
      await store.close();
    }
  });

  it(
    "a SIGKILLed owner's lease expires: keys deleted, a watcher here sees it",
    { timeout: 60_000 },
    async () => {
      const dir = tempDir();
      const url = `sqlite:${join(dir, 'store.db')}`;
      const store = await openStore(url);
      try {
        const p = uniquePrefix('owner');
        const log = new WatchLog();
        const w = await store.watch(p, log);
        const leaseTtlMs = 1000;
        const kid = startChild('hold-lease', url, p, String(leaseTtlMs));
        const { lease } = (await kid.nextReport()) as { lease: number };
        assert.equal((await store.get(`${p}a`))?.lease, lease);
        // the child keeps it alive: still there after more than one TTL
        await new Promise((r) => setTimeout(r, leaseTtlMs * 1.5));
        assert.ok(await store.leaseInfo(lease), 'lease kept alive by the child');
        kid.proc.kill('SIGKILL');
        await kid.exited;
        const killedAtMs = Date.now();
        const events = await log.waitEvents(4, 'two puts and two deletes');
        const tookMs = Date.now() - killedAtMs;
        assert.deepEqual(
          events.map((e) => `${e.type} ${e.kv.key.slice(p.length)}`),
          ['put a', 'put b', 'delete a', 'delete b'],
        );
        assert.equal(events[2]?.revision, events[3]?.revision, 'the expiry deletes in one revision');
        assertWellFormedBatches(log.batches);
        assert.ok(tookMs < leaseTtlMs + 3000, `expiry noticed ${tookMs} ms after the kill`);
        assert.equal(await store.leaseInfo(lease), undefined);
        assert.equal((await store.range(p)).kvs.length, 0);
        await w.cancel();
      } finally {
        await store.close();
      }
    },
  );

  it("a watch here sees a child's writes in order", { timeout: 60_000 }, async () => {
    const dir = tempDir();
    const url = `sqlite:${join(dir, 'store.db')}`;
    const store = await openStore(url);
    try {
      const p = uniquePrefix('xwatch');
      const log = new WatchLog();
      const w = await store.watch(p, log);
      const n = 300;
      const kid = startChild('write', url, p, String(n));
      const { revisions } = (await kid.nextReport()) as { revisions: number[] };
      const events = await log.waitEvents(n);
      assert.deepEqual(
        events.map((e) => e.revision),
        revisions,
      );
      assert.deepEqual(
        events.map((e) => e.kv.value),
        revisions.map((_, i) => String(i)),
      );
      assertWellFormedBatches(log.batches);
      await w.cancel();
    } finally {
      await store.close();
    }
  });
});

// ---- sqlite specifics ------------------------------------------------------------------------

describe('sqlite store: files, errors, limits', () => {
  it('a corrupt file gives CORRAL_STORE_CORRUPT naming the path, with a hint', async () => {
    const dir = tempDir();
    const path = join(dir, 'garbage.db');
    writeFileSync(path, Buffer.from('this is not a database at all, just text '.repeat(200)));
    const err = await rejectsWith(openStore(`sqlite:${path}`), 'CORRAL_STORE_CORRUPT', 'garbage file');
    assert.ok(err.message.includes(path), `message names the file: ${err.message}`);
    assert.ok(err.hint && /backup|aside/.test(err.hint), `hint: ${err.hint}`);

    const foreign = join(dir, 'foreign.db');
    const db = new Database(foreign);
    db.exec('CREATE TABLE people (name TEXT)');
    db.close();
    const err2 = await rejectsWith(
      openStore(`sqlite:${foreign}`),
      'CORRAL_STORE_CORRUPT',
      'foreign database',
    );
    assert.match(err2.message, /another program.*people/);

    // a real store whose pages were overwritten: the first call that reads them says so
    const damaged = join(dir, 'damaged.db');
    const s = await openStore(`sqlite:${damaged}`);
    for (let i = 0; i < 200; i++) await s.put(`k${i}`, 'v'.repeat(500));
    await s.close(); // the last connection checkpoints the WAL into the file
    const fd = openSync(damaged, 'r+');
    writeSync(fd, Buffer.alloc(8192, 0x5a), 0, 8192, 4096 * 3);
    closeSync(fd);
    const s2 = await openStore(`sqlite:${damaged}`);
    try {
      const err3 = await rejectsWith(s2.range('k'), 'CORRAL_STORE_CORRUPT', 'damaged pages');
      assert.ok(err3.message.includes(damaged), err3.message);
    } finally {
      await s2.close();
    }
  });

  it('a path in a missing directory is a clear error', async () => {
    const dir = join(tempDir(), 'no', 'such', 'dir');
    const err = await rejectsWith(
      openStore(`sqlite:${dir}/store.db`),
      'CORRAL_STORE_UNAVAILABLE',
      'missing dir',
    );
    assert.ok(err.message.includes(dir), err.message);
    assert.match(err.hint ?? '', /mkdir -p/);
    const isDir = tempDir();
    await rejectsWith(openStore(`sqlite:${isDir}`), 'CORRAL_STORE_UNAVAILABLE', 'a directory as the file');
  });

  it('a file locked by another writer: calls fail with CORRAL_STORE_TIMEOUT after opTimeoutMs', async () => {
    const path = join(tempDir(), 'store.db');
    const opTimeoutMs = 300;
    const store = await openStore(`sqlite:${path}`, { opTimeoutMs });
    const raw = new Database(path);
    try {
      await store.put('k', 'before');
      raw.exec('BEGIN IMMEDIATE');
      const startMs = Date.now();
      const err = await rejectsWith(store.put('k', 'blocked'), 'CORRAL_STORE_TIMEOUT', 'locked put');
      const tookMs = Date.now() - startMs;
      assert.ok(tookMs >= opTimeoutMs - 20 && tookMs < opTimeoutMs + 1000, `gave up after ${tookMs} ms`);
      assert.match(err.message, /locked/);
      assert.equal(
        (await store.get('k'))?.value,
        'before',
        'reads go on while a writer holds the lock (WAL)',
      );
      raw.exec('ROLLBACK');
      await store.put('k', 'after');
      assert.equal((await store.get('k'))?.value, 'after');
    } finally {
      raw.close();
      await store.close();
    }
  });

  it('automatic compaction bounds the watch history', async () => {
    const path = join(tempDir(), 'store.db');
    const opts: SqliteStoreOptions = { logRetainRevisions: 50 };
    const store: Store = await openSqliteStore(path, opts);
    try {
      const p = uniquePrefix('auto');
      for (let i = 0; i < 120; i++) await store.put(`${p}k`, String(i));
      const head = await store.revision();
      const log = new WatchLog();
      // the sweeper compacts within a few ticks; watching from revision 1 then fails
      const err = await waitFor('automatic compaction', async () => {
        const l = new WatchLog();
        const w = await store.watch(p, { ...l, startRevision: 1 });
        await new Promise((r) => setTimeout(r, 50));
        await w.cancel();
        return l.errors[0];
      });
      assert.equal(err.code, 'CORRAL_STORE_COMPACTED');
      // the sweeper may compact while the puts are still going: at least 50 revisions stay
      assert.ok(
        err.compactRevision !== undefined && err.compactRevision > 1 && err.compactRevision <= head - 50,
        `compacted at ${err.compactRevision}, head ${head}`,
      );
      const w = await store.watch(p, { ...log, startRevision: head - 50 });
      const ev = await log.waitEvents(51);
      assert.equal(ev[0]?.revision, head - 50);
      await w.cancel();
    } finally {
      await store.close();
    }
  });

  it('a watch replays revisions bigger than one poll whole and in order', async () => {
    const store = await openStore(`sqlite:${join(tempDir(), 'store.db')}`);
    try {
      const p = uniquePrefix('bigrev');
      const start = (await store.revision()) + 1;
      const perTxn = 100; // 3 txns = 300 events, more than one poll reads
      for (let t = 0; t < 3; t++)
        await store.txn({
          compare: [],
          success: Array.from({ length: perTxn }, (_, i) => ({
            type: 'put' as const,
            key: `${p}${t}/${String(i).padStart(3, '0')}`,
            value: `${t}`,
          })),
        });
      const del = await store.deletePrefix(p); // one revision of 300 events
      for (let i = 0; i < 10; i++) await store.put(`${p}tail/${i}`, 'x');
      const log = new WatchLog();
      const w = await store.watch(p, { ...log, startRevision: start });
      const ev = await log.waitEvents(3 * perTxn + 300 + 10);
      assertWellFormedBatches(log.batches);
      const delBatch = log.batches.find((b) => b[0]?.revision === del.revision);
      assert.equal(delBatch?.length, 300, 'the deletePrefix revision arrives as one batch');
      assert.equal(ev.length, 610);
      await w.cancel();
    } finally {
      await store.close();
    }
  });

  it('sqlite::memory: is a private single-process store', async () => {
    const a = await openStore('sqlite::memory:');
    const b = await openStore('sqlite::memory:');
    try {
      await a.put('k', 'v');
      assert.equal((await a.get('k'))?.value, 'v');
      assert.equal(await b.get('k'), undefined, 'each :memory: store is its own');
      const log = new WatchLog();
      const w = await a.watch('', { ...log, startRevision: 1 });
      await log.waitEvents(1);
      await w.cancel();
    } finally {
      await a.close();
      await b.close();
    }
  });

  it('bad store URLs give CORRAL_STORE_BAD_URL naming the URL and the accepted forms', async () => {
    const bad = [
      '',
      'store.db',
      'mysql://db:3306',
      'sqlite:',
      'sqlite://var/lib/corral.db',
      ' sqlite:/x.db',
      'etcd://',
      'etcd://host',
      'etcd://host:0',
      'etcd://host:99999',
      'etcd://host:2379,',
      'etcd://ho st:2379',
      'etcd://user:pw@host:2379',
      'etcd://host:2379/path',
    ];
    for (const url of bad) {
      const err = await rejectsWith(openStore(url), 'CORRAL_STORE_BAD_URL', JSON.stringify(url));
      assert.ok(
        err.message.includes(JSON.stringify(url)),
        `message names ${JSON.stringify(url)}: ${err.message}`,
      );
      assert.match(err.hint ?? '', /sqlite:|etcd:\/\//, `hint for ${url}`);
    }
    assert.deepEqual(parseStoreUrl('etcd://10.0.0.1:2379,node-b.example:2380,[::1]:2379/'), {
      kind: 'etcd',
      endpoints: ['10.0.0.1:2379', 'node-b.example:2380', '[::1]:2379'],
    });
    assert.deepEqual(parseStoreUrl('sqlite:relative/x.db'), { kind: 'sqlite', path: 'relative/x.db' });
  });
});
