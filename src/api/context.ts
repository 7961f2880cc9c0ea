// What every API plugin sees: the store, the config, the hub, the token verifier, metrics.
import type { Store } from '../store/types.js';
import type { Keys } from '../core/keys.js';
import type { ClusterConfig } from '../config/schema.js';
import type { StatusData } from '../cli/status.js';
import type { Hub } from './hub.js';
import type { TokenVerifier, Caller } from './auth.js';
import type { ApiMetrics } from './metrics.js';
import type { OpsContext } from './ops.js';

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
  /** the cluster status from the API's in-memory view (src/api/status-view.ts) */
  status(): Promise<StatusData>;
  /** the same as JSON, serialised once per rebuild; after a change, at most statusRebuildEveryMs old */
  statusJson(): Promise<string>;
  ops(caller: Caller): OpsContext;
}
