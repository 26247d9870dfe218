// NOSPACE recovered whoever was running before it, and the holes a review found around it, each
// as a directed schedule over the etcd model. Each test fails with its fix reverted.
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { haltKey, readStops, haltOf, stopReason, armHaltFuse, fuseKey } from '../../src/control.ts';
import type { Daemon } from '../../src/daemon.ts';
import { run, type RunResult } from '../../src/run.ts';
import { Sim } from './sim.ts';

const TTL = 3000;
const MiB = 1024 * 1024;

function sim(o: ConstructorParameters<typeof Sim>[0] = {}): Sim {
  return new Sim({ leaseTTL: TTL, requestTimeout: 1000, defragTimeout: 20_000, ...o });
}

const nospace = (s: Sim) => s.model.alarms.some((a) => a.alarm === 'NOSPACE');

/** Every member over the quota, the alarm raised: writes refused, no lease granted. */
function fillAll(s: Sim): void {
  for (const m of s.model.members) s.model.fillToQuota(m.name);
}

/** What SIGHUP with changed etcd or TLS settings does: a new pool and a new turn, the old participant left. */
function reconnect(d: Daemon): void {
  (d as unknown as { reloadConnections(): void }).reloadConnections();
}

describe('NOSPACE recovered whoever was running before it', () => {
  it('daemons first started during the alarm (no key of ours exists) recover it', async () => {
    const s = sim({ seed: 101 });
    try {
      fillAll(s);
      assert.deepEqual(s.model.keys(s.base.coordination.prefix), [], 'nothing prepared while writes worked');
      for (const m of ['m1', 'm2', 'm3']) s.startDaemon(m);
      assert.ok(await s.until(() => !nospace(s), 10 * 60_000), 'the alarm is disarmed');
      assert.deepEqual(s.model.violations, []);
      assert.deepEqual(s.model.defragLog.map((d) => d.member).sort(), ['m1', 'm2', 'm3'], 'each member once');
    } finally {
      s.dispose();
    }
  });

  it('every daemon killed during the alarm and started again after the lease TTL (a reboot) recovers it', async () => {
    const s = sim({ seed: 102 });
    try {
      const daemons = ['m1', 'm2', 'm3'].map((m) => s.startDaemon(m));
      await s.run(3000);
      for (const m of s.model.members) m.defragMs = 8000;
      fillAll(s);
      await s.run(6000); // recovery under way
      for (const d of daemons) s.kill(d);
      await s.run(4 * TTL); // every lease of ours has expired
      for (const m of ['m1', 'm2', 'm3']) s.startDaemon(m);
      assert.ok(await s.until(() => !nospace(s), 10 * 60_000), 'the alarm is disarmed');
      assert.deepEqual(s.model.violations, []);
    } finally {
      s.dispose();
    }
  });

  it('six reloads or TLS changes of every daemon during the alarm cost nothing: it is still recovered', async () => {
    const s = sim({ seed: 103 });
    try {
      const daemons = ['m1', 'm2', 'm3'].map((m) => s.startDaemon(m));
      await s.run(3000);
      for (const m of s.model.members) m.defragMs = 4000;
      fillAll(s);
      for (let i = 0; i < 6; i++) {
        for (const d of daemons) reconnect(d.daemon!);
        await s.run(1500);
      }
      assert.ok(await s.until(() => !nospace(s), 10 * 60_000), 'the alarm is disarmed');
      assert.deepEqual(s.model.violations, []);
    } finally {
      s.dispose();
    }
  });

  it('during NOSPACE a leader that cannot hand leadership away never defragments as leader', async () => {
    const s = sim({ seed: 104 });
    try {
      const leader = s.model.member(s.model.leader!);
      s.model.refuseMoveLeader = true;
      for (const m of ['m1', 'm2', 'm3']) s.startDaemon(m);
      await s.run(3000);
      fillAll(s);
      // The followers go; the leader's daemon skips and tries again at every alarm check.
      await s.until(() => s.model.defragLog.length === 2, 5 * 60_000);
      await s.run(60_000);
      assert.equal(s.model.leader, leader.id, 'no election happened');
      assert.deepEqual(
        s.model.defragLog.filter((d) => d.member === leader.name),
        [],
        'the leader was never defragmented while leadership could not move',
      );
      assert.ok(nospace(s), 'still armed: the leader is still over the quota');
      s.model.refuseMoveLeader = false; // the transfer works again: the former leader goes
      assert.ok(await s.until(() => !nospace(s), 5 * 60_000), 'the alarm is disarmed');
      assert.deepEqual(s.model.violations, []);
    } finally {
      s.dispose();
    }
  });

  it('etcd before 3.4.20/3.5.7, which refuses even a delete-only Txn over the quota: a turn held at the alarm is given back', async () => {
    const s = sim({ seed: 105 });
    try {
      s.model.txnQuotaBefore3420 = true;
      const m1 = s.model.member('m1');
      m1.defragMs = 6000;
      const daemons = ['m1', 'm2', 'm3'].map((m) => s.startDaemon(m));
      await s.run(3000);
      s.model.fragment('m1', 500 * MiB); // m1 needs a defragment: its daemon takes the turn
      daemons[0]!.daemon!.trigger('scheduled');
      await s.until(() => m1.defragEndsAt !== undefined, 60_000);
      // The alarm comes while the daemon holds the turn: giving it back is a delete-only Txn, refused by every member over quota.
      for (const m of s.model.members) if (m !== m1) s.model.fillToQuota(m.name);
      assert.ok(await s.until(() => !nospace(s), 10 * 60_000), 'the alarm is disarmed');
      assert.deepEqual(s.model.violations, []);
    } finally {
      s.dispose();
    }
  });

  it('the Defragment goes to an advertised URL that answers as the local member, not through a load balancer', async () => {
    const s = sim({ seed: 106 });
    try {
      // etcd.endpoint is a load balancer in front of the members: Status lands on m1, the Defragment would land on m2.
      const lb = 'https://etcd-lb:2379';
      s.model.routes.set(lb, s.model.member('m1').id);
      s.model.onArrive = (_o, op, endpoint) => {
        if (endpoint === lb) s.model.routes.set(lb, s.model.member(op === 'defragment' ? 'm2' : 'm1').id);
      };
      const r = s.runOnce('m1', { force: true }, { ...s.config('m1'), etcd: { ...s.config('m1').etcd, endpoint: lb } });
      await s.until(() => r.settled !== undefined, 120_000);
      assert.equal((r.settled as RunResult).outcome, 'done', (r.settled as RunResult).reason);
      assert.deepEqual(
        s.model.defragLog.map((d) => d.member),
        ['m1'],
      );
    } finally {
      s.dispose();
    }
  });

  it('a halt written after the holder last read it is seen at the fence, before the Defragment', async () => {
    const s = sim({ seed: 107 });
    try {
      let written = false;
      s.model.onArrive = (owner, op, _e, detail) => {
        // The fence's first step (the holder checks its ticket): another daemon records a mismatch now.
        if (written || op !== 'range' || !detail?.includes('/t/') || !owner.name.startsWith('once')) return;
        written = true;
        s.model.applyTxn([], [{ request_put: { key: Buffer.from(haltKey(s.base)), value: Buffer.from('{"reason":"test"}') } }]);
      };
      const r = s.runOnce('m1', { force: true });
      await s.until(() => r.settled !== undefined, 120_000);
      assert.ok(written, 'the halt was written at the fence');
      assert.equal((r.settled as RunResult).check, 'halt', (r.settled as RunResult).reason);
      assert.deepEqual(s.model.defragLog, []);
      assert.deepEqual(s.model.violations, []);
    } finally {
      s.dispose();
    }
  });

  it('a mismatch is recorded on another member when the local one does not take the halt key', async () => {
    const s = sim({ seed: 108 });
    try {
      s.model.onArrive = (_o, op, endpoint) => {
        // The defragment corrupts a peer (a HashKV mismatch follows), and the local member then stops answering writes.
        if (op === 'defragment') s.model.member('m2').corrupt = true;
        if (op === 'put' && endpoint === s.model.member('m1').endpoint) s.model.freeze('m1');
      };
      const r = s.runOnce('m1', { force: true });
      await s.until(() => r.settled !== undefined, 5 * 60_000);
      const res = r.settled as RunResult;
      assert.equal(res.check, 'integrity', res.reason);
      assert.equal(res.haltRecorded, true);
      assert.ok(s.model.getValue(haltKey(s.base)), 'the halt key is in etcd');
    } finally {
      s.dispose();
    }
  });

  it('a halt recorded by the fuse stops every run and shows as a halt; lifting it re-arms the fuse', async () => {
    const s = sim({ seed: 109 });
    try {
      const pool = s.model.pool(s.clock.owner('operator'));
      await s.drive(armHaltFuse(pool, s.config('m1')));
      s.model.applyTxn([], [{ request_delete_range: { key: Buffer.from(fuseKey(s.base)) } }]); // blown during NOSPACE
      const stops = await s.drive(readStops(pool.get(s.config('m1').etcd.endpoint), s.base));
      assert.ok(haltOf(stops), 'the halt the fuse records');
      assert.equal(stopReason(stops)?.check, 'halt');
      const r = s.runOnce('m2', { force: true });
      await s.until(() => r.settled !== undefined, 120_000);
      assert.equal((r.settled as RunResult).check, 'halt');
      assert.deepEqual(s.model.defragLog, []);
    } finally {
      s.dispose();
    }
  });

  it('close() while a registration is under way leaves no participant that keeps being renewed', async () => {
    const s = sim({ seed: 110 });
    try {
      const { turn } = s.newTurn('m1');
      const registering = turn.register().catch(() => undefined);
      await s.run(1); // the lease grant is on its way
      await s.drive(turn.close());
      await s.drive(registering);
      await s.run(4 * TTL);
      assert.deepEqual(s.model.keys(`${s.base.coordination.prefix}p/`), [], 'no participant left behind');
    } finally {
      s.dispose();
    }
  });

  it('a recovery run whose alarm is already gone runs as scheduled: it settles and does not say NOSPACE recovery', async () => {
    const s = sim({ seed: 111 });
    try {
      s.model.fragment('m1', 500 * MiB);
      const owner = s.clock.owner('daemon-run');
      const pool = s.model.pool(owner);
      const { turn } = s.newTurn('m1');
      const r = await s.drive(
        run({ config: s.config('m1'), pool, log: (s as unknown as { log: never }).log, clock: owner.clock(), turn }, { mode: 'nospace' }),
      );
      await s.drive(turn.close());
      assert.equal(r.outcome, 'done', r.reason);
      assert.equal(r.mode, 'scheduled');
      assert.doesNotMatch(r.reason, /NOSPACE recovery/);
    } finally {
      s.dispose();
    }
  });
});
