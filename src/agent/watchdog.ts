// Client side of the per-node software watchdog (see watchdog-main.ts). startWatchdog()
// connects to the node's running watchdog or spawns one (detached, its own session), then
// feed(allowMs) tells it how long the node's resources may keep running without news.
// If the connection breaks (the watchdog fired or was killed), the client respawns it and
// reconnects in the background; feeds sent while disconnected are dropped (the next one counts).
import { spawn } from 'node:child_process';
import { closeSync, mkdirSync, openSync } from 'node:fs';
import { connect, type Socket } from 'node:net';
import { dirname, isAbsolute, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { CorralError } from '../core/errors.js';
import type { Env, Watchdog } from '../env/types.js';
import { readPidRecord, recordAlive } from '../drivers/proc.js';
import { UNIX_SOCKET_PATH_MAX, watchdogPaths } from './watchdog-files.js';

/** bound on spawning the watchdog and connecting to it */
export const WATCHDOG_START_TIMEOUT_MS = 10_000;
/** connect retry period while the watchdog starts */
const CONNECT_RETRY_MS = 25;
/** spawn attempts per connect (a spawned watchdog that exits at once is retried) */
const SPAWN_ATTEMPTS_MAX = 3;
/** reconnect back-off after an unexpected disconnect */
const RECONNECT_DELAY_MS = 200;
/** close(): bound on waiting for the watchdog's goodbye */
const CLOSE_WAIT_MS = 2000;

export class WatchdogError extends CorralError {
  constructor(where: string, message: string, hint?: string) {
    super('CORRAL_WATCHDOG', `${where}: ${message}`, hint);
  }
}

export interface WatchdogOptions {
  /** the node's state directory (absolute): run/ pidfiles, watchdog.sock, watchdog.pid */
  stateDir: string;
  log: Env['log'];
}

/** How to run watchdog-main: compiled .js directly, or the .ts sources through tsx. */
export function watchdogCommand(): { execPath: string; args: string[] } {
  const here = import.meta.url;
  if (here.endsWith('.ts')) {
    const script = fileURLToPath(new URL('./watchdog-main.ts', here));
    return { execPath: process.execPath, args: ['--import', import.meta.resolve('tsx'), script] };
  }
  return { execPath: process.execPath, args: [fileURLToPath(new URL('./watchdog-main.js', here))] };
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

function tryConnect(path: string): Promise<Socket | null> {
  return new Promise((resolve) => {
    const s = connect(path);
    s.once('connect', () => {
      s.removeAllListeners('error');
      resolve(s);
    });
    s.once('error', () => {
      s.destroy();
      resolve(null);
    });
  });
}

/** Connect to the node's watchdog, spawning it when none runs. */
async function connectOrSpawn(stateDir: string, log: Env['log']): Promise<Socket> {
  const paths = watchdogPaths(stateDir);
  const deadline = Date.now() + WATCHDOG_START_TIMEOUT_MS;
  let child: { exited: boolean } | null = null;
  let spawns = 0;
  while (Date.now() < deadline) {
    const owner = readPidRecord(paths.pidfile);
    if (owner && recordAlive(owner)) {
      const s = await tryConnect(paths.socket);
      if (s) {
        if (!child) log('info', `watchdog: adopted running watchdog ${owner.pid}`, { stateDir });
        return s;
      }
    } else if ((!child || child.exited) && spawns < SPAWN_ATTEMPTS_MAX) {
      child = spawnWatchdog(stateDir);
      spawns++;
      log('info', 'watchdog: started a watchdog process', { stateDir });
    }
    await sleep(CONNECT_RETRY_MS);
  }
  throw new WatchdogError(
    `watchdog ${paths.socket}`,
    `no watchdog answered within ${WATCHDOG_START_TIMEOUT_MS} ms`,
    `see ${paths.log}`,
  );
}

function spawnWatchdog(stateDir: string): { exited: boolean } {
  const state = { exited: false };
  const { execPath, args } = watchdogCommand();
  const { log } = watchdogPaths(stateDir);
  mkdirSync(dirname(log), { recursive: true });
  const fd = openSync(log, 'a');
  try {
    const child = spawn(execPath, [...args, stateDir], {
      detached: true,
      stdio: ['ignore', fd, fd],
      cwd: stateDir,
    });
    child.on('error', () => (state.exited = true));
    child.on('exit', () => (state.exited = true));
    child.unref();
  } finally {
    closeSync(fd);
  }
  return state;
}

class SocketWatchdog implements Watchdog {
  private sock: Socket | null;
  private armed = false;
  private closed = false;
  private reconnecting = false;

  constructor(
    private readonly stateDir: string,
    private readonly log: Env['log'],
    sock: Socket,
  ) {
    this.sock = sock;
    this.attach(sock);
  }

  private attach(sock: Socket): void {
    sock.setEncoding('utf8');
    sock.on('data', (d: string) => {
      for (const line of d.split('\n')) {
        if (line.startsWith('error')) this.log('error', `watchdog: ${line}`);
      }
    });
    sock.on('error', () => {
      // 'close' follows
    });
    sock.on('close', () => {
      if (this.sock === sock) this.sock = null;
      if (!this.closed) {
        this.log('warn', 'watchdog: connection lost (watchdog fired or was killed); reconnecting', {
          stateDir: this.stateDir,
        });
        void this.reconnect();
      }
    });
  }

  private async reconnect(): Promise<void> {
    if (this.reconnecting) return;
    this.reconnecting = true;
    try {
      while (!this.closed && !this.sock) {
        await sleep(RECONNECT_DELAY_MS);
        try {
          const s = await connectOrSpawn(this.stateDir, this.log);
          if (this.closed) {
            s.destroy();
            return;
          }
          this.sock = s;
          this.attach(s);
          if (!this.armed) s.write('disarm\n');
        } catch (e) {
          this.log('error', `watchdog: ${(e as Error).message}`, { stateDir: this.stateDir });
        }
      }
    } finally {
      this.reconnecting = false;
    }
  }

  feed(allowMs: number): void {
    if (this.closed) return;
    const ms = Math.max(0, Math.floor(allowMs));
    this.armed = true;
    this.sock?.write(`feed ${ms} ${process.hrtime.bigint()}\n`);
  }

  disarm(): void {
    if (this.closed) return;
    this.armed = false;
    this.sock?.write('disarm\n');
  }

  /** disconnect; a disarmed watchdog is told to exit, an armed one keeps guarding until its deadline */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    const sock = this.sock;
    this.sock = null;
    if (!sock) return;
    await new Promise<void>((resolve) => {
      const t = setTimeout(() => {
        sock.destroy();
        resolve();
      }, CLOSE_WAIT_MS);
      const done = () => {
        clearTimeout(t);
        sock.destroy();
        resolve();
      };
      sock.once('close', done);
      if (this.armed) sock.end();
      else {
        // the reply ("ok bye", or "error armed" when an earlier agent armed it) ends the wait
        sock.once('data', done);
        sock.write('quit\n');
      }
    });
  }
}

export async function startWatchdog(opts: WatchdogOptions): Promise<Watchdog> {
  const { stateDir, log } = opts;
  if (!isAbsolute(stateDir)) {
    throw new WatchdogError('watchdog', `stateDir ${stateDir} is not absolute`, 'pass an absolute path');
  }
  const { socket } = watchdogPaths(stateDir);
  if (Buffer.byteLength(socket) > UNIX_SOCKET_PATH_MAX) {
    throw new WatchdogError(
      `watchdog ${socket}`,
      `socket path is ${Buffer.byteLength(socket)} bytes, Unix sockets allow ${UNIX_SOCKET_PATH_MAX}`,
      'use a shorter state directory',
    );
  }
  mkdirSync(join(stateDir, 'run'), { recursive: true });
  const sock = await connectOrSpawn(stateDir, log);
  return new SocketWatchdog(stateDir, log, sock);
}
