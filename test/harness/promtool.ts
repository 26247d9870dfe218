// Prometheus' own checker (Debian package `prometheus` ships /usr/bin/promtool; .ci/run installs it).
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { parse as parseYaml } from 'yaml';
import { REPO_ROOT } from './etcd-bin.ts';

/** promtool check metrics on an exposition: exit status and findings. */
export function promtoolCheck(text: string): { status: number | null; findings: string } {
  assert.ok(text.length > 0, 'nothing to check (promtool passes an empty input)');
  return promtool(['check', 'metrics'], text);
}

export function promtool(args: string[], input?: string): { status: number | null; findings: string } {
  const r = spawnSync('promtool', args, { input, encoding: 'utf8' });
  assert.equal(r.error, undefined, `promtool not runnable (apt-get install prometheus): ${r.error?.message}`);
  return { status: r.status, findings: `${r.stdout}${r.stderr}`.trim() };
}

/** Metric names in a PromQL expression (ours and the runtime's, by prefix; functions and labels never match). */
export function metricNames(expr: string): string[] {
  const noStrings = expr.replace(/"(?:[^"\\]|\\.)*"/g, '""');
  return [...noStrings.matchAll(/\b((?:etcd_defragd|process|nodejs|node)_[a-zA-Z0-9_:]*)/g)].map((m) => m[1]!);
}

/** Not ours, queried on purpose: node_exporter's mtime of our textfile. */
export const EXTERNAL_METRICS = new Set(['node_textfile_mtime_seconds']);

/**
 * Queried by deploy/ (alerts, dashboard panels) ahead of the change that exports them: the quota
 * forecast and the compaction series of issue 18, written in parallel. test/unit/deploy.test.ts
 * fails once Metrics exports one of them, to have it taken off this list.
 */
export const PENDING_METRICS = new Set([
  'etcd_defragd_member_time_to_quota_seconds',
  'etcd_defragd_history_revisions',
  'etcd_defragd_compacted_revision_age_seconds',
  'etcd_defragd_defrag_predicted_seconds',
]);

/** Every metric of ours that deploy/ (alert rules and Grafana dashboard) queries, less the pending ones. */
export function queriedMetricNames(): Set<string> {
  return new Set([...allQueriedMetricNames()].filter((n) => !PENDING_METRICS.has(n)));
}

/** Every metric of ours that deploy/ (alert rules and Grafana dashboard) queries. */
export function allQueriedMetricNames(): Set<string> {
  const rules = parseYaml(readFileSync(`${REPO_ROOT}/deploy/prometheus/etcd-defragd-rules.yaml`, 'utf8')) as {
    groups: { rules: { expr: string }[] }[];
  };
  const exprs = rules.groups.flatMap((g) => g.rules.map((r) => r.expr));
  exprs.push(...dashboardQueries().map((q) => q.expr));
  return new Set(exprs.flatMap(metricNames).filter((n) => !EXTERNAL_METRICS.has(n)));
}

/** Every PromQL query of the Grafana dashboard: panel targets, annotations and template variables. */
export function dashboardQueries(): { where: string; expr: string }[] {
  const d = JSON.parse(readFileSync(`${REPO_ROOT}/deploy/grafana/etcd-defragd-dashboard.json`, 'utf8')) as {
    panels: { title: string; targets?: { refId: string; expr?: string }[] }[];
    templating: { list: { name: string; type: string; query?: unknown }[] };
    annotations?: { list: { name: string; expr?: string }[] };
  };
  return [
    ...d.panels.flatMap((p) => (p.targets ?? []).map((t) => ({ where: `panel "${p.title}" ${t.refId}`, expr: t.expr ?? '' }))),
    ...(d.annotations?.list ?? []).map((a) => ({ where: `annotation "${a.name}"`, expr: a.expr ?? '' })),
    ...d.templating.list
      .filter((v) => v.type === 'query' && typeof v.query === 'string')
      .map((v) => ({ where: `variable ${v.name}`, expr: v.query as string })),
  ];
}
