// KA partition descriptions ("desc" files), as ka-deploy's fdisk_to_desc wrote them:
// one line per partition, `[logical] TYPE SIZE`, TYPE one of linux | swap | extended | typeNN (NN the
// MBR type in hex; linux = type83), SIZE a number of MiB or `fill` (the rest of the disk, or of the
// extended partition for a logical one). Blank lines and `#` comments are allowed.
//
//   linux 512
//   swap 256
//   extended fill
//   logical linux 1024
//   logical linux fill
//
// Parsing is pure (errors name file:line); reading a disk and applying a layout use sfdisk.
import { execFile } from 'node:child_process';
import { stat } from 'node:fs/promises';
import { promisify } from 'node:util';
import { z } from 'zod';
import { CloneError } from './clone/errors.js';

const run = promisify(execFile);

export interface DescPartition {
  /** 1-based line in the desc file (0 when generated). */
  line: number;
  logical: boolean;
  /** MBR type, lower-case hex without 0x: 83 linux, 82 swap, 5 extended. */
  typeHex: string;
  sizeMiB: number | 'fill';
}

export interface Desc {
  partitions: DescPartition[];
}

export class DescError extends CloneError {
  constructor(
    readonly where: string,
    message: string,
    hint = 'lines are `[logical] linux|swap|extended|typeNN SIZE_MIB|fill`',
  ) {
    super('CORRAL_CLONE_DESC', `${where}: ${message}`, hint);
  }
}

const named: Record<string, string> = { linux: '83', swap: '82', extended: '5' };
const extendedTypes = new Set(['5', 'f', '85']);
export const isExtended = (typeHex: string) => extendedTypes.has(typeHex);
export const primaryMax = 4;

function typeName(hex: string): string {
  for (const [n, h] of Object.entries(named)) if (h === hex) return n;
  return `type${hex}`;
}

/** Parses a desc file; reports every mistake at once, each as file:line. */
export function parseDesc(text: string, file = 'desc'): Desc {
  const errors: string[] = [];
  const partitions: DescPartition[] = [];
  const lines = text.split('\n');
  lines.forEach((raw, i) => {
    const line = i + 1;
    const where = `${file}:${line}`;
    const body = raw.replace(/#.*/, '').trim();
    if (!body) return;
    const words = body.split(/\s+/);
    let logical = false;
    if (words[0] === 'logical') {
      logical = true;
      words.shift();
    } else if (words[words.length - 1] === 'logical') {
      logical = true;
      words.pop();
    }
    if (words.length !== 2) {
      errors.push(`${where}: expected TYPE SIZE (e.g. \`linux 512\`), got \`${body}\``);
      return;
    }
    const [t, s] = words as [string, string];
    let typeHex = named[t.toLowerCase()];
    const m = /^type([0-9a-fA-F]{1,2})$/.exec(t);
    if (!typeHex && m) typeHex = m[1]!.toLowerCase().replace(/^0(?=.)/, '');
    if (!typeHex || typeHex === '0') {
      errors.push(
        `${where}: unknown partition type \`${t}\`; expected linux, swap, extended or typeNN (hex, not 00)`,
      );
      return;
    }
    let sizeMiB: number | 'fill';
    if (s === 'fill') sizeMiB = 'fill';
    else if (/^\d+$/.test(s) && Number(s) > 0) sizeMiB = Number(s);
    else {
      errors.push(`${where}: size \`${s}\` must be a positive number of MiB or \`fill\``);
      return;
    }
    partitions.push({ line, logical, typeHex, sizeMiB });
  });
  errors.push(...checkDesc({ partitions }, file));
  const lineOf = (e: string) => Number(/:(\d+):/.exec(e)?.[1] ?? 0);
  errors.sort((a, b) => lineOf(a) - lineOf(b));
  if (errors.length > 0) throw new DescError(file, `${errors.length} error(s):\n  ${errors.join('\n  ')}`);
  return { partitions };
}

/** Layout rules; returns messages (file:line) rather than throwing, so all are reported. */
export function checkDesc(d: Desc, file = 'desc'): string[] {
  const errs: string[] = [];
  const at = (p: DescPartition) => `${file}:${p.line}`;
  const primaries = d.partitions.filter((p) => !p.logical);
  const logicals = d.partitions.filter((p) => p.logical);
  const extended = primaries.filter((p) => isExtended(p.typeHex));
  if (d.partitions.length === 0) errs.push(`${file}: no partitions`);
  if (primaries.length > primaryMax)
    errs.push(
      `${at(primaries[primaryMax]!)}: more than ${primaryMax} primary partitions (use extended + logical)`,
    );
  if (extended.length > 1) errs.push(`${at(extended[1]!)}: a second extended partition`);
  for (const p of logicals) {
    if (isExtended(p.typeHex)) errs.push(`${at(p)}: a logical partition cannot be extended`);
    const ext = extended[0];
    if (!ext || ext.line > p.line)
      errs.push(`${at(p)}: logical partition without an extended partition before it`);
  }
  const lastFillOnly = (ps: DescPartition[], what: string) => {
    ps.forEach((p, i) => {
      if (p.sizeMiB === 'fill' && i !== ps.length - 1)
        errs.push(`${at(p)}: only the last ${what} may be \`fill\``);
    });
  };
  lastFillOnly(primaries, 'primary partition');
  lastFillOnly(logicals, 'logical partition');
  if (logicals.length > 0 && extended[0] && primaries[primaries.length - 1] !== extended[0])
    errs.push(`${at(extended[0])}: the extended partition must be the last primary one`);
  return errs;
}

export function formatDesc(d: Desc): string {
  return d.partitions
    .map(
      (p) =>
        `${p.logical ? 'logical ' : ''}${typeName(p.typeHex)} ${p.sizeMiB === 'fill' ? 'fill' : p.sizeMiB}`,
    )
    .join('\n')
    .concat('\n');
}

// ---- sfdisk ----

export const SfdiskJson = z.object({
  partitiontable: z.object({
    label: z.string(),
    device: z.string().optional(),
    unit: z.string().optional(),
    sectorsize: z.number().int().positive().optional(),
    lastlba: z.number().int().optional(),
    partitions: z
      .array(
        z.object({
          node: z.string(),
          start: z.number().int().nonnegative(),
          size: z.number().int().nonnegative(),
          type: z.string(),
          bootable: z.boolean().optional(),
        }),
      )
      .default([]),
  }),
});
export type SfdiskJson = z.infer<typeof SfdiskJson>;

export async function readSfdiskJson(dev: string): Promise<SfdiskJson> {
  let out: string;
  try {
    out = (await run('sfdisk', ['--json', dev], { timeout: 30_000 })).stdout;
  } catch (err) {
    const e = err as NodeJS.ErrnoException & { stderr?: string };
    if (e.code === 'ENOENT')
      throw new CloneError('CORRAL_CLONE_TOOL', 'sfdisk is not installed', 'apt-get install fdisk');
    throw new CloneError(
      'CORRAL_CLONE_DESC',
      `${dev}: sfdisk --json failed: ${(e.stderr ?? e.message).trim()}`,
      'is it a partitioned disk?',
    );
  }
  const r = SfdiskJson.safeParse(JSON.parse(out));
  if (!r.success) throw new CloneError('CORRAL_CLONE_DESC', `${dev}: unexpected sfdisk --json output`);
  return r.data;
}

const miB = 1024 * 1024;

/**
 * The desc of a partition table. The last partition of each level becomes `fill` when it reaches
 * (within 1 MiB) the end of the disk, or of the extended partition.
 */
export function descFromSfdiskJson(t: SfdiskJson, where: string, diskBytes?: number): Desc {
  const pt = t.partitiontable;
  if (pt.label !== 'dos')
    throw new DescError(
      where,
      `partition table is ${pt.label}; the KA desc format describes MBR (dos) tables only`,
      'convert the golden disk to MBR, or clone the whole disk',
    );
  const sector = pt.sectorsize ?? 512;
  const parts = [...pt.partitions].sort((a, b) => partNumber(a.node) - partNumber(b.node));
  const primaries = parts.filter((p) => partNumber(p.node) <= 4);
  const logicals = parts.filter((p) => partNumber(p.node) > 4);
  const ext = primaries.find((p) => isExtended(p.type.toLowerCase()));
  const endOfDisk = diskBytes ?? (pt.lastlba !== undefined ? (pt.lastlba + 1) * sector : Infinity);
  const out: DescPartition[] = [];
  primaries.forEach((p, i) => {
    const end = (p.start + p.size) * sector;
    const last = i === primaries.length - 1;
    out.push({
      line: 0,
      logical: false,
      typeHex: p.type.toLowerCase(),
      sizeMiB: last && endOfDisk - end < miB ? 'fill' : Math.max(1, Math.floor((p.size * sector) / miB)),
    });
  });
  logicals.forEach((p, i) => {
    const end = (p.start + p.size) * sector;
    const extEnd = ext ? (ext.start + ext.size) * sector : 0;
    const last = i === logicals.length - 1;
    out.push({
      line: 0,
      logical: true,
      typeHex: p.type.toLowerCase(),
      sizeMiB: last && extEnd - end < miB ? 'fill' : Math.max(1, Math.floor((p.size * sector) / miB)),
    });
  });
  return { partitions: out };
}

function partNumber(node: string): number {
  const m = /(\d+)$/.exec(node);
  return m ? Number(m[1]) : 0;
}

/** sfdisk input for a desc (sfdisk aligns and places; an empty size is "as large as possible"). */
export function sfdiskScript(d: Desc): string {
  const lines = ['label: dos'];
  for (const p of d.partitions) {
    const size = p.sizeMiB === 'fill' ? '' : `${p.sizeMiB}MiB`;
    lines.push(`,${size},${p.typeHex}`);
  }
  return `${lines.join('\n')}\n`;
}

/** Sum of fixed sizes (MiB) plus 1 MiB per partition for alignment and EBRs: the smallest disk that fits. */
export function minimumDiskMiB(d: Desc): number {
  let total = 1;
  for (const p of d.partitions) {
    if (isExtended(p.typeHex)) continue;
    total += (p.sizeMiB === 'fill' ? 1 : p.sizeMiB) + (p.logical ? 1 : 0);
  }
  return total;
}

/** Writes the desc's layout to a disk with sfdisk (fill scaled to the disk). Destroys its table. */
export async function applyDesc(dev: string, d: Desc, diskBytes: number): Promise<SfdiskJson> {
  const need = minimumDiskMiB(d);
  if (diskBytes < need * miB)
    throw new CloneError(
      'CORRAL_CLONE_TARGET',
      `${dev}: ${Math.floor(diskBytes / miB)} MiB is too small for the description (needs at least ${need} MiB)`,
      'use a larger disk or smaller fixed sizes in the desc',
    );
  await sfdiskWithInput(dev, sfdiskScript(d));
  // Make the kernel (re)read the new table so DEV1, DEV2... exist (sfdisk's own re-read is not
  // always honoured, e.g. in containers); image files have no kernel view.
  const st = await stat(dev);
  if (st.isBlockDevice()) await run('partx', ['-u', dev], { timeout: 30_000 }).catch(() => undefined);
  return readSfdiskJson(dev);
}

function sfdiskWithInput(dev: string, input: string): Promise<void> {
  return new Promise((resolve, reject) => {
    const child = execFile(
      'sfdisk',
      ['--quiet', '--wipe', 'always', dev],
      { timeout: 60_000 },
      (err, _stdout, stderr) => {
        if (err)
          reject(
            new CloneError(
              'CORRAL_CLONE_DESC',
              `${dev}: sfdisk failed: ${String(stderr).trim() || err.message}`,
            ),
          );
        else resolve();
      },
    );
    child.stdin?.end(input);
  });
}
