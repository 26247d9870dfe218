// One etcd-defragd process per member at a time on this node, for the NOSPACE order. That order
// writes nothing to etcd, so etcd cannot tell apart two processes that defragment the same member
// (the daemon, and an operator's `once` on the same node): they agree here instead.
//
// The lock is a directory created with mkdir (atomic), holding the owner's pid. A lock whose owner
// is gone (a killed process) is taken over. It lives in /run/etcd-defragd (the unit's runtime
// directory, where both the service and root can write) or, where that does not exist, the
// system's temporary directory.
import { existsSync } from 'node:fs';
import { mkdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

/** Takes the lock of `member` (hex ID); resolves to its release, or to undefined while another live process holds it. */
export type NodeLock = (member: string) => Promise<(() => Promise<void>) | undefined>;

export function lockDirectory(): string {
  return existsSync('/run/etcd-defragd') ? '/run/etcd-defragd' : join(tmpdir(), 'etcd-defragd');
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    // EPERM: the process exists, under another user (the service and root's `once`).
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** A lock without its pid file is being taken right now, unless it is older than a minute (its taker died). */
async function young(path: string): Promise<boolean> {
  const s = await stat(path).catch(() => undefined);
  return s !== undefined && Date.now() - s.mtimeMs < 60_000;
}

export function fileLock(dir = lockDirectory()): NodeLock {
  return async (member) => {
    const path = join(dir, `nospace-${member.replace(/[^0-9a-f]/g, '')}.lock`);
    await mkdir(dir, { recursive: true, mode: 0o755 });
    for (let attempt = 0; attempt < 2; attempt++) {
      try {
        await mkdir(path, { mode: 0o700 });
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
        const pid = Number(await readFile(join(path, 'pid'), 'utf8').catch(() => ''));
        if (pid > 0 ? alive(pid) : await young(path)) return undefined;
        await rm(path, { recursive: true, force: true });
        continue;
      }
      await writeFile(join(path, 'pid'), String(process.pid), { flag: 'wx', mode: 0o644 });
      return () => rm(path, { recursive: true, force: true });
    }
    return undefined;
  };
}

/** The same lock for the processes of a simulated cluster (the model tests): `alive` tells whether the taker still runs. */
export function memoryLock(held: Map<string, () => boolean>, alive: () => boolean): NodeLock {
  return async (member) => {
    const holder = held.get(member);
    if (holder?.()) return undefined;
    held.set(member, alive);
    return async () => {
      if (held.get(member) === alive) held.delete(member);
    };
  };
}
