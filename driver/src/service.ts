/**
 * Wiring: one place that composes the driver service from its parts — Redis connections,
 * the deployment store, the queues and their workers, reconcile, the API. Two Redis
 * connections on purpose: workers wait out a Redis outage (commands queue until it is
 * back), while the API fails fast with 503 DRV_ERR_REDIS instead of hanging a conductor's
 * request. Before any of it, Redis's eviction policy and persistence are checked
 * (redis-fitness.ts): an evicting Redis is refused.
 */
import { once } from 'node:events';
import { BootProfileStore } from './boot-profiles.js';
import { PeerTracker } from './peers.js';
import { type Job, Worker } from 'bullmq';
import type { Logger } from 'pino';
import { buildDriverApi, type DriverApp } from './api.js';
import type { DriverConfig } from './config.js';
import { CleaningStore } from './cleaning.js';
import { attach, clean, type JobDeps, monitor, teardown } from './jobs.js';
import { buildManifest, ManifestCache } from './manifests.js';
import { createMetrics } from './metrics.js';
import { type JobData, QUEUE_NAMES, Queues, type QueueName } from './queues.js';
import { ReconcileStore, Reconciler } from './reconcile.js';
import { connectRedis, describeRedis } from './redis-connect.js';
import { RedisFitnessMonitor } from './redis-fitness.js';
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

const CLOSE_GRACE_MS = 5_000;
const API_REDIS_READY_MS = 10_000;
const FORCE_GRACE_MS = 2_000;
const ERROR_LOG_INTERVAL_MS = 30_000;
const lastWorkerError = new Map<string, number>();

/** Whether `p` settled within `ms` (it keeps running either way). */
async function within(p: Promise<unknown>, ms: number): Promise<boolean> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<false>((resolve) => {
    timer = setTimeout(() => resolve(false), ms);
  });
  try {
    return await Promise.race([p.then(() => true, () => true), timeout]);
  } finally {
    clearTimeout(timer);
  }
}

export async function startDriverService(config: Readonly<DriverConfig>, log: Logger, opts: StartOptions = {}): Promise<DriverService> {
  const fitness = new RedisFitnessMonitor(config.redis, log, describeRedis(config.redis));
  // Throws DRV_ERR_REDIS_UNFIT before anything is started.
  await fitness.checkAtStart(() => connectRedis(config.redis, 'probe'));
  const workerRedis = connectRedis(config.redis, 'patient');
  const apiRedis = connectRedis(config.redis, 'fail-fast');
  // An unreachable Redis is reported by health and by failing requests, not by crashing.
  for (const r of [workerRedis, apiRedis]) r.on('error', (err: Error) => log.debug({ err: err.message }, 'redis connection error'));
  const prefix = config.redis.prefix;
  const jobsQueues = new Queues(workerRedis, prefix, config.jobs, config.manifests.attempts);
  const apiQueues = new Queues(apiRedis, prefix, config.jobs, config.manifests.attempts);
  const manifests = new ManifestCache(workerRedis, prefix);
  const store = new DeploymentStore(workerRedis, prefix);
  const apiStore = new DeploymentStore(apiRedis, prefix);
  const reconcileStore = new ReconcileStore(workerRedis, prefix);
  const apiReconcile = new ReconcileStore(apiRedis, prefix);
  const apiProfiles = new BootProfileStore(apiRedis, prefix, config.boot_profiles);
  const metrics = createMetrics(apiStore, apiQueues, { reconcile: apiReconcile, fitness: () => fitness.current, profiles: apiProfiles });
  const deps: JobDeps = {
    store,
    cleanings: new CleaningStore(workerRedis, prefix),
    queues: jobsQueues,
    manifests,
    config,
    log,
    version: opts.version ?? '0.0.0',
    reconcile: reconcileStore,
    profiles: new BootProfileStore(workerRedis, prefix, config.boot_profiles),
    onProfile: (event) => metrics.bootProfiles.inc({ event }),
    peers: new PeerTracker(workerRedis, prefix, config.peers),
  };
  // Reconcile runs where the workers run (a pass at a time across all processes), on the
  // fail-fast connection: a pass during a Redis outage fails at once (and is tried again
  // at the next tick) instead of waiting, so it never holds up a stop.
  const reconciler = (opts.workers ?? true) ? new Reconciler({ redis: apiRedis, store: apiStore, config, log: log.child({ component: 'reconcile' }), onRemoved: () => metrics.orphansRemoved.inc() }) : null;

  const workers: Worker<JobData>[] = [];
  if (opts.workers ?? true) {
    const processors: Record<QueueName, (job: Job<JobData>, token?: string) => Promise<string>> = {
      attach: (job, token) => attach({ ...deps, log: log.child({ job: job.id }) }, job, token),
      monitor: (job, token) => monitor({ ...deps, log: log.child({ job: job.id }) }, job, token),
      teardown: (job) => teardown({ ...deps, log: log.child({ job: job.id }) }, job),
      manifest: (job) => buildManifest({ ...deps, log: log.child({ job: job.id }) }, job),
      clean: (job, token) => clean({ ...deps, log: log.child({ job: job.id }) }, job, token),
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
      w.on('error', (err) => {
        // While Redis is down every worker reports each reconnect attempt: say it once per
        // queue and message every ERROR_LOG_INTERVAL_MS, not several times a second.
        // Numbers vary between repeats ("Retrying from scratch after 10ms"): not part of the key.
        const key = `${q}\0${err.message.replace(/\d+/g, 'N')}`;
        const now = Date.now();
        if (now - (lastWorkerError.get(key) ?? 0) < ERROR_LOG_INTERVAL_MS) return;
        lastWorkerError.set(key, now);
        log.warn({ queue: q, err: err.message }, 'worker error (repeats are not logged for 30 s)');
      });
      workers.push(w);
    }
  }

  const app = await buildDriverApi({ config, store: apiStore, queues: apiQueues, redis: apiRedis, metrics, log, version: opts.version ?? '0.0.0', fitness: () => fitness.current, reconcile: apiReconcile, profiles: apiProfiles });
  // The API's connection fails fast (no offline queue): a request that came before it
  // was up would be told Redis is unreachable. Listen once it is (or after a bound: a
  // Redis that is down is reported by /v1/health and by each request, as at any time).
  if (apiRedis.status !== 'ready' && !(await within(once(apiRedis, 'ready'), API_REDIS_READY_MS))) {
    log.warn({ redis: describeRedis(config.redis) }, `Redis not ready after ${API_REDIS_READY_MS} ms: listening anyway; requests fail with 503 until it is`);
  }
  const url = await app.listen({ host: config.listen.host, port: config.listen.port });
  fitness.start(apiRedis);
  reconciler?.start();
  return {
    app,
    url,
    async close() {
      fitness.stop();
      // A request waiting on a hung Redis (fail-fast: bounded by its command timeout) must
      // not hold up the stop: close the listener, then give in-flight requests a bound.
      if (!(await within(app.close(), CLOSE_GRACE_MS))) log.warn({ graceMs: CLOSE_GRACE_MS }, 'API requests still running at stop (is Redis reachable?); stopping anyway');
      // A running reconcile pass may be waiting on an agent (agent.timeout_ms): bounded like the workers.
      if (reconciler) await within(reconciler.stop(), CLOSE_GRACE_MS);
      // Workers finish the step they are on (a monitor step is one poll), then stop. With
      // Redis unreachable a graceful close never completes: after a grace period the workers
      // are closed by force (their jobs' locks expire and another process takes them over).
      const graceful = await within(Promise.all(workers.map((w) => w.close())), CLOSE_GRACE_MS);
      if (!graceful) {
        log.warn({ graceMs: CLOSE_GRACE_MS }, 'workers did not stop in time (is Redis reachable?); closing them by force');
        await within(Promise.all(workers.map((w) => w.close(true))), FORCE_GRACE_MS);
      }
      await within(Promise.all([jobsQueues.close(), apiQueues.close()]), FORCE_GRACE_MS);
      workerRedis.disconnect();
      apiRedis.disconnect();
    },
  };
}
