// Reading the stream out of a volume, chunk by chunk, for the forwarders (server and receivers)
// and for the source checksum:
//   - a bounded read-ahead (readAheadChunks reads in flight) so disk reads overlap socket writes;
//   - zero chunks coalesced into one compact ZERO record (up to zeroRunMaxBytes), so downstream
//     hops never see the zeros;
//   - optionally a used-block map (partclone, used-blocks.ts): blocks the filesystem does not use
//     are not read at all and travel as zeros (their old contents are garbage to the filesystem).
import type { FileHandle } from 'node:fs/promises';
import { ChunkedDigest } from './digest.js';
import { FrameType, type Frame } from './protocol.js';
import { isAllZero, readFully } from './volume.js';

export const readerLimits = {
  /** Chunk reads in flight ahead of the one being sent. */
  readAheadChunks: 4,
  /** Longest run of zero chunks sent as one ZERO record (the frame length field is 32 bits). */
  zeroRunMaxBytes: 256 * 1024 * 1024,
  /**
   * Chunk buffers kept for reuse once the socket has taken them (fresh 1 MiB buffers cost page
   * faults and garbage collection on every chunk).
   */
  poolBuffersMax: 16,
} as const;

/** Sorted, non-overlapping [start, end) byte ranges the filesystem uses. */
export interface UsedMap {
  fs: string;
  ranges: [number, number][];
  usedBytes: number;
}

/** Index of the first range ending after off (binary search). */
function firstRangeAfter(map: UsedMap, off: number): number {
  let lo = 0;
  let hi = map.ranges.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (map.ranges[mid]![1] <= off) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

/** The used parts of [off, off + n), relative to off. */
export function usedParts(map: UsedMap, off: number, n: number): [number, number][] {
  const out: [number, number][] = [];
  for (let i = firstRangeAfter(map, off); i < map.ranges.length; i++) {
    const [a, b] = map.ranges[i]!;
    if (a >= off + n) break;
    out.push([Math.max(a, off) - off, Math.min(b, off + n) - off]);
  }
  return out;
}

interface Chunk {
  offset: number;
  lengthBytes: number;
  /** null: all zeros (or unused by the filesystem). */
  data: Buffer | null;
}

export class ChunkReader {
  private readonly pending = new Map<number, Promise<Chunk>>();
  private readonly pool: Buffer[] = [];

  constructor(
    private readonly fh: FileHandle,
    private readonly chunkBytes: number,
    private readonly sizeBytes: number,
    private readonly used: UsedMap | null = null,
  ) {}

  private load(offset: number, n: number): Promise<Chunk> {
    const parts = this.used ? usedParts(this.used, offset, n) : null;
    if (parts && parts.length === 0) return Promise.resolve({ offset, lengthBytes: n, data: null });
    const pooled = n === this.chunkBytes ? this.pool.pop() : undefined;
    const buf = pooled ?? Buffer.allocUnsafe(n);
    return readFully(this.fh, buf, offset).then(() => {
      if (parts) {
        // Unused blocks travel as zeros: their old contents mean nothing to the filesystem.
        let at = 0;
        for (const [a, b] of parts) {
          if (a > at) buf.fill(0, at, a);
          at = b;
        }
        if (at < n) buf.fill(0, at, n);
      }
      if (!isAllZero(buf)) return { offset, lengthBytes: n, data: buf };
      this.release(buf);
      return { offset, lengthBytes: n, data: null };
    });
  }

  /** A chunk buffer nothing refers to any more (written to the socket, hashed) may be reused. */
  release(buf: Buffer): void {
    if (buf.length === this.chunkBytes && this.pool.length < readerLimits.poolBuffersMax) this.pool.push(buf);
  }

  /** The chunk at offset (bytes below availBytes only), starting reads of the next ones. */
  async chunk(offset: number, availBytes: number): Promise<Chunk> {
    for (const [o] of this.pending) if (o < offset) this.pending.delete(o);
    // Read ahead whole chunks only (a receiver's volume grows while it is read).
    for (let k = 1; k <= readerLimits.readAheadChunks; k++) {
      const o = offset + k * this.chunkBytes;
      const n = Math.min(this.chunkBytes, this.sizeBytes - o);
      if (n <= 0 || o + n > availBytes) break;
      if (!this.pending.has(o)) {
        const p = this.load(o, n);
        p.catch(() => undefined);
        this.pending.set(o, p);
      }
    }
    const p =
      this.pending.get(offset) ??
      this.load(offset, Math.min(this.chunkBytes, this.sizeBytes - offset, availBytes - offset));
    this.pending.delete(offset);
    return p;
  }

  /** The next frame at offset: one DATA chunk, or a run of zero chunks as one ZERO record. */
  async frame(offset: number, availBytes: number): Promise<Frame> {
    const c = await this.chunk(offset, availBytes);
    if (c.data)
      return { type: FrameType.data, flags: 0, offset, lengthBytes: c.lengthBytes, payload: [c.data] };
    let len = c.lengthBytes;
    while (offset + len < availBytes && len + this.chunkBytes <= readerLimits.zeroRunMaxBytes) {
      const next = offset + len;
      const n = await this.chunk(next, availBytes);
      if (n.data) {
        this.pending.set(next, Promise.resolve(n));
        break;
      }
      len += n.lengthBytes;
    }
    return { type: FrameType.zero, flags: 0, offset, lengthBytes: len, payload: [] };
  }

  /** Drops reads in flight (a new link starts elsewhere). */
  reset(): void {
    this.pending.clear();
  }
}

/** The stream checksum of [0, sizeBytes) as the reader sees it (used-block map applied). */
export async function streamDigest(
  reader: ChunkReader,
  sizeBytes: number,
  chunkBytes: number,
): Promise<string> {
  const d = new ChunkedDigest(chunkBytes);
  for (let off = 0; off < sizeBytes;) {
    const c = await reader.chunk(off, sizeBytes);
    if (c.data) {
      d.update(c.data);
      reader.release(c.data);
    } else d.zeros(c.lengthBytes);
    off += c.lengthBytes;
  }
  reader.reset();
  return d.digest();
}
