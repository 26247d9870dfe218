import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { createLogger, formatLine, resolveFormat } from '../../src/log.ts';

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
    assert.deepEqual(lines.map((l) => l.slice(0, 3)), ['<7>', '<6>', '<4>', '<3>']);
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
});
