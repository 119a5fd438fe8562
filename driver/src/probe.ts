/** Checks that an image URL answers Range requests, and learns its size, for validate. */
import axios from 'axios';
import { redactUrl } from '../../image-access/src/index.js';
import { DriverError } from './errors.js';

export async function probeImage(url: string, timeoutMs = 10_000, headers: Record<string, string> = {}): Promise<number> {
  const where = redactUrl(url);
  let res;
  try {
    res = await axios.get(url, { headers: { ...headers, Range: 'bytes=0-0' }, responseType: 'arraybuffer', timeout: timeoutMs, validateStatus: () => true, maxRedirects: 5, proxy: false, maxContentLength: 1 << 20 });
  } catch (err) {
    throw new DriverError('DRV_ERR_IMAGE_UNREACHABLE', `${where}: ${(err as Error).message}`, { field: 'instance_info.image_source' });
  }
  if (res.status === 206) {
    const m = /\/(\d+)$/.exec(String(res.headers['content-range'] ?? ''));
    if (m) return Number(m[1]);
  }
  if (res.status === 200) {
    throw new DriverError('DRV_ERR_IMAGE_SOURCE', `${where} ignores Range requests (answered 200 to bytes=0-0); the DPU cannot stream from it`, { field: 'instance_info.image_source' });
  }
  throw new DriverError('DRV_ERR_IMAGE_SOURCE', `${where} answered HTTP ${res.status} to a range request`, { field: 'instance_info.image_source' });
}
