// The benchmark's timeline: binning of successful writes and the rendered SVG (bench/timeline.ts).
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import type { Disruption } from '../../bench/disruption.ts';
import { renderSvg, timeline, timelineSpec } from '../../bench/timeline.ts';

const T = 1_700_000_000_000;

function disruption(): Disruption {
  const requests = [];
  // 20 writes/s, each answered 5 ms later, except those sent while m0 defragments (1 s to 3 s): failed.
  for (let i = 0; i < 200; i++) {
    const t0 = T - 5000 + i * 50;
    const blocked = t0 >= T + 1000 && t0 < T + 3000;
    requests.push({ seq: i, t0, t1: t0 + (blocked ? 2000 : 5), ok: !blocked, member: 'm0' });
  }
  return {
    id: 'b',
    title: '(b) `etcdctl` at once',
    members: ['m0', 'm1', 'm2'],
    triggerAt: T,
    endAt: T + 3500,
    load: { requests },
    defrags: [
      { member: 'm0', start: new Date(T + 1000), end: new Date(T + 3000) },
      { member: 'm1', start: new Date(T + 1200), end: new Date(T + 3500) },
    ],
  } as unknown as Disruption;
}

describe('benchmark timeline', () => {
  it('counts successful writes per 100 ms by answer time, from the pre-roll to the tail', () => {
    const tl = timeline(disruption(), 5000, 1000);
    assert.equal(tl.writes[0]!.t, -5);
    assert.equal(tl.writes.length, 95); // 5 s + 3.5 s + 1 s
    assert.equal(tl.writes.find((w) => w.t === 0)!.n, 2);
    assert.equal(tl.writes.find((w) => w.t === 2)!.n, 0, 'nothing succeeds while blocked');
    assert.equal(
      tl.writes.reduce((s, w) => s + w.n, 0),
      200 - 40 - 10,
      'the failed ones and those after the tail are not counted',
    );
    assert.deepEqual(tl.defrags, [
      { member: 'm0', start: 1, end: 3, failed: false },
      { member: 'm1', start: 1.2, end: 3.5, failed: false },
    ]);
    assert.equal(tl.title, '(b) etcdctl at once');
  });

  it('renders an SVG with the title, both charts and a band per defragment', async () => {
    const svg = await renderSvg(timelineSpec('etcd 3.5.30: writes', [timeline(disruption(), 5000, 1000)]));
    assert.match(svg, /^<svg /);
    for (const text of ['etcd 3.5.30: writes', '(b) etcdctl at once', 'writes / 100 ms', 'defrag', 'seconds from the trigger'])
      assert.ok(svg.includes(`>${text}</text>`), text);
    assert.equal((svg.match(/aria-roledescription="bar"/g) ?? []).length, 2, 'one band per defragment');
  });
});
