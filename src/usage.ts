// `etcd-defragd usage`: what fills etcd. Reads every key once, in pages, serializable, from a voting
// follower where one answers, with a pause between pages; each page is added to per-prefix totals
// and dropped, so memory follows the number of prefixes, not the size of the keyspace.
// Grouping and totals (UsageTally) are pure; scanUsage does the reading; the text and JSON forms
// are built here too, for cli.ts to print.
import type { Clock } from './clock.ts';
import type { Member, MemberClient, RetryHooks } from './etcd.ts';
import { errorMessage, UsageError } from './errors.ts';
import type { Log } from './log.ts';
import { formatBytes, formatDuration, formatPercent } from './units.ts';
import { hexId, type MemberStatus } from './view.ts';

export const DEFAULT_DEPTH = 2;
export const MAX_DEPTH = 16;
/** The first page's size in keys (small: nothing is known of the value sizes yet), and the most a page may ask for. */
export const FIRST_PAGE_KEYS = 50;
export const MAX_PAGE_KEYS = 1000;
/** Pages are sized to carry about this much (key + value bytes), from the previous page's average. */
export const PAGE_TARGET_BYTES = 4 * 1024 * 1024;
/** The pause between two pages: at most 10 pages a second, so about 40 MiB/s at most. */
export const PAGE_PAUSE_MS = 100;
/** "Recent" churn: keys whose last write is within this many revisions of the revision read. */
export const RECENT_REVISIONS = 10_000;
/** Distinct prefixes kept; keys of any further prefix are counted under OTHER_PREFIX. */
export const MAX_PREFIXES = 10_000;
export const OTHER_PREFIX = '(other prefixes)';
/** A Kubernetes resource that holds more than this share of the bytes is named in a closing line. */
export const DOMINANT_SHARE = 0.5;

const REGISTRY = Buffer.from('/registry/');
const SLASH = 0x2f;
const DOT = 0x2e;

/** `--depth`: a whole number from 1 to MAX_DEPTH; a UsageError (exit 64) naming the flag otherwise. */
export function parseDepth(text: string | undefined): number {
  if (text === undefined) return DEFAULT_DEPTH;
  const whole = /^\d{1,6}$/.test(text.trim());
  const n = Number(text.trim());
  if (whole && n >= 1 && n <= MAX_DEPTH) return n;
  throw new UsageError(
    `--depth: ${JSON.stringify(text)} is ${whole ? 'out of range' : 'not a whole number'}; ` +
      `accepted: a whole number from 1 to ${MAX_DEPTH} (default ${DEFAULT_DEPTH})`,
  );
}

/**
 * The prefix a key is counted under, as bytes of the key (its length into the key).
 * - Kubernetes (`/registry/...`): `/registry/<resource>/`, or `/registry/<group>/<resource>/` when
 *   the first segment names an API group (it has a dot: `wgpolicyk8s.io`, `apiextensions.k8s.io`).
 * - Elsewhere: the first `depth` path segments (a leading `/` is not a segment), never the key's own
 *   last segment: `/a/b/c` at depth 2 is `/a/b/`, `/a/b` is `/a/`; a key with no `/` has prefix "".
 */
export function prefixLength(key: Buffer, depth: number): number {
  if (key.length > REGISTRY.length && key.subarray(0, REGISTRY.length).equals(REGISTRY)) {
    const first = key.indexOf(SLASH, REGISTRY.length);
    if (first < 0) return REGISTRY.length;
    const segment = key.subarray(REGISTRY.length, first);
    if (!segment.includes(DOT)) return first + 1;
    const second = key.indexOf(SLASH, first + 1);
    return second < 0 ? first + 1 : second + 1;
  }
  let end = key[0] === SLASH ? 1 : 0;
  for (let i = 0; i < depth; i++) {
    const next = key.indexOf(SLASH, end);
    if (next < 0) break;
    end = next + 1;
  }
  return end;
}

/** `policyreports.wgpolicyk8s.io` for `/registry/wgpolicyk8s.io/policyreports/`, `events` for `/registry/events/`. */
export function resourceOf(prefix: string): string | undefined {
  const m = prefix.match(/^\/registry\/([^/]+)\/(?:([^/]+)\/)?$/);
  if (!m) return undefined;
  if (m[1]!.includes('.')) return m[2] === undefined ? undefined : `${m[2]}.${m[1]}`;
  return m[2] === undefined ? m[1] : undefined;
}

/** What a page entry must carry (etcd3's IKeyValue has it). */
export interface KeyValueLike {
  key: Buffer;
  value: Buffer;
  version: string | number;
  mod_revision: string | number;
}

export interface PrefixUsage {
  /** The prefix as text (UTF-8; bytes that are not are replaced). "" = keys with no `/`. */
  prefix: string;
  /** The Kubernetes resource, as kubectl names it (`resource.group`), for a /registry/ prefix. */
  resource?: string;
  keys: number;
  /** Key + value sizes of the current revision of each key. */
  bytes: number;
  keyBytes: number;
  valueBytes: number;
  /** Writes per key since it was last created (etcd's `version`, averaged): how often keys are rewritten. */
  avgVersion: number;
  /** Keys last written within RECENT_REVISIONS of the revision read. */
  recentKeys: number;
}

export interface UsageTotals {
  keys: number;
  bytes: number;
  prefixes: PrefixUsage[];
  /** The Kubernetes resource holding over DOMINANT_SHARE of the bytes, if one does. */
  dominant?: { resource: string; prefix: string; share: number };
  /** More than MAX_PREFIXES distinct prefixes: the rest is in OTHER_PREFIX. */
  truncated: boolean;
  /** The highest revision a page was read at. */
  revision: bigint;
}

interface Acc {
  keys: number;
  keyBytes: number;
  valueBytes: number;
  versions: number;
  recentKeys: number;
}

/** Per-prefix totals, fed page by page: only the totals are kept, never the keys. */
export class UsageTally {
  /** By prefix bytes as latin1 (one char per byte, so distinct byte prefixes stay distinct). */
  private readonly acc = new Map<string, Acc>();
  private truncated = false;
  private revision = 0n;

  constructor(
    readonly depth: number,
    private readonly opts: { maxPrefixes?: number; recentRevisions?: number } = {},
  ) {}

  /** Adds one page read at `revision`; returns the page's key + value bytes. */
  add(kvs: readonly KeyValueLike[], revision: bigint): number {
    if (revision > this.revision) this.revision = revision;
    const recentFrom = Number(revision) - (this.opts.recentRevisions ?? RECENT_REVISIONS);
    const max = this.opts.maxPrefixes ?? MAX_PREFIXES;
    let pageBytes = 0;
    for (const kv of kvs) {
      let name = kv.key.toString('latin1', 0, prefixLength(kv.key, this.depth));
      let a = this.acc.get(name);
      if (!a) {
        if (this.acc.size >= max) {
          this.truncated = true;
          name = OTHER_PREFIX;
          a = this.acc.get(name);
        }
        if (!a) {
          a = { keys: 0, keyBytes: 0, valueBytes: 0, versions: 0, recentKeys: 0 };
          this.acc.set(name, a);
        }
      }
      a.keys++;
      a.keyBytes += kv.key.length;
      a.valueBytes += kv.value.length;
      a.versions += Number(kv.version);
      if (Number(kv.mod_revision) > recentFrom) a.recentKeys++;
      pageBytes += kv.key.length + kv.value.length;
    }
    return pageBytes;
  }

  /** Largest first (bytes, then keys, then prefix). */
  totals(): UsageTotals {
    const prefixes: PrefixUsage[] = [];
    for (const [name, a] of this.acc) {
      const prefix = name === OTHER_PREFIX ? name : Buffer.from(name, 'latin1').toString('utf8');
      const resource = resourceOf(prefix);
      prefixes.push({
        prefix,
        ...(resource ? { resource } : {}),
        keys: a.keys,
        bytes: a.keyBytes + a.valueBytes,
        keyBytes: a.keyBytes,
        valueBytes: a.valueBytes,
        avgVersion: Math.round((a.versions / a.keys) * 100) / 100,
        recentKeys: a.recentKeys,
      });
    }
    prefixes.sort((x, y) => y.bytes - x.bytes || y.keys - x.keys || (x.prefix < y.prefix ? -1 : x.prefix > y.prefix ? 1 : 0));
    const keys = prefixes.reduce((n, p) => n + p.keys, 0);
    const bytes = prefixes.reduce((n, p) => n + p.bytes, 0);
    const top = prefixes.find((p) => p.resource);
    const share = top && bytes > 0 ? top.bytes / bytes : 0;
    return {
      keys,
      bytes,
      prefixes,
      ...(top?.resource && share > DOMINANT_SHARE ? { dominant: { resource: top.resource, prefix: top.prefix, share } } : {}),
      truncated: this.truncated,
      revision: this.revision,
    };
  }
}

/** The member calls scanUsage makes (MemberClient has them). */
export type UsageClient = Pick<MemberClient, 'endpoint' | 'status' | 'members' | 'probe' | 'rangePage'>;

export interface UsageDeps {
  pool: { get(endpoint: string): UsageClient };
  /** etcd.endpoint: the local member, and the fallback. */
  endpoint: string;
  log: Log;
  clock: Clock;
  /** Deadline of the Status that checks a follower before reading from it. */
  probeTimeoutMs: number;
}

export interface ScanOptions {
  depth: number;
  pauseMs?: number;
  firstPageKeys?: number;
  maxPageKeys?: number;
  pageTargetBytes?: number;
}

export interface UsageSource {
  endpoint: string;
  memberId: string;
  name?: string;
  role: 'follower' | 'leader' | 'learner';
  /** Why this member: the first voting follower that answered, or why the local member. */
  why: string;
}

export interface UsageReport extends UsageTotals {
  source: UsageSource;
  pages: number;
  durationMs: number;
  recentRevisions: number;
}

const roleOf = (s: MemberStatus): UsageSource['role'] => (s.isLearner ? 'learner' : s.memberId === s.leader ? 'leader' : 'follower');

/**
 * The member to read from: the local one when it is a voting follower, else the first other voting
 * follower that answers a Status, else the local one (the leader, or alone): a serializable read is
 * answered from the member's own copy, so the leader is spared the work.
 */
export async function pickSource(deps: UsageDeps, hooks: RetryHooks): Promise<{ client: UsageClient; source: UsageSource }> {
  const local = deps.pool.get(deps.endpoint);
  const st = await local.status(hooks);
  const localSource = (why: string): { client: UsageClient; source: UsageSource } => ({
    client: local,
    source: { endpoint: deps.endpoint, memberId: hexId(st.memberId), role: roleOf(st), why },
  });
  if (roleOf(st) === 'follower') return localSource('the local member, a voting follower');
  let list: Member[];
  try {
    list = await local.members(hooks, 1);
  } catch (err) {
    return localSource(`the local member (${roleOf(st)}): the member list could not be read (${errorMessage(err)})`);
  }
  for (const m of list) {
    if (m.isLearner || m.id === st.leader || m.id === st.memberId) continue;
    for (const url of m.clientURLs) {
      const client = deps.pool.get(url);
      const s = await client.probe(deps.probeTimeoutMs);
      if (s instanceof Error) {
        deps.log.debug({ event: 'usage.source.skip', endpoint: url, error: s.message }, `not reading from ${url}: ${s.message}`);
        continue;
      }
      if (s.memberId !== m.id || roleOf(s) !== 'follower') continue;
      return { client, source: { endpoint: url, memberId: hexId(m.id), name: m.name, role: 'follower', why: 'a voting follower' } };
    }
  }
  return localSource(`the local member (${roleOf(st)}): no other voting follower answered`);
}

const tooLarge = (err: unknown) => /larger than max/i.test(errorMessage(err));

/**
 * Reads the whole keyspace page by page (a moving start key; each page serializable, retried with
 * backoff like every read) and tallies it. Pages are sized from the previous page's bytes per key
 * and a pause separates them; a page the client refuses as too large is asked again at half size.
 */
export async function scanUsage(deps: UsageDeps, opts: ScanOptions): Promise<UsageReport> {
  const { log, clock } = deps;
  const hooks: RetryHooks = { log };
  const started = clock.now();
  const { client, source } = await pickSource(deps, hooks);
  const pauseMs = opts.pauseMs ?? PAGE_PAUSE_MS;
  const target = opts.pageTargetBytes ?? PAGE_TARGET_BYTES;
  // Lowered for good when the client refuses a page as too large: values that big come in runs.
  let ceiling = opts.maxPageKeys ?? MAX_PAGE_KEYS;
  log.info(
    { event: 'usage.start', endpoint: source.endpoint, member: source.memberId, role: source.role, pauseMs },
    `reading every key from ${source.endpoint} (${source.why}), serializable, in pages of up to ${ceiling} keys with ${pauseMs}ms between pages`,
  );
  const tally = new UsageTally(opts.depth);
  const end = Buffer.from([0]); // with a start key: every key from there on
  let start = Buffer.from([0]);
  let limit = Math.min(opts.firstPageKeys ?? FIRST_PAGE_KEYS, ceiling);
  let pages = 0;
  let keys = 0;
  let lastProgress = started;
  for (;;) {
    let page;
    try {
      page = await client.rangePage(start, end, limit, hooks);
    } catch (err) {
      if (!tooLarge(err) || limit === 1) throw err;
      ceiling = limit = Math.max(1, Math.floor(limit / 2));
      log.debug({ event: 'usage.page.shrink', limit }, `a page was too large for the client; asking ${limit} keys at a time`);
      continue;
    }
    pages++;
    keys += page.kvs.length;
    const bytes = tally.add(page.kvs, page.revision);
    const last = page.kvs.at(-1);
    if (!page.more || !last) break;
    start = Buffer.concat([last.key, Buffer.from([0])]);
    limit = Math.max(1, Math.min(ceiling, Math.floor(target / Math.max(1, bytes / page.kvs.length))));
    if (clock.now() - lastProgress >= 10_000) {
      lastProgress = clock.now();
      log.info({ event: 'usage.progress', keys, pages }, `read ${keys} keys in ${pages} pages so far`);
    }
    await clock.sleep(pauseMs);
  }
  const durationMs = clock.now() - started;
  const totals = tally.totals();
  log.info(
    { event: 'usage.done', keys: totals.keys, bytes: totals.bytes, pages, durationMs },
    `read ${totals.keys} keys (${formatBytes(totals.bytes)}) in ${pages} pages, ${formatDuration(durationMs)}`,
  );
  return { ...totals, source, pages, durationMs, recentRevisions: RECENT_REVISIONS };
}

const TEXT_ROWS = 50;

function displayPrefix(p: PrefixUsage): string {
  return p.prefix === '' ? '(keys with no /)' : p.prefix;
}

/** The table for people; names from etcd are escaped by the caller (printable). */
export function usageText(r: UsageReport): string {
  const rows = [['PREFIX', 'KEYS', 'BYTES', 'SHARE', 'AVG VERSION', 'RECENT']];
  for (const p of r.prefixes.slice(0, TEXT_ROWS)) {
    rows.push([
      displayPrefix(p),
      String(p.keys),
      formatBytes(p.bytes),
      r.bytes ? formatPercent(p.bytes / r.bytes) : '-',
      p.avgVersion.toFixed(1),
      formatPercent(p.recentKeys / p.keys),
    ]);
  }
  const widths = rows[0]!.map((_, i) => Math.max(...rows.map((row) => row[i]!.length)));
  const lines = rows.map((row) =>
    row
      .map((cell, i) => (i === 0 ? cell.padEnd(widths[i]!) : cell.padStart(widths[i]!)))
      .join('  ')
      .trimEnd(),
  );
  const rest = r.prefixes.slice(TEXT_ROWS);
  if (rest.length) {
    const restBytes = rest.reduce((n, p) => n + p.bytes, 0);
    lines.push(`... ${rest.length} more prefixes (${formatBytes(restBytes)}); --json lists them all`);
  }
  if (r.truncated) lines.push(`over ${MAX_PREFIXES} prefixes: the rest are counted as ${OTHER_PREFIX}; a smaller --depth groups them`);
  const who = `${r.source.name ? `${r.source.name} ` : ''}${r.source.memberId} (${r.source.role}, ${r.source.endpoint})`;
  lines.push(
    '',
    `total: ${r.keys} keys, ${formatBytes(r.bytes)} at revision ${r.revision}, read from ${who} in ${r.pages} pages, ${formatDuration(r.durationMs)}`,
    "(BYTES: key + value of each key's current revision, without history or bbolt overhead: compare with status's IN USE;",
    ` AVG VERSION: writes per key since it was created; RECENT: keys written in the last ${r.recentRevisions} revisions)`,
  );
  if (r.dominant) lines.push(`most of the space is ${r.dominant.resource} (${Math.round(r.dominant.share * 100)}%)`);
  return lines.join('\n');
}

export function usageJson(r: UsageReport): unknown {
  return {
    prefixes: r.prefixes,
    keys: r.keys,
    bytes: r.bytes,
    dominant: r.dominant ?? null,
    truncated: r.truncated,
    revision: r.revision.toString(),
    recentRevisions: r.recentRevisions,
    source: r.source,
    pages: r.pages,
    durationMs: r.durationMs,
  };
}
