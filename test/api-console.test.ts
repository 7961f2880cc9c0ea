// Console proxy: one-time tickets and a WebSocket bridged to a real QEMU VNC server's Unix socket;
// the test speaks the RFB handshake through the proxy (ProtocolVersion, security None, ServerInit).
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { openWs, rfbHandshake } from './helpers/rfb.js';
import { openStore } from '../src/store/index.js';
import type { Store } from '../src/store/types.js';
import { loadClusterConfig } from '../src/config/schema.js';
import { startApi, type ApiServer } from '../src/api/server.js';
import { createToken } from '../src/api/auth.js';
import { ConsoleTickets, consoleTicketTtlMs } from '../src/api/plugins/console.js';
import { keys } from '../src/core/keys.js';
import { ResourceSpec } from '../src/core/spec.js';
import { vmPaths } from '../src/drivers/qemu-paths.js';
import { nodeStateDir } from '../src/cli/commands/agent.js';
import type { ResourceRecord } from '../src/core/types.js';

const qemuBin = 'qemu-system-x86_64';
const waitMs = 15000;
const hasQemu = spawnSync(qemuBin, ['--version']).status === 0;

describe('console proxy', { timeout: 60_000 }, () => {
  it('tickets live in the store (hashed), expire after 30 s and are single use', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'corral-tickets-'));
    const st = await openStore(`sqlite:${join(dir, 'store.db')}`);
    try {
      const k = keys('tk');
      const t = new ConsoleTickets(st, k);
      const a = await t.issue({ vm: 'v', node: 'n', caller: 'c' }, 1000);
      assert.match(a.token, /^[A-Za-z0-9_-]{43}$/);
      const stored = await st.range(k.consoleTickets);
      assert.equal(stored.kvs.length, 1);
      assert.ok(!stored.kvs[0]!.key.includes(a.token) && !stored.kvs[0]!.value.includes(a.token));
      // a second API server on the same store accepts it, once
      const other = new ConsoleTickets(st, k);
      assert.equal((await other.take(a.token, 1000 + consoleTicketTtlMs - 1))?.vm, 'v');
      assert.equal(await t.take(a.token, 1001), undefined, 'single use');
      const b = await t.issue({ vm: 'v', node: 'n', caller: 'c' }, 1000);
      assert.equal(await t.take(b.token, 1000 + consoleTicketTtlMs), undefined, 'expired');
      assert.equal(await t.take('guess', 1000), undefined);
      // concurrent takes of one ticket: exactly one wins
      const c = await t.issue({ vm: 'v', node: 'n', caller: 'c' }, 1000);
      const wins = await Promise.all([t.take(c.token, 1001), other.take(c.token, 1001)]);
      assert.equal(wins.filter(Boolean).length, 1);
      // expired tickets are swept when new ones are issued
      await t.issue({ vm: 'v', node: 'n', caller: 'c' }, 1000);
      await t.issue({ vm: 'v', node: 'n', caller: 'c' }, 1000 + consoleTicketTtlMs + 1);
      assert.equal((await st.range(k.consoleTickets)).kvs.length, 1);
    } finally {
      await st.close();
      rmSync(dir, { recursive: true, force: true });
    }
  });

  describe('with a real QEMU VNC server', () => {
    if (!hasQemu) {
      it('needs qemu', (t) =>
        t.skip(`needs ${qemuBin}: apt-get install qemu-system-x86 (scripts/setup.sh does)`));
      return;
    }
    const dir = mkdtempSync(join(tmpdir(), 'corral-console-'));
    const stateRoot = join(dir, 'state');
    const configPath = join(dir, 'cluster.yaml');
    const sock = vmPaths(nodeStateDir(stateRoot, 'n1'), 'vm1').vncSocket;
    let qemu: ChildProcess | undefined;
    let store: Store;
    let api: ApiServer;
    let op = '';
    let viewer = '';

    before(async () => {
      writeFileSync(
        configPath,
        'version: 1\ncluster: { name: con }\nstore: sqlite:./store.db\nnodes:\n  - { name: n1, address: 127.0.0.1, capacity: { cpus: 2, memory: 512 } }\n',
      );
      mkdirSync(join(sock, '..'), { recursive: true });
      qemu = spawn(qemuBin, ['-display', 'none', '-vnc', `unix:${sock}`, '-nodefaults', '-m', '32', '-S'], {
        stdio: 'ignore',
      });
      const t0 = Date.now();
      while (!existsSync(sock)) {
        if (Date.now() - t0 > waitMs || qemu.exitCode !== null)
          throw new Error('qemu did not open its VNC socket');
        await new Promise((r) => setTimeout(r, 50));
      }
      store = await openStore(`sqlite:${join(dir, 'store.db')}`);
      const k = keys('con');
      await store.put(
        k.resource('vm1'),
        JSON.stringify(ResourceSpec.parse({ id: 'vm1', kind: 'vm', vm: { memory: 32 } })),
      );
      await store.put(
        k.resource('svc'),
        JSON.stringify(ResourceSpec.parse({ id: 'svc', process: { command: ['true'] } })),
      );
      const rec: ResourceRecord = {
        id: 'vm1',
        state: 'started',
        reason: 'test',
        node: 'n1',
        run: true,
        epoch: 1,
        sinceMs: Date.now(),
        failures: [],
        relocations: 0,
      };
      await store.put(k.assign('vm1'), JSON.stringify(rec));
      op = (await createToken(store, 'con', 'op', 'operator', Date.now())).token;
      viewer = (await createToken(store, 'con', 'view', 'viewer', Date.now())).token;
      api = await startApi({
        store,
        config: loadClusterConfig(configPath),
        configPath,
        stateRoot,
        listen: '127.0.0.1:0',
        log: () => undefined,
      });
    });
    after(async () => {
      await api?.close();
      await store?.close();
      qemu?.kill('SIGKILL');
      rmSync(dir, { recursive: true, force: true });
    });

    const ticket = async (token: string, id = 'vm1') => {
      const r = await fetch(`${api.url}/api/v1/vms/${id}/console`, {
        method: 'POST',
        headers: { authorization: `Bearer ${token}` },
      });
      return { status: r.status, json: (await r.json()) as { token: string; url: string; code?: string } };
    };

    it('speaks RFB through the proxy to QEMU', async () => {
      const t = await ticket(op);
      assert.equal(t.status, 201, JSON.stringify(t.json));
      const ws = await openWs(api.url.replace('http', 'ws') + t.json.url);
      const { width, height, name } = await rfbHandshake(ws);
      assert.ok(width > 0 && height > 0, `framebuffer ${width}x${height}`);
      assert.match(name, /QEMU/);
      ws.close();
    });

    it('refuses reused, guessed and missing tickets, viewers and non-VMs', async () => {
      const t = await ticket(op);
      const ws = await openWs(api.url.replace('http', 'ws') + t.json.url);
      ws.close();
      await assert.rejects(openWs(api.url.replace('http', 'ws') + t.json.url), /HTTP 403/);
      await assert.rejects(
        openWs(
          api.url.replace('http', 'ws') +
            '/api/v1/console/ws?ticket=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA',
        ),
        /HTTP 403/,
      );
      await assert.rejects(openWs(api.url.replace('http', 'ws') + '/api/v1/console/ws'), /HTTP 403/);
      assert.equal((await ticket(viewer)).status, 403);
      assert.equal((await ticket(op, 'svc')).status, 400);
      assert.equal((await ticket(op, 'nope')).status, 404);
    });
  });
});
