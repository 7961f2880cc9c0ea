// The simulator's virtual clock and event queue. Events run in (time, seq) order; an
// event may belong to an owner (one agent incarnation): a frozen owner's events are held
// until it thaws, a dead owner's events are dropped. No real timers anywhere.
import { invariant } from '../core/errors.js';

export type OwnerState = 'live' | 'frozen' | 'dead';

/** Something whose code can be suspended (freeze) or killed (kill -9): one agent incarnation. */
export class Owner {
  state: OwnerState = 'live';
  /** callbacks that came due while frozen, run in order on thaw */
  held: (() => void)[] = [];
  constructor(readonly name: string) {}
}

interface QueuedEvent {
  atMs: number;
  seq: number;
  owner: Owner | undefined;
  fn: () => void;
  cancelled: boolean;
}

export const queueLimits = {
  /** a run with more pending events than this is a runaway (a loop scheduling without bound) */
  pendingEventsMax: 2_000_000,
};

/** The seam the simulated store uses for time, so it can also run on real time (conformance). */
export interface Scheduler {
  nowMs(): number;
  /** run fn at atMs (>= now) for owner; returns the cancel function */
  at(atMs: number, fn: () => void, owner?: Owner): () => void;
  /** run fn now if owner is live, later (thaw) if frozen, never if dead */
  deliver(owner: Owner | undefined, fn: () => void): void;
}

export class EventQueue implements Scheduler {
  private heap: QueuedEvent[] = [];
  private seq = 0;
  private now = 0;
  /** events executed so far */
  steps = 0;

  nowMs(): number {
    return this.now;
  }

  size(): number {
    return this.heap.length;
  }

  at(atMs: number, fn: () => void, owner?: Owner): () => void {
    invariant(Number.isFinite(atMs), 'event time must be finite');
    invariant(this.heap.length < queueLimits.pendingEventsMax, 'simulator event queue overflow');
    const ev: QueuedEvent = { atMs: Math.max(atMs, this.now), seq: this.seq++, owner, fn, cancelled: false };
    this.push(ev);
    return () => {
      ev.cancelled = true;
    };
  }

  after(delayMs: number, fn: () => void, owner?: Owner): () => void {
    return this.at(this.now + Math.max(0, delayMs), fn, owner);
  }

  deliver(owner: Owner | undefined, fn: () => void): void {
    if (!owner || owner.state === 'live') fn();
    else if (owner.state === 'frozen') owner.held.push(fn);
  }

  /** time of the next live event, undefined when empty */
  peekMs(): number | undefined {
    return this.heap[0]?.atMs;
  }

  /** run the next event (advancing the clock); false when the queue is empty or the next is past untilMs */
  step(untilMs: number): boolean {
    for (;;) {
      const top = this.heap[0];
      if (!top || top.atMs > untilMs) return false;
      this.pop();
      if (top.cancelled) continue;
      this.now = top.atMs;
      const o = top.owner;
      if (o && o.state === 'dead') continue;
      if (o && o.state === 'frozen') {
        o.held.push(top.fn);
        continue;
      }
      this.steps++;
      top.fn();
      return true;
    }
  }

  /** jump the clock forward (nothing due before then) */
  advanceTo(ms: number): void {
    if (ms > this.now) this.now = ms;
  }

  private less(a: QueuedEvent, b: QueuedEvent): boolean {
    return a.atMs < b.atMs || (a.atMs === b.atMs && a.seq < b.seq);
  }

  private push(ev: QueuedEvent): void {
    const h = this.heap;
    h.push(ev);
    let i = h.length - 1;
    while (i > 0) {
      const p = (i - 1) >> 1;
      if (!this.less(h[i] as QueuedEvent, h[p] as QueuedEvent)) break;
      [h[i], h[p]] = [h[p] as QueuedEvent, h[i] as QueuedEvent];
      i = p;
    }
  }

  private pop(): void {
    const h = this.heap;
    const last = h.pop() as QueuedEvent;
    if (h.length === 0) return;
    h[0] = last;
    let i = 0;
    for (;;) {
      const l = 2 * i + 1;
      const r = l + 1;
      let m = i;
      if (l < h.length && this.less(h[l] as QueuedEvent, h[m] as QueuedEvent)) m = l;
      if (r < h.length && this.less(h[r] as QueuedEvent, h[m] as QueuedEvent)) m = r;
      if (m === i) return;
      [h[i], h[m]] = [h[m] as QueuedEvent, h[i] as QueuedEvent];
      i = m;
    }
  }
}

export type DrainMode = 'micro' | 'immediate';

export const drainLimits = {
  /** microtask hops given to the code after each event (the deepest await chain of agent/manager code is far shorter) */
  microtaskHops: 64,
};

/**
 * Let every promise continuation caused by one event run before the clock moves on.
 * 'immediate' waits for a macrotask boundary (Node drains the whole microtask queue first):
 * exact but slow. 'micro' (default) yields microtaskHops times: twice as fast; the test suite
 * checks that both give byte-identical transition logs.
 */
export async function drainMicrotasks(mode: DrainMode = 'micro'): Promise<void> {
  if (mode === 'immediate') return new Promise((resolve) => setImmediate(resolve));
  for (let i = 0; i < drainLimits.microtaskHops; i++) await Promise.resolve();
}
