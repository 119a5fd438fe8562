/**
 * The region map: which parts of the disk are on the local target.
 *
 * The disk is cut into regions of `regionSize` bytes (a power of two, 1 MiB by default;
 * the last region may be short). Each region is in one of four states:
 *
 *   remote  — the local target's bytes for this region mean nothing (they may be the
 *             previous tenant's): reads must come from the image.
 *   zero    — the region reads as zeros (a WRITE_ZEROES or TRIM covered it whole); the
 *             local bytes still mean nothing until the zeros are written there.
 *   filling — transient, never persisted as such: a fetch, a zero fill or a whole-region
 *             host write is putting the region's bytes on the local target. Everyone else
 *             waits. A commit persists it as the state it had before the fill (remote or
 *             zero): a flushed WRITE_ZEROES must still read as zeros after a power cut that
 *             comes while a later write or the zero fill is under way.
 *   local   — the local target holds the region's bytes (perhaps only in the page cache).
 *
 *        read miss / hydrator          write lands
 *   remote ──────────────> filling ──────────────> local
 *     │  ▲   whole-region host write ┘      ▲        │
 *     │  └── fetch failed ──────────────────┘(retry) │ WRITE_ZEROES / TRIM whole region
 *     └──────────── WRITE_ZEROES / TRIM ────> zero <─┘
 *                                             └──── zero fill ──> filling ──> local
 *
 * Durability order (dm-clone's 2019 fix, commit "dm clone: Flush destination device before
 * committing metadata"): the persistent map may say `local` only for a region whose data is
 * durable on the target. A commit therefore (1) snapshots the in-memory states, (2) runs
 * fdatasync on the target — every region `local` in the snapshot had its bytes written
 * before the snapshot, so they are now durable — and only then (3) writes the snapshot to
 * the map file and fdatasyncs that. A crash between (2) and (3) leaves the old map, which
 * at worst re-fetches regions whose fetched data was already durable: never the reverse.
 * `zero` needs no data on the target, so it is safe to persist at any time.
 *
 * The map file holds two slots, each a header with a sequence number and a CRC-32 over the
 * slot, followed by a `local` bitmap and a `zero` bitmap. A commit overwrites the older
 * slot; a torn write can only damage that slot, and loading picks the valid slot with the
 * highest sequence number. So an update is atomic without a rename.
 */
import fs from 'node:fs';
import path from 'node:path';
import { createHash } from 'node:crypto';
import { crc32 } from 'node:zlib';
import { DpuError } from '../../../image-access/src/errors.js';
import { fsyncDir } from '../local/atomic-file.js';

export const RegionState = {
  Remote: 0,
  Zero: 1,
  Filling: 2,
  Local: 3,
} as const;
export type RegionState = (typeof RegionState)[keyof typeof RegionState];
export const REGION_STATE_NAMES: Record<RegionState, 'remote' | 'zero' | 'filling' | 'local'> = {
  0: 'remote',
  1: 'zero',
  2: 'filling',
  3: 'local',
};

const MAGIC = Buffer.from('SNICRMAP', 'ascii');
const FORMAT_VERSION = 1;
const HEADER_BYTES = 96;
const FLAG_COMPLETE = 1;
const MAP_FILE = 'regions.map';

/*
 * Slot header, little-endian:
 *    0  magic "SNICRMAP"        8
 *    8  format version u32      4
 *   12  header bytes u32        4
 *   16  sequence u64            8
 *   24  disk size u64           8
 *   32  region shift u32        4
 *   36  flags u32               4   (bit 0: complete — every region local, source closed)
 *   40  region count u32        4
 *   44  crc32 u32               4   (over the whole slot with this field zero)
 *   48  source identity        32   (sha256 of the image identity: size, ETag, checksum)
 *   80  reserved               16
 *   96  local bitmap, then zero bitmap, ceil(count/8) bytes each; slot padded to 4 KiB
 */

export interface RegionMapGeometry {
  diskSize: number;
  regionSize: number;
  /** What identifies the image (size, ETag, checksum); a resume against another image is refused. */
  identity: string;
}

export interface MapSnapshot {
  bytes: Buffer;
  version: number;
}

export class RegionMap {
  readonly diskSize: number;
  readonly regionSize: number;
  readonly regionShift: number;
  readonly count: number;
  readonly states: Uint8Array;
  /** For a `filling` region: the state it had before (what a commit persists for it). */
  private readonly beforeFill: Uint8Array;
  private readonly identityHash: Buffer;
  private readonly file: string;
  private fd: number;
  private seq: number;
  private readonly slotBytes: number;
  private readonly bitmapBytes: number;
  private localRegions = 0;
  private zeroRegions = 0;
  /** Bumped on every change a commit must persist; compared with `persistedVersion`. */
  private version = 0;
  private persistedVersion = 0;
  private completeFlag = false;

  private constructor(dir: string, geo: RegionMapGeometry, fd: number) {
    this.diskSize = geo.diskSize;
    this.regionSize = geo.regionSize;
    this.regionShift = Math.log2(geo.regionSize);
    this.count = Math.ceil(geo.diskSize / geo.regionSize);
    this.states = new Uint8Array(this.count);
    this.beforeFill = new Uint8Array(this.count);
    this.identityHash = createHash('sha256').update(geo.identity).digest();
    this.file = path.join(dir, MAP_FILE);
    this.fd = fd;
    this.seq = 0;
    this.bitmapBytes = Math.ceil(this.count / 8);
    this.slotBytes = Math.ceil((HEADER_BYTES + 2 * this.bitmapBytes) / 4096) * 4096;
  }

  /** Opens the map in `dir`, creating it (all regions remote) if there is none. */
  static open(dir: string, geo: RegionMapGeometry): RegionMap {
    validateGeometry(geo);
    fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
    const file = path.join(dir, MAP_FILE);
    const existed = fs.existsSync(file);
    const fd = fs.openSync(file, fs.constants.O_RDWR | fs.constants.O_CREAT, 0o600);
    const map = new RegionMap(dir, geo, fd);
    if (existed) {
      map.load();
    } else {
      // Write sequence 1 so the file is valid from the start, and make the
      // directory entry durable: a map that vanished after a crash would turn
      // flushed host writes back into `remote`.
      map.version = 1;
      map.writeSlot(map.snapshot());
      fs.fdatasyncSync(fd);
      fsyncDir(dir);
    }
    return map;
  }

  private load(): void {
    const size = fs.fstatSync(this.fd).size;
    const slots: { seq: number; buf: Buffer }[] = [];
    for (let i = 0; i < 2; i++) {
      const start = i * this.slotBytes;
      if (size < start + HEADER_BYTES) continue;
      const buf = Buffer.alloc(this.slotBytes);
      fs.readSync(this.fd, buf, 0, this.slotBytes, start);
      const seq = this.validSlotSeq(buf);
      if (seq !== null) slots.push({ seq, buf });
    }
    if (slots.length === 0) {
      // Tell apart "another geometry" from "damaged": read the first header loosely.
      const head = Buffer.alloc(HEADER_BYTES);
      fs.readSync(this.fd, head, 0, HEADER_BYTES, 0);
      if (head.subarray(0, 8).equals(MAGIC)) {
        const disk = Number(head.readBigUInt64LE(24));
        const shift = head.readUInt32LE(32);
        const ident = head.subarray(48, 80);
        if (!ident.equals(this.identityHash) || disk !== this.diskSize) {
          throw new DpuError('DPU_ERR_SOURCE_MISMATCH', `${this.file} was made for another image (${disk} bytes); use a new --state directory or delete this one`);
        }
        if (shift !== this.regionShift) {
          throw new DpuError('DPU_ERR_CONFIG', `${this.file} uses ${2 ** shift}-byte regions, not ${this.regionSize}; drop --region-size or use a new --state directory`);
        }
      }
      throw new DpuError('DPU_ERR_STATE_CORRUPT', `${this.file}: no valid slot (bad magic, version or checksum); move it away to start the disk from scratch`);
    }
    slots.sort((a, b) => b.seq - a.seq);
    const { seq, buf } = slots[0]!;
    this.seq = seq;
    this.completeFlag = (buf.readUInt32LE(36) & FLAG_COMPLETE) !== 0;
    const local = buf.subarray(HEADER_BYTES, HEADER_BYTES + this.bitmapBytes);
    const zero = buf.subarray(HEADER_BYTES + this.bitmapBytes, HEADER_BYTES + 2 * this.bitmapBytes);
    for (let r = 0; r < this.count; r++) {
      const bit = 1 << (r & 7);
      if (local[r >> 3]! & bit) this.states[r] = RegionState.Local;
      else if (zero[r >> 3]! & bit) this.states[r] = RegionState.Zero;
    }
    this.recount();
    this.persistedVersion = this.version;
  }

  private validSlotSeq(buf: Buffer): number | null {
    if (!buf.subarray(0, 8).equals(MAGIC)) return null;
    if (buf.readUInt32LE(8) !== FORMAT_VERSION || buf.readUInt32LE(12) !== HEADER_BYTES) return null;
    const stored = buf.readUInt32LE(44);
    buf.writeUInt32LE(0, 44);
    const actual = crc32(buf);
    buf.writeUInt32LE(stored, 44);
    if (stored !== actual) return null;
    if (Number(buf.readBigUInt64LE(24)) !== this.diskSize) return null;
    if (buf.readUInt32LE(32) !== this.regionShift) return null;
    if (buf.readUInt32LE(40) !== this.count) return null;
    if (!buf.subarray(48, 80).equals(this.identityHash)) return null;
    return Number(buf.readBigUInt64LE(16));
  }

  private recount(): void {
    let local = 0;
    let zero = 0;
    for (const s of this.states) {
      if (s === RegionState.Local) local++;
      else if (s === RegionState.Zero) zero++;
    }
    this.localRegions = local;
    this.zeroRegions = zero;
  }

  get local(): number {
    return this.localRegions;
  }

  get zero(): number {
    return this.zeroRegions;
  }

  /** Every region is local. */
  get allLocal(): boolean {
    return this.localRegions === this.count;
  }

  /** The persisted map says the disk has cut over (all local, source closed). */
  get complete(): boolean {
    return this.completeFlag;
  }

  get dirty(): boolean {
    return this.version !== this.persistedVersion;
  }

  state(r: number): RegionState {
    return this.states[r] as RegionState;
  }

  set(r: number, s: RegionState): void {
    const old = this.states[r] as RegionState;
    if (old === s) return;
    if (old === RegionState.Local) this.localRegions--;
    else if (old === RegionState.Zero) this.zeroRegions--;
    if (s === RegionState.Local) this.localRegions++;
    else if (s === RegionState.Zero) this.zeroRegions++;
    // `filling` persists as the state before it: moving in or out of it changes the
    // snapshot only when the persisted meaning (local / zero / neither) changes.
    const before = this.persisted(r);
    if (s === RegionState.Filling) this.beforeFill[r] = old;
    this.states[r] = s;
    if (this.persisted(r) !== before) this.version++;
  }

  /** What a commit writes for region r. */
  private persisted(r: number): RegionState {
    const s = this.states[r] as RegionState;
    return s === RegionState.Filling ? (this.beforeFill[r] as RegionState) : s;
  }

  regionOf(offset: number): number {
    return Math.floor(offset / this.regionSize);
  }

  regionStart(r: number): number {
    return r * this.regionSize;
  }

  regionLength(r: number): number {
    return Math.min(this.regionSize, this.diskSize - r * this.regionSize);
  }

  markComplete(): void {
    if (!this.completeFlag) {
      this.completeFlag = true;
      this.version++;
    }
  }

  /**
   * Step (1) of a commit: the bytes of the next slot, taken now. Regions that are
   * `filling` are persisted as what they were before (remote or zero): never as local,
   * and never a flushed `zero` turned back into `remote`.
   */
  snapshot(): MapSnapshot {
    const buf = Buffer.alloc(this.slotBytes);
    MAGIC.copy(buf, 0);
    buf.writeUInt32LE(FORMAT_VERSION, 8);
    buf.writeUInt32LE(HEADER_BYTES, 12);
    buf.writeBigUInt64LE(BigInt(this.seq + 1), 16);
    buf.writeBigUInt64LE(BigInt(this.diskSize), 24);
    buf.writeUInt32LE(this.regionShift, 32);
    buf.writeUInt32LE(this.completeFlag ? FLAG_COMPLETE : 0, 36);
    buf.writeUInt32LE(this.count, 40);
    this.identityHash.copy(buf, 48);
    const localOff = HEADER_BYTES;
    const zeroOff = HEADER_BYTES + this.bitmapBytes;
    const states = this.states;
    for (let r = 0; r < this.count; r++) {
      let s = states[r];
      if (s === RegionState.Filling) s = this.beforeFill[r];
      if (s === RegionState.Local) buf[localOff + (r >> 3)]! |= 1 << (r & 7);
      else if (s === RegionState.Zero) buf[zeroOff + (r >> 3)]! |= 1 << (r & 7);
    }
    buf.writeUInt32LE(crc32(buf), 44);
    return { bytes: buf, version: this.version };
  }

  /**
   * Step (3) of a commit: write a snapshot taken before the target's fdatasync. The caller
   * orders the steps (see StreamingDisk.commit); this only makes the slot write durable.
   */
  async persist(snap: MapSnapshot): Promise<void> {
    const seq = Number(snap.bytes.readBigUInt64LE(16));
    if (seq <= this.seq) return; // a newer snapshot was already persisted
    await writeAll(this.fd, snap.bytes, (seq % 2) * this.slotBytes);
    await new Promise<void>((resolve, reject) => fs.fdatasync(this.fd, (e) => (e ? reject(e) : resolve())));
    this.seq = seq;
    if (snap.version > this.persistedVersion) this.persistedVersion = snap.version;
  }

  /** The first write: both slots get the same snapshot, so slot 0 always has a header. */
  private writeSlot(snap: MapSnapshot): void {
    for (const slot of [0, 1]) fs.writeSync(this.fd, snap.bytes, 0, snap.bytes.length, slot * this.slotBytes);
    this.seq = Number(snap.bytes.readBigUInt64LE(16));
    this.persistedVersion = snap.version;
  }

  /** The states as one character per region (r remote, z zero, f filling, L local): for tests and tools. */
  describe(): string {
    const chars = ['r', 'z', 'f', 'L'];
    let out = '';
    for (const s of this.states) out += chars[s];
    return out;
  }

  close(): void {
    if (this.fd >= 0) {
      fs.closeSync(this.fd);
      this.fd = -1;
    }
  }
}

function validateGeometry(geo: RegionMapGeometry): void {
  const { regionSize, diskSize } = geo;
  if (!Number.isSafeInteger(regionSize) || regionSize < 4096 || regionSize > 1 << 30 || (regionSize & (regionSize - 1)) !== 0) {
    throw new DpuError('DPU_ERR_CONFIG', `region size ${regionSize} must be a power of two between 4 KiB and 1 GiB`);
  }
  if (!Number.isSafeInteger(diskSize) || diskSize <= 0) {
    throw new DpuError('DPU_ERR_CONFIG', `disk size ${diskSize} must be a positive integer`);
  }
  if (Math.ceil(diskSize / regionSize) > 0xffffffff) {
    throw new DpuError('DPU_ERR_CONFIG', `${diskSize} bytes in ${regionSize}-byte regions is more than 2^32 regions; use a larger --region-size`);
  }
}

function writeAll(fd: number, buf: Buffer, position: number): Promise<void> {
  return new Promise((resolve, reject) => {
    const step = (done: number): void => {
      if (done === buf.length) return resolve();
      fs.write(fd, buf, done, buf.length - done, position + done, (err, n) => (err ? reject(err) : step(done + n)));
    };
    step(0);
  });
}
