// Wire protocol of `corral clone`.
//
// Two kinds of connections:
//   control  receiver -> server, newline-delimited JSON (schemas below, zod at the edge).
//            The server opens with a challenge; the receiver answers with an HMAC of it under the
//            session secret, and the server proves it knows the secret too (mutual).
//   data     upstream -> downstream (the server or a receiver feeding the next receiver), binary frames.
//            The upstream opens with HELLO (self-authenticating: HMAC over session, both names and the
//            link generation), the downstream answers READY with the offset it holds (resume point),
//            then HEADER, DATA/ZERO frames in offset order, END. The downstream sends ACKs back.
import { createHmac, randomBytes, timingSafeEqual } from 'node:crypto';
import { z } from 'zod';
import { CloneProtocolError } from './errors.js';

/** 2: the checksum is per-chunk (digest.ts), payloads may arrive in parts, links may run over TLS. */
export const protocolVersion = 2;

// ---- limits (named bounds, STYLE habit 6) ----
export const limits = {
  /** Largest payload a frame may carry (a chunk is at most this, compressed or not). */
  framePayloadMaxBytes: 16 * 1024 * 1024,
  /** Largest control line. */
  controlLineMaxBytes: 64 * 1024,
  /** Smallest and largest chunk the server may choose. */
  chunkMinBytes: 4096,
  chunkMaxBytes: 8 * 1024 * 1024,
  secretMinChars: 16,
} as const;

// ---- frames ----
export const FrameType = {
  hello: 1,
  ready: 2,
  reject: 3,
  header: 4,
  data: 5,
  zero: 6,
  end: 7,
  ack: 8,
} as const;
export type FrameTypeCode = (typeof FrameType)[keyof typeof FrameType];
export const frameFlagDeflate = 1;
/** On an ACK: the downstream has everything and has verified it (the link may close). */
export const frameFlagFinal = 2;
export const frameHeaderBytes = 24;

export interface Frame {
  type: FrameTypeCode;
  flags: number;
  /** Byte offset in the stream (DATA/ZERO), acknowledged offset (ACK/READY), size (END). */
  offset: number;
  /** Logical bytes covered (DATA/ZERO); 0 otherwise. */
  lengthBytes: number;
  /** The payload: pieces of socket reads, or one buffer of a PayloadPool (see hold). */
  payload: Buffer[];
  /** Set when the payload lives in a reused PayloadPool buffer: holders count on it (holdFrame). */
  hold?: PayloadHold;
}

/**
 * Reused buffers for received DATA payloads. A socket read is a fresh 64 KiB ArrayBuffer; a receiver
 * keeps them in its queue, ring and forward queue long enough that V8 promotes them, and freeing
 * promoted ArrayBuffers takes full mark-compact collections (about 30 per 512 MiB received, a fifth
 * of a receiver's CPU). The parser copies payloads into these buffers instead (a memcpy), so socket
 * reads die young, and each frame is one contiguous buffer (one write, one hash update).
 * A buffer goes back to the pool when the last holder releases it; a holder that never releases
 * only costs the reuse (the buffer is garbage collected), never correctness.
 */
export class PayloadPool {
  private readonly free: Buffer[] = [];
  /** Buffer size (the session's chunk size); 0 until known: payloads are then not pooled. */
  capacityBytes = 0;
  constructor(private readonly keepMax: number) {}

  take(n: number): PayloadHold {
    if (n > this.capacityBytes) return { buf: Buffer.allocUnsafeSlow(n), refs: 1, pool: null };
    let buf = this.free.pop();
    while (buf && buf.length !== this.capacityBytes) buf = this.free.pop();
    return { buf: buf ?? Buffer.allocUnsafeSlow(this.capacityBytes), refs: 1, pool: this };
  }

  give(buf: Buffer): void {
    if (buf.length === this.capacityBytes && this.free.length < this.keepMax) this.free.push(buf);
  }

  get idle(): number {
    return this.free.length;
  }
}

export interface PayloadHold {
  buf: Buffer;
  refs: number;
  pool: PayloadPool | null;
}

/** One more holder of the frame's payload (ring, socket write in flight...). */
export function holdFrame(f: Frame): void {
  if (f.hold) f.hold.refs++;
}

/** A holder is done with the frame's payload: the last one gives the buffer back to its pool. */
export function releaseFrame(f: Frame): void {
  const h = f.hold;
  if (!h || h.refs <= 0) return;
  h.refs--;
  if (h.refs === 0 && h.pool) {
    const pool = h.pool;
    h.pool = null;
    pool.give(h.buf);
  }
}

export function payloadBytes(f: Frame): number {
  let n = 0;
  for (const p of f.payload) n += p.length;
  return n;
}

/** The payload as one buffer (control frames, inflating): copies only when it arrived in pieces. */
export function payloadBuffer(f: Frame): Buffer {
  if (f.payload.length === 0) return Buffer.alloc(0);
  return f.payload.length === 1 ? f.payload[0]! : Buffer.concat(f.payload);
}

export function bareFrame(type: FrameTypeCode, offset: number, flags = 0): Frame {
  return { type, flags, offset, lengthBytes: 0, payload: [] };
}

const validTypes = new Set<number>(Object.values(FrameType));

export function encodeFrameHeader(f: Omit<Frame, 'payload'>, payloadBytes: number): Buffer {
  const h = Buffer.alloc(frameHeaderBytes);
  h.writeUInt8(f.type, 0);
  h.writeUInt8(f.flags, 1);
  h.writeBigUInt64BE(BigInt(f.offset), 4);
  h.writeUInt32BE(f.lengthBytes, 12);
  h.writeUInt32BE(payloadBytes, 16);
  return h;
}

/** Header and payload as separate buffers (no copy of the payload). */
export function encodeFrame(f: Frame): Buffer[] {
  return [encodeFrameHeader(f, payloadBytes(f)), ...f.payload];
}

/**
 * Writes a frame as one unit (corked: the header never goes out as a packet of its own).
 * onFlushed runs once the socket no longer needs the payload buffers.
 */
export function writeFrame(
  sock: {
    cork(): void;
    uncork(): void;
    write(b: Buffer, cb?: (err?: Error | null) => void): boolean;
  },
  f: Frame,
  onFlushed?: () => void,
): boolean {
  sock.cork();
  const parts = encodeFrame(f);
  let ok = true;
  parts.forEach((part, i) => {
    ok = (i === parts.length - 1 && onFlushed ? sock.write(part, () => onFlushed()) : sock.write(part)) && ok;
  });
  sock.uncork();
  return ok;
}

export function jsonFrame(type: FrameTypeCode, value: unknown, offset = 0): Frame {
  return { type, flags: 0, offset, lengthBytes: 0, payload: [Buffer.from(JSON.stringify(value))] };
}

/**
 * Incremental frame parser: push socket chunks, get whole frames. Without a pool, payload bytes are
 * never copied: a frame's payload is the list of socket chunks (or slices of them) it arrived in.
 * With a pool, DATA payloads are copied into a pool buffer as they arrive (the frame's hold, one
 * reference for whoever takes the frame), so no socket chunk outlives the push that brought it.
 * ephemeral: the pushed buffer is reused once push returns (a socket's static read buffer): whatever
 * the parser or an emitted frame keeps of it is copied first.
 */
export class FrameParser {
  private chunks: Buffer[] = [];
  private bufferedBytes = 0;
  private pending: Omit<Frame, 'payload'> | null = null;
  private pendingPayloadBytes = 0;
  /** The pool buffer the pending DATA payload is copied into, and how much of it is filled. */
  private target: PayloadHold | null = null;
  private targetFill = 0;

  constructor(
    private readonly pool: PayloadPool | null = null,
    private readonly ephemeral = false,
  ) {}

  push(data: Buffer): Frame[] {
    this.chunks.push(data);
    this.bufferedBytes += data.length;
    const out: Frame[] = [];
    for (;;) {
      if (this.pending === null) {
        if (this.bufferedBytes < frameHeaderBytes) break;
        const h = this.take(frameHeaderBytes);
        const type = h.readUInt8(0);
        if (!validTypes.has(type)) throw new CloneProtocolError(`unknown frame type ${type}`);
        const offsetBig = h.readBigUInt64BE(4);
        if (offsetBig > BigInt(Number.MAX_SAFE_INTEGER))
          throw new CloneProtocolError('frame offset out of range');
        const payloadBytes = h.readUInt32BE(16);
        if (payloadBytes > limits.framePayloadMaxBytes)
          throw new CloneProtocolError(
            `frame payload ${payloadBytes} bytes exceeds ${limits.framePayloadMaxBytes}`,
          );
        this.pending = {
          type: type as FrameTypeCode,
          flags: h.readUInt8(1),
          offset: Number(offsetBig),
          lengthBytes: h.readUInt32BE(12),
        };
        this.pendingPayloadBytes = payloadBytes;
        if (this.pool && type === FrameType.data && payloadBytes > 0) {
          this.target = this.pool.take(payloadBytes);
          this.targetFill = 0;
        }
      }
      if (this.target) {
        const t = this.target;
        this.targetFill += this.copyInto(t.buf, this.targetFill, this.pendingPayloadBytes - this.targetFill);
        if (this.targetFill < this.pendingPayloadBytes) break;
        out.push({ ...this.pending, payload: [t.buf.subarray(0, this.pendingPayloadBytes)], hold: t });
        this.target = null;
        this.pending = null;
        continue;
      }
      if (this.bufferedBytes < this.pendingPayloadBytes) break;
      let payload = this.pendingPayloadBytes > 0 ? this.takeParts(this.pendingPayloadBytes) : [];
      if (this.ephemeral && payload.length > 0) payload = [Buffer.concat(payload)];
      out.push({ ...this.pending, payload });
      this.pending = null;
    }
    // Only what is left of this push's buffer needs a copy (earlier leftovers are copies already).
    if (this.ephemeral) this.chunks = this.chunks.map((c) => (c.buffer === data.buffer ? Buffer.from(c) : c));
    return out;
  }

  /** Copies up to n buffered bytes into dst at off, dropping the chunks consumed; returns the count. */
  private copyInto(dst: Buffer, off: number, n: number): number {
    let done = 0;
    while (done < n && this.chunks.length > 0) {
      const c = this.chunks[0]!;
      const k = Math.min(c.length, n - done);
      c.copy(dst, off + done, 0, k);
      done += k;
      if (k === c.length) this.chunks.shift();
      else this.chunks[0] = c.subarray(k);
    }
    this.bufferedBytes -= done;
    return done;
  }

  /** n bytes as slices of the buffered chunks (no copy). */
  private takeParts(n: number): Buffer[] {
    const parts: Buffer[] = [];
    let left = n;
    while (left > 0) {
      const c = this.chunks[0]!;
      if (c.length <= left) {
        parts.push(c);
        this.chunks.shift();
        left -= c.length;
      } else {
        parts.push(c.subarray(0, left));
        this.chunks[0] = c.subarray(left);
        left = 0;
      }
    }
    this.bufferedBytes -= n;
    return parts;
  }

  /** n bytes as one buffer (frame headers: copies only when they straddle two chunks). */
  private take(n: number): Buffer {
    const first = this.chunks[0]!;
    if (first.length >= n) {
      const res = first.subarray(0, n);
      if (first.length === n) this.chunks.shift();
      else this.chunks[0] = first.subarray(n);
      this.bufferedBytes -= n;
      return res;
    }
    const res = Buffer.allocUnsafe(n);
    let filled = 0;
    while (filled < n) {
      const c = this.chunks[0]!;
      const want = n - filled;
      if (c.length <= want) {
        c.copy(res, filled);
        filled += c.length;
        this.chunks.shift();
      } else {
        c.copy(res, filled, 0, want);
        this.chunks[0] = c.subarray(want);
        filled += want;
      }
    }
    this.bufferedBytes -= n;
    return res;
  }
}

// ---- stream header ----
export const StreamHeader = z.object({
  v: z.literal(protocolVersion),
  session: z.string().min(1),
  source: z.string(),
  sizeBytes: z.number().int().nonnegative(),
  sha256: z.string().regex(/^[0-9a-f]{64}$/),
  chunkBytes: z.number().int().min(limits.chunkMinBytes).max(limits.chunkMaxBytes),
  compress: z.enum(['none', 'deflate']),
});
export type StreamHeader = z.infer<typeof StreamHeader>;

export function sameStream(a: StreamHeader, b: StreamHeader): string | null {
  if (a.session !== b.session) return `session '${b.session}' is not '${a.session}'`;
  if (a.sizeBytes !== b.sizeBytes) return `size ${b.sizeBytes} is not ${a.sizeBytes}`;
  if (a.sha256 !== b.sha256) return `source checksum ${b.sha256} is not ${a.sha256}`;
  if (a.source !== b.source) return `source '${b.source}' is not '${a.source}'`;
  return null;
}

export const LinkHello = z.object({
  session: z.string(),
  from: z.string(),
  to: z.string(),
  gen: z.number().int().nonnegative(),
  mac: z.string(),
});
export type LinkHello = z.infer<typeof LinkHello>;

// ---- control messages ----
const name = z
  .string()
  .min(1)
  .max(64)
  .regex(/^[A-Za-z0-9][A-Za-z0-9._-]*$/, 'letters, digits, . _ - only');

export const ToServer = z.discriminatedUnion('t', [
  z.object({
    t: z.literal('hello'),
    v: z.literal(protocolVersion),
    session: z.string().min(1),
    name,
    mac: z.string(),
    clientNonce: z.string().min(16),
    dataPort: z.number().int().min(1).max(65535),
    dataHost: z.string().nullable(),
    targetBytes: z.number().int().nonnegative().nullable(),
  }),
  z.object({
    t: z.literal('progress'),
    writtenBytes: z.number().int().nonnegative(),
    rateBps: z.number().nonnegative(),
    blocked: z.boolean(),
    forwardTo: z.string().nullable(),
    forwardAckBytes: z.number().int().nonnegative(),
  }),
  /** The target is open (and, on a resume, rehashed): the receiver may be put into the chain. */
  z.object({ t: z.literal('ready'), writtenBytes: z.number().int().nonnegative() }),
  z.object({ t: z.literal('done'), sha256: z.string(), ok: z.boolean(), writtenBytes: z.number().int() }),
  z.object({ t: z.literal('failed'), reason: z.string() }),
  z.object({ t: z.literal('link-failed'), to: z.string(), reason: z.string() }),
]);
export type ToServer = z.infer<typeof ToServer>;

const Route = z.object({
  to: z.string(),
  host: z.string(),
  port: z.number().int(),
  gen: z.number().int().nonnegative(),
});
export type Route = z.infer<typeof Route>;

export const ToReceiver = z.discriminatedUnion('t', [
  z.object({ t: z.literal('challenge'), v: z.literal(protocolVersion), nonce: z.string() }),
  z.object({ t: z.literal('refused'), code: z.string(), reason: z.string() }),
  z.object({ t: z.literal('welcome'), header: StreamHeader, serverMac: z.string() }),
  z.object({ t: z.literal('route'), downstream: Route.nullable() }),
  z.object({ t: z.literal('finish'), reason: z.string() }),
]);
export type ToReceiver = z.infer<typeof ToReceiver>;

// ---- authentication ----
export function mac(secret: string, ...parts: (string | number)[]): string {
  return createHmac('sha256', secret).update(parts.join('\n')).digest('hex');
}

export function macEqual(a: string, b: string): boolean {
  const ab = Buffer.from(a, 'utf8');
  const bb = Buffer.from(b, 'utf8');
  return ab.length === bb.length && timingSafeEqual(ab, bb);
}

export const helloMac = (secret: string, nonce: string, session: string, who: string) =>
  mac(secret, 'corral-clone/hello', nonce, session, who);
export const welcomeMac = (secret: string, clientNonce: string, session: string) =>
  mac(secret, 'corral-clone/welcome', clientNonce, session);
export const linkMac = (secret: string, session: string, from: string, to: string, gen: number) =>
  mac(secret, 'corral-clone/link', session, from, to, gen);

export function newNonce(): string {
  return randomBytes(16).toString('hex');
}

export function newSecret(): string {
  return randomBytes(24).toString('base64url');
}

/** Splits a byte stream into bounded JSON lines. */
export class LineSplitter {
  private buf = '';
  constructor(private readonly maxBytes: number = limits.controlLineMaxBytes) {}
  push(data: Buffer): string[] {
    this.buf += data.toString('utf8');
    const lines = this.buf.split('\n');
    this.buf = lines.pop() ?? '';
    if (this.buf.length > this.maxBytes)
      throw new CloneProtocolError(`control line longer than ${this.maxBytes} bytes`);
    return lines.filter((l) => l.trim().length > 0);
  }
}
