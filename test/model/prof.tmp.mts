import { runScenario } from './scenario.ts';
const t0 = Date.now();
for (let i = 0; i < 3; i++) {
  const r = await runScenario({ members: 5, leader: 'transfer', seed: i + 1, steps: [{ t: 'wait', ms: 10000 }, { t: 'freeze', m: 1 }, { t: 'wait', ms: 10000 }, { t: 'kill', m: 2 }] });
  console.log(r.violations, r.needing, Date.now() - t0, r.sim.model.keys().length, r.sim.clock.fired, r.sim.model.stats);
}
