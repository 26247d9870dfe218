// What one look at the cluster holds, as inspect.ts gathers it and policy.ts judges it: each
// member's Status as etcd sends it, the alarms, the view of every member built from them, and how a
// member is named (IDs in hex, labels). Types and naming only: no I/O, no rules.

export interface MemberStatus {
  endpoint: string;
  memberId: string; // decimal string; IDs exceed 2^53
  leader: string;
  version: string;
  dbSize: number;
  dbSizeInUse: number;
  raftIndex: bigint;
  raftAppliedIndex: bigint;
  raftTerm: bigint;
  revision: bigint;
  isLearner: boolean;
  errors: string[];
  /** etcd 3.6 sends the member's quota in Status (dbSizeQuota); earlier versions do not. */
  quotaBytes?: number;
}

export interface Alarm {
  memberId: string;
  alarm: 'NOSPACE' | 'CORRUPT' | string;
}

export interface MemberView {
  id: string; // decimal
  hex: string;
  name: string;
  endpoint: string; // first client URL that answered (or the first advertised)
  /** The client URLs the member advertises (member list). */
  clientURLs?: string[];
  isLearner: boolean;
  isLocal: boolean;
  status?: MemberStatus;
  error?: string;
  /** The quota this member is judged against (undefined: unknown, see quotaError). */
  quotaBytes?: number;
  quotaSource?: QuotaSource;
  /** The member's own --quota-backend-bytes as etcd reports it, when it could be read. */
  etcdQuotaBytes?: number;
  quotaError?: string;
  /** etcd_disk_defrag_inflight from the member's /metrics; undefined when that could not be read. */
  defragmenting?: boolean;
  /** Why /metrics could not be read, and whether the member did not answer at all (down) or answered wrongly. */
  metricsError?: string;
  metricsDown?: boolean;
}

/** status: etcd 3.6's Status field; metrics: etcd_server_quota_backend_bytes; config: policy.quotaBytes. */
export type QuotaSource = 'status' | 'metrics' | 'config';

export interface ClusterView {
  members: MemberView[];
  local: MemberView;
  alarms: Alarm[];
  readError?: string; // linearizable read failure
}

/** An etcd ID (member, lease; decimal, as etcd sends it) in hex, as etcdctl shows it. */
export const hexId = (id: string): string => BigInt(id).toString(16);

/** A hex ID (as in our keys and logs) back in decimal, as etcd's API takes it. */
export const decimalId = (hex: string): string => BigInt(`0x${hex}`).toString();

export function voting(view: ClusterView): MemberView[] {
  return view.members.filter((m) => !m.isLearner);
}

export function memberLabel(m: Pick<MemberView, 'hex' | 'name' | 'endpoint'>): string {
  return `${m.name || m.hex} (${m.hex}, ${m.endpoint})`;
}
