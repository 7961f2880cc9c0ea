// A real Corral cluster on this host for tests: N `corral agent` processes on one SQLite
// store, each with its own state directory, services that leave witness records, and the
// CLI as a subprocess. Everything is torn down even when a test fails.
import { mkdtempSync, writeFileSync, readFileSync, existsSync, rmSync, mkdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { openStore } from '../../src/store/index.js';
import type { Store } from '../../src/store/types.js';
import { keys } from '../../src/core/keys.js';
import { readPid } from '../../src/cli/local.js';
import { ClusterReads } from './cluster-reads.js';

export { echoService } from './cluster-reads.js';

export const repo = resolve(import.meta.dirname, '..', '..');
export const corralBin = join(repo, 'bin', 'corral.js');

export interface TestNode {
  name: string;
  /** YAML for the node's fence list, e.g. '[{ type: local }]' */
  fence?: string;
  memory?: number;
  cpus?: number;
  labels?: Record<string, string>;
}

export interface ClusterOptions {
  nodes: TestNode[];
  leaseTtlMs?: number;
  extraTimings?: string;
  watchdog?: boolean;
  /** more `corral agent` arguments for a node, e.g. ['--api', '127.0.1.1:0'] */
  agentArgs?: (node: string) => string[];
}

export class TestCluster extends ClusterReads {
  readonly dir: string;
  readonly stateRoot: string;
  readonly configPath: string;
  readonly witnessPath: string;
  readonly agents = new Map<string, ChildProcess>();
  store!: Store;
  readonly k = keys('test');
  protected readonly clusterName = 'test';
  protected readonly waitDefaultMs = 20_000;

  constructor(readonly o: ClusterOptions) {
    super();
    this.dir = mkdtempSync(join(tmpdir(), 'corral-test-'));
    this.stateRoot = join(this.dir, 'state');
    this.configPath = join(this.dir, 'cluster.yaml');
    this.witnessPath = join(this.dir, 'witness.log');
    mkdirSync(this.stateRoot);
    const ttl = o.leaseTtlMs ?? 2000;
    const margin = Math.round(ttl / 4);
    const renew = Math.floor((ttl - margin) / 3);
    writeFileSync(
      this.configPath,
      [
        'version: 1',
        'cluster: { name: test }',
        'store: sqlite:./store.db',
        `timings: { leaseTtlMs: ${ttl}, renewIntervalMs: ${renew}, selfFenceMarginMs: ${margin}, noDeviceFenceMarginMs: ${margin * 2}, fenceRetryBackoffMs: 500, fenceRetryBackoffMaxMs: 2000, fenceTimeoutMs: 5000${o.extraTimings ? ', ' + o.extraTimings : ''} }`,
        'nodes:',
        ...o.nodes.map((n, i) =>
          [
            `  - name: ${n.name}`,
            `    address: 127.0.1.${i + 1}`,
            `    capacity: { cpus: ${n.cpus ?? 8}, memory: ${n.memory ?? 4096} }`,
            `    labels: ${JSON.stringify(n.labels ?? {})}`,
            `    fence: ${n.fence ?? '[{ type: local }]'}`,
          ].join('\n'),
        ),
        '',
      ].join('\n'),
    );
    writeFileSync(join(this.dir, 'local.json'), JSON.stringify({ stateRoot: this.stateRoot }));
  }

  async start(): Promise<void> {
    for (const n of this.o.nodes) this.startAgent(n.name);
    this.store = await openStore(`sqlite:${join(this.dir, 'store.db')}`);
    await this.waitFor(
      'all nodes online',
      async () => {
        const s = await this.snapshot();
        return this.o.nodes.every(
          (n) => s.nodes.get(n.name)?.status?.state === 'online' && s.nodes.get(n.name)?.alive?.ready,
        );
      },
      60000,
    );
  }

  startAgent(node: string): ChildProcess {
    const log = join(this.stateRoot, `${node}.agent.log`);
    const args = [
      corralBin,
      'agent',
      '--config',
      this.configPath,
      '--node',
      node,
      '--state-root',
      this.stateRoot,
    ];
    if (this.o.watchdog === false) args.push('--no-watchdog');
    args.push(...(this.o.agentArgs?.(node) ?? []));
    if (process.env.CORRAL_AGENT_NODE_FLAGS) args.unshift(...process.env.CORRAL_AGENT_NODE_FLAGS.split(' '));
    const child = spawn(process.execPath, args, {
      stdio: ['ignore', 'pipe', 'pipe'],
      env: { ...process.env, CORRAL_HOME: join(this.dir, 'home') },
    });
    const chunks: string[] = [];
    child.stdout?.on('data', (d: Buffer) => chunks.push(d.toString()));
    child.stderr?.on('data', (d: Buffer) => {
      chunks.push(d.toString());
      if (chunks.length > 2000) chunks.splice(0, 1000);
    });
    child.on('exit', () => {
      if (existsSync(this.stateRoot)) writeFileSync(log, chunks.join(''), { flag: 'a' });
    });
    this.agents.set(node, child);
    return child;
  }

  agentPid(node: string): number {
    const p = join(this.stateRoot, node, 'agent.pid');
    return readPid(readFileSync(p, 'utf8'));
  }

  cli(...args: string[]): { code: number; stdout: string; stderr: string } {
    const r = spawnSync(process.execPath, [corralBin, ...args, '--config', this.configPath], {
      encoding: 'utf8',
      timeout: 30000,
      env: { ...process.env, CORRAL_HOME: join(this.dir, 'home') },
    });
    return { code: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
  }

  /** Kill every process of the cluster, however it was left. */
  async stop(): Promise<void> {
    await this.store?.close().catch(() => undefined);
    for (const n of this.o.nodes) {
      spawnSync(
        process.execPath,
        [corralBin, 'node', 'crash', n.name, '--config', this.configPath, '--state-root', this.stateRoot],
        {
          timeout: 15000,
          env: { ...process.env, CORRAL_HOME: join(this.dir, 'home') },
        },
      );
    }
    for (const a of this.agents.values()) if (a.exitCode === null) a.kill('SIGKILL');
    // retried: a service killed a moment ago may still be closing its log file
    if (!process.env.CORRAL_KEEP_TEST_DIRS)
      rmSync(this.dir, { recursive: true, force: true, maxRetries: 10, retryDelay: 100 });
  }
}

export interface WitnessLine {
  resource: string;
  node: string;
  epoch: number;
  pid: number;
  tMs: number;
}

/** Every pair of copies of one resource whose lifetimes overlap (the invariant: none). */
export function witnessOverlaps(path: string, slackMs = 0): string[] {
  if (!existsSync(path)) return [];
  const spans = new Map<
    string,
    { resource: string; node: string; epoch: number; pid: number; from: number; to: number }
  >();
  for (const line of readFileSync(path, 'utf8').split('\n')) {
    if (!line.trim()) continue;
    let w: WitnessLine;
    try {
      w = JSON.parse(line) as WitnessLine;
    } catch {
      continue; // a line cut by SIGKILL mid-write
    }
    const key = `${w.resource}/${w.pid}`;
    const s = spans.get(key);
    if (!s)
      spans.set(key, {
        resource: w.resource,
        node: w.node,
        epoch: w.epoch,
        pid: w.pid,
        from: w.tMs,
        to: w.tMs,
      });
    else {
      s.from = Math.min(s.from, w.tMs);
      s.to = Math.max(s.to, w.tMs);
    }
  }
  const out: string[] = [];
  const list = [...spans.values()];
  for (let i = 0; i < list.length; i++)
    for (let j = i + 1; j < list.length; j++) {
      const a = list[i]!;
      const b = list[j]!;
      if (a.resource !== b.resource) continue;
      if (a.from <= b.to + slackMs && b.from <= a.to + slackMs)
        out.push(
          `${a.resource}: ${a.node}/epoch ${a.epoch} [${a.from}..${a.to}] overlaps ${b.node}/epoch ${b.epoch} [${b.from}..${b.to}]`,
        );
    }
  return out;
}
