/**
 * The hydrator copies every region that is not yet local, in the background, until the
 * disk can cut over. Policy:
 *  - sequential from the start of the disk, adjacent remote regions coalesced into one
 *    range request of up to `batchBytes`; `zero` regions are filled locally, no network;
 *  - `concurrency` background requests in flight, and none started while a host read miss
 *    is being fetched: foreground misses never queue behind a background batch (the
 *    source also reserves connections for them);
 *  - an optional bandwidth cap (token bucket on batch starts; batches shrink so that the
 *    cap is smooth even at low rates);
 *  - pause/resume; after a failed batch, exponential backoff, then the regions are
 *    retried on the next pass;
 *  - when every region is local: cutover (see StreamingDisk.cutover).
 */
import { EventEmitter, once } from 'node:events';
import type { Logger } from 'pino';
import { RegionState } from '../region/region-map.js';
import type { StreamingDisk } from './disk.js';

export interface HydratorOptions {
  /** Largest background range request, bytes. @default 8 MiB */
  batchBytes?: number;
  /** Background range requests in flight. @default 2 */
  concurrency?: number;
  /** Cap in bytes per second; 0 means none. @default 0 */
  bandwidth?: number;
  log?: Logger;
}

export type HydratorState = 'running' | 'paused' | 'complete' | 'stopped';

export interface HydratorEvents {
  state: [state: HydratorState];
  'batch-error': [err: Error];
}

const BACKOFF_FIRST_MS = 100;
const BACKOFF_MAX_MS = 5_000;
const ZERO_RUN_MAX_BYTES = 1 << 30;

export class Hydrator extends EventEmitter<HydratorEvents> {
  private readonly disk: StreamingDisk;
  private readonly opts: Required<Omit<HydratorOptions, 'log'>>;
  private readonly log: Logger | undefined;
  private current: HydratorState = 'paused';
  private started = false;
  private wake: (() => void) | null = null;
  private nextSlotAt = 0;
  private cursor = 0;
  private failures = 0;
  private lastErrorMessage: string | null = null;
  private loop: Promise<void> | null = null;

  constructor(disk: StreamingDisk, opts: HydratorOptions = {}) {
    super();
    this.disk = disk;
    this.log = opts.log;
    this.opts = { batchBytes: 8 << 20, concurrency: 2, bandwidth: 0, ...stripUndefined(opts) };
    if (disk.complete) this.current = 'complete';
  }

  get state(): HydratorState {
    // The disk says complete from the moment cutover commits, before our loop notices.
    return this.disk.complete ? 'complete' : this.current;
  }

  get lastError(): string | null {
    return this.lastErrorMessage;
  }

  get bandwidth(): number {
    return this.opts.bandwidth;
  }

  start(): void {
    if (this.started || this.current === 'complete') return;
    this.started = true;
    this.setState('running');
    this.loop = this.run().catch((err: Error) => {
      this.log?.error({ err }, 'hydrator stopped on an unexpected error');
      this.lastErrorMessage = err.message;
      this.setState('stopped');
    });
  }

  pause(): void {
    if (this.current === 'running') this.setState('paused');
  }

  resume(): void {
    if (this.current !== 'paused') return;
    if (!this.started) return this.start();
    this.setState('running');
    this.poke();
  }

  setBandwidth(bytesPerSecond: number): void {
    this.opts.bandwidth = Math.max(0, bytesPerSecond);
    this.nextSlotAt = 0;
    this.poke();
  }

  async stop(): Promise<void> {
    if (this.current !== 'complete') this.setState('stopped');
    this.poke();
    await this.loop;
  }

  private setState(s: HydratorState): void {
    if (this.current === s) return;
    this.current = s;
    this.emit('state', s);
  }

  private poke(): void {
    const w = this.wake;
    this.wake = null;
    w?.();
  }

  /** Sleeps until `ms` pass or someone pokes (pause/resume/bandwidth/stop). */
  private nap(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const t = setTimeout(done, ms);
      const self = this;
      function done(): void {
        clearTimeout(t);
        if (self.wake === done) self.wake = null;
        resolve();
      }
      this.wake = done;
    });
  }

  private async run(): Promise<void> {
    const disk = this.disk;
    const map = disk.map;
    const inflight = new Set<Promise<void>>();
    let wrapped = false;
    while (this.current !== 'stopped') {
      if (map.allLocal) break;
      if (this.current === 'paused') {
        await this.nap(60_000);
        continue;
      }
      if (disk.foregroundFetches > 0) {
        await this.waitFor('foreground-idle', 1000);
        continue;
      }
      if (inflight.size >= this.opts.concurrency) {
        await Promise.race(inflight);
        continue;
      }
      const run = this.nextRun();
      if (!run) {
        // Nothing claimable from the cursor on. Start over from the top once; if still
        // nothing, the remaining regions are being filled by others: wait for them.
        if (!wrapped) {
          wrapped = true;
          this.cursor = 0;
          continue;
        }
        if (inflight.size > 0) await Promise.race(inflight);
        else await this.waitFor('region-settled', 1000);
        wrapped = false;
        this.cursor = 0;
        continue;
      }
      wrapped = false;
      this.cursor = run.first + run.count;
      if (run.zero) {
        try {
          await disk.zeroFillRun(run.first, run.count);
        } catch (err) {
          if ((this.current as HydratorState) === 'stopped') break; // the disk closed under the zero fill
          throw err;
        }
        await new Promise<void>((resolve) => setImmediate(resolve));
        continue;
      }
      const bytes = run.count * map.regionSize;
      await this.takeTokens(bytes);
      if (this.current !== 'running') continue; // paused or stopped while we waited
      // The regions may have changed state while we waited for tokens: re-check them.
      let n = 0;
      while (n < run.count && map.state(run.first + n) === RegionState.Remote) n++;
      if (n === 0) continue;
      const p: Promise<void> = disk
        .fetchRun(run.first, n, 'background')
        .then(() => {
          this.failures = 0;
          this.lastErrorMessage = null; // the origin works again: the error is history
        })
        .catch(async (err: Error) => {
          this.failures++;
          this.lastErrorMessage = err.message;
          this.emit('batch-error', err);
          this.log?.warn({ err: err.message, first: run.first, count: n, failures: this.failures }, 'background fetch failed; will retry');
          if (this.current !== 'stopped') await this.nap(Math.min(BACKOFF_FIRST_MS * 2 ** (this.failures - 1), BACKOFF_MAX_MS));
        })
        .finally(() => inflight.delete(p));
      inflight.add(p);
    }
    await Promise.allSettled(inflight);
    if (map.allLocal && this.current !== 'stopped') {
      await disk.cutover();
      this.setState('complete');
    }
  }

  /** Waits for a disk event, a poke, or `ms`, whichever comes first, leaving no listener behind. */
  private async waitFor(event: 'foreground-idle' | 'region-settled', ms: number): Promise<void> {
    const ac = new AbortController();
    try {
      await Promise.race([once(this.disk, event, { signal: ac.signal }), this.nap(ms)]);
    } catch {
      // aborted: the nap won
    } finally {
      ac.abort();
      this.poke();
    }
  }

  /** The next run of adjacent remote (or of zero) regions at or after the cursor. */
  private nextRun(): { first: number; count: number; zero: boolean } | null {
    const map = this.disk.map;
    const states = map.states;
    const maxRegions = Math.max(1, Math.floor(this.batchLimit() / map.regionSize));
    // Zero runs cost no network and no tokens: take up to 1 GiB at once, so a sparse image
    // is zeroed with a few offloaded commands.
    const maxZeroRegions = Math.max(1, Math.floor(ZERO_RUN_MAX_BYTES / map.regionSize));
    for (let r = this.cursor; r < map.count; r++) {
      const s = states[r];
      if (s !== RegionState.Remote && s !== RegionState.Zero) continue;
      const max = s === RegionState.Zero ? maxZeroRegions : maxRegions;
      let n = 1;
      while (r + n < map.count && n < max && states[r + n] === s) n++;
      return { first: r, count: n, zero: s === RegionState.Zero };
    }
    return null;
  }

  /** Under a cap, a batch carries at most a quarter second of it, so pacing stays smooth. */
  private batchLimit(): number {
    const bw = this.opts.bandwidth;
    return bw > 0 ? Math.min(this.opts.batchBytes, Math.floor(bw / 4)) : this.opts.batchBytes;
  }

  private async takeTokens(bytes: number): Promise<void> {
    const bw = this.opts.bandwidth;
    if (bw <= 0) return;
    const now = Date.now();
    const start = Math.max(now, this.nextSlotAt);
    this.nextSlotAt = start + (bytes / bw) * 1000;
    if (start > now) await this.nap(start - now);
  }
}

function stripUndefined<T extends object>(o: T): Partial<T> {
  return Object.fromEntries(Object.entries(o).filter(([k, v]) => v !== undefined && k !== 'log')) as Partial<T>;
}
