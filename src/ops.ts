// Operator commands that replace etcdctl on a kubeadm host: pause, resume (also clears the integrity
// halt, once confirmed), disarm (NOSPACE by hand), and the cluster-wide part of `status`.
// Each returns an exit code and the text for stdout; explanations are logged (stderr).
import { hostname } from 'node:os';
import { createTask } from 'node-cron';
import type { Config } from './config.ts';
import {
  clearHalt,
  clearKey,
  describeHalt,
  describePause,
  haltOf,
  pauseKey,
  readStops,
  writePause,
  type HaltRecord,
  type Stops,
} from './control.ts';
import { kindOf, type ClientPool } from './etcd.ts';
import { EXIT, errorMessage } from './errors.ts';
import { inspect } from './inspect.ts';
import { auditToSystemLog, printable, type Log } from './log.ts';
import { checkAndDisarm } from './nospace.ts';
import { parseTrendRecord, trendPrefix, type TrendRecord } from './trend.ts';
import { describeParticipant, parseView } from './turn.ts';
import { userName } from './trust.ts';
import { hexId, memberLabel, voting, type Alarm } from './view.ts';

export interface OpResult {
  code: number;
  out: string;
}

interface OpDeps {
  config: Config;
  pool: ClientPool;
  log: Log;
  now?: () => number;
  /** Who runs the command (default: caller()). */
  caller?: Caller;
  /** Where a forced action is recorded (default: the system log, auditToSystemLog). */
  audit?: (line: string) => string | undefined;
}

/** Who runs an operator command, as the pause record and the logs name them. */
export interface Caller {
  /** For people: `uid 0 (root), SUDO_UID 1000 (alice)`. */
  by: string;
  host: string;
  /** The real uid: the kernel's word. */
  uid: number;
  /** sudo's SUDO_UID: sudo sets it, but anyone who runs the command without sudo can too. */
  sudoUid?: number;
}

/**
 * The real uid, and SUDO_UID beside it when it is a number. Not SUDO_USER, which the record used
 * to trust: it is only a name, and as easily set by the caller; the uid at least is real.
 */
export function caller(env: NodeJS.ProcessEnv = process.env, uid = process.getuid?.() ?? -1): Caller {
  const sudoUid = env.SUDO_UID && /^\d{1,10}$/.test(env.SUDO_UID) ? Number(env.SUDO_UID) : undefined;
  const named = (u: number) => {
    const name = userName(u);
    return name ? `${u} (${name})` : String(u);
  };
  const by = `uid ${named(uid)}${sudoUid === undefined ? '' : `, SUDO_UID ${named(sudoUid)}`}`;
  return { by, host: hostname(), uid, sudoUid };
}

/** A forced action goes to the system log too; a failure to write it is said, not fatal. */
function recordForced(deps: OpDeps, line: string): void {
  const why = (deps.audit ?? auditToSystemLog)(line);
  if (why) deps.log.warn({ event: 'audit.fail', error: why }, `could not record in the system log: ${line} (${why})`);
}

export async function pause(deps: OpDeps, reason: string): Promise<OpResult> {
  const { config: c, log } = deps;
  const client = deps.pool.get(c.etcd.endpoint);
  const before = await readStops(client, c, { log });
  const who = deps.caller ?? caller();
  const record = { ...who, at: new Date((deps.now ?? Date.now)()).toISOString(), reason };
  await writePause(client, c, record);
  const was = before.pause ? ` (replaces: ${describePause(before.pause)})` : '';
  log.info(
    { event: 'pause', by: record.by, uid: who.uid, sudoUid: who.sudoUid, host: record.host, reason },
    `defragmentation ${describePause(record)}${was}; every etcd-defragd skips its runs from its next run on`,
  );
  const lines = [
    `paused: ${describePause(record)}`,
    'every etcd-defragd skips its runs (a defragment already running finishes first); undo with: etcd-defragd resume',
  ];
  const halt = haltOf(before);
  if (halt) lines.push(`note: also halted after an integrity mismatch: ${describeHalt(halt)}`);
  return { code: EXIT.ok, out: `${lines.join('\n')}\n` };
}

export async function resume(deps: OpDeps, opts: { integrityChecked: boolean }): Promise<OpResult> {
  const { config: c, log } = deps;
  const client = deps.pool.get(c.etcd.endpoint);
  const before = await readStops(client, c, { log });
  const halt = haltOf(before);
  const lines: string[] = [];
  const who = deps.caller ?? caller();
  if (before.pause && (await clearKey(client, pauseKey(c)))) {
    log.info(
      { event: 'resume', by: who.by, uid: who.uid, sudoUid: who.sudoUid, host: who.host },
      `pause lifted by ${who.by} on ${who.host} (was ${describePause(before.pause)})`,
    );
    lines.push(`pause lifted (was ${describePause(before.pause)})`);
  }
  if (halt) {
    if (!opts.integrityChecked) {
      log.error(
        { event: 'resume.refused', reason: 'halt' },
        `still halted after an integrity mismatch: ${describeHalt(halt)}. ` +
          `Check that the members hold the same data (the hashes above; etcd's own log on each member), ` +
          'then confirm with: etcd-defragd resume --integrity-checked',
      );
      lines.push(
        `still halted (integrity): ${describeHalt(halt)}`,
        'not cleared: confirm with etcd-defragd resume --integrity-checked once the members are checked',
      );
      return { code: EXIT.failed, out: `${lines.join('\n')}\n` };
    }
    // The operator's word, and etcd's: the members must agree on HashKV now.
    const hash = await compareHashKV(deps);
    if (!hash.ok) {
      log.error({ event: 'resume.refused', reason: 'hashkv' }, `integrity halt not cleared: ${hash.detail}`);
      lines.push(`still halted (integrity): ${describeHalt(halt)}`, `not cleared: ${hash.detail}`);
      return { code: EXIT.failed, out: `${lines.join('\n')}\n` };
    }
    if (await clearHalt(client, c)) {
      const line =
        `integrity halt cleared by ${who.by} on ${who.host} (resume --integrity-checked), who confirmed the members were checked; ` +
        `${hash.detail} (was: ${describeHalt(halt)})`;
      log.warn({ event: 'halt.clear', by: who.by, uid: who.uid, sudoUid: who.sudoUid, host: who.host }, line);
      recordForced(deps, line);
      lines.push(`integrity halt cleared (was: ${describeHalt(halt)})`, hash.detail);
    }
  }
  if (lines.length === 0) lines.push('nothing to resume: not paused, not halted');
  else lines.push('every etcd-defragd runs again from its next run on');
  return { code: EXIT.ok, out: `${lines.join('\n')}\n` };
}

/**
 * HashKV of every voting member at one revision they have all applied (the check run.ts makes
 * after a defragment), one member at a time: hashing holds a read transaction on the member.
 */
export async function compareHashKV(deps: OpDeps): Promise<{ ok: boolean; detail: string }> {
  const { config: c, log, pool } = deps;
  const view = await inspect(pool, c.etcd.endpoint, { log }, { memberAttempts: 1, linearizableRead: false });
  const members = voting(view);
  const down = members.find((m) => !m.status);
  if (down)
    return { ok: false, detail: `HashKV cannot be compared: member ${memberLabel(down)} does not answer (${down.error ?? 'no answer'})` };
  for (let attempt = 1; attempt <= 3; attempt++) {
    const statuses = await Promise.all(members.map((m) => pool.get(m.endpoint).status({ log }, 2)));
    const rev = statuses.reduce((min, s) => (s.revision < min ? s.revision : min), statuses[0]!.revision);
    const hashes: { hex: string; hash: string; compact: string }[] = [];
    try {
      for (const m of members) {
        const h = await pool.get(m.endpoint).hashKV(rev, { log });
        hashes.push({ hex: m.hex, hash: h.hash, compact: h.compactRevision.toString() });
      }
    } catch (err) {
      if (kindOf(err) === 'compacted') continue;
      return { ok: false, detail: `HashKV cannot be compared: ${errorMessage(err)}` };
    }
    if (new Set(hashes.map((h) => h.compact)).size > 1) continue; // a compaction landed in between
    const detail = hashes.map((h) => `${h.hex}=${h.hash}`).join(', ');
    if (new Set(hashes.map((h) => h.hash)).size === 1)
      return { ok: true, detail: `HashKV agrees on all ${hashes.length} voting members at revision ${rev} (${detail})` };
    return { ok: false, detail: `HashKV still differs at revision ${rev} (${detail})` };
  }
  return { ok: false, detail: 'HashKV cannot be compared: compactions kept moving during the check; try again' };
}

/**
 * NOSPACE by hand: the automatic disarm's own checks (src/nospace.ts) run first and log why they
 * refuse; --force then disarms anyway. CORRUPT is never disarmed.
 */
export async function disarm(deps: OpDeps, opts: { force: boolean }): Promise<OpResult> {
  const { config: c, log, pool } = deps;
  const view = await inspect(pool, c.etcd.endpoint, { log }, { memberAttempts: 1, linearizableRead: false });
  const nospace = view.alarms.filter((a) => a.alarm === 'NOSPACE');
  if (nospace.length === 0) return { code: EXIT.ok, out: 'no NOSPACE alarm is raised\n' };
  // The operator asked: nospace.disarm=false does not stop a disarm by hand.
  const config = { ...c, nospace: { ...c.nospace, disarm: true } };
  const outcome = await checkAndDisarm({ config, pool, log });
  if (outcome === 'disarmed' || outcome === 'not-needed')
    return { code: EXIT.ok, out: `NOSPACE ${outcome === 'disarmed' ? 'disarmed; a test write succeeded' : 'was already disarmed'}\n` };
  if (!opts.force) {
    return {
      code: EXIT.skipped,
      out:
        `NOSPACE not disarmed (${outcome}): the reason is logged above.\n` +
        'To disarm anyway: etcd-defragd disarm --force. etcd raises NOSPACE again at the next write while a member is over its quota.\n',
    };
  }
  const client = pool.get(view.local.endpoint);
  const who = deps.caller ?? caller();
  const done: string[] = [];
  let after = 'the disarm failed';
  try {
    for (const a of nospace) {
      await client.disarm(a as Alarm);
      done.push(hexId(a.memberId));
      log.warn(
        { event: 'nospace.disarm.forced', member: hexId(a.memberId), by: who.by, uid: who.uid, sudoUid: who.sudoUid, host: who.host },
        `disarmed NOSPACE of member ${hexId(a.memberId)} by hand (--force), by ${who.by} on ${who.host}`,
      );
    }
    try {
      await client.put(`${c.coordination.prefix}probe`, new Date().toISOString());
    } catch (err) {
      const again = kindOf(err) === 'nospace';
      const why = again
        ? 'etcd raised NOSPACE again at the first write: a member is still over its quota. ' +
          'Free space first (delete data, compact, defragment), or raise --quota-backend-bytes'
        : `a test write still fails: ${errorMessage(err)}`;
      after = again ? 'etcd raised NOSPACE again at the test write' : 'the test write failed';
      log.error({ event: 'nospace.write.fail', error: errorMessage(err) }, `disarmed NOSPACE by hand, but ${why}`);
      return { code: EXIT.failed, out: `disarmed NOSPACE of ${done.join(', ')}, but ${why}\n` };
    }
    after = 'a test write succeeded';
    return { code: EXIT.ok, out: `disarmed NOSPACE of ${done.join(', ')} (--force); a test write succeeded\n` };
  } finally {
    // One line per forced disarm, once its outcome is known (also when only some alarms went).
    if (done.length)
      recordForced(
        deps,
        `NOSPACE disarmed by hand (disarm --force) by ${who.by} on ${who.host}: member ${done.join(', ')} ` +
          `(checks refused: ${outcome}); ${after}`,
      );
  }
}

export interface ClusterControl extends Partial<Stops> {
  nextRun?: string;
  holder?: string;
  participants: number;
  /** What could not be read, instead of failing the whole status. */
  errors: string[];
  /** Each daemon's last forecast and compaction watch, by member id (src/trend.ts). */
  trends: Record<string, TrendRecord>;
}

/** The next time schedule.cron fires, in ISO form (undefined if never). */
export function nextScheduledRun(c: Config): string | undefined {
  const task = createTask(c.schedule.cron, () => undefined, { timezone: c.schedule.timezone });
  try {
    return task.getNextRuns(1)[0]?.toISOString(); // getNextRun() is null until the task is started
  } finally {
    void task.destroy();
  }
}

export async function clusterControl(deps: OpDeps): Promise<ClusterControl> {
  const { config: c, log } = deps;
  const client = deps.pool.get(c.etcd.endpoint);
  const out: ClusterControl = { nextRun: nextScheduledRun(c), participants: 0, errors: [], trends: {} };
  try {
    Object.assign(out, await readStops(client, c, { log }));
  } catch (err) {
    out.errors.push(`pause/halt: ${errorMessage(err)}`);
  }
  try {
    const res = await client.range(`${c.coordination.prefix}p/`, { log }, 1);
    const v = parseView(c.coordination.prefix, res.kvs, res.revision);
    const live = [...v.participants.values()].filter((p) => p.tickets.length > 0);
    out.participants = live.length;
    const h = live.find((p) => p.holding);
    if (h) out.holder = describeParticipant(h);
  } catch (err) {
    out.errors.push(`turn: ${errorMessage(err)}`);
  }
  try {
    const base = trendPrefix(c.coordination.prefix);
    // One record per member; a limit keeps keys planted under the prefix from flooding status.
    const res = await client.range(base, { log }, 1, 100);
    for (const kv of res.kvs) {
      const id = kv.key.toString('latin1').slice(base.length);
      const record = /^[0-9a-f]{1,16}$/.test(id) ? parseTrendRecord(kv.value.toString('utf8')) : undefined;
      if (record) out.trends[id] = record;
    }
  } catch (err) {
    out.errors.push(`forecast: ${errorMessage(err)}`);
  }
  return out;
}

/** The integrity halt status shows: the halt key, or the blown fuse. */
export function clusterHalt(cc: ClusterControl): HaltRecord | undefined {
  return cc.fuse ? haltOf({ ...cc, fuse: cc.fuse }) : cc.halt;
}

/** The cluster-wide part of `status`, one line each; what etcd holds is escaped (printable). */
export function describeClusterControl(cc: ClusterControl): string[] {
  const lines = [
    `next run: ${cc.nextRun ?? 'never'} (schedule.cron of this node's config)`,
    `turn: ${cc.holder ? `held by ${cc.holder}` : 'free'}; ${cc.participants} etcd-defragd registered`,
    `pause: ${cc.pause ? describePause(cc.pause) : 'no'}`,
    `halt: ${clusterHalt(cc) ? `halted after an integrity mismatch: ${describeHalt(clusterHalt(cc)!)}` : 'no'}`,
    ...cc.errors.map((e) => `could not read ${e}`),
  ];
  return lines.map(printable);
}
