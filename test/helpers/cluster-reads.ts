// What the two test harnesses (TestCluster: agents on one SQLite store; NetCluster: namespaced
// hosts on etcd) share: reading the cluster from the store, waiting for a condition with the
// state and last events in the failure message, and defining the witness echo service.
import { join, resolve } from 'node:path';
import type { Keys } from '../../src/core/keys.js';
import { ResourceSpec, type ResourceSpecInput } from '../../src/core/spec.js';
import type { ClusterEvent } from '../../src/core/types.js';
import { loadSnapshot, type Snapshot } from '../../src/manager/load.js';
import type { Store } from '../../src/store/types.js';

const repo = resolve(import.meta.dirname, '..', '..');
export const echoService = join(repo, 'test', 'fixtures', 'services', 'http-echo.mjs');

export interface ResourceOn {
  state?: string;
  node?: string | null;
  reason?: string;
  epoch?: number;
}

export abstract class ClusterReads {
  abstract store: Store;
  abstract readonly k: Keys;
  abstract readonly witnessPath: string;
  /** the cluster name in the store */
  protected abstract readonly clusterName: string;
  /** how long waitFor and waitStarted wait when the caller does not say */
  protected abstract readonly waitDefaultMs: number;

  /** one observer call through the store (NetCluster retries it while etcd is unreachable) */
  async observe<T>(_what: string, fn: () => Promise<T>): Promise<T> {
    return fn();
  }

  snapshot(): Promise<Snapshot> {
    return this.observe('snapshot', () => loadSnapshot(this.store, this.clusterName));
  }

  async events(): Promise<ClusterEvent[]> {
    const r = await this.observe('events', () => this.store.range(this.k.events));
    return r.kvs.map((kv) => JSON.parse(kv.value) as ClusterEvent);
  }

  /**
   * Poll cond every everyMs until it holds (a throwing cond counts as false); past timeoutMs
   * throw with what was awaited, node and resource states and the last 25 events (explain).
   */
  async waitFor(
    what: string,
    cond: () => Promise<boolean>,
    timeoutMs = this.waitDefaultMs,
    everyMs = 100,
    explain = true,
  ): Promise<number> {
    const t0 = Date.now();
    for (;;) {
      if (await cond().catch(() => false)) return Date.now() - t0;
      if (Date.now() - t0 > timeoutMs) {
        let state = '';
        if (explain) {
          const s = await this.snapshot().catch(() => undefined);
          state = s
            ? [...s.nodes.values()].map((n) => `${n.name}=${n.status?.state}`).join(' ') +
              ' | ' +
              [...s.resources.values()]
                .map((r) => `${r.id}=${r.rec?.state}@${r.rec?.node}(${r.rec?.reason})`)
                .join(' ')
            : '(store unreachable)';
          const evs = await this.events().catch(() => []);
          state += `\nevents:\n${evs
            .slice(-25)
            .map((e) => e.message)
            .join('\n')}`;
        }
        throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}; ${state}`);
      }
      await new Promise((r) => setTimeout(r, everyMs));
    }
  }

  async resourceOn(id: string): Promise<ResourceOn> {
    const rec = (await this.snapshot()).resources.get(id)?.rec;
    return { state: rec?.state, node: rec?.node, reason: rec?.reason, epoch: rec?.epoch };
  }

  /** wait until the resource is started (on a node other than notOn); returns its node */
  async waitStarted(id: string, notOn?: string, timeoutMs = this.waitDefaultMs): Promise<string> {
    let node = '';
    await this.waitFor(
      `${id} started${notOn ? ` off ${notOn}` : ''}`,
      async () => {
        const r = await this.resourceOn(id);
        node = r.node ?? '';
        return r.state === 'started' && !!r.node && r.node !== notOn;
      },
      timeoutMs,
    );
    return node;
  }

  /** Define a test service: the echo server on 127.0.0.1:port with a witness file and an HTTP check. */
  async defineService(
    id: string,
    port: number,
    extra: Partial<ResourceSpecInput> = {},
    args: string[] = [],
  ): Promise<void> {
    const spec = ResourceSpec.parse({
      id,
      process: {
        command: [process.execPath, echoService, String(port), ...args],
        env: { CORRAL_WITNESS: this.witnessPath },
        stopTimeoutMs: 2000,
        startTimeoutMs: 5000,
      },
      health: {
        type: 'http',
        url: `http://127.0.0.1:${port}/`,
        intervalMs: 300,
        timeoutMs: 500,
        failures: 2,
      },
      memory: 64,
      ...extra,
    } satisfies ResourceSpecInput);
    await this.observe(`define ${id}`, () => this.store.put(this.k.resource(id), JSON.stringify(spec)));
  }
}
