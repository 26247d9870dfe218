// Data read from etcd under coordination.prefix is written by whoever may write there: status takes
// only the shapes it expects (issue 20).
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { participantInfo } from '../../src/ops.ts';
import { describeParticipant, parseView } from '../../src/turn.ts';

const kv = (key: string, value: string) => ({ key: Buffer.from(key), value: Buffer.from(value) }) as never;

describe('participant info shapes (status)', () => {
  it('keeps the fields of the expected type, drops the rest', () => {
    assert.deepEqual(participantInfo({ memberId: '1234', host: 'cp-1', pid: 42, command: 'etcd-defragd run', spare: false, since: '5' }), {
      memberId: '1234',
      host: 'cp-1',
      pid: 42,
      command: 'etcd-defragd run',
      spare: false,
      since: '5',
    });
    assert.deepEqual(participantInfo({ memberId: 'zz', host: ['a'], pid: -1, command: { x: 1 }, spare: 'yes', since: 9 }), {});
    assert.deepEqual(participantInfo({ host: 'x'.repeat(10_000) }), {});
    for (const raw of [null, 7, 'text', [1, 2], undefined]) assert.deepEqual(participantInfo(raw), {});
  });

  it('a holder whose info is null, a number or has a bad member ID is still described, by what is left', () => {
    for (const info of ['null', '12', '{"memberId":"not-a-number","host":"cp-2"}', '{"pid":{"toString":1}}']) {
      const view = parseView('/p/', [kv('/p/p/abc/info', info), kv('/p/p/abc/t/000000000001', '')], 1n);
      const p = view.participants.get('abc')!;
      assert.equal(p.holding, true);
      const text = describeParticipant({ ...p, info: participantInfo(p.info) });
      assert.match(text, /^daemon \((host cp-2|lease abc)\)$/, `${info} -> ${text}`);
    }
  });
});
