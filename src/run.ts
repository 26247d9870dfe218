// One run over the local member, top to bottom: inspect, gate, decide, guard the disk, take the
// cluster-wide turn, hand leadership away, defragment, settle, verify, give the turn back, report.
// `once`, scheduled runs and NOSPACE recovery all run this same sequence.
import { statfs } from 'node:fs/promises';
import type { Config } from './config.ts';
import type { Clock } from './clock.ts';
import { armHaltFuse, readStops, recordHalt, stopReason } from './control.ts';
import { kindOf, type EtcdMember, type EtcdPool } from './etcd.ts';
import type { DefragPrediction } from './duration.ts';
import { DefragdError, EXIT, errorMessage, type Outcome } from './errors.ts';
import type { RevisionLog } from './history.ts';
import { busyMembers, inspect } from './inspect.ts';
import { reportStalled, StallWatch } from './nospace.ts';
import type { Log } from './log.ts';
import type { NodeLock } from './node-lock.ts';
import {
  NEAR_QUOTA_MIN_RECLAIM,
  decide,
  decideNoSpace,
  enforcedQuota,
  healthGate,
  nospaceNext,
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
  /** After an integrity mismatch: whether the halt reached etcd (the halt key or the fuse). */
  haltRecorded?: boolean;
  /** The mode the run ended in: a run that finds NOSPACE raised becomes a recovery run, and one whose alarm is gone a scheduled one. */
  mode?: NonNullable<RunOptions['mode']>;
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
  onDefrag?: (r: { member: string; ok: boolean; tookMs: number; reclaimed: number; inUseBytes: number }) => void;
  onDefragStart?: (member: string) => void;
  /** A fallback compaction went through (compaction.fallback). */
  onCompacted?: () => void;
  /** (time, revision) samples: NOSPACE compaction keeps nospace.keepHistory of history by them. */
  revisions?: RevisionLog;
  /** One process per member on this node in the NOSPACE order (src/node-lock.ts); required for NOSPACE recovery. */
  nodeLock?: NodeLock;
  /** Members over the mark that show no progress during this alarm (the daemon keeps one per alarm). */
  stalls?: StallWatch;
  /**
   * How long a defragment of the local member with this much in use will take, from its past ones
   * (the daemon learns them, src/duration.ts); absent or undefined: no prediction, no duration check.
   */
  predictDefrag?: (inUseBytes: number) => DefragPrediction | undefined;
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
  /** Why the forecast wants a defragment now (the daemon's trend): minReclaimable is then enough. */
  forecast?: string;
  /**
   * Nothing compacted the history since `compactRevision` (compaction.fallback): with the turn in
   * hand, compact it keeping compaction.keepHistory, unless someone moved it meanwhile.
   */
  compactHistory?: { compactRevision: number; reason: string };
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
        : decide(m.status!, c.policy, m.quotaBytes ?? 0, opts.force || c.policy.force, opts.forecast),
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
  return finish(deps, state.started, { ...(await runSteps(state)), mode: state.mode });
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

  // A recovery run queued while another daemon disarmed: nothing to recover, run as scheduled. Any
  // run that finds NOSPACE raised recovers: the lease-based turn cannot be joined then.
  const nospace = view.alarms.some((a) => a.alarm === 'NOSPACE');
  if (state.mode === 'nospace' && !nospace) {
    deps.log.info({ event: 'nospace.gone' }, 'the NOSPACE alarm is gone: running as a scheduled run');
    state.mode = 'scheduled';
  } else if (state.mode !== 'nospace' && nospace) {
    deps.log.info({ event: 'nospace.raised' }, 'a NOSPACE alarm is raised: this run recovers it (NOSPACE order)');
    state.mode = 'nospace';
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
  // A fallback compaction needs the turn even when no defragment is needed.
  const compacting = Boolean(opts.compactHistory) && state.mode !== 'nospace';
  if (!decision.defrag && !compacting) return { outcome: 'not-needed', reason: decision.reason, member: local.hex, view };

  if (decision.defrag) {
    const disk = await diskGuard(deps, local.status!);
    if (disk) return skip(disk, { check: 'disk', member: local.hex, view });
    const long = durationGate(state, view);
    if (long) return long;
  }

  if (opts.dryRun)
    return {
      outcome: 'done',
      reason: `dry run: would defragment member ${memberLabel(local)}: ${decision.reason}`,
      member: local.hex,
      view,
    };
  if (!deps.turn) throw new DefragdError('EDD_USAGE', 'internal: a defragmenting run needs the cluster-wide turn');
  if (state.mode === 'nospace') return nospaceSteps(state);

  // The leader waits for the others when it cannot (or must not) hand leadership away.
  const isLeader = local.status!.leader === local.id;
  const leaderGoesLast = isLeader && (c.coordination.leader === 'last' || !transferTarget(view));
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
  if (opts.compactHistory && state.mode !== 'nospace') await fallbackCompaction(deps, view, opts.compactHistory);
  const fresh = state.decideFor(view.local);
  if (!fresh.defrag) return { outcome: 'not-needed', reason: fresh.reason, member: view.local.hex, view };
  const long = durationGate(state, view);
  if (long) return long;

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

  // The point of no return: a fresh keep-alive, our ticket still there, and a fresh look at every
  // member showing none of them defragmenting, no halt, pause or NOSPACE alarm recorded since, all
  // within a third of the lease TTL.
  // Before the fence, whose timing is the lease's: the connection the Defragment goes on, confirmed.
  const sender = await localConnection(deps, view.local);
  if ('error' in sender) {
    deps.log.error({ event: 'defrag.fail', code: 'EDD_DEFRAG', member: view.local.hex }, sender.error);
    return { outcome: 'failed', reason: sender.error, member: view.local.hex, check: 'member', view };
  }
  let stopAtFence: Awaited<ReturnType<typeof fenceLook>>;
  const fenced = await turn.fence(async () => (stopAtFence = await fenceLook(deps, view))?.reason);
  if (stopAtFence) return skip(stopAtFence.reason, { check: stopAtFence.check, member: stopAtFence.member ?? view.local.hex, view });
  if (fenced) return skip(`not defragmenting: ${fenced}; trying again at the next run`, { check: 'turn', member: view.local.hex, view });
  return defragmentLocal(deps, view, state.mode, sender);
}

/**
 * The fence's fresh look: no voting member defragmenting or down, no halt or pause (one atomic
 * read: a halt written by the holder before us after our first read), no NOSPACE alarm (recovery
 * then follows the NOSPACE order, which does not take this turn).
 */
async function fenceLook(deps: RunDeps, view: ClusterView): Promise<{ reason: string; check: string; member?: string } | undefined> {
  const busy = await busyNow(deps, view);
  if (busy) return busy;
  const client = deps.pool.get(deps.config.etcd.endpoint);
  const hooks = { log: deps.log, signal: deps.signal };
  const [stops, alarms] = await Promise.all([readStops(client, deps.config, hooks), client.alarms(hooks)]);
  const stop = stopReason(stops);
  if (stop) return stop;
  if (alarms.some((a) => a.alarm === 'NOSPACE'))
    return { check: 'nospace', reason: 'a NOSPACE alarm was raised meanwhile: the recovery run takes over (NOSPACE order)' };
  return undefined;
}

/** Why no run may go now: an integrity halt (the key, or a blown fuse), or an operator's pause (src/control.ts). */
async function readStop(deps: RunDeps): Promise<{ check: 'halt' | 'pause'; reason: string } | undefined> {
  const stops = await readStops(deps.pool.get(deps.config.etcd.endpoint), deps.config, { log: deps.log, signal: deps.signal });
  // A dry run (no turn) writes nothing, so it does not arm the fuse.
  if (!stops.fuse.armed && deps.turn !== undefined) await armHaltFuse(deps.pool, deps.config);
  return stopReason(stops);
}

/**
 * Stops the round on every node: the others find this key (or the blown fuse) and skip until an
 * operator resumes. Recorded on whichever voting member answers, retried for up to
 * etcd.defragTimeout, before the turn is given back.
 */
async function writeHalt(deps: RunDeps, view: ClusterView, reason: string): Promise<boolean> {
  const members = [view.local, ...voting(view).filter((m) => !m.isLocal)].map((m) => deps.pool.get(m.endpoint));
  const recorded = await recordHalt(
    members,
    deps.config,
    { member: view.local.hex, reason, at: new Date(deps.clock.now()).toISOString() },
    {
      until: deps.clock.now() + deps.config.etcd.defragTimeout,
      now: () => deps.clock.now(),
      sleep: (ms) => deps.clock.sleep(ms),
      onError: (err) => deps.log.warn({ event: 'halt.retry', error: errorMessage(err) }, `recording the halt: ${errorMessage(err)}`),
    },
  );
  if (!recorded)
    deps.log.error(
      { event: 'halt.fail' },
      'could not record the halt in etcd (no member took the halt key, and the halt fuse was never armed or could not be deleted): ' +
        'this daemon stops defragmenting; the others check HashKV themselves before each NOSPACE defragment',
    );
  return recorded;
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

/**
 * policy.maxDefragDuration: a member serves no reads while it defragments, and a liveness probe
 * that fails for long enough has kubelet restart it mid-defragment (kubeadm's: about 80s; etcd
 * before 3.5.6 could come back with inconsistent revisions). A defragment predicted to last longer
 * is skipped, except in NOSPACE recovery: writes are refused until it is done, so it goes ahead,
 * with a warning.
 */
function durationGate(state: RunState, view: ClusterView): RunResult | undefined {
  const { deps } = state;
  const c = deps.config;
  const local = view.local;
  const max = c.policy.maxDefragDuration;
  const p = max > 0 ? deps.predictDefrag?.(local.status!.dbSizeInUse) : undefined;
  if (!p || p.seconds * 1000 <= max) return undefined;
  const over =
    `the defragment of member ${memberLabel(local)} is predicted to take ${formatDuration(p.seconds * 1000)} (${p.basis}), ` +
    `longer than policy.maxDefragDuration (${formatDuration(max)})`;
  const risk = "a liveness probe (kubeadm's: about 80s) can restart etcd in the middle of it";
  if (state.mode === 'nospace') {
    deps.log.warn(
      { event: 'defrag.duration.over', member: local.hex, predictedSeconds: Math.round(p.seconds), maxSeconds: max / 1000 },
      `${over}: NOSPACE recovery goes ahead anyway (etcd refuses writes until it is done), but ${risk}`,
    );
    return undefined;
  }
  const dataDir = c.etcd.dataDir || "the member's data dir";
  return skip(
    `${over}: ${risk}. Raise the probe's budget (livenessProbe failureThreshold x periodSeconds in ` +
      '/etc/kubernetes/manifests/etcd.yaml) and policy.maxDefragDuration with it, or defragment the member offline ' +
      `in a maintenance window (stop it, then etcdutl defrag --data-dir ${dataDir}; etcdctl defrag --data-dir on 3.4)`,
    { check: 'duration', member: local.hex, view },
  );
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

/**
 * compaction.fallback: nothing compacted the history for compaction.staleAfter. The turn holder
 * compacts to the revision seen compaction.keepHistory ago (or the oldest it saw), unless another
 * daemon or the API server moved the compacted revision since the daemon saw it stale. A failure is
 * logged and the run goes on: the next stale check tries again.
 */
async function fallbackCompaction(deps: RunDeps, view: ClusterView, stale: { compactRevision: number; reason: string }): Promise<void> {
  const { config: c, log } = deps;
  const client = deps.pool.get(view.local.endpoint);
  const page = await client.serverMetrics().catch(() => undefined);
  if (page?.compactRevision !== undefined && page.compactRevision !== stale.compactRevision) {
    log.info(
      { event: 'compact.fallback.moved', from: stale.compactRevision, to: page.compactRevision },
      `the history was compacted meanwhile (revision ${stale.compactRevision} -> ${page.compactRevision}): no fallback compaction`,
    );
    return;
  }
  const keep = c.compaction.keepHistory;
  const now = deps.clock.now();
  const target = deps.revisions?.atOrBefore(now - keep) ?? deps.revisions?.oldest();
  if (!target || target.revision <= BigInt(stale.compactRevision)) {
    log.info(
      { event: 'compact.fallback.none', compactRevision: stale.compactRevision },
      `${stale.reason}, but no revision older than compaction.keepHistory (${formatDuration(keep)}) is above the compacted one: nothing to compact yet`,
    );
    return;
  }
  const t0 = deps.clock.now();
  try {
    await client.compact(target.revision, true, c.nospace.compactTimeout);
  } catch (err) {
    if (kindOf(err) === 'compacted') return; // someone compacted this far already
    log.warn(
      { event: 'compact.fallback.fail', revision: target.revision.toString(), error: errorMessage(err) },
      `fallback compaction to revision ${target.revision} failed: ${errorMessage(err)}`,
    );
    return;
  }
  deps.onCompacted?.();
  log.warn(
    {
      event: 'compact.fallback',
      member: view.local.hex,
      revision: target.revision.toString(),
      keptMs: now - target.at,
      tookMs: deps.clock.now() - t0,
    },
    `${stale.reason}: compacted it up to revision ${target.revision}, keeping ${formatDuration(now - target.at)} of history ` +
      '(compaction.fallback; a watcher behind that revision must relist)',
  );
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

async function defragmentLocal(
  deps: RunDeps,
  view: ClusterView,
  mode: RunState['mode'],
  /** The client whose connection was confirmed to reach the local member (localConnection). */
  sender: { client: EtcdMember },
): Promise<RunResult> {
  const { log, config: c } = deps;
  const local = view.local;
  const before = local.status!;
  const client = sender.client;
  const t0 = deps.clock.now();
  deps.onDefragStart?.(local.hex);
  log.info(
    { event: 'defrag.start', member: local.hex, endpoint: local.endpoint, beforeBytes: before.dbSize, inUseBytes: before.dbSizeInUse },
    `defragmenting member ${memberLabel(local)}: ${formatBytes(before.dbSize)} on disk, ${formatBytes(before.dbSizeInUse)} in use`,
  );
  let failure: string | undefined;
  try {
    await client.defragment();
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
    deps.onDefrag?.({ member: local.hex, ok: false, tookMs, reclaimed: 0, inUseBytes: before.dbSizeInUse });
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
  deps.onDefrag?.({
    member: local.hex,
    ok: true,
    tookMs,
    reclaimed: Math.max(0, before.dbSize - after.dbSize),
    inUseBytes: before.dbSizeInUse,
  });

  if (c.verify.hashKV) {
    const bad = await verifyIntegrity(deps, view, `after defragmenting ${view.local.hex}`, before);
    if (bad) return integrityFailure(deps, view, bad, { beforeBytes: before.dbSize, afterBytes: after.dbSize, tookMs });
  }
  // The settle pause lets the write load recover before the next member goes down. During NOSPACE
  // etcd refuses writes anyway, and every second of it is a second the API server cannot write.
  if (c.coordination.settle > 0 && mode !== 'nospace') await deps.clock.sleep(c.coordination.settle, deps.signal);
  return {
    outcome: 'done',
    reason:
      `defragmented member ${memberLabel(local)}: ${formatBytes(before.dbSize)} -> ${formatBytes(after.dbSize)} ` +
      `in ${formatDuration(tookMs)}${mode === 'nospace' ? ' (NOSPACE recovery)' : ''}`,
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
  when: string,
  before?: MemberStatus,
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
      if (before && local && local.revision < before.revision) {
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
        `integrity: HashKV differs between members at revision ${rev} ${when} (${detail}); ` +
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

/**
 * The Defragment goes to the local member only, and its reply cannot say which member did it. So
 * right before sending, on the very client (connection) that sends it, Status must name the local
 * member, and the URL must be one the member advertises (not a load balancer or a shared DNS
 * name). etcd.endpoint is used when it is advertised; otherwise (kubeadm advertises the node's IP
 * and listens on 127.0.0.1 too) the member's advertised client URLs are tried in order.
 */
async function localConnection(deps: RunDeps, local: MemberView): Promise<{ client: EtcdMember } | { error: string }> {
  const advertised = local.clientURLs ?? [];
  const urls = advertised.includes(local.endpoint) ? [local.endpoint] : advertised;
  const seen: string[] = [];
  for (const url of urls) {
    const client = deps.pool.get(url);
    const s = await client.probe(Math.min(deps.config.etcd.requestTimeout, 5000));
    if (!(s instanceof Error) && s.memberId === local.id) return { client };
    seen.push(`${url}: ${s instanceof Error ? s.message : `answers as member ${hexId(s.memberId)}`}`);
  }
  return {
    error:
      `not defragmenting: no advertised client URL of the local member ${memberLabel(local)} answers as that member ` +
      `(${seen.join('; ') || 'it advertises none'}); the Defragment is only sent where Status confirms the member on the same connection`,
  };
}

/** How far apart the two looks of the NOSPACE order are (see nospaceSteps). */
export const NOSPACE_CONFIRM_MS = 1000;

/** One look for the NOSPACE order: the view when the local member goes now, else why it waits or why the run ends. */
type OrderLook =
  | { view: ClusterView; start: number; end: number; sender: { client: EtcdMember } }
  | { wait: string; check: string; first?: MemberView }
  | { result: RunResult };

/**
 * NOSPACE: etcd grants no lease and accepts no put, so the lease-based turn cannot be joined by a
 * daemon that was not in it before the alarm. Recovery follows an order that writes nothing
 * instead: the voting members still at or above the disarm mark go one at a time, lowest member ID
 * first, each defragmented by its own daemon. A daemon goes when two looks at least
 * NOSPACE_CONFIRM_MS apart, the second right before its Defragment, both show: its member first in
 * that order, every voting member answering and healthy, none defragmenting
 * (etcd_disk_defrag_inflight), no participant holding the lease-based turn, no halt or pause, and
 * the alarm still raised. A member leaves the order only by shrinking under the mark, which takes a
 * defragment, and a Defragment starts within the confirmation time of being sent, so a second
 * daemon's look sees the first member defragmenting or done. Before it defragments, the daemon
 * compacts (nospace.compact) and compares HashKV across the members: a mismatch left by the member
 * before it stops the order even if that daemon could not record its halt.
 */
async function nospaceSteps(state: RunState): Promise<RunResult> {
  const lock = state.deps.nodeLock;
  if (!lock) throw new DefragdError('EDD_USAGE', 'internal: NOSPACE recovery needs the node lock');
  const locked: { release?: () => Promise<void> } = {};
  try {
    return await nospaceOrder(state, lock, locked);
  } finally {
    await locked.release?.();
  }
}

async function nospaceOrder(state: RunState, lock: NodeLock, locked: { release?: () => Promise<void> }): Promise<RunResult> {
  const { deps } = state;
  const c = deps.config;
  const until = state.started + c.coordination.maxWait;
  let lastWait = '';
  let first: { end: number } | undefined;
  const stalls = deps.stalls ?? new StallWatch(c);
  for (;;) {
    if (deps.signal?.aborted) return skip('stopping while waiting in the NOSPACE order', { check: 'turn' });
    let look = await lookInOrder(state);
    deps.log.debug(
      { event: 'turn.look', look: 'view' in look ? 'go' : 'wait' in look ? look.wait : look.result.reason },
      'NOSPACE order: look',
    );
    if ('wait' in look && look.first) reportStalled(deps.log, stalls.stalled([look.first], deps.clock.now()));
    // Two processes of one member (the daemon and an operator's `once`) look alike to etcd: they agree on this node.
    if ('view' in look && !locked.release) {
      locked.release = await lock(look.view.local.hex);
      if (!locked.release)
        look = { wait: `another etcd-defragd process on this node is recovering member ${look.view.local.hex}`, check: 'turn' };
    }
    if ('result' in look) return look.result;
    if ('wait' in look) {
      first = undefined;
      if (look.wait !== lastWait) {
        deps.log.info({ event: 'turn.wait', reason: look.wait, check: look.check }, `NOSPACE order: waiting: ${look.wait}`);
        lastWait = look.wait;
      }
      if (deps.clock.now() >= until || deps.signal?.aborted)
        return skip(
          deps.signal?.aborted
            ? `stopping while waiting in the NOSPACE order: ${look.wait}`
            : `not the local member's turn in the NOSPACE order within coordination.maxWait (${formatDuration(c.coordination.maxWait)}): ${look.wait}`,
          { check: look.check },
        );
      await deps.clock.sleep(NOSPACE_CONFIRM_MS, deps.signal);
      continue;
    }
    const view = look.view;
    const local = view.local;
    // A leader that defragments stalls every keep-alive in the cluster: hand leadership away first,
    // and when that is not possible, do not defragment as leader (the next check tries again).
    if (local.status!.leader === local.id && voting(view).length > 1) {
      const moved = await transferLeadership(deps, view);
      if (!moved.ok)
        return skip(
          `NOSPACE: the local member ${memberLabel(local)} is the leader and cannot hand leadership away (${moved.reason}); ` +
            'not defragmenting as leader, trying again at the next alarm check',
          { check: 'leader', member: local.hex, view },
        );
      first = undefined;
      continue;
    }
    if (!first) {
      // First look: our member's turn. Compact and compare HashKV now, then look again.
      if (c.nospace.compact) {
        const stuck = await compactForNoSpace(deps, view, state.opts.alarmSeenAt);
        if (stuck) return skip(stuck, { check: 'compact', member: local.hex, view });
      }
      if (c.verify.hashKV) {
        const bad = await verifyIntegrity(deps, view, `before defragmenting ${local.hex} (left by an earlier defragment?)`);
        if (bad) return integrityFailure(deps, view, bad);
      }
      first = { end: look.end };
      const left = first.end + NOSPACE_CONFIRM_MS - deps.clock.now();
      if (left > 0) await deps.clock.sleep(left, deps.signal);
      continue;
    }
    // Second look, at least NOSPACE_CONFIRM_MS after the first ended, and the Defragment right after it.
    if (look.start - first.end < NOSPACE_CONFIRM_MS || deps.clock.now() - look.end > NOSPACE_CONFIRM_MS / 2) {
      // Too close to the first look, or too long ago for the Defragment: this one counts as the first.
      deps.log.debug({ event: 'turn.confirm', sinceFirstMs: look.start - first.end }, 'NOSPACE order: looking again to confirm');
      first = { end: look.end };
      await deps.clock.sleep(NOSPACE_CONFIRM_MS, deps.signal);
      continue;
    }
    deps.log.info(
      { event: 'turn.acquired', order: 'nospace', waitedMs: deps.clock.now() - state.started },
      `NOSPACE order: member ${memberLabel(local)} goes now (first of the members above the disarm mark)`,
    );
    return defragmentLocal(deps, view, 'nospace', look.sender);
  }
}

async function lookInOrder(state: RunState): Promise<OrderLook> {
  const { deps } = state;
  const c = deps.config;
  const start = deps.clock.now();
  let view: ClusterView;
  try {
    view = await state.inspect();
  } catch (err) {
    return { wait: `the local member does not answer: ${errorMessage(err)}`, check: 'status' };
  }
  const local = view.local;
  if (!view.alarms.some((a) => a.alarm === 'NOSPACE'))
    return { result: { outcome: 'not-needed', reason: 'the NOSPACE alarm was disarmed meanwhile', member: local.hex, view } };
  // Not readStop: arming the fuse is a write, which NOSPACE refuses at every look.
  const stop = stopReason(await readStops(deps.pool.get(c.etcd.endpoint), c, { log: deps.log, signal: deps.signal }));
  if (stop) return { result: skip(stop.reason, { check: stop.check, member: local.hex, view }) };
  const gate = healthGate(view, c);
  if (gate?.check === 'alarm') return { result: skip(gate.reason, { check: gate.check, member: gate.member, view }) };
  if (gate) return { wait: gate.reason, check: gate.check };
  const unknown = voting(view).find((m) => enforcedQuota(m) === undefined);
  if (unknown) return { wait: unknown.quotaError ?? `the quota of member ${memberLabel(unknown)} is unknown`, check: 'quota' };
  const next = nospaceNext(view, c);
  if (!next)
    return { result: { outcome: 'not-needed', reason: 'no voting member is above the disarm mark any more', member: local.hex, view } };
  const decision = state.decideFor(local);
  if (next.id !== local.id) {
    if (!decision.defrag) return { result: { outcome: 'not-needed', reason: decision.reason, member: local.hex, view } };
    return {
      wait:
        `member ${memberLabel(next)} goes first (lowest member ID above ${formatPercent(c.nospace.disarmBelow)} of its quota; ` +
        "its etcd-defragd defragments it; if it already did, its live data fills the quota: see that node's log)",
      check: 'turn',
      first: next,
    };
  }
  if (!decision.defrag) return { result: { outcome: 'not-needed', reason: decision.reason, member: local.hex, view } };
  let holder: string | undefined;
  try {
    holder = await deps.turn!.heldByOther();
  } catch (err) {
    return { wait: `cannot read the cluster-wide turn: ${errorMessage(err)}`, check: 'turn' };
  }
  if (holder) return { wait: `the cluster-wide turn is held by ${holder} (taken before the alarm)`, check: 'turn' };
  // Part of the look, so that the Defragment follows the second look at once.
  const sender = await localConnection(deps, local);
  if ('error' in sender) return { result: { outcome: 'failed', reason: sender.error, member: local.hex, check: 'member', view } };
  return { view, start, end: deps.clock.now(), sender };
}

/** An integrity mismatch: logged, counted, recorded for every daemon; the run fails. */
async function integrityFailure(
  deps: RunDeps,
  view: ClusterView,
  bad: { reason: string; fields: Record<string, unknown> },
  extra: Partial<RunResult> = {},
): Promise<RunResult> {
  deps.log.error({ event: 'verify.fail', code: 'EDD_INTEGRITY', member: view.local.hex, ...bad.fields }, bad.reason);
  const haltRecorded = await writeHalt(deps, view, bad.reason);
  return { outcome: 'failed', reason: bad.reason, member: view.local.hex, check: 'integrity', haltRecorded, ...extra };
}
