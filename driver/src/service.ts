/**
 * Wiring: one place that composes the driver service from its parts — Redis connections,
 * the deployment store, the queues and their workers, the API. Two Redis connections on
 * purpose: workers wait out a Redis outage (commands queue until it is back), while the
 * API fails fast with 503 DRV_ERR_REDIS instead of hanging a conductor's request.
 */
import { type Job, Worker } from 'bullmq';
import { Redis } from 'ioredis';
import type { Logger } from 'pino';
import { buildDriverApi, type DriverApp } from './api.js';
import type { DriverConfig } from './config.js';
import { attach, type JobDeps, monitor, teardown } from './jobs.js';
import { buildManifest, ManifestCache } from './manifests.js';
import { createMetrics } from './metrics.js';
import { type JobData, QUEUE_NAMES, Queues, type QueueName } from './queues.js';
import { DeploymentStore } from './store.js';

export interface DriverService {
  app: DriverApp;
  /** The API's base URL once listening. */
  url: string;
  close(): Promise<void>;
}

export interface StartOptions {
  /** Run job workers in this process. @default true */
  workers?: boolean;
  version?: string;
}

export function redisConnection(url: string, patient: boolean): Redis {
  return new Redis(url, patient ? { maxRetriesPerRequest: null } : { maxRetriesPerRequest: 1, enableOfflineQueue: false, connectTimeout: 2000 });
}

export async function startDriverService(config: Readonly<DriverConfig>, log: Logger, opts: StartOptions = {}): Promise<DriverService> {
  const workerRedis = redisConnection(config.redis.url, true);
  const apiRedis = redisConnection(config.redis.url, false);
  // An unreachable Redis is reported by health and by failing requests, not by crashing.
  for (const r of [workerRedis, apiRedis]) r.on('error', (err: Error) => log.debug({ err: err.message }, 'redis connection error'));
  const prefix = config.redis.prefix;
  const jobsQueues = new Queues(workerRedis, prefix, config.jobs, config.manifests.attempts);
  const apiQueues = new Queues(apiRedis, prefix, config.jobs, config.manifests.attempts);
  const manifests = new ManifestCache(workerRedis, prefix);
  const store = new DeploymentStore(workerRedis, prefix);
  const apiStore = new DeploymentStore(apiRedis, prefix);
  const metrics = createMetrics(apiStore, apiQueues);
  const deps: JobDeps = { store, queues: jobsQueues, manifests, config, log, version: opts.version ?? '0.0.0' };

  const workers: Worker<JobData>[] = [];
  if (opts.workers ?? true) {
    const processors: Record<QueueName, (job: Job<JobData>, token?: string) => Promise<string>> = {
      attach: (job, token) => attach({ ...deps, log: log.child({ job: job.id }) }, job, token),
      monitor: (job, token) => monitor({ ...deps, log: log.child({ job: job.id }) }, job, token),
      teardown: (job) => teardown({ ...deps, log: log.child({ job: job.id }) }, job),
      manifest: (job) => buildManifest({ ...deps, log: log.child({ job: job.id }) }, job),
    };
    for (const q of QUEUE_NAMES) {
      // A manifest build reads a whole image: two at a time per process at most.
      const concurrency = q === 'manifest' ? Math.min(2, config.jobs.concurrency) : config.jobs.concurrency;
      const w = new Worker<JobData>(q, processors[q], { connection: workerRedis, prefix, concurrency });
      w.on('completed', () => metrics.jobsFinished.inc({ queue: q, result: 'completed' }));
      w.on('failed', (job, err) => {
        const final = !job || job.attemptsMade >= (job.opts.attempts ?? 1) || err.name === 'UnrecoverableError';
        metrics.jobsFinished.inc({ queue: q, result: final ? 'failed' : 'retried' });
      });
      w.on('error', (err) => log.warn({ queue: q, err: err.message }, 'worker error'));
      workers.push(w);
    }
  }

  const app = await buildDriverApi({ config, store: apiStore, queues: apiQueues, redis: apiRedis, metrics, log, version: opts.version ?? '0.0.0' });
  const url = await app.listen({ host: config.listen.host, port: config.listen.port });
  return {
    app,
    url,
    async close() {
      await app.close();
      // Workers finish the step they are on (a monitor step is one poll), then stop.
      await Promise.all(workers.map((w) => w.close()));
      await Promise.all([jobsQueues.close(), apiQueues.close()]);
      workerRedis.disconnect();
      apiRedis.disconnect();
    },
  };
}
