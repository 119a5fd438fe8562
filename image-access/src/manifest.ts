/**
 * The image manifest: per region, a hash of its bytes and whether it is all zeros; for the
 * whole image, the digest Glance records (`os_hash_algo`/`os_hash_value`, sha512 by
 * default). Built once per image and region size by reading the image through any
 * RemoteSource (so a qcow2 image is hashed as the raw disk it describes), then used by
 * every streaming disk of that image to verify each region it fetches and to skip
 * fetching zero regions.
 *
 * Version 2 (what `build` makes) verifies blocks smaller than a region: each region's hash
 * is the root of a Merkle tree over its 64 KiB leaves (RFC 6962's Merkle Tree Hash: a leaf
 * is SHA-256(0x00 ‖ bytes), an inner node SHA-256(0x01 ‖ left ‖ right), the split at the
 * largest power of two below the leaf count), and the leaf hashes of every non-zero region
 * are stored, so a host's miss can fetch just the blocks it asked for and still check
 * each of them. Zero regions store no leaves (a 100 GiB mostly-empty disk stays small).
 * Version 1 (region hash = SHA-256 of the region, no leaves) still loads: with it, only
 * whole regions can be verified.
 *
 * Binary format, little-endian:
 *    0  magic "SNICMANI"           8
 *    8  format version u32         4   (1 or 2)
 *   12  region shift u32           4
 *   16  image size u64             8
 *   24  region count u32           4
 *   28  image hash algo           16   (ASCII, NUL-padded: "sha512")
 *   44  image hash length u32      4
 *   48  image hash                64   (first `length` bytes used)
 *  v2 only:
 *  112  leaf shift u32             4
 *  116  stored leaf count u32      4
 *  112 (v1) / 120 (v2)
 *       region hashes              32 × region count
 *   …   zero bitmap                ceil(region count / 8)
 *   …   leaf hashes (v2)           32 × stored leaf count, region by region, zero regions skipped
 *   …   SHA-256 of everything above, 32 — the manifest checks itself
 */
import { createHash } from 'node:crypto';
import { leafHashesInline, type HashWorkers } from './hash-workers.js';
import { DpuError } from './errors.js';
import type { RemoteSource } from './source.js';

const MAGIC = Buffer.from('SNICMANI', 'ascii');
const HEADER_V1 = 112;
const HEADER_V2 = 120;
/** The leaf of the Merkle tree in a version 2 manifest. */
export const DEFAULT_LEAF_SIZE = 64 << 10;
const LEAF_PREFIX = Buffer.from([0]);
const NODE_PREFIX = Buffer.from([1]);

export class Manifest {
  /** Per region, the index of its first stored leaf hash; [count] is the total (v2 only). */
  private readonly leafBase: Uint32Array | null;

  private constructor(
    readonly size: number,
    readonly regionSize: number,
    readonly count: number,
    readonly imageHashAlgo: string,
    readonly imageHash: Buffer,
    private readonly hashes: Buffer,
    private readonly zeros: Buffer,
    /** Bytes per Merkle leaf (version 2), or null for a version 1 manifest (no leaves). */
    readonly leafSize: number | null,
    /** The leaf hashes of every non-zero region, in region order (version 2). */
    private readonly leaves: Buffer,
    /**
     * Where the image's bytes end, when this manifest describes a disk larger than its
     * image (see padTo): beyond, the disk holds zeros, and a region that straddles it is
     * checked as the image's bytes followed by zeros.
     */
    readonly imageSize: number = size,
  ) {
    if (leafSize === null) {
      this.leafBase = null;
      return;
    }
    const base = new Uint32Array(count + 1);
    for (let r = 0; r < count; r++) base[r + 1] = base[r]! + (this.isZero(r) ? 0 : Math.ceil(this.imageBytesIn(r) / leafSize));
    this.leafBase = base;
  }

  /** The format version: 2 when blocks can be verified, 1 otherwise. */
  get version(): 1 | 2 {
    return this.leafSize === null ? 1 : 2;
  }

  /** Bytes of the image (not of padding) in region r. */
  private imageBytesIn(r: number): number {
    const start = r * this.regionSize;
    return Math.max(0, Math.min(this.regionSize, this.imageSize - start));
  }

  /**
   * This manifest for a disk of `diskSize` bytes that holds the image at its start and
   * zeros after it (a root disk larger than the image): the regions past the image are
   * zero regions, and the region that straddles the image's end verifies as the image's
   * bytes then zeros. The image digest stays the image's.
   */
  padTo(diskSize: number): Manifest {
    if (diskSize === this.size) return this;
    if (this.size !== this.imageSize || diskSize < this.size) {
      throw new DpuError('DPU_ERR_MANIFEST_INVALID', `a manifest of a ${this.size}-byte image cannot describe a ${diskSize}-byte disk`);
    }
    const count = Math.ceil(diskSize / this.regionSize);
    const hashes = Buffer.alloc(count * 32);
    this.hashes.copy(hashes);
    const zeros = Buffer.alloc(Math.ceil(count / 8));
    this.zeros.copy(zeros);
    const empty = this.leafSize === null ? sha256(Buffer.alloc(0)) : merkleRoot([]);
    for (let r = this.count; r < count; r++) {
      zeros[r >> 3]! |= 1 << (r & 7);
      empty.copy(hashes, r * 32);
    }
    return new Manifest(diskSize, this.regionSize, count, this.imageHashAlgo, this.imageHash, hashes, zeros, this.leafSize, this.leaves, this.size);
  }

  /** Whether region r is all zeros in the image. */
  isZero(r: number): boolean {
    return (this.zeros[r >> 3]! & (1 << (r & 7))) !== 0;
  }

  get zeroRegions(): number {
    let n = 0;
    for (let r = 0; r < this.count; r++) if (this.isZero(r)) n++;
    return n;
  }

  /** True when `data` is region r's bytes exactly. */
  verify(r: number, data: Buffer): boolean {
    if (this.leafSize !== null) return data.length === Math.min(this.regionSize, this.size - r * this.regionSize) && this.verifyBlocks(r, 0, data);
    const start = r * this.regionSize;
    let image = data;
    if (start + data.length > this.imageSize) {
      image = data.subarray(0, Math.max(0, this.imageSize - start));
      if (!isAllZero(data.subarray(image.length))) return false;
    }
    return sha256(image).equals(this.hashes.subarray(r * 32, r * 32 + 32));
  }

  /**
   * verify(r, data) with the leaf hashes computed by `workers` (off the event loop when
   * `data` is shared memory: see hash-workers.ts). A version 1 manifest verifies here.
   */
  async verifyAsync(r: number, data: Buffer, workers: HashWorkers): Promise<boolean> {
    const leaf = this.leafSize;
    if (leaf === null) return this.verify(r, data);
    if (data.length !== Math.min(this.regionSize, this.size - r * this.regionSize)) return false;
    const p = this.leavesToCheck(r, 0, data);
    return 'verdict' in p ? p.verdict : this.leavesMatch(p.first, await workers.leafHashes(p.image, leaf));
  }

  /**
   * True when `data` is the bytes of region r from `from` (an offset in the region, a
   * multiple of leafSize) on, for whole leaves (the last may end where the region ends).
   * Version 2 only: a version 1 manifest can verify whole regions and nothing smaller.
   */
  verifyBlocks(r: number, from: number, data: Buffer): boolean {
    const leaf = this.leafSize;
    if (leaf === null) throw new Error('a version 1 manifest verifies whole regions only');
    const regionLength = Math.min(this.regionSize, this.size - r * this.regionSize);
    if (from % leaf !== 0 || from + data.length > regionLength || (data.length % leaf !== 0 && from + data.length !== regionLength)) {
      throw new Error(`blocks ${from}+${data.length} of region ${r} are not whole ${leaf}-byte leaves`);
    }
    const p = this.leavesToCheck(r, from, data);
    return 'verdict' in p ? p.verdict : this.leavesMatch(p.first, leafHashesInline(p.image, leaf));
  }

  /**
   * What verifying whole leaves of region r from `from` takes, whoever hashes them: a
   * verdict already (a zero region; padding past the image's end that is not zero), or the
   * image bytes to hash and the index of their first leaf. Past the image's end a region
   * is padding (zeros), in no leaf.
   */
  private leavesToCheck(r: number, from: number, data: Buffer): { verdict: boolean } | { image: Buffer; first: number } {
    if (this.isZero(r)) return { verdict: isAllZero(data) };
    const imageBytes = Math.max(0, Math.min(data.length, this.imageBytesIn(r) - from));
    if (imageBytes < data.length && !isAllZero(data.subarray(imageBytes))) return { verdict: false };
    return { image: data.subarray(0, imageBytes), first: this.leafBase![r]! + from / this.leafSize! };
  }

  /** The leaf hashes `hashes` (32 bytes each) are the manifest's from leaf `first` on. */
  private leavesMatch(first: number, hashes: Buffer): boolean {
    return hashes.equals(this.leaves.subarray(first * 32, first * 32 + hashes.length));
  }

  /** The manifest as `build` made it (a padded one encodes as the image's: see padTo). */
  encode(): Buffer {
    if (this.imageSize !== this.size) throw new Error('encode the image\'s manifest, not one padded to a disk');
    const header = this.leafSize === null ? HEADER_V1 : HEADER_V2;
    const body = Buffer.alloc(header + this.count * 32 + this.zeros.length + this.leaves.length);
    MAGIC.copy(body, 0);
    body.writeUInt32LE(this.version, 8);
    body.writeUInt32LE(Math.log2(this.regionSize), 12);
    body.writeBigUInt64LE(BigInt(this.size), 16);
    body.writeUInt32LE(this.count, 24);
    body.write(this.imageHashAlgo, 28, 16, 'ascii');
    body.writeUInt32LE(this.imageHash.length, 44);
    this.imageHash.copy(body, 48);
    if (this.leafSize !== null) {
      body.writeUInt32LE(Math.log2(this.leafSize), 112);
      body.writeUInt32LE(this.leaves.length / 32, 116);
    }
    this.hashes.copy(body, header);
    this.zeros.copy(body, header + this.count * 32);
    this.leaves.copy(body, header + this.count * 32 + this.zeros.length);
    return Buffer.concat([body, sha256(body)]);
  }

  static decode(buf: Buffer): Manifest {
    const bad = (why: string): DpuError => new DpuError('DPU_ERR_MANIFEST_INVALID', `${why}; rebuild the manifest from the image`);
    if (buf.length < HEADER_V1 + 32 || !buf.subarray(0, 8).equals(MAGIC)) throw bad('not a manifest (bad magic)');
    const version = buf.readUInt32LE(8);
    if (version !== 1 && version !== 2) throw bad(`manifest format version ${version} is not 1 or 2 (a newer agent made it?)`);
    const header = version === 1 ? HEADER_V1 : HEADER_V2;
    if (buf.length < header + 32) throw bad('manifest is shorter than its header');
    const body = buf.subarray(0, buf.length - 32);
    if (!sha256(body).equals(buf.subarray(buf.length - 32))) throw bad('manifest checksum mismatch (damaged)');
    const shift = buf.readUInt32LE(12);
    const size = Number(buf.readBigUInt64LE(16));
    const count = buf.readUInt32LE(24);
    if (shift < 9 || shift > 30) throw bad(`region shift ${shift} is outside 9..30`);
    const regionSize = 2 ** shift;
    if (count !== Math.ceil(size / regionSize)) throw bad('region count does not match the image size');
    let leafSize: number | null = null;
    let leafCount = 0;
    if (version === 2) {
      const leafShift = buf.readUInt32LE(112);
      if (leafShift < 9 || leafShift > shift) throw bad(`leaf shift ${leafShift} is outside 9..${shift} (the region shift)`);
      leafSize = 2 ** leafShift;
      leafCount = buf.readUInt32LE(116);
    }
    const zerosLen = Math.ceil(count / 8);
    if (body.length !== header + count * 32 + zerosLen + leafCount * 32) throw bad('manifest length does not match its region and leaf counts');
    const algo = buf.toString('ascii', 28, 44).replace(/\0+$/, '');
    const hashLen = buf.readUInt32LE(44);
    if (hashLen > 64) throw bad(`image hash length ${hashLen} is over 64`);
    const hashes = Buffer.from(buf.subarray(header, header + count * 32));
    const zeros = Buffer.from(buf.subarray(header + count * 32, header + count * 32 + zerosLen));
    const leaves = Buffer.from(buf.subarray(header + count * 32 + zerosLen, body.length));
    const m = new Manifest(size, regionSize, count, algo, Buffer.from(buf.subarray(48, 48 + hashLen)), hashes, zeros, leafSize, leaves);
    if (m.leafBase && m.leafBase[count] !== leafCount) throw bad(`the manifest stores ${leafCount} leaf hashes; its non-zero regions have ${m.leafBase[count]}`);
    // Each region's hash is the root of its leaves: a manifest whose parts disagree is not used.
    if (m.leafBase) {
      for (let r = 0; r < count; r++) {
        if (m.isZero(r)) continue;
        const list: Buffer[] = [];
        for (let i = m.leafBase[r]!; i < m.leafBase[r + 1]!; i++) list.push(leaves.subarray(i * 32, i * 32 + 32));
        if (!merkleRoot(list).equals(hashes.subarray(r * 32, r * 32 + 32))) throw bad(`region ${r}'s hash is not the root of its leaves`);
      }
    }
    return m;
  }

  /**
   * Reads the whole image once, in order, through `source`, and records every region's
   * hash and zero-ness (and, in version 2, the hash of each `leafSize` leaf), and the image
   * digest with `imageHashAlgo`. With `expectedImageHash` (Glance's os_hash_value, hex), a
   * different digest fails the build: a manifest is only ever made from the image the
   * cloud says it has. `leafSize: null` builds a version 1 manifest.
   */
  static async build(
    source: RemoteSource,
    opts: { regionSize: number; leafSize?: number | null; imageHashAlgo?: string; expectedImageHash?: string; chunkBytes?: number; onProgress?: (done: number) => void },
  ): Promise<Manifest> {
    const regionSize = opts.regionSize;
    const leafSize = opts.leafSize === undefined ? Math.min(DEFAULT_LEAF_SIZE, regionSize) : opts.leafSize;
    if (leafSize !== null && (leafSize > regionSize || !Number.isInteger(Math.log2(leafSize)) || leafSize < 512)) {
      throw new DpuError('DPU_ERR_CONFIG', `leaf size ${leafSize} must be a power of two from 512 bytes to the region size (${regionSize})`);
    }
    const algo = opts.imageHashAlgo ?? 'sha512';
    const size = source.size;
    const count = Math.ceil(size / regionSize);
    const hashes = Buffer.alloc(count * 32);
    const zeros = Buffer.alloc(Math.ceil(count / 8));
    const leafParts: Buffer[] = [];
    const whole = createHash(algo);
    const chunk = Math.max(regionSize, Math.floor((opts.chunkBytes ?? 8 << 20) / regionSize) * regionSize);
    const buf = Buffer.allocUnsafe(chunk);
    for (let off = 0; off < size; off += chunk) {
      const len = Math.min(chunk, size - off);
      const view = buf.subarray(0, len);
      await source.read(off, view, { priority: 'background' });
      whole.update(view);
      for (let o = 0; o < len; o += regionSize) {
        const r = (off + o) / regionSize;
        const data = view.subarray(o, Math.min(len, o + regionSize));
        const zero = isAllZero(data);
        if (zero) zeros[r >> 3]! |= 1 << (r & 7);
        if (leafSize === null) {
          // Every zero region of a length has the same hash: sparse images (most of a
          // 100 GiB disk) cost one zero check per region instead of a SHA-256.
          (zero ? zeroHash(data.length) : sha256(data)).copy(hashes, r * 32);
          continue;
        }
        if (zero) {
          zeroRoot(data.length, leafSize).copy(hashes, r * 32);
          continue;
        }
        const list: Buffer[] = [];
        for (let l = 0; l < data.length; l += leafSize) list.push(leafHash(data.subarray(l, Math.min(data.length, l + leafSize))));
        merkleRoot(list).copy(hashes, r * 32);
        leafParts.push(...list);
      }
      opts.onProgress?.(off + len);
    }
    const digest = whole.digest();
    if (opts.expectedImageHash && digest.toString('hex') !== opts.expectedImageHash.toLowerCase()) {
      throw new DpuError('DPU_ERR_MANIFEST_INVALID', `the image's ${algo} is ${digest.toString('hex').slice(0, 16)}…, not the expected ${opts.expectedImageHash.slice(0, 16)}…: the image at the source is not the one Glance describes`);
    }
    return new Manifest(size, regionSize, count, algo, digest, hashes, zeros, leafSize, Buffer.concat(leafParts));
  }
}

function sha256(b: Buffer): Buffer {
  return createHash('sha256').update(b).digest();
}

/** RFC 6962 §2.1: the hash of a leaf. */
function leafHash(b: Buffer): Buffer {
  return createHash('sha256').update(LEAF_PREFIX).update(b).digest();
}

/** RFC 6962 §2.1 Merkle Tree Hash over leaf hashes (the hash of no leaves is SHA-256 of nothing). */
export function merkleRoot(leaves: readonly Buffer[]): Buffer {
  if (leaves.length === 0) return sha256(Buffer.alloc(0));
  if (leaves.length === 1) return leaves[0]!;
  let k = 1;
  while (k * 2 < leaves.length) k *= 2;
  return createHash('sha256').update(NODE_PREFIX).update(merkleRoot(leaves.slice(0, k))).update(merkleRoot(leaves.slice(k))).digest();
}

const zeroRoots = new Map<string, Buffer>();
/** The root of a zero region of `length` bytes in `leaf`-byte leaves. */
function zeroRoot(length: number, leaf: number): Buffer {
  const key = `${length}/${leaf}`;
  let h = zeroRoots.get(key);
  if (!h) {
    const list: Buffer[] = [];
    for (let l = 0; l < length; l += leaf) list.push(leafHash(Buffer.alloc(Math.min(leaf, length - l))));
    zeroRoots.set(key, (h = merkleRoot(list)));
  }
  return h;
}

const ZERO_PAGE = Buffer.alloc(64 << 10);

function isAllZero(b: Buffer): boolean {
  for (let o = 0; o < b.length; o += ZERO_PAGE.length) {
    const part = b.subarray(o, Math.min(b.length, o + ZERO_PAGE.length));
    if (!part.equals(ZERO_PAGE.subarray(0, part.length))) return false;
  }
  return true;
}

const zeroHashes = new Map<number, Buffer>();
function zeroHash(length: number): Buffer {
  let h = zeroHashes.get(length);
  if (!h) zeroHashes.set(length, (h = sha256(Buffer.alloc(length))));
  return h;
}
