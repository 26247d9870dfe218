// Issue 4 acceptance: the seed incident ("mvcc: database space exceeded") on real clusters,
// recovered by three daemons without anyone disarming, on etcd 3.4 and 3.5.
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { copyFileSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { after, afterEach, describe, it } from 'node:test';
import { loadConfig } from '../../src/config.ts';
import { accessFromConfig, ClientPool } from '../../src/etcd.ts';
import { silentLogger } from '../../src/log.ts';
import { realClock } from '../../src/clock.ts';
import { exitCodeFor, run } from '../../src/run.ts';
import { Turn } from '../../src/turn.ts';
import { startCluster, type Cluster } from '../harness/cluster.ts';
import { allDefragEvents, assertNoOverlap } from '../harness/defrag-log.ts';
import { fill, fillUntilNoSpace, historyUntilNoSpace, isNoSpaceError, listAlarms, verifyData, type Written } from '../harness/data.ts';
import { memberEtcd, startDaemon, writeConfig, type LogLine, type Overrides } from '../harness/defragd.ts';
import { issueCert } from '../harness/pki.ts';
import { versionsUnderTest } from '../harness/etcd-bin.ts';
import type { CliProcess } from '../harness/proc.ts';

const MiB = 1024 * 1024;
const QUOTA = 48 * MiB;
const CHECK_MS = 5000;
const daemonConfig: Overrides = {
  schedule: { cron: '0 0 1 1 *' },
  policy: { quotaBytes: QUOTA, minReclaimable: '4MiB', freeDiskMargin: '16MiB' },
  nospace: { checkInterval: `${CHECK_MS}ms` },
};

/**
 * The incident as Kubernetes lives it: a burst of updates to the same keys piles up history until
 * etcd raises NOSPACE; the API server's periodic compaction (every 5 minutes) then frees that
 * history, but the quota counts the file, so writes stay refused until defrag and disarm.
 */
async function incident(cluster: Cluster): Promise<{ written: Written; alarmAt: number }> {
  const written = await historyUntilNoSpace(cluster, { maxPuts: 4000 });
  const client = cluster.client();
  const alarmAt = Date.now();
  const status = await client.maintenance.status();
  await client.kv.compact({ revision: status.header.revision, physical: true }); // the API server's compaction
  return { written, alarmAt };
}

/** Every hot key holds its last acknowledged value, or the value of the put that hit the quota. */
async function verifyHot(cluster: Cluster, written: Written): Promise<void> {
  for (const m of cluster.members) {
    for (const [key, digest] of written.digests) {
      const v = await cluster
        .client(m)
        .get(key)
        .options({ serializable: true } as never)
        .buffer();
      assert.ok(v, `${m.name}: ${key} missing`);
      const got = createHash('sha256').update(v).digest('hex');
      assert.ok(got === digest || got === written.uncertain.get(key), `${m.name}: ${key} changed`);
    }
  }
}

async function writesWork(cluster: Cluster): Promise<boolean> {
  try {
    await cluster.client().put('probe/after').value('x').exec();
    return true;
  } catch (err) {
    if (isNoSpaceError(err)) return false;
    // A leader transfer by a daemon drops the proposals in flight (seen on 3.4.23): not an answer yet.
    if (/raft proposal dropped|leader changed|no leader|deadline|timed out|unavailable/i.test(String(err))) return false;
    throw err;
  }
}

async function waitFor<T>(what: string, timeoutMs: number, fn: () => Promise<T | undefined | false>): Promise<T> {
  const until = Date.now() + timeoutMs;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > until) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 250));
  }
}

for (const version of versionsUnderTest()) {
  describe(`NOSPACE on etcd ${version}`, () => {
    let cluster: Cluster | undefined;
    let daemons: CliProcess[] = [];
    afterEach(async () => {
      await Promise.all(daemons.filter((d) => d.isRunning()).map((d) => d.kill('SIGTERM')));
      daemons = [];
      await cluster?.stop();
      cluster = undefined;
    });
    after(async () => cluster?.stop());

    it('three daemons recover the seed incident without anyone disarming, losing nothing', async (t) => {
      cluster = await startCluster({ version, tls: true, quotaBytes: QUOTA });
      const c = cluster;
      daemons = c.members.map((m) => startDaemon(c, m, daemonConfig));
      await Promise.all(daemons.map((d) => d.waitForJson((l) => l.event === 'turn.register', 30_000)));
      const { written, alarmAt } = await incident(c);
      assert.ok(!(await writesWork(c)), 'writes are refused after the incident');

      const recoveredAt = await waitFor('writes to work again', 120_000, async () => (await writesWork(c)) && Date.now());
      await verifyHot(c, written);
      const defrags = (await allDefragEvents(c)).filter((e) => e.start.getTime() >= alarmAt);
      const defragMs = defrags.reduce((sum, e) => sum + ((e.end?.getTime() ?? Date.now()) - e.start.getTime()), 0);
      t.diagnostic(`writes refused for ${recoveredAt - alarmAt} ms after the alarm; ${defrags.length} defrags took ${defragMs} ms`);
      // Generous bound: two check intervals, the defrags, each member's settle (the default) and
      // scheduling noise on a shared machine. The benchmark measures it properly.
      assert.ok(recoveredAt - alarmAt < 2 * CHECK_MS + defragMs + 3 * 2_000 + 30_000, `recovered after ${recoveredAt - alarmAt} ms`);
      assert.deepEqual(await listAlarms(c), []);
      assertNoOverlap(await allDefragEvents(c));
      const disarms = daemons.flatMap((d) => d.jsonLines<LogLine>()).filter((l) => l.event === 'nospace.disarm');
      assert.ok(disarms.length >= 1);
    });

    it('with live data above the quota the alarm stays and the error says why; nothing is lost', async () => {
      cluster = await startCluster({ version, tls: true, quotaBytes: QUOTA });
      const c = cluster;
      daemons = c.members.map((m) => startDaemon(c, m, daemonConfig));
      await Promise.all(daemons.map((d) => d.waitForJson((l) => l.event === 'turn.register', 30_000)));
      const written = await fillUntilNoSpace(c, { prefix: 'live/' });
      const blocked = await Promise.race(daemons.map((d) => d.waitForJson<LogLine>((l) => l.event === 'nospace.blocked', 60_000)));
      assert.equal(blocked.level, 50);
      assert.match(
        blocked.msg,
        /live data alone is above 90\.0% of the quota \(.* in use after a defragment, quota 48\.0MiB\).*Raise --quota-backend-bytes/,
      );
      assert.ok(
        (await listAlarms(c)).some((a) => /nospace/i.test(a.alarm)),
        'the alarm stays armed',
      );
      assert.ok(!(await writesWork(c)));
      await verifyData(c, written);
      assertNoOverlap(await allDefragEvents(c));
    });

    it('recovers when the daemon holding the turn is killed and restarted 10 s later; a member without a daemon is named', async (t) => {
      cluster = await startCluster({ version, tls: true, quotaBytes: QUOTA });
      const c = cluster;
      // Only two members get a daemon at first: the third keeps the alarm armed and must be named.
      const cfg = { ...daemonConfig, coordination: { leaseTTL: '5s', settle: '6s' } };
      // The member left without a daemon has the highest ID: the NOSPACE order (lowest ID first)
      // lets the other two go before it waits for that member, whatever IDs etcd drew.
      const byId = [...c.members].sort((a, b) => (BigInt(`0x${a.id}`) < BigInt(`0x${b.id}`) ? -1 : 1));
      daemons = byId.slice(0, 2).map((m) => startDaemon(c, m, cfg));
      await Promise.all(daemons.map((d) => d.waitForJson((l) => l.event === 'turn.register', 30_000)));
      const { written } = await incident(c);

      // Kill the first daemon that defragments, while it holds the turn (during its settle).
      const first = await Promise.race(daemons.map((d, i) => d.waitForJson((l) => l.event === 'defrag.done', 60_000).then(() => i)));
      await daemons[first]!.kill('SIGKILL');
      await new Promise((r) => setTimeout(r, 10_000));
      const restarted = startDaemon(c, byId[first]!, cfg);
      daemons.push(restarted);

      const unattended = byId[2]!;
      const named = await Promise.race(
        daemons.filter((d) => d.isRunning()).map((d) => d.waitForJson<LogLine>((l) => l.event === 'nospace.unattended', 90_000)),
      );
      assert.equal(named.level, 50);
      assert.equal(named.member, unattended.id);
      assert.match(named.msg, new RegExp(`member ${unattended.name} \\(${unattended.id}, .*\\) keeps the NOSPACE alarm armed`));
      assert.ok(!(await writesWork(c)), 'still armed while a member is over the quota');

      // Its daemon comes up (as an operator would start it): recovery completes.
      daemons.push(startDaemon(c, unattended, cfg));
      await waitFor('writes to work again', 120_000, () => writesWork(c)).catch((err: Error) => {
        throw new Error(`${err.message}\n${daemons.map((d) => d.output()).join('\n-----\n')}`);
      });
      t.diagnostic(
        `restarted daemon: ${restarted
          .jsonLines<LogLine>()
          .filter((l) => /turn\.(register|spare)/.test(l.event ?? ''))
          .map((l) => l.msg)
          .join('; ')}`,
      );
      assert.deepEqual(await listAlarms(c), []);
      await verifyHot(c, written);
      assertNoOverlap(await allDefragEvents(c));
    });

    /** Writes back, no alarm, hot keys unchanged, etcd's own log shows one defrag at a time. */
    async function assertRecovered(c: Cluster, written: Written, what: string): Promise<number> {
      const at = await waitFor(`writes to work again (${what})`, 180_000, async () => (await writesWork(c)) && Date.now()).catch(
        (err: Error) => {
          throw new Error(`${err.message}\n${daemons.map((d) => d.output()).join('\n-----\n')}`);
        },
      );
      assert.deepEqual(await listAlarms(c), []);
      await verifyHot(c, written);
      assertNoOverlap(await allDefragEvents(c));
      return at;
    }

    it('daemons first started after the alarm (a fresh install during the incident) recover it', async (t) => {
      cluster = await startCluster({ version, tls: true, quotaBytes: QUOTA });
      const c = cluster;
      // The seed's case: history fills the quota and nothing compacts it; no etcd-defragd ever ran.
      const written = await historyUntilNoSpace(c, { maxPuts: 4000 });
      const alarmAt = Date.now();
      assert.ok(!(await writesWork(c)), 'writes are refused after the incident');
      const keys = await c.client().getAll().prefix('/etcd-defragd/').keys();
      assert.deepEqual(keys, [], 'no key of ours exists: nothing was prepared while writes worked');
      daemons = c.members.map((m) => startDaemon(c, m, daemonConfig));
      const at = await assertRecovered(c, written, 'daemons started after the alarm');
      const orders = daemons.flatMap((d) => d.jsonLines<LogLine>()).filter((l) => l.event === 'turn.acquired' && l.order === 'nospace');
      assert.ok(orders.length >= 1, 'went through the NOSPACE order');
      t.diagnostic(`writes refused for ${at - alarmAt} ms after the alarm; ${orders.length} members went in the NOSPACE order`);
    });

    it('every daemon stopped during the alarm and started again after the lease TTL (a reboot) recovers it', async () => {
      cluster = await startCluster({ version, tls: true, quotaBytes: QUOTA });
      const c = cluster;
      const cfg = { ...daemonConfig, coordination: { leaseTTL: '5s' } };
      daemons = c.members.map((m) => startDaemon(c, m, cfg));
      await Promise.all(daemons.map((d) => d.waitForJson((l) => l.event === 'turn.register', 30_000)));
      const written = await historyUntilNoSpace(c, { maxPuts: 4000 });
      // The nodes go down with the alarm raised (kubelet restarts, a reboot): killed, not stopped.
      await Promise.all(daemons.map((d) => d.kill('SIGKILL')));
      await new Promise((r) => setTimeout(r, 5_000 + 3_000));
      assert.ok(!(await writesWork(c)), 'still read-only after the daemons went away');
      daemons = c.members.map((m) => startDaemon(c, m, cfg));
      await assertRecovered(c, written, 'daemons restarted after their leases expired');
    });

    it('a SIGHUP with renewed TLS files during the alarm still lets the daemons recover it', async () => {
      cluster = await startCluster({ version, tls: true, quotaBytes: QUOTA });
      const c = cluster;
      const pki = c.pki!;
      // Each daemon reads its own copy of the client pair, renewed below as kubeadm certs renew does.
      const pairs = c.members.map((m) => {
        const dir = join(c.dir, `pki-${m.name}`);
        mkdirSync(dir);
        const pair = { ca: join(dir, 'ca.crt'), crt: join(dir, 'client.crt'), key: join(dir, 'client.key') };
        copyFileSync(pki.caFile, pair.ca);
        copyFileSync(pki.clientCertFile, pair.crt);
        copyFileSync(pki.clientKeyFile, pair.key);
        return pair;
      });
      const cfg = (i: number) => ({
        ...daemonConfig,
        etcd: { ...memberEtcd(c, c.members[i]!), caFile: pairs[i]!.ca, certFile: pairs[i]!.crt, keyFile: pairs[i]!.key },
      });
      daemons = c.members.map((m, i) => startDaemon(c, m, cfg(i)));
      await Promise.all(daemons.map((d) => d.waitForJson((l) => l.event === 'turn.register', 30_000)));
      // Paused (written while writes work), so that the reload surely comes during the alarm, before any recovery.
      await c
        .client()
        .put('/etcd-defragd/pause')
        .value(JSON.stringify({ by: 'test', host: 'test', at: '', reason: 'hold' }))
        .exec();
      const written = await historyUntilNoSpace(c, { maxPuts: 4000 });
      await Promise.all(daemons.map((d) => d.waitForJson((l) => l.event === 'run.skip' && l.check === 'pause', 30_000)));
      const renewed = await issueCert(pki, 'renewed-client', { cn: 'kube-etcd-healthcheck-client', usage: 'client' });
      const from = daemons.map((d) => d.lines.length);
      for (const p of pairs) {
        copyFileSync(renewed.certFile, p.crt);
        copyFileSync(renewed.keyFile, p.key);
      }
      for (const d of daemons) process.kill(d.pid, 'SIGHUP');
      await Promise.all(daemons.map((d, i) => d.waitForJson((l) => l.event === 'config.reload', 15_000, { from: from[i] })));
      await Promise.all(daemons.map((d, i) => d.waitForJson((l) => l.event === 'tls.changed', 30_000, { from: from[i] })));
      await c.client().delete().key('/etcd-defragd/pause').exec(); // resume: a delete works during NOSPACE
      await assertRecovered(c, written, 'after a reload with renewed certificates during the alarm');
      assert.ok(
        daemons.every((d) => d.isRunning()),
        'the same processes',
      );
    });

    it('a HashKV mismatch after a defragment stops the round with exit 1', async () => {
      cluster = await startCluster({ version, tls: true });
      const c = cluster;
      await fill(c, { inUseBytes: 8 * MiB, reclaimableBytes: 16 * MiB });
      const target = c.members[0]!;
      const loaded = loadConfig({ path: writeConfig(c, target, { verify: { hashKV: true } }), env: {} });
      const pool = new ClientPool(accessFromConfig(loaded.config));
      const log = silentLogger();
      const lines: Record<string, unknown>[] = [];
      log.error = ((obj: Record<string, unknown>) => lines.push(obj)) as typeof log.error;
      const turn = new Turn(
        { prefix: loaded.config.coordination.prefix, leaseTTL: 5000, command: 'test' },
        { pool, endpoint: target.clientUrl, log, clock: realClock },
      );
      try {
        const r = await run(
          {
            config: loaded.config,
            pool,
            log,
            clock: realClock,
            turn,
            // The test double: the second member reports a different hash.
            hashKV: async (p, m, rev) => {
              const real = await p.get(m.endpoint).hashKV(rev);
              return m.id === BigInt(`0x${c.members[1]!.id}`).toString() ? { ...real, hash: `${real.hash}0` } : real;
            },
          },
          { mode: 'once' },
        );
        assert.equal(r.outcome, 'failed');
        assert.equal(r.check, 'integrity');
        assert.equal(exitCodeFor(r), 1);
        assert.match(r.reason, /HashKV differs between members/);
        const err = lines.find((l) => l.event === 'verify.fail')!;
        assert.ok(err, 'logged at error level');
        const hashes = err.hashes as Record<string, string>;
        assert.equal(new Set(Object.values(hashes)).size, 2, 'both hashes are in the error');
        // The round stays stopped on every node until an operator has looked.
        const next = await run({ config: loaded.config, pool, log, clock: realClock, turn }, { mode: 'once', force: true });
        assert.equal(next.outcome, 'skipped');
        assert.equal(next.check, 'halt');
        assert.match(next.reason, /halted after an integrity mismatch: .*resume with: etcd-defragd resume --integrity-checked/);
        await c.client().delete().key('/etcd-defragd/halt').exec();
        const resumed = await run({ config: loaded.config, pool, log, clock: realClock, turn }, { mode: 'once', force: true });
        assert.equal(resumed.outcome, 'done');
      } finally {
        await turn.close();
        pool.close();
      }
    });
  });
}
