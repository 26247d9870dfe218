// The random fault schedules of the model tests and how one is played (see schedules.test.ts).
import fc from 'fast-check';
import pino from 'pino';
import { Sim, type Proc } from './sim.ts';

type Step =
  | { t: 'wait'; ms: number }
  | { t: 'freeze' | 'thaw' | 'kill' | 'restart' | 'fragment' | 'nospace' | 'lose'; m: number }
  | { t: 'slow'; m: number; ms: number }
  | { t: 'killDaemon' | 'startDaemon' | 'pauseDaemon' | 'resumeDaemon' | 'once'; m: number }
  | { t: 'leader' | 'disarm' | 'trigger' };

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
  {
    weight: 2,
    arbitrary: fc.record({
      t: fc.constantFrom('killDaemon' as const, 'startDaemon' as const, 'pauseDaemon' as const, 'resumeDaemon' as const, 'once' as const),
      m: member,
    }),
  },
  { weight: 1, arbitrary: fc.record({ t: fc.constantFrom('leader' as const, 'disarm' as const, 'trigger' as const) }) },
);

export const scenario = fc.record({
  members: fc.integer({ min: 3, max: 5 }),
  leader: fc.constantFrom('transfer' as const, 'last' as const),
  seed: fc.integer({ min: 1, max: 2 ** 31 - 1 }),
  steps: fc.array(step, { minLength: 1, maxLength: 14 }),
});

export type Scenario = typeof scenario extends fc.Arbitrary<infer T> ? T : never;

export async function runScenario(s: Scenario): Promise<{ violations: string[]; needing: string[]; joinBlocked: boolean; sim: Sim }> {
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
  try {
    for (const n of names) daemons.set(n, sim.startDaemon(n));
    // Daemons join while writes work (one that is first started during NOSPACE cannot: a known
    // limit, README "What it cannot do").
    await sim.run(3000);
    for (const st of s.steps) {
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
        case 'leader':
          sim.model.changeLeader();
          break;
        case 'disarm':
          sim.model.disarmAll();
          break;
        case 'trigger':
          for (const d of daemons.values()) d.daemon?.trigger('scheduled');
          break;
        case 'killDaemon': {
          const d = daemons.get(at(st.m));
          if (d?.owner.alive) sim.kill(d);
          break;
        }
        case 'startDaemon': {
          const d = daemons.get(at(st.m));
          if (!d?.owner.alive) daemons.set(at(st.m), sim.startDaemon(at(st.m)));
          break;
        }
        case 'pauseDaemon':
          daemons.get(at(st.m))?.owner.pause();
          break;
        case 'resumeDaemon':
          daemons.get(at(st.m))?.owner.resume();
          break;
        case 'once':
          sim.runOnce(at(st.m), { force: true });
          break;
      }
      await sim.run(1);
    }
    // The faults stop: every member answers, every node has a running daemon, replies arrive.
    for (const m of sim.model.members) {
      sim.model.thaw(m.name);
      sim.model.restart(m.name);
      m.loseReplies = 0;
      m.defragMs = Math.min(m.defragMs, 5000);
    }
    for (const n of names) {
      const d = daemons.get(n)!;
      d.owner.resume();
      if (!d.owner.alive) daemons.set(n, sim.startDaemon(n));
    }
    // Up to 90 s for liveness; a schedule ends sooner once nothing is left to happen (no member
    // needs a defragment, no alarm, no turn held, no defragment or `once` under way): without
    // faults nothing can change after that but keep-alives and runs that find nothing to do.
    const end = sim.clock.now() + 90_000;
    while (sim.clock.now() < end && !quiescent(sim)) await sim.run(2000);
    return {
      violations: sim.model.violations.map((v) => `${new Date(v.at).toISOString()} ${v.what}`),
      needing: sim.needing(),
      joinBlocked: joinBlocked(sim),
      sim,
    };
  } finally {
    sim.dispose();
  }
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
  withDefragTimeout: 0,
  lostReplies: 0,
  daemonsKilled: 0,
  knownLimitCannotJoin: 0,
};

/** The property: no violation during the schedule, and liveness once the faults stopped. */
export async function checkScenario(s: Scenario): Promise<void> {
  const r = await runScenario(s);
  coverage.schedules++;
  coverage.defrags += r.sim.model.defragLog.length;
  if (s.steps.some((x) => x.t === 'nospace')) coverage.withNoSpace++;
  if (s.steps.some((x) => x.t === 'slow' && x.ms > 10_000)) coverage.withDefragTimeout++;
  coverage.lostReplies += s.steps.filter((x) => x.t === 'lose').length;
  coverage.daemonsKilled += s.steps.filter((x) => x.t === 'killDaemon').length;
  if (r.violations.length > 0) throw new Error(`safety: ${r.violations.slice(0, 3).join('; ')}`);
  if (r.sim.model.alarms.some((a) => a.alarm === 'NOSPACE')) {
    // The documented known limit (README "Known limits"): a daemon whose lease lapsed while NOSPACE
    // refuses new leases, with no spare participant left to take over, cannot join the turn. Here:
    // a leader defragment under leader: last stalled every keep-alive just as the quota filled, and
    // the daemons of the members that keep the alarm armed lost theirs (the holder's own lease may
    // survive: it alone cannot defragment another node's member). Nobody can recover it until a
    // human defragments; counted, so a rise shows, but not a failure of the property.
    if (r.joinBlocked) {
      coverage.knownLimitCannotJoin++;
      return;
    }
    throw new Error('liveness: the NOSPACE alarm is still raised after the faults stopped');
  }
  if (r.needing.length > 0 && !r.sim.model.halted())
    throw new Error(`liveness: ${r.needing.join(', ')} still need a defragment after the faults stopped`);
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

/** A running daemon is outside the turn and no spare participant is left for it to claim. */
function joinBlocked(sim: Sim): boolean {
  const keys = sim.model.keys(`${sim.base.coordination.prefix}p/`);
  if (keys.some((k) => k.endsWith('/spare'))) return false;
  return sim.live().some((p) => p.daemon && sim.turnState(p).participant === undefined);
}
