/**
 * One etcd member of a test cluster: its URLs, data dir and log file, and its process (spawn,
 * SIGSTOP/SIGCONT, kill, graceful stop, restart with the same data dir). The flags come from the
 * cluster (cluster.ts), which also waits for the member to become healthy.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { closeSync, openSync, writeFileSync } from 'node:fs';
import { open, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import type { Etcd3 } from 'etcd3';
import type { Cluster } from './cluster.ts';
import { etcdEnv, unsupportedArch } from './etcd-bin.ts';
import { errorText } from './errors.ts';
import { signalQuietly } from './reaper.ts';

export interface ExitInfo {
  code: number | null;
  signal: NodeJS.Signals | null;
  at: Date;
}

export class Member {
  readonly cluster: Cluster;
  readonly index: number;
  readonly name: string;
  readonly clientUrl: string;
  readonly peerUrl: string;
  /** Plain-http URL serving /metrics and /health (undefined if metricsListener was false). */
  readonly metricsUrl: string | undefined;
  readonly dataDir: string;
  readonly logFile: string;
  /** Member ID in hex as etcd prints it (e.g. "8e9e05c52164694d"); set once the member is healthy. */
  id = '';
  /** Member ID as a decimal string (as the etcd3 client returns it). */
  idDec = '';
  /** How the last process of this member ended (undefined while running or never started). */
  lastExit: ExitInfo | undefined;

  private child: ChildProcess | undefined;
  private exitPromise: Promise<ExitInfo> | undefined;
  private paused = false;
  private readonly baseArgs: string[];

  constructor(cluster: Cluster, index: number, ports: { client: number; peer: number; metrics?: number }, baseArgs: string[]) {
    this.cluster = cluster;
    this.index = index;
    this.name = `m${index}`;
    const cs = cluster.tls ? 'https' : 'http';
    const ps = cluster.peerTls ? 'https' : 'http';
    this.clientUrl = `${cs}://127.0.0.1:${ports.client}`;
    this.peerUrl = `${ps}://127.0.0.1:${ports.peer}`;
    this.metricsUrl = ports.metrics ? `http://127.0.0.1:${ports.metrics}` : undefined;
    this.dataDir = join(cluster.dir, `${this.name}.etcd`);
    this.logFile = join(cluster.dir, `${this.name}.log`);
    this.baseArgs = baseArgs;
  }

  /** PID of the current process (0 if none was ever started). */
  get pid(): number {
    return this.child?.pid ?? 0;
  }

  get isPaused(): boolean {
    return this.paused && this.isRunning();
  }

  isRunning(): boolean {
    return !!this.child && this.child.exitCode === null && this.child.signalCode === null && this.lastExit === undefined;
  }

  /** The full command line flags of this member (without the binary). */
  args(state: 'new' | 'existing'): string[] {
    return [...this.baseArgs, '--initial-cluster-state', state];
  }

  /** @internal Spawns the etcd process; does not wait. */
  spawnProcess(state: 'new' | 'existing'): void {
    if (this.isRunning()) throw new Error(`${this.name} is already running (pid ${this.pid})`);
    const bins = this.cluster.binaries;
    const fd = openSync(this.logFile, 'a');
    let child: ChildProcess;
    try {
      const arch = unsupportedArch(this.cluster.version);
      child = spawn(bins.etcd, this.args(state), {
        stdio: ['ignore', fd, fd],
        env: etcdEnv(arch ? { ETCD_UNSUPPORTED_ARCH: arch } : {}),
      });
    } finally {
      closeSync(fd);
    }
    if (!child.pid) {
      // spawn failed (ENOENT etc.); an 'error' event follows, which must not go unhandled.
      child.once('error', () => {});
      throw new Error(`failed to spawn ${bins.etcd} for ${this.name}`);
    }
    this.child = child;
    this.paused = false;
    this.lastExit = undefined;
    writeFileSync(join(this.cluster.dir, '.pids', this.name), `${child.pid}\n`);
    this.exitPromise = new Promise<ExitInfo>((resolve) => {
      child.once('exit', (code, signal) => {
        const info: ExitInfo = { code, signal, at: new Date() };
        if (this.child === child) {
          this.lastExit = info;
          this.paused = false;
        }
        resolve(info);
      });
      child.once('error', (err) => {
        const info: ExitInfo = { code: -1, signal: null, at: new Date() };
        if (this.child === child) this.lastExit = info;
        this.cluster.appendNote(this, `spawn error: ${errorText(err)}`);
        resolve(info);
      });
    });
  }

  /** SIGSTOP: the member stops answering anything (sockets stay open). */
  pause(): void {
    this.signal('SIGSTOP');
    this.paused = true;
  }

  /** SIGCONT after pause(). */
  resume(): void {
    this.signal('SIGCONT');
    this.paused = false;
  }

  private signal(sig: NodeJS.Signals): void {
    if (!this.isRunning()) throw new Error(`${this.name} is not running`);
    process.kill(this.pid, sig);
  }

  /**
   * Sends `signal` (default SIGKILL). For SIGKILL/SIGTERM/SIGINT/SIGQUIT resolves once the
   * process has exited; for other signals as soon as it was sent.
   */
  async kill(signal: NodeJS.Signals = 'SIGKILL'): Promise<void> {
    if (!this.isRunning()) return;
    const child = this.child;
    const exited = this.exitPromise;
    process.kill(this.pid, signal);
    if (!['SIGKILL', 'SIGTERM', 'SIGINT', 'SIGQUIT'].includes(signal)) return;
    if (signal !== 'SIGKILL' && this.paused && child?.pid) {
      signalQuietly(child.pid, 'SIGCONT');
    }
    await exited;
  }

  /** Graceful stop: SIGTERM (and SIGCONT if paused), then SIGKILL after `timeoutMs`. */
  async stop(timeoutMs = 10_000): Promise<void> {
    if (!this.isRunning()) return;
    const exited = this.exitPromise!;
    const pid = this.pid;
    signalQuietly(pid, 'SIGTERM');
    signalQuietly(pid, 'SIGCONT');
    const timer = new AbortController();
    const res = await Promise.race([
      exited,
      sleep(timeoutMs, 'timeout' as const, { signal: timer.signal }).catch(() => 'aborted' as const),
    ]);
    timer.abort();
    if (res === 'timeout') {
      signalQuietly(pid, 'SIGKILL');
      await exited;
    }
  }

  /**
   * Restarts the member with the same data dir and flags (`--initial-cluster-state existing`),
   * stopping it first if it is running, and waits until it is healthy.
   */
  async restart(opts: { timeoutMs?: number } = {}): Promise<void> {
    await this.stop();
    this.cluster.dropClient(this);
    this.spawnProcess('existing');
    await this.cluster.waitHealthy(this, opts.timeoutMs ?? 60_000);
  }

  /** The cached etcd3 client of this member (see Cluster.client). */
  client(): Etcd3 {
    return this.cluster.client(this);
  }

  /** Last `lines` lines of the member's log. */
  async logTail(lines = 30): Promise<string> {
    return tailFile(this.logFile, lines);
  }
}

async function tailFile(file: string, lines: number, maxBytes = 64 * 1024): Promise<string> {
  try {
    const st = await stat(file);
    const fh = await open(file, 'r');
    try {
      const len = Math.min(st.size, maxBytes);
      const buf = Buffer.alloc(len);
      await fh.read(buf, 0, len, st.size - len);
      return buf.toString('utf8').split('\n').filter(Boolean).slice(-lines).join('\n');
    } finally {
      await fh.close();
    }
  } catch (err) {
    return `(cannot read ${file}: ${errorText(err)})`;
  }
}
