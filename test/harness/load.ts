/**
 * Open-loop client load against a test cluster, measured per request.
 *
 * - startWriteLoad: puts at a fixed rate (round robin over members, one etcd3 client per member,
 *   no client retries, a deadline per request); the report tells how many failed, the longest time
 *   without a successful write, and latency percentiles.
 * - startReadProbe: a small read (Status by default) per member at a fixed rate; the report tells,
 *   per member, the longest time the member did not answer.
 *
 * Pacing: request i is due at start + i/rate (absolute schedule, so timers do not drift); if the
 * event loop falls behind, due requests are sent at once (up to a quarter second's worth, the rest
 * are counted as `skipped`). In-flight requests are bounded by the deadline and by maxInFlight
 * (excess slots are `skipped`), so nothing queues without bound.
 *
 * All times are epoch milliseconds with sub-millisecond precision (performance.timeOrigin +
 * performance.now()), comparable with Date.now() and with etcd log timestamps.
 */
import { performance } from 'node:perf_hooks';
import { randomBytes } from 'node:crypto';
import type { Etcd3 } from 'etcd3';
import { hexId } from '../../src/view.ts';
import type { Cluster } from './cluster.ts';
import { errorText } from './errors.ts';
import type { Member } from './member.ts';

export const now = (): number => performance.timeOrigin + performance.now();

/**
 * The error text without per-request details (timings, addresses, timestamps), for grouping:
 * "GRPCDeadlineExceededError: 4 DEADLINE_EXCEEDED: Deadline exceeded after 1.001s,LB pick: 0.001s,remote_addr=..."
 * becomes "GRPCDeadlineExceededError: 4 DEADLINE_EXCEEDED: Deadline exceeded".
 */
export function errorKind(text: string): string {
  return text
    .replace(/ after \d[\s\S]*$/, '')
    .replace(/\s*\([^)]*\d{4}-\d\d-\d\dT[^)]*\)/g, '')
    .replace(/\b\d{1,3}(\.\d{1,3}){3}:\d+\b/g, 'ADDR')
    .trim();
}

export interface RequestRecord {
  seq: number;
  /** Sent (epoch ms). */
  t0: number;
  /** Answered or failed (epoch ms). */
  t1: number;
  ok: boolean;
  /** Member the request was sent to (or that answered, for a multi-endpoint client). */
  member: string;
  /** "ErrorClass: message" of a failed request. */
  error?: string;
}

export interface Gap {
  ms: number;
  /** Start of the gap (epoch ms): the previous success, or the start of the run. */
  from: number;
  /** End of the gap: the next success, or the end of the run. */
  to: number;
}

/** The `p`th percentile (nearest rank) of ascending `sorted`; NaN when empty. */
export function percentile(sorted: number[], p: number): number {
  if (sorted.length === 0) return NaN;
  const idx = Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1));
  return sorted[idx]!;
}

/** Longest interval in [start, end] without a successful completion. */
function longestGap(records: RequestRecord[], start: number, end: number): Gap {
  const oks = records
    .filter((r) => r.ok)
    .map((r) => r.t1)
    .sort((a, b) => a - b);
  let best: Gap = { ms: 0, from: start, to: start };
  let prev = start;
  for (const t of [...oks, end]) {
    if (t - prev > best.ms) best = { ms: t - prev, from: prev, to: t };
    prev = Math.max(prev, t);
  }
  return best;
}

export interface MemberSummary {
  total: number;
  ok: number;
  failed: number;
  p50Ms: number;
  p99Ms: number;
  maxMs: number;
  longestGapMs: number;
}

/** Results of startWriteLoad. */
export class LoadReport {
  constructor(
    readonly requests: RequestRecord[],
    /** When the load started / stopped (epoch ms). */
    readonly startedAt: number,
    readonly stoppedAt: number,
    /** Slots not sent because the generator fell behind or too many requests were in flight. */
    readonly skipped: number,
    readonly ratePerSec: number,
  ) {}

  get total(): number {
    return this.requests.length;
  }
  get okCount(): number {
    return this.requests.filter((r) => r.ok).length;
  }
  get failed(): number {
    return this.requests.filter((r) => !r.ok).length;
  }
  get failedRatio(): number {
    return this.total ? this.failed / this.total : 0;
  }
  get durationMs(): number {
    return this.stoppedAt - this.startedAt;
  }

  /** Longest time without a successful write (including the edges of the run), optionally for one member. */
  longestGap(member?: string): Gap {
    const rs = member ? this.requests.filter((r) => r.member === member) : this.requests;
    return longestGap(rs, this.startedAt, this.stoppedAt);
  }
  longestGapMs(member?: string): number {
    return this.longestGap(member).ms;
  }

  /** Latency percentile (ms) of successful requests (or of all, with includeFailed). */
  latency(p: number, opts: { includeFailed?: boolean; member?: string } = {}): number {
    const lat = this.requests
      .filter((r) => (opts.includeFailed || r.ok) && (!opts.member || r.member === opts.member))
      .map((r) => r.t1 - r.t0)
      .sort((a, b) => a - b);
    return percentile(lat, p);
  }
  get p50Ms(): number {
    return this.latency(50);
  }
  get p99Ms(): number {
    return this.latency(99);
  }
  get maxMs(): number {
    return this.latency(100);
  }

  /** Requests whose [t0, t1] intersects [from, to]. */
  during(from: number | Date, to: number | Date): RequestRecord[] {
    const f = +from;
    const t = +to;
    return this.requests.filter((r) => r.t1 >= f && r.t0 <= t);
  }

  /** Error kind (see errorKind) -> count. */
  errors(): Map<string, number> {
    const m = new Map<string, number>();
    for (const r of this.requests) {
      if (r.ok) continue;
      const k = errorKind(r.error ?? '?');
      m.set(k, (m.get(k) ?? 0) + 1);
    }
    return m;
  }

  byMember(): Record<string, MemberSummary> {
    const out: Record<string, MemberSummary> = {};
    for (const name of [...new Set(this.requests.map((r) => r.member))].sort()) {
      const rs = this.requests.filter((r) => r.member === name);
      const lat = rs
        .filter((r) => r.ok)
        .map((r) => r.t1 - r.t0)
        .sort((a, b) => a - b);
      out[name] = {
        total: rs.length,
        ok: lat.length,
        failed: rs.length - lat.length,
        p50Ms: percentile(lat, 50),
        p99Ms: percentile(lat, 99),
        maxMs: percentile(lat, 100),
        longestGapMs: longestGap(rs, this.startedAt, this.stoppedAt).ms,
      };
    }
    return out;
  }

  summary(): Record<string, unknown> {
    const gap = this.longestGap();
    return {
      durationMs: Math.round(this.durationMs),
      ratePerSec: this.ratePerSec,
      total: this.total,
      ok: this.okCount,
      failed: this.failed,
      failedRatio: Number(this.failedRatio.toFixed(4)),
      skipped: this.skipped,
      p50Ms: Number(this.p50Ms.toFixed(1)),
      p99Ms: Number(this.p99Ms.toFixed(1)),
      maxMs: Number(this.maxMs.toFixed(1)),
      longestGapMs: Math.round(gap.ms),
      longestGapAt: new Date(gap.from).toISOString(),
      errors: Object.fromEntries(this.errors()),
    };
  }

  toString(): string {
    return JSON.stringify(this.summary());
  }
}

// ---------------------------------------------------------------------------------------------

interface Pacer {
  stop(): void;
  skipped(): number;
}

/** Calls fire(seq) at `ratePerSec` on an absolute schedule. fire returns false to skip a slot. */
function pace(ratePerSec: number, fire: (seq: number) => boolean): Pacer {
  if (!(ratePerSec > 0)) throw new Error(`ratePerSec must be > 0, got ${ratePerSec}`);
  const interval = 1000 / ratePerSec;
  const maxBurst = Math.max(1, Math.ceil(ratePerSec / 4));
  const start = now();
  let i = 0;
  let skipped = 0;
  let timer: NodeJS.Timeout | undefined;
  let stopped = false;
  const tick = (): void => {
    if (stopped) return;
    const t = now();
    let burst = 0;
    while (start + i * interval <= t) {
      if (burst < maxBurst) {
        if (!fire(i)) skipped++;
        burst++;
      } else {
        skipped++;
      }
      i++;
    }
    timer = setTimeout(tick, Math.max(0, start + i * interval - now()));
  };
  tick();
  return {
    stop() {
      stopped = true;
      if (timer) clearTimeout(timer);
    },
    skipped: () => skipped,
  };
}

/**
 * The running load around `pacer`: the first stop() stops the pacer and hands the stop time to
 * `finish` (wait for what is in flight, close clients, report); every stop() returns that report.
 */
function running<R>(records: readonly RequestRecord[], pacer: Pacer, finish: (stoppedAt: number) => Promise<R>): RunningLoad<R> {
  let stopping: Promise<R> | undefined;
  return {
    records,
    stop() {
      stopping ??= (async () => {
        pacer.stop();
        return finish(now());
      })();
      return stopping;
    },
  };
}

export interface WriteLoadOptions {
  /** Puts per second over the whole cluster (default 100). */
  ratePerSec?: number;
  /** Per-request deadline (default 2000 ms). */
  deadlineMs?: number;
  /**
   * true (default): round robin over members, one client per member. false: one client with all
   * endpoints (the etcd3 client picks a random one per call), like an ordinary application.
   */
  spread?: boolean;
  /** Send everything to this member instead. */
  target?: Member;
  /** Key prefix (default "load/"). */
  keyPrefix?: string;
  /** Keys cycle over this many names so the db does not grow without bound (default 1000). */
  keySpace?: number;
  /** Value size (default 128 bytes). */
  valueBytes?: number;
  /** Bound on requests in flight (default: rate x deadline + 10). */
  maxInFlight?: number;
}

export interface RunningLoad<R> {
  /** Stops sending, waits for in-flight requests (up to their deadline) and reports. */
  stop(): Promise<R>;
  /** Requests recorded so far. */
  readonly records: readonly RequestRecord[];
}

/** Starts an open-loop write load. */
export function startWriteLoad(cluster: Cluster, opts: WriteLoadOptions = {}): RunningLoad<LoadReport> {
  const rate = opts.ratePerSec ?? 100;
  const deadlineMs = opts.deadlineMs ?? 2000;
  const prefix = opts.keyPrefix ?? 'load/';
  const keySpace = opts.keySpace ?? 1000;
  const value = randomBytes(Math.max(1, opts.valueBytes ?? 128));
  const maxInFlight = opts.maxInFlight ?? Math.ceil((rate * deadlineMs) / 1000) + 10;

  const targets: { name: string; client: Etcd3 }[] = [];
  if (opts.target) {
    targets.push({ name: opts.target.name, client: cluster.newClient(opts.target) });
  } else if (opts.spread ?? true) {
    for (const m of cluster.members) targets.push({ name: m.name, client: cluster.newClient(m) });
  } else {
    targets.push({ name: '*', client: cluster.newClient(cluster.members) });
  }
  const nameById = (idDec: string): string => cluster.memberById(hexId(idDec))?.name ?? hexId(idDec);

  const records: RequestRecord[] = [];
  const inFlight = new Set<Promise<void>>();
  const startedAt = now();
  const pacer = pace(rate, (seq) => {
    if (inFlight.size >= maxInFlight) return false;
    const target = targets[seq % targets.length]!;
    const key = Buffer.from(`${prefix}${seq % keySpace}`);
    const t0 = now();
    const p = target.client.kv
      .put({ key, value }, { deadline: Date.now() + deadlineMs })
      .then(
        (res) => {
          const member = target.name === '*' ? nameById(res.header.member_id) : target.name;
          records.push({ seq, t0, t1: now(), ok: true, member });
        },
        (err: unknown) => {
          records.push({ seq, t0, t1: now(), ok: false, member: target.name, error: errorText(err) });
        },
      )
      .finally(() => inFlight.delete(p));
    inFlight.add(p);
    return true;
  });

  return running(records, pacer, async (stoppedAt) => {
    await Promise.all([...inFlight]);
    for (const t of targets) t.client.close();
    records.sort((a, b) => a.seq - b.seq);
    return new LoadReport(records, startedAt, stoppedAt, pacer.skipped(), rate);
  });
}

// ---------------------------------------------------------------------------------------------

export interface ProbeMemberReport {
  member: string;
  total: number;
  ok: number;
  failed: number;
  /**
   * Longest time the member did not answer: the max over requests of (first successful answer at
   * or after the request was sent) - (request sent); open-ended at the end of the run.
   */
  longestBlockedMs: number;
  /** When that longest blocked interval started/ended (epoch ms). */
  blockedFrom: number;
  blockedTo: number;
  p50Ms: number;
  p99Ms: number;
  maxMs: number;
}

export class ProbeReport {
  constructor(
    readonly requests: RequestRecord[],
    readonly startedAt: number,
    readonly stoppedAt: number,
    readonly skipped: number,
  ) {}

  member(name: string): ProbeMemberReport {
    const rs = this.requests.filter((r) => r.member === name);
    const oks = rs
      .filter((r) => r.ok)
      .map((r) => r.t1)
      .sort((a, b) => a - b);
    let best = { ms: 0, from: this.startedAt, to: this.startedAt };
    for (const r of rs) {
      // first successful answer at or after r.t0
      let lo = 0;
      let hi = oks.length;
      while (lo < hi) {
        const mid = (lo + hi) >> 1;
        if (oks[mid]! < r.t0) lo = mid + 1;
        else hi = mid;
      }
      const answered = lo < oks.length ? oks[lo]! : this.stoppedAt;
      const ms = answered - r.t0;
      if (ms > best.ms) best = { ms, from: r.t0, to: answered };
    }
    const lat = rs
      .filter((r) => r.ok)
      .map((r) => r.t1 - r.t0)
      .sort((a, b) => a - b);
    return {
      member: name,
      total: rs.length,
      ok: lat.length,
      failed: rs.length - lat.length,
      longestBlockedMs: best.ms,
      blockedFrom: best.from,
      blockedTo: best.to,
      p50Ms: percentile(lat, 50),
      p99Ms: percentile(lat, 99),
      maxMs: percentile(lat, 100),
    };
  }

  members(): ProbeMemberReport[] {
    return [...new Set(this.requests.map((r) => r.member))].sort().map((n) => this.member(n));
  }

  /** member name -> longest blocked time (ms). */
  longestBlockedMs(): Record<string, number> {
    return Object.fromEntries(this.members().map((m) => [m.member, Math.round(m.longestBlockedMs)]));
  }

  toString(): string {
    return JSON.stringify(
      this.members().map((m) => ({
        member: m.member,
        total: m.total,
        failed: m.failed,
        longestBlockedMs: Math.round(m.longestBlockedMs),
        blockedFrom: new Date(m.blockedFrom).toISOString(),
        p99Ms: Number(m.p99Ms.toFixed(1)),
      })),
    );
  }
}

export interface ReadProbeOptions {
  /** Requests per second per member (default 10). */
  ratePerSec?: number;
  /** What to send: Maintenance Status (default), a serializable Range, or a linearizable Range. */
  kind?: 'status' | 'serializable' | 'linearizable';
  /** Per-request deadline (default 30 s, so that a blocked member's answer is still seen). */
  deadlineMs?: number;
  /** Members to probe (default all). */
  members?: Member[];
  /** Requests in flight per member before slots are skipped (default 200). */
  maxInFlightPerMember?: number;
  /** How long stop() waits for in-flight requests before recording them as unanswered (default 2000 ms). */
  stopGraceMs?: number;
}

/** Starts probing each member at a fixed rate. */
export function startReadProbe(cluster: Cluster, opts: ReadProbeOptions = {}): RunningLoad<ProbeReport> {
  const rate = opts.ratePerSec ?? 10;
  const kind = opts.kind ?? 'status';
  const deadlineMs = opts.deadlineMs ?? 30_000;
  const maxInFlight = opts.maxInFlightPerMember ?? 200;
  const members = opts.members ?? cluster.members;
  const targets = members.map((m) => ({
    name: m.name,
    client: cluster.newClient(m),
    inFlight: new Map<number, { t0: number; p: Promise<void> }>(),
  }));
  const records: RequestRecord[] = [];
  const startedAt = now();
  let closed = false;
  let seq = 0;

  const send = (t: (typeof targets)[number]): boolean => {
    if (t.inFlight.size >= maxInFlight) return false;
    const s = seq++;
    const t0 = now();
    const callOpts = { deadline: Date.now() + deadlineMs };
    const req: Promise<unknown> =
      kind === 'status'
        ? t.client.maintenance.status(callOpts)
        : t.client.kv.range({ key: Buffer.from('defragd-harness/probe'), serializable: kind === 'serializable' }, callOpts);
    const p = req
      .then(
        () => {
          if (!closed) records.push({ seq: s, t0, t1: now(), ok: true, member: t.name });
        },
        (err: unknown) => {
          if (!closed) records.push({ seq: s, t0, t1: now(), ok: false, member: t.name, error: errorText(err) });
        },
      )
      .finally(() => t.inFlight.delete(s));
    t.inFlight.set(s, { t0, p });
    return true;
  };

  let skipped = 0;
  const pacer = pace(rate, () => {
    for (const t of targets) if (!send(t)) skipped++;
    return true;
  });

  return running(records, pacer, async (stoppedAt) => {
    const pending = targets.flatMap((t) => [...t.inFlight.values()].map((x) => x.p));
    const grace = opts.stopGraceMs ?? 2000;
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([Promise.all(pending), new Promise<void>((r) => (timer = setTimeout(r, grace)))]);
    if (timer) clearTimeout(timer);
    closed = true;
    for (const t of targets) {
      for (const [s, x] of t.inFlight) {
        records.push({ seq: s, t0: x.t0, t1: stoppedAt, ok: false, member: t.name, error: 'unanswered when the probe stopped' });
      }
      t.client.close();
    }
    records.sort((a, b) => a.seq - b.seq);
    return new ProbeReport(records, startedAt, stoppedAt, skipped + pacer.skipped());
  });
}
