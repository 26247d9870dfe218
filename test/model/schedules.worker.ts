// Runs a share of the random schedules in a worker thread: both cores work, and the node:test
// harness's async-hook bookkeeping (which makes every promise costly) stays out of the hot loop.
import { parentPort, workerData } from 'node:worker_threads';
import fc from 'fast-check';
import { checkScenario, coverage, scenario } from './scenario.ts';

const { seed, runs, path } = workerData as { seed: number; runs: number; path?: string };
// Errors are many (timeouts, refusals) and only their messages are read: capturing stacks was a
// tenth of the time. A replay (MODEL_PATH) keeps them.
if (!path) Error.stackTraceLimit = 0;
let count = 0;
const result = await fc.check(
  fc.asyncProperty(scenario, async (s) => {
    count++;
    await checkScenario(s);
  }),
  { numRuns: path ? 1 : runs, seed, path, endOnFailure: false },
);
parentPort!.postMessage({
  count,
  seed,
  coverage,
  failed: result.failed,
  path: result.counterexamplePath,
  report: result.failed
    ? `${fc.defaultReportMessage(result)}\n${result.errorInstance instanceof Error ? result.errorInstance.message : String(result.errorInstance)}`
    : '',
});
