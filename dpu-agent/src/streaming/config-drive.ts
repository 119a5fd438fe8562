/**
 * The config drive, written the way ironic-python-agent writes it for a whole-disk image
 * (`partition_utils.create_config_drive_partition`), but by the DPU onto the disk it
 * emulates, before the host is powered on.
 *
 * What IPA does, and so what this does:
 *   1. A partition whose filesystem is labelled `config-2` already exists: the drive is
 *      written into it (after 2).
 *   2. GPT (`sgdisk -e`): the backup header and entries move to the disk's end, the last
 *      usable sector with them, and the protective MBR covers the whole disk: a root disk
 *      larger than the image gains its new space.
 *   3. GPT: a partition is added as `sgdisk -n 0:-64MB:0` adds it: it ends at the end of
 *      the largest free block and starts 64 MiB before, aligned down to 2048 sectors
 *      (type 8300, a new unique GUID, no name).
 *      MBR: as `parted -a optimal -- mkpart primary fat32 -64MiB -0`: the last 64 MiB of
 *      the disk, or on a disk over 2 TiB the 64 MiB below 2 TiB (MBR addresses no more);
 *      a disk with four primary partitions is refused (IPA does not use logical ones).
 *   4. The drive's bytes are written at the partition's start.
 * The drive is at most 64 MiB and must be an ISO 9660 or FAT image labelled `config-2`
 * (what cloud-init's ConfigDrive datasource looks for).
 *
 * Everything goes through the disk's own write path: the image's sectors the tables live
 * in are fetched and rewritten like any host write; the drive's bytes, past the image on a
 * larger root disk, are never fetched. The order makes a retry after a crash safe: the
 * drive first and a flush, then the backup table, the primary table and a flush; a table
 * that names the partition therefore finds the drive's label in it, and a rerun reuses it.
 */
import { randomUUID } from 'node:crypto';
import { crc32 } from 'node:zlib';
import { CONFIG_DRIVE_LABEL, MAX_CONFIG_DRIVE_BYTES, configDriveProblem, filesystemLabel } from '../../../common/src/config-drive.js';
import type { BlockBackend } from '../block/backend.js';
import { DpuError } from '../../../image-access/src/errors.js';

const SECTOR = 512;
const MIB_SECTORS = (1 << 20) / SECTOR;
/** sgdisk's -64MB and parted's -64MiB: the same 64 MiB. */
const PART_SECTORS = MAX_CONFIG_DRIVE_BYTES / SECTOR;
const ALIGN = 2048;
/** The last sector an MBR can address, as IPA counts it (2 TiB). */
const MBR_LIMIT_SECTORS = 2 ** 32;
const LINUX_FS_GUID = '0FC63DAF-8483-4772-8E79-3D69D8477DE4';

export interface ConfigDrivePlacement {
  table: 'gpt' | 'mbr';
  /** 1-based partition number. */
  partition: number;
  /** Bytes. */
  offset: number;
  /** The partition's length in bytes (the drive may be shorter). */
  length: number;
  /** An existing `config-2` partition was reused. */
  reused: boolean;
}

const bad = (why: string, field = 'config_drive'): DpuError => new DpuError('DPU_ERR_CONFIG_DRIVE', why, { field });

/** Refuses what cloud-init could not use, naming what is wrong. */
export function checkConfigDrive(drive: Buffer): void {
  const problem = configDriveProblem(drive);
  if (problem) throw bad(problem);
}

interface Part {
  number: number;
  first: number;
  last: number;
}

async function read(disk: BlockBackend, offset: number, length: number): Promise<Buffer> {
  const buf = Buffer.alloc(length);
  await disk.read(offset, buf);
  return buf;
}

async function write(disk: BlockBackend, offset: number, data: Buffer): Promise<void> {
  await disk.write(offset, [data], data.length, false);
}

/** Whether the partition's filesystem is labelled config-2 (IPA looks with lsblk). */
async function labelledConfigDrive(disk: BlockBackend, p: Part): Promise<boolean> {
  const length = Math.min((p.last - p.first + 1) * SECTOR, 32768 + 2048);
  if (length < SECTOR) return false;
  const fs = filesystemLabel(await read(disk, p.first * SECTOR, length));
  return fs !== null && fs.label.toLowerCase() === CONFIG_DRIVE_LABEL;
}

/** The partition already labelled config-2 (IPA reuses it), if any; refused when the drive does not fit in it. */
async function reusable(disk: BlockBackend, table: ConfigDrivePlacement['table'], parts: Part[], drive: Buffer): Promise<ConfigDrivePlacement | null> {
  for (const p of parts) {
    if (!(await labelledConfigDrive(disk, p))) continue;
    const length = (p.last - p.first + 1) * SECTOR;
    if (length < drive.length) throw bad(`the image's config-2 partition ${p.number} holds ${length} bytes, the config drive is ${drive.length}`);
    return { table, partition: p.number, offset: p.first * SECTOR, length, reused: true };
  }
  return null;
}

/**
 * Writes `drive` onto `disk` as IPA does (see the top of this file) and makes it durable.
 * @throws DPU_ERR_CONFIG_DRIVE when it cannot, having written nothing.
 */
export async function writeConfigDrive(disk: BlockBackend, drive: Buffer): Promise<ConfigDrivePlacement> {
  checkConfigDrive(drive);
  if (disk.size % SECTOR !== 0) throw bad(`the disk's size, ${disk.size} bytes, is not a whole number of 512-byte sectors`, 'size');
  const head = await read(disk, 0, 34 * SECTOR);
  if (head.readUInt16LE(510) !== 0xaa55) {
    throw bad('the image has no partition table (no MBR signature in its first sector): a whole-disk image with a GPT or MBR partition table is needed for a config drive', 'source');
  }
  const mbrParts = [0, 1, 2, 3].map((i) => head.subarray(446 + 16 * i, 462 + 16 * i));
  const placement = mbrParts.some((e) => e[4] === 0xee) ? await writeGpt(disk, head, drive) : await writeMbr(disk, head, mbrParts, drive);
  await disk.flush();
  return placement;
}

// ------------------------------------------------------------------------------- GPT

async function writeGpt(disk: BlockBackend, head: Buffer, drive: Buffer): Promise<ConfigDrivePlacement> {
  const hdr = Buffer.from(head.subarray(SECTOR, 2 * SECTOR));
  if (hdr.toString('latin1', 0, 8) !== 'EFI PART') throw bad('the protective MBR announces a GPT, but sector 1 holds no GPT header', 'source');
  const hdrSize = hdr.readUInt32LE(12);
  if (hdrSize < 92 || hdrSize > SECTOR) throw bad(`the GPT header size ${hdrSize} is invalid`, 'source');
  const hdrCrc = hdr.readUInt32LE(16);
  hdr.writeUInt32LE(0, 16);
  if (crc32(hdr.subarray(0, hdrSize)) !== hdrCrc) throw bad('the primary GPT header fails its CRC: the image\'s partition table is damaged', 'source');
  const entriesLba = Number(hdr.readBigUInt64LE(72));
  const count = hdr.readUInt32LE(80);
  const esize = hdr.readUInt32LE(84);
  if (esize < 128 || esize % 8 !== 0 || count === 0 || count * esize > 1 << 20 || entriesLba < 2) throw bad(`the GPT describes ${count} entries of ${esize} bytes at sector ${entriesLba}: not a table this agent can edit`, 'source');
  const entriesBytes = count * esize;
  const entrySectors = Math.ceil(entriesBytes / SECTOR);
  const entries = await read(disk, entriesLba * SECTOR, entrySectors * SECTOR);
  if (crc32(entries.subarray(0, entriesBytes)) !== hdr.readUInt32LE(88)) throw bad('the GPT partition entries fail their CRC: the image\'s partition table is damaged', 'source');

  const diskSectors = disk.size / SECTOR;
  const firstUsable = Number(hdr.readBigUInt64LE(40));
  const backupLba = diskSectors - 1;
  const backupEntriesLba = backupLba - entrySectors;
  const lastUsable = backupEntriesLba - 1;
  const parts: Part[] = [];
  let freeSlot = -1;
  for (let i = 0; i < count; i++) {
    const e = entries.subarray(i * esize, (i + 1) * esize);
    if (e.subarray(0, 16).every((b) => b === 0)) {
      if (freeSlot < 0) freeSlot = i;
      continue;
    }
    const p = { number: i + 1, first: Number(e.readBigUInt64LE(32)), last: Number(e.readBigUInt64LE(40)) };
    if (p.last > lastUsable) throw bad(`partition ${p.number} ends at sector ${p.last}, past the disk's last usable sector ${lastUsable}`, 'source');
    parts.push(p);
  }

  let placement = await reusable(disk, 'gpt', parts, drive);
  if (!placement) {
    if (freeSlot < 0) throw bad(`the GPT has no free entry among its ${count} for a config drive partition`, 'source');
    // sgdisk: the largest free block; -64MB from its end, aligned down; 0 = its end.
    const sorted = [...parts].sort((a, b) => a.first - b.first);
    let best = { first: 0, last: -1 };
    let cursor = firstUsable;
    for (const p of [...sorted, { number: 0, first: lastUsable + 1, last: lastUsable }]) {
      if (p.first > cursor && p.first - cursor > best.last - best.first + 1) best = { first: cursor, last: p.first - 1 };
      cursor = Math.max(cursor, p.last + 1);
    }
    const first = Math.floor((best.last - PART_SECTORS) / ALIGN) * ALIGN;
    if (best.last < best.first || first < best.first || (best.last - first + 1) * SECTOR < drive.length) {
      throw bad(`the disk has no 64 MiB free after the image's partitions (largest free block: ${Math.max(0, best.last - best.first + 1)} sectors): give the node a root disk larger than the image (instance_info root_gb)`, 'size');
    }
    const e = entries.subarray(freeSlot * esize, (freeSlot + 1) * esize);
    e.fill(0);
    guidBytes(LINUX_FS_GUID).copy(e, 0);
    guidBytes(randomUUID()).copy(e, 16);
    e.writeBigUInt64LE(BigInt(first), 32);
    e.writeBigUInt64LE(BigInt(best.last), 40);
    placement = { table: 'gpt', partition: freeSlot + 1, offset: first * SECTOR, length: (best.last - first + 1) * SECTOR, reused: false };
  }

  // The drive, durable before any table names it (a rerun after a crash must find the
  // partition by its label), then the backup table at the disk's end, then the primary.
  await write(disk, placement.offset, drive);
  await disk.flush();
  const entriesCrc = crc32(entries.subarray(0, entriesBytes));
  const primary = Buffer.from(head.subarray(SECTOR, 2 * SECTOR));
  primary.writeBigUInt64LE(BigInt(1), 24);
  primary.writeBigUInt64LE(BigInt(backupLba), 32);
  primary.writeBigUInt64LE(BigInt(lastUsable), 48);
  primary.writeUInt32LE(entriesCrc, 88);
  const backup = Buffer.from(primary);
  backup.writeBigUInt64LE(BigInt(backupLba), 24);
  backup.writeBigUInt64LE(BigInt(1), 32);
  backup.writeBigUInt64LE(BigInt(backupEntriesLba), 72);
  for (const h of [primary, backup]) {
    h.writeUInt32LE(0, 16);
    h.writeUInt32LE(crc32(h.subarray(0, hdrSize)), 16);
  }
  await write(disk, backupEntriesLba * SECTOR, Buffer.concat([entries, backup]));
  await write(disk, entriesLba * SECTOR, entries);
  await write(disk, SECTOR, primary);
  // The protective MBR covers the whole disk (up to what 32 bits count).
  const mbr = Buffer.from(head.subarray(0, SECTOR));
  for (let i = 0; i < 4; i++) {
    const o = 446 + 16 * i;
    if (mbr[o + 4] !== 0xee) continue;
    mbr.writeUInt32LE(Math.min(diskSectors - 1, 0xffffffff), o + 12);
    chs(Math.min(diskSectors - 1, 0xffffffff)).copy(mbr, o + 5);
  }
  if (!mbr.equals(head.subarray(0, SECTOR))) await write(disk, 0, mbr);
  return placement;
}

/** A GUID's on-disk bytes: the first three fields little-endian, the rest as written. */
function guidBytes(text: string): Buffer {
  const h = text.replace(/-/g, '');
  const b = Buffer.from(h, 'hex');
  b.subarray(0, 4).reverse();
  b.subarray(4, 6).reverse();
  b.subarray(6, 8).reverse();
  return b;
}

/** The CHS address of an LBA (255 heads, 63 sectors), or its "too large" form. */
function chs(lba: number): Buffer {
  const c = Math.floor(lba / (255 * 63));
  if (c > 1023) return Buffer.from([0xfe, 0xff, 0xff]);
  const h = Math.floor(lba / 63) % 255;
  const s = (lba % 63) + 1;
  return Buffer.from([h, ((c >> 2) & 0xc0) | s, c & 0xff]);
}

// ------------------------------------------------------------------------------- MBR

async function writeMbr(disk: BlockBackend, head: Buffer, entries: Buffer[], drive: Buffer): Promise<ConfigDrivePlacement> {
  const parts: Part[] = [];
  entries.forEach((e, i) => {
    if (e[4] !== 0) parts.push({ number: i + 1, first: e.readUInt32LE(8), last: e.readUInt32LE(8) + e.readUInt32LE(12) - 1 });
  });
  const reused = await reusable(disk, 'mbr', parts, drive);
  if (reused) {
    await write(disk, reused.offset, drive);
    return reused;
  }
  if (parts.length >= 4) {
    throw bad('the image uses MBR partitioning and already has four primary partitions: no config drive partition can be added (ironic-python-agent refuses this too); use a GPT image or one with at most three primary partitions', 'source');
  }
  const diskSectors = disk.size / SECTOR;
  // parted: "-64MiB" to "-0"; on a disk over 2 TiB, the 64 MiB below 2 TiB, 1 MiB spare.
  const large = diskSectors > MBR_LIMIT_SECTORS;
  const last = large ? MBR_LIMIT_SECTORS - MIB_SECTORS - 1 : diskSectors - 1;
  const first = large ? MBR_LIMIT_SECTORS - (64 + 1) * MIB_SECTORS : Math.floor((diskSectors - PART_SECTORS) / MIB_SECTORS) * MIB_SECTORS;
  const clash = parts.find((p) => p.first <= last && p.last >= first);
  if (first < MIB_SECTORS || clash) {
    throw bad(`the last 64 MiB of the disk${large ? ' below 2 TiB' : ''} (sectors ${first}-${last}) are not free${clash ? ` (partition ${clash.number} ends at sector ${clash.last})` : ''}: give the node a root disk larger than the image (instance_info root_gb)`, 'size');
  }
  const slot = entries.findIndex((e) => e[4] === 0);
  const mbr = Buffer.from(head.subarray(0, SECTOR));
  const o = 446 + 16 * slot;
  mbr.fill(0, o, o + 16);
  chs(first).copy(mbr, o + 1);
  mbr[o + 4] = 0x0c; // W95 FAT32 (LBA): what parted's "fat32" writes
  chs(last).copy(mbr, o + 5);
  mbr.writeUInt32LE(first, o + 8);
  mbr.writeUInt32LE(last - first + 1, o + 12);
  await write(disk, first * SECTOR, drive);
  await disk.flush();
  await write(disk, 0, mbr);
  return { table: 'mbr', partition: slot + 1, offset: first * SECTOR, length: (last - first + 1) * SECTOR, reused: false };
}
