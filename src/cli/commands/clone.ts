// `corral clone serve|receive|status|desc`: node cloning over a chained TCP pipeline (issue 7).
import { readFile, writeFile } from 'node:fs/promises';
import { hostname } from 'node:os';
import type { Command } from 'commander';
import { CloneUnreachableError } from '../../provision/clone/errors.js';
import { limits as protocolLimits, newSecret } from '../../provision/clone/protocol.js';
import { defaultReceiverLimits, runReceiver } from '../../provision/clone/receiver.js';
import { defaultServerLimits, runServer, type ServerStatus } from '../../provision/clone/server.js';
import {
  addReceiveStreamOptions,
  addServeStreamOptions,
  receiveStreamOptions,
  registerCloneDigest,
  serveStreamOptions,
} from './clone-stream.js';
import { fmtBytes, fmtRate } from '../../provision/clone/progress.js';
import {
  applyDesc,
  descFromSfdiskJson,
  formatDesc,
  parseDesc,
  readSfdiskJson,
} from '../../provision/desc.js';
import { volumeInfo } from '../../provision/clone/volume.js';
import { UsageError, action, exitCodes, printError } from '../program.js';
import {
  addIdentityOptions,
  checkIdentityFlags,
  identityAfterReceive,
  registerCloneIdentity,
  type IdentityFlags,
} from './clone-identity.js';

export const defaultClonePort = 7707;

function int(
  flag: string,
  v: string | undefined,
  min: number,
  max = Number.MAX_SAFE_INTEGER,
): number | undefined {
  if (v === undefined) return undefined;
  if (!/^\d+$/.test(v) || Number(v) < min || Number(v) > max)
    throw new UsageError(`${flag} ${v}: expected an integer from ${min} to ${max}`);
  return Number(v);
}

function num(flag: string, v: string | undefined): number | undefined {
  if (v === undefined) return undefined;
  const n = Number(v);
  if (!Number.isFinite(n) || n <= 0) throw new UsageError(`${flag} ${v}: expected a positive number`);
  return n;
}

export function parseHostPort(
  flag: string,
  v: string,
  defaultPort: number | null,
): { host: string; port: number } {
  const m = /^(?:\[([^\]]+)\]|([^:]+))(?::(\d+))?$/.exec(v);
  const host = m?.[1] ?? m?.[2];
  const port = m?.[3] !== undefined ? Number(m[3]) : defaultPort;
  if (!host || port === null || !(port > 0 && port < 65536))
    throw new UsageError(
      `${flag} ${v}: expected HOST${defaultPort === null ? ':PORT' : '[:PORT]'}`,
      'for example 10.0.0.1:7707',
    );
  return { host, port };
}

const sessionRe = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;
function session(v: string): string {
  if (!sessionRe.test(v))
    throw new UsageError(`--session ${v}: expected letters, digits, . _ - (at most 64)`);
  return v;
}

async function readSecret(file: string | undefined, required: boolean): Promise<string | null> {
  if (file === undefined) {
    const env = process.env.CORRAL_CLONE_SECRET;
    if (env) return env.trim();
    if (required)
      throw new UsageError(
        'no session secret',
        'give --secret-file FILE (the secret `corral clone serve` printed), or set CORRAL_CLONE_SECRET',
      );
    return null;
  }
  let s: string;
  try {
    s = (await readFile(file, 'utf8')).trim();
  } catch (err) {
    throw new UsageError(`--secret-file ${file}: ${(err as Error).message}`);
  }
  if (s.length < protocolLimits.secretMinChars)
    throw new UsageError(
      `--secret-file ${file}: the secret is shorter than ${protocolLimits.secretMinChars} characters`,
    );
  return s;
}

/** Unreachable servers exit 3 (the shared printError maps only store errors to 3). */
function cloneAction<A extends unknown[]>(fn: (...args: A) => Promise<number | void>) {
  return action(async (...args: A) => {
    try {
      return await fn(...args);
    } catch (err) {
      if (err instanceof CloneUnreachableError) {
        printError(err);
        return exitCodes.unreachable;
      }
      throw err;
    }
  });
}

interface ServeOpts {
  source: string;
  expect: string;
  session: string;
  host: string;
  port: string;
  secretFile?: string;
  timeoutMs: string;
  chunkKib: string;
  compress: string;
  stallMs?: string;
  slowLagMib?: string;
  rejoinWaitMs?: string;
  throttleMibps?: string;
  json?: boolean;
  quiet?: boolean;
}

interface ReceiveOpts extends IdentityFlags {
  server: string;
  session: string;
  target: string;
  secretFile?: string;
  name?: string;
  dataPort: string;
  advertise?: string;
  stateFile?: string;
  targetZeroed?: boolean;
  forwardLagMib?: string;
  throttleMibps?: string;
  quiet?: boolean;
}

function printStatusTable(s: ServerStatus): void {
  const lines = [
    `session ${s.session}  source ${s.source} (${fmtBytes(s.sizeBytes)})  state ${s.state}  chain ${['server', ...s.chain].join(' -> ')}`,
    `${'RECEIVER'.padEnd(16)} ${'STATE'.padEnd(9)} ${'POS'.padStart(3)} ${'WRITTEN'.padStart(10)} ${'%'.padStart(4)} ${'RATE'.padStart(12)} ${'ETA'.padStart(6)} VERIFIED  NOTE`,
  ];
  for (const r of s.receivers) {
    const pct = s.sizeBytes ? Math.floor((r.writtenBytes * 100) / s.sizeBytes) : 100;
    lines.push(
      `${r.name.padEnd(16)} ${r.state.padEnd(9)} ${String(r.position ?? '-').padStart(3)} ${fmtBytes(r.writtenBytes).padStart(10)} ${String(pct).padStart(4)} ${fmtRate(r.rateBps).padStart(12)} ${(r.etaS === null ? '-' : `${r.etaS}s`).padStart(6)} ${(r.verified ? 'yes' : 'no').padEnd(9)} ${r.error ?? ''}`,
    );
  }
  process.stdout.write(`${lines.join('\n')}\n`);
}

export function registerClone(program: Command): void {
  const clone = program
    .command('clone')
    .description("clone a golden node's disk or image to many nodes through a chained TCP pipeline");

  clone
    .command('serve')
    .description('stream a source (image file or device, opened read-only) to N receivers')
    .requiredOption('--source <file|dev>', 'image file or block device to clone (never written)')
    .requiredOption('--expect <n>', 'number of receivers to wait for')
    .option('--session <name>', 'session name receivers must give', 'clone')
    .option('--host <addr>', 'address to listen on', '0.0.0.0')
    .option('--port <p>', 'control + status port', String(defaultClonePort))
    .option('--secret-file <file>', 'session secret (generated and printed when absent)')
    .option(
      '--timeout-ms <ms>',
      'wait this long for the expected receivers, then start with those present',
      '600000',
    )
    .option('--chunk-kib <k>', 'chunk size on the wire (KiB)', '1024')
    .option(
      '--compress <none|deflate>',
      'compress chunks on the wire (deflate level 1; Node 20 has no zstd)',
      'none',
    )
    .option('--stall-ms <ms>', 'cut out a receiver silent or stuck this long')
    .option('--slow-lag-mib <m>', 'move a receiver this far behind its upstream to the end of the chain')
    .option('--rejoin-wait-ms <ms>', 'after the others finish, wait this long for dead receivers to return')
    .option('--throttle-mibps <r>', 'cap the source rate (testing, demos)')
    .option('--json', 'print the final status as JSON on stdout')
    .option('--quiet', 'no progress output')
    .action(
      cloneAction(async (o: ServeOpts) => {
        const compress = o.compress;
        if (compress !== 'none' && compress !== 'deflate')
          throw new UsageError(
            `--compress ${compress}: expected none or deflate`,
            "zstd is not in Node 20's zlib",
          );
        let secret = await readSecret(o.secretFile, false);
        if (secret === null) {
          secret = newSecret();
          process.stderr.write(
            `clone serve: session secret: ${secret}\n  (write it to a file and give it to each receiver with --secret-file)\n`,
          );
        }
        const chunkBytes = int('--chunk-kib', o.chunkKib, 4, 8192)! * 1024;
        const d = defaultServerLimits;
        const slowLagMib = num('--slow-lag-mib', o.slowLagMib);
        const throttle = num('--throttle-mibps', o.throttleMibps);
        const r = await runServer({
          source: o.source,
          expect: int('--expect', o.expect, 1, d.receiversMax)!,
          session: session(o.session),
          host: o.host,
          port: int('--port', o.port, 0, 65535)!,
          secret,
          ...(await serveStreamOptions(o)),
          waitMs: int('--timeout-ms', o.timeoutMs, 1)!,
          chunkBytes,
          compress,
          throttleBps: throttle ? throttle * 1024 * 1024 : null,
          quiet: Boolean(o.quiet),
          limits: {
            ...d,
            stallMs: int('--stall-ms', o.stallMs, 100) ?? d.stallMs,
            slowLagMaxBytes: slowLagMib ? Math.round(slowLagMib * 1024 * 1024) : d.slowLagMaxBytes,
            rejoinWaitMs: int('--rejoin-wait-ms', o.rejoinWaitMs, 0) ?? d.rejoinWaitMs,
          },
        });
        if (o.json) process.stdout.write(`${JSON.stringify(r.status, null, 2)}\n`);
        return r.ok ? exitCodes.ok : exitCodes.problem;
      }),
    );

  clone
    .command('receive')
    .description('join a clone session: write the stream to a target and forward it downstream')
    .requiredOption('--server <host[:port]>', `the clone server (default port ${defaultClonePort})`)
    .option('--session <name>', 'session name', 'clone')
    .requiredOption('--target <file|dev>', 'image file or block device to write (ALL ITS DATA IS REPLACED)')
    .option('--secret-file <file>', 'session secret (or CORRAL_CLONE_SECRET)')
    .option('--name <name>', 'receiver name (default: the host name)')
    .option('--data-port <p>', 'port the upstream connects to (0: any)', '0')
    .option('--advertise <addr>', 'address the upstream should use (default: as the server sees us)')
    .option(
      '--state-file <file>',
      'rejoin point (default TARGET.corral-clone.json, /var/lib/corral for devices)',
    )
    .option('--target-zeroed', 'the target already reads as zeros: skip writing zero blocks on devices')
    .option('--forward-lag-mib <m>', 'stop taking data when this far ahead of the downstream')
    .option('--throttle-mibps <r>', "cap this receiver's write rate (testing, demos)")
    .option('--quiet', 'no progress output')
    .action(
      cloneAction(async (o: ReceiveOpts) => {
        const { host, port } = parseHostPort('--server', o.server, defaultClonePort);
        checkIdentityFlags(o);
        const secret = (await readSecret(o.secretFile, true))!;
        const name = o.name ?? hostname().split('.')[0]!;
        if (!sessionRe.test(name)) throw new UsageError(`--name ${name}: expected letters, digits, . _ -`);
        const throttle = num('--throttle-mibps', o.throttleMibps);
        const lag = num('--forward-lag-mib', o.forwardLagMib);
        const r = await runReceiver({
          serverHost: host,
          serverPort: port,
          session: session(o.session),
          name,
          target: o.target,
          secret,
          ...(await receiveStreamOptions(o)),
          dataHost: o.advertise ?? null,
          dataPort: int('--data-port', o.dataPort, 0, 65535)!,
          stateFile: o.stateFile ?? null,
          targetZeroed: Boolean(o.targetZeroed),
          throttleBps: throttle ? throttle * 1024 * 1024 : null,
          quiet: Boolean(o.quiet),
          limits: {
            ...defaultReceiverLimits,
            forwardLagMaxBytes: lag
              ? Math.round(lag * 1024 * 1024)
              : defaultReceiverLimits.forwardLagMaxBytes,
          },
        });
        // Post-clone identity (clone-identity.ts), only once the target has verified.
        if (r.ok && !(await identityAfterReceive(o.target, o, name))) return exitCodes.problem;
        return r.ok ? exitCodes.ok : exitCodes.problem;
      }),
    );

  clone
    .command('status')
    .description('show every receiver of a running clone session (read-only HTTP endpoint of serve)')
    .requiredOption('--server <host:port>', 'the clone server')
    .option('--json', 'print JSON')
    .action(
      cloneAction(async (o: { server: string; json?: boolean }) => {
        const { host, port } = parseHostPort('--server', o.server, defaultClonePort);
        const url = `http://${host.includes(':') ? `[${host}]` : host}:${port}/status`;
        let body: ServerStatus;
        try {
          const res = await fetch(url, { signal: AbortSignal.timeout(5000) });
          if (!res.ok) throw new Error(`HTTP ${res.status}`);
          body = (await res.json()) as ServerStatus;
        } catch (err) {
          throw new CloneUnreachableError(`--server ${o.server}`, (err as Error).message);
        }
        if (o.json) process.stdout.write(`${JSON.stringify(body, null, 2)}\n`);
        else printStatusTable(body);
      }),
    );
  addServeStreamOptions(clone.commands.find((c) => c.name() === 'serve')!);
  addReceiveStreamOptions(clone.commands.find((c) => c.name() === 'receive')!);
  registerCloneDigest(clone);

  clone
    .command('desc')
    .description('write the KA partition description of a disk (from sfdisk --json), or apply one to a disk')
    .argument('<dev>', 'disk device or image file')
    .option('--output <file>', 'write the description to this file instead of stdout')
    .option('--apply <descfile>', "write this description's layout to <dev> (fill scaled to its size)")
    .option('--yes', 'confirm --apply (it replaces the partition table of <dev>)')
    .action(
      cloneAction(async (dev: string, o: { output?: string; apply?: string; yes?: boolean }) => {
        if (o.apply) {
          if (!o.yes)
            throw new UsageError(`--apply replaces the partition table of ${dev}`, 'add --yes to confirm');
          let text: string;
          try {
            text = await readFile(o.apply, 'utf8');
          } catch (err) {
            throw new UsageError(`--apply ${o.apply}: ${(err as Error).message}`);
          }
          const desc = parseDesc(text, o.apply);
          const info = await volumeInfo(dev);
          if (info.sizeBytes === null) throw new UsageError(`${dev}: does not exist`);
          const table = await applyDesc(dev, desc, info.sizeBytes);
          process.stdout.write(formatDesc(descFromSfdiskJson(table, dev, info.sizeBytes)));
          return;
        }
        const table = await readSfdiskJson(dev);
        const diskBytes = (await volumeInfo(dev)).sizeBytes ?? undefined;
        const text = formatDesc(descFromSfdiskJson(table, dev, diskBytes));
        if (o.output) await writeFile(o.output, text);
        else process.stdout.write(text);
      }),
    );
  // Post-clone identity: options of `receive`, and `clone identity` for images cloned earlier.
  addIdentityOptions(
    clone.commands.find((c) => c.name() === 'receive')!,
    true,
  );
  registerCloneIdentity(clone);
}
