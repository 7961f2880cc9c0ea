// The simulated heartbeat disk (src/health/diskhb.ts) and its sbd fence device (src/fence/sbd.ts)
// on virtual time. One shared disk, one slot per node: a node sector written only by the node's
// monitor, a mailbox written only by a fencer. A node may lose its path to the disk (`disk NODE
// lost`): every I/O it makes then fails (the device is gone: EIO), its slot goes silent.
//
// SimDiskMonitor follows DiskHeartbeat's rules line by line (write every intervalMs, read the
// mailbox first, obey a pill by self-fencing then acknowledging, vouch until the last good
// round + vouchMs, declare the disk lost after lossMs without a good write, self-fence when both
// the disk and the store are lost). DiskHeartbeat itself is not driven here: its I/O is bound to a
// real file handle (O_DIRECT probing, libuv timeouts on the real clock), and making that
// injectable would change the production monitor's code path; the rules are small and mirrored.
// fenceSbdSim follows fenceSbd: write the pill, then poll the slot until it acknowledges
// (success), stays unchanged for msgwaitMs (success by silence), or timeoutMs passes (failure).
import type { NodeMonitor, NodeMonitorContext } from '../env/types.js';
import { diskRules } from '../health/diskhb.js';
import type { EventQueue, Owner } from './queue.js';

export type SimSlotState = 'empty' | 'alive' | 'fenced' | 'stopped';

export interface SimNodeSector {
  node: string;
  counter: number;
  writtenAtMs: number;
  state: SimSlotState;
  ackSeq: number;
  ackAtMs: number;
}

export interface SimMailbox {
  pillSeq: number;
  pillAtMs: number;
  from: string;
}

/** disk settings of a scenario (`disk interval=1s msgwait=4s timeout=10s`) */
export interface DiskDef {
  intervalMs: number;
  msgwaitMs: number;
  /** the sbd device's own bound (production: the device's timeoutMs) */
  timeoutMs: number;
}

export const defaultDisk: DiskDef = { intervalMs: 1000, msgwaitMs: 4000, timeoutMs: 10000 };

export const simDiskLimits = {
  /** one read or write of the shared disk */
  ioMs: 1,
  /** how often the sbd device reads the slot while waiting (sbdLimits.pollMs) */
  pollMs: 100,
};

/** vouchMs exactly as `corral agent` derives it (src/cli/commands/agent.ts nodeMonitors) */
export function vouchMsOf(d: DiskDef): number | undefined {
  const v = Math.floor(d.msgwaitMs / 2);
  return v > 2 * d.intervalMs ? v : undefined;
}

export class DiskIoError extends Error {}

export class SimDisk {
  private readonly sectors = new Map<string, SimNodeSector>();
  private readonly mail = new Map<string, SimMailbox>();
  /** nodes that lost their path to the disk */
  readonly lost = new Set<string>();

  constructor(
    readonly def: DiskDef,
    private readonly q: EventQueue,
    readonly slots: string[],
  ) {}

  /** one I/O from `from`: takes ioMs, fails if that node lost the disk (checked when it completes) */
  io<T>(from: string, owner: Owner | undefined, fn: () => T): Promise<T> {
    return new Promise((resolve, reject) =>
      this.q.after(
        simDiskLimits.ioMs,
        () => {
          if (this.lost.has(from)) reject(new DiskIoError(`heartbeat disk: I/O error from ${from}`));
          else resolve(fn());
        },
        owner,
      ),
    );
  }

  sector(node: string): SimNodeSector {
    return (
      this.sectors.get(node) ?? {
        node: '',
        counter: 0,
        writtenAtMs: 0,
        state: 'empty',
        ackSeq: 0,
        ackAtMs: 0,
      }
    );
  }
  mailbox(node: string): SimMailbox {
    return this.mail.get(node) ?? { pillSeq: 0, pillAtMs: 0, from: '' };
  }
  writeSector(node: string, s: SimNodeSector): void {
    this.sectors.set(node, { ...s });
  }
  writeMailbox(node: string, m: SimMailbox): void {
    this.mail.set(node, { ...m });
  }
}

export interface SimDiskMonitorOptions {
  disk: SimDisk;
  node: string;
  owner: Owner;
  nowMs: () => number;
  setTimer: (ms: number, fn: () => void) => () => void;
  log: (level: 'info' | 'warn' | 'error', msg: string) => void;
  /** a sim log entry (pill obeyed, acknowledged, disk lost) */
  note: (state: string, reason: string) => void;
  vouchMs: number | undefined;
}

/** DiskHeartbeat's rules on the simulated disk (see the file comment). */
export class SimDiskMonitor implements NodeMonitor {
  readonly name = 'disk-heartbeat';
  private counter = 0;
  private ackSeq = 0;
  private ackAtMs = 0;
  private lastOkMs = 0;
  private lastGoodRoundMs = 0;
  private lost = false;
  private stopped = false;
  private cancel: (() => void) | undefined;
  private ticking: Promise<void> | undefined;
  private ctx: NodeMonitorContext | undefined;

  constructor(private readonly o: SimDiskMonitorOptions) {}

  private get d(): SimDisk {
    return this.o.disk;
  }
  private io<T>(fn: () => T): Promise<T> {
    return this.d.io(this.o.node, this.o.owner, fn);
  }
  private lossMs(): number {
    return 3 * this.d.def.intervalMs;
  }

  async start(ctx: NodeMonitorContext): Promise<void> {
    this.ctx = ctx;
    this.lastOkMs = this.o.nowMs();
    try {
      const own = await this.io(() => this.d.sector(this.o.node));
      // keep counting and keep the acknowledgement across restarts: an old pill is not obeyed twice
      if (own.node === ctx.node) {
        this.counter = own.counter;
        this.ackSeq = own.ackSeq;
        this.ackAtMs = own.ackAtMs;
      }
    } catch (e) {
      this.o.log('warn', `heartbeat disk unusable at start: ${(e as Error).message}`);
    }
    this.schedule(0);
  }

  private schedule(ms: number): void {
    if (this.stopped) return;
    this.cancel = this.o.setTimer(ms, () => {
      this.ticking = this.tick().finally(() => this.schedule(this.d.def.intervalMs));
    });
  }

  private async tick(): Promise<void> {
    const ctx = this.ctx!;
    try {
      const mail = await this.io(() => this.d.mailbox(this.o.node));
      if (mail.pillSeq > this.ackSeq) await this.obeyPill(mail);
      this.counter += 1;
      const sector: SimNodeSector = {
        node: ctx.node,
        counter: this.counter,
        writtenAtMs: this.o.nowMs(),
        state: this.stopped ? 'stopped' : ctx.joined() ? 'alive' : 'fenced',
        ackSeq: this.ackSeq,
        ackAtMs: this.ackAtMs,
      };
      await this.io(() => this.d.writeSector(this.o.node, sector));
      this.lastOkMs = this.o.nowMs();
      if (mail.pillSeq <= this.ackSeq) this.lastGoodRoundMs = this.lastOkMs;
      if (this.lost) {
        this.o.log('info', 'heartbeat disk reachable again');
        this.o.note('disk-back', 'heartbeat disk reachable again');
      }
      this.lost = false;
    } catch (e) {
      const silentMs = this.o.nowMs() - this.lastOkMs;
      if (!this.lost && silentMs >= this.lossMs()) {
        this.lost = true;
        this.o.log('warn', `heartbeat disk lost for ${silentMs} ms: ${(e as Error).message}`);
        this.o.note('disk-lost', `heartbeat disk lost for ${silentMs} ms`);
      }
    }
    await diskRules.afterRound({ lost: this.lost, stopped: this.stopped }, ctx);
  }

  vouchUntilMs(): number {
    return diskRules.vouchUntilMs({
      vouchMs: this.o.vouchMs,
      lost: this.lost,
      stopped: this.stopped,
      lastGoodRoundMs: this.lastGoodRoundMs,
    });
  }

  private async obeyPill(mail: SimMailbox): Promise<void> {
    const ctx = this.ctx!;
    this.o.log('error', `poison pill ${mail.pillSeq} from ${mail.from || '?'}`);
    this.o.note('poison-pill', `pill ${mail.pillSeq} from ${mail.from || '?'} read`);
    const warn = (msg: string) => {
      this.o.log('warn', msg);
      this.o.note('pill-not-acknowledged', 'the agent did not self-fence (disarmed?)');
    };
    if (!(await diskRules.obeyPill(ctx, mail.from, warn))) return;
    this.ackSeq = mail.pillSeq;
    this.ackAtMs = this.o.nowMs();
    this.o.note('pill-acknowledged', `pill ${mail.pillSeq} acknowledged after the self-fence`);
  }

  async stop(): Promise<void> {
    this.stopped = true;
    this.cancel?.();
    await this.ticking?.catch(() => undefined);
    if (!this.ctx) return;
    const sector: SimNodeSector = {
      node: this.ctx.node,
      counter: this.counter + 1,
      writtenAtMs: this.o.nowMs(),
      state: 'stopped',
      ackSeq: this.ackSeq,
      ackAtMs: this.ackAtMs,
    };
    await this.io(() => this.d.writeSector(this.o.node, sector)).catch(() => undefined);
  }
}

/**
 * fenceSbd on the simulated disk, run by `from` (the manager's node). Resolves with how it
 * ended; it never touches the target's power: the target's own agent (or its watchdog, or its
 * death) is what makes it safe, as on real hardware.
 */
export async function fenceSbdSim(o: {
  disk: SimDisk;
  q: EventQueue;
  from: string;
  target: string;
  /** min(device timeoutMs, what the fencer's deadline leaves) */
  timeoutMs: number;
}): Promise<{ ok: true; how: string } | { ok: false; error: string }> {
  const { disk, q, target } = o;
  const t0 = q.nowMs();
  const io = <T>(fn: () => T): Promise<T> => disk.io(o.from, undefined, fn);
  try {
    const before = await io(() => disk.sector(target));
    const mail = await io(() => disk.mailbox(target));
    const seq = Math.max(mail.pillSeq, before.ackSeq) + 1;
    await io(() => disk.writeMailbox(target, { pillSeq: seq, pillAtMs: q.nowMs(), from: o.from }));
    const sentMs = q.nowMs();
    let lastCounter = before.counter;
    let lastChangeMs = sentMs;
    for (;;) {
      await new Promise((r) => q.after(simDiskLimits.pollMs, () => r(undefined)));
      const now = q.nowMs();
      let s: SimNodeSector | undefined;
      try {
        s = await io(() => disk.sector(target));
      } catch {
        s = undefined; // a read error proves nothing either way
      }
      if (s && s.ackSeq >= seq) return { ok: true, how: `pill ${seq} acknowledged` };
      if (s && s.counter !== lastCounter) {
        lastCounter = s.counter;
        lastChangeMs = now;
      }
      if (s && now - lastChangeMs >= disk.def.msgwaitMs)
        return { ok: true, how: `slot silent for ${disk.def.msgwaitMs} ms after pill ${seq}` };
      if (now - t0 >= o.timeoutMs)
        return {
          ok: false,
          error:
            `pill ${seq} not acknowledged within ${o.timeoutMs} ms` +
            (now - lastChangeMs < disk.def.msgwaitMs ? ' (and it still writes its heartbeat)' : ''),
        };
    }
  } catch (e) {
    return { ok: false, error: (e as Error).message };
  }
}
