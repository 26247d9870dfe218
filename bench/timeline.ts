// The benchmark draws what it measures: per scenario, the successful writes per 100 ms, and each
// member's defragment from etcd's own log as a band in its lane. Rendered to SVG with Vega-Lite in
// Node (vega's headless renderer: no browser, no canvas), next to the Markdown tables.
import { writeFileSync } from 'node:fs';
import * as vega from 'vega';
import { compile, type TopLevelSpec } from 'vega-lite';
import type { VersionResults } from './report.ts';
import type { Disruption, DisruptionId } from './disruption.ts';

export const BIN_MS = 100;

export interface Timeline {
  id: DisruptionId;
  title: string;
  /** Seconds from the trigger (start of the bin) -> successful writes answered in that bin. */
  writes: { t: number; n: number }[];
  /** Each member's defragment per etcd's log, seconds from the trigger. */
  defrags: { member: string; start: number; end: number; failed: boolean }[];
  members: string[];
}

/** The measured data of one scenario, binned; also saved as JSON so the figure can be redrawn. */
export function timeline(d: Disruption, preRollMs: number, tailMs: number): Timeline {
  const from = d.triggerAt - preRollMs;
  const to = d.endAt + tailMs;
  const bins = new Array<number>(Math.max(1, Math.ceil((to - from) / BIN_MS))).fill(0);
  for (const r of d.load.requests) {
    if (!r.ok || r.t1 < from || r.t1 >= to) continue;
    bins[Math.floor((r.t1 - from) / BIN_MS)]!++;
  }
  const sec = (t: number) => Number(((t - d.triggerAt) / 1000).toFixed(3));
  return {
    id: d.id,
    title: d.title.replace(/`/g, ''),
    writes: bins.map((n, i) => ({ t: sec(from + i * BIN_MS), n })),
    defrags: d.defrags.map((e) => ({
      member: e.member,
      start: sec(e.start.getTime()),
      end: sec((e.end ?? new Date(to)).getTime()),
      failed: Boolean(e.error),
    })),
    members: d.members,
  };
}

export function timelineSpec(title: string, tls: Timeline[]): TopLevelSpec {
  const lo = Math.min(...tls.map((t) => t.writes[0]?.t ?? 0));
  const hi = Math.max(...tls.map((t) => (t.writes.at(-1)?.t ?? 0) + BIN_MS / 1000));
  const x = { type: 'quantitative' as const, scale: { domain: [lo, hi], nice: false }, title: 'seconds from the trigger' };
  const ymax = Math.max(1, ...tls.flatMap((t) => t.writes.map((w) => w.n)));
  return {
    $schema: 'https://vega.github.io/schema/vega-lite/v6.json',
    title: { text: title, anchor: 'start' },
    config: { font: 'sans-serif', view: { stroke: null }, axis: { labelFontSize: 10, titleFontSize: 10 } },
    vconcat: tls.map((t) => ({
      title: { text: t.title, anchor: 'start', fontSize: 12 },
      spacing: 4,
      vconcat: [
        {
          width: 680,
          height: 80,
          data: { values: t.writes },
          mark: { type: 'area', interpolate: 'step-after', color: '#4c78a8', line: true },
          encoding: {
            x: { field: 't', ...x, title: null },
            y: { field: 'n', type: 'quantitative', title: `writes / ${BIN_MS} ms`, scale: { domain: [0, ymax] } },
          },
        },
        {
          width: 680,
          height: 16 * t.members.length,
          data: { values: t.defrags },
          mark: { type: 'bar', opacity: 0.8 },
          encoding: {
            x: { field: 'start', ...x },
            x2: { field: 'end' },
            y: { field: 'member', type: 'nominal', title: 'defrag', scale: { domain: t.members } },
            color: { field: 'member', type: 'nominal', scale: { domain: t.members }, legend: null },
            tooltip: [{ field: 'member' }, { field: 'start' }, { field: 'end' }],
          },
        },
      ],
    })),
  };
}

export async function renderSvg(spec: TopLevelSpec): Promise<string> {
  const view = new vega.View(vega.parse(compile(spec).spec), { renderer: 'none' });
  try {
    return await view.toSVG();
  } finally {
    view.finalize();
  }
}

/** Writes <base>.svg and <base>.json for the disruption scenarios of one etcd version; returns the SVG path. */
export async function writeTimelines(r: VersionResults, preRollMs: number, tailMs: number, base: string): Promise<string | undefined> {
  const order: DisruptionId[] = ['a', 'b', 'c'];
  const tls = order.flatMap((id) => (r.disruptions[id] ? [timeline(r.disruptions[id], preRollMs, tailMs)] : []));
  if (tls.length === 0) return undefined;
  const title = `etcd ${r.fullVersion ?? r.version}: successful writes per ${BIN_MS} ms; bands: each member's defragment (etcd's log)`;
  writeFileSync(`${base}.json`, `${JSON.stringify({ title, timelines: tls })}\n`);
  writeFileSync(`${base}.svg`, await renderSvg(timelineSpec(title, tls)));
  return `${base}.svg`;
}
