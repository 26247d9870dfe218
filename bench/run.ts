// `npm run bench`: etcd-defragd against the cron it replaces, side by side in one run.
// Progress goes to stderr, the Markdown tables to stdout and to --out.
import { mkdirSync, writeFileSync } from 'node:fs';
import { basename, dirname, resolve } from 'node:path';
import { errorText } from '../test/harness/errors.ts';
import { etcdBinaries } from '../test/harness/etcd-bin.ts';
import { REPO_ROOT } from '../test/harness/proc.ts';
import { buildDaemon, buildExecutable, nodeFootprint, unitEnvironment, type Footprint } from './daemons.ts';
import { parseOptions, USAGE, UsageError, type BenchOptions } from './options.ts';
import { header, versionSection, type VersionResults } from './report.ts';
import { writeTimelines } from './timeline.ts';
import { scenarioA, scenarioB, scenarioC } from './disruption.ts';
import { idleFootprint, nodeLaunch } from './idle.ts';
import { scenarioD } from './nospace.ts';
import { scenarioUsage } from './usage.ts';
import type { Ctx } from './scenarios.ts';
import { muteIpServernameWarning } from '../src/warnings.ts';

const t0 = Date.now();
function progress(line: string): void {
  const el = Math.round((Date.now() - t0) / 1000);
  process.stderr.write(`[${String(Math.floor(el / 60)).padStart(2, '0')}:${String(el % 60).padStart(2, '0')}] ${line}\n`);
}

interface Builds {
  cliJs: string;
  node: Footprint;
  exe: string;
  exeFootprint: Footprint;
}

async function runVersion(opts: BenchOptions, version: '3.4' | '3.5', builds: Builds): Promise<VersionResults> {
  const { cliJs } = builds;
  const started = Date.now();
  const bins = await etcdBinaries(version);
  const r: VersionResults = { version, fullVersion: bins.version, disruptions: {}, nospace: [], idle: [], errors: [], elapsedMs: 0 };
  const ctx: Ctx = { version, opts, cliJs, log: (l) => progress(`etcd ${bins.version} ${l}`) };
  const step = async (name: string, fn: () => Promise<void>): Promise<void> => {
    try {
      await fn();
    } catch (err) {
      const msg = `${name}: ${errorText(err)}`;
      r.errors.push(msg);
      progress(`etcd ${bins.version} FAILED ${msg}`);
    }
  };
  const sc = opts.scenarios;
  if (sc.has('a')) await step('(a)', async () => void (r.disruptions.a = await scenarioA(ctx)));
  if (sc.has('b')) await step('(b)', async () => void (r.disruptions.b = await scenarioB(ctx)));
  if (sc.has('c')) await step('(c)', async () => void (r.disruptions.c = await scenarioC(ctx)));
  if (sc.has('d')) {
    await step('(d) daemon', async () => void r.nospace.push(await scenarioD(ctx, 'daemon')));
    if (opts.nospaceCompact) {
      await step(
        '(d) daemon, nospace.compact: false, compacted by hand',
        async () => void r.nospace.push(await scenarioD(ctx, 'daemon-nocompact')),
      );
    }
    await step('(d) cron', async () => void r.nospace.push(await scenarioD(ctx, 'cron')));
  }
  if (sc.has('usage')) await step('(u) usage', async () => void (r.usage = await scenarioUsage(ctx)));
  if (sc.has('idle')) {
    // The packaged executable as the systemd unit starts it (its Environment=), then the same
    // source under plain node (the baseline of the ratios), then node --lite-mode as the previous
    // unit ran it (its flag made V8 print a warning at every start).
    const exeLaunch = {
      command: 'etcd-defragd run --config FILE',
      file: builds.exe,
      args: [],
      env: unitEnvironment(),
      footprint: builds.exeFootprint,
    };
    await step('idle, executable', async () => void r.idle.push(await idleFootprint(ctx, exeLaunch)));
    await step('idle, node', async () => void r.idle.push(await idleFootprint(ctx, nodeLaunch(cliJs, [], builds.node))));
    await step(
      'idle, node --lite-mode',
      async () => void r.idle.push(await idleFootprint(ctx, nodeLaunch(cliJs, ['--lite-mode'], builds.node))),
    );
  }
  r.elapsedMs = Date.now() - started;
  return r;
}

async function main(argv: string[]): Promise<number> {
  let opts: BenchOptions | 'help';
  try {
    opts = parseOptions(argv);
  } catch (err) {
    if (err instanceof UsageError) {
      process.stderr.write(`bench: ${err.message}\n\n${USAGE}\n`);
      return 64;
    }
    throw err;
  }
  if (opts === 'help') {
    process.stdout.write(`${USAGE}\n`);
    return 0;
  }
  const startedAt = new Date();
  const versions = await Promise.all(opts.versions.map(async (v) => (await etcdBinaries(v)).version));
  progress(`etcd ${versions.join(', ')}; ${opts.quick ? 'quick' : 'full'} run; scenarios ${[...opts.scenarios].join(', ')}`);
  progress('building the daemon (tsc -p tsconfig.build.json); every daemon of this run starts from this build');
  const build = await buildDaemon();
  progress(`built ${build.source}`);
  let builds: Builds = { cliJs: build.cliJs, node: { bytes: 0, what: '' }, exe: '', exeFootprint: { bytes: 0, what: '' } };
  if (opts.scenarios.has('idle')) {
    progress('building the single executable (npm run package -- --exe-only) for the idle comparison');
    const { exe, footprint } = await buildExecutable();
    builds = { ...builds, exe, exeFootprint: footprint, node: nodeFootprint(build.cliJs) };
  }
  const out = resolve(REPO_ROOT, opts.out);
  const sections: string[] = [header(opts, startedAt, versions.join(', '), build.source)];
  process.stdout.write(`${sections[0]}\n`);
  let failed = false;
  const save = (): void => {
    mkdirSync(dirname(out), { recursive: true });
    writeFileSync(out, `${sections.join('\n')}\n`);
  };
  for (const v of opts.versions) {
    const r = await runVersion(opts, v, builds);
    if (r.errors.length) failed = true;
    let text = versionSection(r, opts);
    try {
      mkdirSync(dirname(out), { recursive: true });
      const svg = await writeTimelines(r, opts.preRollMs, opts.tailMs, `${out.replace(/\.md$/, '')}-etcd${r.version}-timeline`);
      if (svg)
        text += `\n![etcd ${r.fullVersion ?? r.version}: writes per 100 ms and each member's defragment, scenarios (a), (b), (c)](${basename(svg)})\n\nData: [${basename(svg).replace(/\.svg$/, '.json')}](${basename(svg).replace(/\.svg$/, '.json')}).\n`;
    } catch (err) {
      progress(`timeline not drawn: ${errorText(err)}`);
    }
    sections.push(text);
    process.stdout.write(`${text}\n`);
    save();
  }
  sections.push(`(whole run: ${((Date.now() - startedAt.getTime()) / 60_000).toFixed(1)} minutes)`);
  save();
  progress(`done; Markdown written to ${out}`);
  return failed ? 1 : 0;
}

muteIpServernameWarning();

main(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code;
  },
  (err: unknown) => {
    process.stderr.write(`bench: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
    process.exitCode = 1;
  },
);
