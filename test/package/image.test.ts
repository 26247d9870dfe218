// Issue 16: the OCI image runs. podman (with runc: crun fails on this cgroup v1 host) runs the
// image's amd64 entry against a real TLS cluster on loopback, as the DaemonSet does: host network,
// root with every capability dropped (kubeadm's keys are root's), read-only root, the cluster's dir
// (PKI, data dir, config) mounted read-only at the same path.
//   ETCD_DEFRAGD_IMAGE=oci-archive:dist/pkg/etcd-defragd-0.2.0-oci.tar:amd64 node --import tsx --test test/package/image.test.ts
// (.ci/check-package.sh runs it when podman and runc are installed.)
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { promisify } from 'node:util';
import { startCluster, type Cluster } from '../harness/cluster.ts';
import { allDefragEvents } from '../harness/defrag-log.ts';
import { fill } from '../harness/data.ts';
import { events, writeConfig } from '../harness/defragd.ts';
import { versionsUnderTest } from '../harness/etcd-bin.ts';
import { REPO_ROOT } from '../harness/proc.ts';

const execFileP = promisify(execFile);
const image = process.env.ETCD_DEFRAGD_IMAGE;
const version = versionsUnderTest().at(-1)!;
const nodeVersion = readFileSync(join(REPO_ROOT, '.node-version'), 'utf8').trim();
const MiB = 1024 * 1024;
// The rlimits podman would set by default are refused here; the runtime and cgroup manager that work.
const PODMAN = ['--runtime', 'runc', '--cgroup-manager=cgroupfs'];

async function podmanRun(mountDir: string, args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  const run = [
    ...PODMAN,
    'run',
    '--rm',
    '--network',
    'host',
    '--ulimit',
    'nofile=20000:20000',
    '--ulimit',
    'nproc=1024:1024',
    '--user',
    '0:0',
    '--cap-drop',
    'ALL',
    '--read-only',
    '--security-opt',
    'no-new-privileges',
    '-v',
    `${mountDir}:${mountDir}:ro`,
    image!,
    ...args,
  ];
  try {
    const r = await execFileP('podman', run, { timeout: 300_000 });
    return { code: 0, stdout: r.stdout, stderr: r.stderr };
  } catch (err) {
    const e = err as { code?: number | string; stdout?: string; stderr?: string };
    if (typeof e.code !== 'number') throw err;
    return { code: e.code, stdout: e.stdout ?? '', stderr: e.stderr ?? '' };
  }
}

describe(`the image ${image} (etcd ${version})`, { skip: image ? false : 'ETCD_DEFRAGD_IMAGE not set' }, () => {
  let cluster: Cluster;
  before(async () => {
    cluster = await startCluster({ version, tls: true });
    await fill(cluster, { inUseBytes: 16 * MiB, reclaimableBytes: 24 * MiB });
  });
  after(async () => {
    await cluster?.stop();
  });

  it('--version names the Node.js inside', async () => {
    const r = await podmanRun(cluster.dir, ['--version']);
    assert.equal(r.code, 0, r.stderr);
    assert.match(
      r.stdout,
      new RegExp(`^etcd-defragd \\d+\\.\\d+\\.\\d+ \\(commit [^)]*, Node\\.js v${nodeVersion.replaceAll('.', '\\.')}\\)\\n$`),
    );
  });

  it('once defragments its member and no other', async () => {
    const target = cluster.members[0]!;
    const cfg = writeConfig(cluster, target);
    const r = await podmanRun(cluster.dir, ['once', '--config', cfg]);
    assert.equal(r.code, 0, r.stdout + r.stderr);
    const done = events(r.stderr, 'defrag.done');
    assert.equal(done.length, 1, r.stderr);
    assert.equal(done[0]!.member, target.id);
    assert.deepEqual(
      (await allDefragEvents(cluster)).map((e) => e.member),
      [target.name],
    );
  });
});
