// Shared CLI plumbing: one place turns errors into messages and exit codes.
//   exit 0  success
//   exit 1  the command ran and found a problem (invalid config, failed check)
//   exit 2  bad usage (unknown command or option, bad argument)
//   exit 3  the cluster or store could not be reached
import { Command } from 'commander';
import { CorralError } from '../core/errors.js';

export const exitCodes = { ok: 0, problem: 1, usage: 2, unreachable: 3 } as const;

export class UsageError extends CorralError {
  constructor(message: string, hint?: string) {
    super('CORRAL_USAGE', message, hint);
  }
}

export function printError(err: unknown): number {
  if (err instanceof UsageError) {
    process.stderr.write(`corral: ${err.message}\n${err.hint ? `hint: ${err.hint}\n` : ''}`);
    return exitCodes.usage;
  }
  if (err instanceof CorralError) {
    process.stderr.write(`corral: ${err.message}\n${err.hint ? `hint: ${err.hint}\n` : ''}`);
    if (err.code === 'CORRAL_STORE_UNAVAILABLE' || err.code === 'CORRAL_STORE_TIMEOUT')
      return exitCodes.unreachable;
    return exitCodes.problem;
  }
  const e = err as Error;
  process.stderr.write(`corral: internal error: ${e?.stack ?? String(err)}\n`);
  return exitCodes.problem;
}

/** Wrap a command action so every error becomes a clear message and an exit code. */
export function action<A extends unknown[]>(fn: (...args: A) => Promise<number | void> | number | void) {
  return async (...args: A): Promise<void> => {
    try {
      const code = await fn(...args);
      if (typeof code === 'number') process.exitCode = code;
    } catch (err) {
      process.exitCode = printError(err);
    }
  };
}

/** Each area registers its sub-commands on the root program. */
export type Register = (program: Command) => void;
