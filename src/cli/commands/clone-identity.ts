// `corral clone identity`: give a cloned disk or image its own identity (new filesystem UUIDs with
// fstab and boot config to match, empty machine-id, new SSH host keys, host name). The same step
// runs at the end of `corral clone receive` once the target has verified.
import type { Command } from 'commander';
import { hostnameProblem } from '../../provision/identity/text.js';
import { resetIdentity, type IdentityReport } from '../../provision/identity/reset.js';
import { UsageError, action, exitCodes } from '../program.js';

export interface IdentityFlags {
  hostname?: string;
  newUuids?: boolean;
  /** commander's --no-reset-identity: false when given. */
  resetIdentity?: boolean;
}

/** The identity options shared by `clone receive` and `clone identity`. */
export function addIdentityOptions(cmd: Command, forReceive: boolean): Command {
  return cmd
    .option('--hostname <name>', 'host name written to /etc/hostname and /etc/hosts of the copied root')
    .option(
      '--new-uuids',
      'new UUIDs for ext2/3/4, swap, xfs and vfat filesystems and new partition table ids (PARTUUID), with fstab, crypttab and boot config rewritten to match',
    )
    .option(
      '--no-reset-identity',
      forReceive
        ? 'after verifying, keep the copied /etc/machine-id and SSH host keys (reset by default)'
        : 'keep /etc/machine-id and the SSH host keys',
    );
}

export function checkIdentityFlags(o: IdentityFlags): void {
  if (o.hostname !== undefined) {
    const why = hostnameProblem(o.hostname);
    if (why) throw new UsageError(`--hostname ${o.hostname}: ${why}`);
  }
}

/** Runs the identity step on TARGET; returns true when nothing asked for failed. */
export async function runIdentityStep(
  target: string,
  o: IdentityFlags,
  log: (msg: string) => void,
): Promise<{ ok: boolean; report: IdentityReport | null }> {
  const resetIds = o.resetIdentity !== false;
  if (!resetIds && !o.newUuids && !o.hostname) return { ok: true, report: null };
  const report = await resetIdentity({
    target,
    hostname: o.hostname ?? null,
    newUuids: Boolean(o.newUuids),
    resetIdentity: resetIds,
    log,
  });
  return { ok: report.problems.length === 0, report };
}

export function registerCloneIdentity(clone: Command): void {
  addIdentityOptions(
    clone
      .command('identity')
      .description(
        'give a cloned disk or image its own identity: machine-id, SSH host keys, host name, filesystem UUIDs',
      )
      .requiredOption('--target <file|dev>', 'the cloned image file or disk (not mounted)'),
    false,
  )
    .option('--json', 'print the report as JSON on stdout')
    .option('--quiet', 'no progress messages')
    .action(
      action(async (o: IdentityFlags & { target: string; json?: boolean; quiet?: boolean }) => {
        checkIdentityFlags(o);
        const log = o.quiet ? () => undefined : (m: string) => process.stderr.write(`clone ${m}\n`);
        const r = await runIdentityStep(o.target, o, log);
        if (!r.report) log('identity: nothing asked (--no-reset-identity without --hostname or --new-uuids)');
        if (o.json) process.stdout.write(`${JSON.stringify(r.report, null, 2)}\n`);
        return r.ok ? exitCodes.ok : exitCodes.problem;
      }),
    );
}

/**
 * The hook `clone receive` calls once its target has verified. Its failures never undo the clone:
 * they are reported, and the exit code says the identity step needs another go.
 */
export async function identityAfterReceive(target: string, o: IdentityFlags, name: string): Promise<boolean> {
  const log = (m: string) => process.stderr.write(`clone receive ${name}: ${m}\n`);
  try {
    const r = await runIdentityStep(target, o, log);
    if (!r.ok)
      log(
        `the data is verified; the identity step had problems: fix them and run \`corral clone identity --target ${target}\``,
      );
    return r.ok;
  } catch (err) {
    log(
      `identity step failed (${(err as Error).message}); the data is verified: run \`corral clone identity --target ${target}\``,
    );
    return false;
  }
}
