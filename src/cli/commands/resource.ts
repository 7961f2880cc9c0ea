// `corral resource ...`: define, list, show, start, stop, move, cleanup, undefine.
import type { Command } from 'commander';
import { action, UsageError } from '../program.js';
import { addConfigOption, withCluster, type ClusterContext, type GlobalOpts } from '../context.js';
import { loadResources } from '../../config/resources.js';
import { ResourceSpec, resourceIdPattern } from '../../core/spec.js';
import { readStatus } from '../status.js';
import { ago, printJson, table } from '../table.js';
import type { ClusterEvent, ResourceRecord } from '../../core/types.js';
import { CorralError } from '../../core/errors.js';

export function registerResource(program: Command): void {
  const res = program.command('resource').description('define and operate resources (services)');
  const cmd = (name: string, desc: string) => addConfigOption(res.command(name).description(desc));

  cmd('define', 'create or update resources from a YAML file (one resource or `resources: [...]`)')
    .requiredOption('-f, --file <file>', 'resource definition file')
    .action(
      action((opts: GlobalOpts & { file: string }) => {
        const specs = loadResources(opts.file); // validate before touching the cluster
        return withCluster(opts, async (c) => {
          for (const s of specs) {
            const existed = await c.store.get(c.k.resource(s.id));
            await c.store.put(c.k.resource(s.id), JSON.stringify(s));
            await operatorEvent(
              c,
              s.id,
              existed ? 'updated' : 'defined',
              `${s.id}: ${existed ? 'updated' : 'defined'} from ${opts.file}`,
            );
            process.stdout.write(`${s.id}: ${existed ? 'updated' : 'defined'}\n`);
          }
          return 0;
        });
      }),
    );

  cmd('list', 'every resource with its state, node and reason')
    .option('--json', 'machine-readable output')
    .action(
      action((opts: GlobalOpts) =>
        withCluster(opts, async (c) => {
          const s = await readStatus(c.store, c.config.cluster.name, c.k, [], 0);
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
      action((id: string, opts: GlobalOpts) =>
        withCluster(opts, async (c) => {
          const spec = await getSpec(c, id);
          const recKv = await c.store.get(c.k.assign(id));
          const rec = recKv ? (JSON.parse(recKv.value) as ResourceRecord) : undefined;
          const statuses = await c.store.range(c.k.statuses);
          const observed = statuses.kvs
            .filter((kv) => kv.key.endsWith(`/${id}`))
            .map((kv) => ({
              node: kv.key.slice(c.k.statuses.length).split('/')[0],
              ...JSON.parse(kv.value),
            }));
          const out = { spec, record: rec ?? null, observed };
          if (opts.json) printJson(out);
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
            for (const o of observed)
              process.stdout.write(`  agent@${o.node}: ${o.state} at epoch ${o.epoch} (${o.reason})\n`);
          }
          return 0;
        }),
      ),
    );

  const setDesired = (desired: 'started' | 'stopped') =>
    action((id: string, opts: GlobalOpts) =>
      withCluster(opts, async (c) => {
        await updateSpec(c, id, (s) => ({ ...s, desired }));
        await operatorEvent(
          c,
          id,
          desired === 'started' ? 'start' : 'stop',
          `${id}: ${desired === 'started' ? 'start' : 'stop'} requested`,
        );
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
      action((id: string, node: string | undefined, opts: GlobalOpts & { clear?: boolean }) =>
        withCluster(opts, async (c) => {
          if (!opts.clear && !node) throw new UsageError('resource move needs a NODE (or --clear)');
          if (node && !c.config.nodes.some((n) => n.name === node))
            throw new UsageError(
              `node "${node}" is not in the cluster`,
              `known nodes: ${c.config.nodes.map((n) => n.name).join(', ')}`,
            );
          await updateSpec(c, id, (s) => {
            const next = { ...s };
            if (opts.clear) delete next.preferredNode;
            else next.preferredNode = node;
            return next;
          });
          await operatorEvent(
            c,
            id,
            'move',
            opts.clear ? `${id}: preferred node cleared` : `${id}: move to ${node} requested`,
          );
          process.stdout.write(opts.clear ? `${id}: preferred node cleared\n` : `${id}: moving to ${node}\n`);
          return 0;
        }),
      ),
    );

  cmd('cleanup', "clear a resource's failure count at once (a failed resource is tried again)")
    .argument('<id>')
    .action(
      action((id: string, opts: GlobalOpts) =>
        withCluster(opts, async (c) => {
          await getSpec(c, id);
          await c.store.put(c.k.cleanup(id), JSON.stringify({ atMs: Date.now() }));
          await operatorEvent(c, id, 'cleanup', `${id}: failure count cleared`);
          process.stdout.write(`${id}: failures cleared\n`);
          return 0;
        }),
      ),
    );

  cmd('undefine', 'stop a resource and forget it')
    .argument('<id>')
    .action(
      action((id: string, opts: GlobalOpts) =>
        withCluster(opts, async (c) => {
          await getSpec(c, id);
          await c.store.delete(c.k.resource(id));
          await operatorEvent(c, id, 'undefined', `${id}: undefined`);
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

async function getSpec(c: ClusterContext, id: string): Promise<ResourceSpec> {
  checkId(id);
  const kv = await c.store.get(c.k.resource(id));
  if (!kv) throw new CorralError('CORRAL_NOT_FOUND', `no resource "${id}"`, 'see `corral resource list`');
  return ResourceSpec.parse(JSON.parse(kv.value));
}

/** Read-modify-write with a compare on the spec's revision, retried on a race. */
async function updateSpec(
  c: ClusterContext,
  id: string,
  f: (s: ResourceSpec) => ResourceSpec,
): Promise<void> {
  checkId(id);
  for (let attempt = 0; attempt < 10; attempt++) {
    const kv = await c.store.get(c.k.resource(id));
    if (!kv) throw new CorralError('CORRAL_NOT_FOUND', `no resource "${id}"`, 'see `corral resource list`');
    const next = f(ResourceSpec.parse(JSON.parse(kv.value)));
    const r = await c.store.txn({
      compare: [{ key: kv.key, target: 'modRevision', op: '==', value: kv.modRevision }],
      success: [{ type: 'put', key: kv.key, value: JSON.stringify(next) }],
    });
    if (r.succeeded) return;
  }
  throw new CorralError('CORRAL_CONFLICT', `resource "${id}" keeps changing under us`, 'try again');
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
