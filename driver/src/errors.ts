/**
 * The driver service's error registry (DRV_ERR_*). `http` is the status the REST API
 * answers with; `retryable` decides whether a job that meets the error is retried with
 * backoff (transient) or failed at once (permanent, BullMQ's UnrecoverableError).
 * docs/errors.md documents every code; a unit test checks that.
 */
export interface DriverErrorSpec {
  message: string;
  http: number;
  retryable: boolean;
}

export const DRIVER_ERRORS = {
  DRV_ERR_CONFIG: { message: 'invalid configuration', http: 500, retryable: false },
  DRV_ERR_BAD_REQUEST: { message: 'the request is malformed', http: 400, retryable: false },
  DRV_ERR_UNAUTHORIZED: { message: 'authentication failed', http: 401, retryable: false },
  DRV_ERR_NOT_FOUND: { message: 'no such deployment', http: 404, retryable: false },
  DRV_ERR_PROFILE_NOT_FOUND: { message: 'no such boot profile', http: 404, retryable: false },
  DRV_ERR_CONFLICT: { message: 'the node has another deployment', http: 409, retryable: false },
  DRV_ERR_INVALID: { message: 'the deployment cannot work as specified', http: 422, retryable: false },
  DRV_ERR_IMAGE_SOURCE: { message: 'the image source is not usable', http: 422, retryable: false },
  DRV_ERR_IMAGE_UNREACHABLE: { message: 'the image source could not be reached', http: 422, retryable: true },
  DRV_ERR_IMAGE_NOT_FOUND: { message: 'the image does not exist', http: 422, retryable: false },
  DRV_ERR_IMAGE_MISMATCH: { message: 'the image does not match the digest Glance records', http: 422, retryable: false },
  DRV_ERR_CONFIG_DRIVE: { message: 'the config drive is not usable', http: 422, retryable: false },
  DRV_ERR_AGENT_UNREACHABLE: { message: 'the DPU agent could not be reached', http: 502, retryable: true },
  DRV_ERR_AGENT_REJECTED: { message: 'the DPU agent refused the request', http: 502, retryable: false },
  DRV_ERR_EXPORT_TIMEOUT: { message: 'the streaming disk did not become ready in time', http: 504, retryable: false },
  DRV_ERR_REDIS: { message: 'Redis is unreachable', http: 503, retryable: true },
  DRV_ERR_REDIS_REPLICATION: { message: 'the change is not yet on enough Redis replicas', http: 503, retryable: true },
  DRV_ERR_REDIS_UNFIT: { message: 'Redis is not fit to hold deployments', http: 500, retryable: false },
  DRV_ERR_INTERNAL: { message: 'internal error', http: 500, retryable: true },
} as const satisfies Record<string, DriverErrorSpec>;

export type DriverErrorCode = keyof typeof DRIVER_ERRORS;

export class DriverError extends Error {
  readonly code: DriverErrorCode;
  readonly http: number;
  readonly retryable: boolean;
  readonly field: string | undefined;

  constructor(code: DriverErrorCode, detail?: string, opts?: { cause?: unknown; field?: string; retryable?: boolean }) {
    const spec: DriverErrorSpec = DRIVER_ERRORS[code];
    super(detail ? `${spec.message}: ${detail}` : spec.message, opts?.cause ? { cause: opts.cause } : undefined);
    this.name = 'DriverError';
    this.code = code;
    this.http = spec.http;
    this.retryable = opts?.retryable ?? spec.retryable;
    this.field = opts?.field;
  }
}
