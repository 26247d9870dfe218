// The quick-start demo (run through scripts/demo.sh): real etcd, real TLS, real defragments.
import { startCluster } from '../test/harness/cluster.ts';
import { fill } from '../test/harness/data.ts';
import { startDaemon, writeConfig } from '../test/harness/defragd.ts';
import type { EtcdVersion } from '../test/harness/etcd-bin.ts';
import { runCli } from '../test/harness/proc.ts';

const version = (process.argv[2] ?? '3.5') as EtcdVersion;
const MiB = 1024 * 1024;
const say = (s: string) => process.stdout.write(`\n\x1b[1m== ${s}\x1b[0m\n`);

say(`starting a 3-member etcd ${version} cluster with client TLS on loopback`);
const cluster = await startCluster({ version, tls: true });
try {
  say('writing 24 MiB of live data and 40 MiB of garbage, then compacting: the db file keeps the space');
  await fill(cluster, { inUseBytes: 24 * MiB, reclaimableBytes: 40 * MiB });
  const [m0, m1, m2] = cluster.members as [(typeof cluster.members)[0], (typeof cluster.members)[0], (typeof cluster.members)[0]];
  const demoConfig = { log: { format: 'pretty', level: 'info' } };
  const cfg = writeConfig(cluster, m0, demoConfig);
  process.stdout.write(`config for ${m0.name}: ${cfg}\n`);

  say('etcd-defragd status');
  process.stdout.write((await runCli(['status', '--config', cfg])).stdout + '\n');

  say(`etcd-defragd once (on ${m0.name}'s node): inspect, gate, decide, take the turn, defragment, verify`);
  const first = await runCli(['once', '--config', cfg], { timeoutMs: 120_000 });
  process.stdout.write(`${first.stderr}\nexit code ${first.code}\n`);

  say('etcd-defragd once again: nothing left to reclaim');
  const again = await runCli(['once', '--config', cfg], { timeoutMs: 120_000 });
  process.stdout.write(`${again.stderr}\nexit code ${again.code}\n`);

  say(`daemons on ${m1.name} and ${m2.name}, started at the same instant: one member at a time`);
  const daemons = [m1, m2].map((m) => startDaemon(cluster, m, { ...demoConfig, schedule: { runOnStart: true } }));
  await Promise.all(daemons.map((d) => d.waitForLine(/run finished|run skipped/, 120_000)));
  for (const d of daemons) await d.kill('SIGTERM');
  for (const [i, d] of daemons.entries()) {
    process.stdout.write(`--- daemon on ${[m1, m2][i]!.name}\n${d.lines.map((l) => l.line).join('\n')}\n`);
  }
  say('etcd-defragd status');
  process.stdout.write((await runCli(['status', '--config', cfg])).stdout + '\n');
} finally {
  await cluster.stop();
  say('cluster stopped');
}
