// Runs a share of the random schedules in a worker thread: both cores work, and the node:test
// harness's async-hook bookkeeping (which makes every promise costly) stays out of the hot loop.
import { parentPort, workerData } from 'node:worker_threads';
import fc from 'fast-check';
import { checkScenario, coverage, scenario } from './scenario.ts';

const { seed, runs, path } = workerData as { seed: number; runs: number; path?: string };
// Errors are many (timeouts, refusals) and only their messages are read: capturing stacks was a
// tenth of the time. A replay (MODEL_PATH) keeps them.
if (!path) Error.stackTraceLimit = 0;
// MODEL_SURVEY=1: run every schedule instead of stopping at the first failure, and count the
// failures by kind (the message without its figures), each with the path that replays its first one.
const survey = !path && Boolean(process.env.MODEL_SURVEY);
const kinds: Record<string, { count: number; path: string; example: string }> = {};
let count = 0;
const result = await fc.check(
  fc.asyncProperty(scenario, async (s) => {
    const index = count++;
    if (!survey) return checkScenario(s);
    try {
      await checkScenario(s);
    } catch (err) {
      const msg = err instanceof Error ? err.message : String(err);
      const kind = kindOf(msg);
      const k = (kinds[kind] ??= { count: 0, path: String(index), example: msg });
      k.count++;
    }
  }),
  // MODEL_NOSHRINK=1: report the failing schedule as generated (a survey's replay keeps its kind).
  { numRuns: path ? 1 : runs, seed, path, endOnFailure: Boolean(process.env.MODEL_NOSHRINK) },
);

/** A failure's kind: its message up to the details, with times, sizes, names and leases taken out. */
function kindOf(msg: string): string {
  return msg
    .replace(/\s*\(.*$/s, '')
    .replace(/\d{4}-\d\d-\d\dT[\d:.]+Z /g, '')
    .replace(/\b[0-9a-f]{10,}\b/g, 'L')
    .replace(/\bm\d\b/g, 'mN')
    .replace(/\d+/g, 'N')
    .slice(0, 160);
}
parentPort!.postMessage({
  count,
  seed,
  coverage,
  kinds,
  failed: result.failed,
  path: result.counterexamplePath,
  report: result.failed
    ? `${fc.defaultReportMessage(result)}\n${result.errorInstance instanceof Error ? result.errorInstance.message : String(result.errorInstance)}`
    : '',
});
