// Reachability of known external addresses (Linuxha.net's net_known_connections, cxm's
// isolation rule). Every interval the agent probes network.knownAddresses (routers, gateways):
//   - some answer: the node is connected (clears an earlier isolation);
//   - none answer for `failures` rounds in a row while the lease is held: the node reports
//     itself isolated and the manager moves its resources away in an orderly way;
//   - none answer and the store is lost too: self-fence at once, without waiting for the
//     lease deadline (the node is cut off; the rest of the cluster will recover its work).
// Probes: fping (ICMP) when installed, else a TCP connect to `tcpPort` where any answer, even
// a refusal (RST), proves the host reachable; only a timeout or an unreachable error does not.
// Rate: one round per interval, at most reachabilityLimits.addressesMax addresses a round.
import { spawn, spawnSync } from 'node:child_process';
import { connect } from 'node:net';
import { CorralError } from '../core/errors.js';
import type { Env, NodeMonitor, NodeMonitorContext } from '../env/types.js';

export const reachabilityLimits = {
  addressesMax: 16,
  intervalMsMin: 200,
  /** fping gets this much beyond its own timeout before it is killed */
  fpingGraceMs: 1000,
} as const;

export class ReachabilityError extends CorralError {
  constructor(message: string, hint?: string) {
    super('CORRAL_REACHABILITY', message, hint);
  }
}

export type ProbeMethod = 'fping' | 'tcp';

export interface ReachabilityOptions {
  addresses: string[];
  intervalMs?: number;
  /** per-probe timeout (default half the interval) */
  timeoutMs?: number;
  /** rounds with no answer before the node counts as isolated (default 3) */
  failures?: number;
  /** default: fping when installed, else tcp */
  method?: ProbeMethod;
  /** the TCP probe's port (default 1: usually closed, a refusal still proves reachability) */
  tcpPort?: number;
  env: Pick<Env, 'nowMs' | 'setTimer' | 'log'>;
}

let fpingFound: boolean | undefined;
export function fpingInstalled(): boolean {
  fpingFound ??= spawnSync('fping', ['-v'], { stdio: 'ignore' }).status === 0;
  return fpingFound;
}

/** the addresses that answered one fping round (-a: print alive targets) */
export function probeFping(addresses: string[], timeoutMs: number): Promise<Set<string>> {
  return new Promise((resolve) => {
    const child = spawn('fping', ['-a', '-r', '0', '-t', String(Math.max(1, timeoutMs)), ...addresses], {
      stdio: ['ignore', 'pipe', 'ignore'],
    });
    let out = '';
    child.stdout.on('data', (d: Buffer) => (out += d.toString()));
    const killer = setTimeout(() => child.kill('SIGKILL'), timeoutMs + reachabilityLimits.fpingGraceMs);
    const done = () => {
      clearTimeout(killer);
      resolve(new Set(out.split(/\s+/).filter((a) => addresses.includes(a))));
    };
    child.on('error', done);
    child.on('close', done);
  });
}

/** true when the host answered anything (accept or refusal) within timeoutMs */
export function probeTcp(address: string, port: number, timeoutMs: number): Promise<boolean> {
  return new Promise((resolve) => {
    const sock = connect({ host: address, port });
    const finish = (ok: boolean) => {
      clearTimeout(timer);
      sock.destroy();
      resolve(ok);
    };
    const timer = setTimeout(() => finish(false), timeoutMs);
    sock.once('connect', () => finish(true));
    sock.once('error', (e: NodeJS.ErrnoException) => finish(e.code === 'ECONNREFUSED'));
  });
}

export class Reachability implements NodeMonitor {
  readonly name = 'reachability';
  readonly method: ProbeMethod;
  private readonly intervalMs: number;
  private readonly timeoutMs: number;
  private readonly failures: number;
  private misses = 0;
  private stopped = false;
  private cancel: (() => void) | undefined;
  private ticking: Promise<void> | undefined;
  private ctx: NodeMonitorContext | undefined;

  constructor(private readonly o: ReachabilityOptions) {
    if (o.addresses.length === 0)
      throw new ReachabilityError('reachability: no known addresses', 'list them in network.knownAddresses');
    if (o.addresses.length > reachabilityLimits.addressesMax)
      throw new ReachabilityError(
        `network.knownAddresses: ${o.addresses.length} addresses; at most ${reachabilityLimits.addressesMax}`,
        'list a few routers or gateways, not every host',
      );
    this.intervalMs = Math.max(reachabilityLimits.intervalMsMin, o.intervalMs ?? 1000);
    this.timeoutMs = Math.min(o.timeoutMs ?? Math.floor(this.intervalMs / 2), this.intervalMs);
    this.failures = Math.max(1, o.failures ?? 3);
    this.method = o.method ?? (fpingInstalled() ? 'fping' : 'tcp');
  }

  async start(ctx: NodeMonitorContext): Promise<void> {
    this.ctx = ctx;
    this.o.env.log('info', `reachability: probing ${this.o.addresses.join(', ')} by ${this.method}`);
    this.schedule(0);
    await Promise.resolve();
  }

  private schedule(ms: number): void {
    if (this.stopped) return;
    this.cancel = this.o.env.setTimer(ms, () => {
      this.ticking = this.tick().finally(() => this.schedule(this.intervalMs));
    });
  }

  /** true when at least one known address answered this round */
  async probe(): Promise<boolean> {
    if (this.method === 'fping') return (await probeFping(this.o.addresses, this.timeoutMs)).size > 0;
    const answers = await Promise.all(
      this.o.addresses.map((a) => probeTcp(a, this.o.tcpPort ?? 1, this.timeoutMs)),
    );
    return answers.some(Boolean);
  }

  private async tick(): Promise<void> {
    const ctx = this.ctx!;
    const reached = await this.probe().catch(() => false);
    if (this.stopped) return;
    if (reached) {
      this.misses = 0;
      ctx.setIsolated(false, `a known address answers again`);
      return;
    }
    this.misses += 1;
    if (this.misses < this.failures || !ctx.joined()) return;
    const why = `none of ${this.o.addresses.join(', ')} answered ${this.misses} rounds in a row`;
    if (ctx.storeHealthy()) ctx.setIsolated(true, why);
    else await ctx.selfFence(`${why}, and the store is lost`);
  }

  async stop(): Promise<void> {
    this.stopped = true;
    this.cancel?.();
    await this.ticking?.catch(() => undefined);
  }
}
