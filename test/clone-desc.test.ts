// KA partition descriptions: parse (every error as file:line), format, generate from a disk with
// `corral clone desc` (sfdisk --json), and apply to a larger disk with fill scaled (sfdisk).
// Disks are image files (sfdisk works on them without root); a loop device run checks the kernel
// sees the applied partitions (root only).
import { after, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { DescError, formatDesc, minimumDiskMiB, parseDesc, sfdiskScript } from '../src/provision/desc.js';
import { corral, exitWithin, killAll } from '../src/provision/clone/testing.js';

const dir = mkdtempSync(join(tmpdir(), 'corral-desc-'));
after(() => {
  killAll();
  rmSync(dir, { recursive: true, force: true });
});

const kaExample = `# the golden node of ka-deploy's documentation
linux 5000
swap 1000
extended fill
logical linux 5000
logical swap 1000
logical linux fill
`;

const hasSfdisk = (() => {
  try {
    execFileSync('sfdisk', ['--version']);
    return true;
  } catch {
    return false;
  }
})();

describe('KA desc format', () => {
  test('parses the KA example and writes it back', () => {
    const d = parseDesc(kaExample, 'golden.desc');
    assert.equal(d.partitions.length, 6);
    assert.deepEqual(
      d.partitions.map((p) => [p.logical, p.typeHex, p.sizeMiB, p.line]),
      [
        [false, '83', 5000, 2],
        [false, '82', 1000, 3],
        [false, '5', 'fill', 4],
        [true, '83', 5000, 5],
        [true, '82', 1000, 6],
        [true, '83', 'fill', 7],
      ],
    );
    assert.equal(formatDesc(d), kaExample.split('\n').slice(1).join('\n'));
    assert.equal(
      formatDesc(parseDesc('type0c 100\nlinux fill logical\n'.replace(' logical', ''))),
      'type0c 100\nlinux fill\n'.replace('type0c', 'typec'),
    );
    assert.equal(sfdiskScript(d).split('\n')[0], 'label: dos');
    assert.match(sfdiskScript(d), /^,5000MiB,83$/m);
    assert.match(sfdiskScript(d), /^,,5$/m);
    assert.equal(minimumDiskMiB(d), 1 + 5000 + 1000 + 5001 + 1001 + 2);
  });

  test('every mistake is reported at once, as file:line', () => {
    const text = 'linux 10\nbogus 5\nlinux fill\nswap 3\nlogical linux x\nlogical swap 4\nlinux 1 2\n';
    let err: unknown;
    try {
      parseDesc(text, 'node7.desc');
    } catch (e) {
      err = e;
    }
    assert.ok(err instanceof DescError);
    const m = (err as Error).message;
    assert.match(m, /node7\.desc:2: unknown partition type `bogus`/);
    assert.match(m, /node7\.desc:3: only the last primary partition may be `fill`/);
    assert.match(m, /node7\.desc:5: size `x` must be a positive number of MiB or `fill`/);
    assert.match(m, /node7\.desc:6: logical partition without an extended partition before it/);
    assert.match(m, /node7\.desc:7: expected TYPE SIZE/);
    assert.ok(
      m.indexOf(':2:') < m.indexOf(':3:') && m.indexOf(':3:') < m.indexOf(':7:'),
      'errors in line order',
    );
    assert.throws(
      () => parseDesc('linux 1\nlinux 1\nlinux 1\nlinux 1\nlinux 1\n', 'five'),
      /five:5: more than 4 primary/,
    );
    assert.throws(() => parseDesc('\n# nothing\n', 'empty'), /empty: no partitions/);
  });
});

describe('corral clone desc with sfdisk', () => {
  test('generate from a disk, apply to a larger one with fill scaled', { timeout: 60_000 }, async (t) => {
    if (!hasSfdisk) return t.skip('needs sfdisk (apt-get install fdisk)');
    const golden = join(dir, 'golden.img');
    execFileSync('truncate', ['-s', '64M', golden]);
    execFileSync('sfdisk', ['-q', golden], {
      input: 'label: dos\n,16MiB,83\n,8MiB,82\n,,5\n,8MiB,83\n,,83\n',
    });
    const gen = corral(['clone', 'desc', golden, '--output', join(dir, 'golden.desc')]);
    assert.equal(await exitWithin(gen, 30_000), 0, gen.stderr());
    const descText = execFileSync('cat', [join(dir, 'golden.desc')]).toString();
    assert.equal(descText, 'linux 16\nswap 8\nextended fill\nlogical linux 8\nlogical linux fill\n');

    const target = join(dir, 'target.img');
    execFileSync('truncate', ['-s', '128M', target]);
    const refuse = corral(['clone', 'desc', target, '--apply', join(dir, 'golden.desc')]);
    assert.equal(await exitWithin(refuse, 30_000), 2);
    assert.match(refuse.stderr(), /add --yes/);
    const apply = corral(['clone', 'desc', target, '--apply', join(dir, 'golden.desc'), '--yes']);
    assert.equal(await exitWithin(apply, 30_000), 0, apply.stderr());
    const table = JSON.parse(execFileSync('sfdisk', ['--json', target]).toString()) as {
      partitiontable: { partitions: { node: string; start: number; size: number; type: string }[] };
    };
    const parts = table.partitiontable.partitions;
    assert.deepEqual(
      parts.map((p) => p.type),
      ['83', '82', '5', '83', '83'],
    );
    assert.equal(parts[0]!.size * 512, 16 * 1024 * 1024);
    assert.equal(parts[1]!.size * 512, 8 * 1024 * 1024);
    // fill scaled: the extended partition and its last logical reach the end of the 128 MiB disk.
    assert.equal((parts[2]!.start + parts[2]!.size) * 512, 128 * 1024 * 1024);
    assert.equal((parts[4]!.start + parts[4]!.size) * 512, 128 * 1024 * 1024);
    assert.ok(parts[4]!.size * 512 > 90 * 1024 * 1024);

    // A disk too small for the fixed sizes is refused before sfdisk touches it.
    const tiny = join(dir, 'tiny.img');
    execFileSync('truncate', ['-s', '20M', tiny]);
    const small = corral(['clone', 'desc', tiny, '--apply', join(dir, 'golden.desc'), '--yes']);
    assert.equal(await exitWithin(small, 30_000), 1);
    assert.match(
      small.stderr(),
      /tiny\.img: 20 MiB is too small for the description \(needs at least \d+ MiB\)/,
    );

    // A desc with mistakes: file:line, nothing applied.
    writeFileSync(join(dir, 'bad.desc'), 'linux 10\nlinux sixteen\n');
    const bad = corral(['clone', 'desc', target, '--apply', join(dir, 'bad.desc'), '--yes']);
    assert.equal(await exitWithin(bad, 30_000), 1);
    assert.match(bad.stderr(), /bad\.desc:2: size `sixteen`/);
    assert.equal(
      JSON.parse(execFileSync('sfdisk', ['--json', target]).toString()).partitiontable.partitions.length,
      5,
    );
  });

  test('on a loop device the kernel sees the applied partitions', { timeout: 60_000 }, async (t) => {
    if (!hasSfdisk) return t.skip('needs sfdisk');
    if (process.getuid?.() !== 0) return t.skip('needs root: losetup');
    const backing = join(dir, 'loopdisk.img');
    execFileSync('truncate', ['-s', '96M', backing]);
    writeFileSync(join(dir, 'two.desc'), 'linux 32\nlinux fill\n');
    let loop: string;
    try {
      loop = execFileSync('losetup', ['-P', '-f', '--show', backing]).toString().trim();
    } catch (err) {
      return t.skip(`needs loop devices: ${(err as Error).message}`);
    }
    try {
      const apply = corral(['clone', 'desc', loop, '--apply', join(dir, 'two.desc'), '--yes']);
      assert.equal(await exitWithin(apply, 30_000), 0, apply.stderr());
      assert.equal(apply.stdout(), 'linux 32\nlinux fill\n');
      const sizes = execFileSync('lsblk', ['-bnro', 'NAME,SIZE', loop]).toString();
      assert.match(sizes, new RegExp(`${loop.split('/').pop()}p1 ${32 * 1024 * 1024}`));
      assert.match(sizes, new RegExp(`${loop.split('/').pop()}p2 \\d+`));
    } finally {
      execFileSync('losetup', ['-d', loop]);
    }
  });
});
