// The exposition as Prometheus tooling sees it: promtool's linter, conventional runtime names, label
// values present from the start, one member per daemon, last success apart from last run.
import assert from 'node:assert/strict';
import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { connect, createServer, type AddressInfo } from 'node:net';
import { ListenError, Metrics, SKIP_CHECKS } from '../../src/metrics.ts';
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

  it('exports only the member it owns, by ID and name, and drops its series when that member changes', async () => {
    const m = new Metrics();
    m.recordView(view('abc', 100, { quotaBytes: 1000, quotaSource: 'metrics', defragmenting: true }));
    let text = await m.registry.metrics();
    assert.deepEqual(series(text, 'etcd_defragd_member_db_size_bytes'), ['etcd_defragd_member_db_size_bytes{member="abc",name="m"} 100']);
    assert.deepEqual(series(text, 'etcd_defragd_member_db_size_in_use_bytes'), [
      'etcd_defragd_member_db_size_in_use_bytes{member="abc",name="m"} 40',
    ]);
    assert.deepEqual(series(text, 'etcd_defragd_member_quota_bytes'), ['etcd_defragd_member_quota_bytes{member="abc",name="m"} 1000']);
    assert.deepEqual(series(text, 'etcd_defragd_member_quota_usage_ratio'), [
      'etcd_defragd_member_quota_usage_ratio{member="abc",name="m"} 0.1',
    ]);
    assert.deepEqual(series(text, 'etcd_defragd_member_defragmenting'), ['etcd_defragd_member_defragmenting{member="abc",name="m"} 1']);
    assert.deepEqual(series(text, 'etcd_defragd_member_etcd_version_info'), [
      'etcd_defragd_member_etcd_version_info{member="abc",name="m",version="",notes=""} 1',
    ]);
    m.recordView(view('def', 200, { quotaBytes: 2000, quotaSource: 'config', name: 'cp-2' }));
    text = await m.registry.metrics();
    assert.doesNotMatch(text, /member="abc"/, 'the old member is gone');
    assert.deepEqual(series(text, 'etcd_defragd_member_quota_bytes'), ['etcd_defragd_member_quota_bytes{member="def",name="cp-2"} 2000']);
    assert.deepEqual(series(text, 'etcd_defragd_member_defragmenting'), ['etcd_defragd_member_defragmenting{member="def",name="cp-2"} 0']);
    m.defragStarted('def');
    assert.match(await m.registry.metrics(), /^etcd_defragd_member_defragmenting\{member="def",name="cp-2"\} 1$/m);
    m.defragEnded('def');
    assert.match(await m.registry.metrics(), /^etcd_defragd_member_defragmenting\{member="def",name="cp-2"\} 0$/m);
    m.recordView(view('def', 200, { name: 'cp-2' }));
    text = await m.registry.metrics();
    assert.deepEqual(series(text, 'etcd_defragd_member_quota_bytes'), [], 'no quota series while the quota is unknown');
    assert.deepEqual(series(text, 'etcd_defragd_member_quota_usage_ratio'), []);
    // A member added but not started has no name yet; once it has one, the unnamed series go.
    m.recordView(view('fed', 300, { name: '' }));
    m.recordView(view('fed', 300, { name: 'cp-3' }));
    text = await m.registry.metrics();
    assert.deepEqual(series(text, 'etcd_defragd_member_db_size_bytes'), [
      'etcd_defragd_member_db_size_bytes{member="fed",name="cp-3"} 300',
    ]);
    m.forgetMember();
    assert.doesNotMatch(await m.registry.metrics(), /^etcd_defragd_member_/m, 'forgetMember drops every member series');
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

describe('the metrics server (issue 20: what a local user can do to it)', () => {
  /** A raw TCP client: what it reads until the server closes, and how long that took. */
  const raw = (port: number, send: string) =>
    new Promise<{ text: string; ms: number }>((resolve) => {
      const started = Date.now();
      let text = '';
      const s = connect(port, '127.0.0.1', () => s.write(send));
      s.setEncoding('utf8');
      s.on('data', (d: string) => (text += d));
      s.on('error', () => undefined);
      s.on('close', () => resolve({ text, ms: Date.now() - started }));
    });

  it('answers GET and HEAD only: anything else gets 405 with Allow', async () => {
    const m = new Metrics();
    const address = await m.listen('127.0.0.1:0');
    try {
      const get = await fetch(`http://${address}/metrics`);
      assert.equal(get.status, 200);
      assert.match(await get.text(), /^etcd_defragd_build_info/m);
      const head = await fetch(`http://${address}/metrics`, { method: 'HEAD' });
      assert.equal(head.status, 200);
      assert.equal(await head.text(), '');
      for (const method of ['POST', 'PUT', 'DELETE', 'OPTIONS']) {
        const r = await fetch(`http://${address}/metrics`, { method, body: method === 'POST' || method === 'PUT' ? 'x' : undefined });
        assert.equal(r.status, 405, method);
        assert.equal(r.headers.get('allow'), 'GET, HEAD');
        await r.text();
      }
    } finally {
      await m.close();
    }
  });

  it('drops a client that is slow to send its headers, and connections past the cap', async () => {
    const m = new Metrics();
    const address = await m.listen('127.0.0.1:0', { headersTimeout: 300, requestTimeout: 600, checkInterval: 100, maxConnections: 2 });
    const port = Number(address.split(':')[1]);
    try {
      // Slowloris: a request line, then nothing.
      const slow = await raw(port, 'GET /metrics HTTP/1.1\r\nHost: x\r\n');
      assert.ok(slow.ms < 3_000, `closed after ${slow.ms} ms`);
      assert.match(slow.text, /^HTTP\/1\.1 408/);
      // Two connections held open; a third is closed at once, unanswered.
      const held = [connect(port, '127.0.0.1'), connect(port, '127.0.0.1')];
      await Promise.all(held.map((s) => new Promise((r) => s.once('connect', r))));
      await new Promise((r) => setTimeout(r, 50));
      const third = await raw(port, 'GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n');
      assert.equal(third.text, '', 'the third connection got no answer');
      for (const s of held) s.destroy();
      await new Promise((r) => setTimeout(r, 50));
      const after = await raw(port, 'GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n');
      assert.match(after.text, /^HTTP\/1\.1 200/, 'served again once they are gone');
    } finally {
      await m.close();
    }
  });

  it('a listen that fails is an error, not a log line: a taken port may be retried (exit 1), a foreign address may not (78)', async () => {
    const taken = createServer();
    await new Promise<void>((r) => taken.listen(0, '127.0.0.1', r));
    const port = (taken.address() as AddressInfo).port;
    try {
      await assert.rejects(new Metrics().listen(`127.0.0.1:${port}`), (e: unknown) => {
        assert.ok(e instanceof ListenError);
        assert.equal(e.retryable, true);
        assert.match(
          e.message,
          /^metrics\.listen: cannot serve metrics on "127\.0\.0\.1:\d+": the port is taken by another process; accepted: /,
        );
        return true;
      });
      // TEST-NET-3: an address this host does not have.
      await assert.rejects(
        new Metrics().listen('203.0.113.7:9479'),
        (e: unknown) => e instanceof ListenError && !e.retryable && /this host has no such address/.test(e.message),
      );
    } finally {
      taken.close();
    }
  });
});
