// corral clone between network namespaces: the server and two receivers on separate "hosts" joined
// by veth links to a bridge (test/helpers/netns.ts); skipped without root / ip netns.
import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { corral, exitWithin, killAll, makeImage } from '../src/provision/clone/testing.js';
import { createNetnsLab, netnsUnavailable, type NetnsLab } from './helpers/netns.js';

const dir = mkdtempSync(join(tmpdir(), 'corral-clonens-'));
let lab: NetnsLab | null = null;
after(() => {
  killAll();
  lab?.destroy();
  rmSync(dir, { recursive: true, force: true });
});

const sha = (path: string) => createHash('sha256').update(readFileSync(path)).digest('hex');

test('serve in one namespace, two receivers in two others: both verify', { timeout: 90_000 }, async (t) => {
  const why = netnsUnavailable();
  if (why) return t.skip(why);
  lab = createNetnsLab({ count: 3, subnet: '10.213.7' });
  const src = join(dir, 'golden.img');
  await makeImage(src, 32 * 1024 * 1024, 9);
  const secretFile = join(dir, 'secret');
  writeFileSync(secretFile, 'netns-secret-0123456789abcdef\n');
  const server = corral(
    [
      'clone',
      'serve',
      '--source',
      src,
      '--expect',
      '2',
      '--session',
      'ns',
      '--port',
      '7707',
      '--secret-file',
      secretFile,
      '--json',
      '--timeout-ms',
      '60000',
    ],
    { prefix: lab.exec(0) },
  );
  await server.waitFor(/listening on 0\.0\.0\.0:7707/, 30_000);
  const rs = [1, 2].map((i) =>
    corral(
      [
        'clone',
        'receive',
        '--server',
        `${lab!.nodes[0]!.ip}:7707`,
        '--session',
        'ns',
        '--secret-file',
        secretFile,
        '--target',
        join(dir, `t${i}.img`),
        '--name',
        `host${i}`,
      ],
      { prefix: lab!.exec(i) },
    ),
  );
  for (const r of rs) assert.equal(await exitWithin(r, 60_000), 0, r.stderr());
  assert.equal(await exitWithin(server, 30_000), 0, server.stderr());
  const st = JSON.parse(server.stdout()) as { receivers: { name: string; address: string; state: string }[] };
  // Each receiver was reached at its own namespace's address.
  assert.deepEqual(st.receivers.map((r) => [r.name, r.address.split(':')[0], r.state]).sort(), [
    ['host1', lab.nodes[1]!.ip, 'verified'],
    ['host2', lab.nodes[2]!.ip, 'verified'],
  ]);
  for (const i of [1, 2]) assert.equal(sha(join(dir, `t${i}.img`)), sha(src));
});
