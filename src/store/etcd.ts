// The etcd:// Store backend: a real etcd v3 cluster through the `etcd3` client's low-level
// RPC clients (KV, Lease, Watch), with Corral's own endpoint rotation, per-call deadlines,
// explicit one-shot lease keep-alives and resumable watches.
//
// Mapping to the Store contract (src/store/types.ts):
// - Revisions: a fresh etcd starts at revision 1 and its first write is 2; the contract says
//   the first write is 1. Every revision crossing this file is shifted by one
//   (storeRev = etcdRev - 1), so both backends count alike; etcdctl shows one more.
// - A value compare on a missing key: etcd always fails it, the contract sees ''. Compares
//   that differ (== '', != x, < x) become nested etcd txns branching on version == 0.
// - Lease TTLs are whole seconds on etcd: grant rounds ms up; etcd may raise a TTL to its
//   minimum (1.5 election timeouts), leaseInfo reports what etcd granted. Lease IDs are
//   chosen here (random, below 2^53) so they survive as JS numbers.
// - Failover: calls go to one member; when it is unreachable the next member is used.
//   Reads and idempotent calls are retried on the next member within the call's deadline;
//   writes are retried only when the request surely never left (no connection), otherwise
//   they fail with CORRAL_STORE_UNAVAILABLE (outcome unknown: read back before retrying).
// - Watches resume on another member from the last delivered revision + 1, deduplicated.
import { randomBytes } from 'node:crypto';
import {
  Etcd3,
  castGrpcError,
  KVClient,
  LeaseClient,
  WatchClient,
  type ICallable,
  type ICompare,
  type IDuplexStream,
  type IKeyValue,
  type ILeaseKeepAliveRequest,
  type ILeaseKeepAliveResponse,
  type IOptions,
  type IRequestOp,
  type IResponseOp,
  type ITxnRequest,
  type ITxnResponse,
  type IWatchRequest,
  type IWatchResponse,
} from 'etcd3';
import { invariant } from '../core/errors.js';
import {
  StoreError,
  storeOpTimeoutMsDefault,
  type Compare,
  type KeyValue,
  type LeaseInfo,
  type RangeResult,
  type Store,
  type StoreErrorCode,
  type StoreOptions,
  type TxnOp,
  type TxnOpResult,
  type TxnRequest,
  type TxnResult,
  type WatchEvent,
  type Watcher,
  type WatchOptions,
} from './types.js';

/** value compares whose missing-key meaning differs from etcd's; each doubles the txn tree */
export const etcdMissingValueComparesMax = 4;
/** pause before trying the member list again after every member failed once */
const etcdRetryPauseMs = 50;
/** a call never spends less than this on one member before trying the next */
const etcdAttemptMinMs = 250;
/** a watch whose members all fail for this long ends with CORRAL_STORE_UNAVAILABLE */
export const etcdWatchResumeWindowMs = 30_000;
/** backoff between watch resume attempts */
const etcdWatchResumeBackoffMinMs = 25;
const etcdWatchResumeBackoffMaxMs = 1000;
/** largest gRPC message accepted (a catch-up watch batch can hold many large values) */
const etcdGrpcMessageMaxBytes = 256 * 1024 * 1024;
/** leases whose last grant/keep-alive time this client remembers (refines etcd's whole seconds) */
const etcdLeaseClocksMax = 10_000;
/** lease ids are chosen below 2^53 so they stay exact as JS numbers; retries on a collision */
const etcdLeaseIdAttemptsMax = 3;

/** client-side options for one etcd endpoint: no hidden retries, no circuit breaker */
export function etcdClientOptions(endpoint: string): IOptions {
  return {
    hosts: `http://${endpoint}`,
    faultHandling: { host: () => noRetryPolicy, global: noRetryPolicy },
    grpcOptions: {
      'grpc.max_receive_message_length': etcdGrpcMessageMaxBytes,
      'grpc.max_send_message_length': etcdGrpcMessageMaxBytes,
    },
  };
}

type Policy = NonNullable<NonNullable<IOptions['faultHandling']>['global']>;
const noDisposable = { dispose: () => {} };
/** cockatiel's no-op policy, written out so Corral does not depend on cockatiel directly */
const noRetryPolicy = {
  execute: async (fn: (ctx: { signal: AbortSignal }) => unknown) =>
    fn({ signal: new AbortController().signal }),
  onSuccess: () => noDisposable,
  onFailure: () => noDisposable,
} as unknown as Policy;

// ---------------------------------------------------------------- revisions and bytes

/** etcd revision -> store revision */
const fromEtcdRev = (r: string | number): number => Math.max(0, Number(r) - 1);
/** store revision -> etcd revision; 0 and below stay (they mean "missing" in compares) */
const toEtcdRev = (r: number): number => (r >= 1 ? r + 1 : r);

const NUL = Buffer.from([0]);

/** the etcd range_end covering every key that starts with prefix ('' = all keys) */
export function prefixRangeEnd(prefix: Buffer): Buffer {
  const end = Buffer.from(prefix);
  for (let i = end.length - 1; i >= 0; i--) {
    if (end[i]! < 0xff) {
      end[i] = end[i]! + 1;
      return end.subarray(0, i + 1);
    }
  }
  return NUL;
}

function prefixRange(prefix: string): { key: Buffer; range_end: Buffer } {
  if (prefix === '') return { key: NUL, range_end: NUL };
  const key = Buffer.from(prefix, 'utf8');
  return { key, range_end: prefixRangeEnd(key) };
}

function toKv(kv: IKeyValue): KeyValue {
  return {
    key: kv.key.toString('utf8'),
    value: kv.value ? kv.value.toString('utf8') : '',
    createRevision: fromEtcdRev(kv.create_revision),
    modRevision: fromEtcdRev(kv.mod_revision),
    version: Number(kv.version),
    lease: Number(kv.lease),
  };
}

// ---------------------------------------------------------------- errors

interface Classified {
  err: StoreError;
  /** the request surely never reached a member: any call may be retried elsewhere */
  notSent: boolean;
  /** the member (or the path to it) failed: try the next member */
  memberFault: boolean;
}

function errText(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}

/** grpc status codes (numbers) used below */
const grpcCode = {
  CANCELLED: 1,
  INVALID_ARGUMENT: 3,
  DEADLINE_EXCEEDED: 4,
  NOT_FOUND: 5,
  FAILED_PRECONDITION: 9,
  OUT_OF_RANGE: 11,
  UNAVAILABLE: 14,
} as const;

/** maps a gRPC / etcd3 error to a StoreError, and says whether another member may help */
export function classifyEtcdError(e: unknown, where: string): Classified {
  if (e instanceof StoreError)
    return { err: e, notSent: false, memberFault: e.code === 'CORRAL_STORE_TIMEOUT' };
  const msg = errText(e);
  const code = typeof e === 'object' && e !== null && 'code' in e ? (e as { code: unknown }).code : undefined;
  const name = e instanceof Error ? e.constructor.name : '';
  // etcd3 rewrites messages ("Lease 5 NOT_FOUND: etcdserver: ..."): keep etcd's own words
  // and gRPC's "14 UNAVAILABLE: No connection established. Last error: Error: connect ...": the cause
  const said =
    /etcdserver: .*/.exec(msg)?.[0].replace(/ is expired or revoked$/, '') ??
    /Last error: (?:Error: )?(.*?)\.? Resolution note/.exec(msg)?.[1] ??
    msg.replace(/^\d+ [A-Z_]+: /, '');
  const mk = (c: StoreErrorCode, hint: string, notSent = false, memberFault = false): Classified => ({
    err: new StoreError(c, `${where}: ${said}`, hint),
    notSent,
    memberFault,
  });
  if (/lease not found|requested lease not found/i.test(msg)) {
    return mk('CORRAL_STORE_LEASE_NOT_FOUND', 'the lease expired or was revoked; grant a new one');
  }
  if (/required revision has been compacted/i.test(msg)) {
    return mk('CORRAL_STORE_COMPACTED', 'that revision was compacted; read the current state instead');
  }
  if (
    /future revision|duplicate key|too many operations|key is not provided|request is too large/i.test(msg)
  ) {
    return mk('CORRAL_STORE_BAD_REQUEST', 'fix the request (etcd rejected it)');
  }
  if (/No connection established|no connection available|ECONNREFUSED|Client was closed/i.test(msg)) {
    return mk('CORRAL_STORE_UNAVAILABLE', 'check that the etcd members are running', true, true);
  }
  if (/etcdserver: no leader/i.test(msg)) {
    return mk('CORRAL_STORE_UNAVAILABLE', 'the etcd member has no leader (quorum lost?)', true, true);
  }
  if (
    code === grpcCode.DEADLINE_EXCEEDED ||
    /deadline exceeded|request timed out/i.test(msg) ||
    name.includes('Deadline')
  ) {
    return mk(
      'CORRAL_STORE_TIMEOUT',
      'etcd did not answer in time; check member health and load',
      false,
      true,
    );
  }
  if (
    code === grpcCode.UNAVAILABLE ||
    code === grpcCode.CANCELLED ||
    name.includes('Unavailable') ||
    name.includes('Cancelled') ||
    /leader changed|unavailable|connection|ECONNRESET|socket|stream removed|GOAWAY/i.test(msg)
  ) {
    return mk(
      'CORRAL_STORE_UNAVAILABLE',
      'the etcd member went away mid-call; the outcome is unknown, read back before retrying',
      false,
      true,
    );
  }
  if (
    code === grpcCode.INVALID_ARGUMENT ||
    code === grpcCode.OUT_OF_RANGE ||
    code === grpcCode.FAILED_PRECONDITION ||
    name.includes('InvalidArgument') ||
    name.includes('OutOfRange')
  ) {
    return mk('CORRAL_STORE_BAD_REQUEST', 'fix the request (etcd rejected it)');
  }
  return mk('CORRAL_STORE_UNAVAILABLE', 'unexpected etcd error; check the etcd members', false, true);
}

function timeoutError(where: string, ms: number): StoreError {
  return new StoreError(
    'CORRAL_STORE_TIMEOUT',
    `${where}: no answer from etcd within ${ms} ms`,
    'check that the etcd members are running and reachable (StoreOptions.opTimeoutMs sets this bound)',
  );
}

async function withDeadline<T>(p: Promise<T>, ms: number, where: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([
      p,
      new Promise<T>((_, reject) => {
        timer = setTimeout(() => reject(timeoutError(where, ms)), ms);
      }),
    ]);
  } finally {
    clearTimeout(timer);
  }
}

// ---------------------------------------------------------------- members

type UnaryRpc<R> = (
  params: unknown,
  metadata: unknown,
  options: object,
  cb: (err: (Error & { code?: number }) | null, res?: R) => void,
) => void;

type KeepAliveStream = IDuplexStream<ILeaseKeepAliveRequest, ILeaseKeepAliveResponse>;

interface PendingKeepAlive {
  id: string;
  resolve: (ttlS: number) => void;
  reject: (e: unknown) => void;
}

/** one etcd endpoint: its own etcd3 client (one host, no hidden retries) */
class Member {
  readonly client: Etcd3;
  readonly kv: KVClient;
  readonly lease: LeaseClient;
  /** every call asks the member to fail it at once ("no leader") while it has no leader */
  readonly watchClient: WatchClient;
  private keepAliveStream: KeepAliveStream | undefined;
  private keepAlivePending: PendingKeepAlive[] = [];

  constructor(readonly endpoint: string) {
    this.client = new Etcd3(etcdClientOptions(endpoint));
    // the client's connection pool (one host here), reached past its `protected` to add metadata
    const pool = (this.client as unknown as { pool?: ICallable<unknown> }).pool;
    invariant(
      pool && typeof pool.withConnection === 'function',
      'etcd3 client without a connection pool: etcd3 version not supported (1.1.x expected)',
    );
    const withLeader = <R>(
      service: Parameters<ICallable<unknown>['withConnection']>[0],
      fn: Parameters<ICallable<unknown>['withConnection']>[1],
    ): Promise<R> =>
      pool.withConnection(service, (args) => {
        const metadata = args.metadata.clone();
        metadata.set('hasleader', 'true');
        return fn({ ...args, metadata }) as R;
      });
    const requireLeader: ICallable<unknown> = {
      // unary calls too: etcd's interceptor answers "no leader" at once instead of hanging
      exec: <R>(
        service: Parameters<ICallable<unknown>['exec']>[0],
        method: string,
        params: unknown,
        options?: object,
      ) =>
        withLeader<R>(
          service,
          ({ client, metadata }) =>
            new Promise<R>((resolve, reject) => {
              const rpc = (client as unknown as Record<string, UnaryRpc<R>>)[method];
              invariant(typeof rpc === 'function', `etcd ${service} has no method ${method}`);
              rpc.call(client, params, metadata, options ?? {}, (err, res) =>
                err ? reject(castGrpcError(err)) : resolve(res as R),
              );
            }),
        ),
      withConnection: withLeader,
      markFailed: (r, e) => pool.markFailed(r, e),
      callOptionsFactory: undefined,
    };
    this.kv = new KVClient(requireLeader);
    this.lease = new LeaseClient(requireLeader);
    this.watchClient = new WatchClient(requireLeader);
  }

  /** one keep-alive over this member's shared stream; resolves with the TTL in seconds */
  async keepAlive(id: string): Promise<number> {
    const stream = await this.keepAliveChannel();
    return new Promise<number>((resolve, reject) => {
      this.keepAlivePending.push({ id, resolve, reject });
      stream.write({ ID: id });
    });
  }

  /** forget a keep-alive that timed out (its late answer then goes to a later one, harmless) */
  dropKeepAlive(id: string): void {
    const i = this.keepAlivePending.findIndex((p) => p.id === id);
    if (i >= 0) this.keepAlivePending.splice(i, 1);
  }

  private async keepAliveChannel(): Promise<KeepAliveStream> {
    if (this.keepAliveStream) return this.keepAliveStream;
    const stream = await this.lease.leaseKeepAlive();
    if (this.keepAliveStream) {
      stream.cancel();
      return this.keepAliveStream;
    }
    this.keepAliveStream = stream;
    const fail = (e: unknown): void => {
      if (this.keepAliveStream !== stream) return;
      this.keepAliveStream = undefined;
      const pending = this.keepAlivePending;
      this.keepAlivePending = [];
      for (const p of pending) p.reject(e);
    };
    stream.on('data', (res: ILeaseKeepAliveResponse) => {
      const i = this.keepAlivePending.findIndex((p) => p.id === String(res.ID));
      if (i < 0) return;
      const [p] = this.keepAlivePending.splice(i, 1);
      p!.resolve(Number(res.TTL));
    });
    stream.on('error', (e) => fail(e));
    stream.on('end', () => fail(new Error('keep-alive stream ended: connection closed')));
    return stream;
  }

  close(): void {
    const s = this.keepAliveStream;
    this.keepAliveStream = undefined;
    const pending = this.keepAlivePending;
    this.keepAlivePending = [];
    for (const p of pending) p.reject(new StoreError('CORRAL_STORE_CLOSED', 'etcd store closed'));
    try {
      s?.cancel();
    } catch {
      // already gone
    }
    this.client.close();
  }
}

// ---------------------------------------------------------------- txn translation

type Retry = 'read' | 'write';

function compareOp(op: Compare['op']): ICompare['result'] {
  switch (op) {
    case '==':
      return 'Equal';
    case '!=':
      return 'NotEqual';
    case '<':
      return 'Less';
    case '>':
      return 'Greater';
  }
}

/** true when the contract ('' for a missing key) and etcd (always false) disagree */
function needsMissingBranch(c: Compare): boolean {
  if (c.target !== 'value') return false;
  return (c.op === '==' && c.value === '') || (c.op !== '==' && c.op !== '>' && c.value !== '');
}

function toEtcdCompare(c: Compare): ICompare {
  const key = Buffer.from(c.key, 'utf8');
  const result = compareOp(c.op);
  switch (c.target) {
    case 'value':
      return { key, result, target: 'Value', value: Buffer.from(c.value, 'utf8') };
    case 'version':
      return { key, result, target: 'Version', version: c.value };
    case 'createRevision':
      return { key, result, target: 'Create', create_revision: toEtcdRev(c.value) };
    case 'modRevision':
      return { key, result, target: 'Mod', mod_revision: toEtcdRev(c.value) };
  }
}

function toRequestOp(op: TxnOp): IRequestOp {
  switch (op.type) {
    case 'put':
      return {
        request_put: {
          key: Buffer.from(op.key, 'utf8'),
          value: Buffer.from(op.value, 'utf8'),
          lease: op.lease ?? 0,
        },
      };
    case 'delete':
      return { request_delete_range: { key: Buffer.from(op.key, 'utf8') } };
    case 'deletePrefix':
      return { request_delete_range: prefixRange(op.prefix) };
    case 'get':
      return { request_range: { key: Buffer.from(op.key, 'utf8') } };
    case 'range':
      return { request_range: { ...prefixRange(op.prefix), limit: op.limit ?? 0 } };
  }
}

/**
 * Builds the etcd txn. Each compare that needs the contract's missing-key meaning adds one
 * level: `version(key) == 0` ? (rest, compare holds) : (rest + etcd's own value compare).
 * The leaf txn's `succeeded` is the answer; its responses are the branch's results.
 */
function buildTxn(
  plain: ICompare[],
  branching: Compare[],
  success: IRequestOp[],
  failure: IRequestOp[],
): ITxnRequest {
  const [first, ...rest] = branching;
  if (!first) return { compare: plain, success, failure };
  // every branching compare holds on a missing key (see needsMissingBranch)
  return {
    compare: [{ key: Buffer.from(first.key, 'utf8'), result: 'Equal', target: 'Version', version: 0 }],
    success: [{ request_txn: buildTxn(plain, rest, success, failure) }],
    failure: [{ request_txn: buildTxn([...plain, toEtcdCompare(first)], rest, success, failure) }],
  };
}

function unwrapTxn(res: ITxnResponse, depth: number): ITxnResponse {
  let r = res;
  for (let i = 0; i < depth; i++) {
    const inner = r.responses[0]?.response_txn;
    invariant(inner, 'etcd nested txn answered without its inner txn');
    r = inner;
  }
  return r;
}

function toOpResult(op: TxnOp, res: IResponseOp | undefined, revision: number): TxnOpResult {
  invariant(res, `etcd txn answered fewer results than ops (missing ${op.type})`);
  switch (op.type) {
    case 'put':
      return { type: 'put', revision };
    case 'delete':
    case 'deletePrefix':
      return { type: 'delete', deleted: Number(res.response_delete_range.deleted) };
    case 'get': {
      const kv = res.response_range.kvs[0];
      return { type: 'get', kv: kv ? toKv(kv) : undefined };
    }
    case 'range':
      return { type: 'range', kvs: res.response_range.kvs.map(toKv), more: res.response_range.more };
  }
}

function checkKey(key: string, where: string): void {
  if (typeof key !== 'string' || key === '') {
    throw new StoreError(
      'CORRAL_STORE_BAD_REQUEST',
      `${where}: key must be a non-empty string`,
      'pass a key like /corral/...',
    );
  }
}

function checkLimit(limit: number | undefined, where: string): void {
  if (limit !== undefined && (!Number.isInteger(limit) || limit < 0)) {
    throw new StoreError(
      'CORRAL_STORE_BAD_REQUEST',
      `${where}: limit must be a non-negative integer, got ${limit}`,
      'omit it or pass 0 for no limit',
    );
  }
}

function checkLease(id: number, where: string): void {
  if (!Number.isSafeInteger(id) || id <= 0) {
    throw new StoreError(
      'CORRAL_STORE_BAD_REQUEST',
      `${where}: lease id must be a positive integer, got ${id}`,
      'use the id leaseGrant returned',
    );
  }
}

function newLeaseId(): number {
  // 53 random bits, never 0
  const n = Number(randomBytes(8).readBigUInt64BE() >> 11n);
  return n === 0 ? 1 : n;
}

// ---------------------------------------------------------------- the store

export class EtcdStore implements Store {
  readonly url: string;
  private readonly members: Member[];
  private current = 0;
  private closed = false;
  private readonly watches = new Set<EtcdWatch>();
  /** lease id -> when this client last granted or renewed it, and the TTL etcd confirmed */
  private readonly leaseClocks = new Map<number, { renewedAtMs: number; ttlMs: number }>();
  readonly opTimeoutMs: number;

  constructor(endpoints: string[], opts: StoreOptions = {}) {
    invariant(endpoints.length > 0, 'etcd store needs at least one endpoint');
    this.opTimeoutMs = opts.opTimeoutMs ?? storeOpTimeoutMsDefault;
    invariant(this.opTimeoutMs > 0, 'opTimeoutMs must be positive');
    this.url = `etcd://${endpoints.join(',')}`;
    this.members = endpoints.map((e) => new Member(e));
  }

  /** the endpoint calls currently go to (tests kill this one) */
  get currentEndpoint(): string {
    return this.members[this.current]!.endpoint;
  }

  private where(op: string): string {
    return `etcd store ${this.url} ${op}`;
  }

  private checkOpen(op: string): void {
    if (this.closed) {
      throw new StoreError(
        'CORRAL_STORE_CLOSED',
        `${this.where(op)}: the store is closed`,
        'open a new store',
      );
    }
  }

  /** moves on from member i when it failed, unless another call already did */
  private rotateFrom(i: number): void {
    if (this.current === i) this.current = (i + 1) % this.members.length;
  }

  /**
   * Runs fn on the current member; on a member fault moves to the next member and retries
   * (reads always, writes only when the request surely never left), all within opTimeoutMs.
   */
  private async call<T>(op: string, retry: Retry, fn: (m: Member, deadline: Date) => Promise<T>): Promise<T> {
    this.checkOpen(op);
    const where = this.where(op);
    const startMs = Date.now();
    const deadlineMs = startMs + this.opTimeoutMs;
    let last: Classified | undefined;
    let tried = 0;
    for (;;) {
      const remainingMs = deadlineMs - Date.now();
      if (remainingMs <= 0) break;
      const idx = this.current;
      const m = this.members[idx]!;
      const untried = this.members.length - (tried % this.members.length);
      const attemptMs = Math.min(remainingMs, Math.max(etcdAttemptMinMs, Math.floor(remainingMs / untried)));
      try {
        return await withDeadline(
          fn(m, new Date(Date.now() + attemptMs)),
          attemptMs,
          `${where} on ${m.endpoint}`,
        );
      } catch (e) {
        if (this.closed)
          throw new StoreError('CORRAL_STORE_CLOSED', `${where}: the store was closed`, 'open a new store');
        last = classifyEtcdError(e, `${where} on ${m.endpoint}`);
        if (!last.memberFault) throw last.err;
        this.rotateFrom(idx);
        if (retry === 'write' && !last.notSent) throw last.err;
        tried++;
        if (tried % this.members.length === 0) await new Promise((r) => setTimeout(r, etcdRetryPauseMs));
      }
    }
    if (last) throw last.err;
    throw timeoutError(where, this.opTimeoutMs);
  }

  async get(key: string): Promise<KeyValue | undefined> {
    checkKey(key, this.where('get'));
    const res = await this.call('get', 'read', (m, deadline) =>
      m.kv.range({ key: Buffer.from(key, 'utf8') }, { deadline }),
    );
    const kv = res.kvs[0];
    return kv ? toKv(kv) : undefined;
  }

  async range(prefix: string, opts: { limit?: number; fromKey?: string } = {}): Promise<RangeResult> {
    checkLimit(opts.limit, this.where('range'));
    const r = prefixRange(prefix);
    const from = opts.fromKey === undefined ? undefined : Buffer.from(opts.fromKey, 'utf8');
    // start at fromKey when it lies past the prefix's first key
    const key = from && from.length > 0 && Buffer.compare(from, r.key) > 0 ? from : r.key;
    const res = await this.call('range', 'read', (m, deadline) =>
      m.kv.range({ key, range_end: r.range_end, limit: opts.limit ?? 0 }, { deadline }),
    );
    return { kvs: res.kvs.map(toKv), more: res.more, revision: fromEtcdRev(res.header.revision) };
  }

  async put(key: string, value: string, opts: { lease?: number } = {}): Promise<{ revision: number }> {
    checkKey(key, this.where('put'));
    if (opts.lease !== undefined && opts.lease !== 0) checkLease(opts.lease, this.where('put'));
    const res = await this.call(opts.lease ? `put (lease ${opts.lease})` : 'put', 'write', (m, deadline) =>
      m.kv.put(
        { key: Buffer.from(key, 'utf8'), value: Buffer.from(value, 'utf8'), lease: opts.lease ?? 0 },
        { deadline },
      ),
    );
    return { revision: fromEtcdRev(res.header.revision) };
  }

  async delete(key: string): Promise<{ revision: number; deleted: number }> {
    checkKey(key, this.where('delete'));
    const res = await this.call('delete', 'write', (m, deadline) =>
      m.kv.deleteRange({ key: Buffer.from(key, 'utf8') }, { deadline }),
    );
    return { revision: fromEtcdRev(res.header.revision), deleted: Number(res.deleted) };
  }

  async deletePrefix(prefix: string): Promise<{ revision: number; deleted: number }> {
    const res = await this.call('deletePrefix', 'write', (m, deadline) =>
      m.kv.deleteRange(prefixRange(prefix), { deadline }),
    );
    return { revision: fromEtcdRev(res.header.revision), deleted: Number(res.deleted) };
  }

  async txn(req: TxnRequest): Promise<TxnResult> {
    const where = this.where('txn');
    const failureOps = req.failure ?? [];
    for (const op of [...req.success, ...failureOps]) {
      if (op.type === 'put' || op.type === 'delete' || op.type === 'get') checkKey(op.key, where);
      if (op.type === 'range') checkLimit(op.limit, where);
      if (op.type === 'put' && op.lease !== undefined && op.lease !== 0) checkLease(op.lease, where);
    }
    for (const c of req.compare) checkKey(c.key, where);
    const branching = req.compare.filter(needsMissingBranch);
    if (branching.length > etcdMissingValueComparesMax) {
      throw new StoreError(
        'CORRAL_STORE_BAD_REQUEST',
        `${where}: ${branching.length} value compares that may see a missing key (== '', != x, < x); etcd allows ${etcdMissingValueComparesMax}`,
        'add a version > 0 compare for keys that must exist, or split the txn',
      );
    }
    const plain = req.compare.filter((c) => !needsMissingBranch(c)).map(toEtcdCompare);
    const etcdReq = buildTxn(plain, branching, req.success.map(toRequestOp), failureOps.map(toRequestOp));
    const writes = [...req.success, ...failureOps].some(
      (o) => o.type === 'put' || o.type === 'delete' || o.type === 'deletePrefix',
    );
    const res = await this.call('txn', writes ? 'write' : 'read', (m, deadline) =>
      m.kv.txn(etcdReq, { deadline }),
    );
    const leaf = unwrapTxn(res, branching.length);
    const revision = fromEtcdRev(res.header.revision);
    const ops = leaf.succeeded ? req.success : failureOps;
    return {
      succeeded: leaf.succeeded,
      revision,
      results: ops.map((op, i) => toOpResult(op, leaf.responses[i], revision)),
    };
  }

  async revision(): Promise<number> {
    const res = await this.call('revision', 'read', (m, deadline) =>
      m.kv.range({ key: NUL, limit: 1, count_only: true }, { deadline }),
    );
    return fromEtcdRev(res.header.revision);
  }

  async leaseGrant(ttlMs: number): Promise<number> {
    const where = this.where('leaseGrant');
    if (!Number.isFinite(ttlMs) || ttlMs <= 0) {
      throw new StoreError(
        'CORRAL_STORE_BAD_REQUEST',
        `${where}: ttlMs must be a positive number, got ${ttlMs}`,
        'pass the lease TTL in milliseconds, e.g. 4000',
      );
    }
    const ttlS = Math.max(1, Math.ceil(ttlMs / 1000));
    for (let collision = 0; collision < etcdLeaseIdAttemptsMax; collision++) {
      const id = newLeaseId();
      let sent = false;
      // a chosen id makes a retry safe: if an earlier attempt got through, etcd says it exists
      const sentAtMs = Date.now();
      const granted = await this.call('leaseGrant', 'read', async (m, deadline) => {
        const again = sent;
        sent = true;
        try {
          const res = await m.lease.leaseGrant({ ID: id, TTL: ttlS }, { deadline });
          this.leaseClock(id, sentAtMs, Number(res.TTL) * 1000);
          return true;
        } catch (e) {
          if (/lease already exists/i.test(errText(e))) return again;
          throw e;
        }
      });
      if (granted) return id;
    }
    throw new StoreError(
      'CORRAL_STORE_UNAVAILABLE',
      `${where}: ${etcdLeaseIdAttemptsMax} random lease ids were all taken`,
      'this should not happen; check the etcd cluster',
    );
  }

  async leaseKeepAlive(id: number): Promise<{ remainingTtlMs: number }> {
    const where = this.where('leaseKeepAlive');
    checkLease(id, where);
    const sentAtMs = Date.now();
    const ttlS = await this.call('leaseKeepAlive', 'read', async (m, deadline) => {
      const ms = deadline.getTime() - Date.now();
      try {
        return await withDeadline(m.keepAlive(String(id)), ms, `${where} on ${m.endpoint}`);
      } catch (e) {
        m.dropKeepAlive(String(id));
        throw e;
      }
    });
    if (ttlS <= 0) {
      throw new StoreError(
        'CORRAL_STORE_LEASE_NOT_FOUND',
        `${where}: lease ${id} not found (expired or revoked)`,
        'grant a new lease and re-attach its keys',
      );
    }
    this.leaseClock(id, sentAtMs, ttlS * 1000);
    return { remainingTtlMs: ttlS * 1000 };
  }

  private leaseClock(id: number, renewedAtMs: number, ttlMs: number): void {
    this.leaseClocks.delete(id);
    if (this.leaseClocks.size >= etcdLeaseClocksMax) {
      const oldest = this.leaseClocks.keys().next().value;
      if (oldest !== undefined) this.leaseClocks.delete(oldest);
    }
    this.leaseClocks.set(id, { renewedAtMs, ttlMs });
  }

  async leaseRevoke(id: number): Promise<void> {
    checkLease(id, this.where('leaseRevoke'));
    await this.call(`leaseRevoke ${id}`, 'write', (m, deadline) =>
      m.lease.leaseRevoke({ ID: id }, { deadline }),
    );
    this.leaseClocks.delete(id);
  }

  async leaseInfo(id: number): Promise<LeaseInfo | undefined> {
    checkLease(id, this.where('leaseInfo'));
    const res = await this.call('leaseInfo', 'read', (m, deadline) =>
      m.lease.leaseTimeToLive({ ID: id, keys: true }, { deadline }),
    );
    const ttlS = Number(res.TTL);
    if (ttlS < 0) {
      this.leaseClocks.delete(id);
      return undefined;
    }
    // etcd truncates to whole seconds: the truth lies in [ttlS, ttlS + 1) s; a lease this
    // client renewed itself narrows that down, any other live lease reports at least 1 ms
    const clock = this.leaseClocks.get(id);
    const lowMs = ttlS * 1000;
    const estimateMs = clock ? clock.ttlMs - (Date.now() - clock.renewedAtMs) : lowMs;
    const remainingTtlMs = Math.min(lowMs + 999, Math.max(lowMs, estimateMs, 1));
    return {
      id,
      grantedTtlMs: Number(res.grantedTTL) * 1000,
      remainingTtlMs,
      keys: (res.keys ?? []).map((k: Buffer) => k.toString('utf8')).sort(),
    };
  }

  async watch(prefix: string, opts: WatchOptions): Promise<Watcher> {
    this.checkOpen('watch');
    const where = this.where(`watch ${JSON.stringify(prefix)}`);
    let fromEtcd: number;
    if (opts.startRevision === undefined) {
      fromEtcd = toEtcdRev((await this.revision()) + 1);
    } else {
      if (!Number.isInteger(opts.startRevision)) {
        throw new StoreError(
          'CORRAL_STORE_BAD_REQUEST',
          `${where}: startRevision must be an integer, got ${opts.startRevision}`,
          'omit it to watch from now',
        );
      }
      fromEtcd = toEtcdRev(Math.max(1, opts.startRevision));
    }
    const w = new EtcdWatch(this, where, prefix, fromEtcd, opts, () => this.watches.delete(w));
    this.watches.add(w);
    try {
      await w.start();
    } catch (e) {
      this.watches.delete(w);
      await w.cancel();
      throw e;
    }
    return w;
  }

  async compact(revision: number): Promise<void> {
    const where = this.where('compact');
    if (!Number.isInteger(revision) || revision < 1) {
      throw new StoreError(
        'CORRAL_STORE_BAD_REQUEST',
        `${where}: revision must be a positive integer, got ${revision}`,
        'pass a revision from revision()',
      );
    }
    try {
      await this.call('compact', 'read', (m, deadline) =>
        m.kv.compact({ revision: toEtcdRev(revision) }, { deadline }),
      );
    } catch (e) {
      // compacting what is already compacted is done already
      if (e instanceof StoreError && e.code === 'CORRAL_STORE_COMPACTED') return;
      throw e;
    }
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    const ws = [...this.watches];
    this.watches.clear();
    for (const w of ws)
      w.fail(
        new StoreError(
          'CORRAL_STORE_CLOSED',
          `${w.where}: the store was closed`,
          'open a new store and watch again',
        ),
      );
    for (const m of this.members) m.close();
  }

  // -------- used by EtcdWatch

  /** @internal */
  isClosed(): boolean {
    return this.closed;
  }
  /** @internal */
  memberIndex(): number {
    return this.current;
  }
  /** @internal */
  member(i: number): Member {
    return this.members[i]!;
  }
  /** @internal */
  memberFailed(i: number): void {
    this.rotateFrom(i);
  }
}

type WatchStream = IDuplexStream<IWatchRequest, IWatchResponse>;

/**
 * One watch = one etcd watch stream. Tracks the last delivered etcd revision; when the
 * stream breaks it reopens on the next member from that revision + 1 and drops repeats.
 */
class EtcdWatch implements Watcher {
  private stream: WatchStream | undefined;
  private done = false;
  /** etcd revision: every event at or below it was delivered */
  private lastEtcdRev: number;
  private failingSinceMs: number | undefined;
  private backoffMs = etcdWatchResumeBackoffMinMs;
  private resumeTimer: NodeJS.Timeout | undefined;

  constructor(
    private readonly store: EtcdStore,
    readonly where: string,
    private readonly prefix: string,
    startEtcdRev: number,
    private readonly opts: WatchOptions,
    private readonly onEnd: () => void,
  ) {
    this.lastEtcdRev = startEtcdRev - 1;
  }

  /** opens the first stream; resolves once etcd confirmed the watch, tries members in turn */
  async start(): Promise<void> {
    const deadlineMs = Date.now() + this.store.opTimeoutMs;
    let last: unknown;
    for (let tries = 0; ; tries++) {
      const remainingMs = deadlineMs - Date.now();
      if (remainingMs <= 0 || this.done) break;
      const idx = this.store.memberIndex();
      try {
        await this.open(idx, Math.max(etcdAttemptMinMs, remainingMs));
        return;
      } catch (e) {
        last = e;
        const c = classifyEtcdError(e, `${this.where} on ${this.store.member(idx).endpoint}`);
        if (!c.memberFault) throw c.err;
        this.store.memberFailed(idx);
        await new Promise((r) => setTimeout(r, etcdRetryPauseMs));
      }
    }
    if (last) throw classifyEtcdError(last, this.where).err;
    throw timeoutError(this.where, this.store.opTimeoutMs);
  }

  /** opens a stream on member idx from lastEtcdRev + 1; resolves when etcd says created */
  private async open(idx: number, createTimeoutMs: number): Promise<void> {
    const m = this.store.member(idx);
    const stream = await m.watchClient.watch();
    if (this.done) {
      stream.cancel();
      return;
    }
    this.stream = stream;
    let created = false;
    await withDeadline(
      new Promise<void>((resolve, reject) => {
        stream.on('data', (res: IWatchResponse) => {
          if (this.stream !== stream) return;
          if (!created && res.created) {
            created = true;
            this.failingSinceMs = undefined;
            this.backoffMs = etcdWatchResumeBackoffMinMs;
            resolve();
          }
          this.onResponse(res, idx);
        });
        const broken = (e: unknown): void => {
          if (this.stream !== stream) return;
          this.stream = undefined;
          if (!created) {
            reject(e);
            return;
          }
          this.streamBroke(idx, e);
        };
        stream.on('error', (e) => broken(e));
        stream.on('end', () => broken(new Error('watch stream ended: connection closed')));
        stream.write({
          create_request: {
            ...prefixRange(this.prefix),
            start_revision: this.lastEtcdRev + 1,
            progress_notify: true,
          },
        });
      }),
      createTimeoutMs,
      `${this.where} on ${m.endpoint}`,
    ).catch((e: unknown) => {
      if (this.stream === stream) this.stream = undefined;
      try {
        stream.cancel();
      } catch {
        // already gone
      }
      throw e;
    });
  }

  private onResponse(res: IWatchResponse, idx: number): void {
    if (this.done) return;
    if (Number(res.compact_revision) > 0) {
      const oldest = fromEtcdRev(res.compact_revision);
      this.fail(
        new StoreError(
          'CORRAL_STORE_COMPACTED',
          `${this.where}: revision ${fromEtcdRev(this.lastEtcdRev + 1)} was compacted; the oldest available is ${oldest}`,
          'read the current state with range() and watch again from its revision + 1',
          oldest,
        ),
      );
      return;
    }
    if (res.canceled) {
      // etcd cancelled the watch (e.g. member lost its leader): resume elsewhere
      const s = this.stream;
      this.stream = undefined;
      try {
        s?.cancel();
      } catch {
        // already gone
      }
      this.streamBroke(idx, new Error(`watch cancelled by etcd: ${res.cancel_reason || 'no reason given'}`));
      return;
    }
    if (res.events.length === 0 && !res.created) {
      // a progress notification: every event up to header.revision was sent, so a resume
      // after a quiet spell starts there (and not before a compaction that skipped nothing)
      this.lastEtcdRev = Math.max(this.lastEtcdRev, Number(res.header.revision));
      return;
    }
    this.deliver(res.events);
  }

  /** delivers events grouped by revision, skipping revisions already delivered */
  private deliver(events: IWatchResponse['events']): void {
    let batch: WatchEvent[] = [];
    let batchRev = 0;
    const flush = (): void => {
      if (batch.length === 0) return;
      this.lastEtcdRev = batchRev;
      const out = batch;
      batch = [];
      if (!this.done) this.opts.onEvents(out);
    };
    for (const ev of events) {
      const rev = Number(ev.kv.mod_revision);
      if (rev <= this.lastEtcdRev) continue;
      if (rev !== batchRev) {
        flush();
        batchRev = rev;
      }
      const kv = toKv(ev.kv);
      const isDelete = ev.type === 'Delete';
      batch.push({
        type: isDelete ? 'delete' : 'put',
        kv: isDelete
          ? { key: kv.key, value: '', createRevision: 0, modRevision: kv.modRevision, version: 0, lease: 0 }
          : kv,
        revision: kv.modRevision,
      });
    }
    flush();
  }

  private streamBroke(idx: number, e: unknown): void {
    if (this.done) return;
    if (this.store.isClosed()) {
      this.fail(
        new StoreError('CORRAL_STORE_CLOSED', `${this.where}: the store was closed`, 'open a new store'),
      );
      return;
    }
    const c = classifyEtcdError(e, `${this.where} on ${this.store.member(idx).endpoint}`);
    if (!c.memberFault && c.err.code !== 'CORRAL_STORE_UNAVAILABLE') {
      this.fail(c.err);
      return;
    }
    this.store.memberFailed(idx);
    const nowMs = Date.now();
    this.failingSinceMs ??= nowMs;
    if (nowMs - this.failingSinceMs > etcdWatchResumeWindowMs) {
      this.fail(
        new StoreError(
          'CORRAL_STORE_UNAVAILABLE',
          `${this.where}: no etcd member took the watch back for ${etcdWatchResumeWindowMs} ms (last: ${c.err.message})`,
          'check the etcd members; then read the state and watch again',
        ),
      );
      return;
    }
    const delayMs = this.backoffMs;
    this.backoffMs = Math.min(etcdWatchResumeBackoffMaxMs, this.backoffMs * 2);
    this.resumeTimer = setTimeout(() => {
      this.resumeTimer = undefined;
      if (this.done) return;
      const next = this.store.memberIndex();
      this.open(next, this.store.opTimeoutMs).catch((err: unknown) => this.streamBroke(next, err));
    }, delayMs);
  }

  /** ends the watch for good and tells the owner once */
  fail(err: StoreError): void {
    if (this.done) return;
    this.stop();
    this.opts.onError(err);
  }

  private stop(): void {
    this.done = true;
    clearTimeout(this.resumeTimer);
    const s = this.stream;
    this.stream = undefined;
    try {
      s?.cancel();
    } catch {
      // already gone
    }
    this.onEnd();
  }

  async cancel(): Promise<void> {
    if (this.done) return;
    this.stop();
  }
}

export async function openEtcdStore(endpoints: string[], opts?: StoreOptions): Promise<Store> {
  if (endpoints.length === 0) {
    throw new StoreError(
      'CORRAL_STORE_BAD_URL',
      'etcd store: no endpoints given',
      'use etcd://host:port[,host:port...]',
    );
  }
  for (const e of endpoints) {
    if (!/^[A-Za-z0-9.\-_[\]:]+:\d{1,5}$/.test(e)) {
      throw new StoreError(
        'CORRAL_STORE_BAD_URL',
        `etcd store: endpoint ${JSON.stringify(e)} is not host:port`,
        'use etcd://host:port[,host:port...], e.g. etcd://10.0.0.1:2379',
      );
    }
  }
  const store = new EtcdStore(endpoints, opts);
  // one round trip, so a wrong URL or a dead cluster is a clear error at open, not at first use
  try {
    await store.revision();
  } catch (e) {
    await store.close();
    const c = e instanceof StoreError ? e.code : 'CORRAL_STORE_UNAVAILABLE';
    throw new StoreError(
      c === 'CORRAL_STORE_TIMEOUT' ? c : 'CORRAL_STORE_UNAVAILABLE',
      `etcd store ${store.url}: no member answered within ${store.opTimeoutMs} ms (last: ${(e instanceof Error ? e.message : String(e)).replace(/^etcd store \S+ revision /, '')})`,
      'check that etcd runs there and that the URL lists its client endpoints (port 2379 by default), e.g. etcd://10.0.0.1:2379,10.0.0.2:2379',
    );
  }
  return store;
}
