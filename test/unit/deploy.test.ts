// The shipped alert rules and dashboard: promtool checks and unit-tests the rules, every metric
// they query is one etcd-defragd exports (or node_exporter's textfile mtime, or one still pending),
// and every alert links a runbook that exists.
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { parse as parseYaml } from 'yaml';
import type { MemberStatus } from '../../src/view.ts';
import { Metrics } from '../../src/metrics.ts';
import {
  allQueriedMetricNames,
  dashboardQueries,
  metricNames,
  PENDING_METRICS,
  promtool,
  queriedMetricNames,
} from '../harness/promtool.ts';

const DEPLOY = join(import.meta.dirname, '../../deploy');
const RULES = join(DEPLOY, 'prometheus/etcd-defragd-rules.yaml');
const RULE_TESTS = ['etcd-defragd-rules.test.yaml', 'etcd-defragd-rules.long.test.yaml'].map((f) => join(DEPLOY, 'prometheus', f));
const RUNBOOKS = join(import.meta.dirname, '../../docs/runbooks.md');
const RUNBOOK_BASE = 'https://github.com/etcd-defragd/etcd-defragd/blob/main/docs/runbooks.md#';

interface Rule {
  alert: string;
  expr: string;
  annotations?: Record<string, string>;
}
const alertRules = () => (parseYaml(readFileSync(RULES, 'utf8')) as { groups: { rules: Rule[] }[] }).groups.flatMap((g) => g.rules);

/** The anchors GitHub gives the headings of a Markdown file: lower case, punctuation dropped, spaces to dashes. */
function anchors(markdown: string): Set<string> {
  const headings = [...markdown.matchAll(/^#{1,6} (.+)$/gm)].map((m) => m[1]!.trim());
  return new Set(
    headings.map((h) =>
      h
        .toLowerCase()
        .replace(/[^\p{L}\p{N} _-]/gu, '')
        .replace(/ /g, '-'),
    ),
  );
}
const DASHBOARD = join(DEPLOY, 'grafana/etcd-defragd-dashboard.json');

async function exposedNames(): Promise<Set<string>> {
  const m = new Metrics('0.0.0');
  m.duration.observe(1);
  // the member's series appear with the first inspection
  const local = {
    id: '10',
    hex: 'a',
    name: 'm',
    endpoint: 'x',
    isLearner: false,
    isLocal: true,
    status: { dbSize: 2, dbSizeInUse: 1 } as MemberStatus,
    quotaBytes: 100,
  };
  m.recordView({ members: [local], local, alarms: [] });
  const text = await m.registry.metrics();
  return new Set(
    text
      .split('\n')
      .filter((l) => l && !l.startsWith('#'))
      .map((l) => l.match(/^[a-zA-Z_:][a-zA-Z0-9_:]*/)![0]),
  );
}

describe('shipped rules and dashboard', () => {
  it('promtool check rules finds no problem', () => {
    const r = promtool(['check', 'rules', RULES]);
    assert.equal(r.status, 0, r.findings);
    assert.match(r.findings, /SUCCESS: \d+ rules found/);
  });

  it('promtool test rules passes the rules unit tests', () => {
    const r = promtool(['test', 'rules', ...RULE_TESTS]);
    assert.equal(r.status, 0, r.findings);
    assert.match(r.findings, /SUCCESS/);
  });

  it('the rules cover what the issue asks for', () => {
    const alerts = alertRules().map((r) => r.alert);
    for (const a of [
      'EtcdDefragdNoSuccessfulRun',
      'EtcdDefragdRunsSkipped',
      'EtcdNoSpaceNotRecovered',
      'EtcdDefragdIntegrityHalt',
      'EtcdQuotaNearlyFullAfterDefrag',
      'EtcdDefragdDown',
      'EtcdDefragdAbsent',
      'EtcdDefragdEtcdUnreachable',
      'EtcdQuotaForecast',
      'EtcdCompactionStale',
    ])
      assert.ok(alerts.includes(a), a);
  });

  it('every alert has a runbook_url whose anchor is a section of docs/runbooks.md', () => {
    const sections = anchors(readFileSync(RUNBOOKS, 'utf8'));
    for (const r of alertRules()) {
      const url = r.annotations?.runbook_url ?? '';
      assert.ok(url.startsWith(RUNBOOK_BASE), `${r.alert}: runbook_url ${JSON.stringify(url)} does not start with ${RUNBOOK_BASE}`);
      const anchor = url.slice(RUNBOOK_BASE.length);
      assert.equal(anchor, r.alert.toLowerCase(), `${r.alert}: the anchor is the alert's own section`);
      assert.ok(sections.has(anchor), `${r.alert}: docs/runbooks.md has no section #${anchor}`);
    }
  });

  it('the anchors are the ones GitHub makes', () => {
    assert.deepEqual(
      [...anchors('# Runbooks\n\n## EtcdDefragdDown\n### After an integrity halt\n## Status, pause and resume\n')],
      ['runbooks', 'etcddefragddown', 'after-an-integrity-halt', 'status-pause-and-resume'],
    );
  });

  it('metrics still pending are queried, and not exported yet (once exported, drop them from PENDING_METRICS)', async () => {
    const exposed = await exposedNames();
    const queried = allQueriedMetricNames();
    for (const n of PENDING_METRICS) {
      assert.ok(queried.has(n), `${n} is pending but nothing in deploy/ queries it`);
      assert.ok(!exposed.has(n), `${n} is exported now: remove it from PENDING_METRICS in test/harness/promtool.ts`);
    }
  });

  it('every metric the rules and the dashboard query exists', async () => {
    const exposed = await exposedNames();
    const names = queriedMetricNames();
    assert.ok(names.size > 15, [...names].join(', '));
    const missing = [...names].filter((n) => !exposed.has(n));
    assert.deepEqual(missing, [], `queried but not exported: ${missing.join(', ')}`);
  });

  it('the name extraction finds a misspelt metric', () => {
    assert.deepEqual(
      metricNames('sum by (check) (increase(etcd_defragd_skiped_runs_total{check!="x_y"}[1h])) / process_cpu_seconds_total'),
      ['etcd_defragd_skiped_runs_total', 'process_cpu_seconds_total'],
    );
  });

  it('every dashboard query selects by $cluster and $job (and $instance), each metric it names', () => {
    const queries = dashboardQueries();
    assert.ok(queries.length > 25, String(queries.length));
    assert.ok(
      queries.some((q) => q.where.startsWith('annotation')),
      'an annotation per defragment',
    );
    for (const { where, expr } of queries) {
      // Each metric name with its own matchers: {…} right after it (label_values' too).
      const selectors = [...expr.matchAll(/\b((?:etcd_defragd|process|nodejs)_[a-zA-Z0-9_:]*)(\{[^}]*\})?/g)];
      assert.ok(selectors.length > 0, `${where}: no metric in ${expr}`);
      for (const [, name, matchers = ''] of selectors) {
        const need =
          where === 'variable cluster' ? [] : where === 'variable job' ? ['cluster=~"$cluster"'] : ['cluster=~"$cluster"', 'job=~"$job"'];
        if (where.startsWith('panel') || where.startsWith('annotation')) need.push('instance=~"$instance"');
        for (const m of need) assert.ok(matchers.includes(m), `${where}: ${name} is not selected by ${m}: ${expr}`);
      }
    }
  });

  it("the process panels show etcd-defragd's own job only, not node_exporter's process_*", () => {
    for (const { where, expr } of dashboardQueries())
      for (const [, name, matchers = ''] of expr.matchAll(/\b((?:process|nodejs)_[a-zA-Z0-9_:]*)(\{[^}]*\})?/g))
        assert.ok(matchers.includes('job=~".*etcd-defragd.*"'), `${where}: ${name} without job=~".*etcd-defragd.*"`);
  });

  it('the dashboard is valid JSON with unique panel ids, all on the datasource variable', () => {
    const d = JSON.parse(readFileSync(DASHBOARD, 'utf8')) as { panels: { id: number; datasource: { uid: string } }[] };
    assert.ok(d.panels.length > 10);
    assert.equal(new Set(d.panels.map((p) => p.id)).size, d.panels.length);
    for (const p of d.panels) assert.equal(p.datasource.uid, '${datasource}');
  });
});
