// `usage` on real clusters (issue 18 point 3): the seed's shape, many small events and fewer but
// larger Kyverno policy reports; the prefix holding the most bytes ranks first, above the one with
// more keys, the text names the dominant resource, and the keys are read from a follower, in pages,
// none lost or counted twice at a page boundary.
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { startCluster, type Cluster } from '../harness/cluster.ts';
import { writeConfig } from '../harness/defragd.ts';
import { versionsUnderTest } from '../harness/etcd-bin.ts';
import { runCli } from '../harness/proc.ts';

const EVENTS = 1000;
const EVENT_BYTES = 300;
const REPORTS = 30;
const REPORT_BYTES = 20 * 1024;
/** Kyverno rewrites its reports at every background scan. */
const REPORT_WRITES = 3;

interface UsageJson {
  prefixes: { prefix: string; resource?: string; keys: number; bytes: number; avgVersion: number; recentKeys: number }[];
  keys: number;
  bytes: number;
  dominant: { resource: string; prefix: string; share: number } | null;
  pages: number;
  source: { endpoint: string; role: string; memberId: string };
}

async function putAll(cluster: Cluster, entries: [string, number][]): Promise<void> {
  const client = cluster.client();
  for (let i = 0; i < entries.length; i += 50) {
    await Promise.all(
      entries.slice(i, i + 50).map(([key, bytes]) =>
        client
          .put(key)
          .value(Buffer.alloc(bytes, 'x'))
          .options({ deadline: Date.now() + 30_000 })
          .exec(),
      ),
    );
  }
}

for (const version of versionsUnderTest()) {
  describe(`usage on etcd ${version}`, () => {
    let cluster: Cluster;
    let cfg: string;
    let leaderUrl: string;
    before(async () => {
      cluster = await startCluster({ version, tls: true });
      const events: [string, number][] = [...Array(EVENTS).keys()].map((i) => [
        `/registry/events/default/nginx-${String(i).padStart(5, '0')}.17a2b`,
        EVENT_BYTES,
      ]);
      const reports: [string, number][] = [...Array(REPORTS).keys()].map((i) => [
        `/registry/wgpolicyk8s.io/policyreports/ns-${i}/polr-ns-${i}`,
        REPORT_BYTES,
      ]);
      await putAll(cluster, events);
      for (let w = 0; w < REPORT_WRITES; w++) await putAll(cluster, reports);
      await putAll(cluster, [['compact_rev_key', 8]]);
      // Pointed at the leader: usage must read from another member.
      const leader = await cluster.leader();
      leaderUrl = leader.clientUrl;
      cfg = writeConfig(cluster, leader, {}, 'usage.yaml');
    });
    after(async () => {
      await cluster?.stop();
    });

    it('--json ranks the prefix with the most bytes first, above one with more keys; counts every key once, read from a follower', async () => {
      const r = await runCli(['usage', '--json', '--config', cfg], { timeoutMs: 60_000 });
      assert.equal(r.code, 0, r.stdout + r.stderr);
      const u = JSON.parse(r.stdout) as UsageJson;
      assert.deepEqual(
        u.prefixes.map((p) => p.prefix),
        ['/registry/wgpolicyk8s.io/policyreports/', '/registry/events/', ''],
      );
      const [reports, events] = u.prefixes;
      assert.equal(reports!.keys, REPORTS);
      assert.equal(events!.keys, EVENTS);
      assert.ok(events!.keys > reports!.keys && events!.bytes < reports!.bytes, JSON.stringify(u.prefixes));
      assert.equal(reports!.resource, 'policyreports.wgpolicyk8s.io');
      assert.equal(events!.resource, 'events');
      assert.equal(reports!.avgVersion, REPORT_WRITES, 'each report was written three times');
      assert.equal(events!.avgVersion, 1);
      assert.equal(reports!.recentKeys, REPORTS, 'every key was written within the last 10,000 revisions');

      // What etcd itself holds, read at once: the pages lost nothing and counted nothing twice.
      const all = await cluster
        .client()
        .getAll()
        .options({ deadline: Date.now() + 30_000 })
        .exec();
      assert.equal(u.keys, all.kvs.length);
      assert.equal(
        u.bytes,
        all.kvs.reduce((n, kv) => n + kv.key.length + kv.value.length, 0),
      );
      assert.ok(u.pages >= 2, `read in pages (${u.pages})`);

      assert.equal(u.source.role, 'follower');
      assert.notEqual(u.source.endpoint, leaderUrl, 'not read from the leader, where etcd.endpoint points');
      assert.equal(u.dominant?.resource, 'policyreports.wgpolicyk8s.io');
      assert.match(r.stderr, /"event":"usage\.start"/, 'logs go to stderr');
    });

    it('the text names the dominant resource in its closing line', async () => {
      const r = await runCli(['usage', '--config', cfg], { timeoutMs: 60_000 });
      assert.equal(r.code, 0, r.stdout + r.stderr);
      const lines = r.stdout.trim().split('\n');
      assert.match(lines[0]!, /^PREFIX\s+KEYS\s+BYTES/);
      assert.match(lines[1]!, /^\/registry\/wgpolicyk8s\.io\/policyreports\/\s+30\s/);
      assert.match(lines[2]!, /^\/registry\/events\/\s+1000\s/);
      assert.match(lines.at(-1)!, /^most of the space is policyreports\.wgpolicyk8s\.io \((6\d|7\d)%\)$/);
    });

    it('--depth groups other keys; a bad --depth exits 64 with one line naming the flag, the value and what is accepted', async () => {
      await putAll(cluster, [
        ['/etcd-defragd-test/a/b/1', 10],
        ['/etcd-defragd-test/a/c/1', 10],
      ]);
      const one = JSON.parse((await runCli(['usage', '--json', '--depth', '1', '--config', cfg])).stdout) as UsageJson;
      assert.deepEqual(
        one.prefixes.filter((p) => p.prefix.startsWith('/etcd-defragd-test/')).map((p) => [p.prefix, p.keys]),
        [['/etcd-defragd-test/', 2]],
      );
      const three = JSON.parse((await runCli(['usage', '--json', '--depth', '3', '--config', cfg])).stdout) as UsageJson;
      assert.deepEqual(
        three.prefixes
          .filter((p) => p.prefix.startsWith('/etcd-defragd-test/'))
          .map((p) => p.prefix)
          .sort(),
        ['/etcd-defragd-test/a/b/', '/etcd-defragd-test/a/c/'],
      );

      for (const bad of ['0', 'deep']) {
        const r = await runCli(['usage', '--depth', bad, '--config', cfg]);
        assert.equal(r.code, 64, r.stdout + r.stderr);
        const lines = r.stderr.trim().split('\n');
        assert.equal(lines.length, 1, r.stderr);
        assert.match(lines[0]!, new RegExp(`--depth: "${bad}" is .*; accepted: a whole number from 1 to 16`));
        assert.equal(r.stdout, '');
      }
      assert.equal((await runCli(['status', '--depth', '2', '--config', cfg])).code, 64);
    });
  });
}

describe('usage when etcd does not answer', () => {
  it('exits 75 like status; --json prints the failure as JSON', async () => {
    const args = ['--endpoint', 'http://127.0.0.1:1', '--set', 'retry.attempts=2', '--set', 'retry.minDelay=100ms', '--log-format', 'json'];
    const r = await runCli(['usage', '--json', ...args]);
    assert.equal(r.code, 75, r.stdout + r.stderr);
    const out = JSON.parse(r.stdout) as { endpoint: string; error: { code: string } };
    assert.equal(out.error.code, 'EDD_UNAVAILABLE');
    assert.equal(out.endpoint, 'http://127.0.0.1:1');
    const text = await runCli(['usage', ...args]);
    assert.equal(text.code, 75, text.stdout + text.stderr);
    assert.equal(text.stdout, '');
  });
});
