// One pass over the local member, top to bottom: inspect, gate, decide, guard the disk, take the
// cluster-wide turn, hand leadership away, defragment, settle, verify, give the turn back, report.
// `once`, scheduled runs and NOSPACE recovery all run this same sequence.
import { statfs } from 'node:fs/promises';
import type { Config } from './config.ts';
import { describeHalt, describePause, haltKey, readControl } from './control.ts';
import { classify, type ClientPool, type MemberStatus } from './etcd.ts';
import { DefragdError, EXIT, errorMessage } from './errors.ts';
import { busyMembers, inspect } from './inspect.ts';
import type { Log } from './log.ts';
import { decide, decideNoSpace, healthGate, hexId, memberLabel, transferTarget, voting, type ClusterView, type Decision, type MemberView } from './policy.ts';
import { describeParticipant, type Turn } from './turn.ts';
import { formatBytes, formatDuration } from './units.ts';

export type Outcome = 'done' | 'not-needed' | 'skipped' | 'failed';

export interface PassResult {
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

export interface Clock {
  now(): number;
  sleep(ms: number, signal?: AbortSignal): Promise<void>;
}

export const realClock: Clock = {
  now: () => Date.now(),
  sleep: (ms, signal) => new Promise((resolve) => {
    if (signal?.aborted) return resolve();
    const t = setTimeout(done, ms);
    function done() {
      clearTimeout(t);
      signal?.removeEventListener('abort', done);
      resolve();
    }
    signal?.addEventListener('abort', done, { once: true });
  }),
};

export type HashKVFn = (pool: ClientPool, member: MemberView, revision: bigint) => Promise<{ hash: string; compactRevision: bigint }>;

export interface PassDeps {
  config: Config;
  pool: ClientPool;
  log: Log;
  clock: Clock;
  /** Absent for --dry-run: nothing is written to etcd. */
  turn?: Turn;
  signal?: AbortSignal;
  freeDisk?: (dir: string) => Promise<number>;
  hashKV?: HashKVFn;
  /** Called with every fresh inspection (the daemon keeps its endpoint list from it). */
  seen?: (view: ClusterView) => void;
  onDefrag?: (r: { member: string; ok: boolean; tookMs: number; reclaimed: number }) => void;
  onDefragStart?: (member: string) => void;
}

export interface PassOptions {
  dryRun?: boolean;
  force?: boolean;
  mode?: 'scheduled' | 'once' | 'nospace';
  runId?: string;
  /** NOSPACE mode: this daemon already defragmented its member since the alarm was raised. */
  defraggedThisAlarm?: boolean;
}

async function defaultFreeDisk(dir: string): Promise<number> {
  const s = await statfs(dir);
  return Number(s.bavail) * Number(s.bsize);
}

const defaultHashKV: HashKVFn = (pool, member, revision) => pool.get(member.endpoint).hashKV(revision);

/** once: 0 done or not needed, 75 skipped (not safe now), 1 failed. */
export function exitCodeFor(r: PassResult): number {
  return r.outcome === 'skipped' ? EXIT.skipped : r.outcome === 'failed' ? EXIT.failed : EXIT.ok;
}

function skip(reason: string, extra: Partial<PassResult> = {}): PassResult {
  return { outcome: 'skipped', reason, ...extra };
}

export async function runPass(deps: PassDeps, opts: PassOptions = {}): Promise<PassResult> {
  const { config: c, log } = deps;
  const mode = opts.mode ?? 'once';
  const started = deps.clock.now();
  const hooks = { log, signal: deps.signal };
  const decideFor = (s: Pick<MemberStatus, 'dbSize' | 'dbSizeInUse'>): Decision =>
    mode === 'nospace' ? decideNoSpace(s, c, opts.defraggedThisAlarm) : decide(s, c.policy, opts.force || c.policy.force);

  log.info({ event: 'run.start', mode, dryRun: Boolean(opts.dryRun) }, `run started (${mode}${opts.dryRun ? ', dry run' : ''})`);

  // inspect
  const look = async () => {
    const v = await inspect(deps.pool, c.etcd.endpoint, hooks, { readKey: `${c.coordination.prefix}health` });
    deps.seen?.(v);
    return v;
  };
  let view: ClusterView;
  try {
    view = await look();
  } catch (err) {
    if (err instanceof DefragdError && !err.permanent) return finish(deps, started, skip(`local member ${c.etcd.endpoint} does not answer: ${err.message}`, { check: 'status' }));
    throw err;
  }

  // an integrity mismatch anywhere halts every daemon until an operator has looked; a pause too
  const stop = await readStop(deps);
  if (stop) return finish(deps, started, skip(stop.reason, { check: stop.check, member: view.local.hex, view }));

  // gate (a member that does not answer while another daemon holds the turn is probably being
  // defragmented: wait for the turn instead of skipping, and check again once we hold it)
  view = await gateSettled(deps, view, look);
  const gateFail = healthGate(view, c);
  if (gateFail) {
    const holder = gateFail.check === 'status' && deps.turn && !opts.dryRun ? await turnHolder(deps.turn) : undefined;
    if (!holder) return finish(deps, started, skip(gateFail.reason, { check: gateFail.check, member: gateFail.member, view }));
    log.info({ event: 'turn.wait', reason: gateFail.reason, holder }, `${gateFail.reason}; ${holder} holds the turn, waiting for it`);
  }
  const local = view.local;
  if (local.isLearner) return finish(deps, started, skip(`local member ${memberLabel(local)} is a learner; learners are never defragmented`, { check: 'learner', member: local.hex, view }));

  // decide
  const decision = decideFor(local.status!);
  log.info({ event: 'run.decide', member: local.hex, defrag: decision.defrag, dbSize: local.status!.dbSize, dbSizeInUse: local.status!.dbSizeInUse, fragmentation: Number(decision.fragmentation.toFixed(4)) },
    `member ${memberLabel(local)}: ${decision.defrag ? 'defragment' : 'no defragment'}: ${decision.reason}`);
  if (!decision.defrag) return finish(deps, started, { outcome: 'not-needed', reason: decision.reason, member: local.hex, view });

  // guard the disk
  const disk = await diskGuard(deps, local.status!);
  if (disk) return finish(deps, started, skip(disk, { check: 'disk', member: local.hex, view }));

  if (opts.dryRun) {
    return finish(deps, started, { outcome: 'done', reason: `dry run: would defragment member ${memberLabel(local)}: ${decision.reason}`, member: local.hex, view });
  }
  if (!deps.turn) throw new DefragdError('EDD_USAGE', 'internal: a defragmenting pass needs the cluster-wide turn');

  // take the turn (the leader waits for the others when it cannot hand leadership away)
  const waitUntil = started + c.coordination.maxWait;
  const isLeader = () => view.local.status!.leader === view.local.id;
  let leaderGoesLast = isLeader() && (c.coordination.leader === 'last' || !transferTarget(view));
  if (isLeader() && c.coordination.leader === 'transfer' && leaderGoesLast) {
    log.warn({ event: 'leader.transfer.impossible', member: local.hex }, 'local member is the leader and no healthy voting follower can take leadership; it goes last');
  }
  let keepTurn = false;
  for (;;) {
    const got = await deps.turn.acquire(leaderGoesLast ? waitUntil + c.coordination.maxWait : waitUntil, deps.signal,
      leaderGoesLast ? () => othersNeedingDefrag(deps, waitUntil, decideFor) : undefined);
    if (!got.ok) return finish(deps, started, skip(`did not get the cluster-wide turn within coordination.maxWait (${formatDuration(c.coordination.maxWait)}): ${got.reason}`, { check: 'turn', member: local.hex, view }));
    if (got.waitedMs > 0) log.info({ event: 'turn.acquired', waitedMs: got.waitedMs }, `took the cluster-wide turn after ${formatDuration(got.waitedMs)}`);
    else log.debug({ event: 'turn.acquired', waitedMs: 0 }, 'took the cluster-wide turn');
    try {
      // A holder that died mid-defrag leaves the defrag running inside etcd: wait until every
      // member answers, then look again with the turn in hand - the cluster may have changed.
      const busy = await waitNotBusy(deps, view, waitUntil);
      if (busy) return finish(deps, started, skip(busy, { check: 'busy', member: view.local.hex, view }));
      view = await gateSettled(deps, await look(), look);
      const again = healthGate(view, c);
      if (again) return finish(deps, started, skip(again.reason, { check: again.check, member: again.member, view }));
      const fresh = decideFor(view.local.status!);
      if (!fresh.defrag) return finish(deps, started, { outcome: 'not-needed', reason: fresh.reason, member: view.local.hex, view });
      if (isLeader() && !leaderGoesLast) {
        const moved = await transferLeadership(deps, view);
        if (!moved.ok) {
          log.warn({ event: 'leader.transfer.fail', member: view.local.hex, reason: moved.reason }, `could not move leadership away: ${moved.reason}; the leader goes last`);
          leaderGoesLast = true;
          await deps.turn.release();
          continue;
        }
        view = await look();
        if (isLeader()) return finish(deps, started, skip('leadership came back to the local member after the transfer', { check: 'leader', member: view.local.hex, view }));
      }
      if (mode === 'nospace' && c.nospace.compact) await compactForNoSpace(deps, view);
      // Last check before the point of no return: our lease may have lapsed while we looked.
      if (!(await deps.turn.confirm())) return finish(deps, started, skip(`lost the cluster-wide turn before defragmenting (${deps.turn.lastTrouble || 'our ticket is gone'}); trying again at the next run`, { check: 'turn', member: view.local.hex, view }));
      const result = await defragmentLocal(deps, view, opts);
      if (result.check === 'integrity' && !result.haltRecorded) {
        // etcd refuses the halt key (NOSPACE): keep the turn instead, so no other member goes next.
        keepTurn = true;
        log.error({ event: 'halt.hold', member: view.local.hex }, 'holding the cluster-wide turn so no other member is defragmented after the integrity mismatch; restart etcd-defragd on this node once the members are checked');
      }
      return finish(deps, started, result);
    } finally {
      if (!keepTurn) await deps.turn.release();
    }
  }
}

export { haltKey };

/** Why no run may go now: an integrity halt, or an operator's pause (src/control.ts). */
async function readStop(deps: PassDeps): Promise<{ check: 'halt' | 'pause'; reason: string } | undefined> {
  const { pause, halt } = await readControl(deps.pool.get(deps.config.etcd.endpoint), deps.config, { log: deps.log, signal: deps.signal });
  if (halt) return { check: 'halt', reason: `defragmentation is halted after an integrity mismatch: ${describeHalt(halt)}; after checking the members, resume with: etcd-defragd resume --integrity-checked` };
  if (pause) return { check: 'pause', reason: `defragmentation is ${describePause(pause)}; resume with: etcd-defragd resume` };
  return undefined;
}

/** Stops the round on every node: the others find this key and skip until an operator deletes it. */
async function writeHalt(deps: PassDeps, view: ClusterView, reason: string): Promise<boolean> {
  try {
    await deps.pool.get(view.local.endpoint).put(haltKey(deps.config), JSON.stringify({ member: view.local.hex, reason, at: new Date(deps.clock.now()).toISOString() }));
    return true;
  } catch (err) {
    deps.log.error({ event: 'halt.fail', error: errorMessage(err) }, `could not record the halt for the other daemons: ${errorMessage(err)}`);
    return false;
  }
}

/**
 * Leader disagreement and raft lag pass within an election or a burst of writes (a leader transfer
 * by another daemon causes both): look again a few times before calling the cluster unhealthy.
 */
async function gateSettled(deps: PassDeps, view: ClusterView, look: () => Promise<ClusterView>): Promise<ClusterView> {
  for (let i = 0; i < 3; i++) {
    const fail = healthGate(view, deps.config);
    if (!fail || (fail.check !== 'leader' && fail.check !== 'raft-lag')) break;
    deps.log.debug({ event: 'gate.retry', check: fail.check, reason: fail.reason }, `looking again in 1s: ${fail.reason}`);
    await deps.clock.sleep(1000, deps.signal);
    view = await look();
  }
  return view;
}

async function turnHolder(turn: Turn): Promise<string | undefined> {
  try {
    const v = await turn.view();
    const h = [...v.participants.values()].find((p) => p.holding && p.lease !== turn.leaseId);
    return h ? describeParticipant(h) : undefined;
  } catch {
    return undefined;
  }
}

function finish(deps: PassDeps, started: number, r: PassResult): PassResult {
  const fields = { event: r.outcome === 'skipped' ? 'run.skip' : 'run.done', outcome: r.outcome, reason: r.reason, check: r.check, member: r.member, runMs: deps.clock.now() - started };
  if (r.outcome === 'skipped') deps.log.warn(fields, `run skipped: ${r.reason}`);
  else if (r.outcome === 'failed') deps.log.error(fields, `run failed: ${r.reason}`);
  else deps.log.info(fields, `run finished: ${r.reason}`);
  return r;
}

async function diskGuard(deps: PassDeps, s: MemberStatus): Promise<string | undefined> {
  const dir = deps.config.etcd.dataDir;
  if (!dir) return undefined;
  let free: number;
  try {
    free = await (deps.freeDisk ?? defaultFreeDisk)(dir);
  } catch (err) {
    return `cannot check free disk space of etcd.dataDir ${dir}: ${(err as NodeJS.ErrnoException).code ?? errorMessage(err)} (set etcd.dataDir to the member's data dir, or "" to skip this check)`;
  }
  const need = s.dbSizeInUse + deps.config.policy.freeDiskMargin;
  if (free < need) {
    return `not enough free disk in ${dir}: ${formatBytes(free)} free (${free} bytes), defragment needs in-use ${formatBytes(s.dbSizeInUse)} + policy.freeDiskMargin ${formatBytes(deps.config.policy.freeDiskMargin)} = ${formatBytes(need)} (${need} bytes)`;
  }
  return undefined;
}

/** Leader-last: keep waiting while another voting member still needs a defragment (until `until`). */
async function othersNeedingDefrag(deps: PassDeps, until: number, decideFor: (s: MemberStatus) => Decision): Promise<string | undefined> {
  if (deps.clock.now() >= until) return undefined;
  const view = await inspect(deps.pool, deps.config.etcd.endpoint, { log: deps.log, signal: deps.signal }, { memberAttempts: 1, linearizableRead: false });
  if (view.local.status!.leader !== view.local.id) return undefined; // no longer the leader: go normally
  const pending = voting(view).filter((m) => !m.isLocal && m.status && decideFor(m.status).defrag);
  if (pending.length === 0) return undefined;
  return `the local member is the leader and goes last; still to defragment: ${pending.map((m) => m.hex).join(', ')}`;
}

/** No voting member may be defragmenting when we start: a dead holder's defrag goes on server-side. */
async function waitNotBusy(deps: PassDeps, view: ClusterView, until: number): Promise<string | undefined> {
  const probe = Math.min(deps.config.etcd.requestTimeout, 5000);
  let logged = false;
  for (;;) {
    const busy = await busyMembers(deps.pool, view, probe);
    if (busy.length === 0) return undefined;
    const reason = `member ${memberLabel(busy[0]!.member)} does not answer Status (defragmenting or down): ${busy[0]!.error}`;
    if (!logged) {
      deps.log.info({ event: 'turn.wait', reason }, `waiting: ${reason}`);
      logged = true;
    }
    if (deps.clock.now() >= until || deps.signal?.aborted) return reason;
    await deps.clock.sleep(1000, deps.signal);
  }
}

async function transferLeadership(deps: PassDeps, view: ClusterView): Promise<{ ok: true } | { ok: false; reason: string }> {
  const target = transferTarget(view);
  if (!target) return { ok: false, reason: 'no healthy voting follower' };
  const t0 = deps.clock.now();
  try {
    await deps.pool.get(view.local.endpoint).moveLeader(target.id);
  } catch (err) {
    return { ok: false, reason: errorMessage(err) };
  }
  deps.log.info({ event: 'leader.transfer', from: view.local.hex, to: target.hex, tookMs: deps.clock.now() - t0 }, `moved leadership from ${view.local.hex} to ${memberLabel(target)}`);
  return { ok: true };
}

async function compactForNoSpace(deps: PassDeps, view: ClusterView): Promise<void> {
  const rev = view.local.status!.revision - BigInt(deps.config.nospace.keepRevisions);
  if (rev <= 0n) return;
  try {
    // physical: wait until the backend has dropped the history, or the defrag copies it along.
    await deps.pool.get(view.local.endpoint).compact(rev, true);
    deps.log.info({ event: 'compact', revision: rev.toString() }, `compacted history up to revision ${rev} (nospace.compact)`);
  } catch (err) {
    const kind = classify((err as DefragdError).cause ?? err);
    if (kind === 'compacted') deps.log.info({ event: 'compact', revision: rev.toString() }, `history already compacted past revision ${rev}`);
    else deps.log.warn({ event: 'compact.fail', error: errorMessage(err) }, `compaction failed: ${errorMessage(err)}`);
  }
}

async function defragmentLocal(deps: PassDeps, view: ClusterView, opts: PassOptions): Promise<PassResult> {
  const { log, config: c } = deps;
  const local = view.local;
  const client = deps.pool.get(local.endpoint);
  const before = local.status!;
  const t0 = deps.clock.now();
  deps.onDefragStart?.(local.hex);
  log.info({ event: 'defrag.start', member: local.hex, endpoint: local.endpoint, beforeBytes: before.dbSize, inUseBytes: before.dbSizeInUse },
    `defragmenting member ${memberLabel(local)}: ${formatBytes(before.dbSize)} on disk, ${formatBytes(before.dbSizeInUse)} in use`);
  let failure: string | undefined;
  try {
    await client.defragment();
  } catch (err) {
    failure = errorMessage(err);
    // A timed-out defragment goes on inside etcd: never send another, wait for the member instead.
    if (classify((err as DefragdError).cause ?? err) === 'timeout') {
      log.warn({ event: 'defrag.timeout', member: local.hex }, `defragment of ${local.hex} passed etcd.defragTimeout; not re-sending, waiting for the member to answer again`);
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
  log.info({ event: 'defrag.done', member: local.hex, beforeBytes: before.dbSize, afterBytes: after.dbSize, inUseBytes: after.dbSizeInUse, tookMs },
    `defragmented member ${memberLabel(local)}: ${formatBytes(before.dbSize)} -> ${formatBytes(after.dbSize)} in ${formatDuration(tookMs)}`);
  deps.onDefrag?.({ member: local.hex, ok: true, tookMs, reclaimed: Math.max(0, before.dbSize - after.dbSize) });

  if (c.verify.hashKV) {
    const bad = await verifyIntegrity(deps, view, before);
    if (bad) {
      log.error({ event: 'verify.fail', code: 'EDD_INTEGRITY', member: local.hex, ...bad.fields }, bad.reason);
      const haltRecorded = await writeHalt(deps, view, bad.reason);
      return { outcome: 'failed', reason: bad.reason, member: local.hex, beforeBytes: before.dbSize, afterBytes: after.dbSize, tookMs, check: 'integrity', haltRecorded };
    }
  }
  if (c.coordination.settle > 0) await deps.clock.sleep(c.coordination.settle, deps.signal);
  return {
    outcome: 'done',
    reason: `defragmented member ${memberLabel(local)}: ${formatBytes(before.dbSize)} -> ${formatBytes(after.dbSize)} in ${formatDuration(tookMs)}${opts.mode === 'nospace' ? ' (NOSPACE recovery)' : ''}`,
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
async function settle(deps: PassDeps, view: ClusterView, catchUpMs: number): Promise<{ ok: true; status: MemberStatus } | { ok: false; reason: string }> {
  const timeout = deps.config.etcd.requestTimeout;
  const client = deps.pool.get(view.local.endpoint);
  let answeredAt: number | undefined;
  let lastReport = deps.clock.now();
  let last = 'no answer';
  for (;;) {
    const s = await client.probe(timeout);
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
      if (deps.clock.now() - answeredAt > catchUpMs) return { ok: false, reason: `member did not catch up within ${formatDuration(catchUpMs)}: ${last}` };
    }
    if (deps.clock.now() - lastReport >= 60_000) {
      deps.log.warn({ event: 'defrag.wait', member: view.local.hex, reason: last }, `still waiting for member ${view.local.hex} after its defragment, holding the turn: ${last}`);
      lastReport = deps.clock.now();
    }
    // Not cut short by a stop signal: the turn is handed over only once the member is back.
    await deps.clock.sleep(500);
  }
}

/** HashKV at a revision every voting member has applied must agree; the revision must not go backwards. */
async function verifyIntegrity(deps: PassDeps, view: ClusterView, before: MemberStatus): Promise<{ reason: string; fields: Record<string, unknown> } | undefined> {
  const hashKV = deps.hashKV ?? defaultHashKV;
  const members = voting(view);
  for (let attempt = 1; attempt <= 3; attempt++) {
    let hashes: { m: MemberView; hash: string; compactRevision: bigint }[];
    let rev: bigint;
    try {
      const statuses = await Promise.all(members.map((m) => deps.pool.get(m.endpoint).status({ log: deps.log }, 2)));
      const local = statuses[members.findIndex((m) => m.isLocal)];
      if (local && local.revision < before.revision) {
        return { reason: `integrity: revision of member ${view.local.hex} went backwards after defragment (${before.revision} -> ${local.revision})`, fields: { before: before.revision.toString(), after: local.revision.toString() } };
      }
      rev = statuses.reduce((min, s) => (s.revision < min ? s.revision : min), statuses[0]!.revision);
      // One member at a time: hashing the keyspace holds a read transaction on that member.
      hashes = [];
      for (const m of members) hashes.push({ m, ...(await hashKV(deps.pool, m, rev)) });
    } catch (err) {
      // A compaction racing the check is retried; a member that cannot answer now leaves the
      // defragment unverified rather than failed.
      if (classify((err as DefragdError).cause ?? err) === 'compacted') continue;
      deps.log.warn({ event: 'verify.skip', error: errorMessage(err) }, `HashKV not compared: ${errorMessage(err)}`);
      return undefined;
    }
    const compacts = new Set(hashes.map((h) => h.compactRevision.toString()));
    if (compacts.size > 1) continue; // a compaction landed between the calls: ask again
    const distinct = new Set(hashes.map((h) => h.hash));
    if (distinct.size === 1) {
      deps.log.info({ event: 'verify.ok', revision: rev.toString(), hash: hashes[0]!.hash }, `HashKV agrees on all ${hashes.length} voting members at revision ${rev}`);
      return undefined;
    }
    const detail = hashes.map((h) => `${h.m.hex}=${h.hash}`).join(', ');
    return {
      reason: `integrity: HashKV differs between members at revision ${rev} after defragmenting ${view.local.hex} (${detail}); stopping defragmentation, check the members with etcdctl endpoint hashkv`,
      fields: { revision: rev.toString(), hashes: Object.fromEntries(hashes.map((h) => [h.m.hex, h.hash])) },
    };
  }
  deps.log.warn({ event: 'verify.skip' }, 'HashKV not compared: compactions kept moving during the check');
  return undefined;
}

