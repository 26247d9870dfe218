// A fake clock for the model tests: one timeline of timers in simulated milliseconds, shared by the
// model of etcd and every simulated process. Each process (a daemon, a `once`) gets its own view of
// it (an Owner): killing the owner drops its timers and any reply still on its way to it (SIGKILL),
// pausing it holds them until it resumes (SIGSTOP / a long GC pause).
import type { Clock, Timer } from '../../src/clock.ts';

interface Entry {
  at: number;
  seq: number;
  fn: () => void;
  owner: Owner | undefined;
  cancelled: boolean;
}

export class Owner {
  alive = true;
  paused = false;
  private held: (() => void)[] = [];
  constructor(
    readonly name: string,
    private readonly sim: FakeClock,
  ) {}

  /** Runs `fn` for this process now, later (paused), or never (dead). */
  deliver(fn: () => void): void {
    if (!this.alive) return;
    if (this.paused) this.held.push(fn);
    else fn();
  }

  kill(): void {
    this.alive = false;
    this.held = [];
  }

  pause(): void {
    this.paused = true;
  }

  resume(): void {
    this.paused = false;
    const held = this.held;
    this.held = [];
    for (const fn of held) this.sim.at(this.sim.now(), fn, this);
  }

  /** The Clock this process sees. */
  clock(): Clock {
    const sim = this.sim;
    return {
      now: () => sim.now(),
      sleep: (ms, signal) =>
        new Promise<void>((resolve) => {
          if (signal?.aborted) return resolve();
          const e = sim.at(
            sim.now() + Math.max(0, ms),
            () => {
              signal?.removeEventListener('abort', onAbort);
              resolve();
            },
            this,
          );
          const onAbort = () => {
            e.cancel();
            this.deliver(resolve);
          };
          signal?.addEventListener('abort', onAbort, { once: true });
        }),
      every: (ms, fn) => {
        let current: Timer | undefined;
        let stopped = false;
        const arm = () => {
          current = sim.at(
            sim.now() + ms,
            () => {
              if (stopped) return;
              arm();
              fn();
            },
            this,
          );
        };
        arm();
        return {
          cancel: () => {
            stopped = true;
            current?.cancel();
          },
        };
      },
    };
  }
}

/** A binary heap of timers ordered by time, then by creation (so equal times run in order). */
export class FakeClock {
  private t: number;
  private seq = 0;
  private heap: Entry[] = [];
  /** Timers fired so far (how much work a schedule was). */
  fired = 0;
  /** Called after every timer that fired (the invariant checks). */
  onStep: (() => void) | undefined;

  constructor(start = Date.UTC(2026, 0, 1)) {
    this.t = start;
  }

  now(): number {
    return this.t;
  }

  owner(name: string): Owner {
    return new Owner(name, this);
  }

  /** Schedules `fn` at `at` (for `owner`, if given: held while it is paused, dropped once it is dead). */
  at(at: number, fn: () => void, owner?: Owner): Timer {
    const e: Entry = { at: Math.max(at, this.t), seq: this.seq++, fn, owner, cancelled: false };
    this.push(e);
    return {
      cancel: () => {
        e.cancelled = true;
      },
    };
  }

  /** Runs every timer due up to `until`, letting promise chains settle between timers. */
  async runUntil(until: number): Promise<void> {
    for (;;) {
      await settle();
      const e = this.heap[0];
      if (!e || e.at > until) break;
      this.pop();
      if (e.cancelled) continue;
      this.t = e.at;
      this.fired++;
      if (e.owner) e.owner.deliver(e.fn);
      else e.fn();
      this.onStep?.();
    }
    this.t = Math.max(this.t, until);
    await settle();
  }

  runFor(ms: number): Promise<void> {
    return this.runUntil(this.t + ms);
  }

  pending(): number {
    return this.heap.length;
  }

  private push(e: Entry): void {
    const h = this.heap;
    h.push(e);
    let i = h.length - 1;
    while (i > 0) {
      const p = (i - 1) >> 1;
      if (!before(h[i]!, h[p]!)) break;
      [h[i], h[p]] = [h[p]!, h[i]!];
      i = p;
    }
  }

  private pop(): void {
    const h = this.heap;
    const last = h.pop()!;
    if (h.length === 0) return;
    h[0] = last;
    let i = 0;
    for (;;) {
      const l = 2 * i + 1;
      const r = l + 1;
      let m = i;
      if (l < h.length && before(h[l]!, h[m]!)) m = l;
      if (r < h.length && before(h[r]!, h[m]!)) m = r;
      if (m === i) break;
      [h[i], h[m]] = [h[m]!, h[i]!];
      i = m;
    }
  }
}

const before = (a: Entry, b: Entry) => a.at < b.at || (a.at === b.at && a.seq < b.seq);

/** Lets every pending promise continuation run (microtasks drain before the next macrotask). */
function settle(): Promise<void> {
  return new Promise((resolve) => setImmediate(resolve));
}
