// A control connection: newline-delimited JSON, parsed with zod on arrival.
import type { Socket } from 'node:net';
import type { z } from 'zod';
import { LineSplitter } from './protocol.js';

export class ControlConn<In> {
  private closed = false;
  private handlers: ((m: In) => void)[] = [];
  private queue: In[] = [];
  private closeHandlers: ((reason: string) => void)[] = [];
  closeReason = '';

  constructor(
    readonly sock: Socket,
    schema: z.ZodType<In>,
  ) {
    const lines = new LineSplitter();
    sock.setNoDelay(true);
    sock.on('data', (d: Buffer) => {
      let parsed: string[];
      try {
        parsed = lines.push(d);
      } catch (err) {
        this.close((err as Error).message);
        return;
      }
      for (const line of parsed) {
        let json: unknown;
        try {
          json = JSON.parse(line);
        } catch {
          this.close('control message is not JSON');
          return;
        }
        const r = schema.safeParse(json);
        if (!r.success) {
          this.close(
            `bad control message: ${r.error.issues.map((i) => `${i.path.join('.')}: ${i.message}`).join('; ')}`,
          );
          return;
        }
        if (this.handlers.length === 0) this.queue.push(r.data);
        else for (const h of this.handlers) h(r.data);
      }
    });
    sock.on('error', (err) => {
      this.closeReason ||= err.message;
    });
    sock.on('close', () => this.markClosed(this.closeReason || 'connection closed'));
  }

  get isClosed(): boolean {
    return this.closed;
  }

  onMessage(h: (m: In) => void): void {
    this.handlers.push(h);
    const q = this.queue;
    this.queue = [];
    for (const m of q) h(m);
  }

  onClose(h: (reason: string) => void): void {
    if (this.closed) h(this.closeReason);
    else this.closeHandlers.push(h);
  }

  /** Next message, or rejects on close or timeout. */
  next(timeoutMs: number): Promise<In> {
    return new Promise((resolve, reject) => {
      if (this.queue.length > 0) {
        resolve(this.queue.shift()!);
        return;
      }
      if (this.closed) {
        reject(new Error(this.closeReason));
        return;
      }
      const t = setTimeout(() => {
        cleanup();
        reject(new Error(`no reply within ${timeoutMs} ms`));
      }, timeoutMs);
      const onMsg = (m: In) => {
        cleanup();
        resolve(m);
      };
      const onClose = (reason: string) => {
        cleanup();
        reject(new Error(reason));
      };
      const cleanup = () => {
        clearTimeout(t);
        this.handlers = this.handlers.filter((h) => h !== onMsg);
        this.closeHandlers = this.closeHandlers.filter((h) => h !== onClose);
      };
      this.handlers.push(onMsg);
      this.closeHandlers.push(onClose);
    });
  }

  send(m: unknown): void {
    if (!this.closed) this.sock.write(`${JSON.stringify(m)}\n`);
  }

  close(reason: string): void {
    this.closeReason ||= reason;
    // end() flushes what was sent (a refusal reaches the peer); destroy soon after in any case.
    this.sock.end();
    setTimeout(() => this.sock.destroy(), 1000).unref();
    this.markClosed(reason);
  }

  private markClosed(reason: string): void {
    if (this.closed) return;
    this.closed = true;
    this.closeReason ||= reason;
    const hs = this.closeHandlers;
    this.closeHandlers = [];
    for (const h of hs) h(this.closeReason);
  }
}
