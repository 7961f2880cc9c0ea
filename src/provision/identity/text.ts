// Post-clone identity, the pure part: which volumes a disk holds, what a filesystem's new UUID looks
// like, and the text rewrites of the copied configuration (fstab, crypttab, boot config, hostname,
// hosts). No I/O here: randomness comes in as bytes, file contents as strings.
import { z } from 'zod';

/** Filesystems whose UUID we know how to change, and the tool that does it. */
export type FsKind = 'ext' | 'swap' | 'xfs' | 'vfat' | 'other';

export function fsKind(type: string | undefined): FsKind {
  switch (type) {
    case 'ext2':
    case 'ext3':
    case 'ext4':
      return 'ext';
    case 'swap':
      return 'swap';
    case 'xfs':
      return 'xfs';
    case 'vfat':
      return 'vfat';
    default:
      return 'other';
  }
}

/** Filesystems worth mounting to look for /etc or boot configuration. */
export function mountable(type: string | undefined): boolean {
  const k = fsKind(type);
  return k === 'ext' || k === 'xfs' || k === 'vfat';
}

/** `blkid -p -o export` output: KEY=value lines. */
export function parseBlkidExport(text: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const line of text.split('\n')) {
    const m = /^([A-Z_]+)=(.*)$/.exec(line.trim());
    if (m) out[m[1]!] = m[2]!.replace(/\\(.)/g, '$1');
  }
  return out;
}

const SfdiskPart = z.object({
  node: z.string(),
  start: z.number().int().nonnegative(),
  size: z.number().int().nonnegative(),
  type: z.string(),
  uuid: z.string().optional(),
});
export const SfdiskTable = z.object({
  partitiontable: z.object({
    label: z.string(),
    id: z.string().optional(),
    sectorsize: z.number().int().positive().optional(),
    partitions: z.array(SfdiskPart).default([]),
  }),
});
export type SfdiskTable = z.infer<typeof SfdiskTable>;

export interface VolumeSpan {
  /** 1-based partition number, or 0 for a disk holding one filesystem without a partition table. */
  index: number;
  offsetBytes: number;
  sizeBytes: number;
}

/** dos extended containers (5, f, 85) hold logical partitions, not a filesystem. */
const containerTypes = new Set(['5', 'f', '85']);

/** The partitions of a table worth probing, as byte spans of the disk. */
export function spansOf(t: SfdiskTable): VolumeSpan[] {
  const sector = t.partitiontable.sectorsize ?? 512;
  const out: VolumeSpan[] = [];
  for (const p of t.partitiontable.partitions) {
    const n = /(\d+)$/.exec(p.node);
    const type = p.type.toLowerCase();
    if (t.partitiontable.label === 'dos' && containerTypes.has(type)) continue;
    if (p.size === 0) continue;
    out.push({
      index: n ? Number(n[1]) : out.length + 1,
      offsetBytes: p.start * sector,
      sizeBytes: p.size * sector,
    });
  }
  return out;
}

function partNumber(node: string): number | null {
  const n = /(\d+)$/.exec(node);
  return n ? Number(n[1]) : null;
}

/**
 * PARTUUIDs as the kernel and blkid show them: on dos `<disk id>-<NN>`, on gpt the partition's
 * UUID, both lowercase. Keyed by partition number.
 */
export function partUuids(t: SfdiskTable): Map<number, string> {
  const out = new Map<number, string>();
  const pt = t.partitiontable;
  for (const p of pt.partitions) {
    const n = partNumber(p.node);
    if (n === null) continue;
    if (pt.label === 'dos' && pt.id) {
      const id = pt.id.replace(/^0x/i, '').toLowerCase().padStart(8, '0');
      out.set(n, `${id}-${String(n).padStart(2, '0')}`);
    } else if (pt.label === 'gpt' && p.uuid) out.set(n, p.uuid.toLowerCase());
  }
  return out;
}

/** Old PARTUUID -> new, for the partitions of the same table before and after new ids. */
export function partUuidMap(before: SfdiskTable, after: SfdiskTable): Map<string, string> {
  const a = partUuids(before);
  const b = partUuids(after);
  const out = new Map<string, string>();
  for (const [n, old] of a) {
    const now = b.get(n);
    if (now && now !== old) out.set(old, now);
  }
  return out;
}

/** A dos disk identifier for `sfdisk --disk-id` (never 0: that means "none"). */
export function dosDiskIdFromBytes(bytes: Uint8Array): string {
  if (bytes.length < 4) throw new Error('dosDiskIdFromBytes: need 4 bytes');
  const h = Array.from(bytes.subarray(0, 4))
    .map((x) => x.toString(16).padStart(2, '0'))
    .join('');
  return `0x${h === '00000000' ? '00000001' : h}`;
}

/** A random RFC 4122 version-4 UUID from 16 random bytes (ext, swap, xfs). */
export function uuidFromBytes(bytes: Uint8Array): string {
  if (bytes.length < 16) throw new Error('uuidFromBytes: need 16 bytes');
  const b = Array.from(bytes.subarray(0, 16));
  b[6] = (b[6]! & 0x0f) | 0x40;
  b[8] = (b[8]! & 0x3f) | 0x80;
  const h = b.map((x) => x.toString(16).padStart(2, '0')).join('');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

/** A FAT volume id as blkid shows it (XXXX-XXXX) and as fatlabel takes it (8 hex digits). */
export function fatIdFromBytes(bytes: Uint8Array): { shown: string; arg: string } {
  if (bytes.length < 4) throw new Error('fatIdFromBytes: need 4 bytes');
  const h = Array.from(bytes.subarray(0, 4))
    .map((x) => x.toString(16).padStart(2, '0'))
    .join('')
    .toUpperCase();
  return { shown: `${h.slice(0, 4)}-${h.slice(4)}`, arg: h };
}

function escapeRe(s: string): string {
  return s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
}

/**
 * Replaces every whole-token occurrence of an old UUID by its new one (case-insensitive: FAT ids
 * appear in either case). A token is bounded by anything but a hex digit, a letter or '-', so a UUID
 * that is a prefix of a longer string is left alone. Returns the new text and the count replaced.
 */
export function rewriteUuids(
  text: string,
  map: ReadonlyMap<string, string>,
): { text: string; count: number } {
  let count = 0;
  let out = text;
  for (const [oldId, newId] of map) {
    if (!oldId || oldId.toLowerCase() === newId.toLowerCase()) continue;
    const re = new RegExp(`(?<![0-9A-Za-z-])${escapeRe(oldId)}(?![0-9A-Za-z-])`, 'gi');
    out = out.replace(re, () => {
      count++;
      return newId;
    });
  }
  return { text: out, count };
}

const labelRe = /^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$/;

/** Null when NAME is a valid host name (RFC 1123 labels, at most 253 characters), else why not. */
export function hostnameProblem(name: string): string | null {
  if (name.length === 0 || name.length > 253) return 'must be 1 to 253 characters';
  for (const label of name.split('.'))
    if (!labelRe.test(label))
      return `label '${label}' must be 1-63 letters, digits or '-', not starting or ending with '-'`;
  return null;
}

/**
 * /etc/hosts for a new host name: the old short and full names become the new ones on every line;
 * when no line names the host, Debian's convention `127.0.1.1 NAME` is added.
 */
export function rewriteHosts(text: string, oldName: string | null, newName: string): string {
  const short = newName.split('.')[0]!;
  const names = newName === short ? [newName] : [newName, short];
  const oldNames = new Set<string>();
  if (oldName) {
    oldNames.add(oldName);
    oldNames.add(oldName.split('.')[0]!);
  }
  let named = false;
  const lines = text.split('\n').map((line) => {
    const [body, ...comment] = line.split('#');
    const fields = body!.trim().split(/\s+/).filter(Boolean);
    if (fields.length < 2) return line;
    const [addr, ...aliases] = fields;
    if (!aliases.some((a) => oldNames.has(a) || a === newName)) return line;
    named = true;
    const kept = aliases.filter((a) => !oldNames.has(a) && !names.includes(a));
    const rest = comment.length ? ` #${comment.join('#')}` : '';
    return `${addr}\t${[...names, ...kept].join(' ')}${rest}`;
  });
  let out = lines.join('\n');
  if (!named) out = `${out}${out === '' || out.endsWith('\n') ? '' : '\n'}127.0.1.1\t${names.join(' ')}\n`;
  return out;
}

/** `ssh_host_ed25519_key` -> 'ed25519' (the key types ssh-keygen -t takes). */
export function sshKeyType(fileName: string): string | null {
  const m = /^ssh_host_(rsa|ecdsa|ed25519|dsa)_key$/.exec(fileName);
  return m ? m[1]! : null;
}

/** Files of a root filesystem that may name filesystems by UUID. Globs are a trailing `*.conf`. */
export const rootConfigFiles = [
  'etc/fstab',
  'etc/crypttab',
  'etc/default/grub',
  'etc/kernel/cmdline',
  'etc/initramfs-tools/conf.d/resume',
  'boot/grub/grub.cfg',
  'boot/grub2/grub.cfg',
  'boot/loader/entries/*.conf',
  'boot/efi/EFI/*/grub.cfg',
] as const;

/** The same for a separate /boot or EFI system partition (files at its top). */
export const bootConfigFiles = [
  'grub/grub.cfg',
  'grub2/grub.cfg',
  'loader/entries/*.conf',
  'EFI/*/grub.cfg',
] as const;
