// Live migration of a QEMU VM between two namespaced hosts over TCP (issue 5): a NetCluster
// (hosts in `ip netns`, veth to a bridge, a real 3-member etcd, one corral agent per host)
// runs a small TCG VM on h1; `corral vm migrate` moves it to h2. The stream must cross the
// veth link: the target listens on its node address (recorded in the hand-over), and an nft
// counter in h2's namespace sees at least the bytes QEMU says it sent arrive from h1's address.
// Same guest: the boot stamp in guest RAM (marker disk) is unchanged and its tick counter went
// on, read over each QEMU's second QMP monitor; QMP status is 'running' on h2 and the h1 QEMU
// is gone. No double run: a sampler queries both monitors in turn all along and writes a
// witness line per 'running' answer; the harness's overlap check must find none.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { appendFileSync, existsSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { NetCluster, netnsMissing, repo, type Host } from './cluster/netcluster.js';
import { QmpClient } from '../src/drivers/qmp.js';
import { vmPaths } from '../src/drivers/qemu-paths.js';
import { readPidfile } from '../src/drivers/pidfile.js';
import { isAlive } from '../src/drivers/proc.js';
import type { AgentStatus, ResourceRecord } from '../src/core/types.js';
import { MARKER_ADDR, parseMarker, writeMarkerDisk } from './fixtures/vm/marker-disk.js';

const hasQemu = spawnSync('qemu-system-x86_64', ['-version']).status === 0;
const skip =
  netnsMissing() ??
  (hasQemu ? undefined : 'needs qemu-system-x86_64 (Debian: apt-get install qemu-system-x86)');
const corralBin = join(repo, 'bin', 'corral.js');
const id = 'netmig.example.org';
/** the sampler's period (each round asks h1's monitor, then h2's) */
const SAMPLE_MS = 10;
/** bound on the CLI's wait for the hand-over */
const MIGRATE_TIMEOUT_MS = 90_000;

const now = () => performance.timeOrigin + performance.now();

test(
  'vm migrate between two namespaced hosts over TCP: same guest, stream on the veth link, never two copies running',
  { timeout: 300_000, skip },
  async (t) => {
    // a longer lease: TCG QEMU, 3 etcd members and 3 agents share 2 cores
    const c = new NetCluster({ hosts: 3, leaseTtlMs: 6000 });
    const cli = (...args: string[]) =>
      spawnSync(process.execPath, [corralBin, ...args, '--config', c.configPath], {
        encoding: 'utf8',
        timeout: 60_000,
        env: { ...process.env, CORRAL_HOME: join(c.dir, 'home') },
      });
    const stateDir = (h: Host) => join(h.stateRoot, h.name);
    const monitors = new Map<string, { q: QmpClient; pid: number }>();
    let sampling = true;
    let sampler: Promise<void> = Promise.resolve();
    try {
      await c.start();
      const [h1, h2] = [c.host('h1'), c.host('h2')];
      const disk = join(c.dir, 'marker.img');
      writeMarkerDisk(disk);
      const yaml = join(c.dir, 'netmig.yaml');
      writeFileSync(
        yaml,
        [
          `name: ${id}`,
          'memory: 64',
          'vnc: false',
          'accel: tcg',
          `disks:\n  - { path: ${disk}, readOnly: true }`,
          'shutdownTimeoutMs: 500',
          'preferredNode: h1',
          '',
        ].join('\n'),
      );
      const d = cli('vm', 'define', '-f', yaml);
      assert.equal(d.status, 0, d.stdout + d.stderr);
      assert.equal(await c.waitStarted(id, undefined, 60_000), 'h1');

      // one persistent connection per QEMU on its admin monitor (single client per socket)
      const monitor = async (h: Host) => {
        const have = monitors.get(h.name);
        if (have) return have.q;
        const sock = vmPaths(stateDir(h), id).adminQmpSocket;
        if (!existsSync(sock)) return undefined;
        const q = await QmpClient.connect(sock).catch(() => undefined);
        if (!q) return undefined;
        const pid = readPidfile(stateDir(h), id)?.pid ?? -1;
        q.onClose(() => {
          if (monitors.get(h.name)?.q === q) monitors.delete(h.name);
        });
        monitors.set(h.name, { q, pid });
        return q;
      };
      const marker = async (h: Host) => {
        const q = await monitor(h);
        assert.ok(q, `a QEMU monitor for ${id} on ${h.name}`);
        const m = parseMarker(await q.hmp(`xp /3wx ${MARKER_ADDR}`));
        const st = await q.execute<{ status: string }>('query-status');
        return { ...m, status: st.status };
      };
      let before = await marker(h1);
      for (let i = 0; i < 100 && !(before.ticks > 0); i++) {
        await new Promise((r) => setTimeout(r, 100));
        before = await marker(h1);
      }
      assert.ok(before.ticks > 0, `the guest booted on h1 (${JSON.stringify(before)})`);
      const srcPid = readPidfile(stateDir(h1), id);
      assert.ok(srcPid, 'pidfile of the h1 QEMU');

      // every QMP 'running' answer is a witness line; h1 is asked before h2 in each round and a
      // line carries the time the question was sent, so a correct hand-over never overlaps
      const answers = { h1: 0, h2: 0 };
      sampler = (async () => {
        while (sampling) {
          for (const h of [h1, h2]) {
            const q = await monitor(h);
            if (!q) continue;
            const tMs = now();
            const st = await q
              .execute<{ status: string }>('query-status', undefined, 2000)
              .catch(() => undefined);
            if (!st) continue;
            answers[h.name as 'h1' | 'h2']++;
            if (st.status === 'running')
              appendFileSync(
                c.witnessPath,
                JSON.stringify({
                  resource: id,
                  node: h.name,
                  epoch: 0,
                  pid: monitors.get(h.name)?.pid ?? -1,
                  tMs,
                }) + '\n',
              );
          }
          await new Promise((r) => setTimeout(r, SAMPLE_MS));
        }
      })();

      // the migration stream only: traffic from h1 to h2 that is not etcd's
      spawnSync('ip', [
        'netns',
        'exec',
        h2.ns,
        'nft',
        `add rule inet crl cin iifname "eth0" ip saddr ${h1.ip} tcp sport != { 2379, 2380 } tcp dport != { 2379, 2380 } counter`,
      ]);
      const epoch0 = (await c.resourceOn(id)).epoch ?? 0;
      // the hand-over record, read while the CLI follows it: where the target listens
      let incoming: { host: string; port: number } | undefined;
      let watching = true;
      const watcher = (async () => {
        while (watching && !incoming) {
          const kv = await c.store.get(c.k.assign(id)).catch(() => undefined);
          const rec = kv ? (JSON.parse(kv.value) as ResourceRecord) : undefined;
          if (rec?.migration?.incoming) incoming = rec.migration.incoming;
          await new Promise((r) => setTimeout(r, 20));
        }
      })();
      const mig = await new Promise<{ code: number | null; out: string }>((resolve) => {
        const p = spawn(
          process.execPath,
          [
            corralBin,
            'vm',
            'migrate',
            id,
            'h2',
            '--timeout-ms',
            String(MIGRATE_TIMEOUT_MS),
            '--config',
            c.configPath,
          ],
          { env: { ...process.env, CORRAL_HOME: join(c.dir, 'home') } },
        );
        let out = '';
        p.stdout.on('data', (b: Buffer) => (out += b.toString()));
        p.stderr.on('data', (b: Buffer) => (out += b.toString()));
        p.on('close', (code) => resolve({ code, out }));
      });
      watching = false;
      await watcher;
      assert.equal(mig.code, 0, mig.out);
      assert.match(mig.out, /now on h2/);
      // let the sampler see the settled state a few more rounds
      await new Promise((r) => setTimeout(r, 500));
      sampling = false;
      await sampler;

      const rec = await c.resourceOn(id);
      assert.equal(rec.node, 'h2');
      assert.equal(rec.state, 'started');
      assert.ok((rec.epoch ?? 0) > epoch0, 'the target owns the VM at a new epoch');
      const evs = await c.events();
      assert.ok(
        evs.some((e) => e.object === id && /migrated h1 -> h2/.test(e.message)),
        'moved live, not restarted',
      );

      // over the namespaced network: the target listened on its node address ...
      assert.deepEqual(incoming?.host, h2.ip, `target address in the hand-over: ${JSON.stringify(incoming)}`);
      // ... and h2's eth0 received at least what QEMU sent
      const st = await c.store.get(c.k.status('h1', id));
      const progress = st ? (JSON.parse(st.value) as AgentStatus).progress : undefined;
      assert.ok(progress && progress.transferredBytes > 0, `source progress: ${JSON.stringify(progress)}`);
      const chain = spawnSync('ip', ['netns', 'exec', h2.ns, 'nft', 'list', 'chain', 'inet', 'crl', 'cin'], {
        encoding: 'utf8',
      }).stdout;
      const bytes = Number(/counter packets \d+ bytes (\d+)/.exec(chain)?.[1] ?? NaN);
      assert.ok(
        bytes >= progress.transferredBytes,
        `h2 eth0 got ${bytes} bytes from ${h1.ip}, QEMU sent ${progress.transferredBytes}`,
      );

      // the same guest runs on h2; the h1 QEMU is gone
      const afterM = await marker(h2);
      assert.equal(afterM.status, 'running');
      assert.equal(afterM.stamp, before.stamp, 'same guest: boot stamp carried over');
      assert.ok(
        afterM.ticks > before.ticks,
        `the guest went on counting (${before.ticks} -> ${afterM.ticks})`,
      );
      await c.waitFor('the h1 QEMU gone', async () => !isAlive(srcPid.pid, srcPid.startTime), 10_000);

      // never two copies running: the witness overlap check over both monitors' answers
      assert.ok(
        answers.h1 > 0 && answers.h2 > 0,
        `the sampler asked both QEMUs (${JSON.stringify(answers)})`,
      );
      const spans = c.witnessNodes(id);
      assert.deepEqual(spans, ['h1', 'h2'], 'running on h1, then on h2, and never back');
      t.diagnostic(
        `stream ${progress.transferredBytes} B (h2 eth0 counted ${bytes} B), downtime ${progress.downtimeMs} ms, QMP answers ${JSON.stringify(answers)}`,
      );
      const problems = await c.verdict([id]);
      assert.deepEqual(problems, [], problems.join('\n'));
    } catch (e) {
      process.stderr.write(`cluster dir ${c.dir}; agent log tails:\n${c.agentLogTails()}`);
      throw e;
    } finally {
      sampling = false;
      await sampler.catch(() => undefined);
      for (const m of monitors.values()) m.q.close();
      await c.stop();
    }
  },
);
