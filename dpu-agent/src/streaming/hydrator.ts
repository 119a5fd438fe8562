/**
 * The hydrator copies every region that is not yet local, in the background, until the
 * disk can cut over. Policy:
 *  - first the regions the host just missed (the disk's `miss` event: a miss fetches only
 *    the blocks asked for, and the rest of its region is likely to be read next), then the
 *    regions of a boot profile in the order the host read them (prioritize), then
 *    sequential from the start of the disk; adjacent remote regions coalesced into one
 *    range request of up to `batchBytes`; `zero` regions are filled locally, no network;
 *  - `concurrency` background reads in flight; the source decides when their requests go
 *    on the wire: an HTTP source holds them back while the host waits on small misses
 *    (http-source.ts, backgroundTurn), so a miss never queues behind hydration;
 *  - an optional bandwidth cap (token bucket on batch starts; batches shrink so that the
 *    cap is smooth even at low rates);
 *  - pause/resume; after a failed batch, exponential backoff, then the regions are
 *    retried on the next pass;
 *  - regions the disk marked failed (verification failed too often) are skipped; when
 *    only they remain, or the disk's local target failed, the hydrator ends in `failed`
 *    and says why in lastError;
 *  - when every region is local: cutover (see StreamingDisk.cutover).
 *
 * Every sleep (a nap: paused, backoff, pacing, waiting for an event) is woken by a poke
 * (pause, resume, a bandwidth change, stop): all of them, since several can be asleep at
 * once — the main loop and each failed batch's backoff.
 */
import { DpuError } from '../../../image-access/src/errors.js';
import { leftForLater } from './peer-source.js';
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
  /** Test seam: schedules `fn` after `ms` and returns a cancel function. @default setTimeout */
  schedule?: (fn: () => void, ms: number) => () => void;
  /**
   * Gates the sweep (not misses or a boot profile; peer-source.ts: waiting for peers to
   * have a region instead of reading the origin). `admissible()` is null when nothing is
   * gated, else 1 for each region that may be copied now (the sweep skips the others in
   * one pass over the array); `admit(first, count)` then says how many of a run to copy
   * (0: leave it for later). @default no gate
   */
  gate?: { admissible(): Uint8Array | null; admit(first: number, count: number): number };
  /** Test seam: where a gated sweep starts, as a fraction of the regions. @default Math.random */
  random?: () => number;
  log?: Logger;
}

export type HydratorState = 'running' | 'paused' | 'complete' | 'stopped' | 'failed';

export interface HydratorEvents {
  state: [state: HydratorState];
  'batch-error': [err: Error];
}

const BACKOFF_FIRST_MS = 100;
const BACKOFF_MAX_MS = 5_000;
const ZERO_RUN_MAX_BYTES = 1 << 30;
/** How soon regions left waiting for a peer are looked at again (peers' maps change every 500 ms). */
const GATE_RECHECK_MS = 250;
/** Batches in flight while the gate holds regions back (each at most 2 MiB: PeerFirstSource.admit). */
const GATED_CONCURRENCY = 6;

export class Hydrator extends EventEmitter<HydratorEvents> {
  private readonly disk: StreamingDisk;
  private readonly opts: Required<Omit<HydratorOptions, 'log' | 'schedule' | 'gate' | 'random'>>;
  private readonly gate: NonNullable<HydratorOptions['gate']> | null;
  private readonly random: () => number;
  /** The last sweep left regions for later (the gate held them): look again soon. */
  private gated = false;
  private readonly schedule: (fn: () => void, ms: number) => () => void;
  private readonly log: Logger | undefined;
  private current: HydratorState = 'paused';
  private started = false;
  /** Every nap in progress: a poke wakes them all. */
  private readonly naps = new Set<() => void>();
  private nextSlotAt = 0;
  private cursor = 0;
  private failures = 0;
  private lastErrorMessage: string | null = null;
  private loop: Promise<void> | null = null;
  /** Regions to copy before the sweep, misses first; `queued` dedupes both lists. */
  private readonly missed: number[] = [];
  private readonly planned: number[] = [];
  private plannedAt = 0;
  private readonly queued = new Set<number>();

  constructor(disk: StreamingDisk, opts: HydratorOptions = {}) {
    super();
    this.disk = disk;
    this.log = opts.log;
    const { schedule, gate, random, ...rest } = opts;
    this.random = random ?? Math.random;
    this.gate = gate ?? null;
    this.opts = { batchBytes: 8 << 20, concurrency: 2, bandwidth: 0, ...stripUndefined(rest) };
    this.schedule =
      schedule ??
      ((fn, ms) => {
        const t = setTimeout(fn, ms);
        return () => clearTimeout(t);
      });
    if (disk.complete) this.current = 'complete';
    disk.on('miss', (r) => {
      if (this.queued.has(r)) return;
      this.queued.add(r);
      this.missed.push(r);
      this.poke();
    });
    disk.on('failed', (err) => {
      this.lastErrorMessage = err.message;
      if (this.current !== 'complete') this.setState('failed');
      this.poke();
    });
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

  /**
   * Starts again after ending `failed` on regions that failed verification, once they may
   * be fetched again (the source URL was replaced). A disk whose target failed stays failed.
   */
  retry(): void {
    if (this.current !== 'failed' || this.disk.failed) return;
    this.started = false;
    this.lastErrorMessage = null;
    this.start();
  }

  pause(): void {
    if (this.current === 'running') this.setState('paused');
    this.poke();
  }

  resume(): void {
    if (this.current !== 'paused') return;
    if (!this.started) return this.start();
    this.setState('running');
    this.poke();
  }

  /**
   * Copies `regions` before the sequential sweep, in this order (a boot profile: the order
   * a host read them). Regions already local, or queued, are skipped when their turn comes.
   */
  prioritize(regions: Iterable<number>): void {
    for (const r of regions) {
      if (!Number.isInteger(r) || r < 0 || r >= this.disk.map.count || this.queued.has(r)) continue;
      this.queued.add(r);
      this.planned.push(r);
    }
    this.poke();
  }

  /** Regions waiting in the priority lists (misses and a boot profile). */
  get prioritized(): number {
    return this.missed.length + this.planned.length - this.plannedAt;
  }

  setBandwidth(bytesPerSecond: number): void {
    this.opts.bandwidth = Math.max(0, bytesPerSecond);
    this.nextSlotAt = 0;
    this.poke();
  }

  async stop(): Promise<void> {
    if (this.current !== 'complete' && this.current !== 'failed') this.setState('stopped');
    this.poke();
    await this.loop;
  }

  /** Neither stopped nor failed: the loop goes on. */
  private get alive(): boolean {
    return this.current !== 'stopped' && this.current !== 'failed';
  }

  private setState(s: HydratorState): void {
    if (this.current === s) return;
    this.current = s;
    this.disk.hydrating = s === 'running'; // else the disk completes missed regions itself
    this.emit('state', s);
  }

  private poke(): void {
    const naps = [...this.naps];
    this.naps.clear();
    for (const wake of naps) wake();
  }

  /** Sleeps until `ms` pass or someone pokes (pause/resume/bandwidth/stop). */
  private nap(ms: number): Promise<void> {
    return this.napWithWake(ms).slept;
  }

  /** A nap, and the function that ends this one nap (and no other) early. */
  private napWithWake(ms: number): { slept: Promise<void>; wake: () => void } {
    let wake!: () => void;
    const slept = new Promise<void>((resolve) => {
      const done = (): void => {
        cancel();
        this.naps.delete(done);
        resolve();
      };
      const cancel = this.schedule(done, ms);
      this.naps.add(done);
      wake = done;
    });
    return { slept, wake };
  }

  private async run(): Promise<void> {
    const disk = this.disk;
    const map = disk.map;
    const inflight = new Set<Promise<void>>();
    let wrapped = false;
    while (this.alive) {
      if (map.allLocal) break;
      if (this.current === 'paused') {
        await this.nap(60_000);
        continue;
      }
      // Waiting for peers, more (short) batches at once: each waits on a peer's upload,
      // shared with the other disks it serves, not on this node's link.
      if (inflight.size >= (this.gate !== null && this.gate.admissible() !== null ? Math.max(GATED_CONCURRENCY, this.opts.concurrency) : this.opts.concurrency)) {
        await Promise.race(inflight);
        continue;
      }
      const run = this.nextRun(!wrapped);
      if (!run) {
        // Nothing claimable from the cursor on. Start over from the top once; if still
        // nothing, the remaining regions are being filled by others: wait for them.
        if (!wrapped) {
          wrapped = true;
          this.cursor = 0;
          continue;
        }
        if (inflight.size > 0) await Promise.race(inflight);
        else if (this.onlyFailedRegionsLeft()) break;
        else await this.waitFor('region-settled', this.gated ? GATE_RECHECK_MS : 1000);
        wrapped = false;
        this.cursor = 0;
        continue;
      }
      wrapped = false;
      if (!run.urgent) this.cursor = run.first + run.count;
      if (run.zero) {
        try {
          await disk.zeroFillRun(run.first, run.count);
        } catch (err) {
          if (!this.alive) break; // the disk closed or failed under the zero fill
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
          // Stopped (the agent shuts down, the disk is deleted): the stop closed the
          // source under this batch. Not a failure of the origin; nothing to report.
          if (!this.alive && err instanceof DpuError && err.code === 'DPU_ERR_SOURCE_CLOSED') return;
          // Left for later by the peer source (its peers did not answer while the disk
          // waits for peers): not a failure; the sweep takes other regions meanwhile.
          if (leftForLater(err)) return;
          this.failures++;
          this.lastErrorMessage = err.message;
          this.emit('batch-error', err);
          this.log?.warn({ err: err.message, first: run.first, count: n, failures: this.failures }, 'background fetch failed; will retry');
          if (this.alive) await this.nap(Math.min(BACKOFF_FIRST_MS * 2 ** (this.failures - 1), BACKOFF_MAX_MS));
        })
        .finally(() => inflight.delete(p));
      inflight.add(p);
    }
    await Promise.allSettled(inflight);
    if (map.allLocal && this.alive) {
      await disk.cutover();
      this.setState('complete');
    } else if (this.alive && this.onlyFailedRegionsLeft()) {
      const bad = [...disk.failedRegions].sort((a, b) => a - b);
      this.lastErrorMessage = `${bad.length} region(s) failed verification and are not fetched again (region ${bad.slice(0, 8).join(', region ')}${bad.length > 8 ? ', …' : ''}): the origin serves bytes that do not match the image manifest; replace the source URL to try again`;
      this.log?.error({ regions: bad.length }, this.lastErrorMessage);
      this.setState('failed');
    }
  }

  /** Every region that is not local failed verification too often: nothing left to copy. */
  private onlyFailedRegionsLeft(): boolean {
    const map = this.disk.map;
    const bad = this.disk.failedRegions.size;
    return bad > 0 && map.count - map.local === bad;
  }

  /** Waits for a disk event, a poke, `ms`, or one of `also`, whichever comes first, leaving no listener behind. */
  private async waitFor(event: 'region-settled', ms: number, also: readonly Promise<unknown>[] = []): Promise<void> {
    const ac = new AbortController();
    const nap = this.napWithWake(ms);
    try {
      // `also` (batches in flight) can end the wait too; either way the listener and the
      // nap go at once (left waiting, they piled up: one per turn while the host missed).
      await Promise.race([once(this.disk, event, { signal: ac.signal }), nap.slept, ...also]);
    } catch {
      // aborted: the nap won
    } finally {
      ac.abort();
      nap.wake(); // ends this wait's own nap only: a failed batch's backoff keeps sleeping
    }
  }

  /**
   * The next run to copy: from a missed region, else from the boot profile, else the next
   * run of adjacent remote (or of zero) regions at or after the cursor (a random one, with
   * `randomStart`, while the gate holds regions back).
   */
  private nextRun(randomStart: boolean): { first: number; count: number; zero: boolean; urgent: boolean } | null {
    for (const r of this.takeUrgent()) {
      const run = this.runAt(r);
      if (run) return { ...run, urgent: true };
    }
    const count = this.disk.map.count;
    const states = this.disk.map.states;
    const open = this.gate?.admissible() ?? null;
    this.gated = false;
    // Waiting for peers, the sweep starts at a random region each time: disks that copy
    // from each other then want different regions at once, not all the newest ones of the
    // seeder, so each has regions to give the others (BitTorrent's random first pieces).
    if (open !== null && randomStart) this.cursor = Math.min(count - 1, Math.floor(this.random() * count));
    for (let r = this.cursor; r < count; r++) {
      // Held back: skipped without a call per region (an image of a million regions is
      // swept every 250 ms while its disk waits for peers).
      if (open !== null && states[r] === RegionState.Remote && open[r] !== 1) {
        this.gated = true;
        continue;
      }
      const run = this.runAt(r);
      if (!run) continue;
      if (run.zero || open === null) return { ...run, urgent: false };
      const n = this.gate!.admit(run.first, run.count);
      if (n > 0) return { first: run.first, count: Math.min(n, run.count), zero: false, urgent: false };
      this.gated = true;
    }
    return null;
  }

  /** Pops the priority lists, misses first; the caller stops at the first copyable one. */
  private *takeUrgent(): Generator<number> {
    while (this.missed.length > 0) {
      const r = this.missed.shift()!;
      this.queued.delete(r);
      yield r;
    }
    while (this.plannedAt < this.planned.length) {
      const r = this.planned[this.plannedAt++]!;
      this.queued.delete(r);
      yield r;
    }
    if (this.planned.length > 0) {
      this.planned.length = 0;
      this.plannedAt = 0;
    }
  }

  /** The run of adjacent remote (or zero) regions that starts at r, or null if r has nothing to copy. */
  private runAt(r: number): { first: number; count: number; zero: boolean } | null {
    const map = this.disk.map;
    const states = map.states;
    const bad = this.disk.failedRegions;
    const s = states[r];
    if (s !== RegionState.Remote && s !== RegionState.Zero) return null;
    if (bad.size > 0 && bad.has(r)) return null;
    // Zero runs cost no network and no tokens: take up to 1 GiB at once, so a sparse image
    // is zeroed with a few offloaded commands.
    const max = s === RegionState.Zero ? Math.max(1, Math.floor(ZERO_RUN_MAX_BYTES / map.regionSize)) : Math.max(1, Math.floor(this.batchLimit() / map.regionSize));
    // A region holding blocks fetched for misses is fetched alone, around those blocks.
    if (s === RegionState.Remote && this.disk.hasBlocks(r)) return { first: r, count: 1, zero: false };
    let n = 1;
    while (r + n < map.count && n < max && states[r + n] === s && !(bad.size > 0 && bad.has(r + n)) && !(s === RegionState.Remote && this.disk.hasBlocks(r + n))) n++;
    return { first: r, count: n, zero: s === RegionState.Zero };
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
