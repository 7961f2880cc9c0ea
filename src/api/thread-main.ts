// The worker-thread side of an agent's API (src/api/thread.ts): its own store connection and
// event loop, the same startApi() as `corral api`. Messages to the parent: 'log', then 'ready' or
// 'failed'; the parent's 'close' closes the server and the store, then 'closed'.
import { parentPort, workerData } from 'node:worker_threads';
import { loadClusterConfig } from '../config/schema.js';
import { openStore } from '../store/index.js';
import type { Store } from '../store/types.js';
import { startApi } from './server.js';
import type { ApiThreadData, ApiThreadMessage } from './thread.js';

const d = workerData as ApiThreadData;
const parent = parentPort;
if (!parent) throw new Error('src/api/thread-main.ts runs in a worker thread (startApiThread)');
const post = (m: ApiThreadMessage) => parent.postMessage(m);

let store: Store | undefined;
try {
  const config = loadClusterConfig(d.configPath);
  store = await openStore(config.store, { opTimeoutMs: d.opTimeoutMs });
  const api = await startApi({
    store,
    config,
    configPath: d.configPath,
    stateRoot: d.stateRoot,
    listen: d.listen,
    node: d.node,
    log: (level, msg) => post({ type: 'log', level, msg }),
  });
  const opened = store;
  parent.on('message', (m: unknown) => {
    if (m !== 'close') return;
    void (async () => {
      await api.close().catch(() => undefined);
      await opened.close().catch(() => undefined);
      post({ type: 'closed' });
      parent.close();
    })();
  });
  post({ type: 'ready', url: api.url, port: api.port });
} catch (e) {
  await store?.close().catch(() => undefined);
  const err = e as { message?: string; code?: unknown; hint?: unknown };
  post({
    type: 'failed',
    message: err?.message ?? String(e),
    code: typeof err?.code === 'string' ? err.code : undefined,
    hint: typeof err?.hint === 'string' ? err.hint : undefined,
  });
  parent.close();
}
