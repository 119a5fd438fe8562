/**
 * TLS files, read and checked once at start-up so a wrong one stops the program with a
 * message naming it, not the first connection with an OpenSSL error: a server's
 * certificate and key (the agent's API, NBD exports) and the CA bundles clients trust
 * (peer agents, the driver's agent calls). `label` says how the caller names a field
 * (`--tls-cert`, `config key "listen.tls.cert"`); errors are ConfigErrors whose `key` is
 * the field.
 */
import { X509Certificate, createPrivateKey } from 'node:crypto';
import fs from 'node:fs';
import tls from 'node:tls';
import { ConfigError } from './config-error.js';

/**
 * TLS failures that repeat on every connection until a certificate or the config changes
 * (the server's certificate is not trusted, has expired or does not name the host in its
 * URL, or the URL says https:// to a server that speaks plain HTTP): the error codes Node
 * gives them. Clients say what to fix; they still retry, as a certificate or a CA bundle
 * may be replaced while they do.
 */
export const TLS_CONFIG_ERRORS: ReadonlySet<string> = new Set([
  'UNABLE_TO_VERIFY_LEAF_SIGNATURE',
  'UNABLE_TO_GET_ISSUER_CERT',
  'UNABLE_TO_GET_ISSUER_CERT_LOCALLY',
  'SELF_SIGNED_CERT_IN_CHAIN',
  'DEPTH_ZERO_SELF_SIGNED_CERT',
  'CERT_HAS_EXPIRED',
  'CERT_NOT_YET_VALID',
  'CERT_UNTRUSTED',
  'CERT_REJECTED',
  'CERT_SIGNATURE_FAILURE',
  'ERR_TLS_CERT_ALTNAME_INVALID',
  'ERR_SSL_WRONG_VERSION_NUMBER',
]);

/** A server's certificate (with its chain) and private key, PEM. */
export interface TlsPair {
  cert: Buffer;
  key: Buffer;
}

function readPem<F extends string>(field: F, file: string, label: (field: F) => string): Buffer {
  try {
    return fs.readFileSync(file);
  } catch (err) {
    throw new ConfigError(`${label(field)} ${file}: cannot read it (${(err as NodeJS.ErrnoException).code ?? (err as Error).message}); give a readable PEM file`, field);
  }
}

/**
 * Reads a certificate and its key: each readable PEM that parses, the key the
 * certificate's, the certificate within its validity period, and the two accepted by
 * OpenSSL as a server context.
 */
export function readTlsPair(files: { cert: string; key: string }, label: (field: 'cert' | 'key') => string, now = new Date()): TlsPair {
  const fail = (field: 'cert' | 'key', what: string): never => {
    throw new ConfigError(`${label(field)} ${what}`, field);
  };
  const certPem = readPem('cert', files.cert, label);
  const keyPem = readPem('key', files.key, label);
  let cert: X509Certificate;
  try {
    cert = new X509Certificate(certPem);
  } catch {
    return fail('cert', `${files.cert} is not a PEM certificate (-----BEGIN CERTIFICATE-----)`);
  }
  let key;
  try {
    key = createPrivateKey(keyPem);
  } catch {
    return fail('key', `${files.key} is not an unencrypted PEM private key (-----BEGIN PRIVATE KEY-----); decrypt it with "openssl pkey -in KEY -out KEY.plain"`);
  }
  if (!cert.checkPrivateKey(key)) fail('key', `${files.key} is not the private key of the certificate in ${label('cert')} ${files.cert}; give the pair that were issued together`);
  if (new Date(cert.validTo) < now) fail('cert', `${files.cert} expired on ${cert.validTo}; renew it`);
  if (new Date(cert.validFrom) > now) fail('cert', `${files.cert} is not valid before ${cert.validFrom}; check the clock of this machine or the certificate`);
  try {
    tls.createSecureContext({ cert: certPem, key: keyPem }); // what every connection will do: fail here, not there
  } catch (err) {
    return fail('cert', `${files.cert} with ${label('key')} ${files.key}: ${(err as Error).message}`);
  }
  return { cert: certPem, key: keyPem };
}

/**
 * Reads a bundle of PEM CA certificates (one or more) that a client trusts instead of the
 * system's store. Every certificate in it must parse: a bundle cut short would otherwise
 * trust less than the operator meant, silently.
 */
export function readCaBundle<F extends string>(field: F, file: string, label: (field: F) => string): Buffer {
  const pem = readPem(field, file, label);
  const blocks = pem.toString('latin1').match(/-----BEGIN CERTIFICATE-----[\s\S]*?-----END CERTIFICATE-----/g) ?? [];
  if (blocks.length === 0) throw new ConfigError(`${label(field)} ${file} holds no PEM certificate (-----BEGIN CERTIFICATE-----)`, field);
  blocks.forEach((b, i) => {
    try {
      new X509Certificate(b);
    } catch {
      throw new ConfigError(`${label(field)} ${file}: certificate ${i + 1} of ${blocks.length} does not parse; fix or remove it`, field);
    }
  });
  return pem;
}
