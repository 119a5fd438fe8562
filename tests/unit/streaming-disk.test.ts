/**
 * The streaming disk's state machine, driven in-process. The remote source here is a
 * test implementation of the RemoteSource contract backed by a buffer, with gates that
 * hold a fetch open so races can be staged deterministically (the disk — the component
 * under test — is real, as are its local target and region map on disk).
 */
import assert from 'node:assert/strict';
import { once } from 'node:events';
import fs from 'node:fs';
import path from 'node:path';
import { LocalTarget } from '../../dpu-agent/src/local/target.js';
import { RegionMap, RegionState } from '../../dpu-agent/src/region/region-map.js';
import type { RemoteReadOptions, RemoteSource, RemoteSourceStats } from '../../image-access/src/source.js';
import { StreamingDisk } from '../../dpu-agent/src/streaming/disk.js';
import { Hydrator } from '../../dpu-agent/src/streaming/hydrator.js';
import { decodeRuns } from '../../dpu-agent/src/streaming/peer-source.js';
import { Manifest } from '../../image-access/src/manifest.js';
import { HashWorkers } from '../../image-access/src/hash-workers.js';
import { DpuError } from '../../image-access/src/errors.js';
import { tempDir } from '../helpers/agent.js';
import { ControlledSource } from '../helpers/controlled-source.js';

const R = 64 << 10; // region size in these tests

class BufferSource implements RemoteSource {
  readonly identity = 'test';
  readonly description = 'buffer';
  reads: { offset: number; length: number; priority: string }[] = [];
  bytes = 0;
  gate: Promise<void> | null = null;
  failNext = 0;
  /** Flip a byte in the next N deliveries (a corrupting origin or proxy). */
  corruptNext = 0;
  closed = false;
  constructor(readonly image: Buffer) {}
  get size(): number {
    return this.image.length;
  }
  async read(offset: number, dest: Buffer, opts: RemoteReadOptions): Promise<void> {
    this.reads.push({ offset, length: dest.length, priority: opts.priority });
    if (this.gate) await this.gate;
    if (this.failNext > 0) {
      this.failNext--;
      throw new Error('injected source failure');
    }
    // Deliver in two halves so per-region early delivery is exercised.
    const half = Math.floor(dest.length / 2);
    this.image.copy(dest, 0, offset, offset + half);
    opts.onProgress?.(half);
    await new Promise((r) => setImmediate(r));
    this.image.copy(dest, half, offset + half, offset + dest.length);
    if (this.corruptNext > 0) {
      this.corruptNext--;
      dest[dest.length - 1] = dest[dest.length - 1]! ^ 0x01;
    }
    this.bytes += dest.length;
    opts.onProgress?.(dest.length);
  }
  stats(): RemoteSourceStats {
    return { bytesFetched: this.bytes, requests: this.reads.length, retries: 0, failures: 0, foregroundInflight: 0, backgroundInflight: 0 };
  }
  async close(): Promise<void> {
    this.closed = true;
  }
}

function image(size: number): Buffer {
  const b = Buffer.alloc(size);
  for (let i = 0; i < size; i += 4) b.writeUInt32LE((i * 2654435761) >>> 0, i);
  return b;
}

describe('StreamingDisk', () => {
  let dir: string;
  let cleanup: () => void;
  let src: BufferSource;
  let disk: StreamingDisk;
  const size = 8 * R + 1000; // short last region
  const img = image(size);
  // A previous tenant's bytes on the target: must never be served.
  const TENANT = 0x5a;

  beforeEach(() => {
    ({ dir, cleanup } = tempDir('sdisk'));
    fs.writeFileSync(path.join(dir, 'target'), Buffer.alloc(size, TENANT));
    src = new BufferSource(img);
    disk = open();
  });
  afterEach(async () => {
    await disk.close().catch(() => undefined);
    cleanup();
  });

  let hashWorkers: HashWorkers | undefined;
  /** `manifest`: as the agent reopens a disk whose manifest it stored. */
  function open(source: RemoteSource | null = src, manifest?: Manifest): StreamingDisk {
    const target = LocalTarget.open(path.join(dir, 'target'), { create: true, size });
    const map = RegionMap.open(path.join(dir, 'state'), { diskSize: size, regionSize: R, identity: 'test' });
    return new StreamingDisk({ source, target, map, commitIntervalMs: 50, ...(hashWorkers ? { hashWorkers } : {}), ...(manifest ? { manifest } : {}) });
  }

  async function read(offset: number, length: number): Promise<Buffer> {
    const b = Buffer.alloc(length);
    await disk.read(offset, b);
    return b;
  }

  /** Reads region r whole (one fetch) and waits until it is local. */
  async function fetchRegion(r: number): Promise<void> {
    await read(r * R, R);
    while (disk.map.state(r) !== RegionState.Local) await once(disk, 'region-settled');
  }

  it('without a manifest, serves peers nothing: what was fetched is unverified', async () => {
    await fetchRegion(0);
    assert.equal(await disk.readForPeer(0, Buffer.alloc(R)), false);
  });

  it('a read miss fetches its region, answers, and makes it local', async () => {
    const got = await read(R + 100, 5000);
    assert.deepEqual(got, img.subarray(R + 100, R + 5100));
    // Answered from the fetched bytes; the region is local once their write has ended.
    while (disk.map.state(1) === RegionState.Filling) await once(disk, 'region-settled');
    assert.equal(disk.map.state(1), RegionState.Local);
    assert.equal(src.reads.length, 1);
    assert.equal(src.reads[0]!.priority, 'foreground');
    await read(R, R);
    assert.equal(src.reads.length, 1, 'a local region is not fetched again');
  });

  it('concurrent misses on one region share one fetch', async () => {
    let open!: () => void;
    src.gate = new Promise((r) => (open = r));
    const reads = [read(2 * R, 10), read(2 * R + 500, 10), read(2 * R + R - 10, 10)];
    await new Promise((r) => setImmediate(r));
    open();
    src.gate = null;
    const got = await Promise.all(reads);
    assert.equal(src.reads.length, 1);
    assert.deepEqual(got[1], img.subarray(2 * R + 500, 2 * R + 510));
  });

  it('a read across remote regions fetches them in one range request', async () => {
    const got = await read(R / 2, 3 * R);
    assert.deepEqual(got, img.subarray(R / 2, R / 2 + 3 * R));
    assert.equal(src.reads.length, 1);
    assert.equal(src.reads[0]!.length, 4 * R);
  });

  it('a whole-region write needs no fetch; a partial write keeps the image around it', async () => {
    const whole = Buffer.alloc(R, 0xee);
    await disk.write(3 * R, [whole.subarray(0, 1000), whole.subarray(1000)], R, false);
    assert.equal(src.reads.length, 0);
    assert.deepEqual(await read(3 * R, R), whole);
    const part = Buffer.alloc(100, 0xcd);
    await disk.write(5 * R + 50, [part], 100, false);
    assert.equal(src.reads.length, 1, 'the partial write hydrated its region first');
    const back = await read(5 * R, R);
    assert.deepEqual(back.subarray(0, 50), img.subarray(5 * R, 5 * R + 50));
    assert.deepEqual(back.subarray(50, 150), part);
    assert.deepEqual(back.subarray(150), img.subarray(5 * R + 150, 6 * R));
  });

  it('a write to a region being fetched waits for the fetch, so the fetch cannot overwrite it', async () => {
    let open!: () => void;
    src.gate = new Promise((r) => (open = r));
    const r1 = read(4 * R, 10);
    await new Promise((r) => setImmediate(r));
    assert.equal(disk.map.state(4), RegionState.Filling);
    const w = disk.write(4 * R, [Buffer.alloc(R, 0x11)], R, false);
    open();
    src.gate = null;
    await Promise.all([r1, w]);
    assert.deepEqual(await read(4 * R, R), Buffer.alloc(R, 0x11));
  });

  it('a failed fetch leaves the region remote, reports EIO-worthy error, and a retry works', async () => {
    src.failNext = 1;
    await assert.rejects(read(6 * R, 10), /injected source failure/);
    assert.equal(disk.map.state(6), RegionState.Remote);
    assert.deepEqual(await read(6 * R, 10), img.subarray(6 * R, 6 * R + 10));
  });

  it('WRITE_ZEROES and TRIM on whole remote regions need no fetch; partial zeroing keeps the rest', async () => {
    await disk.writeZeroes(R, 2 * R, false);
    await disk.trim(4 * R, R, false);
    assert.equal(src.reads.length, 0);
    assert.equal(disk.map.describe().slice(0, 5), 'rzzrz');
    assert.deepEqual(await read(R, 2 * R), Buffer.alloc(2 * R));
    await disk.writeZeroes(6 * R + 10, 20, false);
    const back = await read(6 * R, 64);
    assert.deepEqual(back.subarray(0, 10), img.subarray(6 * R, 6 * R + 10));
    assert.deepEqual(back.subarray(10, 30), Buffer.alloc(20));
    assert.deepEqual(back.subarray(30), img.subarray(6 * R + 30, 6 * R + 64));
  });

  it('never serves the previous tenant: zero regions read zeros even though the target holds old bytes', async () => {
    await disk.trim(0, R, false);
    const b = await read(0, R);
    assert.ok(!b.includes(TENANT), 'no tenant byte');
  });

  it('flush persists what is local; a reopen serves it without fetching', async () => {
    await read(0, 10);
    await disk.write(2 * R, [Buffer.alloc(R, 0x77)], R, false);
    await disk.flush();
    await disk.close();
    const before = src.reads.length;
    disk = open();
    assert.equal(disk.map.state(0), RegionState.Local);
    assert.equal(disk.map.state(2), RegionState.Local);
    assert.deepEqual(await read(2 * R, R), Buffer.alloc(R, 0x77));
    assert.equal(src.reads.length, before);
  });

  it('hydration copies everything, coalesces runs, then cuts over and closes the source', async () => {
    await disk.writeZeroes(2 * R, R, false);
    const h = new Hydrator(disk, { batchBytes: 4 * R, concurrency: 2 });
    const done = new Promise<void>((r) => disk.once('complete', () => r()));
    h.start();
    await done;
    assert.equal(h.state, 'complete');
    assert.equal(disk.map.allLocal, true);
    assert.equal(src.closed, true);
    assert.ok(src.reads.every((x) => x.length <= 4 * R));
    assert.equal(src.bytes, size - R, 'the zeroed region was not fetched');
    const expected = Buffer.from(img);
    expected.fill(0, 2 * R, 3 * R);
    assert.deepEqual(fs.readFileSync(path.join(dir, 'target')), expected);
    await disk.close();
    // A complete disk reopens with no source at all.
    disk = open(null);
    assert.deepEqual(await read(0, size), expected);
  });

  it('stopping hydration (agent shutdown) reports no error for the batch the stop abandons', async () => {
    const origin = new ControlledSource(img);
    await disk.close();
    disk = open(origin);
    const h = new Hydrator(disk, { batchBytes: 2 * R, concurrency: 1 });
    const errors: string[] = [];
    h.on('batch-error', (e) => errors.push(e.message));
    h.start();
    await origin.next(); // a batch is on the wire
    const stopped = h.stop();
    await disk.close(); // closes the origin: the batch is aborted (DPU_ERR_SOURCE_CLOSED)
    await stopped;
    assert.deepEqual(errors, []);
    assert.equal(h.lastError, null);
  });

  for (const where of ['on the event loop', 'on hash worker threads'] as const) describe(`with a manifest, verified ${where}`, () => {
    let manifest: Manifest;
    before(() => {
      if (where === 'on hash worker threads') hashWorkers = new HashWorkers(2);
    });
    after(async () => {
      await hashWorkers?.close();
      hashWorkers = undefined;
    });
    beforeEach(async () => {
      const zeroed = Buffer.from(img);
      zeroed.fill(0, 3 * R, 5 * R); // regions 3 and 4 are zeros in this image
      src = new BufferSource(zeroed);
      manifest = await Manifest.build(src, { regionSize: R });
      src.reads = [];
      src.bytes = 0;
      await disk.close();
      fs.rmSync(path.join(dir, 'state'), { recursive: true, force: true });
      disk = open();
      disk.setManifest(manifest);
    });

    it('marks zero regions without fetching them, and never serves the tenant bytes there', async () => {
      assert.equal(disk.map.describe().slice(0, 6), 'rrrzzr');
      assert.deepEqual(await read(3 * R, 2 * R), Buffer.alloc(2 * R));
      assert.equal(src.reads.length, 0);
    });

    it('serves peers only regions whose bytes are the verified image: never remote, zero or host-written ones', async () => {
      const zeroed = Buffer.from(img);
      zeroed.fill(0, 3 * R, 5 * R);
      const peer = async (r: number, length = R): Promise<Buffer | null> => {
        const b = Buffer.alloc(length);
        return (await disk.readForPeer(r * R, b)) ? b : null;
      };
      await fetchRegion(0);
      await fetchRegion(1);
      assert.deepEqual(await peer(0), zeroed.subarray(0, R), 'fetched and verified: served');
      assert.deepEqual(await peer(0, 2 * R), zeroed.subarray(0, 2 * R), 'two regions at once');
      // What peers are told it serves (GET …/image/regions), as they decode it.
      const runs = disk.pristineRuns();
      assert.deepEqual(runs.slice(0, 2), [0, 2], 'regions 0 and 1 served, not what follows');
      assert.equal(runs.reduce((a, b) => a + b, 0), disk.map.count);
      assert.deepEqual([...decodeRuns(runs, disk.map.count)!].slice(0, 4), [1, 1, 0, 0]);
      assert.equal(decodeRuns([0, -1], 4), null, 'a bad run is refused, not guessed');
      assert.equal(await peer(2), null, 'remote');
      assert.equal(await peer(1, 2 * R), null, 'a range reaching a remote region');
      assert.equal(await peer(3), null, 'zero: peers never ask for those');
      await disk.write(R + 10, [Buffer.from('host')], 4, false);
      assert.equal(await peer(1), null, 'written by the host: its bytes, never served again');
      // Writes and zeroing that fetch the region first (read-modify-write) must not leave
      // it marked by the fetch.
      await disk.write(6 * R + 10, [Buffer.from('host')], 4, false);
      assert.equal(disk.map.state(6), RegionState.Local);
      assert.equal(await peer(6), null, 'fetched for a partial host write');
      await disk.writeZeroes(7 * R + 10, 100, false);
      assert.equal(disk.map.state(7), RegionState.Local);
      assert.equal(await peer(7), null, 'fetched for a partial WRITE_ZEROES');
      // A host write that lands while a peer's read is on its way: the read is refused.
      const onItsWay = disk.readForPeer(0, Buffer.alloc(R));
      await disk.write(20, [Buffer.from('host')], 4, false);
      assert.equal(await onItsWay, false);
      // After a restart (the manifest given at open, as the agent reopens a disk) nothing is
      // served until the read-back pass has checked the local regions: then those that hold
      // the image are, those the host changed are not.
      await fetchRegion(5);
      await disk.close();
      disk = open(src, manifest);
      assert.equal(await peer(5), null, 'not before the read-back');
      assert.equal(await disk.scanPristine(), 1, 'region 5: fetched, untouched since (0, 1, 6 and 7 hold host bytes)');
      assert.deepEqual(await peer(5), zeroed.subarray(5 * R, 6 * R), 'verified at open');
      for (const r of [0, 1, 6, 7]) assert.equal(await peer(r), null, `region ${r} has the host's bytes`);
    });

    it('drops a corrupted region and fetches it again: the reader gets the right bytes', async () => {
      src.corruptNext = 1;
      const got = await read(R, 100);
      assert.deepEqual(got, img.subarray(R, R + 100));
      assert.equal(src.reads.length, 2);
      assert.equal(disk.progress().integrityFailures, 1);
      assert.equal(disk.progress().verified, true);
      if (hashWorkers) assert.ok(hashWorkers.stats.workerBytes >= 2 * R && hashWorkers.stats.inlineBytes === 0, 'the workers hashed the fetched regions');
    });

    it('hydration with a corrupting origin: every bad region fetched again, the target is the image', async () => {
      src.corruptNext = 3;
      const h = new Hydrator(disk, { batchBytes: 4 * R, concurrency: 2 });
      const done = new Promise<void>((r) => disk.once('complete', () => r()));
      h.start();
      await done;
      assert.equal(disk.progress().integrityFailures, 3);
      const expected = Buffer.from(img);
      expected.fill(0, 3 * R, 5 * R);
      assert.ok(fs.readFileSync(path.join(dir, 'target')).equals(expected));
    });

    it('fails the read with DPU_ERR_INTEGRITY after three bad fetches, and leaves the region remote', async () => {
      src.corruptNext = 3;
      await assert.rejects(read(2 * R, 100), (e: unknown) => e instanceof DpuError && e.code === 'DPU_ERR_INTEGRITY');
      assert.equal(disk.map.state(2), RegionState.Remote);
      assert.notEqual(fs.readFileSync(path.join(dir, 'target')).subarray(2 * R, 3 * R).indexOf(TENANT), -1, 'nothing was written locally');
      assert.deepEqual(await read(2 * R, 100), img.subarray(2 * R, 2 * R + 100), 'a later read succeeds');
    });

    it('round-trips through its binary encoding and refuses damage, another geometry or another image', async () => {
      const bytes = manifest.encode();
      const again = Manifest.decode(bytes);
      assert.equal(again.count, manifest.count);
      assert.ok(again.isZero(3) && !again.isZero(2));
      assert.ok(again.verify(1, img.subarray(R, 2 * R)));
      const damaged = Buffer.from(bytes);
      damaged[200] = damaged[200]! ^ 1;
      assert.throws(() => Manifest.decode(damaged), /damaged/);
      const other = await Manifest.build(new BufferSource(img.subarray(0, 4 * R)), { regionSize: R });
      assert.throws(() => disk.setManifest(other), (e: unknown) => e instanceof DpuError && e.code === 'DPU_ERR_MANIFEST_INVALID');
      await assert.rejects(Manifest.build(new BufferSource(img), { regionSize: R, expectedImageHash: 'ab'.repeat(64) }), /not the one Glance describes/);
    });
  });

  it('hydration pauses and resumes', async () => {
    const h = new Hydrator(disk, { batchBytes: R, concurrency: 1 });
    h.start();
    h.pause();
    await new Promise((r) => setTimeout(r, 50));
    const n = src.reads.length;
    await new Promise((r) => setTimeout(r, 50));
    assert.equal(src.reads.length, n, 'no new fetch while paused');
    const done = new Promise<void>((r) => disk.once('complete', () => r()));
    h.resume();
    await done;
    assert.equal(disk.map.allLocal, true);
  });
});
