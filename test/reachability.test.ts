// Reachability of the hosts' router on namespaced hosts (issue 8): a host that no longer
// reaches any known address reports itself isolated and its service moves away, orderly.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { NetCluster, netnsMissing } from './cluster/netcluster.js';
import { probeTcp } from '../src/health/reachability.js';

const skip = netnsMissing();

test('the TCP probe: a refusal proves reachability, a black hole does not', async () => {
  assert.equal(await probeTcp('127.0.0.1', 1, 500), true);
});

test(
  'reachability loss on one host: isolated, its service moves away without fencing',
  { timeout: 180_000 },
  async (t) => {
    if (skip) return t.skip(skip);
    const c = new NetCluster({ hosts: 3, reachability: true });
    try {
      await c.start();
      const leader = (await c.snapshot()).leader?.node;
      const victim = c.hosts.find((h) => h.name !== leader)!.name;
      await c.defineService('web', 8080, { preferredNode: victim });
      await c.waitFor('web on victim', async () => {
        const r = await c.resourceOn('web');
        return r.node === victim && r.state === 'started';
      });
      const before = (await c.events()).length;
      c.cutRouter(victim);
      await c.waitFor(
        'victim isolated',
        async () => (await c.snapshot()).nodes.get(victim)?.alive?.isolated === true,
      );
      assert.notEqual(await c.waitStarted('web', victim), victim);
      const evs = (await c.events()).slice(before);
      assert.deepEqual(
        evs.filter((e) => e.action === 'self-fenced' || e.action === 'fence-ok').map((e) => e.message),
        [],
      );
      c.heal(victim);
      await c.waitFor(
        'victim reachable',
        async () => !(await c.snapshot()).nodes.get(victim)?.alive?.isolated,
      );
      const problems = await c.verdict(['web']);
      assert.deepEqual(problems, [], problems.join('\n'));
    } catch (e) {
      for (const h of c.hosts) process.stderr.write(`--- ${h.name}\n${c.agentLog(h.name).slice(-3000)}\n`);
      throw e;
    } finally {
      await c.stop();
    }
  },
);
