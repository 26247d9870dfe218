// (time, revision) samples of the cluster's revision, taken from answers the daemon gets anyway
// (the alarm check every nospace.checkInterval, and every inspection). NOSPACE recovery compacts to
// the revision seen nospace.keepHistory before the alarm, which keeps as much history as the API
// server would have kept.

export interface RevisionSample {
  at: number; // ms since epoch
  revision: bigint;
}

export class RevisionLog {
  private readonly samples: RevisionSample[] = [];
  /** While set, the newest sample taken at or before this time is never pruned (an alarm needs it). */
  private holdAt: number | undefined;

  /** @param keepMs how far back samples are kept; @param minGapMs samples closer than this are merged */
  constructor(
    private keepMs: number,
    private readonly minGapMs = 5000,
  ) {}

  setKeep(ms: number): void {
    this.keepMs = ms;
  }

  /** Keeps the sample from before `time` however long the alarm lasts; undefined releases it. */
  hold(time: number | undefined): void {
    this.holdAt = time;
  }

  /** Samples come from one member; a revision that goes back means etcd was restored: start over. */
  record(at: number, revision: bigint): void {
    if ((this.samples.at(-1)?.revision ?? revision) > revision) this.samples.length = 0;
    const last = this.samples.at(-1);
    if (last && at - last.at < this.minGapMs) return; // runs inspect often; a sample every few seconds is plenty
    this.samples.push({ at, revision });
    // One sample older than the window is kept: it answers "the revision keepMs ago".
    while (
      this.samples.length > 2 &&
      this.samples[1]!.at <= at - this.keepMs &&
      !(this.holdAt !== undefined && this.samples[1]!.at > this.holdAt)
    )
      this.samples.shift();
  }

  /** The newest sample taken at or before `time`, if any. */
  atOrBefore(time: number): RevisionSample | undefined {
    let found: RevisionSample | undefined;
    for (const s of this.samples) {
      if (s.at > time) break;
      found = s;
    }
    return found;
  }

  oldest(): RevisionSample | undefined {
    return this.samples[0];
  }
}
