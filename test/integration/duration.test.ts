// Issue 18.4: a defragment predicted to outlast policy.maxDefragDuration is skipped (check
// duration), the prediction learned from etcd's own histogram of that member's past defragments.
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { startCluster, type Cluster } from '../harness/cluster.ts';
import { fill } from '../harness/data.ts';
import { events, startDaemon, writeConfig, type LogLine, type Overrides } from '../harness/defragd.ts';
import { versionsUnderTest } from '../harness/etcd-bin.ts';

const MiB = 1024 * 1024;
const NEVER = '0 0 1 1 *';

/** Polls the daemon's /metrics until `re` matches; returns the match. */
async function metricMatch(url: string, re: RegExp, timeoutMs: number): Promise<RegExpMatchArray> {
  const until = Date.now() + timeoutMs;
  let body = '';
  for (;;) {
    body = await (await fetch(url)).text();
    const m = body.match(re);
    if (m) return m;
    if (Date.now() > until) throw new Error(`${re} not in the daemon's /metrics within ${timeoutMs}ms:\n${body}`);
    await new Promise((r) => setTimeout(r, 250));
  }
}

for (const version of versionsUnderTest()) {
  describe(`predicted defragment duration on etcd ${version}`, () => {
    let cluster: Cluster;
    before(async () => {
      cluster = await startCluster({ version, tls: true });
    });
    after(async () => {
      await cluster?.stop();
    });

    it('learns from an etcdctl defrag of its member, then skips a run predicted to outlast policy.maxDefragDuration', async () => {
      // More in use than duration.ts's MIN_SAMPLE_BYTES (16MiB), so the defragment teaches a rate.
      await fill(cluster, { inUseBytes: 32 * MiB, reclaimableBytes: 8 * MiB });
      const m = cluster.members[1]!;
      // policy.force: a scheduled run that would defragment whatever the fragmentation; the
      // duration check still stops it (only an operator's `once` has no prediction to obey).
      const overrides: Overrides = {
        schedule: { cron: NEVER, runOnStart: false },
        policy: { force: true, maxDefragDuration: '1ms' },
        nospace: { checkInterval: '1s' },
        // its member's /metrics page read at every check (a sample every window/240)
        forecast: { window: '4m' },
        metrics: { listen: '127.0.0.1:0' },
      };
      const d = startDaemon(cluster, m, overrides);
      try {
        const started = await d.waitForJson<LogLine>((l) => l.event === 'daemon.start', 30_000);
        const url = `http://${String(started.metrics)}/metrics`;
        // The trend gauges show that the daemon has sampled the member's page: the histogram's baseline.
        const sampled = await metricMatch(url, /^etcd_defragd_history_revisions\{[^}]*\} \d+$/m, 30_000);
        assert.doesNotMatch(sampled.input!, /etcd_defragd_defrag_predicted_seconds\{/, 'no prediction before any defragment');

        await cluster.etcdctl(['defrag'], { member: m, timeoutMs: 60_000 });
        const predicted = await metricMatch(
          url,
          new RegExp(`^etcd_defragd_defrag_predicted_seconds\\{member="${m.id}",name="${m.name}"\\} (\\S+)$`, 'm'),
          30_000,
        );
        assert.ok(Number(predicted[1]) > 0, predicted[0]);

        // A scheduled run now: every second from the reload on.
        writeConfig(cluster, m, { ...overrides, schedule: { cron: '* * * * * *', runOnStart: false } });
        d.child.kill('SIGHUP');
        const end = await d.waitForJson<LogLine>((l) => ['run.done', 'run.skip', 'run.fail'].includes(String(l.event)), 60_000);
        assert.equal(end.event, 'run.skip', d.output());
        assert.equal(end.check, 'duration', d.output());
        assert.match(
          String(end.reason),
          /is predicted to take \S+ \(\S+ in use at \S+\/s, the slowest quarter of the last 1 defragment of this member \(1 timed by etcd\)\), longer than policy\.maxDefragDuration \(1ms\)/,
        );
        assert.match(String(end.reason), /failureThreshold x periodSeconds/);
        assert.match(String(end.reason), /etcdutl defrag --data-dir /);
        assert.equal(events(d, 'defrag.start').length, 0, `no defragment was sent:\n${d.output()}`);
        await metricMatch(url, /^etcd_defragd_skipped_runs_total\{check="duration"\} [1-9]\d*$/m, 10_000);
      } finally {
        await d.kill('SIGTERM');
      }
    });
  });
}
