/**
 * Crash torture of the streaming disk (issue #8): random host writes, zeroing, flushes and
 * reads while hydration runs, then a power cut at a random moment on a target that models
 * a volatile write cache; then the disk is reopened from its state directory and checked:
 *
 *   - every sector written before the last completed FLUSH holds what was flushed, or a
 *     later write to it (never older data, never another sector's data);
 *   - every sector never written reads exactly the image (never the target's previous
 *     tenant, never a half-fetched region);
 *   - after hydration finishes, the target holds exactly what the disk serves (the
 *     region map agrees with the data).
 *
 * Run many trials outside CI:  node dist/tests/torture/crash-torture.js --trials 500
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { Manifest } from '../../image-access/src/manifest.js';
import { RegionMap } from '../../dpu-agent/src/region/region-map.js';
import type { RemoteReadOptions, RemoteSource, RemoteSourceStats } from '../../image-access/src/source.js';
import { StreamingDisk } from '../../dpu-agent/src/streaming/disk.js';
import { Hydrator } from '../../dpu-agent/src/streaming/hydrator.js';
import { SECTOR, VolatileCacheTarget } from '../helpers/volatile-target.js';

const REGION = 64 << 10;
const TENANT = 0x5a;

/** Deterministic PRNG (mulberry32), so a failing seed replays exactly. */
export function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** The image, served from memory with an asynchronous hop per delivery. */
class MemorySource implements RemoteSource {
  readonly identity = 'torture';
  readonly description = 'memory';
  private bytes = 0;
  constructor(private readonly image: Buffer) {}
  get size(): number {
    return this.image.length;
  }
  async read(offset: number, dest: Buffer, opts: RemoteReadOptions): Promise<void> {
    for (let o = 0; o < dest.length; o += REGION) {
      await new Promise((r) => setImmediate(r));
      const n = Math.min(REGION, dest.length - o);
      this.image.copy(dest, o, offset + o, offset + o + n);
      this.bytes += n;
      opts.onProgress?.(o + n);
    }
  }
  stats(): RemoteSourceStats {
    return { bytesFetched: this.bytes, requests: 0, retries: 0, failures: 0, foregroundInflight: 0, backgroundInflight: 0 };
  }
  async close(): Promise<void> {}
}

export interface TrialResult {
  seed: number;
  ops: number;
  flushes: number;
  writes: number;
  lostAtCut: boolean;
}

const sectorHash = (b: Buffer, s: number): string => createHash('sha1').update(b.subarray(s * SECTOR, (s + 1) * SECTOR)).digest('hex');

export async function trial(seed: number, opts: { lieAboutSync?: boolean } = {}): Promise<TrialResult> {
  const rnd = prng(seed);
  const int = (n: number): number => Math.floor(rnd() * n);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), `torture-${seed}-`));
  try {
    const regions = 12 + int(12);
    const size = regions * REGION - (rnd() < 0.5 ? SECTOR * (1 + int(8)) : 0);
    const image = Buffer.alloc(size);
    for (let i = 0; i < size; i += 4) image.writeUInt32LE((Math.imul(i + 1, 2654435761) ^ seed) >>> 0, i);
    image.fill(0, REGION * 2, REGION * 3); // some zeros, as real images have
    const file = path.join(dir, 'target');
    fs.writeFileSync(file, Buffer.alloc(size, TENANT));
    const state = path.join(dir, 'state');
    const source = new MemorySource(image);
    const geo = { diskSize: size, regionSize: REGION, identity: 'torture' };

    const target = new VolatileCacheTarget(file, { ...opts, asyncWrites: rnd() < 0.5 }); // fetched regions written off the event loop, or not
    // Misses fetch whole regions, or 4 or 16 KiB blocks of them (see StreamingDisk's rules).
    const missBlockSize = [0, 4096, 16384][int(3)]!;
    const disk = new StreamingDisk({ source, target, map: RegionMap.open(state, geo), commitIntervalMs: 5 + int(40), missBlockSize });
    disk.on('commit-error', () => undefined); // expected after the cut
    const hydrator = new Hydrator(disk, { batchBytes: REGION * (1 + int(4)), concurrency: 1 + int(2) });
    if (rnd() < 0.8) hydrator.start();

    const sectors = Math.ceil(size / SECTOR);
    const model = Buffer.from(image); // what the disk must read now
    let flushed = Buffer.from(image); // what it must read at least after a crash
    // Per sector: the versions it may hold after a crash (the flushed one, or any later write).
    let allowed: Set<string>[] = Array.from({ length: sectors }, (_, s) => new Set([sectorHash(image, s)]));
    const nops = 10 + int(40);
    let writes = 0;
    let flushes = 0;
    for (let i = 0; i < nops; i++) {
      const kind = rnd();
      if (kind < 0.55) {
        // Sector-aligned writes: partial regions, whole regions, straddling regions.
        const len = (1 + int(rnd() < 0.3 ? (REGION / SECTOR) * 2 : 16)) * SECTOR;
        const off = Math.min(int(sectors) * SECTOR, Math.max(0, size - len));
        const data = Buffer.alloc(Math.min(len, size - off), 1 + int(250));
        const zero = rnd() < 0.15;
        if (zero) await disk.writeZeroes(off, data.length, rnd() < 0.2);
        else await disk.write(off, [data], data.length, rnd() < 0.2);
        if (zero) model.fill(0, off, off + data.length);
        else data.copy(model, off);
        for (let s = off / SECTOR; s < Math.ceil((off + data.length) / SECTOR); s++) allowed[s]!.add(sectorHash(model, s));
        writes++;
      } else if (kind < 0.7) {
        const snapshot = Buffer.from(model);
        await disk.flush();
        flushed = snapshot;
        allowed = Array.from({ length: sectors }, (_, s) => new Set([sectorHash(flushed, s), sectorHash(model, s)]));
        flushes++;
      } else if (kind < 0.9) {
        const off = int(size - 1);
        const len = Math.min(size - off, 1 + int(REGION * 2));
        const got = Buffer.alloc(len);
        await disk.read(off, got);
        assert.ok(got.equals(model.subarray(off, off + len)), `seed ${seed}: read at ${off}+${len} before the crash differs from what was written`);
      } else {
        await new Promise((r) => setTimeout(r, int(15)));
      }
    }

    // Power cut.
    const lostAtCut = rnd() < 0.5;
    target.powerCut(rnd);
    await hydrator.stop().catch(() => undefined);
    await disk.close().catch(() => undefined);
    disk.map.close();

    await rebootAndCheck({ label: `seed ${seed}`, file, state, geo, image, allowed, flushed });
    return { seed, ops: nops, flushes, writes, lostAtCut };
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

/**
 * The image with faults: some reads fail for good (an expired temp URL: 403), and once
 * `corrupting` is set some deliveries carry a flipped byte (a corrupting proxy). Every
 * delivery takes a few turns of the event loop, so host I/O, commits and the manifest's
 * arrival interleave with fetches in flight.
 */
class FaultySource implements RemoteSource {
  readonly identity = 'torture';
  readonly description = 'faulty memory origin';
  corrupting = false;
  failures = 0;
  corruptions = 0;
  private bytes = 0;
  constructor(
    private readonly image: Buffer,
    private readonly rnd: () => number,
    private readonly failRate: number,
  ) {}
  get size(): number {
    return this.image.length;
  }
  async read(offset: number, dest: Buffer, opts: RemoteReadOptions): Promise<void> {
    const fail = this.rnd() < this.failRate;
    const corrupt = this.corrupting && this.rnd() < 0.15;
    for (let o = 0; o < dest.length; o += REGION) {
      await new Promise((r) => setImmediate(r));
      if (fail && (o > 0 || this.rnd() < 0.5)) {
        this.failures++;
        throw Object.assign(new Error('HTTP 403 from the origin (injected)'), { code: 'DPU_ERR_SOURCE_HTTP_STATUS' });
      }
      const n = Math.min(REGION, dest.length - o);
      this.image.copy(dest, o, offset + o, offset + o + n);
      if (corrupt && o === 0) {
        dest[0] = dest[0]! ^ 0xff;
        this.corruptions++;
      }
      this.bytes += n;
      opts.onProgress?.(o + n);
    }
  }
  stats(): RemoteSourceStats {
    return { bytesFetched: this.bytes, requests: 0, retries: 0, failures: 0, foregroundInflight: 0, backgroundInflight: 0 };
  }
  async close(): Promise<void> {}
}

export interface ConcurrentTrialResult extends TrialResult {
  waves: number;
  reads: number;
  failedRequests: number;
  manifestMidway: boolean;
}

/**
 * The crash torture with concurrency (issue #12): each wave issues several requests at
 * once on disjoint sector ranges — writes (partial, whole-region, straddling regions),
 * WRITE_ZEROES, TRIM, reads spanning filling and remote regions, FLUSH — while hydration
 * runs, the 5–40 ms commit timer fires, the origin fails some fetches for good, and the
 * image manifest arrives midway (after which the origin also corrupts some answers). Then
 * a power cut, a reboot and the same checks as `trial`, plus:
 *
 *   - every read that succeeded returned exactly the model's bytes (never a corrupted
 *     region, never another request's bytes);
 *   - no request touches its buffer after it ended: each read's buffer is poisoned when
 *     the read settles (as the NBD server's pool would hand it to another request) and
 *     must still be poisoned at the end of the wave;
 *   - a request that failed changed nothing (the model is not updated for it, and later
 *     reads compare against the model).
 */
export async function concurrentTrial(seed: number, opts: { lieAboutSync?: boolean } = {}): Promise<ConcurrentTrialResult> {
  const rnd = prng(seed);
  const int = (n: number): number => Math.floor(rnd() * n);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), `ctorture-${seed}-`));
  try {
    const regions = 12 + int(12);
    const size = regions * REGION - (rnd() < 0.5 ? SECTOR * (1 + int(8)) : 0);
    const image = Buffer.alloc(size);
    for (let i = 0; i < size; i += 4) image.writeUInt32LE((Math.imul(i + 1, 2654435761) ^ seed) >>> 0, i);
    image.fill(0, REGION * 2, REGION * 4);
    const file = path.join(dir, 'target');
    fs.writeFileSync(file, Buffer.alloc(size, TENANT));
    const state = path.join(dir, 'state');
    const source = new FaultySource(image, rnd, rnd() < 0.5 ? 0.1 : 0);
    const geo = { diskSize: size, regionSize: REGION, identity: 'torture' };
    // A v1 manifest (whole regions verified) or a v2 one whose leaves let misses fetch and
    // verify 4 or 16 KiB blocks; before it arrives, misses fetch unverified blocks or regions.
    const manifest = await Manifest.build(new MemorySource(image), { regionSize: REGION, leafSize: [null, 4096, 16384][int(3)]! });
    const missBlockSize = [0, 4096, 16384][int(3)]!;

    const target = new VolatileCacheTarget(file, { ...opts, asyncWrites: rnd() < 0.5 }); // fetched regions written off the event loop, or not
    const disk = new StreamingDisk({ source, target, map: RegionMap.open(state, geo), commitIntervalMs: 5 + int(40), missBlockSize });
    disk.on('commit-error', () => undefined); // expected after the cut
    const hydrator = new Hydrator(disk, { batchBytes: REGION * (1 + int(4)), concurrency: 1 + int(2) });
    hydrator.on('batch-error', () => undefined);
    if (rnd() < 0.8) hydrator.start();

    const sectors = Math.ceil(size / SECTOR);
    const model = Buffer.from(image); // what the disk must read now (requests that succeeded)
    let flushed = Buffer.from(image);
    let allowed: Set<string>[] = Array.from({ length: sectors }, (_, s) => new Set([sectorHash(image, s)]));
    const waves = 4 + int(10);
    const manifestAt = rnd() < 0.7 ? int(waves) : -1;
    let ops = 0;
    let writes = 0;
    let flushes = 0;
    let reads = 0;
    let failedRequests = 0;
    for (let w = 0; w < waves; w++) {
      if (w === manifestAt) {
        disk.setManifest(manifest).catch(() => undefined); // a power cut may end its read-back: verified stays false
        source.corrupting = true;
      }
      // Disjoint sector ranges for this wave's requests.
      const taken: [number, number][] = [];
      const free = (off: number, len: number): boolean => taken.every(([a, b]) => off + len <= a || off >= b);
      const pick = (maxSectors: number): [number, number] | null => {
        for (let tries = 0; tries < 8; tries++) {
          const len = Math.min(size, (1 + int(maxSectors)) * SECTOR);
          const off = Math.min(int(sectors) * SECTOR, size - len);
          if (off >= 0 && free(off, len)) {
            taken.push([off, off + len]);
            return [off, Math.min(len, size - off)];
          }
        }
        return null;
      };
      /** A whole region, plus `extraSectors` of the next one (a write straddling the boundary). */
      const pickAligned = (extraSectors: number): [number, number] | null => {
        const r = int(Math.floor(size / REGION));
        const off = r * REGION;
        const len = Math.min(size - off, REGION + extraSectors * SECTOR);
        if (!free(off, len)) return null;
        taken.push([off, off + len]);
        return [off, len];
      };
      const requests: Promise<void>[] = [];
      const poisoned: Buffer[] = [];
      const pendingWrites: { off: number; data: Buffer }[] = [];
      const trims: { off: number; len: number }[] = [];
      let flushThisWave: Promise<void> | null = null;
      const nreq = 2 + int(6);
      for (let i = 0; i < nreq; i++) {
        const kind = rnd();
        ops++;
        if (kind < 0.45) {
          const zero = rnd() < 0.3;
          // Whole, region-aligned zeroing (the region turns `zero` without a fetch) or any range.
          const aligned = zero && rnd() < 0.5 ? pickAligned(0) : !zero && rnd() < 0.3 ? pickAligned(1 + int(REGION / SECTOR - 1)) : null;
          const range = aligned ?? pick(rnd() < 0.3 ? (REGION / SECTOR) * 2 : 16);
          if (!range) continue;
          const [off, len] = range;
          const trim = zero && rnd() < 0.3;
          const data = zero ? Buffer.alloc(len) : Buffer.alloc(len, 1 + int(250));
          const fua = rnd() < 0.2;
          pendingWrites.push({ off, data });
          // The new bytes may be on the medium from the moment the request is sent.
          for (let s = off / SECTOR; s < Math.ceil((off + len) / SECTOR); s++) {
            const v = Buffer.from(model.subarray(s * SECTOR, (s + 1) * SECTOR));
            data.copy(v, 0, Math.max(0, s * SECTOR - off), Math.min(len, (s + 1) * SECTOR - off));
            allowed[s]!.add(createHash('sha1').update(v).digest('hex'));
          }
          writes++;
          const p = Promise.resolve()
            .then(() => (trim ? disk.trim(off, len, fua) : zero ? disk.writeZeroes(off, len, fua) : disk.write(off, [data], len, fua)))
            .then(
              () => {
                // TRIM may leave the old bytes or zeros: read back after the wave.
                if (trim) trims.push({ off, len });
                else data.copy(model, off);
              },
              () => {
                failedRequests++; // an EIO to the host: the write changed nothing
              },
            );
          requests.push(p);
        } else if (kind < 0.8) {
          const range = pick((REGION / SECTOR) * 3); // spans remote, filling and local regions
          if (!range) continue;
          const [off, len] = range;
          const buf = Buffer.alloc(len);
          reads++;
          const p = Promise.resolve()
            .then(() => disk.read(off, buf))
            .then(
              () => {
                assert.ok(buf.equals(model.subarray(off, off + len)), `seed ${seed}: read at ${off}+${len} differs from what the disk holds`);
              },
              () => {
                failedRequests++;
              },
            )
            .finally(() => {
              buf.fill(0xdb); // back to the pool: another request owns it now
              poisoned.push(buf);
            });
          requests.push(p);
        } else if (!flushThisWave) {
          // What a FLUSH covers: every write that completed before it was sent.
          const snapshot = Buffer.from(model);
          flushThisWave = Promise.resolve()
            .then(() => disk.flush())
            .then(
              () => {
                flushed = snapshot;
                flushes++;
              },
              () => {
                failedRequests++;
              },
            );
          requests.push(flushThisWave);
        }
      }
      if (w === waves - 1) {
        // The power cut lands while this wave's requests, fetches and commits are in flight.
        for (let t = int(30); t > 0; t--) await new Promise((r) => setImmediate(r));
        target.powerCut(rnd);
        await Promise.allSettled(requests);
        break;
      }
      await Promise.all(requests);
      await new Promise((r) => setImmediate(r));
      for (const b of poisoned) assert.ok(b.every((x) => x === 0xdb), `seed ${seed}: a read's buffer was written after the read ended`);
      for (const t of trims) {
        // Each sector of a trimmed range reads as before or as zeros, nothing else.
        const back = Buffer.alloc(t.len);
        for (let attempt = 0; ; attempt++) {
          try {
            await disk.read(t.off, back);
            break;
          } catch (err) {
            if (attempt >= 50) throw err;
          }
        }
        for (let o = 0; o < t.len; o += SECTOR) {
          const n = Math.min(SECTOR, t.len - o);
          const got = back.subarray(o, o + n);
          assert.ok(got.equals(model.subarray(t.off + o, t.off + o + n)) || got.every((x) => x === 0), `seed ${seed}: a trimmed sector at ${t.off + o} reads as neither its old bytes nor zeros`);
        }
        back.copy(model, t.off);
      }
      // Sectors may hold the flushed version or anything written since (the new values
      // were added above): reset to what a later crash may show.
      if (flushThisWave) {
        allowed = allowed.map((set, s) => {
          const next = new Set([sectorHash(flushed, s), sectorHash(model, s)]);
          for (const pw of pendingWrites) if (s * SECTOR < pw.off + pw.data.length && (s + 1) * SECTOR > pw.off) for (const h of set) next.add(h);
          return next;
        });
      }
      if (rnd() < 0.2) await new Promise((r) => setTimeout(r, int(10)));
    }

    await hydrator.stop().catch(() => undefined);
    await disk.close().catch(() => undefined);
    disk.map.close();

    await rebootAndCheck({ label: `seed ${seed} (concurrent)`, file, state, geo, image, allowed, flushed });
    return { seed, ops, flushes, writes, lostAtCut: true, waves, reads, failedRequests, manifestMidway: manifestAt >= 0 };
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

/**
 * After the power cut: reopens the disk from what is on the medium and checks every sector
 * against the versions it may hold (`allowed`); then finishes hydration, and the target
 * must end up holding exactly what the disk serves (the region map agrees with the data).
 */
async function rebootAndCheck(c: {
  label: string;
  file: string;
  state: string;
  geo: { diskSize: number; regionSize: number; identity: string };
  image: Buffer;
  allowed: Set<string>[];
  flushed: Buffer;
}): Promise<void> {
  const size = c.image.length;
  const disk2 = new StreamingDisk({ source: new MemorySource(c.image), target: new VolatileCacheTarget(c.file), map: RegionMap.open(c.state, c.geo), commitIntervalMs: 50 });
  const got = Buffer.alloc(size);
  await disk2.read(0, got);
  for (let s = 0; s < c.allowed.length; s++) {
    if (c.allowed[s]!.has(sectorHash(got, s))) continue;
    const at = s * SECTOR;
    const tenant = got.subarray(at, at + SECTOR).every((b) => b === TENANT);
    assert.fail(
      `${c.label}: sector ${s} (byte ${at}, region ${Math.floor(at / REGION)}) after the crash holds ${tenant ? "the previous tenant's bytes" : 'bytes that were never flushed or written there'}` +
        ` (flushed version ${sectorHash(c.flushed, s).slice(0, 8)}, read ${sectorHash(got, s).slice(0, 8)})`,
    );
  }
  if (!disk2.complete) {
    // (A disk that had cut over before the power cut reopens complete: nothing to do.)
    const h2 = new Hydrator(disk2, { batchBytes: REGION * 4 });
    const done = new Promise<void>((r) => disk2.once('complete', () => r()));
    h2.start();
    await done;
  }
  const served = Buffer.alloc(size);
  await disk2.read(0, served);
  assert.ok(served.equals(got), `${c.label}: hydration changed what the disk serves`);
  await disk2.close();
  assert.ok(fs.readFileSync(c.file).subarray(0, size).equals(served), `${c.label}: the target disagrees with the region map after hydration`);
}

async function main(): Promise<void> {
  const { values } = parseArgs({ options: { trials: { type: 'string', default: '200' }, seed: { type: 'string', default: '1' }, concurrent: { type: 'boolean', default: false } } });
  const n = Number(values.trials);
  const first = Number(values.seed);
  let ops = 0;
  let flushes = 0;
  let reads = 0;
  let failed = 0;
  const t0 = Date.now();
  for (let i = 0; i < n; i++) {
    if (values.concurrent) {
      const r = await concurrentTrial(first + i);
      ops += r.ops;
      flushes += r.flushes;
      reads += r.reads;
      failed += r.failedRequests;
    } else {
      const r = await trial(first + i);
      ops += r.ops;
      flushes += r.flushes;
    }
  }
  const extra = values.concurrent ? `, ${reads} concurrent reads checked, ${failed} requests failed by injected origin faults (each changed nothing)` : '';
  const late = values.concurrent ? ', 0 late buffer writes' : ''; // only the concurrent trials poison read buffers
  process.stdout.write(`${n} ${values.concurrent ? 'concurrent ' : ''}crash trials (seeds ${first}..${first + n - 1}), ${ops} operations, ${flushes} flushes${extra}: 0 lost flushed writes, 0 wrong bytes${late}, ${((Date.now() - t0) / 1000).toFixed(1)} s\n`);
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  main().catch((err: Error) => {
    process.stderr.write(`${err.message}\n`);
    process.exit(1);
  });
}
