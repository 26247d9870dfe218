import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import type { IKeyValue } from 'etcd3';
import { parseView } from '../../src/turn.ts';
import { decimalId } from '../../src/view.ts';

/** A key as etcd returns it: `lease` is the lease it is attached to (decimal; '0' for none). */
const kv = (key: string, lease: string, value = ''): IKeyValue =>
  ({ key: Buffer.from(key), value: Buffer.from(value), lease }) as IKeyValue;
const own = (hex: string, rest: string, value = '') => kv(`/p/p/${hex}/${rest}`, decimalId(hex), value);
const t = (hex: string, i: number) => own(hex, `t/${String(i).padStart(12, '0')}`);

describe('turn state from keys', () => {
  it('reads idle and holding participants from their lowest ticket', () => {
    const v = parseView(
      '/p/',
      [
        own('a', 'info', JSON.stringify({ memberId: '1', host: 'h1' })),
        t('a', 2),
        t('a', 3),
        t('a', 4),
        own('b', 'info', '{}'),
        t('b', 11),
        t('b', 3),
        t('b', 12),
        kv('/p/other', '0'),
      ],
      7n,
    );
    assert.equal(v.participants.get('a')!.holding, false);
    assert.equal(v.participants.get('a')!.info.memberId, '1');
    assert.equal(v.participants.get('b')!.holding, true, 'lowest ticket 3 is odd');
    assert.deepEqual(v.participants.get('b')!.tickets, [3, 11, 12]);
    assert.equal(v.participants.size, 2);
    assert.deepEqual(v.ignored, []);
  });

  it('ignores keys whose own lease is not the one their name says (a planted participant)', () => {
    // Someone allowed to write under the prefix plants a holding participant that names lease
    // 'ff' (an API server's event lease, say), without the keys being attached to it.
    const v = parseView(
      '/p/',
      [
        kv('/p/p/ff/info', '0', '{"command":"etcd-defragd run"}'),
        kv('/p/p/ff/t/000000000001', '0'),
        kv('/p/p/ff/t/000000000002', decimalId('ab')),
        own('c', 'info', JSON.stringify({ memberId: 'not a number', pid: 'x', host: 'h3', extra: { deep: true } })),
        t('c', 0),
        t('c', 1),
        kv('/p/p/not-hex/t/000000000001', '1'),
      ],
      9n,
    );
    assert.equal(v.participants.has('ff'), false, 'never renewed, waited for or revoked');
    assert.equal(v.participants.size, 1);
    assert.deepEqual(v.participants.get('c')!.info, { host: 'h3' }, 'info keeps only the fields of the types we write');
    assert.equal(v.ignored.length, 4);
  });
});
