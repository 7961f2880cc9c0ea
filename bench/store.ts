// Store benchmark: both backends in one run, same machine, same disk (os.tmpdir()).
//   sqlite: a fresh file (synchronous=FULL, WAL) through openStore('sqlite:...')
//   etcd:   a fresh 1-member etcd (Debian etcd-server) started by test/helpers/etcd.ts
// Figures: puts/s (sequential, 16 concurrent), CAS txns/s, watch delivery latency
// (put -> onEvents in the same process, p50/p99), lease keep-alive cost.
// Each phase runs for benchPhaseMs, so the whole run takes about 30-40 s.
// Run: npx tsx bench/store.ts
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { openStore, type Store } from '../src/store/index.js';
import { startEtcd, etcdMissing, type EtcdCluster } from '../test/helpers/etcd.js';

/** wall time of one measured phase */
const benchPhaseMs = 2500;
/** writers in the concurrent put phase */
const concurrentWriters = 16;
/** watch latency samples are bounded too (each waits for its event) */
const watchSamplesMax = 2000;
/** a watch event that does not arrive within this is a failure, not a slow sample */
const watchEventWaitMsMax = 5000;

interface Figures {
  putsSeqPerS: number;
  putsConcPerS: number;
  casTxnsPerS: number;
  watchP50Ms: number;
  watchP99Ms: number;
  watchSamples: number;
  keepAlivesPerS: number;
  keepAliveUs: number;
}

async function timed(fn: () => Promise<void>, phaseMs = benchPhaseMs): Promise<{ n: number; ms: number }> {
  const startMs = performance.now();
  let n = 0;
  while (performance.now() - startMs < phaseMs) {
    await fn();
    n++;
  }
  return { n, ms: performance.now() - startMs };
}

function percentile(sorted: number[], p: number): number {
  if (sorted.length === 0) return NaN;
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))]!;
}

async function measure(store: Store, prefix: string): Promise<Figures> {
  // sequential puts
  let i = 0;
  const seq = await timed(async () => {
    await store.put(`${prefix}seq/${i++ % 1000}`, `value-${i}`);
  });

  // 16 concurrent writers
  let conc = 0;
  const startMs = performance.now();
  await Promise.all(
    Array.from({ length: concurrentWriters }, async (_, w) => {
      for (let j = 0; performance.now() - startMs < benchPhaseMs; j++) {
        await store.put(`${prefix}conc/${w}/${j % 100}`, `value-${j}`);
        conc++;
      }
    }),
  );
  const concMs = performance.now() - startMs;

  // CAS: compare modRevision, put; each txn knows the revision of its last success
  const casKey = `${prefix}cas`;
  let modRevision = (await store.put(casKey, '0')).revision;
  let lost = 0;
  const cas = await timed(async () => {
    const r = await store.txn({
      compare: [{ key: casKey, target: 'modRevision', op: '==', value: modRevision }],
      success: [{ type: 'put', key: casKey, value: String(modRevision) }],
    });
    if (!r.succeeded) lost++;
    modRevision = r.revision;
  });
  if (lost > 0) throw new Error(`CAS bench: ${lost} txns lost against no competitor`);

  // watch latency: put, then wait for the callback, one at a time
  const latenciesMs: number[] = [];
  let waiting: ((atMs: number) => void) | undefined;
  let watchError: Error | undefined;
  const w = await store.watch(`${prefix}watch/`, {
    onEvents: () => waiting?.(performance.now()),
    onError: (e) => (watchError = e),
  });
  const watchStartMs = performance.now();
  while (performance.now() - watchStartMs < benchPhaseMs && latenciesMs.length < watchSamplesMax) {
    const arrived = new Promise<number>((resolve, reject) => {
      waiting = resolve;
      setTimeout(
        () => reject(new Error(`watch event not delivered in ${watchEventWaitMsMax} ms`)),
        watchEventWaitMsMax,
      ).unref();
    });
    const sentMs = performance.now();
    await store.put(`${prefix}watch/k`, String(latenciesMs.length));
    latenciesMs.push((await arrived) - sentMs);
    if (watchError) throw watchError;
  }
  waiting = undefined;
  await w.cancel();
  latenciesMs.sort((a, b) => a - b);

  // lease keep-alive, one at a time
  const lease = await store.leaseGrant(10_000);
  const ka = await timed(async () => {
    await store.leaseKeepAlive(lease);
  });
  await store.leaseRevoke(lease);

  return {
    putsSeqPerS: (seq.n / seq.ms) * 1000,
    putsConcPerS: (conc / concMs) * 1000,
    casTxnsPerS: (cas.n / cas.ms) * 1000,
    watchP50Ms: percentile(latenciesMs, 50),
    watchP99Ms: percentile(latenciesMs, 99),
    watchSamples: latenciesMs.length,
    keepAlivesPerS: (ka.n / ka.ms) * 1000,
    keepAliveUs: (ka.ms / ka.n) * 1000,
  };
}

function fmt(x: number | undefined, digits = 0): string {
  if (x === undefined || Number.isNaN(x)) return 'n/a';
  return x.toLocaleString('en-US', { minimumFractionDigits: digits, maximumFractionDigits: digits });
}

async function main(): Promise<void> {
  const dir = mkdtempSync(join(tmpdir(), 'corral-bench-store-'));
  let cluster: EtcdCluster | undefined;
  const stores: Store[] = [];
  try {
    const results: { name: string; f: Figures }[] = [];
    const sqlite = await openStore(`sqlite:${join(dir, 'store.db')}`);
    stores.push(sqlite);
    process.stderr.write('bench: sqlite ...\n');
    results.push({ name: 'sqlite', f: await measure(sqlite, '/bench/') });

    const missing = etcdMissing();
    if (missing) {
      process.stderr.write(`bench: etcd skipped: ${missing}\n`);
    } else {
      cluster = await startEtcd({ members: 1, ramDisk: false });
      const etcd = await openStore(cluster.url);
      stores.push(etcd);
      process.stderr.write('bench: etcd ...\n');
      results.push({ name: 'etcd', f: await measure(etcd, '/bench/') });
    }

    const s = results[0]?.f;
    const e = results[1]?.f;
    const rows: [string, keyof Figures, number, string][] = [
      ['puts/s, sequential', 'putsSeqPerS', 0, 'x'],
      [`puts/s, ${concurrentWriters} concurrent`, 'putsConcPerS', 0, 'x'],
      ['CAS txns/s, sequential', 'casTxnsPerS', 0, 'x'],
      ['watch latency p50 (ms)', 'watchP50Ms', 2, 'x'],
      ['watch latency p99 (ms)', 'watchP99Ms', 2, 'x'],
      ['lease keep-alives/s', 'keepAlivesPerS', 0, 'x'],
      ['lease keep-alive (µs each)', 'keepAliveUs', 0, 'x'],
    ];
    const head = ['figure', 'sqlite', 'etcd', 'etcd / sqlite'];
    const table = rows.map(([label, k, digits]) => [
      label,
      fmt(s?.[k], digits),
      fmt(e?.[k], digits),
      s && e ? `${fmt(e[k] / s[k], 2)}x` : 'n/a',
    ]);
    const widths = head.map((h, c) => Math.max(h.length, ...table.map((r) => r[c]!.length)));
    const line = (r: string[]) =>
      r.map((x, c) => (c === 0 ? x.padEnd(widths[c]!) : x.padStart(widths[c]!))).join(' | ');
    console.log(
      `\nStore benchmark (${benchPhaseMs} ms per phase; watch samples: sqlite ${s?.watchSamples ?? 0}, etcd ${e?.watchSamples ?? 0})`,
    );
    console.log(line(head));
    console.log(widths.map((w) => '-'.repeat(w)).join('-|-'));
    for (const r of table) console.log(line(r));
    console.log(
      '\nsqlite: one file, synchronous=FULL (fsync per commit), WAL. etcd: 1 member, data on the same disk, ' +
        'fsync per commit, gRPC over loopback.',
    );
  } finally {
    for (const st of stores) await st.close().catch(() => {});
    await cluster?.stop();
    rmSync(dir, { recursive: true, force: true });
  }
}

await main();
