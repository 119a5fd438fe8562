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

export function createHttp(opts: ClientOptions): AxiosInstance {
  return axios.create({
    baseURL: opts.baseUrl.replace(/\/+$/, ''),
    timeout: opts.timeoutMs ?? 15_000,
    headers: opts.token ? { Authorization: `Bearer ${opts.token}` } : {},
    httpAgent: new http.Agent({ keepAlive: true }),
    httpsAgent: new https.Agent({ keepAlive: true, ...(opts.ca ? { ca: opts.ca } : {}) }),
    proxy: false,
  });
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
      const hint = err.code && TLS_CONFIG_ERRORS.has(err.code)
        ? (err.code === 'ERR_SSL_WRONG_VERSION_NUMBER' ? ': the URL says https:// but the service speaks plain HTTP there' : ": the service's certificate is not trusted, or does not name the host in the URL; trust the CA that signs it (the driver's config key agent.ca)")
        : '';
      throw new ApiError(null, 'UNREACHABLE', `${what}: ${err.code ?? ''} ${err.message}${hint}`.trim(), true);
    }
    throw err;
  }
}
