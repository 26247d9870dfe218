/**
 * Real multi-member etcd clusters on loopback for integration tests and benchmarks.
 *
 *   const c = await startCluster({ version: '3.5' });   // 3 members, client mTLS
 *   try { ... c.client(c.members[0]) ... } finally { await c.stop(); }
 *
 * Guarantees:
 * - Ports are picked by test-binding random loopback ports *below* the kernel's ephemeral range
 *   (so outgoing connections can never grab them between our probe and etcd's bind); a start
 *   that still loses a race ("address already in use") is retried with fresh ports.
 * - No etcd process outlives the test process: stop() kills by PID (SIGTERM, then SIGKILL);
 *   process 'exit' / SIGINT / SIGTERM / SIGHUP handlers SIGKILL every live member; and a small
 *   watchdog shell per cluster (fed by a pipe from this process) kills the members by PID even if
 *   this process is SIGKILLed.
 * - The cluster dir (data dirs, logs, PKI) is removed on stop unless KEEP_ETCD_DIRS=1.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes, randomInt } from 'node:crypto';
import { closeSync, mkdirSync, openSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { mkdtemp, readFile, rm, stat, open } from 'node:fs/promises';
import { createServer, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { Etcd3, type IOptions } from 'etcd3';
import { noop } from 'cockatiel';
import { etcdBinaries, etcdEnv, unsupportedArch, type EtcdBinaries, type EtcdVersion } from './etcd-bin.ts';
import { makePki, type Pki } from './pki.ts';

export type { EtcdVersion } from './etcd-bin.ts';
export type { Pki } from './pki.ts';

export interface ClusterOptions {
  version: EtcdVersion;
  /** Number of members (default 3). */
  members?: number;
  /** Client TLS with --client-cert-auth (default true). */
  tls?: boolean;
  /** Peer TLS with --peer-client-cert-auth (default false: peers talk plain http). */
  peerTls?: boolean;
  /** --quota-backend-bytes (etcd default 2 GiB). */
  quotaBytes?: number;
  /** --snapshot-count (default 5000; etcd keeps about that many raft entries in memory). */
  snapshotCount?: number;
  /** Extra flags for every member. */
  extraArgs?: string[];
  /** Extra flags for one member (by index). */
  memberArgs?: (index: number) => string[];
  /** Parent of the cluster dir (default $ETCD_HARNESS_DIR or the OS temp dir). */
  baseDir?: string;
  /** Time allowed for all members to become healthy (default 60 s). */
  startTimeoutMs?: number;
  /** Serve /metrics on a separate plain-http listener per member (default true; Member.metricsUrl). */
  metricsListener?: boolean;
}

/** Formats an error as "Class: message" (etcd3 errors lose `.code`; the class is the signal). */
export function errorText(err: unknown): string {
  if (err instanceof Error) return `${err.constructor.name}: ${err.message}`;
  return String(err);
}

/** A client that never retries and has no circuit breaker (see etcd-facts.md). */
export function noRetryFaultHandling(): NonNullable<IOptions['faultHandling']> {
  return { global: noop, host: () => noop };
}

/** Converts a decimal member ID string (as etcd3 returns it) to etcd's hex form. */
export function memberIdHex(dec: string | number | bigint): string {
  return BigInt(dec).toString(16);
}

// ---------------------------------------------------------------------------------------------
// Process-wide cleanup registry

const liveClusters = new Set<Cluster>();
let handlersInstalled = false;

function killAllSync(): void {
  for (const c of liveClusters) c.killSync();
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

/** Kills (SIGKILL, by PID) the etcd members of every live cluster of this process. For emergencies. */
export function killAllClustersSync(): void {
  killAllSync();
}

// ---------------------------------------------------------------------------------------------
// Ports

function ephemeralRange(): [number, number] {
  try {
    const [lo, hi] = readFileSync('/proc/sys/net/ipv4/ip_local_port_range', 'utf8').trim().split(/\s+/).map(Number);
    if (lo && hi) return [lo, hi];
  } catch {
    // not Linux
  }
  return [32768, 60999];
}

function listenOn(port: number): Promise<Server | undefined> {
  return new Promise((resolve) => {
    const s = createServer();
    s.once('error', () => resolve(undefined));
    s.listen({ port, host: '127.0.0.1', exclusive: true }, () => resolve(s));
  });
}

/**
 * Returns `n` distinct loopback ports that were free a moment ago. Candidates are random ports
 * below the ephemeral range (so the kernel does not hand them out as source ports of outgoing
 * connections); all are held open together while choosing, then released. Falls back to
 * port 0 when the range below is too small.
 */
export async function freePorts(n: number): Promise<number[]> {
  const [ephLo] = ephemeralRange();
  const lo = 10000;
  const hi = ephLo - 1;
  const held: Server[] = [];
  const ports: number[] = [];
  try {
    let attempts = 0;
    while (ports.length < n) {
      let port = 0;
      if (hi - lo > 1000 && attempts < n * 50) port = randomInt(lo, hi + 1);
      attempts++;
      if (port !== 0 && ports.includes(port)) continue;
      const s = await listenOn(port);
      if (!s) continue;
      held.push(s);
      const addr = s.address();
      if (addr && typeof addr === 'object') ports.push(addr.port);
    }
  } finally {
    await Promise.all(held.map((s) => new Promise<void>((r) => s.close(() => r()))));
  }
  return ports;
}

// ---------------------------------------------------------------------------------------------
// Members

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
      try {
        process.kill(child.pid, 'SIGCONT');
      } catch {
        /* gone */
      }
    }
    await exited;
  }

  /** Graceful stop: SIGTERM (and SIGCONT if paused), then SIGKILL after `timeoutMs`. */
  async stop(timeoutMs = 10_000): Promise<void> {
    if (!this.isRunning()) return;
    const exited = this.exitPromise!;
    const pid = this.pid;
    try {
      process.kill(pid, 'SIGTERM');
      process.kill(pid, 'SIGCONT');
    } catch {
      /* already gone */
    }
    const timer = new AbortController();
    const res = await Promise.race([exited, sleep(timeoutMs, 'timeout' as const, { signal: timer.signal }).catch(() => 'aborted' as const)]);
    timer.abort();
    if (res === 'timeout') {
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        /* gone */
      }
      await exited;
    }
  }

  /** Resolves when the current process exits. */
  waitExit(): Promise<ExitInfo> {
    return this.exitPromise ?? Promise.resolve(this.lastExit ?? { code: null, signal: null, at: new Date() });
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

/** `p`, or a rejection as soon as `signal` aborts. */
function abortable<T>(p: Promise<T>, signal: AbortSignal | undefined): Promise<T> {
  if (!signal) return p;
  return new Promise<T>((resolve, reject) => {
    const onAbort = (): void => reject(new Error(`aborted: ${String(signal.reason)}`));
    if (signal.aborted) return onAbort();
    signal.addEventListener('abort', onAbort, { once: true });
    p.then(
      (v) => {
        signal.removeEventListener('abort', onAbort);
        resolve(v);
      },
      (e: unknown) => {
        signal.removeEventListener('abort', onAbort);
        reject(e instanceof Error ? e : new Error(String(e)));
      },
    );
  });
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

// ---------------------------------------------------------------------------------------------
// Cluster

export interface EtcdctlResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

class PortInUseError extends Error {}

export class Cluster {
  readonly version: EtcdVersion;
  /** Full etcd version, e.g. "3.5.30". */
  readonly fullVersion: string;
  readonly binaries: EtcdBinaries;
  readonly dir: string;
  readonly tls: boolean;
  readonly peerTls: boolean;
  readonly pki: Pki | undefined;
  readonly token: string;
  /** The options the cluster was started with. */
  readonly options: ClusterOptions;
  members: Member[] = [];

  private readonly clients = new Map<string, Etcd3>();
  private readonly extraClients = new Set<Etcd3>();
  private credentials: IOptions['credentials'];
  private watchdog: ChildProcess | undefined;
  private stopped = false;
  private stopping: Promise<void> | undefined;

  constructor(o: { version: EtcdVersion; binaries: EtcdBinaries; dir: string; tls: boolean; peerTls: boolean; pki?: Pki; options: ClusterOptions }) {
    this.options = o.options;
    this.version = o.version;
    this.binaries = o.binaries;
    this.fullVersion = o.binaries.version;
    this.dir = o.dir;
    this.tls = o.tls;
    this.peerTls = o.peerTls;
    this.pki = o.pki;
    this.token = `defragd-test-${randomBytes(6).toString('hex')}`;
    if (this.pki && this.tls) {
      this.credentials = {
        rootCertificate: readFileSync(this.pki.caFile),
        certChain: readFileSync(this.pki.clientCertFile),
        privateKey: readFileSync(this.pki.clientKeyFile),
      };
    }
  }

  /** Client URLs of all members. */
  endpoints(): string[] {
    return this.members.map((m) => m.clientUrl);
  }

  memberByName(name: string): Member {
    const m = this.members.find((x) => x.name === name);
    if (!m) throw new Error(`no member named ${name}`);
    return m;
  }

  /** Finds a member by hex or decimal ID. */
  memberById(id: string): Member | undefined {
    const hex = /^\d+$/.test(id) && id.length > 16 ? memberIdHex(id) : id;
    return this.members.find((m) => m.id === hex || m.idDec === id);
  }

  /** etcd3 client options (TLS, no retries, no circuit breaker) for the given members. */
  clientOptions(members: Member[] = this.members, extra: Partial<IOptions> = {}): IOptions {
    return {
      hosts: members.map((m) => m.clientUrl),
      ...(this.credentials ? { credentials: this.credentials } : {}),
      faultHandling: noRetryFaultHandling(),
      // Members restart in tests; do not let grpc-js back off reconnecting for up to 2 minutes.
      grpcOptions: { 'grpc.initial_reconnect_backoff_ms': 100, 'grpc.max_reconnect_backoff_ms': 1000 },
      ...extra,
    };
  }

  /**
   * A cached etcd3 client for one member, or for all members if none is given. Do not close it;
   * stop() does. Fault handling is disabled (no retries, no circuit breaker): pass deadlines.
   */
  client(member?: Member): Etcd3 {
    this.assertNotStopped();
    const key = member?.name ?? '*';
    let c = this.clients.get(key);
    if (!c) {
      c = new Etcd3(this.clientOptions(member ? [member] : this.members));
      this.clients.set(key, c);
    }
    return c;
  }

  /** A new, uncached client the caller owns (closed at the latest by stop()). */
  newClient(members: Member | Member[] = this.members, extra: Partial<IOptions> = {}): Etcd3 {
    this.assertNotStopped();
    const c = new Etcd3(this.clientOptions(Array.isArray(members) ? members : [members], extra));
    this.extraClients.add(c);
    return c;
  }

  /** @internal Closes the cached client of `member` (before a restart). */
  dropClient(member: Member): void {
    const c = this.clients.get(member.name);
    if (c) {
      this.clients.delete(member.name);
      c.close();
    }
  }

  /** TLS flags for etcdctl. */
  etcdctlTlsArgs(): string[] {
    if (!this.tls || !this.pki) return [];
    return ['--cacert', this.pki.caFile, '--cert', this.pki.clientCertFile, '--key', this.pki.clientKeyFile];
  }

  /**
   * Runs etcdctl (API v3) with --endpoints (one member or all) and TLS flags filled in.
   * Resolves with the exit code; rejects only if it had to be killed after `timeoutMs` (default 30 s).
   * etcdctl's own --command-timeout defaults to 5 s (too short for defrag of a big db); when
   * `timeoutMs` is given and `args` has no --command-timeout, it is set to timeoutMs too.
   */
  etcdctl(args: string[], opts: { member?: Member; members?: Member[]; timeoutMs?: number; env?: Record<string, string> } = {}): Promise<EtcdctlResult> {
    const members = opts.member ? [opts.member] : (opts.members ?? this.members);
    const timeoutMs = opts.timeoutMs ?? 30_000;
    const extra = opts.timeoutMs !== undefined && !args.some((a) => a.startsWith('--command-timeout')) ? [`--command-timeout=${Math.ceil(timeoutMs / 1000)}s`] : [];
    const full = [`--endpoints=${members.map((m) => m.clientUrl).join(',')}`, ...this.etcdctlTlsArgs(), ...extra, ...args];
    return new Promise((resolve, reject) => {
      const child = spawn(this.binaries.etcdctl, full, {
        stdio: ['ignore', 'pipe', 'pipe'],
        env: etcdEnv({ ETCDCTL_API: '3', ...(opts.env ?? {}) }),
      });
      let stdout = '';
      let stderr = '';
      child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
      child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
      let timedOut = false;
      const timer = setTimeout(() => {
        timedOut = true;
        child.kill('SIGKILL');
      }, timeoutMs + (extra.length ? 5000 : 0));
      child.once('error', (err) => {
        clearTimeout(timer);
        reject(new Error(`etcdctl ${args.join(' ')}: ${errorText(err)}`));
      });
      child.once('close', (code, signal) => {
        clearTimeout(timer);
        if (timedOut) {
          reject(new Error(`etcdctl ${args.join(' ')} timed out after ${timeoutMs} ms\nstdout: ${stdout}\nstderr: ${stderr}`));
        } else {
          resolve({ code, signal, stdout, stderr });
        }
      });
    });
  }

  /** GET of the member's /metrics (Prometheus text) from its plain-http metrics listener. */
  async metrics(member: Member): Promise<string> {
    if (!member.metricsUrl) throw new Error('cluster was started with metricsListener: false');
    const res = await fetch(`${member.metricsUrl}/metrics`, { signal: AbortSignal.timeout(10_000) });
    if (!res.ok) throw new Error(`GET ${member.metricsUrl}/metrics: HTTP ${res.status}`);
    return res.text();
  }

  /**
   * The leader's member ID (hex), as reported by the first running, unpaused member that knows a
   * leader. Retries for up to `timeoutMs` (default 15 s) while there is no leader.
   */
  async leaderId(timeoutMs = 15_000): Promise<string> {
    const deadline = Date.now() + timeoutMs;
    let lastErr = 'no member answered';
    for (;;) {
      const candidates = this.members.filter((m) => m.isRunning() && !m.isPaused);
      const answers = await Promise.all(
        candidates.map(async (m) => {
          try {
            const s = await this.client(m).maintenance.status({ deadline: Date.now() + 2000 });
            return s.leader && s.leader !== '0' ? memberIdHex(s.leader) : undefined;
          } catch (err) {
            lastErr = `${m.name}: ${errorText(err)}`;
            return undefined;
          }
        }),
      );
      const found = answers.find((a): a is string => !!a);
      if (found) return found;
      if (Date.now() > deadline) throw new Error(`no leader known after ${timeoutMs} ms (${lastErr})`);
      await sleep(200);
    }
  }

  /** The leader Member. */
  async leader(timeoutMs?: number): Promise<Member> {
    const id = await this.leaderId(timeoutMs);
    const m = this.memberById(id);
    if (!m) throw new Error(`leader ${id} is not a member of this cluster (${this.members.map((x) => x.id).join(', ')})`);
    return m;
  }

  /**
   * @internal Waits until `member` answers Status with a known leader and serves a linearizable
   * read (which needs the leader). Throws with the log tail if it exits or times out.
   */
  async waitHealthy(member: Member, timeoutMs: number, signal?: AbortSignal): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    let last = 'no answer yet';
    for (;;) {
      if (signal?.aborted) throw new Error(`gave up waiting for ${member.name}: ${String(signal.reason)}`);
      if (!member.isRunning()) {
        const tail = await member.logTail(40);
        if (/address already in use/.test(tail)) throw new PortInUseError(`${member.name}: address already in use`);
        const ex = member.lastExit;
        throw new Error(
          `etcd ${this.fullVersion} member ${member.name} exited (code ${ex?.code ?? '?'}, signal ${ex?.signal ?? '-'}) before becoming healthy; ` +
            `log ${member.logFile} ends with:\n${tail}`,
        );
      }
      const c = this.client(member);
      try {
        // (Before it has a quorum, etcd 3.5 accepts connections but does not answer yet.)
        const s = await abortable(c.maintenance.status({ deadline: Date.now() + 2000 }), signal);
        if (!s.leader || s.leader === '0') {
          last = 'Status answered but no leader yet';
        } else {
          await abortable(c.get('defragd-harness/health').options({ deadline: Date.now() + 3000 }).exec(), signal);
          member.idDec = s.header.member_id;
          member.id = memberIdHex(s.header.member_id);
          return;
        }
      } catch (err) {
        last = errorText(err);
      }
      if (Date.now() > deadline) {
        throw new Error(
          `etcd ${this.fullVersion} member ${member.name} (${member.clientUrl}, pid ${member.pid}) not healthy after ${timeoutMs} ms: ${last}; ` +
            `log ${member.logFile} ends with:\n${await member.logTail(40)}`,
        );
      }
      await sleep(150);
    }
  }

  /** @internal */
  appendNote(member: Member, note: string): void {
    try {
      writeFileSync(member.logFile, `# harness: ${new Date().toISOString()} ${note}\n`, { flag: 'a' });
    } catch {
      /* ignore */
    }
  }

  /** @internal Starts the watchdog that kills members if this process dies without cleaning up. */
  startWatchdog(): void {
    const keep = process.env.KEEP_ETCD_DIRS === '1' ? '1' : '0';
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
    const wd = spawn('bash', ['-c', script, 'etcd-harness-watchdog', this.dir, keep], {
      stdio: ['pipe', 'ignore', 'ignore'],
      detached: true,
    });
    wd.on('error', () => {
      /* best effort */
    });
    wd.unref();
    (wd.stdin as unknown as Socket | null)?.unref?.();
    this.watchdog = wd;
  }

  /** PID of the watchdog shell (0 if none). */
  get watchdogPid(): number {
    return this.watchdog?.pid ?? 0;
  }

  /** @internal Synchronous emergency cleanup (process exit / signals). */
  killSync(): void {
    for (const m of this.members) {
      if (m.isRunning()) {
        try {
          process.kill(m.pid, 'SIGKILL');
        } catch {
          /* gone */
        }
      }
    }
    void this.killWatchdog();
    if (process.env.KEEP_ETCD_DIRS !== '1') {
      try {
        rmSync(this.dir, { recursive: true, force: true, maxRetries: 3 });
      } catch {
        /* best effort */
      }
    }
    liveClusters.delete(this);
  }

  private assertNotStopped(): void {
    if (this.stopped) throw new Error('cluster is stopped');
  }

  /** @internal */
  register(): void {
    installHandlers();
    liveClusters.add(this);
  }

  /**
   * Stops every member (SIGTERM, SIGKILL after `timeoutMs`, default 5 s), closes clients, and
   * removes the cluster dir unless KEEP_ETCD_DIRS=1. Idempotent.
   */
  stop(timeoutMs = 5_000): Promise<void> {
    this.stopping ??= this.doStop(timeoutMs);
    return this.stopping;
  }

  private closeClients(): void {
    for (const c of [...this.clients.values(), ...this.extraClients]) {
      try {
        c.close();
      } catch {
        /* ignore */
      }
    }
    this.clients.clear();
    this.extraClients.clear();
  }

  /** Kills the watchdog; the promise resolves once it has exited (at most ~2 s). */
  private killWatchdog(): Promise<void> {
    const wd = this.watchdog;
    this.watchdog = undefined;
    if (!wd?.pid || wd.exitCode !== null || wd.signalCode !== null) return Promise.resolve();
    const exited = new Promise<void>((resolve) => {
      const timer = setTimeout(resolve, 2000);
      wd.once('exit', () => {
        clearTimeout(timer);
        resolve();
      });
    });
    try {
      process.kill(wd.pid, 'SIGKILL');
    } catch {
      /* gone */
    }
    return exited;
  }

  /** @internal After a failed start: kill members and watchdog, unregister; keep the dir. */
  async abortStart(): Promise<void> {
    this.stopped = true;
    this.closeClients();
    await Promise.all(this.members.map((m) => m.kill('SIGKILL')));
    await this.killWatchdog();
    liveClusters.delete(this);
  }

  private async doStop(timeoutMs: number): Promise<void> {
    // A leader that gets SIGTERM tries to hand leadership over first, which takes the full
    // election timeout and more (~7 s) when its followers are shutting down at the same time.
    // Stopping the followers first makes the leader's shutdown immediate.
    let leaderName: string | undefined;
    try {
      const running = this.members.filter((m) => m.isRunning() && !m.isPaused);
      if (running.length > 1) {
        const id = await Promise.any(
          running.map(async (m) => {
            const s = await this.client(m).maintenance.status({ deadline: Date.now() + 1500 });
            if (!s.leader || s.leader === '0') throw new Error('no leader');
            return memberIdHex(s.leader);
          }),
        );
        leaderName = this.memberById(id)?.name;
      }
    } catch {
      // no leader known: stop all at once
    }
    this.stopped = true;
    this.closeClients();
    await Promise.all(this.members.filter((m) => m.name !== leaderName).map((m) => m.stop(timeoutMs)));
    await Promise.all(this.members.filter((m) => m.name === leaderName).map((m) => m.stop(timeoutMs)));
    await this.killWatchdog();
    liveClusters.delete(this);
    if (process.env.KEEP_ETCD_DIRS === '1') {
      process.stderr.write(`etcd harness: kept ${this.dir}\n`);
    } else {
      await rm(this.dir, { recursive: true, force: true, maxRetries: 3 });
    }
  }
}

/** Starts a cluster and waits until every member is healthy. */
export async function startCluster(opts: ClusterOptions): Promise<Cluster> {
  const binaries = await etcdBinaries(opts.version);
  const n = opts.members ?? 3;
  if (!Number.isInteger(n) || n < 1) throw new Error(`members must be a positive integer, got ${n}`);
  const tls = opts.tls ?? true;
  const peerTls = opts.peerTls ?? false;
  const baseDir = opts.baseDir ?? process.env.ETCD_HARNESS_DIR ?? tmpdir();
  mkdirSync(baseDir, { recursive: true });
  const dir = await mkdtemp(join(baseDir, `etcd-${opts.version}-`));
  let pki: Pki | undefined;
  try {
    if (tls || peerTls) pki = await makePki(join(dir, 'pki'));
  } catch (err) {
    await rm(dir, { recursive: true, force: true });
    throw err;
  }
  const maxAttempts = 4;
  for (let attempt = 1; ; attempt++) {
    const cluster = new Cluster({ version: opts.version, binaries, dir, tls, peerTls, options: opts, ...(pki ? { pki } : {}) });
    try {
      await launch(cluster, n, opts);
      return cluster;
    } catch (err) {
      // Kill what was started but keep the dir (and PKI) for a retry.
      await cluster.abortStart();
      if (err instanceof PortInUseError && attempt < maxAttempts) {
        for (const m of cluster.members) {
          await rm(m.dataDir, { recursive: true, force: true });
          await rm(m.logFile, { force: true });
        }
        continue;
      }
      if (process.env.KEEP_ETCD_DIRS === '1') {
        process.stderr.write(`etcd harness: kept ${dir}\n`);
      } else {
        await rm(dir, { recursive: true, force: true, maxRetries: 3 });
        if (err instanceof Error) err.message += `\n(cluster dir ${dir} was removed; set KEEP_ETCD_DIRS=1 to keep it)`;
      }
      throw err;
    }
  }
}

async function launch(cluster: Cluster, n: number, opts: ClusterOptions): Promise<void> {
  const withMetrics = opts.metricsListener ?? true;
  const per = withMetrics ? 3 : 2;
  const ports = await freePorts(n * per);
  const names = Array.from({ length: n }, (_, i) => `m${i}`);
  const peerScheme = cluster.peerTls ? 'https' : 'http';
  const clientScheme = cluster.tls ? 'https' : 'http';
  const initialCluster = names.map((name, i) => `${name}=${peerScheme}://127.0.0.1:${ports[i * per + 1]}`).join(',');
  mkdirSync(join(cluster.dir, '.pids'), { recursive: true });
  const pki = cluster.pki;

  for (let i = 0; i < n; i++) {
    const client = ports[i * per]!;
    const peer = ports[i * per + 1]!;
    const metrics = withMetrics ? ports[i * per + 2] : undefined;
    const name = names[i]!;
    const clientUrl = `${clientScheme}://127.0.0.1:${client}`;
    const peerUrl = `${peerScheme}://127.0.0.1:${peer}`;
    const args = [
      '--name', name,
      '--data-dir', join(cluster.dir, `${name}.etcd`),
      '--listen-client-urls', clientUrl,
      '--advertise-client-urls', clientUrl,
      '--listen-peer-urls', peerUrl,
      '--initial-advertise-peer-urls', peerUrl,
      '--initial-cluster', initialCluster,
      '--initial-cluster-token', cluster.token,
      '--snapshot-count', String(opts.snapshotCount ?? 5000),
      '--logger', 'zap',
      '--log-outputs', 'stderr',
    ];
    if (metrics) args.push('--listen-metrics-urls', `http://127.0.0.1:${metrics}`);
    if (opts.quotaBytes !== undefined) args.push('--quota-backend-bytes', String(opts.quotaBytes));
    if (cluster.tls && pki) {
      args.push('--cert-file', pki.serverCertFile, '--key-file', pki.serverKeyFile, '--trusted-ca-file', pki.caFile, '--client-cert-auth');
    }
    if (cluster.peerTls && pki) {
      args.push('--peer-cert-file', pki.serverCertFile, '--peer-key-file', pki.serverKeyFile, '--peer-trusted-ca-file', pki.caFile, '--peer-client-cert-auth');
    }
    args.push(...(opts.extraArgs ?? []), ...(opts.memberArgs?.(i) ?? []));
    cluster.members.push(new Member(cluster, i, { client, peer, ...(metrics ? { metrics } : {}) }, args));
  }

  cluster.register();
  cluster.startWatchdog();
  for (const m of cluster.members) m.spawnProcess('new');
  const timeoutMs = opts.startTimeoutMs ?? 60_000;
  // Fail fast: once one member failed, stop waiting for the others.
  const ac = new AbortController();
  const results = await Promise.allSettled(
    cluster.members.map((m) =>
      cluster.waitHealthy(m, timeoutMs, ac.signal).catch((err: unknown) => {
        if (!ac.signal.aborted) ac.abort(`${m.name} failed`);
        throw err;
      }),
    ),
  );
  const failures = results.filter((r): r is PromiseRejectedResult => r.status === 'rejected').map((r) => r.reason as unknown);
  if (failures.length) {
    const portErr = failures.find((e) => e instanceof PortInUseError);
    if (portErr) throw portErr;
    // The member that failed first is the interesting one; the others merely gave up.
    const first = failures.find((e) => !(e instanceof Error && e.message.startsWith('gave up waiting'))) ?? failures[0];
    throw first instanceof Error ? first : new Error(String(first));
  }
}

// ---------------------------------------------------------------------------------------------
// Defrag events from the members' logs

export interface DefragEvent {
  /** Member name (e.g. "m1"). */
  member: string;
  /** Time etcd logged "starting defragment" (the Defragment RPC arrived). */
  start: Date;
  /** Time etcd logged "finished defragment" / "failed to defragment"; undefined while running. */
  end?: Date;
  /** Set when the defrag failed ("failed to defragment"), with etcd's error text. */
  error?: string;
  /** Set when the member process restarted before the defrag finished (end = restart time). */
  interrupted?: boolean;
  /** From etcd's backend lines ("defragmenting" / "defragmented" or "finished defragmenting directory"). */
  dbSizeBefore?: number;
  dbSizeInUseBefore?: number;
  dbSizeAfter?: number;
  /** The backend's own "took" (the file rewrite, without waiting for locks). */
  backendTookMs?: number;
}

interface LogLine {
  ts?: string;
  msg?: string;
  error?: string;
  took?: string;
  'current-db-size-bytes'?: number;
  'current-db-size-in-use-bytes'?: number;
}

/** Parses a Go duration ("2.19ms", "5.2s", "1m3.5s") to milliseconds. */
export function goDurationMs(d: string): number | undefined {
  const unit: Record<string, number> = { h: 3_600_000, m: 60_000, s: 1000, ms: 1, us: 1e-3, 'µs': 1e-3, ns: 1e-6 };
  let total = 0;
  let matched = false;
  for (const m of d.matchAll(/(\d+(?:\.\d+)?)(ms|us|µs|ns|h|m|s)/g)) {
    total += Number(m[1]) * unit[m[2]!]!;
    matched = true;
  }
  return matched ? total : undefined;
}

/**
 * Parses the member's etcd log (all its process lifetimes) for defrag intervals.
 * etcd 3.4.23 and 3.5.30 (zap JSON) both log, from v3rpc/maintenance.go,
 * "starting defragment" before and "finished defragment" after a successful defrag
 * (or "failed to defragment" with an "error" field), with the time in "ts" (ISO 8601, UTC).
 */
export async function defragEvents(member: Member): Promise<DefragEvent[]> {
  let text: string;
  try {
    text = await readFile(member.logFile, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return [];
    throw err;
  }
  const events: DefragEvent[] = [];
  const open: DefragEvent[] = [];
  for (const line of text.split('\n')) {
    if (!line.startsWith('{') || !line.includes('"msg"')) continue;
    if (!/defragment|starting an etcd server/.test(line)) continue;
    let rec: LogLine;
    try {
      rec = JSON.parse(line) as LogLine;
    } catch {
      continue;
    }
    if (!rec.ts || !rec.msg) continue;
    const at = new Date(rec.ts);
    if (Number.isNaN(at.getTime())) continue;
    switch (rec.msg) {
      case 'starting defragment': {
        const ev: DefragEvent = { member: member.name, start: at };
        events.push(ev);
        open.push(ev);
        break;
      }
      case 'finished defragment': {
        const ev = open.shift();
        if (ev) ev.end = at;
        break;
      }
      case 'failed to defragment': {
        const ev = open.shift();
        if (ev) {
          ev.end = at;
          ev.error = rec.error ?? 'failed';
        }
        break;
      }
      case 'defragmenting': {
        const ev = open.find((e) => e.dbSizeBefore === undefined);
        if (ev) {
          if (rec['current-db-size-bytes'] !== undefined) ev.dbSizeBefore = rec['current-db-size-bytes'];
          if (rec['current-db-size-in-use-bytes'] !== undefined) ev.dbSizeInUseBefore = rec['current-db-size-in-use-bytes'];
        }
        break;
      }
      case 'defragmented': // 3.4
      case 'finished defragmenting directory': {
        // 3.5
        const ev = open.find((e) => e.dbSizeAfter === undefined);
        if (ev) {
          if (rec['current-db-size-bytes'] !== undefined) ev.dbSizeAfter = rec['current-db-size-bytes'];
          const took = rec.took ? goDurationMs(rec.took) : undefined;
          if (took !== undefined) ev.backendTookMs = took;
        }
        break;
      }
      case 'starting an etcd server': {
        for (const ev of open.splice(0)) {
          ev.end = at;
          ev.interrupted = true;
        }
        break;
      }
      default:
        break;
    }
  }
  return events;
}

/** Defrag events of every member, sorted by start time. */
export async function allDefragEvents(cluster: Cluster): Promise<DefragEvent[]> {
  const all = (await Promise.all(cluster.members.map((m) => defragEvents(m)))).flat();
  return all.sort((a, b) => a.start.getTime() - b.start.getTime());
}

function fmtEvent(e: DefragEvent): string {
  const end = e.end ? e.end.toISOString() : 'still running';
  const extra = e.error ? ` (failed: ${e.error})` : e.interrupted ? ' (interrupted by restart)' : '';
  return `${e.member} ${e.start.toISOString()} .. ${end}${extra}`;
}

/**
 * Throws if the defrag intervals of two different members overlap. An unfinished interval counts
 * as open until `now` (default: the current time). Touching intervals (end == start) are fine.
 */
export function assertNoOverlap(events: DefragEvent[], now: Date = new Date()): void {
  const sorted = [...events].sort((a, b) => a.start.getTime() - b.start.getTime());
  const end = (e: DefragEvent): number => (e.end ?? now).getTime();
  const problems: string[] = [];
  for (let i = 0; i < sorted.length; i++) {
    for (let j = i + 1; j < sorted.length; j++) {
      const a = sorted[i]!;
      const b = sorted[j]!;
      if (b.start.getTime() >= end(a)) continue;
      if (a.member === b.member) continue;
      const overlapMs = Math.min(end(a), end(b)) - b.start.getTime();
      problems.push(`  ${fmtEvent(a)}\n  overlaps ${fmtEvent(b)}\n  by ${overlapMs} ms`);
    }
  }
  if (problems.length) {
    throw new Error(
      `defragmentation of different members overlapped (${problems.length} pair(s)):\n${problems.join('\n')}\n` +
        `all defrag intervals:\n${sorted.map((e) => `  ${fmtEvent(e)}`).join('\n')}`,
    );
  }
}
