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
 *
 * Both programs use what follows the same way — `dpu-agent serve` per disk (daemon/disks.ts)
 * and `dpu-agent stream` for its one disk (cli/stream.ts, --record-profile and
 * --boot-profile): recordBoot() starts a recording, applyReplay() checks and queues a
 * profile before hydration starts, bootProfileStatus() is what both report.
 */
import { EventEmitter } from 'node:events';
import fs from 'node:fs';
import type { Logger } from 'pino';
import { DpuError } from '../../../image-access/src/errors.js';
import { RegionState } from '../region/region-map.js';

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

/**
 * When a recording ends if nobody says otherwise: the daemon's `boot_profiles.window_ms` and
 * `max_regions`, and `stream --profile-window` / `--profile-max-regions`.
 */
export const RECORDING_DEFAULTS = { windowMs: 180_000, maxRegions: 4096 } as const;
/** Regions a profile holds at most: a create request's `maxItems`, and the largest budget. */
export const MAX_PROFILE_REGIONS = 65_536;

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
  /** How many recorded boots it was merged from (shown only). */
  boots?: number;
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

/** What a boot profile needs of a streaming disk (StreamingDisk has it all). */
export interface ProfiledDisk extends RecordableDisk {
  readonly imageSize: number;
  readonly complete: boolean;
  readonly map: { readonly regionSize: number; readonly complete: boolean; readonly states: Uint8Array };
}

/** Regions that hold the image, the ones a profile may name (a larger root disk's tail is zeros). */
export function imageRegionsOf(disk: ProfiledDisk): number {
  return Math.ceil(disk.imageSize / disk.map.regionSize);
}

/**
 * Starts recording the host's reads of `disk` (attach it before the export serves anyone).
 * `onDone` gets the finished profile on the read that ended it, or on the window's timer:
 * defer anything slow (a file write) to a later turn.
 */
export function recordBoot(disk: ProfiledDisk, limits: { windowMs: number; maxRegions: number }, onDone: (profile: RecordedProfile) => void): BootRecorder {
  const recorder = new BootRecorder({ regionSize: disk.map.regionSize, imageRegions: imageRegionsOf(disk), windowMs: limits.windowMs, maxRegions: limits.maxRegions });
  recorder.once('done', () => onDone(recorder.view()));
  recorder.attach(disk);
  return recorder;
}

/** What became of a profile given for replay (`boot_profile.replay` of the daemon's Disk). */
export type ReplayState = 'none' | 'applied' | 'refused' | 'disabled';
export interface ReplayStatus {
  state: ReplayState;
  /** The profile's regions when applied (to count the local ones), else empty. */
  regions: readonly number[];
  /** Regions in the profile. */
  count: number;
  /** Why it was refused: "DPU_ERR_PROFILE_INVALID: …". */
  error: string | null;
}

/**
 * Replays `p` on a disk just opened, before hydration starts (so before the host can read):
 * its regions are queued first in the hydrator, in order; or, when it does not fit the
 * image (replayProblem), nothing of it is applied and the status says why. Never throws:
 * a profile never fails a disk. Run it at every open; regions already local are skipped.
 */
export function applyReplay(p: ReplayProfile, disk: ProfiledDisk, hydrator: { prioritize(regions: Iterable<number>): void }, log?: Logger): ReplayStatus {
  const problem = replayProblem(p, disk.map.regionSize, imageRegionsOf(disk));
  if (problem) {
    log?.warn({ code: problem.code, regions: p.regions.length }, `boot profile refused: ${problem.message}`);
    return { state: 'refused', regions: [], count: p.regions.length, error: `${problem.code}: ${problem.message}` };
  }
  if (!disk.complete) hydrator.prioritize(p.regions);
  log?.info({ regions: p.regions.length, ...(p.boots !== undefined ? { boots: p.boots } : {}) }, 'boot profile applied: its regions are copied first, in boot order');
  return { state: 'applied', regions: p.regions, count: p.regions.length, error: null };
}

/** Regions of an applied profile that are local or zero (served without the network). */
export function replayLocal(map: ProfiledDisk['map'] | null | undefined, replay: ReplayStatus): number {
  if (!map || replay.state !== 'applied') return 0;
  if (map.complete) return replay.count;
  const states = map.states;
  let n = 0;
  for (const r of replay.regions) {
    const s = states[r];
    if (s === RegionState.Local || s === RegionState.Zero) n++;
  }
  return n;
}

/** Both halves of a disk's boot profiles, as the daemon's Disk (`boot_profile`) and stream's progress events show them. */
export interface BootProfileStatus {
  recording: { state: RecordingState | 'off' | 'interrupted'; regions: number; stop_reason: StopReason | null };
  replay: { state: ReplayState; regions: number; local: number; boots: number | null; error: string | null };
}

/**
 * The status from the recording in progress (`recorder`), else the finished one
 * (`recorded`), else `idle` (off, or interrupted); and the replay's outcome on `map`.
 */
export function bootProfileStatus(
  recorder: BootRecorder | null,
  recorded: RecordedProfile | null,
  idle: RecordingState | 'off' | 'interrupted',
  replay: ReplayStatus,
  map: ProfiledDisk['map'] | null | undefined,
  boots: number | null,
): BootProfileStatus {
  const recording = recorder
    ? { state: recorder.state, regions: recorder.regionCount, stop_reason: null }
    : recorded
      ? { state: recorded.state, regions: recorded.regions.length, stop_reason: recorded.stop_reason }
      : { state: idle, regions: 0, stop_reason: null };
  return { recording, replay: { state: replay.state, regions: replay.count, local: replayLocal(map, replay), boots, error: replay.error } };
}

/**
 * A profile to replay from JSON: what --record-profile writes and GET
 * /v1/disks/{id}/boot-profile answers ({state, region_size, image_regions, regions, …}), or a
 * create request's `boot_profile.replay` ({region_size, regions, boots?}). Only `region_size`,
 * `regions` and `boots` are read, and checked as the API's schema checks a create request
 * (region_size an integer from 4096 to 1 GiB; at most 65 536 regions, each an integer ≥ 0;
 * duplicates allowed: copied once); anything else is DPU_ERR_PROFILE_INVALID naming the
 * field. Whether it fits the disk is replayProblem's question.
 */
export function parseReplayProfile(value: unknown, where: string): ReplayProfile {
  const bad = (field: string | undefined, what: string): DpuError => new DpuError('DPU_ERR_PROFILE_INVALID', `${where}: ${what}`, field !== undefined ? { field } : undefined);
  if (typeof value !== 'object' || value === null || Array.isArray(value)) {
    throw bad(undefined, 'is not a boot profile: a JSON object with region_size and regions (as --record-profile writes it)');
  }
  const v = value as Record<string, unknown>;
  const rs = v['region_size'];
  if (!Number.isSafeInteger(rs) || (rs as number) < 4096 || (rs as number) > 1 << 30) {
    throw bad('region_size', `region_size ${JSON.stringify(rs)} is not an integer from 4096 to 1073741824 (the region size the profile was recorded in)`);
  }
  const regions = v['regions'];
  if (!Array.isArray(regions)) throw bad('regions', `regions ${regions === undefined ? 'is missing' : 'is not an array'}: the region numbers in boot order`);
  if (regions.length > MAX_PROFILE_REGIONS) throw bad('regions', `regions holds ${regions.length} entries, more than ${MAX_PROFILE_REGIONS}`);
  const i = regions.findIndex((r) => !Number.isSafeInteger(r) || (r as number) < 0);
  if (i >= 0) throw bad('regions', `regions entry ${i} is ${JSON.stringify(regions[i])}, not a region number (an integer ≥ 0)`);
  const boots = v['boots'];
  if (boots !== undefined && (!Number.isSafeInteger(boots) || (boots as number) < 0)) throw bad('boots', `boots ${JSON.stringify(boots)} is not an integer ≥ 0`);
  return { region_size: rs as number, regions: regions as number[], ...(boots !== undefined ? { boots: boots as number } : {}) };
}

/** parseReplayProfile of a file; an unreadable file is DPU_ERR_CONFIG, one that is not JSON DPU_ERR_PROFILE_INVALID. */
export function readReplayProfile(file: string, flag: string): ReplayProfile {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (err) {
    throw new DpuError('DPU_ERR_CONFIG', `${flag} ${file}: ${(err as Error).message}`);
  }
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (err) {
    throw new DpuError('DPU_ERR_PROFILE_INVALID', `${flag} ${file}: not JSON (${(err as Error).message})`);
  }
  return parseReplayProfile(value, `${flag} ${file}`);
}
