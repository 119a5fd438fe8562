/**
 * The control plane end to end, with real processes: redis-server, the DPU agent daemon,
 * the driver service (two of them, sharing one Redis), an HTTP origin. A deployment goes
 * attach → ready → complete → teardown; the driver, the agent and Redis are restarted
 * mid-deployment and the deployment still completes.
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { AgentClient } from '../../openapi/clients/agent-client.js';
import { DriverClient, type Deployment, type DeploymentCreate } from '../../openapi/clients/driver-client.js';
import { ApiError } from '../../openapi/clients/http.js';
import { makeImage, tempDir } from '../helpers/agent.js';
import { TestOrigin } from '../helpers/origin.js';
import { RedisServer } from '../helpers/redis.js';
import { run } from '../helpers/run.js';
import { agentDaemon, deploymentGone, deploymentIn, deploymentWhere, driverService, type ServiceProcess, TOKEN, until } from '../helpers/services.js';

const MiB = 1 << 20;

describe('driver service with a real agent, Redis and origin', function () {
  this.timeout(180_000);
  let dir: string;
  let cleanup: () => void;
  let image: string;
  let origin: TestOrigin;
  let redis: RedisServer;
  let agent: ServiceProcess;
  let drivers: ServiceProcess[] = [];
  let api: DriverClient;
  let agentApi: AgentClient;

  before(async () => {
    ({ dir, cleanup } = tempDir('driver'));
    image = path.join(dir, 'image.raw');
    makeImage(image, 24 * MiB, 5);
    origin = new TestOrigin({ file: image });
    await origin.start();
    redis = new RedisServer(path.join(dir, 'redis'));
    await redis.start();
    agent = await agentDaemon({ dir: path.join(dir, 'agent') });
    await agent.start();
    agentApi = new AgentClient({ baseUrl: agent.url, token: TOKEN });
    drivers = [await driverService({ dir, redisUrl: redis.url }), await driverService({ dir, redisUrl: redis.url })];
    for (const d of drivers) await d.start();
    api = new DriverClient({ baseUrl: drivers[0]!.url, token: TOKEN });
  });
  after(async () => {
    for (const d of drivers) await d.stop();
    await agent.stop();
    await redis.stop();
    await origin.stop();
    cleanup();
  });

  const target = (node: string): string => path.join(dir, 'agent', 'targets', `${node}.raw`);
  const request = (node: string, extra: Partial<DeploymentCreate['driver_info']> = {}): DeploymentCreate => ({
    node_uuid: node,
    instance_info: { image_source: origin.url },
    driver_info: { smartnic_agent_url: agent.url, smartnic_target: target(node), ...extra },
  });
  const state = (node: string, want: Deployment['state'][], timeoutMs = 60_000): Promise<Deployment> => deploymentIn(api, node, want, timeoutMs);
  const gone = (node: string): Promise<boolean> => deploymentGone(api, node);

  it('deploys: attach → ready (export serves the image) → complete (target = image) → teardown wipes', async () => {
    const created = await api.createDeployment(request('node-a'));
    assert.equal(created.state, 'attaching');
    assert.ok(created.jobs.some((j) => j.queue === 'attach'));
    const ready = await state('node-a', ['ready', 'complete']);
    assert.match(ready.export_uri!, /^nbd\+unix:/);
    const cmp = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', image, ready.export_uri!]);
    assert.match(cmp.stdout, /identical/);
    // The monitor job writes "complete" and ends a moment later: its own state is waited for
    // (a clean-clone CI run read the deployment in between: monitor still active).
    await state('node-a', ['complete']);
    const done = await deploymentWhere(api, 'node-a', (d) => d.jobs.some((j) => j.queue === 'monitor' && (j.state === 'completed' || j.state === 'failed')), 'its monitor job ended', 30_000);
    assert.equal(done.state, 'complete');
    assert.equal(done.progress.fraction, 1);
    assert.equal(done.progress.regions_local, done.progress.regions_total);
    assert.ok(fs.readFileSync(target('node-a')).equals(fs.readFileSync(image)));
    const jobs = Object.fromEntries(done.jobs.map((j) => [j.queue, j.state]));
    assert.equal(jobs['attach'], 'completed');
    assert.equal(jobs['monitor'], 'completed');
    const finished = Object.fromEntries(done.jobs.map((j) => [j.queue, j.finished_at ? Date.parse(j.finished_at) : null]));
    assert.ok(finished['attach']! >= Date.parse(created.created_at) && finished['monitor']! >= finished['attach']!, 'attach finished at ready, monitor at complete');
    const metrics = await api.metrics();
    assert.match(metrics, /smartnic_driver_deployments\{state="complete"\} 1/);
    assert.match(metrics, /smartnic_driver_deployment_hydrated_ratio\{node="node-a"\} 1/);
    const cli = await run(process.execPath, ['driver/bin/smartnic-driver.js', 'jobs', 'list', '--config', drivers[0]!.configFile]);
    assert.match(cli.stdout, /attach-node-a-\S+ {2}completed/);
    const del = await api.deleteDeployment('node-a');
    assert.equal(del.state, 'deleting');
    await gone('node-a');
    assert.equal(fs.existsSync(target('node-a')), false, 'wiped');
    assert.equal((await agentApi.listDisks()).length, 0, 'no orphaned disk on the agent');
  });

  it('is idempotent on node + deployment, and refuses a second deployment of a node', async () => {
    const a = await api.createDeployment({ ...request('node-b'), deployment_id: 'one' });
    const again = await api.createDeployment({ ...request('node-b'), deployment_id: 'one' });
    assert.equal(again.deployment_id, a.deployment_id);
    await assert.rejects(api.createDeployment({ ...request('node-b'), deployment_id: 'two' }), (e: unknown) => e instanceof ApiError && e.status === 409 && e.code === 'DRV_ERR_CONFLICT');
    await state('node-b', ['complete']);
    const attachJobs = (await api.getDeployment('node-b')).jobs.filter((j) => j.queue === 'attach');
    assert.equal(attachJobs.length, 1);
    await api.deleteDeployment('node-b');
    await gone('node-b');
  });

  it('PUT /image gives a streaming disk a new URL of the same image (a renewed temp URL); another image is refused', async () => {
    const sha256 = createHash('sha256').update(fs.readFileSync(image)).digest('hex');
    const digest = { image_os_hash_algo: 'sha256', image_os_hash_value: sha256 };
    const second = new TestOrigin({ file: image });
    await second.start();
    try {
      // Capped, so that the disk is still streaming when its URL is replaced.
      await api.createDeployment({ ...request('node-url', { smartnic_bandwidth: 4 * MiB }), deployment_id: 'renew', instance_info: { image_source: origin.url, ...digest } });
      const ready = await state('node-url', ['ready']);
      const replaced = await api.replaceDeploymentImage('node-url', { deployment_id: 'renew', instance_info: { image_source: second.url, ...digest } });
      assert.equal(replaced.image_url, second.url);
      assert.equal((await agentApi.getDisk(ready.disk_id)).source.url, second.url, 'the agent reads the new URL');
      const fetchedBefore = second.stats.requests;
      // Not the same image: refused, nothing changes.
      await assert.rejects(
        api.replaceDeploymentImage('node-url', { deployment_id: 'renew', instance_info: { image_source: origin.url, image_os_hash_algo: 'sha256', image_os_hash_value: 'ab'.repeat(32) } }),
        (e: unknown) => e instanceof ApiError && e.status === 422 && /only a new URL of the same image/.test(e.message),
      );
      await assert.rejects(api.replaceDeploymentImage('node-url', { deployment_id: 'other', instance_info: { image_source: origin.url, ...digest } }), (e: unknown) => e instanceof ApiError && e.status === 409);
      const done = await state('node-url', ['complete']);
      assert.equal(done.image_url, second.url);
      assert.ok(second.stats.requests > fetchedBefore, 'the rest of the copy came from the new URL');
      assert.ok(fs.readFileSync(target('node-url')).equals(fs.readFileSync(image)));
      await api.deleteDeployment('node-url');
      await gone('node-url');
    } finally {
      await second.stop();
    }
  });

  it('refuses bad requests with a message naming the field, and unauthenticated calls', async () => {
    const bad = async (body: unknown, status: number, pattern: RegExp): Promise<void> => {
      await assert.rejects(api.createDeployment(body as DeploymentCreate), (e: unknown) => e instanceof ApiError && e.status === status && pattern.test(e.message));
    };
    await bad({ ...request('node-x'), surprise: 1 }, 400, /unknown field "surprise"/);
    await bad({ node_uuid: 'node-x', instance_info: { image_source: origin.url }, driver_info: { smartnic_agent_url: agent.url } }, 400, /missing the required field "smartnic_target"/);
    await bad({ ...request('node-x'), instance_info: { image_source: 'glance://2f0a' } }, 422, /does not end in a Glance image id/);
    await bad({ ...request('node-x'), instance_info: { image_source: 'ftp://example/x.img' } }, 422, /scheme "ftp:" is not supported/);
    await bad({ ...request('node:x') }, 400, /node_uuid must match pattern/);
    const anon = new DriverClient({ baseUrl: drivers[0]!.url });
    await assert.rejects(anon.listDeployments(), (e: unknown) => e instanceof ApiError && e.status === 401 && e.code === 'DRV_ERR_UNAUTHORIZED');
    assert.equal((await anon.health()).status, 'ok');
  });

  it('validates: a good node passes with the image size; a dead agent or image is named', async () => {
    const ok = await api.validate({ instance_info: { image_source: origin.url }, driver_info: { smartnic_agent_url: agent.url, smartnic_target: target('v') } });
    assert.equal(ok.image_size, 24 * MiB);
    await assert.rejects(api.validate({ instance_info: { image_source: origin.url }, driver_info: { smartnic_agent_url: 'http://127.0.0.1:9', smartnic_target: target('v') } }), (e: unknown) => e instanceof ApiError && e.status === 422 && /smartnic_agent_url/.test(e.message));
    await assert.rejects(api.validate({ instance_info: { image_source: origin.url.replace('disk.raw', 'missing.raw').replace(/:\d+\//, ':9/') }, driver_info: { smartnic_agent_url: agent.url, smartnic_target: target('v') } }), (e: unknown) => e instanceof ApiError && e.status === 422);
  });

  it('a permanent failure (image 404) ends in failed with the reason, without exhausting retries', async () => {
    const missing = new TestOrigin({ file: image, notFound: true });
    await missing.start();
    try {
      await api.createDeployment({ ...request('node-c'), instance_info: { image_source: missing.url } });
      const d = await state('node-c', ['failed'], 30_000);
      assert.match(d.last_error!, /404/);
      const attach = d.jobs.find((j) => j.queue === 'attach')!;
      assert.equal(attach.state, 'failed');
      assert.equal(attach.attempts, 1, 'a permanent error is not retried');
      await api.deleteDeployment('node-c');
      await gone('node-c');
    } finally {
      await missing.stop();
    }
  });

  it('a teardown that fails while the agent is down ends failed; DELETE again once it is back completes it', async () => {
    await api.createDeployment(request('node-t'));
    await state('node-t', ['complete']);
    await agent.stop();
    try {
      await api.deleteDeployment('node-t');
      const failed = await state('node-t', ['failed'], 60_000);
      assert.match(failed.last_error!, /DRV_ERR_AGENT_UNREACHABLE/);
      assert.equal(failed.jobs.find((j) => j.queue === 'teardown')?.state, 'failed');
    } finally {
      await agent.start();
    }
    const again = await api.deleteDeployment('node-t');
    assert.equal(again.state, 'deleting');
    await gone('node-t');
    assert.equal(fs.existsSync(target('node-t')), false, 'wiped');
    assert.equal((await agentApi.listDisks()).length, 0);
  });

  it('a teardown whose wipe fails is not done: the deployment stays failed with the reason, the disk stays on the agent, until a DELETE wipes it', async () => {
    await api.createDeployment(request('node-w'));
    const done = await state('node-w', ['complete']);
    // The fault: the target's directory made immutable, so the agent cannot remove (wipe) the file target.
    const targets = path.join(dir, 'agent', 'targets');
    await run('chattr', ['+i', targets]);
    try {
      await api.deleteDeployment('node-w');
      const failed = await state('node-w', ['failed'], 60_000);
      assert.match(failed.last_error!, /DPU_ERR_WIPE_FAILED/);
      const job = failed.jobs.find((j) => j.queue === 'teardown')!;
      assert.equal(job.state, 'failed');
      assert.ok((job.attempts ?? 0) > 1, 'a failed wipe is retried');
      assert.equal((await agentApi.getDisk(done.disk_id)).state, 'wiping', 'the agent still shows the disk, waiting for its wipe');
      assert.ok(fs.existsSync(target('node-w')), 'not wiped');
      // DELETE again while the fault lasts: the wipe is tried again and fails again, never counted as done.
      await api.deleteDeployment('node-w');
      const again = await state('node-w', ['failed'], 60_000);
      assert.match(again.last_error!, /DPU_ERR_WIPE_FAILED/);
      assert.equal((await agentApi.getDisk(done.disk_id)).state, 'wiping');
    } finally {
      await run('chattr', ['-i', targets]);
    }
    await api.deleteDeployment('node-w');
    await gone('node-w');
    assert.equal(fs.existsSync(target('node-w')), false, 'wiped');
    assert.equal((await agentApi.listDisks()).length, 0);
  });

  it('survives restarts of the driver, the agent and Redis mid-deployment', async () => {
    origin.setRate(3 * MiB); // hydration of 24 MiB takes ~8 s: time to restart things
    try {
      await api.createDeployment(request('node-d'));
      await state('node-d', ['ready']);
      // Driver: stop one of the two; the other carries on with the monitor job.
      await drivers[0]!.stop();
      api = new DriverClient({ baseUrl: drivers[1]!.url, token: TOKEN });
      await until('progress', async () => (await api.getDeployment('node-d')).progress.regions_local > 2);
      // Agent: kill -9 and restart; the disk resumes from its state directory.
      await agent.stop('SIGKILL');
      await new Promise((r) => setTimeout(r, 500));
      await agent.start();
      // Redis: restart; workers reconnect, the records and jobs are still there.
      await redis.restart();
      await drivers[0]!.start();
      const done = await state('node-d', ['complete'], 90_000);
      assert.equal(done.progress.fraction, 1);
      assert.ok(fs.readFileSync(target('node-d')).equals(fs.readFileSync(image)));
      await api.deleteDeployment('node-d');
      await gone('node-d');
      assert.equal((await agentApi.listDisks()).length, 0);
    } finally {
      origin.setRate(0);
    }
  });
  it('stops on SIGTERM within seconds even while Redis is down, and says so once, not in a flood', async () => {
    await redis.stop();
    await new Promise((r) => setTimeout(r, 3000)); // workers notice and retry meanwhile
    const d = drivers[1]!;
    const t0 = Date.now();
    const code = await d.stop();
    const took = Date.now() - t0;
    assert.equal(code, 0);
    assert.ok(took < 15_000, `took ${took} ms to stop`);
    const workerErrors = d.output.split('\n').filter((l) => l.includes('worker error')).length;
    assert.ok(workerErrors <= 10, `${workerErrors} worker-error lines: repeats must be suppressed`);
    await redis.start();
  });
});
