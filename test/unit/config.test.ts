import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, writeFileSync, chmodSync, chownSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, it } from 'node:test';
import { envName, loadConfig, renderDefaultConfig } from '../../src/config.ts';
import { ConfigError } from '../../src/errors.ts';
import { readTrustedFile, userName } from '../../src/trust.ts';
import { parseDuration, parseSize } from '../../src/units.ts';

const dir = mkdtempSync(join(tmpdir(), 'edd-config-'));
function file(text: string): string {
  const p = join(dir, `c${Math.random().toString(36).slice(2)}.yaml`);
  writeFileSync(p, text);
  return p;
}
const plain = 'etcd:\n  endpoint: http://127.0.0.1:2379\n';
/** nobody: the user a root test drops to. */
const NOBODY = 65534;

describe('config', () => {
  it('ships a config file that lists every key with its default', () => {
    assert.equal(
      readFileSync(new URL('../../config/etcd-defragd.yaml', import.meta.url), 'utf8'),
      renderDefaultConfig(),
      'config/etcd-defragd.yaml is stale: run node --import tsx scripts/gen-config.ts',
    );
    const loaded = loadConfig({ path: fileFromShipped(), env: {}, checkFiles: false });
    assert.equal(loaded.config.schedule.cron, '0 */3 * * *');
    assert.equal(loaded.config.policy.minReclaimable, 64 * 1024 ** 2);
    assert.equal(loaded.config.etcd.defragTimeout, 600_000);
    assert.equal(loaded.config.policy.quotaBytes, 'auto', 'the quota comes from etcd unless set');
    assert.equal(loaded.config.nospace.compact, true);
    assert.equal(loaded.config.nospace.keepHistory, 300_000);
    assert.equal(loaded.config.policy.singleMember, false);
  });

  it('takes a size or auto for policy.quotaBytes, and names what is accepted', () => {
    assert.equal(loadConfig({ path: file(`${plain}policy:\n  quotaBytes: 8GiB\n`), env: {} }).config.policy.quotaBytes, 8 * 1024 ** 3);
    assert.equal(loadConfig({ path: file(`${plain}policy:\n  quotaBytes: auto\n`), env: {} }).config.policy.quotaBytes, 'auto');
    assert.throws(
      () => loadConfig({ path: file(`${plain}policy:\n  quotaBytes: automatic\n`), env: {} }),
      /policy\.quotaBytes: "automatic" is not a size in .*; accepted: auto \(read each member's --quota-backend-bytes from etcd\), or a size/,
    );
  });

  it('loads a v0.1 config that still has nospace.keepRevisions, and warns that it is ignored', () => {
    const loaded = loadConfig({ path: file(`${plain}nospace:\n  compact: true\n  keepRevisions: 1000\n`), env: {} });
    assert.equal(loaded.config.nospace.compact, true);
    assert.equal(loaded.warnings.length, 1);
    assert.match(loaded.warnings[0]!, /^nospace\.keepRevisions in .* is no longer used and is ignored: replaced by nospace\.keepHistory/);
    const v01 = loadConfig({ path: file(`${plain}nospace:\n  compact: false\n  keepRevisions: 1000\n`), env: {} });
    assert.equal(v01.config.nospace.compact, false, 'an explicit value is kept');
    assert.match(v01.warnings[1]!, /nospace\.compact: false in .* looks like v0\.1's default written out/);
    assert.deepEqual(loadConfig({ path: file(plain), env: {} }).warnings, []);
  });

  it('applies file, then environment, then flags', () => {
    const path = file(`${plain}schedule:\n  cron: "5 * * * *"\npolicy:\n  minReclaimable: 1MiB\n`);
    const table: { env: Record<string, string>; flags: Record<string, string>; cron: string; reclaim: number }[] = [
      { env: {}, flags: {}, cron: '5 * * * *', reclaim: 1024 ** 2 },
      { env: { ETCD_DEFRAGD_SCHEDULE_CRON: '10 * * * *' }, flags: {}, cron: '10 * * * *', reclaim: 1024 ** 2 },
      {
        env: { ETCD_DEFRAGD_SCHEDULE_CRON: '10 * * * *' },
        flags: { 'schedule.cron': '15 * * * *' },
        cron: '15 * * * *',
        reclaim: 1024 ** 2,
      },
      { env: { ETCD_DEFRAGD_POLICY_MIN_RECLAIMABLE: '2MiB' }, flags: {}, cron: '5 * * * *', reclaim: 2 * 1024 ** 2 },
    ];
    for (const row of table) {
      const c = loadConfig({ path, env: row.env, flags: row.flags }).config;
      assert.equal(c.schedule.cron, row.cron, JSON.stringify(row));
      assert.equal(c.policy.minReclaimable, row.reclaim, JSON.stringify(row));
    }
  });

  it('says where each value came from, and an empty environment variable still counts', () => {
    const creds = mkdtempSync(join(dir, 'creds-'));
    writeFileSync(join(creds, 'etcd-ca'), 'x');
    const loaded = loadConfig({
      path: file(`${plain}nospace:\n  # every key commented out\nlog:\n  level: debug\n`),
      env: { ETCD_DEFRAGD_METRICS_LISTEN: '', ETCD_DEFRAGD_LOG_LEVEL: 'warn', CREDENTIALS_DIRECTORY: creds },
      flags: { 'log.level': 'error', 'etcd.caFile': '/flag/ca.crt' },
      checkFiles: false,
    });
    assert.equal(loaded.config.metrics.listen, '', '"" from the environment disables the listener');
    assert.deepEqual(loaded.sources['metrics.listen'], { source: 'env', detail: 'ETCD_DEFRAGD_METRICS_LISTEN' });
    assert.equal(loaded.config.log.level, 'error');
    assert.deepEqual(loaded.sources['log.level'], { source: 'flag', detail: '--log-level' });
    assert.deepEqual(loaded.sources['etcd.endpoint'], { source: 'file' });
    assert.equal(loaded.config.nospace.keepHistory, 300_000, 'a section with only comments keeps its defaults');
    assert.deepEqual(loaded.sources['nospace.keepHistory'], { source: 'default' });
    assert.equal(loaded.config.etcd.caFile, join(creds, 'etcd-ca'), 'a systemd credential wins over a flag');
    assert.equal(loaded.sources['etcd.caFile']!.source, 'credential');
    assert.throws(
      () => loadConfig({ path: file(plain), env: {}, flags: { 'etcd.toString': 'x' } }),
      /^ConfigError: etcd\.toString: unknown key given on the command line/,
    );
  });

  it('names env vars after section and key', () => {
    assert.equal(envName('etcd', 'caFile'), 'ETCD_DEFRAGD_ETCD_CA_FILE');
    assert.equal(envName('verify', 'hashKV'), 'ETCD_DEFRAGD_VERIFY_HASH_KV');
  });

  const bad: [string, string, RegExp][] = [
    ['unknown key', `${plain}  endpont: x\n`, /^etcd\.endpont: unknown key in .*accepted: etcd\.endpoint, etcd\.caFile/],
    ['unknown section', `${plain}sched:\n  cron: x\n`, /^sched: unknown section/],
    ['key named like an Object method', `${plain}  toString: x\n`, /^etcd\.toString: unknown key in /],
    ['section named like an Object method', `${plain}constructor:\n  x: 1\n`, /^constructor: unknown section/],
    [
      'malformed cron',
      `${plain}schedule:\n  cron: "0 */3 * *"\n`,
      /^schedule\.cron: ".*" is not a cron expression \(5 fields expected.*accepted: a 5-field cron/,
    ],
    ['negative duration', `${plain}  requestTimeout: -5s\n`, /^etcd\.requestTimeout: "-5s" is negative in .*accepted: a positive duration/],
    [
      'endpoint not a URL',
      'etcd:\n  endpoint: 127.0.0.1:2379x\n',
      /^etcd\.endpoint: "127\.0\.0\.1:2379x" .*accepted: an http:\/\/ or https:\/\/ URL/,
    ],
    [
      'ratio above 1',
      `${plain}policy:\n  minFragmentation: 1.5\n`,
      /^policy\.minFragmentation: 1\.5 is above 1 .*accepted: a number from 0 to 1/,
    ],
    [
      'unknown size unit',
      `${plain}policy:\n  minReclaimable: 64XB\n`,
      /^policy\.minReclaimable: "64XB" has an unknown unit "XB" .*accepted: a size such as 64MiB/,
    ],
    ['bad timezone', `${plain}schedule:\n  timezone: Mars/Base\n`, /^schedule\.timezone: "Mars\/Base" is not a time zone/],
    [
      'bad enum',
      `${plain}coordination:\n  leader: first\n`,
      /^coordination\.leader: "first" is not accepted .*accepted: one of transfer, last/,
    ],
    [
      'unreadable CA',
      'etcd:\n  caFile: /nonexistent/ca.crt\n',
      /^etcd\.caFile: "\/nonexistent\/ca\.crt" does not exist in .*accepted: a readable file/,
    ],
    ['not YAML', 'etcd: [\n', /not valid YAML/],
  ];
  for (const [name, text, re] of bad) {
    it(`rejects ${name} with one line naming key, value and what is accepted`, () => {
      const path = file(text);
      assert.throws(
        () => loadConfig({ path, env: {} }),
        (err: unknown) => {
          assert.ok(err instanceof ConfigError, String(err));
          assert.match(err.message, re);
          assert.ok(!err.message.includes('\n'), 'one line');
          if (!/not valid YAML/.test(err.message))
            assert.ok(err.message.includes(path) || /unknown section/.test(err.message), 'names the file');
          return true;
        },
      );
    });
  }

  it('says when a bad value came from the environment', () => {
    assert.throws(
      () => loadConfig({ path: file(plain), env: { ETCD_DEFRAGD_RETRY_ATTEMPTS: 'many' } }),
      /retry\.attempts: "many" is not a whole number from environment variable ETCD_DEFRAGD_RETRY_ATTEMPTS/,
    );
  });

  it('rejects a certificate file that is not PEM', () => {
    const junk = join(dir, 'junk.crt');
    writeFileSync(junk, 'hello');
    assert.throws(
      () => loadConfig({ path: file(`etcd:\n  caFile: ${junk}\n  certFile: ""\n  keyFile: ""\n`), env: {} }),
      /etcd\.caFile: ".*junk\.crt" is not a PEM certificate/,
    );
  });

  it('rejects an unreadable password file, also when the tests run as root', () => {
    // Root reads any file, so a child process drops to nobody before loading the config. It
    // imports the code first, as the test's own user: the repository may sit below a directory
    // only root can enter, where nobody could not load it.
    const open = mkdtempSync(join(tmpdir(), 'edd-config-nobody-'));
    chmodSync(open, 0o755);
    const pw = join(open, 'pw');
    writeFileSync(pw, 'x');
    chmodSync(pw, 0);
    const path = join(open, 'config.yaml');
    writeFileSync(path, `${plain}  username: root\n  passwordFile: ${pw}\n`);
    chmodSync(path, 0o644);
    const child = `
      const { loadConfig } = await import(process.argv[1]);
      if (process.getuid() === 0) { process.setgroups([${NOBODY}]); process.setgid(${NOBODY}); process.setuid(${NOBODY}); }
      let out;
      try { loadConfig({ path: process.argv[2], env: {} }); out = { loaded: true }; }
      catch (err) { out = { name: err.name, message: err.message }; }
      console.log(JSON.stringify({ uid: process.getuid(), ...out }));`;
    const code = new URL('../../src/config.ts', import.meta.url).href;
    const r = spawnSync(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', child, code, path], {
      cwd: fileURLToPath(new URL('../..', import.meta.url)),
      encoding: 'utf8',
      timeout: 30_000,
    });
    assert.equal(r.status, 0, `child: ${r.stderr}`);
    const got = JSON.parse(r.stdout) as { uid: number; loaded?: boolean; name?: string; message?: string };
    assert.notEqual(got.uid, 0, 'the child ran without root');
    assert.equal(got.name, 'ConfigError', r.stdout);
    assert.match(got.message!, /not readable/);
    const expected = `etcd.passwordFile: ${JSON.stringify(pw)} is not readable (permission denied) in ${path}; accepted: a readable file`;
    assert.equal(got.message, expected);
  });

  // Issue 20: root runs every command; a file another user can change would steer it (sshd's StrictModes).
  it('refuses a config or password file that others may write, naming the file, its mode and owner, and the fix', () => {
    const cfgFile = file('etcd:\n  endpoint: http://127.0.0.1:2379\n');
    const uid = process.getuid?.() ?? 0;
    const owner = userName(uid) ? `${userName(uid)} (uid ${uid})` : `uid ${uid}`;
    for (const [mode, what] of [
      [0o664, 'group-writable'],
      [0o646, 'world-writable'],
      [0o666, 'group- and world-writable'],
    ] as const) {
      chmodSync(cfgFile, mode);
      const expected =
        `config file ${cfgFile} is ${what} (mode 0${mode.toString(8)}, owner ${owner}): ` +
        `another user could change what etcd-defragd does; fix: chmod go-w ${cfgFile}`;
      assert.throws(
        () => loadConfig({ path: cfgFile, env: {} }),
        (e: unknown) => e instanceof ConfigError && e.message === expected,
      );
    }
    chmodSync(cfgFile, 0o644);
    assert.equal(loadConfig({ path: cfgFile, env: {} }).config.etcd.endpoint, 'http://127.0.0.1:2379');
    const pw = join(dir, 'writable-pw');
    writeFileSync(pw, 'secret\n');
    chmodSync(pw, 0o620);
    const withPw = file(`${plain}  username: root\n  passwordFile: ${pw}\n`);
    assert.throws(
      () => loadConfig({ path: withPw, env: {} }),
      new RegExp(
        `^ConfigError: etcd\\.passwordFile in ${withPw}: ${pw} is group-writable \\(mode 0620, owner .*\\): .*; fix: chmod go-w ${pw}$`,
      ),
    );
    chmodSync(pw, 0o600);
    assert.equal(loadConfig({ path: withPw, env: {} }).config.etcd.passwordFile, pw);
  });

  it(
    'a config or password file must belong to root or to the user running etcd-defragd',
    { skip: process.getuid?.() !== 0 && 'needs root (chown)' },
    () => {
      const f = file('etcd:\n  endpoint: http://127.0.0.1:2379\n');
      chownSync(f, 4242, 4242);
      assert.throws(
        () => loadConfig({ path: f, env: {} }),
        new RegExp(
          `^ConfigError: config file ${f} is owned by uid 4242 \\(mode 0644\\), not by root: its owner could change what etcd-defragd does; fix: chown root ${f}$`,
        ),
      );
      // Run by that user (not root), the file is theirs to trust; root's own files always are.
      assert.equal(readTrustedFile('config file', f, 4242).toString(), 'etcd:\n  endpoint: http://127.0.0.1:2379\n');
      chownSync(f, 0, 0);
      assert.ok(readTrustedFile('config file', f, 4242));
      chownSync(f, 4343, 4343);
      assert.throws(
        () => readTrustedFile('config file', f, 4242),
        /is owned by uid 4343 \(mode 0644\), not by root or uid 4242, who runs etcd-defragd: .*; fix: chown 4242 /,
      );
    },
  );

  it('prefers systemd credentials over configured paths', () => {
    const creds = mkdtempSync(join(dir, 'creds-'));
    writeFileSync(join(creds, 'etcd-password'), 'secret\n');
    const c = loadConfig({ path: file(`${plain}  username: root\n  passwordFile: /nonexistent\n`), env: { CREDENTIALS_DIRECTORY: creds } });
    assert.equal(c.config.etcd.passwordFile, join(creds, 'etcd-password'));
    assert.equal(c.sources['etcd.passwordFile']!.source, 'credential');
  });

  it('a missing default config file means defaults, an explicit one is an error', () => {
    assert.throws(
      () => loadConfig({ path: join(dir, 'missing.yaml'), pathExplicit: true, env: {} }),
      /cannot read config file .*no such file/,
    );
    const c = loadConfig({
      path: join(dir, 'missing.yaml'),
      pathExplicit: false,
      env: { ETCD_DEFRAGD_ETCD_ENDPOINT: 'http://127.0.0.1:2379' },
    });
    assert.equal(c.path, undefined);
  });
});

describe('units', () => {
  it('parses durations and sizes', () => {
    assert.equal(parseDuration('500ms'), 500);
    assert.equal(parseDuration('10s'), 10_000);
    assert.equal(parseDuration('3h'), 10_800_000);
    assert.equal(parseDuration('1h30m'), 5_400_000);
    assert.equal(parseDuration(250), 250);
    assert.equal(parseDuration('10x'), undefined);
    assert.equal(parseSize('64MiB'), 64 * 1024 ** 2);
    assert.equal(parseSize('2GiB'), 2 * 1024 ** 3);
    assert.equal(parseSize('500MB'), 500_000_000);
    assert.equal(parseSize('1048576'), 1048576);
    assert.equal(parseSize('5 XB'), undefined);
  });
});

function fileFromShipped(): string {
  // The shipped file points at kubeadm's certificates, which do not exist here; keep the rest.
  return file(readFileSync(new URL('../../config/etcd-defragd.yaml', import.meta.url), 'utf8'));
}

describe('config bounds', () => {
  it('rejects durations a timer cannot hold and a zero quota', () => {
    const path = join(dir, 'bounds.yaml');
    writeFileSync(path, 'etcd:\n  endpoint: http://127.0.0.1:2379\n');
    assert.throws(
      () => loadConfig({ path, env: {}, flags: { 'nospace.checkInterval': '30d' } }),
      /nospace\.checkInterval: "30d" is too long .*at most 24d/,
    );
    assert.throws(() => loadConfig({ path, env: {}, flags: { 'policy.quotaBytes': '0' } }), /policy\.quotaBytes: "0" must be above zero/);
    assert.throws(
      () => loadConfig({ path, env: {}, flags: { 'coordination.leaseTTL': '1s' } }),
      /coordination\.leaseTTL: "1s" is below the minimum of 2000ms/,
    );
  });
});
