// `corral demo`: a 3-node cluster on this machine (3 agent processes on the embedded SQLite
// store, each with its own state directory), a few HTTP services, and a live event feed.
// Ctrl-C stops everything and leaves nothing running.
import { existsSync, mkdirSync, rmSync, writeFileSync } from 'node:fs';
import { homedir } from 'node:os';
import { join, resolve } from 'node:path';
import type { Command } from 'commander';
import { action } from '../program.js';
import { rememberConfig, currentConfigPointer } from '../context.js';
import { corralBin, spawnLocalAgent, agentPid } from '../local.js';
import { nodeStateDir } from './agent.js';
import { loadClusterConfig } from '../../config/schema.js';
import { openStore } from '../../store/index.js';
import { keys } from '../../core/keys.js';
import { fenceLocal, LOCAL_FENCE_TIMEOUT_MS } from '../../fence/index.js';
import { nodeEnv } from '../../env/node.js';
import type { ResourceSpecInput } from '../../core/spec.js';
import { ResourceSpec } from '../../core/spec.js';
import { renderEvent } from './status.js';
import type { ClusterEvent } from '../../core/types.js';
import type { Store } from '../../store/types.js';
import type { ClusterConfig } from '../../config/schema.js';
import { clientFileFor, startApi } from '../../api/server.js';
import { createToken } from '../../api/auth.js';

const services = [
  { id: 'web', port: 18081, priority: 10 },
  { id: 'api', port: 18082, priority: 5 },
  { id: 'cache', port: 18083, priority: 0 },
  { id: 'reports', port: 18084, priority: -5 },
];

export function registerDemo(program: Command): void {
  program
    .command('demo')
    .description('run a 3-node demo cluster on this machine (Ctrl-C stops everything)')
    .option(
      '--dir <dir>',
      'where the demo keeps its config, store and node state',
      join(homedir(), '.corral', 'demo'),
    )
    .option('--lease-ttl-ms <ms>', 'lease TTL of the demo cluster', '4000')
    .option('--exit-after-ms <ms>', 'stop by itself after this long (for scripted runs)')
    .option('--api-port <port>', 'port of the API and dashboard (0: any free port)', '7440')
    .action(action(runDemo));
}

async function runDemo(opts: {
  dir: string;
  leaseTtlMs: string;
  exitAfterMs?: string;
  apiPort: string;
}): Promise<number> {
  const dir = resolve(opts.dir);
  const stateRoot = join(dir, 'state');
  const configPath = join(dir, 'cluster.yaml');
  const ttl = Number(opts.leaseTtlMs);
  if (!Number.isInteger(ttl) || ttl < 1500)
    throw new Error(`--lease-ttl-ms ${opts.leaseTtlMs}: expected an integer >= 1500`);
  const log = nodeEnv({ name: 'demo', level: 'warn' }).log;
  // a previous demo that was killed hard may have left agents behind: stop them first
  if (existsSync(configPath)) await killAll(configPath, stateRoot, log);
  rmSync(dir, { recursive: true, force: true });
  mkdirSync(stateRoot, { recursive: true });
  const margin = Math.round(ttl / 4);
  const renew = Math.floor((ttl - margin) / 3);
  writeFileSync(
    configPath,
    `# written by corral demo
version: 1
cluster: { name: demo }
store: sqlite:./store.db
timings: { leaseTtlMs: ${ttl}, renewIntervalMs: ${renew}, selfFenceMarginMs: ${margin}, noDeviceFenceMarginMs: ${margin * 2} }
nodes:
${[1, 2, 3]
  .map(
    (i) => `  - name: node${i}
    address: 127.0.0.${i}
    capacity: { cpus: 4, memory: 1024 }
    labels: { zone: ${i === 3 ? 'b' : 'a'} }
    fence: [{ type: local }]`,
  )
  .join('\n')}
`,
  );
  writeFileSync(join(dir, 'local.json'), JSON.stringify({ stateRoot }) + '\n');
  const config = loadClusterConfig(configPath);
  rememberConfig(configPath);
  for (const n of config.nodes) spawnLocalAgent(configPath, n.name, stateRoot);
  const store = await openStore(config.store);
  const k = keys(config.cluster.name);
  // place services once every node has joined, so they spread over the cluster
  const deadlineMs = Date.now() + 30000;
  for (;;) {
    const alive = await store.range(k.alives);
    const ready = alive.kvs.filter((kv) => (JSON.parse(kv.value) as { ready: boolean }).ready).length;
    if (ready === config.nodes.length) break;
    if (Date.now() > deadlineMs) {
      process.stderr.write(
        `only ${ready} of ${config.nodes.length} nodes joined after 30 s; see ${stateRoot}/<node>/agent.log\n`,
      );
      break;
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  const serviceScript = resolve(corralBin, '..', '..', 'examples', 'demo-service.mjs');
  for (const s of services) {
    const input: ResourceSpecInput = {
      id: s.id,
      process: { command: [process.execPath, serviceScript, String(s.port)], stopTimeoutMs: 3000 },
      health: {
        type: 'http',
        url: `http://127.0.0.1:${s.port}/`,
        intervalMs: 1000,
        timeoutMs: 800,
        failures: 2,
      },
      memory: 256,
      priority: s.priority,
      ...(s.id === 'cache' ? { antiAffinity: ['web'] } : {}),
    };
    await store.put(k.resource(s.id), JSON.stringify(ResourceSpec.parse(input)));
  }
  const api = await startDemoApi(store, config, configPath, stateRoot, opts.apiPort);
  const cli = `corral`;
  process.stdout.write(`
Corral demo: 3 nodes (node1..node3) on this machine, store ${config.store}
Services (each an HTTP server that says which node serves it):
${services.map((s) => `  ${s.id.padEnd(8)} http://127.0.0.1:${s.port}/   priority ${s.priority}`).join('\n')}

Try, in another terminal (\`${cli}\` is \`node ${corralBin}\`; the CLI finds this cluster by itself):
  ${cli} status                     nodes, services, leader, last events
  curl http://127.0.0.1:18081/       which node serves web
  ${cli} node crash node2           kill node2's agent and services (the local fence)
  ${cli} status                     node2 lost -> fenced -> its services restart elsewhere
  ${cli} node restart node2         node2 rejoins; services stay where they are (stickiness)
  ${cli} resource move web node3    move a service
  ${cli} node maintenance on node1  drain node1
  ${cli} events --follow            the live event log
Dashboard and API: ${api.url}/   admin token: ${api.token}
  (written to ${clientFileFor(configPath)}; the CLI uses it by itself; OpenAPI at ${api.url}/api/v1/openapi.json)
Config: ${configPath}   Agent logs: ${stateRoot}/<node>/agent.log
Ctrl-C stops everything.

live events:
`);
  const w = await store.watch(k.events, {
    onEvents: (evs) => {
      for (const e of evs) {
        if (e.type !== 'put') continue;
        try {
          process.stdout.write('  ' + renderEvent(JSON.parse(e.kv.value) as ClusterEvent) + '\n');
        } catch {
          // skip
        }
      }
    },
    onError: (e) => process.stderr.write(`event feed stopped: ${e.message}\n`),
  });
  await new Promise<void>((resolveWait) => {
    process.once('SIGINT', () => resolveWait());
    process.once('SIGTERM', () => resolveWait());
    if (opts.exitAfterMs) setTimeout(resolveWait, Number(opts.exitAfterMs)).unref();
  });
  process.stdout.write('\nstopping the demo: every agent and service...\n');
  await w.cancel();
  await api.close();
  rmSync(clientFileFor(configPath), { force: true });
  await store.close();
  await killAll(configPath, stateRoot, log);
  rmSync(currentConfigPointer(), { force: true });
  process.stdout.write('demo stopped; nothing left running.\n');
  return 0;
}

/** Kill every agent and service of the demo cluster, however they were left. */
async function killAll(
  configPath: string,
  stateRoot: string,
  log: ReturnType<typeof nodeEnv>['log'],
): Promise<void> {
  let nodes: { name: string }[];
  try {
    nodes = loadClusterConfig(configPath).nodes;
  } catch {
    return; // no readable config: nothing of ours can be running
  }
  await Promise.all(
    nodes.map(async (n) => {
      if (!existsSync(nodeStateDir(stateRoot, n.name))) return;
      const out = await fenceLocal(nodeStateDir(stateRoot, n.name), LOCAL_FENCE_TIMEOUT_MS);
      if (!out.ok && agentPid(stateRoot, n.name))
        log('warn', `could not stop ${n.name}`, { error: out.error });
    }),
  );
}

/** The demo's API and dashboard, with an admin token written beside the config for the CLI. */
async function startDemoApi(
  store: Store,
  config: ClusterConfig,
  configPath: string,
  stateRoot: string,
  portOpt: string,
): Promise<{ url: string; token: string; close: () => Promise<void> }> {
  const port = Number(portOpt);
  if (!Number.isInteger(port) || port < 0 || port > 65535)
    throw new Error(`--api-port ${portOpt}: expected a port number 0-65535`);
  const { token } = await createToken(store, config.cluster.name, 'demo-admin', 'admin', Date.now());
  const quiet = (level: string, msg: string) => {
    if (level === 'error') process.stderr.write(`api: ${msg}\n`);
  };
  let server;
  try {
    server = await startApi({
      store,
      config,
      configPath,
      stateRoot,
      listen: `127.0.0.1:${port}`,
      log: quiet,
    });
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'EADDRINUSE') throw err;
    server = await startApi({ store, config, configPath, stateRoot, listen: '127.0.0.1:0', log: quiet });
  }
  writeFileSync(clientFileFor(configPath), JSON.stringify({ url: server.url, token }) + '\n', {
    mode: 0o600,
  });
  return { url: server.url, token, close: () => server.close() };
}
