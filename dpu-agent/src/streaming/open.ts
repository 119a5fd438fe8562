/**
 * Wiring: one place that composes a streaming disk from its parts — state directory
 * (lock + disk.json + region map), remote source, local target, disk and hydrator.
 *
 * disk.json records what the state directory is for (image size, identity, region size,
 * the source URL with secrets redacted). On a restart it is the geometry's source of
 * truth: a disk that has cut over reopens without contacting the origin at all, and a
 * disk mid-hydration refuses a source whose identity differs (another image must never be
 * mixed with this one's local regions).
 */
import fs from 'node:fs';
import path from 'node:path';
import type { Logger } from 'pino';
import { DpuError } from '../../../image-access/src/errors.js';
import { writeJsonAtomic } from '../local/atomic-file.js';
import { LocalTarget } from '../local/target.js';
import { RegionMap, RegionState } from '../region/region-map.js';
import { HttpSource, type HttpSourceOptions } from '../../../image-access/src/http-source.js';
import type { Manifest } from '../../../image-access/src/manifest.js';
import type { HashWorkers } from '../../../image-access/src/hash-workers.js';
import { decodeFormat, type ImageFormat } from '../../../image-access/src/open.js';
import { Qcow2Source } from '../../../image-access/src/qcow2.js';
import { PaddedSource } from '../../../image-access/src/padded.js';
import { redactUrl } from '../../../image-access/src/redact.js';
import type { RemoteSource } from '../../../image-access/src/source.js';
import { StreamingDisk } from './disk.js';
import { PeerFirstSource } from './peer-source.js';
import { Hydrator, type HydratorOptions } from './hydrator.js';

export { IMAGE_FORMATS, type ImageFormat } from '../../../image-access/src/open.js';

export const DEFAULT_REGION_SIZE = 1 << 20;


export interface OpenDiskOptions {
  source: Omit<HttpSourceOptions, 'log'>;
  /** @default 'raw' */
  format?: ImageFormat;
  targetPath: string;
  stateDir: string;
  /** @default 1 MiB, or what the state directory already uses */
  regionSize?: number;
  /**
   * The emulated disk's size, when it is larger than the image (a root disk of `root_gb`,
   * or the whole target device): the image at its start, zeros after it, never fetched
   * (see image-access/src/padded.ts). @default the image's size, or what the state directory records
   */
  diskSize?: number;
  hydrator?: Omit<HydratorOptions, 'log'>;
  commitIntervalMs?: number;
  /** Verify fetched regions against it and skip its zero regions (see image-access/src/manifest.ts). */
  manifest?: Manifest;
  /** The manifest's read-back of regions local before it came had not finished: run it again. */
  verifyLocalAtOpen?: boolean;
  /** Verify fetched regions on these worker threads (see StreamingDiskOptions.hashWorkers). */
  hashWorkers?: HashWorkers;
  /** PEM CA certificate(s) that https:// peers must chain to. @default the system's store */
  peerCa?: Buffer;
  log?: Logger;
}

export interface OpenedDisk {
  disk: StreamingDisk;
  hydrator: Hydrator;
  /** The HTTP origin beneath any format decoder, where a renewed URL goes; null when the disk opened complete. */
  origin: HttpSource | null;
  /** Where the peer list goes (peer agents are read before the origin); null when the disk opened complete. */
  peers: PeerFirstSource | null;
  /** Releases the state directory lock after closing everything. */
  close(): Promise<void>;
}

interface DiskRecord {
  version: 1;
  /** The disk's size. */
  size: number;
  /** The image's size, when the disk is larger (absent: the same as size). */
  imageSize?: number;
  regionSize: number;
  identity: string;
  source: string;
  /** What the source was read as (absent in records written before qcow2 support: raw). */
  format?: 'raw' | 'qcow2';
  target: string;
  createdAt: string;
}

/**
 * The region size a disk opened with `requested` in `stateDir` will have: the directory's,
 * once it holds a disk; else `requested`, else the default. Known before anything is opened
 * or created (stream --boot-profile checks a profile against it).
 */
export function plannedRegionSize(stateDir: string, requested?: number): number {
  return readRecord(path.join(stateDir, 'disk.json'))?.regionSize ?? requested ?? DEFAULT_REGION_SIZE;
}

export async function openStreamingDisk(opts: OpenDiskOptions): Promise<OpenedDisk> {
  const log = opts.log;
  fs.mkdirSync(opts.stateDir, { recursive: true, mode: 0o700 });
  const unlock = lockStateDir(opts.stateDir);
  let source: RemoteSource | null = null;
  let origin: HttpSource | null = null;
  let peers: PeerFirstSource | null = null;
  let target: LocalTarget | null = null;
  let map: RegionMap | null = null;
  try {
    const recordPath = path.join(opts.stateDir, 'disk.json');
    const record = readRecord(recordPath);
    if (record && opts.regionSize && opts.regionSize !== record.regionSize) {
      throw new DpuError('DPU_ERR_CONFIG', `${opts.stateDir} holds a disk with ${record.regionSize}-byte regions; drop --region-size ${opts.regionSize} or use a new --state directory`);
    }
    const regionSize = record?.regionSize ?? opts.regionSize ?? DEFAULT_REGION_SIZE;
    let size: number;
    let imageSize: number;
    let identity: string;
    let format: 'raw' | 'qcow2' = record?.format ?? 'raw';
    if (record && isComplete(opts.stateDir, record)) {
      // Cut over already: the origin is not needed, and not contacted.
      size = record.size;
      imageSize = record.imageSize ?? record.size;
      identity = record.identity;
      log?.info({ stateDir: opts.stateDir }, 'disk is complete: serving from the local target only');
    } else {
      source = origin = await HttpSource.open({ ...opts.source, ...(log ? { log } : {}) });
      // On failure the catch below closes the file's source; on success the decoder owns it.
      source = await decodeFormat(source, opts.format ?? 'raw', log);
      format = source instanceof Qcow2Source ? 'qcow2' : 'raw';
      imageSize = source.size;
      identity = source.identity;
      if (record && ((record.imageSize ?? record.size) !== imageSize || record.identity !== identity)) {
        throw new DpuError(
          'DPU_ERR_SOURCE_MISMATCH',
          `${opts.stateDir} was made for ${record.source} (${record.identity}); ${source.description} is ${identity}. Use a new --state directory for another image`,
        );
      }
      size = record?.size ?? opts.diskSize ?? imageSize;
      if (size < imageSize) {
        throw new DpuError('DPU_ERR_DISK_TOO_SMALL', `the disk would hold ${size} bytes, but the image is ${imageSize} bytes (${source.description}); give a disk size of at least the image's`, { field: 'size' });
      }
      // Background reads go to peer agents first once the disk is given some (setPeers).
      // Beneath the padding: peers serve the image's bytes, whatever their disks' sizes.
      source = peers = new PeerFirstSource(source, regionSize, log, opts.peerCa);
      if (size > imageSize) source = new PaddedSource(source, size);
    }
    if (record && opts.diskSize !== undefined && opts.diskSize !== record.size) {
      throw new DpuError('DPU_ERR_SOURCE_MISMATCH', `${opts.stateDir} holds a ${record.size}-byte disk, not ${opts.diskSize} bytes; use a new --state directory for another size`, { field: 'size' });
    }
    if (!record) {
      writeJsonAtomic(recordPath, {
        version: 1,
        size,
        ...(imageSize !== size ? { imageSize } : {}),
        regionSize,
        identity,
        source: redactUrl(opts.source.url),
        format,
        target: path.resolve(opts.targetPath),
        createdAt: new Date().toISOString(),
      } satisfies DiskRecord);
    }
    target = LocalTarget.open(opts.targetPath, { create: true, size });
    map = RegionMap.open(opts.stateDir, { diskSize: size, regionSize, identity });
    // Regions wholly past the image are zeros: never fetched (idempotent on every open).
    for (let r = Math.ceil(imageSize / regionSize); r < map.count; r++) {
      if (map.state(r) === RegionState.Remote) map.set(r, RegionState.Zero);
    }
    const disk = new StreamingDisk({
      imageSize,
      source,
      target,
      map,
      ...(opts.commitIntervalMs !== undefined ? { commitIntervalMs: opts.commitIntervalMs } : {}),
      ...(opts.manifest ? { manifest: opts.manifest } : {}),
      ...(opts.verifyLocalAtOpen ? { verifyLocalAtOpen: true } : {}),
      ...(opts.hashWorkers ? { hashWorkers: opts.hashWorkers } : {}),
      ...(log ? { log } : {}),
    });
    peers?.verifiedBy(() => disk.hasManifest);
    const hydrator = new Hydrator(disk, { ...opts.hydrator, ...(log ? { log } : {}), ...(peers ? { gate: { admissible: () => peers!.admissible(), admit: (first: number, count: number) => peers!.admit(first, count) } } : {}) });
    peers?.whileCopying(() => hydrator.state === 'running');
    if (peers && disk.complete) peers.finished();
    else if (peers) disk.once('complete', () => peers!.finished());
    return {
      disk,
      hydrator,
      origin,
      peers,
      async close() {
        try {
          // Stop the hydrator (no new batch), then close the disk at once: closing its
          // source aborts fetches that may be retrying against an unreachable origin,
          // which waiting for the hydrator first would sit out (up to the retry deadline).
          const stopped = hydrator.stop();
          await disk.close();
          await stopped;
        } finally {
          unlock();
        }
      },
    };
  } catch (err) {
    await source?.close();
    target?.close();
    map?.close();
    unlock();
    throw err;
  }
}

function isComplete(stateDir: string, record: DiskRecord): boolean {
  try {
    const map = RegionMap.open(stateDir, { diskSize: record.size, regionSize: record.regionSize, identity: record.identity });
    const complete = map.complete && map.allLocal;
    map.close();
    return complete;
  } catch {
    return false;
  }
}

function readRecord(file: string): DiskRecord | null {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw err;
  }
  try {
    const rec = JSON.parse(text) as DiskRecord;
    if (rec.version !== 1 || !Number.isSafeInteger(rec.size) || !Number.isSafeInteger(rec.regionSize) || typeof rec.identity !== 'string') throw new Error('missing fields');
    return rec;
  } catch (err) {
    throw new DpuError('DPU_ERR_STATE_CORRUPT', `${file}: ${(err as Error).message}; move the state directory away to start over`);
  }
}


/**
 * One process per state directory. The lock file holds the owner's PID; a lock left by a
 * process that no longer exists (a crash, kill -9) is taken over.
 */
/** State directories this process holds (its own PID in a lock file is not proof of that: PID 1 after a container restart). */
const heldHere = new Set<string>();

function lockStateDir(dir: string): () => void {
  const file = path.join(dir, 'lock');
  const key = path.resolve(dir);
  if (heldHere.has(key)) throw new DpuError('DPU_ERR_STATE_LOCKED', `${dir} is already open in this process`);
  for (let attempt = 0; attempt < 2; attempt++) {
    try {
      const fd = fs.openSync(file, fs.constants.O_WRONLY | fs.constants.O_CREAT | fs.constants.O_EXCL, 0o600);
      fs.writeSync(fd, `${process.pid}\n`);
      fs.closeSync(fd);
      heldHere.add(key);
      return () => {
        heldHere.delete(key);
        fs.rmSync(file, { force: true });
      };
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
      const pid = Number(fs.readFileSync(file, 'utf8').trim());
      if (Number.isInteger(pid) && pid > 0 && pid !== process.pid && processAlive(pid)) {
        throw new DpuError('DPU_ERR_STATE_LOCKED', `${dir} is in use by process ${pid}; stop it first or use another --state directory`);
      }
      fs.rmSync(file, { force: true });
    }
  }
  throw new DpuError('DPU_ERR_STATE_LOCKED', `${dir}: could not take the lock`);
}

function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}
