// Logging: pino JSON lines on stderr, optionally reformatted for journald (`<N>` priority prefix + a
// sentence with key=value fields) or for a terminal. One line per event; `event` is the stable field.
// stdout is kept for machine output (status, check-config), so `| jq` never sees a log line.
// The two text formats are written here, not with pino-pretty: it has no journald `<N>` priority
// prefix (one per line, stack lines included) and prints fields as JSON or an indented block, not
// key=value on the line; bending it to both would take as much code as this, plus a dependency.
import { spawnSync } from 'node:child_process';
import { fstatSync } from 'node:fs';
import pino, { type Logger } from 'pino';
import type { LogFormat, LogLevel } from './config.ts';

export type Log = Logger;

const LEVEL_NAMES: Record<number, string> = { 10: 'TRACE', 20: 'DEBUG', 30: 'INFO', 40: 'WARN', 50: 'ERROR', 60: 'FATAL' };
// syslog priorities journald reads from the `<N>` prefix (SyslogLevelPrefix=yes is systemd's default)
const SYSLOG: Record<number, number> = { 10: 7, 20: 7, 30: 6, 40: 4, 50: 3, 60: 2 };
const COLORS: Record<number, string> = { 10: '\x1b[90m', 20: '\x1b[90m', 30: '\x1b[32m', 40: '\x1b[33m', 50: '\x1b[31m', 60: '\x1b[35m' };
const OMIT = new Set(['level', 'time', 'msg']);

export interface Sink {
  write(chunk: string): unknown;
}

/** Picks the concrete format for `auto`: journal under systemd, pretty on a terminal, JSON otherwise. */
export function resolveFormat(format: LogFormat, env: NodeJS.ProcessEnv, isTTY: boolean): Exclude<LogFormat, 'auto'> {
  if (format !== 'auto') return format;
  if (env.JOURNAL_STREAM) return 'journal';
  return isTTY ? 'pretty' : 'json';
}

/**
 * Characters that act on a terminal or on how a line reads, rather than print: C0 controls (ESC
 * starts a terminal command; a newline would forge a second line), DEL, C1 controls (0x9B is a
 * one-byte CSI on some terminals), Unicode line separators and bidirectional overrides.
 */
// eslint-disable-next-line no-control-regex
const UNPRINTABLE = /[\u0000-\u001f\u007f-\u009f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]/g;
const NAMED: Record<string, string> = { '\n': '\\n', '\r': '\\r', '\t': '\\t' };

/**
 * Text that reaches a terminal or the journal from outside (etcd data: member names, pause reasons,
 * participant info, error messages) with every unprintable character written as an escape
 * (`\x1b`, `\n`, `\u202e`): shown, never obeyed. The status output and the journal and pretty
 * log formats pass everything through it.
 */
export function printable(text: string): string {
  return text.replace(UNPRINTABLE, (c) => {
    const code = c.charCodeAt(0);
    return NAMED[c] ?? (code < 0x100 ? `\\x${code.toString(16).padStart(2, '0')}` : `\\u${code.toString(16).padStart(4, '0')}`);
  });
}

/** What JSON.stringify leaves raw inside strings (it escapes C0 itself; its own layout uses newlines). */
const UNPRINTABLE_IN_JSON = /[\u007f-\u009f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]/g;

/** The same for JSON.stringify's output: those characters as \uXXXX escapes, which JSON.parse reads back unchanged. */
export function printableJson(json: string): string {
  return json.replace(UNPRINTABLE_IN_JSON, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`);
}

function fieldValue(v: unknown): string {
  if (typeof v === 'string') return /^[^\s"=]+$/.test(v) && printable(v) === v ? v : JSON.stringify(v);
  if (v && typeof v === 'object' && 'message' in (v as object) && 'type' in (v as object)) {
    return JSON.stringify((v as { message: string }).message);
  }
  return JSON.stringify(v);
}

/** The stack of a serialized error (pino's `err`), from its `TypeError: ...` line down. */
function stackLines(obj: Record<string, unknown>): string[] {
  const err = obj.err as { stack?: unknown } | undefined;
  if (!err || typeof err !== 'object' || typeof err.stack !== 'string') return [];
  return err.stack.split('\n').filter((l) => l.trim() !== '');
}

/** Prefixes every line of `text` with journald's `<N>`, so a multi-line message keeps one priority. */
export function withPriority(priority: number, text: string): string {
  return text
    .split('\n')
    .filter((l, i, all) => l !== '' || i < all.length - 1)
    .map((l) => `<${priority}>${l}\n`)
    .join('');
}

export function formatLine(obj: Record<string, unknown>, format: 'journal' | 'pretty', color = false): string {
  const level = Number(obj.level);
  // A crash keeps its stack: journald splits on newlines, so every stack line carries the same priority.
  const stack = stackLines(obj).map(printable);
  const raw = String(obj.msg ?? obj.event ?? '');
  const msg = printable(raw);
  // A long text field already in the sentence (e.g. a skip reason) is not repeated as key=value.
  const fields = Object.entries(obj)
    .filter(
      ([k, v]) =>
        !OMIT.has(k) &&
        v !== undefined &&
        !(typeof v === 'string' && v.length > 24 && raw.includes(v)) &&
        !(k === 'err' && stack.length > 0),
    )
    .map(([k, v]) => `${printable(k)}=${printable(fieldValue(v))}`)
    .join(' ');
  if (format === 'journal') return withPriority(SYSLOG[level] ?? 6, [`${msg}${fields ? ` ${fields}` : ''}`, ...stack].join('\n'));
  const time = new Date(Number(obj.time) || Date.now()).toISOString().slice(11, 23);
  const name = (LEVEL_NAMES[level] ?? 'INFO').padEnd(5);
  const lvl = color ? `${COLORS[level] ?? ''}${name}\x1b[0m` : name;
  const rest = fields ? (color ? ` \x1b[90m${fields}\x1b[0m` : ` ${fields}`) : '';
  return `${time} ${lvl} ${msg}${rest}\n${stack.map((l) => `${l}\n`).join('')}`;
}

/** A pino destination that rewrites each JSON line into the journal or pretty format. */
export function formattingSink(out: Sink, format: 'journal' | 'pretty', color: boolean): Sink {
  return {
    write(chunk: string) {
      for (const line of chunk.split('\n')) {
        if (!line) continue;
        try {
          out.write(formatLine(JSON.parse(line) as Record<string, unknown>, format, color));
        } catch {
          out.write(format === 'journal' ? withPriority(6, line) : `${line}\n`);
        }
      }
      return true;
    },
  };
}

export interface LogOptions {
  level: LogLevel;
  format: LogFormat;
  env?: NodeJS.ProcessEnv;
  out?: Sink & { isTTY?: boolean };
}

export function createLogger(opts: LogOptions): Log {
  const out = opts.out ?? process.stderr;
  const format = resolveFormat(opts.format, opts.env ?? process.env, Boolean(out.isTTY));
  const dest = format === 'json' ? out : formattingSink(out, format, format === 'pretty' && Boolean(out.isTTY));
  return pino(
    {
      level: opts.level,
      base: null,
      messageKey: 'msg',
      timestamp: pino.stdTimeFunctions.epochTime,
      formatters: { level: (_label, number) => ({ level: number }) },
      redact: { paths: ['password', '*.password', 'token', '*.token'], censor: '[redacted]' },
      serializers: { err: pino.stdSerializers.err },
    },
    dest as pino.DestinationStream,
  );
}

export const PRIORITY = { crit: 2, err: 3, warning: 4, info: 6 } as const;

/**
 * Whether a stream is journald's: systemd sets JOURNAL_STREAM to the device and inode of the stream
 * it connected. A command run by hand from a shell that inherited the variable does not match, so
 * `etcd-defragd status --json | jq` stays plain JSON there.
 */
export function isJournalStream(fd: 1 | 2, env: NodeJS.ProcessEnv): boolean {
  const m = env.JOURNAL_STREAM?.match(/^(\d+):(\d+)$/);
  if (!m) return false;
  try {
    const st = fstatSync(fd, { bigint: true });
    return st.dev === BigInt(m[1]!) && st.ino === BigInt(m[2]!);
  } catch {
    return false;
  }
}

/**
 * Text written outside the logger (usage and config errors, a crash before the logger exists):
 * under systemd (JOURNAL_STREAM set, as for log.format auto) every line gets a priority, so
 * `journalctl -p err` shows why the unit stopped.
 */
export function consoleText(env: NodeJS.ProcessEnv, priority: number, text: string): string {
  const t = text.endsWith('\n') ? text : `${text}\n`;
  return env.JOURNAL_STREAM ? withPriority(priority, t) : t;
}

/**
 * One line for the system log, for an operator's forced action (`disarm --force`, `resume
 * --integrity-checked`): a command run from a shell logs to its terminal, which keeps no record.
 * Sent with logger(1) at auth.notice (journald and syslog both take it, tag etcd-defragd, beside
 * sudo's own lines); when stderr already is the journal, the log line itself is the record. Returns
 * why it could not be written, if it could not.
 */
export function auditToSystemLog(text: string, env: NodeJS.ProcessEnv = process.env): string | undefined {
  if (isJournalStream(2, env)) return undefined;
  const r = spawnSync('logger', ['-t', 'etcd-defragd', '-p', 'auth.notice', '--', printable(text)], {
    env,
    stdio: ['ignore', 'ignore', 'pipe'],
    timeout: 5_000,
    encoding: 'utf8',
  });
  if (r.error) return `logger: ${r.error.message}`;
  if (r.status !== 0) return `logger exited ${r.status}: ${r.stderr.trim()}`;
  return undefined;
}

/** A logger that drops everything (tests that do not read logs). */
export function silentLogger(): Log {
  return pino({ level: 'silent' });
}
