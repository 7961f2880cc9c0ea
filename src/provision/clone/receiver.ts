// `corral clone receive`: join a session, write the stream to the target, forward it downstream.
//
// Order of checks: the server must prove the secret (welcome MAC) and the stream header must fit the
// target before the target is even opened for writing. Every data link re-checks the header.
import { constants as fsc } from 'node:fs';
import { open, readFile, rename, rm, writeFile, type FileHandle } from 'node:fs/promises';
import { Socket, createServer, type Server } from 'node:net';
import { promisify } from 'node:util';
import { inflateRaw as inflateRawCb } from 'node:zlib';
import { z } from 'zod';
import { ControlConn } from './control.js';
import { ChunkedDigest, digestRange } from './digest.js';
import { CloneRefusedError, CloneTargetError, CloneUnreachableError } from './errors.js';
import { Forwarder, FrameRing, Pulse, connectTcp, sleep } from './forwarder.js';
import {
  FrameParser,
  FrameType,
  LinkHello,
  PayloadPool,
  StreamHeader,
  ToReceiver,
  bareFrame,
  frameFlagDeflate,
  frameFlagFinal,
  helloMac,
  jsonFrame,
  linkMac,
  macEqual,
  newNonce,
  payloadBuffer,
  payloadBytes,
  protocolVersion,
  releaseFrame,
  sameStream,
  welcomeMac,
  writeFrame,
  type Frame,
  type ToServer,
} from './protocol.js';
import { ProgressLine, RateMeter, fmtBytes, fmtEta, fmtRate } from './progress.js';
import { connectControlTls, createLinkTlsServer, linkPsk, type ClientTls } from './tls.js';
import { volumeInfo, writeFully, writevFully, zeros } from './volume.js';

const inflateRaw = promisify(inflateRawCb);

/** The static read buffer of a plain TCP data link (one read takes at most this much). */
const receiverReadBufferBytes = 256 * 1024;

export interface ReceiverLimits {
  /** Frames queued from the upstream before its socket is paused. */
  inQueueMaxBytes: number;
  /** Written but not yet forwarded bytes before this receiver stops taking data (back-pressure). */
  forwardLagMaxBytes: number;
  /** Recently received frames kept in memory for forwarding. */
  ringMaxBytes: number;
  /** fdatasync + state file every so many bytes (the rejoin point after a crash). */
  checkpointEveryBytes: number;
  ackEveryBytes: number;
  progressEveryMs: number;
  connectAttemptsMax: number;
  connectRetryDelayMs: number;
  challengeTimeoutMs: number;
  /** Waiting for the welcome (the server may still be hashing the source). */
  welcomeTimeoutMs: number;
  linkHelloTimeoutMs: number;
  /** Attempts to rejoin after losing the control connection mid-stream. */
  rejoinAttemptsMax: number;
}

export const defaultReceiverLimits: ReceiverLimits = {
  inQueueMaxBytes: 8 * 1024 * 1024,
  forwardLagMaxBytes: 64 * 1024 * 1024,
  ringMaxBytes: 16 * 1024 * 1024,
  checkpointEveryBytes: 32 * 1024 * 1024,
  ackEveryBytes: 4 * 1024 * 1024,
  progressEveryMs: 250,
  connectAttemptsMax: 10,
  connectRetryDelayMs: 500,
  challengeTimeoutMs: 5000,
  welcomeTimeoutMs: 30 * 60_000,
  linkHelloTimeoutMs: 5000,
  rejoinAttemptsMax: 20,
};

export interface ReceiverOptions {
  serverHost: string;
  serverPort: number;
  session: string;
  name: string;
  target: string;
  secret: string;
  /** Address the upstream should use to reach this receiver (default: as the server sees us). */
  dataHost: string | null;
  dataPort: number;
  /** Where the rejoin point is kept (default: TARGET.corral-clone.json, or /var/lib/corral for devices). */
  stateFile: string | null;
  /** The target is known to read as zeros (fresh disk/thin volume): zero blocks are not written. */
  targetZeroed: boolean;
  /** Testing and demos: cap this receiver's write rate. */
  throttleBps: number | null;
  /** --tls-fingerprint / --tls-ca: the control connection runs over TLS, and so do the data links. */
  tls: ClientTls | null;
  limits: ReceiverLimits;
  quiet: boolean;
}

export interface ReceiverResult {
  ok: boolean;
  sha256: string;
  expectedSha256: string;
  writtenBytes: number;
  resumedFromBytes: number;
}

const ResumeState = z.object({
  session: z.string(),
  sha256: z.string(),
  sizeBytes: z.number().int(),
  verifiedBytes: z.number().int().nonnegative(),
});
type ResumeState = z.infer<typeof ResumeState>;

function defaultStateFile(target: string, isBlockDevice: boolean): string {
  return isBlockDevice
    ? `/var/lib/corral/clone-${target.replace(/[^A-Za-z0-9]+/g, '_')}.json`
    : `${target}.corral-clone.json`;
}

async function readResumeState(path: string, h: StreamHeader): Promise<number> {
  let raw: string;
  try {
    raw = await readFile(path, 'utf8');
  } catch {
    return 0;
  }
  const r = ResumeState.safeParse(JSON.parse(raw));
  if (!r.success) return 0;
  const s = r.data;
  if (s.session !== h.session || s.sha256 !== h.sha256 || s.sizeBytes !== h.sizeBytes) return 0;
  return Math.min(s.verifiedBytes, h.sizeBytes);
}

async function writeResumeState(path: string, s: ResumeState): Promise<void> {
  const tmp = `${path}.tmp`;
  await writeFile(tmp, JSON.stringify(s));
  await rename(tmp, path);
}

export class Receiver {
  private readonly o: ReceiverOptions;
  private readonly progress: ProgressLine;
  private header: StreamHeader | null = null;
  private fh: FileHandle | null = null;
  private hash: ChunkedDigest | null = null;
  private checkpointing: Promise<void> | null = null;
  private writtenBytes = 0;
  private resumedFromBytes = 0;
  private lastCheckpointBytes = 0;
  private lastAckBytes = 0;
  private readonly written = new Pulse();
  private readonly ring: FrameRing;
  /** Buffers DATA payloads are received into (see PayloadPool), sized to the stream's chunks. */
  private readonly payloads: PayloadPool;
  private forwarder: Forwarder | null = null;
  private control: ControlConn<ToReceiver> | null = null;
  private dataServer: Server | null = null;
  private upstream: { sock: Socket; connId: number; gen: number; headerOk: boolean } | null = null;
  private connSeq = 0;
  private upstreamGen = -1;
  private queue: { connId: number; f: Frame }[] = [];
  private queuedBytes = 0;
  private processing = false;
  private idle = new Pulse();
  private blocked = false;
  private final: ReceiverResult | null = null;
  private finishResolve: ((r: ReceiverResult) => void) | null = null;
  private fail: ((e: Error) => void) | null = null;
  private readonly rate = new RateMeter();
  private rateBps = 0;
  private timers: NodeJS.Timeout[] = [];
  private stopped = false;
  private throttleStartMs = 0;
  private throttledBytes = 0;
  private sparseTarget = false;
  /** The target is open (and rehashed on a resume): links may be accepted. */
  private targetReady = false;
  private stateFile = '';

  constructor(o: ReceiverOptions) {
    this.o = o;
    this.ring = new FrameRing(o.limits.ringMaxBytes);
    // Enough for everything in flight: the inbound queue, the ring and the forward send queue.
    this.payloads = new PayloadPool(
      Math.ceil((o.limits.inQueueMaxBytes + o.limits.ringMaxBytes) / (1024 * 1024)) + 16,
    );
    this.progress = new ProgressLine(process.stderr, o.quiet);
  }

  private log(msg: string): void {
    this.progress.log(`clone receive ${this.o.name}: ${msg}`);
  }

  async run(): Promise<ReceiverResult> {
    const info = await volumeInfo(this.o.target);
    this.stateFile = this.o.stateFile ?? defaultStateFile(this.o.target, info.isBlockDevice);
    const dataPort = await this.listenData();
    try {
      const header = await this.join(dataPort, info.isBlockDevice ? info.sizeBytes : null);
      await this.openTarget(header, info.isBlockDevice);
      return await new Promise<ReceiverResult>((resolve, reject) => {
        this.finishResolve = resolve;
        this.fail = reject;
        this.startStreaming();
      });
    } finally {
      this.stop();
    }
  }

  private stop(): void {
    if (this.stopped) return;
    this.stopped = true;
    for (const t of this.timers) clearInterval(t);
    this.forwarder?.close();
    this.upstream?.sock.destroy();
    this.dataServer?.close();
    this.control?.close('receiver stopping');
    void this.fh?.close().catch(() => undefined);
    this.progress.done();
  }

  private listenData(): Promise<number> {
    return new Promise((resolve, reject) => {
      const srv = this.o.tls
        ? createLinkTlsServer(linkPsk(this.o.secret, this.o.session), (sock) => this.onDataConnection(sock))
        : createServer({ pauseOnConnect: true }, (raw) => this.onPlainDataConnection(raw));
      srv.once('error', (err) =>
        reject(new CloneTargetError(`--data-port ${this.o.dataPort}`, `cannot listen: ${err.message}`)),
      );
      srv.listen(this.o.dataPort, () => {
        this.dataServer = srv;
        const a = srv.address();
        resolve(typeof a === 'object' && a ? a.port : this.o.dataPort);
      });
    });
  }

  /** Connects, authenticates both ways, returns the checked stream header. */
  private async join(dataPort: number, targetBytes: number | null): Promise<StreamHeader> {
    const where = `${this.o.serverHost}:${this.o.serverPort}`;
    let sock: Socket | null = null;
    let lastErr = '';
    for (let i = 0; i < this.o.limits.connectAttemptsMax && !sock; i++) {
      try {
        sock = this.o.tls
          ? await connectControlTls(this.o.serverHost, this.o.serverPort, this.o.tls, 3000)
          : await connectTcp(this.o.serverHost, this.o.serverPort, 3000);
      } catch (err) {
        if (err instanceof CloneRefusedError) throw err;
        lastErr = (err as Error).message;
        await sleep(this.o.limits.connectRetryDelayMs);
      }
    }
    if (!sock) throw new CloneUnreachableError(`--server ${where}`, lastErr);
    sock.write(`corral-clone ${protocolVersion}\n`);
    const ctl = new ControlConn(sock, ToReceiver);
    this.control = ctl;
    const challenge = await ctl.next(this.o.limits.challengeTimeoutMs).catch((err: Error) => {
      throw new CloneUnreachableError(`--server ${where}`, err.message);
    });
    if (challenge.t === 'refused')
      throw new CloneRefusedError(
        challenge.code,
        `--server ${where} refused the connection: ${challenge.reason}`,
        challenge.code === 'tls'
          ? 'give --tls-fingerprint FP (printed by `corral clone serve --tls`) or --tls-ca FILE'
          : undefined,
      );
    if (challenge.t !== 'challenge')
      throw new CloneRefusedError('protocol', `--server ${where}: expected a challenge`);
    const clientNonce = newNonce();
    const hello: ToServer = {
      t: 'hello',
      v: protocolVersion,
      session: this.o.session,
      name: this.o.name,
      mac: helloMac(this.o.secret, challenge.nonce, this.o.session, this.o.name),
      clientNonce,
      dataPort,
      dataHost: this.o.dataHost,
      targetBytes,
    };
    ctl.send(hello);
    const reply = await ctl.next(this.o.limits.welcomeTimeoutMs).catch((err: Error) => {
      throw new CloneUnreachableError(`--server ${where}`, `no welcome: ${err.message}`);
    });
    if (reply.t === 'refused' && reply.code === 'target-too-small')
      throw new CloneTargetError(
        `--target ${this.o.target}`,
        `${reply.reason}; nothing was written`,
        'use a disk at least as large as the source',
      );
    if (reply.t === 'refused') {
      throw new CloneRefusedError(
        reply.code,
        `--server ${where} refused session '${this.o.session}': ${reply.reason}`,
        reply.code === 'auth'
          ? 'use the secret printed by `corral clone serve` (--secret-file on both sides)'
          : reply.code === 'session'
            ? 'give the session name the server was started with (--session)'
            : reply.code === 'tls'
              ? 'give --tls-fingerprint FP (printed by `corral clone serve --tls`) or --tls-ca FILE'
              : undefined,
      );
    }
    if (reply.t !== 'welcome')
      throw new CloneRefusedError('protocol', `--server ${where}: expected a welcome`);
    if (!macEqual(reply.serverMac, welcomeMac(this.o.secret, clientNonce, this.o.session)))
      throw new CloneRefusedError(
        'auth',
        `--server ${where} could not prove the session secret; nothing was written`,
        'the server is not the one you expect, or the secrets differ',
      );
    const h = reply.header;
    if (h.session !== this.o.session)
      throw new CloneRefusedError(
        'session',
        `stream header names session '${h.session}', not '${this.o.session}'`,
      );
    if (targetBytes !== null && targetBytes < h.sizeBytes) {
      const msg = `target is ${targetBytes} bytes, smaller than the source '${h.source}' (${h.sizeBytes} bytes)`;
      ctl.send({ t: 'failed', reason: msg } satisfies ToServer);
      throw new CloneTargetError(
        `--target ${this.o.target}`,
        `${msg}; nothing was written`,
        'use a disk at least as large as the source',
      );
    }
    this.header = h;
    this.payloads.capacityBytes = h.chunkBytes;
    this.hash ??= new ChunkedDigest(h.chunkBytes);
    return h;
  }

  private async openTarget(h: StreamHeader, isBlockDevice: boolean): Promise<void> {
    const resumeBytes = await readResumeState(this.stateFile, h);
    const flags = isBlockDevice ? fsc.O_RDWR | fsc.O_EXCL : fsc.O_RDWR | fsc.O_CREAT;
    try {
      this.fh = await open(this.o.target, flags, 0o644);
    } catch (err) {
      const e = err as NodeJS.ErrnoException;
      this.control?.send({ t: 'failed', reason: `cannot open target: ${e.message}` } satisfies ToServer);
      throw new CloneTargetError(
        `--target ${this.o.target}`,
        `cannot open for writing: ${e.message}`,
        e.code === 'EBUSY' ? 'the device is in use (mounted?): unmount it first' : undefined,
      );
    }
    // A regular file is made sparse and exactly the source's size; zero blocks then need no write.
    this.sparseTarget = !isBlockDevice || this.o.targetZeroed;
    if (resumeBytes > 0) {
      this.log(`resuming from ${fmtBytes(resumeBytes)} (rehashing what is already written)`);
      await digestRange(this.fh, resumeBytes, h.chunkBytes, this.hash!);
      if (!isBlockDevice) await this.fh.truncate(h.sizeBytes);
    } else if (!isBlockDevice) {
      await this.fh.truncate(0);
      await this.fh.truncate(h.sizeBytes);
    }
    this.writtenBytes = resumeBytes;
    this.resumedFromBytes = resumeBytes;
    this.lastCheckpointBytes = resumeBytes;
    this.lastAckBytes = resumeBytes;
  }

  private startStreaming(): void {
    const h = this.header!;
    this.forwarder = new Forwarder({
      self: this.o.name,
      secret: this.o.secret,
      header: h,
      fh: this.fh!,
      available: () => this.writtenBytes,
      written: this.written,
      ring: this.ring,
      used: null,
      linkPsk: this.o.tls ? linkPsk(this.o.secret, h.session) : null,
      throttleBps: null,
      log: (m) => this.log(m),
      onLinkFailed: (to, reason) => this.control?.send({ t: 'link-failed', to, reason } satisfies ToServer),
    });
    this.attachControl(this.control!);
    this.targetReady = true;
    this.control!.send({ t: 'ready', writtenBytes: this.writtenBytes } satisfies ToServer);
    this.timers.push(setInterval(() => this.tick(), this.o.limits.progressEveryMs));
    this.log(
      `joined session '${h.session}': ${h.source}, ${fmtBytes(h.sizeBytes)}, sha256 ${h.sha256.slice(0, 16)}...`,
    );
    if (this.writtenBytes >= h.sizeBytes) void this.finalize();
  }

  private attachControl(ctl: ControlConn<ToReceiver>): void {
    ctl.onMessage((m) => {
      if (m.t === 'route') {
        if (m.downstream)
          this.log(
            `forwarding to ${m.downstream.to} (${m.downstream.host}:${m.downstream.port}${this.o.tls ? ', TLS' : ''})`,
          );
        else if (this.forwarder?.downstream) this.log('end of the chain now');
        this.forwarder?.setRoute(m.downstream);
      } else if (m.t === 'finish') {
        if (this.final) this.finishResolve?.(this.final);
        else this.fail?.(new CloneTargetError(`--target ${this.o.target}`, `session ended: ${m.reason}`));
      }
    });
    ctl.onClose((reason) => {
      if (this.stopped || this.control !== ctl) return;
      if (this.final) {
        this.finishResolve?.(this.final);
        return;
      }
      this.log(`lost the server (${reason}); rejoining`);
      void this.rejoin();
    });
  }

  private async rejoin(): Promise<void> {
    this.forwarder?.setRoute(null);
    for (let i = 0; i < this.o.limits.rejoinAttemptsMax && !this.stopped; i++) {
      await sleep(this.o.limits.connectRetryDelayMs);
      try {
        const a = this.dataServer!.address();
        const port = typeof a === 'object' && a ? a.port : this.o.dataPort;
        const h = await this.join(port, null);
        const diff = sameStream(this.header!, h);
        if (diff) throw new CloneRefusedError('session', `the server now streams something else: ${diff}`);
        this.attachControl(this.control!);
        this.control!.send({ t: 'ready', writtenBytes: this.writtenBytes } satisfies ToServer);
        this.log(`rejoined at ${fmtBytes(this.writtenBytes)}`);
        if (this.final) this.sendDone();
        return;
      } catch (err) {
        if (err instanceof CloneRefusedError) {
          this.fail?.(err);
          return;
        }
      }
    }
    this.fail?.(
      new CloneUnreachableError(`--server ${this.o.serverHost}:${this.o.serverPort}`, 'rejoin failed'),
    );
  }

  private tick(): void {
    const h = this.header!;
    this.rateBps = this.rate.add(Date.now(), this.writtenBytes);
    this.control?.send({
      t: 'progress',
      writtenBytes: this.writtenBytes,
      rateBps: Math.round(this.rateBps),
      blocked: this.blocked,
      forwardTo: this.forwarder?.downstream ?? null,
      forwardAckBytes: this.forwarder?.ackBytes ?? 0,
    } satisfies ToServer);
    const pct = h.sizeBytes > 0 ? Math.floor((this.writtenBytes * 100) / h.sizeBytes) : 100;
    const fwd = this.forwarder?.downstream ? ` -> ${this.forwarder.downstream}` : '';
    this.progress.update(
      `${this.o.name}: ${fmtBytes(this.writtenBytes)}/${fmtBytes(h.sizeBytes)} ${pct}% ${fmtRate(this.rateBps)} ETA ${fmtEta(h.sizeBytes - this.writtenBytes, this.rateBps)}${fwd}${this.blocked ? ' (waiting for downstream)' : ''}`,
    );
  }

  // ---- data links ----

  /**
   * A plain TCP link reads into one static buffer (net.Socket's onread) instead of a fresh 64 KiB
   * ArrayBuffer per read: at a gigabit, those allocations alone make V8 run a full mark-compact
   * every ~20 MiB received. Node offers onread only to sockets it constructs, so the accepted
   * connection (paused, not read yet) hands its handle to a new Socket built with it. `_handle` and
   * the `handle` option are Node internals (used as Node 20 has them); every plain link of the
   * clone tests goes through here, so a Node that changes them fails those tests, not silently.
   */
  private onPlainDataConnection(raw: Socket): void {
    const r = raw as unknown as { _handle: unknown };
    const handle = r._handle;
    if (!handle) {
      raw.destroy();
      return;
    }
    r._handle = null;
    raw.destroy();
    let onChunk: ((d: Buffer) => void) | null = null;
    const sock = new Socket({
      handle,
      onread: {
        buffer: Buffer.allocUnsafeSlow(receiverReadBufferBytes),
        callback: (n: number, buf: Uint8Array) => {
          onChunk?.(Buffer.from(buf.buffer, buf.byteOffset, n));
          return true;
        },
      },
    } as unknown as ConstructorParameters<typeof Socket>[0]);
    onChunk = this.onDataConnection(sock, true);
  }

  /** Takes the frames of an upstream link; returns the chunk handler when the caller feeds it. */
  private onDataConnection(sock: Socket, staticReads = false): (d: Buffer) => void {
    sock.setNoDelay(true);
    const parser = new FrameParser(this.payloads, staticReads);
    let conn: { sock: Socket; connId: number; gen: number; headerOk: boolean } | null = null;
    const helloTimer = setTimeout(() => sock.destroy(), this.o.limits.linkHelloTimeoutMs);
    sock.on('error', () => undefined);
    sock.on('close', () => {
      clearTimeout(helloTimer);
      // this.upstream stays: frames it sent before closing (END) are still processed in order.
    });
    const onChunk = (d: Buffer) => {
      let frames: Frame[];
      try {
        frames = parser.push(d);
      } catch (err) {
        this.log(`dropping link from upstream: ${(err as Error).message}`);
        sock.destroy();
        return;
      }
      for (const f of frames) {
        if (!conn) {
          clearTimeout(helloTimer);
          conn = this.acceptLink(sock, f);
          if (!conn) return;
          continue;
        }
        this.queue.push({ connId: conn.connId, f });
        this.queuedBytes += payloadBytes(f);
      }
      if (this.queuedBytes > this.o.limits.inQueueMaxBytes) sock.pause();
      void this.processQueue();
    };
    if (!staticReads) sock.on('data', onChunk);
    return onChunk;
  }

  private reject(sock: Socket, reason: string): null {
    writeFrame(sock, jsonFrame(FrameType.reject, { reason }));
    sock.end();
    return null;
  }

  private acceptLink(
    sock: Socket,
    f: Frame,
  ): { sock: Socket; connId: number; gen: number; headerOk: boolean } | null {
    const h = this.header;
    if (f.type !== FrameType.hello || !h || this.stopped) return this.reject(sock, 'expected HELLO');
    if (!this.targetReady) return this.reject(sock, 'target not ready yet');
    let hello: LinkHello;
    try {
      hello = LinkHello.parse(JSON.parse(payloadBuffer(f).toString()));
    } catch {
      return this.reject(sock, 'bad HELLO');
    }
    if (hello.session !== h.session) return this.reject(sock, `wrong session '${hello.session}'`);
    if (hello.to !== this.o.name) return this.reject(sock, `this is ${this.o.name}, not ${hello.to}`);
    if (!macEqual(hello.mac, linkMac(this.o.secret, h.session, hello.from, hello.to, hello.gen)))
      return this.reject(sock, 'bad link MAC');
    if (hello.gen < this.upstreamGen) return this.reject(sock, `stale link generation ${hello.gen}`);
    // The newest upstream wins: drop the old link and whatever it had queued.
    this.upstreamGen = hello.gen;
    if (this.upstream && this.upstream.sock !== sock) this.upstream.sock.destroy();
    const conn = { sock, connId: ++this.connSeq, gen: hello.gen, headerOk: false };
    this.upstream = conn;
    sock.pause();
    void (async () => {
      while (this.processing) await this.idle.wait();
      this.dropStale();
      if (this.upstream !== conn) return;
      writeFrame(sock, bareFrame(FrameType.ready, this.writtenBytes));
      this.lastAckBytes = this.writtenBytes;
      sock.resume();
    })();
    return conn;
  }

  private dropStale(): void {
    const cur = this.upstream?.connId ?? -1;
    const keep = this.queue.filter((q) => q.connId === cur);
    for (const q of this.queue)
      if (q.connId !== cur) {
        this.queuedBytes -= payloadBytes(q.f);
        releaseFrame(q.f);
      }
    this.queue = keep;
  }

  private async processQueue(): Promise<void> {
    if (this.processing) return;
    this.processing = true;
    try {
      while (this.queue.length > 0 && !this.stopped) {
        const { connId, f } = this.queue.shift()!;
        this.queuedBytes -= payloadBytes(f);
        const conn = this.upstream;
        if (!conn || conn.connId !== connId) {
          releaseFrame(f);
          continue;
        }
        try {
          await this.apply(conn, f);
        } catch (err) {
          this.log(`dropping link from upstream: ${(err as Error).message}`);
          conn.sock.destroy();
        } finally {
          // Written and hashed (the ring holds it on its own if it keeps it).
          releaseFrame(f);
        }
        if (this.queuedBytes <= this.o.limits.inQueueMaxBytes / 2 && conn.sock.isPaused()) conn.sock.resume();
      }
    } finally {
      this.processing = false;
      this.idle.notify();
    }
  }

  private async waitForwardLag(): Promise<void> {
    const fwd = this.forwarder;
    while (
      fwd?.downstream &&
      this.writtenBytes - fwd.sentBytes > this.o.limits.forwardLagMaxBytes &&
      !this.stopped
    ) {
      this.blocked = true;
      await sleep(10);
    }
    this.blocked = false;
  }

  private async apply(conn: { sock: Socket; headerOk: boolean }, f: Frame): Promise<void> {
    const h = this.header!;
    if (f.type === FrameType.header) {
      let got: StreamHeader;
      try {
        got = StreamHeader.parse(JSON.parse(payloadBuffer(f).toString()));
      } catch {
        throw new Error('bad stream header');
      }
      const diff = sameStream(h, got);
      if (diff) {
        this.reject(conn.sock, `stream header does not match: ${diff}`);
        throw new Error(`refused a stream whose header does not match (${diff}); nothing written from it`);
      }
      conn.headerOk = true;
      return;
    }
    if (f.type === FrameType.end) {
      if (this.writtenBytes >= h.sizeBytes) {
        await this.finalize();
        this.ack(conn.sock, true);
      }
      return;
    }
    if (f.type !== FrameType.data && f.type !== FrameType.zero) return;
    if (!conn.headerOk) throw new Error('data before the stream header');
    const end = f.offset + f.lengthBytes;
    if (end > h.sizeBytes) throw new Error(`frame ends at ${end}, past the stream size ${h.sizeBytes}`);
    if (end <= this.writtenBytes) return;
    if (f.offset > this.writtenBytes)
      throw new Error(`gap: frame at ${f.offset}, expected ${this.writtenBytes}`);
    await this.waitForwardLag();
    const skip = this.writtenBytes - f.offset;
    if (f.type === FrameType.data) {
      let parts = f.payload;
      if (f.flags & frameFlagDeflate) parts = [await inflateRaw(payloadBuffer(f))];
      let got = 0;
      for (const p of parts) got += p.length;
      if (got !== f.lengthBytes)
        throw new Error(`frame at ${f.offset}: ${got} bytes, header says ${f.lengthBytes}`);
      if (skip > 0) parts = sliceParts(parts, skip);
      await writevFully(this.fh!, parts, this.writtenBytes);
      for (const p of parts) this.hash!.update(p);
    } else {
      const n = f.lengthBytes - skip;
      if (!this.sparseTarget)
        for (let done = 0; done < n;) {
          const piece = zeros(Math.min(h.chunkBytes, n - done));
          await writeFully(this.fh!, piece, this.writtenBytes + done);
          done += piece.length;
        }
      this.hash!.zeros(n);
    }
    this.writtenBytes = end;
    if (skip === 0) this.ring.put(f);
    this.written.notify();
    if (this.writtenBytes - this.lastAckBytes >= this.o.limits.ackEveryBytes) this.ack(conn.sock);
    // The rejoin point is synced in the background: writing goes on meanwhile (one sync at a time).
    if (
      this.writtenBytes - this.lastCheckpointBytes >= this.o.limits.checkpointEveryBytes &&
      !this.checkpointing
    )
      this.checkpointing = this.checkpoint().finally(() => (this.checkpointing = null));
    if (this.o.throttleBps) {
      if (this.throttleStartMs === 0) this.throttleStartMs = Date.now();
      this.throttledBytes += f.lengthBytes;
      const dueMs = (this.throttledBytes / this.o.throttleBps) * 1000 - (Date.now() - this.throttleStartMs);
      if (dueMs > 0) await sleep(dueMs);
    }
  }

  private ack(sock: Socket, final = false): void {
    this.lastAckBytes = this.writtenBytes;
    if (sock.destroyed) return;
    writeFrame(sock, bareFrame(FrameType.ack, this.writtenBytes, final ? frameFlagFinal : 0));
  }

  private async checkpoint(): Promise<void> {
    const h = this.header!;
    // Everything below this offset was written before the sync started: it is on disk after it.
    const upTo = this.writtenBytes;
    this.lastCheckpointBytes = upTo;
    try {
      await this.fh!.datasync();
      await writeResumeState(this.stateFile, {
        session: h.session,
        sha256: h.sha256,
        sizeBytes: h.sizeBytes,
        verifiedBytes: upTo,
      });
    } catch (err) {
      this.log(`cannot write the rejoin point ${this.stateFile}: ${(err as Error).message}`);
    }
  }

  private async finalize(): Promise<void> {
    if (this.final) return;
    const h = this.header!;
    await this.checkpointing;
    await this.fh!.datasync();
    const sha256 = this.hash!.digest();
    this.final = {
      ok: sha256 === h.sha256,
      sha256,
      expectedSha256: h.sha256,
      writtenBytes: this.writtenBytes,
      resumedFromBytes: this.resumedFromBytes,
    };
    if (this.final.ok) await rm(this.stateFile, { force: true });
    this.tick();
    this.progress.done();
    this.log(
      this.final.ok
        ? `verified: sha256 ${sha256} matches the source`
        : `MISMATCH: wrote sha256 ${sha256}, source has ${h.sha256}`,
    );
    this.sendDone();
  }

  private sendDone(): void {
    const f = this.final!;
    this.control?.send({
      t: 'done',
      sha256: f.sha256,
      ok: f.ok,
      writtenBytes: f.writtenBytes,
    } satisfies ToServer);
  }
}

/** The parts with the first skip bytes dropped. */
function sliceParts(parts: Buffer[], skip: number): Buffer[] {
  const out: Buffer[] = [];
  let left = skip;
  for (const p of parts) {
    if (left >= p.length) {
      left -= p.length;
      continue;
    }
    out.push(left > 0 ? p.subarray(left) : p);
    left = 0;
  }
  return out;
}

export function runReceiver(o: ReceiverOptions): Promise<ReceiverResult> {
  return new Receiver(o).run();
}
