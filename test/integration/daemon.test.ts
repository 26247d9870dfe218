// Issue 3 acceptance: daemons on every member of real 3-member clusters, etcd 3.4 and 3.5.
import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import { after, before, describe, it } from 'node:test';
import { startCluster, type Cluster } from '../harness/cluster.ts';
import { allDefragEvents, assertNoOverlap, defragEvents } from '../harness/defrag-log.ts';
import { fill } from '../harness/data.ts';
import { startDaemon, writeConfig, type LogLine, type Overrides } from '../harness/defragd.ts';
import { versionsUnderTest } from '../harness/etcd-bin.ts';
import { spawnCli, type CliProcess } from '../harness/proc.ts';

const MiB = 1024 * 1024;
const NEVER = '0 0 1 1 *'; // scheduled runs must not interfere: runs come from runOnStart

async function startAll(cluster: Cluster, overrides: Overrides, env: Record<string, string> = {}): Promise<CliProcess[]> {
  // Write every config first so the three processes start at the same instant.
  const daemons = cluster.members.map((m) => startDaemon(cluster, m, overrides, env));
  try {
    await Promise.all(daemons.map((d) => d.waitForJson((l) => l.event === 'daemon.start', 30_000)));
  } catch (err) {
    // Not started in time (a loaded machine): stop them, or they run on into the next test's cluster state.
    await stopAll(daemons).catch(() => undefined);
    throw err;
  }
  return daemons;
}

async function runsFinished(daemons: CliProcess[], timeoutMs = 120_000): Promise<LogLine[]> {
  return Promise.all(
    daemons.map((d) =>
      d.waitForJson<LogLine>((l) => l.event === 'run.done' || l.event === 'run.skip' || l.event === 'run.fail', timeoutMs),
    ),
  );
}

async function stopAll(daemons: CliProcess[]): Promise<void> {
  const exits = await Promise.all(daemons.map((d) => (d.isRunning() ? d.kill('SIGTERM') : d.exited)));
  for (const e of exits) assert.ok(e.code === 0 || e.signal === 'SIGKILL', `daemon exit ${JSON.stringify(e)}`);
}

for (const version of versionsUnderTest()) {
  describe(`daemon on etcd ${version}`, () => {
    let cluster: Cluster;
    let defragsBefore = 0;
    before(async () => {
      cluster = await startCluster({ version, tls: true });
    });
    after(async () => {
      await cluster?.stop();
    });
    async function refill(): Promise<void> {
      await fill(cluster, { inUseBytes: 12 * MiB, reclaimableBytes: 20 * MiB, prefix: `fill-${Date.now()}/` });
      defragsBefore = (await allDefragEvents(cluster)).length;
    }
    async function newDefrags() {
      return (await allDefragEvents(cluster)).sort((a, b) => a.start.getTime() - b.start.getTime()).slice(defragsBefore);
    }

    it('three daemons started at once defragment every member exactly once, one at a time, moving leadership away first', async () => {
      await refill();
      const leader = await cluster.leaderId();
      const daemons = await startAll(cluster, { schedule: { cron: NEVER, runOnStart: true } });
      try {
        const results = await runsFinished(daemons);
        for (const r of results) assert.equal(r.event, 'run.done', JSON.stringify(r));
        const defrags = await newDefrags();
        assert.deepEqual(defrags.map((e) => e.member).sort(), cluster.members.map((m) => m.name).sort(), 'each member exactly once');
        assertNoOverlap(await allDefragEvents(cluster));
        const i = cluster.members.findIndex((m) => m.id === leader);
        const log = daemons[i]!.jsonLines<LogLine>();
        const transfer = log.findIndex((l) => l.event === 'leader.transfer');
        const start = log.findIndex((l) => l.event === 'defrag.start');
        assert.ok(transfer >= 0 && transfer < start, `the leader's daemon moved leadership before defragmenting:\n${daemons[i]!.output()}`);
        assert.equal(log[transfer]!.from, leader);
      } finally {
        await stopAll(daemons);
      }
    });

    it('with coordination.leader=last the leader goes after the other members', async () => {
      await refill();
      const leader = cluster.memberById(await cluster.leaderId())!;
      const daemons = await startAll(cluster, {
        schedule: { cron: NEVER, runOnStart: true },
        coordination: { leader: 'last', leaseTTL: '5s', settle: '500ms', maxWait: '2m' },
      });
      try {
        await runsFinished(daemons);
        const defrags = await newDefrags();
        assert.equal(defrags.length, 3);
        assert.equal(defrags.at(-1)!.member, leader.name, `leader ${leader.name} last: ${defrags.map((d) => d.member)}`);
        assertNoOverlap(await allDefragEvents(cluster));
      } finally {
        await stopAll(daemons);
      }
    });

    it('a daemon killed while holding the turn blocks the others only until its lease expires', async () => {
      await refill();
      const daemons = await startAll(cluster, {
        schedule: { cron: NEVER, runOnStart: true },
        coordination: { leaseTTL: '5s', settle: '8s', maxWait: '2m' },
      });
      try {
        // The first daemon to finish its defragment holds the turn during the 8 s settle: kill it there.
        const first = await Promise.race(
          daemons.map((d, i) => d.waitForJson<LogLine>((l) => l.event === 'defrag.done', 60_000).then(() => i)),
        );
        const holder = daemons[first]!;
        await holder.kill('SIGKILL');
        const killedAt = Date.now();
        const others = daemons.filter((_, i) => i !== first);
        const results = await runsFinished(others, 90_000);
        for (const r of results) assert.equal(r.event, 'run.done', JSON.stringify(r));
        const defrags = await newDefrags();
        assert.equal(defrags.length, 3, JSON.stringify(defrags));
        for (const d of defrags.slice(1))
          assert.ok(d.start.getTime() >= killedAt - 500, `${d.member} started before the dead holder's turn ended`);
        assertNoOverlap(await allDefragEvents(cluster));
        const waited = others
          .flatMap((d) => d.jsonLines<LogLine>())
          .filter((l) => l.event === 'turn.wait' && String(l.reason).includes(`pid ${holder.pid}`));
        assert.ok(waited.length > 0, 'the others said whose turn they waited for');
      } finally {
        await stopAll(daemons);
      }
    });

    it('a holder killed mid-defragment: the next holder waits until that member answers again', async (t) => {
      await fill(cluster, { inUseBytes: 32 * MiB, reclaimableBytes: 48 * MiB, prefix: `fill-${Date.now()}/` });
      defragsBefore = (await allDefragEvents(cluster)).length;
      const before = await Promise.all(cluster.members.map(async (m) => (await defragEvents(m)).length));
      const daemons = await startAll(cluster, {
        schedule: { cron: NEVER, runOnStart: true },
        coordination: { leaseTTL: '5s', settle: '1s', maxWait: '2m' },
      });
      try {
        // Freeze the member the moment its daemon sends the defragment (a defrag that outlives its
        // daemon's lease), and kill that daemon: its lease expires while etcd is still "defragmenting".
        const first = await Promise.race(
          daemons.map((d, i) => d.waitForJson<LogLine>((l) => l.event === 'defrag.start', 60_000).then(() => i)),
        );
        const member = cluster.members[first]!;
        let events = await defragEvents(member);
        for (let i = 0; i < 400 && events.length === before[first]; i++) {
          await new Promise((r) => setTimeout(r, 5));
          events = await defragEvents(member);
        }
        member.pause(); // etcd has logged "starting defragment" (or 2 s passed)
        t.diagnostic(`froze ${member.name} ${events.at(-1)?.end ? 'after' : 'during'} its defragment`);
        await daemons[first]!.kill('SIGKILL');
        await new Promise((r) => setTimeout(r, 12_000)); // more than two lease TTLs
        const during = (await allDefragEvents(cluster)).slice(defragsBefore).filter((e) => e.member !== member.name);
        assert.deepEqual(during, [], 'nobody else defragmented while the member was still busy');
        member.resume();
        // A daemon that took the dead holder's turn waited for the member and then defragmented; one
        // that looked after the lease expired saw a member down with no holder and skipped, naming it.
        // A frozen ex-leader can revoke every lease when it resumes (etcd issues 12528, 15247): a
        // daemon that lost its turn that way skips before defragmenting - which is the point.
        const others = daemons.filter((_, i) => i !== first);
        for (const r of await runsFinished(others, 90_000)) {
          if (r.event === 'run.skip' && r.check === 'turn') assert.match(r.msg, /lost the cluster-wide turn before defragmenting/);
          else if (r.event === 'run.skip') assert.match(r.msg, new RegExp(`member ${member.name} \\(${member.id}`), JSON.stringify(r));
          else assert.equal(r.event, 'run.done', JSON.stringify(r));
        }
        assertNoOverlap(await allDefragEvents(cluster));
        const after = (await allDefragEvents(cluster)).slice(defragsBefore).filter((e) => e.member !== member.name);
        assert.ok(after.length <= 2 && new Set(after.map((e) => e.member)).size === after.length, 'each other member at most once');
      } finally {
        cluster.members.forEach((m) => m.isPaused && m.resume());
        await stopAll(daemons);
      }
    });

    it('a paused member makes every daemon skip, naming it', async () => {
      const paused = cluster.members[2]!;
      defragsBefore = (await allDefragEvents(cluster)).length;
      paused.pause();
      let daemons: CliProcess[] = [];
      try {
        daemons = await startAll(cluster, { schedule: { cron: NEVER, runOnStart: true } });
        const results = await runsFinished(daemons, 60_000);
        for (const r of results) {
          assert.equal(r.event, 'run.skip', JSON.stringify(r));
          assert.match(r.msg, new RegExp(`${paused.clientUrl.replace(/[.]/g, '\\.')}|${paused.id}`));
        }
        assert.equal((await newDefrags()).length, 0);
      } finally {
        paused.resume();
        await stopAll(daemons);
      }
    });

    it('keeps running when its etcd member restarts, and the next run works', async () => {
      const m = cluster.members[0]!;
      const d = startDaemon(cluster, m, { schedule: { cron: '*/2 * * * * *' }, metrics: { listen: '127.0.0.1:0' } });
      try {
        const started = await d.waitForJson<LogLine>((l) => l.event === 'daemon.start', 30_000);
        await d.waitForJson((l) => l.event === 'run.done', 30_000);
        await m.stop();
        await d.waitForJson((l) => l.event === 'run.skip' || l.event === 'run.fail', 30_000);
        await m.restart();
        const from = d.lines.length;
        const next = await d.waitForJson<LogLine>((l) => l.event === 'run.done', 60_000, { from });
        assert.equal(next.outcome, 'not-needed');
        assert.ok(d.isRunning());
        const body = await (await fetch(`http://${started.metrics}/metrics`)).text();
        assert.match(body, /etcd_defragd_runs_total\{outcome="skipped",mode="scheduled"\} [1-9]/);
        assert.match(body, /etcd_defragd_runs_total\{outcome="not-needed",mode="scheduled"\} [1-9]/);
        assert.match(body, new RegExp(`etcd_defragd_member_db_size_bytes\\{member="${m.id}",name="${m.name}"\\} \\d+`));
        assert.match(body, /etcd_defragd_next_run_timestamp_seconds \d+/);
        assert.equal(await (await fetch(`http://${started.metrics}/healthz`)).text(), 'ok\n');
      } finally {
        await stopAll([d]);
      }
    });

    it('SIGHUP with a broken config keeps the old one with one clear error line; journal priorities match levels', async () => {
      const m = cluster.members[1]!;
      const path = writeConfig(cluster, m, { schedule: { cron: NEVER }, log: { format: 'auto' } }, 'hup.yaml');
      const d = startDaemonAt(path, { JOURNAL_STREAM: '8:12345' });
      try {
        await d.waitForLine(/^<6>etcd-defragd started/, 30_000);
        writeFileSync(path, 'schedule:\n  cron: "every three hours"\n');
        d.child.kill('SIGHUP');
        const err = await d.waitForLine(/config reload rejected/, 10_000);
        assert.match(
          err.line,
          /^<3>config reload rejected, keeping the running config: schedule\.cron: "every three hours" is not a cron expression/,
        );
        assert.equal(d.lines.filter((l) => /config reload rejected/.test(l.line)).length, 1);
        assert.ok(d.isRunning());
        writeConfig(cluster, m, { schedule: { cron: '30 1 * * *' }, log: { format: 'auto' } }, 'hup.yaml');
        d.child.kill('SIGHUP');
        await d.waitForLine(/^<6>config reloaded; next run \S+T01:30:00/, 10_000);
        for (const l of d.lines) assert.match(l.line, /^<[2-7]>/, `every line carries a priority: ${l.line}`);
      } finally {
        await stopAll([d]);
      }
    });
  });
}

function startDaemonAt(path: string, env: Record<string, string>): CliProcess {
  return spawnCli(['run', '--config', path], { env });
}
