/**
 * The process reaper: no etcd process outlives the test process.
 * - Signals by PID that do not care whether the process is still there.
 * - A process-wide registry of live clusters, killed synchronously (SIGKILL by PID) on process
 *   'exit' and on SIGINT / SIGTERM / SIGHUP.
 * - A watchdog shell per cluster dir, fed by a pipe from this process, that kills the members by
 *   PID (from DIR/.pids) even if this process is SIGKILLed.
 * - Finding processes by PID in /proc (alive, or mentioning a dir on their command line).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { readdirSync, readFileSync } from 'node:fs';
import type { Socket } from 'node:net';

/** Sends `sig` to `pid`; a process that is already gone is not an error. */
export function signalQuietly(pid: number, sig: NodeJS.Signals): void {
  try {
    process.kill(pid, sig);
  } catch {
    /* gone */
  }
}

/** Something to kill synchronously if the process ends without cleaning up (a cluster). */
export interface Reapable {
  killSync(): void;
}

const live = new Set<Reapable>();
let handlersInstalled = false;

function killAllSync(): void {
  for (const c of live) c.killSync();
}

function onSignal(sig: NodeJS.Signals): void {
  killAllSync();
  // If nobody else handles the signal, die from it as we would have without our handler.
  if (process.listenerCount(sig) === 0) process.kill(process.pid, sig);
}

function installHandlers(): void {
  if (handlersInstalled) return;
  handlersInstalled = true;
  process.on('exit', killAllSync);
  for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) process.once(sig, onSignal);
}

/** Kills `r` (r.killSync()) if this process exits or gets SIGINT / SIGTERM / SIGHUP first. */
export function reapOnExit(r: Reapable): void {
  installHandlers();
  live.add(r);
}

/** `r` was cleaned up: nothing left to do at exit. */
export function reaped(r: Reapable): void {
  live.delete(r);
}

/** True if a process with this PID exists (and is not a zombie). */
export function pidAlive(pid: number): boolean {
  if (!pid) return false;
  try {
    process.kill(pid, 0);
  } catch {
    return false;
  }
  try {
    const st = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return st.slice(st.lastIndexOf(')') + 2, st.lastIndexOf(')') + 3) !== 'Z';
  } catch {
    return true; // no /proc: kill(0) said it exists
  }
}

/** PIDs of processes whose command line mentions `dir` (Linux /proc; [] elsewhere). */
export function pidsMentioning(dir: string): number[] {
  const out: number[] = [];
  let entries: string[];
  try {
    entries = readdirSync('/proc');
  } catch {
    return out;
  }
  for (const e of entries) {
    if (!/^\d+$/.test(e) || Number(e) === process.pid) continue;
    try {
      const cmd = readFileSync(`/proc/${e}/cmdline`, 'utf8');
      if (cmd.includes(dir) && pidAlive(Number(e))) out.push(Number(e));
    } catch {
      /* gone */
    }
  }
  return out;
}

/**
 * Starts the watchdog that kills the members of the cluster in `dir` if this process dies without
 * cleaning up, and removes `dir` then unless `keep`.
 */
export function startWatchdog(dir: string, keep: boolean): ChildProcess {
  // Reads its stdin (a pipe from us) until EOF, i.e. until this process is gone, then kills every
  // PID in DIR/.pids whose command line mentions DIR/, and removes DIR unless told to keep it.
  const script = [
    "trap '' INT TERM HUP",
    'while read -r _; do :; done',
    'for f in "$1"/.pids/*; do',
    '  [ -f "$f" ] || continue; p=$(cat "$f")',
    '  if [ -n "$p" ] && tr "\\0" " " < /proc/$p/cmdline 2>/dev/null | grep -qF -- "$1/"; then kill -KILL "$p" 2>/dev/null; fi',
    'done',
    'if [ "$2" != 1 ]; then sleep 0.5; rm -rf -- "$1"; fi',
  ].join('\n');
  const wd = spawn('bash', ['-c', script, 'etcd-harness-watchdog', dir, keep ? '1' : '0'], {
    stdio: ['pipe', 'ignore', 'ignore'],
    detached: true,
  });
  wd.on('error', () => {
    /* best effort */
  });
  wd.unref();
  (wd.stdin as unknown as Socket | null)?.unref?.();
  return wd;
}

/** Kills a watchdog (`undefined`: none); the promise resolves once it has exited (at most ~2 s). */
export function killWatchdog(wd: ChildProcess | undefined): Promise<void> {
  if (!wd?.pid || wd.exitCode !== null || wd.signalCode !== null) return Promise.resolve();
  const exited = new Promise<void>((resolve) => {
    const timer = setTimeout(resolve, 2000);
    wd.once('exit', () => {
      clearTimeout(timer);
      resolve();
    });
  });
  signalQuietly(wd.pid, 'SIGKILL');
  return exited;
}
