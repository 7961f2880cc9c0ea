// Sources and targets: an image file or a block device, read and written at offsets.
// The source is only ever opened read-only ('r'); targets are opened for writing only after
// the stream header has been checked.
import { constants as fsc } from 'node:fs';
import { open, readFile, realpath, stat, type FileHandle } from 'node:fs/promises';
import { basename } from 'node:path';
import { CloneSourceError, CloneTargetError } from './errors.js';

export interface VolumeInfo {
  path: string;
  isBlockDevice: boolean;
  /** Size in bytes; for a missing regular file, null. */
  sizeBytes: number | null;
}

/** Size of a block device from sysfs (fstat reports 0 for devices). */
export async function blockDeviceBytes(path: string): Promise<number> {
  const real = await realpath(path);
  const sectors = await readFile(`/sys/class/block/${basename(real)}/size`, 'utf8');
  return Number(sectors.trim()) * 512;
}

export async function volumeInfo(path: string): Promise<VolumeInfo> {
  let st;
  try {
    st = await stat(path);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT')
      return { path, isBlockDevice: false, sizeBytes: null };
    throw err;
  }
  if (st.isBlockDevice()) return { path, isBlockDevice: true, sizeBytes: await blockDeviceBytes(path) };
  if (st.isFile()) return { path, isBlockDevice: false, sizeBytes: st.size };
  throw new CloneTargetError(
    path,
    'is neither a regular file nor a block device',
    'give an image file or a disk',
  );
}

export interface SourceVolume {
  info: VolumeInfo;
  fh: FileHandle;
  sizeBytes: number;
}

export async function openSource(path: string): Promise<SourceVolume> {
  let info: VolumeInfo;
  try {
    info = await volumeInfo(path);
  } catch (err) {
    if (err instanceof CloneTargetError)
      throw new CloneSourceError(`--source ${path}`, 'is neither a regular file nor a block device');
    throw err;
  }
  if (info.sizeBytes === null)
    throw new CloneSourceError(`--source ${path}`, 'does not exist', 'give an image file or a disk device');
  // Read-only, always: the golden node is never written to.
  const fh = await open(path, fsc.O_RDONLY);
  return { info, fh, sizeBytes: info.sizeBytes };
}

/** Size now, to detect a source that changed size during the stream. */
export async function currentSourceBytes(src: SourceVolume): Promise<number> {
  return src.info.isBlockDevice ? blockDeviceBytes(src.info.path) : (await src.fh.stat()).size;
}

export async function readFully(fh: FileHandle, buf: Buffer, offset: number): Promise<void> {
  let done = 0;
  while (done < buf.length) {
    const { bytesRead } = await fh.read(buf, done, buf.length - done, offset + done);
    if (bytesRead === 0)
      throw new CloneSourceError(
        'read',
        `unexpected end of data at byte ${offset + done}`,
        'the source shrank',
      );
    done += bytesRead;
  }
}

export async function writeFully(fh: FileHandle, buf: Buffer, offset: number): Promise<void> {
  let done = 0;
  while (done < buf.length) {
    const { bytesWritten } = await fh.write(buf, done, buf.length - done, offset + done);
    done += bytesWritten;
  }
}

const zeroCache = new Map<number, Buffer>();
export function zeros(n: number): Buffer {
  let z = zeroCache.get(n);
  if (!z) {
    z = Buffer.alloc(n);
    if (zeroCache.size < 8) zeroCache.set(n, z);
  }
  return z;
}

export function isAllZero(buf: Buffer): boolean {
  return buf.equals(zeros(buf.length));
}

/** Writes buffers back to back at offset with as few system calls as the kernel allows. */
export async function writevFully(fh: FileHandle, bufs: Buffer[], offset: number): Promise<void> {
  let total = 0;
  for (const b of bufs) total += b.length;
  const { bytesWritten } = await fh.writev(bufs, offset);
  if (bytesWritten >= total) return;
  // A short write (rare for files and devices): finish piece by piece.
  let at = 0;
  for (const b of bufs) {
    const end = at + b.length;
    if (end > bytesWritten)
      await writeFully(
        fh,
        at >= bytesWritten ? b : b.subarray(bytesWritten - at),
        offset + Math.max(at, bytesWritten),
      );
    at = end;
  }
}
