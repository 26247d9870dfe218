import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { loadConfig } from '../../src/config.ts';
import type { MemberStatus } from '../../src/etcd.ts';
import { decide, decideNoSpace, healthGate, transferTarget, type ClusterView, type MemberView } from '../../src/policy.ts';

const MiB = 1024 ** 2;
const c = loadConfig({ env: { ETCD_DEFRAGD_ETCD_ENDPOINT: 'http://127.0.0.1:2379' }, path: '/nonexistent/none.yaml', pathExplicit: false }).config;

function status(id: string, o: Partial<MemberStatus> = {}): MemberStatus {
  return { endpoint: `http://m${id}`, memberId: id, leader: '1', version: '3.5.30', dbSize: 100 * MiB, dbSizeInUse: 90 * MiB,
    raftIndex: 100n, raftAppliedIndex: 100n, raftTerm: 2n, revision: 50n, isLearner: false, errors: [], ...o };
}
function member(id: string, o: Partial<MemberView> = {}, s: Partial<MemberStatus> | null = {}): MemberView {
  return { id, hex: BigInt(id).toString(16), name: `m${id}`, endpoint: `http://m${id}`, isLearner: false, isLocal: id === '1', status: s === null ? undefined : status(id, s), ...o };
}
function view(members: MemberView[], o: Partial<ClusterView> = {}): ClusterView {
  return { members, local: members.find((m) => m.isLocal)!, alarms: [], ...o };
}

describe('decide', () => {
  it('defragments a fragmented member with enough to reclaim', () => {
    assert.equal(decide({ dbSize: 1000 * MiB, dbSizeInUse: 600 * MiB }, c.policy).defrag, true);
  });
  it('leaves a member with little fragmentation or little to reclaim', () => {
    assert.equal(decide({ dbSize: 1000 * MiB, dbSizeInUse: 800 * MiB }, c.policy).defrag, false);
    assert.equal(decide({ dbSize: 100 * MiB, dbSizeInUse: 50 * MiB }, c.policy).defrag, false, '50 MiB < minReclaimable 64 MiB');
  });
  it('defragments near the quota when anything can be reclaimed', () => {
    const q = c.policy.quotaBytes;
    assert.equal(decide({ dbSize: 0.85 * q, dbSizeInUse: 0.84 * q }, c.policy).defrag, true);
    assert.equal(decide({ dbSize: 0.85 * q, dbSizeInUse: 0.85 * q }, c.policy).defrag, false);
  });
  it('force always defragments', () => {
    assert.equal(decide({ dbSize: 10, dbSizeInUse: 10 }, c.policy, true).defrag, true);
  });
  it('during NOSPACE defragments what blocks the disarm, never twice what cannot shrink enough', () => {
    const q = c.policy.quotaBytes;
    assert.equal(decideNoSpace({ dbSize: q, dbSizeInUse: 0.5 * q }, c).defrag, true);
    // The in-use figure is stale until a defragment (freed pages wait for a write): try once.
    assert.equal(decideNoSpace({ dbSize: q, dbSizeInUse: 0.95 * q }, c, false).defrag, true);
    const live = decideNoSpace({ dbSize: q, dbSizeInUse: 0.95 * q }, c, true);
    assert.equal(live.defrag, false);
    assert.match(live.reason, /live data .* alone is above/);
    assert.equal(decideNoSpace({ dbSize: 0.5 * q, dbSizeInUse: 0.4 * q }, c).defrag, false, 'under the mark: the normal policy');
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
  it('does not stop on NOSPACE', () => {
    assert.equal(healthGate(view(healthy(), { alarms: [{ memberId: '2', alarm: 'NOSPACE' }] }), c), undefined);
  });
});

describe('transferTarget', () => {
  it('picks the most caught-up voting follower, never a learner', () => {
    const ms = [member('1'), member('2', {}, { raftAppliedIndex: 90n }), member('3', {}, { raftAppliedIndex: 99n }), member('4', { isLearner: true }, { raftAppliedIndex: 200n })];
    assert.equal(transferTarget(view(ms))!.id, '3');
    assert.equal(transferTarget(view([member('1'), member('4', { isLearner: true })])), undefined);
  });
});

describe('decideNoSpace bounds', () => {
  it('does not defragment again when the live data sits just under the mark', () => {
    const limit = c.policy.quotaBytes * c.nospace.disarmBelow;
    assert.equal(decideNoSpace({ dbSize: limit + 10, dbSizeInUse: limit - 100 }, c, true).defrag, false);
    assert.equal(decideNoSpace({ dbSize: limit + 10, dbSizeInUse: limit - 8 * MiB }, c, true).defrag, true);
  });
});
