// Command line of `npm run bench`.
import { parseArgs } from 'node:util';
import { isEtcdVersion, type EtcdVersion } from '../test/harness/etcd-bin.ts';
import { parseDuration, parseSize } from '../src/units.ts';

export const SCENARIOS = ['a', 'b', 'c', 'd', 'usage', 'idle'] as const;
export type ScenarioId = (typeof SCENARIOS)[number];

export interface BenchOptions {
  versions: EtcdVersion[];
  quick: boolean;
  /** Live data each scenario starts with. */
  inUseBytes: number;
  /** Free pages each defrag scenario starts with (dbSize - dbSizeInUse). */
  reclaimBytes: number;
  /** Write load over the whole cluster, puts per second. */
  ratePerSec: number;
  /** Deadline of each write (no client retries). */
  deadlineMs: number;
  /** Read probe per member, requests per second. */
  probeRatePerSec: number;
  /** Load measured before the trigger, and after the last defrag ended. */
  preRollMs: number;
  tailMs: number;
  /** NOSPACE scenario: --quota-backend-bytes as a multiple of the in-use size. */
  quotaFactor: number;
  /** NOSPACE scenario: nospace.checkInterval of the daemons (undefined: the daemon's default). */
  nospaceCheckMs: number | undefined;
  /** NOSPACE scenario: also run the daemons with nospace.compact: false after a hand compaction. */
  nospaceCompact: boolean;
  /** NOSPACE scenario: how long the old cron's aftermath is watched after its defrag ended. */
  cronObserveMs: number;
  /** NOSPACE scenario: give up waiting for the daemons' recovery after this long. */
  recoveryTimeoutMs: number;
  /** Idle footprint: warm-up, then the sampled period. */
  idleWarmupMs: number;
  idleSampleMs: number;
  scenarios: Set<ScenarioId>;
  out: string;
  /** The command line as an operator types it. */
  command: string;
}

export const USAGE = `npm run bench -- [options]

  --etcd 3.4|3.5|both   etcd version(s) to run against (default both)
  --quick               small database (128MiB in use + 64MiB reclaimable), shorter idle sample
  --in-use SIZE         live data per scenario (default 1GiB; quick 128MiB)
  --reclaim SIZE        reclaimable space per defrag scenario (default 400MiB; quick 64MiB)
  --rate N              writes per second over the cluster (default 100)
  --nospace-check DUR   nospace.checkInterval of the daemons in scenario (d) (default: the daemon's default, 30s)
  --nospace-compact     scenario (d) also with nospace.compact: false after a hand compaction (v0.1's assumption)
  --only LIST           run only these scenarios, comma separated: a,b,c,d,usage,idle (default all; (a) is the baseline of the ratios)
  --out FILE            also write the Markdown here (default bench/results/latest.md; with --quick bench/results/quick.md)
  -h, --help            this help`;

export class UsageError extends Error {}

function size(name: string, v: string | undefined, dflt: number): number {
  if (v === undefined) return dflt;
  const n = parseSize(v);
  if (n === undefined || n <= 0) throw new UsageError(`--${name} ${v}: expected a size such as 1GiB or 400MiB`);
  return n;
}

/** The benchmark's flags (docs/benchmark.md says what each does). */
const FLAGS = {
  etcd: { type: 'string' },
  quick: { type: 'boolean' },
  'in-use': { type: 'string' },
  reclaim: { type: 'string' },
  rate: { type: 'string' },
  'nospace-check': { type: 'string' },
  'nospace-compact': { type: 'boolean' },
  only: { type: 'string' },
  out: { type: 'string' },
  help: { type: 'boolean', short: 'h' },
} as const;

export function parseOptions(argv: string[]): BenchOptions | 'help' {
  let parsed;
  try {
    parsed = parseArgs({ args: argv, options: FLAGS });
  } catch (err) {
    throw new UsageError((err as Error).message);
  }
  const v = parsed.values;
  if (v.help) return 'help';
  const etcd = v.etcd ?? 'both';
  let versions: EtcdVersion[];
  if (etcd === 'both') versions = ['3.4', '3.5'];
  else if (isEtcdVersion(etcd)) versions = [etcd];
  else throw new UsageError(`--etcd ${etcd}: expected 3.4, 3.5 or both`);
  const quick = Boolean(v.quick);
  const MiB = 1024 * 1024;
  const rate = v.rate === undefined ? 100 : Number(v.rate);
  if (!Number.isFinite(rate) || rate <= 0) throw new UsageError(`--rate ${v.rate}: expected a positive number`);
  let nospaceCheckMs: number | undefined;
  if (v['nospace-check'] !== undefined) {
    nospaceCheckMs = parseDuration(v['nospace-check']);
    if (nospaceCheckMs === undefined || nospaceCheckMs < 1000)
      throw new UsageError(`--nospace-check ${v['nospace-check']}: expected a duration of at least 1s`);
  }
  const scenarios = new Set<ScenarioId>();
  for (const s of (v.only ?? SCENARIOS.join(','))
    .split(',')
    .map((x) => x.trim())
    .filter(Boolean)) {
    if (!(SCENARIOS as readonly string[]).includes(s))
      throw new UsageError(`--only ${v.only}: unknown scenario "${s}" (known: ${SCENARIOS.join(', ')})`);
    scenarios.add(s as ScenarioId);
  }
  return {
    versions,
    quick,
    inUseBytes: size('in-use', v['in-use'], quick ? 128 * MiB : 1024 * MiB),
    reclaimBytes: size('reclaim', v.reclaim, quick ? 64 * MiB : 400 * MiB),
    ratePerSec: rate,
    deadlineMs: 2000,
    probeRatePerSec: 10,
    preRollMs: 5000,
    tailMs: 5000,
    quotaFactor: 1.25,
    nospaceCheckMs,
    nospaceCompact: Boolean(v['nospace-compact']),
    cronObserveMs: quick ? 15_000 : 30_000,
    recoveryTimeoutMs: quick ? 150_000 : 300_000,
    idleWarmupMs: quick ? 5000 : 10_000,
    idleSampleMs: quick ? 20_000 : 60_000,
    scenarios,
    // A quick try must not overwrite the full run's results.
    out: v.out ?? (quick ? 'bench/results/quick.md' : 'bench/results/latest.md'),
    command: ['npm run bench', ...(argv.length ? ['--', ...argv.map(shellQuote)] : [])].join(' '),
  };
}

function shellQuote(s: string): string {
  return /^[\w@%+=:,./-]+$/.test(s) ? s : `'${s.replace(/'/g, `'\\''`)}'`;
}
