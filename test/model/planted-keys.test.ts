// Someone allowed to write under coordination.prefix plants a participant that names a lease not
// its own (an API server's event lease, say). The daemons must neither keep that lease alive nor
// revoke it (which would delete keys the writer could not touch), during NOSPACE or not.
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import type { IRequestOp } from 'etcd3';
import { hexId } from '../../src/view.ts';
import { Sim } from './sim.ts';

const TTL = 3000;

describe('a participant planted under the prefix, naming a lease that is not its own', () => {
  it('is never renewed nor revoked, and does not block the turn or the NOSPACE order', async () => {
    const s = new Sim({ leaseTTL: TTL, requestTimeout: 1000, defragTimeout: 20_000, seed: 201 });
    try {
      const victimTtl = 120; // seconds: the foreign lease must live exactly that long
      const victim = s.model.grant(victimTtl, 'kube-apiserver');
      const bornAt = s.clock.now();
      s.model.applyTxn([], [{ request_put: { key: Buffer.from('/registry/events/default/e1'), value: Buffer.from('x'), lease: victim } }]);
      // The planted participant: keys named after the victim's lease, attached to no lease; holding, and a spare.
      const base = `${s.base.coordination.prefix}p/${hexId(victim)}/`;
      const ops: IRequestOp[] = [
        { request_put: { key: Buffer.from(`${base}info`), value: Buffer.from('{"spare":true,"since":"9999"}') } },
        { request_put: { key: Buffer.from(`${base}spare`), value: Buffer.alloc(0) } },
        { request_put: { key: Buffer.from(`${base}t/000000000001`), value: Buffer.alloc(0) } },
        { request_put: { key: Buffer.from(`${base}t/000000000002`), value: Buffer.alloc(0) } },
      ];
      s.model.applyTxn([], ops);
      // Every keep-alive and revoke that reaches etcd for the victim's lease (elections extend it too, as in etcd).
      const touched: string[] = [];
      const keepAlive = s.model.keepAlive.bind(s.model);
      const revoke = s.model.revokeLease.bind(s.model);
      s.model.keepAlive = (id: string) => (id === victim && touched.push('keep-alive'), keepAlive(id));
      s.model.revokeLease = (id: string) => (id === victim && touched.push('revoke'), revoke(id));
      for (const m of ['m1', 'm2', 'm3']) s.startDaemon(m);
      await s.run(5000);
      s.model.fragment('m2', 500 * 1024 * 1024);
      for (const m of s.model.members) s.model.fillToQuota(m.name);
      assert.ok(
        await s.until(() => !s.model.alarms.some((a) => a.alarm === 'NOSPACE'), 10 * 60_000),
        'NOSPACE recovered despite the planted holder',
      );
      const recoveredAt = s.clock.now();
      assert.ok(recoveredAt - bornAt < victimTtl * 1000, 'recovered while the foreign lease still lived');
      assert.ok(s.model.leaseAlive(victim), 'not revoked');
      await s.run(victimTtl * 1000);
      assert.deepEqual(touched, [], 'no keep-alive and no revoke of the foreign lease was sent');
      assert.deepEqual(s.model.violations, []);
    } finally {
      s.dispose();
    }
  });
});

describe('the turn reads a bounded number of keys', () => {
  it('refuses a prefix flooded with keys instead of reading them all, and the NOSPACE order waits', async () => {
    const s = new Sim({ leaseTTL: TTL, requestTimeout: 1000, defragTimeout: 20_000, seed: 202 });
    try {
      const base = `${s.base.coordination.prefix}p/`;
      const ops: IRequestOp[] = [];
      for (let i = 0; i < 10_001; i++) ops.push({ request_put: { key: Buffer.from(`${base}junk/${i}`), value: Buffer.alloc(0) } });
      s.model.applyTxn([], ops);
      const { turn } = s.newTurn('m1');
      await assert.rejects(s.drive(turn.heldByOther()), /more than 10000 keys under .*p\/: not the turn's own keys/);
      for (const m of s.model.members) s.model.fillToQuota(m.name);
      s.startDaemon('m1');
      await s.run(60_000);
      assert.deepEqual(s.model.defragLog, [], 'nothing defragmented while the turn cannot be read');
      assert.deepEqual(s.model.violations, []);
    } finally {
      s.dispose();
    }
  });
});
