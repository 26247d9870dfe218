// What the local member's own /metrics page says over time: when its db will reach the quota
// (forecast.*), and whether anything compacts its history (compaction.*). Pure: the daemon feeds
// it a sample at every alarm check, on its own clock.
import type { Config } from './config.ts';
import { formatBytes, formatDuration } from './units.ts';

export interface MemberSample {
  at: number; // ms since epoch, the daemon's clock
  /** etcd_mvcc_db_total_size_in_bytes: the file NOSPACE is judged by. */
  dbSize: number;
  /** etcd_mvcc_db_total_size_in_use_in_bytes: live data and history not yet freed. */
  inUse: number;
  /** etcd_debugging_mvcc_compact_revision, when the page has it. */
  compactRevision?: number;
  /** etcd_debugging_mvcc_current_revision, when the page has it. */
  currentRevision?: number;
}

/** How soon one series reaches the quota at the rate it grows. */
export interface Reach {
  /** Seconds until the quota; undefined while the series does not grow. */
  seconds?: number;
  /** Bytes per second, as estimated (0 or below: not growing). */
  bytesPerSecond: number;
}

export interface Forecast {
  /** The sooner of the two, or undefined while neither grows. */
  seconds?: number;
  /** Which series reaches the quota first: the db file, or the data in use (what a defrag cannot free). */
  basis?: 'file' | 'in-use';
  file: Reach;
  inUse: Reach;
  quotaBytes: number;
  /** The span of the samples the forecast stands on. */
  spanSeconds: number;
}

/** Below this growth a series counts as flat: 1 KiB an hour would take 250 years to fill 2 GiB. */
const FLAT_BYTES_PER_SECOND = 1024 / 3600;
/** The samples kept for the forecast window: enough for a robust slope, few enough to compute it at every check. */
const WINDOW_SAMPLES = 240;

/**
 * Theil-Sen slope: the median of the slopes between every pair of points. Up to about 29% of the
 * points can be off (a burst, one late sample) without moving it. Only pairs `together` accepts
 * count: pairs on either side of a step (a defragment, a compaction) are not growth.
 */
export function theilSen(
  points: readonly { x: number; y: number }[],
  together: (i: number, j: number) => boolean = () => true,
): number | undefined {
  const slopes: number[] = [];
  for (let i = 0; i < points.length; i++)
    for (let j = i + 1; j < points.length; j++) {
      const dx = points[j]!.x - points[i]!.x;
      if (dx > 0 && together(i, j)) slopes.push((points[j]!.y - points[i]!.y) / dx);
    }
  if (slopes.length === 0) return undefined;
  slopes.sort((a, b) => a - b);
  const mid = slopes.length >> 1;
  return slopes.length % 2 ? slopes[mid]! : (slopes[mid - 1]! + slopes[mid]!) / 2;
}

function reach(headroom: number, bytesPerSecond: number): Reach {
  if (!(bytesPerSecond > FLAT_BYTES_PER_SECOND)) return { bytesPerSecond };
  return { seconds: Math.max(0, headroom) / bytesPerSecond, bytesPerSecond };
}

/**
 * The forecast from samples over forecast.window, or undefined while they span less than
 * forecast.minSpan.
 *
 * - The file only shrinks when a member is defragmented: its growth is measured between
 *   defragments (pairs that straddle a shrink do not count).
 * - In use drops at every compaction. With two or more compactions in the window (the API server
 *   compacts every 5 minutes, etcd's periodic auto-compaction hourly), the growth that lasts is
 *   that of the lows right after each compaction (the live data), and the quota is reached when a
 *   high (a low plus the history that accumulates until the next compaction) gets there. With
 *   fewer, nothing compacts regularly, and all growth between compactions lasts.
 */
export function forecast(samples: readonly MemberSample[], quotaBytes: number, now: number, minSpanMs: number): Forecast | undefined {
  if (samples.length < 3 || quotaBytes <= 0) return undefined;
  const first = samples[0]!;
  const last = samples.at(-1)!;
  const spanSeconds = (last.at - first.at) / 1000;
  if (last.at - first.at < minSpanMs) return undefined;
  const sinceLast = Math.max(0, now - last.at) / 1000;

  // The file: segments end where it shrank (a defragment).
  const fileSegment: number[] = [];
  samples.forEach((s, i) =>
    fileSegment.push(i > 0 && s.dbSize < samples[i - 1]!.dbSize ? fileSegment[i - 1]! + 1 : (fileSegment[i - 1] ?? 0)),
  );
  const fileRate = theilSen(
    samples.map((s) => ({ x: s.at / 1000, y: s.dbSize })),
    (i, j) => fileSegment[i] === fileSegment[j],
  );
  const file = reach(quotaBytes - last.dbSize - (fileRate ?? 0) * sinceLast, fileRate ?? 0);

  // In use: segments end where the compacted revision moved.
  const compactSegment: number[] = [];
  const lows: { x: number; y: number }[] = [{ x: first.at / 1000, y: first.inUse }];
  samples.forEach((s, i) => {
    const prev = samples[i - 1];
    const moved =
      prev !== undefined &&
      s.compactRevision !== undefined &&
      prev.compactRevision !== undefined &&
      s.compactRevision !== prev.compactRevision;
    compactSegment.push(moved ? compactSegment[i - 1]! + 1 : (compactSegment[i - 1] ?? 0));
    if (moved) lows.push({ x: s.at / 1000, y: s.inUse });
  });
  let inUse: Reach;
  if (lows.length >= 3) {
    // Regular compactions: the lows' trend, with the highest climb above a low as the margin.
    const rate = theilSen(lows) ?? 0;
    let climb = 0;
    let low = first.inUse;
    samples.forEach((s, i) => {
      if (i > 0 && compactSegment[i] !== compactSegment[i - 1]) low = s.inUse;
      climb = Math.max(climb, s.inUse - low);
    });
    const lastLow = lows.at(-1)!;
    const lowNow = lastLow.y + rate * (now / 1000 - lastLow.x);
    inUse = reach(quotaBytes - lowNow - climb, rate);
  } else {
    const rate = theilSen(
      samples.map((s) => ({ x: s.at / 1000, y: s.inUse })),
      (i, j) => compactSegment[i] === compactSegment[j],
    );
    inUse = reach(quotaBytes - last.inUse - (rate ?? 0) * sinceLast, rate ?? 0);
  }

  const soonest =
    file.seconds === undefined
      ? inUse.seconds === undefined
        ? undefined
        : ('in-use' as const)
      : inUse.seconds === undefined || file.seconds < inUse.seconds
        ? ('file' as const)
        : ('in-use' as const);
  return {
    seconds: soonest === 'file' ? file.seconds : soonest === 'in-use' ? inUse.seconds : undefined,
    basis: soonest,
    file,
    inUse,
    quotaBytes,
    spanSeconds,
  };
}

/** Samples over the last `windowMs`, thinned to at most WINDOW_SAMPLES so the slope stays cheap. */
export class SampleLog {
  private samples: MemberSample[] = [];
  constructor(private windowMs: number) {}

  setWindow(ms: number): void {
    this.windowMs = ms;
  }

  /** A db that went back in revision is another db (a restore): start over. */
  record(s: MemberSample): void {
    const last = this.samples.at(-1);
    if (last && s.currentRevision !== undefined && last.currentRevision !== undefined && s.currentRevision < last.currentRevision)
      this.samples = [];
    const minGap = this.windowMs / WINDOW_SAMPLES;
    // A step (a defragment, a compaction) is always kept: the forecast cuts its segments there.
    const step = last !== undefined && (s.dbSize < last.dbSize || s.compactRevision !== last.compactRevision);
    if (last && s.at - last.at < minGap && !step) return;
    this.samples.push(s);
    while (this.samples.length > 0 && this.samples[0]!.at < s.at - this.windowMs) this.samples.shift();
  }

  all(): readonly MemberSample[] {
    return this.samples;
  }

  clear(): void {
    this.samples = [];
  }
}

export interface CompactionState {
  /** Current revision minus compacted revision: the history etcd keeps. */
  historyRevisions: number;
  /** How long the compacted revision has not moved, on the daemon's clock (since it first saw it). */
  ageMs: number;
  /** Revisions written since the compacted revision last moved. */
  grownRevisions: number;
  /** Not moved for compaction.staleAfter while revisions grew. */
  stale: boolean;
}

/** Watches the compacted revision: when it last moved, and whether revisions grew since. */
export class CompactionWatch {
  private since: { at: number; compactRevision: number; currentRevision: number } | undefined;

  constructor(private staleAfterMs: number) {}

  setStaleAfter(ms: number): void {
    this.staleAfterMs = ms;
  }

  /** Undefined when the page does not carry the revision gauges. */
  observe(s: MemberSample): CompactionState | undefined {
    if (s.compactRevision === undefined || s.currentRevision === undefined) return undefined;
    if (!this.since || this.since.compactRevision !== s.compactRevision || s.currentRevision < this.since.currentRevision)
      this.since = { at: s.at, compactRevision: s.compactRevision, currentRevision: s.currentRevision };
    const ageMs = s.at - this.since.at;
    const grownRevisions = s.currentRevision - this.since.currentRevision;
    return {
      historyRevisions: s.currentRevision - s.compactRevision,
      ageMs,
      grownRevisions,
      stale: ageMs >= this.staleAfterMs && grownRevisions > 0,
    };
  }
}

/**
 * What a daemon publishes for `status` under `<prefix>trend/<member id>` every TREND_PUBLISH_MS:
 * the forecast and the compaction watch need hours of samples that only the daemon has.
 */
export interface TrendRecord {
  /** When it was written (ms since epoch, the daemon's clock). */
  at: number;
  forecast: { seconds: number | null; basis: 'file' | 'in-use' | null; fileBytesPerSecond: number; inUseBytesPerSecond: number } | null;
  compaction: { historyRevisions: number; ageSeconds: number; stale: boolean } | null;
}

export const TREND_PUBLISH_MS = 5 * 60_000;
/** A record older than this is from a daemon that stopped publishing: status says so instead of showing it. */
export const TREND_FRESH_MS = 3 * TREND_PUBLISH_MS;
export const trendPrefix = (prefix: string): string => `${prefix}trend/`;

export function trendRecord(at: number, f: Forecast | undefined, c: CompactionState | undefined): TrendRecord {
  return {
    at,
    forecast: f
      ? {
          seconds: f.seconds === undefined ? null : Math.round(f.seconds),
          basis: f.basis ?? null,
          fileBytesPerSecond: Math.round(f.file.bytesPerSecond),
          inUseBytesPerSecond: Math.round(f.inUse.bytesPerSecond),
        }
      : null,
    compaction: c ? { historyRevisions: c.historyRevisions, ageSeconds: Math.round(c.ageMs / 1000), stale: c.stale } : null,
  };
}

const num = (v: unknown): v is number => typeof v === 'number' && Number.isFinite(v);

/** Anyone who can write under the prefix can write here: a value that is not a record reads as none. */
export function parseTrendRecord(text: string): TrendRecord | undefined {
  let v: unknown;
  try {
    v = JSON.parse(text);
  } catch {
    return undefined;
  }
  if (typeof v !== 'object' || v === null) return undefined;
  const r = v as Record<string, unknown>;
  if (!num(r.at)) return undefined;
  const f = r.forecast as Record<string, unknown> | null;
  const c = r.compaction as Record<string, unknown> | null;
  const forecastOk =
    f === null ||
    (typeof f === 'object' &&
      (f.seconds === null || num(f.seconds)) &&
      (f.basis === null || f.basis === 'file' || f.basis === 'in-use') &&
      num(f.fileBytesPerSecond) &&
      num(f.inUseBytesPerSecond));
  const compactionOk =
    c === null || (typeof c === 'object' && num(c.historyRevisions) && num(c.ageSeconds) && typeof c.stale === 'boolean');
  if (!forecastOk || !compactionOk) return undefined;
  return {
    at: r.at,
    forecast: f && {
      seconds: f.seconds as number | null,
      basis: f.basis as 'file' | 'in-use' | null,
      fileBytesPerSecond: f.fileBytesPerSecond as number,
      inUseBytesPerSecond: f.inUseBytesPerSecond as number,
    },
    compaction: c && { historyRevisions: c.historyRevisions as number, ageSeconds: c.ageSeconds as number, stale: c.stale as boolean },
  };
}

/** What the next run does first, when the trend calls for a run before the schedule's. */
export interface EarlyRun {
  /** Why the forecast wants a defragment now (the run then needs only policy.minReclaimable). */
  forecast?: string;
  /** Nothing compacted the history since this compacted revision: compact it (compaction.fallback). */
  compaction?: { compactRevision: number; reason: string };
}

/**
 * A run before the schedule's: a fallback compaction when nothing compacts, a defragment when the
 * db file (what NOSPACE is judged by) is forecast to reach the quota within forecast.defragBefore
 * and a defragment gives back at least policy.minReclaimable. Each at most once per its own period
 * (`last`: when each was last asked for), so a run that cannot help is not started at every check.
 */
export function earlyRun(
  c: Pick<Config, 'forecast' | 'compaction' | 'policy'>,
  now: number,
  sample: MemberSample,
  f: Forecast | undefined,
  cs: CompactionState | undefined,
  last: { forecast: number; compaction: number },
): EarlyRun {
  const out: EarlyRun = {};
  if (cs?.stale && c.compaction.fallback && sample.compactRevision !== undefined && now - last.compaction >= c.compaction.staleAfter)
    out.compaction = { compactRevision: sample.compactRevision, reason: `nothing compacted the history for ${formatDuration(cs.ageMs)}` };
  const reclaimable = sample.dbSize - sample.inUse;
  const fileIn = f?.file.seconds;
  if (
    fileIn !== undefined &&
    fileIn * 1000 < c.forecast.defragBefore &&
    reclaimable >= c.policy.minReclaimable &&
    now - last.forecast >= c.forecast.minSpan
  )
    out.forecast =
      `the db file is forecast to reach the quota in ${formatDuration(fileIn * 1000)} ` +
      `(forecast.defragBefore ${formatDuration(c.forecast.defragBefore)}) and ${formatBytes(reclaimable)} can be reclaimed`;
  return out;
}
