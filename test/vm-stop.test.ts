// `corral vm shutdown` and `corral vm destroy` on a VM that runs under an agent: shutdown sends
// the ACPI power-down, waits shutdownTimeoutMs, then kills (the marker guest ignores ACPI);
// destroy kills at once, without a power-down, and leaves the definition's grace as it was.
// QEMU's POWERDOWN event, seen on the admin QMP monitor, tells whether the guest was asked.
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { TestCluster, corralBin } from './helpers/cluster.js';
import { QmpClient } from '../src/drivers/qmp.js';
import { vmPaths } from '../src/drivers/qemu-paths.js';
import { readPidfile } from '../src/drivers/pidfile.js';
import { isAlive } from '../src/drivers/proc.js';
import { ResourceSpec } from '../src/core/spec.js';
import type { AgentStatus } from '../src/core/types.js';
import { VmDefinition, vmResourceInput } from '../src/core/vm-spec.js';
import { writeMarkerDisk } from './fixtures/vm/marker-disk.js';

const hasQemu = spawnSync('qemu-system-x86_64', ['-version']).status === 0;
const skip = hasQemu ? false : 'needs qemu-system-x86_64 (Debian: apt-get install qemu-system-x86)';

const GRACE_MS = 6000;
/** the grace of the destroy-during-shutdown case: far longer than the CLI takes to start */
const LONG_GRACE_MS = 60000;
/** a loaded host starts the CLI slowly: more than TestCluster.cli's bound */
const CLI_TIMEOUT_MS = 120_000;

describe('vm shutdown and vm destroy on a running VM', { timeout: 400_000, skip }, () => {
  const c = new TestCluster({ nodes: [{ name: 'n1' }], leaseTtlMs: 10000 });
  const id = 'stop.example.org';
  const disk = join(c.dir, 'marker.img');
  const stateDir = join(c.stateRoot, 'n1');
  const cli = (...args: string[]) => {
    const r = spawnSync(process.execPath, [corralBin, ...args, '--config', c.configPath], {
      encoding: 'utf8',
      timeout: CLI_TIMEOUT_MS,
      env: { ...process.env, CORRAL_HOME: join(c.dir, 'home') },
    });
    assert.equal(r.status, 0, `corral ${args.join(' ')}: ${r.stdout}${r.stderr}`);
    return r.stdout;
  };
  const spec = async () => {
    const kv = await c.store.get(c.k.resource(id));
    assert.ok(kv);
    return ResourceSpec.parse(JSON.parse(kv.value));
  };

  /** wait for a running QEMU; watch its events from the admin monitor */
  async function running(): Promise<{ pid: number; startTime: number; events: string[]; qmp: QmpClient }> {
    await c.waitStarted(id, undefined, 60000);
    const pf = readPidfile(stateDir, id);
    assert.ok(pf);
    const qmp = await QmpClient.connect(vmPaths(stateDir, id).adminQmpSocket);
    const events: string[] = [];
    qmp.onEvent((e) => events.push(e.event));
    return { pid: pf.pid, startTime: pf.startTime, events, qmp };
  }

  async function goneAfter(vm: { pid: number; startTime: number }): Promise<number> {
    const t0 = performance.now();
    await c.waitFor('QEMU gone', async () => !isAlive(vm.pid, vm.startTime), 60000, 20);
    return performance.now() - t0;
  }

  async function reported(): Promise<AgentStatus> {
    let s: AgentStatus | undefined;
    await c.waitFor(
      'the agent reports the VM stopped',
      async () => {
        const kv = await c.store.get(c.k.status('n1', id));
        s = kv ? (JSON.parse(kv.value) as AgentStatus) : undefined;
        return s?.state === 'stopped';
      },
      30000,
    );
    return s as AgentStatus;
  }

  before(async () => {
    writeMarkerDisk(disk);
    await c.start();
    const def = VmDefinition.parse({
      name: id,
      memory: 32,
      vnc: false,
      disks: [{ path: disk, readOnly: true }],
      shutdownTimeoutMs: GRACE_MS,
    });
    await c.store.put(c.k.resource(id), JSON.stringify(ResourceSpec.parse(vmResourceInput(def))));
  });
  after(() => c.stop());

  it('shutdown: ACPI power-down, then shutdownTimeoutMs, then kill', async () => {
    const vm = await running();
    try {
      cli('vm', 'shutdown', id);
      const ms = await goneAfter(vm);
      // the CLI returns after its write: the agent may have started the grace a little earlier
      assert.ok(ms > GRACE_MS - 2000, `killed after ${Math.round(ms)} ms, before the grace ended`);
      assert.ok(vm.events.includes('POWERDOWN'), `events: ${vm.events.join(' ')}`);
      assert.match((await reported()).reason, /no ACPI shutdown within shutdownTimeoutMs 6000 ms/);
    } finally {
      vm.qmp.close();
    }
  });

  it('destroy: killed at once, no power-down; the definition keeps its grace', async () => {
    cli('vm', 'start', id);
    const vm = await running();
    try {
      cli('vm', 'destroy', id);
      const ms = await goneAfter(vm);
      assert.ok(ms < GRACE_MS - 2000, `destroy took ${Math.round(ms)} ms: the grace was applied`);
      assert.ok(!vm.events.includes('POWERDOWN'), `events: ${vm.events.join(' ')}`);
      assert.match((await reported()).reason, /killed at once/);
      const s = await spec();
      assert.equal(s.vm?.shutdownTimeoutMs, GRACE_MS);
      assert.equal(s.killOnStop, true);
    } finally {
      vm.qmp.close();
    }
    // the next start forgets the destroy: a later shutdown has its grace again
    cli('vm', 'start', id);
    assert.equal((await spec()).killOnStop, undefined);
    const again = await running();
    again.qmp.close();
  });

  it('destroy during a shutdown that waits out its grace kills at once', async () => {
    // the definition's grace is what counts, also for a VM that runs already: make it long
    const s0 = await spec();
    await c.store.put(
      c.k.resource(id),
      JSON.stringify({ ...s0, vm: { ...s0.vm, shutdownTimeoutMs: LONG_GRACE_MS } }),
    );
    const vm = await running();
    try {
      const t0 = performance.now();
      cli('vm', 'shutdown', id);
      await c.waitFor('the power-down sent', async () => vm.events.includes('POWERDOWN'), 30000, 20);
      cli('vm', 'destroy', id);
      await goneAfter(vm);
      const ms = performance.now() - t0;
      assert.ok(
        ms < LONG_GRACE_MS - 5000,
        `gone after ${Math.round(ms)} ms: the destroy waited for the grace`,
      );
      assert.match((await reported()).reason, /killed at once during the ACPI shutdown/);
    } finally {
      vm.qmp.close();
    }
  });
});
