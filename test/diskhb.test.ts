// The heartbeat disk on a real loop device and on real namespaced hosts (issue 8): the format,
// a lost disk alone (no fencing), the poison pill delivered and acknowledged.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { NetCluster, netnsMissing } from './cluster/netcluster.js';
import { DiskHandle, formatDisk, readDisk, slotBytes } from '../src/health/diskhb.js';
import { fenceSbd } from '../src/fence/sbd.js';

const skip = netnsMissing();
const scenarioTimeoutMs = 180_000;

async function settle(c: NetCluster, id: string, port: number, node: string): Promise<number> {
  await c.defineService(id, port, { preferredNode: node });
  let epoch = 0;
  await c.waitFor(`${id} started on ${node}`, async () => {
    const r = await c.resourceOn(id);
    epoch = r.epoch ?? 0;
    return r.node === node && r.state === 'started';
  });
  return epoch;
}

test('format, show, a silent slot fenced after msgwait, an unknown node refused (loop device)', async (t) => {
  if (process.getuid?.() !== 0) return t.skip('needs root: losetup');
  const dir = mkdtempSync('/dev/shm/corral-diskhb-');
  const img = join(dir, 'hb.img');
  spawnSync('truncate', ['-s', '1M', img]);
  const dev = spawnSync('losetup', ['-f', '--show', img], { encoding: 'utf8' }).stdout.trim();
  try {
    assert.match(dev, /^\/dev\/loop\d+$/);
    const h = await formatDisk(dev, 4, Date.now());
    assert.equal(h.slotCount, 4);
    await assert.rejects(formatDisk(dev, 4, Date.now()), /already a heartbeat disk/);
    const handle = await DiskHandle.open(dev);
    assert.equal(handle.direct, true, 'a loop device takes O_DIRECT');
    await handle.writeNodeSector(2, {
      node: 'n3',
      counter: 7,
      writtenAtMs: Date.now(),
      state: 'alive',
      ackSeq: 0,
      ackAtMs: 0,
    });
    await handle.close();
    const d = await readDisk(dev);
    assert.equal(d.slots[2]!.sector.node, 'n3');
    assert.equal(d.slots[2]!.sector.counter, 7);
    assert.equal(slotBytes % 4096, 0);
    const t0 = Date.now();
    const r = await fenceSbd({
      device: dev,
      node: 'n3',
      slot: undefined,
      timeoutMs: 3000,
      msgwaitMs: 600,
      from: 'test',
      nowMs: Date.now,
    });
    assert.deepEqual(r, { ok: true });
    assert.ok(Date.now() - t0 >= 600, 'success by silence only after msgwait');
    assert.equal((await readDisk(dev)).slots[2]!.mailbox.pillSeq, 1);
    const u = await fenceSbd({
      device: dev,
      node: 'nobody',
      slot: undefined,
      timeoutMs: 1000,
      msgwaitMs: 500,
      from: 'test',
      nowMs: Date.now,
    });
    assert.equal(u.ok, false);
    const cli = spawnSync(process.execPath, ['bin/corral.js', 'disk', 'show', dev], { encoding: 'utf8' });
    assert.equal(cli.status, 0, cli.stderr);
    assert.match(cli.stdout, /n3\s+alive\s+7/);
    const bad = spawnSync(process.execPath, ['bin/corral.js', 'disk', 'format', dev, '--nodes', '0'], {
      encoding: 'utf8',
    });
    assert.equal(bad.status, 2);
    assert.match(bad.stderr, /--nodes 0: expected an integer from 1 to 255/);
  } finally {
    if (dev) spawnSync('losetup', ['-d', dev]);
    rmSync(dir, { recursive: true, force: true });
  }
});

async function withCluster(
  opts: ConstructorParameters<typeof NetCluster>[0],
  body: (c: NetCluster) => Promise<void>,
) {
  const c = new NetCluster(opts);
  try {
    await c.start();
    await body(c);
    const problems = await c.verdict([...(await c.snapshot()).resources.keys()]);
    assert.deepEqual(problems, [], problems.join('\n'));
  } catch (e) {
    for (const h of c.hosts) process.stderr.write(`--- ${h.name}\n${c.agentLog(h.name).slice(-3000)}\n`);
    throw e;
  } finally {
    await c.stop();
  }
}

test('a host losing its heartbeat disk alone is not fenced', { timeout: scenarioTimeoutMs }, async (t) => {
  if (skip) return t.skip(skip);
  await withCluster({ hosts: 3, disk: true }, async (c) => {
    const victim = 'h2';
    const epoch = await settle(c, 'web', 8080, victim);
    const before = (await c.events()).length;
    c.loseDisk(victim);
    await new Promise((r) => setTimeout(r, 2 * c.timings.leaseTtlMs));
    const r = await c.resourceOn('web');
    assert.equal(r.node, victim);
    assert.equal(r.epoch, epoch);
    const evs = (await c.events()).slice(before);
    assert.deepEqual(
      evs.filter((e) => e.action === 'self-fenced' || e.action === 'fence-ok').map((e) => e.message),
      [],
    );
    assert.match(c.agentLog(victim), /heartbeat disk lost/);
    c.restoreDisk(victim);
  });
});

test(
  'a cut-off host alive on the disk gets the poison pill and acknowledges it',
  { timeout: scenarioTimeoutMs },
  async (t) => {
    if (skip) return t.skip(skip);
    await withCluster({ hosts: 3, disk: true }, async (c) => {
      const leader = (await c.snapshot()).leader?.node;
      const victim = c.hosts.find((h) => h.name !== leader)!.name;
      await settle(c, 'web', 8080, victim);
      c.isolate(victim);
      await c.waitStarted('web', victim);
      const evs = await c.events();
      const fenced = evs.find((e) => e.action === 'fence-ok' && e.message.startsWith(`${victim}:`));
      assert.ok(fenced, 'a fence record');
      assert.match(fenced.message, /sbd:/);
      const slot = (await readDisk(c.loopDev!)).slots[c.host(victim).i - 1]!;
      assert.ok(slot.sector.ackSeq >= 1 && slot.sector.ackSeq === slot.mailbox.pillSeq, JSON.stringify(slot));
      c.heal(victim);
    });
  },
);

test('config: an sbd fence device and a per-node disk slot; bad values name the place', async () => {
  const { parseClusterConfig } = await import('../src/config/schema.js');
  const { createFencer } = await import('../src/fence/index.js');
  const yaml = (fence: string, disk: string) =>
    [
      'version: 1',
      'cluster: { name: t }',
      'store: sqlite:./s.db',
      'nodes:',
      '  - name: a',
      '    address: 10.0.0.1',
      '    capacity: { cpus: 1, memory: 100 }',
      `    fence: [${fence}]`,
      `    disk: ${disk}`,
      '',
    ].join('\n');
  const ok = parseClusterConfig(
    yaml('{ type: sbd, device: /dev/loop9, timeoutMs: 3000 }', '{ device: hb, slot: 2 }'),
    'c.yaml',
    '/etc/corral',
  );
  assert.ok(ok.ok);
  const node = ok.value.nodes[0]!;
  assert.deepEqual(node.fence[0], { type: 'sbd', device: '/dev/loop9', timeoutMs: 3000, msgwaitMs: 4000 });
  assert.deepEqual(node.disk, { device: '/etc/corral/hb', slot: 2, intervalMs: 500 });
  const bad = parseClusterConfig(
    yaml('{ type: sbd, timeoutMs: 3000 }', '{ device: hb, slot: 300 }'),
    'c.yaml',
    '/etc/corral',
  );
  assert.equal(bad.ok, false);
  const text = bad.ok ? '' : bad.errors.map((e) => `${e.path} ${e.message}`).join('\n');
  assert.match(text, /nodes\.0\.fence\.0\.device|nodes\[0\]\.fence\[0\]\.device/);
  assert.match(text, /slot number\) no greater than 254/);
  assert.throws(
    () =>
      createFencer(
        [{ name: 'a', fence: [{ type: 'sbd', device: '/x', timeoutMs: 1000, msgwaitMs: 1000 }] }],
        {
          log: () => undefined,
        },
      ),
    /nodes\.a\.fence\[0\]\.msgwaitMs: msgwaitMs \(1000\) must be less than timeoutMs \(1000\)/,
  );
});
