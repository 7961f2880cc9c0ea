// corral clone with partclone's used-block map: an ext4 filesystem on a loop device with one file kept
// and one written then deleted. Only used blocks travel: the deleted file's blocks arrive as zeros,
// the clone passes e2fsck and holds the kept file. Skipped without root, loop devices or partclone.
import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { corral, exitWithin, killAll, makeImage, serveLoopback } from '../src/provision/clone/testing.js';

const MiB = 1024 * 1024;
const dir = mkdtempSync(join(tmpdir(), 'corral-clonepc-'));
const loops: string[] = [];
const mounts: string[] = [];
after(() => {
  killAll();
  for (const m of mounts.splice(0)) sh('umount', m);
  for (const l of loops.splice(0)) sh('losetup', '-d', l);
  rmSync(dir, { recursive: true, force: true });
});
const path = `${process.env.PATH ?? ''}:/usr/sbin:/sbin`;
function sh(cmd: string, ...args: string[]): string {
  try {
    return execFileSync(cmd, args, { stdio: 'pipe', env: { ...process.env, PATH: path } }).toString();
  } catch {
    return '';
  }
}
function need(cmd: string, ...args: string[]): string {
  return execFileSync(cmd, args, { stdio: 'pipe', env: { ...process.env, PATH: path } }).toString();
}
function missing(): string | null {
  if (process.getuid?.() !== 0) return 'needs root: losetup, mount';
  for (const tool of ['partclone.extfs', 'mkfs.ext4', 'e2fsck', 'losetup', 'blkid'])
    try {
      execFileSync('sh', ['-c', `command -v ${tool}`], {
        stdio: 'pipe',
        env: { ...process.env, PATH: path },
      });
    } catch {
      return `needs ${tool}${tool.startsWith('partclone') ? ' (Debian package partclone)' : ''}`;
    }
  return null;
}
const secretFile = join(dir, 'secret');
writeFileSync(secretFile, 'partclone-secret-0123456789abcdef\n');

async function cloneOnce(source: string, session: string, target: string) {
  const server = serveLoopback({ source, expect: 1, session, secretFile });
  const port = Number((await server.waitFor(/listening on 127\.0\.0\.1:(\d+)/, 30_000))[1]);
  const r = corral([
    'clone',
    'receive',
    '--server',
    `127.0.0.1:${port}`,
    '--session',
    session,
    '--secret-file',
    secretFile,
    '--target',
    target,
    '--name',
    'pc1',
  ]);
  assert.equal(await exitWithin(r, 60_000), 0, r.stderr());
  assert.equal(await exitWithin(server, 30_000), 0, server.stderr());
  return {
    stderr: server.stderr(),
    status: JSON.parse(server.stdout()) as {
      sizeBytes: number;
      usedBlocks: { fs: string; usedBytes: number } | null;
      receivers: { state: string }[];
    },
  };
}

test(
  'ext4 on a loop device: only used blocks travel, the clone fscks clean and holds the kept file',
  { timeout: 180_000 },
  async (t) => {
    const why = missing();
    if (why) return t.skip(why);
    const img = join(dir, 'fs.img');
    await makeImage(img, 64 * MiB, 1); // start from non-zero garbage, like a used disk
    let loop: string;
    try {
      loop = need('losetup', '-f', '--show', img).trim();
    } catch (err) {
      return t.skip(`needs loop devices: ${(err as Error).message.split('\n')[0]}`);
    }
    loops.push(loop);
    need('mkfs.ext4', '-q', '-F', '-b', '4096', '-E', 'nodiscard', loop);
    const mnt = join(dir, 'mnt');
    mkdirSync(mnt);
    need('mount', loop, mnt);
    mounts.push(mnt);
    const keep = randomBytes(6 * MiB);
    writeFileSync(join(mnt, 'keep.bin'), keep);
    const marker = Buffer.from('CORRAL-DELETED-FILE-MARKER-0123456789');
    writeFileSync(
      join(mnt, 'gone.bin'),
      Buffer.concat(
        Array.from({ length: (16 * MiB) / 64 }, () =>
          Buffer.concat([marker, Buffer.alloc(64 - marker.length, 0x2e)]),
        ),
      ),
    );
    need('sync');
    rmSync(join(mnt, 'gone.bin'));
    need('umount', mnt);
    mounts.pop();
    // The deleted file's blocks are still on the source (so the test can fail).
    assert.ok(readFileSync(loop).includes(marker), 'the deleted data is not on the source');

    const target = join(dir, 'clone.img');
    const { stderr, status } = await cloneOnce(loop, 'pc', target);
    assert.equal(status.receivers[0]!.state, 'verified');
    assert.equal(status.usedBlocks?.fs, 'ext4');
    assert.ok(status.usedBlocks.usedBytes < 24 * MiB, `used ${status.usedBlocks.usedBytes} bytes`);
    assert.match(stderr, /ext4 filesystem: sending the .* it uses of/);
    const cloned = readFileSync(target);
    assert.equal(cloned.length, 64 * MiB);
    assert.ok(!cloned.includes(marker), 'blocks of the deleted file were transferred');
    // e2fsck -f -n: forced full check, read-only; exit 0 means clean.
    execFileSync('e2fsck', ['-f', '-n', target], { stdio: 'pipe', env: { ...process.env, PATH: path } });
    const l2 = need('losetup', '-r', '-f', '--show', target).trim();
    loops.push(l2);
    const m2 = join(dir, 'mnt2');
    mkdirSync(m2);
    need('mount', '-o', 'ro', l2, m2);
    mounts.push(m2);
    const got = readFileSync(join(m2, 'keep.bin'));
    assert.equal(
      createHash('sha256').update(got).digest('hex'),
      createHash('sha256').update(keep).digest('hex'),
    );
  },
);

test(
  'a source partclone does not know: every non-zero block, with a message',
  { timeout: 90_000 },
  async (t) => {
    const why = missing();
    if (why) return t.skip(why);
    const img = join(dir, 'raw.img');
    await makeImage(img, 4 * MiB, 5);
    const target = join(dir, 'raw-clone.img');
    const { stderr, status } = await cloneOnce(img, 'raw', target);
    assert.equal(status.receivers[0]!.state, 'verified');
    assert.equal(status.usedBlocks, null);
    assert.match(stderr, /no filesystem found .*copying every non-zero block/);
    assert.ok(readFileSync(target).equals(readFileSync(img)));
  },
);
