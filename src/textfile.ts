// node_exporter's textfile collector: the etcd_defragd_* series written to a .prom file that the
// node exporter already running on every node (kube-prometheus) scrapes. The file is replaced
// atomically - a temp file in the same directory, then rename - so the collector never reads half
// of it; the temp name does not end in .prom, so the collector ignores it.
import { chmod, rename, rm, writeFile } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';

export async function writeTextfile(path: string, content: string): Promise<void> {
  const tmp = join(dirname(path), `.${basename(path)}.${process.pid}.tmp`);
  try {
    await writeFile(tmp, content);
    // node_exporter runs as another user; the unit's UMask=0077 would leave the file 0600.
    await chmod(tmp, 0o644);
    await rename(tmp, path);
  } catch (err) {
    await rm(tmp, { force: true }).catch(() => undefined);
    throw err;
  }
}
