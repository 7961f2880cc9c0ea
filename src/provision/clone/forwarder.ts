// The sending half of a chain link, shared by the server (feeding the first receiver from the
// source) and every receiver (feeding the next one from what it has already written).
//
// Data comes from a bounded ring of the frames most recently received (forwarded as they came,
// compressed or not) or, when the ring no longer holds them (a resume after a re-route, a slow
// downstream), is read back from the local volume (source-reader.ts: read-ahead, zero runs as one
// record). Memory stays bounded whatever the lag; the receiving side applies back-pressure on top
// (see receiver.ts, forwardLagMaxBytes). Frames are written corked (header and payload together)
// and up to sendQueueMaxBytes are queued on the socket before waiting for it to drain, so the
// kernel always has the next frame while this one is on the wire. ACKs are asynchronous.
import type { FileHandle } from 'node:fs/promises';
import { connect, type Socket } from 'node:net';
import { promisify } from 'node:util';
import { deflateRaw as deflateRawCb, constants as zc } from 'node:zlib';
import {
  FrameParser,
  FrameType,
  LinkHello,
  bareFrame,
  frameFlagDeflate,
  frameFlagFinal,
  holdFrame,
  jsonFrame,
  linkMac,
  payloadBuffer,
  payloadBytes,
  releaseFrame,
  writeFrame,
  type Frame,
  type Route,
  type StreamHeader,
} from './protocol.js';
import { ChunkReader, type UsedMap } from './source-reader.js';
import { connectLinkTls } from './tls.js';

const deflateRaw = promisify(deflateRawCb);

export const forwarderLimits = {
  connectTimeoutMs: 2000,
  handshakeTimeoutMs: 3000,
  linkAttemptsMax: 10,
  linkRetryDelayMs: 200,
  /** Waiting for the downstream's final ACK after END. */
  endAckTimeoutMs: 120_000,
  /** Bytes queued on the socket (beyond the kernel's buffer) before waiting for it to drain. */
  sendQueueMaxBytes: 4 * 1024 * 1024,
} as const;

export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/** Wakes every waiter on notify(); used for "more data written" and "state changed". */
export class Pulse {
  private waiters: (() => void)[] = [];
  notify(): void {
    const w = this.waiters;
    this.waiters = [];
    for (const f of w) f();
  }
  wait(): Promise<void> {
    return new Promise((r) => this.waiters.push(r));
  }
}

/** Recently received frames, by offset, bounded by payload bytes. The ring holds its frames' payloads. */
export class FrameRing {
  private frames = new Map<number, Frame>();
  private bytes = 0;
  constructor(private readonly maxBytes: number) {}
  put(f: Frame): void {
    if (this.frames.has(f.offset)) return;
    holdFrame(f);
    this.frames.set(f.offset, f);
    this.bytes += payloadBytes(f);
    while (this.bytes > this.maxBytes && this.frames.size > 1) {
      const oldest = this.frames.keys().next().value as number;
      const old = this.frames.get(oldest)!;
      this.bytes -= payloadBytes(old);
      this.frames.delete(oldest);
      releaseFrame(old);
    }
  }
  get(offset: number): Frame | undefined {
    return this.frames.get(offset);
  }
}

export function connectTcp(host: string, port: number, timeoutMs: number): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const s = connect({ host, port });
    const t = setTimeout(() => {
      s.destroy();
      reject(new Error(`connect to ${host}:${port} timed out after ${timeoutMs} ms`));
    }, timeoutMs);
    s.once('connect', () => {
      clearTimeout(t);
      resolve(s);
    });
    s.once('error', (err) => {
      clearTimeout(t);
      reject(err);
    });
  });
}

export interface ForwarderOptions {
  self: string;
  secret: string;
  header: StreamHeader;
  fh: FileHandle;
  /** Bytes [0, n) of the stream are readable from fh. */
  available: () => number;
  /** Notified whenever available() grows. */
  written: Pulse;
  ring: FrameRing | null;
  /** The source's used-block map (server only): unused blocks travel as zeros. */
  used: UsedMap | null;
  /** TLS-PSK key for the link (--tls), or null for plain TCP. */
  linkPsk: Buffer | null;
  throttleBps: number | null;
  log: (msg: string) => void;
  /** The link to the downstream could not be (re)established after the bounded attempts. */
  onLinkFailed: (to: string, reason: string) => void;
}

export class Forwarder {
  private route: Route | null = null;
  private linkId = 0;
  private sock: Socket | null = null;
  private readonly wake = new Pulse();
  /** Stream offset sent to the current downstream. */
  sentBytes = 0;
  /** Offset the current downstream acknowledged (written on its side). */
  ackBytes = 0;
  /** Bytes sent since start, for rates. */
  totalSentBytes = 0;
  /** When the current link was established after a route change (ms since epoch), for re-route timing. */
  lastLinkUpAtMs = 0;

  constructor(private readonly o: ForwarderOptions) {}

  get downstream(): string | null {
    return this.route?.to ?? null;
  }

  /** Point this forwarder at a new downstream (or none). Cancels the current link at once. */
  setRoute(route: Route | null): void {
    if (
      route &&
      this.route &&
      route.to === this.route.to &&
      route.gen === this.route.gen &&
      route.host === this.route.host
    )
      return;
    this.route = route;
    this.linkId++;
    this.sock?.destroy();
    this.sock = null;
    this.sentBytes = 0;
    this.ackBytes = 0;
    this.wake.notify();
    if (route) void this.runLink(route, this.linkId);
  }

  close(): void {
    this.setRoute(null);
  }

  private async runLink(route: Route, linkId: number): Promise<void> {
    let attempts = 0;
    let lastErr: string;
    while (this.linkId === linkId) {
      try {
        await this.streamOnce(route, linkId);
        return;
      } catch (err) {
        if (this.linkId !== linkId) return;
        lastErr = (err as Error).message;
        if (process.env.CORRAL_CLONE_DEBUG) this.o.log(`link to ${route.to}: ${lastErr}`);
        attempts++;
        if (attempts >= forwarderLimits.linkAttemptsMax) {
          this.o.log(`link to ${route.to} failed ${attempts} times: ${lastErr}`);
          this.o.onLinkFailed(route.to, lastErr);
          return;
        }
        await sleep(forwarderLimits.linkRetryDelayMs);
      }
    }
  }

  private async streamOnce(route: Route, linkId: number): Promise<void> {
    const { header } = this.o;
    const sock = this.o.linkPsk
      ? await connectLinkTls(route.host, route.port, this.o.linkPsk, forwarderLimits.connectTimeoutMs)
      : await connectTcp(route.host, route.port, forwarderLimits.connectTimeoutMs);
    if (this.linkId !== linkId) {
      sock.destroy();
      return;
    }
    this.sock = sock;
    // Bulk data: frames are written corked, Nagle only merges what would be tiny packets anyway.
    sock.setNoDelay(false);
    const reader = new ChunkReader(this.o.fh, header.chunkBytes, header.sizeBytes, this.o.used);
    const parser = new FrameParser();
    let ready: Frame | null = null;
    let finalAck = false;
    let closedErr: Error | null = null;
    const inbound = new Pulse();
    sock.on('data', (d: Buffer) => {
      try {
        for (const f of parser.push(d)) {
          if (f.type === FrameType.ack) {
            this.ackBytes = Math.max(this.ackBytes, f.offset);
            if (f.flags & frameFlagFinal) finalAck = true;
          } else if (f.type === FrameType.ready || f.type === FrameType.reject) ready = f;
        }
      } catch (err) {
        sock.destroy(err as Error);
      }
      inbound.notify();
    });
    const closed = new Promise<never>((_, reject) => {
      sock.once('close', () => {
        closedErr ??= new Error(`link to ${route.to} closed`);
        inbound.notify();
        this.wake.notify();
        reject(closedErr);
      });
      sock.once('error', (err) => {
        closedErr = err;
      });
    });
    closed.catch(() => undefined);
    const alive = () => {
      if (this.linkId !== linkId) throw new Error('route changed');
      if (closedErr) throw closedErr;
    };
    const write = async (f: Frame, onFlushed?: () => void) => {
      writeFrame(sock, f, onFlushed);
      if (sock.writableLength > forwarderLimits.sendQueueMaxBytes)
        await Promise.race([new Promise((r) => sock.once('drain', r)), closed]);
      alive();
    };

    try {
      const hello: LinkHello = {
        session: header.session,
        from: this.o.self,
        to: route.to,
        gen: route.gen,
        mac: linkMac(this.o.secret, header.session, this.o.self, route.to, route.gen),
      };
      await write(jsonFrame(FrameType.hello, hello));
      const deadline = Date.now() + forwarderLimits.handshakeTimeoutMs;
      while (ready === null) {
        alive();
        const left = deadline - Date.now();
        if (left <= 0)
          throw new Error(`no READY from ${route.to} within ${forwarderLimits.handshakeTimeoutMs} ms`);
        await Promise.race([inbound.wait(), closed, sleep(Math.min(left, 200))]);
      }
      const r = ready as Frame;
      if (r.type === FrameType.reject)
        throw new Error(`${route.to} refused the link: ${payloadBuffer(r).toString()}`);
      let off = Math.min(r.offset, header.sizeBytes);
      this.sentBytes = off;
      this.ackBytes = Math.max(this.ackBytes, off);
      this.lastLinkUpAtMs = Date.now();
      await write(jsonFrame(FrameType.header, header));

      const startMs = Date.now();
      let throttledBytes = 0;
      while (off < header.sizeBytes) {
        alive();
        const avail = this.o.available();
        if (avail <= off) {
          await Promise.race([this.o.written.wait(), this.wake.wait(), closed]);
          continue;
        }
        const { f, done } = await this.frameAt(reader, off, avail);
        alive();
        await write(f, done ?? undefined);
        off += f.lengthBytes;
        this.sentBytes = off;
        this.totalSentBytes += payloadBytes(f);
        if (this.o.throttleBps) {
          throttledBytes += f.lengthBytes;
          const dueMs = (throttledBytes / this.o.throttleBps) * 1000 - (Date.now() - startMs);
          if (dueMs > 0) await sleep(dueMs);
        }
      }
      await write(bareFrame(FrameType.end, header.sizeBytes));
      const endDeadline = Date.now() + forwarderLimits.endAckTimeoutMs;
      while (!finalAck) {
        alive();
        if (Date.now() > endDeadline) throw new Error(`no final ACK from ${route.to}`);
        await Promise.race([inbound.wait(), closed, sleep(500)]);
      }
    } finally {
      if (this.sock === sock) this.sock = null;
      sock.destroy();
    }
  }

  /**
   * The frame at off; done: to call once the socket has written it (gives its buffer back). A ring
   * frame is held from here (synchronously with the lookup), so the ring may drop it meanwhile.
   */
  private async frameAt(
    reader: ChunkReader,
    off: number,
    avail: number,
  ): Promise<{ f: Frame; done: (() => void) | null }> {
    const cached = this.o.ring?.get(off);
    if (cached && off + cached.lengthBytes <= avail) {
      if (!cached.hold) return { f: cached, done: null };
      holdFrame(cached);
      return { f: cached, done: () => releaseFrame(cached) };
    }
    const f = await reader.frame(off, avail);
    if (f.type !== FrameType.data) return { f, done: null };
    const buf = f.payload[0]!;
    if (this.o.header.compress === 'deflate') {
      const c = await deflateRaw(buf, { level: 1, strategy: zc.Z_DEFAULT_STRATEGY });
      if (c.length < buf.length) {
        reader.release(buf);
        return { f: { ...f, flags: frameFlagDeflate, payload: [c] }, done: null };
      }
    }
    return { f, done: () => reader.release(buf) };
  }
}
