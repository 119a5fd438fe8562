/**
 * The node's config drive, from what Ironic hands the deploy interface to the bytes the
 * DPU agent writes: `instance_info.configdrive` is a gzipped, base64-encoded ISO, or an
 * http(s) URL of one (Ironic's [deploy]configdrive_use_object_store puts it in Swift and
 * passes a temp URL). Decoded as ironic-python-agent's get_configdrive does, and refused
 * with DRV_ERR_CONFIG_DRIVE naming `instance_info.configdrive` when it cannot work.
 */
import axios from 'axios';
import { decodeConfigDrive, MAX_CONFIG_DRIVE_BYTES } from '../../common/src/config-drive.js';
import { redactUrl } from '../../image-access/src/index.js';
import { DriverError } from './errors.js';

const FIELD = 'instance_info.configdrive';

export function isConfigDriveUrl(value: string): boolean {
  return /^https?:\/\//i.test(value);
}

/** Checks what can be checked without the network: an inline drive is decoded and checked whole; a URL must parse. */
export function checkConfigDriveField(value: string | undefined): void {
  if (value === undefined) return;
  if (isConfigDriveUrl(value)) {
    try {
      new URL(value);
    } catch {
      throw new DriverError('DRV_ERR_CONFIG_DRIVE', `${redactUrl(value)} is not a valid URL`, { field: FIELD });
    }
    return;
  }
  decode(value, 'the config drive in instance_info');
}

/** The config drive's image, downloaded if it is a URL. Transient download failures are retryable. */
export async function loadConfigDrive(value: string, timeoutMs: number): Promise<Buffer> {
  if (!isConfigDriveUrl(value)) return decode(value, 'the config drive in instance_info');
  const where = redactUrl(value);
  let data: Buffer;
  try {
    const res = await axios.get<ArrayBuffer>(value, {
      responseType: 'arraybuffer',
      timeout: timeoutMs,
      // Base64 of a gzipped 64 MiB image is at most ~86 MiB (an incompressible one).
      maxContentLength: Math.ceil((MAX_CONFIG_DRIVE_BYTES * 4) / 3) + (1 << 20),
      validateStatus: () => true,
    });
    if (res.status >= 400) {
      const transient = res.status >= 500 || res.status === 408 || res.status === 429;
      throw new DriverError('DRV_ERR_CONFIG_DRIVE', `downloading it from ${where}: HTTP ${res.status}${res.status === 401 || res.status === 403 ? ' (an expired temp URL? Ironic renews it on the next deploy)' : ''}`, { field: FIELD, retryable: transient });
    }
    data = Buffer.from(res.data);
  } catch (err) {
    if (err instanceof DriverError) throw err;
    const e = err as { code?: string; message?: string };
    const tooLarge = /maxContentLength/.test(e.message ?? '');
    throw new DriverError('DRV_ERR_CONFIG_DRIVE', `downloading it from ${where}: ${tooLarge ? 'larger than a 64 MiB config drive can be' : `${e.code ?? ''} ${e.message ?? String(err)}`.trim()}`, { field: FIELD, retryable: !tooLarge, cause: err });
  }
  return decode(data, `the config drive at ${where}`);
}

function decode(data: Buffer | string, what: string): Buffer {
  try {
    return decodeConfigDrive(data);
  } catch (err) {
    throw new DriverError('DRV_ERR_CONFIG_DRIVE', `${what}: ${(err as Error).message}`, { field: FIELD });
  }
}
