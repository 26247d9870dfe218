// Cluster inspection: the local member (by the member ID in etcd.endpoint's Status header), the
// member list, alarms, and each member's Status through its advertised client URLs, next to what
// the member publishes on its own /metrics: its quota and whether it is defragmenting right now.
// /metrics answers while a member defragments, when Status blocks; a member silent on both is down.
import type { Config } from './config.ts';
import { MetricsPageError, type EtcdMember, type EtcdPool, type RetryHooks, type ServerMetrics } from './etcd.ts';
import { errorMessage } from './errors.ts';
import { resolveQuota } from './policy.ts';
import { hexId, memberLabel, type ClusterView, type MemberView } from './view.ts';

export interface InspectOptions {
  /** Tries per member Status: a member that does not answer makes the run skip, not wait long. */
  memberAttempts?: number;
  /** Also prove a quorum answers with a linearizable read. */
  linearizableRead?: boolean;
  readKey?: string;
  /** policy.quotaBytes: a size, or auto (read from etcd). */
  quotaBytes?: Config['policy']['quotaBytes'];
}

/**
 * Did the request fail because nothing answered (refused, unreachable, unresolvable, timed out,
 * reset, TLS)? Only an HTTP answer we cannot use (an error status) is "up, but cannot tell".
 */
function noAnswer(err: unknown): boolean {
  return !(err instanceof MetricsPageError);
}

async function readMetrics(client: EtcdMember, timeoutMs?: number): Promise<{ metrics?: ServerMetrics; error?: string; down?: boolean }> {
  try {
    const metrics = await client.serverMetrics(timeoutMs);
    if (metrics.defragInflight === undefined)
      return { metrics, error: `${client.endpoint}/metrics has no etcd_disk_defrag_inflight`, down: false };
    return { metrics };
  } catch (err) {
    return { error: errorMessage(err), down: noAnswer(err) };
  }
}

function applyMetrics(view: MemberView, r: Awaited<ReturnType<typeof readMetrics>>, quotaBytes: Config['policy']['quotaBytes']): void {
  view.defragmenting = r.metrics?.defragInflight;
  view.metricsError = r.error;
  view.metricsDown = r.error ? r.down : undefined;
  const q = resolveQuota(quotaBytes, view.status?.quotaBytes, r.metrics?.quotaBytes);
  view.quotaBytes = q.bytes;
  view.quotaSource = q.source;
  view.etcdQuotaBytes = q.etcd;
  if (q.bytes === undefined) {
    view.quotaError =
      `cannot read the quota of member ${memberLabel(view)}: ` +
      `${
        r.error ??
        (r.metrics?.quotaInvalid !== undefined
          ? `${view.endpoint}/metrics has etcd_server_quota_backend_bytes ${JSON.stringify(r.metrics.quotaInvalid)}, not a whole number of bytes above 0`
          : `${view.endpoint}/metrics has no etcd_server_quota_backend_bytes`)
      }; ` +
      `set policy.quotaBytes to the members' --quota-backend-bytes`;
  }
}

export async function inspect(pool: EtcdPool, localEndpoint: string, hooks: RetryHooks, opts: InspectOptions = {}): Promise<ClusterView> {
  const quotaBytes = opts.quotaBytes ?? 'auto';
  const localClient = pool.get(localEndpoint);
  const localStatus = await localClient.status(hooks);
  const [list, alarms] = await Promise.all([localClient.members(hooks), localClient.alarms(hooks)]);
  const members: MemberView[] = await Promise.all(
    list.map(async (m) => {
      const isLocal = m.id === localStatus.memberId;
      const view: MemberView = {
        id: m.id,
        hex: hexId(m.id),
        name: m.name,
        endpoint: isLocal ? localEndpoint : (m.clientURLs[0] ?? '(no client URL)'),
        clientURLs: m.clientURLs,
        isLearner: m.isLearner,
        isLocal,
      };
      if (isLocal) {
        view.status = localStatus;
        applyMetrics(view, await readMetrics(localClient), quotaBytes);
        return view;
      }
      if (m.clientURLs.length === 0) {
        view.error = 'the member has no client URL (not started?)';
        return view;
      }
      let metrics: Awaited<ReturnType<typeof readMetrics>> | undefined;
      for (const url of m.clientURLs) {
        const client = pool.get(url);
        const [status, met] = await Promise.all([
          client.status(hooks, opts.memberAttempts ?? 2).then(
            (s) => s,
            (err: unknown) => err as Error,
          ),
          readMetrics(client),
        ]);
        if (!(status instanceof Error) && status.memberId !== m.id) {
          view.error = `${url} answers as member ${hexId(status.memberId)}`;
          continue;
        }
        view.endpoint = url;
        metrics = met;
        if (status instanceof Error) {
          view.error = status.message;
          // A member that defragments answers /metrics but not Status: that URL is the member's.
          if (met.metrics) break;
          continue;
        }
        view.status = status;
        view.error = undefined;
        break;
      }
      if (metrics) applyMetrics(view, metrics, quotaBytes);
      return view;
    }),
  );
  let local = members.find((m) => m.isLocal);
  if (!local) {
    // A member that was just added may answer before the list shows it; treat as unknown.
    local = {
      id: localStatus.memberId,
      hex: hexId(localStatus.memberId),
      name: '',
      endpoint: localEndpoint,
      clientURLs: [],
      isLearner: localStatus.isLearner,
      isLocal: true,
      status: localStatus,
    };
    applyMetrics(local, await readMetrics(localClient), quotaBytes);
    members.push(local);
  }
  const view: ClusterView = { members, local, alarms };
  if (opts.linearizableRead !== false) {
    try {
      await localClient.linearizableRead(opts.readKey ?? '/etcd-defragd/health', hooks);
    } catch (err) {
      view.readError = (err as Error).message;
    }
  }
  return view;
}

export interface Busy {
  member: MemberView;
  reason: string;
  /** Set when /metrics could not tell and silence on Status was taken as a defragment. */
  fallback?: string;
  /** The member answers neither /metrics nor Status: down, not defragmenting. */
  down?: boolean;
}

/**
 * Which voting members are defragmenting right now, by etcd's own etcd_disk_defrag_inflight. A
 * member that answers nothing is reported as down (not busy); only where /metrics answers but
 * cannot tell does a member that does not answer Status count as busy.
 */
export async function busyMembers(pool: EtcdPool, view: ClusterView, timeoutMs: number): Promise<Busy[]> {
  const results = await Promise.all(
    view.members
      .filter((m) => !m.isLearner)
      .map(async (m): Promise<Busy | undefined> => {
        const client = pool.get(m.endpoint);
        const r = await readMetrics(client, timeoutMs);
        if (r.metrics?.defragInflight === true)
          return { member: m, reason: `member ${memberLabel(m)} is defragmenting (etcd_disk_defrag_inflight is 1)` };
        if (r.metrics?.defragInflight === false) return undefined;
        const s = await client.probe(timeoutMs);
        if (!(s instanceof Error)) return undefined;
        if (r.down)
          return {
            member: m,
            reason: `member ${memberLabel(m)} answers neither /metrics (${r.error}) nor Status (${s.message}): down`,
            down: true,
          };
        return {
          member: m,
          reason: `member ${memberLabel(m)} does not answer Status (${s.message}) and its /metrics cannot tell: taken to be defragmenting`,
          fallback: r.error,
        };
      }),
  );
  return results.filter((r): r is Busy => r !== undefined);
}
