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
import { RegionMap } from '../../dpu-agent/src/region/region-map.js';
import type { RemoteReadOptions, RemoteSource, RemoteSourceStats } from '../../dpu-agent/src/remote/source.js';
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

    const target = new VolatileCacheTarget(file, opts);
    const disk = new StreamingDisk({ source, target, map: RegionMap.open(state, geo), commitIntervalMs: 5 + int(40) });
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

    // Reboot: reopen from what is on the medium.
    const target2 = new VolatileCacheTarget(file);
    const disk2 = new StreamingDisk({ source: new MemorySource(image), target: target2, map: RegionMap.open(state, geo), commitIntervalMs: 50 });
    const got = Buffer.alloc(size);
    await disk2.read(0, got);
    for (let s = 0; s < sectors; s++) {
      if (allowed[s]!.has(sectorHash(got, s))) continue;
      const at = s * SECTOR;
      const tenant = got.subarray(at, at + SECTOR).every((b) => b === TENANT);
      assert.fail(
        `seed ${seed}: sector ${s} (byte ${at}, region ${Math.floor(at / REGION)}) after the crash holds ${tenant ? "the previous tenant's bytes" : 'bytes that were never flushed or written there'}` +
          ` (flushed version ${sectorHash(flushed, s).slice(0, 8)}, read ${sectorHash(got, s).slice(0, 8)})`,
      );
    }
    // Finish hydration: the target must end up holding exactly what the disk serves.
    if (!disk2.complete) {
      // (A disk that had cut over before the power cut reopens complete: nothing to do.)
      const h2 = new Hydrator(disk2, { batchBytes: REGION * 4 });
      const done = new Promise<void>((r) => disk2.once('complete', () => r()));
      h2.start();
      await done;
    }
    const served = Buffer.alloc(size);
    await disk2.read(0, served);
    assert.ok(served.equals(got), `seed ${seed}: hydration changed what the disk serves`);
    await disk2.close();
    assert.ok(fs.readFileSync(file).subarray(0, size).equals(served), `seed ${seed}: the target disagrees with the region map after hydration`);
    return { seed, ops: nops, flushes, writes, lostAtCut };
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

async function main(): Promise<void> {
  const { values } = parseArgs({ options: { trials: { type: 'string', default: '200' }, seed: { type: 'string', default: '1' } } });
  const n = Number(values.trials);
  const first = Number(values.seed);
  let ops = 0;
  let flushes = 0;
  const t0 = Date.now();
  for (let i = 0; i < n; i++) {
    const r = await trial(first + i);
    ops += r.ops;
    flushes += r.flushes;
  }
  process.stdout.write(`${n} crash trials (seeds ${first}..${first + n - 1}), ${ops} operations, ${flushes} flushes: 0 lost flushed writes, 0 wrong bytes, ${((Date.now() - t0) / 1000).toFixed(1)} s\n`);
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  main().catch((err: Error) => {
    process.stderr.write(`${err.message}\n`);
    process.exit(1);
  });
}
