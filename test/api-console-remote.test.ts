// Console of a VM on another node: two agents each serve the API on their own address; a real
// QEMU VM runs on n2; the client asks n1's API for a ticket and opens the WebSocket on n1, which
// forwards to n2's API with a one-time hop ticket; the RFB handshake completes with QEMU's VNC server.
// Tickets are single use cluster-wide, bound to one VM, and hop tickets are never relayed again.
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { connect } from 'node:net';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { TestCluster, corralBin } from './helpers/cluster.js';
import { openWs, rfbHandshake, rfbHandshakeTcp } from './helpers/rfb.js';
import { createToken } from '../src/api/auth.js';
import { ApiEndpoint, ConsoleTickets } from '../src/api/plugins/console.js';

const hasQemu = spawnSync('qemu-system-x86_64', ['-version']).status === 0;
const skip = hasQemu ? false : 'needs qemu-system-x86_64 (Debian: apt-get install qemu-system-x86)';

describe('console of a VM on another node', { timeout: 240_000, skip }, () => {
  // each agent serves the API on its own loopback address (127.0.1.N) and a free port
  const c = new TestCluster({
    nodes: [{ name: 'n1' }, { name: 'n2' }],
    leaseTtlMs: 6000,
    agentArgs: (n) => ['--api', `127.0.1.${n.slice(1)}:0`],
  });
  const api: Record<string, string> = {};
  let op = '';
  const vmA = 'a.example.org';
  const vmB = 'b.example.org';

  const endpoint = async (node: string) => {
    const kv = await c.store.get(c.k.apiEndpoint(node));
    return kv ? ApiEndpoint.parse(JSON.parse(kv.value)) : undefined;
  };
  const ticket = async (node: string, vm: string) => {
    const r = await fetch(`${api[node]}/api/v1/vms/${vm}/console`, {
      method: 'POST',
      headers: { authorization: `Bearer ${op}` },
    });
    const json = (await r.json()) as { token: string; url: string; node: string; message?: string };
    assert.equal(r.status, 201, JSON.stringify(json));
    return json;
  };
  const ws = (node: string, path: string) => openWs(api[node]!.replace(/^http/, 'ws') + path);
  const sessions = async (node: string, path: string) => {
    const text = await (await fetch(`${api[node]}/metrics`)).text();
    const m = new RegExp(`^corral_console_sessions_total\\{path="${path}"\\} (\\d+)`, 'm').exec(text);
    return Number(m?.[1] ?? 0);
  };

  before(async () => {
    await c.start();
    for (const n of ['n1', 'n2']) {
      await c.waitFor(`${n}'s API recorded`, async () => !!(await endpoint(n)), 30000);
      api[n] = (await endpoint(n))!.url;
      assert.match(api[n], new RegExp(`^http://127\\.0\\.1\\.${n.slice(1)}:\\d+$`));
    }
    op = (await createToken(c.store, 'test', 'op', 'operator', Date.now())).token;
    for (const vm of [vmA, vmB]) {
      const f = join(c.dir, `${vm}.yaml`);
      writeFileSync(f, `name: ${vm}\nmemory: 64\npreferredNode: n2\nshutdownTimeoutMs: 500\n`);
      const r = c.cli('vm', 'define', '-f', f);
      assert.equal(r.code, 0, r.stderr);
    }
    for (const vm of [vmA, vmB]) assert.equal(await c.waitStarted(vm, undefined, 60000), 'n2');
  });
  after(() => c.stop());

  it("speaks RFB through n1's API to QEMU on n2", async () => {
    const forwarded0 = await sessions('n1', 'forwarded');
    const local0 = await sessions('n2', 'local');
    const t = await ticket('n1', vmA);
    assert.equal(t.node, 'n2');
    const s = await ws('n1', t.url);
    const init = await rfbHandshake(s);
    assert.ok(init.width > 0 && init.height > 0, `framebuffer ${init.width}x${init.height}`);
    assert.match(init.name, /QEMU/);
    s.close();
    assert.equal(await sessions('n1', 'forwarded'), forwarded0 + 1, 'n1 forwarded the session');
    assert.equal(await sessions('n2', 'local'), local0 + 1, 'n2 bridged its VNC socket');
    // used once, anywhere: neither API server takes it again
    await assert.rejects(ws('n1', t.url), /HTTP 403/);
    await assert.rejects(ws('n2', t.url), /HTTP 403/);
  });

  it('accepts a ticket issued by another API server, once', async () => {
    const t = await ticket('n2', vmA);
    const s = await ws('n1', t.url);
    assert.match((await rfbHandshake(s)).name, /QEMU/);
    s.close();
    await assert.rejects(ws('n2', t.url), /HTTP 403/);
  });

  it('refuses a ticket for another VM, and consumes it', async () => {
    const t = await ticket('n1', vmB);
    const forged = t.url.replace(`vm=${vmB}`, `vm=${vmA}`);
    assert.notEqual(forged, t.url);
    await assert.rejects(ws('n1', forged), /HTTP 403: .*ticket is for b\.example\.org, not a\.example\.org/);
    await assert.rejects(ws('n1', t.url), /HTTP 403/);
  });

  it('never relays a hop ticket: only the node it names bridges it', async () => {
    const tickets = new ConsoleTickets(c.store, c.k);
    const hop = await tickets.issue({ vm: vmA, node: 'n2', caller: 'op', hop: true }, Date.now());
    await assert.rejects(
      ws('n1', `/api/v1/console/ws?vm=${vmA}&ticket=${hop.token}`),
      /HTTP 403: .*hop ticket .* presented to n1/,
    );
  });

  it('corral vm console: a ticket through the API, and a local port for a VNC viewer', async () => {
    const r = c.cli('vm', 'console', vmA, '--url', api.n1!, '--token', op, '--json');
    assert.equal(r.code, 0, r.stderr);
    const j = JSON.parse(r.stdout) as { node: string; url: string; page: string };
    assert.equal(j.node, 'n2');
    assert.equal(j.page, `${api.n1}/ui/console.html#${vmA}`);
    const s = await openWs(j.url);
    assert.match((await rfbHandshake(s)).name, /QEMU/);
    s.close();

    const cli = spawn(
      process.execPath,
      [corralBin, 'vm', 'console', vmA, '--url', api.n1!, '--token', op, '--listen', '127.0.0.1:0', '--once'],
      { stdio: ['ignore', 'pipe', 'pipe'] },
    );
    let out = '';
    cli.stdout.on('data', (d: Buffer) => (out += d.toString()));
    cli.stderr.on('data', (d: Buffer) => (out += d.toString()));
    const exited = new Promise<number | null>((resolve) => cli.on('exit', resolve));
    try {
      await c.waitFor('the viewer port', async () => /VNC viewer port 127\.0\.0\.1:\d+/.test(out), 20000);
      const port = Number(/VNC viewer port 127\.0\.0\.1:(\d+)/.exec(out)![1]);
      const sock = connect(port, '127.0.0.1');
      const init = await rfbHandshakeTcp(sock);
      assert.ok(init.width > 0, out);
      assert.match(init.name, /QEMU/);
      sock.destroy();
      assert.equal(await exited, 0, out);
    } finally {
      if (cli.exitCode === null) cli.kill('SIGKILL');
    }
  });

  it("answers 502 when the VM node's API does not answer", async () => {
    const real = await c.store.get(c.k.apiEndpoint('n2'));
    const gone: ApiEndpoint = { node: 'n2', url: 'http://127.0.1.2:1', pid: 0, sinceMs: Date.now() };
    await c.store.put(c.k.apiEndpoint('n2'), JSON.stringify(gone));
    try {
      const t = await ticket('n1', vmA);
      await assert.rejects(ws('n1', t.url), /HTTP 502: .*whose API \(http:\/\/127\.0\.1\.2:1\) did not open/);
    } finally {
      await c.store.put(c.k.apiEndpoint('n2'), real!.value);
    }
    const t = await ticket('n1', vmA);
    const s = await ws('n1', t.url);
    assert.match((await rfbHandshake(s)).name, /QEMU/);
    s.close();
  });
});
