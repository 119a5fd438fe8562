/**
 * Image access, shared by the DPU agent and the driver service: reading an image's bytes
 * over HTTP (ranges, retries, deadlines, priorities), decoding qcow2, padding an image to a
 * larger disk, the image manifest that verifies every region, URL redaction, and the error
 * registry those report with. Neither program reaches into the other's sources for these.
 */
export { DpuError, ERRORS, NbdErrno, toNbdErrno, type DpuErrorCode } from './errors.js';
export { HttpSource, type HttpSourceOptions } from './http-source.js';
export { Manifest } from './manifest.js';
export { decodeFormat, IMAGE_FORMATS, openImageSource, type ImageFormat } from './open.js';
export { PaddedSource } from './padded.js';
export { isQcow2, parseQcow2Header, Qcow2Source, readHead, unsupportedFeature, type Qcow2Header, type Qcow2SourceOptions, type ZeroRange } from './qcow2.js';
export { redactHeaders, redactUrl } from './redact.js';
export type { FetchPriority, RemoteReadOptions, RemoteSource, RemoteSourceStats } from './source.js';
