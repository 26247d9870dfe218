// Scenario (u): what `etcd-defragd usage` costs a loaded cluster (issue 18 point 3): how long it
// takes to read the whole keyspace, and the longest write gap while it runs, against the same
// load's longest gap over the same length of time just before it. The config points at the leader
// (the worst case for the node it runs on): usage must then read from a follower.
import { setTimeout as sleep } from 'node:timers/promises';
import { now, percentile, startReadProbe, startWriteLoad, type RequestRecord } from '../test/harness/load.ts';
import { runCli } from '../test/harness/proc.ts';
import { unitNodeFlags, writeBenchConfig } from './daemons.ts';
import { freshCluster, type Ctx, type FillSummary } from './scenarios.ts';

export interface UsageRun {
  fullVersion: string;
  fill: FillSummary;
  code: number | null;
  /** From usage --json. */
  keys: number;
  bytes: number;
  pages: number;
  /** usage's own figure, from its first Status to its last page. */
  scanMs: number;
  /** The whole command, process start to exit. */
  commandMs: number;
  /** Member read from: role and endpoint, and whether it was the leader etcd.endpoint named. */
  source: string;
  /** Write figures during the command, and over as long a time just before it (at most since the load started). */
  during: WindowFigures;
  before: WindowFigures;
  beforeMs: number;
  /** Longest time a serializable read probe waited, per member, over the whole run. */
  blockedMs: Record<string, number>;
  notes: string[];
}

export interface WindowFigures {
  sent: number;
  failed: number;
  gapMs: number;
  p99Ms: number;
}

/** Writes sent in [from, to]: how many, how many failed, the longest time without a success, p99 latency. */
function figures(records: readonly RequestRecord[], from: number, to: number): WindowFigures {
  const sent = records.filter((r) => r.t0 >= from && r.t0 <= to);
  const oks = records
    .filter((r) => r.ok && r.t1 >= from && r.t1 <= to)
    .map((r) => r.t1)
    .sort((a, b) => a - b);
  let gapMs = 0;
  let prev = from;
  for (const t of [...oks, to]) {
    gapMs = Math.max(gapMs, t - prev);
    prev = Math.max(prev, t);
  }
  const lat = sent.map((r) => r.t1 - r.t0).sort((a, b) => a - b);
  return { sent: sent.length, failed: sent.filter((r) => !r.ok).length, gapMs, p99Ms: percentile(lat, 99) };
}

export async function scenarioUsage(ctx: Ctx): Promise<UsageRun> {
  const { opts } = ctx;
  const { cluster, fill } = await freshCluster(ctx, '(u)', 0);
  try {
    const leader = await cluster.leader();
    const cfg = writeBenchConfig(cluster, leader, {}, 'bench-usage.yaml');
    const load = startWriteLoad(cluster, { ratePerSec: opts.ratePerSec, deadlineMs: opts.deadlineMs });
    const probe = startReadProbe(cluster, { ratePerSec: opts.probeRatePerSec, kind: 'serializable' });
    let r;
    let t0 = 0;
    let t1 = 0;
    try {
      await sleep(opts.preRollMs);
      // As long a stretch before as the command lasts, for the baseline: the pre-roll is short, so
      // the command starts once the load has run for at least as long as it will take (estimated
      // at 40 MiB/s, the scan's own bound, never less than the pre-roll).
      await sleep(Math.max(0, (fill.inUse / (40 * 1024 * 1024)) * 1000 - opts.preRollMs));
      ctx.log(`(u): etcd-defragd usage --json, etcd.endpoint = the leader ${leader.name}, under ${opts.ratePerSec} writes/s`);
      t0 = now();
      r = await runCli(['usage', '--json', '--config', cfg], {
        script: ctx.cliJs,
        nodeArgs: unitNodeFlags(),
        env: { NODE_ENV: 'production' },
        timeoutMs: 30 * 60_000,
      });
      t1 = now();
      await sleep(opts.tailMs);
    } finally {
      await Promise.all([load.stop(), probe.stop()]);
    }
    const writes = await load.stop();
    const reads = await probe.stop();
    const out =
      r.code === 0
        ? (JSON.parse(r.stdout) as {
            keys: number;
            bytes: number;
            pages: number;
            durationMs: number;
            source: { role: string; endpoint: string };
          })
        : undefined;
    const notes = out ? [] : [`usage exited ${r.code}: ${r.stderr.split('\n').slice(-3).join(' ')}`];
    const commandMs = t1 - t0;
    const beforeMs = Math.min(commandMs, t0 - writes.startedAt);
    ctx.log(`(u): usage exited ${r.code} after ${(commandMs / 1000).toFixed(1)} s`);
    return {
      fullVersion: cluster.fullVersion,
      fill,
      code: r.code,
      keys: out?.keys ?? NaN,
      bytes: out?.bytes ?? NaN,
      pages: out?.pages ?? NaN,
      scanMs: out?.durationMs ?? NaN,
      commandMs,
      source: out ? `${out.source.role} ${out.source.endpoint}${out.source.endpoint === leader.clientUrl ? ' (the leader)' : ''}` : 'n/a',
      during: figures(writes.requests, t0, t1),
      before: figures(writes.requests, t0 - beforeMs, t0),
      beforeMs,
      blockedMs: reads.longestBlockedMs(),
      notes,
    };
  } finally {
    await cluster.stop();
  }
}
