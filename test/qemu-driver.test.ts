// The qemu driver against real QEMU (software emulation, 64 MiB guests): start and status
// from QMP, stop with ACPI then kill, crash noticed at once, re-attach after an agent
// restart without reboot, live migration keeping the same guest (boot stamp in guest RAM),
// guest liveness failure, composite routing.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { QemuDriver } from '../src/drivers/qemu.js';
import { ProcessDriver } from '../src/drivers/process.js';
import { CompositeDriver } from '../src/drivers/composite.js';
import { readPidfile } from '../src/drivers/pidfile.js';
import { isAlive } from '../src/drivers/proc.js';
import { vmPaths } from '../src/drivers/qemu-paths.js';
import { ResourceSpec, type ResourceSpecInput } from '../src/core/spec.js';
import type { DriverEvent } from '../src/env/types.js';
import { MARKER_ADDR, parseMarker, writeMarkerDisk } from './fixtures/vm/marker-disk.js';

const hasQemu = spawnSync('qemu-system-x86_64', ['-version']).status === 0;
const skip = hasQemu ? false : 'needs qemu-system-x86_64 (Debian: apt-get install qemu-system-x86)';
/** bound on waiting for a driver event */
const EVENT_WAIT_MS = 5000;
const quiet = { log: () => {} };
const dir = mkdtempSync(join(tmpdir(), 'corral-qemu-'));
const disk = join(dir, 'marker.img');
if (hasQemu) writeMarkerDisk(disk);
const drivers: QemuDriver[] = [];

function newDriver(node: string, address = '127.0.0.1'): QemuDriver {
  const d = new QemuDriver({ node, address, stateDir: join(dir, node), env: quiet });
  drivers.push(d);
  return d;
}

function vm(id: string, over: Partial<NonNullable<ResourceSpecInput['vm']>> = {}): ResourceSpec {
  return ResourceSpec.parse({
    id,
    kind: 'vm',
    vm: {
      memory: 64,
      vnc: true,
      shutdownTimeoutMs: 300,
      disks: [{ path: disk, bus: 'virtio', readOnly: true }],
      ...over,
    },
  });
}

async function marker(d: QemuDriver, id: string) {
  const qmp = d.qmpOf(id);
  assert.ok(qmp, `${id}: no QMP connection`);
  return parseMarker(await qmp.hmp(`xp /3wx ${MARKER_ADDR}`));
}

/** wait until the marker boot sector runs (SeaBIOS takes a moment under TCG) */
async function booted(d: QemuDriver, id: string) {
  const deadline = performance.now() + EVENT_WAIT_MS;
  for (;;) {
    const m = await marker(d, id);
    if (m.ticks > 0 || performance.now() > deadline) return m;
    await sleep(100);
  }
}

function nextEvent(d: QemuDriver): Promise<DriverEvent> {
  return new Promise((resolve, reject) => {
    const t = setTimeout(
      () => reject(new Error(`no driver event within ${EVENT_WAIT_MS} ms`)),
      EVENT_WAIT_MS,
    );
    d.onEvent((ev) => {
      clearTimeout(t);
      resolve(ev);
    });
  });
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

after(async () => {
  for (const d of drivers) await d.killAll().catch(() => undefined);
  rmSync(dir, { recursive: true, force: true });
});

test(
  'start: QEMU runs, QMP says running, sockets and pidfile exist; stop = ACPI, timeout, kill',
  { skip },
  async () => {
    const d = newDriver('n1');
    const s = vm('start.example.org');
    const r = await d.start(s, 1);
    assert.equal(r.state, 'started', r.reason);
    const p = vmPaths(join(dir, 'n1'), s.id);
    assert.ok(existsSync(p.qmpSocket) && existsSync(p.vncSocket));
    const pf = readPidfile(join(dir, 'n1'), s.id);
    assert.ok(pf && isAlive(pf.pid, pf.startTime));
    const st = await d.qmpOf(s.id)?.execute<{ status: string }>('query-status');
    assert.equal(st?.status, 'running');
    const m1 = await booted(d, s.id);
    await sleep(300);
    const m2 = await marker(d, s.id);
    assert.equal(m1.stamp, m2.stamp);
    assert.ok(m2.ticks > m1.ticks, 'the guest runs (timer ticks counted)');
    // starting again at the same epoch is idempotent
    assert.equal((await d.start(s, 1)).state, 'started');
    const t0 = performance.now();
    const stopped = await d.stop(s.id);
    assert.equal(stopped.state, 'stopped');
    assert.match(stopped.reason, /no ACPI shutdown within shutdownTimeoutMs 300 ms/);
    assert.ok(performance.now() - t0 < 300 + 4000);
    assert.ok(!isAlive(pf.pid, pf.startTime));
    assert.equal(readPidfile(join(dir, 'n1'), s.id), null);
    assert.deepEqual(d.list(), []);
  },
);

test('crash: QEMU killed from outside is reported failed at once', { skip }, async () => {
  const d = newDriver('n2');
  const s = vm('crash.example.org');
  assert.equal((await d.start(s, 3)).state, 'started');
  const pf = readPidfile(join(dir, 'n2'), s.id);
  assert.ok(pf);
  const ev = nextEvent(d);
  const t0 = performance.now();
  process.kill(pf.pid, 'SIGKILL');
  const e = await ev;
  assert.equal(e.type, 'failed');
  assert.equal(e.epoch, 3);
  assert.match(e.reason, /SIGKILL|exited/);
  assert.ok(performance.now() - t0 < 1000, `noticed in ${performance.now() - t0} ms`);
  // a new start at a new epoch works
  assert.equal((await d.start(s, 4)).state, 'started');
  await d.stop(s.id);
});

test(
  'agent restart: a new driver re-attaches to the running QEMU without rebooting the guest',
  { skip },
  async () => {
    const d1 = newDriver('n3');
    const s = vm('keep.example.org');
    assert.equal((await d1.start(s, 5)).state, 'started');
    const before = await booted(d1, s.id);
    const pid = readPidfile(join(dir, 'n3'), s.id)?.pid;
    await d1.close();
    const d2 = newDriver('n3');
    const found = await d2.recover();
    assert.deepEqual(
      found.map((f) => [f.id, f.epoch, f.state]),
      [[s.id, 5, 'started']],
    );
    assert.equal(readPidfile(join(dir, 'n3'), s.id)?.pid, pid, 'same QEMU process');
    const after1 = await marker(d2, s.id);
    assert.equal(after1.stamp, before.stamp, 'same boot (TSC stamp unchanged)');
    assert.ok(after1.ticks >= before.ticks);
    // and it is still watched: a crash is reported
    const ev = nextEvent(d2);
    process.kill(pid as number, 'SIGKILL');
    assert.equal((await ev).id, s.id);
  },
);

test('composite: the process driver never reports a VM it adopted from a pidfile', { skip }, async () => {
  const stateDir = join(dir, 'n4');
  const q1 = newDriver('n4');
  const s = vm('mixed.example.org');
  assert.equal((await q1.start(s, 1)).state, 'started');
  await q1.close();
  const q2 = newDriver('n4');
  const c = new CompositeDriver({
    process: new ProcessDriver({ node: 'n4', stateDir, env: quiet }),
    vm: q2,
    stateDir,
  });
  const found = await c.recover();
  assert.deepEqual(
    found.map((f) => f.id),
    [s.id],
  );
  assert.equal(c.list().length, 1);
  const st = await c.stop(s.id);
  assert.equal(st.state, 'stopped');
  await c.close();
});

test('live migration: the target runs the same guest, the source QEMU is gone', { skip }, async () => {
  const src = newDriver('m1', '127.0.0.1');
  const dst = newDriver('m2', '127.0.0.2');
  const s = vm('move.example.org');
  assert.equal((await src.start(s, 1)).state, 'started');
  const before = await booted(src, s.id);
  const inc = await dst.prepareIncoming(s, 2);
  assert.ok(inc.ok, !inc.ok ? inc.reason : '');
  assert.equal(inc.host, '127.0.0.2');
  assert.deepEqual(
    dst.list().map((l) => [l.id, l.epoch, l.state]),
    [[s.id, 2, 'incoming']],
  );
  const srcPid = readPidfile(join(dir, 'm1'), s.id)?.pid as number;
  const progress: number[] = [];
  const out = await src.migrateOut(s.id, inc, (p) => progress.push(p.transferredBytes));
  assert.ok(out.ok, !out.ok ? out.reason : '');
  assert.ok(out.progress.totalBytes >= 64 * 1024 * 1024);
  assert.ok(out.progress.downtimeMs !== undefined);
  assert.deepEqual(src.list(), []);
  // the source is paused for good at once and quits in the background
  const quitBy = performance.now() + EVENT_WAIT_MS;
  while (isAlive(srcPid) && performance.now() < quitBy) await sleep(20);
  assert.ok(!isAlive(srcPid), 'source QEMU quit');
  const deadline = performance.now() + EVENT_WAIT_MS;
  while (dst.list()[0]?.state !== 'started' && performance.now() < deadline) await sleep(50);
  assert.equal(dst.list()[0]?.state, 'started');
  const st = await dst.qmpOf(s.id)?.execute<{ status: string }>('query-status');
  assert.equal(st?.status, 'running');
  await sleep(200);
  const afterM = await marker(dst, s.id);
  assert.equal(afterM.stamp, before.stamp, 'same guest: boot stamp carried over');
  assert.ok(afterM.ticks > before.ticks, 'guest kept counting');
  await dst.stop(s.id);
});

test('migration to a port nobody listens on fails and the source keeps running', { skip }, async () => {
  const src = newDriver('m3');
  const s = vm('stay.example.org');
  assert.equal((await src.start(s, 1)).state, 'started');
  const out = await src.migrateOut(s.id, { host: '127.0.0.1', port: 9 }, () => undefined);
  assert.equal(out.ok, false);
  assert.equal(src.list()[0]?.state, 'started');
  const st = await src.qmpOf(s.id)?.execute<{ status: string }>('query-status');
  assert.equal(st?.status, 'running');
  await src.stop(s.id);
});

test('guest liveness: a guest agent that never answers fails the VM after N checks', { skip }, async () => {
  const d = newDriver('n5');
  const s = vm('silent.example.org', {
    guestAgent: true,
    liveness: { type: 'guest-agent', intervalMs: 100, timeoutMs: 100, failures: 2, startGraceMs: 0 },
  });
  const ev = nextEvent(d);
  assert.equal((await d.start(s, 1)).state, 'started');
  const e = await ev;
  assert.match(e.reason, /guest agent failed 2 times in a row/);
  const deadline = performance.now() + EVENT_WAIT_MS;
  while (readPidfile(join(dir, 'n5'), s.id) && performance.now() < deadline) await sleep(50);
  assert.equal(readPidfile(join(dir, 'n5'), s.id), null, 'QEMU killed');
});

test('start failure names the missing disk', { skip }, async () => {
  const d = newDriver('n6');
  const r = await d.start(vm('nodisk.example.org', { disks: [{ path: join(dir, 'absent.img') }] }), 1);
  assert.equal(r.state, 'failed');
  assert.match(r.reason, /disk .*absent\.img does not exist on n6/);
});
