// Pure rules: the health gate and the decision. No I/O, so they are unit-tested with plain data.
import type { Config } from './config.ts';
import { hexId, memberLabel, voting, type ClusterView, type MemberStatus, type MemberView, type QuotaSource } from './view.ts';
import { formatBytes, formatPercent } from './units.ts';

/** The quota a member is judged against: a configured size wins; `auto` takes etcd's own figure. */
export function resolveQuota(
  configured: number | 'auto',
  fromStatus: number | undefined,
  fromMetrics: number | undefined,
): { bytes?: number; source?: QuotaSource; etcd?: number } {
  const etcd = fromStatus ?? fromMetrics;
  if (configured !== 'auto') return { bytes: configured, source: 'config', etcd };
  if (fromStatus !== undefined) return { bytes: fromStatus, source: 'status', etcd };
  if (fromMetrics !== undefined) return { bytes: fromMetrics, source: 'metrics', etcd };
  return { etcd };
}

/**
 * The quota a NOSPACE decision may rely on: the smaller of the configured and the member's own,
 * when both are known. etcd raises the alarm against its own figure, so a configured quota above it
 * must never let a member count as "under the quota" (the alarm would come back at the next write).
 */
export function enforcedQuota(m: Pick<MemberView, 'quotaBytes' | 'etcdQuotaBytes'>): number | undefined {
  if (m.quotaBytes === undefined) return m.etcdQuotaBytes;
  return m.etcdQuotaBytes === undefined ? m.quotaBytes : Math.min(m.quotaBytes, m.etcdQuotaBytes);
}

/** A configured policy.quotaBytes that disagrees with what the member itself enforces. */
export function quotaMismatch(m: MemberView): string | undefined {
  if (m.quotaSource !== 'config' || m.etcdQuotaBytes === undefined || m.quotaBytes === m.etcdQuotaBytes) return undefined;
  return (
    `policy.quotaBytes is ${formatBytes(m.quotaBytes!)} (${m.quotaBytes} bytes) ` +
    `but member ${memberLabel(m)} runs with --quota-backend-bytes ${formatBytes(m.etcdQuotaBytes)} (${m.etcdQuotaBytes} bytes); ` +
    `set policy.quotaBytes: auto to use etcd's own figure`
  );
}

/** Why a run must not defragment now, or undefined when the cluster is healthy enough. */
export function healthGate(view: ClusterView, c: Pick<Config, 'health'>): { check: string; reason: string; member?: string } | undefined {
  const corrupt = view.alarms.find((a) => a.alarm === 'CORRUPT');
  if (corrupt) {
    return {
      check: 'alarm',
      member: hexId(corrupt.memberId),
      reason: `CORRUPT alarm raised for member ${hexId(corrupt.memberId)}: no defragmentation until an operator has checked the data`,
    };
  }
  for (const m of voting(view)) {
    if (m.defragmenting)
      return { check: 'busy', member: m.hex, reason: `member ${memberLabel(m)} is defragmenting (etcd_disk_defrag_inflight is 1)` };
  }
  for (const m of voting(view)) {
    if (m.status) continue;
    // A member that answers neither Status nor /metrics is down, not busy. Only where /metrics
    // answered wrongly (not found, no such gauge) is silence still taken as a defragment.
    if (m.defragmenting === undefined && m.metricsError && !m.metricsDown) {
      return {
        check: 'busy',
        member: m.hex,
        reason:
          `member ${memberLabel(m)} does not answer Status and its /metrics cannot tell (${m.metricsError}): ` +
          'taken to be defragmenting (fallback: silence)',
      };
    }
    return { check: 'status', member: m.hex, reason: `member ${memberLabel(m)} does not answer Status: ${m.error ?? 'no answer'}` };
  }
  const leaders = new Set(voting(view).map((m) => m.status!.leader));
  if (leaders.has('0')) {
    const m = voting(view).find((x) => x.status!.leader === '0')!;
    return { check: 'leader', member: m.hex, reason: `member ${memberLabel(m)} sees no leader` };
  }
  if (leaders.size > 1) {
    const detail = voting(view)
      .map((m) => `${m.hex}->${hexId(m.status!.leader)}`)
      .join(', ');
    return { check: 'leader', reason: `members disagree on the leader (${detail})` };
  }
  const leader = [...leaders][0]!;
  if (!voting(view).some((m) => m.id === leader))
    return { check: 'leader', reason: `the leader ${hexId(leader)} is not a voting member of the member list` };
  const applied = voting(view).map((m) => ({ m, idx: m.status!.raftAppliedIndex }));
  const max = applied.reduce((a, b) => (b.idx > a ? b.idx : a), 0n);
  for (const { m, idx } of applied) {
    const lag = max - idx;
    if (lag > BigInt(c.health.maxRaftLag)) {
      return {
        check: 'raft-lag',
        member: m.hex,
        reason: `member ${memberLabel(m)} is ${lag} raft entries behind (health.maxRaftLag is ${c.health.maxRaftLag})`,
      };
    }
  }
  if (view.readError) return { check: 'read', member: view.local.hex, reason: `a linearizable read failed: ${view.readError}` };
  return undefined;
}

/** Near the quota any real gain is worth a defragment, but not a few pages: the member blocks while it runs. */
export const NEAR_QUOTA_MIN_RECLAIM = 1024 * 1024;

export interface Decision {
  defrag: boolean;
  reason: string;
  fragmentation: number;
  reclaimable: number;
  quotaUsage: number;
}

/** Does this member need a defragment under the policy? */
export function decide(
  s: Pick<MemberStatus, 'dbSize' | 'dbSizeInUse'>,
  p: Config['policy'],
  quotaBytes: number,
  force = p.force,
  /** Why the forecast wants a defragment now (forecast.defragBefore): then any minReclaimable is worth it. */
  forecast?: string,
): Decision {
  const reclaimable = Math.max(0, s.dbSize - s.dbSizeInUse);
  const fragmentation = s.dbSize > 0 ? reclaimable / s.dbSize : 0;
  const quotaUsage = quotaBytes > 0 ? s.dbSize / quotaBytes : 0;
  const numbers =
    `db ${formatBytes(s.dbSize)}, in use ${formatBytes(s.dbSizeInUse)}, ` +
    `reclaimable ${formatBytes(reclaimable)} (${formatPercent(fragmentation)}), quota usage ${formatPercent(quotaUsage)}`;
  const base = { fragmentation, reclaimable, quotaUsage };
  if (force) return { ...base, defrag: true, reason: `policy.force is set; ${numbers}` };
  if (fragmentation >= p.minFragmentation && reclaimable >= p.minReclaimable) {
    return { ...base, defrag: true, reason: `fragmented: ${numbers}` };
  }
  if (quotaUsage >= p.quotaUsageTrigger && reclaimable >= NEAR_QUOTA_MIN_RECLAIM) {
    return { ...base, defrag: true, reason: `near the space quota: ${numbers}` };
  }
  if (forecast && reclaimable >= p.minReclaimable) return { ...base, defrag: true, reason: `${forecast}: ${numbers}` };
  return {
    ...base,
    defrag: false,
    reason:
      `not needed: ${numbers} ` +
      `(needs fragmentation >= ${formatPercent(p.minFragmentation)} and reclaimable >= ${formatBytes(p.minReclaimable)}, ` +
      `or quota usage >= ${formatPercent(p.quotaUsageTrigger)} with at least 1MiB to reclaim)`,
  };
}

/**
 * During a NOSPACE alarm: defragment a member whose size keeps the alarm from being disarmed.
 * Until the member has been defragmented in this alarm, its in-use figure is not trusted: pages
 * freed by a compaction are only released by the next write, and NOSPACE refuses writes, so
 * dbSizeInUse can stay at dbSize (seen in the benchmark). A defragment copies only live data.
 */
export function decideNoSpace(
  s: Pick<MemberStatus, 'dbSize' | 'dbSizeInUse'>,
  c: Pick<Config, 'policy' | 'nospace'>,
  quotaBytes: number,
  defraggedSinceAlarm = false,
): Decision {
  const normal = decide(s, c.policy, quotaBytes, false);
  const limit = quotaBytes * c.nospace.disarmBelow;
  const mark = `${formatPercent(c.nospace.disarmBelow)} of the quota ${formatBytes(quotaBytes)}`;
  // Under the mark, a member does not keep the alarm armed: it waits for the scheduled runs after
  // the disarm, and stays out of the NOSPACE order (nospaceNext) like every member under the mark.
  if (s.dbSize < limit)
    return { ...normal, defrag: false, reason: `NOSPACE: db ${formatBytes(s.dbSize)} is under ${mark}: not in the NOSPACE order` };
  if (!defraggedSinceAlarm) {
    return {
      ...normal,
      defrag: true,
      reason:
        `NOSPACE: db ${formatBytes(s.dbSize)} is above ${mark}; ` +
        `defragmenting to find what the live data really takes (${normal.reason})`,
    };
  }
  if (s.dbSizeInUse >= limit - NEAR_QUOTA_MIN_RECLAIM) {
    return {
      ...normal,
      defrag: false,
      reason: `live data ${formatBytes(s.dbSizeInUse)} alone is above ${mark}: a defragment cannot bring the member back under it`,
    };
  }
  if (normal.reclaimable >= NEAR_QUOTA_MIN_RECLAIM) {
    return { ...normal, defrag: true, reason: `NOSPACE: db ${formatBytes(s.dbSize)} is above ${mark}; ${normal.reason}` };
  }
  return normal;
}

/** Is this member at or above the disarm mark (what keeps NOSPACE armed)? Unknown quota: no. */
export function overDisarmMark(m: MemberView, c: Pick<Config, 'nospace'>): boolean {
  const quota = enforcedQuota(m);
  return m.status !== undefined && quota !== undefined && m.status.dbSize >= quota * c.nospace.disarmBelow;
}

/**
 * The member that goes next in the NOSPACE order (run.ts nospaceSteps): among the voting members
 * at or above the disarm mark, the lowest member ID. Member IDs never change, and a member leaves
 * the order only by shrinking under the mark, so every daemon that reads the same sizes finds the
 * same member.
 */
export function nospaceNext(view: ClusterView, c: Pick<Config, 'nospace'>): MemberView | undefined {
  return voting(view)
    .filter((m) => overDisarmMark(m, c))
    .sort((a, b) => (BigInt(a.id) < BigInt(b.id) ? -1 : BigInt(a.id) > BigInt(b.id) ? 1 : 0))[0];
}

/** The voting follower most caught up, to receive leadership; undefined when none is healthy. */
export function transferTarget(view: ClusterView): MemberView | undefined {
  return voting(view)
    .filter((m) => !m.isLocal && m.status && m.defragmenting !== true)
    .sort((a, b) =>
      b.status!.raftAppliedIndex > a.status!.raftAppliedIndex ? 1 : b.status!.raftAppliedIndex < a.status!.raftAppliedIndex ? -1 : 0,
    )[0];
}
