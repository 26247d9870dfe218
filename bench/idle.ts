// The idle footprint: one daemon against a healthy cluster with nothing to do, its memory and CPU
// sampled from /proc (the process and its descendants).
import { execFileSync } from 'node:child_process';
import { readdirSync, readFileSync } from 'node:fs';
import { relative } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { formatBytes } from '../src/units.ts';
import { startCluster } from '../test/harness/cluster.ts';
import { now } from '../test/harness/load.ts';
import { REPO_ROOT } from '../test/harness/proc.ts';
import { NEVER, startDaemonProcess, writeBenchConfig, type Footprint } from './daemons.ts';
import type { Ctx } from './scenarios.ts';

export interface IdleResult {
  fullVersion: string;
  /** Milliseconds from spawn to the first log line. */
  firstLineMs: number;
  /** Private (anonymous) resident memory, max over the samples; the rest of RSS is file pages of the executable. */
  rssAnonMaxBytes: number;
  /** Lines that are not log lines (a runtime warning): journald would store them at warning priority. */
  strayLines: string[];
  footprint: Footprint;
  sampleMs: number;
  rssMaxBytes: number;
  rssMeanBytes: number;
  /** CPU time over the sample as a share of one core (0.01 = 1%). */
  cpuShare: number;
  cpuMs: number;
  command: string;
}

function clockTicks(): number {
  try {
    return Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).trim()) || 100;
  } catch {
    return 100;
  }
}

/** The process and its descendants (Linux /proc). */
function processTree(root: number): number[] {
  const children = new Map<number, number[]>();
  for (const e of readdirSync('/proc')) {
    if (!/^\d+$/.test(e)) continue;
    try {
      const st = readFileSync(`/proc/${e}/stat`, 'utf8');
      const ppid = Number(st.slice(st.lastIndexOf(')') + 2).split(' ')[1]);
      const list = children.get(ppid) ?? [];
      list.push(Number(e));
      children.set(ppid, list);
    } catch {
      /* gone */
    }
  }
  const out: number[] = [];
  const walk = (p: number): void => {
    out.push(p);
    for (const c of children.get(p) ?? []) walk(c);
  };
  walk(root);
  return out;
}

function rssBytes(pids: number[], field: 'VmRSS' | 'RssAnon' = 'VmRSS'): number {
  let sum = 0;
  for (const p of pids) {
    try {
      const m = new RegExp(`${field}:\\s+(\\d+) kB`).exec(readFileSync(`/proc/${p}/status`, 'utf8'));
      if (m) sum += Number(m[1]) * 1024;
    } catch {
      /* gone */
    }
  }
  return sum;
}

function cpuTicks(pids: number[]): number {
  let sum = 0;
  for (const p of pids) {
    try {
      const st = readFileSync(`/proc/${p}/stat`, 'utf8');
      const f = st.slice(st.lastIndexOf(')') + 2).split(' ');
      // fields after the comm: state(0) ppid(1) ... utime(11) stime(12)
      sum += Number(f[11]) + Number(f[12]);
    } catch {
      /* gone */
    }
  }
  return sum;
}

/** How the idle daemon is started: a file, its arguments before `run --config FILE`, environment. */
export interface Launch {
  command: string;
  file: string;
  args: string[];
  env: Record<string, string>;
  footprint: Footprint;
}

/** The compiled build under node, with `nodeFlags`, as the old unit started it. */
export function nodeLaunch(cliJs: string, nodeFlags: string[], footprint: Footprint): Launch {
  return {
    command: ['node', ...nodeFlags, relative(REPO_ROOT, cliJs), 'run', '--config', 'FILE'].join(' '),
    file: process.execPath,
    args: [...nodeFlags, cliJs],
    env: { NODE_ENV: 'production' },
    footprint,
  };
}

/** One daemon running against a healthy cluster with nothing to do. */
export async function idleFootprint(ctx: Ctx, launch: Launch): Promise<IdleResult> {
  const { opts } = ctx;
  const cluster = await startCluster({ version: ctx.version });
  try {
    const config = writeBenchConfig(
      cluster,
      cluster.members[0]!,
      { schedule: { cron: NEVER }, metrics: { listen: '127.0.0.1:0' } },
      'bench-idle.yaml',
    );
    const d = startDaemonProcess(launch.file, launch.args, config, launch.env);
    const command = launch.command;
    try {
      await d.started;
      const firstLineMs = await d.firstLineMs;
      ctx.log(
        `idle: \`${command}\` (pid ${d.pid}) started; warm-up ${opts.idleWarmupMs / 1000} s, then sampling ${opts.idleSampleMs / 1000} s`,
      );
      await sleep(opts.idleWarmupMs);
      const hz = clockTicks();
      const tree0 = processTree(d.pid);
      const cpu0 = cpuTicks(tree0);
      const t0 = now();
      const samples: number[] = [];
      const anon: number[] = [];
      while (now() - t0 < opts.idleSampleMs) {
        samples.push(rssBytes(processTree(d.pid)));
        anon.push(rssBytes(processTree(d.pid), 'RssAnon'));
        await sleep(Math.min(1000, Math.max(0, opts.idleSampleMs - (now() - t0))));
      }
      samples.push(rssBytes(processTree(d.pid)));
      const cpu1 = cpuTicks(processTree(d.pid));
      const elapsed = now() - t0;
      const cpuMs = ((cpu1 - cpu0) / hz) * 1000;
      const strayLines = d
        .output()
        .split('\n')
        .filter((l) => l && !l.startsWith('{'));
      const res: IdleResult = {
        fullVersion: cluster.fullVersion,
        firstLineMs,
        rssAnonMaxBytes: Math.max(...anon),
        strayLines,
        footprint: launch.footprint,
        sampleMs: elapsed,
        rssMaxBytes: Math.max(...samples),
        rssMeanBytes: samples.reduce((a, b) => a + b, 0) / samples.length,
        cpuShare: cpuMs / elapsed,
        cpuMs,
        command,
      };
      if (/"level":(50|60)/.test(d.output())) throw new Error(`the idle daemon logged errors:\n${d.output()}`);

      ctx.log(`idle: RSS max ${formatBytes(res.rssMaxBytes)}, CPU ${(res.cpuShare * 100).toFixed(2)}% of one core`);
      return res;
    } finally {
      await d.stop();
    }
  } finally {
    await cluster.stop();
  }
}
