// corral clone over TLS (real processes over loopback): serve --tls with a generated certificate and
// three receivers checking its fingerprint (links between receivers run over TLS-PSK too); a wrong
// fingerprint, a receiver without TLS, and a CA-verified session.
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { connect } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { FrameType, jsonFrame, writeFrame } from '../src/provision/clone/protocol.js';
import {
  corral,
  exitWithin,
  killAll,
  makeImage,
  serveLoopback,
  type Proc,
} from '../src/provision/clone/testing.js';

const MiB = 1024 * 1024;
const dir = mkdtempSync(join(tmpdir(), 'corral-clonetls-'));
after(() => {
  killAll();
  rmSync(dir, { recursive: true, force: true });
});
const sha = (path: string) => createHash('sha256').update(readFileSync(path)).digest('hex');
const secretFile = join(dir, 'secret');
writeFileSync(secretFile, 'tls-secret-0123456789abcdef\n');
const src = join(dir, 'golden.img');

function serve(session: string, expect: number, extra: string[] = []): Proc {
  return serveLoopback({
    source: src,
    expect,
    session,
    secretFile,
    extra: ['--rejoin-wait-ms', '0', ...extra],
  });
}

function receive(port: number, session: string, name: string, extra: string[]): Proc {
  return corral([
    'clone',
    'receive',
    '--server',
    `127.0.0.1:${port}`,
    '--session',
    session,
    '--secret-file',
    secretFile,
    '--target',
    join(dir, `${name}.img`),
    '--name',
    name,
    ...extra,
  ]);
}

/** Sends a plain (not TLS) link HELLO to a data port: resolves with what came back before close. */
function plainHello(port: number): Promise<Buffer> {
  return new Promise((resolve) => {
    const s = connect({ host: '127.0.0.1', port });
    const got: Buffer[] = [];
    s.on('connect', () =>
      writeFrame(s, jsonFrame(FrameType.hello, { session: 'x', from: 'a', to: 'b', gen: 0, mac: '' })),
    );
    s.on('data', (d: Buffer) => got.push(d));
    s.on('error', () => undefined);
    s.on('close', () => resolve(Buffer.concat(got)));
    setTimeout(() => s.destroy(), 5000);
  });
}

describe('clone over TLS (real processes over loopback)', () => {
  before(() => makeImage(src, 16 * MiB, 21));

  test(
    'serve --tls and 3 receivers with --tls-fingerprint: all verify; data ports speak only TLS',
    { timeout: 120_000 },
    async () => {
      // Throttled so the chain is still up while its data ports are probed.
      const server = serve('tls3', 3, ['--tls', '--throttle-mibps', '1']);
      const fp = (await server.waitFor(/fingerprint \(sha256\): ([0-9A-F:]{95})/, 30_000))[1]!;
      const port = Number((await server.waitFor(/listening on 127\.0\.0\.1:(\d+)/, 30_000))[1]);
      const names = ['t1', 't2', 't3'];
      const rs = names.map((n) => receive(port, 'tls3', n, ['--tls-fingerprint', fp]));
      await server.waitFor(/streaming through the chain/, 60_000);
      // The status endpoint stays plain HTTP (read-only) next to the TLS control protocol.
      const res = await fetch(`http://127.0.0.1:${port}/status`, { signal: AbortSignal.timeout(10_000) });
      const live = (await res.json()) as { tls: boolean; receivers: { address: string }[] };
      assert.equal(live.tls, true);
      for (const r of live.receivers) {
        const dataPort = Number(r.address.split(':').pop());
        const reply = await plainHello(dataPort);
        // A plain listener would answer REJECT (a frame starting with type 3); a TLS one never does.
        assert.ok(reply.length === 0 || reply[0] !== FrameType.reject, `${r.address} answered in plain text`);
      }
      for (const r of rs) assert.equal(await exitWithin(r, 90_000), 0, r.stderr());
      assert.equal(await exitWithin(server, 30_000), 0, server.stderr());
      const fin = JSON.parse(server.stdout()) as { receivers: { name: string; state: string }[] };
      assert.deepEqual(
        fin.receivers.map((r) => [r.name, r.state]).sort(),
        names.map((n) => [n, 'verified']),
      );
      for (const n of names) assert.equal(sha(join(dir, `${n}.img`)), sha(src), n);
      // Receivers forwarded to each other over TLS.
      assert.match(rs.map((r) => r.stderr()).join('\n'), /forwarding to t\d .*TLS/);
    },
  );

  test(
    'a receiver with a wrong fingerprint refuses to connect, writes nothing',
    { timeout: 60_000 },
    async () => {
      const server = serve('tlsbad', 1, ['--tls', '--timeout-ms', '60000']);
      const port = Number((await server.waitFor(/listening on 127\.0\.0\.1:(\d+)/, 30_000))[1]);
      const wrong = Array.from({ length: 32 }, () => 'AB').join(':');
      const r = receive(port, 'tlsbad', 'bad', ['--tls-fingerprint', wrong]);
      assert.notEqual(await exitWithin(r, 30_000), 0);
      assert.match(r.stderr(), /presented a certificate with fingerprint [0-9A-F:]+, not the expected AB:AB/);
      assert.match(r.stderr(), /refusing to connect/);
      assert.ok(!existsSync(join(dir, 'bad.img')), 'the target was created');
      // A receiver without TLS is told why.
      const plain = receive(port, 'tlsbad', 'plain', []);
      assert.notEqual(await exitWithin(plain, 30_000), 0);
      assert.match(plain.stderr(), /runs over TLS/);
      assert.match(plain.stderr(), /--tls-fingerprint/);
      server.kill();
    },
  );

  test(
    '--tls-cert/--tls-key signed by a CA, receiver with --tls-ca: verifies',
    { timeout: 60_000 },
    async (t) => {
      try {
        execFileSync('openssl', ['version'], { stdio: 'pipe' });
      } catch {
        return t.skip('needs the openssl command');
      }
      const o = (...args: string[]) => execFileSync('openssl', args, { cwd: dir, stdio: 'pipe' });
      o(
        'req',
        '-x509',
        '-newkey',
        'ec',
        '-pkeyopt',
        'ec_paramgen_curve:P-256',
        '-nodes',
        '-keyout',
        'ca.key',
        '-out',
        'ca.pem',
        '-days',
        '2',
        '-subj',
        '/CN=test CA',
      );
      o(
        'req',
        '-newkey',
        'ec',
        '-pkeyopt',
        'ec_paramgen_curve:P-256',
        '-nodes',
        '-keyout',
        'srv.key',
        '-out',
        'srv.csr',
        '-subj',
        '/CN=clone server',
      );
      writeFileSync(join(dir, 'ext.cnf'), 'subjectAltName=IP:127.0.0.1\n');
      o(
        'x509',
        '-req',
        '-in',
        'srv.csr',
        '-CA',
        'ca.pem',
        '-CAkey',
        'ca.key',
        '-CAcreateserial',
        '-out',
        'srv.pem',
        '-days',
        '2',
        '-extfile',
        'ext.cnf',
      );
      const server = serve('tlsca', 1, [
        '--tls',
        '--tls-cert',
        join(dir, 'srv.pem'),
        '--tls-key',
        join(dir, 'srv.key'),
      ]);
      const port = Number((await server.waitFor(/listening on 127\.0\.0\.1:(\d+)/, 30_000))[1]);
      const r = receive(port, 'tlsca', 'ca1', ['--tls-ca', join(dir, 'ca.pem')]);
      assert.equal(await exitWithin(r, 60_000), 0, r.stderr());
      assert.equal(await exitWithin(server, 30_000), 0, server.stderr());
      assert.equal(sha(join(dir, 'ca1.img')), sha(src));
      // The wrong CA (the server's own leaf as "CA") fails verification with a clear error.
      const server2 = serve('tlsca2', 1, [
        '--tls',
        '--tls-cert',
        join(dir, 'srv.pem'),
        '--tls-key',
        join(dir, 'srv.key'),
        '--timeout-ms',
        '60000',
      ]);
      const port2 = Number((await server2.waitFor(/listening on 127\.0\.0\.1:(\d+)/, 30_000))[1]);
      const bad = receive(port2, 'tlsca2', 'ca2', ['--tls-ca', join(dir, 'srv.pem')]);
      assert.notEqual(await exitWithin(bad, 30_000), 0);
      assert.match(bad.stderr(), /TLS verification failed/);
      server2.kill();
    },
  );
});
