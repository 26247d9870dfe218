// Who may decide what etcd-defragd does with its root-level rights: the files it takes orders from
// (owner and mode, as sshd's StrictModes checks them) and the person at the terminal (the real uid,
// and sudo's SUDO_UID as a claim). Root runs every command in the docs, so a config or password file
// that another user can write would hand that user the daemon's etcd credentials and root's reads.
import { closeSync, fstatSync, openSync, readFileSync } from 'node:fs';
import { ConfigError } from './errors.ts';

/** The name of a uid from /etc/passwd, or undefined (no NSS here: enough for a message). */
export function userName(uid: number, passwd = '/etc/passwd'): string | undefined {
  try {
    for (const line of readFileSync(passwd, 'utf8').split('\n')) {
      const f = line.split(':');
      if (f.length > 2 && f[2] === String(uid)) return f[0];
    }
  } catch {
    // no /etc/passwd (a minimal container): numbers only
  }
  return undefined;
}

const who = (uid: number) => {
  const name = userName(uid);
  return name ? `${name} (uid ${uid})` : `uid ${uid}`;
};

/**
 * Reads a file that tells etcd-defragd what to do (the config, the etcd password). It must belong to
 * root or to the user running etcd-defragd, and neither its group nor others may write it. The
 * checks are made on the open file (fstat), so a file swapped after the check is not read instead.
 * Other errors (ENOENT, EACCES, EISDIR) are thrown as they are, for the caller's own message.
 *
 * @param what how the message names the file, e.g. `config file` or `etcd.passwordFile:`
 */
export function readTrustedFile(what: string, path: string, uid = process.geteuid?.() ?? 0): Buffer {
  const fd = openSync(path, 'r');
  try {
    const st = fstatSync(fd);
    const mode = `0${(st.mode & 0o7777).toString(8)}`;
    if (st.uid !== 0 && st.uid !== uid) {
      const allowed = uid === 0 ? 'root' : `root or ${who(uid)}, who runs etcd-defragd`;
      throw new ConfigError(
        `${what} ${path} is owned by ${who(st.uid)} (mode ${mode}), not by ${allowed}: ` +
          `its owner could change what etcd-defragd does; fix: chown ${uid === 0 ? 'root' : uid} ${path}`,
      );
    }
    if (st.mode & 0o022) {
      const by = st.mode & 0o002 ? (st.mode & 0o020 ? 'group- and world-writable' : 'world-writable') : 'group-writable';
      throw new ConfigError(
        `${what} ${path} is ${by} (mode ${mode}, owner ${who(st.uid)}): ` +
          `another user could change what etcd-defragd does; fix: chmod go-w ${path}`,
      );
    }
    return readFileSync(fd);
  } finally {
    closeSync(fd);
  }
}
