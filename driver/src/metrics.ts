/** Prometheus metrics of the driver service, on a registry of its own (several apps per process in tests). */
import { Counter, Gauge, Registry, collectDefaultMetrics } from 'prom-client';
import { QUEUE_NAMES, type Queues } from './queues.js';
import type { ReconcileStore } from './reconcile.js';
import { PERSISTENCE_MODES, type RedisFitness } from './redis-fitness.js';
import type { DeploymentStore } from './store.js';
import type { BootProfileStore } from './boot-profiles.js';

export interface DriverMetrics {
  registry: Registry;
  jobsFinished: Counter<'queue' | 'result'>;
  orphansRemoved: Counter;
  /** Boot profiles replayed on a disk (applied), refused by an agent, and boots stored (collected). */
  bootProfiles: Counter<'event'>;
}

export interface OpsSources {
  /** The orphans and the last reconcile pass, read from Redis at scrape time. */
  reconcile?: ReconcileStore;
  /** The last reading of Redis's settings (redis-fitness.ts). */
  fitness?: () => RedisFitness | null;
  /** The stored boot profiles, counted at scrape time. */
  profiles?: BootProfileStore;
}

export function createMetrics(store: DeploymentStore, queues: Queues, ops: OpsSources = {}): DriverMetrics {
  const registry = new Registry();
  collectDefaultMetrics({ register: registry, prefix: 'smartnic_driver_' });
  new Gauge({
    name: 'smartnic_driver_jobs',
    help: 'Jobs per queue and state, read from Redis at scrape time.',
    labelNames: ['queue', 'state'],
    registers: [registry],
    async collect() {
      this.reset();
      for (const q of QUEUE_NAMES) {
        const counts = await queues.byName[q].getJobCounts('waiting', 'active', 'delayed', 'completed', 'failed', 'prioritized');
        for (const [state, n] of Object.entries(counts)) this.set({ queue: q, state }, n);
      }
    },
  });
  new Gauge({
    name: 'smartnic_driver_deployments',
    help: 'Deployments per state.',
    labelNames: ['state'],
    registers: [registry],
    async collect() {
      this.reset();
      for (const state of ['attaching', 'ready', 'complete', 'failed', 'deleting']) this.set({ state }, 0);
      for (const d of await store.list()) this.inc({ state: d.state });
    },
  });
  new Gauge({
    name: 'smartnic_driver_deployment_hydrated_ratio',
    help: 'Fraction of each deployment\'s regions that are local on its DPU.',
    labelNames: ['node'],
    registers: [registry],
    async collect() {
      this.reset();
      for (const d of await store.list()) this.set({ node: d.node_uuid }, d.progress.fraction);
    },
  });
  const jobsFinished = new Counter({
    name: 'smartnic_driver_jobs_finished_total',
    help: 'Jobs this process finished, by queue and result (completed, failed, retried).',
    labelNames: ['queue', 'result'],
    registers: [registry],
  });
  const orphansRemoved = new Counter({
    name: 'smartnic_driver_orphan_disks_removed_total',
    help: 'Orphan disks this process deleted (with wipe) on DPU agents (reconcile.remove_orphans).',
    registers: [registry],
  });
  const bootProfiles = new Counter({
    name: 'smartnic_driver_boot_profiles_total',
    help: 'Boot profile events in this process: applied (a profile replayed on a new disk), refused (an agent found it does not fit the image; it was deleted), collected (a recorded boot stored).',
    labelNames: ['event'],
    registers: [registry],
  });
  for (const event of ['applied', 'refused', 'collected']) bootProfiles.inc({ event }, 0);
  const { reconcile, fitness, profiles } = ops;
  if (profiles) {
    new Gauge({
      name: 'smartnic_driver_boot_profiles_stored',
      help: 'Images with a stored boot profile (GET /v1/boot-profiles).',
      registers: [registry],
      async collect() {
        this.set(await profiles.count());
      },
    });
  }
  if (reconcile) {
    new Gauge({
      name: 'smartnic_driver_orphan_disks',
      help: 'Disks with a driver-style id on DPU agents that no deployment record names, as the last reconcile pass found them (GET /v1/orphans).',
      registers: [registry],
      async collect() {
        this.set(await reconcile.orphanCount());
      },
    });
    new Gauge({
      name: 'smartnic_driver_reconcile_last_run_timestamp_seconds',
      help: 'When the last reconcile pass ended (any driver process on this Redis); 0 before the first.',
      registers: [registry],
      async collect() {
        const last = await reconcile.last();
        this.set(last ? Date.parse(last.finished_at) / 1000 : 0);
      },
    });
    new Gauge({
      name: 'smartnic_driver_reconcile_agents',
      help: 'DPU agents by whether the last reconcile pass could list their disks (result ok or error).',
      labelNames: ['result'],
      registers: [registry],
      async collect() {
        const scans = await reconcile.scans();
        this.set({ result: 'ok' }, scans.filter((s) => !s.error).length);
        this.set({ result: 'error' }, scans.filter((s) => s.error).length);
      },
    });
  }
  if (fitness) {
    new Gauge({
      name: 'smartnic_driver_redis_persistence',
      help: 'How Redis persists the deployments: 1 for the mode found (aof, rdb, none, unknown: CONFIG refused and no AOF), 0 for the others.',
      labelNames: ['mode'],
      registers: [registry],
      collect() {
        const mode = fitness()?.persistence ?? 'unknown';
        for (const m of PERSISTENCE_MODES) this.set({ mode: m }, m === mode ? 1 : 0);
      },
    });
    new Gauge({
      name: 'smartnic_driver_redis_replicas',
      help: 'Replicas connected to the Redis primary as last checked (-1: not known). Fewer than redis.wait_replicas: changes are answered 503.',
      registers: [registry],
      collect() {
        this.set(fitness()?.replicas ?? -1);
      },
    });
    new Gauge({
      name: 'smartnic_driver_redis_maxmemory_policy',
      help: "Redis's maxmemory-policy (1 for the policy found; anything but noeviction can drop deployments).",
      labelNames: ['policy'],
      registers: [registry],
      collect() {
        this.reset();
        this.set({ policy: fitness()?.maxmemory_policy ?? 'unknown' }, 1);
      },
    });
  }
  return { registry, jobsFinished, orphansRemoved, bootProfiles };
}
