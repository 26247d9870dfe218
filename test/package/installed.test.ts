// Issue 9 acceptance: the packaged executable runs with no node on PATH and no node_modules, against
// a real TLS cluster: `status` answers, `once` defragments its member and no other.
//   ETCD_DEFRAGD_EXE=/usr/bin/etcd-defragd node --import tsx --test test/package/installed.test.ts
// (.ci/check-package.sh runs it against the installed .deb; default: dist/pkg/etcd-defragd).
import assert from 'node:assert/strict';
import { execFile, spawn } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { promisify } from 'node:util';
import { startCluster, type Cluster } from '../harness/cluster.ts';
import { allDefragEvents } from '../harness/defrag-log.ts';
import { fill, memberStatus } from '../harness/data.ts';
import { events, writeConfig } from '../harness/defragd.ts';
import { versionsUnderTest } from '../harness/etcd-bin.ts';
import { REPO_ROOT } from '../harness/proc.ts';

const execFileP = promisify(execFile);
const exe = process.env.ETCD_DEFRAGD_EXE ?? join(REPO_ROOT, 'dist', 'pkg', 'etcd-defragd');
const version = versionsUnderTest().at(-1)!;
const MiB = 1024 * 1024;

/** Runs the executable as a service would: absolute path, PATH without node, an empty cwd and HOME. */
async function run(args: string[], cwd: string): Promise<{ code: number; stdout: string; stderr: string }> {
  try {
    const r = await execFileP(exe, args, { cwd, env: { PATH: '/nonexistent', HOME: cwd, LANG: 'C.UTF-8' }, timeout: 120_000 });
    return { code: 0, stdout: r.stdout, stderr: r.stderr };
  } catch (err) {
    const e = err as { code?: number | string; stdout?: string; stderr?: string };
    if (typeof e.code !== 'number') throw err;
    return { code: e.code, stdout: e.stdout ?? '', stderr: e.stderr ?? '' };
  }
}

describe(`the packaged executable ${exe} (etcd ${version})`, () => {
  let cluster: Cluster;
  let cwd: string;
  before(async () => {
    assert.ok(existsSync(exe), `${exe} not found: npm run package (or install the .deb)`);
    cwd = mkdtempSync(join(tmpdir(), 'edd-exe-'));
    cluster = await startCluster({ version, tls: true });
    await fill(cluster, { inUseBytes: 16 * MiB, reclaimableBytes: 24 * MiB });
  });
  after(async () => {
    await cluster?.stop();
    if (cwd) rmSync(cwd, { recursive: true, force: true });
  });

  it('is a Node.js single executable, not a script for a node on the PATH', async () => {
    const head = readFileSync(exe).subarray(0, 4);
    assert.deepEqual([...head], [0x7f, 0x45, 0x4c, 0x46], 'an ELF binary');
    const r = await run(['--version'], cwd);
    assert.equal(r.code, 0, r.stderr);
    const node = readFileSync(join(REPO_ROOT, '.node-version'), 'utf8').trim().replaceAll('.', '\\.');
    assert.match(r.stdout, new RegExp(`^etcd-defragd \\d+\\.\\d+\\.\\d+ \\(commit [0-9a-f]{7,}(-dirty)?, Node\\.js v${node}\\)\\n$`));
    assert.equal(r.stderr, '');
  });

  it('status answers for every member', async () => {
    const cfg = writeConfig(cluster, cluster.members[0]!);
    const r = await run(['status', '--json', '--config', cfg], cwd);
    assert.equal(r.code, 0, r.stdout + r.stderr);
    const s = JSON.parse(r.stdout) as { members: { name: string; local: boolean; status: unknown }[]; health: unknown };
    assert.deepEqual(s.members.map((m) => m.name).sort(), cluster.members.map((m) => m.name).sort());
    assert.ok(
      s.members.every((m) => m.status),
      'every member answered Status',
    );
    assert.equal(s.members.find((m) => m.local)?.name, cluster.members[0]!.name);
    assert.equal(s.health, null);
  });

  it('a normal start of the daemon writes nothing at warning priority or above (journal format)', async () => {
    const cfg = writeConfig(cluster, cluster.members[1]!, { schedule: { cron: '0 0 1 1 *' }, log: { format: 'journal', level: 'info' } });
    // As under systemd: JOURNAL_STREAM set, the unit's NODE_ENV, nothing else.
    const child = spawn(exe, ['run', '--config', cfg], {
      cwd,
      env: { PATH: '/nonexistent', NODE_ENV: 'production', JOURNAL_STREAM: '8:1' },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let out = '';
    let err = '';
    child.stdout.on('data', (d: Buffer) => (out += d.toString()));
    child.stderr.on('data', (d: Buffer) => (err += d.toString()));
    const exited = new Promise<number | null>((res) => child.once('exit', (code) => res(code)));
    try {
      const t0 = Date.now();
      // Logs go to stderr (journald parses the <N> prefix on both streams); stdout is for machine output.
      while (!/event=turn\.register\b/.test(err) && Date.now() - t0 < 30_000 && child.exitCode === null)
        await new Promise((r) => setTimeout(r, 200));
      assert.match(err, /event=turn\.register\b/, `joined the turn:\n${out}${err}`);
    } finally {
      child.kill('SIGTERM');
    }
    assert.equal(await exited, 0, out + err);
    assert.equal(out, '', 'nothing on stdout: the daemon has no machine output');
    const lines = err.split('\n').filter(Boolean);
    assert.ok(lines.length >= 3, err);
    // <6> info, <7> debug; <4> warning and below (more severe) must not appear in a normal start.
    assert.deepEqual(
      lines.filter((l) => !/^<[67]>/.test(l)),
      [],
      'every line is info or debug',
    );
  });

  it('once defragments its member and no other', async () => {
    const target = cluster.members[0]!;
    const before = await memberStatus(cluster, target);
    const r = await run(['once', '--config', writeConfig(cluster, target)], cwd);
    assert.equal(r.code, 0, r.stdout + r.stderr);
    const done = events(r.stderr, 'defrag.done');
    assert.equal(done.length, 1, r.stderr);
    assert.equal(done[0]!.member, target.id);
    assert.ok((done[0]!.afterBytes as number) < before.dbSize - 8 * MiB, `after ${done[0]!.afterBytes} before ${before.dbSize}`);
    assert.deepEqual(
      (await allDefragEvents(cluster)).map((e) => e.member),
      [target.name],
    );
    assert.equal(events(r.stderr, 'verify.ok').length, 1, 'HashKV compared after the defragment');
    assert.deepEqual(
      events(r.stderr).filter((l) => l.level >= 40),
      [],
      'nothing at warning or above',
    );
  });
});
