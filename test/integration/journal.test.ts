// Under systemd, stdout and stderr are one stream socket to journald, and JOURNAL_STREAM names its
// device and inode. Here both go to one file and JOURNAL_STREAM names that file, exactly as systemd
// sets it up: every line must carry a `<N>` priority - config errors, usage errors, a normal start
// against a real cluster (nothing at warning or above) and a crash (its stack kept, one priority).
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { closeSync, fstatSync, mkdtempSync, openSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { startCluster, type Cluster } from '../harness/cluster.ts';
import { writeConfig } from '../harness/defragd.ts';
import { versionsUnderTest } from '../harness/etcd-bin.ts';
import { CLI_PATH, REPO_ROOT } from '../harness/proc.ts';

const dir = mkdtempSync(join(tmpdir(), 'edd-journal-'));

interface Journaled {
  pid: number;
  text(): string;
  lines(): string[];
  exited: Promise<number | null>;
  waitFor(re: RegExp, timeoutMs: number): Promise<void>;
}

/** Runs the CLI with stdout and stderr on one file named by JOURNAL_STREAM, as systemd does. */
function runJournaled(args: string[], name: string): Journaled {
  const file = join(dir, `${name}.log`);
  const fd = openSync(file, 'w');
  const st = fstatSync(fd);
  const env: NodeJS.ProcessEnv = { ...process.env, JOURNAL_STREAM: `${st.dev}:${st.ino}` };
  delete env.NODE_TEST_CONTEXT;
  const child = spawn(process.execPath, ['--import', import.meta.resolve('tsx'), CLI_PATH, ...args], {
    cwd: REPO_ROOT,
    env,
    stdio: ['ignore', fd, fd],
  });
  closeSync(fd);
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  const text = () => readFileSync(file, 'utf8');
  return {
    pid: child.pid!,
    text,
    lines: () =>
      text()
        .split('\n')
        .filter((l) => l !== ''),
    exited,
    async waitFor(re, timeoutMs) {
      const until = Date.now() + timeoutMs;
      let done = false;
      void exited.then(() => (done = true));
      while (!re.test(text())) {
        if (done || Date.now() > until) throw new Error(`no line matched ${re} (${done ? 'exited' : 'timeout'}):\n${text()}`);
        await new Promise((r) => setTimeout(r, 100));
      }
    },
  };
}

function assertEveryLinePrioritized(lines: string[], text: string): void {
  assert.ok(lines.length > 0, 'wrote something');
  for (const l of lines) assert.match(l, /^<[0-7]>/, `line without a priority:\n${l}\n--- all output:\n${text}`);
}

describe('journald priorities (stdout and stderr on the journal stream)', () => {
  it('a config error: exit 78, one line at <3> naming key, file and what is accepted', async () => {
    const cfg = join(dir, 'bad.yaml');
    writeFileSync(cfg, 'schedule:\n  cron: "every three hours"\n');
    const p = runJournaled(['run', '--config', cfg], 'config-error');
    assert.equal(await p.exited, 78);
    assertEveryLinePrioritized(p.lines(), p.text());
    assert.equal(p.lines().length, 1, p.text());
    assert.match(
      p.lines()[0]!,
      /^<3>etcd-defragd: config error: schedule\.cron: "every three hours" is not a cron expression .* in .*bad\.yaml; accepted: /,
    );
  });

  it('a usage error: exit 64, at <3>', async () => {
    const p = runJournaled(['run', '--no-such-flag'], 'usage-error');
    assert.equal(await p.exited, 64);
    assertEveryLinePrioritized(p.lines(), p.text());
    assert.match(p.text(), /^<3>etcd-defragd: .*--no-such-flag/);
  });

  it('machine output on the journal stream is stored at info', async () => {
    const cfg = join(dir, 'ok.yaml');
    writeFileSync(cfg, 'etcd:\n  endpoint: http://127.0.0.1:2379\n  dataDir: ""\n');
    const p = runJournaled(['check-config', '--config', cfg], 'check-config');
    assert.equal(await p.exited, 0);
    assertEveryLinePrioritized(p.lines(), p.text());
    assert.ok(
      p.lines().every((l) => l.startsWith('<6>')),
      p.text(),
    );
  });

  for (const version of versionsUnderTest()) {
    describe(`daemon on etcd ${version}`, () => {
      let cluster: Cluster;
      before(async () => {
        cluster = await startCluster({ version, tls: true });
      });
      after(async () => {
        await cluster?.stop();
      });

      it('a normal start writes nothing at warning or above; a crash keeps its stack at <2> and exits 1', async () => {
        const m = cluster.members[0]!;
        const cfg = writeConfig(
          cluster,
          m,
          { schedule: { cron: '0 0 1 1 *', runOnStart: true }, metrics: { listen: '127.0.0.1:0' }, log: { format: 'auto', level: 'info' } },
          'journal.yaml',
        );
        const p = runJournaled(['run', '--config', cfg], `daemon-${version}`);
        try {
          await p.waitFor(/^<6>run finished/m, 60_000);
          await p.waitFor(/^<6>joined the cluster-wide turn/m, 30_000);
          const start = p.lines();
          assertEveryLinePrioritized(start, p.text());
          // Known etcd bugs of the member's version are warned about at every start, on purpose
          // (README, etcd versions): Debian bookworm's 3.4.23 has two; 3.5.30 has none.
          const notes = start.filter((l) => /event=etcd\.version/.test(l));
          assert.equal(notes.length, version === '3.4' ? 2 : 0, notes.join('\n'));
          const loud = start.filter((l) => Number(l.slice(1, 2)) <= 4 && !notes.includes(l));
          assert.deepEqual(loud, [], 'a normal start logs nothing else at warning or above');

          // The documented crash trigger: an uncaught exception, the path any bug would take.
          process.kill(p.pid, 'SIGQUIT');
          assert.equal(await p.exited, 1);
          const all = p.lines();
          assertEveryLinePrioritized(all, p.text());
          const crash = all.slice(start.length);
          assert.match(crash[0]!, /^<2>unexpected error: SIGQUIT received/);
          assert.ok(
            crash.some((l) => /^<2>Error: SIGQUIT received/.test(l)),
            p.text(),
          );
          assert.ok(
            crash.some((l) => /^<2> {4}at .*cli\.ts:\d+/.test(l)),
            `the stack trace is kept:\n${p.text()}`,
          );
          for (const l of crash) assert.match(l, /^<2>/, 'every line of the crash at one priority');
        } finally {
          try {
            process.kill(p.pid, 'SIGKILL');
          } catch {
            /* exited */
          }
        }
      });
    });
  }
});
