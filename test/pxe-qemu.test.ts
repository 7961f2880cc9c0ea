// corral pxe with a real PXE client: a QEMU machine without a disk boots from the network with its
// iPXE option ROM. dnsmasq (run by `corral pxe serve`) answers its DHCP (tagged iPXE) with
// corral/boot.ipxe over TFTP; the menu's default entry decides: `local` hands over to the local
// disk (sanboot 0x80), `clone` fetches the receiver kernel named by the menu. Everything runs in a
// private network namespace (a bridge and a tap), removed even on failure. Skipped with the reason
// without root, ip netns, dnsmasq, QEMU or its iPXE ROMs.
import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { chmodSync, existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { corral, exitWithin, killAll, type Proc } from '../src/provision/clone/testing.js';
import { netnsUnavailable } from './helpers/netns.js';

const dir = mkdtempSync(join(tmpdir(), 'corral-pxeq-'));
chmodSync(dir, 0o755);
const ns = `corral-pxeq-${process.pid % 100000}`;
let nsMade = false;
let dnsmasqPid = 0;
const qemus = new Set<ChildProcess>();
function cleanup(): void {
  for (const q of qemus) q.kill('SIGKILL');
  killAll();
  // The dnsmasq this test's `pxe serve` started, if the supervisor could not stop it.
  if (dnsmasqPid && existsSync(`/proc/${dnsmasqPid}`)) spawnSync('kill', ['-KILL', String(dnsmasqPid)]);
  dnsmasqPid = 0;
  if (nsMade) spawnSync('ip', ['netns', 'del', ns]);
  nsMade = false;
}
after(() => {
  cleanup();
  rmSync(dir, { recursive: true, force: true });
});

const has = (cmd: string) => spawnSync('sh', ['-c', `command -v ${cmd}`]).status === 0;
const ip = (...args: string[]) => execFileSync('ip', ['-n', ns, ...args], { stdio: 'pipe' });

async function until(
  what: string,
  cond: () => boolean,
  timeoutMs: number,
  dump: () => string,
): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > deadline)
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}:\n${dump()}`);
    await new Promise((r) => setTimeout(r, 250));
  }
}

/** A diskless machine booting from the network (TCG: no KVM needed). */
function bootQemu(): { child: ChildProcess; out: () => string } {
  const child = spawn(
    'ip',
    [
      'netns',
      'exec',
      ns,
      'qemu-system-x86_64',
      '-m',
      '128',
      '-nographic',
      '-monitor',
      'none',
      '-boot',
      'n',
      '-netdev',
      'tap,id=n0,ifname=tap0,script=no,downscript=no',
      '-device',
      'e1000,netdev=n0',
    ],
    { stdio: ['ignore', 'pipe', 'pipe'] },
  );
  qemus.add(child);
  child.on('exit', () => qemus.delete(child));
  let out = '';
  child.stdout!.on('data', (d: Buffer) => (out += d.toString('latin1')));
  child.stderr!.on('data', (d: Buffer) => (out += d.toString('latin1')));
  return { child, out: () => out };
}

async function stopQemu(q: { child: ChildProcess }): Promise<void> {
  if (q.child.exitCode !== null || q.child.signalCode !== null) return;
  const gone = new Promise((r) => q.child.once('exit', r));
  q.child.kill('SIGKILL');
  await gone;
}

test(
  'a diskless QEMU machine PXE-boots the menu: local hands over to the disk, clone fetches the receiver kernel',
  { timeout: 420_000 },
  async (t) => {
    const why = netnsUnavailable();
    if (why) return t.skip(why);
    if (!has('dnsmasq')) return t.skip('needs dnsmasq (dnsmasq-base)');
    if (!has('qemu-system-x86_64')) return t.skip('needs qemu-system-x86');
    if (!existsSync('/usr/lib/ipxe/qemu/efi-e1000.rom') && !existsSync('/usr/share/qemu/efi-e1000.rom'))
      return t.skip("needs QEMU's iPXE option ROMs (ipxe-qemu)");
    execFileSync('ip', ['netns', 'add', ns]);
    nsMade = true;
    ip('link', 'set', 'lo', 'up');
    ip('link', 'add', 'br0', 'type', 'bridge');
    ip('addr', 'add', '10.213.12.1/24', 'dev', 'br0');
    ip('link', 'set', 'br0', 'up');
    ip('tuntap', 'add', 'tap0', 'mode', 'tap');
    ip('link', 'set', 'tap0', 'master', 'br0');
    ip('link', 'set', 'tap0', 'up');
    const d = join(dir, 'pxe');
    const config = async (extra: string[]) => {
      const c = corral([
        'pxe',
        'config',
        '--dir',
        d,
        '--interface',
        'br0',
        '--server-ip',
        '10.213.12.1',
        '--range',
        '10.213.12.100-10.213.12.110',
        '--menu-timeout-s',
        '1',
        '--session',
        'qemu',
        ...extra,
      ]);
      assert.equal(await exitWithin(c, 30_000), 0, c.stderr());
    };
    await config(['--default', 'local']);
    let serve: Proc | null = corral(['pxe', 'serve', '--dir', d], { prefix: ['ip', 'netns', 'exec', ns] });
    const s = serve;
    try {
      await until(
        'dnsmasq',
        () => /TFTP root is/.test(s.stdout()) || s.child.exitCode !== null,
        30_000,
        s.stdout,
      );
      assert.equal(s.child.exitCode, null, s.stdout());
      dnsmasqPid = Number(/dnsmasq (\d+) on/.exec(s.stdout())![1]);

      // Round 1, default `local`: iPXE gets the script, shows the menu, then boots the local disk.
      const q1 = bootQemu();
      const dump1 = () => `--- dnsmasq\n${s.stdout().slice(-3000)}\n--- qemu\n${q1.out().slice(-3000)}`;
      await until(
        'iPXE to fetch corral/boot.ipxe',
        () => /sent \S+corral\/boot\.ipxe to 10\.213\.12\.1\d\d/.test(s.stdout()),
        180_000,
        dump1,
      );
      assert.match(s.stdout(), /tags: ipxe, br0/);
      assert.match(s.stdout(), /option: 67 bootfile-name {2}corral\/boot\.ipxe/);
      await until(
        'the local entry (sanboot 0x80)',
        () => /Booting from SAN device 0x80/.test(q1.out()),
        120_000,
        dump1,
      );
      assert.match(q1.out(), /Boot from the local disk/);
      await stopQemu(q1);

      // Round 2, default `clone`: the menu entry fetches the receiver kernel over TFTP.
      const kernel = join(dir, 'not-a-kernel');
      writeFileSync(kernel, randomBytes(64 * 1024));
      await config(['--default', 'clone', '--kernel', kernel]);
      const sent = (s.stdout().match(/sent \S+corral\/vmlinuz/g) ?? []).length;
      assert.equal(sent, 0);
      const q2 = bootQemu();
      const dump2 = () => `--- dnsmasq\n${s.stdout().slice(-3000)}\n--- qemu\n${q2.out().slice(-3000)}`;
      await until(
        'iPXE to fetch corral/vmlinuz',
        () => /sent \S+corral\/vmlinuz to 10\.213\.12\.1\d\d/.test(s.stdout()),
        240_000,
        dump2,
      );
      await stopQemu(q2);

      s.kill('SIGTERM');
      assert.equal(await exitWithin(s, 15_000), 0, s.stdout());
      serve = null;
    } finally {
      if (serve) {
        serve.kill('SIGTERM');
        await exitWithin(serve, 10_000).catch(() => undefined);
      }
      cleanup();
    }
  },
);
