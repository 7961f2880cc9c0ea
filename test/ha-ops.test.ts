// Operator workflows on real agents: maintenance, a clean SIGTERM, cluster halt and form.
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { TestCluster, witnessOverlaps } from './helpers/cluster.js';

let port = 20100 + (process.pid % 400) * 2;
const nextPort = () => port++;

describe('operator workflows with real agents', { timeout: 180_000 }, () => {
  const c = new TestCluster({ nodes: [{ name: 'n1' }, { name: 'n2' }, { name: 'n3' }] });
  before(() => c.start());
  after(() => c.stop());

  it('maintenance on moves resources away; off lets them back only when preferred', async () => {
    await c.defineService('a', nextPort(), { preferredNode: 'n2' });
    await c.defineService('b', nextPort());
    assert.equal(await c.waitStarted('a'), 'n2');
    await c.waitStarted('b');
    const r = c.cli('node', 'maintenance', 'on', 'n2');
    assert.equal(r.code, 0, r.stderr);
    await c.waitStarted('a', 'n2');
    const s = await c.snapshot();
    assert.equal(s.nodes.get('n2')?.status?.state, 'maintenance');
    assert.ok(
      [...s.resources.values()].every((x) => x.rec?.node !== 'n2'),
      'nothing left on n2',
    );
    assert.equal(c.cli('node', 'maintenance', 'off', 'n2').code, 0);
    await c.waitFor('a back on its preferred node', async () => (await c.resourceOn('a')).node === 'n2');
    assert.equal(c.cli('node', 'maintenance', 'sideways', 'n2').code, 2);
    assert.equal(c.cli('node', 'maintenance', 'on', 'nope').code, 2);
  });

  it('SIGTERM stops an agent cleanly: the node is offline, not fenced, and its work moves', async () => {
    const node = (await c.resourceOn('a')).node as string;
    const fencesBefore = (await c.events()).filter((e) => e.action === 'fence-ok').length;
    process.kill(c.agentPid(node), 'SIGTERM');
    await c.waitFor(
      `${node} offline`,
      async () => (await c.snapshot()).nodes.get(node)?.status?.state === 'offline',
    );
    await c.waitStarted('a', node);
    const fencesAfter = (await c.events()).filter((e) => e.action === 'fence-ok').length;
    assert.equal(fencesAfter, fencesBefore, 'a clean leave needs no fencing');
    c.startAgent(node);
    await c.waitFor(
      `${node} online again`,
      async () => (await c.snapshot()).nodes.get(node)?.status?.state === 'online',
    );
  });

  it('disarm keeps everything untouched; arm restores recovery', async () => {
    assert.equal(c.cli('cluster', 'disarm').code, 0);
    const st = c.cli('status');
    assert.match(st.stdout, /DISARMED/);
    assert.equal(c.cli('cluster', 'arm').code, 0);
    assert.doesNotMatch(c.cli('status').stdout, /DISARMED/);
  });

  it('halt stops every resource then every agent; form --no-apps --local brings nodes back without resources', async () => {
    const r = c.cli('cluster', 'halt', '--timeout-ms', '30000');
    assert.equal(r.code, 0, r.stdout + r.stderr);
    await c.waitFor(
      'agents exited',
      async () => [...c.agents.values()].every((a) => a.exitCode !== null),
      15000,
    );
    const s = await c.snapshot();
    assert.ok(
      [...s.resources.values()].every((x) => x.rec?.state === 'stopped'),
      'all resources stopped',
    );
    const f = c.cli('cluster', 'form', '--no-apps', '--local');
    assert.equal(f.code, 0, f.stderr);
    await c.waitFor(
      'nodes online',
      async () => {
        const s2 = await c.snapshot();
        return ['n1', 'n2', 'n3'].every((n) => s2.nodes.get(n)?.status?.state === 'online');
      },
      30000,
    );
    await new Promise((res) => setTimeout(res, 1500));
    const s3 = await c.snapshot();
    assert.ok(
      [...s3.resources.values()].every((x) => x.rec?.state === 'stopped'),
      'apps stay stopped',
    );
    assert.match(s3.resources.get('a')?.rec?.reason ?? '', /no-apps/);
    assert.equal(c.cli('cluster', 'form').code, 0);
    await c.waitStarted('a');
    await c.waitStarted('b');
    assert.deepEqual(witnessOverlaps(c.witnessPath), []);
  });
});
