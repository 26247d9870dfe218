// The benchmark scenarios. Cluster start, fill, write load and read probes are the integration
// tests' harness (test/harness/); this file only strings them together and measures.
import { execFileSync } from 'node:child_process';
import { readdirSync, readFileSync } from 'node:fs';
import { relative } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import type { ICompare } from 'etcd3';
import { startCluster, type Cluster, type ClusterOptions } from '../test/harness/cluster.ts';
import type { Member } from '../test/harness/member.ts';
import { allDefragEvents, assertNoOverlap, type DefragEvent } from '../test/harness/defrag-log.ts';
import { errorText } from '../test/harness/errors.ts';
import { DEFAULT_VALUE_BYTES, fill, isNoSpaceError, listAlarms, type FillResult } from '../test/harness/data.ts';
import type { LogLine } from '../test/harness/defragd.ts';
import { errorKind, now, percentile, startReadProbe, startWriteLoad, type LoadReport, type ProbeReport, type RequestRecord, type RunningLoad } from '../test/harness/load.ts';
import { REPO_ROOT, type CliProcess } from '../test/harness/proc.ts';
import { cronAt, daemonEvents, effectiveConfig, NEVER, startDaemonProcess, startDaemons, stopDaemons, writeBenchConfig, type Footprint, type Settings } from './daemons.ts';
import type { BenchOptions } from './options.ts';
import { formatBytes } from '../src/units.ts';
import type { EtcdVersion } from '../test/harness/etcd-bin.ts';

const MiB = 1024 * 1024;
/** etcdctl's --command-timeout and our patience for one etcdctl defrag command. */
const ETCDCTL_TIMEOUT_MS = 20 * 60_000;

export interface Ctx {
  version: EtcdVersion;
  opts: BenchOptions;
  /** The daemon build every daemon of this run starts from. */
  cliJs: string;
  /** Progress line (stderr). */
  log: (line: string) => void;
}

export interface FillSummary {
  /** Largest dbSize / smallest dbSizeInUse over the members after the fill. */
  dbSize: number;
  inUse: number;
  reclaimable: number;
  elapsedMs: number;
}

function summarizeFill(f: FillResult): FillSummary {
  const dbSize = Math.max(...f.members.map((m) => m.dbSize));
  const inUse = Math.min(...f.members.map((m) => m.dbSizeInUse));
  const reclaimable = Math.min(...f.members.map((m) => m.dbSize - m.dbSizeInUse));
  return { dbSize, inUse, reclaimable, elapsedMs: f.elapsedMs };
}

async function sleepUntil(t: number): Promise<void> {
  const ms = t - now();
  if (ms > 0) await sleep(ms);
}

/** A fresh cluster filled to the same state as every other scenario's: the same start for all. */
async function freshCluster(ctx: Ctx, label: string, reclaimBytes: number, extra: Partial<ClusterOptions> = {}): Promise<{ cluster: Cluster; fill: FillSummary }> {
  const { opts } = ctx;
  const cluster = await startCluster({ version: ctx.version, ...extra });
  try {
    ctx.log(`${label}: etcd ${cluster.fullVersion} started in ${cluster.dir}; filling ${formatBytes(opts.inUseBytes)} in use + ${formatBytes(reclaimBytes)} reclaimable`);
    const f = await fill(cluster, { inUseBytes: opts.inUseBytes, reclaimableBytes: reclaimBytes, settleTimeoutMs: 120_000 });
    const s = summarizeFill(f);
    ctx.log(`${label}: filled in ${(s.elapsedMs / 1000).toFixed(1)} s: db ${formatBytes(s.dbSize)}, in use ${formatBytes(s.inUse)}, reclaimable ${formatBytes(s.reclaimable)}`);
    return { cluster, fill: s };
  } catch (err) {
    await cluster.stop();
    throw err;
  }
}

// ---------------------------------------------------------------------------------------------
// (a), (b), (c): a defragmentation of every member under load

export type DisruptionId = 'a' | 'b' | 'c';

export interface Disruption {
  id: DisruptionId;
  title: string;
  fullVersion: string;
  fill: FillSummary;
  members: string[];
  /** Leader (member name) just before the trigger. */
  leaderBefore: string;
  triggerAt: number;
  /** The last member's defrag finished (etcd's own log). */
  endAt: number;
  windowMs: number;
  defrags: DefragEvent[];
  /** Defrags of different members overlapped (expected only in (b)). */
  overlapped: boolean;
  load: LoadReport;
  probe: ProbeReport;
  /** Failed writes over the whole measured run (pre-roll + window + tail). */
  writesFailed: number;
  writesSent: number;
  /** Writes sent between the trigger and the end of the window, and how many of them failed. */
  windowSent: number;
  windowFailed: number;
  gapMs: number;
  gapFrom: number;
  /** Latency of writes sent in the window until their answer, failures included (at most the deadline). */
  p50Ms: number;
  p99Ms: number;
  blockedMs: Record<string, number>;
  notes: string[];
  /** (c) only: time between one member's defrag end and the next one's start, summed (the hand-overs). */
  handoverMs?: number;
  /** (c) only: the daemons' coordination.settle. */
  settleMs?: number;
}

/**
 * Runs the write load and the read probes, waits for `triggerAt` (default: after the pre-roll),
 * runs `act` (which returns when the maintenance is over), keeps measuring for the tail, and
 * computes the figures. The window ends when the last member's defrag finished, per etcd's logs.
 */
async function measure(
  ctx: Ctx,
  cluster: Cluster,
  act: () => Promise<string[]>,
  triggerAt?: number,
): Promise<Omit<Disruption, 'id' | 'title' | 'fill'>> {
  const { opts } = ctx;
  const leaderBefore = (await cluster.leader()).name;
  const load = startWriteLoad(cluster, { ratePerSec: opts.ratePerSec, deadlineMs: opts.deadlineMs });
  const probe = startReadProbe(cluster, { ratePerSec: opts.probeRatePerSec, kind: 'serializable' });
  let notes: string[] = [];
  let failure: unknown;
  const trigger = triggerAt ?? now() + opts.preRollMs;
  try {
    await sleepUntil(trigger);
    try {
      notes = await act();
    } catch (err) {
      failure = err;
    }
    await sleep(opts.tailMs);
  } finally {
    await Promise.all([load.stop(), probe.stop()]);
  }
  if (failure) throw failure;
  const report = await load.stop();
  const probeReport = await probe.stop();
  const defrags = await allDefragEvents(cluster);
  const endAt = defrags.length ? Math.max(...defrags.map((d) => (d.end ?? new Date()).getTime())) : trigger;
  let overlapped = false;
  try {
    assertNoOverlap(defrags);
  } catch {
    overlapped = true;
  }
  const inWindow = report.requests.filter((r) => r.t0 >= trigger && r.t0 <= endAt);
  const lat = inWindow.map((r) => r.t1 - r.t0).sort((a, b) => a - b);
  const gap = report.longestGap();
  return {
    fullVersion: cluster.fullVersion,
    members: cluster.members.map((m) => m.name),
    leaderBefore,
    triggerAt: trigger,
    endAt,
    windowMs: endAt - trigger,
    defrags,
    overlapped,
    load: report,
    probe: probeReport,
    writesFailed: report.failed,
    writesSent: report.total,
    windowSent: inWindow.length,
    windowFailed: inWindow.filter((r) => !r.ok).length,
    gapMs: gap.ms,
    gapFrom: gap.from,
    p50Ms: percentile(lat, 50),
    p99Ms: percentile(lat, 99),
    blockedMs: probeReport.longestBlockedMs(),
    notes,
  };
}

function etcdctlNote(what: string, r: { code: number | null; stdout: string; stderr: string }, ms: number): string {
  const out = `${r.stdout}\n${r.stderr}`.trim().split('\n').filter(Boolean);
  const failed = out.filter((l) => /fail|error/i.test(l));
  return `${what}: exit ${r.code} after ${(ms / 1000).toFixed(1)} s${failed.length ? `; ${failed.slice(0, 3).join('; ')}` : ''}`;
}

/** (a) The cron line on one node: `etcdctl defrag --cluster`. */
export function scenarioA(ctx: Ctx): Promise<Disruption> {
  return etcdctlDefrag(ctx, 'a', '(a) `etcdctl defrag --cluster` from one node', 'etcdctl defrag --cluster from m0 after the pre-roll', (c) => [c.members[0]!]);
}

/** (b) The same cron line on all three nodes in the same minute. */
export function scenarioB(ctx: Ctx): Promise<Disruption> {
  return etcdctlDefrag(ctx, 'b', '(b) the same command from all three nodes at once', 'three etcdctl defrag --cluster at once, one per node', (c) => c.members);
}

/** `etcdctl defrag --cluster` on each of the `nodes` at the same instant, measured. */
async function etcdctlDefrag(ctx: Ctx, id: 'a' | 'b', title: string, what: string, nodes: (c: Cluster) => Member[]): Promise<Disruption> {
  const label = `(${id})`;
  const { cluster, fill: f } = await freshCluster(ctx, label, ctx.opts.reclaimBytes);
  try {
    ctx.log(`${label}: measuring; ${what}`);
    const m = await measure(ctx, cluster, async () => {
      const t0 = now();
      return Promise.all(
        nodes(cluster).map(async (mem) => {
          const r = await cluster.etcdctl(['defrag', '--cluster'], { member: mem, timeoutMs: ETCDCTL_TIMEOUT_MS });
          return etcdctlNote(`etcdctl on ${mem.name}`, r, now() - t0);
        }),
      );
    });
    logWindow(ctx, label, m);
    return { id, title, fill: f, ...m };
  } finally {
    await cluster.stop();
  }
}

function logWindow(ctx: Ctx, label: string, m: { windowMs: number; writesFailed: number; gapMs: number }): void {
  ctx.log(`${label}: window ${(m.windowMs / 1000).toFixed(1)} s, ${m.writesFailed} writes failed, longest gap ${(m.gapMs / 1000).toFixed(2)} s`);
}

/** (c) etcd-defragd on all three nodes, their schedules firing at the same second. */
export async function scenarioC(ctx: Ctx): Promise<Disruption> {
  const title = '(c) etcd-defragd on all three nodes, triggered at the same instant';
  const { cluster, fill: f } = await freshCluster(ctx, '(c)', ctx.opts.reclaimBytes);
  let daemons: CliProcess[] = [];
  try {
    // The daemons run before the measurement, as in production; their schedules fire at T.
    // 60 s of lead: on a shared machine at load 24 three daemons took more than 25 s to start.
    const T = Math.ceil((Date.now() + 60_000) / 1000) * 1000;
    const settings: Settings = {
      schedule: { cron: cronAt(T) },
      policy: { force: true },
      metrics: { listen: '' },
    };
    ctx.log(`(c): starting three daemons, schedule "${cronAt(T)}" (UTC) = ${new Date(T).toISOString()}`);
    daemons = await startDaemons(cluster, settings, ctx.cliJs);
    const eff = await effectiveConfig(ctx.cliJs, writeBenchConfig(cluster, cluster.members[0]!, settings));
    ctx.log(`(c): daemons ready ${((T - Date.now()) / 1000).toFixed(1)} s before the scheduled instant`);
    const starts = daemonEvents(cluster, daemons, 'daemon.start');
    const wrong = starts.filter((s) => s.nextRun !== new Date(T).toISOString());
    if (wrong.length) throw new Error(`daemon's next run is not the scheduled instant ${new Date(T).toISOString()}: ${wrong.map((w) => String(w.nextRun)).join(', ')}`);
    if (Date.now() > T - 1000) throw new Error('the daemons took too long to start: less than 1 s left before the scheduled instant');
    const preRoll = Math.min(ctx.opts.preRollMs, T - Date.now());
    await sleepUntil(T - preRoll);
    ctx.log(`(c): measuring; the schedules fire at ${new Date(T).toISOString()}`);
    const m = await measure(
      ctx,
      cluster,
      async () => {
        const results = await Promise.all(daemons.map((d) => d.waitForJson<LogLine>((l) => l.event === 'run.done' || l.event === 'run.skip' || l.event === 'run.fail', ETCDCTL_TIMEOUT_MS)));
        return results.map((r, i) => `daemon on ${cluster.members[i]!.name}: ${r.event} (${String(r.outcome ?? '')}) ${((r.time - T) / 1000).toFixed(1)} s after the trigger: ${r.msg}`);
      },
      T,
    );
    const runStarts = daemonEvents(cluster, daemons, 'run.start');
    if (runStarts.length) {
      m.notes.unshift(`runs started ${runStarts.map((r) => `${r.node} +${r.time - T} ms`).join(', ')} after the scheduled instant`);
    }
    const transfers = daemonEvents(cluster, daemons, 'leader.transfer');
    for (const t of transfers) m.notes.push(`${t.node}: moved leadership ${String(t.from)} -> ${String(t.to)} in ${String(t.tookMs)} ms, ${((t.time - T) / 1000).toFixed(1)} s after the trigger`);
    // Hand-overs: from one member's defrag end to the next one's start (settle pause, turn poll,
    // the next daemon's checks and leader transfer).
    const sorted = [...m.defrags].sort((x, y) => x.start.getTime() - y.start.getTime());
    let handoverMs = 0;
    for (let i = 1; i < sorted.length; i++) handoverMs += Math.max(0, sorted[i]!.start.getTime() - (sorted[i - 1]!.end ?? sorted[i]!.start).getTime());
    const settleMs = eff.coordination.settle;
    logWindow(ctx, '(c)', m);
    const defragged = m.defrags.map((d) => d.member).sort().join(',');
    if (defragged !== cluster.members.map((x) => x.name).sort().join(',')) m.notes.push(`WARNING: members defragmented: ${defragged || 'none'} (expected each member once)`);
    return { id: 'c', title, fill: f, ...m, handoverMs, settleMs };
  } finally {
    await stopDaemons(daemons);
    await cluster.stop();
  }
}

// ---------------------------------------------------------------------------------------------
// (d) NOSPACE

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
      recovery = variant === 'cron' ? await cronRecovery(ctx, cluster, watch, timeline) : await daemonRecovery(ctx, cluster, daemons, watch, compactAt, externalCompaction);
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
    ctx.log(`${label}: ${recoveredAt !== undefined ? `writes accepted ${((recoveredAt - alarmAt) / 1000).toFixed(1)} s after the alarm` : gaveUp}`);
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
async function startNoSpaceDaemons(ctx: Ctx, cluster: Cluster, variant: NoSpaceVariant, label: string, quota: number): Promise<{ daemons: CliProcess[]; checkIntervalMs: number }> {
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
  const checkIntervalMs = (await effectiveConfig(ctx.cliJs, writeBenchConfig(cluster, cluster.members[0]!, settings))).nospace.checkInterval;
  ctx.log(`${label}: starting three daemons (quota ${formatBytes(quota)} read from etcd, nospace.checkInterval ${checkIntervalMs / 1000} s)`);
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
async function churnUntilNoSpace(ctx: Ctx, cluster: Cluster, load: RunningLoad<LoadReport>, label: string, quota: number): Promise<{ alarmAt: number; churnWritten: number }> {
  const keySpace = Math.max(16, Math.round((0.01 * ctx.opts.inUseBytes) / DEFAULT_VALUE_BYTES));
  ctx.log(`${label}: churning ${keySpace} keys until etcd refuses writes (quota ${formatBytes(quota)})`);
  const churn = startWriteLoad(cluster, { ratePerSec: 400, deadlineMs: 10_000, keyPrefix: 'churn/', keySpace, valueBytes: DEFAULT_VALUE_BYTES, maxInFlight: 16 });
  let alarmAt: number;
  const churnDeadline = Date.now() + 15 * 60_000;
  for (;;) {
    const t = [firstAnswer(churn.records, refusedNoSpace), firstAnswer(load.records, refusedNoSpace)].filter((x): x is number => x !== undefined);
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
  return { gaveUp: `writes still refused ${((now() - w.alarmAt) / 1000).toFixed(0)} s after the alarm, ${(opts.cronObserveMs / 1000).toFixed(0)} s after the cron's defrag ended` };
}

/**
 * (d daemon) Waits for the daemons to get writes accepted again, at most `recoveryTimeoutMs`; gives
 * up early when one daemon said twice after the compaction (if any) that the alarm cannot be cleared.
 */
async function daemonRecovery(ctx: Ctx, cluster: Cluster, daemons: CliProcess[], w: Watch, compactAt: number, externalCompaction: boolean): Promise<Recovery> {
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
      return { gaveUp: `stuck: the daemon on ${stuck[0]} reported twice after the ${externalCompaction ? 'compaction' : 'alarm'}: ${last.msg}` };
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
  const interesting = new Set(['alarm.nospace', 'compact', 'compact.fail', 'leader.transfer', 'nospace.blocked', 'nospace.disarm', 'nospace.recovered', 'nospace.unattended', 'run.skip', 'run.fail', 'defrag.fail']);
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

// ---------------------------------------------------------------------------------------------
// Idle footprint

export interface IdleResult {
  fullVersion: string;
  /** Milliseconds from spawn to the first log line. */
  firstLineMs: number;
  /** Private (anonymous) resident memory, max over the samples; the rest of RSS is file pages of the executable. */
  rssAnonMaxBytes: number;
  /** Lines that are not log lines (a runtime warning): journald would store them at warning priority. */
  strayLines: string[];
  footprint: Footprint;
  sampleMs: number;
  rssMaxBytes: number;
  rssMeanBytes: number;
  /** CPU time over the sample as a share of one core (0.01 = 1%). */
  cpuShare: number;
  cpuMs: number;
  command: string;
}

function clockTicks(): number {
  try {
    return Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).trim()) || 100;
  } catch {
    return 100;
  }
}

/** The process and its descendants (Linux /proc). */
function processTree(root: number): number[] {
  const children = new Map<number, number[]>();
  for (const e of readdirSync('/proc')) {
    if (!/^\d+$/.test(e)) continue;
    try {
      const st = readFileSync(`/proc/${e}/stat`, 'utf8');
      const ppid = Number(st.slice(st.lastIndexOf(')') + 2).split(' ')[1]);
      const list = children.get(ppid) ?? [];
      list.push(Number(e));
      children.set(ppid, list);
    } catch {
      /* gone */
    }
  }
  const out: number[] = [];
  const walk = (p: number): void => {
    out.push(p);
    for (const c of children.get(p) ?? []) walk(c);
  };
  walk(root);
  return out;
}

function rssBytes(pids: number[], field: 'VmRSS' | 'RssAnon' = 'VmRSS'): number {
  let sum = 0;
  for (const p of pids) {
    try {
      const m = new RegExp(`${field}:\\s+(\\d+) kB`).exec(readFileSync(`/proc/${p}/status`, 'utf8'));
      if (m) sum += Number(m[1]) * 1024;
    } catch {
      /* gone */
    }
  }
  return sum;
}

function cpuTicks(pids: number[]): number {
  let sum = 0;
  for (const p of pids) {
    try {
      const st = readFileSync(`/proc/${p}/stat`, 'utf8');
      const f = st.slice(st.lastIndexOf(')') + 2).split(' ');
      // fields after the comm: state(0) ppid(1) ... utime(11) stime(12)
      sum += Number(f[11]) + Number(f[12]);
    } catch {
      /* gone */
    }
  }
  return sum;
}

/** How the idle daemon is started: a file, its arguments before `run --config FILE`, environment. */
export interface Launch {
  command: string;
  file: string;
  args: string[];
  env: Record<string, string>;
  footprint: Footprint;
}

/** The compiled build under node, with `nodeFlags`, as the old unit started it. */
export function nodeLaunch(cliJs: string, nodeFlags: string[], footprint: Footprint): Launch {
  return {
    command: ['node', ...nodeFlags, relative(REPO_ROOT, cliJs), 'run', '--config', 'FILE'].join(' '),
    file: process.execPath, args: [...nodeFlags, cliJs], env: { NODE_ENV: 'production' }, footprint,
  };
}

/** One daemon running against a healthy cluster with nothing to do. */
export async function idleFootprint(ctx: Ctx, launch: Launch): Promise<IdleResult> {
  const { opts } = ctx;
  const cluster = await startCluster({ version: ctx.version });
  try {
    const config = writeBenchConfig(cluster, cluster.members[0]!, { schedule: { cron: NEVER }, metrics: { listen: '127.0.0.1:0' } }, 'bench-idle.yaml');
    const d = startDaemonProcess(launch.file, launch.args, config, launch.env);
    const command = launch.command;
    try {
      await d.started;
      const firstLineMs = await d.firstLineMs;
      ctx.log(`idle: \`${command}\` (pid ${d.pid}) started; warm-up ${opts.idleWarmupMs / 1000} s, then sampling ${opts.idleSampleMs / 1000} s`);
      await sleep(opts.idleWarmupMs);
      const hz = clockTicks();
      const tree0 = processTree(d.pid);
      const cpu0 = cpuTicks(tree0);
      const t0 = now();
      const samples: number[] = [];
      const anon: number[] = [];
      while (now() - t0 < opts.idleSampleMs) {
        samples.push(rssBytes(processTree(d.pid)));
        anon.push(rssBytes(processTree(d.pid), 'RssAnon'));
        await sleep(Math.min(1000, Math.max(0, opts.idleSampleMs - (now() - t0))));
      }
      samples.push(rssBytes(processTree(d.pid)));
      const cpu1 = cpuTicks(processTree(d.pid));
      const elapsed = now() - t0;
      const cpuMs = ((cpu1 - cpu0) / hz) * 1000;
      const strayLines = d.output().split('\n').filter((l) => l && !l.startsWith('{'));
      const res: IdleResult = {
        fullVersion: cluster.fullVersion,
        firstLineMs,
        rssAnonMaxBytes: Math.max(...anon),
        strayLines,
        footprint: launch.footprint,
        sampleMs: elapsed,
        rssMaxBytes: Math.max(...samples),
        rssMeanBytes: samples.reduce((a, b) => a + b, 0) / samples.length,
        cpuShare: cpuMs / elapsed,
        cpuMs,
        command,
      };
      if (/"level":(50|60)/.test(d.output())) throw new Error(`the idle daemon logged errors:\n${d.output()}`);

      ctx.log(`idle: RSS max ${formatBytes(res.rssMaxBytes)}, CPU ${(res.cpuShare * 100).toFixed(2)}% of one core`);
      return res;
    } finally {
      await d.stop();
    }
  } finally {
    await cluster.stop();
  }
}
