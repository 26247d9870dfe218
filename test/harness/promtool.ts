// Prometheus' own checker (Debian package `prometheus` ships /usr/bin/promtool; .ci/run installs it).
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';

/** promtool check metrics on an exposition: exit status and findings. */
export function promtoolCheck(text: string): { status: number | null; findings: string } {
  assert.ok(text.length > 0, 'nothing to check (promtool passes an empty input)');
  return promtool(['check', 'metrics'], text);
}

export function promtool(args: string[], input?: string): { status: number | null; findings: string } {
  const r = spawnSync('promtool', args, { input, encoding: 'utf8' });
  assert.equal(r.error, undefined, `promtool not runnable (apt-get install prometheus): ${r.error?.message}`);
  return { status: r.status, findings: `${r.stdout}${r.stderr}`.trim() };
}
