// Scenarios (a), (b), (c): a defragmentation of every member under load, measured the same way:
// (a) the old cron line on one node, (b) the same on all three at once, (c) etcd-defragd on all three.
import { setTimeout as sleep } from 'node:timers/promises';
import type { Cluster } from '../test/harness/cluster.ts';
import { allDefragEvents, assertNoOverlap, type DefragEvent } from '../test/harness/defrag-log.ts';
import type { LogLine } from '../test/harness/defragd.ts';
import { now, percentile, startReadProbe, startWriteLoad, type LoadReport, type ProbeReport } from '../test/harness/load.ts';
import type { Member } from '../test/harness/member.ts';
import type { CliProcess } from '../test/harness/proc.ts';
import { cronAt, daemonEvents, effectiveConfig, startDaemons, stopDaemons, writeBenchConfig, type Settings } from './daemons.ts';
import { ETCDCTL_TIMEOUT_MS, etcdctlNote, freshCluster, sleepUntil, type Ctx, type FillSummary } from './scenarios.ts';

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
  /** (c) only: each hand-over, from one member's defrag end to the next one's start, in order. */
  handovers?: number[];
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

/** (a) The cron line on one node: `etcdctl defrag --cluster`. */
export function scenarioA(ctx: Ctx): Promise<Disruption> {
  return etcdctlDefrag(
    ctx,
    'a',
    '(a) `etcdctl defrag --cluster` from one node',
    'etcdctl defrag --cluster from m0 after the pre-roll',
    (c) => [c.members[0]!],
  );
}

/** (b) The same cron line on all three nodes in the same minute. */
export function scenarioB(ctx: Ctx): Promise<Disruption> {
  return etcdctlDefrag(
    ctx,
    'b',
    '(b) the same command from all three nodes at once',
    'three etcdctl defrag --cluster at once, one per node',
    (c) => c.members,
  );
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
  ctx.log(
    `${label}: window ${(m.windowMs / 1000).toFixed(1)} s, ${m.writesFailed} writes failed, longest gap ${(m.gapMs / 1000).toFixed(2)} s`,
  );
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
    if (wrong.length)
      throw new Error(
        `daemon's next run is not the scheduled instant ${new Date(T).toISOString()}: ${wrong.map((w) => String(w.nextRun)).join(', ')}`,
      );
    if (Date.now() > T - 1000) throw new Error('the daemons took too long to start: less than 1 s left before the scheduled instant');
    const preRoll = Math.min(ctx.opts.preRollMs, T - Date.now());
    await sleepUntil(T - preRoll);
    ctx.log(`(c): measuring; the schedules fire at ${new Date(T).toISOString()}`);
    const m = await measure(
      ctx,
      cluster,
      async () => {
        const results = await Promise.all(
          daemons.map((d) =>
            d.waitForJson<LogLine>((l) => l.event === 'run.done' || l.event === 'run.skip' || l.event === 'run.fail', ETCDCTL_TIMEOUT_MS),
          ),
        );
        return results.map(
          (r, i) =>
            `daemon on ${cluster.members[i]!.name}: ${r.event} (${String(r.outcome ?? '')}) ${((r.time - T) / 1000).toFixed(1)} s after the trigger: ${r.msg}`,
        );
      },
      T,
    );
    const runStarts = daemonEvents(cluster, daemons, 'run.start');
    if (runStarts.length) {
      m.notes.unshift(`runs started ${runStarts.map((r) => `${r.node} +${r.time - T} ms`).join(', ')} after the scheduled instant`);
    }
    const transfers = daemonEvents(cluster, daemons, 'leader.transfer');
    for (const t of transfers)
      m.notes.push(
        `${t.node}: moved leadership ${String(t.from)} -> ${String(t.to)} in ${String(t.tookMs)} ms, ${((t.time - T) / 1000).toFixed(1)} s after the trigger`,
      );
    // Hand-overs: from one member's defrag end to the next one's start (settle pause, turn poll,
    // the next daemon's checks and leader transfer).
    const sorted = [...m.defrags].sort((x, y) => x.start.getTime() - y.start.getTime());
    const handovers: number[] = [];
    for (let i = 1; i < sorted.length; i++)
      handovers.push(Math.max(0, sorted[i]!.start.getTime() - (sorted[i - 1]!.end ?? sorted[i]!.start).getTime()));
    const settleMs = eff.coordination.settle;
    logWindow(ctx, '(c)', m);
    const defragged = m.defrags
      .map((d) => d.member)
      .sort()
      .join(',');
    if (
      defragged !==
      cluster.members
        .map((x) => x.name)
        .sort()
        .join(',')
    )
      m.notes.push(`WARNING: members defragmented: ${defragged || 'none'} (expected each member once)`);
    return { id: 'c', title, fill: f, ...m, handovers, settleMs };
  } finally {
    await stopDaemons(daemons);
    await cluster.stop();
  }
}
