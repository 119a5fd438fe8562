/**
 * The driver service on Redis Sentinel, with real processes: a primary and a replica
 * (redis-server), three sentinels, the DPU agent daemon, the driver service, an HTTP
 * origin. The primary is killed (SIGKILL) mid-deployment; the sentinels promote the
 * replica, the service follows, the deployment completes, and every deployment the API
 * acknowledged is still there (redis.wait_replicas: 1). Deterministic: the origin holds
 * back the image's last region until the failover is over, so the deployment is still
 * hydrating (its monitor job running) when the primary dies, whatever the machine's speed.
 */
import assert from 'node:assert/strict';
import { once } from 'node:events';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { resolveDriverConfig } from '../../driver/src/config.js';
import { connectionGeneration, connectRedis } from '../../driver/src/redis-connect.js';
import { DriverClient, type Deployment, type DeploymentCreate } from '../../openapi/clients/driver-client.js';
import { ApiError } from '../../openapi/clients/http.js';
import { makeImage, tempDir } from '../helpers/agent.js';
import { TestOrigin } from '../helpers/origin.js';
import { SentinelRedis } from '../helpers/redis-sentinel.js';
import { agentDaemon, deploymentGone, deploymentIn, driverService, type ServiceProcess, TOKEN, until } from '../helpers/services.js';

const MiB = 1 << 20;
const IMAGE = 16 * MiB;

describe('driver service on Redis Sentinel', function () {
  this.timeout(240_000);
  let dir: string;
  let cleanup: () => void;
  let image: string;
  let origin: TestOrigin;
  let redis: SentinelRedis;
  let agent: ServiceProcess;
  let driver: ServiceProcess;
  let api: DriverClient;

  before(async () => {
    ({ dir, cleanup } = tempDir('driver-sentinel'));
    image = path.join(dir, 'image.raw');
    makeImage(image, IMAGE, 11);
    origin = new TestOrigin({ file: image });
    await origin.start();
    redis = new SentinelRedis(path.join(dir, 'redis'));
    await redis.start();
    agent = await agentDaemon({ dir: path.join(dir, 'agent') });
    await agent.start();
    const sentinelCfg = { url: 'redis://sentinel/0', prefix: 'test', check_interval_ms: 300, sentinel: { master_name: 'smartnic', nodes: redis.nodes }, wait_replicas: 1, wait_timeout_ms: 3000 };
    driver = await driverService({ dir, redisUrl: sentinelCfg.url, extra: { redis: sentinelCfg, manifests: { enabled: false } } });
    await driver.start();
    api = new DriverClient({ baseUrl: driver.url, token: TOKEN });
  });
  after(async () => {
    await driver?.stop();
    await agent?.stop();
    await redis?.stop();
    await origin?.stop();
    cleanup();
  });

  const target = (node: string): string => path.join(dir, 'agent', 'targets', `${node}.raw`);
  const request = (node: string): DeploymentCreate => ({
    node_uuid: node,
    deployment_id: `dep-${node}`,
    instance_info: { image_source: origin.url },
    driver_info: { smartnic_agent_url: agent.url, smartnic_target: target(node) },
  });
  const state = (node: string, want: Deployment['state'][]): Promise<Deployment> => deploymentIn(api, node, want, 90_000);
  const health = async (): Promise<Record<string, unknown>> => (await fetch(`${driver.url}/v1/health`)).json() as Promise<Record<string, unknown>>;

  it('reports the replicas; with none confirming, a change is answered 503 DRV_ERR_REDIS_REPLICATION and kept, and the retry is acknowledged once the replica is back', async () => {
    await until('health to count the replica', async () => (await health())['redis_replicas'] === 1);
    const replica = redis.servers[1]!;
    await replica.stop('SIGKILL');
    const err = await api.createDeployment(request('node-w')).then(
      () => null,
      (e: unknown) => e,
    );
    assert.ok(err instanceof ApiError, 'not acknowledged');
    assert.equal(err.status, 503);
    assert.equal(err.code, 'DRV_ERR_REDIS_REPLICATION');
    assert.equal(err.retryable, true);
    assert.match(err.message, /0 of the 1 replica\(s\) redis\.wait_replicas asks for confirmed it within 3000 ms.*Retry the request \(a deployment or cleaning asked for again is the same one\)/);
    assert.equal((await api.getDeployment('node-w')).deployment_id, 'dep-node-w', 'kept on the primary');
    const { node_uuid: _n, deployment_id: _d, ...check } = request('node-v');
    assert.equal((await api.validate(check)).valid, true, 'a request that changes nothing does not wait for replicas');
    assert.equal(driver.output.match(/"level":40[^\n]*"code":"DRV_ERR_REDIS_REPLICATION"/g)?.length, 1, 'the request logged once, as a warning');
    await until('the periodic check to warn of the missing replica', async () => /0 replica\(s\) connected, and redis\.wait_replicas is 1/.test(driver.output));
    await replica.start();
    await redis.replicating(replica);
    const again = await api.createDeployment(request('node-w'));
    assert.equal(again.deployment_id, 'dep-node-w', 'the same deployment, now acknowledged');
    await state('node-w', ['complete']);
    await api.deleteDeployment('node-w');
    await deploymentGone(api, 'node-w');
  });

  it('a deployment survives SIGKILL of the primary mid-hydration: the replica is promoted, every acknowledged deployment is there and completes', async () => {
    // The last region is held at the origin until the failover is over.
    origin.hold(IMAGE - MiB, IMAGE);
    const acknowledged = new Set<string>();
    try {
      for (const node of ['node-a', 'node-b']) {
        await api.createDeployment(request(node));
        acknowledged.add(node);
      }
      for (const node of ['node-a', 'node-b']) await state(node, ['ready']);
      const oldPrimary = await redis.primaryPort();
      await redis.server(oldPrimary).stop('SIGKILL');
      // Deployments asked for while the primary is gone: each is answered 503 (not
      // acknowledged: retried) until the service reaches the new primary and a replica
      // confirms the change.
      const during = ['node-c', 'node-d', 'node-e'];
      let refused = 0;
      let replicaBack = false;
      const ackedEarly: string[] = [];
      const creating = (async () => {
        for (const node of during) {
          await until(`${node} acknowledged`, async () => {
            try {
              await api.createDeployment(request(node));
              if (!replicaBack) ackedEarly.push(node);
              acknowledged.add(node);
              return true;
            } catch (e) {
              if (e instanceof ApiError && e.status === 503 && e.retryable) {
                refused++;
                return false;
              }
              throw e;
            }
          }, 90_000, 200);
        }
      })();
      const newPrimary = await redis.failedOver(oldPrimary);
      // The old primary comes back (as its service manager would restart it) as a replica
      // of the new one. Until it replicates, the new primary has no replica, so no change
      // is acknowledged (wait_replicas: 1). It is started as a replica rather than left to
      // the sentinels, which convert a returning primary ~10 s after it is up here, but in
      // two clean-clone CI runs had not after 60 and 150 s, for reasons not known (the
      // servers' and sentinels' logs were not kept then). So this test does not cover a
      // stale primary coming back as one while a lagging sentinel still names it.
      const old = redis.server(oldPrimary);
      replicaBack = true;
      await old.start(['--replicaof', '127.0.0.1', String(newPrimary)]);
      await redis.replicating(old);
      assert.equal(await redis.role(newPrimary), 'master');
      await creating;
      assert.deepEqual([...acknowledged].sort(), ['node-a', 'node-b', 'node-c', 'node-d', 'node-e']);
      assert.ok(refused > 0, 'requests during the failover were answered 503');
      assert.deepEqual(ackedEarly, [], 'nothing acknowledged before the new primary had a replica');
      for (const node of acknowledged) assert.equal((await api.getDeployment(node)).deployment_id, `dep-${node}`, `${node} kept`);
      origin.release();
      for (const node of acknowledged) {
        const done = await state(node, ['complete']);
        assert.equal(done.progress.fraction, 1);
        assert.ok(fs.readFileSync(target(node)).equals(fs.readFileSync(image)), `${node}'s target is the image`);
      }
      for (const node of acknowledged) await api.deleteDeployment(node);
      for (const node of acknowledged) {
        await deploymentGone(api, node, 60_000);
        assert.equal(fs.existsSync(target(node)), false, `${node} wiped`);
      }
    } finally {
      origin.release();
    }
  });
  it('counts each time a connection is made again (what tells a WAIT after a failover from one on the same server)', async () => {
    const cfg = resolveDriverConfig({ object: { auth: { disabled: true }, redis: { url: 'redis://sentinel/0', sentinel: { master_name: 'smartnic', nodes: redis.nodes } } } }).redis;
    const conn = connectRedis(cfg, 'fail-fast');
    conn.on('error', () => undefined);
    try {
      await once(conn, 'ready');
      const g = connectionGeneration(conn);
      assert.ok(g >= 1);
      conn.disconnect(true);
      await once(conn, 'ready');
      assert.equal(connectionGeneration(conn), g + 1);
    } finally {
      conn.disconnect();
    }
  });

  it('starts and answers with a sentinel that accepts connections but never answers listed first', async () => {
    const hung = net.createServer((socket) => socket.on('error', () => undefined)); // accepts, never answers
    await new Promise<void>((r) => hung.listen(0, '127.0.0.1', r));
    const hungAt = `127.0.0.1:${(hung.address() as net.AddressInfo).port}`;
    const cfg = { url: 'redis://sentinel/0', prefix: 'hung', sentinel: { master_name: 'smartnic', nodes: [hungAt, ...redis.nodes] } };
    const d = await driverService({ dir: path.join(dir, 'hung'), redisUrl: cfg.url, extra: { redis: cfg, manifests: { enabled: false } } });
    try {
      await d.start(60_000);
      const h = (await (await fetch(`${d.url}/v1/health`)).json()) as Record<string, unknown>;
      assert.equal(h['redis'], 'up');
    } finally {
      await d.stop();
      hung.close();
    }
  });
});
