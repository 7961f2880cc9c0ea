// `corral clone` stream options: TLS (serve --tls, receive --tls-fingerprint/--tls-ca), the used-block
// map (serve --no-used-blocks), and `corral clone digest FILE` (the stream checksum of an image).
import { readFile } from 'node:fs/promises';
import type { Command } from 'commander';
import { digestName, digestRange } from '../../provision/clone/digest.js';
import {
  normalizeFingerprint,
  serverTls,
  type ClientTls,
  type ServerTls,
} from '../../provision/clone/tls.js';
import { openSource } from '../../provision/clone/volume.js';
import { UsageError, action } from '../program.js';

interface ServeStreamFlags {
  host?: string;
  tls?: boolean;
  tlsCert?: string;
  tlsKey?: string;
  usedBlocks?: boolean;
}

interface ReceiveStreamFlags {
  tlsFingerprint?: string;
  tlsCa?: string;
}

/** serve: TLS material (printing the fingerprint receivers need) and the used-block choice. */
export async function serveStreamOptions(
  flags: object,
): Promise<{ tls: ServerTls | null; usedBlocks: boolean }> {
  const o = flags as ServeStreamFlags;
  if (!o.tls && (o.tlsCert || o.tlsKey))
    throw new UsageError('--tls-cert/--tls-key without --tls', 'add --tls');
  let tls: ServerTls | null = null;
  if (o.tls) {
    const alt =
      o.host && o.host !== '0.0.0.0' && o.host !== '::'
        ? [`${/^[\d.]+$|:/.test(o.host) ? 'IP' : 'DNS'}:${o.host}`]
        : [];
    tls = await serverTls(o.tlsCert, o.tlsKey, alt);
    process.stderr.write(
      `clone serve: TLS certificate fingerprint (sha256): ${tls.fingerprint}\n  (give it to each receiver with --tls-fingerprint)\n`,
    );
  }
  return { tls, usedBlocks: o.usedBlocks !== false };
}

export async function receiveStreamOptions(flags: object): Promise<{ tls: ClientTls | null }> {
  const o = flags as ReceiveStreamFlags;
  if (o.tlsFingerprint && o.tlsCa) throw new UsageError('--tls-fingerprint and --tls-ca: give one of them');
  if (o.tlsFingerprint) return { tls: { fingerprint: normalizeFingerprint(o.tlsFingerprint) } };
  if (o.tlsCa) {
    let ca: string;
    try {
      ca = await readFile(o.tlsCa, 'utf8');
    } catch (err) {
      throw new UsageError(`--tls-ca ${o.tlsCa}: ${(err as Error).message}`);
    }
    return { tls: { ca, caFile: o.tlsCa } };
  }
  return { tls: null };
}

export function addServeStreamOptions(cmd: Command): Command {
  return cmd
    .option('--tls', 'run the stream over TLS (control port and every chain link)')
    .option('--tls-cert <file>', 'server certificate (PEM; default: a self-signed one made with openssl)')
    .option('--tls-key <file>', 'private key of --tls-cert (PEM)')
    .option(
      '--no-used-blocks',
      'copy every non-zero block even when partclone can tell which blocks the filesystem uses',
    );
}

export function addReceiveStreamOptions(cmd: Command): Command {
  return cmd
    .option('--tls-fingerprint <sha256>', 'TLS: the server certificate fingerprint `serve --tls` printed')
    .option('--tls-ca <file>', 'TLS: verify the server certificate with this CA (PEM) instead');
}

export function registerCloneDigest(clone: Command): void {
  clone
    .command('digest')
    .description(`print the clone checksum of an image or device (${digestName}), as serve reports it`)
    .argument('<file>', 'image file or block device')
    .option('--chunk-kib <k>', 'chunk size of the session (serve --chunk-kib)', '1024')
    .action(
      action(async (file: string, o: { chunkKib: string }) => {
        const k = Number(o.chunkKib);
        if (!Number.isInteger(k) || k < 4 || k > 8192)
          throw new UsageError(`--chunk-kib ${o.chunkKib}: expected an integer from 4 to 8192`);
        const src = await openSource(file);
        try {
          const d = await digestRange(src.fh, src.sizeBytes, k * 1024);
          process.stdout.write(`${d.digest()}  ${file}\n`);
        } finally {
          await src.fh.close();
        }
      }),
    );
}
