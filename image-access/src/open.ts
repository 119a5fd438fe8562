/**
 * Opening an image: the HTTP origin, decoded when it is qcow2, as one RemoteSource of the
 * raw disk's bytes. The agent streams from it; the driver builds manifests from it.
 */
import type { Logger } from 'pino';
import { HttpSource, type HttpSourceOptions } from './http-source.js';
import { isQcow2, Qcow2Source, readHead } from './qcow2.js';
import type { RemoteSource } from './source.js';

/**
 * How the bytes at the source are read: `raw` as they are; `qcow2` through Qcow2Source,
 * which serves the virtual disk (the target is that raw disk); `auto` looks for the qcow2
 * magic in the first bytes.
 */
export type ImageFormat = 'raw' | 'qcow2' | 'auto';
export const IMAGE_FORMATS: readonly ImageFormat[] = ['raw', 'qcow2', 'auto'];

/** The image as a RemoteSource of its raw bytes: the HTTP origin, decoded if it is qcow2. */
export async function openImageSource(opts: { source: Omit<HttpSourceOptions, 'log'>; format?: ImageFormat; log?: Logger }): Promise<RemoteSource> {
  const http = await HttpSource.open({ ...opts.source, ...(opts.log ? { log: opts.log } : {}) });
  try {
    return await decodeFormat(http, opts.format ?? 'raw', opts.log);
  } catch (err) {
    await http.close();
    throw err;
  }
}

/**
 * Wraps a file's source in the decoder its format needs (which then owns and closes it).
 * On failure `file` is left open: the caller closes it.
 */
export async function decodeFormat(file: RemoteSource, format: ImageFormat, log?: Logger): Promise<RemoteSource> {
  if (format === 'raw') return file;
  const head = await readHead(file);
  if (format === 'auto' && !isQcow2(head)) return file;
  return Qcow2Source.open(file, { head, ...(log ? { log } : {}) });
}
