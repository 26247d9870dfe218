// Runs a share of the random schedules in a worker thread: both cores work, and the node:test
// harness's async-hook bookkeeping (which makes every promise costly) stays out of the hot loop.
import { parentPort, workerData } from 'node:worker_threads';
import fc from 'fast-check';
import { checkScenario, coverage, scenario } from './scenario.ts';

const { seed, runs, path } = workerData as { seed: number; runs: number; path?: string };
let count = 0;
const cpu0 = process.cpuUsage();
const result = await fc.check(fc.asyncProperty(scenario, async (s) => {
  count++;
  await checkScenario(s);
}), { numRuns: path ? 1 : runs, seed, path, endOnFailure: false });
const cpu = process.cpuUsage(cpu0);
parentPort!.postMessage({
  count, seed, cpuMs: Math.round((cpu.user + cpu.system) / 1000), coverage, failed: result.failed, path: result.counterexamplePath,
  report: result.failed ? `${fc.defaultReportMessage(result)}\n${result.errorInstance instanceof Error ? result.errorInstance.message : String(result.errorInstance)}` : '',
});
