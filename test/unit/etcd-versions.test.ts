import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { describeVersionNotes, versionNotes } from '../../src/etcd-versions.ts';

const ids = (v: string) => versionNotes(v).map((n) => n.id);

describe('etcd versions with known trouble', () => {
  it('names each note up to, not including, the release that fixed it', () => {
    assert.deepEqual(ids('3.4.19'), ['txn-nospace', 'defrag-panic', 'snapshot-race']);
    assert.deepEqual(ids('3.4.20'), ['defrag-panic', 'snapshot-race']);
    assert.deepEqual(ids('3.4.23'), ['defrag-panic', 'snapshot-race'], 'Debian bookworm');
    assert.deepEqual(ids('3.4.38'), []);
    assert.deepEqual(ids('3.5.5'), ['txn-nospace', 'kill-mid-defrag', 'defrag-panic', 'snapshot-race']);
    assert.deepEqual(ids('3.5.6'), ['txn-nospace', 'defrag-panic', 'snapshot-race']);
    assert.deepEqual(ids('3.5.7'), ['defrag-panic', 'snapshot-race']);
    assert.deepEqual(ids('3.5.17'), ['snapshot-race']);
    assert.deepEqual(ids('3.5.30'), [], 'Debian sid');
    assert.deepEqual(ids('3.6.4'), ['snapshot-race']);
    assert.deepEqual(ids('3.6.5'), []);
  });
  it('says nothing about versions it cannot read or lines it does not know', () => {
    assert.deepEqual(ids(''), []);
    assert.deepEqual(ids('not a version'), []);
    assert.deepEqual(ids('3.7.0'), []);
  });
  it('writes one line per note with the member, the version and the fix', () => {
    const lines = describeVersionNotes('8e9e05c52164694d', '3.5.5');
    assert.equal(lines.length, 4);
    assert.match(lines[1]!, /^member 8e9e05c52164694d runs etcd 3\.5\.5, which \(fixed in 3\.5\.6\) a member killed/);
  });
});
