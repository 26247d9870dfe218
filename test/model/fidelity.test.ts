// The model's differences from etcd that issue 15 closed, each checked on the model alone: the
// Defragment reply has no header, raft requests need a majority, a mutation that reached a member is
// applied after its caller's deadline, and a compaction frees in-use pages but not the file.
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { kindOf } from '../../src/etcd.ts';
import type { ModelClient } from './etcd-model.ts';
import { Sim } from './sim.ts';

const MiB = 1024 * 1024;

function setup(): { s: Sim; client: (m: string) => ModelClient } {
  const s = new Sim({ leaseTTL: 3000, requestTimeout: 1000, defragTimeout: 20_000, seed: 5 });
  const owner = s.clock.owner('client');
  const pool = s.model.pool(owner);
  return { s, client: (m) => pool.get(s.model.member(m).endpoint) };
}

/** The error a promise of the simulated world ends in, or undefined. */
async function failure(s: Sim, p: Promise<unknown>): Promise<unknown> {
  try {
    await s.drive(p);
    return undefined;
  } catch (err) {
    return err;
  }
}

describe('the etcd model, where it used to differ from etcd', () => {
  it('the Defragment reply carries no header (maintenance.go returns an empty DefragmentResponse)', async () => {
    const { s, client } = setup();
    try {
      const reply: unknown = await s.drive(client('m2').defragment());
      assert.equal(reply, undefined, 'nothing to read from the reply');
      assert.equal(s.model.member('m2').defrags, 1);
    } finally {
      s.dispose();
    }
  });

  it('a lone survivor serves Status but no write; the write reached it and applies once a majority is back', async () => {
    const { s, client } = setup();
    try {
      s.model.kill('m2');
      s.model.kill('m3');
      await s.run(3000); // the leader steps down (CheckQuorum)
      assert.equal(s.model.leader, undefined);
      const st = await s.drive(client('m1').status());
      assert.equal(st.memberId, s.model.member('m1').id);
      const err = await failure(s, client('m1').put('k', 'v'));
      assert.equal(kindOf(err), 'timeout');
      assert.equal(s.model.getValue('k'), undefined);
      assert.equal(kindOf(await failure(s, client('m1').get('k'))), 'timeout', 'a linearizable read waits too');
      s.model.restart('m2');
      await s.run(2000); // an election with m1 and m2
      assert.ok(s.model.leader);
      assert.equal(s.model.getValue('k'), 'v', 'applied late: it was in the member before the deadline');
      assert.equal(s.model.late.put, 1);
    } finally {
      s.dispose();
    }
  });

  it('a request that reached a member is dropped if that member dies before applying it', async () => {
    const { s, client } = setup();
    try {
      s.model.kill('m2');
      s.model.kill('m3');
      await s.run(3000);
      await failure(s, client('m1').put('k', 'v'));
      s.model.kill('m1');
      s.model.restart('m1');
      s.model.restart('m2');
      await s.run(2000);
      assert.equal(s.model.getValue('k'), undefined);
    } finally {
      s.dispose();
    }
  });

  it('a frozen member runs the Defragment it received once thawed, though its caller timed out', async () => {
    const { s, client } = setup();
    try {
      s.model.freeze('m3');
      const err = await failure(s, client('m3').defragment());
      assert.equal(kindOf(err), 'timeout');
      assert.equal(s.model.defragLog.length, 0);
      s.model.thaw('m3');
      await s.run(100);
      assert.deepEqual(
        s.model.defragmenting().map((m) => m.name),
        ['m3'],
      );
      assert.equal(s.model.late.defragment, 1);
      await s.run(5000);
      assert.equal(s.model.member('m3').defrags, 1);
    } finally {
      s.dispose();
    }
  });

  it('a compaction lowers the in-use size a commit later; only a defragment shrinks the file', async () => {
    const { s, client } = setup();
    try {
      const m = s.model.member('m1');
      assert.ok(s.model.churn(500 * MiB));
      assert.equal(m.dbSizeInUse, 600 * MiB);
      assert.equal(m.dbSize, 600 * MiB);
      assert.equal(s.model.historyBytes(), 500 * MiB);
      await s.drive(client('m1').compact(s.model.revision));
      assert.equal(s.model.historyBytes(), 0);
      assert.equal(m.dbSizeInUse, 600 * MiB, 'Status lags the compaction by a commit');
      await s.drive(client('m1').put('k', 'v'));
      assert.equal(m.dbSizeInUse, 100 * MiB);
      assert.equal(m.dbSize, 600 * MiB, 'the file keeps its size');
      await s.drive(client('m1').defragment());
      assert.equal(m.dbSize, 100 * MiB);
    } finally {
      s.dispose();
    }
  });

  it('history that reaches the quota raises NOSPACE; a CORRUPT alarm refuses writes but not reads', async () => {
    const { s, client } = setup();
    try {
      assert.ok(s.model.churn(s.model.opts.quotaBytes));
      assert.ok(s.model.alarms.some((a) => a.alarm === 'NOSPACE'));
      assert.equal(s.model.churn(MiB), false, 'the API server cannot write under NOSPACE');
      s.model.disarmAll();
      s.model.member('m1').dbSize = s.model.member('m2').dbSize = s.model.member('m3').dbSize = 100 * MiB;
      s.model.raiseCorrupt('m2');
      assert.match(String(await failure(s, client('m1').put('k', 'v'))), /corrupt cluster/);
      assert.equal(await s.drive(client('m1').get('k')), undefined);
      s.model.clearCorrupt();
      await s.drive(client('m1').put('k', 'v'));
      assert.equal(s.model.getValue('k'), 'v');
    } finally {
      s.dispose();
    }
  });
});
