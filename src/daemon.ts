// The long-running daemon: scheduled runs (node-cron), NOSPACE watch, metrics, reload and a
// two-phase stop. It never exits because etcd is unreachable: it logs, counts, and tries again.
import { randomBytes } from 'node:crypto';
import { createTask, type ScheduledTask } from 'node-cron';
import { loadConfig, type Config, type LoadOptions } from './config.ts';
import { accessFromConfig, ClientPool, type MemberClient } from './etcd.ts';
import { errorMessage } from './errors.ts';
import type { Log } from './log.ts';
import { Metrics } from './metrics.ts';
import { checkAndDisarm } from './nospace.ts';
import { RevisionLog } from './history.ts';
import { inspect } from './inspect.ts';
import { runPass, type Clock, type HashKVFn, type PassResult } from './pass.ts';
import { quotaMismatch, type ClusterView } from './policy.ts';
import { TlsWatch } from './tls-files.ts';
import { Turn } from './turn.ts';

export interface DaemonDeps {
  log: Log;
  clock: Clock;
  /** Reload reads the same file and environment again. */
  loadOptions: LoadOptions;
  hashKV?: HashKVFn;
}

type Mode = 'scheduled' | 'nospace';

/**
 * Revision samples are kept keepHistory plus this long: a recovery that starts within it still
 * finds the revision keepHistory before the alarm (a sample every checkInterval: ~400 at 10s).
 */
const REVISION_LOG_SLACK = 3_600_000;

export class Daemon {
  private config: Config;
  private pool: ClientPool;
  private turn: Turn;
  private task: ScheduledTask | undefined;
  private nospaceTimer: NodeJS.Timeout | undefined;
  private running: Promise<void> | undefined;
  private pending: Mode | undefined;
  private stopping = false;
  private readonly abort = new AbortController();
  private lastView: ClusterView | undefined;
  private reconnectPending = false;
  /** While a NOSPACE alarm lasts: whether this daemon has defragmented its member since it was raised. */
  private alarmEpisode: { defragged: boolean; since: number } | undefined;
  /** Set by an integrity mismatch: no more defragments from this daemon until it is restarted. */
  private halted: string | undefined;
  /** Renewed certificates (kubeadm certs renew, or a fresh staged copy) reconnect the clients. */
  private readonly tls: TlsWatch;
  readonly metrics = new Metrics();
  /** The cluster's revision over time, for NOSPACE compaction (nospace.keepHistory). */
  private revisions: RevisionLog;
  metricsAddress: string | undefined;

  constructor(config: Config, private readonly deps: DaemonDeps) {
    this.config = config;
    this.pool = new ClientPool(accessFromConfig(config));
    this.turn = this.newTurn();
    this.revisions = new RevisionLog(config.nospace.keepHistory + REVISION_LOG_SLACK);
    this.tls = new TlsWatch(config);
  }

  /** Before each run and alarm check: new certificate files mean new connections (between runs). */
  private refreshTls(): void {
    if (!this.tls.changed()) return;
    this.deps.log.info({ event: 'tls.changed' }, 'the TLS files changed on disk: reconnecting with them');
    if (this.running) this.reconnectPending = true;
    else this.reloadConnections();
  }

  private newTurn(): Turn {
    return new Turn(
      { prefix: this.config.coordination.prefix, leaseTTL: this.config.coordination.leaseTTL, command: 'etcd-defragd run', keepSpares: true },
      { endpoints: () => this.endpoints(), log: this.deps.log, now: this.deps.clock.now, sleep: this.deps.clock.sleep },
    );
  }

  /** Other members first: the local one may be the one defragmenting. */
  private endpoints(): MemberClient[] {
    const local = this.config.etcd.endpoint;
    const others = (this.lastView?.members ?? []).filter((m) => !m.isLocal && !m.isLearner && m.status).map((m) => m.endpoint);
    return [...others, local].map((e) => this.pool.get(e));
  }

  async start(): Promise<void> {
    const c = this.config;
    const log = this.deps.log;
    if (c.metrics.listen) {
      try {
        this.metricsAddress = await this.metrics.listen(c.metrics.listen);
      } catch (err) {
        log.error({ event: 'metrics.fail', listen: c.metrics.listen, error: errorMessage(err) }, `cannot serve metrics on ${c.metrics.listen}: ${errorMessage(err)}`);
      }
    }
    this.schedule();
    log.info({ event: 'daemon.start', endpoint: c.etcd.endpoint, cron: c.schedule.cron, timezone: c.schedule.timezone, metrics: this.metricsAddress ?? '', nextRun: this.task?.getNextRun()?.toISOString() },
      `etcd-defragd started for ${c.etcd.endpoint}; runs at "${c.schedule.cron}" (${c.schedule.timezone}), next ${this.task?.getNextRun()?.toISOString() ?? 'never'}`);
    void this.join();
    void this.checkQuota();
    this.nospaceTimer = setInterval(() => void this.checkAlarms(), c.nospace.checkInterval);
    if (c.schedule.runOnStart) this.trigger('scheduled');
    else void this.checkAlarms();
  }

  /** Joins the cluster-wide turn early, while writes work, so it does not need a spare later. */
  private async join(): Promise<void> {
    try {
      const s = await this.pool.get(this.config.etcd.endpoint).status({ log: this.deps.log, signal: this.abort.signal });
      this.turn.identify(s.memberId);
      await this.turn.register();
    } catch (err) {
      this.deps.log.warn({ event: 'turn.register.fail', error: errorMessage(err) }, `could not join the cluster-wide turn yet: ${errorMessage(err)}; trying again at the next run`);
    }
  }

  /** At start: say which quota each run will judge the local member by, and warn on a mismatch. */
  private async checkQuota(): Promise<void> {
    const c = this.config;
    try {
      const view = await inspect(this.pool, c.etcd.endpoint, { log: this.deps.log, signal: this.abort.signal }, { memberAttempts: 1, linearizableRead: false, quotaBytes: c.policy.quotaBytes });
      const local = view.local;
      const mismatch = quotaMismatch(local);
      if (mismatch) this.deps.log.warn({ event: 'quota.mismatch', member: local.hex, configured: local.quotaBytes, etcd: local.etcdQuotaBytes }, mismatch);
      else if (local.quotaBytes === undefined) this.deps.log.warn({ event: 'quota.unknown', member: local.hex }, local.quotaError ?? 'the quota of the local member is unknown');
      else this.deps.log.info({ event: 'quota', member: local.hex, quotaBytes: local.quotaBytes, source: local.quotaSource }, `member ${local.hex}: quota ${local.quotaBytes} bytes (from ${local.quotaSource === 'config' ? 'policy.quotaBytes' : local.quotaSource === 'status' ? "etcd's Status" : "etcd's /metrics"})`);
    } catch (err) {
      this.deps.log.debug({ event: 'quota.check.fail', error: errorMessage(err) }, `could not check the quota yet: ${errorMessage(err)}`);
    }
  }

  private schedule(): void {
    const c = this.config;
    this.task?.destroy();
    this.task = createTask(c.schedule.cron, () => this.trigger('scheduled'), { timezone: c.schedule.timezone, name: 'etcd-defragd', noOverlap: false });
    this.task.start();
    this.updateNextRun();
  }

  private updateNextRun(): void {
    const next = this.task?.getNextRun();
    if (next) this.metrics.nextRun.set(next.getTime() / 1000);
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
    let result: PassResult | undefined;
    if (this.halted) {
      log.error({ event: 'run.skip', check: 'halt', mode }, `run skipped: halted after an integrity mismatch (${this.halted}); check the members, then restart etcd-defragd`);
      this.metrics.recordRun('skipped', mode, 'halt');
      return;
    }
    try {
      if (!this.turn.leaseId) await this.join();
      result = await runPass({
        config: this.config, pool: this.pool, log, clock: this.deps.clock, turn: this.turn, signal: this.abort.signal, hashKV: this.deps.hashKV,
        revisions: this.revisions,
        seen: (v) => {
          this.lastView = v;
          if (v.local.status) this.revisions.record(this.deps.clock.now(), v.local.status.revision);
          this.metrics.recordView(v);
          this.metrics.recordAlarms(v.alarms);
          if (!this.turn.leaseId) this.turn.identify(v.local.id);
        },
        onDefrag: (d) => {
          this.metrics.defrags.inc({ result: d.ok ? 'ok' : 'failed' });
          if (d.ok) {
            this.metrics.reclaimed.inc(d.reclaimed);
            this.metrics.duration.observe(d.tookMs / 1000);
          }
        },
      }, { mode, runId, defraggedThisAlarm: this.alarmEpisode?.defragged, alarmSeenAt: this.alarmEpisode?.since });
      this.metrics.recordRun(result.outcome, mode, result.check);
      if (mode === 'nospace' && result.outcome === 'done' && this.alarmEpisode) this.alarmEpisode.defragged = true;
      if (result.check === 'integrity') this.halted = result.reason;
    } catch (err) {
      log.error({ event: 'run.fail', mode, error: errorMessage(err) }, `run failed: ${errorMessage(err)}`);
      this.metrics.recordRun('failed', mode);
    }
    if (mode === 'nospace' && !this.stopping && !this.halted) {
      try {
        await checkAndDisarm({
          config: this.config, pool: this.pool, log, onDisarm: () => this.metrics.disarms.inc(), localDefragged: this.alarmEpisode?.defragged,
          registered: async () => {
            const v = await this.turn.view();
            const ps = [...v.participants.values()].filter((p) => !p.spare && p.tickets.length > 0);
            return { members: new Set(ps.flatMap((p) => (p.info.memberId ? [p.info.memberId] : []))), unknown: ps.filter((p) => !p.info.memberId).length };
          },
        });
      } catch (err) {
        log.error({ event: 'nospace.check.fail', error: errorMessage(err) }, `NOSPACE check failed: ${errorMessage(err)}`);
      }
    }
    this.updateNextRun();
  }

  /** Reads the alarm list; NOSPACE starts a recovery run at once, CORRUPT is reported every check. */
  private async checkAlarms(): Promise<void> {
    if (this.stopping) return;
    this.refreshTls();
    let alarms;
    try {
      alarms = await this.turnEndpointsAlarms();
    } catch (err) {
      this.deps.log.warn({ event: 'alarm.check.fail', error: errorMessage(err) }, `cannot read the alarm list: ${errorMessage(err)}`);
      return;
    }
    this.metrics.recordAlarms(alarms);
    // A sample of the cluster's revision for NOSPACE compaction (nospace.keepHistory), always from
    // the local member, so that a revision going back means a restore and not a lagging member.
    await this.pool.get(this.config.etcd.endpoint).revision({ signal: this.abort.signal }, 1)
      .then((r) => this.revisions.record(this.deps.clock.now(), r), () => undefined);
    const corrupt = alarms.filter((a) => a.alarm === 'CORRUPT');
    for (const a of corrupt) {
      this.deps.log.error({ event: 'alarm.corrupt', member: BigInt(a.memberId).toString(16) }, `CORRUPT alarm raised for member ${BigInt(a.memberId).toString(16)}: defragmentation stopped; an operator must check the data (never disarmed automatically)`);
    }
    if (!alarms.some((a) => a.alarm === 'NOSPACE')) {
      this.alarmEpisode = undefined;
      this.revisions.hold(undefined);
    } else {
      this.alarmEpisode ??= { defragged: false, since: this.deps.clock.now() };
      this.revisions.hold(this.alarmEpisode.since - this.config.nospace.keepHistory);
      if (!this.running) this.deps.log.warn({ event: 'alarm.nospace', members: alarms.filter((a) => a.alarm === 'NOSPACE').map((a) => BigInt(a.memberId).toString(16)) }, 'NOSPACE alarm raised: etcd refuses writes; starting recovery');
      this.trigger('nospace');
    }
  }

  private async turnEndpointsAlarms() {
    let last: unknown;
    for (const c of this.endpoints().reverse()) {
      try {
        return await c.alarms({ signal: this.abort.signal });
      } catch (err) {
        last = err;
      }
    }
    throw last;
  }

  /** SIGHUP: a bad new config is rejected with its error and the old one kept. */
  reload(): boolean {
    const log = this.deps.log;
    let next: Config;
    try {
      next = loadConfig(this.deps.loadOptions).config;
    } catch (err) {
      log.error({ event: 'config.reload.fail', error: errorMessage(err) }, `config reload rejected, keeping the running config: ${errorMessage(err)}`);
      return false;
    }
    const prev = this.config;
    this.config = next;
    const tlsChanged = this.tls.reset(next);
    this.revisions.setKeep(next.nospace.keepHistory + REVISION_LOG_SLACK);
    this.deps.log.level = next.log.level; // log.format applies at the next start
    const accessChanged = tlsChanged || JSON.stringify(prev.etcd) !== JSON.stringify(next.etcd) || JSON.stringify(prev.retry) !== JSON.stringify(next.retry);
    const turnChanged = JSON.stringify(prev.coordination) !== JSON.stringify(next.coordination);
    if (accessChanged || turnChanged) {
      if (!this.running) this.reloadConnections();
      else {
        log.warn({ event: 'config.reload.deferred' }, 'etcd and coordination settings apply once the current run ends');
        this.reconnectPending = true;
      }
    }
    this.schedule();
    if (prev.nospace.checkInterval !== next.nospace.checkInterval && this.nospaceTimer) {
      clearInterval(this.nospaceTimer);
      this.nospaceTimer = setInterval(() => void this.checkAlarms(), next.nospace.checkInterval);
    }
    log.info({ event: 'config.reload', cron: next.schedule.cron, nextRun: this.task?.getNextRun()?.toISOString() }, `config reloaded; next run ${this.task?.getNextRun()?.toISOString() ?? 'never'}`);
    return true;
  }

  private reloadConnections(): void {
    this.reconnectPending = false;
    const oldTurn = this.turn;
    const oldPool = this.pool;
    // Another endpoint may be another cluster: its revisions are not ours.
    this.revisions = new RevisionLog(this.config.nospace.keepHistory + REVISION_LOG_SLACK);
    this.pool = new ClientPool(accessFromConfig(this.config));
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
    this.task?.destroy();
    if (this.nospaceTimer) clearInterval(this.nospaceTimer);
    this.abort.abort();
    if (this.running) this.deps.log.info({ event: 'daemon.stopping' }, 'stopping: letting the current run finish its member (signal again to exit now)');
    await this.idle();
    await this.turn.close();
    this.pool.close();
    await this.metrics.close();
    this.deps.log.info({ event: 'daemon.stop' }, 'etcd-defragd stopped');
  }
}
