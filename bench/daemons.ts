// etcd-defragd processes for the benchmark: the shipped defaults plus only what a scenario needs.
// (test/harness/defragd.ts writes configs with fast test timings; the benchmark must not.)
import { spawn, execFile, execFileSync } from 'node:child_process';
import { readFileSync, rmSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { promisify } from 'node:util';
import type { Cluster } from '../test/harness/cluster.ts';
import type { Member } from '../test/harness/member.ts';
import { events, memberEtcd, writeConfigFile, type LogLine, type Overrides } from '../test/harness/defragd.ts';
import { REPO_ROOT, spawnCli, type CliProcess } from '../test/harness/proc.ts';

export type Settings = Overrides;

/** A schedule that never fires within a benchmark (1 January, midnight). */
export const NEVER = '0 0 1 1 *';

/** A 6-field cron (seconds first, UTC) that fires once at `at` (rounded down to the second). */
export function cronAt(at: number): string {
  const d = new Date(at);
  return `${d.getUTCSeconds()} ${d.getUTCMinutes()} ${d.getUTCHours()} ${d.getUTCDate()} ${d.getUTCMonth() + 1} *`;
}

/**
 * Writes a config for the daemon of `member`: the member's endpoint, TLS files and data dir, JSON
 * logs (the benchmark reads them), and `settings`; everything else is the daemon's default.
 */
export function writeBenchConfig(cluster: Cluster, member: Member, settings: Settings, name = `bench-defragd-${member.name}.yaml`): string {
  return writeConfigFile(cluster, name, { etcd: memberEtcd(cluster, member), log: { format: 'json' } }, settings);
}

/**
 * Starts one daemon per member at the same instant (configs are written first), from the build
 * snapshot `cliJs` taken at the start of the run, with the unit's node flags (see unitNodeFlags; the
 * harness adds its TypeScript loader, which compiled JavaScript does not use); resolves once each
 * has joined the turn.
 */
export async function startDaemons(cluster: Cluster, settings: Settings, cliJs: string, timeoutMs = 60_000): Promise<CliProcess[]> {
  const paths = cluster.members.map((m) => writeBenchConfig(cluster, m, settings));
  const daemons = paths.map((p) =>
    spawnCli(['run', '--config', p], { script: cliJs, nodeArgs: unitNodeFlags(), env: { NODE_ENV: 'production' } }),
  );
  try {
    await Promise.all(daemons.map((d) => d.waitForJson<LogLine>((l) => l.event === 'turn.register', timeoutMs)));
  } catch (err) {
    await stopDaemons(daemons);
    throw err;
  }
  return daemons;
}

export async function stopDaemons(daemons: CliProcess[]): Promise<void> {
  await Promise.all(
    daemons.map(async (d) => {
      if (!d.isRunning()) return;
      const timer = setTimeout(() => void d.kill('SIGKILL'), 15_000);
      await d.kill('SIGTERM');
      clearTimeout(timer);
    }),
  );
}

/** Log lines of every daemon, tagged with the member name, in time order. */
export function daemonEvents(cluster: Cluster, daemons: CliProcess[], event?: string): (LogLine & { node: string })[] {
  return daemons.flatMap((d, i) => events(d, event).map((l) => ({ ...l, node: cluster.members[i]!.name }))).sort((a, b) => a.time - b.time);
}

// ---------------------------------------------------------------------------------------------
// The shipped build, for the idle footprint (what operators run: node dist/cli.js).

const execFileP = promisify(execFile);
/** Inside node_modules: ignored by git and eslint; dependencies resolve from the repo's node_modules. */
const BUILD_ROOT = join(REPO_ROOT, 'node_modules', '.cache', 'etcd-defragd-bench');

export interface Build {
  /** The compiled cli.js. */
  cliJs: string;
  /** Which source was built: the commit, and whether src/ or config/ had uncommitted changes. */
  source: string;
}

function sourceRevision(): string {
  try {
    const git = (args: string[]): string =>
      execFileSync('git', args, { cwd: REPO_ROOT, encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] });
    const head = git(['rev-parse', '--short=12', 'HEAD']).trim();
    // porcelain lines are "XY path": keep the leading status columns intact
    const dirty = git(['status', '--porcelain', '--', 'src', 'config', 'package.json'])
      .split('\n')
      .filter(Boolean)
      .map((l) => l.slice(3));
    return dirty.length ? `commit ${head} plus uncommitted changes in ${dirty.join(', ')}` : `commit ${head}`;
  } catch {
    return 'unknown (not a git checkout)';
  }
}

/**
 * Compiles src/ with the project's build config (tsconfig.build.json) into a scratch dir, as
 * `npm run build` does into dist/ (which may be stale). Every daemon of a run starts from this one
 * snapshot, so edits to src/ during a run do not change what is measured.
 */
export async function buildDaemon(): Promise<Build> {
  const source = sourceRevision();
  const outDir = join(BUILD_ROOT, 'dist');
  rmSync(BUILD_ROOT, { recursive: true, force: true });
  await execFileP(
    join(REPO_ROOT, 'node_modules', '.bin', 'tsc'),
    ['-p', join(REPO_ROOT, 'tsconfig.build.json'), '--outDir', outDir, '--sourceMap', 'false'],
    { cwd: REPO_ROOT },
  );
  // Node does not look for "type": "module" above a node_modules dir: say it here (cli.js also reads the version from ../package.json).
  const pkg = JSON.parse(readFileSync(join(REPO_ROOT, 'package.json'), 'utf8')) as { name: string; version: string; type: string };
  writeFileSync(
    join(BUILD_ROOT, 'package.json'),
    `${JSON.stringify({ name: pkg.name, version: pkg.version, type: pkg.type, private: true })}\n`,
  );
  return { cliJs: join(outDir, 'cli.js'), source };
}

/**
 * The node flags the shipped systemd unit puts between node and dist/cli.js, so the daemons here
 * run as in production. [] when the unit runs the packaged executable (it has no node flags).
 */
export function unitNodeFlags(): string[] {
  const line = unitLines('ExecStart')[0];
  if (!line) return [];
  const words = line.trim().split(/\s+/);
  const script = words.findIndex((w) => w.endsWith('/cli.js'));
  return script > 1 ? words.slice(1, script) : [];
}

/** Values of a key in the [Service] section of the shipped unit, in order. */
function unitLines(key: string): string[] {
  let text: string;
  try {
    text = readFileSync(join(REPO_ROOT, 'systemd', 'etcd-defragd.service'), 'utf8');
  } catch {
    return [];
  }
  return text
    .split('\n')
    .filter((l) => l.startsWith(`${key}=`))
    .map((l) => l.slice(key.length + 1));
}

/** The unit's Environment= assignments (e.g. NODE_ENV=production), as the service gets them. */
export function unitEnvironment(): Record<string, string> {
  const env: Record<string, string> = {};
  for (const line of unitLines('Environment')) {
    for (const m of line.matchAll(/"([^"=]+)=([^"]*)"|(\S+?)=(\S*)/g)) env[m[1] ?? m[3]!] = m[2] ?? m[4]!;
  }
  return env;
}

/** What an operator puts on a node to run it: a file or several, and their total size in bytes. */
export interface Footprint {
  bytes: number;
  what: string;
}

function treeBytes(path: string): number {
  const out = execFileSync('du', ['-sb', path], { encoding: 'utf8' });
  return Number(out.split('\t')[0]);
}

/**
 * `node dist/cli.js` needs node, the compiled dist/ and the production node_modules (what
 * systemd/install.sh used to copy): their sizes, package directories counted once.
 */
export function nodeFootprint(cliJs: string): Footprint {
  const nodeBytes = treeBytes(process.execPath);
  const distBytes = treeBytes(dirname(cliJs));
  const listed = execFileSync('npm', ['ls', '--omit=dev', '--all', '--parseable'], { cwd: REPO_ROOT, encoding: 'utf8' })
    .split('\n')
    .filter((p) => p.includes('/node_modules/'));
  const dirs = [...new Set(listed)].sort();
  const top = dirs.filter((d, i) => !dirs.slice(0, i).some((p) => d.startsWith(`${p}/`)));
  const depsBytes = top.reduce((sum, d) => sum + treeBytes(d), 0);
  return {
    bytes: nodeBytes + distBytes + depsBytes,
    what: `node ${fmtMiB(nodeBytes)} + dist/ ${fmtMiB(distBytes)} + production node_modules ${fmtMiB(depsBytes)} (${top.length} packages)`,
  };
}

function fmtMiB(n: number): string {
  return `${(n / 2 ** 20).toFixed(1)} MiB`;
}

/**
 * Builds the single executable from the current source (npm run package --exe-only) into a
 * scratch dir, so the run measures what this checkout would ship.
 */
export async function buildExecutable(): Promise<{ exe: string; footprint: Footprint }> {
  const out = join(BUILD_ROOT, 'pkg');
  await execFileP(process.execPath, ['--import', 'tsx', join(REPO_ROOT, 'scripts', 'package.ts'), '--exe-only', '--out', out], {
    cwd: REPO_ROOT,
  });
  const exe = join(out, 'etcd-defragd');
  const bytes = treeBytes(exe);
  return { exe, footprint: { bytes, what: `one file, ${fmtMiB(bytes)}` } };
}

export interface EffectiveConfig {
  coordination: { settle: number; leaseTTL: number };
  nospace: { checkInterval: number };
}

/** The config the built daemon makes of `path` (its defaults filled in), from the same build. */
export async function effectiveConfig(cliJs: string, path: string): Promise<EffectiveConfig> {
  const mod = (await import(pathToFileURL(join(dirname(cliJs), 'config.js')).href)) as {
    loadConfig(o: { path: string; pathExplicit: boolean; env: NodeJS.ProcessEnv }): { config: EffectiveConfig };
  };
  return mod.loadConfig({ path, pathExplicit: true, env: {} }).config;
}

export interface BuiltDaemon {
  pid: number;
  started: Promise<void>;
  /** Milliseconds from spawn to the first line the process wrote. */
  firstLineMs: Promise<number>;
  stop(): Promise<void>;
  output(): string;
}

/** Runs `file ...args run --config FILE`, e.g. the packaged executable with the unit's environment. */
export function startDaemonProcess(file: string, args: string[], config: string, env: Record<string, string>): BuiltDaemon {
  const t0 = performance.now();
  const child = spawn(file, [...args, 'run', '--config', config], {
    cwd: REPO_ROOT,
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, ...env },
  });
  let resolveFirst!: (ms: number) => void;
  const firstLineMs = new Promise<number>((res) => {
    resolveFirst = res;
  });
  // Logs go to stderr (stdout is for machine output): the first line on either stream counts.
  child.stdout.once('data', () => resolveFirst(performance.now() - t0));
  child.stderr.once('data', () => resolveFirst(performance.now() - t0));
  let out = '';
  let resolveStarted!: () => void;
  let rejectStarted!: (e: Error) => void;
  const started = new Promise<void>((res, rej) => {
    resolveStarted = res;
    rejectStarted = rej;
  });
  const onData = (d: Buffer): void => {
    out += d.toString();
    if (out.includes('"event":"daemon.start"')) resolveStarted();
  };
  child.stdout.on('data', onData);
  child.stderr.on('data', onData);
  const exited = new Promise<void>((res) => child.once('exit', () => res()));
  child.once('exit', (code, signal) => rejectStarted(new Error(`daemon exited (code ${code}, signal ${signal}) before starting:\n${out}`)));
  process.once('exit', () => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  });
  return {
    pid: child.pid ?? 0,
    started,
    firstLineMs,
    output: () => out,
    async stop() {
      if (child.exitCode !== null || child.signalCode !== null) return;
      child.kill('SIGTERM');
      const timer = setTimeout(() => child.kill('SIGKILL'), 15_000);
      await exited;
      clearTimeout(timer);
    },
  };
}
