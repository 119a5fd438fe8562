/**
 * The streaming disk: a BlockBackend that serves a host from the local target where the
 * region map says `local`, and from the remote source everywhere else, making each region
 * local as it goes. See region/region-map.ts for the states and the durability order.
 *
 * Rules, and why:
 *  - A read that covers remote regions whole starts one fetch for them (a run of adjacent
 *    remote regions becomes one range request); other reads of those regions share that
 *    fetch and are answered from the fetched bytes as soon as they arrive — before the
 *    local write and long before the metadata commit, so the host never waits on our
 *    bookkeeping.
 *  - A read that covers part of a remote region (a miss: what a booting host does, 4–128
 *    KiB at a time) fetches only the blocks it needs (64 KiB, the manifest's Merkle
 *    leaves), verifies each against its leaf hash, answers from them, and emits `miss` so
 *    the hydrator copies the region next. The region stays `remote`: fetched blocks are
 *    kept in memory (a byte budget, oldest evicted first) and concurrent misses share
 *    them; when the region is fetched whole, only the blocks not yet here are requested,
 *    and the whole region is verified and written as before (read-modify-write and the
 *    durability order do not change). A disk whose manifest is version 1 (no leaves) can
 *    verify whole regions only, and its misses fetch whole regions. Blocks are dropped
 *    when their region leaves `remote` (a write claims it, a fetch takes it) and when a
 *    manifest arrives (blocks fetched before it were not verified).
 *  - While a region is `filling`, writes to it wait: a fetch landing after a host write
 *    would put the image's old bytes over the host's new ones.
 *  - A write covering a whole remote region needs no fetch: it claims the region and its
 *    bytes become the region. A partial write first makes the region local
 *    (read-modify-write); otherwise the rest of the region would be the previous tenant's.
 *  - WRITE_ZEROES or TRIM covering a whole remote region marks it `zero` without a fetch
 *    (WRITE_ZEROES with NO_HOLE writes the zeros instead; see zeroRange). A region that is
 *    already local stays local (zeros are written there), so a disk that has cut over never
 *    needs its source again.
 *  - FLUSH and FUA commit: fdatasync of the target, then the map (group commit: callers
 *    that arrive while a commit runs share the next one). The map is also committed at
 *    least every `commitIntervalMs` while it has changes.
 *  - An I/O error writing the target, or a failed fdatasync, fails the disk (as dm-clone
 *    goes to fail mode): from then on every request and every commit fails with
 *    DPU_ERR_TARGET_FAILED and the map is never written again. Linux reports a writeback
 *    error once; the next fdatasync returns 0 over the lost pages, so committing after a
 *    failed one would record `local` over data that is gone. The persisted map is the last
 *    one written before the failure, which is consistent; reopening the disk resumes there.
 *  - A request that writes into the caller's buffer from several regions settles every
 *    part before it fails (settleAll): the buffer goes back to a pool when the request ends.
 *  - A region whose fetched bytes fail verification REGION_INTEGRITY_LIMIT times is marked
 *    failed: never fetched again until the source changes (setSource), reads of it fail at
 *    once with DPU_ERR_INTEGRITY, and the hydrator reports it instead of looping on it.
 *  - `verified` means every region that came from the origin was checked: a manifest that
 *    arrives after regions were fetched (or that finds local regions of unknown origin at
 *    open) first reads those regions back and verifies them. A fetched region that does not
 *    match goes back to `remote`; one of unknown origin (perhaps the host's own writes) is
 *    left alone and counted as unverifiable.
 */
import { EventEmitter } from 'node:events';
import type { Logger } from 'pino';
import type { BlockBackend, BlockCapabilities, MaybePromise, WriteZeroesOptions } from '../block/backend.js';
import { DpuError } from '../../../image-access/src/errors.js';
import type { Target } from '../local/target.js';
import type { Manifest } from '../../../image-access/src/manifest.js';
import { sharedBuffer, type HashWorkers } from '../../../image-access/src/hash-workers.js';
import { RegionState, type RegionMap } from '../region/region-map.js';
import type { FetchPriority, RemoteSource } from '../../../image-access/src/source.js';
import { encodeRuns, leftForLater } from './peer-source.js';
import { deferred, noop, settleAll, type Deferred } from '../../../common/src/deferred.js';
import type { ReadRecorder } from './boot-profile.js';

export interface StreamingDiskOptions {
  /** Null once the disk has cut over: every region is local and the network is not needed. */
  source: RemoteSource | null;
  target: Target;
  map: RegionMap;
  /** Commit the map at least this often while it has changes, ms. @default 1000 */
  commitIntervalMs?: number;
  /** Regions one foreground miss fetches at most in one range request. @default 8 */
  maxForegroundRun?: number;
  /**
   * The block a miss fetches when the disk has no manifest (with one, its leaf size; a
   * version 1 manifest means whole regions); 0 makes every miss fetch whole regions.
   * @default 64 KiB
   */
  missBlockSize?: number;
  readOnly?: boolean;
  /** Verifies every fetched region and marks zero regions (see setManifest). */
  manifest?: Manifest | null;
  /**
   * Where the image ends, on a disk larger than its image (image-access/src/padded.ts): a manifest
   * of the image is applied as one of the disk, zeros after the image. @default the disk's size
   */
  imageSize?: number;
  /**
   * Regions local at open were not verified against `manifest` (it was stored, but the
   * read-back pass had not finished): verify them as setManifest does. @default false
   */
  verifyLocalAtOpen?: boolean;
  /**
   * Worker threads that verify fetched regions against a version 2 manifest, off the event
   * loop that serves the host (fetch buffers are then shared memory they read in place).
   * Without them regions are verified on the event loop. Owned by the caller.
   */
  hashWorkers?: HashWorkers;
  log?: Logger;
}


/** A host read whose region fails verification is fetched this many times in all before EIO. */
const INTEGRITY_ATTEMPTS = 3;

/**
 * A region whose fetched bytes fail verification this many times in all (host reads and
 * hydration together) is marked failed and not fetched again: a damaged object in the store
 * fails every time, while a flaky proxy that corrupts a few answers in a row is ridden out.
 */
export const REGION_INTEGRITY_LIMIT = 5;

/**
 * Bytes of miss blocks kept at most (see the rules at the top): a booting host's misses
 * land in a few dozen regions at a time, which the hydrator copies next.
 */
const BLOCK_CACHE_BYTES = 16 << 20;

/** A miss's block when the disk has no manifest to say (one with leaves uses its leaf size). */
const MISS_BLOCK_BYTES = 64 << 10;

/** Zero runs shorter than this are written (cheaper than starting a zeroing command). */
const ZERO_OFFLOAD_MIN_BYTES = 32 << 20;

/**
 * Fetch buffers are reused: hydration allocates one batch (8 MiB by default) per request,
 * and left to the garbage collector they pile up as external memory between collections
 * (bench/scaling.ts saw the agent's peak RSS ~50 MiB above its idle size while hydrating).
 * A buffer is given back only on a later turn of the event loop (setImmediate), after every
 * reader that was handed a region of it has copied its bytes out (they do so in the
 * microtask that resumes them), so no reader ever sees the next fetch's bytes.
 */
class BufferRecycler {
  private readonly free = new Map<number, Buffer[]>();
  private pooled = 0;

  /**
   * `maxBytes` bounds what is kept idle (two 8 MiB batches by default); `shared` buffers are
   * SharedArrayBuffer memory (hash workers read it in place).
   */
  constructor(
    private readonly shared: boolean,
    private readonly maxBytes = 16 << 20,
  ) {}

  take(size: number): Buffer {
    const b = this.free.get(size)?.pop();
    if (!b) return this.shared ? sharedBuffer(size) : Buffer.allocUnsafe(size);
    this.pooled -= size;
    return b;
  }

  clear(): void {
    this.free.clear();
    this.pooled = 0;
  }

  give(buf: Buffer): void {
    setImmediate(() => {
      if (this.pooled + buf.length > this.maxBytes) return;
      let list = this.free.get(buf.length);
      if (!list) this.free.set(buf.length, (list = []));
      list.push(buf);
      this.pooled += buf.length;
    });
  }
}

interface Fill {
  /** Settles when the region has left `filling`: resolved on success, rejected on failure. */
  done: Promise<void>;
  /** For a fetch: the region's bytes, as soon as they have arrived. */
  data: Promise<Buffer> | null;
  /**
   * For a region of a background batch: its place in the batch and how many of the
   * batch's regions have arrived. A miss on a region with others still to arrive ahead of
   * it fetches its blocks instead of waiting for them (see readRegionAsync).
   */
  batch?: { index: number; arrived: { n: number } };
}

/** The blocks of one remote region fetched for misses (see the rules at the top). */
class RegionBlocks {
  /** Block index → its verified bytes (a view of the buffer its fetch filled; never pooled). */
  readonly have = new Map<number, Buffer>();
  /** Block index → the fetch bringing it. */
  readonly pending = new Map<number, Promise<void>>();
  bytes = 0;
  constructor(readonly blockSize: number) {}
}

export interface DiskProgress {
  size: number;
  /** Where the image ends (the disk reads as zeros after it). */
  imageSize: number;
  regionSize: number;
  regionsTotal: number;
  regionsLocal: number;
  regionsZero: number;
  bytesFetched: number;
  foregroundFetches: number;
  /** Host misses answered by fetching only the blocks they needed. */
  blockMisses: number;
  /** Bytes those block fetches brought (part of bytesFetched). */
  blockBytesFetched: number;
  fetchRetries: number;
  fetchFailures: number;
  /** Regions whose fetched bytes did not match the manifest (dropped, re-fetched). */
  integrityFailures: number;
  /** A manifest is applied: every region fetched from now on is verified. */
  hasManifest: boolean;
  /** Every region fetched from the origin was verified against a manifest. */
  verified: boolean;
  /** Local regions a manifest could not vouch for (local before it came, and different). */
  unverifiableRegions: number;
  /** Regions that failed verification REGION_INTEGRITY_LIMIT times: not fetched again. */
  failedRegions: number;
  complete: boolean;
  /** The local target failed: every request fails until the disk is reopened. */
  failed: boolean;
  /** Why the disk failed, or null. */
  failure: string | null;
}

/** A region of a background batch with regions ahead of it whose bytes have not arrived. */
function queuedBehind(fill: Fill | undefined): boolean {
  return fill?.batch !== undefined && fill.batch.index > fill.batch.arrived.n;
}

/** Why a local region is not (yet) verified: fetched without a manifest, or local at open. */
const Provenance = { Verified: 0, FetchedUnverified: 1, Unknown: 2 } as const;

export interface StreamingDiskEvents {
  complete: [];
  'foreground-idle': [];
  'region-settled': [region: number];
  /** A host read missed region r and fetched only the blocks it needed: copy the rest soon. */
  miss: [region: number];
  'commit-error': [err: Error];
  /** The local target failed: the disk is stopped (see the rules at the top). */
  failed: [err: DpuError];
}

export class StreamingDisk extends EventEmitter<StreamingDiskEvents> implements BlockBackend {
  readonly size: number;
  /** Where the image ends: the disk holds zeros after it (equal to size unless the disk is larger). */
  readonly imageSize: number;
  readonly capabilities: BlockCapabilities;
  readonly map: RegionMap;
  private readonly target: Target;
  private source: RemoteSource | null;
  private readonly inflight = new Map<number, Fill>();
  /**
   * Regions fetched before a manifest was set, their writes still in flight: each is
   * checked as its write ends (fetchRun's `stored`). Once a manifest is set, readers wait
   * for that check instead of taking the unchecked bytes, and setManifest waits for it.
   */
  private readonly unchecked = new Map<number, Fill>();
  private readonly fetchBuffers: BufferRecycler;
  private readonly hashWorkers: HashWorkers | undefined;
  private readonly log: Logger | undefined;
  private readonly maxForegroundRun: number;
  private readonly missBlockBytes: number;
  private commitRunning: Promise<void> | null = null;
  private commitQueued: Promise<void> | null = null;
  private readonly commitTimer: NodeJS.Timeout;
  private fgFetches = 0;
  private lastSourceStats = { bytesFetched: 0, retries: 0, failures: 0 };
  private manifest: Manifest | null = null;
  private integrityFailures = 0;
  /** Verification failures per region, and the regions that reached the limit. */
  private readonly integrityCounts = new Map<number, number>();
  private readonly badRegions = new Set<number>();
  /** Per region, a Provenance: why a local region is not yet verified (0 when it is). */
  private readonly provenance: Uint8Array;
  /**
   * 1: region r's bytes on the target are the image's, checked against the manifest (a
   * verified fetch, or read back and verified at open), and the host has not written to
   * it since. Only these are served to peers (readForPeer). Cleared, synchronously, before
   * any host write, zeroing or trim of the region reaches the target.
   */
  private readonly pristine: Uint8Array;
  /** Peer reads of the target in flight (close waits for them). */
  private readonly peerReads = new Set<Promise<void>>();
  private pendingVerification = 0;
  private unverifiable = 0;
  private verifying: Promise<void> | null = null;
  private failure: DpuError | null = null;
  private closed = false;
  /** Miss blocks per remote region, oldest first (Map order), and their bytes. */
  private readonly blocks = new Map<number, RegionBlocks>();
  private blockBytes = 0;
  private readonly blockFetches = new Set<Promise<void>>();
  private blockMisses = 0;
  private blockBytesFetched = 0;
  /** While a boot profile is recorded (boot-profile.ts): told of every host read, first thing. Null otherwise. */
  recorder: ReadRecorder | null = null;

  constructor(opts: StreamingDiskOptions) {
    super();
    this.map = opts.map;
    this.target = opts.target;
    this.source = opts.source;
    this.size = opts.map.diskSize;
    this.imageSize = opts.imageSize ?? this.size;
    this.log = opts.log;
    this.maxForegroundRun = opts.maxForegroundRun ?? 8;
    this.missBlockBytes = opts.missBlockSize ?? MISS_BLOCK_BYTES;
    this.hashWorkers = opts.hashWorkers;
    this.fetchBuffers = new BufferRecycler(this.hashWorkers !== undefined);
    if (!this.source && !this.map.allLocal) {
      throw new DpuError('DPU_ERR_CONFIG', 'a disk with regions that are not local needs a remote source');
    }
    this.capabilities = {
      readOnly: opts.readOnly ?? false,
      flush: true,
      fua: true,
      trim: true,
      writeZeroes: true,
      fastZero: true,
      cache: true,
      multiConn: true,
    };
    this.provenance = new Uint8Array(this.map.count);
    this.pristine = new Uint8Array(this.map.count);
    if (!opts.manifest || opts.verifyLocalAtOpen) {
      // Local regions whose origin we cannot vouch for: a manifest set later checks them.
      for (let r = 0; r < this.map.count; r++) if (this.map.states[r] === RegionState.Local) this.markProvenance(r, Provenance.Unknown);
    }
    if (opts.manifest) this.setManifest(opts.manifest).catch((err: Error) => this.log?.error({ err: err.message }, 'verifying local regions against the manifest failed'));
    this.commitTimer = setInterval(() => {
      if (this.map.dirty && !this.commitRunning && !this.failure) this.commit().catch((err: Error) => this.emit('commit-error', err));
    }, opts.commitIntervalMs ?? 1000);
    this.commitTimer.unref();
  }

  get foregroundFetches(): number {
    return this.fgFetches;
  }

  get complete(): boolean {
    return this.map.complete;
  }

  /**
   * While regions are not local, less than a region costs a whole region's fetch (a read
   * that misses, a partial write's read-modify-write): clients are told the region size.
   */
  get preferredBlockSize(): number | undefined {
    return this.map.allLocal ? undefined : this.map.regionSize;
  }

  progress(): DiskProgress {
    const s = this.source?.stats() ?? this.lastSourceStats;
    return {
      size: this.size,
      imageSize: this.imageSize,
      regionSize: this.map.regionSize,
      regionsTotal: this.map.count,
      regionsLocal: this.map.local,
      regionsZero: this.map.zero,
      bytesFetched: s.bytesFetched,
      foregroundFetches: this.fgFetches,
      blockMisses: this.blockMisses,
      blockBytesFetched: this.blockBytesFetched,
      fetchRetries: s.retries,
      fetchFailures: s.failures,
      integrityFailures: this.integrityFailures,
      hasManifest: this.manifest !== null,
      verified: this.verified,
      unverifiableRegions: this.unverifiable,
      failedRegions: this.badRegions.size,
      complete: this.map.complete,
      failed: this.failure !== null,
      failure: this.failure?.message ?? null,
    };
  }

  /** Every region fetched from the origin has been checked against the manifest. */
  get verified(): boolean {
    return this.manifest !== null && this.verifying === null && this.pendingVerification === 0 && this.unverifiable === 0;
  }

  /** Resolves when no read-back verification pass is running. */
  async whenVerified(): Promise<void> {
    while (this.verifying) await this.verifying.catch(noop);
  }

  /** Regions that failed verification too often (see the rules at the top). */
  get failedRegions(): ReadonlySet<number> {
    return this.badRegions;
  }

  get failed(): boolean {
    return this.failure !== null;
  }

  /** The source changed (a new URL): regions that failed verification may be fetched again. */
  retryFailedRegions(): void {
    this.badRegions.clear();
    this.integrityCounts.clear();
  }

  /**
   * From now on every fetched region is checked against `m` before anyone sees it, and
   * regions the manifest says are zeros become `zero` without a fetch. Regions that became
   * local before, from the origin, are read back and verified (resolves when they are): a
   * bad one goes back to `remote`. Regions the host wrote are the host's and are not checked.
   */
  setManifest(m: Manifest): Promise<void> {
    if (m.size === this.imageSize && m.regionSize === this.map.regionSize) m = m.padTo(this.size);
    if (m.size !== this.size || m.regionSize !== this.map.regionSize) {
      throw new DpuError('DPU_ERR_MANIFEST_INVALID', `the manifest describes ${m.size} bytes in ${m.regionSize}-byte regions; this disk has ${this.size} bytes in ${this.map.regionSize}-byte regions`);
    }
    // Verified against another manifest: not this one's until checked again.
    if (this.manifest !== null && this.manifest !== m) this.pristine.fill(0);
    this.manifest = m;
    // Blocks fetched before were not verified against it (or are another size): drop them.
    for (const r of [...this.blocks.keys()]) this.dropBlocks(r);
    for (let r = 0; r < this.map.count; r++) {
      if (m.isZero(r) && this.map.state(r) === RegionState.Remote) {
        this.map.set(r, RegionState.Zero);
        this.emit('region-settled', r);
      }
    }
    // Regions fetched before it, still being written, are checked as their writes end:
    // readers wait for that rather than take their unchecked bytes, and so does the pass.
    const writing: Promise<void>[] = [];
    for (const fill of this.unchecked.values()) {
      fill.data = null;
      writing.push(fill.done.catch(noop));
    }
    if (this.pendingVerification === 0 && writing.length === 0) return Promise.resolve();
    const pass = (this.verifying ?? Promise.resolve()).then(async () => {
      await Promise.all(writing);
      await this.verifyLocalRegions(m);
    });
    const mine = pass.finally(() => {
      if (this.verifying === mine) this.verifying = null;
    });
    this.verifying = mine;
    return mine;
  }

  /**
   * Reads back every local region not yet verified and checks it against `m`, one region a
   * turn of the event loop so the host's requests keep flowing. The read and the verdict
   * happen in one synchronous step, so no host write can slip between them.
   */
  private async verifyLocalRegions(m: Manifest): Promise<void> {
    const buf = Buffer.allocUnsafe(this.map.regionSize);
    let bad = 0;
    for (let r = 0; r < this.map.count && this.pendingVerification > 0; r++) {
      const why = this.provenance[r]!;
      if (why === Provenance.Verified) continue;
      if (this.closed || this.failure || this.manifest !== m) return;
      if (this.map.state(r) === RegionState.Local) {
        const data = buf.subarray(0, this.map.regionLength(r));
        this.target.readSync(data, this.map.regionStart(r));
        if (m.verify(r, data)) {
          this.markProvenance(r, Provenance.Verified);
          this.pristine[r] = 1;
        } else if (why === Provenance.FetchedUnverified) {
          // Fetched before the manifest came, never written by the host since: the origin
          // sent wrong bytes. Fetch the region again.
          bad++;
          this.integrityFailures++;
          this.log?.warn({ region: r, code: 'DPU_ERR_INTEGRITY' }, `region ${r}, fetched before the manifest arrived, does not match it: fetched again`);
          this.markProvenance(r, Provenance.Verified);
          this.settle(r, RegionState.Remote);
        } else {
          // Local before this process opened the disk: perhaps the host's own writes. Keep it.
          this.markProvenance(r, Provenance.Verified);
          this.unverifiable++;
        }
      } else {
        this.markProvenance(r, Provenance.Verified); // no longer local: it is verified when fetched
      }
      await new Promise<void>((resolve) => setImmediate(resolve));
    }
    if (bad > 0) this.log?.warn({ regions: bad }, 'local regions did not match the manifest and were dropped');
    if (this.unverifiable > 0) this.log?.warn({ regions: this.unverifiable }, 'local regions of unknown origin do not match the manifest (host writes from an earlier run?): the disk is not reported verified');
  }

  private markProvenance(r: number, p: number): void {
    const old = this.provenance[r]!;
    if (old === p) return;
    if (old === Provenance.Verified) this.pendingVerification++;
    else if (p === Provenance.Verified) this.pendingVerification--;
    this.provenance[r] = p;
  }

  /** The host wrote [first, last]: those regions' bytes are the host's, nothing to verify. */
  private hostWrote(first: number, last: number): void {
    for (let r = first; r <= last; r++) this.markProvenance(r, Provenance.Verified);
  }

  // ---- serving peers ------------------------------------------------------------------

  /**
   * Finds the local regions that hold the verified image though nothing marked them so:
   * those a previous run of the agent fetched (pristine marks are not kept across
   * restarts: a crash could leave a host write behind a stale mark). Reads each back and
   * checks it against the manifest in one synchronous step (no host write can slip in
   * between), one region a turn of the event loop so the host's requests keep flowing.
   * Resolves with how many were marked.
   */
  async scanPristine(): Promise<number> {
    let marked = 0;
    const buf = Buffer.allocUnsafe(this.map.regionSize);
    for (let r = 0; r < this.map.count; r++) {
      const m = this.manifest;
      if (this.closed || this.failure || m === null) break;
      if (this.pristine[r] === 1 || this.map.state(r) !== RegionState.Local || m.isZero(r)) continue;
      const data = buf.subarray(0, this.map.regionLength(r));
      this.target.readSync(data, this.map.regionStart(r));
      if (m.verify(r, data)) {
        this.pristine[r] = 1;
        marked++;
      }
      await new Promise<void>((resolve) => setImmediate(resolve));
    }
    return marked;
  }

  /**
   * The regions readForPeer serves now, as alternating run lengths, not served first
   * (GET /v1/disks/{id}/image/regions).
   */
  pristineRuns(): number[] {
    // A failed or closed disk serves nothing (readForPeer refuses): its map says so.
    return this.failure || this.closed ? [this.map.count] : encodeRuns(this.pristine);
  }

  /**
   * Whether readForPeer serves every region of the image that has data: complete,
   * verified, and none written by the host since. What it serves can then only shrink.
   */
  servesAll(): boolean {
    const m = this.manifest;
    if (m === null || !this.complete || !this.verified) return false;
    const regions = Math.ceil(this.imageSize / this.map.regionSize);
    for (let r = 0; r < regions; r++) if (this.pristine[r] !== 1 && !m.isZero(r)) return false;
    return true;
  }

  /** Whether a manifest is applied: what is fetched from now on is verified. */
  get hasManifest(): boolean {
    return this.manifest !== null;
  }

  /**
   * Reads [offset, offset + dest.length) of the image from the target, for a peer: only
   * from pristine regions, off the event loop. Resolves false — `dest` then holds nothing
   * usable — when a region in the range is not pristine, or stopped being while it was
   * read (a host write landed meanwhile). The peer verifies what it gets against the
   * manifest all the same.
   */
  async readForPeer(offset: number, dest: Buffer): Promise<boolean> {
    this.assertUsable();
    if (dest.length === 0) return true;
    const first = this.map.regionOf(offset);
    const last = this.map.regionOf(offset + dest.length - 1);
    const allPristine = (): boolean => {
      if (this.closed || this.failure) return false;
      for (let r = first; r <= last; r++) if (this.pristine[r] !== 1) return false;
      return true;
    };
    if (!allPristine()) return false;
    // close() waits for it: the target's descriptor is not closed under a read.
    const read = this.target.read ? this.target.read(dest, offset) : Promise.resolve(this.target.readSync(dest, offset));
    this.peerReads.add(read);
    try {
      await read;
    } catch (err) {
      // The host's own read of these bytes would fail that request only: so does a peer's.
      throw new DpuError('DPU_ERR_TARGET_IO', `reading ${dest.length} bytes at ${offset} for a peer: ${(err as Error).message}`);
    } finally {
      this.peerReads.delete(read);
    }
    return allPristine();
  }

  // ---- reads -------------------------------------------------------------------------

  read(offset: number, dest: Buffer): MaybePromise<void> {
    if (this.recorder !== null) this.recorder.onRead(offset, dest.length);
    this.assertUsable();
    const map = this.map;
    const first = map.regionOf(offset);
    const last = map.regionOf(offset + dest.length - 1);
    let r = first;
    while (r <= last && map.states[r] === RegionState.Local) r++;
    if (r > last) {
      // Hot path: everything local. One synchronous pread into the reply buffer.
      this.target.readSync(dest, offset);
      return undefined;
    }
    return this.readSlow(offset, dest, first, last);
  }

  private async readSlow(offset: number, dest: Buffer, first: number, last: number): Promise<void> {
    const waits: Promise<void>[] = [];
    try {
      this.startReads(offset, dest, first, last, waits);
    } catch (err) {
      // A part that failed at once (a local pread, say) must not abandon the parts already
      // started: they still write into `dest`, so the request waits for them too.
      waits.push(Promise.reject(err));
    }
    // Every part settles before the request ends, failed or not (see the rules at the top).
    await settleAll(waits);
  }

  /** Starts reading every region of a read that missed; each part's promise goes to `waits`. */
  private startReads(offset: number, dest: Buffer, first: number, last: number, waits: Promise<void>[]): void {
    const map = this.map;
    const end = offset + dest.length;
    const covers = (r: number): boolean => offset <= map.regionStart(r) && end >= map.regionStart(r) + map.regionLength(r);
    let r = first;
    while (r <= last) {
      const segStart = Math.max(offset, map.regionStart(r));
      const segEnd = Math.min(end, map.regionStart(r) + map.regionLength(r));
      const part = dest.subarray(segStart - offset, segEnd - offset);
      const s = map.state(r);
      if (s === RegionState.Remote && !this.badRegions.has(r)) {
        if (!covers(r) && this.missBlockSize !== null) {
          // A miss: fetch only the blocks asked for, and have the hydrator copy the region next.
          const missed = r; // `r` moves on before the read ends
          const done = this.readBlocks(missed, segStart, part);
          waits.push(done);
          this.emit('miss', missed);
          if (!this.hydrating) done.then(() => this.completeRegion(missed), noop);
          r++;
          continue;
        }
        // Fetch the whole run of adjacent remote regions this read needs in one request.
        let n = 1;
        while (r + n <= last && n < this.maxForegroundRun && map.state(r + n) === RegionState.Remote && !this.badRegions.has(r + n) && (covers(r + n) || this.missBlockSize === null)) n++;
        this.fetchRun(r, n, 'foreground').catch(noop); // errors reach us through each region's fill
      }
      const done = this.readRegion(r, segStart, part);
      if (done) waits.push(done);
      r++;
    }
  }

  /** The block a miss fetches, or null when misses fetch whole regions (a v1 manifest). */
  get missBlockSize(): number | null {
    const size = this.manifest ? this.manifest.leafSize : this.missBlockBytes;
    return size !== null && size > 0 && size < this.map.regionSize ? size : null;
  }

  /**
   * Set by the hydrator while it runs: it copies missed regions next. When nothing copies
   * in the background (paused, stopped, no hydrator), the disk completes a missed region
   * itself, around its blocks: the host's reads still make regions local, as before blocks,
   * and no block has to cross the link twice.
   */
  hydrating = false;
  private readonly completing = new Set<number>();

  /** Fetches the rest of remote region r (around its blocks), once, in the background. */
  private completeRegion(r: number): void {
    if (this.completing.has(r) || this.map.state(r) !== RegionState.Remote || this.badRegions.has(r) || !this.source || this.closed || this.failure) return;
    this.completing.add(r);
    this.fetchRun(r, 1, 'background')
      .catch((err: Error) => this.log?.debug({ region: r, err: err.message }, 'completing a missed region failed; a later read or the hydrator fetches it'))
      .finally(() => this.completing.delete(r));
  }

  /** Whether region r holds blocks fetched for misses (the hydrator fetches it alone). */
  hasBlocks(r: number): boolean {
    return this.blocks.has(r);
  }

  /**
   * Answers a read of part of remote region r from its blocks, fetching those not yet
   * here or on their way. `dest` is written only once every block it needs is here, in one
   * synchronous step. If the region leaves `remote` meanwhile, the read goes the usual way.
   * `behindBackground`: r is in a background batch whose bytes have not arrived; the
   * blocks are fetched for this read alone, and if the batch lands first it is used.
   */
  private async readBlocks(r: number, pos: number, dest: Buffer, behindBackground = false): Promise<void> {
    let integrityFailures = 0;
    let own: RegionBlocks | null = null;
    for (;;) {
      const blockSize = this.missBlockSize;
      if (blockSize === null || (behindBackground ? !queuedBehind(this.inflight.get(r)) : this.map.state(r) !== RegionState.Remote)) {
        await this.readRegion(r, pos, dest);
        return;
      }
      this.assertFetchable(r);
      let rb: RegionBlocks;
      if (behindBackground) {
        // Blocks of a region being fetched are this read's alone: the fetch will land it.
        rb = own && own.blockSize === blockSize ? own : (own = new RegionBlocks(blockSize));
      } else {
        const known = this.blocks.get(r);
        if (known && known.blockSize === blockSize) {
          rb = known;
        } else {
          if (known) this.dropBlocks(r);
          rb = new RegionBlocks(blockSize);
          this.blocks.set(r, rb);
        }
      }
      const from = pos - this.map.regionStart(r);
      const a = Math.floor(from / blockSize);
      const b = Math.floor((from + dest.length - 1) / blockSize);
      this.fetchBlocks(r, rb, a, b);
      const waits: Promise<void>[] = [];
      for (let i = a; i <= b; i++) if (!rb.have.has(i)) waits.push(rb.pending.get(i)!);
      try {
        await Promise.all(waits);
      } catch (err) {
        // Blocks that failed verification were dropped: fetch again, a bounded number of times.
        if (err instanceof DpuError && err.code === 'DPU_ERR_INTEGRITY' && ++integrityFailures < INTEGRITY_ATTEMPTS && !this.badRegions.has(r)) continue;
        throw err;
      }
      let complete = true;
      for (let i = a; i <= b && complete; i++) complete = rb.have.has(i);
      if (!complete) continue; // evicted while we waited: rare; fetch again
      for (let i = a; i <= b; i++) {
        const block = rb.have.get(i)!;
        const lo = Math.max(from, i * blockSize);
        const hi = Math.min(from + dest.length, i * blockSize + block.length);
        block.copy(dest, lo - from, lo - i * blockSize, hi - i * blockSize);
      }
      this.blockMisses++;
      return;
    }
  }

  /** Starts fetches for blocks [a, b] of region r that are neither here nor on their way, a range request per run. */
  private fetchBlocks(r: number, rb: RegionBlocks, a: number, b: number): void {
    const source = this.source;
    if (!source || this.closed) throw new DpuError('DPU_ERR_SOURCE_CLOSED');
    const regionStart = this.map.regionStart(r);
    const regionLength = this.map.regionLength(r);
    const size = rb.blockSize;
    let i = a;
    while (i <= b) {
      if (rb.have.has(i) || rb.pending.has(i)) {
        i++;
        continue;
      }
      let n = 1;
      while (i + n <= b && !rb.have.has(i + n) && !rb.pending.has(i + n)) n++;
      const from = i * size;
      const buf = Buffer.allocUnsafe(Math.min(n * size, regionLength - from));
      const firstBlock = i;
      this.fgFetches++;
      const fetch = source
        .read(regionStart + from, buf, { priority: 'foreground' })
        .then(() => {
          this.blockBytesFetched += buf.length;
          const m = this.manifest;
          if (m && !m.verifyBlocks(r, from, buf)) {
            throw this.integrityFailed(r, `blocks ${regionStart + from}-${regionStart + from + buf.length - 1} from ${source.description}`);
          }
          // Readers that hold `rb` take the bytes even if the region has moved on since
          // (the read was concurrent with whatever moved it); only a registered `rb` counts.
          for (let k = 0; k < n; k++) rb.have.set(firstBlock + k, buf.subarray(k * size, Math.min(buf.length, (k + 1) * size)));
          rb.bytes += buf.length;
          if (this.blocks.get(r) === rb) {
            this.blockBytes += buf.length;
            this.evictBlocks();
          }
        })
        .finally(() => {
          for (let k = 0; k < n; k++) rb.pending.delete(firstBlock + k);
          this.blockFetches.delete(fetch);
          if (--this.fgFetches === 0) this.emit('foreground-idle');
        });
      fetch.catch(noop); // readers get the error through `pending`
      this.blockFetches.add(fetch);
      for (let k = 0; k < n; k++) rb.pending.set(firstBlock + k, fetch);
      i += n;
    }
  }

  /** Keeps miss blocks within their budget: the oldest regions with nothing in flight go first. */
  private evictBlocks(): void {
    for (const [r, rb] of this.blocks) {
      if (this.blockBytes <= BLOCK_CACHE_BYTES) return;
      if (rb.pending.size === 0) this.dropBlocks(r);
    }
  }

  /** Forgets region r's miss blocks (readers already holding them keep their copy). */
  private dropBlocks(r: number): void {
    const rb = this.blocks.get(r);
    if (!rb) return;
    this.blocks.delete(r);
    this.blockBytes -= rb.bytes;
  }

  /** Reads part of one region; synchronous when the region is local or zero. */
  private readRegion(r: number, pos: number, dest: Buffer): Promise<void> | undefined {
    switch (this.map.state(r)) {
      case RegionState.Local:
        this.target.readSync(dest, pos);
        return undefined;
      case RegionState.Zero:
        dest.fill(0);
        return undefined;
      default:
        return this.readRegionAsync(r, pos, dest);
    }
  }

  private async readRegionAsync(r: number, pos: number, dest: Buffer): Promise<void> {
    let integrityFailures = 0;
    for (;;) {
      const s = this.map.state(r);
      if (s === RegionState.Local || s === RegionState.Zero) {
        this.readRegion(r, pos, dest);
        return;
      }
      if (s === RegionState.Remote) {
        this.assertFetchable(r);
        const fetch = this.fetchRun(r, 1, 'foreground');
        fetch.catch(noop); // errors reach us through the region's fill
        // A fetch that could not start (the source is closed) left the region remote: its
        // error is the answer. Looping on it would spin the event loop forever.
        if (this.map.state(r) === RegionState.Remote) await fetch;
        continue;
      }
      const fill = this.inflight.get(r)!;
      if (queuedBehind(fill) && this.missBlockSize !== null && dest.length < this.map.regionLength(r)) {
        // The region is in a background batch, behind regions that have not come yet: a
        // miss does not queue behind them (up to 8 MiB of link time) but fetches its blocks
        // now. The image is the region's truth while it fills (host writes wait), so they
        // are its bytes. The next region to arrive is waited for: its bytes are on their
        // way, and fetching them twice would cost the link more than the wait.
        await this.readBlocks(r, pos, dest, true);
        return;
      }
      let data: Buffer | null = null;
      try {
        if (fill.data) data = await fill.data;
        // A whole-region write, a zero fill, or bytes fetched before the manifest, checked
        // as their write ends (setManifest): then read what it left.
        else await fill.done;
      } catch (err) {
        // Bytes that failed verification were dropped: fetch again, a bounded number of times.
        if (err instanceof DpuError && err.code === 'DPU_ERR_INTEGRITY' && ++integrityFailures < INTEGRITY_ATTEMPTS && !this.badRegions.has(r)) continue;
        // A background batch left for later (peer-source.ts): the region is remote again.
        if (leftForLater(err)) continue;
        throw err;
      }
      if (data) {
        const from = pos - this.map.regionStart(r);
        data.copy(dest, 0, from, from + dest.length);
        return;
      }
    }
  }

  // ---- fetching ----------------------------------------------------------------------

  /**
   * Fetches regions [first, first+count), all `remote`, in one range request. Each region's
   * bytes are handed to waiting readers the moment they have arrived, then written to the
   * target, and only then is the region `local`. On failure the regions not yet landed go
   * back to `remote` and their waiters get the error.
   */
  fetchRun(first: number, count: number, priority: FetchPriority): Promise<void> {
    const source = this.source;
    if (this.failure) return Promise.reject(this.failure);
    if (!source || this.closed) return Promise.reject(new DpuError('DPU_ERR_SOURCE_CLOSED'));
    const map = this.map;
    const start = map.regionStart(first);
    // A region alone is fetched around the blocks its misses brought; in a longer run they
    // are dropped (the hydrator fetches regions with blocks alone).
    const blocks = count === 1 ? this.blocks.get(first) : undefined;
    let total = 0;
    const fills: { data: Deferred<Buffer>; done: Deferred<void>; end: number; fill: Fill }[] = [];
    const arrived = { n: 0 }; // regions of this batch whose bytes have arrived (or failed)
    for (let i = 0; i < count; i++) {
      const r = first + i;
      if (map.state(r) !== RegionState.Remote) throw new Error(`fetchRun: region ${r} is not remote`);
      this.dropBlocks(r);
      total += map.regionLength(r);
      const data = deferred<Buffer>();
      const done = deferred<void>();
      const fill: Fill = { done: done.promise, data: data.promise, ...(priority === 'background' ? { batch: { index: i, arrived } } : {}) };
      const f = { data, done, end: total, fill };
      fills.push(f);
      map.set(r, RegionState.Filling);
      this.inflight.set(r, fill);
    }
    const buf = this.fetchBuffers.take(total);
    let landed = 0;
    let integrityError: DpuError | null = null;
    /** Where region i's bytes lie in `buf`. */
    const span = (i: number): { from: number; end: number } => ({ from: i === 0 ? 0 : fills[i - 1]!.end, end: fills[i]!.end });
    /** What an integrity error says of region i's bytes. */
    const where = (i: number): string => `bytes ${start + span(i).from}-${start + span(i).end - 1} from ${source.description}`;
    /** Region i's bytes failed verification: never served, never written. */
    const corrupt = (i: number): void => {
      const r = first + i;
      // The region stays remote and is fetched again, a bounded number of times in all.
      const err = this.integrityFailed(r, where(i));
      integrityError ??= err;
      this.settle(r, RegionState.Remote);
      fills[i]!.data.reject(err);
      fills[i]!.done.reject(err);
    };
    /** Region i's bytes are verified (or there is no manifest yet): served, then stored. Returns the write, if asynchronous. */
    const accept = (i: number, data: Buffer, checked: boolean): Promise<void> | undefined => {
      const r = first + i;
      const { from } = span(i);
      fills[i]!.data.resolve(data);
      const stored = (): void => {
        this.unchecked.delete(r);
        // A manifest that arrived while the write was in flight checks the region now
        // (its read-back pass may already have passed it by, as `filling`).
        if (!checked && this.manifest && !this.manifest.verify(r, data)) {
          const err = this.integrityFailed(r, where(i));
          this.settle(r, RegionState.Remote);
          fills[i]!.done.reject(err);
          return;
        }
        this.integrityCounts.delete(r);
        if (!this.manifest) this.markProvenance(r, Provenance.FetchedUnverified);
        this.settle(r, RegionState.Local);
        if (this.manifest) this.pristine[r] = 1; // verified: `checked`, or just above
        fills[i]!.done.resolve();
      };
      const failed = (err: unknown): void => {
        this.unchecked.delete(r);
        const failure = this.fail(err, `writing region ${r}`);
        this.settle(r, RegionState.Remote);
        fills[i]!.done.reject(failure);
      };
      if (this.target.write) {
        if (!checked) this.unchecked.set(r, fills[i]!.fill);
        // Off the event loop (see local/target.ts); `buf` is kept until every write ends.
        // A missed region's write goes ahead of hydration's: a host write to it waits.
        return this.target.write(data, start + from, priority === 'foreground').then(() => (this.failure ? failed(this.failure) : stored()), failed);
      }
      try {
        this.target.writeSync([data], start + from);
      } catch (err) {
        failed(err);
        return undefined;
      }
      stored();
      return undefined;
    };
    const land = (filled: number): void => {
      while (landed < count && filled >= fills[landed]!.end) {
        const i = landed++;
        arrived.n = landed;
        const r = first + i;
        const { from, end } = span(i);
        const data = buf.subarray(from, end);
        const m = this.manifest;
        const workers = this.hashWorkers;
        if (m && workers && m.version === 2) {
          // Hashed by a worker; the region is served and written once its bytes check out.
          // The chain holds `buf` (in `writes`) until its write has ended too.
          writes.push(
            m.verifyAsync(r, data, workers).then(
              (ok) => (ok ? accept(i, data, true) : corrupt(i)),
              (err: Error) => {
                // A worker that died (or pool closed under us): verify here instead.
                this.log?.warn({ region: r, err: err.message }, 'hash worker failed; verifying on the event loop');
                return m.verify(r, data) ? accept(i, data, true) : corrupt(i);
              },
            ),
          );
          continue;
        }
        if (m && !m.verify(r, data)) {
          corrupt(i);
          continue;
        }
        const write = accept(i, data, m !== null);
        if (write) writes.push(write);
      }
    };
    const writes: Promise<void>[] = [];
    if (priority === 'foreground') this.fgFetches++;
    const read = blocks ? this.readAroundBlocks(source, start, blocks, buf, priority) : source.read(start, buf, { priority, onProgress: land });
    return read
      .then(() => {
        land(total);
      })
      .catch((err: unknown) => {
        for (let i = landed; i < count; i++) {
          this.settle(first + i, RegionState.Remote);
          fills[i]!.data.reject(err);
          fills[i]!.done.reject(err);
        }
        landed = count;
        arrived.n = count;
        throw err;
      })
      .finally(() => Promise.allSettled(writes)) // the regions' bytes are in `buf` until then
      .then(() => {
        // The batch delivered bytes that failed verification: it did not succeed.
        if (integrityError) throw integrityError;
      })
      .finally(() => {
        if (priority === 'foreground' && --this.fgFetches === 0) this.emit('foreground-idle');
        this.fetchBuffers.give(buf);
      });
  }

  /**
   * Fills `buf` with the region at `start`: the blocks misses brought are copied, only the
   * runs between them are requested. Blocks still on their way are awaited first: fetching
   * them again would spend the link twice. Every request settles before this does (`buf`
   * goes back to a pool afterwards). The caller verifies the whole region.
   */
  private async readAroundBlocks(source: RemoteSource, start: number, rb: RegionBlocks, buf: Buffer, priority: FetchPriority): Promise<void> {
    await Promise.allSettled(rb.pending.values());
    const size = rb.blockSize;
    const n = Math.ceil(buf.length / size);
    const gaps: Promise<void>[] = [];
    let i = 0;
    while (i < n) {
      const have = rb.have.get(i);
      if (have) {
        have.copy(buf, i * size);
        i++;
        continue;
      }
      let k = 1;
      while (i + k < n && !rb.have.has(i + k)) k++;
      const from = i * size;
      gaps.push(source.read(start + from, buf.subarray(from, Math.min(buf.length, (i + k) * size)), { priority }));
      i += k;
    }
    await settleAll(gaps);
  }

  /** Counts a verification failure of region r; at the limit the region is marked failed. */
  private integrityFailed(r: number, detail: string): DpuError {
    this.integrityFailures++;
    // A source with several places to read from (peers first) stops using the one that
    // sent these bytes; when that was a peer, the origin is not to blame: the failure does
    // not count toward the region's limit, and the next fetch goes elsewhere.
    if (this.source?.reportCorrupt?.(this.map.regionStart(r), this.map.regionLength(r)) === true) {
      const err = new DpuError('DPU_ERR_INTEGRITY', `region ${r} (${detail}; sent by a peer, which is not asked again)`);
      this.log?.warn({ region: r, code: err.code }, err.message);
      return err;
    }
    const n = (this.integrityCounts.get(r) ?? 0) + 1;
    this.integrityCounts.set(r, n);
    if (n >= REGION_INTEGRITY_LIMIT && !this.badRegions.has(r)) {
      this.badRegions.add(r);
      const err = new DpuError('DPU_ERR_INTEGRITY', `region ${r} failed verification ${n} times (${detail}); not fetched again until the source URL is replaced`);
      this.log?.error({ region: r, code: err.code }, err.message);
      return err;
    }
    const err = new DpuError('DPU_ERR_INTEGRITY', `region ${r} (${detail})`);
    this.log?.warn({ region: r, code: err.code, attempt: n }, err.message);
    return err;
  }

  /** A region that failed verification too often is not fetched again: fail at once. */
  private assertFetchable(r: number): void {
    this.assertUsable();
    if (this.badRegions.has(r)) {
      throw new DpuError('DPU_ERR_INTEGRITY', `region ${r} failed verification ${REGION_INTEGRITY_LIMIT} times; not fetched again until the source URL is replaced`);
    }
  }

  private settle(r: number, s: RegionState): void {
    if (s === RegionState.Local) this.badRegions.delete(r); // the host wrote it whole
    this.pristine[r] = 0; // set again by the caller when the bytes are verified image bytes
    this.map.set(r, s);
    this.inflight.delete(r);
    this.emit('region-settled', r);
  }

  /** Brings one region to `local` whatever its state. */
  private async makeLocal(r: number): Promise<void> {
    let integrityFailures = 0;
    for (;;) {
      switch (this.map.state(r)) {
        case RegionState.Local:
          return;
        case RegionState.Zero:
          this.zeroFill(r);
          return;
        case RegionState.Remote:
          this.assertFetchable(r);
          try {
            await this.fetchRun(r, 1, 'foreground');
          } catch (err) {
            if (err instanceof DpuError && err.code === 'DPU_ERR_INTEGRITY' && ++integrityFailures < INTEGRITY_ATTEMPTS && !this.badRegions.has(r)) break;
            throw err;
          }
          break;
        default:
          try {
            await this.inflight.get(r)!.done;
          } catch (err) {
            // A background batch left for later (peer-source.ts): the region is remote again.
            if (!leftForLater(err)) throw err;
          }
      }
    }
  }

  /** zero → local: the zeros are written, so the local bytes become the region's truth. */
  zeroFill(r: number): void {
    try {
      this.target.writeZeroesSync(this.map.regionStart(r), this.map.regionLength(r));
    } catch (err) {
      throw this.fail(err, `zeroing region ${r}`);
    }
    this.settle(r, RegionState.Local);
  }

  /**
   * zero → local for a run of adjacent `zero` regions. Long runs go to the target's
   * `zeroRange` (a hole punched in a file, a Write Zeroes command on a device), which
   * writes no data: a 100 GiB image that is mostly zeros would otherwise cost 100 GB of
   * zero writes to the SSD. The regions are `filling` meanwhile, so host I/O to them waits,
   * exactly as for a fetch; if the target cannot offload, the zeros are written.
   */
  async zeroFillRun(first: number, count: number): Promise<void> {
    const map = this.map;
    const bytes = count * map.regionSize;
    if (!this.target.zeroRange || bytes < ZERO_OFFLOAD_MIN_BYTES) {
      for (let r = first; r < first + count; r++) if (map.state(r) === RegionState.Zero) this.zeroFill(r);
      return;
    }
    let n = 0;
    while (n < count && map.state(first + n) === RegionState.Zero) n++;
    if (n === 0) return;
    const done = deferred<void>();
    done.promise.catch(noop); // waiters re-check the state; nobody needs the rejection
    for (let r = first; r < first + n; r++) {
      map.set(r, RegionState.Filling);
      this.inflight.set(r, { done: done.promise, data: null });
    }
    const start = map.regionStart(first);
    const end = map.regionStart(first + n - 1) + map.regionLength(first + n - 1);
    try {
      await this.target.zeroRange(start, end - start);
    } catch (err) {
      this.log?.warn({ err: (err as Error).message, first, count: n }, 'the target cannot zero a range without writing; writing zeros');
      try {
        this.target.writeZeroesSync(start, end - start);
      } catch (werr) {
        const failure = this.fail(werr, `zeroing regions ${first}-${first + n - 1}`);
        for (let r = first; r < first + n; r++) this.settle(r, RegionState.Zero);
        done.reject(failure);
        throw failure;
      }
    }
    for (let r = first; r < first + n; r++) this.settle(r, RegionState.Local);
    done.resolve();
  }

  // ---- writes ------------------------------------------------------------------------

  write(offset: number, chunks: readonly Buffer[], length: number, fua: boolean): MaybePromise<void> {
    this.assertWritable();
    const map = this.map;
    const first = map.regionOf(offset);
    const last = map.regionOf(offset + length - 1);
    this.pristine.fill(0, first, last + 1); // the host's bytes from now on
    let r = first;
    while (r <= last && map.states[r] === RegionState.Local) r++;
    if (r > last) {
      try {
        this.target.writeSync(chunks, offset);
      } catch (err) {
        throw this.fail(err, `writing ${length} bytes at ${offset}`);
      }
      if (this.pendingVerification > 0) this.hostWrote(first, last);
      return fua ? this.commit() : undefined;
    }
    return this.writeSlow(offset, chunks, length, fua, first, last);
  }

  private async writeSlow(offset: number, chunks: readonly Buffer[], length: number, fua: boolean, first: number, last: number): Promise<void> {
    const claimed = await this.prepareRange(offset, length, first, last);
    try {
      this.assertUsable(); // the disk may have failed or closed while we waited
    } catch (err) {
      this.release(claimed, false);
      throw err;
    }
    // Again, right before the bytes land: a fetch made for this write (read-modify-write)
    // marked its region pristine meanwhile.
    this.pristine.fill(0, first, last + 1);
    try {
      this.target.writeSync(chunks, offset);
    } catch (err) {
      this.release(claimed, false);
      throw this.fail(err, `writing ${length} bytes at ${offset}`);
    }
    if (this.pendingVerification > 0) this.hostWrote(first, last);
    this.release(claimed, true);
    if (fua) await this.commit();
  }

  /**
   * Makes every region of [offset, offset+length) ready to take a write: regions covered
   * whole are claimed (`filling`, no fetch); partially covered ones are made local first.
   */
  private async prepareRange(offset: number, length: number, first: number, last: number): Promise<{ r: number; was: RegionState; done: Deferred<void> }[]> {
    const map = this.map;
    const end = offset + length;
    const claimed: { r: number; was: RegionState; done: Deferred<void> }[] = [];
    try {
      for (let r = first; r <= last; r++) {
        const whole = offset <= map.regionStart(r) && end >= map.regionStart(r) + map.regionLength(r);
        for (;;) {
          const s = map.state(r);
          if (s === RegionState.Local) break;
          if (s === RegionState.Filling) {
            await this.inflight.get(r)!.done.catch(noop); // then look again: it may have failed
            continue;
          }
          this.assertUsable();
          if (whole) {
            const done = deferred<void>();
            claimed.push({ r, was: s, done });
            this.dropBlocks(r); // the host's bytes replace the image's
            map.set(r, RegionState.Filling);
            this.inflight.set(r, { done: done.promise, data: null });
            break;
          }
          await this.makeLocal(r);
        }
      }
    } catch (err) {
      this.release(claimed, false);
      throw err;
    }
    return claimed;
  }

  private release(claimed: { r: number; was: RegionState; done: Deferred<void> }[], landed: boolean): void {
    for (const c of claimed) {
      // On failure the region returns to what it was: its local bytes are again meaningless.
      this.settle(c.r, landed ? RegionState.Local : c.was);
      c.done.resolve();
    }
  }

  writeZeroes(offset: number, length: number, fua: boolean, opts: WriteZeroesOptions = {}): MaybePromise<void> {
    this.assertWritable();
    const noHole = opts.noHole === true;
    if (opts.fastZero && !this.zeroesWithoutData(offset, length, noHole)) {
      // Decided before anything changes, and synchronously: a FAST_ZERO refusal must be
      // quick and leave the disk as it was (proto.md).
      throw new DpuError('DPU_ERR_ZERO_NOT_FAST', `bytes ${offset}+${length} need data written or fetched`);
    }
    return this.zeroRange(offset, length, fua, true, noHole);
  }

  /**
   * Whether zeroing [offset, offset+length) touches only the region map: every region in
   * it is `zero` already, or `remote` and covered whole (it becomes `zero`). Anything else
   * needs a fetch (part of a remote region), zeros written (a local region, or NO_HOLE), or
   * a wait for a fill in progress.
   */
  private zeroesWithoutData(offset: number, length: number, noHole: boolean): boolean {
    if (noHole) return false;
    const map = this.map;
    const end = offset + length;
    for (let r = map.regionOf(offset); r <= map.regionOf(end - 1); r++) {
      const s = map.state(r);
      if (s === RegionState.Zero) continue;
      if (s !== RegionState.Remote || offset > map.regionStart(r) || end < map.regionStart(r) + map.regionLength(r)) return false;
    }
    return true;
  }

  trim(offset: number, length: number, fua: boolean): MaybePromise<void> {
    this.assertWritable();
    return this.zeroRange(offset, length, fua, false);
  }

  /**
   * Whole remote regions become `zero` without a fetch (for TRIM as for WRITE_ZEROES: a
   * trimmed range may read back as anything the disk held, and zeros are that). With
   * `mustZero` (WRITE_ZEROES) the rest of the range gets zeros written locally; TRIM is
   * advisory and leaves it alone. With `noHole` (WRITE_ZEROES with NO_HOLE) no region is
   * left `zero`: the client wants the range allocated, so the zeros are written and the
   * region becomes local (a `zero` region's target bytes may be a hole, or anything).
   */
  private async zeroRange(offset: number, length: number, fua: boolean, mustZero: boolean, noHole = false): Promise<void> {
    const map = this.map;
    const end = offset + length;
    const first = map.regionOf(offset);
    const last = map.regionOf(end - 1);
    this.pristine.fill(0, first, last + 1); // cleared again before each region is zeroed
    if (mustZero) {
      // The regions zeroed in part are made local before anything is zeroed: a fetch that
      // fails then fails the request with the disk unchanged, as the host expects of an
      // error (only the ends of the range can be partial).
      for (const r of first === last ? [first] : [first, last]) {
        const rs = map.regionStart(r);
        const partial = offset > rs || end < rs + map.regionLength(r);
        const s = map.state(r);
        if (partial && (s === RegionState.Remote || s === RegionState.Filling)) await this.makeLocal(r);
      }
    }
    for (let r = first; r <= last; r++) {
      const rs = map.regionStart(r);
      const re = rs + map.regionLength(r);
      const whole = offset <= rs && end >= re;
      for (;;) {
        const s = map.state(r);
        if (s === RegionState.Filling) {
          await this.inflight.get(r)!.done.catch(noop);
          continue;
        }
        if (s === RegionState.Zero && !noHole) break;
        if ((s === RegionState.Remote && whole) || s === RegionState.Zero) {
          // Nothing of the region's old bytes survives, so none is fetched.
          this.pristine[r] = 0;
          if (noHole) {
            this.zeroFill(r); // zeros written over the whole region, which becomes local
          } else {
            this.dropBlocks(r);
            map.set(r, RegionState.Zero);
            this.emit('region-settled', r);
          }
          break;
        }
        if (!mustZero) break;
        await this.makeLocal(r);
        const from = Math.max(offset, rs);
        this.assertUsable();
        this.pristine[r] = 0; // made local (perhaps fetched, pristine) just above
        try {
          this.target.writeZeroesSync(from, Math.min(end, re) - from);
        } catch (err) {
          throw this.fail(err, `zeroing ${Math.min(end, re) - from} bytes at ${from}`);
        }
        if (this.pendingVerification > 0) this.hostWrote(r, r);
        break;
      }
      // A 100 GiB WRITE_ZEROES must not hold the event loop: let other requests run.
      if ((r - first) % 64 === 63) await new Promise<void>((resolve) => setImmediate(resolve));
    }
    if (fua) await this.commit();
  }

  cache(offset: number, length: number): MaybePromise<void> {
    this.assertUsable();
    const first = this.map.regionOf(offset);
    const last = this.map.regionOf(offset + length - 1);
    const waits: Promise<void>[] = [];
    for (let r = first; r <= last; r++) {
      if (this.map.state(r) !== RegionState.Local) waits.push(this.makeLocal(r));
    }
    return waits.length ? Promise.all(waits).then(noop) : undefined;
  }

  // ---- durability --------------------------------------------------------------------

  flush(): Promise<void> {
    return this.commit();
  }

  /**
   * The local target failed (an I/O error writing it, or a failed fdatasync): the disk
   * stops. Returns the error every request gets from now on.
   */
  private fail(err: unknown, what: string): DpuError {
    if (this.failure) return this.failure;
    const cause = err as NodeJS.ErrnoException;
    const detail = cause instanceof Error ? cause.message : String(err);
    this.failure = new DpuError('DPU_ERR_TARGET_FAILED', `${what} on ${this.target.path} failed (${detail}); the disk is stopped, every request fails until the agent reopens it`, { cause: err });
    clearInterval(this.commitTimer);
    this.log?.error({ code: this.failure.code, err: cause?.message }, this.failure.message);
    this.emit('failed', this.failure);
    return this.failure;
  }

  private assertUsable(): void {
    if (this.closed) throw new DpuError('DPU_ERR_SHUTTING_DOWN');
    if (this.failure) throw this.failure;
  }

  /** Data, then metadata (see the durability order in region/region-map.ts). */
  commit(): Promise<void> {
    if (!this.commitRunning) {
      this.commitRunning = this.runCommit().finally(() => {
        this.commitRunning = null;
      });
      return this.commitRunning;
    }
    // The running commit may have taken its snapshot before our caller's writes: queue
    // exactly one more behind it, shared by everyone who arrives meanwhile.
    if (!this.commitQueued) {
      this.commitQueued = this.commitRunning.catch(noop).then(() => {
        this.commitQueued = null;
        return this.commit();
      });
    }
    return this.commitQueued;
  }

  private async runCommit(): Promise<void> {
    if (this.failure) throw this.failure;
    const snap = this.map.dirty ? this.map.snapshot() : null; // (1)
    try {
      await this.target.datasync(); // (2)
    } catch (err) {
      // Never commit again: the next fdatasync would return 0 over the lost pages.
      throw this.fail(err, 'fdatasync');
    }
    if (this.failure) throw this.failure; // a write failed while we synced
    if (snap) await this.map.persist(snap); // (3)
  }

  /**
   * Cutover: every region is local. The complete flag is committed, then the remote
   * source is closed; from here on the disk never touches the network, across restarts.
   */
  async cutover(): Promise<void> {
    if (!this.map.allLocal) throw new Error('cutover with regions not yet local');
    this.map.markComplete();
    await this.commit();
    const source = this.source;
    if (source) {
      const s = source.stats();
      this.lastSourceStats = { bytesFetched: s.bytesFetched, retries: s.retries, failures: s.failures };
      this.source = null;
      await source.close();
    }
    this.fetchBuffers.clear(); // nothing is fetched any more: give the memory back
    this.log?.info({ regions: this.map.count }, 'every region is local: remote source closed');
    this.emit('complete');
  }

  private assertWritable(): void {
    this.assertUsable();
    if (this.capabilities.readOnly) throw new DpuError('DPU_ERR_READ_ONLY');
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    clearInterval(this.commitTimer);
    // Closing the source aborts in-flight fetches; their regions go back to `remote`.
    await this.source?.close();
    const pending = [...this.inflight.values()].map((f) => f.done.catch(noop));
    await Promise.all([...pending, ...[...this.blockFetches].map((f) => f.catch(noop)), ...[...this.peerReads].map((f) => f.catch(noop))]);
    this.blocks.clear();
    this.blockBytes = 0;
    await this.verifying?.catch(noop);
    if (!this.failure) await this.commit(); // a failed disk keeps the last map written before it failed
    this.map.close();
    this.target.close();
  }
}
