// `corral api --config F [--listen HOST:PORT]`: serve the REST API and the dashboard alone.
import type { Command } from 'commander';
import { action } from '../program.js';
import { addConfigOption, resolveConfigPath } from '../context.js';
import { loadClusterConfig } from '../../config/schema.js';
import { openStore } from '../../store/index.js';
import { startApi } from '../../api/server.js';
import { startAmqpPublisher } from '../../events/amqp.js';

export function registerApi(program: Command): void {
  addConfigOption(
    program
      .command('api')
      .description('serve the REST API (/api/v1), the dashboard (/) and /metrics')
      .option('--listen <host:port>', 'address to listen on (default: network.api.listen of the config)')
      .option('--state-root <dir>', 'state root of local agents (local fence device, VM consoles)'),
  ).action(
    action(async (opts: { config?: string; listen?: string; stateRoot?: string }) => {
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
