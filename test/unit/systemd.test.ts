// The shipped units (systemd/): no core dumps, and the sandbox's exposure kept (issue 20).
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, it } from 'node:test';

const UNITS = join(import.meta.dirname, '../../systemd');
const unit = (name: string) => readFileSync(join(UNITS, name), 'utf8');
const analyze = spawnSync('systemd-analyze', ['--version']).status === 0;

describe('systemd units', () => {
  it('neither unit may dump core (it would hold the client key and the password)', () => {
    for (const name of ['etcd-defragd.service', 'etcd-defragd-tls.service']) assert.match(unit(name), /^LimitCORE=0$/m, name);
  });

  it('exposure stays at or below 1.1 (service) and 1.8 (the copy)', { skip: !analyze && 'systemd-analyze not installed' }, () => {
    for (const [name, max] of [
      ['etcd-defragd.service', 1.1],
      ['etcd-defragd-tls.service', 1.8],
    ] as const) {
      const r = spawnSync('systemd-analyze', ['security', '--offline=true', '--no-pager', join(UNITS, name)], { encoding: 'utf8' });
      const score = Number(/Overall exposure level for [^:]*: ([0-9.]+)/.exec(r.stdout + r.stderr)?.[1]);
      assert.ok(score <= max, `${name}: exposure ${score} > ${max}\n${r.stdout}`);
    }
  });
});
