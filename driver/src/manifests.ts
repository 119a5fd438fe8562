/**
 * Image manifests (image-access/src/manifest.ts) in the driver: built once per image
 * content and region size by a job of the `manifest` queue, kept in Redis, uploaded to
 * every disk of that image (the agent then verifies each region it fetches and never
 * fetches a zero region).
 *
 *   key      what the manifest is of: `<format>;<region size>;<digest>` where the digest is
 *            the image's hash when one is known (Glance's os_hash_algo/value, or
 *            instance_info image_os_hash_algo/value or image_checksum, read as Ironic
 *            reads it: image.ts infoDigest), else the resolved
 *            identity (a Swift ETag, say). An image with neither gets no manifest.
 *   Redis    `<prefix>:manifest:<sha256 of key>` the encoded manifest (binary);
 *            `<prefix>:manifest-failed:<sha256 of key>` why it can never be built (the
 *            image does not match its digest, or is too large); kept until deleted.
 *   job id   `manifest-<first 32 hex of sha256 of key>`: concurrent deployments of one
 *            image share one build.
 *
 * The job reads the image through openImageSource with the URL, headers and format the
 * agent uses. For a raw image the whole-image digest is checked against the expected one
 * while reading. For a qcow2 image the digest Glance (or instance_info) gives is of the
 * qcow2 FILE, while the manifest is of the raw disk it describes: the file is read once
 * more as it is, alongside the build, and its digest checked (the per-region hashes are
 * of the decoded disk, the bytes every agent serves). Either mismatch is permanent.
 */
import { createHash, getHashes } from 'node:crypto';
import { type Job, UnrecoverableError } from 'bullmq';
import type { Redis } from 'ioredis';
import type { Logger } from 'pino';
import { DpuError, Manifest, openImageSource } from '../../image-access/src/index.js';
import type { DriverConfig } from './config.js';
import { DriverError } from './errors.js';
import type { InstanceInfo, ResolvedImage } from './image.js';
import { infoDigest, resolveImage } from './image.js';
import type { JobData } from './queues.js';
import type { DeploymentStore } from './store.js';

/** The agent's region size when neither driver_info nor the agent's answer gives one. */
export const DEFAULT_REGION_SIZE = 1 << 20;

/** The digest of the image's content to check, when instance_info or Glance gives one. */
export function expectedDigest(image: ResolvedImage, info: InstanceInfo): { algo: string; value: string } | null {
  return image.hash ?? infoDigest(info);
}

/** The cache key of the image's manifest in `regionSize` regions, or null when nothing names its content. */
export function manifestKey(image: ResolvedImage, info: InstanceInfo, regionSize: number): string | null {
  const d = expectedDigest(image, info);
  const content = d ? `${d.algo}=${d.value.toLowerCase()}` : image.identity ? `identity=${image.identity}` : null;
  // v2: manifests with Merkle leaves (a miss verifies just its blocks); v1 ones cached before stay unused.
  return content ? `v2;${image.format};${regionSize};${content}` : null;
}

const hashOf = (key: string): string => createHash('sha256').update(key).digest('hex');

export function manifestJobId(key: string): string {
  return `manifest-${hashOf(key).slice(0, 32)}`;
}

export class ManifestCache {
  constructor(
    private readonly redis: Redis,
    private readonly prefix: string,
  ) {}

  get(key: string): Promise<Buffer | null> {
    return this.redis.getBuffer(`${this.prefix}:manifest:${hashOf(key)}`);
  }

  async put(key: string, manifest: Buffer): Promise<void> {
    await this.redis.multi().set(`${this.prefix}:manifest:${hashOf(key)}`, manifest).del(`${this.prefix}:manifest-failed:${hashOf(key)}`).exec();
  }

  /** Why the manifest can never be built, or null. */
  failure(key: string): Promise<string | null> {
    return this.redis.get(`${this.prefix}:manifest-failed:${hashOf(key)}`);
  }

  async fail(key: string, message: string): Promise<void> {
    await this.redis.set(`${this.prefix}:manifest-failed:${hashOf(key)}`, message);
  }
}

export interface ManifestJobDeps {
  store: DeploymentStore;
  manifests: ManifestCache;
  config: Readonly<DriverConfig>;
  log: Logger;
}

/**
 * Builds the manifest of the image the asking deployment (job.data.node/deployment) names.
 * A permanent failure is recorded in Redis (every later deployment of the image sees it)
 * and on the asking deployment; a transient one is retried by BullMQ.
 */
export async function buildManifest(deps: ManifestJobDeps, job: Job<JobData>): Promise<string> {
  const key = job.data.key!;
  const regionSize = job.data.region_size!;
  if (await deps.manifests.get(key)) return 'cached already';
  const rec = await deps.store.get(job.data.node);
  if (!rec || rec.deployment_id !== job.data.deployment) {
    // The next deployment of the image asks again (a failed build that is not permanent is re-queued).
    throw new UnrecoverableError(`DRV_ERR_INTERNAL: the deployment that asked for the manifest (${job.data.node}/${job.data.deployment}) is gone; the next deployment of the image asks again`);
  }
  const info = rec.spec.instance_info;
  let image: ResolvedImage;
  try {
    image = await resolveImage(info, deps.config);
  } catch (err) {
    if (err instanceof DriverError && !err.retryable) throw new UnrecoverableError(`${err.code}: ${err.message}`);
    throw err;
  }
  const digest = expectedDigest(image, info);
  const algo = digest ? nodeHash(digest.algo) : null;
  // raw: the digest is of the disk the manifest hashes. qcow2: it is of the file, while the
  // manifest is of the disk the file describes: the file is read once more, as it is, and
  // hashed on its own (alongside the build).
  const check = digest && algo && image.format === 'raw' ? { algo, value: digest.value } : null;
  const fileCheck = digest && algo && image.format !== 'raw' ? { algo, value: digest.value } : null;
  // Whole 8 MiB requests: no host waits behind this read, and each request costs an object
  // store (Swift's proxy) milliseconds of its own.
  const sourceOpts = { url: image.url, ...(image.headers ? { headers: image.headers } : {}), ...(image.identity ? { identity: image.identity } : {}), maxConnections: 3, backgroundConnections: 2, backgroundRequestMs: 0 };
  const source = await openImageSource({ source: sourceOpts, format: image.format, log: deps.log });
  const fileHash = fileCheck
    ? fileDigest(sourceOpts, fileCheck.algo, deps.log).then(
        (hex) => ({ hex }),
        (err: unknown) => ({ err }),
      )
    : null;
  let manifest: Manifest;
  try {
    const regions = Math.ceil(source.size / regionSize);
    if (regions > deps.config.manifests.max_regions) {
      const message = `DRV_ERR_INVALID: not verified: the image has ${regions} regions of ${regionSize} bytes, more than manifests.max_regions (${deps.config.manifests.max_regions})`;
      await permanent(deps, job, key, message);
    }
    manifest = await Manifest.build(source, {
      regionSize,
      ...(check ? { imageHashAlgo: check.algo, expectedImageHash: check.value } : {}),
      onProgress: (done) => void job.updateProgress(Math.floor((done / Math.max(1, source.size)) * 100)).catch(() => undefined),
    });
  } catch (err) {
    if (err instanceof UnrecoverableError) throw err;
    if (err instanceof DpuError && err.code === 'DPU_ERR_MANIFEST_INVALID') {
      const detail = err.message.replace(/^the image manifest is unusable: /, '');
      await permanent(deps, job, key, `DRV_ERR_IMAGE_MISMATCH: the image does not match Glance (its ${check!.algo}${image.hash ? '' : ', as instance_info gives it'}): ${detail}`);
    }
    throw err;
  } finally {
    await source.close();
    if (fileHash) await fileHash; // never left running behind a failed build
  }
  if (fileHash && fileCheck) {
    const got = await fileHash;
    if ('err' in got) throw got.err;
    if (got.hex !== fileCheck.value.toLowerCase()) {
      await permanent(deps, job, key, `DRV_ERR_IMAGE_MISMATCH: the image does not match ${image.hash ? 'Glance' : 'instance_info'}: the ${image.format} file's ${fileCheck.algo} is ${got.hex.slice(0, 16)}…, not the expected ${fileCheck.value.slice(0, 16)}…`);
    }
  }
  const checked = check ?? fileCheck;
  await deps.manifests.put(key, manifest.encode());
  deps.log.info({ key, regions: manifest.count, zero: manifest.zeroRegions, checked: checked ? checked.algo : 'none' }, 'image manifest built');
  return `built: ${manifest.count} regions, ${manifest.zeroRegions} zero, ${checked ? `${checked.algo} checked${fileCheck ? ` (of the ${image.format} file)` : ''}` : 'no digest checked'}`;
}

/** Node's name of a hash algorithm Glance or Ironic name (hashlib's: sha3_512 is sha3-512), or null if Node has none. */
function nodeHash(algo: string): string | null {
  const hashes = getHashes();
  const a = algo.toLowerCase();
  if (hashes.includes(a)) return a;
  const dashed = a.replace(/_/g, '-');
  return hashes.includes(dashed) ? dashed : null;
}

/** The digest of the bytes at the URL as they are (a qcow2 file, not the disk it describes). */
async function fileDigest(opts: Parameters<typeof openImageSource>[0]['source'], algo: string, log: Logger): Promise<string> {
  const file = await openImageSource({ source: opts, format: 'raw', log });
  try {
    const hash = createHash(algo);
    const buf = Buffer.allocUnsafe(Math.min(8 << 20, Math.max(1, file.size)));
    for (let off = 0; off < file.size; off += buf.length) {
      const chunk = buf.subarray(0, Math.min(buf.length, file.size - off));
      await file.read(off, chunk, { priority: 'background' });
      hash.update(chunk);
    }
    return hash.digest('hex');
  } finally {
    await file.close();
  }
}

async function permanent(deps: ManifestJobDeps, job: Job<JobData>, key: string, message: string): Promise<never> {
  await deps.manifests.fail(key, message);
  await deps.store.update(job.data.node, job.data.deployment, { last_error: message });
  deps.log.warn({ key }, message);
  throw new UnrecoverableError(message);
}
