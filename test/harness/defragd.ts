// Config files and processes of etcd-defragd for a member of a test cluster.
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { stringify } from 'yaml';
import type { Cluster } from './cluster.ts';
import type { Member } from './member.ts';
import { spawnCli, runCli, type CliProcess, type RunResult } from './proc.ts';

export type Overrides = Record<string, Record<string, unknown>>;

/** The etcd section that points a daemon at `member`: endpoint, TLS files, data dir. */
export function memberEtcd(cluster: Cluster, member: Member): Record<string, unknown> {
  return {
    endpoint: member.clientUrl,
    caFile: cluster.pki?.caFile ?? '',
    certFile: cluster.pki?.clientCertFile ?? '',
    keyFile: cluster.pki?.clientKeyFile ?? '',
    dataDir: member.dataDir,
  };
}

/** A config file for the daemon of `member`, fast settings for tests, with per-section overrides. */
export function writeConfig(cluster: Cluster, member: Member, overrides: Overrides = {}, name = `defragd-${member.name}.yaml`): string {
  const base: Overrides = {
    etcd: { ...memberEtcd(cluster, member), requestTimeout: '2s', defragTimeout: '2m' },
    policy: { minReclaimable: '4MiB', freeDiskMargin: '16MiB' },
    coordination: { leaseTTL: '5s', settle: '1s', maxWait: '2m' },
    retry: { attempts: 3, minDelay: '200ms', maxDelay: '1s' },
    metrics: { listen: '' },
    log: { format: 'json', level: 'info' },
  };
  return writeConfigFile(cluster, name, base, overrides);
}

/**
 * The config a new operator writes: the etcd section (endpoint, TLS files, data dir) and nothing
 * else but what a test must set (no metrics port clash, JSON logs to parse, extra sections given).
 */
export function writeMinimalConfig(cluster: Cluster, member: Member, extra: Overrides = {}, name = `minimal-${member.name}.yaml`): string {
  return writeConfigFile(cluster, name, { etcd: memberEtcd(cluster, member), metrics: { listen: '' }, log: { format: 'json' } }, extra);
}

/** Writes `base` with `overrides` merged in section by section as the YAML config file `name` in the cluster dir. */
export function writeConfigFile(cluster: Cluster, name: string, base: Overrides, overrides: Overrides = {}): string {
  const merged: Overrides = { ...base };
  for (const [section, keys] of Object.entries(overrides)) merged[section] = { ...(merged[section] ?? {}), ...keys };
  const path = join(cluster.dir, name);
  writeFileSync(path, stringify(merged));
  return path;
}

export function once(
  cluster: Cluster,
  member: Member,
  args: string[] = [],
  overrides: Overrides = {},
  timeoutMs = 120_000,
): Promise<RunResult> {
  return runCli(['once', '--config', writeConfig(cluster, member, overrides), ...args], { timeoutMs });
}

export function startDaemon(
  cluster: Cluster,
  member: Member,
  overrides: Overrides = {},
  env: Record<string, string | undefined> = {},
): CliProcess {
  return spawnCli(['run', '--config', writeConfig(cluster, member, overrides)], { env });
}

export interface LogLine {
  level: number;
  event?: string;
  msg: string;
  member?: string;
  time: number;
  [k: string]: unknown;
}

export function events(p: CliProcess | string, event?: string): LogLine[] {
  const lines =
    typeof p === 'string'
      ? p.split('\n').flatMap((l) => {
          try {
            return [JSON.parse(l) as LogLine];
          } catch {
            return [];
          }
        })
      : p.jsonLines<LogLine>();
  return event ? lines.filter((l) => l.event === event) : lines;
}
