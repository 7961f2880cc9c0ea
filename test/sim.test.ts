// The deterministic simulator: every scenario under sim/scenarios (expectations, invariants,
// transition log unchanged), determinism, the invariant checker itself, the scenario parser's
// errors, and a seed sweep of >= 2000 fuzz seeds on two worker threads.
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, readdirSync, existsSync } from 'node:fs';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { parseScenario, parseScenarioText, formatScenario, ScenarioError } from '../src/sim/scenario.js';
import { runScenario, describeFailure } from '../src/sim/run.js';
import { formatLog } from '../src/sim/log.js';
import { fuzzScenario } from '../src/sim/fuzz.js';
import { runFuzzSeeds } from '../src/sim/pool.js';
import { World } from '../src/sim/world.js';

const dir = 'sim/scenarios';
const files = readdirSync(dir)
  .filter((f) => f.endsWith('.scn') || f.endsWith('.json'))
  .sort();
/** CI bound from issue 4: scenarios + >= 2000 seeds in under 3 minutes on 2 cores */
const fuzzSeeds = Number(process.env.CORRAL_SIM_SEEDS ?? 2000);
const fuzzTimeoutMs = 170_000;
/** seeds of the sweep with a heartbeat disk (sbd device, disk loss, lease-revoking store outages) */
const diskFuzzSeeds = Number(process.env.CORRAL_SIM_DISK_SEEDS ?? 300);

describe('sim scenarios', () => {
  it(`at least 40 scenarios`, () => {
    assert.ok(files.length >= 40, `${files.length} scenarios`);
  });
  for (const f of files) {
    it(f, { timeout: 30_000 }, async () => {
      const path = join(dir, f);
      const scn = parseScenario(readFileSync(path, 'utf8'), f.replace(/\.(scn|json)$/, ''), path);
      const r = await runScenario(scn);
      assert.ok(r.ok, describeFailure(r));
      const logFile = path.replace(/\.(scn|json)$/, '.log');
      assert.ok(existsSync(logFile), `${logFile} missing: run corral sim run ${path} --update`);
      assert.equal(
        formatLog(r.log),
        readFileSync(logFile, 'utf8'),
        `${path}: the transition log changed; review with corral sim run ${path}, then --update`,
      );
    });
  }
});

describe('sim determinism', () => {
  it(
    'the same scenario twice gives byte-identical logs; both drain modes agree',
    { timeout: 60_000 },
    async () => {
      for (const f of [
        'flapping-node.scn',
        'leader-crash-during-fencing.scn',
        'freeze-watchdog-no-device.scn',
        'disk-cut-from-store.scn',
      ]) {
        const path = join(dir, f);
        const scn = parseScenario(readFileSync(path, 'utf8'), f, path);
        const a = formatLog((await runScenario(scn)).log);
        const b = formatLog((await runScenario(scn)).log);
        const c = formatLog((await runScenario(scn, { drain: 'immediate' })).log);
        assert.equal(a, b, `${f}: two runs differ`);
        assert.equal(a, c, `${f}: microtask and macrotask draining differ`);
      }
      for (const seed of [3, 17, 42]) {
        const s1 = formatLog((await runScenario(fuzzScenario(seed))).log);
        const s2 = formatLog((await runScenario(fuzzScenario(seed), { drain: 'immediate' })).log);
        assert.equal(s1, s2, `fuzz seed ${seed} is not deterministic`);
        const d1 = formatLog((await runScenario(fuzzScenario(seed, { disk: true }))).log);
        const d2 = formatLog(
          (await runScenario(fuzzScenario(seed, { disk: true }), { drain: 'immediate' })).log,
        );
        assert.equal(d1, d2, `fuzz seed ${seed} with a disk is not deterministic`);
      }
    },
  );

  it('a fuzz scenario survives format -> parse unchanged', () => {
    for (const seed of [1, 2, 99]) {
      for (const s of [fuzzScenario(seed), fuzzScenario(seed, { disk: true })]) {
        const again = parseScenarioText(formatScenario(s), s.name);
        assert.equal(formatScenario(again), formatScenario(s));
      }
    }
    assert.match(
      formatScenario(fuzzScenario(1, { disk: true })),
      /^disk interval=1s msgwait=6s timeout=10s$/m,
    );
  });
});

describe('sim invariant checker', () => {
  it('catches a second copy started by hand (ground truth, not the store)', { timeout: 10_000 }, async () => {
    const scn = parseScenarioText('node node1\nnode node2\nresource web prefer=node1\nend 10s', 'double');
    const w = new World(scn);
    w.setup();
    await w.run({ untilMs: 5000 });
    assert.equal(w.violations.length, 0);
    const n2 = w.nodes.get('node2');
    assert.ok(n2?.agent);
    void w.startProc(n2, n2.agent.owner, { id: 'web' } as never, 99);
    assert.match(w.violations[0]?.message ?? '', /DOUBLE RUN: web starting on node2/);
    assert.ok((w.violations[0]?.trace.length ?? 0) > 5, 'a trace comes with it');
    assert.match(w.violations[0]?.state ?? '', /node node1: power=on/);
  });

  it(
    'catches a recovery before fencing (the node was only powered off, nobody fenced it)',
    { timeout: 10_000 },
    async () => {
      const scn = parseScenarioText(
        'node node1\nnode node2\nresource web prefer=node1\nat 3s power node1 off\nend 10s',
        'early',
      );
      const w = new World(scn);
      w.setup();
      await w.run({ untilMs: 4000 });
      assert.equal(w.violations.length, 0);
      const n2 = w.nodes.get('node2');
      assert.ok(n2?.agent);
      void w.startProc(n2, n2.agent.owner, { id: 'web' } as never, 2);
      assert.match(w.violations[0]?.message ?? '', /RECOVERY BEFORE FENCE: web starting on node2/);
    },
  );

  it('reports an unmet expectation with what it saw', { timeout: 10_000 }, async () => {
    const scn = parseScenarioText('node node1\nresource web\nexpect web on node1 by 0.5s\nend 5s', 'early');
    const r = await runScenario(scn);
    assert.equal(r.ok, false);
    assert.match(
      describeFailure(r),
      /expectation failed \(line 3\).*web on node1 by 0.5s: record (starting|missing)/,
    );
  });
});

describe('sim scenario parser', () => {
  const bad = (src: string, re: RegExp) => {
    assert.throws(
      () => parseScenarioText(src, 't', 'file.scn'),
      (e: unknown) => e instanceof ScenarioError && re.test(e.message) && !!e.hint,
    );
  };
  it('names file:line and gives a hint', () => {
    bad('node node1\nat 5x power node1 off', /file\.scn:2: bad duration "5x"/);
    bad('node node1\nat 5s power node9 off', /file\.scn:2: unknown node "node9"/);
    bad('node node1\nresource web colour=red', /file\.scn:2: unknown resource option "colour"/);
    bad('node node1\nfrobnicate', /file\.scn:2: unknown statement "frobnicate"/);
    bad('resource web', /no node defined/);
    bad('node node1\nexpect web flying', /file\.scn:2: cannot parse expectation/);
    bad('node node1\nat 50s power node1 off\nend 10s', /after the end/);
    bad(
      'node node1\nat 5s disk node1 lost',
      /file\.scn:2: "disk node1 lost" but the scenario has no heartbeat disk/,
    );
    bad(
      'node node1\ndisk msgwait=1s',
      /file\.scn:2: msgwait 1000 ms is less than timings noDeviceFenceMarginMs/,
    );
    bad('node node1\ndisk msgwait=12s', /file\.scn:2: msgwait 12000 ms must be less than timeout 10000 ms/);
    bad('node node1\ndisk colour=red', /file\.scn:2: unknown disk option "colour"/);
    bad('node node1\ndisk\nat 5s disk node1 gone', /file\.scn:3: cannot parse command/);
    bad('node node1\nat 5s store up later', /file\.scn:2: cannot parse command/);
  });
  it('accepts the JSON form with the same steps', async () => {
    const json = JSON.stringify({
      description: 'json form',
      nodes: [{ name: 'node1' }, { name: 'node2', fence: [] }],
      resources: ['web prefer=node2'],
      steps: ['at 5s power node2 off', 'expect web on node1 by 20s'],
      end: '25s',
    });
    const r = await runScenario(parseScenario(json, 'json'));
    assert.ok(r.ok, describeFailure(r));
  });
});

describe('sim fuzz', () => {
  it(
    `${fuzzSeeds} seeds on 2 worker threads: no invariant violation, every run converges`,
    { timeout: fuzzTimeoutMs },
    async () => {
      const seeds = Array.from({ length: fuzzSeeds }, (_, i) => 1 + i);
      const failures: string[] = [];
      const t0 = performance.now();
      let simMs = 0;
      await runFuzzSeeds(seeds, {}, 2, (r) => {
        simMs += r.simMs;
        if (!r.ok)
          failures.push(
            `seed ${r.seed}: ${r.problem ?? ''} (reproduce: corral sim fuzz --seeds 1 --seed-start ${r.seed})`,
          );
      });
      const wallS = (performance.now() - t0) / 1000;
      process.stdout.write(
        `# sim fuzz: ${fuzzSeeds} seeds in ${wallS.toFixed(1)} s = ${(fuzzSeeds / wallS).toFixed(1)} seeds/s, ${(simMs / 1000 / wallS).toFixed(0)} simulated s per wall s\n`,
      );
      assert.deepEqual(failures, []);
    },
  );
  it(
    `${diskFuzzSeeds} seeds with a heartbeat disk (sbd, disk loss, lease-revoking store outages): no invariant violation, every run converges`,
    { timeout: fuzzTimeoutMs },
    async () => {
      const seeds = Array.from({ length: diskFuzzSeeds }, (_, i) => 1 + i);
      const failures: string[] = [];
      await runFuzzSeeds(seeds, { disk: true }, 2, (r) => {
        if (!r.ok)
          failures.push(
            `seed ${r.seed}: ${r.problem ?? ''} (reproduce: corral sim fuzz --disk --seeds 1 --seed-start ${r.seed})`,
          );
      });
      assert.deepEqual(failures, []);
    },
  );
});
