import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { parseServerMetrics } from '../../src/etcd.ts';
import { RevisionLog } from '../../src/history.ts';

describe('RevisionLog', () => {
  it('answers the newest revision seen at or before a time, and forgets what is older than the window', () => {
    const log = new RevisionLog(60_000, 5000);
    for (let t = 0; t <= 300_000; t += 10_000) log.record(t, BigInt(1000 + t / 1000));
    assert.equal(log.atOrBefore(300_000 - 60_000)?.revision, 1240n);
    assert.equal(log.atOrBefore(300_000 - 55_000)?.revision, 1240n, 'between samples: the older one (keeps more history)');
    assert.equal(log.oldest()?.revision, 1240n, 'one sample at the window edge is kept, older ones go');
    assert.equal(log.atOrBefore(1000), undefined);
  });
  it('ignores samples closer than the gap, and starts over when the revision goes back (a restore)', () => {
    const log = new RevisionLog(60_000, 5000);
    log.record(0, 10n);
    log.record(1000, 11n);
    log.record(7000, 12n);
    assert.equal(log.atOrBefore(6999)?.revision, 10n);
    assert.equal(log.atOrBefore(7000)?.revision, 12n);
    log.record(20_000, 5n);
    assert.equal(log.oldest()?.revision, 5n);
    assert.equal(log.atOrBefore(19_999), undefined);
  });
  it('keeps the sample from before an alarm however long the alarm lasts', () => {
    const log = new RevisionLog(60_000, 5000);
    for (let t = 0; t <= 100_000; t += 10_000) log.record(t, BigInt(t / 1000));
    log.hold(100_000 - 30_000);
    for (let t = 110_000; t <= 1_000_000; t += 10_000) log.record(t, 100n);
    assert.equal(log.atOrBefore(70_000)?.revision, 70n);
    log.hold(undefined);
    log.record(1_010_000, 100n);
    assert.equal(log.atOrBefore(70_000), undefined, 'released after the alarm');
  });
});

describe('parseServerMetrics', () => {
  it('reads the quota, the defrag gauge, sizes, revisions, the defrag histogram and the version as etcd 3.4/3.5 write them', () => {
    const text = [
      '# HELP etcd_server_quota_backend_bytes Current backend storage quota size in bytes.',
      '# TYPE etcd_server_quota_backend_bytes gauge',
      'etcd_server_quota_backend_bytes 8.589934592e+09',
      'etcd_disk_defrag_inflight 1',
      'etcd_mvcc_db_total_size_in_bytes 6.7108864e+07',
      'etcd_mvcc_db_total_size_in_use_in_bytes 1.6384e+04',
      'etcd_server_version{server_version="3.5.30"} 1',
      'etcd_server_quota_backend_bytes_other 5',
      'etcd_debugging_mvcc_compact_revision 2',
      'etcd_debugging_mvcc_current_revision 3',
      'etcd_disk_backend_defrag_duration_seconds_bucket{le="0.1"} 1',
      'etcd_disk_backend_defrag_duration_seconds_sum 0.007525122',
      'etcd_disk_backend_defrag_duration_seconds_count 1',
    ].join('\n');
    assert.deepEqual(parseServerMetrics(text), {
      quotaBytes: 8589934592,
      defragInflight: true,
      dbSize: 67108864,
      dbSizeInUse: 16384,
      version: '3.5.30',
      compactRevision: 2,
      currentRevision: 3,
      defragSeconds: 0.007525122,
      defragCount: 1,
    });
    assert.deepEqual(parseServerMetrics('etcd_disk_defrag_inflight 0\n'), { defragInflight: false });
    assert.deepEqual(parseServerMetrics('go_goroutines 12\n'), {});
    // never compacted: etcd writes -1
    assert.equal(parseServerMetrics('etcd_debugging_mvcc_compact_revision -1\n').compactRevision, 0);
    assert.equal(parseServerMetrics('etcd_debugging_mvcc_compact_revision -2\n').compactRevision, undefined);
  });
});
