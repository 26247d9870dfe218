// Issue 18 against real etcd: the quota forecast, and the compaction watchdog that keeps a cluster
// whose history nothing compacts out of NOSPACE. etcd 3.5 (or the one version under test): each
// case takes one to two minutes of steady load, and the code paths do not depend on the version.
import assert from 'node:assert/strict';
import { after, describe, it } from 'node:test';
import { startCluster, type Cluster } from '../harness/cluster.ts';
import { listAlarms } from '../harness/data.ts';
import { events, startDaemon, writeConfig, type LogLine } from '../harness/defragd.ts';
import { versionsUnderTest } from '../harness/etcd-bin.ts';
import { startWriteLoad } from '../harness/load.ts';
import type { Member } from '../harness/member.ts';
import { runCli, type CliProcess } from '../harness/proc.ts';

const MiB = 1024 * 1024;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const versions = versionsUnderTest();
const version = versions.includes('3.5') ? '3.5' : versions[0]!;

/** One gauge from a Prometheus text page, for the given member (or unlabelled). */
function gauge(text: string, name: string): number | undefined {
  const line = text.split('\n').find((l) => l.startsWith(`${name}{`) || l.startsWith(`${name} `));
  return line === undefined ? undefined : Number(line.trim().split(/\s+/).at(-1));
}

/** etcd's own figure, from the member's plain-http metrics listener. */
async function etcdGauge(member: Member, name: string): Promise<number> {
  const text = await (await fetch(`${member.metricsUrl}/metrics`)).text();
  const v = gauge(text, name);
  assert.ok(v !== undefined, `${name} on ${member.name}`);
  return v;
}

async function daemonMetrics(d: CliProcess): Promise<string> {
  const started = await d.waitForJson<LogLine>((l) => l.event === 'daemon.start', 30_000);
  return (await fetch(`http://${String(started.metrics)}/metrics`)).text();
}

describe(`quota forecast on etcd ${version}`, () => {
  let cluster: Cluster | undefined;
  after(async () => {
    await cluster?.stop();
  });

  it('steady growth of live data: the forecast is within 35% of the time computed from etcd own samples', async () => {
    const quota = 512 * MiB;
    cluster = await startCluster({ version, tls: true, quotaBytes: quota, snapshotCount: 2000 });
    const m = cluster.members[0]!;
    // New keys only (live data grows, nothing to compact): ~8 KiB x 40/s = ~320 KiB/s.
    const load = startWriteLoad(cluster, { ratePerSec: 40, valueBytes: 8192, keySpace: 1e9, keyPrefix: 'grow/' });
    const d = startDaemon(cluster, m, {
      schedule: { cron: '0 0 1 1 *' },
      metrics: { listen: '127.0.0.1:0' },
      nospace: { checkInterval: '1s' },
      forecast: { window: '60s', minSpan: '20s', warnBefore: '1h', defragBefore: '0s' },
    });
    try {
      // The daemon's forecast appears once its samples span forecast.minSpan.
      const t0 = Date.now();
      while (gauge(await daemonMetrics(d), 'etcd_defragd_member_time_to_quota_seconds') === undefined) {
        assert.ok(Date.now() - t0 < 90_000, 'no forecast 90 s after the start');
        await sleep(1000);
      }
      // etcd's own samples, 20 s apart: the db file's growth and what is left of the quota.
      const size1 = await etcdGauge(m, 'etcd_mvcc_db_total_size_in_bytes');
      const at1 = Date.now();
      await sleep(20_000);
      const size2 = await etcdGauge(m, 'etcd_mvcc_db_total_size_in_bytes');
      const at2 = Date.now();
      const forecast = gauge(await daemonMetrics(d), 'etcd_defragd_member_time_to_quota_seconds')!;
      const rate = (size2 - size1) / ((at2 - at1) / 1000);
      assert.ok(rate > 50 * 1024, `etcd grew ${rate} bytes/s: the load did not run`);
      const expected = (quota - size2) / rate;
      const error = Math.abs(forecast - expected) / expected;
      console.log(`forecast ${forecast.toFixed(0)} s, from etcd's samples ${expected.toFixed(0)} s (${(error * 100).toFixed(1)}% off)`);
      assert.ok(error <= 0.35, `forecast ${forecast} s vs ${expected.toFixed(0)} s from etcd's own samples`);

      // Below forecast.warnBefore (1h): a warning that says what grows.
      const warned = events(d, 'forecast.quota');
      assert.ok(warned.length >= 1, 'a forecast.quota warning');
      assert.equal(warned[0]!.member, m.id);
      // status shows it: the record the daemon writes for it
      const st = await runCli(['status', '--json', '--config', writeConfig(cluster, m, {}, 'status.yaml')], { timeoutMs: 60_000 });
      const member = (
        JSON.parse(st.stdout) as { members: { id: string; forecast: { seconds: number | null; basis: string } | null }[] }
      ).members.find((x) => x.id === m.id)!;
      assert.ok(member.forecast?.seconds, `status --json: ${JSON.stringify(member.forecast)}`);
      assert.match(member.forecast.basis, /^(file|in-use)$/);
    } finally {
      await load.stop();
      await d.kill('SIGTERM');
    }
    await cluster.stop();
    cluster = undefined;
  });
});

describe(`compaction watchdog on etcd ${version}`, () => {
  const clusters: Cluster[] = [];
  after(async () => {
    for (const c of clusters) await c.stop();
  });

  // The same keys rewritten: live data stays small, history grows until something compacts it.
  const quota = 32 * MiB;
  const loadOpts = { ratePerSec: 20, valueBytes: 32 * 1024, keySpace: 20, keyPrefix: 'churn/' };
  // The alarm list's entries carry the alarm as etcd's enum (NOSPACE = 1): any entry is NOSPACE here.
  const alarmed = async (c: Cluster) => (await listAlarms(c)).length > 0;
  const start = async () => {
    const c = await startCluster({ version, tls: true, quotaBytes: quota, snapshotCount: 2000 });
    clusters.push(c);
    return c;
  };

  it('nothing compacts: without the daemons the load reaches NOSPACE; with them, the watchdog warns, compacts and it never does', async () => {
    // Without the daemons: NOSPACE, and how long it took.
    const bare = await start();
    const t0 = Date.now();
    const load1 = startWriteLoad(bare, loadOpts);
    let reachedMs: number | undefined;
    while (Date.now() - t0 < 240_000) {
      if (await alarmed(bare)) {
        reachedMs = Date.now() - t0;
        break;
      }
      await sleep(1000);
    }
    const bareReport = await load1.stop();
    console.log(`without daemons: ${bareReport.okCount} writes ok, ${bareReport.failed} failed, ${bareReport.skipped} not sent`);
    await bare.stop();
    assert.ok(reachedMs !== undefined, 'the load without daemons did not reach NOSPACE in 4 minutes');

    // With a daemon on every member, the defaults but for a short staleAfter and keepHistory.
    const guarded = await start();
    const daemons = guarded.members.map((m) =>
      startDaemon(guarded, m, {
        schedule: { cron: '0 0 1 1 *' },
        nospace: { checkInterval: '1s' },
        compaction: { staleAfter: '5s', keepHistory: '3s' },
      }),
    );
    try {
      for (const d of daemons) await d.waitForJson<LogLine>((l) => l.event === 'daemon.start', 30_000);
      const t1 = Date.now();
      const load2 = startWriteLoad(guarded, loadOpts);
      let full = false;
      // Half as long again as the bare cluster took to fill up.
      while (Date.now() - t1 < 1.5 * reachedMs && !full) {
        full = await alarmed(guarded);
        await sleep(1000);
      }
      const report = await load2.stop();
      if (full)
        for (const [i, d] of daemons.entries())
          for (const l of events(d).filter((e) => e.event !== 'alarm.check.fail'))
            console.log(`m${i} +${l.time - t1} ${l.event}: ${l.msg.slice(0, 300)}`);
      assert.equal(full, false, `NOSPACE with the daemons within ${1.5 * reachedMs} ms`);
      assert.ok(report.okCount > 0.9 * report.total, `${report.failed} of ${report.total} writes failed`);
      const all = daemons.flatMap((d) => events(d));
      assert.ok(
        all.some((l) => l.event === 'compaction.stale'),
        'the watchdog warned',
      );
      const compacted = all.filter((l) => l.event === 'compact.fallback');
      assert.ok(compacted.length >= 1, 'a fallback compaction');
      assert.match(compacted[0]!.msg, /keeping .* of history/);
      console.log(
        `bare cluster: NOSPACE after ${reachedMs} ms; guarded: no NOSPACE in ${Date.now() - t1} ms, ` +
          `${compacted.length} fallback compactions, ${report.failed}/${report.total} writes failed`,
      );
    } finally {
      for (const d of daemons) await d.kill('SIGTERM');
    }
  });
});
