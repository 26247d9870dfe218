// The TLS files (and password file) named in the config: staged for the sandboxed service, and
// watched so renewed certificates are used without a restart.
//
// The service runs as a dynamic user with no capabilities, so it cannot read kubeadm's root-only
// keys. systemd runs `etcd-defragd stage-tls` as root (ExecStartPre=+, ExecReload=+ and
// etcd-defragd-tls.timer): it reads the files the config names, wherever they are, and copies them
// into the service's runtime directory, readable only by the service. loadConfig() prefers those
// copies. The daemon compares the files' contents before each run and each alarm
// check (TlsWatch) and reconnects when they changed.
import { createHash } from 'node:crypto';
import { chmodSync, chownSync, mkdirSync, readFileSync, renameSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { createSecureContext } from 'node:tls';
import { CREDENTIALS, STAGED_SUBDIR, type Config } from './config.ts';
import { ConfigError } from './errors.ts';

/** The files a config reads for etcd access: credential name -> path (only the ones in use). */
export function tlsFiles(c: Config): Map<string, { key: string; path: string }> {
  const tls = c.etcd.endpoint.startsWith('https:');
  const out = new Map<string, { key: string; path: string }>();
  for (const [cred, key] of Object.entries(CREDENTIALS)) {
    const path = c.etcd[key] as string;
    if (!path || (key !== 'passwordFile' && !tls)) continue;
    out.set(cred, { key: `etcd.${key}`, path });
  }
  return out;
}

/** Throws when the client certificate and key do not belong together (e.g. half-way through a renewal). */
export function checkPair(cert: Buffer | undefined, key: Buffer | undefined, ca: Buffer | undefined): void {
  createSecureContext({ cert, key, ca });
}

export interface StageResult {
  /** Credential names whose copy was written because it was new or differed. */
  written: string[];
  /** Credential names whose copy was removed because the config no longer names a file. */
  removed: string[];
}

/**
 * Copies the files `config` names into `runtimeDir`/credentials, owned by the owner of
 * `runtimeDir` (the service's dynamic user) and readable by it only. Copies are replaced
 * atomically and only when the content differs. A missing or unreadable file, or a certificate
 * that does not match its key, throws a ConfigError and leaves the previous copies in place.
 */
export function stageTlsFiles(config: Config, runtimeDir: string, configPath: string | undefined): StageResult {
  const owner = statSync(runtimeDir);
  const dir = join(runtimeDir, STAGED_SUBDIR);
  const files = tlsFiles(config);
  const data = new Map<string, Buffer>();
  for (const [cred, f] of files) {
    try {
      data.set(cred, readFileSync(f.path));
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      throw new ConfigError(
        `${f.key}: ${JSON.stringify(f.path)} ${code === 'ENOENT' ? 'does not exist' : `cannot be read (${code})`} ` +
          `(${configPath ? `in ${configPath}` : 'the default'}); accepted: a readable file`,
      );
    }
  }
  if (data.has('etcd-cert') || data.has('etcd-key')) {
    try {
      checkPair(data.get('etcd-cert'), data.get('etcd-key'), data.get('etcd-ca'));
    } catch (err) {
      throw new ConfigError(
        `etcd.certFile and etcd.keyFile: ${files.get('etcd-cert')?.path} and ${files.get('etcd-key')?.path} ` +
          `are not a matching certificate and key (${(err as Error).message}); ` +
          'if they are being renewed right now, this is retried',
      );
    }
  }
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  chownSync(dir, owner.uid, owner.gid);
  chmodSync(dir, 0o700);
  const result: StageResult = { written: [], removed: [] };
  for (const [cred, content] of data) {
    const target = join(dir, cred);
    let same = false;
    try {
      same = readFileSync(target).equals(content);
    } catch {
      same = false;
    }
    if (same) continue;
    const tmp = `${target}.new`;
    writeFileSync(tmp, content, { mode: 0o400 });
    chownSync(tmp, owner.uid, owner.gid);
    chmodSync(tmp, 0o400);
    renameSync(tmp, target);
    result.written.push(cred);
  }
  for (const cred of Object.keys(CREDENTIALS)) {
    if (data.has(cred)) continue;
    try {
      statSync(join(dir, cred));
    } catch {
      continue;
    }
    rmSync(join(dir, cred), { force: true });
    result.removed.push(cred);
  }
  return result;
}

/**
 * Notices when the TLS files a config uses change on disk (a renewal, or a fresh staged copy).
 * `changed()` reads the few small files and compares a hash; it answers true once per change, and
 * only when the new certificate and key belong together, so a half-written renewal is picked up
 * at the next check rather than breaking the connections.
 */
export class TlsWatch {
  private last: string;

  constructor(private config: Config) {
    this.last = this.fingerprint() ?? '';
  }

  /** After a config reload: watch the new paths; true when what they hold differs from what is in use. */
  reset(config: Config): boolean {
    this.config = config;
    const now = this.fingerprint() ?? '';
    const changed = now !== this.last;
    this.last = now;
    return changed;
  }

  private fingerprint(): string | undefined {
    const files = tlsFiles(this.config);
    if (files.size === 0) return ''; // plain http and no password file: nothing to watch
    const h = createHash('sha256');
    const read = (cred: string): Buffer | undefined => {
      const f = files.get(cred);
      return f ? readFileSync(f.path) : undefined;
    };
    try {
      const ca = read('etcd-ca');
      const cert = read('etcd-cert');
      const key = read('etcd-key');
      const password = read('etcd-password');
      if (cert || key) checkPair(cert, key, ca);
      for (const b of [ca, cert, key, password]) h.update(b ? createHash('sha256').update(b).digest('hex') : '-').update('\n');
    } catch {
      return undefined; // missing, unreadable or mismatched for now: keep using what we have
    }
    return h.digest('hex');
  }

  changed(): boolean {
    const now = this.fingerprint();
    if (now === undefined || now === this.last) return false;
    this.last = now;
    return true;
  }
}
