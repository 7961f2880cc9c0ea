// bench/clone: one image (default 1 GiB, half zero blocks) to 1, 2 and 4 receivers with
//   - corral clone (the chain),
//   - N parallel unicast TCP copies from the server (every byte, no zero skipping),
//   - udpcast (udp-sender / udp-receiver --sync, Debian's udpcast), when installed and namespaces exist.
// Hosts are network namespaces on veth links shaped with tc tbf (default 1gbit) when root is
// available; else everything runs over loopback (unshaped, no udpcast).
// Throughput per receiver counts the whole image (skipped zero blocks included), as the issue asks;
// "of line" divides it by the tc rate. "busiest link" is what the most loaded link carried in that
// time, as a share of the tc rate: corral sends the non-zero blocks once per hop, unicast sends N
// whole copies through the server's link, udpcast the whole image once.
//
//   npx tsx bench/clone.ts [--size-mib 1024] [--receivers 1,2,4] [--rate 1gbit] [--no-udpcast]
//                          [--only corral,tls,unicast,udpcast]   (tls: corral clone --tls; not by default)
import { execFileSync, spawn } from 'node:child_process';
import { mkdirSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { cpus, loadavg } from 'node:os';
import { join } from 'node:path';
import { open } from 'node:fs/promises';
import { corral, exitWithin, killAll, makeImage } from '../src/provision/clone/testing.js';
import { isAllZero } from '../src/provision/clone/volume.js';
import { createNetnsLab, netnsUnavailable, type NetnsLab } from '../test/helpers/netns.js';

const args = process.argv.slice(2);
// The bench measures cloning: run the clone commands alone (other areas' modules are not loaded).
process.env.CORRAL_CLONE_STANDALONE ??= '1';
const opt = (name: string, dflt: string) => {
  const i = args.indexOf(`--${name}`);
  return i >= 0 && args[i + 1] ? args[i + 1]! : dflt;
};
const sizeMiB = Number(opt('size-mib', '1024'));
const counts = opt('receivers', '1,2,4').split(',').map(Number);
const rate = opt('rate', '1gbit');
const only = new Set(opt('only', 'corral,unicast,udpcast').split(','));
const runTimeoutMs = 300_000;
const MiB = 1024 * 1024;
const sizeBytes = sizeMiB * MiB;
const lineBps = /^(\d+)gbit$/.test(rate)
  ? (Number(rate.slice(0, -4)) * 1e9) / 8
  : /^(\d+)mbit$/.test(rate)
    ? (Number(rate.slice(0, -4)) * 1e6) / 8
    : 0;

const why = netnsUnavailable();
const maxN = Math.max(...counts);
const lab: NetnsLab | null = why ? null : createNetnsLab({ count: maxN + 1, rate, subnet: '10.213.9' });
const haveUdpcast = (() => {
  try {
    execFileSync('which', ['udp-sender', 'udp-receiver'], { stdio: 'pipe' });
    return lab !== null && !args.includes('--no-udpcast');
  } catch {
    return false;
  }
})();
const ipOf = (i: number) => (lab ? lab.nodes[i]!.ip : '127.0.0.1');
// Every process runs under /usr/bin/time: the CPU seconds of a method (all its processes) are the
// figure that survives a shared, loaded machine better than wall time.
const haveTime = (() => {
  try {
    execFileSync('/usr/bin/time', ['-f', '%U', 'true'], { stdio: 'pipe' });
    return true;
  } catch {
    return false;
  }
})();
const timed = haveTime ? ['/usr/bin/time', '-f', 'bench-cpu-s %U %S'] : [];
const prefix = (i: number) => [...(lab ? lab.exec(i) : []), ...timed];
let cpuS = 0;
/** serve's source checksum (before receivers are chained; not in the clone time). */
const sourceHashS: number[] = [];
const addCpu = (stderr: string) => {
  for (const m of stderr.matchAll(/bench-cpu-s ([\d.]+) ([\d.]+)/g)) cpuS += Number(m[1]) + Number(m[2]);
};
const dir = `/dev/shm/corral-bench-${process.pid}`;
mkdirSync(dir, { recursive: true });
const cleanup = () => {
  killAll();
  lab?.destroy();
  rmSync(dir, { recursive: true, force: true });
};
process.on('SIGINT', () => {
  cleanup();
  process.exit(130);
});

function run(
  cmd: string[],
  timeoutMs = runTimeoutMs,
): Promise<{ code: number | null; out: string; err: string; ms: number }> {
  return new Promise((resolve) => {
    const t0 = performance.now();
    const c = spawn(cmd[0]!, cmd.slice(1), { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    c.stdout.on('data', (d: Buffer) => (out += d.toString()));
    c.stderr.on('data', (d: Buffer) => (err += d.toString()));
    const timer = setTimeout(() => c.kill('SIGKILL'), timeoutMs);
    c.on('exit', (code) => {
      clearTimeout(timer);
      resolve({ code, out, err, ms: performance.now() - t0 });
    });
  });
}

async function cloneRun(src: string, n: number, tls = false): Promise<number> {
  const secretFile = join(dir, 'secret');
  writeFileSync(secretFile, 'bench-secret-0123456789abcdef\n');
  const server = corral(
    [
      'clone',
      'serve',
      '--source',
      src,
      '--expect',
      String(n),
      '--session',
      'bench',
      '--port',
      '7707',
      '--secret-file',
      secretFile,
      '--json',
      '--quiet',
      '--timeout-ms',
      '120000',
      '--rejoin-wait-ms',
      '0',
      ...(tls ? ['--tls'] : []),
    ],
    { prefix: prefix(0) },
  );
  const fp = tls ? (await server.waitFor(/fingerprint \(sha256\): ([0-9A-F:]+)/, 60_000))[1]! : null;
  await server.waitFor(/listening on/, 60_000);
  const rs = Array.from({ length: n }, (_, k) =>
    corral(
      [
        'clone',
        'receive',
        '--server',
        `${ipOf(0)}:7707`,
        '--session',
        'bench',
        '--secret-file',
        secretFile,
        '--target',
        join(dir, `c${k}.img`),
        '--name',
        `r${k + 1}`,
        '--quiet',
        ...(fp ? ['--tls-fingerprint', fp] : []),
      ],
      { prefix: prefix(k + 1) },
    ),
  );
  for (const r of rs)
    if ((await exitWithin(r, runTimeoutMs)) !== 0) throw new Error(`receiver failed:\n${r.stderr()}`);
  if ((await exitWithin(server, 60_000)) !== 0) throw new Error(`serve failed:\n${server.stderr()}`);
  const st = JSON.parse(server.stdout()) as { elapsedMs: number };
  const hashMs = server.stderr().match(/source sha256 [0-9a-f]+ \((\d+) ms\)/);
  if (hashMs) sourceHashS.push(Number(hashMs[1]) / 1000);
  for (const p of [server, ...rs]) addCpu(p.stderr());
  for (let k = 0; k < n; k++) rmSync(join(dir, `c${k}.img`), { force: true });
  return st.elapsedMs / 1000;
}

// N parallel unicast copies: the sender streams the whole file to each receiver over its own TCP
// connection; each receiver writes, fsyncs and answers one byte. Time: first byte to last answer.
const unicastSender = `
const net = require('net'), fs = require('fs');
const file = process.argv[1], n = Number(process.argv[2]);
const socks = []; let done = 0, t0 = 0;
net.createServer((s) => {
  socks.push(s);
  s.on('data', () => { if (++done === n) { console.log(performance.now() - t0); process.exit(0); } });
  if (socks.length === n) {
    t0 = performance.now();
    for (const c of socks) fs.createReadStream(file, { highWaterMark: 1 << 20 }).pipe(c);
  }
}).listen(7708);
setTimeout(() => process.exit(3), ${runTimeoutMs});
`;
const unicastReceiver = `
const net = require('net'), fs = require('fs');
const host = process.argv[1], file = process.argv[2];
const out = fs.createWriteStream(file);
let tries = 0;
const go = () => {
  const s = net.connect({ port: 7708, host, allowHalfOpen: true });
  s.on('error', () => { if (tries++ < 100) setTimeout(go, 100); });
  s.pipe(out, { end: false });
  s.on('end', () => out.end(() => {
    const fd = fs.openSync(file, 'r+'); fs.fsyncSync(fd); fs.closeSync(fd);
    s.end('d', () => process.exit(0));
  }));
};
go();
setTimeout(() => process.exit(3), ${runTimeoutMs});
`;

async function unicastRun(src: string, n: number): Promise<number> {
  const sender = run([...prefix(0), process.execPath, '-e', unicastSender, src, String(n)]);
  await new Promise((r) => setTimeout(r, 500));
  const rs = Array.from({ length: n }, (_, k) =>
    run([...prefix(k + 1), process.execPath, '-e', unicastReceiver, ipOf(0), join(dir, `u${k}.img`)]),
  );
  const s = await sender;
  for (const p of [s, ...(await Promise.all(rs))]) addCpu(p.err);
  if (s.code !== 0) throw new Error(`unicast sender failed: ${s.err}`);
  for (let k = 0; k < n; k++) {
    const got = statSync(join(dir, `u${k}.img`)).size;
    if (got !== sizeBytes) throw new Error(`unicast copy ${k} has ${got} bytes`);
    rmSync(join(dir, `u${k}.img`), { force: true });
  }
  return Number(s.out.trim()) / 1000;
}

async function udpcastRun(src: string, n: number): Promise<number> {
  const rs = Array.from({ length: n }, (_, k) =>
    run([
      ...prefix(k + 1),
      'udp-receiver',
      '--file',
      join(dir, `p${k}.img`),
      '--interface',
      lab!.nodes[k + 1]!.dev,
      '--nokbd',
      '--sync',
    ]),
  );
  await new Promise((r) => setTimeout(r, 1000));
  const s = await run([
    ...prefix(0),
    'udp-sender',
    '--file',
    src,
    '--interface',
    lab!.nodes[0]!.dev,
    '--min-receivers',
    String(n),
    '--nokbd',
  ]);
  const rr = await Promise.all(rs);
  for (const p of [s, ...rr]) addCpu(p.err);
  if (s.code !== 0 || rr.some((r) => r.code !== 0))
    throw new Error(`udpcast failed: ${s.err} ${rr.map((r) => r.err).join(' ')}`);
  for (let k = 0; k < n; k++) {
    const got = statSync(join(dir, `p${k}.img`)).size;
    if (got !== sizeBytes) throw new Error(`udpcast copy ${k} has ${got} bytes`);
    rmSync(join(dir, `p${k}.img`), { force: true });
  }
  return s.ms / 1000;
}

async function main(): Promise<void> {
  const src = join(dir, 'golden.img');
  await makeImage(src, sizeBytes, 42);
  const dataBytes = await nonZeroBytes(src);
  console.log(
    `# bench/clone: ${sizeMiB} MiB image (${(dataBytes / MiB).toFixed(0)} MiB in non-zero 1 MiB blocks), ${lab ? `netns + veth shaped to ${rate} (tbf)` : `loopback, unshaped (${why})`}; udpcast ${haveUdpcast ? 'yes' : 'not run'}`,
  );
  const linkBytes = (method: string, n: number) =>
    method.startsWith('corral') ? dataBytes : method === 'unicast xN' ? n * sizeBytes : sizeBytes;
  const rows: { method: string; n: number; s: number; cpuS: number; load: number }[] = [];
  const measure = async (method: string, n: number, f: () => Promise<number>) => {
    cpuS = 0;
    const s = await f();
    // The machine's 1-minute load average as the run ends (this bench's own processes included).
    rows.push({ method, n, s, cpuS, load: loadavg()[0]! });
  };
  for (const n of counts) {
    if (only.has('corral')) await measure('corral clone', n, () => cloneRun(src, n));
    if (only.has('tls')) await measure('corral --tls', n, () => cloneRun(src, n, true));
    if (only.has('unicast')) await measure('unicast xN', n, () => unicastRun(src, n));
    if (haveUdpcast && only.has('udpcast')) await measure('udpcast', n, () => udpcastRun(src, n));
    for (const r of rows.filter((x) => x.n === n))
      process.stderr.write(`  done: ${r.method} n=${r.n} ${r.s.toFixed(2)} s\n`);
  }
  const mbps = (s: number) => sizeBytes / s / 1e6;
  console.log(
    `${'method'.padEnd(14)} ${'N'.padStart(2)} ${'time s'.padStart(8)} ${'MB/s per rcv'.padStart(13)} ${lineBps ? 'of line'.padStart(8) : ''} ${'vs udpcast'.padStart(10)} ${'vs unicast'.padStart(10)} ${haveTime ? 'CPU s'.padStart(6) : ''} ${lineBps ? 'busiest link' : ''} ${'load'.padStart(5)}`,
  );
  for (const r of rows) {
    const udp = rows.find((x) => x.n === r.n && x.method === 'udpcast');
    const uni = rows.find((x) => x.n === r.n && x.method === 'unicast xN');
    console.log(
      `${r.method.padEnd(14)} ${String(r.n).padStart(2)} ${r.s.toFixed(2).padStart(8)} ${mbps(r.s).toFixed(1).padStart(13)} ${lineBps ? `${((sizeBytes / r.s / lineBps) * 100).toFixed(0)}%`.padStart(8) : ''} ${(udp ? `${(udp.s / r.s).toFixed(2)}x` : '-').padStart(10)} ${(uni ? `${(uni.s / r.s).toFixed(2)}x` : '-').padStart(10)} ${haveTime ? r.cpuS.toFixed(1).padStart(6) : ''} ${lineBps ? `${((linkBytes(r.method, r.n) / r.s / lineBps) * 100).toFixed(0)}%`.padStart(12) : ''} ${r.load.toFixed(1).padStart(5)}`,
    );
  }
  if (sourceHashS.length > 0)
    console.log(
      `(corral time: streaming start to the last receiver verified; serve checksummed the source before, in ${sourceHashS.map((x) => x.toFixed(1)).join('/')} s, not counted)`,
    );
  console.log(
    `(ratios: how many times faster than the peer; > 1 is better${haveTime ? '. CPU s: user+system of all processes of the method, process start included' : ''}; load: 1-min load average when the run ended, on ${cpus().length} CPUs)`,
  );
}

/** Bytes in the image's non-zero 1 MiB blocks (what corral puts on each link). */
async function nonZeroBytes(path: string): Promise<number> {
  const fh = await open(path, 'r');
  try {
    const buf = Buffer.allocUnsafe(MiB);
    let n = 0;
    for (let off = 0; off < sizeBytes; off += MiB) {
      const { bytesRead } = await fh.read(buf, 0, Math.min(MiB, sizeBytes - off), off);
      if (!isAllZero(buf.subarray(0, bytesRead))) n += bytesRead;
    }
    return n;
  } finally {
    await fh.close();
  }
}

main()
  .catch((err: unknown) => {
    console.error(err);
    process.exitCode = 1;
  })
  .finally(cleanup);
