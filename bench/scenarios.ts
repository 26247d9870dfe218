// What every benchmark scenario shares: its context, a fresh cluster filled to the same start
// state, and how an etcdctl run is noted. The scenarios are disruption.ts ((a), (b), (c)),
// nospace.ts ((d)) and idle.ts; cluster start, fill, write load and read probes are the integration
// tests' harness (test/harness/); the scenarios only string them together and measure.
import { setTimeout as sleep } from 'node:timers/promises';
import { formatBytes } from '../src/units.ts';
import { startCluster, type Cluster, type ClusterOptions } from '../test/harness/cluster.ts';
import { fill, type FillResult } from '../test/harness/data.ts';
import type { EtcdVersion } from '../test/harness/etcd-bin.ts';
import { now } from '../test/harness/load.ts';
import type { BenchOptions } from './options.ts';

/** etcdctl's --command-timeout and our patience for one etcdctl defrag command. */
export const ETCDCTL_TIMEOUT_MS = 20 * 60_000;

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

export async function sleepUntil(t: number): Promise<void> {
  const ms = t - now();
  if (ms > 0) await sleep(ms);
}

/** A fresh cluster filled to the same state as every other scenario's: the same start for all. */
export async function freshCluster(
  ctx: Ctx,
  label: string,
  reclaimBytes: number,
  extra: Partial<ClusterOptions> = {},
): Promise<{ cluster: Cluster; fill: FillSummary }> {
  const { opts } = ctx;
  const cluster = await startCluster({ version: ctx.version, ...extra });
  try {
    ctx.log(
      `${label}: etcd ${cluster.fullVersion} started in ${cluster.dir}; filling ${formatBytes(opts.inUseBytes)} in use + ${formatBytes(reclaimBytes)} reclaimable`,
    );
    const f = await fill(cluster, { inUseBytes: opts.inUseBytes, reclaimableBytes: reclaimBytes, settleTimeoutMs: 120_000 });
    const s = summarizeFill(f);
    ctx.log(
      `${label}: filled in ${(s.elapsedMs / 1000).toFixed(1)} s: db ${formatBytes(s.dbSize)}, in use ${formatBytes(s.inUse)}, reclaimable ${formatBytes(s.reclaimable)}`,
    );
    return { cluster, fill: s };
  } catch (err) {
    await cluster.stop();
    throw err;
  }
}

export function etcdctlNote(what: string, r: { code: number | null; stdout: string; stderr: string }, ms: number): string {
  const out = `${r.stdout}\n${r.stderr}`.trim().split('\n').filter(Boolean);
  const failed = out.filter((l) => /fail|error/i.test(l));
  return `${what}: exit ${r.code} after ${(ms / 1000).toFixed(1)} s${failed.length ? `; ${failed.slice(0, 3).join('; ')}` : ''}`;
}
