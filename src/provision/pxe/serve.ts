// `corral pxe config` writes DIR (dnsmasq.conf, the TFTP tree with the menus, the validated
// settings); `corral pxe serve` runs dnsmasq on it in the foreground, its log on our stdout, and
// stops it cleanly on SIGINT/SIGTERM.
import { spawn } from 'node:child_process';
import { constants as fsc, existsSync } from 'node:fs';
import { access, chmod, copyFile, mkdir, readFile, stat, writeFile } from 'node:fs/promises';
import { dirname, join, resolve } from 'node:path';
import { z } from 'zod';
import {
  PxeConfigError,
  dnsmasqConf,
  ipxeScript,
  pxelinuxMenu,
  tftpPaths,
  validatePxe,
  type PxeInput,
  type PxeSettings,
} from './config.js';

export const pxeServeLimits = {
  /** dnsmasq gets this long to exit after SIGTERM before SIGKILL. */
  stopTimeoutMs: 5000,
  testTimeoutMs: 10_000,
} as const;

/** Where pxelinux.0 and its modules live when Debian's pxelinux and syslinux-common are installed. */
const syslinuxSearch = [
  { file: 'pxelinux.0', dirs: ['/usr/lib/PXELINUX', '/usr/share/syslinux', '/usr/lib/syslinux'] },
  {
    file: 'ldlinux.c32',
    dirs: ['/usr/lib/syslinux/modules/bios', '/usr/share/syslinux', '/usr/lib/syslinux'],
  },
  {
    file: 'syslinux.efi',
    dirs: ['/usr/lib/SYSLINUX.EFI/efi64', '/usr/share/syslinux/efi64'],
  },
  {
    file: 'ldlinux.e64',
    dirs: ['/usr/lib/syslinux/modules/efi64', '/usr/share/syslinux/efi64'],
  },
];

export const layout = (dir: string) => ({
  conf: join(dir, 'dnsmasq.conf'),
  settings: join(dir, 'corral-pxe.json'),
  tftpRoot: join(dir, 'tftp'),
  leaseFile: join(dir, 'dnsmasq.leases'),
});

export interface WriteOptions {
  dir: string;
  input: PxeInput;
  kernel?: string;
  initrd?: string;
  /** Where pxelinux.0 and ldlinux.c32 come from (default: Debian's locations). */
  syslinuxDir?: string;
}

async function copyInto(from: string, to: string, flag: string): Promise<void> {
  try {
    await copyFile(from, to);
  } catch (err) {
    throw new PxeConfigError(`${flag} ${from}`, `cannot copy: ${(err as Error).message}`);
  }
  await chmod(to, 0o644);
}

/** Writes DIR; returns notes on what the operator still has to provide. */
export async function writePxeConfig(o: WriteOptions): Promise<{ settings: PxeSettings; notes: string[] }> {
  const settings = validatePxe(o.input);
  const dir = resolve(o.dir);
  const l = layout(dir);
  const notes: string[] = [];
  // dnsmasq serves TFTP as its own unprivileged user: the tree must be world-readable.
  for (const d of [dir, l.tftpRoot, join(l.tftpRoot, 'pxelinux.cfg'), join(l.tftpRoot, 'corral')]) {
    await mkdir(d, { recursive: true });
    await chmod(d, 0o755);
  }
  const write = async (path: string, text: string) => {
    await writeFile(path, text);
    await chmod(path, 0o644);
  };
  await write(l.conf, dnsmasqConf(settings, { tftpRoot: l.tftpRoot, leaseFile: l.leaseFile }));
  await write(join(l.tftpRoot, tftpPaths.menu), pxelinuxMenu(settings));
  await write(join(l.tftpRoot, tftpPaths.ipxeScript), ipxeScript(settings));
  await write(l.settings, `${JSON.stringify(settings, null, 2)}\n`);
  if (o.kernel) await copyInto(o.kernel, join(l.tftpRoot, tftpPaths.kernel), '--kernel');
  if (o.initrd) await copyInto(o.initrd, join(l.tftpRoot, tftpPaths.initrd), '--initrd');
  const noReceiver = [tftpPaths.kernel, tftpPaths.initrd].filter((p) => !existsSync(join(l.tftpRoot, p)));
  if (noReceiver.length)
    notes.push(
      `no ${noReceiver.join(', ')} yet: the 'clone' entry boots a receiver kernel and initrd (--kernel, --initrd) whose init runs \`corral clone receive $(corral pxe receive-args)\``,
    );
  const noLoader: string[] = [];
  for (const s of syslinuxSearch) {
    const dirs = o.syslinuxDir ? [o.syslinuxDir] : s.dirs;
    const from = dirs.map((d) => join(d, s.file)).find((p) => existsSync(p));
    if (from) await copyInto(from, join(l.tftpRoot, s.file), '--syslinux-dir');
    else if (!existsSync(join(l.tftpRoot, s.file))) noLoader.push(s.file);
  }
  if (noLoader.length)
    notes.push(
      `no ${noLoader.join(', ')} in the TFTP root: install Debian's pxelinux, syslinux-common and syslinux-efi, or give --syslinux-dir (or copy them into ${l.tftpRoot})`,
    );
  return { settings, notes };
}

const Settings = z.object({ interface: z.string(), serverIp: z.string(), mode: z.enum(['dhcp', 'proxy']) });

/** Every directory above the TFTP root must be searchable by dnsmasq's unprivileged user. */
async function checkReachable(tftpRoot: string): Promise<void> {
  for (let d = tftpRoot; ; d = dirname(d)) {
    const st = await stat(d);
    if ((st.mode & 0o001) === 0)
      throw new PxeConfigError(
        `--dir ${dirname(tftpRoot)}`,
        `${d} is mode ${(st.mode & 0o777).toString(8)}: dnsmasq's TFTP server (an unprivileged user) cannot reach ${tftpRoot}`,
        'keep the PXE directory under /srv or /var/lib, or chmod o+x the directories above it',
      );
    if (d === dirname(d)) return;
  }
}

export interface ServeOptions {
  dir: string;
  dnsmasq: string;
  out: NodeJS.WritableStream;
  log: (msg: string) => void;
}

/** Runs dnsmasq until it exits or we are told to stop; resolves with the exit code for corral. */
export async function servePxe(o: ServeOptions): Promise<number> {
  const l = layout(resolve(o.dir));
  let raw: string;
  try {
    raw = await readFile(l.settings, 'utf8');
  } catch {
    throw new PxeConfigError(
      `--dir ${o.dir}`,
      'has no corral-pxe.json',
      'run `corral pxe config --dir DIR ...` first',
    );
  }
  const s = Settings.parse(JSON.parse(raw));
  if (!existsSync(`/sys/class/net/${s.interface}`))
    throw new PxeConfigError(
      `interface ${s.interface}`,
      'does not exist on this host (see `ip link`)',
      'run `corral pxe config` again with the right --interface',
    );
  await checkReachable(l.tftpRoot);
  try {
    await access(o.dnsmasq, fsc.X_OK);
  } catch {
    throw new PxeConfigError(o.dnsmasq, 'dnsmasq is not installed', 'apt-get install dnsmasq-base');
  }
  await runOnce(o.dnsmasq, ['--test', `--conf-file=${l.conf}`]);
  const child = spawn(
    o.dnsmasq,
    // --conf-file alone: /etc/dnsmasq.conf is not read; --pid-file without a value: no pid file.
    ['--keep-in-foreground', `--conf-file=${l.conf}`, '--pid-file'],
    { stdio: ['ignore', 'pipe', 'pipe'] },
  );
  child.stdout.pipe(o.out, { end: false });
  child.stderr.pipe(o.out, { end: false });
  o.log(
    `pxe serve: dnsmasq ${child.pid} on ${s.interface} (${s.mode}, ${s.serverIp}), TFTP root ${l.tftpRoot}`,
  );
  let stopping: NodeJS.Signals | null = null;
  let killTimer: NodeJS.Timeout | null = null;
  const stop = (sig: NodeJS.Signals) => {
    if (stopping) return;
    stopping = sig;
    o.log(`pxe serve: ${sig}: stopping dnsmasq`);
    child.kill('SIGTERM');
    killTimer = setTimeout(() => child.kill('SIGKILL'), pxeServeLimits.stopTimeoutMs);
  };
  const onInt = () => stop('SIGINT');
  const onTerm = () => stop('SIGTERM');
  process.on('SIGINT', onInt);
  process.on('SIGTERM', onTerm);
  try {
    const [code, signal] = await new Promise<[number | null, NodeJS.Signals | null]>((res, rej) => {
      child.once('error', rej);
      child.once('exit', (c, sg) => res([c, sg]));
    });
    if (stopping) {
      o.log('pxe serve: dnsmasq stopped');
      return 0;
    }
    o.log(`pxe serve: dnsmasq exited by itself (${signal ?? `code ${code}`})`);
    return 1;
  } finally {
    if (killTimer) clearTimeout(killTimer);
    process.removeListener('SIGINT', onInt);
    process.removeListener('SIGTERM', onTerm);
  }
}

function runOnce(cmd: string, args: string[]): Promise<void> {
  return new Promise((res, rej) => {
    const child = spawn(cmd, args, {
      stdio: ['ignore', 'pipe', 'pipe'],
      timeout: pxeServeLimits.testTimeoutMs,
    });
    let out = '';
    child.stdout.on('data', (d: Buffer) => (out += d.toString()));
    child.stderr.on('data', (d: Buffer) => (out += d.toString()));
    child.once('error', rej);
    child.once('exit', (code) =>
      code === 0
        ? res()
        : rej(new PxeConfigError(`${cmd} ${args.join(' ')}`, `rejects the configuration: ${out.trim()}`)),
    );
  });
}
