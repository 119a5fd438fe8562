/**
 * The DPU agent's error registry. Every failure the agent reports to a person or to the
 * NBD client carries one of these codes; docs/errors.md documents each one (a unit test
 * checks that), so an operator can look a code up and find what to do.
 *
 * `retryable` states policy: a transient failure (a 5xx from the origin, a reset) is
 * retried with backoff by the component that met it; a permanent one (a 404, a bad flag)
 * is not. `errno` is the NBD error the host sees when the failure ends an I/O request;
 * `http` is the status the management API answers with (500 where none is given). Codes
 * that only the API produces have no errno.
 */
export const NbdErrno = {
  EPERM: 1,
  EIO: 5,
  ENOMEM: 12,
  EINVAL: 22,
  ENOSPC: 28,
  EOVERFLOW: 75,
  ENOTSUP: 95,
  ESHUTDOWN: 108,
} as const;
export type NbdErrno = (typeof NbdErrno)[keyof typeof NbdErrno];

interface ErrorSpec {
  message: string;
  retryable: boolean;
  errno?: NbdErrno;
  http?: number;
}

export const ERRORS = {
  DPU_ERR_CONFIG: {
    message: 'invalid configuration',
    retryable: false,
    errno: NbdErrno.EINVAL,
    http: 400,
  },
  DPU_ERR_SOURCE_HTTP_STATUS: {
    message: 'the image origin answered with an unexpected HTTP status',
    retryable: false,
    errno: NbdErrno.EIO,
    http: 502,
  },
  DPU_ERR_SOURCE_TRANSIENT: {
    message: 'the image origin failed transiently (5xx, reset, stall or truncated body)',
    retryable: true,
    errno: NbdErrno.EIO,
    http: 502,
  },
  DPU_ERR_SOURCE_BAD_RANGE: {
    message: 'the image origin answered a range request with the wrong range',
    retryable: true,
    errno: NbdErrno.EIO,
    http: 502,
  },
  DPU_ERR_SOURCE_DEADLINE: {
    message: 'the image origin did not deliver a range before the retry deadline',
    retryable: false,
    errno: NbdErrno.EIO,
    http: 502,
  },
  DPU_ERR_SOURCE_CLOSED: {
    message: 'the remote source is closed (the disk has cut over to local storage or is shutting down)',
    retryable: false,
    errno: NbdErrno.EIO,
  },
  DPU_ERR_SOURCE_MISMATCH: {
    message: 'the image at the source is not the one this state directory was made for',
    retryable: false,
    errno: NbdErrno.EIO,
    http: 409,
  },
  DPU_ERR_IMAGE_UNSUPPORTED: {
    message: 'the image uses a feature the agent cannot serve',
    retryable: false,
    errno: NbdErrno.ENOTSUP,
    http: 400,
  },
  DPU_ERR_IMAGE_CORRUPT: {
    message: 'the image is not what its format says or is damaged',
    retryable: false,
    errno: NbdErrno.EIO,
    http: 502,
  },
  DPU_ERR_TARGET_IO: {
    message: 'reading or writing the local target failed',
    retryable: false,
    errno: NbdErrno.EIO,
  },
  DPU_ERR_TARGET_FAILED: {
    message: 'the local target failed (a write or an fdatasync returned an I/O error); the disk is stopped',
    retryable: false,
    errno: NbdErrno.EIO,
    http: 503,
  },
  DPU_ERR_TARGET_TOO_SMALL: {
    message: 'the local target is smaller than the image',
    retryable: false,
    errno: NbdErrno.ENOSPC,
    http: 400,
  },
  DPU_ERR_DISK_TOO_SMALL: {
    message: 'the disk size asked for is smaller than the image',
    retryable: false,
    errno: NbdErrno.EINVAL,
    http: 400,
  },
  DPU_ERR_CONFIG_DRIVE: {
    message: 'the config drive cannot be written to this disk',
    retryable: false,
    errno: NbdErrno.EINVAL,
    http: 400,
  },
  DPU_ERR_INTEGRITY: {
    message: 'a region fetched from the origin does not match the image manifest',
    retryable: true,
    errno: NbdErrno.EIO,
  },
  DPU_ERR_MANIFEST_INVALID: {
    message: 'the image manifest is unusable',
    retryable: false,
    errno: NbdErrno.EIO,
    http: 400,
  },
  DPU_ERR_PROFILE_INVALID: {
    message: 'the boot profile cannot be replayed on this disk',
    retryable: false,
    http: 400,
  },
  DPU_ERR_STATE_CORRUPT: {
    message: 'the region map in the state directory is unreadable',
    retryable: false,
    errno: NbdErrno.EIO,
  },
  DPU_ERR_STATE_LOCKED: {
    message: 'another agent process holds this state directory',
    retryable: false,
    errno: NbdErrno.EIO,
    http: 409,
  },
  DPU_ERR_OUT_OF_RANGE: {
    message: 'the request reaches past the end of the disk',
    retryable: false,
    errno: NbdErrno.EINVAL,
  },
  DPU_ERR_READ_ONLY: {
    message: 'the export is read-only',
    retryable: false,
    errno: NbdErrno.EPERM,
  },
  DPU_ERR_SHUTTING_DOWN: {
    message: 'the disk is shutting down',
    retryable: false,
    errno: NbdErrno.ESHUTDOWN,
    http: 503,
  },
  DPU_ERR_ZERO_NOT_FAST: {
    message: 'this WRITE_ZEROES asked to be fast (NBD_CMD_FLAG_FAST_ZERO) but needs data written or fetched; nothing was changed',
    retryable: false,
    errno: NbdErrno.ENOTSUP,
  },
  DPU_ERR_NBD_PROTOCOL: {
    message: 'the NBD client broke the protocol; the connection was closed',
    retryable: false,
    errno: NbdErrno.EINVAL,
  },
  DPU_ERR_NBD_TLS: {
    message: 'an NBD client was refused over TLS: it did not start TLS where it is required, or its TLS handshake failed; the connection was closed',
    retryable: false,
  },
  // ---- management API (dpu-agent serve) ----
  DPU_ERR_BAD_REQUEST: {
    message: 'the request is malformed',
    retryable: false,
    http: 400,
  },
  DPU_ERR_UNAUTHORIZED: {
    message: 'the request has no bearer token or one that is not accepted',
    retryable: false,
    http: 401,
  },
  DPU_ERR_NOT_FOUND: {
    message: 'no such disk or endpoint',
    retryable: false,
    http: 404,
  },
  DPU_ERR_NOT_SERVABLE: {
    message: 'the range is not all verified image bytes on this agent',
    retryable: false,
    http: 409,
  },
  DPU_ERR_DISK_COMPLETE: {
    message: 'the disk is complete: its source is dropped',
    retryable: false,
    http: 409,
  },
  DPU_ERR_PEER_REFUSED: {
    message: 'the disk is not offered to peers',
    retryable: false,
    http: 409,
  },
  DPU_ERR_RANGE: {
    message: 'the request has no usable Range',
    retryable: false,
    http: 416,
  },
  DPU_ERR_BUSY: {
    message: 'serving peers is at its limit',
    retryable: true,
    http: 503,
  },
  DPU_ERR_DISK_EXISTS: {
    message: 'a disk with this id exists with another source or target',
    retryable: false,
    http: 409,
  },
  DPU_ERR_TARGET_NOT_ALLOWED: {
    message: 'the target path is not under one of the allowed target prefixes',
    retryable: false,
    http: 400,
  },
  DPU_ERR_TARGET_IN_USE: {
    message: 'another disk uses this target',
    retryable: false,
    http: 409,
  },
  DPU_ERR_TCP_EXPORT_NOT_ALLOWED: {
    message: 'TCP exports are disabled on this agent',
    retryable: false,
    http: 400,
  },
  DPU_ERR_DISK_FAILED: {
    message: 'the disk is not open',
    retryable: true,
    http: 409,
  },
  DPU_ERR_WIPE_FAILED: {
    message: 'wiping the target of a deleted disk failed; the disk stays listed (state `wiping`) until a DELETE wipes it',
    retryable: true,
    http: 500,
  },
  DPU_ERR_DISK_WIPING: {
    message: 'the disk was deleted and its target is not wiped yet',
    retryable: true,
    http: 409,
  },
  DPU_ERR_TARGET_ERASING: {
    message: 'an erasure of this target is running',
    retryable: true,
    http: 409,
  },
  DPU_ERR_ERASE_FAILED: {
    message: 'erasing the target failed',
    retryable: false,
  },
  DPU_ERR_ERASE_INTERRUPTED: {
    message: 'the erasure was interrupted: the agent stopped or restarted while it ran, and the target is only partly erased',
    retryable: true,
  },
  DPU_ERR_ERASE_CANCELLED: {
    message: 'the erasure was cancelled before it finished; the target is only partly erased',
    retryable: true,
  },
  DPU_ERR_INTERNAL: {
    message: 'the agent failed unexpectedly',
    retryable: true,
    http: 500,
  },
} as const satisfies Record<string, ErrorSpec>;

export type DpuErrorCode = keyof typeof ERRORS;

export class DpuError extends Error {
  readonly code: DpuErrorCode;
  readonly retryable: boolean;
  readonly errno: NbdErrno;
  /** The HTTP status the management API answers with. */
  readonly http: number;
  /** The request field to blame (dotted, e.g. `target.path`), for API errors. */
  readonly field: string | undefined;

  constructor(code: DpuErrorCode, detail?: string, options?: { cause?: unknown; errno?: NbdErrno; field?: string }) {
    const spec: ErrorSpec = ERRORS[code];
    super(detail ? `${spec.message}: ${detail}` : spec.message, options?.cause ? { cause: options.cause } : undefined);
    this.name = 'DpuError';
    this.code = code;
    this.retryable = spec.retryable;
    this.errno = options?.errno ?? spec.errno ?? NbdErrno.EIO;
    this.http = spec.http ?? 500;
    this.field = options?.field;
  }
}

/** The one place that maps any failure to the errno an NBD client receives. */
export function toNbdErrno(err: unknown): NbdErrno {
  if (err instanceof DpuError) return err.errno;
  const code = (err as NodeJS.ErrnoException | undefined)?.code;
  switch (code) {
    case 'ENOSPC':
    case 'EDQUOT':
      return NbdErrno.ENOSPC;
    case 'ENOMEM':
      return NbdErrno.ENOMEM;
    case 'EPERM':
    case 'EACCES':
    case 'EROFS':
      return NbdErrno.EPERM;
    default:
      return NbdErrno.EIO;
  }
}
