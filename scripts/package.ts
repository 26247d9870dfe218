// npm run package: one self-contained executable (Node's single executable application) and, from
// it, a .deb and an .rpm, all in dist/pkg/. See packaging/README.md.
//
//   1. esbuild bundles src/cli.ts and every dependency into one CommonJS file (SEA runs CommonJS).
//      etcd3 parses its .proto files from disk at require time; the bundle carries them instead as
//      protobufjs JSON, checked here to give the same gRPC package definition as the .proto files.
//   2. node --experimental-sea-config turns the bundle into a blob; postject injects it into a copy
//      of this node binary (stripped of its debug symbols first), after checking the SEA fuse.
//   3. packaging/build.sh wraps the executable, the unit, the config and the docs into .deb and .rpm
//      (--exe-only skips this step).
import { execFileSync } from 'node:child_process';
import { chmodSync, copyFileSync, existsSync, mkdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join, relative, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { build, type Plugin } from 'esbuild';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const outAt = process.argv.indexOf('--out');
// --out DIR: another output dir (the benchmark builds its own copy); --exe-only: no .deb/.rpm.
const out = outAt > 0 && process.argv[outAt + 1] ? resolve(process.argv[outAt + 1]!) : join(root, 'dist', 'pkg');
const work = join(out, 'build');
const exeOnly = process.argv.includes('--exe-only');
const require = createRequire(import.meta.url);

/** Written into the node binary, flipped by postject when a blob is injected. */
const SEA_FUSE = 'NODE_SEA_FUSE_fce680ab2cc467b6e072b8b5df1996b2';

function sh(cmd: string, args: string[], opts: { cwd?: string; env?: NodeJS.ProcessEnv } = {}): string {
  return execFileSync(cmd, args, {
    cwd: opts.cwd ?? root,
    env: opts.env ?? process.env,
    encoding: 'utf8',
    stdio: ['ignore', 'pipe', 'inherit'],
  }).trim();
}

function step(what: string): void {
  process.stdout.write(`== ${what}\n`);
}

function gitCommit(): string {
  if (process.env.ETCD_DEFRAGD_COMMIT) return process.env.ETCD_DEFRAGD_COMMIT;
  try {
    const id = sh('git', ['rev-parse', '--short=12', 'HEAD']);
    const dirty = sh('git', ['status', '--porcelain', '--untracked-files=no']) !== '';
    return dirty ? `${id}-dirty` : id;
  } catch {
    return 'unknown';
  }
}

/**
 * etcd3 calls proto-loader's loadSync on ../proto/rpc.proto when its connection pool module is
 * first required. Parse those files now and hand proto-loader the parsed tree (fromJSON) instead.
 */
function etcd3ProtoPlugin(): Plugin {
  const etcd3Dir = dirname(require.resolve('etcd3/package.json'));
  const protoFile = join(etcd3Dir, 'proto', 'rpc.proto');
  const loaderPath = require.resolve('@grpc/proto-loader');
  const loader = require(loaderPath) as typeof import('@grpc/proto-loader');
  const protobuf = createRequire(loaderPath)('protobufjs') as typeof import('protobufjs');
  const options = { keepCase: true, longs: String, enums: String, defaults: true, oneofs: true };
  const parsed = new protobuf.Root();
  parsed.loadSync(protoFile, { keepCase: true });
  const json = parsed.toJSON();
  // Same definition both ways, or the bundle would speak a different protocol than etcd3 does.
  const fromDisk = loader.loadSync(protoFile, options);
  const fromJson = loader.fromJSON(json, options);
  const shape = (d: Record<string, unknown>) =>
    JSON.stringify(d, (k, v: unknown) =>
      k === 'fileDescriptorProtos' || Buffer.isBuffer(v) ? undefined : typeof v === 'function' ? `fn:${(v as { name?: string }).name}` : v,
    );
  const services = Object.keys(fromDisk).filter((k) => k.startsWith('etcdserverpb.'));
  if (services.length < 5) throw new Error(`expected the etcd services in ${protoFile}, found ${services.join(', ')}`);
  if (shape(fromDisk) !== shape(fromJson))
    throw new Error(`the JSON form of ${protoFile} does not give the same package definition as the file`);
  return {
    name: 'etcd3-proto',
    setup(b) {
      b.onLoad({ filter: /[\\/]etcd3[\\/]lib[\\/]connection-pool\.js$/ }, (args) => {
        const src = readFileSync(args.path, 'utf8');
        const call = '(0, proto_loader_1.loadSync)(`${__dirname}/../proto/rpc.proto`, {';
        if (!src.includes(call))
          throw new Error(`${args.path}: the loadSync call of rpc.proto was not found; update scripts/package.ts for this etcd3 version`);
        return { contents: src.replace(call, `(0, proto_loader_1.fromJSON)(${JSON.stringify(json)}, {`), loader: 'js' };
      });
    },
  };
}

async function bundle(version: string, commit: string): Promise<string> {
  step('bundle (esbuild)');
  const file = join(work, 'etcd-defragd.cjs');
  const result = await build({
    entryPoints: [join(root, 'src', 'cli.ts')],
    outfile: file,
    bundle: true,
    platform: 'node',
    target: 'node20',
    format: 'cjs',
    minify: true,
    keepNames: true,
    legalComments: 'none',
    metafile: true,
    logLevel: 'warning',
    // ESM dependencies (node-cron) read import.meta.url at load time; in CommonJS it is this file.
    define: { 'import.meta.url': '__edd_import_meta_url', __EDD_BUILD__: JSON.stringify({ version, commit }) },
    banner: { js: 'var __edd_import_meta_url = require("node:url").pathToFileURL(__filename).href;' },
    plugins: [etcd3ProtoPlugin()],
  });
  writeFileSync(join(work, 'third-party-licenses.txt'), licenses(Object.keys(result.metafile.inputs)));
  return file;
}

/** The license text of every package that ended up in the bundle (they ship inside the executable). */
function licenses(inputs: string[]): string {
  const pkgDirs = new Set<string>();
  for (const input of inputs) {
    const m = input.match(/^(.*node_modules\/(?:@[^/]+\/)?[^/]+)\//);
    if (m) pkgDirs.add(join(root, m[1]!));
  }
  const parts: string[] = ['Packages bundled into /usr/bin/etcd-defragd, with their licenses.', ''];
  for (const dir of [...pkgDirs].sort()) {
    const pkg = JSON.parse(readFileSync(join(dir, 'package.json'), 'utf8')) as { name: string; version: string; license?: string };
    const file = ['LICENSE', 'LICENSE.md', 'LICENSE.txt', 'license', 'LICENCE', 'LICENSE-MIT']
      .map((f) => join(dir, f))
      .find((f) => existsSync(f));
    parts.push(
      `=== ${pkg.name} ${pkg.version} (${pkg.license ?? 'see text'})`,
      file ? readFileSync(file, 'utf8').trim() : `(no license file in the package; package.json says ${pkg.license ?? 'nothing'})`,
      '',
    );
  }
  return parts.join('\n');
}

function sea(bundleFile: string): string {
  step('single executable (node --experimental-sea-config, postject)');
  const node = process.execPath;
  const binary = readFileSync(node);
  const at = binary.indexOf(`${SEA_FUSE}:`);
  if (at < 0)
    throw new Error(
      `${node} (Node ${process.version}) has no single-executable fuse; build with a Node that supports SEA (20.x from nodejs.org or Debian/NodeSource packages)`,
    );
  if (binary.indexOf(`${SEA_FUSE}:`, at + 1) >= 0) throw new Error(`${node} carries the SEA fuse twice`);
  if (binary[at + SEA_FUSE.length + 1] !== 0x30) throw new Error(`${node} already has a blob injected (fuse is set)`);

  const blob = join(work, 'sea-prep.blob');
  const config = join(work, 'sea-config.json');
  writeFileSync(
    config,
    JSON.stringify({ main: bundleFile, output: blob, disableExperimentalSEAWarning: true, useCodeCache: false }, null, 2),
  );
  sh(node, ['--experimental-sea-config', config]);

  const exe = join(out, 'etcd-defragd');
  rmSync(exe, { force: true });
  copyFileSync(node, exe);
  chmodSync(exe, 0o755);
  // The node binary carries its debug info (about 100 MB with it); a service binary does not need it.
  try {
    sh('strip', ['--strip-debug', '--strip-unneeded', exe]);
  } catch {
    process.stdout.write('strip not found (binutils): the executable keeps its debug symbols\n');
  }
  const postject = join(dirname(require.resolve('postject/package.json')), 'dist', 'cli.js');
  // postject's ELF writer warns about every note section of the node binary; show that only on failure.
  try {
    execFileSync(node, [postject, exe, 'NODE_SEA_BLOB', blob, '--sentinel-fuse', SEA_FUSE], { encoding: 'utf8', stdio: 'pipe' });
  } catch (err) {
    const e = err as { stdout?: string; stderr?: string };
    throw new Error(`postject failed:\n${e.stdout ?? ''}${e.stderr ?? ''}`);
  }
  return exe;
}

function smokeTest(exe: string, version: string, commit: string): void {
  step('smoke test: --version with no node on PATH, from an empty directory');
  const cwd = join(work, 'empty');
  mkdirSync(cwd, { recursive: true });
  const got = sh(exe, ['--version'], { cwd, env: { PATH: '/nonexistent', LANG: 'C' } });
  const want = `etcd-defragd ${version} (commit ${commit}, Node.js ${process.version})`;
  if (got !== want) throw new Error(`${exe} --version printed "${got}", expected "${want}"`);
  process.stdout.write(`${got}\n`);
}

async function main(): Promise<void> {
  const pkg = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')) as { version: string };
  const commit = gitCommit();
  rmSync(out, { recursive: true, force: true });
  mkdirSync(work, { recursive: true });
  const bundleFile = await bundle(pkg.version, commit);
  const exe = sea(bundleFile);
  smokeTest(exe, pkg.version, commit);
  process.stdout.write(`${relative(root, exe)}: ${(statSync(exe).size / 2 ** 20).toFixed(1)} MiB\n`);
  if (exeOnly) return;
  step('.deb and .rpm (packaging/build.sh)');
  execFileSync('bash', [join(root, 'packaging', 'build.sh'), exe, pkg.version, commit, join(work, 'third-party-licenses.txt')], {
    cwd: root,
    stdio: 'inherit',
  });
}

main().catch((err: unknown) => {
  process.stderr.write(`package: ${err instanceof Error ? err.message : String(err)}\n`);
  process.exit(1);
});
