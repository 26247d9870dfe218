// A simulated cluster for the model tests: the etcd model, a fake clock, daemons and `once` runs on
// it, fault steps, and the invariants checked after every step.
import { loadConfig, type Config, type LoadOptions } from '../../src/config.ts';
import { Daemon } from '../../src/daemon.ts';
import { Metrics } from '../../src/metrics.ts';
import { silentLogger, type Log } from '../../src/log.ts';
import { fuseKey, haltKey } from '../../src/control.ts';
import { run, type RunResult } from '../../src/run.ts';
import { decide } from '../../src/policy.ts';
import { prefixEnd } from '../../src/etcd.ts';
import { memoryLock } from '../../src/node-lock.ts';
import { Turn } from '../../src/turn.ts';
import { FakeClock, type Owner } from './clock.ts';
import { EtcdModel, type ModelMember } from './etcd-model.ts';

export interface SimOptions {
  members?: number;
  leaseTTL?: number;
  requestTimeout?: number;
  defragTimeout?: number;
  /** nospace.compactTimeout (production: 5m; a lost compaction reply holds the turn this long). */
  compactTimeout?: number;
  maxWait?: number;
  leader?: 'transfer' | 'last';
  /** How often the fake cron fires. */
  cronEvery?: number;
  seed?: number;
  compact?: boolean;
  log?: Log;
  quotaBytes?: number;
  /** Tickets per participant (production: 64). */
  tickets?: number;
}

export interface Proc {
  name: string;
  member: string;
  owner: Owner;
  kind: 'daemon' | 'once';
  daemon?: Daemon;
  turn?: Turn;
  result?: Promise<RunResult | Error>;
  settled?: RunResult | Error;
  /** A daemon's TLS files, as its TlsWatch sees them (see Sim.changeTls). */
  tls?: FakeTls;
}

/** A Defragment as it arrived at its member, with the turn as the sender and etcd saw it then. */
export interface Arrival {
  at: number;
  member: string;
  by: string;
  /** The sender's participant and whether it believed it held the turn (undefined: no such process). */
  sender?: { participant: string | undefined; holding: boolean };
  /** Who holds the turn in etcd (lease hex). */
  holders: string[];
}

/**
 * Stands in for a daemon's TlsWatch (src/tls-files.ts): the model has no certificate files, so a
 * renewal is this flag, seen by the daemon's next look (a run, an alarm check) or by a reload.
 */
export class FakeTls {
  private renewed = false;
  renew(): void {
    this.renewed = true;
  }
  changed(): boolean {
    const r = this.renewed;
    this.renewed = false;
    return r;
  }
  reset(): boolean {
    return this.changed();
  }
}

const MiB = 1024 * 1024;

/** A small, seeded PRNG (mulberry32): the production code's jitter (Math.random) replays from the seed. */
export function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** One registry for every simulated daemon: a Metrics starts an event-loop monitor that is never stopped. */
let sharedMetrics: Metrics | undefined;

/** Configs by their flags (never modified: Sim.config copies the etcd section). */
const configs = new Map<string, Config>();

export class Sim {
  readonly clock = new FakeClock();
  readonly model: EtcdModel;
  readonly procs: Proc[] = [];
  readonly base: Config;
  private readonly configs = new Map<string, Config>();
  private readonly log: Log;
  private readonly random: () => number;
  private readonly savedRandom = Math.random;
  private strays = new Map<string, number>();
  /** The node lock of the NOSPACE order, shared by the processes of each simulated node. */
  private readonly locks = new Map<string, () => boolean>();
  private lastCheck = 0;
  private seq = 0;
  private readonly flags: Record<string, unknown>;
  /** Every Defragment that reached a member (EtcdModel.onDefragmentArrive). */
  readonly arrivals: Arrival[] = [];

  constructor(readonly o: SimOptions = {}) {
    this.log = o.log ?? silentLogger();
    this.random = prng(o.seed ?? 1);
    Math.random = this.random;
    const flags: Record<string, unknown> = {
      'etcd.endpoint': 'https://10.0.0.1:2379',
      'etcd.dataDir': '',
      'etcd.requestTimeout': o.requestTimeout ?? 2000,
      'etcd.defragTimeout': o.defragTimeout ?? 20_000,
      'coordination.leaseTTL': o.leaseTTL ?? 6000,
      'coordination.maxWait': o.maxWait ?? 120_000,
      'coordination.settle': 500,
      'coordination.leader': o.leader ?? 'transfer',
      'retry.attempts': 3,
      'retry.minDelay': 200,
      'retry.maxDelay': 2000,
      'nospace.checkInterval': 5000,
      // Schedules last minutes: the trend's early runs (forecast, compaction fallback) within them.
      'forecast.window': 120_000,
      'forecast.minSpan': 30_000,
      'forecast.defragBefore': 600_000,
      'compaction.staleAfter': 60_000,
      'compaction.keepHistory': 15_000,
      'nospace.compactTimeout': o.compactTimeout ?? 20_000,
      ...(o.compact === undefined ? {} : { 'nospace.compact': o.compact }),
      'etcd.caFile': '',
      'etcd.certFile': '',
      'etcd.keyFile': '', // no certificate files to watch for renewals
      'metrics.listen': '',
      'policy.quotaBytes': o.quotaBytes ?? 2048 * MiB,
      'policy.minReclaimable': '64MiB',
      'log.level': 'silent',
    };
    this.flags = flags;
    // Loaded once per set of flags: thousands of schedules share a handful of configs.
    const id = JSON.stringify(flags);
    let base = configs.get(id);
    if (!base)
      configs.set(
        id,
        (base = loadConfig({ path: '/nonexistent/etcd-defragd.yaml', pathExplicit: false, env: {}, flags, checkFiles: false }).config),
      );
    this.base = base;
    this.model = new EtcdModel(this.clock, {
      members: o.members ?? 3,
      quotaBytes: o.quotaBytes ?? 2048 * MiB,
      retry: this.base.retry,
      requestTimeout: this.base.etcd.requestTimeout,
      defragTimeout: this.base.etcd.defragTimeout,
      haltKeys: [haltKey(this.base)],
      fuse: { key: fuseKey(this.base), armed: `${this.base.coordination.prefix}fuse-armed` },
    });
    this.clock.onStep = () => this.step();
    this.model.onDefragmentArrive = (m, by) => this.defragmentArrived(m, by);
    this.model.onDefragmentSent = (m, by) => this.checkSender(m, by);
  }

  /** Every Defragment that starts on a member is recorded (Sim.arrivals; it may start late, see checkSender). */
  private defragmentArrived(m: ModelMember, by: string): void {
    const p = this.procs.find((x) => x.name === by);
    this.arrivals.push({ at: this.clock.now(), member: m.name, by, sender: p ? this.turnState(p) : undefined, holders: this.holders() });
  }

  /** What a reload (SIGHUP) of a member's daemon reads: the same flags, so the same config. */
  loadOptions(member: string): LoadOptions {
    return {
      path: '/nonexistent/etcd-defragd.yaml',
      pathExplicit: false,
      env: {},
      // The trace's level survives a reload (Daemon.reload sets the log's level from the config).
      flags: { ...this.flags, 'etcd.endpoint': this.model.member(member).endpoint, 'log.level': this.o.log?.level ?? 'silent' },
      checkFiles: false,
    };
  }

  /**
   * When a Defragment reaches member m, its sender holds the turn: the lease-based turn in etcd, or
   * the first place of the NOSPACE order (m is the voting member with the lowest ID whose db is at
   * or above the disarm mark), and m is the sender's own member. Checked when it reaches the
   * member's socket: a frozen member runs it when thawed, maybe long after its sender died, as etcd
   * would; that it then starts while no other member defragments is EtcdModel.startDefrag's check.
   */
  private checkSender(m: ModelMember, by: string): void {
    const p = this.procs.find((x) => x.name === by);
    if (!p) return; // a test's own client
    if (p.member !== m.name) this.model.violate(`${by} defragmented ${m.name}, not its own member ${p.member}`);
    const lease = this.turnState(p).participant;
    if (lease && this.holders().includes(lease)) return;
    const mark = this.model.opts.quotaBytes * this.base.nospace.disarmBelow;
    const first = this.model.members
      .filter((x) => !x.isLearner && x.dbSize >= mark)
      .sort((a, b) => (BigInt(a.id) < BigInt(b.id) ? -1 : 1))[0];
    if (first !== m)
      this.model.violate(
        `${by} defragmented ${m.name} without the turn: it holds no lease-based turn, and the NOSPACE order has ${first?.name ?? 'nobody'} first`,
      );
  }

  /** The log of one simulated process: its lines name it (MODEL_LOG traces a replayed schedule). */
  private procLog(owner: Owner): Log {
    return this.o.log ? this.log.child({ proc: owner.name }) : this.log;
  }

  dispose(): void {
    Math.random = this.savedRandom;
    for (const p of this.procs) p.owner.kill();
  }

  config(member: string): Config {
    const m = this.model.member(member);
    let c = this.configs.get(m.endpoint);
    if (!c) {
      c = { ...this.base, etcd: { ...this.base.etcd, endpoint: m.endpoint } };
      this.configs.set(m.endpoint, c);
    }
    return c;
  }

  startDaemon(member: string, config = this.config(member)): Proc {
    const owner = this.clock.owner(`daemon-${member}-${++this.seq}`);
    const clock = owner.clock();
    const every = this.o.cronEvery ?? 60_000;
    const daemon = new Daemon(config, {
      log: this.procLog(owner),
      clock,
      loadOptions: this.loadOptions(member),
      tickets: this.o.tickets ?? 16,
      metrics: (sharedMetrics ??= new Metrics('model')),
      nodeLock: memoryLock(this.locks, () => owner.alive),
      pool: () => this.model.pool(owner),
      scheduler: (_cron, _tz, fn) => {
        const t = clock.every(every, fn);
        return { stop: () => t.cancel(), nextRuns: () => [] };
      },
    });
    const tls = new FakeTls();
    // The daemon's TLS watch is private; the model has no files, so it is swapped for the flag.
    const d = daemon as unknown as { tls: unknown };
    if (!('tls' in d)) throw new Error('model: Daemon has no `tls` watch any more: update Sim.startDaemon');
    d.tls = tls;
    const p: Proc = { name: owner.name, member, owner, kind: 'daemon', daemon, tls };
    this.procs.push(p);
    void daemon.start();
    return p;
  }

  /** Renewed certificates on a daemon's node: it reconnects (new pool, new turn) at its next look. */
  changeTls(p: Proc): void {
    p.tls?.renew();
  }

  /**
   * A graceful stop (SIGTERM, as `systemctl stop` or a restart sends): the daemon finishes or gives up
   * its run and leaves the turn; the process exits when it has stopped, or is killed after `killAfter`
   * (systemd's TimeoutStopSec). `onExit` runs when the process is gone.
   */
  stopDaemon(p: Proc, killAfter = 10_000, onExit?: () => void): void {
    let gone = false;
    const exit = () => {
      if (gone) return;
      gone = true;
      p.owner.kill();
      onExit?.();
    };
    const timer = this.clock.at(this.clock.now() + killAfter, exit);
    void p.daemon
      ?.stop()
      .catch(() => undefined)
      .finally(() => {
        timer.cancel();
        exit();
      });
  }

  /** `etcd-defragd once` on a member's node: same code path as cli.ts once(). */
  runOnce(member: string, opts: { force?: boolean } = {}, config = this.config(member)): Proc {
    const owner = this.clock.owner(`once-${member}-${++this.seq}`);
    const clock = owner.clock();
    const pool = this.model.pool(owner);
    const turn = new Turn(
      {
        prefix: config.coordination.prefix,
        leaseTTL: config.coordination.leaseTTL,
        command: 'etcd-defragd once',
        tickets: this.o.tickets ?? 16,
      },
      { pool, endpoint: config.etcd.endpoint, log: this.procLog(owner), clock },
    );
    const p: Proc = { name: owner.name, member, owner, kind: 'once', turn };
    p.result = (async () => {
      try {
        return await run(
          {
            config,
            pool,
            log: this.procLog(owner),
            clock,
            turn,
            nodeLock: memoryLock(this.locks, () => owner.alive),
            onInspected: (v) => turn.identify(v.local.id),
          },
          { mode: 'once', force: opts.force },
        );
      } catch (err) {
        return err as Error;
      } finally {
        await turn.close();
        owner.kill(); // the process exits
      }
    })().then((r) => (p.settled = r));
    this.procs.push(p);
    return p;
  }

  /** A bare participant of the turn in its own process (what `once` and the daemon build). */
  newTurn(member: string, opts: { tickets?: number } = {}): { turn: Turn; owner: Owner } {
    const config = this.config(member);
    const owner = this.clock.owner(`turn-${member}-${++this.seq}`);
    const turn = new Turn(
      {
        prefix: config.coordination.prefix,
        leaseTTL: config.coordination.leaseTTL,
        command: 'test',
        tickets: opts.tickets ?? this.o.tickets ?? 16,
      },
      { pool: this.model.pool(owner), endpoint: config.etcd.endpoint, log: this.procLog(owner), clock: owner.clock() },
    );
    turn.identify(this.model.member(member).id);
    this.procs.push({ name: owner.name, member, owner, kind: 'once', turn });
    return { turn, owner };
  }

  /** Runs simulated time until `done()` or `maxMs` passed. */
  async until(done: () => boolean, maxMs: number, stepMs = 100): Promise<boolean> {
    const end = this.clock.now() + maxMs;
    while (!done() && this.clock.now() < end) await this.run(stepMs);
    return done();
  }

  /** Awaits a promise of the simulated world while driving its clock. */
  async drive<T>(p: Promise<T>, maxMs = 10 * 60_000): Promise<T> {
    let settled = false;
    let value: T | undefined;
    let error: unknown;
    p.then(
      (v) => {
        settled = true;
        value = v;
      },
      (e: unknown) => {
        settled = true;
        error = e;
      },
    );
    await this.until(() => settled, maxMs);
    if (!settled) throw new Error(`did not settle within ${maxMs} ms of simulated time`);
    if (error !== undefined) throw error;
    return value as T;
  }

  /** SIGKILL: timers and replies to it are dropped; what it sent to etcd goes on there. */
  kill(p: Proc): void {
    p.owner.kill();
  }

  live(): Proc[] {
    return this.procs.filter((p) => p.owner.alive);
  }

  turnState(p: Proc): { participant: string | undefined; holding: boolean } {
    if (p.daemon) return p.daemon.turnState();
    return { participant: p.turn?.participant(), holding: p.turn?.holding() ?? false };
  }

  /** Who holds the turn in etcd (lease hex), by the lowest ticket of each participant. */
  holders(): string[] {
    if (this.holdersAt?.rev === this.model.revision) return this.holdersAt.holders;
    const holders = this.computeHolders();
    this.holdersAt = { rev: this.model.revision, holders };
    return holders;
  }

  private holdersAt: { rev: bigint; holders: string[] } | undefined;

  private computeHolders(): string[] {
    const base = `${this.base.coordination.prefix}p/`;
    const lowest = new Map<string, number>();
    for (const kv of this.model.rangeKvs(Buffer.from(base), prefixEnd(base))) {
      const [lease, kind, index] = kv.key.toString().slice(base.length).split('/');
      if (kind !== 't' || !lease) continue;
      // A key counts for the lease it is attached to (etcd deletes it with that lease), not for the name it carries.
      if (!/^[0-9a-f]+$/.test(lease) || String(kv.lease) !== BigInt(`0x${lease}`).toString()) continue;
      const n = Number(index);
      if (!lowest.has(lease) || n < lowest.get(lease)!) lowest.set(lease, n);
    }
    return [...lowest.entries()].filter(([, n]) => n % 2 === 1).map(([l]) => l);
  }

  /** After every timer: the checks that are not made where a Defragment arrives (see EtcdModel.startDefrag). */
  private step(): void {
    const now = this.clock.now();
    if (now - this.lastCheck < 250) return;
    this.lastCheck = now;
    const holders = this.holders();
    if (holders.length > 1) this.model.violate(`two participants hold the turn: ${holders.join(', ')}`);
    // No turn left held by nobody: a held turn belongs to a live process that knows it holds it,
    // or to a dead one whose lease then expires. Grace: a take in flight, a give-back being retried.
    const grace = 3 * this.base.coordination.leaseTTL + 4 * this.base.etcd.requestTimeout;
    // Without a leader and a majority, or under CORRUPT (etcd refuses LeaseRevoke), no lease expires
    // and no key can be deleted: the grace starts once they can again.
    if (!this.model.expiring()) {
      this.strays.clear();
      return;
    }
    for (const lease of holders) {
      const owner = this.live().find((p) => this.turnState(p).participant === lease);
      const ok = owner ? this.turnState(owner).holding : false;
      if (ok) {
        this.strays.delete(lease);
        continue;
      }
      const since = this.strays.get(lease) ?? now;
      this.strays.set(lease, since);
      if (now - since > grace) {
        this.model.violate(
          `the turn is held by ${lease} and nobody uses it (${owner ? `${owner.name} does not know it holds it` : 'no live process owns it'}) for ${now - since} ms`,
        );
        this.strays.set(lease, now); // report once per grace period
      }
    }
    for (const lease of [...this.strays.keys()]) if (!holders.includes(lease)) this.strays.delete(lease);
  }

  run(ms: number): Promise<void> {
    return this.clock.runFor(ms);
  }

  /** Members that still need a defragment by the policy (liveness). */
  needing(): string[] {
    return this.model.members
      .filter((m) => !m.isLearner && decide(m, this.base.policy, this.model.opts.quotaBytes).defrag)
      .map((m) => m.name);
  }

  rng(): number {
    return this.random();
  }
}
