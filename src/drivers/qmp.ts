// A QMP client (QEMU Machine Protocol: JSON lines on a Unix socket).
// connect() reads the greeting, negotiates capabilities, then execute() sends commands with
// ids and a timeout each; asynchronous events go to onEvent handlers; close/EOF fails every
// pending command and fires onClose once.
import { createConnection, type Socket } from 'node:net';
import { CorralError } from '../core/errors.js';

/** connect + greeting + qmp_capabilities must finish within this */
export const QMP_CONNECT_TIMEOUT_MS = 5000;
/** default bound on one command */
export const QMP_COMMAND_TIMEOUT_MS = 5000;
/** a line longer than this from QEMU is a protocol error (QMP answers are small) */
export const QMP_LINE_BYTES_MAX = 4 * 1024 * 1024;
/** commands in flight at once on one connection */
export const QMP_PENDING_MAX = 64;

export class QmpError extends CorralError {
  constructor(
    where: string,
    message: string,
    readonly qmpClass?: string,
  ) {
    super('CORRAL_QMP', `${where}: ${message}`, 'see the VM log (qemu.log) next to its QMP socket');
  }
}

export interface QmpEvent {
  event: string;
  data?: Record<string, unknown>;
  timestamp?: { seconds: number; microseconds: number };
}

interface Pending {
  command: string;
  resolve: (v: unknown) => void;
  reject: (e: Error) => void;
  timer: NodeJS.Timeout;
}

export class QmpClient {
  private buf = '';
  private nextId = 1;
  private readonly pending = new Map<string, Pending>();
  private readonly eventHandlers: ((ev: QmpEvent) => void)[] = [];
  private readonly closeHandlers: ((why: string) => void)[] = [];
  private closedWhy: string | undefined;
  private greeting: ((v: unknown) => void) | undefined;

  private constructor(
    private readonly sock: Socket,
    readonly path: string,
  ) {}

  /** Connect to a QMP socket and leave capabilities negotiation mode. */
  static async connect(path: string, timeoutMs = QMP_CONNECT_TIMEOUT_MS): Promise<QmpClient> {
    const sock = createConnection({ path });
    const c = new QmpClient(sock, path);
    const timer = setTimeout(() => c.destroy(`no QMP greeting within ${timeoutMs} ms`), timeoutMs);
    try {
      await new Promise<void>((resolve, reject) => {
        sock.once('connect', () => resolve());
        sock.once('error', (e) => reject(new QmpError(`QMP ${path}`, `cannot connect: ${e.message}`)));
      });
      c.attach();
      await new Promise<unknown>((resolve, reject) => {
        c.greeting = resolve;
        c.onClose((why) => reject(new QmpError(`QMP ${path}`, why)));
      });
      await c.execute('qmp_capabilities', undefined, timeoutMs);
      return c;
    } catch (e) {
      c.destroy('connect failed');
      throw e;
    } finally {
      clearTimeout(timer);
    }
  }

  private attach(): void {
    this.sock.setEncoding('utf8');
    this.sock.on('data', (d: string) => this.onData(d));
    this.sock.on('error', (e) => this.destroy(`socket error: ${e.message}`));
    this.sock.on('close', () => this.destroy('QEMU closed the QMP connection'));
  }

  get closed(): boolean {
    return this.closedWhy !== undefined;
  }

  onEvent(h: (ev: QmpEvent) => void): void {
    this.eventHandlers.push(h);
  }

  onClose(h: (why: string) => void): void {
    if (this.closedWhy !== undefined) h(this.closedWhy);
    else this.closeHandlers.push(h);
  }

  /** Run one command; resolves with its `return` value, rejects with QmpError on error/timeout/close. */
  execute<T = unknown>(
    command: string,
    args?: Record<string, unknown>,
    timeoutMs = QMP_COMMAND_TIMEOUT_MS,
  ): Promise<T> {
    if (this.closedWhy !== undefined)
      return Promise.reject(new QmpError(`QMP ${command}`, `connection closed (${this.closedWhy})`));
    if (this.pending.size >= QMP_PENDING_MAX)
      return Promise.reject(new QmpError(`QMP ${command}`, `${QMP_PENDING_MAX} commands already pending`));
    const id = `c${this.nextId++}`;
    return new Promise<T>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new QmpError(`QMP ${command}`, `no answer within ${timeoutMs} ms`));
      }, timeoutMs);
      this.pending.set(id, { command, resolve: resolve as (v: unknown) => void, reject, timer });
      const msg = JSON.stringify(args ? { execute: command, arguments: args, id } : { execute: command, id });
      this.sock.write(msg + '\n');
    });
  }

  /** HMP through QMP (human-monitor-command), e.g. `xp /4xb 0x100000`. */
  hmp(commandLine: string, timeoutMs = QMP_COMMAND_TIMEOUT_MS): Promise<string> {
    return this.execute<string>('human-monitor-command', { 'command-line': commandLine }, timeoutMs);
  }

  close(): void {
    this.destroy('closed by the client');
  }

  private destroy(why: string): void {
    if (this.closedWhy !== undefined) return;
    this.closedWhy = why;
    this.sock.destroy();
    for (const [id, p] of this.pending) {
      clearTimeout(p.timer);
      p.reject(new QmpError(`QMP ${p.command}`, why));
      this.pending.delete(id);
    }
    for (const h of this.closeHandlers.splice(0)) {
      try {
        h(why);
      } catch {
        // a handler's failure must not stop the others
      }
    }
  }

  private onData(d: string): void {
    this.buf += d;
    if (this.buf.length > QMP_LINE_BYTES_MAX && !this.buf.includes('\n')) {
      this.destroy(`QMP line longer than ${QMP_LINE_BYTES_MAX} bytes`);
      return;
    }
    let nl: number;
    while ((nl = this.buf.indexOf('\n')) >= 0) {
      const line = this.buf.slice(0, nl).trim();
      this.buf = this.buf.slice(nl + 1);
      if (line) this.onLine(line);
    }
  }

  private onLine(line: string): void {
    let msg: Record<string, unknown>;
    try {
      msg = JSON.parse(line) as Record<string, unknown>;
    } catch {
      return; // not JSON: ignore (QEMU never sends this on a QMP socket)
    }
    if ('QMP' in msg) {
      this.greeting?.(msg.QMP);
      this.greeting = undefined;
      return;
    }
    if (typeof msg.event === 'string') {
      for (const h of this.eventHandlers) {
        try {
          h(msg as unknown as QmpEvent);
        } catch {
          // handlers own their errors
        }
      }
      return;
    }
    const id = typeof msg.id === 'string' ? msg.id : undefined;
    const p = id !== undefined ? this.pending.get(id) : undefined;
    if (!p || id === undefined) return;
    this.pending.delete(id);
    clearTimeout(p.timer);
    if ('error' in msg) {
      const err = msg.error as { class?: string; desc?: string };
      p.reject(new QmpError(`QMP ${p.command}`, err.desc ?? 'error', err.class));
    } else p.resolve(msg.return);
  }
}
