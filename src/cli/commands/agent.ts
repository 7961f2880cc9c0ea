// `corral agent --config cluster.yaml --node NAME`: the node daemon.
import { mkdirSync } from 'node:fs';
import { join, resolve } from 'node:path';
import type { Command } from 'commander';
import { action, UsageError } from '../program.js';
import { addConfigOption, resolveConfigPath } from '../context.js';
import { loadClusterConfig } from '../../config/schema.js';
import { openStore } from '../../store/index.js';
import { nodeEnv, watchEventLoopStalls } from '../../env/node.js';
import { ProcessDriver } from '../../drivers/process.js';
import { QemuDriver } from '../../drivers/qemu.js';
import { CompositeDriver } from '../../drivers/composite.js';
import { probeHost } from '../../drivers/qemu-host.js';
import { createFencer, writeAgentPidfile } from '../../fence/index.js';
import { startWatchdog } from '../../agent/watchdog.js';
import { AGENT_NICE_DEFAULT, raiseOwnPriority } from '../../drivers/priority.js';
import { Agent } from '../../agent/agent.js';
import type { Env, NodeMonitor, Watchdog } from '../../env/types.js';
import type { Store } from '../../store/types.js';
import { DiskHeartbeat } from '../../health/diskhb.js';
import { Reachability } from '../../health/reachability.js';

export const defaultStateRoot = '/var/lib/corral';

/** how long a starting agent keeps trying a store that does not answer yet (a member electing, a loaded host) */
const storeOpenRetryMaxMs = 60_000;
const storeOpenBackoffMs = 500;
/** the API thread's store calls (as `corral api`): a request may wait this long for the store */
const agentApiStoreOpTimeoutMs = 3000;

/**
 * Open the store, retrying while it does not answer: an agent started while etcd elects a
 * leader (or on a loaded host) used to exit, and with the gRPC client still open it did not
 * even exit, leaving a process that never joined.
 */
async function openStoreRetrying(url: string, opTimeoutMs: number, env: Env): Promise<Store> {
  const t0 = Date.now();
  for (;;) {
    try {
      return await openStore(url, { opTimeoutMs });
    } catch (e) {
      const code = (e as { code?: string }).code;
      const transient = code === 'CORRAL_STORE_UNAVAILABLE' || code === 'CORRAL_STORE_TIMEOUT';
      if (!transient || Date.now() - t0 > storeOpenRetryMaxMs) throw e;
      env.log('warn', 'store not answering yet; retrying', { error: (e as Error).message });
      await env.sleep(storeOpenBackoffMs);
    }
  }
}

/** The state directory of a node: <root>/<node> (pidfiles, logs, watchdog socket). */
export function nodeStateDir(stateRoot: string, node: string): string {
  return join(resolve(stateRoot), node);
}

interface AgentCliOpts {
  config?: string;
  node: string;
  stateRoot: string;
  leave?: boolean;
  watchdog: boolean;
  logLevel: 'debug' | 'info' | 'warn' | 'error';
  /** serve the REST API and dashboard from this agent (true: network.api.listen) */
  api?: string | boolean;
  nice: string;
}

export function registerAgent(program: Command): void {
  addConfigOption(
    program
      .command('agent')
      .description('run the node agent (lease, reconciler, self-fence; the manager runs inside it)')
      .requiredOption('-n, --node <name>', 'this node, as named in cluster.yaml')
      .option('--state-root <dir>', 'parent of every node state directory (pidfiles, logs)', defaultStateRoot)
      .option('--leave', 'on SIGTERM, move resources to other nodes before stopping')
      .option(
        '--no-watchdog',
        'do not start the node watchdog (resources are not killed if the agent freezes)',
      )
      .option('--log-level <level>', 'debug, info, warn or error', 'info')
      .option(
        '--nice <n>',
        "the agent's CPU priority (nice, -20..19); resources run at the agent's original one",
        String(AGENT_NICE_DEFAULT),
      )
      .option('--api [host:port]', 'also serve the REST API and dashboard (default: network.api.listen)'),
  ).action(action(runAgent));
}

async function runAgent(opts: AgentCliOpts): Promise<number> {
  const configPath = resolveConfigPath(opts.config);
  const config = loadClusterConfig(configPath);
  const me = config.nodes.find((n) => n.name === opts.node);
  if (!me)
    throw new UsageError(
      `node "${opts.node}" is not in ${configPath}`,
      `known nodes: ${config.nodes.map((n) => n.name).join(', ')}`,
    );
  if (!['debug', 'info', 'warn', 'error'].includes(opts.logLevel))
    throw new UsageError(`--log-level ${opts.logLevel}: expected debug, info, warn or error`);
  const nice = Number(opts.nice);
  if (!/^-?\d+$/.test(opts.nice) || nice < -20 || nice > 19)
    throw new UsageError(
      `--nice ${opts.nice}: expected a whole number from -20 to 19`,
      `the default ${AGENT_NICE_DEFAULT} keeps lease renewals ahead of busy workloads; 0 leaves the priority alone`,
    );
  const stateDir = nodeStateDir(opts.stateRoot, me.name);
  mkdirSync(stateDir, { recursive: true });
  const env = nodeEnv({ name: me.name, level: opts.logLevel });
  const priority = raiseOwnPriority(nice);
  if (priority.warning) env.log('warn', priority.warning);
  const stopStallWatch = watchEventLoopStalls(env);
  const t = config.timings;
  const store = await openStoreRetrying(config.store, Math.max(500, t.renewIntervalMs), env);
  const driver = new CompositeDriver({
    process: new ProcessDriver({ node: me.name, stateDir, env, childNice: priority.childNice }),
    vm: new QemuDriver({ node: me.name, address: me.address, stateDir, env, childNice: priority.childNice }),
    stateDir,
  });
  const fencer = createFencer(config.nodes, {
    log: env.log,
    localStateDir: (node) => nodeStateDir(opts.stateRoot, node),
    diskSlot: (node) => config.nodes.find((n) => n.name === node)?.disk?.slot,
    self: me.name,
  });
  const monitors = nodeMonitors(config, me, env);
  let watchdog: Watchdog | undefined;
  if (opts.watchdog) watchdog = await startWatchdog({ stateDir, log: env.log });
  const removePidfile = writeAgentPidfile(stateDir);
  const agent = new Agent({
    env,
    store,
    driver,
    fencer,
    watchdog,
    cluster: config.cluster.name,
    node: me.name,
    address: me.address,
    capacity: me.capacity,
    labels: me.labels,
    hostInfo: probeHost(),
    timings: t,
    monitors,
    onEvent: (e) => env.log('info', e.message, { event: e.action, by: e.by }),
  });
  let stopping: Promise<void> | undefined;
  let api: { close(): Promise<void> } | undefined;
  const shutdown = (why: string, leave: boolean) => {
    if (stopping) return stopping;
    env.log('info', `stopping (${why})${leave ? ': moving resources away first' : ''}`);
    stopping = agent
      .stop({ leave })
      .catch((e: unknown) => env.log('error', 'unclean stop', { error: String(e) }))
      .finally(async () => {
        await api?.close().catch(() => undefined);
        await watchdog?.close();
        await driver.close();
        await store.close().catch(() => undefined);
        removePidfile();
        stopStallWatch();
      });
    return stopping;
  };
  const done = new Promise<void>((resolveDone) => {
    process.once('SIGTERM', () => void shutdown('SIGTERM', opts.leave === true).then(resolveDone));
    process.once('SIGINT', () => void shutdown('SIGINT', false).then(resolveDone));
    void agent.whenHalted().then(() => shutdown('cluster halted', false).then(resolveDone));
  });
  await agent.start();
  env.log('info', `agent running (config ${configPath}, state ${stateDir}, store ${store.url})`);
  if (opts.api) {
    // a worker thread with its own event loop and store connection (src/api/thread.ts); loaded
    // on demand: agents without --api never load fastify
    const { startApiThread } = await import('../../api/thread.js');
    const server = await startApiThread({
      configPath,
      stateRoot: opts.stateRoot,
      listen: typeof opts.api === 'string' ? opts.api : undefined,
      node: me.name,
      opTimeoutMs: agentApiStoreOpTimeoutMs,
      log: (level, msg) => env.log(level, `api: ${msg}`),
    });
    api = server;
    env.log('info', `API and dashboard on ${server.url}/`);
  }
  await done;
  return 0;
}

/** The node's health monitors beside the lease: heartbeat disk and known-address reachability. */
function nodeMonitors(
  config: ReturnType<typeof loadClusterConfig>,
  me: ReturnType<typeof loadClusterConfig>['nodes'][number],
  env: ReturnType<typeof nodeEnv>,
): NodeMonitor[] {
  const t = config.timings;
  config.nodes.forEach((n) =>
    n.fence.forEach((d, i) => {
      // a silent slot counts as fenced after msgwaitMs: never sooner than the no-device rule
      if (d.type === 'sbd' && d.msgwaitMs < t.noDeviceFenceMarginMs)
        throw new UsageError(
          `nodes.${n.name}.fence[${i}].msgwaitMs: ${d.msgwaitMs} ms is less than timings.noDeviceFenceMarginMs (${t.noDeviceFenceMarginMs})`,
          'a silent heartbeat slot must prove at least what the self-fence deadline proves: raise msgwaitMs',
        );
    }),
  );
  const monitors: NodeMonitor[] = [];
  if (me.disk) {
    // With an sbd device the manager fences this node through the disk, so the disk may vouch
    // for it when the store alone is lost (no needless self-fence while etcd has no quorum).
    // Half of msgwaitMs: the other half covers the kill before the fencer counts silence.
    const sbd = me.fence.find((d) => d.type === 'sbd');
    const halfMsgwaitMs = sbd && sbd.type === 'sbd' ? Math.floor(sbd.msgwaitMs / 2) : undefined;
    // a vouch shorter than two disk rounds would lapse between good rounds
    const vouchMs =
      halfMsgwaitMs !== undefined && halfMsgwaitMs > 2 * me.disk.intervalMs ? halfMsgwaitMs : undefined;
    if (halfMsgwaitMs !== undefined && vouchMs === undefined)
      env.log(
        'warn',
        `the heartbeat disk will not vouch for this node when the store alone is lost: msgwaitMs / 2 (${halfMsgwaitMs} ms) must exceed 2 x disk.intervalMs (${2 * me.disk.intervalMs} ms); raise the sbd device's msgwaitMs or lower disk.intervalMs`,
      );
    monitors.push(
      new DiskHeartbeat({
        path: me.disk.device,
        slot: me.disk.slot,
        intervalMs: me.disk.intervalMs,
        vouchMs,
        env,
      }),
    );
  }
  if (config.network.knownAddresses.length > 0)
    monitors.push(
      new Reachability({ addresses: config.network.knownAddresses, intervalMs: t.monitorIntervalMs, env }),
    );
  return monitors;
}
