// An in-memory model of the part of etcd's API that the turn, the run and the daemon use, driven by
// the fake clock. It implements the same EtcdMember/EtcdPool interfaces as the real client, so the
// production code runs against it unchanged. Where a behaviour is etcd's, the comment says where it
// comes from: /work/shared/etcd-facts.md ("facts": seen on real 3.4.23/3.5.30 clusters) or the etcd
// source (github.com/etcd-io/etcd, 3.4/3.5 branches).
//
// One keyspace stands for the replicated state machine (all members apply the same log); what is
// per member is reachability (up, frozen, killed), its own defragment, its db sizes, its applied
// index and the routing of its endpoint.
import type { ICompare, IKeyValue, IRequestOp } from 'etcd3';
import {
  prefixEnd,
  toDefragdError,
  type DefragmentReply,
  type EtcdMember,
  type EtcdPool,
  type HashKV,
  type Member,
  type RetryHooks,
  type ServerMetrics,
} from '../../src/etcd.ts';
import type { Alarm, MemberStatus } from '../../src/view.ts';
import type { FakeClock, Owner } from './clock.ts';

const MiB = 1024 * 1024;
const LATENCY = 2; // ms each way on loopback
/** etcd's election timeout (--election-timeout default 1000 ms). */
const ELECTION_MS = 1000;
/** How often the leader's lessor looks for expired leases (lessor.go: revokeExpiredLeases every 500 ms). */
const EXPIRY_TICK_MS = 500;
/**
 * A halt written from outside the turn (a schedule step) can meet a Defragment already past its
 * sender's last read of the halt: that read, then at most a keep-alive or a Status, then the send,
 * a few round trips of LATENCY each. Such a Defragment may arrive this long after the halt.
 */
const HALT_IN_FLIGHT_MS = 50;

export const ERR = {
  timeout: () => new Error('4 DEADLINE_EXCEEDED: Deadline exceeded'),
  unavailable: () => new Error('14 UNAVAILABLE: No connection established'),
  // rpctypes.ErrGRPCNoSpace (api/v3rpc/rpctypes/error.go)
  nospace: () => new Error('etcdserver: mvcc: database space exceeded'),
  notLeader: () => new Error('etcdserver: not leader'),
  compacted: () => new Error('etcdserver: mvcc: required revision has been compacted'),
  future: () => new Error('etcdserver: mvcc: required revision is a future revision'),
  leaseNotFound: () => new Error('etcdserver: requested lease not found'),
  // rpctypes.ErrGRPCCorrupt: what applierV3Corrupt answers every write while CORRUPT is raised
  corrupt: () => new Error('etcdserver: corrupt cluster'),
};

interface KV {
  keyBuf?: Buffer;
  value: Buffer;
  create: bigint;
  mod: bigint;
  version: bigint;
  lease: string; // decimal, '0' for none
}

interface Lease {
  id: string; // decimal
  ttlMs: number;
  expiresAt: number;
  keys: Set<string>;
  grantedBy: string; // owner name (tests)
}

export interface ModelMember {
  id: string; // decimal
  name: string;
  endpoint: string;
  state: 'up' | 'frozen' | 'killed';
  frozenAt?: number;
  dbSize: number;
  dbSizeInUse: number;
  defragMs: number;
  /** When the defragment under way ends (undefined: none). */
  defragEndsAt?: number;
  defragQueued: number;
  /** Applied index while it cannot apply (frozen, killed, defragmenting: the backend is locked). */
  appliedHeld?: bigint;
  corrupt: boolean;
  isLearner: boolean;
  defrags: number;
  /** Replies of the next mutations this member applies are lost on the way back. */
  loseReplies: number;
  /** Pages freed by the last compaction: counted out of dbSizeInUse at the next backend commit (facts). */
  freePending: number;
}

export interface Violation {
  at: number;
  what: string;
}

interface Waiter {
  ready: () => boolean;
  run: () => void;
  /** A mutation whose caller's deadline passed: it still applies where it arrived, unless that member dies first. */
  orphanOf?: () => ModelMember | undefined;
}

export interface ModelOptions {
  members?: number;
  quotaBytes: number;
  retry: { attempts: number; minDelay: number; maxDelay: number };
  requestTimeout: number;
  defragTimeout: number;
  haltKeys?: string[]; // keys whose presence means "halted" (checked at every defragment)
  fuse?: { key: string; armed: string };
}

export class EtcdModel {
  readonly members: ModelMember[] = [];
  private kv = new KvStore();
  private leases = new Map<string, Lease>();
  revision = 1n;
  compactRev = 0n;
  /** Compactions a client (a daemon) sent while no alarm was raised: the fallback compaction (compaction.fallback). */
  clientCompactionsOutsideAlarm = 0;
  commitIndex = 10n;
  leader: string | undefined;
  private electionAt: number | undefined;
  alarms: Alarm[] = [];
  violations: Violation[] = [];
  /** Called when a Defragment arrives at a member, before it starts (the sim checks who sent it). */
  onDefragmentArrive: ((member: ModelMember, by: string) => void) | undefined;
  /** History not yet compacted: bytes written at each revision (the API server's churn). */
  private history: { rev: bigint; bytes: number }[] = [];
  /** Mutations applied after their caller's deadline had passed, by operation (coverage). */
  late: Record<string, number> = {};
  /** Called when a request arrives at its member, before it is served (directed tests inject faults here). */
  onArrive: ((owner: Owner, op: string, endpoint: string, detail?: string) => void) | undefined;
  /** Per member: HashKV takes this long (a full-keyspace hash of a large db). */
  hashMs = new Map<string, number>();
  /** MoveLeader fails (a directed test: a leader that cannot hand leadership away). */
  refuseMoveLeader = false;
  /**
   * etcd before 3.4.20 / 3.5.7: BackendQuota.Available has no cost-0 pass-through, so a member whose
   * db is at its quota refuses every Txn while NOSPACE is raised, read-only and delete-only alike.
   */
  txnQuotaBefore3420 = false;

  /** Refuses a Txn as etcd before 3.4.20 / 3.5.7 did at a member over its quota (see txnQuotaBefore3420). */
  oldQuotaCheck(m: ModelMember): void {
    if (this.txnQuotaBefore3420 && m.dbSize >= this.opts.quotaBytes && this.alarms.some((a) => a.alarm === 'NOSPACE')) throw ERR.nospace();
  }
  /** Requests sent, by operation (to see where simulated time goes, and for the tests). */
  stats: Record<string, number> = {};
  /** Defragment arrivals: who, when (the checks and the tests read it). */
  defragLog: { member: string; at: number; by: string }[] = [];
  private waiters: Waiter[] = [];
  /** endpoint -> member id; an endpoint can be re-pointed (DNS, a load balancer). */
  routes = new Map<string, string>();
  private nextLease = 0x694d8a0000n;

  constructor(
    readonly clock: FakeClock,
    readonly opts: ModelOptions,
  ) {
    const n = opts.members ?? 3;
    for (let i = 0; i < n; i++) {
      const id = (0x8e9e05c52164694dn + BigInt(i) * 0x1111n).toString();
      const endpoint = `https://10.0.0.${i + 1}:2379`;
      this.members.push({
        id,
        name: `m${i + 1}`,
        endpoint,
        state: 'up',
        dbSize: 300 * MiB,
        dbSizeInUse: 100 * MiB,
        defragMs: 3000,
        defragQueued: 0,
        corrupt: false,
        isLearner: false,
        defrags: 0,
        loseReplies: 0,
        freePending: 0,
      });
      this.routes.set(endpoint, id);
    }
    this.leader = this.members[0]!.id;
    this.tick();
  }

  // ---- faults and observations (the schedule's steps) ----

  member(name: string): ModelMember {
    return this.members.find((m) => m.name === name || m.id === name || m.endpoint === name)!;
  }

  private byId(id: string | undefined): ModelMember | undefined {
    return id === undefined ? undefined : this.members.find((m) => m.id === id);
  }

  /** Every call to it hangs until the caller's deadline (SIGSTOP); its defragment pauses too. */
  freeze(name: string): void {
    const m = this.member(name);
    if (m.state !== 'up') return;
    this.holdApplied(m);
    m.state = 'frozen';
    m.frozenAt = this.clock.now();
    if (m.id === this.leader) this.loseLeader();
    else this.checkQuorum();
  }

  thaw(name: string): void {
    const m = this.member(name);
    if (m.state !== 'frozen') return;
    m.state = 'up';
    if (m.defragEndsAt !== undefined) {
      m.defragEndsAt += this.clock.now() - m.frozenAt!;
      this.scheduleDefragEnd(m);
    }
    this.releaseApplied(m);
    if (!this.leader && this.electionAt === undefined) this.loseLeader();
    this.wake();
  }

  /** The process dies: connections refused; a defragment under way dies with it. */
  kill(name: string): void {
    const m = this.member(name);
    if (m.state === 'killed') return;
    this.holdApplied(m);
    m.state = 'killed';
    m.defragEndsAt = undefined;
    m.defragQueued = 0;
    // What reached it and was not applied dies with it.
    this.waiters = this.waiters.filter((w) => !w.orphanOf || w.orphanOf() !== m);
    if (m.id === this.leader) this.loseLeader();
    else this.checkQuorum();
    this.wake();
  }

  restart(name: string): void {
    const m = this.member(name);
    if (m.state !== 'killed') return;
    m.state = 'up';
    this.releaseApplied(m);
    if (!this.leader && this.electionAt === undefined) this.loseLeader();
    this.wake();
  }

  /**
   * Writes from outside the daemons (the API server): history that only a compaction frees, on every
   * member (the log is replicated). The file grows once the free pages are used up; a member whose
   * file reaches the quota raises NOSPACE at the next write. Refused under NOSPACE or without quorum.
   */
  churn(bytes: number): boolean {
    if (this.alarms.length > 0 || !this.leaderLive() || !this.quorum()) return false;
    // Many small writes: the one that finds a file at the quota is refused and raises the alarm.
    const room = this.opts.quotaBytes + MiB - Math.max(...this.members.map((m) => m.dbSizeInUse));
    bytes = Math.min(bytes, room);
    if (bytes <= 0) return false;
    this.revision++;
    this.history.push({ rev: this.revision, bytes });
    for (const m of this.members) {
      m.dbSizeInUse += bytes;
      m.dbSize = Math.max(m.dbSize, m.dbSizeInUse);
    }
    this.commit();
    for (const m of this.members) if (m.state !== 'killed' && m.dbSize >= this.opts.quotaBytes) this.raiseNoSpace(m);
    return true;
  }

  /** Bytes of history a compaction to the latest revision would free. */
  historyBytes(): number {
    return this.history.reduce((n, h) => n + h.bytes, 0);
  }

  /** The API server's compactor (every 5 minutes in Kubernetes): its Txn puts a key, so NOSPACE stops it (facts). */
  apiCompact(): boolean {
    if (this.alarms.length > 0 || !this.leaderLive() || !this.quorum() || this.revision <= this.compactRev) return false;
    this.compact(this.revision);
    return true;
  }

  /** A CORRUPT alarm (a hash mismatch found by etcd's corruption check); only an operator clears it. */
  raiseCorrupt(name: string): void {
    const m = this.member(name);
    if (!this.alarms.some((a) => a.memberId === m.id && a.alarm === 'CORRUPT')) this.alarms.push({ memberId: m.id, alarm: 'CORRUPT' });
    this.commit();
  }

  clearCorrupt(): void {
    this.alarms = this.alarms.filter((a) => a.alarm !== 'CORRUPT');
    this.commit();
    this.wake();
  }

  /** Makes a member need a defragment again (fragmentation from churn). */
  fragment(name: string, bytes = 200 * MiB): void {
    const m = this.member(name);
    m.dbSize += bytes;
  }

  /** The member's file reaches the quota: etcd raises NOSPACE through raft, cluster-wide (facts). */
  fillToQuota(name: string): void {
    const m = this.member(name);
    m.dbSize = Math.max(m.dbSize, this.opts.quotaBytes + MiB);
    this.raiseNoSpace(m);
  }

  private raiseNoSpace(m: ModelMember): void {
    if (!this.alarms.some((a) => a.memberId === m.id && a.alarm === 'NOSPACE')) this.alarms.push({ memberId: m.id, alarm: 'NOSPACE' });
  }

  /** MoveLeader/election: the new leader's lessor extends every lease (lessor.go Promote: expiry = now + extend + TTL). */
  private elect(m: ModelMember): void {
    this.leader = m.id;
    this.electionAt = undefined;
    for (const l of this.leases.values()) l.expiresAt = Math.max(l.expiresAt, this.clock.now() + ELECTION_MS + l.ttlMs);
    this.commit();
    this.wake();
  }

  /**
   * A live majority of the voting members: frozen and killed ones do not vote; a defragmenting one
   * does (its raft loop runs beside the locked backend). Without it nothing commits.
   */
  quorum(): boolean {
    let voters = 0;
    let up = 0;
    for (const m of this.members) {
      if (m.isLearner) continue;
      voters++;
      if (m.state === 'up') up++;
    }
    return 2 * up > voters;
  }

  /** An election after the timeout; it needs a majority (a thaw or a restart starts another). */
  private loseLeader(): void {
    this.leader = undefined;
    this.electionAt = this.clock.now() + ELECTION_MS;
    this.clock.at(this.electionAt, () => {
      if (this.leader) return;
      const next = this.members.find((x) => x.state === 'up' && !x.isLearner);
      if (next && this.quorum()) this.elect(next);
      else this.electionAt = undefined;
    });
  }

  /** CheckQuorum: a leader that hears from no majority for an election timeout steps down. */
  private checkQuorum(): void {
    const leader = this.leader;
    if (!leader || this.quorum()) return;
    this.clock.at(this.clock.now() + ELECTION_MS, () => {
      if (this.leader === leader && !this.quorum()) this.leader = undefined;
    });
  }

  /** A leader change without a fault (etcd decides, e.g. after a network blip). */
  changeLeader(): void {
    if (!this.quorum()) return;
    const others = this.members.filter((m) => m.state === 'up' && !m.isLearner && m.id !== this.leader);
    if (others.length > 0) this.elect(others[0]!);
  }

  defragmenting(): ModelMember[] {
    return this.members.filter((m) => m.defragEndsAt !== undefined);
  }

  /** Halted as the run defines it: the halt key, or the fuse armed and blown. */
  halted(): boolean {
    if ((this.opts.haltKeys ?? []).some((k) => this.kv.has(k))) return true;
    const f = this.opts.fuse;
    return f !== undefined && this.kv.has(f.armed) && !this.kv.has(f.key);
  }

  keys(prefix = ''): string[] {
    const end = prefix ? prefixEnd(prefix) : undefined;
    return this.kv.range(prefix, end && !(end.length === 1 && end[0] === 0) ? end.toString('latin1') : undefined).map(([k]) => k);
  }

  getValue(key: string): string | undefined {
    return this.kv.get(key)?.value.toString();
  }

  leaseAlive(idDec: string): boolean {
    return this.leases.has(idDec);
  }

  /** Writes outside the daemons (an operator, the API server). */
  adminPut(key: string, value: string): void {
    this.applyTxn([], [{ request_put: { key: Buffer.from(key), value: Buffer.from(value) } }]);
  }

  adminDelete(key: string): void {
    this.applyTxn([], [{ request_delete_range: { key: Buffer.from(key) } }]);
  }

  disarmAll(): void {
    this.alarms = [];
  }

  // ---- the state machine ----

  private holdApplied(m: ModelMember): void {
    m.appliedHeld ??= this.commitIndex;
  }

  private releaseApplied(m: ModelMember): void {
    if (m.state === 'up' && m.defragEndsAt === undefined) m.appliedHeld = undefined;
  }

  private leaderLive(): ModelMember | undefined {
    const l = this.byId(this.leader);
    return l && l.state === 'up' ? l : undefined;
  }

  /**
   * The leader's lessor revokes expired leases through raft; a frozen or dead leader, or one without
   * a majority, revokes nothing, and neither does one under CORRUPT (applierV3Corrupt refuses LeaseRevoke).
   */
  private tick(): void {
    this.clock.at(this.clock.now() + EXPIRY_TICK_MS, () => {
      if (this.expiring()) {
        for (const l of [...this.leases.values()]) if (l.expiresAt <= this.clock.now()) this.revoke(l.id);
      }
      this.tick();
    });
  }

  /** Whether leases that are not kept alive expire now. */
  expiring(): boolean {
    return this.leaderLive() !== undefined && this.quorum() && !this.corrupt();
  }

  private revoke(id: string): boolean {
    const l = this.leases.get(id);
    if (!l) return false;
    this.leases.delete(id);
    if (l.keys.size > 0) {
      // One revision for the whole revoke (mvcc: the deletes of a LeaseRevoke share one txn).
      this.revision++;
      for (const k of l.keys) this.kv.delete(k);
    }
    this.commit();
    this.wake();
    return true;
  }

  private range(key: Buffer, rangeEnd?: Buffer): [string, KV][] {
    if (!rangeEnd || rangeEnd.length === 0) {
      const k = key.toString();
      const v = this.kv.get(k);
      return v ? [[k, v]] : [];
    }
    const all = rangeEnd.length === 1 && rangeEnd[0] === 0;
    return this.kv.range(key.toString('latin1'), all ? undefined : rangeEnd.toString('latin1'));
  }

  /**
   * etcd's applyCompare (server/etcdserver/apply.go in 3.4/3.5): a compare on a range must hold for
   * every key in it; on an empty range it is evaluated against a zero KeyValue (version, create and
   * mod revision 0), except a Value compare, which then fails.
   */
  private compare(c: ICompare): boolean {
    const rows = this.range(c.key as Buffer, (c as { range_end?: Buffer }).range_end);
    const target = c.target as string;
    if (rows.length === 0) {
      if (target === 'Value') return false;
      return compareKV(c, { value: Buffer.alloc(0), create: 0n, mod: 0n, version: 0n, lease: '0' });
    }
    return rows.every(([, kv]) => compareKV(c, kv));
  }

  /** Applies a Txn (all compares, then the success ops); one revision for all its writes. */
  applyTxn(compare: ICompare[], success: IRequestOp[]): { succeeded: boolean } {
    const ok = compare.every((c) => this.compare(c));
    if (!ok) return { succeeded: false };
    const writes = success.filter((op) => op.request_put || op.request_delete_range);
    if (writes.length === 0) return { succeeded: true };
    const rev = this.revision + 1n;
    let changed = false;
    for (const op of success) {
      if (op.request_put) {
        const key = Buffer.from(op.request_put.key as Buffer).toString();
        const lease = String(op.request_put.lease ?? '0');
        if (lease !== '0' && !this.leases.has(lease)) throw ERR.leaseNotFound();
        const prev = this.kv.get(key);
        if (prev && prev.lease !== '0') this.leases.get(prev.lease)?.keys.delete(key);
        this.kv.set(key, {
          value: Buffer.from((op.request_put.value as Buffer) ?? Buffer.alloc(0)),
          create: prev?.create ?? rev,
          mod: rev,
          version: (prev?.version ?? 0n) + 1n,
          lease,
        });
        if (lease !== '0') this.leases.get(lease)!.keys.add(key);
        changed = true;
      } else if (op.request_delete_range) {
        for (const [key, kv] of this.range(
          op.request_delete_range.key as Buffer,
          op.request_delete_range.range_end as Buffer | undefined,
        )) {
          this.kv.delete(key);
          if (kv.lease !== '0') this.leases.get(kv.lease)?.keys.delete(key);
          changed = true;
        }
      }
    }
    // A txn that deletes nothing and puts nothing does not bump the revision (mvcc: no changes).
    if (changed) this.revision = rev;
    this.commit();
    this.wake();
    return { succeeded: true };
  }

  private hasPut(ops: IRequestOp[]): boolean {
    return ops.some((op) => op.request_put);
  }

  /**
   * NOSPACE (facts, seen on 3.4.23): Put, a Txn with a put and LeaseGrant fail; reads, deletes, a
   * compare-and-delete Txn, keep-alive, compact, defragment and disarm work. Disarming while a member
   * is still over the quota gets the alarm raised again by the next write.
   */
  private corrupt(): boolean {
    return this.alarms.some((a) => a.alarm === 'CORRUPT');
  }

  /** applierV3Corrupt (etcdserver/apply.go): while CORRUPT is raised every applied write fails; reads bypass it. */
  private checkCorrupt(): void {
    if (this.corrupt()) throw ERR.corrupt();
  }

  /**
   * One raft entry applied. Pages a compaction freed are released by the backend commit after it:
   * Status' in-use size lags a compaction by a commit (facts).
   */
  private commit(): void {
    this.commitIndex++;
    for (const m of this.members) {
      if (m.freePending === 0 || m.appliedHeld !== undefined) continue;
      m.dbSizeInUse -= m.freePending;
      m.freePending = 0;
    }
  }

  private checkSpace(): void {
    if (this.alarms.some((a) => a.alarm === 'NOSPACE')) throw ERR.nospace();
    const over = this.members.find((m) => m.dbSize >= this.opts.quotaBytes && m.state !== 'killed');
    if (over) {
      this.raiseNoSpace(over);
      throw ERR.nospace();
    }
  }

  private wake(): void {
    if (this.waiters.length === 0) return;
    const still: Waiter[] = [];
    const ready: Waiter[] = [];
    for (const w of this.waiters) (w.ready() ? ready : still).push(w);
    this.waiters = still;
    for (const w of ready) w.run();
  }

  private scheduleDefragEnd(m: ModelMember): void {
    const ends = m.defragEndsAt!;
    this.clock.at(ends, () => {
      if (m.defragEndsAt !== ends || m.state !== 'up') return;
      m.defragEndsAt = undefined;
      m.defrags++;
      // The copy holds only the pages in use: freed ones, counted or not yet, stay behind.
      m.dbSizeInUse -= m.freePending;
      m.freePending = 0;
      m.dbSize = m.dbSizeInUse;
      this.commit();
      if (m.defragQueued > 0) {
        // A second Defragment sent while one ran waited for it and now runs (facts: a re-sent
        // defragment queues a second defrag on the same member).
        m.defragQueued--;
        m.defragEndsAt = this.clock.now() + m.defragMs;
        this.scheduleDefragEnd(m);
      } else this.releaseApplied(m);
      this.wake();
    });
  }

  // ---- requests ----

  /**
   * One request from `owner` to the member behind `endpoint`: it arrives after LATENCY, waits until
   * `ready` (the member answers and whatever it needs is free), runs `apply`, and the reply takes
   * LATENCY back. A killed member refuses the connection; otherwise the caller's deadline bounds it.
   * A lost reply (after the request was applied) ends at the deadline like a frozen member.
   *
   * Kinds: `backend` and `metrics` are answered by the member itself (Status, serializable reads,
   * HashKV, /metrics); `raft` needs a leader and a live majority, and the member's backend to apply
   * (writes, linearizable reads, alarms, compaction); `leader` needs a leader and a majority but not
   * the backend (MoveLeader, MemberList's ReadIndex); `keepalive` is answered by the leader's lessor;
   * `memory` by the member alone, even while it defragments (Defragment itself).
   *
   * A mutation that reached its member is not taken back when the caller's deadline passes: etcd
   * applies it once it can (a majority back, the member thawed: gRPC starts the server-side deadline
   * when the request is read, and Defragment ignores it), unless that member dies first. The caller
   * still sees the timeout. Keep-alives are the exception: a renewal the lessor did not get in time
   * is not replayed.
   */
  request<T>(
    owner: Owner,
    endpoint: string,
    timeoutMs: number,
    kind: 'backend' | 'raft' | 'leader' | 'memory' | 'keepalive' | 'metrics',
    apply: (m: ModelMember) => T,
    mutation = false,
    op: string = kind,
    detail?: string,
  ): Promise<T> {
    // A slow HashKV: served after hashMs (the caller's deadline may end the wait first; the hash
    // goes on inside etcd regardless).
    const serviceMs = op === 'hash kv' ? (m: ModelMember) => this.hashMs.get(m.name) ?? 0 : () => 0;
    this.stats[op] = (this.stats[op] ?? 0) + 1;
    const applyLate = mutation && kind !== 'keepalive';
    return new Promise<T>((resolve, reject) => {
      /** The caller has its answer (or its timeout). */
      let done = false;
      /** The request has been applied (or failed) at the member. */
      let applied = false;
      const finish = (fn: () => void) => {
        if (done) return;
        done = true;
        deadline?.cancel();
        // Both ways of the round trip on the way back (the request is served when it is sent).
        this.clock.at(Math.min(this.clock.now() + 2 * LATENCY, sentAt + timeoutMs), fn, owner);
      };
      const sentAt = this.clock.now();
      // The member it reached (routes can change after it arrived: it stays where it went).
      let at: ModelMember | undefined;
      // The deadline timer exists only for a request that has to wait (most are served at once).
      let deadline: { cancel(): void } | undefined;
      const arm = () => {
        deadline = this.clock.at(
          sentAt + timeoutMs,
          () => {
            if (done) return;
            done = true;
            if (applyLate && !applied) waiter.orphanOf = () => at;
            else this.waiters = this.waiters.filter((w) => w !== waiter);
            reject(ERR.timeout());
          },
          owner,
        );
      };
      const ready = () => {
        const x = at;
        if (!x || x.state !== 'up') return false;
        if (kind === 'metrics' || kind === 'memory') return true;
        // While a member defragments it serves no reads or writes; Status blocks (facts).
        if (x.defragEndsAt !== undefined && kind !== 'keepalive' && kind !== 'leader') return false;
        if (kind === 'raft' || kind === 'keepalive' || kind === 'leader') {
          const l = this.leaderLive();
          if (!l || !this.quorum()) return false;
          // A keep-alive is answered by the leader's lessor after it applied what is committed
          // (etcd commit fef4a795, "force leader to apply its pending committed index for lease
          // operations"); the leader's apply waits for its defragment, and Kubernetes writes all the time.
          if (kind === 'keepalive' && l.defragEndsAt !== undefined) return false;
        }
        return true;
      };
      let serving = false;
      const waiter: Waiter = {
        ready,
        run: () => {
          if (applied || (done && !waiter.orphanOf)) return;
          const ms = serving ? 0 : serviceMs(at!);
          if (ms > 0) {
            serving = true;
            if (!deadline) arm();
            this.clock.at(this.clock.now() + ms, () => waiter.run());
            return;
          }
          applied = true;
          if (done) this.late[op] = (this.late[op] ?? 0) + 1;
          let value: T;
          try {
            value = apply(at!);
          } catch (err) {
            finish(() => reject(err));
            return;
          }
          if (mutation && at!.loseReplies > 0) {
            at!.loseReplies--;
            if (!deadline) arm();
            return; // applied; the reply is lost: the caller's deadline ends it
          }
          finish(() => resolve(value));
        },
      };
      queueMicrotask(() => {
        if (done) return;
        this.onArrive?.(owner, op, endpoint, detail);
        at = this.byId(this.routes.get(endpoint));
        if (!at || at.state === 'killed') {
          finish(() => reject(ERR.unavailable()));
          return;
        }
        if (ready()) waiter.run();
        else {
          arm();
          this.waiters.push(waiter);
        }
      });
    });
  }

  // What each request does once the member serves it.

  status(m: ModelMember): MemberStatus {
    const applied = m.appliedHeld ?? this.commitIndex;
    return {
      endpoint: m.endpoint,
      memberId: m.id,
      leader: this.leader ?? '0',
      version: '3.5.30',
      dbSize: m.dbSize,
      dbSizeInUse: m.dbSizeInUse,
      raftIndex: applied,
      raftAppliedIndex: applied,
      raftTerm: 2n,
      revision: this.revision,
      isLearner: m.isLearner,
      errors: [],
    };
  }

  memberList(): Member[] {
    return this.members.map((m) => ({ id: m.id, name: m.name, clientURLs: [m.endpoint], peerURLs: [], isLearner: m.isLearner }));
  }

  /** A Defragment arrives at member m: the invariants are checked here, where the harm would be. */
  /** When a schedule wrote a halt from outside the turn (scenario.ts recordHalt). */
  externalHaltAt: number | undefined;

  /** Called when a Defragment is sent, which in this model is when it reaches its member's socket. */
  onDefragmentSent: ((m: ModelMember, by: string) => void) | undefined;

  /** A Defragment from `by` reaches the member behind `endpoint` (it may run later: a frozen member runs it when thawed). */
  defragmentSent(endpoint: string, by: string): void {
    const m = this.byId(this.routes.get(endpoint));
    if (!m || m.state === 'killed') return;
    // Checked at the send: a frozen member runs a Defragment it received when it is thawed, after
    // whatever was written meanwhile, as etcd would (nothing in etcd is conditional on a key).
    const inFlight = this.externalHaltAt !== undefined && this.clock.now() - this.externalHaltAt < HALT_IN_FLIGHT_MS;
    if (this.halted() && !inFlight) this.violate(`defragment of ${m.name} sent while halted (by ${by})`);
    this.onDefragmentSent?.(m, by);
  }

  startDefrag(m: ModelMember, by: string): void {
    this.onDefragmentArrive?.(m, by);
    this.defragLog.push({ member: m.name, at: this.clock.now(), by });
    this.onDefragmentArrive?.(m, by);
    const busy = this.defragmenting().filter((x) => x !== m);
    if (busy.length > 0)
      this.violate(`two members defragmenting at once: ${m.name} while ${busy.map((x) => x.name).join(', ')} (sent by ${by})`);
    if (m.defragEndsAt !== undefined) {
      this.violate(`defragment sent to ${m.name} while it is still defragmenting (sent by ${by})`);
      m.defragQueued++;
      return;
    }
    this.holdApplied(m);
    m.defragEndsAt = this.clock.now() + m.defragMs;
    this.scheduleDefragEnd(m);
  }

  /** The Defragment's reply: when the member's defragments are done, or the caller's deadline. */
  defragDone(owner: Owner, m: ModelMember, timeoutMs: number): Promise<DefragmentReply> {
    return new Promise((resolve, reject) => {
      let done = false;
      const waiter: Waiter = {
        ready: () => m.defragEndsAt === undefined && m.defragQueued === 0,
        run: () => {
          if (done) return;
          done = true;
          deadline.cancel();
          // A member killed mid-defragment drops the connection.
          if (m.state === 'killed') this.clock.at(this.clock.now() + LATENCY, () => reject(ERR.unavailable()), owner);
          // No header: etcd 3.4 and 3.5 answer `&pb.DefragmentResponse{}` (maintenance.go), so the
          // reply cannot say which member did it (facts).
          else this.clock.at(this.clock.now() + LATENCY, () => resolve(), owner);
        },
      };
      const deadline = this.clock.at(
        this.clock.now() + timeoutMs,
        () => {
          if (done) return;
          done = true;
          this.waiters = this.waiters.filter((w) => w !== waiter);
          reject(ERR.timeout());
        },
        owner,
      );
      if (waiter.ready()) waiter.run();
      else this.waiters.push(waiter);
    });
  }

  violate(what: string): void {
    this.violations.push({ at: this.clock.now(), what });
  }

  /** A range read. The same array while no key changed (readers do not modify what etcd answered). */
  rangeKvs(prefix: Buffer, rangeEnd?: Buffer): IKeyValue[] {
    const id = `${prefix.toString('latin1')}\0${rangeEnd?.toString('latin1') ?? ''}`;
    if (this.rangeCache.gen !== this.kv.gen) this.rangeCache = { gen: this.kv.gen, results: new Map() };
    let kvs = this.rangeCache.results.get(id);
    if (!kvs) {
      kvs = this.range(prefix, rangeEnd).map(
        ([key, kv]) =>
          ({
            key: (kv.keyBuf ??= Buffer.from(key)),
            value: kv.value,
            create_revision: String(kv.create),
            mod_revision: String(kv.mod),
            version: String(kv.version),
            lease: kv.lease,
          }) as IKeyValue,
      );
      this.rangeCache.results.set(id, kvs);
    }
    return kvs;
  }

  private rangeCache = { gen: -1, results: new Map<string, IKeyValue[]>() };

  txn(compare: ICompare[], success: IRequestOp[]): { succeeded: boolean } {
    if (this.hasPut(success)) this.checkSpace();
    // A Txn that is not read-only is applied through raft, so CORRUPT refuses it (apply.go isTxnReadonly).
    if (success.some((op) => op.request_put || op.request_delete_range)) this.checkCorrupt();
    return this.applyTxn(compare, success);
  }

  grant(ttlSeconds: number, by: string): string {
    this.checkSpace();
    this.checkCorrupt();
    const id = (this.nextLease++).toString();
    this.leases.set(id, { id, ttlMs: ttlSeconds * 1000, expiresAt: this.clock.now() + ttlSeconds * 1000, keys: new Set(), grantedBy: by });
    this.commit();
    return id;
  }

  /** Keep-alive: the remaining TTL, 0 for a lease that is gone (v3rpc/lease.go answers TTL 0 for not found). */
  keepAlive(id: string): number {
    const l = this.leases.get(id);
    if (!l) return 0;
    l.expiresAt = this.clock.now() + l.ttlMs;
    return Math.round(l.ttlMs / 1000);
  }

  revokeLease(id: string): void {
    this.checkCorrupt();
    if (!this.revoke(id)) throw ERR.leaseNotFound();
  }

  /** Frees the history up to `rev` on every member: in-use shrinks (a commit later), the file does not. */
  compact(rev: bigint): void {
    this.checkCorrupt();
    if (rev <= this.compactRev) throw ERR.compacted();
    if (rev > this.revision) throw ERR.future();
    this.compactRev = rev;
    this.commit();
    let freed = 0;
    while (this.history.length > 0 && this.history[0]!.rev <= rev) freed += this.history.shift()!.bytes;
    for (const m of this.members) m.freePending += freed;
  }

  disarm(alarm: Alarm): void {
    this.alarms = this.alarms.filter((a) => !(a.memberId === alarm.memberId && a.alarm === alarm.alarm));
    this.commit();
  }

  moveLeader(m: ModelMember, targetId: string): void {
    if (this.refuseMoveLeader) throw new Error('etcdserver: leader transfer failed (test)');
    if (m.id !== this.leader) throw ERR.notLeader();
    const t = this.byId(targetId);
    if (!t || t.isLearner || t.state !== 'up') throw new Error('etcdserver: bad leader transferee');
    this.elect(t);
  }

  /** A pool of clients for one process. */
  pool(owner: Owner): ModelPool {
    return new ModelPool(this, owner);
  }
}

function num(v: unknown): bigint {
  return BigInt(String(v ?? 0));
}

function compareKV(c: ICompare, kv: KV): boolean {
  const target = c.target as string;
  let r: number;
  switch (target) {
    case 'Version':
      r = cmp(kv.version, num((c as { version?: unknown }).version));
      break;
    case 'Create':
      r = cmp(kv.create, num((c as { create_revision?: unknown }).create_revision));
      break;
    case 'Mod':
      r = cmp(kv.mod, num((c as { mod_revision?: unknown }).mod_revision));
      break;
    case 'Lease':
      r = cmp(BigInt(kv.lease), num((c as { lease?: unknown }).lease));
      break;
    case 'Value':
      r = Buffer.compare(kv.value, Buffer.from((c as { value?: Buffer | string }).value ?? ''));
      break;
    default:
      throw new Error(`model: unknown compare target ${target}`);
  }
  switch (c.result as string) {
    case 'Equal':
      return r === 0;
    case 'Greater':
      return r > 0;
    case 'Less':
      return r < 0;
    case 'NotEqual':
      return r !== 0;
    default:
      throw new Error(`model: unknown compare result ${String(c.result)}`);
  }
}

const cmp = (a: bigint, b: bigint) => (a < b ? -1 : a > b ? 1 : 0);

/** One process's clients (what ClientPool is to the real daemon). */
export class ModelPool implements EtcdPool {
  private clients = new Map<string, ModelClient>();
  constructor(
    readonly model: EtcdModel,
    readonly owner: Owner,
  ) {}
  get(endpoint: string): ModelClient {
    let c = this.clients.get(endpoint);
    if (!c) {
      c = new ModelClient(this.model, this.owner, endpoint);
      this.clients.set(endpoint, c);
    }
    return c;
  }
  close(): void {
    this.clients.clear();
  }
}

/** MemberClient's behaviour over the model: reads retried on transient errors with backoff, mutations sent once. */
export class ModelClient implements EtcdMember {
  constructor(
    private readonly model: EtcdModel,
    private readonly owner: Owner,
    readonly endpoint: string,
  ) {}

  private get o() {
    return this.model.opts;
  }

  private async read<T>(
    what: string,
    kind: 'backend' | 'raft' | 'leader' | 'memory',
    fn: (m: ModelMember) => T,
    hooks: RetryHooks = {},
    attempts = this.o.retry.attempts,
    timeout = this.o.requestTimeout,
    detail?: string,
  ): Promise<T> {
    const clock = this.owner.clock();
    for (let i = 1; ; i++) {
      try {
        return await this.model.request(this.owner, this.endpoint, timeout, kind, fn, false, what, detail);
      } catch (err) {
        const e = toDefragdError(err, what, this.endpoint);
        if (e.permanent || i >= attempts || hooks.signal?.aborted) throw e;
        await clock.sleep(Math.min(this.o.retry.maxDelay, this.o.retry.minDelay * 2 ** (i - 1)), hooks.signal);
      }
    }
  }

  private async once<T>(
    what: string,
    kind: 'backend' | 'raft' | 'leader' | 'memory' | 'keepalive',
    fn: (m: ModelMember) => T,
    timeout = this.o.requestTimeout,
  ): Promise<T> {
    try {
      return await this.model.request(this.owner, this.endpoint, timeout, kind, fn, true, what);
    } catch (err) {
      throw toDefragdError(err, what, this.endpoint);
    }
  }

  status(hooks?: RetryHooks, attempts?: number): Promise<MemberStatus> {
    return this.read('status', 'backend', (m) => ({ ...this.model.status(m), endpoint: this.endpoint }), hooks, attempts);
  }

  async probe(timeoutMs: number): Promise<MemberStatus | Error> {
    try {
      return await this.model.request(
        this.owner,
        this.endpoint,
        timeoutMs,
        'backend',
        (m) => ({ ...this.model.status(m), endpoint: this.endpoint }),
        false,
        'probe',
      );
    } catch (err) {
      return toDefragdError(err, 'status', this.endpoint);
    }
  }

  // MemberList is answered from the member's own membership store after a ReadIndex (3.5: linearizable),
  // so it needs a leader and a majority.
  members(hooks?: RetryHooks, attempts?: number): Promise<Member[]> {
    return this.read('member list', 'leader', () => this.model.memberList(), hooks, attempts);
  }

  // Every Alarm action, GET included, goes through raft (etcdserver v3_server.go Alarm -> raftRequest).
  alarms(hooks?: RetryHooks): Promise<Alarm[]> {
    return this.read('alarm list', 'raft', () => this.model.alarms.map((a) => ({ ...a })), hooks);
  }

  // A serializable count-only read: answered by the member itself (blocked while it defragments).
  revision(hooks?: RetryHooks, attempts?: number): Promise<bigint> {
    return this.read('revision', 'backend', () => this.model.revision, hooks, attempts);
  }

  disarm(alarm: Alarm): Promise<unknown> {
    return this.once('alarm disarm', 'raft', () => this.model.disarm(alarm));
  }

  defragment(): Promise<DefragmentReply> {
    // Defragment is served by the member itself, outside raft; it blocks the member while it runs.
    // One deadline from the send to the reply; a Defragment that reached a frozen member runs when
    // it is thawed, whether or not its caller still waits (EtcdModel.request).
    const by = this.owner.name;
    const clock = this.owner.clock();
    const deadline = clock.now() + this.o.defragTimeout;
    this.model.defragmentSent(this.endpoint, by);
    return this.once(
      'defragment',
      'memory',
      (m) => {
        this.model.startDefrag(m, by);
        return m;
      },
      this.o.defragTimeout,
    ).then((m) =>
      this.model.defragDone(this.owner, m, deadline - clock.now()).catch((err: unknown) => {
        throw toDefragdError(err, 'defragment', this.endpoint);
      }),
    );
  }

  moveLeader(targetId: string): Promise<unknown> {
    return this.once('move leader', 'leader', (m) => this.model.moveLeader(m, targetId));
  }

  hashKV(revision: bigint, hooks?: RetryHooks, attempts?: number, timeoutMs?: number): Promise<HashKV> {
    return this.read(
      'hash kv',
      'backend',
      (m) => {
        if (revision <= this.model.compactRev && revision !== 0n) throw ERR.compacted();
        return {
          hash: m.corrupt ? `bad-${m.name}` : `h${this.model.compactRev}`,
          compactRevision: this.model.compactRev,
          revision: this.model.revision,
        };
      },
      hooks,
      attempts,
      timeoutMs,
    );
  }

  compact(revision: bigint, _physical = false, timeoutMs = this.o.requestTimeout): Promise<unknown> {
    return this.once(
      'compact',
      'raft',
      () => {
        const calm = this.model.alarms.length === 0;
        this.model.compact(revision);
        if (calm) this.model.clientCompactionsOutsideAlarm++;
      },
      timeoutMs,
    );
  }

  linearizableRead(_key: string, hooks?: RetryHooks): Promise<unknown> {
    return this.read('linearizable read', 'raft', () => true, hooks);
  }

  range(
    prefix: string,
    hooks?: RetryHooks,
    attempts?: number,
    limit?: number,
  ): Promise<{ kvs: IKeyValue[]; revision: bigint; more: boolean }> {
    return this.read(
      'range',
      'raft',
      () => {
        const kvs = this.model.rangeKvs(Buffer.from(prefix), prefixEnd(prefix));
        const cut = limit !== undefined && limit > 0 && kvs.length > limit;
        return { kvs: cut ? kvs.slice(0, limit) : kvs, revision: this.model.revision, more: cut };
      },
      hooks,
      attempts,
      undefined,
      prefix,
    );
  }

  get(key: string, hooks?: RetryHooks): Promise<string | undefined> {
    return this.read('get', 'raft', () => this.model.getValue(key), hooks);
  }

  txn(what: string, compare: ICompare[], success: IRequestOp[]): Promise<{ succeeded: boolean }> {
    return this.once(what, 'raft', (m) => {
      this.model.oldQuotaCheck(m);
      return this.model.txn(compare, success);
    });
  }

  // One read-only Txn: atomic, like etcd's (the model applies one request at a time).
  readKeys(keys: string[], hooks?: RetryHooks): Promise<Map<string, string>> {
    return this.read(
      'read keys',
      'raft',
      () => {
        // Old etcd refuses this read-only Txn at a member over its quota; MemberClient then reads
        // the keys one by one, which in this model (one request at a time) gives the same answer.
        const out = new Map<string, string>();
        for (const k of keys) {
          const v = this.model.getValue(k);
          if (v !== undefined) out.set(k, v);
        }
        return out;
      },
      hooks,
    );
  }

  deleteKey(key: string): Promise<number> {
    return this.once('delete', 'raft', () => {
      const had = this.model.getValue(key) !== undefined;
      this.model.txn([], [{ request_delete_range: { key: Buffer.from(key) } }]);
      return had ? 1 : 0;
    });
  }

  put(key: string, value: string, lease?: string): Promise<unknown> {
    return this.once('put', 'raft', () =>
      this.model.txn([], [{ request_put: { key: Buffer.from(key), value: Buffer.from(value), lease } }]),
    );
  }

  leaseGrant(ttlSeconds: number): Promise<string> {
    const by = this.owner.name;
    return this.once('lease grant', 'raft', () => this.model.grant(ttlSeconds, by));
  }

  leaseRevoke(id: string): Promise<unknown> {
    return this.once('lease revoke', 'raft', () => this.model.revokeLease(id));
  }

  leaseKeepAlive(id: string, timeoutMs = this.o.requestTimeout): Promise<number> {
    return this.once('lease keep-alive', 'keepalive', () => this.model.keepAlive(id), timeoutMs);
  }

  // Served by etcd's HTTP handler: answers while the member defragments (facts).
  serverMetrics(timeoutMs = this.o.requestTimeout): Promise<ServerMetrics> {
    return this.model
      .request(
        this.owner,
        this.endpoint,
        timeoutMs,
        'metrics',
        (m) => ({
          quotaBytes: this.o.quotaBytes,
          defragInflight: m.defragEndsAt !== undefined,
          version: '3.5.30',
          dbSize: m.dbSize,
          dbSizeInUse: m.dbSizeInUse,
          // cluster-wide in the model: every member applies compactions and writes alike
          compactRevision: Number(this.model.compactRev),
          currentRevision: Number(this.model.revision),
        }),
        false,
        'metrics',
      )
      .catch((err: unknown) => {
        throw toDefragdError(err, 'metrics', this.endpoint);
      });
  }

  close(): void {
    /* nothing held */
  }
}

/** The key space: a map, plus its keys in order for range reads (etcd's keys are byte strings; ours are ASCII). */
class KvStore {
  private map = new Map<string, KV>();
  private sorted: string[] | undefined;
  /** Moves on every change (range results are cached per generation). */
  gen = 0;

  get(k: string): KV | undefined {
    return this.map.get(k);
  }

  has(k: string): boolean {
    return this.map.has(k);
  }

  set(k: string, v: KV): void {
    if (!this.map.has(k)) this.sorted = undefined;
    this.map.set(k, v);
    this.gen++;
  }

  delete(k: string): void {
    if (this.map.delete(k)) {
      this.sorted = undefined;
      this.gen++;
    }
  }

  keys(): IterableIterator<string> {
    return this.map.keys();
  }

  /** Keys in [from, end) in order (end undefined: to the last key). */
  range(from: string, end: string | undefined): [string, KV][] {
    const keys = (this.sorted ??= [...this.map.keys()].sort((a, b) => (a < b ? -1 : a > b ? 1 : 0)));
    let lo = 0;
    let hi = keys.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (keys[mid]! < from) lo = mid + 1;
      else hi = mid;
    }
    const out: [string, KV][] = [];
    for (let i = lo; i < keys.length && (end === undefined || keys[i]! < end); i++) out.push([keys[i]!, this.map.get(keys[i]!)!]);
    return out;
  }
}
