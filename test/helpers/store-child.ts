// A store client in its own process, for the cross-process store tests.
// Run: node --import tsx test/helpers/store-child.ts MODE URL ARGS...
// Prints one JSON line per report on stdout; errors go to stderr with exit code 1.
//   cas URL KEY INCREMENTS        increment KEY with a compare-on-modRevision retry loop
//                                 → {"done":INCREMENTS,"conflicts":N}
//   hold-lease URL PREFIX TTL_MS  grant a lease, bind PREFIX+a and PREFIX+b to it, report
//                                 {"lease":ID}, then keep it alive until killed
//   write URL PREFIX COUNT        put PREFIX+i = i for i < COUNT → {"revisions":[...]}
import { openStore } from '../../src/store/index.js';

/** a child never outlives a test run that forgot it */
const childLifetimeMsMax = 60_000;
const casAttemptsMax = 100_000;

function report(x: unknown): void {
  process.stdout.write(`${JSON.stringify(x)}\n`);
}

async function main(): Promise<void> {
  const [mode, url, a1, a2] = process.argv.slice(2);
  if (!mode || !url || !a1 || !a2) throw new Error('usage: store-child MODE URL ARG ARG');
  setTimeout(() => {
    process.stderr.write(`store-child: ${mode} still running after ${childLifetimeMsMax} ms, exiting\n`);
    process.exit(2);
  }, childLifetimeMsMax).unref();
  const store = await openStore(url);
  switch (mode) {
    case 'cas': {
      const key = a1;
      const increments = Number(a2);
      let conflicts = 0;
      for (let done = 0, attempts = 0; done < increments; attempts++) {
        if (attempts >= casAttemptsMax) throw new Error(`cas: gave up after ${attempts} attempts`);
        const kv = await store.get(key);
        const r = await store.txn({
          compare: [{ key, target: 'modRevision', op: '==', value: kv?.modRevision ?? 0 }],
          success: [{ type: 'put', key, value: String(Number(kv?.value ?? '0') + 1) }],
        });
        if (r.succeeded) done++;
        else conflicts++;
      }
      report({ done: increments, conflicts });
      await store.close();
      return;
    }
    case 'hold-lease': {
      const ttlMs = Number(a2);
      const lease = await store.leaseGrant(ttlMs);
      await store.put(`${a1}a`, 'A', { lease });
      await store.put(`${a1}b`, 'B', { lease });
      report({ lease });
      const timer = setInterval(() => {
        store.leaseKeepAlive(lease).catch((e: Error) => {
          process.stderr.write(`store-child: keepAlive failed: ${e.message}\n`);
          process.exit(1);
        });
      }, ttlMs / 4);
      void timer; // runs until the test kills this process
      return;
    }
    case 'write': {
      const revisions: number[] = [];
      for (let i = 0; i < Number(a2); i++) revisions.push((await store.put(`${a1}${i}`, String(i))).revision);
      report({ revisions });
      await store.close();
      return;
    }
    default:
      throw new Error(`unknown mode ${mode}`);
  }
}

main().catch((e: Error) => {
  process.stderr.write(`store-child: ${e.stack ?? e.message}\n`);
  process.exit(1);
});
