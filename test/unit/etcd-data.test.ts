// Data read from etcd under coordination.prefix is written by whoever may write there (issue 20):
// status takes only the shapes it expects, and prints control characters escaped.
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { formatLine, printable, printableJson } from '../../src/log.ts';
import { describeClusterControl } from '../../src/ops.ts';
import { describeParticipant, parseView } from '../../src/turn.ts';

/* eslint-disable no-control-regex -- these tests look for control characters on purpose */

describe('participant info shapes (status)', () => {
  // Keys attached to the lease their name says (parseView ignores any other).
  const own = (key: string, value: string) => ({ key: Buffer.from(key), value: Buffer.from(value), lease: String(0xabc) }) as never;
  const info = (raw: string) =>
    parseView('/p/', [own('/p/p/abc/info', raw), own('/p/p/abc/t/000000000001', '')], 1n).participants.get('abc')!;

  it('keeps the fields of the expected type, drops the rest', () => {
    const good = JSON.stringify({ memberId: '1234', host: 'cp-1', pid: 42, command: 'etcd-defragd run', since: '5' });
    assert.deepEqual(info(good).info, { memberId: '1234', host: 'cp-1', pid: 42, command: 'etcd-defragd run', since: '5' });
    assert.deepEqual(info(JSON.stringify({ memberId: 'zz', host: ['a'], pid: -1.5, command: { x: 1 }, since: 9 })).info, {});
    assert.deepEqual(info(JSON.stringify({ host: 'x'.repeat(10_000) })).info, {});
    for (const raw of ['null', '7', '"text"', '[1,2]', 'not json']) assert.deepEqual(info(raw).info, {});
  });

  it('a holder whose info is null, a number or has a bad member ID is still described, by what is left', () => {
    for (const raw of ['null', '12', '{"memberId":"not-a-number","host":"cp-2"}', '{"pid":{"toString":1}}']) {
      const p = info(raw);
      assert.equal(p.holding, true);
      const text = describeParticipant(p);
      assert.match(text, /^daemon \((host cp-2|lease abc)\)$/, `${raw} -> ${text}`);
    }
  });
});

// What etcd holds reaches root's terminal through status and the pretty log, and the journal.
const HOSTILE = 'ok\x1b]0;owned\x07\x1b[2J\r\n<0>forged line\u202eevil\x9b31m\x7f';

describe('control characters from etcd are shown, never obeyed', () => {
  it('printable escapes C0, DEL, C1, line separators and bidi overrides, and nothing else', () => {
    assert.equal(printable(HOSTILE), 'ok\\x1b]0;owned\\x07\\x1b[2J\\r\\n<0>forged line\\u202eevil\\x9b31m\\x7f');
    assert.equal(printable('plain: café, 名前, a\\b'), 'plain: café, 名前, a\\b');
    assert.equal(printable(printable(HOSTILE)), printable(HOSTILE), 'idempotent');
  });

  it('the pretty and journal log lines carry them escaped, on one line', () => {
    for (const format of ['pretty', 'journal'] as const) {
      const line = formatLine(
        { level: 30, time: 0, msg: `paused: ${HOSTILE}`, event: 'pause', reason: HOSTILE, member: 'm\x1b[31m', [`k\x1b`]: 1 },
        format,
        format === 'pretty',
      );
      assert.equal(line.split('\n').filter(Boolean).length, 1, `${format}: one line`);
      // The only ESC left in a pretty line is our own colour (ESC [ digits m) around the level and fields.
      assert.doesNotMatch(line.replace(/\x1b\[\d+m/g, ''), /[\x00-\x09\x0b-\x1f\x7f-\x9f\u202e]/, format);
      assert.match(line, /ok\\x1b\]0;owned\\x07/);
      assert.match(line, /member=.*m\\(x1b|u001b)\[31m/);
    }
  });

  it('status: the pause, the halt, the holder and read errors, one printable line each', () => {
    const lines = describeClusterControl({
      nextRun: '2030-01-01T00:00:00.000Z',
      holder: `daemon (host ${HOSTILE})`,
      participants: 1,
      trends: {},
      pause: { by: `root\x1b[8m`, host: 'cp-1\n', at: 'now', reason: HOSTILE },
      halt: { reason: `mismatch\u2028${HOSTILE}` },
      errors: [`turn: bad\x1b[0m`],
    });
    assert.equal(lines.length, 5);
    for (const l of lines) assert.doesNotMatch(l, /[\x00-\x1f\x7f-\x9f\u2028\u202e]/, l);
    assert.match(lines[2]!, /^pause: paused by root\\x1b\[8m on cp-1\\n at now: ok\\x1b/);
  });

  it('status --json keeps them as \\u escapes, which parse back to the same value', () => {
    const text = printableJson(JSON.stringify({ reason: HOSTILE, nested: { name: HOSTILE } }, null, 2));
    assert.doesNotMatch(text.replace(/\n/g, ''), /[\x00-\x1f\x7f-\x9f\u202e]/, 'only the layout newlines stay raw');
    assert.deepEqual(JSON.parse(text), { reason: HOSTILE, nested: { name: HOSTILE } });
  });
});
