// Issue 2 acceptance: `once` against real 3-member clusters over mutual TLS, etcd 3.4 and 3.5.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { after, before, describe, it } from 'node:test';
import { startCluster, type Cluster } from '../harness/cluster.ts';
import { allDefragEvents, defragEvents } from '../harness/defrag-log.ts';
import { fill, memberStatus } from '../harness/data.ts';
import { events, once, writeConfig } from '../harness/defragd.ts';
import { versionsUnderTest } from '../harness/etcd-bin.ts';
import { runCli } from '../harness/proc.ts';

const MiB = 1024 * 1024;

for (const version of versionsUnderTest()) {
  describe(`once on etcd ${version}`, () => {
    let cluster: Cluster;
    before(async () => {
      cluster = await startCluster({ version, tls: true });
      await fill(cluster, { inUseBytes: 16 * MiB, reclaimableBytes: 24 * MiB });
    });
    after(async () => {
      await cluster?.stop();
    });

    it('--dry-run decides and changes nothing', async () => {
      const m = cluster.members[2]!;
      const r = await once(cluster, m, ['--dry-run']);
      assert.equal(r.code, 0, r.stdout + r.stderr);
      assert.equal(r.stdout, '', 'once writes logs to stderr, nothing to stdout');
      assert.match(r.stderr, new RegExp(`dry run: would defragment member ${m.name} \\(${m.id}`));
      assert.deepEqual(await allDefragEvents(cluster), []);
    });

    it('an unmet disk guard exits 75 with the numbers', async () => {
      const r = await once(cluster, cluster.members[2]!, [], { policy: { minReclaimable: '4MiB', freeDiskMargin: '1000TiB' } });
      assert.equal(r.code, 75, r.stdout + r.stderr);
      const skip = events(r.stderr, 'run.skip')[0]!;
      assert.equal(skip.check, 'disk');
      assert.match(skip.msg, /not enough free disk in .*: \S+ free \(\d+ bytes\), defragment needs .* \(\d+ bytes\)/);
      assert.deepEqual(await allDefragEvents(cluster), []);
    });

    it('skips, naming the member, while another member is paused', async () => {
      const paused = cluster.members[1]!;
      await paused.pause();
      try {
        const r = await once(cluster, cluster.members[0]!);
        assert.equal(r.code, 75, r.stdout + r.stderr);
        const skip = events(r.stderr, 'run.skip')[0]!;
        assert.equal(skip.member, paused.id);
        assert.match(skip.msg, new RegExp(`member ${paused.name} \\(${paused.id}, .*\\) does not answer Status`));
      } finally {
        await paused.resume();
      }
      assert.deepEqual(await allDefragEvents(cluster), []);
    });

    it('defragments the member it points at and no other, then finds nothing to do', async () => {
      const target = cluster.members[0]!;
      const before = await memberStatus(cluster, target);
      const r = await once(cluster, target);
      assert.equal(r.code, 0, r.stdout + r.stderr);
      const done = events(r.stderr, 'defrag.done');
      assert.equal(done.length, 1, r.stdout);
      assert.equal(done[0]!.member, target.id);
      assert.equal(done[0]!.beforeBytes, before.dbSize);
      assert.ok((done[0]!.afterBytes as number) < before.dbSize - 8 * MiB, `after ${done[0]!.afterBytes} before ${before.dbSize}`);
      assert.equal((await defragEvents(target)).length, 1, 'etcd logged one defragment on the target');
      assert.deepEqual(
        (await allDefragEvents(cluster)).map((e) => e.member),
        [target.name],
        'no other member was defragmented',
      );
      assert.equal(events(r.stderr, 'verify.ok').length, 1, 'HashKV compared after the defragment');

      const again = await once(cluster, target);
      assert.equal(again.code, 0, again.stdout + again.stderr);
      assert.match(events(again.stderr, 'run.done')[0]!.msg, /not needed/);
      assert.equal((await allDefragEvents(cluster)).length, 1, 'nothing more was defragmented');
    });

    it('a wrong CA gives one clear error line', async () => {
      const r = await once(cluster, cluster.members[1]!, [], { etcd: { ...baseEtcd(cluster, 1), caFile: cluster.pki!.otherCaFile } });
      assert.equal(r.code, 1, r.stdout + r.stderr);
      const errors = events(r.stderr).filter((l) => l.level >= 50);
      assert.equal(errors.length, 1, r.stdout);
      assert.match(errors[0]!.msg, /EDD_TLS: .*TLS failed .*check etcd.caFile/);
      assert.doesNotMatch(r.stdout + r.stderr, /\n\s+at /, 'no stack trace');
    });

    it('status prints the cluster as a table and as JSON', async () => {
      const cfg = writeConfig(cluster, cluster.members[0]!);
      const table = await runCli(['status', '--config', cfg]);
      assert.equal(table.code, 0, table.stderr);
      for (const m of cluster.members) assert.match(table.stdout, new RegExp(`${m.id}`));
      assert.match(table.stdout, /health: ok/);
      const raw = await runCli(['status', '--json', '--config', cfg]);
      const jq = spawnSync('jq', ['.'], { input: raw.stdout, encoding: 'utf8' });
      assert.equal(jq.status, 0, `status --json | jq . failed: ${jq.stderr}\n${raw.stdout}`);
      const json = JSON.parse(raw.stdout);
      assert.equal(json.members.length, 3);
      assert.equal(json.local, cluster.members[0]!.id);
    });
  });
}

function baseEtcd(cluster: Cluster, i: number) {
  const m = cluster.members[i]!;
  return {
    endpoint: m.clientUrl,
    caFile: cluster.pki!.caFile,
    certFile: cluster.pki!.clientCertFile,
    keyFile: cluster.pki!.clientKeyFile,
    dataDir: m.dataDir,
    requestTimeout: '2s',
  };
}
