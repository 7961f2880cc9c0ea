// The per-node software watchdog against real processes: it kills the node's resources when
// not fed, keeps them while fed or disarmed, is adopted by a second client instead of
// started twice, and keeps working while its feeder (the agent) is SIGSTOPped.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { once } from 'node:events';
import { startWatchdog } from '../src/agent/watchdog.js';
import { watchdogPaths } from '../src/agent/watchdog-files.js';
import { ProcessDriver } from '../src/drivers/process.js';
import { isAlive, readPidRecord, recordAlive, waitFor } from '../src/drivers/proc.js';
import { readPidfile } from '../src/drivers/pidfile.js';
import { ResourceSpec } from '../src/core/spec.js';

const echo = join(import.meta.dirname, 'fixtures', 'services', 'http-echo.mjs');
const feeder = join(import.meta.dirname, 'fixtures', 'services', 'watchdog-feeder.ts');
const quiet = () => {};

async function freePort(): Promise<number> {
  return new Promise((resolve) => {
    const s = createServer();
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as { port: number }).port;
      s.close(() => resolve(port));
    });
  });
}

/** a state dir with `n` http-echo services started by a process driver; cleanup on test end */
async function nodeWithServices(t: { after: (fn: () => Promise<void>) => void }, n: number) {
  const dir = mkdtempSync(join(tmpdir(), 'corral-wd-'));
  const driver = new ProcessDriver({ node: 'n1', stateDir: dir, env: { log: quiet } });
  const pids: number[] = [];
  for (let i = 0; i < n; i++) {
    const port = await freePort();
    const spec = ResourceSpec.parse({
      id: `svc${i}`,
      process: { command: [process.execPath, echo, String(port)] },
      health: { type: 'tcp', port, intervalMs: 1000 },
    });
    const r = await driver.start(spec, 1);
    assert.equal(r.state, 'started', r.reason);
    pids.push(readPidfile(dir, `svc${i}`)!.pid);
  }
  t.after(async () => {
    await driver.killAll();
    await driver.close();
    const wd = readPidRecord(watchdogPaths(dir).pidfile);
    if (wd && recordAlive(wd)) process.kill(wd.pid, 'SIGKILL');
    rmSync(dir, { recursive: true, force: true });
  });
  return { dir, driver, pids };
}

test('not fed: the watchdog kills every resource of the node and exits', async (t) => {
  const { dir, pids } = await nodeWithServices(t, 2);
  const wd = await startWatchdog({ stateDir: dir, log: quiet });
  const wdPid = readPidRecord(watchdogPaths(dir).pidfile)!.pid;
  const t0 = Date.now();
  wd.feed(400);
  await new Promise((r) => setTimeout(r, 250));
  assert.ok(
    pids.every((p) => isAlive(p)),
    'alive before the deadline',
  );
  assert.ok(await waitFor(() => pids.every((p) => !isAlive(p)), 2000), 'killed after the deadline');
  const took = Date.now() - t0;
  assert.ok(took >= 390 && took < 1200, `fired after ${took} ms, allowed 400`);
  const fired = JSON.parse(readFileSync(watchdogPaths(dir).fired, 'utf8')) as { killed: { id: string }[] };
  assert.deepEqual(fired.killed.map((k) => k.id).sort(), ['svc0', 'svc1']);
  assert.ok(await waitFor(() => !isAlive(wdPid), 2000), 'the watchdog exits after firing');
  await wd.close();
});

test('fed or disarmed: resources keep running; a second client adopts the same watchdog', async (t) => {
  const { dir, pids } = await nodeWithServices(t, 1);
  const wd = await startWatchdog({ stateDir: dir, log: quiet });
  const wdPid = readPidRecord(watchdogPaths(dir).pidfile)!.pid;
  const wd2 = await startWatchdog({ stateDir: dir, log: quiet });
  assert.equal(readPidRecord(watchdogPaths(dir).pidfile)!.pid, wdPid, 'adopted, not started twice');
  for (let i = 0; i < 10; i++) {
    (i % 2 ? wd : wd2).feed(300);
    await new Promise((r) => setTimeout(r, 100));
  }
  assert.ok(isAlive(pids[0]!), 'alive while fed');
  wd.disarm();
  await new Promise((r) => setTimeout(r, 500));
  assert.ok(isAlive(pids[0]!), 'alive while disarmed');
  assert.equal(existsSync(watchdogPaths(dir).fired), false);
  await wd2.close();
  await wd.close();
  assert.ok(await waitFor(() => !isAlive(wdPid), 2000), 'a disarmed watchdog exits on close');
});

test('the feeder is SIGSTOPped (frozen agent): the watchdog still fires', async (t) => {
  const { dir, pids } = await nodeWithServices(t, 2);
  const child = spawn(process.execPath, ['--import', 'tsx', feeder, dir, '500'], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  t.after(() => {
    child.kill('SIGKILL');
  });
  child.stdout.setEncoding('utf8');
  const [first] = (await Promise.race([
    once(child.stdout, 'data'),
    new Promise((_, rej) => setTimeout(() => rej(new Error('feeder did not start in 10 s')), 10_000)),
  ])) as [string];
  assert.match(first, /fed/);
  await new Promise((r) => setTimeout(r, 700));
  assert.ok(
    pids.every((p) => isAlive(p)),
    'alive while the feeder runs',
  );
  const t0 = Date.now();
  child.kill('SIGSTOP');
  assert.ok(await waitFor(() => pids.every((p) => !isAlive(p)), 3000), 'killed while the feeder is frozen');
  const took = Date.now() - t0;
  assert.ok(took < 1200, `fired ${took} ms after the freeze, allowed 500`);
});
