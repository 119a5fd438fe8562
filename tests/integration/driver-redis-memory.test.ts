/**
 * How much Redis memory a deployment takes (docs/operations.md, "Memory per deployment"):
 * N deployments through the real driver service against a real DPU agent, measured with
 * INFO memory (used_memory_dataset before and after) and MEMORY USAGE of every key the service
 * keeps, by kind — the deployment record, the BullMQ job hashes kept for inspection
 * (jobs.keep_completed per queue), the queues' event streams (capped by BullMQ), the rest.
 * Measured while the deployments are live (complete), and again after they are torn down
 * (what is left: job history). Prints the table the docs quote; fails if a live deployment
 * takes more than 32 KiB, so the docs' figure stays roughly true.
 */
import assert from 'node:assert/strict';
import path from 'node:path';
import { Redis } from 'ioredis';
import { DriverClient, type DeploymentCreate } from '../../openapi/clients/driver-client.js';
import { ApiError } from '../../openapi/clients/http.js';
import { makeImage, tempDir } from '../helpers/agent.js';
import { TestOrigin } from '../helpers/origin.js';
import { RedisServer } from '../helpers/redis.js';
import { agentDaemon, driverService, type ServiceProcess, TOKEN, until } from '../helpers/services.js';

const MiB = 1 << 20;
const N = 40;
const PREFIX = 'test';

type Kind = 'record' | 'job' | 'events' | 'queue-index' | 'other';

function kindOf(key: string): Kind {
  const rest = key.slice(PREFIX.length + 1);
  if (rest.startsWith('deployment:')) return 'record';
  const [queue, id] = rest.split(':');
  if (['attach', 'monitor', 'teardown', 'manifest'].includes(queue!) && id) {
    if (id === 'events') return 'events';
    if (/^(attach|monitor|teardown|manifest)-/.test(id)) return 'job';
    return 'queue-index';
  }
  return 'other';
}

interface Usage {
  /** INFO memory used_memory_dataset: used_memory less Redis's overhead (clients, Lua scripts, buffers). */
  used: number;
  byKind: Map<Kind, { keys: number; bytes: number }>;
}

async function usage(redis: Redis): Promise<Usage> {
  const info = String(await redis.info('memory'));
  const used = Number(/^used_memory_dataset:(\d+)/m.exec(info)![1]);
  const byKind = new Map<Kind, { keys: number; bytes: number }>();
  let cursor = '0';
  do {
    const [next, keys] = await redis.scan(cursor, 'MATCH', `${PREFIX}:*`, 'COUNT', 1000);
    cursor = next;
    for (const k of keys) {
      const bytes = Number(await redis.call('MEMORY', 'USAGE', k, 'SAMPLES', '0'));
      const e = byKind.get(kindOf(k)) ?? { keys: 0, bytes: 0 };
      byKind.set(kindOf(k), { keys: e.keys + 1, bytes: e.bytes + bytes });
    }
  } while (cursor !== '0');
  return { used, byKind };
}

function table(title: string, before: number, after: Usage): string {
  const lines = [`${title}: used_memory_dataset +${after.used - before} bytes = ${Math.round((after.used - before) / N)} bytes per deployment (N = ${N})`, '  kind          keys   bytes   per deployment'];
  for (const [k, v] of [...after.byKind].sort()) lines.push(`  ${k.padEnd(12)} ${String(v.keys).padStart(5)} ${String(v.bytes).padStart(8)}   ${Math.round(v.bytes / N)}`);
  return lines.join('\n');
}

describe('Redis memory per deployment', function () {
  this.timeout(300_000);
  let tmp: { dir: string; cleanup: () => void };
  let origin: TestOrigin;
  let redisServer: RedisServer;
  let redis: Redis;
  let agent: ServiceProcess;
  let driver: ServiceProcess;

  before(async () => {
    tmp = tempDir('driver-mem');
    const image = path.join(tmp.dir, 'image.raw');
    makeImage(image, 1 * MiB, 3);
    origin = new TestOrigin({ file: image });
    await origin.start();
    redisServer = new RedisServer(path.join(tmp.dir, 'redis'));
    await redisServer.start();
    redis = new Redis(redisServer.url);
    agent = await agentDaemon({ dir: path.join(tmp.dir, 'agent') });
    await agent.start();
    driver = await driverService({ dir: tmp.dir, redisUrl: redisServer.url });
    await driver.start();
  });
  after(async () => {
    await driver?.stop();
    await agent?.stop();
    redis?.disconnect();
    await redisServer?.stop();
    await origin?.stop();
    tmp.cleanup();
  });

  it(`measures ${N} live deployments, then what is left once they are torn down`, async () => {
    const api = new DriverClient({ baseUrl: driver.url, token: TOKEN });
    // A node UUID and deployment id of Ironic's length; the image URL and target as a real node's would be.
    const node = (i: number): string => `1be26c0b-03f2-4d2e-ae87-${String(i).padStart(12, '0')}`;
    const request = (i: number): DeploymentCreate => ({
      node_uuid: node(i),
      deployment_id: `deploy-20260101-${i}`,
      instance_info: { image_source: `${origin.url}?temp_url_sig=${'0'.repeat(64)}&temp_url_expires=1999999999`, image_checksum: 'f'.repeat(32), root_gb: 0 },
      driver_info: { smartnic_agent_url: agent.url, smartnic_target: path.join(tmp.dir, 'agent', 'targets', `${node(i)}.raw`) },
    });
    // Warm-up: one deployment made and torn down first, so that what BullMQ creates once
    // per queue (its Lua scripts, queue metadata) is not counted against the N.
    await api.createDeployment(request(N));
    await until('the warm-up deployment complete', async () => (await api.getDeployment(node(N))).state === 'complete', 60_000);
    await api.deleteDeployment(node(N));
    await until('the warm-up deployment torn down', () => api.getDeployment(node(N)).then(() => false, (e: unknown) => e instanceof ApiError && e.status === 404));
    const before = (await usage(redis)).used;
    for (let i = 0; i < N; i++) await api.createDeployment(request(i));
    await until('every deployment complete, its monitor job done', async () => {
      const all = await api.listDeployments();
      return all.length === N && all.every((d) => d.state === 'complete' && d.jobs.some((j) => j.queue === 'monitor' && j.state === 'completed'));
    }, 180_000, 500);
    const live = await usage(redis);
    process.stdout.write(`${table('live, complete', before, live)}\n`);
    const perRecord = live.byKind.get('record')!.bytes / N;
    const perDeployment = (live.used - before) / N;
    assert.equal(live.byKind.get('record')!.keys, N);
    assert.ok(perDeployment < 32 * 1024, `${perDeployment} bytes per live deployment`);

    for (let i = 0; i < N; i++) await api.deleteDeployment(node(i));
    await until('every deployment torn down', async () => {
      for (let i = 0; i < N; i++) {
        const gone = await api.getDeployment(node(i)).then(() => false, (e: unknown) => e instanceof ApiError && e.status === 404);
        if (!gone) return false;
      }
      return true;
    }, 180_000, 500);
    const after = await usage(redis);
    process.stdout.write(`${table('torn down (job history kept: jobs.keep_completed per queue)', before, after)}\n`);
    assert.equal(after.byKind.get('record'), undefined);
    process.stdout.write(`record alone: ${Math.round(perRecord)} bytes\n`);
    // The event streams are capped by BullMQ (streams.events.maxLen, 10,000 entries a queue): their bytes per entry bound them.
    for (const q of ['attach', 'monitor', 'teardown']) {
      const key = `${PREFIX}:${q}:events`;
      const entries = await redis.xlen(key);
      const bytes = Number(await redis.call('MEMORY', 'USAGE', key, 'SAMPLES', '0'));
      process.stdout.write(`events ${q}: ${entries} entries, ${bytes} bytes, ${Math.round(bytes / Math.max(1, entries))} bytes per entry\n`);
    }
  });
});
