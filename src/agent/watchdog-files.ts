// File names and wire format shared by the watchdog process (watchdog-main.ts), its client
// (watchdog.ts) and the local fence device. Kept free of heavy imports: the watchdog
// process loads this file and must start fast.
import { join } from 'node:path';

export const WATCHDOG_SOCKET = 'watchdog.sock';
/** JSON {pid, startTime} of the running watchdog */
export const WATCHDOG_PIDFILE = 'watchdog.pid';
/** written by the watchdog when it fires: {atMs, killed: [{id, pgid}]} */
export const WATCHDOG_FIRED = 'watchdog-fired.json';
export const WATCHDOG_LOG = join('logs', 'watchdog.log');
/** sockaddr_un.sun_path holds 108 bytes including the terminating NUL */
export const UNIX_SOCKET_PATH_MAX = 107;

export function watchdogPaths(stateDir: string) {
  return {
    socket: join(stateDir, WATCHDOG_SOCKET),
    pidfile: join(stateDir, WATCHDOG_PIDFILE),
    fired: join(stateDir, WATCHDOG_FIRED),
    log: join(stateDir, WATCHDOG_LOG),
  };
}

/**
 * Client -> watchdog, one command a line:
 *   feed <allowMs> [<sentMonoNs>]   resources may run until min(receipt, sent) + allowMs
 *                                   (CLOCK_MONOTONIC is system-wide: the sender's stamp is comparable)
 *   disarm                          stop watching
 *   status                          reply: JSON {armed, remainingMs, pid}
 *   quit                            exit, only when disarmed
 * Watchdog -> client: one reply a line ("ok ...", "error ...", or JSON for status).
 */
export type WatchdogCommand =
  | { cmd: 'feed'; allowMs: number; sentMonoNs?: bigint }
  | { cmd: 'disarm' }
  | { cmd: 'status' }
  | { cmd: 'quit' };

/** allowMs bound: a feed never lets resources run longer than this without a new one */
export const WATCHDOG_ALLOW_MS_MAX = 10 * 60 * 1000;

export function parseWatchdogCommand(line: string): WatchdogCommand | { error: string } {
  const parts = line.trim().split(/\s+/);
  switch (parts[0]) {
    case 'feed': {
      const allowMs = Number(parts[1]);
      if (!Number.isInteger(allowMs) || allowMs < 0 || allowMs > WATCHDOG_ALLOW_MS_MAX) {
        return { error: `feed: allowMs must be an integer in 0..${WATCHDOG_ALLOW_MS_MAX}, got ${parts[1]}` };
      }
      if (parts[2] !== undefined && /^\d+$/.test(parts[2])) {
        return { cmd: 'feed', allowMs, sentMonoNs: BigInt(parts[2]) };
      }
      return { cmd: 'feed', allowMs };
    }
    case 'disarm':
    case 'status':
    case 'quit':
      return { cmd: parts[0] };
    default:
      return {
        error: `unknown command ${JSON.stringify(parts[0] ?? '')}: expected feed, disarm, status or quit`,
      };
  }
}
