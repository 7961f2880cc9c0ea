// `corral status` and `corral events`.
import type { Command } from 'commander';
import { action } from '../program.js';
import { addConfigOption, withCluster } from '../context.js';
import { addClientOptions, withClient, type ClientOpts } from '../client.js';
import { readEvents, type StatusData } from '../status.js';
import { ago, clock, printJson, table } from '../table.js';
import type { ClusterEvent } from '../../core/types.js';

export function registerStatus(program: Command): void {
  addClientOptions(
    addConfigOption(
      program
        .command('status')
        .description('cluster, nodes, resources, leader and last events on one screen')
        .option('--json', 'machine-readable output'),
    ),
  ).action(
    action((opts: ClientOpts) =>
      withClient(opts, async (c) => {
        const s = await c.status();
        if (opts.json) printJson(s);
        else process.stdout.write(renderStatus(s) + '\n');
        return 0;
      }),
    ),
  );

  addConfigOption(
    program
      .command('events')
      .description('the cluster event log: who decided what, why, at which epoch')
      .option('-n, --limit <n>', 'how many of the latest events', '50')
      .option('-f, --follow', 'keep printing new events as they happen (Ctrl-C to stop)')
      .option('--json', 'one JSON object per line'),
  );
  addClientOptions(program.commands.find((c) => c.name() === 'events')!).action(
    action(async (opts: ClientOpts & { limit: string; follow?: boolean }) => {
      const limit = Number(opts.limit);
      if (!Number.isInteger(limit) || limit < 1)
        throw new Error(`--limit ${opts.limit}: expected a positive integer`);
      const print = (e: ClusterEvent) =>
        process.stdout.write((opts.json ? JSON.stringify(e) : renderEvent(e)) + '\n');
      if (!opts.follow)
        return withClient(opts, async (c) => {
          for (const e of await c.events(limit)) print(e);
          return 0;
        });
      return withCluster(opts, async (c) => {
        for (const e of await readEvents(c.store, c.k, limit)) print(e);
        const rev = await c.store.revision();
        await new Promise<void>((resolve, reject) => {
          void c.store
            .watch(c.k.events, {
              startRevision: rev + 1,
              onEvents: (evs) => {
                for (const ev of evs) {
                  if (ev.type !== 'put') continue;
                  try {
                    print(JSON.parse(ev.kv.value) as ClusterEvent);
                  } catch {
                    // skip unreadable
                  }
                }
              },
              onError: reject,
            })
            .then((w) => {
              const stop = () => void w.cancel().then(() => resolve());
              process.once('SIGINT', stop);
              process.once('SIGTERM', stop);
            }, reject);
        });
        return 0;
      });
    }),
  );
}

export function renderEvent(e: ClusterEvent): string {
  const epoch = e.epoch !== undefined ? ` epoch=${e.epoch}` : '';
  return `${clock(e.atMs)}  ${e.by.padEnd(16)} ${e.kind.padEnd(8)} ${e.message}${epoch}`;
}

export function renderStatus(s: StatusData): string {
  const lines: string[] = [];
  const flags = [
    s.flags.armed ? 'armed' : 'DISARMED (no self-fencing, no recovery)',
    s.flags.halted ? 'HALTED' : '',
    s.flags.appsEnabled ? '' : 'apps disabled',
  ].filter(Boolean);
  lines.push(
    `cluster ${s.cluster}   leader ${s.leader ? `${s.leader.node} (term ${s.leader.term})` : 'NONE'}   ${flags.join(', ')}   revision ${s.revision}`,
  );
  lines.push('');
  lines.push(
    table(
      ['NODE', 'STATE', 'CPU', 'MEM MiB', 'RES', 'REASON'],
      s.nodes.map((n) => [
        n.name + (n.leader ? ' *' : ''),
        n.state,
        `${n.cpus.used}/${n.cpus.total}`,
        `${n.memory.used}/${n.memory.total}`,
        n.resources,
        n.reason,
      ]),
    ),
  );
  lines.push('');
  if (s.resources.length === 0) lines.push('no resources defined (corral resource define -f FILE)');
  else
    lines.push(
      table(
        ['RESOURCE', 'STATE', 'NODE', 'EPOCH', 'SINCE', 'REASON'],
        s.resources.map((r) => [r.id, r.state, r.node ?? '-', r.epoch, ago(s.nowMs, r.sinceMs), r.reason]),
      ),
    );
  if (s.events.length > 0) {
    lines.push('');
    lines.push('recent events:');
    for (const e of s.events) lines.push('  ' + renderEvent(e));
  }
  return lines.join('\n');
}
