/**
 * TLS for NBD exports (NBD_OPT_STARTTLS, NetworkBlockDevice/nbd doc/proto.md "TLS
 * support"): the certificate files, checked once at start-up, and the modes a server
 * offers them in.
 *
 *   require  FORCEDTLS: before STARTTLS every option but STARTTLS and ABORT is refused
 *            with NBD_REP_ERR_TLS_REQD, and NBD_OPT_EXPORT_NAME closes the connection.
 *   allow    SELECTIVETLS with no TLS-only export: a client may upgrade, or stay plain.
 *
 * With `verifyPeer` the client must present a certificate that chains to `ca` (mutual
 * TLS); without it any client that completes the handshake is served, so TLS then
 * encrypts but does not authenticate the host.
 */
import tls from 'node:tls';
import { ConfigError } from '../../../common/src/config-error.js';
import { readCaBundle, readTlsPair } from '../../../common/src/tls.js';

export const TLS_MODES = ['require', 'allow'] as const;
export type TlsMode = (typeof TLS_MODES)[number];

/** What a server needs to offer TLS; built by `loadNbdTls`. */
export interface NbdTls {
  /** For a tls.Server that each upgraded connection is handed to (see handshake.ts). */
  serverOptions: tls.TlsOptions;
  mode: TlsMode;
  /** Ask for a client certificate and refuse a client without a valid one. */
  verifyPeer: boolean;
}

/** The settings as files, from CLI flags or the daemon config. */
export interface NbdTlsFiles {
  cert: string;
  key: string;
  ca?: string | undefined;
  mode: TlsMode;
  verifyPeer: boolean;
}

export type TlsField = 'cert' | 'key' | 'ca' | 'mode' | 'verify_peer';

/**
 * Reads and checks the files: each one readable and PEM that parses, the key the
 * certificate's, the certificate within its validity period, a CA when peers are
 * verified. Throws ConfigError whose `key` is the field; `label` says how the caller names
 * it (`--tls-cert`, `config key "nbd_tls.cert"`).
 */
export function loadNbdTls(files: NbdTlsFiles, label: (field: TlsField) => string, now = new Date()): NbdTls {
  const fail = (field: TlsField, what: string): never => {
    throw new ConfigError(`${label(field)} ${what}`, field);
  };
  if (!TLS_MODES.includes(files.mode)) fail('mode', `"${String(files.mode)}" is not one of ${TLS_MODES.join(', ')}`);
  if (files.verifyPeer && !files.ca) fail('ca', `is needed with ${label('verify_peer')}: the CA that signs the client certificates`);
  if (files.ca && !files.verifyPeer) {
    fail('ca', `is only used to verify client certificates; add ${label('verify_peer')} to require them, or drop it`);
  }
  const { cert: certPem, key: keyPem } = readTlsPair(files, label, now);
  const caPem = files.ca ? readCaBundle('ca', files.ca, label) : undefined;
  const serverOptions: tls.TlsOptions = {
    cert: certPem,
    key: keyPem,
    ...(caPem ? { ca: caPem } : {}),
    minVersion: 'TLSv1.2', // proto.md: TLS 1.2 or later
    requestCert: files.verifyPeer,
    rejectUnauthorized: files.verifyPeer,
  };
  try {
    tls.createSecureContext(serverOptions); // with the CA too: fail here, not at a connection
  } catch (err) {
    return files.ca ? fail('ca', `${files.ca}: ${(err as Error).message}`) : fail('cert', `${files.cert} with ${label('key')} ${files.key}: ${(err as Error).message}`);
  }
  return { serverOptions, mode: files.mode, verifyPeer: files.verifyPeer };
}
