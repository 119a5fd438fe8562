/**
 * A bootable disk of any size for the deploy benches: the fixture image of
 * tests/helpers/boot-image.ts (MBR + FAT partition with SYSLINUX, a Debian kernel and a
 * busybox initramfs that prints SMARTNIC-BOOT-OK), padded to `size` with incompressible
 * bytes after its partitions, and its second partition grown to the new end.
 *
 * Why pad instead of asking make-boot-image.sh for the size: the script caches every image
 * it builds under ~/.cache/smartnic (keyed by size), so an 8 GiB request would leave 8 GiB
 * in the cache besides the bench's own copy. The 64 MiB fixture is cached once and the
 * padding is written straight into the bench's work directory.
 *
 * The padding is an AES-CTR keystream of the seed: nothing compresses, no block is zero,
 * so no mode (agent, curl, nbdkit) can shortcut a read, and the bytes are the same for the
 * same seed and size.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { buildBootImage } from '../../tests/helpers/boot-image.js';

const MiB = 2 ** 20;
const SECTOR = 512;
/** The fixture's own size; its partition 2 (random data) starts at 25 MiB. */
const BASE_MIB = 64;
/** MBR partition table: 4 entries of 16 bytes from byte 446; entry 2 is the data partition. */
const PART2_ENTRY = 446 + 16;

/** Cylinder/head/sector bytes of an LBA for 255 heads × 63 sectors, clamped past 1023 cylinders. */
function chs(lba: number): [number, number, number] {
  let c = Math.floor(lba / (255 * 63));
  let h = Math.floor(lba / 63) % 255;
  let s = (lba % 63) + 1;
  if (c > 1023) [c, h, s] = [1023, 254, 63];
  return [h, (s & 63) | ((c >> 2) & 192), c & 255];
}

export interface PaddedImageOptions {
  /** Seed of the padding keystream (default 1). */
  seed?: number;
  /** Called with bytes written so far, every 256 MiB. */
  onProgress?: (written: number, total: number) => void;
}

/**
 * Writes `out` (`size` bytes, a whole number of MiB ≥ 64 MiB): the boot fixture followed by
 * random padding, fsynced. Written under a temporary name and renamed, so a crashed run
 * never leaves a short image behind under the final name.
 */
export async function buildPaddedBootImage(out: string, size: number, opts: PaddedImageOptions = {}): Promise<void> {
  if (size % MiB !== 0 || size < BASE_MIB * MiB) throw new Error(`padded boot image: size ${size} must be a whole number of MiB, at least ${BASE_MIB} MiB`);
  if (size / SECTOR > 0xffffffff) throw new Error('padded boot image: an MBR partition table cannot describe more than 2 TiB');
  const tmp = `${out}.tmp`;
  await buildBootImage(tmp, { sizeMiB: BASE_MIB });

  const fd = fs.openSync(tmp, 'r+');
  try {
    // Grow partition 2 to the end of the disk, so the guest sees a consistent table.
    const entry = Buffer.alloc(16);
    fs.readSync(fd, entry, 0, 16, PART2_ENTRY);
    const start = entry.readUInt32LE(8);
    const sectors = size / SECTOR - start;
    entry.set(chs(start + sectors - 1), 5);
    entry.writeUInt32LE(sectors, 12);
    fs.writeSync(fd, entry, 0, 16, PART2_ENTRY);

    const key = crypto.createHash('sha256').update(`deploy-modes-padding-${opts.seed ?? 1}`).digest();
    const cipher = crypto.createCipheriv('aes-256-ctr', key, Buffer.alloc(16));
    const zeros = Buffer.alloc(16 * MiB);
    for (let off = BASE_MIB * MiB; off < size; off += zeros.length) {
      const n = Math.min(zeros.length, size - off);
      const chunk = cipher.update(n === zeros.length ? zeros : zeros.subarray(0, n));
      fs.writeSync(fd, chunk, 0, n, off);
      if (opts.onProgress && (off + n) % (256 * MiB) === 0) opts.onProgress(off + n, size);
    }
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
  fs.renameSync(tmp, out);
  const dirFd = fs.openSync(path.dirname(out), 'r');
  fs.fsyncSync(dirFd);
  fs.closeSync(dirFd);
}
