// The fencer against real processes: devices in order with each failure reported, device
// timeouts and the overall deadline, the fence-agent stdin protocol (a fake agent, and the
// real fence_dummy / fence_virsh from Debian's fence-agents when installed), and the local
// device killing an agent-like process, its watchdog and its resources.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { once } from 'node:events';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createFencer, writeAgentPidfile, type FenceDeviceConfig } from '../src/fence/index.js';
import { isAlive, readPidRecord, readProcStat, waitFor } from '../src/drivers/proc.js';
import { ProcessDriver } from '../src/drivers/process.js';
import { readPidfile } from '../src/drivers/pidfile.js';
import { startWatchdog } from '../src/agent/watchdog.js';
import { watchdogPaths } from '../src/agent/watchdog-files.js';
import { ResourceSpec } from '../src/core/spec.js';

const fixtures = join(import.meta.dirname, 'fixtures', 'services');
const fenceCmd = join(fixtures, 'fence-cmd.sh');
const fakeAgentDir = join(fixtures, 'fence-agents');
const quiet = () => {};

function tmp(t: { after: (fn: () => void) => void }): string {
  const dir = mkdtempSync(join(tmpdir(), 'corral-fence-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

function fencer(fence: FenceDeviceConfig[], localStateDir?: (node: string) => string) {
  return createFencer([{ name: 'node2', fence }], {
    log: quiet,
    fenceAgentDirs: [fakeAgentDir],
    localStateDir,
  });
}

test('devices run in order until one succeeds; each failure is reported', async (t) => {
  const dir = tmp(t);
  const log = join(dir, 'fenced.log');
  const f = fencer([
    { type: 'command', command: [fenceCmd, 'fail'], timeoutMs: 5000 },
    { type: 'command', command: [fenceCmd, 'ok', log], timeoutMs: 5000 },
  ]);
  assert.equal(f.deviceCount('node2'), 2);
  const out = await f.fence('node2', Date.now() + 10_000);
  assert.deepEqual(out.ok && out.device, 'command:fence-cmd.sh');
  assert.equal(readFileSync(log, 'utf8'), 'node2 off\n');

  const none = await createFencer([{ name: 'node2', fence: [] }], { log: quiet }).fence(
    'node2',
    Date.now() + 1000,
  );
  assert.equal(none.ok, false);
  assert.match(JSON.stringify(none), /node node2 has no fence device configured/);
  assert.equal(f.deviceCount('node9'), 0);
});

test('every device fails: exit codes, stderr, timeouts; a hung device is killed', async (t) => {
  const dir = tmp(t);
  const hangPid = join(dir, 'hang.pid');
  const f = fencer([
    { type: 'command', command: [fenceCmd, 'fail'], timeoutMs: 5000 },
    { type: 'fence-agent', agent: 'fence_corral_fake', params: { outcome: 'fail' }, timeoutMs: 5000 },
    { type: 'command', command: [fenceCmd, 'hang', hangPid], timeoutMs: 300 },
    { type: 'fence-agent', agent: 'fence_not_installed', params: {}, timeoutMs: 5000 },
  ]);
  const t0 = Date.now();
  const out = await f.fence('node2', Date.now() + 10_000);
  assert.equal(out.ok, false);
  assert.ok(!out.ok);
  assert.deepEqual(out.attempts, [
    { device: 'command:fence-cmd.sh', error: 'exit code 4: fence-cmd: cannot reach PDU for node2' },
    {
      device: 'fence-agent:fence_corral_fake',
      error: 'exit code 1: Failed: Unable to obtain correct plug status or plug is not available',
    },
    { device: 'command:fence-cmd.sh', error: 'timed out after 300 ms' },
    {
      device: 'fence-agent:fence_not_installed',
      error: out.attempts[3]?.error.startsWith('fence agent fence_not_installed not found in ')
        ? out.attempts[3].error
        : 'fence agent fence_not_installed not found in ...',
    },
  ]);
  assert.ok(Date.now() - t0 < 3000);
  const pid = Number(readFileSync(hangPid, 'utf8'));
  assert.ok(await waitFor(() => !isAlive(pid), 2000), 'the hung device was killed');
});

test('the overall deadline bounds the devices', async (t) => {
  const dir = tmp(t);
  const f = fencer([
    { type: 'command', command: [fenceCmd, 'hang', join(dir, 'h.pid')], timeoutMs: 5000 },
    { type: 'command', command: [fenceCmd, 'ok', join(dir, 'log')], timeoutMs: 5000 },
  ]);
  const out = await f.fence('node2', Date.now() + 400);
  assert.ok(!out.ok);
  assert.match(
    out.attempts[0]?.error ?? '',
    /^timed out after (39\d|400) ms \(cut short by the fence deadline\)$/,
  );
  assert.equal(out.attempts[1]?.error, 'not tried: the fence deadline passed');
  assert.ok(out.durationMs < 1000, `took ${out.durationMs} ms`);
  assert.equal(existsSync(join(dir, 'log')), false);
});

test('fence-agent: key=value lines on stdin (action, plug, params)', async (t) => {
  const dir = tmp(t);
  const rec = join(dir, 'stdin.txt');
  const f = fencer([
    {
      type: 'fence-agent',
      agent: 'fence_corral_fake',
      params: { ipaddr: '192.0.2.10', ssl: true, ipport: 623, record: rec, outcome: 'ok' },
      timeoutMs: 5000,
    },
  ]);
  const out = await f.fence('node2', Date.now() + 5000);
  assert.ok(out.ok, JSON.stringify(out));
  assert.equal(out.device, 'fence-agent:fence_corral_fake');
  assert.equal(
    readFileSync(rec, 'utf8'),
    `action=off\nplug=node2\nipaddr=192.0.2.10\nssl=1\nipport=623\nrecord=${rec}\noutcome=ok\n`,
  );
  const mapped = fencer([
    {
      type: 'fence-agent',
      agent: 'fence_corral_fake',
      params: { plug: 'vm-2', record: rec, outcome: 'ok' },
      timeoutMs: 5000,
    },
  ]);
  assert.ok((await mapped.fence('node2', Date.now() + 5000)).ok);
  assert.match(readFileSync(rec, 'utf8'), /^action=off\nplug=vm-2\n/);
  const evil = fencer([
    {
      type: 'fence-agent',
      agent: 'fence_corral_fake',
      params: { ipaddr: 'x\naction=on', outcome: 'ok' },
      timeoutMs: 5000,
    },
  ]);
  const bad = await evil.fence('node2', Date.now() + 5000);
  assert.ok(!bad.ok);
  assert.equal(bad.attempts[0]?.error, 'params.ipaddr contains a line break');
});

const haveFenceAgents = existsSync('/usr/sbin/fence_dummy') && existsSync('/usr/sbin/fence_virsh');

test('real fence agents from Debian fence-agents: fence_dummy fences, fence_virsh fails cleanly', async (t) => {
  if (!haveFenceAgents) return t.skip('needs fence-agents (apt-get install fence-agents)');
  const dir = tmp(t);
  const status = join(dir, 'status');
  writeFileSync(status, 'on');
  const ok = await fencer([
    {
      type: 'fence-agent',
      agent: 'fence_dummy',
      params: { type: 'file', status_file: status },
      timeoutMs: 10_000,
    },
  ]).fence('node2', Date.now() + 10_000);
  assert.ok(ok.ok, JSON.stringify(ok));
  assert.equal(readFileSync(status, 'utf8'), 'off');
  // loopback port 1: nothing listens, the agent must fail with its own message, not hang
  const port = await new Promise<number>((resolve) => {
    const s = createServer().listen(0, '127.0.0.1', () => {
      const p = (s.address() as { port: number }).port;
      s.close(() => resolve(p));
    });
  });
  const bad = await fencer([
    {
      type: 'fence-agent',
      agent: 'fence_virsh',
      params: { ip: '127.0.0.1', ipport: port, username: 'root', password: 'x', login_timeout: 2 },
      timeoutMs: 15_000,
    },
  ]).fence('node2', Date.now() + 15_000);
  assert.ok(!bad.ok);
  assert.match(bad.attempts[0]?.error ?? '', /^exit code 1: .*Unable to connect\/login to fencing device/);
});

test('local: kills the node agent (and its group), its watchdog and every resource', async (t) => {
  const stateDir = mkdtempSync(join(tmpdir(), 'corral-lf-'));
  const driver = new ProcessDriver({ node: 'node2', stateDir, env: { log: quiet } });
  const agent = spawn(process.execPath, [join(fixtures, 'agent-like.mjs'), stateDir], {
    detached: true,
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  t.after(async () => {
    agent.kill('SIGKILL');
    await driver.killAll();
    await driver.close();
    const wd = readPidRecord(watchdogPaths(stateDir).pidfile);
    if (wd && isAlive(wd.pid, wd.startTime)) process.kill(wd.pid, 'SIGKILL');
    rmSync(stateDir, { recursive: true, force: true });
  });
  agent.stdout.setEncoding('utf8');
  const [line] = (await once(agent.stdout, 'data')) as [string];
  const { pid: agentPid, helper } = JSON.parse(line) as { pid: number; helper: number };
  const pids: number[] = [];
  for (const id of ['r1', 'r2']) {
    const spec = ResourceSpec.parse({ id, process: { command: ['sleep', '60'] } });
    assert.equal((await driver.start(spec, 1)).state, 'started');
    pids.push(readPidfile(stateDir, id)!.pid);
  }
  const wd = await startWatchdog({ stateDir, log: quiet });
  wd.feed(60_000);
  const wdPid = readPidRecord(watchdogPaths(stateDir).pidfile)!.pid;
  const f = createFencer([{ name: 'node2', fence: [{ type: 'local' }] }], {
    log: quiet,
    localStateDir: (n) => (n === 'node2' ? stateDir : '/nonexistent'),
  });
  const out = await f.fence('node2', Date.now() + 5000);
  assert.ok(out.ok, JSON.stringify(out));
  assert.equal(out.device, 'local');
  assert.ok(out.durationMs < 1000, `took ${out.durationMs} ms`);
  for (const p of [agentPid, helper, wdPid, ...pids]) assert.equal(isAlive(p), false, `pid ${p} still alive`);
  await wd.close();
  // nothing left to kill: still a success
  assert.ok((await f.fence('node2', Date.now() + 5000)).ok);
  const noDir = await createFencer([{ name: 'node2', fence: [{ type: 'local' }] }], { log: quiet }).fence(
    'node2',
    Date.now() + 1000,
  );
  assert.ok(!noDir.ok);
  assert.match(noDir.attempts[0]?.error ?? '', /needs the state directory/);
});

test('writeAgentPidfile records pid and start time; its remover only removes its own', (t) => {
  const dir = tmp(t);
  const remove = writeAgentPidfile(dir);
  const rec = readPidRecord(join(dir, 'agent.pid'));
  assert.deepEqual(rec, { pid: process.pid, startTime: readProcStat(process.pid)?.startTime });
  writeFileSync(join(dir, 'agent.pid'), '999999\n');
  remove();
  assert.ok(existsSync(join(dir, 'agent.pid')), 'a newer agent owns it now');
});
