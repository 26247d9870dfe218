#!/usr/bin/env node
// Thin entry: parse the command line, load the config, call the core, map the result to an exit code.
import { existsSync } from 'node:fs';
import { hostname } from 'node:os';
import { parseArgs } from 'node:util';
import { checkDataDir, describeConfig, loadConfig, type LoadOptions, type LoadedConfig } from './config.ts';
import { Daemon } from './daemon.ts';
import { clusterControl, clusterHalt, describeClusterControl, disarm, pause, resume } from './ops.ts';
import { describeVersionNotes, versionNotes } from './etcd-versions.ts';
import { accessFromConfig, ClientPool } from './etcd.ts';
import { ConfigError, DefragdError, EXIT, UsageError, errorMessage } from './errors.ts';
import { inspect } from './inspect.ts';
import { PRIORITY, consoleText, createLogger, isJournalStream, printable, printableJson, withPriority, type Log } from './log.ts';
import { realClock } from './clock.ts';
import { exitCodeFor, run } from './run.ts';
import { decide, healthGate, quotaMismatch, type Decision } from './policy.ts';
import { LAYOUTS, layoutConfig, type Layout } from './layouts.ts';
import { hexId, type ClusterView, type MemberView } from './view.ts';
import { stageTlsFiles } from './tls-files.ts';
import { fileLock } from './node-lock.ts';
import { Turn } from './turn.ts';
import { parseDepth, scanUsage, usageJson, usageText } from './usage.ts';
import { ListenError } from './metrics.ts';
import { formatBytes, formatDuration, formatPercent } from './units.ts';
import { TREND_FRESH_MS, type TrendRecord } from './trend.ts';
import { versionLine } from './version.ts';
import { muteIpServernameWarning } from './warnings.ts';

const HELP = `etcd-defragd - defragments the local etcd member, one member at a time across the cluster

Usage:
  etcd-defragd [run]          run as a daemon: scheduled runs, NOSPACE recovery, metrics; forecasts
                              the quota (forecast.*), watches compaction and compacts when nothing
                              else does (compaction.*), skips a defragment predicted to outlast
                              policy.maxDefragDuration
  etcd-defragd once           one gated run now (exit 0 done or not needed, 75 skipped, 1 failed)
      --dry-run               decide and report, change nothing
      --force                 defragment even when not needed (policy.force); the only
                              voting member of a cluster still needs policy.singleMember
  etcd-defragd status         show the cluster as etcd-defragd sees it: sizes, each member's
                              quota (from etcd), whether it is defragmenting now, and when its
                              db reaches the quota (TO QUOTA, from the daemon on that member)
      --json                  as JSON
  etcd-defragd usage          what fills etcd: key prefixes by key count and live bytes
                              (key + value), largest first, with churn (versions, recent writes);
                              Kubernetes keys by resource (/registry/[<group>/]<resource>/).
                              Reads every key from a voting follower where one answers,
                              serializable, in pages of up to 1000 keys (about 4 MiB) with 100ms
                              between pages: at most 10 pages/s, about 40 MiB/s
      --json                  as JSON: {"prefixes": [{"prefix", "keys", "bytes", ...}], ...}
      --depth N               other keys: by their first N path segments (1-16, default 2)
  etcd-defragd check-config   validate the config and print the effective values; also checks
                              that etcd.dataDir holds an etcd member (member/snap)
  etcd-defragd init-config    print a short config.yaml for a control-plane layout
      --layout LAYOUT         kubeadm | rke2 | k3s | kubespray (TLS paths and data dir)
  etcd-defragd pause          pause defragmentation on every node (a key in etcd; not during NOSPACE)
      --reason TEXT           why, shown by status
  etcd-defragd resume         lift a pause
      --integrity-checked     also clear the halt after an integrity mismatch, once the members are checked
  etcd-defragd disarm         disarm NOSPACE by hand: says why the automatic disarm refused
      --force                 disarm even so (etcd raises it again while a member is over its quota)
  etcd-defragd stage-tls      (systemd, as root) copy the TLS files the config names into the
                              service's runtime directory
      --runtime-dir DIR       default $RUNTIME_DIRECTORY, else /run/etcd-defragd

Options:
  --config PATH               config file (default /etc/etcd-defragd/config.yaml, env ETCD_DEFRAGD_CONFIG)
  --endpoint URL              etcd.endpoint
  --log-format FORMAT         auto | journal | json | pretty
  --log-level LEVEL           trace | debug | info | warn | error | fatal | silent
  --set KEY=VALUE             set any config key, e.g. --set coordination.maxWait=5m (repeatable)
  -h, --help                  this help
  --version                   print the version, the commit it was built from and the Node.js inside

Every key can also be set with ETCD_DEFRAGD_<SECTION>_<KEY>, e.g. ETCD_DEFRAGD_SCHEDULE_CRON.
Precedence: defaults < file < environment < flags. Exit codes: 0 ok, 1 failed, 64 usage,
75 skipped (not safe now), 78 configuration error.`;

const COMMANDS = ['run', 'once', 'status', 'usage', 'check-config', 'init-config', 'pause', 'resume', 'disarm', 'stage-tls'] as const;
type Command = (typeof COMMANDS)[number];

interface Parsed {
  command: Command;
  values: {
    config?: string;
    'runtime-dir'?: string;
    endpoint?: string;
    'log-format'?: string;
    'log-level'?: string;
    set?: string[];
    'dry-run'?: boolean;
    force?: boolean;
    json?: boolean;
    depth?: string;
    help?: boolean;
    version?: boolean;
    reason?: string;
    'integrity-checked'?: boolean;
    layout?: string;
  };
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
        depth: { type: 'string' },
        reason: { type: 'string' },
        'integrity-checked': { type: 'boolean' },
        layout: { type: 'string' },
        help: { type: 'boolean', short: 'h' },
        version: { type: 'boolean' },
      },
    });
  } catch (err) {
    throw new UsageError(`${errorMessage(err)} (see etcd-defragd --help)`);
  }
  const [cmd = 'run', ...extra] = parsed.positionals;
  if (!COMMANDS.includes(cmd as Command))
    throw new UsageError(`unknown command "${cmd}"; commands: ${COMMANDS.join(', ')} (see etcd-defragd --help)`);
  if (extra.length) throw new UsageError(`unexpected argument "${extra[0]}" (see etcd-defragd --help)`);
  const command = cmd as Command;
  if (parsed.values['dry-run'] && command !== 'once') throw new UsageError('--dry-run goes with the once command');
  if (parsed.values.force && command !== 'once' && command !== 'disarm')
    throw new UsageError('--force goes with the once and disarm commands');
  if (parsed.values.reason !== undefined && command !== 'pause') throw new UsageError('--reason goes with the pause command');
  if (parsed.values['integrity-checked'] && command !== 'resume') throw new UsageError('--integrity-checked goes with the resume command');
  if (parsed.values.json && command !== 'status' && command !== 'usage')
    throw new UsageError('--json goes with the status and usage commands');
  if (parsed.values.depth !== undefined && command !== 'usage') throw new UsageError('--depth goes with the usage command');
  if (command === 'usage') parseDepth(parsed.values.depth);
  if (parsed.values['runtime-dir'] !== undefined && command !== 'stage-tls')
    throw new UsageError('--runtime-dir goes with the stage-tls command');
  if (parsed.values.layout !== undefined && command !== 'init-config') throw new UsageError('--layout goes with the init-config command');
  if (command === 'init-config' && !LAYOUTS.includes(parsed.values.layout as Layout))
    throw new UsageError(
      `init-config --layout: ${JSON.stringify(parsed.values.layout ?? '')} is not a layout; accepted: ${LAYOUTS.join(', ')}` +
        ' (OpenShift: do not install, its cluster-etcd-operator defragments already)',
    );
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

async function once(loaded: LoadedConfig, log: Log, p: Parsed): Promise<number> {
  const c = loaded.config;
  const pool = new ClientPool(accessFromConfig(c));
  const turn = p.values['dry-run']
    ? undefined
    : new Turn(
        { prefix: c.coordination.prefix, leaseTTL: c.coordination.leaseTTL, command: 'etcd-defragd once' },
        { pool, endpoint: c.etcd.endpoint, log, clock: realClock },
      );
  const abort = new AbortController();
  const onSignal = () => abort.abort();
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);
  try {
    const r = await run(
      {
        config: c,
        pool,
        log,
        clock: realClock,
        turn,
        signal: abort.signal,
        nodeLock: fileLock(),
        onInspected: (v) => turn?.identify(v.local.id),
      },
      { dryRun: p.values['dry-run'], force: p.values.force, mode: 'once' },
    );
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

/** A daemon's forecast as status shows it: '-' without a daemon's record, '?' when the record is old. */
function forecastCell(t: TrendRecord | undefined, now: number): string {
  if (!t) return '-';
  if (now - t.at > TREND_FRESH_MS) return '? (old)';
  if (!t.forecast) return 'learning';
  if (t.forecast.seconds === null) return 'not growing';
  return `${formatDuration(t.forecast.seconds * 1000)} (${t.forecast.basis === 'file' ? 'file' : 'in use'})`;
}

function trendJson(t: TrendRecord | undefined, now: number) {
  if (!t) return { forecast: null, compaction: null };
  const meta = { at: new Date(t.at).toISOString(), fresh: now - t.at <= TREND_FRESH_MS };
  return { forecast: t.forecast && { ...t.forecast, ...meta }, compaction: t.compaction && { ...t.compaction, ...meta } };
}

function statusTable(view: ClusterView, loaded: LoadedConfig, trends: Record<string, TrendRecord>): string {
  const now = Date.now();
  const c = loaded.config;
  const rows = [
    [
      'MEMBER',
      'NAME',
      'ENDPOINT',
      'ROLE',
      'ETCD',
      'DB SIZE',
      'IN USE',
      'FRAG',
      'QUOTA',
      'QUOTA USE',
      'DEFRAGMENTING',
      'APPLIED',
      'DECISION',
      'TO QUOTA',
    ],
  ];
  for (const m of view.members) {
    const s = m.status;
    const role = m.isLearner ? 'learner' : s ? (s.leader === m.id ? 'leader' : 'follower') : '?';
    const d = decisionOf(m, c);
    rows.push([
      `${m.hex}${m.isLocal ? ' *' : ''}`,
      m.name || '-',
      m.endpoint,
      role,
      s?.version ?? '-',
      s ? formatBytes(s.dbSize) : '-',
      s ? formatBytes(s.dbSizeInUse) : '-',
      d ? formatPercent(d.fragmentation) : '-',
      quotaCell(m),
      d && m.quotaBytes ? formatPercent(d.quotaUsage) : '-',
      defragCell(m),
      s ? s.raftAppliedIndex.toString() : `unreachable: ${m.error ?? ''}`.slice(0, 60),
      m.isLearner ? 'never (learner)' : d ? (d.defrag ? 'defragment' : 'not needed') : '-',
      forecastCell(trends[m.hex], now),
    ]);
  }
  // Names, URLs and errors come from etcd: escaped before they are measured and printed.
  for (const r of rows) r.forEach((cell, i) => (r[i] = printable(cell)));
  const widths = rows[0]!.map((_, i) => Math.max(...rows.map((r) => r[i]!.length)));
  const lines = rows.map((r) =>
    r
      .map((cell, i) => cell.padEnd(widths[i]!))
      .join('  ')
      .trimEnd(),
  );
  lines.push('', `alarms: ${view.alarms.length ? view.alarms.map((a) => `${a.alarm} on ${hexId(a.memberId)}`).join(', ') : 'none'}`);
  const gate = healthGate(view, c);
  lines.push(`health: ${gate ? `not safe to defragment: ${gate.reason}` : 'ok'}`);
  for (const m of view.members) {
    const warning = quotaMismatch(m) ?? (m.quotaBytes === undefined && m.status ? m.quotaError : undefined);
    if (warning) lines.push(`warning: ${warning}`);
    if (m.status) for (const note of describeVersionNotes(m.hex, m.status.version)) lines.push(`warning: ${note}`);
    const compaction = trends[m.hex]?.compaction;
    if (compaction?.stale)
      lines.push(
        `warning: member ${m.hex}: nothing compacted the history for ${formatDuration(compaction.ageSeconds * 1000)} ` +
          `(${compaction.historyRevisions} revisions kept); check the API server's --etcd-compaction-interval and etcd's --auto-compaction-*`,
      );
  }
  lines.push(
    "(* = the local member, from etcd.endpoint; QUOTA: etcd = the member's own --quota-backend-bytes, config = policy.quotaBytes;",
    " DEFRAGMENTING: etcd_disk_defrag_inflight from the member's /metrics, ? = could not be read;",
    ' TO QUOTA: when the db reaches the quota at its growth over forecast.window, from the daemon on that member)',
  );
  return lines.map(printable).join('\n');
}

function statusJson(view: ClusterView, loaded: LoadedConfig, trends: Record<string, TrendRecord>): unknown {
  const now = Date.now();
  return {
    local: view.local.hex,
    alarms: view.alarms.map((a) => ({ member: hexId(a.memberId), alarm: a.alarm })),
    health: healthGate(view, loaded.config) ?? null,
    members: view.members.map((m) => ({
      id: m.hex,
      name: m.name,
      endpoint: m.endpoint,
      local: m.isLocal,
      learner: m.isLearner,
      error: m.error ?? null,
      quota: {
        bytes: m.quotaBytes ?? null,
        source: m.quotaSource ?? null,
        sourceDetail: m.quotaSource ? QUOTA_FROM[m.quotaSource] : null,
        etcdBytes: m.etcdQuotaBytes ?? null,
        warning: quotaMismatch(m) ?? (m.quotaBytes === undefined ? (m.quotaError ?? null) : null),
      },
      defragmenting: m.defragmenting ?? null,
      metricsError: m.metricsError ?? null,
      etcdVersion: m.status?.version ?? null,
      etcdNotes: m.status ? versionNotes(m.status.version).map((n) => ({ id: n.id, fixedIn: n.fixedIn, what: n.what })) : [],
      status: m.status
        ? {
            ...m.status,
            raftIndex: m.status.raftIndex.toString(),
            raftAppliedIndex: m.status.raftAppliedIndex.toString(),
            raftTerm: m.status.raftTerm.toString(),
            revision: m.status.revision.toString(),
            leader: hexId(m.status.leader),
            memberId: m.hex,
          }
        : null,
      decision: decisionOf(m, loaded.config) ?? null,
      ...trendJson(trends[m.hex], now),
    })),
  };
}

async function status(loaded: LoadedConfig, log: Log, p: Parsed): Promise<number> {
  const pool = new ClientPool(accessFromConfig(loaded.config));
  try {
    let view: ClusterView;
    try {
      view = await inspect(
        pool,
        loaded.config.etcd.endpoint,
        { log },
        { memberAttempts: 1, readKey: `${loaded.config.coordination.prefix}health`, quotaBytes: loaded.config.policy.quotaBytes },
      );
    } catch (err) {
      // `status --json | jq` must still parse: the failure as JSON on stdout, the log line on stderr.
      if (p.values.json) {
        const code = err instanceof DefragdError ? err.code : 'EDD_UNEXPECTED';
        writeOut(
          `${printableJson(JSON.stringify({ endpoint: loaded.config.etcd.endpoint, error: { code, message: errorMessage(err) } }, null, 2))}\n`,
        );
      }
      throw err;
    }
    const cc = await clusterControl({ config: loaded.config, pool, log });
    if (p.values.json) {
      const control = {
        nextRun: cc.nextRun ?? null,
        turn: { holder: cc.holder ?? null, participants: cc.participants },
        pause: cc.pause ?? null,
        halt: clusterHalt(cc) ?? null,
        readErrors: cc.errors,
      };
      writeOut(`${printableJson(JSON.stringify({ ...(statusJson(view, loaded, cc.trends) as object), ...control }, null, 2))}\n`);
    } else {
      writeOut(`${statusTable(view, loaded, cc.trends)}\n${describeClusterControl(cc).join('\n')}\n`);
    }
    return EXIT.ok;
  } finally {
    pool.close();
  }
}

/** What fills etcd (src/usage.ts); like status, a failure under --json is JSON on stdout too. */
async function usage(loaded: LoadedConfig, log: Log, p: Parsed): Promise<number> {
  const c = loaded.config;
  const pool = new ClientPool(accessFromConfig(c));
  try {
    let report;
    try {
      report = await scanUsage(
        { pool, endpoint: c.etcd.endpoint, log, clock: realClock, probeTimeoutMs: c.etcd.requestTimeout },
        { depth: parseDepth(p.values.depth) },
      );
    } catch (err) {
      if (p.values.json) {
        const code = err instanceof DefragdError ? err.code : 'EDD_UNEXPECTED';
        writeOut(`${printableJson(JSON.stringify({ endpoint: c.etcd.endpoint, error: { code, message: errorMessage(err) } }, null, 2))}\n`);
      }
      throw err;
    }
    if (p.values.json) writeOut(`${printableJson(JSON.stringify(usageJson(report), null, 2))}\n`);
    else writeOut(`${usageText(report).split('\n').map(printable).join('\n')}\n`);
    return EXIT.ok;
  } finally {
    pool.close();
  }
}

/** pause, resume, disarm: cluster-wide actions through the local member (src/ops.ts). */
async function operate(loaded: LoadedConfig, log: Log, p: Parsed): Promise<number> {
  const pool = new ClientPool(accessFromConfig(loaded.config));
  try {
    const deps = { config: loaded.config, pool, log };
    const r =
      p.command === 'pause'
        ? await pause(deps, p.values.reason ?? '')
        : p.command === 'resume'
          ? await resume(deps, { integrityChecked: Boolean(p.values['integrity-checked']) })
          : await disarm(deps, { force: Boolean(p.values.force) });
    // It quotes the pause, the halt and members from etcd: one printable line each.
    writeOut(
      r.out
        .split('\n')
        .map((l) => printable(l))
        .join('\n'),
    );
    return r.code;
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
    if (r.replaced.length) {
      // Only the service's own user can put something there: worth a look, but nothing was followed.
      log.warn(
        { event: 'tls.stage.replaced', runtimeDir, replaced: r.replaced.join(',') },
        `removed what stood in place of ${r.replaced.join(', ')} in ${runtimeDir} (not a plain folder; nothing it pointed to was touched)`,
      );
    }
    if (r.written.length || r.removed.length) {
      log.info(
        { event: 'tls.stage', runtimeDir, written: r.written.join(','), removed: r.removed.join(',') },
        `staged ${[...r.written, ...r.removed.map((file) => `-${file}`)].join(', ')} for the service ` +
          `from the paths in ${loaded.path ?? 'the defaults'}`,
      );
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

async function runDaemon(loaded: LoadedConfig, log: Log, p: Parsed, env: NodeJS.ProcessEnv): Promise<number> {
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
  // A documented debug trigger (docs/operations.md): crash exactly as a bug would, through the same
  // uncaught-exception path, to check that a crash reaches the journal with its stack and that
  // systemd restarts the unit. Node's default for SIGQUIT would end the process without a word.
  process.on('SIGQUIT', () =>
    setImmediate(() => {
      throw new Error('SIGQUIT received: crashing on purpose to test crash reporting (docs/operations.md)');
    }),
  );
  await daemon.start();
  await stopped;
  return EXIT.ok;
}

/**
 * Machine output (status, check-config, help) goes to stdout, logs to stderr. When stdout itself is
 * the journal (e.g. `ExecStartPre=etcd-defragd check-config`), each line is stored at info.
 */
function writeOut(text: string): void {
  process.stdout.write(isJournalStream(1, process.env) ? withPriority(PRIORITY.info, text) : text);
}

/** Set once the logger exists: crashes and Node's warnings then go through it. */
let processLog: Log | undefined;

/** A bug must not leave a process running half-broken: log it with its stack, exit 1 (systemd restarts a daemon). */
function crash(err: unknown): never {
  if (processLog) processLog.fatal({ event: 'crash', err }, `unexpected error: ${errorMessage(err)}`);
  else
    process.stderr.write(
      consoleText(process.env, PRIORITY.crit, `etcd-defragd: unexpected error: ${err instanceof Error ? err.stack : String(err)}`),
    );
  process.exit(EXIT.failed);
}

/**
 * Node prints its warnings itself, unprefixed on stderr, which journald would store at the unit's
 * SyslogLevel; they go through the logger instead, at warning level with the warning's code.
 */
function routeProcessEvents(): void {
  process.on('uncaughtException', crash);
  process.on('unhandledRejection', crash);
  process.removeAllListeners('warning');
  process.on('warning', (w: Error & { code?: string }) => {
    if (processLog) processLog.warn({ event: 'node.warning', name: w.name, code: w.code }, `Node.js ${w.name}: ${w.message}`);
    else process.stderr.write(consoleText(process.env, PRIORITY.warning, `etcd-defragd: Node.js ${w.name}: ${w.message}`));
  });
}

export async function main(argv: string[], env: NodeJS.ProcessEnv = process.env): Promise<number> {
  let p: Parsed;
  try {
    p = parse(argv);
  } catch (err) {
    process.stderr.write(consoleText(env, PRIORITY.err, `etcd-defragd: ${errorMessage(err)}`));
    return EXIT.usage;
  }
  if (p.values.help) {
    writeOut(`${HELP}\n`);
    return EXIT.ok;
  }
  if (p.values.version) {
    writeOut(`etcd-defragd ${versionLine()}\n`);
    return EXIT.ok;
  }
  if (p.command === 'init-config') {
    writeOut(layoutConfig(p.values.layout as Layout, hostname().split('.')[0]!));
    return EXIT.ok;
  }
  let loaded: LoadedConfig;
  try {
    // stage-tls copies the files the config names, so it must not see the copies themselves.
    const { CREDENTIALS_DIRECTORY: _c, RUNTIME_DIRECTORY: _r, ...unstaged } = env;
    loaded = loadConfig(p.command === 'stage-tls' ? { ...loadOptions(p, unstaged), checkFiles: false } : loadOptions(p, env));
  } catch (err) {
    if (err instanceof UsageError) {
      process.stderr.write(consoleText(env, PRIORITY.err, `etcd-defragd: ${err.message}`));
      return EXIT.usage;
    }
    if (err instanceof ConfigError) {
      process.stderr.write(consoleText(env, PRIORITY.err, `etcd-defragd: config error: ${err.message}`));
      return EXIT.config;
    }
    throw err;
  }
  if (p.command === 'check-config') {
    try {
      checkDataDir(loaded);
    } catch (err) {
      if (!(err instanceof ConfigError)) throw err;
      process.stderr.write(consoleText(env, PRIORITY.err, `etcd-defragd: config error: ${err.message}`));
      return EXIT.config;
    }
    for (const w of loaded.warnings) process.stderr.write(consoleText(env, PRIORITY.warning, `etcd-defragd: warning: ${w}`));
    writeOut(`# config ${loaded.path ?? '(no file: defaults and environment)'} is valid\n${describeConfig(loaded)}\n`);
    return EXIT.ok;
  }
  // gRPC's own logging is muted unless debugging: its messages repeat ours with less context.
  if (loaded.config.log.level !== 'trace' && loaded.config.log.level !== 'debug') env.GRPC_VERBOSITY ??= 'NONE';
  const log = createLogger({ level: loaded.config.log.level, format: loaded.config.log.format, env });
  processLog = log;
  // stage-tls runs right before `run` at every start: the warnings are run's to tell.
  if (p.command !== 'stage-tls') for (const w of loaded.warnings) log.warn({ event: 'config.warning' }, `config: ${w}`);
  try {
    if (p.command === 'stage-tls')
      return stageTls(loaded, log, p.values['runtime-dir'] ?? env.RUNTIME_DIRECTORY?.split(':')[0] ?? '/run/etcd-defragd');
    if (p.command === 'once') return await once(loaded, log, p);
    if (p.command === 'status') return await status(loaded, log, p);
    if (p.command === 'usage') return await usage(loaded, log, p);
    if (p.command === 'pause' || p.command === 'resume' || p.command === 'disarm') return await operate(loaded, log, p);
    return await runDaemon(loaded, log, p, env);
  } catch (err) {
    if (err instanceof DefragdError) {
      log.error({ event: 'error', code: err.code, error: err.message }, `${err.code}: ${err.message}`);
      if (err instanceof ListenError) return err.retryable ? EXIT.failed : EXIT.config;
      if (err instanceof ConfigError) return EXIT.config;
      return err.permanent ? EXIT.failed : EXIT.skipped;
    }
    log.fatal({ event: 'crash', err }, `unexpected error: ${errorMessage(err)}`);
    return EXIT.failed;
  }
}

muteIpServernameWarning();
routeProcessEvents();

main(process.argv.slice(2)).then((code) => {
  // Let stdout drain before exiting (pino writes synchronously to a pipe, but be safe).
  process.exitCode = code;
  setTimeout(() => process.exit(code), 50).unref();
}, crash);
