/**
 * Image manifests through the control plane, with real processes (redis-server, the DPU
 * agent daemon, the driver service, an HTTP origin): the `manifest` job builds an image's
 * manifest once, the driver uploads it to every disk of that image, the agent verifies
 * each fetched region with it; a digest that does not match is reported, and fails the
 * deployment when verification is required.
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { AgentClient, type Disk } from '../../openapi/clients/agent-client.js';
import { DriverClient, type Deployment, type DeploymentCreate } from '../../openapi/clients/driver-client.js';
import { ApiError } from '../../openapi/clients/http.js';
import { makeImage, tempDir } from '../helpers/agent.js';
import { TestOrigin } from '../helpers/origin.js';
import { RedisServer } from '../helpers/redis.js';
import { run } from '../helpers/run.js';
import { agentDaemon, deploymentGone, deploymentIn, driverService, type ServiceProcess, TOKEN, until } from '../helpers/services.js';

const MiB = 1 << 20;

describe('driver service: image manifests (build once, upload, verify)', function () {
  this.timeout(90_000);
  let dir: string;
  let cleanup: () => void;
  let image: string;
  let sha512: string;
  let origin: TestOrigin;
  let redis: RedisServer;
  let agent: ServiceProcess;
  let driver: ServiceProcess;
  let api: DriverClient;
  let agentApi: AgentClient;

  before(async () => {
    ({ dir, cleanup } = tempDir('driver-manifest'));
    image = path.join(dir, 'image.raw');
    makeImage(image, 16 * MiB, 7);
    sha512 = createHash('sha512').update(fs.readFileSync(image)).digest('hex');
    origin = new TestOrigin({ file: image });
    await origin.start();
    redis = new RedisServer(path.join(dir, 'redis'));
    await redis.start();
    agent = await agentDaemon({ dir: path.join(dir, 'agent') });
    await agent.start();
    agentApi = new AgentClient({ baseUrl: agent.url, token: TOKEN });
    driver = await driverService({ dir, redisUrl: redis.url });
    await driver.start();
    api = new DriverClient({ baseUrl: driver.url, token: TOKEN });
    await until('the driver reaches Redis', () => api.listDeployments().then(() => true));
  });
  after(async () => {
    await driver?.stop();
    await agent?.stop();
    await redis?.stop();
    await origin?.stop();
    cleanup();
  });

  const target = (node: string): string => path.join(dir, 'agent', 'targets', `${node}.raw`);
  const request = (node: string, hash: string, extra: Partial<DeploymentCreate['driver_info']> = {}): DeploymentCreate => ({
    node_uuid: node,
    instance_info: { image_source: origin.url, image_os_hash_algo: 'sha512', image_os_hash_value: hash },
    // Hydration capped so that the disk is still streaming when its manifest arrives.
    driver_info: { smartnic_agent_url: agent.url, smartnic_target: target(node), smartnic_bandwidth: 3 * MiB, ...extra },
  });
  const state = (node: string, want: Deployment['state'][], timeoutMs = 40_000): Promise<Deployment> => deploymentIn(api, node, want, timeoutMs);
  const verified = (diskId: string): Promise<Disk> => until(`${diskId} verified`, async () => {
    const disk = await agentApi.getDisk(diskId);
    return disk.verified ? disk : null;
  }, 30_000);
  const manifestJobs = async (): Promise<Record<string, number>> => {
    const text = await api.metrics();
    const out: Record<string, number> = {};
    for (const m of text.matchAll(/smartnic_driver_jobs\{queue="manifest",state="(\w+)"\} (\d+)/g)) out[m[1]!] = Number(m[2]);
    return out;
  };
  const teardown = async (node: string): Promise<void> => {
    await api.deleteDeployment(node);
    await deploymentGone(api, node);
  };

  it('builds the manifest once (the image matches its sha512); the disk becomes verified, also after an agent restart', async () => {
    await api.createDeployment(request('node-m1', sha512));
    const ready = await state('node-m1', ['ready', 'complete']);
    const disk = await verified(ready.disk_id);
    assert.equal(disk.integrity_failures, 0);
    const d = await api.getDeployment('node-m1');
    assert.equal(d.jobs.find((j) => j.queue === 'manifest')?.state, 'completed');
    assert.deepEqual(await manifestJobs().then((c) => c['completed']), 1);

    // The agent refuses what is not a manifest of this disk, and leaves the disk verified.
    await assert.rejects(agentApi.setManifest(ready.disk_id, Buffer.from('not a manifest')), (e: unknown) => e instanceof ApiError && e.status === 400 && e.code === 'DPU_ERR_MANIFEST_INVALID' && /bad magic/.test(e.message));
    await assert.rejects(agentApi.setManifest('no-such-disk', Buffer.from('x')), (e: unknown) => e instanceof ApiError && e.status === 404);
    // Stored with the disk: a restarted agent verifies again.
    await agent.stop();
    await agent.start();
    assert.equal((await agentApi.getDisk(ready.disk_id)).verified, true);
    await teardown('node-m1');
  });

  it('a second deployment of the image reuses the cached manifest; corrupted answers are caught, the target equals the image', async () => {
    await api.createDeployment(request('node-m2', sha512));
    const ready = await state('node-m2', ['ready', 'complete']);
    await verified(ready.disk_id);
    origin.faults.push('corrupt', 'corrupt', 'corrupt');
    const done = await state('node-m2', ['complete'], 60_000);
    assert.equal(done.progress.fraction, 1);
    assert.ok(fs.readFileSync(target('node-m2')).equals(fs.readFileSync(image)), 'the target is the image');
    const disk = await agentApi.getDisk(ready.disk_id);
    assert.ok(disk.integrity_failures > 0, `integrity_failures ${disk.integrity_failures}`);
    assert.ok(origin.stats.faultsInjected >= 1);
    const counts = await manifestJobs();
    assert.equal(counts['completed'], 1, 'no second build');
    assert.equal((counts['waiting'] ?? 0) + (counts['active'] ?? 0) + (counts['delayed'] ?? 0), 0);
    await teardown('node-m2');
  });

  it('a wrong os_hash_value: last_error says the image does not match; the deployment streams on unverified', async () => {
    const wrong = createHash('sha512').update('another image').digest('hex');
    await api.createDeployment(request('node-m3', wrong));
    const d = await until('mismatch reported', async () => {
      const dep = await api.getDeployment('node-m3');
      return /does not match Glance/.test(dep.last_error ?? '') ? dep : null;
    }, 30_000);
    assert.match(d.last_error!, /DRV_ERR_IMAGE_MISMATCH/);
    assert.notEqual(d.state, 'failed');
    assert.equal((await agentApi.getDisk(d.disk_id)).verified, false);
    await teardown('node-m3');
  });

  it('a wrong os_hash_value with verification required: the deployment fails, no disk is created', async () => {
    const wrong = createHash('sha512').update('yet another image').digest('hex');
    await api.createDeployment(request('node-m4', wrong, { smartnic_require_verification: true }));
    const d = await state('node-m4', ['failed']);
    assert.match(d.last_error!, /DRV_ERR_IMAGE_MISMATCH.*does not match/);
    assert.equal(d.jobs.find((j) => j.queue === 'manifest')?.state, 'failed');
    await assert.rejects(agentApi.getDisk(d.disk_id), (e: unknown) => e instanceof ApiError && e.status === 404);
    await teardown('node-m4');
  });

  it('a qcow2 image: the digest of the qcow2 file is checked (it used to be skipped); a wrong one fails a deployment that requires verification', async () => {
    const raw = path.join(dir, 'q.raw');
    const qcow2 = path.join(dir, 'q.qcow2');
    makeImage(raw, 8 * MiB, 11);
    await run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, qcow2]);
    const fileSha = createHash('sha256').update(fs.readFileSync(qcow2)).digest('hex');
    const q = new TestOrigin({ file: qcow2 });
    await q.start();
    try {
      const qrequest = (node: string, sha: string): DeploymentCreate => ({
        node_uuid: node,
        instance_info: { image_source: q.url, image_disk_format: 'qcow2', image_os_hash_algo: 'sha256', image_os_hash_value: sha },
        driver_info: { smartnic_agent_url: agent.url, smartnic_target: target(node), smartnic_require_verification: true },
      });
      await api.createDeployment(qrequest('node-q1', createHash('sha256').update('not this file').digest('hex')));
      const bad = await state('node-q1', ['failed']);
      assert.match(bad.last_error!, /DRV_ERR_IMAGE_MISMATCH.*the qcow2 file's sha256 is/);
      await teardown('node-q1');

      await api.createDeployment(qrequest('node-q2', fileSha));
      const ok = await state('node-q2', ['complete'], 60_000);
      assert.equal(ok.jobs.find((j) => j.queue === 'manifest')?.state, 'completed');
      assert.equal((await agentApi.getDisk(ok.disk_id)).verified, true);
      assert.ok(fs.readFileSync(target('node-q2')).equals(fs.readFileSync(raw)), 'the target is the disk the qcow2 file describes');
      await teardown('node-q2');
    } finally {
      await q.stop();
    }
  });
});
