// The cluster-wide turn: at most one participant (daemon or `once`) defragments at a time.
//
// It must keep working during a NOSPACE alarm, when etcd refuses Put and LeaseGrant but still
// serves reads, compare-and-delete transactions and keep-alives of existing leases. So taking and
// giving back the turn only ever DELETES keys that were written earlier, while writes worked:
//
//   <prefix>p/<lease>/info        who this participant is (JSON)
//   <prefix>p/<lease>/t/<index>   tickets 0..N-1, all attached to the participant's lease
//   <prefix>p/<lease>/spare       present while the participant is an unclaimed spare
//
// A participant's lowest remaining ticket index says its state: even = idle, odd = holding the turn.
// Taking the turn deletes the lowest (even) ticket in a transaction that also checks that nothing
// under the prefix was written since our read and that every other participant's lowest (even)
// ticket still exists - so no other participant took the turn or appeared in between. Giving it back
// deletes the next (odd) ticket. A participant that dies loses its lease after coordination.leaseTTL,
// which deletes its tickets, and with them any turn it held.
//
// A daemon that (re)starts while NOSPACE is raised cannot grant a lease; it claims a spare
// participant instead (deleting its `spare` key), which live daemons keep alive for that purpose:
// each daemon keeps a reserve for its own member (so a restarted daemon is still known by its
// member) and the cluster keeps one anonymous spare for a daemon that never ran before.
import { hostname } from 'node:os';
import type { ICompare, IKeyValue, IRequestOp } from 'etcd3';
import { classify, prefixEnd, type MemberClient } from './etcd.ts';
import { DefragdError, errorMessage } from './errors.ts';
import type { Log } from './log.ts';

export const TICKETS = 64; // 32 turns; refilled whenever writes work

const REFILL_BELOW = 16;

export interface ParticipantInfo {
  memberId?: string;
  host?: string;
  pid?: number;
  command?: string;
  spare?: boolean;
  since?: string;
}

export interface Participant {
  lease: string; // hex, as in the key
  info: ParticipantInfo;
  tickets: number[]; // remaining, ascending
  spare: boolean;
  holding: boolean;
}

export interface TurnView {
  revision: bigint;
  participants: Map<string, Participant>;
}

const pad = (n: number) => String(n).padStart(12, '0');

export function parseView(prefix: string, kvs: IKeyValue[], revision: bigint): TurnView {
  const participants = new Map<string, Participant>();
  const base = `${prefix}p/`;
  for (const kv of kvs) {
    const key = kv.key.toString();
    if (!key.startsWith(base)) continue;
    const [lease, kind, index] = key.slice(base.length).split('/');
    if (!lease) continue;
    let p = participants.get(lease);
    if (!p) {
      p = { lease, info: {}, tickets: [], spare: false, holding: false };
      participants.set(lease, p);
    }
    if (kind === 'info') {
      try {
        p.info = JSON.parse(kv.value.toString()) as ParticipantInfo;
      } catch {
        p.info = {};
      }
    } else if (kind === 'spare') p.spare = true;
    else if (kind === 't' && index && /^\d+$/.test(index)) p.tickets.push(Number(index));
  }
  for (const p of participants.values()) {
    p.tickets.sort((a, b) => a - b);
    p.holding = p.tickets.length > 0 && p.tickets[0]! % 2 === 1;
  }
  return { revision, participants };
}

export function describeParticipant(p: Participant): string {
  const i = p.info;
  const who = [i.host && `host ${i.host}`, i.pid && `pid ${i.pid}`, i.memberId && `member ${BigInt(i.memberId).toString(16)}`].filter(Boolean).join(', ');
  return `${i.spare && !p.spare ? 'a daemon started during NOSPACE' : i.command ?? 'daemon'} (${who || `lease ${p.lease}`})`;
}

export type AcquireOutcome =
  | { ok: true; waitedMs: number }
  | { ok: false; reason: string };

export interface TurnDeps {
  /** Endpoints to send coordination requests to, best first (the local member last: it may be defragmenting). */
  endpoints(): MemberClient[];
  log: Log;
  now(): number;
  sleep(ms: number, signal?: AbortSignal): Promise<void>;
}

export interface TurnOptions {
  prefix: string;
  leaseTTL: number; // ms
  command: string;
  pollInterval?: number;
  /** Keep reserve/spare participants for daemons restarting during NOSPACE (daemons yes, `once` no). */
  keepSpares?: boolean;
}

/** This process's participant: registration, keep-alive, taking and giving back the turn. */
export class Turn {
  private lease: string | undefined;
  private holdKey: string | undefined;
  private renewTimer: NodeJS.Timeout | undefined;
  private maintainTimer: NodeJS.Timeout | undefined;
  private renewing = false;
  private maintaining = false;
  private releasePending = false;
  private spareLeases: string[] = [];
  /** Why the last keep-alive failed, or how the lease was lost (for the reason of a skipped run). */
  lastTrouble = '';
  private readonly poll: number;
  private memberId: string | undefined;
  private registering: Promise<void> | undefined;

  constructor(private readonly opts: TurnOptions, private readonly deps: TurnDeps) {
    this.poll = opts.pollInterval ?? 500;
  }

  /** Records which member this participant defragments (shown to the others). */
  identify(memberId: string): void {
    this.memberId = memberId;
  }

  get leaseId(): string | undefined {
    return this.lease;
  }

  /** Whether this participant holds the cluster-wide turn (as far as it knows; for metrics). */
  get holding(): boolean {
    return this.holdKey !== undefined;
  }

  private key(lease: string, rest: string): string {
    return `${this.opts.prefix}p/${lease}/${rest}`;
  }

  /** Tries each endpoint in order until one answers. */
  private async any<T>(what: string, fn: (c: MemberClient) => Promise<T>): Promise<T> {
    let last: unknown;
    for (const c of this.deps.endpoints()) {
      try {
        return await fn(c);
      } catch (err) {
        last = err;
        const kind = err instanceof DefragdError ? classify(err.cause ?? err) : classify(err);
        if (kind !== 'unavailable' && kind !== 'timeout' && kind !== 'not-leader') throw err;
      }
    }
    throw last ?? new DefragdError('EDD_UNAVAILABLE', `${what}: no etcd endpoint known`);
  }

  async view(): Promise<TurnView> {
    const base = `${this.opts.prefix}p/`;
    // One try per member, then the next member: a member that is down must not hold us up.
    const res = await this.any('read turn', (c) => c.range(base, undefined, 1));
    return parseView(this.opts.prefix, res.kvs, res.revision);
  }

  private ticketPuts(lease: string, from: number, count: number): IRequestOp[] {
    const ops: IRequestOp[] = [];
    for (let i = from; i < from + count; i++) {
      ops.push({ request_put: { key: Buffer.from(this.key(lease, `t/${pad(i)}`)), value: Buffer.alloc(0), lease: BigInt(`0x${lease}`).toString() } });
    }
    return ops;
  }

  private async createParticipant(kind: 'self' | 'reserve' | 'spare'): Promise<string> {
    const id = await this.any('lease grant', (c) => c.leaseGrant(Math.ceil(this.opts.leaseTTL / 1000)));
    const lease = BigInt(id).toString(16);
    const since = new Date(this.deps.now()).toISOString();
    const info: ParticipantInfo = kind === 'spare' ? { spare: true, since }
      : kind === 'reserve' ? { spare: true, memberId: this.memberId, host: hostname(), since }
        : { memberId: this.memberId, host: hostname(), pid: process.pid, command: this.opts.command, since };
    const spare = kind !== 'self';
    const ops: IRequestOp[] = [
      { request_put: { key: Buffer.from(this.key(lease, 'info')), value: Buffer.from(JSON.stringify(info)), lease: id } },
      ...this.ticketPuts(lease, 0, TICKETS),
    ];
    if (spare) ops.push({ request_put: { key: Buffer.from(this.key(lease, 'spare')), value: Buffer.alloc(0), lease: id } });
    await this.any('register', (c) => c.txn('register', [], ops));
    return lease;
  }

  /**
   * Joins the coordination: a new participant when etcd accepts writes, otherwise (NOSPACE) a
   * claimed spare. A daemon also keeps a reserve for its member and an anonymous spare ready.
   */
  register(): Promise<void> {
    if (this.lease) return Promise.resolve();
    // One registration at a time: a run may start while the start-up registration is under way.
    this.registering ??= this.doRegister().finally(() => {
      this.registering = undefined;
    });
    return this.registering;
  }

  private async doRegister(): Promise<void> {
    try {
      this.lease = await this.createParticipant('self');
      this.deps.log.info({ event: 'turn.register', lease: this.lease }, `joined the cluster-wide turn as lease ${this.lease}`);
    } catch (err) {
      if (!/nospace/.test(classify((err as DefragdError).cause ?? err))) throw err;
      if (!this.opts.keepSpares) {
        throw new DefragdError('EDD_ETCD', 'cannot join the cluster-wide turn: etcd refuses new leases during the NOSPACE alarm; the running etcd-defragd daemons recover it (spare participants are kept for them)', { cause: err, permanent: false });
      }
      this.lease = await this.claimSpare();
    }
    this.startKeepAlive();
    if (this.opts.keepSpares) await this.ensureSpare().catch((err) => this.deps.log.debug({ event: 'turn.spare', error: errorMessage(err) }, `could not prepare a spare: ${errorMessage(err)}`));
  }

  private async claimSpare(): Promise<string> {
    const view = await this.view();
    // Our own member's reserve first (the others then still know whose daemon this is), then the anonymous spare.
    const rank = (p: Participant) => (p.info.memberId === this.memberId ? 0 : p.info.memberId ? 2 : 1);
    const candidates = [...view.participants.values()].filter((p) => p.spare && p.tickets.length >= 2).sort((a, b) => rank(a) - rank(b));
    for (const p of candidates) {
      const res = await this.any('claim spare', (c) => c.txn('claim spare', [
        { key: Buffer.from(this.key(p.lease, 'spare')), target: 'Version', result: 'Greater', version: 0 } as ICompare,
      ], [{ request_delete_range: { key: Buffer.from(this.key(p.lease, 'spare')) } }]));
      if (res.succeeded) {
        this.deps.log.warn({ event: 'turn.spare.claim', lease: p.lease }, `etcd refuses new leases (NOSPACE); took over spare participant ${p.lease} to join the turn`);
        return p.lease;
      }
    }
    throw new DefragdError('EDD_ETCD', 'cannot join the cluster-wide turn: etcd refuses new leases (NOSPACE alarm) and no spare participant is left; a daemon that was running before the alarm recovers it', { permanent: false });
  }

  /** Keeps a reserve for our member and one anonymous spare in the cluster (best effort; needs writes). */
  private async ensureSpare(): Promise<void> {
    const spares = [...(await this.view()).participants.values()].filter((p) => p.spare && p.tickets.length >= 2);
    const wanted: ('reserve' | 'spare')[] = [];
    if (this.memberId && !spares.some((p) => p.info.memberId === this.memberId)) wanted.push('reserve');
    if (!spares.some((p) => !p.info.memberId)) wanted.push('spare');
    for (const kind of wanted) {
      const lease = await this.createParticipant(kind);
      // Renewed from now on: the next upkeep, which refreshes this list, may come after its TTL.
      this.spareLeases.push(lease);
      this.deps.log.debug({ event: 'turn.spare.create', lease, kind }, `prepared ${kind} participant ${lease}`);
    }
  }

  private startKeepAlive(): void {
    if (this.renewTimer) return;
    const every = Math.max(500, Math.floor(this.opts.leaseTTL / 3));
    // Renewal has its own timer and short deadlines: nothing slower may delay it past the TTL.
    this.renewTimer = setInterval(() => void this.renew(), every);
    this.renewTimer.unref();
    // Upkeep (spare list, refills) is slower work and need not run at renewal pace, but it must
    // pick up spares other daemons created well within their TTL.
    this.maintainTimer = setInterval(() => void this.maintain(), Math.max(1000, Math.floor(this.opts.leaseTTL / 2)));
    this.maintainTimer.unref();
  }

  /** One keep-alive, one short try per member, others first (the local one may be defragmenting). */
  private async renewLease(lease: string): Promise<number> {
    // Short enough for three members to be tried within one renewal period (leaseTTL / 3).
    const timeout = Math.max(1000, Math.floor(this.opts.leaseTTL / 9));
    let last: unknown;
    for (const c of this.deps.endpoints()) {
      try {
        return await c.leaseKeepAlive(BigInt(`0x${lease}`).toString(), timeout);
      } catch (err) {
        last = err;
      }
    }
    throw last ?? new DefragdError('EDD_UNAVAILABLE', 'keep-alive: no etcd endpoint known');
  }

  /** Renews our lease and the spares', and retries giving back a turn that could not be given back. */
  async renew(): Promise<void> {
    if (this.renewing || !this.lease) return;
    this.renewing = true;
    try {
      const ttl = await this.renewLease(this.lease);
      if (ttl <= 0) {
        this.lastTrouble = `lease ${this.lease} expired (last trouble: ${this.lastTrouble || 'none'})`;
        this.lost('our lease expired');
      }
      for (const spare of this.spareLeases) await this.renewLease(spare).catch(() => undefined);
      if (this.releasePending) await this.release();
    } catch (err) {
      this.lastTrouble = `keep-alive failed at ${new Date(this.deps.now()).toISOString()}: ${errorMessage(err)}`;
      this.deps.log.warn({ event: 'turn.keepalive.fail', error: errorMessage(err) }, `lease keep-alive failed: ${errorMessage(err)}`);
    } finally {
      this.renewing = false;
    }
  }

  /** Slower upkeep: which spares to keep alive, tickets to refill, spares to prepare. */
  async maintain(): Promise<void> {
    if (this.maintaining || !this.lease) return;
    this.maintaining = true;
    try {
      const view = await this.view();
      this.spareLeases = [...view.participants.values()].filter((p) => p.spare && p.lease !== this.lease).map((p) => p.lease);
      const me = view.participants.get(this.lease);
      if (me && !this.holdKey && me.tickets.length < REFILL_BELOW) await this.refill(me, view.revision).catch(() => undefined);
      if (this.opts.keepSpares) await this.ensureSpare().catch(() => undefined);
    } catch (err) {
      this.deps.log.debug({ event: 'turn.maintain.fail', error: errorMessage(err) }, `turn upkeep failed: ${errorMessage(err)}`);
    } finally {
      this.maintaining = false;
    }
  }

  private lost(why: string): void {
    if (this.holdKey) this.deps.log.error({ event: 'turn.lost', lease: this.lease }, `lost the cluster-wide turn: ${why}`);
    else this.deps.log.warn({ event: 'turn.lost', lease: this.lease }, `left the cluster-wide turn: ${why}; joining again`);
    this.lease = undefined;
    this.holdKey = undefined;
  }

  /**
   * Appends tickets after the last one. Guarded by "no ticket of ours was written since the view":
   * a refill from a stale view must never re-create a ticket already taken (it would flip our state).
   */
  private async refill(me: Participant, viewRevision: bigint): Promise<void> {
    const next = (me.tickets.at(-1) ?? 0) + 1;
    const from = next % 2 === 0 ? next : next + 1;
    const own = `${this.opts.prefix}p/${me.lease}/t/`;
    const guard = { key: Buffer.from(own), range_end: prefixEnd(own), target: 'Mod', result: 'Less', mod_revision: (viewRevision + 1n).toString() } as ICompare;
    await this.any('refill tickets', (c) => c.txn('refill tickets', [guard], this.ticketPuts(me.lease, from, TICKETS)));
  }

  /**
   * Waits for the turn until `deadline`. `mayGo` lets the caller keep waiting (leader goes last).
   * Returns who blocked us when the time ran out.
   */
  async acquire(deadline: number, signal?: AbortSignal, mayGo?: () => Promise<string | undefined>): Promise<AcquireOutcome> {
    const started = this.deps.now();
    let lastWaitReason = '';
    for (;;) {
      if (signal?.aborted) return { ok: false, reason: 'stopping' };
      if (!this.lease) await this.register();
      const view = await this.view();
      const me = view.participants.get(this.lease!);
      if (!me) {
        this.lost('our participant keys are gone (lease expired)');
        continue;
      }
      if (me.holding) {
        // Still ours from a run whose give-back failed: use it.
        this.holdKey = this.key(me.lease, `t/${pad(me.tickets[0]!)}`);
        this.releasePending = false;
        return { ok: true, waitedMs: this.deps.now() - started };
      }
      if (me.tickets.length < 2) {
        await this.refill(me, view.revision).catch((err) => {
          throw new DefragdError('EDD_ETCD', `no tickets left to take the turn and cannot write new ones: ${errorMessage(err)}`, { permanent: false });
        });
        continue;
      }
      const others = [...view.participants.values()].filter((p) => p.lease !== me.lease && p.tickets.length > 0);
      const holder = others.find((p) => p.holding);
      let waitReason = holder ? `the turn is held by ${describeParticipant(holder)}` : await mayGo?.();
      let res: { succeeded: boolean } | undefined;
      if (!waitReason) {
        const range = Buffer.from(`${this.opts.prefix}p/`);
        const compare: ICompare[] = [
          { key: range, range_end: prefixEnd(`${this.opts.prefix}p/`), target: 'Mod', result: 'Less', mod_revision: (view.revision + 1n).toString() } as ICompare,
          { key: Buffer.from(this.key(me.lease, `t/${pad(me.tickets[0]!)}`)), target: 'Version', result: 'Greater', version: 0 } as ICompare,
          { key: Buffer.from(this.key(me.lease, `t/${pad(me.tickets[1]!)}`)), target: 'Version', result: 'Greater', version: 0 } as ICompare,
          ...others.map((p) => ({ key: Buffer.from(this.key(p.lease, `t/${pad(p.tickets[0]!)}`)), target: 'Version', result: 'Greater', version: 0 }) as ICompare),
        ];
        res = await this.any('take turn', (c) => c.txn('take turn', compare, [
          { request_delete_range: { key: Buffer.from(this.key(me.lease, `t/${pad(me.tickets[0]!)}`)) } },
        ]));
        if (res.succeeded) {
          this.holdKey = this.key(me.lease, `t/${pad(me.tickets[1]!)}`);
          return { ok: true, waitedMs: this.deps.now() - started };
        }
        waitReason = 'another participant changed the turn state';
      }
      if (waitReason !== lastWaitReason) {
        // A lost race is retried at once and is not news; who we wait for is.
        const level = res === undefined || holder ? 'info' : 'debug';
        this.deps.log[level]({ event: 'turn.wait', reason: waitReason }, `waiting for the turn: ${waitReason}`);
        lastWaitReason = waitReason;
      }
      if (this.deps.now() >= deadline) return { ok: false, reason: waitReason };
      await this.deps.sleep(Math.min(this.poll, Math.max(0, deadline - this.deps.now())) + Math.floor(Math.random() * 100), signal);
    }
  }

  /** Do we still hold the turn in etcd? Checked right before a defragment is sent. */
  async confirm(): Promise<boolean> {
    const key = this.holdKey;
    if (!key) return false;
    const res = await this.any('check turn', (c) => c.range(key, undefined, 1));
    return res.kvs.some((kv) => kv.key.toString() === key);
  }

  /**
   * Gives the turn back (a delete: works during NOSPACE). Safe to repeat; when no member answers,
   * we keep holding it and the keep-alive loop tries again, so it is never left held silently.
   */
  async release(): Promise<void> {
    const key = this.holdKey;
    if (!key) return;
    for (let attempt = 1; attempt <= 3; attempt++) {
      try {
        const res = await this.any('give back turn', (c) => c.txn('give back turn', [
          { key: Buffer.from(key), target: 'Version', result: 'Greater', version: 0 } as ICompare,
        ], [{ request_delete_range: { key: Buffer.from(key) } }]));
        if (!res.succeeded) this.deps.log.warn({ event: 'turn.lost', lease: this.lease }, 'the turn was already gone when giving it back (our lease expired while holding it)');
        this.holdKey = undefined;
        this.releasePending = false;
        return;
      } catch (err) {
        if (attempt === 3) {
          this.releasePending = true;
          this.deps.log.error({ event: 'turn.release.fail', error: errorMessage(err) }, `could not give back the cluster-wide turn: ${errorMessage(err)}; trying again with every keep-alive`);
          return;
        }
        await this.deps.sleep(500 * attempt);
      }
    }
  }

  /** Leaves for good: revoking the lease deletes our tickets (works during NOSPACE). */
  async close(): Promise<void> {
    clearInterval(this.renewTimer);
    clearInterval(this.maintainTimer);
    this.renewTimer = undefined;
    this.maintainTimer = undefined;
    const lease = this.lease;
    this.lease = undefined;
    this.holdKey = undefined;
    if (lease) await this.any('lease revoke', (c) => c.leaseRevoke(BigInt(`0x${lease}`).toString())).catch(() => undefined);
  }
}
