// How long the next defragment of the local member will take, learned from that member's own
// past defragments (policy.maxDefragDuration). Pure: the daemon feeds it the member's /metrics page
// at every alarm check and its own runs, on its own clock.
//
// A defragment copies the data in use into a new file (etcd's defragdb walks every key; free pages
// are never read), so its time follows the in-use size, not the file size: rates are in-use bytes
// per second.
import type { ServerMetrics } from './etcd.ts';
import { formatBytes } from './units.ts';

export interface DefragPrediction {
  seconds: number;
  /** What it stands on, for the log and the skip reason. */
  basis: string;
}

/**
 * Defragments of less data than this teach nothing about the rate: opening, syncing and renaming
 * the file take tens of milliseconds whatever the size, so a tiny defragment looks slow and would
 * make every prediction too long.
 */
export const MIN_SAMPLE_BYTES = 16 * 1024 * 1024;
/** The last defragments kept: the disk and the load of recent weeks, not of last year. */
export const KEEP_SAMPLES = 8;

interface Sample {
  at: number;
  bytesPerSecond: number;
  /** etcd's own histogram, or a run of ours timed until the member had caught up. */
  source: 'etcd' | 'run';
}

export class DefragDurations {
  private samples: Sample[] = [];
  /** The histogram and in-use size of the previous page. */
  private last: { count: number; seconds: number; inUse: number | undefined } | undefined;
  /** Our last run, until the page shows etcd's own timing of the same defragment. */
  private pendingRun: Sample | undefined;

  /**
   * One /metrics page of the local member. etcd_disk_backend_defrag_duration_seconds counts every
   * defragment of the member (ours, etcdctl's, anyone's): when its count grew since the previous
   * page, the growth of its sum is their time, and the previous page's in-use size their data.
   */
  observePage(at: number, page: ServerMetrics): void {
    const { defragCount: count, defragSeconds: seconds } = page;
    if (count === undefined || seconds === undefined) return;
    const prev = this.last;
    this.last = { count, seconds, inUse: page.dbSizeInUse };
    if (!prev) return;
    if (count < prev.count || seconds < prev.seconds) {
      // etcd restarted (its counters start again): often an upgrade, or a restore onto other
      // disks, and 3.4 and 3.5 defragment at quite different speeds. Learn again.
      this.samples = [];
      this.pendingRun = undefined;
      return;
    }
    const n = count - prev.count;
    if (n === 0 || prev.inUse === undefined) return;
    // etcd timed the defragment our run just reported more closely (without the catch-up after it).
    if (this.pendingRun) this.samples = this.samples.filter((s) => s !== this.pendingRun);
    this.pendingRun = undefined;
    this.add({ at, bytes: prev.inUse, seconds: (seconds - prev.seconds) / n, source: 'etcd' });
  }

  /** A defragment of ours: `bytes` in use before it, `ms` until the member answered and caught up. */
  observeRun(at: number, bytes: number, ms: number): void {
    // The page may already have shown it (the alarm check runs while we wait for the catch-up).
    if (this.samples.some((s) => s.source === 'etcd' && s.at >= at - ms)) return;
    const sample = this.add({ at, bytes, seconds: ms / 1000, source: 'run' });
    if (sample) this.pendingRun = sample;
  }

  /**
   * The time to defragment `inUseBytes`, at the slowest quarter of the rates learned (the slowest
   * of up to four): a defragment's speed varies with the disk and the load on it, and a skipped
   * run costs one more try later, while a prediction too short can cost a member restarted by its
   * liveness probe in the middle of a defragment. Undefined until a defragment was seen.
   */
  predict(inUseBytes: number): DefragPrediction | undefined {
    if (this.samples.length === 0) return undefined;
    const rates = this.samples.map((s) => s.bytesPerSecond).sort((a, b) => a - b);
    const rate = rates[Math.floor((rates.length - 1) / 4)]!;
    const fromEtcd = this.samples.filter((s) => s.source === 'etcd').length;
    const sources = [
      fromEtcd ? `${fromEtcd} timed by etcd` : '',
      fromEtcd < this.samples.length ? `${this.samples.length - fromEtcd} by etcd-defragd` : '',
    ].filter(Boolean);
    return {
      seconds: inUseBytes / rate,
      basis:
        `${formatBytes(inUseBytes)} in use at ${formatBytes(rate)}/s, the slowest quarter of the last ` +
        `${this.samples.length} defragment${this.samples.length > 1 ? 's' : ''} of this member (${sources.join(', ')})`,
    };
  }

  private add(s: { at: number; bytes: number; seconds: number; source: Sample['source'] }): Sample | undefined {
    if (s.bytes < MIN_SAMPLE_BYTES || !(s.seconds > 0)) return undefined;
    const sample = { at: s.at, bytesPerSecond: s.bytes / s.seconds, source: s.source };
    this.samples.push(sample);
    if (this.samples.length > KEEP_SAMPLES) this.samples.shift();
    return sample;
  }
}
