// What every API plugin sees: the store, the config, the hub, the token verifier, metrics.
import type { Store } from '../store/types.js';
import type { Keys } from '../core/keys.js';
import type { ClusterConfig } from '../config/schema.js';
import { readStatus, type StatusData } from '../cli/status.js';
import type { Hub } from './hub.js';
import type { TokenVerifier, Caller } from './auth.js';
import type { ApiMetrics } from './metrics.js';
import type { OpsContext } from './ops.js';

/** a cached status older than this is read again even without a store change (for nowMs and ages) */
export const statusCacheMaxAgeMs = 1000;

export interface ApiContext {
  store: Store;
  config: ClusterConfig;
  configPath: string;
  cluster: string;
  k: Keys;
  hub: Hub;
  verifier: TokenVerifier;
  metrics: ApiMetrics;
  /** where local agents keep their state (local fence device, VM VNC sockets) */
  stateRoot: string;
  /** the node whose agent serves this API (undefined for `corral api` alone) */
  node?: string;
  nodeNames: string[];
  log: (level: 'info' | 'warn' | 'error', msg: string) => void;
  status(): Promise<StatusData>;
  ops(caller: Caller): OpsContext;
}

/** Status answered from memory while nothing changed in the store; one read in flight at a time. */
export function statusCache(
  store: Store,
  cluster: string,
  k: Keys,
  nodeNames: string[],
  hub: Hub,
  observe: (ms: number) => void,
): () => Promise<StatusData> {
  let cached: { data: StatusData; atMs: number; revision: number } | undefined;
  let inflight: Promise<StatusData> | undefined;
  hub.on('change', () => {
    cached = undefined;
  });
  return async () => {
    const now = Date.now();
    if (cached && now - cached.atMs < statusCacheMaxAgeMs && cached.revision >= hub.revision)
      return { ...cached.data, nowMs: now };
    if (inflight) return inflight;
    const rev = hub.revision;
    inflight = (async () => {
      const t0 = performance.now();
      try {
        const data = await readStatus(store, cluster, k, nodeNames, 20);
        observe(performance.now() - t0);
        cached = { data, atMs: Date.now(), revision: Math.max(rev, data.revision) };
        return data;
      } finally {
        inflight = undefined;
      }
    })();
    return inflight;
  };
}
