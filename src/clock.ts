// Time as the core sees it: now, sleeps and timers. The daemon gets the real one; the model tests
// (test/model/) give a fake one, so deadlines, lease expiry and schedules run in simulated time.
import { setTimeout as delay } from 'node:timers/promises';

export interface Timer {
  cancel(): void;
}

export interface Clock {
  now(): number;
  /** Resolves after `ms`, or at once when `signal` aborts (a stop cuts a wait short; it is not an error). */
  sleep(ms: number, signal?: AbortSignal): Promise<void>;
  /** A repeating timer that does not keep the process alive. */
  every(ms: number, fn: () => void): Timer;
}

export const realClock: Clock = {
  now: () => Date.now(),
  sleep: (ms, signal) =>
    delay(ms, undefined, { signal }).catch((err: unknown) => {
      if (!signal?.aborted) throw err;
    }),
  every: (ms, fn) => {
    const t = setInterval(fn, ms);
    t.unref();
    return { cancel: () => clearInterval(t) };
  },
};
