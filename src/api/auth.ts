// Bearer tokens with roles. A token is 32 random bytes (base64url, prefixed 'crl_'); the store
// keeps only its SHA-256 under /corral/<cluster>/tokens/<hash>, with a name and a role.
import { createHash, randomBytes, timingSafeEqual } from 'node:crypto';
import { z } from 'zod';
import type { FastifyRequest } from 'fastify';
import type { Store } from '../store/types.js';
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
/** how long a looked-up token is trusted before the store is asked again (revocation delay) */
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

export class TokenVerifier {
  private cache = new Map<string, { caller: Caller | null; atMs: number }>();
  constructor(
    private store: Store,
    private cluster: string,
  ) {}

  async verify(token: string): Promise<Caller | null> {
    if (!/^crl_[A-Za-z0-9_-]{20,100}$/.test(token)) return null;
    const h = hashToken(token);
    const now = Date.now();
    const c = this.cache.get(h);
    if (c && now - c.atMs < tokenCacheMs) return c.caller;
    const kv = await this.store.get(tokensPrefix(this.cluster) + h);
    let caller: Caller | null = null;
    if (kv) {
      // the key is the hash itself; compare again in constant time as a belt-and-braces check
      const keyHash = kv.key.slice(tokensPrefix(this.cluster).length);
      if (keyHash.length === h.length && timingSafeEqual(Buffer.from(keyHash), Buffer.from(h))) {
        const rec = TokenRecord.safeParse(JSON.parse(kv.value));
        if (rec.success) caller = { name: rec.data.name, role: rec.data.role };
      }
    }
    if (this.cache.size >= tokenCacheMax) this.cache.clear();
    this.cache.set(h, { caller, atMs: now });
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
