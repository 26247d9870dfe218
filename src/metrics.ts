// Prometheus metrics (prom-client) on metrics.listen: /metrics and /healthz; the same etcd_defragd_*
// series can also go to node_exporter's textfile collector (src/textfile.ts).
//
// Conventions checked by `promtool check metrics` in CI: process_*/nodejs_* under their usual names,
// no gauge ending in _total, every label value that can occur present from the start at 0 (so
// increase() sees the first event), and each daemon exports only the member it owns.
import { createServer, type Server } from 'node:http';
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';
import { DefragdError, OUTCOMES, errorMessage, type Outcome } from './errors.ts';
import { versionNotes } from './etcd-versions.ts';
import type { ClusterView } from './view.ts';
import type { CompactionState, Forecast } from './trend.ts';

export const MODES = ['scheduled', 'nospace'] as const;
/**
 * Every `check` a skipped run can name (policy.ts healthGate, run.ts, daemon.ts); a unit test keeps
 * this list in step with the sources. `other` is a skip without a check.
 */
export const SKIP_CHECKS = [
  'status',
  'leader',
  'raft-lag',
  'read',
  'alarm',
  'learner',
  'single-member',
  'quota',
  'disk',
  'compact',
  'turn',
  'busy',
  'halt',
  'pause',
  'member',
  'nospace',
  'duration',
  'other',
] as const;
export const ALARMS = ['NOSPACE', 'CORRUPT'] as const;
/**
 * The labels of every etcd_defragd_member_* series: the member's hex ID, as etcdctl shows it, and
 * its name from the member list, as dashboards and alerts show it (empty for a member added but
 * not started yet).
 */
const MEMBER_LABELS = ['member', 'name'] as const;
type MemberLabels = Record<(typeof MEMBER_LABELS)[number], string>;

// prom-client's totals of these are gauges named *_total, which Prometheus reserves for counters;
// the per-type gauges without the suffix carry the same numbers (sum() them).
const MISNAMED_DEFAULTS = ['nodejs_active_handles_total', 'nodejs_active_requests_total', 'nodejs_active_resources_total'];

/** A gauge or counter in `registers`, with every label name it can have (none by default). */
const gauge = <L extends string = never>(registers: Registry[], name: string, help: string, labelNames: readonly L[] = []) =>
  new Gauge<L>({ name, help, labelNames, registers });
const counter = <L extends string = never>(registers: Registry[], name: string, help: string, labelNames: readonly L[] = []) =>
  new Counter<L>({ name, help, labelNames, registers });

/** What a client of metrics.listen gets at most (see Metrics.listen). */
export const SERVER_LIMITS = {
  headersTimeout: 5_000,
  requestTimeout: 10_000,
  keepAliveTimeout: 5_000,
  /** How often Node checks the two timeouts above (its default, 30 s, would let a slow client hold on that long). */
  checkInterval: 2_000,
  maxConnections: 16,
};

/**
 * metrics.listen cannot be had. Taken by another process (EADDRINUSE): exit 1, systemd tries again
 * in 15 s. An address this host does not have, or a port below 1024: exit 78, a restart cannot help.
 */
export class ListenError extends DefragdError {
  /** A restart may find the port free again. */
  readonly retryable: boolean;

  constructor(address: string, err: unknown) {
    const code = (err as NodeJS.ErrnoException).code;
    const why =
      code === 'EADDRINUSE'
        ? 'the port is taken by another process'
        : code === 'EADDRNOTAVAIL'
          ? 'this host has no such address'
          : code === 'EACCES'
            ? 'permission denied (a port below 1024 needs privileges the service does not have)'
            : errorMessage(err);
    const message = `metrics.listen: cannot serve metrics on ${JSON.stringify(address)}: ${why}; accepted: a free host:port of this node, or "" to disable`;
    super('EDD_CONFIG', message, { cause: err, permanent: true });
    this.name = 'ListenError';
    this.retryable = code === 'EADDRINUSE';
  }
}

export class Metrics {
  /** etcd_defragd_* only: what the textfile collector gets (node_exporter has its own process_*). */
  readonly own = new Registry();
  /** Node's process and runtime metrics under their conventional names. */
  private readonly runtime = new Registry();
  readonly registry: Registry;
  private readonly r = [this.own];

  readonly buildInfo = gauge(this.r, 'etcd_defragd_build_info', 'Always 1; the labels say which etcd-defragd and Node.js run', [
    'version',
    'nodejs',
  ]);
  readonly startTime = gauge(
    this.r,
    'etcd_defragd_start_time_seconds',
    'When this daemon started (for alerts that must not fire before it had a chance to run)',
  );
  readonly lastRunTime = gauge(this.r, 'etcd_defragd_last_run_timestamp_seconds', 'When the last run ended, whatever its outcome');
  readonly lastSuccessTime = gauge(
    this.r,
    'etcd_defragd_last_success_timestamp_seconds',
    'When the last run ended done or not-needed (0: none since start)',
  );
  readonly lastRunResult = gauge(this.r, 'etcd_defragd_last_run_result', '1 for the outcome of the last run, 0 for the others', [
    'outcome',
  ]);
  readonly runs = counter(this.r, 'etcd_defragd_runs_total', 'Runs by outcome and mode', ['outcome', 'mode']);
  readonly skips = counter(this.r, 'etcd_defragd_skipped_runs_total', 'Skipped runs by the check that stopped them', ['check']);
  readonly defrags = counter(this.r, 'etcd_defragd_defrags_total', 'Defragments of the local member by result', ['result']);
  readonly reclaimed = counter(this.r, 'etcd_defragd_reclaimed_bytes_total', 'Bytes of db file given back by defragments');
  readonly duration = new Histogram({
    name: 'etcd_defragd_defrag_duration_seconds',
    help: 'Time a defragment took, until the member caught up',
    buckets: [0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600],
    registers: this.r,
  });
  readonly dbSize = gauge(this.r, 'etcd_defragd_member_db_size_bytes', 'Db file size of the local member at the last inspection', [
    ...MEMBER_LABELS,
  ]);
  readonly dbInUse = gauge(
    this.r,
    'etcd_defragd_member_db_size_in_use_bytes',
    'Db size in use (live data) of the local member at the last inspection',
    MEMBER_LABELS,
  );
  readonly quotaUsage = gauge(
    this.r,
    'etcd_defragd_member_quota_usage_ratio',
    'Db file size / quota of the local member at the last inspection',
    MEMBER_LABELS,
  );
  readonly quotaBytes = gauge(
    this.r,
    'etcd_defragd_member_quota_bytes',
    "The quota the local member is judged against (policy.quotaBytes, or etcd's own with policy.quotaBytes: auto)",
    MEMBER_LABELS,
  );
  readonly defragmenting = gauge(
    this.r,
    'etcd_defragd_member_defragmenting',
    '1 while the local member is defragmenting (by this daemon, or seen in etcd at the last inspection)',
    MEMBER_LABELS,
  );
  readonly etcdVersion = gauge(
    this.r,
    'etcd_defragd_member_etcd_version_info',
    "1, labelled with the local member's etcd version and the ids of the known etcd issues that version has (README, etcd versions)",
    [...MEMBER_LABELS, 'version', 'notes'],
  );
  readonly alarms = gauge(this.r, 'etcd_defragd_alarms', 'Alarms raised in the cluster at the last check', ['alarm']);
  readonly nextRun = gauge(this.r, 'etcd_defragd_next_run_timestamp_seconds', 'When the next scheduled run starts');
  readonly scheduleInterval = gauge(
    this.r,
    'etcd_defragd_schedule_interval_seconds',
    'Time between the next two scheduled runs (for "no success for 2x the schedule" alerts)',
  );
  readonly integrityFailures = counter(this.r, 'etcd_defragd_integrity_failures_total', 'HashKV mismatches found after a defragment');
  readonly disarms = counter(this.r, 'etcd_defragd_nospace_disarms_total', 'NOSPACE alarms disarmed by this daemon');
  // Read at scrape (and textfile) time: the turn changes inside a run, between our updates.
  readonly turnHeld: Gauge = new Gauge({
    name: 'etcd_defragd_turn_held',
    help: '1 while this daemon holds the cluster-wide turn',
    registers: this.r,
    collect: () => this.turnHeld.set(this.turnProbe() ? 1 : 0),
  });
  readonly paused = gauge(
    this.r,
    'etcd_defragd_paused',
    '1 while defragmentation is paused cluster-wide (etcd-defragd pause), as last read',
  );
  readonly halted = gauge(this.r, 'etcd_defragd_halted', '1 while defragmentation is halted after an integrity mismatch, as last read');
  readonly etcdReachable = gauge(
    this.r,
    'etcd_defragd_etcd_reachable',
    '1 when the last alarm check (every nospace.checkInterval) read the alarm list from etcd.endpoint, 0 when it failed or before the first',
  );

  readonly timeToQuota = gauge(
    this.r,
    'etcd_defragd_member_time_to_quota_seconds',
    "Forecast: seconds until the local member's db reaches its quota at the growth of forecast.window (absent while nothing grows)",
    ['member', 'name'],
  );
  readonly historyRevisions = gauge(
    this.r,
    'etcd_defragd_history_revisions',
    "The local member's current revision minus its compacted revision: the history etcd keeps",
    ['member', 'name'],
  );
  readonly compactionAge = gauge(
    this.r,
    'etcd_defragd_compacted_revision_age_seconds',
    "How long the compacted revision has not moved, on the daemon's clock (from its start at most)",
    ['member', 'name'],
  );
  readonly fallbackCompactions = counter(
    this.r,
    'etcd_defragd_fallback_compactions_total',
    'Compactions this daemon ran because nothing else compacted the history (compaction.fallback)',
  );
  readonly predictedDefrag = gauge(
    this.r,
    'etcd_defragd_defrag_predicted_seconds',
    "How long the local member's next defragment is predicted to take, from its past ones (absent until one was seen)",
    ['member', 'name'],
  );
  private trendLabels: { member: string; name: string } | undefined;
  private server: Server | undefined;
  /** The member this daemon owns, as its series are labelled. */
  private member: MemberLabels | undefined;
  private defragInFlight = false;
  private turnProbe: () => boolean = () => false;

  constructor(version = 'unknown') {
    // The event-loop delay monitor samples every 10ms by default: a wake-up 100 times a second in a
    // daemon that is idle for hours. One sample a second is plenty here.
    collectDefaultMetrics({ register: this.runtime, eventLoopMonitoringPrecision: 1000 });
    for (const name of MISNAMED_DEFAULTS) this.runtime.removeSingleMetric(name);
    this.registry = Registry.merge([this.own, this.runtime]);
    this.buildInfo.set({ version, nodejs: process.version }, 1);
    for (const o of OUTCOMES) {
      this.lastRunResult.set({ outcome: o }, 0);
      for (const mode of MODES) this.runs.inc({ outcome: o, mode }, 0);
    }
    for (const check of SKIP_CHECKS) this.skips.inc({ check }, 0);
    for (const result of ['ok', 'failed']) this.defrags.inc({ result }, 0);
    for (const alarm of ALARMS) this.alarms.set({ alarm }, 0);
    this.lastSuccessTime.set(0);
    this.startTime.set(Math.floor(Date.now() / 1000));
    this.paused.set(0);
    this.halted.set(0);
  }

  /** Where to read whether this daemon holds the turn (the Turn is rebuilt on reload). */
  watchTurn(held: () => boolean): void {
    this.turnProbe = held;
  }

  recordRun(outcome: Outcome, mode: string, check?: string): void {
    this.runs.inc({ outcome, mode });
    if (outcome === 'skipped') this.skips.inc({ check: (SKIP_CHECKS as readonly string[]).includes(check ?? '') ? check! : 'other' });
    if (check === 'integrity') this.integrityFailures.inc();
    const now = Date.now() / 1000;
    this.lastRunTime.set(now);
    if (outcome === 'done' || outcome === 'not-needed') this.lastSuccessTime.set(now);
    for (const o of OUTCOMES) this.lastRunResult.set({ outcome: o }, o === outcome ? 1 : 0);
  }

  /** The local member only: the other members' daemons export theirs. */
  recordView(view: ClusterView): void {
    const m = view.local;
    const labels: MemberLabels = { member: m.hex, name: m.name };
    // Another member, or the same one under a new name (it had none until it started): new series.
    if (this.member && (this.member.member !== labels.member || this.member.name !== labels.name)) this.forgetMember();
    this.member = labels;
    // The quota the inspection judged the member by (etcd's own, or policy.quotaBytes); none when unknown.
    const quota = m.quotaBytes;
    if (quota) this.quotaBytes.set(labels, quota);
    else this.quotaBytes.remove(labels);
    this.defragmenting.set(labels, this.defragInFlight || m.defragmenting ? 1 : 0);
    if (!m.status) return;
    const version = m.status.version ?? '';
    const notes = versionNotes(version)
      .map((n) => n.id)
      .join(',');
    this.etcdVersion.reset();
    this.etcdVersion.set({ ...labels, version, notes }, 1);
    this.dbSize.set(labels, m.status.dbSize);
    this.dbInUse.set(labels, m.status.dbSizeInUse);
    if (quota) this.quotaUsage.set(labels, m.status.dbSize / quota);
    else this.quotaUsage.remove(labels);
  }

  /** The member this daemon owned is gone (replaced, or another endpoint after a reload): drop its series. */
  forgetMember(): void {
    const labels = this.member;
    if (labels === undefined) return;
    for (const g of [this.dbSize, this.dbInUse, this.quotaUsage, this.quotaBytes, this.defragmenting]) g.remove(labels);
    this.etcdVersion.reset();
    this.predictedDefrag.reset();
    this.forgetTrend();
    this.member = undefined;
  }

  defragStarted(member: string): void {
    this.defragInFlight = true;
    if (member === this.member?.member) this.defragmenting.set(this.member, 1);
  }

  defragEnded(member: string): void {
    this.defragInFlight = false;
    if (member === this.member?.member) this.defragmenting.set(this.member, 0);
  }

  recordAlarms(alarms: { alarm: string }[]): void {
    for (const name of ALARMS) this.alarms.set({ alarm: name }, alarms.filter((a) => a.alarm === name).length);
  }

  recordControl(state: { paused: boolean; halted: boolean }): void {
    this.paused.set(state.paused ? 1 : 0);
    this.halted.set(state.halted ? 1 : 0);
  }

  /**
   * The local member's forecast and compaction watch (src/trend.ts), labelled with its id and name.
   * time_to_quota is absent while nothing grows; the compaction gauges while etcd's page lacks the
   * revision gauges.
   */
  recordTrend(member: { hex: string; name: string }, forecast: Forecast | undefined, compaction: CompactionState | undefined): void {
    const labels = { member: member.hex, name: member.name };
    if (this.trendLabels && (this.trendLabels.member !== labels.member || this.trendLabels.name !== labels.name)) this.forgetTrend();
    this.trendLabels = labels;
    if (forecast?.seconds !== undefined) this.timeToQuota.set(labels, Math.round(forecast.seconds));
    else this.timeToQuota.remove(labels);
    if (compaction) {
      this.historyRevisions.set(labels, compaction.historyRevisions);
      this.compactionAge.set(labels, Math.round(compaction.ageMs / 1000));
    } else {
      this.historyRevisions.remove(labels);
      this.compactionAge.remove(labels);
    }
  }

  /** The predicted duration of the local member's next defragment (src/duration.ts); absent while unknown. */
  recordPredictedDefrag(member: { hex: string; name: string }, seconds: number | undefined): void {
    this.predictedDefrag.reset(); // one member per daemon: a renamed or replaced one drops the old series
    if (seconds !== undefined) this.predictedDefrag.set({ member: member.hex, name: member.name }, Number(seconds.toFixed(3)));
  }

  private forgetTrend(): void {
    if (!this.trendLabels) return;
    for (const g of [this.timeToQuota, this.historyRevisions, this.compactionAge]) g.remove(this.trendLabels);
    this.trendLabels = undefined;
  }

  recordSchedule(next: Date | undefined, after: Date | undefined): void {
    if (next) this.nextRun.set(next.getTime() / 1000);
    if (next && after) this.scheduleInterval.set((after.getTime() - next.getTime()) / 1000);
  }

  /**
   * Serves /metrics and /healthz on `address`. Bounded for a local user who can connect: headers
   * within 5 s, a whole request within 10 s, at most 16 connections, GET and HEAD only. Fails (a
   * ListenError, the daemon exits) when the address cannot be had: running on without the
   * listener would leave the port to whoever takes it during a restart.
   */
  async listen(address: string, limits: Partial<typeof SERVER_LIMITS> = {}): Promise<string> {
    const l = { ...SERVER_LIMITS, ...limits };
    const i = address.lastIndexOf(':');
    const host = address.slice(0, i).replace(/^\[|\]$/g, '');
    const port = Number(address.slice(i + 1));
    this.server = createServer(
      { headersTimeout: l.headersTimeout, requestTimeout: l.requestTimeout, connectionsCheckingInterval: l.checkInterval },
      (req, res) => {
        if (req.method !== 'GET' && req.method !== 'HEAD') {
          res.writeHead(405, { allow: 'GET, HEAD', 'content-type': 'text/plain' });
          res.end('only GET and HEAD\n');
        } else if (req.url === '/metrics') {
          this.registry.metrics().then(
            (body) => {
              res.writeHead(200, { 'content-type': this.registry.contentType });
              res.end(body);
            },
            (err: Error) => {
              res.writeHead(500);
              res.end(err.message);
            },
          );
        } else if (req.url === '/healthz') {
          res.writeHead(200, { 'content-type': 'text/plain' });
          res.end('ok\n');
        } else {
          res.writeHead(404);
          res.end();
        }
      },
    );
    const server = this.server;
    server.maxConnections = l.maxConnections;
    server.keepAliveTimeout = l.keepAliveTimeout;
    try {
      await new Promise<void>((resolve, reject) => {
        server.once('error', reject);
        server.listen(port, host, () => resolve());
      });
    } catch (err) {
      this.server = undefined;
      throw new ListenError(address, err);
    }
    const a = server.address();
    return typeof a === 'object' && a ? `${a.address.includes(':') ? `[${a.address}]` : a.address}:${a.port}` : address;
  }

  async close(): Promise<void> {
    const s = this.server;
    this.server = undefined;
    if (s) await new Promise<void>((resolve) => s.close(() => resolve()));
  }
}
