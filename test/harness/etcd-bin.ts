/**
 * Locating real etcd binaries for the test harness.
 *
 * The binaries come from Debian packages via scripts/fetch-etcd.sh, which caches them and prints
 * one directory per version (DIR/etcd, DIR/etcdctl). The script runs at most once per version per
 * process.
 */
import { execFile } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';

const execFileP = promisify(execFile);

export type EtcdVersion = '3.4' | '3.5';

export const ALL_VERSIONS: readonly EtcdVersion[] = ['3.4', '3.5'];

export interface EtcdBinaries {
  /** Absolute path of the etcd server binary. */
  etcd: string;
  /** Absolute path of etcdctl. */
  etcdctl: string;
  /** Full version as printed by `etcd --version`, e.g. "3.4.23". */
  version: string;
}

/** Repository root, resolved from this file (test/harness/etcd-bin.ts). */
export const REPO_ROOT = fileURLToPath(new URL('../../', import.meta.url)).replace(/\/$/, '');

export function isEtcdVersion(v: string): v is EtcdVersion {
  return (ALL_VERSIONS as readonly string[]).includes(v);
}

/** Versions to test, from env ETCD_VERSIONS (comma list such as "3.5" or "3.4,3.5"); default both. */
export function versionsUnderTest(): EtcdVersion[] {
  const raw = process.env.ETCD_VERSIONS?.trim();
  if (!raw) return [...ALL_VERSIONS];
  const out: EtcdVersion[] = [];
  for (const part of raw
    .split(',')
    .map((s) => s.trim())
    .filter(Boolean)) {
    if (!isEtcdVersion(part)) {
      throw new Error(`ETCD_VERSIONS: unknown etcd version '${part}' (accepted: ${ALL_VERSIONS.join(', ')})`);
    }
    if (!out.includes(part)) out.push(part);
  }
  if (out.length === 0) throw new Error(`ETCD_VERSIONS='${raw}' names no version`);
  return out;
}

const cache = new Map<EtcdVersion, Promise<EtcdBinaries>>();

/** Fetches (or finds cached) binaries for `v`. Memoized per process. */
export function etcdBinaries(v: EtcdVersion): Promise<EtcdBinaries> {
  if (!isEtcdVersion(v)) return Promise.reject(new Error(`unknown etcd version '${String(v)}'`));
  let p = cache.get(v);
  if (!p) {
    p = locate(v);
    cache.set(v, p);
    // A failed fetch (e.g. transient network error) should not be cached forever.
    p.catch(() => cache.delete(v));
  }
  return p;
}

async function locate(v: EtcdVersion): Promise<EtcdBinaries> {
  const script = `${REPO_ROOT}/scripts/fetch-etcd.sh`;
  let stdout: string;
  try {
    ({ stdout } = await execFileP('bash', [script, v], { maxBuffer: 16 * 1024 * 1024, timeout: 10 * 60_000 }));
  } catch (err) {
    const e = err as { stderr?: string; message: string };
    throw new Error(`fetching etcd ${v} with ${script} failed: ${e.message}\n${(e.stderr ?? '').slice(-2000)}`);
  }
  const dir = stdout.trim().split('\n').pop()?.trim();
  if (!dir) throw new Error(`${script} ${v} printed no directory`);
  const etcd = `${dir}/etcd`;
  const etcdctl = `${dir}/etcdctl`;
  const { stdout: verOut } = await execFileP(etcd, ['--version'], { env: etcdEnv() });
  const m = /etcd Version:\s*(\d+\.\d+\.\d+)/.exec(verOut);
  if (!m?.[1]) throw new Error(`cannot parse version from '${etcd} --version': ${verOut}`);
  if (!m[1].startsWith(`${v}.`)) throw new Error(`${etcd} is version ${m[1]}, expected ${v}.x`);
  return { etcd, etcdctl, version: m[1] };
}

/**
 * Environment for etcd/etcdctl children: the current environment without ETCD_* / ETCDCTL_*
 * variables (which etcd would read as flags), plus `extra`.
 */
export function etcdEnv(extra: Record<string, string> = {}): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const [k, val] of Object.entries(process.env)) {
    if (k.startsWith('ETCD_') || k.startsWith('ETCDCTL_')) continue;
    env[k] = val;
  }
  return { ...env, ...extra };
}

/** The ETCD_UNSUPPORTED_ARCH value etcd `version` needs on this machine, if any. */
export function unsupportedArch(version: EtcdVersion): string | undefined {
  const goArch: Record<string, string> = { x64: 'amd64', arm64: 'arm64', ppc64: 'ppc64le', s390x: 's390x', ia32: '386', arm: 'arm' };
  const a = goArch[process.arch] ?? process.arch;
  // etcd's checkSupportArch: 3.4 supports amd64 and ppc64le; 3.5 adds arm64 and s390x.
  const supported = version === '3.4' ? ['amd64', 'ppc64le'] : ['amd64', 'ppc64le', 'arm64', 's390x'];
  return supported.includes(a) ? undefined : a;
}
