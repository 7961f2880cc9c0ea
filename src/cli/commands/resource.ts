// `corral resource ...`: define, list, show, start, stop, move, cleanup, undefine.
import type { Command } from 'commander';
import { action, UsageError } from '../program.js';
import { addConfigOption, type ClusterContext } from '../context.js';
import { addClientOptions, withClient, type ClientOpts } from '../client.js';
import { loadResources } from '../../config/resources.js';
import { resourceIdPattern } from '../../core/spec.js';
import { ago, printJson, table } from '../table.js';
import type { ClusterEvent, ResourceRecord } from '../../core/types.js';

export function registerResource(program: Command): void {
  const res = program.command('resource').description('define and operate resources (services)');
  const cmd = (name: string, desc: string) =>
    addClientOptions(addConfigOption(res.command(name).description(desc)));

  cmd('define', 'create or update resources from a YAML file (one resource or `resources: [...]`)')
    .requiredOption('-f, --file <file>', 'resource definition file')
    .action(
      action((opts: ClientOpts & { file: string }) => {
        const specs = loadResources(opts.file); // validate before touching the cluster
        return withClient(opts, async (c) => {
          for (const s of specs) {
            const verb = await c.define(s, opts.file);
            process.stdout.write(`${s.id}: ${verb}\n`);
          }
          return 0;
        });
      }),
    );

  cmd('list', 'every resource with its state, node and reason')
    .option('--json', 'machine-readable output')
    .action(
      action((opts: ClientOpts) =>
        withClient(opts, async (c) => {
          const s = await c.status(0);
          if (opts.json) printJson(s.resources);
          else
            process.stdout.write(
              table(
                ['RESOURCE', 'STATE', 'NODE', 'DESIRED', 'PRIO', 'EPOCH', 'SINCE', 'REASON'],
                s.resources.map((r) => [
                  r.id,
                  r.state,
                  r.node ?? '-',
                  r.desired,
                  r.priority,
                  r.epoch,
                  ago(s.nowMs, r.sinceMs),
                  r.reason,
                ]),
              ) + '\n',
            );
          return 0;
        }),
      ),
    );

  cmd('show', 'one resource: definition, manager record, agent observations')
    .argument('<id>')
    .option('--json', 'machine-readable output')
    .action(
      action((id: string, opts: ClientOpts) =>
        withClient(opts, async (c) => {
          checkId(id);
          const d = await c.resource(id);
          const spec = d.spec;
          const rec = d.record as ResourceRecord | null;
          if (opts.json) printJson({ spec, record: rec, observed: d.observed });
          else {
            process.stdout.write(`resource ${id}\n`);
            process.stdout.write(
              `  state    ${rec?.state ?? 'stopped'} on ${rec?.node ?? '-'} (epoch ${rec?.epoch ?? 0})\n`,
            );
            process.stdout.write(`  reason   ${rec?.reason ?? 'not yet seen by the manager'}\n`);
            process.stdout.write(
              `  desired  ${spec.desired}, priority ${spec.priority}, ${spec.cpus} cpu, ${spec.memory} MiB\n`,
            );
            process.stdout.write(`  command  ${JSON.stringify(spec.process?.command ?? spec.vm)}\n`);
            if (rec && rec.failures.length > 0) {
              process.stdout.write(`  failures (${rec.failures.length}):\n`);
              for (const f of rec.failures)
                process.stdout.write(`    ${new Date(f.atMs).toISOString()} on ${f.node}: ${f.reason}\n`);
            }
            for (const o of d.observed)
              process.stdout.write(`  agent@${o.node}: ${o.state} at epoch ${o.epoch} (${o.reason})\n`);
          }
          return 0;
        }),
      ),
    );

  const setDesired = (desired: 'started' | 'stopped') =>
    action((id: string, opts: ClientOpts) =>
      withClient(opts, async (c) => {
        checkId(id);
        await c.setDesired(id, desired);
        process.stdout.write(`${id}: desired ${desired}\n`);
        return 0;
      }),
    );
  cmd('start', 'set a resource to run (the manager places it)')
    .argument('<id>')
    .action(setDesired('started'));
  cmd('stop', 'set a resource to stop (it stays defined)').argument('<id>').action(setDesired('stopped'));

  cmd('move', 'move a resource to a node (it becomes its preferred node); --clear drops the preference')
    .argument('<id>')
    .argument('[node]')
    .option('--clear', 'forget the preferred node')
    .action(
      action((id: string, node: string | undefined, opts: ClientOpts & { clear?: boolean }) =>
        withClient(opts, async (c) => {
          if (!opts.clear && !node) throw new UsageError('resource move needs a NODE (or --clear)');
          checkId(id);
          await c.move(id, opts.clear ? null : (node ?? null));
          process.stdout.write(opts.clear ? `${id}: preferred node cleared\n` : `${id}: moving to ${node}\n`);
          return 0;
        }),
      ),
    );

  cmd('cleanup', "clear a resource's failure count at once (a failed resource is tried again)")
    .argument('<id>')
    .action(
      action((id: string, opts: ClientOpts) =>
        withClient(opts, async (c) => {
          checkId(id);
          await c.cleanup(id);
          process.stdout.write(`${id}: failures cleared\n`);
          return 0;
        }),
      ),
    );

  cmd('undefine', 'stop a resource and forget it')
    .argument('<id>')
    .action(
      action((id: string, opts: ClientOpts) =>
        withClient(opts, async (c) => {
          checkId(id);
          await c.undefine(id);
          process.stdout.write(`${id}: undefined (stopping)\n`);
          return 0;
        }),
      ),
    );
}

function checkId(id: string): void {
  if (!resourceIdPattern.test(id))
    throw new UsageError(
      `"${id}" is not a resource id`,
      'ids are lowercase letters, digits, ".", "_" or "-"',
    );
}

let seq = 0;
export async function operatorEvent(
  c: ClusterContext,
  object: string,
  act: string,
  message: string,
  kind: ClusterEvent['kind'] = 'operator',
): Promise<void> {
  const e: ClusterEvent = {
    atMs: Date.now(),
    kind,
    object,
    action: act,
    message,
    by: `operator@${process.env.USER ?? 'cli'}`,
  };
  await c.store.put(c.k.event(e.atMs, `o.${process.pid}`, ++seq), JSON.stringify(e));
}
