// The random fault schedules of the model tests and how one is played (see schedules.test.ts).
import fc from 'fast-check';
import pino from 'pino';
import { fuseKey, haltKey, pauseKey } from '../../src/control.ts';
import { Sim, type Proc } from './sim.ts';

type Step =
  | { t: 'wait'; ms: number }
  | { t: 'freeze' | 'thaw' | 'kill' | 'restart' | 'fragment' | 'nospace' | 'lose' | 'corrupt'; m: number }
  | { t: 'slow' | 'freezeAtDefrag' | 'lone'; m: number; ms: number }
  | { t: 'churn'; mib: number }
  | { t: 'killDaemon' | 'startDaemon' | 'pauseDaemon' | 'resumeDaemon' | 'once' | 'reload'; m: number }
  | { t: 'restartDaemon'; m: number; graceful: boolean }
  | { t: 'tls'; m: number; reload: boolean }
  | { t: 'blackout'; m: number; history: boolean }
  | { t: 'leader' | 'disarm' | 'trigger' | 'halt' | 'pause' | 'unpause' | 'apiCompact' };

const member = fc.integer({ min: 0, max: 4 });
const step: fc.Arbitrary<Step> = fc.oneof(
  { weight: 6, arbitrary: fc.record({ t: fc.constant('wait' as const), ms: fc.integer({ min: 100, max: 15_000 }) }) },
  {
    weight: 2,
    arbitrary: fc.record({
      t: fc.constantFrom('freeze' as const, 'thaw' as const, 'kill' as const, 'restart' as const, 'fragment' as const, 'lose' as const),
      m: member,
    }),
  },
  { weight: 1, arbitrary: fc.record({ t: fc.constant('nospace' as const), m: member }) },
  { weight: 1, arbitrary: fc.record({ t: fc.constant('slow' as const), m: member, ms: fc.integer({ min: 500, max: 40_000 }) }) },
  // SIGSTOP just as a Defragment reaches the member: its caller times out, and it runs when thawed.
  // Or every other member stopped for a while: a lone survivor, without a majority.
  {
    weight: 2,
    arbitrary: fc.record({
      t: fc.constantFrom('freezeAtDefrag' as const, 'lone' as const),
      m: member,
      ms: fc.integer({ min: 1000, max: 30_000 }),
    }),
  },
  {
    weight: 2,
    arbitrary: fc.record({
      t: fc.constantFrom('killDaemon' as const, 'startDaemon' as const, 'pauseDaemon' as const, 'resumeDaemon' as const, 'once' as const),
      m: member,
    }),
  },
  { weight: 1, arbitrary: fc.record({ t: fc.constantFrom('leader' as const, 'disarm' as const, 'trigger' as const) }) },
  // The API server's writes and its compactor: history that fills the quota unless compacted.
  {
    weight: 1,
    arbitrary: fc.oneof(
      fc.record({ t: fc.constant('churn' as const), mib: fc.integer({ min: 100, max: 1200 }) }),
      fc.record({ t: fc.constant('apiCompact' as const) }),
    ),
  },
  // Operators and etcd's own checks: a halt (as an integrity mismatch records it), a pause and its
  // resume, a CORRUPT alarm.
  {
    weight: 1,
    arbitrary: fc.oneof(
      fc.record({ t: fc.constantFrom('halt' as const, 'pause' as const, 'unpause' as const) }),
      fc.record({ t: fc.constant('corrupt' as const), m: member }),
    ),
  },
  // The daemon's own life: SIGHUP, renewed certificates, a restart, every daemon down while the quota fills.
  {
    weight: 2,
    arbitrary: fc.oneof(
      fc.record({ t: fc.constant('reload' as const), m: member }),
      fc.record({ t: fc.constant('tls' as const), m: member, reload: fc.boolean() }),
      fc.record({ t: fc.constant('restartDaemon' as const), m: member, graceful: fc.boolean() }),
      fc.record({ t: fc.constant('blackout' as const), m: member, history: fc.boolean() }),
    ),
  },
);

export const scenario = fc.record({
  members: fc.integer({ min: 3, max: 5 }),
  leader: fc.constantFrom('transfer' as const, 'last' as const),
  seed: fc.integer({ min: 1, max: 2 ** 31 - 1 }),
  /**
   * joined: the daemons join while writes work, then the faults. afterAlarm: the quota is full (by
   * history or by fragmentation) before any daemon ever ran (a fresh install during the incident).
   */
  start: fc.oneof(
    { weight: 3, arbitrary: fc.record({ t: fc.constant('joined' as const) }) },
    {
      weight: 1,
      arbitrary: fc.record({
        t: fc.constant('afterAlarm' as const),
        m: member,
        history: fc.boolean(),
        delay: fc.integer({ min: 0, max: 20_000 }),
      }),
    },
  ),
  steps: fc.array(step, { minLength: 1, maxLength: 14 }),
});

export type Scenario = typeof scenario extends fc.Arbitrary<infer T> ? T : never;

const MiB = 1024 * 1024;

/** The member's file reaches the quota: by history on every member (compaction needed), or by fragmentation of one. */
function fill(sim: Sim, name: string, history: boolean): void {
  const m = sim.model.member(name);
  if (!history) return sim.model.fillToQuota(name);
  // Refused when the alarm is already raised or there is no majority: then this fill is a no-op.
  sim.model.churn(Math.max(MiB, sim.model.opts.quotaBytes - m.dbSizeInUse + MiB));
}

export async function runScenario(s: Scenario): Promise<{ violations: string[]; needing: string[]; sim: Sim; seen: Seen; end: string }> {
  let now = () => 0;
  const sim = new Sim({
    members: s.members,
    leader: s.leader,
    seed: s.seed,
    cronEvery: 10_000,
    leaseTTL: 3000,
    requestTimeout: 1000,
    defragTimeout: 10_000,
    compactTimeout: 10_000,
    maxWait: 60_000,
    log: process.env.MODEL_LOG ? traceLog(() => now()) : undefined,
  });
  now = () => sim.clock.now();
  const names = sim.model.members.map((m) => m.name);
  const daemons = new Map<string, Proc>();
  const at = (i: number) => names[i % names.length]!;
  const seen: Seen = { noSpace: false, noQuorum: false, duringAlarm: new Set(), unjoined: 0, startedDuringAlarm: 0 };
  const look = () => {
    if (sim.model.alarms.some((a) => a.alarm === 'NOSPACE')) seen.noSpace = true;
    if (!sim.model.quorum()) seen.noQuorum = true;
  };
  // Members to freeze when the next Defragment arrives, and for how long.
  const freezeAtDefrag = new Map<string, number>();
  sim.model.onArrive = (_owner, op, endpoint) => {
    if (op !== 'defragment' || freezeAtDefrag.size === 0) return;
    const m = sim.model.member(endpoint);
    const ms = freezeAtDefrag.get(m.name);
    if (ms === undefined) return;
    freezeAtDefrag.delete(m.name);
    sim.model.freeze(m.name);
    sim.clock.at(sim.clock.now() + ms, () => sim.model.thaw(m.name));
  };
  const start = (n: string) => {
    const d = daemons.get(n);
    if (d?.owner.alive) return;
    // During the alarm, or after a disarm while a member is still over the quota (the next write raises it again).
    if (sim.model.alarms.some((a) => a.alarm === 'NOSPACE') || sim.model.members.some((m) => m.dbSize >= sim.model.opts.quotaBytes))
      seen.startedDuringAlarm++;
    daemons.set(n, sim.startDaemon(n));
  };
  try {
    if (s.start.t === 'afterAlarm') {
      fill(sim, at(s.start.m), s.start.history);
      look();
      await sim.run(s.start.delay);
    }
    for (const n of names) start(n);
    await sim.run(3000);
    for (const st of s.steps) {
      if (sim.model.alarms.some((a) => a.alarm === 'NOSPACE')) seen.duringAlarm.add(st.t);
      switch (st.t) {
        case 'wait':
          await sim.run(st.ms);
          break;
        case 'freeze':
          sim.model.freeze(at(st.m));
          break;
        case 'thaw':
          sim.model.thaw(at(st.m));
          break;
        case 'kill':
          sim.model.kill(at(st.m));
          break;
        case 'restart':
          sim.model.restart(at(st.m));
          break;
        case 'fragment':
          sim.model.fragment(at(st.m));
          break;
        case 'lose':
          sim.model.member(at(st.m)).loseReplies += 1;
          break;
        case 'nospace':
          sim.model.fillToQuota(at(st.m));
          break;
        case 'slow':
          sim.model.member(at(st.m)).defragMs = st.ms;
          break;
        case 'freezeAtDefrag':
          freezeAtDefrag.set(at(st.m), st.ms);
          break;
        case 'lone':
          for (const o of names.filter((n) => n !== at(st.m) && sim.model.member(n).state === 'up')) {
            sim.model.freeze(o);
            sim.clock.at(sim.clock.now() + st.ms, () => sim.model.thaw(o));
          }
          break;
        case 'churn':
          sim.model.churn(st.mib * MiB);
          break;
        case 'apiCompact':
          sim.model.apiCompact();
          break;
        case 'leader':
          sim.model.changeLeader();
          break;
        case 'disarm':
          sim.model.disarmAll();
          break;
        case 'trigger':
          for (const d of daemons.values()) d.daemon?.trigger('scheduled');
          break;
        case 'halt':
          recordHalt(sim);
          break;
        case 'pause':
          // `etcd-defragd pause` writes a key: refused under NOSPACE and without a majority.
          if (writable(sim)) sim.model.adminPut(pauseKey(sim.base), JSON.stringify({ by: 'op', host: 'h', at: 'now', reason: 'model' }));
          break;
        case 'unpause':
          if (sim.model.quorum() && !sim.model.alarms.some((a) => a.alarm === 'CORRUPT')) sim.model.adminDelete(pauseKey(sim.base));
          break;
        case 'corrupt':
          sim.model.raiseCorrupt(at(st.m));
          break;
        case 'killDaemon': {
          const d = daemons.get(at(st.m));
          if (d?.owner.alive) sim.kill(d);
          break;
        }
        case 'startDaemon':
          start(at(st.m));
          break;
        case 'pauseDaemon':
          daemons.get(at(st.m))?.owner.pause();
          break;
        case 'resumeDaemon':
          daemons.get(at(st.m))?.owner.resume();
          break;
        case 'once':
          sim.runOnce(at(st.m), { force: true });
          break;
        case 'reload': {
          const d = daemons.get(at(st.m));
          if (d?.owner.alive && !d.owner.paused) d.daemon?.reload();
          break;
        }
        case 'tls': {
          const d = daemons.get(at(st.m));
          if (!d?.owner.alive) break;
          sim.changeTls(d);
          if (st.reload && !d.owner.paused) d.daemon?.reload();
          break;
        }
        case 'restartDaemon': {
          const n = at(st.m);
          const d = daemons.get(n);
          if (!d?.owner.alive) start(n);
          else if (!st.graceful || d.owner.paused) {
            sim.kill(d);
            start(n);
          } else
            sim.stopDaemon(d, 10_000, () => {
              if (daemons.get(n) === d) start(n);
            });
          break;
        }
        case 'blackout':
          // Every daemon down (a reboot of every node, a bad package upgrade) while the quota fills.
          for (const d of daemons.values()) if (d.owner.alive) sim.kill(d);
          fill(sim, at(st.m), st.history);
          break;
      }
      look();
      if (sim.model.alarms.some((a) => a.alarm === 'NOSPACE')) seen.duringAlarm.add(st.t);
      await sim.run(1);
      look();
    }
    // The faults stop: every member answers, every node has a running daemon, replies arrive.
    freezeAtDefrag.clear();
    for (const m of sim.model.members) {
      sim.model.thaw(m.name);
      sim.model.restart(m.name);
      m.loseReplies = 0;
      m.defragMs = Math.min(m.defragMs, 5000);
    }
    for (const n of names) {
      daemons.get(n)!.owner.resume();
      start(n);
    }
    // An operator lifts what stops the daemons by design, never by itself (README "Operations"):
    // `etcd-defragd resume` (the pause), `resume --integrity-checked` (the halt key, and the fuse
    // restored), and a CORRUPT alarm cleared after checking the members.
    operatorResumes(sim);
    // Up to 90 s for liveness; a schedule ends sooner once nothing is left to happen (no member
    // needs a defragment, no alarm, no turn held, no defragment or `once` under way): without
    // faults nothing can change after that but keep-alives and runs that find nothing to do.
    const end = sim.clock.now() + 90_000;
    while (sim.clock.now() < end && !quiescent(sim)) await sim.run(2000);
    return {
      violations: sim.model.violations.map((v) => `${new Date(v.at).toISOString()} ${v.what}`),
      needing: sim.needing(),
      sim,
      seen: { ...seen, unjoined: sim.live().filter((p) => p.daemon && sim.turnState(p).participant === undefined).length },
      end: describeEnd(sim),
    };
  } finally {
    sim.dispose();
  }
}

/** What happened during a schedule, beyond its steps. */
interface Seen {
  noSpace: boolean;
  noQuorum: boolean;
  /** Steps taken while NOSPACE was raised (before or right after them). */
  duringAlarm: Set<Step['t']>;
  /** Daemons outside the turn at the end. */
  unjoined: number;
  /** Daemons started again while NOSPACE was raised, the end of the faults included. */
  startedDuringAlarm: number;
}

/** The likeliest cause of an unrecovered NOSPACE, from what the schedule did during the alarm (for the survey). */
function noSpaceCause(s: Scenario, seen: Seen): string {
  const d = seen.duringAlarm;
  const cause =
    s.start.t === 'afterAlarm'
      ? 'daemons first started during the alarm'
      : seen.startedDuringAlarm > 0
        ? `a daemon started again during the alarm${s.steps.some((x) => x.t === 'blackout') ? ', after a blackout' : ''}`
        : d.has('reload') || d.has('tls')
          ? 'a reload or TLS change during the alarm'
          : 'none of those';
  return `[${cause}; ${seen.unjoined > 0 ? 'a daemon is outside the turn' : 'every daemon in the turn'}]`;
}

/** Writes from outside the daemons go through raft and the quota like any other. */
function writable(sim: Sim): boolean {
  return sim.model.quorum() && sim.model.alarms.length === 0;
}

/**
 * A halt as an integrity mismatch records it (run.ts): the halt key while writes work; during
 * NOSPACE the fuse is deleted instead (control.ts blowFuse), when it was armed.
 */
function recordHalt(sim: Sim): void {
  // Under CORRUPT no run gets that far, and etcd would refuse both the put and the delete.
  if (!sim.model.quorum() || sim.model.alarms.some((a) => a.alarm === 'CORRUPT')) return;
  const halt = haltKey(sim.base);
  // Written from outside the turn at an arbitrary instant (the daemons write it while holding the
  // turn, or the next one in the NOSPACE order finds the mismatch itself): a Defragment already past
  // its sender's last read of the halt is on its way, and no protocol could stop it (no etcd call is
  // conditional on a key). The model lets such a one arrive within HALT_IN_FLIGHT_MS.
  sim.model.externalHaltAt = sim.clock.now();
  if (writable(sim)) sim.model.adminPut(halt, JSON.stringify({ reason: 'model: HashKV mismatch', at: 'now' }));
  else if (sim.model.getValue(`${sim.base.coordination.prefix}fuse-armed`) !== undefined) sim.model.adminDelete(fuseKey(sim.base));
}

/**
 * The operator at the end of the faults, as `etcd-defragd resume --integrity-checked` does it
 * (control.ts clearHalt): deletes the pause, the halt key and, for a blown fuse, `fuse-armed`; all
 * deletes, so this works under NOSPACE too. The next daemon that can write arms the fuse again.
 */
function operatorResumes(sim: Sim): void {
  const armed = `${sim.base.coordination.prefix}fuse-armed`;
  sim.model.adminDelete(pauseKey(sim.base));
  sim.model.adminDelete(haltKey(sim.base));
  if (sim.model.getValue(armed) !== undefined && sim.model.getValue(fuseKey(sim.base)) === undefined) sim.model.adminDelete(armed);
  sim.model.clearCorrupt();
}

/**
 * MODEL_LOG=debug (or info) prints every simulated process's log on stderr, stamped with simulated
 * seconds since the schedule started: read a replayed failure as a journal.
 */
function traceLog(now: () => number) {
  let start: number | undefined;
  return pino(
    {
      level: process.env.MODEL_LOG,
      base: null,
      messageKey: 'msg',
      timestamp: () => `,"t":${((now() - (start ??= now())) / 1000).toFixed(3)}`,
      formatters: { level: (label) => ({ level: label }) },
    },
    pino.destination(2),
  );
}

/** What the schedules exercised (so a property that passes is seen not to pass vacuously). */
export const coverage = {
  schedules: 0,
  defrags: 0,
  withNoSpace: 0,
  noSpaceRecovered: 0,
  withDefragTimeout: 0,
  lostReplies: 0,
  daemonsKilled: 0,
  withoutQuorum: 0,
  historyFills: 0,
  apiCompactions: 0,
  /** Compactions by the daemons outside NOSPACE: nothing else compacted (compaction.fallback). */
  fallbackCompactions: 0,
  lateApplied: 0,
  lateDefrags: 0,
  halts: 0,
  pauses: 0,
  corrupts: 0,
  reloads: 0,
  tlsChanges: 0,
  daemonRestarts: 0,
  blackouts: 0,
  startedAfterAlarm: 0,
  /** Defragments that started without their sender holding the lease-based turn: the NOSPACE order's (each checked in Sim.checkSender). */
  outsideLeaseTurn: 0,
};

/** The property: no violation during the schedule, and liveness once the faults stopped. */
export async function checkScenario(s: Scenario): Promise<void> {
  const r = await runScenario(s);
  const count = (...t: Step['t'][]) => s.steps.filter((x) => t.includes(x.t)).length;
  coverage.schedules++;
  coverage.defrags += r.sim.model.defragLog.length;
  if (r.seen.noSpace) coverage.withNoSpace++;
  if (s.steps.some((x) => x.t === 'slow' && x.ms > 10_000)) coverage.withDefragTimeout++;
  if (r.seen.noQuorum) coverage.withoutQuorum++;
  coverage.lostReplies += count('lose');
  coverage.daemonsKilled += count('killDaemon');
  coverage.historyFills +=
    s.steps.filter((x) => x.t === 'blackout' && x.history).length + (s.start.t === 'afterAlarm' && s.start.history ? 1 : 0);
  coverage.apiCompactions += count('apiCompact');
  coverage.fallbackCompactions += r.sim.model.clientCompactionsOutsideAlarm;
  for (const [op, n] of Object.entries(r.sim.model.late)) {
    coverage.lateApplied += n;
    if (op === 'defragment') coverage.lateDefrags += n;
  }
  coverage.halts += count('halt');
  coverage.pauses += count('pause');
  coverage.corrupts += count('corrupt');
  coverage.reloads += count('reload') + s.steps.filter((x) => x.t === 'tls' && x.reload).length;
  coverage.tlsChanges += count('tls');
  coverage.daemonRestarts += count('restartDaemon');
  coverage.blackouts += count('blackout');
  if (s.start.t === 'afterAlarm') coverage.startedAfterAlarm++;
  for (const a of r.sim.arrivals) if (!a.sender?.participant || !a.holders.includes(a.sender.participant)) coverage.outsideLeaseTurn++;
  if (r.violations.length > 0) throw new Error(`safety: ${r.violations.slice(0, 3).join('; ')}`);
  if (r.sim.model.alarms.some((a) => a.alarm === 'NOSPACE'))
    throw new Error(`liveness: the NOSPACE alarm is still raised after the faults stopped ${noSpaceCause(s, r.seen)} (${r.end})`);
  if (r.seen.noSpace) coverage.noSpaceRecovered++;
  if (r.sim.model.halted()) throw new Error(`liveness: halted after the operator resumed (${r.end})`);
  if (r.needing.length > 0)
    throw new Error(`liveness: ${r.needing.join(', ')} still need a defragment after the faults stopped (${r.end})`);
}

/** What a schedule ended in (before its processes are disposed of): enough to sort failures by kind. */
function describeEnd(sim: Sim): string {
  const unjoined = sim.live().filter((p) => p.daemon && sim.turnState(p).participant === undefined).length;
  const spares = sim.model.keys(`${sim.base.coordination.prefix}p/`).filter((k) => k.endsWith('/spare')).length;
  const sizes = sim.model.members.map((m) => `${m.name} ${Math.round(m.dbSize / MiB)}/${Math.round(m.dbSizeInUse / MiB)} MiB`).join(', ');
  return `${unjoined} daemons not in the turn, ${spares} spares, ${sizes}, quota ${Math.round(sim.model.opts.quotaBytes / MiB)} MiB`;
}

function quiescent(sim: Sim): boolean {
  const m = sim.model;
  return (
    (m.halted() || sim.needing().length === 0) &&
    !m.alarms.some((a) => a.alarm === 'NOSPACE') &&
    m.defragmenting().length === 0 &&
    sim.holders().length === 0 &&
    sim.procs.every((p) => p.kind !== 'once' || p.settled !== undefined || !p.result)
  );
}
