/**
 * What both typed clients share: an axios instance with the bearer token, and one error
 * type that carries the service's error code, the HTTP status and the retry policy.
 */
import http from 'node:http';
import https from 'node:https';
import axios, { type AxiosInstance, AxiosError } from 'axios';
import { TLS_CONFIG_ERRORS } from '../../common/src/tls.js';

export interface ClientOptions {
  baseUrl: string;
  token?: string;
  /** Per-request timeout, ms. @default 15000 */
  timeoutMs?: number;
  /** PEM CA certificate(s) an https:// service's certificate must chain to. @default the system's store (and NODE_EXTRA_CA_CERTS) */
  ca?: string | Buffer;
  /** Where the caller's operator sets `ca` (a config key), named when a certificate is not trusted. */
  caSetting?: string;
  /** The HTTPS connection pool to use (shared by clients, so TLS connections are reused); built from `ca` when absent. */
  httpsAgent?: https.Agent;
}

export class ApiError extends Error {
  constructor(
    readonly status: number | null,
    readonly code: string,
    message: string,
    readonly retryable: boolean,
    readonly field?: string,
  ) {
    super(message);
    this.name = 'ApiError';
  }
}

/** A transport failure, with where the caller's operator sets the CA (ClientOptions.caSetting). */
type FailedRequest = AxiosError & { caSetting?: string };

export function createHttp(opts: ClientOptions): AxiosInstance {
  const instance = axios.create({
    baseURL: opts.baseUrl.replace(/\/+$/, ''),
    timeout: opts.timeoutMs ?? 15_000,
    headers: opts.token ? { Authorization: `Bearer ${opts.token}` } : {},
    httpAgent: new http.Agent({ keepAlive: true }),
    httpsAgent: opts.httpsAgent ?? new https.Agent({ keepAlive: true, ...(opts.ca ? { ca: opts.ca } : {}) }),
    proxy: false,
  });
  const caSetting = opts.caSetting;
  if (caSetting) {
    instance.interceptors.response.use(undefined, (err: unknown) => {
      if (err instanceof AxiosError) (err as FailedRequest).caSetting = caSetting;
      return Promise.reject(err);
    });
  }
  return instance;
}

/** Runs a request; maps every failure to an ApiError (transport failures are retryable). */
export async function call<T>(p: Promise<{ data: T }>, what: string): Promise<T> {
  try {
    return (await p).data;
  } catch (err) {
    if (err instanceof AxiosError) {
      const status = err.response?.status ?? null;
      let data: unknown = err.response?.data;
      // A request that asked for text (e.g. /metrics) still gets a JSON error body.
      if (typeof data === 'string') {
        try {
          data = JSON.parse(data);
        } catch {
          // not JSON: fall through to the plain HTTP error below
        }
      }
      const body = data as { code?: string; message?: string; retryable?: boolean; field?: string } | undefined;
      if (status !== null && body && typeof body === 'object' && typeof body.code === 'string') {
        throw new ApiError(status, body.code, `${what}: ${body.message ?? 'failed'}`, body.retryable ?? status >= 500, body.field);
      }
      if (status !== null) throw new ApiError(status, 'HTTP_ERROR', `${what}: HTTP ${status}`, status >= 500 || status === 429);
      const caSetting = (err as FailedRequest).caSetting;
      const hint = err.code && TLS_CONFIG_ERRORS.has(err.code)
        ? (err.code === 'ERR_SSL_WRONG_VERSION_NUMBER'
          ? ': the URL says https:// but the service speaks plain HTTP there'
          : `: the service's certificate is not trusted, or does not name the host in the URL; trust the CA that signs it${caSetting ? ` (config key ${caSetting})` : ''}`)
        : '';
      throw new ApiError(null, 'UNREACHABLE', `${what}: ${err.code ?? ''} ${err.message}${hint}`.trim(), true);
    }
    throw err;
  }
}
