// Seeded randomness for the pure core and the simulator (xorshift128+ on 32-bit halves
// via splitmix32 seeding). The same seed gives the same sequence everywhere.
export interface Rng {
  /** uniform in [0, 1) */
  next(): number;
  /** integer in [lo, hi] */
  int(lo: number, hi: number): number;
  pick<T>(xs: readonly T[]): T;
  chance(p: number): boolean;
}

export function makeRng(seed: number): Rng {
  let s = seed >>> 0 || 0x9e3779b9;
  const next32 = (): number => {
    // mulberry32
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return (t ^ (t >>> 14)) >>> 0;
  };
  const rng: Rng = {
    next: () => next32() / 4294967296,
    int: (lo, hi) => lo + Math.floor(rng.next() * (hi - lo + 1)),
    pick: (xs) => {
      if (xs.length === 0) throw new Error('pick from empty list');
      return xs[rng.int(0, xs.length - 1)] as (typeof xs)[number];
    },
    chance: (p) => rng.next() < p,
  };
  return rng;
}
