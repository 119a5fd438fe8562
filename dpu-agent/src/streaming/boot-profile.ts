/**
 * Boot profiles, the agent's half: record which regions the host reads first, in order,
 * while it boots; and check a profile handed in for replay (the hydrator copies its regions
 * first, in that order: Hydrator.prioritize).
 *
 * Recording, and why:
 *  - What: the FIRST host read of each image region, whatever the region's state — a region
 *    a replayed profile already made local is recorded all the same, so the next profile
 *    still holds it (recording only misses would make every other profile empty). Regions
 *    past the image (a root disk larger than it) are not recorded: they are zeros on every
 *    disk, never fetched, and their numbers depend on the disk, not the image.
 *  - Only host reads: the disk calls the recorder from the top of StreamingDisk.read() (one
 *    branch while nothing records); the agent's own reads through the disk (the config
 *    drive writer reading the partition table) run with the recorder suspended.
 *  - When it stops (state `done`): `windowMs` after the first host read, or once
 *    `maxRegions` regions are recorded, whichever comes first. The window starts at the
 *    first read, not at creation, so however long the node waits for power-on it does not
 *    count. Not at hydration's end: a small image or a fast link is local before the boot is
 *    over, and the profile is for the next deployment, over a link that may be slower. Not
 *    when the driver reads it: the driver polls, and reads the profile once it is `done`.
 *  - Cost: a bitmap (one bit per image region) and the order (4 bytes per recorded region);
 *    the hot path is one bit test per region of the read. Once `done`, the recorder
 *    detaches itself: reads cost one null check again.
 *
 * States: `waiting` (no host read yet) → `recording` → `done` (stopReason window|budget).
 */
import { EventEmitter } from 'node:events';
import { DpuError } from '../../../image-access/src/errors.js';

/** What StreamingDisk.read() calls while a recorder is attached (see disk.ts `recorder`). */
export interface ReadRecorder {
  onRead(offset: number, length: number): void;
}

/** Where a recorder hooks in: StreamingDisk's `recorder` field. */
export interface RecordableDisk {
  recorder: ReadRecorder | null;
}

export type RecordingState = 'waiting' | 'recording' | 'done';
export type StopReason = 'window' | 'budget';

export interface BootRecorderOptions {
  regionSize: number;
  /** Regions that hold the image (ceil(imageSize / regionSize)); reads past them are not recorded. */
  imageRegions: number;
  /** Stop this long after the first host read, ms. */
  windowMs: number;
  /** Stop once this many regions are recorded. */
  maxRegions: number;
  /** Test seam. @default setTimeout */
  schedule?: (fn: () => void, ms: number) => () => void;
}

/** A finished (or running) recording, as GET /v1/disks/{id}/boot-profile shows it and boot-profile.json stores it. */
export interface RecordedProfile {
  state: RecordingState;
  region_size: number;
  image_regions: number;
  regions: number[];
  started_at: string | null;
  ended_at: string | null;
  stop_reason: StopReason | null;
}

export class BootRecorder extends EventEmitter<{ done: [] }> implements ReadRecorder {
  private readonly opts: BootRecorderOptions;
  private readonly seen: Uint8Array;
  private readonly order: Uint32Array;
  private count = 0;
  private current: RecordingState = 'waiting';
  private reason: StopReason | null = null;
  private startedAt: Date | null = null;
  private endedAt: Date | null = null;
  private cancelTimer: (() => void) | null = null;
  private disk: RecordableDisk | null = null;
  private suspended = 0;

  constructor(opts: BootRecorderOptions) {
    super();
    this.opts = opts;
    this.seen = new Uint8Array(Math.ceil(opts.imageRegions / 8));
    this.order = new Uint32Array(Math.max(0, Math.min(opts.maxRegions, opts.imageRegions)));
  }

  get state(): RecordingState {
    return this.current;
  }

  get regionCount(): number {
    return this.count;
  }

  /** Starts listening to the disk's reads (nothing is recorded once done). */
  attach(disk: RecordableDisk): void {
    this.disk = disk;
    if (this.current !== 'done' && this.suspended === 0) disk.recorder = this;
  }

  /**
   * Runs `fn` (the agent reading through the disk itself) without recording its reads.
   * Nests; the recorder is attached again afterwards unless it finished meanwhile.
   */
  async unrecorded<T>(fn: () => Promise<T>): Promise<T> {
    this.suspended++;
    if (this.disk && this.disk.recorder === this) this.disk.recorder = null;
    try {
      return await fn();
    } finally {
      if (--this.suspended === 0 && this.disk && this.current !== 'done') this.disk.recorder = this;
    }
  }

  onRead(offset: number, length: number): void {
    const { regionSize, imageRegions } = this.opts;
    const first = Math.floor(offset / regionSize);
    if (first >= imageRegions || length <= 0) return;
    const last = Math.min(Math.floor((offset + length - 1) / regionSize), imageRegions - 1);
    if (this.current === 'waiting') this.begin();
    else if (this.current === 'done') return;
    const seen = this.seen;
    for (let r = first; r <= last; r++) {
      const bit = 1 << (r & 7);
      if (seen[r >>> 3]! & bit) continue;
      seen[r >>> 3]! |= bit;
      this.order[this.count++] = r;
      if (this.count >= this.order.length) {
        this.finish('budget');
        return;
      }
    }
  }

  /** Ends the recording (the disk is closing); a waiting recorder stays waiting but detached. */
  detach(): void {
    this.cancelTimer?.();
    this.cancelTimer = null;
    if (this.disk?.recorder === this) this.disk.recorder = null;
    this.disk = null;
  }

  view(): RecordedProfile {
    return {
      state: this.current,
      region_size: this.opts.regionSize,
      image_regions: this.opts.imageRegions,
      regions: Array.from(this.order.subarray(0, this.count)),
      started_at: this.startedAt?.toISOString() ?? null,
      ended_at: this.endedAt?.toISOString() ?? null,
      stop_reason: this.reason,
    };
  }

  private begin(): void {
    this.current = 'recording';
    this.startedAt = new Date();
    const schedule =
      this.opts.schedule ??
      ((fn: () => void, ms: number) => {
        const t = setTimeout(fn, ms);
        t.unref();
        return () => clearTimeout(t);
      });
    this.cancelTimer = schedule(() => this.finish('window'), this.opts.windowMs);
  }

  private finish(reason: StopReason): void {
    if (this.current === 'done') return;
    this.current = 'done';
    this.reason = reason;
    this.endedAt = new Date();
    this.cancelTimer?.();
    this.cancelTimer = null;
    if (this.disk?.recorder === this) this.disk.recorder = null;
    this.emit('done');
  }
}

/** A profile to replay, as a create request carries it. */
export interface ReplayProfile {
  region_size: number;
  regions: readonly number[];
}

/**
 * Why `p` cannot be replayed on a disk of `imageRegions` regions of `regionSize` bytes, or
 * null when it can. A profile of another region size names other bytes; one with regions
 * past the image was recorded for another image (the driver keys profiles by the image's
 * content, so this is a bug or a hand-made profile): either is refused whole, never
 * applied in part.
 */
export function replayProblem(p: ReplayProfile, regionSize: number, imageRegions: number | null): DpuError | null {
  if (p.region_size !== regionSize) {
    return new DpuError('DPU_ERR_PROFILE_INVALID', `the boot profile is of ${p.region_size}-byte regions; this disk has ${regionSize}-byte regions`, { field: 'boot_profile.replay.region_size' });
  }
  if (imageRegions === null) return null;
  const bad = p.regions.findIndex((r) => !Number.isSafeInteger(r) || r < 0 || r >= imageRegions);
  if (bad >= 0) {
    return new DpuError('DPU_ERR_PROFILE_INVALID', `the boot profile names region ${p.regions[bad]} (entry ${bad}), but the image has regions 0-${imageRegions - 1}: it was recorded for another image; not replayed`, { field: 'boot_profile.replay.regions' });
  }
  return null;
}
