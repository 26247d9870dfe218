/**
 * etcd's defrag log: when each member's defragmentations started and ended, as etcd itself logged
 * them, and the check that two members never defragmented at the same time. Pure parsing over the
 * log text (unit-tested in test/unit/defrag-log.test.ts), plus reading the members' log files;
 * shared by the integration tests and the benchmark.
 */
import { readFile } from 'node:fs/promises';

export interface DefragEvent {
  /** Member name (e.g. "m1"). */
  member: string;
  /** Time etcd logged "starting defragment" (the Defragment RPC arrived). */
  start: Date;
  /** Time etcd logged "finished defragment" / "failed to defragment"; undefined while running. */
  end?: Date;
  /** Set when the defrag failed ("failed to defragment"), with etcd's error text. */
  error?: string;
  /** Set when the member process restarted before the defrag finished (end = restart time). */
  interrupted?: boolean;
  /** From etcd's backend lines ("defragmenting" / "defragmented" or "finished defragmenting directory"). */
  dbSizeBefore?: number;
  dbSizeInUseBefore?: number;
  dbSizeAfter?: number;
  /** The backend's own "took" (the file rewrite, without waiting for locks). */
  backendTookMs?: number;
}

/** The fields of etcd's zap JSON log lines that the parser reads. */
interface LogLine {
  ts?: string;
  msg?: string;
  error?: string;
  took?: string;
  'current-db-size-bytes'?: number;
  'current-db-size-in-use-bytes'?: number;
}

/** Parses a Go duration ("2.19ms", "5.2s", "1m3.5s") to milliseconds. */
export function goDurationMs(d: string): number | undefined {
  const unit: Record<string, number> = { h: 3_600_000, m: 60_000, s: 1000, ms: 1, us: 1e-3, µs: 1e-3, ns: 1e-6 };
  let total = 0;
  let matched = false;
  for (const m of d.matchAll(/(\d+(?:\.\d+)?)(ms|us|µs|ns|h|m|s)/g)) {
    total += Number(m[1]) * unit[m[2]!]!;
    matched = true;
  }
  return matched ? total : undefined;
}

/**
 * The defrag intervals in the text of one member's etcd log (all its process lifetimes).
 * etcd 3.4.23 and 3.5.30 (zap JSON) both log, from v3rpc/maintenance.go,
 * "starting defragment" before and "finished defragment" after a successful defrag
 * (or "failed to defragment" with an "error" field), with the time in "ts" (ISO 8601, UTC).
 * The backend adds the sizes: "defragmenting" before, "defragmented" (3.4) or "finished
 * defragmenting directory" (3.5) after. "starting an etcd server" ends what was still open (a restart).
 */
export function parseDefragLog(text: string, member: string): DefragEvent[] {
  const events: DefragEvent[] = [];
  const open: DefragEvent[] = [];
  for (const line of text.split('\n')) {
    if (!line.startsWith('{') || !line.includes('"msg"')) continue;
    if (!/defragment|starting an etcd server/.test(line)) continue;
    let rec: LogLine;
    try {
      rec = JSON.parse(line) as LogLine;
    } catch {
      continue;
    }
    if (!rec.ts || !rec.msg) continue;
    const at = new Date(rec.ts);
    if (Number.isNaN(at.getTime())) continue;
    switch (rec.msg) {
      case 'starting defragment': {
        const ev: DefragEvent = { member, start: at };
        events.push(ev);
        open.push(ev);
        break;
      }
      case 'finished defragment': {
        const ev = open.shift();
        if (ev) ev.end = at;
        break;
      }
      case 'failed to defragment': {
        const ev = open.shift();
        if (ev) {
          ev.end = at;
          ev.error = rec.error ?? 'failed';
        }
        break;
      }
      case 'defragmenting': {
        const ev = open.find((e) => e.dbSizeBefore === undefined);
        if (ev) {
          if (rec['current-db-size-bytes'] !== undefined) ev.dbSizeBefore = rec['current-db-size-bytes'];
          if (rec['current-db-size-in-use-bytes'] !== undefined) ev.dbSizeInUseBefore = rec['current-db-size-in-use-bytes'];
        }
        break;
      }
      case 'defragmented': // 3.4
      case 'finished defragmenting directory': {
        // 3.5
        const ev = open.find((e) => e.dbSizeAfter === undefined);
        if (ev) {
          if (rec['current-db-size-bytes'] !== undefined) ev.dbSizeAfter = rec['current-db-size-bytes'];
          const took = rec.took ? goDurationMs(rec.took) : undefined;
          if (took !== undefined) ev.backendTookMs = took;
        }
        break;
      }
      case 'starting an etcd server': {
        for (const ev of open.splice(0)) {
          ev.end = at;
          ev.interrupted = true;
        }
        break;
      }
      default:
        break;
    }
  }
  return events;
}

/** The defrag intervals in a member's log file ([] while there is no log yet). */
export async function defragEvents(member: { name: string; logFile: string }): Promise<DefragEvent[]> {
  let text: string;
  try {
    text = await readFile(member.logFile, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return [];
    throw err;
  }
  return parseDefragLog(text, member.name);
}

/** Defrag events of every member, sorted by start time. */
export async function allDefragEvents(cluster: { members: readonly { name: string; logFile: string }[] }): Promise<DefragEvent[]> {
  const all = (await Promise.all(cluster.members.map((m) => defragEvents(m)))).flat();
  return all.sort((a, b) => a.start.getTime() - b.start.getTime());
}

function fmtEvent(e: DefragEvent): string {
  const end = e.end ? e.end.toISOString() : 'still running';
  const extra = e.error ? ` (failed: ${e.error})` : e.interrupted ? ' (interrupted by restart)' : '';
  return `${e.member} ${e.start.toISOString()} .. ${end}${extra}`;
}

/**
 * Throws if the defrag intervals of two different members overlap. An unfinished interval counts
 * as open until `now` (default: the current time). Touching intervals (end == start) are fine.
 */
export function assertNoOverlap(events: DefragEvent[], now: Date = new Date()): void {
  const sorted = [...events].sort((a, b) => a.start.getTime() - b.start.getTime());
  const end = (e: DefragEvent): number => (e.end ?? now).getTime();
  const problems: string[] = [];
  for (let i = 0; i < sorted.length; i++) {
    for (let j = i + 1; j < sorted.length; j++) {
      const a = sorted[i]!;
      const b = sorted[j]!;
      if (b.start.getTime() >= end(a)) continue;
      if (a.member === b.member) continue;
      const overlapMs = Math.min(end(a), end(b)) - b.start.getTime();
      problems.push(`  ${fmtEvent(a)}\n  overlaps ${fmtEvent(b)}\n  by ${overlapMs} ms`);
    }
  }
  if (problems.length) {
    throw new Error(
      `defragmentation of different members overlapped (${problems.length} pair(s)):\n${problems.join('\n')}\n` +
        `all defrag intervals:\n${sorted.map((e) => `  ${fmtEvent(e)}`).join('\n')}`,
    );
  }
}
