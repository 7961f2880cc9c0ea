// `corral node ...`: list, show, maintenance, fence, and for clusters on one host crash/restart.
import type { Command } from 'commander';
import { action, UsageError } from '../program.js';
import { addConfigOption, withCluster, type ClusterContext, type GlobalOpts } from '../context.js';
import { addClientOptions, withClient, type ClientOpts } from '../client.js';
import { CorralError } from '../../core/errors.js';
import { printJson, table } from '../table.js';
import { operatorEvent } from './resource.js';
import { createFencer, fenceLocal, LOCAL_FENCE_TIMEOUT_MS } from '../../fence/index.js';
import { nodeEnv } from '../../env/node.js';
import { nodeStateDir } from './agent.js';
import { agentPid, localInfo, spawnLocalAgent } from '../local.js';
import type { FenceRecord } from '../../core/types.js';
import { drainNode, undrainNode, DRAIN_WAIT_MS_DEFAULT } from './vm.js';

export function registerNode(program: Command): void {
  const node = program.command('node').description('list, inspect and operate nodes');
  const cmd = (name: string, desc: string) => addConfigOption(node.command(name).description(desc));

  addClientOptions(cmd('list', 'every node with state, capacity use and reason'))
    .option('--json', 'machine-readable output')
    .action(
      action((opts: ClientOpts) =>
        withClient(opts, async (c) => {
          const s = await c.status(0);
          if (opts.json) printJson(s.nodes);
          else
            process.stdout.write(
              table(
                ['NODE', 'STATE', 'ADDRESS', 'CPU', 'MEM MiB', 'RES', 'REASON'],
                s.nodes.map((n) => [
                  n.name + (n.leader ? ' *' : ''),
                  n.state,
                  n.address,
                  `${n.cpus.used}/${n.cpus.total}`,
                  `${n.memory.used}/${n.memory.total}`,
                  n.resources,
                  n.reason,
                ]),
              ) + '\n',
            );
          return 0;
        }),
      ),
    );

  addClientOptions(cmd('show', 'one node: state, capacity, labels, last fence, resources'))
    .argument('<node>')
    .option('--json', 'machine-readable output')
    .action(
      action((name: string, opts: ClientOpts) =>
        withClient(opts, async (c) => {
          const s = await c.status(0);
          const n = s.nodes.find((x) => x.name === name);
          if (!n)
            throw new UsageError(
              `node "${name}" is not in the cluster`,
              `known nodes: ${s.nodes.map((x) => x.name).join(', ')}`,
            );
          const resources = s.resources.filter((r) => r.node === name);
          if (opts.json) printJson({ ...n, resourceList: resources });
          else if (n) {
            process.stdout.write(
              `node ${n.name}${n.leader ? ' (leader)' : ''}\n  state     ${n.state}: ${n.reason}\n  address   ${n.address}\n`,
            );
            process.stdout.write(
              `  cpus      ${n.cpus.used}/${n.cpus.total}\n  memory    ${n.memory.used}/${n.memory.total} MiB\n`,
            );
            process.stdout.write(
              `  labels    ${
                Object.entries(n.labels)
                  .map(([k, v]) => `${k}=${v}`)
                  .join(' ') || '-'
              }\n`,
            );
            if (n.lastFence)
              process.stdout.write(
                `  fence     ${n.lastFence.ok ? 'ok' : 'FAILED'} by ${n.lastFence.device} at ${new Date(n.lastFence.atMs).toISOString()}${n.lastFence.error ? `: ${n.lastFence.error}` : ''}\n`,
              );
            process.stdout.write(
              `  resources ${resources.map((r) => `${r.id}(${r.state})`).join(' ') || '-'}\n`,
            );
          }
          return 0;
        }),
      ),
    );

  cmd('drain', 'maintenance on, then wait (with progress) while VMs live-migrate and services move away')
    .argument('<node>')
    .option('--no-wait', 'return once maintenance is on')
    .option('--timeout-ms <ms>', 'give up waiting after this long', String(DRAIN_WAIT_MS_DEFAULT))
    .action(
      action((name: string, opts: GlobalOpts & { wait: boolean; timeoutMs: string }) =>
        withCluster(opts, async (c) => {
          checkNode(c, name);
          const timeoutMs = Number(opts.timeoutMs);
          if (!Number.isInteger(timeoutMs) || timeoutMs <= 0)
            throw new UsageError(`--timeout-ms ${opts.timeoutMs}: expected a positive integer`);
          return drainNode(c, name, { wait: opts.wait, timeoutMs });
        }),
      ),
    );
  cmd('undrain', 'maintenance off: the node takes work again')
    .argument('<node>')
    .action(
      action((name: string, opts: GlobalOpts) =>
        withCluster(opts, async (c) => {
          checkNode(c, name);
          return undrainNode(c, name);
        }),
      ),
    );

  addClientOptions(
    cmd('maintenance', 'maintenance on: move resources away and place nothing new; off: back in service'),
  )
    .argument('<on|off>')
    .argument('<node>')
    .action(
      action((mode: string, name: string, opts: ClientOpts) => {
        if (mode !== 'on' && mode !== 'off') throw new UsageError(`maintenance ${mode}: expected on or off`);
        return withClient(opts, async (c) => {
          await c.maintenance(name, mode === 'on').catch((e: unknown) => {
            // an unknown node is a usage error (exit 2), through the API or the store alike
            if (e instanceof CorralError && e.code === 'CORRAL_NOT_FOUND')
              throw new UsageError(e.message, e.hint);
            throw e;
          });
          process.stdout.write(`${name}: maintenance ${mode}\n`);
          return 0;
        });
      }),
    );

  cmd('fence', 'fence a node now with its configured devices (it loses its resources)')
    .argument('<node>')
    .option('--state-root <dir>', 'state root of local agents (for the local fence device)')
    .action(
      action((name: string, opts: GlobalOpts & { stateRoot?: string }) =>
        withCluster(opts, async (c) => {
          checkNode(c, name);
          const { stateRoot } = localInfo(c.configPath, opts.stateRoot);
          const env = nodeEnv({ name: 'cli', level: 'warn' });
          const fencer = createFencer(c.config.nodes, {
            log: env.log,
            localStateDir: (n) => nodeStateDir(stateRoot, n),
          });
          if (fencer.deviceCount(name) === 0)
            throw new UsageError(`node ${name} has no fence device in ${c.configPath}`);
          await operatorEvent(c, name, 'fence-requested', `${name}: fence requested by operator`, 'fence');
          const out = await fencer.fence(name, Date.now() + c.config.timings.fenceTimeoutMs);
          const alive = await c.store.get(c.k.alive(name));
          const rec: FenceRecord = {
            node: name,
            incarnation: alive ? (JSON.parse(alive.value) as { incarnation: number }).incarnation : 0,
            ok: out.ok,
            device: out.ok ? out.device : out.attempts.map((a) => a.device).join(', '),
            error: out.ok ? undefined : out.attempts.map((a) => `${a.device}: ${a.error}`).join('; '),
            atMs: Date.now(),
            term: 0,
          };
          await operatorEvent(
            c,
            name,
            out.ok ? 'fence-ok' : 'fence-failed',
            out.ok ? `${name}: fenced by ${rec.device} (operator)` : `${name}: fence failed: ${rec.error}`,
            'fence',
          );
          process.stdout.write(
            out.ok
              ? `${name}: fenced by ${rec.device} in ${out.durationMs} ms\n`
              : `${name}: fence FAILED: ${rec.error}\n`,
          );
          return out.ok ? 0 : 1;
        }),
      ),
    );

  cmd('crash', "local clusters (demo): kill a node's agent and all its resources at once, like a power cut")
    .argument('<node>')
    .option('--state-root <dir>', 'state root of local agents')
    .action(
      action((name: string, opts: GlobalOpts & { stateRoot?: string }) =>
        withCluster(opts, async (c) => {
          checkNode(c, name);
          const { stateRoot } = localInfo(c.configPath, opts.stateRoot);
          const out = await fenceLocal(nodeStateDir(stateRoot, name), LOCAL_FENCE_TIMEOUT_MS);
          await operatorEvent(c, name, 'crash', `${name}: crashed by operator (agent and resources killed)`);
          process.stdout.write(
            out.ok
              ? `${name}: crashed (agent and its resources killed); watch: corral status\n`
              : `${name}: crash failed: ${out.error}\n`,
          );
          return out.ok ? 0 : 1;
        }),
      ),
    );

  cmd('restart', "local clusters (demo): start a node's agent again")
    .argument('<node>')
    .option('--state-root <dir>', 'state root of local agents')
    .action(
      action((name: string, opts: GlobalOpts & { stateRoot?: string }) =>
        withCluster(opts, async (c) => {
          checkNode(c, name);
          const { stateRoot } = localInfo(c.configPath, opts.stateRoot);
          const running = agentPid(stateRoot, name);
          if (running) throw new UsageError(`node ${name}'s agent already runs (pid ${running})`);
          const pid = spawnLocalAgent(c.configPath, name, stateRoot);
          await operatorEvent(c, name, 'restart', `${name}: agent restarted by operator`);
          process.stdout.write(`${name}: agent started (pid ${pid}); it rejoins within a few seconds\n`);
          return 0;
        }),
      ),
    );
}

function checkNode(c: ClusterContext, name: string): void {
  if (!c.config.nodes.some((n) => n.name === name))
    throw new UsageError(
      `node "${name}" is not in ${c.configPath}`,
      `known nodes: ${c.config.nodes.map((n) => n.name).join(', ')}`,
    );
}
