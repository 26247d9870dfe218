// Prometheus metrics (prom-client) on metrics.listen: /metrics and /healthz.
import { createServer, type Server } from 'node:http';
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';
import type { ClusterView } from './policy.ts';
import type { Outcome } from './pass.ts';

export class Metrics {
  readonly registry = new Registry();
  readonly lastRunTime = new Gauge({ name: 'etcd_defragd_last_run_timestamp_seconds', help: 'When the last run ended', registers: [this.registry] });
  readonly lastRunResult = new Gauge({ name: 'etcd_defragd_last_run_result', help: '1 for the outcome of the last run, 0 for the others', labelNames: ['outcome'], registers: [this.registry] });
  readonly runs = new Counter({ name: 'etcd_defragd_runs_total', help: 'Runs by outcome', labelNames: ['outcome', 'mode'], registers: [this.registry] });
  readonly skips = new Counter({ name: 'etcd_defragd_skipped_runs_total', help: 'Skipped runs by the check that stopped them', labelNames: ['check'], registers: [this.registry] });
  readonly defrags = new Counter({ name: 'etcd_defragd_defrags_total', help: 'Defragments of the local member by result', labelNames: ['result'], registers: [this.registry] });
  readonly reclaimed = new Counter({ name: 'etcd_defragd_reclaimed_bytes_total', help: 'Bytes of db file given back by defragments', registers: [this.registry] });
  readonly duration = new Histogram({ name: 'etcd_defragd_defrag_duration_seconds', help: 'Time a defragment took, until the member caught up', buckets: [0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600], registers: [this.registry] });
  readonly dbSize = new Gauge({ name: 'etcd_defragd_member_db_size_bytes', help: 'Member db file size at the last inspection', labelNames: ['member'], registers: [this.registry] });
  readonly dbInUse = new Gauge({ name: 'etcd_defragd_member_db_size_in_use_bytes', help: 'Member db size in use at the last inspection', labelNames: ['member'], registers: [this.registry] });
  readonly quotaUsage = new Gauge({ name: 'etcd_defragd_member_quota_usage_ratio', help: 'dbSize / the member quota at the last inspection', labelNames: ['member'], registers: [this.registry] });
  readonly alarms = new Gauge({ name: 'etcd_defragd_alarms', help: 'Alarms raised in the cluster at the last check', labelNames: ['alarm'], registers: [this.registry] });
  readonly nextRun = new Gauge({ name: 'etcd_defragd_next_run_timestamp_seconds', help: 'When the next scheduled run starts', registers: [this.registry] });
  readonly integrityFailures = new Counter({ name: 'etcd_defragd_integrity_failures_total', help: 'HashKV mismatches found after a defragment', registers: [this.registry] });
  readonly disarms = new Counter({ name: 'etcd_defragd_nospace_disarms_total', help: 'NOSPACE alarms disarmed by this daemon', registers: [this.registry] });
  private server: Server | undefined;

  constructor() {
    // The event-loop delay monitor samples every 10ms by default: a wake-up 100 times a second in a
    // daemon that is idle for hours. One sample a second is plenty here.
    collectDefaultMetrics({ register: this.registry, prefix: 'etcd_defragd_', eventLoopMonitoringPrecision: 1000 });
    this.alarms.set({ alarm: 'NOSPACE' }, 0);
    this.alarms.set({ alarm: 'CORRUPT' }, 0);
  }

  recordRun(outcome: Outcome, mode: string, check?: string): void {
    this.runs.inc({ outcome, mode });
    if (outcome === 'skipped') this.skips.inc({ check: check ?? 'other' });
    if (check === 'integrity') this.integrityFailures.inc();
    this.lastRunTime.set(Date.now() / 1000);
    for (const o of ['done', 'not-needed', 'skipped', 'failed']) this.lastRunResult.set({ outcome: o }, o === outcome ? 1 : 0);
  }

  recordView(view: ClusterView): void {
    for (const m of view.members) {
      if (!m.status) continue;
      this.dbSize.set({ member: m.hex }, m.status.dbSize);
      this.dbInUse.set({ member: m.hex }, m.status.dbSizeInUse);
      if (m.quotaBytes) this.quotaUsage.set({ member: m.hex }, m.status.dbSize / m.quotaBytes);
    }
  }

  recordAlarms(alarms: { alarm: string }[]): void {
    for (const name of ['NOSPACE', 'CORRUPT']) this.alarms.set({ alarm: name }, alarms.filter((a) => a.alarm === name).length);
  }

  async listen(address: string): Promise<string> {
    const i = address.lastIndexOf(':');
    const host = address.slice(0, i).replace(/^\[|\]$/g, '');
    const port = Number(address.slice(i + 1));
    this.server = createServer((req, res) => {
      if (req.url === '/metrics') {
        this.registry.metrics().then((body) => {
          res.writeHead(200, { 'content-type': this.registry.contentType });
          res.end(body);
        }, (err: Error) => {
          res.writeHead(500);
          res.end(err.message);
        });
      } else if (req.url === '/healthz') {
        res.writeHead(200, { 'content-type': 'text/plain' });
        res.end('ok\n');
      } else {
        res.writeHead(404);
        res.end();
      }
    });
    const server = this.server;
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(port, host, () => resolve());
    });
    const a = server.address();
    return typeof a === 'object' && a ? `${a.address.includes(':') ? `[${a.address}]` : a.address}:${a.port}` : address;
  }

  async close(): Promise<void> {
    const s = this.server;
    this.server = undefined;
    if (s) await new Promise<void>((resolve) => s.close(() => resolve()));
  }
}
