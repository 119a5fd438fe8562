/**
 * Image manifests (dpu-agent/src/manifest/manifest.ts) in the driver: built once per image
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
 * while reading. For a qcow2 image the digest Glance records is of the qcow2 FILE, while
 * the manifest is of the raw disk it describes: that check is skipped (the per-region
 * hashes are still of the decoded disk, the bytes every agent serves).
 */
import { createHash, getHashes } from 'node:crypto';
import { type Job, UnrecoverableError } from 'bullmq';
import type { Redis } from 'ioredis';
import type { Logger } from 'pino';
import { DpuError } from '../../dpu-agent/src/errors.js';
import { Manifest } from '../../dpu-agent/src/manifest/manifest.js';
import { openImageSource } from '../../dpu-agent/src/streaming/open.js';
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
  return content ? `${image.format};${regionSize};${content}` : null;
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
  // qcow2: Glance's digest is of the file, the manifest of the disk it describes (see above).
  const check = digest && image.format === 'raw' && getHashes().includes(digest.algo) ? digest : null;
  const source = await openImageSource({
    source: { url: image.url, ...(image.headers ? { headers: image.headers } : {}), ...(image.identity ? { identity: image.identity } : {}), maxConnections: 3, backgroundConnections: 2 },
    format: image.format,
    log: deps.log,
  });
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
  }
  await deps.manifests.put(key, manifest.encode());
  deps.log.info({ key, regions: manifest.count, zero: manifest.zeroRegions, checked: check ? check.algo : 'none' }, 'image manifest built');
  return `built: ${manifest.count} regions, ${manifest.zeroRegions} zero, ${check ? `${check.algo} checked` : 'no digest checked'}`;
}

async function permanent(deps: ManifestJobDeps, job: Job<JobData>, key: string, message: string): Promise<never> {
  await deps.manifests.fail(key, message);
  await deps.store.update(job.data.node, job.data.deployment, { last_error: message });
  deps.log.warn({ key }, message);
  throw new UnrecoverableError(message);
}
