/**
 * Image resolution: what URL the DPU agent reads for a node's instance_info. Today an
 * http(s) URL of a raw image; Glance images and Swift temp URLs come with issue #5.
 */
import { redactUrl } from '../../dpu-agent/src/remote/redact.js';
import type { DeploymentCreate } from '../../openapi/clients/driver-client.js';
import { DriverError } from './errors.js';

export interface ResolvedImage {
  url: string;
  /** A stable name of the content, when the caller told us one (checksums). */
  identity?: string;
}

export function resolveImage(info: DeploymentCreate['instance_info']): ResolvedImage {
  const src = info.image_source;
  let url: URL;
  try {
    url = new URL(src);
  } catch {
    throw new DriverError('DRV_ERR_IMAGE_SOURCE', `instance_info.image_source "${redactUrl(src)}" is not a URL; give an http(s) URL of a raw image (Glance image ids are not supported yet)`, { field: 'instance_info.image_source' });
  }
  if (url.protocol !== 'http:' && url.protocol !== 'https:') {
    throw new DriverError('DRV_ERR_IMAGE_SOURCE', `instance_info.image_source scheme "${url.protocol}" is not supported; give an http(s) URL of a raw image`, { field: 'instance_info.image_source' });
  }
  const hash = info.image_os_hash_value ? `${info.image_os_hash_algo ?? 'sha512'}=${info.image_os_hash_value}` : info.image_checksum ? `md5=${info.image_checksum}` : undefined;
  return { url: src, ...(hash ? { identity: `image;${hash}` } : {}) };
}
