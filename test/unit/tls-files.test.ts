// stage-tls copies (src/tls-files.ts): what is copied, with which owner and mode, and when not.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import {
  chmodSync,
  chownSync,
  copyFileSync,
  lstatSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  rmSync,
  statSync,
  symlinkSync,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { loadConfig } from '../../src/config.ts';
import { ConfigError } from '../../src/errors.ts';
import { stageTlsFiles, TlsWatch } from '../../src/tls-files.ts';
import { makePki, type Pki } from '../harness/pki.ts';

describe('stage-tls and the TLS watch', () => {
  let dir: string;
  let pki: Pki;
  let src: string;
  before(async () => {
    dir = mkdtempSync(join(tmpdir(), 'edd-tls-'));
    pki = await makePki(join(dir, 'pki'));
    // Another operator's layout (rke2-like names), as config.yaml would name it.
    src = join(dir, 'tls');
    mkdirSync(src);
    copyFileSync(pki.caFile, join(src, 'server-ca.crt'));
    copyFileSync(pki.clientCertFile, join(src, 'client.crt'));
    copyFileSync(pki.clientKeyFile, join(src, 'client.key'));
  });
  after(() => rmSync(dir, { recursive: true, force: true }));

  const config = (extra = '') => {
    const file = join(dir, 'config.yaml');
    writeFileSync(file, `etcd:\n  caFile: ${src}/server-ca.crt\n  certFile: ${src}/client.crt\n  keyFile: ${src}/client.key\n${extra}`);
    return loadConfig({ path: file, env: {} });
  };

  it('copies the configured files, readable by the runtime directory owner only, and the config then prefers them', () => {
    const rt = mkdtempSync(join(dir, 'run-'));
    const r = stageTlsFiles(config().config, rt, 'config.yaml');
    assert.deepEqual(r.written.sort(), ['etcd-ca', 'etcd-cert', 'etcd-key']);
    for (const cred of r.written) {
      const st = statSync(join(rt, 'credentials', cred));
      assert.equal(st.mode & 0o777, 0o400, cred);
      assert.equal(st.uid, statSync(rt).uid);
    }
    assert.equal(statSync(join(rt, 'credentials')).mode & 0o777, 0o700);
    assert.deepEqual(readFileSync(join(rt, 'credentials', 'etcd-key')), readFileSync(pki.clientKeyFile));
    const loaded = loadConfig({ path: join(dir, 'config.yaml'), env: { RUNTIME_DIRECTORY: rt } });
    assert.equal(loaded.config.etcd.keyFile, join(rt, 'credentials', 'etcd-key'));
    assert.match(loaded.sources['etcd.keyFile']!.detail!, /stage-tls/);
    // Nothing changed: nothing rewritten.
    assert.deepEqual(stageTlsFiles(config().config, rt, 'config.yaml'), { written: [], removed: [], replaced: [] });
  });

  it('a missing file names the key and the path, and keeps the previous copies', () => {
    const rt = mkdtempSync(join(dir, 'run-'));
    stageTlsFiles(config().config, rt, 'config.yaml');
    const c = config().config;
    const broken = { ...c, etcd: { ...c.etcd, keyFile: join(src, 'missing.key') } };
    assert.throws(
      () => stageTlsFiles(broken, rt, 'config.yaml'),
      (e: unknown) => e instanceof ConfigError && /etcd\.keyFile: ".*missing\.key" does not exist \(in config\.yaml\)/.test(e.message),
    );
    assert.deepEqual(readFileSync(join(rt, 'credentials', 'etcd-key')), readFileSync(pki.clientKeyFile));
  });

  it('refuses a certificate with the wrong key (a renewal half-way) and stages nothing', () => {
    const rt = mkdtempSync(join(dir, 'run-'));
    const c = config().config;
    const mixed = { ...c, etcd: { ...c.etcd, keyFile: pki.otherClientKeyFile } };
    assert.throws(() => stageTlsFiles(mixed, rt, 'config.yaml'), /not a matching certificate and key/);
    assert.throws(() => statSync(join(rt, 'credentials', 'etcd-cert')));
  });

  it('copies a password only from a file others cannot write', () => {
    const rt = mkdtempSync(join(dir, 'run-'));
    const pw = join(dir, 'etcd-password');
    writeFileSync(pw, 'secret\n');
    chmodSync(pw, 0o660);
    const file = join(dir, 'pw.yaml');
    writeFileSync(file, `etcd:\n  endpoint: http://127.0.0.1:2379\n  username: root\n  passwordFile: ${pw}\n`);
    // As stage-tls loads it: the files are checked when copied, not before.
    const c = loadConfig({ path: file, env: {}, checkFiles: false }).config;
    assert.throws(
      () => stageTlsFiles(c, rt, file),
      (e: unknown) => e instanceof ConfigError && e.message.startsWith(`etcd.passwordFile in ${file}: ${pw} is group-writable (mode 0660`),
    );
    assert.throws(() => statSync(join(rt, 'credentials', 'etcd-password')), 'nothing copied');
    chmodSync(pw, 0o600);
    assert.deepEqual(stageTlsFiles(c, rt, file).written, ['etcd-password']);
  });

  it('removes a copy the config no longer names (plain http endpoint)', () => {
    const rt = mkdtempSync(join(dir, 'run-'));
    stageTlsFiles(config().config, rt, 'config.yaml');
    const r = stageTlsFiles(config('  endpoint: http://127.0.0.1:2379\n').config, rt, 'config.yaml');
    assert.deepEqual(r.removed.sort(), ['etcd-ca', 'etcd-cert', 'etcd-key']);
  });

  // Issue 20, point 1: stage-tls runs as root in a folder the service's user owns. Whatever links
  // that user plants there, root must not write, chown or chmod anything outside it.
  describe('links planted by the service user', { skip: process.getuid?.() !== 0 && 'needs root (chown to another uid)' }, () => {
    const SERVICE_UID = 4242;
    /** A root-owned file and folder outside the runtime folder, and how they look now. */
    const victims = () => {
      const out = mkdtempSync(join(dir, 'outside-'));
      const file = join(out, 'db');
      writeFileSync(file, 'the etcd database\n', { mode: 0o640 });
      const folder = join(out, 'etc');
      mkdirSync(folder, { mode: 0o755 });
      writeFileSync(join(folder, 'etcd-key'), 'not yours\n', { mode: 0o644 });
      const look = () =>
        [file, folder, join(folder, 'etcd-key')].map((f) => {
          const st = lstatSync(f);
          return { f, uid: st.uid, gid: st.gid, mode: st.mode, content: st.isFile() ? readFileSync(f, 'utf8') : readdirSync(f).join(',') };
        });
      return { file, folder, look };
    };
    /** A runtime folder owned by the "service user", as systemd's RuntimeDirectory= makes it. */
    const runtimeDir = () => {
      const rt = mkdtempSync(join(dir, 'run-'));
      chownSync(rt, SERVICE_UID, SERVICE_UID);
      return rt;
    };
    const assertStaged = (rt: string) => {
      const creds = join(rt, 'credentials');
      const st = lstatSync(creds);
      assert.ok(st.isDirectory() && !st.isSymbolicLink(), 'credentials is a plain folder again');
      assert.equal(st.uid, SERVICE_UID);
      assert.equal(st.mode & 0o777, 0o700);
      for (const cred of ['etcd-ca', 'etcd-cert', 'etcd-key']) {
        const f = lstatSync(join(creds, cred));
        assert.ok(f.isFile(), `${cred} is a plain file`);
        assert.equal(f.uid, SERVICE_UID, cred);
        assert.equal(f.mode & 0o777, 0o400, cred);
      }
      assert.deepEqual(readFileSync(join(creds, 'etcd-key')), readFileSync(pki.clientKeyFile));
      assert.deepEqual(readdirSync(creds).sort(), ['etcd-ca', 'etcd-cert', 'etcd-key'], 'no temp file left behind');
    };

    it('links inside credentials/ (the old temp name, the copy itself, a FIFO) are replaced, never followed', () => {
      const v = victims();
      const before = v.look();
      const rt = runtimeDir();
      const creds = join(rt, 'credentials');
      mkdirSync(creds, { mode: 0o700 });
      chownSync(creds, SERVICE_UID, SERVICE_UID);
      symlinkSync(v.file, join(creds, 'etcd-key.new')); // the temp name root used to write through
      symlinkSync(v.file, join(creds, 'etcd-key')); // read to compare, then replaced
      symlinkSync(v.folder, join(creds, 'etcd-ca'));
      execFileSync('mkfifo', [join(creds, 'etcd-cert')]); // a read would block forever
      const r = stageTlsFiles(config().config, rt, 'config.yaml');
      assert.deepEqual(r.written.sort(), ['etcd-ca', 'etcd-cert', 'etcd-key']);
      assert.deepEqual(v.look(), before, 'nothing outside the runtime folder changed (content, owner, mode)');
      rmSync(join(creds, 'etcd-key.new')); // the planted link is left alone (it points outside)
      assertStaged(rt);
    });

    it('credentials itself replaced by a link (to a folder, or to a file) is removed and made again', () => {
      for (const target of ['folder', 'file'] as const) {
        const v = victims();
        const before = v.look();
        const rt = runtimeDir();
        symlinkSync(target === 'folder' ? v.folder : v.file, join(rt, 'credentials'));
        const r = stageTlsFiles(config().config, rt, 'config.yaml');
        assert.deepEqual(r.replaced, ['credentials'], target);
        assert.deepEqual(v.look(), before, `nothing outside changed (credentials -> ${target})`);
        assertStaged(rt);
      }
    });

    it('a runtime folder that is itself a link is refused with exit 78 material', () => {
      const v = victims();
      const before = v.look();
      const link = join(dir, `rt-link-${process.pid}`);
      symlinkSync(v.folder, link);
      assert.throws(
        () => stageTlsFiles(config().config, link, 'config.yaml'),
        (e: unknown) => e instanceof ConfigError && /--runtime-dir ".*" is a symbolic link/.test(e.message),
      );
      assert.deepEqual(v.look(), before);
    });
  });

  it('a reload copies through the sandboxed etcd-defragd-tls.service, never as full root', () => {
    const unit = (name: string) => readFileSync(join(import.meta.dirname, '../../systemd', name), 'utf8');
    const main = unit('etcd-defragd.service');
    const reloads = main.split('\n').filter((l) => l.startsWith('ExecReload='));
    assert.deepEqual(reloads, ['ExecReload=+/usr/bin/systemctl start etcd-defragd-tls.service', 'ExecReload=/bin/kill -HUP $MAINPID']);
    // The only full-root copy left is the one before the start, into a runtime folder systemd just made.
    assert.deepEqual(
      main.split('\n').filter((l) => /^Exec\w+=\+.*stage-tls/.test(l)),
      ['ExecStartPre=+/usr/bin/etcd-defragd stage-tls --config /etc/etcd-defragd/config.yaml'],
    );
    const copy = unit('etcd-defragd-tls.service');
    assert.match(copy, /^ProtectSystem=strict$/m);
    assert.match(copy, /^ReadWritePaths=-\/run\/etcd-defragd$/m);
    assert.match(copy, /^ExecStart=\/usr\/bin\/etcd-defragd stage-tls .*--runtime-dir \/run\/etcd-defragd$/m);
  });

  it('TlsWatch sees a renewed pair once, and ignores a half-written one', () => {
    const w = join(dir, 'watch');
    mkdirSync(w);
    for (const f of ['server-ca.crt', 'client.crt', 'client.key']) copyFileSync(join(src, f), join(w, f));
    const file = join(dir, 'watch.yaml');
    writeFileSync(file, `etcd:\n  caFile: ${w}/server-ca.crt\n  certFile: ${w}/client.crt\n  keyFile: ${w}/client.key\n`);
    const watch = new TlsWatch(loadConfig({ path: file, env: {} }).config);
    assert.equal(watch.changed(), false);
    copyFileSync(pki.otherClientCertFile, join(w, 'client.crt')); // the key is not written yet
    assert.equal(watch.changed(), false, 'a certificate without its key is not taken');
    copyFileSync(pki.otherClientKeyFile, join(w, 'client.key'));
    assert.equal(watch.changed(), true);
    assert.equal(watch.changed(), false, 'one change is reported once');
  });
});
