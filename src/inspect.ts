// Cluster inspection: the local member (by the member ID in etcd.endpoint's Status header), the
// member list, alarms, and each voting member's Status through its advertised client URLs.
import type { EtcdPool, RetryHooks } from './etcd.ts';
import { hexId, type ClusterView, type MemberView } from './policy.ts';

export interface InspectOptions {
  /** Tries per member Status: a member that does not answer makes the run skip, not wait long. */
  memberAttempts?: number;
  /** Also prove a quorum answers with a linearizable read. */
  linearizableRead?: boolean;
  readKey?: string;
}

export async function inspect(pool: EtcdPool, localEndpoint: string, hooks: RetryHooks, opts: InspectOptions = {}): Promise<ClusterView> {
  const localClient = pool.get(localEndpoint);
  const localStatus = await localClient.status(hooks);
  const [list, alarms] = await Promise.all([localClient.members(hooks), localClient.alarms(hooks)]);
  const members: MemberView[] = await Promise.all(list.map(async (m) => {
    const isLocal = m.id === localStatus.memberId;
    const view: MemberView = {
      id: m.id,
      hex: hexId(m.id),
      name: m.name,
      endpoint: isLocal ? localEndpoint : (m.clientURLs[0] ?? '(no client URL)'),
      isLearner: m.isLearner,
      isLocal,
    };
    if (isLocal) {
      view.status = localStatus;
      return view;
    }
    if (m.clientURLs.length === 0) {
      view.error = 'the member has no client URL (not started?)';
      return view;
    }
    for (const url of m.clientURLs) {
      try {
        const s = await pool.get(url).status(hooks, opts.memberAttempts ?? 2);
        if (s.memberId !== m.id) {
          view.error = `${url} answers as member ${hexId(s.memberId)}`;
          continue;
        }
        view.endpoint = url;
        view.status = s;
        view.error = undefined;
        break;
      } catch (err) {
        view.error = (err as Error).message;
      }
    }
    return view;
  }));
  let local = members.find((m) => m.isLocal);
  if (!local) {
    // A member that was just added may answer before the list shows it; treat as unknown.
    local = { id: localStatus.memberId, hex: hexId(localStatus.memberId), name: '', endpoint: localEndpoint, isLearner: localStatus.isLearner, isLocal: true, status: localStatus };
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

/** Status of every voting member with a short deadline and no retry: who is busy (defragmenting) right now? */
export async function busyMembers(pool: EtcdPool, view: ClusterView, timeoutMs: number): Promise<{ member: MemberView; error: string }[]> {
  const results = await Promise.all(view.members.filter((m) => !m.isLearner).map(async (m) => {
    const r = await pool.get(m.endpoint).probe(timeoutMs);
    return r instanceof Error ? { member: m, error: r.message } : undefined;
  }));
  return results.filter((r): r is { member: MemberView; error: string } => r !== undefined);
}
