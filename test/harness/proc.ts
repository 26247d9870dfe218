/**
 * Running the etcd-defragd CLI (src/cli.ts, through tsx) as a child process in tests.
 *
 *   const p = spawnCli(['--config', cfg]);
 *   await p.waitForLine(/defrag finished/, 30_000);
 *   await p.kill('SIGTERM'); const { code } = await p.exited;
 *
 * Children still running when the test process exits are SIGKILLed by PID.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { createInterface } from 'node:readline';
import { REPO_ROOT } from './etcd-bin.ts';

export { REPO_ROOT };
export const CLI_PATH = `${REPO_ROOT}/src/cli.ts`;

/** tsx's loader as an absolute URL, so that --import works whatever the child's cwd. */
function tsxImport(): string {
  try {
    return import.meta.resolve('tsx');
  } catch {
    return 'tsx';
  }
}

export interface CliOptions {
  /** Extra environment (merged over process.env; a value of undefined removes a variable). */
  env?: Record<string, string | undefined>;
  cwd?: string;
  /** Extra node flags, e.g. ['--inspect']. */
  nodeArgs?: string[];
  /** Script to run instead of src/cli.ts (for testing the harness itself). */
  script?: string;
}

export interface OutputLine {
  stream: 'stdout' | 'stderr';
  line: string;
  /** Epoch ms when the line arrived. */
  at: number;
}

export type LinePredicate = RegExp | string | ((line: string, stream: 'stdout' | 'stderr') => boolean);

export interface CliProcess {
  readonly pid: number;
  readonly child: ChildProcess;
  /** Every line so far, both streams, in arrival order. */
  readonly lines: OutputLine[];
  readonly stdoutLines: string[];
  readonly stderrLines: string[];
  /** Resolves when the process has exited (never rejects). */
  readonly exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  /**
   * Resolves with the first line (already received or future, from index `from` of `lines`)
   * matching the predicate; rejects on timeout or if the process exits first, with the output tail.
   */
  waitForLine(predicate: LinePredicate, timeoutMs?: number, opts?: { from?: number; stream?: 'stdout' | 'stderr' }): Promise<OutputLine>;
  /** Like waitForLine, but for JSON lines (e.g. pino logs): parses each line and tests the object. */
  waitForJson<T = Record<string, unknown>>(predicate: (obj: T) => boolean, timeoutMs?: number, opts?: { from?: number }): Promise<T>;
  /** Parsed JSON lines (non-JSON lines skipped). */
  jsonLines<T = Record<string, unknown>>(): T[];
  /** Sends a signal (default SIGTERM); resolves once the process has exited. */
  kill(signal?: NodeJS.Signals): Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  /** All output so far as text (for assertion messages). */
  output(): string;
  isRunning(): boolean;
}

const liveChildren = new Set<ChildProcess>();
let exitHookInstalled = false;
function trackChild(child: ChildProcess): void {
  liveChildren.add(child);
  child.once('exit', () => liveChildren.delete(child));
  if (!exitHookInstalled) {
    exitHookInstalled = true;
    process.on('exit', () => {
      for (const c of liveChildren) {
        if (c.pid && c.exitCode === null && c.signalCode === null) {
          try {
            process.kill(c.pid, 'SIGKILL');
          } catch {
            /* gone */
          }
        }
      }
    });
  }
}

function matches(p: LinePredicate, line: string, stream: 'stdout' | 'stderr'): boolean {
  if (typeof p === 'string') return line.includes(p);
  if (p instanceof RegExp) return p.test(line);
  return p(line, stream);
}

function buildEnv(extra: Record<string, string | undefined> = {}): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = { ...process.env };
  // A NODE_OPTIONS/NODE_TEST_CONTEXT from the test runner must not leak into the daemon.
  delete env.NODE_TEST_CONTEXT;
  for (const [k, v] of Object.entries(extra)) {
    if (v === undefined) delete env[k];
    else env[k] = v;
  }
  return env;
}

/** Spawns `node --import tsx src/cli.ts ...args`, capturing output lines live. */
export function spawnCli(args: string[], opts: CliOptions = {}): CliProcess {
  const child = spawn(process.execPath, [...(opts.nodeArgs ?? []), '--import', tsxImport(), opts.script ?? CLI_PATH, ...args], {
    cwd: opts.cwd ?? REPO_ROOT,
    env: buildEnv(opts.env),
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  trackChild(child);
  const lines: OutputLine[] = [];
  const stdoutLines: string[] = [];
  const stderrLines: string[] = [];
  const waiters = new Set<() => void>();
  const notify = (): void => {
    for (const w of [...waiters]) w();
  };
  let streamsOpen = 2;
  let exitInfo: { code: number | null; signal: NodeJS.Signals | null } | undefined;
  let resolveExited!: (v: { code: number | null; signal: NodeJS.Signals | null }) => void;
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((r) => (resolveExited = r));
  const maybeDone = (): void => {
    // 'exit' can come before the last output lines: settle once both streams have ended too.
    if (exitInfo && streamsOpen === 0) {
      resolveExited(exitInfo);
      notify();
    }
  };
  for (const [stream, store] of [
    ['stdout', stdoutLines],
    ['stderr', stderrLines],
  ] as const) {
    const src = child[stream];
    if (!src) continue;
    const rl = createInterface({ input: src, crlfDelay: Infinity });
    rl.on('line', (line) => {
      store.push(line);
      lines.push({ stream, line, at: Date.now() });
      notify();
    });
    rl.once('close', () => {
      streamsOpen--;
      maybeDone();
    });
  }
  child.once('exit', (code, signal) => {
    exitInfo = { code, signal };
    maybeDone();
  });
  child.once('error', (err) => {
    lines.push({ stream: 'stderr', line: `spawn error: ${err.message}`, at: Date.now() });
    exitInfo = { code: -1, signal: null };
    streamsOpen = 0;
    maybeDone();
  });

  const output = (): string => lines.map((l) => (l.stream === 'stderr' ? `[err] ${l.line}` : l.line)).join('\n');
  const tail = (): string =>
    lines
      .slice(-40)
      .map((l) => (l.stream === 'stderr' ? `[err] ${l.line}` : l.line))
      .join('\n');

  const waitForLine: CliProcess['waitForLine'] = (predicate, timeoutMs = 30_000, wopts = {}) =>
    new Promise<OutputLine>((resolve, reject) => {
      let idx = wopts.from ?? 0;
      const finish = (fn: () => void): void => {
        waiters.delete(check);
        clearTimeout(timer);
        fn();
      };
      const check = (): void => {
        for (; idx < lines.length; idx++) {
          const l = lines[idx]!;
          if (wopts.stream && l.stream !== wopts.stream) continue;
          if (matches(predicate, l.line, l.stream)) {
            const found = l;
            idx++;
            finish(() => resolve(found));
            return;
          }
        }
        if (exitInfo && streamsOpen === 0) {
          finish(() =>
            reject(
              new Error(
                `cli exited (code ${exitInfo!.code}, signal ${exitInfo!.signal}) before a line matched ${String(predicate)}; output:\n${tail()}`,
              ),
            ),
          );
        }
      };
      const timer = setTimeout(() => {
        finish(() => reject(new Error(`no line matched ${String(predicate)} within ${timeoutMs} ms; output:\n${tail()}`)));
      }, timeoutMs);
      waiters.add(check);
      check();
    });

  const parse = (line: string): unknown => {
    if (!line.startsWith('{')) return undefined;
    try {
      return JSON.parse(line);
    } catch {
      return undefined;
    }
  };

  const proc: CliProcess = {
    pid: child.pid ?? 0,
    child,
    lines,
    stdoutLines,
    stderrLines,
    exited,
    waitForLine,
    async waitForJson<T>(predicate: (obj: T) => boolean, timeoutMs?: number, o: { from?: number } = {}): Promise<T> {
      const l = await waitForLine(
        (line) => {
          const obj = parse(line);
          return obj !== undefined && predicate(obj as T);
        },
        timeoutMs,
        o,
      );
      return parse(l.line) as T;
    },
    jsonLines<T>(): T[] {
      return lines.map((l) => parse(l.line)).filter((x): x is T => x !== undefined);
    },
    async kill(signal: NodeJS.Signals = 'SIGTERM') {
      if (!exitInfo && child.pid) {
        try {
          process.kill(child.pid, signal);
        } catch {
          /* gone */
        }
      }
      return exited;
    },
    output,
    isRunning: () => !exitInfo,
  };
  return proc;
}

export interface RunResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

/**
 * Runs the CLI to completion. Rejects if it is still running after `timeoutMs` (default 30 s;
 * it is then SIGKILLed), with its output in the message.
 */
export async function runCli(args: string[], opts: CliOptions & { timeoutMs?: number } = {}): Promise<RunResult> {
  const p = spawnCli(args, opts);
  const timeoutMs = opts.timeoutMs ?? 30_000;
  let timer: NodeJS.Timeout | undefined;
  const timedOut = new Promise<'timeout'>((r) => (timer = setTimeout(() => r('timeout'), timeoutMs)));
  const res = await Promise.race([p.exited, timedOut]);
  if (timer) clearTimeout(timer);
  if (res === 'timeout') {
    await p.kill('SIGKILL');
    throw new Error(`cli ${args.join(' ')} still running after ${timeoutMs} ms (killed); output:\n${p.output()}`);
  }
  return { ...res, stdout: p.stdoutLines.join('\n'), stderr: p.stderrLines.join('\n') };
}
