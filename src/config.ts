// The one configuration module: schema with defaults, loading (file -> environment -> flags ->
// systemd credentials), validation with errors that name the key, the value, what is accepted and
// where it came from. The schema and the merge are our own: convict (6.2.5) could not name the file
// or the source of a bad value, and reported all failures as one joined string.
import { X509Certificate, createPrivateKey } from 'node:crypto';
import { readFileSync, statSync, accessSync, constants as fsConstants } from 'node:fs';
import { join } from 'node:path';
import { validateDetailed } from 'node-cron';
import { parse as parseYaml, YAMLParseError } from 'yaml';
import { ConfigError } from './errors.ts';
import { readTrustedFile } from './trust.ts';
import { DURATION_ACCEPTED, SIZE_ACCEPTED, parseDuration, parseSize } from './units.ts';

export const DEFAULT_CONFIG_PATH = '/etc/etcd-defragd/config.yaml';

export interface Config {
  etcd: {
    endpoint: string;
    caFile: string;
    certFile: string;
    keyFile: string;
    username: string;
    passwordFile: string;
    dataDir: string;
    requestTimeout: number;
    defragTimeout: number;
  };
  schedule: { cron: string; timezone: string; runOnStart: boolean };
  policy: {
    force: boolean;
    minFragmentation: number;
    minReclaimable: number;
    /** 'auto': each member's own --quota-backend-bytes, read from etcd. */
    quotaBytes: number | 'auto';
    /** Defragment a cluster's only voting member on schedule / `once` (stops the API server meanwhile). */
    singleMember: boolean;
    quotaUsageTrigger: number;
    freeDiskMargin: number;
    /** A defragment predicted to last longer is skipped (check duration); 0 never skips. */
    maxDefragDuration: number;
  };
  health: { maxRaftLag: number };
  coordination: { prefix: string; leaseTTL: number; maxWait: number; settle: number; leader: 'transfer' | 'last' };
  retry: { attempts: number; minDelay: number; maxDelay: number };
  nospace: { checkInterval: number; compact: boolean; keepHistory: number; compactTimeout: number; disarm: boolean; disarmBelow: number };
  forecast: { window: number; minSpan: number; warnBefore: number; defragBefore: number };
  compaction: { staleAfter: number; fallback: boolean; keepHistory: number };
  verify: { hashKV: boolean };
  metrics: { listen: string; textfile: string };
  log: { level: LogLevel; format: LogFormat };
}

export const LOG_LEVELS = ['trace', 'debug', 'info', 'warn', 'error', 'fatal', 'silent'] as const;
export type LogLevel = (typeof LOG_LEVELS)[number];
export const LOG_FORMATS = ['auto', 'journal', 'json', 'pretty'] as const;
export type LogFormat = (typeof LOG_FORMATS)[number];

/** How a key's raw value (from YAML, an env var or a flag) is checked and converted. */
interface Kind {
  accepted: string;
  parse(raw: unknown): { value: unknown } | { error: string };
}

const ok = (value: unknown) => ({ value });
const bad = (error: string) => ({ error });

// Node timers overflow past 2^31-1 ms (about 24.8 days) and then fire at once.
const MAX_DURATION = 2 ** 31 - 1;

const duration = (min = 1): Kind => ({
  accepted: `${min > 0 ? 'a positive' : 'a'} ${DURATION_ACCEPTED}, at most 24d`,
  parse(raw) {
    if (typeof raw === 'string' && raw.trim().startsWith('-')) return bad('is negative');
    if (typeof raw === 'number' && raw < 0) return bad('is negative');
    const ms = parseDuration(raw);
    if (ms === undefined) return bad('is not a duration');
    if (ms < min) return bad(min > 1 ? `is below the minimum of ${min}ms` : min > 0 ? 'must be greater than zero' : 'is too small');
    if (ms > MAX_DURATION) return bad('is too long');
    return ok(ms);
  },
});

const size = (min = 0): Kind => ({
  accepted: min > 0 ? `${SIZE_ACCEPTED}, above zero` : SIZE_ACCEPTED,
  parse(raw) {
    if (typeof raw === 'string' && raw.trim().startsWith('-')) return bad('is negative');
    const bytes = parseSize(raw);
    if (bytes !== undefined) return bytes < min ? bad('must be above zero') : ok(bytes);
    const unit = typeof raw === 'string' ? raw.trim().match(/^\d+(?:\.\d+)?\s*([A-Za-z]+)$/)?.[1] : undefined;
    return bad(unit ? `has an unknown unit "${unit}"` : 'is not a size');
  },
});

/** A size, or `auto`: the value is read from etcd. */
const sizeOrAuto = (min = 0): Kind => ({
  accepted: `auto (read each member's --quota-backend-bytes from etcd), or ${size(min).accepted}`,
  parse(raw) {
    if (raw === 'auto') return ok('auto');
    return size(min).parse(raw);
  },
});

const ratio = (opts: { zero: boolean }): Kind => ({
  accepted: opts.zero ? 'a number from 0 to 1 (e.g. 0.3)' : 'a number above 0, at most 1 (e.g. 0.8)',
  parse(raw) {
    const n = typeof raw === 'string' && raw.trim() !== '' ? Number(raw) : raw;
    if (typeof n !== 'number' || !Number.isFinite(n)) return bad('is not a number');
    if (n > 1) return bad('is above 1');
    if (n < 0 || (!opts.zero && n === 0)) return bad(n < 0 ? 'is negative' : 'must be above 0');
    return ok(n);
  },
});

const integer = (min: number, max = Number.MAX_SAFE_INTEGER): Kind => ({
  accepted: `a whole number from ${min} to ${max === Number.MAX_SAFE_INTEGER ? 'any' : max}`,
  parse(raw) {
    const n = typeof raw === 'string' && /^-?\d+$/.test(raw.trim()) ? Number(raw) : raw;
    if (typeof n !== 'number' || !Number.isSafeInteger(n)) return bad('is not a whole number');
    if (n < min || n > max) return bad('is out of range');
    return ok(n);
  },
});

const boolean: Kind = {
  accepted: 'true or false',
  parse(raw) {
    if (typeof raw === 'boolean') return ok(raw);
    if (raw === 'true' || raw === '1' || raw === 'yes') return ok(true);
    if (raw === 'false' || raw === '0' || raw === 'no') return ok(false);
    return bad('is not a boolean');
  },
};

const oneOf = (values: readonly string[]): Kind => ({
  accepted: `one of ${values.join(', ')}`,
  parse: (raw) => (typeof raw === 'string' && values.includes(raw) ? ok(raw) : bad('is not accepted')),
});

const text = (check?: (s: string) => string | undefined, accepted = 'a string'): Kind => ({
  accepted,
  parse(raw) {
    if (typeof raw === 'number') raw = String(raw);
    if (typeof raw !== 'string') return bad('is not a string');
    const problem = check?.(raw);
    return problem ? bad(problem) : ok(raw);
  },
});

const endpointUrl = text((s) => {
  let url: URL;
  try {
    url = new URL(s);
  } catch {
    return 'is not a URL';
  }
  if (url.protocol !== 'https:' && url.protocol !== 'http:') return `has scheme ${url.protocol.replace(':', '')}`;
  if (!url.port) return 'has no port';
  if (url.pathname !== '/' || url.search || url.hash) return 'has a path';
  if (url.username || url.password) return 'carries credentials (use etcd.username and etcd.passwordFile)';
  return undefined;
}, 'an http:// or https:// URL with host and port, e.g. https://127.0.0.1:2379');

const cron = text((s) => {
  const fields = s.trim().split(/\s+/);
  if (fields.length !== 5 && fields.length !== 6)
    return (
      'is not a cron expression (5 fields expected: minute hour day-of-month month day-of-week, ' +
      `or 6 with seconds first; got ${fields.length})`
    );
  const detail = validateDetailed(s);
  if (!detail.valid) {
    const first = detail.errors[0];
    return `is not a cron expression (${first ? `${first.field}: ${first.message}` : 'invalid'})`;
  }
  return undefined;
}, 'a 5-field cron expression, e.g. "0 */3 * * *" (6 fields: seconds first)');

const timezone = text((s) => {
  try {
    new Intl.DateTimeFormat('en-US', { timeZone: s });
    return undefined;
  } catch {
    return 'is not a time zone';
  }
}, 'an IANA time zone such as UTC or Europe/Paris');

const listen = text((s) => {
  if (s === '') return undefined;
  const m = s.match(/^(\[[0-9a-fA-F:]+\]|[^:\s]+):(\d{1,5})$/);
  if (!m || Number(m[2]) > 65535) return 'is not host:port';
  return undefined;
}, 'host:port such as 127.0.0.1:9479, or "" to disable');

const prefix = text(
  (s) => (s.startsWith('/') && s.endsWith('/') && s.length > 2 ? undefined : 'must start and end with /'),
  'a key prefix that starts and ends with /, e.g. /etcd-defragd/',
);

const path = text(undefined, 'a file path, or "" for none');

const promFile = text((s) => {
  if (s === '') return undefined;
  if (!s.startsWith('/')) return 'is not an absolute path';
  if (!s.endsWith('.prom')) return 'does not end in .prom (node_exporter reads only *.prom files)';
  return undefined;
}, 'an absolute path ending in .prom inside node_exporter\'s --collector.textfile.directory, or "" to disable');

interface KeySpec {
  default: unknown;
  kind: Kind;
  doc: string;
}

/** Every key, its default, its kind, and a one-line doc (also printed in config/etcd-defragd.yaml). */
export const SCHEMA: Record<string, Record<string, KeySpec>> = {
  etcd: {
    endpoint: { default: 'https://127.0.0.1:2379', kind: endpointUrl, doc: "this node's etcd member; http:// means no TLS" },
    caFile: { default: '/etc/kubernetes/pki/etcd/ca.crt', kind: path, doc: 'CA bundle that signed the etcd server certificates' },
    certFile: { default: '/etc/kubernetes/pki/etcd/healthcheck-client.crt', kind: path, doc: 'client certificate ("" for none)' },
    keyFile: { default: '/etc/kubernetes/pki/etcd/healthcheck-client.key', kind: path, doc: 'client key ("" for none)' },
    username: { default: '', kind: text(), doc: 'etcd auth user, optional (needs root for defrag, disarm, move-leader)' },
    passwordFile: { default: '', kind: path, doc: 'file holding the password of etcd.username' },
    dataDir: { default: '/var/lib/etcd', kind: path, doc: 'member data dir, for the free-disk check ("" skips the check)' },
    requestTimeout: { default: '10s', kind: duration(), doc: 'deadline of every request except defragment' },
    defragTimeout: { default: '10m', kind: duration(), doc: 'deadline of one defragment' },
  },
  schedule: {
    cron: { default: '0 */3 * * *', kind: cron, doc: 'when runs start (cron: minute hour day-of-month month day-of-week)' },
    timezone: { default: 'UTC', kind: timezone, doc: 'time zone of schedule.cron' },
    runOnStart: { default: false, kind: boolean, doc: 'also run once when the daemon starts' },
  },
  policy: {
    force: { default: false, kind: boolean, doc: 'defragment on every run, as the old cron did' },
    minFragmentation: { default: 0.3, kind: ratio({ zero: true }), doc: '(dbSize - dbSizeInUse) / dbSize needed to defragment' },
    minReclaimable: { default: '64MiB', kind: size(), doc: 'and at least this much to reclaim' },
    quotaBytes: {
      default: 'auto',
      kind: sizeOrAuto(1),
      doc: "auto: each member's --quota-backend-bytes, read from etcd; a size overrides it",
    },
    quotaUsageTrigger: { default: 0.8, kind: ratio({ zero: false }), doc: 'defragment anyway when dbSize / quotaBytes reaches this' },
    freeDiskMargin: { default: '256MiB', kind: size(), doc: 'free disk needed beyond the in-use size before defragmenting' },
    singleMember: { default: false, kind: boolean, doc: "defragment a cluster's only voting member (the API server stops meanwhile)" },
    maxDefragDuration: {
      default: '60s',
      kind: duration(0),
      doc: "skip a defragment predicted to take longer (kubeadm's liveness probe kills etcd after ~80s; 0: never)",
    },
  },
  health: {
    maxRaftLag: { default: 1000, kind: integer(0), doc: 'applied-index distance tolerated between members' },
  },
  coordination: {
    prefix: { default: '/etcd-defragd/', kind: prefix, doc: 'etcd key prefix for the cluster-wide turn' },
    leaseTTL: { default: '30s', kind: duration(2000), doc: 'a dead holder of the turn blocks the others this long at most' },
    maxWait: { default: '30m', kind: duration(), doc: 'how long a run waits for the turn before skipping' },
    settle: { default: '2s', kind: duration(0), doc: 'pause after a member caught up, before handing over the turn' },
    leader: {
      default: 'transfer',
      kind: oneOf(['transfer', 'last']),
      doc: 'transfer: move leadership away first; last: defragment the leader after the others',
    },
  },
  retry: {
    attempts: { default: 5, kind: integer(1, 100), doc: 'tries of a retryable request (reads, status)' },
    minDelay: { default: '500ms', kind: duration(), doc: 'first backoff delay' },
    maxDelay: { default: '30s', kind: duration(), doc: 'longest backoff delay' },
  },
  nospace: {
    checkInterval: { default: '10s', kind: duration(1000), doc: 'how often the alarm list is read' },
    compact: { default: true, kind: boolean, doc: 'compact history before defragmenting (the API server cannot during the alarm)' },
    keepHistory: { default: '5m', kind: duration(0), doc: 'first compaction keeps this much history (the API server keeps 5m)' },
    compactTimeout: { default: '5m', kind: duration(1000), doc: 'deadline of one compaction (about 40s at 1GiB)' },
    disarm: { default: true, kind: boolean, doc: 'disarm NOSPACE once every member is back under the quota' },
    disarmBelow: { default: 0.9, kind: ratio({ zero: false }), doc: 'disarm only when every dbSize / quotaBytes is below this' },
  },
  forecast: {
    window: { default: '6h', kind: duration(60_000), doc: 'growth is measured over this much of recent history' },
    minSpan: { default: '1h', kind: duration(10_000), doc: 'no forecast before the samples span this long' },
    warnBefore: { default: '24h', kind: duration(0), doc: 'warn when the quota is forecast to be reached sooner than this' },
    defragBefore: {
      default: '6h',
      kind: duration(0),
      doc: 'defragment now, not at the next scheduled run, when the db file is forecast to reach the quota sooner (0: never)',
    },
  },
  compaction: {
    staleAfter: {
      default: '2h',
      kind: duration(1000),
      doc: 'warn when the compacted revision has not moved this long while revisions grow',
    },
    fallback: { default: true, kind: boolean, doc: 'then compact history ourselves (the turn holder does it)' },
    keepHistory: { default: '1h', kind: duration(0), doc: 'history kept by that fallback compaction' },
  },
  verify: {
    hashKV: { default: true, kind: boolean, doc: 'compare HashKV across members after each defragment' },
  },
  metrics: {
    listen: { default: '127.0.0.1:9479', kind: listen, doc: 'Prometheus /metrics and /healthz ("" disables)' },
    textfile: {
      default: '',
      kind: promFile,
      doc: 'node_exporter textfile collector file (*.prom), rewritten after each run and alarm check ("" disables)',
    },
  },
  log: {
    level: { default: 'info', kind: oneOf(LOG_LEVELS), doc: LOG_LEVELS.join(', ') },
    format: { default: 'auto', kind: oneOf(LOG_FORMATS), doc: 'auto: journal under systemd, pretty on a terminal, json otherwise' },
  },
};

/** The subdirectory of $RUNTIME_DIRECTORY where `etcd-defragd stage-tls` copies the files (src/tls-files.ts). */
export const STAGED_SUBDIR = 'credentials';

/**
 * Credentials systemd passes with LoadCredential=, and the copies staged in $RUNTIME_DIRECTORY,
 * win over the configured paths.
 */
export const CREDENTIALS: Record<string, keyof Config['etcd']> = {
  'etcd-ca': 'caFile',
  'etcd-cert': 'certFile',
  'etcd-key': 'keyFile',
  'etcd-password': 'passwordFile',
};

export function envName(section: string, key: string): string {
  return `ETCD_DEFRAGD_${section.toUpperCase()}_${key.replace(/([a-z0-9])([A-Z])/g, '$1_$2').toUpperCase()}`;
}

export type Source = 'default' | 'file' | 'env' | 'flag' | 'credential';

export interface LoadOptions {
  /** Path given with --config or ETCD_DEFRAGD_CONFIG; the default path may be missing. */
  path?: string;
  pathExplicit?: boolean;
  env?: NodeJS.ProcessEnv;
  /** Flag overrides as dotted keys, e.g. { 'log.format': 'json' }. */
  flags?: Record<string, unknown>;
  /** Check that certificate files are readable and parse (off for `stage-tls`, which copies them first, and for tests). */
  checkFiles?: boolean;
}

export interface LoadedConfig {
  config: Readonly<Config>;
  path: string | undefined;
  sources: Record<string, { source: Source; detail?: string }>;
  /** Things that load but deserve an operator's look (retired keys); logged at start. */
  warnings: string[];
}

/**
 * Keys an older release accepted: still loaded (a config written by v0.1 keeps working), ignored,
 * and named in a warning that says what replaced them.
 */
export const RETIRED: Record<string, string> = {
  'nospace.keepRevisions':
    'replaced by nospace.keepHistory (a duration, default 5m): the first NOSPACE compaction keeps that much history, the second keeps none',
};

function describeSource(key: string, s: { source: Source; detail?: string }, path: string | undefined): string {
  switch (s.source) {
    case 'file':
      return `in ${path}`;
    case 'env':
      return `from environment variable ${s.detail}`;
    case 'flag':
      return `from flag ${s.detail}`;
    case 'credential':
      return `from ${s.detail}`;
    default:
      return `(default of ${key})`;
  }
}

function show(raw: unknown): string {
  return typeof raw === 'string' ? JSON.stringify(raw) : (JSON.stringify(raw) ?? String(raw));
}

function readYaml(path: string, explicit: boolean, warnings: string[]): Record<string, unknown> | undefined {
  let textContent: string;
  try {
    textContent = readTrustedFile('config file', path).toString('utf8');
  } catch (err) {
    if (err instanceof ConfigError) throw err;
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOENT' && !explicit) return undefined;
    throw new ConfigError(
      `cannot read config file ${path}: ` +
        `${code === 'ENOENT' ? 'no such file' : code === 'EACCES' ? 'permission denied' : (err as Error).message}`,
    );
  }
  let doc: unknown;
  try {
    doc = parseYaml(textContent, { prettyErrors: true, uniqueKeys: true });
  } catch (err) {
    const where = err instanceof YAMLParseError && err.linePos ? ` at line ${err.linePos[0].line}, column ${err.linePos[0].col}` : '';
    const msg = (err instanceof Error ? err.message.split('\n')[0]! : String(err)).replace(/ at line \d+, column \d+:?$/, '');
    throw new ConfigError(`${path}${where}: not valid YAML: ${msg}`);
  }
  if (doc === null || doc === undefined) return {};
  if (typeof doc !== 'object' || Array.isArray(doc))
    throw new ConfigError(`${path}: the top level must be a mapping of sections (${Object.keys(SCHEMA).join(', ')})`);
  for (const [section, value] of Object.entries(doc as Record<string, unknown>)) {
    const spec = Object.hasOwn(SCHEMA, section) ? SCHEMA[section] : undefined;
    if (!spec) throw new ConfigError(`${section}: unknown section in ${path}; accepted: ${Object.keys(SCHEMA).join(', ')}`);
    if (value === null) {
      // A section whose keys are all commented out, as in the shipped file.
      delete (doc as Record<string, unknown>)[section];
      continue;
    }
    if (typeof value !== 'object' || Array.isArray(value))
      throw new ConfigError(`${section}: must be a mapping of keys in ${path}; accepted keys: ${Object.keys(spec).join(', ')}`);
    for (const key of Object.keys(value as object)) {
      const retired = RETIRED[`${section}.${key}`];
      if (retired) {
        warnings.push(`${section}.${key} in ${path} is no longer used and is ignored: ${retired}; remove it`);
        // A file written by v0.1 lists every v0.1 default; this one changed for a reason.
        if ((value as Record<string, unknown>).compact === false || (value as Record<string, unknown>).compact === 'false') {
          warnings.push(
            `nospace.compact: false in ${path} looks like v0.1's default written out: ` +
              'with it, history that fills the quota is never freed during NOSPACE and the cluster stays read-only ' +
              '(the API server cannot compact during the alarm); delete the line to get the default (true)',
          );
        }
        delete (value as Record<string, unknown>)[key];
        continue;
      }
      if (!Object.hasOwn(spec, key))
        throw new ConfigError(
          `${section}.${key}: unknown key in ${path}; accepted: ${Object.keys(spec)
            .map((k) => `${section}.${k}`)
            .join(', ')}`,
        );
    }
  }
  return doc as Record<string, unknown>;
}

/** Loads, merges (defaults -> file -> environment -> flags -> systemd credentials), validates and freezes. */
export function loadConfig(opts: LoadOptions = {}): LoadedConfig {
  const env = opts.env ?? process.env;
  const explicit = opts.pathExplicit ?? Boolean(opts.path);
  const path = opts.path ?? DEFAULT_CONFIG_PATH;
  const warnings: string[] = [];
  const fileDoc = readYaml(path, explicit, warnings);

  // Each layer overwrites the raw value of a key and says where it came from, so an error can
  // name the file, the variable or the flag. readYaml has already rejected unknown keys.
  const raw: Record<string, unknown> = {};
  const sources: LoadedConfig['sources'] = {};
  const put = (full: string, value: unknown, source: Source, detail?: string) => {
    raw[full] = value;
    sources[full] = detail === undefined ? { source } : { source, detail };
  };
  for (const [section, keys] of Object.entries(SCHEMA)) {
    const fromFile = fileDoc?.[section] as Record<string, unknown> | undefined;
    for (const [key, spec] of Object.entries(keys)) {
      const full = `${section}.${key}`;
      const name = envName(section, key);
      if (env[name] !== undefined) put(full, env[name], 'env', name);
      else if (fromFile && Object.hasOwn(fromFile, key)) put(full, fromFile[key], 'file');
      else put(full, spec.default, 'default');
    }
  }
  for (const [full, value] of Object.entries(opts.flags ?? {})) {
    const [section, key] = full.split('.');
    if (!section || !key || !Object.hasOwn(SCHEMA, section) || !Object.hasOwn(SCHEMA[section]!, key)) {
      throw new ConfigError(`${full}: unknown key given on the command line; see etcd-defragd check-config for the keys`);
    }
    put(full, value, 'flag', flagName(full));
  }

  // A credential from LoadCredential= (a drop-in) wins; then the copy `etcd-defragd stage-tls`
  // made of the configured file in the service's runtime directory (src/tls-files.ts).
  const credDirs: [string | undefined, string][] = [
    [env.CREDENTIALS_DIRECTORY, 'systemd credential'],
    [
      env.RUNTIME_DIRECTORY ? join(env.RUNTIME_DIRECTORY.split(':')[0]!, STAGED_SUBDIR) : undefined,
      'copy staged by etcd-defragd stage-tls:',
    ],
  ];
  for (const [cred, key] of Object.entries(CREDENTIALS)) {
    for (const [dir, what] of credDirs) {
      if (!dir) continue;
      const file = join(dir, cred);
      try {
        accessSync(file, fsConstants.R_OK);
      } catch {
        continue;
      }
      put(`etcd.${key}`, file, 'credential', `${what} ${cred}`);
      break;
    }
  }

  const out: Record<string, Record<string, unknown>> = {};
  for (const [section, keys] of Object.entries(SCHEMA)) {
    out[section] = {};
    for (const [key, spec] of Object.entries(keys)) {
      const full = `${section}.${key}`;
      const result = spec.kind.parse(raw[full]);
      if ('error' in result) {
        throw new ConfigError(
          `${full}: ${show(raw[full])} ${result.error} ${describeSource(full, sources[full]!, path)}; accepted: ${spec.kind.accepted}`,
        );
      }
      out[section][key] = result.value;
    }
  }
  const config = out as unknown as Config;
  crossCheck(config, sources, path, opts.checkFiles ?? true);
  return { config: deepFreeze(config), path: fileDoc ? path : undefined, sources, warnings };
}

function flagName(full: string): string {
  const direct: Record<string, string> = {
    'log.format': '--log-format',
    'log.level': '--log-level',
    'etcd.endpoint': '--endpoint',
    'policy.force': '--force',
  };
  return direct[full] ?? `--set ${full}=...`;
}

function crossCheck(c: Config, sources: LoadedConfig['sources'], path: string, checkFiles: boolean): void {
  const where = (key: string) => describeSource(key, sources[key]!, path);
  const tls = c.etcd.endpoint.startsWith('https:');
  if (Boolean(c.etcd.certFile) !== Boolean(c.etcd.keyFile)) {
    const missing = c.etcd.certFile ? 'etcd.keyFile' : 'etcd.certFile';
    throw new ConfigError(
      `${missing}: "" ${where(missing)} but ${missing === 'etcd.keyFile' ? 'etcd.certFile' : 'etcd.keyFile'} is set; ` +
        'accepted: both a client certificate and its key, or neither',
    );
  }
  if (c.etcd.username && !c.etcd.passwordFile) {
    throw new ConfigError(
      `etcd.passwordFile: "" ${where('etcd.passwordFile')} but etcd.username is ${show(c.etcd.username)}; ` +
        'accepted: a file holding the password',
    );
  }
  if (!checkFiles) return;
  if (tls) {
    checkPem('etcd.caFile', c.etcd.caFile, 'cert', where);
    checkPem('etcd.certFile', c.etcd.certFile, 'cert', where);
    checkPem('etcd.keyFile', c.etcd.keyFile, 'key', where);
  }
  if (c.etcd.passwordFile) readable('etcd.passwordFile', c.etcd.passwordFile, where, true);
}

/**
 * check-config only: etcd.dataDir must hold an etcd member (member/snap). Under systemd the daemon
 * itself cannot look inside (a 0700 directory of root or etcd); it only needs the filesystem's free
 * space, so `run` does not check this. A wrong dataDir makes every run skip with check=disk.
 */
export function checkDataDir(loaded: LoadedConfig): void {
  const dir = loaded.config.etcd.dataDir;
  if (!dir) return;
  const where = describeSource('etcd.dataDir', loaded.sources['etcd.dataDir']!, loaded.path ?? DEFAULT_CONFIG_PATH);
  const snap = join(dir, 'member', 'snap');
  let why: string | undefined;
  try {
    if (!statSync(snap).isDirectory()) why = `has no etcd member (${snap} is not a directory)`;
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    why =
      code === 'ENOENT' || code === 'ENOTDIR'
        ? `holds no etcd member (no ${snap})`
        : code === 'EACCES'
          ? `cannot be looked into (permission denied; run check-config as root)`
          : `cannot be checked (${code})`;
  }
  if (why)
    throw new ConfigError(
      `etcd.dataDir: ${show(dir)} ${why} ${where}; accepted: the member's --data-dir (kubeadm and kubespray /var/lib/etcd, ` +
        'rke2 /var/lib/rancher/rke2/server/db/etcd, k3s /var/lib/rancher/k3s/server/db/etcd; etcd-defragd init-config --layout), or "" to skip the disk check',
    );
}

/** Reads a file the config names; `trusted`: also refuse one that others could write (readTrustedFile). */
function readable(key: string, file: string, where: (k: string) => string, trusted = false): Buffer {
  try {
    return trusted ? readTrustedFile(`${key} ${where(key)}:`, file) : readFileSync(file);
  } catch (err) {
    if (err instanceof ConfigError) throw err;
    const code = (err as NodeJS.ErrnoException).code;
    const why =
      code === 'ENOENT'
        ? 'does not exist'
        : code === 'EACCES'
          ? 'is not readable (permission denied)'
          : code === 'EISDIR'
            ? 'is a directory'
            : `cannot be read (${code})`;
    throw new ConfigError(`${key}: ${show(file)} ${why} ${where(key)}; accepted: a readable file`);
  }
}

function checkPem(key: string, file: string, kind: 'cert' | 'key', where: (k: string) => string): void {
  if (!file) return;
  const data = readable(key, file, where);
  try {
    if (kind === 'cert') new X509Certificate(data);
    else createPrivateKey(data);
  } catch {
    const what = kind === 'cert' ? 'a PEM certificate' : 'a PEM private key';
    throw new ConfigError(`${key}: ${show(file)} is not ${what} ${where(key)}; accepted: ${what} file`);
  }
}

function deepFreeze<T>(o: T): T {
  if (o && typeof o === 'object') {
    for (const v of Object.values(o)) deepFreeze(v);
    Object.freeze(o);
  }
  return o;
}

/** The effective config as YAML-ish lines with where each value came from (check-config). */
export function describeConfig(loaded: LoadedConfig): string {
  const lines: string[] = [];
  for (const [section, keys] of Object.entries(SCHEMA)) {
    lines.push(`${section}:`);
    for (const key of Object.keys(keys)) {
      const full = `${section}.${key}`;
      const value = (loaded.config as unknown as Record<string, Record<string, unknown>>)[section]![key];
      const s = loaded.sources[full]!;
      const from = s.source === 'default' ? 'default' : s.source === 'file' ? 'file' : `${s.source} ${s.detail}`;
      lines.push(`  ${key}: ${JSON.stringify(value)}  # ${from}`);
    }
  }
  return lines.join('\n');
}

/**
 * The shipped config file. The etcd section is live (the paths are what an operator checks first);
 * every other key is shown commented out with its default, so a default that changes in a later
 * release reaches a node whose file nobody edited.
 */
export function renderDefaultConfig(): string {
  const lines = [
    '# etcd-defragd configuration. Check the etcd section against your node; every other key is',
    '# shown commented out with its default: uncomment a line to change it.',
    '# Durations: 500ms, 10s, 10m, 3h (plain integers are milliseconds). Sizes: 64MiB, 2GiB (plain integers are bytes).',
    '# Any key can be overridden with ETCD_DEFRAGD_<SECTION>_<KEY>, e.g. ETCD_DEFRAGD_SCHEDULE_CRON.',
    '# Check a change with: etcd-defragd check-config --config /etc/etcd-defragd/config.yaml',
  ];
  for (const [section, keys] of Object.entries(SCHEMA)) {
    const live = section === 'etcd';
    lines.push('', `${section}:`);
    const rendered = Object.entries(keys).map(([key, spec]) => {
      const v = spec.default;
      const value =
        typeof v === 'string'
          ? v === '' || /[:#*{}[\],&!|>'"%@`\s]/.test(v) || (/^\d/.test(v) && !/^\d+[a-zA-Z]+$/.test(v))
            ? JSON.stringify(v)
            : v
          : String(v);
      return { left: `  ${live ? '' : '# '}${key}: ${value}`, doc: spec.doc };
    });
    const width = Math.max(...rendered.map((r) => r.left.length)) + 2;
    for (const r of rendered) lines.push(`${r.left.padEnd(width)}# ${r.doc}`);
  }
  return `${lines.join('\n')}\n`;
}
