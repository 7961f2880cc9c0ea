// `corral cluster ...`: disarm/arm (planned maintenance), halt (stop everything in order),
// form (start without or with applications) — Linuxha.net's clhalt/clform.
import type { Command } from 'commander';
import { action } from '../program.js';
import { addConfigOption, withCluster, type ClusterContext, type GlobalOpts } from '../context.js';
import { operatorEvent } from './resource.js';
import { defaultFlags, type ClusterFlags } from '../../core/types.js';
import { agentPid, localInfo, spawnLocalAgent } from '../local.js';

async function setFlags(c: ClusterContext, patch: Partial<ClusterFlags>): Promise<ClusterFlags> {
  for (;;) {
    const kv = await c.store.get(c.k.flags);
    const cur = { ...defaultFlags, ...(kv ? (JSON.parse(kv.value) as Partial<ClusterFlags>) : {}) };
    const next = { ...cur, ...patch };
    const r = await c.store.txn({
      compare: [{ key: c.k.flags, target: 'modRevision', op: '==', value: kv?.modRevision ?? 0 }],
      success: [{ type: 'put', key: c.k.flags, value: JSON.stringify(next) }],
    });
    if (r.succeeded) return next;
  }
}

export function registerCluster(program: Command): void {
  const cl = program.command('cluster').description('cluster-wide operations');
  const cmd = (name: string, desc: string) => addConfigOption(cl.command(name).description(desc));

  cmd(
    'disarm',
    'before planned network or store maintenance: no self-fencing, no fencing, no recovery; resources keep running',
  ).action(
    action((opts: GlobalOpts) =>
      withCluster(opts, async (c) => {
        await setFlags(c, { armed: false });
        await operatorEvent(
          c,
          c.config.cluster.name,
          'disarm',
          'cluster disarmed: agents do not self-fence, the manager does not fence or recover',
          'cluster',
        );
        process.stdout.write(
          'cluster disarmed: resources keep running; nothing is fenced or recovered until `corral cluster arm`\n',
        );
        return 0;
      }),
    ),
  );

  cmd('arm', 'end of maintenance: self-fencing, fencing and recovery resume').action(
    action((opts: GlobalOpts) =>
      withCluster(opts, async (c) => {
        await setFlags(c, { armed: true });
        await operatorEvent(c, c.config.cluster.name, 'arm', 'cluster armed', 'cluster');
        process.stdout.write('cluster armed\n');
        return 0;
      }),
    ),
  );

  cmd('halt', 'stop every resource, then every agent; --force kills at once')
    .option('--force', 'kill resources at once instead of stopping them cleanly')
    .option('--timeout-ms <ms>', 'how long to wait for the agents to exit', '60000')
    .action(
      action((opts: GlobalOpts & { force?: boolean; timeoutMs: string }) =>
        withCluster(opts, async (c) => {
          await setFlags(c, { halted: true, haltForce: opts.force === true });
          await operatorEvent(
            c,
            c.config.cluster.name,
            'halt',
            `cluster halt${opts.force ? ' --force' : ''} requested`,
            'cluster',
          );
          const deadline = Date.now() + Number(opts.timeoutMs);
          for (;;) {
            const alive = await c.store.range(c.k.alives);
            if (alive.kvs.length === 0) break;
            if (Date.now() > deadline) {
              process.stdout.write(
                `still running after ${opts.timeoutMs} ms: ${alive.kvs.map((kv) => kv.key.slice(c.k.alives.length)).join(', ')}\n`,
              );
              return 1;
            }
            await new Promise((r) => setTimeout(r, 250));
          }
          process.stdout.write('cluster halted: every resource stopped and every agent exited\n');
          return 0;
        }),
      ),
    );

  cmd('form', 'clear a halt and let resources start (with --no-apps: nodes join, resources stay stopped)')
    .option('--no-apps', 'do not start resources')
    .option('--local', 'also start the agent of every node on this host (clusters on one host)')
    .option('--state-root <dir>', 'state root of local agents')
    .action(
      action((opts: GlobalOpts & { apps: boolean; local?: boolean; stateRoot?: string }) =>
        withCluster(opts, async (c) => {
          await setFlags(c, { halted: false, haltForce: false, appsEnabled: opts.apps });
          await operatorEvent(
            c,
            c.config.cluster.name,
            'form',
            `cluster formed${opts.apps ? '' : ' without applications'}`,
            'cluster',
          );
          if (opts.local) {
            const { stateRoot } = localInfo(c.configPath, opts.stateRoot);
            for (const n of c.config.nodes) {
              if (agentPid(stateRoot, n.name)) continue;
              const pid = spawnLocalAgent(c.configPath, n.name, stateRoot);
              process.stdout.write(`${n.name}: agent started (pid ${pid})\n`);
            }
          }
          process.stdout.write(
            `cluster formed${opts.apps ? '' : ' (applications stay stopped: run `corral cluster form` to start them)'}\n`,
          );
          return 0;
        }),
      ),
    );
}
