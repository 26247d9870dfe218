// The long-running daemon: scheduled runs (node-cron), NOSPACE watch, metrics, reload and a
// two-phase stop. It never exits because etcd is unreachable: it logs, counts, and tries again.
import { randomBytes } from 'node:crypto';
import { createTask } from 'node-cron';
import type { Clock, Timer } from './clock.ts';
import { loadConfig, type Config, type LoadOptions } from './config.ts';
import { armHaltFuse, haltOf, readStops } from './control.ts';
import { DefragDurations } from './duration.ts';
import { describeVersionNotes } from './etcd-versions.ts';
import { accessFromConfig, ClientPool, kindOf, type EtcdPool } from './etcd.ts';
import { errorMessage } from './errors.ts';
import type { Log } from './log.ts';
import { Metrics } from './metrics.ts';
import { fileLock, type NodeLock } from './node-lock.ts';
import { checkAndDisarm, StallWatch } from './nospace.ts';
import { RevisionLog } from './history.ts';
import { inspect } from './inspect.ts';
import { run, type HashKVFn, type RunResult } from './run.ts';
import { enforcedQuota, quotaMismatch, resolveQuota } from './policy.ts';
import { removeTextfile, writeTextfile } from './textfile.ts';
import { TlsWatch } from './tls-files.ts';
import { CompactionWatch, earlyRun, forecast, SampleLog, TREND_PUBLISH_MS, trendPrefix, trendRecord, type MemberSample } from './trend.ts';
import { Turn } from './turn.ts';
import { formatBytes, formatDuration } from './units.ts';
import { version } from './version.ts';
import { hexId } from './view.ts';

/** A cron schedule (node-cron in the daemon; the model tests fire it from their fake clock). */
export interface Schedule {
  stop(): void;
  /** The next `n` start times. */
  nextRuns(n: number): Date[];
}
export type Scheduler = (cron: string, timezone: string, fn: () => void) => Schedule;

export const cronScheduler: Scheduler = (cron, timezone, fn) => {
  const task = createTask(cron, fn, { timezone, name: 'etcd-defragd', noOverlap: false });
  task.start();
  return { stop: () => task.destroy(), nextRuns: (n) => task.getNextRuns(n) };
};

export interface DaemonDeps {
  log: Log;
  clock: Clock;
  /** Reload reads the same file and environment again. */
  loadOptions: LoadOptions;
  hashKV?: HashKVFn;
  scheduler?: Scheduler;
  /** Clients for a config (the real etcd client unless a test gives the model). */
  pool?: (config: Config) => EtcdPool;
  /** Tickets per participant (the model tests use fewer keys). */
  tickets?: number;
  /** The model tests share one registry among their many daemons (each new one samples the event loop). */
  metrics?: Metrics;
  /** One process per member on this node in the NOSPACE order (default: a lock file, src/node-lock.ts). */
  nodeLock?: NodeLock;
}

type Mode = 'scheduled' | 'nospace';

/**
 * Revision samples are kept keepHistory plus this long: a recovery that starts within it still
 * finds the revision keepHistory before the alarm (a sample every checkInterval: ~400 at 10s).
 */
const REVISION_LOG_SLACK = 3_600_000;
/** The history both NOSPACE compaction and the fallback compaction may need to keep. */
const revisionKeep = (c: Config): number => Math.max(c.nospace.keepHistory, c.compaction.keepHistory) + REVISION_LOG_SLACK;
/** A warning that still holds is repeated this often, not at every check. */
const WARN_EVERY_MS = 3_600_000;

export class Daemon {
  private config: Config;
  private pool: EtcdPool;
  private turn: Turn;
  private task: Schedule | undefined;
  private nospaceTimer: Timer | undefined;
  private running: Promise<void> | undefined;
  private pending: Mode | undefined;
  private stopping = false;
  private readonly abort = new AbortController();
  private reconnectPending = false;
  /** While a NOSPACE alarm lasts: whether this daemon has defragmented its member since it was raised. */
  private alarmEpisode: { defraggedSinceAlarm: boolean; since: number; stalls: StallWatch } | undefined;
  /**
   * Set by an integrity mismatch: no more defragments from this daemon until it is restarted, or
   * until `etcd-defragd resume --integrity-checked` deletes the halt key this daemon wrote.
   */
  private halted: string | undefined;
  private haltRecorded = false;
  private textfileTrouble = '';
  /** The textfile's writes, one at a time (a run and an alarm check may publish at once). */
  private textfileWrites: Promise<void> = Promise.resolve();
  /** Set by a clean stop: the file is gone and stays gone. */
  private textfileClosed = false;
  readonly metrics: Metrics;
  /** Renewed certificates (kubeadm certs renew, or a fresh staged copy) reconnect the clients. */
  private readonly tls: TlsWatch;
  /** The cluster's revision over time, for NOSPACE compaction (nospace.keepHistory). */
  private revisions: RevisionLog;
  metricsAddress: string | undefined;
  private readonly nodeLock: NodeLock;
  /** The local member's /metrics over forecast.window (src/trend.ts). */
  private samples: SampleLog;
  private compactionWatch: CompactionWatch;
  /** The local member's past defragments, for policy.maxDefragDuration (src/duration.ts). */
  private durations = new DefragDurations();
  /** The local member as the last inspection named it (the trend's labels and record key). */
  private localMember: { hex: string; name: string } | undefined;
  private trendPublishedAt = 0;
  private sampledAt = 0;
  private warnedAt = { forecast: 0, stale: 0 };
  private wasStale = false;
  /** When this daemon last started a run early, by reason (at most one per forecast.minSpan / compaction.staleAfter). */
  private earlyAt = { forecast: 0, compaction: 0 };
  /** What the next scheduled run does first: a forecast-driven defragment, a fallback compaction. */
  private early: { forecast?: string; compaction?: { compactRevision: number; reason: string } } = {};

  constructor(
    config: Config,
    private readonly deps: DaemonDeps,
  ) {
    this.config = config;
    this.metrics = deps.metrics ?? new Metrics(version());
    this.pool = this.newPool();
    this.turn = this.newTurn();
    this.metrics.watchTurn(() => this.turn.holding());
    this.revisions = new RevisionLog(revisionKeep(config));
    this.tls = new TlsWatch(config);
    this.nodeLock = deps.nodeLock ?? fileLock();
    this.samples = new SampleLog(config.forecast.window);
    this.compactionWatch = new CompactionWatch(config.compaction.staleAfter);
  }

  /** Before each run and alarm check: new certificate files mean new connections (between runs). */
  private refreshTls(): void {
    if (!this.tls.changed()) return;
    this.deps.log.info({ event: 'tls.changed' }, 'the TLS files changed on disk: reconnecting with them');
    if (this.running) this.reconnectPending = true;
    else this.reloadConnections();
  }

  private newPool(): EtcdPool {
    return this.deps.pool ? this.deps.pool(this.config) : new ClientPool(accessFromConfig(this.config));
  }

  private newTurn(): Turn {
    return new Turn(
      {
        prefix: this.config.coordination.prefix,
        leaseTTL: this.config.coordination.leaseTTL,
        command: 'etcd-defragd run',
        tickets: this.deps.tickets,
      },
      { pool: this.pool, endpoint: this.config.etcd.endpoint, log: this.deps.log, clock: this.deps.clock },
    );
  }

  /** Its participant in the turn and whether it believes it holds the turn (the model tests' checks). */
  turnState(): { participant: string | undefined; holding: boolean } {
    return { participant: this.turn.participant(), holding: this.turn.holding() };
  }

  async start(): Promise<void> {
    const c = this.config;
    const log = this.deps.log;
    // A ListenError ends the start (cli.ts: exit 1, or 78): running without it leaves the port to anyone.
    if (c.metrics.listen) this.metricsAddress = await this.metrics.listen(c.metrics.listen);
    this.schedule();
    log.info(
      {
        event: 'daemon.start',
        endpoint: c.etcd.endpoint,
        cron: c.schedule.cron,
        timezone: c.schedule.timezone,
        metrics: this.metricsAddress ?? '',
        nextRun: this.task?.nextRuns(1)[0]?.toISOString(),
      },
      `etcd-defragd started for ${c.etcd.endpoint}; runs at "${c.schedule.cron}" (${c.schedule.timezone}), ` +
        `next ${this.task?.nextRuns(1)[0]?.toISOString() ?? 'never'}`,
    );
    void this.join();
    void this.checkQuota();
    this.nospaceTimer = this.deps.clock.every(c.nospace.checkInterval, () => void this.checkAlarms());
    if (c.schedule.runOnStart) this.trigger('scheduled');
    else void this.checkAlarms();
  }

  /**
   * Joins the cluster-wide turn (scheduled runs). During NOSPACE no lease is granted: recovery then
   * follows the NOSPACE order, which needs no registration, and the daemon joins once writes work.
   */
  private async join(): Promise<void> {
    try {
      const s = await this.pool.get(this.config.etcd.endpoint).status({ log: this.deps.log, signal: this.abort.signal });
      this.turn.identify(s.memberId);
      await this.turn.register();
      await armHaltFuse(this.pool, this.config);
    } catch (err) {
      if (kindOf(err) === 'nospace') {
        this.deps.log.info(
          { event: 'turn.register.later', error: errorMessage(err) },
          'NOSPACE: etcd grants no lease, so this daemon joins the cluster-wide turn once writes work again; ' +
            'recovery does not need it (NOSPACE order)',
        );
        return;
      }
      this.deps.log.warn(
        { event: 'turn.register.fail', error: errorMessage(err) },
        `could not join the cluster-wide turn yet: ${errorMessage(err)}; trying again at the next run`,
      );
    }
  }

  /** At start: say which quota each run will judge the local member by, and warn on a mismatch. */
  private async checkQuota(): Promise<void> {
    const c = this.config;
    try {
      const view = await inspect(
        this.pool,
        c.etcd.endpoint,
        { log: this.deps.log, signal: this.abort.signal },
        { memberAttempts: 1, linearizableRead: false, quotaBytes: c.policy.quotaBytes },
      );
      const local = view.local;
      this.localMember = { hex: local.hex, name: local.name };
      const mismatch = quotaMismatch(local);
      const quotaFrom =
        local.quotaSource === 'config' ? 'policy.quotaBytes' : local.quotaSource === 'status' ? "etcd's Status" : "etcd's /metrics";
      if (mismatch)
        this.deps.log.warn(
          { event: 'quota.mismatch', member: local.hex, configured: local.quotaBytes, etcd: local.etcdQuotaBytes },
          mismatch,
        );
      else if (local.quotaBytes === undefined)
        this.deps.log.warn({ event: 'quota.unknown', member: local.hex }, local.quotaError ?? 'the quota of the local member is unknown');
      else
        this.deps.log.info(
          { event: 'quota', member: local.hex, quotaBytes: local.quotaBytes, source: local.quotaSource },
          `member ${local.hex}: quota ${local.quotaBytes} bytes (from ${quotaFrom})`,
        );
      // Each daemon speaks for its own member (status shows every member's).
      if (local.status)
        for (const note of describeVersionNotes(local.hex, local.status.version))
          this.deps.log.warn({ event: 'etcd.version', member: local.hex, version: local.status.version }, note);
    } catch (err) {
      this.deps.log.debug({ event: 'quota.check.fail', error: errorMessage(err) }, `could not check the quota yet: ${errorMessage(err)}`);
    }
  }

  private schedule(): void {
    const c = this.config;
    this.task?.stop();
    this.task = (this.deps.scheduler ?? cronScheduler)(c.schedule.cron, c.schedule.timezone, () => this.trigger('scheduled'));
    this.updateNextRun();
  }

  private updateNextRun(): void {
    const [next, after] = this.task?.nextRuns(2) ?? [];
    this.metrics.recordSchedule(next, after);
  }

  /** node_exporter's textfile collector (metrics.textfile): after each run and alarm check. */
  private publish(): Promise<void> {
    this.textfileWrites = this.textfileWrites.then(() => this.writeTextfile());
    return this.textfileWrites;
  }

  private async writeTextfile(): Promise<void> {
    const path = this.config.metrics.textfile;
    if (!path || this.textfileClosed) return;
    try {
      await writeTextfile(path, await this.metrics.own.metrics());
      if (this.textfileTrouble) this.deps.log.info({ event: 'metrics.textfile', path }, `writing ${path} works again`);
      this.textfileTrouble = '';
    } catch (err) {
      const why = errorMessage(err);
      // Once per kind of trouble, not every alarm check.
      if (why !== this.textfileTrouble)
        this.deps.log.warn({ event: 'metrics.textfile.fail', path, error: why }, `cannot write metrics.textfile ${path}: ${why}`);
      this.textfileTrouble = why;
    }
  }

  /** Starts a run now, or after the current one (never two runs of one daemon at once). */
  trigger(mode: Mode): void {
    if (this.stopping) return;
    this.refreshTls();
    if (this.running) {
      if (mode === 'nospace' || !this.pending) this.pending = mode;
      return;
    }
    this.running = this.runOne(mode).finally(() => {
      this.running = undefined;
      // New etcd/coordination settings from a reload apply between runs, before a queued one.
      if (this.reconnectPending && !this.stopping) this.reloadConnections();
      const next = this.pending;
      this.pending = undefined;
      if (next && !this.stopping) this.trigger(next);
    });
  }

  /** Resolves when no run is in progress or queued (tests and shutdown). */
  async idle(): Promise<void> {
    while (this.running) await this.running;
  }

  private async runOne(mode: Mode): Promise<void> {
    const runId = randomBytes(4).toString('hex');
    const log = this.deps.log.child({ runId });
    let result: RunResult | undefined;
    if (this.halted) {
      const how = this.haltRecorded
        ? 'etcd-defragd resume --integrity-checked'
        : 'restart etcd-defragd on this node (the halt could not be written to etcd)';
      log.error(
        { event: 'run.skip', check: 'halt', mode },
        `run skipped: halted after an integrity mismatch (${this.halted}); check the members, then ${how}`,
      );
      this.metrics.recordRun('skipped', mode, 'halt');
      return;
    }
    // A run started early (or the next scheduled one) does what the trend asked for.
    const early = mode === 'scheduled' ? this.early : {};
    if (mode === 'scheduled') this.early = {};
    try {
      if (!this.turn.joined()) await this.join();
      result = await run(
        {
          config: this.config,
          pool: this.pool,
          log,
          clock: this.deps.clock,
          turn: this.turn,
          signal: this.abort.signal,
          hashKV: this.deps.hashKV,
          revisions: this.revisions,
          nodeLock: this.nodeLock,
          stalls: this.alarmEpisode?.stalls,
          onInspected: (v) => {
            if (v.local.status) this.revisions.record(this.deps.clock.now(), v.local.status.revision);
            this.metrics.recordView(v);
            this.metrics.recordAlarms(v.alarms);
            this.turn.identify(v.local.id);
            this.localMember = { hex: v.local.hex, name: v.local.name };
          },
          onDefragStart: (member) => this.metrics.defragStarted(member),
          predictDefrag: (inUseBytes) => this.durations.predict(inUseBytes),
          onCompacted: () => this.metrics.fallbackCompactions.inc(),
          onDefrag: (d) => {
            this.metrics.defragEnded(d.member);
            this.metrics.defrags.inc({ result: d.ok ? 'ok' : 'failed' });
            if (d.ok) {
              this.metrics.reclaimed.inc(d.reclaimed);
              this.metrics.duration.observe(d.tookMs / 1000);
              this.durations.observeRun(this.deps.clock.now(), d.inUseBytes, d.tookMs);
            }
          },
        },
        {
          mode,
          runId,
          defraggedSinceAlarm: this.alarmEpisode?.defraggedSinceAlarm,
          alarmSeenAt: this.alarmEpisode?.since,
          forecast: early.forecast,
          compactHistory: early.compaction,
        },
      );
      if (result.mode === 'nospace' || result.mode === 'scheduled') mode = result.mode;
      this.metrics.recordRun(result.outcome, mode, result.check);
      if (mode === 'nospace' && result.outcome === 'done' && this.alarmEpisode) this.alarmEpisode.defraggedSinceAlarm = true;
      if (result.check === 'integrity') {
        this.halted = result.reason;
        this.haltRecorded = Boolean(result.haltRecorded);
      }
    } catch (err) {
      log.error({ event: 'run.fail', mode, error: errorMessage(err) }, `run failed: ${errorMessage(err)}`);
      this.metrics.recordRun('failed', mode);
    }
    if (mode === 'nospace' && !this.stopping && !this.halted) {
      try {
        await checkAndDisarm({
          config: this.config,
          pool: this.pool,
          log,
          onDisarm: () => this.metrics.disarms.inc(),
          defraggedSinceAlarm: this.alarmEpisode?.defraggedSinceAlarm,
          stalls: this.alarmEpisode && { watch: this.alarmEpisode.stalls, now: this.deps.clock.now() },
        });
      } catch (err) {
        log.error({ event: 'nospace.check.fail', error: errorMessage(err) }, `NOSPACE check failed: ${errorMessage(err)}`);
      }
    }
    this.updateNextRun();
    await this.publish();
  }

  /** Reads the alarm list; NOSPACE starts a recovery run at once, CORRUPT is reported every check. */
  private async checkAlarms(): Promise<void> {
    if (this.stopping) return;
    this.refreshTls();
    let alarms;
    try {
      alarms = await this.localAlarms();
    } catch (err) {
      if (this.stopping) return; // aborted by stop(): etcd may be fine
      this.deps.log.warn({ event: 'alarm.check.fail', error: errorMessage(err) }, `cannot read the alarm list: ${errorMessage(err)}`);
      // Published all the same: the textfile says etcd is unreachable, and goes stale only when
      // this daemon is not running.
      this.metrics.etcdReachable.set(0);
      await this.publish();
      return;
    }
    this.metrics.etcdReachable.set(1);
    this.metrics.recordAlarms(alarms);
    // A sample of the cluster's revision for NOSPACE compaction (nospace.keepHistory), always from
    // the local member, so that a revision going back means a restore and not a lagging member.
    await this.pool
      .get(this.config.etcd.endpoint)
      .revision({ signal: this.abort.signal }, 1)
      .then(
        (r) => this.revisions.record(this.deps.clock.now(), r),
        () => undefined,
      );
    await this.checkControl();
    await this.sampleTrend(alarms.some((a) => a.alarm === 'NOSPACE'));
    await this.publish();
    const corrupt = alarms.filter((a) => a.alarm === 'CORRUPT');
    for (const a of corrupt) {
      this.deps.log.error(
        { event: 'alarm.corrupt', member: hexId(a.memberId) },
        `CORRUPT alarm raised for member ${hexId(a.memberId)}: defragmentation stopped; ` +
          'an operator must check the data (never disarmed automatically)',
      );
    }
    if (!alarms.some((a) => a.alarm === 'NOSPACE')) {
      this.alarmEpisode = undefined;
      this.revisions.hold(undefined);
    } else {
      this.alarmEpisode ??= { defraggedSinceAlarm: false, since: this.deps.clock.now(), stalls: new StallWatch(this.config) };
      this.revisions.hold(this.alarmEpisode.since - this.config.nospace.keepHistory);
      if (!this.running)
        this.deps.log.warn(
          { event: 'alarm.nospace', members: alarms.filter((a) => a.alarm === 'NOSPACE').map((a) => hexId(a.memberId)) },
          'NOSPACE alarm raised: etcd refuses writes; starting recovery',
        );
      this.trigger('nospace');
    }
  }

  /**
   * A sample of the local member's own /metrics page (it answers while the member defragments):
   * the forecast of its quota and the compaction watch, as metrics, warnings, a record for
   * `status`, and a run started early when they call for one.
   */
  private async sampleTrend(nospace: boolean): Promise<void> {
    const c = this.config;
    const log = this.deps.log;
    // The forecast keeps a sample every window/240 at most (SampleLog): reading the page more often
    // than that (or than a twentieth of staleAfter) only costs the member and this process.
    const every = Math.min(c.forecast.window / 240, c.compaction.staleAfter / 20);
    if (this.deps.clock.now() - this.sampledAt < every) return;
    this.sampledAt = this.deps.clock.now();
    let page;
    try {
      page = await this.pool.get(c.etcd.endpoint).serverMetrics();
    } catch (err) {
      log.debug({ event: 'trend.sample.fail', error: errorMessage(err) }, `cannot read the local member's /metrics: ${errorMessage(err)}`);
      return;
    }
    if (page.dbSize === undefined || page.dbSizeInUse === undefined) return;
    const now = this.deps.clock.now();
    const sample: MemberSample = {
      at: now,
      dbSize: page.dbSize,
      inUse: page.dbSizeInUse,
      compactRevision: page.compactRevision,
      currentRevision: page.currentRevision,
    };
    this.samples.record(sample);
    this.durations.observePage(now, page);
    const member = this.localMember;
    if (!member) return; // named by the first inspection
    const resolved = resolveQuota(c.policy.quotaBytes, undefined, page.quotaBytes);
    const quota = enforcedQuota({ quotaBytes: resolved.bytes, etcdQuotaBytes: resolved.etcd });
    const fc = quota ? forecast(this.samples.all(), quota, now, c.forecast.minSpan) : undefined;
    const cs = this.compactionWatch.observe(sample);
    this.metrics.recordTrend(member, fc, cs);
    this.metrics.recordPredictedDefrag(member, this.durations.predict(page.dbSizeInUse)?.seconds);

    if (fc?.seconds !== undefined && fc.seconds * 1000 < c.forecast.warnBefore && now - this.warnedAt.forecast >= WARN_EVERY_MS) {
      this.warnedAt.forecast = now;
      const series = fc.basis === 'file' ? fc.file : fc.inUse;
      log.warn(
        {
          event: 'forecast.quota',
          member: member.hex,
          seconds: Math.round(fc.seconds),
          basis: fc.basis,
          bytesPerSecond: Math.round(series.bytesPerSecond),
          quotaBytes: quota,
        },
        `member ${member.hex} is forecast to reach its quota (${formatBytes(quota!)}) in ${formatDuration(fc.seconds * 1000)}: ` +
          `its ${fc.basis === 'file' ? 'db file' : 'data in use'} grows ${formatBytes(series.bytesPerSecond * 3600)} an hour` +
          (fc.basis === 'in-use'
            ? '; a defragment cannot help: compact history, delete data (etcd-defragd usage says what fills it) or raise --quota-backend-bytes'
            : '; a defragment gives back the free pages'),
      );
    }
    if (cs?.stale && now - this.warnedAt.stale >= WARN_EVERY_MS) {
      this.warnedAt.stale = now;
      log.warn(
        { event: 'compaction.stale', member: member.hex, ageSeconds: Math.round(cs.ageMs / 1000), historyRevisions: cs.historyRevisions },
        `nothing has compacted etcd's history for ${formatDuration(cs.ageMs)} while ${cs.grownRevisions} revisions were written ` +
          `(${cs.historyRevisions} revisions kept): check the API server's --etcd-compaction-interval (default 5m, 0 disables it) ` +
          "and etcd's --auto-compaction-mode/--auto-compaction-retention" +
          (c.compaction.fallback
            ? `; compacting it ourselves, keeping ${formatDuration(c.compaction.keepHistory)} (compaction.fallback)`
            : ''),
      );
    } else if (!cs?.stale && this.wasStale) {
      this.warnedAt.stale = 0;
      log.info({ event: 'compaction.moving', member: member.hex }, "etcd's history is being compacted again");
    }
    this.wasStale = Boolean(cs?.stale);
    if (nospace || this.stopping) return; // etcd refuses the record's write; NOSPACE recovery has its own order
    await this.publishTrend(member.hex, now, fc, cs);

    const early = earlyRun(c, now, sample, fc, cs, this.earlyAt);
    if (early.compaction) this.earlyAt.compaction = now;
    if (early.forecast) this.earlyAt.forecast = now;
    if (early.compaction || early.forecast) {
      this.early = { ...this.early, ...early };
      this.trigger('scheduled');
    }
  }

  /** The record `status` shows, every TREND_PUBLISH_MS (a write: not during NOSPACE, which refuses it). */
  private async publishTrend(hex: string, now: number, fc: Parameters<typeof trendRecord>[1], cs: Parameters<typeof trendRecord>[2]) {
    if (now - this.trendPublishedAt < Math.min(TREND_PUBLISH_MS, this.config.forecast.minSpan)) return;
    try {
      await this.pool
        .get(this.config.etcd.endpoint)
        .put(`${trendPrefix(this.config.coordination.prefix)}${hex}`, JSON.stringify(trendRecord(now, fc, cs)));
      this.trendPublishedAt = now;
    } catch (err) {
      this.deps.log.debug(
        { event: 'trend.publish.fail', error: errorMessage(err) },
        `cannot write the forecast for status: ${errorMessage(err)}`,
      );
    }
  }

  /** The alarm list, from the local member (the turn keeps the other members' endpoints). */
  private localAlarms() {
    return this.pool.get(this.config.etcd.endpoint).alarms({ signal: this.abort.signal });
  }

  /** Pause and halt as every daemon sees them (metrics), and a halt lifted by `resume`. */
  private async checkControl(): Promise<void> {
    let state;
    try {
      state = await readStops(this.pool.get(this.config.etcd.endpoint), this.config, { signal: this.abort.signal });
    } catch {
      return; // the alarm check that just worked will try again
    }
    const halt = haltOf(state);
    this.metrics.recordControl({ paused: Boolean(state.pause), halted: Boolean(halt) || Boolean(this.halted) });
    if (this.halted && this.haltRecorded && !halt) {
      this.deps.log.info(
        { event: 'halt.cleared' },
        'the integrity halt was cleared (etcd-defragd resume --integrity-checked): runs go again',
      );
      this.halted = undefined;
      this.haltRecorded = false;
      this.metrics.recordControl({ paused: Boolean(state.pause), halted: false });
    }
  }

  /** SIGHUP: a bad new config is rejected with its error and the old one kept. */
  reload(): boolean {
    const log = this.deps.log;
    let next: Config;
    try {
      next = loadConfig(this.deps.loadOptions).config;
    } catch (err) {
      log.error(
        { event: 'config.reload.fail', error: errorMessage(err) },
        `config reload rejected, keeping the running config: ${errorMessage(err)}`,
      );
      return false;
    }
    const prev = this.config;
    this.config = next;
    const tlsChanged = this.tls.reset(next);
    if (tlsChanged) log.info({ event: 'tls.changed' }, 'the TLS files changed on disk: reconnecting with them');
    this.revisions.setKeep(revisionKeep(next));
    this.samples.setWindow(next.forecast.window);
    this.compactionWatch.setStaleAfter(next.compaction.staleAfter);
    this.deps.log.level = next.log.level; // log.format applies at the next start
    const accessChanged =
      tlsChanged || JSON.stringify(prev.etcd) !== JSON.stringify(next.etcd) || JSON.stringify(prev.retry) !== JSON.stringify(next.retry);
    const turnChanged = JSON.stringify(prev.coordination) !== JSON.stringify(next.coordination);
    if (accessChanged || turnChanged) {
      if (!this.running) this.reloadConnections();
      else {
        log.warn({ event: 'config.reload.deferred' }, 'etcd and coordination settings apply once the current run ends');
        this.reconnectPending = true;
      }
    }
    this.schedule();
    if (prev.metrics.textfile !== next.metrics.textfile) void this.closeTextfile(prev.metrics.textfile);
    if (prev.nospace.checkInterval !== next.nospace.checkInterval && this.nospaceTimer) {
      this.nospaceTimer.cancel();
      this.nospaceTimer = this.deps.clock.every(next.nospace.checkInterval, () => void this.checkAlarms());
    }
    log.info(
      { event: 'config.reload', cron: next.schedule.cron, nextRun: this.task?.nextRuns(1)[0]?.toISOString() },
      `config reloaded; next run ${this.task?.nextRuns(1)[0]?.toISOString() ?? 'never'}`,
    );
    return true;
  }

  private reloadConnections(): void {
    this.reconnectPending = false;
    this.metrics.forgetMember(); // another endpoint may be another member; the next inspection says

    const oldTurn = this.turn;
    const oldPool = this.pool;
    // Another endpoint may be another cluster: its revisions are not ours.
    this.revisions = new RevisionLog(revisionKeep(this.config));
    this.samples.clear();
    this.compactionWatch = new CompactionWatch(this.config.compaction.staleAfter);
    this.durations = new DefragDurations();
    this.localMember = undefined;
    this.pool = this.newPool();
    this.turn = this.newTurn();
    void oldTurn.close().finally(() => oldPool.close());
    void this.join();
  }

  /**
   * First phase of a stop: no new runs; a run waiting for the turn gives up, a run defragmenting
   * finishes its member and gives the turn back. Then leave the turn and close everything.
   */
  async stop(): Promise<void> {
    if (this.stopping) return;
    this.stopping = true;
    this.pending = undefined;
    this.task?.stop();
    this.nospaceTimer?.cancel();
    this.abort.abort();
    if (this.running)
      this.deps.log.info({ event: 'daemon.stopping' }, 'stopping: letting the current run finish its member (signal again to exit now)');
    await this.idle();
    await this.turn.close();
    this.pool.close();
    await this.metrics.close();
    await this.closeTextfile(this.config.metrics.textfile);
    this.deps.log.info({ event: 'daemon.stop' }, 'etcd-defragd stopped');
  }

  /**
   * A clean stop (or a reload to another metrics.textfile) removes the file, after any write in
   * flight: a file left behind that stops changing then means a daemon that died.
   */
  private async closeTextfile(path: string): Promise<void> {
    if (!path) return;
    if (this.stopping) this.textfileClosed = true;
    await this.textfileWrites;
    try {
      await removeTextfile(path);
    } catch (err) {
      this.deps.log.warn({ event: 'metrics.textfile.fail', path, error: errorMessage(err) }, `cannot remove ${path}: ${errorMessage(err)}`);
    }
  }
}
