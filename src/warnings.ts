// Node warns (DEP0123) when TLS is used with an IP address as server name, which is how etcd
// endpoints are written (https://127.0.0.1:2379); the warning is noise to operators.
// Not `--disable-warning=DEP0123`: that flag came with Node 20.11 (package.json allows 20.9), and the
// packaged etcd-defragd is a Node single-executable application started by systemd as
// /usr/bin/etcd-defragd (scripts/package.ts, systemd/etcd-defragd.service): it takes no node flags.
export function muteIpServernameWarning(): void {
  const emitWarning = process.emitWarning.bind(process);
  process.emitWarning = ((warning: string | Error, ...rest: unknown[]) => {
    const code = typeof rest[0] === 'object' && rest[0] ? (rest[0] as { code?: string }).code : rest[1];
    if (code === 'DEP0123') return;
    (emitWarning as (...a: unknown[]) => void)(warning, ...rest);
  }) as typeof process.emitWarning;
}
