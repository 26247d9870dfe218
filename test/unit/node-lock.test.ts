import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, readdirSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { fileLock, memoryLock } from '../../src/node-lock.ts';

describe('the node lock of the NOSPACE order', () => {
  it('one taker per member at a time; released, it can be taken again', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'defragd-lock-'));
    const lock = fileLock(dir);
    const release = await lock('a1');
    assert.ok(release);
    assert.equal(await lock('a1'), undefined, 'held by a live process (this one)');
    const other = await lock('b2');
    assert.ok(other, 'another member is another lock');
    await release();
    const again = await lock('a1');
    assert.ok(again);
    await again();
    await other();
    assert.deepEqual(readdirSync(dir), []);
  });

  it('takes over a lock whose owner is gone', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'defragd-lock-'));
    const dead = spawnSync(process.execPath, ['-e', 'process.stdout.write(String(process.pid))']).stdout.toString();
    mkdirSync(join(dir, 'nospace-a1.lock'));
    writeFileSync(join(dir, 'nospace-a1.lock', 'pid'), dead);
    const release = await fileLock(dir)('a1');
    assert.ok(release, `pid ${dead} exited: the lock is stale`);
    await release();
  });

  it('the model tests share one in memory, and a dead taker lets go', async () => {
    const held = new Map<string, () => boolean>();
    let firstAlive = true;
    const first = memoryLock(held, () => firstAlive);
    const second = memoryLock(held, () => true);
    assert.ok(await first('a1'));
    assert.equal(await second('a1'), undefined);
    firstAlive = false;
    assert.ok(await second('a1'));
  });
});
