/**
 * A local target that behaves like a disk with a volatile write cache: writes land in a
 * cache (visible to reads at once) and reach the medium only at datasync. At a simulated
 * power cut every cached write is independently lost, kept, or torn at 512-byte sector
 * granularity — which is what a real SSD without power-loss protection may do, and what a
 * process kill alone (the page cache survives it) never shows.
 *
 * `lieAboutSync` makes datasync a no-op: a broken device (or a broken ordering above it)
 * that the crash torture must catch.
 *
 * `failNextSync()` models a writeback error as Linux reports it: the cached writes are
 * dropped (the kernel marks the pages clean), the next datasync fails with EIO once, and
 * every datasync after it succeeds again — over the lost data. A fake named as such: this
 * machine has no device-mapper for dm-error or dm-flakey.
 */
import fs from 'node:fs';
import type { Target } from '../../dpu-agent/src/local/target.js';

export const SECTOR = 512;

export class VolatileCacheTarget implements Target {
  private cache: { pos: number; data: Buffer }[] = [];
  private dead = false;
  private syncFailures = 0;
  private readonly fd: number;

  /** With `asyncWrites`: writes complete on a later turn of the event loop, as the thread pool's do. */
  readonly write?: (buf: Buffer, position: number) => Promise<void>;

  constructor(
    readonly path: string,
    private readonly opts: { lieAboutSync?: boolean; asyncWrites?: boolean } = {},
  ) {
    this.fd = fs.openSync(path, 'r+');
    if (opts.asyncWrites) {
      this.write = async (buf, position) => {
        await new Promise((r) => setImmediate(r));
        this.alive(); // a write still in flight at the power cut fails
        this.cache.push({ pos: position, data: Buffer.from(buf) });
      };
    }
  }

  private alive(): void {
    if (this.dead) throw Object.assign(new Error('the device lost power'), { code: 'EIO' });
  }

  readSync(dest: Buffer, position: number): void {
    this.alive();
    fs.readSync(this.fd, dest, 0, dest.length, position);
    const end = position + dest.length;
    for (const w of this.cache) {
      const from = Math.max(position, w.pos);
      const to = Math.min(end, w.pos + w.data.length);
      if (from < to) w.data.copy(dest, from - position, from - w.pos, to - w.pos);
    }
  }

  writeSync(chunks: readonly Buffer[], position: number): void {
    this.alive();
    this.cache.push({ pos: position, data: Buffer.concat(chunks as Buffer[]) });
  }

  writeZeroesSync(position: number, length: number): void {
    this.alive();
    this.cache.push({ pos: position, data: Buffer.alloc(length) });
  }

  async datasync(): Promise<void> {
    this.alive();
    if (this.syncFailures > 0) {
      this.syncFailures--;
      this.cache = []; // lost: the pages were marked clean after the failed writeback
      await new Promise((r) => setImmediate(r));
      throw Object.assign(new Error('EIO: i/o error, fdatasync'), { code: 'EIO', errno: -5, syscall: 'fdatasync' });
    }
    if (this.opts.lieAboutSync) return;
    // Writes that complete while this runs belong to the next datasync: take the list now.
    const list = this.cache;
    this.cache = [];
    for (const w of list) fs.writeSync(this.fd, w.data, 0, w.data.length, w.pos);
    fs.fdatasyncSync(this.fd);
    await new Promise((r) => setImmediate(r));
  }

  /** The next datasync loses the cached writes and fails with EIO; later ones succeed. */
  failNextSync(): void {
    this.syncFailures++;
  }

  /** Power cut: each cached write is lost, kept, or torn per sector; then the device is gone. */
  powerCut(random: () => number): void {
    for (const w of this.cache) {
      const fate = random();
      if (fate < 0.4) continue; // lost
      if (fate < 0.7) {
        fs.writeSync(this.fd, w.data, 0, w.data.length, w.pos); // kept
        continue;
      }
      for (let o = 0; o < w.data.length; o += SECTOR) {
        if (random() < 0.5) fs.writeSync(this.fd, w.data, o, Math.min(SECTOR, w.data.length - o), w.pos + o); // torn
      }
    }
    this.cache = [];
    this.dead = true;
    fs.closeSync(this.fd);
  }

  close(): void {
    if (!this.dead) {
      this.dead = true;
      fs.closeSync(this.fd);
    }
  }
}
