// The stream checksum: SHA-256 over the SHA-256 of each chunk of the stream (chunk i covers bytes
// [i*C, (i+1)*C), the last one may be shorter; C is the header's chunkBytes).
//
// Why not one SHA-256 over the whole image: half of a typical disk is zero blocks; with per-chunk
// digests a zero chunk costs one cached digest instead of hashing a MiB of zeros, on the source and
// on every receiver. It still covers every byte written, in order.
// `corral clone digest FILE` prints it for any image, to compare by hand.
import { createHash, type Hash } from 'node:crypto';
import type { FileHandle } from 'node:fs/promises';
import { isAllZero, readFully } from './volume.js';

export const digestName = 'sha256 of chunk sha256s';

const zeroDigests = new Map<number, Buffer>();
const zeroDigestsMax = 4;

/** SHA-256 of n zero bytes (cached for a few sizes: the chunk size of a session). */
function zeroChunkDigest(n: number): Buffer {
  let d = zeroDigests.get(n);
  if (!d) {
    d = createHash('sha256').update(Buffer.alloc(n)).digest();
    if (zeroDigests.size < zeroDigestsMax) zeroDigests.set(n, d);
  }
  return d;
}

export class ChunkedDigest {
  private readonly outer: Hash = createHash('sha256');
  private inner: Hash | null = null;
  /** Bytes of the current chunk fed so far. */
  private fill = 0;
  /** Total bytes fed. */
  bytes = 0;

  constructor(readonly chunkBytes: number) {}

  update(buf: Buffer): void {
    let at = 0;
    while (at < buf.length) {
      const n = Math.min(this.chunkBytes - this.fill, buf.length - at);
      this.inner ??= createHash('sha256');
      this.inner.update(at === 0 && n === buf.length ? buf : buf.subarray(at, at + n));
      this.fill += n;
      at += n;
      if (this.fill === this.chunkBytes) this.closeChunk();
    }
    this.bytes += buf.length;
  }

  /** n zero bytes; whole zero chunks cost nothing but a cached digest. */
  zeros(n: number): void {
    let left = n;
    while (left > 0) {
      if (this.fill === 0 && left >= this.chunkBytes) {
        this.outer.update(zeroChunkDigest(this.chunkBytes));
        left -= this.chunkBytes;
        this.bytes += this.chunkBytes;
        continue;
      }
      const k = Math.min(this.chunkBytes - this.fill, left);
      this.update(Buffer.alloc(k));
      left -= k;
    }
  }

  private closeChunk(): void {
    this.outer.update(this.inner!.digest());
    this.inner = null;
    this.fill = 0;
  }

  /** The checksum (hex). The digest is single-use, like node's Hash. */
  digest(): string {
    if (this.fill > 0) this.closeChunk();
    return this.outer.digest('hex');
  }
}

/** Digest of [0, sizeBytes) of an open file, one chunk at a time (zero chunks are not hashed). */
export async function digestRange(
  fh: FileHandle,
  sizeBytes: number,
  chunkBytes: number,
  into: ChunkedDigest = new ChunkedDigest(chunkBytes),
): Promise<ChunkedDigest> {
  const buf = Buffer.allocUnsafe(chunkBytes);
  for (let off = 0; off < sizeBytes; off += chunkBytes) {
    const n = Math.min(chunkBytes, sizeBytes - off);
    const view = buf.subarray(0, n);
    await readFully(fh, view, off);
    if (isAllZero(view)) into.zeros(n);
    else into.update(view);
  }
  return into;
}
