// The process driver against real processes: start with health checks, crash and health
// failure detection, stop with timeout then SIGKILL, killAll, adoption after an agent
// restart, precise start failure reasons, and argv passed without a shell.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync, mkdirSync } from 'node:fs';
import { createServer } from 'node:net';
import { getPriority, tmpdir } from 'node:os';
import { join } from 'node:path';
import { ProcessDriver } from '../src/drivers/process.js';
import { readPidfile } from '../src/drivers/pidfile.js';
import { isAlive } from '../src/drivers/proc.js';
import { ResourceSpec, type ResourceSpecInput } from '../src/core/spec.js';
import type { DriverEvent } from '../src/env/types.js';

const echo = join(import.meta.dirname, 'fixtures', 'services', 'http-echo.mjs');
/** bound on waiting for an event in these tests */
const EVENT_WAIT_MS = 3000;

const quiet = { log: () => {} };

async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as { port: number }).port;
      s.close(() => resolve(port));
    });
  });
}

function spec(input: ResourceSpecInput): ResourceSpec {
  return ResourceSpec.parse(input);
}

async function echoSpec(id: string, extra: string[] = [], over: Partial<ResourceSpecInput> = {}) {
  const port = await freePort();
  return {
    port,
    spec: spec({
      id,
      process: {
        command: [process.execPath, echo, String(port), ...extra],
        startTimeoutMs: 5000,
        stopTimeoutMs: 2000,
      },
      health: {
        type: 'http',
        url: `http://127.0.0.1:${port}/`,
        intervalMs: 100,
        timeoutMs: 500,
        failures: 2,
      },
      ...over,
    }),
  };
}

function setup(t: { after: (fn: () => Promise<void> | void) => void }, node = 'n1') {
  const dir = mkdtempSync(join(tmpdir(), 'corral-driver-'));
  const drivers: ProcessDriver[] = [];
  const make = () => {
    const d = new ProcessDriver({ node, stateDir: dir, env: quiet });
    drivers.push(d);
    return d;
  };
  t.after(async () => {
    for (const d of drivers) await d.killAll();
    for (const d of drivers) await d.close();
    rmSync(dir, { recursive: true, force: true });
  });
  return { dir, make };
}

function nextEvent(events: DriverEvent[], fromIndex: number): Promise<DriverEvent> {
  const deadline = Date.now() + EVENT_WAIT_MS;
  return new Promise((resolve, reject) => {
    const tick = () => {
      const ev = events[fromIndex];
      if (ev) return resolve(ev);
      if (Date.now() > deadline) return reject(new Error(`no driver event within ${EVENT_WAIT_MS} ms`));
      setTimeout(tick, 10);
    };
    tick();
  });
}

async function get(port: number): Promise<{ resource: string; node: string; epoch: number; pid: number }> {
  const res = await fetch(`http://127.0.0.1:${port}/`, { signal: AbortSignal.timeout(2000) });
  return (await res.json()) as { resource: string; node: string; epoch: number; pid: number };
}

test('starts a service, passes its health check, records a pidfile; a crash is reported at once', async (t) => {
  const { dir, make } = setup(t);
  const d = make();
  const events: DriverEvent[] = [];
  d.onEvent((ev) => events.push(ev));
  const { port, spec: s } = await echoSpec('web');
  const r = await d.start(s, 7);
  assert.equal(r.state, 'started', r.reason);
  assert.equal(r.epoch, 7);
  const body = await get(port);
  assert.deepEqual([body.resource, body.node, body.epoch], ['web', 'n1', 7]);
  const pf = readPidfile(dir, 'web');
  assert.ok(pf);
  assert.equal(pf.pid, body.pid);
  assert.equal(pf.pgid, body.pid);
  assert.equal(pf.epoch, 7);
  assert.ok(isAlive(pf.pid, pf.startTime));
  assert.match(readFileSync(join(dir, 'logs', 'web.log'), 'utf8'), /listening on/);
  // idempotent: same epoch, no restart
  const again = await d.start(s, 7);
  assert.equal(again.state, 'started');
  assert.equal((await get(port)).pid, body.pid);

  const t0 = Date.now();
  process.kill(body.pid, 'SIGKILL');
  const ev = await nextEvent(events, 0);
  assert.equal(ev.type, 'failed');
  assert.equal(ev.id, 'web');
  assert.equal(ev.epoch, 7);
  assert.match(ev.reason, /killed by signal SIGKILL/);
  assert.ok(Date.now() - t0 < 500, `crash seen after ${Date.now() - t0} ms`);
  assert.equal(d.list()[0]?.state, 'failed');
  // the failed resource restarts in place on request
  const r2 = await d.start(s, 8);
  assert.equal(r2.state, 'started', r2.reason);
  assert.notEqual((await get(port)).pid, body.pid);
});

test('health check failures while started kill the group and emit failed', async (t) => {
  const { make } = setup(t);
  const d = make();
  const events: DriverEvent[] = [];
  d.onEvent((ev) => events.push(ev));
  const { spec: s } = await echoSpec('sick', ['--fail-health-after-ms', '300']);
  const r = await d.start(s, 1);
  assert.equal(r.state, 'started', r.reason);
  const ev = await nextEvent(events, 0);
  assert.match(ev.reason, /http check GET .* failed 2 times in a row: status 500, expected 200/);
  const pf = readPidfile(d['stateDir'], 'sick');
  // the pidfile goes once the group is gone
  for (let i = 0; i < 100 && readPidfile(d['stateDir'], 'sick'); i++)
    await new Promise((res) => setTimeout(res, 20));
  assert.equal(readPidfile(d['stateDir'], 'sick'), null, `pidfile still there: ${JSON.stringify(pf)}`);
});

test('exec and tcp checks; env, cwd and shell mode', async (t) => {
  const { dir, make } = setup(t);
  const d = make();
  const work = join(dir, 'work');
  mkdirSync(work);
  const flag = join(dir, 'ready');
  const port = await freePort();
  const r = await d.start(
    spec({
      id: 'sh1',
      process: {
        command: [
          `echo "res=$CORRAL_RESOURCE node=$CORRAL_NODE epoch=$CORRAL_EPOCH x=$X pwd=$(pwd)"; touch ${flag}; exec sleep 30`,
        ],
        shell: true,
        env: { X: 'forty-two' },
        cwd: work,
      },
      health: { type: 'exec', command: ['test', '-f', flag], intervalMs: 200 },
    }),
    3,
  );
  assert.equal(r.state, 'started', r.reason);
  assert.match(
    readFileSync(join(dir, 'logs', 'sh1.log'), 'utf8'),
    new RegExp(`res=sh1 node=n1 epoch=3 x=forty-two pwd=${work}`),
  );
  const r2 = await d.start(
    spec({
      id: 'tcp1',
      process: { command: [process.execPath, echo, String(port), '--delay-listen-ms', '300'] },
      health: { type: 'tcp', port, intervalMs: 200 },
    }),
    1,
  );
  assert.equal(r2.state, 'started', r2.reason);
  assert.match(r2.reason, /health check passed after \d+ ms/);
});

test('start failures say why, and leave nothing running', async (t) => {
  const { dir, make } = setup(t);
  const d = make();
  const notFound = await d.start(spec({ id: 'nf', process: { command: ['/nonexistent/bin/x'] } }), 1);
  assert.equal(notFound.state, 'failed');
  assert.match(notFound.reason, /cannot execute \/nonexistent\/bin\/x: ENOENT/);

  const { spec: exits } = await echoSpec('ex', ['--exit-after-ms', '0']);
  const ex = await d.start(exits, 1);
  assert.equal(ex.state, 'failed');
  assert.match(ex.reason, /exited with code 3 during start; last output: .*exiting on purpose with code 3/);

  const wrongPort = await freePort();
  const { spec: s } = await echoSpec('never', [], {
    health: { type: 'http', url: `http://127.0.0.1:${wrongPort}/`, intervalMs: 100, timeoutMs: 200 },
  });
  s.process!.startTimeoutMs = 600;
  const t0 = Date.now();
  const nv = await d.start(s, 1);
  assert.equal(nv.state, 'failed');
  assert.match(nv.reason, /did not pass within startTimeoutMs 600 ms: ECONNREFUSED/);
  assert.ok(Date.now() - t0 < 2000);
  assert.equal(readPidfile(dir, 'never'), null, 'killed and forgotten');

  const user = await d.start(
    spec({ id: 'usr', process: { command: ['sleep', '5'], user: 'no-such-user-xyz' } }),
    1,
  );
  assert.match(user.reason, /unknown user no-such-user-xyz/);
  const cwd = await d.start(
    spec({ id: 'cwd', process: { command: ['sleep', '5'], cwd: '/nonexistent/dir' } }),
    1,
  );
  assert.match(cwd.reason, /cwd \/nonexistent\/dir is not an existing directory/);
});

test('argv is passed literally, never through a shell', async (t) => {
  const { dir, make } = setup(t);
  const d = make();
  const marker = join(dir, 'injected');
  const r = await d.start(
    spec({ id: 'lit', process: { command: ['/bin/echo', `hello; touch ${marker}`] } }),
    1,
  );
  // echo exits at once: a start failure, but its output shows the literal argument
  assert.equal(r.state, 'failed');
  assert.match(r.reason, /exited with code 0/);
  assert.match(readFileSync(join(dir, 'logs', 'lit.log'), 'utf8'), new RegExp(`hello; touch ${marker}`));
  assert.equal(existsSync(marker), false);
});

test('stop: stopSignal first, SIGKILL after stopTimeoutMs', async (t) => {
  const { make } = setup(t);
  const d = make();
  const { spec: polite } = await echoSpec('polite');
  assert.equal((await d.start(polite, 1)).state, 'started');
  let t0 = Date.now();
  const s1 = await d.stop('polite');
  assert.equal(s1.state, 'stopped');
  assert.match(s1.reason, /stopped with SIGTERM/);
  assert.ok(Date.now() - t0 < 1000);

  const { port, spec: stubborn } = await echoSpec('stubborn', ['--ignore-term']);
  stubborn.process!.stopTimeoutMs = 300;
  assert.equal((await d.start(stubborn, 1)).state, 'started');
  const pid = (await get(port)).pid;
  t0 = Date.now();
  const s2 = await d.stop('stubborn');
  const took = Date.now() - t0;
  assert.equal(s2.state, 'stopped');
  assert.match(s2.reason, /killed with SIGKILL after SIGTERM and stopTimeoutMs 300 ms/);
  assert.ok(took >= 280 && took < 1500, `stop took ${took} ms`);
  assert.equal(isAlive(pid), false);
  assert.deepEqual(d.list(), []);
  assert.equal((await d.stop('stubborn')).state, 'stopped', 'stopping a stopped resource succeeds');
});

test('killAll kills every group at once, without failed events', async (t) => {
  const { dir, make } = setup(t);
  const d = make();
  const events: DriverEvent[] = [];
  d.onEvent((ev) => events.push(ev));
  const pids: number[] = [];
  for (const id of ['a', 'b', 'c']) {
    const { port, spec: s } = await echoSpec(id, ['--ignore-term']);
    assert.equal((await d.start(s, 1)).state, 'started');
    pids.push((await get(port)).pid);
  }
  const t0 = Date.now();
  await d.killAll();
  const took = Date.now() - t0;
  assert.ok(took < 1000, `killAll took ${took} ms`);
  for (const pid of pids) assert.equal(isAlive(pid), false);
  assert.deepEqual(d.list(), []);
  for (const id of ['a', 'b', 'c']) assert.equal(readPidfile(dir, id), null);
  await new Promise((r) => setTimeout(r, 100));
  assert.deepEqual(events, []);
});

test('a new driver instance adopts running processes (agent restart) and watches them', async (t) => {
  const { dir, make } = setup(t);
  const d1 = make();
  const { port, spec: s } = await echoSpec('keep');
  assert.equal((await d1.start(s, 5)).state, 'started');
  const pid = (await get(port)).pid;
  await d1.close();

  // a stale pidfile (dead pid) is removed by recover
  writeFileSync(
    join(dir, 'run', 'ghost.json'),
    JSON.stringify({ ...readPidfile(dir, 'keep'), id: 'ghost', pid: 999999, pgid: 999999 }),
  );
  const d2 = make();
  const events: DriverEvent[] = [];
  d2.onEvent((ev) => events.push(ev));
  const rec = await d2.recover();
  assert.deepEqual(
    rec.map((r) => [r.id, r.epoch, r.state]),
    [['keep', 5, 'started']],
  );
  assert.equal(readPidfile(dir, 'ghost'), null);
  assert.equal((await get(port)).pid, pid, 'not restarted');
  assert.equal((await d2.start(s, 5)).state, 'started');
  assert.equal((await get(port)).pid, pid, 'start at the same epoch is a no-op');

  const t0 = Date.now();
  process.kill(pid, 'SIGKILL');
  const ev = await nextEvent(events, 0);
  assert.match(ev.reason, /exited \(status unknown: adopted after an agent restart\)/);
  assert.ok(Date.now() - t0 < 1000, `adopted exit seen after ${Date.now() - t0} ms`);
});

test('an adopted process is stopped with its own stop settings', async (t) => {
  const { make } = setup(t);
  const d1 = make();
  const { port, spec: s } = await echoSpec('adopt-stop', ['--ignore-term']);
  s.process!.stopTimeoutMs = 200;
  assert.equal((await d1.start(s, 2)).state, 'started');
  const pid = (await get(port)).pid;
  await d1.close();
  const d2 = make();
  // no recover(): stop() still finds it through its pidfile
  const r = await d2.stop('adopt-stop');
  assert.equal(r.state, 'stopped');
  assert.match(r.reason, /SIGKILL after SIGTERM and stopTimeoutMs 200 ms/);
  assert.equal(isAlive(pid), false);
});

test('stop() or killAll() during a start: the start is aborted and nothing keeps running', async (t) => {
  const { dir, make } = setup(t);
  const d = make();
  const { port, spec: slow } = await echoSpec('slow', ['--delay-listen-ms', '3000']);
  const starting = d.start(slow, 1);
  await new Promise((r) => setTimeout(r, 150));
  const pid = readPidfile(dir, 'slow')?.pid;
  assert.ok(pid && isAlive(pid), 'spawned and recorded before it is healthy');
  const stopped = await d.stop('slow');
  assert.equal(stopped.state, 'stopped');
  const r = await starting;
  assert.equal(r.state, 'failed');
  assert.match(r.reason, /start aborted: stopped while starting/);
  assert.equal(isAlive(pid), false);

  const starting2 = d.start(slow, 2);
  const killing = d.killAll(); // at once: before or right after the spawn
  await killing;
  const r2 = await starting2;
  assert.equal(r2.state, 'failed', r2.reason);
  await new Promise((res) => setTimeout(res, 200));
  assert.equal(readPidfile(dir, 'slow'), null);
  await assert.rejects(get(port));
});

test('a pidfile whose spec no longer validates still gets its process adopted and stoppable', async (t) => {
  const { dir, make } = setup(t);
  const d1 = make();
  const { port, spec: s } = await echoSpec('old');
  assert.equal((await d1.start(s, 4)).state, 'started');
  const pid = (await get(port)).pid;
  await d1.close();
  const path = join(dir, 'run', 'old.json');
  const pf = JSON.parse(readFileSync(path, 'utf8')) as Record<string, unknown>;
  writeFileSync(path, JSON.stringify({ ...pf, spec: { id: 'old', removedField: true } }));
  const d2 = make();
  const rec = await d2.recover();
  assert.deepEqual(
    rec.map((r) => [r.id, r.epoch, r.state]),
    [['old', 4, 'started']],
  );
  assert.equal((await d2.stop('old')).state, 'stopped');
  assert.equal(isAlive(pid), false);
});

test('resources run at childNice, not at the priority the agent raised for itself', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'corral-driver-'));
  // this test process stands for the agent: its own nice stays as it is; the child gets 7
  const d = new ProcessDriver({ node: 'n1', stateDir: dir, env: quiet, childNice: 7 });
  t.after(async () => {
    await d.killAll();
    await d.close();
    rmSync(dir, { recursive: true, force: true });
  });
  const { port, spec: s } = await echoSpec('nice');
  const r = await d.start(s, 1);
  assert.equal(r.state, 'started', r.reason);
  const { pid } = await get(port);
  // field 19 of /proc/PID/stat (after the parenthesised command) is the nice value
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  const nice = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[16]);
  assert.equal(nice, 7, 'the service runs at childNice');
  assert.equal(getPriority(pid), 7);
});
