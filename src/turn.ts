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
import pRetry from 'p-retry';
import type { Clock, Timer } from './clock.ts';
import { kindOf, prefixEnd, type EtcdMember, type EtcdPool } from './etcd.ts';
import { DefragdError, errorMessage } from './errors.ts';
import type { Log } from './log.ts';
import { decimalId, hexId } from './view.ts';

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
  readonly revision: bigint;
  readonly participants: ReadonlyMap<string, Readonly<Participant>>;
}

const pad = (n: number) => String(n).padStart(12, '0');

export function parseView(prefix: string, kvs: IKeyValue[], revision: bigint): TurnView {
  const participants = new Map<string, Participant>();
  // Keys are compared as latin1 (one character per byte): the lease, kind and index parts are
  // ASCII, and the prefix, whatever its characters, is compared byte for byte.
  const base = Buffer.from(`${prefix}p/`).toString('latin1');
  let p: Participant | undefined;
  for (const kv of kvs) {
    const key = kv.key.toString('latin1');
    if (!key.startsWith(base)) continue;
    // <lease>/<kind>[/<index>]
    const a = key.indexOf('/', base.length);
    const lease = key.slice(base.length, a < 0 ? undefined : a);
    if (!lease) continue;
    // etcd answers in key order, so one participant's keys come together.
    if (p?.lease !== lease) {
      p = participants.get(lease);
      if (!p) {
        p = { lease, info: {}, tickets: [], spare: false, holding: false };
        participants.set(lease, p);
      }
    }
    if (a < 0) continue;
    const b = key.indexOf('/', a + 1);
    const kind = key.slice(a + 1, b < 0 ? undefined : b);
    if (kind === 't') {
      const index = b < 0 ? -1 : ticketIndex(key, b + 1);
      if (index >= 0) p.tickets.push(index);
    } else if (b >= 0) continue;
    else if (kind === 'info') {
      try {
        p.info = JSON.parse(kv.value.toString()) as ParticipantInfo;
      } catch {
        p.info = {};
      }
    } else if (kind === 'spare') p.spare = true;
  }
  for (const p of participants.values()) {
    p.tickets.sort((a, b) => a - b);
    p.holding = p.tickets.length > 0 && p.tickets[0]! % 2 === 1;
  }
  return { revision, participants };
}

/** The decimal number from `from` to the end of `key`, or -1 if that is not all digits. */
function ticketIndex(key: string, from: number): number {
  if (from >= key.length) return -1;
  let n = 0;
  for (let i = from; i < key.length; i++) {
    const d = key.charCodeAt(i) - 48;
    if (d < 0 || d > 9) return -1;
    n = n * 10 + d;
  }
  return n;
}

export function describeParticipant(p: Participant): string {
  const i = p.info;
  const who = [i.host && `host ${i.host}`, i.pid && `pid ${i.pid}`, i.memberId && `member ${hexId(i.memberId)}`].filter(Boolean).join(', ');
  return `${i.spare && !p.spare ? 'a daemon started during NOSPACE' : (i.command ?? 'daemon')} (${who || `lease ${p.lease}`})`;
}

export type AcquireOutcome = { ok: true; waitedMs: number } | { ok: false; reason: string };

export interface TurnDeps {
  /** Clients by endpoint; the turn picks the members it talks to itself. */
  pool: EtcdPool;
  /** This node's member (etcd.endpoint): asked for the member list, and tried last. */
  endpoint: string;
  log: Log;
  clock: Clock;
}

export interface TurnOptions {
  prefix: string;
  leaseTTL: number; // ms
  command: string;
  pollInterval?: number;
  /** Keep reserve/spare participants for daemons restarting during NOSPACE (daemons yes, `once` no). */
  keepSpares?: boolean;
  /** Tickets written per participant and per refill (TICKETS; the model tests use fewer keys). */
  tickets?: number;
}

/** Why a mutation's outcome is unknown: it may or may not have been applied. */
const uncertain = (err: unknown) => {
  const kind = kindOf(err);
  return kind === 'timeout' || kind === 'unavailable' || kind === 'not-leader';
};

/**
 * Calls `fn` on each client in order until one answers. An error `tryNext` accepts moves on to the
 * next client; any other is thrown at once, and when none answers, the last error is.
 */
async function firstToAnswer<T>(
  what: string,
  clients: EtcdMember[],
  fn: (client: EtcdMember) => Promise<T>,
  tryNext: (err: unknown) => boolean,
): Promise<{ value: T; endpoint: string }> {
  let last: unknown;
  for (const client of clients) {
    try {
      return { value: await fn(client), endpoint: client.endpoint };
    } catch (err) {
      last = err;
      if (!tryNext(err)) throw err;
    }
  }
  throw last ?? new DefragdError('EDD_UNAVAILABLE', `${what}: no etcd endpoint known`);
}

/** This process's participant: registration, keep-alive, taking and giving back the turn. */
export class Turn {
  private lease: string | undefined;
  private holdKey: string | undefined;
  private renewTimer: Timer | undefined;
  private spareTimer: Timer | undefined;
  private maintainTimer: Timer | undefined;
  private renewing = false;
  private renewingSpares = false;
  private maintaining = false;
  private acquiring = false;
  private releasePending = false;
  private spareLeases: string[] = [];
  /** Why the last keep-alive failed, or how the lease was lost (for the reason of a skipped run). */
  private trouble = '';
  private readonly poll: number;
  private memberId: string | undefined;
  private registering: Promise<void> | undefined;
  private sparing: Promise<void> | undefined;
  /** Client URLs of the other voting members, from the member list; the local endpoint is tried last. */
  private others: string[] = [];
  private membersKnown = new Set<string>();
  /** The endpoint that answered last: tried first next time. */
  private preferred: string | undefined;
  /** The last turn read (views are never modified). */
  private lastView: TurnView | undefined;

  constructor(
    private readonly opts: TurnOptions,
    private readonly deps: TurnDeps,
  ) {
    this.poll = opts.pollInterval ?? 500;
    this.tickets = opts.tickets ?? TICKETS;
  }

  private readonly tickets: number;

  /** Records which member this participant defragments (shown to the others). */
  identify(memberId: string): void {
    this.memberId = memberId;
  }

  /** Has this process joined the turn (it has a live participant)? */
  joined(): boolean {
    return this.lease !== undefined;
  }

  /** Does this process hold the turn, as far as it knows? */
  holding(): boolean {
    return this.holdKey !== undefined;
  }

  /** The participant's lease (hex), for tests and logs. */
  participant(): string | undefined {
    return this.lease;
  }

  private key(lease: string, rest: string): string {
    return `${this.opts.prefix}p/${lease}/${rest}`;
  }

  /** Other members first (the local one may be the one defragmenting), the last one that answered first of all. */
  private endpoints(): EtcdMember[] {
    const list = [...this.others.filter((e) => e !== this.deps.endpoint), this.deps.endpoint];
    if (this.preferred && list.includes(this.preferred)) list.sort((a, b) => (a === this.preferred ? -1 : b === this.preferred ? 1 : 0));
    return list.map((e) => this.deps.pool.get(e));
  }

  /** Learns the other voting members' client URLs (from any member that answers). */
  async refreshMembers(): Promise<void> {
    // Any failure moves on to the next member; when none answers, the list we had stays.
    const answer = await firstToAnswer(
      'member list',
      [this.deps.pool.get(this.deps.endpoint), ...this.endpoints()],
      (client) => client.members({}, 1),
      () => true,
    ).catch(() => undefined);
    if (!answer) return;
    const list = answer.value;
    this.others = list
      .filter((m) => !m.isLearner && m.clientURLs[0])
      .map((m) => m.clientURLs[0]!)
      .filter((e) => e !== this.deps.endpoint);
    this.membersKnown = new Set(list.map((m) => m.id));
  }

  /** A read, or a mutation that is safe to repeat: on each endpoint in turn until one answers; it is tried first next time. */
  private async onAnyMember<T>(what: string, fn: (client: EtcdMember) => Promise<T>): Promise<T> {
    const answer = await firstToAnswer(what, this.endpoints(), fn, uncertain);
    this.preferred = answer.endpoint;
    return answer.value;
  }

  /** A mutation that must not be repeated blindly: sent once, to the endpoint that answered last. */
  private async sendOnce<T>(fn: (client: EtcdMember) => Promise<T>): Promise<T> {
    const client = this.endpoints()[0]!;
    try {
      return await fn(client);
    } catch (err) {
      // Next time start with another member; the caller reads the state again before deciding.
      if (uncertain(err))
        this.preferred = this.endpoints()
          .map((e) => e.endpoint)
          .find((e) => e !== client.endpoint);
      throw err;
    }
  }

  async view(): Promise<TurnView> {
    const base = `${this.opts.prefix}p/`;
    // One try per member, then the next member: a member that is down must not hold us up.
    const res = await this.onAnyMember('read turn', (client) => client.range(base, undefined, 1));
    // An unchanged store revision means unchanged keys (keep-alives do not move it): the turn is
    // read every keep-alive period and mostly has not changed.
    if (this.lastView?.revision !== res.revision) this.lastView = parseView(this.opts.prefix, res.kvs, res.revision);
    return this.lastView;
  }

  private ticketPuts(lease: string, from: number, count: number): IRequestOp[] {
    const ops: IRequestOp[] = [];
    for (let i = from; i < from + count; i++) {
      ops.push({ request_put: { key: Buffer.from(this.key(lease, `t/${pad(i)}`)), value: Buffer.alloc(0), lease: decimalId(lease) } });
    }
    return ops;
  }

  private async createParticipant(kind: 'self' | 'reserve' | 'spare'): Promise<string> {
    // A grant whose reply was lost leaves a lease nobody renews: it expires by itself.
    const id = await this.onAnyMember('lease grant', (client) => client.leaseGrant(Math.ceil(this.opts.leaseTTL / 1000)));
    const lease = hexId(id);
    const since = new Date(this.deps.clock.now()).toISOString();
    const info: ParticipantInfo =
      kind === 'spare'
        ? { spare: true, since }
        : kind === 'reserve'
          ? { spare: true, memberId: this.memberId, host: hostname(), since }
          : { memberId: this.memberId, host: hostname(), pid: process.pid, command: this.opts.command, since };
    const spare = kind !== 'self';
    const ops: IRequestOp[] = [
      { request_put: { key: Buffer.from(this.key(lease, 'info')), value: Buffer.from(JSON.stringify(info)), lease: id } },
      ...this.ticketPuts(lease, 0, this.tickets),
    ];
    if (spare) ops.push({ request_put: { key: Buffer.from(this.key(lease, 'spare')), value: Buffer.alloc(0), lease: id } });
    // Repeating these puts is harmless: nobody uses the new participant's keys yet.
    await this.onAnyMember('register', (client) => client.txn('register', [], ops));
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
    await this.refreshMembers();
    try {
      this.lease = await this.createParticipant('self');
      this.deps.log.info({ event: 'turn.register', lease: this.lease }, `joined the cluster-wide turn as lease ${this.lease}`);
    } catch (err) {
      if (kindOf(err) !== 'nospace') throw err;
      if (!this.opts.keepSpares) {
        throw new DefragdError(
          'EDD_ETCD',
          'cannot join the cluster-wide turn: etcd refuses new leases during the NOSPACE alarm; ' +
            'the running etcd-defragd daemons recover it (spare participants are kept for them)',
          { cause: err, permanent: false },
        );
      }
      this.lease = await this.claimSpare();
    }
    this.trouble = '';
    this.startKeepAlive();
    if (this.opts.keepSpares)
      await this.ensureSpare().catch((err) =>
        this.deps.log.debug({ event: 'turn.spare', error: errorMessage(err) }, `could not prepare a spare: ${errorMessage(err)}`),
      );
  }

  private async claimSpare(): Promise<string> {
    const view = await this.view();
    // Our own member's reserve first (the others then still know whose daemon this is), then the anonymous spare.
    const rank = (p: Participant) => (p.info.memberId === this.memberId ? 0 : p.info.memberId ? 2 : 1);
    const candidates = [...view.participants.values()]
      .filter((p) => p.spare && p.tickets.length >= 2 && !p.holding)
      .sort((a, b) => rank(a) - rank(b));
    for (const p of candidates) {
      // A claim whose reply was lost leaves that spare unclaimed by anyone: nobody renews it, it expires.
      const res = await this.onAnyMember('claim spare', (client) =>
        client.txn(
          'claim spare',
          [{ key: Buffer.from(this.key(p.lease, 'spare')), target: 'Version', result: 'Greater', version: 0 } as ICompare],
          [{ request_delete_range: { key: Buffer.from(this.key(p.lease, 'spare')) } }],
        ),
      );
      if (res.succeeded) {
        this.deps.log.warn(
          { event: 'turn.spare.claim', lease: p.lease },
          `etcd refuses new leases (NOSPACE); took over spare participant ${p.lease} to join the turn`,
        );
        return p.lease;
      }
    }
    throw new DefragdError(
      'EDD_ETCD',
      'cannot join the cluster-wide turn: etcd refuses new leases (NOSPACE alarm) and no spare participant is left; ' +
        'a daemon that was running before the alarm recovers it',
      { permanent: false },
    );
  }

  /** Keeps a reserve for our member and one anonymous spare in the cluster (best effort; needs writes). One at a time. */
  private ensureSpare(view?: TurnView): Promise<void> {
    this.sparing ??= this.doEnsureSpare(view).finally(() => {
      this.sparing = undefined;
    });
    return this.sparing;
  }

  private async doEnsureSpare(known?: TurnView): Promise<void> {
    const spares = [...(known ?? (await this.view())).participants.values()].filter((p) => p.spare && p.tickets.length >= 2);
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
    // Our own lease has its own timer and short deadlines: nothing slower may delay it past the TTL.
    this.renewTimer = this.deps.clock.every(every, () => void this.renew());
    // Spares are renewed apart, all at once, so a member that does not answer delays only them.
    // Every live daemon renews them, so half a TTL is enough (a renewal takes at most a third).
    this.spareTimer = this.deps.clock.every(Math.max(500, Math.floor(this.opts.leaseTTL / 2)), () => void this.renewSpares());
    // Upkeep (spare list, refills, members) is slower work and need not run at renewal pace, but it
    // must pick up spares other daemons created well within their TTL.
    this.maintainTimer = this.deps.clock.every(Math.max(1000, Math.floor(this.opts.leaseTTL / 2)), () => void this.maintain());
  }

  /** One keep-alive, one short try per member, the last one that answered first. */
  private async renewLease(lease: string): Promise<number> {
    // Short enough for three members to be tried within one renewal period (leaseTTL / 3).
    const timeout = Math.max(1000, Math.floor(this.opts.leaseTTL / 9));
    const answer = await firstToAnswer(
      'keep-alive',
      this.endpoints(),
      (client) => client.leaseKeepAlive(decimalId(lease), timeout),
      () => true,
    );
    if (lease === this.lease) this.preferred = answer.endpoint;
    return answer.value;
  }

  /** Renews our lease, and retries giving back a turn that could not be given back. */
  async renew(): Promise<void> {
    if (this.renewing || !this.lease) return;
    this.renewing = true;
    const lease = this.lease;
    try {
      const ttl = await this.renewLease(lease);
      if (lease !== this.lease) return;
      if (ttl <= 0) {
        this.trouble = `lease ${lease} expired (last trouble: ${this.trouble || 'none'})`;
        this.lost('our lease expired');
        return;
      }
      if (this.releasePending) await this.release();
    } catch (err) {
      this.trouble = `keep-alive failed at ${new Date(this.deps.clock.now()).toISOString()}: ${errorMessage(err)}`;
      this.deps.log.warn({ event: 'turn.keepalive.fail', error: errorMessage(err) }, `lease keep-alive failed: ${errorMessage(err)}`);
    } finally {
      this.renewing = false;
    }
  }

  private async renewSpares(): Promise<void> {
    if (this.renewingSpares || !this.lease) return;
    this.renewingSpares = true;
    try {
      await Promise.all(this.spareLeases.map((spare) => this.renewLease(spare).catch(() => undefined)));
    } finally {
      this.renewingSpares = false;
    }
  }

  /** Slower upkeep: members, which spares to keep alive, tickets to refill, spares to prepare, a stray turn to give back. */
  async maintain(): Promise<void> {
    if (this.maintaining || !this.lease) return;
    this.maintaining = true;
    try {
      await this.refreshMembers();
      const view = await this.view();
      // One reserve per current member and one anonymous spare are enough: the newest of each is
      // kept alive, the rest (concurrent creations, members since removed) expire.
      const keep = new Map<string, string>();
      for (const p of [...view.participants.values()].filter((x) => x.spare && x.lease !== this.lease && x.tickets.length >= 2)) {
        const slot = p.info.memberId ?? '';
        if (slot && this.membersKnown.size > 0 && !this.membersKnown.has(slot)) continue;
        const prev = keep.get(slot);
        if (!prev || (view.participants.get(prev)!.info.since ?? '') < (p.info.since ?? '')) keep.set(slot, p.lease);
      }
      this.spareLeases = [...keep.values()];
      const me = view.participants.get(this.lease);
      // A turn that etcd says we hold but no run of ours uses (a take whose reply was lost, a
      // give-back that failed): give it back, or nobody gets it until our lease ends.
      if (me?.holding && !this.holdKey && !this.acquiring && this.lease === me.lease) {
        this.deps.log.warn(
          { event: 'turn.stray', lease: me.lease },
          'etcd shows this participant holding the turn while no run uses it; giving it back',
        );
        this.holdKey = this.key(me.lease, `t/${pad(me.tickets[0]!)}`);
        await this.release();
      }
      if (me && !this.holdKey && me.tickets.length < Math.min(REFILL_BELOW, this.tickets / 2))
        await this.refill(me, view.revision).catch(() => undefined);
      if (this.opts.keepSpares) await this.ensureSpare(view).catch(() => undefined);
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
    this.releasePending = false;
  }

  /**
   * Appends tickets after the last one. Guarded by "no ticket of ours was written since the view":
   * a refill from a stale view must never re-create a ticket already taken (it would flip our state).
   */
  private async refill(me: Participant, viewRevision: bigint): Promise<void> {
    const next = (me.tickets.at(-1) ?? 0) + 1;
    const from = next % 2 === 0 ? next : next + 1;
    const own = `${this.opts.prefix}p/${me.lease}/t/`;
    const guard = {
      key: Buffer.from(own),
      range_end: prefixEnd(own),
      target: 'Mod',
      result: 'Less',
      mod_revision: (viewRevision + 1n).toString(),
    } as ICompare;
    await this.onAnyMember('refill tickets', (client) =>
      client.txn('refill tickets', [guard], this.ticketPuts(me.lease, from, this.tickets)),
    );
  }

  /**
   * Waits for the turn until `deadline`. `mayGo` lets the caller keep waiting (leader goes last).
   * Returns who blocked us when the time ran out.
   */
  async acquire(deadline: number, signal?: AbortSignal, mayGo?: () => Promise<string | undefined>): Promise<AcquireOutcome> {
    this.acquiring = true;
    try {
      return await this.doAcquire(deadline, signal, mayGo);
    } finally {
      this.acquiring = false;
    }
  }

  private async doAcquire(deadline: number, signal?: AbortSignal, mayGo?: () => Promise<string | undefined>): Promise<AcquireOutcome> {
    const started = this.deps.clock.now();
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
        // Ours already: a take whose reply was lost, or a give-back that failed. Use it.
        this.holdKey = this.key(me.lease, `t/${pad(me.tickets[0]!)}`);
        this.releasePending = false;
        return { ok: true, waitedMs: this.deps.clock.now() - started };
      }
      if (me.tickets.length < 2) {
        try {
          await this.refill(me, view.revision);
        } catch (err) {
          // Every turn costs two tickets and NOSPACE refuses refills: a long alarm would leave us
          // stuck. Move to a spare participant (our member's reserve first), which has fresh ones.
          if (kindOf(err) !== 'nospace' || !this.opts.keepSpares) {
            throw new DefragdError('EDD_ETCD', `no tickets left to take the turn and cannot write new ones: ${errorMessage(err)}`, {
              permanent: false,
            });
          }
          const old = me.lease;
          this.lease = await this.claimSpare();
          this.deps.log.warn(
            { event: 'turn.tickets', from: old, to: this.lease },
            `out of tickets during NOSPACE: moved from participant ${old} to spare ${this.lease}`,
          );
          await this.onAnyMember('lease revoke', (client) => client.leaseRevoke(decimalId(old))).catch(() => undefined);
        }
        continue;
      }
      const others = [...view.participants.values()].filter((p) => p.lease !== me.lease && p.tickets.length > 0);
      const holder = others.find((p) => p.holding);
      let waitReason = holder ? `the turn is held by ${describeParticipant(holder)}` : await mayGo?.();
      let res: { succeeded: boolean } | undefined;
      if (!waitReason) {
        const range = Buffer.from(`${this.opts.prefix}p/`);
        const compare: ICompare[] = [
          {
            key: range,
            range_end: prefixEnd(`${this.opts.prefix}p/`),
            target: 'Mod',
            result: 'Less',
            mod_revision: (view.revision + 1n).toString(),
          } as ICompare,
          {
            key: Buffer.from(this.key(me.lease, `t/${pad(me.tickets[0]!)}`)),
            target: 'Version',
            result: 'Greater',
            version: 0,
          } as ICompare,
          {
            key: Buffer.from(this.key(me.lease, `t/${pad(me.tickets[1]!)}`)),
            target: 'Version',
            result: 'Greater',
            version: 0,
          } as ICompare,
          ...others.map(
            (p) =>
              ({
                key: Buffer.from(this.key(p.lease, `t/${pad(p.tickets[0]!)}`)),
                target: 'Version',
                result: 'Greater',
                version: 0,
              }) as ICompare,
          ),
        ];
        try {
          // Sent once: after a timeout it may have been applied, so we read again (top of the
          // loop) instead of sending it elsewhere; our even ticket gone means we hold the turn.
          res = await this.sendOnce((client) =>
            client.txn('take turn', compare, [
              { request_delete_range: { key: Buffer.from(this.key(me.lease, `t/${pad(me.tickets[0]!)}`)) } },
            ]),
          );
        } catch (err) {
          if (!uncertain(err)) throw err;
          this.deps.log.debug(
            { event: 'turn.uncertain', error: errorMessage(err) },
            `taking the turn: no reply (${errorMessage(err)}); reading the state again`,
          );
          continue;
        }
        if (res.succeeded) {
          this.holdKey = this.key(me.lease, `t/${pad(me.tickets[1]!)}`);
          return { ok: true, waitedMs: this.deps.clock.now() - started };
        }
        waitReason = 'another participant changed the turn state';
      }
      if (waitReason !== lastWaitReason) {
        // A lost race is retried at once and is not news; who we wait for is.
        const level = res === undefined || holder ? 'info' : 'debug';
        this.deps.log[level]({ event: 'turn.wait', reason: waitReason }, `waiting for the turn: ${waitReason}`);
        lastWaitReason = waitReason;
      }
      if (this.deps.clock.now() >= deadline) return { ok: false, reason: waitReason };
      await this.deps.clock.sleep(
        Math.min(this.poll, Math.max(0, deadline - this.deps.clock.now())) + Math.floor(Math.random() * 100),
        signal,
      );
    }
  }

  /**
   * The fence before the point of no return. Says why a defragment must not be sent now, or
   * undefined: the turn is still ours in etcd, `check` (a fresh look at every member) passes, and
   * then a keep-alive of our lease succeeds within a third of the TTL - so the lease outlives the
   * send by two thirds of a TTL at least, however long the process was paused before.
   */
  async fence(check: () => Promise<string | undefined>): Promise<string | undefined> {
    const key = this.holdKey;
    const lease = this.lease;
    if (!key || !lease) return `lost the cluster-wide turn (${this.trouble || 'our lease is gone'})`;
    let present: boolean;
    try {
      const res = await this.onAnyMember('check turn', (client) => client.range(key, undefined, 1));
      present = res.kvs.some((kv) => kv.key.toString() === key);
    } catch (err) {
      return `cannot check the turn (${errorMessage(err)})`;
    }
    if (!present) return 'lost the cluster-wide turn: our ticket is gone';
    const busy = await check();
    if (busy) return busy;
    // Last: the keep-alive, timed from its send. Nothing else runs between it and the Defragment.
    const sent = this.deps.clock.now();
    let ttl: number;
    try {
      ttl = await this.renewLease(lease);
    } catch (err) {
      return `no keep-alive of our lease succeeds (${errorMessage(err)})`;
    }
    if (ttl <= 0 || this.lease !== lease || this.holdKey !== key) return `lost the cluster-wide turn: lease ${lease} expired`;
    const age = this.deps.clock.now() - sent;
    if (age > this.opts.leaseTTL / 3) return `the keep-alive took ${age} ms, more than a third of coordination.leaseTTL`;
    return undefined;
  }

  /** Another participant holding the turn, described; undefined when none (or unknown). */
  async holder(): Promise<string | undefined> {
    try {
      const v = await this.view();
      const h = [...v.participants.values()].find((p) => p.holding && p.lease !== this.lease);
      return h ? describeParticipant(h) : undefined;
    } catch {
      return undefined;
    }
  }

  /** Members with a registered, non-spare participant; `unknown` counts those that joined as a spare. */
  async registeredMembers(): Promise<{ members: Set<string>; unknown: number }> {
    const v = await this.view();
    const ps = [...v.participants.values()].filter((p) => !p.spare && p.tickets.length > 0);
    return {
      members: new Set(ps.flatMap((p) => (p.info.memberId ? [p.info.memberId] : []))),
      unknown: ps.filter((p) => !p.info.memberId).length,
    };
  }

  /**
   * Gives the turn back (a delete: works during NOSPACE). Safe to repeat; when no member answers,
   * we keep holding it and the keep-alive loop tries again, so it is never left held silently.
   */
  async release(): Promise<void> {
    const key = this.holdKey;
    if (!key) return;
    let unsure = false;
    let res: { succeeded: boolean };
    try {
      res = await pRetry(
        () =>
          this.sendOnce((client) =>
            client.txn(
              'give back turn',
              [{ key: Buffer.from(key), target: 'Version', result: 'Greater', version: 0 } as ICompare],
              [{ request_delete_range: { key: Buffer.from(key) } }],
            ),
          ),
        {
          retries: 2,
          // The pause between tries is on our clock (simulated in the model tests), not p-retry's timer.
          minTimeout: 0,
          onFailedAttempt: async ({ error, attemptNumber, retriesLeft }) => {
            unsure ||= uncertain(error);
            if (retriesLeft > 0) await this.deps.clock.sleep(500 * attemptNumber);
          },
        },
      );
    } catch (err) {
      this.releasePending = true;
      this.deps.log.error(
        { event: 'turn.release.fail', error: errorMessage(err) },
        `could not give back the cluster-wide turn: ${errorMessage(err)}; trying again with every keep-alive`,
      );
      return;
    }
    // After an attempt without reply, "already gone" is that attempt's doing.
    if (!res.succeeded && !unsure)
      this.deps.log.warn(
        { event: 'turn.lost', lease: this.lease },
        'the turn was already gone when giving it back (our lease expired while holding it)',
      );
    if (this.holdKey === key) this.holdKey = undefined;
    this.releasePending = false;
  }

  /** Leaves for good: revoking the lease deletes our tickets (works during NOSPACE). */
  async close(): Promise<void> {
    this.renewTimer?.cancel();
    this.spareTimer?.cancel();
    this.maintainTimer?.cancel();
    this.renewTimer = undefined;
    this.spareTimer = undefined;
    this.maintainTimer = undefined;
    const lease = this.lease;
    this.lease = undefined;
    this.holdKey = undefined;
    if (lease) await this.onAnyMember('lease revoke', (client) => client.leaseRevoke(decimalId(lease))).catch(() => undefined);
  }
}
