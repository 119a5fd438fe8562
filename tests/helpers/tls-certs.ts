/**
 * A throw-away PKI made with `openssl`, laid out as qemu's tls-creds-x509 and libnbd's
 * `tls-certificates=DIR` expect: ca-cert.pem, server-cert.pem, server-key.pem,
 * client-cert.pem, client-key.pem. EC P-256 keys (fast to make); the server certificate
 * names localhost and 127.0.0.1, which both clients check.
 */
import fs from 'node:fs';
import path from 'node:path';
import { run } from './run.js';

export interface TestPki {
  dir: string;
  caCert: string;
  caKey: string;
  serverCert: string;
  serverKey: string;
  clientCert: string;
  clientKey: string;
}

async function newKey(file: string): Promise<void> {
  await run('openssl', ['genpkey', '-algorithm', 'EC', '-pkeyopt', 'ec_paramgen_curve:P-256', '-out', file]);
}

/** A self-signed CA in `dir` (ca-cert.pem, ca-key.pem). */
export async function makeCa(dir: string, cn = 'dpu-agent test CA'): Promise<{ cert: string; key: string }> {
  fs.mkdirSync(dir, { recursive: true });
  const key = path.join(dir, 'ca-key.pem');
  const cert = path.join(dir, 'ca-cert.pem');
  await newKey(key);
  await run('openssl', [
    'req', '-x509', '-new', '-key', key, '-out', cert, '-days', '2', '-subj', `/CN=${cn}`,
    '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign,cRLSign',
  ]);
  return { cert, key };
}

/** A certificate for `role` signed by the CA, written as `<role>-cert.pem` and `<role>-key.pem` in `dir`. */
export async function issue(dir: string, ca: { cert: string; key: string }, role: 'server' | 'client', cn: string, san = 'DNS:localhost,IP:127.0.0.1'): Promise<{ cert: string; key: string }> {
  const key = path.join(dir, `${role}-key.pem`);
  const cert = path.join(dir, `${role}-cert.pem`);
  const csr = path.join(dir, `${role}.csr`);
  const ext = path.join(dir, `${role}.ext`);
  await newKey(key);
  await run('openssl', ['req', '-new', '-key', key, '-out', csr, '-subj', `/CN=${cn}`]);
  fs.writeFileSync(
    ext,
    [
      'basicConstraints=CA:FALSE',
      'keyUsage=digitalSignature,keyEncipherment',
      `extendedKeyUsage=${role === 'server' ? 'serverAuth' : 'clientAuth'}`,
      ...(role === 'server' ? [`subjectAltName=${san}`] : []),
      '',
    ].join('\n'),
  );
  await run('openssl', ['x509', '-req', '-in', csr, '-CA', ca.cert, '-CAkey', ca.key, '-CAcreateserial', '-out', cert, '-days', '2', '-extfile', ext]);
  fs.rmSync(csr);
  fs.rmSync(ext);
  return { cert, key };
}

/** CA, server and client certificates in one directory. */
export async function makePki(dir: string): Promise<TestPki> {
  const ca = await makeCa(dir);
  const server = await issue(dir, ca, 'server', 'localhost');
  const client = await issue(dir, ca, 'client', 'ironic-host-1');
  return { dir, caCert: ca.cert, caKey: ca.key, serverCert: server.cert, serverKey: server.key, clientCert: client.cert, clientKey: client.key };
}

/** A client directory for qemu/libnbd: `files` copied from `from` under their own names. */
export function clientDir(dir: string, from: TestPki, files: ('ca-cert.pem' | 'client-cert.pem' | 'client-key.pem')[]): string {
  fs.mkdirSync(dir, { recursive: true });
  for (const f of files) fs.copyFileSync(path.join(from.dir, f), path.join(dir, f));
  return dir;
}
