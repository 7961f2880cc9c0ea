// The simulator's store against the Store conformance suite. The suite waits on real time, so
// here SimStoreCore runs on a real-time scheduler (setTimeout) instead of the virtual clock;
// everything else (revisions, txns, leases, watches, compaction) is the code the simulator uses.
import { storeConformance } from './store-conformance.js';
import { SimStoreClient, SimStoreCore } from '../src/sim/store.js';
import type { Owner, Scheduler } from '../src/sim/queue.js';

class RealtimeScheduler implements Scheduler {
  private readonly timers = new Set<NodeJS.Timeout>();
  nowMs(): number {
    return Date.now();
  }
  at(atMs: number, fn: () => void, _owner?: Owner): () => void {
    const t = setTimeout(
      () => {
        this.timers.delete(t);
        fn();
      },
      Math.max(0, atMs - Date.now()),
    );
    this.timers.add(t);
    return () => {
      clearTimeout(t);
      this.timers.delete(t);
    };
  }
  deliver(_owner: Owner | undefined, fn: () => void): void {
    fn();
  }
  close(): void {
    for (const t of this.timers) clearTimeout(t);
    this.timers.clear();
  }
}

storeConformance('sim (real-time scheduler)', async () => {
  const sched = new RealtimeScheduler();
  const core = new SimStoreCore(sched);
  const open = () => new SimStoreClient(core, { opTimeoutMs: 5000, url: 'sim:conformance' });
  return {
    store: open(),
    openAnother: async () => open(),
    cleanup: async () => sched.close(),
  };
});
