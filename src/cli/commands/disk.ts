// `corral disk format DEV --nodes N` and `corral disk show DEV`: the shared heartbeat disk
// (like cxmd_ctl --format and `sbd list`). `corral disk pill DEV --slot N` sends a poison pill
// by hand and waits for the acknowledgement (like `sbd message DEV off`).
import type { Command } from 'commander';
import { hostname } from 'node:os';
import { action, UsageError } from '../program.js';
import { ago, printJson, table } from '../table.js';
import { diskLimits, formatDisk, readDisk } from '../../health/diskhb.js';
import { fenceSbd } from '../../fence/sbd.js';

function intArg(flag: string, v: string, min: number, max: number): number {
  const n = Number(v);
  if (!Number.isInteger(n) || n < min || n > max)
    throw new UsageError(`${flag} ${v}: expected an integer from ${min} to ${max}`);
  return n;
}

export function registerDisk(program: Command): void {
  const disk = program.command('disk').description('the shared heartbeat disk (poison pill, sbd-like)');
  disk
    .command('format <device>')
    .description('write a heartbeat header and one empty slot per node (a file is grown to size)')
    .requiredOption('--nodes <n>', `number of slots (1-${diskLimits.slotsMax})`)
    .option('--force', 'wipe an existing heartbeat disk (stop every agent using it first)')
    .action(
      action(async (device: string, o: { nodes: string; force?: boolean }) => {
        const n = intArg('--nodes', o.nodes, 1, diskLimits.slotsMax);
        const h = await formatDisk(device, n, Date.now(), o.force === true);
        process.stdout.write(`formatted ${device}: ${h.slotCount} slots of ${h.slotBytes} bytes\n`);
      }),
    );
  disk
    .command('show <device>')
    .description('list the slots: node, state, heartbeat counter and age, poison pills and acknowledgements')
    .option('--json', 'print JSON')
    .action(
      action(async (device: string, o: { json?: boolean }) => {
        const d = await readDisk(device);
        if (o.json) return printJson(d);
        const now = Date.now();
        process.stdout.write(
          `${device}: ${d.header.slotCount} slots, formatted ${new Date(d.header.formattedAtMs).toISOString()}, ` +
            `${d.direct ? 'O_DIRECT' : 'buffered+fsync'} I/O\n`,
        );
        process.stdout.write(
          table(
            ['SLOT', 'NODE', 'STATE', 'COUNTER', 'WRITTEN', 'PILL', 'ACK'],
            d.slots.map((s) => [
              s.slot,
              s.sector.node || '-',
              s.sector.state,
              s.sector.counter,
              s.sector.state === 'empty' ? '-' : `${ago(now, s.sector.writtenAtMs)} ago`,
              s.mailbox.pillSeq
                ? `#${s.mailbox.pillSeq} from ${s.mailbox.from} ${ago(now, s.mailbox.pillAtMs)} ago`
                : '-',
              s.sector.ackSeq ? `#${s.sector.ackSeq} ${ago(now, s.sector.ackAtMs)} ago` : '-',
            ]),
          ) + '\n',
        );
      }),
    );
  disk
    .command('pill <device>')
    .description('send a poison pill to a slot and wait for its acknowledgement (or msgwait of silence)')
    .requiredOption('--node <name>', 'the node to fence (its slot is found by name unless --slot)')
    .option('--slot <n>', "the node's slot")
    .option('--timeout-ms <ms>', 'give up after this long', '10000')
    .option('--msgwait-ms <ms>', 'a slot silent this long counts as fenced', '4000')
    .action(
      action(
        async (device: string, o: { node: string; slot?: string; timeoutMs: string; msgwaitMs: string }) => {
          const timeoutMs = intArg('--timeout-ms', o.timeoutMs, 1, 3_600_000);
          const msgwaitMs = intArg('--msgwait-ms', o.msgwaitMs, 1, timeoutMs - 1);
          const r = await fenceSbd({
            device,
            node: o.node,
            slot: o.slot === undefined ? undefined : intArg('--slot', o.slot, 0, diskLimits.slotsMax - 1),
            timeoutMs,
            msgwaitMs,
            from: `cli@${hostname()}`,
            nowMs: Date.now,
          });
          if (!r.ok) {
            process.stderr.write(`corral: ${r.error}\n`);
            return 1;
          }
          process.stdout.write(`${o.node} fenced through ${device}\n`);
        },
      ),
    );
}
