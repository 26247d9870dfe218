// metrics.textfile (src/textfile.ts) in a directory other users may write (issue 20): the write
// never follows a link left there, and leaves no temp file behind.
import assert from 'node:assert/strict';
import { chmodSync, lstatSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, it } from 'node:test';
import { removeTextfile, writeTextfile } from '../../src/textfile.ts';

describe('writeTextfile', () => {
  const dir = mkdtempSync(join(tmpdir(), 'edd-textfile-'));
  after(() => rmSync(dir, { recursive: true, force: true }));

  it('writes 0644 through a random temp name, whatever links sit at the old predictable names and at the file', async () => {
    const collector = join(dir, 'collector');
    const victim = join(dir, 'victim');
    writeFileSync(victim, 'keep me\n', { mode: 0o600 });
    const before = lstatSync(victim);
    mkdirSync(collector);
    chmodSync(collector, 0o1777);
    const prom = join(collector, 'etcd-defragd.prom');
    // The name the previous version used (pid-based), for this and nearby pids, and the file itself.
    for (let pid = process.pid - 2; pid <= process.pid + 2; pid++) symlinkSync(victim, join(collector, `.etcd-defragd.prom.${pid}.tmp`));
    symlinkSync(victim, prom);
    await writeTextfile(prom, 'etcd_defragd_up 1\n');
    assert.equal(readFileSync(victim, 'utf8'), 'keep me\n');
    const after = lstatSync(victim);
    assert.deepEqual([after.mode, after.uid, after.size], [before.mode, before.uid, before.size]);
    const st = lstatSync(prom);
    assert.ok(st.isFile(), 'the link at the final name was replaced by the file');
    assert.equal(st.mode & 0o777, 0o644);
    assert.equal(readFileSync(prom, 'utf8'), 'etcd_defragd_up 1\n');
    const left = readdirSync(collector).filter((f) => f.endsWith('.tmp') && !lstatSync(join(collector, f)).isSymbolicLink());
    assert.deepEqual(left, [], 'no temp file of ours left');
    // Rewritten: replaced again, atomically.
    await writeTextfile(prom, 'etcd_defragd_up 2\n');
    assert.equal(readFileSync(prom, 'utf8'), 'etcd_defragd_up 2\n');
  });

  it('removing it (a clean stop) takes a link at its name, never the target; a file already gone is fine', async () => {
    const victim = join(dir, 'keep');
    writeFileSync(victim, 'keep me\n');
    const prom = join(dir, 'removed.prom');
    await writeTextfile(prom, 'etcd_defragd_up 1\n');
    await removeTextfile(prom);
    assert.throws(() => lstatSync(prom), /ENOENT/);
    await removeTextfile(prom);
    symlinkSync(victim, prom);
    await removeTextfile(prom);
    assert.throws(() => lstatSync(prom), /ENOENT/);
    assert.equal(readFileSync(victim, 'utf8'), 'keep me\n');
  });

  it('a directory it cannot write fails, and leaves nothing', async () => {
    await assert.rejects(writeTextfile(join(dir, 'missing', 'x.prom'), 'x\n'), /ENOENT/);
  });
});
