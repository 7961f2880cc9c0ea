// `corral pxe`, the pure part: validate the network boot settings and write the dnsmasq
// configuration (DHCP or proxy-DHCP plus TFTP), the pxelinux menu and the iPXE script with two
// entries: boot the local disk, or boot the clone receiver (kernel command line naming the clone
// server, session, secret file and target). Also the reverse: a receiver's kernel command line
// back into `corral clone receive` arguments. No I/O here.
import { CorralError } from '../../core/errors.js';

export class PxeConfigError extends CorralError {
  constructor(where: string, message: string, hint?: string) {
    super('CORRAL_PXE_CONFIG', `${where}: ${message}`, hint);
  }
}

export type PxeMode = 'dhcp' | 'proxy';

export interface PxeSettings {
  mode: PxeMode;
  interface: string;
  serverIp: string;
  netmask: string;
  /** DHCP mode only: the pool handed out. */
  rangeStart: string | null;
  rangeEnd: string | null;
  leaseTime: string;
  router: string | null;
  /** The menu entry chosen when nobody types: local disk (safe) or the clone receiver. */
  defaultEntry: 'local' | 'clone';
  menuTimeoutS: number;
  clone: {
    server: string;
    session: string;
    secretFile: string;
    target: string;
    newUuids: boolean;
    extraArgs: string[];
  };
}

export const pxeLimits = {
  menuTimeoutSMax: 3600,
  interfaceNameMaxChars: 15,
  extraArgsMax: 32,
} as const;

export function ipv4ToInt(ip: string): number | null {
  const m = /^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})$/.exec(ip);
  if (!m) return null;
  const parts = m.slice(1).map(Number);
  if (parts.some((p) => p > 255)) return null;
  if (m.slice(1).some((p) => p.length > 1 && p.startsWith('0'))) return null;
  return ((parts[0]! << 24) | (parts[1]! << 16) | (parts[2]! << 8) | parts[3]!) >>> 0;
}

export function intToIpv4(n: number): string {
  return [n >>> 24, (n >>> 16) & 255, (n >>> 8) & 255, n & 255].join('.');
}

/** A dotted netmask or a prefix length (/24 or 24) as a mask integer; null when not contiguous. */
export function parseNetmask(s: string): number | null {
  const prefix = /^\/?(\d{1,2})$/.exec(s);
  if (prefix) {
    const n = Number(prefix[1]);
    if (n < 1 || n > 30) return null;
    return (0xffffffff << (32 - n)) >>> 0;
  }
  const m = ipv4ToInt(s);
  if (m === null) return null;
  const inv = ~m >>> 0;
  // Contiguous: the inverted mask plus one is a power of two; at most /30 so hosts remain.
  if ((inv & (inv + 1)) !== 0 || inv < 3 || m === 0) return null;
  return m;
}

const ifaceRe = /^[A-Za-z0-9_.@-]+$/;
const sessionRe = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;
const leaseRe = /^(infinite|\d+[smhd]?)$/;
/** Values on a kernel command line: no spaces, no quotes (pxelinux and iPXE pass them verbatim). */
const argValueRe = /^[A-Za-z0-9._:/@%+,=\-[\]]+$/;

export interface PxeInput {
  mode?: string;
  interface?: string;
  serverIp?: string;
  netmask?: string;
  range?: string;
  leaseTime?: string;
  router?: string;
  defaultEntry?: string;
  menuTimeoutS?: number;
  cloneServer?: string;
  session?: string;
  secretFile?: string;
  target?: string;
  newUuids?: boolean;
  append?: string;
}

function ip(flag: string, v: string | undefined): number {
  if (v === undefined) throw new PxeConfigError(flag, 'is required');
  const n = ipv4ToInt(v);
  if (n === null) throw new PxeConfigError(`${flag} ${v}`, 'is not an IPv4 address (a.b.c.d)');
  return n;
}

/** Validates everything `pxe config` takes; every error names the flag and the fix. */
export function validatePxe(i: PxeInput): PxeSettings {
  const mode = i.mode ?? 'dhcp';
  if (mode !== 'dhcp' && mode !== 'proxy')
    throw new PxeConfigError(
      `--mode ${mode}`,
      'expected dhcp or proxy',
      'proxy leaves addresses to the existing DHCP server',
    );
  const iface = i.interface;
  if (!iface)
    throw new PxeConfigError('--interface', 'is required', 'the NIC on the boot network, e.g. eth1');
  if (iface.length > pxeLimits.interfaceNameMaxChars || !ifaceRe.test(iface))
    throw new PxeConfigError(
      `--interface ${iface}`,
      `is not an interface name (at most ${pxeLimits.interfaceNameMaxChars} letters, digits, . _ - @)`,
    );
  const server = ip('--server-ip', i.serverIp);
  const maskText = i.netmask ?? '255.255.255.0';
  const mask = parseNetmask(maskText);
  if (mask === null)
    throw new PxeConfigError(
      `--netmask ${maskText}`,
      'is not a netmask (255.255.255.0 or 24, from /1 to /30)',
    );
  const net = (server & mask) >>> 0;
  const bcast = (net | (~mask >>> 0)) >>> 0;
  const inNet = (n: number) => (n & mask) >>> 0 === net && n !== net && n !== bcast;
  if (!inNet(server))
    throw new PxeConfigError(
      `--server-ip ${i.serverIp}`,
      `is the network or broadcast address of ${intToIpv4(net)}/${maskText}`,
    );
  let rangeStart: string | null = null;
  let rangeEnd: string | null = null;
  if (mode === 'dhcp') {
    if (!i.range)
      throw new PxeConfigError('--range', 'is required in dhcp mode', 'e.g. --range 10.0.0.100-10.0.0.199');
    const parts = i.range.split(/[-,]/);
    if (parts.length !== 2)
      throw new PxeConfigError(`--range ${i.range}`, 'expected START-END, e.g. 10.0.0.100-10.0.0.199');
    const a = ip('--range start', parts[0]);
    const b = ip('--range end', parts[1]);
    if (a > b) throw new PxeConfigError(`--range ${i.range}`, 'starts after it ends');
    for (const [n, s] of [
      [a, parts[0]],
      [b, parts[1]],
    ] as const)
      if (!inNet(n))
        throw new PxeConfigError(
          `--range ${i.range}`,
          `${s} is not a host address of ${intToIpv4(net)}/${maskText} (the network of --server-ip)`,
        );
    if (server >= a && server <= b)
      throw new PxeConfigError(
        `--range ${i.range}`,
        `contains the server's own address ${i.serverIp}`,
        'give a pool that leaves out --server-ip',
      );
    rangeStart = intToIpv4(a);
    rangeEnd = intToIpv4(b);
  } else if (i.range)
    throw new PxeConfigError(`--range ${i.range}`, 'proxy mode hands out no addresses: drop --range');
  const leaseTime = i.leaseTime ?? '1h';
  if (!leaseRe.test(leaseTime))
    throw new PxeConfigError(
      `--lease-time ${leaseTime}`,
      'expected seconds or a number with s, m, h, d, or infinite',
    );
  let router: string | null = null;
  if (i.router !== undefined) {
    const r = ip('--router', i.router);
    if (!inNet(r))
      throw new PxeConfigError(`--router ${i.router}`, `is not on ${intToIpv4(net)}/${maskText}`);
    router = intToIpv4(r);
  }
  const defaultEntry = i.defaultEntry ?? 'local';
  if (defaultEntry !== 'local' && defaultEntry !== 'clone')
    throw new PxeConfigError(`--default ${defaultEntry}`, 'expected local or clone');
  const menuTimeoutS = i.menuTimeoutS ?? 10;
  if (!Number.isInteger(menuTimeoutS) || menuTimeoutS < 0 || menuTimeoutS > pxeLimits.menuTimeoutSMax)
    throw new PxeConfigError(
      `--menu-timeout-s ${menuTimeoutS}`,
      `expected whole seconds from 0 to ${pxeLimits.menuTimeoutSMax}`,
    );
  return {
    mode,
    interface: iface,
    serverIp: intToIpv4(server),
    netmask: intToIpv4(mask),
    rangeStart,
    rangeEnd,
    leaseTime,
    router,
    defaultEntry,
    menuTimeoutS,
    clone: validateClone(i, intToIpv4(server)),
  };
}

function validateClone(i: PxeInput, serverIp: string): PxeSettings['clone'] {
  const server = i.cloneServer ?? `${serverIp}:7707`;
  const m = /^([A-Za-z0-9.-]+)(?::(\d{1,5}))?$/.exec(server);
  if (!m || (m[2] !== undefined && (Number(m[2]) < 1 || Number(m[2]) > 65535)))
    throw new PxeConfigError(`--clone-server ${server}`, 'expected HOST[:PORT], e.g. 10.0.0.1:7707');
  const session = i.session ?? 'clone';
  if (!sessionRe.test(session))
    throw new PxeConfigError(`--session ${session}`, 'expected letters, digits, . _ - (at most 64)');
  const secretFile = i.secretFile ?? '/etc/corral/clone.secret';
  if (!argValueRe.test(secretFile) || !(secretFile.startsWith('/') || /^(https?|tftp):\/\//.test(secretFile)))
    throw new PxeConfigError(
      `--secret-file ${secretFile}`,
      'expected an absolute path in the receiver system, or an http(s):// or tftp:// URL, without spaces or quotes',
    );
  const target = i.target ?? '/dev/sda';
  if (!/^\/dev\/[A-Za-z0-9/._-]+$/.test(target))
    throw new PxeConfigError(`--target ${target}`, 'expected a device path such as /dev/sda or /dev/nvme0n1');
  const extraArgs = (i.append ?? '').split(/\s+/).filter(Boolean);
  if (extraArgs.length > pxeLimits.extraArgsMax)
    throw new PxeConfigError('--append', `more than ${pxeLimits.extraArgsMax} arguments`);
  for (const a of extraArgs)
    if (!argValueRe.test(a))
      throw new PxeConfigError(
        `--append ${a}`,
        'kernel arguments may not contain quotes or shell characters',
      );
  return { server, session, secretFile, target, newUuids: Boolean(i.newUuids), extraArgs };
}

/** Files under the TFTP root the menus point at. */
export const tftpPaths = {
  biosLoader: 'pxelinux.0',
  efiLoader: 'syslinux.efi',
  menu: 'pxelinux.cfg/default',
  ipxeScript: 'corral/boot.ipxe',
  kernel: 'corral/vmlinuz',
  initrd: 'corral/initrd.img',
} as const;

/** Parameters the receiver system reads back with `corral pxe receive-args`. */
export function receiverCmdline(s: PxeSettings): string {
  const c = s.clone;
  return [
    'ip=dhcp',
    `corral.clone.server=${c.server}`,
    `corral.clone.session=${c.session}`,
    `corral.clone.secret-file=${c.secretFile}`,
    `corral.clone.target=${c.target}`,
    ...(c.newUuids ? ['corral.clone.new-uuids'] : []),
    ...c.extraArgs,
  ].join(' ');
}

export function dnsmasqConf(s: PxeSettings, paths: { tftpRoot: string; leaseFile: string }): string {
  const lines = [
    '# Written by `corral pxe config`; run it with `corral pxe serve`. Edit the flags, not this file.',
    '# DNS off: only DHCP and TFTP.',
    'port=0',
    `interface=${s.interface}`,
    'bind-interfaces',
    'log-facility=-',
    'log-dhcp',
    `dhcp-leasefile=${paths.leaseFile}`,
    'enable-tftp',
    `tftp-root=${paths.tftpRoot}`,
    '# Clients: iPXE (option 175), x86-64 UEFI (architectures 7 and 9), else BIOS.',
    'dhcp-match=set:ipxe,175',
    'dhcp-match=set:efi64,option:client-arch,7',
    'dhcp-match=set:efi64,option:client-arch,9',
  ];
  if (s.mode === 'dhcp') {
    lines.push(
      `dhcp-range=${s.rangeStart},${s.rangeEnd},${s.netmask},${s.leaseTime}`,
      // dnsmasq would name itself the router: send none unless one is given.
      s.router ? `dhcp-option=option:router,${s.router}` : 'dhcp-option=option:router',
      `dhcp-boot=tag:ipxe,${tftpPaths.ipxeScript}`,
      `dhcp-boot=tag:!ipxe,tag:efi64,${tftpPaths.efiLoader}`,
      `dhcp-boot=tag:!ipxe,tag:!efi64,${tftpPaths.biosLoader}`,
    );
  } else {
    // Proxy DHCP: the existing server hands out addresses; dnsmasq only answers PXE clients.
    const net = intToIpv4((ipv4ToInt(s.serverIp)! & ipv4ToInt(s.netmask)!) >>> 0);
    lines.push(
      `dhcp-range=${net},proxy,${s.netmask}`,
      `dhcp-boot=tag:ipxe,${tftpPaths.ipxeScript}`,
      `pxe-service=tag:!ipxe,x86PC,"Corral network boot",${tftpPaths.biosLoader.replace(/\.0$/, '')}`,
      `pxe-service=tag:!ipxe,X86-64_EFI,"Corral network boot",${tftpPaths.efiLoader}`,
    );
  }
  return `${lines.join('\n')}\n`;
}

export function pxelinuxMenu(s: PxeSettings): string {
  const c = s.clone;
  return [
    '# Written by `corral pxe config`.',
    `DEFAULT ${s.defaultEntry}`,
    'PROMPT 1',
    // pxelinux counts tenths of a second; 0 waits for ever, so 0 s means "boot the default now".
    `TIMEOUT ${s.menuTimeoutS === 0 ? 1 : s.menuTimeoutS * 10}`,
    `SAY Corral network boot: 'local' boots the local disk, 'clone' ERASES ${c.target} and receives clone session '${c.session}' from ${c.server}.`,
    `SAY Default in ${s.menuTimeoutS} s: ${s.defaultEntry}.`,
    '',
    'LABEL local',
    '  MENU LABEL Boot from the local disk',
    '  LOCALBOOT 0',
    '',
    'LABEL clone',
    `  MENU LABEL Corral clone receiver (session ${c.session}, erases ${c.target})`,
    `  KERNEL ${tftpPaths.kernel}`,
    `  INITRD ${tftpPaths.initrd}`,
    `  APPEND ${receiverCmdline(s)}`,
    '',
  ].join('\n');
}

export function ipxeScript(s: PxeSettings): string {
  const c = s.clone;
  return [
    '#!ipxe',
    '# Written by `corral pxe config`.',
    'menu Corral network boot',
    'item local Boot from the local disk',
    `item clone Corral clone receiver (session ${c.session}, erases ${c.target})`,
    `choose --default ${s.defaultEntry} --timeout ${s.menuTimeoutS * 1000} entry || goto local`,
    'goto ${entry}',
    '',
    ':local',
    'sanboot --no-describe --drive 0x80 || exit',
    '',
    ':clone',
    `kernel tftp://${s.serverIp}/${tftpPaths.kernel} initrd=initrd.img ${receiverCmdline(s)}`,
    `initrd --name initrd.img tftp://${s.serverIp}/${tftpPaths.initrd}`,
    'boot',
    '',
  ].join('\n');
}

/**
 * A receiver's kernel command line (/proc/cmdline) as `corral clone receive` arguments; null when
 * it carries no clone server (the node booted something else).
 */
export function receiveArgsFromCmdline(cmdline: string): string[] | null {
  const kv = new Map<string, string | true>();
  for (const tok of cmdline.trim().split(/\s+/)) {
    if (!tok.startsWith('corral.clone.')) continue;
    const eq = tok.indexOf('=');
    if (eq < 0) kv.set(tok.slice('corral.clone.'.length), true);
    else kv.set(tok.slice('corral.clone.'.length, eq), tok.slice(eq + 1));
  }
  const server = kv.get('server');
  if (typeof server !== 'string' || server === '') return null;
  const args = ['--server', server];
  for (const k of ['session', 'secret-file', 'target', 'hostname'] as const) {
    const v = kv.get(k);
    if (typeof v === 'string' && v !== '') args.push(`--${k}`, v);
  }
  if (kv.get('new-uuids') === true) args.push('--new-uuids');
  return args;
}
