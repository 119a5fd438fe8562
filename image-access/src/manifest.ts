/**
 * The image manifest: per region, the SHA-256 of its bytes and whether it is all zeros;
 * for the whole image, the digest Glance records (`os_hash_algo`/`os_hash_value`, sha512
 * by default). Built once per image and region size by reading the image through any
 * RemoteSource (so a qcow2 image is hashed as the raw disk it describes), then used by
 * every streaming disk of that image to verify each region it fetches and to skip
 * fetching zero regions.
 *
 * Binary format, little-endian:
 *    0  magic "SNICMANI"           8
 *    8  format version u32         4   (1)
 *   12  region shift u32           4
 *   16  image size u64             8
 *   24  region count u32           4
 *   28  image hash algo           16   (ASCII, NUL-padded: "sha512")
 *   44  image hash length u32      4
 *   48  image hash                64   (first `length` bytes used)
 *  112  region SHA-256s           32 × count
 *   …   zero bitmap                ceil(count / 8)
 *   …   SHA-256 of everything above, 32 — the manifest checks itself
 */
import { createHash } from 'node:crypto';
import { DpuError } from './errors.js';
import type { RemoteSource } from './source.js';

const MAGIC = Buffer.from('SNICMANI', 'ascii');
const VERSION = 1;
const HEADER = 112;

export class Manifest {
  private constructor(
    readonly size: number,
    readonly regionSize: number,
    readonly count: number,
    readonly imageHashAlgo: string,
    readonly imageHash: Buffer,
    private readonly hashes: Buffer,
    private readonly zeros: Buffer,
    /**
     * Where the image's bytes end, when this manifest describes a disk larger than its
     * image (see padTo): beyond, the disk holds zeros, and a region that straddles it is
     * checked as the image's bytes followed by zeros.
     */
    readonly imageSize: number = size,
  ) {}

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
    const empty = zeroHash(0);
    for (let r = this.count; r < count; r++) {
      zeros[r >> 3]! |= 1 << (r & 7);
      empty.copy(hashes, r * 32);
    }
    return new Manifest(diskSize, this.regionSize, count, this.imageHashAlgo, this.imageHash, hashes, zeros, this.size);
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
    const start = r * this.regionSize;
    let image = data;
    if (start + data.length > this.imageSize) {
      image = data.subarray(0, Math.max(0, this.imageSize - start));
      if (!isAllZero(data.subarray(image.length))) return false;
    }
    return createHash('sha256').update(image).digest().equals(this.hashes.subarray(r * 32, r * 32 + 32));
  }

  /** The manifest as `build` made it (a padded one encodes as the image's: see padTo). */
  encode(): Buffer {
    if (this.imageSize !== this.size) throw new Error('encode the image\'s manifest, not one padded to a disk');
    const body = Buffer.alloc(HEADER + this.count * 32 + this.zeros.length);
    MAGIC.copy(body, 0);
    body.writeUInt32LE(VERSION, 8);
    body.writeUInt32LE(Math.log2(this.regionSize), 12);
    body.writeBigUInt64LE(BigInt(this.size), 16);
    body.writeUInt32LE(this.count, 24);
    body.write(this.imageHashAlgo, 28, 16, 'ascii');
    body.writeUInt32LE(this.imageHash.length, 44);
    this.imageHash.copy(body, 48);
    this.hashes.copy(body, HEADER);
    this.zeros.copy(body, HEADER + this.count * 32);
    return Buffer.concat([body, createHash('sha256').update(body).digest()]);
  }

  static decode(buf: Buffer): Manifest {
    const bad = (why: string): DpuError => new DpuError('DPU_ERR_MANIFEST_INVALID', `${why}; rebuild the manifest from the image`);
    if (buf.length < HEADER + 32 || !buf.subarray(0, 8).equals(MAGIC)) throw bad('not a manifest (bad magic)');
    if (buf.readUInt32LE(8) !== VERSION) throw bad(`manifest format version ${buf.readUInt32LE(8)} is not ${VERSION}`);
    const body = buf.subarray(0, buf.length - 32);
    if (!createHash('sha256').update(body).digest().equals(buf.subarray(buf.length - 32))) throw bad('manifest checksum mismatch (damaged)');
    const shift = buf.readUInt32LE(12);
    const size = Number(buf.readBigUInt64LE(16));
    const count = buf.readUInt32LE(24);
    const regionSize = 2 ** shift;
    if (count !== Math.ceil(size / regionSize)) throw bad('region count does not match the image size');
    const zerosLen = Math.ceil(count / 8);
    if (body.length !== HEADER + count * 32 + zerosLen) throw bad('manifest length does not match its region count');
    const algo = buf.toString('ascii', 28, 44).replace(/\0+$/, '');
    const hashLen = buf.readUInt32LE(44);
    return new Manifest(size, regionSize, count, algo, Buffer.from(buf.subarray(48, 48 + hashLen)), Buffer.from(buf.subarray(HEADER, HEADER + count * 32)), Buffer.from(buf.subarray(HEADER + count * 32, HEADER + count * 32 + zerosLen)));
  }

  /**
   * Reads the whole image once, in order, through `source`, and records every region's
   * hash and zero-ness, and the image digest with `imageHashAlgo`. With `expectedImageHash`
   * (Glance's os_hash_value, hex), a different digest fails the build: a manifest is only
   * ever made from the image the cloud says it has.
   */
  static async build(source: RemoteSource, opts: { regionSize: number; imageHashAlgo?: string; expectedImageHash?: string; chunkBytes?: number; onProgress?: (done: number) => void }): Promise<Manifest> {
    const regionSize = opts.regionSize;
    const algo = opts.imageHashAlgo ?? 'sha512';
    const size = source.size;
    const count = Math.ceil(size / regionSize);
    const hashes = Buffer.alloc(count * 32);
    const zeros = Buffer.alloc(Math.ceil(count / 8));
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
        if (isAllZero(data)) {
          zeros[r >> 3]! |= 1 << (r & 7);
          // Every zero region of a length has the same hash: sparse images (most of a
          // 100 GiB disk) cost one zero check per region instead of a SHA-256.
          zeroHash(data.length).copy(hashes, r * 32);
        } else {
          createHash('sha256').update(data).digest().copy(hashes, r * 32);
        }
      }
      opts.onProgress?.(off + len);
    }
    const digest = whole.digest();
    if (opts.expectedImageHash && digest.toString('hex') !== opts.expectedImageHash.toLowerCase()) {
      throw new DpuError('DPU_ERR_MANIFEST_INVALID', `the image's ${algo} is ${digest.toString('hex').slice(0, 16)}…, not the expected ${opts.expectedImageHash.slice(0, 16)}…: the image at the source is not the one Glance describes`);
    }
    return new Manifest(size, regionSize, count, algo, digest, hashes, zeros);
  }
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
  if (!h) zeroHashes.set(length, (h = createHash('sha256').update(Buffer.alloc(length)).digest()));
  return h;
}
