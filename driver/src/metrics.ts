/** Prometheus metrics of the driver service, on a registry of its own (several apps per process in tests). */
import { Counter, Gauge, Registry, collectDefaultMetrics } from 'prom-client';
import { QUEUE_NAMES, type Queues } from './queues.js';
import type { DeploymentStore } from './store.js';

export interface DriverMetrics {
  registry: Registry;
  jobsFinished: Counter<'queue' | 'result'>;
}

export function createMetrics(store: DeploymentStore, queues: Queues): DriverMetrics {
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
  return { registry, jobsFinished };
}
