// openStore: one entry that turns a store URL into a Store.
//
//   sqlite:PATH                 embedded store in one SQLite file (relative paths resolve against
//                               the working directory); shared safely by processes on one host
//   sqlite::memory:             private in-memory store: one instance in one process (tests, the
//                               simulator); not shared, not even with another instance
//   etcd://HOST:PORT[,HOST:PORT...]   a real etcd cluster (IPv6 hosts in brackets: [::1]:2379)
import { StoreError, type Store, type StoreOptions } from './types.js';
import { openSqliteStore } from './sqlite.js';

export * from './types.js';

export const storeUrlForms = 'sqlite:PATH, sqlite::memory: or etcd://HOST:PORT[,HOST:PORT...]';

function badUrl(url: unknown, why: string, hint?: string): StoreError {
  return new StoreError(
    'CORRAL_STORE_BAD_URL',
    `store URL ${JSON.stringify(url)}: ${why}`,
    hint ?? `use one of: ${storeUrlForms} (e.g. sqlite:/var/lib/corral/store.db or etcd://10.0.0.1:2379)`,
  );
}

const hostnameRe = /^[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*$/;

/** 'host:port' or '[v6]:port' → the endpoint string handed to the etcd client */
function parseEndpoint(url: string, part: string): string {
  const m = /^(\[[0-9A-Fa-f:.]+\]|[^:[\]]+):([0-9]{1,5})$/.exec(part);
  if (!m) throw badUrl(url, `endpoint ${JSON.stringify(part)} is not HOST:PORT`);
  const host = m[1] ?? '';
  const port = Number(m[2]);
  if (!host.startsWith('[') && !hostnameRe.test(host))
    throw badUrl(
      url,
      `endpoint ${JSON.stringify(part)}: ${JSON.stringify(host)} is not a host name or address`,
    );
  if (port < 1 || port > 65535) throw badUrl(url, `endpoint ${JSON.stringify(part)}: port must be 1-65535`);
  return `${host}:${port}`;
}

export type ParsedStoreUrl = { kind: 'sqlite'; path: string } | { kind: 'etcd'; endpoints: string[] };

export function parseStoreUrl(url: string): ParsedStoreUrl {
  if (typeof url !== 'string' || url.trim() === '') throw badUrl(url, 'is empty');
  if (url !== url.trim()) throw badUrl(url, 'has leading or trailing spaces');
  if (url.startsWith('sqlite:')) {
    const path = url.slice('sqlite:'.length);
    if (path === '')
      throw badUrl(url, 'has no file path', 'write sqlite:PATH, e.g. sqlite:/var/lib/corral/store.db');
    if (path.startsWith('//'))
      throw badUrl(
        url,
        'looks like sqlite://...; the form is sqlite:PATH',
        `write sqlite:/absolute/path or sqlite:relative/path (e.g. sqlite:${path.replace(/^\/+/, '/')})`,
      );
    if (path.includes('\0')) throw badUrl(url, 'file path contains a NUL byte');
    return { kind: 'sqlite', path };
  }
  if (url.startsWith('etcd://')) {
    let rest = url.slice('etcd://'.length);
    if (rest.endsWith('/')) rest = rest.slice(0, -1);
    if (rest === '')
      throw badUrl(url, 'has no endpoint', 'write etcd://HOST:PORT, e.g. etcd://127.0.0.1:2379');
    if (rest.includes('@'))
      throw badUrl(url, 'credentials in the URL are not supported', 'write etcd://HOST:PORT[,HOST:PORT...]');
    if (rest.includes('/') || rest.includes('?'))
      throw badUrl(
        url,
        'has a path or query; etcd URLs are only endpoints',
        'write etcd://HOST:PORT[,HOST:PORT...]',
      );
    const endpoints = rest.split(',').map((p) => parseEndpoint(url, p));
    return { kind: 'etcd', endpoints };
  }
  const scheme = /^([A-Za-z][A-Za-z0-9+.-]*):/.exec(url)?.[1];
  throw badUrl(url, scheme ? `unknown scheme ${JSON.stringify(scheme)}` : 'has no scheme');
}

/** open the store a URL names; throws StoreError (BAD_URL, UNAVAILABLE, CORRUPT, TIMEOUT) */
export async function openStore(url: string, opts: StoreOptions = {}): Promise<Store> {
  const p = parseStoreUrl(url);
  if (p.kind === 'sqlite') return openSqliteStore(p.path, opts);
  // loaded on demand, so sqlite users never load the gRPC stack
  const mod = await import('./etcd.js');
  return mod.openEtcdStore(p.endpoints, opts);
}
