// Starts real etcd members (Debian's etcd-server) on 127.0.0.1 for tests and benchmarks.
// Every member runs under `setpriv --pdeathsig KILL`, so it dies with the test process even
// when that one is SIGKILLed; stop() (and process exit) kills members and removes data dirs.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { mkdtempSync, readdirSync, rmSync, existsSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Etcd3 } from 'etcd3';
import { etcdClientOptions } from '../../src/store/etcd.js';

/** bound on waiting for a fresh cluster to elect a leader and answer */
export const etcdStartTimeoutMs = 20_000;
/** bound on waiting for a killed member to exit */
const etcdKillWaitMs = 5_000;
/** raft timings for tests: fast elections, still stable on 2 loaded cores */
const etcdHeartbeatMs = 50;
const etcdElectionMs = 500;
/** etcd's default request cap is 1.5 MiB; the Store contract wants values of at least 1 MiB plus txns */
const etcdMaxRequestBytes = 8 * 1024 * 1024;
/** stderr kept per member for failure messages */
const etcdLogTailMaxChars = 4000;

export interface EtcdCluster {
  /** client endpoints, `127.0.0.1:port`, member i at index i */
  readonly endpoints: string[];
  /** `etcd://h:p,h:p` for openStore */
  readonly url: string;
  readonly dataDir: string;
  /** SIGKILL member i and wait until it has exited */
  kill(i: number): Promise<void>;
  /** SIGSTOP member i: alive for the kernel (TCP accepts), silent for etcd (a hung member) */
  pause(i: number): void;
  /** SIGCONT member i */
  resume(i: number): void;
  /** kill every member and remove the data dirs; safe to call twice */
  stop(): Promise<void>;
  /** last lines etcd wrote to stderr, for failure messages */
  logTail(i: number): string;
}

export interface StartEtcdOptions {
  members: 1 | 3;
  /** put data dirs on /dev/shm when it exists (fast fsync); false = os.tmpdir() (bench: real disk) */
  ramDisk?: boolean;
}

/** undefined when etcd is usable, else the reason to skip (tests call t.skip(reason)) */
export function etcdMissing(): string | undefined {
  const r = spawnSync('etcd', ['--version'], { encoding: 'utf8' });
  if (r.error || r.status !== 0) {
    return 'etcd is not installed (Debian etcd-server; bash scripts/setup.sh installs it)';
  }
  return undefined;
}

let setprivFound: boolean | undefined;
function hasSetpriv(): boolean {
  setprivFound ??= spawnSync('setpriv', ['--version']).status === 0;
  return setprivFound;
}

/** data dirs of test processes that were SIGKILLed (their etcd died with them: pdeathsig) */
function sweepStaleDataDirs(root: string): void {
  for (const name of readdirSync(root)) {
    const pid = Number(/^corral-etcd-(\d+)-/.exec(name)?.[1]);
    if (!pid || pid === process.pid) continue;
    try {
      process.kill(pid, 0);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ESRCH')
        rmSync(join(root, name), { recursive: true, force: true });
    }
  }
}

async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const addr = srv.address();
      const port = typeof addr === 'object' && addr ? addr.port : 0;
      srv.close(() => (port > 0 ? resolve(port) : reject(new Error('no free port'))));
    });
  });
}

const live = new Set<() => void>();
let exitHookInstalled = false;
function installExitHook(): void {
  if (exitHookInstalled) return;
  exitHookInstalled = true;
  process.on('exit', () => {
    for (const f of live) f();
  });
  for (const sig of ['SIGINT', 'SIGTERM'] as const) {
    process.once(sig, () => {
      for (const f of live) f();
      process.kill(process.pid, sig);
    });
  }
}

export async function startEtcd(opts: StartEtcdOptions): Promise<EtcdCluster> {
  const missing = etcdMissing();
  if (missing) throw new Error(missing);
  installExitHook();
  const root = opts.ramDisk !== false && existsSync('/dev/shm') ? '/dev/shm' : tmpdir();
  sweepStaleDataDirs(root);
  const dataDir = mkdtempSync(join(root, `corral-etcd-${process.pid}-`));
  const n = opts.members;
  const clientPorts: number[] = [];
  const peerPorts: number[] = [];
  for (let i = 0; i < n; i++) {
    clientPorts.push(await freePort());
    peerPorts.push(await freePort());
  }
  const names = clientPorts.map((_, i) => `m${i}`);
  const initialCluster = names.map((nm, i) => `${nm}=http://127.0.0.1:${peerPorts[i]}`).join(',');
  const procs: (ChildProcess | undefined)[] = [];
  const logs: string[] = names.map(() => '');
  const exited: Promise<void>[] = [];

  for (let i = 0; i < n; i++) {
    const args = [
      '--pdeathsig',
      'KILL',
      'etcd',
      `--name=${names[i]}`,
      `--data-dir=${join(dataDir, names[i]!)}`,
      `--listen-client-urls=http://127.0.0.1:${clientPorts[i]}`,
      `--advertise-client-urls=http://127.0.0.1:${clientPorts[i]}`,
      `--listen-peer-urls=http://127.0.0.1:${peerPorts[i]}`,
      `--initial-advertise-peer-urls=http://127.0.0.1:${peerPorts[i]}`,
      `--initial-cluster=${initialCluster}`,
      '--initial-cluster-state=new',
      `--initial-cluster-token=corral-test-${process.pid}-${clientPorts[0]}`,
      `--heartbeat-interval=${etcdHeartbeatMs}`,
      `--election-timeout=${etcdElectionMs}`,
      `--max-request-bytes=${etcdMaxRequestBytes}`,
      '--logger=zap',
      '--log-level=error',
    ];
    // without setpriv (util-linux) members only die with stop() or a clean exit of this process
    const p = hasSetpriv()
      ? spawn('setpriv', args, { stdio: ['ignore', 'ignore', 'pipe'] })
      : spawn('etcd', args.slice(3), { stdio: ['ignore', 'ignore', 'pipe'] });
    p.stderr?.setEncoding('utf8');
    p.stderr?.on('data', (s: string) => {
      logs[i] = (logs[i] + s).slice(-etcdLogTailMaxChars);
    });
    procs.push(p);
    exited.push(
      new Promise<void>((resolve) => {
        if (p.exitCode !== null || p.signalCode !== null) resolve();
        p.once('exit', () => resolve());
        p.once('error', () => resolve());
      }),
    );
  }

  let stopped = false;
  const killAllSync = (): void => {
    for (const p of procs) {
      if (p && p.exitCode === null && p.signalCode === null) p.kill('SIGKILL');
    }
    rmSync(dataDir, { recursive: true, force: true });
  };
  live.add(killAllSync);

  const endpoints = clientPorts.map((p) => `127.0.0.1:${p}`);
  const cluster: EtcdCluster = {
    endpoints,
    url: `etcd://${endpoints.join(',')}`,
    dataDir,
    logTail: (i) => logs[i] ?? '',
    async kill(i) {
      const p = procs[i];
      if (!p) throw new Error(`no etcd member ${i}`);
      if (p.exitCode === null && p.signalCode === null) p.kill('SIGKILL');
      await withTimeout(exited[i]!, etcdKillWaitMs, `etcd member ${i} did not exit after SIGKILL`);
    },
    pause(i) {
      if (!procs[i]?.kill('SIGSTOP')) throw new Error(`cannot SIGSTOP etcd member ${i}`);
    },
    resume(i) {
      if (!procs[i]?.kill('SIGCONT')) throw new Error(`cannot SIGCONT etcd member ${i}`);
    },
    async stop() {
      if (stopped) return;
      stopped = true;
      for (const p of procs) {
        if (p && p.exitCode === null && p.signalCode === null) p.kill('SIGKILL');
      }
      await withTimeout(Promise.all(exited), etcdKillWaitMs, 'etcd members did not exit').catch(() => {});
      rmSync(dataDir, { recursive: true, force: true });
      live.delete(killAllSync);
    },
  };

  try {
    await waitHealthy(cluster, procs, logs);
  } catch (err) {
    await cluster.stop();
    throw err;
  }
  return cluster;
}

async function withTimeout<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([
      p,
      new Promise<T>((_, reject) => {
        timer = setTimeout(() => reject(new Error(`${what} (after ${ms} ms)`)), ms);
      }),
    ]);
  } finally {
    clearTimeout(timer);
  }
}

/** every member answers a linearizable read (so a leader exists) within etcdStartTimeoutMs */
async function waitHealthy(
  cluster: EtcdCluster,
  procs: (ChildProcess | undefined)[],
  logs: string[],
): Promise<void> {
  const deadlineMs = Date.now() + etcdStartTimeoutMs;
  for (let i = 0; i < cluster.endpoints.length; i++) {
    const client = new Etcd3(etcdClientOptions(cluster.endpoints[i]!));
    try {
      for (;;) {
        const p = procs[i];
        if (p && (p.exitCode !== null || p.signalCode !== null)) {
          throw new Error(`etcd member ${i} exited at start: ${logs[i]}`);
        }
        try {
          await client.get('corral-health-probe').options({ deadline: Date.now() + 1000 });
          break;
        } catch (err) {
          if (Date.now() > deadlineMs) {
            throw new Error(
              `etcd member ${i} (${cluster.endpoints[i]}) not healthy after ${etcdStartTimeoutMs} ms: ${String(err)}; log: ${logs[i]}`,
              { cause: err },
            );
          }
          await new Promise((r) => setTimeout(r, 50));
        }
      }
    } finally {
      client.close();
    }
  }
}
