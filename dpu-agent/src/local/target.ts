/**
 * The local target: the DPU's NVMe SSD (a block device) or, in the lab, a file. Reads are
 * synchronous positional reads: on a DPU the hot data sits in the page cache or on a local
 * NVMe with ~100 µs latency, and a synchronous pread avoids a libuv thread-pool hand-off
 * per request, which measured here costs more than the read itself (PEERS.md). Host writes
 * are synchronous too (they land in the page cache). Fetched regions are written through
 * the thread pool (`write`): hydration writes the whole image, and a page-cache write can
 * sleep for tens of ms when the kernel throttles dirty pages — on the thread that answers
 * the host, that was the tail of a miss's latency (bench/streaming.ts). fdatasync, which
 * waits for the device, goes to the thread pool as well.
 *
 * Those writes go to the kernel one at a time, in the order asked for (a region a host's
 * read is waiting for goes ahead of hydration's). A buffered write to a file holds the
 * inode's lock, and threads waiting for it spin: hydrating 1 GiB
 * across an emulated 10 Gbit/s link into an ext4 file, the pool's four threads writing
 * regions side by side spent 2.4 s of system time, one thread 0.4–0.7 s, and the spinning
 * took the cores the event loop and the host need. One thread copies into the page cache
 * at 1.5–2.5 GB/s here, faster than the link.
 */
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import { DpuError } from '../../../image-access/src/errors.js';

export interface LocalTargetOptions {
  /** Create a regular file of `size` bytes if the path does not exist. */
  create: boolean;
  /** The image size: a smaller existing target is extended (file) or refused (device). */
  size: number;
}

const ZERO_CHUNK = Buffer.alloc(1 << 20);

/** What the streaming disk needs of a local target (tests substitute a volatile-cache model). */
export interface Target {
  readonly path: string;
  readSync(dest: Buffer, position: number): void;
  writeSync(chunks: readonly Buffer[], position: number): void;
  /**
   * Writes `buf` off the event loop; a target without it is written with writeSync.
   * `first`: ahead of writes waiting their turn (a region the host is waiting for).
   */
  write?(buf: Buffer, position: number, first?: boolean): Promise<void>;
  /** Reads off the event loop; a target without it is read with readSync. */
  read?(dest: Buffer, position: number): Promise<void>;
  writeZeroesSync(position: number, length: number): void;
  /**
   * Makes the range read as zeros without writing data, where the target can (a hole in a
   * file, Write Zeroes on a device); rejects when it cannot, and the caller writes zeros.
   * Durable, like a write, once `datasync` resolves.
   */
  zeroRange?(position: number, length: number): Promise<void>;
  /** Every completed write is durable when this resolves. */
  datasync(): Promise<void>;
  close(): void;
}

export class LocalTarget implements Target {
  readonly path: string;
  readonly isBlockDevice: boolean;
  private fd: number;
  /** A hole was punched since the last sync: metadata must be synced too (fsync, not fdatasync). */
  private punched = false;
  /** Writes waiting for the one in the thread pool (see the top of the file). */
  private readonly writes: (() => void)[] = [];
  private writing = false;

  private constructor(path: string, fd: number, isBlockDevice: boolean) {
    this.path = path;
    this.fd = fd;
    this.isBlockDevice = isBlockDevice;
  }

  static open(path: string, opts: LocalTargetOptions): LocalTarget {
    let fd: number;
    try {
      fd = fs.openSync(path, opts.create ? fs.constants.O_RDWR | fs.constants.O_CREAT : fs.constants.O_RDWR, 0o600);
    } catch (err) {
      throw new DpuError('DPU_ERR_TARGET_IO', `cannot open ${path}: ${(err as Error).message}`, { cause: err });
    }
    const st = fs.fstatSync(fd);
    const isBlockDevice = st.isBlockDevice();
    const current = isBlockDevice ? blockDeviceSize(st.rdev) : st.size;
    if (current < opts.size) {
      if (isBlockDevice) {
        fs.closeSync(fd);
        throw new DpuError('DPU_ERR_TARGET_TOO_SMALL', `${path} holds ${current} bytes, the image needs ${opts.size}`);
      }
      // Sparse extension: the new bytes read as zeros and are never served before the
      // region map says their region is local.
      fs.ftruncateSync(fd, opts.size);
    }
    return new LocalTarget(path, fd, isBlockDevice);
  }

  readSync(dest: Buffer, position: number): void {
    let done = 0;
    while (done < dest.length) {
      const n = fs.readSync(this.fd, dest, done, dest.length - done, position + done);
      if (n === 0) {
        // Past the end of a file target: the file was truncated behind our back.
        throw new DpuError('DPU_ERR_TARGET_IO', `short read from ${this.path} at ${position + done}`);
      }
      done += n;
    }
  }

  read(dest: Buffer, position: number): Promise<void> {
    return this.whole(fs.read, dest, position, 'read from');
  }

  /**
   * Off the event loop, after every write asked for before it (see the top of the file);
   * with `first`, ahead of those still waiting (not of the one in the thread pool).
   */
  write(buf: Buffer, position: number, first = false): Promise<void> {
    return new Promise((resolve, reject) => {
      const run = (): void => {
        this.whole(fs.write, buf, position, 'write to').then(resolve, reject).finally(() => {
          const next = this.writes.shift();
          if (next) next();
          else this.writing = false;
        });
      };
      if (this.writing) {
        if (first) this.writes.unshift(run);
        else this.writes.push(run);
      } else {
        this.writing = true;
        run();
      }
    });
  }

  /** `op` (fs.read or fs.write) on the thread pool until all of `buf` is done; a 0-byte step is a short read or write. */
  private whole(op: typeof fs.read | typeof fs.write, buf: Buffer, position: number, what: string): Promise<void> {
    return new Promise((resolve, reject) => {
      const step = (done: number): void => {
        if (done === buf.length) return resolve();
        (op as typeof fs.read)(this.fd, buf, done, buf.length - done, position + done, (err, n) => {
          if (err) reject(err);
          else if (n === 0) reject(new DpuError('DPU_ERR_TARGET_IO', `short ${what} ${this.path} at ${position + done}`));
          else step(done + n);
        });
      };
      step(0);
    });
  }

  writeSync(chunks: readonly Buffer[], position: number): void {
    if (chunks.length === 1) {
      const buf = chunks[0]!;
      let done = 0;
      while (done < buf.length) done += fs.writeSync(this.fd, buf, done, buf.length - done, position + done);
      return;
    }
    let pos = position;
    let list = chunks as Buffer[];
    while (list.length > 0) {
      let n = fs.writevSync(this.fd, list, pos);
      pos += n;
      // writev may be short; drop what was written and retry the rest.
      let i = 0;
      while (i < list.length && n >= list[i]!.length) n -= list[i++]!.length;
      list = list.slice(i);
      if (n > 0 && list.length > 0) list[0] = list[0]!.subarray(n);
    }
  }

  writeZeroesSync(position: number, length: number): void {
    let done = 0;
    while (done < length) {
      const n = Math.min(ZERO_CHUNK.length, length - done);
      this.writeSync([ZERO_CHUNK.subarray(0, n)], position + done);
      done += n;
    }
  }

  /**
   * Node has no fallocate or BLKZEROOUT, so util-linux does it on our descriptor (through
   * /proc/self/fd, so a renamed or replaced path cannot redirect it): `fallocate
   * --punch-hole` on a file, `blkdiscard --zeroout` (the kernel's BLKZEROOUT: NVMe Write
   * Zeroes, or zeros written by the kernel) on a device. Either way the page cache of the
   * range is dropped by the kernel, so no stale cached byte survives.
   */
  zeroRange(position: number, length: number): Promise<void> {
    const fdPath = `/proc/${process.pid}/fd/${this.fd}`;
    const [cmd, args] = this.isBlockDevice
      ? ['blkdiscard', ['--zeroout', '--force', '--offset', String(position), '--length', String(length), fdPath]]
      : ['fallocate', ['--punch-hole', '--keep-size', '--offset', String(position), '--length', String(length), fdPath]];
    return new Promise((resolve, reject) => {
      execFile(cmd, args, { timeout: 120_000 }, (err, _stdout, stderr) => {
        if (err) return reject(new DpuError('DPU_ERR_TARGET_IO', `${cmd} on ${this.path} bytes ${position}+${length}: ${stderr.trim() || err.message}`, { cause: err }));
        // Set on completion: a sync that began before the hole existed does not cover it.
        if (!this.isBlockDevice) this.punched = true;
        resolve();
      });
    });
  }

  /** Make every completed write durable. Runs in the thread pool: it may wait on the device. */
  datasync(): Promise<void> {
    // A punched hole is an extent change: fsync covers it on every file system, fdatasync
    // is only guaranteed to on some.
    const full = this.punched;
    this.punched = false;
    return new Promise((resolve, reject) => {
      const done = (err: NodeJS.ErrnoException | null): void => {
        if (err) {
          if (full) this.punched = true;
          reject(new DpuError('DPU_ERR_TARGET_IO', `${full ? 'fsync' : 'fdatasync'} ${this.path}: ${err.message}`, { cause: err }));
        } else resolve();
      };
      if (full) fs.fsync(this.fd, done);
      else fs.fdatasync(this.fd, done);
    });
  }

  close(): void {
    if (this.fd >= 0) {
      fs.closeSync(this.fd);
      this.fd = -1;
    }
  }
}

/** Linux: the size of a block device from sysfs, in bytes. */
export function blockDeviceSize(rdev: number): number {
  const major = ((rdev >> 8) & 0xfff) | (Math.floor(rdev / 2 ** 32) & ~0xfff);
  const minor = (rdev & 0xff) | ((rdev >> 12) & 0xfff00);
  const sectors = Number(fs.readFileSync(`/sys/dev/block/${major}:${minor}/size`, 'utf8').trim());
  return sectors * 512;
}
