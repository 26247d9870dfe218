// The TLS files (and password file) named in the config: staged for the sandboxed service, and
// watched so renewed certificates are used without a restart.
//
// The service runs as a dynamic user with no capabilities, so it cannot read kubeadm's root-only
// keys. systemd runs `etcd-defragd stage-tls` as root (ExecStartPre=+, and etcd-defragd-tls.service
// from its timer and from `systemctl reload`): it reads the files the config names, wherever they are, and copies them
// into the service's runtime directory, readable only by the service. loadConfig() prefers those
// copies. The daemon compares the files' contents before each run and each alarm
// check (TlsWatch) and reconnects when they changed.
import { createHash, randomBytes } from 'node:crypto';
import {
  closeSync,
  constants as fsConstants,
  fchmodSync,
  fchownSync,
  fstatSync,
  lstatSync,
  mkdirSync,
  openSync,
  readFileSync,
  renameSync,
  unlinkSync,
  writeFileSync,
} from 'node:fs';
import { createSecureContext } from 'node:tls';
import { CREDENTIALS, STAGED_SUBDIR, type Config } from './config.ts';
import { ConfigError } from './errors.ts';
import { readTrustedFile } from './trust.ts';

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
  /** What stood where a plain folder or file belonged and was removed (a link, a file, a FIFO), by name. */
  replaced: string[];
}

const { O_RDONLY, O_WRONLY, O_CREAT, O_EXCL, O_NOFOLLOW, O_DIRECTORY, O_NONBLOCK } = fsConstants;

/** Larger than any certificate bundle; a bigger "copy" is not ours and is replaced unread. */
const MAX_COPY = 1024 * 1024;

/**
 * A name inside a folder opened by fd. The kernel resolves /proc/self/fd/N to the opened folder
 * itself, not to a path, so this is openat(2) for Node: renaming or replacing a folder on the way
 * afterwards does not redirect us.
 */
const at = (dirFd: number, name: string): string => `/proc/self/fd/${dirFd}/${name}`;

function errnoOf(err: unknown): string | undefined {
  return (err as NodeJS.ErrnoException).code;
}

/** Opens a folder without following a link at its last component (ELOOP or ENOTDIR otherwise). */
function openDir(path: string): number {
  return openSync(path, O_RDONLY | O_DIRECTORY | O_NOFOLLOW);
}

/**
 * The credentials folder inside the runtime folder, opened. The service's user owns the runtime
 * folder, so it can put anything there: only a plain folder is used; a link (to /etc, say), a file
 * or a FIFO in its place is removed (unlink never follows a link) and a fresh folder made. Owner
 * and mode are set through the descriptor, so they land on the folder we opened and nowhere else.
 */
function openCredentialsDir(rt: number, owner: { uid: number; gid: number }, replaced: string[]): number {
  const path = at(rt, STAGED_SUBDIR);
  for (let attempt = 0; ; attempt++) {
    let st;
    try {
      st = lstatSync(path);
    } catch (err) {
      if (errnoOf(err) !== 'ENOENT') throw err;
    }
    if (st && !st.isDirectory()) {
      unlinkSync(path);
      replaced.push(STAGED_SUBDIR);
      st = undefined;
    }
    if (!st) {
      try {
        mkdirSync(path, { mode: 0o700 });
      } catch (err) {
        if (errnoOf(err) !== 'EEXIST') throw err;
      }
    }
    let fd: number;
    try {
      fd = openDir(path);
    } catch (err) {
      // Swapped for a link or a file between our look and our open: look again, a few times.
      if ((errnoOf(err) === 'ELOOP' || errnoOf(err) === 'ENOTDIR' || errnoOf(err) === 'ENOENT') && attempt < 5) continue;
      throw err;
    }
    fchownSync(fd, owner.uid, owner.gid);
    fchmodSync(fd, 0o700);
    return fd;
  }
}

/** The current copy's content if it is a plain file of sane size; never follows a link, never blocks on a FIFO. */
function readCopy(dir: number, name: string): Buffer | undefined {
  let fd: number;
  try {
    fd = openSync(at(dir, name), O_RDONLY | O_NOFOLLOW | O_NONBLOCK);
  } catch {
    return undefined; // missing, or a link (ELOOP): replaced below by rename, which never follows it
  }
  try {
    const st = fstatSync(fd);
    if (!st.isFile() || st.size > MAX_COPY) return undefined;
    return readFileSync(fd);
  } finally {
    closeSync(fd);
  }
}

/**
 * Writes `content` as `name` in the folder: a new file under a random name, created exclusively
 * and without following a link (O_CREAT|O_EXCL|O_NOFOLLOW), owned and moded through its
 * descriptor, then renamed over `name` (rename replaces a link itself, not what it points to).
 */
function writeCopy(dir: number, name: string, content: Buffer, owner: { uid: number; gid: number }): void {
  const tmp = `.${name}.${randomBytes(8).toString('hex')}.tmp`;
  const fd = openSync(at(dir, tmp), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW, 0o400);
  try {
    try {
      writeFileSync(fd, content);
      fchownSync(fd, owner.uid, owner.gid);
      fchmodSync(fd, 0o400);
    } finally {
      closeSync(fd);
    }
    renameSync(at(dir, tmp), at(dir, name));
  } catch (err) {
    try {
      unlinkSync(at(dir, tmp));
    } catch {
      // already renamed, or never created
    }
    throw err;
  }
}

/**
 * Copies the files `config` names into `runtimeDir`/credentials, owned by the owner of
 * `runtimeDir` (the service's dynamic user) and readable by it only. Copies are replaced
 * atomically and only when the content differs. A missing or unreadable file, or a certificate
 * that does not match its key, throws a ConfigError and leaves the previous copies in place.
 *
 * This runs as root (ExecStartPre=+, the timer's service), in a folder the service's user owns
 * and can fill with links. So nothing below follows a link there: see openCredentialsDir and
 * writeCopy, and test/unit/tls-files.test.ts for the links it is tested against.
 */
export function stageTlsFiles(config: Config, runtimeDir: string, configPath: string | undefined): StageResult {
  const files = tlsFiles(config);
  const data = new Map<string, Buffer>();
  for (const [cred, f] of files) {
    try {
      // The password decides what the service may do in etcd: only from a file others cannot write.
      data.set(
        cred,
        cred === 'etcd-password'
          ? readTrustedFile(`${f.key} ${configPath ? `in ${configPath}` : '(default)'}:`, f.path)
          : readFileSync(f.path),
      );
    } catch (err) {
      if (err instanceof ConfigError) throw err;
      const code = errnoOf(err);
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
  let rt: number;
  try {
    rt = openDir(runtimeDir);
  } catch (err) {
    // O_DIRECTORY|O_NOFOLLOW on a link fails ENOTDIR on Linux: lstat says which it was.
    const link = (() => {
      try {
        return lstatSync(runtimeDir).isSymbolicLink();
      } catch {
        return false;
      }
    })();
    const code = errnoOf(err);
    const what = link ? 'is a symbolic link' : code === 'ENOTDIR' ? 'is not a folder' : `cannot be opened (${code})`;
    throw new ConfigError(
      `--runtime-dir ${JSON.stringify(runtimeDir)} ${what}; ` +
        "accepted: the service's runtime folder itself (systemd's RuntimeDirectory=, /run/etcd-defragd)",
    );
  }
  const result: StageResult = { written: [], removed: [], replaced: [] };
  try {
    const owner = fstatSync(rt);
    const dir = openCredentialsDir(rt, owner, result.replaced);
    try {
      for (const [cred, content] of data) {
        const current = readCopy(dir, cred);
        if (current?.equals(content)) continue;
        writeCopy(dir, cred, content, owner);
        result.written.push(cred);
      }
      for (const cred of Object.keys(CREDENTIALS)) {
        if (data.has(cred)) continue;
        try {
          unlinkSync(at(dir, cred)); // unlink removes a link itself, never its target
        } catch (err) {
          if (errnoOf(err) === 'ENOENT') continue;
          throw err;
        }
        result.removed.push(cred);
      }
    } finally {
      closeSync(dir);
    }
  } finally {
    closeSync(rt);
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
