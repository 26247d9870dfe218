import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { fstatSync } from 'node:fs';
import { consoleText, createLogger, formatLine, isJournalStream, resolveFormat } from '../../src/log.ts';

function capture(format: 'journal' | 'json' | 'pretty' | 'auto', env: NodeJS.ProcessEnv = {}) {
  const lines: string[] = [];
  const log = createLogger({ level: 'debug', format, env, out: { write: (s: string) => lines.push(...s.split('\n').filter(Boolean)) } });
  return { log, lines };
}

describe('log', () => {
  it('auto picks journal under systemd, pretty on a terminal, JSON otherwise', () => {
    assert.equal(resolveFormat('auto', { JOURNAL_STREAM: '8:1234' }, false), 'journal');
    assert.equal(resolveFormat('auto', {}, true), 'pretty');
    assert.equal(resolveFormat('auto', {}, false), 'json');
    assert.equal(resolveFormat('json', { JOURNAL_STREAM: '8:1' }, true), 'json');
  });
  it('prefixes journal lines with the syslog priority of their level', () => {
    const { log, lines } = capture('auto', { JOURNAL_STREAM: '8:1234' });
    log.debug({ event: 'a' }, 'debug line');
    log.info({ event: 'defrag.done', member: 'abc', beforeBytes: 10 }, 'defragmented abc');
    log.warn({ event: 'run.skip', reason: 'member x is down' }, 'run skipped');
    log.error({ event: 'defrag.fail' }, 'failed');
    assert.deepEqual(
      lines.map((l) => l.slice(0, 3)),
      ['<7>', '<6>', '<4>', '<3>'],
    );
    assert.equal(lines[1], '<6>defragmented abc event=defrag.done member=abc beforeBytes=10');
    assert.match(lines[2]!, /reason="member x is down"/);
  });
  it('writes JSON lines with a stable event field', () => {
    const { log, lines } = capture('json');
    log.info({ event: 'run.start' }, 'run started');
    const obj = JSON.parse(lines[0]!);
    assert.equal(obj.event, 'run.start');
    assert.equal(obj.level, 30);
    assert.equal(obj.msg, 'run started');
  });
  it('never prints secrets', () => {
    const { log, lines } = capture('json');
    log.info({ event: 'x', password: 'hunter2', auth: { password: 'hunter2' } }, 'auth');
    assert.ok(!lines.join('').includes('hunter2'));
  });
  it('formats pretty lines without colors when not on a terminal', () => {
    const line = formatLine({ level: 40, time: 1000, msg: 'hello', event: 'e' }, 'pretty', false);
    assert.equal(line, '00:00:01.000 WARN  hello event=e\n');
  });
  it('keeps a crash stack in the journal, every line at the same priority', () => {
    const { log, lines } = capture('journal');
    const err = new TypeError('boom');
    log.fatal({ event: 'crash', err }, 'unexpected error: boom');
    assert.equal(lines[0], '<2>unexpected error: boom event=crash');
    assert.equal(lines[1], '<2>TypeError: boom');
    assert.ok(lines.length > 3 && lines.slice(2).every((l) => /^<2> {4}at /.test(l)), lines.join('\n'));
  });
  it('prefixes text written outside the logger only under systemd', () => {
    assert.equal(consoleText({ JOURNAL_STREAM: '8:1' }, 3, 'bad\nworse'), '<3>bad\n<3>worse\n');
    assert.equal(consoleText({}, 3, 'bad'), 'bad\n');
  });
  it('recognises the journal stream by device and inode, not by the variable alone', () => {
    assert.equal(isJournalStream(1, {}), false);
    assert.equal(isJournalStream(1, { JOURNAL_STREAM: '1:1' }), false);
    const st = fstatSync(2, { bigint: true });
    assert.equal(isJournalStream(2, { JOURNAL_STREAM: `${st.dev}:${st.ino}` }), true);
  });
});
