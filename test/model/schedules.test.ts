// Randomized fault schedules over the etcd model (issue 10): 3-5 daemons plus `once` runs; member
// freezes, kills and restarts, lost replies, slow and timed-out defragments, NOSPACE raised and
// cleared, leader changes, daemons killed, paused and restarted. Checked after every step: never two
// members defragmenting at once, never a Defragment sent to a member still defragmenting, the halt
// obeyed, no turn left held by nobody (Sim.step and EtcdModel.startDefrag). Once the faults stop,
// every member that needs it is defragmented and NOSPACE is gone (liveness). See scenario.ts.
//
// The schedules run in worker threads (one per core, at most 2), each with its own fast-check seed.
// A failure prints that seed and the counterexample path; replay exactly that schedule with:
//   MODEL_SEED=<seed> MODEL_PATH=<path> node --import tsx --test test/model/schedules.test.ts
// MODEL_RUNS=<n> sets the number of schedules (all workers together). MODEL_SURVEY=1 runs them all and
// counts the failures by kind, with a replay command for the first of each (MODEL_NOSHRINK=1 replays
// it as generated, unshrunk, so that it keeps its kind).
import assert from 'node:assert/strict';
import { availableParallelism } from 'node:os';
import { it } from 'node:test';
import { fileURLToPath } from 'node:url';
import { Worker } from 'node:worker_threads';
import { build } from 'esbuild';

const RUNS = Number(process.env.MODEL_RUNS ?? 2000);

interface Report {
  count: number;
  seed: number;
  failed: boolean;
  path?: string;
  report: string;
  coverage: Record<string, number>;
  kinds: Record<string, { count: number; path: string; example: string }>;
}

/**
 * The worker, the model and the daemon's code in one plain JavaScript file: tsx keeps function
 * names with a call around every closure it compiles, which cost a quarter of the time here.
 * Written under node_modules/.cache so the packages resolve as they do for the sources.
 */
async function bundle(): Promise<string> {
  const out = fileURLToPath(new URL('../../node_modules/.cache/etcd-defragd/model-worker.mjs', import.meta.url));
  await build({
    entryPoints: [fileURLToPath(new URL('./schedules.worker.ts', import.meta.url))],
    outfile: out,
    bundle: true,
    packages: 'external',
    platform: 'node',
    format: 'esm',
    target: 'node20',
    logLevel: 'warning',
  });
  return out;
}

function worker(file: string, seed: number, runs: number, path?: string): Promise<Report> {
  return new Promise((resolve, reject) => {
    const w = new Worker(file, { workerData: { seed, runs, path } });
    w.once('message', (m: Report) => resolve(m));
    w.once('error', reject);
    w.once('exit', (code) => code !== 0 && reject(new Error(`model worker exited with ${code}`)));
  });
}

it(`${RUNS} random fault schedules keep the turn safe and every member defragmented`, { timeout: 900_000 }, async (t) => {
  const started = Date.now();
  const cpu0 = process.cpuUsage(); // the whole process: both workers and this thread
  const replay = process.env.MODEL_SEED;
  const seeds = replay
    ? [Number(replay)]
    : Array.from({ length: Math.min(2, availableParallelism()) }, (_, i) => (Date.now() + i * 7919) % 2 ** 31);
  const file = await bundle();
  const reports = await Promise.all(seeds.map((seed) => worker(file, seed, Math.ceil(RUNS / seeds.length), process.env.MODEL_PATH)));
  const count = reports.reduce((n, r) => n + r.count, 0);
  const cpu = process.cpuUsage(cpu0);
  const cpuMs = (cpu.user + cpu.system) / 1000;
  const cov: Record<string, number> = {};
  for (const r of reports) for (const [k, v] of Object.entries(r.coverage)) cov[k] = (cov[k] ?? 0) + v;
  const msg = `model: ${count} schedules, seeds ${seeds.join(', ')}, in ${((Date.now() - started) / 1000).toFixed(1)} s (${(cpuMs / Math.max(1, count)).toFixed(0)} ms CPU each); exercised: ${JSON.stringify(cov)}`;
  t.diagnostic(msg);
  console.log(msg);
  const kinds = new Map<string, { count: number; replay: string; example: string }>();
  for (const r of reports)
    for (const [kind, k] of Object.entries(r.kinds)) {
      const seen = kinds.get(kind);
      if (seen) seen.count += k.count;
      else kinds.set(kind, { count: k.count, example: k.example, replay: `MODEL_NOSHRINK=1 MODEL_SEED=${r.seed} MODEL_PATH=${k.path}` });
    }
  const failures = [...kinds].map(([kind, k]) => `${k.count} x ${kind}\n  first: ${k.example}\n  replay: ${k.replay}`);
  if (failures.length > 0) {
    console.log(`survey (MODEL_SURVEY): failures by kind and seed\n${failures.join('\n')}`);
    assert.fail(`${failures.length} kinds of failure (see the survey above)`);
  }
  for (const r of reports) {
    if (r.failed)
      assert.fail(`${r.report}\nreplay: MODEL_SEED=${r.seed} MODEL_PATH=${r.path} node --import tsx --test test/model/schedules.test.ts`);
  }
});
