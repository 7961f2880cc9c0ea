// Post-clone identity: the text rewrites (unit), then real disks. A golden image with a partition
// table (sfdisk), an ext4 root whose /etc/fstab and grub.cfg name its UUIDs, a machine-id, fake SSH
// host keys, a swap partition, a partition of noise and a vfat one, is cloned through the real
// serve/receive path to an image file and to a loop device; then `corral clone identity` on an
// image cloned earlier, a bare filesystem and xfs. Loop devices and mount need root: skipped
// with the reason otherwise.
import { after, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import {
  copyFileSync,
  existsSync,
  lstatSync,
  mkdirSync,
  mkdtempSync,
  readFileSync,
  readdirSync,
  rmSync,
  symlinkSync,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import {
  dosDiskIdFromBytes,
  fatIdFromBytes,
  partUuidMap,
  partUuids,
  hostnameProblem,
  rewriteHosts,
  rewriteUuids,
  spansOf,
  uuidFromBytes,
} from '../src/provision/identity/text.js';
import { resolveInRoot } from '../src/provision/identity/reset.js';
import { corral, exitWithin, killAll } from '../src/provision/clone/testing.js';

const MiB = 1024 * 1024;
const dir = mkdtempSync(join(tmpdir(), 'corral-identity-test-'));
const loops: string[] = [];
const mounts: string[] = [];
after(() => {
  killAll();
  for (const m of mounts.splice(0)) spawnSync('umount', [m]);
  for (const l of loops.splice(0)) spawnSync('losetup', ['-d', l]);
  rmSync(dir, { recursive: true, force: true });
});

const has = (cmd: string) => spawnSync('sh', ['-c', `command -v ${cmd}`]).status === 0;

/** Null when this machine can run the disk tests, else why not. */
function diskTestsUnavailable(): string | null {
  if (process.getuid?.() !== 0) return 'needs root: losetup and mount';
  for (const c of ['losetup', 'mount', 'blkid', 'sfdisk', 'mkfs.ext4', 'tune2fs', 'mkswap', 'swaplabel'])
    if (!has(c)) return `needs ${c}`;
  const probe = join(dir, 'probe.img');
  execFileSync('truncate', ['-s', '1M', probe]);
  const r = spawnSync('losetup', ['-f', '--show', probe], { encoding: 'utf8' });
  if (r.status !== 0) return `needs loop devices: ${r.stderr.trim()}`;
  spawnSync('losetup', ['-d', r.stdout.trim()]);
  return null;
}

describe('identity text rewrites', () => {
  test('UUID references are replaced as whole tokens only', () => {
    const map = new Map([
      ['0a1b2c3d-0000-4000-8000-000000000001', '11111111-2222-4333-8444-555555555555'],
      ['ABCD-1234', 'FFFF-0000'],
    ]);
    const fstab = [
      'UUID=0a1b2c3d-0000-4000-8000-000000000001 / ext4 errors=remount-ro 0 1',
      'UUID=abcd-1234 /boot/efi vfat umask=0077 0 1',
      '# 0a1b2c3d-0000-4000-8000-000000000001x is not this uuid',
      'PARTUUID=0a1b2c3d-0000-4000-8000-0000000000012 /srv ext4 defaults 0 2',
    ].join('\n');
    const r = rewriteUuids(fstab, map);
    assert.equal(r.count, 2);
    assert.match(r.text, /^UUID=11111111-2222-4333-8444-555555555555 \/ ext4/m);
    assert.match(r.text, /^UUID=FFFF-0000 \/boot\/efi/m);
    assert.match(r.text, /0a1b2c3d-0000-4000-8000-000000000001x/);
    assert.match(r.text, /0a1b2c3d-0000-4000-8000-0000000000012/);
    const grub = 'search --no-floppy --fs-uuid --set=root 0a1b2c3d-0000-4000-8000-000000000001\n';
    assert.equal(rewriteUuids(grub, map).count, 1);
  });

  test('new ids have the shape their tools take', () => {
    const u = uuidFromBytes(Buffer.alloc(16, 0xff));
    assert.match(u, /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
    assert.deepEqual(fatIdFromBytes(Buffer.from([0xab, 0xcd, 0x01, 0x2f])), {
      shown: 'ABCD-012F',
      arg: 'ABCD012F',
    });
  });

  test('hosts keeps localhost and other names, renames the old host', () => {
    const hosts =
      '127.0.0.1\tlocalhost\n127.0.1.1\tgolden.lab golden # set up\n::1 localhost ip6-localhost\n';
    assert.equal(
      rewriteHosts(hosts, 'golden.lab', 'node7'),
      '127.0.0.1\tlocalhost\n127.0.1.1\tnode7 # set up\n::1 localhost ip6-localhost\n',
    );
    assert.equal(
      rewriteHosts('127.0.0.1 localhost', null, 'n1.lab'),
      '127.0.0.1 localhost\n127.0.1.1\tn1.lab n1\n',
    );
    assert.equal(hostnameProblem('node-7.lab'), null);
    assert.match(hostnameProblem('-bad')!, /label '-bad'/);
    assert.match(hostnameProblem('a_b')!, /label 'a_b'/);
  });

  test('PARTUUIDs of dos and gpt tables, and the map to new ones', () => {
    const dos = (id: string) => ({
      partitiontable: {
        label: 'dos',
        id,
        partitions: [
          { node: 'd1', start: 2048, size: 8, type: '83' },
          { node: 'd5', start: 4096, size: 8, type: '82' },
        ],
      },
    });
    assert.deepEqual(
      [...partUuidMap(dos('0x0A1B2C3D'), dos('0xffee0001'))],
      [
        ['0a1b2c3d-01', 'ffee0001-01'],
        ['0a1b2c3d-05', 'ffee0001-05'],
      ],
    );
    const gpt = (u: string) => ({
      partitiontable: {
        label: 'gpt',
        id: 'X',
        partitions: [{ node: 'g1', start: 2048, size: 8, type: 'L', uuid: u }],
      },
    });
    assert.deepEqual(
      [...partUuids(gpt('86E9AC22-467D-CD4B-B36D-BE1AB53F718D'))],
      [[1, '86e9ac22-467d-cd4b-b36d-be1ab53f718d']],
    );
    assert.equal(partUuidMap(gpt('A'), gpt('a')).size, 0);
    assert.equal(dosDiskIdFromBytes(Buffer.alloc(4)), '0x00000001');
  });

  test('extended containers and empty slots are not volumes', () => {
    const spans = spansOf({
      partitiontable: {
        label: 'dos',
        sectorsize: 512,
        partitions: [
          { node: 'disk.img1', start: 2048, size: 2048, type: '83' },
          { node: 'disk.img2', start: 4096, size: 8192, type: '5' },
          { node: 'disk.img5', start: 6144, size: 2048, type: '82' },
        ],
      },
    });
    assert.deepEqual(spans, [
      { index: 1, offsetBytes: 2048 * 512, sizeBytes: 2048 * 512 },
      { index: 5, offsetBytes: 6144 * 512, sizeBytes: 2048 * 512 },
    ]);
  });

  test('paths resolve inside the copied root, never outside it', async () => {
    const root = join(dir, 'fakeroot');
    mkdirSync(join(root, 'etc'), { recursive: true });
    mkdirSync(join(root, 'real'), { recursive: true });
    writeFileSync(join(root, 'real', 'hostname'), 'x\n');
    symlinkSync('/real/hostname', join(root, 'etc', 'hostname'));
    symlinkSync('../../../../../../etc/passwd', join(root, 'etc', 'evil'));
    symlinkSync('loop', join(root, 'etc', 'loop'));
    assert.deepEqual(await resolveInRoot(root, 'etc/hostname', 40), {
      path: join(root, 'real', 'hostname'),
      exists: true,
    });
    // `..` stops at the root: the host's /etc/passwd is never reached.
    assert.deepEqual(await resolveInRoot(root, 'etc/evil', 40), {
      path: join(root, 'etc', 'passwd'),
      exists: false,
    });
    assert.equal(await resolveInRoot(root, 'etc/loop', 40), null);
    assert.equal(await resolveInRoot(root, 'nope/x', 40), null);
  });
});

// ---- real disks ----

interface Golden {
  img: string;
  rootUuid: string;
  swapUuid: string;
  vfatUuid: string | null;
  machineId: string;
  outside: string;
}

const p1 = { startMiB: 1, sizeMiB: 40 };
const p2 = { startMiB: 41, sizeMiB: 8 };
const p3 = { startMiB: 49, sizeMiB: 4 };
const p4 = { startMiB: 53, sizeMiB: 10 };
const diskMiB = 64;

function putAt(img: string, part: string, startMiB: number): void {
  execFileSync('dd', [
    `if=${part}`,
    `of=${img}`,
    'bs=1M',
    `seek=${startMiB}`,
    'conv=notrunc,sparse',
    'status=none',
  ]);
}

function blkidOf(dev: string): Record<string, string> {
  const r = spawnSync('blkid', ['-p', '-o', 'export', dev], { encoding: 'utf8' });
  const out: Record<string, string> = {};
  for (const l of r.stdout.split('\n')) {
    const m = /^([A-Z_]+)=(.*)$/.exec(l);
    if (m) out[m[1]!] = m[2]!;
  }
  return out;
}

const sha = (path: string) => createHash('sha256').update(readFileSync(path)).digest('hex');

/** The golden disk: built from directories and small filesystem images, no mount needed. */
function buildGolden(): Golden {
  const img = join(dir, 'golden.img');
  execFileSync('truncate', ['-s', `${diskMiB}M`, img]);
  const table = [
    'label: dos',
    'label-id: 0x0a1b2c3d',
    `start=${p1.startMiB * 2048}, size=${p1.sizeMiB * 2048}, type=83`,
    `start=${p2.startMiB * 2048}, size=${p2.sizeMiB * 2048}, type=82`,
    `start=${p3.startMiB * 2048}, size=${p3.sizeMiB * 2048}, type=83`,
    `start=${p4.startMiB * 2048}, size=${p4.sizeMiB * 2048}, type=c`,
  ].join('\n');
  execFileSync('sfdisk', ['--quiet', img], { input: `${table}\n` });
  const rootUuid = '0a1b2c3d-1111-4222-8333-444455556666';
  const swapUuid = '0a1b2c3d-7777-4888-9999-aaaabbbbcccc';
  const vfatUuid = has('mkfs.vfat') ? '1234-ABCD' : null;
  const machineId = 'c0ffee00c0ffee00c0ffee00c0ffee00';
  // A host file a malicious image could point at with an absolute symlink.
  const outside = join(dir, 'outside-crypttab');
  writeFileSync(outside, `host-secret UUID=${rootUuid} none luks\n`);
  const tree = join(dir, 'golden-root');
  for (const d of ['etc/ssh', 'var/lib/dbus', 'boot/grub', 'etc/default'])
    mkdirSync(join(tree, d), { recursive: true });
  writeFileSync(
    join(tree, 'etc/fstab'),
    [
      `UUID=${rootUuid} / ext4 errors=remount-ro 0 1`,
      `UUID=${swapUuid} none swap sw 0 0`,
      ...(vfatUuid ? [`UUID=${vfatUuid} /boot/efi vfat umask=0077 0 1`] : []),
      '',
    ].join('\n'),
  );
  writeFileSync(
    join(tree, 'boot/grub/grub.cfg'),
    `search --no-floppy --fs-uuid --set=root ${rootUuid}\nlinux /vmlinuz root=UUID=${rootUuid} ro resume=UUID=${swapUuid}\n`,
  );
  writeFileSync(join(tree, 'etc/default/grub'), `GRUB_CMDLINE_LINUX="resume=UUID=${swapUuid}"\n`);
  mkdirSync(join(tree, 'etc/kernel'));
  writeFileSync(join(tree, 'etc/kernel/cmdline'), 'root=PARTUUID=0a1b2c3d-01 ro quiet\n');
  symlinkSync(outside, join(tree, 'etc/crypttab'));
  writeFileSync(join(tree, 'etc/machine-id'), `${machineId}\n`);
  writeFileSync(join(tree, 'var/lib/dbus/machine-id'), `${machineId}\n`);
  writeFileSync(join(tree, 'etc/hostname'), 'golden\n');
  writeFileSync(join(tree, 'etc/hosts'), '127.0.0.1\tlocalhost\n127.0.1.1\tgolden\n');
  writeFileSync(join(tree, 'etc/os-release'), 'ID=debian\n');
  for (const t of ['rsa', 'ed25519']) {
    writeFileSync(join(tree, `etc/ssh/ssh_host_${t}_key`), `FAKE PRIVATE ${t}\n`, { mode: 0o600 });
    writeFileSync(join(tree, `etc/ssh/ssh_host_${t}_key.pub`), `ssh-${t} FAKEPUBLIC root@golden\n`);
  }
  writeFileSync(join(tree, 'etc/ssh/sshd_config'), 'PermitRootLogin no\n');
  const rootFs = join(dir, 'root.fs');
  execFileSync('mkfs.ext4', ['-q', '-F', '-U', rootUuid, '-L', 'root', '-d', tree, rootFs, `${p1.sizeMiB}M`]);
  putAt(img, rootFs, p1.startMiB);
  const swapFs = join(dir, 'swap.fs');
  execFileSync('truncate', ['-s', `${p2.sizeMiB}M`, swapFs]);
  execFileSync('mkswap', ['-U', swapUuid, '-L', 'swap0', swapFs], { stdio: 'pipe' });
  putAt(img, swapFs, p2.startMiB);
  // Partition 3: noise, no filesystem.
  const noise = join(dir, 'noise.fs');
  writeFileSync(noise, createHash('sha512').update('noise').digest().toString('hex').repeat(4096));
  putAt(img, noise, p3.startMiB);
  if (vfatUuid) {
    const fat = join(dir, 'fat.fs');
    execFileSync('mkfs.vfat', ['-C', '-i', vfatUuid.replace('-', ''), fat, String(p4.sizeMiB * 1024)], {
      stdio: 'pipe',
    });
    putAt(img, fat, p4.startMiB);
  }
  return { img, rootUuid, swapUuid, vfatUuid, machineId, outside };
}

/** Attaches partition N of a disk (image or device) read-only. */
function attachPart(disk: string, startMiB: number, sizeMiB: number): string {
  const loop = execFileSync('losetup', [
    '-f',
    '--show',
    '-r',
    '-o',
    String(startMiB * MiB),
    '--sizelimit',
    String(sizeMiB * MiB),
    disk,
  ])
    .toString()
    .trim();
  loops.push(loop);
  return loop;
}

function detach(loop: string): void {
  execFileSync('losetup', ['-d', loop]);
  loops.splice(loops.indexOf(loop), 1);
}

interface CloneView {
  diskId: string;
  rootUuid: string;
  swapUuid: string;
  vfatUuid: string | null;
  files: Record<string, string>;
  sshFiles: string[];
  dbusCopy: boolean;
  fingerprints: string[];
}

/** Reads back what the identity step left on a clone (read-only mounts). */
function inspect(disk: string): CloneView {
  const l1 = attachPart(disk, p1.startMiB, p1.sizeMiB);
  const l2 = attachPart(disk, p2.startMiB, p2.sizeMiB);
  const l4 = attachPart(disk, p4.startMiB, p4.sizeMiB);
  const mnt = mkdtempSync(join(dir, 'mnt-'));
  try {
    execFileSync('mount', ['-o', 'ro,noload', l1, mnt]);
    mounts.push(mnt);
    const files: Record<string, string> = {};
    for (const f of [
      'etc/fstab',
      'etc/machine-id',
      'etc/hostname',
      'etc/hosts',
      'boot/grub/grub.cfg',
      'etc/default/grub',
      'etc/kernel/cmdline',
    ])
      files[f] = readFileSync(join(mnt, f), 'utf8');
    const sshFiles = readdirSync(join(mnt, 'etc/ssh')).sort();
    const fingerprints = sshFiles
      .filter((f) => f.endsWith('_key'))
      .map((f) =>
        execFileSync('ssh-keygen', ['-l', '-f', join(mnt, 'etc/ssh', f)])
          .toString()
          .trim(),
      );
    const dbusCopy = existsSync(join(mnt, 'var/lib/dbus/machine-id'));
    assert.ok(lstatSync(join(mnt, 'etc/crypttab')).isSymbolicLink(), 'the crypttab symlink is left in place');
    execFileSync('umount', [mnt]);
    mounts.pop();
    return {
      diskId: JSON.parse(execFileSync('sfdisk', ['--json', disk]).toString()).partitiontable.id,
      rootUuid: blkidOf(l1).UUID!,
      swapUuid: blkidOf(l2).UUID!,
      vfatUuid: blkidOf(l4).UUID ?? null,
      files,
      sshFiles,
      dbusCopy,
      fingerprints,
    };
  } finally {
    for (const l of [l1, l2, l4]) detach(l);
    rmSync(mnt, { recursive: true, force: true });
  }
}

function checkClone(g: Golden, v: CloneView, host: string): void {
  assert.notEqual(v.rootUuid, g.rootUuid, 'root got a new UUID');
  assert.notEqual(v.swapUuid, g.swapUuid, 'swap got a new UUID');
  const fstab = v.files['etc/fstab']!;
  assert.match(fstab, new RegExp(`^UUID=${v.rootUuid} / ext4`, 'm'));
  assert.match(fstab, new RegExp(`^UUID=${v.swapUuid} none swap`, 'm'));
  assert.ok(!fstab.includes(g.rootUuid) && !fstab.includes(g.swapUuid), fstab);
  if (g.vfatUuid) {
    assert.ok(v.vfatUuid && v.vfatUuid !== g.vfatUuid, `vfat id ${v.vfatUuid}`);
    assert.match(fstab, new RegExp(`^UUID=${v.vfatUuid} /boot/efi vfat`, 'm'));
  }
  assert.equal(
    v.files['boot/grub/grub.cfg'],
    `search --no-floppy --fs-uuid --set=root ${v.rootUuid}\nlinux /vmlinuz root=UUID=${v.rootUuid} ro resume=UUID=${v.swapUuid}\n`,
  );
  assert.equal(v.files['etc/default/grub'], `GRUB_CMDLINE_LINUX="resume=UUID=${v.swapUuid}"\n`);
  assert.match(v.diskId, /^0x[0-9a-f]{8}$/);
  assert.notEqual(v.diskId, '0x0a1b2c3d', 'new dos disk id');
  assert.equal(v.files['etc/kernel/cmdline'], `root=PARTUUID=${v.diskId.slice(2)}-01 ro quiet\n`);
  assert.equal(v.files['etc/machine-id'], '', 'machine-id emptied');
  assert.equal(v.dbusCopy, false, 'the dbus copy of the machine id is gone');
  assert.equal(v.files['etc/hostname'], `${host}\n`);
  assert.equal(v.files['etc/hosts'], `127.0.0.1\tlocalhost\n127.0.1.1\t${host}\n`);
  assert.deepEqual(v.sshFiles, [
    'ssh_host_ed25519_key',
    'ssh_host_ed25519_key.pub',
    'ssh_host_rsa_key',
    'ssh_host_rsa_key.pub',
    'sshd_config',
  ]);
  // ssh-keygen -l reads them: real keys now, not the fakes; the comment names the new host.
  assert.equal(v.fingerprints.length, 2);
  for (const f of v.fingerprints) assert.match(f, new RegExp(`root@${host} \\((RSA|ED25519)\\)$`));
}

describe('post-clone identity on disks', () => {
  test(
    'clone receive --hostname --new-uuids: image and block device targets get their own identity',
    { timeout: 180_000 },
    async (t) => {
      const why = diskTestsUnavailable();
      if (why) return t.skip(why);
      if (!has('ssh-keygen')) return t.skip('needs ssh-keygen');
      const g = buildGolden();
      const goldenSha = sha(g.img);
      const secretFile = join(dir, 'secret');
      writeFileSync(secretFile, 'identity-secret-0123456789abcdef\n');
      // Target 2 is a block device: a loop device over an image.
      const backing = join(dir, 't2.backing');
      execFileSync('truncate', ['-s', `${diskMiB}M`, backing]);
      const dev = execFileSync('losetup', ['-f', '--show', backing]).toString().trim();
      loops.push(dev);
      const server = corral([
        'clone',
        'serve',
        '--source',
        g.img,
        '--expect',
        '2',
        '--session',
        'ident',
        '--port',
        '0',
        '--host',
        '127.0.0.1',
        '--secret-file',
        secretFile,
        '--timeout-ms',
        '60000',
      ]);
      const m = await server.waitFor(/listening on 127\.0\.0\.1:(\d+)/, 30_000);
      const targets = [join(dir, 't1.img'), dev];
      const rs = targets.map((target, i) =>
        corral([
          'clone',
          'receive',
          '--server',
          `127.0.0.1:${m[1]}`,
          '--session',
          'ident',
          '--secret-file',
          secretFile,
          '--target',
          target,
          '--name',
          `r${i + 1}`,
          '--hostname',
          `node${i + 1}`,
          '--new-uuids',
        ]),
      );
      for (const r of rs) assert.equal(await exitWithin(r, 120_000), 0, r.stderr());
      assert.equal(await exitWithin(server, 30_000), 0, server.stderr());
      for (const r of rs) {
        assert.match(r.stderr(), /verified/);
        assert.match(r.stderr(), /identity: partition 3: no filesystem recognised, left as is/);
        if (g.vfatUuid) assert.match(r.stderr(), /identity: partition 4 \(vfat\): (cannot mount|UUID)/);
      }
      assert.equal(sha(g.img), goldenSha, 'the golden image is never written');
      assert.equal(readFileSync(g.outside, 'utf8'), `host-secret UUID=${g.rootUuid} none luks\n`);
      const views = targets.map((tg) => inspect(tg));
      views.forEach((v, i) => checkClone(g, v, `node${i + 1}`));
      assert.notEqual(views[0]!.rootUuid, views[1]!.rootUuid, 'two clones, two root UUIDs');
      assert.notDeepEqual(
        views[0]!.fingerprints,
        views[1]!.fingerprints,
        'two clones, two sets of host keys',
      );
      // Nothing is left attached or mounted by the identity step.
      assert.doesNotMatch(readFileSync('/proc/self/mounts', 'utf8'), /corral-identity-/);
      const assoc = execFileSync('losetup', ['-j', dev]).toString();
      assert.equal(assoc.trim(), '', `loops left on ${dev}: ${assoc}`);
    },
  );

  test(
    'clone identity on an image cloned earlier, without new UUIDs; --json report',
    { timeout: 120_000 },
    async (t) => {
      const why = diskTestsUnavailable();
      if (why) return t.skip(why);
      const g = existsSync(join(dir, 'golden.img'))
        ? { img: join(dir, 'golden.img'), machineId: 'c0ffee00c0ffee00c0ffee00c0ffee00' }
        : buildGolden();
      const img = join(dir, 'earlier.img');
      copyFileSync(g.img, img);
      const p = corral(['clone', 'identity', '--target', img, '--hostname', 'late.lab', '--json']);
      assert.equal(await exitWithin(p, 60_000), 0, p.stderr());
      const r = JSON.parse(p.stdout()) as {
        volumes: {
          index: number;
          type: string | null;
          uuid: string | null;
          newUuid: string | null;
          role: string;
        }[];
        changedFiles: string[];
        problems: string[];
      };
      assert.deepEqual(r.problems, []);
      assert.deepEqual(
        r.volumes.map((v) => [v.index, v.type, v.role, v.newUuid]),
        [
          [1, 'ext4', 'root', null],
          [2, 'swap', 'swap', null],
          [3, null, 'none', null],
          [4, has('mkfs.vfat') ? 'vfat' : null, has('mkfs.vfat') ? r.volumes[3]!.role : 'none', null],
        ],
      );
      assert.ok(r.changedFiles.includes('p1:etc/machine-id') && r.changedFiles.includes('p1:etc/hostname'));
      assert.ok(!r.changedFiles.includes('p1:etc/fstab'), 'no new UUIDs: fstab untouched');
      const l1 = attachPart(img, p1.startMiB, p1.sizeMiB);
      try {
        assert.equal(blkidOf(l1).UUID, '0a1b2c3d-1111-4222-8333-444455556666');
        const out = execFileSync('debugfs', ['-R', 'cat /etc/hostname', l1], {
          stdio: ['ignore', 'pipe', 'pipe'],
        });
        assert.equal(out.toString(), 'late.lab\n');
        const hosts = execFileSync('debugfs', ['-R', 'cat /etc/hosts', l1], {
          stdio: ['ignore', 'pipe', 'pipe'],
        });
        assert.equal(hosts.toString(), '127.0.0.1\tlocalhost\n127.0.1.1\tlate.lab late\n');
        const mid = execFileSync('debugfs', ['-R', 'cat /etc/machine-id', l1], {
          stdio: ['ignore', 'pipe', 'pipe'],
        });
        assert.equal(mid.toString(), '');
      } finally {
        detach(l1);
      }
    },
  );

  test('a bare filesystem (no partition table), xfs, and noise', { timeout: 120_000 }, async (t) => {
    const why = diskTestsUnavailable();
    if (why) return t.skip(why);
    // A single ext4 filesystem: volume 0, new UUID, its own fstab rewritten.
    const tree = join(dir, 'bare-root');
    mkdirSync(join(tree, 'etc'), { recursive: true });
    const old = '0a1b2c3d-aaaa-4bbb-8ccc-dddddddddddd';
    writeFileSync(join(tree, 'etc/fstab'), `UUID=${old} / ext4 defaults 0 1\n`);
    writeFileSync(join(tree, 'etc/machine-id'), 'abc\n');
    const bare = join(dir, 'bare.img');
    execFileSync('mkfs.ext4', ['-q', '-F', '-U', old, '-d', tree, bare, '16M']);
    const p = corral(['clone', 'identity', '--target', bare, '--new-uuids', '--json']);
    assert.equal(await exitWithin(p, 60_000), 0, p.stderr());
    const r = JSON.parse(p.stdout()) as {
      volumes: { index: number; newUuid: string }[];
      changedFiles: string[];
    };
    assert.equal(r.volumes.length, 1);
    assert.equal(r.volumes[0]!.index, 0);
    assert.equal(blkidOf(bare).UUID, r.volumes[0]!.newUuid);
    assert.notEqual(r.volumes[0]!.newUuid, old);
    const fstab = execFileSync('debugfs', ['-R', 'cat /etc/fstab', bare], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    assert.equal(fstab.toString(), `UUID=${r.volumes[0]!.newUuid} / ext4 defaults 0 1\n`);

    // GPT: new disk and partition GUIDs; PARTUUID references follow (whatever their case).
    const gptImg = join(dir, 'gpt.img');
    execFileSync('truncate', ['-s', '24M', gptImg]);
    execFileSync('sfdisk', ['--quiet', gptImg], { input: 'label: gpt\nstart=2048, size=32768, type=L\n' });
    const gptBefore = JSON.parse(execFileSync('sfdisk', ['--json', gptImg]).toString()).partitiontable;
    const oldPart = gptBefore.partitions[0].uuid as string;
    const gptTree = join(dir, 'gpt-root');
    mkdirSync(join(gptTree, 'etc'), { recursive: true });
    writeFileSync(join(gptTree, 'etc/fstab'), `PARTUUID=${oldPart.toUpperCase()} / ext4 defaults 0 1\n`);
    const gptFs = join(dir, 'gpt-root.fs');
    execFileSync('mkfs.ext4', ['-q', '-F', '-d', gptTree, gptFs, '16M']);
    putAt(gptImg, gptFs, 1);
    const gp = corral(['clone', 'identity', '--target', gptImg, '--new-uuids', '--json']);
    assert.equal(await exitWithin(gp, 60_000), 0, gp.stderr());
    const gr = JSON.parse(gp.stdout()) as {
      disk: { label: string; id: string; newId: string };
      problems: string[];
    };
    assert.deepEqual(gr.problems, []);
    const gptAfter = JSON.parse(execFileSync('sfdisk', ['--json', gptImg]).toString()).partitiontable;
    assert.deepEqual(gr.disk, { label: 'gpt', id: gptBefore.id, newId: gptAfter.id });
    assert.notEqual(gptAfter.id, gptBefore.id);
    const newPart = (gptAfter.partitions[0].uuid as string).toLowerCase();
    assert.notEqual(newPart, oldPart.toLowerCase());
    const gl = attachPart(gptImg, 1, 16);
    try {
      const f = execFileSync('debugfs', ['-R', 'cat /etc/fstab', gl], { stdio: ['ignore', 'pipe', 'pipe'] });
      assert.equal(f.toString(), `PARTUUID=${newPart} / ext4 defaults 0 1\n`);
    } finally {
      detach(gl);
    }

    // A mounted target is refused before anything changes.
    const busyDev = execFileSync('losetup', ['-f', '--show', bare]).toString().trim();
    loops.push(busyDev);
    const busyMnt = mkdtempSync(join(dir, 'busy-'));
    execFileSync('mount', ['-o', 'ro', busyDev, busyMnt]);
    mounts.push(busyMnt);
    try {
      const busy = corral(['clone', 'identity', '--target', busyDev, '--new-uuids']);
      assert.equal(await exitWithin(busy, 30_000), 1, busy.stderr());
      assert.match(busy.stderr(), new RegExp(`--target ${busyDev}: is in use \\(${busyDev} is busy`));
      const img = corral(['clone', 'identity', '--target', bare, '--new-uuids']);
      assert.equal(await exitWithin(img, 30_000), 1, img.stderr());
      assert.match(img.stderr(), /bare\.img: is in use \(attached: /);
    } finally {
      execFileSync('umount', [busyMnt]);
      mounts.pop();
      detach(busyDev);
    }
    assert.equal(blkidOf(bare).UUID, r.volumes[0]!.newUuid, 'unchanged by the refused runs');

    // Noise: nothing recognised, a message and exit 0 (nothing was asked that could be done).
    const noise = join(dir, 'noise.img');
    writeFileSync(noise, Buffer.alloc(4 * MiB, 0x5a));
    const n = corral(['clone', 'identity', '--target', noise, '--new-uuids', '--hostname', 'x']);
    assert.equal(await exitWithin(n, 30_000), 0, n.stderr());
    assert.match(n.stderr(), /no partition table and no filesystem recognised/);

    // Bad input: precise usage errors.
    const bad = corral(['clone', 'identity', '--target', noise, '--hostname', 'no_underscores']);
    assert.equal(await exitWithin(bad, 30_000), 2);
    assert.match(bad.stderr(), /--hostname no_underscores: label 'no_underscores'/);
    const missing = corral(['clone', 'identity', '--target', join(dir, 'absent.img')]);
    assert.equal(await exitWithin(missing, 30_000), 1);
    assert.match(missing.stderr(), /absent\.img: does not exist/);

    if (!has('mkfs.xfs') || !has('xfs_admin'))
      return t.diagnostic('xfsprogs not installed: xfs part skipped');
    const xfs = join(dir, 'xfs.img');
    execFileSync('truncate', ['-s', '320M', xfs]);
    execFileSync('mkfs.xfs', ['-q', '-f', xfs]);
    const before = blkidOf(xfs).UUID;
    const x = corral(['clone', 'identity', '--target', xfs, '--new-uuids', '--json']);
    assert.equal(await exitWithin(x, 60_000), 0, x.stderr());
    const xr = JSON.parse(x.stdout()) as { volumes: { type: string; newUuid: string; mounted: boolean }[] };
    assert.equal(xr.volumes[0]!.type, 'xfs');
    assert.notEqual(xr.volumes[0]!.newUuid, before);
    assert.equal(blkidOf(xfs).UUID, xr.volumes[0]!.newUuid);
  });
});
