// The version: set by the packaged build (scripts/package.ts defines __EDD_BUILD__), otherwise read
// from package.json beside dist/ and src/ alike.
import { readFileSync } from 'node:fs';

/** Set by the packaged build (scripts/package.ts); absent when run from source or dist/cli.js. */
declare const __EDD_BUILD__: { version: string; commit: string } | undefined;

const build = typeof __EDD_BUILD__ !== 'undefined' ? __EDD_BUILD__ : undefined;

export function version(): string {
  if (build) return build.version;
  try {
    const pkg = JSON.parse(readFileSync(new URL('../package.json', import.meta.url), 'utf8')) as { version: string };
    return pkg.version;
  } catch {
    return 'unknown';
  }
}

/** What --version prints: the version, the commit it was built from, and the Node.js inside. */
export function versionLine(): string {
  if (build) return `${build.version} (commit ${build.commit}, Node.js ${process.version})`;
  return `${version()} (commit unknown: not a packaged build, Node.js ${process.version})`;
}
