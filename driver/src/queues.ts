/**
 * The BullMQ queues: attach, monitor, teardown per deployment; clean per node cleaning
 * (cleaning.ts; job id `clean-<node>-<cleaning_id>`); manifest per image (see
 * manifests.ts for its job ids, derived from the image's content instead). A job's id is derived from the node, the deployment and the
 * record's generation (its creation time), so a duplicate request or a retry enqueues
 * nothing new, while a new deployment of the same node (even reusing a deployment id)
 * gets fresh jobs. Ids use '-' as separator: BullMQ refuses ':' in custom ids.
 */
import { type Job, Queue, type JobsOptions } from 'bullmq';
import type { Redis } from 'ioredis';
import type { DriverConfig } from './config.js';
import { manifestJobId } from './manifests.js';
import type { CleaningRecord } from './cleaning.js';
import type { DeploymentRecord } from './store.js';

export const QUEUE_NAMES = ['attach', 'monitor', 'teardown', 'manifest', 'clean'] as const;
/** The queues of a deployment's jobs (a cleaning's are in `clean`). */
const DEPLOYMENT_QUEUES = ['attach', 'monitor', 'teardown', 'manifest'] as const;
export type QueueName = (typeof QUEUE_NAMES)[number];

export interface JobData {
  node: string;
  deployment: string;
  /** For teardown: wipe the local target. */
  wipe?: boolean;
  /** For manifest: the cache key (manifests.ts) and region size; node and deployment are the first asker's. */
  key?: string;
  region_size?: number;
  /** For clean: the cleaning_id (deployment is empty). */
  cleaning?: string;
}

export function jobIdFor(queue: QueueName, rec: Pick<DeploymentRecord, 'node_uuid' | 'deployment_id' | 'created_at'>): string {
  return `${queue}-${rec.node_uuid}-${rec.deployment_id}-${Date.parse(rec.created_at)}`;
}

export interface JobView {
  queue: (typeof DEPLOYMENT_QUEUES)[number];
  id: string;
  state: string;
  attempts: number;
  finished_at: string | null;
}

export class Queues {
  readonly byName: Record<QueueName, Queue<JobData>>;
  private readonly cfg: DriverConfig['jobs'];

  private readonly manifestAttempts: number;

  constructor(connection: Redis, prefix: string, cfg: DriverConfig['jobs'], manifestAttempts = 3) {
    this.cfg = cfg;
    this.manifestAttempts = manifestAttempts;
    const make = (name: QueueName): Queue<JobData> => {
      const q = new Queue<JobData>(name, { connection, prefix });
      // A Queue re-emits its connection's errors; without a listener BullMQ prints each
      // one to stderr (dozens during a Redis restart or failover). The connection's own
      // listener (service.ts) logs them, /v1/health and the failing calls report them.
      q.on('error', () => undefined);
      return q;
    };
    this.byName = { attach: make('attach'), monitor: make('monitor'), teardown: make('teardown'), manifest: make('manifest'), clean: make('clean') };
  }

  private options(queue: QueueName, rec: DeploymentRecord): JobsOptions {
    const keep = { count: this.cfg.keep_completed };
    const attempts = queue === 'attach' ? this.cfg.attach_attempts : queue === 'teardown' ? this.cfg.teardown_attempts : 1000;
    return {
      jobId: jobIdFor(queue, rec),
      attempts,
      backoff: { type: 'exponential', delay: this.cfg.backoff_ms },
      removeOnComplete: keep,
      removeOnFail: keep,
    };
  }

  async enqueue(queue: QueueName, rec: DeploymentRecord, extra: Partial<JobData> = {}): Promise<void> {
    await this.byName[queue].add(queue, { node: rec.node_uuid, deployment: rec.deployment_id, ...extra }, this.options(queue, rec));
  }

  async job(queue: QueueName, rec: DeploymentRecord): Promise<Job<JobData> | undefined> {
    if (queue === 'clean') return undefined;
    if (queue === 'manifest') return rec.manifest_key ? this.byName.manifest.getJob(manifestJobId(rec.manifest_key)) : undefined;
    return this.byName[queue].getJob(jobIdFor(queue, rec));
  }

  /**
   * Makes sure a build of the manifest `key` is queued or running, asked for by `rec`.
   * One job per key: a queued or running one is shared; a finished one (its manifest
   * since evicted, or a failure that was not permanent) is replaced.
   */
  async ensureManifestJob(rec: DeploymentRecord, key: string, regionSize: number): Promise<void> {
    const jobId = manifestJobId(key);
    const q = this.byName.manifest;
    const existing = await q.getJob(jobId);
    if (existing) {
      const state = await existing.getState();
      if (state !== 'completed' && state !== 'failed') return;
      await existing.remove().catch(() => undefined);
    }
    const keep = { count: this.cfg.keep_completed };
    await q.add('manifest', { node: rec.node_uuid, deployment: rec.deployment_id, key, region_size: regionSize }, { jobId, attempts: this.manifestAttempts, backoff: { type: 'exponential', delay: this.cfg.backoff_ms }, removeOnComplete: keep, removeOnFail: keep });
  }

  /** The deployment's jobs that exist, with their states (for the API and the CLI). */
  async jobsOf(rec: DeploymentRecord): Promise<JobView[]> {
    const out: JobView[] = [];
    for (const q of DEPLOYMENT_QUEUES) {
      const job = await this.job(q, rec);
      if (job) out.push({ queue: q, id: job.id!, state: await job.getState(), attempts: job.attemptsMade, finished_at: job.finishedOn ? new Date(job.finishedOn).toISOString() : null });
    }
    return out;
  }

  /** The clean job of a cleaning; one per cleaning, so a repeated request enqueues nothing. */
  static cleanJobId(rec: Pick<CleaningRecord, 'node_uuid' | 'cleaning_id'>): string {
    return `clean-${rec.node_uuid}-${rec.cleaning_id}`;
  }

  async enqueueClean(rec: CleaningRecord): Promise<void> {
    const keep = { count: this.cfg.keep_completed };
    await this.byName.clean.add('clean', { node: rec.node_uuid, deployment: '', cleaning: rec.cleaning_id }, {
      jobId: Queues.cleanJobId(rec),
      attempts: this.cfg.clean_attempts,
      backoff: { type: 'exponential', delay: this.cfg.backoff_ms },
      removeOnComplete: keep,
      removeOnFail: keep,
    });
  }

  /** A cleaning's job, with its state (for the API). */
  async cleanJobs(rec: CleaningRecord): Promise<{ queue: 'clean'; id: string; state: string; attempts: number }[]> {
    const job = await this.byName.clean.getJob(Queues.cleanJobId(rec));
    return job ? [{ queue: 'clean', id: job.id!, state: await job.getState(), attempts: job.attemptsMade }] : [];
  }

  async close(): Promise<void> {
    await Promise.all(QUEUE_NAMES.map((q) => this.byName[q].close()));
  }
}
