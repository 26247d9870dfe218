// The cluster-wide turn: at most one participant (daemon or `once`) defragments at a time.
//
// It must keep working during a NOSPACE alarm, when etcd refuses Put and LeaseGrant but still
// serves reads, compare-and-delete transactions and keep-alives of existing leases. So taking and
// giving back the turn only ever DELETES keys that were written earlier, while writes worked:
//
//   <prefix>p/<lease>/info        who this participant is (JSON)
//   <prefix>p/<lease>/t/<index>   tickets 0..N-1, all attached to the participant's lease
//
// A key counts only when it is attached to the lease its name says (kv.lease): a writer under the
// prefix cannot make the daemons renew, wait for or revoke a lease that is not a participant's.
//
// A participant's lowest remaining ticket index says its state: even = idle, odd = holding the turn.
// Taking the turn deletes the lowest (even) ticket in a transaction that also checks that nothing
// under the prefix was written since our read and that every other participant's lowest (even)
// ticket still exists - so no other participant took the turn or appeared in between. Giving it back
// deletes the next (odd) ticket. A participant that dies loses its lease after coordination.leaseTTL,
// which deletes its tickets, and with them any turn it held.
//
// A daemon that (re)starts while NOSPACE is raised cannot grant a lease, so it cannot join; it does
// not need to: NOSPACE recovery follows an order that writes nothing (run.ts nospaceSteps), and the
// daemon joins once writes work again. A turn taken before the alarm is still respected by it.
import { hostname } from 'node:os';
import type { ICompare, IKeyValue, IRequestOp } from 'etcd3';
import pRetry from 'p-retry';
import type { Clock, Timer } from './clock.ts';
import { keyExists, kindOf, prefixEnd, type EtcdMember, type EtcdPool } from './etcd.ts';
import { DefragdError, errorMessage } from './errors.ts';
import type { Log } from './log.ts';
import { decimalId, hexId } from './view.ts';

export const TICKETS = 64; // 32 turns; refilled whenever writes work

const REFILL_BELOW = 16;

/** The most keys the turn reads under p/: room for 50 participants with two ticket refills each. */
const TURN_KEY_LIMIT = 10_000;

export interface ParticipantInfo {
  memberId?: string;
  host?: string;
  pid?: number;
  command?: string;
  since?: string;
}

export interface Participant {
  lease: string; // hex, as in the key
  info: ParticipantInfo;
  tickets: number[]; // remaining, ascending
  holding: boolean;
}

export interface TurnView {
  readonly revision: bigint;
  readonly participants: ReadonlyMap<string, Readonly<Participant>>;
  /** Keys under p/ not attached to the lease their name says, or not of our layout: ignored. */
  readonly ignored: readonly string[];
}

/** Only the fields we write, of the types we write (anything else in `info` is dropped). */
function parseInfo(value: Buffer): ParticipantInfo {
  let o: unknown;
  try {
    o = JSON.parse(value.toString());
  } catch {
    return {};
  }
  if (!o || typeof o !== 'object' || Array.isArray(o)) return {};
  const r = o as Record<string, unknown>;
  const str = (k: string) => (typeof r[k] === 'string' && (r[k] as string).length <= 256 ? (r[k] as string) : undefined);
  const info: ParticipantInfo = {};
  if (str('memberId') && /^\d+$/.test(str('memberId')!)) info.memberId = str('memberId');
  if (str('host')) info.host = str('host');
  if (Number.isSafeInteger(r.pid)) info.pid = r.pid as number;
  if (str('command')) info.command = str('command');
  if (str('since')) info.since = str('since');
  return info;
}

const pad = (n: number) => String(n).padStart(12, '0');

export function parseView(prefix: string, kvs: IKeyValue[], revision: bigint): TurnView {
  const participants = new Map<string, Participant>();
  const ignored: string[] = [];
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
    // The lease in the name must be the key's own lease: a planted key naming another lease counts for nothing.
    if (!/^[0-9a-f]{1,16}$/.test(lease) || String(kv.lease) !== decimalId(lease)) {
      ignored.push(kv.key.toString());
      continue;
    }
    // etcd answers in key order, so one participant's keys come together.
    if (p?.lease !== lease) {
      p = participants.get(lease);
      if (!p) {
        p = { lease, info: {}, tickets: [], holding: false };
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
    else if (kind === 'info') p.info = parseInfo(kv.value);
  }
  for (const p of participants.values()) {
    p.tickets.sort((a, b) => a - b);
    p.holding = p.tickets.length > 0 && p.tickets[0]! % 2 === 1;
  }
  return { revision, participants, ignored };
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
  return `${i.command ?? 'daemon'} (${who || `lease ${p.lease}`})`;
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
  private maintainTimer: Timer | undefined;
  private renewing = false;
  private maintaining = false;
  private acquiring = false;
  private releasePending = false;
  /** close() was called: a registration still under way revokes what it made instead of joining. */
  private closed = false;
  /** The planted keys already logged (parseView ignores them). */
  private ignoredLogged = '';
  /** Why the last keep-alive failed, or how the lease was lost (for the reason of a skipped run). */
  private trouble = '';
  private readonly poll: number;
  private memberId: string | undefined;
  private registering: Promise<void> | undefined;
  /** Client URLs of the other voting members, from the member list; the local endpoint is tried last. */
  private others: string[] = [];
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
    const res = await this.onAnyMember('read turn', (client) => client.range(base, undefined, 1, TURN_KEY_LIMIT));
    // Our participants hold TICKETS + 1 keys each: anything near the limit was not written by us.
    if (res.more)
      throw new DefragdError(
        'EDD_ETCD',
        `more than ${TURN_KEY_LIMIT} keys under ${base}: not the turn's own keys; ` +
          `check what writes there (etcdctl get --prefix --keys-only ${base}) and delete what is not etcd-defragd's`,
        { permanent: false },
      );
    // An unchanged store revision means unchanged keys (keep-alives do not move it): the turn is
    // read every keep-alive period and mostly has not changed.
    if (this.lastView?.revision !== res.revision) {
      this.lastView = parseView(this.opts.prefix, res.kvs, res.revision);
      const ignored = this.lastView.ignored.join(' ');
      if (ignored && ignored !== this.ignoredLogged)
        this.deps.log.warn(
          { event: 'turn.ignored', keys: this.lastView.ignored.slice(0, 10) },
          `ignoring ${this.lastView.ignored.length} key(s) under ${this.opts.prefix}p/ that are not attached to the lease their name says ` +
            '(written by hand or by another tool?)',
        );
      this.ignoredLogged = ignored;
    }
    return this.lastView;
  }

  private ticketPuts(lease: string, from: number, count: number): IRequestOp[] {
    const ops: IRequestOp[] = [];
    for (let i = from; i < from + count; i++) {
      ops.push({ request_put: { key: Buffer.from(this.key(lease, `t/${pad(i)}`)), value: Buffer.alloc(0), lease: decimalId(lease) } });
    }
    return ops;
  }

  private async createParticipant(): Promise<string> {
    // A grant whose reply was lost leaves a lease nobody renews: it expires by itself.
    const id = await this.onAnyMember('lease grant', (client) => client.leaseGrant(Math.ceil(this.opts.leaseTTL / 1000)));
    const lease = hexId(id);
    const since = new Date(this.deps.clock.now()).toISOString();
    const info: ParticipantInfo = { memberId: this.memberId, host: hostname(), pid: process.pid, command: this.opts.command, since };
    const ops: IRequestOp[] = [
      { request_put: { key: Buffer.from(this.key(lease, 'info')), value: Buffer.from(JSON.stringify(info)), lease: id } },
      ...this.ticketPuts(lease, 0, this.tickets),
    ];
    // Repeating these puts is harmless: nobody uses the new participant's keys yet.
    await this.onAnyMember('register', (client) => client.txn('register', [], ops));
    return lease;
  }

  /** Joins the coordination: a new participant (needs writes: refused during NOSPACE). */
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
    let lease: string;
    try {
      lease = await this.createParticipant();
    } catch (err) {
      if (kindOf(err) !== 'nospace') throw err;
      throw new DefragdError(
        'EDD_ETCD',
        'cannot join the cluster-wide turn during the NOSPACE alarm (etcd grants no lease); ' +
          'NOSPACE recovery does not need it (NOSPACE order), and it is joined once writes work',
        { cause: err, permanent: false },
      );
    }
    if (this.closed) {
      // close() came while we registered: leave no participant behind that nobody uses.
      await this.onAnyMember('lease revoke', (client) => client.leaseRevoke(decimalId(lease))).catch(() => undefined);
      return;
    }
    this.lease = lease;
    this.deps.log.info({ event: 'turn.register', lease }, `joined the cluster-wide turn as lease ${lease}`);
    this.trouble = '';
    this.startKeepAlive();
  }

  private startKeepAlive(): void {
    if (this.renewTimer) return;
    const every = Math.max(500, Math.floor(this.opts.leaseTTL / 3));
    // Our own lease has its own timer and short deadlines: nothing slower may delay it past the TTL.
    this.renewTimer = this.deps.clock.every(every, () => void this.renew());
    // Upkeep (members, refills, a stray turn) is slower work and need not run at renewal pace.
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

  /** Slower upkeep: members, tickets to refill, a stray turn to give back. */
  async maintain(): Promise<void> {
    if (this.maintaining || !this.lease) return;
    this.maintaining = true;
    try {
      await this.refreshMembers();
      const view = await this.view();
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
          throw new DefragdError('EDD_ETCD', `no tickets left to take the turn and cannot write new ones: ${errorMessage(err)}`, {
            permanent: false,
          });
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
          keyExists(this.key(me.lease, `t/${pad(me.tickets[0]!)}`)),
          keyExists(this.key(me.lease, `t/${pad(me.tickets[1]!)}`)),
          ...others.map((p) => keyExists(this.key(p.lease, `t/${pad(p.tickets[0]!)}`))),
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

  /** Another participant holding the turn, described; undefined when none. Throws when the turn cannot be read. */
  async heldByOther(): Promise<string | undefined> {
    const v = await this.view();
    const h = [...v.participants.values()].find((p) => p.holding && p.lease !== this.lease);
    return h ? describeParticipant(h) : undefined;
  }

  /** heldByOther() for a log line: undefined also when the turn cannot be read. */
  holder(): Promise<string | undefined> {
    return this.heldByOther().catch(() => undefined);
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
          this.sendOnce((client) => client.txn('give back turn', [keyExists(key)], [{ request_delete_range: { key: Buffer.from(key) } }])),
        {
          retries: 2,
          // The pause between tries is on our clock (simulated in the model tests), not p-retry's timer.
          minTimeout: 0,
          shouldRetry: ({ error }) => kindOf(error) !== 'nospace',
          onFailedAttempt: async ({ error, attemptNumber, retriesLeft }) => {
            unsure ||= uncertain(error);
            if (retriesLeft > 0 && kindOf(error) !== 'nospace') await this.deps.clock.sleep(500 * attemptNumber);
          },
        },
      );
    } catch (err) {
      // etcd before 3.4.20/3.5.7 refuses even this delete-only Txn on a member over its quota
      // during NOSPACE. A lease revoke is never quota-checked: it gives the turn back with the
      // whole participant, which joins again once writes work.
      if (kindOf(err) === 'nospace') {
        await this.leave('giving the turn back was refused during NOSPACE (etcd before 3.4.20/3.5.7)');
        return;
      }
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

  /**
   * Revokes our lease (never quota-checked, works during NOSPACE), which deletes our tickets and any
   * turn we hold; the next run joins again. When no member takes the revoke, the keep-alive loop
   * tries again, so a held turn is never left behind silently.
   */
  private async leave(why: string): Promise<void> {
    const lease = this.lease;
    if (!lease) return;
    try {
      await this.onAnyMember('lease revoke', (client) => client.leaseRevoke(decimalId(lease)));
    } catch (err) {
      this.releasePending = true;
      this.deps.log.error(
        { event: 'turn.release.fail', error: errorMessage(err) },
        `${why}; revoking our lease failed too: ${errorMessage(err)}; trying again with every keep-alive`,
      );
      return;
    }
    this.deps.log.warn({ event: 'turn.leave', lease }, `${why}: revoked lease ${lease}, which gives the turn back; joining again later`);
    this.stopTimers();
    if (this.lease === lease) {
      this.lease = undefined;
      this.holdKey = undefined;
      this.releasePending = false;
    }
  }

  private stopTimers(): void {
    this.renewTimer?.cancel();
    this.maintainTimer?.cancel();
    this.renewTimer = undefined;
    this.maintainTimer = undefined;
  }

  /** Leaves for good: revoking the lease deletes our tickets (works during NOSPACE). */
  async close(): Promise<void> {
    this.closed = true;
    this.stopTimers();
    const lease = this.lease;
    this.lease = undefined;
    this.holdKey = undefined;
    if (lease) await this.onAnyMember('lease revoke', (client) => client.leaseRevoke(decimalId(lease))).catch(() => undefined);
  }
}
