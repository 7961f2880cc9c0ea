// The chain, as the server (coordinator) sees it: pure decisions, no I/O, no clock.
// The server feeds the first receiver; each receiver feeds the next. Links carry a generation:
// a new link gets a fresh, larger generation, so a downstream always prefers its newest upstream
// and a stale upstream (one the server routed around) is refused.

export const serverName = '@server';

/** upstream name -> downstream name (null: the end of the chain). */
export type Links = ReadonlyMap<string, string | null>;

export function linksOf(chain: readonly string[]): Map<string, string | null> {
  const links = new Map<string, string | null>();
  const all = [serverName, ...chain];
  for (let i = 0; i < all.length; i++) links.set(all[i]!, all[i + 1] ?? null);
  return links;
}

/** Upstreams whose downstream changed between two chains (they must be told their new route). */
export function changedUpstreams(prev: Links, next: Links): string[] {
  const out: string[] = [];
  for (const [up, down] of next) if (!prev.has(up) || prev.get(up) !== down) out.push(up);
  return out;
}

export function without(chain: readonly string[], name: string): string[] {
  return chain.filter((n) => n !== name);
}

export function moveToEnd(chain: readonly string[], name: string): string[] {
  return chain.includes(name) ? [...without(chain, name), name] : [...chain];
}

export interface LagView {
  name: string;
  writtenBytes: number;
  /** Receiving rate now. */
  rateBps: number;
  /** The receiver paused itself because its own downstream is slow (it is not the slow one). */
  blocked: boolean;
  moves: number;
  /** Time since it got its current upstream (a receiver catching up lags, and that is fine). */
  sinceRouteMs: number;
}

export interface SlowRule {
  lagMaxBytes: number;
  movesMax: number;
  graceMs: number;
  /** Slow means receiving at less than this fraction of the reference rate. */
  rateFraction: number;
}

/**
 * The receiver to move to the end of the chain, if any: the first one (from the head) that is more
 * than lagMaxBytes behind its upstream and receives clearly slower than the reference rate (the best
 * rate seen in the session; a receiver catching up is fast, so it is never moved), is not last, is not
 * blocked by its own downstream, had its upstream for at least graceMs, and has not been moved
 * movesMax times already. The first receiver is never "slow" by this rule: TCP back-pressure makes
 * the server send exactly as fast as it takes.
 */
export function slowReceiver(
  chain: readonly LagView[],
  sizeBytes: number,
  referenceRateBps: number,
  rule: SlowRule,
): string | null {
  for (let i = 1; i < chain.length - 1; i++) {
    const r = chain[i]!;
    const up = chain[i - 1]!;
    if (r.writtenBytes >= sizeBytes || r.blocked || r.moves >= rule.movesMax) continue;
    if (r.sinceRouteMs < rule.graceMs) continue;
    if (
      up.writtenBytes - r.writtenBytes > rule.lagMaxBytes &&
      r.rateBps < referenceRateBps * rule.rateFraction
    )
      return r.name;
  }
  return null;
}
