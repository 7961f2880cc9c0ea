// corral clone: wire format and chain logic (unit), then real serve/receive processes over loopback
// streaming a 64 MiB image (half zero blocks, half seeded random) to 1, 3 and 5 receivers.
import { after, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { open } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import {
  changedUpstreams,
  linksOf,
  moveToEnd,
  serverName,
  slowReceiver,
  type LagView,
} from '../src/provision/clone/chain.js';
import {
  FrameParser,
  FrameType,
  PayloadPool,
  encodeFrame,
  holdFrame,
  payloadBuffer,
  releaseFrame,
  type Frame,
} from '../src/provision/clone/protocol.js';
import { FrameRing } from '../src/provision/clone/forwarder.js';
import { digestRange } from '../src/provision/clone/digest.js';
import {
  corral,
  exitWithin,
  killAll,
  makeImage,
  serveLoopback,
  type Proc,
} from '../src/provision/clone/testing.js';

const MiB = 1024 * 1024;
const dir = mkdtempSync(join(tmpdir(), 'corral-clone-'));
after(() => {
  killAll();
  rmSync(dir, { recursive: true, force: true });
});

export async function sha256File(path: string): Promise<string> {
  const h = createHash('sha256');
  const fh = await open(path, 'r');
  try {
    const buf = Buffer.alloc(4 * MiB);
    for (;;) {
      const { bytesRead } = await fh.read(buf, 0, buf.length, null);
      if (bytesRead === 0) break;
      h.update(buf.subarray(0, bytesRead));
    }
  } finally {
    await fh.close();
  }
  return h.digest('hex');
}

async function sameBytes(a: string, b: string): Promise<boolean> {
  const fa = await open(a, 'r');
  const fb = await open(b, 'r');
  try {
    const ba = Buffer.alloc(4 * MiB);
    const bb = Buffer.alloc(4 * MiB);
    for (;;) {
      const ra = await fa.read(ba, 0, ba.length, null);
      const rb = await fb.read(bb, 0, bb.length, null);
      if (ra.bytesRead !== rb.bytesRead) return false;
      if (ra.bytesRead === 0) return true;
      if (!ba.subarray(0, ra.bytesRead).equals(bb.subarray(0, rb.bytesRead))) return false;
    }
  } finally {
    await fa.close();
    await fb.close();
  }
}

describe('clone wire format', () => {
  test('frames survive any split of the byte stream', () => {
    const frames: Frame[] = [
      { type: FrameType.header, flags: 0, offset: 0, lengthBytes: 0, payload: [Buffer.from('{"a":1}')] },
      { type: FrameType.data, flags: 0, offset: 0, lengthBytes: 5000, payload: [Buffer.alloc(5000, 7)] },
      { type: FrameType.zero, flags: 0, offset: 5000, lengthBytes: 1 << 20, payload: [] },
      { type: FrameType.end, flags: 0, offset: 2 ** 40, lengthBytes: 0, payload: [] },
    ];
    const bytes = Buffer.concat(frames.flatMap(encodeFrame));
    for (const step of [1, 3, 24, 25, 4096, bytes.length]) {
      const p = new FrameParser();
      const got: Frame[] = [];
      for (let i = 0; i < bytes.length; i += step) got.push(...p.push(bytes.subarray(i, i + step)));
      assert.equal(got.length, frames.length, `step ${step}`);
      got.forEach((g, i) => {
        assert.equal(g.type, frames[i]!.type);
        assert.equal(g.offset, frames[i]!.offset);
        assert.equal(g.lengthBytes, frames[i]!.lengthBytes);
        assert.ok(payloadBuffer(g).equals(payloadBuffer(frames[i]!)));
      });
    }
  });

  test('pooled and static-buffer parsing: same frames under any split, nothing kept of the input', () => {
    const frames: Frame[] = [
      { type: FrameType.hello, flags: 0, offset: 0, lengthBytes: 0, payload: [Buffer.from('{"h":1}')] },
      { type: FrameType.data, flags: 0, offset: 0, lengthBytes: 5000, payload: [Buffer.alloc(5000, 7)] },
      { type: FrameType.zero, flags: 0, offset: 5000, lengthBytes: 1 << 20, payload: [] },
      {
        type: FrameType.data,
        flags: 0,
        offset: 2 ** 21,
        lengthBytes: 3000,
        payload: [Buffer.alloc(3000, 9)],
      },
      {
        type: FrameType.data,
        flags: 0,
        offset: 2 ** 22,
        lengthBytes: 9000,
        payload: [Buffer.alloc(9000, 5)],
      },
    ];
    const bytes = Buffer.concat(frames.flatMap(encodeFrame));
    for (const step of [1, 3, 24, 25, 4096, bytes.length]) {
      const pool = new PayloadPool(4);
      pool.capacityBytes = 8192;
      const p = new FrameParser(pool, true);
      // One reused input buffer, scribbled over after every push: a frame must not point into it.
      const input = Buffer.alloc(step);
      const got: Frame[] = [];
      for (let i = 0; i < bytes.length; i += step) {
        const n = bytes.copy(input, 0, i, i + step);
        got.push(...p.push(input.subarray(0, n)));
        input.fill(0xee);
      }
      assert.equal(got.length, frames.length, `step ${step}`);
      got.forEach((g, i) => {
        assert.equal(g.type, frames[i]!.type);
        assert.ok(payloadBuffer(g).equals(payloadBuffer(frames[i]!)), `step ${step} frame ${i}`);
      });
      // DATA payloads up to the pool's buffer size live in pool buffers, larger ones do not.
      assert.equal(got[1]!.hold?.pool, pool);
      assert.equal(got[1]!.payload.length, 1);
      assert.equal(got[4]!.hold?.pool, null);
      assert.equal(got[0]!.hold, undefined);
    }
  });

  test('a pool buffer is reused only after its last holder released it', () => {
    const pool = new PayloadPool(4);
    pool.capacityBytes = 4096;
    const frame = (h = pool.take(100)): Frame => ({
      type: FrameType.data,
      flags: 0,
      offset: 0,
      lengthBytes: 100,
      payload: [h.buf.subarray(0, 100)],
      hold: h,
    });
    const f = frame();
    holdFrame(f); // e.g. a socket write in flight
    releaseFrame(f); // the writer is done
    assert.equal(pool.idle, 0, 'one holder left');
    assert.notEqual(pool.take(100).buf, f.hold!.buf);
    releaseFrame(f);
    assert.equal(pool.idle, 1);
    releaseFrame(f); // a stray extra release must not hand the buffer out twice
    assert.equal(pool.idle, 1);
    assert.equal(pool.take(100).buf, f.hold!.buf);
    // The ring holds what it keeps and lets go of what it drops.
    const ring = new FrameRing(150);
    const a = frame();
    const b = { ...frame(), offset: 100 };
    ring.put(a);
    releaseFrame(a);
    assert.equal(a.hold!.refs, 1, 'the ring holds a');
    ring.put(b);
    assert.equal(a.hold!.refs, 0, 'a dropped from the ring');
    assert.equal(b.hold!.refs, 2);
  });

  test('a corrupt frame is a protocol error, not a crash', () => {
    const bad = Buffer.alloc(24);
    bad.writeUInt8(99, 0);
    assert.throws(() => new FrameParser().push(bad), /unknown frame type 99/);
    const huge = Buffer.alloc(24);
    huge.writeUInt8(FrameType.data, 0);
    huge.writeUInt32BE(0xffffffff, 16);
    assert.throws(() => new FrameParser().push(huge), /exceeds/);
  });
});

describe('clone chain decisions', () => {
  test('routing around a dead receiver changes only its upstream', () => {
    const before = linksOf(['a', 'b', 'c']);
    const after = linksOf(['a', 'c']);
    assert.deepEqual(changedUpstreams(before, after), ['a']);
    assert.equal(after.get('a'), 'c');
    assert.equal(after.get(serverName), 'a');
    assert.deepEqual(moveToEnd(['a', 'b', 'c'], 'a'), ['b', 'c', 'a']);
    assert.deepEqual(
      changedUpstreams(before, linksOf(moveToEnd(['a', 'b', 'c'], 'a'))).sort(),
      [serverName, 'a', 'c'].sort(),
    );
  });

  test('the slow receiver lags its upstream and receives slower; not one blocked, catching up, or first', () => {
    const v = (name: string, writtenMiB: number, rateMiBps: number, o: Partial<LagView> = {}): LagView => ({
      name,
      writtenBytes: writtenMiB * MiB,
      rateBps: rateMiBps * MiB,
      blocked: false,
      moves: 0,
      sinceRouteMs: 10_000,
      ...o,
    });
    const rule = { lagMaxBytes: 32 * MiB, movesMax: 2, graceMs: 2000, rateFraction: 0.75 };
    const size = 100 * MiB;
    const best = 100 * MiB;
    // b lags a by 40 MiB and receives at a quarter of the best rate: b moves.
    assert.equal(slowReceiver([v('a', 60, 100), v('b', 20, 25), v('c', 19, 25)], size, best, rule), 'b');
    // a may have finished (rate 0): b is still slow.
    assert.equal(slowReceiver([v('a', 100, 0), v('b', 20, 25), v('c', 19, 25)], size, best, rule), 'b');
    // b is blocked by c: not b; c is last: nobody.
    assert.equal(
      slowReceiver([v('a', 60, 100), v('b', 20, 25, { blocked: true }), v('c', 19, 25)], size, best, rule),
      null,
    );
    // b just got a new upstream, or catches up fast: not slow.
    assert.equal(slowReceiver([v('a', 60, 100), v('b', 20, 300), v('c', 19, 25)], size, best, rule), null);
    assert.equal(
      slowReceiver(
        [v('a', 60, 100), v('b', 20, 25, { sinceRouteMs: 500 }), v('c', 19, 25)],
        size,
        best,
        rule,
      ),
      null,
    );
    // b has been moved enough.
    assert.equal(
      slowReceiver([v('a', 60, 100), v('b', 20, 25, { moves: 2 }), v('c', 19, 25)], size, best, rule),
      null,
    );
    // The first receiver is never judged against the server.
    assert.equal(slowReceiver([v('a', 2, 5), v('b', 1, 5), v('c', 1, 5)], size, best, rule), null);
  });
});

interface Session {
  server: Proc;
  receivers: Map<string, Proc>;
  port: number;
  secretFile: string;
}

export async function startSession(o: {
  source: string;
  names: string[];
  sessionName: string;
  targetOf: (name: string) => string;
  serveArgs?: string[];
  receiveArgs?: (name: string) => string[];
}): Promise<Session> {
  const secretFile = join(dir, `${o.sessionName}.secret`);
  writeFileSync(secretFile, `secret-${o.sessionName}-0123456789abcdef\n`);
  const server = serveLoopback({
    source: o.source,
    expect: o.names.length,
    session: o.sessionName,
    secretFile,
    extra: o.serveArgs,
  });
  const m = await server.waitFor(/listening on 127\.0\.0\.1:(\d+)/, 30_000);
  const port = Number(m[1]);
  const receivers = new Map<string, Proc>();
  for (const name of o.names)
    receivers.set(
      name,
      corral([
        'clone',
        'receive',
        '--server',
        `127.0.0.1:${port}`,
        '--session',
        o.sessionName,
        '--secret-file',
        secretFile,
        '--target',
        o.targetOf(name),
        '--name',
        name,
        ...(o.receiveArgs?.(name) ?? []),
      ]),
    );
  return { server, receivers, port, secretFile };
}

interface FinalStatus {
  sha256: string;
  receivers: {
    name: string;
    state: string;
    verified: boolean;
    sha256: string | null;
    error: string | null;
    joins: number;
    moves: number;
  }[];
}

export function finalStatus(server: Proc): FinalStatus {
  return JSON.parse(server.stdout()) as FinalStatus;
}

describe('clone over loopback (real processes)', () => {
  const src = join(dir, 'golden.img');
  let srcSha = '';
  /** The stream checksum (per-chunk SHA-256, digest.ts) that serve and the receivers report. */
  let srcDigest = '';
  const sizeBytes = 64 * MiB;

  test('prepare a 64 MiB image, half zero blocks', async () => {
    await makeImage(src, sizeBytes, 7);
    srcSha = await sha256File(src);
    const fh = await open(src, 'r');
    srcDigest = (await digestRange(fh, sizeBytes, MiB)).digest();
    await fh.close();
    assert.equal(statSync(src).size, sizeBytes);
    // `corral clone digest` prints the same checksum.
    const d = corral(['clone', 'digest', src]);
    assert.equal(await exitWithin(d, 30_000), 0, d.stderr());
    assert.equal(d.stdout().split(' ')[0], srcDigest);
    assert.notEqual(srcDigest, srcSha);
  });

  for (const n of [1, 3, 5]) {
    test(
      `${n} receiver(s): every target is byte-for-byte the source, verified by SHA-256`,
      { timeout: 90_000 },
      async () => {
        const names = Array.from({ length: n }, (_, i) => `n${n}r${i + 1}`);
        const targetOf = (name: string) => join(dir, `${name}.img`);
        const mtimeBefore = statSync(src).mtimeMs;
        const s = await startSession({ source: src, names, sessionName: `plain${n}`, targetOf });
        const codes = await Promise.all([...s.receivers.values()].map((p) => exitWithin(p, 60_000)));
        assert.equal(await exitWithin(s.server, 30_000), 0, s.server.stderr());
        assert.deepEqual(
          codes,
          names.map(() => 0),
          [...s.receivers.values()].map((p) => p.stderr()).join('\n'),
        );
        const st = finalStatus(s.server);
        assert.equal(st.sha256, srcDigest);
        for (const name of names) {
          const r = st.receivers.find((x) => x.name === name)!;
          assert.equal(r.state, 'verified');
          assert.equal(r.sha256, srcDigest);
          assert.ok(await sameBytes(src, targetOf(name)), `${name} differs from the source`);
          // Zero blocks were skipped: the target file is sparse (about half allocated).
          const allocated = statSync(targetOf(name)).blocks * 512;
          assert.ok(
            allocated < sizeBytes * 0.75,
            `${name} allocates ${allocated} bytes: zero blocks were written`,
          );
          rmSync(targetOf(name));
        }
        assert.equal(statSync(src).mtimeMs, mtimeBefore, 'the source was modified');
        assert.match(s.server.stderr(), /finished in .* \d+\/\d+ verified/);
        const secret = readFileSync(s.secretFile, 'utf8').trim();
        assert.ok(
          !s.server.stdout().includes(secret) && !s.server.stderr().includes(secret),
          'the secret leaked',
        );
      },
    );
  }

  test(
    'the source is opened read-only: a read-only loop device works as the source',
    { timeout: 60_000 },
    async (t) => {
      if (process.getuid?.() !== 0) return t.skip('needs root: losetup');
      let loop: string;
      try {
        loop = execFileSync('losetup', ['-r', '-f', '--show', src]).toString().trim();
      } catch (err) {
        return t.skip(`needs loop devices: ${(err as Error).message}`);
      }
      try {
        const target = join(dir, 'ro.img');
        const s = await startSession({
          source: loop,
          names: ['ro1'],
          sessionName: 'ro',
          targetOf: () => target,
        });
        assert.equal(await exitWithin(s.receivers.get('ro1')!, 60_000), 0, s.receivers.get('ro1')!.stderr());
        assert.equal(await exitWithin(s.server, 30_000), 0, s.server.stderr());
        assert.equal(await sha256File(target), srcSha);
        assert.equal(await sha256File(src), srcSha);
      } finally {
        execFileSync('losetup', ['-d', loop]);
      }
    },
  );
});
