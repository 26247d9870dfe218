/**
 * Real multi-member etcd clusters on loopback for integration tests and benchmarks: the cluster
 * (its dir, PKI, flags, clients, etcdctl, leader, health) and its start and stop. One member's
 * process is member.ts; ports are ports.ts; cleanup if this process dies is reaper.ts; the
 * defrag intervals in the members' logs are defrag-log.ts.
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
import { randomBytes } from 'node:crypto';
import { mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { Etcd3, type IOptions } from 'etcd3';
import { noop } from 'cockatiel';
import { hexId } from '../../src/view.ts';
import { errorText } from './errors.ts';
import { etcdBinaries, etcdEnv, type EtcdBinaries, type EtcdVersion } from './etcd-bin.ts';
import { Member } from './member.ts';
import { makePki, type Pki } from './pki.ts';
import { freePorts } from './ports.ts';
import { killWatchdog, reaped, reapOnExit, signalQuietly, startWatchdog } from './reaper.ts';

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

/**
 * Fault handling for a client that never retries and has no circuit breaker (cockatiel's no-op
 * policies): a test sees every failure as it happens and passes its own deadlines.
 */
export function noRetryFaultHandling(): NonNullable<IOptions['faultHandling']> {
  return { global: noop, host: () => noop };
}

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

  constructor(o: {
    version: EtcdVersion;
    binaries: EtcdBinaries;
    dir: string;
    tls: boolean;
    peerTls: boolean;
    pki?: Pki;
    options: ClusterOptions;
  }) {
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

  /** Finds a member by hex or decimal ID. */
  memberById(id: string): Member | undefined {
    const hex = /^\d+$/.test(id) && id.length > 16 ? hexId(id) : id;
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
  etcdctl(
    args: string[],
    opts: { member?: Member; members?: Member[]; timeoutMs?: number; env?: Record<string, string> } = {},
  ): Promise<EtcdctlResult> {
    const members = opts.member ? [opts.member] : (opts.members ?? this.members);
    const timeoutMs = opts.timeoutMs ?? 30_000;
    const extra =
      opts.timeoutMs !== undefined && !args.some((a) => a.startsWith('--command-timeout'))
        ? [`--command-timeout=${Math.ceil(timeoutMs / 1000)}s`]
        : [];
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
      const timer = setTimeout(
        () => {
          timedOut = true;
          child.kill('SIGKILL');
        },
        timeoutMs + (extra.length ? 5000 : 0),
      );
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
            return s.leader && s.leader !== '0' ? hexId(s.leader) : undefined;
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
          await abortable(
            c
              .get('defragd-harness/health')
              .options({ deadline: Date.now() + 3000 })
              .exec(),
            signal,
          );
          member.idDec = s.header.member_id;
          member.id = hexId(s.header.member_id);
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
    this.watchdog = startWatchdog(this.dir, process.env.KEEP_ETCD_DIRS === '1');
  }

  /** PID of the watchdog shell (0 if none). */
  get watchdogPid(): number {
    return this.watchdog?.pid ?? 0;
  }

  /** @internal Synchronous emergency cleanup (process exit / signals). */
  killSync(): void {
    for (const m of this.members) {
      if (m.isRunning()) signalQuietly(m.pid, 'SIGKILL');
    }
    void this.killWatchdog();
    if (process.env.KEEP_ETCD_DIRS !== '1') {
      try {
        rmSync(this.dir, { recursive: true, force: true, maxRetries: 3 });
      } catch {
        /* best effort */
      }
    }
    reaped(this);
  }

  private assertNotStopped(): void {
    if (this.stopped) throw new Error('cluster is stopped');
  }

  /** @internal */
  register(): void {
    reapOnExit(this);
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
    return killWatchdog(wd);
  }

  /** @internal After a failed start: kill members and watchdog, unregister; keep the dir. */
  async abortStart(): Promise<void> {
    this.stopped = true;
    this.closeClients();
    await Promise.all(this.members.map((m) => m.kill('SIGKILL')));
    await this.killWatchdog();
    reaped(this);
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
            return hexId(s.leader);
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
    reaped(this);
    if (process.env.KEEP_ETCD_DIRS === '1') {
      process.stderr.write(`etcd harness: kept ${this.dir}\n`);
    } else {
      await rm(this.dir, { recursive: true, force: true, maxRetries: 3 });
    }
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
      '--name',
      name,
      '--data-dir',
      join(cluster.dir, `${name}.etcd`),
      '--listen-client-urls',
      clientUrl,
      '--advertise-client-urls',
      clientUrl,
      '--listen-peer-urls',
      peerUrl,
      '--initial-advertise-peer-urls',
      peerUrl,
      '--initial-cluster',
      initialCluster,
      '--initial-cluster-token',
      cluster.token,
      '--snapshot-count',
      String(opts.snapshotCount ?? 5000),
      '--logger',
      'zap',
      '--log-outputs',
      'stderr',
    ];
    if (metrics) args.push('--listen-metrics-urls', `http://127.0.0.1:${metrics}`);
    if (opts.quotaBytes !== undefined) args.push('--quota-backend-bytes', String(opts.quotaBytes));
    if (cluster.tls && pki) {
      args.push('--cert-file', pki.serverCertFile, '--key-file', pki.serverKeyFile, '--trusted-ca-file', pki.caFile, '--client-cert-auth');
    }
    if (cluster.peerTls && pki) {
      args.push(
        '--peer-cert-file',
        pki.serverCertFile,
        '--peer-key-file',
        pki.serverKeyFile,
        '--peer-trusted-ca-file',
        pki.caFile,
        '--peer-client-cert-auth',
      );
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
