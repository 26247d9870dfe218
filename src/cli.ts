#!/usr/bin/env node
// Thin entry: parse the command line, load the config, call the core, map the result to an exit code.
import { existsSync, readFileSync } from 'node:fs';
import { parseArgs } from 'node:util';
import { describeConfig, loadConfig, type LoadOptions, type LoadedConfig } from './config.ts';
import { Daemon } from './daemon.ts';
import { accessFromConfig, ClientPool } from './etcd.ts';
import { ConfigError, DefragdError, EXIT, UsageError, errorMessage } from './errors.ts';
import { inspect } from './inspect.ts';
import { createLogger, type Log } from './log.ts';
import { exitCodeFor, realClock, runPass } from './pass.ts';
import { decide, healthGate, hexId, quotaMismatch, type ClusterView, type Decision, type MemberView } from './policy.ts';
import { stageTlsFiles } from './tls-files.ts';
import { Turn } from './turn.ts';
import { formatBytes, formatPercent } from './units.ts';
import { muteIpServernameWarning } from './warnings.ts';

const HELP = `etcd-defragd - defragments the local etcd member, one member at a time across the cluster

Usage:
  etcd-defragd [run]          run as a daemon: scheduled runs, NOSPACE recovery, metrics
  etcd-defragd once           one gated pass now (exit 0 done or not needed, 75 skipped, 1 failed)
      --dry-run               decide and report, change nothing
      --force                 defragment even when not needed (policy.force); the only
                              voting member of a cluster still needs policy.singleMember
  etcd-defragd status         show the cluster as etcd-defragd sees it: sizes, each member's
                              quota (from etcd) and whether it is defragmenting now
      --json                  as JSON
  etcd-defragd check-config   validate the config and print the effective values
  etcd-defragd stage-tls      (systemd, as root) copy the TLS files the config names into the
                              service's runtime directory
      --runtime-dir DIR       default $RUNTIME_DIRECTORY, else /run/etcd-defragd

Options:
  --config PATH               config file (default /etc/etcd-defragd/config.yaml, env ETCD_DEFRAGD_CONFIG)
  --endpoint URL              etcd.endpoint
  --log-format FORMAT         auto | journal | json | pretty
  --log-level LEVEL           trace | debug | info | warn | error
  --set KEY=VALUE             set any config key, e.g. --set coordination.maxWait=5m (repeatable)
  -h, --help                  this help
  --version                   print the version

Every key can also be set with ETCD_DEFRAGD_<SECTION>_<KEY>, e.g. ETCD_DEFRAGD_SCHEDULE_CRON.
Precedence: defaults < file < environment < flags. Exit codes: 0 ok, 1 failed, 64 usage,
75 skipped (not safe now), 78 configuration error.`;

const COMMANDS = ['run', 'once', 'status', 'check-config', 'stage-tls'] as const;
type Command = (typeof COMMANDS)[number];

interface Parsed {
  command: Command;
  values: { config?: string; 'runtime-dir'?: string; endpoint?: string; 'log-format'?: string; 'log-level'?: string; set?: string[]; 'dry-run'?: boolean; force?: boolean; json?: boolean; help?: boolean; version?: boolean };
}

function parse(argv: string[]): Parsed {
  let parsed;
  try {
    parsed = parseArgs({
      args: argv,
      allowPositionals: true,
      options: {
        config: { type: 'string' },
        'runtime-dir': { type: 'string' },
        endpoint: { type: 'string' },
        'log-format': { type: 'string' },
        'log-level': { type: 'string' },
        set: { type: 'string', multiple: true },
        'dry-run': { type: 'boolean' },
        force: { type: 'boolean' },
        json: { type: 'boolean' },
        help: { type: 'boolean', short: 'h' },
        version: { type: 'boolean' },
      },
    });
  } catch (err) {
    throw new UsageError(`${errorMessage(err)} (see etcd-defragd --help)`);
  }
  const [cmd = 'run', ...extra] = parsed.positionals;
  if (!COMMANDS.includes(cmd as Command)) throw new UsageError(`unknown command "${cmd}"; commands: ${COMMANDS.join(', ')} (see etcd-defragd --help)`);
  if (extra.length) throw new UsageError(`unexpected argument "${extra[0]}" (see etcd-defragd --help)`);
  const command = cmd as Command;
  if ((parsed.values['dry-run'] || parsed.values.force) && command !== 'once') throw new UsageError('--dry-run and --force go with the once command');
  if (parsed.values.json && command !== 'status') throw new UsageError('--json goes with the status command');
  if (parsed.values['runtime-dir'] !== undefined && command !== 'stage-tls') throw new UsageError('--runtime-dir goes with the stage-tls command');
  return { command, values: parsed.values };
}

function loadOptions(p: Parsed, env: NodeJS.ProcessEnv): LoadOptions {
  const flags: Record<string, unknown> = {};
  for (const item of p.values.set ?? []) {
    const i = item.indexOf('=');
    if (i <= 0) throw new UsageError(`--set ${item}: expected KEY=VALUE, e.g. --set schedule.cron="0 */3 * * *"`);
    flags[item.slice(0, i)] = item.slice(i + 1);
  }
  if (p.values.endpoint !== undefined) flags['etcd.endpoint'] = p.values.endpoint;
  if (p.values['log-format'] !== undefined) flags['log.format'] = p.values['log-format'];
  if (p.values['log-level'] !== undefined) flags['log.level'] = p.values['log-level'];
  const path = p.values.config ?? env.ETCD_DEFRAGD_CONFIG;
  return { path, pathExplicit: Boolean(path), env, flags };
}

/** Set by the packaged build (scripts/package.ts); absent when run from source or dist/cli.js. */
declare const __EDD_BUILD__: { version: string; commit: string } | undefined;

function version(): string {
  if (typeof __EDD_BUILD__ !== 'undefined') return `${__EDD_BUILD__.version} (commit ${__EDD_BUILD__.commit}, Node.js ${process.version})`;
  const pkg = JSON.parse(readFileSync(new URL('../package.json', import.meta.url), 'utf8')) as { version: string };
  return `${pkg.version} (commit unknown: not a packaged build, Node.js ${process.version})`;
}

async function once(loaded: LoadedConfig, log: Log, p: Parsed): Promise<number> {
  const c = loaded.config;
  const pool = new ClientPool(accessFromConfig(c));
  let view: ClusterView | undefined;
  const turn = p.values['dry-run'] ? undefined : new Turn(
    { prefix: c.coordination.prefix, leaseTTL: c.coordination.leaseTTL, command: 'etcd-defragd once' },
    {
      endpoints: () => [...(view?.members ?? []).filter((m) => !m.isLocal && !m.isLearner && m.status).map((m) => m.endpoint), c.etcd.endpoint].map((e) => pool.get(e)),
      log, now: realClock.now, sleep: realClock.sleep,
    },
  );
  const abort = new AbortController();
  const onSignal = () => abort.abort();
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);
  try {
    const r = await runPass({
      config: c, pool, log, clock: realClock, turn, signal: abort.signal,
      seen: (v) => {
        view = v;
        turn?.identify(v.local.id);
      },
    }, { dryRun: p.values['dry-run'], force: p.values.force, mode: 'once' });
    return exitCodeFor(r);
  } finally {
    await turn?.close();
    pool.close();
  }
}

const QUOTA_FROM: Record<string, string> = { status: 'etcd Status', metrics: 'etcd /metrics', config: 'policy.quotaBytes' };

function quotaCell(m: MemberView): string {
  if (m.quotaBytes === undefined) return 'unknown';
  return `${formatBytes(m.quotaBytes)} (${m.quotaSource === 'config' ? 'config' : 'etcd'})`;
}

function defragCell(m: MemberView): string {
  if (m.defragmenting === true) return 'yes';
  if (m.defragmenting === false) return 'no';
  return '?';
}

/** What a run would decide; nothing when the quota is unknown (a run skips then). */
function decisionOf(m: MemberView, c: LoadedConfig['config']): Decision | undefined {
  return m.status && m.quotaBytes !== undefined ? decide(m.status, c.policy, m.quotaBytes) : undefined;
}

function statusTable(view: ClusterView, loaded: LoadedConfig): string {
  const c = loaded.config;
  const rows = [['MEMBER', 'NAME', 'ENDPOINT', 'ROLE', 'DB SIZE', 'IN USE', 'FRAG', 'QUOTA', 'QUOTA USE', 'DEFRAGMENTING', 'APPLIED', 'DECISION']];
  for (const m of view.members) {
    const s = m.status;
    const role = m.isLearner ? 'learner' : s ? (s.leader === m.id ? 'leader' : 'follower') : '?';
    const d = decisionOf(m, c);
    rows.push([
      `${m.hex}${m.isLocal ? ' *' : ''}`, m.name || '-', m.endpoint, role,
      s ? formatBytes(s.dbSize) : '-', s ? formatBytes(s.dbSizeInUse) : '-',
      d ? formatPercent(d.fragmentation) : '-', quotaCell(m), d && m.quotaBytes ? formatPercent(d.quotaUsage) : '-', defragCell(m),
      s ? s.raftAppliedIndex.toString() : `unreachable: ${m.error ?? ''}`.slice(0, 60),
      m.isLearner ? 'never (learner)' : d ? (d.defrag ? 'defragment' : 'not needed') : '-',
    ]);
  }
  const widths = rows[0]!.map((_, i) => Math.max(...rows.map((r) => r[i]!.length)));
  const lines = rows.map((r) => r.map((cell, i) => cell.padEnd(widths[i]!)).join('  ').trimEnd());
  lines.push('', `alarms: ${view.alarms.length ? view.alarms.map((a) => `${a.alarm} on ${hexId(a.memberId)}`).join(', ') : 'none'}`);
  const gate = healthGate(view, c);
  lines.push(`health: ${gate ? `not safe to defragment: ${gate.reason}` : 'ok'}`);
  for (const m of view.members) {
    const warning = quotaMismatch(m) ?? (m.quotaBytes === undefined && m.status ? m.quotaError : undefined);
    if (warning) lines.push(`warning: ${warning}`);
  }
  lines.push('(* = the local member, from etcd.endpoint; QUOTA: etcd = the member\'s own --quota-backend-bytes, config = policy.quotaBytes;',
    ' DEFRAGMENTING: etcd_disk_defrag_inflight from the member\'s /metrics, ? = could not be read)');
  return lines.join('\n');
}

function statusJson(view: ClusterView, loaded: LoadedConfig): unknown {
  return {
    local: view.local.hex,
    alarms: view.alarms.map((a) => ({ member: hexId(a.memberId), alarm: a.alarm })),
    health: healthGate(view, loaded.config) ?? null,
    members: view.members.map((m) => ({
      id: m.hex, name: m.name, endpoint: m.endpoint, local: m.isLocal, learner: m.isLearner, error: m.error ?? null,
      quota: {
        bytes: m.quotaBytes ?? null,
        source: m.quotaSource ?? null,
        sourceDetail: m.quotaSource ? QUOTA_FROM[m.quotaSource] : null,
        etcdBytes: m.etcdQuotaBytes ?? null,
        warning: quotaMismatch(m) ?? (m.quotaBytes === undefined ? m.quotaError ?? null : null),
      },
      defragmenting: m.defragmenting ?? null,
      metricsError: m.metricsError ?? null,
      status: m.status ? { ...m.status, raftIndex: m.status.raftIndex.toString(), raftAppliedIndex: m.status.raftAppliedIndex.toString(), raftTerm: m.status.raftTerm.toString(), revision: m.status.revision.toString(), leader: hexId(m.status.leader), memberId: m.hex } : null,
      decision: decisionOf(m, loaded.config) ?? null,
    })),
  };
}

async function status(loaded: LoadedConfig, log: Log, p: Parsed): Promise<number> {
  const pool = new ClientPool(accessFromConfig(loaded.config));
  try {
    const view = await inspect(pool, loaded.config.etcd.endpoint, { log }, { memberAttempts: 1, readKey: `${loaded.config.coordination.prefix}health`, quotaBytes: loaded.config.policy.quotaBytes });
    if (p.values.json) process.stdout.write(`${JSON.stringify(statusJson(view, loaded), null, 2)}\n`);
    else process.stdout.write(`${statusTable(view, loaded)}\n`);
    return EXIT.ok;
  } finally {
    pool.close();
  }
}

/** ExecStartPre=+, ExecReload=+ and etcd-defragd-tls.timer: root copies the files for the sandboxed service. */
function stageTls(loaded: LoadedConfig, log: Log, runtimeDir: string): number {
  if (!existsSync(runtimeDir)) {
    log.debug({ event: 'tls.stage.skip', runtimeDir }, `${runtimeDir} does not exist (the service is not running): nothing to stage`);
    return EXIT.ok;
  }
  try {
    const r = stageTlsFiles(loaded.config, runtimeDir, loaded.path);
    if (r.written.length || r.removed.length) {
      log.info({ event: 'tls.stage', runtimeDir, written: r.written.join(','), removed: r.removed.join(',') }, `staged ${[...r.written, ...r.removed.map((c) => `-${c}`)].join(', ')} for the service from the paths in ${loaded.path ?? 'the defaults'}`);
    }
    return EXIT.ok;
  } catch (err) {
    if (err instanceof ConfigError) {
      log.error({ event: 'tls.stage.fail', code: 'EDD_CONFIG', error: err.message }, `EDD_CONFIG: ${err.message}`);
      return EXIT.config;
    }
    throw err;
  }
}

async function run(loaded: LoadedConfig, log: Log, p: Parsed, env: NodeJS.ProcessEnv): Promise<number> {
  const daemon = new Daemon(loaded.config, { log, clock: realClock, loadOptions: loadOptions(p, env) });
  let signals = 0;
  const stopped = new Promise<void>((resolve) => {
    const onStop = (sig: string) => {
      signals++;
      if (signals > 1) {
        log.warn({ event: 'daemon.exit', signal: sig }, `second ${sig}: exiting now`);
        process.exit(EXIT.failed);
      }
      log.info({ event: 'daemon.signal', signal: sig }, `${sig} received: stopping`);
      void daemon.stop().then(resolve);
    };
    process.on('SIGTERM', () => onStop('SIGTERM'));
    process.on('SIGINT', () => onStop('SIGINT'));
  });
  process.on('SIGHUP', () => {
    log.info({ event: 'daemon.signal', signal: 'SIGHUP' }, 'SIGHUP received: reloading the config');
    daemon.reload();
  });
  // A bug must not leave a daemon running half-broken: log it and exit 1, systemd restarts us.
  process.on('unhandledRejection', (err) => {
    log.fatal({ event: 'crash', err }, `unexpected error: ${errorMessage(err)}`);
    process.exit(EXIT.failed);
  });
  await daemon.start();
  await stopped;
  return EXIT.ok;
}

export async function main(argv: string[], env: NodeJS.ProcessEnv = process.env): Promise<number> {
  let p: Parsed;
  try {
    p = parse(argv);
  } catch (err) {
    process.stderr.write(`etcd-defragd: ${errorMessage(err)}\n`);
    return EXIT.usage;
  }
  if (p.values.help) {
    process.stdout.write(`${HELP}\n`);
    return EXIT.ok;
  }
  if (p.values.version) {
    process.stdout.write(`etcd-defragd ${version()}\n`);
    return EXIT.ok;
  }
  let loaded: LoadedConfig;
  try {
    // stage-tls copies the files the config names, so it must not see the copies themselves.
    const { CREDENTIALS_DIRECTORY: _c, RUNTIME_DIRECTORY: _r, ...unstaged } = env;
    loaded = loadConfig(p.command === 'stage-tls' ? { ...loadOptions(p, unstaged), checkFiles: false } : loadOptions(p, env));
  } catch (err) {
    if (err instanceof UsageError) {
      process.stderr.write(`etcd-defragd: ${err.message}\n`);
      return EXIT.usage;
    }
    if (err instanceof ConfigError) {
      process.stderr.write(`etcd-defragd: config error: ${err.message}\n`);
      return EXIT.config;
    }
    throw err;
  }
  if (p.command === 'check-config') {
    for (const w of loaded.warnings) process.stderr.write(`etcd-defragd: warning: ${w}\n`);
    process.stdout.write(`# config ${loaded.path ?? '(no file: defaults and environment)'} is valid\n${describeConfig(loaded)}\n`);
    return EXIT.ok;
  }
  // gRPC's own logging is muted unless debugging: its messages repeat ours with less context.
  if (loaded.config.log.level !== 'trace' && loaded.config.log.level !== 'debug') env.GRPC_VERBOSITY ??= 'NONE';
  const log = createLogger({ level: loaded.config.log.level, format: loaded.config.log.format, env });
  // stage-tls runs right before `run` at every start: the warnings are run's to tell.
  if (p.command !== 'stage-tls') for (const w of loaded.warnings) log.warn({ event: 'config.warning' }, `config: ${w}`);
  try {
    if (p.command === 'stage-tls') return stageTls(loaded, log, p.values['runtime-dir'] ?? env.RUNTIME_DIRECTORY?.split(':')[0] ?? '/run/etcd-defragd');
    if (p.command === 'once') return await once(loaded, log, p);
    if (p.command === 'status') return await status(loaded, log, p);
    return await run(loaded, log, p, env);
  } catch (err) {
    if (err instanceof DefragdError) {
      log.error({ event: 'error', code: err.code, error: err.message }, `${err.code}: ${err.message}`);
      return err.permanent ? EXIT.failed : EXIT.skipped;
    }
    log.fatal({ event: 'crash', err }, `unexpected error: ${errorMessage(err)}`);
    return EXIT.failed;
  }
}

muteIpServernameWarning();

main(process.argv.slice(2)).then((code) => {
  // Let stdout drain before exiting (pino writes synchronously to a pipe, but be safe).
  process.exitCode = code;
  setTimeout(() => process.exit(code), 50).unref();
}, (err: unknown) => {
  process.stderr.write(`etcd-defragd: unexpected error: ${err instanceof Error ? err.stack : String(err)}\n`);
  process.exit(EXIT.failed);
});
