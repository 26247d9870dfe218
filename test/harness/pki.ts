/**
 * kubeadm-style etcd PKI generated with the openssl CLI: a CA, a server certificate used for both
 * client-facing and peer TLS (serverAuth + clientAuth, SAN localhost/127.0.0.1/::1), a client
 * certificate like kubeadm's healthcheck-client, and an unrelated CA (plus a client certificate
 * it signed) for "wrong CA" tests.
 *
 * Keys are EC P-256 in PKCS#8 PEM ("BEGIN PRIVATE KEY"), which both Go (etcd) and Node/grpc-js accept.
 */
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdir, writeFile, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';

const execFileP = promisify(execFile);

export interface Pki {
  dir: string;
  caFile: string;
  caKeyFile: string;
  /** Server certificate, also usable for peers (serverAuth + clientAuth). */
  serverCertFile: string;
  serverKeyFile: string;
  /** Client certificate like kubeadm's healthcheck-client (CN=kube-etcd-healthcheck-client, clientAuth). */
  clientCertFile: string;
  clientKeyFile: string;
  /** An unrelated CA. */
  otherCaFile: string;
  otherCaKeyFile: string;
  /** A client certificate (same CN as clientCertFile) signed by the unrelated CA. */
  otherClientCertFile: string;
  otherClientKeyFile: string;
}

const DAYS = '3650';

async function openssl(args: string[], cwd: string): Promise<void> {
  try {
    await execFileP('openssl', args, { cwd, timeout: 30_000 });
  } catch (err) {
    const e = err as { stderr?: string; message: string };
    throw new Error(`openssl ${args.join(' ')} failed: ${e.message}\n${e.stderr ?? ''}`);
  }
}

async function genKey(dir: string, name: string): Promise<string> {
  const file = join(dir, `${name}.key`);
  await openssl(['genpkey', '-algorithm', 'EC', '-pkeyopt', 'ec_paramgen_curve:P-256', '-out', file], dir);
  return file;
}

/** Minimal request config so that the system openssl.cnf does not matter. */
const REQ_CNF = `[req]
distinguished_name = dn
prompt = no
[dn]
CN = placeholder
[v3_ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,digitalSignature,keyCertSign,cRLSign
subjectKeyIdentifier = hash
`;

async function makeCa(dir: string, name: string, cn: string): Promise<{ cert: string; key: string }> {
  const key = await genKey(dir, name);
  const cert = join(dir, `${name}.crt`);
  await openssl(
    [
      'req',
      '-config',
      join(dir, 'req.cnf'),
      '-new',
      '-x509',
      '-key',
      key,
      '-subj',
      `/CN=${cn}`,
      '-days',
      DAYS,
      '-sha256',
      '-extensions',
      'v3_ca',
      '-out',
      cert,
    ],
    dir,
  );
  return { cert, key };
}

export interface LeafOptions {
  cn: string;
  /** Subject organization (O=), optional. */
  org?: string;
  usage: 'server' | 'client';
  /** For server certificates: SAN entries, e.g. ['DNS:localhost', 'IP:127.0.0.1']. */
  san?: string[];
}

async function makeLeaf(
  dir: string,
  name: string,
  ca: { cert: string; key: string },
  o: LeafOptions,
): Promise<{ cert: string; key: string }> {
  const key = await genKey(dir, name);
  const csr = join(dir, `${name}.csr`);
  const ext = join(dir, `${name}.ext`);
  const cert = join(dir, `${name}.crt`);
  const subj = `${o.org ? `/O=${o.org}` : ''}/CN=${o.cn}`;
  await openssl(['req', '-config', join(dir, 'req.cnf'), '-new', '-key', key, '-subj', subj, '-out', csr], dir);
  const lines = [
    'basicConstraints = critical,CA:FALSE',
    'keyUsage = critical,digitalSignature,keyEncipherment',
    `extendedKeyUsage = ${o.usage === 'server' ? 'serverAuth,clientAuth' : 'clientAuth'}`,
    'subjectKeyIdentifier = hash',
    'authorityKeyIdentifier = keyid',
  ];
  if (o.san?.length) lines.push(`subjectAltName = ${o.san.join(',')}`);
  await writeFile(ext, lines.join('\n') + '\n');
  await openssl(
    [
      'x509',
      '-req',
      '-in',
      csr,
      '-CA',
      ca.cert,
      '-CAkey',
      ca.key,
      '-set_serial',
      `0x${randomBytes(12).toString('hex')}`,
      '-days',
      DAYS,
      '-sha256',
      '-extfile',
      ext,
      '-out',
      cert,
    ],
    dir,
  );
  await Promise.all([rm(csr, { force: true }), rm(ext, { force: true })]);
  return { cert, key };
}

/** Generates the PKI into `dir` (created if missing). Takes ~0.1-0.3 s. */
export async function makePki(dir: string): Promise<Pki> {
  await mkdir(dir, { recursive: true });
  await writeFile(join(dir, 'req.cnf'), REQ_CNF);
  const [ca, other] = await Promise.all([makeCa(dir, 'ca', 'etcd-ca'), makeCa(dir, 'other-ca', 'unrelated-ca')]);
  const [server, client, otherClient] = await Promise.all([
    makeLeaf(dir, 'server', ca, { cn: 'etcd-server', usage: 'server', san: ['DNS:localhost', 'IP:127.0.0.1', 'IP:::1'] }),
    makeLeaf(dir, 'healthcheck-client', ca, { cn: 'kube-etcd-healthcheck-client', usage: 'client' }),
    makeLeaf(dir, 'other-client', other, { cn: 'kube-etcd-healthcheck-client', usage: 'client' }),
  ]);
  return {
    dir,
    caFile: ca.cert,
    caKeyFile: ca.key,
    serverCertFile: server.cert,
    serverKeyFile: server.key,
    clientCertFile: client.cert,
    clientKeyFile: client.key,
    otherCaFile: other.cert,
    otherCaKeyFile: other.key,
    otherClientCertFile: otherClient.cert,
    otherClientKeyFile: otherClient.key,
  };
}

/**
 * Issues another certificate signed by the PKI's CA (or, with `otherCa`, by the unrelated CA),
 * e.g. a client certificate with a different CN. Returns the file paths.
 */
export async function issueCert(
  pki: Pki,
  name: string,
  o: LeafOptions & { otherCa?: boolean },
): Promise<{ certFile: string; keyFile: string }> {
  if (!/^[A-Za-z0-9._-]+$/.test(name)) throw new Error(`issueCert: bad file name '${name}'`);
  const ca = o.otherCa ? { cert: pki.otherCaFile, key: pki.otherCaKeyFile } : { cert: pki.caFile, key: pki.caKeyFile };
  const { cert, key } = await makeLeaf(pki.dir, name, ca, o);
  return { certFile: cert, keyFile: key };
}
