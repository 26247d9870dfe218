import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import {
  CompactionWatch,
  earlyRun,
  forecast,
  parseTrendRecord,
  SampleLog,
  theilSen,
  trendRecord,
  type MemberSample,
} from '../../src/trend.ts';

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;
const minute = 60_000;

/** Samples every `everyMs` over `spanMs`, from a function of the time. */
function series(spanMs: number, everyMs: number, at: (t: number) => Omit<MemberSample, 'at'>): MemberSample[] {
  const out: MemberSample[] = [];
  for (let t = 0; t <= spanMs; t += everyMs) out.push({ at: t, ...at(t) });
  return out;
}

describe('theilSen', () => {
  it('is the median pairwise slope: one wild point does not move it', () => {
    const pts = [0, 1, 2, 3, 4, 5, 6].map((x) => ({ x, y: 2 * x }));
    pts[3] = { x: 3, y: 1000 };
    assert.equal(theilSen(pts), 2);
  });
  it('counts only the pairs a segment rule accepts', () => {
    const pts = [
      { x: 0, y: 0 },
      { x: 1, y: 1 },
      { x: 2, y: -10 },
      { x: 3, y: -9 },
    ];
    assert.equal(
      theilSen(pts, (i, j) => i < 2 === j < 2),
      1,
    );
    assert.equal(theilSen([{ x: 1, y: 1 }]), undefined);
  });
});

describe('forecast', () => {
  it('steady growth with nothing compacting: the time to the quota', () => {
    // 1 MiB a minute from 100 MiB, no defragment, no compaction; quota 2 GiB
    const s = series(60 * minute, minute, (t) => ({
      dbSize: 100 * MiB + (t / minute) * MiB,
      inUse: 90 * MiB + (t / minute) * MiB,
      compactRevision: 5,
    }));
    const f = forecast(s, 2 * GiB, 60 * minute, 30 * minute)!;
    assert.equal(f.basis, 'file');
    // file: 160 MiB now, 1888 MiB to go at 1 MiB/min
    assert.ok(Math.abs(f.seconds! - 1888 * 60) < 1, `${f.seconds}`);
    assert.ok(Math.abs(f.inUse.seconds! - 1898 * 60) < 1);
  });

  it('nothing until the samples span forecast.minSpan; nothing while nothing grows', () => {
    const growing = series(10 * minute, minute, (t) => ({ dbSize: 100 * MiB + t, inUse: 50 * MiB + t }));
    assert.equal(forecast(growing, 2 * GiB, 10 * minute, 30 * minute), undefined);
    const flat = series(60 * minute, minute, () => ({ dbSize: 100 * MiB, inUse: 50 * MiB, compactRevision: 1 }));
    const f = forecast(flat, 2 * GiB, 60 * minute, 30 * minute)!;
    assert.equal(f.seconds, undefined);
    assert.equal(f.basis, undefined);
  });

  it('a defragment in the window is not a shrinking trend: the file grows between defragments', () => {
    // file grows 2 MiB/min, defragmented at 30 min from 400 MiB back to 200 MiB
    const s = series(60 * minute, minute, (t) => {
      const m = t / minute;
      return { dbSize: m < 30 ? 340 * MiB + 2 * m * MiB : 200 * MiB + 2 * (m - 30) * MiB, inUse: 150 * MiB, compactRevision: 1 };
    });
    const f = forecast(s, 2 * GiB, 60 * minute, 30 * minute)!;
    assert.equal(f.basis, 'file');
    assert.ok(Math.abs(f.file.bytesPerSecond - (2 * MiB) / 60) < 1, `${f.file.bytesPerSecond}`);
  });

  it('regular compactions: the lows carry the lasting growth, not the history between compactions', () => {
    // live data +0.5 MiB/min; history +5 MiB/min, compacted every 5 min (the API server's rhythm)
    const s = series(120 * minute, minute, (t) => {
      const m = t / minute;
      return { dbSize: 1 * GiB, inUse: 200 * MiB + 0.5 * m * MiB + 5 * (m % 5) * MiB, compactRevision: Math.floor(m / 5) };
    });
    const f = forecast(s, 2 * GiB, 120 * minute, 30 * minute)!;
    assert.ok(Math.abs(f.inUse.bytesPerSecond - (0.5 * MiB) / 60) < 2, `${f.inUse.bytesPerSecond}`);
    // the quota is met when a high (a low plus 20 MiB of history) gets there
    const low = 200 + 0.5 * 120;
    const expected = ((2048 - low - 20) * 60) / 0.5;
    assert.ok(Math.abs(f.inUse.seconds! - expected) / expected < 0.02, `${f.inUse.seconds} vs ${expected}`);
  });

  it('one compaction: growth is measured on either side of it, never across', () => {
    // 1 MiB/min; a first compaction at 40 min frees 300 MiB
    const s = series(60 * minute, minute, (t) => {
      const m = t / minute;
      return { dbSize: 1 * GiB, inUse: 500 * MiB + m * MiB - (m >= 40 ? 300 * MiB : 0), compactRevision: m >= 40 ? 9 : 1 };
    });
    const f = forecast(s, 2 * GiB, 60 * minute, 30 * minute)!;
    assert.ok(Math.abs(f.inUse.bytesPerSecond - MiB / 60) < 1, `${f.inUse.bytesPerSecond}`);
  });
});

describe('SampleLog', () => {
  it('keeps the window, thins quiet samples, always keeps a step, forgets on a restore', () => {
    const log = new SampleLog(240 * 1000); // one sample a second at most
    for (let t = 0; t < 600_000; t += 250) log.record({ at: t, dbSize: 10, inUse: 5, compactRevision: 1, currentRevision: 100 + t });
    const all = log.all();
    assert.ok(all.length <= 242 && all.length >= 238, `${all.length}`);
    assert.ok(all[0]!.at >= all.at(-1)!.at - 240_000, `${all[0]!.at}`);
    log.record({ at: 599_100, dbSize: 5, inUse: 5, compactRevision: 1, currentRevision: 700_000 }); // a defragment, 100 ms later
    assert.deepEqual(
      log
        .all()
        .slice(-2)
        .map((s) => s.dbSize),
      [10, 5],
    );
    log.record({ at: 601_000, dbSize: 5, inUse: 5, compactRevision: 1, currentRevision: 3 });
    assert.equal(log.all().length, 1);
  });
});

describe('CompactionWatch', () => {
  it('ages the compacted revision on its own clock, stale only while revisions grow', () => {
    const w = new CompactionWatch(60_000);
    assert.equal(w.observe({ at: 0, dbSize: 1, inUse: 1 }), undefined);
    assert.deepEqual(w.observe({ at: 0, dbSize: 1, inUse: 1, compactRevision: 10, currentRevision: 50 }), {
      historyRevisions: 40,
      ageMs: 0,
      grownRevisions: 0,
      stale: false,
    });
    assert.equal(w.observe({ at: 61_000, dbSize: 1, inUse: 1, compactRevision: 10, currentRevision: 50 })!.stale, false); // idle
    const s = w.observe({ at: 62_000, dbSize: 1, inUse: 1, compactRevision: 10, currentRevision: 90 })!;
    assert.equal(s.stale, true);
    assert.equal(s.historyRevisions, 80);
    assert.equal(w.observe({ at: 63_000, dbSize: 1, inUse: 1, compactRevision: 80, currentRevision: 95 })!.ageMs, 0);
  });
});

describe('trend record', () => {
  it('round-trips, and anything else reads as none', () => {
    const r = trendRecord(5, undefined, { historyRevisions: 3, ageMs: 2500, grownRevisions: 1, stale: false });
    assert.deepEqual(parseTrendRecord(JSON.stringify(r)), r);
    assert.equal(parseTrendRecord('nope'), undefined);
    assert.equal(parseTrendRecord('{"at":1,"forecast":{"seconds":"soon"},"compaction":null}'), undefined);
    assert.equal(parseTrendRecord('null'), undefined);
  });
});

describe('earlyRun', () => {
  const c = {
    forecast: { window: 6 * 3_600_000, minSpan: 3_600_000, warnBefore: 86_400_000, defragBefore: 6 * 3_600_000 },
    compaction: { staleAfter: 2 * 3_600_000, fallback: true, keepHistory: 3_600_000 },
    policy: { minReclaimable: 64 * MiB } as never,
  };
  const never = { forecast: -Infinity, compaction: -Infinity };
  const sample = { at: 0, dbSize: 900 * MiB, inUse: 500 * MiB, compactRevision: 7, currentRevision: 900 };
  const soon = (fileSeconds: number | undefined): Parameters<typeof earlyRun>[3] => ({
    seconds: fileSeconds,
    basis: 'file',
    file: { seconds: fileSeconds, bytesPerSecond: 1000 },
    inUse: { bytesPerSecond: 0 },
    quotaBytes: GiB,
    spanSeconds: 7200,
  });
  const stale = { historyRevisions: 800, ageMs: 3 * 3_600_000, grownRevisions: 500, stale: true };

  it('defragments early when the file reaches the quota within defragBefore and enough can be reclaimed', () => {
    assert.match(earlyRun(c, 0, sample, soon(3600), undefined, never).forecast ?? '', /forecast to reach the quota in 1h/);
    assert.equal(earlyRun(c, 0, sample, soon(7 * 3600), undefined, never).forecast, undefined, 'later than defragBefore');
    assert.equal(earlyRun(c, 0, { ...sample, inUse: 880 * MiB }, soon(3600), undefined, never).forecast, undefined, 'little to reclaim');
    assert.equal(earlyRun(c, 0, sample, soon(undefined), undefined, never).forecast, undefined, 'not growing');
    assert.equal(earlyRun(c, 1000, sample, soon(3600), undefined, { ...never, forecast: 0 }).forecast, undefined, 'asked for a second ago');
    assert.equal(
      earlyRun({ ...c, forecast: { ...c.forecast, defragBefore: 0 } }, 0, sample, soon(60), undefined, never).forecast,
      undefined,
    );
  });

  it('compacts as a fallback when the watch says stale, unless compaction.fallback is false', () => {
    const early = earlyRun(c, 0, sample, undefined, stale, never).compaction;
    assert.equal(early?.compactRevision, 7);
    assert.match(early?.reason ?? '', /^nothing compacted the history for 3h0m$/);
    assert.equal(earlyRun(c, 0, sample, undefined, { ...stale, stale: false }, never).compaction, undefined);
    assert.equal(
      earlyRun({ ...c, compaction: { ...c.compaction, fallback: false } }, 0, sample, undefined, stale, never).compaction,
      undefined,
    );
    assert.equal(
      earlyRun(c, 3_600_000, sample, undefined, stale, { ...never, compaction: 0 }).compaction,
      undefined,
      'once per staleAfter',
    );
  });
});
