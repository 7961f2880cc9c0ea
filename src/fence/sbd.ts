// The `sbd` fence device: a poison pill through the heartbeat disk (src/health/diskhb.ts).
//
// fence(node): write a pill into the node's mailbox sector, then read its node sector every
// poll until either
//   - it acknowledges the pill (ackSeq >= ours): its agent killed every resource first, so
//     this is a positive fence confirmation; or
//   - its node sector stays unchanged for msgwaitMs, measured on this host's clock from the
//     moment the pill was written: success by silence.
//
// Why silence is safe (the timing argument): the manager runs fence devices only for a node
// whose lease already expired in the store, that is at least leaseTtlMs after the node's last
// successful renewal; by then the node's agent has self-fenced (leaseTtlMs - selfFenceMarginMs)
// and, if it froze, its watchdog has killed its resources by the same deadline. A live agent
// that still reads the disk obeys the pill within one disk interval and writes its slot again,
// so its counter moves; an agent that lost the disk and the store together self-fences at once.
// msgwaitMs must therefore cover at least the margin the manager uses without any device
// (noDeviceFenceMarginMs, checked where the agent is configured) and several disk intervals.
// A node that keeps writing its slot but never acknowledges (a disarmed cluster, a broken
// agent) is NOT fenced: the device fails when timeoutMs passes.
import { DiskHandle } from '../health/diskhb.js';
import type { DeviceResult } from './types.js';

export const sbdLimits = {
  /** how often the fencer reads the node's slot while waiting */
  pollMs: 100,
} as const;

export interface SbdFenceOptions {
  device: string;
  node: string;
  /** the node's slot; undefined: found by the node name written in the slots */
  slot: number | undefined;
  timeoutMs: number;
  msgwaitMs: number;
  /** who sends the pill (shown by corral disk show) */
  from: string;
  nowMs: () => number;
  note?: string;
}

export async function fenceSbd(o: SbdFenceOptions): Promise<DeviceResult> {
  const t0 = o.nowMs();
  let h: DiskHandle;
  try {
    h = await DiskHandle.open(o.device, Math.max(1, Math.min(2000, o.timeoutMs)));
  } catch (e) {
    return { ok: false, error: (e as Error).message };
  }
  try {
    const header = await h.header();
    let slot = o.slot;
    if (slot === undefined) {
      for (let i = 0; i < header.slotCount && slot === undefined; i++)
        if ((await h.nodeSector(i)).node === o.node) slot = i;
      if (slot === undefined)
        return {
          ok: false,
          error: `${o.device}: no slot carries node ${o.node} (never started with this disk?)`,
        };
    }
    if (slot >= header.slotCount)
      return { ok: false, error: `${o.device}: slot ${slot} does not exist (${header.slotCount} slots)` };
    const before = await h.nodeSector(slot);
    if (before.node !== '' && before.node !== o.node)
      return { ok: false, error: `${o.device}: slot ${slot} belongs to ${before.node}, not ${o.node}` };
    const mail = await h.mailbox(slot);
    const seq = Math.max(mail.pillSeq, before.ackSeq) + 1;
    await h.writeMailbox(slot, { pillSeq: seq, pillAtMs: o.nowMs(), from: o.from });
    const sentMs = o.nowMs();
    let lastCounter = before.counter;
    let lastChangeMs = sentMs;
    for (;;) {
      await new Promise((r) => setTimeout(r, sbdLimits.pollMs));
      const now = o.nowMs();
      let s;
      try {
        s = await h.nodeSector(slot);
      } catch {
        s = undefined; // a read error proves nothing either way: keep waiting within the bounds
      }
      if (s && s.ackSeq >= seq) return { ok: true };
      if (s && s.counter !== lastCounter) {
        lastCounter = s.counter;
        lastChangeMs = now;
      }
      if (s && now - lastChangeMs >= o.msgwaitMs) return { ok: true };
      if (now - t0 >= o.timeoutMs)
        return {
          ok: false,
          error:
            `${o.device}: slot ${slot} of ${o.node} did not acknowledge the poison pill within ${o.timeoutMs} ms` +
            (now - lastChangeMs < o.msgwaitMs ? ' (and it still writes its heartbeat)' : '') +
            (o.note ? ` ${o.note}` : ''),
        };
    }
  } catch (e) {
    return { ok: false, error: (e as Error).message };
  } finally {
    await h.close();
  }
}
