/**
 * Proves the real-etcd test harness works, for every version in ETCD_VERSIONS (default 3.4, 3.5):
 * a 3-member cluster with client mTLS starts, is reachable only with the right client
 * certificate, can be filled with a fragmented db, defragments exactly the member it is told to
 * (as seen in the member logs), pauses/resumes and restarts members, and stops without leaving a
 * process or directory behind.
 */
import assert from 'node:assert/strict';
import { existsSync, readFileSync } from 'node:fs';
import { after, before, describe, test } from 'node:test';
import { Etcd3, type IOptions } from 'etcd3';
import { noRetryFaultHandling, startCluster, type Cluster } from '../harness/cluster.ts';
import { allDefragEvents, assertNoOverlap, defragEvents } from '../harness/defrag-log.ts';
import { errorText } from '../harness/errors.ts';
import { pidAlive, pidsMentioning } from '../harness/reaper.ts';
import { clusterStatus, fill, fmtStatus, memberStatus } from '../harness/data.ts';
import { versionsUnderTest } from '../harness/etcd-bin.ts';
import { startReadProbe, startWriteLoad } from '../harness/load.ts';

const MiB = 1024 * 1024;

for (const version of versionsUnderTest()) {
  describe(`etcd ${version} harness`, { timeout: 180_000 }, () => {
    let cluster: Cluster;
    let started = 0;

    before(async () => {
      started = Date.now();
      cluster = await startCluster({ version });
    });

    after(async () => {
      await cluster?.stop();
    });

    test('three members healthy over mutual TLS', async (t) => {
      t.diagnostic(`etcd ${cluster.fullVersion} in ${cluster.dir}, started in ${Date.now() - started} ms`);
      assert.ok(cluster.fullVersion.startsWith(`${version}.`));
      assert.equal(cluster.members.length, 3);
      assert.ok(cluster.endpoints().every((e) => e.startsWith('https://127.0.0.1:')));
      const statuses = await clusterStatus(cluster);
      assert.equal(statuses.length, 3);
      const leaders = new Set(statuses.map((s) => s.leaderHex));
      assert.equal(leaders.size, 1, `members disagree on the leader: ${[...leaders].join(', ')}`);
      assert.equal(statuses.filter((s) => s.isLeader).length, 1);
      for (const [i, s] of statuses.entries()) {
        const m = cluster.members[i]!;
        assert.equal(s.id, m.id);
        assert.match(m.id, /^[0-9a-f]{1,16}$/);
        assert.equal(BigInt(m.idDec).toString(16), m.id);
        assert.ok(pidAlive(m.pid));
      }
      assert.equal(await cluster.leaderId(), [...leaders][0]);
      const put = await cluster.client().put('harness/hello').value('world').exec();
      assert.ok(BigInt(put.header.revision) > 1n);
      // etcdctl gets the same endpoints and TLS flags.
      const r = await cluster.etcdctl(['endpoint', 'health']);
      assert.equal(r.code, 0, r.stderr);
      assert.equal((r.stdout + r.stderr).match(/is healthy/g)?.length, 3, r.stdout + r.stderr);
    });

    test('clients without a certificate, or trusting another CA, are refused', async () => {
      const pki = cluster.pki!;
      const m = cluster.members[0]!;
      const attempt = async (credentials: IOptions['credentials']): Promise<string> => {
        const c = new Etcd3({ hosts: [m.clientUrl], ...(credentials ? { credentials } : {}), faultHandling: noRetryFaultHandling() });
        try {
          await c.maintenance.status({ deadline: Date.now() + 3000 });
          return 'succeeded';
        } catch (err) {
          return errorText(err);
        } finally {
          c.close();
        }
      };
      const noCert = await attempt({ rootCertificate: readFileSync(pki.caFile) });
      assert.notEqual(noCert, 'succeeded', 'a client without a certificate was let in');
      const foreignCert = await attempt({
        rootCertificate: readFileSync(pki.caFile),
        certChain: readFileSync(pki.otherClientCertFile),
        privateKey: readFileSync(pki.otherClientKeyFile),
      });
      assert.notEqual(foreignCert, 'succeeded', 'a client certificate from another CA was accepted');
      const wrongCa = await attempt({
        rootCertificate: readFileSync(pki.otherCaFile),
        certChain: readFileSync(pki.clientCertFile),
        privateKey: readFileSync(pki.clientKeyFile),
      });
      assert.notEqual(wrongCa, 'succeeded', 'the server certificate was trusted with the wrong CA');
    });

    test('fill leaves a fragmented db on every member', async (t) => {
      const res = await fill(cluster, { inUseBytes: 24 * MiB, reclaimableBytes: 24 * MiB, log: (l) => t.diagnostic(l) });
      assert.ok(res.keys > 0 && res.garbageKeys > 0);
      for (const s of res.members) {
        assert.ok(s.dbSizeInUse >= 20 * MiB, `in use too small: ${fmtStatus(s)}`);
        assert.ok(s.dbSize - s.dbSizeInUse >= 12 * MiB, `not fragmented enough: ${fmtStatus(s)}`);
      }
      const got = await cluster.client().getAll().prefix('fill/k/').count();
      assert.equal(got, res.keys);
      assert.equal(await cluster.client().getAll().prefix('fill/g/').count(), 0);
    });

    test('etcdctl defrag of one member shows up for exactly that member', async (t) => {
      const target = cluster.members[1]!;
      const before = await memberStatus(cluster, target);
      const t0 = Date.now();
      const r = await cluster.etcdctl(['defrag'], { member: target, timeoutMs: 120_000 });
      assert.equal(r.code, 0, r.stderr);
      t.diagnostic(`defrag of ${target.name} took ${Date.now() - t0} ms`);
      const events = await allDefragEvents(cluster);
      assert.equal(events.length, 1, `expected one defrag, got ${JSON.stringify(events)}`);
      const ev = events[0]!;
      assert.equal(ev.member, target.name);
      assert.ok(ev.end, 'defrag has no end');
      assert.ok(ev.end.getTime() >= ev.start.getTime());
      assert.ok(ev.start.getTime() >= t0 - 2000 && ev.end.getTime() <= Date.now() + 2000, 'defrag times are not from this run');
      assert.equal(ev.error, undefined);
      assert.ok(ev.dbSizeBefore && ev.dbSizeAfter && ev.dbSizeAfter < ev.dbSizeBefore, `backend sizes not parsed: ${JSON.stringify(ev)}`);
      assert.ok(ev.backendTookMs !== undefined && ev.backendTookMs >= 0);
      assert.deepEqual(await defragEvents(cluster.members[0]!), []);
      assertNoOverlap(events);
      const afterS = await memberStatus(cluster, target);
      t.diagnostic(`before ${fmtStatus(before)}; after ${fmtStatus(afterS)}`);
      assert.ok(afterS.dbSize < before.dbSize - 10 * MiB, 'db did not shrink');
    });

    test('a paused member stops answering, the others keep serving, resume brings it back', async (t) => {
      const leader = await cluster.leader();
      const victim = cluster.members.find((m) => m !== leader)!;
      const probe = startReadProbe(cluster, { ratePerSec: 20, deadlineMs: 10_000 });
      const load = startWriteLoad(cluster, { ratePerSec: 60, deadlineMs: 1000 });
      await new Promise((r) => setTimeout(r, 300));
      victim.pause();
      assert.ok(victim.isPaused);
      await assert.rejects(cluster.client(victim).maintenance.status({ deadline: Date.now() + 500 }), /DeadlineExceeded|DEADLINE_EXCEEDED/);
      await new Promise((r) => setTimeout(r, 1200));
      victim.resume();
      assert.ok(!victim.isPaused);
      const s = await memberStatus(cluster, victim, { timeoutMs: 5000 });
      assert.equal(s.id, victim.id);
      await new Promise((r) => setTimeout(r, 300));
      const [report, probeReport] = await Promise.all([load.stop(), probe.stop()]);
      t.diagnostic(`write load: ${report.toString()}`);
      t.diagnostic(`read probe: ${probeReport.toString()}`);
      const blocked = probeReport.longestBlockedMs();
      assert.ok(blocked[victim.name]! >= 1000, `paused member blocked only ${blocked[victim.name]} ms`);
      for (const m of cluster.members.filter((x) => x !== victim)) {
        assert.ok(blocked[m.name]! < 1000, `${m.name} blocked ${blocked[m.name]} ms while another member was paused`);
      }
      // Writes through the other members went on; those sent to the paused one failed or waited.
      const perMember = report.byMember();
      for (const m of cluster.members.filter((x) => x !== victim)) {
        assert.equal(perMember[m.name]!.failed, 0, `${m.name} had failed writes: ${JSON.stringify([...report.errors()])}`);
      }
      assert.ok(report.longestGapMs() < 1000, `writes stalled for ${report.longestGapMs()} ms`);
      assert.ok(perMember[victim.name]!.longestGapMs >= 900);
    });

    test('a member restarts with its data and identity', async () => {
      const m = cluster.members[2]!;
      const id = m.id;
      const oldPid = m.pid;
      await m.restart();
      assert.ok(m.isRunning());
      assert.notEqual(m.pid, oldPid);
      assert.ok(!pidAlive(oldPid));
      assert.equal(m.id, id);
      const v = await m
        .client()
        .get('harness/hello')
        .options({ deadline: Date.now() + 5000 })
        .string();
      assert.equal(v, 'world');
    });

    test('stop leaves no etcd process and no directory', async () => {
      const pids = cluster.members.map((m) => m.pid);
      const watchdog = cluster.watchdogPid;
      assert.ok(pids.every((p) => pidAlive(p)));
      assert.ok(watchdog > 0 && pidAlive(watchdog));
      const t0 = Date.now();
      await cluster.stop();
      const took = Date.now() - t0;
      for (const p of [...pids, watchdog]) assert.ok(!pidAlive(p), `pid ${p} still alive after stop()`);
      assert.deepEqual(pidsMentioning(cluster.dir), []);
      if (process.env.KEEP_ETCD_DIRS !== '1') assert.ok(!existsSync(cluster.dir), `${cluster.dir} still exists`);
      assert.ok(cluster.members.every((m) => !m.isRunning()));
      assert.ok(took < 15_000, `stop took ${took} ms`);
    });
  });
}
