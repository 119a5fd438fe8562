/**
 * The three BullMQ queues. A job's id is derived from the node, the deployment and the
 * record's generation (its creation time), so a duplicate request or a retry enqueues
 * nothing new, while a new deployment of the same node (even reusing a deployment id)
 * gets fresh jobs. Ids use '-' as separator: BullMQ refuses ':' in custom ids.
 */
import { type Job, Queue, type JobsOptions } from 'bullmq';
import type { Redis } from 'ioredis';
import type { DriverConfig } from './config.js';
import type { DeploymentRecord } from './store.js';

export const QUEUE_NAMES = ['attach', 'monitor', 'teardown'] as const;
export type QueueName = (typeof QUEUE_NAMES)[number];

export interface JobData {
  node: string;
  deployment: string;
  /** For teardown: wipe the local target. */
  wipe?: boolean;
}

export function jobIdFor(queue: QueueName, rec: Pick<DeploymentRecord, 'node_uuid' | 'deployment_id' | 'created_at'>): string {
  return `${queue}-${rec.node_uuid}-${rec.deployment_id}-${Date.parse(rec.created_at)}`;
}

export interface JobView {
  queue: QueueName;
  id: string;
  state: string;
  attempts: number;
}

export class Queues {
  readonly byName: Record<QueueName, Queue<JobData>>;
  private readonly cfg: DriverConfig['jobs'];

  constructor(connection: Redis, prefix: string, cfg: DriverConfig['jobs']) {
    this.cfg = cfg;
    const make = (name: QueueName): Queue<JobData> => new Queue<JobData>(name, { connection, prefix });
    this.byName = { attach: make('attach'), monitor: make('monitor'), teardown: make('teardown') };
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
    return this.byName[queue].getJob(jobIdFor(queue, rec));
  }

  /** The deployment's jobs that exist, with their states (for the API and the CLI). */
  async jobsOf(rec: DeploymentRecord): Promise<JobView[]> {
    const out: JobView[] = [];
    for (const q of QUEUE_NAMES) {
      const job = await this.job(q, rec);
      if (job) out.push({ queue: q, id: job.id!, state: await job.getState(), attempts: job.attemptsMade });
    }
    return out;
  }

  async close(): Promise<void> {
    await Promise.all(QUEUE_NAMES.map((q) => this.byName[q].close()));
  }
}
