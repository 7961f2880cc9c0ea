// The Store: Corral's single source of truth, with etcd v3 semantics. Every backend
// (sqlite, etcd, the simulator's in-memory one) passes the same conformance suite
// (test/store-conformance.ts), which is the definition of these semantics.
//
// - Revisions are store-wide, start at 1 for the first write and grow by exactly one
//   per write transaction (a txn with several puts is one revision, like etcd).
// - Keys and values are strings (UTF-8). Values may be large (at least 1 MiB).
// - Every call has a timeout (StoreOptions.opTimeoutMs); a call that cannot reach the
//   store fails with StoreError code CORRAL_STORE_UNAVAILABLE or CORRAL_STORE_TIMEOUT,
//   never hangs.
import { CorralError } from '../core/errors.js';

export interface KeyValue {
  key: string;
  value: string;
  /** revision of the write that created this key (since its last delete) */
  createRevision: number;
  /** revision of the last write to this key */
  modRevision: number;
  /** number of writes since creation; 1 after the first put */
  version: number;
  /** lease the key is bound to, 0 for none */
  lease: number;
}

export type CompareOp = '==' | '!=' | '<' | '>';

/** A compare on a missing key sees value '' (never equal to anything but ''), version 0, revisions 0. */
export type Compare =
  | { key: string; target: 'value'; op: CompareOp; value: string }
  | { key: string; target: 'version' | 'createRevision' | 'modRevision'; op: CompareOp; value: number };

export type TxnOp =
  | { type: 'put'; key: string; value: string; lease?: number }
  | { type: 'delete'; key: string }
  | { type: 'deletePrefix'; prefix: string }
  | { type: 'get'; key: string }
  | { type: 'range'; prefix: string; limit?: number };

export type TxnOpResult =
  | { type: 'put'; revision: number }
  | { type: 'delete'; deleted: number }
  | { type: 'get'; kv: KeyValue | undefined }
  | { type: 'range'; kvs: KeyValue[]; more: boolean };

export interface TxnRequest {
  compare: Compare[];
  success: TxnOp[];
  failure?: TxnOp[];
}

export interface TxnResult {
  succeeded: boolean;
  /** store revision after the txn (unchanged if the branch taken wrote nothing) */
  revision: number;
  results: TxnOpResult[];
}

export interface RangeResult {
  kvs: KeyValue[];
  /** true when limit cut the result short */
  more: boolean;
  /** store revision the read was served at */
  revision: number;
}

export interface WatchEvent {
  type: 'put' | 'delete';
  /** for a delete: key, value '', modRevision = the delete's revision, version 0 */
  kv: KeyValue;
  /** the revision of this event (= kv.modRevision) */
  revision: number;
}

export interface WatchOptions {
  /** deliver every event with revision >= startRevision; default: current revision + 1 */
  startRevision?: number;
  /** events in revision order, each revision's events together, never lost or reordered */
  onEvents: (events: WatchEvent[]) => void;
  /** the watch ended for good: compacted start revision (CORRAL_STORE_COMPACTED), store closed, ... */
  onError: (err: StoreError) => void;
}

export interface Watcher {
  cancel(): Promise<void>;
}

export interface LeaseInfo {
  id: number;
  /** TTL the lease was granted with */
  grantedTtlMs: number;
  /** time left before it expires */
  remainingTtlMs: number;
  keys: string[];
}

export interface Store {
  /** the URL it was opened with, secrets removed */
  readonly url: string;
  get(key: string): Promise<KeyValue | undefined>;
  /**
   * keys starting with prefix, sorted by key (UTF-8 byte order); '' means every key.
   * limit 0 or absent: no limit. fromKey (addition): start at this key (inclusive) instead of
   * at prefix, to page through a large range: pass the last key of the previous page + '\0'.
   */
  range(prefix: string, opts?: { limit?: number; fromKey?: string }): Promise<RangeResult>;
  put(key: string, value: string, opts?: { lease?: number }): Promise<{ revision: number }>;
  delete(key: string): Promise<{ revision: number; deleted: number }>;
  deletePrefix(prefix: string): Promise<{ revision: number; deleted: number }>;
  txn(req: TxnRequest): Promise<TxnResult>;
  /** current store revision */
  revision(): Promise<number>;

  /** grant a lease; backends with coarser TTLs (etcd: whole seconds) round up */
  leaseGrant(ttlMs: number): Promise<number>;
  /** one keep-alive; fails with CORRAL_STORE_LEASE_NOT_FOUND if it expired or was revoked */
  leaseKeepAlive(id: number): Promise<{ remainingTtlMs: number }>;
  /** revoke and delete its keys; revoking an unknown lease fails with CORRAL_STORE_LEASE_NOT_FOUND */
  leaseRevoke(id: number): Promise<void>;
  leaseInfo(id: number): Promise<LeaseInfo | undefined>;

  watch(prefix: string, opts: WatchOptions): Promise<Watcher>;
  /** forget history before revision; a watch from an older revision then fails with CORRAL_STORE_COMPACTED */
  compact(revision: number): Promise<void>;
  close(): Promise<void>;
}

export type StoreErrorCode =
  | 'CORRAL_STORE_BAD_URL'
  | 'CORRAL_STORE_UNAVAILABLE'
  | 'CORRAL_STORE_TIMEOUT'
  | 'CORRAL_STORE_COMPACTED'
  | 'CORRAL_STORE_LEASE_NOT_FOUND'
  | 'CORRAL_STORE_CORRUPT'
  | 'CORRAL_STORE_CLOSED'
  | 'CORRAL_STORE_BAD_REQUEST';

export class StoreError extends CorralError {
  constructor(
    override readonly code: StoreErrorCode,
    message: string,
    hint?: string,
    /** for CORRAL_STORE_COMPACTED: the oldest revision still available */
    readonly compactRevision?: number,
  ) {
    super(code, message, hint);
  }
}

export interface StoreOptions {
  /** every call fails after this long instead of hanging */
  opTimeoutMs?: number;
}

export const storeOpTimeoutMsDefault = 5000;
