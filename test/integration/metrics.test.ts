// A live daemon's /metrics and textfile, as Prometheus and node_exporter read them.
import assert from 'node:assert/strict';
import { existsSync, mkdirSync, readdirSync, readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { startCluster, type Cluster } from '../harness/cluster.ts';
import { startDaemon, type LogLine } from '../harness/defragd.ts';
import { versionsUnderTest } from '../harness/etcd-bin.ts';
import { promtoolCheck, queriedMetricNames } from '../harness/promtool.ts';

/** Polls until `ok()` holds; fails with `what` after `ms`. */
async function waitFor(what: string, ok: () => boolean, ms = 30_000): Promise<void> {
  const t0 = Date.now();
  while (!ok()) {
    if (Date.now() - t0 > ms) assert.fail(`${what}: not within ${ms} ms`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

const read = (path: string) => (existsSync(path) ? readFileSync(path, 'utf8') : '');

const series = (text: string, name: string) => text.split('\n').filter((l) => l.startsWith(`${name}{`) || l.startsWith(`${name} `));

for (const version of versionsUnderTest()) {
  describe(`metrics of a live daemon on etcd ${version}`, () => {
    let cluster: Cluster;
    before(async () => {
      cluster = await startCluster({ version, tls: true });
    });
    after(async () => {
      await cluster?.stop();
    });

    it('/metrics passes promtool, shows only its own member; the textfile is written atomically', async () => {
      const m = cluster.members[1]!;
      const dir = join(cluster.dir, 'textfile');
      mkdirSync(dir, { recursive: true });
      const textfile = join(dir, 'etcd-defragd.prom');
      const d = startDaemon(cluster, m, {
        schedule: { cron: '0 0 1 1 *', runOnStart: true },
        metrics: { listen: '127.0.0.1:0', textfile },
        nospace: { checkInterval: '1s' },
      });
      try {
        const started = await d.waitForJson<LogLine>((l) => l.event === 'daemon.start', 30_000);
        await d.waitForJson<LogLine>((l) => l.event === 'run.done', 60_000);
        // the alarm check after the run rewrites the textfile every second
        const t0 = Date.now();
        while (
          !(existsSync(textfile) && /etcd_defragd_member_db_size_bytes\{/.test(readFileSync(textfile, 'utf8'))) &&
          Date.now() - t0 < 10_000
        )
          await new Promise((r) => setTimeout(r, 200));
        const body = await (await fetch(`http://${started.metrics}/metrics`)).text();
        const r = promtoolCheck(body);
        assert.equal(r.findings, '', r.findings);
        assert.equal(r.status, 0);

        assert.deepEqual(
          series(body, 'etcd_defragd_member_db_size_bytes').map((l) => l.match(/\{member="([^"]+)",name="([^"]*)"\}/)!.slice(1)),
          [[m.id, m.name]],
          'only the member this daemon owns',
        );
        assert.match(body, /^etcd_defragd_member_quota_bytes\{member="[0-9a-f]+",name="m\d"\} \d+/m);
        assert.match(body, /^etcd_defragd_member_defragmenting\{member="[0-9a-f]+",name="m\d"\} 0$/m);
        assert.match(body, /^etcd_defragd_runs_total\{outcome="not-needed",mode="scheduled"\} 1$/m);
        assert.match(body, /^etcd_defragd_runs_total\{outcome="failed",mode="nospace"\} 0$/m);
        assert.match(body, /^etcd_defragd_last_success_timestamp_seconds 1\d{9}/m);
        assert.match(body, /^etcd_defragd_build_info\{version="[^"]+",nodejs="v[^"]+"\} 1$/m);
        assert.match(body, /^etcd_defragd_turn_held 0$/m);
        assert.match(body, /^etcd_defragd_paused 0$/m);
        assert.match(body, /^process_resident_memory_bytes \d+/m);
        const exposed = new Set(
          body
            .split('\n')
            .filter((l) => l && !l.startsWith('#'))
            .map((l) => l.match(/^[a-zA-Z_:][a-zA-Z0-9_:]*/)![0]),
        );
        const missing = [...queriedMetricNames()].filter((n) => !exposed.has(n));
        assert.deepEqual(missing, [], 'the shipped rules and dashboard query only metrics this daemon exports');

        const file = readFileSync(textfile, 'utf8');
        const rf = promtoolCheck(file);
        assert.equal(rf.findings, '', rf.findings);
        assert.doesNotMatch(file, /^(process|nodejs)_/m, 'no process_* in the textfile: node_exporter has its own');
        assert.match(file, /^etcd_defragd_member_db_size_bytes\{member="[0-9a-f]+",name="m\d"\} \d+/m);
        assert.deepEqual(readdirSync(dir), ['etcd-defragd.prom'], 'no temp file left beside it');
      } finally {
        await d.kill('SIGTERM');
      }
    });

    it('the textfile is rewritten while etcd is down (reachable 0), and a clean stop removes it', async () => {
      const m = cluster.members[2]!;
      const dir = join(cluster.dir, 'textfile-down');
      mkdirSync(dir, { recursive: true });
      const textfile = join(dir, 'etcd-defragd.prom');
      const d = startDaemon(cluster, m, {
        schedule: { cron: '0 0 1 1 *' },
        metrics: { listen: '', textfile },
        nospace: { checkInterval: '1s' },
        retry: { attempts: 1 },
      });
      try {
        await waitFor('reachable 1 in the textfile', () => /^etcd_defragd_etcd_reachable 1$/m.test(read(textfile)));
        await m.stop();
        try {
          await waitFor('reachable 0 in the textfile', () => /^etcd_defragd_etcd_reachable 0$/m.test(read(textfile)));
          // Still rewritten at every failed check: a stale file would mean a dead daemon, not a dead etcd.
          const since = statSync(textfile).mtimeMs;
          await waitFor('the textfile rewritten while etcd is down', () => statSync(textfile).mtimeMs > since, 10_000);
          assert.match(read(textfile), /^etcd_defragd_etcd_reachable 0$/m);
        } finally {
          await m.restart();
        }
        await waitFor('reachable 1 again', () => /^etcd_defragd_etcd_reachable 1$/m.test(read(textfile)));
        const { code } = await d.kill('SIGTERM');
        assert.equal(code, 0);
        assert.equal(existsSync(textfile), false, 'a clean stop removes the textfile');
        assert.deepEqual(readdirSync(dir), [], 'and leaves no temp file');
      } finally {
        await d.kill('SIGTERM');
      }
    });
  });
}
