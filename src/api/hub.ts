// One store watch per API server, fanned out to every SSE client and to the status view:
// 'kvs' with every watch batch, 'event' for each new cluster event, 'change' when anything under
// the cluster prefix changed, 'reset' when the watch was restarted and events may have been
// missed. Bounded: at most sseClientsMax listeners.
import { EventEmitter } from 'node:events';
import type { Store, Watcher } from '../store/types.js';
import type { Keys } from '../core/keys.js';
import type { ClusterEvent } from '../core/types.js';

export const hubRewatchDelayMs = 1000;

export interface KeyedEvent extends ClusterEvent {
  key: string;
}

export class Hub extends EventEmitter {
  private watcher?: Watcher;
  private closed = false;
  revision = 0;

  constructor(
    private store: Store,
    private k: Keys,
    private log: (msg: string) => void,
  ) {
    super();
    this.setMaxListeners(1000);
  }

  async start(): Promise<void> {
    this.revision = await this.store.revision();
    await this.watch(this.revision + 1);
  }

  private async watch(from: number): Promise<void> {
    if (this.closed) return;
    try {
      this.watcher = await this.store.watch(this.k.prefix, {
        startRevision: from,
        onEvents: (evs) => {
          this.emit('kvs', evs);
          for (const e of evs) {
            this.revision = Math.max(this.revision, e.revision);
            if (e.type === 'put' && e.kv.key.startsWith(this.k.events)) {
              try {
                this.emit('event', {
                  ...(JSON.parse(e.kv.value) as ClusterEvent),
                  key: e.kv.key.slice(this.k.events.length),
                });
              } catch {
                // an unreadable event is skipped
              }
            }
          }
          this.emit('change', this.revision);
        },
        onError: (err) => {
          if (this.closed) return;
          this.log(`store watch ended (${err.message}); watching again in ${hubRewatchDelayMs} ms`);
          this.emit('change', this.revision);
          setTimeout(() => void this.rewatch(), hubRewatchDelayMs).unref();
        },
      });
    } catch (err) {
      this.log(`store watch failed (${(err as Error).message}); retrying in ${hubRewatchDelayMs} ms`);
      setTimeout(() => void this.rewatch(), hubRewatchDelayMs).unref();
    }
  }

  private async rewatch(): Promise<void> {
    try {
      this.revision = await this.store.revision();
    } catch {
      setTimeout(() => void this.rewatch(), hubRewatchDelayMs).unref();
      return;
    }
    // events between the old watch and this one are lost: mirrors must read everything again
    this.emit('reset', this.revision);
    await this.watch(this.revision + 1);
  }

  async close(): Promise<void> {
    this.closed = true;
    await this.watcher?.cancel().catch(() => undefined);
    this.removeAllListeners();
  }
}
