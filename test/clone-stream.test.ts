// corral clone stream pieces: the per-chunk checksum, partclone's domain map, and the chunk reader
// (read-ahead, zero runs as one record, used-block masking).
import { after, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { open } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ChunkedDigest, digestRange } from '../src/provision/clone/digest.js';
import { FrameType, payloadBuffer } from '../src/provision/clone/protocol.js';
import { ChunkReader, streamDigest, usedParts, type UsedMap } from '../src/provision/clone/source-reader.js';
import { parseDomainMap } from '../src/provision/clone/used-blocks.js';

const dir = mkdtempSync(join(tmpdir(), 'corral-clonestream-'));
after(() => rmSync(dir, { recursive: true, force: true }));
const K = 4096;

/** 10 chunks of 4 KiB: data, zero, zero, data, zero, zero, zero, data, data, and a short zero tail. */
function sample(): Buffer {
  const parts = [1, 0, 0, 1, 0, 0, 0, 1, 1].map((d) => (d ? randomBytes(K) : Buffer.alloc(K)));
  return Buffer.concat([...parts, Buffer.alloc(1000)]);
}

describe('per-chunk checksum', () => {
  test('any split of the same bytes, zeros given as zeros() or as bytes: one checksum', () => {
    const buf = sample();
    const whole = new ChunkedDigest(K);
    whole.update(buf);
    const ref = whole.digest();
    for (const step of [1, 999, K, K + 1, 3 * K - 7]) {
      const d = new ChunkedDigest(K);
      for (let i = 0; i < buf.length; i += step) {
        const piece = buf.subarray(i, i + step);
        if (piece.every((b) => b === 0)) d.zeros(piece.length);
        else d.update(piece);
      }
      assert.equal(d.digest(), ref, `step ${step}`);
    }
    const changed = Buffer.from(buf);
    changed[5 * K + 3] = 1;
    const d2 = new ChunkedDigest(K);
    d2.update(changed);
    assert.notEqual(d2.digest(), ref, 'a changed byte in a zero chunk goes unnoticed');
  });

  test('a file checksum equals the stream checksum the reader computes', async () => {
    const buf = sample();
    const file = join(dir, 'a.img');
    writeFileSync(file, buf);
    const fh = await open(file, 'r');
    try {
      const fromFile = (await digestRange(fh, buf.length, K)).digest();
      const fromReader = await streamDigest(new ChunkReader(fh, K, buf.length), buf.length, K);
      assert.equal(fromReader, fromFile);
    } finally {
      await fh.close();
    }
  });
});

describe('chunk reader', () => {
  test('zero chunks in a row become one ZERO record; data chunks stay whole', async () => {
    const buf = sample();
    const file = join(dir, 'b.img');
    writeFileSync(file, buf);
    const fh = await open(file, 'r');
    try {
      const r = new ChunkReader(fh, K, buf.length);
      const frames: [string, number, number][] = [];
      const out: Buffer[] = [];
      for (let off = 0; off < buf.length;) {
        const f = await r.frame(off, buf.length);
        frames.push([f.type === FrameType.data ? 'data' : 'zero', f.offset, f.lengthBytes]);
        out.push(f.type === FrameType.data ? payloadBuffer(f) : Buffer.alloc(f.lengthBytes));
        off += f.lengthBytes;
      }
      assert.deepEqual(frames, [
        ['data', 0, K],
        ['zero', K, 2 * K],
        ['data', 3 * K, K],
        ['zero', 4 * K, 3 * K],
        ['data', 7 * K, K],
        ['data', 8 * K, K],
        ['zero', 9 * K, 1000],
      ]);
      assert.ok(Buffer.concat(out).equals(buf));
      // A volume still growing (a receiver's target): nothing past what is available.
      const f = await new ChunkReader(fh, K, buf.length).frame(K, 2 * K + 100);
      assert.equal(f.offset + f.lengthBytes <= 2 * K + 100, true);
    } finally {
      await fh.close();
    }
  });

  test('with a used-block map, unused bytes are read as zeros', async () => {
    const buf = randomBytes(4 * K);
    const file = join(dir, 'c.img');
    writeFileSync(file, buf);
    const used: UsedMap = {
      fs: 'ext4',
      ranges: [
        [100, 200],
        [K + 10, 3 * K],
      ],
      usedBytes: 0,
    };
    assert.deepEqual(usedParts(used, K, K), [[10, K]]);
    assert.deepEqual(usedParts(used, 0, K), [[100, 200]]);
    assert.deepEqual(usedParts(used, 3 * K, K), []);
    const fh = await open(file, 'r');
    try {
      const r = new ChunkReader(fh, K, buf.length, used);
      const got: Buffer[] = [];
      for (let off = 0; off < buf.length;) {
        const f = await r.frame(off, buf.length);
        got.push(f.type === FrameType.data ? payloadBuffer(f) : Buffer.alloc(f.lengthBytes));
        off += f.lengthBytes;
      }
      const expect = Buffer.alloc(4 * K);
      buf.copy(expect, 100, 100, 200);
      buf.copy(expect, K + 10, K + 10, 3 * K);
      assert.ok(Buffer.concat(got).equals(expect));
    } finally {
      await fh.close();
    }
  });
});

test("partclone's ddrescue domain map: used ranges merged and clipped to the size", () => {
  const text = `# Domain logfile created by unset_name v0.3.23
# Source: pc.img
# Offset: 0x00000000
# current_pos  current_status
0x04000000     ?
#      pos        size  status
0x00000000  0x00448400  +
0x00448400  0x003B8000  ?
0x00800400  0x00040800  +
0x00840C00  0x00000400  +
0x03840C00  0x007BF400  +
`;
  assert.deepEqual(parseDomainMap(text, 0x3900000), [
    [0, 0x448400],
    [0x800400, 0x841000],
    [0x3840c00, 0x3900000],
  ]);
});
