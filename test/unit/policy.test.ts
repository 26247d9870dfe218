import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { loadConfig } from '../../src/config.ts';
import {
  decide,
  decideNoSpace,
  enforcedQuota,
  healthGate,
  nospaceNext,
  quotaMismatch,
  resolveQuota,
  transferTarget,
} from '../../src/policy.ts';
import { hexId, type ClusterView, type MemberStatus, type MemberView } from '../../src/view.ts';

const MiB = 1024 ** 2;
const q = 2048 * MiB;
const c = loadConfig({
  env: { ETCD_DEFRAGD_ETCD_ENDPOINT: 'http://127.0.0.1:2379' },
  path: '/nonexistent/none.yaml',
  pathExplicit: false,
}).config;

function status(id: string, o: Partial<MemberStatus> = {}): MemberStatus {
  return {
    endpoint: `http://m${id}`,
    memberId: id,
    leader: '1',
    version: '3.5.30',
    dbSize: 100 * MiB,
    dbSizeInUse: 90 * MiB,
    raftIndex: 100n,
    raftAppliedIndex: 100n,
    raftTerm: 2n,
    revision: 50n,
    isLearner: false,
    errors: [],
    ...o,
  };
}
function member(id: string, o: Partial<MemberView> = {}, s: Partial<MemberStatus> | null = {}): MemberView {
  return {
    id,
    hex: hexId(id),
    name: `m${id}`,
    endpoint: `http://m${id}`,
    isLearner: false,
    isLocal: id === '1',
    status: s === null ? undefined : status(id, s),
    ...o,
  };
}
function view(members: MemberView[], o: Partial<ClusterView> = {}): ClusterView {
  return { members, local: members.find((m) => m.isLocal)!, alarms: [], ...o };
}

describe('decide', () => {
  it('defragments a fragmented member with enough to reclaim', () => {
    assert.equal(decide({ dbSize: 1000 * MiB, dbSizeInUse: 600 * MiB }, c.policy, q).defrag, true);
  });
  it('leaves a member with little fragmentation or little to reclaim', () => {
    assert.equal(decide({ dbSize: 1000 * MiB, dbSizeInUse: 800 * MiB }, c.policy, q).defrag, false);
    assert.equal(decide({ dbSize: 100 * MiB, dbSizeInUse: 50 * MiB }, c.policy, q).defrag, false, '50 MiB < minReclaimable 64 MiB');
  });
  it('defragments near the quota when anything can be reclaimed', () => {
    assert.equal(decide({ dbSize: 0.85 * q, dbSizeInUse: 0.84 * q }, c.policy, q).defrag, true);
    assert.equal(decide({ dbSize: 0.85 * q, dbSizeInUse: 0.85 * q }, c.policy, q).defrag, false);
    assert.equal(
      decide({ dbSize: 0.85 * q, dbSizeInUse: 0.84 * q }, c.policy, 8 * q).defrag,
      false,
      'the same member under an 8x larger quota',
    );
  });
  it('force always defragments', () => {
    assert.equal(decide({ dbSize: 10, dbSizeInUse: 10 }, c.policy, q, true).defrag, true);
  });
  it('during NOSPACE defragments what blocks the disarm, never twice what cannot shrink enough', () => {
    assert.equal(decideNoSpace({ dbSize: q, dbSizeInUse: 0.5 * q }, c, q).defrag, true);
    // The in-use figure is stale until a defragment (freed pages wait for a write): try once.
    assert.equal(decideNoSpace({ dbSize: q, dbSizeInUse: 0.95 * q }, c, q, false).defrag, true);
    const live = decideNoSpace({ dbSize: q, dbSizeInUse: 0.95 * q }, c, q, true);
    assert.equal(live.defrag, false);
    assert.match(live.reason, /live data .* alone is above/);
    assert.equal(decideNoSpace({ dbSize: 0.5 * q, dbSizeInUse: 0.4 * q }, c, q).defrag, false, 'under the mark: out of the NOSPACE order');
  });
});

describe('healthGate', () => {
  const healthy = () => [member('1'), member('2'), member('3')];
  it('passes a healthy cluster', () => {
    assert.equal(healthGate(view(healthy()), c), undefined);
  });
  it('names a member that does not answer', () => {
    const ms = healthy();
    ms[2] = member('3', { error: 'deadline' }, null);
    assert.match(healthGate(view(ms), c)!.reason, /member m3 \(3, http:\/\/m3\) does not answer Status/);
  });
  it('ignores a learner that does not answer', () => {
    const ms = [...healthy(), member('4', { isLearner: true }, null)];
    assert.equal(healthGate(view(ms), c), undefined);
  });
  it('stops on disagreement about the leader, no leader, raft lag, CORRUPT and a failed read', () => {
    const split = healthy();
    split[1] = member('2', {}, { leader: '3' });
    assert.equal(healthGate(view(split), c)!.check, 'leader');
    const none = healthy();
    none[0] = member('1', {}, { leader: '0' });
    assert.equal(healthGate(view(none), c)!.check, 'leader');
    const lag = healthy();
    lag[2] = member('3', {}, { raftAppliedIndex: 100n - 1001n + 200n - 200n });
    assert.equal(healthGate(view(lag), c)!.check, 'raft-lag');
    assert.equal(healthGate(view(healthy(), { alarms: [{ memberId: '2', alarm: 'CORRUPT' }] }), c)!.check, 'alarm');
    assert.equal(healthGate(view(healthy(), { readError: 'x' }), c)!.check, 'read');
  });
  it('waits for a member etcd says is defragmenting, but a member silent on Status and /metrics is down', () => {
    const busy = healthy();
    busy[2] = member('3', { error: 'deadline', defragmenting: true }, null);
    assert.equal(healthGate(view(busy), c)!.check, 'busy');
    const down = healthy();
    down[2] = member('3', { error: 'deadline', metricsError: 'ECONNREFUSED', metricsDown: true }, null);
    assert.equal(healthGate(view(down), c)!.check, 'status');
    const quiet = healthy();
    quiet[2] = member('3', { error: 'deadline', defragmenting: false }, null);
    assert.equal(healthGate(view(quiet), c)!.check, 'status', '/metrics says no defragment: silence is trouble');
    const blind = healthy();
    blind[2] = member('3', { error: 'deadline', metricsError: 'HTTP 404', metricsDown: false }, null);
    const g = healthGate(view(blind), c)!;
    assert.equal(g.check, 'busy');
    assert.match(g.reason, /fallback: silence/);
  });
  it('does not stop on NOSPACE', () => {
    assert.equal(healthGate(view(healthy(), { alarms: [{ memberId: '2', alarm: 'NOSPACE' }] }), c), undefined);
  });
});

describe('quota', () => {
  it("takes etcd's own figure under auto, Status before /metrics, and a configured size over both", () => {
    assert.deepEqual(resolveQuota('auto', undefined, 64 * MiB), { bytes: 64 * MiB, source: 'metrics', etcd: 64 * MiB });
    assert.deepEqual(resolveQuota('auto', 8 * q, 64 * MiB), { bytes: 8 * q, source: 'status', etcd: 8 * q });
    assert.deepEqual(resolveQuota(q, undefined, 8 * q), { bytes: q, source: 'config', etcd: 8 * q });
    assert.deepEqual(resolveQuota('auto', undefined, undefined), { etcd: undefined });
  });
  it('during NOSPACE never trusts a configured quota above the one etcd enforces', () => {
    assert.equal(enforcedQuota({ quotaBytes: 2 * q, etcdQuotaBytes: q }), q, 'v0.1 config: 2GiB written out, member at 1GiB');
    assert.equal(enforcedQuota({ quotaBytes: q, etcdQuotaBytes: 2 * q }), q);
    assert.equal(enforcedQuota({ quotaBytes: q, etcdQuotaBytes: undefined }), q);
    assert.equal(enforcedQuota({ quotaBytes: undefined, etcdQuotaBytes: undefined }), undefined);
  });
  it('names both numbers when the configured quota disagrees with the member', () => {
    const m = member('2', { quotaBytes: q, quotaSource: 'config', etcdQuotaBytes: 4 * q });
    assert.match(
      quotaMismatch(m)!,
      /policy\.quotaBytes is 2\.00GiB \(2147483648 bytes\) but member m2 .* --quota-backend-bytes 8\.00GiB \(8589934592 bytes\)/,
    );
    assert.equal(quotaMismatch(member('2', { quotaBytes: q, quotaSource: 'config', etcdQuotaBytes: q })), undefined);
    assert.equal(quotaMismatch(member('2', { quotaBytes: q, quotaSource: 'metrics', etcdQuotaBytes: q })), undefined);
  });
});

describe('transferTarget', () => {
  it('picks the most caught-up voting follower, never a learner or a member that defragments', () => {
    const ms = [
      member('1'),
      member('2', {}, { raftAppliedIndex: 90n }),
      member('3', {}, { raftAppliedIndex: 99n }),
      member('4', { isLearner: true }, { raftAppliedIndex: 200n }),
    ];
    assert.equal(transferTarget(view(ms))!.id, '3');
    ms[2] = member('3', { defragmenting: true }, { raftAppliedIndex: 99n });
    assert.equal(transferTarget(view(ms))!.id, '2');
    assert.equal(transferTarget(view([member('1'), member('4', { isLearner: true })])), undefined);
  });
});

describe('decideNoSpace bounds', () => {
  it('does not defragment again when the live data sits just under the mark', () => {
    const limit = q * c.nospace.disarmBelow;
    assert.equal(decideNoSpace({ dbSize: limit + 10, dbSizeInUse: limit - 100 }, c, q, true).defrag, false);
    assert.equal(decideNoSpace({ dbSize: limit + 10, dbSizeInUse: limit - 8 * MiB }, c, q, true).defrag, true);
  });
});

describe('the NOSPACE order', () => {
  const over = (id: string, o: Partial<MemberView> = {}) => member(id, { quotaBytes: q, ...o }, { dbSize: q, dbSizeInUse: 0.5 * q });
  const under = (id: string) => member(id, { quotaBytes: q }, { dbSize: 0.5 * q, dbSizeInUse: 0.4 * q });
  it('picks the lowest member ID among the voting members at or above the disarm mark, as a number', () => {
    // '9' < '10' as numbers, not as strings; IDs exceed 2^53.
    const ids = ['18446744073709551615', '10', '9'];
    assert.equal(nospaceNext(view(ids.map((id) => over(id, { isLocal: id === '9' }))), c)?.id, '9');
    assert.equal(nospaceNext(view([under('9'), over('10'), over('18446744073709551615', { isLocal: true })]), c)?.id, '10');
  });
  it('skips learners and members under the mark; nobody when all are under it', () => {
    assert.equal(nospaceNext(view([over('1', { isLearner: true }), over('2', { isLocal: true })]), c)?.id, '2');
    assert.equal(nospaceNext(view([under('1'), under('2')]), c), undefined);
  });
  it('judges by the lower of the configured and the member own quota (what etcd enforces)', () => {
    const m = member('1', { quotaBytes: 4 * q, etcdQuotaBytes: q }, { dbSize: q, dbSizeInUse: 0.4 * q });
    assert.equal(nospaceNext(view([m]), c)?.id, '1');
  });
  it('a member under the mark is not defragmented during NOSPACE, whatever its fragmentation', () => {
    const d = decideNoSpace({ dbSize: 0.8 * q, dbSizeInUse: 0.1 * q }, c, q);
    assert.equal(d.defrag, false);
    assert.match(d.reason, /not in the NOSPACE order/);
  });
});
