// NOSPACE recovery, after this daemon's own recovery run: disarm the alarm once every voting
// member is back under the quota with a margin; otherwise say what keeps it armed and what to do.
import type { Config } from './config.ts';
import type { EtcdPool } from './etcd.ts';
import { describeHalt, haltOf, readStops } from './control.ts';
import { errorMessage } from './errors.ts';
import { inspect } from './inspect.ts';
import type { Log } from './log.ts';
import { NEAR_QUOTA_MIN_RECLAIM, enforcedQuota } from './policy.ts';
import { formatBytes, formatDuration, formatPercent } from './units.ts';
import { hexId, memberLabel, voting, type Alarm, type MemberView } from './view.ts';

/**
 * During NOSPACE every member over the mark waits for its own daemon: when one shows no progress
 * (same db size, not defragmenting) for a while, its node may have no running etcd-defragd. Each
 * such member is reported once per alarm, at error level, by whichever daemon notices it.
 */
export class StallWatch {
  private readonly seen = new Map<string, { size: number; since: number; told: boolean }>();
  private readonly afterMs: number;

  constructor(c: Pick<Config, 'nospace'>) {
    this.afterMs = Math.max(60_000, 3 * c.nospace.checkInterval);
  }

  /** Of these members over the mark, those without progress for long enough, each returned once. */
  stalled(members: MemberView[], now: number): { member: MemberView; forMs: number }[] {
    const out: { member: MemberView; forMs: number }[] = [];
    for (const m of members) {
      const size = m.status?.dbSize ?? 0;
      const s = this.seen.get(m.id);
      if (!s || s.size !== size || m.defragmenting) {
        this.seen.set(m.id, { size, since: now, told: s?.told ?? false });
        continue;
      }
      if (s.told || now - s.since < this.afterMs) continue;
      s.told = true;
      out.push({ member: m, forMs: now - s.since });
    }
    return out;
  }
}

export function reportStalled(log: Log, stalled: { member: MemberView; forMs: number }[]): void {
  for (const { member: m, forMs } of stalled)
    log.error(
      { event: 'nospace.unattended', member: m.hex, dbSize: m.status?.dbSize, stalledMs: forMs },
      `member ${memberLabel(m)} keeps the NOSPACE alarm armed and has shown no progress for ${formatDuration(forMs)} ` +
        `(db ${formatBytes(m.status?.dbSize ?? 0)}, not defragmenting): is etcd-defragd running on its node? ` +
        `Start it there, or defragment that member by hand (etcdctl defrag --endpoints=${m.endpoint})`,
    );
}

export type DisarmOutcome = 'disarmed' | 'not-needed' | 'waiting' | 'blocked' | 'disabled' | 'failed';

export interface DisarmDeps {
  config: Config;
  pool: EtcdPool;
  log: Log;
  onDisarm?: () => void;
  /** The local member was defragmented since the alarm was raised: its in-use figure is real. */
  defraggedSinceAlarm?: boolean;
  /** Members over the mark without progress, and the time now (the daemon's clock). */
  stalls?: { watch: StallWatch; now: number };
}

export async function checkAndDisarm(deps: DisarmDeps): Promise<DisarmOutcome> {
  const { config: c, log } = deps;
  const view = await inspect(
    deps.pool,
    c.etcd.endpoint,
    { log },
    { memberAttempts: 1, linearizableRead: false, quotaBytes: c.policy.quotaBytes },
  );
  const nospace = view.alarms.filter((a) => a.alarm === 'NOSPACE');
  if (nospace.length === 0) return 'not-needed';
  // A mismatch found during NOSPACE is recorded by deleting the halt fuse (the halt key's put is refused).
  const halt = haltOf(await readStops(deps.pool.get(c.etcd.endpoint), c, { log }));
  if (halt) {
    log.error(
      { event: 'nospace.blocked', reason: 'halt' },
      `NOSPACE stays armed: defragmentation is halted after an integrity mismatch (${describeHalt(halt)}); check the members first`,
    );
    return 'blocked';
  }
  if (view.alarms.some((a) => a.alarm === 'CORRUPT')) {
    log.error(
      { event: 'nospace.blocked', reason: 'corrupt' },
      'NOSPACE stays armed: a CORRUPT alarm is also raised; an operator must check the members first',
    );
    return 'blocked';
  }
  // The member's own quota when known: etcd raises the alarm against it, whatever we configured.
  const limitOf = (m: MemberView) => enforcedQuota(m)! * c.nospace.disarmBelow;
  const markOf = (m: MemberView) => `${formatPercent(c.nospace.disarmBelow)} of its quota ${formatBytes(enforcedQuota(m)!)}`;
  const members = voting(view);
  // Every voting member, and any other member that raised NOSPACE (a learner), must be checked.
  const alarmed = new Set(nospace.map((a) => a.memberId));
  const checked = view.members.filter((m) => !m.isLearner || alarmed.has(m.id));
  const unknown = checked.filter((m) => !m.status || enforcedQuota(m) === undefined);
  if (unknown.length > 0) {
    const m = unknown[0]!;
    const why = !m.status ? `does not answer (${m.error ?? 'no answer'})` : `has no known quota (${m.quotaError ?? 'unknown'})`;
    log.warn({ event: 'nospace.wait', member: m.hex }, `NOSPACE stays armed for now: member ${memberLabel(m)} ${why}`);
    return 'waiting';
  }
  const gone = nospace.filter((a) => !view.members.some((m) => m.id === a.memberId));
  for (const a of gone) {
    log.error(
      { event: 'nospace.blocked', reason: 'unknown-member', member: hexId(a.memberId) },
      `NOSPACE stays armed: it was raised by member ${hexId(a.memberId)}, which is not in the member list, ` +
        'so its size cannot be checked; disarm it by hand once you know why',
    );
  }
  if (gone.length > 0) return 'blocked';
  // Only a defragmented member's in-use figure is trusted (freed pages wait for a write to be
  // released, and NOSPACE refuses writes): each daemon speaks for its own member.
  const tooBig = members.filter(
    (m) => m.isLocal && deps.defraggedSinceAlarm && m.status!.dbSizeInUse >= limitOf(m) - NEAR_QUOTA_MIN_RECLAIM,
  );
  if (tooBig.length > 0) {
    const detail = tooBig
      .map((m) => `${m.hex}: ${formatBytes(m.status!.dbSizeInUse)} in use after a defragment, quota ${formatBytes(enforcedQuota(m)!)}`)
      .join(', ');
    const cannotHelp = c.nospace.compact
      ? 'compaction and defragmentation cannot help'
      : 'defragmenting cannot help, and nospace.compact is false';
    const orCompact = c.nospace.compact ? '' : ', or compact history (nospace.compact: true)';
    log.error(
      { event: 'nospace.blocked', reason: 'live-data', members: tooBig.map((m) => m.hex), quotaBytes: enforcedQuota(tooBig[0]!) },
      `NOSPACE stays armed: live data alone is above ${formatPercent(c.nospace.disarmBelow)} of the quota (${detail}); ` +
        `${cannotHelp}. Raise --quota-backend-bytes on every member, or delete data${orCompact}`,
    );
    return 'blocked';
  }
  const over = checked.filter((m) => m.status!.dbSize >= limitOf(m));
  if (over.length > 0) {
    if (deps.stalls)
      reportStalled(
        log,
        deps.stalls.watch.stalled(
          over.filter((m) => !m.isLocal && !m.isLearner),
          deps.stalls.now,
        ),
      );
    for (const m of over) {
      const size = `its db is ${formatBytes(m.status!.dbSize)}, above ${markOf(m)}`;
      const fields = { event: 'nospace.wait', member: m.hex, dbSize: m.status!.dbSize, limitBytes: Math.floor(limitOf(m)) };
      if (m.isLearner) {
        log.error(
          { ...fields, event: 'nospace.unattended' },
          `learner ${memberLabel(m)} keeps the NOSPACE alarm armed: ${size}; ` +
            'etcd-defragd never defragments learners: defragment it by hand or remove it',
        );
      } else if (m.isLocal) {
        log.info(fields, `NOSPACE stays armed until member ${memberLabel(m)} is defragmented by its etcd-defragd: ${size}`);
      } else {
        // Daemons started during the alarm cannot register (no lease is granted), so who runs where
        // is unknown; the NOSPACE order says at error level when the member first in it stalls.
        log.info(
          fields,
          `member ${memberLabel(m)} keeps the NOSPACE alarm armed: ${size}; its etcd-defragd defragments it in the NOSPACE order ` +
            '(is etcd-defragd running on its node?)',
        );
      }
    }
    return 'waiting';
  }
  if (!c.nospace.disarm) {
    log.warn(
      { event: 'nospace.disarm.disabled' },
      'every member is under its quota again but nospace.disarm is false: run `etcdctl alarm disarm` to allow writes',
    );
    return 'disabled';
  }
  const client = deps.pool.get(view.local.endpoint);
  for (const alarm of nospace.filter((a) => checked.some((m) => m.id === a.memberId))) {
    try {
      await client.disarm(alarm as Alarm);
      deps.onDisarm?.();
      log.info({ event: 'nospace.disarm', member: hexId(alarm.memberId) }, `disarmed NOSPACE of member ${hexId(alarm.memberId)}`);
    } catch (err) {
      log.error(
        { event: 'nospace.disarm.fail', member: hexId(alarm.memberId), error: errorMessage(err) },
        `could not disarm NOSPACE of member ${hexId(alarm.memberId)}: ${errorMessage(err)}`,
      );
      return 'failed';
    }
  }
  const probeKey = `${c.coordination.prefix}probe`;
  try {
    await client.put(probeKey, new Date().toISOString());
    log.info(
      { event: 'nospace.recovered', sizes: Object.fromEntries(members.map((m) => [m.hex, m.status!.dbSize])) },
      `writes work again: NOSPACE disarmed, every member under ${formatPercent(c.nospace.disarmBelow)} of its quota`,
    );
    return 'disarmed';
  } catch (err) {
    log.error(
      { event: 'nospace.write.fail', error: errorMessage(err) },
      `disarmed NOSPACE but a test write still fails: ${errorMessage(err)}`,
    );
    return 'failed';
  }
}
