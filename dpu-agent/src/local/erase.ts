/**
 * Erasing a local target that no disk uses: what Ironic's cleaning asks of a node's disks,
 * done by the DPU on the device that holds the tenant's data, without a ramdisk on the host.
 *
 * Two modes, after ironic-python-agent's two clean steps:
 *
 *  metadata  (IPA `erase_devices_metadata`, priority 99.) IPA runs, on every partition and
 *            then on the disk, `wipefs --all` (every signature libblkid knows: filesystem
 *            superblocks, swap, LVM, MD RAID, LUKS, partition tables), then zeroes the
 *            first and the last 33 sectors of the disk (primary and backup GPT) and runs
 *            `sgdisk -Z` (GPT headers and protective MBR). Those signatures all lie in the
 *            first or the last MiB of the device they describe, so this zeroes, instead of
 *            probing for each magic: the first and last MiB of the target, and the first
 *            and last MiB of every partition its tables name (GPT, primary or backup, 512
 *            or 4096-byte sectors; MBR primaries and the logical partitions of an extended
 *            one). A superset of what IPA erases; the data between stays, as with IPA.
 *  full      (IPA `erase_devices`, priority 10: ATA/NVMe secure erase, else `shred`.) Every
 *            byte reads as zero afterwards:
 *              block device  BLKZEROOUT (`blkdiscard --zeroout`, the kernel's Write Zeroes
 *                            offload, which it falls back from to writing zero pages
 *                            itself), in steps so progress moves; where that fails (no
 *                            util-linux, the device refuses), zeros are written from here
 *                            in large aligned chunks. BLKDISCARD alone is not used: since
 *                            Linux 4.12 no device promises that discarded blocks read zero.
 *              regular file  truncated to zero length and extended again to its size:
 *                            every byte reads zero, the size stays, and the file holds no
 *                            blocks — its old blocks went back to the filesystem (not
 *                            overwritten on the medium underneath, as a TRIM on an SSD).
 *            Not a secure erase: an SSD may keep remapped copies of old blocks.
 *
 * Either mode is made durable (fsync of the target: for a device, a cache flush) before it
 * is reported done. A block device is opened O_EXCL for the whole erasure, so one mounted
 * or held by md/dm is refused, and nothing can claim it meanwhile. No write blocks the
 * event loop: zeros go through libuv's thread pool one chunk at a time and BLKZEROOUT runs
 * in a child process, so the NBD exports of other disks keep being served.
 */
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import { DpuError } from '../../../image-access/src/errors.js';
import { blockDeviceSize } from './target.js';

export type EraseMode = 'metadata' | 'full';
export type TargetKind = 'block' | 'file' | 'absent';
/** How the bytes were erased: BLKZEROOUT, zeros written, a file truncated and re-extended, nothing (no file). */
export type EraseMethod = 'zeroout' | 'write' | 'truncate' | 'none';

const MiB = 1 << 20;
/** What metadata mode zeroes at each end of the device and of each partition. */
export const METADATA_BYTES = MiB;
/** Zeros written per request (metadata mode, and the fallback of full mode). */
const WRITE_CHUNK = 8 * MiB;
const ZEROS = Buffer.alloc(WRITE_CHUNK);
/** BLKZEROOUT steps: about a hundred, between these bounds, so progress moves without a process per MiB. */
const ZEROOUT_MIN = 16 * MiB;
const ZEROOUT_MAX = 1 << 30;
/** EBRs followed at most in an extended partition (a loop in a damaged chain ends here). */
const MAX_LOGICAL = 128;

export interface Range {
  offset: number;
  length: number;
}

/** A target opened for erasing: its descriptor, kind and size. */
export class EraseTarget {
  private constructor(
    readonly path: string,
    readonly kind: TargetKind,
    private fd: number,
    readonly size: number,
  ) {}

  /**
   * Opens `target` for erasing, synchronously (so the caller can register the erasure in
   * the same turn). A block device is opened O_EXCL: EBUSY means the kernel holds it
   * (mounted, an md or dm member) and is DPU_ERR_TARGET_IN_USE. A path that does not exist
   * is an `absent` target, with nothing to erase.
   */
  static open(target: string): EraseTarget {
    let st: fs.Stats;
    try {
      st = fs.statSync(target);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return new EraseTarget(target, 'absent', -1, 0);
      throw new DpuError('DPU_ERR_ERASE_FAILED', `cannot stat ${target}: ${(err as Error).message}`, { cause: err, field: 'target.path' });
    }
    if (!st.isBlockDevice() && !st.isFile()) throw new DpuError('DPU_ERR_BAD_REQUEST', `target.path "${target}" is neither a block device nor a regular file`, { field: 'target.path' });
    const block = st.isBlockDevice();
    let fd: number;
    try {
      fd = fs.openSync(target, fs.constants.O_RDWR | (block ? fs.constants.O_EXCL : 0));
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'EBUSY') {
        throw new DpuError('DPU_ERR_TARGET_IN_USE', `${target} is held by the kernel (mounted, or a member of an md/dm device); unmount or release it first`, { cause: err, field: 'target.path' });
      }
      throw new DpuError('DPU_ERR_ERASE_FAILED', `cannot open ${target}: ${(err as Error).message}`, { cause: err, field: 'target.path' });
    }
    try {
      const size = block ? blockDeviceSize(fs.fstatSync(fd).rdev) : fs.fstatSync(fd).size;
      return new EraseTarget(target, block ? 'block' : 'file', fd, size);
    } catch (err) {
      fs.closeSync(fd);
      throw new DpuError('DPU_ERR_ERASE_FAILED', `cannot size ${target}: ${(err as Error).message}`, { cause: err });
    }
  }

  close(): void {
    if (this.fd >= 0) {
      fs.closeSync(this.fd);
      this.fd = -1;
    }
  }

  /** The descriptor as a path other programs can open (it cannot be redirected by a rename). */
  private get fdPath(): string {
    return `/proc/${process.pid}/fd/${this.fd}`;
  }

  async read(offset: number, length: number): Promise<Buffer> {
    const buf = Buffer.alloc(length);
    let done = 0;
    while (done < length) {
      const n = await new Promise<number>((resolve, reject) => fs.read(this.fd, buf, done, length - done, offset + done, (err, n) => (err ? reject(err) : resolve(n))));
      if (n === 0) break;
      done += n;
    }
    return buf.subarray(0, done);
  }

  async writeZeros(offset: number, length: number, progress: (bytes: number) => void, signal: AbortSignal): Promise<void> {
    let done = 0;
    while (done < length) {
      checkAbort(signal);
      // Aligned to the chunk size after the first piece, so a fallback from BLKZEROOUT runs on aligned requests.
      const pos = offset + done;
      const n = Math.min(WRITE_CHUNK - (pos % WRITE_CHUNK), length - done);
      const wrote = await new Promise<number>((resolve, reject) => fs.write(this.fd, ZEROS, 0, n, pos, (err, w) => (err ? reject(err) : resolve(w))));
      done += wrote;
      progress(wrote);
    }
  }

  /** BLKZEROOUT of one range, in a child process; rejects with blkdiscard's message. */
  zeroout(offset: number, length: number, signal: AbortSignal): Promise<void> {
    return new Promise((resolve, reject) => {
      execFile('blkdiscard', ['--zeroout', '--force', '--offset', String(offset), '--length', String(length), this.fdPath], { signal }, (err, _stdout, stderr) => {
        if (err) reject(Object.assign(new Error(`blkdiscard --zeroout ${offset}+${length}: ${String(stderr).trim() || err.message}`), { code: (err as NodeJS.ErrnoException).code }));
        else resolve();
      });
    });
  }

  /** Truncates a file to nothing and back to its size: all zeros, no blocks. */
  async truncateSparse(): Promise<void> {
    await new Promise<void>((resolve, reject) => fs.ftruncate(this.fd, 0, (err) => (err ? reject(err) : resolve())));
    await new Promise<void>((resolve, reject) => fs.ftruncate(this.fd, this.size, (err) => (err ? reject(err) : resolve())));
  }

  /** Data and metadata durable (a size change is metadata: fsync, not fdatasync). For a device, a cache flush. */
  sync(): Promise<void> {
    return new Promise((resolve, reject) => fs.fsync(this.fd, (err) => (err ? reject(err) : resolve())));
  }
}

function checkAbort(signal: AbortSignal): void {
  if (signal.aborted) throw signal.reason instanceof Error ? signal.reason : new DpuError('DPU_ERR_ERASE_CANCELLED');
}

export interface EraseRun {
  signal: AbortSignal;
  /** Called with the bytes erased so far and the total, whenever they grow. */
  progress(done: number, total: number): void;
  /** Said once the work is planned: the total, and for metadata the partitions found. */
  planned?(total: number, partitions: number | null): void;
  warn(msg: string, detail?: Record<string, unknown>): void;
}

export interface EraseOutcome {
  method: EraseMethod;
  bytes: number;
  /** metadata mode: the partitions the tables name (each one's ends were zeroed). */
  partitions: number | null;
}

/** Erases an opened target; resolves once the result is durable. Leaves the target open (the caller closes it). */
export async function eraseTarget(t: EraseTarget, mode: EraseMode, run: EraseRun): Promise<EraseOutcome> {
  if (t.kind === 'absent') {
    run.planned?.(0, mode === 'metadata' ? 0 : null);
    return { method: 'none', bytes: 0, partitions: mode === 'metadata' ? 0 : null };
  }
  let done = 0;
  const step = (total: number) => (n: number): void => {
    done += n;
    run.progress(done, total);
  };
  if (mode === 'metadata') {
    const parts = await listPartitions(t);
    const ranges = metadataRanges(t.size, parts);
    const total = ranges.reduce((a, r) => a + r.length, 0);
    run.planned?.(total, parts.length);
    for (const r of ranges) await t.writeZeros(r.offset, r.length, step(total), run.signal);
    checkAbort(run.signal);
    await t.sync();
    return { method: 'write', bytes: total, partitions: parts.length };
  }
  const total = t.size;
  run.planned?.(total, null);
  if (t.kind === 'file') {
    checkAbort(run.signal);
    await t.truncateSparse();
    await t.sync();
    step(total)(total);
    return { method: 'truncate', bytes: total, partitions: null };
  }
  let method: EraseMethod = 'zeroout';
  const stepBytes = Math.min(ZEROOUT_MAX, Math.max(ZEROOUT_MIN, Math.ceil(total / 100 / MiB) * MiB));
  while (done < total) {
    checkAbort(run.signal);
    const n = Math.min(stepBytes, total - done);
    if (method === 'zeroout') {
      try {
        await t.zeroout(done, n, run.signal);
        step(total)(n);
        continue;
      } catch (err) {
        checkAbort(run.signal);
        run.warn('BLKZEROOUT failed; writing zeros instead', { target: t.path, offset: done, err: (err as Error).message });
        method = 'write';
      }
    }
    await t.writeZeros(done, total - done, step(total), run.signal);
  }
  checkAbort(run.signal);
  await t.sync();
  return { method, bytes: total, partitions: null };
}

/** The byte ranges metadata mode zeroes: each end of the device and of every partition, merged. */
export function metadataRanges(size: number, partitions: readonly Range[]): Range[] {
  const raw: Range[] = [];
  const ends = (offset: number, length: number): void => {
    const a = Math.max(0, offset);
    const b = Math.min(size, offset + length);
    if (b <= a) return;
    raw.push({ offset: a, length: Math.min(METADATA_BYTES, b - a) });
    const tail = Math.max(a, b - METADATA_BYTES);
    raw.push({ offset: tail, length: b - tail });
  };
  ends(0, size);
  for (const p of partitions) ends(p.offset, p.length);
  raw.sort((x, y) => x.offset - y.offset);
  const out: Range[] = [];
  for (const r of raw) {
    const last = out[out.length - 1];
    if (last && r.offset <= last.offset + last.length) last.length = Math.max(last.length, r.offset + r.length - last.offset);
    else out.push({ ...r });
  }
  return out;
}

/**
 * The partitions the target's tables name, tolerantly: a damaged table still says where a
 * tenant's filesystems were, and zeroing a MiB too many of a disk being erased harms
 * nothing. Every GPT header found (primary or backup, 512 or 4096-byte sectors) and the
 * MBR with its logical partitions; bounds are clamped to the device.
 */
export async function listPartitions(t: EraseTarget): Promise<Range[]> {
  const size = t.size;
  const out: Range[] = [];
  // The primary and the backup GPT name the same partitions: each counts once.
  const add = (offset: number, length: number): void => {
    if (offset >= size || length <= 0) return;
    const r = { offset, length: Math.min(length, size - offset) };
    if (!out.some((p) => p.offset === r.offset && p.length === r.length)) out.push(r);
  };
  const head = await t.read(0, Math.min(size, 8192));
  for (const sector of [512, 4096]) {
    for (const at of [sector, size - sector]) {
      if (at < sector || at + 92 > size) continue;
      const hdr = at + 512 <= head.length ? head.subarray(at, at + 512) : await t.read(at, 512);
      if (hdr.length < 92 || hdr.toString('latin1', 0, 8) !== 'EFI PART') continue;
      const entriesLba = Number(hdr.readBigUInt64LE(72));
      const count = hdr.readUInt32LE(80);
      const esize = hdr.readUInt32LE(84);
      if (esize < 128 || esize > 4096 || count === 0 || count * esize > MiB || entriesLba * sector + count * esize > size) continue;
      const entries = await t.read(entriesLba * sector, count * esize);
      for (let i = 0; i + esize <= entries.length; i += esize) {
        const e = entries.subarray(i, i + esize);
        if (e.subarray(0, 16).every((b) => b === 0)) continue;
        const first = Number(e.readBigUInt64LE(32));
        const last = Number(e.readBigUInt64LE(40));
        if (last >= first) add(first * sector, (last - first + 1) * sector);
      }
    }
  }
  if (head.length >= 512 && head.readUInt16LE(510) === 0xaa55) {
    for (let i = 0; i < 4; i++) {
      const e = head.subarray(446 + 16 * i, 462 + 16 * i);
      const type = e[4]!;
      const start = e.readUInt32LE(8);
      const count = e.readUInt32LE(12);
      if (type === 0 || type === 0xee || count === 0) continue;
      add(start * 512, count * 512);
      if (type === 0x05 || type === 0x0f || type === 0x85) await addLogical(t, start, add);
    }
  }
  return out;
}

/** The logical partitions of an extended partition at sector `extStart`, following its EBR chain. */
async function addLogical(t: EraseTarget, extStart: number, add: (offset: number, length: number) => void): Promise<void> {
  let ebr = extStart;
  const seen = new Set<number>();
  for (let n = 0; n < MAX_LOGICAL && !seen.has(ebr) && ebr * 512 + 512 <= t.size; n++) {
    seen.add(ebr);
    const s = await t.read(ebr * 512, 512);
    if (s.length < 512 || s.readUInt16LE(510) !== 0xaa55) return;
    const logical = s.subarray(446, 462);
    if (logical[4] !== 0 && logical.readUInt32LE(12) > 0) add((ebr + logical.readUInt32LE(8)) * 512, logical.readUInt32LE(12) * 512);
    const next = s.subarray(462, 478);
    if (next[4] === 0 || next.readUInt32LE(8) === 0) return;
    ebr = extStart + next.readUInt32LE(8);
  }
}

/**
 * Asks the kernel to read a block device's partition table again (BLKRRPART, as
 * `sgdisk -Z` does after IPA's metadata erase), so the DPU forgets partitions that no
 * longer exist. Best effort, after the target is closed: a device without partition
 * scanning (a loop device without -P) refuses, which changes nothing.
 */
export function rereadPartitions(device: string): Promise<string | null> {
  return new Promise((resolve) => {
    execFile('blockdev', ['--rereadpt', device], { timeout: 30_000 }, (err, _stdout, stderr) => resolve(err ? String(stderr).trim() || err.message : null));
  });
}
