// Operator controls that every daemon obeys, kept in etcd under coordination.prefix:
//   <prefix>pause   written by `etcd-defragd pause`, deleted by `etcd-defragd resume`
//   <prefix>halt    written after an integrity mismatch (run.ts), deleted by `resume --integrity-checked`
//   <prefix>fuse, <prefix>fuse-armed   the halt fuse: how a halt is recorded when NOSPACE refuses the halt key
// Both are read at the start of every run. Deleting works during NOSPACE; writing a pause does not.
import type { ICompare, IRequestOp } from 'etcd3';
import type { Config } from './config.ts';
import { kindOf, type EtcdMember, type EtcdPool, type RetryHooks } from './etcd.ts';
import { DefragdError } from './errors.ts';

type Prefixed = Pick<Config, 'coordination'>;

export const pauseKey = (c: Prefixed): string => `${c.coordination.prefix}pause`;
export const haltKey = (c: Prefixed): string => `${c.coordination.prefix}halt`;

export interface PauseRecord {
  by: string;
  host: string;
  at: string;
  reason: string;
}

export interface HaltRecord {
  member?: string;
  reason: string;
  at?: string;
}

function parseObject(value: string): Record<string, unknown> | undefined {
  try {
    const v: unknown = JSON.parse(value);
    return v && typeof v === 'object' && !Array.isArray(v) ? (v as Record<string, unknown>) : undefined;
  } catch {
    return undefined;
  }
}

const str = (v: unknown): string | undefined => (typeof v === 'string' && v !== '' ? v : undefined);

/** A pause as written by `etcd-defragd pause`; a hand-written value is shown as its reason. */
export function parsePause(value: string | undefined): PauseRecord | undefined {
  if (value === undefined) return undefined;
  const o = parseObject(value);
  return {
    by: str(o?.by) ?? 'unknown',
    host: str(o?.host) ?? 'unknown',
    at: str(o?.at) ?? 'unknown time',
    reason: o ? (str(o.reason) ?? '') : value,
  };
}

export function parseHalt(value: string | undefined): HaltRecord | undefined {
  if (value === undefined) return undefined;
  const o = parseObject(value);
  return { member: str(o?.member), reason: o ? (str(o.reason) ?? value) : value, at: str(o?.at) };
}

export function describePause(p: PauseRecord): string {
  return `paused by ${p.by} on ${p.host} at ${p.at}${p.reason ? `: ${p.reason}` : ''}`;
}

export function describeHalt(h: HaltRecord): string {
  return `${h.reason}${h.at ? ` (at ${h.at})` : ''}`;
}

/**
 * Everything that stops runs: an operator's pause, and an integrity halt either way it is recorded
 * (the halt key, or during NOSPACE the blown fuse). Read in one atomic read, so a blown fuse turned
 * into the halt key between two reads is never missed.
 */
export interface Stops {
  pause?: PauseRecord;
  halt?: HaltRecord;
  fuse: { blown: boolean; armed: boolean };
}

const FUSE_HALT = 'an integrity mismatch was found during a NOSPACE alarm (the halt fuse was deleted)';

export async function readStops(client: EtcdMember, c: Prefixed, hooks: RetryHooks = {}): Promise<Stops> {
  const v = await client.readKeys([pauseKey(c), haltKey(c), fuseKey(c), fuseArmedKey(c)], hooks);
  const armed = v.has(fuseArmedKey(c));
  return { pause: parsePause(v.get(pauseKey(c))), halt: parseHalt(v.get(haltKey(c))), fuse: { armed, blown: armed && !v.has(fuseKey(c)) } };
}

/** The integrity halt, whether the halt key or the blown fuse records it. */
export function haltOf(s: Stops): HaltRecord | undefined {
  return s.halt ?? (s.fuse.blown ? { reason: FUSE_HALT } : undefined);
}

/** Why runs must not go, with the check a skipped run reports, or undefined. */
export function stopReason(s: Stops): { check: 'halt' | 'pause'; reason: string } | undefined {
  const halt = haltOf(s);
  if (halt)
    return {
      check: 'halt',
      reason:
        `defragmentation is halted after an integrity mismatch: ${describeHalt(halt)}; ` +
        'after checking the members, resume with: etcd-defragd resume --integrity-checked',
    };
  if (s.pause) return { check: 'pause', reason: `defragmentation is ${describePause(s.pause)}; resume with: etcd-defragd resume` };
  return undefined;
}

export async function writePause(client: EtcdMember, c: Prefixed, record: PauseRecord): Promise<void> {
  try {
    await client.put(pauseKey(c), JSON.stringify(record));
  } catch (err) {
    if (kindOf(err) === 'nospace') {
      throw new DefragdError(
        'EDD_ETCD',
        'cannot pause: etcd refuses every write while the NOSPACE alarm is raised, ' +
          `and a pause is a key written to etcd (${pauseKey(c)}). ` +
          'To stop defragmentation now, stop the service on every control-plane node (systemctl stop etcd-defragd); ' +
          'or let the NOSPACE recovery finish, then pause',
        { cause: err, permanent: false },
      );
    }
    throw err;
  }
}

/** Deletes a control key (a plain delete: works during NOSPACE on every etcd version); true when it was there. */
export async function clearKey(client: EtcdMember, key: string): Promise<boolean> {
  return (await client.deleteKey(key)) > 0;
}

/**
 * Lifts an integrity halt (`resume --integrity-checked`): deletes the halt key and, for a halt the
 * fuse recorded, `fuse-armed` (deletes, so this works during NOSPACE too); the next daemon that can
 * write arms the fuse again. True when there was a halt to lift.
 */
export async function clearHalt(client: EtcdMember, c: Prefixed): Promise<boolean> {
  const s = await readStops(client, c);
  const key = s.halt !== undefined && (await clearKey(client, haltKey(c)));
  const fuse = s.fuse.blown && (await clearKey(client, fuseArmedKey(c)));
  return key || fuse;
}

/**
 * The halt must survive NOSPACE, which refuses the put of the halt key, and the process that found
 * the mismatch (a `once` exiting, a restart, a lost lease). So while writes work, a lease-less
 * `fuse` key is written once, beside `fuse-armed`; a mismatch under NOSPACE deletes `fuse` (a
 * delete works under NOSPACE), and a blown fuse halts like the halt key, in every reader (runs,
 * `status`, the metrics). `resume --integrity-checked` lifts both (clearHalt).
 */
export const fuseKey = (c: Prefixed): string => `${c.coordination.prefix}fuse`;
const fuseArmedKey = (c: Prefixed): string => `${c.coordination.prefix}fuse-armed`;

const absent = (key: string): ICompare => ({ key: Buffer.from(key), target: 'Version', result: 'Equal', version: 0 }) as ICompare;
const putOp = (key: string, value: string): IRequestOp => ({ request_put: { key: Buffer.from(key), value: Buffer.from(value) } });

/** Writes the halt fuse once per cluster, while writes work (best effort: a daemon does it when it joins, a run when it looks). */
export async function armHaltFuse(pool: EtcdPool, c: Pick<Config, 'coordination' | 'etcd'>): Promise<void> {
  await pool
    .get(c.etcd.endpoint)
    .txn('arm fuse', [absent(fuseArmedKey(c))], [putOp(fuseArmedKey(c), 'delete fuse = halt'), putOp(fuseKey(c), 'intact')])
    .catch(() => undefined);
}

/**
 * Records a halt where the halt key cannot be written (NOSPACE): deletes the fuse with a plain
 * delete (never quota-checked, unlike a Txn on etcd before 3.4.20/3.5.7). True when the fuse is
 * blown afterwards (by us or before us); false when it was never armed.
 */
export async function blowFuse(client: EtcdMember, c: Prefixed): Promise<boolean> {
  await client.deleteKey(fuseKey(c));
  return (await readStops(client, c)).fuse.blown;
}

/**
 * Records an integrity halt so that every daemon stops: the halt key where writes work, else the
 * fuse; on whichever member answers, retried until `until`. True once it is recorded.
 */
export async function recordHalt(
  members: EtcdMember[],
  c: Prefixed,
  record: HaltRecord,
  opts: { until: number; now: () => number; sleep: (ms: number) => Promise<void>; onError: (err: unknown) => void },
): Promise<boolean> {
  for (;;) {
    for (const client of members) {
      try {
        await client.put(haltKey(c), JSON.stringify(record));
        return true;
      } catch (err) {
        opts.onError(err);
      }
      try {
        if (await blowFuse(client, c)) return true;
      } catch (err) {
        opts.onError(err);
      }
    }
    if (opts.now() >= opts.until) return false;
    await opts.sleep(1000);
  }
}
