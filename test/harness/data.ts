/**
 * Filling a test cluster with data: a fragmented db (in-use + reclaimable bytes), or writes until
 * the NOSPACE alarm; reading it back; member Status.
 */
import { createHash, randomBytes } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import type { Etcd3 } from 'etcd3';
import { prefixEnd, toStatus } from '../../src/etcd.ts';
import type { MemberStatus } from '../../src/view.ts';
import { hexId } from '../../src/view.ts';
import { formatBytes } from '../../src/units.ts';
import type { Cluster } from './cluster.ts';
import { errorText } from './errors.ts';
import type { Member } from './member.ts';

/** The daemon's MemberStatus (src/view.ts) of a test member, plus what tests compare: its name and hex IDs. */
export interface TestMemberStatus extends MemberStatus {
  member: string;
  /** Hex member ID. */
  id: string;
  /** Hex member ID of the leader this member believes in ('0' if none). */
  leaderHex: string;
  isLeader: boolean;
}

/** Maintenance Status of one member (deadline `timeoutMs`, default 5 s), decoded as the daemon decodes it. */
export async function memberStatus(cluster: Cluster, member: Member, opts: { timeoutMs?: number } = {}): Promise<TestMemberStatus> {
  const s = await cluster.client(member).maintenance.status({ deadline: Date.now() + (opts.timeoutMs ?? 5000) });
  const status = toStatus(member.clientUrl, s);
  const id = hexId(status.memberId);
  const leaderHex = s.leader && s.leader !== '0' ? hexId(s.leader) : '0';
  return { ...status, member: member.name, id, leaderHex, isLeader: leaderHex === id };
}

/** Status of every running, unpaused member. */
export async function clusterStatus(cluster: Cluster, opts: { timeoutMs?: number } = {}): Promise<TestMemberStatus[]> {
  const ms = cluster.members.filter((m) => m.isRunning() && !m.isPaused);
  return Promise.all(ms.map((m) => memberStatus(cluster, m, opts)));
}

export function fmtStatus(s: TestMemberStatus): string {
  return `${s.member}: dbSize ${formatBytes(s.dbSize)}, inUse ${formatBytes(s.dbSizeInUse)}, reclaimable ${formatBytes(s.dbSize - s.dbSizeInUse)}`;
}

/** Runs `fn(i)` for i in [0, n) with at most `concurrency` in flight; rejects on the first failure. */
async function pool(n: number, concurrency: number, fn: (i: number) => Promise<void>): Promise<void> {
  let next = 0;
  let failed: unknown;
  const worker = async (): Promise<void> => {
    while (failed === undefined && next < n) {
      const i = next++;
      try {
        await fn(i);
      } catch (err) {
        failed ??= err;
      }
    }
  };
  await Promise.all(Array.from({ length: Math.min(concurrency, n) }, worker));
  if (failed !== undefined) throw failed;
}

/** Retries `fn` (idempotent) a few times with backoff; the harness clients never retry by themselves. */
async function withRetry<T>(what: string, fn: () => Promise<T>, attempts = 6): Promise<T> {
  let last: unknown;
  for (let a = 0; a < attempts; a++) {
    try {
      return await fn();
    } catch (err) {
      last = err;
      if (/database space exceeded|permission denied|request is too large|compacted|future revision/i.test(String((err as Error)?.message)))
        break;
      await sleep(100 * 2 ** a);
    }
  }
  throw new Error(`${what} failed after retries: ${errorText(last)}`);
}

function runningClients(cluster: Cluster): Etcd3[] {
  const ms = cluster.members.filter((m) => m.isRunning() && !m.isPaused);
  if (ms.length === 0) throw new Error('no running member');
  return ms.map((m) => cluster.client(m));
}

/** Default value size: fits (with key and bbolt/mvcc overhead) in exactly 16 pages of 4 KiB. */
export const DEFAULT_VALUE_BYTES = 16 * 4096 - 256;
const MAX_VALUE_BYTES = 1024 * 1024;

export interface FillOptions {
  /** Approximate bytes of live data to leave in the db. */
  inUseBytes: number;
  /** Approximate bytes to leave as free pages (dbSize - dbSizeInUse) after compaction. */
  reclaimableBytes: number;
  /** Key prefix (default "fill/"); live keys go under PREFIX k/, garbage under PREFIX g/. */
  prefix?: string;
  /** Value size (default ~64 KiB; at most 1 MiB). Smaller values mean more raft entries, less memory per entry. */
  valueBytes?: number;
  /** Concurrent puts (default 16). */
  concurrency?: number;
  /**
   * Garbage is interleaved with live keys in runs of this many keys (default 128, i.e. 8 MiB runs
   * with the default value size). Shorter runs scatter the free pages more finely but make the
   * compaction move live values too (bbolt merges underfull leaves): with 24+24 MiB, runs of
   * 1/8/32/128 keys gave 43/42/29/25.6 MiB reclaimable instead of 24.
   */
  runKeys?: number;
  /** Progress/result lines go here (e.g. t.diagnostic); default: nowhere. */
  log?: (line: string) => void;
  /** Max time to wait for every member to show the freed pages (default 60 s). */
  settleTimeoutMs?: number;
}

export interface FillResult {
  /** Live keys written. */
  keys: number;
  /** Garbage keys written, then deleted and compacted away. */
  garbageKeys: number;
  /** Current revision after the fill. */
  revision: string;
  /** Revision the fill compacted at. */
  compactRevision: string;
  elapsedMs: number;
  /** Status of each member after the free pages settled. */
  members: TestMemberStatus[];
}

/**
 * Writes live keys (~inUseBytes) interleaved with garbage keys (~reclaimableBytes), deletes the
 * garbage, compacts to the latest revision (physical) and waits until every member reports the
 * freed pages. Result: a db of roughly inUseBytes in use plus reclaimableBytes free pages, with the
 * free pages scattered between live ones (as in a real fragmented db).
 */
export async function fill(cluster: Cluster, opts: FillOptions): Promise<FillResult> {
  const t0 = Date.now();
  const prefix = opts.prefix ?? 'fill/';
  const valueBytes = Math.min(opts.valueBytes ?? DEFAULT_VALUE_BYTES, MAX_VALUE_BYTES);
  if (valueBytes < 1) throw new Error('valueBytes must be positive');
  const live = Math.max(0, Math.ceil(opts.inUseBytes / valueBytes));
  const garbage = Math.max(0, Math.ceil(opts.reclaimableBytes / valueBytes));
  const total = live + garbage;
  const log = opts.log ?? (() => {});
  const clients = runningClients(cluster);

  // A few random buffers, each put gets one with its index stamped in the first bytes.
  const bufs = Array.from({ length: 8 }, () => randomBytes(valueBytes));
  let liveIdx = 0;
  let garbageIdx = 0;
  // Garbage is interleaved with live data in runs of RUN keys (Bresenham over runs). Runs, not
  // single keys: when compaction deletes a key whose bbolt leaf then holds too few keys, bbolt
  // merges it with a neighbour and so rewrites (moves) live values too; with single-key
  // interleaving that roughly doubled the free space. With long runs only the run edges move.
  const RUN = Math.max(1, opts.runKeys ?? 128);
  const plan: string[] = [];
  const runs = Math.ceil(total / RUN);
  const garbageRuns = Math.round((garbage / Math.max(total, 1)) * runs);
  for (let r = 0; r < runs; r++) {
    const isGarbage = Math.floor(((r + 1) * garbageRuns) / runs) > Math.floor((r * garbageRuns) / runs);
    for (let j = 0; j < RUN; j++) {
      if (isGarbage ? garbageIdx < garbage : liveIdx < live) {
        plan.push(isGarbage ? `${prefix}g/${String(garbageIdx++).padStart(8, '0')}` : `${prefix}k/${String(liveIdx++).padStart(8, '0')}`);
      }
    }
  }
  // Whatever the rounding left over.
  while (liveIdx < live) plan.push(`${prefix}k/${String(liveIdx++).padStart(8, '0')}`);
  while (garbageIdx < garbage) plan.push(`${prefix}g/${String(garbageIdx++).padStart(8, '0')}`);
  let done = 0;
  let lastLog = Date.now();
  await pool(plan.length, opts.concurrency ?? 16, async (i) => {
    const key = plan[i]!;
    const value = Buffer.from(bufs[i % bufs.length]!);
    value.writeUInt32BE(i, 0);
    const client = clients[i % clients.length]!;
    await withRetry(`put ${key}`, () =>
      client
        .put(key)
        .value(value)
        .options({ deadline: Date.now() + 30_000 })
        .exec(),
    );
    done++;
    if (Date.now() - lastLog > 5000) {
      lastLog = Date.now();
      log(`fill: ${done}/${total} puts (${formatBytes(done * valueBytes)}) after ${((Date.now() - t0) / 1000).toFixed(1)} s`);
    }
  });

  const c0 = clients[0]!;
  let compactRevision: string;
  if (garbage > 0) {
    const del = await withRetry('delete garbage', () =>
      c0.kv.deleteRange({ key: Buffer.from(`${prefix}g/`), range_end: prefixEnd(`${prefix}g/`) }, { deadline: Date.now() + 60_000 }),
    );
    compactRevision = del.header.revision;
  } else {
    const r = await c0.kv.range({ key: Buffer.from(prefix), limit: 1 }, { deadline: Date.now() + 10_000 });
    compactRevision = r.header.revision;
  }
  await withRetry('compact', () => c0.kv.compact({ revision: compactRevision, physical: true }, { deadline: Date.now() + 120_000 })).catch(
    (err: unknown) => {
      if (!/compacted/.test(String(err))) throw err;
    },
  );

  // bbolt only counts pages freed by the compaction as free after a later commit, and followers
  // compact asynchronously: poke with tiny writes until each member's free space stops growing.
  const members = await settle(cluster, c0, prefix, opts.settleTimeoutMs ?? 60_000, garbage > 0 ? opts.reclaimableBytes * 0.5 : 0);
  const rev = await c0.kv.range({ key: Buffer.from(`${prefix}sync`) }, { deadline: Date.now() + 10_000 });
  const result: FillResult = {
    keys: live,
    garbageKeys: garbage,
    revision: rev.header.revision,
    compactRevision,
    elapsedMs: Date.now() - t0,
    members,
  };
  log(`fill: ${live} live + ${garbage} garbage keys of ${valueBytes} B in ${(result.elapsedMs / 1000).toFixed(1)} s`);
  for (const s of members) log(`fill: ${fmtStatus(s)}`);
  return result;
}

async function settle(
  cluster: Cluster,
  client: Etcd3,
  prefix: string,
  timeoutMs: number,
  expectReclaimable: number,
): Promise<TestMemberStatus[]> {
  const deadline = Date.now() + timeoutMs;
  let prev: TestMemberStatus[] | undefined;
  let stableRounds = 0;
  for (let round = 0; ; round++) {
    await client
      .put(`${prefix}sync`)
      .value(String(round))
      .options({ deadline: Date.now() + 10_000 })
      .exec();
    await sleep(250);
    const cur = await clusterStatus(cluster, { timeoutMs: 10_000 });
    const grew =
      !prev ||
      cur.some((s) => {
        const p = prev!.find((x) => x.member === s.member);
        return !p || s.dbSize - s.dbSizeInUse > p.dbSize - p.dbSizeInUse + 256 * 1024;
      });
    const enough = cur.every((s) => s.dbSize - s.dbSizeInUse >= expectReclaimable);
    stableRounds = grew ? 0 : stableRounds + 1;
    prev = cur;
    if ((enough && stableRounds >= 1) || stableRounds >= 4 || Date.now() > deadline) return cur;
  }
}

export interface NoSpaceOptions {
  /** Key prefix (default "nospace/"). */
  prefix?: string;
  /** Value size (default ~64 KiB). */
  valueBytes?: number;
  /** Concurrent puts (default 4). */
  concurrency?: number;
  /** Give up (throw) after writing this many bytes without NOSPACE (default 2 x quotaBytes, or 4 GiB). */
  maxBytes?: number;
  log?: (line: string) => void;
}

export interface Written {
  prefix: string;
  /** key -> sha256 (hex) of the value, for every put etcd acknowledged. */
  digests: Map<string, string>;
  /**
   * key -> sha256 of puts that failed: the key may or may not exist. This includes puts that failed
   * with NOSPACE - the put that crosses the quota is applied and still answered with NOSPACE.
   */
  uncertain: Map<string, string>;
  bytes: number;
  /** The error text of the put that hit the quota. */
  noSpaceError: string;
}

const sha256 = (b: Buffer | Uint8Array): string => createHash('sha256').update(b).digest('hex');

export function isNoSpaceError(err: unknown): boolean {
  return /database space exceeded/i.test(String((err as Error)?.message ?? err));
}

/**
 * Puts random values until etcd answers "database space exceeded" (the quota, e.g. a cluster
 * started with quotaBytes: 64 MiB). Returns a digest of everything acknowledged, for verifyData.
 */
export async function fillUntilNoSpace(cluster: Cluster, opts: NoSpaceOptions = {}): Promise<Written> {
  const prefix = opts.prefix ?? 'nospace/';
  const valueBytes = Math.min(opts.valueBytes ?? DEFAULT_VALUE_BYTES, MAX_VALUE_BYTES);
  const quota = cluster.options.quotaBytes;
  const maxBytes = opts.maxBytes ?? (quota ? 2 * quota : 4 * 1024 ** 3);
  const clients = runningClients(cluster);
  const log = opts.log ?? (() => {});
  const written: Written = { prefix, digests: new Map(), uncertain: new Map(), bytes: 0, noSpaceError: '' };
  let seq = 0;
  let stop = false;
  let fatal: unknown;
  const worker = async (): Promise<void> => {
    while (!stop) {
      const i = seq++;
      if (i * valueBytes > maxBytes) {
        stop = true;
        fatal ??= new Error(`fillUntilNoSpace: wrote ${formatBytes(i * valueBytes)} without hitting the quota`);
        return;
      }
      const key = `${prefix}${String(i).padStart(8, '0')}`;
      const value = randomBytes(valueBytes);
      const digest = sha256(value);
      const client = clients[i % clients.length]!;
      try {
        await client
          .put(key)
          .value(value)
          .options({ deadline: Date.now() + 30_000 })
          .exec();
        written.digests.set(key, digest);
        written.bytes += valueBytes;
      } catch (err) {
        // Every failure is ambiguous, NOSPACE included: etcd's quotaApplierV3 applies the put that
        // crosses the quota and only then answers "database space exceeded" (seen on 3.5.30).
        written.uncertain.set(key, digest);
        if (isNoSpaceError(err)) {
          written.noSpaceError ||= errorText(err);
          stop = true;
        } else {
          if (written.uncertain.size > 20) {
            stop = true;
            fatal ??= new Error(`fillUntilNoSpace: too many failed puts, last: ${errorText(err)}`);
          }
        }
      }
    }
  };
  await Promise.all(Array.from({ length: opts.concurrency ?? 4 }, worker));
  if (fatal) throw fatal;
  log(
    `fillUntilNoSpace: ${written.digests.size} puts (${formatBytes(written.bytes)}) acknowledged, ${written.uncertain.size} uncertain; then ${written.noSpaceError}`,
  );
  return written;
}

/**
 * The seed's incident: the same 24 keys overwritten with 64 KiB values (as the API server's lease and
 * event updates do) until etcd refuses writes. Nobody compacts: the API server's compactor cannot
 * run during the alarm. `perSecond` spreads the puts over time (default 0: as fast as etcd takes
 * them); more than `maxPuts` puts without NOSPACE is an error.
 */
export async function historyUntilNoSpace(cluster: Cluster, opts: { maxPuts: number; perSecond?: number }): Promise<Written> {
  const client = cluster.client();
  const written: Written = { prefix: 'hot/', digests: new Map(), uncertain: new Map(), bytes: 0, noSpaceError: '' };
  const perSecond = opts.perSecond ?? 0;
  const t0 = Date.now();
  for (let i = 0; !written.noSpaceError; i++) {
    if (i > opts.maxPuts) throw new Error(`no NOSPACE after ${opts.maxPuts} puts`);
    if (perSecond > 0) {
      const due = t0 + (i * 1000) / perSecond;
      if (due > Date.now()) await sleep(due - Date.now());
    }
    const key = `hot/${i % 24}`;
    const value = randomBytes(64 * 1024);
    const digest = sha256(value);
    try {
      await client.put(key).value(value).exec();
      written.digests.set(key, digest);
      written.uncertain.delete(key);
      written.bytes += value.length;
    } catch (err) {
      if (!isNoSpaceError(err)) throw err;
      written.noSpaceError = String((err as Error).message);
      written.uncertain.set(key, digest); // the put that crosses the quota may be applied
    }
  }
  return written;
}

export interface VerifyResult {
  member: string;
  checked: number;
  missing: string[];
  mismatched: string[];
  unexpected: string[];
}

/**
 * Reads every key under `written.prefix` from each member (serializable reads, so each member's
 * own copy is checked; default: all running members) and compares it with what was acknowledged.
 * Throws a descriptive error on any missing, changed or unexpected key (after a few retries, to let
 * a lagging member catch up).
 */
export async function verifyData(
  cluster: Cluster,
  written: Written,
  opts: { members?: Member[]; retries?: number } = {},
): Promise<VerifyResult[]> {
  const members = opts.members ?? cluster.members.filter((m) => m.isRunning() && !m.isPaused);
  const results: VerifyResult[] = [];
  for (const m of members) {
    let r: VerifyResult | undefined;
    for (let attempt = 0; attempt <= (opts.retries ?? 5); attempt++) {
      r = await verifyOne(cluster, m, written);
      if (!r.missing.length && !r.mismatched.length && !r.unexpected.length) break;
      await sleep(500);
    }
    results.push(r!);
  }
  const bad = results.filter((r) => r.missing.length || r.mismatched.length || r.unexpected.length);
  if (bad.length) {
    const lines = bad.map(
      (r) =>
        `${r.member}: ${r.missing.length} missing (${r.missing.slice(0, 5).join(', ')}), ${r.mismatched.length} changed (${r.mismatched.slice(0, 5).join(', ')}), ` +
        `${r.unexpected.length} unexpected (${r.unexpected.slice(0, 5).join(', ')})`,
    );
    throw new Error(`data under '${written.prefix}' does not match what was written:\n${lines.join('\n')}`);
  }
  return results;
}

async function verifyOne(cluster: Cluster, member: Member, written: Written): Promise<VerifyResult> {
  const client = cluster.client(member);
  const seen = new Map<string, string>();
  const end = prefixEnd(written.prefix);
  let from = Buffer.from(written.prefix);
  // Page in small batches: grpc-js refuses responses over 4 MiB by default.
  for (;;) {
    const res = await client.kv.range({ key: from, range_end: end, limit: 32, serializable: true }, { deadline: Date.now() + 30_000 });
    for (const kv of res.kvs) seen.set(kv.key.toString(), sha256(kv.value));
    if (!res.more || res.kvs.length === 0) break;
    from = Buffer.concat([res.kvs[res.kvs.length - 1]!.key, Buffer.from([0])]);
  }
  const r: VerifyResult = { member: member.name, checked: 0, missing: [], mismatched: [], unexpected: [] };
  for (const [k, d] of written.digests) {
    r.checked++;
    const got = seen.get(k);
    if (got === undefined) r.missing.push(k);
    else if (got !== d) r.mismatched.push(k);
  }
  for (const [k, d] of seen) {
    if (written.digests.has(k)) continue;
    const u = written.uncertain.get(k);
    if (u === undefined) r.unexpected.push(k);
    else if (u !== d) r.mismatched.push(k);
  }
  return r;
}

export interface AlarmInfo {
  /** Hex member ID. */
  memberId: string;
  memberIdDec: string;
  alarm: string;
}

/** Active alarms (etcd alarm list). */
export async function listAlarms(cluster: Cluster, member?: Member): Promise<AlarmInfo[]> {
  const c = member ? cluster.client(member) : runningClients(cluster)[0]!;
  const res = await c.maintenance.alarm({ action: 'Get', memberID: 0, alarm: 'None' }, { deadline: Date.now() + 10_000 });
  return (res.alarms ?? []).map((a) => ({ memberId: hexId(a.memberID), memberIdDec: a.memberID, alarm: String(a.alarm) }));
}
