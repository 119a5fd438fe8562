/**
 * A qcow2 image served as the raw disk it describes: a RemoteSource decorator over the
 * source of the .qcow2 file (an HttpSource), so a host boots a qcow2 cloud image through
 * the agent without anything being converted first, and the local target ends as the
 * raw disk.
 *
 * What is read, and when:
 *   open   the header (the first 4 KiB; the rest of the first cluster only if the header
 *          extensions run past it) and the whole active L1 table. Everything the agent
 *          cannot serve is refused here, before a byte is exported: a backing file,
 *          encryption, an external data file, extended L2 entries, zstd compression,
 *          an image marked corrupt, and any incompatible feature bit this file does not
 *          know (named from the image's feature name table when it has one).
 *   read   the L2 tables covering the range (fetched on demand, shared between
 *          concurrent reads, kept in an LRU bounded by `l2CacheBytes`), then a plan in
 *          virtual order:
 *            unallocated and zero clusters  filled with zeros, nothing fetched;
 *            standard clusters              host-contiguous runs merged into one piece;
 *            compressed clusters            one piece each, its extent inflated (raw
 *                                           deflate, on the thread pool) to a cluster.
 *          Pieces whose host bytes adjoin or overlap (qemu-img lays an image out in virtual
 *          order; compressed extents are packed byte by byte) are fetched by one inner
 *          read. A lone standard run is read straight into the caller's buffer, with no
 *          copy; a mixed group lands in a scratch buffer, and each piece is copied out or
 *          inflated as soon as its bytes have arrived.
 *          Refcounts, snapshots and bitmaps are never read: reading needs none of them.
 *
 * `onProgress` keeps the RemoteSource promise (the leading bytes of `dest` are final):
 * pieces complete out of order, and the reported count advances only over the prefix of
 * pieces that are done, plus the bytes landed so far in the first one that is not.
 *
 * A compressed extent is (stored sectors × 512 − the offset's position in its sector),
 * which may run into the next cluster's bytes or past the end of the file: reads are
 * clamped to the file, and deflate ignores what follows its stream's end. A compressed
 * cluster that a read boundary cuts (regions smaller than clusters) is kept inflated in a
 * small cache so that the neighbouring read does not fetch it again.
 */
import zlib from 'node:zlib';
import type { Logger } from 'pino';
import { DpuError } from './errors.js';
import { settleAll } from '../../common/src/deferred.js';
import type { FetchPriority, RemoteReadOptions, RemoteSource, RemoteSourceStats } from './source.js';

export const QCOW2_MAGIC = 0x514649fb; // "QFI\xfb"

export interface Qcow2SourceOptions {
  /** Memory for cached L2 tables (each one cluster); at least two tables are kept. @default 8 MiB */
  l2CacheBytes?: number;
  /** Memory for inflated compressed clusters that a read boundary cut. @default 4 MiB */
  inflatedCacheBytes?: number;
  /** Compressed clusters inflated at once (on libuv's thread pool). @default 4 */
  inflateConcurrency?: number;
  /** The first bytes of the file, when the caller already has them (format sniffing). */
  head?: Buffer;
  log?: Logger;
}

const DEFAULTS = {
  l2CacheBytes: 8 << 20,
  inflatedCacheBytes: 4 << 20,
  inflateConcurrency: 4,
};

/** The first read at open; most headers with their extensions fit. */
const HEAD_BYTES = 4096;
const V2_HEADER_LENGTH = 72;
const V3_MIN_HEADER_LENGTH = 104;
/** QEMU's own bound (QCOW_MAX_L1_SIZE). */
const MAX_L1_BYTES = 32 << 20;
const SECTOR = 512;

const EXT_END = 0;
const EXT_BACKING_FORMAT = 0xe2792aca;
const EXT_FEATURE_NAMES = 0x6803f857;
const EXT_CRYPTO = 0x0537be77;
const EXT_DATA_FILE = 0x44415441;

/** Incompatible feature bits (header offset 72, v3). */
const INCOMPAT_DIRTY = 0;
const INCOMPAT_CORRUPT = 1;
const INCOMPAT_DATA_FILE = 2;
const INCOMPAT_COMPRESSION = 3;
const INCOMPAT_EXTL2 = 4;
const KNOWN_INCOMPAT_NAMES: Record<number, string> = {
  [INCOMPAT_DIRTY]: 'dirty',
  [INCOMPAT_CORRUPT]: 'corrupt',
  [INCOMPAT_DATA_FILE]: 'external data file',
  [INCOMPAT_COMPRESSION]: 'compression type',
  [INCOMPAT_EXTL2]: 'extended L2 entries',
};

const COMPRESSION_NAMES = ['zlib', 'zstd'];
const CRYPT_NAMES = ['none', 'AES', 'LUKS'];

/** What the header says, parsed but not yet judged (see `unsupportedFeature`). */
export interface Qcow2Header {
  version: 2 | 3;
  clusterBits: number;
  clusterSize: number;
  /** Virtual disk size in bytes. */
  size: number;
  cryptMethod: number;
  l1Size: number;
  l1Offset: number;
  nbSnapshots: number;
  /** Incompatible feature bits, as a bit list (they may reach bit 63). */
  incompatibleBits: number[];
  headerLength: number;
  /** 0 zlib, 1 zstd (v3 with header_length > 104, else 0). */
  compressionType: number;
  backingFile: string | null;
  backingFormat: string | null;
  dataFile: string | null;
  hasCryptoHeader: boolean;
  /** Feature names the image itself declares: `incompatible:5` → name. */
  featureNames: Map<string, string>;
}

/** A region of the virtual disk that reads as zeros without any fetch. */
export interface ZeroRange {
  offset: number;
  length: number;
}

/**
 * Parses the header and its extensions from the file's first bytes. Throws
 * DPU_ERR_IMAGE_CORRUPT on a malformed header; returns `{ need }` when `buf` stops before
 * the extensions or the backing file name end (they lie within the first cluster).
 */
export function parseQcow2Header(buf: Buffer): Qcow2Header | { need: number } {
  if (buf.length < V2_HEADER_LENGTH) {
    throw corrupt(`the file is ${buf.length} bytes, shorter than a qcow2 header`);
  }
  const magic = buf.readUInt32BE(0);
  if (magic !== QCOW2_MAGIC) {
    throw corrupt(`not a qcow2 image (magic 0x${magic.toString(16).padStart(8, '0')}, expected 0x514649fb "QFI\\xfb"); give format raw for a raw image, or auto to detect it`);
  }
  const version = buf.readUInt32BE(4);
  if (version !== 2 && version !== 3) {
    throw new DpuError('DPU_ERR_IMAGE_UNSUPPORTED', `qcow2 version ${version}: the agent reads versions 2 and 3; convert it with "qemu-img convert -O qcow2 -o compat=1.1"`);
  }
  const clusterBits = buf.readUInt32BE(20);
  if (clusterBits < 9 || clusterBits > 21) throw corrupt(`cluster_bits ${clusterBits} is outside 9..21`);
  const clusterSize = 2 ** clusterBits;
  const headerLength = version === 2 ? V2_HEADER_LENGTH : buf.readUInt32BE(100);
  if (version === 3 && (headerLength < V3_MIN_HEADER_LENGTH || headerLength % 8 !== 0 || headerLength > clusterSize)) {
    throw corrupt(`header_length ${headerLength} is not a multiple of 8 between ${V3_MIN_HEADER_LENGTH} and the cluster size`);
  }
  if (buf.length < headerLength + 8) return { need: Math.min(clusterSize, headerLength + HEAD_BYTES) };
  const incompatibleBits: number[] = [];
  if (version === 3) {
    const hi = buf.readUInt32BE(72);
    const lo = buf.readUInt32BE(76);
    for (let b = 0; b < 32; b++) {
      if (lo & (1 << b)) incompatibleBits.push(b);
      if (hi & (1 << b)) incompatibleBits.push(b + 32);
    }
    incompatibleBits.sort((a, b) => a - b);
  }
  const h: Qcow2Header = {
    version,
    clusterBits,
    clusterSize,
    size: u64(buf, 24, 'size'),
    cryptMethod: buf.readUInt32BE(32),
    l1Size: buf.readUInt32BE(36),
    l1Offset: u64(buf, 40, 'l1_table_offset'),
    nbSnapshots: buf.readUInt32BE(60),
    incompatibleBits,
    headerLength,
    compressionType: version === 3 && headerLength > V3_MIN_HEADER_LENGTH ? buf.readUInt8(104) : 0,
    backingFile: null,
    backingFormat: null,
    dataFile: null,
    hasCryptoHeader: false,
    featureNames: new Map(),
  };

  // Header extensions: (type u32, length u32, data padded to 8) until type 0.
  let at = headerLength;
  for (;;) {
    if (at + 8 > clusterSize) throw corrupt('the header extensions run past the first cluster');
    if (at + 8 > buf.length) return { need: Math.min(clusterSize, at + HEAD_BYTES) };
    const type = buf.readUInt32BE(at);
    const len = buf.readUInt32BE(at + 4);
    if (type === EXT_END) break;
    const data = at + 8;
    const next = data + Math.ceil(len / 8) * 8;
    if (data + len > clusterSize) throw corrupt(`header extension 0x${type.toString(16)} runs past the first cluster`);
    if (data + len > buf.length) return { need: Math.min(clusterSize, next + HEAD_BYTES) };
    const body = buf.subarray(data, data + len);
    switch (type) {
      case EXT_BACKING_FORMAT:
        h.backingFormat = body.toString('utf8');
        break;
      case EXT_DATA_FILE:
        h.dataFile = body.toString('utf8');
        break;
      case EXT_CRYPTO:
        h.hasCryptoHeader = true;
        break;
      case EXT_FEATURE_NAMES:
        for (let i = 0; i + 48 <= body.length; i += 48) {
          const kind = ['incompatible', 'compatible', 'autoclear'][body[i]!] ?? `type${body[i]}`;
          const name = body.subarray(i + 2, i + 48).toString('utf8').replace(/\0.*$/s, '');
          h.featureNames.set(`${kind}:${body[i + 1]}`, name);
        }
        break;
      default:
        break; // unknown extensions are optional by definition
    }
    at = next;
  }

  const backingOffset = u64(buf, 8, 'backing_file_offset');
  if (backingOffset !== 0) {
    const backingSize = buf.readUInt32BE(16);
    if (backingSize > 1023 || backingOffset + backingSize > clusterSize) {
      h.backingFile = '(name not readable)';
    } else if (backingOffset + backingSize > buf.length) {
      return { need: Math.min(clusterSize, backingOffset + backingSize) };
    } else {
      h.backingFile = buf.subarray(backingOffset, backingOffset + backingSize).toString('utf8');
    }
  }
  return h;
}

/**
 * The first reason the agent cannot serve this image, as an error that says what to do;
 * null when it can.
 */
export function unsupportedFeature(h: Qcow2Header): DpuError | null {
  const unsupported = (what: string): DpuError => new DpuError('DPU_ERR_IMAGE_UNSUPPORTED', what);
  if (h.backingFile !== null) {
    return unsupported(
      `the qcow2 image has a backing file ("${h.backingFile}"${h.backingFormat ? `, ${h.backingFormat}` : ''}); the agent serves standalone images only. Flatten it first: "qemu-img convert -O qcow2 image.qcow2 flat.qcow2"`,
    );
  }
  if (h.cryptMethod !== 0 || h.hasCryptoHeader) {
    return unsupported(
      `the qcow2 image is encrypted (${CRYPT_NAMES[h.cryptMethod] ?? `method ${h.cryptMethod}`}); the agent cannot decrypt it. Upload an unencrypted image (decrypt with "qemu-img convert --object secret,… --image-opts … -O qcow2") and rely on disk encryption in the instance instead`,
    );
  }
  const bits = h.incompatibleBits;
  if (bits.includes(INCOMPAT_DATA_FILE) || h.dataFile !== null) {
    return unsupported(
      `the qcow2 image keeps its data in an external data file${h.dataFile ? ` ("${h.dataFile}")` : ''}; the agent reads self-contained images only. Convert it: "qemu-img convert -O qcow2 image.qcow2 self-contained.qcow2"`,
    );
  }
  if (bits.includes(INCOMPAT_CORRUPT)) {
    return unsupported('the qcow2 image is marked corrupt by QEMU; repair it with "qemu-img check -r all" (or convert it) and upload it again');
  }
  // The compression-type bit with type 0 (zlib) is harmless; any other type is not.
  if (h.compressionType !== 0) {
    const name = COMPRESSION_NAMES[h.compressionType] ?? `compression type ${h.compressionType}`;
    return unsupported(`the qcow2 image compresses clusters with ${name}; the agent inflates zlib only. Convert it: "qemu-img convert -c -O qcow2 -o compression_type=zlib image.qcow2 zlib.qcow2"`);
  }
  if (bits.includes(INCOMPAT_EXTL2)) {
    return unsupported('the qcow2 image uses extended L2 entries (subclusters); the agent reads standard L2 entries only. Convert it: "qemu-img convert -O qcow2 -o extended_l2=off image.qcow2 plain.qcow2"');
  }
  const unknown = bits.filter((b) => !(b in KNOWN_INCOMPAT_NAMES));
  if (unknown.length) {
    const named = unknown.map((b) => `bit ${b}${h.featureNames.has(`incompatible:${b}`) ? ` ("${h.featureNames.get(`incompatible:${b}`)}")` : ''}`);
    return unsupported(`the qcow2 image sets incompatible feature ${named.join(', ')}, which this agent does not know; convert it with this QEMU's "qemu-img convert -O qcow2 -o compat=1.1"`);
  }
  return null;
}

/** Whether a file starts with the qcow2 magic. */
export function isQcow2(head: Buffer): boolean {
  return head.length >= 4 && head.readUInt32BE(0) === QCOW2_MAGIC;
}

/** Reads the first bytes of a source (format sniffing); one request. */
export async function readHead(inner: RemoteSource): Promise<Buffer> {
  const head = Buffer.allocUnsafe(Math.min(HEAD_BYTES, inner.size));
  await inner.read(0, head, { priority: 'foreground' });
  return head;
}

type Piece =
  | { kind: 'zero'; at: number; len: number }
  | { kind: 'data'; at: number; len: number; host: number }
  | { kind: 'compressed'; at: number; len: number; host: number; extentEnd: number; skip: number; cut: boolean; vcluster: number }
  | { kind: 'inflated'; at: number; len: number; data: Buffer; skip: number };

export class Qcow2Source implements RemoteSource {
  readonly size: number;
  readonly identity: string;
  readonly description: string;
  readonly header: Qcow2Header;
  private readonly inner: RemoteSource;
  private readonly opts: typeof DEFAULTS & Qcow2SourceOptions;
  private readonly clusterSize: number;
  /** log2 of the entries per L2 table. */
  private readonly l2Bits: number;
  private readonly csizeShiftHi: number;
  private readonly csizeMask: number;
  private readonly coffMaskHi: number;
  /** Host offsets of the L2 tables; 0 where none is allocated. */
  private readonly l1: Float64Array;
  /** LRU by insertion order: a hit is moved to the end, eviction takes from the front. */
  private readonly l2Cache = new Map<number, Buffer>();
  /** L2 tables being fetched, and in which class (a host read does not wait on a background one). */
  private readonly l2Pending = new Map<number, { table: Promise<Buffer>; priority: FetchPriority }>();
  private readonly l2CacheMax: number;
  /** Inflated clusters a read boundary cut, by host offset (same LRU discipline). */
  private readonly inflatedCache = new Map<number, Buffer>();
  private inflatedBytes = 0;
  private inflating = 0;
  private readonly inflateWaiters: (() => void)[] = [];
  private closed = false;

  private constructor(inner: RemoteSource, header: Qcow2Header, l1: Float64Array, opts: typeof DEFAULTS & Qcow2SourceOptions) {
    this.inner = inner;
    this.header = header;
    this.opts = opts;
    this.l1 = l1;
    this.size = header.size;
    this.identity = `${inner.identity};qcow2`;
    this.description = `${inner.description} (qcow2 v${header.version})`;
    this.clusterSize = header.clusterSize;
    this.l2Bits = header.clusterBits - 3;
    // Compressed descriptor: host offset in bits 0..x-1, (sectors − 1) in bits x..61,
    // x = 62 − (cluster_bits − 8); x ≥ 49, so both fields split at the high word.
    const x = 62 - (header.clusterBits - 8);
    this.csizeShiftHi = x - 32;
    this.csizeMask = 2 ** (header.clusterBits - 8) - 1;
    this.coffMaskHi = 2 ** (x - 32) - 1;
    this.l2CacheMax = Math.max(opts.l2CacheBytes, 2 * header.clusterSize);
  }

  /** Reads and checks the header and the L1 table; refuses what cannot be served. */
  static async open(inner: RemoteSource, options: Qcow2SourceOptions = {}): Promise<Qcow2Source> {
    const opts = { ...DEFAULTS, ...options };
    let buf = opts.head && opts.head.length >= Math.min(HEAD_BYTES, inner.size) ? opts.head : await readHead(inner);
    let parsed = parseQcow2Header(buf);
    while ('need' in parsed) {
      if (parsed.need <= buf.length || parsed.need > inner.size) throw corrupt(`the header needs ${parsed.need} bytes; the file has ${inner.size}`);
      buf = Buffer.allocUnsafe(parsed.need);
      await inner.read(0, buf, { priority: 'foreground' });
      parsed = parseQcow2Header(buf);
    }
    const h = parsed;
    const refusal = unsupportedFeature(h);
    if (refusal) throw refusal;
    if (h.size <= 0) throw corrupt('the virtual size is 0');
    const l2Span = h.clusterSize * (h.clusterSize / 8);
    const l1Needed = Math.ceil(h.size / l2Span);
    if (h.l1Size < l1Needed) throw corrupt(`the L1 table has ${h.l1Size} entries; a ${h.size}-byte disk needs ${l1Needed}`);
    if (h.l1Size * 8 > MAX_L1_BYTES) throw corrupt(`the L1 table is ${h.l1Size * 8} bytes, over QEMU's ${MAX_L1_BYTES}-byte limit`);
    if (h.l1Offset % h.clusterSize !== 0 || h.l1Offset + l1Needed * 8 > inner.size) {
      throw corrupt(`the L1 table at ${h.l1Offset} is unaligned or outside the ${inner.size}-byte file`);
    }
    // Only the entries that cover the virtual disk are read; QEMU may allocate more.
    const raw = Buffer.allocUnsafe(l1Needed * 8);
    await inner.read(h.l1Offset, raw, { priority: 'foreground' });
    const l1 = new Float64Array(l1Needed);
    for (let i = 0; i < l1Needed; i++) {
      const offset = (raw.readUInt32BE(i * 8) & 0x00ffffff) * 2 ** 32 + ((raw.readUInt32BE(i * 8 + 4) & 0xfffffe00) >>> 0);
      if (offset !== 0 && (offset % h.clusterSize !== 0 || offset >= inner.size)) {
        throw corrupt(`L1 entry ${i} points to an L2 table at ${offset}, unaligned or outside the ${inner.size}-byte file`);
      }
      l1[i] = offset;
    }
    const src = new Qcow2Source(inner, h, l1, opts);
    opts.log?.info(
      { version: h.version, virtualSize: h.size, clusterSize: h.clusterSize, fileSize: inner.size, l1Entries: l1Needed, snapshots: h.nbSnapshots, dirty: h.incompatibleBits.includes(INCOMPAT_DIRTY) },
      'qcow2 image opened',
    );
    return src;
  }

  asBackground<T>(request: () => Promise<T>): Promise<T> {
    return this.inner.asBackground ? this.inner.asBackground(request) : request();
  }

  stats(): RemoteSourceStats {
    return this.inner.stats();
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.l2Cache.clear();
    this.inflatedCache.clear();
    await this.inner.close();
  }

  async read(offset: number, dest: Buffer, opts: RemoteReadOptions): Promise<void> {
    if (offset < 0 || offset + dest.length > this.size) {
      throw new DpuError('DPU_ERR_OUT_OF_RANGE', `range ${offset}+${dest.length} is outside the ${this.size}-byte virtual disk`);
    }
    if (this.closed) throw new DpuError('DPU_ERR_SOURCE_CLOSED');
    if (dest.length === 0) return;
    const firstCluster = Math.floor(offset / this.clusterSize);
    const lastCluster = Math.floor((offset + dest.length - 1) / this.clusterSize);
    const firstTable = Math.floor(firstCluster / 2 ** this.l2Bits);
    const lastTable = Math.floor(lastCluster / 2 ** this.l2Bits);
    const tables: (Buffer | null)[] = [];
    const waits: Promise<void>[] = [];
    for (let t = firstTable; t <= lastTable; t++) {
      const i = t - firstTable;
      const hit = this.l2Table(t, opts.priority);
      if (hit instanceof Promise) {
        tables.push(null);
        waits.push(hit.then((b) => void (tables[i] = b)));
      } else tables.push(hit);
    }
    await Promise.all(waits);
    const pieces = this.plan(offset, dest.length, firstTable, tables);
    await this.execute(pieces, dest, opts);
  }

  /**
   * Virtual byte ranges that read as zeros without a fetch (unallocated and zero
   * clusters, merged). Reads every allocated L2 table once (through the cache), in the
   * background class.
   */
  async zeroRanges(): Promise<ZeroRange[]> {
    const out: ZeroRange[] = [];
    const push = (offset: number, length: number): void => {
      const end = Math.min(offset + length, this.size);
      if (end <= offset) return;
      const last = out[out.length - 1];
      if (last && last.offset + last.length === offset) last.length = end - last.offset;
      else out.push({ offset, length: end - offset });
    };
    const entries = 2 ** this.l2Bits;
    const span = entries * this.clusterSize;
    for (let t = 0; t < this.l1.length; t++) {
      if (this.l1[t] === 0) {
        push(t * span, span);
        continue;
      }
      const hit = this.l2Table(t, 'background');
      const table = hit instanceof Promise ? await hit : hit!;
      for (let e = 0; e < entries; e++) {
        const v = t * span + e * this.clusterSize;
        if (v >= this.size) break;
        const hi = table.readUInt32BE(e * 8);
        const lo = table.readUInt32BE(e * 8 + 4);
        if (hi & 0x40000000) continue; // compressed
        if (lo & 1 || ((hi & 0x00ffffff) === 0 && (lo & 0xfffffe00) === 0)) push(v, this.clusterSize);
      }
    }
    return out;
  }

  // ---- L2 tables ---------------------------------------------------------------------

  /** The L2 table for L1 index `t` (null: none allocated, all zeros), cached or fetched. */
  private l2Table(t: number, priority: FetchPriority): Buffer | null | Promise<Buffer> {
    const host = this.l1[t]!;
    if (host === 0) return null;
    const hit = this.l2Cache.get(t);
    if (hit) {
      this.l2Cache.delete(t);
      this.l2Cache.set(t, hit);
      return hit;
    }
    // A host read that finds the table on its way in the background class fetches it
    // itself, in the foreground: the source may hold background requests back while the
    // host reads (priority inversion otherwise). One cluster fetched twice, at most.
    const pending = this.l2Pending.get(t);
    if (pending && (pending.priority === 'foreground' || priority === 'background')) return pending.table;
    const buf = Buffer.allocUnsafe(this.clusterSize);
    // A file may end inside its last cluster; QEMU reads what lies past the end as zeros.
    const avail = Math.min(this.clusterSize, this.inner.size - host);
    buf.fill(0, avail);
    const entry = {
      priority,
      table: this.inner
        .read(host, buf.subarray(0, avail), { priority })
        .then(() => {
          if (!this.closed && !this.l2Cache.has(t)) {
            this.l2Cache.set(t, buf);
            while (this.l2Cache.size * this.clusterSize > this.l2CacheMax) this.l2Cache.delete(this.l2Cache.keys().next().value!);
          }
          return buf;
        })
        .finally(() => {
          if (this.l2Pending.get(t) === entry) this.l2Pending.delete(t);
        }),
    };
    this.l2Pending.set(t, entry);
    return entry.table;
  }

  // ---- planning ----------------------------------------------------------------------

  /** Maps [offset, offset+length) to pieces in virtual order, adjacent ones merged. */
  private plan(offset: number, length: number, firstTable: number, tables: (Buffer | null)[]): Piece[] {
    const cs = this.clusterSize;
    const fileSize = this.inner.size;
    const entries = 2 ** this.l2Bits;
    const pieces: Piece[] = [];
    let pos = offset;
    const end = offset + length;
    while (pos < end) {
      const vcluster = Math.floor(pos / cs);
      const skip = pos - vcluster * cs;
      const len = Math.min(cs - skip, end - pos);
      const at = pos - offset;
      const table = tables[Math.floor(vcluster / entries) - firstTable]!;
      pos += len;
      if (table === null) {
        this.push(pieces, { kind: 'zero', at, len });
        continue;
      }
      const e = (vcluster % entries) * 8;
      const hi = table.readUInt32BE(e);
      const lo = table.readUInt32BE(e + 4);
      if (hi & 0x40000000) {
        // Compressed: bits 0..x-1 host offset, bits x..61 additional 512-byte sectors.
        const host = (hi & this.coffMaskHi) * 2 ** 32 + lo;
        const sectors = ((hi >>> this.csizeShiftHi) & this.csizeMask) + 1;
        const extentEnd = Math.min(host + sectors * SECTOR - (host % SECTOR), fileSize);
        if (host >= fileSize) throw corrupt(`compressed cluster at virtual ${vcluster * cs} points to ${host}, outside the ${fileSize}-byte file`);
        const cached = this.inflatedCache.get(host);
        if (cached) {
          this.push(pieces, { kind: 'inflated', at, len, data: cached, skip });
          continue;
        }
        this.push(pieces, { kind: 'compressed', at, len, host, extentEnd, skip, cut: len < cs && vcluster * cs + cs <= this.size, vcluster });
        continue;
      }
      const host = (hi & 0x00ffffff) * 2 ** 32 + ((lo & 0xfffffe00) >>> 0);
      if (lo & 1 || host === 0) {
        this.push(pieces, { kind: 'zero', at, len }); // zero flag, or unallocated
        continue;
      }
      if (host % cs !== 0 || host >= fileSize) {
        throw corrupt(`cluster at virtual ${vcluster * cs} points to ${host}, unaligned or outside the ${fileSize}-byte file`);
      }
      // A file may end inside its last cluster; QEMU reads what lies past the end as zeros.
      const avail = Math.max(0, Math.min(len, fileSize - (host + skip)));
      if (avail > 0) this.push(pieces, { kind: 'data', at, len: avail, host: host + skip });
      if (avail < len) this.push(pieces, { kind: 'zero', at: at + avail, len: len - avail });
    }
    return pieces;
  }

  private push(pieces: Piece[], p: Piece): void {
    const last = pieces[pieces.length - 1];
    if (last && last.at + last.len === p.at) {
      if (last.kind === 'zero' && p.kind === 'zero') {
        last.len += p.len;
        return;
      }
      if (last.kind === 'data' && p.kind === 'data' && last.host + last.len === p.host) {
        last.len += p.len;
        return;
      }
    }
    pieces.push(p);
  }

  // ---- execution ---------------------------------------------------------------------

  private async execute(pieces: Piece[], dest: Buffer, opts: RemoteReadOptions): Promise<void> {
    const n = pieces.length;
    const done = new Uint8Array(n);
    /** Bytes landed in each data piece so far. */
    const partial = new Float64Array(n);
    let lead = 0;
    let reported = 0;
    const report = (): void => {
      while (lead < n && done[lead]) lead++;
      const filled = lead < n ? pieces[lead]!.at + partial[lead]! : dest.length;
      if (filled > reported) {
        reported = filled;
        opts.onProgress?.(filled);
      }
    };
    const finish = (i: number): void => {
      done[i] = 1;
      if (i === lead) report();
    };

    const tasks: Promise<void>[] = [];
    const grouped = new Uint8Array(n);
    for (let i = 0; i < n; i++) {
      const p = pieces[i]!;
      switch (p.kind) {
        case 'zero':
          dest.fill(0, p.at, p.at + p.len);
          finish(i);
          break;
        case 'inflated':
          p.data.copy(dest, p.at, p.skip, p.skip + p.len);
          finish(i);
          break;
        case 'data':
        case 'compressed': {
          if (grouped[i]) break;
          // Later pieces whose host bytes start inside or right after this group's join
          // it, across zero pieces: compressed clusters are packed byte by byte, and
          // qemu-img lays clusters out in virtual order, compressed or not.
          const members = [i];
          const start = p.host;
          let end = hostEnd(p);
          for (let j = i + 1; j < n; j++) {
            const q = pieces[j]!;
            if (q.kind === 'zero' || q.kind === 'inflated') continue;
            if (q.host < start || q.host > end) break;
            end = Math.max(end, hostEnd(q));
            members.push(j);
            grouped[j] = 1;
          }
          if (members.length === 1 && p.kind === 'data') {
            // The common case (a plain image, host order = virtual order): no copy at all.
            const onProgress = (f: number): void => {
              partial[i] = f;
              if (i === lead) report();
            };
            tasks.push(this.inner.read(p.host, dest.subarray(p.at, p.at + p.len), { priority: opts.priority, onProgress }).then(() => finish(i)));
          } else {
            tasks.push(this.fetchGroup(pieces, members, start, end, dest, opts.priority, finish));
          }
          break;
        }
      }
    }
    await settleAll(tasks);
    report();
  }

  /**
   * One inner read of a host range holding several pieces; each piece is copied out (or
   * inflated) as soon as its bytes have landed.
   */
  private async fetchGroup(
    pieces: Piece[],
    members: number[],
    start: number,
    end: number,
    dest: Buffer,
    priority: FetchPriority,
    finish: (i: number) => void,
  ): Promise<void> {
    const scratch = Buffer.allocUnsafe(end - start);
    const inflations: Promise<void>[] = [];
    let next = 0;
    const startReady = (filled: number): void => {
      while (next < members.length) {
        const index = members[next]!;
        const p = pieces[index] as Extract<Piece, { kind: 'data' | 'compressed' }>;
        if (hostEnd(p) - start > filled) return;
        next++;
        if (p.kind === 'data') {
          scratch.copy(dest, p.at, p.host - start, p.host - start + p.len);
          finish(index);
          continue;
        }
        inflations.push(
          this.inflateCluster(scratch.subarray(p.host - start, p.extentEnd - start), p).then((cluster) => {
            cluster.copy(dest, p.at, p.skip, p.skip + p.len);
            if (p.cut) this.keepInflated(p.host, cluster);
            finish(index);
          }),
        );
      }
    };
    let readError: unknown = null;
    try {
      await this.inner.read(start, scratch, { priority, onProgress: startReady });
      startReady(scratch.length);
    } catch (err) {
      readError = err;
    }
    // Nothing may still write into `dest` once this settles: wait for the inflations.
    await settleAll(inflations);
    if (readError) throw readError;
  }

  private async inflateCluster(compressed: Buffer, p: Extract<Piece, { kind: 'compressed' }>): Promise<Buffer> {
    // A released slot is handed straight to the next waiter, so the bound holds.
    if (this.inflating < this.opts.inflateConcurrency) this.inflating++;
    else await new Promise<void>((resolve) => this.inflateWaiters.push(resolve));
    try {
      const out = await new Promise<Buffer>((resolve, reject) =>
        zlib.inflateRaw(compressed, { finishFlush: zlib.constants.Z_SYNC_FLUSH, maxOutputLength: this.clusterSize }, (err, res) => (err ? reject(err) : resolve(res))),
      );
      // QEMU compresses whole clusters (the last one zero-padded): anything else is damage.
      if (out.length !== this.clusterSize) throw new Error(`inflates to ${out.length} bytes, not ${this.clusterSize}`);
      return out;
    } catch (err) {
      throw corrupt(`compressed cluster at virtual ${p.vcluster * this.clusterSize} (file offset ${p.host}): ${(err as Error).message}`, err);
    } finally {
      const next = this.inflateWaiters.shift();
      if (next) next();
      else this.inflating--;
    }
  }

  private keepInflated(host: number, cluster: Buffer): void {
    if (this.closed || this.opts.inflatedCacheBytes < this.clusterSize || this.inflatedCache.has(host)) return;
    this.inflatedCache.set(host, cluster);
    this.inflatedBytes += cluster.length;
    while (this.inflatedBytes > this.opts.inflatedCacheBytes) {
      const [k, v] = this.inflatedCache.entries().next().value!;
      this.inflatedCache.delete(k);
      this.inflatedBytes -= v.length;
    }
  }
}

function hostEnd(p: Extract<Piece, { kind: 'data' | 'compressed' }>): number {
  return p.kind === 'data' ? p.host + p.len : p.extentEnd;
}

function u64(buf: Buffer, at: number, field: string): number {
  const hi = buf.readUInt32BE(at);
  const v = hi * 2 ** 32 + buf.readUInt32BE(at + 4);
  if (!Number.isSafeInteger(v)) throw corrupt(`${field} ${buf.readBigUInt64BE(at)} is beyond 2^53`);
  return v;
}

function corrupt(detail: string, cause?: unknown): DpuError {
  return new DpuError('DPU_ERR_IMAGE_CORRUPT', detail, cause ? { cause } : undefined);
}
