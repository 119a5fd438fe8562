/**
 * What a config drive is, for both programs: the driver service decodes what Ironic gives
 * it (a gzipped, base64-encoded ISO, or a URL of one) and refuses a bad one at validate;
 * the DPU agent checks it again before writing it onto a disk. Ironic, Nova and
 * openstacksdk build an ISO 9660 labelled `config-2`; a FAT image with that label works
 * with cloud-init as well. ironic-python-agent takes at most 64 MiB.
 */
import { gunzipSync } from 'node:zlib';

export const MAX_CONFIG_DRIVE_BYTES = 64 << 20;
export const CONFIG_DRIVE_LABEL = 'config-2';

/** The filesystem and its label at the start of `head` (≥ 34 KiB for an ISO), or null if it is neither ISO 9660 nor FAT. */
export function filesystemLabel(head: Buffer): { fs: 'iso9660' | 'vfat'; label: string } | null {
  // ISO 9660: the primary volume descriptor at 32 KiB, "CD001", volume id at +40 (32 bytes).
  if (head.length >= 32768 + 72 && head.toString('latin1', 32769, 32774) === 'CD001') {
    return { fs: 'iso9660', label: head.toString('latin1', 32768 + 40, 32768 + 72).trimEnd() };
  }
  // FAT: boot sector signature, and the file system type string of FAT12/16 or FAT32.
  if (head.length >= 512 && head.readUInt16LE(510) === 0xaa55) {
    if (head.toString('latin1', 0x36, 0x39) === 'FAT') return { fs: 'vfat', label: head.toString('latin1', 0x2b, 0x36).trimEnd() };
    if (head.toString('latin1', 0x52, 0x57) === 'FAT32') return { fs: 'vfat', label: head.toString('latin1', 0x47, 0x52).trimEnd() };
  }
  return null;
}

/** Why cloud-init could not use `drive` (what is wrong and what to give instead), or null. */
export function configDriveProblem(drive: Buffer): string | null {
  if (drive.length === 0) return 'the config drive is empty';
  if (drive.length > MAX_CONFIG_DRIVE_BYTES) {
    return `the config drive is ${(drive.length / 2 ** 20).toFixed(1)} MiB; ironic-python-agent and the DPU agent take at most 64 MiB`;
  }
  const fs = filesystemLabel(drive);
  if (!fs) return 'the config drive is neither an ISO 9660 nor a FAT filesystem image: give the ISO Ironic builds (openstack baremetal node deploy --config-drive), gzipped and base64-encoded, or its URL';
  if (fs.label.toLowerCase() !== CONFIG_DRIVE_LABEL) {
    return `the config drive's ${fs.fs} filesystem is labelled "${fs.label}"; cloud-init's ConfigDrive datasource only finds one labelled "${CONFIG_DRIVE_LABEL}"`;
  }
  return null;
}

const BASE64 = /^[A-Za-z0-9+/\s]*={0,2}\s*$/;

/**
 * The config drive's image from what Ironic stores (ironic-python-agent's get_configdrive):
 * base64 of a gzipped image, or, from a URL, those bytes or the image itself.
 * @throws Error whose message says what is wrong (callers wrap it in their error code).
 */
export function decodeConfigDrive(data: Buffer | string): Buffer {
  let bytes: Buffer;
  if (typeof data !== 'string' && (filesystemLabel(data) || isGzip(data))) {
    bytes = data; // a URL that serves the image itself, or gzipped without base64
  } else {
    const text = typeof data === 'string' ? data : data.toString('latin1');
    if (!BASE64.test(text)) throw new Error('the config drive is neither base64 text nor an ISO or FAT image (Ironic stores it gzipped and base64-encoded)');
    bytes = Buffer.from(text, 'base64');
  }
  if (isGzip(bytes)) {
    try {
      bytes = gunzipSync(bytes, { maxOutputLength: MAX_CONFIG_DRIVE_BYTES + 1 });
    } catch (err) {
      const e = err as NodeJS.ErrnoException;
      if (e.code === 'ERR_BUFFER_TOO_LARGE') throw new Error('the config drive inflates to more than 64 MiB; ironic-python-agent and the DPU agent take at most 64 MiB');
      throw new Error(`the config drive does not gunzip: ${e.message}`);
    }
  }
  const problem = configDriveProblem(bytes);
  if (problem) throw new Error(problem);
  return bytes;
}

function isGzip(b: Buffer): boolean {
  return b.length >= 2 && b[0] === 0x1f && b[1] === 0x8b;
}
