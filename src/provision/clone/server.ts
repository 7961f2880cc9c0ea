// `corral clone serve`: the head of the chain and its coordinator.
//
// The server authenticates receivers, orders them into a chain, feeds the first one from the source
// (opened read-only) and keeps the chain whole: a receiver that dies or stalls is cut out and its
// upstream is routed to the next one (which answers with the offset it holds, so nothing is resent
// from zero); a receiver that falls more than slowLagMaxBytes behind its upstream is moved to the end;
// a receiver that comes back is appended to the end and catches up from its own resume point.
// A read-only status endpoint (HTTP GET /status) shares the port with the control protocol.
import { createServer, type Server, type Socket } from 'node:net';
import { basename } from 'node:path';
import {
  changedUpstreams,
  linksOf,
  moveToEnd,
  serverName,
  slowReceiver,
  without,
  type Links,
} from './chain.js';
import { ControlConn } from './control.js';
import { CloneError, CloneSourceError } from './errors.js';
import { Forwarder, Pulse } from './forwarder.js';
import {
  ToServer,
  helloMac,
  limits as protocolLimits,
  macEqual,
  newNonce,
  protocolVersion,
  welcomeMac,
  type Route,
  type StreamHeader,
  type ToReceiver,
} from './protocol.js';
import { ProgressLine, RateMeter, fmtBytes, fmtEta, fmtRate } from './progress.js';
import { ChunkReader, streamDigest, type UsedMap } from './source-reader.js';
import { acceptControlTls, linkPsk, type ServerTls } from './tls.js';
import { usedBlockMap } from './used-blocks.js';
import { currentSourceBytes, openSource, type SourceVolume } from './volume.js';

export interface ServerLimits {
  /** No heartbeat (or no progress while data was available) for this long: the receiver is cut out. */
  stallMs: number;
  /** A receiver this far behind its upstream is moved to the end of the chain. */
  slowLagMaxBytes: number;
  /** How many times one receiver may be moved to the end. */
  slowMovesMax: number;
  /** A receiver is not judged slow this soon after it got a new upstream. */
  slowGraceMs: number;
  /** Slow: receiving at less than this fraction of its upstream's rate. */
  slowRateFraction: number;
  /** After the others finish, how long a dead receiver may take to come back. */
  rejoinWaitMs: number;
  helloTimeoutMs: number;
  tickMs: number;
  statusRequestMaxBytes: number;
  receiversMax: number;
}

export const defaultServerLimits: ServerLimits = {
  stallMs: 3000,
  slowLagMaxBytes: 32 * 1024 * 1024,
  slowMovesMax: 2,
  slowGraceMs: 4000,
  slowRateFraction: 0.75,
  rejoinWaitMs: 10_000,
  helloTimeoutMs: 10_000,
  tickMs: 250,
  statusRequestMaxBytes: 8192,
  receiversMax: 1024,
};

export interface ServerOptions {
  source: string;
  expect: number;
  session: string;
  host: string;
  port: number;
  secret: string;
  /** Waiting for the expected receivers; at the deadline the stream starts with those present. */
  waitMs: number;
  chunkBytes: number;
  compress: 'none' | 'deflate';
  /** Send only the blocks the filesystem uses (partclone), when it can tell; else every non-zero block. */
  usedBlocks: boolean;
  /** --tls: the control port and every chain link run over TLS. */
  tls: ServerTls | null;
  throttleBps: number | null;
  limits: ServerLimits;
  quiet: boolean;
  /** Called once listening (the actual port, useful with port 0). */
  onListening?: (port: number) => void;
}

export type ReceiverState = 'joined' | 'streaming' | 'verified' | 'mismatch' | 'failed' | 'dead';

interface Entry {
  name: string;
  conn: ControlConn<ToServer> | null;
  host: string;
  dataPort: number;
  state: ReceiverState;
  writtenBytes: number;
  rateBps: number;
  blocked: boolean;
  forwardTo: string | null;
  lastHeardAtMs: number;
  lastAdvanceAtMs: number;
  joinedAtMs: number;
  finishedAtMs: number | null;
  deadAtMs: number | null;
  sha256: string | null;
  error: string | null;
  moves: number;
  joins: number;
  /** Said 'ready' (target open): may be put into the chain. */
  ready: boolean;
  routedAtMs: number;
  /** Best receiving rate seen (the reference for "slow"). */
  peakRateBps: number;
}

export interface ReceiverStatus {
  name: string;
  address: string;
  state: ReceiverState;
  position: number | null;
  writtenBytes: number;
  rateBps: number;
  etaS: number | null;
  verified: boolean;
  sha256: string | null;
  error: string | null;
  moves: number;
  joins: number;
  forwardTo: string | null;
}

export interface ServerStatus {
  session: string;
  source: string;
  sizeBytes: number;
  sha256: string | null;
  state: 'hashing' | 'waiting' | 'streaming' | 'finished';
  tls: boolean;
  /** With a used-block map (partclone): the filesystem, and the bytes it uses (the rest is sent as zeros). */
  usedBlocks: { fs: string; usedBytes: number } | null;
  expect: number;
  chain: string[];
  elapsedMs: number;
  receivers: ReceiverStatus[];
  events: string[];
}

export interface ServerResult {
  ok: boolean;
  status: ServerStatus;
}

const terminal = (s: ReceiverState) => s === 'verified' || s === 'mismatch' || s === 'failed';
const eventsMax = 200;

export class CloneServer {
  private readonly o: ServerOptions;
  private src: SourceVolume | null = null;
  private header: StreamHeader | null = null;
  private readonly hashed = new Pulse();
  private readonly entries = new Map<string, Entry>();
  private chain: string[] = [];
  private links: Links = new Map();
  private gen = 0;
  private forwarder: Forwarder | null = null;
  private srv: Server | null = null;
  private state: ServerStatus['state'] = 'hashing';
  private startedAtMs = Date.now();
  private timers: NodeJS.Timeout[] = [];
  private readonly progress: ProgressLine;
  private readonly events: string[] = [];
  private done: ((r: ServerResult) => void) | null = null;
  private failed: ((e: Error) => void) | null = null;
  private readonly serverRate = new RateMeter();
  private sourceProblem: string | null = null;
  private used: UsedMap | null = null;

  constructor(o: ServerOptions) {
    this.o = o;
    this.progress = new ProgressLine(process.stderr, o.quiet);
  }

  private log(msg: string): void {
    const line = `${new Date().toISOString()} ${msg}`;
    this.events.push(line);
    if (this.events.length > eventsMax) this.events.shift();
    this.progress.log(`clone serve: ${msg}`);
  }

  async run(): Promise<ServerResult> {
    this.src = await openSource(this.o.source);
    const src = this.src;
    try {
      const port = await this.listen();
      this.log(
        `listening on ${this.o.host}:${port}, session '${this.o.session}', source ${this.o.source} (${fmtBytes(src.sizeBytes)}), expecting ${this.o.expect} receiver(s)`,
      );
      this.o.onListening?.(port);
      if (this.o.usedBlocks) {
        this.used = await usedBlockMap(this.o.source, src.sizeBytes, (m) => this.log(m));
        if (this.used)
          this.log(
            `${this.used.fs} filesystem: sending the ${fmtBytes(this.used.usedBytes)} it uses of ${fmtBytes(src.sizeBytes)} (partclone's block map); unused blocks arrive as zeros`,
          );
      }
      const t0 = Date.now();
      const sha256 = await streamDigest(
        new ChunkReader(src.fh, this.o.chunkBytes, src.sizeBytes, this.used),
        src.sizeBytes,
        this.o.chunkBytes,
      );
      this.header = {
        v: protocolVersion,
        session: this.o.session,
        source: basename(this.o.source),
        sizeBytes: src.sizeBytes,
        sha256,
        chunkBytes: this.o.chunkBytes,
        compress: this.o.compress,
      };
      this.log(`source sha256 ${sha256} (${Date.now() - t0} ms)`);
      this.state = 'waiting';
      this.hashed.notify();
      return await new Promise<ServerResult>((resolve, reject) => {
        this.done = resolve;
        this.failed = reject;
        const waitDeadlineMs = Date.now() + this.o.waitMs;
        this.timers.push(setInterval(() => this.tick(waitDeadlineMs), this.o.limits.tickMs));
        this.maybeStart(false);
      });
    } finally {
      for (const t of this.timers) clearInterval(t);
      this.forwarder?.close();
      for (const e of this.entries.values()) e.conn?.close('server stopping');
      this.srv?.close();
      await src.fh.close().catch(() => undefined);
      this.progress.done();
    }
  }

  private listen(): Promise<number> {
    return new Promise((resolve, reject) => {
      const srv = createServer((sock) => this.onConnection(sock));
      srv.once('error', (err) =>
        reject(new CloneError('CORRAL_CLONE_LISTEN', `--port ${this.o.port}: ${err.message}`)),
      );
      srv.listen(this.o.port, this.o.host, () => {
        this.srv = srv;
        const a = srv.address();
        resolve(typeof a === 'object' && a ? a.port : this.o.port);
      });
    });
  }

  // ---- connections: sniff HTTP (status) or the control preamble ----

  private onConnection(sock: Socket, remote = sock.remoteAddress, secure = false): void {
    sock.on('error', () => undefined);
    const t = setTimeout(() => sock.destroy(), this.o.limits.helloTimeoutMs);
    let buf = Buffer.alloc(0);
    const onData = (d: Buffer) => {
      buf = Buffer.concat([buf, d]);
      if (!secure && buf[0] === 0x16) {
        // A TLS ClientHello.
        sock.off('data', onData);
        clearTimeout(t);
        if (!this.o.tls) {
          this.log(`refused a TLS connection from ${remote}: this session runs without --tls`);
          sock.destroy();
          return;
        }
        sock.pause();
        const tlsSock = acceptControlTls(sock, buf, this.o.tls);
        tlsSock.on('error', () => sock.destroy());
        this.onConnection(tlsSock, remote, true);
        return;
      }
      const text = buf.toString('latin1');
      if (/^(GET|HEAD|POST|PUT|DELETE|PATCH|OPTIONS) /.test(text)) {
        if (text.includes('\r\n\r\n')) {
          sock.off('data', onData);
          clearTimeout(t);
          this.serveHttp(sock, text);
        } else if (buf.length > this.o.limits.statusRequestMaxBytes) sock.destroy();
        return;
      }
      const nl = text.indexOf('\n');
      if (nl < 0) {
        if (buf.length > 64) sock.destroy();
        return;
      }
      sock.off('data', onData);
      clearTimeout(t);
      if (text.slice(0, nl) !== `corral-clone ${protocolVersion}`) {
        sock.end(
          `${JSON.stringify({ t: 'refused', code: 'protocol', reason: 'not a corral clone client (version?)' })}\n`,
        );
        return;
      }
      if (this.o.tls && !secure) {
        this.log(`refused ${remote}: a receiver without TLS on a --tls session`);
        sock.end(`${JSON.stringify({ t: 'refused', code: 'tls', reason: 'this session runs over TLS' })}\n`);
        return;
      }
      const rest = buf.subarray(nl + 1);
      if (rest.length > 0) sock.unshift(rest);
      void this.onControl(sock, remote);
    };
    sock.on('data', onData);
  }

  private serveHttp(sock: Socket, request: string): void {
    const [method, path] = request.split(' ');
    let code = 200;
    let body: string;
    if (method !== 'GET' && method !== 'HEAD') {
      code = 405;
      body = JSON.stringify({ error: 'the status endpoint is read-only: GET /status' });
    } else if (path === '/status' || path === '/') body = JSON.stringify(this.status());
    else {
      code = 404;
      body = JSON.stringify({ error: `no ${path}: GET /status` });
    }
    const reason = code === 200 ? 'OK' : code === 404 ? 'Not Found' : 'Method Not Allowed';
    const b = Buffer.from(body);
    sock.end(
      Buffer.concat([
        Buffer.from(
          `HTTP/1.1 ${code} ${reason}\r\nContent-Type: application/json\r\nContent-Length: ${b.length}\r\n${code === 405 ? 'Allow: GET\r\n' : ''}Cache-Control: no-store\r\nConnection: close\r\n\r\n`,
        ),
        method === 'HEAD' ? Buffer.alloc(0) : b,
      ]),
    );
  }

  private async onControl(sock: Socket, remote: string | undefined): Promise<void> {
    const ctl = new ControlConn(sock, ToServer);
    const nonce = newNonce();
    ctl.send({ t: 'challenge', v: protocolVersion, nonce } satisfies ToReceiver);
    const refuse = (code: string, reason: string) => {
      ctl.send({ t: 'refused', code, reason } satisfies ToReceiver);
      ctl.close(reason);
    };
    let hello: ToServer;
    try {
      hello = await ctl.next(this.o.limits.helloTimeoutMs);
    } catch {
      ctl.close('no hello');
      return;
    }
    if (hello.t !== 'hello') return refuse('protocol', 'expected hello');
    const who = `${hello.name} (${remote})`;
    if (hello.session !== this.o.session) {
      this.log(`refused ${who}: wrong session '${hello.session}'`);
      return refuse('session', `this server runs session '${this.o.session}', not '${hello.session}'`);
    }
    if (!macEqual(hello.mac, helloMac(this.o.secret, nonce, hello.session, hello.name))) {
      this.log(`refused ${who}: bad secret`);
      return refuse('auth', 'authentication failed (wrong secret)');
    }
    if (this.state === 'finished') return refuse('finished', 'the session has finished');
    const existing = this.entries.get(hello.name);
    if (!existing && this.entries.size >= this.o.limits.receiversMax)
      return refuse('full', `at most ${this.o.limits.receiversMax} receivers`);
    while (!this.header) await this.hashed.wait();
    if (ctl.isClosed) return;
    const header = this.header;
    if (hello.targetBytes !== null && hello.targetBytes < header.sizeBytes) {
      const reason = `target is ${hello.targetBytes} bytes, smaller than the source '${header.source}' (${header.sizeBytes} bytes)`;
      this.log(`refused ${who}: ${reason}`);
      const now = Date.now();
      if (!existing)
        this.entries.set(hello.name, { ...this.newEntry(hello.name, now), state: 'failed', error: reason });
      this.checkFinished();
      return refuse('target-too-small', reason);
    }
    const now = Date.now();
    const e: Entry = existing ?? this.newEntry(hello.name, now);
    if (existing?.conn && existing.conn !== ctl) existing.conn.close('replaced by a new connection');
    e.conn = ctl;
    e.host = hello.dataHost ?? (remote ?? '127.0.0.1').replace(/^::ffff:/, '');
    e.dataPort = hello.dataPort;
    e.lastHeardAtMs = now;
    e.lastAdvanceAtMs = now;
    e.joins++;
    if (existing) {
      e.state = this.state === 'streaming' ? 'streaming' : 'joined';
      e.deadAtMs = null;
      e.error = null;
      e.sha256 = null;
    }
    this.entries.set(e.name, e);
    ctl.send({
      t: 'welcome',
      header,
      serverMac: welcomeMac(this.o.secret, hello.clientNonce, this.o.session),
    } satisfies ToReceiver);
    // Nobody routes to it until it says its target is ready (a resume may rehash for a while).
    e.ready = false;
    if (this.chain.includes(e.name)) this.setChain(without(this.chain, e.name));
    ctl.onMessage((m) => this.onMessage(e, ctl, m));
    ctl.onClose((reason) => this.onControlClosed(e, ctl, reason));
    this.log(`${existing ? 'rejoined' : 'joined'}: ${who}, data ${e.host}:${e.dataPort}`);
  }

  private onReady(e: Entry, writtenBytes: number): void {
    e.ready = true;
    e.writtenBytes = writtenBytes;
    e.lastAdvanceAtMs = Date.now();
    if (this.state === 'streaming') {
      // A late or returning receiver goes to the end and catches up from what it holds.
      if (e.state === 'joined') e.state = 'streaming';
      if (e.state === 'streaming' || e.state === 'verified')
        this.setChain([...without(this.chain, e.name), e.name]);
    } else this.maybeStart(false);
  }

  private newEntry(name: string, now: number): Entry {
    return {
      name,
      conn: null,
      host: '',
      dataPort: 0,
      state: 'joined',
      writtenBytes: 0,
      rateBps: 0,
      blocked: false,
      forwardTo: null,
      lastHeardAtMs: now,
      lastAdvanceAtMs: now,
      joinedAtMs: now,
      finishedAtMs: null,
      deadAtMs: null,
      sha256: null,
      error: null,
      moves: 0,
      joins: 0,
      ready: false,
      routedAtMs: now,
      peakRateBps: 0,
    };
  }

  private onMessage(e: Entry, ctl: ControlConn<ToServer>, m: ToServer): void {
    if (e.conn !== ctl) return;
    const now = Date.now();
    e.lastHeardAtMs = now;
    switch (m.t) {
      case 'ready':
        this.onReady(e, m.writtenBytes);
        return;
      case 'progress':
        if (m.writtenBytes > e.writtenBytes || m.blocked) e.lastAdvanceAtMs = now;
        e.writtenBytes = m.writtenBytes;
        e.rateBps = m.rateBps;
        e.peakRateBps = Math.max(e.peakRateBps, m.rateBps);
        e.blocked = m.blocked;
        e.forwardTo = m.forwardTo;
        return;
      case 'done':
        e.writtenBytes = m.writtenBytes;
        e.sha256 = m.sha256;
        e.finishedAtMs = now;
        e.state = m.ok && m.sha256 === this.header?.sha256 ? 'verified' : 'mismatch';
        this.log(
          e.state === 'verified'
            ? `${e.name}: verified (sha256 matches)`
            : `${e.name}: CHECKSUM MISMATCH (${m.sha256} != ${this.header?.sha256})`,
        );
        this.checkFinished();
        return;
      case 'failed':
        e.state = 'failed';
        e.error = m.reason;
        this.log(`${e.name}: failed: ${m.reason}`);
        this.setChain(without(this.chain, e.name));
        this.checkFinished();
        return;
      case 'link-failed': {
        const to = this.entries.get(m.to);
        if (to && this.links.get(e.name) === m.to && to.state === 'streaming')
          this.declareDead(to, `unreachable on its data port from ${e.name}: ${m.reason}`);
        return;
      }
      case 'hello':
        return;
    }
  }

  private onControlClosed(e: Entry, ctl: ControlConn<ToServer>, reason: string): void {
    if (e.conn !== ctl) return;
    e.conn = null;
    if (e.state === 'joined' || e.state === 'streaming') this.declareDead(e, `connection lost (${reason})`);
    else if (this.chain.includes(e.name)) this.setChain(without(this.chain, e.name));
  }

  private declareDead(e: Entry, reason: string): void {
    if (e.state === 'dead' || terminal(e.state)) return;
    const before = [serverName, ...this.chain];
    const i = before.indexOf(e.name);
    e.state = 'dead';
    e.deadAtMs = Date.now();
    e.error = reason;
    const conn = e.conn;
    e.conn = null;
    conn?.close(reason);
    if (i > 0) {
      const up = before[i - 1]!;
      const down = before[i + 1] ?? null;
      this.log(`${e.name} is dead (${reason}); routing ${up} -> ${down ?? '(end)'}`);
    } else this.log(`${e.name} is dead (${reason})`);
    this.setChain(without(this.chain, e.name));
    this.checkFinished();
  }

  // ---- the chain ----

  private setChain(next: string[]): void {
    const links = linksOf(next);
    const now = Date.now();
    for (const up of changedUpstreams(this.links, links)) {
      const down = links.get(up) ?? null;
      let route: Route | null = null;
      if (down) {
        const d = this.entries.get(down)!;
        d.lastAdvanceAtMs = now;
        d.routedAtMs = now;
        route = { to: down, host: d.host, port: d.dataPort, gen: ++this.gen };
      }
      if (up === serverName) this.forwarder?.setRoute(route);
      else this.entries.get(up)?.conn?.send({ t: 'route', downstream: route } satisfies ToReceiver);
    }
    this.chain = next;
    this.links = links;
  }

  private maybeStart(deadlinePassed: boolean): void {
    if (this.state !== 'waiting' || !this.header || !this.src) return;
    const ready = [...this.entries.values()].filter((e) => e.state === 'joined' && e.conn && e.ready);
    const refused = [...this.entries.values()].filter((e) => e.state === 'failed').length;
    if (ready.length === 0 || (ready.length + refused < this.o.expect && !deadlinePassed)) return;
    if (ready.length < this.o.expect)
      this.log(`only ${ready.length} of ${this.o.expect} receiver(s) joined in time; starting with them`);
    this.state = 'streaming';
    this.startedAtMs = Date.now();
    for (const e of ready) e.state = 'streaming';
    const src = this.src;
    this.forwarder = new Forwarder({
      self: serverName,
      secret: this.o.secret,
      header: this.header,
      fh: src.fh,
      available: () => src.sizeBytes,
      written: new Pulse(),
      ring: null,
      used: this.used,
      linkPsk: this.o.tls ? linkPsk(this.o.secret, this.o.session) : null,
      throttleBps: this.o.throttleBps,
      log: (m) => this.log(m),
      onLinkFailed: (to, reason) => {
        const d = this.entries.get(to);
        if (d && this.links.get(serverName) === to)
          this.declareDead(d, `unreachable on its data port: ${reason}`);
      },
    });
    const order = ready.sort((a, b) => a.joinedAtMs - b.joinedAtMs).map((e) => e.name);
    this.log(`streaming through the chain: ${[serverName, ...order].join(' -> ')}`);
    this.setChain(order);
  }

  private tick(waitDeadlineMs: number): void {
    const now = Date.now();
    if (this.state === 'waiting') {
      if (now >= waitDeadlineMs) {
        const present = [...this.entries.values()].filter((e) => e.conn).length;
        if (present === 0) {
          this.failed?.(
            new CloneError(
              'CORRAL_CLONE_NO_RECEIVERS',
              `session '${this.o.session}': no receiver joined within ${this.o.waitMs} ms`,
              'start `corral clone receive` on the targets, or raise --timeout-ms',
            ),
          );
          return;
        }
        this.maybeStart(true);
      }
      return;
    }
    if (this.state !== 'streaming') return;
    const size = this.header!.sizeBytes;
    for (const name of this.chain) {
      const e = this.entries.get(name)!;
      if (e.state !== 'streaming') continue;
      if (now - e.lastHeardAtMs > this.o.limits.stallMs) {
        this.declareDead(e, `stalled: no heartbeat for ${now - e.lastHeardAtMs} ms`);
        return;
      }
      const i = this.chain.indexOf(name);
      const upBytes = i === 0 ? size : (this.entries.get(this.chain[i - 1]!)?.writtenBytes ?? 0);
      if (upBytes > e.writtenBytes && now - e.lastAdvanceAtMs > this.o.limits.stallMs) {
        this.declareDead(e, `stalled: no progress for ${now - e.lastAdvanceAtMs} ms`);
        return;
      }
    }
    const views = this.chain.map((n) => {
      const e = this.entries.get(n)!;
      return {
        name: n,
        writtenBytes: e.writtenBytes,
        rateBps: e.state === 'streaming' ? e.rateBps : 0,
        blocked: e.blocked,
        moves: e.moves,
        sinceRouteMs: now - e.routedAtMs,
      };
    });
    const referenceRateBps = Math.max(0, ...[...this.entries.values()].map((e) => e.peakRateBps));
    const slow = slowReceiver(views, size, referenceRateBps, {
      lagMaxBytes: this.o.limits.slowLagMaxBytes,
      movesMax: this.o.limits.slowMovesMax,
      graceMs: this.o.limits.slowGraceMs,
      rateFraction: this.o.limits.slowRateFraction,
    });
    if (slow) {
      const e = this.entries.get(slow)!;
      e.moves++;
      this.log(
        `${slow} is more than ${fmtBytes(this.o.limits.slowLagMaxBytes)} behind its upstream; moving it to the end`,
      );
      this.setChain(moveToEnd(this.chain, slow));
    }
    this.checkFinished();
    this.drawProgress();
  }

  private drawProgress(): void {
    const size = this.header!.sizeBytes;
    const live = [...this.entries.values()].filter((e) => e.state === 'streaming' || terminal(e.state));
    const minBytes = live.length ? Math.min(...live.map((e) => e.writtenBytes)) : 0;
    const rate = this.serverRate.add(Date.now(), this.forwarder?.totalSentBytes ?? 0);
    const parts = [...this.entries.values()].map(
      (e) =>
        `${e.name} ${size ? Math.floor((e.writtenBytes * 100) / size) : 100}%${e.state === 'streaming' ? '' : ` ${e.state}`}`,
    );
    this.progress.update(
      `serve: slowest ${fmtBytes(minBytes)}/${fmtBytes(size)} ETA ${fmtEta(size - minBytes, Math.min(...live.map((e) => e.rateBps || 0), Infinity))}, source out ${fmtRate(rate)} | ${parts.join(' | ')}`,
    );
  }

  private checkFinished(): void {
    if (this.state !== 'streaming') return;
    const now = Date.now();
    const all = [...this.entries.values()];
    const pending = all.filter(
      (e) =>
        !terminal(e.state) &&
        !(e.state === 'dead' && now - (e.deadAtMs ?? now) >= this.o.limits.rejoinWaitMs),
    );
    if (pending.length > 0) return;
    // Every receiver is verified, failed, or dead past the rejoin wait.
    void this.finish();
  }

  private async finish(): Promise<void> {
    if (this.state === 'finished') return;
    this.state = 'finished';
    const src = this.src!;
    const nowBytes = await currentSourceBytes(src).catch(() => src.sizeBytes);
    if (nowBytes !== src.sizeBytes)
      this.sourceProblem = `the source changed size during the stream (${src.sizeBytes} -> ${nowBytes} bytes)`;
    const status = this.status();
    const ok =
      status.receivers.length > 0 && status.receivers.every((r) => r.verified) && !this.sourceProblem;
    for (const e of this.entries.values())
      e.conn?.send({
        t: 'finish',
        reason: ok ? 'all receivers verified' : 'session over',
      } satisfies ToReceiver);
    this.progress.done();
    const elapsedS = (Date.now() - this.startedAtMs) / 1000;
    this.log(
      `finished in ${elapsedS.toFixed(1)} s: ${status.receivers.filter((r) => r.verified).length}/${status.receivers.length} verified`,
    );
    for (const r of status.receivers)
      this.progress.log(
        `  ${r.name.padEnd(16)} ${r.state.padEnd(9)} ${fmtBytes(r.writtenBytes).padStart(10)}  ${r.error ?? (r.sha256 ? `sha256 ${r.sha256}` : '')}`,
      );
    if (this.sourceProblem) {
      this.log(this.sourceProblem);
      this.failed?.(
        new CloneSourceError(
          `--source ${this.o.source}`,
          this.sourceProblem,
          'clone from a source nothing writes to (unmounted, or a snapshot)',
        ),
      );
      return;
    }
    // Let the finish messages flush before the connections close.
    setTimeout(() => this.done?.({ ok, status }), 200);
  }

  status(): ServerStatus {
    const size = this.src?.sizeBytes ?? 0;
    const receivers = [...this.entries.values()].map((e): ReceiverStatus => {
      const pos = this.chain.indexOf(e.name);
      return {
        name: e.name,
        address: `${e.host}:${e.dataPort}`,
        state: e.state,
        position: pos >= 0 ? pos + 1 : null,
        writtenBytes: e.writtenBytes,
        rateBps: e.rateBps,
        etaS:
          e.state === 'streaming' && e.rateBps > 0 ? Math.ceil((size - e.writtenBytes) / e.rateBps) : null,
        verified: e.state === 'verified',
        sha256: e.sha256,
        error: e.error,
        moves: e.moves,
        joins: e.joins,
        forwardTo: e.forwardTo,
      };
    });
    return {
      session: this.o.session,
      source: this.o.source,
      sizeBytes: size,
      sha256: this.header?.sha256 ?? null,
      state: this.state,
      tls: this.o.tls !== null,
      usedBlocks: this.used ? { fs: this.used.fs, usedBytes: this.used.usedBytes } : null,
      expect: this.o.expect,
      chain: [...this.chain],
      elapsedMs: Date.now() - this.startedAtMs,
      receivers,
      events: this.events.slice(-20),
    };
  }
}

export function runServer(o: ServerOptions): Promise<ServerResult> {
  if (o.secret.length < protocolLimits.secretMinChars)
    throw new CloneError(
      'CORRAL_CLONE_SECRET',
      `the session secret is shorter than ${protocolLimits.secretMinChars} characters`,
      'use a longer secret, or let serve generate one',
    );
  return new CloneServer(o).run();
}
