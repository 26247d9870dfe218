// One run over the local member, top to bottom: inspect, gate, decide, guard the disk, take the
// cluster-wide turn, hand leadership away, defragment, settle, verify, give the turn back, report.
// `once`, scheduled runs and NOSPACE recovery all run this same sequence.
import { statfs } from 'node:fs/promises';
import type { Config } from './config.ts';
import type { Clock } from './clock.ts';
import { armHaltFuse, blowFuse, describeHalt, describePause, haltFromBlownFuse, haltKey, readStops } from './control.ts';
import { kindOf, type EtcdMember, type EtcdPool } from './etcd.ts';
import { DefragdError, EXIT, errorMessage, type Outcome } from './errors.ts';
import type { RevisionLog } from './history.ts';
import { busyMembers, inspect } from './inspect.ts';
import type { Log } from './log.ts';
import {
  NEAR_QUOTA_MIN_RECLAIM,
  decide,
  decideNoSpace,
  enforcedQuota,
  healthGate,
  quotaMismatch,
  transferTarget,
  type Decision,
} from './policy.ts';
import type { Turn } from './turn.ts';
import { formatBytes, formatDuration, formatPercent } from './units.ts';
import { hexId, memberLabel, voting, type ClusterView, type MemberStatus, type MemberView } from './view.ts';

export interface RunResult {
  outcome: Outcome;
  reason: string;
  check?: string;
  member?: string;
  beforeBytes?: number;
  afterBytes?: number;
  tookMs?: number;
  view?: ClusterView;
  /** After an integrity mismatch: whether the halt key reached etcd. */
  haltRecorded?: boolean;
}

export type HashKVFn = (
  pool: EtcdPool,
  member: MemberView,
  revision: bigint,
  timeoutMs?: number,
) => Promise<{ hash: string; compactRevision: bigint }>;

export interface RunDeps {
  config: Config;
  pool: EtcdPool;
  log: Log;
  clock: Clock;
  /** Absent for --dry-run: nothing is written to etcd. */
  turn?: Turn;
  signal?: AbortSignal;
  freeDisk?: (dir: string) => Promise<number>;
  hashKV?: HashKVFn;
  /** Called with every fresh inspection: the turn learns which member this is, the daemon records metrics and revisions. */
  onInspected?: (view: ClusterView) => void;
  onDefrag?: (r: { member: string; ok: boolean; tookMs: number; reclaimed: number }) => void;
  onDefragStart?: (member: string) => void;
  /** (time, revision) samples: NOSPACE compaction keeps nospace.keepHistory of history by them. */
  revisions?: RevisionLog;
}

export interface RunOptions {
  dryRun?: boolean;
  force?: boolean;
  mode?: 'scheduled' | 'once' | 'nospace';
  runId?: string;
  /** NOSPACE mode: this daemon already defragmented its member since the alarm was raised. */
  defraggedSinceAlarm?: boolean;
  /** NOSPACE mode: when this daemon first saw the alarm (compaction keeps the history before it). */
  alarmSeenAt?: number;
}

async function defaultFreeDisk(dir: string): Promise<number> {
  const s = await statfs(dir);
  return Number(s.bavail) * Number(s.bsize);
}

const defaultHashKV: HashKVFn = (pool, member, revision, timeoutMs) => pool.get(member.endpoint).hashKV(revision, undefined, 1, timeoutMs);

/** once: 0 done or not needed, 75 skipped (not safe now), 1 failed. */
export function exitCodeFor(r: RunResult): number {
  return r.outcome === 'skipped' ? EXIT.skipped : r.outcome === 'failed' ? EXIT.failed : EXIT.ok;
}

function skip(reason: string, extra: Partial<RunResult> = {}): RunResult {
  return { outcome: 'skipped', reason, ...extra };
}

interface RunState {
  deps: RunDeps;
  opts: RunOptions;
  /** A NOSPACE run whose alarm is gone by the time it looks becomes a scheduled one. */
  mode: NonNullable<RunOptions['mode']>;
  started: number;
  decideFor(m: MemberView): Decision;
  /** Inspects the cluster again (and tells deps.onInspected). */
  inspect(): Promise<ClusterView>;
}

/** What the steps with the turn in hand end with: a result, or "hand leadership away failed, go last". */
type TurnStepsEnd = RunResult | 'leader-goes-last';

export async function run(deps: RunDeps, opts: RunOptions = {}): Promise<RunResult> {
  const { config: c, log } = deps;
  const state: RunState = {
    deps,
    opts,
    mode: opts.mode ?? 'once',
    started: deps.clock.now(),
    // A member whose quota could not be read is judged on fragmentation alone (quota 0). During
    // NOSPACE the member's own quota counts when it is lower than the configured one.
    decideFor: (m) =>
      state.mode === 'nospace'
        ? decideNoSpace(m.status!, c, enforcedQuota(m) ?? 0, opts.defraggedSinceAlarm)
        : decide(m.status!, c.policy, m.quotaBytes ?? 0, opts.force || c.policy.force),
    inspect: async () => {
      const v = await inspect(
        deps.pool,
        c.etcd.endpoint,
        { log, signal: deps.signal },
        { readKey: `${c.coordination.prefix}health`, quotaBytes: c.policy.quotaBytes },
      );
      deps.onInspected?.(v);
      return v;
    },
  };
  log.info(
    { event: 'run.start', mode: state.mode, dryRun: Boolean(opts.dryRun) },
    `run started (${state.mode}${opts.dryRun ? ', dry run' : ''})`,
  );
  return finish(deps, state.started, await runSteps(state));
}

/** inspect, halt, gate, decide, guard the disk, then the steps that need the turn. */
async function runSteps(state: RunState): Promise<RunResult> {
  const { deps, opts } = state;
  const c = deps.config;
  let view: ClusterView;
  try {
    view = await state.inspect();
  } catch (err) {
    if (err instanceof DefragdError && !err.permanent)
      return skip(`local member ${c.etcd.endpoint} does not answer: ${err.message}`, { check: 'status' });
    throw err;
  }

  // A recovery run queued while another daemon disarmed: nothing to recover, run as scheduled.
  if (state.mode === 'nospace' && !view.alarms.some((a) => a.alarm === 'NOSPACE')) {
    deps.log.info({ event: 'nospace.gone' }, 'the NOSPACE alarm is gone: running as a scheduled run');
    state.mode = 'scheduled';
  }

  // an integrity mismatch anywhere halts every daemon until an operator has looked; a pause too
  const stop = await readStop(deps);
  if (stop) return skip(stop.reason, { check: stop.check, member: view.local.hex, view });

  // gate (a member that etcd says is defragmenting is waited for once we hold the turn; a member
  // that answers nothing is down, and the run skips)
  view = await gateSettled(deps, view, state.inspect);
  const gateFail = healthGate(view, c);
  if (gateFail) {
    if (gateFail.check !== 'busy' || opts.dryRun) return skip(gateFail.reason, { check: gateFail.check, member: gateFail.member, view });
    const holder = deps.turn ? await deps.turn.holder() : undefined;
    deps.log.info(
      { event: 'turn.wait', reason: gateFail.reason, holder },
      `${gateFail.reason}; waiting for it${holder ? ` (${holder} holds the turn)` : ''}`,
    );
  }
  const local = view.local;
  if (local.isLearner)
    return skip(`local member ${memberLabel(local)} is a learner; learners are never defragmented`, {
      check: 'learner',
      member: local.hex,
      view,
    });
  // Defragmenting the only voting member stops the API server for as long as it lasts. During
  // NOSPACE writes are refused anyway, so recovery goes ahead.
  if (voting(view).length === 1 && state.mode !== 'nospace' && !c.policy.singleMember) {
    return skip(
      `member ${memberLabel(local)} is the cluster's only voting member: ` +
        'defragmenting it stops every read and write (the API server) until it ends; set policy.singleMember: true to allow it',
      { check: 'single-member', member: local.hex, view },
    );
  }
  const mismatch = quotaMismatch(local);
  if (mismatch)
    deps.log.warn({ event: 'quota.mismatch', member: local.hex, configured: local.quotaBytes, etcd: local.etcdQuotaBytes }, mismatch);
  if (local.quotaBytes === undefined && (state.mode === 'nospace' || !(opts.force || c.policy.force))) {
    return skip(local.quotaError ?? `the quota of member ${memberLabel(local)} is unknown`, { check: 'quota', member: local.hex, view });
  }

  const decision = state.decideFor(local);
  deps.log.info(
    {
      event: 'run.decide',
      member: local.hex,
      defrag: decision.defrag,
      dbSize: local.status!.dbSize,
      dbSizeInUse: local.status!.dbSizeInUse,
      fragmentation: Number(decision.fragmentation.toFixed(4)),
    },
    `member ${memberLabel(local)}: ${decision.defrag ? 'defragment' : 'no defragment'}: ${decision.reason}`,
  );
  if (!decision.defrag) return { outcome: 'not-needed', reason: decision.reason, member: local.hex, view };

  const disk = await diskGuard(deps, local.status!);
  if (disk) return skip(disk, { check: 'disk', member: local.hex, view });

  if (opts.dryRun)
    return {
      outcome: 'done',
      reason: `dry run: would defragment member ${memberLabel(local)}: ${decision.reason}`,
      member: local.hex,
      view,
    };
  if (!deps.turn) throw new DefragdError('EDD_USAGE', 'internal: a defragmenting run needs the cluster-wide turn');

  // The leader waits for the others when it cannot (or must not) hand leadership away.
  const isLeader = local.status!.leader === local.id;
  // During NOSPACE the leader always hands leadership away when it can: a leader defragmenting stalls
  // every keep-alive, and leases lost then (the spares with them) cannot be granted again.
  const lastByChoice = c.coordination.leader === 'last' && state.mode !== 'nospace';
  const leaderGoesLast = isLeader && (lastByChoice || !transferTarget(view));
  if (isLeader && c.coordination.leader === 'transfer' && leaderGoesLast) {
    deps.log.warn(
      { event: 'leader.transfer.impossible', member: local.hex },
      'local member is the leader and no healthy voting follower can take leadership; it goes last',
    );
  }
  const first = await withTurn(state, view, leaderGoesLast);
  if (first !== 'leader-goes-last') return first;
  // The transfer failed with the turn in hand: gave it back, now wait as the leader that goes last.
  const second = await withTurn(state, view, true);
  return second === 'leader-goes-last' ? skip('could not move leadership away', { check: 'leader', member: local.hex, view }) : second;
}

/** Takes the turn, runs the steps that need it, and always gives it back. */
async function withTurn(state: RunState, view: ClusterView, leaderGoesLast: boolean): Promise<TurnStepsEnd> {
  const { deps } = state;
  const c = deps.config;
  const turn = deps.turn!;
  const waitUntil = state.started + c.coordination.maxWait;
  const got = await turn.acquire(
    leaderGoesLast ? waitUntil + c.coordination.maxWait : waitUntil,
    deps.signal,
    leaderGoesLast ? () => othersNeedingDefrag(deps, waitUntil, state.decideFor) : undefined,
  );
  if (!got.ok)
    return skip(
      `did not get the cluster-wide turn within coordination.maxWait (${formatDuration(c.coordination.maxWait)}): ${got.reason}`,
      { check: 'turn', member: view.local.hex, view },
    );
  if (got.waitedMs > 0)
    deps.log.info({ event: 'turn.acquired', waitedMs: got.waitedMs }, `took the cluster-wide turn after ${formatDuration(got.waitedMs)}`);
  else deps.log.debug({ event: 'turn.acquired', waitedMs: 0 }, 'took the cluster-wide turn');
  try {
    return await turnSteps(state, view, leaderGoesLast, waitUntil);
  } finally {
    // The halt (if any) is durable in etcd by now, so the turn is always given back.
    await turn.release();
  }
}

/** With the turn in hand: halt again, busy, look again, decide again, leader, compact, fence, defragment. */
async function turnSteps(state: RunState, view: ClusterView, leaderGoesLast: boolean, waitUntil: number): Promise<TurnStepsEnd> {
  const { deps, opts } = state;
  const c = deps.config;
  const turn = deps.turn!;
  // A halt written while we waited for the turn (by the holder before us), or a pause, stops us too.
  const stop = await readStop(deps);
  if (stop) return skip(stop.reason, { check: stop.check, member: view.local.hex, view });

  // A holder that died mid-defrag leaves the defrag running inside etcd: wait until no member is
  // defragmenting, then look again with the turn in hand - the cluster may have changed.
  const busy = await waitNotBusy(deps, view, waitUntil);
  if (busy) return skip(busy, { check: 'busy', member: view.local.hex, view });
  view = await gateSettled(deps, await state.inspect(), state.inspect);
  const again = healthGate(view, c);
  if (again) return skip(again.reason, { check: again.check, member: again.member, view });
  if (view.local.quotaBytes === undefined && (state.mode === 'nospace' || !(opts.force || c.policy.force))) {
    return skip(view.local.quotaError ?? `the quota of member ${memberLabel(view.local)} is unknown`, {
      check: 'quota',
      member: view.local.hex,
      view,
    });
  }
  const fresh = state.decideFor(view.local);
  if (!fresh.defrag) return { outcome: 'not-needed', reason: fresh.reason, member: view.local.hex, view };

  if (view.local.status!.leader === view.local.id && !leaderGoesLast) {
    const moved = await transferLeadership(deps, view);
    if (!moved.ok) {
      deps.log.warn(
        { event: 'leader.transfer.fail', member: view.local.hex, reason: moved.reason },
        `could not move leadership away: ${moved.reason}; the leader goes last`,
      );
      return 'leader-goes-last';
    }
    view = await state.inspect();
    if (view.local.status!.leader === view.local.id)
      return skip('leadership came back to the local member after the transfer', { check: 'leader', member: view.local.hex, view });
  }

  if (state.mode === 'nospace' && c.nospace.compact) {
    // Only the holder compacts: make sure we still are one before dropping history.
    const lost = await turn.fence(async () => undefined);
    if (lost) return skip(`not compacting: ${lost}; trying again at the next run`, { check: 'turn', member: view.local.hex, view });
    const stuck = await compactForNoSpace(deps, view, opts.alarmSeenAt);
    if (stuck) return skip(stuck, { check: 'compact', member: view.local.hex, view });
    // A compaction can take a while: the cluster must still be healthy before the defragment.
    view = await state.inspect();
    const after = healthGate(view, c);
    if (after) return skip(after.reason, { check: after.check, member: after.member, view });
  }

  // The point of no return: a fresh keep-alive, our ticket still there, and a fresh look at every
  // member showing none of them defragmenting, all within a third of the lease TTL.
  let busyAtFence: Awaited<ReturnType<typeof busyNow>>;
  const fenced = await turn.fence(async () => (busyAtFence = await busyNow(deps, view))?.reason);
  if (busyAtFence) return skip(busyAtFence.reason, { check: busyAtFence.check, member: busyAtFence.member, view });
  if (fenced) return skip(`not defragmenting: ${fenced}; trying again at the next run`, { check: 'turn', member: view.local.hex, view });
  return defragmentLocal(deps, view, opts);
}

/** Why no run may go now: an integrity halt (the key, or a blown fuse), or an operator's pause (src/control.ts). */
async function readStop(deps: RunDeps): Promise<{ check: 'halt' | 'pause'; reason: string } | undefined> {
  const hooks = { log: deps.log, signal: deps.signal };
  const client = deps.pool.get(deps.config.etcd.endpoint);
  const { pause, halt, fuse } = await readStops(client, deps.config, hooks);
  const resume = 'after checking the members, resume with: etcd-defragd resume --integrity-checked';
  if (halt) return { check: 'halt', reason: `defragmentation is halted after an integrity mismatch: ${describeHalt(halt)}; ${resume}` };
  // A dry run (no turn) writes nothing: it neither arms the fuse nor turns a blown one into the key.
  const writes = deps.turn !== undefined;
  if (!fuse.armed && writes) await armHaltFuse(deps.pool, deps.config);
  if (fuse.blown) {
    const reason = 'an integrity mismatch was found during a NOSPACE alarm (the halt fuse was deleted)';
    if (writes) {
      await haltFromBlownFuse(client, deps.config, reason, new Date(deps.clock.now()).toISOString()).catch(() => undefined);
    }
    return { check: 'halt', reason: `defragmentation is halted: ${reason}; ${resume}` };
  }
  if (pause) return { check: 'pause', reason: `defragmentation is ${describePause(pause)}; resume with: etcd-defragd resume` };
  return undefined;
}

/** Stops the round on every node: the others find this key (or the blown fuse) and skip until an operator deletes it. */
async function writeHalt(deps: RunDeps, view: ClusterView, reason: string): Promise<boolean> {
  const client = deps.pool.get(view.local.endpoint);
  try {
    await client.put(
      haltKey(deps.config),
      JSON.stringify({ member: view.local.hex, reason, at: new Date(deps.clock.now()).toISOString() }),
    );
    return true;
  } catch (err) {
    deps.log.error(
      { event: 'halt.fail', error: errorMessage(err) },
      `could not write the halt key: ${errorMessage(err)}; deleting the halt fuse instead`,
    );
  }
  try {
    // A delete works under NOSPACE; a fuse never armed cannot be blown.
    if (await blowFuse(client, deps.config)) return true;
    deps.log.error(
      { event: 'halt.fail' },
      'could not record the halt: the halt fuse was never armed (no write has worked since etcd-defragd first ran)',
    );
  } catch (err) {
    deps.log.error(
      { event: 'halt.fail', error: errorMessage(err) },
      `could not record the halt for the other daemons: ${errorMessage(err)}`,
    );
  }
  return false;
}

/**
 * Leader disagreement and raft lag pass within an election or a burst of writes (a leader transfer
 * by another daemon causes both): look again a few times before calling the cluster unhealthy.
 */
async function gateSettled(deps: RunDeps, view: ClusterView, inspectAgain: () => Promise<ClusterView>): Promise<ClusterView> {
  for (let i = 0; i < 3; i++) {
    const fail = healthGate(view, deps.config);
    if (!fail || (fail.check !== 'leader' && fail.check !== 'raft-lag')) break;
    deps.log.debug({ event: 'gate.retry', check: fail.check, reason: fail.reason }, `looking again in 1s: ${fail.reason}`);
    await deps.clock.sleep(1000, deps.signal);
    view = await inspectAgain();
  }
  return view;
}

function finish(deps: RunDeps, started: number, r: RunResult): RunResult {
  const fields = {
    event: r.outcome === 'skipped' ? 'run.skip' : 'run.done',
    outcome: r.outcome,
    reason: r.reason,
    check: r.check,
    member: r.member,
    runMs: deps.clock.now() - started,
  };
  if (r.outcome === 'skipped') deps.log.warn(fields, `run skipped: ${r.reason}`);
  else if (r.outcome === 'failed') deps.log.error(fields, `run failed: ${r.reason}`);
  else deps.log.info(fields, `run finished: ${r.reason}`);
  return r;
}

async function diskGuard(deps: RunDeps, s: MemberStatus): Promise<string | undefined> {
  const dir = deps.config.etcd.dataDir;
  if (!dir) return undefined;
  let free: number;
  try {
    free = await (deps.freeDisk ?? defaultFreeDisk)(dir);
  } catch (err) {
    return (
      `cannot check free disk space of etcd.dataDir ${dir}: ${(err as NodeJS.ErrnoException).code ?? errorMessage(err)} ` +
      `(set etcd.dataDir to the member's data dir, or "" to skip this check)`
    );
  }
  const need = s.dbSizeInUse + deps.config.policy.freeDiskMargin;
  if (free < need) {
    return (
      `not enough free disk in ${dir}: ${formatBytes(free)} free (${free} bytes), ` +
      `defragment needs in-use ${formatBytes(s.dbSizeInUse)} + policy.freeDiskMargin ${formatBytes(deps.config.policy.freeDiskMargin)} ` +
      `= ${formatBytes(need)} (${need} bytes)`
    );
  }
  return undefined;
}

/** Leader-last: keep waiting while another voting member still needs a defragment (until `until`). */
async function othersNeedingDefrag(deps: RunDeps, until: number, decideFor: (m: MemberView) => Decision): Promise<string | undefined> {
  if (deps.clock.now() >= until) return undefined;
  const view = await inspect(
    deps.pool,
    deps.config.etcd.endpoint,
    { log: deps.log, signal: deps.signal },
    { memberAttempts: 1, linearizableRead: false, quotaBytes: deps.config.policy.quotaBytes },
  );
  if (view.local.status!.leader !== view.local.id) return undefined; // no longer the leader: go normally
  const pending = voting(view).filter((m) => !m.isLocal && m.status && decideFor(m).defrag);
  if (pending.length === 0) return undefined;
  return `the local member is the leader and goes last; still to defragment: ${pending.map((m) => m.hex).join(', ')}`;
}

/** Is any voting member defragmenting (or down) right now? One look, short deadline. */
async function busyNow(deps: RunDeps, view: ClusterView): Promise<{ reason: string; check: string; member: string } | undefined> {
  const busy = await busyMembers(deps.pool, view, Math.min(deps.config.etcd.requestTimeout, 5000));
  const b = busy[0];
  if (!b) return undefined;
  return b.down
    ? { reason: `${b.reason}; not defragmenting with a voting member down`, check: 'status', member: b.member.hex }
    : { reason: `${b.reason}; not defragmenting a second member at the same time`, check: 'busy', member: b.member.hex };
}

/** No voting member may be defragmenting when we start: a dead holder's defrag goes on server-side. */
async function waitNotBusy(deps: RunDeps, view: ClusterView, until: number): Promise<string | undefined> {
  const probe = Math.min(deps.config.etcd.requestTimeout, 5000);
  let logged = false;
  for (;;) {
    // A member that is down is not waited for here: the health gate that follows skips the run.
    const busy = (await busyMembers(deps.pool, view, probe)).filter((b) => !b.down);
    if (busy.length === 0) return undefined;
    const reason = busy[0]!.reason;
    if (!logged) {
      deps.log.info({ event: 'turn.wait', reason }, `waiting: ${reason}`);
      for (const b of busy.filter((x) => x.fallback)) {
        deps.log.warn(
          { event: 'busy.fallback', member: b.member.hex, error: b.fallback },
          `member ${memberLabel(b.member)}: /metrics cannot tell whether it defragments (${b.fallback}); ` +
            'taking its silence on Status as a defragment',
        );
      }
      logged = true;
    }
    if (deps.clock.now() >= until || deps.signal?.aborted) return reason;
    await deps.clock.sleep(1000, deps.signal);
  }
}

async function transferLeadership(deps: RunDeps, view: ClusterView): Promise<{ ok: true } | { ok: false; reason: string }> {
  const target = transferTarget(view);
  if (!target) return { ok: false, reason: 'no healthy voting follower' };
  const t0 = deps.clock.now();
  try {
    await deps.pool.get(view.local.endpoint).moveLeader(target.id);
  } catch (err) {
    return { ok: false, reason: errorMessage(err) };
  }
  deps.log.info(
    { event: 'leader.transfer', from: view.local.hex, to: target.hex, tookMs: deps.clock.now() - t0 },
    `moved leadership from ${view.local.hex} to ${memberLabel(target)}`,
  );
  return { ok: true };
}

/**
 * Under NOSPACE, history that fills the quota is freed only by a compaction, and the API server's
 * compactor cannot run during the alarm (its first request is a Txn with a Put). Graded: first keep
 * nospace.keepHistory of history (what the API server keeps); when that leaves the member's in-use
 * size over the disarm mark, keep none (what an operator recovering by hand and etcd's maintenance guide do).
 * Returns why the run must stop here, or undefined to go on to the defragment.
 */
async function compactForNoSpace(deps: RunDeps, view: ClusterView, alarmSeenAt: number | undefined): Promise<string | undefined> {
  const { config: c, log } = deps;
  const local = view.local;
  const client = deps.pool.get(local.endpoint);
  const quota = enforcedQuota(local);
  if (quota === undefined) return local.quotaError ?? `the quota of member ${memberLabel(local)} is unknown`;
  const mark = quota * c.nospace.disarmBelow - NEAR_QUOTA_MIN_RECLAIM;
  const markText = `${formatBytes(mark)} (${formatPercent(c.nospace.disarmBelow)} of the quota ${formatBytes(quota)}, less 1MiB)`;
  const latest = local.status!.revision;
  let inUse = local.status!.dbSizeInUse;
  // Step 1 frees what the API server would have freed had it been able to run; it always runs.
  // Step 2 (no history kept: every watcher relists) only when the member is still over the mark.
  const steps: { name: string; revision: bigint }[] = [];
  const kept = keepHistoryRevision(deps, latest, alarmSeenAt);
  if (kept.revision !== undefined) steps.push({ name: `keep ${kept.what}`, revision: kept.revision });
  else log.info({ event: 'compact.history', member: local.hex }, `NOSPACE compaction: ${kept.what}`);
  steps.push({ name: 'keep no history', revision: latest });
  for (const step of steps) {
    if (step.revision === latest && inUse < mark) {
      log.info(
        { event: 'compact.enough', member: local.hex, inUseBytes: inUse, markBytes: Math.floor(mark) },
        `no compaction to the latest revision needed: member ${local.hex} has ${formatBytes(inUse)} in use, under ${markText}`,
      );
      return undefined;
    }
    const t0 = deps.clock.now();
    // Status' in-use size lags a compaction by a backend commit or two: pages freed by the last
    // commit stay pending until the next write, and NOSPACE refuses writes (seen on 3.4.23 and
    // 3.5.30). Two one-revision compactions just below the target are those commits, so the size
    // read afterwards shows this step (still an upper bound: it never reads too low).
    for (const rev of [step.revision - 2n, step.revision - 1n, step.revision]) {
      if (rev <= 0n) continue;
      if (deps.signal?.aborted) return 'stopping before the compaction finished';
      const stuck = await compactTo(deps, client, rev);
      if (stuck) return stuck;
    }
    const after = (await client.status({ log, signal: deps.signal }, 2)).dbSizeInUse;
    const fields = {
      event: 'compact',
      member: local.hex,
      step: step.name,
      revision: step.revision.toString(),
      inUseBefore: inUse,
      inUseAfter: after,
      markBytes: Math.floor(mark),
      tookMs: deps.clock.now() - t0,
    };
    log.info(
      fields,
      `NOSPACE compaction (${step.name}): history compacted up to revision ${step.revision}; ` +
        `member ${local.hex} in use ${formatBytes(inUse)} -> ${formatBytes(after)}, ${after < mark ? 'under' : 'still over'} ${markText}`,
    );
    inUse = after;
    if (after < mark) return undefined;
  }
  log.warn(
    { event: 'compact.insufficient', member: local.hex, inUseBytes: inUse, markBytes: Math.floor(mark) },
    `NOSPACE: even with no history kept, member ${local.hex} has ${formatBytes(inUse)} in use, over ${markText}: ` +
      'live data fills the quota, which neither compaction nor defragmentation can fix ' +
      '(defragmenting anyway to measure it exactly); raise --quota-backend-bytes or delete data',
  );
  return undefined;
}

/**
 * The revision seen nospace.keepHistory before the alarm (the holders of one alarm find nearly the
 * same one, however long the recovery takes), or the documented fallback.
 */
function keepHistoryRevision(deps: RunDeps, latest: bigint, alarmSeenAt: number | undefined): { revision?: bigint; what: string } {
  const keep = deps.config.nospace.keepHistory;
  const now = deps.clock.now();
  const reference = alarmSeenAt ?? now;
  const old = deps.revisions?.atOrBefore(reference - keep);
  if (old && old.revision < latest)
    return {
      revision: old.revision,
      what: `${formatDuration(keep)} of history (revision ${old.revision}, seen ${formatDuration(reference - old.at)} before the alarm)`,
    };
  if (old)
    return {
      what: `no revision older than the latest (${latest}) within nospace.keepHistory (${formatDuration(keep)}): no history to keep`,
    };
  // Rule: without a sample that old (the daemon started less than keepHistory before the alarm),
  // keep what this daemon has seen, from its oldest sample on; without any older one, keep none.
  const oldest = deps.revisions?.oldest();
  if (oldest && oldest.revision < latest) {
    deps.log.info(
      { event: 'compact.history', revision: oldest.revision.toString(), seenMsAgo: now - oldest.at },
      `no revision sample ${formatDuration(keep)} old (nospace.keepHistory) yet: ` +
        `keeping the history this daemon has seen, since revision ${oldest.revision} (${formatDuration(now - oldest.at)} ago)`,
    );
    return {
      revision: oldest.revision,
      what: `the history this daemon saw (since revision ${oldest.revision}, ${formatDuration(now - oldest.at)} ago)`,
    };
  }
  return {
    what:
      'no revision older than the latest was seen since this daemon started, ' +
      `so no history of nospace.keepHistory (${formatDuration(keep)}) can be kept`,
  };
}

/** One physical compaction with its own deadline; returns why the run must stop, if it must. */
async function compactTo(deps: RunDeps, client: EtcdMember, revision: bigint): Promise<string | undefined> {
  try {
    await client.compact(revision, true, deps.config.nospace.compactTimeout);
    return undefined;
  } catch (err) {
    const kind = kindOf(err);
    if (kind === 'compacted') return undefined; // someone compacted this far already
    if (kind === 'timeout') {
      return (
        `compaction to revision ${revision} did not finish ` +
        `within nospace.compactTimeout (${formatDuration(deps.config.nospace.compactTimeout)}); ` +
        'it goes on inside etcd, and the defragment waits for the next run'
      );
    }
    deps.log.warn(
      { event: 'compact.fail', revision: revision.toString(), error: errorMessage(err) },
      `compaction to revision ${revision} failed: ${errorMessage(err)}; defragmenting without it`,
    );
    return undefined;
  }
}

async function defragmentLocal(deps: RunDeps, view: ClusterView, opts: RunOptions): Promise<RunResult> {
  const { log, config: c } = deps;
  const local = view.local;
  const client = deps.pool.get(local.endpoint);
  const before = local.status!;
  const t0 = deps.clock.now();
  deps.onDefragStart?.(local.hex);
  log.info(
    { event: 'defrag.start', member: local.hex, endpoint: local.endpoint, beforeBytes: before.dbSize, inUseBytes: before.dbSizeInUse },
    `defragmenting member ${memberLabel(local)}: ${formatBytes(before.dbSize)} on disk, ${formatBytes(before.dbSizeInUse)} in use`,
  );
  let failure: string | undefined;
  try {
    const reply = await client.defragment();
    if (reply.memberId && reply.memberId !== local.id) {
      // Behind DNS or a load balancer the endpoint reached another member, outside the turn.
      const reason =
        `defragment sent to ${local.endpoint} was done by member ${hexId(reply.memberId)}, ` +
        `not the local member ${local.hex}: point etcd.endpoint at this node's member only`;
      log.error({ event: 'defrag.fail', code: 'EDD_DEFRAG', member: local.hex, answeredBy: hexId(reply.memberId) }, reason);
      deps.onDefrag?.({ member: local.hex, ok: false, tookMs: deps.clock.now() - t0, reclaimed: 0 });
      return { outcome: 'failed', reason, member: local.hex, check: 'member', tookMs: deps.clock.now() - t0 };
    }
  } catch (err) {
    failure = errorMessage(err);
    // A timed-out defragment goes on inside etcd: never send another, wait for the member instead.
    if (kindOf(err) === 'timeout') {
      log.warn(
        { event: 'defrag.timeout', member: local.hex },
        `defragment of ${local.hex} passed etcd.defragTimeout; not re-sending, waiting for the member to answer again`,
      );
    }
  }
  const settled = await settle(deps, view, Math.max(60_000, c.etcd.defragTimeout));
  const tookMs = deps.clock.now() - t0;
  if (failure || !settled.ok) {
    const why = failure ?? (settled.ok ? '' : settled.reason);
    const reason = `defragment of member ${memberLabel(local)} failed: ${why}`;
    log.error({ event: 'defrag.fail', code: 'EDD_DEFRAG', member: local.hex, tookMs, error: why }, reason);
    deps.onDefrag?.({ member: local.hex, ok: false, tookMs, reclaimed: 0 });
    return { outcome: 'failed', reason, member: local.hex, tookMs };
  }
  const after = settled.status;
  log.info(
    {
      event: 'defrag.done',
      member: local.hex,
      beforeBytes: before.dbSize,
      afterBytes: after.dbSize,
      inUseBytes: after.dbSizeInUse,
      tookMs,
    },
    `defragmented member ${memberLabel(local)}: ${formatBytes(before.dbSize)} -> ${formatBytes(after.dbSize)} in ${formatDuration(tookMs)}`,
  );
  deps.onDefrag?.({ member: local.hex, ok: true, tookMs, reclaimed: Math.max(0, before.dbSize - after.dbSize) });

  if (c.verify.hashKV) {
    const bad = await verifyIntegrity(deps, view, before);
    if (bad) {
      log.error({ event: 'verify.fail', code: 'EDD_INTEGRITY', member: local.hex, ...bad.fields }, bad.reason);
      const haltRecorded = await writeHalt(deps, view, bad.reason);
      return {
        outcome: 'failed',
        reason: bad.reason,
        member: local.hex,
        beforeBytes: before.dbSize,
        afterBytes: after.dbSize,
        tookMs,
        check: 'integrity',
        haltRecorded,
      };
    }
  }
  // The settle pause lets the write load recover before the next member goes down. During NOSPACE
  // etcd refuses writes anyway, and every second of it is a second the API server cannot write.
  if (c.coordination.settle > 0 && opts.mode !== 'nospace') await deps.clock.sleep(c.coordination.settle, deps.signal);
  return {
    outcome: 'done',
    reason:
      `defragmented member ${memberLabel(local)}: ${formatBytes(before.dbSize)} -> ${formatBytes(after.dbSize)} ` +
      `in ${formatDuration(tookMs)}${opts.mode === 'nospace' ? ' (NOSPACE recovery)' : ''}`,
    member: local.hex,
    beforeBytes: before.dbSize,
    afterBytes: after.dbSize,
    tookMs,
  };
}

/**
 * Waits until the member answers Status again and has applied what the leader had committed.
 * A member that does not answer may still be defragmenting (a timed-out defrag goes on inside
 * etcd), so we keep the turn and wait for as long as that lasts; only catching up is bounded.
 */
async function settle(
  deps: RunDeps,
  view: ClusterView,
  catchUpMs: number,
): Promise<{ ok: true; status: MemberStatus } | { ok: false; reason: string }> {
  const timeout = deps.config.etcd.requestTimeout;
  const client = deps.pool.get(view.local.endpoint);
  let answeredAt: number | undefined;
  let lastReport = deps.clock.now();
  let last = 'no answer';
  for (;;) {
    // etcd says when its defragment is over; Status blocks until then anyway.
    const met = await client.serverMetrics(timeout).catch(() => undefined);
    const s = met?.defragInflight ? new Error('still defragmenting (etcd_disk_defrag_inflight is 1)') : await client.probe(timeout);
    if (s instanceof Error) last = s.message;
    else {
      answeredAt ??= deps.clock.now();
      const leader = voting(view).find((m) => m.id === s.leader);
      const target = !leader ? undefined : leader.isLocal ? s : await deps.pool.get(leader.endpoint).probe(timeout);
      if (!target) last = `member sees leader ${hexId(s.leader)}, which is not a known voting member`;
      else if (target instanceof Error) last = `the leader does not answer: ${target.message}`;
      else {
        if (s.raftAppliedIndex >= target.raftIndex) return { ok: true, status: s };
        const again = await client.probe(timeout);
        if (!(again instanceof Error) && again.raftAppliedIndex >= target.raftIndex) return { ok: true, status: again };
        last = `member is ${target.raftIndex - s.raftAppliedIndex} raft entries behind the leader`;
      }
      if (deps.clock.now() - answeredAt > catchUpMs)
        return { ok: false, reason: `member did not catch up within ${formatDuration(catchUpMs)}: ${last}` };
    }
    if (deps.clock.now() - lastReport >= 60_000) {
      deps.log.warn(
        { event: 'defrag.wait', member: view.local.hex, reason: last },
        `still waiting for member ${view.local.hex} after its defragment, holding the turn: ${last}`,
      );
      lastReport = deps.clock.now();
    }
    // Not cut short by a stop signal: the turn is handed over only once the member is back.
    await deps.clock.sleep(500);
  }
}

/** HashKV at a revision every voting member has applied must agree; the revision must not go backwards. */
async function verifyIntegrity(
  deps: RunDeps,
  view: ClusterView,
  before: MemberStatus,
): Promise<{ reason: string; fields: Record<string, unknown> } | undefined> {
  const hashKV = deps.hashKV ?? defaultHashKV;
  const members = voting(view);
  // One deadline for the whole check: a full-keyspace hash of a large db is slow, and retries
  // must not stack up (each HashKV is sent once, with what is left of it).
  const until = deps.clock.now() + Math.max(deps.config.etcd.requestTimeout, deps.config.etcd.defragTimeout);
  const left = () => until - deps.clock.now();
  for (let attempt = 1; attempt <= 3 && left() > 0; attempt++) {
    let hashes: { m: MemberView; hash: string; compactRevision: bigint }[];
    let rev: bigint;
    try {
      const statuses = await Promise.all(members.map((m) => deps.pool.get(m.endpoint).status({ log: deps.log }, 2)));
      const local = statuses[members.findIndex((m) => m.isLocal)];
      if (local && local.revision < before.revision) {
        return {
          reason:
            `integrity: revision of member ${view.local.hex} went backwards after defragment ` +
            `(${before.revision} -> ${local.revision})`,
          fields: { before: before.revision.toString(), after: local.revision.toString() },
        };
      }
      rev = statuses.reduce((min, s) => (s.revision < min ? s.revision : min), statuses[0]!.revision);
      // One member at a time: hashing the keyspace holds a read transaction on that member.
      hashes = [];
      for (const m of members) {
        if (left() <= 0) throw new DefragdError('EDD_UNAVAILABLE', 'the HashKV check ran out of time');
        hashes.push({ m, ...(await hashKV(deps.pool, m, rev, left())) });
      }
    } catch (err) {
      // A compaction racing the check is retried; a member that cannot answer now leaves the
      // defragment unverified rather than failed.
      if (kindOf(err) === 'compacted') continue;
      deps.log.warn({ event: 'verify.skip', error: errorMessage(err) }, `HashKV not compared: ${errorMessage(err)}`);
      return undefined;
    }
    const compacts = new Set(hashes.map((h) => h.compactRevision.toString()));
    if (compacts.size > 1) continue; // a compaction landed between the calls: ask again
    const distinct = new Set(hashes.map((h) => h.hash));
    if (distinct.size === 1) {
      deps.log.info(
        { event: 'verify.ok', revision: rev.toString(), hash: hashes[0]!.hash },
        `HashKV agrees on all ${hashes.length} voting members at revision ${rev}`,
      );
      return undefined;
    }
    const detail = hashes.map((h) => `${h.m.hex}=${h.hash}`).join(', ');
    return {
      reason:
        `integrity: HashKV differs between members at revision ${rev} after defragmenting ${view.local.hex} (${detail}); ` +
        'stopping defragmentation, check the members with etcdctl endpoint hashkv',
      fields: { revision: rev.toString(), hashes: Object.fromEntries(hashes.map((h) => [h.m.hex, h.hash])) },
    };
  }
  deps.log.warn(
    { event: 'verify.skip' },
    left() <= 0 ? 'HashKV not compared: the check ran out of time' : 'HashKV not compared: compactions kept moving during the check',
  );
  return undefined;
}
