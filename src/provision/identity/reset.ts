// Post-clone identity: give a cloned disk or image its own identity. New filesystem UUIDs (when
// asked) with fstab, crypttab and boot configuration rewritten to match; an empty /etc/machine-id
// (systemd's first-boot semantics); new SSH host keys; a host name.
//
// Every partition is attached as its own loop device (offset and size from the on-disk table, so
// no kernel partition scan is needed and a stale kernel view of a block device does not matter),
// probed with blkid, changed unmounted, then mounted nodev,nosuid,noexec in a private temp dir.
// Whatever cannot be done (unknown filesystem, missing tool, not mountable) is skipped with a
// message: the cloned data is never at risk of being lost. Mounts and loops are always undone.
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { constants as fsc } from 'node:fs';
import {
  access,
  lstat,
  open,
  realpath,
  mkdtemp,
  readFile,
  readdir,
  readlink,
  rm,
  rmdir,
  stat,
  unlink,
  writeFile,
} from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { invariant } from '../../core/errors.js';
import { CloneTargetError } from '../clone/errors.js';
import { volumeInfo } from '../clone/volume.js';
import {
  SfdiskTable,
  bootConfigFiles,
  dosDiskIdFromBytes,
  partUuidMap,
  partUuids,
  fatIdFromBytes,
  fsKind,
  mountable,
  parseBlkidExport,
  rewriteHosts,
  rewriteUuids,
  rootConfigFiles,
  spansOf,
  sshKeyType,
  uuidFromBytes,
  type VolumeSpan,
} from './text.js';

const execFileP = promisify(execFile);

export interface IdentityLimits {
  commandTimeoutMs: number;
  /** e2fsck -f before tune2fs -U may read the whole filesystem. */
  fsckTimeoutMs: number;
  /** ssh-keygen for one key (RSA 3072 on a slow machine). */
  keygenTimeoutMs: number;
  volumesMax: number;
  symlinkHopsMax: number;
  /** Configuration files larger than this are not rewritten (they are not configuration). */
  configFileMaxBytes: number;
  /** Exclusive-open attempts on a block device target before calling it busy. */
  busyAttemptsMax: number;
  busyRetryDelayMs: number;
}

export const defaultIdentityLimits: IdentityLimits = {
  commandTimeoutMs: 60_000,
  fsckTimeoutMs: 30 * 60_000,
  keygenTimeoutMs: 60_000,
  volumesMax: 128,
  symlinkHopsMax: 40,
  configFileMaxBytes: 4 * 1024 * 1024,
  busyAttemptsMax: 10,
  busyRetryDelayMs: 200,
};

export interface IdentityOptions {
  target: string;
  /** New host name for /etc/hostname and /etc/hosts; null keeps the copied one. */
  hostname: string | null;
  /** Give every filesystem whose type allows it a new UUID. */
  newUuids: boolean;
  /** Empty /etc/machine-id and new SSH host keys. */
  resetIdentity: boolean;
  log: (msg: string) => void;
  limits?: IdentityLimits;
}

export interface VolumeReport {
  /** Partition number; 0 for a disk that is one filesystem. */
  index: number;
  type: string | null;
  uuid: string | null;
  newUuid: string | null;
  /** root: has /etc; boot: has grub, loader or EFI at its top; swap; data; none: no filesystem. */
  role: 'root' | 'boot' | 'swap' | 'data' | 'none';
  mounted: boolean;
  notes: string[];
}

export interface IdentityReport {
  target: string;
  /** The partition table's identifiers (dos disk id or gpt disk GUID), changed with --new-uuids. */
  disk: { label: string; id: string | null; newId: string | null } | null;
  volumes: VolumeReport[];
  /** Files rewritten or reset, as "pN:path". */
  changedFiles: string[];
  /** Skips and things left to the first boot (not errors). */
  messages: string[];
  /** Things asked for that failed. The data is intact either way. */
  problems: string[];
}

async function run(cmd: string, args: string[], timeoutMs: number): Promise<string> {
  try {
    const { stdout } = await execFileP(cmd, args, { timeout: timeoutMs, maxBuffer: 16 * 1024 * 1024 });
    return stdout;
  } catch (err) {
    const e = err as { stderr?: string; message: string; code?: unknown };
    const why = String(e.stderr ?? '').trim() || e.message;
    throw new Error(`${cmd} ${args.join(' ')}: ${why.split('\n').slice(0, 3).join(' / ')}`, {
      cause: err,
    });
  }
}

const toolDirs = ['/usr/local/sbin', '/usr/local/bin', '/usr/sbin', '/usr/bin', '/sbin', '/bin'];
const toolCache = new Map<string, boolean>();

export async function haveTool(name: string): Promise<boolean> {
  const cached = toolCache.get(name);
  if (cached !== undefined) return cached;
  const dirs = [...(process.env.PATH ?? '').split(':').filter(Boolean), ...toolDirs];
  let found = false;
  for (const d of dirs) {
    try {
      await access(join(d, name), fsc.X_OK);
      found = true;
      break;
    } catch {
      // not here
    }
  }
  toolCache.set(name, found);
  return found;
}

/** A path inside a mounted root, symlinks resolved as if ROOT were `/` (never leaving it). */
export async function resolveInRoot(
  root: string,
  rel: string,
  hopsMax: number,
): Promise<{ path: string; exists: boolean } | null> {
  const parts = rel.split('/').filter(Boolean);
  let cur: string[] = [];
  let hops = 0;
  while (parts.length > 0) {
    const p = parts.shift()!;
    if (p === '.') continue;
    if (p === '..') {
      cur.pop();
      continue;
    }
    const abs = join(root, ...cur, p);
    let st;
    try {
      st = await lstat(abs);
    } catch {
      return parts.length === 0 ? { path: abs, exists: false } : null;
    }
    if (st.isSymbolicLink()) {
      if (++hops > hopsMax) return null;
      const to = await readlink(abs);
      if (to.startsWith('/')) cur = [];
      parts.unshift(...to.split('/').filter(Boolean));
      continue;
    }
    cur.push(p);
  }
  return { path: join(root, ...cur), exists: true };
}

/** Patterns of rootConfigFiles/bootConfigFiles: at most one `*` component. */
async function expandInRoot(root: string, pattern: string, hopsMax: number): Promise<string[]> {
  const parts = pattern.split('/');
  const star = parts.findIndex((p) => p.includes('*'));
  if (star < 0) {
    const r = await resolveInRoot(root, pattern, hopsMax);
    return r?.exists ? [pattern] : [];
  }
  const dir = parts.slice(0, star).join('/');
  const r = await resolveInRoot(root, dir, hopsMax);
  if (!r?.exists) return [];
  let names: string[];
  try {
    names = (await readdir(r.path)).sort();
  } catch {
    return [];
  }
  const re = new RegExp(`^${parts[star]!.replace(/[.]/g, '\\.').replace(/\*/g, '.*')}$`);
  const out: string[] = [];
  for (const n of names.filter((x) => re.test(x)))
    out.push(...(await expandInRoot(root, [dir, n, ...parts.slice(star + 1)].join('/'), hopsMax)));
  return out;
}

interface Attached {
  span: VolumeSpan;
  loop: string;
  report: VolumeReport;
  mountDir: string | null;
}

async function isMounted(target: string, l: IdentityLimits): Promise<string | null> {
  const dev = await realpath(target);
  // The kernel refuses an exclusive open of a disk that is mounted or has a mounted partition.
  // A receiver that just finished may still be closing its own exclusive handle: retry a little.
  for (let i = 0; ; i++) {
    try {
      const fh = await open(dev, fsc.O_RDONLY | fsc.O_EXCL);
      await fh.close();
      break;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EBUSY') break;
      if (i + 1 >= l.busyAttemptsMax) return `${dev} is busy (mounted or held open)`;
      await new Promise((r) => setTimeout(r, l.busyRetryDelayMs));
    }
  }
  let mounts: string;
  try {
    mounts = await readFile('/proc/self/mounts', 'utf8');
  } catch {
    return null;
  }
  // sda -> sda1; loop1, nvme0n1 -> loop1p1, nvme0n1p1 (never loop12).
  const part = /\d$/.test(dev) ? '(p\\d+)?' : '(\\d+)?';
  const re = new RegExp(`^${dev.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}${part}$`);
  for (const line of mounts.split('\n')) {
    const [d, dir] = line.split(' ');
    if (d && re.test(d)) return `${d} on ${dir}`;
  }
  return null;
}

/** An image file attached to a loop device may be in use (mounted through it). */
async function loopAttached(file: string, l: IdentityLimits): Promise<string | null> {
  const out = await run('losetup', ['--associated', file], l.commandTimeoutMs).catch(() => '');
  const first = out.trim().split('\n')[0];
  return first ? `attached: ${first}` : null;
}

async function probe(dev: string, l: IdentityLimits): Promise<Record<string, string>> {
  try {
    return parseBlkidExport(await run('blkid', ['-p', '-o', 'export', dev], l.commandTimeoutMs));
  } catch {
    return {}; // blkid exits 2 when it recognises nothing
  }
}

export class IdentityStep {
  private readonly o: IdentityOptions;
  private readonly l: IdentityLimits;
  private readonly report: IdentityReport;
  private readonly attached: Attached[] = [];
  /** Old UUID -> new UUID, for every filesystem that got a new one. */
  private readonly uuidMap = new Map<string, string>();
  private table: SfdiskTable | null = null;

  constructor(o: IdentityOptions) {
    this.o = o;
    this.l = o.limits ?? defaultIdentityLimits;
    this.report = {
      target: o.target,
      disk: null,
      volumes: [],
      changedFiles: [],
      messages: [],
      problems: [],
    };
  }

  private note(msg: string): void {
    this.report.messages.push(msg);
    this.o.log(msg);
  }

  private problem(msg: string): void {
    this.report.problems.push(msg);
    this.o.log(`PROBLEM: ${msg}`);
  }

  async run(): Promise<IdentityReport> {
    const info = await volumeInfo(this.o.target);
    if (info.sizeBytes === null)
      throw new CloneTargetError(
        `--target ${this.o.target}`,
        'does not exist',
        'give the cloned image or disk',
      );
    const busy = info.isBlockDevice
      ? await isMounted(this.o.target, this.l)
      : await loopAttached(this.o.target, this.l);
    if (busy)
      throw new CloneTargetError(
        `--target ${this.o.target}`,
        `is in use (${busy})`,
        'unmount it first: the identity step changes filesystems that must not be in use',
      );
    if (process.getuid?.() !== 0) {
      const msg = 'identity: needs root (loop devices, mount): not done; run `corral clone identity` as root';
      // Only the default machine-id/host-key reset may pass quietly; an explicit request is a problem.
      if (this.o.newUuids || this.o.hostname) this.problem(msg);
      else this.note(msg);
      return this.report;
    }
    for (const tool of ['losetup', 'blkid', 'mount', 'umount'])
      if (!(await haveTool(tool))) {
        this.note(`identity: skipped, ${tool} is not installed (util-linux/mount)`);
        return this.report;
      }
    if (info.isBlockDevice) await this.flush(this.o.target);
    const spans = await this.spans(info.sizeBytes);
    if (spans.length === 0) return this.report;
    try {
      if (this.o.newUuids && this.table) await this.newTableIds(this.table);
      for (const span of spans) await this.attach(span);
      if (this.o.newUuids) for (const a of this.attached) await this.newUuid(a);
      for (const a of this.attached) await this.mount(a);
      for (const a of this.attached) if (a.mountDir) await this.rewriteConfig(a);
      const roots = this.attached.filter((a) => a.report.role === 'root');
      if (this.o.resetIdentity || this.o.hostname)
        if (roots.length === 0)
          this.note(
            'identity: no mountable root filesystem (one with /etc) was found: machine-id, SSH host keys and host name left as they are',
          );
      for (const a of roots) await this.resetRoot(a);
    } catch (err) {
      // Whatever went wrong, the cloned data is there: report, undo mounts and loops, carry on.
      this.problem(`identity step stopped: ${(err as Error).message}`);
    } finally {
      await this.teardown();
      if (info.isBlockDevice) {
        // The kernel's view of the partitions (and their caches) after the table and UUIDs changed.
        await run('partx', ['-u', this.o.target], this.l.commandTimeoutMs).catch(() => undefined);
        await this.flush(this.o.target);
      }
    }
    return this.report;
  }

  private async flush(dev: string): Promise<void> {
    await run('blockdev', ['--flushbufs', dev], this.l.commandTimeoutMs).catch(() => undefined);
  }

  /** The byte spans to look at: the partitions of a table, or the whole target as one filesystem. */
  private async spans(sizeBytes: number): Promise<VolumeSpan[]> {
    const whole = await probe(this.o.target, this.l);
    if (whole.PTTYPE) {
      let table: SfdiskTable;
      try {
        table = SfdiskTable.parse(
          JSON.parse(await run('sfdisk', ['--json', this.o.target], this.l.commandTimeoutMs)),
        );
      } catch (err) {
        this.note(
          `identity: skipped, cannot read the ${whole.PTTYPE} partition table: ${(err as Error).message}`,
        );
        return [];
      }
      this.table = table;
      this.report.disk = {
        label: table.partitiontable.label,
        id: table.partitiontable.id ?? null,
        newId: null,
      };
      const spans = spansOf(table).filter((s) => s.offsetBytes + s.sizeBytes <= sizeBytes);
      invariant(spans.length <= this.l.volumesMax, `more than ${this.l.volumesMax} partitions`);
      if (spans.length === 0) this.note('identity: skipped, the partition table has no partitions');
      return spans;
    }
    if (whole.TYPE) return [{ index: 0, offsetBytes: 0, sizeBytes }];
    this.note('identity: skipped, no partition table and no filesystem recognised on the target');
    return [];
  }

  /** New dos disk id or gpt disk and partition GUIDs: the PARTUUIDs every clone would share. */
  private async newTableIds(before: SfdiskTable): Promise<void> {
    try {
      await this.newTableIdsOrThrow(before);
    } catch (err) {
      this.problem(`partition table: could not set new identifiers: ${(err as Error).message}`);
    }
  }

  private async newTableIdsOrThrow(before: SfdiskTable): Promise<void> {
    const t = before.partitiontable;
    const target = this.o.target;
    const ms = this.l.commandTimeoutMs;
    if (t.label === 'dos') await run('sfdisk', ['--disk-id', target, dosDiskIdFromBytes(randomBytes(4))], ms);
    else if (t.label === 'gpt') {
      await run('sfdisk', ['--disk-id', target, uuidFromBytes(randomBytes(16)).toUpperCase()], ms);
      for (const n of partUuids(before).keys())
        await run(
          'sfdisk',
          ['--part-uuid', target, String(n), uuidFromBytes(randomBytes(16)).toUpperCase()],
          ms,
        );
    } else {
      this.note(`identity: ${t.label} partition table: its identifiers are left as they are`);
      return;
    }
    // Read the table back: only changes that really happened are mapped.
    const after = SfdiskTable.parse(JSON.parse(await run('sfdisk', ['--json', target], ms)));
    const map = partUuidMap(before, after);
    const newId = after.partitiontable.id ?? null;
    if (newId === t.id || map.size !== partUuids(before).size) {
      this.problem(`partition table: asked for new identifiers, sfdisk now reports disk id ${newId}`);
      return;
    }
    for (const [o, n] of map) this.uuidMap.set(o, n);
    this.report.disk = { label: t.label, id: t.id ?? null, newId };
    this.o.log(
      `identity: ${t.label} partition table: disk id ${t.id} -> ${newId}; ${map.size} new PARTUUIDs`,
    );
  }

  private where(a: { span: VolumeSpan }): string {
    return a.span.index === 0 ? 'filesystem' : `partition ${a.span.index}`;
  }

  private async attach(span: VolumeSpan): Promise<void> {
    const args = ['--find', '--show'];
    if (span.index !== 0)
      args.push('--offset', String(span.offsetBytes), '--sizelimit', String(span.sizeBytes));
    const loop = (await run('losetup', [...args, this.o.target], this.l.commandTimeoutMs)).trim();
    invariant(loop.startsWith('/dev/'), `losetup printed '${loop}'`);
    const report: VolumeReport = {
      index: span.index,
      type: null,
      uuid: null,
      newUuid: null,
      role: 'none',
      mounted: false,
      notes: [],
    };
    const a: Attached = { span, loop, report, mountDir: null };
    this.attached.push(a);
    this.report.volumes.push(report);
    const b = await probe(loop, this.l);
    report.type = b.TYPE ?? null;
    report.uuid = b.UUID ?? null;
    if (!report.type) {
      this.note(`identity: ${this.where(a)}: no filesystem recognised, left as is`);
      report.notes.push('no filesystem recognised');
    } else if (report.type === 'swap') report.role = 'swap';
    else report.role = 'data';
  }

  private async newUuid(a: Attached): Promise<void> {
    const r = a.report;
    if (!r.type) return;
    const kind = fsKind(r.type);
    const w = `${this.where(a)} (${r.type})`;
    let want: string;
    try {
      switch (kind) {
        case 'ext':
          want = uuidFromBytes(randomBytes(16));
          await this.tune2fs(a.loop, want);
          break;
        case 'swap':
          want = uuidFromBytes(randomBytes(16));
          await run('swaplabel', ['-U', want, a.loop], this.l.commandTimeoutMs);
          break;
        case 'xfs':
          if (!(await haveTool('xfs_admin')))
            return this.skipUuid(a, `${w}: UUID kept, xfsprogs is not installed`);
          want = uuidFromBytes(randomBytes(16));
          await run('xfs_admin', ['-U', want, a.loop], this.l.fsckTimeoutMs);
          break;
        case 'vfat': {
          if (!(await haveTool('fatlabel')))
            return this.skipUuid(a, `${w}: volume id kept, fatlabel (dosfstools) is not installed`);
          const id = fatIdFromBytes(randomBytes(4));
          want = id.shown;
          await run('fatlabel', ['--volume-id', a.loop, id.arg], this.l.commandTimeoutMs);
          break;
        }
        case 'other':
          return this.skipUuid(a, `${w}: UUID kept, corral cannot change the UUID of ${r.type}`);
      }
    } catch (err) {
      this.problem(`${w}: could not set a new UUID: ${(err as Error).message}`);
      return;
    }
    // Read it back: the table of references is only rewritten for a change that really happened.
    const after = (await probe(a.loop, this.l)).UUID ?? null;
    if (after?.toLowerCase() !== want.toLowerCase()) {
      this.problem(`${w}: asked for UUID ${want}, blkid now reports ${after ?? 'none'}`);
      return;
    }
    if (r.uuid) this.uuidMap.set(r.uuid, after);
    r.newUuid = after;
    this.o.log(`identity: ${w}: UUID ${r.uuid ?? '(none)'} -> ${after}`);
  }

  private skipUuid(a: Attached, msg: string): void {
    a.report.notes.push(msg);
    this.note(`identity: ${msg}`);
  }

  private async tune2fs(dev: string, uuid: string): Promise<void> {
    try {
      await run('tune2fs', ['-U', uuid, dev], this.l.commandTimeoutMs);
    } catch {
      // tune2fs wants a freshly checked filesystem to rewrite metadata checksums: check, then retry.
      try {
        await execFileP('e2fsck', ['-f', '-p', dev], { timeout: this.l.fsckTimeoutMs });
      } catch (err) {
        // e2fsck -p exits 1 or 2 when it fixed something: fine; 4 and above are real trouble.
        const e = err as { code?: unknown; stderr?: string; message: string };
        if (typeof e.code !== 'number' || e.code >= 4)
          throw new Error(`e2fsck -f -p ${dev}: ${String(e.stderr ?? '').trim() || e.message}`, {
            cause: err,
          });
      }
      await run('tune2fs', ['-U', uuid, dev], this.l.commandTimeoutMs);
    }
  }

  private async mount(a: Attached): Promise<void> {
    const r = a.report;
    if (!mountable(r.type ?? undefined)) return;
    const dir = await mkdtemp(join(tmpdir(), 'corral-identity-'));
    const opts = ['nodev', 'nosuid', 'noexec', ...(r.type === 'xfs' ? ['nouuid'] : [])];
    try {
      await run('mount', ['-t', r.type!, '-o', opts.join(','), a.loop, dir], this.l.commandTimeoutMs);
    } catch (err) {
      await rmdir(dir).catch(() => undefined);
      const msg = `${this.where(a)} (${r.type}): cannot mount, the files on it are left as they are (${(err as Error).message})`;
      r.notes.push('not mountable');
      this.note(`identity: ${msg}`);
      return;
    }
    a.mountDir = dir;
    r.mounted = true;
    const has = async (p: string) => (await resolveInRoot(dir, p, this.l.symlinkHopsMax))?.exists === true;
    if (
      (await has('etc')) &&
      ((await has('etc/fstab')) || (await has('etc/os-release')) || (await has('etc/hostname')))
    )
      r.role = 'root';
    else if ((await has('grub')) || (await has('grub2')) || (await has('loader')) || (await has('EFI')))
      r.role = 'boot';
  }

  private async rewriteConfig(a: Attached): Promise<void> {
    if (this.uuidMap.size === 0) return;
    const patterns =
      a.report.role === 'root' ? rootConfigFiles : a.report.role === 'boot' ? bootConfigFiles : [];
    for (const pat of patterns)
      for (const rel of await expandInRoot(a.mountDir!, pat, this.l.symlinkHopsMax)) {
        const p = await resolveInRoot(a.mountDir!, rel, this.l.symlinkHopsMax);
        if (!p?.exists) continue;
        const st = await stat(p.path);
        if (!st.isFile() || st.size > this.l.configFileMaxBytes) continue;
        const text = await readFile(p.path, 'utf8');
        const r = rewriteUuids(text, this.uuidMap);
        if (r.count === 0) continue;
        await writeFile(p.path, r.text);
        this.changed(a, rel, `${r.count} UUID reference${r.count === 1 ? '' : 's'} updated`);
      }
  }

  private changed(a: Attached, rel: string, what: string): void {
    this.report.changedFiles.push(`p${a.span.index}:${rel}`);
    this.o.log(`identity: ${this.where(a)}: /${rel}: ${what}`);
  }

  private async resetRoot(a: Attached): Promise<void> {
    const root = a.mountDir!;
    const hops = this.l.symlinkHopsMax;
    if (this.o.resetIdentity) {
      const mid = await resolveInRoot(root, 'etc/machine-id', hops);
      if (mid?.exists) {
        await writeFile(mid.path, '');
        this.changed(a, 'etc/machine-id', 'emptied (a new id is made on first boot)');
      } else this.note(`identity: ${this.where(a)}: no /etc/machine-id (systemd makes one on first boot)`);
      const dbus = await resolveInRoot(root, 'var/lib/dbus', hops);
      if (dbus?.exists) {
        const p = join(dbus.path, 'machine-id');
        const st = await lstat(p).catch(() => null);
        if (st?.isFile()) {
          await unlink(p);
          this.changed(a, 'var/lib/dbus/machine-id', 'removed (a copy of the old machine id)');
        }
      }
      await this.resetSshKeys(a);
    }
    if (this.o.hostname) await this.setHostname(a, this.o.hostname);
  }

  private async resetSshKeys(a: Attached): Promise<void> {
    const ssh = await resolveInRoot(a.mountDir!, 'etc/ssh', this.l.symlinkHopsMax);
    if (!ssh?.exists) return;
    const names = (await readdir(ssh.path)).filter((n) => n.startsWith('ssh_host_')).sort();
    if (names.length === 0) return;
    const types = names.map(sshKeyType).filter((t): t is string => t !== null);
    for (const n of names) await rm(join(ssh.path, n), { force: true });
    this.changed(a, 'etc/ssh', `removed ${names.length} host key files`);
    if (!(await haveTool('ssh-keygen'))) {
      this.note(
        `identity: ${this.where(a)}: ssh-keygen is not installed here: the clone has no SSH host keys until \`ssh-keygen -A\` runs on it`,
      );
      return;
    }
    const hn = await resolveInRoot(a.mountDir!, 'etc/hostname', this.l.symlinkHopsMax);
    const copied = hn?.exists ? (await readFile(hn.path, 'utf8').catch(() => '')).trim() : '';
    const host = this.o.hostname ?? (copied || 'localhost');
    for (const t of types) {
      try {
        await run(
          'ssh-keygen',
          ['-q', '-t', t, '-N', '', '-C', `root@${host}`, '-f', join(ssh.path, `ssh_host_${t}_key`)],
          this.l.keygenTimeoutMs,
        );
      } catch (err) {
        this.problem(`${this.where(a)}: ssh-keygen -t ${t}: ${(err as Error).message}`);
      }
    }
    if (types.length) this.changed(a, 'etc/ssh', `new host keys: ${types.join(', ')}`);
  }

  private async setHostname(a: Attached, name: string): Promise<void> {
    const hops = this.l.symlinkHopsMax;
    const hn = await resolveInRoot(a.mountDir!, 'etc/hostname', hops);
    if (!hn) {
      this.problem(`${this.where(a)}: /etc/hostname cannot be resolved inside the clone`);
      return;
    }
    const old = hn.exists ? (await readFile(hn.path, 'utf8')).trim() || null : null;
    await writeFile(hn.path, `${name}\n`);
    this.changed(a, 'etc/hostname', `${old ?? '(none)'} -> ${name}`);
    const hosts = await resolveInRoot(a.mountDir!, 'etc/hosts', hops);
    if (!hosts) return;
    const text = hosts.exists ? await readFile(hosts.path, 'utf8') : '127.0.0.1\tlocalhost\n';
    const next = rewriteHosts(text, old, name);
    if (next !== text) {
      await writeFile(hosts.path, next);
      this.changed(a, 'etc/hosts', `names ${name}`);
    }
  }

  private async teardown(): Promise<void> {
    for (const a of [...this.attached].reverse()) {
      const dir = a.mountDir;
      if (dir) {
        try {
          await run('umount', [dir], this.l.commandTimeoutMs);
          await rmdir(dir);
          a.mountDir = null;
        } catch (err) {
          this.problem(`${this.where(a)}: umount ${dir}: ${(err as Error).message}`);
          // A lazy unmount still lets the loop device go once nothing uses it.
          await run('umount', ['-l', dir], this.l.commandTimeoutMs).catch(() => undefined);
        }
      }
      try {
        await run('losetup', ['-d', a.loop], this.l.commandTimeoutMs);
      } catch (err) {
        this.problem(`${this.where(a)}: losetup -d ${a.loop}: ${(err as Error).message}`);
      }
    }
    this.attached.length = 0;
  }
}

export function resetIdentity(o: IdentityOptions): Promise<IdentityReport> {
  return new IdentityStep(o).run();
}
