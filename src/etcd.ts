// etcd access: one client per member endpoint (the etcd3 client picks a random host per call), a
// deadline on every call, the library's retry and circuit breaker replaced by our own policy by kind
// of operation: reads retry transient errors with backoff; mutations are sent once.
import { readFileSync } from 'node:fs';
import { request as httpsRequest } from 'node:https';
import { request as httpRequest } from 'node:http';
import { noop } from 'cockatiel';
import {
  Etcd3,
  GRPCDeadlineExceededError,
  GRPCResourceExhastedError,
  GRPCUnavailableError,
  GRPCUnauthenticatedError,
  GRPCCancelledError,
  EtcdPermissionDeniedError,
  EtcdAuthenticationFailedError,
  EtcdInvalidAuthTokenError,
  type IStatusResponse,
  type IMember,
  type ICompare,
  type IRequestOp,
  type ITxnResponse,
  type IKeyValue,
} from 'etcd3';
import pRetry from 'p-retry';
import type { Config } from './config.ts';
import { DefragdError } from './errors.ts';
import type { Log } from './log.ts';
import type { Alarm, MemberStatus } from './view.ts';

export type ErrorKind = 'unavailable' | 'timeout' | 'nospace' | 'auth' | 'tls' | 'not-leader' | 'compacted' | 'other';

const TLS_PATTERN = /certificate|ssl|tls|handshake|self[- ]signed|unable to verify|wrong version number|alert/i;

/** Sorts an error from the etcd3 client into what our policies act on. */
export function classify(err: unknown): ErrorKind {
  const msg = err instanceof Error ? err.message : String(err);
  if (err instanceof GRPCResourceExhastedError || /database space exceeded|NOSPACE/i.test(msg)) return 'nospace';
  if (
    err instanceof GRPCUnauthenticatedError ||
    err instanceof EtcdAuthenticationFailedError ||
    err instanceof EtcdPermissionDeniedError ||
    err instanceof EtcdInvalidAuthTokenError ||
    /permission denied|authentication failed|user name is empty|invalid auth token/i.test(msg)
  )
    return 'auth';
  if (TLS_PATTERN.test(msg) && !/deadline/i.test(msg)) return 'tls';
  if (/not leader|leader changed|no leader/i.test(msg)) return 'not-leader';
  if (/required revision has been compacted/i.test(msg)) return 'compacted';
  if (err instanceof GRPCDeadlineExceededError || /deadline exceeded|timed out|timeout/i.test(msg)) return 'timeout';
  if (
    err instanceof GRPCUnavailableError ||
    err instanceof GRPCCancelledError ||
    /unavailable|ECONNREFUSED|ECONNRESET|EPIPE|socket|connection|No connection established|broken circuit|transport/i.test(msg)
  )
    return 'unavailable';
  return 'other';
}

/** The kind of a failed call: of the client error a DefragdError wraps (its cause), else of the error itself. */
export function kindOf(err: unknown): ErrorKind {
  return classify((err instanceof Error ? err.cause : undefined) ?? err);
}

export function isTransient(kind: ErrorKind): boolean {
  return kind === 'unavailable' || kind === 'timeout' || kind === 'not-leader';
}

/** Wraps a client error into a DefragdError whose message says what failed and where. */
export function toDefragdError(err: unknown, what: string, endpoint: string): DefragdError {
  if (err instanceof DefragdError) return err;
  const kind = classify(err);
  const raw = err instanceof Error ? err.message.replace(/\s+/g, ' ').trim() : String(err);
  switch (kind) {
    case 'tls':
      return new DefragdError(
        'EDD_TLS',
        `${what} on ${endpoint}: TLS failed (${raw}); ` +
          'check etcd.caFile signs the server certificate and etcd.certFile/keyFile are a client pair signed by it',
        { cause: err, permanent: true },
      );
    case 'auth':
      return new DefragdError(
        'EDD_AUTH',
        `${what} on ${endpoint}: etcd refused our credentials (${raw}); ` +
          'with etcd auth enabled defragment, alarm disarm and move-leader need the root role',
        { cause: err, permanent: true },
      );
    case 'unavailable':
    case 'timeout':
      return new DefragdError(
        'EDD_UNAVAILABLE',
        `${what} on ${endpoint}: ${kind === 'timeout' ? 'no answer before the deadline' : 'unavailable'} (${raw})`,
        { cause: err, permanent: false },
      );
    default:
      return new DefragdError('EDD_ETCD', `${what} on ${endpoint}: ${raw}`, { cause: err, permanent: kind !== 'not-leader' });
  }
}

export interface Access {
  /** etcd.endpoint is https://: every member is then reached over TLS, or not at all (see MemberClient). */
  tls?: boolean;
  ca?: Buffer;
  cert?: Buffer;
  key?: Buffer;
  username?: string;
  password?: string;
  requestTimeout: number;
  defragTimeout: number;
  retry: Config['retry'];
}

export function accessFromConfig(c: Config): Access {
  const tls = c.etcd.endpoint.startsWith('https:');
  const read = (f: string) => (f ? readFileSync(f) : undefined);
  return {
    tls,
    ca: tls ? read(c.etcd.caFile) : undefined,
    cert: tls ? read(c.etcd.certFile) : undefined,
    key: tls ? read(c.etcd.keyFile) : undefined,
    username: c.etcd.username || undefined,
    password: c.etcd.passwordFile ? readFileSync(c.etcd.passwordFile, 'utf8').replace(/\r?\n$/, '') : undefined,
    requestTimeout: c.etcd.requestTimeout,
    defragTimeout: c.etcd.defragTimeout,
    retry: c.retry,
  };
}

export function toStatus(endpoint: string, r: IStatusResponse): MemberStatus {
  const applied = (r as IStatusResponse & { raftAppliedIndex?: string }).raftAppliedIndex;
  return {
    endpoint,
    memberId: String(r.header.member_id),
    leader: String(r.leader),
    version: r.version,
    dbSize: Number(r.dbSize),
    dbSizeInUse: Number((r as IStatusResponse & { dbSizeInUse?: string }).dbSizeInUse ?? r.dbSize),
    raftIndex: BigInt(r.raftIndex),
    raftAppliedIndex: BigInt(applied && applied !== '0' ? applied : r.raftIndex),
    raftTerm: BigInt(r.raftTerm),
    revision: BigInt(r.header.revision),
    isLearner: Boolean((r as IStatusResponse & { isLearner?: boolean }).isLearner),
    errors: (r as IStatusResponse & { errors?: string[] }).errors ?? [],
    quotaBytes: quotaFromStatus(r),
  };
}

/**
 * etcd 3.6 added dbSizeQuota to StatusResponse. The etcd3 client decodes with its own copy of the
 * proto (no such field in 1.1.2), so this stays undefined until the client learns it; /metrics
 * carries the same figure on 3.4 and 3.5.
 */
function quotaFromStatus(r: IStatusResponse): number | undefined {
  const q = (r as IStatusResponse & { dbSizeQuota?: string }).dbSizeQuota;
  const n = q === undefined ? NaN : Number(q);
  return validQuota(n) ? n : undefined;
}

/**
 * A quota etcd could really have: a whole number of bytes above 0 (etcd's own --quota-backend-bytes
 * is an int64). 0, a negative number, NaN or 1e308 from a broken or hostile member would make every
 * usage ratio meaningless, so such a member's quota counts as unknown.
 */
export function validQuota(n: number): boolean {
  return Number.isSafeInteger(n) && n > 0;
}

/** etcd's own /metrics page is a few hundred KiB; a member that sends more is cut off here. */
export const MAX_METRICS_BYTES = 4 * 1024 * 1024;

export interface Member {
  id: string;
  name: string;
  clientURLs: string[];
  peerURLs: string[];
  isLearner: boolean;
}

/**
 * What a member publishes about itself on its own `/metrics` page (client URL, same TLS as gRPC).
 * It answers while the member defragments, when Status blocks; a field is undefined when the page
 * does not carry it.
 */
export interface ServerMetrics {
  /** etcd_server_quota_backend_bytes: the member's --quota-backend-bytes. */
  quotaBytes?: number;
  /** The page's etcd_server_quota_backend_bytes when it is not a usable quota (see validQuota), as written. */
  quotaInvalid?: string;
  /** etcd_disk_defrag_inflight: 1 while a defragment runs on that member. */
  defragInflight?: boolean;
  /** etcd_server_version{server_version="..."} */
  version?: string;
  dbSize?: number;
  dbSizeInUse?: number;
  /** etcd_debugging_mvcc_compact_revision: the revision history was last compacted to. */
  compactRevision?: number;
  /** etcd_debugging_mvcc_current_revision: the member's current revision. */
  currentRevision?: number;
  /** etcd_disk_backend_defrag_duration_seconds: every defragment of this member since it started. */
  defragCount?: number;
  defragSeconds?: number;
}

/** /metrics answered, but not with a page we can read: the member is up, the page cannot tell. */
export class MetricsPageError extends DefragdError {
  constructor(message: string) {
    super('EDD_ETCD', message, { permanent: true });
    this.name = 'MetricsPageError';
  }
}

/** Picks the gauges etcd-defragd uses out of a Prometheus text exposition. */
export function parseServerMetrics(text: string): ServerMetrics {
  const out: ServerMetrics = {};
  for (const line of text.split('\n')) {
    if (!line.startsWith('etcd_')) continue;
    const m = line.match(/^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)/);
    if (!m) continue;
    const value = Number(m[3]);
    switch (m[1]) {
      case 'etcd_server_quota_backend_bytes':
        if (validQuota(value)) {
          out.quotaBytes = value;
          delete out.quotaInvalid;
        } else out.quotaInvalid = m[3]!.slice(0, 40);
        break;
      case 'etcd_disk_defrag_inflight':
        if (Number.isFinite(value)) out.defragInflight = value > 0;
        break;
      case 'etcd_mvcc_db_total_size_in_bytes':
        if (Number.isSafeInteger(value) && value >= 0) out.dbSize = value;
        break;
      case 'etcd_mvcc_db_total_size_in_use_in_bytes':
        if (Number.isSafeInteger(value) && value >= 0) out.dbSizeInUse = value;
        break;
      case 'etcd_debugging_mvcc_compact_revision':
        // -1 until the first compaction (seen on 3.4.23 and 3.5.30): nothing compacted, revision 0.
        if (Number.isSafeInteger(value) && value >= -1) out.compactRevision = Math.max(0, value);
        break;
      case 'etcd_debugging_mvcc_current_revision':
        if (Number.isSafeInteger(value) && value >= 0) out.currentRevision = value;
        break;
      case 'etcd_disk_backend_defrag_duration_seconds_count':
        if (Number.isSafeInteger(value) && value >= 0) out.defragCount = value;
        break;
      case 'etcd_disk_backend_defrag_duration_seconds_sum':
        if (Number.isFinite(value) && value >= 0) out.defragSeconds = value;
        break;
      case 'etcd_server_version': {
        const v = m[2]?.match(/server_version="([^"]*)"/)?.[1];
        if (v) out.version = v;
        break;
      }
      default:
    }
  }
  return out;
}

export interface RetryHooks {
  log?: Log;
  signal?: AbortSignal;
}

/**
 * A Defragment reply says nothing: etcd 3.4 and 3.5 send `DefragmentResponse{}` with no header
 * (maintenance.go), so it cannot tell which member did it. The sender checks the member on the
 * connection before sending instead (run.ts).
 */
export type DefragmentReply = void;

/** A member's HashKV answer: the hash of its keyspace up to a revision, and its compaction point. */
export interface HashKV {
  hash: string;
  compactRevision: bigint;
  revision: bigint;
}

/**
 * The part of one member's API that the turn, the run and the daemon use. MemberClient is the
 * real one; test/model/etcd-model.ts is an in-memory model of it driven by a fake clock.
 */
export interface EtcdMember {
  readonly endpoint: string;
  status(hooks?: RetryHooks, attempts?: number): Promise<MemberStatus>;
  probe(timeoutMs: number): Promise<MemberStatus | Error>;
  members(hooks?: RetryHooks, attempts?: number): Promise<Member[]>;
  alarms(hooks?: RetryHooks): Promise<Alarm[]>;
  revision(hooks?: RetryHooks, attempts?: number): Promise<bigint>;
  disarm(alarm: Alarm): Promise<unknown>;
  defragment(): Promise<DefragmentReply>;
  moveLeader(targetId: string): Promise<unknown>;
  hashKV(revision: bigint, hooks?: RetryHooks, attempts?: number, timeoutMs?: number): Promise<HashKV>;
  compact(revision: bigint, physical?: boolean, timeoutMs?: number): Promise<unknown>;
  linearizableRead(key: string, hooks?: RetryHooks): Promise<unknown>;
  /** Keys under a prefix; with `limit`, at most that many, and `more` says whether others were left out. */
  range(
    prefix: string,
    hooks?: RetryHooks,
    attempts?: number,
    limit?: number,
  ): Promise<{ kvs: IKeyValue[]; revision: bigint; more: boolean }>;
  get(key: string, hooks?: RetryHooks): Promise<string | undefined>;
  /** Several keys in one atomic read (values by key; absent keys are left out). */
  readKeys(keys: string[], hooks?: RetryHooks): Promise<Map<string, string>>;
  /** A plain DeleteRange of one key: never quota-checked, on any etcd version. Returns how many keys it deleted. */
  deleteKey(key: string): Promise<number>;
  txn(what: string, compare: ICompare[], success: IRequestOp[]): Promise<Pick<ITxnResponse, 'succeeded'>>;
  put(key: string, value: string, lease?: string): Promise<unknown>;
  leaseGrant(ttlSeconds: number): Promise<string>;
  leaseRevoke(id: string): Promise<unknown>;
  leaseKeepAlive(id: string, timeoutMs?: number): Promise<number>;
  serverMetrics(timeoutMs?: number): Promise<ServerMetrics>;
}

/** Member clients by endpoint. */
export interface EtcdPool {
  get(endpoint: string): EtcdMember;
  close(): void;
}

/**
 * Why a member URL is refused: with etcd.endpoint on https://, a member that advertises http://
 * (or anything but https://) would get our password and requests in the clear. Nothing is sent.
 */
export function refusedUrl(endpoint: string, access: Pick<Access, 'tls'>): DefragdError | undefined {
  if (!access.tls || endpoint.startsWith('https://')) return undefined;
  return new DefragdError(
    'EDD_TLS',
    `member URL ${endpoint} is not https:// while etcd.endpoint is: refused, nothing is sent there ` +
      '(it would carry the password and requests in the clear); accepted: https:// client URLs (etcd --advertise-client-urls)',
    { permanent: true },
  );
}

/** A client bound to exactly one member endpoint. */
export class MemberClient implements EtcdMember {
  readonly endpoint: string;
  private readonly etcd: Etcd3 | undefined;
  private readonly access: Access;
  /** Set for a URL refusedUrl() refuses: every call fails with it, and no connection is made. */
  private readonly refused: DefragdError | undefined;

  constructor(endpoint: string, access: Access) {
    this.endpoint = endpoint;
    this.access = access;
    this.refused = refusedUrl(endpoint, access);
    const tls = endpoint.startsWith('https:');
    this.etcd = this.refused
      ? undefined
      : new Etcd3({
          hosts: [endpoint],
          credentials: tls ? { rootCertificate: access.ca as Buffer, privateKey: access.key, certChain: access.cert } : undefined,
          auth: access.username
            ? { username: access.username, password: access.password ?? '', callOptions: () => ({ deadline: this.deadline() }) }
            : undefined,
          // Our own retry decides per operation; the library's retry would re-send a timed-out defragment.
          faultHandling: { global: noop, host: () => noop },
          grpcOptions: {
            'grpc.initial_reconnect_backoff_ms': 200,
            'grpc.max_reconnect_backoff_ms': 2000,
            'grpc.max_receive_message_length': 64 * 1024 * 1024,
          },
        });
  }

  private get client(): Etcd3 {
    if (!this.etcd) throw this.refused!;
    return this.etcd;
  }

  private deadline(ms = this.access.requestTimeout): Date {
    return new Date(Date.now() + ms);
  }

  /** A read that is safe to repeat: retried on transient errors with capped, jittered backoff. */
  async read<T>(
    what: string,
    fn: (deadline: Date) => Promise<T>,
    hooks: RetryHooks = {},
    attempts = this.access.retry.attempts,
  ): Promise<T> {
    try {
      return await pRetry(() => fn(this.deadline()), {
        retries: Math.max(0, attempts - 1),
        minTimeout: this.access.retry.minDelay,
        maxTimeout: this.access.retry.maxDelay,
        factor: 2,
        randomize: true,
        signal: hooks.signal,
        shouldRetry: ({ error, attemptNumber, retriesLeft }) => {
          const kind = classify(error);
          if (!isTransient(kind)) return false;
          hooks.log?.warn(
            { event: 'etcd.retry', endpoint: this.endpoint, op: what, attempt: attemptNumber, retriesLeft, error: error.message },
            `${what} on ${this.endpoint} failed (attempt ${attemptNumber}, ${retriesLeft} left): ${error.message}`,
          );
          return true;
        },
      });
    } catch (err) {
      throw toDefragdError(err, what, this.endpoint);
    }
  }

  /** A mutation: sent exactly once. */
  async sendOnce<T>(what: string, fn: (deadline: Date) => Promise<T>, timeout = this.access.requestTimeout): Promise<T> {
    try {
      return await fn(this.deadline(timeout));
    } catch (err) {
      throw toDefragdError(err, what, this.endpoint);
    }
  }

  status(hooks?: RetryHooks, attempts?: number): Promise<MemberStatus> {
    return this.read(
      'status',
      async (deadline) => toStatus(this.endpoint, await this.client.maintenance.status({ deadline })),
      hooks,
      attempts,
    );
  }

  /** One Status with a short deadline, no retry: does the member answer right now? */
  async probe(timeoutMs: number): Promise<MemberStatus | Error> {
    if (this.refused) return this.refused;
    try {
      return toStatus(this.endpoint, await this.client.maintenance.status({ deadline: this.deadline(timeoutMs) }));
    } catch (err) {
      return toDefragdError(err, 'status', this.endpoint);
    }
  }

  async members(hooks?: RetryHooks, attempts?: number): Promise<Member[]> {
    const res = await this.read(
      'member list',
      (deadline) => this.client.cluster.memberList({ linearizable: true } as never, { deadline }),
      hooks,
      attempts,
    );
    return res.members.map((m: IMember) => ({
      id: String(m.ID),
      name: m.name,
      clientURLs: m.clientURLs ?? [],
      peerURLs: m.peerURLs ?? [],
      isLearner: Boolean(m.isLearner),
    }));
  }

  async alarms(hooks?: RetryHooks): Promise<Alarm[]> {
    const res = await this.read('alarm list', (deadline) => this.client.maintenance.alarm({ action: 'Get' } as never, { deadline }), hooks);
    // The proto spells the enum Nospace/Corrupt; etcdctl and operators say NOSPACE/CORRUPT.
    return (res.alarms ?? []).map((a) => ({ memberId: String(a.memberID), alarm: String(a.alarm).toUpperCase() }));
  }

  /** The member's current revision from a serializable count-only read (answered locally, works during NOSPACE). */
  async revision(hooks?: RetryHooks, attempts?: number): Promise<bigint> {
    const res = await this.read(
      'revision',
      (deadline) => this.client.kv.range({ key: Buffer.from('\0'), count_only: true, serializable: true } as never, { deadline }),
      hooks,
      attempts,
    );
    return BigInt(res.header.revision);
  }

  disarm(alarm: Alarm): Promise<unknown> {
    return this.sendOnce('alarm disarm', (deadline) =>
      this.client.maintenance.alarm(
        { action: 'Deactivate', memberID: alarm.memberId, alarm: alarm.alarm.charAt(0) + alarm.alarm.slice(1).toLowerCase() } as never,
        { deadline },
      ),
    );
  }

  /** Never retried: a client deadline does not cancel the server-side defrag. */
  async defragment(): Promise<DefragmentReply> {
    await this.sendOnce('defragment', (deadline) => this.client.maintenance.defragment({ deadline }), this.access.defragTimeout);
  }

  moveLeader(targetId: string): Promise<unknown> {
    return this.sendOnce('move leader', (deadline) => this.client.maintenance.moveLeader({ targetID: targetId }, { deadline }));
  }

  /** HashKV through the raw pool: the etcd3 wrapper calls a method name the proto does not have. */
  hashKV(revision: bigint, hooks?: RetryHooks, attempts?: number, timeoutMs?: number): Promise<HashKV> {
    return this.read(
      'hash kv',
      async (d) => {
        const deadline = timeoutMs === undefined ? d : this.deadline(timeoutMs);
        const pool = (
          this.client as unknown as { pool: { exec(s: string, m: string, p: unknown, o: unknown): Promise<Record<string, unknown>> } }
        ).pool;
        const res = await pool.exec('Maintenance', 'hashKv', { revision: revision.toString() }, { deadline });
        return {
          hash: String(res.hash),
          compactRevision: BigInt(String(res.compact_revision ?? '0')),
          revision: BigInt(String((res.header as { revision: string }).revision)),
        };
      },
      hooks,
      attempts,
    );
  }

  /** Sent once; `physical` waits until the member that serves it has dropped the history (its own deadline). */
  compact(revision: bigint, physical = false, timeoutMs = this.access.requestTimeout): Promise<unknown> {
    return this.sendOnce(
      'compact',
      (deadline) => this.client.kv.compact({ revision: revision.toString(), physical }, { deadline }),
      timeoutMs,
    );
  }

  /** A linearizable read through raft: proves the member can reach a quorum. */
  linearizableRead(key: string, hooks?: RetryHooks): Promise<unknown> {
    return this.read(
      'linearizable read',
      (deadline) => this.client.kv.range({ key: Buffer.from(key), serializable: false, count_only: true } as never, { deadline }),
      hooks,
    );
  }

  async range(
    prefix: string,
    hooks?: RetryHooks,
    attempts?: number,
    limit?: number,
  ): Promise<{ kvs: IKeyValue[]; revision: bigint; more: boolean }> {
    const res = await this.read(
      'range',
      (deadline) => this.client.kv.range({ key: Buffer.from(prefix), range_end: prefixEnd(prefix), limit }, { deadline }),
      hooks,
      attempts,
    );
    return { kvs: res.kvs, revision: BigInt(res.header.revision), more: Boolean(res.more) };
  }

  /**
   * One page of a scan: up to `limit` keys from `start` (inclusive) to `end` (exclusive; [0] = to
   * the end of the keyspace). Serializable: answered from this member's own copy, with no round
   * through the leader (usage.ts reads from a follower this way).
   */
  async rangePage(
    start: Buffer,
    end: Buffer,
    limit: number,
    hooks?: RetryHooks,
    attempts?: number,
  ): Promise<{ kvs: IKeyValue[]; revision: bigint; more: boolean }> {
    const res = await this.read(
      'range page',
      (deadline) => this.client.kv.range({ key: start, range_end: end, limit, serializable: true }, { deadline }),
      hooks,
      attempts,
    );
    return { kvs: res.kvs, revision: BigInt(res.header.revision), more: Boolean(res.more) };
  }

  async get(key: string, hooks?: RetryHooks): Promise<string | undefined> {
    const res = await this.read('get', (deadline) => this.client.kv.range({ key: Buffer.from(key) }, { deadline }), hooks);
    return res.kvs[0]?.value.toString();
  }

  /**
   * One read-only Txn (atomic). etcd before 3.4.20 and 3.5.7 refuses even a read-only Txn on a
   * member whose db is at its quota (BackendQuota.Available has no cost-0 pass-through there); then
   * the keys are read one by one: with writes refused, none of them can be written in between.
   */
  async readKeys(keys: string[], hooks?: RetryHooks): Promise<Map<string, string>> {
    const out = new Map<string, string>();
    try {
      const res = await this.read(
        'read keys',
        (deadline) =>
          this.client.kv.txn(
            { compare: [], success: keys.map((k) => ({ request_range: { key: Buffer.from(k) } })), failure: [] },
            { deadline },
          ),
        hooks,
      );
      for (const r of res.responses) for (const kv of r.response_range?.kvs ?? []) out.set(kv.key.toString(), kv.value.toString());
      return out;
    } catch (err) {
      if (kindOf(err) !== 'nospace') throw err;
    }
    const values = await Promise.all(keys.map((k) => this.get(k, hooks)));
    keys.forEach((k, i) => {
      if (values[i] !== undefined) out.set(k, values[i]);
    });
    return out;
  }

  async deleteKey(key: string): Promise<number> {
    const res = await this.sendOnce('delete', (deadline) => this.client.kv.deleteRange({ key: Buffer.from(key) }, { deadline }));
    return Number(res.deleted);
  }

  txn(what: string, compare: ICompare[], success: IRequestOp[]): Promise<ITxnResponse> {
    return this.sendOnce(what, (deadline) => this.client.kv.txn({ compare, success, failure: [] }, { deadline }));
  }

  put(key: string, value: string, lease?: string): Promise<unknown> {
    return this.sendOnce('put', (deadline) =>
      this.client.kv.put({ key: Buffer.from(key), value: Buffer.from(value), lease }, { deadline }),
    );
  }

  async leaseGrant(ttlSeconds: number): Promise<string> {
    const res = await this.sendOnce('lease grant', (deadline) => this.client.leaseClient.leaseGrant({ TTL: ttlSeconds }, { deadline }));
    return String(res.ID);
  }

  leaseRevoke(id: string): Promise<unknown> {
    return this.sendOnce('lease revoke', (deadline) => this.client.leaseClient.leaseRevoke({ ID: id }, { deadline }));
  }

  /** One keep-alive over a short-lived stream; returns the remaining TTL (0: the lease is gone). */
  async leaseKeepAlive(id: string, timeoutMs = this.access.requestTimeout): Promise<number> {
    return this.sendOnce(
      'lease keep-alive',
      async (deadline) => {
        const stream = await this.client.leaseClient.leaseKeepAlive({ deadline });
        try {
          return await new Promise<number>((resolve, reject) => {
            stream.on('data', (res: { TTL: string }) => resolve(Number(res.TTL)));
            stream.on('error', reject);
            stream.on('end', () => reject(new Error('keep-alive stream ended')));
            stream.write({ ID: id });
          });
        } finally {
          stream.end();
        }
      },
      timeoutMs,
    );
  }

  /**
   * The member's own /metrics page, on the same URL and TLS as its gRPC API; no retry (callers
   * poll). Served by etcd's HTTP handler, so it answers while the member defragments. A page over
   * MAX_METRICS_BYTES is cut off (the request is destroyed) and reported as a page that cannot
   * tell: a broken or hostile member must not fill every daemon's memory.
   */
  serverMetrics(timeoutMs = this.access.requestTimeout, maxBytes = MAX_METRICS_BYTES): Promise<ServerMetrics> {
    if (this.refused) return Promise.reject(this.refused);
    const url = new URL('/metrics', this.endpoint);
    const tls = url.protocol === 'https:';
    return new Promise<ServerMetrics>((resolve, reject) => {
      const opts = {
        method: 'GET',
        timeout: timeoutMs,
        headers: { accept: 'text/plain' },
        ...(tls ? { ca: this.access.ca, cert: this.access.cert, key: this.access.key } : {}),
      };
      const tooLarge = (what: string) => {
        reject(new MetricsPageError(`metrics on ${this.endpoint}: the page is ${what}, over the ${maxBytes}-byte limit; cut off`));
        req.destroy();
      };
      const req = (tls ? httpsRequest : httpRequest)(url, opts, (res) => {
        if (res.statusCode !== 200) {
          res.resume();
          reject(new MetricsPageError(`metrics on ${this.endpoint}: HTTP ${res.statusCode}`));
          return;
        }
        const declared = Number(res.headers['content-length']);
        if (declared > maxBytes) return tooLarge(`${declared} bytes long`);
        const chunks: Buffer[] = [];
        let size = 0;
        res.on('data', (chunk: Buffer) => {
          size += chunk.length;
          if (size > maxBytes) return tooLarge('longer');
          chunks.push(chunk);
        });
        res.on('end', () => resolve(parseServerMetrics(Buffer.concat(chunks).toString('utf8'))));
        res.on('error', (err) => reject(toDefragdError(err, 'metrics', this.endpoint)));
      });
      const timer = setTimeout(() => req.destroy(new Error('metrics: timed out')), timeoutMs);
      req.on('close', () => clearTimeout(timer));
      req.on('timeout', () => req.destroy(new Error('metrics: timed out')));
      req.on('error', (err) => reject(toDefragdError(err, 'metrics', this.endpoint)));
      req.end();
    });
  }

  close(): void {
    this.etcd?.close();
  }
}

/** The compare "this key exists" (its version is above 0). */
export const keyExists = (key: string): ICompare =>
  ({ key: Buffer.from(key), target: 'Version', result: 'Greater', version: 0 }) as ICompare;

export function prefixEnd(prefix: string): Buffer {
  const b = Buffer.from(prefix);
  const end = Buffer.from(b);
  for (let i = end.length - 1; i >= 0; i--) {
    if (end[i]! < 0xff) {
      end[i]!++;
      return end.subarray(0, i + 1);
    }
  }
  return Buffer.from([0]);
}

/** Member clients by endpoint, created once and reused across runs. */
export class ClientPool implements EtcdPool {
  private readonly clients = new Map<string, MemberClient>();
  constructor(readonly access: Access) {}

  get(endpoint: string): MemberClient {
    let client = this.clients.get(endpoint);
    if (!client) {
      client = new MemberClient(endpoint, this.access);
      this.clients.set(endpoint, client);
    }
    return client;
  }

  close(): void {
    for (const client of this.clients.values()) client.close();
    this.clients.clear();
  }
}
