// Issue 15's "done when" for the model, as directed schedules: NOSPACE is recovered by daemons that
// started only after the alarm, by daemons all stopped during it for longer than the lease TTL, and
// through renewed certificates and SIGHUPs during it. Each ends with writes working again, no alarm,
// every member defragmented and no violation of the turn.
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { Sim, type Proc } from './sim.ts';

const TTL = 3000;
const MiB = 1024 * 1024;

function sim(seed: number): Sim {
  return new Sim({ seed, leaseTTL: TTL, requestTimeout: 1000, defragTimeout: 20_000, cronEvery: 10_000 });
}

/** NOSPACE recovered: no alarm, a write through a client works, nothing left to defragment, no violation. */
async function assertRecovered(s: Sim): Promise<void> {
  const recovered = await s.until(() => s.model.alarms.length === 0 && s.needing().length === 0, 5 * 60_000, 500);
  const state = s.model.members.map((m) => `${m.name} ${Math.round(m.dbSize / MiB)}/${Math.round(m.dbSizeInUse / MiB)} MiB`).join(', ');
  assert.ok(
    recovered,
    `NOSPACE recovered (alarms ${JSON.stringify(s.model.alarms)}; ${state}; defrags ${JSON.stringify(s.model.defragLog)})`,
  );
  const client = s.model.pool(s.clock.owner('check')).get(s.model.members[0]!.endpoint);
  await s.drive(client.put('/check', 'written'));
  assert.equal(s.model.getValue('/check'), 'written');
  assert.deepEqual(s.model.violations, []);
}

describe('issue 15: NOSPACE recovered whoever was running before it', () => {
  for (const history of [false, true]) {
    it(`daemons started only after the alarm recover it (quota filled by ${history ? 'history' : 'fragmentation'})`, async () => {
      const s = sim(history ? 151 : 152);
      try {
        if (history) assert.ok(s.model.churn(s.model.opts.quotaBytes));
        else s.model.fillToQuota('m2');
        assert.ok(s.model.alarms.some((a) => a.alarm === 'NOSPACE'));
        for (const m of s.model.members) s.startDaemon(m.name);
        await assertRecovered(s);
      } finally {
        s.dispose();
      }
    });
  }

  it('all daemons stopped during the alarm and started again after more than the lease TTL recover it', async () => {
    const s = sim(153);
    try {
      const daemons = s.model.members.map((m) => s.startDaemon(m.name));
      await s.run(3000); // joined while writes work
      s.model.fillToQuota('m1');
      s.model.fillToQuota('m3');
      for (const d of daemons) s.stopDaemon(d);
      await s.run(5 * TTL); // every lease, spares included, has expired
      for (const m of s.model.members) s.startDaemon(m.name);
      await assertRecovered(s);
    } finally {
      s.dispose();
    }
  });

  it('renewed certificates and SIGHUPs during the alarm, again and again, still let the daemons recover it', async () => {
    const s = sim(154);
    try {
      const daemons: Proc[] = s.model.members.map((m) => s.startDaemon(m.name));
      await s.run(3000);
      // A slow defragment keeps the alarm up while the daemons reconnect.
      for (const m of s.model.members) m.defragMs = 8000;
      s.model.fillToQuota('m1');
      s.model.fillToQuota('m2');
      s.model.fillToQuota('m3');
      for (let round = 0; round < 4; round++) {
        for (const d of daemons) {
          s.changeTls(d);
          d.daemon!.reload();
        }
        await s.run(2000);
      }
      await assertRecovered(s);
    } finally {
      s.dispose();
    }
  });
});
