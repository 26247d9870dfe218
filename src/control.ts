// Operator controls that every daemon obeys, kept in etcd under coordination.prefix:
//   <prefix>pause   written by `etcd-defragd pause`, deleted by `etcd-defragd resume`
//   <prefix>halt    written after an integrity mismatch (run.ts), deleted by `resume --integrity-checked`
//   <prefix>fuse, <prefix>fuse-armed   the halt fuse: how a halt is recorded when NOSPACE refuses the halt key
// Both are read at the start of every run. Deleting works during NOSPACE; writing a pause does not.
import type { ICompare, IRequestOp } from 'etcd3';
import { hostname, userInfo } from 'node:os';
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

export interface ControlState {
  pause?: PauseRecord;
  halt?: HaltRecord;
}

export async function readControl(client: EtcdMember, c: Prefixed, hooks: RetryHooks = {}): Promise<ControlState> {
  const [pause, halt] = await Promise.all([client.get(pauseKey(c), hooks), client.get(haltKey(c), hooks)]);
  return { pause: parsePause(pause), halt: parseHalt(halt) };
}

/** An integrity halt either way it is recorded: the halt key, or (during NOSPACE) the blown fuse. */
export interface HaltState {
  halt?: HaltRecord;
  fuse: { blown: boolean; armed: boolean };
}

/** The halt key and the fuse, read together. */
export async function readHalt(client: EtcdMember, c: Prefixed, hooks: RetryHooks = {}): Promise<HaltState> {
  const [halt, fuse] = await Promise.all([client.get(haltKey(c), hooks), fuseBlown(client, c, hooks)]);
  return { halt: parseHalt(halt), fuse };
}

/** Everything that stops runs, in one round of reads: the pause, the halt key and the fuse. */
export async function readStops(client: EtcdMember, c: Prefixed, hooks: RetryHooks = {}): Promise<ControlState & HaltState> {
  const [pause, halt] = await Promise.all([client.get(pauseKey(c), hooks), readHalt(client, c, hooks)]);
  return { pause: parsePause(pause), ...halt };
}

/** Who runs this command, for the pause record: the sudo caller if any. */
export function operator(env: NodeJS.ProcessEnv = process.env): { by: string; host: string } {
  let user = env.SUDO_USER;
  if (!user) {
    try {
      user = userInfo().username;
    } catch {
      user = `uid ${process.getuid?.() ?? '?'}`;
    }
  }
  return { by: user, host: hostname() };
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

/** Deletes a control key (a delete works during NOSPACE); true when it was there. */
export async function clearKey(client: EtcdMember, key: string): Promise<boolean> {
  const res = await client.txn(`delete ${key}`, [exists(key)], [{ request_delete_range: { key: Buffer.from(key) } }]);
  return res.succeeded;
}

/**
 * The halt must survive NOSPACE, which refuses the put of the halt key, and the process that found
 * the mismatch (a `once` exiting, a restart, a lost lease). So while writes work, a lease-less
 * `fuse` key is written once, beside `fuse-armed`; a mismatch under NOSPACE deletes `fuse` (a
 * delete works under NOSPACE), and a blown fuse halts like the halt key. The first daemon that can
 * write again turns a blown fuse into the halt key and restores the fuse, so the operator's
 * `etcdctl del <prefix>halt` stays the one way to resume.
 */
export const fuseKey = (c: Prefixed): string => `${c.coordination.prefix}fuse`;
const fuseArmedKey = (c: Prefixed): string => `${c.coordination.prefix}fuse-armed`;

const exists = (key: string): ICompare => ({ key: Buffer.from(key), target: 'Version', result: 'Greater', version: 0 }) as ICompare;
const absent = (key: string): ICompare => ({ key: Buffer.from(key), target: 'Version', result: 'Equal', version: 0 }) as ICompare;
const putOp = (key: string, value: string): IRequestOp => ({ request_put: { key: Buffer.from(key), value: Buffer.from(value) } });

/** Writes the halt fuse once per cluster, while writes work (best effort: a daemon does it when it joins, a run when it looks). */
export async function armHaltFuse(pool: EtcdPool, c: Pick<Config, 'coordination' | 'etcd'>): Promise<void> {
  await pool
    .get(c.etcd.endpoint)
    .txn('arm fuse', [absent(fuseArmedKey(c))], [putOp(fuseArmedKey(c), 'delete fuse = halt'), putOp(fuseKey(c), 'intact')])
    .catch(() => undefined);
}

/** Is the halt fuse blown (armed, and its key deleted)? */
export async function fuseBlown(client: EtcdMember, c: Prefixed, hooks: RetryHooks = {}): Promise<{ blown: boolean; armed: boolean }> {
  const [fuse, armed] = await Promise.all([client.get(fuseKey(c), hooks), client.get(fuseArmedKey(c), hooks)]);
  return { blown: armed !== undefined && fuse === undefined, armed: armed !== undefined };
}

/** A blown fuse becomes the halt key again, and the fuse is restored (needs writes). */
export async function haltFromBlownFuse(client: EtcdMember, c: Prefixed, reason: string, at: string): Promise<void> {
  await client.txn(
    'record halt',
    [absent(fuseKey(c)), exists(fuseArmedKey(c))],
    [putOp(haltKey(c), JSON.stringify({ reason, at })), putOp(fuseKey(c), 'intact')],
  );
}

/** Records a halt where the halt key cannot be written (NOSPACE): deletes the fuse; false when it was never armed. */
export async function blowFuse(client: EtcdMember, c: Prefixed): Promise<boolean> {
  const res = await client.txn(
    'blow fuse',
    [exists(fuseArmedKey(c)), exists(fuseKey(c))],
    [{ request_delete_range: { key: Buffer.from(fuseKey(c)) } }],
  );
  return res.succeeded;
}
