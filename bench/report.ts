// Markdown tables of the benchmark.
import { cpus, freemem, loadavg, release, totalmem, availableParallelism } from 'node:os';
import { formatBytes } from '../src/units.ts';
import type { BenchOptions } from './options.ts';
import type { Disruption, DisruptionId } from './disruption.ts';
import type { IdleResult } from './idle.ts';
import type { NoSpaceRun } from './nospace.ts';
import type { UsageRun } from './usage.ts';

export interface VersionResults {
  version: string;
  fullVersion?: string;
  disruptions: Partial<Record<DisruptionId, Disruption>>;
  nospace: NoSpaceRun[];
  /** The first as the systemd unit starts the daemon; then plain node for reference. */
  idle: IdleResult[];
  /** (u) the cost of `etcd-defragd usage`. */
  usage?: UsageRun;
  errors: string[];
  elapsedMs: number;
}

// Issue 19's targets: the packaged executable at idle, and hand-overs between members.
const IDLE_RSS_TARGET = 56 * 1024 * 1024;
const IDLE_PRIVATE_TARGET = 16 * 1024 * 1024;
const IDLE_CPU_TARGET = 0.003;
const HANDOVER_TARGET_QUICK_MS = 500;
const HANDOVER_TARGET_1GIB_MS = 1500;

function median(xs: number[]): number {
  const sorted = [...xs].sort((a, b) => a - b);
  const mid = sorted.length >> 1;
  return sorted.length % 2 ? sorted[mid]! : (sorted[mid - 1]! + sorted[mid]!) / 2;
}
const NOSPACE_TARGET_MS = 60_000;

export function machineInfo(): string[] {
  const cpu = cpus()[0]?.model ?? 'unknown CPU';
  return [
    `CPU: ${cpu}, ${availableParallelism()} cores (nproc)`,
    `memory: ${formatBytes(totalmem())} (${formatBytes(freemem())} free at the start)`,
    `kernel: Linux ${release()}; Node ${process.version}`,
    `load average at the start: ${loadavg()
      .map((l) => l.toFixed(2))
      .join(' ')} (the machine is shared; other jobs ran at the same time)`,
  ];
}

const s = (ms: number): string => (Number.isNaN(ms) ? 'n/a' : ms >= 10_000 ? `${(ms / 1000).toFixed(1)} s` : `${(ms / 1000).toFixed(2)} s`);
const msText = (ms: number): string => (Number.isNaN(ms) ? 'n/a' : ms >= 100 ? `${Math.round(ms)} ms` : `${ms.toFixed(1)} ms`);
const pct = (x: number): string => `${(x * 100).toFixed(1)}%`;

function ratio(x: number, base: number | undefined): string {
  if (base === undefined || Number.isNaN(x) || Number.isNaN(base)) return 'n/a';
  if (base === 0) return x === 0 ? '1.00x' : 'n/a (0 in (a))';
  return `${(x / base).toFixed(2)}x`;
}

function table(header: string[], rows: string[][]): string {
  const esc = (c: string): string => c.replace(/\|/g, '\\|').replace(/\n/g, ' ');
  return [
    `| ${header.map(esc).join(' | ')} |`,
    `|${header.map(() => '---').join('|')}|`,
    ...rows.map((r) => `| ${r.map(esc).join(' | ')} |`),
  ].join('\n');
}

function rel(at: number, base: number): string {
  const d = (at - base) / 1000;
  return `${d >= 0 ? '+' : ''}${d.toFixed(1)}`;
}

function failedText(d: Disruption): string {
  return `${d.writesFailed} (${pct(d.windowSent ? d.windowFailed / d.windowSent : 0)} of ${d.windowSent} sent in the window)`;
}

export function header(opts: BenchOptions, startedAt: Date, versions: string, source: string): string {
  const mode = opts.quick ? 'quick' : 'full';
  return [
    `# etcd-defragd benchmark (${mode} run)`,
    '',
    `- command: \`${opts.command}\``,
    `- date: ${startedAt.toISOString()}`,
    ...machineInfo().map((l) => `- ${l}`),
    `- etcd-defragd: ${source}, compiled once at the start with tsconfig.build.json; every daemon of the run is that build`,
    `- etcd: ${versions}; 3 members on loopback, client mTLS, \`--snapshot-count 5000\`; a fresh cluster for every scenario, filled to the same state`,
    `- data: ${formatBytes(opts.inUseBytes)} in use + ${formatBytes(opts.reclaimBytes)} reclaimable (64 KiB values, free pages scattered between live ones)`,
    `- load: ${opts.ratePerSec} puts/s (128 B values) round-robin over the 3 members, one client per member, ${opts.deadlineMs / 1000} s deadline, no client retries; ` +
      `read probe ${opts.probeRatePerSec}/s per member (serializable range); ${opts.preRollMs / 1000} s of load before the trigger, ${opts.tailMs / 1000} s after the maintenance ended`,
    '',
    "Definitions: *maintenance window* = trigger to the end of the last member's defrag (etcd's own log); " +
      '*writes failed* = failed puts over the whole measured run, with their share of the puts sent in the window; ' +
      '*longest write gap* = longest time without any successful put; *p50/p99* = time until the answer of the puts sent in the window, a failed put counting with its time to failure (at most the deadline); ' +
      '*longest blocked* = longest time a member did not answer the read probe. Ratios are against (a) of the same etcd version in the same run.',
    '',
  ].join('\n');
}

function disruptionSummary(r: VersionResults): string {
  const order: DisruptionId[] = ['a', 'b', 'c'];
  const rows: string[][] = [];
  const a = r.disruptions.a;
  for (const id of order) {
    const d = r.disruptions[id];
    if (!d) continue;
    const blocked = d.members.map((m) => s(d.blockedMs[m] ?? NaN)).join(' / ');
    rows.push([
      d.title,
      `${s(d.windowMs)}${a ? `, ${ratio(d.windowMs, a.windowMs)}` : ''}`,
      `${d.writesFailed} (${pct(d.windowSent ? d.windowFailed / d.windowSent : 0)})${a ? `, ${ratio(d.writesFailed, a.writesFailed)}` : ''}`,
      `${s(d.gapMs)}${a ? `, ${ratio(d.gapMs, a.gapMs)}` : ''}`,
      `${msText(d.p50Ms)} / ${msText(d.p99Ms)}`,
      blocked,
    ]);
  }
  if (!rows.length) return '';
  const names = Object.values(r.disruptions)[0]!.members.join(' / ');
  return table(
    ['scenario', 'maintenance window', 'writes failed', 'longest write gap', 'write p50 / p99', `longest blocked ${names}`],
    rows,
  );
}

function disruptionDetail(d: Disruption, a: Disruption | undefined): string {
  const base = d.id === 'a' ? d : a;
  const rows: string[][] = [
    ["maintenance window (trigger to the last defrag's end)", s(d.windowMs), ratio(d.windowMs, base?.windowMs)],
    ['writes failed', failedText(d), ratio(d.writesFailed, base?.writesFailed)],
    ['longest gap between successful writes', s(d.gapMs), ratio(d.gapMs, base?.gapMs)],
    ['write latency p50', msText(d.p50Ms), ratio(d.p50Ms, base?.p50Ms)],
    ['write latency p99', msText(d.p99Ms), ratio(d.p99Ms, base?.p99Ms)],
    ...d.members.map((m) => [
      `longest blocked, ${m}${m === d.leaderBefore ? ' (leader before the trigger)' : ''}`,
      s(d.blockedMs[m] ?? NaN),
      ratio(d.blockedMs[m] ?? NaN, base?.blockedMs[m]),
    ]),
  ];
  const defrags = d.defrags
    .map(
      (e) =>
        `${e.member} ${rel(e.start.getTime(), d.triggerAt)}..${e.end ? rel(e.end.getTime(), d.triggerAt) : 'unfinished'}${e.error ? ` (failed: ${e.error})` : ''}`,
    )
    .join(', ');
  const errs = [...d.load.errors().entries()].map(([k, n]) => `${n}x ${k}`).join('; ');
  const lines = [
    `### ${d.title}`,
    '',
    table(['figure', 'value', 'ratio to (a)'], rows),
    '',
    `- start state: db ${formatBytes(d.fill.dbSize)}, ${formatBytes(d.fill.inUse)} in use, ${formatBytes(d.fill.reclaimable)} reclaimable (etcd ${d.fullVersion})`,
    `- defrags (etcd log, seconds after the trigger): ${defrags || 'none'}${d.overlapped ? ' - members overlapped' : ' - never two members at once'}`,
    `- longest write gap from ${rel(d.gapFrom, d.triggerAt)} s; ${d.writesSent} puts sent in all${d.load.skipped ? `, ${d.load.skipped} slots skipped by the load generator` : ''}${errs ? `; errors: ${errs}` : ''}`,
    ...d.notes.map((n) => `- ${n}`),
  ];
  if (d.id === 'c' && d.handovers?.length) {
    const total = d.handovers.reduce((a, b) => a + b, 0);
    const defragging = d.windowMs - total;
    lines.push(
      `- hand-overs between members (one member's defrag end to the next one's start, etcd's log: integrity check, coordination.settle ` +
        `${s(d.settleMs ?? NaN)}, the next daemon's checks, leader transfer): ${d.handovers.map((h) => s(h)).join(', ')}; ` +
        `median ${s(median(d.handovers))}, max ${s(Math.max(...d.handovers))}, ${s(total)} in all, ${((100 * total) / d.windowMs).toFixed(0)}% of the window; ` +
        `the other ${s(defragging)} are defrags and the start${base ? ` (${ratio(defragging, base.windowMs)} of (a)'s window)` : ''}`,
    );
  }
  return lines.join('\n');
}

function nospaceSection(runs: NoSpaceRun[]): string {
  if (!runs.length) return '';
  const first = runs[0]!;
  const rows: string[][] = [];
  const cell = (r: NoSpaceRun): string =>
    r.recoveredAt !== undefined ? `**${s(r.recoveredAt - r.alarmAt)}**` : `not recovered: ${r.gaveUp ?? 'unknown'}`;
  rows.push(['first refused write to the first accepted write', ...runs.map(cell)]);
  rows.push(['puts refused or failed meanwhile', ...runs.map((r) => `${r.writesFailed} of ${r.writesSent}`)]);
  rows.push(['alarms armed at the end', ...runs.map((r) => (r.alarmsAtEnd.length ? r.alarmsAtEnd.join(', ') : 'none'))]);
  rows.push(["API server's compaction (Txn with a Put, then Compact) during the alarm", ...runs.map((r) => r.k8sCompactor)]);
  rows.push(['nospace.checkInterval', ...runs.map((r) => (r.variant === 'cron' ? '-' : s(r.checkIntervalMs)))]);
  const out = [
    `### (d) NOSPACE: quota ${formatBytes(first.quotaBytes)}, history churn until etcd refuses writes`,
    '',
    `Each run: a fresh cluster with \`--quota-backend-bytes ${first.quotaBytes}\` (${formatBytes(first.quotaBytes)}), ${formatBytes(first.fill.inUse)} of live data, ` +
      `the same write load, then a few keys overwritten with 64 KiB values as fast as etcd takes them until a put is refused with "database space exceeded" (the alarm). ` +
      'Then the history is compacted at the current revision with a plain Compact RPC (except where noted), and the recovery is timed from the first refused put to the first accepted one.',
    '',
    table(['', ...runs.map((r) => r.title)], rows),
    '',
  ];
  for (const r of runs) {
    out.push(
      `Timeline of "${r.title}" (seconds after the first refused put; ${formatBytes(r.churnWritten)} of churn raised the alarm):`,
      '',
    );
    for (const t of r.timeline) out.push(`- ${rel(t.at, r.alarmAt)}: ${t.what}`);
    const errs = Object.entries(r.errors)
      .map(([k, n]) => `${n}x ${k}`)
      .join('; ');
    if (errs) out.push(`- put errors meanwhile: ${errs}`);
    out.push('');
  }
  return out.join('\n');
}

function idleSection(runs: IdleResult[]): string {
  const first = runs[0]!;
  // The baseline of the ratios: the same source under plain node, measured in the same run.
  const base = runs.find((i) => /^node \S+cli\.js/.test(i.command));
  const x = (v: number, b: number | undefined): string => (b ? `${(v / b).toFixed(2)}x` : '-');
  return [
    '### Idle footprint: the packaged executable against `node dist/cli.js`',
    '',
    'One daemon against a healthy cluster with nothing to do: default config (metrics served on 127.0.0.1:0), schedule not firing, no loader. ' +
      "The executable runs with the unit's environment; the node rows run the same source compiled by tsc (NODE_ENV=production). " +
      'Size: what a node needs on disk to run it. Start: spawn to the first log line. ' +
      `RSS sampled every second from /proc/PID/status, CPU from /proc/PID/stat (utime + stime), over ${s(first.sampleMs)} after the warm-up. ` +
      'RSS counts the pages of the executable (node, or etcd-defragd) read from disk, which the kernel shares and can drop; *private* is the anonymous part (heap, stacks). ' +
      'Ratios are against `node dist/cli.js` of the same run. *Warning lines*: output that is not a log line, which journald stores at warning priority under the unit (`SyslogLevel=warning`).',
    '',
    table(
      ['command', 'size on disk', 'start to first log line', 'RSS', 'CPU', 'warning lines', 'vs node: size / start / RSS max / CPU'],
      runs.map((i) => [
        `\`${i.command}\``,
        `${formatBytes(i.footprint.bytes)} (${i.footprint.what})`,
        `${Math.round(i.firstLineMs)} ms`,
        `${formatBytes(i.rssMaxBytes)} max (${formatBytes(i.rssAnonMaxBytes)} private), ${formatBytes(i.rssMeanBytes)} mean`,
        `${(i.cpuShare * 100).toFixed(2)}% (${Math.round(i.cpuMs)} ms CPU in ${s(i.sampleMs)})`,
        i.strayLines.length ? `${i.strayLines.length}: \`${i.strayLines[0]}\`` : 'none',
        i === base
          ? 'baseline'
          : `${x(i.footprint.bytes, base?.footprint.bytes)} / ${x(i.firstLineMs, base?.firstLineMs)} / ${x(i.rssMaxBytes, base?.rssMaxBytes)} / ${x(i.cpuShare, base?.cpuShare)}`,
      ]),
    ),
  ].join('\n');
}

function targets(r: VersionResults, opts: BenchOptions): string {
  const { a, b, c } = r.disruptions;
  const rows: string[][] = [];
  const verdict = (ok: boolean): string => (ok ? 'met' : '**missed**');
  if (a && c) {
    rows.push([
      '(c) vs (a): longest write gap no worse',
      `${s(c.gapMs)} vs ${s(a.gapMs)} (${ratio(c.gapMs, a.gapMs)})`,
      verdict(c.gapMs <= a.gapMs),
    ]);
    rows.push([
      '(c) vs (a): failed writes no worse',
      `${c.writesFailed} vs ${a.writesFailed} (${ratio(c.writesFailed, a.writesFailed)})`,
      verdict(c.writesFailed <= a.writesFailed),
    ]);
    rows.push([
      '(c) vs (a): window at most 1.25x',
      `${s(c.windowMs)} vs ${s(a.windowMs)} (${ratio(c.windowMs, a.windowMs)})`,
      verdict(c.windowMs <= 1.25 * a.windowMs),
    ]);
  }
  if (c?.handovers?.length) {
    const target = opts.inUseBytes >= 1024 ** 3 ? HANDOVER_TARGET_1GIB_MS : HANDOVER_TARGET_QUICK_MS;
    const m = median(c.handovers);
    rows.push([`(c): median hand-over at most ${s(target)}`, `${s(m)} (max ${s(Math.max(...c.handovers))})`, verdict(m <= target)]);
  }
  if (b && c)
    rows.push([
      '(c) vs (b): longest write gap at least 10x shorter',
      `${s(c.gapMs)} vs ${s(b.gapMs)} (${ratio(b.gapMs, c.gapMs)} shorter)`,
      verdict(c.gapMs * 10 <= b.gapMs),
    ]);
  for (const n of r.nospace.filter((x) => x.variant !== 'cron')) {
    const size = opts.inUseBytes >= 1024 ** 3 ? '' : ` (this run: ${formatBytes(opts.inUseBytes)} db, the target is for 1 GiB)`;
    const ms = n.recoveredAt !== undefined ? n.recoveredAt - n.alarmAt : undefined;
    rows.push([
      `(d) ${n.title}: writes accepted within 60 s of the alarm${size}`,
      ms !== undefined ? s(ms) : `not recovered (${n.gaveUp ?? '?'})`,
      verdict(ms !== undefined && ms <= NOSPACE_TARGET_MS),
    ]);
  }
  const idle = r.idle[0];
  if (idle) {
    rows.push([
      `idle: at most 56 MiB RSS (\`${idle.command}\`)`,
      formatBytes(idle.rssMaxBytes),
      verdict(idle.rssMaxBytes <= IDLE_RSS_TARGET),
    ]);
    rows.push(['idle: at most 16 MiB private', formatBytes(idle.rssAnonMaxBytes), verdict(idle.rssAnonMaxBytes <= IDLE_PRIVATE_TARGET)]);
    rows.push(['idle: under 0.3% of one core', `${(idle.cpuShare * 100).toFixed(2)}%`, verdict(idle.cpuShare < IDLE_CPU_TARGET)]);
    rows.push([
      `idle: a normal start writes nothing journald stores at warning (\`${idle.command}\`)`,
      idle.strayLines.length ? idle.strayLines[0]! : 'nothing',
      verdict(idle.strayLines.length === 0),
    ]);
  }
  if (!rows.length) return '';
  return ['### Targets', '', table(['target', 'measured', ''], rows)].join('\n');
}

function usageSection(u: UsageRun): string {
  const w = (f: UsageRun['during']) => `${s(f.gapMs)} / ${msText(f.p99Ms)} / ${f.failed} of ${f.sent}`;
  return [
    '### (u) `etcd-defragd usage --json` under load',
    '',
    table(
      ['', 'value'],
      [
        [
          'keyspace read',
          `${u.keys} keys, ${formatBytes(u.bytes)} (db ${formatBytes(u.fill.dbSize)}, in use ${formatBytes(u.fill.inUse)})`,
        ],
        ['duration: the scan / the whole command', `${s(u.scanMs)} in ${u.pages} pages / ${s(u.commandMs)} (exit ${u.code})`],
        ['read from', u.source],
        ['writes during: longest gap / p99 / failed', w(u.during)],
        [`writes in the ${s(u.beforeMs)} before: longest gap / p99 / failed`, w(u.before)],
        [
          'longest serializable read, per member (whole run)',
          Object.entries(u.blockedMs)
            .map(([m, ms]) => `${m} ${msText(ms)}`)
            .join(', '),
        ],
      ],
    ),
    ...u.notes.map((n) => `- ${n}`),
  ].join('\n');
}

export function versionSection(r: VersionResults, opts: BenchOptions): string {
  const parts = [`## etcd ${r.fullVersion ?? r.version}`, '', `(${(r.elapsedMs / 60_000).toFixed(1)} minutes for this version)`, ''];
  const summary = disruptionSummary(r);
  if (summary) parts.push(summary, '');
  for (const id of ['a', 'b', 'c'] as const) {
    const d = r.disruptions[id];
    if (d) parts.push(disruptionDetail(d, r.disruptions.a), '');
  }
  const ns = nospaceSection(r.nospace);
  if (ns) parts.push(ns);
  if (r.usage) parts.push(usageSection(r.usage), '');
  if (r.idle.length) parts.push(idleSection(r.idle), '');
  const t = targets(r, opts);
  if (t) parts.push(t, '');
  if (r.errors.length) parts.push('### Errors', '', ...r.errors.map((e) => `- ${e.split('\n')[0]}`), '');
  return parts.join('\n');
}
