// openStore: one entry that turns a store URL into a Store.
//
//   sqlite:PATH                 embedded store in one SQLite file (relative paths resolve against
//                               the working directory); shared safely by processes on one host
//   sqlite::memory:             private in-memory store: one instance in one process (tests, the
//                               simulator); not shared, not even with another instance
//   etcd://HOST:PORT[,HOST:PORT...]   a real etcd cluster (IPv6 hosts in brackets: [::1]:2379)
import { StoreError, type Store, type StoreOptions } from './types.js';
import { openSqliteStore } from './sqlite.js';
import { formatHostPort, parseStoreUrl as parseUrl } from './url.js';

export * from './types.js';

export const storeUrlForms = 'sqlite:PATH, sqlite::memory: or etcd://HOST:PORT[,HOST:PORT...]';

function badUrl(url: unknown, why: string, hint?: string): StoreError {
  return new StoreError(
    'CORRAL_STORE_BAD_URL',
    `store URL ${JSON.stringify(url)}: ${why}`,
    hint ?? `use one of: ${storeUrlForms} (e.g. sqlite:/var/lib/corral/store.db or etcd://10.0.0.1:2379)`,
  );
}

export type ParsedStoreUrl = { kind: 'sqlite'; path: string } | { kind: 'etcd'; endpoints: string[] };

/** The config's grammar (src/store/url.ts), as openStore needs it; throws CORRAL_STORE_BAD_URL. */
export function parseStoreUrl(url: string): ParsedStoreUrl {
  const u = parseUrl(url);
  if ('error' in u) throw badUrl(url, u.error, u.hint);
  return u.kind === 'sqlite' ? u : { kind: 'etcd', endpoints: u.endpoints.map(formatHostPort) };
}

/** open the store a URL names; throws StoreError (BAD_URL, UNAVAILABLE, CORRUPT, TIMEOUT) */
export async function openStore(url: string, opts: StoreOptions = {}): Promise<Store> {
  const p = parseStoreUrl(url);
  if (p.kind === 'sqlite') return openSqliteStore(p.path, opts);
  // loaded on demand, so sqlite users never load the gRPC stack
  const mod = await import('./etcd.js');
  return mod.openEtcdStore(p.endpoints, opts);
}
