/**
 * The image manifest, version 2 (issue #14): per region, the RFC 6962 Merkle root of its
 * leaves, and the leaf hashes themselves, so blocks smaller than a region verify; version 1
 * manifests still load.
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { DpuError } from '../../image-access/src/errors.js';
import { Manifest, merkleRoot } from '../../image-access/src/manifest.js';
import { MemorySource } from '../helpers/memory-source.js';
import { HashWorkers, leafHashesInline, sharedBuffer } from '../../image-access/src/hash-workers.js';

const R = 256 << 10;
const L = 16 << 10;


/** 4 regions and a short fifth; region 2 all zeros. */
function image(): Buffer {
  const b = Buffer.alloc(4 * R + 3 * L + 100);
  for (let i = 0; i + 4 <= b.length; i += 4) b.writeUInt32LE((Math.imul(i + 3, 2654435761) | 1) >>> 0, i);
  b.fill(0, 2 * R, 3 * R);
  return b;
}

const sha = (...parts: Buffer[]): Buffer => {
  const h = createHash('sha256');
  for (const p of parts) h.update(p);
  return h.digest();
};

describe('image manifest v2 (Merkle leaves)', () => {
  const img = image();
  let m: Manifest;
  before(async () => {
    m = await Manifest.build(new MemorySource(img), { regionSize: R, leafSize: L });
  });

  it('computes RFC 6962 tree hashes', () => {
    const leaves = [0, 1, 2].map((i) => sha(Buffer.from([0]), Buffer.from([i])));
    assert.deepEqual(merkleRoot([]), sha(Buffer.alloc(0)));
    assert.deepEqual(merkleRoot(leaves.slice(0, 1)), leaves[0]);
    // Three leaves split 2 + 1 (the largest power of two below 3).
    const expected = sha(Buffer.from([1]), sha(Buffer.from([1]), leaves[0]!, leaves[1]!), leaves[2]!);
    assert.deepEqual(merkleRoot(leaves), expected);
  });

  it('verifies whole regions and whole leaves, and catches one flipped byte in either', () => {
    assert.equal(m.version, 2);
    assert.equal(m.count, 5);
    assert.ok(m.isZero(2) && !m.isZero(1));
    for (let r = 0; r < m.count; r++) assert.ok(m.verify(r, img.subarray(r * R, Math.min(img.length, (r + 1) * R))), `region ${r}`);
    const bad = Buffer.from(img.subarray(R, 2 * R));
    bad[5 * L + 7] ^= 1;
    assert.equal(m.verify(1, bad), false);
    assert.equal(m.verifyBlocks(1, 5 * L, bad.subarray(5 * L, 6 * L)), false, 'the leaf with the flip');
    assert.equal(m.verifyBlocks(1, 4 * L, bad.subarray(4 * L, 5 * L)), true, 'its neighbour');
    assert.equal(m.verifyBlocks(1, 3 * L, img.subarray(R + 3 * L, R + 6 * L)), true, 'a run of leaves');
    // The short last region ends in a short leaf.
    assert.equal(m.verifyBlocks(4, 2 * L, img.subarray(4 * R + 2 * L)), true);
    assert.equal(m.verifyBlocks(2, 0, Buffer.alloc(L)), true, 'a zero region verifies as zeros');
    assert.equal(m.verifyBlocks(2, 0, Buffer.alloc(L, 1)), false);
    assert.throws(() => m.verifyBlocks(1, 100, img.subarray(R + 100, R + 100 + L)), /whole/);
  });

  it('round-trips through its encoding; zero regions store no leaves', () => {
    const bytes = m.encode();
    const nonZeroLeaves = 3 * (R / L) + 4; // regions 0, 1, 3 whole; region 4 is 3 leaves and a bit
    assert.equal(bytes.length, 120 + 5 * 32 + 1 + nonZeroLeaves * 32 + 32);
    const again = Manifest.decode(bytes);
    assert.equal(again.leafSize, L);
    assert.ok(again.verifyBlocks(3, 7 * L, img.subarray(3 * R + 7 * L, 3 * R + 8 * L)));
    assert.ok(again.encode().equals(bytes));
  });

  it('refuses a manifest whose region hash is not the root of its leaves, even with a good checksum', () => {
    const bytes = Buffer.from(m.encode());
    const leavesAt = 120 + 5 * 32 + 1;
    bytes[leavesAt + 40] ^= 1; // a leaf of region 0
    sha(bytes.subarray(0, bytes.length - 32)).copy(bytes, bytes.length - 32);
    assert.throws(() => Manifest.decode(bytes), (e: unknown) => e instanceof DpuError && /root of its leaves/.test(e.message));
  });

  it('still loads version 1 manifests, which verify whole regions only', async () => {
    const v1 = await Manifest.build(new MemorySource(img), { regionSize: R, leafSize: null });
    const again = Manifest.decode(v1.encode());
    assert.equal(again.version, 1);
    assert.equal(again.leafSize, null);
    assert.ok(again.verify(1, img.subarray(R, 2 * R)));
    assert.throws(() => again.verifyBlocks(1, 0, img.subarray(R, R + L)), /whole regions/);
    assert.deepEqual(again.imageHash, m.imageHash, 'the image digest does not depend on the version');
  });

  it('padded to a larger disk: the straddling region verifies as image then zeros, leaf by leaf', () => {
    const disk = 8 * R;
    const p = m.padTo(disk);
    const region4 = Buffer.alloc(R);
    img.copy(region4, 0, 4 * R);
    assert.ok(p.verify(4, region4));
    assert.ok(p.verifyBlocks(4, 3 * L, region4.subarray(3 * L, 5 * L)), 'the leaf holding the image\'s end, then a padding leaf');
    const dirty = Buffer.from(region4);
    dirty[4 * L + 1] = 9; // a byte in the padding
    assert.equal(p.verifyBlocks(4, 4 * L, dirty.subarray(4 * L, 5 * L)), false);
    assert.ok(p.isZero(7) && p.verify(7, Buffer.alloc(R)));
  });

  it('verifyAsync on worker threads gives verify\'s verdicts: shared buffers hashed in place, others inline', async () => {
    const workers = new HashWorkers(2);
    try {
      const p = m.padTo(8 * R);
      const shared = (b: Buffer): Buffer => {
        const s = sharedBuffer(b.length);
        b.copy(s);
        return s;
      };
      const region = (r: number): Buffer => {
        const b = Buffer.alloc(Math.min(R, p.size - r * R));
        if (r * R < img.length) img.copy(b, 0, r * R, Math.min(img.length, (r + 1) * R));
        return b;
      };
      for (const r of [0, 1, 2, 3, 4, 7]) {
        assert.equal(await p.verifyAsync(r, shared(region(r)), workers), true, `region ${r}`);
        assert.equal(await p.verifyAsync(r, shared(region(r)), workers), p.verify(r, region(r)));
      }
      for (const at of [0, L - 1, 3 * L + 99, 3 * L + 100, R - 1]) {
        const bad = shared(region(4));
        bad[at] = bad[at]! ^ 1; // in the image, in its last (short) leaf, in the padding after it
        assert.equal(await p.verifyAsync(4, bad, workers), false, `flipped byte ${at} of region 4`);
      }
      const zeroBad = shared(region(2));
      zeroBad[5] = 1;
      assert.equal(await p.verifyAsync(2, zeroBad, workers), false, 'a zero region with a byte set');
      assert.equal(await p.verifyAsync(1, shared(region(1)).subarray(0, R - L), workers), false, 'a short region');
      const hashedInPlace = workers.stats.workerBytes;
      assert.ok(hashedInPlace > 0);
      assert.equal(await p.verifyAsync(0, region(0), workers), true, 'a buffer that is not shared memory');
      assert.equal(workers.stats.workerBytes, hashedInPlace, 'was hashed on the calling thread');
      assert.equal(workers.stats.inlineBytes, R);
    } finally {
      await workers.close();
    }
    await assert.rejects(workers.leafHashes(sharedBuffer(L), L), /closed/);
  });

  it('hash threads start on demand: a second only while the first is busy; hashes equal inline ones', async () => {
    const workers = new HashWorkers(2);
    try {
      const data = sharedBuffer(4 * L + 7);
      img.copy(data, 0, 0, data.length);
      for (let i = 0; i < 4; i++) assert.ok((await workers.leafHashes(data, L)).equals(leafHashesInline(data, L)));
      assert.equal(workers.started, 1, 'one job at a time: one thread');
      const both = await Promise.all([workers.leafHashes(data, L), workers.leafHashes(data.subarray(L), L)]);
      assert.equal(workers.started, 2);
      assert.ok(both[1]!.equals(leafHashesInline(data.subarray(L), L)));
    } finally {
      await workers.close();
    }
  });
});
