// Issue 9: certificates renewed on disk (kubeadm certs renew) are used by a running daemon
// without a restart. One etcd version: the mechanism is the client's, not etcd's.
import assert from 'node:assert/strict';
import { copyFileSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { startCluster, type Cluster } from '../harness/cluster.ts';
import { memberEtcd, startDaemon, type LogLine } from '../harness/defragd.ts';
import { versionsUnderTest } from '../harness/etcd-bin.ts';
import type { CliProcess } from '../harness/proc.ts';

const version = versionsUnderTest().at(-1)!;

describe(`renewed certificates under a running daemon (etcd ${version})`, () => {
  let cluster: Cluster;
  let daemon: CliProcess | undefined;
  before(async () => {
    cluster = await startCluster({ version, tls: true });
  });
  after(async () => {
    await daemon?.kill('SIGKILL');
    await cluster?.stop();
  });

  it('switches to new files on disk: a pair from another CA fails, the renewed good pair works again', async () => {
    const pki = cluster.pki!;
    const dir = join(cluster.dir, 'renewing-pki');
    mkdirSync(dir);
    const ca = join(dir, 'ca.crt');
    const crt = join(dir, 'client.crt');
    const key = join(dir, 'client.key');
    copyFileSync(pki.caFile, ca);
    copyFileSync(pki.clientCertFile, crt);
    copyFileSync(pki.clientKeyFile, key);
    const m = cluster.members[0]!;
    daemon = startDaemon(cluster, m, {
      etcd: { ...memberEtcd(cluster, m), caFile: ca, certFile: crt, keyFile: key },
      schedule: { cron: '0 0 1 1 *' },
      nospace: { checkInterval: '1s' },
    });
    const d = daemon;
    await d.waitForJson<LogLine>((l) => l.event === 'turn.register', 30_000);

    // A pair etcd does not trust: if the daemon really reconnects with what is on disk, it fails now.
    copyFileSync(pki.otherClientKeyFile, key);
    copyFileSync(pki.otherClientCertFile, crt);
    const from1 = d.lines.length;
    await d.waitForJson<LogLine>((l) => l.event === 'tls.changed', 15_000, { from: from1 });
    const fail = await d.waitForJson<LogLine>((l) => l.event === 'alarm.check.fail', 15_000, { from: from1 });
    assert.match(String(fail.msg), /certificate|TLS|SSL|handshake|alert|unavailable/i, fail.msg);

    // The good pair again (a renewal): reconnects and joins the turn again, no restart.
    const from2 = d.lines.length;
    copyFileSync(pki.clientKeyFile, key);
    copyFileSync(pki.clientCertFile, crt);
    await d.waitForJson<LogLine>((l) => l.event === 'tls.changed', 15_000, { from: from2 });
    await d.waitForJson<LogLine>((l) => l.event === 'turn.register', 30_000, { from: from2 });
    assert.ok(d.isRunning(), 'the same process');
    assert.equal(d.jsonLines<LogLine>().filter((l) => l.event === 'daemon.start').length, 1, 'started once');
  });
});
