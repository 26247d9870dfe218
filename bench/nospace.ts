// Scenario (d): the seed's incident. History churn until etcd raises NOSPACE, the compaction the
// API server would do, and then either the daemons or the old cron, in the order they happen.
import { setTimeout as sleep } from 'node:timers/promises';
import type { ICompare } from 'etcd3';
import { formatBytes } from '../src/units.ts';
import type { Cluster } from '../test/harness/cluster.ts';
import { DEFAULT_VALUE_BYTES, isNoSpaceError, listAlarms } from '../test/harness/data.ts';
import { allDefragEvents } from '../test/harness/defrag-log.ts';
import type { LogLine } from '../test/harness/defragd.ts';
import { errorText } from '../test/harness/errors.ts';
import { errorKind, now, startWriteLoad, type LoadReport, type RequestRecord, type RunningLoad } from '../test/harness/load.ts';
import type { CliProcess } from '../test/harness/proc.ts';
import { daemonEvents, effectiveConfig, NEVER, startDaemons, stopDaemons, writeBenchConfig, type Settings } from './daemons.ts';
import { ETCDCTL_TIMEOUT_MS, etcdctlNote, freshCluster, type Ctx, type FillSummary } from './scenarios.ts';

const MiB = 1024 * 1024;

/**
 * daemon: etcd-defragd with its defaults (quota read from etcd, NOSPACE compaction on) and nobody
 * else compacting: the API server cannot (its compaction starts with a Txn that carries a Put,
 * which NOSPACE refuses). This is the seed's incident.
 * daemon-nocompact: etcd-defragd with nospace.compact: false, after an operator compacted the
 * history by hand (what v0.1 assumed).
 * cron: the old cron line, after the same hand compaction (without it, it never recovers).
 */
export type NoSpaceVariant = 'daemon' | 'daemon-nocompact' | 'cron';

export interface NoSpaceRun {
  variant: NoSpaceVariant;
  title: string;
  fullVersion: string;
  quotaBytes: number;
  fill: FillSummary;
  checkIntervalMs: number;
  /** First write refused with "database space exceeded" (the churn's or the load's). */
  alarmAt: number;
  churnWritten: number;
  /** What the API server's own compactor (a Txn with a Put, then Compact) got during the alarm. */
  k8sCompactor: string;
  /** When our plain Compact RPC at the current revision returned. */
  compactAt: number;
  /** t1 of the first write sent after the alarm that succeeded. */
  recoveredAt?: number;
  /** When the observation ended. */
  endAt: number;
  /** Why the observation gave up (no recovery). */
  gaveUp?: string;
  /** Load writes sent after the alarm until recovery (or the end) and how many failed. */
  writesSent: number;
  writesFailed: number;
  errors: Record<string, number>;
  timeline: { at: number; what: string }[];
  alarmsAtEnd: string[];
}

const K8S_COMPACT_KEY = 'compact_rev_key';

function eventDetail(e: LogLine): string {
  switch (e.event) {
    case 'leader.transfer':
      return ` ${String(e.from)} -> ${String(e.to)}`;
    case 'compact':
    case 'compact.fail':
      return ` (${e.msg})`;
    case 'nospace.disarm':
      return ` of member ${String(e.member)}`;
    case 'nospace.blocked':
    case 'nospace.unattended':
    case 'run.skip':
    case 'run.fail':
    case 'defrag.fail':
      return ` (${e.msg})`;
    default:
      return '';
  }
}

/**
 * The incident: the API server updates the same objects quickly (history piles up) until etcd
 * raises NOSPACE. Then the compaction the API server would do, and either the daemons or the old
 * cron.
 */
export async function scenarioD(ctx: Ctx, variant: NoSpaceVariant): Promise<NoSpaceRun> {
  const { opts } = ctx;
  const label = `(d ${variant})`;
  const titles: Record<NoSpaceVariant, string> = {
    daemon: 'etcd-defragd (defaults), nobody else compacts',
    'daemon-nocompact': 'etcd-defragd, nospace.compact: false, history compacted by hand',
    cron: 'old cron: `etcdctl defrag --cluster`',
  };
  const title = titles[variant];
  const externalCompaction = variant === 'daemon-nocompact' || variant === 'cron';
  const quota = Math.ceil((opts.inUseBytes * opts.quotaFactor) / MiB) * MiB;
  const { cluster, fill: f } = await freshCluster(ctx, label, 0, { quotaBytes: quota });
  let daemons: CliProcess[] = [];
  let checkIntervalMs = 0;
  try {
    if (variant !== 'cron') ({ daemons, checkIntervalMs } = await startNoSpaceDaemons(ctx, cluster, variant, label, quota));
    const load = startWriteLoad(cluster, { ratePerSec: opts.ratePerSec, deadlineMs: opts.deadlineMs });
    let alarmAt = 0;
    let churnWritten = 0;
    let k8sCompactor = '';
    let compactAt = 0;
    const timeline: { at: number; what: string }[] = [];
    let recovery: Recovery = {};
    let endAt = 0;
    try {
      await sleep(opts.preRollMs);
      ({ alarmAt, churnWritten } = await churnUntilNoSpace(ctx, cluster, load, label, quota));
      ({ k8sCompactor, compactAt } = await compactDuringNoSpace(ctx, cluster, label, externalCompaction, timeline));
      const watch: Watch = { load, alarmAt, label };
      recovery =
        variant === 'cron'
          ? await cronRecovery(ctx, cluster, watch, timeline)
          : await daemonRecovery(ctx, cluster, daemons, watch, compactAt, externalCompaction);
      await sleep(recovery.recoveredAt !== undefined ? 2000 : 0);
      endAt = now();
    } finally {
      await load.stop();
    }
    const { recoveredAt, gaveUp } = recovery;
    const report = await load.stop();
    const until = recoveredAt ?? endAt;
    const after = report.requests.filter((r) => r.t0 >= alarmAt && r.t0 <= until);
    const errors: Record<string, number> = {};
    for (const r of after) if (!r.ok) errors[errorKind(r.error ?? '?')] = (errors[errorKind(r.error ?? '?')] ?? 0) + 1;

    timeline.push(...(await defragTimeline(cluster, alarmAt)));
    if (variant !== 'cron') timeline.push(...daemonTimeline(cluster, daemons, alarmAt));
    if (recoveredAt !== undefined) timeline.push({ at: recoveredAt, what: 'first write accepted again' });
    timeline.sort((a, b) => a.at - b.at);
    const alarmsAtEnd = (await listAlarms(cluster).catch(() => [])).map((a) => `${a.alarm} on ${a.memberId}`);
    ctx.log(
      `${label}: ${recoveredAt !== undefined ? `writes accepted ${((recoveredAt - alarmAt) / 1000).toFixed(1)} s after the alarm` : gaveUp}`,
    );
    return {
      variant,
      title,
      fullVersion: cluster.fullVersion,
      quotaBytes: quota,
      fill: f,
      checkIntervalMs,
      alarmAt,
      churnWritten,
      k8sCompactor,
      compactAt,
      ...(recoveredAt !== undefined ? { recoveredAt } : {}),
      endAt,
      ...(gaveUp ? { gaveUp } : {}),
      writesSent: after.length,
      writesFailed: after.filter((r) => !r.ok).length,
      errors,
      timeline,
      alarmsAtEnd,
    };
  } finally {
    await stopDaemons(daemons);
    await cluster.stop();
  }
}

/** (d) Three daemons with the defaults but for `nospace`; their nospace.checkInterval. */
async function startNoSpaceDaemons(
  ctx: Ctx,
  cluster: Cluster,
  variant: NoSpaceVariant,
  label: string,
  quota: number,
): Promise<{ daemons: CliProcess[]; checkIntervalMs: number }> {
  const { opts } = ctx;
  const nospace: Record<string, unknown> = {};
  if (opts.nospaceCheckMs !== undefined) nospace.checkInterval = `${opts.nospaceCheckMs}ms`;
  if (variant === 'daemon-nocompact') nospace.compact = false;
  // No policy.quotaBytes: the daemons read each member's quota from etcd.
  const settings: Settings = {
    schedule: { cron: NEVER },
    metrics: { listen: '' },
    ...(Object.keys(nospace).length ? { nospace } : {}),
  };
  const checkIntervalMs = (await effectiveConfig(ctx.cliJs, writeBenchConfig(cluster, cluster.members[0]!, settings))).nospace
    .checkInterval;
  ctx.log(
    `${label}: starting three daemons (quota ${formatBytes(quota)} read from etcd, nospace.checkInterval ${checkIntervalMs / 1000} s)`,
  );
  const daemons = await startDaemons(cluster, settings, ctx.cliJs);
  return { daemons, checkIntervalMs };
}

/** The earliest answer (t1) among `records` that `pred` accepts. */
function firstAnswer(records: readonly RequestRecord[], pred: (r: RequestRecord) => boolean): number | undefined {
  let t: number | undefined;
  for (const r of records) if (pred(r)) t = t === undefined ? r.t1 : Math.min(t, r.t1);
  return t;
}

const refusedNoSpace = (r: RequestRecord): boolean => !r.ok && isNoSpaceError(r.error);

/**
 * (d) History churn: the same few keys overwritten with 64 KiB values as fast as etcd takes them,
 * until a put (the churn's or the load's) is refused with NOSPACE: that is the alarm.
 */
async function churnUntilNoSpace(
  ctx: Ctx,
  cluster: Cluster,
  load: RunningLoad<LoadReport>,
  label: string,
  quota: number,
): Promise<{ alarmAt: number; churnWritten: number }> {
  const keySpace = Math.max(16, Math.round((0.01 * ctx.opts.inUseBytes) / DEFAULT_VALUE_BYTES));
  ctx.log(`${label}: churning ${keySpace} keys until etcd refuses writes (quota ${formatBytes(quota)})`);
  const churn = startWriteLoad(cluster, {
    ratePerSec: 400,
    deadlineMs: 10_000,
    keyPrefix: 'churn/',
    keySpace,
    valueBytes: DEFAULT_VALUE_BYTES,
    maxInFlight: 16,
  });
  let alarmAt: number;
  const churnDeadline = Date.now() + 15 * 60_000;
  for (;;) {
    const t = [firstAnswer(churn.records, refusedNoSpace), firstAnswer(load.records, refusedNoSpace)].filter(
      (x): x is number => x !== undefined,
    );
    if (t.length) {
      alarmAt = Math.min(...t);
      break;
    }
    if (Date.now() > churnDeadline) {
      await churn.stop();
      throw new Error(`no NOSPACE after 15 minutes of churn (quota ${formatBytes(quota)})`);
    }
    await sleep(50);
  }
  const churnReport = await churn.stop();
  const churnWritten = churnReport.okCount * DEFAULT_VALUE_BYTES;
  ctx.log(`${label}: NOSPACE after ${formatBytes(churnWritten)} of churn`);
  return { alarmAt, churnWritten };
}

/**
 * (d) The API server's compactor: a Txn that bumps compact_rev_key, then Compact. During NOSPACE
 * etcd refuses the Txn (it carries a Put), so the API server itself cannot compact. With
 * `external`, someone else compacts at the current revision with a plain Compact RPC.
 */
async function compactDuringNoSpace(
  ctx: Ctx,
  cluster: Cluster,
  label: string,
  external: boolean,
  timeline: { at: number; what: string }[],
): Promise<{ k8sCompactor: string; compactAt: number }> {
  const client = cluster.client();
  const st = await client.maintenance.status({ deadline: Date.now() + 10_000 });
  let k8sCompactor: string;
  try {
    const res = await client.kv.txn(
      {
        compare: [{ key: Buffer.from(K8S_COMPACT_KEY), target: 'Version', result: 'Equal', version: 0 } as ICompare],
        success: [{ request_put: { key: Buffer.from(K8S_COMPACT_KEY), value: Buffer.from(st.header.revision) } }],
        failure: [{ request_range: { key: Buffer.from(K8S_COMPACT_KEY) } }],
      },
      { deadline: Date.now() + 10_000 },
    );
    k8sCompactor = `accepted (succeeded: ${res.succeeded})`;
  } catch (err) {
    k8sCompactor = `refused: ${errorKind(errorText(err))}`;
  }
  let compactAt: number;
  if (external) {
    // What an operator does (or the API server, had its compaction tick come just before the
    // alarm): compact at the current revision. Compact itself works during NOSPACE.
    await client.kv.compact({ revision: st.header.revision, physical: true }, { deadline: Date.now() + 120_000 });
    compactAt = now();
    timeline.push({ at: compactAt, what: `history compacted at revision ${st.header.revision} (plain Compact RPC)` });
    ctx.log(`${label}: compacted at revision ${st.header.revision}; API-server-style compaction txn: ${k8sCompactor}`);
  } else {
    compactAt = now();
    ctx.log(`${label}: nobody else compacts; API-server-style compaction txn: ${k8sCompactor}`);
  }
  return { k8sCompactor, compactAt };
}

/** How (d) ended: the first write accepted after the alarm, or why the observation gave up. */
interface Recovery {
  recoveredAt?: number;
  gaveUp?: string;
}

/** What every recovery watches: the write load, since the alarm. */
interface Watch {
  load: RunningLoad<LoadReport>;
  alarmAt: number;
  label: string;
}

const firstAcceptedAfter = (w: Watch): number | undefined => firstAnswer(w.load.records, (r) => r.ok && r.t0 > w.alarmAt);

/** (d cron) The old cron line, then `cronObserveMs` of watching whether writes are accepted again. */
async function cronRecovery(ctx: Ctx, cluster: Cluster, w: Watch, timeline: { at: number; what: string }[]): Promise<Recovery> {
  const { opts } = ctx;
  const t0 = now();
  const r = await cluster.etcdctl(['defrag', '--cluster'], { member: cluster.members[0], timeoutMs: ETCDCTL_TIMEOUT_MS });
  timeline.push({ at: t0, what: 'cron: `etcdctl defrag --cluster` started' });
  timeline.push({ at: now(), what: etcdctlNote('cron: etcdctl defrag --cluster ended', r, now() - t0) });
  ctx.log(`${w.label}: etcdctl defrag --cluster done; watching writes for ${opts.cronObserveMs / 1000} s`);
  const until = now() + opts.cronObserveMs;
  while (now() < until && firstAcceptedAfter(w) === undefined) await sleep(200);
  const recoveredAt = firstAcceptedAfter(w);
  if (recoveredAt !== undefined) return { recoveredAt };
  return {
    gaveUp: `writes still refused ${((now() - w.alarmAt) / 1000).toFixed(0)} s after the alarm, ${(opts.cronObserveMs / 1000).toFixed(0)} s after the cron's defrag ended`,
  };
}

/**
 * (d daemon) Waits for the daemons to get writes accepted again, at most `recoveryTimeoutMs`; gives
 * up early when one daemon said twice after the compaction (if any) that the alarm cannot be cleared.
 */
async function daemonRecovery(
  ctx: Ctx,
  cluster: Cluster,
  daemons: CliProcess[],
  w: Watch,
  compactAt: number,
  externalCompaction: boolean,
): Promise<Recovery> {
  const { opts } = ctx;
  ctx.log(`${w.label}: waiting for the daemons to recover (at most ${opts.recoveryTimeoutMs / 1000} s)`);
  const until = now() + opts.recoveryTimeoutMs;
  for (;;) {
    const recoveredAt = firstAcceptedAfter(w);
    if (recoveredAt !== undefined) return { recoveredAt };
    if (now() > until) return { gaveUp: `writes still refused ${((now() - w.alarmAt) / 1000).toFixed(0)} s after the alarm` };
    const blocked = daemonEvents(cluster, daemons, 'nospace.blocked').filter((e) => e.time > compactAt);
    const byNode = new Map<string, number>();
    for (const b of blocked) byNode.set(b.node, (byNode.get(b.node) ?? 0) + 1);
    const stuck = [...byNode.entries()].find(([, n]) => n >= 2);
    if (stuck) {
      const last = blocked.filter((b) => b.node === stuck[0]).at(-1)!;
      return {
        gaveUp: `stuck: the daemon on ${stuck[0]} reported twice after the ${externalCompaction ? 'compaction' : 'alarm'}: ${last.msg}`,
      };
    }
    await sleep(200);
  }
}

/** (d) The members' defrags since the alarm, from etcd's logs. */
async function defragTimeline(cluster: Cluster, alarmAt: number): Promise<{ at: number; what: string }[]> {
  const out: { at: number; what: string }[] = [];
  for (const d of await allDefragEvents(cluster)) {
    if (d.start.getTime() < alarmAt) continue;
    out.push({ at: d.start.getTime(), what: `${d.member} defrag started (etcd log)` });
    if (d.end) out.push({ at: d.end.getTime(), what: `${d.member} defrag finished${d.error ? ` with error ${d.error}` : ''} (etcd log)` });
  }
  return out;
}

/** (d) What the daemons said since the alarm that matters to the recovery (each node's first alarm.nospace only). */
function daemonTimeline(cluster: Cluster, daemons: CliProcess[], alarmAt: number): { at: number; what: string }[] {
  const out: { at: number; what: string }[] = [];
  const interesting = new Set([
    'alarm.nospace',
    'compact',
    'compact.fail',
    'leader.transfer',
    'nospace.blocked',
    'nospace.disarm',
    'nospace.recovered',
    'nospace.unattended',
    'run.skip',
    'run.fail',
    'defrag.fail',
  ]);
  const seenAlarm = new Set<string>();
  for (const e of daemonEvents(cluster, daemons)) {
    if (e.time < alarmAt || !e.event || !interesting.has(e.event)) continue;
    if (e.event === 'alarm.nospace') {
      if (seenAlarm.has(e.node)) continue;
      seenAlarm.add(e.node);
    }
    out.push({ at: e.time, what: `daemon on ${e.node}: ${e.event}${eventDetail(e)}` });
  }
  return out;
}
