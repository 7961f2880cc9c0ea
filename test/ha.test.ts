// The HA engine for real: agent processes on one SQLite store, real services, real kills.
// Every test checks the witness: no two copies of a service ever ran at the same time.
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { writeFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { TestCluster, witnessOverlaps, corralBin } from './helpers/cluster.js';

let port = 19100 + (process.pid % 400) * 2;
const nextPort = () => port++;

describe('HA engine with real agents', { timeout: 240_000 }, () => {
  describe('kill -9 of an agent', () => {
    const c = new TestCluster({ nodes: [{ name: 'n1' }, { name: 'n2' }, { name: 'n3' }] });
    before(() => c.start());
    after(() => c.stop());

    it('recovers its services on other nodes, never running two copies', async () => {
      await c.defineService('web', nextPort());
      await c.defineService('api', nextPort(), { preferredNode: 'n2' });
      const webNode = await c.waitStarted('web');
      const apiNode = await c.waitStarted('api');
      assert.equal(apiNode, 'n2');
      // kill the agent of the node running api (and maybe web); its services keep running until fenced
      process.kill(c.agentPid('n2'), 'SIGKILL');
      const t = await c.waitFor(
        'api recovered elsewhere',
        async () => {
          const r = await c.resourceOn('api');
          return r.state === 'started' && r.node !== 'n2';
        },
        30000,
      );
      assert.ok(t < 20000, `recovery took ${t} ms`);
      const evs = await c.events();
      assert.ok(
        evs.some((e) => e.object === 'n2' && e.action === 'fence-ok'),
        'fence of n2 recorded',
      );
      if (webNode === 'n2') await c.waitStarted('web', 'n2');
      await new Promise((r) => setTimeout(r, 500));
      assert.deepEqual(witnessOverlaps(c.witnessPath), []);
    });

    it('status answers from the store with id, node and state', () => {
      const r = c.cli('status', '--json');
      assert.equal(r.code, 0, r.stderr);
      const s = JSON.parse(r.stdout) as { resources: { id: string; node: string; state: string }[] };
      const api = s.resources.find((x) => x.id === 'api');
      assert.ok(api && api.state === 'started' && api.node && api.node !== 'n2');
    });
  });

  describe('fence device failure', () => {
    // n2's only device is a command that fails until a flag file exists, then does the real work
    const flag = join('/tmp', `corral-fence-ok-${process.pid}`);
    const c = new TestCluster({
      nodes: [
        { name: 'n1' },
        {
          name: 'n2',
          fence: `[{ type: command, command: [/bin/sh, -c, 'test -f ${flag} || { echo "power switch unreachable" >&2; exit 1; }; exec ${process.execPath} ${corralBin} node crash "$0" --config "$CORRAL_TEST_CONFIG"'], timeoutMs: 10000 }]`,
        },
      ],
    });
    before(async () => {
      process.env.CORRAL_TEST_CONFIG = c.configPath;
      rmSync(flag, { force: true });
      await c.start();
    });
    after(async () => {
      rmSync(flag, { force: true });
      await c.stop();
    });

    it('waits for a successful fence before recovering, and says why', async () => {
      await c.defineService('db', nextPort(), { preferredNode: 'n2' });
      assert.equal(await c.waitStarted('db'), 'n2');
      process.kill(c.agentPid('n2'), 'SIGKILL');
      await c.waitFor('a failed fence event', async () =>
        (await c.events()).some(
          (e) =>
            e.object === 'n2' &&
            e.action === 'fence-failed' &&
            e.message.includes('power switch unreachable'),
        ),
      );
      const r = await c.resourceOn('db');
      assert.equal(r.state, 'recovering');
      assert.equal(r.node, 'n2');
      assert.match(r.reason ?? '', /waiting for fence/);
      writeFileSync(flag, 'ok');
      const node = await c.waitStarted('db', 'n2', 30000);
      assert.equal(node, 'n1');
      assert.deepEqual(witnessOverlaps(c.witnessPath), []);
    });
  });

  describe('frozen agent (SIGSTOP past its lease), no fence device', () => {
    const c = new TestCluster({
      nodes: [
        { name: 'n1', fence: '[]' },
        { name: 'n2', fence: '[]' },
      ],
    });
    before(() => c.start());
    after(() => c.stop());

    it('its watchdog kills the service, the manager recovers after the deadline, the agent self-fences on wake', async () => {
      await c.defineService('app', nextPort());
      const frozen = await c.waitStarted('app');
      const other = frozen === 'n1' ? 'n2' : 'n1';
      const pid = c.agentPid(frozen);
      process.kill(pid, 'SIGSTOP');
      assert.equal(await c.waitStarted('app', frozen, 30000), other);
      const evs0 = await c.events();
      assert.ok(
        evs0.some(
          (e) => e.object === frozen && e.action === 'fence-ok' && e.message.includes('self-fence deadline'),
        ),
      );
      process.kill(pid, 'SIGCONT');
      await c.waitFor(
        `${frozen} back online`,
        async () => (await c.snapshot()).nodes.get(frozen)?.status?.state === 'online',
      );
      const evs = await c.events();
      assert.ok(
        evs.some((e) => e.object === frozen && e.action === 'self-fenced'),
        `${frozen} self-fenced on wake`,
      );
      await new Promise((r) => setTimeout(r, 1000));
      assert.equal((await c.resourceOn('app')).node, other, 'stays where it is (stickiness)');
      assert.deepEqual(witnessOverlaps(c.witnessPath), []);
    });
  });

  describe('leader killed in the middle of a recovery', () => {
    const slowFence = () =>
      `[{ type: command, command: [/bin/sh, -c, 'sleep 1.5; exec ${process.execPath} ${corralBin} node crash "$0" --config "$CORRAL_TEST_CONFIG2"'], timeoutMs: 10000 }, { type: local }]`;
    const c = new TestCluster({
      nodes: [
        { name: 'n1', fence: slowFence() },
        { name: 'n2', fence: slowFence() },
        { name: 'n3', fence: slowFence() },
      ],
    });
    before(async () => {
      process.env.CORRAL_TEST_CONFIG2 = c.configPath;
      await c.start();
    });
    after(() => c.stop());

    it('the new leader finishes it; nothing lost or doubled', async () => {
      const s0 = await c.snapshot();
      const leader = s0.leader?.node as string;
      const victim = ['n1', 'n2', 'n3'].find((n) => n !== leader) as string;
      await c.defineService('s1', nextPort(), { preferredNode: victim });
      await c.defineService('s2', nextPort(), { preferredNode: leader });
      await c.waitStarted('s1');
      await c.waitStarted('s2');
      process.kill(c.agentPid(victim), 'SIGKILL');
      await c.waitFor(
        `${victim} fencing`,
        async () => (await c.snapshot()).nodes.get(victim)?.status?.state === 'fencing',
      );
      process.kill(c.agentPid(leader), 'SIGKILL');
      const survivor = ['n1', 'n2', 'n3'].find((n) => n !== leader && n !== victim) as string;
      await c.waitFor(
        'both services on the survivor',
        async () => {
          const a = await c.resourceOn('s1');
          const b = await c.resourceOn('s2');
          return a.state === 'started' && a.node === survivor && b.state === 'started' && b.node === survivor;
        },
        45000,
      );
      const s = await c.snapshot();
      assert.equal(s.leader?.node, survivor);
      assert.ok((s.leader?.term ?? 0) >= 2);
      assert.deepEqual(witnessOverlaps(c.witnessPath), []);
    });
  });

  describe('capacity and bad input', () => {
    const c = new TestCluster({
      nodes: [
        { name: 'n1', memory: 256 },
        { name: 'n2', memory: 256 },
      ],
    });
    before(() => c.start());
    after(() => c.stop());

    it('places high priority first; the rest stay stopped with reason capacity', async () => {
      await c.defineService('hi', nextPort(), { memory: 200, priority: 100 });
      await c.defineService('mid', nextPort(), { memory: 200, priority: 50 });
      await c.defineService('lo', nextPort(), { memory: 200, priority: 0 });
      await c.waitStarted('hi');
      await c.waitStarted('mid');
      await c.waitFor('lo stopped for capacity', async () => {
        const r = await c.resourceOn('lo');
        return r.state === 'stopped' && /^capacity/.test(r.reason ?? '');
      });
    });

    it('rejects a malformed resource definition precisely; agents keep running', () => {
      const bad = join(c.dir, 'bad.yaml');
      writeFileSync(bad, 'id: Bad_Name\nprocess:\n  command: []\nmemory: lots\ncolour: red\n');
      const r = c.cli('resource', 'define', '-f', bad);
      assert.equal(r.code, 1);
      assert.match(r.stderr, /bad\.yaml:1:5 id: expected a resource id/);
      assert.match(r.stderr, /bad\.yaml:3:12 process\.command/);
      assert.match(r.stderr, /bad\.yaml:4:9 memory: .*got "lots"/);
      assert.match(r.stderr, /bad\.yaml:5:1 colour: unknown key/);
      for (const a of c.agents.values()) assert.equal(a.exitCode, null, 'agent still running');
    });

    it('cleanup, stop and start through the CLI', async () => {
      assert.equal(c.cli('resource', 'stop', 'hi').code, 0);
      await c.waitFor('hi stopped', async () => (await c.resourceOn('hi')).state === 'stopped');
      // capacity freed: lo can run now
      await c.waitStarted('lo');
      assert.equal(c.cli('resource', 'start', 'nope').code, 1);
    });
  });
});
