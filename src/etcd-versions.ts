// etcd versions with known trouble for a defragmenting daemon, by release line. Each note names the
// fix release and what etcd-defragd does about it; shown at start, in `status` and as a metric label.
// Sources: ../shared/etcd-facts.md (read from etcd's source at those tags) and etcd's changelogs.

export interface VersionNote {
  id: 'txn-nospace' | 'kill-mid-defrag' | 'defrag-panic' | 'snapshot-race';
  /** First fixed release per line ("3.4" -> "3.4.20"); a line without an entry is not affected. */
  fixedIn: Partial<Record<'3.4' | '3.5' | '3.6', string>>;
  what: string;
}

export const VERSION_NOTES: readonly VersionNote[] = [
  {
    id: 'txn-nospace',
    fixedIn: { '3.4': '3.4.20', '3.5': '3.5.7' },
    what:
      'refuses even a delete-only or read-only Txn on a member whose db is at its quota (no cost-0 pass-through in BackendQuota): ' +
      'etcd-defragd works around it during NOSPACE (plain deletes, lease revoke, the NOSPACE order writes nothing)',
  },
  {
    id: 'kill-mid-defrag',
    fixedIn: { '3.5': '3.5.6' },
    what:
      'a member killed in the middle of a defragment can come back with inconsistent revisions (etcd issue 14749): ' +
      "keep each defragment within kubelet's liveness budget",
  },
  {
    id: 'defrag-panic',
    fixedIn: { '3.4': '3.4.35', '3.5': '3.5.17' },
    what: 'a defragment that fails (for example on a full disk) panics the member (etcd issue 18810): keep policy.freeDiskMargin',
  },
  {
    id: 'snapshot-race',
    fixedIn: { '3.4': '3.4.38', '3.5': '3.5.23', '3.6': '3.6.5' },
    what: 'a snapshot applied while the member defragments can corrupt its backend: upgrade etcd',
  },
];

function parse(version: string): [number, number, number] | undefined {
  const m = /^v?(\d+)\.(\d+)\.(\d+)/.exec(String(version ?? '').trim());
  return m ? [Number(m[1]), Number(m[2]), Number(m[3])] : undefined;
}

/** The notes that apply to an etcd server version (e.g. "3.5.6"); none for a version it cannot parse. */
export function versionNotes(version: string): VersionNote[] {
  const v = parse(version);
  if (!v) return [];
  const line = `${v[0]}.${v[1]}` as keyof VersionNote['fixedIn'];
  return VERSION_NOTES.filter((n) => {
    const fixed = n.fixedIn[line] === undefined ? undefined : parse(n.fixedIn[line]);
    return fixed !== undefined && v[2] < fixed[2];
  });
}

/** One line per note, for the log and `status`. */
export function describeVersionNotes(member: string, version: string): string[] {
  return versionNotes(version).map(
    (n) => `member ${member} runs etcd ${version}, which (fixed in ${n.fixedIn[lineOf(version)]}) ${n.what}`,
  );
}

function lineOf(version: string): keyof VersionNote['fixedIn'] {
  const v = parse(version)!;
  return `${v[0]}.${v[1]}` as keyof VersionNote['fixedIn'];
}
