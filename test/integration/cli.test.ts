// The command line as a user meets it: config errors exit 78 with one line, bad usage 64.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { chmodSync, mkdirSync, mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createServer, type AddressInfo } from 'node:net';
import { describe, it } from 'node:test';
import { runCli } from '../harness/proc.ts';

const dir = mkdtempSync(join(tmpdir(), 'edd-cli-'));
const cfg = (name: string, text: string) => {
  const p = join(dir, `${name}.yaml`);
  writeFileSync(p, text);
  return p;
};

describe('command line', () => {
  const cases: [string, string, RegExp][] = [
    ['unknown key', 'etcd:\n  endpoint: http://127.0.0.1:2379\n  endpiont: x\n', /etcd\.endpiont: unknown key/],
    [
      'malformed cron',
      'etcd:\n  endpoint: http://127.0.0.1:2379\nschedule:\n  cron: "0 */3 * *"\n',
      /schedule\.cron: "0 \*\/3 \* \*" is not a cron expression/,
    ],
    ['negative duration', 'etcd:\n  endpoint: http://127.0.0.1:2379\n  defragTimeout: -1m\n', /etcd\.defragTimeout: "-1m" is negative/],
    ['unreadable certificate', 'etcd:\n  certFile: /nonexistent/c.crt\n', /etcd\.(caFile|certFile): ".*" does not exist/],
    ['endpoint not a URL', 'etcd:\n  endpoint: localhost\n', /etcd\.endpoint: "localhost" is not a URL/],
    [
      'ratio above 1',
      'etcd:\n  endpoint: http://127.0.0.1:2379\npolicy:\n  quotaUsageTrigger: 2\n',
      /policy\.quotaUsageTrigger: 2 is above 1/,
    ],
    [
      'size with unknown unit',
      'etcd:\n  endpoint: http://127.0.0.1:2379\npolicy:\n  quotaBytes: 2GB2\n',
      /policy\.quotaBytes: "2GB2" is not a size/,
    ],
  ];
  for (const [name, text, re] of cases) {
    it(`check-config: ${name} exits 78 with one line and no stack trace`, async () => {
      const path = cfg(name.replace(/\W+/g, '-'), text);
      const r = await runCli(['check-config', '--config', path]);
      assert.equal(r.code, 78, r.stdout + r.stderr);
      const lines = r.stderr.trim().split('\n');
      assert.equal(lines.length, 1, r.stderr);
      assert.match(lines[0]!, re);
      assert.match(lines[0]!, /accepted: /);
      assert.doesNotMatch(r.stderr, /\n\s+at /);
    });
  }

  it('check-config: a bad value from the environment or a flag exits 78 naming the variable or the flag', async () => {
    const path = cfg('env-flag', 'etcd:\n  endpoint: http://127.0.0.1:2379\n');
    const fromEnv = await runCli(['check-config', '--config', path], { env: { ETCD_DEFRAGD_RETRY_ATTEMPTS: 'many' } });
    assert.equal(fromEnv.code, 78, fromEnv.stdout + fromEnv.stderr);
    assert.match(
      fromEnv.stderr.trim(),
      /^etcd-defragd: config error: retry\.attempts: "many" is not a whole number from environment variable ETCD_DEFRAGD_RETRY_ATTEMPTS; accepted: a whole number from 1 to 100$/,
    );
    const fromFlag = await runCli(['check-config', '--config', path, '--set', 'coordination.leaseTTL=1s']);
    assert.equal(fromFlag.code, 78, fromFlag.stdout + fromFlag.stderr);
    assert.match(
      fromFlag.stderr.trim(),
      /^etcd-defragd: config error: coordination\.leaseTTL: "1s" is below the minimum of 2000ms from flag --set coordination\.leaseTTL=\.\.\.; accepted: /,
    );
    for (const r of [fromEnv, fromFlag]) assert.doesNotMatch(r.stderr, /\n\s+at /);
  });

  it('check-config prints the effective config and where each value came from', async () => {
    const r = await runCli(
      [
        'check-config',
        '--config',
        cfg('ok', 'etcd:\n  endpoint: http://127.0.0.1:2379\n  dataDir: ""\n'),
        '--set',
        'coordination.maxWait=5m',
      ],
      { env: { ETCD_DEFRAGD_SCHEDULE_CRON: '15 */2 * * *' } },
    );
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /endpoint: "http:\/\/127\.0\.0\.1:2379" {2}# file/);
    assert.match(r.stdout, /cron: "15 \*\/2 \* \* \*" {2}# env ETCD_DEFRAGD_SCHEDULE_CRON/);
    assert.match(r.stdout, /maxWait: 300000 {2}# flag --set coordination.maxWait=\.\.\./);
  });

  it('check-config names etcd.dataDir when it holds no etcd member, and accepts one that does', async () => {
    const empty = mkdtempSync(join(tmpdir(), 'edd-datadir-'));
    const bad = await runCli([
      'check-config',
      '--config',
      cfg('dd-bad', `etcd:\n  endpoint: http://127.0.0.1:2379\n  dataDir: ${empty}\n`),
    ]);
    assert.equal(bad.code, 78, bad.stdout + bad.stderr);
    assert.match(
      bad.stderr.trim(),
      new RegExp(
        `^etcd-defragd: config error: etcd\\.dataDir: "${empty}" holds no etcd member \\(no ${empty}/member/snap\\) in .*; accepted: `,
      ),
    );
    assert.doesNotMatch(bad.stderr, /\n\s+at /);
    mkdirSync(join(empty, 'member', 'snap'), { recursive: true });
    const good = await runCli([
      'check-config',
      '--config',
      cfg('dd-good', `etcd:\n  endpoint: http://127.0.0.1:2379\n  dataDir: ${empty}\n`),
    ]);
    assert.equal(good.code, 0, good.stderr);
  });

  it("init-config --layout writes a config that loads, with the layout's TLS paths and data dir", async () => {
    const want = {
      kubeadm: ['/etc/kubernetes/pki/etcd/healthcheck-client.key', '/var/lib/etcd'],
      rke2: ['/var/lib/rancher/rke2/server/tls/etcd/client.key', '/var/lib/rancher/rke2/server/db/etcd'],
      k3s: ['/var/lib/rancher/k3s/server/tls/etcd/client.key', '/var/lib/rancher/k3s/server/db/etcd'],
      kubespray: ['/etc/ssl/etcd/ssl/admin-', '/var/lib/etcd'],
    };
    for (const [layout, [key, dataDir]] of Object.entries(want)) {
      const r = await runCli(['init-config', '--layout', layout]);
      assert.equal(r.code, 0, r.stderr);
      assert.ok(r.stdout.includes(`keyFile: ${key}`), r.stdout);
      assert.ok(r.stdout.includes(`dataDir: ${dataDir}\n`), r.stdout);
      const loaded = await runCli([
        'check-config',
        '--config',
        cfg(`layout-${layout}`, r.stdout),
        '--set',
        'etcd.dataDir=',
        '--endpoint',
        'http://127.0.0.1:2379',
      ]);
      assert.equal(loaded.code, 0, loaded.stderr);
    }
    const bad = await runCli(['init-config', '--layout', 'openshift']);
    assert.equal(bad.code, 64);
    assert.match(bad.stderr, /"openshift" is not a layout; accepted: kubeadm, rke2, k3s, kubespray/);
  });

  it('bad usage exits 64', async () => {
    assert.equal((await runCli(['frobnicate'])).code, 64);
    assert.equal((await runCli(['status', '--dry-run'])).code, 64);
    assert.equal((await runCli(['--no-such-flag'])).code, 64);
  });

  it('status --json against a dead endpoint: stdout is JSON describing the failure, logs on stderr', async () => {
    const path = cfg('dead', 'etcd:\n  endpoint: http://127.0.0.1:1\nretry:\n  attempts: 2\n  minDelay: 100ms\n');
    const r = await runCli(['status', '--json', '--config', path]);
    assert.equal(r.code, 75, r.stdout + r.stderr);
    const jq = spawnSync('jq', ['-e', '.error.code'], { input: r.stdout, encoding: 'utf8' });
    assert.equal(jq.status, 0, `jq: ${jq.stderr}\nstdout was:\n${r.stdout}`);
    assert.equal(jq.stdout.trim(), '"EDD_UNAVAILABLE"');
    assert.equal(JSON.parse(r.stdout).endpoint, 'http://127.0.0.1:1');
    assert.match(r.stderr, /"event":"etcd\.retry"/, 'the retries are logged, on stderr');
    assert.match(r.stderr, /EDD_UNAVAILABLE/);
  });

  it('a config file others may write is refused by every command: exit 78, one line naming file, mode and fix', async () => {
    const path = cfg('writable', 'etcd:\n  endpoint: http://127.0.0.1:1\n');
    chmodSync(path, 0o666);
    for (const args of [['check-config'], ['status'], ['stage-tls', '--runtime-dir', dir], ['run']]) {
      const r = await runCli([...args, '--config', path]);
      assert.equal(r.code, 78, `${args[0]}: ${r.stdout}${r.stderr}`);
      const lines = r.stderr.trim().split('\n');
      assert.equal(lines.length, 1, r.stderr);
      assert.match(
        lines[0]!,
        new RegExp(
          `^etcd-defragd: config error: config file ${path} is group- and world-writable \\(mode 0666, owner .*\\): .*; fix: chmod go-w ${path}$`,
        ),
      );
    }
  });

  it('run: a metrics.listen it cannot have ends the daemon (taken: exit 1, systemd retries; foreign address: 78)', async () => {
    const taken = createServer();
    await new Promise<void>((r) => taken.listen(0, '127.0.0.1', r));
    const port = (taken.address() as AddressInfo).port;
    try {
      const path = cfg('listen', 'etcd:\n  endpoint: http://127.0.0.1:1\n');
      for (const [listen, code, re] of [
        [`127.0.0.1:${port}`, 1, /the port is taken by another process/],
        ['203.0.113.7:9479', 78, /this host has no such address/],
      ] as const) {
        const r = await runCli(['run', '--config', path, '--set', `metrics.listen=${listen}`, '--log-format', 'journal'], {
          timeoutMs: 30_000,
        });
        assert.equal(r.code, code, r.stdout + r.stderr);
        const lines = r.stderr.trim().split('\n');
        assert.equal(lines.length, 1, r.stderr);
        assert.match(lines[0]!, /^<3>EDD_CONFIG: metrics\.listen: cannot serve metrics on /);
        assert.match(lines[0]!, re);
        assert.doesNotMatch(r.stderr, /daemon\.start/, 'never started');
      }
    } finally {
      taken.close();
    }
  });

  it('every command keeps stdout for machine output: check-config and --version print no log line', async () => {
    const r = await runCli(['check-config', '--config', cfg('ok2', 'etcd:\n  endpoint: http://127.0.0.1:2379\n  dataDir: ""\n')]);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stderr, '');
    assert.doesNotMatch(r.stdout, /"level":/);
  });
});
