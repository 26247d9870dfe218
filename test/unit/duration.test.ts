import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { DefragDurations, KEEP_SAMPLES, MIN_SAMPLE_BYTES } from '../../src/duration.ts';
import { Metrics } from '../../src/metrics.ts';

const MiB = 1024 * 1024;
/** A /metrics page: the histogram's count and sum, and the in-use size. */
const page = (count: number, seconds: number, inUse = 100 * MiB) => ({ defragCount: count, defragSeconds: seconds, dbSizeInUse: inUse });

describe('DefragDurations', () => {
  it('knows nothing until it has seen a defragment', () => {
    const d = new DefragDurations();
    assert.equal(d.predict(100 * MiB), undefined);
    d.observePage(0, page(0, 0));
    d.observePage(10_000, page(0, 0));
    assert.equal(d.predict(100 * MiB), undefined);
  });

  it("learns from the growth of etcd's defrag histogram between two pages, at the in-use size of the page before", () => {
    const d = new DefragDurations();
    d.observePage(0, page(3, 12, 200 * MiB)); // three defragments before the daemon started: no sizes for them
    assert.equal(d.predict(200 * MiB), undefined);
    d.observePage(10_000, page(5, 12 + 8, 200 * MiB)); // two more, 4s each, 200MiB in use before: 50MiB/s
    d.observePage(20_000, page(5, 20, 120 * MiB)); // no defragment: nothing new
    const p = d.predict(400 * MiB)!;
    assert.equal(p.seconds, 8);
    assert.match(p.basis, /400MiB in use at 50\.0MiB\/s/);
    assert.match(p.basis, /last 1 defragment of this member \(1 timed by etcd\)/);
  });

  it('ignores a page without the histogram, and defragments of less than MIN_SAMPLE_BYTES', () => {
    const d = new DefragDurations();
    d.observePage(0, page(0, 0, MIN_SAMPLE_BYTES - 1));
    d.observePage(10_000, {});
    d.observePage(20_000, page(1, 0.5, MIN_SAMPLE_BYTES - 1)); // fixed costs dominate: not learned
    assert.equal(d.predict(1024 * MiB), undefined);
    d.observeRun(30_000, 4 * MiB, 400);
    assert.equal(d.predict(1024 * MiB), undefined);
    d.observePage(40_000, page(2, 1.5, MIN_SAMPLE_BYTES)); // the run above, seen by etcd: still tiny
    d.observePage(50_000, page(3, 1.5 + 2, 64 * MiB));
    assert.equal(d.predict(32 * MiB)?.seconds, 4, 'exactly MIN_SAMPLE_BYTES (16MiB) in 2s: 8MiB/s');
  });

  it("learns from our own runs, and prefers etcd's timing of the same defragment when the page shows it", () => {
    const d = new DefragDurations();
    d.observePage(0, page(0, 0, 100 * MiB));
    d.observeRun(20_000, 100 * MiB, 10_000); // with the catch-up: 10MiB/s
    assert.equal(d.predict(100 * MiB)?.seconds, 10);
    assert.match(d.predict(100 * MiB)!.basis, /\(1 by etcd-defragd\)/);
    d.observePage(30_000, page(1, 5, 100 * MiB)); // etcd says 5s: 20MiB/s, and replaces the run's figure
    assert.equal(d.predict(100 * MiB)?.seconds, 5);
    assert.match(d.predict(100 * MiB)!.basis, /last 1 defragment of this member \(1 timed by etcd\)/);
  });

  it('does not count a run twice when the page showed its defragment before the run ended (the catch-up)', () => {
    const d = new DefragDurations();
    d.observePage(0, page(0, 0, 100 * MiB));
    d.observePage(10_000, page(1, 5, 100 * MiB));
    d.observeRun(12_000, 100 * MiB, 9000);
    assert.equal(d.predict(100 * MiB)?.seconds, 5);
    assert.match(d.predict(100 * MiB)!.basis, /last 1 defragment/);
  });

  it('predicts at the slowest quarter of the last KEEP_SAMPLES rates', () => {
    const d = new DefragDurations();
    let count = 0;
    let sum = 0;
    d.observePage(0, page(count, sum));
    // 100MiB each, at 10, 20, ..., 100 MiB/s: the first two fall out of the last KEEP_SAMPLES (8)
    for (let i = 1; i <= 10; i++) {
      count++;
      sum += 10 / i;
      d.observePage(i * 10_000, page(count, sum));
    }
    assert.equal(KEEP_SAMPLES, 8);
    // kept: 30..100 MiB/s; index floor(7/4) = 1 of them sorted: 40MiB/s
    assert.ok(Math.abs(d.predict(400 * MiB)!.seconds - 10) < 1e-9, String(d.predict(400 * MiB)!.seconds));

    const few = new DefragDurations();
    few.observePage(0, page(0, 0));
    few.observePage(10_000, page(1, 1)); // 100MiB/s
    few.observePage(20_000, page(2, 1 + 10)); // 10MiB/s
    few.observePage(30_000, page(3, 11 + 2)); // 50MiB/s
    assert.equal(few.predict(100 * MiB)?.seconds, 10, 'up to four rates: the slowest');
  });

  it('learns again from scratch when etcd restarted (its histogram count went down)', () => {
    const d = new DefragDurations();
    d.observePage(0, page(4, 40));
    d.observePage(10_000, page(5, 50)); // 100MiB in 10s
    d.observeRun(30_000, 100 * MiB, 20_000);
    assert.ok(d.predict(100 * MiB));
    d.observePage(40_000, page(0, 0)); // restarted: perhaps another etcd version or another disk
    assert.equal(d.predict(100 * MiB), undefined);
    d.observePage(50_000, page(1, 2)); // the new baseline counts: 100MiB in 2s
    assert.equal(d.predict(100 * MiB)?.seconds, 2);
  });
});

describe('etcd_defragd_defrag_predicted_seconds', () => {
  const series = async (m: Metrics) =>
    (await m.own.metrics()).split('\n').filter((l) => l.startsWith('etcd_defragd_defrag_predicted_seconds{'));

  it('is absent while unknown, one series for the member, and gone with the member', async () => {
    const m = new Metrics();
    const member = { hex: '8e9e05c52164694d', name: 'm1' };
    m.recordPredictedDefrag(member, undefined);
    assert.deepEqual(await series(m), []);
    m.recordPredictedDefrag(member, 12.3456);
    assert.deepEqual(await series(m), ['etcd_defragd_defrag_predicted_seconds{member="8e9e05c52164694d",name="m1"} 12.346']);
    m.recordPredictedDefrag({ ...member, name: 'renamed' }, 3);
    assert.deepEqual(await series(m), ['etcd_defragd_defrag_predicted_seconds{member="8e9e05c52164694d",name="renamed"} 3']);
    m.recordView({ local: { hex: member.hex } } as never);
    m.forgetMember();
    assert.deepEqual(await series(m), []);
  });
});
