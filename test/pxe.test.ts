// corral pxe: input validation and generated files (unit); then real dnsmasq run by `corral pxe
// serve` in one network namespace, busybox's DHCP client (udhcpc) in another gets a lease with the
// boot file, curl fetches the menus over TFTP, and SIGTERM stops dnsmasq. Namespaces are always
// removed (test/helpers/netns.ts); skipped with the reason without root, dnsmasq or udhcpc.
import { after, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { chmodSync, existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import {
  PxeConfigError,
  dnsmasqConf,
  pxelinuxMenu,
  receiveArgsFromCmdline,
  receiverCmdline,
  validatePxe,
  type PxeInput,
} from '../src/provision/pxe/config.js';
import { corral, exitWithin, killAll, type Proc } from '../src/provision/clone/testing.js';
import { createNetnsLab, netnsUnavailable, type NetnsLab } from './helpers/netns.js';

const dir = mkdtempSync(join(tmpdir(), 'corral-pxe-'));
// dnsmasq serves TFTP as its unprivileged user: the tree must be reachable.
chmodSync(dir, 0o755);
let lab: NetnsLab | null = null;
after(() => {
  killAll();
  lab?.destroy();
  rmSync(dir, { recursive: true, force: true });
});

const has = (cmd: string) => spawnSync('sh', ['-c', `command -v ${cmd}`]).status === 0;
const base: PxeInput = { interface: 'eth1', serverIp: '10.0.0.1', range: '10.0.0.100-10.0.0.199' };

function rejects(i: PxeInput, re: RegExp): void {
  assert.throws(
    () => validatePxe(i),
    (e: unknown) => e instanceof PxeConfigError && re.test(e.message),
  );
}

async function until(what: string, cond: () => boolean, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

describe('pxe settings and files', () => {
  test('bad input is refused with the flag and the reason', () => {
    rejects({ ...base, interface: undefined }, /^--interface: is required/);
    rejects({ ...base, interface: 'eth 1' }, /^--interface eth 1: is not an interface name/);
    rejects({ ...base, interface: 'averyveryverylongname' }, /at most 15/);
    rejects({ ...base, serverIp: '10.0.0.256' }, /^--server-ip 10\.0\.0\.256: is not an IPv4 address/);
    rejects({ ...base, serverIp: '10.0.0.0' }, /network or broadcast address/);
    rejects({ ...base, netmask: '255.0.255.0' }, /^--netmask 255\.0\.255\.0: is not a netmask/);
    rejects({ ...base, range: undefined }, /^--range: is required in dhcp mode/);
    rejects({ ...base, range: '10.0.0.150-10.0.0.100' }, /starts after it ends/);
    rejects({ ...base, range: '10.0.0.100-10.0.1.20' }, /10\.0\.1\.20 is not a host address of 10\.0\.0\.0/);
    rejects({ ...base, range: '10.0.0.1-10.0.0.20' }, /contains the server's own address 10\.0\.0\.1/);
    rejects({ ...base, range: '10.0.0.100-10.0.0.255' }, /10\.0\.0\.255 is not a host address/);
    rejects({ ...base, mode: 'proxy' }, /proxy mode hands out no addresses: drop --range/);
    rejects({ ...base, mode: 'relay' }, /^--mode relay: expected dhcp or proxy/);
    rejects({ ...base, router: '192.168.1.1' }, /^--router 192\.168\.1\.1: is not on 10\.0\.0\.0/);
    rejects({ ...base, leaseTime: 'forever' }, /^--lease-time forever/);
    rejects(
      { ...base, secretFile: 'relative/secret' },
      /^--secret-file relative\/secret: expected an absolute path/,
    );
    rejects({ ...base, target: 'sda' }, /^--target sda: expected a device path/);
    rejects({ ...base, session: 'no spaces' }, /^--session no spaces/);
    rejects({ ...base, append: 'console=ttyS0 "quoted"' }, /^--append "quoted"/);
    rejects({ ...base, cloneServer: 'host:99999' }, /^--clone-server host:99999/);
    assert.equal(validatePxe({ ...base, netmask: '/16', range: '10.0.5.1-10.0.5.9' }).netmask, '255.255.0.0');
  });

  test('dhcp and proxy configurations, menus, and the receiver command line round trip', () => {
    const s = validatePxe({
      ...base,
      router: '10.0.0.254',
      session: 'lab',
      target: '/dev/nvme0n1',
      newUuids: true,
      append: 'console=ttyS0',
    });
    const conf = dnsmasqConf(s, { tftpRoot: '/srv/pxe/tftp', leaseFile: '/srv/pxe/leases' });
    assert.match(conf, /^port=0$/m);
    assert.match(conf, /^interface=eth1$/m);
    assert.match(conf, /^dhcp-range=10\.0\.0\.100,10\.0\.0\.199,255\.255\.255\.0,1h$/m);
    assert.match(conf, /^dhcp-option=option:router,10\.0\.0\.254$/m);
    assert.match(
      dnsmasqConf(validatePxe(base), { tftpRoot: '/t', leaseFile: '/l' }),
      /^dhcp-option=option:router$/m,
    );
    assert.match(conf, /^dhcp-boot=tag:!ipxe,tag:!efi64,pxelinux\.0$/m);
    assert.match(conf, /^tftp-root=\/srv\/pxe\/tftp$/m);
    const proxy = dnsmasqConf(validatePxe({ ...base, mode: 'proxy', range: undefined }), {
      tftpRoot: '/t',
      leaseFile: '/l',
    });
    assert.match(proxy, /^dhcp-range=10\.0\.0\.0,proxy,255\.255\.255\.0$/m);
    assert.match(proxy, /^pxe-service=tag:!ipxe,x86PC,"Corral network boot",pxelinux$/m);
    const menu = pxelinuxMenu(s);
    assert.match(menu, /^DEFAULT local$/m);
    assert.match(menu, /^LABEL local\n {2}MENU LABEL .*\n {2}LOCALBOOT 0$/m);
    assert.match(
      menu,
      /^ {2}APPEND ip=dhcp corral\.clone\.server=10\.0\.0\.1:7707 corral\.clone\.session=lab corral\.clone\.secret-file=\/etc\/corral\/clone\.secret corral\.clone\.target=\/dev\/nvme0n1 corral\.clone\.new-uuids console=ttyS0$/m,
    );
    assert.deepEqual(receiveArgsFromCmdline(`BOOT_IMAGE=corral/vmlinuz ${receiverCmdline(s)} quiet`), [
      '--server',
      '10.0.0.1:7707',
      '--session',
      'lab',
      '--secret-file',
      '/etc/corral/clone.secret',
      '--target',
      '/dev/nvme0n1',
      '--new-uuids',
    ]);
    assert.equal(receiveArgsFromCmdline('BOOT_IMAGE=/vmlinuz root=/dev/sda1 ro'), null);
  });

  test('pxe config writes files dnsmasq accepts; bad input exits 2 or 1 with the reason', async (t) => {
    const d = join(dir, 'cfg');
    const p = corral([
      'pxe',
      'config',
      '--dir',
      d,
      '--interface',
      'eth1',
      '--server-ip',
      '10.0.0.1',
      '--range',
      '10.0.0.100-10.0.0.199',
    ]);
    assert.equal(await exitWithin(p, 30_000), 0, p.stderr());
    for (const f of ['dnsmasq.conf', 'corral-pxe.json', 'tftp/pxelinux.cfg/default', 'tftp/corral/boot.ipxe'])
      assert.ok(existsSync(join(d, f)), f);
    assert.match(p.stderr(), /note: no corral\/vmlinuz, corral\/initrd\.img yet/);
    const bad = corral([
      'pxe',
      'config',
      '--dir',
      join(dir, 'bad'),
      '--interface',
      'eth1',
      '--server-ip',
      '10.0.0.1',
      '--range',
      '10.0.0.1-10.0.0.9',
    ]);
    assert.equal(await exitWithin(bad, 30_000), 1);
    assert.match(bad.stderr(), /--range 10\.0\.0\.1-10\.0\.0\.9: contains the server's own address/);
    assert.ok(!existsSync(join(dir, 'bad')), 'nothing written on bad input');
    const usage = corral(['pxe', 'config', '--dir', join(dir, 'bad'), '--interface', 'eth1']);
    assert.equal(await exitWithin(usage, 30_000), 2);
    assert.match(usage.stderr(), /--server-ip/);
    if (!has('dnsmasq')) return t.skip('dnsmasq not installed: syntax check skipped');
    execFileSync('dnsmasq', ['--test', `--conf-file=${join(d, 'dnsmasq.conf')}`], { stdio: 'pipe' });
    // dnsmasq's TFTP user must reach the tree: a directory under a mode 0700 one is refused.
    const privateDir = mkdtempSync(join(dir, 'private-'));
    chmodSync(privateDir, 0o700);
    const hidden = corral([
      'pxe',
      'config',
      '--dir',
      join(privateDir, 'pxe'),
      '--interface',
      'lo',
      '--server-ip',
      '127.0.0.1',
      '--mode',
      'proxy',
    ]);
    assert.equal(await exitWithin(hidden, 30_000), 0, hidden.stderr());
    const unreachable = corral(['pxe', 'serve', '--dir', join(privateDir, 'pxe')]);
    assert.equal(await exitWithin(unreachable, 30_000), 1);
    assert.match(
      unreachable.stderr(),
      /is mode 700: dnsmasq's TFTP server \(an unprivileged user\) cannot reach/,
    );
    const noIf = corral(['pxe', 'serve', '--dir', d]);
    assert.equal(await exitWithin(noIf, 30_000), 1);
    assert.match(noIf.stderr(), /interface eth1: does not exist on this host/);
  });
});

describe('pxe serve with real dnsmasq in network namespaces', () => {
  test(
    'a DHCP client gets a lease and the boot file; TFTP serves the menus; SIGTERM stops dnsmasq',
    { timeout: 120_000 },
    async (t) => {
      const why = netnsUnavailable();
      if (why) return t.skip(why);
      if (!has('dnsmasq')) return t.skip('needs dnsmasq (dnsmasq-base)');
      if (!has('busybox')) return t.skip('needs busybox (udhcpc)');
      if (!has('curl')) return t.skip('needs curl (TFTP client)');
      lab = createNetnsLab({ count: 2, subnet: '10.213.11' });
      const [srv, cli] = lab.nodes as [NonNullable<NetnsLab['nodes'][0]>, NonNullable<NetnsLab['nodes'][0]>];
      const d = join(dir, 'lab');
      const cfg = corral([
        'pxe',
        'config',
        '--dir',
        d,
        '--interface',
        srv.dev,
        '--server-ip',
        srv.ip,
        '--range',
        '10.213.11.100-10.213.11.120',
        '--lease-time',
        '10m',
        '--session',
        'lab',
        '--default',
        'clone',
      ]);
      assert.equal(await exitWithin(cfg, 30_000), 0, cfg.stderr());
      let serve: Proc | null = corral(['pxe', 'serve', '--dir', d], { prefix: lab.exec(0) });
      let pid = 0;
      try {
        const s = serve;
        await until(
          'dnsmasq to start',
          () => /TFTP root is/.test(s.stdout()) || s.child.exitCode !== null,
          30_000,
        );
        assert.equal(s.child.exitCode, null, `${s.stdout()}\n${s.stderr()}`);
        pid = Number(/dnsmasq (\d+) on/.exec(s.stdout())![1]);

        // The client: no address yet; udhcpc's script records what it was given.
        execFileSync('ip', ['-n', cli.ns, 'addr', 'flush', 'dev', cli.dev]);
        const script = join(dir, 'udhcpc.sh');
        const envFile = join(dir, 'lease.env');
        writeFileSync(script, `#!/bin/sh\n[ "$1" = bound ] && env > ${envFile}\nexit 0\n`, { mode: 0o755 });
        const dhcp = spawnSync(
          'ip',
          [
            'netns',
            'exec',
            cli.ns,
            'busybox',
            'udhcpc',
            '-i',
            cli.dev,
            '-f',
            '-q',
            '-n',
            '-t',
            '5',
            '-T',
            '2',
            '-s',
            script,
          ],
          { encoding: 'utf8', timeout: 40_000 },
        );
        assert.equal(dhcp.status, 0, `udhcpc: ${dhcp.stderr}\n${s.stdout()}`);
        const env = Object.fromEntries(
          readFileSync(envFile, 'utf8')
            .split('\n')
            .map((l) => [l.slice(0, l.indexOf('=')), l.slice(l.indexOf('=') + 1)]),
        ) as Record<string, string>;
        const last = Number(env.ip!.split('.')[3]);
        assert.ok(env.ip!.startsWith('10.213.11.') && last >= 100 && last <= 120, `lease ${env.ip}`);
        assert.equal(env.boot_file, 'pxelinux.0');
        assert.equal(env.siaddr, srv.ip);
        assert.equal(env.subnet, '255.255.255.0');
        assert.equal(env.router, undefined, 'no router is handed out unless --router names one');
        await until(
          'the lease file',
          () =>
            existsSync(join(d, 'dnsmasq.leases')) &&
            readFileSync(join(d, 'dnsmasq.leases'), 'utf8').includes(env.ip!),
          10_000,
        );
        const ack = new RegExp(`DHCPACK\\(${srv.dev}\\) ${env.ip!.replace(/\./g, '\\.')}`);
        await until(`${ack} in the dnsmasq log`, () => ack.test(s.stdout()), 10_000);

        // TFTP from the leased address.
        execFileSync('ip', ['-n', cli.ns, 'addr', 'add', `${env.ip}/24`, 'dev', cli.dev]);
        const tftp = (path: string) =>
          spawnSync(
            'ip',
            ['netns', 'exec', cli.ns, 'curl', '-sS', '--max-time', '10', `tftp://${srv.ip}/${path}`],
            {
              encoding: 'utf8',
              timeout: 20_000,
            },
          );
        const menu = tftp('pxelinux.cfg/default');
        assert.equal(menu.status, 0, menu.stderr);
        assert.equal(menu.stdout, readFileSync(join(d, 'tftp/pxelinux.cfg/default'), 'utf8'));
        assert.match(menu.stdout, /^DEFAULT clone$/m);
        assert.match(menu.stdout, /LOCALBOOT 0/);
        assert.match(menu.stdout, /corral\.clone\.server=10\.213\.11\.1:7707 corral\.clone\.session=lab/);
        const ipxe = tftp('corral/boot.ipxe');
        assert.equal(ipxe.status, 0, ipxe.stderr);
        assert.match(ipxe.stdout, /^#!ipxe/);
        const missing = tftp('corral/absent');
        assert.notEqual(missing.status, 0, 'a missing file is an error, not an empty answer');
        await until(
          'the TFTP transfer in the log',
          () => /sent .*pxelinux\.cfg\/default to 10\.213\.11\./.test(s.stdout()),
          10_000,
        );

        // A clean stop: exit 0, dnsmasq gone.
        s.kill('SIGTERM');
        assert.equal(await exitWithin(s, 15_000), 0, `${s.stdout()}\n${s.stderr()}`);
        serve = null;
        assert.match(s.stdout(), /dnsmasq stopped/);
        assert.ok(
          !existsSync(`/proc/${pid}`) || readFileSync(`/proc/${pid}/stat`, 'utf8').includes(') Z'),
          'dnsmasq is gone',
        );

        // SIGINT (Ctrl-C) stops it the same way.
        const again = corral(['pxe', 'serve', '--dir', d], { prefix: lab.exec(0) });
        serve = again;
        await until(
          'dnsmasq to start again',
          () => /TFTP root is/.test(again.stdout()) || again.child.exitCode !== null,
          30_000,
        );
        pid = Number(/dnsmasq (\d+) on/.exec(again.stdout())![1]);
        again.kill('SIGINT');
        assert.equal(await exitWithin(again, 15_000), 0, `${again.stdout()}\n${again.stderr()}`);
        serve = null;
        assert.match(again.stdout(), /SIGINT: stopping dnsmasq[\s\S]*dnsmasq stopped/);
      } finally {
        // On failure: stop what this test started (the supervisor, then its dnsmasq) before the namespaces go.
        if (serve) {
          serve.kill('SIGTERM');
          await exitWithin(serve, 10_000).catch(() => undefined);
        }
        if (pid && existsSync(`/proc/${pid}`)) spawnSync('kill', ['-KILL', String(pid)]);
        lab.destroy();
        lab = null;
      }
    },
  );
});
