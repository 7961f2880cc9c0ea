// Which blocks of a source the filesystem uses, from partclone's block bitmap (`partclone.<fs> -D`
// writes it as a ddrescue domain map: "pos size status", '+' = used). Only used blocks are read and
// sent; the rest travels as zero records. Any problem (no partclone, a filesystem it does not know,
// a mounted or damaged source) falls back to copying every non-zero block, with a message.
import { execFile } from 'node:child_process';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import type { UsedMap } from './source-reader.js';

const run = promisify(execFile);

export const usedBlockLimits = {
  /** blkid on the source. */
  probeTimeoutMs: 10_000,
  /** partclone reads the filesystem's bitmaps (not the data): minutes at most even for large disks. */
  partcloneTimeoutMs: 10 * 60_000,
  mapFileMaxBytes: 64 * 1024 * 1024,
} as const;

/** blkid TYPE -> partclone tool. ext2/3/4 are tested (test/clone-partclone.test.ts). */
const tools: Record<string, string> = {
  ext2: 'partclone.extfs',
  ext3: 'partclone.extfs',
  ext4: 'partclone.extfs',
  xfs: 'partclone.xfs',
  btrfs: 'partclone.btrfs',
  vfat: 'partclone.fat',
  exfat: 'partclone.exfat',
  ntfs: 'partclone.ntfs',
};

const sbinPath = `${process.env.PATH ?? ''}:/usr/sbin:/sbin`;

/** Parses a ddrescue domain map into merged used ranges clipped to sizeBytes. */
export function parseDomainMap(text: string, sizeBytes: number): [number, number][] {
  const ranges: [number, number][] = [];
  let seenPosLine = false;
  for (const raw of text.split('\n')) {
    const line = raw.trim();
    if (line === '' || line.startsWith('#')) continue;
    const f = line.split(/\s+/);
    if (!seenPosLine) {
      // The first data line is "current_pos current_status".
      seenPosLine = true;
      if (f.length === 2) continue;
    }
    if (f.length < 3 || f[2] !== '+') continue;
    const pos = Number.parseInt(f[0]!, 16);
    const size = Number.parseInt(f[1]!, 16);
    if (!Number.isSafeInteger(pos) || !Number.isSafeInteger(size) || size <= 0) continue;
    const a = Math.min(pos, sizeBytes);
    const b = Math.min(pos + size, sizeBytes);
    if (b > a) ranges.push([a, b]);
  }
  ranges.sort((x, y) => x[0] - y[0]);
  const merged: [number, number][] = [];
  for (const r of ranges) {
    const last = merged[merged.length - 1];
    if (last && r[0] <= last[1]) last[1] = Math.max(last[1], r[1]);
    else merged.push([r[0], r[1]]);
  }
  return merged;
}

export async function filesystemType(path: string): Promise<string | null> {
  try {
    const { stdout } = await run('blkid', ['-p', '-o', 'value', '-s', 'TYPE', path], {
      timeout: usedBlockLimits.probeTimeoutMs,
      env: { ...process.env, PATH: sbinPath },
    });
    return stdout.trim() || null;
  } catch {
    return null;
  }
}

/**
 * The used-block map of a source, or null with the reason given to log (the caller then copies every
 * non-zero block).
 */
export async function usedBlockMap(
  path: string,
  sizeBytes: number,
  log: (msg: string) => void,
): Promise<UsedMap | null> {
  const fs = await filesystemType(path);
  const tool = fs ? tools[fs] : undefined;
  if (!fs || !tool) {
    log(
      `${path}: ${fs ? `filesystem ${fs}` : 'no filesystem found'} (partclone knows ${Object.keys(tools).join(', ')}): copying every non-zero block`,
    );
    return null;
  }
  const dir = await mkdtemp(join(tmpdir(), 'corral-used-'));
  const mapFile = join(dir, 'domain.map');
  try {
    try {
      await run(tool, ['-D', '-q', '-s', path, '-o', mapFile], {
        timeout: usedBlockLimits.partcloneTimeoutMs,
        maxBuffer: 1024 * 1024,
        env: { ...process.env, PATH: sbinPath },
      });
    } catch (err) {
      const e = err as NodeJS.ErrnoException & { stderr?: string };
      const why =
        e.code === 'ENOENT'
          ? `${tool} is not installed (Debian package partclone)`
          : `${tool} failed: ${(e.stderr ?? e.message).trim().split('\n').slice(-2).join(' ')}`;
      log(`${path}: ${why}: copying every non-zero block`);
      return null;
    }
    const text = await readFile(mapFile, 'utf8');
    if (text.length > usedBlockLimits.mapFileMaxBytes) {
      log(
        `${path}: partclone's block map is larger than ${usedBlockLimits.mapFileMaxBytes} bytes: copying every non-zero block`,
      );
      return null;
    }
    const ranges = parseDomainMap(text, sizeBytes);
    if (ranges.length === 0) {
      log(`${path}: partclone reported no used blocks (not trusted): copying every non-zero block`);
      return null;
    }
    const usedBytes = ranges.reduce((s, [a, b]) => s + b - a, 0);
    return { fs, ranges, usedBytes };
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}
