// Bearer tokens with roles. A token is 32 random bytes (base64url, prefixed 'crl_'); the store
// keeps only its SHA-256 under /corral/<cluster>/tokens/<hash>, with a name and a role.
import { createHash, randomBytes, timingSafeEqual } from 'node:crypto';
import { z } from 'zod';
import type { FastifyRequest } from 'fastify';
import type { Store, WatchEvent } from '../store/types.js';
import { ApiError } from './errors.js';

export const roles = ['viewer', 'operator', 'admin'] as const;
export type Role = (typeof roles)[number];
export const RoleSchema = z.enum(roles);
const rank: Record<Role, number> = { viewer: 0, operator: 1, admin: 2 };

export const tokenNamePattern = /^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$/;
export const TokenRecord = z.object({
  name: z.string().regex(tokenNamePattern),
  role: RoleSchema,
  createdAtMs: z.number(),
  /** first characters of the token, to tell tokens apart in listings */
  prefix: z.string(),
});
export type TokenRecord = z.infer<typeof TokenRecord>;

export interface Caller {
  name: string;
  role: Role;
}

export const tokenBytes = 32;
/** how long a looked-up token is trusted before the store is asked again (in the background when
 * it was valid); a watched change of the token's record drops it at once */
export const tokenCacheMs = 1000;
export const tokenCacheMax = 1000;

export function tokensPrefix(cluster: string): string {
  return `/corral/${cluster}/tokens/`;
}

export function hashToken(token: string): string {
  return createHash('sha256').update(token, 'utf8').digest('hex');
}

export function roleAtLeast(have: Role, need: Role): boolean {
  return rank[have] >= rank[need];
}

/** Create a token; returns the secret (shown once) and the stored record. */
export async function createToken(
  store: Store,
  cluster: string,
  name: string,
  role: Role,
  nowMs: number,
): Promise<{ token: string; record: TokenRecord }> {
  if (!tokenNamePattern.test(name))
    throw new ApiError(
      'CORRAL_API_BAD_REQUEST',
      `token name ${JSON.stringify(name)} is not valid`,
      'name',
      'letters, digits, ".", "_", "@" or "-", 1-64 chars',
    );
  const existing = await listTokens(store, cluster);
  if (existing.some((t) => t.record.name === name))
    throw new ApiError(
      'CORRAL_CONFLICT',
      `a token named "${name}" exists`,
      'name',
      'revoke it first or pick another name',
    );
  const token = 'crl_' + randomBytes(tokenBytes).toString('base64url');
  const record: TokenRecord = { name, role, createdAtMs: nowMs, prefix: token.slice(0, 8) };
  await store.put(tokensPrefix(cluster) + hashToken(token), JSON.stringify(record));
  return { token, record };
}

export async function listTokens(
  store: Store,
  cluster: string,
): Promise<{ hash: string; record: TokenRecord }[]> {
  const r = await store.range(tokensPrefix(cluster));
  const out: { hash: string; record: TokenRecord }[] = [];
  for (const kv of r.kvs) {
    try {
      const rec = TokenRecord.parse(JSON.parse(kv.value));
      out.push({ hash: kv.key.slice(tokensPrefix(cluster).length), record: rec });
    } catch {
      // a corrupt token record grants nothing
    }
  }
  return out;
}

/** Revoke by name; returns how many were removed. */
export async function revokeToken(store: Store, cluster: string, name: string): Promise<number> {
  let n = 0;
  for (const t of await listTokens(store, cluster))
    if (t.record.name === name) {
      await store.delete(tokensPrefix(cluster) + t.hash);
      n++;
    }
  return n;
}

/** the store watch's batches, as the hub emits them ('kvs', 'reset') */
interface KvsSource {
  on(event: 'kvs', f: (evs: WatchEvent[]) => void): unknown;
  on(event: 'reset', f: () => void): unknown;
}

/**
 * Token lookups without the store on the request path: a verified token is remembered, a change
 * of its record in the store (revoke, re-create) drops it as soon as the store watch delivers it,
 * and a remembered token older than tokenCacheMs is still answered from memory while one read in
 * the background checks it again (if the watch restarted, everything is forgotten). Only a token
 * seen for the first time waits for the store (concurrent requests with it share one read).
 * Behind a busy store (an agent's queue of writes during a failover) a request never waits for it.
 */
export class TokenVerifier {
  private cache = new Map<string, { caller: Caller | null; atMs: number }>();
  private inflight = new Map<string, Promise<Caller | null>>();
  /** bumped by every invalidation: a read that started before one does not fill the cache */
  private generation = 0;
  private readonly prefix: string;
  constructor(
    private store: Store,
    private cluster: string,
    watch?: KvsSource,
  ) {
    this.prefix = tokensPrefix(cluster);
    watch?.on('kvs', (evs) => {
      for (const e of evs)
        if (e.kv.key.startsWith(this.prefix)) {
          this.generation++;
          this.cache.delete(e.kv.key.slice(this.prefix.length));
        }
    });
    watch?.on('reset', () => {
      this.generation++;
      this.cache.clear();
    });
  }

  async verify(token: string): Promise<Caller | null> {
    if (!/^crl_[A-Za-z0-9_-]{20,100}$/.test(token)) return null;
    const h = hashToken(token);
    const c = this.cache.get(h);
    if (c && Date.now() - c.atMs < tokenCacheMs) return c.caller;
    if (c?.caller) {
      void this.lookup(h).catch(() => undefined); // checked again off the request path
      return c.caller;
    }
    return this.lookup(h);
  }

  private lookup(h: string): Promise<Caller | null> {
    let p = this.inflight.get(h);
    if (!p) {
      p = this.read(h).finally(() => this.inflight.delete(h));
      this.inflight.set(h, p);
    }
    return p;
  }

  private async read(h: string): Promise<Caller | null> {
    const gen = this.generation;
    const kv = await this.store.get(this.prefix + h);
    let caller: Caller | null = null;
    if (kv) {
      // the key is the hash itself; compare again in constant time as a belt-and-braces check
      const keyHash = kv.key.slice(this.prefix.length);
      if (keyHash.length === h.length && timingSafeEqual(Buffer.from(keyHash), Buffer.from(h))) {
        const rec = TokenRecord.safeParse(JSON.parse(kv.value));
        if (rec.success) caller = { name: rec.data.name, role: rec.data.role };
      }
    }
    if (gen === this.generation) {
      if (this.cache.size >= tokenCacheMax) this.cache.clear();
      this.cache.set(h, { caller, atMs: Date.now() });
    }
    return caller;
  }
}

export function bearerOf(req: FastifyRequest): string | undefined {
  const h = req.headers.authorization;
  if (typeof h === 'string' && h.startsWith('Bearer ')) return h.slice(7).trim();
  // EventSource and WebSocket cannot set headers: the dashboard passes ?access_token=
  const q = (req.query as Record<string, unknown> | undefined)?.access_token;
  return typeof q === 'string' ? q : undefined;
}

export async function authenticate(
  verifier: TokenVerifier,
  req: FastifyRequest,
  need: Role,
): Promise<Caller> {
  const tok = bearerOf(req);
  if (!tok)
    throw new ApiError(
      'CORRAL_API_UNAUTHORIZED',
      'no bearer token',
      'headers.authorization',
      'send Authorization: Bearer <token> (create one with `corral token create --role viewer`)',
    );
  const caller = await verifier.verify(tok);
  if (!caller)
    throw new ApiError(
      'CORRAL_API_UNAUTHORIZED',
      'unknown or revoked token',
      'headers.authorization',
      'create a token with `corral token create`',
    );
  if (!roleAtLeast(caller.role, need))
    throw new ApiError(
      'CORRAL_API_FORBIDDEN',
      `token "${caller.name}" has role ${caller.role}; this needs ${need}`,
      '',
      `use a token with role ${need} or higher`,
    );
  return caller;
}
