// Issue 8 acceptance, tried as a new user would: the seed's incident (history filling the quota,
// nobody compacting) recovered by three daemons whose config sets only the etcd section; the
// quota and "is defragmenting" taken from etcd; one voting member; a holder killed mid-defragment.
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { after, afterEach, describe, it } from 'node:test';
import { startCluster, type Cluster } from '../harness/cluster.ts';
import { allDefragEvents, assertNoOverlap, defragEvents } from '../harness/defrag-log.ts';
import { fill, historyUntilNoSpace, listAlarms, type Written } from '../harness/data.ts';
import { writeConfig, writeMinimalConfig, type LogLine, type Overrides } from '../harness/defragd.ts';
import { versionsUnderTest } from '../harness/etcd-bin.ts';
import { runCli, spawnCli, type CliProcess } from '../harness/proc.ts';

const MiB = 1024 * 1024;
const QUOTA = 64 * MiB;
const versions = versionsUnderTest();

/** Every hot key holds its last acknowledged value, or the value of the put that hit the quota. */
async function assertLiveDataIntact(cluster: Cluster, written: Written): Promise<void> {
  for (const m of cluster.members) {
    for (const key of new Set([...written.digests.keys(), ...written.uncertain.keys()])) {
      const v = await cluster
        .client(m)
        .get(key)
        .options({ serializable: true } as never)
        .buffer();
      assert.ok(v, `${m.name}: ${key} missing`);
      const got = createHash('sha256').update(v).digest('hex');
      assert.ok(got === written.digests.get(key) || got === written.uncertain.get(key), `${m.name}: ${key} changed`);
    }
  }
}

/** Waits until the alarm list is empty and a write goes through. */
async function waitWritable(cluster: Cluster, timeoutMs: number): Promise<number> {
  const t0 = Date.now();
  for (;;) {
    const alarms = await listAlarms(cluster).catch(() => [{ alarm: 'unknown' }]);
    if (alarms.length === 0) {
      try {
        await cluster.client().put('probe/after').value('ok').exec();
        return Date.now() - t0;
      } catch {
        /* raised again, or not yet */
      }
    }
    if (Date.now() - t0 > timeoutMs) throw new Error(`still not writable after ${timeoutMs} ms; alarms: ${JSON.stringify(alarms)}`);
    await new Promise((r) => setTimeout(r, 1000));
  }
}

function startMinimal(cluster: Cluster, extra: Overrides = {}): CliProcess[] {
  return cluster.members.map((m) => spawnCli(['run', '--config', writeMinimalConfig(cluster, m, extra)]));
}

async function stopAll(daemons: CliProcess[]): Promise<void> {
  await Promise.all(daemons.map((d) => (d.isRunning() ? d.kill('SIGTERM') : d.exited)));
}

function allLines(daemons: CliProcess[]): LogLine[] {
  return daemons.flatMap((d) => d.jsonLines<LogLine>());
}

describe('the seed incident with the shipped defaults', () => {
  let cluster: Cluster | undefined;
  let daemons: CliProcess[] = [];
  afterEach(async () => {
    await stopAll(daemons);
    daemons = [];
    await cluster?.stop();
    cluster = undefined;
  });

  for (const version of versions) {
    it(`etcd ${version}: history fills the quota, nobody compacts, three daemons configured with the etcd section only recover it`, async (t) => {
      cluster = await startCluster({ version, tls: true, quotaBytes: QUOTA });
      daemons = startMinimal(cluster);
      await Promise.all(daemons.map((d) => d.waitForJson<LogLine>((l) => l.event === 'turn.register', 60_000)));
      for (const d of daemons) {
        const q = await d.waitForJson<LogLine>((l) => l.event === 'quota', 30_000);
        assert.equal(q.quotaBytes, QUOTA, 'quota read from etcd, not the old 2 GiB default');
        assert.equal(q.source, 'metrics');
      }
      const written = await historyUntilNoSpace(cluster, { maxPuts: 8000 });
      const alarmAt = Date.now();
      t.diagnostic(`NOSPACE after ${(written.bytes / MiB).toFixed(0)} MiB of updates to 24 keys`);
      const tookMs = await waitWritable(cluster, 180_000);
      t.diagnostic(`writable again ${((Date.now() - alarmAt) / 1000).toFixed(1)} s after the alarm (${tookMs} ms of polling)`);
      assert.deepEqual(await listAlarms(cluster), []);
      await assertLiveDataIntact(cluster, written);
      assertNoOverlap(await allDefragEvents(cluster));
      const lines = allLines(daemons);
      const compactions = lines.filter((l) => l.event === 'compact');
      assert.ok(compactions.length > 0, `a daemon compacted:\n${daemons.map((d) => d.output()).join('\n')}`);
      for (const c of compactions) assert.equal(typeof c.inUseAfter, 'number', 'each step logs the sizes');
      // The daemons ran for seconds, not nospace.keepHistory (5m): the documented rule applies.
      assert.ok(
        lines.some((l) => l.event === 'compact.history'),
        'the daemon said it had no sample keepHistory old',
      );
      assert.ok(lines.some((l) => l.event === 'nospace.recovered'));
    });
  }

  it(`etcd ${versions.at(-1)}: the first compaction keeps nospace.keepHistory and is enough when the history is older`, async (t) => {
    cluster = await startCluster({ version: versions.at(-1)!, tls: true, quotaBytes: QUOTA });
    daemons = startMinimal(cluster, { nospace: { keepHistory: '15s', checkInterval: '2s' } });
    await Promise.all(daemons.map((d) => d.waitForJson<LogLine>((l) => l.event === 'turn.register', 60_000)));
    // About 40 s of updates: 15 s of history is well under the disarm mark (90% of 64 MiB).
    const written = await historyUntilNoSpace(cluster, { maxPuts: 8000, perSecond: 22 });
    await waitWritable(cluster, 180_000);
    await assertLiveDataIntact(cluster, written);
    assertNoOverlap(await allDefragEvents(cluster));
    const steps = allLines(daemons).filter((l) => l.event === 'compact');
    t.diagnostic(
      steps
        .map(
          (s) =>
            `${s.member}: ${s.step}: ${((s.inUseBefore as number) / MiB).toFixed(1)} -> ${((s.inUseAfter as number) / MiB).toFixed(1)} MiB`,
        )
        .join('; '),
    );
    assert.ok(steps.length > 0);
    assert.match(String(steps[0]!.step), /^keep 15\.0s of history/);
    assert.ok(
      steps.every((s) => s.step !== 'keep no history'),
      'never compacted to the latest revision',
    );
  });
});

describe('one voting member', () => {
  let cluster: Cluster | undefined;
  after(async () => {
    await cluster?.stop();
  });
  it(`etcd ${versions.at(-1)}: once --force skips (75) and says why; under NOSPACE the daemon recovers it`, async () => {
    cluster = await startCluster({ version: versions.at(-1)!, tls: true, members: 1, quotaBytes: QUOTA });
    const m = cluster.members[0]!;
    const r = await runCli(['once', '--force', '--config', writeConfig(cluster, m)], { timeoutMs: 60_000 });
    assert.equal(r.code, 75, r.stdout + r.stderr);
    assert.match(r.stdout + r.stderr, /only voting member: defragmenting it stops every read and write .* policy\.singleMember: true/);
    assert.equal((await defragEvents(m)).length, 0);
    // A configured quota that disagrees with the member's: status names both numbers.
    const st = await runCli(['status', '--config', writeConfig(cluster, m, { policy: { quotaBytes: '2GiB' } }, 'quota.yaml')], {
      timeoutMs: 30_000,
    });
    assert.equal(st.code, 0, st.stderr);
    assert.match(
      st.stdout,
      /warning: policy\.quotaBytes is 2\.00GiB \(2147483648 bytes\) but member m0 .* runs with --quota-backend-bytes 64\.0MiB \(67108864 bytes\)/,
    );
    assert.match(st.stdout, /2\.00GiB \(config\)\s+0\.0%\s+no\s/, 'the QUOTA and DEFRAGMENTING columns');
    // The daemon runs before the incident, as it does on a node (one started during the alarm
    // cannot join the turn without a spare that a running daemon kept: see Known limits).
    const d = spawnCli(['run', '--config', writeMinimalConfig(cluster, m)]);
    try {
      await d.waitForJson<LogLine>((l) => l.event === 'turn.register', 60_000);
      const written = await historyUntilNoSpace(cluster, { maxPuts: 8000 });
      await waitWritable(cluster, 120_000).catch((err: Error) => {
        throw new Error(`${err.message}\n${d.output()}`);
      });
      await assertLiveDataIntact(cluster, written);
      assert.equal((await defragEvents(m)).length, 1);
    } finally {
      await stopAll([d]);
    }
  });
});

describe('a holder killed in the middle of a real defragment', () => {
  let cluster: Cluster | undefined;
  after(async () => {
    await cluster?.stop();
  });
  const version = versions[0]!; // 3.4 defragments slowest: the defrag outlasts the lease by more
  it(`etcd ${version}: nobody else defragments until etcd says the first defragment ended`, async (t) => {
    cluster = await startCluster({ version, tls: true });
    // The defragment must outlast the dead holder's lease (2 s) with room to spare. Its time
    // follows the live data: 192 MiB took 1.5-2 s on a quiet machine (CI once ended it 1.9 s after
    // the kill, which proves nothing); 768 MiB took about 6 s with the machine busy.
    await fill(cluster, { inUseBytes: 768 * MiB, reclaimableBytes: 128 * MiB, prefix: 'big/' });
    const leaseTTL = 2000;
    const daemons = cluster.members.map((m) =>
      spawnCli([
        'run',
        '--config',
        writeConfig(cluster!, m, {
          schedule: { cron: '0 0 1 1 *', runOnStart: true },
          coordination: { leaseTTL: `${leaseTTL}ms`, settle: '500ms', maxWait: '3m' },
          policy: { minFragmentation: 0.05 },
        }),
      ]),
    );
    try {
      const first = await Promise.race(
        daemons.map((d, i) => d.waitForJson<LogLine>((l) => l.event === 'defrag.start', 120_000).then(() => i)),
      );
      const member = cluster.members[first]!;
      // The daemon logs before it sends: kill it once etcd itself has logged the start.
      for (let i = 0; i < 1000 && !(await defragEvents(member)).some((e) => !e.end); i++) await new Promise((r) => setTimeout(r, 5));
      await daemons[first]!.kill('SIGKILL');
      const killedAt = Date.now();
      assert.ok((await defragEvents(member)).length > 0, `etcd on ${member.name} never started the defragment`);
      // While the dead holder's defragment runs on, status shows it, from etcd's own gauge.
      const st = await runCli(['status', '--json', '--config', writeConfig(cluster, cluster.members[(first + 1) % 3]!)], {
        timeoutMs: 30_000,
      });
      const json = JSON.parse(st.stdout) as {
        members: { id: string; defragmenting: boolean | null; quota: { source: string; bytes: number } }[];
      };
      const busy = json.members.find((x) => x.id === member.id)!;
      const stillRunning = (await defragEvents(member)).some((e) => !e.end);
      if (stillRunning) assert.equal(busy.defragmenting, true, st.stdout);
      for (const x of json.members) assert.equal(x.quota.source, 'metrics');
      const others = daemons.filter((_, i) => i !== first);
      const results = await Promise.all(
        others.map((d) =>
          d.waitForJson<LogLine>((l) => l.event === 'run.done' || l.event === 'run.skip' || l.event === 'run.fail', 180_000),
        ),
      );
      // A survivor may lose its 2 s lease on a loaded machine and skip before defragmenting (safe,
      // check turn); at least one must go through, after the first defragment ended.
      for (const r of results) assert.ok(r.event === 'run.done' || (r.event === 'run.skip' && r.check === 'turn'), JSON.stringify(r));
      assert.ok(
        results.some((r) => r.event === 'run.done'),
        `no survivor defragmented: ${JSON.stringify(results)}`,
      );
      const events = (await allDefragEvents(cluster)).sort((a, b) => a.start.getTime() - b.start.getTime());
      const killed = events.find((e) => e.member === member.name)!;
      assert.ok(killed.end, 'the first defragment finished inside etcd');
      const ranMs = killed.end.getTime() - killedAt;
      t.diagnostic(`the first defragment ran ${ranMs} ms after its daemon was killed (lease TTL ${leaseTTL} ms)`);
      assert.ok(
        ranMs > leaseTTL,
        `inconclusive: the defragment ended ${ranMs} ms after the kill, within the lease TTL; the test needs a larger db`,
      );
      assert.equal(events.length, 1 + results.filter((r) => r.event === 'run.done').length, JSON.stringify(events));
      for (const e of events.filter((x) => x !== killed))
        assert.ok(
          e.start >= killed.end,
          `${e.member} started at ${e.start.toISOString()}, before ${member.name}'s defragment ended at ${killed.end.toISOString()}`,
        );
      assertNoOverlap(events);
      assert.ok(
        allLines(others).some((l) => l.event === 'turn.wait' && /etcd_disk_defrag_inflight is 1/.test(String(l.reason))),
        "the next holder waited on etcd's gauge",
      );
    } finally {
      await stopAll(daemons);
    }
  });
});
