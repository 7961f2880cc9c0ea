// Store URLs: the one grammar the config file (`store:`) and openStore() both accept.
//
//   sqlite:PATH                       embedded store in one SQLite file (relative paths resolve
//                                     against the config's directory, or the working directory)
//   sqlite::memory:                   private in-memory store (tests, the simulator)
//   etcd://HOST:PORT[,HOST:PORT...]   a real etcd cluster (IPv6 hosts in brackets: [::1]:2379);
//                                     one trailing slash is allowed
import { isIP } from 'node:net';
import { resolve } from 'node:path';

export interface HostPort {
  host: string;
  port: number;
}

export type StoreUrl = { kind: 'sqlite'; path: string } | { kind: 'etcd'; endpoints: HostPort[] };

/** a parse failure: what is wrong, and how to write it instead when that is not obvious */
export interface UrlError {
  error: string;
  hint?: string;
}

export const MEMORY_PATH = ':memory:';

const hostnameRe =
  /^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$/;

/** a DNS host name (not an all-numeric dotted string, which must be a valid IPv4 address instead) */
export const isHostname = (s: string): boolean => hostnameRe.test(s) && !/^[\d.]+$/.test(s);

/** Parses `host:port`, `1.2.3.4:port` or `[::1]:port`; returns a reason when it is not one. */
export function parseHostPort(s: string): HostPort | UrlError {
  const m = /^(?:\[([^\]]*)\]|([^:[\]]*)):(\d{1,5})$/.exec(s);
  if (!m) return { error: 'expected host:port (IPv6 in brackets: [::1]:7440)' };
  const host = m[1] ?? m[2] ?? '';
  const portNum = Number(m[3]);
  if (m[1] !== undefined ? isIP(host) !== 6 : isIP(host) !== 4 && !isHostname(host))
    return { error: `bad host ${JSON.stringify(host)}` };
  if (portNum < 1 || portNum > 65535) return { error: `port ${portNum} is outside 1-65535` };
  return { host, port: portNum };
}

/** `host:port`, IPv6 hosts in brackets */
export function formatHostPort(e: HostPort): string {
  return `${isIP(e.host) === 6 ? `[${e.host}]` : e.host}:${e.port}`;
}

/**
 * Parses a store URL precisely. Relative sqlite paths resolve against `baseDir` when given
 * (the config file's directory), else they are returned as written.
 */
export function parseStoreUrl(url: string, baseDir?: string): StoreUrl | UrlError {
  if (typeof url !== 'string' || url.trim() === '') return { error: 'is empty' };
  if (url !== url.trim()) return { error: 'has leading or trailing spaces' };
  if (url.startsWith('sqlite:')) {
    const path = url.slice('sqlite:'.length);
    if (!path) return { error: 'the sqlite path is empty (e.g. sqlite:./corral-store.db)' };
    if (path.startsWith('//'))
      return {
        error: 'write sqlite:PATH without slashes after the colon (e.g. sqlite:/var/lib/corral/store.db)',
      };
    if (path.includes('\0')) return { error: 'the sqlite path contains a NUL byte' };
    return {
      kind: 'sqlite',
      path: path === MEMORY_PATH || baseDir === undefined ? path : resolve(baseDir, path),
    };
  }
  if (url.startsWith('etcd://')) {
    let rest = url.slice('etcd://'.length);
    if (rest.endsWith('/')) rest = rest.slice(0, -1);
    if (!rest) return { error: 'no etcd endpoint after etcd://', hint: 'e.g. etcd://127.0.0.1:2379' };
    if (rest.includes('@')) return { error: 'credentials in the URL are not supported' };
    if (rest.includes('/') || rest.includes('?'))
      return { error: 'has a path or query; etcd URLs are only endpoints' };
    const endpoints: HostPort[] = [];
    for (const part of rest.split(',')) {
      const hp = parseHostPort(part);
      if ('error' in hp) return { error: `endpoint ${JSON.stringify(part)}: ${hp.error}` };
      if (endpoints.some((e) => e.host === hp.host && e.port === hp.port))
        return { error: `endpoint ${part} is listed twice` };
      endpoints.push(hp);
    }
    return { kind: 'etcd', endpoints };
  }
  const scheme = /^([a-z][a-z0-9+.-]*):/i.exec(url)?.[1];
  return { error: scheme ? `unknown scheme "${scheme}"` : 'no scheme' };
}

export function formatStoreUrl(u: StoreUrl): string {
  if (u.kind === 'sqlite') return `sqlite:${u.path}`;
  return `etcd://${u.endpoints.map(formatHostPort).join(',')}`;
}
