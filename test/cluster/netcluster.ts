// A multi-host Corral cluster on one machine, for tests and benchmarks (issue 8).
//
//   bridge namespace <prefix>-br: br0 198.18.K.1/24 (also the "router" for reachability)
//     ├─ veth ── host namespace <prefix>-h1: eth0 198.18.K.11, etcd member h1, corral agent h1
//     ├─ veth ── host namespace <prefix>-h2: ...
//     └─ veth ── the root namespace: <prefix>o 198.18.K.254 (the observer: this test process)
//
// Every host runs a real etcd member (one Raft cluster of N) and a `corral agent` under
// `ip netns exec`, each with its own state directory (optionally a small tmpfs, so its disk can
// be filled). Services listen on 127.0.0.1 inside their host namespace and append witness
// lines to one shared file. Faults are nft rules and tc netem qdiscs inside a host namespace,
// signals to processes, a filled tmpfs, a heartbeat-disk path taken away.
//
// Clean-up: stop() removes everything; a process 'exit' hook does the same synchronously if
// a test fails or is interrupted; and start() first sweeps leftovers of dead test processes
// (namespaces, mounts, loop devices, directories named with the crl<pid>x prefix).
//
// Clock jumps are not injected: a time namespace (unshare --time) only offsets CLOCK_MONOTONIC
// and CLOCK_BOOTTIME, and only for processes started after the offset is set; CLOCK_REALTIME
// (Date.now, etcd lease bookkeeping is monotonic anyway) cannot be namespaced, and setting it
// would move every host at once.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import {
  existsSync,
  mkdirSync,
  openSync,
  closeSync,
  readdirSync,
  readFileSync,
  rmSync,
  symlinkSync,
  unlinkSync,
  writeFileSync,
} from 'node:fs';
import { connect } from 'node:net';
import { join, resolve } from 'node:path';
import { openStore } from '../../src/store/index.js';
import type { Store } from '../../src/store/types.js';
import { keys } from '../../src/core/keys.js';
import { formatDisk } from '../../src/health/diskhb.js';
import { witnessOverlaps } from '../helpers/cluster.js';
import { ClusterReads } from '../helpers/cluster-reads.js';

export const repo = resolve(import.meta.dirname, '..', '..');
const corralBin = join(repo, 'bin', 'corral.js');

export const netLimits = {
  etcdStartTimeoutMs: 30_000,
  agentsOnlineTimeoutMs: 90_000,
  /** restarts of an agent that exited while the cluster starts */
  agentStartRetries: 5,
  /** how long an observer call through the store is retried */
  observeRetryMs: 30_000,
  cmdTimeoutMs: 10_000,
  /** a witness gap longer than this counts as a copy having stopped */
  witnessSlackMs: 0,
} as const;

const namePattern = /^crl(\d+)x(\d+)/;
const shmRoot = existsSync('/dev/shm') ? '/dev/shm' : '/tmp';
let clusterCounter = 0;
const live = new Set<NetCluster>();
let hooked = false;

/** undefined when the harness can run here, else why not (tests t.skip with it) */
export function netnsMissing(): string | undefined {
  if (process.getuid?.() !== 0) return 'needs root: network namespaces, nft, tc, losetup';
  for (const [bin, pkg] of [
    ['ip', 'iproute2'],
    ['nft', 'nftables'],
    ['tc', 'iproute2'],
    ['etcd', 'etcd-server'],
    ['losetup', 'mount'],
  ] as const) {
    if (spawnSync(bin, ['--version'], { stdio: 'ignore' }).error)
      return `needs ${bin} (Debian ${pkg}; bash scripts/setup.sh installs it)`;
  }
  const probe = `crlprobe${process.pid}`;
  const r = sh(['ip', 'netns', 'add', probe], true);
  sh(['ip', 'netns', 'del', probe], true);
  if (r.status !== 0) return `needs network namespaces: ip netns add failed: ${r.stderr.trim()}`;
  return undefined;
}

function sh(
  argv: string[],
  allowFail = false,
  input?: string,
): { status: number; stdout: string; stderr: string } {
  const r = spawnSync(argv[0]!, argv.slice(1), {
    encoding: 'utf8',
    timeout: netLimits.cmdTimeoutMs,
    input,
  });
  const out = { status: r.status ?? -1, stdout: r.stdout ?? '', stderr: r.stderr ?? String(r.error ?? '') };
  if (!allowFail && out.status !== 0)
    throw new Error(`${argv.join(' ')} failed (${out.status}): ${out.stderr.trim()}`);
  return out;
}

function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code !== 'ESRCH';
  }
}

function killNamespace(ns: string): void {
  const pids = sh(['ip', 'netns', 'pids', ns], true).stdout.split(/\s+/).filter(Boolean);
  for (const p of pids) {
    try {
      process.kill(Number(p), 'SIGKILL');
    } catch {
      // already gone
    }
  }
  sh(['ip', 'netns', 'del', ns], true);
}

/** Remove what test processes that no longer exist left behind (all named crl<pid>x<n>). */
export function sweepLeftovers(onlyPid?: number): void {
  const dead = (name: string) => {
    const m = namePattern.exec(name);
    if (!m) return false;
    const pid = Number(m[1]);
    return onlyPid !== undefined ? pid === onlyPid : !pidAlive(pid);
  };
  for (const line of sh(['ip', 'netns', 'list'], true).stdout.split('\n')) {
    const ns = line.split(' ')[0] ?? '';
    if (dead(ns)) killNamespace(ns);
  }
  for (const line of sh(['ip', '-o', 'link', 'show'], true).stdout.split('\n')) {
    const dev = /^\d+: ([^:@]+)/.exec(line)?.[1];
    if (dev && dead(dev)) sh(['ip', 'link', 'del', dev], true);
  }
  const mounts = readFileSync('/proc/mounts', 'utf8')
    .split('\n')
    .map((l) => l.split(' ')[1] ?? '')
    .filter((m) => m.startsWith(shmRoot + '/crl'));
  for (const m of mounts) if (dead(m.slice(shmRoot.length + 1))) sh(['umount', '-l', m], true);
  for (const line of sh(['losetup', '-l', '-n', '-O', 'NAME,BACK-FILE'], true).stdout.split('\n')) {
    const [dev, file] = line.trim().split(/\s+/);
    if (dev && file?.startsWith(shmRoot + '/crl') && dead(file.slice(shmRoot.length + 1)))
      sh(['losetup', '-d', dev], true);
  }
  for (const name of readdirSync(shmRoot))
    if (dead(name)) rmSync(join(shmRoot, name), { recursive: true, force: true });
}

function hookExit(): void {
  if (hooked) return;
  hooked = true;
  process.on('exit', () => {
    for (const c of live) c.destroySync();
  });
  for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const)
    process.once(sig, () => {
      for (const c of live) c.destroySync();
      process.exit(130);
    });
}

export interface NetClusterOptions {
  hosts: number;
  leaseTtlMs?: number;
  /** a shared heartbeat disk (loop device), a slot per host and the sbd fence device */
  disk?: boolean;
  /** network.knownAddresses = the bridge (the hosts' router) */
  reachability?: boolean;
  /** a tmpfs of this many MiB as each host's state dir (to fill it) */
  stateTmpfsMiB?: number;
  extraTimings?: string;
  watchdog?: boolean;
  /**
   * a `command` fence device per host that powers it off: SIGKILL of every process in its
   * namespace but its etcd member (which stands for a store member on other hardware), as a
   * PDU or IPMI power-off would; first in the list, before the sbd device when `disk` is set
   */
  powerFence?: boolean;
}

export interface Host {
  i: number;
  name: string;
  ns: string;
  ip: string;
  dir: string;
  stateRoot: string;
  agent?: ChildProcess;
  etcd?: ChildProcess;
}

export class NetCluster extends ClusterReads {
  readonly prefix: string;
  readonly dir: string;
  readonly brNs: string;
  readonly subnet: string;
  readonly routerIp: string;
  readonly observerIp: string;
  readonly hosts: Host[] = [];
  readonly configPath: string;
  readonly witnessPath: string;
  readonly k = keys('mh');
  protected readonly clusterName = 'mh';
  protected readonly waitDefaultMs = 30_000;
  loopDev: string | undefined;
  store!: Store;
  private destroyed = false;
  readonly timings: {
    leaseTtlMs: number;
    renewIntervalMs: number;
    selfFenceMarginMs: number;
    noDeviceFenceMarginMs: number;
  };

  constructor(readonly o: NetClusterOptions) {
    super();
    this.prefix = `crl${process.pid}x${clusterCounter++}`;
    this.dir = join(shmRoot, this.prefix);
    this.brNs = `${this.prefix}-br`;
    this.subnet = pickSubnet();
    this.routerIp = `${this.subnet}.1`;
    this.observerIp = `${this.subnet}.254`;
    this.configPath = join(this.dir, 'cluster.yaml');
    this.witnessPath = join(this.dir, 'witness.log');
    const ttl = o.leaseTtlMs ?? 4000;
    const margin = Math.round(ttl / 4);
    this.timings = {
      leaseTtlMs: ttl,
      selfFenceMarginMs: margin,
      renewIntervalMs: Math.floor((ttl - margin) / 3),
      noDeviceFenceMarginMs: margin * 2,
    };
    for (let i = 1; i <= o.hosts; i++) {
      const dir = join(this.dir, `h${i}`);
      this.hosts.push({
        i,
        name: `h${i}`,
        ns: `${this.prefix}-h${i}`,
        ip: `${this.subnet}.${10 + i}`,
        dir,
        stateRoot: join(dir, 'state'),
      });
    }
  }

  host(name: string): Host {
    const h = this.hosts.find((x) => x.name === name);
    if (!h) throw new Error(`no host ${name}`);
    return h;
  }

  get storeUrl(): string {
    return `etcd://${this.hosts.map((h) => `${h.ip}:2379`).join(',')}`;
  }

  // ------------------------------------------------------------------ setup

  async start(): Promise<void> {
    sweepLeftovers();
    hookExit();
    live.add(this);
    // on failure the caller's stop() tears down (after reading the logs), else the exit hook
    {
      mkdirSync(this.dir, { recursive: true });
      this.network();
      for (const h of this.hosts) {
        mkdirSync(h.stateRoot, { recursive: true });
        if (this.o.stateTmpfsMiB)
          sh(['mount', '-t', 'tmpfs', '-o', `size=${this.o.stateTmpfsMiB}m`, 'tmpfs', h.stateRoot]);
      }
      if (this.o.disk) await this.disk();
      this.writeConfig();
      for (const h of this.hosts) this.startEtcd(h);
      // open the client once members listen: gRPC backs off exponentially from refused connects
      await this.waitFor(
        'etcd ports',
        async () => (await Promise.all(this.hosts.map((h) => tcpOpen(h.ip, 2379)))).every(Boolean),
        netLimits.etcdStartTimeoutMs,
        100,
        false,
      );
      this.store = await this.observe('open the store', () =>
        openStore(this.storeUrl, { opTimeoutMs: 2000 }),
      );
      await this.waitFor(
        'etcd answers',
        async () => {
          try {
            await this.store.get('/probe');
            return true;
          } catch {
            return false;
          }
        },
        netLimits.etcdStartTimeoutMs,
        200,
        false,
      );
      // an agent that cannot open the store at once exits (as under systemd, it is restarted):
      // on 2 loaded cores 5 members + 5 agents starting together often miss the first second
      let starting = true;
      const restartsLeft = new Map<string, number>(
        this.hosts.map((h) => [h.name, netLimits.agentStartRetries]),
      );
      const keepUp = (name: string) =>
        this.startAgent(name).once('exit', () => {
          const left = restartsLeft.get(name) ?? 0;
          if (!starting || this.destroyed || left <= 0) return;
          restartsLeft.set(name, left - 1);
          setTimeout(() => {
            if (starting && !this.destroyed) keepUp(name);
          }, 1000);
        });
      for (const h of this.hosts) keepUp(h.name);
      await this.waitFor(
        'all hosts online',
        async () => {
          const s = await this.snapshot();
          return this.hosts.every(
            (h) => s.nodes.get(h.name)?.status?.state === 'online' && s.nodes.get(h.name)?.alive?.ready,
          );
        },
        netLimits.agentsOnlineTimeoutMs,
      ).finally(() => (starting = false));
    }
  }

  private nsx(ns: string, argv: string[], allowFail = false, input?: string) {
    return sh(['ip', 'netns', 'exec', ns, ...argv], allowFail, input);
  }

  private network(): void {
    sh(['ip', 'netns', 'add', this.brNs]);
    this.nsx(this.brNs, ['ip', 'link', 'set', 'lo', 'up']);
    this.nsx(this.brNs, ['ip', 'link', 'add', 'br0', 'type', 'bridge']);
    this.nsx(this.brNs, ['ip', 'addr', 'add', `${this.routerIp}/24`, 'dev', 'br0']);
    this.nsx(this.brNs, ['ip', 'link', 'set', 'br0', 'up']);
    for (const h of this.hosts) {
      const outer = `${this.prefix}p${h.i}`;
      const inner = `${this.prefix}h${h.i}`;
      sh(['ip', 'netns', 'add', h.ns]);
      sh(['ip', 'link', 'add', inner, 'type', 'veth', 'peer', 'name', outer]);
      sh(['ip', 'link', 'set', inner, 'netns', h.ns]);
      sh(['ip', 'link', 'set', outer, 'netns', this.brNs]);
      this.nsx(this.brNs, ['ip', 'link', 'set', outer, 'master', 'br0', 'up']);
      this.nsx(h.ns, ['ip', 'link', 'set', 'lo', 'up']);
      this.nsx(h.ns, ['ip', 'link', 'set', inner, 'name', 'eth0']);
      this.nsx(h.ns, ['ip', 'addr', 'add', `${h.ip}/24`, 'dev', 'eth0']);
      this.nsx(h.ns, ['ip', 'link', 'set', 'eth0', 'up']);
      this.nsx(h.ns, ['nft', '-f', '-'], false, nftBase);
    }
    const obs = `${this.prefix}o`;
    const obsPeer = `${this.prefix}q`;
    sh(['ip', 'link', 'add', obs, 'type', 'veth', 'peer', 'name', obsPeer]);
    sh(['ip', 'link', 'set', obsPeer, 'netns', this.brNs]);
    this.nsx(this.brNs, ['ip', 'link', 'set', obsPeer, 'master', 'br0', 'up']);
    sh(['ip', 'addr', 'add', `${this.observerIp}/24`, 'dev', obs]);
    sh(['ip', 'link', 'set', obs, 'up']);
  }

  private async disk(): Promise<void> {
    const img = join(this.dir, 'heartbeat.img');
    writeFileSync(img, Buffer.alloc(0));
    sh(['truncate', '-s', '1M', img]);
    this.loopDev = sh(['losetup', '-f', '--show', img]).stdout.trim();
    await formatDisk(this.loopDev, this.hosts.length, Date.now());
    for (const h of this.hosts) symlinkSync(this.loopDev, this.diskPath(h));
  }

  /** the path a host's agent opens for its heartbeat: a symlink to the shared loop device */
  diskPath(h: Host): string {
    return join(h.dir, 'heartbeat-disk');
  }

  private writeConfig(): void {
    const t = this.timings;
    const devices: string[] = [];
    if (this.o.powerFence)
      devices.push(`{ type: command, command: [${this.writePowerFence()}], timeoutMs: 5000 }`);
    if (this.o.disk)
      devices.push(
        `{ type: sbd, device: ${this.loopDev}, timeoutMs: 6000, msgwaitMs: ${Math.max(2000, t.noDeviceFenceMarginMs)} }`,
      );
    const fence = `[${devices.join(', ')}]`;
    writeFileSync(
      this.configPath,
      [
        'version: 1',
        'cluster: { name: mh }',
        `store: ${this.storeUrl}`,
        `timings: { leaseTtlMs: ${t.leaseTtlMs}, renewIntervalMs: ${t.renewIntervalMs}, selfFenceMarginMs: ${t.selfFenceMarginMs}, noDeviceFenceMarginMs: ${t.noDeviceFenceMarginMs}, fenceRetryBackoffMs: 500, fenceRetryBackoffMaxMs: 2000, fenceTimeoutMs: 8000, monitorIntervalMs: 500${this.o.extraTimings ? ', ' + this.o.extraTimings : ''} }`,
        this.o.reachability ? `network: { knownAddresses: [${this.routerIp}] }` : '',
        'nodes:',
        ...this.hosts.map((h) =>
          [
            `  - name: ${h.name}`,
            `    address: ${h.ip}`,
            `    capacity: { cpus: 8, memory: 4096 }`,
            `    fence: ${fence}`,
            this.o.disk ? `    disk: { device: ${this.diskPath(h)}, slot: ${h.i - 1}, intervalMs: 300 }` : '',
          ]
            .filter(Boolean)
            .join('\n'),
        ),
        '',
      ]
        .filter((l) => l !== '')
        .join('\n') + '\n',
    );
  }

  /**
   * The power switch: `fence-power NODE off` kills every process of the node's namespace but
   * its etcd member and returns once they are gone (exit 0), as a PDU's "off" does.
   */
  private writePowerFence(): string {
    const path = join(this.dir, 'fence-power');
    writeFileSync(
      path,
      [
        '#!/bin/bash',
        '# fence-power NODE off: power off a namespaced test host (SIGKILL all but its etcd member)',
        'set -u',
        '[ "${2:-}" = off ] || { echo "fence-power: only the off action is supported, got ${2:-none}" >&2; exit 2; }',
        `ns="${this.prefix}-$1"`,
        '[ -e "/run/netns/$ns" ] || { echo "fence-power: no host namespace $ns" >&2; exit 1; }',
        'victims() { for p in $(ip netns pids "$ns"); do [ "$(cat /proc/$p/comm 2>/dev/null)" = etcd ] || echo $p; done; }',
        'for i in $(seq 1 100); do',
        '  v=$(victims); [ -z "$v" ] && exit 0',
        '  kill -9 $v 2>/dev/null; sleep 0.02',
        'done',
        'echo "fence-power: processes of $ns still alive: $(victims)" >&2; exit 1',
        '',
      ].join('\n'),
      { mode: 0o755 },
    );
    return path;
  }

  startEtcd(h: Host): void {
    const cluster = this.hosts.map((x) => `${x.name}=http://${x.ip}:2380`).join(',');
    const log = openSync(join(h.dir, 'etcd.log'), 'a');
    h.etcd = spawn(
      'ip',
      [
        'netns',
        'exec',
        h.ns,
        'setpriv',
        '--pdeathsig',
        'KILL',
        'etcd',
        `--name=${h.name}`,
        `--data-dir=${join(h.dir, 'etcd')}`,
        `--listen-client-urls=http://${h.ip}:2379,http://127.0.0.1:2379`,
        `--advertise-client-urls=http://${h.ip}:2379`,
        `--listen-peer-urls=http://${h.ip}:2380`,
        `--initial-advertise-peer-urls=http://${h.ip}:2380`,
        `--initial-cluster=${cluster}`,
        '--initial-cluster-state=new',
        `--initial-cluster-token=${this.prefix}`,
        '--heartbeat-interval=50',
        '--election-timeout=500',
        '--logger=zap',
        '--log-level=warn',
      ],
      { stdio: ['ignore', log, log] },
    );
    closeSync(log);
  }

  startAgent(name: string): ChildProcess {
    const h = this.host(name);
    const log = openSync(join(h.dir, 'agent.log'), 'a');
    const args = [
      'netns',
      'exec',
      h.ns,
      'setpriv',
      '--pdeathsig',
      'KILL',
      process.execPath,
      corralBin,
      'agent',
    ];
    args.push(
      '--config',
      this.configPath,
      '--node',
      h.name,
      '--state-root',
      h.stateRoot,
      '--log-level',
      'info',
    );
    if (this.o.watchdog === false) args.push('--no-watchdog');
    h.agent = spawn('ip', args, {
      stdio: ['ignore', log, log],
      env: { ...process.env, CORRAL_HOME: join(h.dir, 'home') },
    });
    closeSync(log);
    return h.agent;
  }

  // ------------------------------------------------------------------ faults

  /** the host crashes: kill -9 of every process in its namespace but its etcd member */
  crash(name: string): void {
    const h = this.host(name);
    const etcdPid = String(h.etcd?.pid);
    const pids = sh(['ip', 'netns', 'pids', h.ns], true)
      .stdout.split(/\s+/)
      .filter((p) => p && p !== etcdPid);
    for (const p of pids) {
      try {
        process.kill(Number(p), 'SIGKILL');
      } catch {
        // already gone
      }
    }
  }

  private nft(h: Host, rules: string[]): void {
    this.nsx(h.ns, ['nft', '-f', '-'], false, rules.map((r) => `add rule inet crl c${r}\n`).join(''));
  }

  /** cut a host off the network completely (both directions) */
  isolate(name: string): void {
    this.nft(this.host(name), ['in iifname "eth0" drop', 'out oifname "eth0" drop']);
  }

  /** cut a host from the etcd cluster (client and peer ports), keeping every other traffic */
  cutEtcd(name: string): void {
    const h = this.host(name);
    this.nft(h, [
      'in iifname "eth0" tcp dport { 2379, 2380 } drop',
      'in iifname "eth0" tcp sport { 2379, 2380 } drop',
      'out oifname "eth0" tcp dport { 2379, 2380 } drop',
      'out oifname "eth0" tcp sport { 2379, 2380 } drop',
    ]);
  }

  /** cut a host from its peers (everything but etcd and the router) */
  cutPeersKeepEtcd(name: string): void {
    this.nft(this.host(name), [
      'in iifname "eth0" tcp dport { 2379, 2380 } accept',
      'in iifname "eth0" tcp sport { 2379, 2380 } accept',
      `in iifname "eth0" ip saddr ${this.routerIp} accept`,
      'in iifname "eth0" drop',
    ]);
  }

  /** split the cluster: the hosts in `side` only reach each other (and the observer) */
  partition(side: string[]): void {
    const others = this.hosts.filter((h) => !side.includes(h.name)).map((h) => h.ip);
    for (const n of side)
      this.nft(this.host(n), [
        `in ip saddr { ${others.join(', ')} } drop`,
        `out ip daddr { ${others.join(', ')} } drop`,
      ]);
  }

  /** one-way loss: drop what the host receives ('in') or what it sends ('out') */
  oneWay(name: string, dir: 'in' | 'out'): void {
    this.nft(this.host(name), [dir === 'in' ? 'in iifname "eth0" drop' : 'out oifname "eth0" drop']);
  }

  /** the host's router (the reachability target) stops answering it */
  cutRouter(name: string): void {
    this.nft(this.host(name), [`out ip daddr ${this.routerIp} drop`, `in ip saddr ${this.routerIp} drop`]);
  }

  /** tc netem on the host's link: delay, jitter, loss */
  netem(name: string, o: { delayMs?: number; jitterMs?: number; lossPct?: number }): void {
    const args = ['tc', 'qdisc', 'replace', 'dev', 'eth0', 'root', 'netem'];
    if (o.delayMs) args.push('delay', `${o.delayMs}ms`, `${o.jitterMs ?? 0}ms`);
    if (o.lossPct) args.push('loss', `${o.lossPct}%`);
    this.nsx(this.host(name).ns, args);
  }

  /** remove every network fault of a host */
  heal(name: string): void {
    const h = this.host(name);
    this.nsx(h.ns, ['nft', 'flush', 'table', 'inet', 'crl']);
    this.nsx(h.ns, ['nft', '-f', '-'], false, nftBase);
    this.nsx(h.ns, ['tc', 'qdisc', 'del', 'dev', 'eth0', 'root'], true);
  }

  signalAgent(name: string, sig: NodeJS.Signals): void {
    const a = this.host(name).agent;
    if (!a?.pid) throw new Error(`no agent on ${name}`);
    process.kill(a.pid, sig);
  }

  signalEtcd(name: string, sig: NodeJS.Signals): void {
    const e = this.host(name).etcd;
    if (!e?.pid) throw new Error(`no etcd on ${name}`);
    process.kill(e.pid, sig);
  }

  /** fill a host's state tmpfs (stateTmpfsMiB) to the last byte */
  fillDisk(name: string): void {
    const h = this.host(name);
    sh(['dd', 'if=/dev/zero', `of=${join(h.stateRoot, 'filler')}`, 'bs=64k'], true);
  }

  freeDisk(name: string): void {
    rmSync(join(this.host(name).stateRoot, 'filler'), { force: true });
  }

  /** the host's heartbeat-disk path goes away (its agent opens it every round) */
  loseDisk(name: string): void {
    unlinkSync(this.diskPath(this.host(name)));
  }

  restoreDisk(name: string): void {
    if (this.loopDev) symlinkSync(this.loopDev, this.diskPath(this.host(name)));
  }

  // ------------------------------------------------------------------ observing

  /**
   * An observer call through the store, retried for a while: on a loaded machine (or while
   * a test itself breaks etcd quorum) a single call can time out without the test being wrong.
   */
  override async observe<T>(what: string, fn: () => Promise<T>): Promise<T> {
    const t0 = Date.now();
    for (;;) {
      try {
        return await fn();
      } catch (e) {
        if (Date.now() - t0 > netLimits.observeRetryMs)
          throw new Error(`${what}: the store did not answer for ${netLimits.observeRetryMs} ms`, {
            cause: e,
          });
        await new Promise((r) => setTimeout(r, 250));
      }
    }
  }

  /** every pair of copies of one resource that ran at the same time (must be none) */
  overlaps(): string[] {
    return witnessOverlaps(this.witnessPath, netLimits.witnessSlackMs);
  }

  /**
   * The witness verdict: no overlap of two copies, and every resource in `ids` started (or,
   * if not, its record gives a reason). Returns the problems found.
   */
  async verdict(ids: string[]): Promise<string[]> {
    const problems = this.overlaps().map((o) => `double run: ${o}`);
    const s = await this.snapshot();
    for (const id of ids) {
      const rec = s.resources.get(id)?.rec;
      if (!rec) problems.push(`lost: ${id} has no record`);
      else if (rec.state !== 'started' && !rec.reason)
        problems.push(`lost: ${id} is ${rec.state} without a reason`);
    }
    return problems;
  }

  /** witness pids of a resource per node, in order of first appearance */
  witnessNodes(id: string): string[] {
    if (!existsSync(this.witnessPath)) return [];
    const seen: string[] = [];
    for (const line of readFileSync(this.witnessPath, 'utf8').split('\n')) {
      try {
        const w = JSON.parse(line) as { resource: string; node: string };
        if (w.resource === id && seen.at(-1) !== w.node) seen.push(w.node);
      } catch {
        // partial line
      }
    }
    return seen;
  }

  /** the end of every host's agent log, for a failed test's output */
  agentLogTails(maxChars = 3000): string {
    return this.hosts.map((h) => `--- ${h.name}\n${this.agentLog(h.name).slice(-maxChars)}\n`).join('');
  }

  agentLog(name: string): string {
    const p = join(this.host(name).dir, 'agent.log');
    return existsSync(p) ? readFileSync(p, 'utf8') : '';
  }

  // ------------------------------------------------------------------ teardown

  async stop(): Promise<void> {
    await this.store?.close().catch(() => undefined);
    this.destroySync();
  }

  /** synchronous teardown (also from the process exit hook) */
  destroySync(): void {
    if (this.destroyed) return;
    this.destroyed = true;
    live.delete(this);
    for (const h of this.hosts) {
      // SIGCONT first: a stopped process does not die of SIGKILL until it runs
      for (const p of [h.agent, h.etcd])
        if (p?.pid)
          try {
            process.kill(p.pid, 'SIGCONT');
          } catch {
            /* gone */
          }
      killNamespace(h.ns);
    }
    killNamespace(this.brNs);
    sh(['ip', 'link', 'del', `${this.prefix}o`], true);
    for (const h of this.hosts) if (this.o.stateTmpfsMiB) sh(['umount', '-l', h.stateRoot], true);
    if (this.loopDev) sh(['losetup', '-d', this.loopDev], true);
    if (process.env.CORRAL_KEEP_TEST_DIRS) {
      process.stderr.write(`kept ${this.dir}\n`);
      return;
    }
    rmSync(this.dir, { recursive: true, force: true });
  }
}

const nftBase = `table inet crl {
  chain cin { type filter hook input priority 0; policy accept; }
  chain cout { type filter hook output priority 0; policy accept; }
}
`;

/** a /24 in 198.18.0.0/15 (benchmarking range) not yet routed here (several test files run at once) */
function pickSubnet(): string {
  const routes = sh(['ip', 'route'], true).stdout;
  for (let n = 0; n < 512; n++) {
    const k = (process.pid * 7 + clusterCounter * 3 + n) % 512;
    const net = `198.${18 + Math.floor(k / 256)}.${k % 256}`;
    if (!routes.includes(`${net}.0/24`)) return net;
  }
  throw new Error('no free /24 in 198.18.0.0/15');
}

function tcpOpen(host: string, port: number): Promise<boolean> {
  return new Promise((done) => {
    const sock = connect({ host, port });
    const finish = (ok: boolean) => {
      clearTimeout(timer);
      sock.destroy();
      done(ok);
    };
    const timer = setTimeout(() => finish(false), 500);
    sock.once('connect', () => finish(true));
    sock.once('error', () => finish(false));
  });
}
