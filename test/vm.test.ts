// VMs on a real cluster: agents on one SQLite store run QEMU through the composite driver.
// Bad definitions are refused before anything changes; `vm migrate` live-migrates between
// two agents and the target runs the same guest (boot stamp in guest RAM read over the
// second QMP monitor); a QEMU crash is restarted; `node drain` moves several VMs away.
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { TestCluster } from './helpers/cluster.js';
import { openStore } from '../src/store/index.js';
import { QmpClient } from '../src/drivers/qmp.js';
import { vmPaths } from '../src/drivers/qemu-paths.js';
import { readPidfile } from '../src/drivers/pidfile.js';
import { isAlive } from '../src/drivers/proc.js';
import { MARKER_ADDR, parseMarker, writeMarkerDisk } from './fixtures/vm/marker-disk.js';

const hasQemu = spawnSync('qemu-system-x86_64', ['-version']).status === 0;
const skip = hasQemu ? false : 'needs qemu-system-x86_64 (Debian: apt-get install qemu-system-x86)';

describe('VMs on a real cluster', { timeout: 420_000, skip }, () => {
  // a longer lease than the default: QEMU under TCG loads small CI machines
  const c = new TestCluster({ nodes: [{ name: 'n1' }, { name: 'n2' }, { name: 'n3' }], leaseTtlMs: 6000 });
  const disk = join(c.dir, 'marker.img');
  const def = (file: string, text: string) => {
    const p = join(c.dir, file);
    writeFileSync(p, text);
    return p;
  };
  const stateDir = (node: string) => join(c.stateRoot, node);
  async function marker(node: string, id: string) {
    const q = await QmpClient.connect(vmPaths(stateDir(node), id).adminQmpSocket);
    try {
      const m = parseMarker(await q.hmp(`xp /3wx ${MARKER_ADDR}`));
      const st = await q.execute<{ status: string }>('query-status');
      return { ...m, status: st.status };
    } finally {
      q.close();
    }
  }

  before(async () => {
    writeMarkerDisk(disk);
    // like c.start(), with more patience for a loaded machine
    for (const n of ['n1', 'n2', 'n3']) c.startAgent(n);
    c.store = await openStore(`sqlite:${join(c.dir, 'store.db')}`);
    await c.waitFor(
      'all nodes online',
      async () => {
        const s = await c.snapshot();
        return ['n1', 'n2', 'n3'].every(
          (n) => s.nodes.get(n)?.status?.state === 'online' && s.nodes.get(n)?.alive?.ready,
        );
      },
      60000,
    );
  });
  after(() => c.stop());

  it('refuses malformed or dangerous definitions with file:line:col, and stores nothing', async () => {
    const bad = [
      ['traversal.yaml', 'name: ../../etc\nmemory: 64\n', /traversal\.yaml:1:7 name: invalid VM name/],
      [
        'nodisk.yaml',
        'name: a.example.org\nmemory: 64\ndisks:\n  - path: /nonexistent/disk.img\n',
        /nodisk\.yaml:4:11 disks\[0\]\.path: .*does not exist on this host/,
      ],
      [
        'huge.yaml',
        'name: b.example.org\nmemory: 999999\n',
        /huge\.yaml:2:9 memory: .*exceeds the largest node/,
      ],
      [
        'dupmac.yaml',
        'name: c.example.org\nmemory: 64\nnics:\n  - { type: user, mac: "52:54:00:00:00:01" }\n  - { type: user, mac: "52:54:00:00:00:01" }\n',
        /dupmac\.yaml:5:.* nics\[1\]\.mac: MAC 52:54:00:00:00:01 is also nics\[0\]\.mac/,
      ],
      [
        'extra.yaml',
        'name: d.example.org\nmemory: 64\nqemuArgs: ["-monitor", "stdio"]\n',
        /extra\.yaml:3:1 qemuArgs: unknown key/,
      ],
    ] as const;
    for (const [file, text, re] of bad) {
      const r = c.cli('vm', 'define', '-f', def(file, text));
      assert.equal(r.code, 1, `${file}: ${r.stdout}${r.stderr}`);
      assert.match(r.stderr, re);
    }
    const list = c.cli('vm', 'list', '--json');
    assert.deepEqual(JSON.parse(list.stdout), []);
  });

  it('defines a VM, keeps its history, refuses a bad edit and a MAC used by another VM', async () => {
    const yaml = [
      'name: marker.example.org',
      'memory: 64',
      'disks:',
      `  - { path: ${disk}, readOnly: true }`,
      'nics:',
      '  - { type: user, mac: "52:54:00:aa:00:01" }',
      'shutdownTimeoutMs: 500',
      'preferredNode: n1',
      'priority: 0',
      '',
    ].join('\n');
    const r = c.cli('vm', 'define', '-f', def('marker.yaml', yaml));
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /marker\.example\.org: defined \(version 1\)/);
    assert.equal(await c.waitStarted('marker.example.org', undefined, 30000), 'n1');
    const other = c.cli(
      'vm',
      'define',
      '-f',
      def(
        'other.yaml',
        'name: other.example.org\nmemory: 64\nnics:\n  - { type: user, mac: "52:54:00:AA:00:01" }\n',
      ),
    );
    assert.equal(other.code, 1);
    assert.match(other.stderr, /MAC 52:54:00:aa:00:01 is already used by VM marker\.example\.org/);
    // a good edit makes version 2; a broken one is refused and leaves version 2
    const edit = (expr: string) =>
      spawnSync(
        process.execPath,
        [
          join(import.meta.dirname, '..', 'bin', 'corral.js'),
          'vm',
          'edit',
          'marker.example.org',
          '--config',
          c.configPath,
        ],
        {
          encoding: 'utf8',
          env: { ...process.env, EDITOR: `sed -i ${expr}`, CORRAL_HOME: join(c.dir, 'home') },
          timeout: 30000,
        },
      );
    const ok = edit('s/priority:\\x200/priority:\\x205/');
    assert.equal(ok.status, 0, ok.stderr);
    assert.match(ok.stdout, /updated \(version 2\)/);
    const broken = edit('s/memory:\\x2064/memory:\\x20-1/');
    assert.equal(broken.status, 1);
    assert.match(broken.stderr, /memory: /);
    assert.match(broken.stderr, /your edit is kept in/);
    const h = c.cli('vm', 'history', 'marker.example.org', '--json');
    const versions = JSON.parse(h.stdout) as { version: number; action: string }[];
    assert.deepEqual(
      versions.map((v) => [v.version, v.action]),
      [
        [1, 'define'],
        [2, 'edit'],
      ],
    );
    const show = c.cli('vm', 'history', 'marker.example.org', '--show', '2');
    assert.match(show.stdout, /priority: 5/);
  });

  it('vm migrate: the target agent runs the same guest; the source QEMU is gone', async () => {
    const id = 'marker.example.org';
    const src = readPidfile(stateDir('n1'), id);
    assert.ok(src);
    let before = await marker('n1', id);
    for (let i = 0; i < 50 && before.ticks === 0; i++) {
      await new Promise((r) => setTimeout(r, 100));
      before = await marker('n1', id);
    }
    assert.ok(before.ticks > 0, 'guest booted');
    const r = c.cli('vm', 'migrate', id, 'n2');
    assert.equal(r.code, 0, r.stdout + r.stderr);
    assert.match(r.stdout, /now on n2/);
    const rec = await c.resourceOn(id);
    assert.equal(rec.node, 'n2');
    assert.equal(rec.state, 'started');
    const afterM = await marker('n2', id);
    assert.equal(afterM.status, 'running');
    assert.equal(afterM.stamp, before.stamp, 'same guest: boot stamp carried over');
    assert.ok(afterM.ticks > before.ticks, 'the guest went on counting');
    assert.ok(!isAlive(src.pid, src.startTime), 'source QEMU quit');
    const con = c.cli('vm', 'console', id);
    assert.match(con.stdout, /node n2, Unix socket .*n2\/vm\/marker\.example\.org\/vnc\.sock/);
  });

  it('a QEMU crash is noticed and the VM restarted', async () => {
    const id = 'marker.example.org';
    const pf = readPidfile(stateDir('n2'), id);
    assert.ok(pf);
    const epoch0 = (await c.resourceOn(id)).epoch ?? 0;
    process.kill(pf.pid, 'SIGKILL');
    await c.waitFor(
      'restarted after the crash',
      async () => {
        const r = await c.resourceOn(id);
        return r.state === 'started' && (r.epoch ?? 0) > epoch0;
      },
      20000,
    );
    const evs = await c.events();
    assert.ok(
      evs.some((e) => e.object === id && /QEMU killed by signal SIGKILL|QEMU exited/.test(e.message)),
    );
  });

  it('node drain live-migrates several VMs away; undrain takes the node back', async () => {
    const ids = ['d1.example.org', 'd2.example.org', 'd3.example.org', 'd4.example.org'];
    for (const id of ids) {
      const r = c.cli(
        'vm',
        'define',
        '-f',
        def(`${id}.yaml`, `name: ${id}\nmemory: 32\nvnc: false\npreferredNode: n3\n`),
      );
      assert.equal(r.code, 0, r.stderr);
    }
    for (const id of ids) assert.equal(await c.waitStarted(id, undefined, 30000), 'n3');
    const epochs = new Map<string, number>();
    for (const id of ids) epochs.set(id, (await c.resourceOn(id)).epoch ?? 0);
    const r = c.cli('node', 'drain', 'n3', '--timeout-ms', '25000');
    assert.equal(r.code, 0, r.stdout + r.stderr);
    assert.match(r.stdout, /n3: drained \(4 moved/);
    const evs = await c.events();
    for (const id of ids) {
      const rec = await c.resourceOn(id);
      assert.equal(rec.state, 'started');
      assert.notEqual(rec.node, 'n3');
      assert.ok(
        evs.some((e) => e.object === id && /: migrated n3 -> /.test(e.message)),
        `${id} moved live (not restarted)`,
      );
      assert.ok(!existsSync(join(stateDir('n3'), 'run', `${id}.json`)));
    }
    const u = c.cli('node', 'undrain', 'n3');
    assert.equal(u.code, 0, u.stderr);
  });

  it('corral check: a QEMU unknown to the store is an orphan (exit 1), killed with --stop-orphans', async () => {
    mkdirSync(vmPaths(stateDir('n1'), 'orphan.example.org').dir, { recursive: true });
    const orphan = spawn(
      'qemu-system-x86_64',
      [
        '-name',
        'guest=orphan.example.org',
        '-nodefaults',
        '-display',
        'none',
        '-accel',
        'tcg',
        '-m',
        '32M',
        // as if an agent of n1 had started it: its QMP socket under n1's state dir
        '-qmp',
        `unix:${vmPaths(stateDir('n1'), 'orphan.example.org').qmpSocket},server=on,wait=off`,
      ],
      { stdio: 'ignore' },
    );
    try {
      await new Promise((r) => setTimeout(r, 300));
      const r = c.cli('check', '--json', '--state-root', c.stateRoot);
      assert.equal(r.code, 1, r.stderr);
      const out = JSON.parse(r.stdout) as { ok: boolean; problems: { check: string; message: string }[] };
      assert.equal(out.ok, false);
      assert.ok(
        out.problems.some(
          (p) => p.check === 'orphan' && p.message.includes(`QEMU ${orphan.pid} (orphan.example.org)`),
        ),
        JSON.stringify(out.problems),
      );
      assert.ok(!out.problems.some((p) => p.check === 'running-twice' || p.check === 'defined-twice'));
      const k = c.cli('check', '--stop-orphans', '--state-root', c.stateRoot);
      assert.match(k.stdout, new RegExp(`killed orphan QEMU ${orphan.pid}`));
    } finally {
      orphan.kill('SIGKILL');
    }
  });
});
