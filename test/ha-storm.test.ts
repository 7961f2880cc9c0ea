// A node taking over many resources at once must keep its lease. Sixty starts in one go
// used to stall an agent's event loop for seconds (synchronous store calls chained through
// microtasks, and spawn() blocking until each child execs), long enough for its lease to
// lapse: it self-fenced, everything restarted elsewhere, and so on (issue 3, K=50 failover).
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { TestCluster, witnessOverlaps } from './helpers/cluster.js';
import { fenceLocal } from '../src/fence/local.js';

/** resources in the storm */
const stormSize = 60;

describe('start storms keep the lease', { timeout: 240_000 }, () => {
  // LAN tuning: the tighter the lease, the less a stalled agent can afford
  const c = new TestCluster({
    leaseTtlMs: 1500,
    nodes: [{ name: 'n1' }, { name: 'n2' }, { name: 'n3' }],
  });
  before(() => c.start());
  after(() => c.stop());

  const selfFences = async () => (await c.events()).filter((e) => e.action === 'self-fenced');
  const allOn = async (pred: (node: string | null | undefined) => boolean) => {
    const s = await c.snapshot();
    return [...s.resources.values()].every((r) => r.rec?.state === 'started' && pred(r.rec.node));
  };

  it(`${stormSize} resources start on one node, then fail over together, with no self-fencing`, async () => {
    const leader = (await c.snapshot()).leader?.node;
    const victim = ['n1', 'n2', 'n3'].find((n) => n !== leader) as string;
    for (let i = 0; i < stormSize; i++)
      await c.defineService(`storm${i}`, 0, {
        // a bare process: the test is about the agent, not the service's own start-up cost
        process: { command: ['/bin/sleep', '3600'], stopTimeoutMs: 2000, startTimeoutMs: 5000 },
        health: undefined,
        preferredNode: victim,
        memory: 8,
        cpus: 0.01,
      });
    await c.waitFor(`all ${stormSize} started on ${victim}`, () => allOn((n) => n === victim), 90_000, 250);
    assert.deepEqual(
      (await selfFences()).map((e) => e.message),
      [],
      'no agent self-fences while one node starts everything',
    );
    const crash = await fenceLocal(join(c.stateRoot, victim), 10_000);
    assert.ok(crash.ok, crash.ok ? '' : crash.error);
    await c.waitFor(`all ${stormSize} started elsewhere`, () => allOn((n) => n !== victim), 90_000, 250);
    assert.deepEqual(
      (await selfFences()).map((e) => e.message),
      [],
      'the survivors keep their leases while they take everything over',
    );
    const lost = (await c.events()).filter(
      (e) => e.action === 'state' && e.to === 'unknown' && e.object !== victim,
    );
    assert.deepEqual(
      lost.map((e) => e.message),
      [],
      'no surviving node was ever seen without its lease',
    );
    assert.deepEqual(witnessOverlaps(c.witnessPath), []);
  });
});
