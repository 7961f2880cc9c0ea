// `corral api --config F [--listen HOST:PORT]`: serve the REST API and the dashboard alone.
import { getPriority, setPriority } from 'node:os';
import type { Command } from 'commander';
import { action, UsageError } from '../program.js';
import { addConfigOption, resolveConfigPath } from '../context.js';
import { loadClusterConfig } from '../../config/schema.js';
import { openStore } from '../../store/index.js';
import { startApi } from '../../api/server.js';
import { startAmqpPublisher } from '../../events/amqp.js';

/**
 * `corral api`'s default nice value: the agent's (an agent with --api serves from a thread of the
 * agent, at the agent's priority). On a 2-core host with both cores taken by other work at nice 0,
 * GET /status during a failover of 50 answered at p99 167 ms at nice 0 and 9 ms at nice -10.
 */
export const apiNiceDefault = -10;

/** Set this process's nice value; without the right (not root, no CAP_SYS_NICE) say so and go on. */
function raisePriority(nice: number): void {
  const before = getPriority();
  if (nice === before) return;
  try {
    setPriority(nice);
  } catch (e) {
    process.stderr.write(
      `corral api: cannot set the nice value to ${nice} (${(e as NodeJS.ErrnoException).code ?? String(e)}): it needs root or CAP_SYS_NICE; serving at nice ${before}, so a busy host may delay answers\n`,
    );
  }
}

export function registerApi(program: Command): void {
  addConfigOption(
    program
      .command('api')
      .description('serve the REST API (/api/v1), the dashboard (/) and /metrics')
      .option('--listen <host:port>', 'address to listen on (default: network.api.listen of the config)')
      .option('--state-root <dir>', 'state root of local agents (local fence device, VM consoles)')
      .option(
        '--nice <n>',
        'CPU priority (nice, -20..19), as the agent serving its API; 0 leaves it alone',
        String(apiNiceDefault),
      ),
  ).action(
    action(async (opts: { config?: string; listen?: string; stateRoot?: string; nice: string }) => {
      const nice = Number(opts.nice);
      if (!/^-?\d+$/.test(opts.nice) || nice < -20 || nice > 19)
        throw new UsageError(
          `--nice ${opts.nice}: expected a whole number from -20 to 19`,
          `the default ${apiNiceDefault} keeps the status answering while failovers and other work keep the CPUs busy; 0 leaves the priority alone`,
        );
      raisePriority(nice);
      const configPath = resolveConfigPath(opts.config);
      const config = loadClusterConfig(configPath);
      const store = await openStore(config.store, { opTimeoutMs: 3000 });
      const api = await startApi({
        store,
        config,
        configPath,
        listen: opts.listen,
        stateRoot: opts.stateRoot,
      });
      const amqp = config.network.amqp
        ? await startAmqpPublisher({ store, cluster: config.cluster.name, url: config.network.amqp.url })
        : undefined;
      process.stdout.write(
        `corral API and dashboard on ${api.url}/ (OpenAPI: ${api.url}/api/v1/openapi.json)\n`,
      );
      await new Promise<void>((r) => {
        process.once('SIGINT', r);
        process.once('SIGTERM', r);
      });
      await amqp?.close();
      await api.close();
      await store.close();
      return 0;
    }),
  );
}
