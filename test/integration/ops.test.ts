// Operations without etcdctl, on real clusters: pause and resume across three daemons (etcd's own
// log says what was defragmented), the integrity halt cleared by a confirmed resume, a pause refused
// during NOSPACE, and NOSPACE disarmed by hand after the automatic checks refused.
import assert from 'node:assert/strict';
import { chmodSync, existsSync, mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { startCluster, type Cluster } from '../harness/cluster.ts';
import { allDefragEvents, assertNoOverlap } from '../harness/defrag-log.ts';
import { fill, fillUntilNoSpace, listAlarms } from '../harness/data.ts';
import { startDaemon, writeConfig, type LogLine } from '../harness/defragd.ts';
import { versionsUnderTest } from '../harness/etcd-bin.ts';
import { runCli, type CliProcess } from '../harness/proc.ts';

const MiB = 1024 * 1024;

/** A logger(1) on PATH that appends each line it is given to a file: what a forced action records (issue 20). */
function fakeLogger(): { env: Record<string, string>; lines: () => string[] } {
  const bin = mkdtempSync(join(tmpdir(), 'edd-logger-'));
  const out = join(bin, 'lines');
  writeFileSync(join(bin, 'logger'), `#!/bin/sh\nshift 5\nprintf '%s\\n' "$*" >> ${out}\n`);
  chmodSync(join(bin, 'logger'), 0o755);
  return {
    env: { PATH: `${bin}:${process.env.PATH ?? '/usr/bin:/bin'}` },
    lines: () => (existsSync(out) ? readFileSync(out, 'utf8').split('\n').filter(Boolean) : []),
  };
}
const EVERY_3S = '*/3 * * * * *';

async function stopAll(daemons: CliProcess[]): Promise<void> {
  await Promise.all(daemons.map((d) => (d.isRunning() ? d.kill('SIGTERM') : d.exited)));
}

for (const version of versionsUnderTest()) {
  describe(`pause, resume and halt on etcd ${version}`, () => {
    let cluster: Cluster;
    let cfg: string;
    before(async () => {
      cluster = await startCluster({ version, tls: true });
      cfg = writeConfig(cluster, cluster.members[0]!, {}, 'ops.yaml');
    });
    after(async () => {
      await cluster?.stop();
    });
    const cli = (args: string[], env?: Record<string, string>) => runCli([...args, '--config', cfg], { env });

    it('pause records the real uid and SUDO_UID, not SUDO_USER; status shows a hostile reason escaped', async () => {
      const p = await cli(['pause', '--reason', 'upgrade\x1b]0;owned\x07\x1b[2J'], { SUDO_UID: '4242', SUDO_USER: 'the-boss' });
      assert.equal(p.code, 0, p.stdout + p.stderr);
      const uid = process.getuid!();
      assert.match(
        p.stdout,
        new RegExp(
          `^paused: paused by uid ${uid}( \\(\\S+\\))?, SUDO_UID 4242( \\(\\S+\\))? on \\S+ at \\S+: upgrade\\\\x1b\\]0;owned`,
          'm',
        ),
      );
      const st = JSON.parse((await cli(['status', '--json'])).stdout);
      assert.match(st.pause.by, new RegExp(`^uid ${uid}( \\(\\S+\\))?, SUDO_UID 4242`));
      const raw = JSON.parse((await cluster.client().get('/etcd-defragd/pause').string())!);
      assert.equal(raw.uid, uid, 'the record in etcd has the uid as a number too');
      assert.equal(raw.sudoUid, 4242);
      assert.equal(st.pause.reason, 'upgrade\x1b]0;owned\x07\x1b[2J', 'JSON keeps the value, as escapes');
      assert.doesNotMatch(JSON.stringify(st), /the-boss/);
      const table = (await cli(['status'])).stdout;
      assert.match(table, /^pause: paused by uid .*: upgrade\\x1b\]0;owned\\x07\\x1b\[2J$/m);
      assert.ok(!table.includes('\x1b'), 'no raw ESC reaches the terminal');
      const r = await cli(['resume']);
      assert.equal(r.code, 0, r.stdout + r.stderr);
      assert.ok(!r.stdout.includes('\x1b'));
    });

    it('a paused cluster defragments nothing; after resume it defragments again', async () => {
      await fill(cluster, { inUseBytes: 12 * MiB, reclaimableBytes: 20 * MiB, prefix: `fill-${Date.now()}/` });
      const before = (await allDefragEvents(cluster)).length;

      const p = await cli(['pause', '--reason', 'kernel upgrade']);
      assert.equal(p.code, 0, p.stdout + p.stderr);
      assert.match(p.stdout, /^paused: paused by uid \d+.* on \S+ at \d{4}-\d\d-\d\dT[\d:.]+Z: kernel upgrade$/m);
      const st = JSON.parse((await cli(['status', '--json'])).stdout);
      assert.equal(st.pause.reason, 'kernel upgrade');
      assert.ok(st.pause.by && st.pause.host && st.pause.at, JSON.stringify(st.pause));
      assert.match(st.nextRun, /^\d{4}-/);
      const table = await cli(['status']);
      assert.match(table.stdout, /^pause: paused by .*: kernel upgrade$/m);
      assert.match(table.stdout, /^next run: \d{4}-/m);
      assert.match(table.stdout, /^halt: no$/m);

      const daemons = cluster.members.map((m) => startDaemon(cluster, m, { schedule: { cron: EVERY_3S } }));
      try {
        // Two scheduled runs each, all skipped for the pause.
        for (const d of daemons) {
          const first = await d.waitForJson<LogLine>((l) => l.event === 'run.skip', 60_000);
          assert.equal(first.check, 'pause', JSON.stringify(first));
          assert.match(first.msg, /paused by .*: kernel upgrade; resume with: etcd-defragd resume/);
          await d.waitForJson<LogLine>((l) => l.event === 'run.skip' && l.runId !== first.runId, 30_000);
        }
        assert.equal((await allDefragEvents(cluster)).length, before, 'nothing defragmented while paused');
        assert.ok(daemons.every((d) => d.jsonLines<LogLine>().every((l) => l.event !== 'defrag.start')));

        const r = await cli(['resume']);
        assert.equal(r.code, 0, r.stdout + r.stderr);
        assert.match(r.stdout, /pause lifted \(was paused by .*: kernel upgrade\)/);
        await Promise.all(daemons.map((d) => d.waitForJson<LogLine>((l) => l.event === 'defrag.done', 120_000)));
        const after = (await allDefragEvents(cluster)).slice(before);
        assert.deepEqual(after.map((e) => e.member).sort(), cluster.members.map((m) => m.name).sort(), 'every member once, after resume');
        assertNoOverlap(await allDefragEvents(cluster));
      } finally {
        await stopAll(daemons);
      }
    });

    it('an integrity halt stops every daemon; resume clears it only with --integrity-checked', async () => {
      await fill(cluster, { inUseBytes: 8 * MiB, reclaimableBytes: 16 * MiB, prefix: `fill-${Date.now()}/` });
      const before = (await allDefragEvents(cluster)).length;
      // What run.ts writes after a HashKV mismatch.
      await cluster
        .client()
        .put('/etcd-defragd/halt')
        .value(JSON.stringify({ member: 'abc', reason: 'integrity: HashKV differs (test)', at: new Date().toISOString() }))
        .exec();
      const daemon = startDaemon(cluster, cluster.members[1]!, { schedule: { cron: EVERY_3S } });
      try {
        const skip = await daemon.waitForJson<LogLine>((l) => l.event === 'run.skip', 60_000);
        assert.equal(skip.check, 'halt');
        assert.match(skip.msg, /resume with: etcd-defragd resume --integrity-checked/);
        assert.match((await cli(['status'])).stdout, /^halt: halted after an integrity mismatch: integrity: HashKV differs \(test\)/m);

        const refused = await cli(['resume']);
        assert.equal(refused.code, 1, refused.stdout + refused.stderr);
        assert.match(refused.stdout, /not cleared: confirm with etcd-defragd resume --integrity-checked/);
        assert.equal((await cluster.client().get('/etcd-defragd/halt').string()) !== null, true, 'the halt is still there');

        const audit = fakeLogger();
        const ok = await cli(['resume', '--integrity-checked'], audit.env);
        assert.equal(ok.code, 0, ok.stdout + ok.stderr);
        const recorded = audit.lines();
        assert.equal(recorded.length, 1, recorded.join('\n'));
        assert.match(
          recorded[0]!,
          /^integrity halt cleared by uid \d+.* on \S+ \(resume --integrity-checked\), who confirmed the members were checked; HashKV agrees/,
        );
        assert.match(ok.stdout, /integrity halt cleared \(was: integrity: HashKV differs \(test\)/);
        assert.match(
          ok.stdout,
          /^HashKV agrees on all 3 voting members at revision \d+ \([0-9a-f]+=\d+, /m,
          'resume compared HashKV itself',
        );
        assert.equal(await cluster.client().get('/etcd-defragd/halt').string(), null);
        await daemon.waitForJson<LogLine>((l) => l.event === 'defrag.done', 120_000);
        assert.equal((await allDefragEvents(cluster)).length, before + 1);
      } finally {
        await stopAll([daemon]);
      }
    });
  });

  describe(`pause and disarm during NOSPACE on etcd ${version}`, () => {
    let cluster: Cluster;
    let cfg: string;
    before(async () => {
      cluster = await startCluster({ version, tls: true, quotaBytes: 24 * MiB });
      cfg = writeConfig(cluster, cluster.members[0]!, { policy: { quotaBytes: 24 * MiB } }, 'ops.yaml');
    });
    after(async () => {
      await cluster?.stop();
    });
    const cli = (args: string[], env?: Record<string, string>) => runCli([...args, '--config', cfg], { env });

    it('pause says clearly that NOSPACE refuses it; disarm says why the automatic disarm refused and disarms with --force', async () => {
      // An integrity halt, written while writes worked, keeps the automatic disarm from acting.
      await cluster
        .client()
        .put('/etcd-defragd/halt')
        .value(JSON.stringify({ reason: 'integrity: test', at: new Date().toISOString() }))
        .exec();
      await fillUntilNoSpace(cluster, { prefix: 'full/' });
      const armed = async () => (await listAlarms(cluster)).some((a) => /nospace/i.test(a.alarm));
      assert.ok(await armed());

      const p = await cli(['pause', '--reason', 'incident']);
      assert.equal(p.code, 75, p.stdout + p.stderr);
      assert.match(p.stderr, /cannot pause: etcd refuses every write while the NOSPACE alarm is raised/);
      assert.match(p.stderr, /systemctl stop etcd-defragd/);

      const d = await cli(['disarm']);
      assert.equal(d.code, 75, d.stdout + d.stderr);
      assert.match(d.stdout, /NOSPACE not disarmed \(blocked\)/);
      assert.match(d.stderr, /NOSPACE stays armed: defragmentation is halted after an integrity mismatch/);
      assert.ok(await armed(), 'still armed');

      // Forced while the members are still over the quota: the first write raises it again, and it says so.
      const early = await cli(['disarm', '--force']);
      assert.equal(early.code, 1, early.stdout + early.stderr);
      assert.match(early.stdout, /but etcd raised NOSPACE again at the first write: a member is still over its quota/);
      assert.ok(await armed(), 'raised again by the test write');

      // Space freed (deletes and compaction work during NOSPACE, then a defragment per member).
      const c = cluster.client();
      await c.delete().prefix('full/').exec();
      const rev = (await c.maintenance.status()).header.revision;
      await c.kv.compact({ revision: rev, physical: true });
      for (const m of cluster.members) await cluster.etcdctl(['defrag'], { member: m, timeoutMs: 60_000 });
      const still = await cli(['disarm']);
      assert.equal(still.code, 75, 'the halt still blocks the automatic disarm');
      const audit = fakeLogger();
      const f = await cli(['disarm', '--force'], { ...audit.env, SUDO_UID: '4242' });
      assert.equal(f.code, 0, f.stdout + f.stderr);
      const recorded = audit.lines();
      assert.equal(recorded.length, 1, recorded.join('\n'));
      assert.match(
        recorded[0]!,
        /^NOSPACE disarmed by hand \(disarm --force\) by uid \d+.*, SUDO_UID 4242.* on \S+: member [0-9a-f, ]+ \(checks refused: blocked\); a test write succeeded$/,
      );
      assert.match(f.stdout, /disarmed NOSPACE of [0-9a-f, ]+ \(--force\); a test write succeeded/);
      assert.ok(!(await armed()), 'disarmed');
      await c.put('probe/after').value('x').exec();
    });
  });
}
