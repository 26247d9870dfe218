// Who runs an operator command (issue 20): the real uid and SUDO_UID, never SUDO_USER; and a forced
// action recorded in the system log through logger(1).
import assert from 'node:assert/strict';
import { chmodSync, fstatSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, it } from 'node:test';
import { auditToSystemLog } from '../../src/log.ts';
import { caller } from '../../src/ops.ts';
import { userName } from '../../src/trust.ts';

describe('the caller of pause, resume and disarm', () => {
  it('is the real uid, with SUDO_UID beside it; SUDO_USER is ignored', () => {
    const uid = process.getuid!();
    const me = userName(uid) ? `${uid} (${userName(uid)})` : String(uid);
    const c = caller({ SUDO_USER: 'the-boss', SUDO_UID: '0' });
    assert.equal(c.uid, uid);
    assert.equal(c.sudoUid, 0);
    assert.equal(c.by, `uid ${me}, SUDO_UID 0 (root)`);
    assert.doesNotMatch(c.by, /the-boss/);
    assert.equal(caller({ SUDO_USER: 'the-boss' }).by, `uid ${me}`, 'no SUDO_UID: the uid alone');
    for (const bad of ['', 'root', '-1', '1e3', '0x10', '12345678901'])
      assert.equal(caller({ SUDO_UID: bad }).sudoUid, undefined, `SUDO_UID ${JSON.stringify(bad)}`);
    assert.equal(caller({ SUDO_UID: '4242' }, 0).by, 'uid 0 (root), SUDO_UID 4242');
  });
});

describe('a forced action in the system log', () => {
  const dir = mkdtempSync(join(tmpdir(), 'edd-audit-'));
  after(() => rmSync(dir, { recursive: true, force: true }));
  const fakeLogger = (body: string) => {
    const bin = mkdtempSync(join(dir, 'bin-'));
    writeFileSync(join(bin, 'logger'), `#!/bin/sh\n${body}\n`);
    chmodSync(join(bin, 'logger'), 0o755);
    return { PATH: `${bin}:/usr/bin:/bin` };
  };

  it('is one logger(1) line at auth.notice, tagged etcd-defragd, escaped', () => {
    const out = join(dir, 'args');
    const env = fakeLogger(`for a in "$@"; do printf '%s\\n' "$a"; done > ${out}`);
    assert.equal(auditToSystemLog('NOSPACE disarmed by hand by uid 0 (root)\x1b[2J', env), undefined);
    assert.deepEqual(readFileSync(out, 'utf8').split('\n').slice(0, -1), [
      '-t',
      'etcd-defragd',
      '-p',
      'auth.notice',
      '--',
      'NOSPACE disarmed by hand by uid 0 (root)\\x1b[2J',
    ]);
  });

  it('says why when logger fails or is missing, instead of failing the command', () => {
    assert.match(
      auditToSystemLog('x', fakeLogger('echo "logger: socket /dev/log: No such file" >&2; exit 1'))!,
      /^logger exited 1: logger: socket/,
    );
    assert.match(auditToSystemLog('x', { PATH: dir })!, /^logger: spawnSync logger ENOENT/);
  });

  it('is not sent again when stderr already is the journal', () => {
    const st = fstatSync(2);
    assert.equal(auditToSystemLog('x', { ...fakeLogger('exit 1'), JOURNAL_STREAM: `${st.dev}:${st.ino}` }), undefined);
  });
});
