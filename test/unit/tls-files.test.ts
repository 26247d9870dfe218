// stage-tls copies (src/tls-files.ts): what is copied, with which owner and mode, and when not.
import assert from 'node:assert/strict';
import { copyFileSync, mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
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
    assert.deepEqual(stageTlsFiles(config().config, rt, 'config.yaml'), { written: [], removed: [] });
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

  it('removes a copy the config no longer names (plain http endpoint)', () => {
    const rt = mkdtempSync(join(dir, 'run-'));
    stageTlsFiles(config().config, rt, 'config.yaml');
    const r = stageTlsFiles(config('  endpoint: http://127.0.0.1:2379\n').config, rt, 'config.yaml');
    assert.deepEqual(r.removed.sort(), ['etcd-ca', 'etcd-cert', 'etcd-key']);
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
