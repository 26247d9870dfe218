// node_exporter's textfile collector: the etcd_defragd_* series written to a .prom file that the
// node exporter already running on every node (kube-prometheus) scrapes. The file is replaced
// atomically - a temp file in the same directory, then rename - so the collector never reads half
// of it; the temp name does not end in .prom, so the collector ignores it.
//
// The directory is shared with the collector's group (docs/operations.md), so the temp name is
// random and created exclusively, never through a link someone else left there (O_EXCL|O_NOFOLLOW);
// rename then replaces whatever sits at the final name, a link itself and not its target.
//
// A clean stop removes the file (removeTextfile): node_exporter then stops exporting the series,
// and a file that stops changing can only mean a daemon that died or hangs.
import { randomBytes } from 'node:crypto';
import { constants as fsConstants } from 'node:fs';
import { open, rename, rm } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';

const { O_WRONLY, O_CREAT, O_EXCL, O_NOFOLLOW } = fsConstants;

export async function writeTextfile(path: string, content: string): Promise<void> {
  const tmp = join(dirname(path), `.${basename(path)}.${randomBytes(8).toString('hex')}.tmp`);
  const fh = await open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW, 0o644);
  try {
    try {
      await fh.writeFile(content);
      // node_exporter runs as another user; the unit's UMask=0077 would leave the file 0600.
      await fh.chmod(0o644);
    } finally {
      await fh.close();
    }
    await rename(tmp, path);
  } catch (err) {
    // Ours (the open above created it): gone, so the directory does not fill with temp files.
    await rm(tmp, { force: true }).catch(() => undefined);
    throw err;
  }
}

/** Removes the file (a link at its name, not the link's target); a file already gone is fine. */
export async function removeTextfile(path: string): Promise<void> {
  await rm(path, { force: true });
}
