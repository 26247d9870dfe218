// Operator controls that every daemon obeys, kept in etcd under coordination.prefix:
//   <prefix>pause   written by `etcd-defragd pause`, deleted by `etcd-defragd resume`
//   <prefix>halt    written after an integrity mismatch (pass.ts), deleted by `resume --integrity-checked`
// Both are read at the start of every run. Deleting works during NOSPACE; writing a pause does not.
import type { ICompare } from 'etcd3';
import { hostname, userInfo } from 'node:os';
import type { Config } from './config.ts';
import { classify, type EtcdMember, type RetryHooks } from './etcd.ts';
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
  return { by: str(o?.by) ?? 'unknown', host: str(o?.host) ?? 'unknown', at: str(o?.at) ?? 'unknown time', reason: o ? (str(o.reason) ?? '') : value };
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
    if (classify((err as DefragdError).cause ?? err) === 'nospace') {
      throw new DefragdError('EDD_ETCD', `cannot pause: etcd refuses every write while the NOSPACE alarm is raised, and a pause is a key written to etcd (${pauseKey(c)}). ` +
        'To stop defragmentation now, stop the service on every control-plane node (systemctl stop etcd-defragd); ' +
        'or let the NOSPACE recovery finish, then pause', { cause: err, permanent: false });
    }
    throw err;
  }
}

/** Deletes a control key (a delete works during NOSPACE); true when it was there. */
export async function clearKey(client: EtcdMember, key: string): Promise<boolean> {
  const res = await client.txn(`delete ${key}`, [{ key: Buffer.from(key), target: 'Version', result: 'Greater', version: 0 } as ICompare],
    [{ request_delete_range: { key: Buffer.from(key) } }]);
  return res.succeeded;
}
