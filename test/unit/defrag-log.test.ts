// etcd's defrag log (test/harness/defrag-log.ts), on lines as etcd 3.4.23 and 3.5.30 write them
// (copied from member logs of the harness, paths and the long server-start lines shortened).
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { assertNoOverlap, goDurationMs, parseDefragLog, type DefragEvent } from '../harness/defrag-log.ts';

const lines = (...ls: string[]): string => `${ls.join('\n')}\n`;

const v34 = {
  server:
    '{"level":"info","ts":"2026-11-28T19:21:25.283Z","caller":"embed/etcd.go:305","msg":"starting an etcd server","etcd-version":"3.4.23","name":"m0","data-dir":"/tmp/etcd-3.4-zwO6fO/m0.etcd"}',
  start: '{"level":"info","ts":"2026-11-28T19:21:25.617Z","caller":"v3rpc/maintenance.go:82","msg":"starting defragment"}',
  before:
    '{"level":"info","ts":"2026-11-28T19:21:25.619Z","caller":"backend/backend.go:403","msg":"defragmenting","path":"/tmp/etcd-3.4-zwO6fO/m0.etcd/member/snap/db","current-db-size-bytes":122880,"current-db-size":"123 kB","current-db-size-in-use-bytes":118784,"current-db-size-in-use":"119 kB"}',
  after:
    '{"level":"info","ts":"2026-11-28T19:21:25.626Z","caller":"backend/backend.go:475","msg":"defragmented","path":"/tmp/etcd-3.4-zwO6fO/m0.etcd/member/snap/db","current-db-size-bytes-diff":0,"current-db-size-bytes":122880,"current-db-size":"123 kB","current-db-size-in-use-bytes-diff":-4096,"current-db-size-in-use-bytes":114688,"current-db-size-in-use":"115 kB","took":"4.589149ms"}',
  end: '{"level":"info","ts":"2026-11-28T19:21:25.626Z","caller":"v3rpc/maintenance.go:96","msg":"finished defragment"}',
};

const v35 = {
  server:
    '{"level":"info","ts":"2026-11-28T19:21:25.727118Z","caller":"embed/etcd.go:323","msg":"starting an etcd server","etcd-version":"3.5.30","name":"m0","data-dir":"/tmp/etcd-3.5-E3K8Ap/m0.etcd"}',
  start: '{"level":"info","ts":"2026-11-28T19:21:26.008297Z","caller":"v3rpc/maintenance.go:97","msg":"starting defragment"}',
  before:
    '{"level":"info","ts":"2026-11-28T19:21:26.010417Z","caller":"backend/backend.go:527","msg":"defragmenting","path":"/tmp/etcd-3.5-E3K8Ap/m0.etcd/member/snap/db","current-db-size-bytes":20480,"current-db-size":"20 kB","current-db-size-in-use-bytes":16384,"current-db-size-in-use":"16 kB"}',
  after:
    '{"level":"info","ts":"2026-11-28T19:21:26.022471Z","caller":"backend/backend.go:589","msg":"finished defragmenting directory","path":"/tmp/etcd-3.5-E3K8Ap/m0.etcd/member/snap/db","current-db-size-bytes-diff":102400,"current-db-size-bytes":122880,"current-db-size":"123 kB","current-db-size-in-use-bytes-diff":98304,"current-db-size-in-use-bytes":114688,"current-db-size-in-use":"115 kB","took":"14.080856ms"}',
  end: '{"level":"info","ts":"2026-11-28T19:21:26.022535Z","caller":"v3rpc/maintenance.go:105","msg":"finished defragment"}',
  failed:
    '{"level":"warn","ts":"2026-11-28T19:21:27.500000Z","caller":"v3rpc/maintenance.go:103","msg":"failed to defragment","error":"etcdserver: request timed out"}',
};

describe('parseDefragLog', () => {
  // The backend's lines differ: "defragmented" (3.4) or "finished defragmenting directory" (3.5).
  const whole = [
    {
      version: '3.4',
      log: v34,
      event: {
        start: new Date('2026-11-28T19:21:25.617Z'),
        end: new Date('2026-11-28T19:21:25.626Z'),
        dbSizeBefore: 122880,
        dbSizeInUseBefore: 118784,
        dbSizeAfter: 122880,
        backendTookMs: 4.589149,
      },
    },
    {
      version: '3.5',
      log: v35,
      event: {
        start: new Date('2026-11-28T19:21:26.008297Z'),
        end: new Date('2026-11-28T19:21:26.022535Z'),
        dbSizeBefore: 20480,
        dbSizeInUseBefore: 16384,
        dbSizeAfter: 122880,
        backendTookMs: 14.080856,
      },
    },
  ];
  for (const { version, log, event } of whole) {
    test(`etcd ${version}: one defragment, with the backend's sizes and "took"`, () => {
      const evs = parseDefragLog(lines(log.server, log.start, log.before, log.after, log.end), 'm2');
      assert.deepEqual(evs, [{ member: 'm2', ...event }]);
    });
  }

  test('"failed to defragment" ends the interval with etcd\'s error', () => {
    const [ev, ...rest] = parseDefragLog(lines(v35.start, v35.failed), 'm1');
    assert.equal(rest.length, 0);
    assert.deepEqual(ev!.end, new Date('2026-11-28T19:21:27.500000Z'));
    assert.equal(ev!.error, 'etcdserver: request timed out');
    assert.equal(ev!.interrupted, undefined);
  });

  test('a restart ("starting an etcd server") ends a defragment that never finished', () => {
    const restart = v34.server.replace('19:21:25.283Z', '19:22:00.000Z');
    const evs = parseDefragLog(
      lines(v34.server, v34.start, v34.before, restart, v34.start.replace('19:21:25.617Z', '19:22:05.000Z')),
      'm0',
    );
    assert.equal(evs.length, 2);
    assert.deepEqual(evs[0]!.end, new Date('2026-11-28T19:22:00.000Z'));
    assert.equal(evs[0]!.interrupted, true);
    assert.equal(evs[0]!.dbSizeBefore, 122880);
    assert.equal(evs[0]!.dbSizeAfter, undefined);
    assert.deepEqual(evs[1]!.start, new Date('2026-11-28T19:22:05.000Z'));
    assert.equal(evs[1]!.end, undefined, 'still running');
  });

  test('passes over harness notes, plain text, other messages and broken JSON', () => {
    const text = lines(
      '# harness: 2026-11-28T19:21:25.000Z spawn error: Error: boom',
      'panic: something about defragment',
      '{"level":"info","ts":"2026-11-28T19:21:25.300Z","caller":"etcdserver/server.go:2500","msg":"published local member to cluster through raft"}',
      '{"level":"info","ts":"2026-11-28T19:21:25.400Z","msg":"starting defragment"',
      '{"level":"info","msg":"starting defragment"}',
      '{"level":"info","ts":"not a time","msg":"starting defragment"}',
      v34.start,
      v34.end,
    );
    const evs = parseDefragLog(text, 'm0');
    assert.equal(evs.length, 1);
    assert.deepEqual(evs[0], { member: 'm0', start: new Date('2026-11-28T19:21:25.617Z'), end: new Date('2026-11-28T19:21:25.626Z') });
  });

  test('back-to-back defragments pair up in order', () => {
    const later = (l: string): string => l.replace('19:21:26.', '19:21:30.');
    const evs = parseDefragLog(
      lines(v35.start, v35.before, v35.after, v35.end, later(v35.start), later(v35.before), later(v35.after), later(v35.end)),
      'm0',
    );
    assert.deepEqual(
      evs.map((e) => [e.start.toISOString(), e.end?.toISOString()]),
      [
        ['2026-11-28T19:21:26.008Z', '2026-11-28T19:21:26.022Z'],
        ['2026-11-28T19:21:30.008Z', '2026-11-28T19:21:30.022Z'],
      ],
    );
    assert.deepEqual(
      evs.map((e) => e.backendTookMs),
      [14.080856, 14.080856],
    );
  });
});

describe('goDurationMs', () => {
  test('parses Go durations as etcd prints "took"', () => {
    const cases: [string, number | undefined][] = [
      ['4.589149ms', 4.589149],
      ['5.2s', 5200],
      ['1m3.5s', 63_500],
      ['1h0m0s', 3_600_000],
      ['850µs', 0.85],
      ['12ns', 12e-6],
      ['soon', undefined],
    ];
    for (const [text, ms] of cases) assert.equal(goDurationMs(text), ms, text);
  });
});

describe('assertNoOverlap', () => {
  const at = (s: number): Date => new Date(Date.UTC(2025, 0, 1, 0, 0, s));
  test('accepts sequential and same-member intervals', () => {
    const evs: DefragEvent[] = [
      { member: 'm0', start: at(0), end: at(2) },
      { member: 'm1', start: at(2), end: at(3) },
      { member: 'm1', start: at(2), end: at(4) },
      { member: 'm2', start: at(5), end: at(6) },
    ];
    assertNoOverlap(evs);
  });
  test('rejects overlapping intervals of different members, naming them', () => {
    const evs: DefragEvent[] = [
      { member: 'm0', start: at(0), end: at(3) },
      { member: 'm1', start: at(2), end: at(4) },
    ];
    assert.throws(() => assertNoOverlap(evs), /m0 .* overlaps m1 .*\n\s+by 1000 ms/s);
  });
  test('an unfinished interval is open until now', () => {
    const evs: DefragEvent[] = [
      { member: 'm0', start: at(0) },
      { member: 'm1', start: at(10), end: at(11) },
    ];
    assert.throws(() => assertNoOverlap(evs, at(20)), /still running/);
    assertNoOverlap(evs, at(5));
  });
});
