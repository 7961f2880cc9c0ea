// Disk heartbeat (cxm's heartbeat disk, Pacemaker's SBD): a shared block device (or file)
// with a header and one slot per node. Layout, every block 4096 bytes (aligned for O_DIRECT
// on 512- and 4096-byte sector devices):
//
//   block 0                      header: magic "CORRALHB", version, slot count, slot size, block size, formatted at
//   block 1 + 2i                 slot i, node sector: written ONLY by the node of slot i
//                                (counter, time, state, node name, poison-pill acknowledgement)
//   block 2 + 2i                 slot i, mailbox sector: written ONLY by a fencer (poison pill)
//
// One writer per sector, so a node's heartbeat never overwrites a pill and a fencer never
// overwrites a heartbeat. I/O is O_DIRECT|O_DSYNC where the file system allows it (block
// devices), else O_DSYNC plus fsync (tmpfs refuses O_DIRECT). At most one I/O is in flight per
// handle and each is bounded by a timeout, so a hung device cannot pile up libuv threads.
import { constants, promises as fsp } from 'node:fs';
import { CorralError } from '../core/errors.js';
import type { Env, NodeMonitor, NodeMonitorContext } from '../env/types.js';

export const diskLimits = {
  blockBytes: 4096,
  /** alignment probe step: an ArrayBuffer's backing store is at least 8-byte aligned */
  alignProbeStepBytes: 8,
  slotsMax: 255,
  nodeNameBytesMax: 64,
  /** default bound on one read or write of the heartbeat disk */
  ioTimeoutMs: 2000,
} as const;

const headerMagic = 'CORRALHB';
const nodeTag = 0x4e424843; // "CHBN"
const mailTag = 0x4d424843; // "CHBM"
export const diskFormatVersion = 1;
export const slotBytes = 2 * diskLimits.blockBytes;

export type SlotState = 'empty' | 'alive' | 'fenced' | 'stopped';
const stateCodes: SlotState[] = ['empty', 'alive', 'fenced', 'stopped'];

export interface DiskHeader {
  version: number;
  slotCount: number;
  slotBytes: number;
  blockBytes: number;
  formattedAtMs: number;
}

/** what the node of a slot last wrote */
export interface NodeSector {
  node: string;
  counter: number;
  writtenAtMs: number;
  state: SlotState;
  /** the highest poison-pill sequence it acknowledged (after self-fencing) */
  ackSeq: number;
  ackAtMs: number;
}

/** what a fencer last wrote into a slot's mailbox */
export interface Mailbox {
  pillSeq: number;
  pillAtMs: number;
  from: string;
}

export class DiskHeartbeatError extends CorralError {
  constructor(where: string, message: string, hint?: string) {
    super('CORRAL_DISK', `${where}: ${message}`, hint);
  }
}

export function diskBytes(slotCount: number): number {
  return diskLimits.blockBytes + slotCount * slotBytes;
}

const nodeOffset = (slot: number) => diskLimits.blockBytes + slot * slotBytes;
const mailOffset = (slot: number) => nodeOffset(slot) + diskLimits.blockBytes;

// ---------------------------------------------------------------- encoding

export function encodeHeader(h: DiskHeader, out: Buffer): void {
  out.fill(0);
  out.write(headerMagic, 0, 'latin1');
  out.writeUInt32LE(h.version, 8);
  out.writeUInt32LE(h.slotCount, 12);
  out.writeUInt32LE(h.slotBytes, 16);
  out.writeUInt32LE(h.blockBytes, 20);
  out.writeDoubleLE(h.formattedAtMs, 24);
}

export function decodeHeader(b: Buffer, where: string): DiskHeader {
  if (b.toString('latin1', 0, 8) !== headerMagic)
    throw new DiskHeartbeatError(
      where,
      'not a Corral heartbeat disk (no CORRALHB header)',
      'format it first: corral disk format DEV --nodes N',
    );
  const h: DiskHeader = {
    version: b.readUInt32LE(8),
    slotCount: b.readUInt32LE(12),
    slotBytes: b.readUInt32LE(16),
    blockBytes: b.readUInt32LE(20),
    formattedAtMs: b.readDoubleLE(24),
  };
  if (h.version !== diskFormatVersion)
    throw new DiskHeartbeatError(
      where,
      `heartbeat disk format version ${h.version}; this corral reads ${diskFormatVersion}`,
    );
  if (
    h.slotBytes !== slotBytes ||
    h.blockBytes !== diskLimits.blockBytes ||
    h.slotCount < 1 ||
    h.slotCount > diskLimits.slotsMax
  )
    throw new DiskHeartbeatError(
      where,
      `corrupt header (slots ${h.slotCount}, slot size ${h.slotBytes}, block ${h.blockBytes})`,
      'format it again',
    );
  return h;
}

function writeName(out: Buffer, at: number, name: string): void {
  const n = Buffer.from(name, 'utf8').subarray(0, diskLimits.nodeNameBytesMax);
  out.writeUInt8(n.length, at);
  n.copy(out, at + 1);
}
function readName(b: Buffer, at: number): string {
  const len = Math.min(b.readUInt8(at), diskLimits.nodeNameBytesMax);
  return b.toString('utf8', at + 1, at + 1 + len);
}

export function encodeNodeSector(s: NodeSector, out: Buffer): void {
  out.fill(0);
  out.writeUInt32LE(nodeTag, 0);
  out.writeUInt32LE(diskFormatVersion, 4);
  out.writeDoubleLE(s.counter, 8);
  out.writeDoubleLE(s.writtenAtMs, 16);
  out.writeUInt8(stateCodes.indexOf(s.state), 24);
  out.writeUInt32LE(s.ackSeq, 28);
  writeName(out, 32, s.node);
  out.writeDoubleLE(s.ackAtMs, 120);
}

export function decodeNodeSector(b: Buffer): NodeSector {
  if (b.readUInt32LE(0) !== nodeTag)
    return { node: '', counter: 0, writtenAtMs: 0, state: 'empty', ackSeq: 0, ackAtMs: 0 };
  return {
    counter: b.readDoubleLE(8),
    writtenAtMs: b.readDoubleLE(16),
    state: stateCodes[b.readUInt8(24)] ?? 'empty',
    ackSeq: b.readUInt32LE(28),
    node: readName(b, 32),
    ackAtMs: b.readDoubleLE(120),
  };
}

export function encodeMailbox(m: Mailbox, out: Buffer): void {
  out.fill(0);
  out.writeUInt32LE(mailTag, 0);
  out.writeUInt32LE(m.pillSeq, 4);
  out.writeDoubleLE(m.pillAtMs, 8);
  writeName(out, 16, m.from);
}

export function decodeMailbox(b: Buffer): Mailbox {
  if (b.readUInt32LE(0) !== mailTag) return { pillSeq: 0, pillAtMs: 0, from: '' };
  return { pillSeq: b.readUInt32LE(4), pillAtMs: b.readDoubleLE(8), from: readName(b, 16) };
}

// ---------------------------------------------------------------- I/O

/**
 * An open heartbeat disk. O_DIRECT needs an aligned buffer; JS cannot see addresses, so the
 * handle probes offsets inside one over-sized ArrayBuffer (backing stores do not move) with a
 * harmless read and keeps the first one the kernel accepts.
 */
export class DiskHandle {
  private constructor(
    readonly path: string,
    private fh: fsp.FileHandle,
    readonly direct: boolean,
    private buf: Buffer,
    private readonly ioTimeoutMs: number,
  ) {}

  private inflight: Promise<unknown> | undefined;

  /** the aligned buffer this handle uses: pass it to the next open() to skip the probe */
  get alignedBuffer(): Buffer {
    return this.buf;
  }

  static async open(
    path: string,
    ioTimeoutMs: number = diskLimits.ioTimeoutMs,
    reuse?: Buffer,
  ): Promise<DiskHandle> {
    const base = constants.O_RDWR | constants.O_DSYNC;
    const block = diskLimits.blockBytes;
    const arena = Buffer.from(new ArrayBuffer(3 * block));
    try {
      const fh = await fsp.open(path, base | constants.O_DIRECT);
      if (reuse) {
        const ok = await fh.read(reuse, 0, block, 0).then(
          () => true,
          () => false,
        );
        if (ok) return new DiskHandle(path, fh, true, reuse, ioTimeoutMs);
      }
      for (let off = 0; off < block; off += diskLimits.alignProbeStepBytes) {
        const b = arena.subarray(off, off + block);
        try {
          await fh.read(b, 0, block, 0);
          return new DiskHandle(path, fh, true, arena.subarray(off, off + 2 * block), ioTimeoutMs);
        } catch (e) {
          if ((e as NodeJS.ErrnoException).code !== 'EINVAL') {
            await fh.close();
            throw e;
          }
        }
      }
      await fh.close();
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EINVAL') throw wrapIo(path, 'open', e);
    }
    // the file system refuses O_DIRECT (tmpfs): synced buffered I/O plus fsync
    const fh = await fsp.open(path, base).catch((e: unknown) => {
      throw wrapIo(path, 'open', e);
    });
    return new DiskHandle(path, fh, false, arena.subarray(0, 2 * block), ioTimeoutMs);
  }

  /** one I/O at a time, bounded: a hung device fails fast instead of queueing work */
  private async io<T>(what: string, fn: () => Promise<T>): Promise<T> {
    if (this.inflight)
      throw new DiskHeartbeatError(this.path, `${what}: an earlier I/O is still hanging`, 'check the device');
    const p = fn();
    this.inflight = p;
    void p.then(
      () => (this.inflight = undefined),
      () => (this.inflight = undefined),
    );
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(
        () => reject(new DiskHeartbeatError(this.path, `${what} timed out after ${this.ioTimeoutMs} ms`)),
        this.ioTimeoutMs,
      );
    });
    try {
      return await Promise.race([p, timeout]);
    } catch (e) {
      throw wrapIo(this.path, what, e);
    } finally {
      clearTimeout(timer);
    }
  }

  /** read one 4096-byte block; the returned buffer is reused by the next call */
  readBlock(offset: number): Promise<Buffer> {
    const b = this.buf.subarray(0, diskLimits.blockBytes);
    return this.io('read', async () => {
      const r = await this.fh.read(b, 0, b.length, offset);
      if (r.bytesRead !== b.length)
        throw new DiskHeartbeatError(
          this.path,
          `short read at ${offset} (${r.bytesRead} bytes): device too small?`,
        );
      return b;
    });
  }

  /** write one block encoded by fill, synced */
  writeBlock(offset: number, fill: (b: Buffer) => void): Promise<void> {
    const b = this.buf.subarray(0, diskLimits.blockBytes);
    fill(b);
    return this.io('write', async () => {
      const r = await this.fh.write(b, 0, b.length, offset);
      if (r.bytesWritten !== b.length) throw new DiskHeartbeatError(this.path, `short write at ${offset}`);
      if (!this.direct) await this.fh.sync();
    });
  }

  async header(): Promise<DiskHeader> {
    return decodeHeader(await this.readBlock(0), this.path);
  }
  async nodeSector(slot: number): Promise<NodeSector> {
    return decodeNodeSector(await this.readBlock(nodeOffset(slot)));
  }
  async mailbox(slot: number): Promise<Mailbox> {
    return decodeMailbox(await this.readBlock(mailOffset(slot)));
  }
  writeNodeSector(slot: number, s: NodeSector): Promise<void> {
    return this.writeBlock(nodeOffset(slot), (b) => encodeNodeSector(s, b));
  }
  writeMailbox(slot: number, m: Mailbox): Promise<void> {
    return this.writeBlock(mailOffset(slot), (b) => encodeMailbox(m, b));
  }

  /** true while an I/O that timed out has not returned yet (the device hangs) */
  hanging(): boolean {
    return this.inflight !== undefined;
  }

  async close(): Promise<void> {
    // a hanging I/O keeps the descriptor busy; closing under it is safe for the kernel
    await this.fh.close().catch(() => undefined);
  }
}

function wrapIo(path: string, what: string, e: unknown): CorralError {
  if (e instanceof CorralError) return e;
  const err = e as NodeJS.ErrnoException;
  return new DiskHeartbeatError(
    path,
    `${what} failed: ${err.code ?? ''} ${err.message}`.trim(),
    err.code === 'ENOENT' ? "check the device path in the node's `disk` setting" : undefined,
  );
}

/** Write a fresh header and empty slots. Refuses a formatted disk unless force. */
export async function formatDisk(
  path: string,
  slotCount: number,
  nowMs: number,
  force = false,
): Promise<DiskHeader> {
  if (!Number.isInteger(slotCount) || slotCount < 1 || slotCount > diskLimits.slotsMax)
    throw new DiskHeartbeatError(
      path,
      `--nodes ${slotCount}: expected an integer from 1 to ${diskLimits.slotsMax}`,
    );
  const st = await fsp.stat(path).catch((e: unknown) => {
    throw wrapIo(path, 'stat', e);
  });
  const need = diskBytes(slotCount);
  if (st.isFile() && st.size < need) await fsp.truncate(path, need);
  const h = await DiskHandle.open(path);
  try {
    if (!force) {
      const existing = await h.header().catch(() => undefined);
      if (existing)
        throw new DiskHeartbeatError(
          path,
          `already a heartbeat disk with ${existing.slotCount} slots`,
          'add --force to wipe it (every node must be stopped)',
        );
    }
    for (let i = 0; i < slotCount; i++) {
      await h.writeBlock(nodeOffset(i), (b) => b.fill(0));
      await h.writeBlock(mailOffset(i), (b) => b.fill(0));
    }
    const header: DiskHeader = {
      version: diskFormatVersion,
      slotCount,
      slotBytes,
      blockBytes: diskLimits.blockBytes,
      formattedAtMs: nowMs,
    };
    await h.writeBlock(0, (b) => encodeHeader(header, b));
    // a block device smaller than the layout fails the last slot's read
    await h.nodeSector(slotCount - 1);
    return header;
  } finally {
    await h.close();
  }
}

export interface SlotView {
  slot: number;
  sector: NodeSector;
  mailbox: Mailbox;
}

export async function readDisk(
  path: string,
): Promise<{ header: DiskHeader; slots: SlotView[]; direct: boolean }> {
  const h = await DiskHandle.open(path);
  try {
    const header = await h.header();
    const slots: SlotView[] = [];
    for (let i = 0; i < header.slotCount; i++)
      slots.push({ slot: i, sector: await h.nodeSector(i), mailbox: await h.mailbox(i) });
    return { header, slots, direct: h.direct };
  } finally {
    await h.close();
  }
}

// ---------------------------------------------------------------- the node's monitor

/**
 * The monitor's safety rules, shared with the simulator's disk monitor (src/sim/disk.ts), whose
 * I/O is simulated: what the vouch covers, when losing the disk self-fences, and that a pill is
 * acknowledged only after a real kill.
 */
export const diskRules = {
  /** vouch for vouchMs after the last good round, never while the disk is lost or stopped */
  vouchUntilMs(s: { vouchMs?: number; lost: boolean; stopped: boolean; lastGoodRoundMs: number }): number {
    if (s.vouchMs === undefined || s.lost || s.stopped || s.lastGoodRoundMs === 0) return 0;
    return s.lastGoodRoundMs + s.vouchMs;
  },

  /** the disk and the store both lost: nobody can tell this node anything any more */
  async afterRound(s: { lost: boolean; stopped: boolean }, ctx: NodeMonitorContext): Promise<void> {
    if (s.lost && !s.stopped && ctx.joined() && !ctx.storeHealthy())
      await ctx.selfFence('lost both the store and the heartbeat disk');
  },

  /**
   * Obey a poison pill: self-fence, and say whether the pill may be acknowledged, which is only
   * once every resource is down by a kill (the acknowledgement is a fence record). A disarmed
   * agent does not kill, so never acknowledges.
   */
  async obeyPill(ctx: NodeMonitorContext, from: string, warn: (msg: string) => void): Promise<boolean> {
    const killed = await ctx.selfFence(`poison pill from ${from || 'a fencer'} on the heartbeat disk`);
    if (!killed) warn('poison pill not acknowledged: the agent did not self-fence (disarmed?)');
    return killed;
  },
};

export interface DiskHeartbeatOptions {
  path: string;
  slot: number;
  intervalMs: number;
  /** the disk counts as lost after this long without a successful write (default 3 intervals) */
  lossMs?: number;
  env: Pick<Env, 'nowMs' | 'setTimer' | 'log'>;
  ioTimeoutMs?: number;
  /**
   * Vouch for the node for this long after each good round (mailbox read without a pill, slot
   * written), so the agent keeps its resources when it loses the store alone (etcd without
   * quorum). Only safe when the manager fences this node through the disk (an sbd device): it
   * must stay below the device's msgwaitMs minus the time a self-fence takes, since the
   * fencer counts a slot silent for msgwaitMs as fenced. Undefined: never vouch.
   */
  vouchMs?: number;
}

/**
 * The agent's side of the heartbeat disk: writes its slot every interval, obeys a poison
 * pill (self-fence, then acknowledge), and self-fences at once when it has lost both the
 * disk and the store (it can no longer be told anything, nor tell anyone it is alive).
 */
export class DiskHeartbeat implements NodeMonitor {
  readonly name = 'disk-heartbeat';
  private handle: DiskHandle | undefined;
  /** a hung handle is kept (never reused) so that no second I/O piles up behind it */
  private hung: DiskHandle | undefined;
  private aligned: Buffer | undefined;
  private counter = 0;
  private ackSeq = 0;
  private ackAtMs = 0;
  private lastOkMs = 0;
  /** end of the last good round: mailbox read without a pill, then slot written */
  private lastGoodRoundMs = 0;
  private lost = false;
  private stopped = false;
  private cancel: (() => void) | undefined;
  private ticking: Promise<void> | undefined;
  private ctx: NodeMonitorContext | undefined;

  constructor(private readonly o: DiskHeartbeatOptions) {
    if (!(o.intervalMs > 0)) throw new DiskHeartbeatError(`disk ${o.path}`, 'intervalMs must be positive');
  }

  private lossMs(): number {
    return this.o.lossMs ?? 3 * this.o.intervalMs;
  }

  async start(ctx: NodeMonitorContext): Promise<void> {
    this.ctx = ctx;
    this.lastOkMs = this.o.env.nowMs();
    try {
      await this.openChecked();
      const own = await this.handle!.nodeSector(this.o.slot);
      // keep counting and keep the acknowledgement across restarts: an old pill is not obeyed twice
      if (own.node === ctx.node) {
        this.counter = own.counter;
        this.ackSeq = own.ackSeq;
        this.ackAtMs = own.ackAtMs;
      }
    } catch (e) {
      this.o.env.log('warn', `heartbeat disk unusable at start: ${(e as Error).message}`);
    }
    this.schedule(0);
  }

  private async openChecked(): Promise<void> {
    if (this.handle) return;
    const h = await DiskHandle.open(this.o.path, this.o.ioTimeoutMs ?? diskLimits.ioTimeoutMs, this.aligned);
    this.aligned = h.direct ? h.alignedBuffer : undefined;
    try {
      const header = await h.header();
      if (this.o.slot >= header.slotCount)
        throw new DiskHeartbeatError(
          this.o.path,
          `slot ${this.o.slot} does not exist (the disk has ${header.slotCount} slots)`,
          'format it with more slots: corral disk format DEV --nodes N --force',
        );
    } catch (e) {
      await h.close();
      throw e;
    }
    this.handle = h;
  }

  private schedule(ms: number): void {
    if (this.stopped) return;
    this.cancel = this.o.env.setTimer(ms, () => {
      this.ticking = this.tick().finally(() => this.schedule(this.o.intervalMs));
    });
  }

  private async tick(): Promise<void> {
    const ctx = this.ctx!;
    const env = this.o.env;
    try {
      if (this.hung?.hanging()) throw new DiskHeartbeatError(this.o.path, 'an earlier I/O still hangs');
      if (this.hung) await this.hung.close();
      this.hung = undefined;
      // opened every round: a device that went away (or was re-attached) is seen at once
      await this.openChecked();
      const h = this.handle!;
      const mail = await h.mailbox(this.o.slot);
      if (mail.pillSeq > this.ackSeq) await this.obeyPill(mail);
      this.counter += 1;
      await h.writeNodeSector(this.o.slot, {
        node: ctx.node,
        counter: this.counter,
        writtenAtMs: env.nowMs(),
        state: this.stopped ? 'stopped' : ctx.joined() ? 'alive' : 'fenced',
        ackSeq: this.ackSeq,
        ackAtMs: this.ackAtMs,
      });
      this.lastOkMs = env.nowMs();
      if (mail.pillSeq <= this.ackSeq) this.lastGoodRoundMs = this.lastOkMs;
      await h.close();
      this.handle = undefined;
      if (this.lost) env.log('info', 'heartbeat disk reachable again');
      this.lost = false;
    } catch (e) {
      if (this.handle?.hanging()) this.hung = this.handle;
      this.handle = undefined;
      const silentMs = env.nowMs() - this.lastOkMs;
      if (!this.lost && silentMs >= this.lossMs()) {
        this.lost = true;
        env.log('warn', `heartbeat disk lost for ${silentMs} ms: ${(e as Error).message}`);
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

  private async obeyPill(mail: Mailbox): Promise<void> {
    const ctx = this.ctx!;
    this.o.env.log('error', `poison pill ${mail.pillSeq} from ${mail.from || '?'} in slot ${this.o.slot}`);
    if (!(await diskRules.obeyPill(ctx, mail.from, (msg) => this.o.env.log('warn', msg)))) return;
    this.ackSeq = mail.pillSeq;
    this.ackAtMs = this.o.env.nowMs();
  }

  async stop(): Promise<void> {
    this.stopped = true;
    this.cancel?.();
    await this.ticking?.catch(() => undefined);
    if (!this.hung && this.ctx) await this.openChecked().catch(() => undefined);
    const h = this.handle;
    if (h && this.ctx) {
      await h
        .writeNodeSector(this.o.slot, {
          node: this.ctx.node,
          counter: this.counter + 1,
          writtenAtMs: this.o.env.nowMs(),
          state: 'stopped',
          ackSeq: this.ackSeq,
          ackAtMs: this.ackAtMs,
        })
        .catch(() => undefined);
    }
    await h?.close();
    this.handle = undefined;
  }
}
