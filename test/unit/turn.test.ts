import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import type { IKeyValue } from 'etcd3';
import { parseView } from '../../src/turn.ts';

const kv = (key: string, value = ''): IKeyValue => ({ key: Buffer.from(key), value: Buffer.from(value) }) as IKeyValue;
const t = (lease: string, i: number) => kv(`/p/p/${lease}/t/${String(i).padStart(12, '0')}`);

describe('turn state from keys', () => {
  it('reads idle, holding and spare participants from their lowest ticket', () => {
    const v = parseView(
      '/p/',
      [
        kv('/p/p/a/info', JSON.stringify({ memberId: '1', host: 'h1' })),
        t('a', 2),
        t('a', 3),
        t('a', 4),
        kv('/p/p/b/info', '{}'),
        t('b', 11),
        t('b', 3),
        t('b', 12),
        kv('/p/p/c/info', '{"spare":true}'),
        kv('/p/p/c/spare'),
        t('c', 0),
        t('c', 1),
        kv('/p/other'),
      ],
      7n,
    );
    assert.equal(v.participants.get('a')!.holding, false);
    assert.equal(v.participants.get('b')!.holding, true, 'lowest ticket 3 is odd');
    assert.deepEqual(v.participants.get('b')!.tickets, [3, 11, 12]);
    assert.equal(v.participants.get('c')!.spare, true);
    assert.equal(v.participants.get('c')!.holding, false);
    assert.equal(v.participants.size, 3);
  });
});
