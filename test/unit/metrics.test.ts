// The exposition as Prometheus tooling sees it: promtool's linter, conventional runtime names, label
// values present from the start, one member per daemon, last success apart from last run.
import assert from 'node:assert/strict';
import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { Metrics, SKIP_CHECKS } from '../../src/metrics.ts';
import { promtoolCheck } from '../harness/promtool.ts';
import { decimalId, type ClusterView, type MemberStatus, type MemberView } from '../../src/view.ts';

const SRC = join(import.meta.dirname, '../../src');

function view(localHex: string, dbSize = 100, extra: Partial<MemberView> = {}): ClusterView {
  const status = { dbSize, dbSizeInUse: 40 } as MemberStatus;
  const local: MemberView = {
    id: decimalId(localHex),
    hex: localHex,
    name: 'm',
    endpoint: 'x',
    isLearner: false,
    isLocal: true,
    status,
    ...extra,
  };
  const other: MemberView = { id: '7', hex: '7', name: 'o', endpoint: 'y', isLearner: false, isLocal: false, status };
  return { members: [local, other], local, alarms: [] };
}

const series = (text: string, name: string) => text.split('\n').filter((l) => l.startsWith(`${name}{`) || l.startsWith(`${name} `));

describe('metrics', () => {
  it('pass promtool check metrics with no findings, HTTP and textfile alike', async () => {
    const m = new Metrics('1.2.3');
    m.recordRun('done', 'scheduled');
    m.recordRun('skipped', 'nospace', 'turn');
    m.recordView(view('abc', 100, { quotaBytes: 2 ** 31, quotaSource: 'config' }));
    m.duration.observe(3);
    for (const text of [await m.registry.metrics(), await m.own.metrics()]) {
      const r = promtoolCheck(text);
      assert.equal(r.findings, '', r.findings);
      assert.equal(r.status, 0);
    }
  });

  it('process and runtime metrics under conventional names; no gauge named *_total', async () => {
    const text = await new Metrics().registry.metrics();
    assert.match(text, /^process_cpu_seconds_total /m);
    assert.match(text, /^process_resident_memory_bytes /m);
    assert.match(text, /^nodejs_heap_size_total_bytes /m);
    assert.doesNotMatch(text, /^etcd_defragd_(process|nodejs)_/m);
    const gauges = [...text.matchAll(/^# TYPE (\S+) gauge$/gm)].map((x) => x[1]!);
    assert.ok(gauges.length > 10);
    assert.deepEqual(
      gauges.filter((g) => g.endsWith('_total')),
      [],
    );
  });

  it('the textfile gets only etcd_defragd_* (node_exporter exports its own process_*)', async () => {
    const text = await new Metrics().own.metrics();
    const names = new Set([...text.matchAll(/^# TYPE (\S+)/gm)].map((x) => x[1]!));
    assert.ok(names.has('etcd_defragd_build_info'));
    for (const n of names) assert.match(n, /^etcd_defragd_/);
  });

  it('every label value that can occur is there from the start, at 0', async () => {
    const text = await new Metrics('9.9.9').registry.metrics();
    assert.equal(series(text, 'etcd_defragd_runs_total').length, 8);
    assert.ok(series(text, 'etcd_defragd_runs_total').every((l) => l.endsWith(' 0')));
    assert.deepEqual(
      series(text, 'etcd_defragd_skipped_runs_total')
        .map((l) => l.match(/check="([^"]+)"/)![1])
        .sort(),
      [...SKIP_CHECKS].sort(),
    );
    assert.equal(series(text, 'etcd_defragd_defrags_total').length, 2);
    assert.equal(series(text, 'etcd_defragd_last_run_result').length, 4);
    assert.equal(series(text, 'etcd_defragd_alarms').length, 2);
    assert.match(text, /^etcd_defragd_build_info\{version="9\.9\.9",nodejs="v\d+[^"]*"\} 1$/m);
    for (const g of [
      'etcd_defragd_paused',
      'etcd_defragd_halted',
      'etcd_defragd_turn_held',
      'etcd_defragd_last_success_timestamp_seconds',
    ]) {
      assert.deepEqual(series(text, g), [`${g} 0`]);
    }
  });

  it('a skipped run moves the last-run timestamp, not the last-success one', async () => {
    const m = new Metrics();
    m.recordRun('skipped', 'scheduled', 'status');
    let text = await m.registry.metrics();
    assert.match(series(text, 'etcd_defragd_last_run_timestamp_seconds')[0]!, / 1\d{9}(\.\d+)?$/);
    assert.equal(series(text, 'etcd_defragd_last_success_timestamp_seconds')[0], 'etcd_defragd_last_success_timestamp_seconds 0');
    assert.match(
      series(text, 'etcd_defragd_skipped_runs_total').find((l) => l.includes('check="status"'))!,
      / 1$/,
    );
    m.recordRun('not-needed', 'scheduled');
    text = await m.registry.metrics();
    assert.match(series(text, 'etcd_defragd_last_success_timestamp_seconds')[0]!, / 1\d{9}(\.\d+)?$/);
  });

  it('exports only the member it owns, and drops its series when that member changes', async () => {
    const m = new Metrics();
    m.recordView(view('abc', 100, { quotaBytes: 1000, quotaSource: 'metrics', defragmenting: true }));
    let text = await m.registry.metrics();
    assert.deepEqual(series(text, 'etcd_defragd_member_db_size_bytes'), ['etcd_defragd_member_db_size_bytes{member="abc"} 100']);
    assert.deepEqual(series(text, 'etcd_defragd_member_quota_bytes'), ['etcd_defragd_member_quota_bytes{member="abc"} 1000']);
    assert.deepEqual(series(text, 'etcd_defragd_member_quota_usage_ratio'), ['etcd_defragd_member_quota_usage_ratio{member="abc"} 0.1']);
    assert.deepEqual(series(text, 'etcd_defragd_member_defragmenting'), ['etcd_defragd_member_defragmenting{member="abc"} 1']);
    m.recordView(view('def', 200, { quotaBytes: 2000, quotaSource: 'config' }));
    text = await m.registry.metrics();
    assert.doesNotMatch(text, /member="abc"/, 'the old member is gone');
    assert.deepEqual(series(text, 'etcd_defragd_member_quota_bytes'), ['etcd_defragd_member_quota_bytes{member="def"} 2000']);
    assert.deepEqual(series(text, 'etcd_defragd_member_defragmenting'), ['etcd_defragd_member_defragmenting{member="def"} 0']);
    m.defragStarted('def');
    assert.match(await m.registry.metrics(), /^etcd_defragd_member_defragmenting\{member="def"\} 1$/m);
    m.defragEnded('def');
    assert.match(await m.registry.metrics(), /^etcd_defragd_member_defragmenting\{member="def"\} 0$/m);
    m.recordView(view('def', 200));
    text = await m.registry.metrics();
    assert.deepEqual(series(text, 'etcd_defragd_member_quota_bytes'), [], 'no quota series while the quota is unknown');
    assert.deepEqual(series(text, 'etcd_defragd_member_quota_usage_ratio'), []);
  });

  it('turn held is read when scraped', async () => {
    const m = new Metrics();
    let held = false;
    m.watchTurn(() => held);
    assert.match(await m.registry.metrics(), /^etcd_defragd_turn_held 0$/m);
    held = true;
    assert.match(await m.registry.metrics(), /^etcd_defragd_turn_held 1$/m);
  });

  it('SKIP_CHECKS names every check a skipped run can report in the sources', () => {
    const found = new Set<string>();
    for (const f of readdirSync(SRC).filter((n) => n.endsWith('.ts'))) {
      for (const x of readFileSync(join(SRC, f), 'utf8').matchAll(/check: '([a-z-]+)'/g)) found.add(x[1]!);
    }
    found.delete('integrity'); // a failed run, counted by etcd_defragd_integrity_failures_total
    assert.ok(found.size >= 10, [...found].join(','));
    for (const c of found)
      assert.ok((SKIP_CHECKS as readonly string[]).includes(c), `check "${c}" is missing from SKIP_CHECKS in src/metrics.ts`);
  });
});
