// `corral pxe config|serve|receive-args`: network boot for cloning (issue 7). dnsmasq gives
// addresses (or only PXE answers, in proxy mode) and serves a menu: boot the local disk, or boot
// the clone receiver, whose kernel command line names the clone server, session and secret file.
import { readFile } from 'node:fs/promises';
import type { Command } from 'commander';
import { receiveArgsFromCmdline } from '../../provision/pxe/config.js';
import { layout, servePxe, writePxeConfig } from '../../provision/pxe/serve.js';
import { UsageError, action, exitCodes } from '../program.js';

interface ConfigOpts {
  dir: string;
  interface?: string;
  serverIp?: string;
  mode: string;
  range?: string;
  netmask: string;
  leaseTime: string;
  router?: string;
  default: string;
  menuTimeoutS: string;
  cloneServer?: string;
  session: string;
  secretFile: string;
  target: string;
  newUuids?: boolean;
  append?: string;
  kernel?: string;
  initrd?: string;
  syslinuxDir?: string;
}

function shellQuote(a: string): string {
  return /^[A-Za-z0-9._:/@%+,=-]+$/.test(a) ? a : `'${a.replace(/'/g, `'\\''`)}'`;
}

export function registerPxe(program: Command): void {
  const pxe = program
    .command('pxe')
    .description(
      'network boot (dnsmasq: DHCP or proxy-DHCP plus TFTP) into the clone receiver or the local disk',
    );

  pxe
    .command('config')
    .description(
      'write the dnsmasq configuration, TFTP tree and boot menus (local disk / clone receiver) into DIR',
    )
    .requiredOption('--dir <dir>', 'directory to write (dnsmasq.conf, tftp/, corral-pxe.json)')
    .requiredOption('--interface <if>', 'NIC on the boot network')
    .requiredOption('--server-ip <ip>', "this host's IPv4 address on that network (TFTP server)")
    .option(
      '--mode <dhcp|proxy>',
      'dhcp: hand out addresses; proxy: leave that to the existing DHCP server',
      'dhcp',
    )
    .option('--range <start-end>', 'dhcp mode: address pool, e.g. 10.0.0.100-10.0.0.199')
    .option('--netmask <mask>', 'netmask or prefix length of the boot network', '255.255.255.0')
    .option('--lease-time <t>', 'dhcp mode: lease time (seconds, or 30m, 12h, infinite)', '1h')
    .option('--router <ip>', 'dhcp mode: default gateway to hand out')
    .option('--default <local|clone>', 'menu entry booted when nobody chooses', 'local')
    .option('--menu-timeout-s <s>', 'seconds the menu waits before booting the default', '10')
    .option(
      '--clone-server <host[:port]>',
      'the `corral clone serve` the receiver joins (default SERVER-IP:7707)',
    )
    .option('--session <name>', 'clone session name', 'clone')
    .option(
      '--secret-file <path|url>',
      'where the receiver system finds the session secret',
      '/etc/corral/clone.secret',
    )
    .option('--target <dev>', 'disk the receiver overwrites', '/dev/sda')
    .option('--new-uuids', 'the receiver gives the clone new filesystem UUIDs')
    .option('--append <args>', 'extra kernel arguments for the receiver (e.g. console=ttyS0)')
    .option('--kernel <file>', 'receiver kernel, copied to tftp/corral/vmlinuz')
    .option('--initrd <file>', 'receiver initrd, copied to tftp/corral/initrd.img')
    .option(
      '--syslinux-dir <dir>',
      'where pxelinux.0 and ldlinux.c32 are (default: Debian pxelinux/syslinux-common)',
    )
    .action(
      action(async (o: ConfigOpts) => {
        if (!/^\d+$/.test(o.menuTimeoutS))
          throw new UsageError(`--menu-timeout-s ${o.menuTimeoutS}: expected whole seconds`);
        const { settings, notes } = await writePxeConfig({
          dir: o.dir,
          input: {
            mode: o.mode,
            interface: o.interface,
            serverIp: o.serverIp,
            netmask: o.netmask,
            range: o.range,
            leaseTime: o.leaseTime,
            router: o.router,
            defaultEntry: o.default,
            menuTimeoutS: Number(o.menuTimeoutS),
            cloneServer: o.cloneServer,
            session: o.session,
            secretFile: o.secretFile,
            target: o.target,
            newUuids: o.newUuids,
            append: o.append,
          },
          kernel: o.kernel,
          initrd: o.initrd,
          syslinuxDir: o.syslinuxDir,
        });
        const l = layout(o.dir);
        process.stdout.write(
          `pxe config: ${settings.mode} on ${settings.interface} (${settings.serverIp}${settings.rangeStart ? `, pool ${settings.rangeStart}-${settings.rangeEnd}` : ''}); default entry '${settings.defaultEntry}'\n` +
            `  ${l.conf}\n  ${l.tftpRoot}/pxelinux.cfg/default\n  ${l.tftpRoot}/corral/boot.ipxe\n` +
            `run: corral pxe serve --dir ${o.dir}\n`,
        );
        for (const n of notes) process.stderr.write(`pxe config: note: ${n}\n`);
      }),
    );

  pxe
    .command('serve')
    .description(
      'run dnsmasq with the configuration of `pxe config` in the foreground (log on stdout; Ctrl-C stops it)',
    )
    .requiredOption('--dir <dir>', 'the directory `corral pxe config` wrote')
    .option('--dnsmasq <path>', 'dnsmasq binary', '/usr/sbin/dnsmasq')
    .action(
      action(async (o: { dir: string; dnsmasq: string }) =>
        servePxe({
          dir: o.dir,
          dnsmasq: o.dnsmasq,
          out: process.stdout,
          log: (m) => process.stdout.write(`${m}\n`),
        }),
      ),
    );

  pxe
    .command('receive-args')
    .description(
      "print the `corral clone receive` arguments a PXE-booted receiver's kernel command line carries",
    )
    .option('--cmdline <file>', 'kernel command line to read', '/proc/cmdline')
    .action(
      action(async (o: { cmdline: string }) => {
        let text: string;
        try {
          text = await readFile(o.cmdline, 'utf8');
        } catch (err) {
          throw new UsageError(`--cmdline ${o.cmdline}: ${(err as Error).message}`);
        }
        const args = receiveArgsFromCmdline(text);
        if (!args) {
          process.stderr.write(
            `corral: ${o.cmdline}: no corral.clone.server= argument: not booted as a clone receiver\n`,
          );
          return exitCodes.problem;
        }
        process.stdout.write(`${args.map(shellQuote).join(' ')}\n`);
      }),
    );
}
